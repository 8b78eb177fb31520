//! Training data: labelled token sequences, a seeded stratified train/validation split, and padded batches.

use candle_core::{Device, Tensor};

use crate::model::Result;
pub use crate::rng::Rng;

/// One labelled, tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids with special tokens.
    pub ids: Vec<u32>,
    /// Label index.
    pub label: usize,
}

/// Splits `examples` into (train, validation), taking `val_fraction` of each label (at least one example of
/// every label with two or more), after a seeded shuffle.
pub fn stratified_split(
    examples: Vec<Example>,
    labels: usize,
    val_fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    stratified_split_by(examples, |e| e.label, labels, val_fraction, seed)
}

/// [`stratified_split`] of anything with a label: items whose `label_of` is `labels` or more are left out.
pub fn stratified_split_by<T>(
    items: Vec<T>,
    label_of: impl Fn(&T) -> usize,
    labels: usize,
    val_fraction: f64,
    seed: u64,
) -> (Vec<T>, Vec<T>) {
    let mut by_label: Vec<Vec<T>> = (0..labels).map(|_| Vec::new()).collect();
    for e in items {
        let label = label_of(&e);
        if label < labels {
            by_label[label].push(e);
        }
    }
    let mut rng = Rng::new(seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for mut group in by_label {
        rng.shuffle(&mut group);
        let mut take = (group.len() as f64 * val_fraction).round() as usize;
        if take == 0 && group.len() >= 2 {
            take = 1;
        }
        // A label keeps at least one example to train on.
        take = take.min(group.len().saturating_sub(1));
        val.extend(group.drain(..take));
        train.extend(group);
    }
    rng.shuffle(&mut train);
    (train, val)
}

/// A train/validation split, or all rows to train on when a validation split would be too small to choose
/// an epoch by.
#[derive(Debug, Clone, PartialEq)]
pub struct Split<T> {
    /// Rows to train on.
    pub train: Vec<T>,
    /// Rows to validate on; empty when validation was skipped.
    pub val: Vec<T>,
    /// Why validation was skipped, when it was.
    pub skipped: Option<SmallValidation>,
}

/// The label whose validation share fell short of `min_val_per_label`, or the only label there was to
/// validate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmallValidation {
    /// The label index.
    pub label: usize,
    /// Whether it was the only label of the rows to validate on (a warm start's rows since its parent's
    /// data may all be corrections to one label): macro-F1 over one label is highest for a model that
    /// predicts it for everything, so it cannot choose the epoch.
    pub only_label: bool,
    /// Its examples in the validation split that would have been.
    pub count: usize,
    /// The fewest wanted.
    pub min: usize,
    /// All examples, now trained on.
    pub total: usize,
}

impl SmallValidation {
    /// The note a job shows, naming the label.
    pub fn describe(&self, labels: &[String], epochs: usize) -> String {
        let name = labels
            .get(self.label)
            .map_or_else(|| self.label.to_string(), |l| format!("{l:?}"));
        if self.only_label {
            return format!(
                "validation skipped: every row to validate on has label {name} (a warm start validates on \
                 the rows newer than its parent's data), and macro-F1 over one label would favour an epoch \
                 that predicts it for everything; trained on all {} examples for {epochs} epochs and kept \
                 the last",
                self.total
            );
        }
        format!(
            "validation skipped: label {name} would have {} validation examples (min_val_per_label is {}); \
             trained on all {} examples for {epochs} epochs and kept the last",
            self.count, self.min, self.total
        )
    }
}

/// [`stratified_split_by`], unless some label present in `items` would get fewer than `min_per_label`
/// validation rows: then every row trains (validation macro-F1 on a handful of rows picks an epoch by
/// noise) and `skipped` says why. `min_per_label` 0 splits whenever the rows hold two labels or more.
pub fn validation_split<T>(
    items: Vec<T>,
    label_of: impl Fn(&T) -> usize,
    labels: usize,
    val_fraction: f64,
    min_per_label: usize,
    seed: u64,
) -> Split<T> {
    let mut present = vec![false; labels];
    for e in &items {
        if let Some(p) = present.get_mut(label_of(e)) {
            *p = true;
        }
    }
    let (train, val) = stratified_split_by(items, &label_of, labels, val_fraction, seed);
    let mut counts = vec![0usize; labels];
    for e in &val {
        counts[label_of(e)] += 1;
    }
    let mut present_labels = (0..labels).filter(|&l| present[l]);
    let only = match (present_labels.next(), present_labels.next()) {
        (Some(l), None) => Some(l),
        _ => None,
    };
    let short = only.or_else(|| (0..labels).find(|&l| present[l] && counts[l] < min_per_label));
    match short {
        None => Split {
            train,
            val,
            skipped: None,
        },
        Some(label) => {
            let mut all = train;
            all.extend(val);
            Rng::new(seed ^ 0xA11).shuffle(&mut all);
            Split {
                skipped: Some(SmallValidation {
                    label,
                    only_label: only.is_some(),
                    count: counts[label],
                    min: min_per_label,
                    total: all.len(),
                }),
                train: all,
                val: Vec::new(),
            }
        }
    }
}

