//! Deterministic release archives: the same tree always gives the same bytes and so the same
//! sha256, whatever the checkout's mtimes, umask or directory order, and a build refuses
//! anything the agent's unpacker would refuse.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, System, ZipWriter};

use crate::digest::{Sha256, hash_file};
use crate::entry_path::{PathViolation, check_entry_path};
use crate::exclusions::{Exclusions, IGNORE_FILE, IgnoreFileError, LeftOut};
use crate::manifest::{Manifest, ManifestError, ManifestTexts};
pub use crate::tree::EntryKind;
use crate::tree::{TreeChecker, TreeViolation};

/// Deflate level used for every file: zlib's default, a good size/speed balance, and fixed so
/// the bytes never depend on the machine.
const DEFLATE_LEVEL: i64 = 6;

/// Write buffer for the archive file.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// Copy buffer for file contents.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Largest manifest file read into memory for validation.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// Mode stored for regular files without any executable bit.
const FILE_MODE: u32 = 0o644;

/// Mode stored for directories and for files with any executable bit.
const EXECUTABLE_MODE: u32 = 0o755;

/// Mode stored for symlinks (their permissions are ignored on Linux).
const SYMLINK_MODE: u32 = 0o777;

/// One entry to put in an archive, for callers that already hold the tree in memory (a Git
/// tree, a test). Directories implied by paths are added automatically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    /// Relative `/`-separated path, without a trailing `/`.
    pub path: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Unix permission bits; only "any executable bit" matters for files, ignored otherwise.
    pub mode: u32,
    /// File contents, or the target of a symlink; empty for directories.
    pub contents: Vec<u8>,
}

/// The archive that was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    /// Digest of the archive's bytes.
    pub sha256: Sha256,
    /// Size of the archive in bytes.
    pub size: u64,
    /// Number of entries (files, directories and symlinks) in the archive.
    pub entries: usize,
    /// What the tree held that the archive does not (see [`crate::exclusions`]), by path.
    pub left_out: Vec<LeftOut>,
}

