//! Rollout waves: which commit each cluster is served, and the run of one
//! commit through the waves of its `RolloutPolicy`.
//!
//! The pipeline hands every accepted commit to [`Waves::start`]. Without a
//! plan, every cluster is served the commit at once (as before waves
//! existed). With one, only wave 1's clusters are; the others keep what
//! they were served. [`Waves::tick`] (every 200 ms, [`Waves::drive`]) then
//! moves the run on:
//!
//! 1. the wave is *open*: its clusters are served the commit; it waits
//!    until every known gateway of those clusters ACKed it (a NACK halts
//!    the run: later waves are not opened);
//! 2. it *bakes* for the wave's bake time while the gates
//!    ([`gate::judge`]) compare the golden metrics of its clusters'
//!    gateways ([`crate::golden`]) since the bake began against those
//!    before the wave opened, for the destination services the commit
//!    changes in each of those clusters (what the diff from the snapshot
//!    a cluster was served before to the commit's reaches,
//!    [`meshfed_policy::diff::reach`]);
//! 3. a failed gate sends the wave's clusters back at once to what they
//!    were served before the wave (the last good snapshot per cluster),
//!    and marks the run *rolled back* with the gate's reason; later waves
//!    are never touched, and the commit is never rolled forward again by
//!    itself. A passed bake opens the next wave; after the last, the run
//!    is *complete*, and the commit is live once every gateway applied it.
//!
//! A new commit starts over at wave 1 (the run of the previous one, if
//! still going, is *superseded*, and its clusters keep what they were
//! served). An operator may [`Waves::resume`] a halted or rolled-back run
//! (the failed gate is overridden, the wave opens again) or skip the
//! current wave's gates, or [`Waves::abort`] a run (every opened wave goes
//! back).
//!
//! The served snapshots and the run are written to
//! `<state-dir>/rollout-state.json` at every step (atomically), so a
//! restarted syncer serves the same thing and resumes the run at its wave
//! (a wave that was baking bakes again from the restart: the golden
//! metrics are not persisted).
//!
//! It owns the `watch` of [`Published`] that the config server streams
//! from; it does not compile (the pipeline) or deliver (the server).

pub mod gate;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshfed_policy::Snapshot;
use meshfed_policy::diff::Reached;
use meshfed_policy::rollout::RolloutPlan;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::golden::{Golden, Window};
use crate::rollout::{ClusterSnapshot, Published, Rollout};
use gate::{Failure, Verdict};

/// The file holding the served snapshots and the run.
pub const STATE_FILE: &str = "rollout-state.json";
/// The shortest window before a wave its gates compare with.
pub const MIN_BASELINE: Duration = Duration::from_secs(60);
/// How often the gates judge a bake (and at its end).
const JUDGE_EVERY: Duration = Duration::from_millis(500);
/// How many finished runs are remembered for the status API.
const HISTORY: usize = 20;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// A wave is open (waiting for ACKs, or baking).
    Progressing,
    /// Every wave passed; the commit is served to every cluster.
    Complete,
    /// A gate failed (or an operator aborted): the opened waves' clusters
    /// went back to what they were served before.
    RolledBack,
    /// A gateway of the open wave NACKed the commit: later waves stay
    /// closed.
    Halted,
    /// A newer commit started its own run.
    Superseded,
}

impl RunState {
    /// The state as the API names it (`rolled-back`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Progressing => "progressing",
            RunState::Complete => "complete",
            RunState::RolledBack => "rolled-back",
            RunState::Halted => "halted",
            RunState::Superseded => "superseded",
        }
    }
}

