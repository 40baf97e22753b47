//! The tunnel's UDP socket: quinn's own tokio socket, with a look at every
//! datagram before quinn gets it, so that what is not QUIC for this gateway
//! is counted.
//!
//! quinn drops plaintext, garbage, datagrams of QUIC versions it does not
//! speak and packets for connection IDs it never issued without a word and
//! without a hook. This module wraps the socket quinn reads from
//! ([`quinn::AsyncUdpSocket`]) and classifies each datagram from its first
//! bytes ([`Classifier::classify`]): one branch on the first byte, a version
//! lookup, and for short headers one keyed hash of the destination
//! connection ID. No allocation and no lock; a relaxed atomic per counted
//! datagram.
//!
//! The classification only counts, except for [`Verdict::NotQuic`]: with
//! the QUIC bit greasing off ([`endpoint_config`]), quinn rejects such a
//! datagram before anything else, so it is dropped here and quinn never
//! copies it. Everything else goes on to quinn, which decides: a short
//! Initial may still belong to a handshake quinn knows, and a packet with a
//! connection ID this gateway never issued may be a peer's stateless reset
//! (quinn matches its token), which is why they are only counted.
//!
//! It also splits every receive batch the kernel coalesced (UDP GRO: one
//! buffer holding several datagrams, `stride` bytes apart) into one buffer
//! per datagram, in the order they arrived ([`split_batches`]). quinn
//! copies each buffer it is given into one allocation and hands out slices
//! of it, so a stream frame of a single datagram keeps its whole batch (up
//! to 64 KiB) alive until the application reads it, and quinn's own bound
//! on that waste counts the datagram, not the batch. A peer that writes to thousands of streams
//! nobody reads (stalled request bodies) pinned batches 30 to 50 times the
//! size of what flow control let it send, and OOM-killed a 128 MiB gateway
//! within a second (RELIABILITY.md, "Hostile network"). Split, each
//! datagram is its own allocation, which quinn's accounting bounds: the
//! copy costs a `memcpy` of each coalesced datagram.
//!
//! It does not own the endpoint, its connections or TLS ([`super::link`]).

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, EndpointConfig, UdpPoller};
use quinn_proto::{DEFAULT_SUPPORTED_VERSIONS, HashedConnectionIdGenerator};

/// RFC 9000 §14.1: a datagram carrying a client's Initial is at least
/// this long; servers discard shorter ones.
const MIN_INITIAL_DATAGRAM: usize = 1200;
/// The connection IDs [`HashedConnectionIdGenerator`] issues are 8 bytes.
const CID_LEN: usize = 8;
const LONG_HEADER: u8 = 0x80;
const FIXED_BIT: u8 = 0x40;

/// What a datagram is, as far as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Possibly QUIC for this gateway: quinn decides.
    Pass,
    /// Not a QUIC packet: the QUIC bit is clear (nobody may grease it
    /// toward us), the header is cut short, or the datagram is empty.
    NotQuic,
    /// A long header of a QUIC version quinn does not speak. quinn answers
    /// it with Version Negotiation when it is at least 1,200 bytes.
    UnsupportedVersion,
    /// An Initial in a datagram under 1,200 bytes, for a connection ID this
    /// gateway did not issue (a server's Initial to our own dial carries our
    /// ID and may be short; a client's must be padded).
    ShortInitial,
    /// A short header whose destination connection ID this gateway never
    /// issued (or a peer's stateless reset: it looks the same).
    UnknownCid,
}

impl Verdict {
    /// Its `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::NotQuic => "not_quic",
            Verdict::UnsupportedVersion => "unsupported_version",
            Verdict::ShortInitial => "short_initial",
            Verdict::UnknownCid => "unknown_cid",
        }
    }

    const COUNTED: [Verdict; 4] = [
        Verdict::NotQuic,
        Verdict::UnsupportedVersion,
        Verdict::ShortInitial,
        Verdict::UnknownCid,
    ];
}

/// Datagrams on the tunnel port that no connection gets, by [`Verdict`].
#[derive(Debug, Default)]
pub struct DatagramDrops([AtomicU64; 4]);

