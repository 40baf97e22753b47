//! meshfed's east-west gateway: the data plane.
//!
//! One or more gateways run per cluster or edge site. They link to the
//! gateways of other clusters over QUIC with mutual TLS, and route
//! service-to-service calls (HTTP/1.1, HTTP/2, gRPC, raw TCP) across them,
//! following the per-cluster snapshot the syncer pushes.
//!
//! Modules, in layers that only point down (a module uses its own layer,
//! without a cycle, or lower ones; `tests/layers.rs` holds the table):
//!
//! 0. base: [`metrics`] (the registry; each module registers its
//!    own set), [`limits`], [`backoff`], [`body_budget`] (peers' bodies in
//!    flight), [`retry_budget`] (retries in flight), [`endpoints`] (local endpoints as a value), [`wire`] (the
//!    frame and announcement codecs);
//! 1. decisions, pure: [`route`] (matching, splits, locality, mirror
//!    names), [`authz`] (the AuthorizationPolicy engine), [`peer_auth`]
//!    (PeerAuthentication);
//! 2. I/O: [`tunnel`] (QUIC links to peer gateways), [`discovery`] (static
//!    file, DNS, Kubernetes, ServiceEntry), [`upstream`] (balancer and
//!    pooled clients of local endpoints), [`accept`] (listeners' connection
//!    limit), [`trace`] (spans, propagation, OTLP), [`body`] (bodies across
//!    the tunnel), [`respond`] (the responses the gateway writes itself),
//!    [`changes`] (inotify-driven checks of the file inputs);
//! 3. state: [`state`] (the shared `Gateway`: snapshot, endpoints, tunnel,
//!    upstream), [`control`] (the config client that applies snapshots);
//! 4. data path: [`proxy`] (outbound listener, inbound streams, admission,
//!    rules);
//! 5. side tasks: [`mirror`] (the Kubernetes mirror-Service reconciler);
//! 6. wiring: [`run`] (starts everything), [`admin`] (health, readiness,
//!    metrics, config dump).
//!
//! Certificates, SPIFFE IDs and the TLS configuration are the
//! [`identity`] crate's.
//!
//! Cargo features, all on by default: `kube` (Kubernetes discovery, the
//! ServiceExport gate and mirror Services: kube-rs, k8s-openapi), `dns`
//! (host names anywhere an address is written: hickory-resolver) and `otel`
//! (span export over OTLP: the OpenTelemetry SDK). Without them
//! (`--no-default-features`) the gateway runs an edge site with static
//! discovery and IP addresses; a flag that needs a missing feature is
//! refused at start, naming it (docs/operations.md, "Build features").

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
pub mod changes;
pub mod control;
pub mod discovery;
pub mod endpoints;
pub mod limits;
pub mod metrics;
#[cfg(feature = "kube")]
pub mod mirror;
pub mod peer_auth;
pub mod proxy;
pub mod respond;
pub mod retry_budget;
pub mod route;
pub mod run;
pub mod state;
pub mod trace;
pub mod tunnel;
pub mod upstream;
pub mod wire;
