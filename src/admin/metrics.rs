//! Prometheus metrics, all defined here. Names follow Prometheus conventions
//! (`warden_` prefix, base units, `_total` counters); labels are bounded:
//! the model label only ever holds configured model names, never a key, user
//! or anything the caller typed.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::request_metrics::RequestMetrics;

/// Labels of a configuration reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: String,
}

/// Every metric Warden exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Written by every request: kept per worker ([`RequestMetrics`]).
    request: Arc<RequestMetrics>,
    connections: Gauge,
    reloads: Family<ReloadLabels, Counter>,
    last_reload_ok: Gauge,
    shadow_disagreements: Family<LevelLabels, Counter>,
    limit_refusals: Family<LimitLabels, Counter>,
    limit_fallbacks: Family<FallbackLabels, Counter>,
}

/// Labels of a limit refusal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    /// The configured rule's name (bounded by the configuration).
    rule: String,
    /// `rate_limit_exceeded`, `insufficient_quota`, `limits_unavailable`
    /// or `model_at_capacity`.
    reason: &'static str,
}

/// Labels of a decision taken without the shared limit store.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    /// `local` (this instance's share applied) or `deny` (refused).
    mode: &'static str,
}

/// Labels of an external injection detector's failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetectorFailureLabels {
    /// The configured model's name.
    model: String,
    /// `lakera` or `llm_guard`.
    kind: &'static str,
    /// `timeout`, `unreachable`, `status` (non-2xx) or `malformed`.
    reason: &'static str,
}

/// External injection detector failures. The detectors are built with the
/// configuration, not with the metrics, so the family is process-wide and
/// every [`Metrics`] exports it.
static DETECTOR_FAILURES: LazyLock<Family<DetectorFailureLabels, Counter>> = LazyLock::new(Family::default);

/// An external injection detector gave no usable answer for `model`.
pub fn injection_detector_failure(model: &str, kind: &'static str, reason: &'static str) {
    DETECTOR_FAILURES
        .get_or_create(&DetectorFailureLabels {
            model: model.to_owned(),
            kind,
            reason,
        })
        .inc();
}

/// Labels naming a policy level.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LevelLabels {
    level: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("warden");
        let request = Arc::new(RequestMetrics::default());
        registry.register_collector(Box::new(Arc::clone(&request)));
        let connections = Gauge::default();
        registry.register("connections_open", "Open client connections", connections.clone());
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register("config_reloads", "Configuration reloads, by result", reloads.clone());
        let last_reload_ok = Gauge::default();
        last_reload_ok.set(1);
        registry.register(
            "config_last_reload_successful",
            "1 if the last configuration reload succeeded, 0 if the old one is still serving",
            last_reload_ok.clone(),
        );
        let shadow_disagreements = Family::<LevelLabels, Counter>::default();
        registry.register(
            "policy_shadow_disagreements",
            "Decisions where the shadow (candidate) policy set disagreed with the active one, by level",
            shadow_disagreements.clone(),
        );
        let limit_refusals = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_refusals",
            "Requests refused by a limit rule, the capacity queue or an unreachable limit store, by rule and reason",
            limit_refusals.clone(),
        );
        let limit_fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "limit_store_fallbacks",
            "Limit decisions taken while the shared (Redis) store could not be reached, by fail mode",
            limit_fallbacks.clone(),
        );
        registry.register(
            "injection_detector_failures",
            "Requests an external prompt-injection detector gave no usable answer for, by model, detector kind and reason",
            DETECTOR_FAILURES.clone(),
        );
        Metrics {
            limit_refusals,
            limit_fallbacks,
            shadow_disagreements,
            registry,
            request,
            connections,
            reloads,
            last_reload_ok,
        }
    }

    /// A request has started.
    pub fn start_request(&self) {
        self.request.start();
    }

    /// A request has finished: the counterpart of [`Metrics::start_request`].
    pub fn finish_request(
        &self,
        model: Option<&str>,
        status: u16,
        reason: &'static str,
        latency: Duration,
        upstream: Option<Duration>,
    ) {
        self.request.finish(model, status, reason, latency, upstream);
    }

    /// The shadow policy set disagreed with the active one at `level`.
    pub fn shadow_disagreement(&self, level: &'static str) {
        self.shadow_disagreements.get_or_create(&LevelLabels { level }).inc();
    }

    /// A limit refused a request.
    pub fn limit_refusal(&self, rule: &str, reason: &'static str) {
        self.limit_refusals
            .get_or_create(&LimitLabels {
                rule: rule.to_owned(),
                reason,
            })
            .inc();
    }

    /// A limit decision was taken without the shared store.
    pub fn limit_fallback(&self, mode: &'static str) {
        self.limit_fallbacks.get_or_create(&FallbackLabels { mode }).inc();
    }

    /// A client connection opened (`+1`) or closed (`-1`).
    pub fn connection(&self, delta: i64) {
        self.connections.inc_by(delta);
    }

    /// Records a configuration reload's result.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads
            .get_or_create(&ReloadLabels {
                result: result.to_owned(),
            })
            .inc();
        self.last_reload_ok.set(i64::from(ok));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("metrics could not be encoded");
        }
        out
    }
}
