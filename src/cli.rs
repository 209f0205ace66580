//! Command-line interface. With no subcommand the daemon runs, so `loka-stratum --pool …` works.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::config::{LogFormat, Mode};

#[derive(Debug, Parser)]
#[command(name = "loka-stratum", version, about = "Stratum V1 mining proxy")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run(RunArgs),
    /// Load and validate a config file (with LOKA_ environment overrides), print the effective
    /// configuration with passwords masked, and exit.
    CheckConfig {
        /// The TOML config file to check.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the fully commented default configuration.
    DefaultConfig,
}

/// Flags of `run`. Each one overrides the config file and the environment; unset flags leave
/// the configured value alone, which is why none of them carries a clap default.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address the Stratum listener binds to [default: 0.0.0.0:3333].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Pool URL, stratum+tcp://host:port; repeat for failover pools in priority order. Replaces
    /// the pools of the config file.
    #[arg(long, value_name = "URL")]
    pub pool: Vec<String>,
    /// User for every pool.
    #[arg(long, value_name = "USER")]
    pub pool_user: Option<String>,
    /// Password for every pool.
    #[arg(long, value_name = "PASSWORD")]
    pub pool_password: Option<String>,
    /// Address of the HTTP port (metrics, health, workers) [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Upstream mode: one pool session per miner, or miners sharing pool sessions
    /// [default: passthrough].
    #[arg(long, value_enum, value_name = "MODE")]
    pub mode: Option<Mode>,
    /// Log output format [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// More log output: -v debug, -vv trace. RUST_LOG takes precedence.
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
    /// Less log output: -q warn, -qq error.
    #[arg(short, long, action = ArgAction::Count)]
    pub quiet: u8,
}

impl RunArgs {
    /// The log level that `-v`/`-q` ask for, if they change it from the configured one.
    pub fn log_level_override(&self) -> Option<&'static str> {
        match i16::from(self.verbose) - i16::from(self.quiet) {
            0 => None,
            1 => Some("debug"),
            2.. => Some("trace"),
            -1 => Some("warn"),
            _ => Some("error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("loka-stratum").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn no_subcommand_means_run() {
        let cli = parse(&["--pool", "stratum+tcp://a:1", "--pool", "stratum+tcp://b:2", "-vv"]);
        assert!(cli.command.is_none());
        assert_eq!(cli.run.pool, ["stratum+tcp://a:1", "stratum+tcp://b:2"]);
        assert_eq!(cli.run.log_level_override(), Some("trace"));
    }

    #[test]
    fn subcommands() {
        assert!(matches!(parse(&["default-config"]).command, Some(Command::DefaultConfig)));
        match parse(&["check-config", "x.toml"]).command {
            Some(Command::CheckConfig { file }) => assert_eq!(file, PathBuf::from("x.toml")),
            other => panic!("{other:?}"),
        }
        match parse(&["run", "--log-format", "json", "-q"]).command {
            Some(Command::Run(args)) => {
                assert_eq!(args.log_format, Some(LogFormat::Json));
                assert_eq!(args.log_level_override(), Some("warn"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn verbosity() {
        let level = |v, q| RunArgs { verbose: v, quiet: q, ..RunArgs::default() }.log_level_override();
        assert_eq!(level(0, 0), None);
        assert_eq!(level(1, 0), Some("debug"));
        assert_eq!(level(3, 0), Some("trace"));
        assert_eq!(level(0, 2), Some("error"));
        assert_eq!(level(1, 1), None);
    }
}
