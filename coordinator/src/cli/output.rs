//! What the CLI prints: stable JSON views for scripts (`--output json`) and
//! aligned tables for people. JSON field names are part of the interface.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::console::{out, outln};
use rollwave_proto::v1 as pb;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// RFC 3339 to the second, "" for an unset time (0 or earlier).
fn rfc3339(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return String::new();
    }
    let time = UNIX_EPOCH + Duration::from_millis(unix_ms.unsigned_abs());
    humantime::format_rfc3339_seconds(time).to_string()
}

/// "12s ago", for tables.
fn ago(unix_ms: i64) -> String {
    ago_at(unix_ms, SystemTime::now())
}

/// "12s ago", as seen at `now`.
pub(crate) fn ago_at(unix_ms: i64, now: SystemTime) -> String {
    let then = UNIX_EPOCH + Duration::from_millis(unix_ms.max(0).unsigned_abs());
    match now.duration_since(then) {
        Ok(elapsed) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(elapsed.as_secs()))
        ),
        Err(_) => "just now".into(),
    }
}

#[derive(Debug, Serialize)]
pub struct StackView {
    pub name: String,
    pub stage: String,
    pub created_at: String,
    pub instance_count: u32,
}

impl From<pb::Stack> for StackView {
    fn from(stack: pb::Stack) -> Self {
        Self {
            name: stack.name,
            stage: stack.stage,
            created_at: rfc3339(stack.created_at_unix_ms),
            instance_count: stack.instance_count,
        }
    }
}

/// A release an instance reports having.
#[derive(Debug, Serialize)]
pub struct ObservedReleaseView {
    pub bundle: String,
    pub version: String,
    pub sha256: String,
    pub state: String,
}

#[derive(Debug, Serialize)]
pub struct InstanceView {
    pub id: String,
    pub stack: String,
    pub hostname: String,
    pub layer: String,
    pub zone: String,
    pub tags: BTreeMap<String, String>,
    pub agent_version: String,
    pub presence: String,
    pub last_seen: String,
    pub joined_at: String,
    pub certificate_expires: String,
    pub observed: Vec<ObservedReleaseView>,
    #[serde(skip)]
    last_seen_ms: i64,
}

impl From<pb::Instance> for InstanceView {
    fn from(instance: pb::Instance) -> Self {
        Self {
            id: instance.id,
            stack: instance.stack,
            hostname: instance.hostname,
            layer: instance.layer,
            zone: instance.zone,
            tags: instance.tags.into_iter().collect(),
            agent_version: instance.agent_version,
            presence: instance.presence,
            last_seen: rfc3339(instance.last_seen_unix_ms),
            joined_at: rfc3339(instance.joined_at_unix_ms),
            certificate_expires: rfc3339(instance.certificate_not_after_unix_ms),
            observed: instance
                .observed
                .into_iter()
                .map(|release| ObservedReleaseView {
                    bundle: release.bundle,
                    version: release.version,
                    sha256: release.sha256,
                    state: release.state,
                })
                .collect(),
            last_seen_ms: instance.last_seen_unix_ms,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TokenView {
    pub id: String,
    pub stack: String,
    pub status: String,
    pub uses_left: u32,
    pub uses_total: u32,
    pub created_at: String,
    pub expires_at: String,
}

impl From<pb::Token> for TokenView {
    fn from(token: pb::Token) -> Self {
        Self {
            id: token.id,
            stack: token.stack,
            status: token.status,
            uses_left: token.uses_left,
            uses_total: token.uses_total,
            created_at: rfc3339(token.created_at_unix_ms),
            expires_at: rfc3339(token.expires_at_unix_ms),
        }
    }
}

/// A registered release.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseView {
    pub bundle: String,
    pub version: String,
    pub kind: String,
    pub sha256: String,
    pub size: u64,
    pub bucket: String,
    pub key: String,
    /// `null` for a release pushed to an unversioned bucket.
    pub object_version: Option<String>,
    pub pushed_by: String,
    pub pushed_at: String,
}

impl From<pb::Release> for ReleaseView {
    fn from(release: pb::Release) -> Self {
        Self {
            bundle: release.bundle,
            version: release.version,
            kind: release.kind,
            sha256: release.sha256,
            size: release.size,
            bucket: release.bucket,
            key: release.key,
            object_version: release.object_version.filter(|version| !version.is_empty()),
            pushed_by: release.pushed_by,
            pushed_at: rfc3339(release.pushed_at_unix_ms),
        }
    }
}

/// Digits of a sha256 shown in tables; `release show` prints all of them.
const SHORT_SHA256_LEN: usize = 12;

impl Tabular for ReleaseView {
    const HEADERS: &'static [&'static str] = &[
        "BUNDLE",
        "VERSION",
        "KIND",
        "SIZE",
        "SHA256",
        "OBJECT VERSION",
        "PUSHED BY",
        "PUSHED AT",
    ];
    fn row(&self) -> Vec<String> {
        vec![
            self.bundle.clone(),
            self.version.clone(),
            self.kind.clone(),
            self.size.to_string(),
            self.sha256.chars().take(SHORT_SHA256_LEN).collect(),
            self.object_version.clone().unwrap_or_else(|| "-".into()),
            self.pushed_by.clone(),
            self.pushed_at.clone(),
        ]
    }
}

/// Something the CLI can show as a table.
pub trait Tabular {
    const HEADERS: &'static [&'static str];
    fn row(&self) -> Vec<String>;
}

