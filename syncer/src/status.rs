//! Rollout status: the per-commit view (which known gateways of the
//! clusters a commit targets applied it, NACKed it, or are pending), the
//! HTTP listener (webhook, `/status`, `/rollout/SHA`, `/metrics`,
//! `/healthz`), and the client behind `meshfed-syncer status`.
//!
//! "Applied" means the gateway ACKed the commit or a later commit that
//! contains it (coalescing may skip a commit), decided by Git ancestry in
//! the mirror. A gateway is *known* if it is connected or was seen within
//! the known window; a known but disconnected gateway is pending. A
//! gateway that said goodbye (it drained) is not known: it is listed as
//! *left* for the known window, and counts for nothing.
//!
//! The listener binds to localhost by default. With a bearer token
//! (`--http-token-file`) every route but the webhook and `/healthz` needs
//! `Authorization: Bearer <token>`; the binary refuses to bind elsewhere
//! than loopback without one. The webhook needs its signature
//! ([`crate::trigger::verify`]).
//!
//! It does not own the webhook's logic ([`crate::trigger`]) or the gRPC
//! stream the ACKs arrive on ([`crate::server`]); it reads the
//! [`Rollout`] the server writes.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::git::{GitSource, Secret};
use crate::metrics::Metrics;
use crate::pipeline::{Changes, StateView, SyncState, rfc3339};
use crate::rollout::{GatewayRecord, Published, Rollout};
use crate::trigger::{self, Trigger};
use crate::waves::{OverrideError, RunState, RunView, Waves};

/// The TCP port of the HTTP listener (webhook, status, metrics) by default,
/// as istiod serves its HTTP monitoring endpoints on 15014.
pub const DEFAULT_HTTP_PORT: u16 = 15014;

/// How long a disconnected gateway stays known by default.
pub const DEFAULT_KNOWN_WINDOW: Duration = Duration::from_secs(600);

/// The largest webhook body read (GitHub caps payloads at 25 MB; push
/// events are far smaller, and the body is only hashed).
pub const MAX_WEBHOOK_BODY: usize = 5 * 1024 * 1024;

/// A commit's rollout state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// Every known gateway of the targeted clusters applied it (or a later
    /// commit containing it).
    Live,
    /// Some known gateway has not (yet).
    Pending,
    /// Some known gateway NACKed it (or a later commit containing it) and
    /// has not applied it.
    Nacked,
    /// The pipeline rejected it, and no accepted commit contains it.
    Rejected,
    /// Valid, but held by the deletion safeguard (`--max-deletion-percent`)
    /// until a commit with the override trailer contains it.
    Held,
    /// The syncer has not seen it on the tracked ref (not fetched yet, or
    /// not on that branch).
    Unknown,
    /// Its rollout is going through the waves of the `RolloutPolicy`
    /// (`wave` says which).
    Progressing,
    /// A gate failed (or an operator aborted): the clusters it reached went
    /// back to their last good snapshots; it is not rolled forward.
    #[serde(rename = "rolled-back")]
    RolledBack,
    /// A gateway of the open wave NACKed it: later waves stay closed.
    Halted,
}

impl RolloutState {
    /// The state as the API and the CLI name it (`rolled-back`).
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Live => "live",
            RolloutState::Pending => "pending",
            RolloutState::Nacked => "nacked",
            RolloutState::Rejected => "rejected",
            RolloutState::Held => "held",
            RolloutState::Unknown => "unknown",
            RolloutState::Progressing => "progressing",
            RolloutState::RolledBack => "rolled-back",
            RolloutState::Halted => "halted",
        }
    }
}

/// One gateway's state for a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayState {
    Applied,
    Nacked,
    Pending,
}

/// One known gateway in a rollout view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayView {
    pub cluster: String,
    pub gateway_id: String,
    pub state: GatewayState,
    pub connected: bool,
    #[serde(default)]
    pub applied: Option<String>,
    #[serde(default)]
    pub acked_at: Option<String>,
    /// The last NACK's version and reason.
    #[serde(default)]
    pub nack_version: Option<String>,
    #[serde(default)]
    pub nack_reason: Option<String>,
    pub last_seen: String,
}

/// A gateway of a targeted cluster that said goodbye within the known
/// window: listed, never counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftView {
    pub cluster: String,
    pub gateway_id: String,
    pub left_at: String,
    /// What it said when it left.
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub applied: Option<String>,
}

