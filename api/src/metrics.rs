//! The HTTP layer's own metrics, in Prometheus text exposition format 0.0.4.
//!
//! One mutex guards the whole table: it is held for a map lookup and a few additions per
//! request, far below the cost of serving the request. Labels are bounded: `route` is
//! the matched route template (or `unmatched`) and `method` one of the standard methods
//! (or `other`), so a client cannot grow the table by inventing paths or methods.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the duration histogram's buckets, in seconds.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A fixed-bucket histogram.
#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Non-cumulative: `buckets[i]` counts observations in `(bound[i-1], bound[i]]`.
    buckets: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if let Some(i) = DURATION_BUCKETS.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }
}

type RouteKey = (String, String);

#[derive(Debug, Default)]
struct Table {
    /// (method, route, status) -> count.
    requests: BTreeMap<(String, String, u16), u64>,
    /// (method, route) -> durations.
    durations: BTreeMap<RouteKey, Histogram>,
}

/// Request counters and latency histograms of one router.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    table: Mutex<Table>,
}

impl HttpMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Count one answered request.
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        *t.requests
            .entry((method.to_string(), route.to_string(), status))
            .or_insert(0) += 1;
        t.durations
            .entry((method.to_string(), route.to_string()))
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    /// Appends the metrics in Prometheus text format to `out`.
    pub fn render(&self, out: &mut String) {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            out,
            "# HELP drplane_http_requests_total HTTP requests answered, by method, route and status."
        );
        let _ = writeln!(out, "# TYPE drplane_http_requests_total counter");
        for ((method, route, status), n) in &t.requests {
            let _ = writeln!(
                out,
                "drplane_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(method),
                escape(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP drplane_http_request_duration_seconds Time from request to response head, by method and route."
        );
        let _ = writeln!(
            out,
            "# TYPE drplane_http_request_duration_seconds histogram"
        );
        for ((method, route), h) in &t.durations {
            let labels = format!("method=\"{}\",route=\"{}\"", escape(method), escape(route));
            let mut cumulative = 0u64;
            for (bound, n) in DURATION_BUCKETS.iter().zip(h.buckets.iter()) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "drplane_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "drplane_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "drplane_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "drplane_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
    }
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_cumulative_buckets() {
        let m = HttpMetrics::new();
        m.observe("GET", "/livez", 200, Duration::from_micros(500));
        m.observe("GET", "/livez", 200, Duration::from_millis(30));
        m.observe("GET", "/livez", 503, Duration::from_secs(20));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "drplane_http_requests_total{method=\"GET\",route=\"/livez\",status=\"200\"} 2\n"
        ));
        assert!(out.contains(
            "drplane_http_requests_total{method=\"GET\",route=\"/livez\",status=\"503\"} 1\n"
        ));
        let b = |le: &str| {
            format!("drplane_http_request_duration_seconds_bucket{{method=\"GET\",route=\"/livez\",le=\"{le}\"}}")
        };
        assert!(out.contains(&format!("{} 1\n", b("0.001"))), "{out}");
        assert!(out.contains(&format!("{} 1\n", b("0.025"))), "{out}");
        assert!(out.contains(&format!("{} 2\n", b("0.05"))), "{out}");
        assert!(out.contains(&format!("{} 2\n", b("10"))), "{out}");
        assert!(out.contains(&format!("{} 3\n", b("+Inf"))), "{out}");
        assert!(out.contains(
            "drplane_http_request_duration_seconds_count{method=\"GET\",route=\"/livez\"} 3\n"
        ));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
