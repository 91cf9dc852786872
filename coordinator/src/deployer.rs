//! Carries out deployments: plans the waves ([`crate::planner`]), drives the
//! pure rollout machine ([`crate::rollout`]) with agent reports, ticks and
//! operator actions, persists every new state before acting on it, turns its
//! commands into instance wishes ([`crate::wishes`]), approves the release
//! when a deployment succeeds, and resumes running deployments after a
//! coordinator restart. Drain and undrain commands go to the stack's traffic
//! provider instead of an agent: queued as [`TrafficJob`]s, carried out by
//! [`run_traffic_jobs`], their outcome fed back as reports.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use rollwave_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, mpsc};

use crate::grpc::Shared;
use crate::health::HealthState;
use crate::model::unix_ms;
use crate::planner::{self, Candidate, Health, Plan, Strategy, WaveKind};
use crate::presence::Presence;
use crate::rollout::{Action, Input, InstanceState, Phase, Report, Rollout, RolloutError, RolloutOptions};
use crate::store::{DeploymentRow, DeploymentUpdate, StoreError};
use crate::traffic::{self, DrainOutcome, TrafficSettings, TrafficTarget};
use crate::wishes::{self, Wish};
use crate::wording::count_of;

/// Running deployments, by id; one lock so every step is taken in order.
#[derive(Debug)]
pub struct Deployer {
    running: Mutex<BTreeMap<String, Live>>,
    /// The last health verdict stored per (instance, bundle): agents report every few
    /// seconds, the store is written only when the verdict or the version changes.
    last_health: std::sync::Mutex<BTreeMap<(String, String), crate::store::HealthRow>>,
    /// Drains and undrains for [`run_traffic_jobs`]; queued after the step that issued them is stored.
    traffic_jobs: mpsc::UnboundedSender<TrafficJob>,
    traffic_queue: std::sync::Mutex<Option<mpsc::UnboundedReceiver<TrafficJob>>>,
}

impl Default for Deployer {
    fn default() -> Self {
        let (traffic_jobs, queue) = mpsc::unbounded_channel();
        Deployer {
            running: Mutex::default(),
            last_health: std::sync::Mutex::default(),
            traffic_jobs,
            traffic_queue: std::sync::Mutex::new(Some(queue)),
        }
    }
}

/// One drain or undrain to carry out for a deployment.
#[derive(Debug, Clone)]
pub struct TrafficJob {
    deployment: String,
    epoch: u64,
    action: Action,
    instance: String,
    /// The provider of the instance's layer, if the stack has one for it, and the instance's name there.
    via: Option<(TrafficSettings, Result<TrafficTarget, String>)>,
}

/// What a deployment stores besides its row: the rollout and what it was planned from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub rollout: Rollout,
    /// Per planned wave: "canary", "zone" or "all", and the zone.
    pub wave_labels: Vec<(String, String)>,
    /// The approved version when it started, if any.
    pub previous: Option<String>,
    /// How it ended, in words.
    pub reason: Option<String>,
    /// The stack's traffic settings when it started, by layer, when it drains.
    #[serde(default)]
    pub traffic: BTreeMap<String, TrafficSettings>,
    /// Made by `rollwave rollback`: its approval steps back through the history rather than forward.
    #[serde(default)]
    pub rollback: bool,
}

#[derive(Debug, Clone)]
struct Live {
    row: DeploymentRow,
    record: Record,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Plan(#[from] planner::PlanError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error("{0}")]
    Invalid(String),
    #[error("deployment {id} of {bundle} to {stack} is running; wait for it, or `rollwave deployment abort {id}`")]
    AlreadyRunning { id: String, stack: String, bundle: String },
    #[error("deployment {0} does not exist")]
    NotFound(String),
    #[error("deployment {id} is {status}; only a running deployment can be {done}")]
    NotRunning {
        id: String,
        status: String,
        /// The action's past participle: "paused", "resumed", "aborted".
        done: &'static str,
    },
    #[error(
        "stack {stack} has no traffic provider to drain instances from; set one with `rollwave traffic set {stack} ...`, or deploy without --drain"
    )]
    NoTrafficProvider { stack: String },
}

/// The input for an operator's action on a deployment, and the action's past participle for messages.
pub fn control_input(action: &str) -> Result<(Input, &'static str), DeployError> {
    match action {
        "pause" => Ok((Input::Pause, "paused")),
        "resume" => Ok((Input::Resume, "resumed")),
        "abort" => Ok((Input::Abort, "aborted")),
        other => Err(DeployError::Invalid(format!(
            "unknown action {other:?}: pause, resume or abort"
        ))),
    }
}

