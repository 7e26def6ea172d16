//! One HTTP/1.1 connection's bytes from a client, whatever they are, through hyper's parser
//! and edgecache's whole request path: site routing by host, header rules, the cache key,
//! lookup, preconditions, ranges, collapsed misses to an origin and the store. A panic
//! anywhere is a crash (sozu's rule: nothing a client sends may panic the node).
//!
//! The origin is the sample origin of `edgecache demo` on 127.0.0.1, so paths it serves
//! (`/`, `/style.css`, `/hero.jpg`, `/api/time`) are fetched, stored and then hit.

#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edgecache::cache::Store;
use edgecache::proxy::{ConnInfo, Proxy};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Two sites, rules that bypass, force a lifetime and key on a header, a trusted proxy (so
/// forwarding fields are parsed) and PURGE from the documentation network the peer is in.
const CONFIG: &str = r#"
[server]
http = ["127.0.0.1:0"]
trusted_proxies = ["203.0.113.0/24"]
[cache]
memory = "64MiB"
[admin]
listen = "127.0.0.1:0"
purge_allow = ["203.0.113.0/24"]
[[origins]]
name = "sample"
url = "http://ORIGIN"
timeout = "2s"
[[sites]]
hosts = ["fuzz.test", "*.fuzz.test", "127.0.0.1"]
origin = "sample"
[sites.cache]
query = "sort"
query_ignore = ["utm_source"]
key_headers = ["accept-language"]
key_cookies = ["session"]
stale_while_revalidate = "10s"
[[sites.rules]]
prefix = "/api/"
bypass = true
[[sites.rules]]
path = "/*.css"
ttl = "1h"
[[sites]]
hosts = ["other.test"]
origin = "sample"
"#;

struct World {
    runtime: tokio::runtime::Runtime,
    proxy: Arc<Proxy>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime can be built");
        let proxy = runtime.block_on(async {
            let origin =
                edgecache::demo::start_sample_origin(SocketAddr::from(([127, 0, 0, 1], 0)))
                    .await
                    .expect("the sample origin binds 127.0.0.1:0");
            let text = CONFIG.replace("ORIGIN", &origin.to_string());
            let config = edgecache::Config::from_toml(&text, "fuzz.toml", Path::new("."))
                .expect("the fuzzing configuration is valid");
            let config = Arc::new(config);
            let store = Store::new(config.cache.memory);
            edgecache::node::build_runtime(
                config,
                store,
                Arc::new(edgecache::telemetry::metrics::Metrics::default()),
            )
                .expect("the proxy starts")
                .proxy
        });
        World { runtime, proxy }
    })
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let proxy = world.proxy.clone();
    world.runtime.block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let info = ConnInfo::new(SocketAddr::from(([203, 0, 113, 7], 40_000)), false, None);
        let service = hyper::service::service_fn(move |req| proxy.handle(req, info));
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), service);
        // The client sends everything and closes its side; the answers are read to the end.
        let exchange = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut answers = Vec::new();
            let _ = client.read_to_end(&mut answers).await;
        };
        let both = async { tokio::join!(connection, exchange) };
        let _ = tokio::time::timeout(Duration::from_secs(2), both).await;
    });
});
