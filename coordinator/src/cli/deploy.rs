//! `rollwave deploy`, `deployment`, `rollback`, `pin`, `unpin`, `status` and
//! `event`: the operator's side of rolling deployments. Commands turn flags
//! into requests and answers into views; the renderers below (plan, full
//! view, live block, change lines, status) are pure so they can be tested
//! without a coordinator. Defaults the operator does not override are left
//! to the coordinator, which owns them; the help text states them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::anyhow;
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use rollwave_proto::v1 as pb;
use serde::Serialize;

use super::console::{noteln, out, outln, write_stderr};
use super::output::{
    BundleStatusView, DeploymentInstanceView, DeploymentView, EventView, InstanceStatusView, OutputFormat, PlanView,
    StackStatusView, Tabular, ago_at, print_item, print_list, table,
};
use super::{OperatorClient, call_error};
use crate::planner::{Amount, InvalidAmount};
use crate::wording::count_of;

/// How often watching asks the coordinator where a deployment stands.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long watching keeps retrying while the coordinator is unreachable (say, restarting) before giving up.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(60);
/// Characters in the live progress bar.
const BAR_WIDTH: usize = 24;
/// Waves the live block shows at most; the rest are summed up in "… more waves" lines.
const MAX_WAVE_LINES: usize = 10;
/// Longest list of "instance state" pairs on one wave line; longer waves show counts per state instead.
const WAVE_LINE_WIDTH: usize = 100;
/// Failures the live block shows (the newest); `deployment show` prints them all.
const MAX_FAILURES_SHOWN: usize = 3;
/// Lines of a failure's detail (its hook output, say) the live block shows, from the end.
const MAX_DETAIL_LINES: usize = 4;
/// Audit events `event list` asks for unless told otherwise.
const DEFAULT_EVENT_LIMIT: u32 = 50;

/// Instance states in lifecycle order, for counting; states the coordinator adds later sort after these.
const STATE_ORDER: [&str; 11] = [
    "pending",
    "preparing",
    "prepared",
    "activating",
    "activated",
    "healthy",
    "settled",
    "failed",
    "switching back",
    "switched back",
    "switch back failed",
];
/// States in which an instance counts as a failure and its detail says why.
const FAILED_STATES: [&str; 2] = ["failed", "switch back failed"];
/// States after which nothing more happens to an instance in this deployment.
const FINAL_STATES: [&str; 4] = ["settled", "failed", "switched back", "switch back failed"];

const DEPLOY_HELP: &str = "\
Defaults (the coordinator applies them to every flag left out):
  --strategy rolling       --canary 1             --batch 25% (of a zone, min 1)
  --min-healthy 75%        --failure-threshold 0  --bake 0s
  --min-healthy-time 10s   --healthy-deadline 5m  --progress-deadline 10m
  failed deployments switch instances back (see --no-rollback)

How a rolling deployment goes:
  1. Every target prepares: downloads, verifies and unpacks the release and runs
     its install hooks, without switching to it.
  2. The canary wave switches first: --canary instances, healthy ones first.
  3. Then zone by zone, the canary's zone first, --batch of the zone's instances
     per wave. A wave never takes so many healthy instances out of service that
     fewer than --min-healthy of the stack stay healthy; a batch that would is
     split.
  An instance is done once it has been healthy for --min-healthy-time without
  interruption, and fails if that takes longer than --healthy-deadline. After
  each wave the deployment waits --bake before the next. More failed instances
  than --failure-threshold, or no progress for --progress-deadline, fail the
  deployment: the instances that switched go back to the previous release
  (unless --no-rollback). Pinned and lost instances are skipped; --plan shows
  which and why.
  --strategy all-at-once switches every target in one wave, with no
  minimum-healthy floor; --canary, --batch and --min-healthy do not apply to it.

N|P% is a number of instances (3) or a percentage (25%, rounded up).
DURATION is like 90s, 5m or 1h 30m.

Examples:
  rollwave deploy web site@1.4.2 --plan
  rollwave deploy web site@1.4.2 --watch
  rollwave deploy web site@1.4.2 --canary 2 --batch 50% --bake 5m --watch
  rollwave deploy web site@1.4.2 --failure-threshold 10% --healthy-deadline 15m
  rollwave deploy staging site@1.4.2 --strategy all-at-once
  rollwave deploy web site@1.4.2 --plan --output json

Exit codes: 0 when started (with --watch: when it succeeded); 1 when refused,
or (with --watch) when it failed or was aborted.";

const WATCH_HELP: &str = "\
On a terminal, a block on stderr is redrawn as the deployment moves: the phase,
a bar of settled instances, every wave with its instances' states, and the
newest failures. Elsewhere (a pipe, a CI log), one line per change, such as
\"wave 2/4 zone us-east-1b: i-0a1b healthy\". With --output json, the final
deployment is printed on stdout as JSON at the end.

Exit codes: 0 when it succeeded; 1 when it failed or was aborted.
Ctrl-C stops watching; the deployment goes on.

Examples:
  rollwave deployment watch d-4f2a9c
  rollwave deployment watch d-4f2a9c --output json > result.json";

const DEPLOYMENT_HELP: &str = "\
Examples:
  rollwave deployment list --stack web
  rollwave deployment show d-4f2a9c
  rollwave deployment watch d-4f2a9c
  rollwave deployment pause d-4f2a9c
  rollwave deployment resume d-4f2a9c
  rollwave deployment abort d-4f2a9c";

const ROLLBACK_HELP: &str = "\
The whole stack switches back to the approved release before the current one,
all at once (the previous release is still on the instances, so this is fast),
and that release becomes the approved one again. Pinned instances stay as they
are.

Run again, it steps further back through the approvals (2.0, 4.0, rollback:
2.0, again: the release before 2.0), never forward to the release rolled back
from. --to picks any release approved on the stack before.

Examples:
  rollwave rollback web site
  rollwave rollback web site --watch
  rollwave rollback web site --to 1.4.2";

const PIN_HELP: &str = "\
A pinned instance runs the given release whatever the approved one is, and
deployments of the bundle skip it until it is unpinned. Use it to try a release
on a few instances, or to hold one back. --count and --percent take instances in
id order.

Examples:
  rollwave pin web site@1.5.0-rc1 --instances i-0a1b,i-0c2d
  rollwave pin web site@1.5.0-rc1 --count 2
  rollwave pin web site@1.4.1 --percent 10";

const UNPIN_HELP: &str = "\
Unpinned instances go back to the bundle's approved release at once.

Examples:
  rollwave unpin web site --instances i-0a1b
  rollwave unpin web site";

const STATUS_HELP: &str = "\
For every bundle: the approved version, how many instances run which
version, the running deployment, and every instance that differs: drift
(runs another version), pinned, deploying, missing (runs none; \"install
failing since T: reason\" while its agent cannot install the approved
release), or not healthy: unhealthy (with its health check's detail and
since when), unknown (no verdict yet, or not online) or stale (its agent
sent no verdict for 3 check intervals). RESTARTS counts restarts of the
running release's app and says why it last exited. --output json lists
every instance, with `health` (healthy|unhealthy|unknown|stale) beside the
boolean `healthy`.

Without a stack, one line per stack and bundle, with how many instances differ.

Examples:
  rollwave status
  rollwave status web
  rollwave status web --all
  rollwave status web --output json";

const EVENT_HELP: &str = "\
Every operator action and every deployment outcome: the newest --limit events
that pass the filters, oldest first, like the tail of a log. The coordinator
filters; each filter given must match.

Examples:
  rollwave event list
  rollwave event list --stack web --since 2h
  rollwave event list --instance i-0a1b2c --since 2026-12-06T03:00:00Z
  rollwave event list --operator alice --limit 500 --output json";

/// A release named on the command line: `BUNDLE@VERSION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRef {
    pub bundle: String,
    pub version: String,
}

/// Why a string is not `BUNDLE@VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReleaseRef {
    #[error("{input:?} names no version: write BUNDLE@VERSION, such as site@1.4.2")]
    MissingVersion { input: String },
    #[error("{input:?} is not BUNDLE@VERSION: {problem}")]
    Name {
        input: String,
        problem: rollwave_release::NameError,
    },
}

impl FromStr for ReleaseRef {
    type Err = InvalidReleaseRef;

    /// Splits at the first `@`; neither bundle names nor versions may contain one.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let Some((bundle, version)) = input.split_once('@') else {
            return Err(InvalidReleaseRef::MissingVersion { input: input.into() });
        };
        let name_error = |problem| InvalidReleaseRef::Name {
            input: input.into(),
            problem,
        };
        rollwave_release::validate_bundle_name(bundle).map_err(name_error)?;
        rollwave_release::validate_version(version).map_err(name_error)?;
        Ok(ReleaseRef {
            bundle: bundle.into(),
            version: version.into(),
        })
    }
}

impl std::fmt::Display for ReleaseRef {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}@{}", self.bundle, self.version)
    }
}

fn parse_release_ref(input: &str) -> Result<ReleaseRef, InvalidReleaseRef> {
    input.parse()
}

/// Checked here with the coordinator's own rule, so a typo is a usage error before anything is sent.
fn parse_amount(input: &str) -> Result<Amount, InvalidAmount> {
    input.parse()
}

/// How a deployment reaches its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    /// A canary, then zone by zone in batches, above the minimum-healthy floor
    Rolling,
    /// Every target in one wave; no minimum-healthy floor
    AllAtOnce,
}

impl StrategyArg {
    fn as_str(self) -> &'static str {
        match self {
            StrategyArg::Rolling => "rolling",
            StrategyArg::AllAtOnce => "all-at-once",
        }
    }
}