/// What an operator asked for.
#[derive(Debug, Clone)]
pub struct DeploymentRequest {
    pub stack: String,
    pub bundle: String,
    pub version: String,
    pub strategy: Strategy,
    pub options: RolloutOptions,
    pub failure_threshold: planner::Amount,
    pub plan_only: bool,
    /// `None`: drain when the stack has a traffic provider.
    pub drain: Option<bool>,
    /// Made by `rollwave rollback` (see [`Record::rollback`]).
    pub rollback: bool,
}

/// What creating a deployment produced.
#[derive(Debug, Clone)]
pub struct Created {
    pub plan: Plan,
    /// How instances are drained, per layer with settings, in words; or why they are not.
    pub drain: Vec<String>,
    pub deployment: Option<pb::Deployment>,
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// `running`, `succeeded`, `failed` or `aborted`.
fn status_of(rollout: &Rollout) -> &'static str {
    match rollout.phase {
        Phase::Succeeded => "succeeded",
        Phase::Failed { .. } => "failed",
        Phase::Aborted { .. } => "aborted",
        _ => "running",
    }
}

/// How a finished deployment ended, in words.
fn reason_of(rollout: &Rollout) -> Option<String> {
    let unrecovered = |instances: &[String]| {
        if instances.is_empty() {
            String::new()
        } else {
            format!("; could not switch back: {}", instances.join(", "))
        }
    };
    match &rollout.phase {
        Phase::Succeeded => Some("every wave settled".into()),
        Phase::Failed {
            reason,
            switch_back_failed,
        } => Some(format!("{reason}{}", unrecovered(switch_back_failed))),
        Phase::Aborted { switch_back_failed } => {
            Some(format!("aborted by an operator{}", unrecovered(switch_back_failed)))
        }
        _ => None,
    }
}

fn phase_name(rollout: &Rollout) -> String {
    match &rollout.phase {
        Phase::Created => "created".into(),
        Phase::Preparing => "preparing".into(),
        Phase::Wave { index, bake_until_ms } => {
            let baking = if bake_until_ms.is_some() { ", baking" } else { "" };
            format!("wave {}/{}{baking}", index + 1, rollout.waves.len())
        }
        Phase::RollingBack { .. } => "rolling back".into(),
        Phase::Succeeded => "succeeded".into(),
        Phase::Failed { .. } => "failed".into(),
        Phase::Aborted { .. } => "aborted".into(),
        Phase::Finishing { .. } => "returning traffic".into(),
    }
}

fn is_target(rollout: &Rollout, instance: &str) -> bool {
    rollout.targets.contains_key(instance)
}

/// State label and detail of one target, for views.
fn instance_state(rollout: &Rollout, instance: &str) -> (String, String) {
    match rollout.targets.get(instance) {
        None => ("unknown".into(), String::new()),
        Some(target) => {
            let detail = match &target.state {
                InstanceState::Failed { reason, .. } | InstanceState::SwitchBackFailed { reason } => reason.clone(),
                _ => String::new(),
            };
            (target.label().to_owned(), detail)
        }
    }
}

/// The planner's view of the stack for `bundle`.
async fn candidates(shared: &Shared, stack: &str, bundle: &str) -> Result<Vec<Candidate>, StoreError> {
    let now = now_ms();
    let instances = shared.store.list_instances(Some(stack)).await?;
    let pinned: BTreeSet<String> = shared
        .store
        .pins(stack)
        .await?
        .into_iter()
        .filter(|pin| pin.bundle == bundle)
        .map(|pin| pin.instance_id)
        .collect();
    let verdicts = shared.store.health(stack).await?;
    Ok(instances
        .into_iter()
        .map(|instance| {
            let presence = shared.settings.presence.presence(
                shared.sessions.is_connected(&instance.id),
                instance.last_seen_ms,
                now,
            );
            // Verdicts on releases the instance runs: a bundle it no longer runs says nothing.
            let verdicts = verdicts.iter().filter(|verdict| {
                verdict.instance_id == instance.id
                    && instance
                        .observed
                        .iter()
                        .any(|release| release.bundle == verdict.bundle && release.version == verdict.version)
            });
            let health = match presence {
                Presence::Lost => Health::Lost,
                _ => match crate::health::instance_health_state(verdicts, presence == Presence::Online, now) {
                    HealthState::Healthy => Health::Healthy,
                    HealthState::Unhealthy => Health::Unhealthy,
                    HealthState::Unknown | HealthState::Stale => Health::Unknown,
                },
            };
            Candidate {
                pinned: pinned.contains(&instance.id),
                id: instance.id,
                zone: instance.facts.zone,
                layer: instance.facts.layer,
                health,
            }
        })
        .collect())
}

