//! The deployment state machine, pure: given a deployment's state, one input
//! (an agent's report, an operator action, the passing of time) and the time,
//! it returns the next state and the commands to send to agents. No I/O, no
//! clock, no randomness; `reconcile` persists the returned state *before*
//! dispatching the commands, so a crash between the two only loses commands,
//! and [`Rollout::resume`] sends those again.
//!
//! A deployment moves one release onto the targets of a stack, wave by wave:
//!
//! ```text
//!          Start               every target prepared            wave i settled,          last wave settled
//! Created ──────▶ Preparing ──(or failed, within threshold)──▶ Wave 0 ──bake──▶ Wave 1 … ──and baked──▶ Succeeded
//!                     │                                           │
//!                     └──── failures > threshold, or stalled ─────┤
//!                                                                 ├── rollback_on_failure ──▶ RollingBack ──▶ Failed
//!                                                                 └── no rollback ──────────────────────────▶ Failed
//!
//! Abort, from any unfinished phase ──▶ RollingBack ──▶ Aborted
//! ```
//!
//! A rollback ends when every instance it switched back has answered: switched back, failed to, was lost, or
//! stayed silent past `healthy_deadline`. Each target moves on its own:
//!
//! ```text
//! Pending ──Prepare──▶ Preparing ──prepared──▶ Prepared ──Activate, when its wave starts──▶ Activating
//! Activating ──activated──▶ Activated ──healthy without a break for min_healthy_time──▶ Settled
//! any of the above ──prepare or activation failed, lost, healthy_deadline passed──▶ Failed
//! Activating | Activated ──its app exited (it had to stay healthy)──▶ Failed
//! Settled ──unhealthy or lost while the rollout goes on (bakes included)──▶ Failed
//! on rollback: Activating | Activated | Settled | Failed while it may run the release ──SwitchBack──▶ SwitchingBack
//! SwitchingBack ──▶ SwitchedBack | SwitchBackFailed
//! ```
//!
//! Rules the machine keeps (checked by the property tests below):
//! - Activate goes only to instances of the wave that has started, once they
//!   reported prepared, and once each; so no more instances are activating than
//!   the current wave holds, and a wave never starts twice.
//! - An instance receives Prepare, then Activate, then SwitchBack, all for
//!   this deployment's epoch and never out of that order: it is never given
//!   two different targets. A re-send (marked [`Command::resend`]) repeats the
//!   last command the instance was given; agents dedupe by epoch.
//! - While paused, only re-sends go out.
//! - Left to time, every deployment ends: every wait has a deadline.
//!
//! Decisions worth knowing:
//! - **Pause** holds every new command, switch backs included (a failure while
//!   paused enters `RollingBack`, and the switch backs go out on Resume or
//!   Abort). Reports are still recorded, and activated instances still settle or
//!   fail by their deadlines. The progress deadline counts unpaused time only:
//!   Resume moves the progress clock forward by the paused interval (or to now if
//!   something progressed during the pause). Abort also resumes.
//! - **Restart**: see [`Rollout::resume`]. Outstanding commands are re-sent
//!   even while paused, because they were issued before. Coordinator downtime
//!   counts against no deadline, and health continuity is not assumed across it.
//! - **Late joiners** go to the last wave not yet started (or a new final
//!   wave) and get Prepare at once; a wave starts only when all its instances
//!   are done preparing, so a joiner is never activated unprepared.
//! - **Activation failure**: the agent has already switched itself back, so
//!   the instance counts as a failure but gets no SwitchBack. It gets a
//!   [`Action::Revert`] instead: its desired state names the previous release
//!   again, or the next push (a reconnect, the next deployment's prepare)
//!   would activate the failed release, outside any drain.
//! - **Settled instances** of any started wave that turn unhealthy or are lost
//!   count as failures for as long as the rollout goes on, not only during a
//!   bake: a release that goes bad anywhere stops the next wave.
//! - **Abort** always switches back, whatever `rollback_on_failure` says.
//!
//! Time is unix milliseconds passed in by the caller; a clock that steps
//! backwards is treated as standing still. Reports are taken at the time they
//! arrive (the coordinator's clock, not the agent's, so skew does not matter).
//! The caller passes only reports for this deployment's epoch.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wording::count_of;

/// How long an instance must stay healthy, without interruption, to count as settled.
const DEFAULT_MIN_HEALTHY_TIME_MS: i64 = 10_000;
/// How long after its Activate an instance may take to settle.
const DEFAULT_HEALTHY_DEADLINE_MS: i64 = 5 * 60_000;
/// How long the deployment may go without any progress before it fails as stalled.
const DEFAULT_PROGRESS_DEADLINE_MS: i64 = 10 * 60_000;

/// How a deployment proceeds and when it gives up. Fixed when it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutOptions {
    /// How many instances may fail before the deployment fails (a percentage is resolved to a count by the caller).
    pub failure_threshold: u32,
    /// How long an instance must be healthy without interruption to settle.
    pub min_healthy_time_ms: i64,
    /// How long after its Activate an instance may take to settle; also how long a switch back may take.
    pub healthy_deadline_ms: i64,
    /// How long the deployment may go without progress (paused time excluded) before it fails as stalled.
    pub progress_deadline_ms: i64,
    /// How long to keep watching after a wave settled before the next wave starts.
    pub bake_ms: i64,
    /// Whether a failed deployment switches back the instances it activated.
    pub rollback_on_failure: bool,
    /// Whether each instance is drained from the stack's load balancer before it is activated, and returned once it
    /// is healthy (set when the stack has a traffic provider, unless the operator said `--no-drain`).
    #[serde(default)]
    pub drain: bool,
    /// How many instances a rollback switches back at a time (each drained first when the deployment drains, and
    /// returned before the next batch starts): the deployment's batch within the minimum-healthy floor (see
    /// `Plan::switch_back_batch`). 0 switches back every instance at once, as deployments recorded before this
    /// option did.
    #[serde(default)]
    pub switch_back_batch: u32,
    /// The stack had no approved release of the bundle: a switch back has no earlier release to return to, so
    /// instances that need one fail it at once (they keep the release) rather than waiting out the healthy
    /// deadline for an answer no agent sends.
    #[serde(default)]
    pub first_release: bool,
}

impl Default for RolloutOptions {
    fn default() -> Self {
        Self {
            failure_threshold: 0,
            min_healthy_time_ms: DEFAULT_MIN_HEALTHY_TIME_MS,
            healthy_deadline_ms: DEFAULT_HEALTHY_DEADLINE_MS,
            progress_deadline_ms: DEFAULT_PROGRESS_DEADLINE_MS,
            bake_ms: 0,
            rollback_on_failure: true,
            drain: false,
            switch_back_batch: 0,
            first_release: false,
        }
    }
}

/// Why a deployment cannot be created from the given waves and options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    #[error(
        "instance {instance:?} is listed in wave {} and again in wave {}: a target belongs to exactly one wave; \
         fix the wave plan",
        first_wave + 1,
        second_wave + 1
    )]
    DuplicateTarget {
        instance: String,
        /// Index (from 0) of the first wave listing the instance.
        first_wave: usize,
        /// Index (from 0) of the wave listing it again.
        second_wave: usize,
    },
    #[error("rollout option {option} is {value_ms} ms; it must be {expected}")]
    InvalidOption {
        option: &'static str,
        value_ms: i64,
        expected: &'static str,
    },
}

/// One deployment's whole state: what `reconcile` persists (as JSON) and feeds back in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The deployment's epoch, carried by every command; agents ignore commands of older epochs.
    pub epoch: u64,
    /// Fixed at creation.
    pub options: RolloutOptions,
    /// Instance ids, wave by wave. Late joiners are appended to the last wave not yet started, or as a new wave.
    pub waves: Vec<Vec<String>>,
    /// Every target (all waves) and where it stands.
    pub targets: BTreeMap<String, Target>,
    /// Where the deployment as a whole stands.
    pub phase: Phase,
    /// How many waves have started (the current wave is `waves_started - 1`); kept after a failure for the record.
    pub waves_started: usize,
    /// Every instance failure, in the order they happened; their count is held against the threshold.
    pub failures: Vec<Failure>,
    /// When the deployment last made progress (see [`Rollout::step`] for what counts); shifted on resume so that
    /// paused time does not count.
    pub last_progress_ms: i64,
    /// Set while an operator holds the deployment: since when.
    pub paused_since_ms: Option<i64>,
    /// The time of the last input handled; on a restart, the gap to now is the coordinator's downtime.
    pub last_step_ms: i64,
    /// When the prepare phase began: targets that have not prepared within the healthy deadline of it fail
    /// (an agent that is down must not hold the whole deployment until the progress deadline).
    #[serde(default)]
    pub preparing_since_ms: Option<i64>,
    /// The first error of the traffic provider (a drain or an undrain that failed or never answered): it halts the
    /// deployment, whatever the failure threshold says.
    #[serde(default)]
    pub traffic_failure: Option<String>,
}

/// One instance the deployment targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Index (from 0) of its wave in [`Rollout::waves`].
    pub wave: usize,
    /// Where it stands; [`InstanceState::label`] names it for status views.
    pub state: InstanceState,
    /// Where it stands with the load balancer; only a deployment that drains moves it out of service.
    #[serde(default)]
    pub traffic: Traffic,
}

impl Target {
    /// The state's label, or the traffic step in flight ("draining", "undraining"), for status views.
    pub fn label(&self) -> &'static str {
        match self.traffic {
            Traffic::Draining { .. } => "draining",
            Traffic::Undraining { .. } => "undraining",
            _ => self.state.label(),
        }
    }
}

/// Where a target stands with the stack's load balancer.
///
/// ```text
/// InService ──Drain, when its wave starts──▶ Draining ──drained (or the drain failed)──▶ Drained
/// Drained ──Undrain, once healthy again (or at the end)──▶ Undraining ──undrained──▶ InService
///                                                             └──undrain failed or no answer──▶ LeftDrained
/// ```
///
/// A drained instance is returned once the agent reports it healthy on the release (or back on the previous one
/// after a switch back), and otherwise when the deployment ends: the load balancer's own health checks then decide
/// whether it takes traffic. Only instances whose switch back failed, which may still run a release that failed,
/// stay drained on purpose; status views list them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Traffic {
    /// Takes traffic as usual (or the deployment does not drain).
    #[default]
    InService,
    /// Drain sent at `since_ms`; the provider has not answered yet.
    Draining { since_ms: i64 },
    /// Out of the load balancer's rotation (or, after a failed drain, possibly so).
    Drained,
    /// Undrain sent at `since_ms`; the provider has not answered yet.
    Undraining { since_ms: i64 },
    /// The provider could not put it back; it stays out of rotation until an operator acts.
    LeftDrained { reason: String },
}

impl Traffic {
    /// Whether a drain or an undrain is in flight.
    fn is_moving(&self) -> bool {
        matches!(self, Traffic::Draining { .. } | Traffic::Undraining { .. })
    }
}

/// Where one target stands in this deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InstanceState {
    /// Not asked anything yet (the deployment has not started, or is paused, or the instance just joined).
    Pending,
    /// Prepare sent: downloading, verifying, unpacking, running install hooks, without switching.
    Preparing,
    /// The release is staged on the instance; waiting for its wave.
    Prepared,
    /// Activate sent at `since_ms`; the agent has not reported the switch yet.
    Activating { since_ms: i64 },
    /// The agent switched to the release (Activate was sent at `since_ms`); healthy without interruption since
    /// `healthy_since_ms`, if it is.
    Activated {
        since_ms: i64,
        healthy_since_ms: Option<i64>,
    },
    /// Was healthy for the minimum time; counts as done (became so at `since_ms`).
    Settled { since_ms: i64 },
    /// Counted against the failure threshold.
    Failed {
        /// What went wrong, as recorded in [`Rollout::failures`].
        reason: String,
        /// Whether the instance may run the release: Activate was sent and the agent did not report that it
        /// switched itself back. A rollback switches these back.
        needs_switch_back: bool,
    },
    /// SwitchBack sent at `since_ms`.
    SwitchingBack { since_ms: i64 },
    /// The agent reported that it runs the previous release again.
    SwitchedBack,
    /// The switch back failed, the instance was lost, or it did not report in time; it may still run the release.
    SwitchBackFailed {
        /// What the agent reported, "lost", or the deadline that passed.
        reason: String,
    },
}

impl InstanceState {
    /// A short lowercase name for status views.
    pub fn label(&self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Preparing => "preparing",
            InstanceState::Prepared => "prepared",
            InstanceState::Activating { .. } => "activating",
            InstanceState::Activated {
                healthy_since_ms: None, ..
            } => "activated",
            InstanceState::Activated {
                healthy_since_ms: Some(_),
                ..
            } => "healthy",
            InstanceState::Settled { .. } => "settled",
            InstanceState::Failed { .. } => "failed",
            InstanceState::SwitchingBack { .. } => "switching back",
            InstanceState::SwitchedBack => "switched back",
            InstanceState::SwitchBackFailed { .. } => "switch back failed",
        }
    }

    /// Whether the instance is done with preparing, one way or the other.
    fn is_past_preparing(&self) -> bool {
        !matches!(self, InstanceState::Pending | InstanceState::Preparing)
    }

    /// Whether a rollback has to switch this instance back.
    fn needs_switch_back(&self) -> bool {
        matches!(
            self,
            InstanceState::Activating { .. }
                | InstanceState::Activated { .. }
                | InstanceState::Settled { .. }
                | InstanceState::Failed {
                    needs_switch_back: true,
                    ..
                }
        )
    }
}

/// Labels in lifecycle order, for counting in summaries.
const LABEL_ORDER: [&str; 13] = [
    "pending",
    "preparing",
    "prepared",
    "draining",
    "activating",
    "activated",
    "healthy",
    "undraining",
    "settled",
    "failed",
    "switching back",
    "switched back",
    "switch back failed",
];

/// One instance failure, as counted against the threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The instance that failed.
    pub instance: String,
    /// What went wrong, for operators ("prepare failed: …", "lost after activation", …).
    pub reason: String,
    /// When the coordinator counted it.
    pub at_ms: i64,
}

/// Where the deployment as a whole stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Phase {
    /// Created and persisted; nothing sent until [`Input::Start`].
    Created,
    /// Every target is asked to prepare; no instance switches yet.
    Preparing,
    /// Wave `index` (from 0) is activating and settling; once all its instances settled or failed, it bakes until
    /// `bake_until_ms`, after which the next wave may start.
    Wave { index: usize, bake_until_ms: Option<i64> },
    /// Stopped; switching back every instance this deployment activated.
    RollingBack { cause: Cause },
    /// Every wave settled (failures stayed within the threshold).
    Succeeded,
    /// Failures exceeded the threshold or the deployment stalled. `switch_back_failed` lists the instances a
    /// rollback could not return to the previous release (empty when rollback is off: nothing was tried).
    Failed {
        /// Why, for operators: too many failures (with the last one), or stalled.
        reason: String,
        /// Instance ids, in wave order.
        switch_back_failed: Vec<String>,
    },
    /// An operator aborted; `switch_back_failed` as for `Failed`.
    Aborted { switch_back_failed: Vec<String> },
    /// Done but for the load balancer: returning drained instances (see [`Traffic`]) before ending as `outcome`.
    Finishing { outcome: Box<Phase> },
}

/// Why a deployment is rolling back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cause {
    /// The deployment failed; it ends [`Phase::Failed`] with this reason.
    Failure { reason: String },
    /// An operator aborted; it ends [`Phase::Aborted`].
    Abort,
}

/// What an agent reports about this deployment's release on its instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// Downloaded, verified, unpacked, install hooks run; not switched.
    Prepared,
    /// Preparing failed (download, verification, unpacking, install hooks); the message says why.
    PrepareFailed(String),
    /// Switched to the release and its start hooks passed.
    Activated,
    /// Activation failed; the agent already switched itself back to the previous release.
    ActivateFailed(String),
    /// A health observation: all checks pass.
    Healthy,
    /// A health observation: a check fails. Resets the instance's healthy clock.
    Unhealthy(String),
    /// The release's app exited (the agent restarts it). Fails an instance that has yet to stay
    /// healthy for the minimum time; a settled one fails only once its agent reports it unhealthy
    /// (repeated exits are a crash loop).
    Exited(String),
    /// Back on the previous release.
    SwitchedBack,
    /// Switching back failed; the instance may still run the release.
    SwitchBackFailed(String),
    /// The traffic provider took the instance out of rotation.
    Drained,
    /// The traffic provider failed to drain the instance; it may be out of rotation.
    DrainFailed(String),
    /// The traffic provider put the instance back into rotation.
    Undrained,
    /// The traffic provider failed to put the instance back.
    UndrainFailed(String),
}

/// Everything that can happen to a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// Begin: ask every target to prepare.
    Start,
    /// Time passed; drives deadlines, settling and bakes.
    Tick,
    /// An agent's report about its instance.
    Report { instance: String, report: Report },
    /// The coordinator considers the instance lost (no contact for its grace period).
    InstanceLost(String),
    /// An instance joined the stack during the deployment (it already runs the approved release).
    InstanceJoined(String),
    /// Operator: hold the deployment.
    Pause,
    /// Operator: continue a paused deployment.
    Resume,
    /// Operator: stop and switch back every instance this deployment activated.
    Abort,
    /// The coordinator restarted and loaded this state; same as [`Rollout::resume`].
    Restarted,
}

