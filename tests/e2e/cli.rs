//! The command lines as a first-time operator meets them: a closed pipe, logs in files, help
//! text, usage errors and what table output looks like.

use std::process::{Command, Output, Stdio};

use rollwave_tests::{Cluster, Fleet, binary};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `command` with stdout a pipe whose reader has already gone away, as in `... | head -3`
/// once head has read its lines.
fn run_into_closed_pipe(mut command: Command) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let child = command
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    // `command` still holds the write end; drop it so nothing but the child has it.
    drop(command);
    child.wait_with_output().expect("wait for the command")
}

fn assert_stopped_quietly(what: &str, output: &Output) {
    let message = stderr(output);
    assert_ne!(output.status.code(), Some(101), "{what} panicked: {message}");
    assert!(!message.contains("panicked"), "{what}: {message}");
    assert!(!message.contains("Broken pipe"), "{what}: {message}");
    assert_eq!(
        output.status.code(),
        Some(141),
        "{what} exits as SIGPIPE would: {message}"
    );
}

#[test]
fn a_closed_stdout_stops_both_binaries_quietly_instead_of_panicking() {
    let fleet = Fleet::start(1);
    fleet.push("1.0");
    let config = fleet.cluster.coordinator.data_dir().join("cli.toml");
    let commands: [&[&str]; 4] = [
        &[
            "deploy",
            "web",
            "app@1.0",
            "--strategy",
            "all-at-once",
            "--plan",
            "-o",
            "json",
        ],
        &["deploy", "web", "app@1.0", "--strategy", "all-at-once", "--plan"],
        &["event", "list", "-o", "json"],
        &["stack", "list"],
    ];
    for args in commands {
        let mut command = Command::new(binary("rollwave"));
        command.arg("--config").arg(&config).args(args);
        assert_stopped_quietly(&format!("rollwave {args:?}"), &run_into_closed_pipe(command));
    }

    let archive = fleet.work.path().join("app-1.0.zip");
    let (sha256, _) = rollwave_release::hash_file(&archive).expect("hash the archive");
    let root = fleet.work.path().join("agent-root");
    let mut command = Command::new(binary("rollwave-agent"));
    command
        .args([
            "install",
            "--bundle",
            "app",
            "--version",
            "1.0",
            "--no-hooks",
            "--sha256",
        ])
        .arg(sha256.to_hex())
        .arg("--archive")
        .arg(&archive)
        .arg("--root")
        .arg(&root);
    let output = run_into_closed_pipe(command);
    assert_stopped_quietly("rollwave-agent install", &output);
    assert!(
        root.join("releases/app/current").exists(),
        "the install itself went through"
    );
}

#[test]
fn logs_written_to_files_carry_no_colour_codes() {
    let cluster = Cluster::start(1);
    let coordinator_log = cluster.coordinator.log_text();
    let agent_log = cluster.agents[0].log_text();
    assert!(coordinator_log.contains("INFO"), "{coordinator_log}");
    assert!(agent_log.contains("INFO"), "{agent_log}");
    for (name, log) in [("coordinator", coordinator_log), ("agent", agent_log)] {
        assert!(
            !log.contains('\x1b'),
            "the {name}'s log file has ANSI escape codes: {log:?}"
        );
    }
}

#[test]
fn token_create_refuses_zero_uses_and_a_zero_ttl_with_the_rule() {
    let cluster = Cluster::start(0);
    let coordinator = &cluster.coordinator;
    for (args, rule) in [
        (["--uses", "0"], "admits 1 to 100000 instances"),
        (["--ttl", "0s"], "lives from 1s to 30days"),
        (["--ttl", "500ms"], "lives from 1s to 30days"),
    ] {
        let mut all = vec!["token", "create", "--stack", "web"];
        all.extend(args);
        let output = coordinator.try_cli(&all);
        assert_eq!(output.status.code(), Some(2), "a usage error: {}", stderr(&output));
        assert!(stderr(&output).contains(rule), "{args:?}: {}", stderr(&output));
    }
    let tokens = coordinator.cli_json(&["token", "list"]);
    assert_eq!(
        tokens.as_array().map(Vec::len),
        Some(0),
        "nothing was created: {tokens}"
    );
}

