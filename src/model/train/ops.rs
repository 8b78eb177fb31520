//! GELU, the attention softmax and LayerNorm for the trainable candle path, as single ops with hand-written
//! backward passes on the vectorised kernels. Candle's own `gelu_erf` backward runs a scalar erf, and a
//! softmax or LayerNorm composed of differentiable ops (the fused ones have no backward) costs five to ten
//! elementwise passes, each a fresh allocation, in each direction; they were also long stretches in which
//! the trainer could not step aside for serving. These run in blocks with a [`crate::pressure::yield_point`]
//! before each. Other devices and dtypes take candle's ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

use crate::model::kernels;
use crate::model::linear::f32_slice;
use crate::pressure::yield_point;

/// Elements per block between yield points: well under a millisecond of work.
const BLOCK: usize = 1 << 16;

fn on_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn is_half(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// Exact (erf) GELU, `x·Φ(x)`.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if !on_cpu_f32(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

/// Softmax over the last dimension. Half-precision inputs are computed in f32 and returned in their own
/// format, as autocast does.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    if is_half(x) {
        return softmax_last(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
    }
    if !on_cpu_f32(x) {
        let max = x.max_keepdim(D::Minus1)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        return e.broadcast_div(&e.sum_keepdim(D::Minus1)?);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// LayerNorm over the last dimension with scale `gamma` and shift `beta` (both `[width]`); gradients flow to
/// all three. Half-precision inputs are normalised in f32 and returned in their own format, as autocast does.
pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if is_half(x) {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        return layer_norm(&f32(x)?, &f32(gamma)?, &f32(beta)?, eps)?.to_dtype(x.dtype());
    }
    if !(on_cpu_f32(x) && on_cpu_f32(gamma) && on_cpu_f32(beta)) {
        let last = x.rank() - 1;
        let centered = x.broadcast_sub(&x.mean_keepdim(last)?)?;
        let var = centered.sqr()?.mean_keepdim(last)?;
        return centered
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(gamma)?
            .broadcast_add(beta);
    }
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

/// Scaled dot-product self-attention of `qkv` `[batch, seq, 3·hidden]` (queries, keys and values side by
/// side) over a right-padded batch: sequence `b` is its first `lengths[b]` positions. `[batch, seq, hidden]`,
/// zero at padded positions; the padding is never attended. CPU f32 only: the caller keeps the composed
/// path for other devices and for masks that are not right padding.
pub fn attention(qkv: &Tensor, lengths: &[usize], heads: usize) -> candle_core::Result<Tensor> {
    qkv.contiguous()?.apply_op1(Attention {
        lengths: lengths.to_vec(),
        heads,
    })
}

/// Rows `ids` (u32, `[n]`) of `table` (`[vocab, width]`): `[n, width]`. Its backward adds each row's gradient
/// into one zeroed table, where candle's `index_select` zeroes a table and then copies it whole to add into:
/// for BERT's vocabulary two passes over 47 MB a step, each faulted in anew. Other devices and dtypes take
/// `index_select`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    if !(on_cpu_f32(table) && ids.device().is_cpu() && ids.dtype() == DType::U32) {
        return table.index_select(ids, 0);
    }
    table.contiguous()?.apply_op2(&ids.contiguous()?, Embedding)
}

/// A backward op's output: `grad` (the second input) updated in place by `kernel(saved, grad)` over blocks of
/// `block` elements, yielding before each; `saved` is the first input (the forward's input or output).
fn backward_by_blocks(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    block: usize,
    what: &str,
    kernel: impl Fn(&[f32], &mut [f32]),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let saved = f32_slice(s1, l1, what)?;
    let mut grad = f32_slice(s2, l2, what)?.to_vec();
    for (g, s) in grad.chunks_mut(block).zip(saved.chunks(block)) {
        yield_point();
        kernel(s, g);
    }
    Ok((CpuStorage::F32(grad), l2.shape().clone()))
}

struct Gelu;

struct GeluBackward;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = f32_slice(s, l, self.name())?.to_vec();
        for block in out.chunks_mut(BLOCK) {
            yield_point();
            kernels::gelu_inplace(block);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?,
        ))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        backward_by_blocks(
            (s1, l1),
            (s2, l2),
            BLOCK,
            self.name(),
            kernels::gelu_backward,
        )
    }
}

struct Softmax;

struct SoftmaxBackward {
    width: usize,
}