/// A run, as the status API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub commit: String,
    pub state: RunState,
    /// The open (or last opened) wave, 1-based, and how many there are.
    pub wave: usize,
    pub waves: usize,
    /// The clusters of every wave, in order.
    pub plan: Vec<Vec<String>>,
    /// The open wave's bake time in milliseconds, and when its bake began
    /// (every known gateway of its clusters ACKed); absent while waiting.
    pub bake_ms: u64,
    #[serde(default)]
    pub baking_since: Option<String>,
    /// Why it rolled back or halted, in one line.
    #[serde(default)]
    pub reason: Option<String>,
    /// The failed gate.
    #[serde(default)]
    pub failure: Option<Failure>,
    /// One line per wave that passed ("wave 1 (edge): judged ratings...").
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone)]
struct Run {
    commit: String,
    plan: RolloutPlan,
    target: BTreeMap<String, ClusterSnapshot>,
    /// Index of the open (or last opened) wave.
    wave: usize,
    opened_at: SystemTime,
    bake_from: Option<SystemTime>,
    /// What each cluster of an opened wave was served before its wave.
    before: BTreeMap<String, Option<ClusterSnapshot>>,
    state: RunState,
    reason: Option<String>,
    failure: Option<Failure>,
    notes: Vec<String>,
    /// The operator overrode the open wave's gates.
    overridden: bool,
    /// The open wave's golden metrics before it opened (they no longer
    /// change), and when its gates last judged: reports arrive about once
    /// a second, so judging more often only costs. Not persisted.
    baseline: Option<Window>,
    judged_at: Option<Instant>,
    /// Per cluster of the open wave, the destination services the commit
    /// changes there: the only ones its gates judge. Computed once per
    /// wave from `before` and `target` (so not persisted).
    reached: Option<BTreeMap<String, Reached>>,
}

impl Run {
    fn view(&self) -> RunView {
        RunView {
            commit: self.commit.clone(),
            state: self.state,
            wave: self.wave + 1,
            waves: self.plan.waves.len(),
            plan: self.plan.waves.iter().map(|w| w.clusters.clone()).collect(),
            bake_ms: self
                .plan
                .waves
                .get(self.wave)
                .map_or(0, |w| u64::try_from(w.bake.as_millis()).unwrap_or(u64::MAX)),
            baking_since: self.bake_from.map(meshfed_cli::time::rfc3339),
            reason: self.reason.clone(),
            failure: self.failure.clone(),
            notes: self.notes.clone(),
        }
    }

    fn wave_name(&self) -> String {
        format!(
            "wave {} of {} ({})",
            self.wave + 1,
            self.plan.waves.len(),
            self.plan
                .waves
                .get(self.wave)
                .map(|w| w.clusters.join(", "))
                .unwrap_or_default()
        )
    }
}

#[derive(Debug, Default)]
struct Inner {
    served: BTreeMap<String, ClusterSnapshot>,
    /// The commit of the current publication (the run's, or the last one
    /// served at once).
    commit: Option<String>,
    fetched_at: Option<Instant>,
    run: Option<Run>,
    history: VecDeque<RunView>,
}

/// Why an operator's request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OverrideError {
    #[error(
        "no rollout of commit {0} is known to this syncer (only the newest commit's run can be resumed or aborted)"
    )]
    Unknown(String),
    #[error("the rollout of {commit} is {state}; {hint}")]
    Refused {
        commit: String,
        state: String,
        hint: &'static str,
    },
}

/// The wave controller. Shared (`Arc`) by the pipeline, the driver task
/// and the status API.
#[derive(Debug)]
pub struct Waves {
    inner: Mutex<Inner>,
    publish: watch::Sender<Option<Arc<Published>>>,
    rollout: Rollout,
    golden: Golden,
    known_window: Duration,
    path: Option<PathBuf>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    commit: Option<String>,
    served: BTreeMap<String, String>,
    run: Option<SavedRun>,
    #[serde(default)]
    history: Vec<RunView>,
}

#[derive(Serialize, Deserialize)]
struct SavedRun {
    commit: String,
    plan: RolloutPlan,
    target: BTreeMap<String, String>,
    wave: usize,
    opened_at_ms: u64,
    before: BTreeMap<String, Option<String>>,
    state: RunState,
    reason: Option<String>,
    failure: Option<Failure>,
    notes: Vec<String>,
    overridden: bool,
}

fn enc(c: &ClusterSnapshot) -> String {
    String::from_utf8_lossy(&c.encoded).into_owned()
}

