//! Proxying of local traffic. Lands with the HTTP and TCP proxy issues.
//!
//! It will own the outbound listener that local clients connect to,
//! protocol detection (HTTP/1.1, HTTP/2 with prior knowledge, raw TCP), HTTP
//! forwarding with hyper and TCP splicing, the inbound side that serves
//! streams arriving from peers, authorization, and the mapping of every
//! failure to a proper HTTP or gRPC status with a header naming the
//! gateway's reason.
//!
//! It does not own the choice of destination ([`crate::route`]) or the
//! transport between clusters ([`crate::tunnel`]).

/// The TCP port of the outbound listener by default, Istio's outbound
/// capture port.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
