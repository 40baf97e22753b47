//! Rollout status. Lands with the rollout status issue.
//!
//! It will own, per commit, which clusters and gateways ACKed, NACKed or are
//! still pending (a known gateway is one connected now or seen recently; a
//! disconnected one counts as pending); the HTTP listener that serves the
//! status API, metrics and the webhook route; and the client behind
//! `meshfed-syncer status --wait SHA`. The listener binds to localhost unless
//! configured otherwise; exposed, everything but the signed webhook needs a
//! bearer token or mTLS.
//!
//! It does not own the webhook's logic ([`crate::trigger`]) or the gRPC
//! stream the ACKs arrive on ([`crate::server`]).

/// The TCP port of the HTTP listener (webhook, status, metrics) by default,
/// as istiod serves its HTTP monitoring endpoints on 15014.
pub const DEFAULT_HTTP_PORT: u16 = 15014;
