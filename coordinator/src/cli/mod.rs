//! The `rollwave` command line: the server, the demo, and the operator
//! commands that talk to a coordinator over gRPC.

pub mod console;
pub mod deploy;
pub mod git;
pub mod output;
pub mod profile;
pub mod release;
pub mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use rollwave_proto::v1 as pb;
use rollwave_proto::v1::operator_service_client::OperatorServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use self::console::{noteln, outln};
use self::deploy::{DeployArgs, DeploymentCommand, EventCommand, PinArgs, RollbackArgs, StatusArgs, UnpinArgs};
use self::output::{InstanceView, OutputFormat, StackView, TokenView, print_item, print_list};
use self::profile::{ConfigError, Profile, ProfileFlags};
use self::release::ReleaseCommand;

/// Exit code for a configuration the program cannot work with (sysexits EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "rollwave",
    version,
    about = "Deploy releases to fleets of instances without taking the site down",
    long_about = "Rollwave keeps every instance of a stack on the stack's approved release.\n\n\
        `rollwave server` runs the coordinator; the other commands talk to it.\n\
        Connection settings come from flags, else ROLLWAVE_ADDR / ROLLWAVE_TOKEN /\n\
        ROLLWAVE_CA, else a config file (--config, ROLLWAVE_CONFIG, or\n\
        ~/.config/rollwave/cli.toml). The server writes a ready-made one to\n\
        DATA_DIR/cli.toml.\n\n\
        Exit codes: 0 ok, 1 failure, 2 usage error, 64 bad configuration.",
    after_help = "Try `rollwave demo` to watch a coordinator and six agents on this machine."
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Output format: readable tables and lines, or JSON for scripts
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    pub output: OutputFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// Coordinator address, HOST:PORT [env: ROLLWAVE_ADDR]
    #[arg(long, global = true)]
    pub addr: Option<String>,
    /// Operator token [env: ROLLWAVE_TOKEN]
    #[arg(long, global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate of the coordinator, PEM [env: ROLLWAVE_CA]
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// CLI config file (TOML with addr, ca, token or token_file) [env: ROLLWAVE_CONFIG]
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

// Parsed once per process: the size of the server's many flags costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator: gRPC over TLS, state in DATA_DIR
    Server(ServerArgs),
    /// Run the whole job on this machine: coordinator, artifact store, agents, rolling deployments
    Demo(DemoArgs),
    /// Create, list and show stacks
    #[command(subcommand)]
    Stack(StackCommand),
    /// List, show and remove instances
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Create, list and revoke join tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// Build, push, list and show releases (versioned archives of a bundle)
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Deploy a release to a stack, wave by wave: plan it, start it, watch it
    Deploy(DeployArgs),
    /// List, show, watch, pause, resume and abort deployments
    #[command(subcommand)]
    Deployment(DeploymentCommand),
    /// Switch a stack back to the bundle's previous approved release, all at once
    Rollback(RollbackArgs),
    /// Hold instances at a release of a bundle; deployments skip them
    Pin(PinArgs),
    /// Return pinned instances to the approved release
    Unpin(UnpinArgs),
    /// What a stack runs, bundle by bundle, and which instances differ
    Status(StatusArgs),
    /// The audit trail: who did what, when
    #[command(subcommand)]
    Event(EventCommand),
    /// Set, show and clear the load balancer deployments drain instances from
    #[command(subcommand)]
    Traffic(traffic::TrafficCommand),
}

/// The operator CLI's connection flags, on `server` and `demo`, where they would do nothing (and
/// `--ca` beside `--ca-cert` is easy to confuse): hidden from their help and refused with a pointer
/// to what was probably meant. Same names and types as [`ConnectionArgs`], whose global flags
/// would otherwise be listed there.
#[derive(Debug, Args)]
pub struct NoConnectionArgs {
    #[arg(long, hide = true, value_parser = refuse_client_flag::<String>("--addr", "the server listens on --listen"))]
    pub addr: Option<String>,
    #[arg(long, hide = true, value_parser = refuse_client_flag::<String>("--token", "the server writes its operator token to DATA_DIR"))]
    pub token: Option<String>,
    #[arg(long, hide = true, value_parser = refuse_client_flag::<PathBuf>("--ca", "the server's own CA is --ca-cert and --ca-key"))]
    pub ca: Option<PathBuf>,
    #[arg(long, hide = true, value_parser = refuse_client_flag::<PathBuf>("--config", "the server is configured by its flags"))]
    pub config: Option<PathBuf>,
}

