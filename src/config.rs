//! The one typed configuration: defaults ← TOML file ← `LOKA_…` environment ← command-line flags,
//! validated before any port is bound.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cli::RunArgs;
use crate::proxy_protocol::Trusted;

/// The commented default configuration. `loka-stratum default-config` prints it, and a test checks
/// that it parses to exactly `Config::default()`.
pub const DEFAULT_TOML: &str = include_str!("../config/loka-stratum.toml");

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub aggregate: AggregateConfig,
    pub vardiff: VardiffSettings,
    /// Ordered by priority: the first reachable pool wins.
    pub pools: Vec<PoolConfig>,
}

/// The miner-facing listener and the limits on each miner connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// Seconds without a line from the miner before the session is evicted.
    pub idle_timeout: u64,
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
    /// Sustained lines per second a miner may send; past the burst the connection is closed.
    pub rate_limit: u32,
    /// Lines a miner may send at once above the sustained rate.
    pub rate_limit_burst: u32,
    /// Seconds an IP must wait after its first failed authorize; doubles with each failure.
    pub auth_backoff_initial: u64,
    /// Cap on the wait after failed authorizes, in seconds.
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
    /// Seconds to wait for a pool's TCP connect.
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
    /// Seconds of silence before TCP keepalive probes start on pool and miner sockets.
    pub keepalive: u64,
    /// Honour a pool's `client.reconnect` to another port of the same host.
    pub allow_pool_redirect: bool,
    /// One pool session per miner, or many miners sharing pool sessions.
    pub mode: Mode,
    /// Seconds the first pool must stay healthy before aggregate sessions fail back to it.
    pub failback_after: u64,
    /// Share of an aggregate session's recent forwarded shares the pool may reject before it is
    /// judged unhealthy (0 to 1).
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
            handshake_timeout: 15,
            max_line_bytes: 16 * 1024,
            write_timeout: 60,
            shutdown_grace: 10,
            authorize_timeout: 30,
            max_connections_per_ip: 0,
            max_queue_bytes: 1024 * 1024,
            max_queue_messages: 1024,
            rate_limit: 100,
            rate_limit_burst: 500,
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
            keepalive: 60,
            allow_pool_redirect: false,
            mode: Mode::Passthrough,
            failback_after: 60,
            max_reject_rate: 0.5,
        }
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
    pub fn failback_after(&self) -> Duration {
        Duration::from_secs(self.failback_after)
    }

    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive)
    }
}

/// A parsed pool URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUrl {
    /// Host as written, without IPv6 brackets; resolved at connect time.
    pub host: String,
    pub port: u16,
    /// `stratum+ssl://`: the session runs over TLS.
    pub tls: bool,
}

impl PoolUrl {
    /// Parses `stratum+tcp://host:port`. Anything a URL could carry beyond host and port (paths,
    /// user info) is rejected rather than ignored, so a pasted URL never means something else.
    pub fn parse(url: &str) -> Result<PoolUrl, String> {
        let (scheme, rest) = url.split_once("://").ok_or("missing scheme, expected stratum+tcp://host:port")?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "stratum+tcp" => false,
            "stratum+ssl" | "stratum+tls" => true,
            _ => return Err(format!("unsupported scheme {scheme:?}, expected stratum+tcp or stratum+ssl")),
        };
        if rest.contains(['/', '?', '#']) {
            return Err("a pool URL has no path, expected stratum+tcp://host:port".into());
        }
        if rest.contains('@') {
            return Err("user info is not allowed in the URL; set the pool's user and password".into());
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or("unclosed '[' in IPv6 address")?;
            host.parse::<Ipv6Addr>().map_err(|_| format!("{host:?} is not an IPv6 address"))?;
            let port = after.strip_prefix(':').ok_or("missing port, expected [ipv6]:port")?;
            (host, port)
        } else {
            let (host, port) = rest.rsplit_once(':').ok_or("missing port, expected host:port")?;
            if host.contains(':') {
                return Err("IPv6 addresses must be in brackets, e.g. [::1]:3333".into());
            }
            if host.is_empty() {
                return Err("empty host".into());
            }
            let valid = host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
            if !valid {
                return Err(format!("{host:?} is not a valid host name"));
            }
            (host, port)
        };
        let port: u16 = port.parse().map_err(|_| format!("port {port:?} is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err("port 0 is not a valid pool port".into());
        }
        Ok(PoolUrl { host: host.to_owned(), port, tls })
    }
}

