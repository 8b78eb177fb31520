//! The drift reference a trained generation is published with: its validation split's predictions, and the
//! base model's embeddings of a seeded sample of its inputs, computed as serving computes them for watched
//! inputs (same tokenization length, same pooling; see `drift::embedder`), so that live traffic like the
//! training data compares as undrifted from the first window.

use crate::adapters::reference::{DriftReference, MAX_SAMPLES};
use crate::model::adapter::Adapter;
use crate::model::{pooling, CpuEncoder};
use crate::rng::Rng;

use super::train::TrainError;

/// Sequences per forward pass while computing the reference.
const CHUNK: usize = 32;

/// Vectors, one per sequence.
pub type Rows = Vec<Vec<f32>>;

/// Each sequence's L2-normalised mean-pooled hidden state under the base model (no adapter): what the
/// drift monitor compares inputs by.
pub fn base_embeddings(cpu: &CpuEncoder, sequences: &[&[u32]]) -> Result<Rows, TrainError> {
    let mut rows = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(CHUNK) {
        rows.extend(pooling::mean_pool(&cpu.forward(chunk)?, true));
    }
    Ok(rows)
}

/// Each sequence's class probabilities under `adapter`, as serving computes them.
pub fn probabilities(
    cpu: &CpuEncoder,
    adapter: &Adapter,
    sequences: &[&[u32]],
) -> Result<Rows, TrainError> {
    let mut probs = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(CHUNK) {
        let choice = vec![Some(adapter); chunk.len()];
        let packed = cpu.forward_adapted(chunk, &choice)?;
        for logits in cpu.classify(&packed, &choice)? {
            let logits = logits
                .ok_or_else(|| TrainError::Invalid("the adapter lost its head".to_owned()))?;
            probs.push(pooling::softmax(&logits));
        }
    }
    Ok(probs)
}

/// The reference of `adapter`: the predicted label and confidence of every validation input (a seeded sample
/// of [`MAX_SAMPLES`] of a larger split; none without a validation split, as the generation's predictions on
/// its own training inputs are more confident than on any traffic, so the monitor takes its first live
/// ones instead), and the base model's embeddings of up to `size` (at most [`MAX_SAMPLES`]) inputs — the validation inputs first, then a seeded
/// sample of the training inputs. Inputs are token ids as serving makes them.
pub fn drift_reference(
    cpu: &CpuEncoder,
    adapter: &Adapter,
    train: &[Vec<u32>],
    val: &[Vec<u32>],
    size: usize,
    seed: u64,
) -> Result<DriftReference, TrainError> {
    // The file holds at most MAX_SAMPLES of either kind: a seeded sample of a larger validation split.
    let size = size.min(MAX_SAMPLES);
    let mut order: Vec<usize> = (0..train.len()).collect();
    Rng::new(seed ^ 0xD21F7).shuffle(&mut order);
    let mut val_order: Vec<usize> = (0..val.len()).collect();
    Rng::new(seed ^ 0x7A1).shuffle(&mut val_order);
    val_order.truncate(MAX_SAMPLES);
    let judged: Vec<&[u32]> = val_order.iter().map(|&i| val[i].as_slice()).collect();
    let probs = probabilities(cpu, adapter, &judged)?;
    let mut embedded: Vec<&[u32]> = judged.into_iter().take(size).collect();
    embedded.extend(
        order
            .iter()
            .take(size.saturating_sub(embedded.len()))
            .map(|&i| train[i].as_slice()),
    );
    let embeddings = base_embeddings(cpu, &embedded)?;
    let (labels, confidences) = probs.iter().map(|p| pooling::best(p)).unzip();
    Ok(DriftReference {
        embeddings,
        labels,
        confidences,
    })
}
