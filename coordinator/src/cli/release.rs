//! `rollwave release`: build a deterministic archive (from a directory or a
//! Git tag or commit, offline), push it to S3 and register it with the
//! coordinator, and list or show what is registered.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use rollwave_artifacts::BucketVersioning;
use rollwave_proto::v1 as pb;
use rollwave_release::{BuildOutput, LeftOut};
use serde::Serialize;

use super::console::outln;
use super::git::Repository;
use super::output::{OutputFormat, ReleaseView, print_item, print_list};
use super::profile::{self, Environment, ProfileFlags, S3Flags};
use super::{call_error, operator_client};

const BUILD_HELP: &str = "\
Examples:
  rollwave release build ./site --out site-1.4.2.zip
  rollwave release build --git-ref v1.4.2 --out site-1.4.2.zip
  rollwave release build --git-ref 1a2b3c4 --repo ~/src/site \\
      --out site-1a2b3c4.zip

The same files always give the same bytes (and so the same sha256): entries
are sorted, timestamps and owners dropped, and only the executable bit kept.
Version-control directories (.git, .hg, .svn) are left out, and so is what a
.rollwaveignore at the root names (gitignore syntax, such as *.env or
/secrets/; a !pattern takes something back in); the build lists what it left
out.
A rollwave.toml or appspec.yml at the root is validated now, not at deploy
time. With --git-ref the files come from the commit's tree (not the working
copy): give a tag or a commit id; a branch is refused because it moves.
No coordinator is needed.";

const PUSH_HELP: &str = "\
Examples:
  rollwave release push site-1.4.2.zip --bundle site --version 1.4.2 \\
      --bucket my-releases
  ROLLWAVE_S3_BUCKET=my-releases rollwave release push chef.zip --bundle chef \\
      --version 7 --kind cookbook
  rollwave release push site.zip --bundle site --version 1.4.2 --bucket dev \\
      --s3-endpoint http://127.0.0.1:9000 --s3-path-style

The archive goes to s3://BUCKET/releases/BUNDLE/VERSION.zip and is then
registered with its sha256, size and S3 object version, so instances fetch
exactly these bytes. A version names one archive forever: pushing the same
file again changes nothing, and different content under a registered version
is refused before anything is uploaded.

The bucket must have versioning enabled, so the registered bytes cannot be
replaced under the same key; this is checked before anything is uploaded.
--allow-unversioned accepts an unversioned bucket and relies on the sha256
alone.

S3 settings: flags, else ROLLWAVE_S3_BUCKET, ROLLWAVE_S3_ENDPOINT,
ROLLWAVE_S3_REGION, ROLLWAVE_S3_PATH_STYLE, else the [s3] table of the
config file (bucket, endpoint, region, force_path_style). Credentials come
from the standard AWS chain (environment, profile, instance role).";

const SHOW_HELP: &str = "\
Examples:
  rollwave release show site 1.4.2
  rollwave release show site 1.4.2 --output json";

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Build a release archive from a directory or a Git tag or commit (offline)
    Build(BuildArgs),
    /// Upload an archive to S3 and register it with the coordinator
    Push(PushArgs),
    /// List registered releases, by bundle and push time
    #[command(after_help = "Examples:\n  rollwave release list\n  rollwave release list --bundle site --output json")]
    List {
        /// Only this bundle
        #[arg(long)]
        bundle: Option<String>,
    },
    /// Show one registered release: sha256, size, S3 location and object version
    #[command(after_help = SHOW_HELP)]
    Show {
        /// Bundle name
        bundle: String,
        /// Version
        version: String,
    },
}

#[derive(Debug, Args)]
#[command(after_help = BUILD_HELP)]
pub struct BuildArgs {
    /// Directory whose files make the release (or use --git-ref)
    #[arg(required_unless_present = "git_ref", conflicts_with = "git_ref")]
    pub dir: Option<PathBuf>,
    /// Build from this Git tag or (full or abbreviated) commit id instead of a directory
    #[arg(long, value_name = "REF")]
    pub git_ref: Option<String>,
    /// The Git repository for --git-ref
    #[arg(long, value_name = "DIR", requires = "git_ref", default_value = ".")]
    pub repo: PathBuf,
    /// Where to write the archive (replaced atomically)
    #[arg(long, value_name = "FILE.zip")]
    pub out: PathBuf,
}

/// What a bundle carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// The application itself
    App,
    /// Configuration-management code (cookbooks)
    Cookbook,
}

impl KindArg {
    fn as_str(self) -> &'static str {
        match self {
            KindArg::App => "app",
            KindArg::Cookbook => "cookbook",
        }
    }
}

