//! Reading the policy files of one Git commit, bounded, straight from the
//! object database (no working copy). The syncer reads every commit it
//! applies through here, and `meshfed-policy diff` reads the commits it
//! compares through here, so both see the same files.
//!
//! - Files under `path` (the syncer's `--path`), chosen by the same
//!   [`Selection`] as a directory walk: `*.yaml`/`*.yml`, globs, hidden
//!   entries skipped. Symlinks and submodules are not followed.
//! - Memory is bounded whatever the repository holds: a blob's size is read
//!   from its object header before it is inflated; one over
//!   [`MAX_FILE_BYTES`] is reported, not read, and so is every file that
//!   would take the commit past [`MAX_TREE_BYTES`]. Trees deeper than
//!   [`MAX_TREE_DEPTH`] are reported, not walked.
//!
//! Only with the `git` feature (libgit2); the gateway builds without it.
//! It does not fetch, resolve remotes or check signatures (the syncer does).

use std::path::Path;

use git2::{ErrorCode, ObjectType, Odb, Oid, Repository, Tree};

use crate::diag::{Code, Diagnostic};
use crate::fs::Selection;
use crate::yaml::Pos;

/// The largest policy file read from a tree (the loader's own limit).
pub const MAX_FILE_BYTES: usize = crate::yaml::MAX_FILE_BYTES;

/// The most policy bytes read from one commit, all files together; the
/// files past it are reported, not read. The loader's node budget bounds
/// what they expand to.
pub const MAX_TREE_BYTES: usize = 64 << 20;

/// The deepest directory walked below the root: deeper trees are reported,
/// so that a hostile tree cannot exhaust the stack.
pub const MAX_TREE_DEPTH: usize = 64;

/// The selected files of one commit.
#[derive(Debug, Clone, Default)]
pub struct TreeFiles {
    /// (path relative to the repository root, bytes), sorted by path.
    pub files: Vec<(String, Vec<u8>)>,
    /// Files over [`MAX_FILE_BYTES`]: (path, size); not read.
    pub too_large: Vec<(String, usize)>,
    /// Files that would take the commit past [`MAX_TREE_BYTES`]: (path,
    /// size); not read.
    pub over_total: Vec<(String, usize)>,
    /// Directories deeper than [`MAX_TREE_DEPTH`]; not walked.
    pub too_deep: Vec<String>,
    /// Bytes read (the files in `files`).
    pub total: usize,
    /// `path` does not exist (or is not a directory) at this commit.
    pub missing_path: bool,
}

impl TreeFiles {
    /// Errors for what was not read (too large, past the total, too deep),
    /// and for a tree with no policy file at all (`at` names where it
    /// looked), as `validate` reports them.
    pub fn diagnostics(&self, at: &str) -> Vec<Diagnostic> {
        let start = Pos { line: 1, column: 1 };
        let mut out: Vec<Diagnostic> = self
            .too_large
            .iter()
            .map(|(path, size)| {
                Diagnostic::new(
                    Code::TooLarge,
                    path,
                    start,
                    format!("file is {size} bytes, over the limit of {MAX_FILE_BYTES} bytes"),
                )
                .with_hint(
                    "split the file, or leave it out with --exclude if it is not mesh policy",
                )
            })
            .chain(self.over_total.iter().map(|(path, size)| {
                Diagnostic::new(
                    Code::TooLarge,
                    path,
                    start,
                    format!(
                        "not read: its {size} bytes would take this commit's policy files past \
                         {MAX_TREE_BYTES} bytes in all"
                    ),
                )
                .with_hint("leave files that are not mesh policy out with --path or --exclude")
            }))
            .chain(self.too_deep.iter().map(|dir| {
                Diagnostic::new(
                    Code::TooLarge,
                    dir,
                    start,
                    format!("not read: directories nest deeper than {MAX_TREE_DEPTH} levels here"),
                )
                .with_hint("leave it out with --path or --exclude")
            }))
            .collect();
        if self.files.is_empty() && out.is_empty() {
            out.push(
                Diagnostic::new(
                    Code::Io,
                    at,
                    start,
                    "no *.yaml or *.yml file here (after --include/--exclude)",
                )
                .with_hint("check --path and the globs; an empty policy would remove every route"),
            );
        }
        out
    }
}

