//! Active health checks: each origin with `[origins.health]` (or under `[health]`) is sent
//! `GET path` every `interval` over its own connection pool. `fall` failures in a row take it
//! out of rotation, `rise` passes in a row bring it back; every answered check also feeds the
//! origin's latency average, so an origin that has seen no traffic for a while still has a
//! current latency when it is compared with the others.
//!
//! Written here rather than taken from a crate: a check is one request through the origin's
//! own client, and its result is recorded in the origin's `state` (which `select` reads; this
//! module never sees the selector).

use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::state::{CheckResult, Health, OriginStates};
use super::{OriginClient, UpstreamBody};
use crate::config::HealthCheck;

/// Bytes of a check's response body read (and discarded) so the connection can be reused;
/// a larger body is dropped, closing its connection.
const DRAIN_LIMIT: usize = 64 << 10;

/// Runs the checks of origin `index` until `shutdown` turns true.
pub async fn run(
    client: &OriginClient,
    state: &OriginStates,
    index: usize,
    check: &HealthCheck,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.changed() => return,
        }
        let result = tokio::select! {
            r = probe(client, check) => r,
            _ = shutdown.changed() => return,
        };
        let name = &client.config.name;
        match &result {
            CheckResult { passed: true, .. } => {
                tracing::trace!(origin = %name, latency = ?result.latency, "health check passed")
            }
            CheckResult {
                status: Some(s), ..
            } => tracing::debug!(origin = %name, status = s.as_u16(), "health check failed"),
            CheckResult { error, .. } => {
                tracing::debug!(origin = %name, error = error.as_deref().unwrap_or(""), "health check failed")
            }
        }
        match state.check_result(index, result, check.rise, check.fall) {
            Some(Health::Down) => tracing::warn!(
                origin = %name,
                fall = check.fall,
                "origin marked down by its health checks"
            ),
            Some(Health::Up) => tracing::info!(
                origin = %name,
                rise = check.rise,
                "origin back up after passing its health checks"
            ),
            None => {}
        }
    }
}

/// One check: `GET path` with the origin's `Host`, bounded by `timeout` from send to the end
/// of the (drained) body.
async fn probe(client: &OriginClient, check: &HealthCheck) -> CheckResult {
    let started = Instant::now();
    let failed = |error: String| CheckResult {
        at: Instant::now(),
        passed: false,
        status: None,
        latency: started.elapsed(),
        error: Some(error),
    };
    let uri = match Uri::builder()
        .scheme(client.config.scheme.clone())
        .authority(client.config.authority.clone())
        .path_and_query(check.path.clone())
        .build()
    {
        Ok(u) => u,
        Err(e) => return failed(e.to_string()),
    };
    let host = client
        .config
        .host_header
        .clone()
        .or_else(|| HeaderValue::from_str(client.config.authority.as_str()).ok());
    let mut req = Request::new(UpstreamBody::empty());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    if let Some(h) = host {
        req.headers_mut().insert(header::HOST, h);
    }
    req.headers_mut().insert(
        header::USER_AGENT,
        HeaderValue::from_static("edgecache-health-check"),
    );
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        })?;
        let latency = started.elapsed();
        let status = resp.status();
        let mut body = resp.into_body();
        let mut read = 0usize;
        while read <= DRAIN_LIMIT {
            match body.frame().await {
                Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
                Some(Err(e)) => return Err(format!("reading the body: {e}")),
                None => break,
            }
        }
        Ok((status, latency))
    };
    match tokio::time::timeout(check.timeout, exchange).await {
        Err(_) => failed(format!("no answer within {:?}", check.timeout)),
        Ok(Err(e)) => failed(e),
        Ok(Ok((status, latency))) => CheckResult {
            at: Instant::now(),
            passed: check.expect_status.contains(&status.as_u16()),
            status: Some(status),
            latency,
            error: None,
        },
    }
}
