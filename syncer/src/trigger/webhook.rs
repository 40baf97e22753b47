//! Webhook requests from Git hosts: signature headers, their verification,
//! and the push event's payload. Pure functions of (secret, headers, body).
//!
//! - GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`.
//! - Gitea / Forgejo: `X-Gitea-Signature` / `X-Forgejo-Signature: <hex
//!   HMAC-SHA256 of the body>`.
//! - GitLab: `X-Gitlab-Token: <the secret itself>`.
//!
//! Every signature header present must verify; none present is a refusal.
//! All comparisons are constant-time. The payload is read only for the
//! pushed `ref`, after the signature has been checked.
//!
//! **Dependency rule.** This file may use only `std`, `http`, `hmac`,
//! `sha2`, `subtle`, `hex` and `serde_json`, and nothing of the syncer
//! (no `crate::` paths, not even in doc links). `syncer/fuzz` compiles it on
//! its own with `#[path]`, so that the fuzz build does not pull in libgit2,
//! tonic, quinn or kube (docs/fuzzing.md, "Syncer target"). For the same
//! reason the error type implements `Display` by hand instead of deriving it
//! with `thiserror`.
//!
//! It does not own the shared secret's storage (`git::Secret`), the HTTP
//! route (`status`) or what a verified push triggers (`trigger`).

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// GitHub's signature header.
pub const GITHUB_HEADER: &str = "x-hub-signature-256";
/// Gitea's signature header.
pub const GITEA_HEADER: &str = "x-gitea-signature";
/// Forgejo's signature header (same scheme as Gitea's; Forgejo sends both).
pub const FORGEJO_HEADER: &str = "x-forgejo-signature";
/// GitLab's secret-token header.
pub const GITLAB_HEADER: &str = "x-gitlab-token";

/// Every header [`verify`] reads, in the order it checks them.
pub const SIGNATURE_HEADERS: [&str; 4] =
    [GITHUB_HEADER, GITEA_HEADER, FORGEJO_HEADER, GITLAB_HEADER];

/// The webhook providers whose signatures are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GitHub,
    GitLab,
    Gitea,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::GitHub => "github",
            Provider::GitLab => "gitlab",
            Provider::Gitea => "gitea",
        }
    }

    /// The provider whose header `name` (lowercase) is.
    pub fn of_header(name: &str) -> Option<Provider> {
        match name {
            GITHUB_HEADER => Some(Provider::GitHub),
            GITEA_HEADER | FORGEJO_HEADER => Some(Provider::Gitea),
            GITLAB_HEADER => Some(Provider::GitLab),
            _ => None,
        }
    }
}

/// Why a webhook request is refused (all map to 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookError {
    /// No signature header at all.
    Missing,
    /// A signature header is well formed but does not match.
    Forged(Provider),
    /// A signature header cannot be read (not `sha256=` + hex, not hex).
    Malformed(Provider),
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WebhookError::Missing => f.write_str(
                "no signature header (X-Hub-Signature-256, X-Gitea-Signature, \
                 X-Forgejo-Signature or X-Gitlab-Token)",
            ),
            WebhookError::Forged(p) => write!(f, "the {} signature does not match", p.as_str()),
            WebhookError::Malformed(p) => {
                write!(f, "the {} signature header is malformed", p.as_str())
            }
        }
    }
}

impl std::error::Error for WebhookError {}

/// Verifies a webhook request against the shared secret; returns the
/// provider whose header came first (GitHub, Gitea, GitLab order). The first
/// header that fails, in that order, names the error.
pub fn verify(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> Result<Provider, WebhookError> {
    let mut first = None;
    if let Some(v) = headers.get(GITHUB_HEADER) {
        let p = Provider::GitHub;
        let hex_sig = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().strip_prefix("sha256="))
            .ok_or(WebhookError::Malformed(p))?;
        check_hmac(secret, body, hex_sig, p)?;
        first.get_or_insert(p);
    }
    for name in [GITEA_HEADER, FORGEJO_HEADER] {
        if let Some(v) = headers.get(name) {
            let p = Provider::Gitea;
            let hex_sig = v.to_str().map_err(|_| WebhookError::Malformed(p))?;
            check_hmac(secret, body, hex_sig.trim(), p)?;
            first.get_or_insert(p);
        }
    }
    if let Some(v) = headers.get(GITLAB_HEADER) {
        let p = Provider::GitLab;
        // GitLab sends the secret itself; compare in constant time (only
        // the length can leak, as with any fixed secret).
        if !bool::from(v.as_bytes().ct_eq(secret)) {
            return Err(WebhookError::Forged(p));
        }
        first.get_or_insert(p);
    }
    first.ok_or(WebhookError::Missing)
}

fn check_hmac(key: &[u8], body: &[u8], hex_sig: &str, p: Provider) -> Result<(), WebhookError> {
    let sig = hex::decode(hex_sig).map_err(|_| WebhookError::Malformed(p))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| WebhookError::Malformed(p))?;
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&sig).map_err(|_| WebhookError::Forged(p))
}

/// The `ref` a push event names, if the body is a JSON push event
/// (GitHub, GitLab and Gitea all use `"ref": "refs/heads/main"`): the
/// top-level `ref` member when it is a string (the last one if repeated).
pub fn pushed_ref(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("ref")?.as_str().map(str::to_string)
}

/// `sha256=<hex>` for a body, as GitHub signs it; for tests and tools.
pub fn github_signature(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hmac_hex(secret, body))
}

/// Hex HMAC-SHA256 of a body, as Gitea signs it.
pub fn hmac_hex(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in GitHub's documentation ("Validating webhook
    /// deliveries"): secret, payload and the signature GitHub sends.
    #[test]
    fn githubs_documented_example_signature_verifies() {
        let secret = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(github_signature(secret, body), sig);
        let mut h = HeaderMap::new();
        h.insert(GITHUB_HEADER, http::HeaderValue::from_static(sig));
        assert_eq!(verify(secret, &h, body), Ok(Provider::GitHub));
    }

    #[test]
    fn every_signature_header_belongs_to_its_provider() {
        assert_eq!(Provider::of_header(GITHUB_HEADER), Some(Provider::GitHub));
        assert_eq!(Provider::of_header(GITEA_HEADER), Some(Provider::Gitea));
        assert_eq!(Provider::of_header(FORGEJO_HEADER), Some(Provider::Gitea));
        assert_eq!(Provider::of_header(GITLAB_HEADER), Some(Provider::GitLab));
        assert_eq!(Provider::of_header("x-hub-signature"), None);
    }

    #[test]
    fn pushed_ref_takes_the_top_level_string_member_only() {
        assert_eq!(
            pushed_ref(br#"{"ref":"a","ref":"b"}"#).as_deref(),
            Some("b")
        );
        assert_eq!(pushed_ref(br#"{"ref":5}"#), None);
        assert_eq!(pushed_ref(br#"{"x":{"ref":"a"}}"#), None);
        assert_eq!(pushed_ref(br#"["ref"]"#), None);
    }
}