/// The selected files of `commit`, under `path` (`None` or empty: the
/// whole tree).
pub fn read_tree(
    repo: &Repository,
    commit: Oid,
    path: Option<&Path>,
    sel: &Selection,
) -> Result<TreeFiles, git2::Error> {
    let tree = repo.find_commit(commit)?.tree()?;
    let mut out = TreeFiles::default();
    let p = path.map(normalize).unwrap_or_default();
    let (root, prefix) = if p.is_empty() {
        (tree, String::new())
    } else {
        match tree.get_path(Path::new(&p)) {
            Ok(entry) if entry.kind() == Some(ObjectType::Tree) => {
                (repo.find_tree(entry.id())?, format!("{p}/"))
            }
            Ok(_) => {
                out.missing_path = true;
                return Ok(out);
            }
            Err(e) if e.code() == ErrorCode::NotFound => {
                out.missing_path = true;
                return Ok(out);
            }
            Err(e) => return Err(e),
        }
    };
    let odb = repo.odb()?;
    let walk = Walk {
        repo,
        odb: &odb,
        prefix: &prefix,
        sel,
    };
    walk.collect(&root, "", 0, &mut out)?;
    out.files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// `a/./b/` → `a/b`: only normal components, `/`-separated.
pub fn normalize(p: &Path) -> String {
    p.components()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

struct Walk<'a> {
    repo: &'a Repository,
    odb: &'a Odb<'a>,
    /// The repository path of the walk's root, with a trailing `/`.
    prefix: &'a str,
    sel: &'a Selection,
}

impl Walk<'_> {
    /// Walks `tree` depth-first in name order; `rel` is the path below the
    /// root (what the globs match).
    fn collect(
        &self,
        tree: &Tree<'_>,
        rel: &str,
        depth: usize,
        out: &mut TreeFiles,
    ) -> Result<(), git2::Error> {
        for entry in tree.iter() {
            // Non-UTF-8 names cannot be policy files (nor be shown in a
            // diagnostic).
            let Ok(name) = entry.name() else { continue };
            // Like a directory walk: hidden entries are not policy
            // (`.github/`, `.gitlab-ci.yml`).
            if name.starts_with('.') {
                continue;
            }
            let child = format!("{rel}{name}");
            match entry.kind() {
                Some(ObjectType::Tree) if depth >= MAX_TREE_DEPTH => {
                    out.too_deep.push(format!("{}{child}", self.prefix));
                }
                Some(ObjectType::Tree) => {
                    let sub = self.repo.find_tree(entry.id())?;
                    self.collect(&sub, &format!("{child}/"), depth + 1, out)?;
                }
                // 0o120000 is a symlink: its blob is a path, not a file.
                Some(ObjectType::Blob) if entry.filemode() != 0o120000 => {
                    if !self.sel.selects(Path::new(&child)) {
                        continue;
                    }
                    let path = format!("{}{child}", self.prefix);
                    // The size from the object header: a huge blob is never
                    // inflated just to learn that it is huge.
                    let (size, _) = self.odb.read_header(entry.id())?;
                    if size > MAX_FILE_BYTES {
                        out.too_large.push((path, size));
                    } else if out.total + size > MAX_TREE_BYTES {
                        out.over_total.push((path, size));
                    } else {
                        let blob = self.repo.find_blob(entry.id())?;
                        out.total += blob.size();
                        out.files.push((path, blob.content().to_vec()));
                    }
                }
                // Submodules (commits) and symlinks are not followed.
                _ => {}
            }
        }
        Ok(())
    }
}

/// The commit `rev` names (a SHA, `HEAD~1`, a branch or tag: anything
/// `git rev-parse` understands), peeled from a tag.
pub fn resolve_commit(repo: &Repository, rev: &str) -> Result<Oid, git2::Error> {
    Ok(repo.revparse_single(rev)?.peel_to_commit()?.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let ok = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .status()
            .expect("git runs")
            .success();
        assert!(ok, "git {args:?} failed");
    }

    /// A hostile tree: a policy file 70 directories down, and a 9 MiB one.
    /// Neither is read; both are reported, with the path where it stopped.
    #[test]
    fn deep_trees_and_huge_blobs_are_reported_not_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        git(dir, &["init", "-q", "-b", "main"]);
        let deep: std::path::PathBuf = std::iter::repeat_n("d", 70).collect();
        std::fs::create_dir_all(dir.join(&deep)).expect("mkdir");
        std::fs::write(dir.join(&deep).join("x.yaml"), "kind: Cluster\n").expect("write");
        std::fs::write(dir.join("big.yaml"), vec![b'#'; 9 << 20]).expect("write");
        std::fs::write(dir.join("ok.yaml"), "a: 1\n").expect("write");
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-q", "-m", "hostile"]);
        let repo = Repository::open(dir).expect("open");
        let head = resolve_commit(&repo, "HEAD").expect("HEAD");
        let t = read_tree(&repo, head, None, &Selection::default()).expect("read");
        assert_eq!(t.files.len(), 1, "{:?}", t.too_deep);
        assert_eq!(t.files[0].0, "ok.yaml");
        assert_eq!(t.too_large, [("big.yaml".to_string(), 9 << 20)]);
        let stop: Vec<&str> = std::iter::repeat_n("d", MAX_TREE_DEPTH + 1).collect();
        assert_eq!(t.too_deep, [stop.join("/")]);
        let d = t.diagnostics(".");
        assert_eq!(d.len(), 2, "{d:#?}");
        assert!(d.iter().all(|d| d.is_error() && d.code == Code::TooLarge));
        // A path that is not there is said so, not read as empty.
        let t = read_tree(
            &repo,
            head,
            Some(Path::new("nowhere")),
            &Selection::default(),
        )
        .expect("read");
        assert!(t.missing_path);
    }
}
