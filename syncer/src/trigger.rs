//! Fetch triggers: the webhook and the poll timer, and the loop that runs
//! one sync at a time.
//!
//! - The loop syncs once at startup, then whenever the webhook asks or the
//!   poll interval (default 30 s) has passed since the last sync.
//! - Coalescing: a request is a [`tokio::sync::Notify`] permit. A push that
//!   arrives while no sync runs starts one at once (no debounce timer eating
//!   the latency budget); any number of pushes during a sync leave a single
//!   permit, so exactly one follow-up sync fetches the newest head.
//! - Webhook signatures are checked before the body is looked at: GitHub's
//!   `X-Hub-Signature-256` (`sha256=` + hex HMAC-SHA256 of the body),
//!   Gitea's / Forgejo's `X-Gitea-Signature` / `X-Forgejo-Signature` (hex
//!   HMAC-SHA256), GitLab's `X-Gitlab-Token` (the secret itself). All
//!   comparisons are constant-time. Every signature header present must
//!   verify; none present is a refusal. The parsing and verification live
//!   in [`webhook`], a light module the fuzz target compiles on its own.
//!
//! It does not own the HTTP listener the webhook route is mounted on
//! ([`crate::status`]) or the fetch itself ([`crate::git`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderMap;
use tokio::sync::{Notify, watch};

use crate::git::Secret;
use crate::pipeline::{Pipeline, SyncOutcome};

pub mod webhook;

pub use webhook::{Provider, WebhookError, github_signature, hmac_hex, pushed_ref};

/// The poll interval when none is configured.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);

/// Asks the sync loop for a sync; requests made during a sync coalesce.
#[derive(Debug, Default)]
pub struct Trigger {
    notify: Notify,
    requests: AtomicU64,
    syncs: AtomicU64,
}

impl Trigger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests a sync of the newest head.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Sync requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Syncs run so far (startup and poll included).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

/// Something the loop syncs: the [`Pipeline`] in production.
pub trait SyncOnce: Send + Sync + 'static {
    /// Fetches the newest head and processes it.
    fn sync_once(self: &Arc<Self>) -> impl Future<Output = ()> + Send;
}

impl SyncOnce for Pipeline {
    async fn sync_once(self: &Arc<Self>) {
        let outcome: SyncOutcome = self.sync().await;
        // Fetch failures are logged by the pipeline; the next trigger or
        // poll retries.
        tracing::debug!(?outcome, "sync done");
    }
}

/// Runs syncs until `shutdown` turns true: one now, then on each request
/// or after `poll` without one.
pub async fn run<S: SyncOnce>(
    target: Arc<S>,
    trigger: Arc<Trigger>,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        trigger.syncs.fetch_add(1, Ordering::Relaxed);
        target.sync_once().await;
        tokio::select! {
            _ = trigger.notify.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Verifies a webhook request against the shared secret; returns the
/// provider whose header came first (GitHub, Gitea, GitLab order). The
/// rules are in [`webhook::verify`].
pub fn verify(secret: &Secret, headers: &HeaderMap, body: &[u8]) -> Result<Provider, WebhookError> {
    webhook::verify(secret.expose().as_bytes(), headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const BODY: &[u8] = br#"{"ref":"refs/heads/main"}"#;

    #[test]
    fn github_signature_of_the_body_verifies_and_any_other_is_forged() {
        let s = Secret::new("hunter2");
        let good = github_signature(b"hunter2", BODY);
        assert_eq!(
            verify(&s, &headers(&[("x-hub-signature-256", &good)]), BODY),
            Ok(Provider::GitHub)
        );
        let other = github_signature(b"wrong", BODY);
        assert_eq!(
            verify(&s, &headers(&[("x-hub-signature-256", &other)]), BODY),
            Err(WebhookError::Forged(Provider::GitHub))
        );
        assert_eq!(
            verify(&s, &headers(&[("x-hub-signature-256", &good)]), b"{}"),
            Err(WebhookError::Forged(Provider::GitHub))
        );
        assert_eq!(
            verify(&s, &headers(&[("x-hub-signature-256", "sha1=00")]), BODY),
            Err(WebhookError::Malformed(Provider::GitHub))
        );
    }

    #[test]
    fn gitea_and_gitlab_are_checked_too() {
        let s = Secret::new("hunter2");
        let sig = hmac_hex(b"hunter2", BODY);
        assert_eq!(
            verify(&s, &headers(&[("x-gitea-signature", &sig)]), BODY),
            Ok(Provider::Gitea)
        );
        assert_eq!(
            verify(&s, &headers(&[("x-gitea-signature", "00ff")]), BODY),
            Err(WebhookError::Forged(Provider::Gitea))
        );
        assert_eq!(
            verify(&s, &headers(&[("x-gitlab-token", "hunter2")]), BODY),
            Ok(Provider::GitLab)
        );
        assert_eq!(
            verify(&s, &headers(&[("x-gitlab-token", "hunter3")]), BODY),
            Err(WebhookError::Forged(Provider::GitLab))
        );
    }

    #[test]
    fn a_request_without_signature_or_with_one_bad_among_good_ones_is_refused() {
        let s = Secret::new("k");
        assert_eq!(
            verify(&s, &HeaderMap::new(), BODY),
            Err(WebhookError::Missing)
        );
        let good = github_signature(b"k", BODY);
        assert_eq!(
            verify(
                &s,
                &headers(&[("x-hub-signature-256", &good), ("x-gitlab-token", "nope")]),
                BODY
            ),
            Err(WebhookError::Forged(Provider::GitLab))
        );
    }

    /// A sync that blocks until the test lets it finish, counting runs.
    struct Gate {
        started: tokio::sync::Semaphore,
        release: tokio::sync::Semaphore,
    }

    impl Default for Gate {
        fn default() -> Self {
            Gate {
                started: tokio::sync::Semaphore::new(0),
                release: tokio::sync::Semaphore::new(0),
            }
        }
    }

    impl SyncOnce for Gate {
        async fn sync_once(self: &Arc<Self>) {
            self.started.add_permits(1);
            if let Ok(p) = self.release.acquire().await {
                p.forget();
            }
        }
    }

    #[tokio::test]
    async fn pushes_during_a_sync_coalesce_into_exactly_one_follow_up_sync() {
        let gate = Arc::new(Gate::default());
        let trigger = Arc::new(Trigger::new());
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run(
            gate.clone(),
            trigger.clone(),
            Duration::from_secs(3600),
            stop,
        ));
        // The startup sync is running (and held).
        gate.started.acquire().await.unwrap().forget();
        for _ in 0..10 {
            trigger.request();
        }
        gate.release.add_permits(1);
        // Exactly one follow-up starts at once...
        gate.started.acquire().await.unwrap().forget();
        assert_eq!(trigger.syncs(), 2);
        gate.release.add_permits(1);
        // ...and no third: a new push is needed for that.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(trigger.syncs(), 2);
        assert_eq!(trigger.requests(), 10);
        trigger.request();
        gate.started.acquire().await.unwrap().forget();
        assert_eq!(trigger.syncs(), 3);
        gate.release.add_permits(1);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn pushed_ref_reads_the_push_event() {
        assert_eq!(pushed_ref(BODY).as_deref(), Some("refs/heads/main"));
        assert_eq!(pushed_ref(b"zen"), None);
    }
}
