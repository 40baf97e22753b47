//! The per-rule request edits a source gateway makes before forwarding, as
//! Istio's VirtualService defines them: header manipulation
//! (`headers.request|response.set|add|remove`, at the rule and at the
//! chosen destination), `rewrite` (URI prefix and authority), and the
//! authority a mirrored copy gets. Pure functions on a request head.
//!
//! Mirroring (`mirror`/`mirrors` with `mirrorPercentage`) is decided by
//! [`super::plan`] and sent by [`super::outbound`]: fire-and-forget, each
//! copy in its own task, bounded in time and in number, its response read a
//! chunk at a time (at most 1 MiB) and dropped, and nothing about it reaches
//! the caller. Like Envoy, the copy's authority gets a `-shadow` suffix so
//! that the mirror's backend can tell copies from real calls. A request
//! body is copied only when the source gateway buffered it (bodiless
//! requests and bodies up to the retry buffer size); a streaming body is
//! not mirrored, and the metric says so.
//!
//! It does not choose where a request goes ([`crate::route`],
//! [`super::plan`]) or move it ([`super::outbound`]).

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use meshfed_policy::snapshot::{HeaderOps, HttpRoute, StringMatch};

/// A request head, kept to send the request again (a retry or a mirror).
pub type Head = (Method, Uri, Version, HeaderMap);

/// Applies Istio header operations: `set` replaces, `add` appends, `remove`
/// deletes. Names or values that are not valid HTTP are skipped (validation
/// refuses them before they reach a gateway).
pub fn apply_headers(headers: &mut HeaderMap, ops: &HeaderOps) {
    for (k, v) in &ops.set {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v)) {
            headers.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v)) {
            headers.append(k, v);
        }
    }
    for k in &ops.remove {
        headers.remove(k.as_str());
    }
}

/// Applies a rule's `rewrite` to `uri` and `authority`: the URI prefix that
/// the rule's matching `uri.prefix` named is replaced (the whole path when
/// the match was not a prefix), and the query string is kept.
pub fn rewrite(rule: &HttpRoute, uri: &mut Uri, authority: &mut String) {
    let Some(rw) = &rule.rewrite else {
        return;
    };
    if let Some(to) = &rw.uri {
        let path = uri.path();
        let prefix = rule.matches.iter().find_map(|m| match &m.uri {
            Some(StringMatch::Prefix(p)) if path.starts_with(p.as_str()) => Some(p.as_str()),
            _ => None,
        });
        let new_path = match prefix {
            Some(p) => format!("{to}{}", &path[p.len()..]),
            None => to.clone(),
        };
        let pq = match uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        let mut parts = uri.clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(u) = Uri::from_parts(parts) {
                *uri = u;
            }
        }
    }
    if let Some(a) = &rw.authority {
        *authority = a.clone();
    }
}

/// Makes `authority` the request's authority: the `Host` header, and the
/// URI's authority when it has one (HTTP/2 requests carry `:authority`).
pub fn set_authority(uri: &mut Uri, headers: &mut HeaderMap, authority: &str) {
    if let Ok(v) = HeaderValue::try_from(authority) {
        headers.insert(http::header::HOST, v);
    }
    if uri.authority().is_some() {
        let mut parts = uri.clone().into_parts();
        if let Ok(a) = authority.parse() {
            parts.authority = Some(a);
            if let Ok(u) = Uri::from_parts(parts) {
                *uri = u;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_policy::snapshot::{HttpMatch, Rewrite};

    #[test]
    fn header_ops_set_add_and_remove() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("old"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let ops = HeaderOps {
            set: [("x-a".to_string(), "new".to_string())].into(),
            add: [("x-b".to_string(), "1".to_string())].into(),
            remove: vec!["x-gone".into()],
        };
        apply_headers(&mut h, &ops);
        assert_eq!(h.get("x-a").map(|v| v.as_bytes()), Some(&b"new"[..]));
        assert_eq!(h.get("x-b").map(|v| v.as_bytes()), Some(&b"1"[..]));
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn rewrite_replaces_the_matched_prefix_and_keeps_the_query() {
        let rule = HttpRoute {
            matches: vec![HttpMatch {
                uri: Some(StringMatch::Prefix("/v1/".into())),
                ..Default::default()
            }],
            rewrite: Some(Rewrite {
                uri: Some("/api/".into()),
                authority: Some("reviews.prod".into()),
            }),
            ..Default::default()
        };
        let mut uri: Uri = "/v1/items?x=1".parse().unwrap_or_default();
        let mut authority = "reviews".to_string();
        rewrite(&rule, &mut uri, &mut authority);
        assert_eq!(uri.to_string(), "/api/items?x=1");
        assert_eq!(authority, "reviews.prod");
    }
}
