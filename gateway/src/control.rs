//! The config client. Lands with the config delivery issue.
//!
//! It will own the streaming gRPC call to the syncer (tonic, over mTLS):
//! `Hello{cluster, gateway_id, applied_version}`, receiving snapshots,
//! checking and applying each one atomically (one swap of an `Arc`), ACK or
//! NACK with the reason, and persisting the last good snapshot so that a
//! gateway restarted without its syncer serves what it last applied.
//!
//! It does not own compiling policy (the syncer does, with the
//! `meshfed-policy` crate) or using the snapshot ([`crate::route`]).
