//! The commit pipeline: fetch → read the commit's tree → (signature) →
//! `meshfed_policy::analyze` → compile one snapshot per declared cluster,
//! version = commit SHA → publish all of them at once.
//!
//! A commit with any error is rejected as a whole: the last good
//! [`Published`] stays in force, and the commit, its reason and every
//! diagnostic (`FILE:LINE:COL`, repository-relative) go to the status API,
//! the metrics and the log. Accepted snapshots are persisted in the state
//! directory (`last-good.json`, written atomically), so a restarted syncer
//! serves them before its first fetch, even with the remote unreachable.
//!
//! [`SyncState`] is what the pipeline knows (head, last good, recent
//! rejections); the status API reads it. Syncs are serialized by the
//! trigger loop ([`crate::trigger`]); nothing here runs two at once.
//!
//! It does not re-implement any policy rule (the `meshfed-policy` crate owns
//! them all), and it does not deliver snapshots ([`crate::server`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use meshfed_policy::{Diagnostic, Options, Snapshot};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::git::{GitError, GitSource, TreeFiles};
use crate::metrics::Metrics;
use crate::rollout::{ClusterSnapshot, Published};
use crate::waves::Waves;

/// The file holding the last good snapshots.
pub const LAST_GOOD_FILE: &str = "last-good.json";
/// How many rejected commits the status keeps.
pub const REJECTED_KEPT: usize = 20;
/// How many accepted commits the status remembers (for per-commit views).
pub const ACCEPTED_KEPT: usize = 100;

/// The commit-message trailer that lets one commit delete more than
/// `--max-deletion-percent` of the resources.
pub const ALLOW_DELETION_TRAILER: &str = "Meshfed-Allow-Deletion";

/// The default of `--max-deletion-percent`.
pub const DEFAULT_MAX_DELETION_PERCENT: u8 = 50;

/// A valid commit held back because it deletes too much of the last good
/// policy; it goes live once a commit that carries the override contains
/// it.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    pub commit: String,
    #[serde(serialize_with = "ser_time")]
    pub at: SystemTime,
    /// Always `held`, for readers that look at states.
    pub state: &'static str,
    /// One line: how much it deletes, the limit, and how to override.
    pub reason: String,
    /// Resources of the last good commit, and how many this one removes.
    pub last_good_resources: usize,
    pub removed: usize,
    /// Some of the removed resources (`Kind namespace/name`), at most 20.
    pub removed_sample: Vec<String>,
}

/// A rejected commit, as the status API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    pub commit: String,
    #[serde(serialize_with = "ser_time")]
    pub at: SystemTime,
    /// One line: why (errors count, signature, missing path...).
    pub reason: String,
    /// Every diagnostic (errors and warnings) of the commit.
    pub diagnostics: Vec<Diagnostic>,
}

/// An accepted commit.
#[derive(Debug, Clone, Serialize)]
pub struct Accepted {
    pub commit: String,
    #[serde(serialize_with = "ser_time")]
    pub at: SystemTime,
    /// The clusters it has a snapshot for.
    pub clusters: BTreeSet<String>,
    /// Warnings the policy had (accepted anyway).
    pub warnings: usize,
    /// Restored from the state directory rather than compiled by this process.
    pub restored: bool,
    /// What it changes for each cluster's gateways, from the commit
    /// published before it (`meshfed-policy diff`'s report); absent for
    /// the first commit this process published, and when restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<Changes>,
}

/// The most changes kept per cluster and commit for the status API.
pub const MAX_CHANGES_KEPT: usize = 50;

fn short_sha(c: &str) -> &str {
    c.get(..12).unwrap_or(c)
}

/// The effective change a commit brings, per cluster
/// ([`meshfed_policy::diff`]), computed from the snapshots published
/// before it and its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Changes {
    /// The commit published before it.
    pub from: String,
    /// Every cluster of either commit, with its status and changes.
    pub clusters: Vec<meshfed_policy::diff::ClusterDiff>,
}

