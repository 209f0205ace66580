//! The section structs of the config file, each with its defaults and the typed views other
//! modules read.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::proxy_protocol::Trusted;

/// The miner-facing listener and the limits on each miner connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// Seconds without a line from a miner that has not yet authorized a worker before the
    /// session is evicted. An authorized miner is not evicted for silence: keepalive and the
    /// write path find a dead one.
    pub idle_timeout: u64,
    /// Seconds an authorized miner may go without a share before it is evicted (`no_shares`);
    /// 0 is off. For operators who want it: a slow miner at a high difficulty is silent for hours.
    pub share_timeout: u64,
    /// Seconds a new connection has to send a complete `mining.subscribe`.
    pub handshake_timeout: u64,
    /// Longest line accepted from a miner, in bytes.
    pub max_line_bytes: usize,
    /// Seconds a write to a miner may stall before the miner is dropped.
    pub write_timeout: u64,
    /// Seconds that in-flight submits have to get their replies on shutdown.
    pub shutdown_grace: u64,
    /// Seconds after `mining.subscribe` that a miner has to authorize a worker.
    pub authorize_timeout: u64,
    /// Connections from one IP address at once; 0 turns the limit off (farms sit behind NAT).
    pub max_connections_per_ip: usize,
    /// Bytes waiting to be written to one miner before it is dropped as a slow reader.
    pub max_queue_bytes: usize,
    /// Messages waiting to be written to one miner before it is dropped as a slow reader.
    pub max_queue_messages: usize,
    /// Sustained lines per second read from a miner; past the burst it is not read until it
    /// slows (TCP pushes back), and never closed for it.
    pub rate_limit: u32,
    /// Lines read from a miner at once above the sustained rate.
    pub rate_limit_burst: u32,
    /// Seconds a worker at an address must wait after its first failed authorize; doubles with
    /// each failure of that worker.
    pub auth_backoff_initial: u64,
    /// Cap on the wait after failed authorizes, in seconds; an address as a whole waits at most
    /// `auth::ADDRESS_BACKOFF_MAX`.
    pub auth_backoff_max: u64,
    /// Expect a PROXY protocol (v1 or v2) header on every miner connection, from a load balancer
    /// in `proxy_protocol_trusted`; its source address then stands for the miner.
    pub proxy_protocol: bool,
    /// Address blocks (`10.0.0.0/8`, `::1/128`) allowed to send PROXY headers; connections from
    /// anywhere else are closed while `proxy_protocol` is on.
    pub proxy_protocol_trusted: Vec<String>,
    /// A second miner listener that speaks TLS (`host:port`); empty: none.
    pub tls_listen: String,
    /// The TLS listener's certificate chain, a PEM file.
    pub tls_cert: String,
    /// The TLS listener's private key, a PEM file.
    pub tls_key: String,
}

/// How the proxy talks to pools.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Seconds to wait for a pool's connect and for its Stratum handshake (probe, aggregate session).
    pub connect_timeout: u64,
    /// Longest line accepted from a pool, in bytes.
    pub max_line_bytes: usize,
    /// First retry delay for an unreachable pool, in milliseconds; doubles with jitter.
    pub retry_initial_ms: u64,
    /// Cap on the retry delay, in milliseconds.
    pub retry_max_ms: u64,
    /// Rewrites a miner's `mining.authorize` user, e.g. `"{pool_user}.{worker}"`. Empty: off.
    pub user_template: String,
    /// Seconds without a `mining.notify` before a pool session is judged dead (a blackhole).
    pub job_timeout: u64,
    /// Seconds a forwarded share may wait for the pool's answer before the pool session is
    /// judged hung (a pool stopped with its socket open).
    pub submit_timeout: u64,
    /// Seconds of silence before TCP keepalive probes start on pool and miner sockets.
    pub keepalive: u64,
    /// Honour a pool's `client.reconnect` to another port of the same host.
    pub allow_pool_redirect: bool,
    /// One pool session per miner, or many miners sharing pool sessions.
    pub mode: Mode,
    /// Seconds the first pool must stay healthy before aggregate sessions fail back to it.
    pub failback_after: u64,
    /// Share of an aggregate session's recent forwarded shares the pool may reject before it is
    /// judged unhealthy (0 to 1). Stale and duplicate rejects do not count.
    pub max_reject_rate: f64,
}

/// How miners reach their pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One pool session per miner, relayed line by line.
    Passthrough,
    /// Many miners share one pool session; the proxy owns their extranonce1 and difficulty.
    Aggregate,
}

