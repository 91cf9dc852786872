//! `rollwave-agent`: parses the command line and config, runs the agent until
//! SIGTERM, maps the outcome to an exit code (0 ok, 1 failure, 2 usage,
//! 64 bad configuration).

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use rollwave_agent::config::{AgentConfig, DEFAULT_CONFIG_PATH};
use rollwave_agent::install::Goal;
use rollwave_agent::installer::{InstallOutcome, InstallRequest, InstallSettings, Installer};
use rollwave_agent::journal::Source;
use rollwave_agent::layout::Layout;
use rollwave_agent::lock::StateDirLock;
use rollwave_artifacts::{InstanceMetadata, S3Settings};

const EXIT_CONFIG: u8 = 64;
/// Exit code when stdout's reader went away (`rollwave-agent ... | head`): 128 + SIGPIPE, what the
/// shell reports for a program SIGPIPE ended, so a pipeline with `pipefail` still sees the cut.
const EXIT_STDOUT_CLOSED: u8 = 141;

#[derive(Debug, Parser)]
#[command(
    name = "rollwave-agent",
    version,
    about = "The Rollwave agent: joins the coordinator and keeps this instance on its approved releases",
    long_about = "The Rollwave agent runs on every instance (the systemd service rollwave-agent).\n\
        On first start it joins the coordinator with the join_token from its config;\n\
        afterwards its certificate (under tls_dir) identifies it and the token is no\n\
        longer needed.\n\n\
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
    /// Install a release from a local archive or from S3, without the coordinator
    #[command(after_help = INSTALL_HELP)]
    Install(InstallArgs),
    /// Finish or roll back installs a crash interrupted (the agent does this when it starts)
    Recover {
        /// State directory
        #[arg(long, default_value = "/var/lib/rollwave")]
        root: PathBuf,
    },
    /// Switch a bundle back to its previous release, still on disk (emergency tool)
    #[command(after_help = ROLLBACK_HELP)]
    Rollback(RollbackArgs),
}

const INSTALL_HELP: &str = "\
The same pipeline the agent runs for a deployment: verify the sha256 before
anything is unpacked, unpack safely into staging, run before_install and
after_install, stop the running release (application_stop), switch `current`
atomically, then application_start, validate_service and the health checks. A
failure before the switch leaves `current` as it was; a failure after it
switches back. Every step is journaled under ROOT/state/journal, so an install
interrupted by a crash is finished or rolled back by the next run.

It takes the agent's lock on ROOT: it refuses while an agent runs on that state
dir. Installing the same bundle, version and sha256 again does nothing and
exits 0.

Examples:
  rollwave-agent install --archive web-1.4.zip --sha256 9f2c... --bundle web \\
      --version 1.4
  rollwave-agent install --s3-url s3://releases/releases/web/1.4.zip \\
      --s3-version-id 3HL4kq... \\
      --size 52428800 --sha256 9f2c... --bundle web --version 1.4

Exit codes: 0 installed (or nothing to do), 1 refused or failed (one line on
stderr), 2 usage.";

const ROLLBACK_HELP: &str = "\
For when the coordinator is unreachable: switches ROOT/releases/BUNDLE/current
back to the release that was current before it (no download; it is still on
disk), running the usual application_stop, application_start and
validate_service hooks and the health checks. Once the agent is connected again,
the coordinator's desired state applies again: to keep the old release, roll
back with `rollwave rollback STACK BUNDLE` as well.

Run again, it steps further back (2.0, 4.0, rollback: 2.0, again: the
release before 2.0), never forward to the release rolled back from. --to
picks one that was current here before and is still on disk.

Exit codes: 0 switched back, 1 refused or failed, 2 usage.";

