//! The coordinator's domain types, free of protobuf and SQL: what a stack,
//! an instance, a join token and a release are, and the rules for their names.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rollwave_release::{NameError, Sha256};
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch: the one time format in the store and on the wire.
pub fn unix_ms(time: std::time::SystemTime) -> i64 {
    match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Longest stack, layer, zone or instance name we accept.
const MAX_NAME_LEN: usize = 64;

/// Why a name or enumerated value supplied by a user was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error(
        "invalid {what} {value:?}: use 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
    )]
    Name { what: &'static str, value: String },
    #[error("invalid stage {0:?}: expected dev, staging or production")]
    Stage(String),
    #[error("invalid bundle kind {0:?}: expected app or cookbook")]
    BundleKind(String),
    #[error(transparent)]
    ReleaseName(#[from] NameError),
    #[error("invalid sha256 {0:?}: expected 64 lowercase hex digits")]
    Sha256(String),
    #[error(
        "invalid token ttl {}: a join token lives from {} to {} (such as 10m or 24h)",
        humantime::format_duration(*.0),
        humantime::format_duration(MIN_TOKEN_TTL),
        humantime::format_duration(MAX_TOKEN_TTL)
    )]
    TokenTtl(Duration),
    #[error("invalid token uses {0}: a join token admits 1 to {MAX_TOKEN_USES} instances")]
    TokenUses(u32),
    #[error("invalid {what} {value:?}: {rule}")]
    Location {
        what: &'static str,
        value: String,
        rule: &'static str,
    },
}

/// Longest join token lifetime: a token is a bootstrap credential, not an account.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Shortest join token lifetime; shorter would be expired before anyone could use it.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(1);
/// A token's lifetime when the request names none.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Most instances one token may join.
pub const MAX_TOKEN_USES: u32 = 100_000;

/// A join token's lifetime and uses, as asked; `None` takes the default (1 hour, 1 use).
///
/// A lifetime below [`MIN_TOKEN_TTL`] or 0 uses is refused, never rounded up: `--uses 0` or
/// `--ttl 0s` is a mistake, and a token other than the one asked for would hide it.
pub fn token_terms(ttl: Option<Duration>, uses: Option<u32>) -> Result<(Duration, u32), InvalidInput> {
    let ttl = ttl.unwrap_or(DEFAULT_TOKEN_TTL);
    if !(MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&ttl) {
        return Err(InvalidInput::TokenTtl(ttl));
    }
    let uses = uses.unwrap_or(1);
    if !(1..=MAX_TOKEN_USES).contains(&uses) {
        return Err(InvalidInput::TokenUses(uses));
    }
    Ok((ttl, uses))
}

/// Checks a stack, layer, zone or instance name.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), InvalidInput> {
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if first_ok && rest_ok && value.len() <= MAX_NAME_LEN {
        Ok(())
    } else {
        Err(InvalidInput::Name {
            what,
            value: value.to_owned(),
        })
    }
}

/// Where a stack sits on the way to production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Dev,
    Staging,
    Production,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Dev => "dev",
            Stage::Staging => "staging",
            Stage::Production => "production",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = InvalidInput;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "dev" => Ok(Stage::Dev),
            "staging" => Ok(Stage::Staging),
            "production" => Ok(Stage::Production),
            other => Err(InvalidInput::Stage(other.to_owned())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    pub name: String,
    pub stage: Stage,
    pub created_at_ms: i64,
    pub instance_count: u32,
}

/// What an agent says about its instance. Descriptive only: identity comes
/// from the client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFacts {
    pub hostname: String,
    pub layer: String,
    pub zone: String,
    pub tags: BTreeMap<String, String>,
    pub agent_version: String,
}

/// A release an agent reports having on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedRelease {
    pub bundle: String,
    pub version: String,
    pub sha256: String,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub stack: String,
    pub facts: InstanceFacts,
    pub joined_at_ms: i64,
    pub last_seen_ms: i64,
    pub observed: Vec<ObservedRelease>,
    pub certificate_not_after_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    pub id: String,
    pub stack: String,
    pub secret_sha256: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub uses_total: u32,
    pub uses_left: u32,
    pub revoked: bool,
}

/// Whether a join token can still be used, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    Active,
    Expired,
    Used,
    Revoked,
}

impl TokenStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::Expired => "expired",
            TokenStatus::Used => "used",
            TokenStatus::Revoked => "revoked",
        }
    }
}

impl JoinTokenRecord {
    /// Revocation wins over use, use over expiry: the most deliberate reason first.
    pub fn status(&self, now_ms: i64) -> TokenStatus {
        if self.revoked {
            TokenStatus::Revoked
        } else if self.uses_left == 0 {
            TokenStatus::Used
        } else if now_ms >= self.expires_at_ms {
            TokenStatus::Expired
        } else {
            TokenStatus::Active
        }
    }
}

/// What a bundle carries; fixed by the bundle's first release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    /// The application itself.
    App,
    /// Configuration-management code (Chef cookbooks and the like).
    Cookbook,
}

impl BundleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BundleKind::App => "app",
            BundleKind::Cookbook => "cookbook",
        }
    }
}

impl fmt::Display for BundleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BundleKind {
    type Err = InvalidInput;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "app" => Ok(BundleKind::App),
            "cookbook" => Ok(BundleKind::Cookbook),
            other => Err(InvalidInput::BundleKind(other.to_owned())),
        }
    }
}

