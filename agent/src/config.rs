//! `agent.toml`: parsed once into [`AgentConfig`] and passed down; nothing
//! else in the agent reads configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollwave_artifacts::S3Settings;
use rollwave_trust::JoinToken;
use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/rollwave/agent.toml";
const DEFAULT_STATE_DIR: &str = "/var/lib/rollwave";
const DEFAULT_TLS_DIR: &str = "/etc/rollwave/tls";

/// A configuration the agent cannot run with; the agent exits 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Whether to ask the EC2 instance metadata service for the instance id and zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImdsMode {
    /// Ask when `instance_id` or `zone` is not configured; give up quickly off EC2.
    #[default]
    Auto,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReconnectFile {
    #[serde(default = "default_reconnect_initial", with = "humantime_serde_compat")]
    initial: Duration,
    #[serde(default = "default_reconnect_max", with = "humantime_serde_compat")]
    max: Duration,
}

fn default_reconnect_initial() -> Duration {
    Duration::from_millis(500)
}

fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

impl Default for ReconnectFile {
    fn default() -> Self {
        Self {
            initial: default_reconnect_initial(),
            max: default_reconnect_max(),
        }
    }
}

/// Durations in TOML as humantime strings ("500ms", "30s").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    coordinator: String,
    join_token: Option<String>,
    stack: Option<String>,
    #[serde(default)]
    layer: String,
    zone: Option<String>,
    instance_id: Option<String>,
    hostname: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    state_dir: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
    #[serde(default)]
    imds: ImdsMode,
    #[serde(default)]
    reconnect: ReconnectFile,
    /// Where release archives are read from (the agent's own AWS credentials).
    #[serde(default)]
    s3: S3Settings,
    #[serde(default)]
    install: InstallFile,
    /// How long systemd waits for READY=1 at most: the agent says ready then even when the
    /// coordinator is unreachable or the approved releases fail to install.
    #[serde(default = "default_ready_fallback", with = "humantime_serde_compat")]
    ready_fallback: Duration,
}

