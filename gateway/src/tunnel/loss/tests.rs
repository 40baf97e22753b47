use std::time::{Duration, Instant};

use super::*;

const RTT: Duration = Duration::from_millis(20);

/// Feeds `n` samples, one per sampling period, each adding `sent` packets
/// of which `lost` are lost, at a smoothed RTT of `rtt` (minimum 20 ms).
struct Feed {
    w: LossWindow,
    t0: Instant,
    k: u32,
    sent: u64,
    lost: u64,
    changes: Vec<Verdict>,
}

impl Feed {
    fn new(window: Duration) -> Self {
        Feed {
            w: LossWindow::new(window),
            t0: Instant::now(),
            k: 0,
            sent: 0,
            lost: 0,
            changes: Vec::new(),
        }
    }

    fn run(&mut self, n: usize, sent: u64, lost: u64, rtt: Duration) -> &mut Self {
        for _ in 0..n {
            self.sent += sent;
            self.lost += lost;
            let s = Sample {
                at: self.t0 + self.w.sample_every() * self.k,
                sent: self.sent,
                lost: self.lost,
                congestion_events: self.lost,
                rtt,
                min_rtt: RTT,
            };
            self.k += 1;
            if let Some(c) = self.w.record(s) {
                self.changes.push(c);
            }
        }
        self
    }
}

#[test]
fn one_percent_loss_with_a_flat_rtt_is_random_loss_once_the_window_has_enough_packets() {
    let mut f = Feed::new(DEFAULT_WINDOW);
    assert_eq!(f.w.sample_every(), Duration::from_secs(3));
    // 100 packets per 3 s, 1 lost: after 2 samples 100 sent (too few).
    f.run(2, 100, 1, RTT);
    assert!(!f.w.view().random_loss, "{:?}", f.w.view());
    // After 4 samples: 300 sent, 3 lost: on.
    f.run(2, 100, 1, RTT);
    let v = f.w.view();
    assert!(v.random_loss, "{v:?}");
    assert_eq!((v.sent, v.lost), (300, 3));
    assert_eq!(v.ratio, Some(0.01));
    assert_eq!(f.changes, vec![Verdict::TurnedOn]);
}

#[test]
fn the_window_slides_over_the_last_ten_periods_and_memory_stays_fixed() {
    let mut f = Feed::new(DEFAULT_WINDOW);
    // A lossy minute, then a clean one.
    f.run(20, 1000, 20, RTT);
    let v = f.w.view();
    assert_eq!((v.span_s, v.sent, v.lost), (30.0, 10_000, 200), "{v:?}");
    assert!(v.random_loss);
    f.run(20, 1000, 0, RTT);
    let v = f.w.view();
    assert_eq!(
        (v.span_s, v.sent, v.lost, v.ratio),
        (30.0, 10_000, 0, Some(0.0))
    );
    assert!(!v.random_loss);
    assert_eq!(f.changes, vec![Verdict::TurnedOn, Verdict::TurnedOff]);
    assert!(std::mem::size_of::<LossWindow>() < 1024);
}

#[test]
fn loss_below_the_threshold_or_too_few_lost_packets_is_not_a_verdict() {
    // 0.4%: below 0.5%.
    let mut f = Feed::new(DEFAULT_WINDOW);
    f.run(30, 1000, 4, RTT);
    assert!(!f.w.view().random_loss, "{:?}", f.w.view());
    // 2 of 200: 1%, but two packets prove little.
    let mut f = Feed::new(DEFAULT_WINDOW);
    f.run(3, 100, 1, RTT);
    assert_eq!((f.w.view().sent, f.w.view().lost), (200, 2));
    assert!(!f.w.view().random_loss);
    assert!(f.changes.is_empty());
}

#[test]
fn loss_with_a_rising_rtt_is_a_full_queue_not_random_loss() {
    let mut f = Feed::new(DEFAULT_WINDOW);
    // 2% loss while the smoothed RTT sits 60 ms above the 20 ms minimum.
    f.run(15, 1000, 20, Duration::from_millis(80));
    let v = f.w.view();
    assert!(!v.random_loss, "{v:?}");
    assert!((v.queue_ms - 60.0).abs() < 1e-6, "{v:?}");
    // Random loss, then the queue builds: off.
    let mut f = Feed::new(DEFAULT_WINDOW);
    f.run(15, 1000, 20, RTT)
        .run(1, 1000, 20, Duration::from_millis(80));
    assert_eq!(f.changes, vec![Verdict::TurnedOn, Verdict::TurnedOff]);
    // Jitter within the slack (10 ms, or a quarter of the minimum) is no
    // queue.
    let mut f = Feed::new(DEFAULT_WINDOW);
    f.run(15, 1000, 20, RTT + Duration::from_millis(9));
    assert!(f.w.view().random_loss);
}

#[test]
fn hysteresis_keeps_the_verdict_between_the_two_thresholds_and_through_idle_windows() {
    let mut f = Feed::new(DEFAULT_WINDOW);
    f.run(11, 1000, 10, RTT);
    assert!(f.w.view().random_loss);
    // 0.3%: under the 0.5% to turn on, over the 0.25% to turn off.
    f.run(11, 1000, 3, RTT);
    assert!(f.w.view().random_loss, "{:?}", f.w.view());
    // Idle: no evidence either way.
    f.run(11, 5, 0, RTT);
    assert!(f.w.view().random_loss, "{:?}", f.w.view());
    // 0.2%: off.
    f.run(11, 1000, 2, RTT);
    assert!(!f.w.view().random_loss, "{:?}", f.w.view());
    assert_eq!(f.changes, vec![Verdict::TurnedOn, Verdict::TurnedOff]);
}

#[test]
fn counters_going_backwards_start_the_window_again() {
    let mut f = Feed::new(DEFAULT_WINDOW);
    f.run(11, 1000, 10, RTT);
    assert!(f.w.view().random_loss);
    // A new connection: quinn's counters start from 0.
    let s = Sample {
        at: f.t0 + Duration::from_secs(40),
        sent: 10,
        lost: 0,
        congestion_events: 0,
        rtt: RTT,
        min_rtt: RTT,
    };
    assert_eq!(f.w.record(s), Some(Verdict::TurnedOff));
    let v = f.w.view();
    assert_eq!(
        (v.sent, v.lost, v.ratio, v.random_loss),
        (0, 0, None, false)
    );
}

#[test]
fn a_short_window_for_tests_samples_ten_times_per_window() {
    let w = LossWindow::new(Duration::from_secs(2));
    assert_eq!(w.sample_every(), Duration::from_millis(200));
    assert_eq!(w.view().window_s, 2.0);
}
