//! The CPU serving path: the same BERT as [`super::bert`], run on packed sequences with fused kernels.
//!
//! Sequences of a batch are concatenated row after row (no padding), so every dense layer is one GEMM
//! over exactly the real tokens, and attention runs per sequence and head. The bias is fused into the
//! GEMM, the residual into LayerNorm, and buffers are reused across layers. The candle path in
//! [`super::bert`] is the oracle this path is tested against. Its projections run in f32 or, quantised by
//! [`CpuEncoder::quantized`], in int8 ([`super::int8`]).
//!
//! Past 500 lines as one concern: the packed weights, the forward pass and the adapter groups share private
//! layouts.

use candle_core::Tensor;

use super::adapter::{Adapter, Dense, Pooling, Target};
use super::bert::{Bert, Layer};
use super::calibration::{widen, InputRanges};
use super::error::{ModelError, Result};
use super::hf_config::BertConfig;
use super::kernels;
use super::linear::{LayerNorm, Linear};
use super::pooling;

/// Hidden states of a packed batch: sequence `i` is rows `offsets[i]..offsets[i + 1]` of `hidden`.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// `[tokens × width]`, row-major.
    pub hidden: Vec<f32>,
    /// `sequences + 1` row offsets, starting at 0.
    pub offsets: Vec<usize>,
    /// Row width (the model's hidden size).
    pub width: usize,
}

impl Packed {
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Whether the batch holds no sequence.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of sequence `i`, `[len × width]`.
    pub fn sequence(&self, i: usize) -> &[f32] {
        &self.hidden[self.offsets[i] * self.width..self.offsets[i + 1] * self.width]
    }
}

/// Copies a candle `Linear` into a plain-buffer [`Dense`] (a missing bias becomes zeros).
fn dense(linear: &Linear) -> Result<Dense> {
    let bias = match &linear.bias {
        Some(b) => to_vec(b)?,
        None => vec![0.0; linear.out_features()],
    };
    Ok(Dense {
        weight: to_vec(&linear.weight)?,
        bias,
        in_features: linear.in_features(),
        out_features: linear.out_features(),
    })
}

/// A projection of an encoder layer: its weight packed for the AVX-512 kernel where the CPU has it, which
/// then streams each panel in order (what a short request's few rows need), else as `gemm` reads it.
#[derive(Debug, Clone)]
struct Projection {
    weight: ProjectionWeight,
    bias: Vec<f32>,
    in_features: usize,
    out_features: usize,
}

#[derive(Debug, Clone)]
enum ProjectionWeight {
    /// `[out × in]` row-major.
    Plain(Vec<f32>),
    Packed(kernels::PackedWeight),
    /// Quantised per output channel, run on the VNNI kernel (`model.precision = "int8"`).
    Int8(super::int8::QuantWeight),
}

impl Projection {
    fn from(linear: &Linear) -> Result<Self> {
        let Dense {
            weight,
            bias,
            in_features,
            out_features,
        } = dense(linear)?;
        let weight = match kernels::PackedWeight::new(&weight, out_features, in_features) {
            Some(packed) => ProjectionWeight::Packed(packed),
            None => ProjectionWeight::Plain(weight),
        };
        Ok(Self {
            weight,
            bias,
            in_features,
            out_features,
        })
    }

    /// `out = x·Wᵀ + b` for `rows` rows, into a caller's buffer.
    fn run_into(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let bias = Some(self.bias.as_slice());
        match &self.weight {
            ProjectionWeight::Plain(w) => {
                let (k, n) = (self.in_features, self.out_features);
                kernels::linear(x, rows, k, w, bias, n, out)
            }
            ProjectionWeight::Packed(w) => kernels::packed_linear(x, rows, w, bias, out),
            ProjectionWeight::Int8(w) => super::int8::linear(x, rows, w, bias, out),
        }
    }

    /// The weight quantised to int8 (a no-op if it is already), smoothed against `input_range` where the
    /// input's channels differ in range (see [`super::int8::QuantWeight::smoothed`]).
    fn quantize(&mut self, input_range: Option<&[f32]>) {
        let weight = match &self.weight {
            ProjectionWeight::Plain(w) => w.clone(),
            ProjectionWeight::Packed(w) => w.unpacked(),
            ProjectionWeight::Int8(_) => return,
        };
        let (n, k) = (self.out_features, self.in_features);
        self.weight = ProjectionWeight::Int8(match input_range {
            Some(range) => super::int8::QuantWeight::smoothed(&weight, n, k, range),
            None => super::int8::QuantWeight::new(&weight, n, k),
        });
    }

