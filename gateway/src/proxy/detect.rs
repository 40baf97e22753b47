//! Protocol detection on the outbound listener, from a connection's first
//! bytes: pure functions over bytes, no I/O and no clock (the listener
//! peeks and waits; see `proxy::outbound`), fuzzed (`gateway/fuzz`,
//! targets `sni_detect` and `h2_preface`).
//!
//! - [`classify`]: TLS (a ClientHello, with its server name), HTTP (a
//!   request line's method, which the HTTP/2 preface `PRI * HTTP/2.0` also
//!   starts with), or opaque; or how many bytes it needs to decide.
//! - [`client_hello`]: the server name (SNI) of a TLS ClientHello. A modern
//!   hello is often over 1 KiB (a post-quantum X25519MLKEM768 key share
//!   alone is 1.2 KB, and browsers pad), may put `server_name` anywhere
//!   (some clients shuffle the extension order), and may span several TLS
//!   records. Up to [`MAX_HELLO`] bytes are read, and "not all here yet"
//!   ([`Hello::Incomplete`]) is told apart from "no server name"
//!   ([`Hello::Absent`]) and "not a ClientHello" ([`Hello::Malformed`]).
//! - [`Preface`]: whether an HTTP connection opens with the HTTP/2 preface,
//!   fed the bytes as hyper reads them.
//!
//! It does not decide what to do with a connection (the listener does) nor
//! route it ([`crate::route`]).

/// The most bytes of a connection read to find a ClientHello's server
/// name: the TLS records that carry the hello, headers included. Browsers'
/// hellos are 0.5–2 KiB; 16 KiB is one full record, 8× the largest seen.
pub const MAX_HELLO: usize = 16 * 1024;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A request method is at most this long before the space that ends it
/// (`OPTIONS`, `CONNECT`, with room); a longer run of capitals is not HTTP.
const MAX_METHOD: usize = 16;

/// The largest TLS record payload (RFC 8446 §5.1: 2^14 for plaintext; a
/// ClientHello is always plaintext).
const MAX_RECORD: usize = 1 << 14;

/// TLS record header: type (1), legacy version (2), length (2).
const RECORD_HEADER: usize = 5;

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line or the HTTP/2 preface.
    Http,
    /// A TLS ClientHello, with its server name if it has a usable one.
    Tls { sni: Option<String> },
    /// Anything else.
    Opaque,
}

/// What [`classify`] makes of the bytes seen so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Done(Detected),
    /// Undecided: wait until at least this many bytes (more than given,
    /// at most [`MAX_HELLO`]) have arrived, then classify them again.
    Need(usize),
}

/// Classifies a connection by its first bytes (all of them so far, from
/// the first). A decision never changes when more bytes arrive; see
/// [`at_deadline`] for a caller that stops sending.
pub fn classify(bytes: &[u8]) -> Step {
    let Some(&first) = bytes.first() else {
        return Step::Need(1);
    };
    if first == 0x16 && bytes.get(1).is_none_or(|&v| v == 0x03) {
        return match client_hello(bytes) {
            Hello::Sni(name) => Step::Done(Detected::Tls { sni: Some(name) }),
            Hello::Absent | Hello::Malformed(_) => Step::Done(Detected::Tls { sni: None }),
            Hello::Incomplete { need } => Step::Need(need),
        };
    }
    let token = bytes.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if token == 0 || token > MAX_METHOD {
        return Step::Done(Detected::Opaque);
    }
    match bytes.get(token) {
        Some(b' ') => Step::Done(Detected::Http),
        Some(_) => Step::Done(Detected::Opaque),
        None if token < MAX_METHOD => Step::Need(token + 1),
        None => Step::Done(Detected::Opaque),
    }
}

/// The decision for a caller that sent `bytes` and then nothing more for
/// the detection timeout (or closed): what [`classify`] decided, else TLS
/// without a usable name if it began like TLS, else opaque.
pub fn at_deadline(bytes: &[u8]) -> Detected {
    match classify(bytes) {
        Step::Done(d) => d,
        Step::Need(_) if bytes.first() == Some(&0x16) => Detected::Tls { sni: None },
        Step::Need(_) => Detected::Opaque,
    }
}

/// What the first bytes of a TLS connection say about its server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// The `host_name` of the `server_name` extension, in lower case.
    Sni(String),
    /// A whole, well-formed ClientHello without a `server_name` extension.
    Absent,
    /// Not all of the ClientHello is here yet: wait until at least `need`
    /// bytes (more than given, at most [`MAX_HELLO`]) have arrived.
    Incomplete { need: usize },
    /// Not a well-formed ClientHello, or one whose server name is not a
    /// DNS name, or one over [`MAX_HELLO`] bytes without a server name in
    /// its first [`MAX_HELLO`] bytes; says what is wrong.
    Malformed(&'static str),
}

