//! Prometheus metrics, served at `GET /metrics` in the text exposition format.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route (`/predict`, `/`, ... or `other` for unknown paths, to bound cardinality).
    pub route: &'static str,
    /// HTTP status code.
    pub status: u16,
}

/// Labels of per-route latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route.
    pub route: &'static str,
}

/// Labels of per-stage latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// upload, decode, queue, forward, postprocess or encode.
    pub stage: &'static str,
}

/// Labels of store counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    /// `input` (uploads) or `output` (predictions).
    pub kind: &'static str,
}

/// Labels of the model-information series (always 1), the Prometheus "info" idiom: what runs,
/// so dashboards can split latency by model and backend across deployments.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The network's name (`midas_v21_small_256`, `dpt_hybrid_384`, `depth_anything_v2_vits`, ...).
    pub model: &'static str,
    /// `flex`, `ndarray` or `wgpu`.
    pub backend: &'static str,
    /// `upstream` or `squash`.
    pub transform: &'static str,
    /// `true` when the untrained synthetic weights run.
    pub untrained: &'static str,
}

/// Every metric the server records; clones share the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Requests answered, by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency (until the response head is sent), by route.
    pub latency: Family<RouteLabels, Histogram>,
    /// Time spent in each `/predict` stage.
    pub stages: Family<StageLabels, Histogram>,
    /// Requests being handled.
    pub in_flight: Gauge,
    /// Jobs waiting for the model.
    pub queue_depth: Gauge,
    /// Inputs per forward pass.
    pub batch_size: Histogram,
    /// Bytes committed to the store, by object kind.
    pub stored_bytes: Family<ObjectLabels, Counter>,
    /// Store operations that failed, by object kind.
    pub store_errors: Family<ObjectLabels, Counter>,
    /// The model being served, as labels of a constant 1.
    pub model: Family<ModelLabels, Gauge>,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("midas");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let stages = Family::<StageLabels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let in_flight = Gauge::default();
        let queue_depth = Gauge::default();
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0]);
        let stored_bytes = Family::<ObjectLabels, Counter>::default();
        let store_errors = Family::<ObjectLabels, Counter>::default();
        let model = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "model_info",
            "The model being served (value 1)",
            model.clone(),
        );
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time to the response head",
            latency.clone(),
        );
        registry.register(
            "predict_stage_duration_seconds",
            "Time spent in each /predict stage",
            stages.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "Requests being handled",
            in_flight.clone(),
        );
        registry.register(
            "inference_queue_depth",
            "Jobs waiting for the model",
            queue_depth.clone(),
        );
        registry.register(
            "inference_batch_size",
            "Inputs per forward pass",
            batch_size.clone(),
        );
        registry.register(
            "store_bytes",
            "Bytes committed to the store",
            stored_bytes.clone(),
        );
        registry.register(
            "store_errors",
            "Store operations that failed",
            store_errors.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            latency,
            stages,
            in_flight,
            queue_depth,
            batch_size,
            stored_bytes,
            store_errors,
            model,
        }
    }
}

impl Metrics {
    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counts a failed store operation on an object of `kind` (`input` or `output`).
    pub fn store_error(&self, kind: &'static str) {
        self.store_errors
            .get_or_create(&ObjectLabels { kind })
            .inc();
    }

    /// Counts `bytes` committed to the store for an object of `kind`.
    pub fn stored(&self, kind: &'static str, bytes: u64) {
        self.stored_bytes
            .get_or_create(&ObjectLabels { kind })
            .inc_by(bytes);
    }

    /// Records one `/predict` stage.
    pub fn stage(&self, stage: &'static str, seconds: f64) {
        self.stages
            .get_or_create(&StageLabels { stage })
            .observe(seconds);
    }
}

/// One request in flight: counted while this guard lives, so a handler that hyper drops when
/// its client disconnects is uncounted all the same.
pub struct InFlight(Gauge);

impl InFlight {
    /// Counts a request in.
    pub fn enter(metrics: &Metrics) -> Self {
        metrics.in_flight.inc();
        Self(metrics.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
