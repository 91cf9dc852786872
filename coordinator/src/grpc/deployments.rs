//! The deployment half of the operator API: requests in, [`crate::deployer`]
//! and the store underneath, views out. Also pins (deliberate exceptions),
//! the stack status view (approved release, what runs, drift) and the audit
//! trail.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use rollwave_proto::v1 as pb;
use tonic::Status;

use super::{ServiceError, Shared};
use crate::deployer::{DeployError, DeploymentRequest};
use crate::health::HealthState;
use crate::model::{EventFilter, unix_ms};
use crate::planner::{Amount, Plan, RollingOptions, SkipReason, Strategy, WaveKind};
use crate::presence::Presence;
use crate::rollout::RolloutOptions;
use crate::store::Pin;
use crate::wishes;

impl From<DeployError> for Status {
    fn from(error: DeployError) -> Self {
        let message = error.to_string();
        match error {
            DeployError::Store(error) => ServiceError::from(error).into(),
            DeployError::Plan(_) | DeployError::AlreadyRunning { .. } | DeployError::NotRunning { .. } => {
                Status::failed_precondition(message)
            }
            DeployError::Rollout(_) | DeployError::Invalid(_) => Status::invalid_argument(message),
            DeployError::NoTrafficProvider { .. } => Status::failed_precondition(message),
            DeployError::NotFound(_) => Status::not_found(message),
        }
    }
}

fn amount(what: &str, text: &str, default: Amount) -> Result<Amount, Status> {
    if text.trim().is_empty() {
        return Ok(default);
    }
    text.trim()
        .parse()
        .map_err(|error| Status::invalid_argument(format!("{what}: {error}")))
}

fn millis(value: Option<u64>, default: i64) -> i64 {
    value.map_or(default, |value| i64::try_from(value).unwrap_or(i64::MAX))
}

/// The deployment the operator asked for, with the documented defaults filled in.
pub fn request_from_proto(request: pb::CreateDeploymentRequest) -> Result<DeploymentRequest, Status> {
    let options = request.options.unwrap_or_default();
    let defaults = RollingOptions::default();
    let strategy = match options.strategy.as_str() {
        "" | "rolling" => Strategy::Rolling(RollingOptions {
            canary: options.canary.unwrap_or(defaults.canary),
            batch: amount("batch", &options.batch, defaults.batch)?,
            min_healthy: amount("min healthy", &options.min_healthy, defaults.min_healthy)?,
        }),
        "all-at-once" => Strategy::AllAtOnce,
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown strategy {other:?}: rolling or all-at-once"
            )));
        }
    };
    let rollout_defaults = RolloutOptions::default();
    let rollout = RolloutOptions {
        failure_threshold: 0,
        min_healthy_time_ms: millis(options.min_healthy_time_ms, rollout_defaults.min_healthy_time_ms),
        healthy_deadline_ms: millis(options.healthy_deadline_ms, rollout_defaults.healthy_deadline_ms),
        progress_deadline_ms: millis(options.progress_deadline_ms, rollout_defaults.progress_deadline_ms),
        bake_ms: millis(options.bake_ms, rollout_defaults.bake_ms),
        rollback_on_failure: options.rollback_on_failure.unwrap_or(true),
        // Decided by the deployer from the stack's traffic settings and `drain` below.
        drain: false,
        // Decided by the deployer from the plan and the stack's approvals.
        switch_back_batch: 0,
        first_release: false,
    };
    Ok(DeploymentRequest {
        stack: request.stack,
        bundle: request.bundle,
        version: request.version,
        strategy,
        options: rollout,
        failure_threshold: amount("failure threshold", &options.failure_threshold, Amount::Count(0))?,
        plan_only: request.plan_only,
        drain: options.drain,
        rollback: false,
    })
}

