//! Prometheus metrics (text exposition format), kept with atomics and small maps.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Bucket upper bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    apply: Mutex<Histogram>,
    commit: Mutex<Histogram>,
    /// Open netmap streams.
    pub streams: AtomicI64,
    /// Open TCP connections.
    pub connections: AtomicI64,
    /// Streams resent a full view because they fell behind.
    pub stream_resyncs: AtomicU64,
    /// Requests refused by the per-key rate limit.
    pub rate_limited: AtomicU64,
    /// Connections closed for slow headers or idleness.
    pub timeouts: AtomicU64,
    /// Connections refused at the connection cap.
    pub connections_refused: AtomicU64,
}

/// Gauges read from the registry when scraped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Tailnets held.
    pub tailnets: usize,
    /// Nodes across all tailnets.
    pub nodes: usize,
}

impl Metrics {
    /// Records a finished request.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, d: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((method.to_string(), route.to_string(), status))
                .or_default() += 1;
        }
        if let Ok(mut m) = self.latency.lock() {
            m.entry(route.to_string()).or_default().observe(d);
        }
    }

    /// Records the time the engine took to apply one change.
    pub fn observe_apply(&self, d: Duration) {
        if let Ok(mut h) = self.apply.lock() {
            h.observe(d);
        }
    }

    /// Records the time one store commit took.
    pub fn observe_commit(&self, d: Duration) {
        if let Ok(mut h) = self.commit.lock() {
            h.observe(d);
        }
    }

    /// The exposition text.
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::new();
        out.push_str("# HELP netmap_http_requests_total HTTP requests by method, route and status.\n# TYPE netmap_http_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((method, route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "netmap_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP netmap_http_request_duration_seconds Time to the response head, by route.\n# TYPE netmap_http_request_duration_seconds histogram\n");
        if let Ok(m) = self.latency.lock() {
            for (route, h) in m.iter() {
                h.render(
                    &mut out,
                    "netmap_http_request_duration_seconds",
                    &format!("route=\"{route}\""),
                );
            }
        }
        out.push_str("# HELP netmap_change_apply_seconds Time the engine took to apply one change.\n# TYPE netmap_change_apply_seconds histogram\n");
        if let Ok(h) = self.apply.lock() {
            h.render(&mut out, "netmap_change_apply_seconds", "");
        }
        out.push_str("# HELP netmap_store_commit_seconds Time one durable store commit took.\n# TYPE netmap_store_commit_seconds histogram\n");
        if let Ok(h) = self.commit.lock() {
            h.render(&mut out, "netmap_store_commit_seconds", "");
        }
        let gauges: [(&str, &str, &str, i64); 8] = [
            (
                "netmap_tailnets",
                "gauge",
                "Tailnets held.",
                g.tailnets as i64,
            ),
            (
                "netmap_nodes",
                "gauge",
                "Nodes across all tailnets.",
                g.nodes as i64,
            ),
            (
                "netmap_streams_open",
                "gauge",
                "Open netmap streams.",
                self.streams.load(Ordering::Relaxed),
            ),
            (
                "netmap_connections_open",
                "gauge",
                "Open TCP connections.",
                self.connections.load(Ordering::Relaxed),
            ),
            (
                "netmap_stream_resyncs_total",
                "counter",
                "Full views resent to streams that fell behind.",
                self.stream_resyncs.load(Ordering::Relaxed) as i64,
            ),
            (
                "netmap_rate_limited_total",
                "counter",
                "Requests refused by the per-key rate limit.",
                self.rate_limited.load(Ordering::Relaxed) as i64,
            ),
            (
                "netmap_connection_timeouts_total",
                "counter",
                "Connections closed for slow headers or idleness.",
                self.timeouts.load(Ordering::Relaxed) as i64,
            ),
            (
                "netmap_connections_refused_total",
                "counter",
                "Connections refused at the connection cap.",
                self.connections_refused.load(Ordering::Relaxed) as i64,
            ),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        out
    }
}
