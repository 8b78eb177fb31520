//! Drift monitoring per task. Each stable generation is compared with its reference: the data it was
//! trained and validated on when Flywheel trained it (published beside the adapter, so the comparison starts
//! with the first `min_window` predictions), or else — for adapters made elsewhere — the first
//! `reference_size` predictions it served (a warm-up window, taken again whenever the stable generation
//! changes). The latest `window_size` predictions are compared with it on three signals:
//! - `prediction`: PSI of the predicted-label distribution;
//! - `confidence`: PSI of the top-probability distribution over the reference's deciles;
//! - `embedding`: the cosine distance between mean embeddings, their Mahalanobis distance and MMD² (RBF),
//!   on the base model's embeddings of the inputs (see [`embedder`]).
//!
//! Every statistic has a seeded permutation p-value (the pooled samples re-split at random), so what counts
//! as drift accounts for the window's size: a small window must move further to be detected.
//!
//! The embeddings are the base model's, not the serving generation's (see [`embedder`] for why). They are
//! computed after the answer, in serving's idle time, so they may trail the predictions.
//!
//! Past 500 lines as one concern: the per-task windows, their reports and the three signals share one state.

mod embedder;
pub mod stats;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::adapters::reference::DriftReference;
use crate::config::DriftConfig;
use crate::metrics::Metrics;
use crate::model::pooling::best;
use crate::model::ServingModel;
use crate::pressure::ServingPressure;
use embedder::Embedder;

/// Every (signal, method) pair a report scores.
const SCORES: [(&str, &str); 5] = [
    ("prediction", "psi"),
    ("confidence", "psi"),
    ("embedding", "mean_distance"),
    ("embedding", "mahalanobis"),
    ("embedding", "mmd"),
];

/// The Mahalanobis test's ridge, as a multiple of the average variance: 1 doubled the later SpamAssassin
/// corpus's detection rate over the cosine test's at the same false-alarm rate, and 3 did as well
/// (docs/DRIFT.md).
const SHRINKAGE: f64 = 1.0;

/// The longest a background refresh waits for serving at one of its few hundred yield points: a report
/// then takes at most a couple of seconds under saturation.
const REFRESH_WAIT: Duration = Duration::from_millis(5);

/// Embeddings per side the Mahalanobis test takes at most (a seeded subsample beyond), which bounds its
/// cost whatever `reference_size` and `window_size` are.
const MAHALANOBIS_SAMPLE: usize = 1000;

/// One served prediction, as the monitor keeps it.
#[derive(Clone, Copy)]
struct Prediction {
    label: usize,
    confidence: f32,
}

struct TaskDrift {
    generation: String,
    labels: usize,
    /// `training` (published with the generation) or `live` (its first predictions).
    kind: &'static str,
    /// Whether the reference's predictions are the generation's first live ones: a live reference's, and a
    /// training reference's that holds none (a generation trained without a validation split publishes
    /// none, as its predictions on its own training inputs are more confident than on any traffic).
    live_predictions: bool,
    /// The reference: complete when it came with the generation; a live one fills with the first
    /// `reference_size` predictions and, separately (they arrive later), the first `reference_size`
    /// embeddings.
    reference: Arc<DriftReference>,
    /// Latest predictions.
    window: VecDeque<Prediction>,
    /// Latest inputs' base-model embeddings.
    embedded: VecDeque<Vec<f32>>,
    /// Samples added since the last report, so a report is recomputed only when something changed.
    fresh: usize,
    /// When the report was last computed.
    computed: Option<Instant>,
    report: Option<DriftReport>,
}

impl TaskDrift {
    fn new(generation: &str, labels: usize, training: Option<Arc<DriftReference>>) -> Self {
        Self {
            generation: generation.to_owned(),
            labels,
            kind: if training.is_some() {
                "training"
            } else {
                "live"
            },
            live_predictions: training.as_ref().is_none_or(|t| t.labels.is_empty()),
            reference: training.unwrap_or_else(|| {
                Arc::new(DriftReference {
                    embeddings: Vec::new(),
                    labels: Vec::new(),
                    confidences: Vec::new(),
                })
            }),
            window: VecDeque::new(),
            embedded: VecDeque::new(),
            fresh: 0,
            computed: None,
            report: None,
        }
    }

