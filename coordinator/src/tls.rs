//! TLS on the coordinator's gRPC port (rustls through tonic): the server's
//! certificate and key, optionally a client CA that makes client certificates
//! mandatory (mutual TLS), and the rule that plaintext is served only on
//! loopback unless asked for by name (`--insecure-plaintext`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// A TLS handshake that takes longer is dropped, so a client that connects
/// and says nothing (or speaks plaintext and waits) holds no task for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files of `run --tls-cert/--tls-key/--tls-client-ca`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (leaf first).
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client certificates. When given, every
    /// client must present a certificate signed by one of them.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the {what} {path} holds no PEM {label} block")]
    NotPem {
        what: &'static str,
        path: PathBuf,
        label: &'static str,
    },
    #[error("the TLS certificate, key or client CA cannot be used: {0}")]
    Unusable(String),
    #[error(
        "refusing to serve plaintext gRPC on {listen}, which is not a loopback address: give \
         --tls-cert and --tls-key (`cohort-coordinator dev-certs` makes a development set), or \
         --insecure-plaintext to serve without TLS anyway"
    )]
    PlaintextBeyondLoopback { listen: SocketAddr },
}

/// A checked server TLS configuration.
#[derive(Clone, Debug)]
pub struct ServerTls {
    config: ServerTlsConfig,
    mutual: bool,
}

impl ServerTls {
    /// Reads and checks the PEM files: the key must match the certificate and
    /// the client CA must parse, so a bad file fails before a port is bound.
    pub fn load(files: &TlsFiles) -> Result<ServerTls, TlsError> {
        let cert = read_pem(&files.cert, "TLS certificate", &["CERTIFICATE"])?;
        let key = read_pem(
            &files.key,
            "TLS key",
            &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"],
        )?;
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(path) = &files.client_ca {
            let ca = read_pem(path, "TLS client CA", &["CERTIFICATE"])?;
            config = config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(false);
        }
        // tonic parses the PEM and builds the rustls config here, not at accept.
        tonic::transport::Server::builder()
            .tls_config(config.clone())
            .map_err(|e| TlsError::Unusable(error_chain(&e)))?;
        Ok(ServerTls {
            config,
            mutual: files.client_ca.is_some(),
        })
    }

    pub fn config(&self) -> ServerTlsConfig {
        self.config.clone()
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn mutual(&self) -> bool {
        self.mutual
    }
}

/// Plaintext only on loopback, unless `insecure_plaintext` says otherwise.
pub fn check_listen(
    listen: SocketAddr,
    tls: bool,
    insecure_plaintext: bool,
) -> Result<(), TlsError> {
    if tls || insecure_plaintext || listen.ip().is_loopback() {
        Ok(())
    } else {
        Err(TlsError::PlaintextBeyondLoopback { listen })
    }
}

fn read_pem(path: &Path, what: &'static str, labels: &[&'static str]) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if labels
        .iter()
        .any(|label| text.contains(&format!("-----BEGIN {label}-----")))
    {
        Ok(bytes)
    } else {
        Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
            label: labels[0],
        })
    }
}

/// An error and its sources, one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_refused_beyond_loopback_unless_asked_for() {
        let loopback: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let loopback6: SocketAddr = "[::1]:50051".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        assert!(check_listen(loopback, false, false).is_ok());
        assert!(check_listen(loopback6, false, false).is_ok());
        assert!(check_listen(any, true, false).is_ok());
        assert!(check_listen(any, false, true).is_ok());
        let refused = check_listen(any, false, false).unwrap_err().to_string();
        assert!(refused.contains("--insecure-plaintext"), "{refused}");
        assert!(refused.contains("--tls-cert"), "{refused}");
    }

    #[test]
    fn a_file_without_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        let files = TlsFiles {
            cert: cert.clone(),
            key: dir.path().join("missing.key"),
            client_ca: None,
        };
        let error = ServerTls::load(&files).unwrap_err().to_string();
        assert!(
            error.contains("cert.pem") && error.contains("CERTIFICATE"),
            "{error}"
        );
    }
}
