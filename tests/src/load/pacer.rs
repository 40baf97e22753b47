//! The clock of a run: a blocking thread that emits each request's intended
//! send time when it comes due. What to do with a tick is the caller's.
//!
//! Why a thread: tokio's timer wheel has a 1 ms resolution, so pacing with
//! `sleep_until` would send most requests up to a millisecond late, and as
//! latency is counted from the intended time, that lateness would show up in
//! every percentile (about 0.7 ms at the median, measured against a trivial
//! local server). A thread waiting on a condition variable wakes within
//! tens of microseconds of its deadline. When it falls behind anyway (a busy
//! machine, or intervals shorter than a wake-up), it emits every overdue
//! tick at once, each with its own intended time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use tokio::sync::mpsc;
use tokio::time::Instant;

/// Ticks from the pacing thread; dropping it stops the thread.
#[derive(Debug)]
pub(super) struct Pacer {
    ticks: mpsc::UnboundedReceiver<Instant>,
    stop: Arc<Stop>,
}

#[derive(Debug, Default)]
struct Stop {
    stopped: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Pacer {
    /// Starts emitting `rate` ticks per second from `start` until `end`
    /// (`None`: until dropped), on tokio's blocking pool.
    pub fn start(start: Instant, end: Option<Instant>, rate: u32) -> Self {
        let (tx, ticks) = mpsc::unbounded_channel();
        let stop = Arc::new(Stop::default());
        let shared = Arc::clone(&stop);
        // The handle is not needed: the thread ends when the schedule does,
        // when `Pacer` is dropped, or when the receiver is.
        drop(tokio::task::spawn_blocking(move || {
            pace(
                &tx,
                &shared,
                start.into_std(),
                end.map(Instant::into_std),
                rate,
            );
        }));
        Pacer { ticks, stop }
    }

    /// The next intended send time, once it is due; `None` when the
    /// schedule is over.
    pub async fn next(&mut self) -> Option<Instant> {
        self.ticks.recv().await
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.stopped.store(true, Ordering::SeqCst);
        // Taking the lock orders this after the pacer's check of `stopped`,
        // so the notification cannot fall between its check and its wait.
        let _guard = self
            .stop
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.stop.wake.notify_all();
    }
}

fn pace(
    tx: &mpsc::UnboundedSender<Instant>,
    stop: &Stop,
    start: std::time::Instant,
    end: Option<std::time::Instant>,
    rate: u32,
) {
    let mut i: u64 = 0;
    // Nothing to send at rate 0, nor past the representable future.
    while let Some(intended) = super::offset(i, rate).and_then(|o| start.checked_add(o)) {
        if end.is_some_and(|end| intended >= end) {
            return;
        }
        let now = std::time::Instant::now();
        if intended > now {
            let guard = stop.lock.lock().unwrap_or_else(PoisonError::into_inner);
            if stop.stopped.load(Ordering::SeqCst) {
                return;
            }
            // Spurious and early wake-ups just go round the loop again.
            let _ = stop
                .wake
                .wait_timeout(guard, intended - now)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        if stop.stopped.load(Ordering::SeqCst) || tx.send(Instant::from_std(intended)).is_err() {
            return;
        }
        i += 1;
    }
}
