//! Determinism and refusal tests for the archive builder.

use std::fs;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::time::{Duration, SystemTime};

use super::*;

/// Writes a small app tree: files, an executable, nested and empty directories, a link.
fn make_tree(root: &Path, reverse: bool) {
    let mut files: Vec<(&str, &[u8], u32)> = vec![
        ("bin/server", b"#!/bin/sh\necho serving\n", 0o755),
        ("hooks/start.sh", b"#!/bin/sh\ntrue\n", 0o700),
        ("static/index.html", b"<h1>hello</h1>\n", 0o600),
        ("static/empty", b"", 0o644),
        (
            "rollwave.toml",
            b"[hooks]\napplication_start = { path = \"hooks/start.sh\" }\n",
            0o664,
        ),
    ];
    if reverse {
        files.reverse();
    }
    for (path, contents, mode) in files {
        let full = root.join(path);
        fs::create_dir_all(full.parent().expect("has parent")).expect("mkdir");
        fs::write(&full, contents).expect("write");
        fs::set_permissions(&full, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    fs::create_dir_all(root.join("var/empty")).expect("empty dir");
    symlink("../static/index.html", root.join("bin/index")).expect("symlink");
}

fn build(dir: &Path, out: &Path) -> BuildOutput {
    build_from_dir(dir, out).expect("build succeeds")
}

#[test]
fn same_tree_gives_same_bytes() {
    let work = tempfile::tempdir().expect("tempdir");
    let (first, second) = (work.path().join("first"), work.path().join("second"));
    make_tree(&first, false);
    make_tree(&second, true);
    let first_out = build(&first, &work.path().join("first.zip"));
    let second_out = build(&second, &work.path().join("second.zip"));
    assert_eq!(first_out, second_out);
    assert_eq!(
        fs::read(work.path().join("first.zip")).expect("read"),
        fs::read(work.path().join("second.zip")).expect("read")
    );
    // bin, hooks, static, var, var/empty + 5 files + 1 link.
    assert_eq!(first_out.entries, 11);
    let (hash, size) = hash_file(&work.path().join("first.zip")).expect("hash");
    assert_eq!((hash, size), (first_out.sha256, first_out.size));
}

#[test]
fn mtimes_do_not_matter() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    make_tree(&tree, false);
    let before = build(&tree, &work.path().join("before.zip"));
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    for path in ["bin/server", "static/index.html", "static/empty"] {
        let file = File::options().write(true).open(tree.join(path)).expect("open");
        file.set_modified(old).expect("set mtime");
    }
    let after = build(&tree, &work.path().join("after.zip"));
    assert_eq!(before.sha256, after.sha256);
}

#[test]
fn exec_bit_matters_and_is_normalised() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    make_tree(&tree, false);
    let before = build(&tree, &work.path().join("before.zip"));
    // Any executable bit counts as executable: group-only exec gives the same archive as 0755.
    fs::set_permissions(tree.join("bin/server"), fs::Permissions::from_mode(0o710)).expect("chmod");
    assert_eq!(build(&tree, &work.path().join("same.zip")).sha256, before.sha256);
    fs::set_permissions(tree.join("bin/server"), fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_ne!(build(&tree, &work.path().join("after.zip")).sha256, before.sha256);
}

#[test]
fn entries_and_dir_builds_agree() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    fs::create_dir_all(tree.join("a/b")).expect("mkdir");
    fs::write(tree.join("a/b/c.txt"), b"c").expect("write");
    fs::write(tree.join("run"), b"#!/bin/sh\n").expect("write");
    fs::set_permissions(tree.join("run"), fs::Permissions::from_mode(0o755)).expect("chmod");
    symlink("a/b/c.txt", tree.join("link")).expect("symlink");
    let from_dir = build(&tree, &work.path().join("dir.zip"));
    let entries = vec![
        SourceEntry {
            path: "run".to_owned(),
            kind: EntryKind::File,
            mode: 0o100755,
            contents: b"#!/bin/sh\n".to_vec(),
        },
        SourceEntry {
            path: "link".to_owned(),
            kind: EntryKind::Symlink,
            mode: 0o120000,
            contents: b"a/b/c.txt".to_vec(),
        },
        SourceEntry {
            path: "a/b/c.txt".to_owned(),
            kind: EntryKind::File,
            mode: 0o100644,
            contents: b"c".to_vec(),
        },
    ];
    let from_entries = build_from_entries(entries, &work.path().join("entries.zip")).expect("build");
    assert_eq!(from_dir, from_entries);
}