/// What to ask an agent to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The instance whose agent should act.
    pub instance: String,
    /// The deployment's epoch; agents ignore commands of older epochs and dedupe repeats.
    pub epoch: u64,
    /// What to do.
    pub action: Action,
    /// True when this repeats a command issued before (after a restart): the agent may have it already.
    pub resend: bool,
}

/// The three things a deployment asks of an agent, all about the release of the command's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Download, verify, unpack and run install hooks; do not switch.
    Prepare,
    /// Switch to the prepared release, start it, report health.
    Activate,
    /// If running this epoch's release, return to the previous one; either way report switched back.
    SwitchBack,
    /// Nothing for the agent to do: it switched itself back when its activation failed. The instance's desired
    /// state returns to the previous release, so that no later push (a reconnect, the next deployment's prepare)
    /// activates the release that failed there again. Not held by a pause, since nothing changes on the instance.
    Revert,
    /// For the traffic provider, not the agent: take the instance out of the load balancer's rotation.
    Drain,
    /// For the traffic provider, not the agent: put the instance back into rotation.
    Undrain,
}

impl Action {
    /// Whether the traffic provider carries this out (rather than the instance's agent).
    pub fn is_traffic(self) -> bool {
        matches!(self, Action::Drain | Action::Undrain)
    }
}

impl Rollout {
    /// A deployment of `waves` (instance ids; empty waves are dropped) that has not started.
    pub fn new(
        waves: Vec<Vec<String>>,
        options: RolloutOptions,
        epoch: u64,
        now_ms: i64,
    ) -> Result<Rollout, RolloutError> {
        validate(&options)?;
        let waves: Vec<Vec<String>> = waves.into_iter().filter(|wave| !wave.is_empty()).collect();
        let mut targets = BTreeMap::new();
        for (index, wave) in waves.iter().enumerate() {
            for instance in wave {
                let target = Target {
                    wave: index,
                    state: InstanceState::Pending,
                    traffic: Traffic::InService,
                };
                if let Some(earlier) = targets.insert(instance.clone(), target) {
                    return Err(RolloutError::DuplicateTarget {
                        instance: instance.clone(),
                        first_wave: earlier.wave,
                        second_wave: index,
                    });
                }
            }
        }
        Ok(Rollout {
            epoch,
            options,
            waves,
            targets,
            phase: Phase::Created,
            waves_started: 0,
            failures: Vec::new(),
            last_progress_ms: now_ms,
            paused_since_ms: None,
            last_step_ms: now_ms,
            preparing_since_ms: None,
            traffic_failure: None,
        })
    }

    /// Handles one input at `now_ms`: the next state, and the commands to send once it is persisted.
    ///
    /// Transitions that fell due by `now_ms` (deadlines, settling, the end of a bake) happen first, then the
    /// input, then whatever the input made due. A finished deployment ignores every input.
    ///
    /// Progress (for the progress deadline) is: a report or loss that changes an instance's state, an instance
    /// settling, a wave settling, a wave starting, and the start itself. Time spent baking or paused does not
    /// count towards a stall; neither does coordinator downtime (see [`Rollout::resume`]).
    pub fn step(&self, input: Input, now_ms: i64) -> (Rollout, Vec<Command>) {
        let mut next = self.clone();
        let mut commands = Vec::new();
        if self.is_finished() {
            return (next, commands);
        }
        let now_ms = now_ms.max(self.last_step_ms);
        if input != Input::Restarted {
            next.advance(now_ms, &mut commands);
        }
        next.apply(input, now_ms, &mut commands);
        next.advance(now_ms, &mut commands);
        next.last_step_ms = now_ms;
        (next, commands)
    }

    /// Continues after a coordinator restart, from the persisted state: re-sends every outstanding command
    /// (marked [`Command::resend`]), then goes on as [`Rollout::step`] would.
    ///
    /// The downtime (from the last input handled to `now_ms`) is not held against anyone: the progress clock,
    /// activation and switch-back deadlines and the bake move forward by it. Health continuity is not assumed
    /// across it (an unhealthy report may have been lost), so instances that were waiting to settle must be seen
    /// healthy again for the full minimum time. (A caller that skips persisting steps that sent nothing measures
    /// a longer downtime, which only gives more slack.)
    pub fn resume(&self, now_ms: i64) -> (Rollout, Vec<Command>) {
        self.step(Input::Restarted, now_ms)
    }

    /// The commands issued and not yet answered, marked as re-sends: while going forward, Prepare to targets
    /// still preparing and Activate to instances of the current wave that have not reported the switch; while
    /// rolling back, SwitchBack to those still switching back (an unfinished Prepare or Activate is not pushed
    /// again then); and in any unfinished phase, Drain and Undrain the traffic provider has not answered. Useful
    /// too when one agent reconnects.
    pub fn outstanding(&self) -> Vec<Command> {
        if self.is_finished() {
            return Vec::new();
        }
        let going_forward = matches!(self.phase, Phase::Preparing | Phase::Wave { .. });
        let rolling_back = matches!(self.phase, Phase::RollingBack { .. });
        let mut commands = Vec::new();
        for (instance, target) in self.instances_in_wave_order() {
            match target.traffic {
                Traffic::Draining { .. } => commands.push(self.command(instance, Action::Drain, true)),
                Traffic::Undraining { .. } => commands.push(self.command(instance, Action::Undrain, true)),
                _ => {}
            }
            let action = match target.state {
                InstanceState::Preparing if going_forward => Action::Prepare,
                InstanceState::Activating { .. } if going_forward => Action::Activate,
                InstanceState::SwitchingBack { .. } if rolling_back => Action::SwitchBack,
                _ => continue,
            };
            commands.push(self.command(instance, action, true));
        }
        commands
    }

    /// Instances the load balancer is not (or may not be) sending traffic to, with why: drained by this deployment
    /// and not yet returned, or left drained.
    pub fn out_of_service(&self) -> Vec<(String, String)> {
        self.instances_in_wave_order()
            .filter_map(|(instance, target)| {
                let why = match &target.traffic {
                    Traffic::InService => return None,
                    Traffic::Draining { .. } => "draining".to_owned(),
                    Traffic::Undraining { .. } => "being returned".to_owned(),
                    Traffic::Drained => match &target.state {
                        InstanceState::SwitchBackFailed { reason } => {
                            format!("left drained: the switch back failed ({reason})")
                        }
                        _ => "drained".to_owned(),
                    },
                    Traffic::LeftDrained { reason } => format!("left drained: {reason}"),
                };
                Some((instance.to_owned(), why))
            })
            .collect()
    }

