//! An S3-compatible artifact store served in-process on loopback, so that
//! `rollwave demo` pushes and installs releases through the same S3 code as
//! production (`rollwave_artifacts`), with no AWS account and nothing to
//! install. Only the demo uses it; real releases live in S3.
//!
//! Why a dependency: `s3s` implements the S3 protocol (SigV4 authentication,
//! the XML wire format, ranges, checksums) as a hyper service, and `s3s-fs`
//! stores its buckets and objects as plain files under one directory. Writing
//! that protocol ourselves would be more code than the demo, and an external
//! server (moto, MinIO) would have to be installed first. Both crates are pure
//! Rust and bring no TLS stack or crypto provider: the store speaks plain HTTP
//! on 127.0.0.1. Version 0.14.1 is the newest that builds on Rust 1.95 and
//! has no bucket versioning, so releases in this store are unversioned and
//! pinned by their sha256 alone (`release push --allow-unversioned`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use rollwave_artifacts::S3Settings;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The region the store's clients sign with; S3-compatible stores expect this one.
pub const REGION: &str = "us-east-1";

/// The one key pair the store accepts. They open nothing but this loopback store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("create bucket directory {path}: {source}")]
    CreateBucket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `s3s_fs::Error` implements neither `Display` nor `Error`, so its `Debug` form is kept.
    #[error("open the store's directory {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("listen on 127.0.0.1: {source}")]
    Listen {
        #[source]
        source: std::io::Error,
    },
}

/// A running store: an accept loop serving S3 over HTTP/1.1 until shut down.
#[derive(Debug)]
pub struct ArtifactStore {
    local_addr: SocketAddr,
    root: PathBuf,
    credentials: StoreCredentials,
    server: JoinHandle<()>,
}

impl ArtifactStore {
    /// Serves the objects under `root` (each bucket a directory, created here if missing) on a free loopback port,
    /// accepting only requests signed with `credentials`.
    pub async fn start(root: &Path, buckets: &[&str], credentials: StoreCredentials) -> Result<Self, StoreError> {
        for bucket in buckets {
            let path = root.join(bucket);
            std::fs::create_dir_all(&path).map_err(|source| StoreError::CreateBucket { path, source })?;
        }
        let files = s3s_fs::FileSystem::new(root).map_err(|error| StoreError::Open {
            path: root.to_owned(),
            detail: format!("{error:?}"),
        })?;
        let mut builder = S3ServiceBuilder::new(files);
        builder.set_auth(SimpleAuth::from_single(
            credentials.access_key_id.clone(),
            credentials.secret_access_key.clone(),
        ));
        let service = builder.build();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| StoreError::Listen { source })?;
        let local_addr = listener.local_addr().map_err(|source| StoreError::Listen { source })?;
        let server = tokio::spawn(async move {
            // Owned by the accept loop, so that shutting the loop down ends every open connection too.
            let mut connections = JoinSet::new();
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "artifact store: accept failed");
                        continue;
                    }
                };
                let service = service.clone();
                connections.spawn(async move {
                    let connection =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "artifact store: connection ended with an error");
                    }
                });
                // Reap finished connections so the set does not grow with every request.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            local_addr,
            root: root.to_owned(),
            credentials,
            server,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Where the objects are on disk.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What an agent's `[s3]` table (or `release push`) needs to reach the store.
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some(REGION.to_owned()),
            force_path_style: true,
        }
    }

    pub fn credentials(&self) -> &StoreCredentials {
        &self.credentials
    }

    /// The production client (`rollwave_artifacts::client`) pointed at the store, signing with the store's
    /// credentials instead of whatever the standard credential chain would find on this machine.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        signed_client(&self.settings(), &self.credentials).await
    }

    /// Stops serving and closes every connection.
    pub async fn shutdown(self) {
        self.server.abort();
        let _ = self.server.await;
    }
}

async fn signed_client(settings: &S3Settings, credentials: &StoreCredentials) -> aws_sdk_s3::Client {
    // Loopback store with its own region and credentials: nothing to ask the metadata service.
    let base = rollwave_artifacts::client(settings, rollwave_artifacts::InstanceMetadata::Forbidden).await;
    let credentials = aws_sdk_s3::config::Credentials::new(
        credentials.access_key_id.clone(),
        credentials.secret_access_key.clone(),
        None,
        None,
        "rollwave-demo",
    );
    aws_sdk_s3::Client::from_conf(base.config().to_builder().credentials_provider(credentials).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> StoreCredentials {
        StoreCredentials {
            access_key_id: "test-key".into(),
            secret_access_key: "test-secret".into(),
        }
    }

    #[tokio::test]
    async fn an_uploaded_release_downloads_verified_and_resumed_through_the_production_client() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("store");
        let store = ArtifactStore::start(&root, &["releases"], credentials())
            .await
            .expect("store starts");
        let archive = dir.path().join("site.zip");
        let bytes = b"not really a zip, but bytes all the same".repeat(100);
        std::fs::write(&archive, &bytes).expect("write archive");
        let sha256 = rollwave_release::Sha256::of(&bytes).to_hex();

        let client = store.client().await;
        let uploaded = rollwave_artifacts::upload(&client, "releases", "releases/site/1.zip", &archive, &sha256)
            .await
            .expect("upload");
        assert_eq!(uploaded.version_id, None, "s3s-fs keeps no object versions");

        // As an agent does: pinned by sha256 alone, resuming a partial download with a range request.
        let partial = dir.path().join("download.partial");
        let complete = dir.path().join("download.zip");
        std::fs::write(&partial, &bytes[..1000]).expect("write partial");
        let object = rollwave_artifacts::PinnedObject {
            bucket: "releases".into(),
            key: "releases/site/1.zip".into(),
            version_id: None,
            sha256,
            size: u64::try_from(bytes.len()).expect("small"),
        };
        rollwave_artifacts::download_verified(&client, &object, &partial, &complete, &Default::default())
            .await
            .expect("download");
        assert_eq!(std::fs::read(&complete).expect("read download"), bytes);
        store.shutdown().await;
    }

    #[tokio::test]
    async fn requests_signed_with_other_credentials_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ArtifactStore::start(&dir.path().join("store"), &["releases"], credentials())
            .await
            .expect("store starts");
        let archive = dir.path().join("site.zip");
        std::fs::write(&archive, b"bytes").expect("write archive");
        let sha256 = rollwave_release::Sha256::of(b"bytes").to_hex();
        let stranger = StoreCredentials {
            access_key_id: "test-key".into(),
            secret_access_key: "wrong-secret".into(),
        };
        let client = signed_client(&store.settings(), &stranger).await;
        let refused = rollwave_artifacts::upload(&client, "releases", "releases/site/1.zip", &archive, &sha256).await;
        assert!(refused.is_err(), "{refused:?}");
        store.shutdown().await;
    }
}
