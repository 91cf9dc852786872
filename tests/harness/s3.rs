//! The S3 side of the end-to-end tests: the S3-compatible server (moto) that
//! `tests/run` starts, a fresh bucket per test, and raw access to objects, to
//! check what a command uploaded or to change an object behind a release's back.
//!
//! Every call is synchronous and runs on the harness's own Tokio runtime, so it
//! works from plain `#[test]`s and from inside `#[tokio::test]` alike.

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use rollwave_artifacts::S3Settings;

/// Set by `tests/run` to the address of the S3 server it started.
pub const ENDPOINT_VAR: &str = "ROLLWAVE_TEST_S3_ENDPOINT";

/// The region the test server signs with.
const REGION: &str = "us-east-1";

/// The S3 server's endpoint, such as `http://127.0.0.1:40123`. Panics when the
/// suite was not started through `tests/run`: S3 tests never skip.
pub fn endpoint() -> String {
    std::env::var(ENDPOINT_VAR)
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{ENDPOINT_VAR} is not set: run tests through tests/run, which starts the S3 server (moto) \
                 and sets it with test credentials"
            )
        })
}

/// Settings for a client of the test server (path-style addressing, as moto needs).
pub fn settings() -> S3Settings {
    S3Settings {
        endpoint: Some(endpoint()),
        region: Some(REGION.into()),
        force_path_style: true,
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("harness-s3")
            .enable_all()
            .build()
            .expect("start the S3 helper's runtime")
    })
}

/// Runs `future` on the harness runtime and waits for its result.
fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (sender, receiver) = std::sync::mpsc::channel();
    runtime().spawn(async move {
        let _ = sender.send(future.await);
    });
    receiver.recv().expect("the S3 helper's task panicked")
}

/// A unique, valid bucket name: tests run in parallel processes against one server.
fn unique_bucket_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.subsec_nanos())
        .unwrap_or(0);
    format!("rw-test-{}-{count}-{nanos}", std::process::id())
}

/// One version of an object, as S3 lists them (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    /// `None` for an object stored while the bucket had no versioning.
    pub version_id: Option<String>,
    pub size: u64,
    pub is_latest: bool,
}

/// A bucket of its own for one test, on the server `tests/run` started.
#[derive(Debug, Clone)]
pub struct S3Bucket {
    pub name: String,
    pub endpoint: String,
    pub versioned: bool,
    client: aws_sdk_s3::Client,
}

impl S3Bucket {
    /// Creates a new, uniquely named bucket, with versioning enabled if `versioned`.
    pub fn create(versioned: bool) -> Self {
        let settings = settings();
        let endpoint = endpoint();
        let name = unique_bucket_name();
        let bucket = name.clone();
        let client = block_on(async move {
            let client = rollwave_artifacts::client(&settings, rollwave_artifacts::InstanceMetadata::Allowed).await;
            client
                .create_bucket()
                .bucket(&bucket)
                .send()
                .await
                .unwrap_or_else(|error| panic!("create bucket {bucket}: {}", describe(&error)));
            if versioned {
                client
                    .put_bucket_versioning()
                    .bucket(&bucket)
                    .versioning_configuration(
                        VersioningConfiguration::builder()
                            .status(BucketVersioningStatus::Enabled)
                            .build(),
                    )
                    .send()
                    .await
                    .unwrap_or_else(|error| panic!("enable versioning on {bucket}: {}", describe(&error)));
            }
            client
        });
        Self {
            name,
            endpoint,
            versioned,
            client,
        }
    }

    /// A new bucket with versioning enabled.
    pub fn versioned() -> Self {
        Self::create(true)
    }

    /// A new bucket without versioning.
    pub fn unversioned() -> Self {
        Self::create(false)
    }

    /// Client settings for this server (also what `rollwave-agent` needs to fetch from it).
    pub fn settings(&self) -> S3Settings {
        settings()
    }

    /// The `rollwave release push` flags that target this bucket:
    /// `--bucket NAME --s3-endpoint URL --s3-path-style`.
    pub fn push_args(&self) -> Vec<String> {
        vec![
            "--bucket".into(),
            self.name.clone(),
            "--s3-endpoint".into(),
            self.endpoint.clone(),
            "--s3-path-style".into(),
        ]
    }

