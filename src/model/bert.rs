//! The BERT encoder on candle tensors: the device-generic, differentiable reference path.
//!
//! Tensor names mirror Hugging Face's `BertModel` exactly (`encoder.layer.N.attention.self.query`…), so a
//! checkpoint loads with or without the `bert.` prefix. Query, key and value are separate `Linear`s so
//! adapters can target each one.
//!
//! Past 500 lines as one concern: BERT's layers on candle tensors, each with its checkpoint names.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::adapter::Target;
use super::error::{ModelError, Result};
use super::hf_config::BertConfig;
use super::linear::{LayerNorm, Linear};
use super::train::encoder_layer::{self, LayerParts};
use super::train::lora_linear::{self, LowRank};
use super::train::ops;
use super::train::yielding::yield_here;

/// Word, position and token-type embeddings followed by LayerNorm.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// `[vocab, hidden]`.
    pub word: Tensor,
    /// `[max_positions, hidden]`.
    pub position: Tensor,
    /// `[type_vocab, hidden]`.
    pub token_type: Tensor,
    /// The embedding LayerNorm.
    pub norm: LayerNorm,
}

/// One transformer layer: self-attention and feed-forward, each with a residual LayerNorm.
#[derive(Debug, Clone)]
pub struct Layer {
    /// `attention.self.query`.
    pub query: Linear,
    /// `attention.self.key`.
    pub key: Linear,
    /// `attention.self.value`.
    pub value: Linear,
    /// `attention.output.dense`.
    pub attention_out: Linear,
    /// `attention.output.LayerNorm`.
    pub attention_norm: LayerNorm,
    /// `intermediate.dense`.
    pub intermediate: Linear,
    /// `output.dense`.
    pub output: Linear,
    /// `output.LayerNorm`.
    pub output_norm: LayerNorm,
}

/// A BERT encoder with its optional `[CLS]` pooler.
#[derive(Debug, Clone)]
pub struct Bert {
    /// The network's shape.
    pub config: BertConfig,
    /// Input embeddings.
    pub embeddings: Embeddings,
    /// The transformer stack.
    pub layers: Vec<Layer>,
    /// `pooler.dense` (followed by tanh), absent in checkpoints saved without it.
    pub pooler: Option<Linear>,
}