fn dec(name: &str, s: &str) -> Result<ClusterSnapshot, String> {
    Snapshot::decode(s.as_bytes())
        .map(ClusterSnapshot::new)
        .map_err(|e| format!("cluster `{name}`: {e}"))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Waves {
    /// A controller publishing into `publish`, reading gateway records from
    /// `rollout` and golden metrics from `golden`; without `state_dir`,
    /// nothing survives a restart.
    pub fn new(
        publish: watch::Sender<Option<Arc<Published>>>,
        rollout: Rollout,
        golden: Golden,
        known_window: Duration,
        state_dir: Option<PathBuf>,
    ) -> Self {
        Waves {
            inner: Mutex::new(Inner::default()),
            publish,
            rollout,
            golden,
            known_window,
            path: state_dir.map(|d| d.join(STATE_FILE)),
            metrics: None,
        }
    }

    /// Counts ended waves in `meshfed_syncer_rollout_waves_total`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, result: &'static str) {
        if let Some(m) = &self.metrics {
            m.wave(result);
        }
    }

    /// The current publication.
    pub fn current(&self) -> Option<Arc<Published>> {
        self.publish.borrow().clone()
    }

    /// A receiver of the publications (the config server's).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.publish.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restores the served snapshots and the run from the state file, if
    /// there is one for `last_good` (the pipeline's last accepted commit),
    /// and publishes them. Returns false (nothing restored) without a file,
    /// or when it belongs to another commit; an unreadable file is an
    /// error the caller logs (the pipeline then serves `last_good`
    /// everywhere).
    pub fn restore(&self, last_good: &str) -> Result<bool, String> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let saved: Saved =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        if saved.commit.as_deref() != Some(last_good) {
            return Ok(false);
        }
        let err = |e: String| format!("{}: {e}", path.display());
        let mut served = BTreeMap::new();
        for (name, s) in &saved.served {
            served.insert(name.clone(), dec(name, s).map_err(err)?);
        }
        let run = match saved.run {
            None => None,
            Some(r) => {
                let mut target = BTreeMap::new();
                for (name, s) in &r.target {
                    target.insert(name.clone(), dec(name, s).map_err(err)?);
                }
                let mut before = BTreeMap::new();
                for (name, s) in &r.before {
                    let snap = match s {
                        Some(s) => Some(dec(name, s).map_err(err)?),
                        None => None,
                    };
                    before.insert(name.clone(), snap);
                }
                Some(Run {
                    commit: r.commit,
                    plan: r.plan,
                    target,
                    wave: r.wave,
                    opened_at: UNIX_EPOCH + Duration::from_millis(r.opened_at_ms),
                    // A wave that was baking bakes again: the metrics of
                    // its bake so far are gone with the old process.
                    bake_from: None,
                    before,
                    state: r.state,
                    reason: r.reason,
                    failure: r.failure,
                    notes: r.notes,
                    overridden: r.overridden,
                    baseline: None,
                    judged_at: None,
                    reached: None,
                })
            }
        };
        if let Some(r) = &run {
            tracing::info!(commit = %r.commit, state = ?r.state, wave = %r.wave_name(), "rollout restored from the state directory");
        }
        let mut inner = self.lock();
        inner.served = served;
        inner.commit = saved.commit;
        inner.fetched_at = Some(Instant::now());
        inner.run = run;
        inner.history = saved.history.into_iter().take(HISTORY).collect();
        self.publish_locked(&inner);
        Ok(true)
    }

    /// Delivers an accepted commit: to every cluster at once without a
    /// plan, else to wave 1's clusters.
    pub fn start(
        &self,
        commit: &str,
        clusters: BTreeMap<String, ClusterSnapshot>,
        plan: Option<RolloutPlan>,
        fetched_at: Instant,
    ) {
        let mut inner = self.lock();
        if let Some(mut old) = inner.run.take() {
            if old.state == RunState::Progressing {
                old.state = RunState::Superseded;
                old.reason = Some(format!(
                    "superseded by {} at {}",
                    short(commit),
                    old.wave_name()
                ));
                tracing::info!(commit = %old.commit, by = %commit, "rollout superseded by a newer commit");
            }
            let v = old.view();
            inner.history.retain(|h| h.commit != v.commit);
            inner.history.push_front(v);
            inner.history.truncate(HISTORY);
        }
        inner.commit = Some(commit.to_string());
        inner.fetched_at = Some(fetched_at);
        match plan.filter(|p| !p.waves.is_empty()) {
            None => {
                inner.served = clusters;
            }
            Some(plan) => {
                let mut run = Run {
                    commit: commit.to_string(),
                    plan,
                    target: clusters,
                    wave: 0,
                    opened_at: SystemTime::now(),
                    bake_from: None,
                    before: BTreeMap::new(),
                    state: RunState::Progressing,
                    reason: None,
                    failure: None,
                    notes: Vec::new(),
                    overridden: false,
                    baseline: None,
                    judged_at: None,
                    reached: None,
                };
                open_wave(&mut inner.served, &mut run, 0);
                tracing::info!(%commit, wave = %run.wave_name(), "rollout started");
                inner.run = Some(run);
            }
        }
        self.publish_locked(&inner);
        self.save_locked(&inner);
    }

    /// Moves the run on (see the module docs); called every 200 ms.
    pub fn tick(&self) {
        let now = SystemTime::now();
        let mut inner = self.lock();
        let Some(mut run) = inner.run.take() else {
            return;
        };
        let (wave, state) = (run.wave, run.state);
        let changed = self.step(&mut inner.served, &mut run, now);
        if run.wave != wave || run.state != state {
            // What is sent now (a wave's opening, a rollback) propagates
            // from now: `meshfed_syncer_propagation_seconds` must not
            // count the bakes before it.
            inner.fetched_at = Some(Instant::now());
        }
        inner.run = Some(run);
        if changed {
            self.publish_locked(&inner);
            self.save_locked(&inner);
        }
    }

    /// One step of a progressing run; true when something changed.
    fn step(
        &self,
        served: &mut BTreeMap<String, ClusterSnapshot>,
        run: &mut Run,
        now: SystemTime,
    ) -> bool {
        if run.state != RunState::Progressing {
            return false;
        }
        let Some(wave) = run.plan.waves.get(run.wave).cloned() else {
            run.state = RunState::Complete;
            return true;
        };
        let gateways: Vec<_> = self
            .rollout
            .gateways()
            .into_iter()
            .filter(|g| wave.clusters.contains(&g.cluster))
            .filter(|g| g.is_known(self.known_window, now))
            .collect();
        if let Some(g) = gateways.iter().find(|g| {
            g.applied.as_deref() != Some(run.commit.as_str())
                && g.nack.as_ref().is_some_and(|(v, _)| *v == run.commit)
        }) {
            let reason = format!(
                "halted at {}: {}/{} NACKed the commit: {}",
                run.wave_name(),
                g.cluster,
                g.gateway_id,
                g.nack.as_ref().map(|(_, r)| r.as_str()).unwrap_or_default()
            );
            tracing::warn!(commit = %run.commit, %reason, "rollout halted");
            self.count("halted");
            run.state = RunState::Halted;
            run.reason = Some(reason);
            return true;
        }
        let Some(from) = run.bake_from else {
            let all_applied = gateways
                .iter()
                .all(|g| g.connected && g.applied.as_deref() == Some(run.commit.as_str()));
            if !all_applied {
                return false;
            }
            run.bake_from = Some(now);
            tracing::info!(commit = %run.commit, wave = %run.wave_name(), bake = ?wave.bake, "every gateway of the wave applied the commit; baking");
            return true;
        };
        let bake_over = now.duration_since(from).is_ok_and(|d| d >= wave.bake);
        let verdict = if run.overridden {
            if bake_over {
                Verdict::Pass("gates overridden by an operator (rollout resume)".into())
            } else {
                Verdict::Wait
            }
        } else if wave.bake.is_zero() {
            Verdict::Pass("no bake time: not judged".into())
        } else if !bake_over && run.judged_at.is_some_and(|t| t.elapsed() < JUDGE_EVERY) {
            Verdict::Wait
        } else {
            run.judged_at = Some(Instant::now());
            let opened_at = run.opened_at;
            let reached = &*run
                .reached
                .get_or_insert_with(|| reach(&run.before, &run.target, &wave.clusters));
            let judged = |cluster: &str, service: &str| {
                reached.get(cluster).is_some_and(|r| r.contains(service))
            };
            let before = run.baseline.get_or_insert_with(|| {
                self.golden.window(
                    &wave.clusters,
                    opened_at
                        .checked_sub(wave.bake.max(MIN_BASELINE))
                        .unwrap_or(UNIX_EPOCH),
                    opened_at,
                    judged,
                )
            });
            let during = self.golden.window(&wave.clusters, from, now, judged);
            match gate::judge(before, &during, &run.plan.gates, bake_over) {
                Verdict::Pass(_) if reached.values().all(Reached::is_empty) => Verdict::Pass(
                    "no traffic to judge (the commit changes no destination service there)".into(),
                ),
                v => v,
            }
        };
        match verdict {
            Verdict::Wait => false,
            Verdict::Fail(f) => {
                let reason = format!("rolled back at {}: {f}", run.wave_name());
                tracing::error!(commit = %run.commit, %reason, "a rollout gate failed; the wave's clusters go back to their last good snapshots");
                roll_back(served, run, &wave.clusters);
                self.count("rolled_back");
                run.state = RunState::RolledBack;
                run.reason = Some(reason);
                run.failure = Some(f);
                true
            }
            Verdict::Pass(note) => {
                let line = format!("{}: passed: {note}", run.wave_name());
                tracing::info!(commit = %run.commit, "{line}");
                self.count("passed");
                run.notes.push(line);
                let next = run.wave + 1;
                if next >= run.plan.waves.len() {
                    run.state = RunState::Complete;
                    // Clusters the commit no longer declares stop being
                    // served now that it reached every cluster.
                    served.retain(|c, _| run.target.contains_key(c));
                    tracing::info!(commit = %run.commit, "rollout complete: every wave passed");
                } else {
                    open_wave(served, run, next);
                    tracing::info!(commit = %run.commit, wave = %run.wave_name(), "next wave opened");
                }
                true
            }
        }
    }

    /// Resumes a halted or rolled-back run (its wave opens again, its
    /// gates overridden), or skips the gates of a progressing run's wave.
    pub fn resume(&self, commit: &str) -> Result<String, OverrideError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(run) = inner.run.as_mut().filter(|r| r.commit.starts_with(commit)) else {
            return Err(OverrideError::Unknown(commit.to_string()));
        };
        let what = match run.state {
            RunState::Complete | RunState::Superseded => {
                return Err(OverrideError::Refused {
                    commit: run.commit.clone(),
                    state: run.state.as_str().to_string(),
                    hint: "there is nothing left to resume",
                });
            }
            RunState::Progressing => {
                run.overridden = true;
                format!(
                    "{}: gates overridden; the next wave opens after its bake",
                    run.wave_name()
                )
            }
            RunState::RolledBack | RunState::Halted => {
                let wave = run.wave;
                run.state = RunState::Progressing;
                run.reason = None;
                run.failure = None;
                open_wave(&mut inner.served, run, wave);
                run.overridden = true;
                format!("{} opened again with its gates overridden", run.wave_name())
            }
        };
        tracing::warn!(commit = %run.commit, "rollout resumed by an operator: {what}");
        inner.fetched_at = Some(Instant::now());
        let line = format!("resumed by an operator: {what}");
        run.notes.push(line.clone());
        self.publish_locked(inner);
        self.save_locked(inner);
        Ok(line)
    }

    /// Aborts a progressing or halted run: every opened wave's clusters go
    /// back to what they were served before it.
    pub fn abort(&self, commit: &str) -> Result<String, OverrideError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(run) = inner.run.as_mut().filter(|r| r.commit.starts_with(commit)) else {
            return Err(OverrideError::Unknown(commit.to_string()));
        };
        if !matches!(run.state, RunState::Progressing | RunState::Halted) {
            return Err(OverrideError::Refused {
                commit: run.commit.clone(),
                state: run.state.as_str().to_string(),
                hint: "only a progressing or halted rollout can be aborted; to undo a \
                       complete one, push a revert",
            });
        }
        let opened: Vec<String> = run.before.keys().cloned().collect();
        roll_back(&mut inner.served, run, &opened);
        self.count("aborted");
        run.state = RunState::RolledBack;
        let reason = format!(
            "aborted by an operator at {}; {} went back to their last good snapshots",
            run.wave_name(),
            opened.join(", ")
        );
        tracing::warn!(commit = %run.commit, "{reason}");
        run.reason = Some(reason.clone());
        inner.fetched_at = Some(Instant::now());
        self.publish_locked(inner);
        self.save_locked(inner);
        Ok(reason)
    }

    /// The run of `commit` (the current one, or a remembered one).
    pub fn run_view(&self, commit: &str) -> Option<RunView> {
        let inner = self.lock();
        inner
            .run
            .as_ref()
            .filter(|r| r.commit == commit)
            .map(Run::view)
            .or_else(|| inner.history.iter().find(|h| h.commit == commit).cloned())
    }

    /// The current run.
    pub fn current_run(&self) -> Option<RunView> {
        self.lock().run.as_ref().map(Run::view)
    }

    /// Ticks every 200 ms until `stop`.
    pub async fn drive(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(Duration::from_millis(200));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.tick(),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    fn publish_locked(&self, inner: &Inner) {
        let Some(commit) = &inner.commit else { return };
        self.publish.send_replace(Some(Arc::new(Published {
            commit: commit.clone(),
            fetched_at: inner.fetched_at.unwrap_or_else(Instant::now),
            clusters: inner.served.clone(),
        })));
    }

    fn save_locked(&self, inner: &Inner) {
        let Some(path) = &self.path else { return };
        let saved = Saved {
            commit: inner.commit.clone(),
            served: inner
                .served
                .iter()
                .map(|(k, v)| (k.clone(), enc(v)))
                .collect(),
            run: inner.run.as_ref().map(|r| SavedRun {
                commit: r.commit.clone(),
                plan: r.plan.clone(),
                target: r.target.iter().map(|(k, v)| (k.clone(), enc(v))).collect(),
                wave: r.wave,
                opened_at_ms: unix_ms(r.opened_at),
                before: r
                    .before
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_ref().map(enc)))
                    .collect(),
                state: r.state,
                reason: r.reason.clone(),
                failure: r.failure.clone(),
                notes: r.notes.clone(),
                overridden: r.overridden,
            }),
            history: inner.history.iter().cloned().collect(),
        };
        let written = match serde_json::to_vec(&saved) {
            Ok(b) => meshfed_cli::fs::write_atomic(path, &b).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "cannot save the rollout state; a restarted syncer would serve the last good commit to every cluster");
        }
    }
}

