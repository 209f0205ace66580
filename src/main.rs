//! The `loka-stratum` binary: parses the command line, loads and validates the configuration
//! before anything binds, and runs the server until SIGINT or SIGTERM.
#![forbid(unsafe_code)]

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use loka_stratum::cli::{Cli, Command, RunArgs};
use loka_stratum::config::{self, DEFAULT_TOML};
use loka_stratum::server::{Reloader, Server};
use loka_stratum::systemd;

/// sysexits.h: the command was used incorrectly (a bad configuration).
const EX_USAGE: u8 = 64;
/// sysexits.h: a service is unavailable (a port could not be bound).
const EX_UNAVAILABLE: u8 = 69;
/// sysexits.h: an operating-system error (no runtime, no signal handler).
const EX_OSERR: u8 = 71;
/// The conventional status after an interrupt: 128 + SIGINT.
const EXIT_FORCED: i32 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::DefaultConfig) => {
            print!("{DEFAULT_TOML}");
            ExitCode::SUCCESS
        }
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn check_config(file: &Path) -> ExitCode {
    match config::load(Some(file), &RunArgs::default()) {
        Ok(config) => {
            print!("{}", config.masked_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loka-stratum: config error: {e}");
            ExitCode::from(EX_USAGE)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match config::load(args.config.as_deref(), &args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("loka-stratum: config error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    loka_stratum::logging::init(&config.log, args.log_level_override());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "cannot start the tokio runtime");
            return ExitCode::from(EX_OSERR);
        }
    };
    runtime.block_on(async move {
        // Handlers go in before binding, so a signal during start-up is not the default kill.
        let (shutdown, hangup) = match shutdown_signal().and_then(|s| Ok((s, signal(SignalKind::hangup())?))) {
            Ok(signals) => signals,
            Err(e) => {
                error!(error = %e, "cannot install signal handlers");
                return ExitCode::from(EX_OSERR);
            }
        };
        let server = match Server::bind(config).await {
            Ok(server) => server,
            Err(e) => {
                error!(error = %e, "cannot start: a port could not be bound or the worker store opened");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };
        systemd::ready(&format!("miners on {}, admin on {}", server.local_addr(), server.http_addr()));
        tokio::spawn(reload_on_hangup(hangup, args, server.reloader()));
        let watchdog_stop = CancellationToken::new();
        let watchdog = systemd::spawn_watchdog(watchdog_stop.clone());
        server
            .run(async move {
                shutdown.await;
                // Once stopping, systemd no longer expects pings.
                systemd::stopping();
                watchdog_stop.cancel();
            })
            .await;
        if let Some(watchdog) = watchdog {
            let _ = watchdog.await;
        }
        ExitCode::SUCCESS
    })
}

/// Re-reads the config file on each SIGHUP, layered with the environment and the same flags as
/// at start-up, and puts it in force. An invalid file, or one that needs a restart, is refused
/// and the running configuration stays.
async fn reload_on_hangup(mut hangup: Signal, args: RunArgs, reloader: Reloader) {
    while hangup.recv().await.is_some() {
        let Some(path) = args.config.as_deref() else {
            warn!("SIGHUP: there is no --config file to reload");
            continue;
        };
        match config::load(Some(path), &args).map_err(|e| e.to_string()).and_then(|new| reloader.reload(new)) {
            Ok(()) => info!(file = %path.display(), "configuration reloaded"),
            Err(reason) => {
                error!(file = %path.display(), %reason, "reload refused; the running configuration stays in force")
            }
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM. A second signal during the drain exits at once, for
/// an operator who does not want to wait out the grace period.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        info!(signal = name, "shutting down; a second signal exits immediately");
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            warn!("second signal, exiting without draining");
            std::process::exit(EXIT_FORCED);
        });
    })
}
