//! The Git source: a bare mirror of the policy repository in the state
//! directory, fetched with libgit2 (git2), and the files of one commit read
//! straight from its object database.
//!
//! Every call here blocks (libgit2 does network and disk I/O), so async code
//! runs them in `spawn_blocking`; each call opens the mirror afresh, so a
//! status request never waits behind a slow fetch.
//!
//! - Remotes: a local path, `file://`, `git://`, smart HTTP(S) (token as
//!   basic auth or a bearer header) and SSH (key file).
//! - The tracked ref is fetched with a forced refspec
//!   (`+refs/heads/main:refs/meshfed/tracked`), so a force-push is simply a
//!   new head.
//! - Files are read from the commit's tree, under `--path`, through the same
//!   [`Selection`] (globs, `*.yaml`/`*.yml`, hidden directories skipped) that
//!   `meshfed-policy validate` uses on a directory. There is no working copy
//!   to race with.
//! - Signed commits: SSH signatures (`gpg.format=ssh`) checked against
//!   trusted keys. OpenPGP signatures are not supported; configuring an
//!   OpenPGP key is refused at startup rather than silently ignored.
//! - Secrets (tokens, URL credentials) never leave this module unredacted:
//!   every error message goes through [`Redactor`].
//! - Memory is bounded whatever the repository holds. A fetch may bring at
//!   most `--max-fetch-bytes` ([`SourceConfig::max_fetch_bytes`]): from a
//!   network remote the transfer is aborted once that many bytes arrived
//!   (libgit2 streams the pack to disk, so this bounds disk and time); from
//!   a local one (a path or `file://`, where libgit2 packs the objects in
//!   this process and holds whole blobs in memory), the new objects' sizes
//!   are read from their headers and the fetch is refused before any is
//!   loaded. Reading a commit ([`meshfed_policy::git::read_tree`], shared
//!   with `meshfed-policy diff`), only selected `*.yaml`/`*.yml` blobs are
//!   read, each after its size was checked from the object header (never
//!   inflated first), and at most [`MAX_TREE_BYTES`] in all.
//!
//! - Time is bounded too: a fetch fails after `--fetch-timeout`
//!   ([`SourceConfig::fetch_timeout`]) of waiting to connect or of silence
//!   from the remote (libgit2's socket timeouts, set once at start by
//!   [`timeouts::set`]), and a transfer still running at the timeout is
//!   aborted at its next progress report; so a remote that accepts the
//!   connection and then says nothing cannot hold the sync loop, or
//!   SIGTERM, forever.
//!
//! It does not decide when to fetch ([`crate::trigger`]) or what a commit
//! means ([`crate::pipeline`]).

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use git2::{
    AutotagOption, Cred, CredentialType, ErrorClass, ErrorCode, FetchOptions, ObjectType, Odb, Oid,
    RemoteCallbacks, Repository,
};
use meshfed_policy::fs::Selection;

pub mod timeouts;

/// The local ref the tracked remote ref is fetched into.
pub const TRACKED_REF: &str = "refs/meshfed/tracked";

pub use meshfed_policy::git::{MAX_FILE_BYTES, MAX_TREE_BYTES, TreeFiles};

/// The default of `--max-fetch-bytes`: what one fetch may bring. A local
/// fetch holds about twice its largest object in memory (libgit2's pack
/// builder), so this keeps the syncer well inside its 512 MiB limit.
pub const DEFAULT_MAX_FETCH_BYTES: u64 = 128 << 20;

/// A secret string: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself; only for the place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How an HTTP(S) token is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenStyle {
    /// Basic auth with the token as password (GitHub, GitLab, Gitea all
    /// accept it); the user name comes from the URL or `--git-user`.
    #[default]
    Basic,
    /// An `Authorization: Bearer <token>` header (Azure DevOps, proxies).
    Bearer,
}

/// Credentials for the remote.
#[derive(Debug, Clone, Default)]
pub struct RemoteAuth {
    /// An HTTP(S) token.
    pub token: Option<Secret>,
    pub token_style: TokenStyle,
    /// The user name for basic auth when the URL has none.
    pub user: Option<String>,
    /// A private key file for SSH remotes.
    pub ssh_key: Option<PathBuf>,
}

