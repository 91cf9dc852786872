//! The rules an archive's entries must satisfy together (no twins, no file used as a directory,
//! symlinks that stay inside), shared by the builder and the unpacker so a build never produces
//! an archive the agent refuses.

use std::collections::{HashMap, HashSet};

use unicode_normalization::UnicodeNormalization as _;

use crate::entry_path::MAX_PATH_BYTES;

/// What an archive entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link; its target is the entry's content.
    Symlink,
}

/// Why a set of entries is not an acceptable archive tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TreeViolation {
    /// Two entries have the same name.
    Duplicate { path: String },
    /// Two names are equal after Unicode NFC normalisation.
    UnicodeTwin { path: String, other: String },
    /// Two names are equal after case folding.
    CaseTwin { path: String, other: String },
    /// A non-directory entry is also the parent of another entry.
    FileDirConflict { path: String, child: String },
    /// A symlink target is empty, too long or contains NUL or control characters.
    InvalidLinkTarget { path: String, target: String },
    /// A symlink target is absolute.
    AbsoluteLink { path: String, target: String },
    /// A symlink resolves outside the archive root.
    EscapingLink { path: String, target: String },
    /// A symlink's target passes through another symlink.
    LinkThroughLink { path: String, target: String, via: String },
}

/// Collects entries one by one, checking cross-entry rules as it goes; symlinks are checked in
/// [`TreeChecker::finish`] once every entry is known.
#[derive(Debug, Default)]
pub(crate) struct TreeChecker {
    kinds: HashMap<String, EntryKind>,
    /// Directory implied by some entry's path, with the first entry that implied it.
    implied_dirs: HashMap<String, String>,
    /// NFC form → the spelling first seen.
    by_nfc: HashMap<String, String>,
    /// Case-folded NFC form → the spelling first seen.
    by_folded: HashMap<String, String>,
    registered: HashSet<String>,
    links: Vec<(String, String)>,
}

impl TreeChecker {
    /// Adds an entry whose path already passed [`crate::entry_path::check_entry_path`].
    pub(crate) fn add(&mut self, path: &str, kind: EntryKind) -> Result<(), TreeViolation> {
        if self.kinds.contains_key(path) {
            return Err(TreeViolation::Duplicate { path: path.to_owned() });
        }
        if kind != EntryKind::Directory
            && let Some(child) = self.implied_dirs.get(path)
        {
            return Err(TreeViolation::FileDirConflict {
                path: path.to_owned(),
                child: child.clone(),
            });
        }
        for (index, _) in path.match_indices('/') {
            let ancestor = &path[..index];
            if let Some(ancestor_kind) = self.kinds.get(ancestor)
                && *ancestor_kind != EntryKind::Directory
            {
                return Err(TreeViolation::FileDirConflict {
                    path: ancestor.to_owned(),
                    child: path.to_owned(),
                });
            }
            if !self.implied_dirs.contains_key(ancestor) {
                self.implied_dirs.insert(ancestor.to_owned(), path.to_owned());
                self.register_spelling(ancestor)?;
            }
        }
        self.register_spelling(path)?;
        self.kinds.insert(path.to_owned(), kind);
        Ok(())
    }

    /// Records a symlink's target for [`TreeChecker::finish`]; call after [`TreeChecker::add`].
    pub(crate) fn add_link_target(&mut self, path: &str, target: &str) {
        self.links.push((path.to_owned(), target.to_owned()));
    }

    /// Checks every symlink: relative, resolving inside the root, never through another link.
    pub(crate) fn finish(&self) -> Result<(), TreeViolation> {
        for (path, target) in &self.links {
            self.check_link(path, target)?;
        }
        Ok(())
    }

