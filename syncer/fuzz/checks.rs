//! The properties the `webhook` fuzz target checks.
//!
//! This file is compiled twice, with `#[path]`: into the fuzz target
//! (`fuzz_targets/webhook.rs`, nightly, libFuzzer) and into the replay test
//! `syncer/tests/fuzz_corpus.rs` (stable, plain `cargo test`). So the
//! committed corpus is checked in CI by exactly the code the fuzzer ran, with
//! no copy to drift. It may only use `std`, `http`, `hmac`, `sha2`,
//! `serde_json` and a sibling module `webhook` (the fuzz target compiles
//! `syncer/src/trigger/webhook.rs` itself; the test imports the syncer's).
//!
//! A check fails by panicking, which libFuzzer reports as a crash and the
//! test as a failure. Panic messages name providers, positions and sizes,
//! never a whole body.
//!
//! ## The input
//!
//! A webhook request in a small text framing, so that seeds are readable
//! and a mutated input still means something:
//!
//! ```text
//! <secret>\n
//! <name>: <value>\n        (zero or more header lines)
//! \n
//! <body>                   (the rest, any bytes)
//! ```
//!
//! A trailing `\r` is removed from the secret and from each header line. A
//! header line that is not `name: value`, or whose name or value the `http`
//! crate refuses, is skipped: hyper refuses such a request before the
//! syncer sees it. Values are trimmed of spaces and tabs, as hyper does.
//! Without an empty line everything after the secret is headers and the
//! body is empty.

use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

use super::webhook::{self, Provider, SIGNATURE_HEADERS, WebhookError};

