//! Drift monitoring per task. Each stable generation is compared with its reference: the data it was
//! trained and validated on when Flywheel trained it (published beside the adapter, so the comparison starts
//! with the first `min_window` predictions), or else — for adapters made elsewhere — the first
//! `reference_size` predictions it served (a warm-up window, taken again whenever the stable generation
//! changes). The latest `window_size` predictions are compared with it on three signals:
//! - `prediction`: PSI of the predicted-label distribution;
//! - `confidence`: PSI of the top-probability distribution over the reference's deciles;
//! - `embedding`: the cosine distance between mean embeddings and MMD² (RBF).
//!
//! Every statistic has a seeded permutation p-value (the pooled samples re-split at random), so what counts
//! as drift accounts for the window's size: a small window must move further to be detected.
//!
//! Embeddings are the serving generation's mean-pooled hidden states, which the forward pass that answers
//! the prediction computes anyway.

pub mod stats;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::adapters::reference::DriftReference;
use crate::config::DriftConfig;
use crate::metrics::Metrics;

/// Every (signal, method) pair a report scores.
const SCORES: [(&str, &str); 4] = [
    ("prediction", "psi"),
    ("confidence", "psi"),
    ("embedding", "mean_distance"),
    ("embedding", "mmd"),
];

/// One served prediction, as the monitor keeps it.
#[derive(Clone)]
struct Sample {
    label: usize,
    confidence: f32,
    embedding: Vec<f32>,
}

struct TaskDrift {
    generation: String,
    labels: usize,
    /// `training` (published with the generation) or `live` (its first predictions).
    kind: &'static str,
    /// The reference once complete.
    reference: Option<Arc<DriftReference>>,
    /// A live reference while it fills.
    filling: Vec<Sample>,
    window: VecDeque<Sample>,
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
            reference: training,
            filling: Vec::new(),
            window: VecDeque::new(),
            fresh: 0,
            computed: None,
            report: None,
        }
    }

    /// Embeddings in the reference (as the report counts them).
    fn reference_len(&self) -> usize {
        self.reference
            .as_ref()
            .map_or(self.filling.len(), |r| r.embeddings.len())
    }
}

/// What a report is computed from, copied out of the lock.
struct Snapshot {
    generation: String,
    labels: usize,
    kind: &'static str,
    reference: Arc<DriftReference>,
    window: Vec<Sample>,
}

/// One signal's outcome.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SignalReport {
    /// `prediction`, `confidence` or `embedding`.
    pub signal: &'static str,
    /// `psi`, `mean_distance` or `mmd`.
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
    /// Samples in the reference (embeddings; a training reference's labels come from its validation
    /// split).
    pub reference_size: usize,
    /// Predictions in the live window.
    pub window_size: usize,
    /// Every signal.
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
    /// Samples in the reference so far.
    pub reference_size: usize,
    /// Predictions in the window so far.
    pub window_size: usize,
    /// What is missing.
    pub status: String,
}

/// The drift monitor of every task.
pub struct DriftMonitor {
    tasks: Mutex<HashMap<String, TaskDrift>>,
    config: DriftConfig,
    metrics: Metrics,
}

