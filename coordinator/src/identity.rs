//! Who a federated client site is. A site is enrolled (`enrollment.toml`) by
//! the SHA-256 of its token, by the name on its client certificate
//! (`certificate_name`), or both. Under mutual TLS the coordinator reads the
//! certificate the client presented (already verified against
//! `--tls-client-ca` by rustls) and looks its names up: the subject's common
//! names and its DNS subject alternative names, each compared with the
//! enrolled `certificate_name`s ignoring ASCII case.
//!
//! A session admitted while the certificate names a site is bound to that
//! site: its digest is the SHA-256 of the session token together with the
//! site's name, so a later call whose certificate names another site (or
//! none) presents a digest the engine does not know, whatever token it
//! replays. Without a certificate, the digest is the token's alone, as it
//! always was.

use std::collections::BTreeMap;

use cohort_core::ids::SessionDigest;
use sha2::{Digest, Sha256};
use tonic::Status;
use tracing::warn;

/// The most names one certificate may carry before it is refused (a client
/// certificate carries a handful; this bounds the work per call).
const MAX_NAMES: usize = 64;

/// What the client certificate of a call says about the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateSite {
    /// No certificate (no mutual TLS, or not a federated job).
    Absent,
    /// A certificate none of whose names is enrolled; its names, for messages.
    Unenrolled(Vec<String>),
    /// A certificate naming this enrolled site.
    Site(String),
}

impl CertificateSite {
    /// The enrolled site the certificate names, if it names one.
    pub fn site(&self) -> Option<&str> {
        match self {
            CertificateSite::Site(site) => Some(site),
            _ => None,
        }
    }

    /// A few words on what the certificate names, for messages.
    pub fn describe(&self) -> String {
        match self {
            CertificateSite::Absent => "no client certificate".to_string(),
            CertificateSite::Unenrolled(names) => format!(
                "a client certificate naming no enrolled site ({})",
                shown_names(names)
            ),
            CertificateSite::Site(site) => format!("the client certificate of site {site:?}"),
        }
    }
}

/// `CN`s and DNS names of a certificate, quoted and comma-separated.
fn shown_names(names: &[String]) -> String {
    if names.is_empty() {
        return "it carries no CN or DNS name".to_string();
    }
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!("CN/DNS names {}", quoted.join(", "))
}

/// The subject common names and DNS subject alternative names of a DER
/// certificate, in that order, each once.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the client certificate cannot be parsed: {e}"))?;
    let mut names = Vec::new();
    for attribute in certificate.subject().iter_common_name() {
        // A CN in a string type that is not UTF-8 text names nothing here.
        if let Ok(name) = attribute.as_str() {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
    }
    let san = certificate
        .subject_alternative_name()
        .map_err(|e| format!("the client certificate's subject alternative names: {e}"))?;
    if let Some(san) = san {
        for general_name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(name) = general_name {
                if !names.iter().any(|n| n == name) {
                    names.push((*name).to_string());
                }
            }
        }
    }
    if names.len() > MAX_NAMES {
        return Err(format!(
            "the client certificate carries {} names, more than {MAX_NAMES}",
            names.len()
        ));
    }
    Ok(names)
}

/// Which enrolled site a DER client certificate names. `enrolled` maps
/// certificate names (ASCII lowercase) to sites. A certificate whose names
/// point at two different sites is refused (PERMISSION_DENIED): it cannot
/// speak for both.
pub fn site_of_certificate(
    der: &[u8],
    enrolled: &BTreeMap<String, String>,
) -> Result<CertificateSite, Status> {
    let names = certificate_names(der).map_err(|message| {
        warn!(%message, "client certificate refused");
        Status::unauthenticated(message)
    })?;
    let mut sites: Vec<&String> = names
        .iter()
        .filter_map(|name| enrolled.get(&name.to_ascii_lowercase()))
        .collect();
    sites.sort();
    sites.dedup();
    match sites.as_slice() {
        [] => Ok(CertificateSite::Unenrolled(names)),
        [site] => Ok(CertificateSite::Site((*site).clone())),
        several => {
            let several: Vec<String> = several.iter().map(|s| format!("{s:?}")).collect();
            warn!(sites = %several.join(", "), "client certificate names several sites");
            Err(Status::permission_denied(format!(
                "the client certificate ({}) names several enrolled sites ({}); a site's \
                 certificate must carry no other site's certificate_name",
                shown_names(&names),
                several.join(", ")
            )))
        }
    }
}

