#![allow(unreachable_pub, dead_code)]
//! Integration tests: the real proxy on 127.0.0.1 with ephemeral ports, a real test origin,
//! real TLS with certificates generated here.

mod admin;
mod binary;
mod cache;
mod cli;
mod clients;
mod cluster;
mod compression;
mod conformance;
mod demo;
mod deploy;
mod etcd;
mod fleet;
mod hardening;
mod http_cache;
mod isolation;
mod keep_alive;
mod leak_search;
mod limits;
mod logs;
mod notify;
mod origins;
mod reload;
mod routing;
mod send_timeout;
mod sendfile;
mod serving;
mod shield;
mod slices;
mod status;
mod support;
mod tls;
