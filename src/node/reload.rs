//! Swapping a configuration in while the node serves ([`Reloader`]).

use super::*;

/// Swaps in a new configuration while the node serves: SIGHUP and `POST /reload` run it.
///
/// What the new file says applies to requests that start after the swap (sites, routes,
/// pools, origins, rules, cache settings, geo, request rates, certificates for new
/// handshakes); requests in flight finish on the proxy they began with. The store, the
/// metrics and fetches in flight are carried over whole; a changed `cache.memory` resizes
/// the store ([`Store::resized`]). An origin with the same name and URL keeps its state
/// (latency, health, ejection, counts), and when none of its settings changed also its
/// client with the pooled connections; a removed origin's connections close as its last
/// requests end. Listeners the file adds are opened (before anything is swapped: one that
/// cannot be bound refuses the reload; HTTPS ones turn TLS on) and those it drops stop
/// accepting. New connections get the new `[server]` limits and timeouts. `[admin]` applies
/// to the next admin request, on a new listener when its address changed. `workers`,
/// `upgrade_socket` and `[log]` are set at start: a change to them is reported and waits for
/// a restart.
pub struct Reloader {
    pub(super) path: Option<std::path::PathBuf>,
    /// Whether the node started with an upgrade socket (listeners are then kept to hand over).
    pub(super) upgrade: bool,
    pub(super) live: Arc<Live>,
    /// The certificates in service; `None` while no configuration had any (no HTTPS).
    pub(super) tls: Mutex<Option<Arc<server::tls::LiveTls>>>,
    pub(super) metrics: Arc<Metrics>,
    /// Stops the health checks of the configuration in service (a reload starts new ones).
    pub(super) health: Mutex<watch::Sender<bool>>,
    /// One reload at a time.
    pub(super) busy: Mutex<()>,
    /// The data listeners, each with what stops its accept loop.
    pub(super) listening: Mutex<Vec<Listening>>,
    /// The admin listener in service, with `[admin]`.
    pub(super) admin: Mutex<Option<AdminRun>>,
    /// The admin listeners' accept loops (a reload may add one), joined at shutdown.
    pub(super) admin_tasks: Mutex<JoinSet<()>>,
    /// What every admin listener's state shares: the start time, and the flag set when the
    /// node begins to shut down (`/readyz` then answers 503).
    pub(super) admin_base: (admin::Started, watch::Receiver<bool>),
    /// This reloader, for the admin state a reload makes (it reloads and reports through it).
    pub(super) me: std::sync::Weak<Reloader>,
    /// Stops the peer listener and the fleet's discovery (`[cluster]`).
    pub(super) peer_stop: watch::Sender<bool>,
    /// The accept loops (a reload adds some), joined at shutdown.
    pub(super) accept: Mutex<JoinSet<()>>,
    /// What a new accept loop shares with the others.
    pub(super) shared: Shared,
    /// The configuration in service, for `/status`.
    pub(super) stamp: Mutex<admin::ConfigStamp>,
}

impl admin::Reload for Reloader {
    fn reload(&self) -> Result<String, String> {
        Reloader::reload(self)
    }
}

impl admin::NodeStatus for Reloader {
    fn config_stamp(&self) -> admin::ConfigStamp {
        self.stamp.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn listeners(&self) -> Vec<(&'static str, SocketAddr)> {
        let open = self.listening.lock().unwrap_or_else(|p| p.into_inner());
        open.iter()
            .map(|l| {
                let kind = match l.kind {
                    upgrade::Kind::Http => "http",
                    upgrade::Kind::Https => "https",
                    upgrade::Kind::Admin => "admin",
                    upgrade::Kind::Peer => "peer",
                };
                (kind, l.bound)
            })
            .collect()
    }
}

impl Reloader {
    /// Reads the configuration file again and swaps it in; on any problem the running
    /// configuration stays and every problem is returned, one `FILE:LINE:COLUMN: key:
    /// message` per line. Counted in `edgecache_config_reloads_total`; logged either way.
    pub fn reload(&self) -> Result<String, String> {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        crate::notify::reloading();
        let result = match &self.path {
            None => Err("no configuration file to read: the node was started without one".into()),
            Some(path) => Config::load(path)
                .map_err(|e| e.to_string())
                .and_then(|config| {
                    // A reloaded file warns as `run` does at start (see `config::validate`).
                    for w in &config.warnings {
                        tracing::warn!(warning = %w, "configuration");
                    }
                    self.apply(config).map_err(|e| e.to_string())
                }),
        };
        self.metrics.config_reload(result.is_ok());
        // Serving again, on the new configuration or the one kept.
        crate::notify::ready();
        match &result {
            Ok(done) => tracing::info!(changes = %done, "configuration reloaded"),
            Err(problems) => {
                for line in problems.lines() {
                    tracing::error!(problem = %line, "configuration reload refused; the running configuration stays");
                }
            }
        }
        result
    }

