//! Outlier detection: passive health checking of local endpoints, with
//! Envoy's (and so Istio's) semantics for consecutive errors.
//!
//! One [`Detector`] per upstream cluster (service, subset, port: what Istio
//! makes one Envoy cluster of), fed with the outcome of every request:
//! - `consecutive5xxErrors`: any 5xx, and local failures (connect failure,
//!   reset), which Envoy maps to 503 when it does not split local-origin
//!   errors (Istio's setting);
//! - `consecutiveGatewayErrors`: 502, 503, 504 and local failures. A 5xx
//!   that is not a gateway error resets this counter, any non-5xx resets
//!   both.
//!
//! An endpoint that reaches a threshold is ejected for `baseEjectionTime ×
//! n`, where `n` counts its ejections (capped at 300 s or the base, as
//! Envoy's `max_ejection_time`), unless that would leave more than
//! `maxEjectionPercent` of the pool ejected: an ejection happens only while
//! `(ejected + 1) × 100 ≤ maxEjectionPercent × pool size` (Istio's default
//! 10% therefore ejects nothing from a pool of fewer than 10 endpoints, as
//! in Istio). Ejections end on the detector's `interval` sweep, as Envoy's
//! timer does: at the first tick (counted from the detector's creation) at
//! or after the ejection time. Each `interval` an endpoint then spends
//! without being ejected takes one off `n`, so a recovered endpoint's next
//! ejection is short again.
//!
//! This module is pure: no clock of its own (every call takes `now`), no
//! I/O. [`super`] owns the detectors, filters ejected endpoints out of the
//! balancer, and tells peers (announcements) which endpoints are ejected.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshfed_policy::snapshot::OutlierDetection;
use rustc_hash::FxHashMap;

/// Envoy's default `max_ejection_time`: no ejection lasts longer than this
/// (or the base ejection time, when that is longer).
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// An outlier detection policy, in the units the detector uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    /// Consecutive local-origin failures (connect failures, resets) alone:
    /// only the default [`OutlierConfig::FAILURE_ACCRUAL`] sets it.
    pub consecutive_local: Option<u32>,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl From<&OutlierDetection> for OutlierConfig {
    fn from(o: &OutlierDetection) -> Self {
        OutlierConfig {
            consecutive_5xx: o.consecutive_5xx_errors,
            consecutive_gateway: o.consecutive_gateway_errors,
            consecutive_local: None,
            // A zero interval would make the sweep spin; 1 ms is Istio's minimum.
            interval: Duration::from_millis(o.interval_ms.max(1)),
            base_ejection: Duration::from_millis(o.base_ejection_time_ms.max(1)),
            max_ejection_percent: o.max_ejection_percent.min(100),
            min_health_percent: o.min_health_percent.min(100),
        }
    }
}

impl OutlierConfig {
    /// What applies when no DestinationRule configures outlier detection:
    /// an endpoint that refuses or resets 5 requests in a row is taken out
    /// for 2 s (growing with repeats), whatever the share of the pool that
    /// means, so that a dead endpoint (or every endpoint of a dead cluster)
    /// stops receiving first tries at once and peers are told. Answers with
    /// a status, 5xx or not, never count: that needs an explicit policy.
    /// This is Linkerd's default failure accrual more than Envoy's (which
    /// has none); Kubernetes readiness does the same job in Istio, and
    /// static and DNS discovery have no readiness.
    pub const FAILURE_ACCRUAL: OutlierConfig = OutlierConfig {
        consecutive_5xx: None,
        consecutive_gateway: None,
        consecutive_local: Some(5),
        interval: Duration::from_millis(500),
        base_ejection: Duration::from_secs(2),
        max_ejection_percent: 100,
        min_health_percent: 0,
    };
}

/// What a request to an endpoint came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// The gateway could not connect, or the endpoint reset the request.
    LocalFailure,
}

/// Why an endpoint was ejected; the `reason` label of
/// `meshfed_outlier_ejections_total`, in Envoy's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectReason {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
}

impl EjectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EjectReason::Consecutive5xx => "consecutive_5xx",
            EjectReason::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectReason::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
        }
    }
}

/// What one outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Nothing changed in the set of ejected endpoints.
    Nothing,
    /// The endpoint was ejected until the given time.
    Ejected(EjectReason, Instant),
    /// A threshold was reached, but `maxEjectionPercent` forbade the ejection.
    Capped(EjectReason),
}

