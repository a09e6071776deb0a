//! The metrics every request writes — requests by model, status and reject
//! reason, request and upstream latency histograms, requests in flight —
//! kept per listener worker and added together when `/metrics` is scraped.
//!
//! Why not prometheus-client's `Family`, `Counter` and `Histogram`: shared
//! by every worker, they make each request take a family read lock three
//! times and a histogram write lock twice on memory the other cores write
//! too, so the cache lines bounce between cores on every request. Measured
//! on the benchmark, turning request metrics off raised the gateway's
//! throughput by about a tenth. Here a worker writes only its own shard:
//! its lock is uncontended (a scrape takes it briefly), and shards are
//! cache-line aligned so that neighbours do not share a line. The exposition
//! (names, labels, buckets) is the same as the prometheus-client types'.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// Shards: workers beyond this many share them (and only then contend).
const SHARDS: usize = 16;

/// Latency buckets: 100 µs doubling to ~52 s (upper bounds, seconds).
fn bucket_bounds() -> [f64; BUCKETS] {
    let mut bounds = [0.0; BUCKETS];
    for (i, b) in bounds.iter_mut().enumerate() {
        // The same arithmetic as prometheus-client's `exponential_buckets`, so
        // the `le` labels read as they always have.
        *b = 0.0001 * 2f64.powf(i as f64);
    }
    bounds
}
const BUCKETS: usize = 20;

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    status: u16,
    reason: &'static str,
}

/// Labels naming a model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

/// A latency histogram: per-bucket counts, the last one unbounded.
#[derive(Clone, Debug, Default)]
struct Latencies {
    sum: f64,
    count: u64,
    buckets: [u64; BUCKETS + 1],
}

impl Latencies {
    fn observe(&mut self, seconds: f64, bounds: &[f64; BUCKETS]) {
        self.sum += seconds;
        self.count += 1;
        let i = bounds.iter().position(|b| seconds <= *b).unwrap_or(BUCKETS);
        self.buckets[i] += 1;
    }

    fn add(&mut self, other: &Latencies) {
        self.sum += other.sum;
        self.count += other.count;
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
    }
}

/// What one model's requests did, in one shard.
#[derive(Debug, Default)]
struct ModelCounts {
    /// Finished requests by status and reject reason; a handful of entries.
    finished: Vec<(u16, &'static str, u64)>,
    duration: Latencies,
    upstream: Latencies,
}

#[derive(Debug, Default)]
struct ShardData {
    in_flight: i64,
    models: HashMap<String, ModelCounts>,
}

/// One worker's share, alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<ShardData>);

impl Shard {
    fn data(&self) -> std::sync::MutexGuard<'_, ShardData> {
        // A panic while holding it leaves counts that are still counts.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The per-request metrics of every worker; registered as one collector.
#[derive(Debug)]
pub struct RequestMetrics {
    shards: Box<[Shard]>,
    bounds: [f64; BUCKETS],
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            bounds: bucket_bounds(),
        }
    }
}

impl RequestMetrics {
    fn here(&self) -> &Shard {
        &self.shards[crate::server::worker_index() % SHARDS]
    }

    /// A request has started.
    pub fn start(&self) {
        self.here().data().in_flight += 1;
    }

    /// A request has finished: the counterpart of [`RequestMetrics::start`].
    pub fn finish(
        &self,
        model: Option<&str>,
        status: u16,
        reason: &'static str,
        latency: Duration,
        upstream: Option<Duration>,
    ) {
        self.finish_on(self.here(), model.unwrap_or(""), status, reason, latency, upstream);
    }

    fn finish_on(
        &self,
        shard: &Shard,
        model: &str,
        status: u16,
        reason: &'static str,
        latency: Duration,
        upstream: Option<Duration>,
    ) {
        let mut data = shard.data();
        data.in_flight -= 1;
        let counts = match data.models.get_mut(model) {
            Some(counts) => counts,
            // Model names are configured ones (or ""), so this map stays small.
            None => data.models.entry(model.to_owned()).or_default(),
        };
        match counts
            .finished
            .iter_mut()
            .find(|(s, r, _)| *s == status && *r == reason)
        {
            Some((_, _, n)) => *n += 1,
            None => counts.finished.push((status, reason, 1)),
        }
        counts.duration.observe(latency.as_secs_f64(), &self.bounds);
        if let Some(upstream) = upstream {
            counts.upstream.observe(upstream.as_secs_f64(), &self.bounds);
        }
    }

