//! A frozen test double of the previous tunnel framing (N−1), for the
//! version-skew tests.
//!
//! It is `meshfed/1` as the gateway spoke it before the OPEN frame gained
//! the optional SNI field (tag `0x08`, commit 084f0a4 "TCP streams carry
//! the caller's workload identity ... (optional OPEN tag 0x08)"), i.e. the
//! framing of commit c0039f2: the same frames, limits and refusal codes,
//! SCHEME required in an HTTP OPEN, and an OPEN whose tags stop at
//! SOURCE_VERSION (`0x07`) before the HTTP ones. A gateway of that revision
//! also never sent CALLER on a TCP stream.
//!
//! It is written by hand from docs/tunnel.md ("Frames", "Header blocks",
//! "The other payloads") and deliberately does **not** call
//! `meshfed_gateway::tunnel`: a test that encoded with today's encoder could
//! not notice today's decoder drifting from what an older peer writes.
//! Do not update it when the framing changes; add a new double for the new
//! N−1 instead.
//!
//! Shared by `version_skew.rs` (`#[path]` module).
#![allow(dead_code)]

use std::time::Duration;

/// The ALPN id of the framing.
pub const ALPN: &[u8] = b"meshfed/1";

const HEADER: usize = 5;
const MAX_HEADER_BLOCK: usize = 65_536;
const MAX_DATA_FRAME: usize = 1_048_576;
const MAX_FIELDS: usize = 512;

// Frame types.
const OPEN: u8 = 0x01;
const RESPONSE: u8 = 0x02;
const DATA: u8 = 0x03;
const TRAILERS: u8 = 0x04;
const ERROR: u8 = 0x05;
const ACCEPT: u8 = 0x06;
const ANNOUNCE: u8 = 0x07;

// Header-block tags known to N−1. No 0x08.
const KIND: u8 = 0x01;
const SERVICE: u8 = 0x02;
const PORT: u8 = 0x03;
const SUBSET: u8 = 0x04;
const SUBSET_LABEL: u8 = 0x05;
const CALLER: u8 = 0x06;
const SOURCE_VERSION: u8 = 0x07;
const METHOD: u8 = 0x10;
const SCHEME: u8 = 0x11;
const AUTHORITY: u8 = 0x12;
const PATH: u8 = 0x13;
const HEADER_FIELD: u8 = 0x14;
const STATUS: u8 = 0x20;
const MUST_UNDERSTAND: u8 = 0x80;

/// A header field: lowercase name, raw value.
pub type Field = (String, Vec<u8>);

/// An OPEN as N−1 knew it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Open {
    /// 1 HTTP, 2 TCP.
    pub kind: u8,
    pub service: String,
    pub port: u16,
    pub subset: Option<String>,
    pub subset_labels: Vec<(String, String)>,
    pub caller: Option<String>,
    pub source_version: Option<String>,
    /// For HTTP: method, scheme, authority, path, headers.
    pub http: Option<Request>,
    /// Tags below 0x80 this revision does not know, skipped as the spec
    /// says, with their values (the test looks at what was skipped).
    pub skipped: Vec<(u8, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    pub method: String,
    pub scheme: String,
    pub authority: String,
    pub path: String,
    pub headers: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Open(Box<Open>),
    Response { status: u16, headers: Vec<Field> },
    Data(Vec<u8>),
    Trailers(Vec<Field>),
    Error { code: u16, message: String },
    Accept,
    Announce(Vec<u8>),
}

// ---------------------------------------------------------------------------
// Encoder
// ---------------------------------------------------------------------------

