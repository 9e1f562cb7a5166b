//! Turns a client's health reports into the two signals the state machine knows:
//! [`SessionEvent::VolatilitySignal`](crate::machine::SessionEvent) when any threshold is crossed,
//! and [`SessionEvent::StabilityRestored`](crate::machine::SessionEvent) when health has stayed
//! within every threshold for `stable_after_ms`.
//!
//! This is soft, per-session state of the node that carries the session: it is not part of the
//! record, because a record mutation per health report would mean a store write per report.
//! Its memory is fixed (two fields).

use crate::ids::Timestamp;
use crate::machine::{HealthBreach, HealthMetric};
use crate::policy::Volatility;

/// One `HEALTH_REPORT`'s measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthSample {
    /// Loss, percent.
    pub loss_pct: u32,
    /// Round-trip time, ms.
    pub rtt_ms: u32,
    /// Jitter, ms.
    pub jitter_ms: u32,
}

impl HealthSample {
    /// The first metric above its threshold, if any.
    pub fn breach(&self, limits: &Volatility) -> Option<HealthBreach> {
        [
            (HealthMetric::LossPct, self.loss_pct, limits.loss_pct),
            (HealthMetric::RttMs, self.rtt_ms, limits.rtt_ms),
            (HealthMetric::JitterMs, self.jitter_ms, limits.jitter_ms),
        ]
        .into_iter()
        .find(|(_, observed, threshold)| observed > threshold)
        .map(|(metric, observed, threshold)| HealthBreach {
            metric,
            threshold: u64::from(threshold),
            observed: u64::from(observed),
        })
    }
}

/// What the monitor concluded from a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum HealthSignal {
    /// A threshold was crossed while the session was stable.
    Volatile(HealthBreach),
    /// Health has been within bounds for `stable_after_ms` since the last breach.
    Stable,
}

/// Per-session health tracking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealthMonitor {
    volatile: bool,
    last_breach: Option<Timestamp>,
}

impl HealthMonitor {
    /// A monitor for a session that is stable (ATTACHED).
    pub const fn new() -> Self {
        Self {
            volatile: false,
            last_breach: None,
        }
    }

    /// Aligns the monitor with the record after a transition it did not cause (e.g. a reattach
    /// made the session ATTACHED again): `volatile` is whether the record is VOLATILE or
    /// DEGRADED.
    pub fn sync(&mut self, volatile: bool, now: Timestamp) {
        if volatile && !self.volatile {
            self.last_breach = Some(now);
        }
        self.volatile = volatile;
    }

    /// Feeds one sample; returns a signal when the session should change state.
    pub fn observe(
        &mut self,
        sample: HealthSample,
        now: Timestamp,
        limits: &Volatility,
    ) -> Option<HealthSignal> {
        if let Some(breach) = sample.breach(limits) {
            self.last_breach = Some(now);
            if !self.volatile {
                self.volatile = true;
                return Some(HealthSignal::Volatile(breach));
            }
            return None;
        }
        let calm_since = self.last_breach.unwrap_or_default();
        if self.volatile && now.since(calm_since) >= limits.stable_after_ms {
            self.volatile = false;
            return Some(HealthSignal::Stable);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: HealthSample = HealthSample {
        loss_pct: 0,
        rtt_ms: 20,
        jitter_ms: 2,
    };

    #[test]
    fn a_crossed_threshold_signals_volatile_once_and_names_the_metric() {
        let limits = Volatility::default();
        let mut m = HealthMonitor::new();
        assert_eq!(m.observe(GOOD, Timestamp(0), &limits), None);
        let bad = HealthSample {
            rtt_ms: 301,
            ..GOOD
        };
        let signal = m.observe(bad, Timestamp(100), &limits);
        assert_eq!(
            signal,
            Some(HealthSignal::Volatile(HealthBreach {
                metric: HealthMetric::RttMs,
                threshold: 300,
                observed: 301
            }))
        );
        assert_eq!(
            m.observe(bad, Timestamp(200), &limits),
            None,
            "already volatile"
        );
        // Exactly at the threshold is within bounds.
        assert_eq!(
            HealthSample {
                loss_pct: 20,
                rtt_ms: 300,
                jitter_ms: 80
            }
            .breach(&limits),
            None
        );
    }

    #[test]
    fn stability_needs_the_full_calm_period_after_the_last_breach() {
        let limits = Volatility::default();
        let mut m = HealthMonitor::new();
        let bad = HealthSample {
            loss_pct: 50,
            ..GOOD
        };
        let _ = m.observe(bad, Timestamp(1_000), &limits);
        let _ = m.observe(bad, Timestamp(3_000), &limits);
        assert_eq!(
            m.observe(GOOD, Timestamp(7_999), &limits),
            None,
            "4999 ms after last breach"
        );
        assert_eq!(
            m.observe(GOOD, Timestamp(8_000), &limits),
            Some(HealthSignal::Stable)
        );
        assert_eq!(
            m.observe(GOOD, Timestamp(9_000), &limits),
            None,
            "already stable"
        );
    }
}
