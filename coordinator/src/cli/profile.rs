//! Where the CLI finds its coordinator (address, operator token and CA
//! certificate) and the S3 bucket releases are pushed to, each from a flag,
//! else an environment variable, else a config file (`--config`,
//! `ROLLWAVE_CONFIG`, or `~/.config/rollwave/cli.toml`).

use std::path::{Path, PathBuf};

use rollwave_artifacts::S3Settings;
use serde::Deserialize;

/// A missing or unreadable setting: the CLI exits 64 for these.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Reads environment variables; tests pass a map instead of the process environment.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|value| !value.is_empty())
    }
}

impl Environment for std::collections::HashMap<&str, &str> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|value| (*value).to_owned())
    }
}

/// Settings given as flags.
#[derive(Debug, Clone, Default)]
pub struct ProfileFlags {
    pub addr: Option<String>,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    addr: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    /// Where `rollwave release push` uploads.
    s3: Option<S3File>,
}

/// The `[s3]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct S3File {
    bucket: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    force_path_style: Option<bool>,
}

/// S3 settings given as flags.
#[derive(Debug, Clone, Default)]
pub struct S3Flags {
    pub bucket: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// `--s3-path-style` was given.
    pub path_style: bool,
}

/// Where releases are uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Target {
    pub bucket: String,
    pub settings: S3Settings,
}

/// Everything the CLI needs to call the coordinator.
#[derive(Debug, Clone)]
pub struct Profile {
    pub addr: String,
    pub token: String,
    pub ca_pem: Vec<u8>,
}

fn read_file(path: &Path, what: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|error| ConfigError(format!("cannot read {what} {}: {error}", path.display())))
}

/// Finds and reads the config file, if there is one.
fn load_file(flags: &ProfileFlags, env: &dyn Environment) -> Result<(Option<PathBuf>, ProfileFile), ConfigError> {
    let explicit_config = flags
        .config
        .clone()
        .or_else(|| env.var("ROLLWAVE_CONFIG").map(PathBuf::from));
    let config_path = explicit_config.or_else(|| {
        env.var("HOME")
            .map(|home| PathBuf::from(home).join(".config/rollwave/cli.toml"))
            .filter(|path| path.exists())
    });
    let file = match &config_path {
        Some(path) => {
            let text = read_file(path, "config file")?;
            toml::from_str::<ProfileFile>(&text)
                .map_err(|error| ConfigError(format!("invalid config file {}: {error}", path.display())))?
        }
        None => ProfileFile::default(),
    };
    Ok((config_path, file))
}

/// Resolves the S3 target of `release push`: flags, else `ROLLWAVE_S3_BUCKET`,
/// `ROLLWAVE_S3_ENDPOINT`, `ROLLWAVE_S3_REGION`, `ROLLWAVE_S3_PATH_STYLE`,
/// else the config file's `[s3]` table. Credentials come from the standard
/// AWS chain, never from here.
pub fn resolve_s3(flags: &ProfileFlags, s3: &S3Flags, env: &dyn Environment) -> Result<S3Target, ConfigError> {
    let (_, file) = load_file(flags, env)?;
    let file = file.s3.unwrap_or_default();
    let bucket = s3
        .bucket
        .clone()
        .or_else(|| env.var("ROLLWAVE_S3_BUCKET"))
        .or(file.bucket)
        .ok_or_else(|| {
            ConfigError(
                "no S3 bucket: pass --bucket NAME, set ROLLWAVE_S3_BUCKET, or set bucket in the [s3] table of the config file"
                    .into(),
            )
        })?;
    let path_style_env = match env.var("ROLLWAVE_S3_PATH_STYLE").as_deref() {
        None => None,
        Some("1" | "true") => Some(true),
        Some("0" | "false") => Some(false),
        Some(other) => {
            return Err(ConfigError(format!(
                "ROLLWAVE_S3_PATH_STYLE={other:?}: expected true or false"
            )));
        }
    };
    let force_path_style = if s3.path_style {
        true
    } else {
        path_style_env.or(file.force_path_style).unwrap_or(false)
    };
    Ok(S3Target {
        bucket,
        settings: S3Settings {
            endpoint: s3
                .endpoint
                .clone()
                .or_else(|| env.var("ROLLWAVE_S3_ENDPOINT"))
                .or(file.endpoint),
            region: s3
                .region
                .clone()
                .or_else(|| env.var("ROLLWAVE_S3_REGION"))
                .or(file.region),
            force_path_style,
        },
    })
}

