//! Keeps a second coordinator off a data dir that one is already serving
//! from: an exclusive lock on `DATA_DIR/server.lock`, held for the life of the
//! server and released by the kernel when the process exits (the agent holds
//! its state dir the same way). Taken before anything else in the data dir is
//! written, so a refused second server leaves no trace (the end-to-end test
//! `a_second_coordinator_on_the_same_data_dir_took_it_over`).

use std::path::Path;

pub use rollwave_trust::files::LockError;
use rollwave_trust::files::{DirLock, LockOwner};

/// The lock file inside the data dir; it holds the pid of the server that has it.
const LOCK_FILE: &str = "server.lock";

const OWNER: LockOwner = LockOwner {
    program: "rollwave server",
    rule: "only one coordinator may run per data dir",
};

/// Holds the data dir until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _lock: DirLock,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<Self, LockError> {
        let lock = DirLock::acquire(data_dir, &data_dir.join(LOCK_FILE), OWNER)?;
        Ok(Self { _lock: lock })
    }
}
