//! Loka Stratum: a Stratum V1 mining proxy.
//!
//! # Layout
//! - [`stratum`]: the Stratum core: [`codec`] (bounded, cancel-safe line framing), [`protocol`]
//!   (JSON-RPC ids and the typed messages, parsed once at the edge) and [`share`] (the share hash
//!   and targets, byte for byte as cpuminer and ckpool build them).
//! - [`miner`]: the miner side: [`session`] (the sans-IO session of one miner connection, whose
//!   policy is the mode), [`jobs`] (its job book), [`submissions`] (share checks and accounting),
//!   [`vardiff`] and [`auth`] (credential rewriting and the auth backoff).
//! - [`pool`]: the pool side: [`upstream`] (pools, health and backoff, the link to a pool),
//!   [`pool_session`] (the sans-IO session of one pool connection), [`handshake`] (the Stratum
//!   handshake that opens aggregate sessions and is the health probe), [`passthrough`] (a miner with
//!   its own pool session) and [`aggregate`] (many miners on one pool session, with their own
//!   extranonce1 [`prefix`]es, and failover without disconnecting them).
//! - [`server`]: the listeners, the accept loop, the cleanup task and the drain; [`registry`] (the
//!   `ConnectionManager`), [`connection`] (one task per miner), [`proxy_protocol`], [`tls`],
//!   [`systemd`], [`admin`] (the HTTP port) and [`hashrate`].
//! - [`notify`]: the operator's webhook for worker state changes, coalesced, rate-limited and
//!   retried.
//! - [`inventory`]: every worker ever authorized, its state, counters and hashrate history, kept
//!   in a redb file across restarts.
//! - [`metrics`]: every metric name, described in one place; [`config`], [`cli`], [`logging`]:
//!   settings and process set-up.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod inventory;
pub mod logging;
pub mod metrics;
pub mod miner;
pub mod notify;
pub mod pool;
pub mod server;
pub mod stratum;

pub use miner::{auth, jobs, session, submissions, vardiff};
pub use pool::{aggregate, handshake, passthrough, prefix, session as pool_session, upstream};
pub use server::{admin, connection, hashrate, proxy_protocol, registry, systemd, tls};
pub use stratum::{codec, protocol, share};
