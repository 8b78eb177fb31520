//! Evaluation: accuracy, macro-F1, ROC-AUC (binary, or macro one-vs-rest) and the confusion matrix.

use serde::{Deserialize, Serialize};

/// Scores of a classifier on a labelled set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Evaluation {
    /// Examples scored.
    pub examples: usize,
    /// Fraction predicted right.
    pub accuracy: f64,
    /// Unweighted mean of per-label F1 (a label never true nor predicted counts as F1 = 0 only if present).
    pub macro_f1: f64,
    /// ROC-AUC: binary on the second label's probability, else the mean one-vs-rest AUC over labels that
    /// have both positives and negatives; `None` when no label has both.
    pub auc: Option<f64>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
}

/// Scores `probs` (one probability vector per example) against `truth` (label indices).
pub fn evaluate(probs: &[Vec<f32>], truth: &[usize], labels: usize) -> Evaluation {
    assert_eq!(
        probs.len(),
        truth.len(),
        "one probability vector per example"
    );
    let mut confusion = vec![vec![0u64; labels]; labels];
    for (p, &t) in probs.iter().zip(truth) {
        let predicted = argmax(p);
        confusion[t][predicted] += 1;
    }
    let n = truth.len();
    let correct: u64 = (0..labels).map(|i| confusion[i][i]).sum();
    let present: Vec<usize> = (0..labels)
        .filter(|&i| {
            confusion[i].iter().sum::<u64>() > 0 || (0..labels).any(|t| confusion[t][i] > 0)
        })
        .collect();
    let f1s: Vec<f64> = present
        .iter()
        .map(|&i| {
            let tp = confusion[i][i] as f64;
            let fp: f64 = (0..labels)
                .filter(|&t| t != i)
                .map(|t| confusion[t][i] as f64)
                .sum();
            let fn_: f64 = (0..labels)
                .filter(|&p| p != i)
                .map(|p| confusion[i][p] as f64)
                .sum();
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fn_)
            }
        })
        .collect();
    let macro_f1 = if f1s.is_empty() {
        0.0
    } else {
        f1s.iter().sum::<f64>() / f1s.len() as f64
    };
    let auc = if labels == 2 {
        binary_auc(
            &probs.iter().map(|p| p[1] as f64).collect::<Vec<_>>(),
            &truth.iter().map(|&t| t == 1).collect::<Vec<_>>(),
        )
    } else {
        let aucs: Vec<f64> = (0..labels)
            .filter_map(|i| {
                let scores: Vec<f64> = probs.iter().map(|p| p[i] as f64).collect();
                binary_auc(&scores, &truth.iter().map(|&t| t == i).collect::<Vec<_>>())
            })
            .collect();
        (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64)
    };
    Evaluation {
        examples: n,
        accuracy: if n == 0 {
            0.0
        } else {
            correct as f64 / n as f64
        },
        macro_f1,
        auc,
        confusion,
    }
}

fn argmax(p: &[f32]) -> usize {
    crate::model::pooling::best(p).0
}

/// The probability that a random positive scores above a random negative (ties count half): the
/// Mann-Whitney form of ROC-AUC. `None` without both classes.
pub fn binary_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties.
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    let pos = positive.iter().filter(|&&p| p).count() as f64;
    let neg = positive.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    let rank_sum: f64 = ranks
        .iter()
        .zip(positive)
        .filter(|(_, &p)| p)
        .map(|(r, _)| r)
        .sum();
    Some((rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ordered_pairs_and_half_ties() {
        // Positives 0.9, 0.4; negatives 0.5, 0.1: 3 of 4 pairs ordered → 0.75.
        assert_eq!(
            binary_auc(&[0.9, 0.4, 0.5, 0.1], &[true, true, false, false]),
            Some(0.75)
        );
        assert_eq!(binary_auc(&[0.5, 0.5], &[true, false]), Some(0.5));
        assert_eq!(binary_auc(&[0.5, 0.7], &[true, true]), None);
    }

    #[test]
    fn accuracy_macro_f1_and_confusion_match_a_hand_count() {
        // truth:     0 0 1 1 2
        // predicted: 0 1 1 1 0
        let probs = vec![
            vec![0.8, 0.1, 0.1],
            vec![0.2, 0.7, 0.1],
            vec![0.1, 0.8, 0.1],
            vec![0.3, 0.6, 0.1],
            vec![0.5, 0.2, 0.3],
        ];
        let e = evaluate(&probs, &[0, 0, 1, 1, 2], 3);
        assert_eq!(
            e.confusion,
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]
        );
        assert!((e.accuracy - 0.6).abs() < 1e-12);
        // F1: label 0 = 2·1/(2+1+1) = 0.5; label 1 = 2·2/(4+1+0) = 0.8; label 2 = 0.
        assert!((e.macro_f1 - (0.5 + 0.8 + 0.0) / 3.0).abs() < 1e-12);
        assert!(e.auc.is_some());
    }
}
