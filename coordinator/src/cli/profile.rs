//! Where the CLI finds its coordinator: address, operator token and CA
//! certificate, each from a flag, else an environment variable, else a config
//! file (`--config`, `ROLLWAVE_CONFIG`, or `~/.config/rollwave/cli.toml`).

use std::path::{Path, PathBuf};

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

/// Resolves the profile: flags win over the environment, the environment over the file.
pub fn resolve(flags: &ProfileFlags, env: &dyn Environment) -> Result<Profile, ConfigError> {
    let explicit_config = flags
        .config
        .clone()
        .or_else(|| env.var("ROLLWAVE_CONFIG").map(PathBuf::from));
    let config_path = explicit_config.clone().or_else(|| {
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
