//! Keeps a second agent (or `rollwave-agent install`) off a state dir that
//! one is already using: an exclusive lock on `state/agent.lock`, held for
//! the life of the process and released by the kernel when it exits.

use std::path::Path;

pub use rollwave_trust::files::LockError;
use rollwave_trust::files::{DirLock, LockOwner};

const OWNER: LockOwner = LockOwner {
    program: "rollwave-agent process",
    rule: "only one agent may run per state dir",
};

/// Holds the state dir until dropped.
#[derive(Debug)]
pub struct StateDirLock {
    _lock: DirLock,
}

impl StateDirLock {
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        let dir = state_dir.join("state");
        let path = dir.join("agent.lock");
        std::fs::create_dir_all(&dir).map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            _lock: DirLock::acquire(state_dir, &path, OWNER)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = StateDirLock::acquire(dir.path()).expect("first lock");
        let second = StateDirLock::acquire(dir.path()).expect_err("second lock refused");
        let message = second.to_string();
        assert!(message.contains(&format!("pid {}", std::process::id())), "{message}");
        drop(first);
        StateDirLock::acquire(dir.path()).expect("free again");
    }
}
