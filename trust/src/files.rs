//! Writing key, certificate and token files so they survive a crash whole:
//! temp file, fsync, rename, directory fsync; secrets with mode 0600 from
//! the first byte. Also the lock file that keeps a second process (agent or
//! coordinator) off a directory one is using.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Who holds a directory lock, for the message a refused process prints.
#[derive(Debug, Clone, Copy)]
pub struct LockOwner {
    /// The program, as in "another rollwave server is using ...".
    pub program: &'static str,
    /// The rule, as in "only one coordinator may run per data dir".
    pub rule: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another {}{} is using {dir}; stop it first ({})",
        owner.program,
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
        owner.rule
    )]
    Held {
        owner: LockOwner,
        dir: PathBuf,
        holder: Option<u32>,
    },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A directory this process holds until the value is dropped: an exclusive lock on `lock_file`
/// (created mode 0600), released by the kernel when the process exits, however it exits. The
/// file records the holder's pid for the message the next process that is refused prints.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(dir: &Path, lock_file: &Path, owner: LockOwner) -> Result<Self, LockError> {
        let io_error = |source| LockError::Io {
            path: lock_file.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(lock_file)
            .map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    owner,
                    dir: dir.to_owned(),
                    holder: text.trim().parse().ok(),
                });
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(io_error(error)),
        }
        file.set_len(0).map_err(io_error)?;
        file.rewind().map_err(io_error)?;
        writeln!(file, "{}", std::process::id()).map_err(io_error)?;
        Ok(Self { _file: file })
    }
}

/// Atomically replaces `path` with `contents`, readable only by the owner.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Atomically replaces `path` with `contents`, readable by everyone.
pub fn write_public(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic(path, contents, 0o644)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?
        .to_string_lossy();
    let temp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn private_files_are_owner_only_and_replaced_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("secret");
        write_private(&path, b"one").expect("write");
        write_private(&path, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("list").count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn a_lock_is_exclusive_and_names_its_holder() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("lock");
        let owner = LockOwner {
            program: "test process",
            rule: "only one test per dir",
        };
        let first = DirLock::acquire(dir.path(), &path, owner).expect("first lock");
        let second = DirLock::acquire(dir.path(), &path, owner).expect_err("second lock refused");
        assert!(matches!(second, LockError::Held { holder: Some(pid), .. } if pid == std::process::id()));
        let message = second.to_string();
        assert!(
            message.starts_with(&format!("another test process (pid {}) is using", std::process::id())),
            "{message}"
        );
        drop(first);
        DirLock::acquire(dir.path(), &path, owner).expect("free again once the holder closed it");
    }
}
