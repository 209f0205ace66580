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
    masked_url, AggregateConfig, HttpConfig, InventoryConfig, LogConfig, LogFormat, Mode, NotifyConfig, PoolConfig,
    ServerConfig, StoreErrorPolicy, UpstreamConfig, VardiffSettings,
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
    pub notify: NotifyConfig,
    pub inventory: InventoryConfig,
    /// Ordered by priority: the first reachable pool wins.
    pub pools: Vec<PoolConfig>,
}

/// Why a configuration was rejected. Every message names the key and, where there is one, the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}", path = .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot parse {origin}: {message}")]
    Parse { origin: String, message: String },
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
    let config_file = file;
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
    config.inventory.resolve_data_dir(config_file);
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

/// Defaults ← file (`(text, origin)`) ← environment. The file is deserialized on its own, so that
/// its errors name the file and the line; the `config` crate lays the environment over the result,
/// and an error in the merge names the variable.
fn layered(file: Option<(&str, &str)>, env: Vec<(String, String)>) -> Result<Config, ConfigError> {
    let base = match file {
        Some((text, origin)) => serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let span = e.inner().span();
            let at = match &span {
                Some(s) => format!("{origin} line {}", text[..s.start].matches('\n').count() + 1),
                None => origin.to_owned(),
            };
            let message = e.inner().message().trim().replace('\n', "; ");
            match e.path().iter().next() {
                None => ConfigError::Parse { origin: at, message },
                Some(_) => rejected(e.path().to_string(), span.map_or("?", |s| text[s].trim()), &message, at),
            }
        })?,
        None => Config::default(),
    };
    if let Some((var, value)) = env.iter().find(|(var, _)| env_key(var).split('.').next() == Some("pools")) {
        return Err(ConfigError::invalid(
            var,
            format!("{value:?}"),
            "pools cannot be set from the environment; use --pool or [[pools]]",
        ));
    }
    let from_env =
        |e: config::ConfigError| ConfigError::Parse { origin: "the environment".into(), message: e.to_string() };
    let merged = config::Config::builder()
        .add_source(config::Config::try_from(&base).expect("Config serializes to a config::Value"))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator(ENV_SEPARATOR)
                .try_parsing(true)
                .source(Some(env.iter().cloned().collect())),
        )
        .build()
        .map_err(from_env)?;
    // Read through TOML's types rather than the `config` crate's, which would take "yes" for true
    // and 1.5 for 2: the environment is held to the types the file is.
    let typed: toml::Value = merged.clone().try_deserialize().map_err(from_env)?;
    serde_path_to_error::deserialize(typed).map_err(|e| {
        let key = e.path().to_string();
        // The file's values passed on their own, so the culprit is a variable at or under the key.
        let origin = env
            .iter()
            .find(|(var, _)| format!("{}.", env_key(var)).starts_with(&format!("{key}.")))
            .map_or("the environment".into(), |(var, _)| format!("environment variable {var}"));
        let value = match merged.get::<config::Value>(&key).map(|v| v.kind) {
            Ok(config::ValueKind::String(s)) => format!("{s:?}"),
            Ok(other) => other.to_string(),
            Err(_) => "?".into(),
        };
        rejected(key, &value, e.inner().message(), origin)
    })
}

/// The key a `LOKA_…` variable sets, lower-cased as the `config` crate does: `server.listen`.
fn env_key(var: &str) -> String {
    var.to_lowercase().strip_prefix("loka_").unwrap_or_default().replace(ENV_SEPARATOR, ".")
}

