//! Sustained random loss on a link: the share of the packets this gateway
//! sent that QUIC declared lost, over a sliding window, and a verdict that
//! says whether the link looks like a lossy radio or satellite path (loss
//! without a growing queue) rather than a congested one.
//!
//! Pure: the link's sampler ([`super::link`]) feeds it quinn's counters at
//! a fixed period, with the time of each sample; nothing here reads a clock
//! or a socket. Memory is fixed: a ring of [`SLOTS`] samples, whatever the
//! traffic.
//!
//! The rules (docs/operations.md, "Lossy links"):
//! - the window is the span of the ring: [`SLOTS`] − 1 sampling periods
//!   (30 s by default, [`DEFAULT_WINDOW`]);
//! - the ratio is `lost / sent` between the oldest and the newest sample;
//! - the verdict turns on when the ratio is at least [`ON_RATIO`] (0.5%)
//!   over at least [`MIN_SENT`] packets with at least [`MIN_LOST`] lost,
//!   and the RTT did not rise over the window: every sampled smoothed RTT
//!   stayed within max([`QUEUE_SLACK`], min RTT / 4) of the path's minimum,
//!   so the loss is not a full queue overflowing;
//! - it turns off when the ratio falls below [`OFF_RATIO`] (0.25%) over at
//!   least [`MIN_SENT`] packets, or when the RTT rises; with fewer packets
//!   than that in the window it stays as it was (no evidence either way).
//!
//! It measures one direction: the packets this end sent. The peer measures
//! the other on the link it dialed, and shows it in its own `/peers`.

use std::time::{Duration, Instant};

/// The window when none is configured.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
/// Samples kept: the window is `SLOTS - 1` sampling periods.
pub const SLOTS: usize = 11;
/// Loss ratio at or above which the verdict turns on.
pub const ON_RATIO: f64 = 0.005;
/// Loss ratio below which the verdict turns off again (hysteresis).
pub const OFF_RATIO: f64 = 0.0025;
/// Packets sent in the window below which the window proves nothing.
pub const MIN_SENT: u64 = 200;
/// Packets lost in the window below which the verdict does not turn on.
pub const MIN_LOST: u64 = 3;
/// Smoothed RTT above the path's minimum by more than this (or a quarter
/// of the minimum, whichever is larger) reads as a queue.
pub const QUEUE_SLACK: Duration = Duration::from_millis(10);

/// quinn's counters for a connection at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: Instant,
    /// Packets sent on the connection so far.
    pub sent: u64,
    /// Packets declared lost so far.
    pub lost: u64,
    /// Congestion events (window reductions) so far.
    pub congestion_events: u64,
    /// Smoothed RTT now.
    pub rtt: Duration,
    /// The smallest RTT seen on the path.
    pub min_rtt: Duration,
}

/// What the window shows, for `/peers` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LossView {
    /// The window's configured length, in seconds.
    pub window_s: f64,
    /// The span the samples cover now (shorter than the window until the
    /// ring is full, e.g. after a reconnect), in seconds.
    pub span_s: f64,
    /// Packets sent and declared lost within the span.
    pub sent: u64,
    pub lost: u64,
    /// Congestion events within the span.
    pub congestion_events: u64,
    /// `lost / sent` within the span; `None` before two samples.
    pub ratio: Option<f64>,
    /// The largest smoothed RTT above the path's minimum within the span,
    /// in ms: near 0 for random loss, large for a full queue.
    pub queue_ms: f64,
    /// Sustained random loss (the module's rules).
    pub random_loss: bool,
}

/// A change of the verdict, returned by [`LossWindow::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    TurnedOn,
    TurnedOff,
}

/// The ring of samples of one connection.
#[derive(Debug, Clone)]
pub struct LossWindow {
    window: Duration,
    ring: [Option<Sample>; SLOTS],
    /// Where the next sample goes.
    next: usize,
    random_loss: bool,
}

impl LossWindow {
    /// An empty window of `window` (at least [`SLOTS`] − 1 ms).
    pub fn new(window: Duration) -> Self {
        LossWindow {
            window: window.max(Duration::from_millis(SLOTS as u64 - 1)),
            ring: [None; SLOTS],
            next: 0,
            random_loss: false,
        }
    }

    /// How often the link should call [`LossWindow::record`].
    pub fn sample_every(&self) -> Duration {
        self.window / (SLOTS as u32 - 1)
    }

    /// Forgets every sample and the verdict (a new connection: quinn's
    /// counters start again from 0).
    pub fn reset(&mut self) {
        *self = LossWindow::new(self.window);
    }

    /// Adds a sample and re-decides. Counters that went backwards mean a
    /// new connection: the window starts again from this sample.
    pub fn record(&mut self, s: Sample) -> Option<Verdict> {
        if let Some(last) = self.newest()
            && (s.sent < last.sent || s.lost < last.lost || s.at < last.at)
        {
            let was = self.random_loss;
            self.reset();
            self.push(s);
            return was.then_some(Verdict::TurnedOff);
        }
        self.push(s);
        let v = self.view();
        let was = self.random_loss;
        let enough = v.sent >= MIN_SENT;
        let ratio = v.ratio.unwrap_or(0.0);
        let queue = self.queue();
        self.random_loss = if queue {
            false
        } else if !was {
            enough && v.lost >= MIN_LOST && ratio >= ON_RATIO
        } else {
            !(enough && ratio < OFF_RATIO)
        };
        match (was, self.random_loss) {
            (false, true) => Some(Verdict::TurnedOn),
            (true, false) => Some(Verdict::TurnedOff),
            _ => None,
        }
    }

    /// The window's figures now.
    pub fn view(&self) -> LossView {
        let mut v = LossView {
            window_s: self.window.as_secs_f64(),
            random_loss: self.random_loss,
            queue_ms: self.queue_delay().as_secs_f64() * 1e3,
            ..LossView::default()
        };
        if let (Some(old), Some(new)) = (self.oldest(), self.newest())
            && new.at > old.at
        {
            v.span_s = (new.at - old.at).as_secs_f64();
            v.sent = new.sent.saturating_sub(old.sent);
            v.lost = new.lost.saturating_sub(old.lost);
            v.congestion_events = new.congestion_events.saturating_sub(old.congestion_events);
            v.ratio = Some(if v.sent == 0 {
                0.0
            } else {
                v.lost as f64 / v.sent as f64
            });
        }
        v
    }

    fn push(&mut self, s: Sample) {
        self.ring[self.next] = Some(s);
        self.next = (self.next + 1) % SLOTS;
    }

    fn newest(&self) -> Option<&Sample> {
        self.ring[(self.next + SLOTS - 1) % SLOTS].as_ref()
    }

    /// The oldest sample kept: the slot about to be overwritten, or the
    /// first one while the ring is filling.
    fn oldest(&self) -> Option<&Sample> {
        self.ring[self.next].as_ref().or(self.ring[0].as_ref())
    }

    /// The largest smoothed RTT above the path's minimum, over the samples.
    fn queue_delay(&self) -> Duration {
        self.ring
            .iter()
            .flatten()
            .map(|s| s.rtt.saturating_sub(s.min_rtt))
            .max()
            .unwrap_or_default()
    }

    /// Whether the RTT rose within the window: a queue, not random loss.
    fn queue(&self) -> bool {
        let Some(min_rtt) = self.newest().map(|s| s.min_rtt) else {
            return false;
        };
        self.queue_delay() > QUEUE_SLACK.max(min_rtt / 4)
    }
}

#[cfg(test)]
mod tests;
