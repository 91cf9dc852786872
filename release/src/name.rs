//! Bundle names and versions become directory names on every instance
//! (`releases/<bundle>/<version>`), so they are restricted to a safe, portable alphabet.

/// Longest bundle name or version, in bytes.
const MAX_NAME_LEN: usize = 128;

/// The version name reserved for the `current` symlink beside the releases.
const RESERVED_VERSION: &str = "current";

/// The rule, as shown to users.
const NAME_RULE: &str = "1 to 128 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit";

/// A bundle name or version that breaks the naming rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The bundle name does not match `[A-Za-z0-9][A-Za-z0-9._+-]{0,127}`.
    #[error("bundle name {name:?} is invalid: use {rule}", rule = NAME_RULE)]
    ValidateBundleName {
        /// The rejected name.
        name: String,
    },
    /// The version does not match `[A-Za-z0-9][A-Za-z0-9._+-]{0,127}` or is `current`.
    #[error("version {version:?} is invalid: use {rule}, and not \"current\" (the name of the active release link)", rule = NAME_RULE)]
    ValidateVersion {
        /// The rejected version.
        version: String,
    },
}

/// Whether `text` matches `[A-Za-z0-9][A-Za-z0-9._+-]{0,127}`.
fn follows_name_rule(text: &str) -> bool {
    let bytes = text.as_bytes();
    let Some(first) = bytes.first() else {
        return false;
    };
    bytes.len() <= MAX_NAME_LEN
        && first.is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'+' | b'-'))
}

/// Checks a bundle name such as `web` or `chef-cookbooks`.
pub fn validate_bundle_name(name: &str) -> Result<(), NameError> {
    if follows_name_rule(name) {
        Ok(())
    } else {
        Err(NameError::ValidateBundleName { name: name.to_owned() })
    }
}

/// Checks a version such as `1.4.2` or `2026-11-25+g1a2b3c`; `current` is reserved.
pub fn validate_version(version: &str) -> Result<(), NameError> {
    if follows_name_rule(version) && version != RESERVED_VERSION {
        Ok(())
    } else {
        Err(NameError::ValidateVersion {
            version: version.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, bundle_ok: bool, version_ok: bool) {
        assert_eq!(validate_bundle_name(input).is_ok(), bundle_ok, "bundle {input:?}");
        assert_eq!(validate_version(input).is_ok(), version_ok, "version {input:?}");
    }

    #[test]
    fn names_and_versions() {
        let longest = "a".repeat(128);
        let too_long = "a".repeat(129);
        let cases: &[(&str, bool, bool)] = &[
            ("web", true, true),
            ("1.4.2", true, true),
            ("2026-11-25+g1a2b3c", true, true),
            ("A_b.c+d-e", true, true),
            ("9", true, true),
            (&longest, true, true),
            ("current", true, false),
            ("Current", true, true),
            ("", false, false),
            (&too_long, false, false),
            (".hidden", false, false),
            ("-rf", false, false),
            ("_x", false, false),
            ("a/b", false, false),
            ("..", false, false),
            ("a b", false, false),
            ("é", false, false),
            ("a\0", false, false),
            ("a:b", false, false),
        ];
        for (input, bundle_ok, version_ok) in cases {
            check(input, *bundle_ok, *version_ok);
        }
    }

    #[test]
    fn messages_state_the_rule() {
        let error = validate_bundle_name("a/b").expect_err("slash");
        assert_eq!(
            error.to_string(),
            "bundle name \"a/b\" is invalid: use 1 to 128 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit"
        );
        let error = validate_version("current").expect_err("reserved");
        assert!(error.to_string().contains("not \"current\""), "{error}");
    }
}
