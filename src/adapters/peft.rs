//! Hugging Face PEFT's on-disk LoRA format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Reading is tolerant (unknown config keys ignored; tensor names with or without `.default.`, with or
//! without the `bert.` level, head weights under `modules_to_save` or not) and strict where silence would
//! be wrong (an unknown tensor, a DoRA or per-module alpha config, a shape that does not fit the model are
//! errors). Writing emits the `SEQ_CLS` layout of `BertForSequenceClassification` (or `FEATURE_EXTRACTION`
//! without a head) with only the config fields PEFT needs.
//!
//! Past 500 lines as one concern: PEFT's names, config and tensors, read and written by the same
//! tables.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::model::adapter::{Adapter, Dense, Head, LoraDelta, Pooling, Target};
use crate::model::BertConfig;

/// The adapter's configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Why an adapter could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A file is missing or unreadable.
    #[error("{file}: {reason}")]
    Io {
        /// The file.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// The adapter is not valid PEFT or does not fit the model.
    #[error("invalid adapter: {0}")]
    Invalid(String),
}

fn invalid(m: impl Into<String>) -> PeftError {
    PeftError::Invalid(m.into())
}

/// `target_modules`: PEFT accepts a list of module-name suffixes or one regex.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Suffixes such as `["query", "value"]`.
    List(Vec<String>),
    /// A regex matched against full module names.
    Regex(String),
}

/// The fields of `adapter_config.json` Flywheel reads; every other key is ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Must be `LORA`.
    #[serde(default = "lora")]
    pub peft_type: String,
    /// `SEQ_CLS`, `FEATURE_EXTRACTION`, or absent.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The rank.
    pub r: usize,
    /// The scaling numerator.
    pub lora_alpha: f64,
    /// Scale by `alpha/√r` instead of `alpha/r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Targeted modules.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules trained in full and saved whole (the classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Dropout used in training (no effect at inference).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Must be `none`.
    #[serde(default = "none")]
    pub bias: String,
    /// Must be false.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Must be false (DoRA is not supported).
    #[serde(default)]
    pub use_dora: bool,
    /// Must be empty.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    /// Must be empty.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    /// The base model the adapter was made for.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Informational.
    #[serde(default)]
    pub inference_mode: bool,
    /// Every other key: set, only an [`INERT`] one is accepted.
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Config keys of PEFT's LoRA that change nothing at inference once the factors are saved: bookkeeping,
/// which modules were targeted (the tensors present say that), and how the factors were initialised or
/// trained (`init_lora_weights` values that rewrite the base are refused on their own). Any other key that
/// is set is refused: PEFT adds variants often, and a factor applied as plain LoRA where it means something
/// else would serve wrong answers without a word.
const INERT: [&str; 17] = [
    "auto_mapping",
    "revision",
    "peft_version",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "ensure_weight_tying",
    "runtime_config",
    "init_lora_weights",
    "merge_weights",
];

/// Config keys of PEFT's LoRA that, when set, make the saved factors mean something else than
/// `W + scale·B·A` on the base model Flywheel serves, each with what it does: named in the refusal.
const CHANGES_THE_MATH: [(&str, &str); 11] = [
    (
        "layer_replication",
        "stacks copies of base layers, so the layer indices name other weights",
    ),
    (
        "alora_invocation_tokens",
        "applies the factors only after its invocation tokens (activated LoRA)",
    ),
    (
        "target_parameters",
        "adapts parameters rather than linear modules",
    ),
    (
        "use_qalora",
        "pools the input of each adapted linear (QA-LoRA)",
    ),
    ("lora_bias", "adds a bias to lora_B"),
    (
        "trainable_token_indices",
        "trains rows of the token embedding",
    ),
    ("use_bdlora", "uses block-diagonal factors (BD-LoRA)"),
    (
        "kasa_config",
        "rewrites the base weights through their SVD (KaSA)",
    ),
    ("arrow_config", "routes among several adapters (Arrow)"),
    ("monteclora_config", "samples the factors (MonteCLoRA)"),
    ("enable_lora", "adapts slices of a fused projection"),
];