// A flag given twice takes its last value, so scripts can append overrides to a base command line.
#[derive(Debug, Args)]
#[command(after_help = DEPLOY_HELP, args_override_self = true)]
pub struct DeployArgs {
    /// The stack to deploy to
    pub stack: String,
    /// The registered release to deploy, such as site@1.4.2
    #[arg(value_name = "BUNDLE@VERSION", value_parser = parse_release_ref)]
    pub release: ReleaseRef,
    /// How the deployment reaches its targets
    #[arg(long, value_enum, default_value = "rolling")]
    pub strategy: StrategyArg,
    /// Instances in the first wave, which tries the release on its own [default: 1]
    #[arg(long, value_name = "N")]
    pub canary: Option<u32>,
    /// Instances per wave: a count, or a share of the zone's instances (at least 1) [default: 25%]
    #[arg(long, value_name = "N|P%", value_parser = parse_amount)]
    pub batch: Option<Amount>,
    /// Healthy instances every wave keeps in service: a count, or a share of the stack [default: 75%]
    #[arg(long, value_name = "N|P%", value_parser = parse_amount)]
    pub min_healthy: Option<Amount>,
    /// Failed instances tolerated: a count, or a share of the targets; one more fails the deployment [default: 0]
    #[arg(long, value_name = "N|P%", value_parser = parse_amount)]
    pub failure_threshold: Option<Amount>,
    /// How long to keep watching a settled wave before the next one starts [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub bake: Option<Duration>,
    /// How long an instance must stay healthy, without interruption, to be done [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub min_healthy_time: Option<Duration>,
    /// How long after switching an instance may take to be done before it counts as failed [default: 5m]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub healthy_deadline: Option<Duration>,
    /// How long the deployment may go without progress (paused time aside) before it fails [default: 10m]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub progress_deadline: Option<Duration>,
    /// When the deployment fails, leave switched instances on the new release instead of switching them back
    #[arg(long)]
    pub no_rollback: bool,
    /// Drain each instance from the stack's load balancer before it switches, return it once healthy
    /// [default: on for rolling deployments when the stack has a traffic provider, see `rollwave traffic`]
    #[arg(long, conflicts_with = "no_drain")]
    pub drain: bool,
    /// Switch instances while they take traffic, even when the stack has a traffic provider
    #[arg(long)]
    pub no_drain: bool,
    /// Only show the waves it would run (and what it would skip); start nothing
    #[arg(long, conflicts_with = "watch")]
    pub plan: bool,
    /// Follow the deployment until it ends; exit 1 unless it succeeds
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, Subcommand)]
pub enum DeploymentCommand {
    /// List deployments: id, stack, release, status, phase
    #[command(after_help = DEPLOYMENT_HELP)]
    List {
        /// Only this stack
        #[arg(long)]
        stack: Option<String>,
    },
    /// Show a deployment: every wave, every instance's state and detail, the failures
    #[command(after_help = DEPLOYMENT_HELP)]
    Show { id: String },
    /// Follow a deployment until it ends; exit 0 if it succeeded, 1 if it failed or was aborted
    #[command(after_help = WATCH_HELP)]
    Watch { id: String },
    /// Hold a running deployment: no instance is asked anything new until it is resumed
    #[command(after_help = DEPLOYMENT_HELP)]
    Pause { id: String },
    /// Let a paused deployment go on; the time it was paused does not count against its deadlines
    #[command(after_help = DEPLOYMENT_HELP)]
    Resume { id: String },
    /// Stop a deployment and switch the instances it switched back to the previous release
    #[command(after_help = DEPLOYMENT_HELP)]
    Abort { id: String },
}

#[derive(Debug, Args)]
#[command(after_help = ROLLBACK_HELP)]
pub struct RollbackArgs {
    /// The stack to roll back
    pub stack: String,
    /// The bundle whose previous approved release comes back
    pub bundle: String,
    /// Return to this release (one approved on the stack before) instead of the previous one
    #[arg(long, value_name = "VERSION")]
    pub to: Option<String>,
    /// Follow the rollback until it ends; exit 1 unless it succeeds
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, Args)]
#[command(after_help = PIN_HELP)]
#[command(group(ArgGroup::new("which").required(true).args(["instances", "count", "percent"])))]
pub struct PinArgs {
    /// The stack the instances belong to
    pub stack: String,
    /// The registered release they run while pinned, such as site@1.4.1
    #[arg(value_name = "BUNDLE@VERSION", value_parser = parse_release_ref)]
    pub release: ReleaseRef,
    /// These instances, comma-separated
    #[arg(long, value_name = "ID,ID...", value_delimiter = ',', num_args = 1..)]
    pub instances: Vec<String>,
    /// This many instances of the stack
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub count: Option<u32>,
    /// This percentage of the stack's instances, rounded up
    #[arg(long, value_name = "P", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub percent: Option<u32>,
}

#[derive(Debug, Args)]
#[command(after_help = UNPIN_HELP)]
pub struct UnpinArgs {
    /// The stack the instances belong to
    pub stack: String,
    /// The bundle to unpin
    pub bundle: String,
    /// Only these instances, comma-separated [default: every pinned instance of the bundle]
    #[arg(long, value_name = "ID,ID...", value_delimiter = ',', num_args = 1..)]
    pub instances: Vec<String>,
}

#[derive(Debug, Args)]
#[command(after_help = STATUS_HELP)]
pub struct StatusArgs {
    /// The stack [default: an overview of every stack]
    pub stack: Option<String>,
    /// List every instance, not only those that differ
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// List the newest audit events, oldest first
    #[command(after_help = EVENT_HELP)]
    List {
        /// How many events, at most
        #[arg(long, default_value_t = DEFAULT_EVENT_LIMIT)]
        limit: u32,
        /// Only events about this stack (its instances, deployments, tokens, pins, traffic)
        #[arg(long)]
        stack: Option<String>,
        /// Only events about this instance
        #[arg(long, value_name = "ID")]
        instance: Option<String>,
        /// Only what this operator did
        #[arg(long, value_name = "NAME")]
        operator: Option<String>,
        /// Only events since then: a duration back from now (30m, 2h, 7days) or an RFC 3339 time
        #[arg(long, value_name = "DURATION|TIME", value_parser = parse_since)]
        since: Option<SystemTime>,
    },
}

/// `--since`: "2h" means two hours ago; "2026-12-06T03:00:00Z" (or without the zone, UTC) that time.
fn parse_since(text: &str) -> Result<SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{text} ago is before the start of time"));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!("{text:?} is neither a duration (such as 30m or 2h) nor a time (such as 2026-12-06T03:00:00Z)")
    })
}

/// The JSON of `pin`.
#[derive(Debug, Serialize)]
struct PinView {
    stack: String,
    bundle: String,
    version: String,
    pinned: Vec<String>,
}

/// The JSON of `unpin`.
#[derive(Debug, Serialize)]
struct UnpinView {
    stack: String,
    bundle: String,
    unpinned: Vec<String>,
}

/// `rollwave deploy`: plan, start, and perhaps watch.
pub async fn deploy(client: &mut OperatorClient, args: DeployArgs, format: OutputFormat) -> anyhow::Result<()> {
    let options = deployment_options(&args)?;
    let ReleaseRef { bundle, version } = args.release.clone();
    let response = client
        .create_deployment(pb::CreateDeploymentRequest {
            stack: args.stack.clone(),
            bundle,
            version,
            options: Some(options),
            plan_only: args.plan,
        })
        .await
        .map_err(call_error)?
        .into_inner();
    if args.plan {
        let plan = PlanView::from(response.plan.unwrap_or_default());
        return match format {
            OutputFormat::Json => print_item(format, &plan),
            OutputFormat::Table => {
                out!("{}", render_plan(&args.stack, &args.release, &plan))?;
                Ok(())
            }
        };
    }
    let deployment = DeploymentView::from(
        response
            .deployment
            .ok_or_else(|| anyhow!("the coordinator answered without a deployment"))?,
    );
    started(client, deployment, args.watch, format).await
}

