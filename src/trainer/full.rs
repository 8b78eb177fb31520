//! Full fine-tuning, the comparison LoRA is measured against: every weight of the encoder (embeddings,
//! LayerNorms, pooler) and a fresh classification head train, and the result is a whole
//! `BertForSequenceClassification` checkpoint rather than an adapter. Partial fine-tuning freezes the
//! embeddings and the bottom layers; layer-wise learning-rate decay gives each layer a smaller step than the
//! one above it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::data::{pad, Example};
use crate::model::bert::{Bert, NoDelta};
use crate::model::linear::Linear;
use crate::model::{ModelError, Result};

/// A copy of the encoder whose weights are trainable variables, plus a classification head.
pub struct FullTrainable {
    bert: Bert,
    /// The weights that train, under their `BertModel` names.
    named: Vec<(String, Var)>,
    /// The weights partial fine-tuning keeps as the base has them (plain tensors: no gradient is computed).
    frozen: Vec<(String, Tensor)>,
    classifier_weight: Var,
    classifier_bias: Var,
    /// The format of the passes: the variables stay f32 (the master weights) and, under bf16 autocast, a
    /// differentiable bf16 copy of them runs each pass.
    compute: DType,
}

impl FullTrainable {
    /// Copies `base` into fresh variables (the base stays untouched) and adds a `labels`-way head
    /// initialised like [`super::lora::LoraTrainable::new`]'s, seeded.
    pub fn new(base: &Bert, labels: usize, seed: u64) -> Result<Self> {
        Self::partial(base, labels, seed, 0)
    }

    /// Like [`Self::new`], with the embeddings and the bottom `freeze_layers` encoder layers frozen (0:
    /// nothing frozen).
    pub fn partial(base: &Bert, labels: usize, seed: u64, freeze_layers: usize) -> Result<Self> {
        if freeze_layers > base.config.num_hidden_layers {
            return Err(ModelError::InvalidInput(format!(
                "freeze_layers {freeze_layers} is more than the model's {} layers",
                base.config.num_hidden_layers
            )));
        }
        if labels < 2 {
            return Err(ModelError::InvalidInput(
                "a classifier needs at least 2 labels".to_owned(),
            ));
        }
        let mut bert = base.clone();
        let h = bert.config.hidden_size;
        let device = base.device().clone();
        if bert.pooler.is_none() {
            // A checkpoint without a pooler (multilingual-e5-small's): a fresh one, initialised as
            // `BertForSequenceClassification` does (std 0.02, bias zero), trains with the rest.
            let weight = crate::rng::Rng::new(seed ^ 0x9001).uniform(h * h, 0.02 * 3f32.sqrt());
            bert.pooler = Some(Linear {
                weight: Tensor::from_vec(weight, (h, h), &device)?,
                bias: Some(Tensor::zeros(h, DType::F32, &device)?),
            });
        }
        let (mut named, mut frozen) = (Vec::new(), Vec::new());
        let layers = bert.config.num_hidden_layers;
        for (name, tensor) in bert.tensors_mut() {
            if freeze_layers > 0 && depth(&name, layers) <= freeze_layers {
                frozen.push((name, tensor.clone()));
                continue;
            }
            let var = Var::from_tensor(&tensor.copy()?)?;
            *tensor = var.as_tensor().clone();
            named.push((name, var));
        }
        let weight = crate::rng::Rng::new(seed ^ 0xC1A5).uniform(labels * h, 0.02 * 3f32.sqrt());
        Ok(Self {
            bert,
            named,
            frozen,
            classifier_weight: Var::from_tensor(&Tensor::from_vec(weight, (labels, h), &device)?)?,
            classifier_bias: Var::from_tensor(&Tensor::zeros(labels, DType::F32, &device)?)?,
            compute: DType::F32,
        })
    }