/// Resolves the profile: flags win over the environment, the environment over the file.
pub fn resolve(flags: &ProfileFlags, env: &dyn Environment) -> Result<Profile, ConfigError> {
    let (config_path, file) = load_file(flags, env)?;
    let relative_to_config = |path: PathBuf| match (&config_path, path.is_relative()) {
        (Some(config), true) => config.parent().unwrap_or(Path::new(".")).join(path),
        _ => path,
    };

    let addr = flags
        .addr
        .clone()
        .or_else(|| env.var("ROLLWAVE_ADDR"))
        .or(file.addr)
        .ok_or_else(|| {
            ConfigError(
                "no coordinator address: pass --addr HOST:PORT, set ROLLWAVE_ADDR, or use --config DATA_DIR/cli.toml"
                    .into(),
            )
        })?;
    let token = match flags.token.clone().or_else(|| env.var("ROLLWAVE_TOKEN")).or(file.token) {
        Some(token) => token,
        None => match file.token_file {
            Some(path) => read_file(&relative_to_config(path), "operator token file")?,
            None => {
                return Err(ConfigError(
                    "no operator token: pass --token, set ROLLWAVE_TOKEN (the server wrote one to DATA_DIR/operator.token), or set token_file in the config file".into(),
                ));
            }
        },
    };
    let ca_path = flags
        .ca
        .clone()
        .or_else(|| env.var("ROLLWAVE_CA").map(PathBuf::from))
        .or(file.ca.map(relative_to_config))
        .ok_or_else(|| {
            ConfigError("no CA certificate: pass --ca FILE, set ROLLWAVE_CA (the server wrote DATA_DIR/ca.pem), or set ca in the config file".into())
        })?;
    let ca_pem = read_file(&ca_path, "CA certificate")?.into_bytes();
    Ok(Profile {
        addr,
        token: token.trim().to_owned(),
        ca_pem,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        write(dir.path(), "ca.pem", "FILE CA");
        write(dir.path(), "env-ca.pem", "ENV CA");
        write(dir.path(), "operator.token", "file-token\n");
        let config = write(
            dir.path(),
            "cli.toml",
            "addr = \"file:1\"\nca = \"ca.pem\"\ntoken_file = \"operator.token\"\n",
        );
        let env_ca = dir.path().join("env-ca.pem");
        let env_ca = env_ca.to_str().expect("utf-8 path");
        let config_flag = ProfileFlags {
            config: Some(config.clone()),
            ..ProfileFlags::default()
        };

        let from_file = resolve(&config_flag, &HashMap::new()).expect("file only");
        assert_eq!(
            (
                from_file.addr.as_str(),
                from_file.token.as_str(),
                from_file.ca_pem.as_slice()
            ),
            ("file:1", "file-token", b"FILE CA".as_slice())
        );

        let env = HashMap::from([
            ("ROLLWAVE_ADDR", "env:2"),
            ("ROLLWAVE_TOKEN", "env-token"),
            ("ROLLWAVE_CA", env_ca),
        ]);
        let from_env = resolve(&config_flag, &env).expect("env over file");
        assert_eq!(
            (
                from_env.addr.as_str(),
                from_env.token.as_str(),
                from_env.ca_pem.as_slice()
            ),
            ("env:2", "env-token", b"ENV CA".as_slice())
        );

        let flags = ProfileFlags {
            addr: Some("flag:3".into()),
            token: Some("flag-token".into()),
            ca: Some(dir.path().join("ca.pem")),
            config: Some(config),
        };
        let from_flags = resolve(&flags, &env).expect("flags over env");
        assert_eq!(
            (
                from_flags.addr.as_str(),
                from_flags.token.as_str(),
                from_flags.ca_pem.as_slice()
            ),
            ("flag:3", "flag-token", b"FILE CA".as_slice())
        );
    }

    #[test]
    fn missing_settings_name_every_way_to_give_them() {
        let error = resolve(&ProfileFlags::default(), &HashMap::new()).expect_err("nothing configured");
        assert!(
            error.0.contains("--addr") && error.0.contains("ROLLWAVE_ADDR"),
            "{error}"
        );
    }

    #[test]
    fn s3_settings_come_from_flags_then_environment_then_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write(
            dir.path(),
            "cli.toml",
            "[s3]\nbucket = \"file-bucket\"\nendpoint = \"http://file:9000\"\nregion = \"eu-west-1\"\nforce_path_style = true\n",
        );
        let flags = ProfileFlags {
            config: Some(config),
            ..ProfileFlags::default()
        };
        let from_file = resolve_s3(&flags, &S3Flags::default(), &HashMap::new()).expect("file");
        assert_eq!(
            from_file,
            S3Target {
                bucket: "file-bucket".into(),
                settings: S3Settings {
                    endpoint: Some("http://file:9000".into()),
                    region: Some("eu-west-1".into()),
                    force_path_style: true,
                },
            }
        );
        let env = HashMap::from([
            ("ROLLWAVE_S3_BUCKET", "env-bucket"),
            ("ROLLWAVE_S3_ENDPOINT", "http://env:9000"),
            ("ROLLWAVE_S3_PATH_STYLE", "false"),
        ]);
        let from_env = resolve_s3(&flags, &S3Flags::default(), &env).expect("env");
        assert_eq!(
            (
                from_env.bucket.as_str(),
                from_env.settings.endpoint.as_deref(),
                from_env.settings.force_path_style
            ),
            ("env-bucket", Some("http://env:9000"), false)
        );
        let s3_flags = S3Flags {
            bucket: Some("flag-bucket".into()),
            endpoint: Some("http://flag:9000".into()),
            region: None,
            path_style: true,
        };
        let from_flags = resolve_s3(&flags, &s3_flags, &env).expect("flags");
        assert_eq!(
            (
                from_flags.bucket.as_str(),
                from_flags.settings.endpoint.as_deref(),
                from_flags.settings.region.as_deref(),
                from_flags.settings.force_path_style
            ),
            ("flag-bucket", Some("http://flag:9000"), Some("eu-west-1"), true)
        );

        let error =
            resolve_s3(&ProfileFlags::default(), &S3Flags::default(), &HashMap::new()).expect_err("no bucket anywhere");
        assert!(
            error.0.contains("--bucket") && error.0.contains("ROLLWAVE_S3_BUCKET"),
            "{error}"
        );
    }

    #[test]
    fn unknown_config_keys_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write(dir.path(), "cli.toml", "adress = \"typo:1\"\n");
        let flags = ProfileFlags {
            config: Some(config),
            ..ProfileFlags::default()
        };
        let error = resolve(&flags, &HashMap::new()).expect_err("typo refused");
        assert!(error.0.contains("invalid config file"), "{error}");
    }
}
