//! An encoder for tests of the layers above the model: answers that follow from the words of a text and
//! the adapter's head alone, a configurable time per token, and a count of the batches it ran.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::adapter::{Adapter, Dense, Head, Pooling, Target};
use super::cpu_encoder::Packed;
use super::encoder::Encoder;
use super::error::{ModelError, Result};
use super::hf_config::BertConfig;

/// Token `t`'s hidden state is the unit vector along dimension `t mod width`; a head's logits are its
/// classifier applied to the mean of a sequence's states, so a classifier row that weighs a word's
/// dimension votes for its label whenever the word appears.
#[derive(Debug)]
pub struct FakeEncoder {
    width: usize,
    per_token: Duration,
    batches: AtomicUsize,
}

impl FakeEncoder {
    /// An encoder of `width`-wide states that spends `per_token` on every token of a batch.
    pub fn new(width: usize, per_token: Duration) -> Self {
        Self {
            width,
            per_token,
            batches: AtomicUsize::new(0),
        }
    }

    /// Batches run so far.
    pub fn batches(&self) -> usize {
        self.batches.load(Ordering::Relaxed)
    }
}

impl Encoder for FakeEncoder {
    fn encode(&self, sequences: &[&[u32]], adapters: &[Option<&Adapter>]) -> Result<Packed> {
        if adapters.len() != sequences.len() || sequences.iter().any(|s| s.is_empty()) {
            return Err(ModelError::InvalidInput(
                "one adapter choice and at least one token per sequence".to_owned(),
            ));
        }
        let tokens: usize = sequences.iter().map(|s| s.len()).sum();
        std::thread::sleep(self.per_token * tokens as u32);
        self.batches.fetch_add(1, Ordering::Relaxed);
        let mut packed = Packed {
            hidden: Vec::new(),
            offsets: vec![0],
            width: self.width,
        };
        for s in sequences {
            for &t in *s {
                let mut row = vec![0.0; self.width];
                row[t as usize % self.width] = 1.0;
                packed.hidden.extend(row);
            }
            packed
                .offsets
                .push(packed.offsets.last().copied().unwrap_or(0) + s.len());
        }
        Ok(packed)
    }

    fn classify(
        &self,
        packed: &Packed,
        adapters: &[Option<&Adapter>],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        Ok(adapters
            .iter()
            .enumerate()
            .map(|(i, adapter)| {
                let head = adapter.and_then(|a| a.head.as_ref())?;
                let mean = super::pooling::mean_of_rows(packed.sequence(i), packed.width);
                Some(head.classifier.run(&mean, 1))
            })
            .collect())
    }

    fn dtype(&self) -> &'static str {
        "float32"
    }

    fn kernel(&self) -> &'static str {
        "fake"
    }

    fn serves_adapters(&self) -> bool {
        true
    }
}

/// An adapter for `config` whose head votes for label `k` when a text holds one of the token ids in
/// `votes[k]` (under [`FakeEncoder`]); its LoRA deltas are zero, seeded by `seed` so adapters differ.
pub fn voting_adapter(config: &BertConfig, seed: u64, votes: &[&[u32]]) -> Adapter {
    let mut adapter = super::tiny::adapter(config, seed, &[Target::Query, Target::Value], 2, true);
    let h = config.hidden_size;
    let mut weight = vec![0.0; votes.len() * h];
    for (label, ids) in votes.iter().enumerate() {
        for &id in *ids {
            weight[label * h + id as usize % h] = 50.0;
        }
    }
    adapter.head = Some(Head {
        pooling: Pooling::Cls,
        pooler: None,
        classifier: Dense {
            weight,
            bias: vec![0.0; votes.len()],
            in_features: h,
            out_features: votes.len(),
        },
    });
    adapter
}