#[derive(Debug, Args)]
#[command(after_help = PUSH_HELP)]
pub struct PushArgs {
    /// The archive, as written by `rollwave release build`
    #[arg(value_name = "FILE.zip")]
    pub file: PathBuf,
    /// Bundle name: 1 to 128 of A-Z a-z 0-9 . _ + -, starting with a letter or digit
    #[arg(long)]
    pub bundle: String,
    /// Version: same alphabet as bundle names, and not "current"
    #[arg(long)]
    pub version: String,
    /// What the bundle carries; fixed by its first release
    #[arg(long, value_enum, default_value = "app")]
    pub kind: KindArg,
    /// S3 bucket [env: ROLLWAVE_S3_BUCKET]
    #[arg(long)]
    pub bucket: Option<String>,
    /// Endpoint of an S3-compatible store, such as http://127.0.0.1:9000 [env: ROLLWAVE_S3_ENDPOINT]
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region [env: ROLLWAVE_S3_REGION]
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Address buckets as ENDPOINT/BUCKET (most S3-compatible stores) [env: ROLLWAVE_S3_PATH_STYLE]
    #[arg(long)]
    pub s3_path_style: bool,
    /// Accept a bucket without versioning; the release is then pinned by sha256 alone
    #[arg(long)]
    pub allow_unversioned: bool,
}

/// The JSON of `release build`.
#[derive(Debug, Serialize)]
struct BuildView {
    path: String,
    sha256: String,
    size: u64,
    entries: usize,
    /// The full commit id, for builds from Git.
    git_commit: Option<String>,
    /// The tag's full name, for builds from a Git tag.
    git_tag: Option<String>,
    /// What the tree held that the archive does not: version-control directories and what
    /// `.rollwaveignore` names.
    left_out: Vec<LeftOutView>,
}

/// An entry `release build` left out (with everything under it, for a directory).
#[derive(Debug, Serialize)]
struct LeftOutView {
    /// The path in the tree; a directory's ends with `/`.
    path: String,
    /// "version control", or ".rollwaveignore: PATTERN".
    reason: String,
}

/// The JSON of `release push`.
#[derive(Debug, Serialize)]
struct PushView {
    /// "registered" or "already_registered".
    status: &'static str,
    /// Whether this push uploaded the archive.
    uploaded: bool,
    release: ReleaseView,
}

/// Runs a `release` command. Only push, list and show dial the coordinator.
pub async fn run(
    command: ReleaseCommand,
    flags: &ProfileFlags,
    format: OutputFormat,
    env: &dyn Environment,
) -> anyhow::Result<()> {
    match command {
        ReleaseCommand::Build(args) => build(args, format),
        ReleaseCommand::Push(args) => push(args, flags, format, env).await,
        ReleaseCommand::List { bundle } => {
            let mut client = operator_client(&profile::resolve(flags, env)?).await?;
            let releases = client
                .list_releases(pb::ListReleasesRequest {
                    bundle: bundle.unwrap_or_default(),
                })
                .await
                .map_err(call_error)?
                .into_inner()
                .releases;
            print_list(format, &releases.into_iter().map(ReleaseView::from).collect::<Vec<_>>())
        }
        ReleaseCommand::Show { bundle, version } => {
            let mut client = operator_client(&profile::resolve(flags, env)?).await?;
            let release = client
                .get_release(pb::GetReleaseRequest { bundle, version })
                .await
                .map_err(call_error)?
                .into_inner();
            print_item(format, &ReleaseView::from(release))
        }
    }
}

fn build(args: BuildArgs, format: OutputFormat) -> anyhow::Result<()> {
    let (output, git_commit, git_tag) = match (&args.dir, &args.git_ref) {
        (Some(dir), None) => {
            refuse_output_inside(dir, &args.out)?;
            let output = rollwave_release::build_from_dir(dir, &args.out)
                .with_context(|| format!("build a release from {}", dir.display()))?;
            (output, None, None)
        }
        (None, Some(reference)) => {
            let repository = Repository::new(&args.repo);
            let resolved = repository.resolve(reference)?;
            let entries = repository.tree_entries(&resolved.commit)?;
            let output = rollwave_release::build_from_entries(entries, &args.out).with_context(|| {
                format!(
                    "build a release from {reference} (commit {}) in {}",
                    resolved.commit,
                    args.repo.display()
                )
            })?;
            (output, Some(resolved.commit), resolved.tag)
        }
        _ => unreachable!("clap requires exactly one of DIR and --git-ref"),
    };
    print_build(format, &args.out, &output, git_commit, git_tag)
}

