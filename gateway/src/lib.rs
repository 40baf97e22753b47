//! meshfed's east-west gateway: the data plane.
//!
//! One or more gateways run per cluster or edge site. They link to the
//! gateways of other clusters over QUIC with mutual TLS, and route
//! service-to-service calls (HTTP/1.1, HTTP/2, gRPC, raw TCP) across them,
//! following the per-cluster snapshot the syncer pushes.
//!
//! The crate is a skeleton for now: each module below says what it will own
//! and which issue brings it. Nothing here listens, connects or proxies yet.
//!
//! Modules, from the wire inwards:
//! - [`tunnel`]: QUIC links to peer gateways and the stream protocol on them;
//! - [`identity`]: certificates, SPIFFE IDs and the TLS configuration;
//! - [`proxy`]: the outbound listener and HTTP/TCP forwarding;
//! - [`route`]: picking a destination for a call from the snapshot;
//! - [`discovery`]: local endpoints (static file, DNS, Kubernetes);
//! - [`control`]: the config client that receives snapshots from the syncer;
//! - [`mirror`]: mirror Services that make remote services reachable in
//!   a cluster under ordinary names;
//! - [`admin`]: health, readiness, metrics and the config dump;
//! - [`accept`], [`limits`]: the caller-connection limit and the open-files
//!   budget;
//! - [`backoff`]: the exponential backoff of every retry loop;
//! - [`trace`]: distributed tracing: a span per hop, W3C/B3 propagation, OTLP.

#![forbid(unsafe_code)]

/// The write half of a stream wrapper (one copy, shared with the syncer).
pub use meshfed_cli::delegate_async_write;
/// Certificates, SPIFFE IDs and the TLS configuration: the
/// `meshfed-identity` crate, under the path the gateway's modules use.
pub use meshfed_identity as identity;

pub mod accept;
pub mod admin;
pub mod authz;
pub mod backoff;
pub mod body;
pub mod body_budget;
pub mod control;
pub mod discovery;
pub mod endpoints;
pub mod limits;
pub mod metrics;
pub mod mirror;
pub mod peer_auth;
pub mod proxy;
pub mod respond;
pub mod route;
pub mod run;
pub mod state;
pub mod trace;
pub mod tunnel;
pub mod upstream;
pub mod wire;