/// Reads the server name from the start of a TLS connection: the records
/// (`bytes` from the first byte, possibly cut anywhere) that carry a
/// ClientHello. The answer is [`Hello::Incomplete`] until the whole hello
/// is here, so it never changes as more bytes arrive; except that with
/// [`MAX_HELLO`] bytes or more, a hello still incomplete is read as far as
/// it goes (its server name, if that much holds it; else malformed).
pub fn client_hello(bytes: &[u8]) -> Hello {
    let capped = bytes.len() >= MAX_HELLO;
    let bytes = &bytes[..bytes.len().min(MAX_HELLO)];
    let message = match handshake(bytes, capped) {
        Ok(m) => m,
        Err(Reassembly::Malformed(why)) => return Hello::Malformed(why),
        Err(Reassembly::Need(need)) if !capped => return Hello::Incomplete { need },
        Err(Reassembly::Need(_)) => {
            return Hello::Malformed("the ClientHello's records are cut at 16 KiB");
        }
    };
    // Handshake header: type (1), length (3).
    let Some(&kind) = message.first() else {
        return incomplete(bytes, capped, RECORD_HEADER + 1);
    };
    if kind != 1 {
        return Hello::Malformed("the first handshake message is not a ClientHello");
    }
    if message.len() < 4 {
        // More of the header is in a record not yet here.
        return incomplete(bytes, capped, bytes.len() + 1);
    }
    let len =
        usize::from(message[1]) << 16 | usize::from(message[2]) << 8 | usize::from(message[3]);
    let have = message.len() - 4;
    let whole = have >= len;
    if !whole && !capped {
        return Hello::Incomplete {
            need: (bytes.len() + (len - have))
                .min(MAX_HELLO)
                .max(bytes.len() + 1),
        };
    }
    let body = &message[4..4 + len.min(have)];
    match server_name(body, whole) {
        Ok(Some(name)) => Hello::Sni(name),
        Ok(None) if whole => Hello::Absent,
        Ok(None) => Hello::Malformed("no server_name in the first 16 KiB of the ClientHello"),
        Err(Field::Malformed(why)) => Hello::Malformed(why),
        Err(Field::Cut) if whole => Hello::Malformed("the ClientHello is shorter than it says"),
        Err(Field::Cut) => {
            Hello::Malformed("no server_name in the first 16 KiB of the ClientHello")
        }
    }
}

fn incomplete(bytes: &[u8], capped: bool, need: usize) -> Hello {
    if capped {
        Hello::Malformed("the ClientHello's records are cut at 16 KiB")
    } else {
        Hello::Incomplete {
            need: need.clamp(bytes.len() + 1, MAX_HELLO),
        }
    }
}

