//! The gateway's metrics, rendered for Prometheus (`GET /metrics`, SPEC §9).
//!
//! Every metric is an atomic that the driver tasks bump with `Relaxed` ordering (a scrape
//! needs no consistent snapshot across counters), shared as `Arc<Metrics>`. Nothing here
//! allocates on the data path; [`Metrics::render`] allocates once per scrape.
//!
//! Every sample carries a `node` label, so the scrapes of a cluster's nodes can be merged.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use jumpvpn_core::{NodeId, ReasonCode};

use crate::audit_log::AuditLog;

/// How many reason codes there are; one rejection counter per code.
const REASONS: usize = ReasonCode::ALL.len();

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one, stopping at zero (a bookkeeping slip must not wrap to 2^64).
    pub fn dec(&self) {
        // The closure always returns `Some`, so this cannot fail.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The metrics of one gateway node.
#[derive(Debug)]
pub struct Metrics {
    node: NodeId,
    audit: OnceLock<AuditLog>,
    /// Sessions this node carries now (any state but TERMINATED).
    pub sessions_active: Gauge,
    /// Handshakes completed (sessions created).
    pub handshakes_total: Counter,
    /// Handshakes refused (authentication, freshness, rate limits, unknown peers).
    pub handshakes_rejected_total: Counter,
    /// Handshakes answered but never confirmed by the client's first packet (replayed inits
    /// among them).
    pub handshakes_unconfirmed_total: Counter,
    /// Reattaches accepted (transport switches).
    pub reattach_accepted_total: Counter,
    /// Reattaches refused, by reason code: use [`Metrics::reattach_rejected`].
    reattach_rejected_total: [Counter; REASONS],
    /// Data packets received and accepted.
    pub packets_rx_total: Counter,
    /// Data packets sent.
    pub packets_tx_total: Counter,
    /// Bytes received on the tunnel's transports (accepted packets).
    pub bytes_rx_total: Counter,
    /// Bytes sent on the tunnel's transports.
    pub bytes_tx_total: Counter,
    /// Datagrams or frames dropped because they could not be decoded.
    pub malformed_dropped_total: Counter,
    /// Packets dropped by the anti-replay windows.
    pub replay_dropped_total: Counter,
    /// Packets or control messages that failed authentication.
    pub auth_failed_total: Counter,
    /// Packets dropped at the TUN device (queue full, device gone).
    pub tun_dropped_total: Counter,
    /// Session store operations that failed (unreachable, timed out, commit unknown).
    pub store_errors_total: Counter,
}

impl Metrics {
    /// All zero, for `node`.
    pub fn new(node: NodeId) -> Self {
        Self {
            node,
            audit: OnceLock::new(),
            sessions_active: Gauge::default(),
            handshakes_total: Counter::default(),
            handshakes_rejected_total: Counter::default(),
            handshakes_unconfirmed_total: Counter::default(),
            reattach_accepted_total: Counter::default(),
            reattach_rejected_total: std::array::from_fn(|_| Counter::default()),
            packets_rx_total: Counter::default(),
            packets_tx_total: Counter::default(),
            bytes_rx_total: Counter::default(),
            bytes_tx_total: Counter::default(),
            malformed_dropped_total: Counter::default(),
            replay_dropped_total: Counter::default(),
            auth_failed_total: Counter::default(),
            tun_dropped_total: Counter::default(),
            store_errors_total: Counter::default(),
        }
    }

    /// Reads `jumpvpn_audit_dropped_total` from `log` from now on. Only the first call counts
    /// (a node has one audit stream).
    pub fn attach_audit_log(&self, log: AuditLog) {
        let _ = self.audit.set(log);
    }

    /// The node the metrics describe.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Counts one refused reattach.
    pub fn reattach_rejected(&self, reason: ReasonCode) {
        // `ALL` lists the codes in declaration order, so the discriminant is the index.
        if let Some(counter) = self.reattach_rejected_total.get(reason as usize) {
            counter.inc();
        }
    }

    /// Refused reattaches with `reason` so far.
    pub fn reattach_rejected_count(&self, reason: ReasonCode) -> u64 {
        self.reattach_rejected_total
            .get(reason as usize)
            .map_or(0, Counter::get)
    }

    /// Events the audit writer lost (0 without an attached audit log).
    pub fn audit_dropped_total(&self) -> u64 {
        self.audit.get().map_or(0, AuditLog::dropped_total)
    }

    /// The Prometheus text exposition format (version 0.0.4): for each metric a `# HELP` and
    /// a `# TYPE` line, then its samples as `jumpvpn_NAME{node="…"[,reason="…"]} VALUE`.
    /// Rejections are listed only for the reasons that occurred.
    pub fn render(&self) -> String {
        let node = escape_label(self.node.as_str());
        let mut out = String::with_capacity(4096);
        let mut family = |name: &str, kind: &str, help: &str, value: u64| {
            // Writing to a String cannot fail.
            let _ = write!(
                out,
                "# HELP jumpvpn_{name} {help}\n# TYPE jumpvpn_{name} {kind}\n\
                 jumpvpn_{name}{{node=\"{node}\"}} {value}\n"
            );
        };
        family(
            "sessions_active",
            "gauge",
            "Sessions this node carries now.",
            self.sessions_active.get(),
        );
        family(
            "handshakes_total",
            "counter",
            "Handshakes completed (sessions created).",
            self.handshakes_total.get(),
        );
        family(
            "handshakes_rejected_total",
            "counter",
            "Handshakes refused.",
            self.handshakes_rejected_total.get(),
        );
        family(
            "handshakes_unconfirmed_total",
            "counter",
            "Handshakes answered but never confirmed by the client.",
            self.handshakes_unconfirmed_total.get(),
        );
        family(
            "reattach_accepted_total",
            "counter",
            "Reattaches accepted (transport switches).",
            self.reattach_accepted_total.get(),
        );
        family(
            "packets_rx_total",
            "counter",
            "Data packets received and accepted.",
            self.packets_rx_total.get(),
        );
        family(
            "packets_tx_total",
            "counter",
            "Data packets sent.",
            self.packets_tx_total.get(),
        );
        family(
            "bytes_rx_total",
            "counter",
            "Bytes received in accepted packets.",
            self.bytes_rx_total.get(),
        );
        family(
            "bytes_tx_total",
            "counter",
            "Bytes sent.",
            self.bytes_tx_total.get(),
        );
        family(
            "malformed_dropped_total",
            "counter",
            "Datagrams or frames dropped because they could not be decoded.",
            self.malformed_dropped_total.get(),
        );
        family(
            "replay_dropped_total",
            "counter",
            "Packets dropped by the anti-replay windows.",
            self.replay_dropped_total.get(),
        );
        family(
            "auth_failed_total",
            "counter",
            "Packets or control messages that failed authentication.",
            self.auth_failed_total.get(),
        );
        family(
            "tun_dropped_total",
            "counter",
            "Packets dropped at the TUN device.",
            self.tun_dropped_total.get(),
        );
        family(
            "audit_dropped_total",
            "counter",
            "Audit events lost because the audit queue was full or the file not writable.",
            self.audit_dropped_total(),
        );
        family(
            "store_errors_total",
            "counter",
            "Session store operations that failed.",
            self.store_errors_total.get(),
        );

        let name = "jumpvpn_reattach_rejected_total";
        let _ = write!(
            out,
            "# HELP {name} Reattaches refused, by reason code.\n# TYPE {name} counter\n"
        );
        for (reason, counter) in ReasonCode::ALL.iter().zip(&self.reattach_rejected_total) {
            let value = counter.get();
            if value > 0 {
                let _ = writeln!(
                    out,
                    "{name}{{node=\"{node}\",reason=\"{}\"}} {value}",
                    reason.as_str()
                );
            }
        }
        out
    }
}

/// Escapes a label value as the text format requires: backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Parses the exposition text into `{"name{labels}": value}`, checking every line is a
    /// comment or a `name{labels} value` sample, and every sample's family was declared.
    fn parse(text: &str) -> BTreeMap<String, u64> {
        let mut declared = Vec::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                declared.push(name.to_owned());
                continue;
            }
            if line.starts_with("# HELP jumpvpn_") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a sample: series value");
            let (name, labels) = series.split_once('{').expect("labels");
            assert!(name.starts_with("jumpvpn_"), "{line}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()),
                "{line}"
            );
            assert!(labels.ends_with('}'), "{line}");
            assert!(labels.starts_with("node=\""), "{line}");
            assert!(declared.last().is_some_and(|d| d == name), "{line}");
            let value: u64 = value.parse().expect("an integer value");
            assert!(samples.insert(series.to_owned(), value).is_none(), "{line}");
        }
        samples
    }

    #[test]
    fn render_shows_every_counter_with_its_value_and_node_label() {
        let metrics = Metrics::new(NodeId::new("gw1"));
        metrics.sessions_active.set(3);
        metrics.sessions_active.inc();
        metrics.sessions_active.dec();
        metrics.sessions_active.dec();
        metrics.handshakes_total.add(7);
        metrics.handshakes_unconfirmed_total.add(3);
        metrics.packets_rx_total.add(1000);
        metrics.bytes_tx_total.add(123_456);
        metrics.store_errors_total.inc();
        metrics.reattach_rejected(ReasonCode::StaleVersion);
        metrics.reattach_rejected(ReasonCode::StaleVersion);
        metrics.reattach_rejected(ReasonCode::AuthFail);

        let text = metrics.render();
        let samples = parse(&text);
        let get = |series: &str| samples.get(series).copied();
        assert_eq!(get("jumpvpn_sessions_active{node=\"gw1\"}"), Some(2));
        assert_eq!(get("jumpvpn_handshakes_total{node=\"gw1\"}"), Some(7));
        assert_eq!(
            get("jumpvpn_handshakes_unconfirmed_total{node=\"gw1\"}"),
            Some(3)
        );
        assert_eq!(get("jumpvpn_packets_rx_total{node=\"gw1\"}"), Some(1000));
        assert_eq!(get("jumpvpn_bytes_tx_total{node=\"gw1\"}"), Some(123_456));
        assert_eq!(get("jumpvpn_store_errors_total{node=\"gw1\"}"), Some(1));
        assert_eq!(get("jumpvpn_audit_dropped_total{node=\"gw1\"}"), Some(0));
        assert_eq!(get("jumpvpn_replay_dropped_total{node=\"gw1\"}"), Some(0));
        assert_eq!(
            get("jumpvpn_reattach_rejected_total{node=\"gw1\",reason=\"STALE_VERSION\"}"),
            Some(2)
        );
        assert_eq!(
            get("jumpvpn_reattach_rejected_total{node=\"gw1\",reason=\"AUTH_FAIL\"}"),
            Some(1)
        );
        // Reasons that never occurred are not listed.
        assert!(!text.contains("REPLAY_DETECTED"), "{text}");
        assert_eq!(metrics.reattach_rejected_count(ReasonCode::StaleVersion), 2);
        assert!(
            text.contains("# TYPE jumpvpn_sessions_active gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE jumpvpn_reattach_rejected_total counter\n"),
            "{text}"
        );
        // One sample per plain counter, plus the two rejection reasons.
        assert_eq!(samples.len(), 15 + 2, "{text}");
    }

    #[test]
    fn every_reason_code_has_its_own_rejection_counter() {
        let metrics = Metrics::new(NodeId::new("gw1"));
        for reason in ReasonCode::ALL {
            metrics.reattach_rejected(*reason);
        }
        for reason in ReasonCode::ALL {
            assert_eq!(metrics.reattach_rejected_count(*reason), 1, "{reason}");
        }
    }

    #[test]
    fn gauge_does_not_wrap_below_zero() {
        let gauge = Gauge::default();
        gauge.dec();
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn node_label_is_escaped() {
        let metrics = Metrics::new(NodeId::new("a\"b\\c"));
        let text = metrics.render();
        assert!(
            text.contains("jumpvpn_handshakes_total{node=\"a\\\"b\\\\c\"} 0\n"),
            "{text}"
        );
    }
}