    /// Swaps in `config` (validated): builds the next proxy beside the running one, then
    /// swaps the proxy and the certificates and moves the health checks over. Says what
    /// changed, and what waits for a restart.
    pub fn apply(&self, config: Config) -> Result<String, Error> {
        let old = self.live.load();
        let config = Arc::new(config);
        let before = old.config();
        // An origin is the same one when its name and URL are: it keeps its state; its
        // client (and pooled connections) only when nothing else about it changed either.
        let same = |i: usize| {
            let o = &config.origins[i];
            before.origins.iter().position(|p| {
                p.name == o.name && p.scheme == o.scheme && p.authority == o.authority
            })
        };
        // Every setting compared through its Debug text (certificates and client keys have
        // no equality of their own).
        let unchanged = |i: usize| {
            same(i).filter(|&j| {
                format!("{:?}", before.origins[j]) == format!("{:?}", config.origins[i])
            })
        };
        let origins = origin_clients_reusing(&config, |i| {
            unchanged(i).and_then(|j| old.origins().get(j).cloned())
        })?;
        let states = old.origin_states().carried(config.origins.len(), same);
        let tls = server::tls::server_config(&config.tls.certificates)?;
        let opened = self.open_listeners(&config)?;
        let admin_change = self.plan_admin(&config)?;
        // Nothing fails from here on: the reload is applied whole.
        let store = match old.store() {
            s if s.capacity() == config.cache.memory => s.clone(),
            s => s.resized(config.cache.memory),
        };
        let proxy =
            Arc::new(old.reconfigured(config.clone(), store, origins, states, locator(&config)));
        let kept = (0..config.origins.len())
            .filter(|&i| same(i).is_some())
            .count();
        let mut done = format!(
            "{} sites, {} origins ({kept} kept with their state), {} certificates",
            config.sites.len(),
            config.origins.len(),
            config.tls.certificates.len()
        );
        if before.cache.memory != config.cache.memory {
            done.push_str(&format!(
                "; cache resized from {} to {} bytes",
                before.cache.memory, config.cache.memory
            ));
        }
        let waiting = restart_only(before, &config);
        if !waiting.is_empty() {
            done.push_str(&format!(
                "; not applied until a restart: {}",
                waiting.join(", ")
            ));
        }
        if let Some(new) = tls {
            let mut live = self.tls.lock().unwrap_or_else(|p| p.into_inner());
            match &*live {
                Some(live) => live.store(new),
                // TLS turned on: HTTPS listeners opened below serve these.
                None => *live = Some(Arc::new(server::tls::LiveTls::new(new))),
            }
        }
        self.live.store(proxy.clone());
        self.apply_connection_settings(before, &config);
        {
            let mut stamp = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            *stamp = admin::ConfigStamp {
                path: config.path.clone(),
                sha256: config.sha256.clone(),
                loaded_at: std::time::SystemTime::now(),
                generation: stamp.generation + 1,
            };
        }
        let (added, removed) = self.swap_listeners(opened, &config);
        if let Some(what) = self.apply_admin(admin_change)? {
            done.push_str("; ");
            done.push_str(what);
        }
        if added + removed > 0 {
            done.push_str(&format!("; listeners: {added} opened, {removed} closed"));
        }
        let (stop, health) = watch::channel(false);
        let previous = std::mem::replace(
            &mut *self.health.lock().unwrap_or_else(|p| p.into_inner()),
            stop,
        );
        let _ = previous.send(true);
        spawn_health_checks(&proxy, &health);
        Ok(done)
    }

    /// New connections get the new `[server]` limits and timeouts; open ones keep the
    /// timeouts they were accepted with and stay counted against the limits.
    pub(super) fn apply_connection_settings(&self, before: &Config, after: &Config) {
        let (a, b) = (&before.server, &after.server);
        if a.max_connections != b.max_connections {
            server::resize_limit(&self.shared.limit, a.max_connections, b.max_connections);
        }
        self.shared
            .per_client
            .set(b.max_connections_per_client, per_client_exempt(after));
        self.shared
            .builders
            .store(Arc::new(Builders::new(&after.server)));
    }

