//! What types alone cannot check: pools, limits, templates, and the files TLS needs.

use std::path::Path;

use super::{masked_url, Config, ConfigError, PoolUrl};
use crate::proxy_protocol::Trusted;

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
        let (a, n) = (&self.aggregate, &self.notify);
        let limits: [(&str, u64); 26] = [
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
            ("upstream.submit_timeout", u.submit_timeout),
            ("upstream.keepalive", u.keepalive),
            ("upstream.connect_timeout", u.connect_timeout),
            ("upstream.max_line_bytes", u.max_line_bytes as u64),
            ("upstream.retry_initial_ms", u.retry_initial_ms),
            ("upstream.retry_max_ms", u.retry_max_ms),
            ("upstream.failback_after", u.failback_after),
            ("aggregate.miners_per_upstream", a.miners_per_upstream as u64),
            ("aggregate.max_upstreams", a.max_upstreams as u64),
            ("notify.webhook_timeout", n.webhook_timeout),
            ("notify.webhook_max_events", n.webhook_max_events as u64),
            ("notify.webhook_retry_initial_ms", n.webhook_retry_initial_ms),
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
        self.validate_notify()?;
        self.validate_inventory()?;
        check_template(&u.user_template).map_err(|reason| {
            ConfigError::invalid("upstream.user_template", format!("{:?}", u.user_template), reason)
        })?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::invalid("log.level", format!("{:?}", self.log.level), e.to_string()))?;
        Ok(())
    }

    fn validate_inventory(&self) -> Result<(), ConfigError> {
        let i = &self.inventory;
        for (key, value) in [
            ("inventory.worker_stale_after", i.worker_stale_after),
            ("inventory.worker_offline_after", i.worker_offline_after),
            ("inventory.worker_forget_after", i.worker_forget_after),
            ("inventory.history_interval", i.history_interval),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, value, "must be greater than zero"));
            }
        }
        if !(1..=5).contains(&i.flush_interval) {
            return Err(ConfigError::invalid("inventory.flush_interval", i.flush_interval, "must be 1 to 5"));
        }
        if i.history_interval > 86_400 {
            return Err(ConfigError::invalid(
                "inventory.history_interval",
                i.history_interval,
                "must be at most 86400",
            ));
        }
        if i.worker_forget_after < i.worker_offline_after {
            return Err(ConfigError::invalid(
                "inventory.worker_forget_after",
                i.worker_forget_after,
                format!("must be at least inventory.worker_offline_after = {}", i.worker_offline_after),
            ));
        }
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
}

impl Config {
    fn validate_notify(&self) -> Result<(), ConfigError> {
        let n = &self.notify;
        if n.webhook_max_events > MAX_WEBHOOK_EVENTS {
            return Err(ConfigError::invalid(
                "notify.webhook_max_events",
                n.webhook_max_events,
                format!("must be at most {MAX_WEBHOOK_EVENTS}: past it, a summary says more"),
            ));
        }
        if n.webhook_retry_max_ms < n.webhook_retry_initial_ms {
            return Err(ConfigError::invalid(
                "notify.webhook_retry_max_ms",
                n.webhook_retry_max_ms,
                format!("must be at least notify.webhook_retry_initial_ms = {}", n.webhook_retry_initial_ms),
            ));
        }
        if !n.webhook_ca_file.is_empty() {
            crate::tls::verifying_client_config(&n.webhook_ca_file).map_err(|reason| {
                ConfigError::invalid("notify.webhook_ca_file", format!("{:?}", n.webhook_ca_file), reason)
            })?;
        }
        crate::notify::Settings::from_config(n).map_err(|reason| {
            ConfigError::invalid("notify.webhook_url", format!("{:?}", masked_url(&n.webhook_url)), reason)
        })?;
        Ok(())
    }
}

