//! Every Prometheus metric Flywheel exports: names, help texts, labels and buckets in one place.
//!
//! Durations are in seconds. Label values are bounded: routes are the matched patterns, reasons and
//! statuses come from fixed sets.

pub mod window;

use std::sync::Arc;

use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Prefix of every metric name.
pub const PREFIX: &str = "flywheel";

/// The latency summary's window: 6 slots of 10 s.
const WINDOW_SLOT_SECS: u64 = 10;
const WINDOW_SLOTS: usize = 6;

/// Geometric latency buckets from 0.5 ms to ~46 s (ratio √2): fine enough to read a P99 to within ~20 %,
/// and past the 30 s request and body timeouts, so a request that times out lands in a finite bucket (the
/// one from 23.2 to 32.8 s) rather than in `+Inf`.
pub fn latency_buckets() -> Vec<f64> {
    (0..34)
        .map(|i| 0.0005 * 2f64.powf(i as f64 / 2.0))
        .collect()
}

/// Batch-size buckets (sequences per forward pass).
pub fn batch_size_buckets() -> Vec<f64> {
    vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
}

/// Batch-token buckets (real tokens per forward pass).
pub fn batch_token_buckets() -> Vec<f64> {
    (0..15).map(|i| 16.0 * 2f64.powi(i)).collect()
}

/// Training-duration buckets: 1 s to ~2.3 h, doubling.
pub fn training_buckets() -> Vec<f64> {
    (0..14).map(|i| 2f64.powi(i)).collect()
}