/// Why an archive could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading the source tree failed.
    // Each I/O error below is part of its message and deliberately not `source()`, which would
    // print it twice in a chain (`{:#}`).
    #[error("read {path}: {error}")]
    ReadSource {
        /// The file or directory being read.
        path: PathBuf,
        /// The underlying I/O error.
        error: io::Error,
    },
    /// A file name in the source tree is not UTF-8.
    #[error("{path}: file names must be UTF-8")]
    ReadSourceName {
        /// The offending path.
        path: PathBuf,
    },
    /// The source tree holds a socket, FIFO or device, which an archive cannot carry.
    #[error("{path}: special files (sockets, FIFOs, devices) cannot be put in a release; remove it")]
    RefuseSpecialFile {
        /// The offending path.
        path: PathBuf,
    },
    /// An entry path breaks the archive path rules.
    #[error("entry {path:?}: {violation}")]
    ValidateEntryPath {
        /// The offending path.
        path: String,
        /// The rule it breaks.
        violation: PathViolation,
    },
    /// Entries clash with each other, or a symlink is absolute or leaves the tree.
    #[error("entry {path:?}: {reason}")]
    ValidateTree {
        /// The offending path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The bundle's manifest is invalid. The problem is part of the message and deliberately
    /// not `source()`: printed as a chain (`{:#}`), it would otherwise appear twice.
    #[error("invalid manifest: {0}")]
    ValidateManifest(ManifestError),
    /// A manifest file is not UTF-8 or is larger than 1 MiB.
    #[error("{path}: manifest files must be UTF-8 text of at most 1 MiB")]
    ReadManifest {
        /// The manifest file's archive path.
        path: String,
    },
    /// `.rollwaveignore` holds a pattern that is not valid gitignore syntax.
    #[error("{0}; fix the pattern (gitignore syntax)")]
    ParseIgnoreFile(IgnoreFileError),
    /// Writing the archive failed.
    #[error("write archive {path}: {error}")]
    WriteArchive {
        /// The archive being written (its temporary name).
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
}

impl From<ManifestError> for BuildError {
    fn from(error: ManifestError) -> Self {
        BuildError::ValidateManifest(error)
    }
}

/// Where an entry's contents come from.
enum Contents {
    Bytes(Vec<u8>),
    File(PathBuf),
    None,
}

/// An entry ready to be written.
struct PlannedEntry {
    path: String,
    kind: EntryKind,
    executable: bool,
    contents: Contents,
}

/// Builds an archive of the tree under `dir` into `out_file`, atomically (temporary file
/// beside it, then rename), leaving out what [`crate::exclusions`] says. `out_file` must not be
/// inside `dir`.
pub fn build_from_dir(dir: &Path, out_file: &Path) -> Result<BuildOutput, BuildError> {
    let ignore_path = dir.join(IGNORE_FILE);
    let ignore_text = match fs::symlink_metadata(&ignore_path) {
        Ok(metadata) if metadata.is_file() => {
            Some(
                fs::read_to_string(&ignore_path).map_err(|error| BuildError::ReadSource {
                    path: ignore_path.clone(),
                    error,
                })?,
            )
        }
        _ => None,
    };
    let exclusions = Exclusions::new(ignore_text.as_deref()).map_err(BuildError::ParseIgnoreFile)?;
    let mut entries = Vec::new();
    let mut left_out = Vec::new();
    walk(dir, "", &exclusions, &mut entries, &mut left_out)?;
    write_archive(entries, left_out, out_file)
}

/// Builds an archive from in-memory entries into `out_file`, atomically, leaving out what
/// [`crate::exclusions`] says (with the `.rollwaveignore` among the entries, if any).
pub fn build_from_entries(entries: Vec<SourceEntry>, out_file: &Path) -> Result<BuildOutput, BuildError> {
    let (entries, left_out) = leave_out(entries)?;
    let mut planned = Vec::with_capacity(entries.len());
    let mut explicit_dirs = std::collections::HashSet::new();
    for entry in &entries {
        if entry.kind == EntryKind::Directory {
            explicit_dirs.insert(entry.path.clone());
        }
    }
    let mut implied_dirs = std::collections::BTreeSet::new();
    for entry in entries {
        for (index, _) in entry.path.match_indices('/') {
            let ancestor = &entry.path[..index];
            // An empty ancestor comes from a bad path (`/x`), which validation reports itself.
            if !ancestor.is_empty() && !explicit_dirs.contains(ancestor) {
                implied_dirs.insert(ancestor.to_owned());
            }
        }
        let contents = match entry.kind {
            EntryKind::Directory => Contents::None,
            EntryKind::File | EntryKind::Symlink => Contents::Bytes(entry.contents),
        };
        planned.push(PlannedEntry {
            path: entry.path,
            kind: entry.kind,
            executable: entry.mode & 0o111 != 0,
            contents,
        });
    }
    planned.extend(implied_dirs.into_iter().map(|path| PlannedEntry {
        path,
        kind: EntryKind::Directory,
        executable: true,
        contents: Contents::None,
    }));
    write_archive(planned, left_out, out_file)
}

/// Splits in-memory entries into those kept and what is left out: an entry goes with the first
/// of its ancestor directories that is left out, as a walk would not descend into it.
fn leave_out(entries: Vec<SourceEntry>) -> Result<(Vec<SourceEntry>, Vec<LeftOut>), BuildError> {
    let ignore_text = entries
        .iter()
        .find(|entry| entry.path == IGNORE_FILE && entry.kind == EntryKind::File)
        .map(|entry| String::from_utf8_lossy(&entry.contents).into_owned());
    let exclusions = Exclusions::new(ignore_text.as_deref()).map_err(BuildError::ParseIgnoreFile)?;
    let mut left_out: std::collections::BTreeMap<String, LeftOut> = std::collections::BTreeMap::new();
    let mut kept = Vec::with_capacity(entries.len());
    'entries: for entry in entries {
        for (index, _) in entry.path.match_indices('/') {
            let ancestor = &entry.path[..index];
            if let Some(reason) = exclusions.reason_to_leave_out(ancestor, true) {
                left_out.entry(ancestor.to_owned()).or_insert(LeftOut {
                    path: ancestor.to_owned(),
                    is_dir: true,
                    reason,
                });
                continue 'entries;
            }
        }
        let is_dir = entry.kind == EntryKind::Directory;
        match exclusions.reason_to_leave_out(&entry.path, is_dir) {
            Some(reason) => {
                left_out.insert(
                    entry.path.clone(),
                    LeftOut {
                        path: entry.path,
                        is_dir,
                        reason,
                    },
                );
            }
            None => kept.push(entry),
        }
    }
    Ok((kept, left_out.into_values().collect()))
}