impl Bert {
    /// Loads the encoder from `vb`, accepting names with or without a leading `bert.`.
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        config.validate().map_err(ModelError::Unsupported)?;
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        if !vb.contains_tensor("embeddings.word_embeddings.weight") {
            return Err(ModelError::Weights(
                "no embeddings.word_embeddings.weight (with or without a bert. prefix): not a BERT checkpoint"
                    .to_owned(),
            ));
        }
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let e = vb.pp("embeddings");
        let embeddings = Embeddings {
            word: e.get((config.vocab_size, h), "word_embeddings.weight")?,
            position: e.get(
                (config.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            token_type: e.get((config.type_vocab_size, h), "token_type_embeddings.weight")?,
            norm: LayerNorm::load(e.pp("LayerNorm"), h, eps)?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp("encoder").pp("layer").pp(i);
                let a = l.pp("attention");
                Ok(Layer {
                    query: Linear::load(a.pp("self").pp("query"), h, h)?,
                    key: Linear::load(a.pp("self").pp("key"), h, h)?,
                    value: Linear::load(a.pp("self").pp("value"), h, h)?,
                    attention_out: Linear::load(a.pp("output").pp("dense"), h, h)?,
                    attention_norm: LayerNorm::load(a.pp("output").pp("LayerNorm"), h, eps)?,
                    intermediate: Linear::load(
                        l.pp("intermediate").pp("dense"),
                        h,
                        config.intermediate_size,
                    )?,
                    output: Linear::load(l.pp("output").pp("dense"), config.intermediate_size, h)?,
                    output_norm: LayerNorm::load(l.pp("output").pp("LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pooler = if vb.contains_tensor("pooler.dense.weight") {
            Some(Linear::load(vb.pp("pooler").pp("dense"), h, h)?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            embeddings,
            layers,
            pooler,
        })
    }

    /// Where the weights are.
    pub fn device(&self) -> &candle_core::Device {
        self.embeddings.word.device()
    }

    /// The weights' format.
    pub fn dtype(&self) -> DType {
        self.embeddings.word.dtype()
    }

    /// A copy of the network with every weight in `dtype` (shared, not copied, where it already is): the
    /// compute copy of bf16 training. The conversion is differentiable, so gradients reach the originals.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        self.map_weights(|t| t.to_dtype(dtype))
    }

    /// A copy of the network with every weight on `device` (shared, not copied, where it is already there).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        self.map_weights(|t| t.to_device(device))
    }

    /// A copy of the network with `f` applied to every weight.
    fn map_weights(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        let mut copy = self.clone();
        for (_, tensor) in copy.tensors_mut() {
            *tensor = f(tensor)?;
        }
        Ok(copy)
    }

    /// Every weight with its Hugging Face name (no `bert.` prefix), mutable: full fine-tuning swaps them for
    /// trainable variables and exports them under these names.
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        fn linear<'a>(out: &mut Vec<(String, &'a mut Tensor)>, name: String, l: &'a mut Linear) {
            out.push((format!("{name}.weight"), &mut l.weight));
            if let Some(b) = l.bias.as_mut() {
                out.push((format!("{name}.bias"), b));
            }
        }
        fn norm<'a>(out: &mut Vec<(String, &'a mut Tensor)>, name: String, n: &'a mut LayerNorm) {
            out.push((format!("{name}.weight"), &mut n.weight));
            out.push((format!("{name}.bias"), &mut n.bias));
        }
        let mut out = Vec::new();
        let e = &mut self.embeddings;
        out.push(("embeddings.word_embeddings.weight".to_owned(), &mut e.word));
        out.push((
            "embeddings.position_embeddings.weight".to_owned(),
            &mut e.position,
        ));
        out.push((
            "embeddings.token_type_embeddings.weight".to_owned(),
            &mut e.token_type,
        ));
        norm(&mut out, "embeddings.LayerNorm".to_owned(), &mut e.norm);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layer.{i}");
            linear(&mut out, format!("{p}.attention.self.query"), &mut l.query);
            linear(&mut out, format!("{p}.attention.self.key"), &mut l.key);
            linear(&mut out, format!("{p}.attention.self.value"), &mut l.value);
            linear(
                &mut out,
                format!("{p}.attention.output.dense"),
                &mut l.attention_out,
            );
            norm(
                &mut out,
                format!("{p}.attention.output.LayerNorm"),
                &mut l.attention_norm,
            );
            linear(
                &mut out,
                format!("{p}.intermediate.dense"),
                &mut l.intermediate,
            );
            linear(&mut out, format!("{p}.output.dense"), &mut l.output);
            norm(
                &mut out,
                format!("{p}.output.LayerNorm"),
                &mut l.output_norm,
            );
        }
        if let Some(p) = self.pooler.as_mut() {
            linear(&mut out, "pooler.dense".to_owned(), p);
        }
        out
    }

    /// Hidden states `[batch, seq, hidden]` for padded `input_ids` `[batch, seq]` (u32) and an
    /// `attention_mask` `[batch, seq]` (1 for tokens, 0 for padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.forward_with(input_ids, attention_mask, &NoDelta)
    }

    /// Like [`Self::forward`], adding `deltas.delta(layer, target, input)` to each linear's output where it
    /// returns one: the differentiable hook LoRA training uses.
    pub fn forward_with(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        deltas: &dyn Deltas,
    ) -> Result<Tensor> {
        self.encode(input_ids, attention_mask, deltas, Rows::All)
    }

    /// The first position's (`[CLS]`) final hidden state, `[batch, 1, hidden]`, as [`Self::forward_with`]
    /// computes it, for the classification head. The last layer's other rows feed nothing the head reads, so
    /// past its keys and values only the first row is computed: about an eighth of the encoder's work, in
    /// both passes.
    pub fn forward_first_with(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        deltas: &dyn Deltas,
    ) -> Result<Tensor> {
        self.encode(input_ids, attention_mask, deltas, Rows::First)
    }

    fn encode(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        deltas: &dyn Deltas,
        rows: Rows,
    ) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            return Err(ModelError::InvalidInput(format!(
                "sequence of {seq} tokens exceeds the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let e = &self.embeddings;
        let words = super::train::ops::embedding(&e.word, &input_ids.flatten_all()?)?.reshape((
            batch,
            seq,
            (),
        ))?;
        let positions = e.position.narrow(0, 0, seq)?.unsqueeze(0)?;
        let types = e.token_type.narrow(0, 0, 1)?.unsqueeze(0)?;
        let mut x = e
            .norm
            .forward(&words.broadcast_add(&positions)?.broadcast_add(&types)?)?;

        // Right padding on the CPU takes the fused attention op; anything else an additive mask
        // [batch, 1, 1, seq]: 0 where attended, a large negative where padded.
        let on_cpu = x.device().is_cpu() && x.dtype() == DType::F32;
        let lengths = if on_cpu {
            right_padded_lengths(attention_mask)?
        } else {
            None
        };
        let dtype = x.dtype();
        let additive_mask = || -> Result<Tensor> {
            let mask = attention_mask.to_dtype(dtype)?;
            Ok(((1.0 - mask)? * -1e9f64)?.reshape((batch, 1, 1, seq))?)
        };
        let padding = match lengths {
            Some(lengths) => Padding::Lengths(lengths),
            None => Padding::Mask(additive_mask()?),
        };
        // The last layer of a first-row pass has one query per sequence: the composed attention, whose
        // mask takes any shape.
        let last_padding = match (&padding, rows) {
            (Padding::Lengths(_), Rows::First) => Some(Padding::Mask(additive_mask()?)),
            _ => None,
        };
        let last = self.layers.len().saturating_sub(1);
        for (index, layer) in self.layers.iter().enumerate() {
            let (padding, rows) = if index == last {
                (last_padding.as_ref().unwrap_or(&padding), rows)
            } else {
                (&padding, Rows::All)
            };
            x = self.layer_forward(index, layer, &yield_here(&x)?, padding, deltas, rows)?;
        }
        if rows == Rows::First && self.layers.is_empty() {
            x = x.narrow(1, 0, 1)?;
        }
        Ok(x)
    }

    fn layer_forward(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        padding: &Padding,
        deltas: &dyn Deltas,
        rows: Rows,
    ) -> Result<Tensor> {
        if let (Padding::Lengths(lengths), Rows::All) = (padding, rows) {
            if let Some(out) = self.fused_layer(index, layer, x, lengths, deltas)? {
                return Ok(out);
            }
        }
        let dense = |linear: &Linear, target: Target, input: &Tensor| -> Result<Tensor> {
            if lora_linear::fusable(linear, input) {
                if let Some(delta) = deltas.low_rank(index, target)? {
                    return lora_linear::forward(linear, input, delta);
                }
            }
            let y = linear.forward(input)?;
            Ok(match deltas.delta(index, target, input)? {
                Some(d) => (y + d)?,
                None => y,
            })
        };
        let (batch, _, hidden) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.head_dim();
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            let rows = t.dim(1)?;
            t.reshape((batch, rows, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        // The rows whose outputs are wanted: the queries, and the residual stream past the attention.
        let kept = match rows {
            Rows::All => x.clone(),
            Rows::First => x.narrow(1, 0, 1)?.contiguous()?,
        };
        let projections = [
            (&layer.query, Target::Query),
            (&layer.key, Target::Key),
            (&layer.value, Target::Value),
        ];
        // Yield points between the blocks of ops, in both passes, when training shares the cores with
        // serving (free otherwise); the attention, softmax, GELU, LayerNorm and frozen linears yield inside.
        let ctx = match padding {
            Padding::Lengths(lengths) => {
                debug_assert!(rows == Rows::All, "encode gives a first-row layer a mask");
                // Where the CPU can fuse them with their deltas, `fused_layer` ran the whole layer.
                let [q, k, v] = projections.map(|(linear, target)| dense(linear, target, x));
                ops::attention(&Tensor::cat(&[&q?, &k?, &v?], 2)?, lengths, heads)?
            }
            Padding::Mask(mask) => {
                let q = dense(&layer.query, Target::Query, &kept)?;
                let k = dense(&layer.key, Target::Key, x)?;
                let v = dense(&layer.value, Target::Value, x)?;
                let queries = q.dim(1)?;
                let (q, k, v) = (split(q)?, split(k)?, split(v)?);
                let scores = yield_here(
                    &(q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?.broadcast_add(mask)?,
                )?;
                let probs = ops::softmax_last(&scores)?;
                yield_here(
                    &probs
                        .matmul(&v)?
                        .transpose(1, 2)?
                        .reshape((batch, queries, hidden))?,
                )?
            }
        };
        let x = &kept;
        let x = yield_here(
            &layer
                .attention_norm
                .forward(&(dense(&layer.attention_out, Target::AttentionOutput, &ctx)? + x)?)?,
        )?;
        let inner = ops::gelu_erf(&dense(&layer.intermediate, Target::Intermediate, &x)?)?;
        Ok(layer
            .output_norm
            .forward(&(dense(&layer.output, Target::Output, &inner)? + x)?)?)
    }

    /// The whole layer as one op ([`encoder_layer::forward`]) where the CPU can fuse it and something in it
    /// trains (a delta, or the input's gradient); `None` otherwise, or where `deltas` may have deltas that
    /// are not low-rank.
    fn fused_layer(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        lengths: &[usize],
        deltas: &dyn Deltas,
    ) -> Result<Option<Tensor>> {
        let linears = [
            &layer.query,
            &layer.key,
            &layer.value,
            &layer.attention_out,
            &layer.intermediate,
            &layer.output,
        ];
        let norms = [&layer.attention_norm, &layer.output_norm];
        if !(deltas.all_low_rank() && encoder_layer::fusable_layer(&linears, &norms, x)) {
            return Ok(None);
        }
        // In the order the separate path asks, so each delta draws the same dropout mask either way.
        let part = |linear, target| -> Result<encoder_layer::Part<'_>> {
            Ok((linear, deltas.low_rank(index, target)?))
        };
        let parts = LayerParts {
            qkv: [
                part(&layer.query, Target::Query)?,
                part(&layer.key, Target::Key)?,
                part(&layer.value, Target::Value)?,
            ],
            attention_out: part(&layer.attention_out, Target::AttentionOutput)?,
            attention_norm: &layer.attention_norm,
            intermediate: part(&layer.intermediate, Target::Intermediate)?,
            output: part(&layer.output, Target::Output)?,
            output_norm: &layer.output_norm,
        };
        let has_delta = parts
            .qkv
            .iter()
            .chain([&parts.attention_out, &parts.intermediate, &parts.output])
            .any(|(_, delta)| delta.is_some());
        // Nothing to train (the base model's own pass): the separate ops keep no activations.
        if !(has_delta || x.track_op()) {
            return Ok(None);
        }
        let heads = self.config.num_attention_heads;
        Ok(Some(encoder_layer::forward(parts, x, lengths, heads)?))
    }
}

/// Which rows of the last layer an encoder pass computes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// Every position's.
    All,
    /// The first position's only.
    First,
}

/// How a batch's padding reaches the attention.
enum Padding {
    /// Right padding: each sequence's real length (the fused attention op).
    Lengths(Vec<usize>),
    /// Any other mask, additive, `[batch, 1, 1, seq]`.
    Mask(Tensor),
}

/// Each row's count of ones when `attention_mask` `[batch, seq]` is ones followed by zeros in every row.
fn right_padded_lengths(attention_mask: &Tensor) -> Result<Option<Vec<usize>>> {
    let rows = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            let len = row.iter().take_while(|&&m| m == 1).count();
            row[len..].iter().all(|&m| m == 0).then_some(len)
        })
        .collect())
}

/// Supplies additive deltas for the encoder's linears on the candle path.
pub trait Deltas {
    /// The delta to add to the output of `target` in layer `layer` for input `x`, if any.
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>>;

    /// The same delta as low-rank factors, when it is one: where [`lora_linear::fusable`], the encoder then
    /// runs the linear and its delta as one op instead of adding [`Self::delta`]'s tensor. Like `delta`, each
    /// call may draw the next dropout mask, so the encoder calls one or the other per linear and pass.
    fn low_rank(&self, _layer: usize, _target: Target) -> Result<Option<LowRank>> {
        Ok(None)
    }

    /// Whether [`Self::low_rank`] gives every delta there is, so a linear it gives none for has none: the
    /// encoder may then join linears that share an input into one op.
    fn all_low_rank(&self) -> bool {
        false
    }
}

/// No deltas: the base model.
pub struct NoDelta;

impl Deltas for NoDelta {
    fn delta(&self, _: usize, _: Target, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn all_low_rank(&self) -> bool {
        true
    }
}

/// Mean of `hidden` `[batch, seq, h]` over the positions where `attention_mask` is 1.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9f64, f64::MAX)?;
    Ok(summed.broadcast_div(&counts)?)
}
