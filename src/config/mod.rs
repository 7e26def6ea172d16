//! Configuration: the TOML file, its validation, and the validated types the runtime sees.
//!
//! `raw` holds serde types that mirror the file; `validate` turns them into [`Config`], collecting
//! every problem (with file, line and column) before reporting; `summary` is what
//! `edgecache check` prints. Runtime code only ever sees a validated [`Config`], shared as an
//! `Arc` snapshot.

mod print;
mod raw;
mod summary;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderValue;
use ipnet::IpNet;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

/// A validated configuration.
#[derive(Clone)]
pub struct Config {
    /// Where the configuration came from, for messages (`<builtin>` for the demo).
    pub source: String,
    /// The file it was read from ([`Config::load`]): what a reload reads again. `None` for
    /// configuration text given in memory.
    pub path: Option<PathBuf>,
    /// SHA-256 of the file's bytes as read, lowercase hex ([`Config::load`]); `None` for
    /// text given in memory. `GET /status` shows it, so the file in service can be told apart.
    pub sha256: Option<String>,
    pub server: Server,
    pub tls: Tls,
    pub cache: Cache,
    pub origins: Vec<Origin>,
    pub sites: Vec<Site>,
    /// `[admin]`; `None` when the section is absent (no admin listener).
    pub admin: Option<Admin>,
    /// `[[pools]]`, plus one single-origin pool per site that names `origin` directly.
    pub pools: Vec<Pool>,
    /// `[geo]`: where clients are.
    pub geo: Geo,
    /// `[retries]`: the retry budget.
    pub retries: Retries,
    /// `[dns]`: how origin host names are resolved.
    pub dns: Dns,
    /// `[log]`: where the logs go and in which format (applied at start only).
    pub log: crate::telemetry::LogSettings,
    /// What `check` warns about (and `run` logs): valid, but likely not what was meant.
    pub warnings: Vec<Diagnostic>,
    /// `[cluster]`; `None` when absent (a node on its own). Applied at start only.
    pub cluster: Option<Cluster>,
}

/// `[cluster]`: this node's place in a fleet that acts as one cache (see `crate::cluster`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Nodes with the same name form one fleet.
    pub name: String,
    /// This node's id (default: the host name).
    pub node: String,
    /// The peer listener: plain HTTP, where other members fetch the keys this node owns.
    pub listen: SocketAddr,
    /// What peers dial (default: `listen`), from `advertise` or the environment variable
    /// `advertise_env` names (read when the file is); never an unspecified address. Port 0
    /// only when it was left to `listen`'s, and then the bound port is advertised.
    pub advertise: SocketAddr,
    /// How members are found: exactly one of `etcd`, `peers`, `peers_dns`.
    pub discovery: Discovery,
    /// The etcd lease's time to live (default 5 s): how long a dead node stays a member.
    pub lease_ttl: Duration,
    /// A non-owner keeps a copy of an object it fetched from a peer twice within a minute
    /// (default false: each object is held by its owner alone, so the fleet's memory adds
    /// up).
    pub hot_copies: bool,
    /// Time to a peer's response head (default 2 s); past it the peer is ejected for a
    /// while and the node asks the origin itself.
    pub peer_timeout: Duration,
}

/// How a fleet's members are found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// etcd endpoints (`http://host:port`): membership under a lease, purges by watch.
    Etcd(Vec<String>),
    /// A fixed list of peer listener addresses, this node's own among them.
    Peers(Vec<SocketAddr>),
    /// A DNS name whose A/AAAA records are the members, each at `port`.
    PeersDns { name: String, port: u16 },
}

impl Discovery {
    /// The key it was configured by (`/cluster`'s `discovery`).
    pub fn kind(&self) -> &'static str {
        match self {
            Discovery::Etcd(_) => "etcd",
            Discovery::Peers(_) => "peers",
            Discovery::PeersDns { .. } => "peers_dns",
        }
    }
}