impl fmt::Display for PoolUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a configuration was rejected. Every message names the key and, where there is one, the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}", path = .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot parse {path}: {message}", path = .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("unknown key {key} in {origin}")]
    UnknownKey { key: String, origin: String },
    #[error("invalid value for {key}: {value} ({reason})")]
    Invalid { key: String, value: String, reason: String },
    #[error("no pools configured: use --pool URL or a [[pools]] section in the config file")]
    NoPools,
}

impl ConfigError {
    fn invalid(key: impl Into<String>, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        Self::Invalid { key: key.into(), value: value.to_string(), reason: reason.into() }
    }
}

const ENV_PREFIX: &str = "LOKA";
const ENV_SEPARATOR: &str = "__";

/// Loads the configuration: built-in defaults ← `file` ← `LOKA_…` environment ← flags in `args`,
/// then validates it.
pub fn load(file: Option<&Path>, args: &RunArgs) -> Result<Config, ConfigError> {
    let file = file
        .map(|path| {
            std::fs::read_to_string(path)
                .map(|text| (text, path.display().to_string()))
                .map_err(|source| ConfigError::Read { path: path.to_owned(), source })
        })
        .transpose()?;
    let file = file.as_ref().map(|(text, origin)| (text.as_str(), origin.as_str()));
    let mut config = layered(file, loka_env())?;
    apply_flags(&mut config, args)?;
    config.validate()?;
    Ok(config)
}

/// The `LOKA_…` variables, matched case-insensitively as the `config` crate does.
fn loka_env() -> Vec<(String, String)> {
    let prefix = format!("{ENV_PREFIX}_").to_lowercase();
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.to_lowercase().starts_with(&prefix))
        .collect()
}

/// Defaults ← file (`(text, origin)`) ← environment. Each layer is checked against the shape of
/// `Config` first, so that a typo or a negative limit is reported with its key and value rather
/// than as a bare serde message.
fn layered(file: Option<(&str, &str)>, env: Vec<(String, String)>) -> Result<Config, ConfigError> {
    let schema = schema();
    let mut builder = config::Config::builder();
    if let Some((text, origin)) = file {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
            path: origin.into(),
            message: line_of(text, e.span()) + &e.message().trim().replace('\n', "; "),
        })?;
        check_table(&table, &schema, "", origin)?;
        builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
    }
    for (var, value) in &env {
        check_env(var, value, &schema)?;
    }
    let env: config::Map<String, String> = env.into_iter().collect();
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator(ENV_SEPARATOR)
            .try_parsing(true)
            .source(Some(env)),
    );
    let merged = builder.build().map_err(|e| ConfigError::invalid("configuration", "", e.to_string()))?;
    merged.clone().try_deserialize().map_err(|e| describe(e, &merged))
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|s| format!("line {}: ", text[..s.start].matches('\n').count() + 1)).unwrap_or_default()
}

/// The shape every layer must fit: the default config with one example of each list's item.
fn schema() -> toml::Table {
    let sample = Config {
        server: ServerConfig { proxy_protocol_trusted: vec![String::new()], ..ServerConfig::default() },
        pools: vec![PoolConfig {
            url: String::new(),
            user: String::new(),
            password: String::new(),
            ..PoolConfig::default()
        }],
        ..Config::default()
    };
    toml::Table::try_from(sample).expect("Config serializes to a TOML table")
}

fn check_table(table: &toml::Table, schema: &toml::Table, prefix: &str, origin: &str) -> Result<(), ConfigError> {
    for (name, value) in table {
        let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
        let Some(expected) = schema.get(name) else {
            return Err(ConfigError::UnknownKey { key, origin: origin.into() });
        };
        check_value(value, expected, &key, origin)?;
    }
    Ok(())
}

fn check_value(value: &toml::Value, expected: &toml::Value, key: &str, origin: &str) -> Result<(), ConfigError> {
    use toml::Value as V;
    match (expected, value) {
        (V::Table(schema), V::Table(table)) => check_table(table, schema, key, origin),
        (V::Array(schema), V::Array(items)) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_value(item, &schema[0], &format!("{key}[{i}]"), origin)),
        (V::Integer(_), V::Integer(n)) if *n < 0 => {
            Err(ConfigError::invalid(key, n, format!("must not be negative; set in {origin}")))
        }
        (V::Float(_), V::Float(f)) if !f.is_finite() || *f < 0.0 => {
            Err(ConfigError::invalid(key, f, format!("must be a finite number, not negative; set in {origin}")))
        }
        (V::Float(_), V::Integer(n)) if *n < 0 => {
            Err(ConfigError::invalid(key, n, format!("must not be negative; set in {origin}")))
        }
        (V::Integer(_), V::Integer(_))
        | (V::Float(_), V::Float(_) | V::Integer(_))
        | (V::String(_), V::String(_))
        | (V::Boolean(_), V::Boolean(_)) => Ok(()),
        _ => Err(ConfigError::invalid(key, value, format!("expected {}; set in {origin}", kind_name(expected)))),
    }
}

