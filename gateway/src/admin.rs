//! The admin server. Lands with the admin and metrics issue.
//!
//! It will own the HTTP admin endpoint: liveness and readiness, Prometheus
//! metrics (one registry under the `meshfed` prefix, with Istio's label
//! names plus `source_cluster` and `destination_cluster`), and a dump of the
//! applied snapshot. It binds to localhost unless configured otherwise, and
//! then needs a bearer token or mTLS.
//!
//! It does not own the metrics' definitions: each area registers its own.

/// The TCP port of the admin server by default, as Istio's agent serves
/// health and merged metrics on 15020.
pub const DEFAULT_PORT: u16 = 15020;