/// `[retries]`: an idempotent request whose origin connection failed before any response byte
/// is retried once on another origin, while retries stay within `budget` × requests (over the
/// last ten seconds) plus `min_per_second`.
#[derive(Clone, Debug)]
pub struct Retries {
    /// Retries allowed as a fraction of origin requests (default 0.2; 0 turns retries off
    /// beyond `min_per_second`).
    pub budget: f64,
    /// Retries always allowed per second, so a quiet node still retries (default 10).
    pub min_per_second: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            budget: 0.2,
            min_per_second: 10,
        }
    }
}

/// `[dns]`: origin host names are resolved by edgecache itself and re-resolved as their
/// records' TTL expires.
#[derive(Clone, Debug)]
pub struct Dns {
    /// Name servers to ask; empty means the system's (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    /// Answers are kept at least this long (default 1 s) and at most `max_ttl` (default 5 min),
    /// whatever their TTL says.
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            servers: Vec::new(),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
        }
    }
}

/// Active health checks of one origin (`[health]` defaults, `[origins.health]` overrides).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path (and query) requested with `GET` (default `/`).
    pub path: http::uri::PathAndQuery,
    /// Time between checks (default 5 s).
    pub interval: Duration,
    /// A check without a response head in this time failed (default 2 s).
    pub timeout: Duration,
    /// Statuses that pass (default 200).
    pub expect_status: Vec<u16>,
    /// Consecutive passes that bring a down origin up (default 2).
    pub rise: u32,
    /// Consecutive failures that take an up origin down (default 3).
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: http::uri::PathAndQuery::from_static("/"),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            expect_status: vec![200],
            rise: 2,
            fall: 3,
        }
    }
}

/// A client certificate presented to an `https` origin that asks for one (mTLS).
#[derive(Debug)]
pub struct ClientAuth {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
    /// The files they were read from (for `check --print`).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `[[pools]]`: an ordered group of origins chosen among by latency and health.
#[derive(Clone, Debug)]
pub struct Pool {
    pub name: String,
    /// Indexes into [`Config::origins`].
    pub origins: Vec<usize>,
    /// When the pool's best latency is over this, the next pool of the route is preferred.
    pub spill_latency: Option<Duration>,
}

/// `[geo]`.
#[derive(Clone, Debug, Default)]
pub struct Geo {
    /// A MaxMind-format database, loaded at start (after the CIDR table and the header).
    pub database: Option<Arc<crate::geo::Database>>,
    /// A country-code header set by a trusted hop in front of us (e.g. `CF-IPCountry`).
    pub header: Option<http::HeaderName>,
    /// Peers whose `X-Forwarded-For` and country header are believed (together with
    /// `server.trusted_proxies`).
    pub trusted_proxies: Vec<IpNet>,
    /// CIDR table, checked before the header.
    pub networks: Vec<(IpNet, crate::geo::Code)>,
}

/// `[[sites.routes]]`: which pools serve clients from where.
#[derive(Clone, Debug)]
pub struct Route {
    /// `name`, or the route's place in the file (`sites[0].routes[1]`); shown in the access log.
    pub name: std::sync::Arc<str>,
    /// `None` matches every client (the default route).
    pub matcher: Option<RouteMatch>,
    /// Indexes into [`Config::pools`], in preference order.
    pub pools: Vec<usize>,
}

/// A route's `match`: any listed continent, country or network (matched in `origin::route`).
#[derive(Clone, Debug, Default)]
pub struct RouteMatch {
    pub continents: Vec<crate::geo::Code>,
    pub countries: Vec<crate::geo::Code>,
    pub cidrs: Vec<IpNet>,
}

/// `[admin]`: the loopback listener for metrics, health, origins and purge. It shares the
/// data listeners' timeouts (`server.header_read_timeout`, `server.idle_timeout`) but has its
/// own connection limit.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Default `127.0.0.1:9090`; any other than a loopback address is warned about at start.
    pub listen: SocketAddr,
    /// Bearer token for every endpoint but `/healthz` and `/readyz` (from `token`, or the
    /// environment variable named by `token_env`, which must then be set and not empty; with
    /// neither, `EDGECACHE_ADMIN_TOKEN` if set). `None` refuses those endpoints.
    pub token: Option<String>,
    /// The environment variable the token was read from (`token_env`, or
    /// `EDGECACHE_ADMIN_TOKEN`); `None` for a token written in the file, or none.
    pub token_env: Option<String>,
    /// `/metrics` answers without the token (default false).
    pub public_metrics: bool,
    /// Open admin connections at most; further accepts wait (default 64).
    pub max_connections: usize,
    /// Client networks allowed to send the HTTP `PURGE` method to the data listeners.
    pub purge_allow: Vec<IpNet>,
}

