//! Trace context on the wire: W3C Trace Context (`traceparent`,
//! `tracestate`) and Zipkin's B3 (`b3` single header, `x-b3-*` multi
//! headers), read from and written to HTTP headers.
//!
//! Pure: no clock, no randomness, no SDK. [`extract`] reads what a request
//! carries; [`inject`] rewrites the headers so that the next hop sees `next`
//! as its parent, in every format the request arrived with (plus
//! `traceparent`, always). Malformed values are ignored, as the W3C spec
//! asks ("restart the trace"), never an error for the request.

use http::{HeaderMap, HeaderValue};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const B3: &str = "b3";
pub const B3_TRACE_ID: &str = "x-b3-traceid";
pub const B3_SPAN_ID: &str = "x-b3-spanid";
pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const B3_SAMPLED: &str = "x-b3-sampled";
pub const B3_FLAGS: &str = "x-b3-flags";

/// A span's identity in a trace: a 128-bit trace ID and a 64-bit span ID,
/// both non-zero when valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub trace_id: u128,
    pub span_id: u64,
}

/// What a request carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The caller's span, if any format gave a valid one.
    pub parent: Option<Ids>,
    /// The caller's sampling decision; `None` when it made none (no context,
    /// or B3 that defers the decision).
    pub sampled: Option<bool>,
    /// Where `parent` came from; a valid `traceparent` wins over B3.
    pub from_traceparent: bool,
    /// The B3 formats present, so they are rewritten in the same shape.
    pub b3_single: bool,
    pub b3_multi: bool,
    /// B3 trace IDs may be 64-bit; the rewrite keeps their width.
    pub b3_trace_id_64: bool,
}

/// Reads the trace context of a request. A valid `traceparent` wins; else
/// `b3`; else `x-b3-*`. `x-b3-flags: 1` (debug) means sampled.
pub fn extract(headers: &HeaderMap) -> Extracted {
    let mut out = Extracted::default();
    let mut tp = headers.get_all(TRACEPARENT).iter();
    // More than one traceparent is invalid (W3C §3.2.1).
    if let (Some(v), None) = (tp.next(), tp.next())
        && let Some((ids, sampled)) = v.to_str().ok().and_then(parse_traceparent)
    {
        out.parent = Some(ids);
        out.sampled = Some(sampled);
        out.from_traceparent = true;
    }
    if let Some(v) = headers.get(B3).and_then(|v| v.to_str().ok()) {
        out.b3_single = true;
        if let Some((ids, sampled, wide)) = parse_b3_single(v) {
            out.b3_trace_id_64 = !wide;
            if out.parent.is_none() {
                out.parent = ids;
                out.sampled = sampled;
            }
        }
    }
    let multi_id = headers.get(B3_TRACE_ID).and_then(|v| v.to_str().ok());
    let multi_sampled = headers.get(B3_SAMPLED).and_then(|v| v.to_str().ok());
    let debug = headers.get(B3_FLAGS).is_some_and(|v| v.as_bytes() == b"1");
    if multi_id.is_some() || multi_sampled.is_some() || debug {
        out.b3_multi = true;
        let ids = multi_id.and_then(|t| {
            let span = headers.get(B3_SPAN_ID)?.to_str().ok()?;
            Some((parse_b3_trace_id(t)?, parse_span_id(span)?))
        });
        if let Some(((_, wide), _)) = ids
            && !out.b3_single
        {
            out.b3_trace_id_64 = !wide;
        }
        if out.parent.is_none() && out.sampled.is_none() {
            out.parent = ids.map(|((trace_id, _), span_id)| Ids { trace_id, span_id });
            out.sampled = if debug {
                Some(true)
            } else {
                match multi_sampled {
                    Some("1" | "true") => Some(true),
                    Some("0" | "false") => Some(false),
                    _ => None,
                }
            };
        }
    }
    out
}

/// `version-traceid-spanid-flags`, lowercase hex (W3C Trace Context §3.2).
/// Version 00 is exactly 55 characters; a later version may append fields.
pub fn parse_traceparent(s: &str) -> Option<(Ids, bool)> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = hex_u8(&s[0..2])?;
    if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    let trace_id = hex_lower::<u128>(&s[3..35])?;
    let span_id = hex_lower::<u64>(&s[36..52])?;
    let flags = hex_u8(&s[53..55])?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some((Ids { trace_id, span_id }, flags & 1 == 1))
}

