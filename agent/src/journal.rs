//! The install journal: one small JSON file per bundle under
//! `state/journal/`, replaced atomically (temp, fsync, rename, dir fsync)
//! before every step is acted on, so that after a crash the agent knows
//! which install was running, where it stood, which releases on disk are
//! complete, and what the rollback target is. A journal that cannot be read
//! (truncated, garbage) is moved aside to `<bundle>.json.corrupt-<unix ms>`
//! and rebuilt from what the disk still shows, so one damaged file never
//! blocks the next deployment.

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
    /// A rollback (`rollwave-agent rollback`): recorded as such in the history once it succeeds.
    #[serde(default)]
    pub rollback: bool,
}

/// A release that became current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    pub version: String,
    pub sha256: String,
    pub at_unix_ms: i64,
    /// A rollback returned to it (rather than an install going forward), so that rolling back again steps
    /// further back (see [`rollwave_release::history`]).
    #[serde(default)]
    pub rollback: bool,
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
    #[error("journal {path} is unreadable ({source}); the installer moves it aside and rebuilds it")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A journal that could not be read, moved aside and replaced by a rebuilt one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub bundle: String,
    /// Where the damaged file is now.
    pub moved_to: PathBuf,
    /// Why it could not be read.
    pub reason: String,
    /// The release `current` points to, kept as the only known activation.
    pub current: Option<String>,
}

impl Quarantined {
    /// One line for the log and the coordinator's audit trail.
    pub fn describe(&self) -> String {
        format!(
            "journal of {} was unreadable ({}); moved aside to {} and rebuilt from the releases on disk \
             (current: {}); releases other than current are fetched and verified again when next asked for",
            self.bundle,
            self.reason,
            self.moved_to.display(),
            self.current.as_deref().unwrap_or("none"),
        )
    }
}

impl BundleJournal {
    pub fn path(layout: &Layout, bundle: &str) -> PathBuf {
        layout.journal_dir().join(format!("{bundle}.json"))
    }

    /// The journal of `bundle`; an unreadable one is moved aside and replaced by
    /// [`BundleJournal::rebuild`] (said in the second value).
    pub fn load_or_rebuild(layout: &Layout, bundle: &str) -> Result<(Self, Option<Quarantined>), JournalError> {
        let source = match Self::load(layout, bundle) {
            Ok(journal) => return Ok((journal, None)),
            Err(JournalError::Corrupt { source, .. }) => source,
            Err(error) => return Err(error),
        };
        let path = Self::path(layout, bundle);
        let moved_to = path.with_file_name(format!(
            "{bundle}.json.corrupt-{}",
            crate::unix_ms(std::time::SystemTime::now())
        ));
        let io_error = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        std::fs::rename(&path, &moved_to).map_err(io_error)?;
        let journal = Self::rebuild(layout, bundle);
        journal.save(layout, bundle)?;
        let quarantined = Quarantined {
            bundle: bundle.to_owned(),
            moved_to,
            reason: source.to_string(),
            current: journal.history.last().map(|activation| activation.version.clone()),
        };
        Ok((journal, Some(quarantined)))
    }

    /// What the disk still tells without a journal: the release `current` points
    /// to, recorded as the last activation with an unknown sha256 (empty). The
    /// sha256 of the other releases on disk is lost, so none counts as prepared:
    /// they are fetched and verified again when asked for, and retention removes
    /// them like any release no journal owns.
    pub fn rebuild(layout: &Layout, bundle: &str) -> Self {
        let mut journal = Self::default();
        if let Ok(Some(current)) = layout.current_version(bundle) {
            journal.record_activation(&current, "", crate::unix_ms(std::time::SystemTime::now()), false);
        }
        journal
    }

    /// Whether `version` is the current release of a rebuilt journal, whose
    /// sha256 was lost with the damaged file.
    pub fn current_is_unverified(&self, version: &str) -> bool {
        self.history
            .last()
            .is_some_and(|activation| activation.version == version && activation.sha256.is_empty())
            && !self.prepared.contains_key(version)
    }

    /// Takes `sha256` as the content of the current `version` of a rebuilt journal.
    pub fn adopt_current(&mut self, version: &str, sha256: &str) {
        self.prepared.insert(version.to_owned(), sha256.to_owned());
        if let Some(activation) = self.history.last_mut()
            && activation.version == version
        {
            activation.sha256 = sha256.to_owned();
        }
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

    pub fn record_activation(&mut self, version: &str, sha256: &str, at_unix_ms: i64, rollback: bool) {
        self.history.push(Activation {
            version: version.to_owned(),
            sha256: sha256.to_owned(),
            at_unix_ms,
            rollback,
        });
        if self.history.len() > HISTORY_LIMIT {
            let excess = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..excess);
        }
    }

