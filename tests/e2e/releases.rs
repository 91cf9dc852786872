//! Verified releases, the operator's half: `rollwave release build` makes the
//! same bytes from the same files (directory or Git tag/commit, offline),
//! `release push` uploads to a real S3 server (moto, started by tests/run)
//! and registers the object version, a version names one archive forever,
//! and `release list|show` report what is registered.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use rollwave_tests::{Cluster, Coordinator, S3Bucket, try_rollwave_offline};
use serde_json::Value;

/// The files of a small bundle with a valid manifest, a script, a nested
/// directory and a symlink; `marker` changes one file's contents.
fn write_tree(dir: &Path, marker: &str) {
    std::fs::create_dir_all(dir.join("hooks")).expect("hooks dir");
    std::fs::create_dir_all(dir.join("public/css")).expect("nested dir");
    std::fs::write(
        dir.join("rollwave.toml"),
        "[hooks]\napplication_start = { path = \"hooks/start.sh\", timeout = \"30s\" }\n",
    )
    .expect("manifest");
    std::fs::write(dir.join("hooks/start.sh"), "#!/bin/sh\necho started\n").expect("hook");
    std::fs::set_permissions(dir.join("hooks/start.sh"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(dir.join("public/index.html"), format!("<h1>{marker}</h1>\n")).expect("index");
    std::fs::write(dir.join("public/css/site.css"), "body { margin: 0 }\n").expect("css");
    std::os::unix::fs::symlink("public/index.html", dir.join("index.html")).expect("symlink");
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs the CLI without a coordinator and expects success; returns stdout.
fn offline(args: &[&str]) -> String {
    let output = try_rollwave_offline(args);
    assert!(output.status.success(), "rollwave {args:?} failed: {}", stderr(&output));
    stdout(&output)
}

/// `release build ... --output json`, parsed.
fn build_json(args: &[&str]) -> Value {
    let mut all = vec!["release", "build"];
    all.extend_from_slice(args);
    all.extend(["--output", "json"]);
    serde_json::from_str(&offline(&all)).expect("build prints JSON")
}

fn build_dir(source: &Path, out: &Path) -> Value {
    build_json(&[path_str(source), "--out", path_str(out)])
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

fn sha256_hex(path: &Path) -> String {
    rollwave_release::hash_file(path).expect("hash").0.to_hex()
}

/// Sets every file's modification time (not following symlinks' targets twice).
fn touch_all(dir: &Path, when: SystemTime) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("dir entry");
        let file_type = entry.file_type().expect("file type");
        if file_type.is_dir() {
            touch_all(&entry.path(), when);
        } else if file_type.is_file() {
            let file = std::fs::File::options()
                .write(true)
                .open(entry.path())
                .expect("open for touch");
            file.set_modified(when).expect("set mtime");
        }
    }
}

#[test]
fn a_directory_build_leaves_out_git_and_rollwaveignored_secrets_and_says_so() {
    let temp = tempfile::tempdir().expect("temp dir");
    let source = temp.path().join("site");
    write_tree(&source, "one");
    let clean = build_dir(&source, &temp.path().join("clean.zip"));
    for (path, contents) in [
        (
            ".git/config",
            "[remote \"origin\"]\n\turl = https://user:token@example.com/site.git\n",
        ),
        (".env", "DB_PASSWORD=secret\n"),
        (".rollwaveignore", ".env\n"),
    ] {
        let full = source.join(path);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(full, contents).expect("write");
    }
    let built = build_dir(&source, &temp.path().join("built.zip"));
    assert_eq!(
        built["left_out"],
        serde_json::json!([
            { "path": ".env", "reason": ".rollwaveignore: .env" },
            { "path": ".git/", "reason": "version control" },
        ]),
        "{built}"
    );
    assert_eq!(
        built["entries"].as_u64(),
        clean["entries"].as_u64().map(|entries| entries + 1),
        "only .rollwaveignore itself is added: {built}"
    );
    let archive = std::fs::read(temp.path().join("built.zip")).expect("archive");
    assert!(
        !archive.windows(b"token@".len()).any(|window| window == b"token@")
            && !archive.windows(b".git/".len()).any(|window| window == b".git/"),
        "the archive carries .git"
    );
    let table = offline(&[
        "release",
        "build",
        path_str(&source),
        "--out",
        path_str(&temp.path().join("table.zip")),
    ]);
    assert!(
        table.contains("left out (not in the archive):\n  .env   .rollwaveignore: .env\n  .git/  version control\n"),
        "{table}"
    );
}

#[test]
fn building_the_same_directory_gives_the_same_bytes_without_a_coordinator() {
    let temp = tempfile::tempdir().expect("temp dir");
    let source = temp.path().join("site");
    write_tree(&source, "one");
    let first = temp.path().join("first.zip");
    let second = temp.path().join("second.zip");
    let touched = temp.path().join("touched.zip");

    // No --config, no ROLLWAVE_* settings: building never dials a coordinator.
    let built = build_dir(&source, &first);
    build_dir(&source, &second);
    touch_all(&source, SystemTime::now() - Duration::from_secs(86_400 * 400));
    build_dir(&source, &touched);

    let bytes = std::fs::read(&first).expect("first archive");
    assert_eq!(
        bytes,
        std::fs::read(&second).expect("second archive"),
        "rebuild differs"
    );
    assert_eq!(
        bytes,
        std::fs::read(&touched).expect("touched archive"),
        "mtimes leaked into the archive"
    );
    assert_eq!(built["sha256"], sha256_hex(&first), "{built}");
    assert_eq!(built["size"], bytes.len() as u64, "{built}");
    assert_eq!(built["path"], path_str(&first), "{built}");
    // rollwave.toml, index.html, hooks/, hooks/start.sh, public/, public/index.html, public/css/, public/css/site.css
    assert_eq!(built["entries"], 8, "{built}");
    assert_eq!(built["git_commit"], Value::Null, "{built}");

    let human = offline(&["release", "build", path_str(&source), "--out", path_str(&second)]);
    assert!(human.contains(&format!("sha256 {}", sha256_hex(&first))), "{human}");
    assert!(human.contains(&format!("{} bytes", bytes.len())), "{human}");

    // The archive must not land inside the tree it archives.
    let inside = try_rollwave_offline(&[
        "release",
        "build",
        path_str(&source),
        "--out",
        path_str(&source.join("out.zip")),
    ]);
    assert_eq!(inside.status.code(), Some(1), "{}", stderr(&inside));
    assert!(stderr(&inside).contains("is inside"), "{}", stderr(&inside));

    // Neither a directory nor --git-ref is a usage error.
    let usage = try_rollwave_offline(&["release", "build", "--out", path_str(&first)]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
}

#[test]
fn an_invalid_manifest_is_refused_at_build_time_naming_the_problem() {
    let temp = tempfile::tempdir().expect("temp dir");
    let source = temp.path().join("site");
    write_tree(&source, "one");
    std::fs::write(
        source.join("rollwave.toml"),
        "[hooks]\napplication_start = { path = \"hooks/missing.sh\" }\n",
    )
    .expect("manifest");
    let out = temp.path().join("site.zip");
    let output = try_rollwave_offline(&["release", "build", path_str(&source), "--out", path_str(&out)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("invalid manifest")
            && message.contains("rollwave.toml")
            && message.contains("hooks/missing.sh"),
        "{message}"
    );
    assert!(!out.exists(), "no archive is written for an invalid bundle");

    std::fs::write(source.join("rollwave.toml"), "[hook]\n").expect("manifest with a typo");
    let output = try_rollwave_offline(&["release", "build", path_str(&source), "--out", path_str(&out)]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("unknown field `hook`"), "{}", stderr(&output));
}

/// `git` with no user or system configuration, so the test sees the same Git everywhere.
fn git(repo: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=Rollwave Test",
            "-c",
            "user.email=test@rollwave.invalid",
        ])
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("run git (is it installed?)");
    assert!(output.status.success(), "git {args:?}: {}", stderr(&output));
    stdout(&output).trim().to_owned()
}

#[test]
fn building_from_a_git_tag_or_commit_matches_the_directory_and_a_branch_is_refused() {
    let temp = tempfile::tempdir().expect("temp dir");
    let repo = temp.path().join("repo");
    write_tree(&repo, "one");
    git(&repo, &["init", "--quiet", "--initial-branch=main"]);
    git(&repo, &["add", "--all"]);
    git(&repo, &["commit", "--quiet", "-m", "one"]);
    git(&repo, &["tag", "--annotate", "-m", "release 1.0", "v1.0"]);
    git(&repo, &["tag", "light"]);
    let commit = git(&repo, &["rev-parse", "HEAD"]);
    // The working copy moves on; tags and commit ids do not.
    std::fs::write(repo.join("public/index.html"), "<h1>two</h1>\n").expect("edit");
    git(&repo, &["commit", "--quiet", "--all", "-m", "two"]);
    std::fs::write(repo.join("public/index.html"), "<h1>uncommitted</h1>\n").expect("edit");

    let plain = temp.path().join("plain");
    write_tree(&plain, "one");
    let expected_path = temp.path().join("from-dir.zip");
    build_dir(&plain, &expected_path);
    let expected = std::fs::read(&expected_path).expect("directory build");

    let repo_arg = path_str(&repo);
    for (reference, tag) in [
        ("v1.0", Some("refs/tags/v1.0")),
        ("refs/tags/v1.0", Some("refs/tags/v1.0")),
        ("light", Some("refs/tags/light")),
        (commit.as_str(), None),
        (&commit[..10], None),
    ] {
        let out = temp.path().join(format!("git-{}.zip", reference.replace('/', "_")));
        let built = build_json(&["--git-ref", reference, "--repo", repo_arg, "--out", path_str(&out)]);
        assert_eq!(built["git_commit"], commit.as_str(), "{reference}: {built}");
        assert_eq!(
            built["git_tag"],
            tag.map_or(Value::Null, Value::from),
            "{reference}: {built}"
        );
        assert_eq!(
            std::fs::read(&out).expect("git build"),
            expected,
            "{reference}: a Git build differs from the directory build of the same files"
        );
    }

    let out = temp.path().join("refused.zip");
    let branch = try_rollwave_offline(&[
        "release",
        "build",
        "--git-ref",
        "main",
        "--repo",
        repo_arg,
        "--out",
        path_str(&out),
    ]);
    assert_eq!(branch.status.code(), Some(1), "{}", stderr(&branch));
    let message = stderr(&branch);
    assert!(
        message.contains("\"main\" is a branch") && message.contains("git tag"),
        "the refusal explains why and what to do: {message}"
    );
    for moving in ["HEAD", "v1.0~0", "nonexistent"] {
        let output = try_rollwave_offline(&[
            "release",
            "build",
            "--git-ref",
            moving,
            "--repo",
            repo_arg,
            "--out",
            path_str(&out),
        ]);
        assert_eq!(output.status.code(), Some(1), "{moving}: {}", stderr(&output));
        assert!(
            stderr(&output).contains("neither a tag nor a commit id"),
            "{moving}: {}",
            stderr(&output)
        );
    }
    let unknown = try_rollwave_offline(&[
        "release",
        "build",
        "--git-ref",
        "deadbeef",
        "--repo",
        repo_arg,
        "--out",
        path_str(&out),
    ]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("no commit \"deadbeef\""),
        "{}",
        stderr(&unknown)
    );
    assert!(!out.exists(), "refused builds write nothing");
}

/// A release test's world: a coordinator, a bucket and a source tree.
struct World {
    cluster: Cluster,
    bucket: S3Bucket,
}

impl World {
    fn new(versioned: bool) -> Self {
        Self {
            cluster: Cluster::start(0),
            bucket: S3Bucket::create(versioned),
        }
    }

    fn coordinator(&self) -> &Coordinator {
        &self.cluster.coordinator
    }

    fn dir(&self) -> &Path {
        self.cluster.temp.path()
    }

    /// Builds an archive whose contents depend on `marker`.
    fn archive(&self, marker: &str) -> PathBuf {
        let source = self.dir().join(format!("src-{marker}"));
        if !source.exists() {
            write_tree(&source, marker);
        }
        let out = self.dir().join(format!("{marker}.zip"));
        build_dir(&source, &out);
        out
    }

    /// `release push FILE --bundle B --version V <bucket flags> <extra>`.
    fn try_push(&self, file: &Path, bundle: &str, version: &str, extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec![
            "release".into(),
            "push".into(),
            path_str(file).into(),
            // The `=` form, so names starting with `-` reach the name check.
            format!("--bundle={bundle}"),
            format!("--version={version}"),
        ];
        args.extend(self.bucket.push_args());
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.coordinator().try_cli(&args)
    }

    fn push_json(&self, file: &Path, bundle: &str, version: &str, extra: &[&str]) -> Value {
        let mut extra = extra.to_vec();
        extra.extend(["--output", "json"]);
        let output = self.try_push(file, bundle, version, &extra);
        assert!(output.status.success(), "push {bundle}@{version}: {}", stderr(&output));
        serde_json::from_str(&stdout(&output)).expect("push prints JSON")
    }

    fn show(&self, bundle: &str, version: &str) -> Value {
        self.coordinator().cli_json(&["release", "show", bundle, version])
    }
}

fn key(bundle: &str, version: &str) -> String {
    format!("releases/{bundle}/{version}.zip")
}

#[test]
fn a_push_records_the_object_version_and_a_version_names_one_archive_forever() {
    let world = World::new(true);
    let archive = world.archive("one");
    let sha256 = sha256_hex(&archive);
    let bytes = std::fs::read(&archive).expect("archive");

    let pushed = world.push_json(&archive, "site", "1.0", &[]);
    assert_eq!(pushed["status"], "registered", "{pushed}");
    assert_eq!(pushed["uploaded"], true, "{pushed}");
    let release = &pushed["release"];
    let object_version = release["object_version"]
        .as_str()
        .expect("a versioned bucket gives a version id");
    assert!(!object_version.is_empty());
    assert_eq!(release["sha256"], sha256.as_str());
    assert_eq!(release["size"], bytes.len() as u64);
    assert_eq!(release["kind"], "app", "the default kind");
    assert_eq!(release["bucket"], world.bucket.name.as_str());
    assert_eq!(release["key"], key("site", "1.0"));
    assert_eq!(release["pushed_by"], "admin", "the operator behind the token");

    // The registered version holds exactly the archive's bytes.
    let versions = world.bucket.object_versions(&key("site", "1.0"));
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(versions[0].version_id.as_deref(), Some(object_version));
    assert_eq!(world.bucket.get(&key("site", "1.0"), Some(object_version)), bytes);

    let shown = world.show("site", "1.0");
    assert_eq!(&shown, release, "show reports what push registered");
    let table = world.coordinator().cli(&["release", "show", "site", "1.0"]);
    assert!(table.contains(object_version), "{table}");
    assert!(table.contains(&sha256), "show prints the whole sha256: {table}");

    // The same file again: nothing uploaded, nothing changed.
    let again = world.push_json(&archive, "site", "1.0", &[]);
    assert_eq!(again["status"], "already_registered", "{again}");
    assert_eq!(again["uploaded"], false, "{again}");
    assert_eq!(&again["release"], release);
    let human = world.try_push(&archive, "site", "1.0", &[]);
    assert!(human.status.success(), "{}", stderr(&human));
    assert!(stdout(&human).contains("already registered"), "{}", stdout(&human));
    assert_eq!(world.bucket.object_versions(&key("site", "1.0")).len(), 1);

    // Other content under the same version: refused before any upload.
    let other = world.archive("two");
    let other_sha256 = sha256_hex(&other);
    let refused = world.try_push(&other, "site", "1.0", &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains(&sha256) && message.contains(&other_sha256) && message.contains("new version"),
        "the refusal names both digests and the way out: {message}"
    );
    assert!(message.contains("nothing was uploaded"), "{message}");
    let versions = world.bucket.object_versions(&key("site", "1.0"));
    assert_eq!(versions.len(), 1, "the refused push uploaded something: {versions:?}");
    assert_eq!(world.bucket.get(&key("site", "1.0"), None), bytes);
    assert_eq!(&world.show("site", "1.0"), release);

    // As a new version it is welcome.
    let next = world.push_json(&other, "site", "1.1", &[]);
    assert_eq!(next["status"], "registered", "{next}");
    assert_eq!(next["release"]["sha256"], other_sha256.as_str());
}

#[test]
fn a_push_to_an_unversioned_bucket_is_refused_before_uploading_unless_allowed() {
    let world = World::new(false);
    let archive = world.archive("one");

    let refused = world.try_push(&archive, "site", "1.0", &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains("NOT pushed") && message.contains("versioning") && message.contains("--allow-unversioned"),
        "the refusal explains bucket versioning and the way out: {message}"
    );
    assert!(message.contains("nothing was uploaded"), "{message}");
    assert_eq!(
        world.bucket.keys(),
        Vec::<String>::new(),
        "the refused push wrote to the bucket"
    );
    let missing = world.coordinator().try_cli(&["release", "show", "site", "1.0"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("not registered"), "{}", stderr(&missing));

    let pushed = world.push_json(&archive, "site", "1.0", &["--allow-unversioned"]);
    assert_eq!(pushed["status"], "registered", "{pushed}");
    assert_eq!(pushed["release"]["object_version"], Value::Null, "{pushed}");
    assert_eq!(world.show("site", "1.0")["object_version"], Value::Null);
    assert_eq!(
        world.bucket.get(&key("site", "1.0"), None),
        std::fs::read(&archive).expect("archive")
    );
    let table = world.coordinator().cli(&["release", "show", "site", "1.0"]);
    let line = table
        .lines()
        .find(|line| line.starts_with("object_version"))
        .expect("object_version line");
    assert_eq!(line.split_whitespace().nth(1), Some("-"), "{table}");
}

#[test]
fn invalid_names_are_refused_with_the_rule_before_anything_is_uploaded() {
    let world = World::new(true);
    let archive = world.archive("one");
    for (bundle, version, fragment) in [
        ("web/app", "1.0", "bundle name \"web/app\" is invalid"),
        ("-web", "1.0", "bundle name \"-web\" is invalid"),
        ("web", "current", "version \"current\" is invalid"),
        ("web", "1.0 beta", "version \"1.0 beta\" is invalid"),
    ] {
        let output = world.try_push(&archive, bundle, version, &[]);
        assert_eq!(output.status.code(), Some(1), "{bundle}@{version}: {}", stderr(&output));
        let message = stderr(&output);
        assert!(message.contains(fragment), "{message}");
        assert!(
            message.contains("1 to 128 characters from A-Z a-z 0-9 . _ + -"),
            "the message states the rule: {message}"
        );
    }
    assert_eq!(world.bucket.keys(), Vec::<String>::new(), "nothing was uploaded");
    let releases = world.coordinator().cli_json(&["release", "list"]);
    assert_eq!(releases, Value::Array(Vec::new()));
}

#[test]
fn list_filters_by_bundle_and_a_bundle_keeps_its_kind() {
    let world = World::new(true);
    let one = world.archive("one");
    let two = world.archive("two");
    world.push_json(&one, "site", "1.0", &[]);
    world.push_json(&two, "site", "1.1", &[]);

    // Bucket and endpoint from the environment this time.
    let env = [
        ("ROLLWAVE_S3_BUCKET", world.bucket.name.as_str()),
        ("ROLLWAVE_S3_ENDPOINT", world.bucket.endpoint.as_str()),
        ("ROLLWAVE_S3_PATH_STYLE", "true"),
    ];
    let from_env = world.coordinator().try_cli_with_env(
        &[
            "release",
            "push",
            path_str(&one),
            "--bundle",
            "chef",
            "--version",
            "7",
            "--kind",
            "cookbook",
            "--output",
            "json",
        ],
        &env,
    );
    assert!(from_env.status.success(), "{}", stderr(&from_env));
    let pushed: Value = serde_json::from_slice(&from_env.stdout).expect("JSON");
    assert_eq!(pushed["release"]["bucket"], world.bucket.name.as_str());

    let names = |releases: &Value| -> Vec<String> {
        releases
            .as_array()
            .expect("a list")
            .iter()
            .map(|release| {
                format!(
                    "{}@{} {}",
                    release["bundle"].as_str().unwrap_or(""),
                    release["version"].as_str().unwrap_or(""),
                    release["kind"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let all = world.coordinator().cli_json(&["release", "list"]);
    assert_eq!(names(&all), ["chef@7 cookbook", "site@1.0 app", "site@1.1 app"]);
    let site = world.coordinator().cli_json(&["release", "list", "--bundle", "site"]);
    assert_eq!(names(&site), ["site@1.0 app", "site@1.1 app"]);
    let chef = world.coordinator().cli_json(&["release", "list", "--bundle", "chef"]);
    assert_eq!(names(&chef), ["chef@7 cookbook"]);

    let table = world.coordinator().cli(&["release", "list", "--bundle", "site"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("BUNDLE") && lines[0].contains("OBJECT VERSION"),
        "{table}"
    );
    assert!(lines[1].starts_with("site") && lines[1].contains("1.0"), "{table}");

    // A new version of an app bundle cannot be a cookbook: refused before upload.
    let refused = world.try_push(&one, "site", "2.0", &["--kind", "cookbook"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("has kind app, not cookbook"),
        "{}",
        stderr(&refused)
    );
    assert!(
        world.bucket.try_get(&key("site", "2.0"), None).is_none(),
        "nothing uploaded"
    );
}

#[test]
fn release_commands_without_a_valid_operator_token_or_bucket_are_refused() {
    let world = World::new(true);
    let archive = world.archive("one");
    let list = world
        .coordinator()
        .try_cli(&["--token", "not-a-token", "release", "list"]);
    assert_eq!(list.status.code(), Some(1), "{}", stderr(&list));
    assert!(stderr(&list).contains("unknown operator token"), "{}", stderr(&list));

    let mut args = vec![
        "--token",
        "not-a-token",
        "release",
        "push",
        path_str(&archive),
        "--bundle",
        "site",
        "--version",
        "1.0",
    ];
    let bucket_args = world.bucket.push_args();
    args.extend(bucket_args.iter().map(String::as_str));
    let push = world.coordinator().try_cli(&args);
    assert_eq!(push.status.code(), Some(1), "{}", stderr(&push));
    assert!(stderr(&push).contains("unknown operator token"), "{}", stderr(&push));
    assert_eq!(
        world.bucket.keys(),
        Vec::<String>::new(),
        "a refused operator uploads nothing"
    );

    // No bucket anywhere is a configuration error (exit 64) that says how to give one.
    let no_bucket = world.coordinator().try_cli(&[
        "release",
        "push",
        path_str(&archive),
        "--bundle",
        "site",
        "--version",
        "1.0",
    ]);
    assert_eq!(no_bucket.status.code(), Some(64), "{}", stderr(&no_bucket));
    assert!(
        stderr(&no_bucket).contains("ROLLWAVE_S3_BUCKET"),
        "{}",
        stderr(&no_bucket)
    );
}
