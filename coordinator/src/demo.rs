//! `rollwave demo`: the main job on one machine, self-contained. A
//! coordinator and an S3-compatible artifact store (both in this process) and
//! real agent processes (separate state dirs, three zones) in a temporary
//! directory. It builds three releases of a small app, pushes them, lets the
//! agents join and install the approved one, rolls out a good release live,
//! then a broken one that the canary catches and the rollout undoes.
//!
//! It goes through the production paths only: releases are built by
//! `rollwave_release`, uploaded by `rollwave_artifacts`, registered and
//! deployed over the operator API, and fetched by the agents through their
//! `[s3]` settings. Every step checks what it shows, so the demo exits
//! non-zero when the system misbehaves.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rollwave_proto::v1 as pb;
use tokio::process::{Child, Command};

use crate::artifact_store::{ArtifactStore, StoreCredentials};
use crate::cli::console;
use crate::cli::deploy::{DeploymentCommand, StatusArgs};
use crate::cli::output::{InstanceView, OutputFormat, print_list};
use crate::cli::profile::Profile;
use crate::cli::{DemoArgs, OperatorClient, deploy};
use crate::presence::PresencePolicy;
use crate::server::{self, RunningServer, ServerOptions};
use crate::wording::count_of;

const STACK: &str = "demo";
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
/// The sample app's bundle, and where its archives live in the store (`releases/app/VERSION.zip`, as `release push`).
const BUNDLE: &str = "app";
const BUCKET: &str = "demo-releases";
/// Key pair of the embedded store; the agents get it through the standard AWS environment variables.
const STORE_ACCESS_KEY: &str = "rollwave-demo";
const STORE_SECRET_KEY: &str = "rollwave-demo-secret";

/// How long the agents have to join, and then to install the approved release.
const JOIN_DEADLINE: Duration = Duration::from_secs(60);
const INSTALL_DEADLINE: Duration = Duration::from_secs(60);
/// How long the canary has to come back on the good release after the broken one failed.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(30);
/// How long an agent lets a newly activated release take to pass its health checks (agent.toml `[install]`).
/// The default is a minute; the broken release is caught after this long.
const AGENT_HEALTH_DEADLINE: &str = "10s";
/// Rolling options of the demo's deployments. The minimum healthy time is 10s by default; 2s keeps the demo short.
const MIN_HEALTHY_TIME: Duration = Duration::from_secs(2);
/// Tighter than the defaults (5m, 10m), so that a demo that goes wrong fails within a minute or two.
const HEALTHY_DEADLINE: Duration = Duration::from_secs(45);
const PROGRESS_DEADLINE: Duration = Duration::from_secs(90);
/// How long a stopped app gets between SIGTERM and SIGKILL at cleanup.
const APP_STOP_GRACE: Duration = Duration::from_secs(2);
/// How often waiting loops ask the coordinator.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Deployment instance states that mean the instance switched to the new release (or tried to).
const SWITCHED_STATES: [&str; 8] = [
    "activating",
    "activated",
    "healthy",
    "settled",
    "failed",
    "switching back",
    "switched back",
    "switch back failed",
];

/// One version of the sample app.
struct SampleRelease {
    version: &'static str,
    /// What the app writes to its status file every second; the health check passes only on "ok…".
    status_line: &'static str,
    description: &'static str,
}

const RELEASES: [SampleRelease; 3] = [
    SampleRelease {
        version: "1.0",
        status_line: "ok: app 1.0 serving",
        description: "good",
    },
    SampleRelease {
        version: "2.0",
        status_line: "ok: app 2.0 serving",
        description: "good",
    },
    SampleRelease {
        version: "3.0",
        status_line: "failing: app 3.0 cannot open its database (wrong setting in this release)",
        description: "broken: the app runs but reports failing, so its health check fails",
    },
];
const GOOD: &str = "2.0";
const FIRST: &str = "1.0";
const BROKEN: &str = "3.0";

const MANIFEST: &str = r#"# The demo app: the agent runs bin/app as a supervised service and
# checks it with bin/healthcheck after every install and every 2 s.
[service]
command = ["bin/app"]

[[health]]
command = "bin/healthcheck"
timeout = "2s"
"#;