/// The options as sent: only what the operator gave, so the coordinator applies its defaults to the rest.
/// Refuses rolling-only flags with all at once.
pub fn deployment_options(args: &DeployArgs) -> anyhow::Result<pb::DeploymentOptions> {
    if args.strategy == StrategyArg::AllAtOnce {
        let rolling_only = [
            ("--canary", args.canary.is_some()),
            ("--batch", args.batch.is_some()),
            ("--min-healthy", args.min_healthy.is_some()),
        ];
        if let Some((flag, _)) = rolling_only.iter().find(|(_, given)| *given) {
            return Err(anyhow!(
                "{flag} does not apply to --strategy all-at-once, which switches every target in one wave; \
                 drop {flag} or use --strategy rolling"
            ));
        }
    }
    let text = |amount: Option<Amount>| amount.map(|amount| amount.to_string()).unwrap_or_default();
    let millis =
        |duration: Option<Duration>| duration.map(|duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    Ok(pb::DeploymentOptions {
        strategy: args.strategy.as_str().into(),
        canary: args.canary,
        batch: text(args.batch),
        min_healthy: text(args.min_healthy),
        failure_threshold: text(args.failure_threshold),
        bake_ms: millis(args.bake),
        min_healthy_time_ms: millis(args.min_healthy_time),
        healthy_deadline_ms: millis(args.healthy_deadline),
        progress_deadline_ms: millis(args.progress_deadline),
        rollback_on_failure: args.no_rollback.then_some(false),
        drain: match (args.drain, args.no_drain) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
    })
}

/// After a deployment was created (by deploy or rollback): watch it, or say what started.
async fn started(
    client: &mut OperatorClient,
    deployment: DeploymentView,
    watch_it: bool,
    format: OutputFormat,
) -> anyhow::Result<()> {
    if watch_it {
        return watch(client, &deployment.id, format).await;
    }
    match format {
        OutputFormat::Json => print_item(format, &deployment),
        OutputFormat::Table => {
            let previous = deployment
                .previous_version
                .as_deref()
                .map(|version| format!(" (from {version})"))
                .unwrap_or_default();
            outln!(
                "deployment {} of {} to {}{previous}: {}",
                deployment.id,
                deployment.release(),
                deployment.stack,
                deployment.summary
            )?;
            if deployment.is_running() {
                noteln!("follow it: rollwave deployment watch {}", deployment.id);
            }
            Ok(())
        }
    }
}

/// `rollwave deployment ...`.
pub async fn deployment(
    client: &mut OperatorClient,
    command: DeploymentCommand,
    format: OutputFormat,
) -> anyhow::Result<()> {
    match command {
        DeploymentCommand::List { stack } => {
            let deployments = client
                .list_deployments(pb::ListDeploymentsRequest {
                    stack: stack.unwrap_or_default(),
                })
                .await
                .map_err(call_error)?
                .into_inner()
                .deployments;
            print_list(
                format,
                &deployments.into_iter().map(DeploymentView::from).collect::<Vec<_>>(),
            )
        }
        DeploymentCommand::Show { id } => {
            let deployment = DeploymentView::from(
                client
                    .get_deployment(pb::GetDeploymentRequest { id })
                    .await
                    .map_err(call_error)?
                    .into_inner(),
            );
            match format {
                OutputFormat::Json => print_item(format, &deployment),
                OutputFormat::Table => {
                    out!("{}", render_deployment(&deployment))?;
                    Ok(())
                }
            }
        }
        DeploymentCommand::Watch { id } => watch(client, &id, format).await,
        DeploymentCommand::Pause { id } => control(client, id, "pause", "paused", format).await,
        DeploymentCommand::Resume { id } => control(client, id, "resume", "resumed", format).await,
        DeploymentCommand::Abort { id } => control(client, id, "abort", "aborting", format).await,
    }
}

async fn control(
    client: &mut OperatorClient,
    id: String,
    action: &str,
    done: &str,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let deployment = DeploymentView::from(
        client
            .control_deployment(pb::ControlDeploymentRequest {
                id,
                action: action.into(),
            })
            .await
            .map_err(call_error)?
            .into_inner(),
    );
    match format {
        OutputFormat::Json => print_item(format, &deployment),
        OutputFormat::Table => {
            outln!("{done} deployment {}: {}", deployment.id, deployment.summary)?;
            Ok(())
        }
    }
}

/// `rollwave rollback STACK BUNDLE`.
pub async fn rollback(client: &mut OperatorClient, args: RollbackArgs, format: OutputFormat) -> anyhow::Result<()> {
    let deployment = DeploymentView::from(
        client
            .rollback_stack(pb::RollbackStackRequest {
                stack: args.stack,
                bundle: args.bundle,
                to_version: args.to.unwrap_or_default(),
            })
            .await
            .map_err(call_error)?
            .into_inner(),
    );
    started(client, deployment, args.watch, format).await
}

/// `rollwave pin STACK BUNDLE@VERSION ...`.
pub async fn pin(client: &mut OperatorClient, args: PinArgs, format: OutputFormat) -> anyhow::Result<()> {
    let ReleaseRef { bundle, version } = args.release.clone();
    let pinned = client
        .pin(pb::PinRequest {
            stack: args.stack.clone(),
            bundle: bundle.clone(),
            version: version.clone(),
            instances: args.instances,
            count: args.count,
            percent: args.percent,
        })
        .await
        .map_err(call_error)?
        .into_inner()
        .pinned;
    match format {
        OutputFormat::Json => print_item(
            format,
            &PinView {
                stack: args.stack,
                bundle,
                version,
                pinned,
            },
        ),
        OutputFormat::Table => {
            if pinned.is_empty() {
                outln!("no instance of {} was pinned", args.stack)?;
            } else {
                outln!(
                    "pinned {} of {} to {}: {}",
                    count_of(pinned.len(), "instance", "instances"),
                    args.stack,
                    args.release,
                    pinned.join(", ")
                )?;
            }
            Ok(())
        }
    }
}

/// `rollwave unpin STACK BUNDLE [--instances ...]`.
pub async fn unpin(client: &mut OperatorClient, args: UnpinArgs, format: OutputFormat) -> anyhow::Result<()> {
    let unpinned = client
        .unpin(pb::UnpinRequest {
            stack: args.stack.clone(),
            bundle: args.bundle.clone(),
            instances: args.instances,
        })
        .await
        .map_err(call_error)?
        .into_inner()
        .unpinned;
    match format {
        OutputFormat::Json => print_item(
            format,
            &UnpinView {
                stack: args.stack,
                bundle: args.bundle,
                unpinned,
            },
        ),
        OutputFormat::Table => {
            if unpinned.is_empty() {
                outln!("no instance of {} was pinned for {}", args.stack, args.bundle)?;
            } else {
                let returns = if unpinned.len() == 1 {
                    "it returns"
                } else {
                    "they return"
                };
                outln!(
                    "unpinned {} of {} for {}: {}; {returns} to the approved release",
                    count_of(unpinned.len(), "instance", "instances"),
                    args.stack,
                    args.bundle,
                    unpinned.join(", ")
                )?;
            }
            Ok(())
        }
    }
}

/// `rollwave status [STACK]`.
pub async fn status(client: &mut OperatorClient, args: StatusArgs, format: OutputFormat) -> anyhow::Result<()> {
    let Some(stack) = args.stack else {
        return overview(client, format).await;
    };
    let status = StackStatusView::from(
        client
            .get_stack_status(pb::GetStackStatusRequest { stack })
            .await
            .map_err(call_error)?
            .into_inner(),
    );
    match format {
        OutputFormat::Json => print_item(format, &status),
        OutputFormat::Table => {
            out!("{}", render_status(&status, args.all, SystemTime::now()))?;
            Ok(())
        }
    }
}

/// `rollwave status` without a stack: every stack, a line per bundle.
async fn overview(client: &mut OperatorClient, format: OutputFormat) -> anyhow::Result<()> {
    let stacks = client
        .list_stacks(pb::ListStacksRequest {})
        .await
        .map_err(call_error)?
        .into_inner()
        .stacks;
    let mut statuses = Vec::with_capacity(stacks.len());
    for stack in stacks {
        let status = client
            .get_stack_status(pb::GetStackStatusRequest { stack: stack.name })
            .await
            .map_err(call_error)?
            .into_inner();
        statuses.push(StackStatusView::from(status));
    }
    match format {
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&statuses)?),
        OutputFormat::Table => out!("{}", render_overview(&statuses)),
    }
}

/// Every stack in a few lines: its bundles and how many instances differ, for `status` without a stack.
fn render_overview(statuses: &[StackStatusView]) -> String {
    if statuses.is_empty() {
        return "no stacks yet: create one with `rollwave stack create NAME`\n".to_owned();
    }
    let mut out = String::new();
    for status in statuses {
        let _ = writeln!(out, "{}", status.stack);
        if status.bundles.is_empty() {
            out.push_str("  no bundle is approved or running yet\n");
        }
        for bundle in &status.bundles {
            let differing = bundle.instances.iter().filter(|instance| instance.differs()).count();
            let differ = match differing {
                0 => String::new(),
                1 => "; 1 differs".to_owned(),
                count => format!("; {count} differ"),
            };
            let _ = writeln!(out, "  {}{differ}", bundle_line(bundle));
        }
        if !status.out_of_service.is_empty() {
            let _ = writeln!(
                out,
                "  out of the load balancer: {}",
                count_of(status.out_of_service.len(), "instance", "instances")
            );
        }
    }
    out.push_str("\nper instance: rollwave status STACK\n");
    out
}

/// `rollwave event list`.
pub async fn event(client: &mut OperatorClient, command: EventCommand, format: OutputFormat) -> anyhow::Result<()> {
    match command {
        EventCommand::List {
            limit,
            stack,
            instance,
            operator,
            since,
        } => {
            let events = client
                .list_events(pb::ListEventsRequest {
                    limit,
                    stack: stack.unwrap_or_default(),
                    instance: instance.unwrap_or_default(),
                    actor: operator.unwrap_or_default(),
                    since_unix_ms: since.map(crate::model::unix_ms).unwrap_or_default(),
                })
                .await
                .map_err(call_error)?
                .into_inner()
                .events;
            print_list(format, &events.into_iter().map(EventView::from).collect::<Vec<_>>())
        }
    }
}

/// Polls a deployment until it is no longer running, showing progress on stderr; the result is its outcome.
async fn watch(client: &mut OperatorClient, id: &str, format: OutputFormat) -> anyhow::Result<()> {
    let mut progress = Progress::new(std::io::stderr().is_terminal());
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unreachable_since: Option<Instant> = None;
    let last = loop {
        ticker.tick().await;
        let response = client
            .get_deployment(pb::GetDeploymentRequest { id: id.to_owned() })
            .await;
        let deployment = match response {
            Ok(response) => {
                if unreachable_since.take().is_some() {
                    progress.note("the coordinator answers again");
                }
                DeploymentView::from(response.into_inner())
            }
            // The coordinator may be restarting; it resumes running deployments, so keep asking for a while.
            Err(status) if status.code() == tonic::Code::Unavailable => {
                match unreachable_since {
                    None => {
                        unreachable_since = Some(Instant::now());
                        progress.note(&format!(
                            "the coordinator does not answer ({}); trying again for up to {}",
                            status.message(),
                            humantime::format_duration(UNREACHABLE_GRACE)
                        ));
                    }
                    Some(since) if since.elapsed() >= UNREACHABLE_GRACE => {
                        return Err(call_error(status).context(format!(
                            "stopped watching deployment {id}: the coordinator did not answer for {}; \
                             the deployment itself goes on, watch it again with `rollwave deployment watch {id}`",
                            humantime::format_duration(UNREACHABLE_GRACE)
                        )));
                    }
                    Some(_) => {}
                }
                continue;
            }
            Err(status) => return Err(call_error(status)),
        };
        progress.show(&deployment);
        if !deployment.is_running() {
            break deployment;
        }
    };
    match format {
        OutputFormat::Json => print_item(format, &last)?,
        // A failure is told once, by the error (with its reason) that sets the exit code.
        OutputFormat::Table if last.status == "succeeded" => outln!("{}", status_line(&last))?,
        OutputFormat::Table => {}
    }
    outcome(&last)
}

