//! The safe extractor for release archives from S3: the zip crate only parses; this module
//! decides what may be created and creates it itself, inside a fresh staging directory, so a
//! hostile or broken archive can never write outside it, exhaust the disk or kill the agent.

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use zip::{CompressionMethod, System, ZipArchive, ZipReadOptions};

use crate::entry_path::{MAX_PATH_BYTES, PathViolation, check_entry_path};
use crate::tree::{EntryKind, TreeChecker, TreeViolation};

/// Copy buffer between the decompressor and the output file.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Read buffer over the archive file.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// Written files waiting for the fsync thread; bounds open descriptors.
const SYNC_QUEUE_FILES: usize = 256;

/// Threads fsyncing written files at once (see [`sync_files`]).
const SYNC_THREADS: usize = 8;

/// Mode for files without the owner executable bit.
const FILE_MODE: u32 = 0o644;

/// Mode for directories and files with the owner executable bit.
const EXECUTABLE_MODE: u32 = 0o755;

/// Unix file type bits in a mode.
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

/// Central directory file header signature.
const CENTRAL_HEADER_SIGNATURE: u32 = 0x0201_4b50;

/// Size of the fixed part of a central directory file header.
const CENTRAL_HEADER_BYTES: usize = 46;

/// Budgets that bound what one archive may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries an archive may have.
    pub max_entries: usize,
    /// Most bytes written in total, counted as written (headers are never trusted).
    pub max_total_bytes: u64,
    /// Most bytes an entry may expand to per byte of its compressed size. The compressed size
    /// is the one declared in the central directory, which bounds what the decompressor can
    /// read, so the check holds even when the header lies; output is counted as written.
    pub max_ratio: u64,
    /// Output of an entry below which the ratio is not enforced (small files compress well).
    pub ratio_grace_bytes: u64,
}

impl Default for Limits {
    /// 100 000 entries, 4 GiB written, 200:1 per entry after its first 1 MiB.
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_total_bytes: 4 * 1024 * 1024 * 1024,
            max_ratio: 200,
            ratio_grace_bytes: 1024 * 1024,
        }
    }
}

/// What an unpack produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackReport {
    /// Entries in the archive (files, directories and symlinks).
    pub entries: usize,
    /// Bytes written: file contents plus symlink targets.
    pub bytes_written: u64,
}