impl Tabular for StackView {
    const HEADERS: &'static [&'static str] = &["NAME", "STAGE", "INSTANCES", "CREATED"];
    fn row(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.stage.clone(),
            self.instance_count.to_string(),
            self.created_at.clone(),
        ]
    }
}

impl Tabular for InstanceView {
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "STACK",
        "ZONE",
        "LAYER",
        "HOSTNAME",
        "PRESENCE",
        "LAST SEEN",
        "AGENT",
    ];
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.stack.clone(),
            self.zone.clone(),
            self.layer.clone(),
            self.hostname.clone(),
            self.presence.clone(),
            ago(self.last_seen_ms),
            self.agent_version.clone(),
        ]
    }
}

impl Tabular for TokenView {
    const HEADERS: &'static [&'static str] = &["ID", "STACK", "STATUS", "USES LEFT", "EXPIRES"];
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.stack.clone(),
            self.status.clone(),
            format!("{}/{}", self.uses_left, self.uses_total),
            self.expires_at.clone(),
        ]
    }
}

/// `None` for the empty string, which proto3 uses for "unset".
fn non_empty(text: String) -> Option<String> {
    if text.is_empty() { None } else { Some(text) }
}

/// How a wave is named in lines and tables: "canary", "zone us-east-1a", "all", "late".
fn wave_label(kind: &str, zone: Option<&str>) -> String {
    match zone {
        Some(zone) => format!("{kind} {zone}"),
        None => kind.to_owned(),
    }
}

/// A deployment: what it moves where, and where every target stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeploymentView {
    pub id: String,
    pub stack: String,
    pub bundle: String,
    pub version: String,
    /// The approved version when it started, which a rollback returns to; `null` for a bundle's first release.
    pub previous_version: Option<String>,
    /// "running", "succeeded", "failed" or "aborted".
    pub status: String,
    /// The phase in words: "preparing", "wave 2/4", "rolling back", ...
    pub phase: String,
    pub paused: bool,
    pub summary: String,
    /// Why it ended as it did; `null` when there is nothing to say.
    pub reason: Option<String>,
    pub waves: Vec<DeploymentWaveView>,
    /// Every instance failure, in the order they happened (counted against the failure threshold).
    pub failures: Vec<String>,
    pub created_by: String,
    pub created_at: String,
    pub updated_at: String,
}

/// One wave of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeploymentWaveView {
    /// "canary", "zone", "all" or "late" (instances that joined while it ran).
    pub kind: String,
    /// The zone of a "zone" wave; `null` for waves that are not one zone's.
    pub zone: Option<String>,
    pub instances: Vec<DeploymentInstanceView>,
}

/// One target of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeploymentInstanceView {
    pub instance_id: String,
    /// "pending", "preparing", "prepared", "activating", "activated", "healthy", "settled", "failed",
    /// "switching back", "switched back" or "switch back failed".
    pub state: String,
    /// More about the state, such as a failure's reason and hook output; `null` when there is none.
    pub detail: Option<String>,
    /// Where it stands with the load balancer when the deployment drains: `null` while it takes traffic as
    /// usual, else "draining", "drained", "being returned" or "left drained: <why>".
    pub traffic: Option<String>,
}

impl DeploymentView {
    /// "site@1.4.2".
    pub fn release(&self) -> String {
        format!("{}@{}", self.bundle, self.version)
    }

    /// Every instance the deployment targets, in wave order.
    pub fn instances(&self) -> impl Iterator<Item = &DeploymentInstanceView> {
        self.waves.iter().flat_map(|wave| wave.instances.iter())
    }

    pub fn is_running(&self) -> bool {
        self.status == "running"
    }
}

