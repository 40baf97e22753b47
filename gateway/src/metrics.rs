//! The gateway's Prometheus registry, under the `meshfed` prefix, and the
//! data path's request counters.
//!
//! Registry plumbing only: this module imports no other gateway module.
//! Each module defines its own metric set and registers it through
//! [`Register`] (authorization, the upstream clients, tracing, the
//! listeners' connection gauges, announcements, the per-peer link gauges);
//! the wiring ([`crate::run`], [`crate::admin`]) lists them for `/metrics`.
//!
//! Label names follow Istio's where a concept matches (`response_code`,
//! `destination_service`, `grpc_response_status`), plus `source_cluster` and
//! `destination_cluster`.

use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A module's metric set: registers its families under the registry's
/// prefix. The wiring lists every set once when it builds [`Metrics`], and
/// sets read at scrape time (the per-peer link gauges) when it encodes.
pub trait Register {
    fn register(&self, registry: &mut Registry);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound` (this gateway's callers) or `inbound` (from a peer).
    pub direction: &'static str,
    pub source_cluster: String,
    pub destination_cluster: String,
    pub destination_service: String,
    pub response_code: u16,
    pub grpc_response_status: String,
    /// The gateway's reason when it answered itself (`x-meshfed-error`).
    pub reason: String,
}

/// One request's labels, borrowed: [`Metrics::record_request`] finds
/// their series without allocating.
#[derive(Debug, Clone, Copy)]
pub struct RequestKey<'a> {
    pub direction: &'static str,
    pub source_cluster: &'a str,
    pub destination_cluster: &'a str,
    pub destination_service: &'a str,
    pub response_code: u16,
    pub grpc_response_status: &'a str,
    pub reason: &'a str,
}

impl RequestKey<'_> {
    fn hash(&self) -> u64 {
        let mut h = rustc_hash::FxHasher::default();
        self.direction.hash(&mut h);
        self.source_cluster.hash(&mut h);
        self.destination_cluster.hash(&mut h);
        self.destination_service.hash(&mut h);
        self.response_code.hash(&mut h);
        self.grpc_response_status.hash(&mut h);
        self.reason.hash(&mut h);
        h.finish()
    }

    fn is(&self, l: &RequestLabels) -> bool {
        self.response_code == l.response_code
            && self.direction == l.direction
            && self.destination_service == l.destination_service
            && self.destination_cluster == l.destination_cluster
            && self.source_cluster == l.source_cluster
            && self.reason == l.reason
            && self.grpc_response_status == l.grpc_response_status
    }

    fn of(l: &RequestLabels) -> RequestKey<'_> {
        RequestKey {
            direction: l.direction,
            source_cluster: &l.source_cluster,
            destination_cluster: &l.destination_cluster,
            destination_service: &l.destination_service,
            response_code: l.response_code,
            grpc_response_status: &l.grpc_response_status,
            reason: &l.reason,
        }
    }

    fn labels(&self) -> RequestLabels {
        RequestLabels {
            direction: self.direction,
            source_cluster: self.source_cluster.to_string(),
            destination_cluster: self.destination_cluster.to_string(),
            destination_service: self.destination_service.to_string(),
            response_code: self.response_code,
            grpc_response_status: self.grpc_response_status.to_string(),
            reason: self.reason.to_string(),
        }
    }
}

/// A request label set with its counter and duration histogram (handles
/// sharing the families' values).
#[derive(Debug)]
struct Series {
    labels: RequestLabels,
    count: Counter,
    duration: Histogram,
}

/// Most label sets kept in the table; more (a backend answering ever new
/// `grpc-status` strings) are counted through the families directly, so the
/// table never grows past this.
pub const MAX_SERIES: usize = 4096;

/// The duration histogram's labels: per destination service as well as
/// cluster (as Istio's `istio_request_duration_milliseconds`), so that the
/// rollout gates judge p99 per service (control/golden.rs). Its series are
/// as many as the request counter's services and clusters, never more.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub direction: &'static str,
    pub destination_cluster: String,
    pub destination_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    pub destination_service: String,
    pub destination_cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `handshake`, `stream` or `listener`.
    pub stage: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    pub version: String,
}

/// Retries and mirrored copies, by service and why.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceReasonLabels {
    pub destination_service: String,
    pub reason: String,
}

/// A refusal counted outside this registry, read at scrape time.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The registry of every metric, and the data path's request counters.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<DurationLabels, Histogram>,
    /// Each request label set's counter and histogram, found once in the
    /// families above ([`Metrics::record_request`]).
    series: Mutex<hashbrown::HashTable<Series>>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub refusals: Family<RefusalLabels, Counter>,
    pub retries: Family<ServiceReasonLabels, Counter>,
    pub mirrors: Family<ServiceReasonLabels, Counter>,
    config: Family<ConfigLabels, Gauge>,
    /// Live tokio tasks, sampled when `/metrics` is scraped.
    runtime_alive_tasks: Gauge,
    config_version: Mutex<String>,
    /// Handshake refusals counted by the TLS verifiers, read at scrape time.
    handshake_refusals: Mutex<Option<RefusalReader>>,
    /// Datagrams on the tunnel port no connection gets (tunnel::socket),
    /// read at scrape time.
    datagram_drops: Mutex<Option<RefusalReader>>,
}

/// Reads refusal counters kept elsewhere (by the TLS verifiers).
pub struct RefusalReader(pub Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>);

impl std::fmt::Debug for RefusalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefusalReader")
    }
}

impl Metrics {
    /// The registry with the request counters and every module's set in
    /// `sets`, in that order.
    pub fn new(sets: &[&dyn Register]) -> Self {
        let mut registry = Registry::with_prefix("meshfed");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests handled", requests.clone());
        let request_duration = Family::<DurationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
        });
        registry.register(
            "request_duration_seconds",
            "HTTP request duration until the response head, in seconds",
            request_duration.clone(),
        );
        let tcp_connections = Family::<TcpLabels, Counter>::default();
        registry.register(
            "tcp_connections_opened",
            "TCP connections proxied",
            tcp_connections.clone(),
        );
        let tcp_sent_bytes = Family::<TcpLabels, Counter>::default();
        registry.register(
            "tcp_sent_bytes",
            "Bytes sent to the destination over proxied TCP",
            tcp_sent_bytes.clone(),
        );
        let tcp_received_bytes = Family::<TcpLabels, Counter>::default();
        registry.register(
            "tcp_received_bytes",
            "Bytes received from the destination over proxied TCP",
            tcp_received_bytes.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refusals",
            "Connections and streams refused, by stage and reason",
            refusals.clone(),
        );
        let retries = Family::<ServiceReasonLabels, Counter>::default();
        registry.register(
            "retries",
            "Retries sent by the source gateway, by service and what the failed try answered",
            retries.clone(),
        );
        let mirrors = Family::<ServiceReasonLabels, Counter>::default();
        registry.register(
            "mirrored_requests",
            "Mirrored copies, by mirror service and outcome (sent, failed, dropped)",
            mirrors.clone(),
        );
        for set in sets {
            set.register(&mut registry);
        }
        let config = Family::<ConfigLabels, Gauge>::default();
        registry.register(
            "config_info",
            "The applied snapshot version (value 1)",
            config.clone(),
        );
        let runtime_alive_tasks = Gauge::default();
        registry.register(
            "runtime_alive_tasks",
            "Tokio tasks alive in the gateway's runtime, sampled at scrape time",
            runtime_alive_tasks.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            series: Mutex::new(hashbrown::HashTable::new()),
            tcp_connections,
            tcp_sent_bytes,
            tcp_received_bytes,
            refusals,
            retries,
            mirrors,
            config,
            runtime_alive_tasks,
            config_version: Mutex::new(String::new()),
            handshake_refusals: Mutex::new(None),
            datagram_drops: Mutex::new(None),
        }
    }
    /// Counts one HTTP request and observes its duration (until the
    /// response head). Each label set's counter and histogram are looked up
    /// in the families once, then found in a table hashed with FxHash over
    /// the borrowed labels: a request allocates nothing here and runs no
    /// SipHash (prometheus-client's families hash owned label structs).
    pub fn record_request(&self, key: RequestKey<'_>, seconds: f64) {
        let hash = key.hash();
        let mut table = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = table.find(hash, |s| key.is(&s.labels)) {
            s.count.inc();
            s.duration.observe(seconds);
            return;
        }
        let labels = key.labels();
        let count = self.requests.get_or_create(&labels).clone();
        let duration = self
            .request_duration
            .get_or_create(&DurationLabels {
                direction: key.direction,
                destination_cluster: key.destination_cluster.to_string(),
                destination_service: key.destination_service.to_string(),
            })
            .clone();
        count.inc();
        duration.observe(seconds);
        if table.len() < MAX_SERIES {
            table.insert_unique(
                hash,
                Series {
                    labels,
                    count,
                    duration,
                },
                |s| RequestKey::of(&s.labels).hash(),
            );
        }
    }

    /// Records the applied snapshot version.
    pub fn set_config(&self, version: &str) {
        if let Ok(mut cur) = self.config_version.lock()
            && *cur != version
        {
            self.config
                .get_or_create(&ConfigLabels {
                    version: cur.clone(),
                })
                .set(0);
            self.config
                .get_or_create(&ConfigLabels {
                    version: version.to_string(),
                })
                .set(1);
            *cur = version.to_string();
        }
    }

    /// Counts a retry of a call to `service`.
    pub fn retried(&self, service: &str, reason: String) {
        self.retries
            .get_or_create(&ServiceReasonLabels {
                destination_service: service.to_string(),
                reason,
            })
            .inc();
    }

    /// Counts a mirrored copy to `service` and what became of it.
    pub fn mirrored(&self, service: &str, outcome: &str) {
        self.mirrors
            .get_or_create(&ServiceReasonLabels {
                destination_service: service.to_string(),
                reason: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a refusal.
    pub fn refused(&self, stage: &'static str, reason: &str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                stage,
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Sets where handshake refusals are read from (the TLS verifiers).
    pub fn set_handshake_refusals(&self, read: RefusalReader) {
        if let Ok(mut g) = self.handshake_refusals.lock() {
            *g = Some(read);
        }
    }

    /// Sets where the tunnel port's dropped datagrams are read from.
    pub fn set_datagram_drops(&self, read: RefusalReader) {
        if let Ok(mut g) = self.datagram_drops.lock() {
            *g = Some(read);
        }
    }

    /// The text exposition (OpenMetrics), with the sets read at scrape time
    /// (`at_scrape`, e.g. the per-peer link gauges) after the rest.
    pub fn encode(&self, at_scrape: &[&dyn Register]) -> String {
        // Scrapes are served on the gateway's runtime; outside one (a unit
        // test) the gauge keeps its last value.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let n = rt.metrics().num_alive_tasks();
            self.runtime_alive_tasks
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        let scraped = self.scrape_time(at_scrape);
        let encoded = encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &scraped))
            .and_then(|()| encode_eof(&mut out));
        if encoded.is_err() {
            out.clear();
        }
        out
    }

    /// The values read at scrape time (handshake refusals and dropped
    /// datagrams counted elsewhere, then `at_scrape`), as a registry of
    /// their own built for this scrape: every line of `/metrics` is
    /// prometheus-client's encoding.
    fn scrape_time(&self, at_scrape: &[&dyn Register]) -> Registry {
        let mut r = Registry::with_prefix("meshfed");
        let readers: [(&str, &str, &Mutex<Option<RefusalReader>>); 2] = [
            (
                "handshake_refusals",
                "Peer handshakes refused (by the TLS verifiers or the tunnel's admission), by reason",
                &self.handshake_refusals,
            ),
            (
                "udp_datagrams_dropped",
                "Datagrams on the tunnel's UDP port that no connection gets, by reason",
                &self.datagram_drops,
            ),
        ];
        for (name, help, reader) in readers {
            let Ok(g) = reader.lock() else { continue };
            let Some(read) = g.as_ref() else { continue };
            let family = Family::<ReasonLabels, Counter>::default();
            for (reason, n) in (read.0)() {
                family.get_or_create(&ReasonLabels { reason }).inc_by(n);
            }
            r.register(name, help, family);
        }
        for set in at_scrape {
            set.register(&mut r);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    fn alive_tasks(text: &str) -> Option<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix("meshfed_runtime_alive_tasks "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Scrapes are served on the runtime they count (current-thread here,
    /// so counts are exact).
    #[tokio::test]
    async fn the_alive_tasks_gauge_follows_the_runtime_at_scrape_time() {
        let m = Metrics::new(&[]);
        let before = alive_tasks(&m.encode(&[])).unwrap_or(-1);
        assert!(before >= 0, "gauge missing:\n{}", m.encode(&[]));
        let parked: Vec<_> = (0..5)
            .map(|_| tokio::spawn(std::future::pending::<()>()))
            .collect();
        assert_eq!(alive_tasks(&m.encode(&[])), Some(before + 5));
        for t in parked {
            t.abort();
            let _ = t.await;
        }
        assert_eq!(alive_tasks(&m.encode(&[])), Some(before));
    }

    /// Values read at scrape time (refusals counted by the verifiers, the
    /// links) come out of prometheus-client like every other series: one
    /// `# EOF`, at the end, and every reason present even at 0.
    #[test]
    fn scrape_time_values_are_encoded_by_prometheus_client_with_one_eof() {
        use super::RefusalReader;
        use crate::tunnel::LinkGauges;
        use crate::tunnel::link::LinkStatus;
        let m = Metrics::new(&[]);
        m.set_handshake_refusals(RefusalReader(Box::new(|| {
            vec![("unknown_ca", 3), ("cluster_mismatch", 0)]
        })));
        let link = LinkStatus {
            cluster: "west".into(),
            target: "10.0.0.2:15443".into(),
            remote: None,
            transport: crate::tunnel::link::Transport::Quic,
            up: true,
            available: true,
            draining: false,
            rtt_ms: Some(1.5),
            lost_packets: 7,
            open_streams: 2,
            connects: 1,
            announced_config: None,
            announced_services: 0,
            last_error: None,
            loss: Default::default(),
        };
        let text = m.encode(&[&LinkGauges(&[link])]);
        for line in [
            "meshfed_handshake_refusals_total{reason=\"unknown_ca\"} 3",
            "meshfed_handshake_refusals_total{reason=\"cluster_mismatch\"} 0",
            "meshfed_peer_link_up{cluster=\"west\",target=\"10.0.0.2:15443\",transport=\"quic\"} 1.0",
            "meshfed_peer_rtt_seconds{cluster=\"west\",target=\"10.0.0.2:15443\",transport=\"quic\"} 0.0015",
            "meshfed_peer_lost_packets{cluster=\"west\",target=\"10.0.0.2:15443\",transport=\"quic\"} 7.0",
            "meshfed_peer_open_streams{cluster=\"west\",target=\"10.0.0.2:15443\",transport=\"quic\"} 2.0",
            "# TYPE meshfed_peer_link_up gauge",
            "# TYPE meshfed_handshake_refusals counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        // No datagram reader set: the family is absent, not empty noise.
        assert!(!text.contains("udp_datagrams_dropped"), "{text}");
    }

    /// A request's series is found again by its borrowed labels: the
    /// counter and histogram the families expose count every request, the
    /// first of a label set and those past the table's bound included.
    #[test]
    fn requests_are_counted_in_their_series_through_the_table_and_past_its_bound() {
        use super::{MAX_SERIES, RequestKey};
        let m = Metrics::new(&[]);
        let key = |code: u16, grpc: &'static str| RequestKey {
            direction: "outbound",
            source_cluster: "east",
            destination_cluster: "west",
            destination_service: "ratings.default.svc.cluster.local",
            response_code: code,
            grpc_response_status: grpc,
            reason: "",
        };
        for _ in 0..3 {
            m.record_request(key(200, ""), 0.002);
        }
        m.record_request(key(503, ""), 0.2);
        let text = m.encode(&[]);
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("no `{needle}` in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            line(
                "meshfed_requests_total{direction=\"outbound\",source_cluster=\"east\",destination_cluster=\"west\",destination_service=\"ratings.default.svc.cluster.local\",response_code=\"200\""
            ),
            "3"
        );
        assert_eq!(
            line(
                "meshfed_requests_total{direction=\"outbound\",source_cluster=\"east\",destination_cluster=\"west\",destination_service=\"ratings.default.svc.cluster.local\",response_code=\"503\""
            ),
            "1"
        );
        assert_eq!(
            line(
                "meshfed_request_duration_seconds_count{direction=\"outbound\",destination_cluster=\"west\",destination_service=\"ratings.default.svc.cluster.local\"}"
            ),
            "4"
        );
        // Ever new label sets (a backend's arbitrary grpc-status strings):
        // the table stops at its bound, the counts do not.
        let statuses: Vec<&'static str> = (0..MAX_SERIES + 10)
            .map(|i| &*Box::leak(i.to_string().into_boxed_str()))
            .collect();
        for s in &statuses {
            m.record_request(key(200, s), 0.001);
        }
        m.record_request(key(200, statuses[MAX_SERIES + 5]), 0.001);
        assert_eq!(m.series.lock().unwrap().len(), MAX_SERIES);
        let text = m.encode(&[]);
        let last = format!("grpc_response_status=\"{}\"", statuses[MAX_SERIES + 5]);
        let counted = text
            .lines()
            .find(|l| l.starts_with("meshfed_requests_total") && l.contains(&last))
            .unwrap();
        assert!(counted.ends_with(" 2"), "{counted}");
    }
}
