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
        val.extend(group.drain(..take));
        train.extend(group);
    }
    rng.shuffle(&mut train);
    (train, val)
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

/// Cuts `ids` to `max_length`, keeping its final token (`[SEP]`).
pub fn truncate(mut ids: Vec<u32>, max_length: usize) -> Vec<u32> {
    if ids.len() > max_length && max_length >= 2 {
        let last = ids[ids.len() - 1];
        ids.truncate(max_length - 1);
        ids.push(last);
    }
    ids
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
    }

    #[test]
    fn truncation_keeps_the_separator() {
        assert_eq!(truncate(vec![101, 5, 6, 7, 102], 4), vec![101, 5, 6, 102]);
        assert_eq!(truncate(vec![101, 102], 4), vec![101, 102]);
    }
}
