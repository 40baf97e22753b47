//! meshfed's syncer: the control plane.
//!
//! It pulls mesh policy from a Git repository, validates the whole
//! federation, compiles one atomic snapshot per commit and per cluster with
//! the `meshfed-policy` crate, pushes it over gRPC to every gateway, and
//! tracks which gateways have ACKed which commit.
//!
//! The crate is a skeleton for now: each module below says what it will own
//! and which issue brings it. Nothing here fetches, listens or pushes yet.
//!
//! Modules, in the order a commit flows through them:
//! - [`trigger`]: when to look at the remote (webhook, poll);
//! - [`git`]: fetching and checking out a commit;
//! - [`pipeline`]: commit tree → validated snapshots, or a rejection;
//! - [`server`]: the gRPC config server that gateways stream from;
//! - [`status`]: rollout tracking, the status API and its CLI.

#![forbid(unsafe_code)]

pub mod git;
pub mod pipeline;
pub mod rollout;
pub mod server;
pub mod status;
pub mod trigger;
