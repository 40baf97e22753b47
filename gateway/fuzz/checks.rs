//! The properties the fuzz targets check, one function per target.
//!
//! This file is compiled twice, with `#[path]`: into the fuzz targets
//! (`fuzz_targets/*.rs`, nightly, sanitizers) and into the replay test
//! `gateway/tests/fuzz_corpus.rs` (stable, plain `cargo test`). So the
//! committed corpus is checked in CI by exactly the code the fuzzer ran, with
//! no copy to drift. It may only use `std`, `bytes` and `meshfed_gateway`,
//! which both crates have.
//!
//! A check fails by panicking, which libFuzzer reports as a crash and the
//! test as a failure. Panic messages describe frames by type and size, never
//! with `{:?}` of a payload that may be a megabyte long.

use std::collections::BTreeMap;

use bytes::BytesMut;
use meshfed_gateway::wire::announce::Announcement;
use meshfed_gateway::wire::frame::{self, Frame, FrameError};

/// Bytes before every payload: type (1) and payload length (4, big endian).
pub const FRAME_HEADER: usize = 5;

/// How a byte stream decoded: every frame, in order, and why decoding
/// stopped.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub frames: Vec<Frame>,
    pub end: End,
}

/// Why decoding stopped.
#[derive(Debug, PartialEq)]
pub enum End {
    /// `decode` returned `Ok(None)` with this many bytes left over: the start
    /// of a frame that has not fully arrived (0 if the stream ended on a
    /// frame boundary).
    Incomplete(usize),
    /// `decode` refused the next frame.
    Refused(FrameError),
}

/// `frame_decode`: the first byte picks where the stream is cut in two
/// (`split_point`); the rest is the byte stream as it arrives on a QUIC
/// stream.
///
/// 1. `frame::decode`, called until it returns `Ok(None)` or an error, never
///    panics.
/// 2. Each frame consumes exactly its 5-byte header plus the length that
///    header declares, and `Ok(None)` consumes nothing.
/// 3. Each decoded frame round-trips: `encode` then `decode` gives an equal
///    frame, consumes the whole encoding, keeps the frame type, and
///    re-encodes to the same bytes. DATA, ANNOUNCE and ACCEPT, whose payload
///    is opaque, re-encode to exactly the input bytes.
/// 4. Incrementality: fed in two parts, cut at the split point, the stream
///    yields the same frames and stops the same way as when fed at once.
pub fn check_frame_decode(data: &[u8]) {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let whole = decode_stream(stream, &[stream.len()]);
    let cut = split_point(control, stream.len());
    let parts = decode_stream(stream, &[cut, stream.len()]);
    if parts != whole {
        panic!(
            "fed in two parts cut at byte {cut} of {}, the stream decodes to {} frame(s) then {}; \
             fed at once, to {} frame(s) then {}",
            stream.len(),
            parts.frames.len(),
            describe_end(&parts.end),
            whole.frames.len(),
            describe_end(&whole.end),
        );
    }
}

/// Where `check_frame_decode` cuts a stream of `len` bytes: proportionally
/// to `control`, from 0 (everything in the second part) to 255 (everything
/// in the first).
pub fn split_point(control: u8, len: usize) -> usize {
    len * usize::from(control) / 255
}

/// Decodes `stream` as a receiver does, appending it to the buffer in pieces
/// that end at each of `cuts` (ascending, the last one `stream.len()`), and
/// decoding every whole frame after each piece. Checks properties 2 and 3 of
/// [`check_frame_decode`] on the way.
pub fn decode_stream(stream: &[u8], cuts: &[usize]) -> Decoded {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    // Bytes of `stream` decoded into frames so far, and appended so far.
    let mut consumed = 0;
    let mut fed = 0;
    for &cut in cuts {
        buf.extend_from_slice(&stream[fed..cut]);
        fed = cut;
        loop {
            assert!(
                buf[..] == stream[consumed..fed],
                "the decode buffer is not the undecoded rest of the stream (bytes {consumed}..{fed})"
            );
            let declared = (buf.len() >= FRAME_HEADER)
                .then(|| u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize);
            match frame::decode(&mut buf) {
                Ok(Some(f)) => {
                    let Some(declared) = declared else {
                        panic!(
                            "a {} decoded from {} bytes, less than a frame header",
                            describe(&f),
                            fed - consumed
                        );
                    };
                    let used = fed - consumed - buf.len();
                    assert!(
                        used == FRAME_HEADER + declared,
                        "a {} whose header declares {declared} payload bytes consumed {used} bytes",
                        describe(&f)
                    );
                    let wire = &stream[consumed..consumed + used];
                    check_round_trip(&f, wire);
                    consumed += used;
                    frames.push(f);
                }
                Ok(None) => {
                    assert!(
                        buf[..] == stream[consumed..fed],
                        "decode returned Ok(None) but changed the buffer"
                    );
                    break;
                }
                Err(e) => {
                    return Decoded {
                        frames,
                        end: End::Refused(e),
                    };
                }
            }
        }
    }
    Decoded {
        frames,
        end: End::Incomplete(buf.len()),
    }
}