#[derive(Debug, clap::Args)]
struct InstallArgs {
    /// Local release archive (zip)
    #[arg(long, conflicts_with = "s3_url", required_unless_present = "s3_url")]
    archive: Option<PathBuf>,
    /// Release archive in S3: s3://BUCKET/KEY (needs --size; pin it with --s3-version-id)
    #[arg(long, requires = "size")]
    s3_url: Option<String>,
    /// S3 object version the release was pushed as
    #[arg(long, requires = "s3_url")]
    s3_version_id: Option<String>,
    /// Registered size of the S3 object in bytes (no more is ever read)
    #[arg(long)]
    size: Option<u64>,
    /// Expected sha256 of the archive (64 hex digits)
    #[arg(long)]
    sha256: String,
    #[arg(long)]
    bundle: String,
    #[arg(long)]
    version: String,
    /// State directory (the release lands in ROOT/releases/BUNDLE/VERSION)
    #[arg(long, default_value = "/var/lib/rollwave")]
    root: PathBuf,
    /// Do not run lifecycle hooks
    #[arg(long)]
    no_hooks: bool,
    /// Prepare only (download, verify, unpack, install hooks); leave `current` alone
    #[arg(long)]
    prepare_only: bool,
    /// Go on when the running release's application_stop fails
    #[arg(long)]
    ignore_stop_failure: bool,
    /// How long the new release may take to pass its health checks
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    health_deadline: std::time::Duration,
    /// Releases kept on disk per bundle (current and the rollback target always are)
    #[arg(long, default_value_t = rollwave_agent::installer::DEFAULT_RETENTION)]
    retention: usize,
    #[command(flatten)]
    s3: S3Args,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, clap::Args)]
struct S3Args {
    /// S3-compatible endpoint (for example http://127.0.0.1:9000)
    #[arg(long, env = "ROLLWAVE_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    #[arg(long, env = "ROLLWAVE_S3_REGION")]
    s3_region: Option<String>,
    /// Address buckets by path (endpoint/bucket), as most S3-compatible stores need
    #[arg(long)]
    s3_path_style: bool,
}

#[derive(Debug, clap::Args)]
struct RollbackArgs {
    #[arg(long)]
    bundle: String,
    /// Return to this release (one that was current here before and is still on disk) instead of
    /// the previous one
    #[arg(long, value_name = "VERSION")]
    to: Option<String>,
    /// State directory
    #[arg(long, default_value = "/var/lib/rollwave")]
    root: PathBuf,
    /// Do not run lifecycle hooks
    #[arg(long)]
    no_hooks: bool,
    /// How long the release may take to pass its health checks
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    health_deadline: std::time::Duration,
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Help is laid out for at least this many columns, and no line of an after-help text is wider, so
/// clap never breaks an example command in the middle; a narrower terminal folds lines itself.
const HELP_MIN_WIDTH: usize = 80;

/// The width clap lays help out for: the terminal's (else `COLUMNS`, else 100, as clap would), at
/// least [`HELP_MIN_WIDTH`].
fn help_width() -> usize {
    terminal_size::terminal_size()
        .map(|(width, _)| usize::from(width.0))
        .or_else(|| std::env::var("COLUMNS").ok()?.parse().ok())
        .unwrap_or(100)
        .max(HELP_MIN_WIDTH)
}

fn main() -> ExitCode {
    let mut command = Cli::command().term_width(help_width());
    let cli = command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|matches| Cli::from_arg_matches(&matches))
        .unwrap_or_else(|error| error.format(&mut command).exit());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into a file or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Install(args) => release_command(args.output, install(args)),
        Command::Rollback(args) => release_command(args.output, rollback(args)),
        Command::Recover { root } => recover(&root),
    }
}

/// What `install` and `rollback` print.
#[derive(Debug, serde::Serialize)]
struct Report {
    bundle: String,
    version: String,
    /// `activated`, `prepared` or `unchanged`.
    outcome: &'static str,
    previous: Option<String>,
}

fn release_command(output: Output, work: impl Future<Output = anyhow::Result<Report>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            print_error(&format!("cannot start the async runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(report) => {
            let text = match output {
                Output::Json => serde_json::json!(report).to_string(),
                Output::Text => {
                    let Report {
                        bundle,
                        version,
                        outcome,
                        previous,
                    } = &report;
                    match (*outcome, previous) {
                        ("unchanged", _) => format!("{bundle}@{version} is already installed; nothing to do"),
                        ("prepared", _) => format!("{bundle}@{version} prepared (not current)"),
                        (_, Some(previous)) => format!("{bundle}@{version} is current (previous: {previous})"),
                        (_, None) => format!("{bundle}@{version} is current"),
                    }
                }
            };
            print_line(&text)
        }
        Err(error) => {
            let line = format!("{error:#}").replace('\n', " ");
            print_error(&line);
            ExitCode::FAILURE
        }
    }
}

/// Prints a line on stdout; a reader that went away ends the command quietly rather than in a panic.
fn print_line(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(EXIT_STDOUT_CLOSED),
        Err(error) => {
            print_error(&format!("write to stdout: {error}"));
            ExitCode::FAILURE
        }
    }
}

