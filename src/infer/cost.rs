//! What a forward pass costs: a batch's compute time modelled as a fixed part (weights streamed once per
//! batch, per-layer overhead), a part per token (the linear layers) and a part per squared sequence length
//! (attention), fitted online from measured batches.
//!
//! A per-token average alone misjudges the batcher: a single short request pays the whole fixed part, so at
//! light load each token looks several times dearer than in the large batch that queued requests really
//! form. The fit is seeded by calibration batches of realistic shapes run at start-up and follows live
//! batches after that (older ones fade), so a slower machine (a training job beside serving) shows in it
//! within a few dozen batches and fades after.

/// The shape of some inference work: what its compute time depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    /// Sequences.
    pub sequences: u64,
    /// Tokens, summed over the sequences.
    pub tokens: u64,
    /// Squared sequence lengths, summed (attention's cost).
    pub squares: u64,
}

impl Work {
    /// The work of sequences of these lengths.
    pub fn of_lengths(lengths: impl IntoIterator<Item = usize>) -> Self {
        lengths.into_iter().fold(Self::default(), |w, n| {
            let n = n as u64;
            Self {
                sequences: w.sequences + 1,
                tokens: w.tokens + n,
                squares: w.squares + n * n,
            }
        })
    }

    /// Both works together.
    pub fn plus(self, other: Self) -> Self {
        Self {
            sequences: self.sequences + other.sequences,
            tokens: self.tokens + other.tokens,
            squares: self.squares + other.squares,
        }
    }

    /// This work without `other`'s (which it holds).
    pub fn minus(self, other: Self) -> Self {
        Self {
            sequences: self.sequences.saturating_sub(other.sequences),
            tokens: self.tokens.saturating_sub(other.tokens),
            squares: self.squares.saturating_sub(other.squares),
        }
    }

    /// The fewest batches the batcher can cut this work into under its limits (at least one).
    pub fn batches(&self, max_batch_size: usize, max_batch_tokens: usize) -> u64 {
        let by_size = self.sequences.div_ceil(max_batch_size.max(1) as u64);
        let by_tokens = self.tokens.div_ceil(max_batch_tokens.max(1) as u64);
        by_size.max(by_tokens).max(1)
    }
}

/// Nanoseconds per batch, per token and per squared sequence length.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CostModel {
    /// Fixed cost of one forward pass.
    pub per_batch_ns: f64,
    /// Cost of one token.
    pub per_token_ns: f64,
    /// Cost of one unit of squared sequence length.
    pub per_square_ns: f64,
}

impl CostModel {
    /// Whether any batch has been measured (an unknown model predicts nothing).
    pub fn is_known(&self) -> bool {
        self.per_batch_ns + self.per_token_ns + self.per_square_ns > 0.0
    }

    /// Predicted nanoseconds for `work` cut into `batches` forward passes.
    pub fn nanos(&self, work: Work, batches: u64) -> f64 {
        self.per_batch_ns * batches as f64
            + self.per_token_ns * work.tokens as f64
            + self.per_square_ns * work.squares as f64
    }
}

/// Features are scaled to similar magnitudes so the normal equations stay well conditioned.
const TOKEN_SCALE: f64 = 1e-3;
const SQUARE_SCALE: f64 = 1e-6;

/// Weighted sums of the normal equations of a least-squares fit of time on `[1, tokens, squares]`.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    xx: [[f64; 3]; 3],
    xt: [f64; 3],
}

impl Sums {
    fn add(&mut self, work: Work, nanos: f64, weight: f64) {
        let x = features(work);
        for i in 0..3 {
            for j in 0..3 {
                self.xx[i][j] += weight * x[i] * x[j];
            }
            self.xt[i] += weight * x[i] * nanos;
        }
    }

    fn scaled(&self, by: f64) -> Self {
        let mut s = *self;
        s.xx.iter_mut().flatten().for_each(|v| *v *= by);
        s.xt.iter_mut().for_each(|v| *v *= by);
        s
    }

    fn plus(&self, other: &Self) -> Self {
        let mut s = *self;
        for i in 0..3 {
            for j in 0..3 {
                s.xx[i][j] += other.xx[i][j];
            }
            s.xt[i] += other.xt[i];
        }
        s
    }
}

