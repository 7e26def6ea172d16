//! Measures what the store costs in memory: fills edgecache with 1 GiB of 16 KiB objects (65,536
//! URLs) through the real proxy from an in-process origin, then reports resident memory against
//! cached bytes and the overhead per stored object.
//!
//! Run: `cargo run --release --example memory_footprint [objects] [object_kib]`

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let objects: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(65_536);
    let kib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let body = Bytes::from(vec![b'x'; kib << 10]);

    // The origin: every path is a cacheable object of the same size.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        let mut r = http::Response::new(Full::new(body));
                        r.headers_mut().insert(
                            "cache-control",
                            http::HeaderValue::from_static("max-age=3600"),
                        );
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });

    let cached_bytes = (objects * (kib << 10)) as u64;
    let capacity = cached_bytes + cached_bytes / 4 + (64 << 20);
    let text = format!(
        "[server]\nhttp = [\"127.0.0.1:0\"]\n[cache]\nmemory = \"{capacity}\"\nmax_object_size = \"1MiB\"\n\
         [[origins]]\nname = \"o\"\nurl = \"http://{origin}\"\n[[sites]]\nhosts = [\"m.test\"]\norigin = \"o\"\n"
    );
    let config = edgecache::Config::from_toml(&text, "<memory>", Path::new("."))?;
    let node = edgecache::start(config).await?;
    let proxy = node.http_addrs()[0];
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let client = Arc::new(client);

    // Warm up the runtime, pools and allocator before the baseline.
    for i in 0..64 {
        let uri: http::Uri = format!("http://{proxy}/warm/{i}").parse()?;
        let req = http::Request::builder()
            .uri(uri)
            .header("host", "m.test")
            .body(Empty::new())?;
        client.request(req).await?.into_body().collect().await?;
    }
    let baseline = rss_kib();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= objects {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(());
                }
                let uri: http::Uri = format!("http://{proxy}/obj/{i}").parse()?;
                let req = http::Request::builder()
                    .uri(uri)
                    .header("host", "m.test")
                    .body(Empty::new())?;
                client.request(req).await?.into_body().collect().await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    node.store().sync();
    let stored = node.store().entry_count();
    let weighed = node.store().weighted_size();
    let rss = rss_kib();
    let grown = (rss.saturating_sub(baseline)) << 10;
    let body_bytes = (stored * kib as u64) << 10;
    println!("objects stored:        {stored} of {objects} ({kib} KiB each)");
    println!(
        "cached body bytes:     {:.1} MiB",
        body_bytes as f64 / 1048576.0
    );
    println!(
        "store weight:          {:.1} MiB",
        weighed as f64 / 1048576.0
    );
    println!(
        "RSS baseline / after:  {:.1} MiB / {:.1} MiB",
        baseline as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    println!(
        "RSS / cached bytes:    {:.3}",
        (rss << 10) as f64 / body_bytes.max(1) as f64
    );
    println!(
        "overhead per object:   {} bytes beyond its body",
        (grown.saturating_sub(body_bytes)) / stored.max(1)
    );
    println!(
        "target RSS <= 1.15 x cached + 64 MiB = {:.1} MiB: {}",
        (body_bytes as f64 * 1.15 + 64.0 * 1048576.0) / 1048576.0,
        if ((rss << 10) as f64) <= body_bytes as f64 * 1.15 + 64.0 * 1048576.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    node.shutdown().await;
    Ok(())
}