/// The enrolled site a federated client joins as, from its certificate and
/// its token (`tokens`: token SHA-256 in lowercase hex → site;
/// `certificate_names`: certificate name → site):
/// - a certificate naming a site admits that site; a token is then optional,
///   but one that is presented must be that site's (PERMISSION_DENIED);
/// - otherwise the token decides, as without mutual TLS, except that a site
///   enrolled with a `certificate_name` cannot be joined by its token with
///   another site's or an unenrolled certificate (PERMISSION_DENIED);
/// - no certificate naming a site and no token: UNAUTHENTICATED.
pub fn admit_site(
    tokens: &BTreeMap<String, String>,
    certificate_names: &BTreeMap<String, String>,
    certificate: &CertificateSite,
    token: &str,
) -> Result<String, Status> {
    let token = token.trim();
    let by_token = (!token.is_empty()).then(|| {
        let digest = Sha256::digest(token.as_bytes());
        let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        tokens.get(&hash)
    });
    match (certificate, by_token) {
        (CertificateSite::Site(site), None) => Ok(site.clone()),
        (CertificateSite::Site(site), Some(Some(owner))) if owner == site => Ok(site.clone()),
        (CertificateSite::Site(site), Some(Some(owner))) => {
            warn!(certificate = %site, token = %owner, "join refused: token of another site");
            Err(Status::permission_denied(format!(
                "the client certificate names site {site:?} but the enrollment token is site \
                 {owner:?}'s; present {site:?}'s token or none"
            )))
        }
        (CertificateSite::Site(site), Some(None)) => {
            warn!(certificate = %site, "join refused: unknown enrollment token with a site's certificate");
            Err(Status::permission_denied(format!(
                "unknown enrollment token: the client certificate names site {site:?}; present \
                 {site:?}'s token or none"
            )))
        }
        (other, Some(Some(owner))) => {
            let bound = certificate_names.iter().find(|(_, site)| *site == owner);
            match (other, bound) {
                (CertificateSite::Unenrolled(_), Some((certificate_name, _))) => {
                    warn!(token = %owner, "join refused: a certificate-bound site's token with another certificate");
                    Err(Status::permission_denied(format!(
                        "site {owner:?} is enrolled with certificate_name {certificate_name:?}: \
                         its token is accepted only with that certificate, and this call came \
                         with {}",
                        other.describe()
                    )))
                }
                _ => Ok(owner.clone()),
            }
        }
        (_, Some(None)) => {
            warn!("join refused: unknown enrollment token");
            Err(Status::unauthenticated("unknown enrollment token"))
        }
        (CertificateSite::Unenrolled(names), None) => {
            warn!(names = %shown_names(names), "join refused: unenrolled certificate and no token");
            Err(Status::unauthenticated(format!(
                "the client certificate {} and no enrollment token was presented: enroll the \
                 site with certificate_name set to one of the certificate's names (its CN or a \
                 DNS name), or present the site's enrollment token",
                if names.is_empty() {
                    "carries no CN or DNS name".to_string()
                } else {
                    format!("({}) names no enrolled site", shown_names(names))
                }
            )))
        }
        (CertificateSite::Absent, None) => Err(Status::unauthenticated(
            "a federated client must present its enrollment token (or, when the coordinator \
             runs mutual TLS, a client certificate naming an enrolled site)",
        )),
    }
}

