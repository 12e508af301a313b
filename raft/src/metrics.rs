//! The node's own Prometheus metrics, rendered as text. Small on purpose: fixed-bucket
//! histograms and counters on atomics, no registry.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed upper bounds (seconds or counts), cumulative on render.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in micro-units (value * 1e6) to stay on integers.
    sum_micros: AtomicU64,
}

/// Latency buckets in seconds, 50 µs to 10 s.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Batch-size buckets.
pub const SIZE_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6).max(0.0) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Append this histogram in Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Metrics shared by the log store, the proposer and the renderer.
pub struct Metrics {
    /// Time from a proposal's arrival at the leader's batcher to its result.
    pub proposal_seconds: Histogram,
    /// Duration of one WAL sync of the Raft log.
    pub log_sync_seconds: Histogram,
    /// Log entries made durable by one WAL sync.
    pub log_sync_batch: Histogram,
    /// Proposals carried by one log entry.
    pub proposals_per_entry: Histogram,
    /// Leader changes this node observed.
    pub leader_changes: AtomicU64,
    /// Requests forwarded to the leader by this node.
    pub forwarded: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            proposal_seconds: Histogram::new(LATENCY_BOUNDS),
            log_sync_seconds: Histogram::new(LATENCY_BOUNDS),
            log_sync_batch: Histogram::new(SIZE_BOUNDS),
            proposals_per_entry: Histogram::new(SIZE_BOUNDS),
            leader_changes: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
        }
    }
}

pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let _ = writeln!(out, "{name} {value}");
}

pub fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut s = String::new();
        h.render(&mut s, "x_seconds", "test");
        assert!(s.contains("x_seconds_bucket{le=\"0.1\"} 1"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"1\"} 2"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"+Inf\"} 3"), "{s}");
        assert!(s.contains("x_seconds_count 3"), "{s}");
    }
}