/// What to fetch and read.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The remote URL or local path, as configured (may hold credentials).
    pub url: String,
    /// A branch name (`main`) or a full ref (`refs/heads/main`,
    /// `refs/tags/v1`).
    pub reference: String,
    /// Only files under this directory of the repository.
    pub path: Option<PathBuf>,
    pub selection: Selection,
    pub auth: RemoteAuth,
    /// The bare mirror's directory.
    pub mirror: PathBuf,
    /// Trusted signers; `Some` means every applied commit must be signed by
    /// one of them.
    pub signers: Option<TrustedSigners>,
    /// The most one fetch may bring (`--max-fetch-bytes`): bytes received
    /// from a network remote, or the objects' uncompressed size from a
    /// local one.
    pub max_fetch_bytes: u64,
    /// The most one fetch may take (`--fetch-timeout`): connecting, and
    /// each wait for the remote, fail after it; a transfer still running
    /// at it is aborted.
    pub fetch_timeout: Duration,
}

/// The default of `--fetch-timeout`.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(60);

impl SourceConfig {
    /// The full remote ref name.
    pub fn remote_ref(&self) -> String {
        if self.reference.starts_with("refs/") {
            self.reference.clone()
        } else {
            format!("refs/heads/{}", self.reference)
        }
    }
}

/// Replaces secrets in text meant for logs, status and errors.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    /// A redactor for a remote URL and its token.
    pub fn new(url: &str, auth: &RemoteAuth) -> Self {
        let mut secrets = Vec::new();
        if let Some(userinfo) = url_userinfo(url) {
            secrets.push(userinfo.to_string());
            if let Some((user, pass)) = userinfo.split_once(':') {
                secrets.push(pass.to_string());
                if is_http(url) {
                    secrets.push(user.to_string());
                }
            } else if is_http(url) {
                // `https://TOKEN@host/...` is the common way to put a token in a URL.
                secrets.push(userinfo.to_string());
            }
        }
        if let Some(t) = &auth.token {
            secrets.push(t.expose().to_string());
        }
        // Longest first, so a secret that contains another is replaced whole.
        secrets.retain(|s| s.len() >= 3);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    /// `text` with every secret replaced by `***`.
    pub fn apply(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

/// `url` without credentials: HTTP(S) user info is dropped to `***`, an
/// SSH password is dropped (the user name stays).
pub fn redact_url(url: &str) -> String {
    let Some(userinfo) = url_userinfo(url) else {
        return url.to_string();
    };
    let replacement = match userinfo.split_once(':') {
        Some((user, _)) if !is_http(url) => format!("{user}:***"),
        _ if is_http(url) => "***".to_string(),
        _ => userinfo.to_string(),
    };
    url.replacen(&format!("{userinfo}@"), &format!("{replacement}@"), 1)
}

fn is_http(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// The `user[:password]` part of a `scheme://user[:password]@host/...` URL.
fn url_userinfo(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let at = authority.rfind('@')?;
    Some(&authority[..at])
}

/// Why the Git source failed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open or create the Git mirror at {path}: {message}; hint: {hint}")]
    Mirror {
        path: String,
        message: String,
        hint: &'static str,
    },
    #[error("fetching {reference} from {url} failed: {message}; hint: {hint}")]
    Fetch {
        url: String,
        reference: String,
        message: String,
        hint: String,
    },
    #[error(
        "{url} has no {reference}; hint: check --branch (a branch name, or a full ref such as refs/tags/v1)"
    )]
    NoSuchRef { url: String, reference: String },
    #[error(
        "fetching {reference} from {url} refused: {what}, over --max-fetch-bytes ({limit} bytes); \
         hint: take the large files out of the policy repository's history (keep binaries \
         elsewhere, or in Git LFS), point --path at a smaller repository, or raise \
         --max-fetch-bytes if it is really this large (mind the syncer's memory limit); the \
         syncer keeps serving its last good snapshots meanwhile"
    )]
    TooLarge {
        url: String,
        reference: String,
        /// The commit the remote's ref points to, when the remote said so.
        commit: Option<String>,
        /// What was over: "commit X brings N bytes of objects", ...
        what: String,
        limit: u64,
    },
    #[error(
        "fetching {reference} from {url} timed out after {}s (--fetch-timeout): {what}; hint: is \
         the remote up and answering? A remote that accepts connections but never answers looks \
         like this; the syncer keeps serving its last good snapshots meanwhile",
        timeout.as_secs_f64()
    )]
    Timeout {
        url: String,
        reference: String,
        timeout: Duration,
        what: String,
    },
    #[error("reading commit {commit}: {message}")]
    Read { commit: String, message: String },
    #[error("cannot read trusted signing keys from {path}: {message}")]
    Signers { path: String, message: String },
}