impl Changes {
    /// Between what `previous` published and `clusters`.
    pub fn between(previous: &Published, clusters: &BTreeMap<String, ClusterSnapshot>) -> Self {
        let snaps = |m: &BTreeMap<String, ClusterSnapshot>| -> BTreeMap<String, Snapshot> {
            m.iter()
                .map(|(k, v)| (k.clone(), Snapshot::clone(&v.snapshot)))
                .collect()
        };
        let mut report =
            meshfed_policy::diff::diff_clusters(&snaps(&previous.clusters), &snaps(clusters));
        // Kept for the status API with every accepted commit: bounded.
        for c in &mut report.clusters {
            if c.changes.len() > MAX_CHANGES_KEPT {
                let more = c.changes.len() - (MAX_CHANGES_KEPT - 1);
                c.changes.truncate(MAX_CHANGES_KEPT - 1);
                c.changes.push(meshfed_policy::diff::Change {
                    area: meshfed_policy::diff::Area::Mesh,
                    subject: String::new(),
                    kind: "truncated".into(),
                    summary: format!(
                        "… and {more} more change(s): run `meshfed-policy diff {} {}` for all",
                        short_sha(&previous.commit),
                        clusters
                            .values()
                            .next()
                            .map_or("NEW", |c| short_sha(&c.snapshot.version))
                    ),
                    moved_percent: None,
                    reaches: vec![meshfed_policy::diff::Reach::Everything],
                });
            }
        }
        Changes {
            from: previous.commit.clone(),
            clusters: report.clusters,
        }
    }
}

/// The last fetch.
#[derive(Debug, Clone, Serialize)]
pub struct FetchStatus {
    #[serde(serialize_with = "ser_time")]
    pub at: SystemTime,
    pub ok: bool,
    /// The error, redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the pipeline knows. Readers take a snapshot with [`SyncState::get`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct StateView {
    /// The tracked ref's commit at the last successful fetch.
    pub head: Option<String>,
    pub last_good: Option<Accepted>,
    pub last_fetch: Option<FetchStatus>,
    /// Newest first.
    pub rejected: VecDeque<Rejected>,
    /// The newest commit held by the deletion safeguard, while nothing newer
    /// was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
    /// Newest first (the last good one included).
    #[serde(skip)]
    pub accepted: VecDeque<Accepted>,
}

impl StateView {
    pub fn rejection(&self, commit: &str) -> Option<&Rejected> {
        self.rejected.iter().find(|r| r.commit == commit)
    }

    pub fn holding(&self, commit: &str) -> Option<&Held> {
        self.held.as_ref().filter(|h| h.commit == commit)
    }

    pub fn acceptance(&self, commit: &str) -> Option<&Accepted> {
        self.accepted.iter().find(|a| a.commit == commit)
    }
}

/// Shared, locked [`StateView`].
#[derive(Debug, Default)]
pub struct SyncState {
    inner: Mutex<StateView>,
}

