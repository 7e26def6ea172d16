//! The service manager's readiness protocol (systemd's `sd_notify`, `Type=notify`): `READY=1`
//! once the listeners are bound and the configuration loaded, `RELOADING=1` and `READY=1`
//! around a reload, `STOPPING=1` when shutdown begins, and after a binary upgrade the new
//! process says it is the service's main process (`MAINPID=`).
//!
//! Each call sends one datagram to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket) through the `sd-notify` crate, and does nothing when the variable is unset, as
//! outside systemd. A failed send is logged, never fatal: the node serves either way, and a
//! service manager that hears nothing reports the start as timed out.

use sd_notify::NotifyState;

fn send(what: &'static str, states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(state = what, error = %e, "could not notify the service manager");
    }
}

/// The node serves: its listeners are bound and its configuration loaded.
pub fn ready() {
    send("ready", &[NotifyState::Ready]);
}

/// The node serves on listening sockets taken over from the process before it (a binary
/// upgrade): it is now the service's main process. systemd accepts `MAINPID=` from a process
/// other than the main one only with `NotifyAccess=all` (deploy/systemd/edgecache.service).
pub fn ready_as_main_process() {
    send(
        "ready as main process",
        &[NotifyState::MainPid(std::process::id()), NotifyState::Ready],
    );
}

/// A reload begins. `MONOTONIC_USEC` lets systemd 253+ match the `READY=1` that ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("reloading", &[NotifyState::Reloading, now]),
        Err(_) => send("reloading", &[NotifyState::Reloading]),
    }
}

/// Shutdown begins (not after a handover: the new process is the service now).
pub fn stopping() {
    send("stopping", &[NotifyState::Stopping]);
}
