//! `TestOrigin`: a real hyper server on 127.0.0.1:0 with routes configured per test, which
//! counts and records the requests it receives.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// How the origin answers one path.
#[derive(Clone)]
pub struct Route {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: RouteBody,
    /// Delay before the response head.
    pub delay: Duration,
    /// Cut a generated body off with an error instead of ending it.
    pub abort: bool,
    /// Fields a 304 carries instead of the route's fields of the same name.
    pub on_304: Vec<(String, String)>,
    /// A 304 also carries `Set-Cookie: seen="<the request's Cookie>"` (a response meant for
    /// that client alone).
    pub cookie_on_304: bool,
    /// A fixed body answers a single `Range: bytes=A-B` with 206 (see [`Route::ranged`]).
    pub ranges: bool,
}

#[derive(Clone)]
pub enum RouteBody {
    Fixed(Bytes),
    /// `chunks` chunks of `chunk` bytes each, with `Content-Length` when `length` is true, and
    /// `pause` between chunks.
    Generated {
        chunk: usize,
        chunks: usize,
        length: bool,
        pause: Duration,
    },
    /// A body that tells what the origin saw: `host`, path and query, and the request's
    /// values of `fields` (`cookie:NAME` is one cookie's value), then `pad` filler bytes (so a
    /// test can pick the size).
    Echo {
        fields: Vec<String>,
        pad: usize,
    },
}

/// The body an echo route answers to a request with this host, path and query and these
/// field values (`None`: absent). Tests build the expected body with it.
pub fn echo_body(host: &str, pq: &str, fields: &[(&str, Option<&str>)], pad: usize) -> Bytes {
    let mut s = format!("host={host}\npq={pq}\n");
    for (name, value) in fields {
        s.push_str(name);
        s.push('=');
        s.push_str(value.unwrap_or("<none>"));
        s.push('\n');
    }
    let mut b = s.into_bytes();
    b.extend(std::iter::repeat_n(b'.', pad));
    Bytes::from(b)
}

impl Route {
    pub fn ok(body: &'static str) -> Route {
        Route {
            status: StatusCode::OK,
            headers: Vec::new(),
            body: RouteBody::Fixed(Bytes::from_static(body.as_bytes())),
            delay: Duration::ZERO,
            abort: false,
            on_304: Vec::new(),
            cookie_on_304: false,
            ranges: false,
        }
    }

    /// Answers a single byte range of a fixed body with 206 and `Content-Range` (416 past
    /// the end), as a file server does; each range answered is recorded
    /// ([`TestOrigin::ranges`]).
    pub fn ranged(mut self) -> Route {
        self.ranges = true;
        self
    }

    /// A route that echoes what it saw (see [`RouteBody::Echo`]).
    pub fn echo(fields: &[&str], pad: usize) -> Route {
        Route {
            body: RouteBody::Echo {
                fields: fields.iter().map(|f| f.to_string()).collect(),
                pad,
            },
            ..Route::ok("")
        }
    }

    /// A field that a 304 sends instead of the route's own field of that name.
    pub fn on_304(mut self, name: &str, value: &str) -> Route {
        self.on_304.push((name.to_owned(), value.to_owned()));
        self
    }

    /// 304s carry `Set-Cookie: seen="<request's Cookie>"`.
    pub fn cookie_on_304(mut self) -> Route {
        self.cookie_on_304 = true;
        self
    }