/// `error: ...` on stderr; nothing (and no panic) when stderr is closed.
fn print_error(text: &str) {
    let _ = writeln!(std::io::stderr(), "error: {text}");
}

fn report(bundle: &str, version: &str, outcome: InstallOutcome) -> Report {
    let (outcome, previous) = match outcome {
        InstallOutcome::Unchanged => ("unchanged", None),
        InstallOutcome::Prepared => ("prepared", None),
        InstallOutcome::Activated { previous } => ("activated", previous),
    };
    Report {
        bundle: bundle.to_owned(),
        version: version.to_owned(),
        outcome,
        previous,
    }
}

async fn install(args: InstallArgs) -> anyhow::Result<Report> {
    let _lock = StateDirLock::acquire(&args.root)?;
    let (source, s3) = match (&args.archive, &args.s3_url) {
        (Some(path), _) => {
            let path = std::path::absolute(path)?;
            (Source::Local { path }, None)
        }
        (None, Some(url)) => {
            let (bucket, key) = url
                .strip_prefix("s3://")
                .and_then(|rest| rest.split_once('/'))
                .filter(|(bucket, key)| !bucket.is_empty() && !key.is_empty())
                .ok_or_else(|| anyhow::anyhow!("--s3-url must look like s3://BUCKET/KEY, not {url:?}"))?;
            let settings = S3Settings {
                endpoint: args.s3.s3_endpoint.clone(),
                region: args.s3.s3_region.clone(),
                force_path_style: args.s3.s3_path_style,
            };
            let source = Source::S3 {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                version_id: args.s3_version_id.clone(),
                size: args.size.unwrap_or_default(),
            };
            (
                source,
                Some(rollwave_artifacts::client(&settings, InstanceMetadata::Allowed).await),
            )
        }
        (None, None) => anyhow::bail!("give --archive or --s3-url"),
    };
    let settings = InstallSettings {
        retention: args.retention,
        health_deadline: args.health_deadline,
        ..InstallSettings::default()
    };
    let installer = Installer::new(Layout::new(&args.root), settings, s3);
    let outcome = installer
        .install(InstallRequest {
            bundle: args.bundle.clone(),
            version: args.version.clone(),
            sha256: args.sha256.clone(),
            source,
            goal: if args.prepare_only {
                Goal::Prepare
            } else {
                Goal::Activate
            },
            run_hooks: !args.no_hooks,
            ignore_stop_failure: args.ignore_stop_failure,
            deployment_id: None,
            rollback: false,
        })
        .await?;
    Ok(report(&args.bundle, &args.version, outcome))
}

fn recover(root: &std::path::Path) -> ExitCode {
    let work = async {
        let _lock = StateDirLock::acquire(root)?;
        let installer = Installer::new(Layout::new(root), InstallSettings::default(), None);
        installer.recover_all().await?;
        anyhow::Ok(())
    };
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(work));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            print_error(&format!("{error:#}"));
            ExitCode::FAILURE
        }
    }
}

async fn rollback(args: RollbackArgs) -> anyhow::Result<Report> {
    let _lock = StateDirLock::acquire(&args.root)?;
    let settings = InstallSettings {
        health_deadline: args.health_deadline,
        ..InstallSettings::default()
    };
    let installer = Installer::new(Layout::new(&args.root), settings, None);
    let outcome = installer
        .rollback(&args.bundle, !args.no_hooks, args.to.as_deref())
        .await?;
    let version = Layout::new(&args.root)
        .current_version(&args.bundle)?
        .unwrap_or_default();
    Ok(report(&args.bundle, &version, outcome))
}

fn run(config_path: &std::path::Path) -> ExitCode {
    let config = match AgentConfig::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            print_error(&error.to_string());
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
            print_error(&format!("cannot start the async runtime: {error}"));
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
            print_error(&format!("{error:#}"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_examples_are_never_wrapped_mid_command() {
        let command = Cli::command();
        let mut wide = Vec::new();
        let commands = std::iter::once(&command).chain(command.get_subcommands());
        for command in commands {
            let texts = [command.get_long_about(), command.get_after_help()];
            for text in texts.into_iter().flatten() {
                let text = text.to_string();
                wide.extend(
                    text.lines()
                        .filter(|line| line.chars().count() > HELP_MIN_WIDTH)
                        .map(str::to_owned),
                );
            }
        }
        assert!(
            wide.is_empty(),
            "wider than {HELP_MIN_WIDTH} columns:\n{}",
            wide.join("\n")
        );
    }
}