fn wave_label(kind: &WaveKind) -> (String, String) {
    match kind {
        WaveKind::Canary => ("canary".into(), String::new()),
        WaveKind::Zone(zone) => ("zone".into(), zone.clone()),
        WaveKind::All => ("all".into(), String::new()),
    }
}

impl Deployer {
    /// Plans, and unless `plan_only` starts, a deployment.
    pub async fn create(
        &self,
        shared: &Shared,
        actor: &str,
        request: DeploymentRequest,
    ) -> Result<Created, DeployError> {
        shared.store.get_stack(&request.stack).await?;
        shared.store.get_release(&request.bundle, &request.version).await?;
        let candidates = candidates(shared, &request.stack, &request.bundle).await?;
        let plan = if candidates
            .iter()
            .all(|candidate| candidate.pinned || candidate.health == Health::Lost)
        {
            // Nothing to update: the release is approved at once, for instances to come.
            Plan {
                waves: Vec::new(),
                skipped: Vec::new(),
                stack_size: 0,
                healthy_total: 0,
                min_healthy: 0,
            }
        } else {
            planner::plan(&candidates, &request.strategy)?
        };
        let stack_traffic = shared.store.traffic(&request.stack).await?;
        let drain = match request.drain {
            Some(true) if stack_traffic.is_empty() => {
                return Err(DeployError::NoTrafficProvider {
                    stack: request.stack.clone(),
                });
            }
            Some(drain) => drain,
            // All at once drains every instance together, leaving the load balancer empty: only when asked.
            None => {
                !stack_traffic.is_empty() && !plan.waves.is_empty() && matches!(request.strategy, Strategy::Rolling(_))
            }
        };
        let off_because = if drain {
            None
        } else if stack_traffic.is_empty() {
            Some("none: the stack has no traffic provider (see `rollwave traffic set`)")
        } else if request.drain == Some(false) {
            Some("none: --no-drain")
        } else if plan.waves.is_empty() {
            Some("none: no instance to update")
        } else {
            Some(
                "none: all at once would take every instance out of the load balancer together (--drain does it anyway)",
            )
        };
        let traffic = if drain { stack_traffic } else { BTreeMap::new() };
        let mut drain_lines: Vec<String> = off_because.map(str::to_owned).into_iter().collect();
        drain_lines.extend(traffic.iter().map(|(layer, settings)| {
            let whose = if layer.is_empty() {
                "each instance".to_owned()
            } else {
                format!("each instance of layer {layer}")
            };
            format!(
                "{whose} is drained ({}) before it is activated and returned once healthy",
                settings.describe()
            )
        }));
        if request.plan_only {
            return Ok(Created {
                plan,
                drain: drain_lines,
                deployment: None,
            });
        }
        let mut running = self.running.lock().await;
        if let Some(live) = running
            .values()
            .find(|live| live.row.stack == request.stack && live.row.bundle == request.bundle)
        {
            return Err(DeployError::AlreadyRunning {
                id: live.row.id.clone(),
                stack: request.stack,
                bundle: request.bundle,
            });
        }
        let targets: u32 = plan
            .waves
            .iter()
            .map(|wave| wave.instances.len())
            .sum::<usize>()
            .try_into()
            .unwrap_or(u32::MAX);
        let mut options = request.options.clone();
        options.failure_threshold = request.failure_threshold.of(targets);
        options.drain = drain;
        options.switch_back_batch = plan.switch_back_batch();
        let previous = shared
            .store
            .approved(&request.stack)
            .await?
            .into_iter()
            .find(|approval| approval.bundle == request.bundle)
            .map(|approval| approval.version);
        options.first_release = previous.is_none();
        let epoch = shared.store.next_epoch().await?;
        let now = now_ms();
        let waves: Vec<Vec<String>> = plan.waves.iter().map(|wave| wave.instances.clone()).collect();
        let rollout = Rollout::new(waves, options, epoch, now)?;
        let id = new_id();
        let record = Record {
            rollout,
            wave_labels: plan.waves.iter().map(|wave| wave_label(&wave.kind)).collect(),
            previous,
            reason: None,
            traffic,
            rollback: request.rollback,
        };
        let row = DeploymentRow {
            id: id.clone(),
            generation: 0,
            stack: request.stack.clone(),
            bundle: request.bundle.clone(),
            version: request.version.clone(),
            epoch,
            status: "running".into(),
            state: encode(&record)?,
            created_by: actor.to_owned(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        shared.store.create_deployment(&row).await?;
        shared
            .audit(
                actor,
                "deployment.create",
                &format!("{}/{}@{}", row.stack, row.bundle, row.version),
                "ok",
                format!("id {id}, {}", count_of(record.wave_labels.len(), "wave", "waves")),
            )
            .await;
        let mut live = Live { row, record };
        advance(shared, &mut live, Input::Start, now).await?;
        let view = view(&live);
        if live.record.rollout.is_finished() {
            drop(running);
        } else {
            running.insert(id, live);
        }
        Ok(Created {
            plan,
            drain: drain_lines,
            deployment: Some(view),
        })
    }

    /// Resumes the deployments a stopped coordinator left running.
    pub async fn resume_all(&self, shared: &Shared) -> Result<(), DeployError> {
        let mut running = self.running.lock().await;
        for row in shared.store.list_deployments(None, true).await? {
            let record: Record = decode(&row.state)?;
            let mut live = Live { row, record };
            tracing::info!(deployment = %live.row.id, "resuming a deployment after restart");
            advance(shared, &mut live, Input::Restarted, now_ms()).await?;
            if !live.record.rollout.is_finished() {
                // Commands lost to the crash that `outstanding` does not re-send (a Revert).
                settle_wishes(shared, &live, false).await?;
                running.insert(live.row.id.clone(), live);
            }
        }
        Ok(())
    }

    /// Feeds `input` to deployment `id` (operator actions).
    pub async fn control(
        &self,
        shared: &Shared,
        actor: &str,
        id: &str,
        action: &str,
    ) -> Result<pb::Deployment, DeployError> {
        let (input, done) = control_input(action)?;
        let mut running = self.running.lock().await;
        let Some(live) = running.get_mut(id) else {
            let row = shared
                .store
                .get_deployment(id)
                .await?
                .ok_or_else(|| DeployError::NotFound(id.to_owned()))?;
            return Err(DeployError::NotRunning {
                id: id.to_owned(),
                status: row.status,
                done,
            });
        };
        advance(shared, live, input, now_ms()).await?;
        shared
            .audit(actor, &format!("deployment.{action}"), id, "ok", String::new())
            .await;
        let view = view(live);
        if live.record.rollout.is_finished() {
            running.remove(id);
        }
        Ok(view)
    }

    /// Passes time: deadlines, bake, lost instances.
    pub async fn tick(&self, shared: &Shared) {
        let now = now_ms();
        let mut running = self.running.lock().await;
        let mut finished = Vec::new();
        for (id, live) in running.iter_mut() {
            let lost = match lost_targets(shared, live, now).await {
                Ok(lost) => lost,
                Err(error) => {
                    tracing::warn!(deployment = %id, %error, "cannot check presence");
                    Vec::new()
                }
            };
            let mut inputs: Vec<Input> = lost.into_iter().map(Input::InstanceLost).collect();
            inputs.push(Input::Tick);
            for input in inputs {
                if let Err(error) = advance(shared, live, input, now).await {
                    tracing::error!(deployment = %id, %error, "cannot advance the deployment");
                }
            }
            if live.record.rollout.is_finished() {
                finished.push(id.clone());
            }
        }
        for id in finished {
            running.remove(&id);
        }
    }

    /// An agent's progress event.
    pub async fn on_progress(&self, shared: &Shared, instance_id: &str, event: &pb::ProgressEvent) {
        let report = |live: &Live| -> Option<Report> {
            let done = event.state == "done";
            if event.step == "prepare" && event.version == live.row.version {
                return Some(if done {
                    Report::Prepared
                } else {
                    Report::PrepareFailed(event.message.clone())
                });
            }
            if event.step != "activate" {
                return None;
            }
            if event.version == live.row.version {
                Some(if done {
                    Report::Activated
                } else {
                    Report::ActivateFailed(event.message.clone())
                })
            } else if Some(&event.version) == live.record.previous.as_ref() {
                Some(if done {
                    Report::SwitchedBack
                } else {
                    Report::SwitchBackFailed(event.message.clone())
                })
            } else {
                None
            }
        };
        self.feed(shared, instance_id, &event.bundle, |live| report(live)).await;
    }

    /// An agent's health report (recorded for status; fed to a deployment of that release). An
    /// exit of the release's app is a report of its own kind.
    pub async fn on_health(&self, shared: &Shared, instance_id: &str, event: &pb::HealthEvent) {
        let now = now_ms();
        let mut row = crate::store::HealthRow {
            instance_id: instance_id.to_owned(),
            bundle: event.bundle.clone(),
            version: event.version.clone(),
            healthy: event.healthy,
            detail: event.detail.clone(),
            since_ms: now,
            observed_at_ms: now,
            check_interval_ms: i64::from(event.check_interval_ms),
            app_restarts: i64::from(event.app_restarts),
            last_exit: event.last_exit.clone(),
            last_exit_at_ms: event.last_exit_at_unix_ms,
        };
        let key = (instance_id.to_owned(), event.bundle.clone());
        let write = {
            let mut last = self
                .last_health
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let stored = last.get(&key);
            let write = crate::health::needs_write(stored, &row);
            if write {
                if row.check_interval_ms == 0 {
                    row.check_interval_ms = stored.map_or(0, |stored| stored.check_interval_ms);
                }
                last.insert(key.clone(), row.clone());
            }
            write
        };
        if write && let Err(error) = shared.store.record_health(&row).await {
            tracing::warn!(instance = %instance_id, %error, "cannot record health");
            // Try again with the next report.
            self.last_health
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&key);
        }
        self.feed(shared, instance_id, &event.bundle, |live| {
            (event.version == live.row.version).then(|| {
                if event.app_exited {
                    Report::Exited(event.detail.clone())
                } else if event.healthy {
                    Report::Healthy
                } else {
                    Report::Unhealthy(event.detail.clone())
                }
            })
        })
        .await;
    }

    /// An instance said hello: deployments of its stack take it on if it is new to them.
    pub async fn on_hello(&self, shared: &Shared, instance_id: &str, stack: &str) {
        let now = now_ms();
        let mut running = self.running.lock().await;
        for live in running.values_mut().filter(|live| live.row.stack == stack) {
            if is_target(&live.record.rollout, instance_id) {
                continue;
            }
            let pinned = match shared.store.pins(stack).await {
                Ok(pins) => pins
                    .iter()
                    .any(|pin| pin.instance_id == instance_id && pin.bundle == live.row.bundle),
                Err(_) => false,
            };
            if pinned {
                continue;
            }
            if let Err(error) = advance(shared, live, Input::InstanceJoined(instance_id.to_owned()), now).await {
                tracing::error!(deployment = %live.row.id, %error, "cannot add a joining instance");
            }
        }
    }

    async fn feed(&self, shared: &Shared, instance_id: &str, bundle: &str, report: impl Fn(&Live) -> Option<Report>) {
        let now = now_ms();
        let mut running = self.running.lock().await;
        let mut finished = None;
        for (id, live) in running.iter_mut().filter(|(_, live)| live.row.bundle == bundle) {
            if !is_target(&live.record.rollout, instance_id) {
                continue;
            }
            let Some(report) = report(live) else { continue };
            let input = Input::Report {
                instance: instance_id.to_owned(),
                report,
            };
            if let Err(error) = advance(shared, live, input, now).await {
                tracing::error!(deployment = %id, %error, "cannot advance the deployment");
            }
            if live.record.rollout.is_finished() {
                finished = Some(id.clone());
            }
        }
        if let Some(id) = finished {
            running.remove(&id);
        }
    }

    /// A deployment as the operator sees it (running ones from memory).
    pub async fn get(&self, shared: &Shared, id: &str) -> Result<pb::Deployment, DeployError> {
        if let Some(live) = self.running.lock().await.get(id) {
            return Ok(view(live));
        }
        let row = shared
            .store
            .get_deployment(id)
            .await?
            .ok_or_else(|| DeployError::NotFound(id.to_owned()))?;
        let record = decode(&row.state)?;
        Ok(view(&Live { row, record }))
    }

    pub async fn list(&self, shared: &Shared, stack: Option<&str>) -> Result<Vec<pb::Deployment>, DeployError> {
        let rows = shared.store.list_deployments(stack, false).await?;
        let running = self.running.lock().await;
        rows.into_iter()
            .map(|row| match running.get(&row.id) {
                Some(live) => Ok(view(live)),
                None => {
                    let record = decode(&row.state)?;
                    Ok(view(&Live { row, record }))
                }
            })
            .collect()
    }

    /// The traffic provider's answer to a drain or undrain of deployment `id`.
    pub async fn on_traffic(&self, shared: &Shared, id: &str, epoch: u64, instance: &str, report: Report) {
        let now = now_ms();
        let mut running = self.running.lock().await;
        let Some(live) = running.get_mut(id) else {
            return; // finished meanwhile
        };
        if live.record.rollout.epoch != epoch {
            return;
        }
        let input = Input::Report {
            instance: instance.to_owned(),
            report,
        };
        if let Err(error) = advance(shared, live, input, now).await {
            tracing::error!(deployment = %id, %error, "cannot advance the deployment");
        }
        if live.record.rollout.is_finished() {
            running.remove(id);
        }
    }

    /// Instances of `stack` that deployments took out of the load balancer and have not returned
    /// (yet), as "instance: why (deployment id)"; from the latest deployment of each bundle.
    pub async fn out_of_service(&self, shared: &Shared, stack: &str) -> Result<Vec<String>, DeployError> {
        let rows = shared.store.list_deployments(Some(stack), false).await?;
        let running = self.running.lock().await;
        let mut seen_bundles = BTreeSet::new();
        let mut lines = Vec::new();
        for row in rows {
            let rollout = match running.get(&row.id) {
                Some(live) => live.record.rollout.clone(),
                None => decode(&row.state)?.rollout,
            };
            // Rows come newest first; an older deployment of the same bundle is history.
            if !seen_bundles.insert(row.bundle.clone()) {
                continue;
            }
            for (instance, why) in rollout.out_of_service() {
                lines.push(format!("{instance}: {why} (deployment {})", row.id));
            }
        }
        Ok(lines)
    }

    /// The running deployment of `stack` and `bundle`, if any.
    pub async fn running_id(&self, stack: &str, bundle: &str) -> Option<String> {
        self.running
            .lock()
            .await
            .values()
            .find(|live| live.row.stack == stack && live.row.bundle == bundle)
            .map(|live| live.row.id.clone())
    }
}

async fn lost_targets(shared: &Shared, live: &Live, now: i64) -> Result<Vec<String>, StoreError> {
    let mut lost = Vec::new();
    for instance in shared.store.list_instances(Some(&live.row.stack)).await? {
        if !is_target(&live.record.rollout, &instance.id) {
            continue;
        }
        let presence =
            shared
                .settings
                .presence
                .presence(shared.sessions.is_connected(&instance.id), instance.last_seen_ms, now);
        if presence == Presence::Lost {
            lost.push(instance.id);
        }
    }
    Ok(lost)
}

/// Whether two rollout states differ only in the time of their last input.
fn same_but_for_time(next: &Rollout, current: &Rollout) -> bool {
    next.last_step_ms >= current.last_step_ms
        && Rollout {
            last_step_ms: current.last_step_ms,
            ..next.clone()
        } == *current
}

fn encode(record: &Record) -> Result<String, StoreError> {
    serde_json::to_string(record).map_err(|error| StoreError::Corrupt(error.to_string()))
}

fn decode(state: &str) -> Result<Record, StoreError> {
    serde_json::from_str(state).map_err(|error| StoreError::Corrupt(format!("deployment state: {error}")))
}

fn new_id() -> String {
    let mut bytes = [0u8; 6];
    let _ = getrandom::fill(&mut bytes);
    format!("d-{}", hex::encode(bytes))
}

/// Takes one step: persists the new state (approving first when it succeeded),
/// then sends the commands as wishes.
async fn advance(shared: &Shared, live: &mut Live, input: Input, now: i64) -> Result<(), StoreError> {
    let (next, commands) = live.record.rollout.step(input, now);
    if commands.is_empty() && same_but_for_time(&next, &live.record.rollout) {
        // Nothing happened (a repeated report, a quiet tick): keep the stored state as it is.
        // After a restart the machine then counts the time since this stored state as downtime,
        // which only moves deadlines later, never earlier.
        live.record.rollout = next;
        return Ok(());
    }
    let was_finished = live.record.rollout.is_finished();
    // The step is taken in memory only once it is stored: a write that fails (other than by a
    // stale generation, handled below) leaves memory as it was, so nothing believes commands
    // went out that never did, and the next input retries from the stored state.
    let mut record = live.record.clone();
    record.rollout = next;
    let status = status_of(&record.rollout);
    let finished_now = record.rollout.is_finished() && !was_finished;
    if finished_now {
        record.reason = reason_of(&record.rollout);
    }
    let state = encode(&record)?;
    // Fenced by the generation this step started from; success approves in the same transaction.
    let update = DeploymentUpdate {
        expected_generation: live.row.generation,
        status,
        state: &state,
        now_ms: now,
        approve: finished_now && status == "succeeded",
        rollback: record.rollback,
    };
    live.row.generation = match shared.store.update_deployment(&live.row.id, &update).await {
        Ok(generation) => generation,
        Err(error) => {
            if matches!(error, StoreError::StaleDeployment { .. }) {
                adopt_stored(shared, live).await;
            }
            return Err(error);
        }
    };
    live.record = record;
    live.row.status = status.to_owned();
    live.row.state = state;
    live.row.updated_at_ms = now;

    for command in commands {
        let instance = &command.instance;
        if command.action.is_traffic() {
            queue_traffic_job(shared, live, &command).await;
            continue;
        }
        let Ok(instance_record) = shared.store.get_instance(instance).await else {
            // Removed meanwhile: its loss is the rollout's business.
            continue;
        };
        let mut wish = wishes::wish_of(shared, instance, &instance_record.stack).await?;
        apply_change(&mut wish, live, command.action);
        wishes::send(shared, instance, &wish).await?;
        if command.action == Action::SwitchBack && !command.resend {
            let back_to = live.record.previous.as_deref().unwrap_or("no release");
            shared
                .audit(
                    "coordinator",
                    "deployment.switch_back",
                    instance,
                    "sent",
                    format!("to {back_to}; deployment {}", live.row.id),
                )
                .await;
        }
    }
    if finished_now {
        settle_wishes(shared, live, true).await?;
        shared
            .audit(
                "coordinator",
                &format!("deployment.{status}"),
                &live.row.id,
                status,
                live.record.reason.clone().unwrap_or_default(),
            )
            .await;
        tracing::info!(deployment = %live.row.id, status, reason = ?live.record.reason, "deployment finished");
    }
    Ok(())
}

/// Another writer moved the deployment on: nothing of this stale step is acted on, and the next
/// step starts from the stored state (a finished one is then dropped by the caller).
async fn adopt_stored(shared: &Shared, live: &mut Live) {
    let stored = match shared.store.get_deployment(&live.row.id).await {
        Ok(Some(row)) => decode(&row.state).map(|record| (row, record)),
        Ok(None) => Err(StoreError::NoSuchDeployment(live.row.id.clone())),
        Err(error) => Err(error),
    };
    match stored {
        Ok((row, record)) => *live = Live { row, record },
        Err(error) => tracing::error!(deployment = %live.row.id, %error, "cannot reload the stored deployment"),
    }
}

/// Brings the stored wishes of a deployment's targets in line with its state, idempotently: an
/// instance that is back on the previous release (it switched itself back, or never switched) is
/// not wished the deployment's release (a Revert lost to a coordinator crash between persisting a
/// step and sending it is made good here, at restart and at the end); and, once the deployment
/// has `finished`, targets drop the release they prepared and their wish no longer names the
/// deployment, so the agent treats it as the stack's approved state again (an install of it that
/// fails is retried and reported, not left to a deployment that is over).
async fn settle_wishes(shared: &Shared, live: &Live, finished: bool) -> Result<(), StoreError> {
    let bundle = &live.row.bundle;
    let key = (bundle.clone(), live.row.version.clone());
    for (instance, target) in &live.record.rollout.targets {
        let back_on_previous = matches!(
            target.state,
            InstanceState::Failed {
                needs_switch_back: false,
                ..
            } | InstanceState::SwitchedBack
                | InstanceState::Pending
                | InstanceState::Preparing
                | InstanceState::Prepared
        );
        let Ok(record) = shared.store.get_instance(instance).await else {
            continue;
        };
        let mut wish = wishes::wish_of(shared, instance, &record.stack).await?;
        let mut changed = false;
        if back_on_previous && wish.active.get(bundle) == Some(&live.row.version) {
            apply_change(&mut wish, live, Action::Revert);
            changed = true;
        }
        if finished {
            changed |= wish.prepare.remove(&key);
            if wish.deployment_id == live.row.id {
                wish.deployment_id.clear();
                changed = true;
            }
        }
        if changed {
            wishes::send(shared, instance, &wish).await?;
        }
    }
    Ok(())
}

fn apply_change(wish: &mut Wish, live: &Live, change: Action) {
    let bundle = live.row.bundle.clone();
    let key = (bundle.clone(), live.row.version.clone());
    wish.deployment_id = live.row.id.clone();
    match change {
        Action::Prepare => {
            if wish.active.get(&bundle) != Some(&live.row.version) {
                wish.prepare.insert(key);
            }
        }
        Action::Activate => {
            wish.prepare.remove(&key);
            wish.active.insert(bundle, live.row.version.clone());
        }
        // The agent switched itself back (Revert) or is asked to (SwitchBack): either way the instance should
        // run the previous release again, and a later push must not activate this one.
        Action::SwitchBack | Action::Revert => {
            wish.prepare.remove(&key);
            match &live.record.previous {
                Some(previous) => {
                    wish.active.insert(bundle, previous.clone());
                }
                None => {
                    wish.active.remove(&bundle);
                }
            }
        }
        // Carried out by the traffic provider (see `queue_traffic_job`).
        Action::Drain | Action::Undrain => {}
    }
}

/// Queues a drain or undrain for [`run_traffic_jobs`], with the provider of the instance's layer
/// and its name there.
async fn queue_traffic_job(shared: &Shared, live: &Live, command: &crate::rollout::Command) {
    let via = match shared.store.get_instance(&command.instance).await {
        // Removed meanwhile: nothing can name it; the provider is told nothing and the rollout goes on.
        Err(_) => None,
        Ok(record) => traffic::for_layer(&live.record.traffic, &record.facts.layer).map(|settings| {
            let target = settings
                .target_of(&command.instance, &record.facts)
                .map_err(|error| error.to_string());
            (settings.clone(), target)
        }),
    };
    let job = TrafficJob {
        deployment: live.row.id.clone(),
        epoch: live.record.rollout.epoch,
        action: command.action,
        instance: command.instance.clone(),
        via,
    };
    if shared.deployer.traffic_jobs.send(job).is_err() {
        tracing::error!(deployment = %live.row.id, "the traffic worker is gone; the drain waits for its deadline");
    }
}

/// Carries out queued drains and undrains, each in its own task (a wave's instances drain at the
/// same time), and feeds each outcome back to its deployment. Runs for the coordinator's life.
pub async fn run_traffic_jobs(shared: Arc<Shared>) {
    let queue = shared
        .deployer
        .traffic_queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let Some(mut queue) = queue else {
        tracing::error!("the traffic worker was started twice");
        return;
    };
    while let Some(job) = queue.recv().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let report = carry_out(&shared, &job).await;
            shared
                .deployer
                .on_traffic(&shared, &job.deployment, job.epoch, &job.instance, report)
                .await;
        });
    }
}