/// Property 3 for one frame decoded from `wire`.
pub fn check_round_trip(f: &Frame, wire: &[u8]) {
    let mut encoded = BytesMut::new();
    if let Err(e) = frame::encode(f, &mut encoded) {
        panic!("a decoded {} cannot be encoded again: {e}", describe(f));
    }
    let bytes = encoded.clone().freeze();
    assert!(
        bytes.first() == wire.first(),
        "a {} decoded from frame type 0x{:02x} re-encodes as type {:?}",
        describe(f),
        wire[0],
        bytes.first()
    );
    if matches!(f, Frame::Data(_) | Frame::Announce(_) | Frame::Accept) {
        assert!(
            bytes[..] == *wire,
            "a {} does not re-encode to its own {} bytes (got {})",
            describe(f),
            wire.len(),
            bytes.len()
        );
    }
    match frame::decode(&mut encoded) {
        Ok(Some(again)) => {
            assert!(
                again == *f,
                "a {} does not round-trip: encode then decode gives a different {}",
                describe(f),
                describe(&again)
            );
            assert!(
                encoded.is_empty(),
                "decoding the {}-byte encoding of a {} left {} bytes",
                bytes.len(),
                describe(f),
                encoded.len()
            );
            let mut twice = BytesMut::new();
            if let Err(e) = frame::encode(&again, &mut twice) {
                panic!(
                    "a round-tripped {} cannot be encoded again: {e}",
                    describe(f)
                );
            }
            assert!(
                twice[..] == bytes[..],
                "a {} re-encodes to different bytes after a round trip",
                describe(f)
            );
        }
        Ok(None) => panic!(
            "the {}-byte encoding of a decoded {} is not a whole frame",
            bytes.len(),
            describe(f)
        ),
        Err(e) => panic!(
            "the {}-byte encoding of a decoded {} is refused by the decoder: {e}",
            bytes.len(),
            describe(f)
        ),
    }
}

/// A frame's type and size, short enough for a panic message.
pub fn describe(f: &Frame) -> String {
    match f {
        Frame::Open(o) => format!(
            "OPEN ({:?}, {} header(s))",
            o.kind,
            o.http.as_ref().map_or(0, |h| h.headers.len())
        ),
        Frame::Response(r) => format!("RESPONSE ({}, {} header(s))", r.status, r.headers.len()),
        Frame::Data(b) => format!("DATA ({} bytes)", b.len()),
        Frame::Trailers(h) => format!("TRAILERS ({} header(s))", h.len()),
        Frame::Error(e) => format!(
            "ERROR ({}, {}-byte message)",
            e.refusal.reason(),
            e.message.len()
        ),
        Frame::Accept => "ACCEPT".to_string(),
        Frame::Announce(b) => format!("ANNOUNCE ({} bytes)", b.len()),
    }
}

fn describe_end(end: &End) -> String {
    match end {
        End::Incomplete(0) => "the end of the stream".to_string(),
        End::Incomplete(n) => format!("{n} bytes of an incomplete frame"),
        End::Refused(e) => format!("the error `{e}`"),
    }
}

/// `announce_decode`: the bytes are the payload of an ANNOUNCE frame, as a
/// gateway receives it from a peer on the control stream.
///
/// 1. `Announcement::decode` never panics.
/// 2. An announcement that decodes re-encodes to bytes that decode to an
///    equal announcement, and encode again to the same bytes.
/// 3. What the source gateway computes from a peer's announcement for
///    routing never panics: `healthy` for every service, with no selector and
///    with each group's own labels as the selector.
pub fn check_announce_decode(data: &[u8]) {
    let Ok(a) = Announcement::decode(data) else {
        return;
    };
    let bytes = a.encode();
    match Announcement::decode(&bytes) {
        Ok(again) => {
            assert!(
                again == a,
                "a decoded announcement ({} services) does not round-trip through its encoding",
                a.services.len()
            );
            assert!(
                again.encode() == bytes,
                "a decoded announcement re-encodes to different bytes after a round trip"
            );
        }
        Err(e) => panic!(
            "the {}-byte encoding of a decoded announcement is refused: {e}",
            bytes.len()
        ),
    }
    let everything = BTreeMap::new();
    for (service, groups) in &a.services {
        a.healthy(service, &everything);
        for g in groups {
            a.healthy(service, &g.labels);
        }
    }
}