/// Where one commit stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    /// The commit asked about (resolved to 40 hex digits when the mirror
    /// knows it).
    pub commit: String,
    pub state: RolloutState,
    /// One line for humans.
    pub detail: String,
    /// The accepted commit whose snapshots carry it (itself, or a later
    /// commit that contains it).
    #[serde(default)]
    pub covered_by: Option<String>,
    /// The clusters it targets, each with its known gateways.
    pub clusters: BTreeMap<String, Vec<GatewayView>>,
    /// For a rejected commit: its diagnostics as text.
    #[serde(default)]
    pub diagnostics: Vec<String>,
    /// Gateways of the targeted clusters that said goodbye within the known
    /// window (drained, e.g. the old pods of a rollout): not waited for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<LeftView>,
    /// What the accepted commit carrying it changes for each cluster's
    /// gateways, from the commit published before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Changes>,
    /// Its run through the rollout waves, when the policy declares them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<RunView>,
}

impl RolloutView {
    /// `cluster/gateway` of every gateway in `state`.
    pub fn gateways_in(&self, state: GatewayState) -> Vec<String> {
        self.clusters
            .values()
            .flatten()
            .filter(|g| g.state == state)
            .map(|g| format!("{}/{}", g.cluster, g.gateway_id))
            .collect()
    }
}

/// Whether a gateway counts for rollouts now: connected, or seen within
/// the known window and not gone with a goodbye.
pub fn is_known(g: &GatewayRecord, window: Duration, now: SystemTime) -> bool {
    g.is_known(window, now)
}

/// Whether a gateway said goodbye within the known window (it is listed as
/// left, and not counted).
pub fn left_recently(g: &GatewayRecord, window: Duration, now: SystemTime) -> bool {
    !g.connected && g.left.as_ref().is_some_and(|d| within(d.at, window, now))
}

fn within(t: SystemTime, window: Duration, now: SystemTime) -> bool {
    now.duration_since(t).map_or(true, |age| age <= window)
}

fn left_view(g: &GatewayRecord) -> Option<LeftView> {
    let d = g.left.as_ref()?;
    Some(LeftView {
        cluster: g.cluster.clone(),
        gateway_id: g.gateway_id.clone(),
        left_at: rfc3339(d.at),
        reason: d.reason.clone(),
        applied: g.applied.clone(),
    })
}

fn gateway_view(
    g: &GatewayRecord,
    commit: Option<&str>,
    contains: &dyn Fn(&str, &str) -> bool,
) -> GatewayView {
    let applied_it = commit.is_some_and(|c| g.applied.as_deref().is_some_and(|a| contains(c, a)));
    let nacked_it = commit.is_some_and(|c| g.nack.as_ref().is_some_and(|(v, _)| contains(c, v)));
    let state = if !g.connected {
        GatewayState::Pending
    } else if applied_it {
        GatewayState::Applied
    } else if nacked_it {
        GatewayState::Nacked
    } else {
        GatewayState::Pending
    };
    GatewayView {
        cluster: g.cluster.clone(),
        gateway_id: g.gateway_id.clone(),
        state,
        connected: g.connected,
        applied: g.applied.clone(),
        acked_at: g.acked_at.map(rfc3339),
        nack_version: g.nack.as_ref().map(|(v, _)| v.clone()),
        nack_reason: g.nack.as_ref().map(|(_, r)| r.clone()),
        last_seen: rfc3339(g.last_seen),
    }
}