impl DriftMonitor {
    /// A monitor with no tasks yet.
    pub fn new(config: DriftConfig, metrics: Metrics) -> Self {
        Self {
            tasks: Mutex::new(HashMap::new()),
            config,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskDrift>> {
        self.tasks
            .lock()
            .expect("drift lock poisoned; this is a bug")
    }

    /// Records what the stable `generation` of `task` predicted: class probabilities and the input's
    /// embedding. A new generation starts over with its `training` reference, or a live one without.
    pub fn observe(
        &self,
        task: &str,
        generation: &str,
        training: Option<&Arc<DriftReference>>,
        probs: &[f32],
        embedding: &[f32],
    ) {
        if !self.config.enabled || probs.is_empty() {
            return;
        }
        let (label, confidence) =
            probs.iter().enumerate().fold(
                (0, f32::MIN),
                |a, (i, &p)| {
                    if p > a.1 {
                        (i, p)
                    } else {
                        a
                    }
                },
            );
        let sample = Sample {
            label,
            confidence,
            embedding: embedding.to_vec(),
        };
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
        if entry.reference.is_none() {
            entry.filling.push(sample);
            if entry.filling.len() >= self.config.reference_size {
                let samples = std::mem::take(&mut entry.filling);
                entry.reference = Some(Arc::new(DriftReference {
                    labels: samples.iter().map(|s| s.label).collect(),
                    confidences: samples.iter().map(|s| s.confidence).collect(),
                    embeddings: samples.into_iter().map(|s| s.embedding).collect(),
                }));
            }
            return;
        }
        if entry.window.len() >= self.config.window_size {
            entry.window.pop_front();
        }
        entry.window.push_back(sample);
        entry.fresh += 1;
        self.metrics
            .drift_window_size
            .with_label_values(&[task])
            .set(entry.window.len() as i64);
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

    /// The task's report, recomputed when new predictions arrived and the last one is older than
    /// `max_age` (the statistics run outside the lock); or what the monitor is waiting for.
    fn report_within(&self, task: &str, max_age: Duration) -> Option<Result<DriftReport, Warming>> {
        let snapshot = {
            let mut tasks = self.lock();
            let entry = tasks.get_mut(task)?;
            let reference = match &entry.reference {
                Some(r) if entry.window.len() >= self.config.min_window => r.clone(),
                _ => {
                    return Some(Err(Warming {
                        task: task.to_owned(),
                        generation: Some(entry.generation.clone()),
                        reference: Some(entry.kind),
                        reference_size: entry.reference_len(),
                        window_size: entry.window.len(),
                        status: match entry.kind {
                            "training" => format!(
                                "warming up: the window needs {} predictions",
                                self.config.min_window
                            ),
                            _ => format!(
                            "warming up: the live reference needs {} predictions and the window {}",
                            self.config.reference_size, self.config.min_window
                        ),
                        },
                    }))
                }
            };
            let stale = entry.computed.is_none_or(|t| t.elapsed() >= max_age);
            if entry.report.is_some() && (entry.fresh == 0 || !stale) {
                return entry.report.clone().map(Ok);
            }
            entry.fresh = 0;
            entry.computed = Some(Instant::now());
            Snapshot {
                generation: entry.generation.clone(),
                labels: entry.labels,
                kind: entry.kind,
                reference,
                window: entry.window.iter().cloned().collect(),
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

    /// The task's report, recomputed if anything new arrived.
    pub fn report(&self, task: &str) -> Option<Result<DriftReport, Warming>> {
        self.report_within(task, Duration::ZERO)
    }

    /// Refreshes every task's report at most every `max_age` (the autopilot's tick) so the metrics stay
    /// current.
    pub fn refresh(&self, max_age: Duration) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for task in names {
            let _ = self.report_within(&task, max_age);
        }
    }

    /// Whether the task's latest report found drift.
    pub fn detected(&self, task: &str) -> bool {
        self.lock()
            .get(task)
            .and_then(|t| t.report.as_ref())
            .is_some_and(|r| r.detected)
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
        let window: Vec<&[f32]> = entry
            .window
            .iter()
            .map(|s| s.embedding.as_slice())
            .collect();
        let reference_rows: Vec<&[f32]> = reference.embeddings.iter().map(Vec::as_slice).collect();
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
        let mmd = stats::mmd(&ra, &wa, c.permutations, 0x33D);
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
        let signals = vec![
            tested("prediction", "psi", prediction, c.psi_threshold),
            tested("confidence", "psi", confidence, c.psi_threshold),
            tested("embedding", "mean_distance", distance, c.min_distance),
            tested("embedding", "mmd", mmd, c.min_mmd),
        ];
        DriftReport {
            task: task.to_owned(),
            generation: entry.generation.clone(),
            reference: entry.kind,
            reference_size: reference.embeddings.len(),
            window_size: entry.window.len(),
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
            m.observe("spam", generation, reference, &probs, &embedding);
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
        assert!(moved.detected && m.detected("spam"), "{moved:?}");
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
        tasks["spam"]
            .reference
            .clone()
            .expect("the live reference filled")
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
        m.observe("spam", "g1", Some(&reference), &[0.8, 0.2], &[1.0; 8]);
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
