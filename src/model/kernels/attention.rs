//! Scaled dot-product self-attention: over packed sequences (serving) and over a padded batch with its
//! backward pass (training).

use gemm::Parallelism;
use rayon::prelude::*;

use super::*;

/// Scaled dot-product self-attention over packed sequences.
///
/// `q`, `k`, `v` and `out` are `[tokens × heads·head_dim]`; sequence `i` occupies rows
/// `offsets[i]..offsets[i + 1]`. No padding exists, so no mask is needed and no work is wasted.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    let hidden = size(heads, head_dim);
    let tokens = *offsets.last().unwrap_or(&0);
    assert!(
        offsets.first().is_none_or(|&o| o == 0) && offsets.windows(2).all(|w| w[0] <= w[1]),
        "attention: offsets must start at 0 and never decrease"
    );
    let longest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    size(longest, longest);
    assert_eq!(
        q.len(),
        size(tokens, hidden),
        "attention: q is not tokens × hidden"
    );
    assert_eq!(k.len(), q.len(), "attention: k differs from q");
    assert_eq!(v.len(), q.len(), "attention: v differs from q");
    assert_eq!(out.len(), q.len(), "attention: out differs from q");
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lengths: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    for_each_head(&lengths, heads, |s, h| {
        let len = lengths[s];
        let base = offsets[s] * hidden + h * head_dim;
        // SAFETY: (s, h) pairs are distinct, so each task reads its own q/k/v columns of its own rows and
        // writes a disjoint block of `out`; every index stays below tokens × hidden (asserted above).
        unsafe {
            let p = head_probabilities(
                q.as_ptr().add(base),
                k.as_ptr().add(base),
                hidden,
                len,
                head_dim,
            );
            strided_product(
                (len, head_dim, len),
                (out_ptr.get().add(base), hidden, false),
                (p.as_ptr(), len, 1),
                (v.as_ptr().add(base), hidden, 1),
                1.0,
                Parallelism::None,
            );
        }
    });
}

/// Runs `task(sequence, head)` for every head of every non-empty sequence (`lengths`), across rayon's pool
/// when there is more than one.
pub(super) fn for_each_head(lengths: &[usize], heads: usize, task: impl Fn(usize, usize) + Sync) {
    let work: Vec<(usize, usize)> = (0..lengths.len())
        .filter(|&s| lengths[s] > 0)
        .flat_map(|s| (0..heads).map(move |h| (s, h)))
        .collect();
    if work.len() > 1 && threads() > 1 {
        work.par_iter().for_each(|&(s, h)| task(s, h));
    } else {
        work.iter().for_each(|&(s, h)| task(s, h));
    }
}

/// One head's attention probabilities `softmax(q·kᵀ / √head_dim)`, `[len × len]`, for `len` rows of queries
/// and keys starting at `q` and `k`, `stride` apart.
///
/// # Safety
/// `len` rows of `head_dim` values, `stride` apart, must be readable from `q` and from `k`.
pub(super) unsafe fn head_probabilities(
    q: *const f32,
    k: *const f32,
    stride: usize,
    len: usize,
    head_dim: usize,
) -> Vec<f32> {
    let mut p = vec![0f32; len * len];
    // SAFETY: `p` is `len × len`; the caller guarantees `len` rows of `head_dim` values from `q` and `k`.
    unsafe {
        strided_product(
            (len, len, head_dim),
            (p.as_mut_ptr(), len, false),
            (q, stride, 1),
            (k, 1, stride),
            1.0 / (head_dim as f32).sqrt(),
            Parallelism::None,
        )
    };
    softmax_rows(&mut p, len);
    p
}

/// The shape of a padded self-attention over `qkv` `[batch × seq × 3·hidden]` (queries, keys and values side
/// by side in each row); sequence `b` is its first `lengths[b]` positions, the rest padding.
#[derive(Clone, Copy)]
pub struct Padded<'a> {
    /// Positions per sequence, padding included.
    pub seq: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Real positions of each sequence (≤ `seq`).
    pub lengths: &'a [usize],
}