    /// Every shard added together, in a stable order.
    fn merged(&self) -> Merged {
        let mut merged = Merged::default();
        for shard in &self.shards {
            let data = shard.data();
            merged.in_flight += data.in_flight;
            for (model, counts) in &data.models {
                for &(status, reason, n) in &counts.finished {
                    let labels = RequestLabels {
                        model: model.clone(),
                        status,
                        reason,
                    };
                    *merged.finished.entry(labels).or_default() += n;
                }
                let labels = ModelLabels { model: model.clone() };
                merged.duration.entry(labels.clone()).or_default().add(&counts.duration);
                if counts.upstream.count > 0 {
                    merged.upstream.entry(labels).or_default().add(&counts.upstream);
                }
            }
        }
        merged
    }
}

#[derive(Default)]
struct Merged {
    in_flight: i64,
    finished: std::collections::BTreeMap<RequestLabels, u64>,
    duration: std::collections::BTreeMap<ModelLabels, Latencies>,
    upstream: std::collections::BTreeMap<ModelLabels, Latencies>,
}

/// A merged histogram, encoded as prometheus-client encodes its own.
struct HistogramValue<'a> {
    latencies: &'a Latencies,
    bounds: &'a [f64; BUCKETS],
}

impl EncodeMetric for HistogramValue<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.latencies.buckets)
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.latencies.sum,
            self.latencies.count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for RequestMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let merged = self.merged();
        let mut requests = encoder.encode_descriptor(
            "requests",
            "Requests finished, by model, status and reject reason",
            None,
            MetricType::Counter,
        )?;
        for (labels, n) in &merged.finished {
            ConstCounter::new(*n).encode(requests.encode_family(labels)?)?;
        }
        for (name, help, series) in [
            (
                "request_duration",
                "Time from arrival to the last byte sent",
                &merged.duration,
            ),
            (
                "upstream_duration",
                "Time from sending upstream to the response head",
                &merged.upstream,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
            for (labels, latencies) in series {
                HistogramValue {
                    latencies,
                    bounds: &self.bounds,
                }
                .encode(family.encode_family(labels)?)?;
            }
        }
        let gauge =
            encoder.encode_descriptor("requests_in_flight", "Requests being served", None, MetricType::Gauge)?;
        ConstGauge::new(merged.in_flight).encode(gauge)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shards_add_up_in_the_exposition() {
        let metrics = std::sync::Arc::new(RequestMetrics::default());
        let ms = Duration::from_millis;
        // Two workers' shards, as two listener workers would write them.
        for shard in [&metrics.shards[0], &metrics.shards[1]] {
            shard.data().in_flight += 2;
            metrics.finish_on(shard, "chat", 200, "", ms(3), Some(ms(2)));
        }
        metrics.finish_on(&metrics.shards[1], "chat", 403, "policy_denied", ms(1), None);
        let mut registry = prometheus_client::registry::Registry::with_prefix("warden");
        registry.register_collector(Box::new(std::sync::Arc::clone(&metrics)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "# TYPE warden_requests counter",
            r#"warden_requests_total{model="chat",status="200",reason=""} 2"#,
            r#"warden_requests_total{model="chat",status="403",reason="policy_denied"} 1"#,
            "# TYPE warden_request_duration_seconds histogram",
            r#"warden_request_duration_seconds_count{model="chat"} 3"#,
            r#"warden_request_duration_seconds_bucket{le="0.0016",model="chat"} 1"#,
            r#"warden_request_duration_seconds_bucket{le="0.0032",model="chat"} 3"#,
            r#"warden_request_duration_seconds_bucket{le="+Inf",model="chat"} 3"#,
            r#"warden_upstream_duration_seconds_count{model="chat"} 2"#,
            "warden_requests_in_flight 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
    }
}