/// Why an archive was refused or could not be unpacked. The staging directory is gone.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The archive file could not be opened or read.
    #[error("open archive {path}: {source}")]
    OpenArchive {
        /// The archive.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The staging directory could not be created (it must not exist; its parent must).
    #[error("create staging directory {path}: {source}")]
    CreateStaging {
        /// The staging directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The zip structure (end of central directory, central directory) is invalid.
    #[error("parse archive {path}: {reason}")]
    ParseArchive {
        /// The archive.
        path: PathBuf,
        /// The parser's description.
        reason: String,
    },
    /// The zip parser panicked; the archive is certainly malformed.
    #[error("parse archive {path}: the zip parser crashed ({message}); the archive is malformed")]
    ParserPanic {
        /// The archive.
        path: PathBuf,
        /// The panic message.
        message: String,
    },
    /// More entries than [`Limits::max_entries`].
    #[error("archive has {count} entries, more than the limit of {limit}")]
    TooManyEntries {
        /// Entries in the archive.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// An entry name is not UTF-8.
    #[error("entry {entry:?}: names must be UTF-8")]
    NonUtf8Name {
        /// The name, lossily decoded.
        entry: String,
    },
    /// An entry name is empty.
    #[error("entry {entry:?}: the name is empty")]
    EmptyName {
        /// The name.
        entry: String,
    },
    /// An entry name has a `..` component.
    #[error("entry {entry:?}: `..` components are not allowed")]
    ParentDirectory {
        /// The name.
        entry: String,
    },
    /// An entry name is absolute.
    #[error("entry {entry:?}: absolute paths are not allowed")]
    AbsolutePath {
        /// The name.
        entry: String,
    },
    /// An entry name contains a backslash.
    #[error("entry {entry:?}: backslashes are not allowed")]
    Backslash {
        /// The name.
        entry: String,
    },
    /// An entry name starts with a drive letter.
    #[error("entry {entry:?}: drive letters are not allowed")]
    DriveLetter {
        /// The name.
        entry: String,
    },
    /// An entry name has an empty component (`a//b`).
    #[error("entry {entry:?}: empty path components are not allowed")]
    EmptyComponent {
        /// The name.
        entry: String,
    },
    /// An entry name has a `.` component.
    #[error("entry {entry:?}: `.` components are not allowed")]
    DotComponent {
        /// The name.
        entry: String,
    },
    /// An entry name contains NUL.
    #[error("entry {entry:?}: NUL bytes are not allowed in names")]
    NulByte {
        /// The name.
        entry: String,
    },
    /// An entry name contains a control character.
    #[error("entry {entry:?}: control characters are not allowed in names")]
    ControlCharacter {
        /// The name.
        entry: String,
    },
    /// An entry name is longer than 4096 bytes.
    #[error("entry {entry:?}: the path is longer than 4096 bytes")]
    PathTooLong {
        /// The name.
        entry: String,
    },
    /// An entry name has a component longer than 255 bytes.
    #[error("entry {entry:?}: a path component is longer than 255 bytes")]
    ComponentTooLong {
        /// The name.
        entry: String,
    },
    /// An entry name is deeper than 64 components.
    #[error("entry {entry:?}: the path is deeper than 64 components")]
    PathTooDeep {
        /// The name.
        entry: String,
    },
    /// An entry name ends with `/` but its mode says it is not a directory.
    #[error("entry {entry:?}: the name ends with / but the mode {mode:o} is not a directory's")]
    KindMismatch {
        /// The name.
        entry: String,
        /// The unix mode.
        mode: u32,
    },
    /// An entry is a device, FIFO or socket.
    #[error("entry {entry:?}: special files (mode {mode:o}) are not allowed")]
    SpecialFile {
        /// The name.
        entry: String,
        /// The unix mode.
        mode: u32,
    },
    /// Two entries have the same name.
    #[error("entry {entry:?}: appears more than once")]
    DuplicateName {
        /// The name.
        entry: String,
    },
    /// Two names differ only by case.
    #[error("entry {entry:?}: differs from {other:?} only by case")]
    CaseTwin {
        /// The name.
        entry: String,
        /// The earlier name it collides with.
        other: String,
    },
    /// Two names are the same after Unicode NFC normalisation.
    #[error("entry {entry:?}: is the same name as {other:?} after Unicode normalisation")]
    UnicodeTwin {
        /// The name.
        entry: String,
        /// The earlier name it collides with.
        other: String,
    },
    /// A non-directory is also used as a directory.
    #[error("entry {entry:?}: is not a directory but {child:?} is inside it")]
    FileDirConflict {
        /// The non-directory entry.
        entry: String,
        /// An entry under it.
        child: String,
    },
    /// A symlink target is empty, longer than 4096 bytes or has NUL or control characters.
    #[error("entry {entry:?}: symlink target {target:?} is invalid")]
    InvalidSymlinkTarget {
        /// The symlink.
        entry: String,
        /// Its target (lossily decoded).
        target: String,
    },
    /// A symlink target is absolute.
    #[error("entry {entry:?}: symlink target {target:?} is absolute")]
    AbsoluteSymlink {
        /// The symlink.
        entry: String,
        /// Its target.
        target: String,
    },
    /// A symlink resolves outside the release.
    #[error("entry {entry:?}: symlink target {target:?} points outside the release")]
    EscapingSymlink {
        /// The symlink.
        entry: String,
        /// Its target.
        target: String,
    },
    /// A symlink target passes through another symlink.
    #[error("entry {entry:?}: symlink target {target:?} passes through the symlink {via:?}")]
    LinkThroughLink {
        /// The symlink.
        entry: String,
        /// Its target.
        target: String,
        /// The symlink it passes through.
        via: String,
    },
    /// An entry is encrypted.
    #[error("entry {entry:?}: encrypted entries are not supported")]
    Encrypted {
        /// The name.
        entry: String,
    },
    /// An entry uses a compression method other than stored or deflate.
    #[error("entry {entry:?}: compression method {method} is not supported (use stored or deflate)")]
    UnsupportedCompression {
        /// The name.
        entry: String,
        /// The method.
        method: String,
    },
    /// The local header disagrees with the central directory.
    #[error("entry {entry:?}: local header does not match the central directory ({reason})")]
    HeaderMismatch {
        /// The name.
        entry: String,
        /// What differs.
        reason: String,
    },
    /// The entry's data does not match its CRC-32.
    #[error("entry {entry:?}: crc-32 mismatch; the archive is corrupt")]
    CrcMismatch {
        /// The name.
        entry: String,
    },
    /// The entry's data ends before its declared size.
    #[error("entry {entry:?}: the archive is truncated")]
    Truncated {
        /// The name.
        entry: String,
    },
    /// The entry's data is longer or shorter than its declared size.
    #[error("entry {entry:?}: declared {declared} bytes but holds {actual_description}")]
    SizeMismatch {
        /// The name.
        entry: String,
        /// The declared uncompressed size.
        declared: u64,
        /// What was found, such as "12 bytes" or "more".
        actual_description: String,
    },
    /// The entry expands more than [`Limits::max_ratio`] times its compressed size.
    #[error("entry {entry:?}: expands more than {limit}:1 (compressed {compressed} bytes); refusing a likely zip bomb")]
    RatioExceeded {
        /// The name.
        entry: String,
        /// Compressed size.
        compressed: u64,
        /// The ratio limit.
        limit: u64,
    },
    /// Writing the entry would exceed [`Limits::max_total_bytes`].
    #[error("entry {entry:?}: the archive expands to more than {limit} bytes")]
    TotalBytesExceeded {
        /// The entry being written.
        entry: String,
        /// The limit.
        limit: u64,
    },
    /// Decompressing the entry failed for another reason (corrupt deflate stream).
    #[error("entry {entry:?}: read failed: {reason}")]
    ReadEntry {
        /// The name.
        entry: String,
        /// The parser's description.
        reason: String,
    },
    /// Creating or writing the entry on disk failed (disk full, permissions).
    #[error("entry {entry:?}: write {path}: {source}")]
    WriteEntry {
        /// The name.
        entry: String,
        /// The file being written.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The fsync thread stopped early; replaced by its own error before reaching callers.
    #[error("the fsync thread stopped")]
    SyncQueueClosed,
    /// Making the unpacked tree durable failed.
    #[error("sync {path}: {source}")]
    Sync {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
}

/// An entry that passed the metadata checks.
struct PlannedEntry {
    index: usize,
    path: String,
    kind: EntryKind,
    executable: bool,
    target: Option<String>,
}

/// Unpacks `archive_path` into `staging_dir`, which must not exist yet (its parent must).
///
/// Every entry is checked before anything is written; files are then created with
/// `O_CREAT|O_EXCL` inside directories this call created, symlinks last, and everything is
/// fsynced before returning. On error `staging_dir` is removed; nothing is ever created
/// outside it.
pub fn unpack(archive_path: &Path, staging_dir: &Path, limits: Limits) -> Result<UnpackReport, UnpackError> {
    let file = File::open(archive_path).map_err(|source| UnpackError::OpenArchive {
        path: archive_path.to_owned(),
        source,
    })?;
    DirBuilder::new()
        .mode(0o700)
        .create(staging_dir)
        .map_err(|source| UnpackError::CreateStaging {
            path: staging_dir.to_owned(),
            source,
        })?;
    let (sync_queue, sync_receiver) = mpsc::sync_channel::<(File, PathBuf)>(SYNC_QUEUE_FILES);
    let sync_receiver = std::sync::Mutex::new(sync_receiver);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        std::thread::scope(|scope| {
            // Files are fsynced on a second thread while the next ones are decompressed, so
            // waiting for the disk overlaps with CPU work instead of adding to it.
            let mut syncers = Vec::with_capacity(SYNC_THREADS);
            for index in 0..SYNC_THREADS {
                let receiver = &sync_receiver;
                let syncer = std::thread::Builder::new()
                    .name(format!("unpack-fsync-{index}"))
                    .spawn_scoped(scope, move || sync_files(receiver))
                    .map_err(|source| UnpackError::Sync {
                        path: staging_dir.to_owned(),
                        source,
                    })?;
                syncers.push(syncer);
            }
            let unpacked = Unpacker {
                archive_path,
                staging_dir,
                limits,
                buffer: vec![0u8; COPY_BUFFER_BYTES],
                created_dirs: HashSet::new(),
                bytes_written: 0,
                sync_queue,
            }
            .run(file);
            let mut synced = Ok(());
            for syncer in syncers {
                let result = syncer.join().unwrap_or_else(|panic| {
                    Err(UnpackError::Sync {
                        path: staging_dir.to_owned(),
                        source: io::Error::other(panic_message(panic.as_ref())),
                    })
                });
                if synced.is_ok() {
                    synced = result;
                }
            }
            match (unpacked, synced) {
                // The syncer's own error explains why the queue was closed.
                (Err(UnpackError::SyncQueueClosed), Err(sync_error)) => Err(sync_error),
                (Err(error), _) => Err(error),
                (Ok(_), Err(sync_error)) => Err(sync_error),
                (Ok(report), Ok(())) => Ok(report),
            }
        })
    }));
    let result = match outcome {
        Ok(result) => result,
        Err(panic) => Err(UnpackError::ParserPanic {
            path: archive_path.to_owned(),
            message: panic_message(panic.as_ref()),
        }),
    };
    if result.is_err() {
        // Best effort: the directory is ours, and remove_dir_all never follows symlinks.
        let _ = fs::remove_dir_all(staging_dir);
    }
    result
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "unknown panic".to_owned()
    }
}