    /// The release to go back to from `current`: stepping back through the history read as an undo stack (a
    /// second rollback goes further back, never forward again), the newest earlier release still prepared on
    /// disk; or `to`, when it became current before and is still on disk.
    pub fn rollback_target(&self, current: Option<&str>, to: Option<&str>) -> Option<&Activation> {
        use rollwave_release::history::{Step, rollback_stack, rollback_target};
        let on_disk = |version: &str| {
            self.history
                .iter()
                .rev()
                .find(|activation| activation.version == version)
                .filter(|activation| self.prepared.get(version) == Some(&activation.sha256))
        };
        let version = match to {
            Some(to) => Some(to).filter(|to| Some(*to) != current),
            None => {
                let steps = self.history.iter().map(|activation| {
                    if activation.rollback {
                        Step::RolledBackTo(activation.version.as_str())
                    } else {
                        // A coordinator's switch back or rollback looks like any activation here.
                        Step::Became(activation.version.as_str())
                    }
                });
                let mut stack = rollback_stack(steps);
                // `current` is what runs, whatever the journal saw last (an interrupted switch, say).
                if let Some(current) = current
                    && stack.last() != Some(&current)
                {
                    stack.push(current);
                }
                rollback_target(&stack, |version| on_disk(version).is_some())
            }
        }?;
        on_disk(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Field trial: `rollwave-agent rollback` run twice rolled forward again (2.0 → 4.0 → 2.0 → 4.0).
    #[test]
    fn rolling_back_twice_steps_back_twice() {
        let mut journal = BundleJournal::default();
        for (version, sha) in [("1.0", "a"), ("2.0", "b"), ("4.0", "c")] {
            journal.prepared.insert(version.into(), sha.into());
            journal.record_activation(version, sha, 0, false);
        }
        let target = |journal: &BundleJournal, current: &str, to: Option<&str>| {
            journal
                .rollback_target(Some(current), to)
                .map(|activation| activation.version.clone())
        };
        assert_eq!(target(&journal, "4.0", None).as_deref(), Some("2.0"));
        journal.record_activation("2.0", "b", 1, true);
        assert_eq!(target(&journal, "2.0", None).as_deref(), Some("1.0"), "not 4.0 again");
        assert_eq!(
            target(&journal, "2.0", Some("4.0")).as_deref(),
            Some("4.0"),
            "--to picks it"
        );
        assert_eq!(target(&journal, "2.0", Some("2.0")), None, "not the current one");
        assert_eq!(target(&journal, "2.0", Some("9.9")), None, "never current here");
        journal.record_activation("1.0", "a", 2, true);
        assert_eq!(target(&journal, "1.0", None), None, "nothing earlier");

        // The coordinator switched 4.0 back to 2.0 (a plain activation here): not 4.0 either.
        let mut journal = BundleJournal::default();
        for (version, sha) in [("1.0", "a"), ("2.0", "b"), ("4.0", "c"), ("2.0", "b")] {
            journal.prepared.insert(version.into(), sha.into());
            journal.record_activation(version, sha, 0, false);
        }
        assert_eq!(target(&journal, "2.0", None).as_deref(), Some("1.0"));
    }

    #[test]
    fn the_rollback_target_is_the_newest_other_release_still_on_disk() {
        let mut journal = BundleJournal::default();
        for (version, sha) in [("1", "a"), ("2", "b"), ("3", "c")] {
            journal.prepared.insert(version.into(), sha.into());
            journal.record_activation(version, sha, 0, false);
        }
        assert_eq!(
            journal.rollback_target(Some("3"), None).map(|a| a.version.as_str()),
            Some("2")
        );
        journal.prepared.remove("2");
        assert_eq!(
            journal.rollback_target(Some("3"), None).map(|a| a.version.as_str()),
            Some("1")
        );
        journal.prepared.insert("1".into(), "other".into());
        assert_eq!(
            journal.rollback_target(Some("3"), None),
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
        journal.record_activation("1.0", &"ab".repeat(32), 42, false);
        journal.save(&layout, "web").expect("save");
        assert_eq!(BundleJournal::load(&layout, "web").expect("load"), journal);
        assert_eq!(BundleJournal::bundles(&layout).expect("list"), ["web"]);
    }

    /// The field trial: a truncated journal made every later install of the bundle fail
    /// until someone moved the file aside by hand.
    #[test]
    fn a_truncated_journal_is_moved_aside_and_rebuilt_from_the_current_link() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(dir.path());
        let mut journal = BundleJournal::default();
        for version in ["1.0", "2.0"] {
            std::fs::create_dir_all(layout.release_dir("web", version)).expect("release dir");
            journal.prepared.insert(version.into(), "ab".repeat(32));
            journal.record_activation(version, &"ab".repeat(32), 42, false);
        }
        layout.switch_current("web", "2.0").expect("switch");
        journal.save(&layout, "web").expect("save");
        let path = BundleJournal::path(&layout, "web");
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");

        let (rebuilt, quarantined) = BundleJournal::load_or_rebuild(&layout, "web").expect("recovered");
        let quarantined = quarantined.expect("reported");
        assert_eq!(quarantined.current.as_deref(), Some("2.0"));
        assert_eq!(
            std::fs::read(&quarantined.moved_to).expect("damaged file kept"),
            bytes[..bytes.len() / 2]
        );
        assert!(
            quarantined.describe().contains("moved aside"),
            "{}",
            quarantined.describe()
        );
        assert!(
            rebuilt.prepared.is_empty(),
            "no sha256 survives, so nothing counts as verified"
        );
        assert!(rebuilt.current_is_unverified("2.0"));
        assert!(!rebuilt.current_is_unverified("1.0"));
        assert_eq!(rebuilt.rollback_target(Some("2.0"), None), None);
        assert_eq!(
            BundleJournal::bundles(&layout).expect("list"),
            ["web"],
            "the damaged copy is no bundle"
        );
        assert_eq!(
            BundleJournal::load_or_rebuild(&layout, "web").expect("load"),
            (rebuilt, None),
            "the rebuilt journal is on disk"
        );
    }

    #[test]
    fn a_corrupt_journal_is_reported_not_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.journal_dir()).expect("dir");
        std::fs::write(BundleJournal::path(&layout, "web"), b"{not json").expect("write");
        let error = BundleJournal::load(&layout, "web").expect_err("corrupt");
        assert!(error.to_string().contains("moves it aside"), "{error}");
    }
}