impl DatagramDrops {
    fn record(&self, v: Verdict) {
        let i = match v {
            Verdict::Pass => return,
            Verdict::NotQuic => 0,
            Verdict::UnsupportedVersion => 1,
            Verdict::ShortInitial => 2,
            Verdict::UnknownCid => 3,
        };
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Every reason with its count, zeros included.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Verdict::COUNTED
            .iter()
            .zip(&self.0)
            .map(|(v, n)| (v.reason(), n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Classifies datagrams with the key the endpoint's connection IDs are
/// made with.
pub struct Classifier {
    cids: HashedConnectionIdGenerator,
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Classifier")
    }
}

impl Classifier {
    pub fn new(cid_key: u64) -> Self {
        Classifier {
            cids: HashedConnectionIdGenerator::from_key(cid_key),
        }
    }

    /// Whether quinn may want `d`, and if not, why. Never [`Verdict::Pass`]
    /// for garbage that quinn is sure to drop with the same look, never
    /// anything but `Pass` for a datagram of a connection this endpoint
    /// has (bar a 2^-40 chance that a random connection ID validates).
    pub fn classify(&self, d: &[u8]) -> Verdict {
        let Some(&first) = d.first() else {
            return Verdict::NotQuic;
        };
        if first & FIXED_BIT == 0 {
            return Verdict::NotQuic;
        }
        if first & LONG_HEADER == 0 {
            return match d.get(1..1 + CID_LEN) {
                None => Verdict::NotQuic,
                Some(cid) if self.issued(cid) => Verdict::Pass,
                Some(_) => Verdict::UnknownCid,
            };
        }
        let Some(version) = d.get(1..5) else {
            return Verdict::NotQuic;
        };
        let version = u32::from_be_bytes([version[0], version[1], version[2], version[3]]);
        if version == 0 {
            // Version Negotiation, for our own dial: quinn's to judge.
            return Verdict::Pass;
        }
        if !DEFAULT_SUPPORTED_VERSIONS.contains(&version) {
            return Verdict::UnsupportedVersion;
        }
        let initial = (first & 0x30) >> 4 == 0;
        if !initial || d.len() >= MIN_INITIAL_DATAGRAM {
            return Verdict::Pass;
        }
        let dcid = d
            .get(5)
            .and_then(|&n| d.get(6..6 + usize::from(n)))
            .filter(|c| c.len() == CID_LEN);
        match dcid {
            Some(cid) if self.issued(cid) => Verdict::Pass,
            _ => Verdict::ShortInitial,
        }
    }

    fn issued(&self, cid: &[u8]) -> bool {
        self.cids.validate(&ConnectionId::new(cid)).is_ok()
    }

    /// Classifies every datagram of a receive batch (a GRO buffer holds
    /// several, `stride` bytes apart), counts what is not for us, and drops
    /// the buffers that hold nothing but [`Verdict::NotQuic`] by moving the
    /// kept ones to the front. Returns how many are kept.
    fn filter(
        &self,
        drops: &DatagramDrops,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        n: usize,
    ) -> usize {
        let mut kept = 0;
        for i in 0..n.min(bufs.len()).min(meta.len()) {
            let (len, stride) = (meta[i].len, meta[i].stride);
            let stride = if stride == 0 { len } else { stride };
            let data = bufs[i].get(..len).unwrap_or(&[]);
            let mut keep = false;
            if data.is_empty() {
                // An empty datagram: quinn skips it.
                drops.record(Verdict::NotQuic);
            }
            for d in data.chunks(stride.max(1)) {
                let v = self.classify(d);
                drops.record(v);
                keep |= v != Verdict::NotQuic;
            }
            if keep {
                bufs.swap(i, kept);
                meta.swap(i, kept);
                kept += 1;
            }
        }
        kept
    }
}

/// The endpoint settings the classification relies on: connection IDs
/// keyed with `cid_key`, the versions [`Classifier`] knows, and no QUIC bit
/// greasing (RFC 9287): without the transport parameter, no peer may clear
/// the bit toward us, so a clear bit is never QUIC.
pub fn endpoint_config(cid_key: u64) -> EndpointConfig {
    let mut config = EndpointConfig::default();
    config
        .cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)))
        .supported_versions(DEFAULT_SUPPORTED_VERSIONS.to_vec())
        .grease_quic_bit(false);
    config
}

/// quinn's socket, classifying what it receives.
pub struct ClassifyingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    classifier: Classifier,
    drops: Arc<DatagramDrops>,
    /// Datagrams split from a batch that did not fit the receive buffers
    /// quinn gave: handed over, in order, before anything new is received.
    /// At most one receive's worth.
    split: Mutex<VecDeque<(RecvMeta, Vec<u8>)>>,
}

impl fmt::Debug for ClassifyingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyingSocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl ClassifyingSocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, cid_key: u64, drops: Arc<DatagramDrops>) -> Self {
        ClassifyingSocket {
            inner,
            classifier: Classifier::new(cid_key),
            drops,
            split: Mutex::default(),
        }
    }
}

