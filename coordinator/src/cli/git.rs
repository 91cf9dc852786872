//! Reads a release's files from a Git tag or commit by running the `git`
//! binary (no libgit2). A release must name the same files forever, so only
//! tags and commit ids are accepted; a branch, which moves, is refused.

use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rollwave_release::{EntryKind, SourceEntry};

/// Shortest abbreviated commit id accepted (git's own minimum).
const MIN_ABBREVIATED_ID: usize = 4;

/// Longest commit id (SHA-256 repositories).
const MAX_COMMIT_ID: usize = 64;

/// Why a Git reference could not be turned into release entries.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("run `git {args}` in {repo}: {source}; is git installed?")]
    Spawn {
        repo: PathBuf,
        args: String,
        #[source]
        source: io::Error,
    },
    #[error("`git {args}` in {repo} failed: {stderr}")]
    Run {
        repo: PathBuf,
        args: String,
        stderr: String,
    },
    #[error(
        "{reference:?} is a branch ({full_name}): a branch moves, but a release must name the same files forever; \
         tag the commit (`git tag v1.2.3 {reference}`) and build from the tag, or pass its commit id"
    )]
    RefuseBranch { reference: String, full_name: String },
    #[error(
        "{reference:?} is neither a tag nor a commit id in {repo}: a release is built from a tag or a full or \
         abbreviated commit id, which always name the same files (expressions like HEAD or main~1 move)"
    )]
    RefuseMovingRef { reference: String, repo: PathBuf },
    #[error("no commit {reference:?} in {repo} (or the abbreviation is ambiguous: give more digits)")]
    FindCommit { reference: String, repo: PathBuf },
    #[error(
        "{path:?} is a Git submodule: a release is built from one repository; vendor its files or build from a directory"
    )]
    RefuseSubmodule { path: String },
    #[error("{path:?}: file names in a release must be UTF-8")]
    ReadPathName { path: String },
    #[error("unexpected output from `git {args}`: {detail}")]
    ParseOutput { args: String, detail: String },
}

/// What a reference turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRef {
    /// The full commit id.
    pub commit: String,
    /// The tag's full name (`refs/tags/v1.2.3`) when the reference was a tag.
    pub tag: Option<String>,
}

/// A repository worked on through the `git` binary.
#[derive(Debug, Clone)]
pub struct Repository {
    dir: PathBuf,
}