    /// Whether the reference's predictions are complete (a published one's always are).
    fn predictions_ready(&self, config: &DriftConfig) -> bool {
        !self.live_predictions || self.reference.labels.len() >= config.reference_size
    }

    /// Whether the reference's embeddings are complete.
    fn embeddings_ready(&self, config: &DriftConfig) -> bool {
        self.kind == "training" || self.reference.embeddings.len() >= config.reference_size
    }
}

/// What a report is computed from, copied out of the lock.
struct Snapshot {
    generation: String,
    labels: usize,
    kind: &'static str,
    reference: Arc<DriftReference>,
    window: Vec<Prediction>,
    /// The window's embeddings, when there are enough of them (and a complete reference) to test.
    embedded: Option<Vec<Vec<f32>>>,
    /// Embeddings in the window.
    embedding_window_size: usize,
}

/// One signal's outcome.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SignalReport {
    /// `prediction`, `confidence` or `embedding`.
    pub signal: &'static str,
    /// `psi`, `mean_distance`, `mahalanobis` or `mmd`.
    pub method: &'static str,
    /// The statistic.
    pub score: f64,
    /// The threshold on the score (PSI), or the minimum effect size (embedding tests).
    pub threshold: f64,
    /// The permutation p-value: the share of random re-splits of the pooled samples scoring at least as
    /// high.
    pub p_value: Option<f64>,
    /// Whether this signal counts as drifted.
    pub detected: bool,
}

/// `GET /v1/drift/{task}`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DriftReport {
    /// The task.
    pub task: String,
    /// The stable generation the reference belongs to.
    pub generation: String,
    /// `training` (the generation's training and validation data) or `live` (its first predictions).
    pub reference: &'static str,
    /// Embeddings in the reference (a training reference's predictions come from its validation split).
    pub reference_size: usize,
    /// Predictions in the live window.
    pub window_size: usize,
    /// Base-model embeddings of the window's inputs (computed when serving has spare time, so they may
    /// trail the predictions; the embedding signals are tested from `min_window` of them).
    pub embedding_window_size: usize,
    /// Every signal tested: `prediction` and `confidence`, and `embedding` once enough inputs are embedded.
    pub signals: Vec<SignalReport>,
    /// Whether any signal is drifted.
    pub detected: bool,
}

/// The state of a task's monitor when no report exists yet.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Warming {
    /// The task.
    pub task: String,
    /// The stable generation being watched; `null` until a prediction of it was seen.
    pub generation: Option<String>,
    /// `training` or `live`; `null` until a prediction was seen.
    pub reference: Option<&'static str>,
    /// Embeddings in the reference so far.
    pub reference_size: usize,
    /// Predictions in the window so far.
    pub window_size: usize,
    /// Embedded inputs in the window so far.
    pub embedding_window_size: usize,
    /// What is missing.
    pub status: String,
}

/// The drift monitor of every task.
pub struct DriftMonitor {
    tasks: Mutex<HashMap<String, TaskDrift>>,
    config: DriftConfig,
    metrics: Metrics,
    /// Where watched inputs go to be embedded, once [`DriftMonitor::start_embedder`] ran.
    embedder: OnceLock<Embedder>,
    /// What background refreshes step aside for, once [`DriftMonitor::start_embedder`] ran.
    serving: OnceLock<Arc<ServingPressure>>,
}

impl DriftMonitor {
    /// A monitor with no tasks yet.
    pub fn new(config: DriftConfig, metrics: Metrics) -> Self {
        Self {
            tasks: Mutex::new(HashMap::new()),
            config,
            metrics,
            embedder: OnceLock::new(),
            serving: OnceLock::new(),
        }
    }

