//! What serving asks of an encoder, whichever path runs it.
//!
//! [`Encoder`] is implemented by the fused CPU path ([`CpuEncoder`]) and by the candle path
//! ([`CandleEncoder`]: the oracle the CPU path is tested against, and the serving path on accelerators).
//! [`ServingModel`] is an encoder with what the serving layers need beside it: the tokenizer, the prompts
//! and the shape. The batcher, its calibration and the drift embedder take a `ServingModel`, so their
//! tests can give them an encoder of their own.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::adapter::Adapter;
use super::bert::Bert;
use super::cpu_encoder::{CpuEncoder, Packed};
use super::error::{ModelError, Result};
use super::prompts::Prompts;
use super::tokenize::TextTokenizer;
use super::{avx512, pooling};

/// A network that turns token ids into hidden states and, through adapters' heads, into logits.
pub trait Encoder: Send + Sync {
    /// Final hidden states of every token of `sequences`, packed, with `adapters[i]` applied to sequence
    /// `i` (`None`: the base model). `adapters` has one entry per sequence.
    fn encode(&self, sequences: &[&[u32]], adapters: &[Option<&Adapter>]) -> Result<Packed>;

    /// Class logits of each sequence of `packed` whose adapter has a head; `None` for the others.
    fn classify(
        &self,
        packed: &Packed,
        adapters: &[Option<&Adapter>],
    ) -> Result<Vec<Option<Vec<f32>>>>;

    /// The number format of the products: `float32` or `int8`.
    fn dtype(&self) -> &'static str;

    /// The kernels the products run on: `vnni`, `avx512`, `avx2` (the `gemm` crate) or `candle`.
    fn kernel(&self) -> &'static str;

    /// Whether adapters' deltas and heads run on this path.
    fn serves_adapters(&self) -> bool;
}

impl Encoder for CpuEncoder {
    fn encode(&self, sequences: &[&[u32]], adapters: &[Option<&Adapter>]) -> Result<Packed> {
        self.forward_adapted(sequences, adapters)
    }

    fn classify(
        &self,
        packed: &Packed,
        adapters: &[Option<&Adapter>],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        CpuEncoder::classify(self, packed, adapters)
    }

    fn dtype(&self) -> &'static str {
        if self.int8_targets().is_empty() {
            "float32"
        } else {
            "int8"
        }
    }

    fn kernel(&self) -> &'static str {
        if !self.int8_targets().is_empty() {
            "vnni"
        } else if avx512::available() {
            "avx512"
        } else {
            "avx2"
        }
    }

    fn serves_adapters(&self) -> bool {
        true
    }
}

/// The candle network on a padded batch: base model only, f32, on any device candle runs on.
#[derive(Debug, Clone)]
pub struct CandleEncoder {
    bert: Bert,
    device: Device,
}

impl CandleEncoder {
    /// Runs `bert`, whose weights live on `device`.
    pub fn new(bert: Bert, device: Device) -> Self {
        Self { bert, device }
    }

    /// Final hidden states of `sequences` (padded into one batch, then repacked).
    pub fn forward(&self, sequences: &[&[u32]]) -> Result<Packed> {
        let config = &self.bert.config;
        let width = config.hidden_size;
        let mut packed = Packed {
            hidden: Vec::new(),
            offsets: vec![0],
            width,
        };
        let longest = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        if sequences.is_empty() || longest == 0 {
            return Ok(packed);
        }
        let mut ids = vec![config.pad_token_id; sequences.len() * longest];
        let mut mask = vec![0u8; sequences.len() * longest];
        for (i, s) in sequences.iter().enumerate() {
            ids[i * longest..i * longest + s.len()].copy_from_slice(s);
            mask[i * longest..i * longest + s.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (sequences.len(), longest), &self.device)?;
        let mask = Tensor::from_vec(mask, (sequences.len(), longest), &self.device)?;
        let hidden = self
            .bert
            .forward(&ids, &mask)?
            .to_device(&Device::Cpu)?
            .to_vec3::<f32>()?;
        for (s, rows) in sequences.iter().zip(hidden) {
            for row in rows.into_iter().take(s.len()) {
                packed.hidden.extend_from_slice(&row);
            }
            packed
                .offsets
                .push(packed.offsets.last().copied().unwrap_or(0) + s.len());
        }
        Ok(packed)
    }
}

impl Encoder for CandleEncoder {
    fn encode(&self, sequences: &[&[u32]], adapters: &[Option<&Adapter>]) -> Result<Packed> {
        if adapters.iter().any(Option::is_some) {
            return Err(ModelError::Unsupported(
                "adapters are served on the CPU path only for now".to_owned(),
            ));
        }
        self.forward(sequences)
    }

    fn classify(
        &self,
        _packed: &Packed,
        _adapters: &[Option<&Adapter>],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        Err(ModelError::Unsupported(
            "classification heads run on the CPU path only for now".to_owned(),
        ))
    }

    fn dtype(&self) -> &'static str {
        "float32"
    }

    fn kernel(&self) -> &'static str {
        "candle"
    }

    fn serves_adapters(&self) -> bool {
        false
    }
}

/// A loaded model as the serving layers see it: an encoder with its tokenizer, prompts and shape.
#[derive(Clone)]
pub struct ServingModel {
    /// Reported as the `model` of responses.
    pub name: String,
    /// The tokenizer requests use, shared.
    pub tokenizer: Arc<TextTokenizer>,
    /// The model's named prompts.
    pub prompts: Arc<Prompts>,
    /// Width of the hidden states and embeddings.
    pub hidden_size: usize,
    /// Number of token ids the encoder accepts.
    pub vocab_size: usize,
    /// The network.
    pub encoder: Arc<dyn Encoder>,
}

impl std::fmt::Debug for ServingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingModel")
            .field("name", &self.name)
            .field("kernel", &self.encoder.kernel())
            .finish_non_exhaustive()
    }
}

impl ServingModel {
    /// Final hidden states of the base model.
    pub fn encode(&self, sequences: &[&[u32]]) -> Result<Packed> {
        self.encoder.encode(sequences, &vec![None; sequences.len()])
    }

    /// Sentence embeddings (mean pooling, optionally L2-normalised) of the base model.
    pub fn embed(&self, sequences: &[&[u32]], normalize: bool) -> Result<Vec<Vec<f32>>> {
        Ok(pooling::mean_pool(&self.encode(sequences)?, normalize))
    }
}
