//! `cohort-coordinator dev-certs`: a development CA, a server certificate for
//! the coordinator's host names and one client certificate per site
//! (CN `client-01`, ...), as PEM files with keys readable by the owner only,
//! so that a local TLS setup with mutual TLS is one command.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// What `dev-certs` makes.
#[derive(Clone, Debug)]
pub struct DevCertsOptions {
    /// Output directory; created if missing, and no file in it is replaced.
    pub out: PathBuf,
    /// Number of client certificates.
    pub clients: usize,
    /// DNS names and IP addresses the server certificate is valid for.
    pub hosts: Vec<String>,
    /// Days every certificate is valid from now (it is valid from an hour
    /// ago, for clocks a little behind).
    pub valid_days: u32,
}

/// The files written, by role.
#[derive(Clone, Debug)]
pub struct DevCerts {
    pub out: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// `(common name, certificate, key)` per client.
    pub clients: Vec<(String, PathBuf, PathBuf)>,
    pub hosts: Vec<String>,
    pub valid_days: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DevCertsError {
    #[error("--hosts must name at least one host")]
    NoHosts,
    #[error(
        "{path} already exists; remove it or choose another --out (dev-certs never replaces a key)"
    )]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no randomness from the operating system: {0}")]
    Randomness(getrandom::Error),
    #[error("cannot make the certificate for {what}: {source}")]
    Certificate { what: String, source: rcgen::Error },
}

/// The common name of client `index` (from 1): `client-01`, `client-02`, ...
pub fn client_name(index: usize) -> String {
    format!("client-{index:02}")
}

/// Makes the CA, the server certificate and the client certificates and
/// writes them under `options.out`.
pub fn generate(options: &DevCertsOptions) -> Result<DevCerts, DevCertsError> {
    if options.hosts.is_empty() {
        return Err(DevCertsError::NoHosts);
    }
    let out = &options.out;
    let names: Vec<String> = (1..=options.clients).map(client_name).collect();
    let files = DevCerts {
        out: out.clone(),
        ca_cert: out.join("ca.pem"),
        ca_key: out.join("ca.key"),
        server_cert: out.join("server.pem"),
        server_key: out.join("server.key"),
        clients: names
            .iter()
            .map(|name| {
                (
                    name.clone(),
                    out.join(format!("{name}.pem")),
                    out.join(format!("{name}.key")),
                )
            })
            .collect(),
        hosts: options.hosts.clone(),
        valid_days: options.valid_days,
    };
    // Check every path before writing any, so a refusal leaves nothing half-made.
    let mut paths = vec![
        &files.ca_cert,
        &files.ca_key,
        &files.server_cert,
        &files.server_key,
    ];
    for (_, cert, key) in &files.clients {
        paths.push(cert);
        paths.push(key);
    }
    if let Some(path) = paths.iter().find(|p| p.exists()) {
        return Err(DevCertsError::Exists {
            path: path.to_path_buf(),
        });
    }
    std::fs::create_dir_all(out).map_err(|source| DevCertsError::Write {
        path: out.clone(),
        source,
    })?;

    let certificate_error = |what: &str| {
        let what = what.to_string();
        move |source| DevCertsError::Certificate { what, source }
    };
    let (not_before, not_after) = validity(options.valid_days);

    let mut ca =
        CertificateParams::new(Vec::<String>::new()).map_err(certificate_error("the CA"))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name = rcgen::DistinguishedName::new();
    // A random suffix tells two development CAs apart by name, so a
    // certificate of one is refused by the other as from an unknown CA.
    let mut suffix = [0u8; 4];
    getrandom::fill(&mut suffix).map_err(DevCertsError::Randomness)?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("Cohort development CA {suffix}"),
    );
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(certificate_error("the CA"))?;
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(certificate_error("the CA"))?;
    write_file(&files.ca_cert, ca_cert.pem().as_bytes(), false)?;
    write_file(&files.ca_key, ca_key.serialize_pem().as_bytes(), true)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |common_name: &str, sans: Vec<String>, purpose: ExtendedKeyUsagePurpose| {
        let what = common_name.to_string();
        let mut params = CertificateParams::new(sans).map_err(certificate_error(&what))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(certificate_error(&what))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(certificate_error(&what))?;
        Ok::<_, DevCertsError>((cert.pem(), key.serialize_pem()))
    };

    let (server_pem, server_key) = leaf(
        &options.hosts[0],
        options.hosts.clone(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    write_file(&files.server_cert, server_pem.as_bytes(), false)?;
    write_file(&files.server_key, server_key.as_bytes(), true)?;
    for (name, cert_path, key_path) in &files.clients {
        let (pem, key) = leaf(
            name,
            vec![name.clone()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        write_file(cert_path, pem.as_bytes(), false)?;
        write_file(key_path, key.as_bytes(), true)?;
    }
    Ok(files)
}

/// From an hour ago to `days` from now.
fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(i64::from(days)),
    )
}

/// Writes a new file; a key is mode 0600 from its first byte (on Unix).
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), DevCertsError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    options
        .open(path)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .map_err(|source| DevCertsError::Write {
            path: path.to_owned(),
            source,
        })
}