struct Unpacker<'a> {
    archive_path: &'a Path,
    staging_dir: &'a Path,
    limits: Limits,
    buffer: Vec<u8>,
    /// Directories created so far, as archive paths.
    created_dirs: HashSet<String>,
    bytes_written: u64,
    /// Written files, handed to the fsync thread.
    sync_queue: mpsc::SyncSender<(File, PathBuf)>,
}

impl Unpacker<'_> {
    fn run(mut self, file: File) -> Result<UnpackReport, UnpackError> {
        let archive_len = file
            .metadata()
            .map_err(|source| UnpackError::OpenArchive {
                path: self.archive_path.to_owned(),
                source,
            })?
            .len();
        let reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
        let mut archive = ZipArchive::new(reader).map_err(|error| UnpackError::ParseArchive {
            path: self.archive_path.to_owned(),
            reason: error.to_string(),
        })?;
        if archive.len() > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                count: archive.len(),
                limit: self.limits.max_entries,
            });
        }
        if archive.has_duplicate_names() {
            let central_start = archive.central_directory_start();
            let entry = first_duplicate_name(archive.into_inner(), central_start, self.limits.max_entries)
                .unwrap_or_else(|| "(unknown)".to_owned());
            return Err(UnpackError::DuplicateName { entry });
        }

        let mut plan = plan_entries(&archive, self.archive_path)?;
        let mut checker = TreeChecker::default();
        for entry in &plan {
            checker.add(&entry.path, entry.kind).map_err(tree_error)?;
        }
        for entry in plan.iter_mut().filter(|entry| entry.kind == EntryKind::Symlink) {
            let target = self.read_link_target(&mut archive, entry, archive_len)?;
            checker.add_link_target(&entry.path, &target);
            entry.target = Some(target);
        }
        checker.finish().map_err(tree_error)?;

        for entry in &plan {
            match entry.kind {
                EntryKind::Directory => self.create_dirs(&entry.path, &entry.path)?,
                EntryKind::File => self.write_file(&mut archive, entry, archive_len)?,
                EntryKind::Symlink => {}
            }
        }
        // Links last: no file is ever written after a link exists (defence in depth; the tree
        // rules already forbid entries under a link).
        for entry in &plan {
            if let (EntryKind::Symlink, Some(target)) = (entry.kind, &entry.target) {
                self.create_symlink(&entry.path, target)?;
            }
        }
        self.sync_dirs()?;
        Ok(UnpackReport {
            entries: plan.len(),
            bytes_written: self.bytes_written,
        })
    }

    /// Opens an entry for reading, checking its local header and that its data is all there.
    fn open_entry<'z, R: Read + Seek>(
        archive: &'z mut ZipArchive<R>,
        entry: &PlannedEntry,
        archive_len: u64,
    ) -> Result<zip::read::ZipFile<'z, R>, UnpackError> {
        let options = ZipReadOptions::new().enforce_header_consistency(true);
        let zip_file = archive
            .by_index_with_options(entry.index, options)
            .map_err(|error| open_entry_error(&entry.path, error))?;
        let data_end = zip_file
            .data_start()
            .map(|start| start.saturating_add(zip_file.compressed_size()));
        if data_end.is_none_or(|end| end > archive_len) {
            return Err(UnpackError::Truncated {
                entry: entry.path.clone(),
            });
        }
        Ok(zip_file)
    }

    fn read_link_target<R: Read + Seek>(
        &mut self,
        archive: &mut ZipArchive<R>,
        entry: &PlannedEntry,
        archive_len: u64,
    ) -> Result<String, UnpackError> {
        let mut zip_file = Self::open_entry(archive, entry, archive_len)?;
        let mut target = [0u8; MAX_PATH_BYTES + 1];
        let declared = zip_file.size();
        let length = fill(&mut zip_file, &mut target, &entry.path, declared)?;
        let invalid = || UnpackError::InvalidSymlinkTarget {
            entry: entry.path.clone(),
            target: String::from_utf8_lossy(&target[..length.min(64)]).into_owned(),
        };
        if length > MAX_PATH_BYTES {
            return Err(invalid());
        }
        // A target shorter than the buffer was read to its end, so its CRC was checked.
        if length as u64 != declared {
            return Err(size_mismatch(&entry.path, declared, length as u64));
        }
        std::str::from_utf8(&target[..length])
            .map(str::to_owned)
            .map_err(|_| invalid())
    }

    fn write_file<R: Read + Seek>(
        &mut self,
        archive: &mut ZipArchive<R>,
        entry: &PlannedEntry,
        archive_len: u64,
    ) -> Result<(), UnpackError> {
        if let Some((parent, _)) = entry.path.rsplit_once('/') {
            self.create_dirs(parent, &entry.path)?;
        }
        let mut zip_file = Self::open_entry(archive, entry, archive_len)?;
        let declared = zip_file.size();
        let compressed = zip_file.compressed_size();
        let full_path = self.staging_dir.join(&entry.path);
        let write_error = |source| UnpackError::WriteEntry {
            entry: entry.path.clone(),
            path: full_path.clone(),
            source,
        };
        // O_CREAT|O_EXCL: never opens an existing file and never follows a symlink.
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&full_path)
            .map_err(write_error)?;
        let ratio_limit = compressed.saturating_mul(self.limits.max_ratio);
        let mut written = 0u64;
        loop {
            let filled = fill(&mut zip_file, &mut self.buffer, &entry.path, declared)?;
            if filled == 0 {
                break;
            }
            let after = written + filled as u64;
            if self.bytes_written + after > self.limits.max_total_bytes {
                return Err(UnpackError::TotalBytesExceeded {
                    entry: entry.path.clone(),
                    limit: self.limits.max_total_bytes,
                });
            }
            if after > self.limits.ratio_grace_bytes && after > ratio_limit {
                return Err(UnpackError::RatioExceeded {
                    entry: entry.path.clone(),
                    compressed,
                    limit: self.limits.max_ratio,
                });
            }
            out.write_all(&self.buffer[..filled]).map_err(write_error)?;
            written = after;
        }
        if written != declared {
            return Err(size_mismatch(&entry.path, declared, written));
        }
        self.bytes_written += written;
        let mode = if entry.executable { EXECUTABLE_MODE } else { FILE_MODE };
        // fchmod on the descriptor: exact mode whatever the umask, no path lookup.
        out.set_permissions(Permissions::from_mode(mode)).map_err(write_error)?;
        self.sync_queue
            .send((out, full_path))
            .map_err(|_| UnpackError::SyncQueueClosed)?;
        Ok(())
    }

    /// Creates `dir` and its missing ancestors (archive paths), each checked to be a real
    /// directory this call created.
    fn create_dirs(&mut self, dir: &str, entry: &str) -> Result<(), UnpackError> {
        if self.created_dirs.contains(dir) {
            return Ok(());
        }
        let mut end = 0;
        for component in dir.split('/') {
            end += component.len();
            let prefix = &dir[..end];
            end += 1;
            if self.created_dirs.contains(prefix) {
                continue;
            }
            let full_path = self.staging_dir.join(prefix);
            let write_error = |source| UnpackError::WriteEntry {
                entry: entry.to_owned(),
                path: full_path.clone(),
                source,
            };
            DirBuilder::new().mode(0o700).create(&full_path).map_err(write_error)?;
            let metadata = fs::symlink_metadata(&full_path).map_err(write_error)?;
            if !metadata.file_type().is_dir() {
                return Err(write_error(io::Error::other("created directory is not a directory")));
            }
            self.created_dirs.insert(prefix.to_owned());
        }
        Ok(())
    }

    fn create_symlink(&mut self, path: &str, target: &str) -> Result<(), UnpackError> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.create_dirs(parent, path)?;
        }
        let full_path = self.staging_dir.join(path);
        std::os::unix::fs::symlink(target, &full_path).map_err(|source| UnpackError::WriteEntry {
            entry: path.to_owned(),
            path: full_path.clone(),
            source,
        })?;
        self.bytes_written += target.len() as u64;
        Ok(())
    }

    /// Sets every directory to 0755 and fsyncs it, deepest first, then the staging directory,
    /// so directory entries for files and links are durable before the caller renames.
    fn sync_dirs(&mut self) -> Result<(), UnpackError> {
        let mut dirs: Vec<&String> = self.created_dirs.iter().collect();
        dirs.sort_by_key(|dir| std::cmp::Reverse(dir.matches('/').count()));
        let staging = self.staging_dir.to_owned();
        for path in dirs
            .into_iter()
            .map(|dir| self.staging_dir.join(dir))
            .chain(std::iter::once(staging))
        {
            let sync_error = |source| UnpackError::Sync {
                path: path.clone(),
                source,
            };
            let dir = File::open(&path).map_err(sync_error)?;
            dir.set_permissions(Permissions::from_mode(EXECUTABLE_MODE))
                .map_err(sync_error)?;
            dir.sync_all().map_err(sync_error)?;
        }
        Ok(())
    }
}

