//! Files replaced whole: a crash leaves the old contents or the new, never
//! half of either.
//!
//! One copy of the dance, for the gateway's last good snapshot and the
//! syncer's state files: write a temporary file beside the target, fsync
//! it, rename it over the target, then fsync the directory so the rename
//! itself survives a power cut.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Which step of an atomic write failed, on which path.
#[derive(Debug)]
pub struct WriteError {
    /// `create`, `write`, `sync` or `rename into place`.
    pub step: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot {} {}: {}",
            self.step,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<WriteError> for std::io::Error {
    fn from(e: WriteError) -> Self {
        std::io::Error::new(e.source.kind(), e.to_string())
    }
}

/// Replaces `path` with `bytes` atomically, through `.NAME.tmp` in the same
/// directory (same file system, so the rename is atomic). Blocking: from
/// async code, call it in `spawn_blocking`.
///
/// A directory whose file system cannot fsync directories (`EINVAL`) is
/// accepted: the rename is then as durable as that file system makes it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let step = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError { step, path, source }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(step("create", &tmp))?;
        f.write_all(bytes).map_err(step("write", &tmp))?;
        f.sync_all().map_err(step("sync", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(step("rename into place", path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if e.kind() != std::io::ErrorKind::InvalidInput => Err(step("sync", dir)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_whole_file_and_leaves_no_temporary_behind() {
        let dir = std::env::temp_dir().join(format!("meshfed-cli-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("state.json");
        write_atomic(&target, b"a longer first version").unwrap();
        write_atomic(&target, b"second").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("state.json")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failure_names_the_step_and_the_path() {
        let target = Path::new("/nonexistent-meshfed-dir/state.json");
        let err = write_atomic(target, b"x").unwrap_err();
        assert_eq!(err.step, "create");
        let text = err.to_string();
        assert!(
            text.starts_with("cannot create /nonexistent-meshfed-dir/.state.json.tmp: "),
            "{text}"
        );
        let io: std::io::Error = err.into();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }
}
