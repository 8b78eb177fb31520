//! The drift statistics: PSI of a categorical or binned distribution, the cosine distance between mean
//! embeddings, the Mahalanobis distance between them under a shrunk pooled covariance, MMD² with an RBF
//! kernel (median-heuristic bandwidth), and permutation p-values that calibrate each statistic against the
//! reference itself and the window's size. The permutation loops are yield points: a background caller that
//! asked to (`crate::pressure`) steps aside for serving between rounds.

use crate::pressure::yield_point;
use crate::rng::Rng;

/// Floor for empty bins, so PSI stays finite (the usual 1e-4 smoothing).
const PSI_EPSILON: f64 = 1e-4;

/// Population stability index of `live` against `reference` counts over the same bins:
/// Σ (l − r) · ln(l / r) over bin shares.
pub fn psi(reference: &[u64], live: &[u64]) -> f64 {
    let (rt, lt) = (
        reference.iter().sum::<u64>().max(1) as f64,
        live.iter().sum::<u64>().max(1) as f64,
    );
    reference
        .iter()
        .zip(live)
        .map(|(&r, &l)| {
            let r = (r as f64 / rt).max(PSI_EPSILON);
            let l = (l as f64 / lt).max(PSI_EPSILON);
            (l - r) * (l / r).ln()
        })
        .sum()
}

/// Inner bin edges at the reference's deciles (so each bin holds ~10 % of the reference).
pub fn decile_edges(reference: &[f32]) -> Vec<f32> {
    let mut sorted = reference.to_vec();
    sorted.sort_by(f32::total_cmp);
    let mut edges: Vec<f32> = (1..10)
        .filter_map(|i| sorted.get(i * sorted.len() / 10).copied())
        .collect();
    edges.dedup();
    edges
}

/// Counts of `values` in the bins the inner `edges` define (`edges.len() + 1` bins).
pub fn bin_counts(values: &[f32], edges: &[f32]) -> Vec<u64> {
    let mut counts = vec![0u64; edges.len() + 1];
    for v in values {
        counts[edges.partition_point(|e| e <= v)] += 1;
    }
    counts
}

/// The bin of `value` among the inner `edges` (as [`bin_counts`] counts it).
pub fn bin_of(value: f32, edges: &[f32]) -> usize {
    edges.partition_point(|e| *e <= value)
}

/// PSI of the `live` bins against the `reference` bins (each value a bin index below `bins`), with a
/// permutation p-value over `permutations` seeded re-splits of the pooled values: a small window scores a
/// high PSI by chance alone, and the p-value says how often.
pub fn psi_test(
    reference: &[usize],
    live: &[usize],
    bins: usize,
    permutations: usize,
    seed: u64,
) -> Tested {
    let counts = |values: &[usize]| {
        let mut c = vec![0u64; bins];
        for &v in values {
            c[v.min(bins.saturating_sub(1))] += 1;
        }
        c
    };
    let score = psi(&counts(reference), &counts(live));
    let mut pooled: Vec<usize> = reference.iter().chain(live).copied().collect();
    permuted(
        &mut pooled,
        reference.len(),
        score,
        permutations,
        seed,
        |a, b| psi(&counts(a), &counts(b)),
    )
}

fn mean(rows: &[&[f32]]) -> Vec<f64> {
    let dim = rows.first().map_or(0, |r| r.len());
    let mut m = vec![0.0f64; dim];
    for r in rows {
        for (a, &x) in m.iter_mut().zip(r.iter()) {
            *a += f64::from(x);
        }
    }
    let n = rows.len().max(1) as f64;
    m.iter_mut().for_each(|a| *a /= n);
    m
}

fn cosine_distance(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    1.0 - dot / (na * nb)
}

/// A statistic with its permutation p-value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tested {
    /// The statistic on the real split.
    pub score: f64,
    /// Share of random re-splits of the pooled samples with a statistic at least as large (add-one).
    pub p_value: f64,
}