/// `init_lora_weights` values that rewrite the base weights when the adapter is made: its factors fit only
/// that rewritten base (PEFT converts such an adapter to a plain one when saved with
/// `path_initial_model_for_weight_conversion`, and its config then says `true`).
const REWRITES_THE_BASE: [&str; 5] = ["pissa", "olora", "corda", "loftq", "lora_ga"];

/// Whether a config value is set: not null, false, zero, empty.
fn is_set(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(false) => false,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Bool(true) => true,
    }
}

fn lora() -> String {
    "LORA".to_owned()
}
fn none() -> String {
    "none".to_owned()
}

impl AdapterConfig {
    /// The config Flywheel writes for `adapter` (its targets, its head) with scaling numerator `lora_alpha`.
    pub fn for_adapter(adapter: &Adapter, lora_alpha: f64, base: &str) -> Self {
        let mut targets: Vec<Target> = adapter.deltas().map(|(_, t, _)| t).collect();
        targets.sort();
        targets.dedup();
        let r = adapter.deltas().map(|(_, _, d)| d.rank).max().unwrap_or(0);
        let target_modules = if targets
            .iter()
            .all(|t| matches!(t, Target::Query | Target::Key | Target::Value))
        {
            TargetModules::List(
                targets
                    .iter()
                    .map(|t| t.module_path().rsplit('.').next().unwrap_or("").to_owned())
                    .collect(),
            )
        } else {
            // "output.dense" is also a suffix of "attention.output.dense", so name modules exactly with a regex.
            let alternatives: Vec<String> = targets
                .iter()
                .map(|t| t.module_path().replace('.', r"\."))
                .collect();
            TargetModules::Regex(format!(
                r".*encoder\.layer\.\d+\.({})",
                alternatives.join("|")
            ))
        };
        let modules_to_save = adapter.head.as_ref().map(|h| {
            let mut m = vec!["classifier".to_owned()];
            if h.pooler.is_some() {
                m.push("pooler".to_owned());
            }
            m
        });
        Self {
            peft_type: lora(),
            task_type: Some(
                if adapter.head.is_some() {
                    "SEQ_CLS"
                } else {
                    "FEATURE_EXTRACTION"
                }
                .to_owned(),
            ),
            r,
            lora_alpha,
            use_rslora: false,
            target_modules: Some(target_modules),
            modules_to_save,
            lora_dropout: 0.0,
            bias: none(),
            fan_in_fan_out: false,
            use_dora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: Some(base.to_owned()),
            inference_mode: true,
            other: BTreeMap::new(),
        }
    }

    fn check(&self) -> Result<(), PeftError> {
        if self.peft_type != "LORA" {
            return Err(invalid(format!(
                "peft_type {:?} is not supported (only LORA)",
                self.peft_type
            )));
        }
        if self.use_dora || self.fan_in_fan_out || self.bias != "none" {
            return Err(invalid(
                "DoRA, fan_in_fan_out and LoRA biases are not supported",
            ));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(invalid(
                "per-module rank_pattern/alpha_pattern are not supported",
            ));
        }
        if let Some(task) = self.task_type.as_deref() {
            if task != "SEQ_CLS" && task != "FEATURE_EXTRACTION" {
                return Err(invalid(format!(
                    "task_type {task:?} is not supported (SEQ_CLS or FEATURE_EXTRACTION): its head, if any, \
                     is not a sentence classifier"
                )));
            }
        }
        for (key, value) in &self.other {
            if INERT.contains(&key.as_str()) || !is_set(value) {
                continue;
            }
            return Err(invalid(
                match CHANGES_THE_MATH.iter().find(|(k, _)| k == key) {
                    Some((_, what)) => format!("{key} is set (it {what}): not supported"),
                    None => format!(
                        "{key} is set, a PEFT setting Flywheel does not know: it may change what the \
                         factors mean, so the adapter is refused rather than applied as plain LoRA"
                    ),
                },
            ));
        }
        if let Some(init) = self.other.get("init_lora_weights").and_then(|v| v.as_str()) {
            let lower = init.to_ascii_lowercase();
            if REWRITES_THE_BASE.iter().any(|m| lower.starts_with(m)) {
                return Err(invalid(format!(
                    "init_lora_weights {init:?} rewrites the base weights, so these factors fit only the \
                     rewritten model; save the adapter with PEFT's path_initial_model_for_weight_conversion \
                     to get one that fits the original"
                )));
            }
        }
        if self.r == 0 || !self.lora_alpha.is_finite() {
            return Err(invalid("r must be ≥ 1 and lora_alpha finite"));
        }
        Ok(())
    }