impl DeploymentWaveView {
    pub fn label(&self) -> String {
        wave_label(&self.kind, self.zone.as_deref())
    }
}

impl From<pb::Deployment> for DeploymentView {
    fn from(deployment: pb::Deployment) -> Self {
        Self {
            id: deployment.id,
            stack: deployment.stack,
            bundle: deployment.bundle,
            version: deployment.version,
            previous_version: non_empty(deployment.previous_version),
            status: deployment.status,
            phase: deployment.phase,
            paused: deployment.paused,
            summary: deployment.summary,
            reason: non_empty(deployment.reason),
            waves: deployment
                .waves
                .into_iter()
                .map(|wave| DeploymentWaveView {
                    kind: wave.kind,
                    zone: non_empty(wave.zone),
                    instances: wave
                        .instances
                        .into_iter()
                        .map(|instance| DeploymentInstanceView {
                            instance_id: instance.instance_id,
                            state: instance.state,
                            detail: non_empty(instance.detail),
                            traffic: non_empty(instance.traffic),
                        })
                        .collect(),
                })
                .collect(),
            failures: deployment.failures,
            created_by: deployment.created_by,
            created_at: rfc3339(deployment.created_at_unix_ms),
            updated_at: rfc3339(deployment.updated_at_unix_ms),
        }
    }
}

impl Tabular for DeploymentView {
    const HEADERS: &'static [&'static str] = &["ID", "STACK", "RELEASE", "STATUS", "PHASE", "CREATED"];
    fn row(&self) -> Vec<String> {
        let phase = if self.paused {
            format!("{} (paused)", self.phase)
        } else {
            self.phase.clone()
        };
        vec![
            self.id.clone(),
            self.stack.clone(),
            self.release(),
            self.status.clone(),
            phase,
            self.created_at.clone(),
        ]
    }
}

