//! One whole encoder layer of LoRA training on the CPU as a single op: the joined query/key/value linears,
//! the attention over a right-padded batch, the attention output with its residual LayerNorm, the GELU
//! feed-forward with its residual LayerNorm, and the low-rank deltas on any of the linears.
//!
//! Composed of one op per stage, a layer is a dozen graph nodes, and candle's backward pass adds each node's
//! gradient into a freshly zeroed buffer: a memset and an addition per node and direction, on the calling
//! thread while the pool waits. Here the forward pass keeps the activations the backward pass needs, and the
//! backward pass runs the layer's chain rule on plain buffers, returning the input's gradient (none for the
//! first layer) and the factors' gradients. The arithmetic is that of the separate ops
//! ([`super::lora_linear`], [`super::ops`]), on the same kernels.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::model::error::{ModelError, Result};
use crate::model::kernels::{self, Padded};
use crate::model::linear::{f32_slice, LayerNorm, Linear};
use crate::model::train::lora_linear::{backward_over_factors, fusable, LoraGroup, LowRank};
use crate::pressure::yield_point;

/// A linear of the layer and its delta, if it has one.
pub type Part<'a> = (&'a Linear, Option<LowRank>);

/// The pieces of one encoder layer, as [`crate::model::bert::Layer`] holds them, with the deltas of this pass.
pub struct LayerParts<'a> {
    /// Query, key and value, in that order.
    pub qkv: [Part<'a>; 3],
    /// `attention.output.dense`.
    pub attention_out: Part<'a>,
    /// `attention.output.LayerNorm`.
    pub attention_norm: &'a LayerNorm,
    /// `intermediate.dense`.
    pub intermediate: Part<'a>,
    /// `output.dense`.
    pub output: Part<'a>,
    /// `output.LayerNorm`.
    pub output_norm: &'a LayerNorm,
}

/// Whether [`forward`] can run a layer of `linears` and `norms` on `x`: f32 input, frozen f32 weights on
/// the CPU.
pub fn fusable_layer(linears: &[&Linear], norms: &[&LayerNorm], x: &Tensor) -> bool {
    let frozen_f32 = |t: &Tensor| !t.track_op() && t.dtype() == DType::F32 && t.device().is_cpu();
    linears.iter().all(|l| fusable(l, x))
        && norms
            .iter()
            .all(|n| frozen_f32(&n.weight) && frozen_f32(&n.bias))
}

/// The layer's output `[batch, seq, hidden]` for hidden states `x` of a batch right-padded to `lengths`
/// (sequence `b` is its first `lengths[b]` positions), with `heads` attention heads, as one op. Every
/// linear and LayerNorm must be [`fusable_layer`] with `x`; the factors f32 on the CPU.
pub fn forward(
    parts: LayerParts<'_>,
    x: &Tensor,
    lengths: &[usize],
    heads: usize,
) -> Result<Tensor> {
    let (batch, seq, hidden) = x.dims3()?;
    if batch != lengths.len() || lengths.iter().any(|&l| l > seq) {
        return Err(ModelError::InvalidInput(format!(
            "{} lengths for a batch of {batch} × {seq}",
            lengths.len()
        )));
    }
    if heads == 0 || hidden % heads != 0 {
        return Err(ModelError::Unsupported(format!(
            "{hidden} hidden values do not split into {heads} heads"
        )));
    }
    let mut factors = Vec::new();
    let qkv = LoraGroup::new(parts.qkv.into(), &mut factors)?;
    let attention_out = LoraGroup::new(vec![parts.attention_out], &mut factors)?;
    let intermediate = LoraGroup::new(vec![parts.intermediate], &mut factors)?;
    let output = LoraGroup::new(vec![parts.output], &mut factors)?;
    let inner = intermediate.dims()?.0;
    let expected = [
        (qkv.dims()?, (3 * hidden, hidden)),
        (attention_out.dims()?, (hidden, hidden)),
        (intermediate.dims()?, (inner, hidden)),
        (output.dims()?, (hidden, inner)),
    ];
    if let Some((got, want)) = expected.iter().find(|(got, want)| got != want) {
        return Err(ModelError::InvalidInput(format!(
            "an encoder layer's linear is {got:?} where {want:?} fits a hidden width of {hidden}"
        )));
    }
    let packed = match factors.as_slice() {
        [] => Tensor::zeros(0, DType::F32, x.device())?,
        _ => Tensor::cat(&factors, 0)?,
    };
    let op = EncoderLayer {
        qkv,
        attention_out,
        attention_norm: Norm::new(parts.attention_norm, hidden)?,
        intermediate,
        output,
        output_norm: Norm::new(parts.output_norm, hidden)?,
        lengths: lengths.to_vec(),
        seq,
        heads,
        saved: Mutex::new(None),
    };
    Ok(x.contiguous()?.apply_op2(&packed, op)?)
}