    /// A fixed body of any bytes.
    pub fn bytes(body: Bytes) -> Route {
        Route {
            body: RouteBody::Fixed(body),
            ..Route::ok("")
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Route {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn status(mut self, s: u16) -> Route {
        self.status = StatusCode::from_u16(s).expect("status");
        self
    }

    pub fn aborting(mut self) -> Route {
        self.abort = true;
        self
    }

    pub fn delay(mut self, d: Duration) -> Route {
        self.delay = d;
        self
    }

    pub fn generated(
        mut self,
        chunk: usize,
        chunks: usize,
        length: bool,
        pause: Duration,
    ) -> Route {
        self.body = RouteBody::Generated {
            chunk,
            chunks,
            length,
            pause,
        };
        self
    }
}

#[derive(Default)]
struct State {
    routes: Mutex<HashMap<String, Route>>,
    counts: Mutex<HashMap<String, usize>>,
    last_headers: Mutex<HashMap<String, HeaderMap>>,
    total: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
    tls_failures: AtomicUsize,
    /// Paths in the order they arrived.
    log: Mutex<Vec<String>>,
    not_modified: AtomicUsize,
    completed: Arc<Mutex<HashMap<String, usize>>>,
    /// Ranges answered with 206: path, first and last byte.
    ranges: Mutex<Vec<(String, u64, u64)>>,
}

/// A running test origin. Requests to unknown paths get 404.
#[derive(Clone)]
pub struct TestOrigin {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl TestOrigin {
    pub async fn start() -> TestOrigin {
        Self::start_on("127.0.0.1:0".parse().expect("addr")).await
    }

    /// Starts on `addr` (to restart a stopped origin on its old port).
    pub async fn start_on(addr: SocketAddr) -> TestOrigin {
        Self::listen(addr, None).await
    }

    /// Starts an HTTPS origin with this TLS configuration (certificate, client verification,
    /// ALPN).
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> TestOrigin {
        Self::listen("127.0.0.1:0".parse().expect("addr"), Some(tls)).await
    }

    async fn listen(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> TestOrigin {
        let listener = TcpListener::bind(addr).await.expect("bind test origin");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let st = state.clone();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut accept_stop = stopped.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = accept_stop.changed() => return,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                let st = st.clone();
                let conn_stop = stopped.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let open = st.open.fetch_add(1, Ordering::SeqCst) + 1;
                    st.max_open.fetch_max(open, Ordering::SeqCst);
                    match acceptor {
                        None => serve(stream, st.clone(), conn_stop).await,
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(tls) => serve(tls, st.clone(), conn_stop).await,
                            Err(_) => {
                                st.tls_failures.fetch_add(1, Ordering::SeqCst);
                            }
                        },
                    }
                    st.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        TestOrigin { addr, state, stop }
    }

    /// Most connections that were open at once.
    pub fn max_open(&self) -> usize {
        self.state.max_open.load(Ordering::SeqCst)
    }

    /// TLS handshakes that failed.
    pub fn tls_failures(&self) -> usize {
        self.state.tls_failures.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every open connection: the origin is down.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub fn route(&self, path: &str, route: Route) -> &Self {
        self.state
            .routes
            .lock()
            .expect("lock")
            .insert(path.to_owned(), route);
        self
    }

    /// Requests received for `path` (path and query).
    pub fn count(&self, path: &str) -> usize {
        self.state
            .counts
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Paths (with query) of every request received, in order.
    pub fn log(&self) -> Vec<String> {
        self.state.log.lock().expect("lock").clone()
    }

    /// Requests received in all.
    pub fn total(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }

    /// 304 answers given (to conditional requests matching a route's `ETag`).
    pub fn not_modified(&self) -> usize {
        self.state.not_modified.load(Ordering::SeqCst)
    }

    /// Generated bodies for `path` sent to the end.
    pub fn completed(&self, path: &str) -> usize {
        self.state
            .completed
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Headers of the last request for `path`.
    pub fn last_headers(&self, path: &str) -> HeaderMap {
        self.state
            .last_headers
            .lock()
            .expect("lock")
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Byte ranges answered with 206 for `path`, in order, as `(first, last)`.
    pub fn ranges(&self, path: &str) -> Vec<(u64, u64)> {
        self.state
            .ranges
            .lock()
            .expect("lock")
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, a, b)| (*a, *b))
            .collect()
    }
}

async fn serve<S>(stream: S, st: Arc<State>, mut stop: tokio::sync::watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let st = st.clone();
        async move { Ok::<_, Infallible>(answer(&st, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        _ = conn => {}
        _ = stop.changed() => {}
    }
}

async fn answer(st: &State, req: Request<Incoming>) -> Response<TestBody> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    st.total.fetch_add(1, Ordering::SeqCst);
    st.log.lock().expect("lock").push(pq.clone());
    *st.counts
        .lock()
        .expect("lock")
        .entry(pq.clone())
        .or_default() += 1;
    st.last_headers
        .lock()
        .expect("lock")
        .insert(pq.clone(), req.headers().clone());
    let route = st
        .routes
        .lock()
        .expect("lock")
        .get(req.uri().path())
        .cloned();
    let Some(route) = route else {
        let mut r = Response::new(TestBody::fixed(Bytes::from_static(b"no such route\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    };
    if !route.delay.is_zero() {
        tokio::time::sleep(route.delay).await;
    }
    // A real origin answers a matching If-None-Match with 304 and the same headers.
    let etag = route
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("etag"))
        .map(|(_, v)| v.clone());
    let inm = req
        .headers()
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let (Some(etag), Some(inm)) = (etag, inm) {
        if inm
            .split(',')
            .any(|t| t.trim().trim_start_matches("W/") == etag.trim_start_matches("W/"))
            && route.status == StatusCode::OK
        {
            st.not_modified.fetch_add(1, Ordering::SeqCst);
            let mut r = Response::new(TestBody::fixed(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            let replaced = |k: &str| route.on_304.iter().any(|(n, _)| n.eq_ignore_ascii_case(k));
            for (k, v) in route
                .headers
                .iter()
                .filter(|(k, _)| !replaced(k))
                .chain(&route.on_304)
            {
                r.headers_mut().append(
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                );
            }
            if route.cookie_on_304 {
                let seen = req
                    .headers()
                    .get("cookie")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("<none>");
                if let Ok(v) = HeaderValue::from_str(&format!("seen=\"{seen}\"")) {
                    r.headers_mut().append(http::header::SET_COOKIE, v);
                }
            }
            return r;
        }
    }
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok())));
    // If-Range that does not name the route's ETag: the whole body (RFC 9110 §13.1.5).
    let if_range_fails = req
        .headers()
        .get("if-range")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            route
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("etag"))
                .is_none_or(|(_, e)| e != v)
        });
    let range = range.filter(|_| !if_range_fails);
    let mut resp = match route.body {
        RouteBody::Fixed(b) if route.ranges && range.is_some() => {
            let (a, b_end) = range.unwrap_or((0, None));
            let len = b.len() as u64;
            if a >= len {
                let mut r = Response::new(TestBody::fixed(Bytes::new()));
                *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                r.headers_mut().insert(
                    "content-range",
                    HeaderValue::from_str(&format!("bytes */{len}")).expect("value"),
                );
                return r;
            }
            let last = b_end.unwrap_or(len - 1).min(len - 1);
            st.ranges
                .lock()
                .expect("lock")
                .push((req.uri().path().to_owned(), a, last));
            let mut r = Response::new(TestBody::fixed(b.slice(a as usize..=last as usize)));
            for (k, v) in &route.headers {
                r.headers_mut().append(
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                );
            }
            r.headers_mut().insert(
                "content-range",
                HeaderValue::from_str(&format!("bytes {a}-{last}/{len}")).expect("value"),
            );
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            return r;
        }
        RouteBody::Fixed(b) => Response::new(TestBody::fixed(b)),
        RouteBody::Echo { fields, pad } => {
            let host = req
                .headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("<none>");
            // Every line of a field, joined as the field's rules say (HTTP/2 may split
            // `Cookie` into several).
            let joined: Vec<Option<String>> = fields
                .iter()
                .map(|f| {
                    if let Some(name) = f.strip_prefix("cookie:") {
                        return cookie(req.headers(), name);
                    }
                    let lines: Vec<&str> = req
                        .headers()
                        .get_all(f.as_str())
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    let sep = if f.eq_ignore_ascii_case("cookie") {
                        "; "
                    } else {
                        ", "
                    };
                    (!lines.is_empty()).then(|| lines.join(sep))
                })
                .collect();
            let values: Vec<(&str, Option<&str>)> = fields
                .iter()
                .zip(&joined)
                .map(|(f, v)| (f.as_str(), v.as_deref()))
                .collect();
            Response::new(TestBody::fixed(echo_body(host, &pq, &values, pad)))
        }
        RouteBody::Generated {
            chunk,
            chunks,
            length,
            pause,
        } => {
            let done = (st.completed.clone(), req.uri().path().to_owned());
            let mut r = Response::new(TestBody::generated(
                chunk,
                chunks,
                pause,
                Some(done),
                route.abort,
            ));
            if length {
                r.headers_mut().insert(
                    http::header::CONTENT_LENGTH,
                    HeaderValue::from((chunk * chunks) as u64),
                );
            }
            r
        }
    };
    *resp.status_mut() = route.status;
    for (k, v) in &route.headers {
        resp.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    resp
}

/// The value of cookie `name` in a request's `Cookie` fields.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

/// Where a generated body reports that it was sent to the end.
type Completion = (Arc<Mutex<HashMap<String, usize>>>, String);

/// A body that is either fixed bytes or generated chunks with optional pauses.
pub struct TestBody {
    fixed: Option<Bytes>,
    chunk: Bytes,
    left: usize,
    pause: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    exact: Option<u64>,
    on_done: Option<Completion>,
    abort: bool,
}

impl TestBody {
    fn fixed(b: Bytes) -> TestBody {
        let len = b.len() as u64;
        TestBody {
            fixed: Some(b),
            chunk: Bytes::new(),
            left: 0,
            pause: Duration::ZERO,
            sleep: None,
            exact: Some(len),
            on_done: None,
            abort: false,
        }
    }

    fn generated(
        chunk: usize,
        chunks: usize,
        pause: Duration,
        on_done: Option<Completion>,
        abort: bool,
    ) -> TestBody {
        let data: Vec<u8> = (0..chunk).map(|i| (i % 251) as u8).collect();
        TestBody {
            fixed: None,
            chunk: Bytes::from(data),
            left: chunks,
            pause,
            sleep: None,
            exact: None,
            on_done,
            abort,
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(b) = self.fixed.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if self.left == 0 {
            if self.abort {
                self.abort = false;
                return Poll::Ready(Some(Err(std::io::Error::other("origin aborted the body"))));
            }
            return Poll::Ready(None);
        }
        if !self.pause.is_zero() {
            let pause = self.pause;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(pause)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        self.left -= 1;
        if self.left == 0 {
            if let Some((map, path)) = self.on_done.take() {
                *map.lock().expect("lock").entry(path).or_default() += 1;
            }
        }
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.fixed.is_none() && self.left == 0 && !self.abort
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) if self.fixed.is_some() => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

use std::future::Future;
