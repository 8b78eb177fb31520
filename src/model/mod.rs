//! The pretrained encoder: Hugging Face directory loading, the BERT network (a differentiable candle
//! path and a fused CPU serving path), tokenization and pooling.
//!
//! Serving runs the [`Encoder`] trait: [`cpu_encoder`] (fused, packed, f32 or [`int8`]) on the CPU, the
//! candle network of [`bert`] elsewhere. [`adapter`] is LoRA deltas and heads as serving runs them.
//! [`train`] holds the CPU ops the trainable candle path is built from. [`kernels`] and `avx512` serve
//! both.
//!
//! This layer knows nothing of HTTP, queues or adapters' lifecycle.

pub mod adapter;
mod avx512;
pub mod bert;
pub mod calibration;
pub mod cpu_encoder;
pub mod encoder;
pub mod error;
pub mod hf_config;
pub mod int8;
pub mod kernels;
pub mod linear;
pub mod pooling;
pub mod prompts;
pub mod random;
pub mod st_modules;
pub mod tokenize;
pub mod train;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

pub use bert::Bert;
pub use cpu_encoder::{CpuEncoder, Packed};
pub use encoder::{CandleEncoder, Encoder, ServingModel};
pub use error::{ModelError, Result};
pub use hf_config::BertConfig;
pub use prompts::Prompts;
pub use tokenize::{TextTokenizer, Token};

/// Files a model directory must hold.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The weights file.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Truncation length in tokens, special tokens included.
    pub max_length: usize,
    /// Where the network runs.
    pub device: Device,
    /// The number format the CPU serving path runs its products in.
    pub precision: Precision,
    /// The projections quantised when serving in int8.
    pub int8_projections: Vec<adapter::Target>,
}

impl Default for LoadOptions {
    /// all-MiniLM-L6-v2's sentence-transformers length, the CPU, f32.
    fn default() -> Self {
        Self {
            max_length: 256,
            device: Device::Cpu,
            precision: Precision::F32,
            int8_projections: DEFAULT_INT8_PROJECTIONS.to_vec(),
        }
    }
}

/// The number format of the CPU serving path's products (`model.precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// The projections named by `int8_projections` in int8 on the CPU's VNNI units ([`int8`]); f32 where
    /// the CPU has no AVX512-VNNI (or `FLYWHEEL_INT8_KERNEL=off`).
    Int8,
    /// int8 where the CPU has AVX512-VNNI, f32 elsewhere.
    Auto,
}

/// The projections `int8` quantises unless configured otherwise: all six, which stay within cosine 0.999
/// (mean) and 0.995 (least) of f32 on the parity texts and real mail (docs/BENCHMARKS.md, "int8 serving").
/// `output` (after GELU) loses the most; leaving it out trades speed for closer answers.
pub const DEFAULT_INT8_PROJECTIONS: [adapter::Target; 6] = adapter::Target::ALL;

/// `cpu` with `targets` quantised to int8, smoothed against ranges measured on the calibration texts.
fn quantize(
    cpu: CpuEncoder,
    tokenizer: &TextTokenizer,
    targets: &[adapter::Target],
) -> Result<CpuEncoder> {
    let texts = calibration::sequences(|t| tokenizer.encode(t))?;
    let texts: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
    cpu.quantized(targets, &texts)
}

