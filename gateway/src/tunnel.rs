//! The QUIC tunnel between gateways. Lands with the QUIC links issue.
//!
//! It will own the quinn endpoint, one long-lived connection per peer
//! gateway (the peer pool), keep-alive and dead-peer detection, the
//! per-stream header that carries the destination and the caller's identity,
//! the framing of HTTP and TCP over streams (documented in docs/tunnel.md,
//! with a fuzzed decoder), and the endpoint summaries peers announce.
//!
//! It does not own certificates or their verification ([`crate::identity`]),
//! the frame and announcement codecs ([`crate::wire`]), choosing a
//! destination ([`crate::route`]), or the local listener ([`crate::proxy`]).

pub mod link;
pub mod socket;

/// The UDP port the tunnel listens on by default, as Istio's east-west
/// gateway does for cross-network traffic.
pub const DEFAULT_PORT: u16 = 15443;