/// A frozen LayerNorm's parameters.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn new(norm: &LayerNorm, hidden: usize) -> Result<Self> {
        let (gamma, beta) = (norm.weight.to_vec1::<f32>()?, norm.bias.to_vec1::<f32>()?);
        if gamma.len() != hidden || beta.len() != hidden {
            return Err(ModelError::InvalidInput(format!(
                "a LayerNorm of {} and {} values in a layer {hidden} wide",
                gamma.len(),
                beta.len()
            )));
        }
        Ok(Self {
            gamma,
            beta,
            eps: norm.eps as f32,
        })
    }

    /// `LayerNorm(pre)`, leaving `pre` as it is for the backward pass.
    fn apply(&self, pre: &[f32]) -> Vec<f32> {
        let mut out = pre.to_vec();
        kernels::add_layer_norm_inplace(&mut out, None, &self.gamma, &self.beta, self.eps);
        out
    }

    /// Turns `grad` from the output's gradient into that of the input `pre`.
    fn backward(&self, pre: &[f32], grad: &mut [f32]) {
        kernels::layer_norm_input_gradient(pre, &self.gamma, self.eps, grad);
    }
}

/// What the forward pass keeps for the backward pass; the inputs of linears without a delta are not kept.
struct Saved {
    /// Queries, keys and values side by side, `[rows × 3·hidden]`.
    qkv: Vec<f32>,
    /// The attention's output, the attention output linear's input.
    context: Option<Vec<f32>>,
    /// Attention output plus residual, before its LayerNorm.
    attention_sum: Vec<f32>,
    /// That LayerNorm's output, the intermediate linear's input.
    attended: Option<Vec<f32>>,
    /// GELU's derivative at the intermediate linear's output.
    gelu_derivative: Vec<f32>,
    /// After GELU, the output linear's input.
    activated: Option<Vec<f32>>,
    /// Output plus residual, before the last LayerNorm.
    output_sum: Vec<f32>,
}

/// The layer op: input `[batch, seq, hidden]`, second input the packed factors of all four groups.
struct EncoderLayer {
    qkv: LoraGroup,
    attention_out: LoraGroup,
    attention_norm: Norm,
    intermediate: LoraGroup,
    output: LoraGroup,
    output_norm: Norm,
    lengths: Vec<usize>,
    seq: usize,
    heads: usize,
    saved: Mutex<Option<Saved>>,
}

impl EncoderLayer {
    /// The attention kernels' view of the batch.
    fn padded(&self) -> candle_core::Result<Padded<'_>> {
        let hidden = self.attention_out.dims()?.0;
        Ok(Padded {
            seq: self.seq,
            heads: self.heads,
            head_dim: hidden / self.heads,
            lengths: &self.lengths,
        })
    }

    /// The layer's chain rule from the output's gradient `g`, with the activations the forward pass kept:
    /// the factors' gradients into `d_factors`, and the input's gradient returned when `input_gradient`
    /// asks for it.
    fn backward_pass(
        &self,
        saved: &Saved,
        g: &[f32],
        x_values: &[f32],
        packed: &[f32],
        input_gradient: bool,
        d_factors: &mut [f32],
    ) -> candle_core::Result<Option<Vec<f32>>> {
        let mut d = g.to_vec();
        let missing = || candle_core::Error::Msg("encoder-layer: a linear gave no gradient".into());

        // Output LayerNorm, then the output linear and GELU; the residual carries d_output_sum past
        // them.
        yield_point();
        self.output_norm.backward(&saved.output_sum, &mut d);
        let d_output_sum = d;
        let mut d_inner = self
            .output
            .backward(
                input_of(&saved.activated),
                &d_output_sum,
                packed,
                true,
                d_factors,
            )?
            .ok_or_else(missing)?;
        yield_point();
        kernels::mul_inplace(&mut d_inner, &saved.gelu_derivative);
        let mut d_attended = self
            .intermediate
            .backward(input_of(&saved.attended), &d_inner, packed, true, d_factors)?
            .ok_or_else(missing)?;
        drop(d_inner);
        add_into(&mut d_attended, &d_output_sum);
        // Attention LayerNorm, the attention output linear and the attention.
        yield_point();
        self.attention_norm
            .backward(&saved.attention_sum, &mut d_attended);
        let d_attention_sum = d_attended;
        let d_context = self
            .attention_out
            .backward(
                input_of(&saved.context),
                &d_attention_sum,
                packed,
                true,
                d_factors,
            )?
            .ok_or_else(missing)?;
        let mut d_qkv = vec![0f32; saved.qkv.len()];
        yield_point();
        kernels::attention_padded_backward(&self.padded()?, &saved.qkv, &d_context, &mut d_qkv);
        drop(d_context);
        let d_x = self
            .qkv
            .backward(x_values, &d_qkv, packed, input_gradient, d_factors)?
            .map(|mut d_x| {
                add_into(&mut d_x, &d_attention_sum);
                d_x
            });
        Ok(d_x)
    }
}

