//! The tunnel between gateways: QUIC links, and HTTP/2-over-TLS links on
//! TCP where UDP is blocked ([`tcp`]), carrying the same streams
//! ([`stream`]).
//!
//! It owns the quinn endpoint and the TCP listener, one long-lived connection per peer
//! gateway (the peer pool), keep-alive and dead-peer detection, the
//! per-stream header that carries the destination and the caller's identity,
//! the framing of HTTP and TCP over streams (documented in docs/tunnel.md,
//! with a fuzzed decoder), and the endpoint summaries peers announce.
//!
//! It does not own certificates or their verification ([`crate::identity`]),
//! the frame and announcement codecs ([`crate::wire`]), choosing a
//! destination ([`crate::route`]), or the local listener ([`crate::proxy`]).

pub mod link;
pub mod loss;
pub mod socket;
pub mod stream;
pub mod tcp;

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use link::LinkStatus;

/// The UDP port the tunnel listens on by default, as Istio's east-west
/// gateway does for cross-network traffic.
pub const DEFAULT_PORT: u16 = 15443;

/// One peer link, for the gauges read from the tunnel at scrape time.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    cluster: String,
    target: String,
    /// `quic` or `tcp` (`--link-transport`): the link's connection's, or
    /// when it is down the one it dials.
    transport: &'static str,
}

/// Reads one per-link gauge value.
type LinkGauge = fn(&LinkStatus) -> Option<f64>;

/// The per-peer link gauges (`meshfed_peer_*`), read from the links'
/// [`LinkStatus`] when `/metrics` is scraped.
#[derive(Debug)]
pub struct LinkGauges<'a>(pub &'a [LinkStatus]);

impl crate::metrics::Register for LinkGauges<'_> {
    fn register(&self, registry: &mut Registry) {
        let gauges: [(&str, &str, LinkGauge); 6] = [
            (
                "peer_link_up",
                "1 when the link to the peer gateway is up and available",
                |l| Some(if l.available { 1.0 } else { 0.0 }),
            ),
            (
                "peer_rtt_seconds",
                "Smoothed round-trip time of the link",
                |l| l.rtt_ms.map(|r| r / 1e3),
            ),
            (
                "peer_lost_packets",
                "Packets lost on the link's current connection",
                |l| Some(l.lost_packets as f64),
            ),
            ("peer_open_streams", "Streams open on the link", |l| {
                Some(l.open_streams as f64)
            }),
            (
                "peer_loss_ratio",
                "Share of the packets this gateway sent on the link that were lost, over the loss window (30 s by default)",
                |l| l.up.then_some(l.loss.ratio).flatten(),
            ),
            (
                "peer_random_loss",
                "1 when the link shows sustained random loss: loss of at least 0.5% over the window with a flat RTT (docs/operations.md, \"Lossy links\")",
                |l| Some(if l.loss.random_loss { 1.0 } else { 0.0 }),
            ),
        ];
        for (name, help, get) in gauges {
            let family = Family::<LinkLabels, Gauge<f64, AtomicU64>>::default();
            for l in self.0 {
                if let Some(v) = get(l) {
                    family
                        .get_or_create(&LinkLabels {
                            cluster: l.cluster.clone(),
                            target: l.target.clone(),
                            transport: l.transport.as_str(),
                        })
                        .set(v);
                }
            }
            registry.register(name, help, family);
        }
    }
}
