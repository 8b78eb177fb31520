//! Sentence pooling over packed hidden states.

use super::cpu_encoder::Packed;

/// Mean of each sequence's token states (sentence-transformers' mean pooling: padding never exists in a
/// packed batch, so every row counts), L2-normalised when `normalize`.
pub fn mean_pool(packed: &Packed, normalize: bool) -> Vec<Vec<f32>> {
    (0..packed.len())
        .map(|i| {
            let mut out = mean_of_rows(packed.sequence(i), packed.width);
            if normalize {
                l2_normalize(&mut out);
            }
            out
        })
        .collect()
}

/// Mean of the rows of `rows` (`[n × width]`, row-major).
pub fn mean_of_rows(rows: &[f32], width: usize) -> Vec<f32> {
    let count = (rows.len() / width).max(1) as f32;
    let mut out = vec![0.0f32; width];
    for row in rows.chunks_exact(width) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    out.iter_mut().for_each(|v| *v /= count);
    out
}

/// Softmax of logits, computed in f64 for stable tails.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// The index of the highest value (the first of equals) and that value: the predicted label and its
/// probability.
pub fn best(probs: &[f32]) -> (usize, f32) {
    probs.iter().enumerate().fold(
        (0, f32::NEG_INFINITY),
        |a, (i, &p)| if p > a.1 { (i, p) } else { a },
    )
}

/// Scales `v` to unit L2 norm (sentence-transformers' `Normalize`, which clamps the norm at 1e-12).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_averages_only_the_rows_of_each_sequence() {
        let packed = Packed {
            hidden: vec![1.0, 2.0, 3.0, 4.0, 10.0, 20.0],
            offsets: vec![0, 2, 3],
            width: 2,
        };
        let pooled = mean_pool(&packed, false);
        assert_eq!(pooled, vec![vec![2.0, 3.0], vec![10.0, 20.0]]);
    }

    #[test]
    fn normalised_vectors_have_unit_length() {
        let packed = Packed {
            hidden: vec![3.0, 4.0],
            offsets: vec![0, 1],
            width: 2,
        };
        assert_eq!(mean_pool(&packed, true), vec![vec![0.6, 0.8]]);
    }
}