/// Builds a tree made by `setup` and returns the error message, which must name `fragment`.
fn check_refused(setup: impl FnOnce(&Path), fragment: &str) {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    fs::create_dir(&tree).expect("mkdir");
    setup(&tree);
    let out = work.path().join("out.zip");
    let error = build_from_dir(&tree, &out).expect_err(fragment);
    let message = error.to_string();
    assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
    assert!(!out.exists(), "no archive is left behind");
    let leftovers: Vec<_> = fs::read_dir(work.path()).expect("ls").collect();
    assert_eq!(leftovers.len(), 1, "only the tree remains: {leftovers:?}");
}

#[test]
fn symlink_and_special_file_rules() {
    check_refused(
        |tree| symlink("/etc/passwd", tree.join("abs")).expect("symlink"),
        "\"abs\": symlink target \"/etc/passwd\" is absolute",
    );
    check_refused(
        |tree| {
            fs::create_dir(tree.join("d")).expect("mkdir");
            symlink("../../outside", tree.join("d/escape")).expect("symlink");
        },
        "\"d/escape\": symlink target \"../../outside\" points outside the release",
    );
    check_refused(
        |tree| {
            fs::create_dir(tree.join("d")).expect("mkdir");
            symlink("..", tree.join("d/up")).expect("symlink");
            symlink("d/up/x", tree.join("through")).expect("symlink");
        },
        "passes through the symlink \"d/up\"",
    );
    check_refused(
        |tree| {
            std::os::unix::net::UnixListener::bind(tree.join("app.sock")).expect("bind socket");
        },
        "app.sock: special files",
    );
}

#[test]
fn refuses_what_the_unpacker_refuses() {
    check_refused(|tree| fs::write(tree.join("a\\b"), b"").expect("write"), "backslashes");
    check_refused(
        |tree| {
            fs::write(tree.join("README"), b"").expect("write");
            fs::write(tree.join("readme"), b"").expect("write");
        },
        "only by case",
    );
    check_refused(
        |tree| fs::write(tree.join("bell\u{7}"), b"").expect("write"),
        "control characters",
    );
    check_refused(|tree| fs::write(tree.join("C:x"), b"").expect("write"), "drive letters");
    let entries = |path: &str| {
        vec![SourceEntry {
            path: path.to_owned(),
            kind: EntryKind::File,
            mode: 0o644,
            contents: Vec::new(),
        }]
    };
    let work = tempfile::tempdir().expect("tempdir");
    for (path, fragment) in [
        ("../x", "`..`"),
        ("/x", "absolute"),
        ("a//b", "empty components"),
        ("./a", "`.`"),
    ] {
        let error = build_from_entries(entries(path), &work.path().join("out.zip")).expect_err(path);
        assert!(error.to_string().contains(fragment), "{error}");
    }
}

#[test]
fn refuses_invalid_manifest() {
    check_refused(
        |tree| {
            fs::write(
                tree.join("rollwave.toml"),
                "[hooks]\napplication_start = { path = \"hooks/missing.sh\" }\n",
            )
            .expect("write")
        },
        "invalid manifest: rollwave.toml: hook application_start script \"hooks/missing.sh\" is not a regular file",
    );
    check_refused(
        |tree| {
            fs::write(
                tree.join("appspec.yml"),
                "files:\n  - source: /\n    destination: /srv\n",
            )
            .expect("write")
        },
        "appspec.yml: the \"files\" section is not supported",
    );
}

/// The entry names an archive holds, in order.
fn archive_names(path: &Path) -> Vec<String> {
    let archive = zip::ZipArchive::new(File::open(path).expect("open archive")).expect("read archive");
    archive
        .file_names()
        .map(|name| name.expect("an entry name").into_owned())
        .collect()
}

/// `make_tree` plus version-control directories, files a `.rollwaveignore` names, and the file.
fn make_tree_with_secrets(root: &Path) {
    make_tree(root, false);
    for (path, contents) in [
        (
            ".git/config",
            "[remote \"origin\"]\n\turl = https://user:secret@example.com/site.git\n",
        ),
        (".git/objects/ab/cdef", "history"),
        ("static/.svn/entries", "svn"),
        (".hg/store/data", "hg"),
        ("config/prod.env", "DB_PASSWORD=secret\n"),
        ("config/keep.env", "PUBLIC=1\n"),
        ("secrets/tls.key", "key"),
        (
            "static/secrets/not-anchored.txt",
            "anchored patterns only match at the root",
        ),
        (
            ".rollwaveignore",
            "# credentials stay in the checkout\n*.env\n!keep.env\n/secrets/\n",
        ),
    ] {
        let full = root.join(path);
        fs::create_dir_all(full.parent().expect("has parent")).expect("mkdir");
        fs::write(full, contents).expect("write");
    }
}

