//! Where things live under the state dir, and the one operation that makes
//! a release live: swapping `current` by renaming a temporary symlink over it,
//! then fsyncing the directory, so `current` always names a complete release.
//! A damaged `current` (dangling, pointing outside the bundle, not a symlink)
//! reads as no release and is replaced by the next switch.
//!
//! ```text
//! <root>/state/             lock and journal
//! <root>/downloads/         <sha256>.partial while downloading, <sha256>.zip when verified
//! <root>/releases/<bundle>/<version>/   complete, verified releases
//! <root>/releases/<bundle>/current      -> <version> (relative symlink)
//! <root>/releases/<bundle>/.staging-*   extraction in progress (removed on failure or restart)
//! <root>/releases/<bundle>/.current.corrupt-<unix ms>   a `current` that was not a symlink, set aside
//! ```

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

const CURRENT: &str = "current";
const STAGING_PREFIX: &str = ".staging-";
/// Where a `current` that is not a symlink is moved (plus a timestamp), so a switch can replace it.
const DAMAGED_CURRENT_PREFIX: &str = ".current.corrupt-";

/// What `releases/<bundle>/current` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CurrentLink {
    /// No `current`: nothing was activated yet (or a first install was undone).
    Absent,
    /// A relative symlink to a release on disk.
    Release(String),
    /// Anything else, with what is wrong; it counts as no release, and the next
    /// switch replaces it.
    Damaged(String),
}

