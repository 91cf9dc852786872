//! The rules for a path inside a release archive, in one place so the builder never produces
//! an archive the unpacker refuses and manifests can only name paths that can exist.

/// Longest path inside an archive, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest single path component, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Deepest path inside an archive, in components.
pub const MAX_DEPTH: usize = 64;

/// Why a path is not an acceptable archive path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathViolation {
    /// The path is empty.
    Empty,
    /// The path starts with `/`.
    Absolute,
    /// A component is `..`.
    ParentComponent,
    /// The path contains `\`, a separator on Windows.
    Backslash,
    /// The path starts with a drive letter such as `C:`.
    DriveLetter,
    /// The path contains `//` or ends with `/`.
    EmptyComponent,
    /// A component is `.`.
    DotComponent,
    /// The path contains a NUL byte.
    NulByte,
    /// The path contains a control character (U+0001..U+001F, U+007F..U+009F).
    ControlCharacter,
    /// The path is longer than [`MAX_PATH_BYTES`].
    TooLong,
    /// A component is longer than [`MAX_COMPONENT_BYTES`].
    ComponentTooLong,
    /// The path has more than [`MAX_DEPTH`] components.
    TooDeep,
}

impl PathViolation {
    /// The rule that was broken, for messages.
    pub fn rule(self) -> &'static str {
        match self {
            Self::Empty => "the path is empty",
            Self::Absolute => "absolute paths are not allowed",
            Self::ParentComponent => "`..` components are not allowed",
            Self::Backslash => "backslashes are not allowed (use `/` as the separator)",
            Self::DriveLetter => "drive letters are not allowed",
            Self::EmptyComponent => "empty components (`//` or a trailing `/`) are not allowed",
            Self::DotComponent => "`.` components are not allowed",
            Self::NulByte => "NUL bytes are not allowed",
            Self::ControlCharacter => "control characters are not allowed",
            Self::TooLong => "the path is longer than 4096 bytes",
            Self::ComponentTooLong => "a component is longer than 255 bytes",
            Self::TooDeep => "the path is deeper than 64 components",
        }
    }
}

impl std::fmt::Display for PathViolation {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.rule())
    }
}

/// Checks a relative, normalised, `/`-separated path such as `bin/server` (no trailing `/`).
pub fn check_entry_path(path: &str) -> Result<(), PathViolation> {
    if path.is_empty() {
        return Err(PathViolation::Empty);
    }
    if path.contains('\0') {
        return Err(PathViolation::NulByte);
    }
    if path.chars().any(char::is_control) {
        return Err(PathViolation::ControlCharacter);
    }
    if path.starts_with('/') {
        return Err(PathViolation::Absolute);
    }
    let bytes = path.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(PathViolation::DriveLetter);
    }
    if path.contains('\\') {
        return Err(PathViolation::Backslash);
    }
    if bytes.len() > MAX_PATH_BYTES {
        return Err(PathViolation::TooLong);
    }
    let mut depth = 0usize;
    for component in path.split('/') {
        depth += 1;
        match component {
            "" => return Err(PathViolation::EmptyComponent),
            "." => return Err(PathViolation::DotComponent),
            ".." => return Err(PathViolation::ParentComponent),
            _ if component.len() > MAX_COMPONENT_BYTES => {
                return Err(PathViolation::ComponentTooLong);
            }
            _ => {}
        }
    }
    if depth > MAX_DEPTH {
        return Err(PathViolation::TooDeep);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let long_component = "a".repeat(256);
        let deep = vec!["d"; 65].join("/");
        let deep_ok = vec!["d"; 64].join("/");
        let long = vec!["abcdefgh"; 456].join("/");
        let cases: &[(&str, Result<(), PathViolation>)] = &[
            ("bin/server", Ok(())),
            ("a", Ok(())),
            (".env", Ok(())),
            ("a..b/c", Ok(())),
            ("é/ü", Ok(())),
            (&deep_ok, Ok(())),
            ("", Err(PathViolation::Empty)),
            ("/etc/x", Err(PathViolation::Absolute)),
            ("../x", Err(PathViolation::ParentComponent)),
            ("a/../b", Err(PathViolation::ParentComponent)),
            ("a\\b", Err(PathViolation::Backslash)),
            ("C:x", Err(PathViolation::DriveLetter)),
            ("C:\\x", Err(PathViolation::DriveLetter)),
            ("a//b", Err(PathViolation::EmptyComponent)),
            ("a/", Err(PathViolation::EmptyComponent)),
            ("./a", Err(PathViolation::DotComponent)),
            ("a\0b", Err(PathViolation::NulByte)),
            ("a\nb", Err(PathViolation::ControlCharacter)),
            ("a\u{85}b", Err(PathViolation::ControlCharacter)),
            (&long_component, Err(PathViolation::ComponentTooLong)),
            (&deep, Err(PathViolation::TooDeep)),
            (&long, Err(PathViolation::TooLong)),
        ];
        for (path, expected) in cases {
            assert_eq!(check_entry_path(path), *expected, "{path:?}");
        }
    }
}
