//! The syncer's own Prometheus metrics (pipeline, triggers, connections),
//! registered under the `meshfed` prefix. The config server registers its
//! propagation metrics into the same registry.
//!
//! Gauges that mirror shared state (connected gateways) are refreshed from
//! the [`Rollout`](crate::rollout::Rollout) when `/metrics` is scraped, so
//! they cannot drift from what `/status` says.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::rollout::Rollout;

/// Label pairs; small and few, so a `Vec` is simplest.
pub type Labels = Vec<(&'static str, String)>;

/// The syncer's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Seconds per `git fetch`, successful or not.
    pub fetch_duration: Histogram,
    /// Fetches that failed (network, auth, missing ref).
    pub fetch_errors: Counter,
    /// Commits processed, by `result` = accepted | rejected.
    pub commits: Family<Labels, Counter>,
    /// Seconds from fetch start to publication of an accepted commit.
    pub pipeline_duration: Histogram,
    /// Webhook requests by `provider` and `result` (accepted, ignored,
    /// unauthorized, bad_request).
    pub webhooks: Family<Labels, Counter>,
    /// Gateways with an open config stream, by `cluster`.
    pub connected: Family<Labels, Gauge>,
    /// Unix time of the last accepted commit's publication.
    pub last_accepted: Gauge,
    /// Rollout waves that ended, by `result` = passed | rolled_back |
    /// halted | aborted.
    pub waves: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            // 1 ms .. ~65 s.
            fetch_duration: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            fetch_errors: Counter::default(),
            commits: Family::default(),
            pipeline_duration: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            webhooks: Family::default(),
            connected: Family::default(),
            last_accepted: Gauge::default(),
            waves: Family::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric into `registry` (which should carry the
    /// `meshfed` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "syncer_git_fetch_duration_seconds",
            "Duration of git fetches of the tracked ref",
            self.fetch_duration.clone(),
        );
        registry.register(
            "syncer_git_fetch_errors",
            "Git fetches that failed",
            self.fetch_errors.clone(),
        );
        registry.register(
            "syncer_commits",
            "Commits processed by the pipeline, by result (accepted, rejected)",
            self.commits.clone(),
        );
        registry.register(
            "syncer_pipeline_duration_seconds",
            "From fetch start to publication of an accepted commit",
            self.pipeline_duration.clone(),
        );
        registry.register(
            "syncer_webhooks",
            "Webhook requests by provider and result",
            self.webhooks.clone(),
        );
        registry.register(
            "syncer_connected_gateways",
            "Gateways with an open config stream, by cluster",
            self.connected.clone(),
        );
        registry.register(
            "syncer_last_accepted_timestamp_seconds",
            "Unix time when the last accepted commit was published",
            self.last_accepted.clone(),
        );
        registry.register(
            "syncer_rollout_waves",
            "Rollout waves that ended, by result (passed, rolled_back, halted, aborted)",
            self.waves.clone(),
        );
    }

    pub fn wave(&self, result: &'static str) {
        self.waves
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    pub fn commit(&self, result: &'static str) {
        self.commits
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    pub fn webhook(&self, provider: &str, result: &'static str) {
        self.webhooks
            .get_or_create(&vec![
                ("provider", provider.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
    }

    /// Refreshes the connected-gateways gauges from the rollout.
    pub fn refresh(&self, rollout: &Rollout) {
        self.connected.clear();
        for g in rollout.gateways() {
            let gauge = self
                .connected
                .get_or_create(&vec![("cluster", g.cluster.clone())]);
            if g.connected {
                gauge.inc();
            }
        }
    }
}
