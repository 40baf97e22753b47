//! The commit pipeline. Lands with the pipeline issue.
//!
//! It will own turning a checked-out commit into one snapshot per declared
//! cluster, stamped with the commit SHA: load, validate and compile through
//! the `meshfed-policy` crate. A commit with any error is rejected as a
//! whole, the last good snapshots stay in force, and the diagnostics are kept
//! for the status API. The last good snapshots are persisted, so a restarted
//! syncer serves them before its first fetch.
//!
//! It does not re-implement any policy rule (the `meshfed-policy` crate owns
//! them all), and it does not deliver snapshots ([`crate::server`]).
