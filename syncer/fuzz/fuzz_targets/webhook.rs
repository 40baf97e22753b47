//! Fuzzes the syncer's webhook handling: signature headers and their
//! verification for GitHub, GitLab and Gitea/Forgejo, and the push
//! payload's `ref`. See `../checks.rs` for the input framing and the
//! properties checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

// The syncer's own module, compiled here on its own: it depends only on
// std, http, hmac, sha2, subtle, hex and serde_json, so this build pulls in
// none of libgit2, tonic, quinn or kube.
#[path = "../../src/trigger/webhook.rs"]
#[allow(dead_code)]
mod webhook;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_webhook(data));
