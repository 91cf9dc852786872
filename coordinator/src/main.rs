//! `rollwave`: parses the command line, runs the command, maps the outcome
//! to an exit code (0 ok, 1 failure, 2 usage, 64 bad configuration).

use std::io::IsTerminal as _;
use std::process::ExitCode;

use rollwave_coordinator::cli::console::{EXIT_STDOUT_CLOSED, is_stdout_closed, write_stderr};
use rollwave_coordinator::cli::profile::{ConfigError, ProcessEnvironment};
use rollwave_coordinator::cli::{Command, EXIT_CONFIG, ServerArgs, parse_command_line, run_operator_command};
use rollwave_coordinator::grpc::ServiceSettings;
use rollwave_coordinator::listener::ListenerLimits;
use rollwave_coordinator::presence::PresencePolicy;
use rollwave_coordinator::server::{self, ServerError, ServerOptions};
use rollwave_coordinator::{ca::CaFiles, demo};

fn main() -> ExitCode {
    let cli = parse_command_line();
    let default_level = match cli.command {
        Command::Server(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into a file or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            write_stderr(&format!("error: cannot start the async runtime: {error}\n"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => run_server(args).await,
            Command::Demo(args) => demo::run(args).await,
            _ => run_operator_command(cli, &ProcessEnvironment).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if is_stdout_closed(&error) => ExitCode::from(EXIT_STDOUT_CLOSED),
        Err(error) => {
            write_stderr(&format!("error: {error:#}\n"));
            if is_configuration_error(&error) {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn is_configuration_error(error: &anyhow::Error) -> bool {
    error.downcast_ref::<ConfigError>().is_some()
        || matches!(
            error.downcast_ref::<ServerError>(),
            Some(ServerError::DataDir { .. } | ServerError::Ca(_))
        )
}

async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let mut options = ServerOptions::new(args.data_dir, args.listen);
    options.ca_files = args
        .ca_cert
        .zip(args.ca_key)
        .map(|(certificate, key)| CaFiles { certificate, key });
    options.tls_names = args.tls_names;
    options.settings = ServiceSettings {
        certificate_ttl: args.certificate_ttl,
        heartbeat_interval: args.heartbeat_interval,
        presence: PresencePolicy {
            offline_after: args.offline_after,
            lost_after: args.lost_after,
        },
        ..options.settings
    };
    options.limits.listener = ListenerLimits {
        max_connections: args.max_connections,
        handshake_timeout: args.handshake_timeout,
        idle_timeout: args.idle_timeout,
        max_pending_per_source: args.max_pending_per_source,
    };
    options.limits.max_concurrent_streams = args.max_streams_per_connection;
    options.limits.request_timeout = args.request_timeout;
    options.limits.keepalive_interval = args.keepalive_interval;
    options.limits.keepalive_timeout = args.keepalive_timeout;
    options.limits.agent_message_max = args.max_agent_message;
    options.limits.operator_message_max = args.max_operator_message;
    let mut running = server::start(options).await?;
    write_stderr(&format!(
        "rollwave coordinator listening on {}\n  operator CLI: rollwave --config {} instance list\n",
        running.local_addr,
        running.files.cli_config.display()
    ));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = running.wait() => return Ok(result?),
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
    }
    running.shutdown().await?;
    Ok(())
}