enum Reassembly {
    /// Wait for this many bytes in all.
    Need(usize),
    Malformed(&'static str),
}

/// The handshake bytes carried by the records in `bytes`, up to the end of
/// the ClientHello if its length is known: borrowed when one record holds
/// them. `Err(Need)` when the next record's header, or its first byte, is
/// not here yet (and, `capped`, nothing of the hello is).
fn handshake(bytes: &[u8], capped: bool) -> Result<std::borrow::Cow<'_, [u8]>, Reassembly> {
    use std::borrow::Cow;
    let mut out: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut p = 0;
    loop {
        if out.first().is_some_and(|&kind| kind != 1) {
            return Err(Reassembly::Malformed(
                "the first handshake message is not a ClientHello",
            ));
        }
        // The hello's total size, once its header is in.
        let wanted = (out.len() >= 4).then(|| {
            4 + ((usize::from(out[1]) << 16) | (usize::from(out[2]) << 8) | usize::from(out[3]))
        });
        if wanted.is_some_and(|w| out.len() >= w) || p == bytes.len() && !out.is_empty() {
            return Ok(out);
        }
        let Some(header) = bytes.get(p..p + RECORD_HEADER) else {
            if capped && !out.is_empty() {
                // Cut at the bound: read what is here.
                return Ok(out);
            }
            return Err(Reassembly::Need(p + RECORD_HEADER));
        };
        if header[0] != 0x16 {
            return Err(Reassembly::Malformed(
                "a record inside the ClientHello is not a handshake record",
            ));
        }
        if header[1] != 0x03 {
            return Err(Reassembly::Malformed("not a TLS record (version)"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(Reassembly::Malformed(
                "a TLS record length out of range (1 to 16384)",
            ));
        }
        let start = p + RECORD_HEADER;
        let end = (start + len).min(bytes.len());
        if end == start {
            if capped && !out.is_empty() {
                return Ok(out);
            }
            return Err(Reassembly::Need(start + 1));
        }
        let fragment = &bytes[start..end];
        out = match out {
            Cow::Borrowed([]) => Cow::Borrowed(fragment),
            other => {
                let mut v = other.into_owned();
                v.extend_from_slice(fragment);
                Cow::Owned(v)
            }
        };
        p = end;
        if end < start + len {
            // The record is cut: what is here is all there is.
            return Ok(out);
        }
    }
}

enum Field {
    /// The body ends before a field does.
    Cut,
    Malformed(&'static str),
}

/// A cursor over a ClientHello body.
struct Reader<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Field> {
        let s = self.b.get(self.p..self.p + n).ok_or(Field::Cut)?;
        self.p += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<usize, Field> {
        Ok(usize::from(self.take(1)?[0]))
    }

    fn u16(&mut self) -> Result<usize, Field> {
        let s = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([s[0], s[1]])))
    }
}

/// The server name in a ClientHello body (after the handshake header).
/// With `whole`, the body is all of the hello and must be consistent;
/// without, it is cut and a field that runs past its end is [`Field::Cut`].
fn server_name(body: &[u8], whole: bool) -> Result<Option<String>, Field> {
    let mut r = Reader { b: body, p: 0 };
    // legacy_version (2), random (32).
    r.take(2 + 32)?;
    let session = r.u8()?;
    if session > 32 {
        return Err(Field::Malformed("a session id over 32 bytes"));
    }
    r.take(session)?;
    let suites = r.u16()?;
    if suites < 2 || suites % 2 != 0 {
        return Err(Field::Malformed("an empty or odd cipher suite list"));
    }
    r.take(suites)?;
    let compression = r.u8()?;
    if compression == 0 {
        return Err(Field::Malformed("an empty compression method list"));
    }
    r.take(compression)?;
    if whole && r.p == body.len() {
        // No extensions at all (TLS 1.2 allows it): no server name.
        return Ok(None);
    }
    let ext_len = r.u16()?;
    if whole && r.p + ext_len != body.len() {
        return Err(Field::Malformed(
            "the extensions do not end where the ClientHello does",
        ));
    }
    let end = r.p + ext_len;
    let mut found = None;
    while r.p < end {
        let ty = r.u16()?;
        let len = r.u16()?;
        if r.p + len > end {
            return Err(Field::Malformed(
                "an extension runs past the extension list",
            ));
        }
        let data = r.take(len)?;
        if ty == 0 {
            if found.is_some() {
                return Err(Field::Malformed("two server_name extensions"));
            }
            found = Some(host_name(data)?);
            if !whole {
                // Cut at the bound: the name is all that is wanted.
                return Ok(found);
            }
        }
    }
    Ok(found)
}

/// The host name in a `server_name` extension's data (RFC 6066 §3).
fn host_name(data: &[u8]) -> Result<String, Field> {
    let bad = Field::Malformed;
    let mut r = Reader { b: data, p: 0 };
    let list = r
        .u16()
        .map_err(|_| bad("a server_name extension too short"))?;
    if list + 2 != data.len() || list == 0 {
        return Err(bad("a server_name list whose length is wrong"));
    }
    let mut name = None;
    while r.p < data.len() {
        let ty = r.u8().map_err(|_| bad("a server_name entry cut short"))?;
        let len = r.u16().map_err(|_| bad("a server_name entry cut short"))?;
        let value = r
            .take(len)
            .map_err(|_| bad("a server_name entry cut short"))?;
        if ty == 0 {
            if name.is_some() {
                return Err(bad("two host names in server_name"));
            }
            name = Some(value);
        }
    }
    let name = name.ok_or(bad("a server_name extension without a host name"))?;
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(bad("a host name that is empty or over 253 bytes"));
    }
    if !name
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
    {
        return Err(bad("a host name that is not a DNS name"));
    }
    // Only ASCII is left, so this cannot fail; no panic path either way.
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// Whether an HTTP connection opens with the HTTP/2 preface, decided from
/// its bytes as they are read, in pieces of any size.
#[derive(Debug, Clone, Default)]
pub struct Preface {
    /// Preface bytes matched so far.
    matched: usize,
    decided: bool,
}

/// What [`Preface::feed`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefaceIs {
    /// All of the preface arrived: HTTP/2 with prior knowledge.
    H2,
    /// A byte differs from the preface: HTTP/1.x.
    Other,
}

impl Preface {
    /// Feeds the next bytes read. Returns the decision once, when the
    /// bytes make it (`None` before, and after).
    pub fn feed(&mut self, new: &[u8]) -> Option<PrefaceIs> {
        if self.decided || new.is_empty() {
            return None;
        }
        let at = self.matched;
        let want = &H2_PREFACE[at..];
        let n = new.len().min(want.len());
        if new[..n] != want[..n] {
            self.decided = true;
            return Some(PrefaceIs::Other);
        }
        self.matched = at + n;
        if at + n == H2_PREFACE.len() {
            self.decided = true;
            return Some(PrefaceIs::H2);
        }
        None
    }

    /// Whether a decision was made.
    pub fn decided(&self) -> bool {
        self.decided
    }
}

#[cfg(test)]
mod tests;