impl Admin {
    /// Whether `authorization` (an `Authorization` field value) carries the admin token in
    /// the `Bearer` scheme; always false without a token. The one check for the admin
    /// listener and the data listeners' `PURGE` method.
    ///
    /// The scheme is matched without regard to case and may be followed by several spaces
    /// (RFC 9110 §11.1, RFC 6750 §2.1). The presented and configured tokens are compared by
    /// their SHA-256 digests, over all 32 bytes without an early exit, so neither the time
    /// taken nor the answer depends on where they differ or on their lengths.
    pub fn authorizes(&self, authorization: Option<&HeaderValue>) -> bool {
        match (
            &self.token,
            authorization.and_then(|v| bearer_token(v.as_bytes())),
        ) {
            (Some(token), Some(presented)) => same_digest(presented, token.as_bytes()),
            _ => false,
        }
    }
}

/// The credentials of an `Authorization` value in the `Bearer` scheme; `None` for another
/// scheme or no credentials.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    let (scheme, rest) = value.split_at_checked(SCHEME.len())?;
    if !scheme.eq_ignore_ascii_case(SCHEME) || rest.first() != Some(&b' ') {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(rest[start..].trim_ascii_end())
}

/// Whether two secrets have the same SHA-256 digest, comparing every byte of the digests.
fn same_digest(a: &[u8], b: &[u8]) -> bool {
    let a = ring::digest::digest(&ring::digest::SHA256, a);
    let b = ring::digest::digest(&ring::digest::SHA256, b);
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// `[server]`: listeners, limits and timeouts.
#[derive(Clone, Debug)]
pub struct Server {
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
    /// Runtime worker threads; `None` means one per core.
    pub workers: Option<usize>,
    /// Time a client has to send a complete request head, from its first byte; a new
    /// connection has it for its TLS handshake (or first bytes) and again for its first head
    /// (default 10 s, as nginx's `client_header_timeout`).
    pub header_read_timeout: Duration,
    /// A connection with no traffic for this long is closed; also the wait for a kept-alive
    /// connection's next request (default 60 s, as nginx's `keepalive_timeout`).
    pub idle_timeout: Duration,
    /// A connection that has bytes to send and sends none for this long is dropped, and so is
    /// a draining one that moves none for this long (default 60 s, as nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// Largest request head accepted; larger gets 431 (default 32 KiB, at least 8 KiB).
    pub max_header_bytes: usize,
    /// Open client connections at most; further accepts wait (default 10,000).
    pub max_connections: usize,
    /// How long in-flight requests may run after SIGTERM (default 30 s).
    pub shutdown_grace: Duration,
    /// HTTP/2 streams per connection (default 128).
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 reset streams tolerated before GOAWAY (rapid-reset defence, default 20).
    pub h2_max_pending_resets: usize,
    /// Peers whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// The one field a trusted proxy names its client in (default `X-Forwarded-For`); the
    /// other is never read. Applies to `geo.trusted_proxies` as well.
    pub client_address_header: crate::geo::AddressHeader,
    /// The name used in `Via` and `Cache-Status` (default `edgecache`).
    pub via_name: String,
    /// Requests one client address may make (after trusted-proxy resolution), over every
    /// site; past it, 429 with `Retry-After`. `None` (the default): no limit.
    pub rate_per_client: Option<Rate>,
    /// Open connections one peer address may hold; more are closed as they are accepted.
    /// Trusted proxies are exempt (they carry many clients). `None` (the default): no cap.
    pub max_connections_per_client: Option<usize>,
    /// A Unix socket on which this node hands its listening sockets to a new edgecache
    /// process started with the same setting (a binary upgrade with no refused connection).
    /// `None` (the default): no handover; a new process must wait for the port.
    pub upgrade_socket: Option<PathBuf>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            http: Vec::new(),
            https: Vec::new(),
            workers: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            max_header_bytes: 32 << 10,
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(30),
            h2_max_concurrent_streams: 128,
            h2_max_pending_resets: 20,
            trusted_proxies: Vec::new(),
            client_address_header: crate::geo::AddressHeader::default(),
            via_name: "edgecache".to_owned(),
            rate_per_client: None,
            max_connections_per_client: None,
            upgrade_socket: None,
        }
    }
}

