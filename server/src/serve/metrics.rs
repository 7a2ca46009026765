//! Prometheus metrics, exposed in the OpenMetrics text format by `prometheus-client`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Bucket upper bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Why a request or connection was refused by a limit (the `reason` label of
/// `netmap_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// The per-key request rate.
    KeyRate,
    /// The per-key cap on requests in progress.
    KeyRequests,
    /// The per-key cap on open streams.
    KeyStreams,
    /// The per-IP cap on open streams.
    IpStreams,
    /// The per-IP cap on open connections.
    IpConnections,
    /// Invalid API keys from one IP, over their rate.
    BadKeys,
    /// The server-wide concurrency queue timed out.
    Busy,
}

impl Limited {
    fn label(self) -> &'static str {
        match self {
            Limited::KeyRate => "key_rate",
            Limited::KeyRequests => "key_requests",
            Limited::KeyStreams => "key_streams",
            Limited::IpStreams => "ip_streams",
            Limited::IpConnections => "ip_connections",
            Limited::BadKeys => "bad_keys",
            Limited::Busy => "busy",
        }
    }
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    apply: Histogram,
    commit: Histogram,
    tailnets: Gauge,
    nodes: Gauge,
    broken: Gauge,
    /// Open netmap streams.
    pub streams: Gauge,
    /// Open TCP connections.
    pub connections: Gauge,
    /// Streams resent a full view because they fell behind.
    pub stream_resyncs: Counter,
    /// Requests refused by the per-key rate limit.
    pub rate_limited: Counter,
    /// Connections closed for slow headers or idleness.
    pub timeouts: Counter,
    /// Connections refused at the connection caps.
    pub connections_refused: Counter,
    /// Requests whose body did not arrive in time (deadline or minimum rate).
    pub body_timeouts: Counter,
    /// Requests with a missing, unknown or expired API key.
    pub auth_failures: Counter,
    /// Streams ended because their API key was revoked or expired.
    pub streams_revoked: Counter,
    limited: Family<ReasonLabels, Counter>,
}

/// Gauges read from the registry when scraped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Tailnets held.
    pub tailnets: usize,
    /// Nodes across all tailnets.
    pub nodes: usize,
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        let (apply, commit) = (histogram(), histogram());
        let (tailnets, nodes, broken, streams, connections) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        let counters: [Counter; 7] = Default::default();
        let [stream_resyncs, rate_limited, timeouts, connections_refused, body_timeouts, auth_failures, streams_revoked] =
            counters;
        let limited = Family::<ReasonLabels, Counter>::default();
        let r = &mut registry;
        r.register(
            "netmap_http_requests",
            "HTTP requests by method, route and status",
            requests.clone(),
        );
        r.register(
            "netmap_http_request_duration_seconds",
            "Time to the response head, by route",
            latency.clone(),
        );
        r.register(
            "netmap_change_apply_seconds",
            "Time the engine took to apply one change",
            apply.clone(),
        );
        r.register(
            "netmap_store_commit_seconds",
            "Time one durable store commit took",
            commit.clone(),
        );
        r.register("netmap_tailnets", "Tailnets held", tailnets.clone());
        r.register("netmap_nodes", "Nodes across all tailnets", nodes.clone());
        r.register(
            "netmap_tailnets_broken",
            "Tailnets whose stored state cannot be read (not served until repaired)",
            broken.clone(),
        );
        r.register(
            "netmap_streams_open",
            "Open netmap streams",
            streams.clone(),
        );
        r.register(
            "netmap_connections_open",
            "Open TCP connections",
            connections.clone(),
        );
        r.register(
            "netmap_stream_resyncs",
            "Full views resent to streams that fell behind",
            stream_resyncs.clone(),
        );
        r.register(
            "netmap_rate_limited",
            "Requests refused by the per-key rate limit",
            rate_limited.clone(),
        );
        r.register(
            "netmap_connection_timeouts",
            "Connections closed for slow headers or idleness",
            timeouts.clone(),
        );
        r.register(
            "netmap_connections_refused",
            "Connections refused at the connection caps",
            connections_refused.clone(),
        );
        r.register(
            "netmap_body_timeouts",
            "Requests whose body did not arrive in time",
            body_timeouts.clone(),
        );
        r.register(
            "netmap_auth_failures",
            "Requests with a missing, unknown or expired API key",
            auth_failures.clone(),
        );
        r.register(
            "netmap_streams_revoked",
            "Streams ended because their API key was revoked or expired",
            streams_revoked.clone(),
        );
        r.register(
            "netmap_limited",
            "Requests and connections refused by a limit, by reason",
            limited.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            apply,
            commit,
            tailnets,
            nodes,
            broken,
            streams,
            connections,
            stream_resyncs,
            rate_limited,
            timeouts,
            connections_refused,
            body_timeouts,
            auth_failures,
            streams_revoked,
            limited,
        }
    }
}

impl Metrics {
    /// Records a finished request.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, d: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(d.as_secs_f64());
    }

    /// Records the time the engine took to apply one change.
    pub fn observe_apply(&self, d: Duration) {
        self.apply.observe(d.as_secs_f64());
    }

    /// Records the time one store commit took.
    pub fn observe_commit(&self, d: Duration) {
        self.commit.observe(d.as_secs_f64());
    }

    /// Sets the number of broken tailnets.
    pub fn set_broken(&self, n: usize) {
        self.broken.set(gauge(n));
    }

    /// Counts a refusal by a limit.
    pub fn limited(&self, why: Limited) {
        self.limited
            .get_or_create(&ReasonLabels {
                reason: why.label(),
            })
            .inc();
        if why == Limited::KeyRate {
            self.rate_limited.inc();
        }
    }

    /// The exposition text (OpenMetrics).
    pub fn render(&self, g: Gauges) -> String {
        self.tailnets.set(gauge(g.tailnets));
        self.nodes.set(gauge(g.nodes));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names() {
        let m = Metrics::default();
        m.observe_request("GET", "/health", 200, Duration::from_millis(2));
        m.limited(Limited::KeyRate);
        m.connections.inc();
        let text = m.render(Gauges {
            tailnets: 2,
            nodes: 5,
        });
        for needle in [
            "netmap_http_requests_total{method=\"GET\",route=\"/health\",status=\"200\"} 1",
            "netmap_http_request_duration_seconds_bucket{le=\"0.0025\",route=\"/health\"} 1",
            "netmap_rate_limited_total 1",
            "netmap_limited_total{reason=\"key_rate\"} 1",
            "netmap_tailnets 2",
            "netmap_connections_open 1",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
