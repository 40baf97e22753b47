//! Routing and resilience. Lands with the routing issue.
//!
//! It will own matching a request against the snapshot's routes
//! (VirtualService semantics), weighted splits across subsets and clusters,
//! retries and timeouts, load balancing, outlier detection, and failover from
//! local to remote endpoints. A request reads one snapshot at its start and
//! uses it to the end.
//!
//! It does not own the policy rules themselves (the `meshfed-policy` crate
//! validates and compiles them; this module only reads the result), where
//! endpoints come from ([`crate::discovery`]), or moving bytes
//! ([`crate::proxy`], [`crate::tunnel`]).