    /// The scale of a delta of rank `r`.
    pub fn scale(&self, r: usize) -> f32 {
        let r = r as f64;
        (if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }) as f32
    }
}

/// A delta's `A`, `B` and rank, gathered tensor by tensor.
type Factors = (Option<Vec<f32>>, Option<Vec<f32>>, usize);
/// A dense layer's weight and bias with their shapes, gathered tensor by tensor.
type DenseParts = [Option<(Vec<f32>, Vec<usize>)>; 2];

/// What a tensor name refers to.
#[derive(Debug, PartialEq)]
enum Key {
    Lora {
        layer: usize,
        target: Target,
        b: bool,
    },
    Classifier {
        bias: bool,
    },
    Pooler {
        bias: bool,
    },
}

fn parse_key(name: &str) -> Option<Key> {
    let name = name.strip_prefix("base_model.model.").unwrap_or(name);
    let name = name.strip_prefix("bert.").unwrap_or(name);
    let parts: Vec<&str> = name
        .split('.')
        .filter(|p| *p != "default" && *p != "modules_to_save")
        .collect();
    let bias = match parts.last() {
        Some(&"weight") => false,
        Some(&"bias") => true,
        _ => return None,
    };
    match parts.as_slice() {
        ["classifier", _] => Some(Key::Classifier { bias }),
        ["pooler", "dense", _] => Some(Key::Pooler { bias }),
        ["encoder", "layer", n, rest @ .., factor, "weight"]
            if *factor == "lora_A" || *factor == "lora_B" =>
        {
            Some(Key::Lora {
                layer: n.parse().ok()?,
                target: Target::from_module_path(&rest.join("."))?,
                b: *factor == "lora_B",
            })
        }
        _ => None,
    }
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>, PeftError> {
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        other => {
            return Err(invalid(format!(
                "tensor dtype {other:?} is not supported (F32, F16, BF16)"
            )))
        }
    };
    let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
        .map_err(|e| invalid(e.to_string()))?;
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| invalid(e.to_string()))
}

/// Reads a PEFT adapter directory into an [`Adapter`] for a model of shape `model`. Heads pool as `pooling`
/// says (PEFT's `SEQ_CLS` means `[CLS]`; Flywheel's sidecar may say mean).
pub fn read(
    dir: &Path,
    model: &BertConfig,
    pooling: Pooling,
) -> Result<(AdapterConfig, Adapter), PeftError> {
    let read_file = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| PeftError::Io {
            file: name.to_owned(),
            reason: e.to_string(),
        })
    };
    let config_bytes = read_file(CONFIG_FILE)?;
    let weights = read_file(WEIGHTS_FILE)?;
    let config: AdapterConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| invalid(format!("{CONFIG_FILE}: {e}")))?;
    let adapter = decode(&config, &weights, model, pooling)?;
    Ok((config, adapter))
}

