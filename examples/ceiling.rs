//! The ceiling in the load benchmark: a bare hyper server that answers every file of a
//! directory from memory, with the same runtime shape as edgecache (tokio, `--workers N`) and
//! nothing else: no routing, no cache lookup, no header work beyond three fixed headers. What
//! edgecache achieves against this, side by side on the same core, is how much of hyper's
//! own speed the proxy keeps.
//!
//! ```sh
//! cargo run --release --example ceiling -- 127.0.0.1:18084 path/to/www 1
//! cargo run --release --example ceiling -- 127.0.0.1:18085 path/to/www 1 h2   # HTTP/2, prior knowledge
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

const USAGE: &str = "usage: ceiling ADDR DIR [WORKERS [h2]]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().ok_or(USAGE)?.parse()?;
    let dir = args.next().ok_or(USAGE)?;
    let workers: usize = args.next().map(|w| w.parse()).transpose()?.unwrap_or(1);
    let h2 = args.next().as_deref() == Some("h2");
    let mut files = HashMap::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = format!("/{}", entry.file_name().to_string_lossy());
            files.insert(name, Bytes::from(std::fs::read(entry.path())?));
        }
    }
    let files = Arc::new(files);
    // The same runtime shape as edgecache's (src/main.rs).
    let mut runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers).global_queue_interval(2);
        b
    };
    runtime.enable_all().build()?.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let files = files.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let body = files.get(req.uri().path()).cloned();
                    async move { Ok::<_, Infallible>(answer(body)) }
                });
                if h2 {
                    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    b.timer(TokioTimer::new());
                    let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                }
            });
        }
    })
}

fn answer(body: Option<Bytes>) -> Response<Full<Bytes>> {
    let Some(body) = body else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    };
    let len = body.len();
    let mut r = Response::new(Full::new(body));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    r
}
