//! The release archive format shared by the coordinator and the agents: bundle names, the
//! bundle manifest, deterministic building and safe unpacking of release zips.

pub mod build;
pub mod digest;
pub mod entry_path;
pub mod exclusions;
pub mod history;
pub mod manifest;
pub mod name;
mod tree;
pub mod unpack;

pub use build::{BuildError, BuildOutput, SourceEntry, build_from_dir, build_from_entries};
pub use digest::{DigestError, Sha256, Sha256Writer, hash_file};
pub use entry_path::PathViolation;
pub use exclusions::{IGNORE_FILE, LeftOut};
pub use manifest::{
    HealthCheck, Hook, LifecycleEvent, Manifest, ManifestError, ManifestSource, ManifestTexts, Service,
};
pub use name::{NameError, validate_bundle_name, validate_version};
pub use tree::EntryKind;
pub use unpack::{Limits, UnpackError, UnpackReport, unpack};