fn print_build(
    format: OutputFormat,
    out: &Path,
    output: &BuildOutput,
    git_commit: Option<String>,
    git_tag: Option<String>,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => {
            let view = BuildView {
                path: out.display().to_string(),
                sha256: output.sha256.to_hex(),
                size: output.size,
                entries: output.entries,
                git_commit,
                git_tag,
                left_out: output
                    .left_out
                    .iter()
                    .map(|left| LeftOutView {
                        path: left_out_path(left),
                        reason: left.reason.clone(),
                    })
                    .collect(),
            };
            outln!("{}", serde_json::to_string_pretty(&view)?)?;
        }
        OutputFormat::Table => {
            let from = match (&git_tag, &git_commit) {
                (Some(tag), Some(commit)) => format!(" from {tag} (commit {commit})"),
                (None, Some(commit)) => format!(" from commit {commit}"),
                _ => String::new(),
            };
            let plural = if output.entries == 1 { "entry" } else { "entries" };
            outln!(
                "built {}{from}: {} {plural}, {} bytes\nsha256 {}",
                out.display(),
                output.entries,
                output.size,
                output.sha256
            )?;
            if !output.left_out.is_empty() {
                let width = output
                    .left_out
                    .iter()
                    .map(|left| left_out_path(left).len())
                    .max()
                    .unwrap_or(0);
                outln!("left out (not in the archive):")?;
                for left in &output.left_out {
                    outln!("  {:<width$}  {}", left_out_path(left), left.reason)?;
                }
            }
        }
    }
    Ok(())
}

/// A left-out path as shown: a directory's with a trailing `/`.
fn left_out_path(left: &LeftOut) -> String {
    if left.is_dir {
        format!("{}/", left.path)
    } else {
        left.path.clone()
    }
}

/// An archive written inside the directory it archives would end up in the next build.
fn refuse_output_inside(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("release directory {}", dir.display()))?;
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let parent = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let parent = parent
        .canonicalize()
        .with_context(|| format!("directory of --out {}", out.display()))?;
    anyhow::ensure!(
        !parent.starts_with(&dir),
        "--out {} is inside {}: the archive would be part of its next build; write it elsewhere",
        out.display(),
        dir.display()
    );
    Ok(())
}

/// `releases/<bundle>/<version>.zip`: one key per version, so a version's
/// object history is its push history.
fn object_key(bundle: &str, version: &str) -> String {
    format!("releases/{bundle}/{version}.zip")
}

async fn push(args: PushArgs, flags: &ProfileFlags, format: OutputFormat, env: &dyn Environment) -> anyhow::Result<()> {
    rollwave_release::validate_bundle_name(&args.bundle)?;
    rollwave_release::validate_version(&args.version)?;
    let name = format!("{}@{}", args.bundle, args.version);
    let (sha256, size) = rollwave_release::hash_file(&args.file)?;
    let s3_flags = S3Flags {
        bucket: args.bucket.clone(),
        endpoint: args.s3_endpoint.clone(),
        region: args.s3_region.clone(),
        path_style: args.s3_path_style,
    };
    let target = profile::resolve_s3(flags, &s3_flags, env)?;
    let key = object_key(&args.bundle, &args.version);
    let mut client = operator_client(&profile::resolve(flags, env)?).await?;

    // Ask before uploading: a repeat is a no-op, a conflict must not touch the bucket.
    let registered = match client
        .get_release(pb::GetReleaseRequest {
            bundle: args.bundle.clone(),
            version: args.version.clone(),
        })
        .await
    {
        Ok(response) => Some(response.into_inner()),
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => return Err(call_error(status)),
    };
    if let Some(registered) = registered {
        if registered.sha256 == sha256.to_hex() && registered.size == size {
            return print_push(format, &name, "already_registered", false, registered);
        }
        anyhow::bail!(
            "release {name} is already registered with sha256 {} ({} bytes); {} has sha256 {sha256} ({size} bytes): \
             a version names one archive forever, so push this archive as a new version; nothing was uploaded",
            registered.sha256,
            registered.size,
            args.file.display()
        );
    }
    check_bundle_kind(&mut client, &args.bundle, args.kind).await?;

    let s3 = rollwave_artifacts::client(&target.settings, rollwave_artifacts::InstanceMetadata::Allowed).await;
    // Asked before uploading, so a refused push leaves the bucket untouched.
    if !args.allow_unversioned {
        let versioning = rollwave_artifacts::bucket_versioning(&s3, &target.bucket).await?;
        if versioning != BucketVersioning::Enabled {
            let state = match versioning {
                BucketVersioning::Suspended => "has versioning suspended",
                _ => "does not keep object versions",
            };
            anyhow::bail!(
                "release {name} was NOT pushed: bucket {bucket} {state}, so anyone could later replace the archive \
                 under the same key and instances could not be pinned to these bytes; nothing was uploaded. \
                 {ENABLE_VERSIONING}",
                bucket = target.bucket,
                ENABLE_VERSIONING = enable_versioning(&target.bucket)
            );
        }
    }
    let uploaded = rollwave_artifacts::upload(&s3, &target.bucket, &key, &args.file, &sha256.to_hex()).await?;
    if uploaded.version_id.is_none() && !args.allow_unversioned {
        // The bucket said it keeps versions, yet the upload got none (a store that ignores versioning).
        anyhow::bail!(
            "release {name} was NOT registered: s3://{bucket}/{key} was uploaded, but the store assigned it no \
             object version although bucket {bucket} reports versioning enabled. {}",
            enable_versioning(&target.bucket),
            bucket = target.bucket
        );
    }
    let registration = client
        .register_release(pb::RegisterReleaseRequest {
            bundle: args.bundle.clone(),
            kind: args.kind.as_str().to_owned(),
            version: args.version.clone(),
            bucket: target.bucket.clone(),
            key,
            object_version: uploaded.version_id,
            sha256: sha256.to_hex(),
            size,
        })
        .await
        .map_err(call_error)?
        .into_inner();
    let release = registration
        .release
        .context("the coordinator's answer to RegisterRelease has no release")?;
    let status = if registration.already_registered {
        "already_registered"
    } else {
        "registered"
    };
    print_push(format, &name, status, true, release)
}

