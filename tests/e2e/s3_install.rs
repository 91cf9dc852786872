//! Installing from the S3 server `tests/run` starts: pinned by object version,
//! verified against the registered sha256 and size, and resumed with a range
//! request after the connection breaks (through an in-test TCP proxy that cuts
//! the first response short).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use rollwave_tests::binary;
use rollwave_tests::s3::S3Bucket;

struct Archive {
    bytes: Vec<u8>,
    sha256: String,
}

/// A release of about `random_kib` KiB that does not compress, so the download is that large.
fn archive(dir: &Path, name: &str, random_kib: usize) -> Archive {
    let source = dir.join(format!("src-{name}"));
    std::fs::create_dir_all(&source).expect("source dir");
    std::fs::write(source.join("NAME"), name).expect("name file");
    let mut noise = vec![0u8; random_kib * 1024];
    getrandom::fill(&mut noise).expect("random bytes");
    std::fs::write(source.join("noise.bin"), noise).expect("noise");
    let path = dir.join(format!("{name}.zip"));
    let built = rollwave_release::build_from_dir(&source, &path).expect("build");
    Archive {
        bytes: std::fs::read(&path).expect("read archive"),
        sha256: built.sha256.to_hex(),
    }
}

fn install(root: &Path, endpoint: &str, bucket: &str, version_id: Option<&str>, archive: &Archive) -> Output {
    let mut command = Command::new(binary("rollwave-agent"));
    command
        .args(["install", "--bundle", "web", "--version", "1.0", "--no-hooks"])
        .args(["--sha256", &archive.sha256, "--size", &archive.bytes.len().to_string()])
        .args(["--s3-url", &format!("s3://{bucket}/releases/web/1.0.zip")])
        .args(["--s3-endpoint", endpoint, "--s3-path-style"])
        .arg("--root")
        .arg(root);
    if let Some(version_id) = version_id {
        command.args(["--s3-version-id", version_id]);
    }
    command.output().expect("run rollwave-agent install")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn installed_name(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join("releases/web/current/NAME")).ok()
}

#[test]
fn the_pinned_version_is_installed_even_after_the_key_is_overwritten() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bucket = S3Bucket::versioned();
    let good = archive(dir.path(), "good", 64);
    let version_id = bucket.put("releases/web/1.0.zip", &good.bytes).expect("a version id");
    // Someone replaces the object: a new version of the key, not the release.
    let evil = archive(dir.path(), "evil", 64);
    bucket.put("releases/web/1.0.zip", &evil.bytes).expect("a version id");

    let root = dir.path().join("root");
    let output = install(&root, &bucket.endpoint, &bucket.name, Some(&version_id), &good);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(installed_name(&root).as_deref(), Some("good"));
    assert!(
        std::fs::read_dir(root.join("downloads"))
            .expect("downloads")
            .next()
            .is_none(),
        "download removed"
    );
}

/// A truncated object (shorter than registered) used to look like a cut connection: the resume
/// asked for a range past its end and failed with S3's raw "InvalidRange". It is refused at once,
/// saying what is wrong.
#[test]
fn a_truncated_object_is_refused_as_shorter_than_registered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bucket = S3Bucket::unversioned();
    let good = archive(dir.path(), "good", 64);
    bucket.put("releases/web/1.0.zip", &good.bytes[..good.bytes.len() - 2]);
    let root = dir.path().join("root");
    let output = install(&root, &bucket.endpoint, &bucket.name, None, &good);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("shorter than the registered"), "{message}");
    assert!(message.contains("current release untouched"), "{message}");
    assert_eq!(installed_name(&root), None);
}

#[test]
fn a_replaced_object_is_refused_when_not_pinned_by_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bucket = S3Bucket::unversioned();
    let good = archive(dir.path(), "good", 64);
    bucket.put("releases/web/1.0.zip", &good.bytes);
    let evil = archive(dir.path(), "evil", 64);
    bucket.put("releases/web/1.0.zip", &evil.bytes);

    let root = dir.path().join("root");
    let output = install(&root, &bucket.endpoint, &bucket.name, None, &good);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    // About the same size (the same shape of tree, compressed a byte or two apart): the sha256,
    // or the registered length when it differs, catches it.
    assert!(
        message.contains("sha256 mismatch")
            || message.contains("larger than the registered")
            || message.contains("shorter than the registered"),
        "{message}"
    );
    assert!(message.contains("current release untouched"), "{message}");
    assert_eq!(installed_name(&root), None);

    // A bigger replacement is cut off at the registered size, never read whole.
    let bigger = archive(dir.path(), "bigger", 256);
    bucket.put("releases/web/1.0.zip", &bigger.bytes);
    let output = install(&root, &bucket.endpoint, &bucket.name, None, &good);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("larger than the registered"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_missing_version_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bucket = S3Bucket::versioned();
    let good = archive(dir.path(), "good", 16);
    bucket.put("releases/web/1.0.zip", &good.bytes);
    let root = dir.path().join("root");
    let output = install(&root, &bucket.endpoint, &bucket.name, Some("no-such-version"), &good);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("releases/web/1.0.zip (version no-such-version)"),
        "{message}"
    );
}