impl ConnectionArgs {
    /// The first connection flag given, for commands that take none.
    pub fn given(&self) -> Option<&'static str> {
        [
            ("--addr", self.addr.is_some()),
            ("--token", self.token.is_some()),
            ("--ca", self.ca.is_some()),
            ("--config", self.config.is_some()),
        ]
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag))
    }
}

/// A value parser that refuses an operator connection flag where it does not apply.
fn refuse_client_flag<T>(
    flag: &'static str,
    instead: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |_| {
        Err(format!(
            "{flag} is a flag of the operator commands, not of this one; {instead}"
        ))
    }
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub no_connection: NoConnectionArgs,
    /// Where the database, the CA and the operator token live (created if missing)
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address to listen on
    #[arg(long, default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// Use this CA certificate (PEM) instead of creating one; needs --ca-key
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert (PEM)
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Extra DNS name for the serving certificate (repeatable)
    #[arg(long = "tls-name")]
    pub tls_names: Vec<String>,
    /// Lifetime of agent certificates; agents renew at two thirds of it
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub certificate_ttl: Duration,
    /// How often agents send heartbeats
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Without a session or heartbeat for this long, an instance shows offline
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub offline_after: Duration,
    /// Without a heartbeat for this long, an instance shows lost
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub lost_after: Duration,
    /// Open connections at most (handshaking or established)
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Drop clients that have not finished the TLS handshake by then
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Close connections that have had no call (HTTP/2 stream) open for this long
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Connections from one address that have not authenticated yet (no agent certificate, no
    /// call made), at most; the oldest is closed to make room. Agents never count
    #[arg(long, default_value_t = 64, value_parser = parse_at_least_one)]
    pub max_pending_per_source: usize,
    /// HTTP/2 streams (calls) one connection may have open at once
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Unary calls must finish within this (agent sessions and watches are not cut by it)
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Ping idle clients over HTTP/2 this often
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,
    /// Close a connection whose client does not answer a ping within this
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,
    /// Largest message an agent may send or receive (bytes, or with KiB or MiB)
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    pub max_agent_message: usize,
    /// Largest message an operator may send or receive (bytes, or with KiB or MiB)
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub max_operator_message: usize,
}

/// A count that must be at least 1.
fn parse_at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("{text:?}: give a whole number of at least 1")),
        Ok(count) => Ok(count),
    }
}

/// A size in bytes: a plain number, or one with a `KiB` or `MiB` suffix.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let trimmed = text.trim();
    let (number, unit) = if let Some(number) = trimmed.strip_suffix("MiB") {
        (number, 1024 * 1024)
    } else if let Some(number) = trimmed.strip_suffix("KiB") {
        (number, 1024)
    } else {
        (trimmed, 1)
    };
    let count: usize = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size: give bytes (65536) or KiB/MiB (64KiB, 4MiB)"))?;
    match count.checked_mul(unit) {
        Some(0) => Err(format!("{text:?}: a size must be at least one byte")),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{text:?} is too large")),
    }
}

const DEMO_HELP: &str = "\
Everything runs in a temporary directory on loopback: a coordinator and an
S3-compatible artifact store in this process, and real rollwave-agent
processes in three zones. No AWS account is needed: the agents sign with the
store's own key pair and read none of this machine's AWS settings.

It builds three releases of a small /bin/sh app (1.0 and 2.0 good, 3.0
broken), pushes them, starts the agents (they install the approved 1.0 as
they join), rolls out 2.0 canary first and zone by zone, then 3.0, which
fails at the canary and is switched back, and ends with the stack's status.
It takes about half a minute. Ctrl-C stops it and cleans up.

Exit codes: 0 when every step behaved as expected; 1 otherwise (the temporary
directory, with every agent's and app's log, is then kept).";

#[derive(Debug, Args)]
#[command(after_help = DEMO_HELP)]
pub struct DemoArgs {
    #[command(flatten)]
    pub no_connection: NoConnectionArgs,
    /// Number of local agents
    #[arg(long, default_value_t = 6)]
    pub agents: usize,
    /// Keep everything running until Ctrl-C instead of cleaning up at the end, to try the CLI against it
    #[arg(long)]
    pub keep_running: bool,
}

#[derive(Debug, Subcommand)]
pub enum StackCommand {
    /// Create a stack
    Create {
        name: String,
        /// dev, staging or production
        #[arg(long, default_value = "dev")]
        stage: String,
    },
    /// List stacks
    List,
    /// Show one stack
    Show { name: String },
}

