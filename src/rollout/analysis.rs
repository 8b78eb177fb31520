//! Per-arm evidence and the guardrail analysis that turns it into pass, rollback or hold.
//!
//! Accuracy compares the arms' online accuracy (feedback joined to the requests each arm served) with the
//! Agresti–Caffo interval for a difference of two proportions: pass when the candidate is not worse than
//! stable by more than the margin at the configured one-sided confidence, roll back when it is worse at that
//! confidence. Latency and errors can only roll back. Too little data is a hold, never a pass.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::config::RolloutConfig;

/// What one arm did in the current step.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArmStats {
    /// Requests served.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Feedback items that judged one of its predictions.
    pub judged: u64,
    /// Of those, how many agreed with its prediction.
    pub correct: u64,
    /// Latencies in microseconds (not persisted: a restart starts the latency evidence afresh).
    #[serde(skip, default = "latency_histogram")]
    latency: Histogram<u64>,
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 2)
        .expect("static histogram bounds are valid; this is a bug")
}

impl Default for ArmStats {
    fn default() -> Self {
        Self {
            requests: 0,
            errors: 0,
            judged: 0,
            correct: 0,
            latency: latency_histogram(),
        }
    }
}

impl ArmStats {
    /// Counts a served request.
    pub fn observe(&mut self, seconds: f64, ok: bool) {
        self.requests += 1;
        if !ok {
            self.errors += 1;
        }
        self.latency
            .saturating_record((seconds * 1e6).max(1.0) as u64);
    }

    /// Counts a feedback verdict on one of its predictions.
    pub fn judge(&mut self, correct: bool) {
        self.judged += 1;
        if correct {
            self.correct += 1;
        }
    }

    /// Online accuracy, once anything was judged.
    pub fn accuracy(&self) -> Option<f64> {
        (self.judged > 0).then(|| self.correct as f64 / self.judged as f64)
    }

    /// Requests timed since the last start (the counts survive a restart; the latencies do not).
    pub fn timed(&self) -> u64 {
        self.latency.len()
    }

    /// P99 latency in milliseconds, once latencies were recorded since the last start.
    pub fn p99_ms(&self) -> Option<f64> {
        (!self.latency.is_empty()).then(|| self.latency.value_at_quantile(0.99) as f64 / 1e3)
    }

    /// Adds `other`'s evidence (another replica's, another step's) to this arm's.
    pub fn merge(&mut self, other: &ArmStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.judged += other.judged;
        self.correct += other.correct;
        // Every arm's histogram has the same bounds, so adding one to another cannot fail.
        let _ = self.latency.add(&other.latency);
    }

    fn error_rate(&self) -> f64 {
        self.errors as f64 / self.requests.max(1) as f64
    }
}

/// An arm's evidence as a replica stores it for the others: the counts, and the latency histogram as
/// (microseconds, count) pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmRecord {
    requests: u64,
    errors: u64,
    judged: u64,
    correct: u64,
    latency_us: Vec<(u64, u64)>,
}

