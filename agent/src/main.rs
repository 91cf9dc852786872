//! `rollwave-agent`: parses the command line and config, runs the agent until
//! SIGTERM, maps the outcome to an exit code (0 ok, 1 failure, 2 usage,
//! 64 bad configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rollwave_agent::config::{AgentConfig, DEFAULT_CONFIG_PATH};

const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "rollwave-agent",
    version,
    about = "The Rollwave agent: joins the coordinator and keeps this instance on its approved releases",
    long_about = "The Rollwave agent runs on every instance (as the systemd service rollwave-agent).\n\
        On first start it joins the coordinator with the join_token from its config; afterwards its\n\
        certificate (under tls_dir) identifies it and the token is no longer needed.\n\n\
        Exit codes: 0 ok, 1 failure, 2 usage error, 64 bad configuration."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: join if needed, then stay connected
    Run {
        /// Agent configuration (TOML)
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run { config } => run(&config),
    }
}

fn run(config_path: &std::path::Path) -> ExitCode {
    let config = match AgentConfig::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => return Err(anyhow::anyhow!("cannot watch SIGTERM: {error}")),
        };
        tokio::select! {
            result = rollwave_agent::run(config) => result.map_err(anyhow::Error::from),
            _ = terminate.recv() => {
                tracing::info!("SIGTERM: stopping");
                Ok(())
            }
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