#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// List instances, with presence (online, offline, lost)
    List {
        /// Only this stack
        #[arg(long)]
        stack: Option<String>,
    },
    /// Show one instance
    Show { id: String },
    /// Forget an instance; its certificate stops working at once
    Remove { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token and print it (one line, shown only once)
    Create {
        /// Stack the joining instances belong to
        #[arg(long)]
        stack: String,
        /// How long the token is valid: 1s to 30 days
        #[arg(long, default_value = "1h", value_parser = parse_token_ttl)]
        ttl: Duration,
        /// How many instances may join with it: 1 to 100000
        #[arg(long, default_value_t = 1, value_parser = parse_token_uses)]
        uses: u32,
    },
    /// List join tokens (never their secrets)
    List {
        #[arg(long)]
        stack: Option<String>,
    },
    /// Revoke a join token
    Revoke { id: String },
}

/// Parses the command line (exiting with usage errors as clap does), with help laid out for at
/// least [`console::HELP_MIN_WIDTH`] columns so example command lines stay whole.
pub fn parse_command_line() -> Cli {
    let mut command = Cli::command().term_width(console::help_width());
    let cli = command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|matches| Cli::from_arg_matches(&matches))
        .unwrap_or_else(|error| error.format(&mut command).exit());
    if matches!(cli.command, Command::Server(_) | Command::Demo(_))
        && let Some(flag) = cli.connection.given()
    {
        // Given before the subcommand, a global flag reaches `server` and `demo` unchecked.
        command
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!("{flag} is a flag of the operator commands; `rollwave server` and `rollwave demo` take none"),
            )
            .exit();
    }
    cli
}

/// `--ttl` of `token create`, refused on the command line by the coordinator's own rule.
fn parse_token_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    crate::model::token_terms(Some(ttl), None).map_err(|error| error.to_string())?;
    Ok(ttl)
}

/// `--uses` of `token create`, refused on the command line by the coordinator's own rule.
fn parse_token_uses(text: &str) -> Result<u32, String> {
    let uses = text
        .parse()
        .map_err(|error: std::num::ParseIntError| error.to_string())?;
    crate::model::token_terms(None, Some(uses)).map_err(|error| error.to_string())?;
    Ok(uses)
}

type AuthInterceptor = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
pub type OperatorClient = OperatorServiceClient<InterceptedService<Channel, AuthInterceptor>>;

/// Dials the coordinator as an operator.
pub async fn operator_client(profile: &Profile) -> anyhow::Result<OperatorClient> {
    let tls =
        rollwave_trust::operator_client_config(&profile.ca_pem).map_err(|error| ConfigError(error.to_string()))?;
    let channel = rollwave_trust::connect(
        &profile.addr,
        tls,
        rollwave_trust::PUBLIC_SERVER_NAME,
        &rollwave_trust::ChannelOptions::default(),
    )
    .await?;
    let header: MetadataValue<_> = format!("Bearer {}", profile.token)
        .parse()
        .map_err(|_| ConfigError("the operator token contains characters not allowed in a header".into()))?;
    let interceptor: AuthInterceptor = Box::new(move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", header.clone());
        Ok(request)
    });
    Ok(OperatorServiceClient::with_interceptor(channel, interceptor))
}

/// Turns a gRPC status into an error whose message is the server's explanation.
fn call_error(status: tonic::Status) -> anyhow::Error {
    // tonic's own words for a message above the server's limit name neither the limit nor the flag.
    let hint = if status.code() == tonic::Code::OutOfRange && status.message().contains("message length too large") {
        "; the request is larger than the coordinator accepts from operators (its --max-operator-message)"
    } else {
        ""
    };
    anyhow::anyhow!("{}{hint} ({:?})", status.message(), status.code())
}