/// Collects the entries under `dir`, whose archive path is `prefix`, into `entries`, and what
/// `exclusions` leaves out into `left_out` (without descending into directories left out).
fn walk(
    dir: &Path,
    prefix: &str,
    exclusions: &Exclusions,
    entries: &mut Vec<PlannedEntry>,
    left_out: &mut Vec<LeftOut>,
) -> Result<(), BuildError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |error| BuildError::ReadSource { path, error }
    };
    for dir_entry in fs::read_dir(dir).map_err(read_error(dir))? {
        let dir_entry = dir_entry.map_err(read_error(dir))?;
        let source_path = dir_entry.path();
        let Some(name) = dir_entry.file_name().to_str().map(str::to_owned) else {
            return Err(BuildError::ReadSourceName { path: source_path });
        };
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let metadata = fs::symlink_metadata(&source_path).map_err(read_error(&source_path))?;
        let file_type = metadata.file_type();
        if let Some(reason) = exclusions.reason_to_leave_out(&path, file_type.is_dir()) {
            left_out.push(LeftOut {
                path,
                is_dir: file_type.is_dir(),
                reason,
            });
            continue;
        }
        if file_type.is_dir() {
            walk(&source_path, &path, exclusions, entries, left_out)?;
            entries.push(PlannedEntry {
                path,
                kind: EntryKind::Directory,
                executable: true,
                contents: Contents::None,
            });
        } else if file_type.is_file() {
            entries.push(PlannedEntry {
                path,
                kind: EntryKind::File,
                executable: metadata.permissions().mode() & 0o111 != 0,
                contents: Contents::File(source_path),
            });
        } else if file_type.is_symlink() {
            let target = fs::read_link(&source_path).map_err(read_error(&source_path))?;
            let Some(target) = target.to_str() else {
                return Err(BuildError::ReadSourceName { path: source_path });
            };
            entries.push(PlannedEntry {
                path,
                kind: EntryKind::Symlink,
                executable: false,
                contents: Contents::Bytes(target.as_bytes().to_vec()),
            });
        } else {
            // Sockets, FIFOs and devices: an archive cannot carry them and the agent refuses them.
            return Err(BuildError::RefuseSpecialFile { path: source_path });
        }
    }
    Ok(())
}

/// Sorts and validates `entries` (paths, tree rules, manifest), then writes the archive.
fn write_archive(
    mut entries: Vec<PlannedEntry>,
    mut left_out: Vec<LeftOut>,
    out_file: &Path,
) -> Result<BuildOutput, BuildError> {
    entries.sort_by(|left, right| left.path.as_bytes().cmp(right.path.as_bytes()));
    left_out.sort_by(|left, right| left.path.as_bytes().cmp(right.path.as_bytes()));
    validate(&entries)?;

    let temp_path = temporary_path(out_file);
    let result = write_temporary(&entries, &temp_path).and_then(|()| {
        let (sha256, size) = hash_file(&temp_path).map_err(|error| BuildError::WriteArchive {
            path: temp_path.clone(),
            error: io::Error::other(error.to_string()),
        })?;
        fs::rename(&temp_path, out_file).map_err(|error| BuildError::WriteArchive {
            path: out_file.to_owned(),
            error,
        })?;
        sync_parent(out_file)?;
        Ok(BuildOutput {
            sha256,
            size,
            entries: entries.len(),
            left_out,
        })
    });
    if result.is_err() {
        // Best effort: the temporary file is ours and useless after a failure.
        let _ = fs::remove_file(&temp_path);
    }
    result
}

