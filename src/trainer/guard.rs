//! A guard against a run that diverges: the training loss, averaged over windows of optimizer steps, is
//! watched, and the trainable values at the end of the best window so far are kept. A window that gives back
//! at least half of what the best one had learned over a constant prediction — the loss of predicting the
//! training labels' frequencies, which is where a collapsed model ends — calls for a rollback: the caller puts
//! the kept values back, drops the optimizer's moments and halves the learning rate for the rest of the run.
//!
//! Clipping bounds a step's gradient, not AdamW's step, which the moments normalise: at LoRA's default rate
//! a long run (15,000 Chinese reviews) still collapsed to the majority label within its first epoch.

use candle_core::{Result, Tensor, Var};

/// A window must have learned at least this much (nats below the constant prediction) before a rise can
/// count as a divergence: a task that barely learns is not diverging.
const MIN_LEARNED: f64 = 0.05;

/// Watches windows of step losses; see the module documentation.
pub struct DivergenceGuard {
    window: usize,
    constant: f64,
    sum: f64,
    count: usize,
    /// The best window's mean loss and the values at its end.
    best: Option<(f64, Vec<Tensor>)>,
    rollbacks_left: usize,
}

/// A window that gave back too much.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Divergence {
    /// The window's mean loss.
    pub loss: f64,
    /// The best window's.
    pub best: f64,
    /// The loss of a constant prediction of the label frequencies.
    pub constant: f64,
}

impl DivergenceGuard {
    /// Judges windows of `window` steps against `constant`, the loss of a constant prediction (see
    /// [`constant_loss`]); allows `rollbacks` rollbacks, and none when 0.
    pub fn new(window: usize, constant: f64, rollbacks: usize) -> Self {
        Self {
            window: window.max(1),
            constant,
            sum: 0.0,
            count: 0,
            best: None,
            rollbacks_left: rollbacks,
        }
    }

    /// Records one optimizer step's mean loss, taken after the step that changed `vars`; at the end of a
    /// window returns the divergence it shows, if any, while rollbacks are left.
    pub fn observe(&mut self, loss: f64, vars: &[Var]) -> Result<Option<Divergence>> {
        if self.rollbacks_left == 0 {
            return Ok(None);
        }
        self.sum += loss;
        self.count += 1;
        if self.count < self.window {
            return Ok(None);
        }
        let mean = self.sum / self.count as f64;
        (self.sum, self.count) = (0.0, 0);
        // A NaN window is never the best one to come back to (`NaN >= best` is false).
        if !mean.is_finite() {
            return Ok(None);
        }
        if let Some((best, _)) = &self.best {
            if mean >= *best {
                let learned = self.constant - best;
                let diverged = learned >= MIN_LEARNED && mean - best >= learned / 2.0;
                return Ok(diverged.then_some(Divergence {
                    loss: mean,
                    best: *best,
                    constant: self.constant,
                }));
            }
        }
        let values = vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<Result<_>>()?;
        self.best = Some((mean, values));
        Ok(None)
    }

    /// Puts the best window's values back into `vars` and counts the rollback.
    pub fn roll_back(&mut self, vars: &[Var]) -> Result<()> {
        if let Some((_, values)) = &self.best {
            for (var, value) in vars.iter().zip(values) {
                var.set(value)?;
            }
        }
        self.rollbacks_left = self.rollbacks_left.saturating_sub(1);
        (self.sum, self.count) = (0.0, 0);
        Ok(())
    }
}