    /// Adds `delta` (`[out × in]`, a merged LoRA update) to the weight.
    fn add(&mut self, delta: &[f32]) {
        match &mut self.weight {
            ProjectionWeight::Plain(w) => w.iter_mut().zip(delta).for_each(|(w, d)| *w += d),
            ProjectionWeight::Packed(w) => w.add(delta),
            // Merged onto the weight the int8 one stands for, then quantised again.
            ProjectionWeight::Int8(w) => *w = w.plus(delta),
        }
    }
}

#[derive(Debug, Clone)]
struct NormWeights {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl NormWeights {
    fn from(norm: &LayerNorm) -> Result<Self> {
        Ok(Self {
            gamma: to_vec(&norm.weight)?,
            beta: to_vec(&norm.bias)?,
            eps: norm.eps as f32,
        })
    }

    fn run(&self, x: &mut [f32], residual: Option<&[f32]>) {
        kernels::add_layer_norm_inplace(x, residual, &self.gamma, &self.beta, self.eps);
    }
}

#[derive(Debug, Clone)]
struct LayerWeights {
    query: Projection,
    key: Projection,
    value: Projection,
    attention_out: Projection,
    attention_norm: NormWeights,
    intermediate: Projection,
    output: Projection,
    output_norm: NormWeights,
}

impl LayerWeights {
    /// The six projections in [`Target::ALL`]'s order.
    fn projections(&self) -> [&Projection; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_out,
            &self.intermediate,
            &self.output,
        ]
    }

    fn projection_mut(&mut self, target: Target) -> &mut Projection {
        match target {
            Target::Query => &mut self.query,
            Target::Key => &mut self.key,
            Target::Value => &mut self.value,
            Target::AttentionOutput => &mut self.attention_out,
            Target::Intermediate => &mut self.intermediate,
            Target::Output => &mut self.output,
        }
    }

    fn from(l: &Layer) -> Result<Self> {
        Ok(Self {
            query: Projection::from(&l.query)?,
            key: Projection::from(&l.key)?,
            value: Projection::from(&l.value)?,
            attention_out: Projection::from(&l.attention_out)?,
            attention_norm: NormWeights::from(&l.attention_norm)?,
            intermediate: Projection::from(&l.intermediate)?,
            output: Projection::from(&l.output)?,
            output_norm: NormWeights::from(&l.output_norm)?,
        })
    }
}

/// The encoder's weights as plain f32 buffers, run by the fused CPU kernels.
#[derive(Debug, Clone)]
pub struct CpuEncoder {
    config: BertConfig,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type0: Vec<f32>,
    embedding_norm: NormWeights,
    layers: Vec<LayerWeights>,
    pooler: Option<Dense>,
}

/// Scratch buffers of one forward pass, sized for its token count.
struct Buffers {
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    inner: Vec<f32>,
}

impl CpuEncoder {
    /// Copies `bert`'s weights (which must be f32) into the packed layout.
    pub fn from_bert(bert: &Bert) -> Result<Self> {
        let e = &bert.embeddings;
        Ok(Self {
            config: bert.config.clone(),
            word: to_vec(&e.word)?,
            position: to_vec(&e.position)?,
            token_type0: to_vec(&e.token_type.narrow(0, 0, 1)?)?,
            embedding_norm: NormWeights::from(&e.norm)?,
            layers: bert
                .layers
                .iter()
                .map(LayerWeights::from)
                .collect::<Result<_>>()?,
            pooler: bert.pooler.as_ref().map(dense).transpose()?,
        })
    }

    /// The network's shape.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Final hidden states of every token of `sequences` (token ids, special tokens included).
    pub fn forward(&self, sequences: &[&[u32]]) -> Result<Packed> {
        self.forward_adapted(sequences, &vec![None; sequences.len()])
    }