/// A request rate as written (`"100/s"`, `"2/min"`): `count` per `period`, with bursts of up
/// to `burst` requests (default `count`) after a quiet spell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// At least 1.
    pub count: u32,
    /// One second, minute or hour.
    pub period: Duration,
    /// At least 1.
    pub burst: u32,
}

impl Rate {
    /// The time one request's allowance takes to come back (`period / count`), at least 1 ns.
    pub fn interval(&self) -> Duration {
        (self.period / self.count.max(1)).max(Duration::from_nanos(1))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            3600 => "h",
            60 => "min",
            _ => "s",
        };
        write!(f, "{} requests/{unit} (burst {})", self.count, self.burst)
    }
}

/// `[tls]`: certificates served by SNI.
#[derive(Clone, Default)]
pub struct Tls {
    /// The first certificate is the default for clients without (or with unknown) SNI.
    pub certificates: Vec<Certificate>,
}

/// One certificate chain and its key, with the names it is served for.
#[derive(Clone)]
pub struct Certificate {
    /// Lowercase SNI names: exact (`static.example.com`) or wildcard (`*.example.com`).
    pub hosts: Vec<String>,
    pub key: Arc<CertifiedKey>,
    /// Where it came from, for the summary.
    pub source: String,
    /// The key's file; `None` for a key given in memory (for `check --print`).
    pub key_file: Option<PathBuf>,
}

impl Certificate {
    /// Builds a certificate from PEM text; checks that the key matches the certificate.
    pub fn from_pem(
        hosts: Vec<String>,
        cert_pem: &[u8],
        key_pem: &[u8],
        source: impl Into<String>,
    ) -> Result<Certificate, String> {
        let key = validate::certified_key_from_pem(cert_pem, key_pem)?;
        Ok(Certificate {
            hosts: hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect(),
            key: Arc::new(key),
            source: source.into(),
            key_file: None,
        })
    }
}

/// `[cache]`: the store's bounds.
#[derive(Clone, Debug)]
pub struct Cache {
    /// Bound on stored bytes, bodies and headers (default 256 MiB).
    pub memory: u64,
    /// Larger responses stream through uncached (default 32 MiB).
    pub max_object_size: u64,
    /// Stored bodies of at least this size are kept in sealed memory files and sent to plain
    /// HTTP/1.1 clients with `sendfile` (default 64 KiB); `None` (`sendfile = false`) keeps
    /// every body on the heap. Linux only; elsewhere it has no effect.
    pub sendfile_min_size: Option<u64>,
    /// Bound on body bytes that in-flight fills hold for storing, outside `memory` (default a
    /// quarter of `memory`, at least `max_object_size`). A fill whose bytes would pass it is
    /// not stored: it streams on at its readers' pace, and stops when none is left.
    pub fill_memory: u64,
    /// The targeted field (RFC 9213) this cache alone obeys and removes from responses
    /// (default `Edgecache-Cache-Control`), before `CDN-Cache-Control` and `Cache-Control`.
    pub cache_control_field: http::HeaderName,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            memory: 256 << 20,
            max_object_size: 32 << 20,
            sendfile_min_size: Some(64 << 10),
            fill_memory: 64 << 20,
            cache_control_field: crate::cache::policy::EDGECACHE_CACHE_CONTROL.clone(),
        }
    }
}