/// Succeeded is success; anything else that is not running is an error carrying the reason.
fn outcome(deployment: &DeploymentView) -> anyhow::Result<()> {
    if deployment.status == "succeeded" {
        return Ok(());
    }
    let why = deployment.reason.as_deref().unwrap_or(&deployment.summary);
    Err(anyhow!(
        "deployment {} {}: {why}; see `rollwave deployment show {}`",
        deployment.id,
        deployment.status,
        deployment.id
    ))
}

/// Live progress on stderr: a redrawn block on a terminal, change lines elsewhere.
struct Progress {
    terminal: bool,
    /// The block on screen, to move back over it (and to skip identical redraws).
    drawn: Vec<String>,
    previous: Option<DeploymentView>,
}

impl Progress {
    fn new(terminal: bool) -> Self {
        Self {
            terminal,
            drawn: Vec::new(),
            previous: None,
        }
    }

    fn show(&mut self, deployment: &DeploymentView) {
        let text = if self.terminal {
            let block = progress_block(deployment);
            if block == self.drawn {
                return;
            }
            let text = redraw(self.drawn.len(), &block);
            self.drawn = block;
            text
        } else {
            change_lines(self.previous.as_ref(), deployment)
                .into_iter()
                .map(|line| line + "\n")
                .collect()
        };
        self.previous = Some(deployment.clone());
        write_stderr(&text);
    }

    /// A line outside the block; the next block is drawn below it.
    fn note(&mut self, text: &str) {
        self.drawn.clear();
        write_stderr(&format!("{text}\n"));
    }
}

/// Moves up over the `drawn_lines` of the previous block, clears to the end of the screen and prints `block`.
/// Line wrapping is off while it prints, so that every line takes one row and the next redraw finds the top.
fn redraw(drawn_lines: usize, block: &[String]) -> String {
    let mut text = String::new();
    if drawn_lines > 0 {
        let _ = write!(text, "\x1b[{drawn_lines}A");
    }
    text.push_str("\r\x1b[J\x1b[?7l");
    for line in block {
        text.push_str(line);
        text.push('\n');
    }
    text.push_str("\x1b[?7h");
    text
}

/// "3 settled, 1 activating", in lifecycle order.
fn count_states<'a>(states: impl Iterator<Item = &'a str>) -> String {
    let mut counts: BTreeMap<(usize, &str), usize> = BTreeMap::new();
    for state in states {
        let rank = STATE_ORDER
            .iter()
            .position(|known| *known == state)
            .unwrap_or(STATE_ORDER.len());
        *counts.entry((rank, state)).or_default() += 1;
    }
    counts
        .iter()
        .map(|((_, state), count)| format!("{count} {state}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a failure entry already says what `detail` says, so it need not be shown twice.
fn covered_by_failures(detail: &str, failures: &[String]) -> bool {
    failures.iter().any(|failure| failure.contains(detail))
}

/// "The first line" and the continuation lines of a multi-line text, each prefixed for indentation.
fn indented_lines(text: &str, first_prefix: &str, rest_prefix: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .map(|(index, line)| {
            let prefix = if index == 0 { first_prefix } else { rest_prefix };
            format!("{prefix}{line}").trim_end().to_owned()
        })
        .collect()
}

/// The plan of `deploy --plan` for people.
fn render_plan(stack: &str, release: &ReleaseRef, plan: &PlanView) -> String {
    struct WaveRow {
        number: usize,
        kind: String,
        zone: String,
        instances: Vec<String>,
    }
    impl Tabular for WaveRow {
        const HEADERS: &'static [&'static str] = &["WAVE", "KIND", "ZONE", "INSTANCES"];
        fn row(&self) -> Vec<String> {
            vec![
                self.number.to_string(),
                self.kind.clone(),
                self.zone.clone(),
                self.instances.join(", "),
            ]
        }
    }
    struct SkippedRow<'a>(&'a str, &'a str);
    impl Tabular for SkippedRow<'_> {
        const HEADERS: &'static [&'static str] = &["SKIPPED", "REASON"];
        fn row(&self) -> Vec<String> {
            vec![self.0.to_owned(), self.1.to_owned()]
        }
    }

    let mut out = String::new();
    let targets: usize = plan.waves.iter().map(|wave| wave.instances.len()).sum();
    if plan.waves.is_empty() {
        let _ = writeln!(
            out,
            "plan for {release} on {stack}: no instance to update; starting it would approve {release} at once, \
             for instances that join later"
        );
    } else {
        let _ = writeln!(
            out,
            "plan for {release} on {stack}: {} in {}",
            count_of(targets, "instance", "instances"),
            count_of(plan.waves.len(), "wave", "waves")
        );
        let rows: Vec<WaveRow> = plan
            .waves
            .iter()
            .enumerate()
            .map(|(index, wave)| WaveRow {
                number: index + 1,
                kind: wave.kind.clone(),
                zone: wave.zone.clone().unwrap_or_else(|| "-".into()),
                instances: wave.instances.clone(),
            })
            .collect();
        out.push_str(&table(&rows));
    }
    if !plan.skipped.is_empty() {
        out.push('\n');
        let rows: Vec<SkippedRow<'_>> = plan
            .skipped
            .iter()
            .map(|skipped| SkippedRow(&skipped.instance_id, &skipped.reason))
            .collect();
        out.push_str(&table(&rows));
    }
    out.push('\n');
    if plan.min_healthy == 0 {
        let _ = writeln!(
            out,
            "min healthy: no floor; a wave may take any of the {} healthy instances out of service",
            plan.healthy_total
        );
    } else {
        let _ = writeln!(
            out,
            "min healthy: every wave keeps at least {} of the {} healthy instances in service",
            plan.min_healthy, plan.healthy_total
        );
    }
    if plan.drain.is_empty() {
        let _ = writeln!(out, "drain: none");
    }
    for line in &plan.drain {
        let _ = writeln!(out, "drain: {line}");
    }
    out
}

/// An instance's state with where it stands with the load balancer, when that says more: "activated, drained".
fn shown_state(instance: &DeploymentInstanceView) -> String {
    match &instance.traffic {
        Some(traffic) if *traffic != instance.state => format!("{}, {traffic}", instance.state),
        _ => instance.state.clone(),
    }
}