/// Computes a commit's rollout. `contains(a, b)`: commit `b` is `a` or a
/// descendant of it (Git ancestry).
pub fn compute_rollout(
    commit: &str,
    state: &StateView,
    gateways: &[GatewayRecord],
    window: Duration,
    now: SystemTime,
    contains: &dyn Fn(&str, &str) -> bool,
) -> RolloutView {
    let mut view = RolloutView {
        commit: commit.to_string(),
        state: RolloutState::Unknown,
        detail: String::new(),
        covered_by: None,
        clusters: BTreeMap::new(),
        diagnostics: Vec::new(),
        left: Vec::new(),
        changes: None,
        waves: None,
    };
    let covered = state
        .acceptance(commit)
        .or_else(|| {
            state
                .last_good
                .as_ref()
                .filter(|g| contains(commit, &g.commit))
        })
        .cloned();
    let Some(acc) = covered else {
        if let Some(h) = state.holding(commit) {
            view.state = RolloutState::Held;
            view.detail = h.reason.clone();
            view.diagnostics = h
                .removed_sample
                .iter()
                .map(|r| format!("would delete {r}"))
                .collect();
        } else if let Some(r) = state.rejection(commit) {
            view.state = RolloutState::Rejected;
            view.detail = format!("rejected by the syncer: {}", r.reason);
            view.diagnostics = r
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| d.to_string())
                .collect();
        } else {
            view.detail =
                "not on the tracked ref as last fetched (not pushed or not fetched yet?)".into();
        }
        return view;
    };
    view.covered_by = Some(acc.commit.clone());
    view.changes = acc.changes.clone();
    for c in &acc.clusters {
        view.clusters.insert(c.clone(), Vec::new());
    }
    for g in gateways {
        if !view.clusters.contains_key(&g.cluster) {
            continue;
        }
        if left_recently(g, window, now) {
            view.left.extend(left_view(g));
        }
        if !is_known(g, window, now) {
            continue;
        }
        if let Some(list) = view.clusters.get_mut(&g.cluster) {
            list.push(gateway_view(g, Some(commit), contains));
        }
    }
    let nacked = view.gateways_in(GatewayState::Nacked);
    let pending = view.gateways_in(GatewayState::Pending);
    let total: usize = view.clusters.values().map(Vec::len).sum();
    // Clusters with no known gateway count as live, as the contract says
    // (every *known* gateway has applied it); they are named in the detail.
    let unknown: Vec<&str> = view
        .clusters
        .iter()
        .filter(|(_, g)| g.is_empty())
        .map(|(c, _)| c.as_str())
        .collect();
    let unknown = if unknown.is_empty() {
        String::new()
    } else {
        format!("; no known gateway in {}", unknown.join(", "))
    };
    let targets = acc.clusters.iter().cloned().collect::<Vec<_>>().join(", ");
    (view.state, view.detail) = if !nacked.is_empty() {
        (
            RolloutState::Nacked,
            format!("NACKed by {}", nacked.join(", ")),
        )
    } else if !pending.is_empty() {
        (
            RolloutState::Pending,
            format!(
                "{} of {total} known gateway(s) pending: {}",
                pending.len(),
                pending.join(", ")
            ),
        )
    } else {
        (
            RolloutState::Live,
            format!("applied by all {total} known gateway(s) of {targets}{unknown}"),
        )
    };
    view
}

/// Everything the HTTP listener serves from.
#[derive(Debug)]
pub struct StatusApi {
    pub state: Arc<SyncState>,
    pub rollout: Rollout,
    pub source: Arc<GitSource>,
    pub published: watch::Receiver<Option<Arc<Published>>>,
    pub trigger: Arc<Trigger>,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    pub webhook_secret: Option<Secret>,
    pub token: Option<Secret>,
    pub known_window: Duration,
    /// Bounds a request head, a webhook body and a kept-alive idle
    /// connection (`--header-timeout`).
    pub header_timeout: Duration,
    /// The rollout waves (runs, `resume`, `abort`).
    pub waves: Arc<Waves>,
}

/// Folds a commit's run through the waves into its view: a progressing,
/// rolled-back or halted run says where the commit stands; a complete one
/// leaves the gateways' ACKs to say whether it is live.
pub fn apply_run(view: &mut RolloutView, run: Option<RunView>) {
    let Some(run) = run else { return };
    let waves = format!("wave {} of {}", run.wave, run.waves);
    match run.state {
        RunState::Progressing => {
            view.state = RolloutState::Progressing;
            let clusters = run
                .plan
                .get(run.wave - 1)
                .map(|c| c.join(", "))
                .unwrap_or_default();
            view.detail = match &run.baking_since {
                Some(t) => format!(
                    "{waves} ({clusters}): baking since {t} for {}s; the gates watch its gateways",
                    run.bake_ms / 1000
                ),
                None => format!("{waves} ({clusters}): waiting for its gateways to apply it"),
            };
        }
        RunState::RolledBack => {
            view.state = RolloutState::RolledBack;
            view.detail = run.reason.clone().unwrap_or_else(|| "rolled back".into());
        }
        RunState::Halted => {
            view.state = RolloutState::Halted;
            view.detail = run.reason.clone().unwrap_or_else(|| "halted".into());
        }
        RunState::Complete | RunState::Superseded => {}
    }
    view.waves = Some(run);
}

