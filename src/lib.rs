//! Loka Stratum: a Stratum V1 mining proxy.
//!
//! # Layout
//! Modules in data-flow order, miner to pool:
//! - [`server`]: binds the listeners, runs the accept loop, the cleanup task and the drain on shutdown.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers from a trusted load balancer, which carry the
//!   miner's real address.
//! - [`registry`]: the `ConnectionManager`, a DashMap of live sessions that the managers share.
//! - [`connection`]: one task per miner; moves lines between the sockets and the session.
//! - [`codec`]: bounded, cancel-safe line framing.
//! - [`protocol`]: JSON-RPC ids and the typed Stratum messages, parsed once at the edge.
//! - [`session`]: the sans-IO state machine of one miner session (message in, actions out).
//! - [`auth`], [`jobs`], [`submissions`]: the managers (credential rewriting, the job book, share
//!   checks and accounting).
//! - [`share`]: the share hash and targets, byte for byte as cpuminer and ckpool build them.
//! - [`aggregate`]: aggregate mode: many miners on one pool session, with their own extranonce1
//!   [`prefix`]es and [`vardiff`], and failover between pools without disconnecting them.
//! - [`upstream`]: pool URLs, health and backoff, and the link a session talks to its pool through.
//! - [`metrics`]: every metric name, described in one place.
//! - [`hashrate`]: the total hashrate sampled every 10 s over the last hour, for the status page.
//! - [`admin`]: the HTTP port (the status page at `/`, `/metrics`, `/api/v1/*`, `/health`,
//!   `/ready`).
//! - [`config`], [`cli`], [`logging`]: settings and process set-up.
//! - [`systemd`]: `Type=notify` readiness, the stop notice and watchdog pings.
//! - [`tls`]: rustls for `stratum+ssl://` pools and the miners' TLS listener.
#![forbid(unsafe_code)]

pub mod admin;
pub mod aggregate;
pub mod auth;
pub mod cli;
pub mod codec;
pub mod config;
pub mod connection;
pub mod hashrate;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod passthrough;
pub mod pool_session;
pub mod prefix;
pub mod protocol;
pub mod proxy_protocol;
pub mod registry;
pub mod server;
pub mod session;
pub mod share;
pub mod submissions;
pub mod systemd;
pub mod tls;
pub mod upstream;
pub mod vardiff;