/// `traceid-spanid[-sampled[-parentspanid]]`, or a lone sampling state
/// (`0`, `1`, `d`). Returns the IDs (if any), the sampling state and whether
/// the trace ID was 128-bit.
fn parse_b3_single(s: &str) -> Option<(Option<Ids>, Option<bool>, bool)> {
    let mut parts = s.trim().split('-');
    let first = parts.next()?;
    let Some(span) = parts.next() else {
        return Some((None, sampling_state(first)?, true));
    };
    let (trace_id, wide) = parse_b3_trace_id(first)?;
    let span_id = parse_span_id(span)?;
    let sampled = match parts.next() {
        Some(state) => sampling_state(state)?,
        None => None,
    };
    Some((Some(Ids { trace_id, span_id }), sampled, wide))
}

fn sampling_state(s: &str) -> Option<Option<bool>> {
    match s {
        "1" | "d" => Some(Some(true)),
        "0" => Some(Some(false)),
        _ => None,
    }
}

/// 16 or 32 lowercase hex digits, non-zero; `true` when 128-bit.
fn parse_b3_trace_id(s: &str) -> Option<(u128, bool)> {
    let id = match s.len() {
        16 => u128::from(hex_lower::<u64>(s)?),
        32 => hex_lower::<u128>(s)?,
        _ => return None,
    };
    (id != 0).then_some((id, s.len() == 32))
}

fn parse_span_id(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    hex_lower::<u64>(s).filter(|id| *id != 0)
}

fn hex_u8(s: &str) -> Option<u8> {
    hex_lower::<u64>(s).and_then(|v| u8::try_from(v).ok())
}

/// Lowercase hex only: W3C forbids uppercase, and B3 writes lowercase.
fn hex_lower<T: TryFrom<u128>>(s: &str) -> Option<T> {
    if s.is_empty() || s.len() > 32 || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(s, 16)
        .ok()
        .and_then(|v| T::try_from(v).ok())
}

/// The `traceparent` of a span: version 00, sampled flag as decided.
pub fn traceparent(ids: Ids, sampled: bool) -> String {
    format!(
        "00-{:032x}-{:016x}-{}",
        ids.trace_id,
        ids.span_id,
        if sampled { "01" } else { "00" }
    )
}

/// Rewrites `headers` so the next hop sees `next` as its parent span:
/// `traceparent` always; `b3` and `x-b3-*` when the request came with them
/// (the previous span becomes `parentspanid`). `tracestate` is kept when
/// the trace continues the caller's `traceparent`, and dropped otherwise:
/// it belongs to the trace it came with.
pub fn inject(headers: &mut HeaderMap, seen: &Extracted, next: Ids, sampled: bool) {
    set(headers, TRACEPARENT, traceparent(next, sampled));
    if !(seen.from_traceparent && seen.parent.map(|p| p.trace_id) == Some(next.trace_id)) {
        headers.remove(TRACESTATE);
    }
    let parent = seen
        .parent
        .filter(|p| p.trace_id == next.trace_id)
        .map(|p| p.span_id);
    let trace_id = if seen.b3_trace_id_64 && next.trace_id >> 64 == 0 {
        format!("{:016x}", next.trace_id)
    } else {
        format!("{:032x}", next.trace_id)
    };
    let state = if sampled { "1" } else { "0" };
    if seen.b3_single {
        let mut v = format!("{trace_id}-{:016x}-{state}", next.span_id);
        if let Some(p) = parent {
            v.push_str(&format!("-{p:016x}"));
        }
        set(headers, B3, v);
    }
    if seen.b3_multi {
        set(headers, B3_TRACE_ID, trace_id);
        set(headers, B3_SPAN_ID, format!("{:016x}", next.span_id));
        match parent {
            Some(p) => set(headers, B3_PARENT_SPAN_ID, format!("{p:016x}")),
            None => {
                headers.remove(B3_PARENT_SPAN_ID);
            }
        }
        // Debug (`x-b3-flags: 1`) implies sampled and is passed on as is.
        if headers.get(B3_FLAGS).is_none_or(|v| v.as_bytes() != b"1") {
            set(headers, B3_SAMPLED, state.to_string());
        }
    }
}

fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    // Hex and dashes only: always a valid header value.
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests;