fn kind_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::Integer(_) => "a whole number",
        toml::Value::Float(_) => "a number",
        toml::Value::String(_) => "a string",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
        _ => "another type",
    }
}

/// Checks one `LOKA_…` variable: the key must name a value in `Config`, and numbers must be
/// whole and not negative.
fn check_env(var: &str, value: &str, schema: &toml::Table) -> Result<(), ConfigError> {
    let origin = format!("environment variable {var}");
    // Lower-cased first, as the `config` crate does; the prefix then is exactly `loka_`.
    let key = var.to_lowercase()[ENV_PREFIX.len() + 1..].replace(ENV_SEPARATOR, ".");
    if key.split('.').next() == Some("pools") {
        return Err(ConfigError::invalid(
            var,
            format!("{value:?}"),
            "pools cannot be set from the environment; use --pool or [[pools]]",
        ));
    }
    let mut expected = None;
    let mut table = Some(schema);
    for segment in key.split('.') {
        expected = table.and_then(|t| t.get(segment));
        table = expected.and_then(toml::Value::as_table);
    }
    let typed = match expected {
        Some(toml::Value::Integer(_)) => value.trim().parse::<i64>().map(toml::Value::Integer).map_err(|_| {
            ConfigError::invalid(&key, format!("{value:?}"), format!("expected a whole number; set in {origin}"))
        })?,
        Some(toml::Value::Float(_)) => value.trim().parse::<f64>().map(toml::Value::Float).map_err(|_| {
            ConfigError::invalid(&key, format!("{value:?}"), format!("expected a number; set in {origin}"))
        })?,
        Some(toml::Value::String(_)) => toml::Value::String(value.into()),
        Some(toml::Value::Boolean(_)) => value.trim().parse::<bool>().map(toml::Value::Boolean).map_err(|_| {
            ConfigError::invalid(&key, format!("{value:?}"), format!("expected true or false; set in {origin}"))
        })?,
        Some(toml::Value::Array(_)) => {
            return Err(ConfigError::invalid(
                &key,
                format!("{value:?}"),
                format!("lists cannot be set from the environment; set {key} in the config file"),
            ))
        }
        _ => return Err(ConfigError::UnknownKey { key, origin }),
    };
    check_value(&typed, expected.expect("matched above"), &key, &origin)
}

/// Turns a `config` crate error into one that names the key and its value.
fn describe(error: config::ConfigError, merged: &config::Config) -> ConfigError {
    let (key, reason) = match &error {
        config::ConfigError::At { error, key: Some(key), .. } => (key.clone(), error.to_string()),
        config::ConfigError::Type { key: Some(key), expected, .. } => (key.clone(), format!("expected {expected}")),
        _ => return ConfigError::invalid("configuration", "", error.to_string()),
    };
    let value = match merged.get::<config::Value>(&key) {
        Ok(v) => match v.kind {
            config::ValueKind::String(s) => format!("{s:?}"),
            other => other.to_string(),
        },
        Err(_) => "?".into(),
    };
    ConfigError::Invalid { key, value, reason }
}

fn apply_flags(config: &mut Config, args: &RunArgs) -> Result<(), ConfigError> {
    let addr = |key: &str, value: &str| {
        value
            .parse::<SocketAddr>()
            .map_err(|_| ConfigError::invalid(key, format!("{value:?}"), "expected IP:port, e.g. 0.0.0.0:3333"))
    };
    if let Some(listen) = &args.listen {
        config.server.listen = addr("--listen (server.listen)", listen)?;
    }
    if let Some(listen) = &args.http_listen {
        config.http.listen = addr("--http-listen (http.listen)", listen)?;
    }
    if let Some(format) = args.log_format {
        config.log.format = format;
    }
    if let Some(mode) = args.mode {
        config.upstream.mode = mode;
    }
    if !args.pool.is_empty() {
        config.pools = args
            .pool
            .iter()
            .map(|url| PoolConfig {
                url: url.clone(),
                user: String::new(),
                password: String::new(),
                ..PoolConfig::default()
            })
            .collect();
    }
    for pool in &mut config.pools {
        if let Some(user) = &args.pool_user {
            pool.user = user.clone();
        }
        if let Some(password) = &args.pool_password {
            pool.password = password.clone();
        }
    }
    Ok(())
}