pub fn plan_to_proto(plan: &Plan, drain: &[String]) -> pb::Plan {
    pb::Plan {
        drain: drain.to_vec(),
        waves: plan
            .waves
            .iter()
            .map(|wave| {
                let (kind, zone) = match &wave.kind {
                    WaveKind::Canary => ("canary", String::new()),
                    WaveKind::Zone(zone) => ("zone", zone.clone()),
                    WaveKind::All => ("all", String::new()),
                };
                pb::PlannedWave {
                    kind: kind.into(),
                    zone,
                    instances: wave.instances.clone(),
                }
            })
            .collect(),
        skipped: plan
            .skipped
            .iter()
            .map(|skipped| pb::SkippedInstance {
                instance_id: skipped.id.clone(),
                reason: match skipped.reason {
                    SkipReason::Pinned => "pinned".into(),
                    SkipReason::Lost => "lost".into(),
                },
            })
            .collect(),
        min_healthy: plan.min_healthy,
        healthy_total: plan.healthy_total,
    }
}

/// `rollwave rollback STACK BUNDLE`: an all-at-once deployment of the previous approved release.
pub async fn rollback_stack(
    shared: &Shared,
    actor: &str,
    request: pb::RollbackStackRequest,
) -> Result<pb::Deployment, Status> {
    let history = shared
        .store
        .approval_history(&request.stack, &request.bundle)
        .await
        .map_err(ServiceError::from)?;
    let previous = rollback_version(&history, &request.to_version)
        .map_err(|message| Status::failed_precondition(format!("{}/{}: {message}", request.stack, request.bundle)))?;
    let options = RolloutOptions {
        // The previous release is still on disk: a fast switch, gated on health all the same.
        min_healthy_time_ms: 1_000,
        ..RolloutOptions::default()
    };
    let created = shared
        .deployer
        .create(
            shared,
            actor,
            DeploymentRequest {
                stack: request.stack,
                bundle: request.bundle,
                version: previous,
                strategy: Strategy::AllAtOnce,
                options,
                failure_threshold: Amount::Count(0),
                plan_only: false,
                // Drains when the stack has a traffic provider, as any deployment.
                drain: None,
                rollback: true,
            },
        )
        .await?;
    created
        .deployment
        .ok_or_else(|| Status::internal("the rollback deployment was not created"))
}

/// The release `rollwave rollback` returns to, from the stack's approvals (oldest first, each with whether a
/// rollback approved it): `to` if given and approved before, else the one before the current release in the
/// history read as an undo stack (see [`rollwave_release::history`]).
fn rollback_version(history: &[(String, bool)], to: &str) -> Result<String, String> {
    use rollwave_release::history::{Step, rollback_stack, rollback_target};
    let steps = history.iter().map(|(version, rollback)| {
        if *rollback {
            Step::RolledBackTo(version)
        } else {
            Step::Forward(version)
        }
    });
    let stack = rollback_stack(steps);
    let current = stack.last().copied();
    if to.is_empty() {
        return rollback_target(&stack, |_| true)
            .map(str::to_owned)
            .ok_or_else(|| match current {
                Some(current) => format!(
                    "no earlier approved release to roll back to (the history ends at {current}); \
                     give --to VERSION to return to another release"
                ),
                None => "no release was ever approved, so there is nothing to roll back to".to_owned(),
            });
    }
    if current == Some(to) {
        return Err(format!("{to} is the approved release already"));
    }
    if !history.iter().any(|(version, _)| version == to) {
        let mut approved: Vec<&str> = history.iter().map(|(version, _)| version.as_str()).collect();
        approved.sort_unstable();
        approved.dedup();
        return Err(format!(
            "{to} was never approved here, so it is no rollback target; approved before: {}; \
             deploy it instead with `rollwave deploy`",
            approved.join(", ")
        ));
    }
    Ok(to.to_owned())
}