    /// Whether the deployment has ended (succeeded, failed or aborted); it then ignores every input.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.phase,
            Phase::Succeeded | Phase::Failed { .. } | Phase::Aborted { .. }
        )
    }

    /// Whether an operator holds the deployment.
    pub fn is_paused(&self) -> bool {
        self.paused_since_ms.is_some()
    }

    /// The index (from 0) of the wave activating, settling or baking, if one is.
    pub fn current_wave(&self) -> Option<usize> {
        match self.phase {
            Phase::Wave { index, .. } => Some(index),
            _ => None,
        }
    }

    /// One line for status views, as of the last input handled, e.g.
    /// `wave 2/5: 1 settled, 1 activating; 0 failures, 0 allowed`. Per-instance detail is in
    /// [`Rollout::targets`] (see [`InstanceState::label`]).
    pub fn summary(&self) -> String {
        let failures = format!(
            "{}, {} allowed",
            count_failures(self.failures.len()),
            self.options.failure_threshold
        );
        let paused = if self.is_paused() { " (paused)" } else { "" };
        match &self.phase {
            Phase::Created => format!(
                "not started: {} in {}{paused}",
                count_of(self.targets.len(), "target", "targets"),
                count_of(self.waves.len(), "wave", "waves")
            ),
            Phase::Preparing => format!("preparing: {}; {failures}{paused}", count_states(self.targets.values())),
            Phase::Wave { index, bake_until_ms } => {
                let states = count_states(self.wave_targets(*index));
                let next = match bake_until_ms {
                    None => String::new(),
                    Some(bake_until_ms) if self.last_step_ms < *bake_until_ms => {
                        format!(
                            ", baking for {}",
                            format_ms(bake_until_ms.saturating_sub(self.last_step_ms))
                        )
                    }
                    Some(_) if self.is_paused() => ", next wave held by the pause".to_owned(),
                    Some(_) => ", next wave still preparing".to_owned(),
                };
                format!(
                    "wave {}/{}: {states}{next}; {failures}{paused}",
                    index + 1,
                    self.waves.len()
                )
            }
            Phase::RollingBack { cause } => {
                let why = match cause {
                    Cause::Failure { reason } => format!("failed: {reason}"),
                    Cause::Abort => "aborted".to_owned(),
                };
                let states = count_states(self.targets.values().filter(|target| {
                    target.state.needs_switch_back()
                        || is_switch_back_state(&target.state)
                        || target.traffic.is_moving()
                }));
                let held = if self.is_paused() {
                    " (paused: switch backs wait for resume or abort)"
                } else {
                    ""
                };
                let batch = match self.options.switch_back_batch {
                    0 => String::new(),
                    batch => format!(
                        ", {} at a time",
                        count_of(usize::try_from(batch).unwrap_or(usize::MAX), "instance", "instances")
                    ),
                };
                format!("rolling back ({why}){batch}: {states}{held}")
            }
            Phase::Succeeded => format!(
                "succeeded: {} of {} instances on the release; {failures}",
                self.count(|state| matches!(state, InstanceState::Settled { .. })),
                self.targets.len()
            ),
            Phase::Failed {
                reason,
                switch_back_failed,
            } => format!("failed: {reason}{}", self.aftermath(switch_back_failed)),
            Phase::Aborted { switch_back_failed } => format!("aborted{}", self.aftermath(switch_back_failed)),
            Phase::Finishing { outcome } => {
                let then = match outcome.as_ref() {
                    Phase::Succeeded => "succeed",
                    Phase::Aborted { .. } => "end aborted",
                    _ => "end failed",
                };
                let returning = self
                    .targets
                    .values()
                    .filter(|target| {
                        target.traffic.is_moving() || (target.traffic == Traffic::Drained && self.may_return(target))
                    })
                    .count();
                format!(
                    "returning {} to the load balancer, then to {then}{paused}",
                    count_of(returning, "instance", "instances")
                )
            }
        }
    }

    /// What a failed or aborted deployment left behind, for the summary.
    fn aftermath(&self, switch_back_failed: &[String]) -> String {
        let mut parts = Vec::new();
        let switched_back = self.count(|state| *state == InstanceState::SwitchedBack);
        if switched_back > 0 {
            parts.push(format!("{switched_back} switched back"));
        }
        if !switch_back_failed.is_empty() {
            parts.push(format!("could not switch back: {}", switch_back_failed.join(", ")));
        }
        let left = self.count(InstanceState::needs_switch_back);
        if left > 0 {
            parts.push(format!("{left} may still run the release (no rollback)"));
        }
        let drained = self.out_of_service();
        if !drained.is_empty() {
            let names: Vec<&str> = drained.iter().map(|(instance, _)| instance.as_str()).collect();
            parts.push(format!("left out of the load balancer: {}", names.join(", ")));
        }
        parts.iter().map(|part| format!("; {part}")).collect()
    }

    // ---- inputs ----

    fn apply(&mut self, input: Input, now_ms: i64, commands: &mut Vec<Command>) {
        match input {
            Input::Start => {
                if self.phase == Phase::Created {
                    self.phase = Phase::Preparing;
                    self.last_progress_ms = now_ms;
                    self.preparing_since_ms = Some(now_ms);
                }
            }
            Input::Tick => {}
            Input::Report { instance, report } => {
                if self.record_report(&instance, report, now_ms) {
                    commands.push(self.command(&instance, Action::Revert, false));
                }
            }
            Input::InstanceLost(instance) => self.record_loss(&instance, now_ms),
            Input::InstanceJoined(instance) => self.add_late_joiner(instance),
            Input::Pause => {
                if self.paused_since_ms.is_none() {
                    self.paused_since_ms = Some(now_ms);
                }
            }
            Input::Resume => {
                if let Some(paused_since_ms) = self.paused_since_ms.take() {
                    // The stall clock counts unpaused time only: keep what had accrued before the pause (none if
                    // something progressed during it) and continue from now.
                    let accrued_ms = paused_since_ms.saturating_sub(self.last_progress_ms).max(0);
                    self.last_progress_ms = now_ms.saturating_sub(accrued_ms);
                    // Nor does it count against the prepare deadline.
                    if let Some(preparing_since_ms) = &mut self.preparing_since_ms {
                        *preparing_since_ms =
                            preparing_since_ms.saturating_add(now_ms.saturating_sub(paused_since_ms).max(0));
                    }
                }
            }
            Input::Abort => match self.phase {
                Phase::Created | Phase::Preparing | Phase::Wave { .. } => {
                    self.phase = Phase::RollingBack { cause: Cause::Abort };
                    self.paused_since_ms = None;
                }
                // Already rolling back or returning traffic (perhaps held by a pause): let the commands go out.
                Phase::RollingBack { .. } | Phase::Finishing { .. } => self.paused_since_ms = None,
                Phase::Succeeded | Phase::Failed { .. } | Phase::Aborted { .. } => {}
            },
            Input::Restarted => self.restart(now_ms, commands),
        }
    }

    /// Records an agent's or the traffic provider's report; returns whether the agent has just switched itself
    /// back after a failed activation (its desired state must then [revert](Action::Revert)).
    fn record_report(&mut self, instance: &str, report: Report, now_ms: i64) -> bool {
        let Some(target) = self.targets.get(instance) else {
            return false; // not a target of this deployment
        };
        if matches!(
            report,
            Report::Drained | Report::DrainFailed(_) | Report::Undrained | Report::UndrainFailed(_)
        ) {
            self.record_traffic(instance, report, now_ms);
            return false;
        }
        let switched_itself_back = matches!(report, Report::ActivateFailed(_));
        let next = match (&target.state, report) {
            (InstanceState::Preparing, Report::Prepared) => InstanceState::Prepared,
            (InstanceState::Preparing, Report::PrepareFailed(message)) => InstanceState::Failed {
                reason: format!("prepare failed: {message}"),
                needs_switch_back: false,
            },
            (&InstanceState::Activating { since_ms }, Report::Activated) => InstanceState::Activated {
                since_ms,
                healthy_since_ms: None,
            },
            (
                InstanceState::Activating { .. } | InstanceState::Activated { .. } | InstanceState::Settled { .. },
                Report::ActivateFailed(message),
            ) => InstanceState::Failed {
                reason: format!("activation failed: {message}"),
                needs_switch_back: false,
            },
            // Failed already (say by its deadline); the agent has since switched itself back.
            (
                InstanceState::Failed {
                    reason,
                    needs_switch_back: true,
                },
                Report::ActivateFailed(_),
            ) => InstanceState::Failed {
                reason: reason.clone(),
                needs_switch_back: false,
            },
            // The activation we are undoing failed and the agent undid it itself.
            (InstanceState::SwitchingBack { .. }, Report::ActivateFailed(_) | Report::SwitchedBack) => {
                InstanceState::SwitchedBack
            }
            (
                &InstanceState::Activated {
                    since_ms,
                    healthy_since_ms: None,
                },
                Report::Healthy,
            ) => InstanceState::Activated {
                since_ms,
                healthy_since_ms: Some(now_ms),
            },
            (
                &InstanceState::Activated {
                    since_ms,
                    healthy_since_ms: Some(_),
                },
                Report::Unhealthy(_),
            ) => InstanceState::Activated {
                since_ms,
                healthy_since_ms: None,
            },
            (InstanceState::Settled { .. }, Report::Unhealthy(message)) => InstanceState::Failed {
                reason: format!("unhealthy after settling: {message}"),
                needs_switch_back: true,
            },
            (InstanceState::Activating { .. } | InstanceState::Activated { .. }, Report::Exited(message)) => {
                InstanceState::Failed {
                    reason: format!("the app exited before it was healthy for the minimum time: {message}"),
                    needs_switch_back: true,
                }
            }
            (InstanceState::SwitchingBack { .. }, Report::SwitchBackFailed(message)) => {
                InstanceState::SwitchBackFailed { reason: message }
            }
            // Stale or out of order (Healthy before Activated, a repeat, a report for a finished step): nothing
            // changes, and it is not progress.
            _ => return false,
        };
        let reverts = switched_itself_back
            && matches!(
                next,
                InstanceState::Failed {
                    needs_switch_back: false,
                    ..
                }
            );
        self.set_state(instance, next, now_ms, true);
        reverts
    }

    /// The traffic provider's answer about `instance`. A failure halts the deployment (see [`Rollout::step`]); a
    /// failed drain counts the instance as drained, so that it is returned like any other.
    fn record_traffic(&mut self, instance: &str, report: Report, now_ms: i64) {
        let Some(target) = self.targets.get_mut(instance) else {
            return;
        };
        let (next, failure) = match (&target.traffic, report) {
            (Traffic::Draining { .. }, Report::Drained) => (Traffic::Drained, None),
            (Traffic::Draining { .. }, Report::DrainFailed(message)) => {
                (Traffic::Drained, Some(format!("draining {instance} failed: {message}")))
            }
            (Traffic::Undraining { .. }, Report::Undrained) => (Traffic::InService, None),
            (Traffic::Undraining { .. }, Report::UndrainFailed(message)) => (
                Traffic::LeftDrained {
                    reason: message.clone(),
                },
                Some(format!("returning {instance} to the load balancer failed: {message}")),
            ),
            _ => return, // stale or repeated
        };
        target.traffic = next;
        if let Some(failure) = failure {
            self.traffic_failure.get_or_insert(failure);
        }
        self.last_progress_ms = now_ms;
    }

    fn record_loss(&mut self, instance: &str, now_ms: i64) {
        let Some(target) = self.targets.get(instance) else {
            return;
        };
        let next = match target.state {
            InstanceState::Pending | InstanceState::Preparing | InstanceState::Prepared => InstanceState::Failed {
                reason: "lost before activation".to_owned(),
                needs_switch_back: false,
            },
            InstanceState::Activating { .. } | InstanceState::Activated { .. } | InstanceState::Settled { .. } => {
                InstanceState::Failed {
                    reason: "lost after activation".to_owned(),
                    needs_switch_back: true,
                }
            }
            InstanceState::SwitchingBack { .. } => InstanceState::SwitchBackFailed {
                reason: "lost".to_owned(),
            },
            InstanceState::Failed { .. } | InstanceState::SwitchedBack | InstanceState::SwitchBackFailed { .. } => {
                return;
            }
        };
        self.set_state(instance, next, now_ms, true);
    }

    /// Adds `instance` to the last wave not yet started, or to a new final wave; `advance` sends its Prepare.
    fn add_late_joiner(&mut self, instance: String) {
        let accepting = matches!(self.phase, Phase::Created | Phase::Preparing | Phase::Wave { .. });
        if !accepting || self.targets.contains_key(&instance) {
            return;
        }
        if self.waves.len() <= self.waves_started {
            self.waves.push(Vec::new());
        }
        let wave = self.waves.len() - 1;
        self.waves[wave].push(instance.clone());
        self.targets.insert(
            instance,
            Target {
                wave,
                state: InstanceState::Pending,
                traffic: Traffic::InService,
            },
        );
    }

    fn restart(&mut self, now_ms: i64, commands: &mut Vec<Command>) {
        let downtime_ms = now_ms.saturating_sub(self.last_step_ms).max(0);
        self.last_progress_ms = self.last_progress_ms.saturating_add(downtime_ms);
        if let Some(preparing_since_ms) = &mut self.preparing_since_ms {
            *preparing_since_ms = preparing_since_ms.saturating_add(downtime_ms);
        }
        if let Some(paused_since_ms) = &mut self.paused_since_ms {
            *paused_since_ms = paused_since_ms.saturating_add(downtime_ms);
        }
        if let Phase::Wave {
            bake_until_ms: Some(bake_until_ms),
            ..
        } = &mut self.phase
        {
            *bake_until_ms = bake_until_ms.saturating_add(downtime_ms);
        }
        for target in self.targets.values_mut() {
            if let Traffic::Draining { since_ms } | Traffic::Undraining { since_ms } = &mut target.traffic {
                *since_ms = since_ms.saturating_add(downtime_ms);
            }
            match &mut target.state {
                InstanceState::Activating { since_ms } | InstanceState::SwitchingBack { since_ms } => {
                    *since_ms = since_ms.saturating_add(downtime_ms);
                }
                InstanceState::Activated {
                    since_ms,
                    healthy_since_ms,
                } => {
                    *since_ms = since_ms.saturating_add(downtime_ms);
                    *healthy_since_ms = None;
                }
                _ => {}
            }
        }
        // Re-sent even while paused: these were issued before the pause, and in-flight instances keep settling.
        commands.extend(self.outstanding());
    }

    // ---- time and phase transitions ----

    fn advance(&mut self, now_ms: i64, commands: &mut Vec<Command>) {
        self.expire(now_ms);
        // Each pass moves the phase at most one step forward (a wave settles, bakes, the next starts), so this
        // ends within a few passes per wave.
        while self.advance_phase(now_ms, commands) {}
    }

    /// Per-instance deadlines and settling.
    fn expire(&mut self, now_ms: i64) {
        let healthy_deadline_ms = self.options.healthy_deadline_ms;
        let min_healthy_time_ms = self.options.min_healthy_time_ms;
        let due: Vec<(String, InstanceState, bool)> = self
            .targets
            .iter()
            .filter_map(|(instance, target)| {
                let (next, progress) = match target.state {
                    InstanceState::Activating { since_ms }
                        if now_ms >= since_ms.saturating_add(healthy_deadline_ms) =>
                    {
                        (
                            InstanceState::Failed {
                                reason: format!("not activated within {}", format_ms(healthy_deadline_ms)),
                                needs_switch_back: true,
                            },
                            false,
                        )
                    }
                    InstanceState::Activated {
                        since_ms,
                        healthy_since_ms,
                    } => {
                        let deadline_ms = since_ms.saturating_add(healthy_deadline_ms);
                        let settles_at_ms = healthy_since_ms.map(|since| since.saturating_add(min_healthy_time_ms));
                        match settles_at_ms {
                            Some(settles_at_ms) if settles_at_ms <= now_ms && settles_at_ms <= deadline_ms => (
                                InstanceState::Settled {
                                    since_ms: settles_at_ms,
                                },
                                true,
                            ),
                            _ if now_ms >= deadline_ms => (
                                InstanceState::Failed {
                                    reason: format!(
                                        "not healthy for {} within {} of activation",
                                        format_ms(min_healthy_time_ms),
                                        format_ms(healthy_deadline_ms)
                                    ),
                                    needs_switch_back: true,
                                },
                                false,
                            ),
                            _ => return None,
                        }
                    }
                    InstanceState::SwitchingBack { since_ms }
                        if now_ms >= since_ms.saturating_add(healthy_deadline_ms) =>
                    {
                        (
                            InstanceState::SwitchBackFailed {
                                reason: format!(
                                    "no report within {} of the switch back",
                                    format_ms(healthy_deadline_ms)
                                ),
                            },
                            false,
                        )
                    }
                    _ => return None,
                };
                Some((instance.clone(), next, progress))
            })
            .collect();
        for (instance, state, progress) in due {
            self.set_state(&instance, state, now_ms, progress);
        }
        let silent: Vec<(String, Report)> = self
            .targets
            .iter()
            .filter_map(|(instance, target)| {
                let message = format!(
                    "no answer from the traffic provider within {}",
                    format_ms(healthy_deadline_ms)
                );
                match target.traffic {
                    Traffic::Draining { since_ms } if now_ms >= since_ms.saturating_add(healthy_deadline_ms) => {
                        Some((instance.clone(), Report::DrainFailed(message)))
                    }
                    Traffic::Undraining { since_ms } if now_ms >= since_ms.saturating_add(healthy_deadline_ms) => {
                        Some((instance.clone(), Report::UndrainFailed(message)))
                    }
                    _ => None,
                }
            })
            .collect();
        for (instance, report) in silent {
            self.record_traffic(&instance, report, now_ms);
        }
    }

    /// Makes at most one phase transition; returns whether it did.
    fn advance_phase(&mut self, now_ms: i64, commands: &mut Vec<Command>) -> bool {
        let threshold = self.options.failure_threshold;
        if matches!(self.phase, Phase::Preparing | Phase::Wave { .. }) {
            if self.failures.len() > usize::try_from(threshold).unwrap_or(usize::MAX) {
                let last = self
                    .failures
                    .last()
                    .expect("more failures than the threshold means at least one");
                let reason = format!(
                    "{}, {threshold} allowed; last: {}: {}",
                    count_failures(self.failures.len()),
                    last.instance,
                    last.reason
                );
                self.fail(reason);
                return true;
            }
            if let Some(failure) = self.traffic_failure.clone() {
                self.fail(format!("traffic provider: {failure}"));
                return true;
            }
            if self.is_stalled(now_ms) {
                self.fail(format!(
                    "stalled: no progress for {}",
                    format_ms(self.options.progress_deadline_ms)
                ));
                return true;
            }
            if !self.is_paused() {
                self.send_prepares(now_ms, commands);
                self.activate_drained(now_ms, commands);
            }
        }
        if !self.is_finished() && !self.is_paused() {
            self.send_undrains(now_ms, commands);
        }
        match self.phase.clone() {
            Phase::Created | Phase::Succeeded | Phase::Failed { .. } | Phase::Aborted { .. } => false,
            Phase::Finishing { outcome } => {
                let waiting = self.targets.values().any(|target| {
                    target.traffic.is_moving() || (target.traffic == Traffic::Drained && self.may_return(target))
                });
                if waiting {
                    return false;
                }
                self.phase = *outcome;
                true
            }
            Phase::Preparing => {
                let prepare_deadline_passed = self
                    .preparing_since_ms
                    .is_some_and(|since| now_ms >= since.saturating_add(self.options.healthy_deadline_ms));
                if prepare_deadline_passed && !self.is_paused() {
                    let late: Vec<String> = self
                        .targets
                        .iter()
                        .filter(|(_, target)| !target.state.is_past_preparing())
                        .map(|(instance, _)| instance.clone())
                        .collect();
                    let reason = format!(
                        "did not prepare within the healthy deadline ({})",
                        humantime::format_duration(std::time::Duration::from_millis(
                            u64::try_from(self.options.healthy_deadline_ms).unwrap_or(0)
                        ))
                    );
                    let marked = !late.is_empty();
                    for instance in late {
                        let failed = InstanceState::Failed {
                            reason: reason.clone(),
                            needs_switch_back: false,
                        };
                        self.set_state(&instance, failed, now_ms, true);
                    }
                    if marked {
                        // Check the threshold again before any wave starts.
                        return true;
                    }
                }
                if self.is_paused() || !self.targets.values().all(|target| target.state.is_past_preparing()) {
                    return false;
                }
                if self.waves.is_empty() {
                    self.finish(Phase::Succeeded);
                } else {
                    self.start_wave(0, now_ms, commands);
                }
                true
            }
            Phase::Wave {
                index,
                bake_until_ms: None,
            } => {
                // Settled or failed, and back in the load balancer if settled: a wave that leaves capacity out
                // is not done. (Failed instances that may run the release are returned at the end.)
                let settled = self.wave_targets(index).all(|target| {
                    !target.traffic.is_moving()
                        && match target.state {
                            InstanceState::Settled { .. } => target.traffic == Traffic::InService,
                            InstanceState::Failed { .. } => true,
                            _ => false,
                        }
                });
                if !settled {
                    return false;
                }
                self.phase = Phase::Wave {
                    index,
                    bake_until_ms: Some(now_ms.saturating_add(self.options.bake_ms)),
                };
                self.last_progress_ms = now_ms;
                true
            }
            Phase::Wave {
                index,
                bake_until_ms: Some(bake_until_ms),
            } => {
                if now_ms < bake_until_ms {
                    false
                } else if index + 1 == self.waves.len() {
                    // No agent command goes out, so a pause does not hold this back (returning traffic waits for it).
                    self.finish(Phase::Succeeded);
                    true
                } else if !self.is_paused()
                    && self
                        .wave_targets(index + 1)
                        .all(|target| target.state.is_past_preparing())
                {
                    self.start_wave(index + 1, now_ms, commands);
                    true
                } else {
                    false
                }
            }
            Phase::RollingBack { cause } => {
                if !self.is_paused() {
                    self.send_switch_backs(now_ms, commands);
                }
                let waiting = self.targets.values().any(|target| {
                    target.state.needs_switch_back() || matches!(target.state, InstanceState::SwitchingBack { .. })
                });
                if waiting {
                    return false;
                }
                let switch_back_failed: Vec<String> = self
                    .instances_in_wave_order()
                    .filter(|(_, target)| matches!(target.state, InstanceState::SwitchBackFailed { .. }))
                    .map(|(instance, _)| instance.to_owned())
                    .collect();
                self.finish(match cause {
                    Cause::Failure { reason } => Phase::Failed {
                        reason,
                        switch_back_failed,
                    },
                    Cause::Abort => Phase::Aborted { switch_back_failed },
                });
                true
            }
        }
    }

    fn fail(&mut self, reason: String) {
        if self.options.rollback_on_failure {
            self.phase = Phase::RollingBack {
                cause: Cause::Failure { reason },
            };
        } else {
            self.finish(Phase::Failed {
                reason,
                switch_back_failed: Vec::new(),
            });
        }
    }

    /// Ends as `outcome`, after returning drained instances to the load balancer if there are any.
    fn finish(&mut self, outcome: Phase) {
        let returning = self
            .targets
            .values()
            .any(|target| target.traffic.is_moving() || target.traffic == Traffic::Drained);
        self.phase = if returning {
            Phase::Finishing {
                outcome: Box::new(outcome),
            }
        } else {
            outcome
        };
    }

    /// Whether a drained target may go back into the load balancer now: healthy on the release, or back on the
    /// previous release, or never switched; anything else only once the deployment finishes (a rollback switches
    /// failed instances back first); never an instance whose switch back failed.
    fn may_return(&self, target: &Target) -> bool {
        let going_forward = matches!(self.phase, Phase::Preparing | Phase::Wave { .. });
        if matches!(self.phase, Phase::Finishing { .. }) {
            // Nothing will change on the instance any more: back it goes (its load balancer's own health checks
            // then decide), unless it may run a release that failed and could not be switched back.
            return !matches!(target.state, InstanceState::SwitchBackFailed { .. });
        }
        if matches!(self.phase, Phase::RollingBack { .. }) && target.state.needs_switch_back() {
            // Out of the load balancer to be switched back (or about to be): it returns once back on the previous
            // release, however healthy the release it runs looks now.
            return false;
        }
        match target.state {
            InstanceState::Activated {
                healthy_since_ms: Some(_),
                ..
            }
            | InstanceState::Settled { .. }
            | InstanceState::SwitchedBack
            | InstanceState::Failed {
                needs_switch_back: false,
                ..
            } => true,
            InstanceState::Pending | InstanceState::Preparing | InstanceState::Prepared => !going_forward,
            InstanceState::Activating { .. }
            | InstanceState::Failed {
                needs_switch_back: true,
                ..
            }
            | InstanceState::Activated {
                healthy_since_ms: None, ..
            }
            | InstanceState::SwitchingBack { .. }
            | InstanceState::SwitchBackFailed { .. } => false,
        }
    }

    /// Activate to the current wave's instances the provider has drained.
    fn activate_drained(&mut self, now_ms: i64, commands: &mut Vec<Command>) {
        let Phase::Wave { index, .. } = self.phase else {
            return;
        };
        let due: Vec<String> = self.waves[index]
            .iter()
            .filter(|instance| {
                self.targets
                    .get(*instance)
                    .is_some_and(|target| target.state == InstanceState::Prepared && target.traffic == Traffic::Drained)
            })
            .cloned()
            .collect();
        for instance in due {
            self.set_state(&instance, InstanceState::Activating { since_ms: now_ms }, now_ms, false);
            commands.push(self.command(&instance, Action::Activate, false));
        }
    }

    /// Undrain to the drained targets that [may return](Rollout::may_return).
    fn send_undrains(&mut self, now_ms: i64, commands: &mut Vec<Command>) {
        let due: Vec<String> = self
            .instances_in_wave_order()
            .filter(|(_, target)| target.traffic == Traffic::Drained && self.may_return(target))
            .map(|(instance, _)| instance.to_owned())
            .collect();
        for instance in due {
            if let Some(target) = self.targets.get_mut(&instance) {
                target.traffic = Traffic::Undraining { since_ms: now_ms };
            }
            commands.push(self.command(&instance, Action::Undrain, false));
        }
    }

    /// Whether the progress deadline has passed, counting neither paused time nor a bake.
    fn is_stalled(&self, now_ms: i64) -> bool {
        if self.is_paused() {
            return false;
        }
        let bake_until_ms = match self.phase {
            Phase::Wave {
                bake_until_ms: Some(bake_until_ms),
                ..
            } => bake_until_ms,
            _ => i64::MIN,
        };
        now_ms.saturating_sub(self.last_progress_ms.max(bake_until_ms)) >= self.options.progress_deadline_ms
    }

    fn start_wave(&mut self, index: usize, now_ms: i64, commands: &mut Vec<Command>) {
        self.phase = Phase::Wave {
            index,
            bake_until_ms: None,
        };
        self.waves_started = index + 1;
        self.last_progress_ms = now_ms;
        for instance in self.waves[index].clone() {
            // Instances that failed to prepare (or were lost) stay failed.
            let Some(target) = self.targets.get_mut(&instance) else {
                continue;
            };
            if target.state != InstanceState::Prepared {
                continue;
            }
            if self.options.drain {
                // Activated once the provider reports it drained (see `activate_drained`).
                target.traffic = Traffic::Draining { since_ms: now_ms };
                commands.push(self.command(&instance, Action::Drain, false));
            } else {
                self.set_state(&instance, InstanceState::Activating { since_ms: now_ms }, now_ms, false);
                commands.push(self.command(&instance, Action::Activate, false));
            }
        }
    }

    fn send_prepares(&mut self, now_ms: i64, commands: &mut Vec<Command>) {
        let pending: Vec<String> = self
            .instances_in_wave_order()
            .filter(|(_, target)| target.state == InstanceState::Pending)
            .map(|(instance, _)| instance.to_owned())
            .collect();
        for instance in pending {
            self.set_state(&instance, InstanceState::Preparing, now_ms, false);
            commands.push(self.command(&instance, Action::Prepare, false));
        }
    }

    /// Switches back, a batch at a time: instances already out of the load balancer at once (they take no
    /// traffic), then those in service up to [`RolloutOptions::switch_back_batch`] out at a time, each drained
    /// first when the deployment drains. An instance is out until it is back in service, so a batch starts only
    /// once the previous one has returned.
    fn send_switch_backs(&mut self, now_ms: i64, commands: &mut Vec<Command>) {
        if self.options.first_release {
            let due: Vec<String> = self
                .instances_in_wave_order()
                .filter(|(_, target)| target.state.needs_switch_back())
                .map(|(instance, _)| instance.to_owned())
                .collect();
            for instance in due {
                let failed = InstanceState::SwitchBackFailed {
                    reason: "no earlier release to switch back to (the stack's first release of the bundle); \
                             the instance keeps running it"
                        .to_owned(),
                };
                self.set_state(&instance, failed, now_ms, true);
            }
            return;
        }
        let out_of_rotation: Vec<String> = self
            .instances_in_wave_order()
            .filter(|(_, target)| {
                target.state.needs_switch_back()
                    && matches!(target.traffic, Traffic::Drained | Traffic::LeftDrained { .. })
            })
            .map(|(instance, _)| instance.to_owned())
            .collect();
        for instance in out_of_rotation {
            self.switch_back(&instance, now_ms, commands);
        }
        let batch = match self.options.switch_back_batch {
            0 => usize::MAX,
            batch => usize::try_from(batch).unwrap_or(usize::MAX),
        };
        let out = self
            .targets
            .values()
            .filter(|target| is_out_for_rollback(target))
            .count();
        // Failed instances first: they are not healthy, so taking them out costs the stack nothing.
        let mut in_service: Vec<(bool, String)> = self
            .instances_in_wave_order()
            .filter(|(_, target)| target.state.needs_switch_back() && target.traffic == Traffic::InService)
            .map(|(instance, target)| {
                let healthy = !matches!(target.state, InstanceState::Failed { .. });
                (healthy, instance.to_owned())
            })
            .collect();
        in_service.sort_by_key(|(healthy, _)| *healthy);
        let room = batch.saturating_sub(out);
        for (_, instance) in in_service.into_iter().take(room) {
            if self.options.drain {
                // Switched back once the provider reports it drained (the first loop above, next pass).
                if let Some(target) = self.targets.get_mut(&instance) {
                    target.traffic = Traffic::Draining { since_ms: now_ms };
                }
                commands.push(self.command(&instance, Action::Drain, false));
            } else {
                self.switch_back(&instance, now_ms, commands);
            }
        }
    }

    fn switch_back(&mut self, instance: &str, now_ms: i64, commands: &mut Vec<Command>) {
        self.set_state(
            instance,
            InstanceState::SwitchingBack { since_ms: now_ms },
            now_ms,
            false,
        );
        commands.push(self.command(instance, Action::SwitchBack, false));
    }

    // ---- helpers ----

    /// Sets an instance's state, recording a failure when it newly fails and progress when asked.
    fn set_state(&mut self, instance: &str, state: InstanceState, now_ms: i64, progress: bool) {
        let Some(target) = self.targets.get_mut(instance) else {
            return;
        };
        let newly_failed =
            matches!(state, InstanceState::Failed { .. }) && !matches!(target.state, InstanceState::Failed { .. });
        if newly_failed && let InstanceState::Failed { reason, .. } = &state {
            self.failures.push(Failure {
                instance: instance.to_owned(),
                reason: reason.clone(),
                at_ms: now_ms,
            });
        }
        target.state = state;
        if progress {
            self.last_progress_ms = now_ms;
        }
    }

    fn command(&self, instance: &str, action: Action, resend: bool) -> Command {
        Command {
            instance: instance.to_owned(),
            epoch: self.epoch,
            action,
            resend,
        }
    }

    /// Targets in wave order (canary first), so commands go out in that order.
    fn instances_in_wave_order(&self) -> impl Iterator<Item = (&str, &Target)> {
        self.waves
            .iter()
            .flatten()
            .filter_map(|instance| self.targets.get(instance).map(|target| (instance.as_str(), target)))
    }

    fn wave_targets(&self, index: usize) -> impl Iterator<Item = &Target> {
        self.waves
            .get(index)
            .into_iter()
            .flatten()
            .filter_map(|instance| self.targets.get(instance))
    }

    fn count(&self, predicate: impl Fn(&InstanceState) -> bool) -> usize {
        self.targets.values().filter(|target| predicate(&target.state)).count()
    }
}