impl Config {
    /// Checks what types alone cannot: at least one pool, parseable URLs, positive limits, a
    /// known user template and a valid log filter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pools.is_empty() {
            return Err(ConfigError::NoPools);
        }
        for (i, pool) in self.pools.iter().enumerate() {
            let url = PoolUrl::parse(&pool.url)
                .map_err(|reason| ConfigError::invalid(format!("pools[{i}].url"), format!("{:?}", pool.url), reason))?;
            let key = if pool.fingerprint.is_empty() { "ca_file" } else { "fingerprint" };
            let value = if pool.fingerprint.is_empty() { &pool.ca_file } else { &pool.fingerprint };
            if !url.tls && !value.is_empty() {
                return Err(ConfigError::invalid(
                    format!("pools[{i}].{key}"),
                    format!("{value:?}"),
                    "needs a stratum+ssl URL",
                ));
            }
            if url.tls {
                crate::tls::client_config(pool).map_err(|reason| {
                    ConfigError::invalid(format!("pools[{i}].{key}"), format!("{value:?}"), reason)
                })?;
                crate::tls::server_name(&url.host).map_err(|reason| {
                    ConfigError::invalid(format!("pools[{i}].url"), format!("{:?}", pool.url), reason)
                })?;
            }
        }
        if let Some(addr) = self.server.tls_addr()? {
            let s = &self.server;
            crate::tls::server_config(Path::new(&s.tls_cert), Path::new(&s.tls_key)).map_err(|reason| {
                ConfigError::invalid("server.tls_cert", format!("{:?}", s.tls_cert), format!("{reason} (for {addr})"))
            })?;
        }
        let (s, u) = (&self.server, &self.upstream);
        let a = &self.aggregate;
        let limits: [(&str, u64); 22] = [
            ("server.max_connections", s.max_connections as u64),
            ("server.idle_timeout", s.idle_timeout),
            ("server.handshake_timeout", s.handshake_timeout),
            ("server.max_line_bytes", s.max_line_bytes as u64),
            ("server.write_timeout", s.write_timeout),
            ("server.shutdown_grace", s.shutdown_grace),
            ("server.authorize_timeout", s.authorize_timeout),
            ("server.max_queue_bytes", s.max_queue_bytes as u64),
            ("server.max_queue_messages", s.max_queue_messages as u64),
            ("server.rate_limit", u64::from(s.rate_limit)),
            ("server.rate_limit_burst", u64::from(s.rate_limit_burst)),
            ("server.auth_backoff_initial", s.auth_backoff_initial),
            ("server.auth_backoff_max", s.auth_backoff_max),
            ("upstream.job_timeout", u.job_timeout),
            ("upstream.keepalive", u.keepalive),
            ("upstream.connect_timeout", u.connect_timeout),
            ("upstream.max_line_bytes", u.max_line_bytes as u64),
            ("upstream.retry_initial_ms", u.retry_initial_ms),
            ("upstream.retry_max_ms", u.retry_max_ms),
            ("upstream.failback_after", u.failback_after),
            ("aggregate.miners_per_upstream", a.miners_per_upstream as u64),
            ("aggregate.max_upstreams", a.max_upstreams as u64),
        ];
        if let Some((key, value)) = limits.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::invalid(*key, value, "must be greater than zero"));
        }
        if s.auth_backoff_max < s.auth_backoff_initial {
            return Err(ConfigError::invalid(
                "server.auth_backoff_max",
                s.auth_backoff_max,
                format!("must be at least server.auth_backoff_initial = {}", s.auth_backoff_initial),
            ));
        }
        if u.retry_max_ms < u.retry_initial_ms {
            return Err(ConfigError::invalid(
                "upstream.retry_max_ms",
                u.retry_max_ms,
                format!("must be at least upstream.retry_initial_ms = {}", u.retry_initial_ms),
            ));
        }
        if let Err((i, reason)) = Trusted::parse(&s.proxy_protocol_trusted) {
            return Err(ConfigError::invalid(
                format!("server.proxy_protocol_trusted[{i}]"),
                format!("{:?}", s.proxy_protocol_trusted[i]),
                reason,
            ));
        }
        if s.proxy_protocol && s.proxy_protocol_trusted.is_empty() {
            return Err(ConfigError::invalid(
                "server.proxy_protocol_trusted",
                "[]",
                "server.proxy_protocol = true needs the load balancers' addresses, e.g. [\"10.0.0.0/8\"]",
            ));
        }
        self.validate_aggregate()?;
        check_template(&u.user_template).map_err(|reason| {
            ConfigError::invalid("upstream.user_template", format!("{:?}", u.user_template), reason)
        })?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::invalid("log.level", format!("{:?}", self.log.level), e.to_string()))?;
        Ok(())
    }

    fn validate_aggregate(&self) -> Result<(), ConfigError> {
        let a = &self.aggregate;
        if !(1..=4).contains(&a.prefix_bytes) {
            return Err(ConfigError::invalid("aggregate.prefix_bytes", a.prefix_bytes, "must be 1 to 4"));
        }
        let space = 1u64 << (8 * a.prefix_bytes);
        if a.miners_per_upstream as u64 > space {
            return Err(ConfigError::invalid(
                "aggregate.miners_per_upstream",
                a.miners_per_upstream,
                format!("must be at most {space}, the prefixes that aggregate.prefix_bytes = {} gives", a.prefix_bytes),
            ));
        }
        let rate = self.upstream.max_reject_rate;
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(ConfigError::invalid("upstream.max_reject_rate", rate, "must be above 0 and at most 1"));
        }
        let v = &self.vardiff;
        for (key, value) in [
            ("vardiff.start_difficulty", v.start_difficulty),
            ("vardiff.min_difficulty", v.min_difficulty),
            ("vardiff.max_difficulty", v.max_difficulty),
            ("vardiff.target_shares_per_minute", v.target_shares_per_minute),
            ("vardiff.retarget_secs", v.retarget_secs),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::invalid(key, value, "must be a number greater than zero"));
            }
        }
        if v.max_difficulty < v.min_difficulty {
            return Err(ConfigError::invalid(
                "vardiff.max_difficulty",
                v.max_difficulty,
                format!("must be at least vardiff.min_difficulty = {}", v.min_difficulty),
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with pool passwords masked.
    pub fn masked_toml(&self) -> String {
        let mut masked = self.clone();
        for pool in &mut masked.pools {
            if !pool.password.is_empty() {
                pool.password = "***".into();
            }
        }
        toml::to_string_pretty(&masked).expect("Config serializes to TOML")
    }
}

/// Accepts only the placeholders the auth manager substitutes, so a typo such as `{wroker}` is
/// caught at start-up instead of reaching the pool verbatim.
fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err("unmatched '}'".into());
        }
        let close = rest[open..].find('}').ok_or("unclosed '{'")? + open;
        let name = &rest[open + 1..close];
        if !matches!(name, "pool_user" | "worker" | "user") {
            return Err(format!("unknown placeholder {{{name}}}; use {{pool_user}}, {{worker}} or {{user}}"));
        }
        rest = &rest[close + 1..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn from_toml(text: &str) -> Result<Config, ConfigError> {
        layered(Some((text, "test.toml")), Vec::new())
    }

    fn pool(url: &str) -> PoolConfig {
        PoolConfig { url: url.into(), user: "acct".into(), password: "secret".into(), ..PoolConfig::default() }
    }

    fn valid() -> Config {
        Config { pools: vec![pool("stratum+tcp://pool.example.com:3333")], ..Config::default() }
    }

    #[test]
    fn default_toml_is_the_default_config() {
        assert_eq!(from_toml(DEFAULT_TOML).unwrap(), Config::default());
        assert_eq!(layered(None, Vec::new()).unwrap(), Config::default());
        // Every key is present in the file, not merely defaulted.
        let mut defaults = toml::Table::try_from(Config::default()).unwrap();
        defaults.remove("pools");
        assert_eq!(DEFAULT_TOML.parse::<toml::Table>().unwrap(), defaults);
    }

    #[test]
    fn pool_urls() {
        let ok = |url: &str, host: &str, port: u16, shown: &str| {
            let parsed = PoolUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(parsed, PoolUrl { host: host.into(), port, tls: url.contains("ssl") }, "{url}");
            assert_eq!(parsed.to_string(), shown);
        };
        ok("stratum+tcp://10.0.0.1:3333", "10.0.0.1", 3333, "10.0.0.1:3333");
        ok("stratum+tcp://[::1]:4444", "::1", 4444, "[::1]:4444");
        ok("stratum+tcp://[2001:db8::7]:1", "2001:db8::7", 1, "[2001:db8::7]:1");
        ok("stratum+tcp://eu.pool-1.example.com:65535", "eu.pool-1.example.com", 65535, "eu.pool-1.example.com:65535");
        ok("STRATUM+TCP://pool:3333", "pool", 3333, "pool:3333");

        let bad = |url: &str, needle: &str| {
            let e = PoolUrl::parse(url).expect_err(url);
            assert!(e.contains(needle), "{url}: {e}");
        };
        ok("stratum+ssl://pool.example:443", "pool.example", 443, "pool.example:443");
        bad("http://pool:80", "unsupported scheme \"http\"");
        bad("pool:3333", "missing scheme");
        bad("stratum+tcp://pool", "missing port");
        bad("stratum+tcp://pool:", "port \"\"");
        bad("stratum+tcp://pool:0", "port 0");
        bad("stratum+tcp://pool:70000", "port \"70000\"");
        bad("stratum+tcp://:3333", "empty host");
        bad("stratum+tcp://pool:3333/path", "no path");
        bad("stratum+tcp://user:pw@pool:3333", "user info");
        bad("stratum+tcp://::1:3333", "in brackets");
        bad("stratum+tcp://[::1]", "missing port");
        bad("stratum+tcp://[nope]:1", "not an IPv6 address");
        bad("stratum+tcp://po ol:1", "not a valid host name");
    }

    type Breaker = fn(&mut Config);

    /// Each case breaks one thing in a valid config; the message must name key and value.
    #[test]
    fn validation_errors_name_key_and_value() {
        let cases: [(Breaker, &str); 26] = [
            (|c| c.aggregate.prefix_bytes = 5, "aggregate.prefix_bytes: 5 (must be 1 to 4)"),
            (
                |c| c.aggregate.miners_per_upstream = 70_000,
                "aggregate.miners_per_upstream: 70000 (must be at most 65536",
            ),
            (|c| c.aggregate.max_upstreams = 0, "aggregate.max_upstreams: 0"),
            (|c| c.upstream.max_reject_rate = 0.0, "upstream.max_reject_rate: 0 (must be above 0"),
            (|c| c.vardiff.min_difficulty = 0.0, "vardiff.min_difficulty: 0 (must be a number greater than zero)"),
            (|c| c.vardiff.target_shares_per_minute = f64::NAN, "vardiff.target_shares_per_minute: NaN"),
            (|c| c.vardiff.max_difficulty = 1e-6, "vardiff.max_difficulty: 0.000001 (must be at least"),
            (|c| c.pools.clear(), "use --pool URL or a [[pools]] section"),
            (|c| c.pools.push(pool("http://x")), "pools[1].url: \"http://x\" (unsupported scheme"),
            (
                |c| c.server.max_connections = 0,
                "invalid value for server.max_connections: 0 (must be greater than zero)",
            ),
            (|c| c.server.idle_timeout = 0, "server.idle_timeout: 0"),
            (|c| c.server.handshake_timeout = 0, "server.handshake_timeout: 0"),
            (|c| c.server.max_line_bytes = 0, "server.max_line_bytes: 0"),
            (|c| c.server.write_timeout = 0, "server.write_timeout: 0"),
            (|c| c.server.shutdown_grace = 0, "server.shutdown_grace: 0"),
            (|c| c.upstream.connect_timeout = 0, "upstream.connect_timeout: 0"),
            (|c| c.upstream.max_line_bytes = 0, "upstream.max_line_bytes: 0"),
            (|c| c.upstream.retry_initial_ms = 0, "upstream.retry_initial_ms: 0"),
            (|c| c.upstream.retry_max_ms = 0, "upstream.retry_max_ms: 0"),
            (
                |c| c.upstream.retry_max_ms = 999,
                "upstream.retry_max_ms: 999 (must be at least upstream.retry_initial_ms = 1000)",
            ),
            (
                |c| c.upstream.user_template = "{pool_user}.{wroker}".into(),
                "upstream.user_template: \"{pool_user}.{wroker}\" (unknown placeholder {wroker}",
            ),
            (|c| c.upstream.user_template = "{user".into(), "upstream.user_template: \"{user\" (unclosed '{')"),
            (|c| c.log.level = "loka=shouty".into(), "log.level: \"loka=shouty\""),
            (
                |c| c.server.proxy_protocol = true,
                "invalid value for server.proxy_protocol_trusted: [] (server.proxy_protocol = true needs",
            ),
            (
                |c| c.server.proxy_protocol_trusted = vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()],
                "server.proxy_protocol_trusted[1]: \"10.0.0.0/33\" (prefix length \"33\"",
            ),
            (
                |c| c.server.proxy_protocol_trusted = vec!["lb.internal".into()],
                "server.proxy_protocol_trusted[0]: \"lb.internal\" (\"lb.internal\" is not an IP address",
            ),
        ];
        for (break_it, expected) in cases {
            let mut config = valid();
            break_it(&mut config);
            let message = config.validate().expect_err(expected).to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
        let mut config = valid();
        config.upstream.user_template = "{pool_user}.{worker}-{user}".into();
        config.validate().unwrap();
        config.server.proxy_protocol = true;
        config.server.proxy_protocol_trusted = vec!["10.0.0.0/8".into(), "127.0.0.1".into(), "::1/128".into()];
        config.validate().unwrap();
        assert!(config.server.proxy_protocol_trusted().contains("10.9.8.7".parse().unwrap()));
    }

    /// Difficulties are fractional, and a whole number is taken for one.
    #[test]
    fn aggregate_settings_from_file_and_environment() {
        let c = from_toml("[upstream]\nmode = \"aggregate\"\n[vardiff]\nstart_difficulty = 2\nmin_difficulty = 1e-9\n")
            .unwrap();
        assert_eq!(c.upstream.mode, Mode::Aggregate);
        assert_eq!((c.vardiff.start_difficulty, c.vardiff.min_difficulty), (2.0, 1e-9));
        let c = layered(None, env(&[("LOKA_VARDIFF__MAX_DIFFICULTY", "0.5"), ("LOKA_UPSTREAM__MODE", "aggregate")]))
            .unwrap();
        assert_eq!((c.vardiff.max_difficulty, c.upstream.mode), (0.5, Mode::Aggregate));
        let e = layered(None, env(&[("LOKA_VARDIFF__MAX_DIFFICULTY", "big")])).unwrap_err().to_string();
        assert!(e.contains("expected a number"), "{e}");
    }

    #[test]
    fn layer_errors_name_key_and_value() {
        let cases = [
            ("[server]\nmax_conections = 5\n", "unknown key server.max_conections in test.toml"),
            ("bogus = 1\n", "unknown key bogus in test.toml"),
            ("[[pools]]\nurl = \"stratum+tcp://a:1\"\npasword = \"x\"\n", "unknown key pools[0].pasword"),
            ("[server]\nmax_connections = -5\n", "invalid value for server.max_connections: -5 (must not be negative"),
            ("[server]\nidle_timeout = \"soon\"\n", "server.idle_timeout: \"soon\" (expected a whole number"),
            ("[server]\nlisten = \"notanaddr\"\n", "server.listen: \"notanaddr\""),
            ("[log]\nformat = \"xml\"\n", "log.format: \"xml\""),
            ("[server]\nproxy_protocol = \"yes\"\n", "server.proxy_protocol: \"yes\" (expected true or false"),
            (
                "[server]\nproxy_protocol_trusted = \"10.0.0.0/8\"\n",
                "server.proxy_protocol_trusted: \"10.0.0.0/8\" (expected an array",
            ),
            ("[server]\nproxy_protocol_trusted = [8]\n", "server.proxy_protocol_trusted[0]: 8 (expected a string"),
            ("[server\n", "cannot parse test.toml"),
            ("[vardiff]\nmin_difficulty = \"low\"\n", "vardiff.min_difficulty: \"low\" (expected a number"),
            ("[vardiff]\nmin_difficulty = -1.5\n", "vardiff.min_difficulty: -1.5 (must be a finite number"),
            ("[upstream]\nmode = \"pooled\"\n", "upstream.mode: \"pooled\""),
        ];
        for (text, expected) in cases {
            let message = from_toml(text).expect_err(text).to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    /// The environment is read through an injected map, so this test never touches process-wide
    /// variables; `tests/cli.rs` covers the real environment.
    #[test]
    fn env_layering() {
        let file = "[server]\nlisten = \"127.0.0.1:1000\"\nmax_connections = 7\n";
        let vars = env(&[
            ("LOKA_SERVER__LISTEN", "127.0.0.1:4000"),
            ("loka_upstream__retry_max_ms", "5000"),
            ("LOKA_LOG__FORMAT", "json"),
        ]);
        let config = layered(Some((file, "f.toml")), vars).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(config.server.max_connections, 7);
        assert_eq!(config.upstream.retry_max_ms, 5000);
        assert_eq!(config.log.format, LogFormat::Json);

        let cases = [
            (("LOKA_SERVER__MAX_CONNECTIONS", "-5"), "server.max_connections: -5 (must not be negative; set in environment variable LOKA_SERVER__MAX_CONNECTIONS)"),
            (("LOKA_SERVER__MAX_CONNECTIONS", "many"), "server.max_connections: \"many\" (expected a whole number"),
            (("LOKA_SERVER__LISTN", "x"), "unknown key server.listn in environment variable LOKA_SERVER__LISTN"),
            (("LOKA_SERVER", "x"), "unknown key server in environment variable LOKA_SERVER"),
            (("LOKA_POOLS__0__URL", "x"), "pools cannot be set from the environment"),
            (("LOKA_HTTP__LISTEN", "nowhere"), "http.listen: \"nowhere\""),
            (("LOKA_SERVER__PROXY_PROTOCOL", "maybe"), "server.proxy_protocol: \"maybe\" (expected true or false"),
            (
                ("LOKA_SERVER__PROXY_PROTOCOL_TRUSTED", "10.0.0.0/8"),
                "server.proxy_protocol_trusted: \"10.0.0.0/8\" (lists cannot be set from the environment",
            ),
        ];
        for ((var, value), expected) in cases {
            let message = layered(None, env(&[(var, value)])).expect_err(var).to_string();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn flags_override_env_override_file() {
        let file = "[server]\nlisten = \"127.0.0.1:1000\"\n[http]\nlisten = \"127.0.0.1:1001\"\n\
                    [[pools]]\nurl = \"stratum+tcp://file:1\"\nuser = \"u\"\npassword = \"p\"\n\
                    [[pools]]\nurl = \"stratum+tcp://file:2\"\n";
        let vars = env(&[("LOKA_SERVER__LISTEN", "127.0.0.1:2000"), ("LOKA_HTTP__LISTEN", "127.0.0.1:2001")]);
        let mut config = layered(Some((file, "f.toml")), vars).unwrap();
        assert_eq!(config.http.listen, "127.0.0.1:2001".parse().unwrap());
        let args = RunArgs {
            listen: Some("[::1]:3000".into()),
            pool_password: Some("flagpw".into()),
            log_format: Some(LogFormat::Json),
            ..RunArgs::default()
        };
        apply_flags(&mut config, &args).unwrap();
        assert_eq!(config.server.listen, "[::1]:3000".parse().unwrap());
        assert_eq!(config.http.listen, "127.0.0.1:2001".parse().unwrap());
        assert_eq!(config.log.format, LogFormat::Json);
        // Without --pool the file's pools stay; --pool-password applies to each.
        assert_eq!(config.pools.len(), 2);
        assert_eq!((config.pools[0].user.as_str(), config.pools[0].password.as_str()), ("u", "flagpw"));
        assert_eq!(config.pools[1].password, "flagpw");

        let args = RunArgs {
            pool: vec!["stratum+tcp://flag:9".into()],
            pool_user: Some("fu".into()),
            http_listen: Some("127.0.0.1:9999".into()),
            ..RunArgs::default()
        };
        apply_flags(&mut config, &args).unwrap();
        assert_eq!(
            config.pools,
            [PoolConfig {
                url: "stratum+tcp://flag:9".into(),
                user: "fu".into(),
                password: String::new(),
                ..PoolConfig::default()
            }]
        );
        assert_eq!(config.http.listen, "127.0.0.1:9999".parse().unwrap());

        let args = RunArgs { listen: Some("notanaddr".into()), ..RunArgs::default() };
        let message = apply_flags(&mut config, &args).unwrap_err().to_string();
        assert!(message.contains("--listen (server.listen): \"notanaddr\""), "{message}");
    }

    #[test]
    fn masked_toml_hides_passwords() {
        let mut config = valid();
        config.pools.push(PoolConfig {
            url: "stratum+tcp://b:1".into(),
            user: "b".into(),
            password: String::new(),
            ..PoolConfig::default()
        });
        let text = config.masked_toml();
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("password = \"***\""), "{text}");
        assert!(text.contains("password = \"\""), "{text}");
        let back = from_toml(&text).unwrap();
        assert_eq!(back.pools[0].password, "***");
        assert_eq!(back.server, config.server);
    }
}