/// The cross-entropy ([`super::lora::cross_entropy`]) of the best constant prediction for `labels` (one
/// label index per example, of `classes`), with targets smoothed by `smoothing` and classes weighted by
/// `weights` when given. Each class c draws a mass aᶜ = (1 − s)·wᶜ·nᶜ + (s / C)·N·wᶜ on the prediction's
/// log-probabilities (nᶜ examples of it, N in all), over the targets' weight W = Σ wᶜ·nᶜ; the best constant
/// prediction is a / A (A = Σ aᶜ), and its loss (A / W)·H(a / A). Unweighted, that is the entropy of the
/// smoothed label frequencies.
pub fn constant_loss(
    labels: impl Iterator<Item = usize>,
    classes: usize,
    smoothing: f64,
    weights: Option<&[f32]>,
) -> f64 {
    let weight = |c: usize| weights.map_or(1.0, |w| f64::from(w[c]));
    let mut counts = vec![0.0f64; classes];
    for label in labels {
        counts[label] += 1.0;
    }
    let n: f64 = counts.iter().sum();
    let target_weight: f64 = (0..classes).map(|c| weight(c) * counts[c]).sum();
    if target_weight <= 0.0 {
        return 0.0;
    }
    let mass: Vec<f64> = (0..classes)
        .map(|c| {
            (1.0 - smoothing) * weight(c) * counts[c] + smoothing / classes as f64 * n * weight(c)
        })
        .collect();
    let total: f64 = mass.iter().sum();
    let entropy: f64 = mass
        .iter()
        .map(|m| m / total)
        .filter(|p| *p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    total / target_weight * entropy
}

#[cfg(test)]
mod tests {
    use super::{constant_loss, Divergence, DivergenceGuard};
    use candle_core::{Device, Tensor, Var};

    fn value(var: &Var) -> f32 {
        var.as_tensor().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn the_constant_loss_is_the_entropy_of_the_label_frequencies() {
        let even = constant_loss([0, 1, 0, 1].into_iter(), 2, 0.0, None);
        assert!((even - std::f64::consts::LN_2).abs() < 1e-12);
        // 3:1 is less uncertain; smoothing moves it back towards even; weights that balance it restore it.
        let skewed = constant_loss([0, 0, 0, 1].into_iter(), 2, 0.0, None);
        let expected = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        assert!((skewed - expected).abs() < 1e-12);
        assert!(constant_loss([0, 0, 0, 1].into_iter(), 2, 0.1, None) > skewed);
        let balanced = constant_loss([0, 0, 0, 1].into_iter(), 2, 0.0, Some(&[1.0, 3.0]));
        assert!((balanced - std::f64::consts::LN_2).abs() < 1e-12);
    }

    #[test]
    fn the_constant_loss_is_the_least_loss_a_constant_prediction_gets_weighted_and_smoothed() {
        let labels = [0u32, 0, 0, 1, 2];
        let weights = [1.0f32, 3.0, 2.0];
        let smoothing = 0.1;
        let want = constant_loss(
            labels.iter().map(|&l| l as usize),
            3,
            smoothing,
            Some(&weights),
        );
        let loss_of = |q: [f32; 3]| {
            let row: Vec<f32> = q.iter().map(|p| p.ln()).collect();
            let logits = Tensor::new(vec![row; labels.len()], &Device::Cpu).unwrap();
            let targets = Tensor::new(&labels, &Device::Cpu).unwrap();
            let w = Tensor::new(&weights, &Device::Cpu).unwrap();
            f64::from(
                crate::trainer::lora::cross_entropy(&logits, &targets, smoothing, Some(&w))
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            )
        };
        // The best prediction: each class's mass (1 − s)·w·n + (s/C)·N·w, normalised.
        let n = labels.len() as f64;
        let mass: Vec<f64> = (0..3)
            .map(|c| {
                let count = labels.iter().filter(|&&l| l as usize == c).count() as f64;
                (1.0 - smoothing) * f64::from(weights[c]) * count
                    + smoothing / 3.0 * n * f64::from(weights[c])
            })
            .collect();
        let total: f64 = mass.iter().sum();
        let best = [0, 1, 2].map(|c| (mass[c] / total) as f32);
        assert!(
            (loss_of(best) - want).abs() < 1e-5,
            "{} vs {want}",
            loss_of(best)
        );
        for other in [
            [0.5, 0.3, 0.2],
            [0.34, 0.33, 0.33],
            [best[0] + 0.02, best[1] - 0.01, best[2] - 0.01],
        ] {
            assert!(loss_of(other) > want, "{other:?}");
        }
    }

    #[test]
    fn a_window_that_gives_back_half_of_what_was_learned_rolls_back_to_the_best_one() {
        let var = Var::from_tensor(&Tensor::new(&[0.0f32], &Device::Cpu).unwrap()).unwrap();
        let vars = [var.clone()];
        let mut guard = DivergenceGuard::new(2, 0.7, 1);
        let mut window = |loss: f64, at: f32| {
            var.set(&Tensor::new(&[at], &Device::Cpu).unwrap()).unwrap();
            assert_eq!(guard.observe(loss, &vars).unwrap(), None, "mid-window");
            var.set(&Tensor::new(&[at + 0.5], &Device::Cpu).unwrap())
                .unwrap();
            guard.observe(loss, &vars).unwrap()
        };
        assert_eq!(window(0.69, 1.0), None, "the first window is the best");
        assert_eq!(window(0.40, 2.0), None, "better: kept");
        assert_eq!(window(0.30, 3.0), None, "better again: kept");
        assert_eq!(
            window(f64::NAN, 9.0),
            None,
            "a NaN window is neither judged nor kept"
        );
        assert_eq!(
            window(0.45, 4.0),
            None,
            "worse, but by less than half of 0.4"
        );
        let diverged = window(0.52, 5.0).expect("0.22 above the best is over half of 0.4");
        assert_eq!(
            diverged,
            Divergence {
                loss: 0.52,
                best: 0.30,
                constant: 0.7
            }
        );
        guard.roll_back(&vars).unwrap();
        assert_eq!(value(&var), 3.5, "the values at the end of the best window");
        // The one rollback allowed is spent: the guard no longer judges.
        for _ in 0..4 {
            assert_eq!(guard.observe(0.69, &vars).unwrap(), None);
        }
    }

    #[test]
    fn a_task_that_barely_learns_is_not_diverging() {
        let var = Var::from_tensor(&Tensor::new(&[0.0f32], &Device::Cpu).unwrap()).unwrap();
        let mut guard = DivergenceGuard::new(1, 0.69, 3);
        for loss in [0.68, 0.66, 0.69, 0.70, 0.65, 0.69] {
            assert_eq!(
                guard.observe(loss, std::slice::from_ref(&var)).unwrap(),
                None
            );
        }
        let mut off = DivergenceGuard::new(1, 0.69, 0);
        for loss in [0.2, 0.69] {
            assert_eq!(
                off.observe(loss, std::slice::from_ref(&var)).unwrap(),
                None,
                "0 rollbacks: off"
            );
        }
    }
}
