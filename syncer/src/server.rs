//! The gRPC config server. Lands with the config delivery issue.
//!
//! It will own the streaming call that every gateway opens (tonic, over mTLS
//! from the shared trust anchor): it reads `Hello{cluster, gateway_id,
//! applied_version}`, sends the cluster's current snapshot and every later
//! one, and records each ACK or NACK with its reason. The gateway's cluster
//! is taken from its verified certificate, not from what it claims.
//!
//! It does not compile snapshots ([`crate::pipeline`]) or answer questions
//! about rollouts ([`crate::status`]).

/// The TCP port of the gRPC config server by default, as istiod serves xDS
/// over mTLS on 15012.
pub const DEFAULT_GRPC_PORT: u16 = 15012;