/// The paths of one state dir.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.root.join("state/journal")
    }

    pub fn hook_log_dir(&self) -> PathBuf {
        self.root.join("state/hooks")
    }

    pub fn downloads_dir(&self) -> PathBuf {
        self.root.join("downloads")
    }

    pub fn partial_download(&self, sha256: &str) -> PathBuf {
        self.downloads_dir().join(format!("{sha256}.partial"))
    }

    pub fn complete_download(&self, sha256: &str) -> PathBuf {
        self.downloads_dir().join(format!("{sha256}.zip"))
    }

    pub fn bundle_dir(&self, bundle: &str) -> PathBuf {
        self.root.join("releases").join(bundle)
    }

    pub fn release_dir(&self, bundle: &str, version: &str) -> PathBuf {
        self.bundle_dir(bundle).join(version)
    }

    pub fn current_link(&self, bundle: &str) -> PathBuf {
        self.bundle_dir(bundle).join(CURRENT)
    }

    /// A fresh staging path for extracting `version` (not created).
    pub fn staging_dir(&self, bundle: &str, version: &str) -> PathBuf {
        self.bundle_dir(bundle)
            .join(format!("{STAGING_PREFIX}{version}-{}", std::process::id()))
    }

    /// The version `current` points to, if it points to a release on disk.
    pub fn current_version(&self, bundle: &str) -> io::Result<Option<String>> {
        Ok(match self.inspect_current(bundle)? {
            CurrentLink::Release(version) => Some(version),
            CurrentLink::Absent | CurrentLink::Damaged(_) => None,
        })
    }

    /// What `current` of `bundle` is, damaged or not.
    pub fn inspect_current(&self, bundle: &str) -> io::Result<CurrentLink> {
        let link = self.current_link(bundle);
        let metadata = match std::fs::symlink_metadata(&link) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(CurrentLink::Absent),
            Err(error) => return Err(error),
        };
        if !metadata.file_type().is_symlink() {
            let kind = if metadata.is_dir() { "a directory" } else { "a file" };
            return Ok(CurrentLink::Damaged(format!(
                "{} is {kind}, not a symlink",
                link.display()
            )));
        }
        let target = std::fs::read_link(&link)?;
        let mut components = target.components();
        let version = match (components.next(), components.next()) {
            (Some(std::path::Component::Normal(name)), None) => name.to_string_lossy().into_owned(),
            _ => {
                return Ok(CurrentLink::Damaged(format!(
                    "{} points to {}, not to a release of the bundle",
                    link.display(),
                    target.display()
                )));
            }
        };
        if version.starts_with('.') || !self.release_dir(bundle, &version).is_dir() {
            return Ok(CurrentLink::Damaged(format!(
                "{} points to {version}, which is not a release on disk",
                link.display()
            )));
        }
        Ok(CurrentLink::Release(version))
    }

    /// Points `current` at `version` atomically and durably.
    pub fn switch_current(&self, bundle: &str, version: &str) -> io::Result<()> {
        let bundle_dir = self.bundle_dir(bundle);
        if !self.release_dir(bundle, version).is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("release {bundle}@{version} is not on disk"),
            ));
        }
        self.set_aside_current_if_not_a_link(bundle)?;
        let temporary = bundle_dir.join(format!(".{CURRENT}-{}", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        std::os::unix::fs::symlink(version, &temporary)?;
        std::fs::rename(&temporary, self.current_link(bundle))?;
        File::open(&bundle_dir)?.sync_all()
    }

    /// Moves a `current` that is not a symlink (a directory cannot be renamed over)
    /// aside to `.current.corrupt-<unix ms>`; returns where, if it did.
    pub fn set_aside_current_if_not_a_link(&self, bundle: &str) -> io::Result<Option<PathBuf>> {
        let link = self.current_link(bundle);
        match std::fs::symlink_metadata(&link) {
            Ok(metadata) if !metadata.file_type().is_symlink() => {
                let aside = self.bundle_dir(bundle).join(format!(
                    "{DAMAGED_CURRENT_PREFIX}{}",
                    crate::unix_ms(std::time::SystemTime::now())
                ));
                std::fs::rename(&link, &aside)?;
                sync_dir(&self.bundle_dir(bundle))?;
                Ok(Some(aside))
            }
            Ok(_) => Ok(None),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Removes `current` (the way back from a first install), durably.
    pub fn remove_current(&self, bundle: &str) -> io::Result<()> {
        match std::fs::remove_file(self.current_link(bundle)) {
            Ok(()) => sync_dir(&self.bundle_dir(bundle)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Removes staging dirs that no running step owns (after a crash).
    pub fn clean_staging(&self, bundle: &str) -> io::Result<()> {
        let dir = self.bundle_dir(bundle);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(STAGING_PREFIX) {
                std::fs::remove_dir_all(entry.path())?;
            } else if name.starts_with(&format!(".{CURRENT}-")) {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// Versions on disk for `bundle` (complete releases only).
    pub fn versions_on_disk(&self, bundle: &str) -> io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(self.bundle_dir(bundle)) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let mut versions = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != CURRENT && !name.starts_with('.') && entry.file_type()?.is_dir() {
                versions.push(name);
            }
        }
        versions.sort();
        Ok(versions)
    }
}

/// fsyncs a directory so a rename or creation inside it survives power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switching_replaces_the_link_atomically_and_relatively() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(dir.path());
        for version in ["1.0", "2.0"] {
            std::fs::create_dir_all(layout.release_dir("web", version)).expect("release dir");
        }
        assert_eq!(layout.current_version("web").expect("read"), None);
        layout.switch_current("web", "1.0").expect("switch");
        layout.switch_current("web", "2.0").expect("switch again");
        assert_eq!(layout.current_version("web").expect("read").as_deref(), Some("2.0"));
        let target = std::fs::read_link(layout.current_link("web")).expect("link");
        assert_eq!(target, PathBuf::from("2.0"), "relative target, so the tree can move");
        assert_eq!(layout.versions_on_disk("web").expect("list"), ["1.0", "2.0"]);
    }

    /// The field trial: a damaged `current` left the instance unable to install anything.
    #[test]
    fn a_damaged_current_reads_as_no_release_and_the_next_switch_replaces_it() {
        /// A name and what it does to `current`.
        type Damage = (&'static str, fn(&Path));
        let damage: [Damage; 6] = [
            ("dangling", |link| {
                std::os::unix::fs::symlink("9.9", link).expect("link")
            }),
            ("outside the bundle", |link| {
                std::os::unix::fs::symlink("../other/1.0", link).expect("link")
            }),
            ("absolute", |link| {
                std::os::unix::fs::symlink("/etc", link).expect("link")
            }),
            ("empty target", |link| {
                std::os::unix::fs::symlink(".", link).expect("link")
            }),
            ("a file", |link| std::fs::write(link, b"garbage").expect("file")),
            ("a directory", |link| std::fs::create_dir(link).expect("dir")),
        ];
        for (name, damage) in damage {
            let dir = tempfile::tempdir().expect("temp dir");
            let layout = Layout::new(dir.path());
            std::fs::create_dir_all(layout.release_dir("web", "1.0")).expect("release dir");
            std::fs::create_dir_all(layout.release_dir("other", "1.0")).expect("other bundle");
            damage(&layout.current_link("web"));
            let inspected = layout.inspect_current("web").expect("inspect");
            assert!(matches!(inspected, CurrentLink::Damaged(_)), "{name}: {inspected:?}");
            assert_eq!(layout.current_version("web").expect("read"), None, "{name}");
            layout
                .switch_current("web", "1.0")
                .unwrap_or_else(|error| panic!("{name}: {error}"));
            assert_eq!(
                layout.inspect_current("web").expect("inspect"),
                CurrentLink::Release("1.0".into()),
                "{name}"
            );
            assert_eq!(layout.versions_on_disk("web").expect("list"), ["1.0"], "{name}");
        }
    }

    #[test]
    fn switching_to_a_missing_release_changes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.release_dir("web", "1.0")).expect("release dir");
        layout.switch_current("web", "1.0").expect("switch");
        assert!(layout.switch_current("web", "9.9").is_err());
        assert_eq!(layout.current_version("web").expect("read").as_deref(), Some("1.0"));
    }
}