/// `[[origins]]`: one upstream server.
#[derive(Clone, Debug)]
pub struct Origin {
    pub name: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// `Host` sent upstream; `None` forwards the client's host.
    pub host_header: Option<HeaderValue>,
    /// Time to establish a connection (default 5 s); past it the client gets 502.
    pub connect_timeout: Duration,
    /// Time from sending the request to the response head (default 30 s); past it, 504.
    pub timeout: Duration,
    /// Extra trust anchors for an `https` origin (PEM file); system roots otherwise.
    pub ca: Vec<CertificateDer<'static>>,
    /// The file `ca` was read from (for `check --print`).
    pub ca_file: Option<PathBuf>,
    /// Idle keep-alive connections kept per origin (default 256).
    pub max_idle_connections: usize,
    /// A label for operators (e.g. `eu`); pools decide routing.
    pub region: Option<String>,
    /// Relative share of traffic among equally fast origins (default 1).
    pub weight: u32,
    /// Active health checks; `None` leaves health to passive detection alone.
    pub health: Option<HealthCheck>,
    /// Connections open to the origin at most (idle ones included); a request that needs one
    /// more waits up to `connect_timeout` for one to free up, then tries the next origin.
    pub max_connections: Option<usize>,
    /// Client certificate for mTLS to an `https` origin.
    pub client_auth: Option<Arc<ClientAuth>>,
    /// Response statuses that count as the origin failing, toward passive ejection (default
    /// 502, 503, 504). Any other answer, a 500 or 501 to an odd method or path included, is
    /// the origin working: one client must not be able to eject an origin for everyone.
    pub fail_on: Vec<u16>,
}

/// `[[sites]]`: host names we serve and where their misses go.
#[derive(Clone, Debug)]
pub struct Site {
    /// Lowercase names: exact, `*.example.com`, or `*` (catch-all).
    pub hosts: Vec<String>,
    /// The first origin of the default route (for summaries).
    pub origin: usize,
    /// `[[sites.routes]]`, first match wins; the last route serves clients no route matches
    /// (see `origin::route`).
    pub routes: Vec<Route>,
    /// `[sites.cache]`: keys and defaults.
    pub cache: SiteCache,
    /// `[[sites.rules]]`: per-path overrides, first match wins.
    pub rules: Vec<Rule>,
    /// Methods served; anything else is answered 405 with `Allow`, here.
    pub methods: Methods,
    /// Refuse paths with `%2F`, `%5C` or `\` (`escaped_slashes = "refuse"`) instead of
    /// passing them on unchanged.
    pub refuse_escaped_slashes: bool,
    /// `[sites.limits] rate`: requests the site answers, from all clients together; past it,
    /// 429 with `Retry-After`. `None` (the default): no limit.
    pub rate: Option<Rate>,
    /// `[sites.compression]`: on by default (see `crate::compress`).
    pub compression: Arc<crate::compress::Compression>,
}

impl Site {
    /// A site with default cache settings and no rules.
    pub fn new(hosts: Vec<String>, origin: usize) -> Site {
        Site {
            hosts,
            origin,
            routes: Vec::new(),
            cache: SiteCache::default(),
            rules: Vec::new(),
            methods: Methods::default_for(false),
            refuse_escaped_slashes: false,
            rate: None,
            compression: Arc::default(),
        }
    }

    /// The first rule matching `path`, by its place in `rules`.
    pub fn rule(&self, path: &str) -> Option<usize> {
        self.rules.iter().position(|r| r.path.matches(path))
    }