fn field(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

fn pair(out: &mut Vec<u8>, tag: u8, name: &[u8], value: &[u8]) {
    let mut v = (name.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    field(out, tag, &v);
}

fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![ty];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The bytes of `f`, in the field order of the spec's table.
pub fn encode(f: &Frame) -> Vec<u8> {
    match f {
        Frame::Open(o) => {
            let mut p = Vec::new();
            field(&mut p, KIND, &[o.kind]);
            field(&mut p, SERVICE, o.service.as_bytes());
            field(&mut p, PORT, &o.port.to_be_bytes());
            if let Some(s) = &o.subset {
                field(&mut p, SUBSET, s.as_bytes());
            }
            for (k, v) in &o.subset_labels {
                pair(&mut p, SUBSET_LABEL, k.as_bytes(), v.as_bytes());
            }
            if let Some(c) = &o.caller {
                field(&mut p, CALLER, c.as_bytes());
            }
            if let Some(v) = &o.source_version {
                field(&mut p, SOURCE_VERSION, v.as_bytes());
            }
            if let Some(h) = &o.http {
                field(&mut p, METHOD, h.method.as_bytes());
                field(&mut p, SCHEME, h.scheme.as_bytes());
                field(&mut p, AUTHORITY, h.authority.as_bytes());
                field(&mut p, PATH, h.path.as_bytes());
                for (n, v) in &h.headers {
                    pair(&mut p, HEADER_FIELD, n.as_bytes(), v);
                }
            }
            frame(OPEN, &p)
        }
        Frame::Response { status, headers } => {
            let mut p = Vec::new();
            field(&mut p, STATUS, &status.to_be_bytes());
            for (n, v) in headers {
                pair(&mut p, HEADER_FIELD, n.as_bytes(), v);
            }
            frame(RESPONSE, &p)
        }
        Frame::Trailers(headers) => {
            let mut p = Vec::new();
            for (n, v) in headers {
                pair(&mut p, HEADER_FIELD, n.as_bytes(), v);
            }
            frame(TRAILERS, &p)
        }
        Frame::Data(b) => frame(DATA, b),
        Frame::Announce(b) => frame(ANNOUNCE, b),
        Frame::Accept => frame(ACCEPT, &[]),
        Frame::Error { code, message } => {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(message.as_bytes());
            frame(ERROR, &p)
        }
    }
}

// ---------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------

/// Decodes one frame from the front of `buf`, removing it; `Ok(None)` until
/// a whole frame is there. Refuses what the spec refuses, with its words.
pub fn decode(buf: &mut Vec<u8>) -> Result<Option<Frame>, String> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let ty = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let limit = match ty {
        DATA | ANNOUNCE => MAX_DATA_FRAME,
        OPEN | RESPONSE | TRAILERS | ERROR => MAX_HEADER_BLOCK,
        ACCEPT => 0,
        other => return Err(format!("unknown frame type 0x{other:02x}")),
    };
    if len > limit {
        return Err(format!(
            "frame type 0x{ty:02x} of {len} bytes exceeds the limit"
        ));
    }
    if buf.len() < HEADER + len {
        return Ok(None);
    }
    let payload: Vec<u8> = buf.drain(..HEADER + len).skip(HEADER).collect();
    let f = match ty {
        DATA => Frame::Data(payload),
        ANNOUNCE => Frame::Announce(payload),
        ACCEPT => Frame::Accept,
        ERROR => {
            if payload.len() < 2 {
                return Err("ERROR frame without a code".into());
            }
            Frame::Error {
                code: u16::from_be_bytes([payload[0], payload[1]]),
                message: String::from_utf8_lossy(&payload[2..]).into_owned(),
            }
        }
        OPEN => Frame::Open(Box::new(decode_open(&payload)?)),
        RESPONSE => {
            let mut status = None;
            let mut headers = Vec::new();
            for (t, v) in fields(&payload)? {
                match t {
                    STATUS => {
                        let s = u16_of(t, &v)?;
                        if !(100..=999).contains(&s) {
                            return Err(format!("status {s} out of range"));
                        }
                        status = Some(s);
                    }
                    HEADER_FIELD => headers.push(header(&v)?),
                    t => skip(t)?,
                }
            }
            Frame::Response {
                status: status.ok_or("missing field: status")?,
                headers,
            }
        }
        TRAILERS => {
            let mut headers = Vec::new();
            for (t, v) in fields(&payload)? {
                match t {
                    HEADER_FIELD => headers.push(header(&v)?),
                    t => skip(t)?,
                }
            }
            Frame::Trailers(headers)
        }
        _ => unreachable!("type checked above"),
    };
    Ok(Some(f))
}

fn fields(mut p: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !p.is_empty() {
        if out.len() == MAX_FIELDS {
            return Err(format!("header block has more than {MAX_FIELDS} fields"));
        }
        if p.len() < 3 {
            return Err(format!("field 0x{:02x} is truncated", p[0]));
        }
        let (t, n) = (p[0], usize::from(u16::from_be_bytes([p[1], p[2]])));
        if p.len() < 3 + n {
            return Err(format!("field 0x{t:02x} is truncated"));
        }
        out.push((t, p[3..3 + n].to_vec()));
        p = &p[3 + n..];
    }
    Ok(out)
}

fn skip(t: u8) -> Result<(), String> {
    if t >= MUST_UNDERSTAND {
        Err(format!("unknown must-understand field 0x{t:02x}"))
    } else {
        Ok(())
    }
}

fn text(t: u8, v: Vec<u8>) -> Result<String, String> {
    String::from_utf8(v).map_err(|_| format!("field 0x{t:02x} is not UTF-8"))
}

fn u16_of(t: u8, v: &[u8]) -> Result<u16, String> {
    match v {
        [a, b] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(format!("field 0x{t:02x} is not 2 bytes")),
    }
}

fn split(t: u8, v: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    if v.len() < 2 {
        return Err(format!("field 0x{t:02x} is truncated"));
    }
    let n = usize::from(u16::from_be_bytes([v[0], v[1]]));
    if v.len() < 2 + n {
        return Err(format!("field 0x{t:02x} is truncated"));
    }
    Ok((v[2..2 + n].to_vec(), v[2 + n..].to_vec()))
}

fn header(v: &[u8]) -> Result<Field, String> {
    let (name, value) = split(HEADER_FIELD, v)?;
    let name = text(HEADER_FIELD, name)?.to_ascii_lowercase();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err("invalid header name".into());
    }
    if value.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
        return Err("invalid header value".into());
    }
    Ok((name, value))
}