fn validate(options: &RolloutOptions) -> Result<(), RolloutError> {
    let checks = [
        ("min_healthy_time", options.min_healthy_time_ms, 0, "zero or more"),
        ("bake", options.bake_ms, 0, "zero or more"),
        ("healthy_deadline", options.healthy_deadline_ms, 1, "more than zero"),
        ("progress_deadline", options.progress_deadline_ms, 1, "more than zero"),
    ];
    for (option, value_ms, minimum_ms, expected) in checks {
        if value_ms < minimum_ms {
            return Err(RolloutError::InvalidOption {
                option,
                value_ms,
                expected,
            });
        }
    }
    Ok(())
}

/// Whether a rollback has `target` out of service: being drained for its switch back, switching back, or back on
/// the previous release but not yet returned to the load balancer. It holds a place in the rollback's batch.
fn is_out_for_rollback(target: &Target) -> bool {
    let involved = target.state.needs_switch_back() || target.state == InstanceState::SwitchedBack;
    match target.state {
        InstanceState::SwitchingBack { .. } => true,
        _ => {
            involved
                && matches!(
                    target.traffic,
                    Traffic::Draining { .. } | Traffic::Drained | Traffic::Undraining { .. }
                )
        }
    }
}

fn is_switch_back_state(state: &InstanceState) -> bool {
    matches!(
        state,
        InstanceState::SwitchingBack { .. } | InstanceState::SwitchedBack | InstanceState::SwitchBackFailed { .. }
    )
}