    /// The storage settings under `rule` (from [`Site::rule`]): the rule's, else the site's.
    pub fn settings(&self, rule: Option<usize>) -> &crate::cache::policy::Settings {
        match rule.and_then(|i| self.rules.get(i)) {
            Some(r) => &r.settings,
            None => &self.cache.settings,
        }
    }
}

/// The methods a site serves, and the `Allow` value that lists them.
#[derive(Clone, Debug)]
pub struct Methods {
    list: Vec<http::Method>,
    allow: HeaderValue,
}

impl Methods {
    /// GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS; and PURGE where purging is enabled.
    pub fn default_for(purge: bool) -> Methods {
        use http::Method;
        let mut list = vec![
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ];
        if purge {
            list.extend(Method::from_bytes(b"PURGE"));
        }
        Methods::new(list)
    }

    /// A list as configured (validated: no TRACE or CONNECT, no duplicates).
    pub fn new(list: Vec<http::Method>) -> Methods {
        let text: Vec<&str> = list.iter().map(|m| m.as_str()).collect();
        let allow = HeaderValue::from_str(&text.join(", "))
            .unwrap_or_else(|_| HeaderValue::from_static("GET, HEAD"));
        Methods { list, allow }
    }

    /// True when `method` is served.
    pub fn allows(&self, method: &http::Method) -> bool {
        self.list.iter().any(|m| m == method)
    }

    /// The `Allow` field's value.
    pub fn allow(&self) -> &HeaderValue {
        &self.allow
    }

    /// The methods, in the configured order.
    pub fn list(&self) -> &[http::Method] {
        &self.list
    }
}

/// How the query string enters the cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QueryMode {
    /// As received (default).
    #[default]
    Keep,
    /// Parameters sorted, so `?b=1&a=2` and `?a=2&b=1` share an object.
    Sort,
    /// Dropped entirely.
    Ignore,
}

/// What a client's `Cache-Control: no-cache` (or `max-age=0`, `Pragma: no-cache`) does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClientNoCache {
    /// Revalidate the stored response with the origin (default).
    #[default]
    Revalidate,
    /// Serve from cache as if the client had not asked (common on CDNs).
    Ignore,
}

/// `[sites.cache]`.
#[derive(Clone, Debug)]
pub struct SiteCache {
    pub query: QueryMode,
    /// Query parameters removed from the key (e.g. `utm_source`).
    pub query_ignore: Vec<String>,
    /// Request headers added to the key.
    pub key_headers: Vec<http::HeaderName>,
    /// Cookies (by name) added to the key.
    pub key_cookies: Vec<String>,
    pub client_no_cache: ClientNoCache,
    /// Storage defaults: heuristics, grace, keep, `Set-Cookie` opt-in.
    pub settings: crate::cache::policy::Settings,
    /// How long an uncacheable URL skips request collapsing (default 10 s).
    pub hit_for_miss: Duration,
}

impl Default for SiteCache {
    fn default() -> Self {
        SiteCache {
            query: QueryMode::Keep,
            query_ignore: Vec::new(),
            key_headers: Vec::new(),
            key_cookies: Vec::new(),
            client_no_cache: ClientNoCache::Revalidate,
            settings: crate::cache::policy::Settings::default(),
            hit_for_miss: Duration::from_secs(10),
        }
    }
}

/// How a rule matches a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// The path starts with this.
    Prefix(String),
    /// A glob over the whole path: `*` any run of characters (slashes included), `?` one.
    Glob(String),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Glob(g) => glob_match(g.as_bytes(), path.as_bytes()),
        }
    }
}

