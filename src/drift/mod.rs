//! Drift monitoring per task. The first `reference_size` predictions a stable generation serves form its
//! reference (a warm-up window, taken again whenever the stable generation changes); the latest
//! `window_size` predictions are compared with it on three signals:
//! - `prediction`: PSI of the predicted-label distribution;
//! - `confidence`: PSI of the top-probability distribution over the reference's deciles;
//! - `embedding`: the cosine distance between mean embeddings and MMD² (RBF), each with a seeded permutation
//!   p-value, so the threshold is calibrated on the reference itself rather than fixed.
//!
//! Embeddings are the serving generation's mean-pooled hidden states, which the forward pass that answers
//! the prediction computes anyway.

pub mod stats;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::DriftConfig;
use crate::metrics::Metrics;

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
    reference: Vec<Sample>,
    window: VecDeque<Sample>,
    /// Samples added since the last report, so a report is recomputed only when something changed.
    fresh: usize,
    /// When the report was last computed.
    computed: Option<Instant>,
    report: Option<DriftReport>,
}

impl TaskDrift {
    fn new(generation: &str, labels: usize) -> Self {
        Self {
            generation: generation.to_owned(),
            labels,
            reference: Vec::new(),
            window: VecDeque::new(),
            fresh: 0,
            computed: None,
            report: None,
        }
    }
}

/// What a report is computed from, copied out of the lock.
struct Snapshot {
    generation: String,
    labels: usize,
    reference: Vec<Sample>,
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
    /// The permutation p-value (embedding tests).
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
    /// Predictions in the reference.
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
    /// Predictions in the reference so far.
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
    /// embedding. A new generation starts a new reference.
    pub fn observe(&self, task: &str, generation: &str, probs: &[f32], embedding: &[f32]) {
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
        let entry = tasks
            .entry(task.to_owned())
            .or_insert_with(|| TaskDrift::new(generation, probs.len()));
        if entry.generation != generation || entry.labels != probs.len() {
            *entry = TaskDrift::new(generation, probs.len());
            // The old generation's verdicts no longer hold; the new one has none until its window fills.
            for signal in ["prediction", "confidence", "embedding"] {
                self.metrics
                    .drift_detected
                    .with_label_values(&[task, signal])
                    .set(0);
            }
        }
        if entry.reference.len() < self.config.reference_size {
            entry.reference.push(sample);
            return;
        }
        if entry.window.len() >= self.config.window_size {
            entry.window.pop_front();
        }
        entry.window.push_back(sample);
        entry.fresh += 1;
    }

    /// The task's report, recomputed when new predictions arrived and the last one is older than
    /// `max_age` (the statistics run outside the lock); or what the monitor is waiting for.
    fn report_within(&self, task: &str, max_age: Duration) -> Option<Result<DriftReport, Warming>> {
        let snapshot = {
            let mut tasks = self.lock();
            let entry = tasks.get_mut(task)?;
            if entry.window.len() < self.config.min_window {
                return Some(Err(Warming {
                    task: task.to_owned(),
                    generation: Some(entry.generation.clone()),
                    reference_size: entry.reference.len(),
                    window_size: entry.window.len(),
                    status: format!(
                        "warming up: the reference needs {} predictions and the window {}",
                        self.config.reference_size, self.config.min_window
                    ),
                }));
            }
            let stale = entry.computed.is_none_or(|t| t.elapsed() >= max_age);
            if entry.report.is_some() && (entry.fresh == 0 || !stale) {
                return entry.report.clone().map(Ok);
            }
            entry.fresh = 0;
            entry.computed = Some(Instant::now());
            Snapshot {
                generation: entry.generation.clone(),
                labels: entry.labels,
                reference: entry.reference.clone(),
                window: entry.window.iter().cloned().collect(),
            }
        };
        let report = self.compute(task, &snapshot);
        self.export(&report);
        let mut tasks = self.lock();
        if let Some(entry) = tasks
            .get_mut(task)
            .filter(|e| e.generation == snapshot.generation)
        {
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
        let count_labels = |samples: &mut dyn Iterator<Item = &Sample>| {
            let mut counts = vec![0u64; entry.labels];
            for s in samples {
                counts[s.label] += 1;
            }
            counts
        };
        let prediction = stats::psi(
            &count_labels(&mut entry.reference.iter()),
            &count_labels(&mut entry.window.iter()),
        );
        let reference_conf: Vec<f32> = entry.reference.iter().map(|s| s.confidence).collect();
        let window_conf: Vec<f32> = entry.window.iter().map(|s| s.confidence).collect();
        let edges = stats::decile_edges(&reference_conf);
        let confidence = stats::psi(
            &stats::bin_counts(&reference_conf, &edges),
            &stats::bin_counts(&window_conf, &edges),
        );
        let reference: Vec<&[f32]> = entry
            .reference
            .iter()
            .map(|s| s.embedding.as_slice())
            .collect();
        let window: Vec<&[f32]> = entry
            .window
            .iter()
            .map(|s| s.embedding.as_slice())
            .collect();
        // Both embedding tests run on seeded subsamples, which bounds their cost.
        let subsample = |rows: &[&[f32]], seed: u64| -> Vec<usize> {
            let mut idx: Vec<usize> = (0..rows.len()).collect();
            crate::rng::Rng::new(seed).shuffle(&mut idx);
            idx.truncate(c.mmd_sample);
            idx
        };
        let ra: Vec<&[f32]> = subsample(&reference, 1)
            .iter()
            .map(|&i| reference[i])
            .collect();
        let wa: Vec<&[f32]> = subsample(&window, 2).iter().map(|&i| window[i]).collect();
        let distance = stats::mean_distance(&ra, &wa, c.permutations, 0xD81F7);
        let mmd = stats::mmd(&ra, &wa, c.permutations, 0x33D);
        let psi_signal = |signal, score: f64| SignalReport {
            signal,
            method: "psi",
            score,
            threshold: c.psi_threshold,
            p_value: None,
            detected: score > c.psi_threshold,
        };
        let tested = |method, t: stats::Tested, floor: f64| SignalReport {
            signal: "embedding",
            method,
            score: t.score,
            threshold: floor,
            p_value: Some(t.p_value),
            detected: t.p_value < c.p_value && t.score > floor,
        };
        let signals = vec![
            psi_signal("prediction", prediction),
            psi_signal("confidence", confidence),
            tested("mean_distance", distance, c.min_distance),
            tested("mmd", mmd, c.min_mmd),
        ];
        DriftReport {
            task: task.to_owned(),
            generation: entry.generation.clone(),
            reference_size: entry.reference.len(),
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
            ..DriftConfig::default()
        }
    }

    fn feed(m: &DriftMonitor, generation: &str, n: usize, spam_share: f32, shift: f32, seed: u64) {
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
            m.observe("spam", generation, &probs, &embedding);
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
}