/// Decodes safetensors bytes under `config`.
pub fn decode(
    config: &AdapterConfig,
    weights: &[u8],
    model: &BertConfig,
    pooling: Pooling,
) -> Result<Adapter, PeftError> {
    config.check()?;
    let tensors =
        SafeTensors::deserialize(weights).map_err(|e| invalid(format!("{WEIGHTS_FILE}: {e}")))?;
    let mut factors: BTreeMap<(usize, Target), Factors> = BTreeMap::new();
    let (mut classifier, mut pooler): (DenseParts, DenseParts) = Default::default();
    // The names each tensor was found under, by what they mean: two spellings of one tensor (with and
    // without `.default`, say) would otherwise leave the choice to the file's order.
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (name, view) in tensors.tensors() {
        let key = parse_key(&name).ok_or_else(|| {
            if name.contains("pooler.dense.lora_") {
                // `target_modules="all-linear"` or `["dense"]` in PEFT adapts the pooler too.
                invalid(format!(
                    "unexpected tensor {name}: LoRA on the pooler is not supported; train with \
                     exclude_modules=[\"pooler.dense\"] (or list the encoder's modules in target_modules)"
                ))
            } else {
                invalid(format!("unexpected tensor {name}"))
            }
        })?;
        if let Some(other) = seen.insert(format!("{key:?}"), name.clone()) {
            return Err(invalid(format!("{name} and {other} are the same tensor")));
        }
        let values = to_f32(&view)?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(invalid(format!("{name} holds NaN or infinite values")));
        }
        let shape = view.shape().to_vec();
        match key {
            Key::Lora { layer, target, b } => {
                if layer >= model.num_hidden_layers {
                    return Err(invalid(format!(
                        "{name}: the model has {} layers",
                        model.num_hidden_layers
                    )));
                }
                let (in_f, out_f) = target.shape(model);
                let entry = factors.entry((layer, target)).or_default();
                let rank = match (b, shape.as_slice()) {
                    (false, [r, i]) if *i == in_f => *r,
                    (true, [o, r]) if *o == out_f => *r,
                    _ => {
                        return Err(invalid(format!(
                        "{name} has shape {shape:?}, which does not fit a {in_f}→{out_f} linear"
                    )))
                    }
                };
                if rank != config.r {
                    return Err(invalid(format!(
                        "{name} has rank {rank}, but adapter_config.json says r = {}",
                        config.r
                    )));
                }
                if entry.2 != 0 && entry.2 != rank {
                    return Err(invalid(format!(
                        "{name}: rank {rank} differs from its partner's {}",
                        entry.2
                    )));
                }
                entry.2 = rank;
                if b {
                    entry.1 = Some(values);
                } else {
                    entry.0 = Some(values);
                }
            }
            Key::Classifier { bias } => classifier[bias as usize] = Some((values, shape)),
            Key::Pooler { bias } => pooler[bias as usize] = Some((values, shape)),
        }
    }
    let mut adapter = Adapter::empty(model.num_hidden_layers);
    for ((layer, target), (a, b, rank)) in factors {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(invalid(format!(
                "layer {layer} {} has only one of lora_A and lora_B",
                target.module_path()
            )));
        };
        let delta = LoraDelta {
            a,
            b,
            rank,
            scale: config.scale(rank),
        };
        adapter
            .set(layer, target, delta)
            .map_err(|e| invalid(e.to_string()))?;
    }
    let dense = |parts: [Option<(Vec<f32>, Vec<usize>)>; 2],
                 what: &str|
     -> Result<Option<Dense>, PeftError> {
        match parts {
            [Some((weight, shape)), bias] if shape.len() == 2 => {
                // Checked before a missing bias is filled in: a zero-width weight holds no data, so its
                // row count alone could ask for any allocation.
                if shape[0] == 0
                    || shape[1] != model.hidden_size
                    || weight.len() != shape[0] * shape[1]
                {
                    return Err(invalid(format!(
                        "{what} weight has shape {shape:?}; it needs [out > 0, {}]",
                        model.hidden_size
                    )));
                }
                let bias = bias.map(|(b, _)| b).unwrap_or_else(|| vec![0.0; shape[0]]);
                Ok(Some(Dense {
                    weight,
                    bias,
                    in_features: shape[1],
                    out_features: shape[0],
                }))
            }
            [None, None] => Ok(None),
            _ => Err(invalid(format!("{what} weights are incomplete or not 2-D"))),
        }
    };
    let classifier = dense(classifier, "classifier")?;
    let pooler = dense(pooler, "pooler")?;
    adapter.head = match (classifier, pooler) {
        (Some(classifier), pooler) => Some(Head {
            pooling,
            pooler,
            classifier,
        }),
        (None, None) => None,
        (None, Some(_)) => return Err(invalid("a pooler without a classifier")),
    };
    if adapter
        .head
        .as_ref()
        .is_some_and(|h| h.pooling == Pooling::Mean && h.pooler.is_some())
    {
        return Err(invalid(
            "the head pools the mean of the tokens (flywheel.json), which uses no pooler, yet the adapter \
             holds pooler weights",
        ));
    };
    adapter
        .validate(model)
        .map_err(|e| invalid(e.to_string()))?;
    if adapter.deltas().next().is_none() && adapter.head.is_none() {
        return Err(invalid("the adapter holds no LoRA factors and no head"));
    }
    Ok(adapter)
}