/// Parses a device name: `cpu`, `cuda` or `cuda:N` (both need a build with the `cuda` cargo feature), or
/// `auto`: the first GPU when the build has CUDA and the machine has one, else the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    match name.trim() {
        "cpu" => Ok(Device::Cpu),
        "auto" if candle_core::utils::cuda_is_available() => cuda(0),
        "auto" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(ordinal) => cuda(ordinal),
            None => Err(ModelError::Unsupported(format!(
                "unknown device {other:?}; use cpu, auto, cuda or cuda:N"
            ))),
        },
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(ModelError::Unsupported(format!(
            "device cuda:{ordinal} needs a build with the `cuda` cargo feature"
        )));
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// A loaded encoder: weights, tokenizer and the path that runs them.
pub struct Model {
    /// Directory name, reported as the `model` of responses.
    pub name: String,
    /// Directory the model came from.
    pub dir: PathBuf,
    /// The network's shape.
    pub config: BertConfig,
    /// Tokenizer with Flywheel's truncation, shared by every request (never copied).
    pub tokenizer: Arc<TextTokenizer>,
    /// Named prompts from `config_sentence_transformers.json` (none when the directory has no such file).
    pub prompts: Arc<Prompts>,
    /// The candle network, on the model's device: what training starts from.
    pub bert: Bert,
    /// The candle path: the reference, and the serving path off the CPU.
    candle: Arc<CandleEncoder>,
    /// The fused CPU serving path (present when the device is the CPU).
    cpu: Option<Arc<CpuEncoder>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads `config.json`, `tokenizer.json` and memory-mapped `model.safetensors` from `dir`.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let file = |name: &'static str| -> Result<PathBuf> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ModelError::MissingFile {
                    dir: dir.to_owned(),
                    file: name,
                })
            }
        };
        let config_path = file(CONFIG_FILE)?;
        let tokenizer_path = file(TOKENIZER_FILE)?;
        let weights_path = file(WEIGHTS_FILE)?;

        let bad = |path: &Path, reason: String| ModelError::BadFile {
            path: path.to_owned(),
            reason,
        };
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| bad(&config_path, e.to_string()))?;
        // The architecture first: a DistilBERT or GPT-2 config lacks BERT's fields, and "missing field
        // hidden_size" would not say why it cannot load.
        hf_config::check_architecture(&text).map_err(ModelError::Unsupported)?;
        let config: BertConfig =
            serde_json::from_str(&text).map_err(|e| bad(&config_path, e.to_string()))?;
        config.validate().map_err(ModelError::Unsupported)?;
        st_modules::check_pooling(dir)?;
        if options.max_length < 2 || options.max_length > config.max_position_embeddings {
            return Err(ModelError::Unsupported(format!(
                "max_length {} must be between 2 and the model's {} positions",
                options.max_length, config.max_position_embeddings
            )));
        }
        let tokenizer = TextTokenizer::from_file(&tokenizer_path, options.max_length)?;
        let prompts = Prompts::load(dir)?;

        // SAFETY: the weights file is mapped read-only and must not be modified while the server loads it;
        // tensors are copied out of the mapping before it is dropped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[&weights_path], DType::F32, &options.device)
        }
        .map_err(|e| bad(&weights_path, e.to_string()))?;
        let bert = Bert::load(vb, &config)?;
        let cpu = if options.device.is_cpu() {
            let cpu = CpuEncoder::from_bert(&bert)?;
            match options.precision {
                Precision::Int8 | Precision::Auto if int8::available() => {
                    Some(quantize(cpu, &tokenizer, &options.int8_projections)?)
                }
                Precision::Int8 => {
                    tracing::warn!(
                        "model.precision = \"int8\" needs AVX512-VNNI, which this CPU lacks (or \
                         FLYWHEEL_INT8_KERNEL=off): serving in f32"
                    );
                    Some(cpu)
                }
                Precision::F32 | Precision::Auto => Some(cpu),
            }
            .map(Arc::new)
        } else {
            None
        };
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            name,
            dir: dir.to_owned(),
            config,
            tokenizer: Arc::new(tokenizer),
            prompts: Arc::new(prompts),
            candle: Arc::new(CandleEncoder::new(bert.clone(), options.device.clone())),
            bert,
            cpu,
        })
    }

    /// The fused CPU encoder, when the model runs on the CPU.
    pub fn cpu(&self) -> Option<&CpuEncoder> {
        self.cpu.as_deref()
    }

    /// The path serving runs: the fused CPU encoder on the CPU, the candle network elsewhere.
    pub fn encoder(&self) -> Arc<dyn Encoder> {
        match &self.cpu {
            Some(cpu) => cpu.clone(),
            None => self.candle.clone(),
        }
    }

    /// The model as the serving layers see it.
    pub fn serving(&self) -> ServingModel {
        ServingModel {
            name: self.name.clone(),
            tokenizer: self.tokenizer.clone(),
            prompts: self.prompts.clone(),
            hidden_size: self.config.hidden_size,
            vocab_size: self.config.vocab_size,
            encoder: self.encoder(),
        }
    }

    /// A copy of the fused CPU encoder (f32 if the model serves in int8) with `targets` quantised to int8,
    /// calibrated as loading does; `None` off the CPU.
    pub fn int8_encoder(&self, targets: &[adapter::Target]) -> Result<Option<CpuEncoder>> {
        let Some(cpu) = &self.cpu else {
            return Ok(None);
        };
        let f32_copy = if cpu.int8_targets().is_empty() {
            CpuEncoder::clone(cpu)
        } else {
            CpuEncoder::from_bert(&self.bert)?
        };
        quantize(f32_copy, &self.tokenizer, targets).map(Some)
    }

    /// The number format serving runs in: `int8` where projections were quantised, else `float32`.
    pub fn serving_dtype(&self) -> &'static str {
        self.encoder().dtype()
    }

    /// The kernels the serving products run on (see [`Encoder::kernel`]).
    pub fn serving_kernel(&self) -> &'static str {
        self.encoder().kernel()
    }

    /// Sentence embeddings (mean pooling, optionally L2-normalised) of token sequences.
    pub fn embed(&self, sequences: &[&[u32]], normalize: bool) -> Result<Vec<Vec<f32>>> {
        let packed = self.encode(sequences)?;
        Ok(pooling::mean_pool(&packed, normalize))
    }

    /// Final hidden states of every token, packed: the fused CPU path on the CPU, the candle path elsewhere.
    pub fn encode(&self, sequences: &[&[u32]]) -> Result<Packed> {
        self.encode_adapted(sequences, &vec![None; sequences.len()])
    }

    /// Hidden states with `adapters[i]` applied to sequence `i`.
    pub fn encode_adapted(
        &self,
        sequences: &[&[u32]],
        adapters: &[Option<&adapter::Adapter>],
    ) -> Result<Packed> {
        self.encoder().encode(sequences, adapters)
    }

    /// Final hidden states computed by the candle path on a padded batch, repacked. The oracle the fused
    /// path is tested against, and the serving path on accelerators.
    pub fn encode_reference(&self, sequences: &[&[u32]]) -> Result<Packed> {
        self.candle.forward(sequences)
    }
}

