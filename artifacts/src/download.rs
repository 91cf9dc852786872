//! Downloading a release archive exactly as registered: pinned by object
//! version, hashed in the same pass that writes it, never longer than the
//! registered size, resumed with a range request (pinned to the same version)
//! after a stall or a broken connection. Nothing is trusted until the sha256
//! of the whole file matches.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use sha2::{Digest, Sha256};
use tokio::fs::OpenOptions;
use tokio::io::{AsyncWriteExt, BufWriter};

/// Write buffer: large enough that hashing and writing run at disk speed.
const WRITE_BUFFER: usize = 1 << 20;

/// The bytes a release names: where they are and what they must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedObject {
    pub bucket: String,
    pub key: String,
    /// `None` only for releases pushed with --allow-unversioned (pinned by sha256 alone).
    pub version_id: Option<String>,
    /// Lowercase hex.
    pub sha256: String,
    pub size: u64,
}

impl PinnedObject {
    fn describe(&self) -> String {
        match &self.version_id {
            Some(version) => format!("s3://{}/{} (version {version})", self.bucket, self.key),
            None => format!("s3://{}/{}", self.bucket, self.key),
        }
    }
}

/// How patient a download is.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// No byte for this long counts as a stall: the attempt is abandoned and resumed.
    pub stall_timeout: Duration,
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            stall_timeout: Duration::from_secs(30),
            attempts: 8,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{object}: {detail}")]
    Get { object: String, detail: String },
    #[error(
        "{object}: the object is larger than the registered {expected} bytes; it was changed after it was registered; push a new version"
    )]
    Oversized { object: String, expected: u64 },
    #[error(
        "{object}: the object is shorter than the registered {expected} bytes; it was changed after it was registered; push a new version"
    )]
    Undersized { object: String, expected: u64 },
    #[error(
        "{object}: sha256 mismatch (expected {expected}, got {actual}); the object was changed after it was registered; push a new version"
    )]
    Sha256Mismatch {
        object: String,
        expected: String,
        actual: String,
    },
    #[error("{object}: gave up after {attempts} attempts: {last}")]
    GaveUp {
        object: String,
        attempts: u32,
        last: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What went wrong in one attempt.
enum AttemptError {
    /// Worth another attempt (stall, connection, 5xx, short body).
    Transient(String),
    /// Not worth another attempt.
    Fatal(DownloadError),
}

/// Hashes what a previous attempt left in `partial`, so a resumed download
/// still verifies every byte.
fn hash_existing(partial: &Path, size: u64) -> Result<(Sha256, u64), DownloadError> {
    let mut hasher = Sha256::new();
    let mut file = match std::fs::File::open(partial) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(error) => return Err(io_error(partial)(error)),
    };
    let length = file.metadata().map_err(io_error(partial))?.len();
    if length > size {
        drop(file);
        std::fs::remove_file(partial).map_err(io_error(partial))?;
        return Ok((Sha256::new(), 0));
    }
    let mut buffer = vec![0u8; WRITE_BUFFER];
    let mut hashed = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(io_error(partial))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        hashed += read as u64;
    }
    Ok((hasher, hashed))
}

fn is_transient<E>(error: &SdkError<E, HttpResponse>) -> bool {
    match error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        // Throttling and server errors pass; "no such key/version" and "access denied" do not.
        SdkError::ServiceError(context) => {
            let status = context.raw().status();
            status.is_server_error() || status.as_u16() == 429
        }
        _ => false,
    }
}

/// Downloads `object` to `complete`, going through `partial` (kept between
/// attempts and across restarts, so a later call resumes it). Returns once
/// `complete` holds exactly the registered bytes, fsynced.
pub async fn download_verified(
    client: &aws_sdk_s3::Client,
    object: &PinnedObject,
    partial: &Path,
    complete: &Path,
    options: &DownloadOptions,
) -> Result<(), DownloadError> {
    let (mut hasher, mut offset) = hash_existing(partial, object.size)?;
    let mut delay = options.retry_initial;
    let mut last = String::new();
    for attempt in 1..=options.attempts.max(1) {
        if offset < object.size {
            match fetch_range(client, object, partial, &mut hasher, &mut offset, options).await {
                Ok(()) => {}
                Err(AttemptError::Fatal(error)) => return Err(error),
                Err(AttemptError::Transient(reason)) => {
                    tracing::warn!(object = %object.describe(), attempt, received = offset, %reason, "download interrupted; will resume");
                    last = reason;
                    if attempt < options.attempts {
                        let jittered = delay.mul_f64(0.5 + fastrand::f64() * 0.5);
                        tokio::time::sleep(jittered).await;
                        delay = (delay * 2).min(options.retry_max);
                    }
                    continue;
                }
            }
        }
        let actual = hex::encode(hasher.finalize());
        if actual != object.sha256 {
            let _ = tokio::fs::remove_file(partial).await;
            return Err(DownloadError::Sha256Mismatch {
                object: object.describe(),
                expected: object.sha256.clone(),
                actual,
            });
        }
        tokio::fs::rename(partial, complete).await.map_err(io_error(complete))?;
        return Ok(());
    }
    Err(DownloadError::GaveUp {
        object: object.describe(),
        attempts: options.attempts,
        last,
    })
}