/// Aggregate mode: how miners share pool sessions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregateConfig {
    /// Bytes of the pool's extranonce2 the proxy keeps for each miner's own prefix.
    pub prefix_bytes: usize,
    /// Miners one pool session serves; past it another session is opened.
    pub miners_per_upstream: usize,
    /// Pool sessions open at once; past them miners are refused.
    pub max_upstreams: usize,
    /// Authorize each miner's worker upstream (through upstream.user_template) and submit its
    /// shares under its own name.
    pub worker_passthrough: bool,
}

/// Aggregate mode: the difficulty the proxy sets for each miner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VardiffSettings {
    pub start_difficulty: f64,
    pub min_difficulty: f64,
    pub max_difficulty: f64,
    pub target_shares_per_minute: f64,
    /// Seconds between retargets.
    pub retarget_secs: f64,
}

impl VardiffSettings {
    pub fn vardiff(&self) -> crate::vardiff::VardiffConfig {
        crate::vardiff::VardiffConfig {
            start_difficulty: self.start_difficulty,
            min_difficulty: self.min_difficulty,
            max_difficulty: self.max_difficulty,
            target_shares_per_minute: self.target_shares_per_minute,
            retarget_secs: self.retarget_secs,
        }
    }
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self { prefix_bytes: 2, miners_per_upstream: 4096, max_upstreams: 16, worker_passthrough: false }
    }
}

impl Default for VardiffSettings {
    fn default() -> Self {
        Self {
            start_difficulty: 1024.0,
            min_difficulty: 0.001,
            max_difficulty: 4_294_967_296.0,
            target_shares_per_minute: 20.0,
            retarget_secs: 30.0,
        }
    }
}

/// The operator's webhook for worker state changes (`crate::notify`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// `http://` or `https://` URL that worker events are POSTed to as JSON; empty: off. Its path
    /// is a secret for most services (Slack, Discord), so logs and `Debug` show only the host.
    pub webhook_url: String,
    /// https only: a PEM file of CA certificates to trust instead of the system's roots.
    pub webhook_ca_file: String,
    /// Seconds one POST may take, from connect to the response's status line.
    pub webhook_timeout: u64,
    /// Seconds events are gathered into one POST, from the first of them.
    pub webhook_coalesce: u64,
    /// Events one POST lists one by one; past it the window goes as one summary.
    pub webhook_max_events: usize,
    /// Seconds at least between the starts of two POSTs (retries aside).
    pub webhook_min_interval: u64,
    /// Further attempts after a POST fails on a connection error, a timeout, 429 or 5xx.
    pub webhook_retries: u32,
    /// First wait before a retry, in milliseconds; doubles with jitter.
    pub webhook_retry_initial_ms: u64,
    /// Cap on the wait before a retry, a `Retry-After` included, in milliseconds.
    pub webhook_retry_max_ms: u64,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            webhook_url: String::new(),
            webhook_ca_file: String::new(),
            webhook_timeout: 10,
            webhook_coalesce: 10,
            webhook_max_events: 20,
            webhook_min_interval: 1,
            webhook_retries: 5,
            webhook_retry_initial_ms: 1_000,
            webhook_retry_max_ms: 60_000,
        }
    }
}

impl fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("webhook_url", &masked_url(&self.webhook_url))
            .field("webhook_ca_file", &self.webhook_ca_file)
            .field("webhook_timeout", &self.webhook_timeout)
            .field("webhook_coalesce", &self.webhook_coalesce)
            .field("webhook_max_events", &self.webhook_max_events)
            .field("webhook_min_interval", &self.webhook_min_interval)
            .field("webhook_retries", &self.webhook_retries)
            .field("webhook_retry_initial_ms", &self.webhook_retry_initial_ms)
            .field("webhook_retry_max_ms", &self.webhook_retry_max_ms)
            .finish()
    }
}

/// A webhook URL with everything after its host replaced by `***`: Slack's and Discord's
/// webhook URLs carry their token in the path.
pub fn masked_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].find(['/', '?', '#']) {
        Some(end) => format!("{}/***", &url[..start + end]),
        None => url.to_owned(),
    }
}