#[cfg(test)]
impl Model {
    /// The tiny random BERT of [`tiny::bert`] as a loaded model on the CPU, with a tokenizer that knows
    /// `words` (ids from 4, see [`TextTokenizer::for_words`]).
    pub(crate) fn tiny(seed: u64, words: &[&str]) -> Self {
        let bert = tiny::bert(seed);
        let cpu = CpuEncoder::from_bert(&bert).expect("the tiny BERT packs");
        Self {
            name: "tiny".to_owned(),
            dir: PathBuf::from("tiny"),
            config: bert.config.clone(),
            tokenizer: Arc::new(TextTokenizer::for_words(words, 64)),
            prompts: Arc::default(),
            candle: Arc::new(CandleEncoder::new(bert.clone(), Device::Cpu)),
            bert,
            cpu: Some(Arc::new(cpu)),
        }
    }
}

#[cfg(test)]
mod adapter_tests;
#[cfg(test)]
pub mod fake;
#[cfg(test)]
pub mod tiny;

#[cfg(test)]
mod tests {
    use super::tiny::max_diff;
    use super::*;

    #[test]
    fn device_names_parse_and_cuda_needs_the_feature() {
        assert!(matches!(parse_device(" cpu "), Ok(Device::Cpu)));
        let unknown = parse_device("tpu").unwrap_err().to_string();
        assert!(unknown.contains("cpu, auto, cuda or cuda:N"), "{unknown}");
        if !candle_core::utils::cuda_is_available() {
            assert!(matches!(parse_device("auto"), Ok(Device::Cpu)));
            for name in ["cuda", "cuda:1"] {
                let e = parse_device(name).unwrap_err().to_string();
                assert!(e.contains("`cuda` cargo feature"), "{name}: {e}");
            }
        }
    }

    fn packed_reference(bert: &Bert, sequences: &[&[u32]]) -> Packed {
        CandleEncoder::new(bert.clone(), Device::Cpu)
            .forward(sequences)
            .unwrap()
    }