/// The waves a deployment would run, without starting it (`deploy --plan`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanView {
    /// In the order they would run; each target is in exactly one.
    pub waves: Vec<PlannedWaveView>,
    /// Instances left out, with why.
    pub skipped: Vec<SkippedInstanceView>,
    /// Healthy instances every wave leaves in service (0: no floor, as with all at once).
    pub min_healthy: u32,
    /// Healthy instances of the stack now, pinned ones included.
    pub healthy_total: u32,
    /// How instances are drained from the load balancer, per layer with a provider, or why they are not
    /// ("none: ...").
    pub drain: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedWaveView {
    /// "canary", "zone" or "all".
    pub kind: String,
    /// The zone of a "zone" wave; `null` otherwise.
    pub zone: Option<String>,
    pub instances: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedInstanceView {
    pub instance_id: String,
    /// Such as "pinned" or "lost".
    pub reason: String,
}

impl From<pb::Plan> for PlanView {
    fn from(plan: pb::Plan) -> Self {
        Self {
            waves: plan
                .waves
                .into_iter()
                .map(|wave| PlannedWaveView {
                    kind: wave.kind,
                    zone: non_empty(wave.zone),
                    instances: wave.instances,
                })
                .collect(),
            skipped: plan
                .skipped
                .into_iter()
                .map(|skipped| SkippedInstanceView {
                    instance_id: skipped.instance_id,
                    reason: skipped.reason,
                })
                .collect(),
            min_healthy: plan.min_healthy,
            healthy_total: plan.healthy_total,
            drain: plan.drain,
        }
    }
}

/// What a stack runs, bundle by bundle (`rollwave status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StackStatusView {
    pub stack: String,
    pub bundles: Vec<BundleStatusView>,
    /// Instances deployments took out of the load balancer and have not returned, as "instance: why".
    pub out_of_service: Vec<String>,
    /// Instances whose identity a second host tried to use while their session was alive, as "instance: what".
    pub duplicate_identity: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleStatusView {
    pub bundle: String,
    /// The version instances should run; `null` before a first deployment succeeded.
    pub approved_version: Option<String>,
    /// Instances per version they actually run; the key "" counts instances that run none.
    pub running: BTreeMap<String, u32>,
    /// The running deployment of this bundle, if any.
    pub deployment_id: Option<String>,
    /// Every instance of the stack, as it stands for this bundle.
    pub instances: Vec<InstanceStatusView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceStatusView {
    pub instance_id: String,
    pub hostname: String,
    pub zone: String,
    /// "online", "offline" or "lost".
    pub presence: String,
    /// `null` when it runs no version of the bundle.
    pub running_version: Option<String>,
    /// "ok", "drift", "pinned", "deploying" or "missing".
    pub state: String,
    /// Why the state is not "ok"; `null` when there is nothing to say.
    pub reason: Option<String>,
    /// True only when `health` is "healthy".
    pub healthy: bool,
    /// "healthy", "unhealthy", "unknown" (no verdict yet, or not online) or "stale" (the agent's
    /// last verdict is older than three of its check intervals).
    pub health: String,
    /// What the last health check said; `null` when it said nothing.
    pub health_detail: Option<String>,
    /// Since when the instance has been healthy (or, if it is not, unhealthy); `null` when unknown.
    pub health_since: Option<String>,
    #[serde(skip)]
    pub health_since_ms: i64,
    /// Restarts of the running release's app (by the agent or systemd).
    pub app_restarts: u32,
    /// Why the app last exited ("exited with code 1"); `null` if it never did.
    pub last_exit: Option<String>,
    /// When it last exited; `null` if it never did.
    pub last_exit_at: Option<String>,
    #[serde(skip)]
    pub last_exit_at_ms: i64,
    /// Why the agent keeps failing to install the approved release; `null` when it does not.
    pub install_failure: Option<String>,
    /// Since when it has been failing; `null` when it is not.
    pub install_failing_since: Option<String>,
}

impl InstanceStatusView {
    /// Whether the instance is not simply running the approved release and healthy.
    pub fn differs(&self) -> bool {
        self.state != "ok" || self.health != "healthy"
    }
}

impl From<pb::StackStatus> for StackStatusView {
    fn from(status: pb::StackStatus) -> Self {
        Self {
            stack: status.stack,
            bundles: status
                .bundles
                .into_iter()
                .map(|bundle| BundleStatusView {
                    bundle: bundle.bundle,
                    approved_version: non_empty(bundle.approved_version),
                    running: bundle.running.into_iter().collect(),
                    deployment_id: non_empty(bundle.deployment_id),
                    instances: bundle
                        .instances
                        .into_iter()
                        .map(|instance| InstanceStatusView {
                            instance_id: instance.instance_id,
                            hostname: instance.hostname,
                            zone: instance.zone,
                            presence: instance.presence,
                            running_version: non_empty(instance.running_version),
                            state: instance.state,
                            reason: non_empty(instance.reason),
                            healthy: instance.healthy,
                            health: instance.health,
                            health_detail: non_empty(instance.health_detail),
                            health_since: non_empty(rfc3339(instance.healthy_since_unix_ms)),
                            health_since_ms: instance.healthy_since_unix_ms,
                            app_restarts: instance.app_restarts,
                            last_exit: non_empty(instance.last_exit),
                            last_exit_at: non_empty(rfc3339(instance.last_exit_at_unix_ms)),
                            last_exit_at_ms: instance.last_exit_at_unix_ms,
                            install_failure: non_empty(instance.install_failure),
                            install_failing_since: non_empty(rfc3339(instance.install_failing_since_unix_ms)),
                        })
                        .collect(),
                })
                .collect(),
            out_of_service: status.out_of_service,
            duplicate_identity: status.duplicate_identity,
        }
    }
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventView {
    pub at: String,
    /// The operator, or "coordinator" for what it did on its own.
    pub actor: String,
    /// Such as "deployment.create" or "stack.pin".
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
    /// The stack the event concerns; `null` for none.
    pub stack: Option<String>,
    /// The instance the event concerns; `null` for none.
    pub instance: Option<String>,
}

impl From<pb::AuditEvent> for EventView {
    fn from(event: pb::AuditEvent) -> Self {
        Self {
            at: rfc3339(event.at_unix_ms),
            actor: event.actor,
            action: event.action,
            target: event.target,
            outcome: event.outcome,
            detail: event.detail,
            stack: non_empty(event.stack),
            instance: non_empty(event.instance),
        }
    }
}

impl Tabular for EventView {
    const HEADERS: &'static [&'static str] = &["AT", "ACTOR", "ACTION", "TARGET", "OUTCOME", "DETAIL"];
    fn row(&self) -> Vec<String> {
        vec![
            self.at.clone(),
            self.actor.clone(),
            self.action.clone(),
            self.target.clone(),
            self.outcome.clone(),
            self.detail.replace('\n', " "),
        ]
    }
}

/// Left-aligned columns, two spaces apart.
pub fn table<T: Tabular>(items: &[T]) -> String {
    let rows: Vec<Vec<String>> = items.iter().map(Tabular::row).collect();
    let mut widths: Vec<usize> = T::HEADERS.iter().map(|header| header.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let render = |cells: Vec<String>| {
        let line: Vec<String> = cells
            .into_iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        line.join("  ").trim_end().to_owned()
    };
    let mut out = render(T::HEADERS.iter().map(|header| (*header).to_owned()).collect());
    out.push('\n');
    for row in rows {
        out.push_str(&render(row));
        out.push('\n');
    }
    out
}

/// Prints a list in the chosen format.
pub fn print_list<T: Tabular + Serialize>(format: OutputFormat, items: &[T]) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(items)?)?,
        OutputFormat::Table => out!("{}", table(items))?,
    }
    Ok(())
}

