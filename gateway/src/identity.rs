//! Workload and gateway identity. Lands with the identity and mTLS issue.
//!
//! It will own loading the shared trust anchor and this cluster's
//! intermediate CA, issuing and rotating the gateway's certificate, SPIFFE ID
//! parsing (`spiffe://<td>/ns/<ns>/sa/<sa>` and the reserved
//! `spiffe://<td>/meshfed/cluster/<cluster>/gateway/<id>`), the rustls client
//! and server configurations, and the verifier rule that a leaf's cluster
//! matches its issuer's. It will also enforce the trust-domain rule for
//! forwarded caller identities.
//!
//! It does not own connections ([`crate::tunnel`]) or authorization
//! decisions ([`crate::route`] and [`crate::proxy`] apply the snapshot's
//! policies).