/// Whole rows of `width` per block.
fn rows_per_block(width: usize) -> usize {
    (BLOCK / width.max(1)).max(1) * width.max(1)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let width = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = f32_slice(s, l, self.name())?.to_vec();
        for block in out.chunks_mut(rows_per_block(width)) {
            yield_point();
            kernels::softmax_inplace(block, width);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let width = res.dims().last().copied().unwrap_or(1);
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxBackward { width },
        )?))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-last-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let width = self.width.max(1);
        backward_by_blocks(
            (s1, l1),
            (s2, l2),
            rows_per_block(width),
            self.name(),
            |p, g| kernels::softmax_backward(p, g, width),
        )
    }
}

#[derive(Clone)]
struct Attention {
    lengths: Vec<usize>,
    heads: usize,
}

/// The gradient of [`Attention`]'s input, `[batch, seq, 3·hidden]`.
struct AttentionBackward(Attention);

impl Attention {
    /// The kernels' view of a `[batch, seq, 3·hidden]` layout.
    fn padded(&self, layout: &Layout, what: &str) -> candle_core::Result<kernels::Padded<'_>> {
        let (lengths, heads) = (&self.lengths, self.heads);
        let (batch, seq, width) = layout.shape().dims3()?;
        if batch != lengths.len() || heads == 0 || width % (3 * heads) != 0 {
            return Err(candle_core::Error::Msg(format!(
                "{what}: qkv {:?} does not fit {} lengths and {heads} heads",
                layout.shape(),
                lengths.len()
            )));
        }
        Ok(kernels::Padded {
            seq,
            heads,
            head_dim: width / 3 / heads,
            lengths,
        })
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = self.padded(l, self.name())?;
        let qkv = f32_slice(s, l, self.name())?;
        let (batch, seq, width) = l.shape().dims3()?;
        let mut out = vec![0f32; batch * seq * width / 3];
        yield_point();
        kernels::attention_padded(&shape, qkv, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((batch, seq, width / 3))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &AttentionBackward(self.clone()),
        )?))
    }
}

impl CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = self.0.padded(l1, self.name())?;
        let qkv = f32_slice(s1, l1, self.name())?;
        let grad = f32_slice(s2, l2, self.name())?;
        let mut d_qkv = vec![0f32; qkv.len()];
        yield_point();
        kernels::attention_padded_backward(&shape, qkv, grad, &mut d_qkv);
        Ok((CpuStorage::F32(d_qkv), l1.shape().clone()))
    }
}

struct LayerNorm {
    eps: f32,
}

/// Output `[rows + 2, width]`: the input gradient's rows, then the scale's and the shift's gradients.
struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let gamma = f32_slice(s2, l2, self.name())?;
        let beta = f32_slice(s3, l3, self.name())?;
        let width = gamma.len().max(1);
        let mut out = f32_slice(s1, l1, self.name())?.to_vec();
        if l1.shape().dims().last() != Some(&gamma.len()) || beta.len() != gamma.len() {
            return Err(candle_core::Error::Msg(format!(
                "layer-norm: input {:?}, scale {}, shift {}",
                l1.shape(),
                gamma.len(),
                beta.len()
            )));
        }
        for block in out.chunks_mut(rows_per_block(width)) {
            yield_point();
            kernels::add_layer_norm_inplace(block, None, gamma, beta, self.eps);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let width = gamma.elem_count();
        let rows = x.elem_count() / width.max(1);
        let all = x.apply_op3_no_bwd(
            gamma,
            &grad.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        Ok((
            Some(all.narrow(0, 0, rows)?.reshape(x.shape())?),
            Some(all.get(rows)?),
            Some(all.get(rows + 1)?),
        ))
    }
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let gamma = f32_slice(s2, l2, self.name())?;
        let width = gamma.len().max(1);
        let rows = x.len() / width;
        let mut out = Vec::with_capacity((rows + 2) * width);
        out.extend_from_slice(f32_slice(s3, l3, self.name())?);
        out.resize((rows + 2) * width, 0.0);
        let (grad, sums) = out.split_at_mut(rows * width);
        let (d_gamma, d_beta) = sums.split_at_mut(width);
        let block = rows_per_block(width);
        for (x, g) in x.chunks(block).zip(grad.chunks_mut(block)) {
            yield_point();
            kernels::layer_norm_backward(x, gamma, self.eps, g, d_gamma, d_beta);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, width))))
    }
}

struct Embedding;

