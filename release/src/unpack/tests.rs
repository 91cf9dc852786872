//! The hostile-archive corpus, the build → unpack round trip and property tests. Every
//! archive is generated here: the zip crate's writer for well-formed structure, then
//! hand-patched header fields for what a well-behaved writer refuses to produce.

use std::collections::BTreeMap;
use std::io::{Cursor, Write as _};
use std::os::unix::fs::{PermissionsExt as _, symlink};

use proptest::prelude::*;
use zip::ZipWriter;
use zip::write::SimpleFileOptions;

use super::*;
use crate::build::{SourceEntry, build_from_dir, build_from_entries};

// ---- archive construction -----------------------------------------------------------------

const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const S_IFIFO: u32 = 0o010_000;
const S_IFSOCK: u32 = 0o140_000;

/// A small archive writer over the zip crate, for the corpus.
struct Archive(ZipWriter<Cursor<Vec<u8>>>);

impl Archive {
    fn new() -> Self {
        Self(ZipWriter::new(Cursor::new(Vec::new())))
    }

    fn options() -> SimpleFileOptions {
        SimpleFileOptions::default().system(zip::System::Unix)
    }

    /// A regular file with mode 0644.
    fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(name, data, S_IFREG | 0o644, CompressionMethod::Stored)
    }

    /// An entry with an explicit full unix mode (type and permission bits).
    fn entry(mut self, name: &str, data: &[u8], mode: u32, method: CompressionMethod) -> Self {
        let options = Self::options()
            .compression_method(method)
            .external_attributes(mode << 16);
        self.0.start_file(name, options).expect("start entry");
        self.0.write_all(data).expect("write entry");
        self
    }

    fn raw_name(mut self, name: &[u8], data: &[u8]) -> Self {
        let options = Self::options()
            .compression_method(CompressionMethod::Stored)
            .unix_permissions(0o644)
            .name(name);
        self.0.start_file_with_options(options).expect("start entry");
        self.0.write_all(data).expect("write entry");
        self
    }

    fn dir(mut self, name: &str) -> Self {
        self.0.add_directory(name, Self::options()).expect("add directory");
        self
    }

    fn link(mut self, name: &str, target: &str) -> Self {
        self.0.add_symlink(name, target, Self::options()).expect("add symlink");
        self
    }

    fn finish(self) -> Vec<u8> {
        self.0.finish().expect("finish archive").into_inner()
    }
}

/// Offsets of a field in the local header and in the central directory header.
#[derive(Clone, Copy)]
struct Field {
    local: usize,
    central: usize,
}

const FLAGS: Field = Field { local: 6, central: 8 };
const METHOD: Field = Field { local: 8, central: 10 };
const COMPRESSED_SIZE: Field = Field { local: 18, central: 20 };
const UNCOMPRESSED_SIZE: Field = Field { local: 22, central: 24 };

fn header_offsets(bytes: &[u8], signature: &[u8; 4]) -> Vec<usize> {
    bytes
        .windows(4)
        .enumerate()
        .filter(|(_, window)| window == signature)
        .map(|(at, _)| at)
        .collect()
}

fn local_headers(bytes: &[u8]) -> Vec<usize> {
    header_offsets(bytes, b"PK\x03\x04")
}

fn central_headers(bytes: &[u8]) -> Vec<usize> {
    header_offsets(bytes, b"PK\x01\x02")
}

/// Overwrites `field` of entry `index` in both headers, so they stay consistent.
fn patch(bytes: &mut [u8], index: usize, field: Field, value: &[u8]) {
    let local = local_headers(bytes)[index] + field.local;
    let central = central_headers(bytes)[index] + field.central;
    bytes[local..local + value.len()].copy_from_slice(value);
    bytes[central..central + value.len()].copy_from_slice(value);
}

/// Replaces every occurrence of `from` with `to` (same length): names in both headers.
fn rename_everywhere(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut at = 0;
    while let Some(found) = bytes[at..].windows(from.len()).position(|window| window == from) {
        bytes[at + found..at + found + to.len()].copy_from_slice(to);
        at += found + from.len();
    }
    bytes
}

// ---- the corpus ---------------------------------------------------------------------------

