//! Who this instance is to the coordinator: its instance id, its private key
//! and the certificate the coordinator issued for it, with the coordinator's
//! CA. Kept in one file (`identity.toml`, mode 0600) replaced atomically, so
//! a crash during renewal never leaves a key that does not match its
//! certificate.

use std::path::{Path, PathBuf};

use rollwave_trust::files::write_private;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({message}); remove it and join again with a new token")]
    Corrupt { path: PathBuf, message: String },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    pub instance_id: String,
    pub stack: String,
    pub issued_at_ms: i64,
    pub not_after_ms: i64,
    pub ca_pem: String,
    pub certificate_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("instance_id", &self.instance_id)
            .field("stack", &self.stack)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn file(tls_dir: &Path) -> PathBuf {
        tls_dir.join("identity.toml")
    }

    /// The stored identity, or `None` before the first join.
    pub fn load(tls_dir: &Path) -> Result<Option<Self>, IdentityError> {
        let path = Self::file(tls_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IdentityError::Read { path, source }),
        };
        toml::from_str(&text).map(Some).map_err(|error| IdentityError::Corrupt {
            path,
            message: error.to_string(),
        })
    }

    pub fn save(&self, tls_dir: &Path) -> Result<(), IdentityError> {
        let path = Self::file(tls_dir);
        let write_error = |source| IdentityError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(tls_dir).map_err(write_error)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tls_dir, std::fs::Permissions::from_mode(0o700)).map_err(write_error)?;
        }
        let text = toml::to_string(self).map_err(|error| IdentityError::Corrupt {
            path: path.clone(),
            message: error.to_string(),
        })?;
        write_private(&path, text.as_bytes()).map_err(write_error)
    }

    /// When to ask for a new certificate: at two thirds of this one's life.
    pub fn renew_at_ms(&self) -> i64 {
        let lifetime = self.not_after_ms.saturating_sub(self.issued_at_ms).max(0);
        self.issued_at_ms.saturating_add(lifetime / 3 * 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Identity {
        Identity {
            instance_id: "i-1".into(),
            stack: "web".into(),
            issued_at_ms: 0,
            not_after_ms: 3_000,
            ca_pem: "ca".into(),
            certificate_pem: "cert".into(),
            key_pem: "key".into(),
        }
    }

    #[test]
    fn renews_at_two_thirds_of_its_life() {
        assert_eq!(sample().renew_at_ms(), 2_000);
    }

    #[test]
    fn saves_and_loads_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let tls_dir = dir.path().join("tls");
        assert_eq!(Identity::load(&tls_dir).expect("no identity yet"), None);
        sample().save(&tls_dir).expect("save");
        assert_eq!(Identity::load(&tls_dir).expect("load"), Some(sample()));
        let mode = std::fs::metadata(Identity::file(&tls_dir))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_corrupt_file_is_reported_not_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(Identity::file(dir.path()), "not = [toml").expect("write");
        let error = Identity::load(dir.path()).expect_err("corrupt");
        assert!(error.to_string().contains("join again"), "{error}");
    }
}