/// Drains or undrains one instance; the report says how it went. Every failure names the
/// instance, the provider and what to check.
async fn carry_out(shared: &Shared, job: &TrafficJob) -> Report {
    let draining = job.action == Action::Drain;
    let failed = |message: String| {
        if draining {
            Report::DrainFailed(message)
        } else {
            Report::UndrainFailed(message)
        }
    };
    let Some((settings, target)) = &job.via else {
        // Not behind this stack's load balancer (no settings for its layer): nothing to do.
        return if draining { Report::Drained } else { Report::Undrained };
    };
    let target = match target {
        Ok(target) => target,
        Err(error) => return failed(error.clone()),
    };
    let provider = match settings.provider().await {
        Ok(provider) => provider,
        Err(error) => return failed(error.to_string()),
    };
    let (report, outcome, detail) = if draining {
        match provider.drain(target, settings.drain_timeout()).await {
            Ok(DrainOutcome::Drained { waited }) => (Report::Drained, "ok", format!("drained in {waited:?}")),
            Ok(DrainOutcome::TimedOut {
                waited,
                remaining_sessions,
            }) => {
                let sessions = remaining_sessions.map_or_else(String::new, |count| format!(", {count} sessions left"));
                (
                    Report::Drained,
                    "timed out",
                    format!("drain timeout passed after {waited:?}{sessions}; out of service anyway"),
                )
            }
            Err(error) => (failed(error.to_string()), "failed", error.to_string()),
        }
    } else {
        match provider.undrain(target).await {
            Ok(()) => (Report::Undrained, "ok", String::new()),
            Err(error) => (failed(error.to_string()), "failed", error.to_string()),
        }
    };
    let action = if draining { "traffic.drain" } else { "traffic.undrain" };
    tracing::info!(deployment = %job.deployment, instance = %job.instance, %target, outcome, %detail, "{action}");
    shared
        .audit(
            "coordinator",
            action,
            &job.instance,
            outcome,
            format!("{target}; deployment {}; {detail}", job.deployment),
        )
        .await;
    report
}

