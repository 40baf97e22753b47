//! The thin file-system shell: find the policy files under some paths and
//! read them, bounded. Everything after reading is pure (see [`crate::load`]).

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::diag::{Code, Diagnostic};
use crate::yaml::{MAX_FILE_BYTES, Pos};

/// Which files under a root are policy: `*.yaml` and `*.yml`, filtered by
/// include and exclude globs matched against the path relative to the root
/// (e.g. `charts/**`, `**/kustomization.yaml`). Hidden directories such as
/// `.git` are never entered.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
}

/// A glob that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid glob `{glob}`: {reason}")]
pub struct GlobError {
    pub glob: String,
    pub reason: String,
}

impl Selection {
    /// Builds a selection; empty `include` means every YAML file.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, GlobError> {
        fn build(globs: &[String]) -> Result<Option<GlobSet>, GlobError> {
            if globs.is_empty() {
                return Ok(None);
            }
            let mut b = GlobSetBuilder::new();
            for g in globs {
                let glob = Glob::new(g).map_err(|e| GlobError {
                    glob: g.clone(),
                    reason: e.kind().to_string(),
                })?;
                b.add(glob);
            }
            b.build().map(Some).map_err(|e| GlobError {
                glob: globs.join(","),
                reason: e.to_string(),
            })
        }
        Ok(Selection {
            include: build(include)?,
            exclude: build(exclude)?,
        })
    }

    /// Whether the file at `rel` (relative to its root) is selected.
    pub fn selects(&self, rel: &Path) -> bool {
        let yaml = rel.extension().is_some_and(|e| e == "yaml" || e == "yml");
        yaml && self.include.as_ref().is_none_or(|g| g.is_match(rel))
            && !self.exclude.as_ref().is_some_and(|g| g.is_match(rel))
    }
}

/// A file read from disk: its display name and bytes.
pub type SourceFile = (String, Vec<u8>);

/// A digest of a set of policy files (names relative to `root`, and
/// contents), independent of the order they were read in: the same files
/// give the same hex digest on every gateway that reads them, whichever
/// cluster it compiles for. File-mode gateways use it as their version, as
/// synced ones use the commit SHA.
pub fn digest_files(root: &Path, files: &[SourceFile]) -> String {
    use sha2::{Digest, Sha256};
    let prefix = root.display().to_string();
    let mut named: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| {
            let rel = n.strip_prefix(prefix.as_str()).unwrap_or(n);
            (rel.trim_start_matches('/'), b.as_slice())
        })
        .collect();
    named.sort();
    let mut h = Sha256::new();
    for (n, b) in named {
        h.update((n.len() as u64).to_le_bytes());
        h.update(n.as_bytes());
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads every selected file under each path, sorted by name within a path.
/// A path that is a file is read whatever its name. Unreadable paths become
/// `io` diagnostics; the rest is still read.
pub fn read_paths(paths: &[PathBuf], sel: &Selection) -> (Vec<SourceFile>, Vec<Diagnostic>) {
    let mut files = Vec::new();
    let mut diags = Vec::new();
    for root in paths {
        let display = root.display().to_string();
        let meta = match std::fs::metadata(root) {
            Ok(m) => m,
            Err(e) => {
                diags.push(io_diag(&display, &e));
                continue;
            }
        };
        if meta.is_file() {
            read_one(root, display, &mut files, &mut diags);
            continue;
        }
        let found_before = files.len() + diags.len();
        // Symlinked files are followed only to a target inside the
        // directory: a Kubernetes ConfigMap mount is `name -> ..data/name`
        // with `..data` a symlink to the current version beside it. A link
        // out of the directory is refused, not read.
        let inside = std::fs::canonicalize(root).ok();
        let walker = walkdir::WalkDir::new(root)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
        for entry in walker {
            match entry {
                Ok(e) if e.file_type().is_file() => {
                    let rel = e.path().strip_prefix(root).unwrap_or(e.path());
                    if sel.selects(rel) {
                        read_one(
                            e.path(),
                            e.path().display().to_string(),
                            &mut files,
                            &mut diags,
                        );
                    }
                }
                Ok(e) if e.file_type().is_symlink() && e.depth() > 0 => {
                    let rel = e.path().strip_prefix(root).unwrap_or(e.path());
                    let at = e.path().display().to_string();
                    let target = std::fs::canonicalize(e.path());
                    match (&inside, target) {
                        (Some(dir), Ok(t)) if t.starts_with(dir) => {
                            if t.is_file() && sel.selects(rel) {
                                read_one(e.path(), at, &mut files, &mut diags);
                            }
                        }
                        (_, Ok(t)) => {
                            if sel.selects(rel) {
                                diags.push(
                                    Diagnostic::new(
                                        Code::Io,
                                        &at,
                                        Pos { line: 1, column: 1 },
                                        format!(
                                            "symlink to {}, outside the policy directory: not read",
                                            t.display()
                                        ),
                                    )
                                    .with_hint("copy the file into the directory, or point the symlink inside it"),
                                );
                            }
                        }
                        (_, Err(err)) => {
                            if sel.selects(rel) {
                                diags.push(io_diag(&at, &err));
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let at = e
                        .path()
                        .map_or(display.clone(), |p| p.display().to_string());
                    diags.push(Diagnostic::new(
                        Code::Io,
                        &at,
                        Pos { line: 1, column: 1 },
                        format!("cannot read: {e}"),
                    ));
                }
            }
        }
        if files.len() + diags.len() == found_before {
            // A typo'd directory must not pass CI as "valid: 0 files".
            diags.push(
                Diagnostic::new(
                    Code::Io,
                    &display,
                    Pos { line: 1, column: 1 },
                    "no *.yaml or *.yml file here (after --include/--exclude)",
                )
                .with_hint("check the path and the globs"),
            );
        }
    }
    (files, diags)
}

fn read_one(
    path: &Path,
    display: String,
    files: &mut Vec<SourceFile>,
    diags: &mut Vec<Diagnostic>,
) {
    // Check the size before reading, so a huge file costs nothing.
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE_BYTES as u64 => {
            diags.push(
                Diagnostic::new(
                    Code::TooLarge,
                    &display,
                    Pos { line: 1, column: 1 },
                    format!(
                        "file is {} bytes, over the limit of {MAX_FILE_BYTES} bytes",
                        m.len()
                    ),
                )
                .with_hint("split the file, or exclude it with --exclude if it is not mesh policy"),
            );
            return;
        }
        Err(e) => {
            diags.push(io_diag(&display, &e));
            return;
        }
        Ok(_) => {}
    }
    match std::fs::read(path) {
        Ok(bytes) => files.push((display, bytes)),
        Err(e) => diags.push(io_diag(&display, &e)),
    }
}

fn io_diag(display: &str, e: &std::io::Error) -> Diagnostic {
    Diagnostic::new(
        Code::Io,
        display,
        Pos { line: 1, column: 1 },
        format!("cannot read: {e}"),
    )
}