/// Opens wave `index`: its clusters are served the run's commit, and what
/// they were served before is kept for a rollback.
fn open_wave(served: &mut BTreeMap<String, ClusterSnapshot>, run: &mut Run, index: usize) {
    run.wave = index;
    run.opened_at = SystemTime::now();
    run.bake_from = None;
    run.overridden = false;
    run.baseline = None;
    run.judged_at = None;
    run.reached = None;
    let Some(wave) = run.plan.waves.get(index) else {
        return;
    };
    for c in &wave.clusters {
        let Some(snap) = run.target.get(c) else {
            continue;
        };
        // Reopened after a rollback: keep the first "before".
        let prev = served.get(c).cloned();
        run.before
            .entry(c.clone())
            .or_insert_with(|| prev.filter(|p| p.snapshot.version != run.commit));
        served.insert(c.clone(), snap.clone());
    }
}

/// Per cluster of `clusters`, the destination services the commit changes
/// there: what the diff from what the cluster was served before the run
/// to the run's snapshot reaches. A cluster served nothing before (new to
/// the federation) is reached everywhere.
fn reach(
    before: &BTreeMap<String, Option<ClusterSnapshot>>,
    target: &BTreeMap<String, ClusterSnapshot>,
    clusters: &[String],
) -> BTreeMap<String, Reached> {
    clusters
        .iter()
        .filter_map(|c| {
            let new = &target.get(c)?.snapshot.policy;
            let reached = match before.get(c) {
                Some(Some(old)) => meshfed_policy::diff::reach(&old.snapshot.policy, new),
                _ => Reached {
                    everything: true,
                    domain: new.domain.clone(),
                    ..Reached::default()
                },
            };
            Some((c.clone(), reached))
        })
        .collect()
}

/// Sends `clusters` back to what they were served before the run opened
/// their wave.
fn roll_back(served: &mut BTreeMap<String, ClusterSnapshot>, run: &Run, clusters: &[String]) {
    for c in clusters {
        match run.before.get(c) {
            Some(Some(prev)) => {
                served.insert(c.clone(), prev.clone());
            }
            Some(None) => {
                served.remove(c);
            }
            None => {}
        }
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

#[cfg(test)]
mod tests;
