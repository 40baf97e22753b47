//! Namespaces the mirrors cannot be written to: missing (the API server
//! answers a create with `404`, `details.kind: namespaces`) or terminating
//! (`403` with the cause `NamespaceTerminating`). Neither is a missing RBAC
//! rule, and neither goes away by retrying every second: such a namespace
//! is skipped, with one INFO log per change of its state and the gauge
//! `meshfed_mirror_skipped_namespaces{reason}`, and tried again with
//! exponential backoff (1 s doubling to [`MAX_BACKOFF`]). A write that
//! succeeds there clears it.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

/// The longest wait between two tries of a skipped namespace.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Why a namespace is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// It does not exist.
    Missing,
    /// It is being deleted.
    Terminating,
}

impl Skip {
    pub fn label(self) -> &'static str {
        match self {
            Skip::Missing => "missing",
            Skip::Terminating => "terminating",
        }
    }

    /// Whether `e` says the write's namespace is missing or terminating.
    pub fn of(e: &kube::Error) -> Option<Skip> {
        let kube::Error::Api(s) = e else { return None };
        let details = s.details.as_ref();
        match s.code {
            404 if details.is_some_and(|d| d.kind == "namespaces")
                || s.message.starts_with("namespaces ") =>
            {
                Some(Skip::Missing)
            }
            403 if details
                .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
                || s.message.contains("because it is being terminated") =>
            {
                Some(Skip::Terminating)
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, EncodeLabelSet, PartialEq, Eq, Hash)]
struct ReasonLabels {
    reason: &'static str,
}

/// Namespaces skipped now, by reason.
static SKIPPED: LazyLock<Family<ReasonLabels, Gauge>> = LazyLock::new(Default::default);

/// Registers `meshfed_mirror_skipped_namespaces`.
#[derive(Debug)]
pub struct MirrorMetrics;

impl crate::metrics::Register for MirrorMetrics {
    fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "mirror_skipped_namespaces",
            "Namespaces mirror Services are not written to now, because the namespace does not \
             exist or is terminating (retried with backoff)",
            SKIPPED.clone(),
        );
    }
}

/// Namespaces skipped now, for `reason`.
pub fn skipped(reason: Skip) -> i64 {
    SKIPPED
        .get_or_create(&ReasonLabels {
            reason: reason.label(),
        })
        .get()
}

#[derive(Debug, Clone)]
struct Entry {
    skip: Skip,
    next_try: Instant,
    backoff: Duration,
}

/// The skipped namespaces of one controller.
#[derive(Debug, Default)]
pub struct Skipped {
    entries: BTreeMap<String, Entry>,
}

impl Skipped {
    /// Whether writes to `ns` wait for now.
    pub fn waiting(&self, ns: &str, now: Instant) -> bool {
        self.entries.get(ns).is_some_and(|e| now < e.next_try)
    }

    /// A write to `ns` failed because of its state: skip it, with backoff.
    pub fn failed(&mut self, ns: &str, skip: Skip, now: Instant) {
        match self.entries.get_mut(ns) {
            Some(e) if e.skip == skip => {
                // Already skipped for this reason: only a later try.
                if now >= e.next_try {
                    e.backoff = (e.backoff * 2).min(MAX_BACKOFF);
                    e.next_try = now + e.backoff;
                }
            }
            other => {
                if let Some(old) = other {
                    gauge(old.skip).dec();
                }
                gauge(skip).inc();
                match skip {
                    Skip::Missing => tracing::info!(
                        namespace = %ns,
                        "mirror Services skipped in namespace `{ns}`: it does not exist; retrying with backoff (create the namespace, or stop exporting its services)"
                    ),
                    Skip::Terminating => tracing::info!(
                        namespace = %ns,
                        "mirror Services skipped in namespace `{ns}`: it is being deleted; retrying with backoff"
                    ),
                }
                self.entries.insert(
                    ns.to_string(),
                    Entry {
                        skip,
                        next_try: now + FIRST_BACKOFF,
                        backoff: FIRST_BACKOFF,
                    },
                );
            }
        }
    }

    /// A write to `ns` succeeded: no longer skipped.
    pub fn succeeded(&mut self, ns: &str) {
        if let Some(e) = self.entries.remove(ns) {
            gauge(e.skip).dec();
            tracing::info!(namespace = %ns, "mirror Services are written to namespace `{ns}` again");
        }
    }

    /// Forgets namespaces no mirror is desired in any more.
    pub fn retain(&mut self, wanted: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|ns| !wanted(ns))
            .cloned()
            .collect();
        for ns in gone {
            if let Some(e) = self.entries.remove(&ns) {
                gauge(e.skip).dec();
            }
        }
    }
}

impl Drop for Skipped {
    fn drop(&mut self) {
        self.retain(|_| false);
    }
}

fn gauge(skip: Skip) -> Gauge {
    SKIPPED
        .get_or_create(&ReasonLabels {
            reason: skip.label(),
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(v: serde_json::Value) -> kube::Error {
        kube::Error::Api(Box::new(serde_json::from_value(v).unwrap()))
    }

    /// The API server's answers, as kube-apiserver writes them.
    #[test]
    fn missing_and_terminating_namespaces_are_told_from_other_errors() {
        let missing = api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "namespaces \"gone\" not found", "reason": "NotFound",
            "details": {"name": "gone", "kind": "namespaces"}, "code": 404}));
        let terminating = api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "services \"ratings-west\" is forbidden: unable to create new content in namespace old because it is being terminated",
            "reason": "Forbidden",
            "details": {"name": "ratings-west", "kind": "services", "causes": [
                {"reason": "NamespaceTerminating", "message": "namespace old is being terminated", "field": "metadata.namespace"}]},
            "code": 403}));
        let rbac = api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "services is forbidden: User \"system:serviceaccount:meshfed-system:meshfed-gateway\" cannot create resource \"services\"",
            "reason": "Forbidden", "details": {"kind": "services"}, "code": 403}));
        let object_missing = api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "services \"ratings-west\" not found", "reason": "NotFound",
            "details": {"name": "ratings-west", "kind": "services"}, "code": 404}));
        assert_eq!(Skip::of(&missing), Some(Skip::Missing));
        assert_eq!(Skip::of(&terminating), Some(Skip::Terminating));
        assert_eq!(Skip::of(&rbac), None);
        assert_eq!(Skip::of(&object_missing), None);
    }

    /// Retries back off from 1 s, doubling to the cap; a success clears
    /// the namespace; the gauge follows.
    #[tokio::test(start_paused = true)]
    async fn a_skipped_namespace_is_retried_with_backoff_and_counted() {
        let mut s = Skipped::default();
        let before = skipped(Skip::Terminating);
        let t0 = Instant::now();
        s.failed("old", Skip::Terminating, t0);
        assert_eq!(skipped(Skip::Terminating), before + 1);
        assert!(s.waiting("old", t0));
        assert!(!s.waiting("other", t0));
        let mut at = t0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            // Find when the next try is due, then fail it again.
            let mut t = at;
            while s.waiting("old", t) {
                t += Duration::from_millis(100);
            }
            waits.push((t - at).as_secs());
            s.failed("old", Skip::Terminating, t);
            at = t;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(skipped(Skip::Terminating), before + 1, "counted once");
        s.succeeded("old");
        assert!(!s.waiting("old", at));
        assert_eq!(skipped(Skip::Terminating), before);
    }
}
