//! Table-driven tests for manifest parsing: each case is a manifest text, the bundle's files
//! and either a one-line summary of the parsed manifest or a fragment of the error message.

use super::*;

const FILES: &[&str] = &[
    "hooks/before.sh",
    "hooks/after.sh",
    "hooks/stop.sh",
    "hooks/start.sh",
    "hooks/validate.sh",
    "scripts/install.sh",
    "scripts/start.sh",
    "bin/check",
    "bin/server",
];

enum Kind {
    Toml,
    Yml,
}

/// Renders a manifest as one line so expectations stay short and readable.
fn summarise(manifest: &Manifest) -> String {
    let mut parts = vec![manifest.source.file_name().to_owned()];
    for (event, hooks) in &manifest.hooks {
        for hook in hooks {
            parts.push(format!(
                "{event}={}@{}{}",
                hook.path,
                humantime::format_duration(hook.timeout),
                hook.run_as
                    .as_deref()
                    .map(|user| format!(" as {user}"))
                    .unwrap_or_default()
            ));
        }
    }
    for check in &manifest.health {
        match check {
            HealthCheck::Http { url, timeout } => {
                parts.push(format!("http {url}@{}", humantime::format_duration(*timeout)));
            }
            HealthCheck::Command { command, timeout } => {
                parts.push(format!("command {command}@{}", humantime::format_duration(*timeout)));
            }
        }
    }
    if let Some(service) = &manifest.service {
        parts.push(format!(
            "service {:?} in {} env {:?}",
            service.command, service.working_directory, service.environment
        ));
    }
    parts.join("; ")
}

fn check(name: &str, kind: Kind, text: &str, expected: Result<&str, &str>) {
    let files: BTreeSet<String> = FILES.iter().map(|file| (*file).to_owned()).collect();
    let mut texts = ManifestTexts::default();
    match kind {
        Kind::Toml => texts.rollwave_toml = Some(text),
        Kind::Yml => texts.appspec_yml = Some(text),
    }
    let actual = Manifest::from_archive_files(&texts, &files);
    match (actual, expected) {
        (Ok(manifest), Ok(summary)) => assert_eq!(summarise(&manifest), summary, "case {name}"),
        (Err(error), Err(fragment)) => {
            let message = error.to_string();
            assert!(
                message.contains(fragment),
                "case {name}: {message:?} lacks {fragment:?}"
            );
            assert!(
                message.starts_with("rollwave.toml") || message.starts_with("appspec.yml"),
                "case {name}: message does not name the file: {message:?}"
            );
        }
        (Ok(manifest), Err(fragment)) => {
            panic!("case {name}: expected error {fragment:?}, got {}", summarise(&manifest))
        }
        (Err(error), Ok(_)) => panic!("case {name}: unexpected error: {error}"),
    }
}