/// The digest the coordinator keeps for a session: the token's SHA-256, or,
/// for a session bound to a site's certificate, the SHA-256 of the token and
/// the site's name (the token is hex, so the separator cannot occur in it).
pub fn session_digest(token: &str, site: Option<&str>) -> SessionDigest {
    let mut hasher = Sha256::new();
    hasher.update(token.as_bytes());
    if let Some(site) = site {
        hasher.update(b"\0cohort certificate site\0");
        hasher.update(site.as_bytes());
    }
    SessionDigest(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};
    use tonic::Code;

    fn certificate(common_name: Option<&str>, dns: &[&str]) -> Vec<u8> {
        let sans: Vec<String> = dns.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = common_name {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn hash(token: &str) -> String {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn a_certificate_names_a_site_by_cn_or_dns_name_ignoring_case() {
        let enrolled = map(&[("client-01", "a"), ("site-b.example", "b")]);
        let by_cn = certificate(Some("Client-01"), &[]);
        assert_eq!(
            certificate_names(&by_cn).unwrap(),
            vec!["Client-01".to_string()]
        );
        assert_eq!(
            site_of_certificate(&by_cn, &enrolled).unwrap(),
            CertificateSite::Site("a".into())
        );
        let by_dns = certificate(Some("someone"), &["site-b.example"]);
        assert_eq!(
            site_of_certificate(&by_dns, &enrolled).unwrap(),
            CertificateSite::Site("b".into())
        );
        // CN and DNS name naming the same site is one site.
        let both = certificate(Some("client-01"), &["client-01"]);
        assert_eq!(
            site_of_certificate(&both, &enrolled).unwrap(),
            CertificateSite::Site("a".into())
        );
        let stranger = certificate(Some("client-09"), &["client-09"]);
        assert_eq!(
            site_of_certificate(&stranger, &enrolled).unwrap(),
            CertificateSite::Unenrolled(vec!["client-09".into()])
        );
        let two = certificate(Some("client-01"), &["site-b.example"]);
        let refused = site_of_certificate(&two, &enrolled).unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert!(
            refused.message().contains("several enrolled sites"),
            "{refused:?}"
        );
        let garbage = site_of_certificate(b"not der", &enrolled).unwrap_err();
        assert_eq!(garbage.code(), Code::Unauthenticated);
    }

    #[test]
    fn certificate_and_token_must_agree() {
        let (tok_a, tok_c) = (hash("tok-a"), hash("tok-c"));
        let tokens = map(&[(tok_a.as_str(), "a"), (tok_c.as_str(), "c")]);
        let names = map(&[("client-01", "a"), ("client-02", "b")]);
        let site = |s: &str| CertificateSite::Site(s.into());
        let unenrolled = CertificateSite::Unenrolled(vec!["client-09".into()]);
        let admit = |c: &CertificateSite, t: &str| admit_site(&tokens, &names, c, t);
        // By certificate alone, or with the same site's token.
        assert_eq!(admit(&site("b"), "").unwrap(), "b");
        assert_eq!(admit(&site("a"), " tok-a\n").unwrap(), "a");
        // Another site's token, or an unknown one, with a site's certificate.
        let refused = admit(&site("a"), "tok-c").unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert!(refused.message().contains("\"c\"'s"), "{refused:?}");
        assert_eq!(
            admit(&site("a"), "nope").unwrap_err().code(),
            Code::PermissionDenied
        );
        // Tokens as before, without a certificate or with an unenrolled one.
        assert_eq!(admit(&CertificateSite::Absent, "tok-a").unwrap(), "a");
        assert_eq!(admit(&unenrolled, "tok-c").unwrap(), "c");
        // ... except a certificate-bound site's token with another certificate.
        let refused = admit(&unenrolled, "tok-a").unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert!(refused.message().contains("client-01"), "{refused:?}");
        // Nothing that names a site.
        let refused = admit(&unenrolled, "").unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert!(
            refused.message().contains("names no enrolled site"),
            "{refused:?}"
        );
        assert_eq!(
            admit(&CertificateSite::Absent, "").unwrap_err().code(),
            Code::Unauthenticated
        );
        let refused = admit(&CertificateSite::Absent, "nope").unwrap_err();
        assert_eq!(refused.message(), "unknown enrollment token");
    }

    #[test]
    fn a_bound_session_digest_depends_on_the_site() {
        let plain = session_digest("abc", None);
        assert!(plain == SessionDigest(Sha256::digest(b"abc").into()));
        assert!(session_digest("abc", Some("a")) != plain);
        assert!(session_digest("abc", Some("a")) != session_digest("abc", Some("b")));
        assert!(session_digest("abc", Some("a")) == session_digest("abc", Some("a")));
    }
}