/// What was made and how to use it.
pub fn render_instructions(certs: &DevCerts) -> String {
    let dir = certs.out.display();
    let mut text = format!(
        "Development certificates in {dir} (valid {days} days; keys are mode 0600):\n\
         \x20 ca.pem, ca.key            the CA: every party trusts ca.pem; keep ca.key off the machines that run jobs\n\
         \x20 server.pem, server.key    the coordinator, for {hosts}\n",
        days = certs.valid_days,
        hosts = certs.hosts.join(", "),
    );
    for (name, _, _) in &certs.clients {
        text.push_str(&format!(
            "  {name}.pem, {name}.key  a worker or client site (CN {name})\n"
        ));
    }
    let host = &certs.hosts[0];
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let client = certs
        .clients
        .first()
        .map_or_else(|| client_name(1), |(name, _, _)| name.clone());
    text.push_str(&format!(
        "\nCoordinator (mutual TLS: every worker needs a client certificate):\n\
         \x20 cohort-coordinator run --job JOB.toml --listen 0.0.0.0:50051 \\\n\
         \x20   --tls-cert {dir}/server.pem --tls-key {dir}/server.key --tls-client-ca {dir}/ca.pem\n\
         Each worker or client site (its own certificate):\n\
         \x20 cohort-worker pretrain --coordinator https://{host}:50051 --tls-ca {dir}/ca.pem \\\n\
         \x20   --tls-cert {dir}/{client}.pem --tls-key {dir}/{client}.key --data-dir DATA\n\
         A federated client site can be enrolled by its certificate instead of a token: give its\n\
         \x20 [[client]] in enrollment.toml certificate_name = \"{client}\" (the CN and DNS name above;\n\
         \x20 token_sha256 then becomes optional) and run it without --token:\n\
         \x20 cohort-worker federated --coordinator https://{host}:50051 --tls-ca {dir}/ca.pem \\\n\
         \x20   --tls-cert {dir}/{client}.pem --tls-key {dir}/{client}.key --data SITE_DIR\n\
         Leave out --tls-client-ca (and the workers' --tls-cert/--tls-key) for server-only TLS.\n\
         These certificates are for development; in production use your organisation's CA.\n"
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_writes_a_ca_a_server_and_clients_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let options = DevCertsOptions {
            out: out.clone(),
            clients: 2,
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            valid_days: 30,
        };
        let certs = generate(&options).unwrap();
        let names: Vec<&str> = certs.clients.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["client-01", "client-02"]);
        for path in [&certs.ca_cert, &certs.server_cert, &certs.clients[1].1] {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{text}");
        }
        #[cfg(unix)]
        for path in [&certs.ca_key, &certs.server_key, &certs.clients[0].2] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
        // The server identity loads as a TLS server with the CA for clients.
        crate::tls::ServerTls::load(&crate::tls::TlsFiles {
            cert: certs.server_cert.clone(),
            key: certs.server_key.clone(),
            client_ca: Some(certs.ca_cert.clone()),
        })
        .unwrap();
        let text = render_instructions(&certs);
        assert!(text.contains("--tls-client-ca"), "{text}");
        assert!(
            text.contains("certificate_name = \"client-01\"") && text.contains("federated"),
            "{text}"
        );
        // A second run refuses to replace anything.
        let again = generate(&options).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
    }
}