/// A webhook request as the input frames it.
#[derive(Debug, Default)]
pub struct Request {
    pub secret: Vec<u8>,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Reads the framing described at the top of this file.
pub fn parse_input(data: &[u8]) -> Request {
    let mut request = Request::default();
    let (secret, mut rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[data.len()..]),
    };
    request.secret = strip_cr(secret).to_vec();
    loop {
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        let line = strip_cr(line);
        if line.is_empty() {
            request.body = next.to_vec();
            return request;
        }
        if let Some((name, value)) = header_line(line) {
            request.headers.append(name, value);
        }
        rest = next;
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn header_line(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = HeaderName::from_bytes(&line[..colon]).ok()?;
    let value = line[colon + 1..].trim_ascii_start();
    let value = trim_ows_end(value);
    let value = HeaderValue::from_bytes(value).ok()?;
    Some((name, value))
}

fn trim_ows_end(mut v: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// `webhook`: the bytes are a request in the framing above.
///
/// 1. `verify`, `pushed_ref` and the signing helpers never panic.
/// 2. `verify` decides exactly as the documented rules say ([`expected`], an
///    independent model: every signature header present must verify, in the
///    order GitHub, Gitea, Forgejo, GitLab; the first failure names the
///    error; none present is `Missing`).
/// 3. For the input's secret and body, a request signed for each provider
///    verifies, and the same request with one byte of the body or of the
///    signature changed is refused ([`check_signed`]; the positions and new
///    bytes are derived from a hash of the input, so the fuzzer varies them).
/// 4. The push payload parses consistently ([`check_payload`]).
pub fn check_webhook(data: &[u8]) {
    let request = parse_input(data);
    let got = webhook::verify(&request.secret, &request.headers, &request.body);
    let want = expected(&request.secret, &request.headers, &request.body);
    assert!(
        got == want,
        "verify says {got:?} where the documented rules say {want:?} (headers: {}; {}-byte body, \
         {}-byte secret)",
        signature_headers_present(&request.headers),
        request.body.len(),
        request.secret.len()
    );
    let h = fnv1a(data);
    let body_change = (h as usize, nonzero(h >> 32));
    let sig_change = ((h >> 16) as usize, (h >> 48) as u8);
    check_signed(
        &request.secret,
        &request.body,
        &[body_change],
        &[sig_change],
        h & 1 == 0,
    );
    check_payload(&request.body);
}

/// The signature headers present, for messages.
fn signature_headers_present(headers: &HeaderMap) -> String {
    let present: Vec<&str> = SIGNATURE_HEADERS
        .iter()
        .copied()
        .filter(|n| headers.contains_key(*n))
        .collect();
    if present.is_empty() {
        "none".to_string()
    } else {
        present.join(", ")
    }
}

/// What `verify` must return, from the rules in docs/syncer.md ("Webhook
/// setup"), written without the `webhook` module's helpers: its own hex
/// parser, the HMAC computed once.
pub fn expected(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> Result<Provider, WebhookError> {
    let mac = hmac_sha256(secret, body);
    let mut first = None;
    for name in SIGNATURE_HEADERS {
        let Some(value) = headers.get(name) else {
            continue;
        };
        let bytes = value.as_bytes();
        let provider = match name {
            webhook::GITHUB_HEADER => Provider::GitHub,
            webhook::GITLAB_HEADER => Provider::GitLab,
            _ => Provider::Gitea,
        };
        if provider == Provider::GitLab {
            // The secret itself, byte for byte.
            if bytes != secret {
                return Err(WebhookError::Forged(provider));
            }
        } else {
            // Visible ASCII (what `HeaderValue::to_str` accepts), trimmed of
            // spaces and tabs; GitHub's carries a `sha256=` prefix; then an
            // even number of hex digits, in either case.
            if !bytes
                .iter()
                .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
            {
                return Err(WebhookError::Malformed(provider));
            }
            let mut text = bytes.trim_ascii();
            if provider == Provider::GitHub {
                match text.strip_prefix(b"sha256=") {
                    Some(rest) => text = rest,
                    None => return Err(WebhookError::Malformed(provider)),
                }
            }
            let Some(sig) = parse_hex(text) else {
                return Err(WebhookError::Malformed(provider));
            };
            if sig != mac {
                return Err(WebhookError::Forged(provider));
            }
        }
        first.get_or_insert(provider);
    }
    first.ok_or(WebhookError::Missing)
}

fn hmac_sha256(key: &[u8], body: &[u8]) -> Vec<u8> {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(body);
            mac.finalize().into_bytes().to_vec()
        }
        Err(e) => panic!("HMAC refused a {}-byte key: {e}", key.len()),
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn parse_hex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks(2)
        .map(|pair| Some((hex_value(pair[0])? << 4) | hex_value(pair[1])?))
        .collect()
}

/// The header a provider signs with; Gitea's or Forgejo's.
fn header_of(provider: Provider, forgejo: bool) -> &'static str {
    match provider {
        Provider::GitHub => webhook::GITHUB_HEADER,
        Provider::Gitea if forgejo => webhook::FORGEJO_HEADER,
        Provider::Gitea => webhook::GITEA_HEADER,
        Provider::GitLab => webhook::GITLAB_HEADER,
    }
}

fn one_header(name: &'static str, value: HeaderValue) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(name, value);
    headers
}

/// Property 3, for one secret and body: for each provider, the request as
/// that provider signs it verifies; with one byte of the body changed
/// (each of `body_changes`: a position, taken modulo the body's length, and
/// a value XORed into that byte, 0 meaning 1) it is refused as forged; with
/// one byte of the signature header's value changed (each of `sig_changes`:
/// a position modulo the value's length, and the new byte) it is refused,
/// except when the change only flips the case of a hex digit (same
/// signature). A change that makes the value unsendable (a control byte) is
/// skipped. `forgejo` picks Forgejo's header over Gitea's.
///
/// GitLab's token is the secret itself and does not depend on the body:
/// changing the body leaves a GitLab request valid (GitLab's scheme does not
/// authenticate the payload; docs/syncer.md says so), and every change to the
/// token is refused.
pub fn check_signed(
    secret: &[u8],
    body: &[u8],
    body_changes: &[(usize, u8)],
    sig_changes: &[(usize, u8)],
    forgejo: bool,
) {
    let mac = hmac_sha256(secret, body);
    let hex_mac: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    let github = webhook::github_signature(secret, body);
    assert!(
        github == format!("sha256={hex_mac}"),
        "github_signature is not `sha256=` + the hex HMAC-SHA256 of the body"
    );
    assert!(
        webhook::hmac_hex(secret, body) == hex_mac,
        "hmac_hex is not the hex HMAC-SHA256 of the body"
    );
    let mut signed: Vec<(Provider, String)> = vec![
        (Provider::GitHub, github),
        (Provider::Gitea, hex_mac.clone()),
    ];
    // GitLab only if the secret can travel as a header value.
    let gitlab = HeaderValue::from_bytes(secret).is_ok();
    if gitlab {
        signed.push((Provider::GitLab, String::new()));
    }
    for (provider, value) in &signed {
        let provider = *provider;
        let name = header_of(provider, forgejo);
        let value: &[u8] = if provider == Provider::GitLab {
            secret
        } else {
            value.as_bytes()
        };
        let Ok(header) = HeaderValue::from_bytes(value) else {
            panic!(
                "the {} signature is not a valid header value",
                provider.as_str()
            );
        };
        let headers = one_header(name, header);
        let got = webhook::verify(secret, &headers, body);
        assert!(
            got == Ok(provider),
            "a request signed as {} sends it with {name} ({}-byte body, {}-byte secret) and \
             verify says {got:?}",
            provider.as_str(),
            body.len(),
            secret.len()
        );
        // One byte of the body changed.
        if !body.is_empty() {
            for &(at, xor) in body_changes {
                let at = at % body.len();
                let mut changed = body.to_vec();
                changed[at] ^= if xor == 0 { 1 } else { xor };
                let got = webhook::verify(secret, &headers, &changed);
                let want = if provider == Provider::GitLab {
                    Ok(Provider::GitLab)
                } else {
                    Err(WebhookError::Forged(provider))
                };
                assert!(
                    got == want,
                    "a {} request with byte {at} of its {}-byte body changed: verify says \
                     {got:?}, expected {want:?}",
                    provider.as_str(),
                    body.len()
                );
            }
        }
        // One byte of the signature changed.
        if value.is_empty() {
            continue;
        }
        for &(at, new) in sig_changes {
            let at = at % value.len();
            let old = value[at];
            if new == old {
                continue;
            }
            let mut changed = value.to_vec();
            changed[at] = new;
            let Ok(header) = HeaderValue::from_bytes(&changed) else {
                continue;
            };
            let got = webhook::verify(secret, &one_header(name, header), body);
            let prefix = if provider == Provider::GitHub { 7 } else { 0 };
            let want = match provider {
                Provider::GitLab => Err(WebhookError::Forged(provider)),
                _ if at < prefix => Err(WebhookError::Malformed(provider)),
                _ => match (hex_value(old), hex_value(new)) {
                    (Some(a), Some(b)) if a == b => Ok(provider),
                    (Some(_), Some(_)) => Err(WebhookError::Forged(provider)),
                    _ => Err(WebhookError::Malformed(provider)),
                },
            };
            assert!(
                got == want,
                "a {} signature ({} bytes, header {name}) with byte {at} changed from 0x{old:02x} \
                 to 0x{new:02x}: verify says {got:?}, expected {want:?}",
                provider.as_str(),
                value.len()
            );
        }
    }
}

/// Property 4: `pushed_ref` agrees with the JSON it reads.
///
/// - It is `Some` only for a JSON object whose top-level `ref` is a string,
///   and then it is that string.
/// - A body that is JSON gives the same answer once re-serialized
///   canonically by serde_json (no whitespace, one member per name).
/// - The ref it returns, put back in a minimal push event, reads back the
///   same.
pub fn check_payload(body: &[u8]) {
    let got = webhook::pushed_ref(body);
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        assert!(
            got.is_none(),
            "pushed_ref found a ref in a {}-byte body that is not JSON",
            body.len()
        );
        return;
    };
    let member = value
        .as_object()
        .and_then(|o| o.get("ref"))
        .and_then(|r| r.as_str());
    assert!(
        got.as_deref() == member,
        "pushed_ref says {:?} but the body's top-level `ref` member is {:?}",
        got.as_ref().map(|r| r.len()),
        member.map(str::len)
    );
    match serde_json::to_vec(&value) {
        Ok(canonical) => {
            let again = webhook::pushed_ref(&canonical);
            assert!(
                again == got,
                "pushed_ref differs after the {}-byte body is re-serialized",
                body.len()
            );
        }
        Err(e) => panic!("a parsed JSON body cannot be serialized again: {e}"),
    }
    if let Some(r) = got {
        let mut event = serde_json::Map::new();
        event.insert("ref".to_string(), serde_json::Value::String(r.clone()));
        match serde_json::to_vec(&serde_json::Value::Object(event)) {
            Ok(minimal) => assert!(
                webhook::pushed_ref(&minimal).as_deref() == Some(r.as_str()),
                "a {}-byte ref does not read back from a minimal push event",
                r.len()
            ),
            Err(e) => panic!("a minimal push event cannot be serialized: {e}"),
        }
    }
}

/// 64-bit FNV-1a: a cheap, stable hash that spreads the positions property 3
/// changes across inputs.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn nonzero(x: u64) -> u8 {
    match x as u8 {
        0 => 0x80,
        b => b,
    }
}