fn features(work: Work) -> [f64; 3] {
    [
        1.0,
        work.tokens as f64 * TOKEN_SCALE,
        work.squares as f64 * SQUARE_SCALE,
    ]
}

/// The online fit: calibration batches, kept at a fixed weight so they pin down what live traffic does not
/// vary (a server that only ever sees single short requests still knows what a full batch costs), and
/// live batches, each counting a little less with every newer one.
#[derive(Debug, Clone)]
pub struct CostFit {
    calibration: Sums,
    live: Sums,
    /// The model fitted to both.
    model: CostModel,
}

/// Each live batch's weight is multiplied by this when a newer one arrives (a half-life of ~70 batches).
const LIVE_DECAY: f64 = 0.99;

/// Calibration's share: its sums count a quarter as much as the same number of live batches.
const CALIBRATION_WEIGHT: f64 = 0.25;

impl Default for CostFit {
    fn default() -> Self {
        Self::new()
    }
}

impl CostFit {
    /// A fit with no measurements (its model is unknown).
    pub fn new() -> Self {
        Self {
            calibration: Sums::default(),
            live: Sums::default(),
            model: CostModel::default(),
        }
    }

    /// Adds a calibration batch: `work` took `nanos`.
    pub fn calibrate(&mut self, work: Work, nanos: f64) {
        self.calibration.add(work, nanos, weight(nanos));
        self.refit();
    }

    /// Adds a live batch: `work` took `nanos`.
    pub fn record(&mut self, work: Work, nanos: f64) {
        self.live = self.live.scaled(LIVE_DECAY);
        self.live.add(work, nanos, weight(nanos));
        self.refit();
    }

    /// The current model.
    pub fn model(&self) -> CostModel {
        self.model
    }

    fn refit(&mut self) {
        let sums = self.calibration.scaled(CALIBRATION_WEIGHT).plus(&self.live);
        if let Some(theta) = non_negative_least_squares(&sums) {
            self.model = CostModel {
                per_batch_ns: theta[0],
                per_token_ns: theta[1] * TOKEN_SCALE,
                per_square_ns: theta[2] * SQUARE_SCALE,
            };
        }
    }
}

/// Relative errors count: without this the few large batches would decide the fit alone, and a single
/// short request's prediction could be off by its whole size.
fn weight(nanos: f64) -> f64 {
    1.0 / nanos.max(1.0).powi(2)
}

/// Least squares with every coefficient ≥ 0 (a cost is never negative), by trying every subset of the
/// three features and keeping the best fit whose coefficients are all non-negative.
fn non_negative_least_squares(sums: &Sums) -> Option<[f64; 3]> {
    let mut best: Option<([f64; 3], f64)> = None;
    for mask in 1u8..8 {
        let active: Vec<usize> = (0..3).filter(|i| mask & (1 << i) != 0).collect();
        let Some(solution) = solve(sums, &active) else {
            continue;
        };
        if solution.iter().any(|&v| v < 0.0) {
            continue;
        }
        let mut theta = [0.0; 3];
        for (&i, &v) in active.iter().zip(&solution) {
            theta[i] = v;
        }
        // The weighted residual up to a constant: θᵀ·XᵀX·θ − 2·θᵀ·Xᵀt.
        let mut objective = 0.0;
        for i in 0..3 {
            objective -= 2.0 * theta[i] * sums.xt[i];
            for j in 0..3 {
                objective += theta[i] * sums.xx[i][j] * theta[j];
            }
        }
        if best.is_none_or(|(_, b)| objective < b) {
            best = Some((theta, objective));
        }
    }
    best.map(|(theta, _)| theta)
}