/// Pads `batch` to its longest sequence: `(input_ids [b, l] u32, attention_mask [b, l] u8, labels [b] u32)`.
pub fn pad(batch: &[&Example], pad_id: u32, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let longest = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![pad_id; batch.len() * longest];
    let mut mask = vec![0u8; batch.len() * longest];
    for (i, e) in batch.iter().enumerate() {
        ids[i * longest..i * longest + e.ids.len()].copy_from_slice(&e.ids);
        mask[i * longest..i * longest + e.ids.len()]
            .iter_mut()
            .for_each(|m| *m = 1);
    }
    let labels: Vec<u32> = batch.iter().map(|e| e.label as u32).collect();
    Ok((
        Tensor::from_vec(ids, (batch.len(), longest), device)?,
        Tensor::from_vec(mask, (batch.len(), longest), device)?,
        Tensor::from_vec(labels, batch.len(), device)?,
    ))
}

pub use crate::model::tokenize::truncate;

/// For each key, the last item that has it, kept in the items' order; and how many items that left out.
pub fn last_per_key<T, K: Eq + std::hash::Hash>(
    items: Vec<T>,
    key: impl Fn(&T) -> K,
) -> (Vec<T>, usize) {
    let before = items.len();
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<T> = items
        .into_iter()
        .rev()
        .filter(|item| seen.insert(key(item)))
        .collect();
    kept.reverse();
    let left_out = before - kept.len();
    (kept, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize, label: usize) -> Vec<Example> {
        (0..n)
            .map(|i| Example {
                ids: vec![1, i as u32, 2],
                label,
            })
            .collect()
    }

    #[test]
    fn the_split_is_stratified_seeded_and_loses_nothing() {
        let all: Vec<Example> = examples(80, 0).into_iter().chain(examples(20, 1)).collect();
        let (train, val) = stratified_split(all.clone(), 2, 0.15, 7);
        assert_eq!(train.len() + val.len(), 100);
        assert_eq!(val.iter().filter(|e| e.label == 0).count(), 12);
        assert_eq!(val.iter().filter(|e| e.label == 1).count(), 3);
        assert_eq!(
            stratified_split(all, 2, 0.15, 7),
            (train, val),
            "same seed, same split"
        );
        // Half to validation: a label with one example keeps it to train on.
        let lone: Vec<Example> = examples(4, 0).into_iter().chain(examples(1, 1)).collect();
        let (train, val) = stratified_split(lone, 2, 0.5, 7);
        assert_eq!(train.iter().filter(|e| e.label == 1).count(), 1);
        assert_eq!(val.len(), 2);
    }

    #[test]
    fn a_validation_split_too_small_to_choose_an_epoch_by_is_skipped() {
        let names = ["ham".to_owned(), "spam".to_owned()];
        // 40 and 34 rows: round(0.15 × 34) = 5 validation rows of spam, enough.
        let enough: Vec<Example> = examples(40, 0).into_iter().chain(examples(34, 1)).collect();
        let split = validation_split(enough.clone(), |e| e.label, 2, 0.15, 5, 3);
        assert_eq!(split.skipped, None);
        assert_eq!(
            (split.train, split.val),
            stratified_split(enough, 2, 0.15, 3)
        );
        // 40 and 20: spam would validate on 3 rows; all 60 train.
        let small: Vec<Example> = examples(40, 0).into_iter().chain(examples(20, 1)).collect();
        let split = validation_split(small.clone(), |e| e.label, 2, 0.15, 5, 3);
        let skipped = split.skipped.expect("too small to validate");
        assert_eq!((skipped.label, skipped.count, skipped.total), (1, 3, 60));
        assert!(split.val.is_empty());
        let mut trained = split.train.clone();
        trained.sort_by_key(|e| (e.label, e.ids.clone()));
        let mut all = small.clone();
        all.sort_by_key(|e| (e.label, e.ids.clone()));
        assert_eq!(trained, all, "every row trains");
        assert!(skipped
            .describe(&names, 5)
            .contains("label \"spam\" would have 3"));
        // A label of the task with no rows at all does not stop validation; 0 turns the guard off.
        let split = validation_split(
            examples(40, 0).into_iter().chain(examples(40, 1)).collect(),
            |e| e.label,
            3,
            0.15,
            5,
            3,
        );
        assert_eq!(split.skipped, None);
        assert!(validation_split(small, |e| e.label, 2, 0.15, 0, 3)
            .skipped
            .is_none());
        // Rows of one label only (a warm start's corrections since its parent): never validated on, even
        // with the guard off.
        let one = validation_split(examples(60, 1), |e| e.label, 2, 0.15, 0, 3);
        let skipped = one.skipped.expect("one label cannot choose an epoch");
        assert!(skipped.only_label && one.val.is_empty() && one.train.len() == 60);
        assert!(skipped
            .describe(&names, 5)
            .contains("every row to validate on has label \"spam\""));
    }

    #[test]
    fn truncation_keeps_the_separator() {
        assert_eq!(truncate(vec![101, 5, 6, 7, 102], 4), vec![101, 5, 6, 102]);
        assert_eq!(truncate(vec![101, 102], 4), vec![101, 102]);
    }
}