impl From<&ArmStats> for ArmRecord {
    fn from(a: &ArmStats) -> Self {
        Self {
            requests: a.requests,
            errors: a.errors,
            judged: a.judged,
            correct: a.correct,
            latency_us: a
                .latency
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }
}

impl From<&ArmRecord> for ArmStats {
    fn from(r: &ArmRecord) -> Self {
        let mut a = ArmStats {
            requests: r.requests,
            errors: r.errors,
            judged: r.judged,
            correct: r.correct,
            latency: latency_histogram(),
        };
        for &(value, count) in &r.latency_us {
            let _ = a.latency.record_n(value, count);
        }
        a
    }
}

/// The analysis' verdict, with the sentence that explains it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "verdict", content = "reason", rename_all = "snake_case")]
pub enum Verdict {
    /// The candidate may advance (or be promoted after the last step).
    Pass(String),
    /// The candidate must go.
    Rollback(String),
    /// Not enough evidence either way yet.
    Hold(String),
}

/// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The one-sided `confidence` interval bounds `(lower, upper)` of candidate accuracy − stable accuracy
/// (Agresti–Caffo: one success and one failure added to each arm).
pub fn difference_bounds(stable: &ArmStats, candidate: &ArmStats, confidence: f64) -> (f64, f64) {
    let p = |a: &ArmStats| (a.correct as f64 + 1.0) / (a.judged as f64 + 2.0);
    let (ps, pc) = (p(stable), p(candidate));
    let se = (ps * (1.0 - ps) / (stable.judged as f64 + 2.0)
        + pc * (1.0 - pc) / (candidate.judged as f64 + 2.0))
        .sqrt();
    let z = normal_quantile(confidence);
    (pc - ps - z * se, pc - ps + z * se)
}

/// Judges the candidate against stable under `policy`.
pub fn analyse(stable: &ArmStats, candidate: &ArmStats, policy: &RolloutConfig) -> Verdict {
    let enough_requests =
        stable.requests >= policy.min_requests && candidate.requests >= policy.min_requests;
    // After a restart the counts are back but the latencies start afresh: a P99 of a handful of requests
    // decides nothing.
    let enough_latency =
        stable.timed() >= policy.min_requests && candidate.timed() >= policy.min_requests;
    if enough_latency {
        if let (Some(s), Some(c)) = (stable.p99_ms(), candidate.p99_ms()) {
            if c > policy.max_p99_ratio * s {
                return Verdict::Rollback(format!(
                    "candidate P99 {c:.1} ms exceeds {:.2} × stable's {s:.1} ms",
                    policy.max_p99_ratio
                ));
            }
        }
    }
    if enough_requests {
        let (es, ec) = (stable.error_rate(), candidate.error_rate());
        if ec > es + policy.max_error_rate_increase {
            return Verdict::Rollback(format!(
                "candidate error rate {ec:.3} exceeds stable's {es:.3} by more than {}",
                policy.max_error_rate_increase
            ));
        }
    }
    if stable.judged < policy.min_feedback || candidate.judged < policy.min_feedback {
        return Verdict::Hold(format!(
            "waiting for feedback: stable {}/{}, candidate {}/{} judged predictions",
            stable.judged, policy.min_feedback, candidate.judged, policy.min_feedback
        ));
    }
    let (lower, upper) = difference_bounds(stable, candidate, policy.confidence);
    let (s, c) = (
        stable.accuracy().unwrap_or(0.0),
        candidate.accuracy().unwrap_or(0.0),
    );
    let numbers = format!(
        "candidate accuracy {c:.4} ({}/{}) vs stable {s:.4} ({}/{}); difference in [{lower:.4}, {upper:.4}] at {:.0} %",
        candidate.correct,
        candidate.judged,
        stable.correct,
        stable.judged,
        policy.confidence * 100.0
    );
    if upper < 0.0 {
        return Verdict::Rollback(format!("candidate is worse: {numbers}"));
    }
    if lower <= -policy.margin {
        return Verdict::Hold(format!(
            "inconclusive (margin {}): {numbers}",
            policy.margin
        ));
    }
    if !enough_latency {
        return Verdict::Hold(format!(
            "accuracy passes but latency needs {} timed requests per arm since the start (stable {}, \
             candidate {}): {numbers}",
            policy.min_requests,
            stable.timed(),
            candidate.timed()
        ));
    }
    Verdict::Pass(format!(
        "not worse than stable by {}: {numbers}",
        policy.margin
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(judged: u64, correct: u64, requests: u64, latency_s: f64) -> ArmStats {
        let mut a = ArmStats::default();
        for i in 0..judged {
            a.judge(i < correct);
        }
        for _ in 0..requests {
            a.observe(latency_s, true);
        }
        a
    }

    fn policy() -> RolloutConfig {
        RolloutConfig {
            min_feedback: 50,
            min_requests: 50,
            ..RolloutConfig::default()
        }
    }

    #[test]
    fn after_a_restart_a_few_timed_requests_neither_roll_back_nor_pass() {
        // 250 requests each, restored without their latencies (as `rollouts.json` keeps them), then one
        // fresh request each: the candidate's is slower by more than the ratio.
        let restored = |latency_s| {
            let mut a: ArmStats =
                serde_json::from_value(serde_json::to_value(arm(2000, 1800, 250, 0.001)).unwrap())
                    .unwrap();
            assert_eq!((a.requests, a.timed()), (250, 0));
            a.observe(latency_s, true);
            a
        };
        let (stable, candidate) = (restored(0.009), restored(0.014));
        let verdict = analyse(&stable, &candidate, &policy());
        assert!(
            matches!(&verdict, Verdict::Hold(why) if why.contains("timed requests")),
            "{verdict:?}"
        );
        // With enough fresh latencies, the same gap rolls back.
        let (stable, candidate) = (arm(100, 90, 60, 0.009), arm(100, 90, 60, 0.014));
        assert!(matches!(
            analyse(&stable, &candidate, &policy()),
            Verdict::Rollback(_)
        ));
    }

    #[test]
    fn an_arm_survives_its_record_and_arms_merge_with_their_latencies() {
        let (fast, slow) = (arm(10, 9, 100, 0.002), arm(5, 1, 100, 0.2));
        let back = ArmStats::from(&ArmRecord::from(&slow));
        assert_eq!(ArmRecord::from(&back), ArmRecord::from(&slow));
        assert_eq!(back.p99_ms(), slow.p99_ms());
        let mut both = fast.clone();
        both.merge(&back);
        assert_eq!((both.requests, both.judged, both.correct), (200, 15, 10));
        assert_eq!(
            both.p99_ms(),
            slow.p99_ms(),
            "the slow replica's tail counts"
        );
    }

    #[test]
    fn the_normal_quantile_matches_tables() {
        assert!((normal_quantile(0.95) - 1.644_853_6).abs() < 1e-6);
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-6);
        assert!((normal_quantile(0.5)).abs() < 1e-9);
        assert!((normal_quantile(0.001) + 3.090_232).abs() < 1e-5);
    }

    #[test]
    fn no_data_is_never_a_pass() {
        let v = analyse(&ArmStats::default(), &ArmStats::default(), &policy());
        assert!(matches!(v, Verdict::Hold(_)), "{v:?}");
        let v = analyse(
            &arm(500, 450, 500, 0.01),
            &arm(10, 10, 500, 0.01),
            &policy(),
        );
        assert!(matches!(v, Verdict::Hold(_)), "{v:?}");
    }

    #[test]
    fn a_clearly_worse_candidate_rolls_back_and_an_equal_or_better_one_passes() {
        let stable = arm(300, 270, 300, 0.01);
        let v = analyse(&stable, &arm(300, 150, 300, 0.01), &policy());
        assert!(matches!(v, Verdict::Rollback(_)), "{v:?}");
        let v = analyse(&stable, &arm(300, 295, 300, 0.01), &policy());
        assert!(matches!(v, Verdict::Pass(_)), "{v:?}");
        // Equal accuracy on little data cannot rule out a 2-point loss: hold.
        let v = analyse(&arm(60, 54, 60, 0.01), &arm(60, 54, 60, 0.01), &policy());
        assert!(matches!(v, Verdict::Hold(_)), "{v:?}");
    }

    #[test]
    fn a_slow_candidate_rolls_back_even_when_accurate() {
        let v = analyse(
            &arm(300, 270, 300, 0.010),
            &arm(300, 299, 300, 0.030),
            &policy(),
        );
        assert!(
            matches!(&v, Verdict::Rollback(r) if r.contains("P99")),
            "{v:?}"
        );
    }
}