/// `into += from`, elementwise.
fn add_into(into: &mut [f32], from: &[f32]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// `keep` when the group has deltas (their factors' gradients read the input), otherwise nothing.
fn kept_for(group: &LoraGroup, keep: Vec<f32>) -> Option<Vec<f32>> {
    group.has_deltas().then_some(keep)
}

/// The input a group's backward pass reads: the kept one, or none for a group without deltas.
fn input_of(kept: &Option<Vec<f32>>) -> &[f32] {
    kept.as_deref().unwrap_or(&[])
}

impl CustomOp2 for EncoderLayer {
    fn name(&self) -> &'static str {
        "encoder-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "encoder-layer input")?;
        let packed = f32_slice(s2, l2, "encoder-layer factors")?;
        let qkv = self.qkv.forward(x, packed)?;
        let mut context = vec![0f32; x.len()];
        yield_point();
        kernels::attention_padded(&self.padded()?, &qkv, &mut context);
        let mut attention_sum = self.attention_out.forward(&context, packed)?;
        add_into(&mut attention_sum, x);
        yield_point();
        let attended = self.attention_norm.apply(&attention_sum);
        let mut activated = self.intermediate.forward(&attended, packed)?;
        let mut gelu_derivative = vec![0f32; activated.len()];
        yield_point();
        kernels::gelu_with_derivative(&mut activated, &mut gelu_derivative);
        let mut output_sum = self.output.forward(&activated, packed)?;
        add_into(&mut output_sum, &attended);
        yield_point();
        let out = self.output_norm.apply(&output_sum);
        let saved = Saved {
            qkv,
            context: kept_for(&self.attention_out, context),
            attention_sum,
            attended: kept_for(&self.intermediate, attended),
            gelu_derivative,
            activated: kept_for(&self.output, activated),
            output_sum,
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        factors: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Taken, not borrowed: the activations are freed as soon as this layer's gradients are computed.
        let saved = self
            .saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "encoder-layer: no activations kept (the forward pass did not run, or the backward \
                     pass ran twice)"
                        .to_owned(),
                )
            })?;
        backward_over_factors(
            "encoder-layer",
            (x, factors, grad),
            |g, x_values, packed, d_factors| {
                // Only an input that depends on a variable needs its gradient (the first layer's does not).
                self.backward_pass(&saved, g, x_values, packed, x.track_op(), d_factors)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Module, Tensor, Var};

    use super::{forward, LayerParts};
    use crate::model::adapter::Target;
    use crate::model::bert::Layer;
    use crate::model::tiny::{self, max_abs_diff, var, weighted_loss};
    use crate::model::train::lora_linear::{self, DropoutDraw, LowRank};
    use crate::model::train::ops;

    /// `layer`'s pieces with `delta(n)` on its linears, numbered query, key, value, attention output,
    /// intermediate, output.
    fn parts(layer: &Layer, delta: impl Fn(usize) -> Option<LowRank>) -> LayerParts<'_> {
        LayerParts {
            qkv: [
                (&layer.query, delta(0)),
                (&layer.key, delta(1)),
                (&layer.value, delta(2)),
            ],
            attention_out: (&layer.attention_out, delta(3)),
            attention_norm: &layer.attention_norm,
            intermediate: (&layer.intermediate, delta(4)),
            output: (&layer.output, delta(5)),
            output_norm: &layer.output_norm,
        }
    }

    /// The same layer composed of the separate ops: the joined query/key/value op, the attention op, one
    /// LoRA op per other linear with a delta (a frozen linear without), LayerNorm and GELU.
    fn separate(
        layer: &Layer,
        x: &Tensor,
        lengths: &[usize],
        heads: usize,
        delta: impl Fn(usize) -> Option<LowRank>,
    ) -> Tensor {
        let [query, key, value] = parts(layer, &delta).qkv;
        let qkv = lora_linear::forward_joined(vec![query, key, value], x).unwrap();
        let dense = |linear: &crate::model::linear::Linear, n: usize, input: &Tensor| match delta(n)
        {
            Some(d) => lora_linear::forward(linear, input, d).unwrap(),
            None => linear.forward(input).unwrap(),
        };
        let context = ops::attention(&qkv, lengths, heads).unwrap();
        let attended = layer
            .attention_norm
            .forward(&(dense(&layer.attention_out, 3, &context) + x).unwrap())
            .unwrap();
        let inner = ops::gelu_erf(&dense(&layer.intermediate, 4, &attended)).unwrap();
        layer
            .output_norm
            .forward(&(dense(&layer.output, 5, &inner) + attended).unwrap())
            .unwrap()
    }

    /// The layer op against the separate ops with deltas on all six linears and dropout on some: outputs,
    /// and the gradients of the input (where it trains) and of every factor.
    fn check(input_trains: bool) {
        let bert = tiny::bert(9);
        let layer = &bert.layers[0];
        let config = &bert.config;
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let targets = [
            (Target::Query, h, h),
            (Target::Key, h, h),
            (Target::Value, h, h),
            (Target::AttentionOutput, h, h),
            (Target::Intermediate, i, h),
            (Target::Output, h, i),
        ];
        let rank = 3;
        let factors: Vec<(Var, Var)> = targets
            .iter()
            .enumerate()
            .map(|(n, &(_, out, inp))| {
                let seed = 100 + 2 * n as u64;
                (
                    var(&[rank, inp], seed, 0.3),
                    var(&[out, rank], seed + 1, 0.3),
                )
            })
            .collect();
        // Dropout on every other linear; each pass draws the same masks from the same seeds.
        let delta = |n: usize| {
            Some(LowRank {
                a: factors[n].0.as_tensor().clone(),
                b: factors[n].1.as_tensor().clone(),
                scale: 2.0,
                dropout: n.is_multiple_of(2).then_some(DropoutDraw {
                    p: 0.2,
                    seed: 7 + n as u64,
                }),
            })
        };
        let lengths = [5usize, 3, 7];
        let x_var = var(&[3, 7, h], 1, 1.0);
        let x = if input_trains {
            x_var.as_tensor().clone()
        } else {
            x_var.as_tensor().detach()
        };
        let heads = config.num_attention_heads;
        let fused = forward(parts(layer, delta), &x, &lengths, heads).unwrap();
        let reference = separate(layer, &x, &lengths, heads, delta);
        assert_eq!(fused.dims(), &[3, 7, h]);
        let diff = max_abs_diff(&fused, &reference);
        assert!(diff < 1e-4, "outputs differ by {diff}");
        let weights = var(&[3, 7, h], 2, 1.0).as_tensor().detach();
        let (got, want) = (
            weighted_loss(&fused, &weights),
            weighted_loss(&reference, &weights),
        );
        for (n, (a, b)) in factors.iter().enumerate() {
            for (which, v) in [("A", a), ("B", b)] {
                let (g, w) = (
                    got.get(v.as_tensor()).unwrap(),
                    want.get(v.as_tensor()).unwrap(),
                );
                let diff = max_abs_diff(g, w);
                let target = targets[n].0;
                assert!(
                    diff < 1e-3,
                    "{which} of {target:?}: gradients differ by {diff}"
                );
                let norm = g.abs().unwrap().sum_all().unwrap();
                assert!(
                    norm.to_scalar::<f32>().unwrap() > 0.0,
                    "{which} of {target:?} gets no gradient"
                );
            }
        }
        if input_trains {
            let diff = max_abs_diff(got.get(&x).unwrap(), want.get(&x).unwrap());
            assert!(diff < 1e-3, "input gradients differ by {diff}");
        } else {
            assert!(got.get(&x).is_none(), "a constant input gets no gradient");
        }
    }

    #[test]
    fn the_layer_op_matches_the_separate_ops_in_output_and_gradients() {
        check(true);
        check(false);
    }

    #[test]
    fn without_deltas_the_layer_op_still_passes_the_input_gradient() {
        let bert = tiny::bert(9);
        let layer = &bert.layers[0];
        let x = var(&[2, 4, bert.config.hidden_size], 3, 1.0);
        let (lengths, heads) = ([4usize, 2], bert.config.num_attention_heads);
        let fused = forward(parts(layer, |_| None), x.as_tensor(), &lengths, heads).unwrap();
        let reference = separate(layer, x.as_tensor(), &lengths, heads, |_| None);
        assert!(max_abs_diff(&fused, &reference) < 1e-4, "outputs differ");
        let weights = var(fused.dims(), 4, 1.0).as_tensor().detach();
        let (got, want) = (
            weighted_loss(&fused, &weights),
            weighted_loss(&reference, &weights),
        );
        let diff = max_abs_diff(
            got.get(x.as_tensor()).unwrap(),
            want.get(x.as_tensor()).unwrap(),
        );
        assert!(diff < 1e-3, "input gradients differ by {diff}");
    }

    #[test]
    fn a_batch_that_does_not_fit_its_lengths_is_an_error_not_a_panic() {
        let bert = tiny::bert(9);
        let layer = &bert.layers[0];
        let x = var(&[2, 4, bert.config.hidden_size], 3, 1.0);
        let heads = bert.config.num_attention_heads;
        assert!(forward(parts(layer, |_| None), x.as_tensor(), &[4, 5], heads).is_err());
        assert!(forward(parts(layer, |_| None), x.as_tensor(), &[4], heads).is_err());
    }
}