    /// Starts the thread that embeds watched inputs with `model`'s base network while serving leaves it
    /// time (see [`embedder`]), and makes [`Self::refresh`] step aside for serving too. Without it only the
    /// prediction signals are tested.
    pub fn start_embedder(
        self: &Arc<Self>,
        model: ServingModel,
        pressure: Arc<ServingPressure>,
    ) -> std::io::Result<()> {
        if !self.config.enabled || self.embedder.get().is_some() {
            return Ok(());
        }
        let _ = self.serving.set(pressure.clone());
        let embedder = Embedder::start(model, Arc::downgrade(self), pressure, &self.metrics)?;
        let _ = self.embedder.set(embedder);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskDrift>> {
        self.tasks
            .lock()
            .expect("drift lock poisoned; this is a bug")
    }

    /// Records what the stable `generation` of `task` predicted for `text` (its class probabilities), and
    /// queues `text` to be embedded. A new generation starts over with its `training` reference, or a live
    /// one without.
    pub fn observe(
        &self,
        task: &str,
        generation: &str,
        training: Option<&Arc<DriftReference>>,
        probs: &[f32],
        text: &str,
    ) {
        if !self.config.enabled || probs.is_empty() {
            return;
        }
        self.observe_prediction(task, generation, training, probs);
        if let Some(embedder) = self.embedder.get() {
            embedder.submit(task, generation, text);
        }
    }

    /// Records a prediction (see [`Self::observe`]) without queueing its input.
    pub fn observe_prediction(
        &self,
        task: &str,
        generation: &str,
        training: Option<&Arc<DriftReference>>,
        probs: &[f32],
    ) {
        if !self.config.enabled || probs.is_empty() {
            return;
        }
        let (label, confidence) = best(probs);
        let training = training.filter(|_| self.config.reference == "training");
        let mut tasks = self.lock();
        let entry = match tasks.get_mut(task) {
            Some(e) if e.generation == generation && e.labels == probs.len() => e,
            _ => {
                // A new stable generation: the old one's verdicts no longer hold, and the gauges say so
                // (NaN scores) until its window fills.
                self.clear_gauges(task);
                tasks.insert(
                    task.to_owned(),
                    TaskDrift::new(generation, probs.len(), training.cloned()),
                );
                tasks.get_mut(task).expect("just inserted; this is a bug")
            }
        };
        if !entry.predictions_ready(&self.config) {
            let reference = Arc::make_mut(&mut entry.reference);
            reference.labels.push(label);
            reference.confidences.push(confidence);
            return;
        }
        if entry.window.len() >= self.config.window_size {
            entry.window.pop_front();
        }
        entry.window.push_back(Prediction { label, confidence });
        entry.fresh += 1;
        self.metrics
            .drift_window_size
            .with_label_values(&[task])
            .set(entry.window.len() as i64);
    }

    /// Records the base-model embedding of an input `generation` answered. Dropped when the task has moved
    /// on to another generation meanwhile.
    pub fn observe_embedding(&self, task: &str, generation: &str, embedding: Vec<f32>) {
        let mut tasks = self.lock();
        let Some(entry) = tasks.get_mut(task).filter(|e| e.generation == generation) else {
            return;
        };
        if !entry.embeddings_ready(&self.config) {
            Arc::make_mut(&mut entry.reference)
                .embeddings
                .push(embedding);
            return;
        }
        if entry.embedded.len() >= self.config.window_size {
            entry.embedded.pop_front();
        }
        entry.embedded.push_back(embedding);
        entry.fresh += 1;
    }

    /// Scores NaN, nothing detected, an empty window: a task whose generation has no report yet.
    fn clear_gauges(&self, task: &str) {
        for (signal, method) in SCORES {
            self.metrics
                .drift_score
                .with_label_values(&[task, signal, method])
                .set(f64::NAN);
            self.metrics
                .drift_detected
                .with_label_values(&[task, signal])
                .set(0);
        }
        self.metrics
            .drift_window_size
            .with_label_values(&[task])
            .set(0);
    }

    /// The task's report, recomputed when new samples arrived and the last one is older than `max_age`
    /// (the statistics run outside the lock); or what the monitor is waiting for.
    fn report_within(&self, task: &str, max_age: Duration) -> Option<Result<DriftReport, Warming>> {
        let c = &self.config;
        let snapshot = {
            let mut tasks = self.lock();
            let entry = tasks.get_mut(task)?;
            if !entry.predictions_ready(c) || entry.window.len() < c.min_window {
                return Some(Err(Warming {
                    task: task.to_owned(),
                    generation: Some(entry.generation.clone()),
                    reference: Some(entry.kind),
                    reference_size: entry.reference.embeddings.len(),
                    window_size: entry.window.len(),
                    embedding_window_size: entry.embedded.len(),
                    status: if entry.predictions_ready(c) {
                        format!("warming up: the window needs {} predictions", c.min_window)
                    } else {
                        format!(
                            "warming up: the reference's predictions are taken live ({} needed), then \
                             the window needs {}",
                            c.reference_size, c.min_window
                        )
                    },
                }));
            }
            let stale = entry.computed.is_none_or(|t| t.elapsed() >= max_age);
            if entry.report.is_some() && (entry.fresh == 0 || !stale) {
                return entry.report.clone().map(Ok);
            }
            entry.fresh = 0;
            entry.computed = Some(Instant::now());
            let embedded = (entry.embeddings_ready(c)
                && !entry.reference.embeddings.is_empty()
                && entry.embedded.len() >= c.min_window)
                .then(|| entry.embedded.iter().cloned().collect());
            Snapshot {
                generation: entry.generation.clone(),
                labels: entry.labels,
                kind: entry.kind,
                reference: entry.reference.clone(),
                window: entry.window.iter().copied().collect(),
                embedded,
                embedding_window_size: entry.embedded.len(),
            }
        };
        let report = self.compute(task, &snapshot);
        let mut tasks = self.lock();
        // A generation that replaced this one meanwhile keeps its cleared gauges.
        if let Some(entry) = tasks
            .get_mut(task)
            .filter(|e| e.generation == snapshot.generation)
        {
            self.export(&report);
            entry.report = Some(report.clone());
        }
        Some(Ok(report))
    }

    /// The task's report, recomputed if anything new arrived. The recomputation steps aside for serving as
    /// [`Self::refresh`]'s does: callers who ask in a loop must not take the model's cores.
    pub fn report(&self, task: &str) -> Option<Result<DriftReport, Warming>> {
        self.stepping_aside(|| self.report_within(task, Duration::ZERO))
    }

    /// Runs `work`, whose permutation rounds wait for serving ([`crate::pressure`]) briefly each time
    /// ([`REFRESH_WAIT`]).
    fn stepping_aside<R>(&self, work: impl FnOnce() -> R) -> R {
        match self.serving.get() {
            Some(pressure) => {
                crate::pressure::yielding_quietly((pressure.clone(), REFRESH_WAIT), work)
            }
            None => work(),
        }
    }

    /// Refreshes every task's report at most every `max_age` (the autopilot's tick) so the metrics stay
    /// current. The statistics take a few hundred milliseconds of one core; here, in the background, they
    /// step aside for serving between permutation rounds ([`crate::pressure`]), briefly each time
    /// ([`REFRESH_WAIT`]) so a saturated server's autopilot still gets round to its rollouts.
    pub fn refresh(&self, max_age: Duration) {
        self.stepping_aside(|| {
            let names: Vec<String> = self.lock().keys().cloned().collect();
            for task in names {
                let _ = self.report_within(&task, max_age);
            }
        })
    }

    /// Whether the task's latest report found drift in the traffic of `generation`, the task's stable one
    /// now: a report on a generation since replaced (promoted over, before a prediction of the new one
    /// arrived) says nothing about it.
    pub fn detected(&self, task: &str, generation: &str) -> bool {
        self.lock()
            .get(task)
            .and_then(|t| t.report.as_ref())
            .is_some_and(|r| r.detected && r.generation == generation)
    }

    fn compute(&self, task: &str, entry: &Snapshot) -> DriftReport {
        let c = &self.config;
        let reference = &entry.reference;
        let window_labels: Vec<usize> = entry.window.iter().map(|s| s.label).collect();
        let prediction = stats::psi_test(
            &reference.labels,
            &window_labels,
            entry.labels,
            c.permutations,
            0x9E3,
        );
        let edges = stats::decile_edges(&reference.confidences);
        let bins = |values: &mut dyn Iterator<Item = f32>| -> Vec<usize> {
            values.map(|v| stats::bin_of(v, &edges)).collect()
        };
        let confidence = stats::psi_test(
            &bins(&mut reference.confidences.iter().copied()),
            &bins(&mut entry.window.iter().map(|s| s.confidence)),
            edges.len() + 1,
            c.permutations,
            0xC0F,
        );
        // The smallest p-value a test can give is 1 / (1 + permutations): `<=` lets the default
        // `p_value` (0.001 with 999 permutations) be reached.
        let tested = |signal, method, t: stats::Tested, floor: f64| SignalReport {
            signal,
            method,
            score: t.score,
            threshold: floor,
            p_value: Some(t.p_value),
            detected: t.p_value <= c.p_value && t.score > floor,
        };
        let mut signals = vec![
            tested("prediction", "psi", prediction, c.psi_threshold),
            tested("confidence", "psi", confidence, c.psi_threshold),
        ];
        if let Some(embedded) = &entry.embedded {
            let window: Vec<&[f32]> = embedded.iter().map(Vec::as_slice).collect();
            let reference_rows: Vec<&[f32]> =
                reference.embeddings.iter().map(Vec::as_slice).collect();
            // Both embedding tests run on seeded subsamples, which bounds their cost.
            fn subsample<'a>(rows: &[&'a [f32]], seed: u64, n: usize) -> Vec<&'a [f32]> {
                let mut idx: Vec<usize> = (0..rows.len()).collect();
                crate::rng::Rng::new(seed).shuffle(&mut idx);
                idx.truncate(n);
                idx.iter().map(|&i| rows[i]).collect()
            }
            let ra = subsample(&reference_rows, 1, c.mmd_sample);
            let wa = subsample(&window, 2, c.mmd_sample);
            let distance = stats::mean_distance(&ra, &wa, c.permutations, 0xD81F7);
            // Whitening once makes each permutation as cheap as the cosine test's, so it takes every
            // sample up to MAHALANOBIS_SAMPLE per side.
            fn capped<'a>(rows: &[&'a [f32]], seed: u64) -> Vec<&'a [f32]> {
                if rows.len() > MAHALANOBIS_SAMPLE {
                    subsample(rows, seed, MAHALANOBIS_SAMPLE)
                } else {
                    rows.to_vec()
                }
            }
            let whitened = stats::mahalanobis(
                &capped(&reference_rows, 3),
                &capped(&window, 4),
                c.permutations,
                0x3A4A,
                SHRINKAGE,
            );
            let mmd = stats::mmd(&ra, &wa, c.permutations, 0x33D);
            signals.push(tested(
                "embedding",
                "mean_distance",
                distance,
                c.min_distance,
            ));
            signals.push(tested("embedding", "mahalanobis", whitened, 0.0));
            signals.push(tested("embedding", "mmd", mmd, c.min_mmd));
        }
        DriftReport {
            task: task.to_owned(),
            generation: entry.generation.clone(),
            reference: entry.kind,
            reference_size: reference.embeddings.len(),
            window_size: entry.window.len(),
            embedding_window_size: entry.embedding_window_size,
            detected: signals.iter().any(|s| s.detected),
            signals,
        }
    }

    fn export(&self, report: &DriftReport) {
        let mut by_signal: HashMap<&str, bool> = HashMap::new();
        for s in &report.signals {
            self.metrics
                .drift_score
                .with_label_values(&[report.task.as_str(), s.signal, s.method])
                .set(s.score);
            *by_signal.entry(s.signal).or_default() |= s.detected;
        }
        for (signal, detected) in by_signal {
            self.metrics
                .drift_detected
                .with_label_values(&[report.task.as_str(), signal])
                .set(i64::from(detected));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DriftConfig {
        DriftConfig {
            reference_size: 60,
            window_size: 60,
            min_window: 40,
            permutations: 199,
            mmd_sample: 60,
            p_value: 0.01,
            ..DriftConfig::default()
        }
    }

    fn feed(m: &DriftMonitor, generation: &str, n: usize, spam_share: f32, shift: f32, seed: u64) {
        feed_with(m, generation, None, n, spam_share, shift, seed);
    }

    fn feed_with(
        m: &DriftMonitor,
        generation: &str,
        reference: Option<&Arc<DriftReference>>,
        n: usize,
        spam_share: f32,
        shift: f32,
        seed: u64,
    ) {
        let mut rng = crate::rng::Rng::new(seed);
        for i in 0..n {
            let spam = (i as f32 / n as f32) < spam_share;
            let probs = if spam { [0.1, 0.9] } else { [0.8, 0.2] };
            let embedding: Vec<f32> = rng
                .uniform(8, 0.3)
                .into_iter()
                .enumerate()
                .map(|(d, x)| 1.0 + x + if d == 1 { shift } else { 0.0 })
                .collect();
            m.observe_prediction("spam", generation, reference, &probs);
            m.observe_embedding("spam", generation, embedding);
        }
    }

    #[test]
    fn warms_up_then_stays_quiet_on_the_same_traffic_and_fires_on_a_shift() {
        let m = DriftMonitor::new(config(), Metrics::new());
        assert!(m.report("spam").is_none());
        feed(&m, "g1", 60, 0.5, 0.0, 1);
        assert!(matches!(m.report("spam"), Some(Err(_))), "reference only");
        feed(&m, "g1", 60, 0.5, 0.0, 2);
        let quiet = m.report("spam").unwrap().unwrap();
        assert!(!quiet.detected, "{quiet:?}");
        feed(&m, "g1", 60, 0.9, 0.3, 3);
        let moved = m.report("spam").unwrap().unwrap();
        assert!(moved.detected && m.detected("spam", "g1"), "{moved:?}");
        assert!(
            !m.detected("spam", "g2"),
            "a generation promoted since has not drifted yet"
        );
        let prediction = &moved.signals[0];
        assert!(
            prediction.detected && prediction.score > 0.2,
            "{prediction:?}"
        );
        // A new stable generation takes a new reference.
        feed(&m, "g2", 10, 0.5, 0.0, 4);
        assert!(matches!(m.report("spam"), Some(Err(_))));
    }

    /// A reference as a trainer would publish it: `n` samples like `feed`'s undrifted traffic.
    fn training_reference(n: usize) -> Arc<DriftReference> {
        let m = DriftMonitor::new(
            DriftConfig {
                reference_size: n,
                ..config()
            },
            Metrics::new(),
        );
        feed(&m, "trainer", n, 0.5, 0.0, 9);
        let tasks = m.lock();
        let reference = tasks["spam"].reference.clone();
        assert_eq!(reference.embeddings.len(), n, "the live reference filled");
        reference
    }

    #[test]
    fn predictions_are_tested_while_embeddings_trail_and_the_embedding_signal_joins_once_they_arrive(
    ) {
        let metrics = Metrics::new();
        let m = DriftMonitor::new(config(), metrics.clone());
        let reference = training_reference(60);
        // 40 predictions answered, their inputs not embedded yet (serving was busy).
        for i in 0..40 {
            let probs = if i % 2 == 0 { [0.1, 0.9] } else { [0.8, 0.2] };
            m.observe_prediction("spam", "g1", Some(&reference), &probs);
        }
        let early = m.report("spam").unwrap().unwrap();
        let signals: Vec<&str> = early.signals.iter().map(|s| s.signal).collect();
        assert_eq!(signals, ["prediction", "confidence"], "{early:?}");
        assert_eq!(early.embedding_window_size, 0);
        let mmd = gauge(
            &metrics,
            r#"flywheel_drift_score{method="mmd",signal="embedding",task="spam"}"#,
        );
        assert!(mmd.is_some_and(|l| l.ends_with(" NaN")), "not tested yet");
        // An embedding of another generation's input is not this one's evidence.
        m.observe_embedding("spam", "g0", vec![1.0; 8]);
        assert_eq!(m.lock()["spam"].embedded.len(), 0);
        // Shifted inputs, embedded late: the embedding signal joins and finds them.
        let mut rng = crate::rng::Rng::new(5);
        for _ in 0..40 {
            let e: Vec<f32> = rng
                .uniform(8, 0.3)
                .into_iter()
                .enumerate()
                .map(|(d, x)| 1.0 + x + if d == 1 { 0.3 } else { 0.0 })
                .collect();
            m.observe_embedding("spam", "g1", e);
        }
        let late = m.report("spam").unwrap().unwrap();
        assert_eq!(late.embedding_window_size, 40);
        let embedding: Vec<&SignalReport> = late
            .signals
            .iter()
            .filter(|s| s.signal == "embedding")
            .collect();
        assert_eq!(embedding.len(), 3, "{late:?}");
        assert!(embedding.iter().all(|s| s.detected), "{late:?}");
        assert!(!late.signals[0].detected, "{late:?}");
    }

    fn gauge(metrics: &Metrics, name: &str) -> Option<String> {
        metrics
            .render()
            .lines()
            .find(|l| l.starts_with(name))
            .map(str::to_owned)
    }

    #[test]
    fn a_training_reference_reports_from_the_first_window_and_the_gauges_exist_from_the_first_prediction(
    ) {
        let metrics = Metrics::new();
        let m = DriftMonitor::new(config(), metrics.clone());
        let reference = training_reference(60);
        m.observe_prediction("spam", "g1", Some(&reference), &[0.8, 0.2]);
        m.observe_embedding("spam", "g1", vec![1.0; 8]);
        let score = gauge(
            &metrics,
            r#"flywheel_drift_score{method="mmd",signal="embedding",task="spam"}"#,
        );
        assert!(
            score.is_some_and(|l| l.ends_with(" NaN")),
            "a NaN score from the first prediction"
        );
        assert_eq!(
            gauge(&metrics, r#"flywheel_drift_window_size{task="spam"}"#).as_deref(),
            Some(r#"flywheel_drift_window_size{task="spam"} 1"#)
        );
        let Some(Err(warming)) = m.report("spam") else {
            panic!("warming up until min_window");
        };
        assert_eq!(
            (warming.reference, warming.reference_size),
            (Some("training"), 60)
        );
        feed_with(&m, "g1", Some(&reference), 39, 0.5, 0.0, 2);
        let quiet = m.report("spam").unwrap().unwrap();
        assert_eq!((quiet.reference, quiet.window_size), ("training", 40));
        assert!(!quiet.detected, "{quiet:?}");
        feed_with(&m, "g1", Some(&reference), 60, 0.9, 0.3, 3);
        let moved = m.report("spam").unwrap().unwrap();
        assert!(moved.detected, "{moved:?}");
        // A generation without a reference of its own falls back to a live one.
        feed(&m, "g2", 10, 0.5, 0.0, 4);
        let Some(Err(warming)) = m.report("spam") else {
            panic!("a live reference fills first");
        };
        assert_eq!(
            (warming.reference, warming.reference_size),
            (Some("live"), 10)
        );
    }

    #[test]
    fn a_training_reference_without_predictions_takes_them_live_and_a_live_setting_ignores_it() {
        // A generation trained without a validation split publishes embeddings only: its predictions on
        // its own training inputs would be more confident than on any traffic.
        let reference = training_reference(60);
        let embeddings_only = Arc::new(DriftReference {
            labels: Vec::new(),
            confidences: Vec::new(),
            ..(*reference).clone()
        });
        let m = DriftMonitor::new(config(), Metrics::new());
        feed_with(&m, "g1", Some(&embeddings_only), 60, 0.5, 0.0, 2);
        assert!(
            matches!(m.report("spam"), Some(Err(_))),
            "the first 60 predictions are the reference"
        );
        feed_with(&m, "g1", Some(&embeddings_only), 60, 0.5, 0.0, 3);
        let quiet = m.report("spam").unwrap().unwrap();
        assert!(!quiet.detected, "{quiet:?}");
        assert_eq!((quiet.reference, quiet.window_size), ("training", 60));

        // `[drift] reference = "live"`: feedback need not look like traffic.
        let live = DriftConfig {
            reference: "live".into(),
            ..config()
        };
        let m = DriftMonitor::new(live, Metrics::new());
        m.observe_prediction("spam", "g1", Some(&reference), &[0.8, 0.2]);
        let Some(Err(warming)) = m.report("spam") else {
            panic!("a live reference fills first");
        };
        assert_eq!(warming.reference, Some("live"));
    }

    #[test]
    fn psi_needs_a_low_p_value_so_a_small_window_is_not_a_drift_by_chance() {
        // 20 predictions drawn like the reference's 40/60 split still score a PSI of several hundredths;
        // a clear shift scores far more and a p-value at the floor.
        let reference: Vec<usize> = (0..500).map(|i| usize::from(i % 5 < 3)).collect();
        let same: Vec<usize> = (0..20).map(|i| usize::from(i % 5 < 3)).collect();
        let quiet = stats::psi_test(&reference, &same, 2, 199, 1);
        assert!(quiet.p_value > 0.5, "{quiet:?}");
        let shifted: Vec<usize> = (0..100).map(|i| usize::from(i % 10 != 0)).collect();
        let moved = stats::psi_test(&reference, &shifted, 2, 199, 1);
        assert!(moved.score > 0.2 && moved.p_value <= 0.005, "{moved:?}");
    }
}