/// `score` with its permutation p-value: the share (add-one) of `permutations` seeded re-splits of `pooled`
/// into its first `split` items and the rest on which `stat` scores at least as high. A yield point every
/// 16 rounds lets a background caller step aside for serving.
fn permuted<T>(
    pooled: &mut [T],
    split: usize,
    score: f64,
    permutations: usize,
    seed: u64,
    mut stat: impl FnMut(&[T], &[T]) -> f64,
) -> Tested {
    let mut rng = Rng::new(seed);
    let mut at_least = 0;
    for round in 0..permutations {
        if round % 16 == 0 {
            yield_point();
        }
        rng.shuffle(pooled);
        let (a, b) = pooled.split_at(split);
        if stat(a, b) >= score {
            at_least += 1;
        }
    }
    Tested {
        score,
        p_value: (at_least + 1) as f64 / (permutations + 1) as f64,
    }
}

/// Cosine distance between the mean of `reference` and the mean of `live`, with a permutation p-value
/// over `permutations` seeded re-splits.
pub fn mean_distance(
    reference: &[&[f32]],
    live: &[&[f32]],
    permutations: usize,
    seed: u64,
) -> Tested {
    let stat = |a: &[&[f32]], b: &[&[f32]]| cosine_distance(&mean(a), &mean(b));
    let score = stat(reference, live);
    let mut pooled: Vec<&[f32]> = reference.iter().chain(live).copied().collect();
    permuted(
        &mut pooled,
        reference.len(),
        score,
        permutations,
        seed,
        stat,
    )
}

/// Squared Mahalanobis distance between the mean of `reference` and the mean of `live` under the pooled
/// samples' covariance shrunk towards its average variance (`S + shrinkage · tr(S)/d · I`), with a
/// permutation p-value over `permutations` seeded re-splits.
///
/// Sentence embeddings vary a lot along a few directions and little along the rest; a shift along a quiet
/// direction barely moves the cosine between means but stands out once each direction is scaled by its
/// spread. The pooled covariance is the same for every re-split, so the rows are whitened once and each
/// permutation only re-averages them.
pub fn mahalanobis(
    reference: &[&[f32]],
    live: &[&[f32]],
    permutations: usize,
    seed: u64,
    shrinkage: f64,
) -> Tested {
    let quiet = Tested {
        score: 0.0,
        p_value: 1.0,
    };
    let width = reference.first().or(live.first()).map_or(0, |r| r.len());
    let n = reference.len() + live.len();
    if reference.is_empty() || live.is_empty() || width == 0 {
        return quiet;
    }
    let mut center = vec![0.0f64; width];
    for row in reference.iter().chain(live) {
        center
            .iter_mut()
            .zip(*row)
            .for_each(|(c, &v)| *c += f64::from(v));
    }
    center.iter_mut().for_each(|c| *c /= n as f64);
    let mut rows: Vec<f64> = reference
        .iter()
        .chain(live)
        .flat_map(|row| row.iter().zip(&center).map(|(&v, c)| f64::from(v) - c))
        .collect();
    // The lower triangle of the covariance.
    let mut cov = vec![0.0f64; width * width];
    for (r, row) in rows.chunks_exact(width).enumerate() {
        if r % 64 == 0 {
            yield_point();
        }
        for i in 0..width {
            let (ri, line) = (row[i], &mut cov[i * width..i * width + i + 1]);
            line.iter_mut().zip(row).for_each(|(c, &rj)| *c += ri * rj);
        }
    }
    cov.iter_mut().for_each(|c| *c /= n as f64);
    let trace: f64 = (0..width).map(|i| cov[i * width + i]).sum();
    if trace <= 0.0 {
        return quiet;
    }
    let ridge = shrinkage.max(1e-6) * trace / width as f64;
    (0..width).for_each(|i| cov[i * width + i] += ridge);
    let Some(lower) = cholesky(cov, width) else {
        return quiet;
    };
    // Whiten: y = L⁻¹ z, so that ‖mean_a(y) − mean_b(y)‖² is the Mahalanobis distance of the means.
    for row in rows.chunks_exact_mut(width) {
        for i in 0..width {
            let line = &lower[i * width..i * width + i];
            let dot: f64 = line.iter().zip(&row[..i]).map(|(l, y)| l * y).sum();
            row[i] = (row[i] - dot) / lower[i * width + i];
        }
    }
    let mut total = vec![0.0f64; width];
    for row in rows.chunks_exact(width) {
        total.iter_mut().zip(row).for_each(|(t, v)| *t += v);
    }
    let (m, rest) = (reference.len() as f64, live.len() as f64);
    let mut sum = vec![0.0f64; width];
    let mut stat = |first: &[usize]| -> f64 {
        sum.iter_mut().for_each(|s| *s = 0.0);
        for &i in first {
            let row = &rows[i * width..(i + 1) * width];
            sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        sum.iter()
            .zip(&total)
            .map(|(a, t)| (a / m - (t - a) / rest).powi(2))
            .sum()
    };
    let mut order: Vec<usize> = (0..n).collect();
    let score = stat(&order[..reference.len()]);
    permuted(
        &mut order,
        reference.len(),
        score,
        permutations,
        seed,
        |a, _| stat(a),
    )
}

/// The lower Cholesky factor of the symmetric positive-definite matrix whose lower triangle `a` holds
/// (`n × n`, row-major); `None` if it is not positive definite.
fn cholesky(mut a: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let (above, rest) = a.split_at_mut((j + 1) * n);
        let row_j = &mut above[j * n..];
        let diagonal = row_j[j] - row_j[..j].iter().map(|v| v * v).sum::<f64>();
        if diagonal <= 0.0 || !diagonal.is_finite() {
            return None;
        }
        let pivot = diagonal.sqrt();
        row_j[j] = pivot;
        let row_j = &row_j[..j];
        for row_i in rest.chunks_exact_mut(n) {
            let dot: f64 = row_i[..j].iter().zip(row_j).map(|(x, y)| x * y).sum();
            row_i[j] = (row_i[j] - dot) / pivot;
        }
    }
    Some(a)
}