#[test]
fn a_directory_build_leaves_out_version_control_and_what_rollwaveignore_names() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    make_tree_with_secrets(&tree);
    let out = work.path().join("out.zip");
    let output = build(&tree, &out);
    let left_out: Vec<(&str, bool, &str)> = output
        .left_out
        .iter()
        .map(|left| (left.path.as_str(), left.is_dir, left.reason.as_str()))
        .collect();
    assert_eq!(
        left_out,
        [
            (".git", true, "version control"),
            (".hg", true, "version control"),
            ("config/prod.env", false, ".rollwaveignore: *.env"),
            ("secrets", true, ".rollwaveignore: /secrets/"),
            ("static/.svn", true, "version control"),
        ]
    );
    let names = archive_names(&out);
    for kept in [
        ".rollwaveignore",
        "config/keep.env",
        "static/secrets/not-anchored.txt",
        "bin/server",
    ] {
        assert!(
            names.iter().any(|name| name == kept),
            "{kept} is missing from {names:?}"
        );
    }
    for gone in [".git", ".hg", ".svn", "prod.env", "tls.key"] {
        assert!(
            !names.iter().any(|name| name.contains(gone)),
            "{gone} was archived: {names:?}"
        );
    }
    assert_eq!(output.entries, names.len());
}

#[test]
fn what_is_left_out_does_not_change_the_bytes() {
    let work = tempfile::tempdir().expect("tempdir");
    let (with_secrets, clean) = (work.path().join("with"), work.path().join("clean"));
    make_tree_with_secrets(&with_secrets);
    make_tree_with_secrets(&clean);
    for gone in [".git", ".hg", "static/.svn", "secrets"] {
        fs::remove_dir_all(clean.join(gone)).expect("remove dir");
    }
    fs::remove_file(clean.join("config/prod.env")).expect("remove file");
    fs::write(with_secrets.join(".git/HEAD"), "ref: refs/heads/other\n").expect("write");
    let first = build(&with_secrets, &work.path().join("with.zip"));
    let second = build(&clean, &work.path().join("clean.zip"));
    assert_eq!(first.sha256, second.sha256);
    assert!(second.left_out.is_empty(), "{:?}", second.left_out);
}

#[test]
fn entry_builds_honour_rollwaveignore_as_directory_builds_do() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    make_tree_with_secrets(&tree);
    let from_dir = build(&tree, &work.path().join("dir.zip"));
    let file = |path: &str, contents: &[u8]| SourceEntry {
        path: path.to_owned(),
        kind: EntryKind::File,
        mode: 0o644,
        contents: contents.to_vec(),
    };
    let entries = vec![
        file("keep.env", b"PUBLIC=1\n"),
        file("prod.env", b"secret"),
        file("secrets/deep/tls.key", b"key"),
        file(".hg/store/data", b"hg"),
        file(".rollwaveignore", b"*.env\n!keep.env\n/secrets/\n"),
    ];
    let output = build_from_entries(entries, &work.path().join("entries.zip")).expect("build");
    let left_out: Vec<&str> = output.left_out.iter().map(|left| left.path.as_str()).collect();
    assert_eq!(left_out, [".hg", "prod.env", "secrets"]);
    assert_eq!(
        archive_names(&work.path().join("entries.zip")),
        [".rollwaveignore", "keep.env"]
    );
    assert!(!from_dir.left_out.is_empty());
}

#[test]
fn an_invalid_rollwaveignore_pattern_is_refused_with_its_line() {
    check_refused(
        |tree| fs::write(tree.join(".rollwaveignore"), "*.log\n{a,b\n").expect("write"),
        ".rollwaveignore line 2:",
    );
}

/// The error and its sources, as `anyhow`'s `{:#}` prints them.
fn chain(error: &BuildError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[test]
fn an_appspec_refusal_is_told_once() {
    let work = tempfile::tempdir().expect("tempdir");
    for (appspec, problem) in [
        ("version: 0.0\nos: windows\n", "os \"windows\" is not supported"),
        (
            "version: 0.0\nos: linux\nhooks:\n  ApplicationStart: [\n",
            "did not find expected node content",
        ),
        (
            "version: 0.0\nos: linux\nhooks:\n  ApplicationStart:\n    - location: gone.sh\n",
            "\"gone.sh\" is not a regular file",
        ),
    ] {
        let tree = work.path().join("tree");
        let _ = fs::remove_dir_all(&tree);
        fs::create_dir_all(&tree).expect("mkdir");
        fs::write(tree.join("appspec.yml"), appspec).expect("write");
        let error = build_from_dir(&tree, &work.path().join("out.zip")).expect_err("refused");
        let text = chain(&error);
        assert_eq!(text.matches(problem).count(), 1, "{text}");
        assert!(text.starts_with("invalid manifest: appspec.yml: "), "{text}");
    }
    let error = build_from_dir(&work.path().join("missing"), &work.path().join("out.zip")).expect_err("no tree");
    assert_eq!(chain(&error).matches("No such file").count(), 1, "{}", chain(&error));
}