/// What serde said about `key`, whose `value` came from `origin`. Serde says "unknown field";
/// the rest of our messages say key.
fn rejected(key: String, value: &str, reason: &str, origin: String) -> ConfigError {
    if reason.starts_with("unknown field") {
        ConfigError::UnknownKey { key, origin }
    } else {
        ConfigError::invalid(key, value, format!("{reason}; set in {origin}"))
    }
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
        config.pools = args.pool.iter().map(|url| PoolConfig { url: url.clone(), ..PoolConfig::default() }).collect();
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
    /// The effective configuration as TOML, with pool passwords and the webhook's path masked.
    pub fn masked_toml(&self) -> String {
        let mut masked = self.clone();
        masked.notify.webhook_url = masked_url(&masked.notify.webhook_url);
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
        assert!(e.contains("vardiff.max_difficulty: \"big\" (invalid type: string \"big\", expected f64"), "{e}");
    }

    #[test]
    fn layer_errors_name_key_and_value() {
        let cases = [
            ("[server]\nmax_conections = 5\n", "unknown key server.max_conections in test.toml line 2"),
            ("bogus = 1\n", "unknown key bogus in test.toml line 1"),
            (
                "[[pools]]\nurl = \"stratum+tcp://a:1\"\npasword = \"x\"\n",
                "unknown key pools[0].pasword in test.toml line 3",
            ),
            (
                "[server]\nmax_connections = -5\n",
                "invalid value for server.max_connections: -5 (invalid value: integer `-5`, expected usize; \
                 set in test.toml line 2)",
            ),
            (
                "[server]\nidle_timeout = \"soon\"\n",
                "server.idle_timeout: \"soon\" (invalid type: string \"soon\", expected u64; set in test.toml line 2)",
            ),
            (
                "[server]\nlisten = \"notanaddr\"\n",
                "server.listen: \"notanaddr\" (invalid socket address syntax; set in",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format: \"xml\" (unknown variant `xml`, expected `text` or `json`; set"),
            (
                "[server]\nproxy_protocol = \"yes\"\n",
                "server.proxy_protocol: \"yes\" (invalid type: string \"yes\", expected a",
            ),
            (
                "[server]\nproxy_protocol_trusted = \"10.0.0.0/8\"\n",
                "server.proxy_protocol_trusted: \"10.0.0.0/8\" (invalid type: string \"10.0.0.0/8\", \
                 expected a sequence; set in test.toml line 2)",
            ),
            (
                "[server]\nproxy_protocol_trusted = [8]\n",
                "server.proxy_protocol_trusted[0]: 8 (invalid type: integer `8`",
            ),
            ("[server\n", "cannot parse test.toml line 1: invalid table header"),
            (
                "[vardiff]\nmin_difficulty = \"low\"\n",
                "vardiff.min_difficulty: \"low\" (invalid type: string \"low\", expected f64",
            ),
            ("[upstream]\nmode = \"pooled\"\n", "upstream.mode: \"pooled\" (unknown variant `pooled`"),
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
            (
                ("LOKA_SERVER__MAX_CONNECTIONS", "-5"),
                "server.max_connections: -5 (invalid value: integer `-5`, expected usize; \
                 set in environment variable LOKA_SERVER__MAX_CONNECTIONS)",
            ),
            (
                ("LOKA_SERVER__MAX_CONNECTIONS", "many"),
                "server.max_connections: \"many\" (invalid type: string \"many\"",
            ),
            (("LOKA_SERVER__LISTN", "x"), "unknown key server.listn in environment variable LOKA_SERVER__LISTN"),
            (
                ("LOKA_SERVER", "x"),
                "server: \"x\" (invalid type: string \"x\", expected struct ServerConfig; \
                 set in environment variable LOKA_SERVER)",
            ),
            (("LOKA_POOLS__0__URL", "x"), "pools cannot be set from the environment"),
            (("LOKA_HTTP__LISTEN", "nowhere"), "http.listen: \"nowhere\" (invalid socket address syntax; set in"),
            // The `config` crate alone would take these for true and 2.
            (("LOKA_SERVER__PROXY_PROTOCOL", "yes"), "server.proxy_protocol: \"yes\" (invalid type: string"),
            (("LOKA_SERVER__IDLE_TIMEOUT", "1.5"), "server.idle_timeout: 1.5 (invalid type: floating point `1.5`"),
            (("LOKA_SERVER__PROXY_PROTOCOL", "maybe"), "server.proxy_protocol: \"maybe\" (invalid type: string"),
            (
                ("LOKA_SERVER__PROXY_PROTOCOL_TRUSTED", "10.0.0.0/8"),
                "server.proxy_protocol_trusted: \"10.0.0.0/8\" (invalid type: string \"10.0.0.0/8\", \
                 expected a sequence; set in environment variable LOKA_SERVER__PROXY_PROTOCOL_TRUSTED)",
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
            [PoolConfig { url: "stratum+tcp://flag:9".into(), user: "fu".into(), ..PoolConfig::default() }]
        );
        assert_eq!(config.http.listen, "127.0.0.1:9999".parse().unwrap());

        let args = RunArgs { listen: Some("notanaddr".into()), ..RunArgs::default() };
        let message = apply_flags(&mut config, &args).unwrap_err().to_string();
        assert!(message.contains("--listen (server.listen): \"notanaddr\""), "{message}");
    }

    #[test]
    fn masked_toml_hides_passwords() {
        let mut config = valid();
        config.pools.push(PoolConfig { url: "stratum+tcp://b:1".into(), user: "b".into(), ..PoolConfig::default() });
        config.notify.webhook_url = "https://hooks.example.com/services/T0/B0/secret".into();
        let text = config.masked_toml();
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("webhook_url = \"https://hooks.example.com/***\""), "{text}");
        assert!(!format!("{:?}", config.notify).contains("secret"));
        assert!(text.contains("password = \"***\""), "{text}");
        assert!(text.contains("password = \"\""), "{text}");
        let back = from_toml(&text).unwrap();
        assert_eq!(back.pools[0].password, "***");
        assert_eq!(back.server, config.server);
    }
}