struct Case {
    name: &'static str,
    archive: Vec<u8>,
    limits: Limits,
    expect: fn(&UnpackError) -> bool,
}

fn case(name: &'static str, archive: Vec<u8>, expect: fn(&UnpackError) -> bool) -> Case {
    Case {
        name,
        archive,
        limits: Limits::default(),
        expect,
    }
}

fn corpus() -> Vec<Case> {
    let deep = vec!["d"; 65].join("/");
    let long_component = "c".repeat(256);
    let long_path = vec!["p".repeat(250); 17].join("/");
    let zeros = vec![0u8; 8 * 1024 * 1024];
    let mut cases = vec![
        case(
            "parent component",
            Archive::new().file("../../sentinel/x", b"x").finish(),
            |error| matches!(error, UnpackError::ParentDirectory { entry } if entry == "../../sentinel/x"),
        ),
        case(
            "inner parent component",
            Archive::new().file("a/../../x", b"x").finish(),
            |error| matches!(error, UnpackError::ParentDirectory { .. }),
        ),
        case(
            "absolute path",
            Archive::new().file("/etc/x", b"x").finish(),
            |error| matches!(error, UnpackError::AbsolutePath { entry } if entry == "/etc/x"),
        ),
        case("drive letter", Archive::new().file("C:\\x", b"x").finish(), |error| {
            matches!(error, UnpackError::DriveLetter { .. })
        }),
        case(
            "backslash",
            Archive::new().file("a\\..\\..\\x", b"x").finish(),
            |error| matches!(error, UnpackError::Backslash { .. }),
        ),
        case("empty component", Archive::new().file("a//b", b"x").finish(), |error| {
            matches!(error, UnpackError::EmptyComponent { .. })
        }),
        case("dot component", Archive::new().file("./a", b"x").finish(), |error| {
            matches!(error, UnpackError::DotComponent { .. })
        }),
        case(
            "nul in name",
            Archive::new().file("a\0/../../x", b"x").finish(),
            |error| matches!(error, UnpackError::NulByte { .. }),
        ),
        case(
            "control character",
            Archive::new().file("a\x1b[2Jb", b"x").finish(),
            |error| matches!(error, UnpackError::ControlCharacter { .. }),
        ),
        case(
            "non-utf8 name",
            Archive::new().raw_name(b"caf\xe9", b"x").finish(),
            |error| matches!(error, UnpackError::NonUtf8Name { .. }),
        ),
        case(
            "overlong path",
            Archive::new().file(&long_path, b"x").finish(),
            |error| matches!(error, UnpackError::PathTooLong { .. }),
        ),
        case(
            "overlong component",
            Archive::new().file(&long_component, b"x").finish(),
            |error| matches!(error, UnpackError::ComponentTooLong { .. }),
        ),
        case("deep path", Archive::new().file(&deep, b"x").finish(), |error| {
            matches!(error, UnpackError::PathTooDeep { .. })
        }),
        case(
            "duplicate names",
            rename_everywhere(
                Archive::new().file("dupA", b"first").file("dupB", b"second").finish(),
                b"dupB",
                b"dupA",
            ),
            |error| matches!(error, UnpackError::DuplicateName { entry } if entry == "dupA"),
        ),
        case(
            "case twins",
            Archive::new().file("README", b"a").file("readme", b"b").finish(),
            |error| matches!(error, UnpackError::CaseTwin { entry, other } if entry == "readme" && other == "README"),
        ),
        case(
            "case twin directories",
            Archive::new().file("Lib/a", b"a").file("lib/b", b"b").finish(),
            |error| matches!(error, UnpackError::CaseTwin { entry, .. } if entry == "lib"),
        ),
        case(
            "nfc twins",
            Archive::new()
                .file("caf\u{e9}", b"a")
                .file("cafe\u{301}", b"b")
                .finish(),
            |error| matches!(error, UnpackError::UnicodeTwin { .. }),
        ),
        case(
            "file then dir",
            Archive::new().file("a", b"file").file("a/b", b"x").finish(),
            |error| matches!(error, UnpackError::FileDirConflict { entry, child } if entry == "a" && child == "a/b"),
        ),
        case(
            "dir then file",
            Archive::new().file("a/b", b"x").file("a", b"file").finish(),
            |error| matches!(error, UnpackError::FileDirConflict { entry, .. } if entry == "a"),
        ),
        case(
            "entry under a symlink",
            Archive::new().link("l", "d").dir("d").file("l/x", b"x").finish(),
            |error| matches!(error, UnpackError::FileDirConflict { entry, .. } if entry == "l"),
        ),
        case(
            "absolute symlink",
            Archive::new().link("passwd", "/etc/passwd").finish(),
            |error| matches!(error, UnpackError::AbsoluteSymlink { entry, .. } if entry == "passwd"),
        ),
        case(
            "escaping symlink",
            Archive::new().dir("d").link("d/out", "../../sentinel").finish(),
            |error| matches!(error, UnpackError::EscapingSymlink { entry, .. } if entry == "d/out"),
        ),
        case(
            "link through link",
            Archive::new().dir("d").link("d/up", "..").link("l", "d/up/x").finish(),
            |error| matches!(error, UnpackError::LinkThroughLink { entry, via, .. } if entry == "l" && via == "d/up"),
        ),
        case("empty symlink target", Archive::new().link("l", "").finish(), |error| {
            matches!(error, UnpackError::InvalidSymlinkTarget { .. })
        }),
        case(
            "character device",
            Archive::new()
                .entry("tty", b"", S_IFCHR | 0o666, CompressionMethod::Stored)
                .finish(),
            |error| matches!(error, UnpackError::SpecialFile { mode, .. } if *mode == S_IFCHR | 0o666),
        ),
        case(
            "block device",
            Archive::new()
                .entry("sda", b"", S_IFBLK | 0o660, CompressionMethod::Stored)
                .finish(),
            |error| matches!(error, UnpackError::SpecialFile { .. }),
        ),
        case(
            "fifo",
            Archive::new()
                .entry("pipe", b"", S_IFIFO | 0o644, CompressionMethod::Stored)
                .finish(),
            |error| matches!(error, UnpackError::SpecialFile { .. }),
        ),
        case(
            "socket (shares bits with symlink)",
            Archive::new()
                .entry("sock", b"/etc/passwd", S_IFSOCK | 0o755, CompressionMethod::Stored)
                .finish(),
            |error| matches!(error, UnpackError::SpecialFile { .. }),
        ),
        case(
            "file named as a directory",
            Archive::new()
                .entry("x/", b"", S_IFREG | 0o644, CompressionMethod::Stored)
                .finish(),
            |error| matches!(error, UnpackError::KindMismatch { .. }),
        ),
        case(
            "encrypted flag",
            {
                let mut bytes = Archive::new().file("secret", b"data").finish();
                patch(&mut bytes, 0, FLAGS, &1u16.to_le_bytes());
                bytes
            },
            |error| matches!(error, UnpackError::Encrypted { entry } if entry == "secret"),
        ),
        case(
            "unknown compression method",
            {
                let mut bytes = Archive::new().file("bz", b"data").finish();
                patch(&mut bytes, 0, METHOD, &12u16.to_le_bytes());
                bytes
            },
            |error| matches!(error, UnpackError::UnsupportedCompression { entry, .. } if entry == "bz"),
        ),
        case(
            "crc mismatch",
            rename_everywhere(
                Archive::new().file("f", b"payload-original").finish(),
                b"payload-original",
                b"payload-tampered",
            ),
            |error| matches!(error, UnpackError::CrcMismatch { entry } if entry == "f"),
        ),
        case(
            "crc mismatch in symlink target",
            rename_everywhere(Archive::new().link("l", "targetAA").finish(), b"targetAA", b"targetAB"),
            |error| matches!(error, UnpackError::CrcMismatch { entry } if entry == "l"),
        ),
        case(
            "data beyond the end",
            {
                let mut bytes = Archive::new().file("big", b"0123456789").finish();
                patch(&mut bytes, 0, COMPRESSED_SIZE, &1_000_000u32.to_le_bytes());
                patch(&mut bytes, 0, UNCOMPRESSED_SIZE, &1_000_000u32.to_le_bytes());
                bytes
            },
            |error| matches!(error, UnpackError::Truncated { entry } if entry == "big"),
        ),
        case(
            "truncated tail",
            {
                let mut bytes = Archive::new().file("a", &[7u8; 4096]).file("b", b"b").finish();
                bytes.truncate(bytes.len() / 2);
                bytes
            },
            |error| matches!(error, UnpackError::ParseArchive { .. }),
        ),
        case(
            "declared size too small",
            {
                let mut bytes = Archive::new().file("liar", b"0123456789").finish();
                patch(&mut bytes, 0, UNCOMPRESSED_SIZE, &4u32.to_le_bytes());
                bytes
            },
            |error| matches!(error, UnpackError::SizeMismatch { entry, declared: 4, .. } if entry == "liar"),
        ),
        case(
            "declared size too large",
            {
                let mut bytes = Archive::new()
                    .entry("liar", &[1u8; 1000], S_IFREG | 0o644, CompressionMethod::Deflated)
                    .finish();
                patch(&mut bytes, 0, UNCOMPRESSED_SIZE, &5000u32.to_le_bytes());
                bytes
            },
            |error| matches!(error, UnpackError::SizeMismatch { declared: 5000, .. }),
        ),
        case(
            "local header disagrees with central directory",
            {
                let mut bytes = Archive::new().file("nameA", b"x").finish();
                let local = local_headers(&bytes)[0] + 30;
                bytes[local..local + 5].copy_from_slice(b"nameB");
                bytes
            },
            |error| matches!(error, UnpackError::HeaderMismatch { entry, .. } if entry == "nameA"),
        ),
        case(
            "zip bomb ratio",
            Archive::new()
                .entry("bomb", &zeros, S_IFREG | 0o644, CompressionMethod::Deflated)
                .finish(),
            |error| matches!(error, UnpackError::RatioExceeded { entry, limit: 200, .. } if entry == "bomb"),
        ),
        case("not a zip", b"this is not a zip archive at all".to_vec(), |error| {
            matches!(error, UnpackError::ParseArchive { .. })
        }),
        case("empty file", Vec::new(), |error| {
            matches!(error, UnpackError::ParseArchive { .. })
        }),
    ];
    let mut too_many = Archive::new();
    for index in 0..11 {
        too_many = too_many.file(&format!("f{index}"), b"x");
    }
    cases.push(Case {
        limits: Limits {
            max_entries: 10,
            ..Limits::default()
        },
        ..case("too many entries", too_many.finish(), |error| {
            matches!(error, UnpackError::TooManyEntries { count: 11, limit: 10 })
        })
    });
    cases.push(Case {
        limits: Limits {
            max_total_bytes: 1000,
            ..Limits::default()
        },
        ..case(
            "total bytes budget",
            Archive::new().file("a", &[1u8; 600]).file("b", &[2u8; 600]).finish(),
            |error| matches!(error, UnpackError::TotalBytesExceeded { entry, limit: 1000 } if entry == "b"),
        )
    });
    cases
}