#[derive(Debug, Clone, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    /// Ejections counted for the growing ejection time.
    multiplier: u32,
    /// Ejected until then.
    ejected_until: Option<Instant>,
    /// Since when the endpoint is in service (for the multiplier's decay).
    in_service_since: Option<Instant>,
}

/// The outlier state of one upstream cluster.
#[derive(Debug)]
pub struct Detector {
    origin: Instant,
    hosts: FxHashMap<SocketAddr, Host>,
}

impl Detector {
    /// A detector whose sweep ticks count from `origin`.
    pub fn new(origin: Instant) -> Self {
        Detector {
            origin,
            hosts: FxHashMap::default(),
        }
    }

    /// Records an outcome of a request to `addr`, in a pool of `pool_size`
    /// endpoints.
    pub fn record(
        &mut self,
        cfg: &OutlierConfig,
        addr: SocketAddr,
        outcome: Outcome,
        pool_size: usize,
        now: Instant,
    ) -> Recorded {
        self.sweep(now);
        let ejected = self.ejected_count();
        let host = self.hosts.entry(addr).or_default();
        if host.ejected_until.is_some() {
            // A request that was in flight when the endpoint was ejected.
            return Recorded::Nothing;
        }
        let code = match outcome {
            Outcome::Status(s) => {
                host.consecutive_local = 0;
                s
            }
            Outcome::LocalFailure => {
                host.consecutive_local += 1;
                503
            }
        };
        if !(500..600).contains(&code) {
            host.consecutive_5xx = 0;
            host.consecutive_gateway = 0;
            return Recorded::Nothing;
        }
        let mut reason = cfg
            .consecutive_local
            .filter(|n| host.consecutive_local >= *n)
            .map(|_| EjectReason::ConsecutiveLocalOriginFailure);
        if matches!(code, 502..=504) {
            host.consecutive_gateway += 1;
            if reason.is_none()
                && cfg
                    .consecutive_gateway
                    .is_some_and(|n| host.consecutive_gateway >= n)
            {
                reason = Some(EjectReason::ConsecutiveGatewayFailure);
            }
        } else {
            host.consecutive_gateway = 0;
        }
        host.consecutive_5xx += 1;
        if reason.is_none()
            && cfg
                .consecutive_5xx
                .is_some_and(|n| host.consecutive_5xx >= n)
        {
            reason = Some(EjectReason::Consecutive5xx);
        }
        let Some(reason) = reason else {
            return Recorded::Nothing;
        };
        // Envoy resets the counters once a threshold is reached, ejected or not.
        host.consecutive_5xx = 0;
        host.consecutive_gateway = 0;
        host.consecutive_local = 0;
        let allowed =
            (ejected as u64 + 1) * 100 <= u64::from(cfg.max_ejection_percent) * pool_size as u64;
        if !allowed {
            return Recorded::Capped(reason);
        }
        // The multiplier decays by one per interval spent in service.
        if let Some(since) = host.in_service_since.take() {
            let healthy_intervals =
                now.saturating_duration_since(since).as_nanos() / cfg.interval.as_nanos().max(1);
            host.multiplier = host
                .multiplier
                .saturating_sub(u32::try_from(healthy_intervals).unwrap_or(u32::MAX));
        }
        host.multiplier = host.multiplier.saturating_add(1);
        let cap = MAX_EJECTION_TIME.max(cfg.base_ejection);
        let duration = cfg
            .base_ejection
            .checked_mul(host.multiplier)
            .unwrap_or(cap)
            .min(cap);
        let until = self.next_tick(cfg, now + duration);
        if let Some(h) = self.hosts.get_mut(&addr) {
            h.ejected_until = Some(until);
        }
        Recorded::Ejected(reason, until)
    }

    /// The first sweep tick at or after `t`.
    fn next_tick(&self, cfg: &OutlierConfig, t: Instant) -> Instant {
        let since = t.saturating_duration_since(self.origin).as_nanos();
        let step = cfg.interval.as_nanos().max(1);
        let ticks = since.div_ceil(step);
        let offset = u64::try_from(ticks.saturating_mul(step)).unwrap_or(u64::MAX);
        self.origin + Duration::from_nanos(offset)
    }

    /// Ends the ejections that are over at `now`; true if any ended.
    pub fn sweep(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for h in self.hosts.values_mut() {
            if h.ejected_until.is_some_and(|u| u <= now) {
                h.ejected_until = None;
                h.in_service_since = Some(now);
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
                h.consecutive_local = 0;
                changed = true;
            }
        }
        changed
    }

