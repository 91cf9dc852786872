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

/// Whether a bucket keeps every version of its objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketVersioning {
    /// Every overwrite keeps the old bytes under their own version id.
    Enabled,
    /// Versioning was on once and is paused: new writes replace the "null" version.
    Suspended,
    /// Versioning was never turned on.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum VersioningError {
    #[error("ask whether bucket {bucket} keeps object versions: {detail}")]
    Get { bucket: String, detail: String },
    #[error("bucket {bucket}: the versioning answer has status {status:?}, which is neither Enabled nor Suspended")]
    UnknownStatus { bucket: String, status: String },
}

/// Asks whether `bucket` keeps object versions (`GetBucketVersioning`), without writing anything.
///
/// Some S3-compatible stores (moto) answer with XML the SDK's parser rejects; the answer is then
/// read from the raw response body, which has the same shape as AWS's:
/// `<VersioningConfiguration><Status>Enabled</Status></VersioningConfiguration>`, or no `Status`
/// element for a bucket that never had versioning.
pub async fn bucket_versioning(client: &aws_sdk_s3::Client, bucket: &str) -> Result<BucketVersioning, VersioningError> {
    let get_error = |detail: String| VersioningError::Get {
        bucket: bucket.to_owned(),
        detail,
    };
    let status = match client.get_bucket_versioning().bucket(bucket).send().await {
        Ok(output) => output.status().map(|status| status.as_str().to_owned()),
        Err(aws_sdk_s3::error::SdkError::ResponseError(context)) if context.raw().status().is_success() => {
            let body = context.raw().body().bytes().unwrap_or_default();
            tracing::debug!(
                bucket,
                "GetBucketVersioning answer not parsed by the SDK; reading it raw"
            );
            versioning_status_from_xml(&String::from_utf8_lossy(body))
        }
        Err(error) => return Err(get_error(aws_sdk_s3::error::DisplayErrorContext(&error).to_string())),
    };
    match status.as_deref() {
        None | Some("") => Ok(BucketVersioning::Off),
        Some("Enabled") => Ok(BucketVersioning::Enabled),
        Some("Suspended") => Ok(BucketVersioning::Suspended),
        Some(other) => Err(VersioningError::UnknownStatus {
            bucket: bucket.to_owned(),
            status: other.to_owned(),
        }),
    }
}

/// The text of the `<Status>` element of a `GetBucketVersioning` answer; `None` when it has none.
fn versioning_status_from_xml(xml: &str) -> Option<String> {
    let start = xml.find("<Status>")? + "<Status>".len();
    let length = xml[start..].find("</Status>")?;
    Some(xml[start..start + length].trim().to_owned())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_versioning_status_is_read_from_raw_answers() {
        let aws_enabled = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<VersioningConfiguration \
            xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Status>Enabled</Status></VersioningConfiguration>";
        let moto_suspended = "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<VersioningConfiguration \
            xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Status>Suspended</Status></VersioningConfiguration>";
        let moto_never = "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<VersioningConfiguration \
            xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"/>";
        assert_eq!(versioning_status_from_xml(aws_enabled).as_deref(), Some("Enabled"));
        assert_eq!(versioning_status_from_xml(moto_suspended).as_deref(), Some("Suspended"));
        assert_eq!(versioning_status_from_xml(moto_never), None);
    }
}
