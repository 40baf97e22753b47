//! Fetch triggers. Lands with the webhook and poll issue.
//!
//! It will own the two reasons to fetch: the webhook (a push notification
//! whose HMAC signature is checked against a shared secret before anything
//! else is read) and a poll timer as the fallback. Bursts of pushes coalesce
//! into one fetch of the newest commit.
//!
//! It does not own the HTTP listener the webhook route is mounted on
//! ([`crate::status`]) or the fetch itself ([`crate::git`]).