    /// Rebuilds the network from a [`Self::snapshot`] (to score or continue training it).
    pub fn from_weights(base: &Bert, weights: &HashMap<String, Tensor>) -> Result<Self> {
        let get = |name: &str| {
            weights
                .get(name)
                .ok_or_else(|| ModelError::Weights(format!("the checkpoint has no {name}")))
        };
        let mut bert = base.clone();
        if bert.pooler.is_none() {
            // The pooler a fine-tuning of a pooler-less base added (see `new`); its values come below.
            bert.pooler = Some(Linear {
                weight: get("bert.pooler.dense.weight")?.clone(),
                bias: Some(get("bert.pooler.dense.bias")?.clone()),
            });
        }
        let mut named = Vec::new();
        for (name, tensor) in bert.tensors_mut() {
            let var = Var::from_tensor(&get(&format!("bert.{name}"))?.copy()?)?;
            *tensor = var.as_tensor().clone();
            named.push((name, var));
        }
        Ok(Self {
            bert,
            named,
            frozen: Vec::new(),
            classifier_weight: Var::from_tensor(&get("classifier.weight")?.copy()?)?,
            classifier_bias: Var::from_tensor(&get("classifier.bias")?.copy()?)?,
            compute: DType::F32,
        })
    }

    /// Runs the passes in `dtype` (bf16 autocast) with the variables kept in f32.
    pub fn with_compute(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    /// Every trainable variable: the encoder's, then the head.
    pub fn vars(&self) -> Vec<Var> {
        let mut vars: Vec<Var> = self.named.iter().map(|(_, v)| v.clone()).collect();
        vars.push(self.classifier_weight.clone());
        vars.push(self.classifier_bias.clone());
        vars
    }

    /// The classifier's weight and bias.
    pub fn classifier(&self) -> [&Var; 2] {
        [&self.classifier_weight, &self.classifier_bias]
    }

    /// Each variable's share of the learning rate, in [`Self::vars`]' order, under layer-wise decay
    /// `decay`: 1 for the head and the pooler, `decay` for the top encoder layer, `decay²` for the one
    /// below, and so on down to the embeddings (`decay^(layers + 1)`).
    pub fn lr_scales(&self, decay: f64) -> Vec<f64> {
        let layers = self.bert.config.num_hidden_layers;
        let top = layers + 1;
        self.named
            .iter()
            .map(|(name, _)| decay.powi((top - depth(name, layers)) as i32))
            .chain([1.0, 1.0])
            .collect()
    }

    /// Class logits `[batch, labels]`: `[CLS]` through the pooler and tanh, then the classifier.
    pub fn logits(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        // Under autocast, a differentiable bf16 copy of the f32 variables runs the pass.
        let cast;
        let bert = if self.compute == self.bert.dtype() {
            &self.bert
        } else {
            cast = self.bert.to_dtype(self.compute)?;
            &cast
        };
        let hidden = bert.forward_first_with(input_ids, attention_mask, &NoDelta)?;
        super::lora::cls_head(
            bert,
            &hidden,
            None,
            &self.classifier_weight,
            &self.classifier_bias,
        )
    }

    /// Where the network runs.
    pub fn device(&self) -> &Device {
        self.bert.device()
    }

    /// Class probabilities of `examples` under the current weights, in padded chunks.
    pub fn predict(&self, examples: &[Example]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(examples.len());
        for chunk in examples.chunks(32) {
            let batch: Vec<&Example> = chunk.iter().collect();
            let (ids, mask, _) = pad(&batch, self.bert.config.pad_token_id, self.device())?;
            let logits = self.logits(&ids, &mask)?.detach();
            for row in logits.to_vec2::<f32>()? {
                out.push(crate::model::pooling::softmax(&row));
            }
        }
        Ok(out)
    }

    /// A detached copy of every weight under its `BertForSequenceClassification` name.
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, var) in &self.named {
            out.insert(format!("bert.{name}"), var.as_tensor().copy()?.detach());
        }
        for (name, tensor) in &self.frozen {
            out.insert(format!("bert.{name}"), tensor.clone());
        }
        out.insert(
            "classifier.weight".to_owned(),
            self.classifier_weight.as_tensor().copy()?.detach(),
        );
        out.insert(
            "classifier.bias".to_owned(),
            self.classifier_bias.as_tensor().copy()?.detach(),
        );
        Ok(out)
    }
}