/// Fsyncs files received from the shared queue, stopping at the first failure. Several of
/// these run at once: the filesystem commits concurrent fsyncs together (one journal
/// transaction for many files), which costs far less than one commit per file in turn.
fn sync_files(receiver: &std::sync::Mutex<mpsc::Receiver<(File, PathBuf)>>) -> Result<(), UnpackError> {
    loop {
        let next = match receiver.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return Ok(()),
        };
        let Ok((file, path)) = next else {
            return Ok(());
        };
        file.sync_all().map_err(|source| UnpackError::Sync { path, source })?;
    }
}

/// Checks every entry's metadata (name, kind, mode, encryption, method) without reading data.
fn plan_entries<R: Read + Seek>(
    archive: &ZipArchive<R>,
    archive_path: &Path,
) -> Result<Vec<PlannedEntry>, UnpackError> {
    let mut plan = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        let zip_entry = archive
            .by_index_data(index)
            .map_err(|error| UnpackError::ParseArchive {
                path: archive_path.to_owned(),
                reason: error.to_string(),
            })?;
        let raw_name = zip_entry.name_raw();
        let Ok(name) = std::str::from_utf8(raw_name) else {
            return Err(UnpackError::NonUtf8Name {
                entry: String::from_utf8_lossy(raw_name).into_owned(),
            });
        };
        let unix_mode = (zip_entry.system() == System::Unix)
            .then(|| zip_entry.external_attributes() >> 16)
            .filter(|mode| *mode != 0);
        let file_type = unix_mode.map_or(0, |mode| mode & S_IFMT);
        let (path, named_as_dir) = match name.strip_suffix('/') {
            Some(path) => (path, true),
            None => (name, false),
        };
        let kind = match (file_type, named_as_dir) {
            (S_IFDIR, _) | (0, true) => EntryKind::Directory,
            (S_IFREG | 0, false) => EntryKind::File,
            (S_IFLNK, false) => EntryKind::Symlink,
            (S_IFREG | S_IFLNK, true) => {
                return Err(UnpackError::KindMismatch {
                    entry: name.to_owned(),
                    mode: unix_mode.unwrap_or(0),
                });
            }
            _ => {
                return Err(UnpackError::SpecialFile {
                    entry: name.to_owned(),
                    mode: unix_mode.unwrap_or(0),
                });
            }
        };
        check_entry_path(path).map_err(|violation| path_error(name, violation))?;
        if zip_entry.encrypted() {
            return Err(UnpackError::Encrypted { entry: name.to_owned() });
        }
        let method = zip_entry.compression();
        if kind != EntryKind::Directory && !matches!(method, CompressionMethod::Stored | CompressionMethod::Deflated) {
            return Err(UnpackError::UnsupportedCompression {
                entry: name.to_owned(),
                method: method.to_string(),
            });
        }
        plan.push(PlannedEntry {
            index,
            path: path.to_owned(),
            kind,
            // Only the owner's executable bit counts; setuid, setgid and sticky are dropped.
            executable: unix_mode.is_some_and(|mode| mode & 0o100 != 0),
            target: None,
        });
    }
    Ok(plan)
}

