//! The policy snapshot (SPEC §6): timers and bounds, all configurable, each with its default.
//!
//! A session keeps the snapshot that was in force when it was created, so changing a gateway's
//! configuration never changes the rules for sessions already running.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::replay::ReplayWindow;

/// Largest accepted `max_switches_per_min`: the record keeps one timestamp per recent switch.
pub const MAX_SWITCHES_PER_MIN: u32 = 1000;

/// Timers and bounds of one session. Every limit bounds memory or time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Identity lifetime; then TERMINATED and a new handshake is required.
    pub session_ttl_ms: u64,
    /// Client keepalive period when idle.
    pub keepalive_interval_ms: u64,
    /// Silence after which the client declares its transport dead and reattaches elsewhere.
    pub client_dead_after_ms: u64,
    /// Silence after which the gateway declares the binding dead: RECOVERING.
    pub server_dead_after_ms: u64,
    /// Longest time in RECOVERING before TERMINATED.
    pub max_recovery_window_ms: u64,
    /// Longest time without a binding before TERMINATED.
    pub transport_loss_ttl_ms: u64,
    /// Anti-flap bound: accepted switches in any 60 s.
    pub max_switches_per_min: u32,
    /// Minimum time between two accepted switches.
    pub switch_cooldown_ms: u64,
    /// Longest time in VOLATILE before DEGRADED, and then in DEGRADED before TERMINATED.
    pub degraded_after_ms: u64,
    /// Thresholds that make a session VOLATILE.
    pub volatility: Volatility,
    /// Data-plane anti-replay window, in packets.
    pub data_replay_window: u64,
}

/// Health thresholds (SPEC §6): crossing any one enters VOLATILE; staying within all of them for
/// `stable_after_ms` returns to ATTACHED.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Volatility {
    /// Packet loss, in percent.
    pub loss_pct: u32,
    /// Round-trip time, in milliseconds.
    pub rtt_ms: u32,
    /// Jitter, in milliseconds.
    pub jitter_ms: u32,
    /// How long health must stay within bounds before the session is stable again.
    pub stable_after_ms: u64,
}

impl Default for Volatility {
    fn default() -> Self {
        Self {
            loss_pct: 20,
            rtt_ms: 300,
            jitter_ms: 80,
            stable_after_ms: 5_000,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            session_ttl_ms: 86_400_000,
            keepalive_interval_ms: 1_000,
            client_dead_after_ms: 3_000,
            server_dead_after_ms: 10_000,
            max_recovery_window_ms: 30_000,
            transport_loss_ttl_ms: 60_000,
            max_switches_per_min: 10,
            switch_cooldown_ms: 500,
            degraded_after_ms: 60_000,
            volatility: Volatility::default(),
            data_replay_window: 8192,
        }
    }
}

/// A policy value outside its allowed range. Names the offending key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The key, as written in the `[policy]` table.
    pub key: &'static str,
    /// The value found.
    pub value: u64,
    /// What the key accepts.
    pub expected: &'static str,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "policy.{} = {}: expected {}",
            self.key, self.value, self.expected
        )
    }
}

impl std::error::Error for PolicyError {}

impl Policy {
    /// Checks every knob's range, naming the first key that is out of it.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let positive = [
            ("session_ttl_ms", self.session_ttl_ms),
            ("keepalive_interval_ms", self.keepalive_interval_ms),
            ("client_dead_after_ms", self.client_dead_after_ms),
            ("server_dead_after_ms", self.server_dead_after_ms),
            ("max_recovery_window_ms", self.max_recovery_window_ms),
            ("transport_loss_ttl_ms", self.transport_loss_ttl_ms),
            ("degraded_after_ms", self.degraded_after_ms),
            (
                "volatility.stable_after_ms",
                self.volatility.stable_after_ms,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(PolicyError {
                    key,
                    value,
                    expected: "a positive number of ms",
                });
            }
        }
        if self.keepalive_interval_ms >= self.client_dead_after_ms {
            return Err(PolicyError {
                key: "keepalive_interval_ms",
                value: self.keepalive_interval_ms,
                expected: "less than client_dead_after_ms",
            });
        }
        if !(1..=MAX_SWITCHES_PER_MIN).contains(&self.max_switches_per_min) {
            return Err(PolicyError {
                key: "max_switches_per_min",
                value: u64::from(self.max_switches_per_min),
                expected: "1 to 1000",
            });
        }
        if self.volatility.loss_pct > 100 {
            return Err(PolicyError {
                key: "volatility.loss_pct",
                value: u64::from(self.volatility.loss_pct),
                expected: "a percentage, 0 to 100",
            });
        }
        if !(ReplayWindow::MIN_SIZE..=ReplayWindow::MAX_SIZE).contains(&self.data_replay_window) {
            return Err(PolicyError {
                key: "data_replay_window",
                value: self.data_replay_window,
                expected: "2048 to 1048576 packets",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_spec_table_and_valid() {
        let p = Policy::default();
        assert_eq!(p.session_ttl_ms, 86_400_000);
        assert_eq!(p.keepalive_interval_ms, 1_000);
        assert_eq!(p.client_dead_after_ms, 3_000);
        assert_eq!(p.server_dead_after_ms, 10_000);
        assert_eq!(p.max_recovery_window_ms, 30_000);
        assert_eq!(p.transport_loss_ttl_ms, 60_000);
        assert_eq!(p.max_switches_per_min, 10);
        assert_eq!(p.switch_cooldown_ms, 500);
        assert_eq!(
            p.volatility,
            Volatility {
                loss_pct: 20,
                rtt_ms: 300,
                jitter_ms: 80,
                stable_after_ms: 5_000
            }
        );
        assert_eq!(p.data_replay_window, 8192);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        let p = Policy {
            data_replay_window: 1024,
            ..Policy::default()
        };
        let err = p.validate().expect_err("1024 is below the minimum window");
        assert_eq!(err.key, "data_replay_window");
        assert!(err.to_string().contains("policy.data_replay_window = 1024"));

        let p = Policy {
            max_switches_per_min: 0,
            ..Policy::default()
        };
        assert_eq!(p.validate().map_err(|e| e.key), Err("max_switches_per_min"));

        let p = Policy {
            session_ttl_ms: 0,
            ..Policy::default()
        };
        assert_eq!(p.validate().map_err(|e| e.key), Err("session_ttl_ms"));
    }

    #[test]
    fn partial_tables_fill_in_defaults_and_unknown_keys_are_refused() {
        let p: Policy = serde_json::from_str(r#"{"switch_cooldown_ms": 250}"#).expect("parses");
        assert_eq!(p.switch_cooldown_ms, 250);
        assert_eq!(p.session_ttl_ms, Policy::default().session_ttl_ms);
        let err = serde_json::from_str::<Policy>(r#"{"switch_cooldwn_ms": 250}"#)
            .expect_err("misspelt key");
        assert!(err.to_string().contains("switch_cooldwn_ms"));
    }
}