/// The table's gradient from the output's: `vocab` rows, zero but where `ids` point.
struct EmbeddingBackward {
    vocab: usize,
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: contiguous u32 ids only"),
    }
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (vocab, width) = l1.shape().dims2()?;
        let table = f32_slice(s1, l1, self.name())?;
        let ids = u32_slice(s2, l2, self.name())?;
        let mut out = Vec::with_capacity(ids.len() * width);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                candle_core::bail!("embedding: id {id} is outside the {vocab}-row table");
            }
            out.extend_from_slice(&table[id * width..(id + 1) * width]);
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), width))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let backward = EmbeddingBackward {
            vocab: table.dim(0)?,
        };
        let d_table = ids.apply_op2_no_bwd(&grad.contiguous()?, &backward)?;
        Ok((Some(d_table), None))
    }
}

impl CustomOp2 for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "embedding-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ids = u32_slice(s1, l1, self.name())?;
        let (_, width) = l2.shape().dims2()?;
        let grad = f32_slice(s2, l2, self.name())?;
        // Zeroed memory straight from the allocator: rows no id points at are never touched.
        let mut table = vec![0f32; self.vocab * width];
        for (&id, row) in ids.iter().zip(grad.chunks_exact(width)) {
            let id = id as usize;
            for (t, g) in table[id * width..(id + 1) * width].iter_mut().zip(row) {
                *t += g;
            }
        }
        Ok((CpuStorage::F32(table), Shape::from((self.vocab, width))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var, D};

    use super::{attention, embedding, gelu_erf, layer_norm, softmax_last};
    use crate::model::tiny::max_abs_diff;

    /// Values and input gradients of `ours` and `reference` under a weighted sum, on the same input.
    fn compare(
        ours: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        reference: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> (f32, f32) {
        let dev = Device::Cpu;
        // More than one block, with a last dimension that does not divide it.
        let shape = (3, 700, 37);
        let n = 3 * 700 * 37;
        let x = Var::from_tensor(
            &Tensor::from_vec(crate::rng::Rng::new(5).uniform(n, 4.0), shape, &dev).unwrap(),
        )
        .unwrap();
        let weights =
            Tensor::from_vec(crate::rng::Rng::new(6).uniform(n, 1.0), shape, &dev).unwrap();
        let run = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
            let y = f(x.as_tensor()).unwrap();
            let grads = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(&ours);
        let (y2, g2) = run(&reference);
        (max_abs_diff(&y1, &y2), max_abs_diff(&g1, &g2))
    }

    #[test]
    fn gelu_matches_candles_in_value_and_gradient() {
        let (value, gradient) = compare(gelu_erf, |x| x.gelu_erf());
        assert!(value < 1e-5, "values differ by {value}");
        assert!(gradient < 1e-5, "gradients differ by {gradient}");
    }

    #[test]
    fn layer_norm_matches_the_composed_ops_in_value_and_all_three_gradients() {
        let dev = Device::Cpu;
        let (rows, width) = (300, 384);
        let var = |seed: u64, n: usize, shape: &[usize], offset: f32| {
            let values: Vec<f32> = crate::rng::Rng::new(seed)
                .uniform(n, 2.0)
                .into_iter()
                .map(|v| v + offset)
                .collect();
            Var::from_tensor(&Tensor::from_vec(values, shape, &dev).unwrap()).unwrap()
        };
        // Rows off zero mean, so the mean's gradient path matters.
        let x = var(1, rows * width, &[3, rows / 3, width], 0.7);
        let gamma = var(2, width, &[width], 1.0);
        let beta = var(3, width, &[width], 0.0);
        let weights = Tensor::from_vec(
            crate::rng::Rng::new(4).uniform(rows * width, 1.0),
            (3, rows / 3, width),
            &dev,
        )
        .unwrap();
        let composed = |x: &Tensor, g: &Tensor, b: &Tensor| {
            let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
            centered
                .broadcast_div(&(var + 1e-12)?.sqrt()?)?
                .broadcast_mul(g)?
                .broadcast_add(b)
        };
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let y = f(x.as_tensor(), gamma.as_tensor(), beta.as_tensor()).unwrap();
            let grads = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            (y, [grad(&x), grad(&gamma), grad(&beta)])
        };
        let (y1, g1) = run(&|x, g, b| layer_norm(x, g, b, 1e-12));
        let (y2, g2) = run(&composed);
        assert!(max_abs_diff(&y1, &y2) < 1e-5, "values differ");
        for (name, (a, b)) in ["input", "scale", "shift"].iter().zip(g1.iter().zip(&g2)) {
            assert_eq!(a.dims(), b.dims(), "{name} gradient shape");
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_diff(a, b);
            assert!(
                diff < 1e-5 * scale.max(1.0),
                "{name} gradients differ by {diff}"
            );
        }
    }

    #[test]
    fn attention_matches_the_masked_composed_ops_at_real_positions_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (batch, seq, heads, head_dim) = (3, 7, 2, 4);
        let hidden = heads * head_dim;
        let lengths = [7usize, 4, 1];
        let n = batch * seq * hidden;
        let var = |seed| {
            let t = Tensor::from_vec(
                crate::rng::Rng::new(seed).uniform(n, 1.5),
                (batch, seq, hidden),
                &dev,
            );
            Var::from_tensor(&t.unwrap()).unwrap()
        };
        let (q, k, v) = (var(11), var(12), var(13));
        // 1 at real positions, the loss looks at real positions only (padded outputs differ by design).
        let real: Vec<f32> = (0..batch * seq)
            .map(|i| f32::from(u8::from(i % seq < lengths[i / seq])))
            .collect();
        let real = Tensor::from_vec(real, (batch, seq, 1), &dev).unwrap();
        let weights = (Tensor::from_vec(
            crate::rng::Rng::new(14).uniform(n, 1.0),
            (batch, seq, hidden),
            &dev,
        )
        .unwrap()
        .broadcast_mul(&real))
        .unwrap();
        let composed = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
            let split = |t: &Tensor| {
                t.reshape((batch, seq, heads, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let mask = ((real.reshape((batch, 1, 1, seq))? - 1.0)? * 1e9)?;
            let scores = (split(q)?.matmul(&split(k)?.t()?)? / (head_dim as f64).sqrt())?
                .broadcast_add(&mask)?;
            softmax_last(&scores)?
                .matmul(&split(v)?)?
                .transpose(1, 2)?
                .reshape((batch, seq, hidden))
        };
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let y = f(q.as_tensor(), k.as_tensor(), v.as_tensor())
                .unwrap()
                .broadcast_mul(&real)
                .unwrap();
            let grads = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
            (y, [grad(&q), grad(&k), grad(&v)])
        };
        let fused = |q: &Tensor, k: &Tensor, v: &Tensor| {
            attention(&Tensor::cat(&[q, k, v], 2)?, &lengths, heads)
        };
        let (y1, g1) = run(&fused);
        let (y2, g2) = run(&composed);
        assert!(
            max_abs_diff(&y1, &y2) < 1e-5,
            "values differ by {}",
            max_abs_diff(&y1, &y2)
        );
        for (name, (a, b)) in ["query", "key", "value"].iter().zip(g1.iter().zip(&g2)) {
            let diff = max_abs_diff(a, b);
            assert!(diff < 1e-5, "{name} gradients differ by {diff}");
            assert!(
                a.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
    }

    #[test]
    fn softmax_matches_the_composed_ops_in_value_and_gradient() {
        let composed = |x: &Tensor| {
            let max = x.max_keepdim(D::Minus1)?;
            let e = x.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        };
        let (value, gradient) = compare(softmax_last, composed);
        assert!(value < 1e-6, "values differ by {value}");
        assert!(gradient < 1e-6, "gradients differ by {gradient}");
    }

    #[test]
    fn embedding_matches_index_select_in_value_and_table_gradient() {
        let dev = Device::Cpu;
        let (vocab, width) = (50, 7);
        let table = Var::from_tensor(
            &Tensor::from_vec(
                crate::rng::Rng::new(8).uniform(vocab * width, 1.0),
                (vocab, width),
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        // Repeated ids: their gradients must add up.
        let ids = Tensor::new(&[3u32, 9, 3, 49, 0, 3], &dev).unwrap();
        let weights = Tensor::from_vec(
            crate::rng::Rng::new(9).uniform(6 * width, 1.0),
            (6, width),
            &dev,
        )
        .unwrap();
        let run = |f: &dyn Fn() -> candle_core::Result<Tensor>| {
            let y = f().unwrap();
            let grads = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y, grads.get(table.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(&|| embedding(table.as_tensor(), &ids));
        let (y2, g2) = run(&|| table.as_tensor().index_select(&ids, 0));
        assert_eq!(max_abs_diff(&y1, &y2), 0.0);
        assert!(max_abs_diff(&g1, &g2) < 1e-6);
        let outside = Tensor::new(&[50u32], &dev).unwrap();
        assert!(embedding(table.as_tensor(), &outside).is_err());
    }
}