/// Events one webhook POST may list; a chat message past it is a wall nobody reads.
const MAX_WEBHOOK_EVENTS: usize = 1000;

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
    use crate::config::tests::{pool, valid};

    type Breaker = fn(&mut Config);

    /// Each case breaks one thing in a valid config; the message must name key and value.
    #[test]
    fn validation_errors_name_key_and_value() {
        let cases: [(Breaker, &str); 41] = [
            (
                |c| c.notify.webhook_url = "ftp://hooks.example.com/T0/secret".into(),
                "notify.webhook_url: \"ftp://hooks.example.com/***\" (expected an http:// or https:// URL)",
            ),
            (
                |c| c.notify.webhook_url = "hooks.example.com".into(),
                "notify.webhook_url: \"hooks.example.com\" (expected",
            ),
            (|c| c.notify.webhook_url = "https://".into(), "notify.webhook_url: \"https://\" (not a URL"),
            (
                |c| {
                    c.notify.webhook_url = "http://hooks.example.com/x".into();
                    c.notify.webhook_ca_file = "/etc/hostname".into();
                },
                "notify.webhook_ca_file: \"/etc/hostname\" (/etc/hostname: no certificate in the file)",
            ),
            (
                |c| c.notify.webhook_ca_file = "/nonexistent/ca.pem".into(),
                "notify.webhook_ca_file: \"/nonexistent/ca.pem\" (/nonexistent/ca.pem:",
            ),
            (|c| c.notify.webhook_timeout = 0, "notify.webhook_timeout: 0 (must be greater than zero)"),
            (|c| c.notify.webhook_max_events = 0, "notify.webhook_max_events: 0 (must be greater than zero)"),
            (|c| c.notify.webhook_max_events = 5000, "notify.webhook_max_events: 5000 (must be at most 1000"),
            (
                |c| c.notify.webhook_retry_max_ms = 10,
                "notify.webhook_retry_max_ms: 10 (must be at least notify.webhook_retry_initial_ms = 1000)",
            ),
            (|c| c.inventory.worker_stale_after = 0, "inventory.worker_stale_after: 0 (must be greater than zero)"),
            (|c| c.inventory.worker_offline_after = 0, "inventory.worker_offline_after: 0"),
            (|c| c.inventory.flush_interval = 6, "inventory.flush_interval: 6 (must be 1 to 5)"),
            (|c| c.inventory.history_interval = 90_000, "inventory.history_interval: 90000 (must be at most 86400)"),
            (
                |c| c.inventory.worker_forget_after = 30,
                "inventory.worker_forget_after: 30 (must be at least inventory.worker_offline_after = 60)",
            ),
            (|c| c.aggregate.prefix_bytes = 5, "aggregate.prefix_bytes: 5 (must be 1 to 4)"),
            (
                |c| c.aggregate.miners_per_upstream = 70_000,
                "aggregate.miners_per_upstream: 70000 (must be at most 65536",
            ),
            (|c| c.aggregate.max_upstreams = 0, "aggregate.max_upstreams: 0"),
            (|c| c.upstream.max_reject_rate = 0.0, "upstream.max_reject_rate: 0 (must be above 0"),
            (|c| c.vardiff.min_difficulty = 0.0, "vardiff.min_difficulty: 0 (must be a number greater than zero)"),
            (|c| c.vardiff.min_difficulty = -1.5, "vardiff.min_difficulty: -1.5 (must be a number greater than zero)"),
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
        config.notify.webhook_url = "https://hooks.example.com/services/T0/B0/XYZ".into();
        config.validate().unwrap();
        config.notify.webhook_url = "http://[::1]:8080/hook".into();
        config.validate().unwrap();
        assert!(config.server.proxy_protocol_trusted().contains("10.9.8.7".parse().unwrap()));
    }

    /// The store sits beside the config file, or in ./loka-data without one; a set one stays.
    #[test]
    fn data_dir_defaults() {
        let resolved = |set: &str, file: Option<&str>| {
            let mut c = crate::config::InventoryConfig { data_dir: set.into(), ..Default::default() };
            c.resolve_data_dir(file.map(Path::new));
            c.data_dir
        };
        assert_eq!(resolved("", Some("/etc/loka-stratum/loka.toml")), "/etc/loka-stratum");
        assert_eq!(resolved("", Some("loka.toml")), ".");
        assert_eq!(resolved("", None), "loka-data");
        assert_eq!(resolved("/var/lib/loka-stratum", Some("/etc/loka.toml")), "/var/lib/loka-stratum");
    }
}
