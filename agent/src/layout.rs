//! Where things live under the state dir, and the one operation that makes
//! a release live: swapping `current` by renaming a temporary symlink over it,
//! then fsyncing the directory, so `current` always names a complete release.
//!
//! ```text
//! <root>/state/             lock and journal
//! <root>/downloads/         <sha256>.partial while downloading, <sha256>.zip when verified
//! <root>/releases/<bundle>/<version>/   complete, verified releases
//! <root>/releases/<bundle>/current      -> <version> (relative symlink)
//! <root>/releases/<bundle>/.staging-*   extraction in progress (removed on failure or restart)
//! ```

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

const CURRENT: &str = "current";
const STAGING_PREFIX: &str = ".staging-";

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

    /// The version `current` points to, if any.
    pub fn current_version(&self, bundle: &str) -> io::Result<Option<String>> {
        match std::fs::read_link(self.current_link(bundle)) {
            Ok(target) => Ok(target.file_name().map(|name| name.to_string_lossy().into_owned())),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
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
        let temporary = bundle_dir.join(format!(".{CURRENT}-{}", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        std::os::unix::fs::symlink(version, &temporary)?;
        std::fs::rename(&temporary, self.current_link(bundle))?;
        File::open(&bundle_dir)?.sync_all()
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
