//! `[tls]`: the certificates served by SNI, each read from its files and checked against its
//! key; and HTTPS listeners, which need at least one.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::{host_pattern, Checker};
use crate::config::raw::{RawCertificate, RawConfig};
use crate::config::{Certificate, Server, Tls};

/// `[[tls.certificates]]`, in order (the first is the default); then `server.https` without
/// any of them is an error at the first HTTPS listener.
pub(super) fn tls(ck: &mut Checker<'_>, raw: &RawConfig, server: &Server, base: &Path) -> Tls {
    let mut tls = Tls::default();
    for (i, c) in raw.tls.certificates.iter().enumerate() {
        if let Some(cert) = certificate(ck, &format!("tls.certificates[{i}]"), c, base) {
            tls.certificates.push(cert);
        }
    }
    if !server.https.is_empty() && raw.tls.certificates.is_empty() {
        let span = raw.server.https.first().map(|s| s.span()).unwrap_or(0..0);
        ck.error(
            span,
            "server.https",
            "HTTPS listeners need at least one [[tls.certificates]]",
        );
    }
    tls
}

/// One certificate: its host names (no catch-all), and its chain and key read from the files
/// named (relative to the configuration) and checked to belong together.
fn certificate(
    ck: &mut Checker<'_>,
    key: &str,
    c: &RawCertificate,
    base: &Path,
) -> Option<Certificate> {
    let mut hosts = Vec::new();
    if c.hosts.get_ref().is_empty() {
        ck.error(
            c.hosts.span(),
            format!("{key}.hosts"),
            "needs at least one host name",
        );
    }
    for h in c.hosts.get_ref() {
        match host_pattern(h.get_ref(), false) {
            Ok(h) => hosts.push(h),
            Err(m) => ck.error(h.span(), format!("{key}.hosts"), m),
        }
    }
    let cert_path = base.join(c.cert.get_ref());
    let key_path = base.join(c.key.get_ref());
    let cert_pem = match std::fs::read(&cert_path) {
        Ok(b) => Some(b),
        Err(e) => {
            ck.error(
                c.cert.span(),
                format!("{key}.cert"),
                format!("cannot read {}: {e}", cert_path.display()),
            );
            None
        }
    };
    let key_pem = match std::fs::read(&key_path) {
        Ok(b) => Some(b),
        Err(e) => {
            ck.error(
                c.key.span(),
                format!("{key}.key"),
                format!("cannot read {}: {e}", key_path.display()),
            );
            None
        }
    };
    match certified_key_from_pem(&cert_pem?, &key_pem?) {
        Ok(certified) => Some(Certificate {
            hosts,
            key: Arc::new(certified),
            source: cert_path.display().to_string(),
            key_file: Some(key_path),
        }),
        Err(m) => {
            ck.error(c.cert.span(), format!("{key}.cert"), m);
            None
        }
    }
}

/// Parses a PEM chain and key and checks that they belong together.
pub(crate) fn certified_key_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("certificate file holds no PEM certificate".to_owned());
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("key file is not valid PEM: {e}"))?
        .ok_or_else(|| "key file holds no PEM private key".to_owned())?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not match the certificate".to_owned()
        }
        other => format!("unusable certificate or key: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{errors, MINIMAL};
    #[test]
    fn missing_certificate_file() {
        let text = format!("[server]\nhttps = [\"127.0.0.1:0\"]\n[[tls.certificates]]\nhosts = [\"a\"]\ncert = \"/nonexistent/a.crt\"\nkey = \"/nonexistent/a.key\"\n{MINIMAL}");
        let e = errors(&text);
        assert!(
            e.iter().any(|e| e.starts_with(
                "t.toml:5:8: tls.certificates[0].cert: cannot read /nonexistent/a.crt"
            )),
            "{e:?}"
        );
    }
}