    #[test]
    fn fused_cpu_path_equals_the_candle_path_on_a_mixed_length_batch() {
        let bert = tiny::bert(7);
        let cpu = CpuEncoder::from_bert(&bert).unwrap();
        let seqs: Vec<Vec<u32>> = vec![
            vec![1, 5, 9, 2],
            vec![1, 2],
            vec![1, 33, 44, 55, 66, 77, 88, 2],
            vec![3],
        ];
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let fast = cpu.forward(&refs).unwrap();
        let slow = packed_reference(&bert, &refs);
        assert_eq!(fast.offsets, slow.offsets);
        assert!(max_diff(&fast.hidden, &slow.hidden) < 1e-5);
    }

    #[test]
    fn each_sequence_of_a_packed_batch_equals_the_sequence_alone() {
        let cpu = CpuEncoder::from_bert(&tiny::bert(3)).unwrap();
        let seqs: Vec<Vec<u32>> = vec![
            vec![1, 5, 9, 2],
            vec![1, 2],
            vec![1, 33, 44, 55, 66, 77, 88, 2],
        ];
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let batch = cpu.forward(&refs).unwrap();
        for (i, s) in refs.iter().enumerate() {
            let alone = cpu.forward(&[s]).unwrap();
            let d = max_diff(batch.sequence(i), alone.sequence(0));
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn checkpoints_load_with_or_without_the_bert_prefix() {
        let config = BertConfig::tiny();
        let plain = Bert::load(
            VarBuilder::from_tensors(tiny::tensors(&config, 11, ""), DType::F32, &Device::Cpu),
            &config,
        )
        .unwrap();
        let prefixed = Bert::load(
            VarBuilder::from_tensors(
                tiny::tensors(&config, 11, "bert."),
                DType::F32,
                &Device::Cpu,
            ),
            &config,
        )
        .unwrap();
        let seq: &[u32] = &[1, 2, 3];
        let a = CpuEncoder::from_bert(&plain)
            .unwrap()
            .forward(&[seq])
            .unwrap();
        let b = CpuEncoder::from_bert(&prefixed)
            .unwrap()
            .forward(&[seq])
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_checkpoint_of_another_architecture_is_refused_by_name() {
        let config = BertConfig::tiny();
        let vb = VarBuilder::from_tensors(
            tiny::tensors(&config, 1, "roberta."),
            DType::F32,
            &Device::Cpu,
        );
        let err = Bert::load(vb, &config).unwrap_err();
        assert!(
            err.to_string()
                .contains("embeddings.word_embeddings.weight"),
            "{err}"
        );
    }

    #[test]
    fn cls_pooler_equals_dense_tanh_of_the_first_token() {
        let bert = tiny::bert(5);
        let cpu = CpuEncoder::from_bert(&bert).unwrap();
        let seqs: [&[u32]; 2] = [&[1, 4, 2], &[1, 8, 9, 2]];
        let packed = cpu.forward(&seqs).unwrap();
        let pooled = cpu.pool_cls(&packed).unwrap();
        let pooler = bert.pooler.as_ref().unwrap();
        for (i, chunk) in pooled.chunks(32).enumerate() {
            let cls =
                candle_core::Tensor::from_slice(&packed.sequence(i)[..32], (1, 32), &Device::Cpu)
                    .unwrap();
            let want = candle_core::Module::forward(pooler, &cls)
                .unwrap()
                .tanh()
                .unwrap()
                .flatten_all()
                .unwrap();
            assert!(max_diff(chunk, &want.to_vec1::<f32>().unwrap()) < 1e-6);
        }
    }

    #[test]
    fn out_of_vocabulary_ids_and_empty_sequences_are_input_errors() {
        let cpu = CpuEncoder::from_bert(&tiny::bert(1)).unwrap();
        assert!(matches!(
            cpu.forward(&[&[1, 100_000]]),
            Err(ModelError::InvalidInput(_))
        ));
        assert!(matches!(
            cpu.forward(&[&[]]),
            Err(ModelError::InvalidInput(_))
        ));
    }
}