impl SyncState {
    pub fn get(&self) -> StateView {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, StateView> {
        // Updates are a few field stores; a panic cannot leave one half done.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// The head is the commit already accepted or already rejected.
    Unchanged(String),
    Accepted(String),
    Rejected(String),
    /// Valid, but held by the deletion safeguard.
    Held(String),
    /// The fetch failed (redacted message); nothing changed.
    FetchFailed(String),
}

/// Why the pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {message}; hint: {hint}")]
    State {
        path: String,
        message: String,
        hint: &'static str,
    },
    #[error(transparent)]
    Git(#[from] GitError),
}

/// Where one commit's pipeline time went, logged with "commit accepted"
/// (`read_ms`, `analyze_ms`, `compile_ms`, `persist_ms`): the benchmark
/// harness and operators read the breakdown from there.
#[derive(Debug, Clone, Copy, Default)]
struct Timings {
    /// Reading the commit's files from the mirror (and the signature).
    read: std::time::Duration,
    /// `meshfed_policy::analyze`: load and validate the whole federation.
    analyze: std::time::Duration,
    /// Compiling and encoding every cluster's snapshot.
    compile: std::time::Duration,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The pipeline. Shared (`Arc`) by the trigger loop and `main`.
#[derive(Debug)]
pub struct Pipeline {
    source: Arc<GitSource>,
    opts: Options,
    /// `--max-deletion-percent`: 100 turns the safeguard off.
    max_deletion_percent: u8,
    /// The last good commit's resources (`Kind namespace/name`), computed
    /// again from the mirror after a restart.
    last_good_resources: Mutex<Option<(String, BTreeSet<String>)>>,
    state_dir: PathBuf,
    /// Serves each accepted commit, at once or in waves.
    waves: Arc<Waves>,
    state: Arc<SyncState>,
    metrics: Arc<Metrics>,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    commit: String,
    accepted_at_unix_ms: u64,
    warnings: usize,
    /// Cluster → canonical snapshot encoding, stored as a string so the
    /// bytes come back exactly.
    clusters: BTreeMap<String, String>,
}

impl Pipeline {
    pub fn new(
        source: Arc<GitSource>,
        opts: Options,
        state_dir: PathBuf,
        publish: watch::Sender<Option<Arc<Published>>>,
        state: Arc<SyncState>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Pipeline {
            source,
            opts,
            max_deletion_percent: DEFAULT_MAX_DELETION_PERCENT,
            last_good_resources: Mutex::new(None),
            state_dir,
            waves: Arc::new(Waves::new(
                publish,
                crate::rollout::Rollout::new(),
                crate::golden::Golden::default(),
                crate::rollout::Admission::default().known_window,
                None,
            )),
            state,
            metrics,
        }
    }

    /// Sets `--max-deletion-percent` (100: no safeguard).
    pub fn with_max_deletion_percent(mut self, percent: u8) -> Self {
        self.max_deletion_percent = percent.min(100);
        self
    }

    /// Delivers through `waves` (which owns the publication `watch`)
    /// instead of the controller made from `new`'s sender.
    pub fn with_waves(mut self, waves: Arc<Waves>) -> Self {
        self.waves = waves;
        self
    }

    pub fn waves(&self) -> &Arc<Waves> {
        &self.waves
    }

    pub fn source(&self) -> &Arc<GitSource> {
        &self.source
    }

    pub fn state(&self) -> &Arc<SyncState> {
        &self.state
    }

    /// Publishes the persisted last good snapshots, if any. A file that
    /// exists but cannot be used is an error (serving nothing silently
    /// would look like an empty mesh); delete it to start fresh.
    pub fn restore(&self) -> Result<Option<String>, PipelineError> {
        let path = self.state_dir.join(LAST_GOOD_FILE);
        let err = |message: String| PipelineError::State {
            path: path.display().to_string(),
            message,
            hint: "the file is the syncer's last good policy; fix or delete it, and the syncer \
                   compiles the remote's head instead",
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(e.to_string())),
        };
        let p: Persisted = serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
        let mut clusters = BTreeMap::new();
        for (name, enc) in &p.clusters {
            let snap = Snapshot::decode(enc.as_bytes())
                .map_err(|e| err(format!("cluster `{name}`: {e}")))?;
            if snap.version != p.commit {
                return Err(err(format!(
                    "cluster `{name}` has version {} but the file says commit {}",
                    snap.version, p.commit
                )));
            }
            clusters.insert(name.clone(), ClusterSnapshot::new(snap));
        }
        let accepted = Accepted {
            commit: p.commit.clone(),
            at: UNIX_EPOCH + std::time::Duration::from_millis(p.accepted_at_unix_ms),
            clusters: clusters.keys().cloned().collect(),
            warnings: p.warnings,
            restored: true,
            changes: None,
        };
        // Mid-rollout, the clusters are served what the rollout state says
        // (some still the previous commit), and the run goes on.
        match self.waves.restore(&p.commit) {
            Ok(true) => {}
            Ok(false) => self.waves.start(&p.commit, clusters, None, Instant::now()),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the rollout state; serving the last good commit to every cluster");
                self.waves.start(&p.commit, clusters, None, Instant::now());
            }
        }
        let mut st = self.state.lock();
        st.last_good = Some(accepted.clone());
        st.accepted.push_front(accepted);
        Ok(Some(p.commit))
    }

    /// Fetches the tracked ref and processes its commit if it is new.
    pub async fn sync(self: &Arc<Self>) -> SyncOutcome {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.sync_blocking()).await {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("the sync task failed: {e}");
                tracing::error!("{msg}");
                SyncOutcome::FetchFailed(msg)
            }
        }
    }

    fn sync_blocking(&self) -> SyncOutcome {
        let started = Instant::now();
        let fetched = self.source.fetch();
        self.metrics
            .fetch_duration
            .observe(started.elapsed().as_secs_f64());
        let fetched = match fetched {
            Ok(f) => f,
            Err(e) => {
                self.metrics.fetch_errors.inc();
                let msg = e.to_string();
                tracing::warn!(error = %msg, "git fetch failed; still serving the last good snapshots");
                let mut st = self.state.lock();
                st.last_fetch = Some(FetchStatus {
                    at: SystemTime::now(),
                    ok: false,
                    error: Some(msg.clone()),
                });
                // A head refused for its size is a rejected commit too, so
                // that `status --wait` on it ends with the reason.
                if let GitError::TooLarge {
                    commit: Some(commit),
                    ..
                } = &e
                    && st.rejection(commit).is_none()
                {
                    drop(st);
                    self.reject(commit, msg.clone(), Vec::new());
                }
                return SyncOutcome::FetchFailed(msg);
            }
        };
        let commit = fetched.commit;
        {
            let mut st = self.state.lock();
            st.head = Some(commit.clone());
            st.last_fetch = Some(FetchStatus {
                at: SystemTime::now(),
                ok: true,
                error: None,
            });
            let good = st.last_good.as_ref().is_some_and(|g| g.commit == commit);
            if good || st.rejection(&commit).is_some() || st.holding(&commit).is_some() {
                tracing::debug!(%commit, elapsed_ms = fetched.elapsed.as_millis() as u64, "head unchanged");
                return SyncOutcome::Unchanged(commit);
            }
        }
        tracing::info!(%commit, fetch_ms = ms(fetched.elapsed), "new head");
        self.process(&commit, started)
    }

    /// Reads, checks and compiles `commit`; publishes it or records why not.
    pub fn process(&self, commit: &str, started: Instant) -> SyncOutcome {
        let mut timings = Timings::default();
        match self.compile(commit, &mut timings) {
            Ok((clusters, warnings, resources, plan)) => {
                if let Some(held) = self.deletion_check(commit, &resources) {
                    self.hold(held);
                    return SyncOutcome::Held(commit.to_string());
                }
                self.accept(commit, clusters, plan, warnings, started, timings);
                *self
                    .last_good_resources
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some((commit.to_string(), resources));
                SyncOutcome::Accepted(commit.to_string())
            }
            Err((reason, diagnostics)) => {
                self.reject(commit, reason, diagnostics);
                SyncOutcome::Rejected(commit.to_string())
            }
        }
    }

    /// The deletion safeguard: `Some` when `commit` removes more than
    /// `--max-deletion-percent` of the last good commit's resources and
    /// does not carry the override trailer.
    fn deletion_check(&self, commit: &str, resources: &BTreeSet<String>) -> Option<Held> {
        if self.max_deletion_percent >= 100 {
            return None;
        }
        let good = self.state.lock().last_good.as_ref()?.commit.clone();
        let before = self.resources_of(&good)?;
        if before.is_empty() {
            return None;
        }
        let removed: Vec<&String> = before.difference(resources).collect();
        // Compared in integers: removed / before > percent / 100.
        if removed.len() * 100 <= before.len() * usize::from(self.max_deletion_percent) {
            return None;
        }
        let message = self.source.message(commit).unwrap_or_default();
        if has_allow_deletion_trailer(&message) {
            tracing::warn!(
                %commit, removed = removed.len(), of = before.len(),
                "commit deletes more than --max-deletion-percent, allowed by its {ALLOW_DELETION_TRAILER} trailer"
            );
            return None;
        }
        let percent = removed.len() * 100 / before.len();
        Some(Held {
            commit: commit.to_string(),
            at: SystemTime::now(),
            state: "held",
            reason: format!(
                "held: it deletes {} of the {} resources of the last good commit {} ({percent}%, \
                 over --max-deletion-percent {}%); the last good snapshots stay in force. To \
                 apply it, push a commit that contains it with the trailer \
                 `{ALLOW_DELETION_TRAILER}: true` in its message (e.g. `git commit --allow-empty \
                 -m 'apply deletions' -m '{ALLOW_DELETION_TRAILER}: true'`), or restart the \
                 syncer with a higher --max-deletion-percent",
                removed.len(),
                before.len(),
                &good[..good.len().min(12)],
                self.max_deletion_percent
            ),
            last_good_resources: before.len(),
            removed: removed.len(),
            removed_sample: removed.into_iter().take(20).cloned().collect(),
        })
    }

    /// The resources of an accepted commit, from memory or read again from
    /// the mirror (after a restart). `None` when they cannot be known.
    fn resources_of(&self, commit: &str) -> Option<BTreeSet<String>> {
        let mut cached = self
            .last_good_resources
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((c, r)) = cached.as_ref()
            && c == commit
        {
            return Some(r.clone());
        }
        let tree = match self.source.read_tree(commit) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(%commit, error = %e, "cannot read the last good commit; the deletion safeguard is skipped for this commit");
                return None;
            }
        };
        let analysis = meshfed_policy::analyze(tree.files, &self.opts);
        let r: BTreeSet<String> = analysis
            .resources
            .iter()
            .map(|r| r.display_name())
            .collect();
        *cached = Some((commit.to_string(), r.clone()));
        Some(r)
    }

    fn hold(&self, held: Held) {
        self.metrics.commit("held");
        tracing::warn!(commit = %held.commit, reason = %held.reason, "commit held by the deletion safeguard");
        self.state.lock().held = Some(held);
    }

    #[allow(clippy::type_complexity)]
    fn compile(
        &self,
        commit: &str,
        timings: &mut Timings,
    ) -> Result<
        (
            BTreeMap<String, ClusterSnapshot>,
            Vec<Diagnostic>,
            BTreeSet<String>,
            Option<meshfed_policy::rollout::RolloutPlan>,
        ),
        (String, Vec<Diagnostic>),
    > {
        let t = Instant::now();
        match self.source.verify_signature(commit) {
            Ok(Some(signer)) => tracing::info!(%commit, %signer, "commit signature verified"),
            Ok(None) => {}
            Err(problem) => return Err((problem.to_string(), Vec::new())),
        }
        let tree: TreeFiles = self
            .source
            .read_tree(commit)
            .map_err(|e| (e.to_string(), Vec::new()))?;
        let cfg = self.source.config();
        if tree.missing_path {
            let p = cfg.path.as_deref().unwrap_or(Path::new("")).display();
            return Err((
                format!("--path `{p}` is not a directory at this commit"),
                Vec::new(),
            ));
        }
        let at = cfg
            .path
            .as_deref()
            .map_or(".".to_string(), |p| p.display().to_string());
        let extra = tree.diagnostics(&at);
        timings.read = t.elapsed();
        let t = Instant::now();
        let mut analysis = meshfed_policy::analyze(tree.files, &self.opts);
        timings.analyze = t.elapsed();
        analysis.diagnostics.extend(extra);
        analysis.diagnostics.sort();
        if !analysis.is_valid() {
            let reason = format!("{} error(s) in the policy", analysis.error_count());
            return Err((reason, analysis.diagnostics));
        }
        let names = analysis.clusters();
        if names.is_empty() {
            return Err((
                "the policy declares no `Cluster` (meshfed.io/v1alpha1), so there is nothing to \
                 deliver to; declare each cluster whose gateways subscribe"
                    .into(),
                analysis.diagnostics,
            ));
        }
        let t = Instant::now();
        let mut clusters = BTreeMap::new();
        for name in names {
            match analysis.compile(&name, commit, &self.opts) {
                Ok(s) => {
                    clusters.insert(name, ClusterSnapshot::new(s));
                }
                Err(e) => {
                    return Err((
                        format!("compiling cluster `{name}`: {e}"),
                        analysis.diagnostics,
                    ));
                }
            }
        }
        timings.compile = t.elapsed();
        let resources = analysis
            .resources
            .iter()
            .map(|r| r.display_name())
            .collect();
        let plan = analysis.rollout();
        Ok((clusters, analysis.diagnostics, resources, plan))
    }

    fn accept(
        &self,
        commit: &str,
        clusters: BTreeMap<String, ClusterSnapshot>,
        plan: Option<meshfed_policy::rollout::RolloutPlan>,
        warnings: Vec<Diagnostic>,
        started: Instant,
        timings: Timings,
    ) {
        for w in &warnings {
            tracing::info!(%commit, "{w}");
        }
        // Persist before publishing: a gateway must never have applied a
        // commit that a restarted syncer would not serve.
        let now = SystemTime::now();
        let t = Instant::now();
        if let Err(e) = self.persist(commit, &clusters, warnings.len(), now) {
            tracing::error!(%commit, error = %e, "cannot persist the accepted snapshots; a restart would serve the previous ones");
        }
        let persist = t.elapsed();
        let names: BTreeSet<String> = clusters.keys().cloned().collect();
        let t = Instant::now();
        let previous = self.waves.current();
        let changes = previous
            .filter(|p| p.commit != commit)
            .map(|p| Changes::between(&p, &clusters));
        let diff_time = t.elapsed();
        self.waves.start(commit, clusters, plan, started);
        let elapsed = started.elapsed();
        self.metrics.commit("accepted");
        self.metrics
            .pipeline_duration
            .observe(elapsed.as_secs_f64());
        self.metrics.last_accepted.set(
            now.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
        tracing::info!(
            %commit,
            clusters = %names.iter().cloned().collect::<Vec<_>>().join(","),
            warnings = warnings.len(),
            elapsed_ms = ms(elapsed),
            read_ms = ms(timings.read),
            analyze_ms = ms(timings.analyze),
            compile_ms = ms(timings.compile),
            persist_ms = ms(persist),
            diff_ms = ms(diff_time),
            "commit accepted and published"
        );
        let acc = Accepted {
            commit: commit.to_string(),
            at: now,
            clusters: names,
            warnings: warnings.len(),
            restored: false,
            changes,
        };
        let mut st = self.state.lock();
        st.last_good = Some(acc.clone());
        st.held = None;
        st.accepted.retain(|a| a.commit != commit);
        st.accepted.push_front(acc);
        st.accepted.truncate(ACCEPTED_KEPT);
    }

    fn reject(&self, commit: &str, reason: String, diagnostics: Vec<Diagnostic>) {
        self.metrics.commit("rejected");
        let errors: Vec<String> = diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(|d| d.to_string())
            .collect();
        tracing::warn!(
            %commit,
            %reason,
            diagnostics = %errors.join("\n"),
            "commit rejected; the last good snapshots stay in force"
        );
        let mut st = self.state.lock();
        st.rejected.retain(|r| r.commit != commit);
        st.rejected.push_front(Rejected {
            commit: commit.to_string(),
            at: SystemTime::now(),
            reason,
            diagnostics,
        });
        st.rejected.truncate(REJECTED_KEPT);
    }

    fn persist(
        &self,
        commit: &str,
        clusters: &BTreeMap<String, ClusterSnapshot>,
        warnings: usize,
        at: SystemTime,
    ) -> std::io::Result<()> {
        let mut encoded = BTreeMap::new();
        for (name, c) in clusters {
            let text = std::str::from_utf8(&c.encoded)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            encoded.insert(name.clone(), text.to_string());
        }
        let p = Persisted {
            commit: commit.to_string(),
            accepted_at_unix_ms: at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            warnings,
            clusters: encoded,
        };
        let bytes = serde_json::to_vec(&p).map_err(std::io::Error::other)?;
        meshfed_cli::fs::write_atomic(&self.state_dir.join(LAST_GOOD_FILE), &bytes)?;
        Ok(())
    }
}

