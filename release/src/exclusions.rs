//! What a build leaves out of a release: version-control directories (`.git`, `.hg`, `.svn`,
//! which hold the whole history and often credentials) and whatever the tree's own
//! `.rollwaveignore` names, in gitignore syntax. A checkout's other secrets are the operator's to
//! list there; the build reports everything it left out, so nothing goes missing unnoticed.

use std::path::PathBuf;

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// The ignore file a build reads at the root of the tree. It is itself archived (unless it
/// names itself), like a `.gitignore`.
pub const IGNORE_FILE: &str = ".rollwaveignore";

/// Directory names left out at any depth unless `.rollwaveignore` re-includes them with `!`.
pub const VERSION_CONTROL_DIRS: [&str; 3] = [".git", ".hg", ".svn"];

/// An entry a build left out (with everything under it, for a directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    /// The archive path, without a trailing `/`.
    pub path: String,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// "version control", or the `.rollwaveignore` pattern that matched.
    pub reason: String,
}

/// A `.rollwaveignore` line that is not a valid gitignore pattern.
#[derive(Debug, thiserror::Error)]
#[error("{IGNORE_FILE} line {line}: {detail}")]
pub struct IgnoreFileError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with the pattern.
    pub detail: String,
}

/// The rules of one build.
#[derive(Debug, Clone)]
pub struct Exclusions {
    ignore_file: Gitignore,
}

impl Exclusions {
    /// The rules for a tree whose `.rollwaveignore` reads `text` (`None`: the tree has none).
    pub fn new(text: Option<&str>) -> Result<Self, IgnoreFileError> {
        // Paths are matched relative to the tree's root; "." keeps the matcher from stripping.
        let mut builder = GitignoreBuilder::new(".");
        for (index, line) in text.unwrap_or_default().lines().enumerate() {
            builder
                .add_line(Some(PathBuf::from(IGNORE_FILE)), line)
                .map_err(|error| IgnoreFileError {
                    line: index + 1,
                    detail: error.to_string(),
                })?;
        }
        let ignore_file = builder.build().map_err(|error| IgnoreFileError {
            line: 0,
            detail: error.to_string(),
        })?;
        Ok(Self { ignore_file })
    }

    /// Why the entry at `path` (relative, `/`-separated) is left out, or `None` to keep it. The
    /// caller checks directories before their contents and does not descend into one left out.
    pub fn reason_to_leave_out(&self, path: &str, is_dir: bool) -> Option<String> {
        match self.ignore_file.matched(path, is_dir) {
            Match::Ignore(glob) => Some(format!("{IGNORE_FILE}: {}", glob.original())),
            Match::Whitelist(_) => None,
            Match::None => {
                let name = path.rsplit('/').next().unwrap_or(path);
                VERSION_CONTROL_DIRS
                    .contains(&name)
                    .then(|| "version control".to_owned())
            }
        }
    }
}