/// The way out of a refusal for want of versioning.
fn enable_versioning(bucket: &str) -> String {
    format!(
        "Enable versioning on the bucket (for example `aws s3api put-bucket-versioning --bucket {bucket} \
         --versioning-configuration Status=Enabled`) and push again, or pass --allow-unversioned to rely on the \
         sha256 alone"
    )
}

/// Refuses, before anything is uploaded, a kind other than the bundle's.
async fn check_bundle_kind(client: &mut super::OperatorClient, bundle: &str, kind: KindArg) -> anyhow::Result<()> {
    let releases = client
        .list_releases(pb::ListReleasesRequest {
            bundle: bundle.to_owned(),
        })
        .await
        .map_err(call_error)?
        .into_inner()
        .releases;
    if let Some(existing) = releases.first()
        && existing.kind != kind.as_str()
    {
        anyhow::bail!(
            "bundle {bundle:?} has kind {}, not {}: a bundle's kind is fixed by its first release; \
             push with --kind {}, or use another bundle name; nothing was uploaded",
            existing.kind,
            kind.as_str(),
            existing.kind
        );
    }
    Ok(())
}

fn print_push(
    format: OutputFormat,
    name: &str,
    status: &'static str,
    uploaded: bool,
    release: pb::Release,
) -> anyhow::Result<()> {
    let release = ReleaseView::from(release);
    match format {
        OutputFormat::Json => {
            let view = PushView {
                status,
                uploaded,
                release,
            };
            outln!("{}", serde_json::to_string_pretty(&view)?)?;
        }
        OutputFormat::Table => {
            let location = match &release.object_version {
                Some(version) => format!("s3://{}/{} (object version {version})", release.bucket, release.key),
                None => format!("s3://{}/{} (unversioned bucket)", release.bucket, release.key),
            };
            if status == "registered" {
                outln!(
                    "registered {name}: {location}, sha256 {}, {} bytes",
                    release.sha256,
                    release.size
                )?;
            } else {
                let upload_note = if uploaded { "" } else { "; nothing uploaded" };
                outln!(
                    "{name} is already registered with the same content (sha256 {}) at {location}{upload_note}",
                    release.sha256
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_object_key_per_version() {
        assert_eq!(object_key("site", "1.4.2+g1a2b"), "releases/site/1.4.2+g1a2b.zip");
    }

    #[test]
    fn the_archive_is_never_written_into_its_own_source() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = dir.path().join("site");
        std::fs::create_dir_all(source.join("sub")).expect("mkdir");
        let inside = refuse_output_inside(&source, &source.join("sub/out.zip")).expect_err("inside");
        assert!(inside.to_string().contains("is inside"), "{inside}");
        refuse_output_inside(&source, &dir.path().join("out.zip")).expect("beside is fine");
    }
}