#[test]
fn rollwave_toml_cases() {
    let full = r#"
[hooks]
before_install = { path = "hooks/before.sh", timeout = "5m", run_as = "deploy" }
after_install = { path = "hooks/after.sh" }
application_stop = { path = "hooks/stop.sh" }
application_start = { path = "hooks/start.sh" }
validate_service = { path = "hooks/validate.sh", timeout = "30s" }
[[health]]
http = "http://127.0.0.1:8080/healthz"
timeout = "2s"
[[health]]
command = "bin/check"
timeout = "5s"
[service]
command = ["bin/server", "--port", "8080"]
working_directory = "."
environment = { RUST_LOG = "info" }
"#;
    let cases: &[(&str, &str, Result<&str, &str>)] = &[
        (
            "full example",
            full,
            Ok(
                "rollwave.toml; before_install=hooks/before.sh@5m as deploy; after_install=hooks/after.sh@1h; \
                application_stop=hooks/stop.sh@1h; application_start=hooks/start.sh@1h; \
                validate_service=hooks/validate.sh@30s; http http://127.0.0.1:8080/healthz@2s; \
                command bin/check@5s; service [\"bin/server\", \"--port\", \"8080\"] in . env {\"RUST_LOG\": \"info\"}",
            ),
        ),
        ("empty file", "", Ok("rollwave.toml")),
        (
            "several hooks per event run in order",
            "[hooks]\nbefore_install = [{ path = \"hooks/before.sh\" }, { path = \"hooks/after.sh\", timeout = \"10s\" }]",
            Ok("rollwave.toml; before_install=hooks/before.sh@1h; before_install=hooks/after.sh@10s"),
        ),
        (
            "health defaults and command lines",
            "[[health]]\ncommand = \"curl -fsS http://localhost/\"\n[[health]]\nhttp = \"http://[::1]:9000\"",
            Ok("rollwave.toml; command curl -fsS http://localhost/@5s; http http://[::1]:9000@5s"),
        ),
        ("unknown top-level key", "[hook]\n", Err("unknown field `hook`")),
        (
            "unknown event",
            "[hooks]\ninstall = { path = \"hooks/before.sh\" }",
            Err("unknown field `install`"),
        ),
        (
            "unknown hook key",
            "[hooks]\nafter_install = { path = \"hooks/after.sh\", user = \"x\" }",
            Err("unknown field `user`"),
        ),
        (
            "hook is a string",
            "[hooks]\nafter_install = \"hooks/after.sh\"",
            Err("a hook table or an array of hook tables"),
        ),
        (
            "absolute hook",
            "[hooks]\nafter_install = { path = \"/bin/sh\" }",
            Err("hook after_install path \"/bin/sh\" is invalid: absolute paths"),
        ),
        (
            "escaping hook",
            "[hooks]\nafter_install = { path = \"../x.sh\" }",
            Err("`..` components"),
        ),
        (
            "dot hook",
            "[hooks]\nafter_install = { path = \"./hooks/after.sh\" }",
            Err("`.` components"),
        ),
        (
            "missing hook",
            "[hooks]\napplication_start = { path = \"hooks/missing.sh\" }",
            Err("hook application_start script \"hooks/missing.sh\" is not a regular file in the bundle"),
        ),
        (
            "directory as hook",
            "[hooks]\napplication_start = { path = \"hooks\" }",
            Err("is not a regular file"),
        ),
        (
            "zero timeout",
            "[hooks]\nafter_install = { path = \"hooks/after.sh\", timeout = \"0s\" }",
            Err("hooks.after_install[0]: timeout \"0s\" is invalid: it must be greater than zero"),
        ),
        (
            "huge timeout",
            "[hooks]\nafter_install = { path = \"hooks/after.sh\", timeout = \"25h\" }",
            Err("at most 24h"),
        ),
        (
            "24h is fine",
            "[hooks]\nafter_install = { path = \"hooks/after.sh\", timeout = \"24h\" }",
            Ok("rollwave.toml; after_install=hooks/after.sh@1day"),
        ),
        (
            "garbage timeout",
            "[hooks]\nafter_install = { path = \"hooks/after.sh\", timeout = \"soon\" }",
            Err("write it like 30s"),
        ),
        (
            "bad run_as",
            "[hooks]\nafter_install = { path = \"hooks/after.sh\", run_as = \"root; rm\" }",
            Err("run_as \"root; rm\" is not a valid user name"),
        ),
        (
            "https health",
            "[[health]]\nhttp = \"https://example.com/\"",
            Err("health[0]: http \"https://example.com/\" is invalid: it must start with http://"),
        ),
        (
            "hostless health",
            "[[health]]\nhttp = \"http:///healthz\"",
            Err("it has no host"),
        ),
        (
            "bad port",
            "[[health]]\nhttp = \"http://localhost:99999/\"",
            Err("port must be a number"),
        ),
        (
            "both http and command",
            "[[health]]\nhttp = \"http://a/\"\ncommand = \"bin/check\"",
            Err("not both"),
        ),
        (
            "neither http nor command",
            "[[health]]\ntimeout = \"1s\"",
            Err("give one of http or command"),
        ),
        (
            "missing health command",
            "[[health]]\ncommand = \"bin/missing --flag\"",
            Err("health[0]: command \"bin/missing\" is not a regular file"),
        ),
        (
            "health timeout",
            "[[health]]\ncommand = \"true\"\ntimeout = \"0s\"",
            Err("health[0]: timeout \"0s\""),
        ),
        (
            "empty service",
            "[service]\ncommand = []",
            Err("service: command must name a program"),
        ),
        (
            "escaping working dir",
            "[service]\ncommand = [\"bin/server\"]\nworking_directory = \"../other\"",
            Err("working_directory \"../other\" is invalid"),
        ),
        (
            "missing service program",
            "[service]\ncommand = [\"bin/nope\"]",
            Err("service: command \"bin/nope\" is not a regular file"),
        ),
        (
            "bad env",
            "[service]\ncommand = [\"bin/server\"]\nenvironment = { \"A=B\" = \"x\" }",
            Err("environment variable \"A=B\""),
        ),
        ("syntax error", "[hooks\n", Err("rollwave.toml: ")),
    ];
    for (name, text, expected) in cases {
        check(name, Kind::Toml, text, *expected);
    }
}

