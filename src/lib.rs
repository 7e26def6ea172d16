//! edgecache: an edge caching reverse proxy.
//!
//! [`start`] binds every configured listener and serves until [`Node::shutdown`]; `node` wires
//! the modules together. See ARCHITECTURE.md for the module map and the path of a request.

pub mod admin;
pub mod cache;
pub mod cluster;
pub mod compress;
pub mod config;
pub mod demo;
pub mod dryrun;
mod error;
pub mod geo;
pub mod node;
pub mod notify;
pub mod origin;
pub mod proxy;
pub mod server;
pub mod telemetry;
#[cfg(test)]
mod testing;

pub use config::Config;
pub use error::Error;
pub use node::{start, Node};
