//! Warnings: a valid file that likely does not do what its writer meant. They never refuse a
//! file; `check` prints them and `run` logs them. Computed only for a file without errors, so
//! the validated lists line up with the raw ones by index.

use rustls::pki_types::ServerName;

use super::Checker;
use crate::config::raw::RawConfig;
use crate::config::{Certificate, Config};

pub(super) fn warnings(ck: &mut Checker<'_>, raw: &RawConfig, config: &Config) {
    certificates(ck, raw, config);
    unused_origins(ck, raw, config);
    if let (Some(admin), Some(raw_admin)) = (&config.admin, &raw.admin) {
        if admin.token.is_none() && !admin.listen.ip().is_loopback() {
            let span = raw_admin.listen.as_ref().map_or(0..0, |l| l.span());
            ck.warn(
                span,
                "admin.listen",
                format!(
                    "{} is not a loopback address and no token is set: /metrics, /origins, \
                     purge and reload are refused to everyone, and /healthz is open to the network",
                    admin.listen
                ),
            );
        }
    }
}

/// Whether the certificate (its subject alternative names, wildcards as TLS clients match
/// them) is valid for `host`, a site's host pattern. A `*.example.com` site is probed with a
/// name under it.
fn covers(cert: &webpki::EndEntityCert<'_>, host: &str) -> bool {
    let name = match host.strip_prefix("*.") {
        Some(rest) => format!("edgecache-probe.{rest}"),
        None => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    };
    ServerName::try_from(name).is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
}

/// A certificate whose names cover none of the sites' hosts (it would only ever be served to
/// clients who then see a name mismatch), and a certificate `hosts` entry the certificate's
/// own names do not cover (SNI picks it; the client refuses it).
fn certificates(ck: &mut Checker<'_>, raw: &RawConfig, config: &Config) {
    let catch_all = config
        .sites
        .iter()
        .any(|s| s.hosts.iter().any(|h| h == "*"));
    for (i, (cert, rc)) in config
        .tls
        .certificates
        .iter()
        .zip(&raw.tls.certificates)
        .enumerate()
    {
        let Some(ee) = end_entity(cert) else {
            continue;
        };
        let ee = match webpki::EndEntityCert::try_from(ee) {
            Ok(ee) => ee,
            Err(_) => continue,
        };
        let key = format!("tls.certificates[{i}]");
        let covers_a_site = config
            .sites
            .iter()
            .any(|s| s.hosts.iter().any(|h| covers(&ee, h)));
        if !covers_a_site && !catch_all {
            ck.warn(
                rc.cert.span(),
                format!("{key}.cert"),
                "its names cover none of the sites' hosts: clients reaching it would see a name mismatch",
            );
        }
        for (h, rh) in cert.hosts.iter().zip(rc.hosts.get_ref()) {
            if !covers(&ee, h) {
                ck.warn(
                    rh.span(),
                    format!("{key}.hosts"),
                    format!("{h:?} is not among the certificate's names: clients would refuse it for that name"),
                );
            }
        }
    }
}

fn end_entity(cert: &Certificate) -> Option<&rustls::pki_types::CertificateDer<'static>> {
    cert.key.cert.first()
}

/// An origin that no site's route reaches (through a pool or `origin =`): never asked for
/// anything, though it may be health-checked.
fn unused_origins(ck: &mut Checker<'_>, raw: &RawConfig, config: &Config) {
    let mut used = vec![false; config.origins.len()];
    for route in config.sites.iter().flat_map(|s| &s.routes) {
        for &p in &route.pools {
            for &o in config.pools.get(p).map_or(&[][..], |p| &p.origins) {
                if let Some(u) = used.get_mut(o) {
                    *u = true;
                }
            }
        }
    }
    for (i, ((o, used), ro)) in config
        .origins
        .iter()
        .zip(used)
        .zip(&raw.origins)
        .enumerate()
    {
        if !used {
            ck.warn(
                ro.name.span(),
                format!("origins[{i}].name"),
                format!("origin {:?} is in no pool or site that a route uses: it is never sent a request", o.name),
            );
        }
    }
}
