//! meshfed's syncer: the control plane.
//!
//! It pulls mesh policy from a Git repository, validates the whole
//! federation, compiles one atomic snapshot per commit and per cluster with
//! the `meshfed-policy` crate, pushes it over gRPC to every gateway, and
//! tracks which gateways have ACKed which commit.
//!
//! Modules, in the order a commit flows through them:
//! - [`trigger`]: when to look at the remote (webhook, poll), one sync at a
//!   time, pushes during a sync coalesced;
//! - [`git`]: the bare mirror, fetching, reading a commit's files, signatures;
//! - [`pipeline`]: commit files → validated snapshots, or a rejection;
//!   persistence of the last good snapshots;
//! - [`waves`]: which commit each cluster is served; a commit's run
//!   through the waves of its `RolloutPolicy`, its gates and rollbacks;
//! - [`golden`]: the gateways' golden metrics, reported on their streams,
//!   that the gates judge;
//! - [`rollout`]: the contract between the pipeline, the config server and
//!   the status API;
//! - [`server`]: the gRPC config server that gateways stream from;
//! - [`status`]: per-commit rollout views, the HTTP listener (webhook,
//!   status, metrics) and the `status` client;
//! - [`metrics`]: the syncer's Prometheus metrics.

// `unsafe` is denied everywhere but `git::timeouts` (libgit2 socket options).
#![deny(unsafe_code)]

pub mod git;
pub mod golden;
pub mod metrics;
pub mod pipeline;
pub mod rollout;
pub mod server;
pub mod status;
pub mod trigger;
pub mod waves;
