//! A generation's drift reference: what it was trained and validated on, stored beside its adapter as
//! `drift_reference.safetensors` so the drift monitor can compare live traffic with it from the first
//! predictions. Embeddings (the base model's, see `drift::embedder`) are kept in f16: the drift tests need
//! their direction, not their last bits.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// The file's name inside an adapter directory.
pub const REFERENCE_FILE: &str = "drift_reference.safetensors";

/// Most samples of either kind a reference may hold.
pub const MAX_SAMPLES: usize = 10_000;

/// The metadata that says which space the embeddings are in. Only the base model's is current: files of
/// Flywheel 0.x before it held the generation's own hidden states, which watched inputs are no longer
/// compared with, so those files are refused (the generation then falls back to a live reference).
const EMBEDDINGS_KEY: &str = "embeddings";
const EMBEDDINGS_SPACE: &str = "base-model-mean-pooled";

/// What a generation was trained and validated on.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftReference {
    /// The base model's L2-normalised mean-pooled hidden states of a seeded sample of the generation's
    /// training and validation inputs, as serving computes them for watched inputs.
    pub embeddings: Vec<Vec<f32>>,
    /// The label the generation predicts for each validation input.
    pub labels: Vec<usize>,
    /// Its top probability for each validation input.
    pub confidences: Vec<f32>,
}

/// Why a reference file could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("{REFERENCE_FILE}: {0}")]
pub struct ReferenceError(String);

fn bad(message: impl std::fmt::Display) -> ReferenceError {
    ReferenceError(message.to_string())
}

impl DriftReference {
    /// The file's bytes: `embeddings` F16 `[n, width]`, `labels` U32 `[m]`, `confidences` F32 `[m]`.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ReferenceError> {
        let width = self.embeddings.first().map_or(0, Vec::len);
        if self.embeddings.iter().any(|e| e.len() != width) {
            return Err(bad("embeddings of different widths"));
        }
        if self.labels.len() != self.confidences.len() {
            return Err(bad("as many labels as confidences are needed"));
        }
        let embeddings: Vec<u8> = self
            .embeddings
            .iter()
            .flatten()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let labels: Vec<u8> = self
            .labels
            .iter()
            .flat_map(|&l| u32::try_from(l).unwrap_or(u32::MAX).to_le_bytes())
            .collect();
        let confidences: Vec<u8> = self
            .confidences
            .iter()
            .flat_map(|c| c.to_le_bytes())
            .collect();
        let views = [
            (
                "embeddings",
                Dtype::F16,
                vec![self.embeddings.len(), width],
                &embeddings,
            ),
            ("labels", Dtype::U32, vec![self.labels.len()], &labels),
            (
                "confidences",
                Dtype::F32,
                vec![self.confidences.len()],
                &confidences,
            ),
        ]
        .into_iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(dtype, shape, data).map(|v| (name.to_owned(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
        let metadata = HashMap::from([
            ("format".to_owned(), "flywheel-drift-reference".to_owned()),
            (EMBEDDINGS_KEY.to_owned(), EMBEDDINGS_SPACE.to_owned()),
        ]);
        safetensors::serialize(views, Some(metadata)).map_err(bad)
    }

    /// Reads a reference for a model of `width`-wide hidden states and a task of `labels` labels.
    pub fn from_bytes(
        bytes: &[u8],
        width: usize,
        labels: usize,
    ) -> Result<DriftReference, ReferenceError> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(bad)?;
        let space = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(EMBEDDINGS_KEY));
        if space.map(String::as_str) != Some(EMBEDDINGS_SPACE) {
            return Err(bad(format!(
                "embeddings in space {space:?}, not the base model's ({EMBEDDINGS_SPACE}); \
                 retrain the generation to publish a current reference"
            )));
        }
        let file = SafeTensors::deserialize(bytes).map_err(bad)?;
        let tensor = |name: &str, dtype: Dtype, rank: usize| {
            let view = file.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
            if view.dtype() != dtype || view.shape().len() != rank {
                return Err(bad(format!(
                    "{name} must be {dtype:?} of rank {rank}, not {:?} {:?}",
                    view.dtype(),
                    view.shape()
                )));
            }
            if view.shape()[0] > MAX_SAMPLES {
                return Err(bad(format!("{name} holds over {MAX_SAMPLES} samples")));
            }
            Ok(view)
        };
        let e = tensor("embeddings", Dtype::F16, 2)?;
        if e.shape()[0] > 0 && e.shape()[1] != width {
            return Err(bad(format!(
                "embeddings are {} wide; the model's are {width}",
                e.shape()[1]
            )));
        }
        let embeddings = e
            .data()
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect::<Vec<f32>>()
            .chunks(width.max(1))
            .map(<[f32]>::to_vec)
            .collect();
        let l = tensor("labels", Dtype::U32, 1)?;
        let labels_read: Vec<usize> = l
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .collect();
        if let Some(&l) = labels_read.iter().find(|&&l| l >= labels) {
            return Err(bad(format!("label {l} is beyond the task's {labels}")));
        }
        let c = tensor("confidences", Dtype::F32, 1)?;
        let confidences: Vec<f32> = c
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if confidences.len() != labels_read.len() {
            return Err(bad("as many labels as confidences are needed"));
        }
        if confidences.iter().any(|c| !(0.0..=1.0).contains(c)) {
            return Err(bad("a confidence lies outside 0..=1"));
        }
        Ok(DriftReference {
            embeddings,
            labels: labels_read,
            confidences,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DriftReference {
        DriftReference {
            embeddings: vec![vec![0.6, -0.8, 0.0], vec![0.0, 1.0, 0.0]],
            labels: vec![1, 0, 1],
            confidences: vec![0.9, 0.55, 0.7],
        }
    }

    #[test]
    fn a_reference_round_trips_with_embeddings_in_f16() {
        let r = sample();
        let back = DriftReference::from_bytes(&r.to_bytes().unwrap(), 3, 2).unwrap();
        assert_eq!(back.labels, r.labels);
        assert_eq!(back.confidences, r.confidences);
        for (a, b) in back
            .embeddings
            .iter()
            .flatten()
            .zip(r.embeddings.iter().flatten())
        {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn a_reference_for_another_model_or_task_is_refused() {
        let bytes = sample().to_bytes().unwrap();
        let wider = DriftReference::from_bytes(&bytes, 4, 2).unwrap_err();
        assert!(wider.to_string().contains("wide"), "{wider}");
        let fewer = DriftReference::from_bytes(&bytes, 3, 1).unwrap_err();
        assert!(fewer.to_string().contains("label 1"), "{fewer}");
        assert!(DriftReference::from_bytes(b"not safetensors", 3, 2).is_err());
    }

    #[test]
    fn a_reference_of_the_generations_own_hidden_states_is_refused() {
        // What the first release wrote: no `embeddings` space in the metadata.
        let data = [0u8; 4];
        let view = TensorView::new(Dtype::F32, vec![1], &data).unwrap();
        let old = safetensors::serialize(
            [("confidences".to_owned(), view)],
            Some(HashMap::from([(
                "format".to_owned(),
                "flywheel-drift-reference".to_owned(),
            )])),
        )
        .unwrap();
        let refused = DriftReference::from_bytes(&old, 3, 2).unwrap_err();
        assert!(refused.to_string().contains("retrain"), "{refused}");
    }
}