/// Reads from `reader` until `buffer` is full or the entry ends, mapping the zip crate's
/// errors to ours. Ending with a zero-length read is what makes the CRC check fire.
fn fill(reader: &mut impl Read, buffer: &mut [u8], entry: &str, declared: u64) -> Result<usize, UnpackError> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(read_error(entry, declared, error)),
        }
    }
    Ok(filled)
}

fn read_error(entry: &str, declared: u64, error: io::Error) -> UnpackError {
    let message = error.to_string();
    if message.contains("Invalid checksum") {
        UnpackError::CrcMismatch {
            entry: entry.to_owned(),
        }
    } else if message.contains("larger than its declared") {
        UnpackError::SizeMismatch {
            entry: entry.to_owned(),
            declared,
            actual_description: "more".to_owned(),
        }
    } else if error.kind() == io::ErrorKind::UnexpectedEof {
        UnpackError::Truncated {
            entry: entry.to_owned(),
        }
    } else {
        UnpackError::ReadEntry {
            entry: entry.to_owned(),
            reason: message,
        }
    }
}

fn size_mismatch(entry: &str, declared: u64, actual: u64) -> UnpackError {
    UnpackError::SizeMismatch {
        entry: entry.to_owned(),
        declared,
        actual_description: format!("{actual} bytes"),
    }
}