/// `/status`.
#[derive(Debug, Serialize)]
struct StatusDoc {
    repo: String,
    #[serde(rename = "ref")]
    reference: String,
    #[serde(flatten)]
    pipeline: StateView,
    /// Per cluster: the served snapshot and every known gateway, judged
    /// against the last good commit.
    clusters: BTreeMap<String, ClusterDoc>,
    /// The last good commit's rollout.
    rollout: Option<RolloutView>,
    triggers: TriggerDoc,
}

#[derive(Debug, Serialize)]
struct TriggerDoc {
    /// Sync requests received (signed webhooks).
    requests: u64,
    /// Syncs run (startup, webhook, poll).
    syncs: u64,
}

#[derive(Debug, Serialize)]
struct ClusterDoc {
    version: Option<String>,
    content_hash: Option<String>,
    gateways: Vec<GatewayView>,
    /// Gateways that said goodbye within the known window (not counted).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    left: Vec<LeftView>,
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.into() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, v: &impl Serialize) -> Resp {
    match serde_json::to_vec_pretty(v) {
        Ok(b) => {
            let mut r = Response::new(Full::new(Bytes::from(b)));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}")),
    }
}

impl StatusApi {
    /// Serves until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "status listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let api = self.clone();
            let header_timeout = self.header_timeout;
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(api.handle(req, peer).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "status connection ended");
                }
            });
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        match (req.method(), path.as_str()) {
            (&Method::POST, "/hooks/git") => self.webhook(req, peer).await,
            (&Method::POST, _)
                if path.starts_with("/rollout/")
                    && (path.ends_with("/resume") || path.ends_with("/abort")) =>
            {
                if let Some(denied) = self.check_token(&req) {
                    return denied;
                }
                self.override_rollout(&path)
            }
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
            (&Method::GET, _)
                if path == "/status" || path == "/metrics" || path.starts_with("/rollout/") =>
            {
                if let Some(denied) = self.check_token(&req) {
                    return denied;
                }
                if path == "/metrics" {
                    return self.metrics();
                }
                let commit = path
                    .strip_prefix("/rollout/")
                    .map(str::to_string)
                    .or_else(|| {
                        query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("commit=").map(str::to_string))
                    });
                match commit {
                    Some(c) if is_hex_prefix(&c) => {
                        let api = self.clone();
                        match tokio::task::spawn_blocking(move || api.rollout_view(&c)).await {
                            Ok(v) => json(StatusCode::OK, &v),
                            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                        }
                    }
                    Some(c) => text(
                        StatusCode::BAD_REQUEST,
                        format!("`{c}` is not a commit SHA (4 to 40 hex digits)"),
                    ),
                    None => {
                        let api = self.clone();
                        match tokio::task::spawn_blocking(move || api.status_doc()).await {
                            Ok(doc) => json(StatusCode::OK, &doc),
                            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                        }
                    }
                }
            }
            (_, "/hooks/git" | "/status" | "/metrics" | "/healthz") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; routes: POST /hooks/git, GET /status[?commit=SHA], GET /rollout/SHA, POST /rollout/SHA/resume, POST /rollout/SHA/abort, GET /metrics, GET /healthz",
            ),
        }
    }

    /// `POST /rollout/SHA/resume` or `/abort`.
    fn override_rollout(&self, path: &str) -> Resp {
        let rest = path.trim_start_matches("/rollout/");
        let Some((sha, action)) = rest.split_once('/') else {
            return text(
                StatusCode::NOT_FOUND,
                "POST /rollout/SHA/resume or /rollout/SHA/abort",
            );
        };
        if !is_hex_prefix(sha) {
            return text(
                StatusCode::BAD_REQUEST,
                format!("`{sha}` is not a commit SHA (4 to 40 hex digits)"),
            );
        }
        let sha = sha.to_ascii_lowercase();
        let done = match action {
            "resume" => self.waves.resume(&sha),
            "abort" => self.waves.abort(&sha),
            _ => {
                return text(
                    StatusCode::NOT_FOUND,
                    "POST /rollout/SHA/resume or /rollout/SHA/abort",
                );
            }
        };
        match done {
            Ok(what) => text(StatusCode::OK, what),
            Err(e @ OverrideError::Unknown(_)) => text(StatusCode::NOT_FOUND, e.to_string()),
            Err(e) => text(StatusCode::CONFLICT, e.to_string()),
        }
    }

    fn check_token(&self, req: &Request<Incoming>) -> Option<Resp> {
        let expected = self.token.as_ref()?;
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes())) {
            return None;
        }
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs `Authorization: Bearer <token>` (the syncer's --http-token-file)",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        Some(r)
    }

    async fn webhook(&self, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        let Some(secret) = &self.webhook_secret else {
            self.metrics.webhook("none", "unauthorized");
            return text(
                StatusCode::UNAUTHORIZED,
                "the webhook is off: the syncer has no --webhook-secret-file",
            );
        };
        let headers = req.headers().clone();
        let read = Limited::new(req.into_body(), MAX_WEBHOOK_BODY).collect();
        let body = match tokio::time::timeout(self.header_timeout, read).await {
            Ok(Ok(b)) => b.to_bytes(),
            Err(_) => {
                self.metrics.webhook("unknown", "bad_request");
                tracing::info!(%peer, "webhook body not received in time; dropped");
                return text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the body did not arrive within {:?} (--header-timeout)",
                        self.header_timeout
                    ),
                );
            }
            Ok(Err(e)) => {
                self.metrics.webhook("unknown", "bad_request");
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("cannot read the body (limit {MAX_WEBHOOK_BODY} bytes): {e}"),
                );
            }
        };
        let provider = match trigger::verify(secret, &headers, &body) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.webhook("unknown", "unauthorized");
                tracing::warn!(%peer, reason = %e, "webhook refused");
                return text(StatusCode::UNAUTHORIZED, format!("refused: {e}"));
            }
        };
        let tracked = self.source.config().remote_ref();
        if let Some(r) = trigger::pushed_ref(&body)
            && r != tracked
        {
            self.metrics.webhook(provider.as_str(), "ignored");
            return text(
                StatusCode::ACCEPTED,
                format!("ignored: the push is to {r}; this syncer tracks {tracked}"),
            );
        }
        self.metrics.webhook(provider.as_str(), "accepted");
        tracing::info!(%peer, provider = provider.as_str(), "webhook: sync requested");
        self.trigger.request();
        text(StatusCode::ACCEPTED, "sync requested")
    }

    fn metrics(&self) -> Resp {
        self.metrics.refresh(&self.rollout);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics: {e}"),
            );
        }
        let mut r = Response::new(Full::new(Bytes::from(out)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        r
    }

    /// A commit's rollout (blocking: Git ancestry).
    pub fn rollout_view(&self, commit: &str) -> RolloutView {
        let full = if commit.len() == 40 {
            commit.to_ascii_lowercase()
        } else {
            self.source
                .resolve(commit)
                .unwrap_or_else(|| commit.to_string())
        };
        let state = self.state.get();
        let gateways = self.rollout.gateways();
        let src = &self.source;
        let contains = |a: &str, b: &str| src.is_ancestor(a, b).unwrap_or(false);
        let mut view = compute_rollout(
            &full,
            &state,
            &gateways,
            self.known_window,
            SystemTime::now(),
            &contains,
        );
        apply_run(&mut view, self.waves.run_view(&full));
        view
    }

    fn status_doc(&self) -> StatusDoc {
        let state = self.state.get();
        let published = self.published.borrow().clone();
        let gateways = self.rollout.gateways();
        let now = SystemTime::now();
        let src = &self.source;
        let contains = |a: &str, b: &str| src.is_ancestor(a, b).unwrap_or(false);
        let good = state.last_good.as_ref().map(|g| g.commit.clone());
        let mut clusters: BTreeMap<String, ClusterDoc> = BTreeMap::new();
        if let Some(p) = &published {
            for (name, c) in &p.clusters {
                clusters.insert(
                    name.clone(),
                    ClusterDoc {
                        version: Some(c.snapshot.version.clone()),
                        content_hash: Some(c.snapshot.content_hash.clone()),
                        gateways: Vec::new(),
                        left: Vec::new(),
                    },
                );
            }
        }
        for g in &gateways {
            let known = is_known(g, self.known_window, now);
            let left = left_recently(g, self.known_window, now);
            if !known && !left {
                continue;
            }
            let doc = clusters.entry(g.cluster.clone()).or_insert(ClusterDoc {
                version: None,
                content_hash: None,
                gateways: Vec::new(),
                left: Vec::new(),
            });
            if known {
                doc.gateways
                    .push(gateway_view(g, good.as_deref(), &contains));
            } else {
                doc.left.extend(left_view(g));
            }
        }
        let rollout = good.as_deref().map(|c| {
            let mut v = compute_rollout(c, &state, &gateways, self.known_window, now, &contains);
            apply_run(&mut v, self.waves.run_view(c));
            v
        });
        StatusDoc {
            repo: self.source.display_url(),
            reference: self.source.config().remote_ref(),
            pipeline: state,
            clusters,
            rollout,
            triggers: TriggerDoc {
                requests: self.trigger.requests(),
                syncs: self.trigger.syncs(),
            },
        }
    }
}

