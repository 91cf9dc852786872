//! Building the S3 client (standard AWS credential chain; endpoint and
//! path-style overrides for S3-compatible stores) and uploading releases.
//! Where the EC2 instance metadata service is off limits (an agent with
//! `imds = "off"`), the region and credential chains are built here without
//! it, since the SDK's defaults would ask it for both.

use std::path::Path;

use aws_config::BehaviorVersion;
use aws_config::ecs::EcsCredentialsProvider;
use aws_config::environment::{EnvironmentVariableCredentialsProvider, EnvironmentVariableRegionProvider};
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::{ProfileFileCredentialsProvider, ProfileFileRegionProvider};
use aws_config::provider_config::ProviderConfig;
use aws_config::web_identity_token::WebIdentityTokenCredentialsProvider;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, future};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls;
use serde::Deserialize;

/// The region S3 requests are signed for when nothing names one: S3-compatible
/// stores expect it, and AWS S3 answers a request signed for the wrong region
/// with an error naming the right one (set `[s3] region` then).
pub const DEFAULT_REGION: &str = "us-east-1";

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

/// Whether building and using the client may ask the EC2 instance metadata
/// service (169.254.169.254) for a region or credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceMetadata {
    /// The SDK's standard chains, the metadata service last.
    Allowed,
    /// Region: `settings.region`, else `AWS_REGION`/`AWS_DEFAULT_REGION`, else
    /// the profile, else [`DEFAULT_REGION`]. Credentials: environment, profile,
    /// web identity, ECS; never the metadata service (a profile naming
    /// `credential_source = Ec2InstanceMetadata` gets an error saying why).
    Forbidden,
}

/// An S3 client on the standard credential chain (environment, profile, web
/// identity, ECS, and the instance role unless `metadata` forbids it) with the
/// overrides in `settings`.
pub async fn client(settings: &S3Settings, metadata: InstanceMetadata) -> aws_sdk_s3::Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http.clone());
    match metadata {
        InstanceMetadata::Allowed => {
            if let Some(region) = &settings.region {
                loader = loader.region(aws_config::Region::new(region.clone()));
            }
        }
        InstanceMetadata::Forbidden => {
            let region = match &settings.region {
                Some(region) => aws_config::Region::new(region.clone()),
                None => region_without_metadata().await,
            };
            let provider_config = ProviderConfig::without_region()
                .with_http_client(http)
                .with_region(Some(region.clone()));
            loader = loader
                .region(region)
                .credentials_provider(credentials_without_metadata(&provider_config));
        }
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared).force_path_style(settings.force_path_style);
    if shared.region().is_none() {
        builder = builder.region(aws_config::Region::new(DEFAULT_REGION));
    }
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    aws_sdk_s3::Client::from_conf(builder.build())
}

/// The SDK's region chain without its last link (the metadata service).
async fn region_without_metadata() -> aws_config::Region {
    let chain = RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
        .or_else(ProfileFileRegionProvider::new());
    match chain.region().await {
        Some(region) => region,
        None => {
            tracing::info!(
                region = DEFAULT_REGION,
                "no S3 region configured and the instance metadata service is off; using the default \
                 (set [s3] region for a bucket elsewhere)"
            );
            aws_config::Region::new(DEFAULT_REGION)
        }
    }
}

/// The SDK's default credential chain without its last link (the metadata service).
fn credentials_without_metadata(config: &ProviderConfig) -> CredentialsProviderChain {
    let profile = ProfileFileCredentialsProvider::builder()
        .configure(config)
        .with_custom_provider("Ec2InstanceMetadata", MetadataOff)
        .build();
    CredentialsProviderChain::first_try("Environment", EnvironmentVariableCredentialsProvider::new())
        .or_else("Profile", profile)
        .or_else(
            "WebIdentityToken",
            WebIdentityTokenCredentialsProvider::builder().configure(config).build(),
        )
        .or_else(
            "EcsContainer",
            EcsCredentialsProvider::builder().configure(config).build(),
        )
}

/// Stands in for the metadata service where a profile names it as a credential source.
#[derive(Debug)]
struct MetadataOff;

impl ProvideCredentials for MetadataOff {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(Err(CredentialsError::invalid_configuration(
            "the AWS profile takes credentials from Ec2InstanceMetadata, but the instance metadata \
             service is off (imds = \"off\"); give credentials another way or turn it on",
        )))
    }
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