/// Solves the normal equations restricted to `active` features (Gaussian elimination with partial
/// pivoting); `None` when they are singular.
fn solve(sums: &Sums, active: &[usize]) -> Option<Vec<f64>> {
    let n = active.len();
    let mut a: Vec<Vec<f64>> = active
        .iter()
        .map(|&i| {
            let mut row: Vec<f64> = active.iter().map(|&j| sums.xx[i][j]).collect();
            row.push(sums.xt[i]);
            row
        })
        .collect();
    let scale = a.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    if scale == 0.0 {
        return None;
    }
    for col in 0..n {
        let pivot = (col..n).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[pivot][col].abs() <= scale * 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in a.iter_mut().skip(col + 1) {
            let f = row[col] / pivot_row[col];
            for (x, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                *x -= f * p;
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let rest: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (a[row][n] - rest) / a[row][row];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(batch: usize, len: usize) -> Work {
        Work::of_lengths(std::iter::repeat_n(len, batch))
    }

    #[test]
    fn an_exact_linear_cost_is_recovered() {
        let truth = CostModel {
            per_batch_ns: 2e6,
            per_token_ns: 15e3,
            per_square_ns: 20.0,
        };
        let mut fit = CostFit::new();
        for (b, l) in [(1, 8), (1, 64), (1, 256), (8, 32), (32, 16)] {
            let w = work(b, l);
            fit.calibrate(w, truth.nanos(w, 1));
        }
        let m = fit.model();
        assert!(
            (m.per_batch_ns / truth.per_batch_ns - 1.0).abs() < 1e-6,
            "{m:?}"
        );
        assert!(
            (m.per_token_ns / truth.per_token_ns - 1.0).abs() < 1e-6,
            "{m:?}"
        );
        assert!(
            (m.per_square_ns / truth.per_square_ns - 1.0).abs() < 1e-6,
            "{m:?}"
        );
    }

    #[test]
    fn coefficients_never_go_negative() {
        let mut fit = CostFit::new();
        // Longer batches measured as cheaper than short ones: noise, not a negative cost.
        fit.calibrate(work(1, 8), 5e6);
        fit.calibrate(work(1, 64), 4e6);
        fit.calibrate(work(1, 128), 4.5e6);
        let m = fit.model();
        assert!(m.per_batch_ns >= 0.0 && m.per_token_ns >= 0.0 && m.per_square_ns >= 0.0);
        assert!(m.is_known());
    }

    #[test]
    fn live_batches_outweigh_calibration_when_the_machine_slows_down() {
        let mut fit = CostFit::new();
        for (b, l) in [(1, 16), (1, 128), (16, 32), (32, 64)] {
            let w = work(b, l);
            fit.calibrate(w, 1e6 + 10e3 * w.tokens as f64);
        }
        // A training job beside serving: everything now takes twice as long.
        for _ in 0..300 {
            for (b, l) in [(1, 16), (4, 24)] {
                let w = work(b, l);
                fit.record(w, 2.0 * (1e6 + 10e3 * w.tokens as f64));
            }
        }
        let w = work(4, 24);
        let predicted = fit.model().nanos(w, 1);
        let slow = 2.0 * (1e6 + 10e3 * w.tokens as f64);
        assert!(
            (predicted / slow - 1.0).abs() < 0.05,
            "{predicted} vs {slow}"
        );
    }

    /// Forward passes of the real all-MiniLM-L6-v2 on a 2-core machine, recorded by
    /// `cargo bench --bench batch_cost`.
    const RECORDED: &str = include_str!("../../tests/fixtures/batch_timings.json");

    #[test]
    fn single_requests_predict_the_batches_concurrent_requests_form_within_2x() {
        let recorded: serde_json::Value = serde_json::from_str(RECORDED).unwrap();
        let batches: Vec<(Work, f64)> = recorded["batches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let (n, len) = (
                    b["sequences"].as_u64().unwrap(),
                    b["length"].as_u64().unwrap(),
                );
                let work = work(n as usize, len as usize);
                (work, b["median_ms"].as_f64().unwrap() * 1e6)
            })
            .collect();
        let mut fit = CostFit::new();
        for &(w, nanos) in batches.iter().filter(|(w, _)| w.sequences == 1) {
            fit.record(w, nanos);
        }
        let mut checked = 0;
        for &(w, nanos) in batches.iter().filter(|(w, _)| w.sequences > 1) {
            let ratio = fit.model().nanos(w, 1) / nanos;
            assert!(
                (0.5..=2.0).contains(&ratio),
                "{w:?}: predicted {ratio:.2}× the measured {:.1} ms",
                nanos / 1e6
            );
            checked += u64::from(w.sequences == 32);
        }
        assert!(checked > 0, "the recording has a 32-request batch");
    }

    #[test]
    fn work_is_cut_into_the_batches_the_batcher_forms() {
        let w = work(300, 20); // 6,000 tokens
        assert_eq!(w.batches(128, 16_384), 3, "by sequence count");
        assert_eq!(w.batches(1_000, 2_048), 3, "by tokens");
        assert_eq!(Work::default().batches(128, 16_384), 1);
    }
}