/// A fetch's outcome.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The tracked ref's commit, 40 hex digits.
    pub commit: String,
    pub elapsed: Duration,
}

/// The Git source. Cheap to share (`Arc`); methods block.
#[derive(Debug)]
pub struct GitSource {
    cfg: SourceConfig,
    redactor: Redactor,
}

impl GitSource {
    /// Opens the mirror, creating it (bare) on first use.
    pub fn open(cfg: SourceConfig) -> Result<Self, GitError> {
        let redactor = Redactor::new(&cfg.url, &cfg.auth);
        let src = GitSource { cfg, redactor };
        if !src.cfg.mirror.join("HEAD").exists() {
            std::fs::create_dir_all(&src.cfg.mirror).map_err(|e| GitError::Mirror {
                path: src.cfg.mirror.display().to_string(),
                message: e.to_string(),
                hint: "check that --state-dir is writable",
            })?;
            Repository::init_bare(&src.cfg.mirror).map_err(|e| src.mirror_error(&e))?;
        }
        src.repo()?;
        Ok(src)
    }

    pub fn config(&self) -> &SourceConfig {
        &self.cfg
    }

    /// The remote URL with credentials removed, for logs and status.
    pub fn display_url(&self) -> String {
        self.redactor.apply(&redact_url(&self.cfg.url))
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    fn repo(&self) -> Result<Repository, GitError> {
        Repository::open_bare(&self.cfg.mirror).map_err(|e| self.mirror_error(&e))
    }

    fn mirror_error(&self, e: &git2::Error) -> GitError {
        GitError::Mirror {
            path: self.cfg.mirror.display().to_string(),
            message: self.redactor.apply(e.message()),
            hint: "the mirror is a cache: if it is corrupt, stop the syncer, delete it and restart",
        }
    }

    /// The commit the tracked ref pointed to at the last successful fetch.
    pub fn tracked(&self) -> Option<String> {
        let repo = self.repo().ok()?;
        let oid = repo.refname_to_id(TRACKED_REF).ok()?;
        Some(oid.to_string())
    }

    /// Fetches the tracked ref (forced, so rewritten history is fine) and
    /// returns its commit. Refuses, with [`GitError::TooLarge`], a fetch
    /// that would bring more than `max_fetch_bytes`; the mirror is then
    /// unchanged (an aborted pack is never indexed).
    pub fn fetch(&self) -> Result<Fetched, GitError> {
        let started = Instant::now();
        let repo = self.repo()?;
        let reference = self.cfg.remote_ref();
        let fetch_err = |e: &git2::Error| GitError::Fetch {
            url: self.display_url(),
            reference: reference.clone(),
            message: self.redactor.apply(e.message()),
            hint: fetch_hint(e, &self.cfg.url),
        };
        if let Some(path) = local_remote(&self.cfg.url) {
            self.check_local_size(&repo, &path, &reference)?;
        }
        let stopped_at = Cell::new(0u64);
        let deadline = started + self.cfg.fetch_timeout;
        let mut remote = repo
            .remote_anonymous(&self.cfg.url)
            .map_err(|e| fetch_err(&e))?;
        let mut opts = FetchOptions::new();
        opts.download_tags(AutotagOption::None);
        opts.remote_callbacks(self.callbacks(&stopped_at, deadline));
        let bearer = match (&self.cfg.auth.token, self.cfg.auth.token_style) {
            (Some(t), TokenStyle::Bearer) => Some(format!("Authorization: Bearer {}", t.expose())),
            _ => None,
        };
        if let Some(h) = &bearer {
            opts.custom_headers(&[h.as_str()]);
        }
        let refspec = format!("+{reference}:{TRACKED_REF}");
        if let Err(e) = remote.fetch(&[refspec.as_str()], Some(&mut opts), None) {
            let timed_out = e.code() == ErrorCode::Timeout
                || e.message().contains("timed out")
                || Instant::now() >= deadline;
            if stopped_at.get() == 0 && timed_out {
                return Err(GitError::Timeout {
                    url: self.display_url(),
                    reference,
                    timeout: self.cfg.fetch_timeout,
                    what: self.redactor.apply(e.message()),
                });
            }
            if stopped_at.get() > 0 {
                // The advertised refs stay readable after the abort: name
                // the commit that was refused.
                let commit = remote.list().ok().and_then(|heads| {
                    heads
                        .iter()
                        .find(|h| h.name() == reference)
                        .map(|h| h.oid().to_string())
                });
                return Err(GitError::TooLarge {
                    url: self.display_url(),
                    what: format!(
                        "{} brings more than {} bytes (the transfer was stopped)",
                        commit
                            .as_deref()
                            .map_or("the remote's head".to_string(), |c| format!("commit {c}")),
                        self.cfg.max_fetch_bytes
                    ),
                    reference,
                    commit,
                    limit: self.cfg.max_fetch_bytes,
                });
            }
            return Err(fetch_err(&e));
        }
        // The advertised refs stay readable after the fetch disconnects. A
        // ref the remote does not have fetches nothing, which must not look
        // like "no change".
        let advertised = remote
            .list()
            .map_err(|e| fetch_err(&e))?
            .iter()
            .any(|h| h.name() == reference);
        if !advertised {
            return Err(GitError::NoSuchRef {
                url: self.display_url(),
                reference,
            });
        }
        let oid = repo.refname_to_id(TRACKED_REF).map_err(|e| fetch_err(&e))?;
        Ok(Fetched {
            commit: oid.to_string(),
            elapsed: started.elapsed(),
        })
    }

    /// A local remote is packed in this process, whole objects in memory,
    /// before any transfer callback runs: so the new objects' sizes are
    /// summed from their headers first (nothing is inflated), and a fetch
    /// over the limit is refused before it starts. The tree the mirror
    /// already tracks is not counted; history behind it is not walked.
    fn check_local_size(
        &self,
        mirror: &Repository,
        path: &Path,
        reference: &str,
    ) -> Result<(), GitError> {
        // Anything unreadable here is left to the fetch, which reports it.
        let Ok(remote) = Repository::open(path) else {
            return Ok(());
        };
        let Ok(tip) = remote
            .revparse_single(reference)
            .and_then(|o| o.peel_to_commit())
        else {
            return Ok(());
        };
        let limit = self.cfg.max_fetch_bytes;
        let read_err = |e: &git2::Error| GitError::Read {
            commit: tip.id().to_string(),
            message: self.redactor.apply(e.message()),
        };
        let odb = remote.odb().map_err(|e| read_err(&e))?;
        let mut seen = HashSet::new();
        let mut walk = remote.revwalk().map_err(|e| read_err(&e))?;
        walk.push(tip.id()).map_err(|e| read_err(&e))?;
        if let Ok(have) = mirror.refname_to_id(TRACKED_REF)
            && let Ok(have) = remote.find_commit(have)
        {
            // Unknown to the remote (rewritten history): nothing hidden.
            let _ = walk.hide(have.id());
            let mut ignored = 0u64;
            let _ = sum_tree(
                &odb,
                &remote,
                have.tree_id(),
                &mut seen,
                &mut ignored,
                u64::MAX,
            );
        }
        let mut total = 0u64;
        for id in walk {
            let id = id.map_err(|e| read_err(&e))?;
            let commit = remote.find_commit(id).map_err(|e| read_err(&e))?;
            sum_tree(
                &odb,
                &remote,
                commit.tree_id(),
                &mut seen,
                &mut total,
                limit,
            )
            .map_err(|e| read_err(&e))?;
            if total > limit {
                return Err(GitError::TooLarge {
                    url: self.display_url(),
                    reference: reference.to_string(),
                    commit: Some(tip.id().to_string()),
                    what: format!(
                        "commit {} brings more than {total} bytes of new objects \
                         (counted up to commit {id})",
                        tip.id()
                    ),
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Credentials, and the transfer bound: past `max_fetch_bytes`
    /// received, the transfer is aborted and `stopped_at` says where.
    /// Past `deadline`, the next progress report aborts the transfer.
    fn callbacks<'a>(
        &'a self,
        stopped_at: &'a Cell<u64>,
        deadline: Instant,
    ) -> RemoteCallbacks<'a> {
        let mut cb = RemoteCallbacks::new();
        let limit = self.cfg.max_fetch_bytes;
        cb.transfer_progress(move |p| {
            let received = p.received_bytes() as u64;
            if received > limit {
                stopped_at.set(received);
                return false;
            }
            Instant::now() < deadline
        });
        cb.sideband_progress(move |_| Instant::now() < deadline);
        let mut attempts = 0u32;
        cb.credentials(move |_url, user_from_url, allowed| {
            // libgit2 asks again after a refusal; one try per fetch, or a
            // wrong token loops forever.
            attempts += 1;
            if attempts > 1 {
                return Err(git2::Error::from_str("the remote refused the credentials"));
            }
            let auth = &self.cfg.auth;
            if allowed.contains(CredentialType::SSH_KEY) {
                let user = user_from_url.or(auth.user.as_deref()).unwrap_or("git");
                return match &auth.ssh_key {
                    Some(key) => Cred::ssh_key(user, None, key, None),
                    None => Err(git2::Error::from_str(
                        "the SSH remote needs a key; set --ssh-key",
                    )),
                };
            }
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
                if let Some(token) = &auth.token {
                    let user = user_from_url
                        .or(auth.user.as_deref())
                        .unwrap_or("x-access-token");
                    return Cred::userpass_plaintext(user, token.expose());
                }
                return Err(git2::Error::from_str(
                    "the remote asks for credentials; set --git-token-file or MESHFED_GIT_TOKEN",
                ));
            }
            if allowed.contains(CredentialType::USERNAME) {
                return Cred::username(auth.user.as_deref().unwrap_or("git"));
            }
            Err(git2::Error::from_str("no usable credential type"))
        });
        cb
    }

    /// The selected files of `commit`, under `--path`
    /// ([`meshfed_policy::git::read_tree`], bounded the same way for
    /// `meshfed-policy diff`).
    pub fn read_tree(&self, commit: &str) -> Result<TreeFiles, GitError> {
        let repo = self.repo()?;
        let read_err = |e: &git2::Error| GitError::Read {
            commit: commit.to_string(),
            message: self.redactor.apply(e.message()),
        };
        let oid = Oid::from_str(commit).map_err(|e| read_err(&e))?;
        meshfed_policy::git::read_tree(&repo, oid, self.cfg.path.as_deref(), &self.cfg.selection)
            .map_err(|e| read_err(&e))
    }

    /// Whether `descendant` contains `ancestor` (equal counts). Unknown
    /// commits (not in the mirror) contain nothing.
    pub fn is_ancestor(&self, ancestor: &str, descendant: &str) -> Result<bool, GitError> {
        if ancestor.eq_ignore_ascii_case(descendant) {
            return Ok(true);
        }
        let (Ok(a), Ok(d)) = (Oid::from_str(ancestor), Oid::from_str(descendant)) else {
            return Ok(false);
        };
        let repo = self.repo()?;
        if repo.find_commit(a).is_err() || repo.find_commit(d).is_err() {
            return Ok(false);
        }
        repo.graph_descendant_of(d, a).map_err(|e| GitError::Read {
            commit: descendant.to_string(),
            message: e.message().to_string(),
        })
    }

    /// The message of `commit`, if the mirror has it.
    pub fn message(&self, commit: &str) -> Option<String> {
        let repo = self.repo().ok()?;
        let c = repo.find_commit(Oid::from_str(commit).ok()?).ok()?;
        Some(String::from_utf8_lossy(c.message_bytes()).into_owned())
    }

    /// Resolves an abbreviated SHA to the full one, if the mirror has it.
    pub fn resolve(&self, prefix: &str) -> Option<String> {
        let repo = self.repo().ok()?;
        let obj = repo.revparse_single(prefix).ok()?;
        let commit = obj.peel_to_commit().ok()?;
        Some(commit.id().to_string())
    }

    /// Checks `commit`'s signature when signatures are required.
    pub fn verify_signature(&self, commit: &str) -> Result<Option<String>, SignatureProblem> {
        let Some(signers) = &self.cfg.signers else {
            return Ok(None);
        };
        let repo = self
            .repo()
            .map_err(|e| SignatureProblem::Malformed(e.to_string()))?;
        let oid = Oid::from_str(commit).map_err(|e| SignatureProblem::Malformed(e.to_string()))?;
        let (sig, data) = match repo.extract_signature(&oid, None) {
            Ok(x) => x,
            Err(e) if e.code() == ErrorCode::NotFound => return Err(SignatureProblem::Unsigned),
            Err(e) => return Err(SignatureProblem::Malformed(e.message().to_string())),
        };
        signers.verify(&sig, &data).map(Some)
    }
}

/// Adds the sizes of the blobs under `tree` not in `seen` to `total`
/// (headers only), stopping once it passes `limit`.
fn sum_tree(
    odb: &Odb<'_>,
    repo: &Repository,
    tree: Oid,
    seen: &mut HashSet<Oid>,
    total: &mut u64,
    limit: u64,
) -> Result<(), git2::Error> {
    if !seen.insert(tree) {
        return Ok(());
    }
    let tree = repo.find_tree(tree)?;
    for entry in tree.iter() {
        if *total > limit {
            return Ok(());
        }
        match entry.kind() {
            Some(ObjectType::Tree) => sum_tree(odb, repo, entry.id(), seen, total, limit)?,
            Some(ObjectType::Blob) if seen.insert(entry.id()) => {
                let (size, _) = odb.read_header(entry.id())?;
                *total = total.saturating_add(size as u64);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The directory of a local remote (a path or `file://`), which libgit2
/// fetches in-process.
fn local_remote(url: &str) -> Option<PathBuf> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Some(PathBuf::from(rest));
    }
    if url.contains("://") {
        return None;
    }
    // `user@host:path` and `host:path` are SSH (scp syntax), as git reads them.
    let scp = url
        .find(':')
        .is_some_and(|i| !url[..i].contains('/') && i > 1);
    (!scp).then(|| PathBuf::from(url))
}

fn fetch_hint(e: &git2::Error, url: &str) -> String {
    let ssh = url.starts_with("ssh://") || (!url.contains("://") && url.contains('@'));
    match (e.class(), e.code()) {
        (_, ErrorCode::Auth) | (ErrorClass::Http, _) if e.message().contains("401") => {
            "the remote refused the credentials; check --git-token-file / MESHFED_GIT_TOKEN and --git-user".into()
        }
        (_, ErrorCode::Auth) => {
            "the remote refused the credentials; check --git-token-file, --git-user or --ssh-key".into()
        }
        (ErrorClass::Ssh, _) => {
            "check --ssh-key, and that the host is in ~/.ssh/known_hosts".into()
        }
        (ErrorClass::Net | ErrorClass::Os, _) | (ErrorClass::Http, _) => {
            "is the remote reachable from here? The syncer keeps serving its last good snapshots meanwhile".into()
        }
        (ErrorClass::Repository, _) if !url.contains("://") && !ssh => {
            "a local remote must be a path to a Git repository".into()
        }
        _ => "check --repo and --branch; the syncer keeps serving its last good snapshots meanwhile"
            .into(),
    }
}

/// Why a commit's signature is not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignatureProblem {
    #[error("the commit is not signed, and --require-signed is set")]
    Unsigned,
    #[error(
        "the commit has an OpenPGP signature; this syncer verifies SSH signatures only (git config gpg.format ssh)"
    )]
    Gpg,
    #[error("the commit's signature cannot be read: {0}")]
    Malformed(String),
    #[error("the commit is signed by {0}, which is not a trusted key (--trusted-keys)")]
    Untrusted(String),
    #[error("the commit's signature by {fingerprint} does not verify: {reason}")]
    Invalid { fingerprint: String, reason: String },
}

/// The SSH public keys whose signatures are trusted.
#[derive(Debug, Clone)]
pub struct TrustedSigners {
    keys: Vec<ssh_key::PublicKey>,
}

/// SSH signatures made by git use this namespace.
const GIT_NAMESPACE: &str = "git";

impl TrustedSigners {
    /// Reads trusted keys: one per line, OpenSSH public key format
    /// (`ssh-ed25519 AAAA... comment`) or git's allowed-signers format
    /// (`principal [options] ssh-ed25519 AAAA...`). `#` comments and blank
    /// lines are skipped. OpenPGP keys are refused.
    pub fn load(path: &Path) -> Result<Self, GitError> {
        let err = |message: String| GitError::Signers {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        if text.contains("BEGIN PGP") {
            return Err(
                "it holds an OpenPGP key; this syncer verifies SSH commit signatures only \
                        (sign with `git config gpg.format ssh`), so it refuses to start rather \
                        than accept commits it cannot check"
                    .into(),
            );
        }
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let start = ["ssh-", "ecdsa-", "sk-"]
                .iter()
                .filter_map(|p| line.find(p))
                .min()
                .ok_or_else(|| format!("line {}: no SSH public key", n + 1))?;
            let key = ssh_key::PublicKey::from_openssh(&line[start..])
                .map_err(|e| format!("line {}: {e}", n + 1))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("no key in the file; --require-signed needs at least one".into());
        }
        Ok(TrustedSigners { keys })
    }

    /// Checks a commit signature over `data`; returns the signer's
    /// fingerprint.
    pub fn verify(&self, signature: &[u8], data: &[u8]) -> Result<String, SignatureProblem> {
        let text = String::from_utf8_lossy(signature);
        if text.contains("BEGIN PGP SIGNATURE") {
            return Err(SignatureProblem::Gpg);
        }
        let sig = ssh_key::SshSig::from_pem(signature)
            .map_err(|e| SignatureProblem::Malformed(e.to_string()))?;
        let fingerprint = ssh_key::PublicKey::from(sig.public_key().clone())
            .fingerprint(ssh_key::HashAlg::Sha256)
            .to_string();
        let Some(key) = self.keys.iter().find(|k| k.key_data() == sig.public_key()) else {
            return Err(SignatureProblem::Untrusted(fingerprint));
        };
        key.verify(GIT_NAMESPACE, data, &sig)
            .map_err(|e| SignatureProblem::Invalid {
                fingerprint: fingerprint.clone(),
                reason: e.to_string(),
            })?;
        Ok(fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_credentials_are_redacted_from_urls() {
        assert_eq!(
            redact_url("https://user:s3cret@git.example.com/org/repo.git"),
            "https://***@git.example.com/org/repo.git"
        );
        assert_eq!(
            redact_url("https://ghp_token@github.com/org/repo"),
            "https://***@github.com/org/repo"
        );
        assert_eq!(
            redact_url("ssh://git:pw@host/repo"),
            "ssh://git:***@host/repo"
        );
        assert_eq!(redact_url("ssh://git@host/repo"), "ssh://git@host/repo");
        assert_eq!(redact_url("/srv/git/policy"), "/srv/git/policy");
    }

    #[test]
    fn redactor_removes_url_secrets_and_tokens_from_any_text() {
        let auth = RemoteAuth {
            token: Some(Secret::new("tok-12345")),
            ..Default::default()
        };
        let r = Redactor::new("https://alice:pa55word@h/r", &auth);
        let out = r.apply("failed https://alice:pa55word@h/r with tok-12345 and pa55word");
        assert!(!out.contains("pa55word"), "{out}");
        assert!(!out.contains("tok-12345"), "{out}");
        assert!(!out.contains("alice"), "{out}");
    }

    #[test]
    fn pgp_keys_are_refused_so_unverifiable_commits_are_never_accepted() {
        let e = TrustedSigners::parse("-----BEGIN PGP PUBLIC KEY BLOCK-----\nabc\n").unwrap_err();
        assert!(e.contains("OpenPGP"), "{e}");
    }

    #[test]
    fn a_branch_name_tracks_refs_heads() {
        let cfg = SourceConfig {
            url: "/x".into(),
            reference: "main".into(),
            path: None,
            selection: Selection::default(),
            auth: RemoteAuth::default(),
            mirror: "/m".into(),
            signers: None,
            max_fetch_bytes: DEFAULT_MAX_FETCH_BYTES,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        };
        assert_eq!(cfg.remote_ref(), "refs/heads/main");
        let tag = SourceConfig {
            reference: "refs/tags/v1".into(),
            ..cfg
        };
        assert_eq!(tag.remote_ref(), "refs/tags/v1");
    }

    #[test]
    fn paths_and_file_urls_are_local_remotes_and_scp_syntax_is_ssh() {
        assert_eq!(
            local_remote("/srv/git/policy"),
            Some("/srv/git/policy".into())
        );
        assert_eq!(local_remote("file:///srv/p"), Some("/srv/p".into()));
        assert_eq!(local_remote("policy"), Some("policy".into()));
        assert_eq!(local_remote("git@github.com:org/policy.git"), None);
        assert_eq!(local_remote("https://h/r"), None);
        assert_eq!(local_remote("ssh://git@h/r"), None);
    }
}
