//! Where release archives live: S3 (or any S3-compatible store). Uploads are
//! pinned by the object version the store assigns; downloads are pinned by
//! that version, hashed while streaming, cut off at the registered size, and
//! resumed with range requests after an interruption.

mod download;
mod s3;

pub use download::{DownloadError, DownloadOptions, PinnedObject, download_verified};
pub use s3::{
    BucketVersioning, DEFAULT_REGION, InstanceMetadata, S3Settings, UploadError, Uploaded, VersioningError,
    bucket_versioning, client, upload,
};
