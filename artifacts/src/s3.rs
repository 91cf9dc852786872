//! Building the S3 client (standard AWS credential chain; endpoint and
//! path-style overrides for S3-compatible stores) and uploading releases.

use std::path::Path;

use aws_config::BehaviorVersion;
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls;
use serde::Deserialize;

/// Where the store is, when it is not AWS S3 in the default region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// For example `http://127.0.0.1:9000` for an S3-compatible store.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` rather than `bucket.endpoint`.
    #[serde(default)]
    pub force_path_style: bool,
}

/// An S3 client on the standard credential chain (environment, profile, web
/// identity, ECS, instance role) with the overrides in `settings`.
pub async fn client(settings: &S3Settings) -> aws_sdk_s3::Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(region) = &settings.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared).force_path_style(settings.force_path_style);
    if shared.region().is_none() {
        // S3 needs some region to sign with; us-east-1 is what S3-compatible stores expect.
        builder = builder.region(aws_config::Region::new("us-east-1"));
    }
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    aws_sdk_s3::Client::from_conf(builder.build())
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: aws_smithy_types::byte_stream::error::Error,
    },
    #[error("upload to s3://{bucket}/{key}: {detail}")]
    Put {
        bucket: String,
        key: String,
        detail: String,
    },
}

/// Where an upload landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// The object version the store assigned; `None` for an unversioned bucket.
    pub version_id: Option<String>,
}

/// Uploads `path` to `bucket`/`key`, asking the store to check the sha256 on arrival.
///
/// Versioning is read from the `VersionId` of the response rather than from
/// `GetBucketVersioning`, which some S3-compatible stores answer in a form the
/// SDK rejects.
pub async fn upload(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    path: &Path,
    sha256_hex: &str,
) -> Result<Uploaded, UploadError> {
    let body = ByteStream::from_path(path).await.map_err(|source| UploadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let digest = hex::decode(sha256_hex).map_err(|error| UploadError::Put {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        detail: format!("invalid sha256 {sha256_hex:?}: {error}"),
    })?;
    let response = client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(body)
        .content_type("application/zip")
        .checksum_sha256(aws_smithy_types::base64::encode(digest))
        .send()
        .await
        .map_err(|error| UploadError::Put {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            detail: aws_sdk_s3::error::DisplayErrorContext(&error).to_string(),
        })?;
    Ok(Uploaded {
        version_id: response
            .version_id()
            .filter(|id| !id.is_empty() && *id != "null")
            .map(str::to_owned),
    })
}