    /// The SDK client, for anything the helpers below do not cover. Use it from
    /// an async test, or through the helpers from a plain one.
    pub fn client(&self) -> aws_sdk_s3::Client {
        self.client.clone()
    }

    /// Writes `bytes` to `key` directly, as someone with bucket access could,
    /// bypassing Rollwave. Returns the new object version, if the bucket keeps versions.
    pub fn put(&self, key: &str, bytes: &[u8]) -> Option<String> {
        let (client, bucket, key, body) = (self.client.clone(), self.name.clone(), key.to_owned(), bytes.to_vec());
        block_on(async move {
            let response = client
                .put_object()
                .bucket(&bucket)
                .key(&key)
                .body(ByteStream::from(body))
                .send()
                .await
                .unwrap_or_else(|error| panic!("put s3://{bucket}/{key}: {}", describe(&error)));
            response
                .version_id()
                .filter(|id| !id.is_empty() && *id != "null")
                .map(str::to_owned)
        })
    }

    /// Reads `key` (a given version, or the latest); panics if it does not exist.
    pub fn get(&self, key: &str, version_id: Option<&str>) -> Vec<u8> {
        self.try_get(key, version_id)
            .unwrap_or_else(|| panic!("s3://{}/{key} does not exist", self.name))
    }

    /// Reads `key` (a given version, or the latest), or `None` if there is no such object.
    pub fn try_get(&self, key: &str, version_id: Option<&str>) -> Option<Vec<u8>> {
        let (client, bucket, key) = (self.client.clone(), self.name.clone(), key.to_owned());
        let version_id = version_id.map(str::to_owned);
        block_on(async move {
            let response = match client
                .get_object()
                .bucket(&bucket)
                .key(&key)
                .set_version_id(version_id)
                .send()
                .await
            {
                Ok(response) => response,
                Err(error) if error.as_service_error().is_some_and(|service| service.is_no_such_key()) => {
                    return None;
                }
                Err(error) => panic!("get s3://{bucket}/{key}: {}", describe(&error)),
            };
            let body = response
                .body
                .collect()
                .await
                .unwrap_or_else(|error| panic!("read s3://{bucket}/{key}: {error}"));
            Some(body.into_bytes().to_vec())
        })
    }

    /// Every stored version of `key`, newest first; empty if nothing was ever stored there.
    pub fn object_versions(&self, key: &str) -> Vec<ObjectVersion> {
        let (client, bucket, key) = (self.client.clone(), self.name.clone(), key.to_owned());
        block_on(async move {
            let response = client
                .list_object_versions()
                .bucket(&bucket)
                .prefix(&key)
                .send()
                .await
                .unwrap_or_else(|error| panic!("list versions of s3://{bucket}/{key}: {}", describe(&error)));
            response
                .versions()
                .iter()
                .filter(|version| version.key() == Some(key.as_str()))
                .map(|version| ObjectVersion {
                    version_id: version
                        .version_id()
                        .filter(|id| !id.is_empty() && *id != "null")
                        .map(str::to_owned),
                    size: version.size().and_then(|size| u64::try_from(size).ok()).unwrap_or(0),
                    is_latest: version.is_latest().unwrap_or(false),
                })
                .collect()
        })
    }

    /// Every key in the bucket, sorted.
    pub fn keys(&self) -> Vec<String> {
        let (client, bucket) = (self.client.clone(), self.name.clone());
        block_on(async move {
            let response = client
                .list_objects_v2()
                .bucket(&bucket)
                .send()
                .await
                .unwrap_or_else(|error| panic!("list s3://{bucket}: {}", describe(&error)));
            let mut keys: Vec<String> = response
                .contents()
                .iter()
                .filter_map(|object| object.key().map(str::to_owned))
                .collect();
            keys.sort();
            keys
        })
    }
}

fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    aws_sdk_s3::error::DisplayErrorContext(error).to_string()
}