    /// Like [`Self::forward`], with `adapters[i]` applied to sequence `i` (`None`: the base model). The base
    /// GEMMs run once over the batch; each run of consecutive sequences sharing an adapter (compared by
    /// address) adds its low-rank deltas, so callers should order a batch by adapter.
    pub fn forward_adapted(
        &self,
        sequences: &[&[u32]],
        adapters: &[Option<&Adapter>],
    ) -> Result<Packed> {
        self.run(sequences, adapters, None)
    }

    /// The forward pass, recording each layer's input ranges into `observe` when given. It runs on rayon's
    /// pool ([`kernels::on_pool`]), except for a caller whose yield points may wait (the drift embedder): there
    /// they would park one of the pool's threads while serving needs it.
    fn run(
        &self,
        sequences: &[&[u32]],
        adapters: &[Option<&Adapter>],
        observe: Option<&mut Vec<InputRanges>>,
    ) -> Result<Packed> {
        if crate::pressure::yields_on_this_thread() {
            self.run_here(sequences, adapters, observe)
        } else {
            kernels::on_pool(|| self.run_here(sequences, adapters, observe))
        }
    }

    /// [`Self::run`] on the calling thread.
    fn run_here(
        &self,
        sequences: &[&[u32]],
        adapters: &[Option<&Adapter>],
        mut observe: Option<&mut Vec<InputRanges>>,
    ) -> Result<Packed> {
        if adapters.len() != sequences.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} adapter choices for {} sequences",
                adapters.len(),
                sequences.len()
            )));
        }
        for a in adapters.iter().flatten() {
            if a.num_layers() != self.layers.len() {
                return Err(ModelError::InvalidInput(
                    "adapter made for another model depth".to_owned(),
                ));
            }
        }
        let h = self.config.hidden_size;
        let mut offsets = Vec::with_capacity(sequences.len() + 1);
        offsets.push(0);
        for s in sequences {
            if s.is_empty() {
                return Err(ModelError::InvalidInput("empty token sequence".to_owned()));
            }
            if s.len() > self.config.max_position_embeddings {
                return Err(ModelError::InvalidInput(format!(
                    "sequence of {} tokens exceeds the model's {} positions",
                    s.len(),
                    self.config.max_position_embeddings
                )));
            }
            offsets.push(offsets.last().copied().unwrap_or(0) + s.len());
        }
        let tokens = offsets.last().copied().unwrap_or(0);
        let mut buf = Buffers {
            x: vec![0.0; tokens * h],
            q: vec![0.0; tokens * h],
            k: vec![0.0; tokens * h],
            v: vec![0.0; tokens * h],
            ctx: vec![0.0; tokens * h],
            tmp: vec![0.0; tokens * h],
            inner: vec![0.0; tokens * self.config.intermediate_size],
        };
        self.embed(sequences, &mut buf.x)?;
        let groups = Groups::new(adapters, &offsets);
        for (index, layer) in self.layers.iter().enumerate() {
            let observe = observe.as_deref_mut().map(|ranges| &mut ranges[index]);
            self.layer(index, layer, &groups, &mut buf, observe);
        }
        Ok(Packed {
            hidden: buf.x,
            offsets,
            width: h,
        })
    }

    /// How large each input channel of each layer's projections gets over `sequences`: the calibration of
    /// int8 smoothing (see [`Self::quantized`]).
    pub fn input_ranges(&self, sequences: &[&[u32]]) -> Result<Vec<InputRanges>> {
        let (h, inner) = (self.config.hidden_size, self.config.intermediate_size);
        let mut ranges = vec![InputRanges::new(h, inner); self.layers.len()];
        if !sequences.is_empty() {
            self.run(sequences, &vec![None; sequences.len()], Some(&mut ranges))?;
        }
        Ok(ranges)
    }

    /// `tanh(dense(h_[CLS]))` for each sequence: the pooled output `BertForSequenceClassification` feeds
    /// its classifier. `None` when the checkpoint has no pooler.
    pub fn pool_cls(&self, packed: &Packed) -> Option<Vec<f32>> {
        let pooler = self.pooler.as_ref()?;
        let h = packed.width;
        let mut cls = Vec::with_capacity(packed.len() * h);
        for i in 0..packed.len() {
            cls.extend_from_slice(&packed.sequence(i)[..h]);
        }
        Some(tanh_dense(pooler, &cls, packed.len()))
    }

    fn embed(&self, sequences: &[&[u32]], x: &mut [f32]) -> Result<()> {
        let h = self.config.hidden_size;
        let mut rows = x.chunks_exact_mut(h);
        for s in sequences {
            for (pos, &id) in s.iter().enumerate() {
                let id = id as usize;
                if id >= self.config.vocab_size {
                    return Err(ModelError::InvalidInput(format!(
                        "token id {id} outside the vocabulary"
                    )));
                }
                let row = rows
                    .next()
                    .expect("row count equals token count; this is a bug");
                let word = &self.word[id * h..(id + 1) * h];
                let position = &self.position[pos * h..(pos + 1) * h];
                for (((r, w), p), t) in row
                    .iter_mut()
                    .zip(word)
                    .zip(position)
                    .zip(&self.token_type0)
                {
                    *r = w + p + t;
                }
            }
        }
        self.embedding_norm.run(x, None);
        Ok(())
    }

    /// One encoder layer. Between its products a background caller (the drift embedder) steps aside for
    /// serving ([`crate::pressure::yield_point`]), so a request that arrives meanwhile waits for at most one
    /// product of one background input; on the model thread the points cost a thread-local read.
    fn layer(
        &self,
        index: usize,
        l: &LayerWeights,
        groups: &Groups,
        b: &mut Buffers,
        mut observe: Option<&mut InputRanges>,
    ) {
        use crate::pressure::yield_point;
        let rows = groups.rows();
        let h = self.config.hidden_size;
        let inner = self.config.intermediate_size;
        let mut record = |which: fn(&mut InputRanges) -> &mut Vec<f32>, values: &[f32]| {
            if let Some(ranges) = observe.as_deref_mut() {
                widen(which(ranges), values);
            }
        };
        record(|r| &mut r.attention, &b.x);
        yield_point();
        l.query.run_into(&b.x, rows, &mut b.q);
        groups.apply(index, Target::Query, &b.x, h, &mut b.q, h);
        yield_point();
        l.key.run_into(&b.x, rows, &mut b.k);
        groups.apply(index, Target::Key, &b.x, h, &mut b.k, h);
        yield_point();
        l.value.run_into(&b.x, rows, &mut b.v);
        groups.apply(index, Target::Value, &b.x, h, &mut b.v, h);
        yield_point();
        let heads = self.config.num_attention_heads;
        kernels::attention(
            &b.q,
            &b.k,
            &b.v,
            groups.offsets,
            heads,
            self.config.head_dim(),
            &mut b.ctx,
        );
        record(|r| &mut r.context, &b.ctx);
        yield_point();
        l.attention_out.run_into(&b.ctx, rows, &mut b.tmp);
        groups.apply(index, Target::AttentionOutput, &b.ctx, h, &mut b.tmp, h);
        l.attention_norm.run(&mut b.tmp, Some(&b.x));
        std::mem::swap(&mut b.x, &mut b.tmp);
        record(|r| &mut r.intermediate, &b.x);
        yield_point();
        l.intermediate.run_into(&b.x, rows, &mut b.inner);
        groups.apply(index, Target::Intermediate, &b.x, h, &mut b.inner, inner);
        kernels::gelu_inplace(&mut b.inner);
        record(|r| &mut r.output, &b.inner);
        yield_point();
        l.output.run_into(&b.inner, rows, &mut b.tmp);
        groups.apply(index, Target::Output, &b.inner, inner, &mut b.tmp, h);
        l.output_norm.run(&mut b.tmp, Some(&b.x));
        std::mem::swap(&mut b.x, &mut b.tmp);
    }

    /// Class logits of each sequence whose adapter has a head (`None` for the others): pooled as the head
    /// says (`[CLS]` through the pooler — the adapter's own if it has one — and tanh, or the token mean),
    /// then the classifier.
    pub fn classify(
        &self,
        packed: &Packed,
        adapters: &[Option<&Adapter>],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let h = packed.width;
        let mut logits = Vec::with_capacity(packed.len());
        for (i, adapter) in adapters.iter().enumerate().take(packed.len()) {
            let Some(head) = adapter.and_then(|a| a.head.as_ref()) else {
                logits.push(None);
                continue;
            };
            let pooled = match head.pooling {
                Pooling::Cls => {
                    let pooler = head.pooler.as_ref().or(self.pooler.as_ref()).ok_or_else(|| {
                        ModelError::InvalidInput(
                            "a [CLS] head needs a pooler and neither the model nor the adapter has one".to_owned(),
                        )
                    })?;
                    tanh_dense(pooler, &packed.sequence(i)[..h], 1)
                }
                Pooling::Mean => pooling::mean_of_rows(packed.sequence(i), h),
            };
            logits.push(Some(head.classifier.run(&pooled, 1)));
        }
        Ok(logits)
    }

    /// A copy of this encoder with `adapter`'s deltas merged into the base weights (`W + scale·B·A`).
    pub fn merged(&self, adapter: &Adapter) -> Result<Self> {
        adapter.validate(&self.config)?;
        let mut merged = self.clone();
        for (index, target, delta) in adapter.deltas() {
            let projection = merged.layers[index].projection_mut(target);
            projection.add(&delta.dense(projection.in_features, projection.out_features));
        }
        Ok(merged)
    }

    /// This encoder with the weights of `targets` in every layer quantised to int8, run on the VNNI kernel
    /// (see [`super::int8`]); the other projections, the embeddings, LayerNorm, softmax, GELU and the
    /// residuals stay f32, and LoRA deltas are still added in f32 onto the int8 product's output. Each
    /// quantised weight is smoothed against its input's channel ranges measured on `calibration`
    /// ([`super::int8::QuantWeight::smoothed`]); without calibration sequences nothing is smoothed.
    pub fn quantized(mut self, targets: &[Target], calibration: &[&[u32]]) -> Result<Self> {
        let ranges = self.input_ranges(calibration)?;
        for (layer, ranges) in self.layers.iter_mut().zip(&ranges) {
            for &target in targets {
                let range = match target {
                    Target::Query | Target::Key | Target::Value => &ranges.attention,
                    Target::AttentionOutput => &ranges.context,
                    Target::Intermediate => &ranges.intermediate,
                    Target::Output => &ranges.output,
                };
                let range = (!calibration.is_empty()).then_some(range.as_slice());
                layer.projection_mut(target).quantize(range);
            }
        }
        Ok(self)
    }

    /// The projections quantised to int8 (none at f32), in [`Target::ALL`]'s order.
    pub fn int8_targets(&self) -> Vec<Target> {
        let Some(first) = self.layers.first() else {
            return Vec::new();
        };
        Target::ALL
            .into_iter()
            .zip(first.projections())
            .filter(|(_, p)| matches!(p.weight, ProjectionWeight::Int8(_)))
            .map(|(t, _)| t)
            .collect()
    }
}