    /// Whether `addr` is ejected (as of the last sweep).
    pub fn is_ejected(&self, addr: &SocketAddr) -> bool {
        self.hosts
            .get(addr)
            .is_some_and(|h| h.ejected_until.is_some())
    }

    /// Endpoints ejected (as of the last sweep).
    pub fn ejected_count(&self) -> usize {
        self.hosts
            .values()
            .filter(|h| h.ejected_until.is_some())
            .count()
    }

    /// Ejected endpoints and until when.
    pub fn ejected(&self) -> impl Iterator<Item = (SocketAddr, Instant)> + '_ {
        self.hosts
            .iter()
            .filter_map(|(a, h)| h.ejected_until.map(|u| (*a, u)))
    }

    /// When the next ejection ends.
    pub fn next_uneject(&self) -> Option<Instant> {
        self.hosts.values().filter_map(|h| h.ejected_until).min()
    }

    /// Whether any endpoint has errors counted or is ejected: when not, a
    /// success changes nothing and need not be recorded.
    pub fn has_state(&self) -> bool {
        self.hosts.values().any(|h| {
            h.ejected_until.is_some()
                || h.consecutive_5xx > 0
                || h.consecutive_gateway > 0
                || h.consecutive_local > 0
        })
    }

    /// Forgets endpoints that are neither ejected nor carry state worth
    /// keeping, so the map stays as small as the pool.
    pub fn forget_idle(&mut self) {
        self.hosts.retain(|_, h| {
            h.ejected_until.is_some()
                || h.multiplier > 0
                || h.consecutive_5xx > 0
                || h.consecutive_gateway > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: Some(3),
            consecutive_gateway: None,
            consecutive_local: None,
            interval: Duration::from_millis(100),
            base_ejection: Duration::from_secs(1),
            max_ejection_percent: 100,
            min_health_percent: 0,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn consecutive_5xx_eject_and_a_success_in_between_resets_the_count() {
        let t0 = Instant::now();
        let mut d = Detector::new(t0);
        let c = cfg();
        for s in [500, 503, 200, 500, 500] {
            assert_eq!(
                d.record(&c, addr(1), Outcome::Status(s), 2, t0),
                Recorded::Nothing
            );
        }
        assert!(!d.is_ejected(&addr(1)));
        let r = d.record(&c, addr(1), Outcome::LocalFailure, 2, t0);
        assert!(
            matches!(r, Recorded::Ejected(EjectReason::Consecutive5xx, _)),
            "{r:?}"
        );
        assert!(d.is_ejected(&addr(1)));
        assert_eq!(d.ejected_count(), 1);
    }

    #[test]
    fn the_default_failure_accrual_ejects_on_local_failures_only() {
        let c = OutlierConfig::FAILURE_ACCRUAL;
        let t0 = Instant::now();
        let mut d = Detector::new(t0);
        // Answers never count, 5xx or not.
        for _ in 0..20 {
            assert_eq!(
                d.record(&c, addr(1), Outcome::Status(503), 1, t0),
                Recorded::Nothing
            );
        }
        // A success between failures resets the count.
        for _ in 0..4 {
            assert_eq!(
                d.record(&c, addr(1), Outcome::LocalFailure, 1, t0),
                Recorded::Nothing
            );
        }
        assert_eq!(
            d.record(&c, addr(1), Outcome::Status(200), 1, t0),
            Recorded::Nothing
        );
        for _ in 0..4 {
            assert_eq!(
                d.record(&c, addr(1), Outcome::LocalFailure, 1, t0),
                Recorded::Nothing
            );
        }
        // The fifth in a row ejects, even the whole pool.
        assert!(matches!(
            d.record(&c, addr(1), Outcome::LocalFailure, 1, t0),
            Recorded::Ejected(EjectReason::ConsecutiveLocalOriginFailure, _)
        ));
        assert!(d.is_ejected(&addr(1)));
    }

    #[test]
    fn gateway_errors_count_502_503_504_only_and_other_5xx_reset_them() {
        let t0 = Instant::now();
        let mut d = Detector::new(t0);
        let c = OutlierConfig {
            consecutive_5xx: None,
            consecutive_gateway: Some(2),
            ..cfg()
        };
        assert_eq!(
            d.record(&c, addr(1), Outcome::Status(502), 1, t0),
            Recorded::Nothing
        );
        // A 500 is a 5xx but no gateway error: the gateway count restarts.
        assert_eq!(
            d.record(&c, addr(1), Outcome::Status(500), 1, t0),
            Recorded::Nothing
        );
        assert_eq!(
            d.record(&c, addr(1), Outcome::Status(504), 1, t0),
            Recorded::Nothing
        );
        assert!(matches!(
            d.record(&c, addr(1), Outcome::LocalFailure, 1, t0),
            Recorded::Ejected(EjectReason::ConsecutiveGatewayFailure, _)
        ));
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_and_ends_on_an_interval_tick() {
        let t0 = Instant::now();
        let mut d = Detector::new(t0);
        let c = cfg();
        let eject = |d: &mut Detector, at: Instant| {
            for _ in 0..3 {
                if let Recorded::Ejected(_, until) =
                    d.record(&c, addr(1), Outcome::Status(500), 1, at)
                {
                    return until;
                }
            }
            panic!("not ejected");
        };
        // First ejection at t0+50ms: 1 s, ending on the tick at t0+1.1s.
        let at = t0 + Duration::from_millis(50);
        let until = eject(&mut d, at);
        assert_eq!(until, t0 + Duration::from_millis(1100));
        assert!(!d.sweep(until - Duration::from_millis(1)));
        assert!(d.is_ejected(&addr(1)));
        assert!(d.sweep(until));
        assert!(!d.is_ejected(&addr(1)));
        // Ejected again at once: twice the base.
        let until2 = eject(&mut d, until);
        assert_eq!(until2, until + Duration::from_secs(2));
        d.sweep(until2);
        // Three ejections in a row: three times.
        let until3 = eject(&mut d, until2);
        assert_eq!(until3, until2 + Duration::from_secs(3));
        d.sweep(until3);
        // 2 intervals in service take 2 off the multiplier: 3 - 2 + 1 = 2.
        let later = until3 + Duration::from_millis(200);
        let until4 = eject(&mut d, later);
        assert_eq!(until4, later + Duration::from_secs(2));
    }

    #[test]
    fn ejection_time_is_capped_at_envoys_maximum() {
        let t0 = Instant::now();
        let mut d = Detector::new(t0);
        let c = OutlierConfig {
            consecutive_5xx: Some(1),
            base_ejection: Duration::from_secs(200),
            ..cfg()
        };
        let mut now = t0;
        let mut last = Duration::ZERO;
        for _ in 0..3 {
            let Recorded::Ejected(_, until) = d.record(&c, addr(1), Outcome::Status(500), 1, now)
            else {
                panic!("not ejected")
            };
            last = until - now;
            d.sweep(until);
            now = until;
        }
        assert_eq!(last, MAX_EJECTION_TIME);
    }

    #[test]
    fn max_ejection_percent_bounds_how_many_endpoints_are_ejected() {
        let t0 = Instant::now();
        let mut d = Detector::new(t0);
        let c = OutlierConfig {
            consecutive_5xx: Some(1),
            max_ejection_percent: 50,
            ..cfg()
        };
        // Pool of 4, 50%: two may be ejected, the third may not.
        for p in 1..=2 {
            assert!(matches!(
                d.record(&c, addr(p), Outcome::Status(500), 4, t0),
                Recorded::Ejected(..)
            ));
        }
        assert_eq!(
            d.record(&c, addr(3), Outcome::Status(500), 4, t0),
            Recorded::Capped(EjectReason::Consecutive5xx)
        );
        assert_eq!(d.ejected_count(), 2);
        // Istio's default 10% ejects nothing from a pool of 3.
        let mut d = Detector::new(t0);
        let ten = OutlierConfig {
            max_ejection_percent: 10,
            ..c
        };
        assert!(matches!(
            d.record(&ten, addr(1), Outcome::Status(500), 3, t0),
            Recorded::Capped(_)
        ));
        // But one of 10 may go.
        assert!(matches!(
            d.record(&ten, addr(1), Outcome::Status(500), 10, t0),
            Recorded::Ejected(..)
        ));
    }

    #[test]
    fn istio_defaults_compile_to_the_detector_units() {
        let c = OutlierConfig::from(&OutlierDetection {
            consecutive_5xx_errors: Some(5),
            consecutive_gateway_errors: None,
            interval_ms: 10_000,
            base_ejection_time_ms: 30_000,
            max_ejection_percent: 10,
            min_health_percent: 0,
        });
        assert_eq!(c.interval, Duration::from_secs(10));
        assert_eq!(c.base_ejection, Duration::from_secs(30));
        assert_eq!(c.consecutive_5xx, Some(5));
    }
}