/// The app. A real one would serve traffic; this one needs nothing but /bin/sh. It writes into its release dir
/// (its working directory) because that is the one place it knows; the health check reads the same files.
fn app_script(status_line: &str) -> String {
    format!(
        "#!/bin/sh\n\
         # The demo app, version $ROLLWAVE_VERSION: records its pid, then says how it is doing every second.\n\
         echo $$ > app.pid\n\
         while :; do\n\
         \x20   echo '{status_line}' > status.tmp && mv status.tmp status\n\
         \x20   sleep 1\n\
         done\n"
    )
}

const HEALTHCHECK: &str = r#"#!/bin/sh
# Healthy when this release's app is running and says "ok".
pid=$(cat app.pid 2>/dev/null)
if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then echo "the app is not running"; exit 1; fi
if [ ! -f status ]; then echo "the app has not reported yet"; exit 1; fi
read -r line < status
echo "$line"
case "$line" in ok*) exit 0 ;; *) exit 1 ;; esac
"#;

/// The agent binary: beside this one (a cargo build puts both in target/), else on PATH.
fn agent_binary() -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()?.with_file_name("rollwave-agent");
    if beside.exists() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("rollwave-agent"))
        .find(|candidate| candidate.exists())
        .context("rollwave-agent not found next to rollwave or on PATH; build it with `cargo build --workspace`")
}

/// A narration line on stdout; the deployment watch draws on stderr, as `rollwave deployment watch` does.
/// A reader that went away loses the narration; the demo goes on and cleans up.
fn say(text: &str) {
    let _ = console::write_stdout(&format!("{text}\n"));
}

fn step(number: usize, text: &str) {
    let _ = console::write_stdout(&format!("\n[{number}/7] {text}\n"));
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let agent = agent_binary()?;
    let started = Instant::now();
    let workdir = tempfile::Builder::new().prefix("rollwave-demo-").tempdir()?;
    say(&format!(
        "rollwave demo: a coordinator, an S3-compatible artifact store and {} on this machine, in {}",
        count_of(args.agents, "agent", "agents"),
        workdir.path().display()
    ));

    let mut options = ServerOptions::new(
        workdir.path().join("coordinator"),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    );
    options.settings.heartbeat_interval = Duration::from_secs(1);
    options.settings.presence = PresencePolicy {
        offline_after: Duration::from_secs(3),
        lost_after: Duration::from_secs(60),
    };
    let server = server::start(options).await?;
    let store = ArtifactStore::start(
        &workdir.path().join("artifact-store"),
        &[BUCKET],
        StoreCredentials {
            access_key_id: STORE_ACCESS_KEY.into(),
            secret_access_key: STORE_SECRET_KEY.into(),
        },
    )
    .await?;

    let mut fleet = Fleet::default();
    // Ctrl-C or SIGTERM stops the story where it is; the cleanup below runs either way, so that no agent or app
    // (which lives in a session of its own, out of reach of the terminal's Ctrl-C) is left behind.
    let outcome = tokio::select! {
        outcome = story(&args, &agent, workdir.path(), &server, &store, &mut fleet) => Some(outcome),
        () = interrupted() => None,
    };
    let story_time = started.elapsed();
    if let Some(Ok(())) = outcome
        && args.keep_running
    {
        if let Err(error) = print_try_it(workdir.path(), &server, &store) {
            console::noteln!("warning: cannot write the demo's CLI config: {error:#}");
        }
        interrupted().await;
    }

    let (agents, apps) = fleet.stop(workdir.path()).await;
    store.shutdown().await;
    server.shutdown().await?;
    match outcome {
        Some(Ok(())) => {
            say(&format!(
                "\ndemo finished in {:.0}s; stopped {} and {}, removed {}",
                story_time.as_secs_f64(),
                count_of(agents, "agent", "agents"),
                count_of(apps, "app process", "app processes"),
                workdir.path().display()
            ));
            Ok(())
        }
        None => bail!(
            "interrupted after {:.0}s; stopped {} and {}, removed {}",
            story_time.as_secs_f64(),
            count_of(agents, "agent", "agents"),
            count_of(apps, "app process", "app processes"),
            workdir.path().display()
        ),
        Some(Err(error)) => {
            // The logs are what explains a failure: keep them.
            let kept = workdir.keep();
            Err(error.context(format!(
                "the demo stopped after {:.0}s; agent logs (agent-N/agent.log) and app logs \
                 (agent-N/state/state/services/app.log) are kept in {}",
                story_time.as_secs_f64(),
                kept.display()
            )))
        }
    }
}