/// One GET from `offset` to the end, appended to `partial`.
async fn fetch_range(
    client: &aws_sdk_s3::Client,
    object: &PinnedObject,
    partial: &Path,
    hasher: &mut Sha256,
    offset: &mut u64,
    options: &DownloadOptions,
) -> Result<(), AttemptError> {
    let mut request = client.get_object().bucket(&object.bucket).key(&object.key);
    if let Some(version) = &object.version_id {
        request = request.version_id(version);
    }
    if *offset > 0 {
        request = request.range(format!("bytes={}-", *offset));
    }
    let undersized = || {
        let _ = std::fs::remove_file(partial);
        AttemptError::Fatal(DownloadError::Undersized {
            object: object.describe(),
            expected: object.size,
        })
    };
    let response = match tokio::time::timeout(options.stall_timeout, request.send()).await {
        Err(_) => return Err(AttemptError::Transient("no response within the stall timeout".into())),
        // A resume whose range starts past the object's end: the object is shorter than
        // registered (replaced), which no retry mends.
        Ok(Err(SdkError::ServiceError(context))) if context.raw().status().as_u16() == 416 => {
            return Err(undersized());
        }
        Ok(Err(error)) if is_transient(&error) => {
            return Err(AttemptError::Transient(DisplayErrorContext(&error).to_string()));
        }
        Ok(Err(error)) => {
            return Err(AttemptError::Fatal(DownloadError::Get {
                object: object.describe(),
                detail: DisplayErrorContext(&error).to_string(),
            }));
        }
        Ok(Ok(response)) => response,
    };
    let oversized = || {
        AttemptError::Fatal(DownloadError::Oversized {
            object: object.describe(),
            expected: object.size,
        })
    };
    if let Some(length) = response.content_length() {
        let end = offset.saturating_add(u64::try_from(length).unwrap_or(u64::MAX));
        if end > object.size {
            let _ = std::fs::remove_file(partial);
            return Err(oversized());
        }
        if end < object.size {
            // The whole rest of the object was asked for and it ends early: not a cut connection.
            return Err(undersized());
        }
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(partial)
        .await
        .map_err(|error| AttemptError::Fatal(io_error(partial)(error)))?;
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut body = response.body;
    let outcome = loop {
        let chunk = match tokio::time::timeout(options.stall_timeout, body.next()).await {
            Err(_) => {
                break Err(AttemptError::Transient(
                    "stalled: no data within the stall timeout".into(),
                ));
            }
            Ok(None) => break Ok(()),
            Ok(Some(Err(error))) => break Err(AttemptError::Transient(error.to_string())),
            Ok(Some(Ok(chunk))) => chunk,
        };
        let length = chunk.len() as u64;
        if offset.saturating_add(length) > object.size {
            break Err(oversized());
        }
        if let Err(error) = writer.write_all(&chunk).await {
            break Err(AttemptError::Fatal(io_error(partial)(error)));
        }
        hasher.update(&chunk);
        *offset += length;
    };
    // Keep what arrived (it is hashed already) so the next attempt resumes after it.
    let flushed = async {
        writer.flush().await?;
        writer.into_inner().sync_all().await
    }
    .await;
    if let Err(AttemptError::Fatal(DownloadError::Oversized { .. })) = &outcome {
        let _ = std::fs::remove_file(partial);
        return outcome;
    }
    flushed.map_err(|error| AttemptError::Fatal(io_error(partial)(error)))?;
    outcome?;
    if *offset < object.size {
        return Err(AttemptError::Transient(format!(
            "connection ended after {} of {} bytes",
            *offset, object.size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_longer_than_the_object_are_discarded() {
        let dir = tempfile::tempdir().expect("temp dir");
        let partial = dir.path().join("x.partial");
        std::fs::write(&partial, b"0123456789").expect("write");
        let (_, offset) = hash_existing(&partial, 4).expect("hash");
        assert_eq!(offset, 0);
        assert!(!partial.exists());
    }

    #[test]
    fn leftovers_are_hashed_to_resume() {
        let dir = tempfile::tempdir().expect("temp dir");
        let partial = dir.path().join("x.partial");
        std::fs::write(&partial, b"0123").expect("write");
        let (mut hasher, offset) = hash_existing(&partial, 10).expect("hash");
        assert_eq!(offset, 4);
        hasher.update(b"456789");
        assert_eq!(
            hex::encode(hasher.finalize()),
            hex::encode(Sha256::digest(b"0123456789"))
        );
    }
}