/// Runs an operator command against the coordinator.
pub async fn run_operator_command(cli: Cli, env: &dyn profile::Environment) -> anyhow::Result<()> {
    let flags = ProfileFlags {
        addr: cli.connection.addr.clone(),
        token: cli.connection.token.clone(),
        ca: cli.connection.ca.clone(),
        config: cli.connection.config.clone(),
    };
    // Release commands resolve the profile themselves: building needs no coordinator.
    let command = match cli.command {
        Command::Release(command) => return release::run(command, &flags, cli.output, env).await,
        other => other,
    };
    // Contradictory deploy flags are refused before dialling the coordinator.
    if let Command::Deploy(args) = &command {
        deploy::deployment_options(args)?;
    }
    let profile = profile::resolve(&flags, env)?;
    let mut client = operator_client(&profile).await?;
    let format = cli.output;
    match command {
        Command::Stack(StackCommand::Create { name, stage }) => {
            let stack = client
                .create_stack(pb::CreateStackRequest { name, stage })
                .await
                .map_err(call_error)?
                .into_inner();
            print_item(format, &StackView::from(stack))
        }
        Command::Stack(StackCommand::List) => {
            let stacks = client
                .list_stacks(pb::ListStacksRequest {})
                .await
                .map_err(call_error)?
                .into_inner()
                .stacks;
            print_list(format, &stacks.into_iter().map(StackView::from).collect::<Vec<_>>())
        }
        Command::Stack(StackCommand::Show { name }) => {
            let stack = client
                .get_stack(pb::GetStackRequest { name })
                .await
                .map_err(call_error)?
                .into_inner();
            print_item(format, &StackView::from(stack))
        }
        Command::Instance(InstanceCommand::List { stack }) => {
            let instances = client
                .list_instances(pb::ListInstancesRequest {
                    stack: stack.unwrap_or_default(),
                })
                .await
                .map_err(call_error)?
                .into_inner()
                .instances;
            print_list(
                format,
                &instances.into_iter().map(InstanceView::from).collect::<Vec<_>>(),
            )
        }
        Command::Instance(InstanceCommand::Show { id }) => {
            let instance = client
                .get_instance(pb::GetInstanceRequest { id })
                .await
                .map_err(call_error)?
                .into_inner();
            print_item(format, &InstanceView::from(instance))
        }
        Command::Instance(InstanceCommand::Remove { id }) => {
            client
                .remove_instance(pb::RemoveInstanceRequest { id: id.clone() })
                .await
                .map_err(call_error)?;
            noteln!("removed instance {id}; its certificate no longer works");
            Ok(())
        }
        Command::Token(TokenCommand::Create { stack, ttl, uses }) => {
            let created = client
                .create_token(pb::CreateTokenRequest {
                    stack,
                    ttl_seconds: Some(ttl.as_secs()),
                    uses: Some(uses),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            match format {
                OutputFormat::Table => outln!("{}", created.token)?,
                OutputFormat::Json => {
                    let info = created.info.map(TokenView::from);
                    outln!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({ "token": created.token, "info": info }))?
                    )?;
                }
            }
            Ok(())
        }
        Command::Token(TokenCommand::List { stack }) => {
            let tokens = client
                .list_tokens(pb::ListTokensRequest {
                    stack: stack.unwrap_or_default(),
                })
                .await
                .map_err(call_error)?
                .into_inner()
                .tokens;
            print_list(format, &tokens.into_iter().map(TokenView::from).collect::<Vec<_>>())
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            client
                .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(call_error)?;
            noteln!("revoked join token {id}");
            Ok(())
        }
        Command::Deploy(args) => deploy::deploy(&mut client, args, format).await,
        Command::Deployment(command) => deploy::deployment(&mut client, command, format).await,
        Command::Rollback(args) => deploy::rollback(&mut client, args, format).await,
        Command::Pin(args) => deploy::pin(&mut client, args, format).await,
        Command::Unpin(args) => deploy::unpin(&mut client, args, format).await,
        Command::Status(args) => deploy::status(&mut client, args, format).await,
        Command::Event(command) => deploy::event(&mut client, command, format).await,
        Command::Traffic(command) => traffic::traffic(&mut client, command, format).await,
        Command::Server(_) | Command::Demo(_) | Command::Release(_) => {
            unreachable!("server and demo are dispatched by main, releases above")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_bytes_or_binary_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("4MiB"), Ok(4 * 1024 * 1024));
        assert!(parse_size("0").is_err());
        assert!(parse_size("4MB").expect_err("unknown unit").contains("KiB/MiB"));
    }

    #[test]
    fn server_limits_default_to_their_former_values() {
        let cli = Cli::parse_from(["rollwave", "server", "--data-dir", "/tmp/x"]);
        let Command::Server(args) = cli.command else {
            panic!("not the server command");
        };
        let defaults = crate::server::ServerLimits::default();
        assert_eq!(args.max_connections, defaults.listener.max_connections);
        assert_eq!(args.handshake_timeout, defaults.listener.handshake_timeout);
        assert_eq!(args.idle_timeout, defaults.listener.idle_timeout);
        assert_eq!(args.max_pending_per_source, defaults.listener.max_pending_per_source);
        assert_eq!(args.max_streams_per_connection, defaults.max_concurrent_streams);
        assert_eq!(args.request_timeout, defaults.request_timeout);
        assert_eq!(args.keepalive_interval, defaults.keepalive_interval);
        assert_eq!(args.keepalive_timeout, defaults.keepalive_timeout);
        assert_eq!(args.max_agent_message, defaults.agent_message_max);
        assert_eq!(args.max_operator_message, defaults.operator_message_max);
    }
}
