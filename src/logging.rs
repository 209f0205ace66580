//! Process-wide tracing set-up.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Sets the filter of the installed subscriber; the format's handle types differ, so each is
/// kept behind this one closure.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// How the running filter is replaced, and whether `RUST_LOG` or `-v`/`-q` pinned it.
struct Reload {
    set: SetFilter,
    pinned: bool,
}

static RELOAD: OnceLock<Mutex<Reload>> = OnceLock::new();

/// Puts a reloaded `log.level` in force, unless `RUST_LOG` or `-v`/`-q` set the level, which
/// keep precedence as they did at start-up.
pub fn set_level(level: &str) {
    let Some(reload) = RELOAD.get() else { return };
    let reload = reload.lock().unwrap_or_else(|e| e.into_inner());
    if reload.pinned {
        return;
    }
    match EnvFilter::try_new(level).map_err(|e| e.to_string()).and_then(|f| (reload.set)(f)) {
        Ok(()) => tracing::info!(level, "log level set"),
        Err(e) => tracing::warn!(level, error = %e, "log level not changed"),
    }
}

/// Installs the global subscriber, writing to stderr. The filter is `RUST_LOG` if set, else
/// `level_override` (from `-v`/`-q`), else `cfg.level`. A second call leaves the first in place.
pub fn init(cfg: &LogConfig, level_override: Option<&str>) {
    let directive = level_override.unwrap_or(&cfg.level);
    let mut pinned = level_override.is_some();
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(env) if !env.trim().is_empty() => EnvFilter::try_new(&env).inspect(|_| pinned = true).unwrap_or_else(|e| {
            eprintln!("loka-stratum: ignoring invalid RUST_LOG {env:?}: {e}");
            EnvFilter::new(directive)
        }),
        _ => EnvFilter::new(directive),
    };
    // Colour only for a person at a terminal, not in journald or a log file.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi);
    // `try_init` fails only when a subscriber is already installed, which is the harmless case.
    let set: SetFilter = match cfg.format {
        LogFormat::Text => {
            let builder = builder.with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_err() {
                return;
            }
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
        LogFormat::Json => {
            let builder = builder
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_err() {
                return;
            }
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
    };
    let _ = RELOAD.set(Mutex::new(Reload { set, pinned }));
}