fn validate(entries: &[PlannedEntry]) -> Result<(), BuildError> {
    let mut checker = TreeChecker::default();
    let mut regular_files = std::collections::BTreeSet::new();
    let mut manifest_texts: Vec<(String, String)> = Vec::new();
    for entry in entries {
        check_entry_path(&entry.path).map_err(|violation| BuildError::ValidateEntryPath {
            path: entry.path.clone(),
            violation,
        })?;
        checker.add(&entry.path, entry.kind).map_err(tree_error)?;
        match entry.kind {
            EntryKind::Symlink => {
                let target = match &entry.contents {
                    Contents::Bytes(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    Contents::File(_) | Contents::None => String::new(),
                };
                checker.add_link_target(&entry.path, &target);
            }
            EntryKind::File => {
                regular_files.insert(entry.path.clone());
                if ManifestTexts::is_manifest_path(&entry.path) {
                    manifest_texts.push((entry.path.clone(), read_manifest(entry)?));
                }
            }
            EntryKind::Directory => {}
        }
    }
    checker.finish().map_err(tree_error)?;
    let mut texts = ManifestTexts::default();
    for (path, text) in &manifest_texts {
        texts.offer(path, text);
    }
    Manifest::from_archive_files(&texts, &regular_files)?;
    Ok(())
}

fn read_manifest(entry: &PlannedEntry) -> Result<String, BuildError> {
    let refuse = || BuildError::ReadManifest {
        path: entry.path.clone(),
    };
    let bytes = match &entry.contents {
        Contents::Bytes(bytes) => bytes.clone(),
        Contents::File(source_path) => {
            let file = File::open(source_path).map_err(|error| BuildError::ReadSource {
                path: source_path.clone(),
                error,
            })?;
            let mut bytes = Vec::new();
            file.take(MAX_MANIFEST_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(|error| BuildError::ReadSource {
                    path: source_path.clone(),
                    error,
                })?;
            bytes
        }
        Contents::None => Vec::new(),
    };
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(refuse());
    }
    String::from_utf8(bytes).map_err(|_| refuse())
}

fn tree_error(violation: TreeViolation) -> BuildError {
    let (path, reason) = match violation {
        TreeViolation::Duplicate { path } => (path, "appears twice".to_owned()),
        TreeViolation::UnicodeTwin { path, other } => (
            path,
            format!("is the same name as {other:?} after Unicode normalisation"),
        ),
        TreeViolation::CaseTwin { path, other } => (path, format!("differs from {other:?} only by case")),
        TreeViolation::FileDirConflict { path, child } => {
            (path, format!("is not a directory but {child:?} is inside it"))
        }
        TreeViolation::InvalidLinkTarget { path, target } => (path, format!("symlink target {target:?} is invalid")),
        TreeViolation::AbsoluteLink { path, target } => (
            path,
            format!("symlink target {target:?} is absolute; only relative links inside the release are allowed"),
        ),
        TreeViolation::EscapingLink { path, target } => {
            (path, format!("symlink target {target:?} points outside the release"))
        }
        TreeViolation::LinkThroughLink { path, target, via } => (
            path,
            format!("symlink target {target:?} passes through the symlink {via:?}"),
        ),
    };
    BuildError::ValidateTree { path, reason }
}

/// `.<name>.partial-<pid>` beside `out_file`, so the rename stays on one filesystem.
fn temporary_path(out_file: &Path) -> PathBuf {
    let name = out_file
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "release.zip".to_owned());
    out_file.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn write_temporary(entries: &[PlannedEntry], temp_path: &Path) -> Result<(), BuildError> {
    let write_error = |error| BuildError::WriteArchive {
        path: temp_path.to_owned(),
        error,
    };
    let zip_error = |error: zip::result::ZipError| BuildError::WriteArchive {
        path: temp_path.to_owned(),
        error: io::Error::other(error.to_string()),
    };
    // A stale temporary file from a crashed build with our pid is replaced.
    let _ = fs::remove_file(temp_path);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp_path)
        .map_err(write_error)?;
    let mut zip = ZipWriter::new(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file));
    let base = SimpleFileOptions::default()
        .system(System::Unix)
        .last_modified_time(DateTime::default());
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    for entry in entries {
        match entry.kind {
            EntryKind::Directory => {
                zip.add_directory(format!("{}/", entry.path), base.unix_permissions(EXECUTABLE_MODE))
                    .map_err(zip_error)?;
            }
            EntryKind::Symlink => {
                let target = match &entry.contents {
                    Contents::Bytes(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    Contents::File(_) | Contents::None => String::new(),
                };
                zip.add_symlink(entry.path.as_str(), target, base.unix_permissions(SYMLINK_MODE))
                    .map_err(zip_error)?;
            }
            EntryKind::File => {
                let mode = if entry.executable { EXECUTABLE_MODE } else { FILE_MODE };
                let size = match &entry.contents {
                    Contents::Bytes(bytes) => bytes.len() as u64,
                    Contents::File(source_path) => fs::metadata(source_path)
                        .map_err(|error| BuildError::ReadSource {
                            path: source_path.clone(),
                            error,
                        })?
                        .len(),
                    Contents::None => 0,
                };
                let options = base
                    .compression_method(CompressionMethod::Deflated)
                    .compression_level(Some(DEFLATE_LEVEL))
                    .unix_permissions(mode)
                    .large_file(size >= u64::from(u32::MAX));
                zip.start_file(entry.path.as_str(), options).map_err(zip_error)?;
                match &entry.contents {
                    Contents::Bytes(bytes) => zip.write_all(bytes).map_err(write_error)?,
                    Contents::File(source_path) => {
                        copy_file(source_path, &mut zip, &mut buffer)?;
                    }
                    Contents::None => {}
                }
            }
        }
    }
    let mut writer = zip.finish().map_err(zip_error)?;
    writer.flush().map_err(write_error)?;
    let file = writer.into_inner().map_err(|error| write_error(error.into_error()))?;
    file.sync_all().map_err(write_error)?;
    Ok(())
}

fn copy_file(source_path: &Path, out: &mut impl Write, buffer: &mut [u8]) -> Result<(), BuildError> {
    let read_error = |error| BuildError::ReadSource {
        path: source_path.to_owned(),
        error,
    };
    let mut file = File::open(source_path).map_err(read_error)?;
    loop {
        let read = match file.read(buffer) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(read_error(error)),
        };
        out.write_all(&buffer[..read])
            .map_err(|error| BuildError::WriteArchive {
                path: source_path.to_owned(),
                error,
            })?;
    }
}

/// Makes the rename durable.
fn sync_parent(out_file: &Path) -> Result<(), BuildError> {
    let parent = match out_file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|error| BuildError::WriteArchive {
            path: parent.to_owned(),
            error,
        })
}

#[cfg(test)]
mod tests;