/// Runs of consecutive sequences that share an adapter, as row ranges of the packed batch.
struct Groups<'a> {
    offsets: &'a [usize],
    runs: Vec<(usize, usize, &'a Adapter)>,
}

impl<'a> Groups<'a> {
    fn new(adapters: &[Option<&'a Adapter>], offsets: &'a [usize]) -> Self {
        let mut runs: Vec<(usize, usize, &Adapter)> = Vec::new();
        for (i, adapter) in adapters.iter().enumerate() {
            let Some(a) = adapter else { continue };
            match runs.last_mut() {
                Some((_, end, last)) if *end == offsets[i] && std::ptr::eq(*last, *a) => {
                    *end = offsets[i + 1]
                }
                _ => runs.push((offsets[i], offsets[i + 1], a)),
            }
        }
        Self { offsets, runs }
    }

    fn rows(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Adds each run's delta for `target` of `layer` to its rows of `out`.
    fn apply(
        &self,
        layer: usize,
        target: Target,
        x: &[f32],
        in_f: usize,
        out: &mut [f32],
        out_f: usize,
    ) {
        for &(start, end, adapter) in &self.runs {
            if let Some(delta) = adapter.delta(layer, target) {
                let rows = end - start;
                delta.apply(
                    &x[start * in_f..end * in_f],
                    rows,
                    in_f,
                    &mut out[start * out_f..end * out_f],
                    out_f,
                );
            }
        }
    }
}

/// `tanh(x·Wᵀ + b)`: the BERT pooler.
fn tanh_dense(pooler: &Dense, x: &[f32], rows: usize) -> Vec<f32> {
    let mut out = pooler.run(x, rows);
    out.iter_mut().for_each(|v| *v = v.tanh());
    out
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}