#[test]
fn server_help_lists_no_client_flags_and_refuses_them() {
    let help = Command::new(binary("rollwave"))
        .args(["server", "--help"])
        .output()
        .expect("run rollwave server --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--ca-cert"), "{help}");
    for flag in ["--ca ", "--addr", "--token", "--config"] {
        assert!(
            !help.contains(flag),
            "server --help lists the client flag {flag}: {help}"
        );
    }
    for args in [
        ["server", "--data-dir", "/nonexistent", "--ca", "ca.pem"],
        ["--ca", "ca.pem", "server", "--data-dir", "/nonexistent"],
    ] {
        let output = Command::new(binary("rollwave"))
            .args(args)
            .output()
            .expect("run rollwave");
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("--ca"), "{}", stderr(&output));
    }
    let client_help = Command::new(binary("rollwave"))
        .args(["instance", "list", "--help"])
        .output()
        .expect("run rollwave instance list --help");
    assert!(String::from_utf8_lossy(&client_help.stdout).contains("--ca <CA>"));
}

#[test]
fn help_examples_stay_whole_in_a_narrow_terminal() {
    let help = Command::new(binary("rollwave"))
        .args(["release", "push", "--help"])
        .env("COLUMNS", "50")
        .output()
        .expect("run rollwave release push --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains(
            "\n  rollwave release push site-1.4.2.zip --bundle site --version 1.4.2 \\\n      --bucket my-releases\n"
        ),
        "{help}"
    );
    let help = Command::new(binary("rollwave-agent"))
        .args(["install", "--help"])
        .env("COLUMNS", "50")
        .output()
        .expect("run rollwave-agent install --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("\n  rollwave-agent install --archive web-1.4.zip --sha256 9f2c... --bundle web \\\n"),
        "{help}"
    );
}

#[test]
fn event_list_filters_by_stack_instance_operator_and_time() {
    let cluster = Cluster::start(1);
    let coordinator = &cluster.coordinator;
    coordinator.create_stack("batch");
    let instance = cluster.agents[0].identity()["instance_id"]
        .as_str()
        .expect("instance id")
        .to_owned();
    let actions = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["event", "list"];
        all.extend(args);
        let events = coordinator.cli_json(&all);
        events
            .as_array()
            .expect("a list")
            .iter()
            .map(|event| {
                format!(
                    "{} {}",
                    event["action"].as_str().unwrap_or("?"),
                    event["target"].as_str().unwrap_or("?")
                )
            })
            .collect()
    };
    assert_eq!(actions(&["--stack", "batch"]), ["stack.create batch"]);
    let web = actions(&["--stack", "web"]);
    assert!(web.contains(&format!("instance.join {instance}")), "{web:?}");
    assert!(!web.iter().any(|event| event.ends_with("batch")), "{web:?}");
    assert_eq!(
        actions(&["--instance", &instance]),
        [format!("instance.join {instance}")]
    );
    let by_admin = actions(&["--operator", "admin"]);
    assert!(by_admin.contains(&"stack.create batch".to_owned()), "{by_admin:?}");
    assert!(
        !by_admin.iter().any(|event| event.starts_with("instance.join")),
        "{by_admin:?}"
    );
    assert_eq!(actions(&["--since", "2999-01-01T00:00:00Z"]), Vec::<String>::new());
    assert_eq!(actions(&["--stack", "batch", "--since", "1h"]), ["stack.create batch"]);
}

#[test]
fn status_without_a_stack_shows_every_stack() {
    let cluster = Cluster::start(0);
    cluster.coordinator.create_stack("batch");
    let overview = cluster.coordinator.cli(&["status"]);
    assert!(overview.contains("web\n") && overview.contains("batch\n"), "{overview}");
    let statuses = cluster.coordinator.cli_json(&["status"]);
    let stacks: Vec<&str> = statuses
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|status| status["stack"].as_str())
        .collect();
    assert!(stacks.contains(&"web") && stacks.contains(&"batch"), "{statuses}");
}

#[test]
fn instance_show_prints_no_raw_json_in_table_mode() {
    let cluster = Cluster::start(1);
    let instance = cluster.agents[0].identity()["instance_id"]
        .as_str()
        .expect("instance id")
        .to_owned();
    let shown = cluster.coordinator.cli(&["instance", "show", &instance]);
    assert!(
        shown
            .lines()
            .any(|line| line.starts_with("id ") && line.ends_with(&instance)),
        "{shown}"
    );
    assert!(
        !shown.contains(['{', '[', '"']),
        "raw JSON in `instance show`:\n{shown}"
    );
}
