//! The admin listener across reloads: started with the node, its settings swapped in, moved
//! to a new address, opened or closed as the configuration says.

use super::*;

/// The admin listener in service: the listener (its stop ends the accept loop; its
/// descriptor is what an upgrade takes over) and the state its requests see.
pub(super) struct AdminRun {
    pub(super) listening: Listening,
    pub(super) state: Arc<admin::AdminState>,
}

/// What a reload does to the admin listener, decided before anything is swapped (binding a
/// new address can fail and refuse the reload).
pub(super) enum AdminChange {
    /// No `[admin]` before or after.
    None,
    /// Same address: the new settings (token, public metrics, purge networks) swapped in.
    Update(crate::config::Admin),
    /// A new address, or `[admin]` added: this listener replaces the one in service, if any.
    Open(crate::config::Admin, TcpListener, SocketAddr),
    /// `[admin]` removed.
    Close,
}

impl Reloader {
    /// Serves the admin endpoints on `l` (bound at `bound`) with `admin`'s settings, in place
    /// of the admin listener in service if any (which stops accepting; its connections
    /// finish). Warns about a non-loopback address and a missing token.
    pub(super) fn serve_admin(
        &self,
        admin: &crate::config::Admin,
        l: TcpListener,
        bound: SocketAddr,
    ) -> Result<(), Error> {
        if !bound.ip().is_loopback() {
            tracing::warn!(
                addr = %bound,
                "admin listen address is not loopback: the admin endpoints are reachable \
                 from other hosts"
            );
        }
        if admin.token.is_none() {
            tracing::warn!(
                public_metrics = admin.public_metrics,
                "no admin token is configured: admin endpoints other than /healthz, /readyz \
                 and public metrics are refused"
            );
        }
        let fd = handover_fd(self.upgrade, &l, bound)?;
        let me = self.me.upgrade().ok_or(Error::Bind {
            addr: bound,
            source: std::io::Error::other("the node is shutting down"),
        })?;
        let reload: Option<Arc<dyn admin::Reload>> = match self.path {
            Some(_) => Some(me.clone()),
            None => None,
        };
        let (started, draining) = self.admin_base.clone();
        let state = Arc::new(admin::AdminState {
            config: ArcSwap::from_pointee(admin.clone()),
            proxy: self.live.clone(),
            reload,
            metrics: self.metrics.clone(),
            tracker: self.shared.tracker.clone(),
            draining,
            node: me,
            started,
            admin_addr: bound,
        });
        let (stop, stopped) = watch::channel(false);
        let builders = self.shared.builders.load_full();
        self.admin_tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(admin::serve(l, state.clone(), builders, stopped));
        tracing::info!(addr = %bound, "admin listening (metrics, health, status, origins, cache, purge, reload)");
        let run = AdminRun {
            listening: Listening {
                kind: upgrade::Kind::Admin,
                configured: admin.listen,
                bound,
                stop,
                fd,
            },
            state,
        };
        let old = self
            .admin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(run);
        if let Some(old) = old {
            tracing::info!(addr = %old.listening.bound, "admin listener closed by the reload");
            let _ = old.listening.stop.send(true);
        }
        Ok(())
    }

    /// What the reload to `after` does to the admin listener; binds a new address here, so
    /// that one that cannot be bound refuses the reload before anything is swapped.
    pub(super) fn plan_admin(&self, after: &Config) -> Result<AdminChange, Error> {
        let running = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let configured = running.as_ref().map(|a| a.listening.configured);
        Ok(match (&after.admin, configured) {
            (None, None) => AdminChange::None,
            (None, Some(_)) => AdminChange::Close,
            (Some(a), Some(listen)) if listen == a.listen => AdminChange::Update(a.clone()),
            (Some(a), _) => {
                let addr = a.listen;
                let l = server::bind(addr).map_err(|source| Error::Bind { addr, source })?;
                let bound = l
                    .local_addr()
                    .map_err(|source| Error::Bind { addr, source })?;
                AdminChange::Open(a.clone(), l, bound)
            }
        })
    }

    /// Carries out what [`Reloader::plan_admin`] decided; says what it did.
    pub(super) fn apply_admin(&self, change: AdminChange) -> Result<Option<&'static str>, Error> {
        Ok(match change {
            AdminChange::None => None,
            AdminChange::Update(a) => {
                let running = self.admin.lock().unwrap_or_else(|p| p.into_inner());
                let run = running.as_ref();
                let before = run.map(|r| r.state.config.load_full());
                if before.as_deref().map(|b| format!("{b:?}")) == Some(format!("{a:?}")) {
                    return Ok(None);
                }
                if let Some(r) = run {
                    r.state.config.store(Arc::new(a));
                }
                Some("admin settings swapped in")
            }
            AdminChange::Open(a, l, bound) => {
                self.serve_admin(&a, l, bound)?;
                Some("admin listener opened")
            }
            AdminChange::Close => {
                if let Some(old) = self.admin.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    tracing::info!(addr = %old.listening.bound, "admin listener closed by the reload");
                    let _ = old.listening.stop.send(true);
                }
                Some("admin listener closed")
            }
        })
    }

    /// Stops the admin listener (the node has drained); returns its tasks to be joined.
    pub(super) fn stop_admin(&self) -> JoinSet<()> {
        if let Some(run) = self.admin.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = run.listening.stop.send(true);
        }
        std::mem::take(&mut *self.admin_tasks.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