/// `deployment show` for people: the header, every wave with each instance's state and detail, the failures.
fn render_deployment(deployment: &DeploymentView) -> String {
    let mut out = String::new();
    let previous = deployment
        .previous_version
        .as_deref()
        .map(|version| format!(" (previous {version})"))
        .unwrap_or_default();
    let status = if deployment.paused {
        format!("{}, paused", deployment.status)
    } else {
        deployment.status.clone()
    };
    let mut fields = vec![
        ("deployment", deployment.id.clone()),
        (
            "release",
            format!("{} on {}{previous}", deployment.release(), deployment.stack),
        ),
        ("status", status),
        ("phase", deployment.phase.clone()),
        ("summary", deployment.summary.clone()),
    ];
    if let Some(reason) = &deployment.reason {
        fields.push(("reason", reason.clone()));
    }
    fields.push((
        "created",
        format!("{} by {}", deployment.created_at, deployment.created_by),
    ));
    fields.push(("updated", deployment.updated_at.clone()));
    for (key, value) in fields {
        for line in indented_lines(&value, &format!("{key:<10}  "), &" ".repeat(12)) {
            let _ = writeln!(out, "{line}");
        }
    }
    let id_width = deployment
        .instances()
        .map(|instance| instance.instance_id.chars().count())
        .max()
        .unwrap_or(0);
    let state_width = deployment
        .instances()
        .map(|instance| shown_state(instance).chars().count())
        .max()
        .unwrap_or(0);
    let wave_count = deployment.waves.len();
    for (index, wave) in deployment.waves.iter().enumerate() {
        let _ = writeln!(out, "\nwave {}/{wave_count} {}", index + 1, wave.label());
        for instance in &wave.instances {
            let head = format!(
                "  {:<id_width$}  {:<state_width$}  ",
                instance.instance_id,
                shown_state(instance)
            );
            match &instance.detail {
                None => {
                    let _ = writeln!(out, "{}", head.trim_end());
                }
                Some(detail) => {
                    let rest = format!("{}| ", " ".repeat(head.chars().count()));
                    for line in indented_lines(detail, &head, &rest) {
                        let _ = writeln!(out, "{line}");
                    }
                }
            }
        }
    }
    if !deployment.failures.is_empty() {
        let _ = writeln!(out, "\nfailures ({}):", deployment.failures.len());
        for failure in &deployment.failures {
            for line in indented_lines(failure, "  ", "    | ") {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    out
}

/// The states of a wave on one line: each instance's if they fit, else counts per state.
fn wave_states(instances: &[DeploymentInstanceView]) -> String {
    if instances.is_empty() {
        return "no instances".into();
    }
    let listed = instances
        .iter()
        .map(|instance| format!("{} {}", instance.instance_id, shown_state(instance)))
        .collect::<Vec<_>>()
        .join(", ");
    if listed.chars().count() <= WAVE_LINE_WIDTH {
        listed
    } else {
        count_states(instances.iter().map(|instance| instance.state.as_str()))
    }
}

/// The first wave with an instance still moving: where a running deployment is.
fn current_wave(deployment: &DeploymentView) -> Option<usize> {
    if !deployment.is_running() {
        return None;
    }
    deployment.waves.iter().position(|wave| {
        wave.instances
            .iter()
            .any(|instance| !FINAL_STATES.contains(&instance.state.as_str()))
    })
}

/// The live block of a watch on a terminal, one entry per line.
fn progress_block(deployment: &DeploymentView) -> Vec<String> {
    let mut lines = Vec::new();
    let previous = deployment
        .previous_version
        .as_deref()
        .map(|version| format!(" (from {version})"))
        .unwrap_or_default();
    lines.push(format!(
        "deployment {}: {} to {}{previous}",
        deployment.id,
        deployment.release(),
        deployment.stack
    ));

    let total = deployment.instances().count();
    let settled = deployment
        .instances()
        .filter(|instance| instance.state == "settled")
        .count();
    let failed = deployment
        .instances()
        .filter(|instance| FAILED_STATES.contains(&instance.state.as_str()))
        .count();
    // An empty deployment has nothing left to do: a full bar.
    let filled = (settled.min(total) * BAR_WIDTH).checked_div(total).unwrap_or(BAR_WIDTH);
    let mut bar = format!(
        "[{}{}] {settled}/{total} settled",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled)
    );
    if failed > 0 {
        let _ = write!(bar, ", {failed} failed");
    }
    let _ = write!(bar, "  {}", deployment.phase);
    if deployment.paused {
        bar.push_str(" (paused)");
    }
    if !deployment.is_running() && deployment.status != deployment.phase {
        let _ = write!(bar, "  {}", deployment.status);
    }
    lines.push(bar);
    lines.push(deployment.summary.clone());

    let wave_count = deployment.waves.len();
    let current = current_wave(deployment);
    let label_width = deployment
        .waves
        .iter()
        .map(|wave| wave.label().chars().count())
        .max()
        .unwrap_or(0);
    let number_width = format!("{wave_count}/{wave_count}").len();
    let first_shown = match current {
        Some(current) if wave_count > MAX_WAVE_LINES => current.saturating_sub(2).min(wave_count - MAX_WAVE_LINES),
        Some(_) => 0,
        None => wave_count.saturating_sub(MAX_WAVE_LINES),
    };
    let last_shown = (first_shown + MAX_WAVE_LINES).min(wave_count);
    if first_shown > 0 {
        lines.push(format!(
            "  ... {}",
            count_of(first_shown, "earlier wave", "earlier waves")
        ));
    }
    for (index, wave) in deployment.waves.iter().enumerate().take(last_shown).skip(first_shown) {
        let marker = if current == Some(index) { '>' } else { ' ' };
        let number = format!("{}/{wave_count}", index + 1);
        lines.push(format!(
            "{marker} {number:<number_width$} {:<label_width$}  {}",
            wave.label(),
            wave_states(&wave.instances)
        ));
    }
    if last_shown < wave_count {
        lines.push(format!(
            "  ... {}",
            count_of(wave_count - last_shown, "more wave", "more waves")
        ));
    }

    let notes = failure_notes(deployment);
    if !notes.is_empty() {
        lines.push("failures:".into());
        let hidden = notes.len().saturating_sub(MAX_FAILURES_SHOWN);
        if hidden > 0 {
            lines.push(format!(
                "  ... {} (rollwave deployment show {})",
                count_of(hidden, "earlier failure", "earlier failures"),
                deployment.id
            ));
        }
        for note in &notes[hidden..] {
            let mut note_lines = note.lines();
            lines.push(format!("  {}", note_lines.next().unwrap_or_default()));
            let rest: Vec<&str> = note_lines.collect();
            let cut = rest.len().saturating_sub(MAX_DETAIL_LINES);
            if cut > 0 {
                lines.push(format!("    | ... {}", count_of(cut, "line", "lines")));
            }
            lines.extend(
                rest[cut..]
                    .iter()
                    .map(|line| format!("    | {line}").trim_end().to_owned()),
            );
        }
    }
    lines
}

/// What the live block lists under "failures": each failure entry, or the failed instance's detail instead when
/// that says more (hook output, say), then the details of failed instances no entry mentions.
fn failure_notes(deployment: &DeploymentView) -> Vec<String> {
    let details: Vec<(String, &str)> = deployment
        .instances()
        .filter(|instance| FAILED_STATES.contains(&instance.state.as_str()))
        .filter_map(|instance| {
            let detail = instance.detail.as_deref()?;
            Some((format!("{}: {detail}", instance.instance_id), detail))
        })
        .collect();
    let mut used = vec![false; details.len()];
    let mut notes = Vec::new();
    for failure in &deployment.failures {
        let richer = details
            .iter()
            .enumerate()
            .position(|(index, (note, _))| !used[index] && note != failure && note.contains(failure.as_str()));
        match richer {
            Some(index) => {
                used[index] = true;
                notes.push(details[index].0.clone());
            }
            None => notes.push(failure.clone()),
        }
    }
    for (index, (note, detail)) in details.iter().enumerate() {
        if !used[index] && !covered_by_failures(detail, &deployment.failures) {
            notes.push(note.clone());
        }
    }
    notes
}

/// What changed between two snapshots of a deployment, as plain lines (for logs and pipes).
/// Without a previous snapshot: what it is and where it stands.
fn change_lines(previous: Option<&DeploymentView>, current: &DeploymentView) -> Vec<String> {
    let mut lines = Vec::new();
    let wave_count = current.waves.len();
    let Some(previous) = previous else {
        let from = current
            .previous_version
            .as_deref()
            .map(|version| format!(" (from {version})"))
            .unwrap_or_default();
        lines.push(format!(
            "deployment {}: {} to {}{from}, {} in {}",
            current.id,
            current.release(),
            current.stack,
            count_of(current.instances().count(), "instance", "instances"),
            count_of(wave_count, "wave", "waves")
        ));
        if current.is_running() {
            lines.push(current.summary.clone());
        }
        if current.paused {
            lines.push("paused".into());
        }
        for failure in &current.failures {
            lines.extend(indented_lines(failure, "failure: ", "    | "));
        }
        if !current.is_running() {
            lines.extend(ending_lines(current));
        }
        return lines;
    };

    let ended = previous.is_running() && !current.is_running();
    // The ending line says how it ended; a phase line saying the same would be noise.
    if current.phase != previous.phase && !ended {
        lines.push(format!("phase: {}", current.phase));
    }
    if current.paused != previous.paused {
        lines.push(if current.paused { "paused" } else { "resumed" }.into());
    }
    let before: HashMap<&str, &DeploymentInstanceView> = previous
        .instances()
        .map(|instance| (instance.instance_id.as_str(), instance))
        .collect();
    for (index, wave) in current.waves.iter().enumerate() {
        for instance in &wave.instances {
            let unchanged = before
                .get(instance.instance_id.as_str())
                .is_some_and(|earlier| earlier.state == instance.state);
            if unchanged {
                continue;
            }
            let head = format!(
                "wave {}/{wave_count} {}: {} {}",
                index + 1,
                wave.label(),
                instance.instance_id,
                instance.state
            );
            // A detail a failure entry carries is printed once, with the failure.
            match &instance.detail {
                Some(detail) if !covered_by_failures(detail, &current.failures) => {
                    lines.extend(indented_lines(detail, &format!("{head}: "), "    | "));
                }
                _ => lines.push(head),
            }
        }
    }
    for failure in current.failures.iter().skip(previous.failures.len()) {
        lines.extend(indented_lines(failure, "failure: ", "    | "));
    }
    if ended {
        lines.extend(ending_lines(current));
    }
    lines
}

/// How a deployment ended: its summary, and its reason unless the summary already says it.
fn ending_lines(deployment: &DeploymentView) -> Vec<String> {
    let mut lines = vec![status_line(deployment)];
    if let Some(reason) = &deployment.reason
        && !deployment.summary.contains(reason.as_str())
    {
        lines.extend(indented_lines(reason, "reason: ", "    | "));
    }
    lines
}

/// "deployment d-4f2a succeeded: 6 of 6 instances on the release", without repeating the status when the
/// summary starts with it.
fn status_line(deployment: &DeploymentView) -> String {
    if deployment.summary.starts_with(&deployment.status) {
        format!("deployment {} {}", deployment.id, deployment.summary)
    } else {
        format!(
            "deployment {} {}: {}",
            deployment.id, deployment.status, deployment.summary
        )
    }
}

/// "2.0 ×5, 1.0 ×1": instances per running version, most common first; "(none)" for instances running none.
fn running_histogram(running: &BTreeMap<String, u32>) -> String {
    let mut versions: Vec<(&String, &u32)> = running.iter().filter(|(_, count)| **count > 0).collect();
    if versions.is_empty() {
        return "no instances".into();
    }
    versions.sort_by(|left, right| right.1.cmp(left.1).then_with(|| left.0.cmp(right.0)));
    versions
        .iter()
        .map(|(version, count)| {
            let version = if version.is_empty() { "(none)" } else { version.as_str() };
            format!("{version} ×{count}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// "healthy", "unhealthy since 3m ago: GET /health returned 503", "unknown: no health verdict
/// yet", "stale: its agent sent no verdict for 3 check intervals".
fn health_cell(instance: &InstanceStatusView, now: SystemTime) -> String {
    match instance.health.as_str() {
        "healthy" => return "healthy".into(),
        "stale" => return "stale: its agent sent no verdict for 3 check intervals".into(),
        "unknown" if instance.health_since_ms == 0 => return "unknown: no health verdict yet".into(),
        "unknown" => return format!("unknown ({})", instance.presence),
        _ => {}
    }
    let mut cell = String::from("unhealthy");
    if instance.health_since_ms > 0 {
        let _ = write!(cell, " since {}", ago_at(instance.health_since_ms, now));
    }
    if let Some(detail) = &instance.health_detail {
        let _ = write!(cell, ": {}", detail.lines().next().unwrap_or_default());
    }
    cell
}

/// "0", or "3; last exit 2m ago: exited with code 1".
fn restarts_cell(instance: &InstanceStatusView, now: SystemTime) -> String {
    match &instance.last_exit {
        Some(reason) if instance.last_exit_at_ms > 0 => format!(
            "{}; last exit {}: {reason}",
            instance.app_restarts,
            ago_at(instance.last_exit_at_ms, now)
        ),
        Some(reason) => format!("{}; last exit: {reason}", instance.app_restarts),
        None => instance.app_restarts.to_string(),
    }
}

/// `rollwave status` for people, as seen at `now`.
fn render_status(status: &StackStatusView, all: bool, now: SystemTime) -> String {
    struct InstanceRow {
        cells: Vec<String>,
    }
    impl Tabular for InstanceRow {
        const HEADERS: &'static [&'static str] = &[
            "INSTANCE", "HOSTNAME", "ZONE", "PRESENCE", "VERSION", "STATE", "REASON", "HEALTH", "RESTARTS",
        ];
        fn row(&self) -> Vec<String> {
            self.cells.clone()
        }
    }

    let mut out = format!("stack {}\n", status.stack);
    if !status.duplicate_identity.is_empty() {
        let _ = writeln!(
            out,
            "\nduplicate identity ({}):",
            count_of(status.duplicate_identity.len(), "instance", "instances")
        );
        for line in &status.duplicate_identity {
            let _ = writeln!(out, "  {line}");
        }
    }
    if status.bundles.is_empty() {
        out.push_str("no bundle is approved or running yet\n");
        return out;
    }
    for bundle in &status.bundles {
        out.push('\n');
        out.push_str(&bundle_line(bundle));
        out.push('\n');
        let shown: Vec<&InstanceStatusView> = bundle
            .instances
            .iter()
            .filter(|instance| all || instance.differs())
            .collect();
        if shown.is_empty() {
            let approved = bundle.approved_version.as_deref().unwrap_or("(none)");
            let _ = match bundle.instances.len() {
                0 => writeln!(out, "  no instances"),
                1 => writeln!(out, "  its one instance runs {approved} and is healthy"),
                count => writeln!(out, "  all {count} instances run {approved} and are healthy"),
            };
            continue;
        }
        let rows: Vec<InstanceRow> = shown
            .iter()
            .map(|instance| InstanceRow {
                cells: vec![
                    instance.instance_id.clone(),
                    instance.hostname.clone(),
                    instance.zone.clone(),
                    instance.presence.clone(),
                    instance.running_version.clone().unwrap_or_else(|| "-".into()),
                    instance.state.clone(),
                    instance.reason.clone().unwrap_or_else(|| "-".into()),
                    health_cell(instance, now),
                    restarts_cell(instance, now),
                ],
            })
            .collect();
        for line in table(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !status.out_of_service.is_empty() {
        let _ = writeln!(
            out,
            "\nout of the load balancer ({}):",
            count_of(status.out_of_service.len(), "instance", "instances")
        );
        for line in &status.out_of_service {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// "site: approved 2.0; running 2.0 ×5, 1.0 ×1; deployment d-4f2a9c running".
fn bundle_line(bundle: &BundleStatusView) -> String {
    let approved = match &bundle.approved_version {
        Some(version) => format!("approved {version}"),
        None => "nothing approved".to_owned(),
    };
    let mut line = format!(
        "{}: {approved}; running {}",
        bundle.bundle,
        running_histogram(&bundle.running)
    );
    if let Some(id) = &bundle.deployment_id {
        let _ = write!(line, "; deployment {id} running");
    }
    line
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};
    use expect_test::expect;

    use super::super::{Cli, Command};
    use super::*;
    use crate::cli::output::{DeploymentWaveView, PlannedWaveView, SkippedInstanceView};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("rollwave").chain(args.iter().copied()))
    }

    fn deploy_args(args: &[&str]) -> DeployArgs {
        match parse(&[&["deploy"], args].concat())
            .expect("valid command line")
            .command
        {
            Command::Deploy(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn release_refs_name_a_bundle_and_a_version() {
        let cases = [
            ("site@1.4.2", "site@1.4.2"),
            ("chef-cookbooks@2026-11-25+g1a2b", "chef-cookbooks@2026-11-25+g1a2b"),
            (
                "site",
                r#"error: "site" names no version: write BUNDLE@VERSION, such as site@1.4.2"#,
            ),
            (
                "site@",
                r#"error: "site@" is not BUNDLE@VERSION: version "" is invalid: use 1 to 128 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit, and not "current" (the name of the active release link)"#,
            ),
            (
                "@1.0",
                r#"error: "@1.0" is not BUNDLE@VERSION: bundle name "" is invalid: use 1 to 128 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit"#,
            ),
            (
                "site@1@2",
                r#"error: "site@1@2" is not BUNDLE@VERSION: version "1@2" is invalid: use 1 to 128 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit, and not "current" (the name of the active release link)"#,
            ),
            (
                "site@current",
                r#"error: "site@current" is not BUNDLE@VERSION: version "current" is invalid: use 1 to 128 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit, and not "current" (the name of the active release link)"#,
            ),
        ];
        for (input, expected) in cases {
            let actual = match input.parse::<ReleaseRef>() {
                Ok(release) => release.to_string(),
                Err(error) => format!("error: {error}"),
            };
            assert_eq!(actual, expected, "{input}");
        }
    }

    #[test]
    fn defaults_are_left_to_the_coordinator() {
        let options = deployment_options(&deploy_args(&["web", "site@1.0"])).expect("options");
        assert_eq!(
            options,
            pb::DeploymentOptions {
                strategy: "rolling".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn given_options_are_sent_as_written() {
        let args = deploy_args(&[
            "web",
            "site@1.0",
            "--canary",
            "2",
            "--batch",
            "50%",
            "--min-healthy",
            "4",
            "--failure-threshold",
            "10%",
            "--bake",
            "5m",
            "--min-healthy-time",
            "30s",
            "--healthy-deadline",
            "1h 30m",
            "--progress-deadline",
            "2h",
            "--no-rollback",
        ]);
        let options = deployment_options(&args).expect("options");
        assert_eq!(
            options,
            pb::DeploymentOptions {
                strategy: "rolling".into(),
                canary: Some(2),
                batch: "50%".into(),
                min_healthy: "4".into(),
                failure_threshold: "10%".into(),
                bake_ms: Some(300_000),
                min_healthy_time_ms: Some(30_000),
                healthy_deadline_ms: Some(5_400_000),
                progress_deadline_ms: Some(7_200_000),
                rollback_on_failure: Some(false),
                drain: None,
            }
        );
    }

    #[test]
    fn a_repeated_flag_takes_its_last_value() {
        let args = deploy_args(&[
            "web",
            "site@1.0",
            "--min-healthy-time",
            "1s",
            "--min-healthy-time",
            "5m",
        ]);
        assert_eq!(args.min_healthy_time, Some(Duration::from_secs(300)));
    }

    #[test]
    fn rolling_flags_are_refused_with_all_at_once() {
        let args = deploy_args(&["web", "site@1.0", "--strategy", "all-at-once", "--batch", "2"]);
        let error = deployment_options(&args).expect_err("batch with all at once");
        assert!(error.to_string().starts_with("--batch does not apply"), "{error}");
        let args = deploy_args(&[
            "web",
            "site@1.0",
            "--strategy",
            "all-at-once",
            "--failure-threshold",
            "1",
        ]);
        assert_eq!(
            deployment_options(&args).expect("threshold applies").strategy,
            "all-at-once"
        );
    }

    #[test]
    fn bad_command_lines_are_usage_errors() {
        let cases: [&[&str]; 9] = [
            &["deploy", "web", "site"],
            &["deploy", "web", "site@1.0", "--batch", "25 %"],
            &["deploy", "web", "site@1.0", "--batch", "0%"],
            &["deploy", "web", "site@1.0", "--min-healthy", "101%"],
            &["deploy", "web", "site@1.0", "--bake", "5 parsecs"],
            &["deploy", "web", "site@1.0", "--plan", "--watch"],
            &["pin", "web", "site@1.0"],
            &["pin", "web", "site@1.0", "--count", "2", "--percent", "10"],
            &["pin", "web", "site@1.0", "--percent", "0"],
        ];
        for args in cases {
            let error = parse(args).expect_err(&format!("{args:?} should be refused"));
            assert_eq!(error.exit_code(), 2, "{args:?}: {error}");
        }
    }

    #[test]
    fn lists_and_defaults_parse() {
        match parse(&["pin", "web", "site@1.0", "--instances", "i-1,i-2"])
            .expect("pin")
            .command
        {
            Command::Pin(args) => assert_eq!(args.instances, ["i-1", "i-2"]),
            other => panic!("parsed as {other:?}"),
        }
        match parse(&["unpin", "web", "site"]).expect("unpin").command {
            Command::Unpin(args) => assert!(args.instances.is_empty()),
            other => panic!("parsed as {other:?}"),
        }
        match parse(&["event", "list"]).expect("event list").command {
            Command::Event(EventCommand::List { limit, .. }) => assert_eq!(limit, 50),
            other => panic!("parsed as {other:?}"),
        }
        let args = [
            "event",
            "list",
            "--stack",
            "web",
            "--instance",
            "i-1",
            "--operator",
            "alice",
            "--since",
            "2h",
        ];
        match parse(&args).expect("event list with filters").command {
            Command::Event(EventCommand::List {
                stack,
                instance,
                operator,
                since,
                ..
            }) => {
                assert_eq!(
                    (stack.as_deref(), instance.as_deref(), operator.as_deref()),
                    (Some("web"), Some("i-1"), Some("alice"))
                );
                let ago = SystemTime::now()
                    .duration_since(since.expect("since"))
                    .expect("in the past");
                assert!(
                    ago >= Duration::from_secs(7200) && ago < Duration::from_secs(7300),
                    "{ago:?}"
                );
            }
            other => panic!("parsed as {other:?}"),
        }
        let at = parse(&["event", "list", "--since", "2026-12-06T03:00:00Z"]).expect("a time");
        assert!(matches!(
            at.command,
            Command::Event(EventCommand::List { since: Some(_), .. })
        ));
        let refused = parse(&["event", "list", "--since", "yesterday"]).expect_err("not a time");
        assert!(refused.to_string().contains("neither a duration"), "{refused}");
    }

    fn instance(id: &str, state: &str, detail: Option<&str>) -> DeploymentInstanceView {
        DeploymentInstanceView {
            instance_id: id.into(),
            state: state.into(),
            detail: detail.map(Into::into),
            traffic: None,
        }
    }

    fn wave(kind: &str, zone: Option<&str>, instances: Vec<DeploymentInstanceView>) -> DeploymentWaveView {
        DeploymentWaveView {
            kind: kind.into(),
            zone: zone.map(Into::into),
            instances,
        }
    }

    fn deployment(phase: &str, summary: &str, waves: Vec<DeploymentWaveView>) -> DeploymentView {
        DeploymentView {
            id: "d-4f2a".into(),
            stack: "web".into(),
            bundle: "site".into(),
            version: "2.0".into(),
            previous_version: Some("1.0".into()),
            status: "running".into(),
            phase: phase.into(),
            paused: false,
            summary: summary.into(),
            reason: None,
            waves,
            failures: Vec::new(),
            created_by: "alice".into(),
            created_at: "2026-03-01T10:00:00Z".into(),
            updated_at: "2026-03-01T10:02:00Z".into(),
        }
    }

    /// Wave 2 in progress, with one instance failed (hook output in its detail).
    fn mid_wave() -> DeploymentView {
        let mut deployment = deployment(
            "wave 2/3",
            "wave 2/3: 1 healthy, 1 failed; 1 of 1 failures allowed",
            vec![
                wave("canary", None, vec![instance("i-1", "settled", None)]),
                wave(
                    "zone",
                    Some("z1"),
                    vec![
                        instance("i-2", "healthy", None),
                        instance(
                            "i-3",
                            "failed",
                            Some(
                                "hook ApplicationStart exited with 1\nnpm ERR! missing script: start\nnpm ERR! see log",
                            ),
                        ),
                    ],
                ),
                wave(
                    "zone",
                    Some("z2"),
                    vec![instance("i-4", "prepared", None), instance("i-5", "prepared", None)],
                ),
            ],
        );
        deployment.failures = vec!["i-3: hook ApplicationStart exited with 1".into()];
        deployment
    }

    #[test]
    fn change_lines_say_what_moved() {
        let mut before = mid_wave();
        before.phase = "wave 1/3".into();
        before.failures.clear();
        before.waves[1].instances[0] = instance("i-2", "activating", None);
        before.waves[1].instances[1] = instance("i-3", "activating", None);
        let mut after = mid_wave();
        after.paused = true;
        expect![[r#"
            phase: wave 2/3
            paused
            wave 2/3 zone z1: i-2 healthy
            wave 2/3 zone z1: i-3 failed: hook ApplicationStart exited with 1
                | npm ERR! missing script: start
                | npm ERR! see log
            failure: i-3: hook ApplicationStart exited with 1
        "#]]
        .assert_eq(&(change_lines(Some(&before), &after).join("\n") + "\n"));
        assert!(change_lines(Some(&after), &after).is_empty(), "no change, no line");
    }

    #[test]
    fn change_lines_do_not_repeat_a_detail_the_failures_carry() {
        let mut before = mid_wave();
        before.failures.clear();
        before.waves[1].instances[1] = instance("i-3", "activating", None);
        let mut after = mid_wave();
        after.failures =
            vec!["i-3: hook ApplicationStart exited with 1\nnpm ERR! missing script: start\nnpm ERR! see log".into()];
        expect![[r#"
            wave 2/3 zone z1: i-3 failed
            failure: i-3: hook ApplicationStart exited with 1
                | npm ERR! missing script: start
                | npm ERR! see log
        "#]]
        .assert_eq(&(change_lines(Some(&before), &after).join("\n") + "\n"));
    }

    #[test]
    fn change_lines_start_with_the_deployment_and_end_with_its_outcome() {
        let first = mid_wave();
        expect![[r#"
            deployment d-4f2a: site@2.0 to web (from 1.0), 5 instances in 3 waves
            wave 2/3: 1 healthy, 1 failed; 1 of 1 failures allowed
            failure: i-3: hook ApplicationStart exited with 1
        "#]]
        .assert_eq(&(change_lines(None, &first).join("\n") + "\n"));

        let mut last = mid_wave();
        last.status = "failed".into();
        last.phase = "failed".into();
        last.summary = "failed: 2 failed instances, 1 allowed; 3 switched back".into();
        last.reason = Some("2 instances failed, more than the 1 allowed".into());
        for wave in &mut last.waves {
            for instance in &mut wave.instances {
                if instance.state != "failed" {
                    instance.state = "switched back".into();
                }
            }
        }
        last.waves[2].instances[0] = instance("i-4", "failed", Some("prepare: sha256 mismatch"));
        last.failures.push("i-4: prepare: sha256 mismatch".into());
        expect![[r#"
            wave 1/3 canary: i-1 switched back
            wave 2/3 zone z1: i-2 switched back
            wave 3/3 zone z2: i-4 failed
            wave 3/3 zone z2: i-5 switched back
            failure: i-4: prepare: sha256 mismatch
            deployment d-4f2a failed: 2 failed instances, 1 allowed; 3 switched back
            reason: 2 instances failed, more than the 1 allowed
        "#]]
        .assert_eq(&(change_lines(Some(&first), &last).join("\n") + "\n"));
    }

    #[test]
    fn the_live_block_shows_waves_and_failures() {
        let mut deployment = mid_wave();
        deployment.paused = true;
        expect![[r#"
            deployment d-4f2a: site@2.0 to web (from 1.0)
            [####--------------------] 1/5 settled, 1 failed  wave 2/3 (paused)
            wave 2/3: 1 healthy, 1 failed; 1 of 1 failures allowed
              1/3 canary   i-1 settled
            > 2/3 zone z1  i-2 healthy, i-3 failed
              3/3 zone z2  i-4 prepared, i-5 prepared
            failures:
              i-3: hook ApplicationStart exited with 1
                | npm ERR! missing script: start
                | npm ERR! see log
        "#]]
        .assert_eq(&(progress_block(&deployment).join("\n") + "\n"));
    }

    #[test]
    fn the_live_block_stays_compact_for_big_deployments() {
        let waves = (0..14)
            .map(|index| {
                let state = if index < 6 { "settled" } else { "pending" };
                let instances = (0..12)
                    .map(|number| instance(&format!("i-{index:02}{number:02}"), state, None))
                    .collect();
                wave("zone", Some(&format!("z{}", index / 5)), instances)
            })
            .collect();
        let mut deployment = deployment("wave 7/14", "wave 7/14: 12 pending", waves);
        deployment.failures = (1..=5)
            .map(|number| format!("i-99{number:02}: lost\n{}", "hook line\n".repeat(number)))
            .collect();
        expect![[r#"
            deployment d-4f2a: site@2.0 to web (from 1.0)
            [##########--------------] 72/168 settled  wave 7/14
            wave 7/14: 12 pending
              ... 4 earlier waves
              5/14  zone z0  12 settled
              6/14  zone z1  12 settled
            > 7/14  zone z1  12 pending
              8/14  zone z1  12 pending
              9/14  zone z1  12 pending
              10/14 zone z1  12 pending
              11/14 zone z2  12 pending
              12/14 zone z2  12 pending
              13/14 zone z2  12 pending
              14/14 zone z2  12 pending
            failures:
              ... 2 earlier failures (rollwave deployment show d-4f2a)
              i-9903: lost
                | hook line
                | hook line
                | hook line
              i-9904: lost
                | hook line
                | hook line
                | hook line
                | hook line
              i-9905: lost
                | ... 1 line
                | hook line
                | hook line
                | hook line
                | hook line
        "#]]
        .assert_eq(&(progress_block(&deployment).join("\n") + "\n"));
    }

    #[test]
    fn redraws_move_back_over_the_previous_block() {
        let block = vec!["one".to_owned(), "two".to_owned()];
        assert_eq!(redraw(0, &block), "\r\x1b[J\x1b[?7lone\ntwo\n\x1b[?7h");
        assert_eq!(redraw(3, &block), "\x1b[3A\r\x1b[J\x1b[?7lone\ntwo\n\x1b[?7h");
    }

    #[test]
    fn outcomes_map_to_results() {
        let mut deployment = mid_wave();
        deployment.status = "succeeded".into();
        assert!(outcome(&deployment).is_ok());
        deployment.status = "aborted".into();
        deployment.reason = Some("aborted by alice".into());
        assert_eq!(
            outcome(&deployment).expect_err("aborted").to_string(),
            "deployment d-4f2a aborted: aborted by alice; see `rollwave deployment show d-4f2a`"
        );
    }

    #[test]
    fn show_prints_every_instance_and_failure() {
        let mut deployment = mid_wave();
        deployment.paused = true;
        expect![[r#"
            deployment  d-4f2a
            release     site@2.0 on web (previous 1.0)
            status      running, paused
            phase       wave 2/3
            summary     wave 2/3: 1 healthy, 1 failed; 1 of 1 failures allowed
            created     2026-03-01T10:00:00Z by alice
            updated     2026-03-01T10:02:00Z

            wave 1/3 canary
              i-1  settled

            wave 2/3 zone z1
              i-2  healthy
              i-3  failed    hook ApplicationStart exited with 1
                             | npm ERR! missing script: start
                             | npm ERR! see log

            wave 3/3 zone z2
              i-4  prepared
              i-5  prepared

            failures (1):
              i-3: hook ApplicationStart exited with 1
        "#]]
        .assert_eq(&render_deployment(&deployment));
    }

    #[test]
    fn plans_show_waves_skips_and_the_floor() {
        let plan = PlanView {
            waves: vec![
                PlannedWaveView {
                    kind: "canary".into(),
                    zone: None,
                    instances: vec!["i-1".into()],
                },
                PlannedWaveView {
                    kind: "zone".into(),
                    zone: Some("us-east-1a".into()),
                    instances: vec!["i-2".into(), "i-3".into()],
                },
            ],
            skipped: vec![SkippedInstanceView {
                instance_id: "i-9".into(),
                reason: "pinned".into(),
            }],
            min_healthy: 3,
            healthy_total: 4,
            drain: vec!["each instance is drained (haproxy at unix:/run/haproxy/admin.sock, server app/{hostname}, drain timeout 30s) before it is activated and returned once healthy".into()],
        };
        let release = ReleaseRef {
            bundle: "site".into(),
            version: "2.0".into(),
        };
        expect![[r#"
            plan for site@2.0 on web: 3 instances in 2 waves
            WAVE  KIND    ZONE        INSTANCES
            1     canary  -           i-1
            2     zone    us-east-1a  i-2, i-3

            SKIPPED  REASON
            i-9      pinned

            min healthy: every wave keeps at least 3 of the 4 healthy instances in service
            drain: each instance is drained (haproxy at unix:/run/haproxy/admin.sock, server app/{hostname}, drain timeout 30s) before it is activated and returned once healthy
        "#]]
        .assert_eq(&render_plan("web", &release, &plan));
        let empty = PlanView {
            waves: Vec::new(),
            skipped: Vec::new(),
            min_healthy: 0,
            healthy_total: 0,
            drain: Vec::new(),
        };
        expect![[r#"
            plan for site@2.0 on web: no instance to update; starting it would approve site@2.0 at once, for instances that join later

            min healthy: no floor; a wave may take any of the 0 healthy instances out of service
            drain: none
        "#]]
        .assert_eq(&render_plan("web", &release, &empty));
    }

    #[test]
    fn histograms_put_the_most_common_version_first() {
        let histogram = |pairs: &[(&str, u32)]| {
            running_histogram(
                &pairs
                    .iter()
                    .map(|(version, count)| ((*version).to_owned(), *count))
                    .collect(),
            )
        };
        assert_eq!(histogram(&[("1.0", 1), ("2.0", 5)]), "2.0 ×5, 1.0 ×1");
        assert_eq!(histogram(&[("", 2), ("1.0", 2), ("0.9", 0)]), "(none) ×2, 1.0 ×2");
        assert_eq!(histogram(&[]), "no instances");
    }

    fn instance_status(id: &str, version: &str, state: &str, reason: &str, healthy: bool) -> InstanceStatusView {
        InstanceStatusView {
            instance_id: id.into(),
            hostname: format!("web-{id}"),
            zone: "z1".into(),
            presence: "online".into(),
            running_version: (!version.is_empty()).then(|| version.into()),
            state: state.into(),
            reason: (!reason.is_empty()).then(|| reason.into()),
            healthy,
            health: if healthy { "healthy" } else { "unhealthy" }.into(),
            health_detail: None,
            health_since: None,
            health_since_ms: 0,
            app_restarts: 0,
            last_exit: None,
            last_exit_at: None,
            last_exit_at_ms: 0,
            install_failure: None,
            install_failing_since: None,
        }
    }

    #[test]
    fn status_lists_the_instances_that_differ() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut unhealthy = instance_status("i-3", "2.0", "ok", "", false);
        unhealthy.health_detail = Some("GET /health: 503\nbody".into());
        unhealthy.health_since_ms = 1_000_000_000 - 180_000;
        unhealthy.app_restarts = 3;
        unhealthy.last_exit = Some("exited with code 1".into());
        unhealthy.last_exit_at_ms = 1_000_000_000 - 120_000;
        let mut stale = instance_status("i-5", "2.0", "ok", "", false);
        stale.health = "stale".into();
        stale.health_since_ms = 1_000_000_000 - 600_000;
        let mut unknown = instance_status(
            "i-6",
            "",
            "missing",
            "install failing since 1970-01-12T13:40:00Z: S3 unreachable",
            false,
        );
        unknown.health = "unknown".into();
        let status = StackStatusView {
            stack: "web".into(),
            out_of_service: vec![
                "i-3: left drained: the switch back failed (application_start exited 1) (deployment d-1)".into(),
            ],
            duplicate_identity: Vec::new(),
            bundles: vec![
                BundleStatusView {
                    bundle: "site".into(),
                    approved_version: Some("2.0".into()),
                    running: [("2.0".to_owned(), 3), ("1.0".to_owned(), 1)].into_iter().collect(),
                    deployment_id: None,
                    instances: vec![
                        instance_status("i-1", "2.0", "ok", "", true),
                        instance_status("i-2", "1.0", "pinned", "pinned to 1.0", true),
                        unhealthy,
                        instance_status("i-4", "2.0", "ok", "", true),
                        stale,
                        unknown,
                    ],
                },
                BundleStatusView {
                    bundle: "chef".into(),
                    approved_version: Some("7".into()),
                    running: [("7".to_owned(), 4)].into_iter().collect(),
                    deployment_id: Some("d-9".into()),
                    instances: (1..=4)
                        .map(|number| instance_status(&format!("i-{number}"), "7", "ok", "", true))
                        .collect(),
                },
            ],
        };
        expect![[r#"
            stack web

            site: approved 2.0; running 2.0 ×3, 1.0 ×1
              INSTANCE  HOSTNAME  ZONE  PRESENCE  VERSION  STATE    REASON                                                      HEALTH                                                  RESTARTS
              i-2       web-i-2   z1    online    1.0      pinned   pinned to 1.0                                               healthy                                                 0
              i-3       web-i-3   z1    online    2.0      ok       -                                                           unhealthy since 3m ago: GET /health: 503                3; last exit 2m ago: exited with code 1
              i-5       web-i-5   z1    online    2.0      ok       -                                                           stale: its agent sent no verdict for 3 check intervals  0
              i-6       web-i-6   z1    online    -        missing  install failing since 1970-01-12T13:40:00Z: S3 unreachable  unknown: no health verdict yet                          0

            chef: approved 7; running 7 ×4; deployment d-9 running
              all 4 instances run 7 and are healthy

            out of the load balancer (1 instance):
              i-3: left drained: the switch back failed (application_start exited 1) (deployment d-1)
        "#]]
        .assert_eq(&render_status(&status, false, now));
    }

    #[test]
    fn status_shows_a_duplicate_identity_before_anything_else() {
        let status = StackStatusView {
            stack: "web".into(),
            out_of_service: Vec::new(),
            duplicate_identity: vec![
                "i-1: another live session holds this identity; 2 sessions from 10.0.0.9:4000 refused (last 3s ago)"
                    .into(),
            ],
            bundles: Vec::new(),
        };
        expect![[r#"
            stack web

            duplicate identity (1 instance):
              i-1: another live session holds this identity; 2 sessions from 10.0.0.9:4000 refused (last 3s ago)
            no bundle is approved or running yet
        "#]]
        .assert_eq(&render_status(&status, false, SystemTime::UNIX_EPOCH));
    }

    #[test]
    fn status_without_a_stack_shows_every_stack() {
        let web = StackStatusView {
            stack: "web".into(),
            out_of_service: Vec::new(),
            duplicate_identity: Vec::new(),
            bundles: vec![BundleStatusView {
                bundle: "site".into(),
                approved_version: Some("2.0".into()),
                running: [("2.0".to_owned(), 2), ("1.0".to_owned(), 1)].into_iter().collect(),
                deployment_id: None,
                instances: vec![
                    instance_status("i-1", "2.0", "ok", "", true),
                    instance_status("i-2", "2.0", "ok", "", true),
                    instance_status("i-3", "1.0", "drift", "runs 1.0", true),
                ],
            }],
        };
        let batch = StackStatusView {
            stack: "batch".into(),
            out_of_service: Vec::new(),
            duplicate_identity: Vec::new(),
            bundles: Vec::new(),
        };
        expect![[r#"
            web
              site: approved 2.0; running 2.0 ×2, 1.0 ×1; 1 differs
            batch
              no bundle is approved or running yet

            per instance: rollwave status STACK
        "#]]
        .assert_eq(&render_overview(&[web, batch]));
        match parse(&["status"]).expect("status without a stack").command {
            Command::Status(args) => assert_eq!(args.stack, None),
            other => panic!("parsed as {other:?}"),
        }
    }
}