impl AsyncUdpSocket for ClassifyingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // A poisoned lock only means a panic elsewhere mid-update of a
        // queue of whole datagrams; it stays usable.
        let mut split = self.split.lock().unwrap_or_else(PoisonError::into_inner);
        let n = if split.is_empty() {
            let lim = bufs.len().min(meta.len()).min(MAX_SLOTS);
            let n = ready!(self.inner.poll_recv(cx, &mut bufs[..lim], &mut meta[..lim]))?;
            split_batches(bufs, meta, n, &mut split)
        } else {
            take_split(bufs, meta, &mut split)
        };
        drop(split);
        let kept = self.classifier.filter(&self.drops, bufs, meta, n);
        if kept == 0 && n > 0 {
            // All dropped. Ready(0) would have quinn's receive loop spin
            // without counting work (no fairness bound under a flood), so
            // yield instead and be polled again at once.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(kept))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// At most this many buffers are handed to quinn per receive (quinn gives
/// 32 on Linux); more are left unused.
const MAX_SLOTS: usize = 64;

/// Splits each of the `n` received buffers that holds a coalesced batch
/// (`stride < len`) into one buffer per datagram, keeping the order in
/// which they arrived: the first datagram of a batch stays in its buffer,
/// the next are copied into the buffers quinn gave beyond `n`, and the
/// buffers are then put in arrival order (only the slice descriptors
/// move). What does not fit, and every buffer received after it, is
/// queued in `rest`, in order. Returns how many buffers hold a datagram
/// now.
///
/// The order matters: quinn's loss detection declares a packet lost once
/// three later ones are acknowledged, so handing a later batch's first
/// datagram over before an earlier batch's tail made the peer see gaps
/// that were not there (spurious losses, each of which halved CUBIC's
/// window; docs/benchmarks.md, "Transport").
fn split_batches(
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
    n: usize,
    rest: &mut VecDeque<(RecvMeta, Vec<u8>)>,
) -> usize {
    let slots = bufs.len().min(meta.len()).min(MAX_SLOTS);
    let n = n.min(slots);
    // order[k]: the buffer that goes k-th; the first `out` are handed over.
    let mut order = [0usize; MAX_SLOTS];
    let mut out = 0;
    let mut free = n;
    let mut full = false;
    for i in 0..n {
        let (len, stride) = (meta[i].len, meta[i].stride);
        let stride = if stride == 0 || stride >= len {
            len
        } else {
            stride
        };
        let mut at = 0;
        if !full {
            order[out] = i;
            out += 1;
            (meta[i].len, meta[i].stride) = (stride, stride);
            at = stride;
        }
        while at < len {
            let end = (at + stride).min(len);
            let mut m = meta[i];
            (m.len, m.stride) = (end - at, end - at);
            let (head, tail) = bufs.split_at_mut(free.max(i + 1));
            let src = head[i].get(at..end).unwrap_or(&[]);
            match tail.first_mut().and_then(|b| b.get_mut(..src.len())) {
                Some(dst) if !full && free < slots => {
                    dst.copy_from_slice(src);
                    meta[free] = m;
                    order[out] = free;
                    out += 1;
                    free += 1;
                }
                _ => {
                    full = true;
                    rest.push_back((m, src.to_vec()));
                }
            }
            at = end;
        }
    }
    // The buffers whose datagrams were all queued go last, unused.
    let mut k = out;
    for i in 0..n {
        if !order[..out].contains(&i) {
            order[k] = i;
            k += 1;
        }
    }
    permute(bufs, meta, &order[..k]);
    out
}

/// Puts buffer `order[k]` at position `k`, for every `k`, by swaps
/// (`order` is a permutation of `0..order.len()`).
fn permute(bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], order: &[usize]) {
    for (k, &wanted) in order.iter().enumerate() {
        // Where the buffer wanted here is now: swaps at earlier
        // positions moved it along their chain.
        let mut src = wanted;
        while src < k {
            src = order[src];
        }
        bufs.swap(k, src);
        meta.swap(k, src);
    }
}

/// Hands over datagrams queued by [`split_batches`], as many as fit.
fn take_split(
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
    rest: &mut VecDeque<(RecvMeta, Vec<u8>)>,
) -> usize {
    let mut used = 0;
    for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()) {
        let Some((next, data)) = rest.pop_front() else {
            break;
        };
        let Some(dst) = buf.get_mut(..data.len()) else {
            // Never: quinn's buffers hold a whole batch. Put it back for
            // the next buffer rather than lose it.
            rest.push_front((next, data));
            break;
        };
        dst.copy_from_slice(&data);
        *m = next;
        used += 1;
    }
    used
}

#[cfg(test)]
mod tests;