/// Whether a commit message ends with the `Meshfed-Allow-Deletion: true`
/// trailer (in its last paragraph, as `git interpret-trailers` reads them;
/// key case-insensitive, value `true` or `yes`).
pub fn has_allow_deletion_trailer(message: &str) -> bool {
    let last = message.trim_end().rsplit("\n\n").next().unwrap_or_default();
    last.lines().any(|line| {
        line.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case(ALLOW_DELETION_TRAILER)
                && matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "yes")
        })
    })
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

/// `2025-01-02T03:04:05.678Z` (UTC, milliseconds): one copy, shared.
pub use meshfed_cli::time::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_deletion_trailer_is_read_from_the_last_paragraph_only() {
        assert!(has_allow_deletion_trailer(
            "remove the old exports\n\nbody\n\nMeshfed-Allow-Deletion: true\n"
        ));
        assert!(has_allow_deletion_trailer(
            "x\n\nSigned-off-by: a <a@b>\nmeshfed-allow-deletion: yes"
        ));
        assert!(!has_allow_deletion_trailer(
            "Meshfed-Allow-Deletion: true\n\nthe trailer is not in the last paragraph"
        ));
        assert!(!has_allow_deletion_trailer(
            "x\n\nMeshfed-Allow-Deletion: false"
        ));
        assert!(!has_allow_deletion_trailer(""));
    }
}