/// The protobuf view of a deployment.
fn view(live: &Live) -> pb::Deployment {
    let rollout = &live.record.rollout;
    let waves = rollout
        .waves
        .iter()
        .enumerate()
        .map(|(index, instances)| {
            let (kind, zone) = live
                .record
                .wave_labels
                .get(index)
                .cloned()
                .unwrap_or_else(|| ("late".into(), String::new()));
            pb::DeploymentWave {
                kind,
                zone,
                instances: instances
                    .iter()
                    .map(|instance| {
                        let (state, detail) = instance_state(rollout, instance);
                        pb::DeploymentInstance {
                            instance_id: instance.clone(),
                            state,
                            detail,
                            traffic: traffic_of(rollout, instance),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    pb::Deployment {
        id: live.row.id.clone(),
        stack: live.row.stack.clone(),
        bundle: live.row.bundle.clone(),
        version: live.row.version.clone(),
        previous_version: live.record.previous.clone().unwrap_or_default(),
        status: live.row.status.clone(),
        phase: phase_name(rollout),
        paused: rollout.is_paused(),
        summary: rollout.summary(),
        waves,
        failures: rollout
            .failures
            .iter()
            .map(|failure| format!("{}: {}", failure.instance, failure.reason))
            .collect(),
        created_by: live.row.created_by.clone(),
        created_at_unix_ms: live.row.created_at_ms,
        updated_at_unix_ms: live.row.updated_at_ms,
        reason: live.record.reason.clone().unwrap_or_default(),
    }
}

/// The load balancer's view of one target for views: empty while in service.
fn traffic_of(rollout: &Rollout, instance: &str) -> String {
    rollout
        .out_of_service()
        .into_iter()
        .find(|(name, _)| name == instance)
        .map(|(_, why)| why)
        .unwrap_or_default()
}