impl Repository {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("git");
        command
            .arg("-C")
            .arg(&self.dir)
            .args(args)
            // Never ask for credentials or open an editor: this is a batch tool.
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null());
        command
    }

    fn output(&self, args: &[&str]) -> Result<Output, GitError> {
        self.command(args).output().map_err(|source| GitError::Spawn {
            repo: self.dir.clone(),
            args: args.join(" "),
            source,
        })
    }

    /// Runs git and returns its stdout; a non-zero exit is an error carrying stderr.
    fn run(&self, args: &[&str]) -> Result<Vec<u8>, GitError> {
        let output = self.output(args)?;
        if !output.status.success() {
            return Err(GitError::Run {
                repo: self.dir.clone(),
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(output.stdout)
    }

    /// Whether git exits 0, for questions such as "does this ref exist".
    fn succeeds(&self, args: &[&str]) -> Result<bool, GitError> {
        Ok(self.output(args)?.status.success())
    }

    fn ref_exists(&self, full_name: &str) -> Result<bool, GitError> {
        self.succeeds(&["show-ref", "--verify", "--quiet", full_name])
    }

    fn peel_to_commit(&self, reference: &str) -> Result<Option<String>, GitError> {
        let output = self.output(&["rev-parse", "--verify", "--quiet", &format!("{reference}^{{commit}}")])?;
        if !output.status.success() {
            return Ok(None);
        }
        let commit = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        Ok(Some(commit))
    }

    /// Resolves `reference` to a commit if it is a tag or a commit id; refuses branches.
    pub fn resolve(&self, reference: &str) -> Result<ResolvedRef, GitError> {
        // Fails with git's own explanation when the directory is not a repository.
        self.run(&["rev-parse", "--git-dir"])?;
        let moving = || GitError::RefuseMovingRef {
            reference: reference.to_owned(),
            repo: self.dir.clone(),
        };
        if reference.is_empty() || reference.starts_with('-') {
            return Err(moving());
        }
        for prefix in ["refs/heads/", "refs/remotes/"] {
            if reference.starts_with(prefix) {
                return Err(GitError::RefuseBranch {
                    reference: reference.to_owned(),
                    full_name: reference.to_owned(),
                });
            }
        }
        // A name that is a branch is refused even if a tag shares it: the two
        // are too easily confused. `refs/tags/NAME` says which one is meant.
        if !reference.starts_with("refs/tags/") {
            for prefix in ["refs/heads/", "refs/remotes/"] {
                let full_name = format!("{prefix}{reference}");
                if self.ref_exists(&full_name)? {
                    return Err(GitError::RefuseBranch {
                        reference: reference.to_owned(),
                        full_name,
                    });
                }
            }
        }
        let tag = if reference.starts_with("refs/tags/") {
            reference.to_owned()
        } else {
            format!("refs/tags/{reference}")
        };
        if self.ref_exists(&tag)? {
            let commit = self.peel_to_commit(&tag)?.ok_or_else(|| GitError::FindCommit {
                reference: reference.to_owned(),
                repo: self.dir.clone(),
            })?;
            return Ok(ResolvedRef { commit, tag: Some(tag) });
        }
        if reference.starts_with("refs/") || !is_commit_id_text(reference) {
            return Err(moving());
        }
        let commit = self
            .peel_to_commit(reference)?
            .filter(|commit| commit.starts_with(&reference.to_ascii_lowercase()))
            .ok_or_else(|| GitError::FindCommit {
                reference: reference.to_owned(),
                repo: self.dir.clone(),
            })?;
        Ok(ResolvedRef { commit, tag: None })
    }

    /// The files of `commit`'s tree, as release entries.
    pub fn tree_entries(&self, commit: &str) -> Result<Vec<SourceEntry>, GitError> {
        let listing_args = ["ls-tree", "-r", "-z", "--full-tree", commit];
        let listing = self.run(&listing_args)?;
        let parse_error = |detail: String| GitError::ParseOutput {
            args: listing_args.join(" "),
            detail,
        };
        let mut planned = Vec::new();
        for record in listing.split(|byte| *byte == 0).filter(|record| !record.is_empty()) {
            let tab = record
                .iter()
                .position(|byte| *byte == b'\t')
                .ok_or_else(|| parse_error("a record without a tab".into()))?;
            let path = String::from_utf8(record[tab + 1..].to_vec()).map_err(|error| GitError::ReadPathName {
                path: String::from_utf8_lossy(error.as_bytes()).into_owned(),
            })?;
            let header = String::from_utf8_lossy(&record[..tab]).into_owned();
            let mut fields = header.split(' ');
            let (Some(mode), Some(_kind), Some(object), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(parse_error(format!("record header {header:?}")));
            };
            let (kind, mode) = match mode {
                "100644" => (EntryKind::File, 0o644),
                "100755" => (EntryKind::File, 0o755),
                "120000" => (EntryKind::Symlink, 0o777),
                "160000" => return Err(GitError::RefuseSubmodule { path }),
                other => return Err(parse_error(format!("mode {other} of {path:?}"))),
            };
            planned.push((path, kind, mode, object.to_owned()));
        }
        let objects: Vec<&str> = planned.iter().map(|(_, _, _, object)| object.as_str()).collect();
        let contents = self.read_blobs(&objects)?;
        Ok(planned
            .into_iter()
            .zip(contents)
            .map(|((path, kind, mode, _), contents)| SourceEntry {
                path,
                kind,
                mode,
                contents,
            })
            .collect())
    }

    /// Reads blobs in one `git cat-file --batch`, in the order asked.
    fn read_blobs(&self, objects: &[&str]) -> Result<Vec<Vec<u8>>, GitError> {
        let args = ["cat-file", "--batch"];
        let describe = args.join(" ");
        let spawn_error = |source| GitError::Spawn {
            repo: self.dir.clone(),
            args: describe.clone(),
            source,
        };
        let mut child = self
            .command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        let mut stdin = child.stdin.take().expect("stdin was piped");
        let stdout = child.stdout.take().expect("stdout was piped");
        let request: String = objects.iter().map(|object| format!("{object}\n")).collect();
        // Write from another thread: git answers while we still ask, and both pipes have limits.
        let read_result = std::thread::scope(|scope| {
            let writer = scope.spawn(move || stdin.write_all(request.as_bytes()));
            let blobs = parse_batch(BufReader::new(stdout), objects.len());
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")));
            (blobs, written)
        });
        let output = child.wait_with_output().map_err(spawn_error)?;
        if !output.status.success() {
            return Err(GitError::Run {
                repo: self.dir.clone(),
                args: describe,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let (blobs, written) = read_result;
        written.map_err(spawn_error)?;
        blobs.map_err(|detail| GitError::ParseOutput { args: describe, detail })
    }
}

/// Hex digits of a plausible (possibly abbreviated) commit id.
fn is_commit_id_text(text: &str) -> bool {
    (MIN_ABBREVIATED_ID..=MAX_COMMIT_ID).contains(&text.len()) && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// Parses `count` answers of `git cat-file --batch`: `<oid> <type> <size>\n<bytes>\n`.
fn parse_batch(mut reader: impl BufRead, count: usize) -> Result<Vec<Vec<u8>>, String> {
    let mut blobs = Vec::with_capacity(count);
    let mut header = String::new();
    for _ in 0..count {
        header.clear();
        reader.read_line(&mut header).map_err(|error| error.to_string())?;
        let fields: Vec<&str> = header.trim_end().split(' ').collect();
        let [_object, kind, size] = fields.as_slice() else {
            return Err(format!("header {header:?}"));
        };
        if *kind != "blob" {
            return Err(format!("expected a blob, got {header:?}"));
        }
        let size: usize = size.parse().map_err(|_| format!("size in {header:?}"))?;
        let mut contents = vec![0u8; size];
        reader.read_exact(&mut contents).map_err(|error| error.to_string())?;
        let mut newline = [0u8; 1];
        reader.read_exact(&mut newline).map_err(|error| error.to_string())?;
        blobs.push(contents);
    }
    Ok(blobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_output_is_split_into_blobs() {
        let output = b"aaaa blob 3\nabc\nbbbb blob 0\n\ncccc blob 2\n\n\n\n";
        let blobs = parse_batch(&output[..], 3).expect("parses");
        assert_eq!(blobs, [b"abc".to_vec(), Vec::new(), b"\n\n".to_vec()]);
        let missing = parse_batch(&b"dddd missing\n"[..], 1).expect_err("missing object");
        assert!(missing.contains("header"), "{missing}");
    }

    #[test]
    fn commit_id_text() {
        for good in ["abcd", "0123456789abcdef0123456789abcdef01234567", "ABCDEF12"] {
            assert!(is_commit_id_text(good), "{good}");
        }
        for bad in ["abc", "main", "v1.0", "abcd~1", &"a".repeat(65)] {
            assert!(!is_commit_id_text(bad), "{bad}");
        }
    }
}
