//! What the CLI prints: stable JSON views for scripts (`--output json`) and
//! aligned tables for people. JSON field names are part of the interface.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rollwave_proto::v1 as pb;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

fn rfc3339(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return String::new();
    }
    let time = UNIX_EPOCH + Duration::from_millis(unix_ms.unsigned_abs());
    humantime::format_rfc3339_seconds(time).to_string()
}

/// "12s ago", for tables.
fn ago(unix_ms: i64) -> String {
    let then = UNIX_EPOCH + Duration::from_millis(unix_ms.max(0).unsigned_abs());
    match SystemTime::now().duration_since(then) {
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
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(items)?),
        OutputFormat::Table => print!("{}", table(items)),
    }
    Ok(())
}

/// Prints one item: JSON, or `key: value` lines.
pub fn print_item<T: Serialize>(format: OutputFormat, item: &T) -> anyhow::Result<()> {
    let value = serde_json::to_value(item)?;
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        OutputFormat::Table => {
            if let serde_json::Value::Object(fields) = value {
                let width = fields.keys().map(String::len).max().unwrap_or(0);
                for (key, field) in fields {
                    let text = match field {
                        serde_json::Value::String(text) => text,
                        serde_json::Value::Null => "-".to_owned(),
                        other => other.to_string(),
                    };
                    println!("{key:<width$}  {text}");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
