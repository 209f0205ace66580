//! Process-wide tracing set-up.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber, writing to stderr. The filter is `RUST_LOG` if set, else
/// `level_override` (from `-v`/`-q`), else `cfg.level`. A second call leaves the first in place.
pub fn init(cfg: &LogConfig, level_override: Option<&str>) {
    let directive = level_override.unwrap_or(&cfg.level);
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(env) if !env.trim().is_empty() => EnvFilter::try_new(&env).unwrap_or_else(|e| {
            eprintln!("loka-stratum: ignoring invalid RUST_LOG {env:?}: {e}");
            EnvFilter::new(directive)
        }),
        _ => EnvFilter::new(directive),
    };
    // Colour only for a person at a terminal, not in journald or a log file.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // `try_init` fails only when a subscriber is already installed, which is the harmless case.
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).try_init(),
    };
}