fn is_hex_prefix(s: &str) -> bool {
    (4..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Exit codes of `meshfed-syncer status`.
pub mod exit {
    /// Shown, or with --wait: live on every known gateway.
    pub const OK: u8 = 0;
    /// With --wait: a gateway NACKed it, or the syncer rejected it.
    pub const FAILED: u8 = 1;
    /// Usage error, or the syncer could not be asked (connection, auth).
    pub const ERROR: u8 = 2;
    /// With --wait: the timeout passed with gateways still pending.
    pub const TIMEOUT: u8 = 3;
}

/// The `status` client's settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` of the syncer's HTTP listener.
    pub server: String,
    pub token: Option<Secret>,
}

/// Why the client could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "`{0}` is not an http:// URL; hint: the status API is plain HTTP (use a tunnel to reach a remote syncer)"
    )]
    Url(String),
    #[error(
        "cannot reach the syncer at {server}: {message}; hint: is it running, and is --server its --http-addr?"
    )]
    Connect { server: String, message: String },
    #[error("the syncer answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("cannot read the syncer's answer: {0}")]
    Decode(String),
}

impl ClientConfig {
    async fn get(&self, path: &str) -> Result<Bytes, ClientError> {
        self.call(Method::GET, path).await
    }

    /// `POST /rollout/SHA/{resume,abort}`: the syncer's answer, one line.
    pub async fn override_rollout(
        &self,
        commit: &str,
        action: &str,
    ) -> Result<String, ClientError> {
        let body = self
            .call(Method::POST, &format!("/rollout/{commit}/{action}"))
            .await?;
        Ok(String::from_utf8_lossy(&body).trim().to_string())
    }