/// Every path under `root`, with file contents, for before/after comparisons.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            let metadata = fs::symlink_metadata(&path).expect("lstat");
            let relative = path.strip_prefix(root).expect("under root").to_owned();
            if metadata.is_dir() {
                out.insert(relative, b"<dir>".to_vec());
                walk(&path, root, out);
            } else if metadata.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("readlink");
                out.insert(relative, format!("-> {}", target.display()).into_bytes());
            } else {
                out.insert(relative, fs::read(&path).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Unpacks `case` into `root/work/staging` beside a `root/sentinel` directory and checks the
/// error variant, that staging is gone and that nothing else under `root` changed.
fn check(case: &Case) {
    let root = tempfile::tempdir().expect("tempdir");
    let archive_path = root.path().join("archive.zip");
    fs::write(&archive_path, &case.archive).expect("write archive");
    fs::create_dir(root.path().join("sentinel")).expect("sentinel");
    fs::create_dir(root.path().join("work")).expect("work");
    let staging = root.path().join("work/staging");
    let before = snapshot(root.path());

    let outcome = std::panic::catch_unwind(|| unpack(&archive_path, &staging, case.limits));
    let result = outcome.unwrap_or_else(|_| panic!("case {:?}: unpack panicked", case.name));
    match result {
        Ok(report) => panic!("case {:?}: accepted ({report:?})", case.name),
        Err(error) => {
            assert!(
                (case.expect)(&error),
                "case {:?}: unexpected error {error:?}",
                case.name
            );
            let message = error.to_string();
            assert!(
                !message.is_empty() && message.chars().next().is_some_and(|c| !c.is_uppercase()),
                "{message}"
            );
        }
    }
    assert!(!staging.exists(), "case {:?}: staging left behind", case.name);
    assert_eq!(
        fs::read_dir(root.path().join("sentinel")).expect("ls sentinel").count(),
        0,
        "case {:?}: sentinel touched",
        case.name
    );
    assert_eq!(
        snapshot(root.path()),
        before,
        "case {:?}: something changed outside staging",
        case.name
    );
}

#[test]
fn hostile_archives_are_refused() {
    let cases = corpus();
    assert!(cases.len() >= 25, "corpus has {} cases", cases.len());
    for case in &cases {
        check(case);
    }
}

#[test]
fn special_bits_are_stripped() {
    let archive = Archive::new()
        .entry("setuid", b"#!/bin/sh\n", S_IFREG | 0o4755, CompressionMethod::Stored)
        .entry("setgid", b"data", S_IFREG | 0o2644, CompressionMethod::Stored)
        .entry("group-exec-only", b"data", S_IFREG | 0o654, CompressionMethod::Stored)
        .entry("sticky/", b"", S_IFDIR | 0o1777, CompressionMethod::Stored)
        .entry("world", b"data", S_IFREG | 0o666, CompressionMethod::Deflated)
        .finish();
    let root = tempfile::tempdir().expect("tempdir");
    let archive_path = root.path().join("archive.zip");
    fs::write(&archive_path, archive).expect("write");
    let staging = root.path().join("staging");
    let report = unpack(&archive_path, &staging, Limits::default()).expect("unpack");
    assert_eq!(report.entries, 5);
    let mode = |name: &str| {
        fs::symlink_metadata(staging.join(name))
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("setuid"), 0o755);
    assert_eq!(mode("setgid"), 0o644);
    assert_eq!(mode("group-exec-only"), 0o644);
    assert_eq!(mode("sticky"), 0o755);
    assert_eq!(mode("world"), 0o644);
    assert_eq!(mode(""), 0o755);
}

#[test]
fn existing_staging_is_refused_and_kept() {
    let root = tempfile::tempdir().expect("tempdir");
    let archive_path = root.path().join("archive.zip");
    fs::write(&archive_path, Archive::new().file("a", b"a").finish()).expect("write");
    let staging = root.path().join("staging");
    fs::create_dir(&staging).expect("mkdir");
    fs::write(staging.join("keep"), b"keep").expect("write");
    let error = unpack(&archive_path, &staging, Limits::default()).expect_err("staging exists");
    assert!(matches!(error, UnpackError::CreateStaging { .. }), "{error:?}");
    assert!(
        staging.join("keep").exists(),
        "a staging dir we did not create is left alone"
    );
}

// ---- round trip ---------------------------------------------------------------------------

/// Kind, contents (or link target) and executable bit of every path under `root`.
fn describe_tree(root: &Path) -> BTreeMap<String, (char, Vec<u8>, bool)> {
    snapshot(root)
        .into_iter()
        .map(|(relative, contents)| {
            let full = root.join(&relative);
            let metadata = fs::symlink_metadata(&full).expect("lstat");
            let kind = if metadata.is_dir() {
                'd'
            } else if metadata.file_type().is_symlink() {
                'l'
            } else {
                'f'
            };
            let executable = kind == 'f' && metadata.permissions().mode() & 0o100 != 0;
            (relative.to_string_lossy().into_owned(), (kind, contents, executable))
        })
        .collect()
}

#[test]
fn build_then_unpack_round_trips() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    for (path, contents, mode) in [
        ("bin/server", b"#!/bin/sh\nexec sleep 1\n".to_vec(), 0o755),
        ("lib/app.so", (0..=255u8).cycle().take(300_000).collect(), 0o644),
        ("node_modules/tool/cli.js", b"console.log(1)\n".to_vec(), 0o755),
        ("static/empty", Vec::new(), 0o600),
        ("caf\u{e9}/menu.txt", b"unicode names survive\n".to_vec(), 0o644),
    ] {
        let full = tree.join(path);
        fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        fs::write(&full, contents).expect("write");
        fs::set_permissions(&full, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    fs::create_dir_all(tree.join("var/cache")).expect("empty dir");
    fs::create_dir_all(tree.join("node_modules/.bin")).expect("mkdir");
    symlink("../tool/cli.js", tree.join("node_modules/.bin/tool")).expect("symlink");
    symlink("bin", tree.join("sbin")).expect("symlink");

    let archive_path = work.path().join("release.zip");
    let built = build_from_dir(&tree, &archive_path).expect("build");
    let staging = work.path().join("staging");
    let report = unpack(&archive_path, &staging, Limits::default()).expect("unpack");
    assert_eq!(report.entries, built.entries);
    assert_eq!(describe_tree(&staging), describe_tree(&tree));
    assert_eq!(
        fs::read(staging.join("node_modules/.bin/tool")).expect("read through link"),
        b"console.log(1)\n"
    );
}

// ---- properties ---------------------------------------------------------------------------

/// A file path: directories from `[a-z]`, a leaf ending in `.f`, so files never collide with
/// directories and names never differ only by case.
fn file_path() -> impl Strategy<Value = String> {
    (prop::collection::vec("[a-z]{1,8}", 0..4), "[a-z0-9_ é-]{1,12}").prop_map(|(dirs, leaf)| {
        let mut parts = dirs;
        parts.push(format!("{leaf}.f"));
        parts.join("/")
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn valid_trees_round_trip(
        files in prop::collection::btree_map(file_path(), (prop::collection::vec(any::<u8>(), 0..2048), any::<bool>()), 1..12)
    ) {
        let work = tempfile::tempdir().expect("tempdir");
        let entries = files
            .iter()
            .map(|(path, (contents, executable))| SourceEntry {
                path: path.clone(),
                kind: EntryKind::File,
                mode: if *executable { 0o755 } else { 0o644 },
                contents: contents.clone(),
            })
            .collect();
        let archive_path = work.path().join("release.zip");
        build_from_entries(entries, &archive_path).expect("valid entries build");
        let staging = work.path().join("staging");
        unpack(&archive_path, &staging, Limits::default()).expect("own archive unpacks");
        for (path, (contents, executable)) in &files {
            let full = staging.join(path);
            prop_assert_eq!(&fs::read(&full).expect("read"), contents);
            let mode = fs::metadata(&full).expect("stat").permissions().mode() & 0o777;
            prop_assert_eq!(mode, if *executable { 0o755 } else { 0o644 });
        }
    }

    #[test]
    fn random_bytes_never_panic_or_escape(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        check_arbitrary_archive(&bytes);
    }

    #[test]
    fn mutated_archives_never_panic_or_escape(
        mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = Archive::new()
            .dir("d")
            .file("d/a", b"hello hello hello")
            .entry("d/b", &[3u8; 3000], S_IFREG | 0o755, CompressionMethod::Deflated)
            .link("l", "d/a")
            .finish();
        for (index, value) in mutations {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        check_arbitrary_archive(&bytes);
    }
}

/// Unpacks arbitrary bytes: whatever happens, no panic escapes, nothing appears outside
/// staging, and staging exists exactly when the unpack succeeded.
fn check_arbitrary_archive(bytes: &[u8]) {
    let root = tempfile::tempdir().expect("tempdir");
    let archive_path = root.path().join("archive.zip");
    fs::write(&archive_path, bytes).expect("write archive");
    fs::create_dir(root.path().join("sentinel")).expect("sentinel");
    let staging = root.path().join("staging");
    let before = snapshot(root.path());
    let outcome = std::panic::catch_unwind(|| unpack(&archive_path, &staging, Limits::default()));
    let result = outcome.unwrap_or_else(|_| panic!("unpack panicked"));
    assert_eq!(staging.exists(), result.is_ok(), "{result:?}");
    if result.is_ok() {
        fs::remove_dir_all(&staging).expect("clean staging");
    }
    assert_eq!(snapshot(root.path()), before);
}