/// Marks instances as deliberately running `version` and sends them their new wish.
pub async fn pin(shared: &Shared, actor: &str, request: pb::PinRequest) -> Result<pb::PinResponse, Status> {
    let store = &shared.store;
    store
        .get_release(&request.bundle, &request.version)
        .await
        .map_err(ServiceError::from)?;
    let instances = store
        .list_instances(Some(&request.stack))
        .await
        .map_err(ServiceError::from)?;
    let known: BTreeSet<&str> = instances.iter().map(|instance| instance.id.as_str()).collect();
    let chosen: Vec<String> = if !request.instances.is_empty() {
        if let Some(unknown) = request.instances.iter().find(|id| !known.contains(id.as_str())) {
            return Err(Status::not_found(format!(
                "instance {unknown} is not in stack {}",
                request.stack
            )));
        }
        request.instances.clone()
    } else {
        let count = match (request.count, request.percent) {
            (Some(count), None) => count,
            (None, Some(percent)) if (1..=100).contains(&percent) => {
                u32::try_from((instances.len() * percent as usize).div_ceil(100)).unwrap_or(u32::MAX)
            }
            _ => {
                return Err(Status::invalid_argument(
                    "give --instances, or --count N, or --percent P (1-100)",
                ));
            }
        };
        let mut ids: Vec<String> = instances.iter().map(|instance| instance.id.clone()).collect();
        ids.sort();
        ids.into_iter().take(count as usize).collect()
    };
    let now = unix_ms(SystemTime::now());
    for instance in &chosen {
        store
            .set_pin(&Pin {
                instance_id: instance.clone(),
                bundle: request.bundle.clone(),
                version: request.version.clone(),
                pinned_by: actor.to_owned(),
                pinned_at_ms: now,
            })
            .await
            .map_err(ServiceError::from)?;
        let mut wish = wishes::wish_of(shared, instance, &request.stack)
            .await
            .map_err(ServiceError::from)?;
        wish.active.insert(request.bundle.clone(), request.version.clone());
        wishes::send(shared, instance, &wish)
            .await
            .map_err(ServiceError::from)?;
    }
    shared
        .audit(
            actor,
            "pin",
            &format!("{}/{}@{}", request.stack, request.bundle, request.version),
            "ok",
            chosen.join(","),
        )
        .await;
    Ok(pb::PinResponse { pinned: chosen })
}

/// Returns pinned instances to the approved release.
pub async fn unpin(shared: &Shared, actor: &str, request: pb::UnpinRequest) -> Result<pb::UnpinResponse, Status> {
    let store = &shared.store;
    let pins = store.pins(&request.stack).await.map_err(ServiceError::from)?;
    let approved = store
        .approved(&request.stack)
        .await
        .map_err(ServiceError::from)?
        .into_iter()
        .find(|approval| approval.bundle == request.bundle)
        .map(|approval| approval.version);
    let mut unpinned = Vec::new();
    for pin in pins.iter().filter(|pin| pin.bundle == request.bundle) {
        if !request.instances.is_empty() && !request.instances.contains(&pin.instance_id) {
            continue;
        }
        store
            .remove_pin(&pin.instance_id, &pin.bundle)
            .await
            .map_err(ServiceError::from)?;
        let mut wish = wishes::wish_of(shared, &pin.instance_id, &request.stack)
            .await
            .map_err(ServiceError::from)?;
        match &approved {
            Some(version) => wish.active.insert(request.bundle.clone(), version.clone()),
            None => wish.active.remove(&request.bundle),
        };
        wishes::send(shared, &pin.instance_id, &wish)
            .await
            .map_err(ServiceError::from)?;
        unpinned.push(pin.instance_id.clone());
    }
    shared
        .audit(
            actor,
            "unpin",
            &format!("{}/{}", request.stack, request.bundle),
            "ok",
            unpinned.join(","),
        )
        .await;
    Ok(pb::UnpinResponse { unpinned })
}

