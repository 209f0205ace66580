//! The one typed configuration: defaults ← TOML file ← `LOKA_…` environment ← command-line flags,
//! validated before any port is bound. Here: `Config`, the layering and its errors; `sections`:
//! the section structs with their defaults; `validate`: what types cannot check; `pool_url`: the
//! pool URL parser.

mod pool_url;
mod sections;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use pool_url::PoolUrl;
pub use sections::{
    AggregateConfig, HttpConfig, LogConfig, LogFormat, Mode, PoolConfig, ServerConfig, UpstreamConfig, VardiffSettings,
};

use crate::cli::RunArgs;

/// The commented default configuration. `loka-stratum default-config` prints it, and a test checks
/// that it parses to exactly `Config::default()`.
pub const DEFAULT_TOML: &str = include_str!("../../config/loka-stratum.toml");

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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn from_toml(text: &str) -> Result<Config, ConfigError> {
        layered(Some((text, "test.toml")), Vec::new())
    }

    pub(super) fn pool(url: &str) -> PoolConfig {
        PoolConfig { url: url.into(), user: "acct".into(), password: "secret".into(), ..PoolConfig::default() }
    }

    pub(super) fn valid() -> Config {
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
