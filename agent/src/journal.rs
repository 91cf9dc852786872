//! The install journal: one small JSON file per bundle under
//! `state/journal/`, replaced atomically (temp, fsync, rename, dir fsync)
//! before every step is acted on, so that after a crash the agent knows
//! which install was running, where it stood, which releases on disk are
//! complete, and what the rollback target is.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use rollwave_artifacts::PinnedObject;
use serde::{Deserialize, Serialize};

use crate::install::{Job, JobState};
use crate::layout::Layout;

/// Activations kept in a bundle's history (the rollback target is the newest one
/// before `current` that is still on disk).
const HISTORY_LIMIT: usize = 32;

/// Where the bytes of a release come from; journaled so a resumed install
/// fetches from the same place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// A local archive (`rollwave-agent install --archive`).
    Local { path: PathBuf },
    /// An object in S3, pinned by version id and sha256.
    S3 {
        bucket: String,
        key: String,
        version_id: Option<String>,
        size: u64,
    },
    /// The release is already on disk; nothing to fetch (rollback).
    OnDisk,
}

impl Source {
    /// The pinned object for an S3 source and the expected sha256.
    pub fn pinned(&self, sha256: &str) -> Option<PinnedObject> {
        match self {
            Source::S3 {
                bucket,
                key,
                version_id,
                size,
            } => Some(PinnedObject {
                bucket: bucket.clone(),
                key: key.clone(),
                version_id: version_id.clone(),
                sha256: sha256.to_owned(),
                size: *size,
            }),
            _ => None,
        }
    }
}

/// The install in progress (or the last one, once it has ended).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveInstall {
    pub job: Job,
    pub state: JobState,
    pub source: Source,
    /// The deployment that asked for it, for hooks and reports.
    pub deployment_id: Option<String>,
    /// Process group of the hook running at the moment, so a restarted agent
    /// can kill what a killed agent left behind.
    #[serde(default)]
    pub hook_group: Option<i32>,
}

/// A release that became current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    pub version: String,
    pub sha256: String,
    pub at_unix_ms: i64,
}

/// Everything the agent remembers about one bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleJournal {
    /// The last install: `Running` if the agent stopped in the middle of it.
    pub install: Option<ActiveInstall>,
    /// Releases on disk whose prepare phase completed: version → sha256.
    pub prepared: BTreeMap<String, String>,
    /// Releases that became current, oldest first.
    pub history: Vec<Activation>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal {path} is unreadable ({source}); move it aside to start over for this bundle")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl BundleJournal {
    pub fn path(layout: &Layout, bundle: &str) -> PathBuf {
        layout.journal_dir().join(format!("{bundle}.json"))
    }

    /// The journal of `bundle`, empty if it has none yet.
    pub fn load(layout: &Layout, bundle: &str) -> Result<Self, JournalError> {
        let path = Self::path(layout, bundle);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| JournalError::Corrupt { path, source }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(JournalError::Io { path, source }),
        }
    }

    /// Replaces the journal on disk, durably.
    pub fn save(&self, layout: &Layout, bundle: &str) -> Result<(), JournalError> {
        let path = Self::path(layout, bundle);
        let io_error = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(layout.journal_dir()).map_err(io_error)?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|error| io_error(io::Error::other(error)))?;
        rollwave_trust::files::write_private(&path, &bytes).map_err(io_error)
    }

    /// Bundles that have a journal.
    pub fn bundles(layout: &Layout) -> Result<Vec<String>, JournalError> {
        let dir = layout.journal_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(JournalError::Io { path: dir, source }),
        };
        let mut bundles = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(bundle) = name.strip_suffix(".json")
                && !bundle.starts_with('.')
            {
                bundles.push(bundle.to_owned());
            }
        }
        bundles.sort();
        Ok(bundles)
    }

    pub fn record_activation(&mut self, version: &str, sha256: &str, at_unix_ms: i64) {
        self.history.push(Activation {
            version: version.to_owned(),
            sha256: sha256.to_owned(),
            at_unix_ms,
        });
        if self.history.len() > HISTORY_LIMIT {
            let excess = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..excess);
        }
    }

    /// The release to go back to from `current`: the newest earlier activation
    /// of a different version that is still prepared on disk.
    pub fn rollback_target(&self, current: Option<&str>) -> Option<&Activation> {
        self.history
            .iter()
            .rev()
            .filter(|activation| Some(activation.version.as_str()) != current)
            .find(|activation| self.prepared.get(&activation.version) == Some(&activation.sha256))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rollback_target_is_the_newest_other_release_still_on_disk() {
        let mut journal = BundleJournal::default();
        for (version, sha) in [("1", "a"), ("2", "b"), ("3", "c")] {
            journal.prepared.insert(version.into(), sha.into());
            journal.record_activation(version, sha, 0);
        }
        assert_eq!(
            journal.rollback_target(Some("3")).map(|a| a.version.as_str()),
            Some("2")
        );
        journal.prepared.remove("2");
        assert_eq!(
            journal.rollback_target(Some("3")).map(|a| a.version.as_str()),
            Some("1")
        );
        journal.prepared.insert("1".into(), "other".into());
        assert_eq!(
            journal.rollback_target(Some("3")),
            None,
            "a different sha is not the same release"
        );
    }

    #[test]
    fn journals_survive_a_round_trip_and_list_their_bundles() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(dir.path());
        assert_eq!(
            BundleJournal::load(&layout, "web").expect("load"),
            BundleJournal::default()
        );
        let mut journal = BundleJournal::default();
        journal.prepared.insert("1.0".into(), "ab".repeat(32));
        journal.record_activation("1.0", &"ab".repeat(32), 42);
        journal.save(&layout, "web").expect("save");
        assert_eq!(BundleJournal::load(&layout, "web").expect("load"), journal);
        assert_eq!(BundleJournal::bundles(&layout).expect("list"), ["web"]);
    }

    #[test]
    fn a_corrupt_journal_is_reported_not_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.journal_dir()).expect("dir");
        std::fs::write(BundleJournal::path(&layout, "web"), b"{not json").expect("write");
        let error = BundleJournal::load(&layout, "web").expect_err("corrupt");
        assert!(error.to_string().contains("move it aside"), "{error}");
    }
}
