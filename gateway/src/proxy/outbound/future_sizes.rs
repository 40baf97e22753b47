//! The request path's futures stay small: a regression guard.
//!
//! An `async fn` keeps its arguments and every local live across an
//! `.await` in its state, and embeds each awaited sub-future whole. On the
//! request path these states are moved by value (hyper's dispatcher moves
//! the service future into its slot; `Box::pin` moves a future into its
//! box), so every KiB here is a KiB of `memcpy` per request (issue 17).
//! Each bound is a little above the size measured when it was set.
//!
//! When a bound fails: find the local or the awaited sub-future that grew
//! (`-Zprint-type-sizes` on nightly lists a future's fields), then keep it
//! out of the state across the await (scope it, borrow rather than move),
//! or `Box::pin` the sub-future when it is large and awaited at most once
//! per request. Raise a bound only for a cost that is worth it, and say so
//! in the commit.

use super::*;

/// The size of what `f` returns, without calling it: a future's size is
/// its type's, unpolled or not.
fn size_of_return<T>(_: impl FnOnce() -> T) -> usize {
    std::mem::size_of::<T>()
}

/// A value of any type, for naming a call in a closure that never runs.
fn never<T>() -> T {
    unreachable!("only the type of the call is measured")
}

/// Each request-path future's size, with its bound.
fn sizes() -> Vec<(&'static str, usize, usize)> {
    vec![
        (
            // What hyper's dispatcher moves: a pointer (the box holds
            // handle_http's future and a few words).
            "serve_request (hyper's)",
            size_of_return(|| serve_request(never(), never(), never(), never())),
            16,
        ),
        (
            "handle_http",
            size_of_return(|| handle_http(never(), never(), never())),
            4800,
        ),
        (
            "route_and_forward",
            size_of_return(|| route_and_forward(never(), never(), never())),
            4200,
        ),
        (
            "connect",
            size_of_return(|| connect(never(), never(), never())),
            320,
        ),
        (
            "execute",
            size_of_return(|| {
                execute(
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                )
            }),
            2750,
        ),
        (
            "forward",
            size_of_return(|| forward::<Live<'_>>(never(), never(), never(), never(), never())),
            1630,
        ),
        (
            "retry",
            size_of_return(|| retry::<Live<'_>>(never(), never(), never(), never(), never())),
            1200,
        ),
        (
            "Live::send",
            size_of_return(|| <Live<'_> as Tries>::send(never(), never(), never(), never())),
            336,
        ),
        (
            "forward_local",
            size_of_return(|| {
                forward_local(
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                )
            }),
            2800,
        ),
        (
            "forward_remote",
            size_of_return(|| {
                forward_remote(
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                    never(),
                )
            }),
            1540,
        ),
        ("open_stream", size_of_return(|| open_stream(never())), 256),
        (
            "Link::open",
            size_of_return(|| crate::tunnel::link::Link::open(never())),
            120,
        ),
        (
            "write_frame",
            size_of_return(|| body::write_frame(never(), never())),
            192,
        ),
        ("read_head", size_of_return(|| read_head(never())), 112),
        (
            "Upstream::send",
            size_of_return(|| crate::upstream::Upstream::send(never(), never(), never(), never())),
            1850,
        ),
        (
            "tcp_proxy (TLS passthrough)",
            size_of_return(|| tcp_proxy::<TcpStream>(never(), never(), never(), never())),
            2000,
        ),
        (
            "tcp_proxy (CONNECT)",
            size_of_return(|| {
                tcp_proxy::<TokioIo<hyper::upgrade::Upgraded>>(never(), never(), never(), never())
            }),
            2000,
        ),
    ]
}

#[test]
fn request_path_futures_stay_under_their_size_bounds() {
    let sizes = sizes();
    for (name, size, _) in &sizes {
        println!("{name:<28} {size:>6} bytes");
    }
    let over: Vec<String> = sizes
        .iter()
        .filter(|(_, size, bound)| size > bound)
        .map(|(name, size, bound)| format!("{name}: {size} bytes, bound {bound}"))
        .collect();
    assert!(
        over.is_empty(),
        "request-path futures grew past their bounds (module docs of \
         proxy::outbound::future_sizes say what to do):\n{}",
        over.join("\n")
    );
}