#[test]
fn appspec_cases() {
    let typical = r#"
version: 0.0
os: linux
hooks:
  BeforeInstall:
    - location: scripts/install.sh
      timeout: 300
      runas: root
  ApplicationStart:
    - location: scripts/start.sh
    - location: hooks/start.sh
      timeout: 60
  ValidateService:
"#;
    let cases: &[(&str, &str, Result<&str, &str>)] = &[
        (
            "typical appspec",
            typical,
            Ok("appspec.yml; before_install=scripts/install.sh@5m as root; \
                application_start=scripts/start.sh@1h; application_start=hooks/start.sh@1m"),
        ),
        ("no hooks", "version: 0.0\nos: linux\n", Ok("appspec.yml")),
        (
            "files section",
            "version: 0.0\nos: linux\nfiles:\n  - source: /\n    destination: /var/www\n",
            Err(
                "appspec.yml: the \"files\" section is not supported: Rollwave serves the release in place from releases/<bundle>/<version> through the `current` symlink",
            ),
        ),
        (
            "permissions section",
            "version: 0.0\nos: linux\npermissions:\n  - object: /var/www\n    owner: www\n",
            Err("the \"permissions\" section is not supported"),
        ),
        (
            "download bundle",
            "hooks:\n  DownloadBundle:\n    - location: scripts/start.sh\n",
            Err("hook event \"DownloadBundle\" is not supported"),
        ),
        (
            "install",
            "hooks:\n  Install:\n    - location: scripts/start.sh\n",
            Err("hook event \"Install\" is not supported"),
        ),
        (
            "traffic",
            "hooks:\n  BeforeBlockTraffic:\n    - location: scripts/start.sh\n",
            Err("\"BeforeBlockTraffic\""),
        ),
        (
            "windows",
            "version: 0.0\nos: windows\n",
            Err("os \"windows\" is not supported"),
        ),
        (
            "unknown key",
            "version: 0.0\nresources: []\n",
            Err("unknown field `resources`"),
        ),
        (
            "unknown hook key",
            "hooks:\n  AfterInstall:\n    - location: scripts/start.sh\n      user: x\n",
            Err("unknown field `user`"),
        ),
        (
            "zero timeout",
            "hooks:\n  AfterInstall:\n    - location: scripts/start.sh\n      timeout: 0\n",
            Err("hooks.AfterInstall[0]: timeout \"0\" is invalid: it must be greater than zero"),
        ),
        (
            "absolute location",
            "hooks:\n  AfterInstall:\n    - location: /scripts/start.sh\n",
            Err("hook after_install path \"/scripts/start.sh\" is invalid"),
        ),
        (
            "missing script",
            "hooks:\n  AfterInstall:\n    - location: scripts/gone.sh\n",
            Err("script \"scripts/gone.sh\" is not a regular file"),
        ),
        ("not yaml", "hooks: [\n", Err("appspec.yml: ")),
    ];
    for (name, text, expected) in cases {
        check(name, Kind::Yml, text, *expected);
    }
}

#[test]
fn manifest_choice() {
    let files = BTreeSet::from(["scripts/start.sh".to_owned(), "hooks/start.sh".to_owned()]);
    let none = Manifest::from_archive_files(&ManifestTexts::default(), &files).expect("no manifest is valid");
    assert_eq!(none, Manifest::empty());
    assert!(none.hooks_for(LifecycleEvent::ApplicationStart).is_empty());

    let appspec = "hooks:\n  ApplicationStart:\n    - location: scripts/start.sh\n";
    let toml = "[hooks]\napplication_start = { path = \"hooks/start.sh\" }";
    let both = ManifestTexts {
        rollwave_toml: Some(toml),
        appspec_yml: Some(appspec),
        appspec_yaml: None,
    };
    let manifest = Manifest::from_archive_files(&both, &files).expect("rollwave.toml wins");
    assert_eq!(
        manifest.hooks_for(LifecycleEvent::ApplicationStart)[0].path,
        "hooks/start.sh"
    );

    let yaml = ManifestTexts {
        appspec_yaml: Some(appspec),
        ..ManifestTexts::default()
    };
    let manifest = Manifest::from_archive_files(&yaml, &files).expect("appspec.yaml is read");
    assert_eq!(manifest.source, ManifestSource::AppSpec("appspec.yaml"));

    let ambiguous = ManifestTexts {
        appspec_yml: Some(appspec),
        appspec_yaml: Some(appspec),
        ..ManifestTexts::default()
    };
    let error = Manifest::from_archive_files(&ambiguous, &files).expect_err("two appspecs");
    assert!(matches!(error, ManifestError::ChooseAppSpec), "{error}");
}

#[test]
fn lifecycle_order() {
    let mut sorted = LifecycleEvent::ALL;
    sorted.sort();
    assert_eq!(sorted, LifecycleEvent::ALL);
    assert_eq!(
        LifecycleEvent::ALL.map(LifecycleEvent::appspec_name)[0],
        "BeforeInstall"
    );
}