/// `sni_detect`: the first byte picks a cut point (`split_point`); the rest
/// is the start of a caller connection on the outbound listener, as the
/// listener peeks at it (`proxy::detect`).
///
/// 1. `classify`, `client_hello` and `at_deadline` never panic.
/// 2. "Need more" asks for more bytes than given, and at most `MAX_HELLO`.
/// 3. A decision stands: when the bytes up to the cut point are decided,
///    all of them decide the same (below `MAX_HELLO`, where the listener
///    stops reading).
/// 4. A server name found is lower case, made of DNS name characters, and
///    its bytes are in the input, in order (ASCII case aside; records may
///    split it).
/// 5. `classify` agrees with `client_hello` on input that starts like TLS.
pub fn check_sni_detect(data: &[u8]) {
    use meshfed_gateway::proxy::detect::{self, Detected, Hello, MAX_HELLO, Step};
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let whole = detect::client_hello(stream);
    match &whole {
        Hello::Incomplete { need } => assert!(
            *need > stream.len() && *need <= MAX_HELLO,
            "{} bytes: Incomplete asks for {need}",
            stream.len()
        ),
        Hello::Sni(name) => {
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_')),
                "a {}-byte server name with other characters",
                name.len()
            );
            let mut rest = stream.iter().map(u8::to_ascii_lowercase);
            assert!(
                name.bytes().all(|c| rest.any(|b| b == c)),
                "a {}-byte server name that is not in the input",
                name.len()
            );
        }
        Hello::Absent | Hello::Malformed(_) => {}
    }
    let step = detect::classify(stream);
    if let Step::Need(n) = step {
        assert!(
            n > stream.len() && n <= MAX_HELLO,
            "{} bytes: classify needs {n}",
            stream.len()
        );
    }
    if stream.first() == Some(&0x16) && stream.get(1).is_none_or(|&v| v == 0x03) {
        let agrees = match (&step, &whole) {
            (Step::Need(n), Hello::Incomplete { need }) => n == need,
            (Step::Done(Detected::Tls { sni: Some(a) }), Hello::Sni(b)) => a == b,
            (Step::Done(Detected::Tls { sni: None }), Hello::Absent | Hello::Malformed(_)) => true,
            _ => false,
        };
        assert!(agrees, "classify and client_hello disagree");
    }
    let _ = detect::at_deadline(stream);
    let cut = split_point(control, stream.len());
    if cut < MAX_HELLO {
        let part = &stream[..cut];
        let prefix = detect::client_hello(part);
        assert!(
            matches!(prefix, Hello::Incomplete { .. }) || prefix == whole,
            "decided on {cut} bytes as {prefix:?}, on all {} as {whole:?}",
            stream.len()
        );
        if let Step::Done(d) = detect::classify(part) {
            assert!(
                step == Step::Done(d.clone()),
                "classify decided {cut} bytes as {d:?} but all {} as {step:?}",
                stream.len()
            );
        }
    }
}

/// `h2_preface`: the first byte picks a cut point; the rest is an HTTP
/// connection's bytes as hyper reads them (`proxy::detect::Preface`).
///
/// 1. Fed at once or in two parts cut there, the decision is the same, and
///    made once.
/// 2. It is HTTP/2 exactly when the bytes start with the preface, undecided
///    while they are a strict prefix of it, and HTTP/1 otherwise.
/// 3. `classify` calls a connection that starts with the preface HTTP.
pub fn check_h2_preface(data: &[u8]) {
    use meshfed_gateway::proxy::detect::{self, Detected, H2_PREFACE, Preface, PrefaceIs, Step};
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let mut once = Preface::default();
    let at_once = once.feed(stream);
    if at_once.is_some() {
        assert_eq!(once.feed(stream), None, "decided twice");
    }
    let cut = split_point(control, stream.len());
    let mut twice = Preface::default();
    let parts: Vec<PrefaceIs> = [twice.feed(&stream[..cut]), twice.feed(&stream[cut..])]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(
        parts,
        at_once.into_iter().collect::<Vec<_>>(),
        "fed in two parts cut at {cut}"
    );
    let expected = if stream.starts_with(H2_PREFACE) {
        Some(PrefaceIs::H2)
    } else if H2_PREFACE.starts_with(stream) {
        None
    } else {
        Some(PrefaceIs::Other)
    };
    assert_eq!(at_once, expected, "{} bytes", stream.len());
    if stream.starts_with(H2_PREFACE) {
        assert_eq!(detect::classify(stream), Step::Done(Detected::Http));
    }
}