    async fn call(&self, method: Method, path: &str) -> Result<Bytes, ClientError> {
        let base = self.server.trim_end_matches('/');
        if !base.starts_with("http://") {
            return Err(ClientError::Url(self.server.clone()));
        }
        let uri: http::Uri = format!("{base}{path}")
            .parse()
            .map_err(|_| ClientError::Url(self.server.clone()))?;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", t.expose()));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .map_err(|_| ClientError::Connect {
                server: self.server.clone(),
                message: "no answer within 10s".into(),
            })?
            .map_err(|e| ClientError::Connect {
                server: self.server.clone(),
                message: error_chain(&e),
            })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(body)
    }

    /// `GET /rollout/SHA`.
    pub async fn rollout(&self, commit: &str) -> Result<RolloutView, ClientError> {
        let body = self.get(&format!("/rollout/{commit}")).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET /status` as JSON.
    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        let body = self.get("/status").await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// The rollout table `meshfed-syncer status --wait` prints.
pub fn render_rollout(v: &RolloutView) -> String {
    let mut out = format!(
        "commit {}: {}: {}\n",
        short(&v.commit),
        match v.state {
            RolloutState::Live => "LIVE",
            RolloutState::Pending => "PENDING",
            RolloutState::Nacked => "NACKED",
            RolloutState::Rejected => "REJECTED",
            RolloutState::Held => "HELD",
            RolloutState::Unknown => "UNKNOWN",
            RolloutState::Progressing => "PROGRESSING",
            RolloutState::RolledBack => "ROLLED BACK",
            RolloutState::Halted => "HALTED",
        },
        v.detail
    );
    if let Some(c) = v.covered_by.as_deref().filter(|c| *c != v.commit) {
        out.push_str(&format!("  carried by the later commit {}\n", short(c)));
    }
    for d in &v.diagnostics {
        out.push_str(&format!("  {d}\n"));
    }
    if let Some(w) = &v.waves {
        let plan: Vec<String> = w
            .plan
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{}: {}", i + 1, c.join(", ")))
            .collect();
        out.push_str(&format!(
            "  waves ({}): {}; at wave {} of {}\n",
            w.state.as_str(),
            plan.join(" → "),
            w.wave,
            w.waves
        ));
        for n in &w.notes {
            out.push_str(&format!("  {n}\n"));
        }
    }
    if let Some(ch) = &v.changes {
        let report = meshfed_policy::diff::Report {
            clusters: ch.clusters.clone(),
        };
        out.push_str(&format!(
            "  changes from {} (meshfed-policy diff):\n",
            short(&ch.from)
        ));
        for line in report.text().lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    let rows: Vec<&GatewayView> = v.clusters.values().flatten().collect();
    let empty: Vec<&String> = v
        .clusters
        .iter()
        .filter(|(_, g)| g.is_empty())
        .map(|(c, _)| c)
        .collect();
    out.push_str(&render_gateways(&rows));
    for c in empty {
        out.push_str(&format!("  cluster {c}: no known gateway\n"));
    }
    for l in &v.left {
        out.push_str(&format!(
            "  {}/{} left at {} ({}); not waited for\n",
            l.cluster,
            l.gateway_id,
            l.left_at,
            if l.reason.is_empty() {
                "said goodbye"
            } else {
                l.reason.as_str()
            }
        ));
    }
    out
}

fn render_gateways(rows: &[&GatewayView]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut table = vec![[
        "CLUSTER".to_string(),
        "GATEWAY".into(),
        "STATE".into(),
        "APPLIED".into(),
        "ACKED".into(),
        "NOTE".into(),
    ]];
    for g in rows {
        let mut note = Vec::new();
        if !g.connected {
            note.push(format!("disconnected, last seen {}", g.last_seen));
        }
        if let (Some(v), Some(r)) = (&g.nack_version, &g.nack_reason) {
            note.push(format!("NACK {}: {r}", short(v)));
        }
        table.push([
            g.cluster.clone(),
            g.gateway_id.clone(),
            format!("{:?}", g.state).to_lowercase(),
            g.applied
                .as_deref()
                .map_or("-".into(), |a| short(a).to_string()),
            g.acked_at.clone().unwrap_or_else(|| "-".into()),
            note.join("; "),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The `/status` summary `meshfed-syncer status` prints.
pub fn render_status(doc: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "repo {} ({})\nhead      {}\nlast good {}\n",
        s(&doc["repo"]),
        s(&doc["ref"]),
        s(&doc["head"]),
        s(&doc["last_good"]["commit"]),
    );
    if doc["last_fetch"]["ok"] == serde_json::Value::Bool(false) {
        out.push_str(&format!(
            "last fetch FAILED at {}: {}\n",
            s(&doc["last_fetch"]["at"]),
            s(&doc["last_fetch"]["error"])
        ));
    }
    if doc["held"].is_object() {
        out.push_str(&format!(
            "HELD      {} at {}: {}\n",
            short(&s(&doc["held"]["commit"])),
            s(&doc["held"]["at"]),
            s(&doc["held"]["reason"])
        ));
    }
    if let Some(rejected) = doc["rejected"].as_array() {
        for r in rejected.iter().take(5) {
            out.push_str(&format!(
                "rejected  {} at {}: {}\n",
                short(&s(&r["commit"])),
                s(&r["at"]),
                s(&r["reason"])
            ));
            for d in r["diagnostics"].as_array().into_iter().flatten() {
                if d["severity"] == "error" {
                    out.push_str(&format!(
                        "  {}:{}:{}: error[{}]: {}\n",
                        s(&d["file"]),
                        d["line"],
                        d["column"],
                        s(&d["code"]),
                        s(&d["message"])
                    ));
                }
            }
        }
    }
    if let Some(v) = doc
        .get("rollout")
        .and_then(|r| serde_json::from_value::<RolloutView>(r.clone()).ok())
    {
        out.push('\n');
        out.push_str(&render_rollout(&v));
    }
    let others: BTreeSet<String> = doc["clusters"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, c)| c["version"].is_null())
        .map(|(n, _)| n.clone())
        .collect();
    for c in others {
        out.push_str(&format!(
            "  cluster {c}: gateways connected, but the last good commit has no snapshot for it\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests;