fn open_entry_error(entry: &str, error: zip::result::ZipError) -> UnpackError {
    use zip::result::ZipError;
    match error {
        ZipError::Io(error) if error.kind() == io::ErrorKind::UnexpectedEof => UnpackError::Truncated {
            entry: entry.to_owned(),
        },
        ZipError::InvalidArchive(reason) if reason.contains("header inconsistency") => UnpackError::HeaderMismatch {
            entry: entry.to_owned(),
            reason: reason.into_owned(),
        },
        ZipError::UnsupportedArchive(reason) if reason == ZipError::PASSWORD_REQUIRED => UnpackError::Encrypted {
            entry: entry.to_owned(),
        },
        other => UnpackError::ReadEntry {
            entry: entry.to_owned(),
            reason: other.to_string(),
        },
    }
}

fn path_error(entry: &str, violation: PathViolation) -> UnpackError {
    let entry = entry.to_owned();
    match violation {
        PathViolation::Empty => UnpackError::EmptyName { entry },
        PathViolation::Absolute => UnpackError::AbsolutePath { entry },
        PathViolation::ParentComponent => UnpackError::ParentDirectory { entry },
        PathViolation::Backslash => UnpackError::Backslash { entry },
        PathViolation::DriveLetter => UnpackError::DriveLetter { entry },
        PathViolation::EmptyComponent => UnpackError::EmptyComponent { entry },
        PathViolation::DotComponent => UnpackError::DotComponent { entry },
        PathViolation::NulByte => UnpackError::NulByte { entry },
        PathViolation::ControlCharacter => UnpackError::ControlCharacter { entry },
        PathViolation::TooLong => UnpackError::PathTooLong { entry },
        PathViolation::ComponentTooLong => UnpackError::ComponentTooLong { entry },
        PathViolation::TooDeep => UnpackError::PathTooDeep { entry },
    }
}

