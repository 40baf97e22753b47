//! libgit2's socket timeouts, the one place the syncer needs `unsafe`.
//!
//! libgit2 waits on a socket without limit unless a process-wide option
//! says otherwise (`GIT_OPT_SET_SERVER_CONNECT_TIMEOUT`,
//! `GIT_OPT_SET_SERVER_TIMEOUT`: connecting, and each read or write, over
//! `git://`, HTTP(S) and SSH). git2 exposes them as `unsafe fn` because they
//! write a C global without synchronization; they are safe when nothing
//! else uses libgit2 at the same time, which [`set`] ensures by being
//! called once, from `main`, before anything uses libgit2.

#![allow(unsafe_code)]

use std::sync::Once;
use std::time::Duration;

/// Sets libgit2's connect and read/write timeouts to `timeout` (at least
/// 1 ms, at most `i32::MAX` ms). Only the first call has an effect; call it
/// before any thread uses libgit2.
pub fn set(timeout: Duration) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: called once (`Once`), from `main` before the syncer runs,
        // so no other thread reads or writes libgit2's globals meanwhile.
        let set = unsafe {
            git2::opts::set_server_connect_timeout_in_milliseconds(ms)
                .and_then(|()| git2::opts::set_server_timeout_in_milliseconds(ms))
        };
        if let Err(e) = set {
            tracing::warn!(error = %e, "cannot set libgit2's socket timeouts; a silent remote is bounded only by --fetch-timeout's progress checks");
        }
    });
}