/// Prints one item: JSON, or `key: value` lines.
pub fn print_item<T: Serialize>(format: OutputFormat, item: &T) -> anyhow::Result<()> {
    let value = serde_json::to_value(item)?;
    match format {
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&value)?)?,
        OutputFormat::Table => out!("{}", item_lines(&value))?,
    }
    Ok(())
}

/// `key  value` lines of an item for people: nested lists and maps are spelled out (a list of
/// records one record per line, `key=value` pairs), never printed as raw JSON.
fn item_lines(value: &serde_json::Value) -> String {
    use serde_json::Value;
    /// A scalar as text; "-" for null.
    fn scalar(value: &Value) -> String {
        match value {
            Value::String(text) => text.clone(),
            Value::Null => "-".to_owned(),
            other => other.to_string(),
        }
    }
    /// `key=value key=value` for a map, comma-separated items for a list of scalars.
    fn inline(value: &Value) -> String {
        match value {
            Value::Object(fields) => fields
                .iter()
                .map(|(key, field)| format!("{key}={}", inline(field)))
                .collect::<Vec<_>>()
                .join(" "),
            Value::Array(items) => items.iter().map(inline).collect::<Vec<_>>().join(", "),
            other => scalar(other),
        }
    }
    let Value::Object(fields) = value else {
        return format!("{}\n", inline(value));
    };
    let width = fields.keys().map(String::len).max().unwrap_or(0);
    let mut text = String::new();
    for (key, field) in fields {
        let lines: Vec<String> = match field {
            Value::Array(items) if items.iter().any(|item| item.is_object() || item.is_array()) => {
                items.iter().map(inline).collect()
            }
            other => vec![inline(other)],
        };
        // An empty text, list or map shows as "-", as null does.
        let mut lines = lines.into_iter().filter(|line| !line.is_empty());
        let first = lines.next().unwrap_or_else(|| "-".to_owned());
        text.push_str(&format!("{key:<width$}  {first}\n"));
        for line in lines {
            text.push_str(&format!("{:<width$}  {line}\n", ""));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_show_spells_out_tags_and_releases_instead_of_raw_json() {
        let instance = InstanceView::from(pb::Instance {
            id: "i-1".into(),
            stack: "web".into(),
            zone: "z1".into(),
            tags: [
                ("role".to_owned(), "api".to_owned()),
                ("team".to_owned(), "core".to_owned()),
            ]
            .into_iter()
            .collect(),
            observed: vec![
                pb::InstanceRelease {
                    bundle: "app".into(),
                    version: "1.0".into(),
                    sha256: "9f2c".into(),
                    state: "current".into(),
                },
                pb::InstanceRelease {
                    bundle: "app".into(),
                    version: "2.0".into(),
                    sha256: "41aa".into(),
                    state: "prepared".into(),
                },
            ],
            ..Default::default()
        });
        let text = item_lines(&serde_json::to_value(&instance).expect("JSON"));
        assert!(!text.contains(['{', '[', '"']), "raw JSON in table output:\n{text}");
        expect_test::expect![[r#"
            agent_version        -
            certificate_expires  -
            hostname             -
            id                   i-1
            joined_at            -
            last_seen            -
            layer                -
            observed             bundle=app sha256=9f2c state=current version=1.0
                                 bundle=app sha256=41aa state=prepared version=2.0
            presence             -
            stack                web
            tags                 role=api team=core
            zone                 z1
        "#]]
        .assert_eq(&text);
    }

    #[test]
    fn tables_align_columns() {
        let stacks = vec![
            StackView {
                name: "web".into(),
                stage: "production".into(),
                created_at: "2026-01-01T00:00:00Z".into(),
                instance_count: 12,
            },
            StackView {
                name: "batch-workers".into(),
                stage: "dev".into(),
                created_at: "2026-01-02T00:00:00Z".into(),
                instance_count: 3,
            },
        ];
        expect_test::expect![[r#"
            NAME           STAGE       INSTANCES  CREATED
            web            production  12         2026-01-01T00:00:00Z
            batch-workers  dev         3          2026-01-02T00:00:00Z
        "#]]
        .assert_eq(&table(&stacks));
    }
}
