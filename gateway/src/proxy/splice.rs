//! Opaque TCP over a tunnel stream: copying both ways between a TCP-like
//! stream and a tunnel stream pair ([`crate::tunnel::stream`], QUIC or
//! HTTP/2) until both directions end.
//!
//! A gateway holds one spliced stream per open TCP connection, and links
//! carry thousands of them that sit idle most of the time, so what an idle
//! stream holds matters more than the copy loop (design.md's budget is
//! 6.5 KB per open stream). This copy holds no buffer toward the caller
//! and a small one toward the peer:
//!
//! - **peer → caller**: QUIC hands out the chunks it has already buffered
//!   ([`RecvHalf::read_chunk`]); they are written as they are, as
//!   many as are ready in one vectored write, with no copy, and an idle
//!   stream waits holding nothing of ours.
//! - **caller → peer**: each read goes into a fresh buffer that is handed
//!   to QUIC whole ([`SendHalf::write_chunk`], no copy). The buffer
//!   starts at [`MIN_READ`] and adapts: a read that fills it doubles the next
//!   one (up to [`MAX_READ`], for bulk transfers), a short read halves it. An
//!   idle stream therefore waits with [`MIN_READ`] bytes.
//!
//! `tokio::io::copy`, used before, waits with an 8 KiB buffer each way.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::tunnel::stream::{RecvHalf, SendHalf};

/// What an idle stream's read toward the peer holds.
pub const MIN_READ: usize = 1024;

/// The largest read toward the peer: large enough that a bulk transfer
/// costs one QUIC write per 64 KiB.
pub const MAX_READ: usize = 64 * 1024;

/// Copies both ways between `io` and a QUIC stream pair until both
/// directions end. Returns (bytes to the peer, bytes from the peer); the
/// latter starts at `already` (bytes of the peer's that came with its head
/// and were written to `io` before).
///
/// A direction that fails ends that direction: toward the peer, the QUIC
/// stream is finished (or reset by quinn when it was stopped); toward the
/// caller, its write half is shut down.
pub async fn splice<S>(io: S, mut send: SendHalf, mut recv: RecvHalf, already: u64) -> (u64, u64)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut r, mut w) = tokio::io::split(io);
    let up = async {
        let n = to_peer(&mut r, &mut send).await;
        let _ = send.finish();
        n
    };
    let down = async {
        let n = from_peer(&mut recv, &mut w).await;
        let _ = w.shutdown().await;
        n
    };
    let (a, b) = tokio::join!(up, down);
    (a, b + already)
}

/// Caller → peer, with an adaptive buffer. Returns the bytes sent.
async fn to_peer<R>(r: &mut R, send: &mut SendHalf) -> u64
where
    R: AsyncRead + Unpin,
{
    let mut size = MIN_READ;
    let mut total = 0u64;
    loop {
        let mut buf = BytesMut::with_capacity(size);
        let n = match tokio_util::io::read_buf(r, &mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => n,
        };
        size = next_read_size(size, n);
        total += n as u64;
        if send.write_chunk(buf.freeze()).await.is_err() {
            return total;
        }
    }
}

/// Peer → caller, as QUIC buffered the data: it waits for one chunk with
/// nothing of ours held, then takes whatever else QUIC already holds (up
/// to [`CHUNKS`]) into the same vectored write, since chunks are the size
/// of QUIC frames (about a datagram each) and a write per chunk would cost
/// a system call per 1.2 KB. Returns the bytes written.
async fn from_peer<W>(recv: &mut RecvHalf, w: &mut W) -> u64
where
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        let first = match recv.read_chunk(usize::MAX).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) | Err(_) => return total,
        };
        let mut batch = Vec::with_capacity(CHUNKS);
        batch.push(first);
        // An end or an error is seen again by the next wait.
        while batch.len() < CHUNKS {
            match ready_now(recv.read_chunk(usize::MAX)) {
                Some(Ok(Some(chunk))) => batch.push(chunk),
                _ => break,
            }
        }
        let mut pending = &mut batch[..];
        while !pending.is_empty() {
            let slices: Vec<IoSlice<'_>> = pending.iter().map(|c| IoSlice::new(c)).collect();
            let written = match w.write_vectored(&slices).await {
                Ok(0) | Err(_) => return total,
                Ok(written) => written,
            };
            drop(slices);
            total += written as u64;
            pending = advance(pending, written);
        }
    }
}

/// `fut`'s output if it is ready without waiting.
fn ready_now<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Chunks QUIC may hand out at once toward the caller.
const CHUNKS: usize = 32;

/// Drops `n` written bytes from the front of `chunks`.
fn advance(chunks: &mut [Bytes], mut n: usize) -> &mut [Bytes] {
    let mut done = 0;
    for chunk in chunks.iter_mut() {
        if n < chunk.len() {
            chunk.advance(n);
            break;
        }
        n -= chunk.len();
        done += 1;
    }
    &mut chunks[done..]
}

/// The size of the next read toward the peer, after one of `size` bytes
/// returned `n`.
fn next_read_size(size: usize, n: usize) -> usize {
    if n >= size {
        (size * 2).min(MAX_READ)
    } else if n < size / 4 {
        (size / 2).max(MIN_READ)
    } else {
        size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_under_bulk_and_shrink_back_when_idle() {
        let mut size = MIN_READ;
        for _ in 0..20 {
            size = next_read_size(size, size);
        }
        assert_eq!(size, MAX_READ, "full reads grow the buffer to the cap");
        size = next_read_size(size, MAX_READ / 2);
        assert_eq!(size, MAX_READ, "a half-full read keeps the size");
        for _ in 0..20 {
            size = next_read_size(size, 10);
        }
        assert_eq!(size, MIN_READ, "small reads shrink it to the floor");
    }

    #[test]
    fn a_partial_vectored_write_advances_across_chunks() {
        let mut chunks = [
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
            Bytes::from_static(b"fgh"),
        ];
        let rest = advance(&mut chunks, 4);
        assert_eq!(rest.len(), 2);
        assert_eq!(&rest[0][..], b"e");
        assert_eq!(&rest[1][..], b"fgh");
        let rest = advance(rest, 4);
        assert!(rest.is_empty());
    }
}