/// Per bundle: the approved release, what instances run, and every instance that differs.
pub async fn stack_status(shared: &Shared, stack: &str) -> Result<pb::StackStatus, Status> {
    let store = &shared.store;
    store.get_stack(stack).await.map_err(ServiceError::from)?;
    let now = unix_ms(SystemTime::now());
    let instances = store.list_instances(Some(stack)).await.map_err(ServiceError::from)?;
    let approved: BTreeMap<String, String> = store
        .approved(stack)
        .await
        .map_err(ServiceError::from)?
        .into_iter()
        .map(|approval| (approval.bundle, approval.version))
        .collect();
    let pins: BTreeMap<(String, String), String> = store
        .pins(stack)
        .await
        .map_err(ServiceError::from)?
        .into_iter()
        .map(|pin| ((pin.instance_id, pin.bundle), pin.version))
        .collect();
    let health: BTreeMap<(String, String), crate::store::HealthRow> = store
        .health(stack)
        .await
        .map_err(ServiceError::from)?
        .into_iter()
        .map(|row| ((row.instance_id.clone(), row.bundle.clone()), row))
        .collect();
    let install_failures: BTreeMap<(String, String), crate::store::InstallFailureRow> = store
        .install_failures(stack)
        .await
        .map_err(ServiceError::from)?
        .into_iter()
        .map(|row| ((row.instance_id.clone(), row.bundle.clone()), row))
        .collect();
    let mut bundles: BTreeSet<String> = approved.keys().cloned().collect();
    for instance in &instances {
        bundles.extend(instance.observed.iter().map(|release| release.bundle.clone()));
    }
    let mut statuses = Vec::new();
    for bundle in bundles {
        let deployment_id = shared.deployer.running_id(stack, &bundle).await.unwrap_or_default();
        let approved_version = approved.get(&bundle).cloned().unwrap_or_default();
        let mut running: BTreeMap<String, u32> = BTreeMap::new();
        let mut rows = Vec::new();
        for instance in &instances {
            let presence = shared.settings.presence.presence(
                shared.sessions.is_connected(&instance.id),
                instance.last_seen_ms,
                now,
            );
            let running_version = instance
                .observed
                .iter()
                .find(|release| release.bundle == bundle)
                .map(|release| release.version.clone())
                .unwrap_or_default();
            *running.entry(running_version.clone()).or_default() += 1;
            let pinned = pins.get(&(instance.id.clone(), bundle.clone()));
            let install_failure = install_failures.get(&(instance.id.clone(), bundle.clone()));
            let (state, reason) = if let Some(version) = pinned {
                let reason = if *version == running_version {
                    format!("pinned to {version}")
                } else {
                    format!("pinned to {version}, runs {}", display_version(&running_version))
                };
                ("pinned", reason)
            } else if running_version == approved_version {
                ("ok", String::new())
            } else if !deployment_id.is_empty() {
                ("deploying", format!("deployment {deployment_id} is running"))
            } else if let Some(failure) = install_failure {
                let state = if running_version.is_empty() { "missing" } else { "drift" };
                (state, failing_text(failure))
            } else if running_version.is_empty() {
                ("missing", format!("does not run {bundle} ({})", presence.as_str()))
            } else {
                (
                    "drift",
                    format!(
                        "runs {running_version}, approved is {}",
                        display_version(&approved_version)
                    ),
                )
            };
            // A verdict on another version than the one it runs (say, of a bundle it no longer runs) says nothing.
            let health_row = health
                .get(&(instance.id.clone(), bundle.clone()))
                .filter(|row| !running_version.is_empty() && row.version == running_version);
            let health_state = crate::health::health_state(health_row, presence == Presence::Online, now);
            rows.push(pb::InstanceStatus {
                instance_id: instance.id.clone(),
                hostname: instance.facts.hostname.clone(),
                zone: instance.facts.zone.clone(),
                presence: presence.as_str().to_owned(),
                running_version,
                state: state.to_owned(),
                reason,
                healthy: health_state == HealthState::Healthy,
                health_detail: health_row.map(|row| row.detail.clone()).unwrap_or_default(),
                healthy_since_unix_ms: health_row.map(|row| row.since_ms).unwrap_or_default(),
                health: health_state.as_str().to_owned(),
                app_restarts: health_row
                    .map(|row| u32::try_from(row.app_restarts).unwrap_or(u32::MAX))
                    .unwrap_or_default(),
                last_exit: health_row.map(|row| row.last_exit.clone()).unwrap_or_default(),
                last_exit_at_unix_ms: health_row.map(|row| row.last_exit_at_ms).unwrap_or_default(),
                install_failure: install_failure
                    .map(|failure| failure.reason.clone())
                    .unwrap_or_default(),
                install_failing_since_unix_ms: install_failure.map(|failure| failure.since_ms).unwrap_or_default(),
            });
        }
        statuses.push(pb::BundleStatus {
            bundle,
            approved_version,
            running: running.into_iter().collect(),
            instances: rows,
            deployment_id,
        });
    }
    let out_of_service = shared.deployer.out_of_service(shared, stack).await?;
    let duplicate_identity = instances
        .iter()
        .filter_map(|instance| {
            let seen = shared.sessions.duplicate(&instance.id, now)?;
            Some(format!(
                "{}: another live session holds this identity; {} from {} refused (last {}s ago): \
                 two hosts share it; give the other host its own identity (remove its tls_dir/identity.toml, join with a new token)",
                instance.id,
                if seen.refusals == 1 { "1 session".to_owned() } else { format!("{} sessions", seen.refusals) },
                seen.peer,
                now.saturating_sub(seen.last_refused_ms) / 1000,
            ))
        })
        .collect();
    Ok(pb::StackStatus {
        stack: stack.to_owned(),
        bundles: statuses,
        out_of_service,
        duplicate_identity,
    })
}