impl Padded<'_> {
    fn hidden(&self) -> usize {
        size(self.heads, self.head_dim)
    }

    /// Checks the buffers (`qkv`, and the length of the `rows × hidden` one: a length, not a slice, because
    /// the caller may be writing that buffer through a raw pointer while the tasks run), then runs
    /// `task(b, h)` for every sequence and head, in parallel.
    fn each_head(&self, qkv: &[f32], other_len: usize, task: impl Fn(usize, usize) + Sync) {
        let (rows, hidden) = (size(self.lengths.len(), self.seq), self.hidden());
        assert_eq!(
            qkv.len(),
            size(rows, 3 * hidden),
            "attention: qkv is not rows × 3·hidden"
        );
        assert_eq!(
            other_len,
            size(rows, hidden),
            "attention: rows × hidden buffer differs"
        );
        assert!(
            self.lengths.iter().all(|&l| l <= self.seq),
            "attention: a length exceeds seq"
        );
        size(self.seq, self.seq);
        for_each_head(self.lengths, self.heads, task);
    }

    /// Softmax probabilities `[len × len]` of sequence `b`, head `h`.
    ///
    /// # Safety
    /// `qkv` must hold `batch × seq × 3·hidden` values (checked by [`Self::each_head`]).
    unsafe fn probabilities(&self, qkv: &[f32], b: usize, h: usize) -> Vec<f32> {
        let hidden = self.hidden();
        // SAFETY: sequence `b`'s rows lie inside `qkv` (this function's contract); its queries and keys are
        // `hidden` apart in each row of `3·hidden`.
        unsafe {
            let q = qkv
                .as_ptr()
                .add(b * self.seq * 3 * hidden + h * self.head_dim);
            head_probabilities(q, q.add(hidden), 3 * hidden, self.lengths[b], self.head_dim)
        }
    }
}

/// Scaled dot-product self-attention over a padded batch: `out` `[batch × seq × hidden]` gets each real
/// position's context (padded positions stay zero); keys beyond a sequence's length are not attended.
pub fn attention_padded(shape: &Padded, qkv: &[f32], out: &mut [f32]) {
    let hidden = shape.hidden();
    let out_ptr = SendPtr(out.as_mut_ptr());
    shape.each_head(qkv, out.len(), |b, h| {
        let len = shape.lengths[b];
        // SAFETY: sizes checked by each_head; each (b, h) writes only its own rows' head columns of `out`.
        unsafe {
            let p = shape.probabilities(qkv, b, h);
            let v = qkv
                .as_ptr()
                .add(b * shape.seq * 3 * hidden + 2 * hidden + h * shape.head_dim);
            strided_product(
                (len, shape.head_dim, len),
                (
                    out_ptr
                        .get()
                        .add(b * shape.seq * hidden + h * shape.head_dim),
                    hidden,
                    false,
                ),
                (p.as_ptr(), len, 1),
                (v, 3 * hidden, 1),
                1.0,
                Parallelism::None,
            );
        }
    });
}

/// The backward pass of [`attention_padded`]: `d_qkv` (`[batch × seq × 3·hidden]`, zero on entry) gets the
/// gradients of queries, keys and values from `grad` (`∂L/∂out`). The probabilities are recomputed rather
/// than kept from the forward pass (their product is a sliver of a layer's work at these lengths).
pub fn attention_padded_backward(shape: &Padded, qkv: &[f32], grad: &[f32], d_qkv: &mut [f32]) {
    let hidden = shape.hidden();
    assert_eq!(
        d_qkv.len(),
        qkv.len(),
        "attention backward: d_qkv differs from qkv"
    );
    let d_ptr = SendPtr(d_qkv.as_mut_ptr());
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    shape.each_head(qkv, grad.len(), |b, h| {
        let len = shape.lengths[b];
        let row = b * shape.seq;
        let col = h * shape.head_dim;
        let (hd, stride) = (shape.head_dim, 3 * hidden);
        // SAFETY: sizes checked by each_head; each (b, h) writes only its own rows' head columns of d_qkv.
        unsafe {
            let p = shape.probabilities(qkv, b, h);
            let q = qkv.as_ptr().add(row * stride + col);
            let (k, v) = (q.add(hidden), q.add(2 * hidden));
            let d_out = grad.as_ptr().add(row * hidden + col);
            let d_q = d_ptr.get().add(row * stride + col);
            let (d_k, d_v) = (d_q.add(hidden), d_q.add(2 * hidden));
            // dV = Pᵀ·dO; dP = dO·Vᵀ; dS = softmax backward; dQ = s·dS·K; dK = s·dSᵀ·Q.
            strided_product(
                (len, hd, len),
                (d_v, stride, false),
                (p.as_ptr(), 1, len),
                (d_out, hidden, 1),
                1.0,
                Parallelism::None,
            );
            let mut d_s = vec![0f32; len * len];
            strided_product(
                (len, len, hd),
                (d_s.as_mut_ptr(), len, false),
                (d_out, hidden, 1),
                (v, 1, stride),
                1.0,
                Parallelism::None,
            );
            softmax_backward_rows(&p, &mut d_s, len);
            strided_product(
                (len, hd, len),
                (d_q, stride, false),
                (d_s.as_ptr(), len, 1),
                (k, stride, 1),
                scale,
                Parallelism::None,
            );
            strided_product(
                (len, hd, len),
                (d_k, stride, false),
                (d_s.as_ptr(), 1, len),
                (q, stride, 1),
                scale,
                Parallelism::None,
            );
        }
    });
}