/// Unbiased MMD² between `reference` and `live` under an RBF kernel whose bandwidth is the median pairwise
/// distance of the pooled samples, with a permutation p-value over `permutations` seeded re-splits.
pub fn mmd(reference: &[&[f32]], live: &[&[f32]], permutations: usize, seed: u64) -> Tested {
    let pooled: Vec<&[f32]> = reference.iter().chain(live).copied().collect();
    let n = pooled.len();
    let mut d2 = vec![0.0f64; n * n];
    for i in 0..n {
        if i % 64 == 0 {
            yield_point();
        }
        for j in i + 1..n {
            let d: f64 = pooled[i]
                .iter()
                .zip(pooled[j])
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum();
            d2[i * n + j] = d;
            d2[j * n + i] = d;
        }
    }
    let mut off: Vec<f64> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .map(|(i, j)| d2[i * n + j])
        .collect();
    let median = if off.is_empty() {
        1.0
    } else {
        let mid = off.len() / 2;
        *off.select_nth_unstable_by(mid, f64::total_cmp).1
    };
    let gamma = 1.0 / median.max(1e-12);
    let k: Vec<f64> = d2.iter().map(|d| (-gamma * d).exp()).collect();
    let m = reference.len();
    let stat = |a: &[usize], b: &[usize]| -> f64 {
        let within = |s: &[usize]| -> f64 {
            let mut sum = 0.0;
            for (x, &i) in s.iter().enumerate() {
                for &j in &s[x + 1..] {
                    sum += k[i * n + j];
                }
            }
            2.0 * sum / (s.len() * (s.len() - 1)).max(1) as f64
        };
        let mut cross = 0.0;
        for &i in a {
            for &j in b {
                cross += k[i * n + j];
            }
        }
        within(a) + within(b) - 2.0 * cross / (a.len() * b.len()).max(1) as f64
    };
    let mut order: Vec<usize> = (0..n).collect();
    let score = stat(&order[..m], &order[m..]);
    permuted(&mut order, m, score, permutations, seed, stat)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud(n: usize, shift: f32, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| {
                rng.uniform(8, 1.0)
                    .into_iter()
                    .enumerate()
                    .map(|(d, x)| 1.0 + x + if d == 0 { shift } else { 0.0 })
                    .collect()
            })
            .collect()
    }

    fn refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
        v.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn psi_is_zero_for_equal_shares_and_matches_a_hand_count() {
        assert!(psi(&[10, 20, 30], &[20, 40, 60]).abs() < 1e-12);
        // Shares 0.5/0.5 → 0.8/0.2: 0.3·ln(1.6) + (−0.3)·ln(0.4).
        let want = 0.3 * 1.6f64.ln() - 0.3 * 0.4f64.ln();
        assert!((psi(&[50, 50], &[80, 20]) - want).abs() < 1e-12);
    }

    #[test]
    fn deciles_split_the_reference_evenly() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 / 1000.0).collect();
        let edges = decile_edges(&values);
        assert_eq!(edges.len(), 9);
        assert!(bin_counts(&values, &edges).iter().all(|&c| c == 100));
    }

    #[test]
    fn the_embedding_tests_separate_a_shift_from_resampling() {
        let (a, b, shifted) = (cloud(80, 0.0, 1), cloud(80, 0.0, 2), cloud(80, 0.5, 3));
        let same = mmd(&refs(&a), &refs(&b), 200, 9);
        let moved = mmd(&refs(&a), &refs(&shifted), 200, 9);
        assert!(
            same.p_value > 0.05 && moved.p_value < 0.01,
            "{same:?} {moved:?}"
        );
        assert!(moved.score > same.score);
        let same = mean_distance(&refs(&a), &refs(&b), 200, 9);
        let moved = mean_distance(&refs(&a), &refs(&shifted), 200, 9);
        assert!(
            same.p_value > 0.05 && moved.p_value < 0.01,
            "{same:?} {moved:?}"
        );
        let same = mahalanobis(&refs(&a), &refs(&b), 200, 9, 1.0);
        let moved = mahalanobis(&refs(&a), &refs(&shifted), 200, 9, 1.0);
        assert!(
            same.p_value > 0.05 && moved.p_value < 0.01,
            "{same:?} {moved:?}"
        );
    }

    #[test]
    fn a_shift_along_a_quiet_direction_stands_out_once_directions_are_scaled_by_their_spread() {
        // Direction 0 spreads widely, direction 1 barely; the window moves along direction 1 by a tenth
        // of direction 0's spread.
        let cloud = |n: usize, shift: f32, seed: u64| -> Vec<Vec<f32>> {
            let mut rng = Rng::new(seed);
            (0..n)
                .map(|_| {
                    let u = rng.uniform(4, 1.0);
                    vec![
                        3.0 + 2.0 * u[0],
                        0.05 * u[1] + shift,
                        1.0 + 0.02 * u[2],
                        0.01 * u[3],
                    ]
                })
                .collect()
        };
        let (a, b, shifted) = (cloud(100, 0.0, 1), cloud(100, 0.0, 2), cloud(100, 0.2, 3));
        let quiet = mahalanobis(&refs(&a), &refs(&b), 300, 9, 1.0);
        let moved = mahalanobis(&refs(&a), &refs(&shifted), 300, 9, 1.0);
        assert!(quiet.p_value > 0.05, "{quiet:?}");
        assert!(
            moved.p_value < 0.01 && moved.score > 10.0 * quiet.score,
            "{moved:?}"
        );
        let cosine = mean_distance(&refs(&a), &refs(&shifted), 300, 9);
        assert!(cosine.score < 0.01, "the cosine barely moves: {cosine:?}");
        // Degenerate inputs test as undrifted, never NaN.
        let flat = vec![vec![1.0f32; 4]; 10];
        assert_eq!(
            mahalanobis(&refs(&flat), &refs(&flat), 50, 1, 1.0).p_value,
            1.0
        );
        assert_eq!(mahalanobis(&[], &refs(&a), 50, 1, 1.0).p_value, 1.0);
    }

    #[test]
    fn cholesky_factors_a_known_matrix() {
        // [[4, 2], [2, 3]] = L Lᵀ with L = [[2, 0], [1, √2]]; only the lower triangle is read.
        let l = cholesky(vec![4.0, 0.0, 2.0, 3.0], 2).unwrap();
        assert!((l[0] - 2.0).abs() < 1e-12 && (l[2] - 1.0).abs() < 1e-12);
        assert!((l[3] - 2f64.sqrt()).abs() < 1e-12);
        assert!(
            cholesky(vec![1.0, 0.0, 2.0, 1.0], 2).is_none(),
            "not positive definite"
        );
    }
}