    fn check_link(&self, path: &str, target: &str) -> Result<(), TreeViolation> {
        let violation = |make: fn(String, String) -> TreeViolation| make(path.to_owned(), target.to_owned());
        if target.is_empty() || target.len() > MAX_PATH_BYTES || target.chars().any(char::is_control) {
            return Err(violation(|path, target| TreeViolation::InvalidLinkTarget {
                path,
                target,
            }));
        }
        if target.starts_with('/') {
            return Err(violation(|path, target| TreeViolation::AbsoluteLink { path, target }));
        }
        let mut resolved: Vec<&str> = path.split('/').collect();
        resolved.pop();
        let components: Vec<&str> = target
            .split('/')
            .filter(|part| !part.is_empty() && *part != ".")
            .collect();
        for (index, component) in components.iter().enumerate() {
            if *component == ".." {
                if resolved.pop().is_none() {
                    return Err(violation(|path, target| TreeViolation::EscapingLink { path, target }));
                }
                continue;
            }
            resolved.push(component);
            let is_last = index + 1 == components.len();
            if !is_last {
                let via = resolved.join("/");
                if self.kinds.get(&via) == Some(&EntryKind::Symlink) {
                    return Err(TreeViolation::LinkThroughLink {
                        path: path.to_owned(),
                        target: target.to_owned(),
                        via,
                    });
                }
            }
        }
        Ok(())
    }

    /// Rejects a spelling that differs from an earlier one only by normalisation or case.
    fn register_spelling(&mut self, path: &str) -> Result<(), TreeViolation> {
        if !self.registered.insert(path.to_owned()) {
            return Ok(());
        }
        let nfc: String = if path.is_ascii() {
            path.to_owned()
        } else {
            path.nfc().collect()
        };
        let folded: String = nfc.to_lowercase().nfc().collect();
        if let Some(other) = self.by_nfc.get(&nfc) {
            return Err(TreeViolation::UnicodeTwin {
                path: path.to_owned(),
                other: other.clone(),
            });
        }
        if let Some(other) = self.by_folded.get(&folded) {
            return Err(TreeViolation::CaseTwin {
                path: path.to_owned(),
                other: other.clone(),
            });
        }
        self.by_nfc.insert(nfc, path.to_owned());
        self.by_folded.insert(folded, path.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Path, kind and (for symlinks) target of each entry.
    type Entries<'a> = &'a [(&'a str, EntryKind, &'a str)];

    fn check(entries: Entries<'_>) -> Result<(), TreeViolation> {
        let mut checker = TreeChecker::default();
        for (path, kind, target) in entries {
            checker.add(path, *kind)?;
            if *kind == EntryKind::Symlink {
                checker.add_link_target(path, target);
            }
        }
        checker.finish()
    }

    #[test]
    fn trees() {
        use EntryKind::{Directory as D, File as F, Symlink as L};
        let ok: &[Entries<'_>] = &[
            &[("a", D, ""), ("a/b", F, ""), ("a/c", F, "")],
            &[("a/b", F, ""), ("a", D, "")],
            &[
                ("node_modules/tool/cli.js", F, ""),
                ("node_modules/.bin/tool", L, "../tool/cli.js"),
            ],
            &[("a/b", L, ".."), ("c", L, "a/b")],
            &[("a/l", L, "./x//y"), ("a/x/y", F, "")],
        ];
        for entries in ok {
            assert_eq!(check(entries), Ok(()), "{entries:?}");
        }
        let bad: &[(Entries<'_>, &str)] = &[
            (&[("a", F, ""), ("a", F, "")], "Duplicate"),
            (&[("README", F, ""), ("readme", F, "")], "CaseTwin"),
            (&[("Dir/a", F, ""), ("dir/b", F, "")], "CaseTwin"),
            (&[("caf\u{e9}", F, ""), ("cafe\u{301}", F, "")], "UnicodeTwin"),
            (&[("a", F, ""), ("a/b", F, "")], "FileDirConflict"),
            (&[("a/b", F, ""), ("a", F, "")], "FileDirConflict"),
            (&[("a", L, "d"), ("a/b", F, "")], "FileDirConflict"),
            (&[("l", L, "/etc")], "AbsoluteLink"),
            (&[("l", L, "../x")], "EscapingLink"),
            (&[("a/l", L, "../../x")], "EscapingLink"),
            (&[("l", L, "")], "InvalidLinkTarget"),
            (&[("l", L, "a\nb")], "InvalidLinkTarget"),
            (&[("d/up", L, ".."), ("l", L, "d/up/x")], "LinkThroughLink"),
        ];
        for (entries, expected) in bad {
            let error = check(entries).expect_err(expected);
            assert!(format!("{error:?}").starts_with(expected), "{entries:?}: {error:?}");
        }
    }
}