/// Serialises `adapter` to safetensors bytes with PEFT's `SEQ_CLS` names (`FEATURE_EXTRACTION` names,
/// without the `bert.` level, when it has no head).
pub fn encode(adapter: &Adapter) -> Result<Vec<u8>, PeftError> {
    let prefix = if adapter.head.is_some() {
        "base_model.model.bert."
    } else {
        "base_model.model."
    };
    let mut named: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (layer, target, d) in adapter.deltas() {
        let base = format!("{prefix}encoder.layer.{layer}.{}", target.module_path());
        named.push((
            format!("{base}.lora_A.weight"),
            vec![d.rank, d.a.len() / d.rank],
            &d.a,
        ));
        named.push((
            format!("{base}.lora_B.weight"),
            vec![d.b.len() / d.rank, d.rank],
            &d.b,
        ));
    }
    if let Some(head) = &adapter.head {
        let c = &head.classifier;
        named.push((
            "base_model.model.classifier.weight".to_owned(),
            vec![c.out_features, c.in_features],
            &c.weight,
        ));
        named.push((
            "base_model.model.classifier.bias".to_owned(),
            vec![c.out_features],
            &c.bias,
        ));
        if let Some(p) = &head.pooler {
            named.push((
                format!("{prefix}pooler.dense.weight"),
                vec![p.out_features, p.in_features],
                &p.weight,
            ));
            named.push((
                format!("{prefix}pooler.dense.bias"),
                vec![p.out_features],
                &p.bias,
            ));
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .into_iter()
        .map(|(n, shape, v)| (n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    let metadata = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| invalid(e.to_string()))
}

/// Writes `adapter` as a PEFT directory into `dir` (created if needed): `adapter_config.json` for scaling
/// numerator `lora_alpha` and base model `base`, and `adapter_model.safetensors`, each fsynced.
pub fn write_dir(
    dir: &Path,
    adapter: &Adapter,
    lora_alpha: f64,
    base: &str,
) -> Result<(), PeftError> {
    let io = |file: &str, e: std::io::Error| PeftError::Io {
        file: file.to_owned(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(&dir.display().to_string(), e))?;
    let config = config_json(&AdapterConfig::for_adapter(adapter, lora_alpha, base))?;
    for (file, bytes) in [
        (CONFIG_FILE, config.into_bytes()),
        (WEIGHTS_FILE, encode(adapter)?),
    ] {
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(dir.join(file))?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()
        };
        write().map_err(|e| io(file, e))?;
    }
    Ok(())
}

/// The `adapter_config.json` text Flywheel writes.
pub fn config_json(config: &AdapterConfig) -> Result<String, PeftError> {
    serde_json::to_string_pretty(config).map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny;

    #[test]
    fn tensor_names_parse_with_or_without_default_bert_and_modules_to_save() {
        for name in [
            "base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.weight",
            "base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.default.weight",
            "base_model.model.encoder.layer.3.attention.self.query.lora_A.weight",
        ] {
            assert_eq!(
                parse_key(name),
                Some(Key::Lora {
                    layer: 3,
                    target: Target::Query,
                    b: false
                }),
                "{name}"
            );
        }
        assert_eq!(
            parse_key("base_model.model.bert.encoder.layer.0.output.dense.lora_B.weight"),
            Some(Key::Lora {
                layer: 0,
                target: Target::Output,
                b: true
            })
        );
        assert_eq!(
            parse_key("base_model.model.bert.encoder.layer.0.attention.output.dense.lora_B.weight"),
            Some(Key::Lora {
                layer: 0,
                target: Target::AttentionOutput,
                b: true
            })
        );
        assert_eq!(
            parse_key("base_model.model.classifier.modules_to_save.default.bias"),
            Some(Key::Classifier { bias: true })
        );
        assert_eq!(
            parse_key("base_model.model.classifier.weight"),
            Some(Key::Classifier { bias: false })
        );
        assert_eq!(
            parse_key("base_model.model.bert.embeddings.word_embeddings.lora_embedding_A"),
            None
        );
    }

    #[test]
    fn an_adapter_round_trips_through_peft_bytes() {
        let config = BertConfig::tiny();
        for targets in [&[Target::Query, Target::Value][..], &Target::ALL[..]] {
            let adapter = tiny::adapter(&config, 5, targets, 4, false);
            let peft = AdapterConfig::for_adapter(&adapter, 8.0, "tiny");
            let bytes = encode(&adapter).unwrap();
            let json = config_json(&peft).unwrap();
            let back: AdapterConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(back, peft);
            let decoded = decode(&back, &bytes, &config, Pooling::Cls).unwrap();
            // Scales are recomputed from alpha and rank: 8 / 4 = 2, as the tiny adapter uses.
            assert_eq!(decoded, adapter);
        }
    }

    #[test]
    fn a_zero_width_head_weight_is_refused_before_anything_is_sized_from_it() {
        // Found by fuzz/fuzz_targets/adapter_loader.rs: a [2^62, 0] tensor holds no bytes, so safetensors
        // accepts it, and filling in the missing bias from its row count used to panic or abort.
        let config = BertConfig::tiny();
        let peft: AdapterConfig = serde_json::from_str(r#"{"r": 1, "lora_alpha": 1.0}"#).unwrap();
        for name in [
            "base_model.model.classifier.weight",
            "base_model.model.bert.pooler.dense.weight",
        ] {
            let header = format!(
                r#"{{"{name}":{{"dtype":"F32","shape":[{},0],"data_offsets":[0,0]}}}}"#,
                1u64 << 62
            );
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            let err = decode(&peft, &bytes, &config, Pooling::Cls).unwrap_err();
            assert!(err.to_string().contains("shape"), "{name}: {err}");
        }
    }

    #[test]
    fn rslora_scales_by_alpha_over_the_square_root_of_r() {
        let config = BertConfig::tiny();
        let adapter = tiny::adapter(&config, 5, &[Target::Query], 4, false);
        let peft = AdapterConfig {
            use_rslora: true,
            ..AdapterConfig::for_adapter(&adapter, 8.0, "tiny")
        };
        let decoded = decode(&peft, &encode(&adapter).unwrap(), &config, Pooling::Cls).unwrap();
        assert_eq!(
            decoded.delta(0, Target::Query).unwrap().scale,
            4.0,
            "8 / √4"
        );
        assert_eq!(
            AdapterConfig {
                use_rslora: false,
                ..peft
            }
            .scale(4),
            2.0,
            "8 / 4"
        );
    }

    #[test]
    fn corrupt_truncated_or_misshapen_adapters_are_refused() {
        let config = BertConfig::tiny();
        let adapter = tiny::adapter(&config, 5, &[Target::Query], 4, false);
        let peft = AdapterConfig::for_adapter(&adapter, 8.0, "tiny");
        let bytes = encode(&adapter).unwrap();
        assert!(decode(&peft, &bytes[..bytes.len() / 2], &config, Pooling::Cls).is_err());
        assert!(decode(&peft, b"not safetensors", &config, Pooling::Cls).is_err());
        let mut bigger = BertConfig::tiny();
        bigger.hidden_size = 64;
        bigger.num_attention_heads = 4;
        let err = decode(&peft, &bytes, &bigger, Pooling::Cls).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let dora = AdapterConfig {
            use_dora: true,
            ..peft.clone()
        };
        assert!(decode(&dora, &bytes, &config, Pooling::Cls).is_err());
    }

    #[test]
    fn config_settings_that_change_the_factors_meaning_are_refused_not_ignored() {
        let config = BertConfig::tiny();
        let adapter = tiny::adapter(&config, 5, &[Target::Query], 4, false);
        let bytes = encode(&adapter).unwrap();
        let with = |extra: &str| -> AdapterConfig {
            let mut json: serde_json::Value = serde_json::from_str(
                &config_json(&AdapterConfig::for_adapter(&adapter, 8.0, "tiny")).unwrap(),
            )
            .unwrap();
            let extra: serde_json::Value = serde_json::from_str(extra).unwrap();
            for (k, v) in extra.as_object().unwrap() {
                json[k] = v.clone();
            }
            serde_json::from_value(json).unwrap()
        };
        for refused in [
            r#"{"init_lora_weights": "pissa_niter_4"}"#,
            r#"{"init_lora_weights": "olora"}"#,
            r#"{"init_lora_weights": "loftq"}"#,
            r#"{"layer_replication": [[0, 1], [0, 1]]}"#,
            r#"{"alora_invocation_tokens": [5, 6]}"#,
            r#"{"lora_bias": true}"#,
            r#"{"task_type": "TOKEN_CLS"}"#,
            r#"{"use_bdlora": {"lora_a_is_blockdiagonal": true}}"#,
            r#"{"kasa_config": {"rank": 8}}"#,
            // A setting from a later PEFT than any Flywheel knows.
            r#"{"use_hypothetical_lora": true}"#,
        ] {
            let err = decode(&with(refused), &bytes, &config, Pooling::Cls).unwrap_err();
            assert!(
                err.to_string().contains("not supported")
                    || err.to_string().contains("rewrites")
                    || err.to_string().contains("does not know"),
                "{refused}: {err}"
            );
        }
        // What PEFT writes by default, or a converted PiSSA adapter, changes nothing at inference.
        for accepted in [
            r#"{"init_lora_weights": true}"#,
            r#"{"init_lora_weights": "gaussian"}"#,
            r#"{"layer_replication": null, "lora_bias": false, "target_parameters": null}"#,
            r#"{"task_type": null, "exclude_modules": ["classifier"], "peft_version": "0.21.2"}"#,
            r#"{"megatron_core": "megatron.core", "qalora_group_size": 16, "use_bdlora": null}"#,
        ] {
            assert_eq!(
                decode(&with(accepted), &bytes, &config, Pooling::Cls).unwrap(),
                adapter,
                "{accepted}"
            );
        }
    }

    #[test]
    fn non_finite_values_and_a_tensor_given_twice_are_refused() {
        let config = BertConfig::tiny();
        let mut adapter = tiny::adapter(&config, 5, &[Target::Query], 4, false);
        let peft = AdapterConfig::for_adapter(&adapter, 8.0, "tiny");
        let bytes = encode(&adapter).unwrap();
        // The same lora_A under PEFT's two spellings: which one counted depended on the file's order.
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let mut views = tensors.tensors();
        let (name, view) = views
            .iter()
            .find(|(n, _)| n.ends_with("lora_A.weight"))
            .cloned()
            .unwrap();
        views.push((name.replace("lora_A.", "lora_A.default."), view.clone()));
        let twice = safetensors::tensor::serialize(views, None).unwrap();
        let err = decode(&peft, &twice, &config, Pooling::Cls).unwrap_err();
        assert!(err.to_string().contains("same tensor"), "{err}");
        // LoRA on the pooler, as PEFT's "all-linear" makes it: refused, saying how to train without it.
        let mut views = tensors.tensors();
        views.push((
            "base_model.model.bert.pooler.dense.lora_A.weight".to_owned(),
            view,
        ));
        let pooled = safetensors::tensor::serialize(views, None).unwrap();
        let err = decode(&peft, &pooled, &config, Pooling::Cls).unwrap_err();
        assert!(err.to_string().contains("exclude_modules"), "{err}");

        let mut delta = adapter.delta(1, Target::Query).unwrap().clone();
        delta.b[3] = f32::NAN;
        adapter.set(1, Target::Query, delta).unwrap();
        let err = decode(&peft, &encode(&adapter).unwrap(), &config, Pooling::Cls).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
    }

    #[test]
    fn a_mean_pooled_head_with_pooler_weights_is_refused() {
        let config = BertConfig::tiny();
        let mut adapter = tiny::adapter(&config, 5, &[Target::Query], 4, false);
        let head = adapter.head.as_mut().unwrap();
        head.pooler = Some(head.classifier.clone());
        head.pooler.as_mut().unwrap().out_features = head.classifier.in_features;
        let width = config.hidden_size;
        head.pooler.as_mut().unwrap().weight = vec![0.0; width * width];
        head.pooler.as_mut().unwrap().bias = vec![0.0; width];
        let peft = AdapterConfig::for_adapter(&adapter, 8.0, "tiny");
        let bytes = encode(&adapter).unwrap();
        assert!(decode(&peft, &bytes, &config, Pooling::Cls).is_ok());
        let err = decode(&peft, &bytes, &config, Pooling::Mean).unwrap_err();
        assert!(err.to_string().contains("pooler"), "{err}");
    }
}