/// A TCP proxy to `upstream` that closes the first connection after
/// `cut_after` bytes of response (or, with `stall`, stops forwarding and
/// holds it open), and records every request head it forwards.
struct CuttingProxy {
    address: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl CuttingProxy {
    fn start(upstream: String, cut_after: usize) -> Self {
        Self::start_with(upstream, cut_after, false)
    }

    fn start_with(upstream: String, cut_after: usize, stall: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let address = listener.local_addr().expect("address").to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        std::thread::spawn(move || {
            for (index, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    return;
                };
                let limit = if index == 0 { Some(cut_after) } else { None };
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || relay(client, server, limit, stall, &seen));
            }
        });
        Self { address, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

fn relay(client: TcpStream, server: TcpStream, limit: Option<usize>, stall: bool, seen: &Mutex<Vec<String>>) {
    let (mut client_read, mut server_write) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
    let seen_requests = {
        let mut buffer = [0u8; 16384];
        let mut head = Vec::new();
        loop {
            let Ok(read) = client_read.read(&mut buffer) else {
                return;
            };
            if read == 0 {
                return;
            }
            head.extend_from_slice(&buffer[..read]);
            if server_write.write_all(&buffer[..read]).is_err() {
                return;
            }
            if head.windows(4).any(|window| window == b"\r\n\r\n") {
                break;
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    };
    seen.lock().expect("requests").push(seen_requests);
    // Later requests on the same connection pass through unrecorded.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_read, &mut server_write);
    });
    let (mut server_read, mut client_write) = (server, client);
    let mut buffer = [0u8; 16384];
    let mut sent = 0usize;
    while let Ok(read) = server_read.read(&mut buffer) {
        if read == 0 {
            break;
        }
        let allowed = limit.map_or(read, |limit| read.min(limit.saturating_sub(sent)));
        if client_write.write_all(&buffer[..allowed]).is_err() {
            break;
        }
        sent += allowed;
        if limit.is_some_and(|limit| sent >= limit) {
            if stall {
                // Hold the connection open without sending more, like a stuck network.
                std::thread::sleep(std::time::Duration::from_secs(120));
            }
            break;
        }
    }
    let _ = client_write.shutdown(Shutdown::Both);
    let _ = server_read.shutdown(Shutdown::Both);
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request_on_the_same_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bucket = S3Bucket::versioned();
    let release = archive(dir.path(), "big", 4096);
    let version_id = bucket.put("releases/web/1.0.zip", &release.bytes).expect("version id");
    let upstream = bucket.endpoint.trim_start_matches("http://").to_owned();
    let proxy = CuttingProxy::start(upstream, 1024 * 1024);

    let root = dir.path().join("root");
    let endpoint = format!("http://{}", proxy.address);
    let output = install(&root, &endpoint, &bucket.name, Some(&version_id), &release);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(installed_name(&root).as_deref(), Some("big"));
    assert!(
        stderr(&output).contains("download interrupted; will resume"),
        "{}",
        stderr(&output)
    );

    let gets: Vec<String> = proxy
        .requests()
        .into_iter()
        .filter(|head| head.starts_with("GET "))
        .collect();
    assert!(gets.len() >= 2, "a second GET after the cut: {gets:?}");
    let resumed = gets.last().expect("resumed GET").to_ascii_lowercase();
    assert!(resumed.contains("range: bytes="), "{resumed}");
    assert!(
        !resumed.contains("range: bytes=0-"),
        "it resumes after what it has: {resumed}"
    );
    assert!(
        resumed.contains(&format!("versionid={}", version_id.to_ascii_lowercase())),
        "{resumed}"
    );
}

#[test]
fn an_agent_killed_mid_download_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bucket = S3Bucket::versioned();
    let release = archive(dir.path(), "big", 8192);
    let version_id = bucket.put("releases/web/1.0.zip", &release.bytes).expect("version id");
    let upstream = bucket.endpoint.trim_start_matches("http://").to_owned();
    let stalling = CuttingProxy::start_with(upstream.clone(), 4 * 1024 * 1024, true);

    let root = dir.path().join("root");
    let mut child = {
        let endpoint = format!("http://{}", stalling.address);
        let mut command = Command::new(binary("rollwave-agent"));
        command
            .args(["install", "--bundle", "web", "--version", "1.0", "--no-hooks"])
            .args(["--sha256", &release.sha256, "--size", &release.bytes.len().to_string()])
            .args(["--s3-url", &format!("s3://{}/releases/web/1.0.zip", bucket.name)])
            .args([
                "--s3-endpoint",
                &endpoint,
                "--s3-path-style",
                "--s3-version-id",
                &version_id,
            ])
            .arg("--root")
            .arg(&root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command.spawn().expect("spawn install")
    };
    let partial = root.join(format!("downloads/{}.partial", release.sha256));
    let kept = rollwave_tests::wait_for("part of the download on disk", || {
        std::fs::metadata(&partial)
            .ok()
            .map(|metadata| metadata.len())
            .filter(|length| *length >= 1024 * 1024)
    });
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert_eq!(installed_name(&root), None, "nothing current yet");

    let recording = CuttingProxy::start(upstream, usize::MAX);
    let output = install(
        &root,
        &format!("http://{}", recording.address),
        &bucket.name,
        Some(&version_id),
        &release,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(installed_name(&root).as_deref(), Some("big"));
    let gets: Vec<String> = recording
        .requests()
        .into_iter()
        .filter(|head| head.starts_with("GET "))
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    let resumed = gets[0].to_ascii_lowercase();
    let from: u64 = resumed
        .split("range: bytes=")
        .nth(1)
        .and_then(|rest| rest.split('-').next())
        .and_then(|offset| offset.trim().parse().ok())
        .unwrap_or_else(|| panic!("a range request: {resumed}"));
    assert!(from >= kept, "resumed from {from}, at least the {kept} bytes kept");
}

#[test]
fn an_agent_killed_mid_unpack_leaves_no_staging_and_installs_next_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("many");
    for directory in 0..40 {
        let path = source.join(format!("d{directory:02}"));
        std::fs::create_dir_all(&path).expect("dir");
        for file in 0..100 {
            std::fs::write(
                path.join(format!("f{file:03}")),
                format!("{directory}/{file}\n").repeat(200),
            )
            .expect("file");
        }
    }
    std::fs::write(source.join("NAME"), "many").expect("name");
    let archive_path = dir.path().join("many.zip");
    let built = rollwave_release::build_from_dir(&source, &archive_path).expect("build");
    let sha256 = built.sha256.to_hex();
    let root = dir.path().join("root");
    let command = |root: &Path| {
        let mut command = Command::new(binary("rollwave-agent"));
        command
            .args([
                "install",
                "--bundle",
                "web",
                "--version",
                "1.0",
                "--no-hooks",
                "--sha256",
                &sha256,
            ])
            .arg("--archive")
            .arg(&archive_path)
            .arg("--root")
            .arg(root);
        command
    };
    let mut child = command(&root).spawn().expect("spawn");
    let bundle_dir = root.join("releases/web");
    let caught = rollwave_tests::wait_for("the staging dir or the end of the install", || {
        let staging = std::fs::read_dir(&bundle_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .any(|entry| entry.file_name().to_string_lossy().starts_with(".staging-"))
            })
            .unwrap_or(false);
        if staging {
            return Some(true);
        }
        child.try_wait().expect("try_wait").map(|_| false)
    });
    assert!(caught, "the unpack was too quick to interrupt");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    let output = Command::new(binary("rollwave-agent"))
        .args(["recover", "--root"])
        .arg(&root)
        .output()
        .expect("recover");
    assert!(output.status.success(), "{}", stderr(&output));
    let names: Vec<String> = std::fs::read_dir(&bundle_dir)
        .expect("bundle dir")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|name| name.starts_with('.')),
        "no staging left: {names:?}"
    );
    assert_eq!(
        installed_name(&root).as_deref(),
        Some("many"),
        "recover finished the install"
    );
    let output = command(&root).output().expect("install again");
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("nothing to do"));
}