fn tree_error(violation: TreeViolation) -> UnpackError {
    match violation {
        TreeViolation::Duplicate { path } => UnpackError::DuplicateName { entry: path },
        TreeViolation::UnicodeTwin { path, other } => UnpackError::UnicodeTwin { entry: path, other },
        TreeViolation::CaseTwin { path, other } => UnpackError::CaseTwin { entry: path, other },
        TreeViolation::FileDirConflict { path, child } => UnpackError::FileDirConflict { entry: path, child },
        TreeViolation::InvalidLinkTarget { path, target } => UnpackError::InvalidSymlinkTarget { entry: path, target },
        TreeViolation::AbsoluteLink { path, target } => UnpackError::AbsoluteSymlink { entry: path, target },
        TreeViolation::EscapingLink { path, target } => UnpackError::EscapingSymlink { entry: path, target },
        TreeViolation::LinkThroughLink { path, target, via } => UnpackError::LinkThroughLink {
            entry: path,
            target,
            via,
        },
    }
}

/// Finds the first name that appears twice in the central directory, by walking its raw
/// headers (the zip crate keeps only one entry per name).
fn first_duplicate_name(mut reader: impl Read + Seek, central_start: u64, max_entries: usize) -> Option<String> {
    reader.seek(SeekFrom::Start(central_start)).ok()?;
    let mut seen = HashSet::new();
    let mut header = [0u8; CENTRAL_HEADER_BYTES];
    for _ in 0..=max_entries {
        reader.read_exact(&mut header).ok()?;
        let field = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
        if u32::from_le_bytes([header[0], header[1], header[2], header[3]]) != CENTRAL_HEADER_SIGNATURE {
            return None;
        }
        let mut name = vec![0u8; usize::from(field(28))];
        reader.read_exact(&mut name).ok()?;
        let skip = i64::from(field(30)) + i64::from(field(32));
        reader.seek(SeekFrom::Current(skip)).ok()?;
        let name = String::from_utf8_lossy(&name).into_owned();
        if !seen.insert(name.clone()) {
            return Some(name.trim_end_matches('/').to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests;