/// "install failing since 2026-12-06T03:00:00Z: <the agent's error>".
fn failing_text(failure: &crate::store::InstallFailureRow) -> String {
    let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(failure.since_ms).unwrap_or(0));
    format!(
        "install failing since {}: {}",
        humantime::format_rfc3339_seconds(since),
        failure.reason
    )
}

fn display_version(version: &str) -> &str {
    if version.is_empty() { "none" } else { version }
}

pub async fn list_events(shared: &Shared, request: pb::ListEventsRequest) -> Result<pb::ListEventsResponse, Status> {
    let non_empty = |text: String| (!text.is_empty()).then_some(text);
    let filter = EventFilter {
        limit: if request.limit == 0 {
            50
        } else {
            request.limit.min(10_000)
        },
        stack: non_empty(request.stack),
        instance: non_empty(request.instance),
        actor: non_empty(request.actor),
        since_ms: (request.since_unix_ms != 0).then_some(request.since_unix_ms),
    };
    let events = shared.store.list_events(&filter).await.map_err(ServiceError::from)?;
    Ok(pb::ListEventsResponse {
        events: events
            .into_iter()
            .map(|event| pb::AuditEvent {
                at_unix_ms: event.at_ms,
                actor: event.actor,
                action: event.action,
                target: event.target,
                outcome: event.outcome,
                detail: event.detail,
                stack: event.stack,
                instance: event.instance,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::rollback_version;

    fn history(entries: &[(&str, bool)]) -> Vec<(String, bool)> {
        entries
            .iter()
            .map(|(version, rollback)| ((*version).to_owned(), *rollback))
            .collect()
    }

    #[test]
    fn a_second_rollback_steps_further_back_and_to_picks_an_approved_release() {
        // Field trial: 2.0 → 4.0, rollback → 2.0, rollback → 4.0 again.
        let after_one = history(&[("1.0", false), ("2.0", false), ("4.0", false), ("2.0", true)]);
        assert_eq!(rollback_version(&after_one, ""), Ok("1.0".to_owned()));
        assert_eq!(rollback_version(&after_one, "4.0"), Ok("4.0".to_owned()));
        let refused = rollback_version(&after_one, "3.0").expect_err("never approved");
        assert!(refused.contains("approved before: 1.0, 2.0, 4.0"), "{refused}");
        let current = rollback_version(&after_one, "2.0").expect_err("current");
        assert!(current.contains("already"), "{current}");
        let at_bottom = history(&[("1.0", false), ("2.0", false), ("1.0", true)]);
        let nothing = rollback_version(&at_bottom, "").expect_err("nothing earlier");
        assert!(nothing.contains("--to VERSION"), "{nothing}");
        assert!(rollback_version(&[], "").is_err());
    }
}