/// "2 settled, 1 activating", in lifecycle order; "no instances" when empty.
fn count_states<'a>(targets: impl Iterator<Item = &'a Target>) -> String {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for target in targets {
        let rank = LABEL_ORDER
            .iter()
            .position(|label| *label == target.label())
            .expect("every label is listed in LABEL_ORDER");
        *counts.entry(rank).or_default() += 1;
    }
    if counts.is_empty() {
        return "no instances".to_owned();
    }
    counts
        .iter()
        .map(|(rank, count)| format!("{count} {}", LABEL_ORDER[*rank]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "1 failure", "2 failures".
fn count_failures(count: usize) -> String {
    if count == 1 {
        "1 failure".to_owned()
    } else {
        format!("{count} failures")
    }
}

fn format_ms(ms: i64) -> String {
    humantime::format_duration(Duration::from_millis(u64::try_from(ms).unwrap_or(0))).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fmt::Write as _;

    use expect_test::{Expect, expect};
    use proptest::prelude::*;

    use super::*;

    const SECOND: i64 = 1000;
    const EPOCH: u64 = 7;

    /// Round numbers that keep the scripts readable: settle after 10 s, 1 min to settle, stall after 2 min.
    fn options() -> RolloutOptions {
        RolloutOptions {
            failure_threshold: 0,
            min_healthy_time_ms: 10 * SECOND,
            healthy_deadline_ms: 60 * SECOND,
            progress_deadline_ms: 120 * SECOND,
            bake_ms: 0,
            rollback_on_failure: true,
            drain: false,
            switch_back_batch: 0,
            first_release: false,
        }
    }

    /// [`options`] with draining on.
    fn draining() -> RolloutOptions {
        RolloutOptions {
            drain: true,
            ..options()
        }
    }

    fn rollout(waves: &[&[&str]], options: RolloutOptions) -> Rollout {
        let waves = waves
            .iter()
            .map(|wave| wave.iter().map(|instance| (*instance).to_owned()).collect())
            .collect();
        Rollout::new(waves, options, EPOCH, 0).expect("valid waves and options")
    }

    /// One script line, `<seconds> <verb> [instance…]`, as inputs (one per instance for reports, losses, joins).
    fn parse(line: &str) -> Vec<(i64, Input)> {
        let mut words = line.split_whitespace();
        let seconds: i64 = words
            .next()
            .and_then(|word| word.parse().ok())
            .expect("a time in seconds");
        let now_ms = seconds * SECOND;
        let verb = words.next().expect("a verb");
        let instances: Vec<String> = words.map(str::to_owned).collect();
        let operator = match verb {
            "start" => Some(Input::Start),
            "tick" => Some(Input::Tick),
            "pause" => Some(Input::Pause),
            "resume" => Some(Input::Resume),
            "abort" => Some(Input::Abort),
            "restarted" => Some(Input::Restarted),
            _ => None,
        };
        if let Some(input) = operator {
            return vec![(now_ms, input)];
        }
        let per_instance = |instance: String| match verb {
            "lost" => Input::InstanceLost(instance),
            "joined" => Input::InstanceJoined(instance),
            _ => {
                let report = match verb {
                    "prepared" => Report::Prepared,
                    "prepare-failed" => Report::PrepareFailed("disk full".to_owned()),
                    "activated" => Report::Activated,
                    "activate-failed" => Report::ActivateFailed("application_start exited 1".to_owned()),
                    "healthy" => Report::Healthy,
                    "unhealthy" => Report::Unhealthy("GET /health: 503".to_owned()),
                    "exited" => Report::Exited("the app stopped: exited with code 1".to_owned()),
                    "switched-back" => Report::SwitchedBack,
                    "switch-back-failed" => Report::SwitchBackFailed("application_start exited 1".to_owned()),
                    "drained" => Report::Drained,
                    "drain-failed" => Report::DrainFailed("haproxy: No such server.".to_owned()),
                    "undrained" => Report::Undrained,
                    "undrain-failed" => Report::UndrainFailed("haproxy: connection refused".to_owned()),
                    other => panic!("unknown verb {other:?} in {line:?}"),
                };
                Input::Report { instance, report }
            }
        };
        instances
            .into_iter()
            .map(|instance| (now_ms, per_instance(instance)))
            .collect()
    }

    fn describe(command: &Command) -> String {
        let action = match command.action {
            Action::Prepare => "prepare",
            Action::Activate => "activate",
            Action::SwitchBack => "switch-back",
            Action::Revert => "revert",
            Action::Drain => "drain",
            Action::Undrain => "undrain",
        };
        let resend = if command.resend { " (resend)" } else { "" };
        format!("{action} {}{resend}", command.instance)
    }

    fn states(rollout: &Rollout) -> String {
        rollout
            .instances_in_wave_order()
            .map(|(instance, target)| {
                let traffic = match &target.traffic {
                    Traffic::InService | Traffic::Draining { .. } | Traffic::Undraining { .. } => "",
                    Traffic::Drained => "(out)",
                    Traffic::LeftDrained { .. } => "(left-out)",
                };
                format!("{instance}={}{traffic}", target.label().replace(' ', "-"))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs `script` from `rollout`; the transcript shows, after each line, the summary, every target's state
    /// (in wave order) and the commands sent.
    fn run(mut rollout: Rollout, script: &str) -> (Rollout, String) {
        let mut transcript = String::new();
        for line in script.lines().map(str::trim).filter(|line| !line.is_empty()) {
            let mut commands = Vec::new();
            for (now_ms, input) in parse(line) {
                let (next, sent) = rollout.step(input, now_ms);
                assert!(sent.iter().all(|command| command.epoch == EPOCH), "{sent:?}");
                let json = serde_json::to_string(&next).expect("serialises");
                assert_eq!(serde_json::from_str::<Rollout>(&json).expect("deserialises"), next);
                rollout = next;
                commands.extend(sent);
            }
            writeln!(transcript, "{line}").expect("writing to a String");
            writeln!(transcript, "    {}", rollout.summary()).expect("writing to a String");
            if !rollout.targets.is_empty() {
                writeln!(transcript, "    {}", states(&rollout)).expect("writing to a String");
            }
            if !commands.is_empty() {
                let commands: Vec<String> = commands.iter().map(describe).collect();
                writeln!(transcript, "    > {}", commands.join(", ")).expect("writing to a String");
            }
        }
        (rollout, transcript)
    }

    fn check(rollout: Rollout, script: &str, expected: Expect) -> Rollout {
        let (rollout, transcript) = run(rollout, script);
        expected.assert_eq(&transcript);
        rollout
    }

    #[test]
    fn draining_takes_each_instance_out_before_activate_and_back_once_healthy() {
        check(
            rollout(&[&["a"], &["b", "c"]], draining()),
            "
            0 start
            1 prepared a b c
            2 drained a
            3 activated a
            4 healthy a
            5 undrained a
            14 tick
            15 drained b
            16 drained c
            17 activated b c
            18 healthy b c
            19 undrained b
            28 tick
            29 undrained c
            ",
            expect![[r#"
                0 start
                    preparing: 3 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing c=preparing
                    > prepare a, prepare b, prepare c
                1 prepared a b c
                    wave 1/2: 1 draining; 0 failures, 0 allowed
                    a=draining b=prepared c=prepared
                    > drain a
                2 drained a
                    wave 1/2: 1 activating; 0 failures, 0 allowed
                    a=activating(out) b=prepared c=prepared
                    > activate a
                3 activated a
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated(out) b=prepared c=prepared
                4 healthy a
                    wave 1/2: 1 undraining; 0 failures, 0 allowed
                    a=undraining b=prepared c=prepared
                    > undrain a
                5 undrained a
                    wave 1/2: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared c=prepared
                14 tick
                    wave 2/2: 2 draining; 0 failures, 0 allowed
                    a=settled b=draining c=draining
                    > drain b, drain c
                15 drained b
                    wave 2/2: 1 draining, 1 activating; 0 failures, 0 allowed
                    a=settled b=activating(out) c=draining
                    > activate b
                16 drained c
                    wave 2/2: 2 activating; 0 failures, 0 allowed
                    a=settled b=activating(out) c=activating(out)
                    > activate c
                17 activated b c
                    wave 2/2: 2 activated; 0 failures, 0 allowed
                    a=settled b=activated(out) c=activated(out)
                18 healthy b c
                    wave 2/2: 2 undraining; 0 failures, 0 allowed
                    a=settled b=undraining c=undraining
                    > undrain b, undrain c
                19 undrained b
                    wave 2/2: 1 healthy, 1 undraining; 0 failures, 0 allowed
                    a=settled b=healthy c=undraining
                28 tick
                    wave 2/2: 1 undraining, 1 settled; 0 failures, 0 allowed
                    a=settled b=settled c=undraining
                29 undrained c
                    succeeded: 3 of 3 instances on the release; 0 failures, 0 allowed
                    a=settled b=settled c=settled
            "#]],
        );
    }

    #[test]
    fn a_canary_that_fails_health_is_switched_back_and_only_then_returned() {
        check(
            rollout(&[&["a"], &["b"]], draining()),
            "
            0 start
            1 prepared a b
            2 drained a
            3 activated a
            4 unhealthy a
            62 tick
            63 switched-back a
            64 undrained a
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a b
                    wave 1/2: 1 draining; 0 failures, 0 allowed
                    a=draining b=prepared
                    > drain a
                2 drained a
                    wave 1/2: 1 activating; 0 failures, 0 allowed
                    a=activating(out) b=prepared
                    > activate a
                3 activated a
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated(out) b=prepared
                4 unhealthy a
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated(out) b=prepared
                62 tick
                    rolling back (failed: 1 failure, 0 allowed; last: a: not healthy for 10s within 1m of activation): 1 switching back
                    a=switching-back(out) b=prepared
                    > switch-back a
                63 switched-back a
                    returning 1 instance to the load balancer, then to end failed
                    a=undraining b=prepared
                    > undrain a
                64 undrained a
                    failed: 1 failure, 0 allowed; last: a: not healthy for 10s within 1m of activation; 1 switched back
                    a=switched-back b=prepared
            "#]],
        );
    }

    /// Field trial: an instance that failed after its wave settled had every switched instance switched back at
    /// once and without drain, and long requests got HTTP 502. Switching back goes a batch at a time (here 1, the
    /// floor's allowance), each instance drained first and returned before the next one goes; instances already out
    /// of the load balancer go at once, and the failed instance before the healthy ones.
    #[test]
    fn a_rollback_drains_and_switches_back_a_batch_at_a_time() {
        check(
            rollout(
                &[&["a"], &["b", "c"], &["d"]],
                RolloutOptions {
                    switch_back_batch: 1,
                    ..draining()
                },
            ),
            "
            0 start
            1 prepared a b c d
            2 drained a
            3 activated a
            4 healthy a
            5 undrained a
            14 tick
            15 drained b c
            16 activated b c
            17 healthy b c
            18 undrained b c
            27 tick
            28 drained d
            29 activated d
            30 unhealthy b
            31 switched-back d
            32 undrained d
            33 drained b
            34 switched-back b
            35 undrained b
            36 drained a
            37 switched-back a
            38 undrained a
            39 drained c
            40 switched-back c
            41 undrained c
            ",
            expect![[r#"
                0 start
                    preparing: 4 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing c=preparing d=preparing
                    > prepare a, prepare b, prepare c, prepare d
                1 prepared a b c d
                    wave 1/3: 1 draining; 0 failures, 0 allowed
                    a=draining b=prepared c=prepared d=prepared
                    > drain a
                2 drained a
                    wave 1/3: 1 activating; 0 failures, 0 allowed
                    a=activating(out) b=prepared c=prepared d=prepared
                    > activate a
                3 activated a
                    wave 1/3: 1 activated; 0 failures, 0 allowed
                    a=activated(out) b=prepared c=prepared d=prepared
                4 healthy a
                    wave 1/3: 1 undraining; 0 failures, 0 allowed
                    a=undraining b=prepared c=prepared d=prepared
                    > undrain a
                5 undrained a
                    wave 1/3: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared c=prepared d=prepared
                14 tick
                    wave 2/3: 2 draining; 0 failures, 0 allowed
                    a=settled b=draining c=draining d=prepared
                    > drain b, drain c
                15 drained b c
                    wave 2/3: 2 activating; 0 failures, 0 allowed
                    a=settled b=activating(out) c=activating(out) d=prepared
                    > activate b, activate c
                16 activated b c
                    wave 2/3: 2 activated; 0 failures, 0 allowed
                    a=settled b=activated(out) c=activated(out) d=prepared
                17 healthy b c
                    wave 2/3: 2 undraining; 0 failures, 0 allowed
                    a=settled b=undraining c=undraining d=prepared
                    > undrain b, undrain c
                18 undrained b c
                    wave 2/3: 2 healthy; 0 failures, 0 allowed
                    a=settled b=healthy c=healthy d=prepared
                27 tick
                    wave 3/3: 1 draining; 0 failures, 0 allowed
                    a=settled b=settled c=settled d=draining
                    > drain d
                28 drained d
                    wave 3/3: 1 activating; 0 failures, 0 allowed
                    a=settled b=settled c=settled d=activating(out)
                    > activate d
                29 activated d
                    wave 3/3: 1 activated; 0 failures, 0 allowed
                    a=settled b=settled c=settled d=activated(out)
                30 unhealthy b
                    rolling back (failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503), 1 instance at a time: 2 settled, 1 failed, 1 switching back
                    a=settled b=failed c=settled d=switching-back(out)
                    > switch-back d
                31 switched-back d
                    rolling back (failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503), 1 instance at a time: 1 undraining, 2 settled, 1 failed
                    a=settled b=failed c=settled d=undraining
                    > undrain d
                32 undrained d
                    rolling back (failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503), 1 instance at a time: 1 draining, 2 settled, 1 switched back
                    a=settled b=draining c=settled d=switched-back
                    > drain b
                33 drained b
                    rolling back (failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503), 1 instance at a time: 2 settled, 1 switching back, 1 switched back
                    a=settled b=switching-back(out) c=settled d=switched-back
                    > switch-back b
                34 switched-back b
                    rolling back (failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503), 1 instance at a time: 1 undraining, 2 settled, 1 switched back
                    a=settled b=undraining c=settled d=switched-back
                    > undrain b
                35 undrained b
                    rolling back (failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503), 1 instance at a time: 1 draining, 1 settled, 2 switched back
                    a=draining b=switched-back c=settled d=switched-back
                    > drain a
                36 drained a
                    rolling back (failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503), 1 instance at a time: 1 settled, 1 switching back, 2 switched back
                    a=switching-back(out) b=switched-back c=settled d=switched-back
                    > switch-back a
                37 switched-back a
                    rolling back (failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503), 1 instance at a time: 1 undraining, 1 settled, 2 switched back
                    a=undraining b=switched-back c=settled d=switched-back
                    > undrain a
                38 undrained a
                    rolling back (failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503), 1 instance at a time: 1 draining, 3 switched back
                    a=switched-back b=switched-back c=draining d=switched-back
                    > drain c
                39 drained c
                    rolling back (failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503), 1 instance at a time: 1 switching back, 3 switched back
                    a=switched-back b=switched-back c=switching-back(out) d=switched-back
                    > switch-back c
                40 switched-back c
                    returning 1 instance to the load balancer, then to end failed
                    a=switched-back b=switched-back c=undraining d=switched-back
                    > undrain c
                41 undrained c
                    failed: 1 failure, 0 allowed; last: b: unhealthy after settling: GET /health: 503; 4 switched back
                    a=switched-back b=switched-back c=switched-back d=switched-back
            "#]],
        );
    }

    /// A failed first deployment (no release approved before) used to wait out the healthy deadline for switch
    /// backs no agent could answer; it ends at once, saying why the instances keep the release.
    #[test]
    fn a_first_release_has_nothing_to_switch_back_to() {
        check(
            rollout(
                &[&["a", "b"]],
                RolloutOptions {
                    first_release: true,
                    ..options()
                },
            ),
            "
            0 start
            1 prepared a b
            2 activated a b
            3 healthy a
            61 tick
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a b
                    wave 1/1: 2 activating; 0 failures, 0 allowed
                    a=activating b=activating
                    > activate a, activate b
                2 activated a b
                    wave 1/1: 2 activated; 0 failures, 0 allowed
                    a=activated b=activated
                3 healthy a
                    wave 1/1: 1 activated, 1 healthy; 0 failures, 0 allowed
                    a=healthy b=activated
                61 tick
                    failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation; could not switch back: a, b
                    a=switch-back-failed b=switch-back-failed
            "#]],
        );
    }

    #[test]
    fn a_provider_error_halts_the_deployment_and_returns_what_it_drained() {
        check(
            rollout(
                &[&["a", "b"], &["c"]],
                RolloutOptions {
                    failure_threshold: 5,
                    ..draining()
                },
            ),
            "
            0 start
            1 prepared a b c
            2 drained a
            3 drain-failed b
            4 activated a
            5 switched-back a
            6 undrained b
            7 undrain-failed a
            ",
            expect![[r#"
                0 start
                    preparing: 3 preparing; 0 failures, 5 allowed
                    a=preparing b=preparing c=preparing
                    > prepare a, prepare b, prepare c
                1 prepared a b c
                    wave 1/2: 2 draining; 0 failures, 5 allowed
                    a=draining b=draining c=prepared
                    > drain a, drain b
                2 drained a
                    wave 1/2: 1 draining, 1 activating; 0 failures, 5 allowed
                    a=activating(out) b=draining c=prepared
                    > activate a
                3 drain-failed b
                    rolling back (failed: traffic provider: draining b failed: haproxy: No such server.): 1 undraining, 1 switching back
                    a=switching-back(out) b=undraining c=prepared
                    > undrain b, switch-back a
                4 activated a
                    rolling back (failed: traffic provider: draining b failed: haproxy: No such server.): 1 undraining, 1 switching back
                    a=switching-back(out) b=undraining c=prepared
                5 switched-back a
                    returning 2 instances to the load balancer, then to end failed
                    a=undraining b=undraining c=prepared
                    > undrain a
                6 undrained b
                    returning 1 instance to the load balancer, then to end failed
                    a=undraining b=prepared c=prepared
                7 undrain-failed a
                    failed: traffic provider: draining b failed: haproxy: No such server.; 1 switched back; left out of the load balancer: a
                    a=switched-back(left-out) b=prepared c=prepared
            "#]],
        );
    }

    #[test]
    fn abort_while_draining_returns_the_instance_it_never_switched() {
        check(
            rollout(&[&["a"]], draining()),
            "
            0 start
            1 prepared a
            2 abort
            3 drained a
            4 undrained a
            ",
            expect![[r#"
                0 start
                    preparing: 1 preparing; 0 failures, 0 allowed
                    a=preparing
                    > prepare a
                1 prepared a
                    wave 1/1: 1 draining; 0 failures, 0 allowed
                    a=draining
                    > drain a
                2 abort
                    returning 1 instance to the load balancer, then to end aborted
                    a=draining
                3 drained a
                    returning 1 instance to the load balancer, then to end aborted
                    a=undraining
                    > undrain a
                4 undrained a
                    aborted
                    a=prepared
            "#]],
        );
    }

    #[test]
    fn restart_resends_drains_and_undrains_in_flight() {
        check(
            rollout(&[&["a", "b"]], draining()),
            "
            0 start
            1 prepared a b
            2 drained a
            3 activated a
            4 healthy a
            10 restarted
            11 drained b
            12 undrained a
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a b
                    wave 1/1: 2 draining; 0 failures, 0 allowed
                    a=draining b=draining
                    > drain a, drain b
                2 drained a
                    wave 1/1: 1 draining, 1 activating; 0 failures, 0 allowed
                    a=activating(out) b=draining
                    > activate a
                3 activated a
                    wave 1/1: 1 draining, 1 activated; 0 failures, 0 allowed
                    a=activated(out) b=draining
                4 healthy a
                    wave 1/1: 1 draining, 1 undraining; 0 failures, 0 allowed
                    a=undraining b=draining
                    > undrain a
                10 restarted
                    wave 1/1: 1 draining, 1 undraining; 0 failures, 0 allowed
                    a=undraining b=draining
                    > undrain a (resend), drain b (resend)
                11 drained b
                    wave 1/1: 1 activating, 1 undraining; 0 failures, 0 allowed
                    a=undraining b=activating(out)
                    > activate b
                12 undrained a
                    wave 1/1: 1 activating, 1 activated; 0 failures, 0 allowed
                    a=activated b=activating(out)
            "#]],
        );
    }

    #[test]
    fn an_instance_whose_switch_back_failed_stays_out_and_is_shown() {
        let end = check(
            rollout(&[&["a", "b"]], draining()),
            "
            0 start
            1 prepared a b
            2 drained a b
            3 activated a b
            4 activate-failed b
            5 undrained b
            62 tick
            63 switch-back-failed a
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a b
                    wave 1/1: 2 draining; 0 failures, 0 allowed
                    a=draining b=draining
                    > drain a, drain b
                2 drained a b
                    wave 1/1: 2 activating; 0 failures, 0 allowed
                    a=activating(out) b=activating(out)
                    > activate a, activate b
                3 activated a b
                    wave 1/1: 2 activated; 0 failures, 0 allowed
                    a=activated(out) b=activated(out)
                4 activate-failed b
                    rolling back (failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1): 1 undraining, 1 switching back
                    a=switching-back(out) b=undraining
                    > revert b, undrain b, switch-back a
                5 undrained b
                    rolling back (failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1): 1 switching back
                    a=switching-back(out) b=failed
                62 tick
                    rolling back (failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1): 1 switching back
                    a=switching-back(out) b=failed
                63 switch-back-failed a
                    failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1; could not switch back: a; left out of the load balancer: a
                    a=switch-back-failed(out) b=failed
            "#]],
        );
        assert_eq!(
            end.out_of_service(),
            vec![(
                "a".to_owned(),
                "left drained: the switch back failed (application_start exited 1)".to_owned()
            )]
        );
    }

    #[test]
    fn without_drain_no_traffic_command_goes_out() {
        let (end, transcript) = run(
            rollout(&[&["a"]], options()),
            "
            0 start
            1 prepared a
            2 activated a
            3 healthy a
            13 tick
            ",
        );
        assert_eq!(end.phase, Phase::Succeeded, "{transcript}");
        assert!(!transcript.contains("drain"), "{transcript}");
    }

    #[test]
    fn happy_path_over_three_waves() {
        check(
            rollout(&[&["a"], &["b", "c"], &["d"]], options()),
            "
            0 start
            1 prepared a b c
            2 prepared d
            3 activated a
            4 healthy a
            13 tick
            14 tick
            15 activated b c
            16 healthy b c
            26 tick
            27 activated d
            28 healthy d
            38 tick
            39 healthy d
            ",
            expect![[r#"
                0 start
                    preparing: 4 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing c=preparing d=preparing
                    > prepare a, prepare b, prepare c, prepare d
                1 prepared a b c
                    preparing: 1 preparing, 3 prepared; 0 failures, 0 allowed
                    a=prepared b=prepared c=prepared d=preparing
                2 prepared d
                    wave 1/3: 1 activating; 0 failures, 0 allowed
                    a=activating b=prepared c=prepared d=prepared
                    > activate a
                3 activated a
                    wave 1/3: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared c=prepared d=prepared
                4 healthy a
                    wave 1/3: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared c=prepared d=prepared
                13 tick
                    wave 1/3: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared c=prepared d=prepared
                14 tick
                    wave 2/3: 2 activating; 0 failures, 0 allowed
                    a=settled b=activating c=activating d=prepared
                    > activate b, activate c
                15 activated b c
                    wave 2/3: 2 activated; 0 failures, 0 allowed
                    a=settled b=activated c=activated d=prepared
                16 healthy b c
                    wave 2/3: 2 healthy; 0 failures, 0 allowed
                    a=settled b=healthy c=healthy d=prepared
                26 tick
                    wave 3/3: 1 activating; 0 failures, 0 allowed
                    a=settled b=settled c=settled d=activating
                    > activate d
                27 activated d
                    wave 3/3: 1 activated; 0 failures, 0 allowed
                    a=settled b=settled c=settled d=activated
                28 healthy d
                    wave 3/3: 1 healthy; 0 failures, 0 allowed
                    a=settled b=settled c=settled d=healthy
                38 tick
                    succeeded: 4 of 4 instances on the release; 0 failures, 0 allowed
                    a=settled b=settled c=settled d=settled
                39 healthy d
                    succeeded: 4 of 4 instances on the release; 0 failures, 0 allowed
                    a=settled b=settled c=settled d=settled
            "#]],
        );
    }

    /// Field trial: an app that exited 20 s after each start passed its deployment, because the agent
    /// restarted it within a second each time. An exit before the instance settled fails it; after
    /// settling, only an unhealthy verdict (a crash loop) does.
    #[test]
    fn an_app_exit_fails_an_instance_that_has_not_settled_yet() {
        check(
            rollout(&[&["a"], &["b"]], options()),
            "
            0 start
            1 prepared a b
            2 activated a
            3 healthy a
            5 exited a
            6 tick
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a b
                    wave 1/2: 1 activating; 0 failures, 0 allowed
                    a=activating b=prepared
                    > activate a
                2 activated a
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared
                3 healthy a
                    wave 1/2: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared
                5 exited a
                    rolling back (failed: 1 failure, 0 allowed; last: a: the app exited before it was healthy for the minimum time: the app stopped: exited with code 1): 1 switching back
                    a=switching-back b=prepared
                    > switch-back a
                6 tick
                    rolling back (failed: 1 failure, 0 allowed; last: a: the app exited before it was healthy for the minimum time: the app stopped: exited with code 1): 1 switching back
                    a=switching-back b=prepared
            "#]],
        );
        check(
            rollout(&[&["a", "b"]], options()),
            "
            0 start
            1 prepared a b
            2 activated a b
            3 healthy a b
            13 tick
            14 exited a
            15 tick
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a b
                    wave 1/1: 2 activating; 0 failures, 0 allowed
                    a=activating b=activating
                    > activate a, activate b
                2 activated a b
                    wave 1/1: 2 activated; 0 failures, 0 allowed
                    a=activated b=activated
                3 healthy a b
                    wave 1/1: 2 healthy; 0 failures, 0 allowed
                    a=healthy b=healthy
                13 tick
                    succeeded: 2 of 2 instances on the release; 0 failures, 0 allowed
                    a=settled b=settled
                14 exited a
                    succeeded: 2 of 2 instances on the release; 0 failures, 0 allowed
                    a=settled b=settled
                15 tick
                    succeeded: 2 of 2 instances on the release; 0 failures, 0 allowed
                    a=settled b=settled
            "#]],
        );
    }

    #[test]
    fn an_unhealthy_report_resets_the_min_healthy_time() {
        check(
            rollout(&[&["a"], &["b"]], options()),
            "
            0 start
            1 prepared a b
            2 activated a
            3 healthy a
            12 unhealthy a
            13 tick
            14 healthy a
            23 tick
            24 tick
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a b
                    wave 1/2: 1 activating; 0 failures, 0 allowed
                    a=activating b=prepared
                    > activate a
                2 activated a
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared
                3 healthy a
                    wave 1/2: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared
                12 unhealthy a
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared
                13 tick
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared
                14 healthy a
                    wave 1/2: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared
                23 tick
                    wave 1/2: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared
                24 tick
                    wave 2/2: 1 activating; 0 failures, 0 allowed
                    a=settled b=activating
                    > activate b
            "#]],
        );
    }

    #[test]
    fn healthy_deadline_exceeded_rolls_back_the_activated_instances_only() {
        let end = check(
            rollout(&[&["a", "b"], &["c"]], options()),
            "
            0 start
            1 prepared a b c
            2 activated a b
            3 healthy a
            13 tick
            60 tick
            61 tick
            62 switched-back a
            63 switched-back b
            70 tick
            ",
            expect![[r#"
                0 start
                    preparing: 3 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing c=preparing
                    > prepare a, prepare b, prepare c
                1 prepared a b c
                    wave 1/2: 2 activating; 0 failures, 0 allowed
                    a=activating b=activating c=prepared
                    > activate a, activate b
                2 activated a b
                    wave 1/2: 2 activated; 0 failures, 0 allowed
                    a=activated b=activated c=prepared
                3 healthy a
                    wave 1/2: 1 activated, 1 healthy; 0 failures, 0 allowed
                    a=healthy b=activated c=prepared
                13 tick
                    wave 1/2: 1 activated, 1 settled; 0 failures, 0 allowed
                    a=settled b=activated c=prepared
                60 tick
                    wave 1/2: 1 activated, 1 settled; 0 failures, 0 allowed
                    a=settled b=activated c=prepared
                61 tick
                    rolling back (failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation): 2 switching back
                    a=switching-back b=switching-back c=prepared
                    > switch-back b, switch-back a
                62 switched-back a
                    rolling back (failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation): 1 switching back, 1 switched back
                    a=switched-back b=switching-back c=prepared
                63 switched-back b
                    failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation; 2 switched back
                    a=switched-back b=switched-back c=prepared
                70 tick
                    failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation; 2 switched back
                    a=switched-back b=switched-back c=prepared
            "#]],
        );
        assert_eq!(
            end.targets["c"].state,
            InstanceState::Prepared,
            "a later wave never activates"
        );
    }

    #[test]
    fn canary_failure_with_threshold_zero_rolls_back_the_canary_only() {
        check(
            rollout(&[&["canary"], &["b", "c"]], options()),
            "
            0 start
            1 prepared canary b c
            2 activated canary
            3 healthy canary
            5 unhealthy canary
            61 tick
            62 switched-back canary
            ",
            expect![[r#"
                0 start
                    preparing: 3 preparing; 0 failures, 0 allowed
                    canary=preparing b=preparing c=preparing
                    > prepare canary, prepare b, prepare c
                1 prepared canary b c
                    wave 1/2: 1 activating; 0 failures, 0 allowed
                    canary=activating b=prepared c=prepared
                    > activate canary
                2 activated canary
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    canary=activated b=prepared c=prepared
                3 healthy canary
                    wave 1/2: 1 healthy; 0 failures, 0 allowed
                    canary=healthy b=prepared c=prepared
                5 unhealthy canary
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    canary=activated b=prepared c=prepared
                61 tick
                    rolling back (failed: 1 failure, 0 allowed; last: canary: not healthy for 10s within 1m of activation): 1 switching back
                    canary=switching-back b=prepared c=prepared
                    > switch-back canary
                62 switched-back canary
                    failed: 1 failure, 0 allowed; last: canary: not healthy for 10s within 1m of activation; 1 switched back
                    canary=switched-back b=prepared c=prepared
            "#]],
        );
    }

    #[test]
    fn canary_activation_failure_needs_no_switch_back() {
        // The agent switched itself back when its hooks failed, so there is nothing to roll back.
        check(
            rollout(&[&["canary"], &["b", "c"]], options()),
            "
            0 start
            1 prepared canary b c
            2 activate-failed canary
            ",
            expect![[r#"
                0 start
                    preparing: 3 preparing; 0 failures, 0 allowed
                    canary=preparing b=preparing c=preparing
                    > prepare canary, prepare b, prepare c
                1 prepared canary b c
                    wave 1/2: 1 activating; 0 failures, 0 allowed
                    canary=activating b=prepared c=prepared
                    > activate canary
                2 activate-failed canary
                    failed: 1 failure, 0 allowed; last: canary: activation failed: application_start exited 1
                    canary=failed b=prepared c=prepared
                    > revert canary
            "#]],
        );
    }

    #[test]
    fn threshold_one_tolerates_one_failure_and_not_two() {
        let options = RolloutOptions {
            failure_threshold: 1,
            ..options()
        };
        check(
            rollout(&[&["a"], &["b", "c"], &["d"]], options),
            "
            0 start
            1 prepared a b c d
            2 activated a
            3 healthy a
            13 tick
            14 activated b c
            15 activate-failed c
            16 healthy b
            26 tick
            27 activated d
            28 unhealthy d
            87 tick
            88 switched-back a b d
            ",
            expect![[r#"
                0 start
                    preparing: 4 preparing; 0 failures, 1 allowed
                    a=preparing b=preparing c=preparing d=preparing
                    > prepare a, prepare b, prepare c, prepare d
                1 prepared a b c d
                    wave 1/3: 1 activating; 0 failures, 1 allowed
                    a=activating b=prepared c=prepared d=prepared
                    > activate a
                2 activated a
                    wave 1/3: 1 activated; 0 failures, 1 allowed
                    a=activated b=prepared c=prepared d=prepared
                3 healthy a
                    wave 1/3: 1 healthy; 0 failures, 1 allowed
                    a=healthy b=prepared c=prepared d=prepared
                13 tick
                    wave 2/3: 2 activating; 0 failures, 1 allowed
                    a=settled b=activating c=activating d=prepared
                    > activate b, activate c
                14 activated b c
                    wave 2/3: 2 activated; 0 failures, 1 allowed
                    a=settled b=activated c=activated d=prepared
                15 activate-failed c
                    wave 2/3: 1 activated, 1 failed; 1 failure, 1 allowed
                    a=settled b=activated c=failed d=prepared
                    > revert c
                16 healthy b
                    wave 2/3: 1 healthy, 1 failed; 1 failure, 1 allowed
                    a=settled b=healthy c=failed d=prepared
                26 tick
                    wave 3/3: 1 activating; 1 failure, 1 allowed
                    a=settled b=settled c=failed d=activating
                    > activate d
                27 activated d
                    wave 3/3: 1 activated; 1 failure, 1 allowed
                    a=settled b=settled c=failed d=activated
                28 unhealthy d
                    wave 3/3: 1 activated; 1 failure, 1 allowed
                    a=settled b=settled c=failed d=activated
                87 tick
                    rolling back (failed: 2 failures, 1 allowed; last: d: not healthy for 10s within 1m of activation): 3 switching back
                    a=switching-back b=switching-back c=failed d=switching-back
                    > switch-back d, switch-back a, switch-back b
                88 switched-back a b d
                    failed: 2 failures, 1 allowed; last: d: not healthy for 10s within 1m of activation; 3 switched back
                    a=switched-back b=switched-back c=failed d=switched-back
            "#]],
        );
    }

    #[test]
    fn a_prepare_failure_counts_against_the_threshold() {
        check(
            rollout(&[&["a"], &["b"]], options()),
            "
            0 start
            1 prepared a
            2 prepare-failed b
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a
                    preparing: 1 preparing, 1 prepared; 0 failures, 0 allowed
                    a=prepared b=preparing
                2 prepare-failed b
                    failed: 1 failure, 0 allowed; last: b: prepare failed: disk full
                    a=prepared b=failed
            "#]],
        );
        let options = RolloutOptions {
            failure_threshold: 1,
            ..options()
        };
        check(
            rollout(&[&["a", "b"], &["c"]], options),
            "
            0 start
            1 prepared a c
            2 prepare-failed b
            3 activated a
            4 healthy a
            14 tick
            ",
            expect![[r#"
                0 start
                    preparing: 3 preparing; 0 failures, 1 allowed
                    a=preparing b=preparing c=preparing
                    > prepare a, prepare b, prepare c
                1 prepared a c
                    preparing: 1 preparing, 2 prepared; 0 failures, 1 allowed
                    a=prepared b=preparing c=prepared
                2 prepare-failed b
                    wave 1/2: 1 activating, 1 failed; 1 failure, 1 allowed
                    a=activating b=failed c=prepared
                    > activate a
                3 activated a
                    wave 1/2: 1 activated, 1 failed; 1 failure, 1 allowed
                    a=activated b=failed c=prepared
                4 healthy a
                    wave 1/2: 1 healthy, 1 failed; 1 failure, 1 allowed
                    a=healthy b=failed c=prepared
                14 tick
                    wave 2/2: 1 activating; 1 failure, 1 allowed
                    a=settled b=failed c=activating
                    > activate c
            "#]],
        );
    }

    /// Options whose healthy deadline is longer than the progress deadline, so a silent target
    /// stalls the deployment before its own prepare deadline passes.
    fn patient_options() -> RolloutOptions {
        RolloutOptions {
            healthy_deadline_ms: 300 * SECOND,
            ..options()
        }
    }

    #[test]
    fn a_target_that_never_prepares_fails_at_the_healthy_deadline() {
        check(
            rollout(&[&["a"], &["b"]], options()),
            "
            0 start
            1 prepared a
            60 tick
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a
                    preparing: 1 preparing, 1 prepared; 0 failures, 0 allowed
                    a=prepared b=preparing
                60 tick
                    failed: 1 failure, 0 allowed; last: b: did not prepare within the healthy deadline (1m)
                    a=prepared b=failed
            "#]],
        );
    }

    #[test]
    fn no_progress_for_the_progress_deadline_fails_as_stalled() {
        check(
            rollout(&[&["a"], &["b"]], patient_options()),
            "
            0 start
            1 prepared a
            120 tick
            121 tick
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a
                    preparing: 1 preparing, 1 prepared; 0 failures, 0 allowed
                    a=prepared b=preparing
                120 tick
                    preparing: 1 preparing, 1 prepared; 0 failures, 0 allowed
                    a=prepared b=preparing
                121 tick
                    failed: stalled: no progress for 2m
                    a=prepared b=preparing
            "#]],
        );
    }

    #[test]
    fn pause_holds_new_waves_and_resume_continues() {
        check(
            rollout(&[&["a"], &["b"]], options()),
            "
            0 start
            1 prepared a b
            2 activated a
            3 pause
            4 healthy a
            14 tick
            500 tick
            501 resume
            502 activated b
            503 healthy b
            513 tick
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a b
                    wave 1/2: 1 activating; 0 failures, 0 allowed
                    a=activating b=prepared
                    > activate a
                2 activated a
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared
                3 pause
                    wave 1/2: 1 activated; 0 failures, 0 allowed (paused)
                    a=activated b=prepared
                4 healthy a
                    wave 1/2: 1 healthy; 0 failures, 0 allowed (paused)
                    a=healthy b=prepared
                14 tick
                    wave 1/2: 1 settled, next wave held by the pause; 0 failures, 0 allowed (paused)
                    a=settled b=prepared
                500 tick
                    wave 1/2: 1 settled, next wave held by the pause; 0 failures, 0 allowed (paused)
                    a=settled b=prepared
                501 resume
                    wave 2/2: 1 activating; 0 failures, 0 allowed
                    a=settled b=activating
                    > activate b
                502 activated b
                    wave 2/2: 1 activated; 0 failures, 0 allowed
                    a=settled b=activated
                503 healthy b
                    wave 2/2: 1 healthy; 0 failures, 0 allowed
                    a=settled b=healthy
                513 tick
                    succeeded: 2 of 2 instances on the release; 0 failures, 0 allowed
                    a=settled b=settled
            "#]],
        );
    }

    #[test]
    fn paused_time_does_not_count_against_the_progress_deadline() {
        // 49 s without progress before the pause, so the deadline falls 71 s after the resume.
        check(
            rollout(&[&["a"], &["b"]], patient_options()),
            "
            0 start
            1 prepared a
            50 pause
            1000 tick
            2000 resume
            2070 tick
            2071 tick
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a
                    preparing: 1 preparing, 1 prepared; 0 failures, 0 allowed
                    a=prepared b=preparing
                50 pause
                    preparing: 1 preparing, 1 prepared; 0 failures, 0 allowed (paused)
                    a=prepared b=preparing
                1000 tick
                    preparing: 1 preparing, 1 prepared; 0 failures, 0 allowed (paused)
                    a=prepared b=preparing
                2000 resume
                    preparing: 1 preparing, 1 prepared; 0 failures, 0 allowed
                    a=prepared b=preparing
                2070 tick
                    preparing: 1 preparing, 1 prepared; 0 failures, 0 allowed
                    a=prepared b=preparing
                2071 tick
                    failed: stalled: no progress for 2m
                    a=prepared b=preparing
            "#]],
        );
    }

    #[test]
    fn pause_holds_even_the_switch_backs_until_resume_or_abort() {
        check(
            rollout(&[&["a", "b"], &["c"]], options()),
            "
            0 start
            1 prepared a b c
            2 pause
            3 joined late
            4 resume
            5 prepared late
            6 activated a b
            7 pause
            8 activate-failed b
            9 resume
            10 lost a
            11 pause
            12 tick
            13 abort
            14 switched-back a
            ",
            expect![[r#"
                0 start
                    preparing: 3 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing c=preparing
                    > prepare a, prepare b, prepare c
                1 prepared a b c
                    wave 1/2: 2 activating; 0 failures, 0 allowed
                    a=activating b=activating c=prepared
                    > activate a, activate b
                2 pause
                    wave 1/2: 2 activating; 0 failures, 0 allowed (paused)
                    a=activating b=activating c=prepared
                3 joined late
                    wave 1/2: 2 activating; 0 failures, 0 allowed (paused)
                    a=activating b=activating c=prepared late=pending
                4 resume
                    wave 1/2: 2 activating; 0 failures, 0 allowed
                    a=activating b=activating c=prepared late=preparing
                    > prepare late
                5 prepared late
                    wave 1/2: 2 activating; 0 failures, 0 allowed
                    a=activating b=activating c=prepared late=prepared
                6 activated a b
                    wave 1/2: 2 activated; 0 failures, 0 allowed
                    a=activated b=activated c=prepared late=prepared
                7 pause
                    wave 1/2: 2 activated; 0 failures, 0 allowed (paused)
                    a=activated b=activated c=prepared late=prepared
                8 activate-failed b
                    rolling back (failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1): 1 activated (paused: switch backs wait for resume or abort)
                    a=activated b=failed c=prepared late=prepared
                    > revert b
                9 resume
                    rolling back (failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1): 1 switching back
                    a=switching-back b=failed c=prepared late=prepared
                    > switch-back a
                10 lost a
                    failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1; could not switch back: a
                    a=switch-back-failed b=failed c=prepared late=prepared
                11 pause
                    failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1; could not switch back: a
                    a=switch-back-failed b=failed c=prepared late=prepared
                12 tick
                    failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1; could not switch back: a
                    a=switch-back-failed b=failed c=prepared late=prepared
                13 abort
                    failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1; could not switch back: a
                    a=switch-back-failed b=failed c=prepared late=prepared
                14 switched-back a
                    failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1; could not switch back: a
                    a=switch-back-failed b=failed c=prepared late=prepared
            "#]],
        );
    }

    #[test]
    fn abort_switches_back_every_activated_instance_and_ends_aborted() {
        check(
            rollout(&[&["a"], &["b", "c"], &["d"]], options()),
            "
            0 start
            1 prepared a b c d
            2 activated a
            3 healthy a
            13 tick
            14 activated b
            15 abort
            16 switched-back a b
            17 activate-failed c
            18 tick
            ",
            expect![[r#"
                0 start
                    preparing: 4 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing c=preparing d=preparing
                    > prepare a, prepare b, prepare c, prepare d
                1 prepared a b c d
                    wave 1/3: 1 activating; 0 failures, 0 allowed
                    a=activating b=prepared c=prepared d=prepared
                    > activate a
                2 activated a
                    wave 1/3: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared c=prepared d=prepared
                3 healthy a
                    wave 1/3: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared c=prepared d=prepared
                13 tick
                    wave 2/3: 2 activating; 0 failures, 0 allowed
                    a=settled b=activating c=activating d=prepared
                    > activate b, activate c
                14 activated b
                    wave 2/3: 1 activating, 1 activated; 0 failures, 0 allowed
                    a=settled b=activated c=activating d=prepared
                15 abort
                    rolling back (aborted): 3 switching back
                    a=switching-back b=switching-back c=switching-back d=prepared
                    > switch-back a, switch-back b, switch-back c
                16 switched-back a b
                    rolling back (aborted): 1 switching back, 2 switched back
                    a=switched-back b=switched-back c=switching-back d=prepared
                17 activate-failed c
                    aborted; 3 switched back
                    a=switched-back b=switched-back c=switched-back d=prepared
                18 tick
                    aborted; 3 switched back
                    a=switched-back b=switched-back c=switched-back d=prepared
            "#]],
        );
    }

    #[test]
    fn a_late_joiner_goes_to_the_last_wave_not_started() {
        check(
            rollout(&[&["a"], &["b"]], options()),
            "
            0 start
            1 joined x
            2 joined b
            3 prepared a b
            4 prepared x
            5 activated a
            6 joined y
            7 prepared y
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 joined x
                    preparing: 3 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing x=preparing
                    > prepare x
                2 joined b
                    preparing: 3 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing x=preparing
                3 prepared a b
                    preparing: 1 preparing, 2 prepared; 0 failures, 0 allowed
                    a=prepared b=prepared x=preparing
                4 prepared x
                    wave 1/2: 1 activating; 0 failures, 0 allowed
                    a=activating b=prepared x=prepared
                    > activate a
                5 activated a
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared x=prepared
                6 joined y
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared x=prepared y=preparing
                    > prepare y
                7 prepared y
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared x=prepared y=prepared
            "#]],
        );
    }

    #[test]
    fn a_late_joiner_during_the_last_wave_gets_a_new_final_wave() {
        check(
            rollout(&[&["a"]], options()),
            "
            0 start
            1 prepared a
            2 activated a
            3 joined x
            4 healthy a
            14 tick
            15 prepared x
            16 activated x
            17 healthy x
            27 tick
            ",
            expect![[r#"
                0 start
                    preparing: 1 preparing; 0 failures, 0 allowed
                    a=preparing
                    > prepare a
                1 prepared a
                    wave 1/1: 1 activating; 0 failures, 0 allowed
                    a=activating
                    > activate a
                2 activated a
                    wave 1/1: 1 activated; 0 failures, 0 allowed
                    a=activated
                3 joined x
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated x=preparing
                    > prepare x
                4 healthy a
                    wave 1/2: 1 healthy; 0 failures, 0 allowed
                    a=healthy x=preparing
                14 tick
                    wave 1/2: 1 settled, next wave still preparing; 0 failures, 0 allowed
                    a=settled x=preparing
                15 prepared x
                    wave 2/2: 1 activating; 0 failures, 0 allowed
                    a=settled x=activating
                    > activate x
                16 activated x
                    wave 2/2: 1 activated; 0 failures, 0 allowed
                    a=settled x=activated
                17 healthy x
                    wave 2/2: 1 healthy; 0 failures, 0 allowed
                    a=settled x=healthy
                27 tick
                    succeeded: 2 of 2 instances on the release; 0 failures, 0 allowed
                    a=settled x=settled
            "#]],
        );
    }

    #[test]
    fn restart_resends_exactly_the_outstanding_commands() {
        check(
            rollout(&[&["a", "b"], &["c"]], options()),
            "
            0 start
            1 prepared a c
            5 restarted
            6 prepared b
            7 activated a
            8 healthy a
            600 restarted
            601 tick
            602 healthy a
            612 tick
            613 activated b
            657 tick
            658 tick
            659 switched-back a
            700 restarted
            758 tick
            759 tick
            ",
            expect![[r#"
                0 start
                    preparing: 3 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing c=preparing
                    > prepare a, prepare b, prepare c
                1 prepared a c
                    preparing: 1 preparing, 2 prepared; 0 failures, 0 allowed
                    a=prepared b=preparing c=prepared
                5 restarted
                    preparing: 1 preparing, 2 prepared; 0 failures, 0 allowed
                    a=prepared b=preparing c=prepared
                    > prepare b (resend)
                6 prepared b
                    wave 1/2: 2 activating; 0 failures, 0 allowed
                    a=activating b=activating c=prepared
                    > activate a, activate b
                7 activated a
                    wave 1/2: 1 activating, 1 activated; 0 failures, 0 allowed
                    a=activated b=activating c=prepared
                8 healthy a
                    wave 1/2: 1 activating, 1 healthy; 0 failures, 0 allowed
                    a=healthy b=activating c=prepared
                600 restarted
                    wave 1/2: 1 activating, 1 activated; 0 failures, 0 allowed
                    a=activated b=activating c=prepared
                    > activate b (resend)
                601 tick
                    wave 1/2: 1 activating, 1 activated; 0 failures, 0 allowed
                    a=activated b=activating c=prepared
                602 healthy a
                    wave 1/2: 1 activating, 1 healthy; 0 failures, 0 allowed
                    a=healthy b=activating c=prepared
                612 tick
                    wave 1/2: 1 activating, 1 settled; 0 failures, 0 allowed
                    a=settled b=activating c=prepared
                613 activated b
                    wave 1/2: 1 activated, 1 settled; 0 failures, 0 allowed
                    a=settled b=activated c=prepared
                657 tick
                    wave 1/2: 1 activated, 1 settled; 0 failures, 0 allowed
                    a=settled b=activated c=prepared
                658 tick
                    rolling back (failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation): 2 switching back
                    a=switching-back b=switching-back c=prepared
                    > switch-back b, switch-back a
                659 switched-back a
                    rolling back (failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation): 1 switching back, 1 switched back
                    a=switched-back b=switching-back c=prepared
                700 restarted
                    rolling back (failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation): 1 switching back, 1 switched back
                    a=switched-back b=switching-back c=prepared
                    > switch-back b (resend)
                758 tick
                    rolling back (failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation): 1 switching back, 1 switched back
                    a=switched-back b=switching-back c=prepared
                759 tick
                    failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation; 1 switched back; could not switch back: b
                    a=switched-back b=switch-back-failed c=prepared
            "#]],
        );
    }

    #[test]
    fn restart_while_paused_resends_only_what_was_issued() {
        check(
            rollout(&[&["a", "b"], &["c"]], options()),
            "
            0 start
            1 prepared a b c
            2 pause
            3 joined late
            4 restarted
            5 activate-failed b
            6 restarted
            7 resume
            ",
            expect![[r#"
                0 start
                    preparing: 3 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing c=preparing
                    > prepare a, prepare b, prepare c
                1 prepared a b c
                    wave 1/2: 2 activating; 0 failures, 0 allowed
                    a=activating b=activating c=prepared
                    > activate a, activate b
                2 pause
                    wave 1/2: 2 activating; 0 failures, 0 allowed (paused)
                    a=activating b=activating c=prepared
                3 joined late
                    wave 1/2: 2 activating; 0 failures, 0 allowed (paused)
                    a=activating b=activating c=prepared late=pending
                4 restarted
                    wave 1/2: 2 activating; 0 failures, 0 allowed (paused)
                    a=activating b=activating c=prepared late=pending
                    > activate a (resend), activate b (resend)
                5 activate-failed b
                    rolling back (failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1): 1 activating (paused: switch backs wait for resume or abort)
                    a=activating b=failed c=prepared late=pending
                    > revert b
                6 restarted
                    rolling back (failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1): 1 activating (paused: switch backs wait for resume or abort)
                    a=activating b=failed c=prepared late=pending
                7 resume
                    rolling back (failed: 1 failure, 0 allowed; last: b: activation failed: application_start exited 1): 1 switching back
                    a=switching-back b=failed c=prepared late=pending
                    > switch-back a
            "#]],
        );
    }

    #[test]
    fn operator_actions_before_the_start() {
        check(
            rollout(&[&["a"], &["b"]], options()),
            "
            0 pause
            1 start
            2 joined x
            3 resume
            ",
            expect![[r#"
                0 pause
                    not started: 2 targets in 2 waves (paused)
                    a=pending b=pending
                1 start
                    preparing: 2 pending; 0 failures, 0 allowed (paused)
                    a=pending b=pending
                2 joined x
                    preparing: 3 pending; 0 failures, 0 allowed (paused)
                    a=pending b=pending x=pending
                3 resume
                    preparing: 3 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing x=preparing
                    > prepare a, prepare b, prepare x
            "#]],
        );
        check(
            rollout(&[&["a"], &["b"]], options()),
            "
            0 tick
            1 abort
            2 start
            ",
            expect![[r#"
                0 tick
                    not started: 2 targets in 2 waves
                    a=pending b=pending
                1 abort
                    aborted
                    a=pending b=pending
                2 start
                    aborted
                    a=pending b=pending
            "#]],
        );
    }

    #[test]
    fn resume_is_restarted() {
        let mut rollout = rollout(&[&["a"], &["b"]], options());
        for (now_ms, input) in ["0 start", "1 prepared a"].into_iter().flat_map(parse) {
            rollout = rollout.step(input, now_ms).0;
        }
        assert_eq!(rollout.resume(9 * SECOND), rollout.step(Input::Restarted, 9 * SECOND));
        let (_, commands) = rollout.resume(9 * SECOND);
        assert_eq!(
            commands,
            vec![Command {
                instance: "b".to_owned(),
                epoch: EPOCH,
                action: Action::Prepare,
                resend: true
            }]
        );
    }

    #[test]
    fn unknown_and_stale_reports_change_nothing() {
        let (rollout, _) = run(
            rollout(&[&["a"], &["b"]], options()),
            "
            0 start
            1 prepared a b
            ",
        );
        assert_eq!(rollout.last_progress_ms, SECOND);
        let stale = "
            2 healthy b
            3 prepared ghost
            4 prepared a
            5 switched-back a
            6 lost ghost
            7 healthy a
            8 unhealthy a
            9 activate-failed b
            10 joined a
        ";
        let (after, transcript) = run(rollout.clone(), stale);
        assert_eq!(
            Rollout {
                last_step_ms: rollout.last_step_ms,
                ..after
            },
            rollout,
            "{transcript}"
        );
    }

    #[test]
    fn a_failure_during_the_bake_fails_the_deployment() {
        let options = RolloutOptions {
            bake_ms: 30 * SECOND,
            ..options()
        };
        check(
            rollout(&[&["a"], &["b"]], options.clone()),
            "
            0 start
            1 prepared a b
            2 activated a
            3 healthy a
            13 tick
            20 unhealthy a
            21 switched-back a
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a b
                    wave 1/2: 1 activating; 0 failures, 0 allowed
                    a=activating b=prepared
                    > activate a
                2 activated a
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared
                3 healthy a
                    wave 1/2: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared
                13 tick
                    wave 1/2: 1 settled, baking for 30s; 0 failures, 0 allowed
                    a=settled b=prepared
                20 unhealthy a
                    rolling back (failed: 1 failure, 0 allowed; last: a: unhealthy after settling: GET /health: 503): 1 switching back
                    a=switching-back b=prepared
                    > switch-back a
                21 switched-back a
                    failed: 1 failure, 0 allowed; last: a: unhealthy after settling: GET /health: 503; 1 switched back
                    a=switched-back b=prepared
            "#]],
        );
        check(
            rollout(&[&["a"], &["b"]], options),
            "
            0 start
            1 prepared a b
            2 activated a
            3 healthy a
            13 tick
            42 tick
            43 tick
            44 activated b
            45 healthy b
            55 tick
            84 lost a
            85 switched-back a b
            ",
            expect![[r#"
                0 start
                    preparing: 2 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing
                    > prepare a, prepare b
                1 prepared a b
                    wave 1/2: 1 activating; 0 failures, 0 allowed
                    a=activating b=prepared
                    > activate a
                2 activated a
                    wave 1/2: 1 activated; 0 failures, 0 allowed
                    a=activated b=prepared
                3 healthy a
                    wave 1/2: 1 healthy; 0 failures, 0 allowed
                    a=healthy b=prepared
                13 tick
                    wave 1/2: 1 settled, baking for 30s; 0 failures, 0 allowed
                    a=settled b=prepared
                42 tick
                    wave 1/2: 1 settled, baking for 1s; 0 failures, 0 allowed
                    a=settled b=prepared
                43 tick
                    wave 2/2: 1 activating; 0 failures, 0 allowed
                    a=settled b=activating
                    > activate b
                44 activated b
                    wave 2/2: 1 activated; 0 failures, 0 allowed
                    a=settled b=activated
                45 healthy b
                    wave 2/2: 1 healthy; 0 failures, 0 allowed
                    a=settled b=healthy
                55 tick
                    wave 2/2: 1 settled, baking for 30s; 0 failures, 0 allowed
                    a=settled b=settled
                84 lost a
                    rolling back (failed: 1 failure, 0 allowed; last: a: lost after activation): 2 switching back
                    a=switching-back b=switching-back
                    > switch-back a, switch-back b
                85 switched-back a b
                    failed: 1 failure, 0 allowed; last: a: lost after activation; 2 switched back
                    a=switched-back b=switched-back
            "#]],
        );
    }

    #[test]
    fn without_rollback_a_failure_ends_the_deployment_where_it_stands() {
        let options = RolloutOptions {
            rollback_on_failure: false,
            ..options()
        };
        check(
            rollout(&[&["a", "b"], &["c"]], options),
            "
            0 start
            1 prepared a b c
            2 activated a b
            3 healthy a
            13 tick
            61 tick
            62 switched-back a
            ",
            expect![[r#"
                0 start
                    preparing: 3 preparing; 0 failures, 0 allowed
                    a=preparing b=preparing c=preparing
                    > prepare a, prepare b, prepare c
                1 prepared a b c
                    wave 1/2: 2 activating; 0 failures, 0 allowed
                    a=activating b=activating c=prepared
                    > activate a, activate b
                2 activated a b
                    wave 1/2: 2 activated; 0 failures, 0 allowed
                    a=activated b=activated c=prepared
                3 healthy a
                    wave 1/2: 1 activated, 1 healthy; 0 failures, 0 allowed
                    a=healthy b=activated c=prepared
                13 tick
                    wave 1/2: 1 activated, 1 settled; 0 failures, 0 allowed
                    a=settled b=activated c=prepared
                61 tick
                    failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation; 2 may still run the release (no rollback)
                    a=settled b=failed c=prepared
                62 switched-back a
                    failed: 1 failure, 0 allowed; last: b: not healthy for 10s within 1m of activation; 2 may still run the release (no rollback)
                    a=settled b=failed c=prepared
            "#]],
        );
    }

    #[test]
    fn an_empty_deployment_succeeds_at_once() {
        check(
            rollout(&[&[]], options()),
            "
            0 start
            ",
            expect![[r#"
                0 start
                    succeeded: 0 of 0 instances on the release; 0 failures, 0 allowed
            "#]],
        );
    }

    #[test]
    fn new_refuses_duplicate_targets_and_bad_options() {
        let waves = vec![vec!["a".to_owned()], vec!["b".to_owned(), "a".to_owned()]];
        expect![[r#"instance "a" is listed in wave 1 and again in wave 2: a target belongs to exactly one wave; fix the wave plan"#]].assert_eq(
            &Rollout::new(waves, options(), EPOCH, 0)
                .expect_err("a is listed twice")
                .to_string(),
        );
        let options = RolloutOptions {
            healthy_deadline_ms: 0,
            ..options()
        };
        expect!["rollout option healthy_deadline is 0 ms; it must be more than zero"].assert_eq(
            &Rollout::new(vec![], options, EPOCH, 0)
                .expect_err("a zero deadline")
                .to_string(),
        );
    }

    #[test]
    fn persisted_form() {
        let (rollout, _) = run(
            rollout(&[&["a"], &["b"]], options()),
            "
            0 start
            1 prepared a
            2 prepare-failed b
            ",
        );
        let json = serde_json::to_string_pretty(&rollout).expect("serialises");
        expect![[r#"
            {
              "epoch": 7,
              "options": {
                "failure_threshold": 0,
                "min_healthy_time_ms": 10000,
                "healthy_deadline_ms": 60000,
                "progress_deadline_ms": 120000,
                "bake_ms": 0,
                "rollback_on_failure": true,
                "drain": false,
                "switch_back_batch": 0,
                "first_release": false
              },
              "waves": [
                [
                  "a"
                ],
                [
                  "b"
                ]
              ],
              "targets": {
                "a": {
                  "wave": 0,
                  "state": {
                    "kind": "prepared"
                  },
                  "traffic": {
                    "kind": "in_service"
                  }
                },
                "b": {
                  "wave": 1,
                  "state": {
                    "kind": "failed",
                    "reason": "prepare failed: disk full",
                    "needs_switch_back": false
                  },
                  "traffic": {
                    "kind": "in_service"
                  }
                }
              },
              "phase": {
                "kind": "failed",
                "reason": "1 failure, 0 allowed; last: b: prepare failed: disk full",
                "switch_back_failed": []
              },
              "waves_started": 0,
              "failures": [
                {
                  "instance": "b",
                  "reason": "prepare failed: disk full",
                  "at_ms": 2000
                }
              ],
              "last_progress_ms": 2000,
              "paused_since_ms": null,
              "last_step_ms": 2000,
              "preparing_since_ms": 0,
              "traffic_failure": null
            }"#]]
        .assert_eq(&json);
    }

    // ---- properties ----

    /// A random input, chosen so that runs get deep: `Respond` answers an instance's outstanding step (well, mostly).
    #[derive(Debug, Clone)]
    enum Event {
        Start,
        Tick,
        /// Answer the outstanding step of one target (picked by index), well unless `good` is false.
        Respond {
            who: usize,
            good: bool,
        },
        /// Answer every target's outstanding step well.
        RespondAll,
        Raw {
            who: usize,
            report: Report,
        },
        Lost(usize),
        Joined(usize),
        Pause,
        Resume,
        Abort,
        Restarted,
    }

    /// Instances `i0…` are planned targets; higher numbers are strangers until they join.
    fn instance(who: usize) -> String {
        format!("i{who}")
    }

    fn any_report() -> impl Strategy<Value = Report> {
        prop_oneof![
            Just(Report::Prepared),
            Just(Report::PrepareFailed("x".to_owned())),
            Just(Report::Activated),
            Just(Report::ActivateFailed("x".to_owned())),
            Just(Report::Healthy),
            Just(Report::Unhealthy("x".to_owned())),
            Just(Report::Exited("x".to_owned())),
            Just(Report::SwitchedBack),
            Just(Report::SwitchBackFailed("x".to_owned())),
            Just(Report::Drained),
            Just(Report::DrainFailed("x".to_owned())),
            Just(Report::Undrained),
            Just(Report::UndrainFailed("x".to_owned())),
        ]
    }

    fn any_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            2 => Just(Event::Start),
            60 => Just(Event::Tick),
            200 => (0..40usize, prop::bool::weighted(0.97)).prop_map(|(who, good)| Event::Respond { who, good }),
            20 => Just(Event::RespondAll),
            6 => (0..26usize, any_report()).prop_map(|(who, report)| Event::Raw { who, report }),
            1 => (0..24usize).prop_map(Event::Lost),
            6 => (0..26usize).prop_map(Event::Joined),
            3 => Just(Event::Pause),
            10 => Just(Event::Resume),
            1 => Just(Event::Abort),
            4 => Just(Event::Restarted),
        ]
    }
    fn any_options() -> impl Strategy<Value = RolloutOptions> {
        (
            0..3u32,
            prop_oneof![Just(0i64), 1000..5000i64],
            2000..15_000i64,
            3000..20_000i64,
            prop_oneof![Just(0i64), 0..4000i64],
            any::<bool>(),
            any::<bool>(),
            0..4u32,
        )
            .prop_map(
                |(
                    failure_threshold,
                    min_healthy_time_ms,
                    healthy_deadline_ms,
                    progress_deadline_ms,
                    bake_ms,
                    rollback,
                    drain,
                    switch_back_batch,
                )| {
                    RolloutOptions {
                        failure_threshold,
                        min_healthy_time_ms,
                        healthy_deadline_ms,
                        progress_deadline_ms,
                        bake_ms,
                        rollback_on_failure: rollback,
                        drain,
                        switch_back_batch,
                        first_release: false,
                    }
                },
            )
    }

    /// At most 6 waves and 20 instances.
    fn any_waves() -> impl Strategy<Value = Vec<Vec<String>>> {
        prop::collection::vec(1..=4usize, 1..=6).prop_map(|sizes| {
            let mut next = 0;
            let mut waves = Vec::new();
            for size in sizes {
                let wave: Vec<String> = (next..(next + size).min(20)).map(instance).collect();
                next = (next + size).min(20);
                waves.push(wave);
            }
            waves
        })
    }

    /// Drives a rollout and checks the invariants after every step.
    struct Harness {
        rollout: Rollout,
        now_ms: i64,
        /// Every command each instance received, in order.
        sent: BTreeMap<String, Vec<Command>>,
        /// Instances the harness reported prepared (while they were preparing).
        prepared: BTreeSet<String>,
    }

    impl Harness {
        /// The inputs for `event`; `chaos` 0 answers everything well and never loses or aborts, 1 adds some bad
        /// answers and stray reports, 2 adds losses and aborts.
        fn inputs_for(&self, event: &Event, chaos: u8) -> Vec<Input> {
            let calm = |input: Input| if chaos == 0 { Input::Tick } else { input };
            match event {
                Event::Start => vec![Input::Start],
                Event::Tick => vec![Input::Tick],
                Event::Respond { who, good } => {
                    let names: Vec<&String> = self.rollout.targets.keys().collect();
                    if names.is_empty() {
                        return vec![Input::Tick];
                    }
                    let name = names[who % names.len()];
                    vec![self.answer(name, *good || chaos == 0)]
                }
                Event::RespondAll => self
                    .rollout
                    .targets
                    .keys()
                    .flat_map(|name| {
                        let mut answers = Vec::new();
                        if self.rollout.targets[name].traffic.is_moving() {
                            answers.push(self.answer(name, true));
                        }
                        answers.push(self.answer(name, true));
                        answers
                    })
                    .collect(),
                Event::Raw { who, report } => vec![calm(Input::Report {
                    instance: instance(*who),
                    report: report.clone(),
                })],
                Event::Lost(who) if chaos >= 2 => vec![Input::InstanceLost(instance(*who))],
                Event::Abort if chaos >= 2 => vec![Input::Abort],
                Event::Lost(_) | Event::Abort => vec![Input::Tick],
                Event::Joined(who) => vec![Input::InstanceJoined(instance(*who))],
                Event::Pause => vec![Input::Pause],
                Event::Resume => vec![Input::Resume],
                Event::Restarted => vec![Input::Restarted],
            }
        }

        /// What a well (or badly) behaved traffic provider, else agent, reports next about `name`.
        fn answer(&self, name: &str, good: bool) -> Input {
            let target = self.rollout.targets.get(name);
            let state = target.map(|target| &target.state);
            let traffic_report = match (target.map(|target| &target.traffic), good) {
                (Some(Traffic::Draining { .. }), true) => Some(Report::Drained),
                (Some(Traffic::Draining { .. }), false) => Some(Report::DrainFailed("x".to_owned())),
                (Some(Traffic::Undraining { .. }), true) => Some(Report::Undrained),
                (Some(Traffic::Undraining { .. }), false) => Some(Report::UndrainFailed("x".to_owned())),
                _ => None,
            };
            if let Some(report) = traffic_report {
                return Input::Report {
                    instance: name.to_owned(),
                    report,
                };
            }
            let report = match (state, good) {
                (Some(InstanceState::Preparing), true) => Report::Prepared,
                (Some(InstanceState::Preparing), false) => Report::PrepareFailed("x".to_owned()),
                (Some(InstanceState::Activating { .. }), true) => Report::Activated,
                (Some(InstanceState::Activating { .. }), false) => Report::ActivateFailed("x".to_owned()),
                (Some(InstanceState::SwitchingBack { .. }), true) => Report::SwitchedBack,
                (Some(InstanceState::SwitchingBack { .. }), false) => Report::SwitchBackFailed("x".to_owned()),
                (_, true) => Report::Healthy,
                (_, false) => Report::Unhealthy("x".to_owned()),
            };
            Input::Report {
                instance: name.to_owned(),
                report,
            }
        }

        fn feed(&mut self, input: Input, elapsed_ms: i64) -> Result<(), TestCaseError> {
            self.now_ms += elapsed_ms;
            let before = &self.rollout;
            if let Input::Report {
                instance,
                report: Report::Prepared,
            } = &input
                && before.targets.get(instance).map(|target| &target.state) == Some(&InstanceState::Preparing)
            {
                self.prepared.insert(instance.clone());
            }
            let (after, commands) = before.step(input.clone(), self.now_ms);
            check_step(self, &input, &after, &commands)?;
            for command in commands {
                self.sent.entry(command.instance.clone()).or_default().push(command);
            }
            self.rollout = after;
            Ok(())
        }
    }

    fn is_done_with_wave(state: &InstanceState) -> bool {
        matches!(state, InstanceState::Settled { .. } | InstanceState::Failed { .. }) || is_switch_back_state(state)
    }

    /// Drains only when the deployment drains, once per instance, before its Activate; undrains only what was
    /// drained, once; re-sends repeat the last traffic command.
    fn check_traffic_command(
        before: &Rollout,
        after: &Rollout,
        history: &[Command],
        command: &Command,
    ) -> Result<(), TestCaseError> {
        prop_assert!(before.options.drain, "traffic command without drain: {:?}", command);
        let traffic_history: Vec<&Command> = history
            .iter()
            .filter(|earlier| earlier.action.is_traffic() && !earlier.resend)
            .collect();
        let last = traffic_history.last().map(|earlier| earlier.action);
        if command.resend {
            prop_assert_eq!(last, Some(command.action), "a re-send repeats the last traffic command");
            return Ok(());
        }
        match command.action {
            Action::Drain if history.iter().any(|earlier| earlier.action == Action::Activate) => {
                // Drained after its activation: only to be switched back, having been returned after its wave.
                prop_assert!(
                    matches!(after.phase, Phase::RollingBack { .. }),
                    "drained after activation outside a rollback: {:?}",
                    command
                );
                prop_assert!(
                    matches!(last, None | Some(Action::Undrain)),
                    "drained twice for the rollback: {:?}",
                    command
                );
                prop_assert!(
                    after.targets[&command.instance].state.needs_switch_back(),
                    "a rollback drains only what it switches back: {:?}",
                    command
                );
            }
            Action::Drain => {
                prop_assert!(last.is_none(), "drained twice: {:?}", command);
                prop_assert!(
                    !history.iter().any(|earlier| earlier.action == Action::Activate),
                    "drained after activation"
                );
            }
            Action::Undrain => prop_assert_eq!(last, Some(Action::Drain), "undrain without drain: {:?}", command),
            _ => unreachable!(),
        }
        prop_assert!(after.targets[&command.instance].traffic.is_moving());
        Ok(())
    }

    fn check_step(
        harness: &Harness,
        input: &Input,
        after: &Rollout,
        commands: &[Command],
    ) -> Result<(), TestCaseError> {
        let before = &harness.rollout;
        let mut sent = harness.sent.clone();
        if before.is_paused() && !matches!(input, Input::Resume | Input::Abort) {
            prop_assert!(
                commands
                    .iter()
                    .all(|command| command.resend || command.action == Action::Revert),
                "new commands while paused: {commands:?}"
            );
        }
        if *input == Input::Restarted {
            let resent: Vec<&Command> = commands.iter().filter(|command| command.resend).collect();
            let outstanding = before.outstanding();
            prop_assert_eq!(resent, outstanding.iter().collect::<Vec<_>>());
        }
        for command in commands {
            prop_assert_eq!(command.epoch, before.epoch);
            let everything = sent.entry(command.instance.clone()).or_default();
            if command.action.is_traffic() {
                check_traffic_command(before, after, everything, command)?;
                everything.push(command.clone());
                continue;
            }
            // The agent's own commands, in order; drains and undrains are checked above.
            let history: Vec<Command> = everything
                .iter()
                .filter(|earlier| !earlier.action.is_traffic())
                .cloned()
                .collect();
            let issued = |action: Action| {
                history
                    .iter()
                    .any(|earlier| !earlier.resend && earlier.action == action)
            };
            let last_issued = history
                .iter()
                .rev()
                .find(|earlier| !earlier.resend)
                .map(|earlier| earlier.action);
            if command.resend {
                prop_assert_eq!(
                    last_issued,
                    Some(command.action),
                    "a re-send repeats the last command: {:?}",
                    command
                );
            } else {
                match command.action {
                    Action::Prepare => prop_assert!(last_issued.is_none(), "prepared twice: {:?}", command),
                    Action::Activate => {
                        prop_assert_eq!(
                            last_issued,
                            Some(Action::Prepare),
                            "activate once, after prepare: {:?}",
                            command
                        );
                        prop_assert!(
                            harness.prepared.contains(&command.instance),
                            "activated before prepared"
                        );
                        let wave = after.targets[&command.instance].wave;
                        prop_assert_eq!(wave + 1, after.waves_started, "activate only in the started wave");
                        for earlier in after.waves[..wave].iter().flatten() {
                            prop_assert!(
                                is_done_with_wave(&after.targets[earlier].state),
                                "wave {} started before {} settled",
                                wave,
                                earlier
                            );
                        }
                    }
                    Action::SwitchBack => {
                        prop_assert!(issued(Action::Activate), "switch back without activate");
                        if after.options.drain {
                            prop_assert!(
                                matches!(
                                    after.targets[&command.instance].traffic,
                                    Traffic::Drained | Traffic::LeftDrained { .. }
                                ),
                                "switched back while taking traffic: {:?}",
                                command
                            );
                        }
                    }
                    Action::Revert => {
                        prop_assert!(issued(Action::Activate), "revert without activate");
                        prop_assert!(
                            matches!(
                                after.targets[&command.instance].state,
                                InstanceState::Failed {
                                    needs_switch_back: false,
                                    ..
                                }
                            ),
                            "revert of an instance that did not switch itself back: {:?}",
                            command
                        );
                    }
                    Action::Drain | Action::Undrain => unreachable!("checked above"),
                }
                if command.action == Action::Activate && after.options.drain {
                    prop_assert_eq!(
                        &after.targets[&command.instance].traffic,
                        &Traffic::Drained,
                        "activated while taking traffic: {:?}",
                        command
                    );
                }
            }
            everything.push(command.clone());
        }
        prop_assert!(after.waves_started >= before.waves_started);
        let activating: Vec<usize> = after
            .targets
            .values()
            .filter(|target| {
                matches!(
                    target.state,
                    InstanceState::Activating { .. } | InstanceState::Activated { .. }
                )
            })
            .map(|target| target.wave)
            .collect();
        if let Some(&wave) = activating.first() {
            prop_assert!(activating.iter().all(|other| *other == wave), "activating across waves");
            prop_assert_eq!(wave + 1, after.waves_started);
            prop_assert!(activating.len() <= after.waves[wave].len());
        }
        if matches!(after.phase, Phase::Preparing | Phase::Wave { .. }) {
            prop_assert!(after.failures.len() <= after.options.failure_threshold as usize);
        }
        let json = serde_json::to_string(after).expect("serialises");
        prop_assert_eq!(&serde_json::from_str::<Rollout>(&json).expect("deserialises"), after);
        Ok(())
    }

    proptest! {
        #[test]
        fn invariants_hold_and_the_deployment_always_ends(
            waves in any_waves(),
            options in any_options(),
            chaos in 0..3u8,
            agents_keep_answering in any::<bool>(),
            events in prop::collection::vec((0..1500i64, any_event()), 0..200),
        ) {
            let rollout = Rollout::new(waves, options, EPOCH, 0).expect("valid waves and options");
            let mut harness = Harness { rollout, now_ms: 0, sent: BTreeMap::new(), prepared: BTreeSet::new() };
            harness.feed(Input::Start, 0)?;
            for (elapsed_ms, event) in &events {
                let mut elapsed_ms = *elapsed_ms;
                for input in harness.inputs_for(event, chaos) {
                    harness.feed(input, elapsed_ms)?;
                    elapsed_ms = 0;
                }
            }
            // Resumed and then left to time (with or without agents answering), every deployment ends: deadlines
            // bound every wait.
            harness.feed(Input::Resume, 0)?;
            harness.feed(Input::Start, 0)?;
            for _ in 0..3000 {
                if harness.rollout.is_finished() {
                    break;
                }
                if agents_keep_answering {
                    for input in harness.inputs_for(&Event::RespondAll, chaos) {
                        harness.feed(input, 0)?;
                    }
                }
                harness.feed(Input::Tick, SECOND)?;
            }
            let end = &harness.rollout;
            prop_assert!(end.is_finished(), "not finished: {}", end.summary());
            // Never silently drained: whatever is still out of the load balancer is there for a stated reason.
            for (name, target) in &end.targets {
                match &target.traffic {
                    Traffic::InService | Traffic::LeftDrained { .. } => {}
                    Traffic::Drained => prop_assert!(
                        matches!(target.state, InstanceState::SwitchBackFailed { .. }),
                        "{} left drained in {:?}", name, target.state
                    ),
                    moving => prop_assert!(false, "{} still {:?} at the end", name, moving),
                }
            }
            let activations = |instance: &str| {
                harness.sent.get(instance).map_or(0, |commands| {
                    commands.iter().filter(|command| !command.resend && command.action == Action::Activate).count()
                })
            };
            let switched_back = |instance: &str| {
                harness.sent.get(instance).is_some_and(|commands| {
                    commands.iter().any(|command| command.action == Action::SwitchBack)
                })
            };
            let rolled_back = match &end.phase {
                Phase::Aborted { .. } => true,
                Phase::Failed { .. } => end.options.rollback_on_failure,
                _ => false,
            };
            for (name, target) in &end.targets {
                match &end.phase {
                    Phase::Succeeded => {
                        let ended = matches!(target.state, InstanceState::Settled { .. } | InstanceState::Failed { .. });
                        prop_assert!(ended, "{} ended {:?}", name, target.state);
                        if matches!(target.state, InstanceState::Settled { .. }) {
                            prop_assert_eq!(activations(name), 1, "{} activated once", name);
                        }
                        prop_assert!(!switched_back(name));
                    }
                    _ if rolled_back => {
                        let agent_switched_back = matches!(target.state, InstanceState::Failed { needs_switch_back: false, .. });
                        if activations(name) > 0 {
                            prop_assert!(switched_back(name) || agent_switched_back, "{} left on the release: {:?}", name, target.state);
                        }
                    }
                    _ => prop_assert!(!switched_back(name), "switch back without rollback"),
                }
            }
        }
    }
}