/// Where a weight named as in `BertModel` sits in a network of `layers` layers: 0 for the embeddings,
/// `i + 1` for encoder layer `i`, `layers + 1` for the pooler.
fn depth(name: &str, layers: usize) -> usize {
    if name.starts_with("embeddings.") {
        return 0;
    }
    name.strip_prefix("encoder.layer.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .map_or(layers + 1, |i| i + 1)
}

/// Writes a `BertForSequenceClassification` checkpoint into `dir` (which must exist): `model.safetensors`
/// from `weights`, the base's `config.json` with the architecture and `id2label`/`label2id` of `labels`,
/// and the base's tokenizer files, so `AutoModelForSequenceClassification.from_pretrained(dir)` loads it.
pub fn write_checkpoint(
    dir: &Path,
    weights: &HashMap<String, Tensor>,
    labels: &[String],
    base_dir: &Path,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    candle_core::safetensors::save(weights, dir.join("model.safetensors"))?;
    let mut config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(base_dir.join("config.json"))?)?;
    config.insert(
        "architectures".to_owned(),
        serde_json::json!(["BertForSequenceClassification"]),
    );
    let id2label: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), serde_json::json!(l)))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), serde_json::json!(i)))
        .collect();
    config.insert("id2label".to_owned(), id2label.into());
    config.insert("label2id".to_owned(), label2id.into());
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ] {
        let from = base_dir.join(file);
        if from.is_file() {
            std::fs::copy(&from, dir.join(file))?;
        }
    }
    for file in std::fs::read_dir(dir)? {
        std::fs::File::open(file?.path())?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    use std::collections::HashMap;

    use super::FullTrainable;
    use crate::model::{tiny, Bert};
    use crate::trainer::lora::cross_entropy;

    fn batch() -> (Tensor, Tensor, Tensor) {
        let ids = Tensor::new(
            &[[1u32, 5, 9, 2], [1, 7, 2, 0], [1, 33, 44, 2]],
            &Device::Cpu,
        )
        .unwrap();
        let mask =
            Tensor::new(&[[1u8, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], &Device::Cpu).unwrap();
        (ids, mask, Tensor::new(&[0u32, 1, 0], &Device::Cpu).unwrap())
    }

    #[test]
    fn every_weight_gets_a_non_zero_gradient_and_the_base_is_untouched() {
        let bert = tiny::bert(5);
        let before = bert.layers[0].query.weight.to_vec2::<f32>().unwrap();
        let full = FullTrainable::new(&bert, 2, 1).unwrap();
        let (ids, mask, targets) = batch();
        let loss = cross_entropy(&full.logits(&ids, &mask).unwrap(), &targets, 0.1, None).unwrap();
        let grads = loss.backward().unwrap();
        let vars = full.vars();
        // Embeddings (3 + LayerNorm 2), 2 layers × (6 linears × 2 + 2 LayerNorms × 2), pooler 2, head 2.
        assert_eq!(vars.len(), 5 + 2 * 16 + 2 + 2);
        crate::trainer::lora_tests::assert_every_var_has_a_gradient(&vars, &grads);
        let mut opt = AdamW::new(vars, ParamsAdamW::default()).unwrap();
        opt.step(&grads).unwrap();
        assert_eq!(
            bert.layers[0].query.weight.to_vec2::<f32>().unwrap(),
            before
        );
    }

    /// bf16 autocast: the passes run on a bf16 copy, yet every f32 master weight gets an f32 gradient and
    /// the logits stay near the f32 ones.
    #[test]
    fn under_bf16_autocast_every_f32_weight_gets_a_gradient() {
        let bert = tiny::bert(5);
        let (ids, mask, targets) = batch();
        let exact = FullTrainable::new(&bert, 2, 1).unwrap();
        let half = FullTrainable::new(&bert, 2, 1)
            .unwrap()
            .with_compute(DType::BF16);
        let logits = half.logits(&ids, &mask).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let gap = tiny::max_abs_diff(&logits, &exact.logits(&ids, &mask).unwrap());
        assert!(gap < 0.05, "bf16 logits are {gap} from f32");
        let grads = cross_entropy(&logits, &targets, 0.1, None)
            .unwrap()
            .backward()
            .unwrap();
        let vars = half.vars();
        crate::trainer::lora_tests::assert_every_var_has_a_gradient(&vars, &grads);
        assert!(vars
            .iter()
            .all(|v| v.dtype() == DType::F32
                && grads.get(v.as_tensor()).unwrap().dtype() == DType::F32));
    }

    #[test]
    fn the_snapshot_uses_sequence_classification_names() {
        let full = FullTrainable::new(&tiny::bert(5), 3, 1).unwrap();
        let snap = full.snapshot().unwrap();
        assert!(snap.contains_key("bert.encoder.layer.1.attention.self.query.weight"));
        assert!(snap.contains_key("bert.pooler.dense.bias"));
        assert_eq!(
            snap["classifier.weight"].dims(),
            &[3, full.bert.config.hidden_size]
        );
        assert_eq!(snap.len(), full.vars().len());
        assert_rebuilds(&full, &full.bert, &snap);
    }

    #[test]
    fn partial_fine_tuning_leaves_the_frozen_layers_as_they_were_and_trains_the_rest() {
        let bert = tiny::bert(5);
        let full = FullTrainable::partial(&bert, 2, 1, 1).unwrap();
        let vars = full.vars();
        // Layer 1 (16), the pooler (2) and the head (2): the embeddings and layer 0 are frozen.
        assert_eq!(vars.len(), 16 + 2 + 2);
        let (ids, mask, targets) = batch();
        let mut opt = AdamW::new(vars.clone(), ParamsAdamW::default()).unwrap();
        for _ in 0..3 {
            let loss =
                cross_entropy(&full.logits(&ids, &mask).unwrap(), &targets, 0.1, None).unwrap();
            let grads = loss.backward().unwrap();
            crate::trainer::lora_tests::assert_every_var_has_a_gradient(&vars, &grads);
            opt.step(&grads).unwrap();
        }
        let snap = full.snapshot().unwrap();
        let base = FullTrainable::new(&bert, 2, 1).unwrap().snapshot().unwrap();
        assert_eq!(snap.len(), base.len(), "frozen weights are saved too");
        let same = |name: &str| tiny::max_abs_diff(&snap[name], &base[name]) == 0.0;
        assert!(same("bert.embeddings.word_embeddings.weight"));
        assert!(same("bert.encoder.layer.0.attention.self.query.weight"));
        assert!(same("bert.encoder.layer.0.output.LayerNorm.weight"));
        assert!(!same("bert.encoder.layer.1.attention.self.query.weight"));
        assert!(!same("bert.pooler.dense.weight"));
        assert_rebuilds(&full, &bert, &snap);
        assert!(
            FullTrainable::partial(&bert, 2, 1, 3).is_err(),
            "the tiny BERT has 2 layers"
        );
    }

    #[test]
    fn layer_wise_decay_gives_each_layer_its_share_of_the_learning_rate() {
        let full = FullTrainable::new(&tiny::bert(5), 2, 1).unwrap();
        let scales = full.lr_scales(0.5);
        assert_eq!(scales.len(), full.vars().len());
        let by_name: HashMap<&str, f64> = full
            .named
            .iter()
            .map(|(n, _)| n.as_str())
            .zip(scales.iter().copied())
            .collect();
        assert_eq!(by_name["embeddings.word_embeddings.weight"], 0.125);
        assert_eq!(by_name["encoder.layer.0.attention.self.query.weight"], 0.25);
        assert_eq!(by_name["encoder.layer.1.output.dense.bias"], 0.5);
        assert_eq!(by_name["pooler.dense.weight"], 1.0);
        assert_eq!(scales[scales.len() - 2..], [1.0, 1.0], "the head");
        assert!(full.lr_scales(1.0).iter().all(|&s| s == 1.0));
    }

    /// A network rebuilt on `base` from `snap` computes `full`'s logits.
    fn assert_rebuilds(full: &FullTrainable, base: &Bert, snap: &HashMap<String, Tensor>) {
        let rebuilt = FullTrainable::from_weights(base, snap).unwrap();
        let (ids, mask, _) = batch();
        let logits = |f: &FullTrainable| f.logits(&ids, &mask).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(logits(&rebuilt), logits(full));
    }

    /// A base checkpoint without a pooler (multilingual-e5-small's): full fine-tuning adds one, trains it
    /// with the rest and saves it, and a snapshot rebuilds on the pooler-less base.
    #[test]
    fn a_base_without_a_pooler_gets_a_fresh_one_that_trains_and_is_saved() {
        let mut base = tiny::bert(5);
        base.pooler = None;
        let full = FullTrainable::new(&base, 2, 1).unwrap();
        let (ids, mask, targets) = batch();
        let grads = cross_entropy(&full.logits(&ids, &mask).unwrap(), &targets, 0.1, None)
            .unwrap()
            .backward()
            .unwrap();
        let vars = full.vars();
        assert_eq!(
            vars.len(),
            5 + 2 * 16 + 2 + 2,
            "the pooler is among the variables"
        );
        crate::trainer::lora_tests::assert_every_var_has_a_gradient(&vars, &grads);
        let snap = full.snapshot().unwrap();
        assert!(snap.contains_key("bert.pooler.dense.weight"));
        assert_rebuilds(&full, &base, &snap);
    }
}