/// Longest S3 object key (S3's own limit, in bytes).
const MAX_OBJECT_KEY_LEN: usize = 1024;

/// Longest bucket name: 63 for new AWS buckets, 255 for legacy ones and some S3-compatible stores.
const MAX_BUCKET_NAME_LEN: usize = 255;

/// A registered release: exactly which bytes (sha256, size) and where they
/// live (bucket, key and, in a versioned bucket, the object version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub bundle: String,
    pub kind: BundleKind,
    pub version: String,
    pub bucket: String,
    pub key: String,
    /// `None` only for releases pushed to an unversioned bucket.
    pub object_version: Option<String>,
    pub sha256: Sha256,
    pub size: u64,
    pub pushed_by: String,
    pub pushed_at_ms: i64,
}

impl Release {
    /// `bundle@version`, the way people name a release.
    pub fn name(&self) -> String {
        format!("{}@{}", self.bundle, self.version)
    }

    /// `s3://bucket/key`, with the object version when there is one.
    pub fn location(&self) -> String {
        match &self.object_version {
            Some(version) => format!("s3://{}/{} (object version {version})", self.bucket, self.key),
            None => format!("s3://{}/{} (unversioned)", self.bucket, self.key),
        }
    }

    /// Checks what a client supplied: bundle name, version and location (the digest is typed already).
    pub fn validate(&self) -> Result<(), InvalidInput> {
        rollwave_release::validate_bundle_name(&self.bundle)?;
        rollwave_release::validate_version(&self.version)?;
        if self.bucket.is_empty() || self.bucket.len() > MAX_BUCKET_NAME_LEN || self.bucket.contains(['/', ' ']) {
            return Err(InvalidInput::Location {
                what: "bucket",
                value: self.bucket.clone(),
                rule: "give the S3 bucket name, without s3:// or slashes",
            });
        }
        if self.key.is_empty() || self.key.len() > MAX_OBJECT_KEY_LEN {
            return Err(InvalidInput::Location {
                what: "object key",
                value: self.key.clone(),
                rule: "give a key of 1 to 1024 bytes",
            });
        }
        if self.object_version.as_deref() == Some("") {
            return Err(InvalidInput::Location {
                what: "object version",
                value: String::new(),
                rule: "leave it unset for an unversioned bucket",
            });
        }
        Ok(())
    }
}

/// Parses a digest given by a user or a client.
pub fn parse_sha256(text: &str) -> Result<Sha256, InvalidInput> {
    text.parse().map_err(|_| InvalidInput::Sha256(text.to_owned()))
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
    /// The stack the event concerns, "" for none; derived from the target when recorded.
    pub stack: String,
    /// The instance the event concerns, "" for none; derived from the target when recorded.
    pub instance: String,
}

/// Which audit events to list: each set field must match; the newest `limit` of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub stack: Option<String>,
    pub instance: Option<String>,
    /// The actor: an operator's name, "coordinator", "agent" or "instance:ID".
    pub actor: Option<String>,
    /// Only events at or after this time.
    pub since_ms: Option<i64>,
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_token_uses_and_a_zero_ttl_are_refused_not_rounded_up() {
        let refused =
            |ttl: Option<Duration>, uses: Option<u32>| token_terms(ttl, uses).expect_err("refused").to_string();
        assert_eq!(
            refused(None, Some(0)),
            "invalid token uses 0: a join token admits 1 to 100000 instances"
        );
        assert_eq!(
            refused(Some(Duration::ZERO), None),
            "invalid token ttl 0s: a join token lives from 1s to 30days (such as 10m or 24h)"
        );
        assert!(refused(Some(Duration::from_millis(500)), None).contains("500ms"));
        assert!(refused(Some(MAX_TOKEN_TTL + Duration::from_secs(1)), None).contains("30days 1s"));
        assert!(refused(None, Some(MAX_TOKEN_USES + 1)).contains("100001"));
        assert_eq!(token_terms(None, None).expect("defaults"), (DEFAULT_TOKEN_TTL, 1));
        assert_eq!(
            token_terms(Some(MIN_TOKEN_TTL), Some(MAX_TOKEN_USES)).expect("bounds"),
            (MIN_TOKEN_TTL, MAX_TOKEN_USES)
        );
    }

    #[test]
    fn names_follow_the_documented_rule() {
        for good in ["web", "web-1", "eu.west_1a", "A", &"x".repeat(64)] {
            assert_eq!(validate_name("stack", good), Ok(()), "{good}");
        }
        for bad in ["", "-web", ".hidden", "a/b", "a b", "ünï", &"x".repeat(65)] {
            assert!(validate_name("stack", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn token_status_names_the_most_deliberate_reason() {
        let token = JoinTokenRecord {
            id: "t".into(),
            stack: "web".into(),
            secret_sha256: String::new(),
            created_at_ms: 0,
            expires_at_ms: 100,
            uses_total: 1,
            uses_left: 1,
            revoked: false,
        };
        assert_eq!(token.status(99), TokenStatus::Active);
        assert_eq!(token.status(100), TokenStatus::Expired);
        let used = JoinTokenRecord {
            uses_left: 0,
            ..token.clone()
        };
        assert_eq!(used.status(200), TokenStatus::Used);
        let revoked = JoinTokenRecord { revoked: true, ..used };
        assert_eq!(revoked.status(0), TokenStatus::Revoked);
    }
}