/// The process's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `flywheel_request_duration_seconds{route, task, arm}`.
    pub request_duration: HistogramVec,
    /// `flywheel_requests_total{route, status}`.
    pub requests: IntCounterVec,
    /// `flywheel_requests_rejected_total{reason}`.
    pub rejected: IntCounterVec,
    /// `flywheel_requests_in_flight`.
    pub in_flight: IntGauge,
    /// `flywheel_queue_duration_seconds`: enqueue to the start of the forward pass.
    pub queue_duration: Histogram,
    /// `flywheel_tokenize_duration_seconds`, per request.
    pub tokenize_duration: Histogram,
    /// `flywheel_inference_duration_seconds`, per forward pass.
    pub inference_duration: Histogram,
    /// `flywheel_batch_size`: sequences per forward pass.
    pub batch_size: Histogram,
    /// `flywheel_batch_tokens`: tokens per forward pass.
    pub batch_tokens: Histogram,
    /// `flywheel_queue_depth`: sequences waiting for the model.
    pub queue_depth: IntGauge,
    /// `flywheel_num_requests_waiting`: requests queued for the model, not yet in a forward pass (the
    /// Gateway API Inference Extension's TotalQueuedRequests).
    pub requests_waiting: IntGauge,
    /// `flywheel_num_requests_running`: requests in the forward pass now (its TotalRunningRequests).
    pub requests_running: IntGauge,
    /// `flywheel_kv_cache_usage_perc`: always 0, an encoder keeps no KV cache (its KVCacheUtilization).
    pub kv_cache_usage: prometheus::Gauge,
    /// `flywheel_lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}`: one series
    /// whose value is the Unix time it was set, naming every adapter model name ready to serve (its LoRA
    /// info metric); refreshed at each scrape.
    pub lora_requests_info: prometheus::GaugeVec,
    /// `flywheel_model_ready`: 1 while the model is loaded and its threads run (read at each scrape).
    pub model_ready: IntGauge,
    /// `flywheel_autopilot_leader`: 1 while this process's autopilot acts (always, alone; on the elected
    /// process, on PostgreSQL).
    pub autopilot_leader: IntGauge,
    /// `flywheel_model_info{dtype, kernel}`: 1, labelled with the serving path's number format (`float32`,
    /// `int8`) and kernels (`vnni`, `avx512`, `avx2`, `candle`).
    pub model_info: IntGaugeVec,
    /// `flywheel_thread_panics_total{thread}`: panics caught on the model thread (per batch) and the
    /// trainer thread (per job); the thread goes on with the next batch or job.
    pub thread_panics: IntCounterVec,
    /// `flywheel_adapters_loaded`: generations ready to serve.
    pub adapters_loaded: IntGauge,
    /// `flywheel_adapter_load_duration_seconds`: reading, checking and registering one adapter.
    pub adapter_load_duration: Histogram,
    /// `flywheel_feedback_total{task}`: feedback items acknowledged.
    pub feedback: IntCounterVec,
    /// `flywheel_request_latency_seconds{route, quantile}`: P50/P95/P99 over the last minute.
    pub latency_window: Arc<window::LatencyWindow>,
    /// `flywheel_training_jobs_total{task, state}`: jobs finished, by final state.
    pub training_jobs: IntCounterVec,
    /// `flywheel_training_duration_seconds`: wall time of finished jobs.
    pub training_duration: Histogram,
    /// `flywheel_training_loss{task}`: the running job's mean training loss of the current epoch.
    pub training_loss: GaugeVec,
    /// `flywheel_training_grad_norm{task}`: the running job's mean gradient norm before clipping, this epoch.
    pub training_grad_norm: GaugeVec,
    /// `flywheel_training_samples_per_second{task}`: the running job's training throughput.
    pub training_samples_per_second: GaugeVec,
    /// `flywheel_training_yield_seconds_total{task}`: time training waited for inference to finish.
    pub training_yield_seconds: CounterVec,
    /// `flywheel_online_accuracy{task, arm}`: share of feedback on served predictions that agreed with them.
    pub online_accuracy: GaugeVec,
    /// `flywheel_online_judgements_total{task, arm, outcome}`: feedback on served predictions, `agreed` or
    /// `disagreed`; summed over replicas in PromQL, the fleet's online accuracy.
    pub online_judgements: IntCounterVec,
    /// `flywheel_rollout_traffic{task, arm}`: the share of traffic each arm of an active rollout gets.
    pub rollout_traffic: GaugeVec,
    /// `flywheel_rollout_events_total{task, decision}`: rollouts started, advanced, promoted, rolled back.
    pub rollout_events: IntCounterVec,
    /// `flywheel_drift_score{task, signal, method}`: the latest drift score.
    pub drift_score: GaugeVec,
    /// `flywheel_drift_detected{task, signal}`: 1 while the score is over its threshold.
    pub drift_detected: IntGaugeVec,
    /// `flywheel_drift_window_size{task}`: predictions in the task's live window (0 while a live reference
    /// fills).
    pub drift_window_size: IntGaugeVec,
    /// `flywheel_drift_inputs_total{outcome}`: watched inputs `embedded` for the drift monitor, or `dropped`
    /// because serving left no time for them and the queue was full.
    pub drift_inputs: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let name = |n: &str| format!("{PREFIX}_{n}");
        let histogram = |n: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name(n), help).buckets(buckets))
                .expect("static metric definition is valid; this is a bug");
            registry
                .register(Box::new(h.clone()))
                .expect("metric registered once; this is a bug");
            h
        };
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                name("request_duration_seconds"),
                "HTTP request duration by route, task and arm",
            )
            .buckets(latency_buckets()),
            &["route", "task", "arm"],
        )
        .expect("static metric definition is valid; this is a bug");
        let requests = IntCounterVec::new(
            Opts::new(
                name("requests_total"),
                "HTTP requests by route and status code",
            ),
            &["route", "status"],
        )
        .expect("static metric definition is valid; this is a bug");
        let rejected = IntCounterVec::new(
            Opts::new(
                name("requests_rejected_total"),
                "Requests refused before reaching the model, or given up waiting for it, by reason",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid; this is a bug");
        let thread_panics = IntCounterVec::new(
            Opts::new(
                name("thread_panics_total"),
                "Panics caught on the model thread (per batch) and the trainer thread (per job)",
            ),
            &["thread"],
        )
        .expect("static metric definition is valid; this is a bug");
        let in_flight = IntGauge::new(name("requests_in_flight"), "HTTP requests being served")
            .expect("static metric definition is valid; this is a bug");
        let queue_depth = IntGauge::new(name("queue_depth"), "Sequences waiting for the model")
            .expect("static metric definition is valid; this is a bug");
        let requests_waiting = IntGauge::new(
            name("num_requests_waiting"),
            "Requests queued for the model, not yet in a forward pass",
        )
        .expect("static metric definition is valid; this is a bug");
        let requests_running = IntGauge::new(
            name("num_requests_running"),
            "Requests in the forward pass now",
        )
        .expect("static metric definition is valid; this is a bug");
        let kv_cache_usage = prometheus::Gauge::new(
            name("kv_cache_usage_perc"),
            "Always 0: an encoder keeps no KV cache (for routers that read one)",
        )
        .expect("static metric definition is valid; this is a bug");
        let lora_requests_info = prometheus::GaugeVec::new(
            Opts::new(
                name("lora_requests_info"),
                "Unix time of the last update; labels: adapter model names ready to serve (all stay \
                 resident, none ever waits to load) and the most that may be loaded",
            ),
            &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        .expect("static metric definition is valid; this is a bug");
        let model_info = IntGaugeVec::new(
            Opts::new(
                name("model_info"),
                "1; labels: the serving path's number format and kernels",
            ),
            &["dtype", "kernel"],
        )
        .expect("static metric definition is valid; this is a bug");
        let feedback = IntCounterVec::new(
            Opts::new(
                name("feedback_total"),
                "Feedback items stored and acknowledged, by task",
            ),
            &["task"],
        )
        .expect("static metric definition is valid; this is a bug");
        let latency_window = Arc::new(window::LatencyWindow::new(
            &name("request_latency_seconds"),
            "HTTP request latency quantiles over the last 60 s, by route",
            WINDOW_SLOT_SECS,
            WINDOW_SLOTS,
        ));
        registry
            .register(Box::new(window::SharedWindow(latency_window.clone())))
            .expect("metric registered once; this is a bug");
        let adapters_loaded = IntGauge::new(
            name("adapters_loaded"),
            "Adapter generations ready to serve",
        )
        .expect("static metric definition is valid; this is a bug");
        let model_ready = IntGauge::new(
            name("model_ready"),
            "1 while the model is loaded and its threads run (as /ready answers 200)",
        )
        .expect("static metric definition is valid; this is a bug");
        let autopilot_leader = IntGauge::new(
            name("autopilot_leader"),
            "1 while this process's autopilot acts on rollouts and starts automatic jobs",
        )
        .expect("static metric definition is valid; this is a bug");
        let gauges = |n: &str, help: &str, labels: &[&str]| {
            GaugeVec::new(Opts::new(name(n), help), labels)
                .expect("static metric definition is valid; this is a bug")
        };
        let training_jobs = IntCounterVec::new(
            Opts::new(
                name("training_jobs_total"),
                "Training jobs finished, by task and final state",
            ),
            &["task", "state"],
        )
        .expect("static metric definition is valid; this is a bug");
        let training_loss = gauges(
            "training_loss",
            "Mean training loss of the running job's current epoch",
            &["task"],
        );
        let training_grad_norm = gauges(
            "training_grad_norm",
            "Mean gradient L2 norm before clipping over the running job's current epoch",
            &["task"],
        );
        let training_samples_per_second = gauges(
            "training_samples_per_second",
            "Training examples per second of the running job",
            &["task"],
        );
        let training_yield_seconds = CounterVec::new(
            Opts::new(
                name("training_yield_seconds_total"),
                "Seconds training jobs spent waiting for inference in flight to finish",
            ),
            &["task"],
        )
        .expect("static metric definition is valid; this is a bug");
        let online_accuracy = gauges(
            "online_accuracy",
            "Share of feedback on served predictions that agreed with the prediction, by arm",
            &["task", "arm"],
        );
        let online_judgements = IntCounterVec::new(
            Opts::new(
                name("online_judgements_total"),
                "Feedback on served predictions, by task, arm and whether it agreed with the prediction",
            ),
            &["task", "arm", "outcome"],
        )
        .expect("static metric definition is valid; this is a bug");
        let rollout_traffic = gauges(
            "rollout_traffic",
            "Share of the task's traffic each arm serves",
            &["task", "arm"],
        );
        let rollout_events = IntCounterVec::new(
            Opts::new(
                name("rollout_events_total"),
                "Rollout decisions: started, advanced, promoted, rolled back",
            ),
            &["task", "decision"],
        )
        .expect("static metric definition is valid; this is a bug");
        let drift_score = gauges(
            "drift_score",
            "Latest drift score of the live window against the reference",
            &["task", "signal", "method"],
        );
        let drift_window_size = IntGaugeVec::new(
            Opts::new(
                name("drift_window_size"),
                "Predictions in the task's live drift window (0 while a live reference fills)",
            ),
            &["task"],
        )
        .expect("static metric definition is valid; this is a bug");
        let drift_inputs = IntCounterVec::new(
            Opts::new(
                name("drift_inputs_total"),
                "Watched inputs embedded for drift monitoring, or dropped for want of idle time",
            ),
            &["outcome"],
        )
        .expect("static metric definition is valid; this is a bug");
        let drift_detected = IntGaugeVec::new(
            Opts::new(
                name("drift_detected"),
                "1 while a drift score is over its threshold",
            ),
            &["task", "signal"],
        )
        .expect("static metric definition is valid; this is a bug");
        for c in [
            Box::new(training_jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(training_loss.clone()),
            Box::new(training_grad_norm.clone()),
            Box::new(training_samples_per_second.clone()),
            Box::new(training_yield_seconds.clone()),
            Box::new(online_accuracy.clone()),
            Box::new(online_judgements.clone()),
            Box::new(rollout_traffic.clone()),
            Box::new(rollout_events.clone()),
            Box::new(drift_score.clone()),
            Box::new(drift_detected.clone()),
            Box::new(drift_window_size.clone()),
            Box::new(drift_inputs.clone()),
            Box::new(request_duration.clone()),
            Box::new(requests.clone()),
            Box::new(rejected.clone()),
            Box::new(thread_panics.clone()),
            Box::new(in_flight.clone()),
            Box::new(queue_depth.clone()),
            Box::new(requests_waiting.clone()),
            Box::new(requests_running.clone()),
            Box::new(kv_cache_usage.clone()),
            Box::new(lora_requests_info.clone()),
            Box::new(model_ready.clone()),
            Box::new(autopilot_leader.clone()),
            Box::new(model_info.clone()),
            Box::new(adapters_loaded.clone()),
            Box::new(feedback.clone()),
        ] {
            registry
                .register(c)
                .expect("metric registered once; this is a bug");
        }
        Self {
            queue_duration: histogram(
                "queue_duration_seconds",
                "Time from enqueue to the start of the forward pass",
                latency_buckets(),
            ),
            tokenize_duration: histogram(
                "tokenize_duration_seconds",
                "Tokenization time per request",
                latency_buckets(),
            ),
            inference_duration: histogram(
                "inference_duration_seconds",
                "Forward pass time per batch",
                latency_buckets(),
            ),
            batch_size: histogram(
                "batch_size",
                "Sequences per forward pass",
                batch_size_buckets(),
            ),
            batch_tokens: histogram(
                "batch_tokens",
                "Tokens per forward pass",
                batch_token_buckets(),
            ),
            adapter_load_duration: histogram(
                "adapter_load_duration_seconds",
                "Time to read, check and register one adapter",
                latency_buckets(),
            ),
            training_duration: histogram(
                "training_duration_seconds",
                "Wall time of finished training jobs",
                training_buckets(),
            ),
            registry,
            training_jobs,
            training_loss,
            training_grad_norm,
            training_samples_per_second,
            training_yield_seconds,
            online_accuracy,
            online_judgements,
            rollout_traffic,
            rollout_events,
            drift_score,
            drift_detected,
            drift_window_size,
            drift_inputs,
            adapters_loaded,
            feedback,
            latency_window,
            request_duration,
            requests,
            rejected,
            in_flight,
            queue_depth,
            requests_waiting,
            requests_running,
            kv_cache_usage,
            lora_requests_info,
            model_ready,
            autopilot_leader,
            model_info,
            thread_panics,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into memory cannot fail; this is a bug");
        String::from_utf8(buf).expect("the text encoder writes UTF-8; this is a bug")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