/// Resolves at Ctrl-C or SIGTERM.
async fn interrupted() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            // Without a SIGTERM handler, Ctrl-C still works.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Steps 1 to 7; every process it starts is in `fleet`, which the caller stops whatever happens here.
async fn story(
    args: &DemoArgs,
    agent: &Path,
    workdir: &Path,
    server: &RunningServer,
    store: &ArtifactStore,
    fleet: &mut Fleet,
) -> anyhow::Result<()> {
    step(1, "the coordinator and the artifact store, both in this process");
    say(&format!(
        "      coordinator     {} (gRPC over TLS, CA {})",
        server.local_addr,
        server.files.ca.certificate.display()
    ));
    say(&format!(
        "      artifact store  {} (S3 API by s3s-fs, objects under {}), bucket {BUCKET}",
        store.endpoint(),
        store.root().display()
    ));
    let profile = Profile {
        addr: server.local_addr.to_string(),
        token: std::fs::read_to_string(&server.files.operator_token)?.trim().to_owned(),
        ca_pem: server.ca_pem.clone().into_bytes(),
    };
    let mut client = crate::cli::operator_client(&profile).await?;

    step(
        2,
        "building the sample app: a /bin/sh service each agent supervises, with a health check command",
    );
    let archives = build_releases(workdir)?;

    step(
        3,
        &format!("pushing: upload to s3://{BUCKET}/releases/{BUNDLE}/VERSION.zip, then register with the coordinator"),
    );
    let s3 = store.client().await;
    for (release, archive) in RELEASES.iter().zip(&archives) {
        push(&mut client, &s3, release.version, archive).await?;
    }
    say("      (s3s-fs keeps no object versions, so each release is pinned by its sha256 alone,");
    say("      as `rollwave release push --allow-unversioned` does; agents refuse other bytes)");

    step(
        4,
        &format!("stack {STACK:?}, with {BUNDLE}@{FIRST} approved before any instance exists"),
    );
    client
        .create_stack(pb::CreateStackRequest {
            name: STACK.into(),
            stage: "dev".into(),
        })
        .await
        .map_err(status_error)?;
    let first = create_deployment(&mut client, FIRST, all_at_once()).await?;
    ensure!(
        first.status == "succeeded",
        "deploying {BUNDLE}@{FIRST} to the empty stack should approve it at once; it is {}: {}",
        first.status,
        first.summary
    );
    say(&format!(
        "      deployment {} of {BUNDLE}@{FIRST} (all at once) to the empty stack: {}",
        first.id, first.summary
    ));
    say("      so every instance that joins installs it: that is how new instances get the approved release");
    let token = client
        .create_token(pb::CreateTokenRequest {
            stack: STACK.into(),
            ttl_seconds: Some(600),
            uses: Some(u32::try_from(args.agents)?),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .token;
    say(&format!(
        "      starting {} with a join token; each agent.toml has [s3] endpoint = {:?},\n      \
         force_path_style = true and [install] health_deadline = {AGENT_HEALTH_DEADLINE:?} (default 1m)",
        count_of(args.agents, "agent", "agents"),
        store.endpoint()
    ));
    for index in 0..args.agents {
        fleet.start(agent, workdir, server.local_addr, &token, store, index)?;
    }
    wait_until_installed(&mut client, fleet, args.agents).await?;
    let instances = client
        .list_instances(pb::ListInstancesRequest { stack: STACK.into() })
        .await
        .map_err(status_error)?
        .into_inner()
        .instances;
    say("");
    print_list(
        OutputFormat::Table,
        &instances.into_iter().map(InstanceView::from).collect::<Vec<_>>(),
    )?;
    let pids: Vec<String> = fleet.app_pids().iter().map(i32::to_string).collect();
    say(&format!(
        "      app processes (each in its own session, restarted by its agent if it dies): pids {}",
        pids.join(", ")
    ));

    let rolling = rolling(args.agents);
    step(5, &format!("rolling out {BUNDLE}@{GOOD}, watched live"));
    say(&format!(
        "      canary first (1 instance), then zone by zone, a whole zone per wave, keeping at least {} of {} \
         instances healthy;",
        args.agents / 2,
        args.agents
    ));
    say(&format!(
        "      an instance is done once healthy for {}s without interruption (the default is 10s; shortened here)",
        MIN_HEALTHY_TIME.as_secs()
    ));
    let good = create_deployment(&mut client, GOOD, rolling.clone()).await?;
    watch(&mut client, &good.id)
        .await
        .with_context(|| format!("{BUNDLE}@{GOOD} is a good release and should have rolled out"))?;
    let status = stack_status(&mut client).await?;
    ensure!(
        status.approved_version == GOOD && status.instances.iter().all(|instance| instance.running_version == GOOD),
        "after the deployment of {BUNDLE}@{GOOD} every instance should run it and it should be approved; \
         approved {:?}, running {:?}",
        status.approved_version,
        status.running
    );
    say(&format!(
        "      every instance runs {BUNDLE} {GOOD}; {GOOD} is the approved release"
    ));

    step(6, &format!("rolling out {BUNDLE}@{BROKEN}, which is broken"));
    say(&format!(
        "      same options; its app reports failing, so the canary's health checks fail for {AGENT_HEALTH_DEADLINE},"
    ));
    say(&format!(
        "      the canary's agent switches back to {GOOD}, and the deployment fails before any other instance switches"
    ));
    let broken = create_deployment(&mut client, BROKEN, rolling).await?;
    let watch_error = match watch(&mut client, &broken.id).await {
        Ok(()) => bail!(
            "deployment {} of {BUNDLE}@{BROKEN} succeeded although its health check fails: the canary did not catch it",
            broken.id
        ),
        Err(error) => {
            say(&format!(
                "      as expected, deployment {} failed (`rollwave deployment watch` exits 1 on it)",
                broken.id
            ));
            error
        }
    };
    let canary = check_caught_at_canary(&mut client, &broken.id)
        .await
        .with_context(|| format!("the watch ended with: {watch_error:#}"))?;
    wait_until_back(&mut client, &canary).await?;
    say(&format!(
        "      canary {canary} runs {BUNDLE} {GOOD} again and is healthy; the other instances never left {GOOD},"
    ));
    say(&format!("      and {GOOD} is still the approved release"));

    step(7, &format!("where the stack stands (`rollwave status {STACK} --all`)"));
    deploy::status(
        &mut client,
        StatusArgs {
            stack: Some(STACK.into()),
            all: true,
        },
        OutputFormat::Table,
    )
    .await?;
    Ok(())
}

/// Writes the three sample releases' trees and builds their archives; returns the archives in `RELEASES` order.
fn build_releases(workdir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut archives = Vec::new();
    for release in &RELEASES {
        let source = workdir.join("src").join(format!("{BUNDLE}-{}", release.version));
        write_executable(&source.join("bin/app"), &app_script(release.status_line))?;
        write_executable(&source.join("bin/healthcheck"), HEALTHCHECK)?;
        std::fs::write(source.join("rollwave.toml"), MANIFEST)?;
        let archive = workdir.join("build").join(format!("{BUNDLE}-{}.zip", release.version));
        std::fs::create_dir_all(workdir.join("build"))?;
        let built = rollwave_release::build_from_dir(&source, &archive)
            .with_context(|| format!("build {BUNDLE}@{} from {}", release.version, source.display()))?;
        say(&format!(
            "      {BUNDLE} {:<4} {:>5} bytes  sha256 {}…  {}",
            release.version,
            built.size,
            &built.sha256.to_hex()[..12],
            release.description
        ));
        archives.push(archive);
    }
    say(&format!(
        "      each holds rollwave.toml ([service] command = [\"bin/app\"], [[health]] command = \"bin/healthcheck\"); \
         sources in {}",
        workdir.join("src").display()
    ));
    Ok(archives)
}

fn write_executable(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// What `rollwave release push --allow-unversioned` does, against the embedded store.
async fn push(
    client: &mut OperatorClient,
    s3: &aws_sdk_s3::Client,
    version: &str,
    archive: &Path,
) -> anyhow::Result<()> {
    let (sha256, size) = rollwave_release::hash_file(archive)?;
    let key = format!("releases/{BUNDLE}/{version}.zip");
    let uploaded = rollwave_artifacts::upload(s3, BUCKET, &key, archive, &sha256.to_hex())
        .await
        .with_context(|| format!("push {BUNDLE}@{version} to the artifact store"))?;
    let registration = client
        .register_release(pb::RegisterReleaseRequest {
            bundle: BUNDLE.into(),
            kind: "app".into(),
            version: version.into(),
            bucket: BUCKET.into(),
            key: key.clone(),
            object_version: uploaded.version_id,
            sha256: sha256.to_hex(),
            size,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    ensure!(
        !registration.already_registered,
        "{BUNDLE}@{version} was already registered in a fresh coordinator"
    );
    say(&format!("      registered {BUNDLE}@{version}: s3://{BUCKET}/{key}"));
    Ok(())
}

fn all_at_once() -> pb::DeploymentOptions {
    pb::DeploymentOptions {
        strategy: "all-at-once".into(),
        ..Default::default()
    }
}

/// A canary, then a whole zone per wave, never fewer than half the stack healthy.
fn rolling(agents: usize) -> pb::DeploymentOptions {
    let millis = |duration: Duration| Some(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    pb::DeploymentOptions {
        strategy: "rolling".into(),
        canary: Some(1),
        batch: "100%".into(),
        min_healthy: (agents / 2).to_string(),
        failure_threshold: "0".into(),
        bake_ms: Some(0),
        min_healthy_time_ms: millis(MIN_HEALTHY_TIME),
        healthy_deadline_ms: millis(HEALTHY_DEADLINE),
        progress_deadline_ms: millis(PROGRESS_DEADLINE),
        rollback_on_failure: Some(true),
        drain: None,
    }
}

async fn create_deployment(
    client: &mut OperatorClient,
    version: &str,
    options: pb::DeploymentOptions,
) -> anyhow::Result<pb::Deployment> {
    client
        .create_deployment(pb::CreateDeploymentRequest {
            stack: STACK.into(),
            bundle: BUNDLE.into(),
            version: version.into(),
            options: Some(options),
            plan_only: false,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .deployment
        .with_context(|| format!("the coordinator started a deployment of {BUNDLE}@{version} but did not return it"))
}

/// `rollwave deployment watch ID`: the same live view, and the same outcome (an error unless it succeeded).
async fn watch(client: &mut OperatorClient, id: &str) -> anyhow::Result<()> {
    say("");
    deploy::deployment(client, DeploymentCommand::Watch { id: id.into() }, OutputFormat::Table).await
}

async fn stack_status(client: &mut OperatorClient) -> anyhow::Result<pb::BundleStatus> {
    client
        .get_stack_status(pb::GetStackStatusRequest { stack: STACK.into() })
        .await
        .map_err(status_error)?
        .into_inner()
        .bundles
        .into_iter()
        .find(|bundle| bundle.bundle == BUNDLE)
        .with_context(|| format!("the status of stack {STACK} has no bundle {BUNDLE}"))
}

/// Shows agents joining, then installing the approved release, until every one runs it and is healthy.
async fn wait_until_installed(client: &mut OperatorClient, fleet: &mut Fleet, agents: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut joined = BTreeSet::new();
    let mut installed = BTreeSet::new();
    loop {
        let instances = client
            .list_instances(pb::ListInstancesRequest { stack: STACK.into() })
            .await
            .map_err(status_error)?
            .into_inner()
            .instances;
        for instance in &instances {
            if instance.presence == "online" && joined.insert(instance.id.clone()) {
                say(&format!(
                    "        + {} joined from {} ({}) after {:.1}s",
                    instance.id,
                    instance.zone,
                    instance.hostname,
                    started.elapsed().as_secs_f64()
                ));
            }
        }
        let status = stack_status(client).await?;
        for instance in &status.instances {
            if instance.running_version == FIRST && instance.healthy && installed.insert(instance.instance_id.clone()) {
                say(&format!(
                    "        ✓ {} runs {BUNDLE} {FIRST} and is healthy after {:.1}s",
                    instance.instance_id,
                    started.elapsed().as_secs_f64()
                ));
            }
        }
        if installed.len() == agents {
            return Ok(());
        }
        fleet.check_running()?;
        let elapsed = started.elapsed();
        if joined.len() < agents && elapsed > JOIN_DEADLINE {
            bail!(
                "only {} of {agents} agents came online within {}s",
                joined.len(),
                JOIN_DEADLINE.as_secs()
            );
        }
        if elapsed > JOIN_DEADLINE + INSTALL_DEADLINE {
            bail!(
                "only {} of {agents} instances run {BUNDLE} {FIRST} and are healthy after {}s; running: {:?}",
                installed.len(),
                elapsed.as_secs(),
                status.running
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Checks that the broken release failed at the canary: the deployment failed, only canary instances switched.
/// Returns the canary instance.
async fn check_caught_at_canary(client: &mut OperatorClient, id: &str) -> anyhow::Result<String> {
    let deployment = client
        .get_deployment(pb::GetDeploymentRequest { id: id.into() })
        .await
        .map_err(status_error)?
        .into_inner();
    ensure!(
        deployment.status == "failed",
        "deployment {id} of {BUNDLE}@{BROKEN} should have failed; it is {}",
        deployment.status
    );
    let Some((canary_wave, later_waves)) = deployment.waves.split_first() else {
        bail!("deployment {id} has no waves");
    };
    ensure!(
        canary_wave.kind == "canary",
        "deployment {id} should start with a canary wave; its first wave is {:?}",
        canary_wave.kind
    );
    let switched: Vec<String> = later_waves
        .iter()
        .flat_map(|wave| &wave.instances)
        .filter(|instance| SWITCHED_STATES.contains(&instance.state.as_str()))
        .map(|instance| format!("{} {}", instance.instance_id, instance.state))
        .collect();
    ensure!(
        switched.is_empty(),
        "the broken release should have been stopped at the canary, but later waves switched: {}",
        switched.join(", ")
    );
    let canary = canary_wave
        .instances
        .first()
        .with_context(|| format!("the canary wave of deployment {id} has no instance"))?;
    let later: BTreeMap<&str, usize> =
        later_waves
            .iter()
            .flat_map(|wave| &wave.instances)
            .fold(BTreeMap::new(), |mut counts, instance| {
                *counts.entry(instance.state.as_str()).or_default() += 1;
                counts
            });
    say(&format!(
        "      it failed at the canary: {} is {}; the other {} never switched to {BROKEN} ({})",
        canary.instance_id,
        canary.state,
        later.values().sum::<usize>(),
        later
            .iter()
            .map(|(state, count)| format!("{count} {state}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(canary.instance_id.clone())
}

/// Waits until `canary` runs the good release again and is healthy (and the approval did not move).
async fn wait_until_back(client: &mut OperatorClient, canary: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let status = stack_status(client).await?;
        ensure!(
            status.approved_version == GOOD,
            "{GOOD} should still be the approved release after the broken deployment; it is {:?}",
            status.approved_version
        );
        let back = status
            .instances
            .iter()
            .find(|instance| instance.instance_id == canary)
            .is_some_and(|instance| instance.running_version == GOOD && instance.healthy);
        let others_stayed = status
            .instances
            .iter()
            .all(|instance| instance.instance_id == canary || instance.running_version == GOOD);
        ensure!(
            others_stayed,
            "instances other than the canary should never have left {GOOD}; running: {:?}",
            status.running
        );
        if back {
            return Ok(());
        }
        if started.elapsed() > RECOVERY_DEADLINE {
            bail!(
                "canary {canary} is not back on {BUNDLE} {GOOD} and healthy {}s after the deployment failed; running: {:?}",
                RECOVERY_DEADLINE.as_secs(),
                status.running
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// With `--keep-running`: how to use the CLI against the demo, including a push to its store.
fn print_try_it(workdir: &Path, server: &RunningServer, store: &ArtifactStore) -> anyhow::Result<()> {
    // The server's CLI config plus the store, so that `release push` needs no S3 flags.
    let config = workdir.join("cli.toml");
    let mut text = std::fs::read_to_string(&server.files.cli_config)?;
    text.push_str(&format!(
        "\n[s3]\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\nregion = \"{}\"\nforce_path_style = true\n",
        store.endpoint(),
        crate::artifact_store::REGION
    ));
    rollwave_trust::files::write_private(&config, text.as_bytes())?;
    let credentials = store.credentials();
    say(&format!(
        "\nstill running; try, in another shell:\n\
         \x20 export PATH={bin}:$PATH ROLLWAVE_CONFIG={config}\n\
         \x20 export AWS_ACCESS_KEY_ID={key} AWS_SECRET_ACCESS_KEY={secret}   # the artifact store's\n\
         \x20 rollwave status {STACK} --all\n\
         \x20 rollwave deployment list\n\
         \x20 rollwave release build {source} --out {out}\n\
         \x20 rollwave release push {out} --bundle {BUNDLE} --version 4.0 --allow-unversioned\n\
         \x20 rollwave deploy {STACK} {BUNDLE}@4.0 --min-healthy-time 2s --watch\n\
         \x20 rollwave rollback {STACK} {BUNDLE} --watch\n\
         Ctrl-C (or SIGTERM) stops everything and removes {dir}",
        bin = std::env::current_exe()?
            .parent()
            .map(|dir| dir.display().to_string())
            .unwrap_or_default(),
        config = config.display(),
        key = credentials.access_key_id,
        secret = credentials.secret_access_key,
        source = workdir.join("src").join(format!("{BUNDLE}-{GOOD}")).display(),
        out = workdir.join("build").join(format!("{BUNDLE}-4.0.zip")).display(),
        dir = workdir.display()
    ));
    Ok(())
}

/// Turns a gRPC status into an error whose message is the server's explanation.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", status.message(), status.code())
}

/// One agent process and its directory.
struct Agent {
    root: PathBuf,
    child: Child,
}

/// The agent processes, and through their state dirs the apps they run. The apps live in sessions of their own
/// (so that restarting an agent does not stop them); stopping the demo stops them too, even when it fails.
#[derive(Default)]
struct Fleet {
    agents: Vec<Agent>,
}

impl Fleet {
    fn start(
        &mut self,
        binary: &Path,
        workdir: &Path,
        coordinator: SocketAddr,
        token: &str,
        store: &ArtifactStore,
        index: usize,
    ) -> anyhow::Result<()> {
        let zone = ZONES[index % ZONES.len()];
        let root = workdir.join(format!("agent-{index}"));
        std::fs::create_dir_all(&root)?;
        let config = root.join("agent.toml");
        std::fs::write(&config, agent_config(&root, coordinator, token, store, index))?;
        let log = std::fs::File::create(root.join("agent.log"))?;
        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        // The store's credentials, and nothing from this machine's AWS setup (profiles, SSO, instance role).
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("AWS_") {
                command.env_remove(name);
            }
        }
        let credentials = store.credentials();
        command
            .env("AWS_ACCESS_KEY_ID", &credentials.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &credentials.secret_access_key)
            .env("AWS_REGION", crate::artifact_store::REGION)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        let child = command.spawn().with_context(|| format!("start {}", binary.display()))?;
        say(&format!("        started agent {index} in {zone}"));
        self.agents.push(Agent { root, child });
        Ok(())
    }

    /// An agent that exited on its own is a failure to report now, with its log, rather than a timeout later.
    fn check_running(&mut self) -> anyhow::Result<()> {
        for agent in &mut self.agents {
            if let Some(exit) = agent.child.try_wait()? {
                let log = std::fs::read_to_string(agent.root.join("agent.log")).unwrap_or_default();
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bail!(
                    "the agent in {} exited ({exit}); the end of its log:\n{}",
                    agent.root.display(),
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }

    /// The pids of the apps the agents run now.
    fn app_pids(&self) -> Vec<i32> {
        self.agents
            .iter()
            .filter_map(|agent| running_app(&agent.root))
            .map(|app| app.pid)
            .collect()
    }

    /// Stops every agent, then every app (SIGTERM to its process group, SIGKILL after a grace period), then
    /// anything else still running from `workdir`. Returns how many agents and recorded apps it stopped.
    async fn stop(&mut self, workdir: &Path) -> (usize, usize) {
        let agents = std::mem::take(&mut self.agents);
        // Agents first, so that none restarts its app while the apps are being stopped.
        let mut stopped_agents = 0;
        let mut roots = Vec::new();
        for mut agent in agents {
            if agent.child.start_kill().is_ok() {
                stopped_agents += 1;
            }
            let _ = agent.child.wait().await;
            roots.push(agent.root);
        }
        let apps: Vec<RunningApp> = roots.iter().filter_map(|root| running_app(root)).collect();
        for app in &apps {
            let _ = killpg(Pid::from_raw(app.pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + APP_STOP_GRACE;
        while apps.iter().any(RunningApp::is_alive) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for app in apps.iter().filter(|app| app.is_alive()) {
            let _ = killpg(Pid::from_raw(app.pid), Signal::SIGKILL);
        }
        // An app no agent records any more would outlive the demo; none should exist, so say so loudly.
        let mut groups: BTreeMap<i32, Vec<StrayProcess>> = BTreeMap::new();
        for stray in stray_processes(workdir) {
            groups.entry(stray.group).or_default().push(stray);
        }
        if !groups.is_empty() {
            console::noteln!(
                "warning: {} process group(s) from the demo's directory were still running although no agent \
                 records them: an agent lost track of an app it started; stopping them:",
                groups.len()
            );
        }
        for (group, members) in &groups {
            let leader = members
                .iter()
                .find(|member| member.pid == *group)
                .or(members.first())
                .map(|member| member.command.as_str())
                .unwrap_or_default();
            console::noteln!(
                "  process group {group} ({}): {leader}",
                count_of(members.len(), "process", "processes")
            );
            let _ = killpg(Pid::from_raw(*group), Signal::SIGKILL);
        }
        (stopped_agents, apps.len())
    }
}

impl Drop for Fleet {
    /// Only reached with agents left when `stop` did not run (a panic): kill everything without waiting.
    fn drop(&mut self) {
        for agent in &mut self.agents {
            let _ = agent.child.start_kill();
        }
        for agent in &self.agents {
            if let Some(app) = running_app(&agent.root) {
                let _ = killpg(Pid::from_raw(app.pid), Signal::SIGKILL);
            }
        }
    }
}

fn agent_config(root: &Path, coordinator: SocketAddr, token: &str, store: &ArtifactStore, index: usize) -> String {
    let zone = ZONES[index % ZONES.len()];
    format!(
        "coordinator = \"{coordinator}\"\njoin_token = \"{token}\"\nstack = \"{STACK}\"\nlayer = \"web\"\n\
         zone = \"{zone}\"\nhostname = \"demo-host-{index}\"\nstate_dir = \"{state}\"\ntls_dir = \"{tls}\"\n\
         imds = \"off\"\n\n\
         [reconnect]\ninitial = \"200ms\"\nmax = \"2s\"\n\n\
         # The demo's embedded artifact store; credentials come from the environment.\n\
         [s3]\nendpoint = \"{endpoint}\"\nregion = \"{region}\"\nforce_path_style = true\n\n\
         [install]\nhealth_deadline = \"{AGENT_HEALTH_DEADLINE}\"\n",
        state = root.join("state").display(),
        tls = root.join("tls").display(),
        endpoint = store.endpoint(),
        region = crate::artifact_store::REGION,
    )
}

/// An app an agent started, as recorded in `STATE_DIR/state/services/app.json`.
struct RunningApp {
    /// Also its session and process group id.
    pid: i32,
    /// Field 22 of /proc/PID/stat when it started, so that a reused pid is not taken for the app.
    start_ticks: Option<u64>,
}

impl RunningApp {
    fn is_alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        // The fields after the command name, which is in parentheses and may hold anything.
        let Some((_, fields)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = fields.split_whitespace().collect();
        let zombie = fields.first() == Some(&"Z");
        let same_process = match self.start_ticks {
            Some(expected) => fields.get(19).and_then(|ticks| ticks.parse::<u64>().ok()) == Some(expected),
            None => true,
        };
        !zombie && same_process
    }
}

/// The app the agent in `root` runs, if it still runs.
fn running_app(root: &Path) -> Option<RunningApp> {
    let record = root.join("state/state/services").join(format!("{BUNDLE}.json"));
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(record).ok()?).ok()?;
    let app = RunningApp {
        pid: i32::try_from(record.get("pid")?.as_i64()?).ok()?,
        start_ticks: record.get("start_ticks").and_then(serde_json::Value::as_u64),
    };
    app.is_alive().then_some(app)
}

/// A process that runs from the demo's directory, found by scanning /proc.
struct StrayProcess {
    pid: i32,
    group: i32,
    command: String,
}

/// Processes whose command line or working directory is under `workdir`, other than this one and its group.
fn stray_processes(workdir: &Path) -> Vec<StrayProcess> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own_pid = std::process::id();
    let own_group = nix::unistd::getpgrp().as_raw();
    let workdir_text = workdir.display().to_string();
    let mut strays = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(own_pid) {
            continue;
        }
        let proc_dir = entry.path();
        let command = std::fs::read(proc_dir.join("cmdline"))
            .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " ").trim().to_owned())
            .unwrap_or_default();
        let in_workdir = std::fs::read_link(proc_dir.join("cwd")).is_ok_and(|cwd| cwd.starts_with(workdir));
        if !in_workdir && !command.contains(&workdir_text) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
            continue;
        };
        // After the parenthesised command name: state, parent pid, process group.
        let group = stat
            .rsplit_once(')')
            .and_then(|(_, fields)| fields.split_whitespace().nth(2))
            .and_then(|group| group.parse::<i32>().ok());
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, fields)| fields.trim_start().starts_with('Z'));
        match group {
            Some(group) if group > 1 && group != own_group && !zombie => {
                strays.push(StrayProcess { pid, group, command })
            }
            _ => {}
        }
    }
    strays
}