fn decode_open(p: &[u8]) -> Result<Open, String> {
    let mut o = Open::default();
    let (mut kind, mut service, mut port) = (None, None, None);
    let (mut method, mut scheme, mut authority, mut path) = (None, None, None, None);
    let mut headers = Vec::new();
    for (t, v) in fields(p)? {
        match t {
            KIND => {
                kind = Some(match v[..] {
                    [1] => 1,
                    [2] => 2,
                    _ => return Err("unknown stream kind".into()),
                })
            }
            SERVICE => service = Some(text(t, v)?),
            PORT => port = Some(u16_of(t, &v)?),
            SUBSET => o.subset = Some(text(t, v)?),
            SUBSET_LABEL => {
                let (k, val) = split(t, &v)?;
                o.subset_labels.push((text(t, k)?, text(t, val)?));
            }
            CALLER => o.caller = Some(text(t, v)?),
            SOURCE_VERSION => o.source_version = Some(text(t, v)?),
            METHOD => method = Some(text(t, v)?),
            SCHEME => scheme = Some(text(t, v)?),
            AUTHORITY => authority = Some(text(t, v)?),
            PATH => path = Some(text(t, v)?),
            HEADER_FIELD => headers.push(header(&v)?),
            t => {
                skip(t)?;
                o.skipped.push((t, v));
            }
        }
    }
    o.kind = kind.ok_or("missing field: stream kind")?;
    o.service = service.ok_or("missing field: service")?;
    o.port = port.ok_or("missing field: port")?;
    if o.kind == 1 {
        o.http = Some(Request {
            method: method.ok_or("missing field: method")?,
            scheme: scheme.ok_or("missing field: scheme")?,
            authority: authority.ok_or("missing field: authority")?,
            path: path.ok_or("missing field: path")?,
            headers,
        });
    }
    Ok(o)
}

// ---------------------------------------------------------------------------
// Announcements and streams
// ---------------------------------------------------------------------------

/// An announcement as N−1 read it: the members it knew, others ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    pub seq: u64,
    pub cluster: String,
    pub config_version: String,
    pub draining: bool,
    /// Service → (total, healthy) summed over its groups.
    pub services: Vec<(String, u64, u64)>,
}

pub fn decode_announcement(bytes: &[u8]) -> Result<Announcement, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let member = |k: &str| v.get(k).ok_or(format!("missing member `{k}`"));
    let services = member("services")?
        .as_object()
        .ok_or("`services` is not an object")?
        .iter()
        .map(|(name, groups)| {
            let groups = groups.as_array().cloned().unwrap_or_default();
            let sum = |k: &str| groups.iter().filter_map(|g| g[k].as_u64()).sum::<u64>();
            (name.clone(), sum("total"), sum("healthy"))
        })
        .collect();
    Ok(Announcement {
        seq: member("seq")?.as_u64().ok_or("`seq` is not an integer")?,
        cluster: member("cluster")?.as_str().ok_or("bad `cluster`")?.into(),
        config_version: member("config_version")?
            .as_str()
            .ok_or("bad `config_version`")?
            .into(),
        draining: v.get("draining").and_then(|d| d.as_bool()).unwrap_or(false),
        services,
    })
}

/// An announcement as N−1 wrote it: every service with one group of
/// `healthy` endpoints and no labels.
pub fn encode_announcement(seq: u64, cluster: &str, services: &[&str], healthy: u32) -> Vec<u8> {
    let groups: serde_json::Map<String, serde_json::Value> = services
        .iter()
        .map(|s| {
            (
                s.to_string(),
                serde_json::json!([{"labels": {}, "total": healthy, "healthy": healthy}]),
            )
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "seq": seq,
        "cluster": cluster,
        "config_version": "n-1-double",
        "draining": false,
        "services": groups,
    }))
    .unwrap()
}

/// Reads from `recv` until one whole frame is buffered in `buf`; `None` at
/// a clean end of stream on a frame boundary. Panics on a decode error, a
/// FIN inside a frame, or 10 s without a frame.
pub async fn read_frame(recv: &mut quinn::RecvStream, buf: &mut Vec<u8>) -> Option<Frame> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match decode(buf) {
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(e) => panic!("the N−1 decoder refused a frame: {e}"),
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    assert!(buf.is_empty(), "FIN inside a frame ({} bytes)", buf.len());
                    return None;
                }
                Err(e) => panic!("reading a stream: {e}"),
            }
        }
    })
    .await
    .expect("no frame within 10 s")
}