/// The worker inventory: where it is kept and when a worker counts as stale, offline or forgotten.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InventoryConfig {
    /// The directory of `workers.redb`. Empty: the config file's directory with `--config`, else
    /// `loka-data` in the working directory ([`InventoryConfig::resolve_data_dir`]).
    pub data_dir: String,
    /// Seconds an online worker may go without an accepted share (counted from its authorize
    /// while it has none) before it is `stale`.
    pub worker_stale_after: u64,
    /// Seconds a worker whose last session closed stays online, so that a reconnect counts as a
    /// reconnect and not as going offline.
    pub worker_offline_after: u64,
    /// Seconds after which a worker not seen is dropped from the inventory and its store.
    pub worker_forget_after: u64,
    /// What a store that cannot be opened does: `fail` start-up, or `memory`: a warning and an
    /// inventory that is not kept across restarts.
    pub on_store_error: StoreErrorPolicy,
    /// Seconds between the store's commits of changed workers (1 to 5): what a crash may lose.
    pub flush_interval: u64,
    /// Seconds between two points of a worker's hashrate history; the store keeps 24 hours of
    /// them (86400 / history_interval points per worker).
    pub history_interval: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreErrorPolicy {
    Fail,
    Memory,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter directive, e.g. `info` or `loka_stratum=debug`.
    pub level: String,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// `stratum+tcp://host:port`, or `stratum+ssl://host:port` for TLS; host may be a DNS name,
    /// an IPv4 address or a bracketed IPv6 address.
    pub url: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub password: String,
    /// TLS only: a PEM file of CA certificates to trust instead of the system's roots.
    #[serde(default)]
    pub ca_file: String,
    /// TLS only: the hex SHA-256 of the pool's certificate; when set, that certificate is
    /// accepted, and only it, whoever signed it.
    #[serde(default)]
    pub fingerprint: String,
}

impl fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3333)),
            max_connections: 100_000,
            idle_timeout: 600,
            share_timeout: 0,
            handshake_timeout: 15,
            max_line_bytes: 16 * 1024,
            write_timeout: 60,
            shutdown_grace: 10,
            authorize_timeout: 30,
            max_connections_per_ip: 0,
            max_queue_bytes: 1024 * 1024,
            max_queue_messages: 1024,
            rate_limit: 2000,
            rate_limit_burst: 4000,
            auth_backoff_initial: 3,
            auth_backoff_max: 600,
            proxy_protocol: false,
            proxy_protocol_trusted: Vec::new(),
            tls_listen: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: 5,
            max_line_bytes: 64 * 1024,
            retry_initial_ms: 1_000,
            retry_max_ms: 60_000,
            user_template: String::new(),
            job_timeout: 120,
            submit_timeout: 10,
            keepalive: 60,
            allow_pool_redirect: false,
            mode: Mode::Passthrough,
            failback_after: 60,
            max_reject_rate: 0.5,
        }
    }
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            data_dir: String::new(),
            worker_stale_after: 900,
            worker_offline_after: 60,
            worker_forget_after: 30 * 86_400,
            on_store_error: StoreErrorPolicy::Fail,
            flush_interval: 5,
            history_interval: 300,
        }
    }
}

impl InventoryConfig {
    /// Fills an empty `data_dir`: the directory of `config_file` when there is one, else
    /// `loka-data` in the working directory.
    pub fn resolve_data_dir(&mut self, config_file: Option<&std::path::Path>) {
        if !self.data_dir.is_empty() {
            return;
        }
        let dir = match config_file.and_then(std::path::Path::parent) {
            Some(parent) if parent.as_os_str().is_empty() => std::path::PathBuf::from("."),
            Some(parent) => parent.to_owned(),
            None => std::path::PathBuf::from("loka-data"),
        };
        self.data_dir = dir.display().to_string();
    }

    pub fn stale_after(&self) -> Duration {
        Duration::from_secs(self.worker_stale_after)
    }
    pub fn offline_after(&self) -> Duration {
        Duration::from_secs(self.worker_offline_after)
    }
    pub fn forget_after(&self) -> Duration {
        Duration::from_secs(self.worker_forget_after)
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9090)) }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".into() }
    }
}

impl ServerConfig {
    /// The TLS listener's address, if one is configured.
    pub fn tls_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.tls_listen.is_empty() {
            return Ok(None);
        }
        self.tls_listen.parse().map(Some).map_err(|_| {
            ConfigError::invalid(
                "server.tls_listen",
                format!("{:?}", self.tls_listen),
                "expected an address like 0.0.0.0:3334",
            )
        })
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout)
    }
    /// `None` while `share_timeout` is 0 (off).
    pub fn share_timeout(&self) -> Option<Duration> {
        (self.share_timeout > 0).then(|| Duration::from_secs(self.share_timeout))
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace)
    }
    pub fn authorize_timeout(&self) -> Duration {
        Duration::from_secs(self.authorize_timeout)
    }
    /// The parsed `proxy_protocol_trusted`; `validate` has checked every entry.
    pub fn proxy_protocol_trusted(&self) -> Trusted {
        Trusted::parse(&self.proxy_protocol_trusted).unwrap_or_default()
    }
}

impl UpstreamConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout)
    }
    pub fn job_timeout(&self) -> Duration {
        Duration::from_secs(self.job_timeout)
    }
    pub fn submit_timeout(&self) -> Duration {
        Duration::from_secs(self.submit_timeout)
    }
    pub fn failback_after(&self) -> Duration {
        Duration::from_secs(self.failback_after)
    }

    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive)
    }
}