fn default_ready_fallback() -> Duration {
    crate::notify::READY_FALLBACK
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallFile {
    /// How long a newly activated release may take to pass its health checks.
    #[serde(default = "default_health_deadline", with = "humantime_serde_compat")]
    health_deadline: Duration,
    /// Releases kept on disk per bundle.
    #[serde(default = "default_retention")]
    retention: usize,
    /// Attempts of one download (with backoff) before the install counts as failed (it is retried).
    #[serde(default = "default_download_attempts")]
    download_attempts: u32,
}

fn default_download_attempts() -> u32 {
    rollwave_artifacts::DownloadOptions::default().attempts
}

fn default_health_deadline() -> Duration {
    Duration::from_secs(60)
}

fn default_retention() -> usize {
    crate::installer::DEFAULT_RETENTION
}

impl Default for InstallFile {
    fn default() -> Self {
        Self {
            health_deadline: default_health_deadline(),
            retention: default_retention(),
            download_attempts: default_download_attempts(),
        }
    }
}

/// The agent's whole configuration, validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `host:port` of the coordinator.
    pub coordinator: String,
    /// Needed only until the agent has joined.
    pub join_token: Option<JoinToken>,
    /// When set, the join token must be for this stack.
    pub stack: Option<String>,
    pub layer: String,
    pub zone: Option<String>,
    pub instance_id: Option<String>,
    pub hostname: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub state_dir: PathBuf,
    pub tls_dir: PathBuf,
    pub imds: ImdsMode,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    pub s3: S3Settings,
    /// How the agent installs releases (health deadline, retention).
    pub install: crate::installer::InstallSettings,
    /// READY=1 goes to systemd after this at the latest (see `notify`).
    pub ready_fallback: Duration,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let file: AgentFile = toml::from_str(text).map_err(|error| invalid(error.to_string()))?;
        if file.coordinator.trim().is_empty() || !file.coordinator.contains(':') {
            return Err(invalid(format!(
                "coordinator = {:?}: expected HOST:PORT of the Rollwave coordinator",
                file.coordinator
            )));
        }
        let join_token = file
            .join_token
            .filter(|token| !token.trim().is_empty())
            .map(|token| token.parse::<JoinToken>())
            .transpose()
            .map_err(|error| invalid(format!("join_token: {error}")))?;
        if file.reconnect.initial.is_zero() || file.reconnect.max < file.reconnect.initial {
            return Err(invalid("reconnect: need 0 < initial <= max".into()));
        }
        if file.install.download_attempts == 0 {
            return Err(invalid("install.download_attempts: need at least 1".into()));
        }
        Ok(Self {
            coordinator: file.coordinator.trim().to_owned(),
            join_token,
            stack: file.stack,
            layer: file.layer,
            zone: file.zone,
            instance_id: file.instance_id,
            hostname: file.hostname,
            tags: file.tags,
            state_dir: file.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            tls_dir: file.tls_dir.unwrap_or_else(|| DEFAULT_TLS_DIR.into()),
            imds: file.imds,
            reconnect_initial: file.reconnect.initial,
            reconnect_max: file.reconnect.max,
            s3: file.s3,
            install: crate::installer::InstallSettings {
                health_deadline: file.install.health_deadline,
                retention: file.install.retention.max(2),
                download: rollwave_artifacts::DownloadOptions {
                    attempts: file.install.download_attempts,
                    ..rollwave_artifacts::DownloadOptions::default()
                },
                ..crate::installer::InstallSettings::default()
            },
            ready_fallback: file.ready_fallback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(Path::new("agent.toml"), text)
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let config = parse("coordinator = \"10.0.0.5:7443\"\n").expect("valid");
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/rollwave"));
        assert_eq!(config.tls_dir, PathBuf::from("/etc/rollwave/tls"));
        assert_eq!(config.imds, ImdsMode::Auto);
        assert!(config.join_token.is_none());
    }

    #[test]
    fn full_config_parses() {
        let token = format!("rwt1.abc.def.{}", "0".repeat(64));
        let config = parse(&format!(
            "coordinator = \"c:1\"\njoin_token = \"{token}\"\nstack = \"web\"\nlayer = \"app\"\nzone = \"z1\"\nimds = \"off\"\n\
             [tags]\nrole = \"api\"\n[reconnect]\ninitial = \"100ms\"\nmax = \"2s\"\n"
        ))
        .expect("valid");
        assert_eq!(config.join_token.map(|token| token.id), Some("abc".into()));
        assert_eq!(config.tags.get("role").map(String::as_str), Some("api"));
        assert_eq!(config.reconnect_max, Duration::from_secs(2));
    }

    #[test]
    fn the_packaged_example_is_valid_and_says_the_defaults() {
        let config = parse(include_str!("../../packaging/agent.toml")).expect("packaging/agent.toml is valid");
        assert_eq!(config.install.health_deadline, Duration::from_secs(60));
        assert_eq!(config.install.retention, crate::installer::DEFAULT_RETENTION);
        assert_eq!(config.install.download.attempts, 8);
        assert_eq!(config.ready_fallback, Duration::from_secs(90));
        assert!(!config.s3.force_path_style);
        let custom = parse(
            "coordinator = \"c:1\"\nready_fallback = \"2s\"\n[s3]\nendpoint = \"http://127.0.0.1:9000\"\nforce_path_style = true\n\
             [install]\nhealth_deadline = \"5s\"\nretention = 1\ndownload_attempts = 2\n",
        )
        .expect("valid");
        assert_eq!(custom.s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(custom.install.health_deadline, Duration::from_secs(5));
        assert_eq!(custom.install.download.attempts, 2);
        assert_eq!(custom.ready_fallback, Duration::from_secs(2));
        assert_eq!(
            custom.install.retention, 2,
            "current and the rollback target always stay"
        );
    }

    #[test]
    fn mistakes_are_named() {
        for (text, needle) in [
            ("", "coordinator"),
            ("coordinator = \"nohostport\"", "HOST:PORT"),
            ("coordinator = \"c:1\"\nzonne = \"z\"", "zonne"),
            ("coordinator = \"c:1\"\njoin_token = \"garbage\"", "join_token"),
            ("coordinator = \"c:1\"\nimds = \"maybe\"", "imds"),
        ] {
            let error = parse(text).expect_err(text).to_string();
            assert!(error.contains(needle), "{text:?} -> {error}");
        }
    }
}