    /// Binds what the new configuration lists and no listener has yet (before anything is
    /// swapped: an address that cannot be bound refuses the reload). HTTPS listeners only
    /// when TLS was on at start.
    pub(super) fn open_listeners(
        &self,
        config: &Config,
    ) -> Result<Vec<(Listening, TcpListener)>, Error> {
        let open = self.listening.lock().unwrap_or_else(|p| p.into_inner());
        let mut wanted: Vec<(upgrade::Kind, SocketAddr)> = config
            .server
            .http
            .iter()
            .map(|&a| (upgrade::Kind::Http, a))
            .collect();
        if !config.tls.certificates.is_empty() {
            wanted.extend(
                config
                    .server
                    .https
                    .iter()
                    .map(|&a| (upgrade::Kind::Https, a)),
            );
        }
        let mut opened = Vec::new();
        for (kind, addr) in wanted {
            if open.iter().any(|l| l.kind == kind && l.configured == addr) {
                continue;
            }
            let l = server::bind(addr).map_err(|source| Error::Bind { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?;
            let (stop, _) = watch::channel(false);
            let listening = Listening {
                kind,
                configured: addr,
                bound,
                stop,
                fd: handover_fd(self.upgrade, &l, bound)?,
            };
            opened.push((listening, l));
        }
        Ok(opened)
    }

    /// Starts accepting on the listeners `open_listeners` bound, and stops the ones the new
    /// configuration no longer lists (their connections go on until they end). Returns how
    /// many were opened and closed.
    pub(super) fn swap_listeners(
        &self,
        opened: Vec<(Listening, TcpListener)>,
        config: &Config,
    ) -> (usize, usize) {
        let mut open = self.listening.lock().unwrap_or_else(|p| p.into_inner());
        let listed = |l: &Listening| match l.kind {
            upgrade::Kind::Http => config.server.http.contains(&l.configured),
            upgrade::Kind::Https => config.server.https.contains(&l.configured),
            upgrade::Kind::Admin | upgrade::Kind::Peer => true,
        };
        let before = open.len();
        open.retain(|l| {
            let keep = listed(l);
            if !keep {
                tracing::info!(addr = %l.bound, "listener closed by the reload");
                let _ = l.stop.send(true);
            }
            keep
        });
        let removed = before - open.len();
        let added = opened.len();
        let mut accept = self.accept.lock().unwrap_or_else(|p| p.into_inner());
        for (listening, l) in opened {
            let tls = match listening.kind {
                upgrade::Kind::Https => self.tls.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                _ => None,
            };
            let stopped = listening.stop.subscribe();
            accept.spawn(server::accept_loop(l, tls, self.shared.clone(), stopped));
            tracing::info!(addr = %listening.bound, "listener opened by the reload");
            open.push(listening);
        }
        (added, removed)
    }

    /// The listeners to hand to a new process, as they are now: each with a duplicate of its
    /// descriptor, and its bound address.
    pub(super) fn handover(&self) -> Vec<(upgrade::Handed, SocketAddr)> {
        let listening = self.listening.lock().unwrap_or_else(|p| p.into_inner());
        let admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        listening
            .iter()
            .chain(admin.iter().map(|a| &a.listening))
            .filter_map(|l| {
                let fd = l.fd.as_ref()?.try_clone().ok()?;
                Some((
                    upgrade::Handed {
                        kind: l.kind,
                        configured: l.configured,
                        fd,
                    },
                    l.bound,
                ))
            })
            .collect()
    }

    /// Stops every accept loop; returns them to be joined.
    pub(super) fn stop_accepting(&self) -> JoinSet<()> {
        for l in self
            .listening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = l.stop.send(true);
        }
        let _ = self.peer_stop.send(true);
        std::mem::take(&mut *self.accept.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Stops the health checks (the node shuts down).
    pub(super) fn stop_health(&self) {
        let _ = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(true);
    }
}

/// The settings a running node cannot change, named when a reload changes them.
pub(super) fn restart_only(before: &Config, after: &Config) -> Vec<&'static str> {
    let (a, b) = (&before.server, &after.server);
    let mut out = Vec::new();
    if a.workers != b.workers {
        out.push("server.workers");
    }
    if a.upgrade_socket != b.upgrade_socket {
        out.push("server.upgrade_socket");
    }
    if let (Some(a), Some(b)) = (&before.admin, &after.admin) {
        if a.listen == b.listen && a.max_connections != b.max_connections {
            out.push("admin.max_connections (on the same address)");
        }
    }
    // Log files are opened once, before the runtime starts; SIGUSR1 reopens those paths.
    if before.log != after.log {
        out.push("[log]");
    }
    // The peer listener, the membership source and this node's id are set up once.
    if before.cluster != after.cluster {
        out.push("[cluster]");
    }
    out
}