/// Glob matching with `*` and `?`, iterative with one backtrack point (linear in practice).
/// Written here because the patterns are this small; a regex-backed crate would add more to
/// the build than the feature is worth.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// `[[sites.rules]]`: overrides for matching paths.
#[derive(Clone, Debug)]
pub struct Rule {
    pub path: PathMatch,
    /// Never look up or store: always forward.
    pub bypass: bool,
    /// The site's `[sites.cache]` settings with this rule's `ttl`, `min_ttl`, `max_ttl`,
    /// stale windows and `status_ttl` in place of theirs, resolved at load: a miss under the
    /// rule borrows them.
    pub settings: crate::cache::policy::Settings,
    /// `slice = "4MiB"`: objects under the rule are fetched and stored in slices of this
    /// many bytes (`proxy::slice`); `None`: whole.
    pub slice: Option<u64>,
}

/// A configuration problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", Diagnostics(.0))]
    Invalid(Vec<Diagnostic>),
}

impl Diagnostic {
    /// The diagnostic as a warning: `FILE:LINE:COLUMN: warning: key: what is odd`.
    pub fn as_warning(&self) -> impl fmt::Display + '_ {
        struct Warning<'a>(&'a Diagnostic);
        impl fmt::Display for Warning<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let d = self.0;
                write!(f, "{}:{}:{}: warning: ", d.file, d.line, d.column)?;
                if let Some(key) = &d.key {
                    write!(f, "{key}: ")?;
                }
                f.write_str(&d.message)
            }
        }
        Warning(self)
    }
}

struct Diagnostics<'a>(&'a [Diagnostic]);

impl fmt::Display for Diagnostics<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a configuration file. Relative paths inside it (certificates, CAs)
    /// are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Config::from_toml(&text, &path.display().to_string(), base)?;
        config.path = Some(path.to_owned());
        config.sha256 = Some(sha256_hex(text.as_bytes()));
        Ok(config)
    }

    /// Validates configuration text; `file` names it in messages, `base` resolves relative paths.
    pub fn from_toml(text: &str, file: &str, base: &Path) -> Result<Config, Error> {
        validate::from_toml(text, file, base)
    }
}

/// The SHA-256 of `bytes` in lowercase hex.
fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for (value, expected) in [
            (&b"Bearer abc"[..], Some(&b"abc"[..])),
            (b"bearer abc", Some(b"abc")),
            (b"BEARER abc", Some(b"abc")),
            (b"Bearer   abc  ", Some(b"abc")),
            (b"Bearer", None),
            (b"Bearer ", None),
            (b"Bearerabc", None),
            (b"Basic abc", None),
            (b"Bear abc", None),
            (b"", None),
        ] {
            assert_eq!(bearer_token(value), expected, "{value:?}");
        }
    }

    #[test]
    fn admin_token_is_compared_by_digest() {
        let admin = |token: Option<&str>| Admin {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: token.map(str::to_owned),
            token_env: None,
            public_metrics: false,
            max_connections: 1,
            purge_allow: Vec::new(),
        };
        let with = admin(Some("s3cret"));
        let check = |a: &Admin, value: &str| {
            a.authorizes(Some(&HeaderValue::from_str(value).expect("value")))
        };
        assert!(check(&with, "Bearer s3cret"));
        assert!(check(&with, "bearer s3cret"));
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret!",
            "Bearer S3CRET",
            "Bearer ",
            "Basic s3cret",
        ] {
            assert!(!check(&with, wrong), "{wrong}");
        }
        assert!(!with.authorizes(None));
        assert!(
            !check(&admin(None), "Bearer s3cret"),
            "no token: nothing passes"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"/static/*", b"/static/a/b.css"));
        assert!(glob_match(b"*.css", b"/a/b.css"));
        assert!(!glob_match(b"*.css", b"/a/b.js"));
        assert!(glob_match(b"/img/?.png", b"/img/a.png"));
        assert!(!glob_match(b"/img/?.png", b"/img/ab.png"));
        assert!(glob_match(b"/a*b*c", b"/aXXbYYc"));
        assert!(!glob_match(b"/a*b*c", b"/aXXbYY"));
        assert!(PathMatch::Prefix("/api/".into()).matches("/api/v1"));
    }
}
