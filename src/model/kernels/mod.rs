//! Plain-slice f32 kernels for the CPU paths: products with a fused bias (`matmul.rs`), GELU, LayerNorm with
//! a fused residual and softmax with their backward passes (`elementwise.rs`), and attention over packed
//! (unpadded) sequences for serving and over padded batches for training (`attention.rs`). This file holds
//! what they share: when to split work across rayon's pool and the AVX2 dispatch of the elementwise loops.
//!
//! The loops are written so that the compiler vectorises them (no libm calls inside): `exp` and `erf` are
//! polynomial approximations accurate to ~1e-7, far below the 1e-4 parity budget against PyTorch.

use gemm::Parallelism;
use rayon::prelude::*;

pub use super::avx512::PackedWeight;

/// Work (multiply-adds) below which a GEMM runs on the calling thread: splitting it costs more than it saves.
pub(super) const PARALLEL_GEMM_MIN_WORK: usize = 1 << 20;
/// Rows per rayon task for the row-wise kernels.
pub(super) const ROWS_PER_TASK: usize = 16;
/// Elements from which the elementwise kernels split across rayon's pool, and the size of each task.
#[cfg(not(miri))]
pub(crate) const PARALLEL_ELEMENTS: usize = 1 << 16;
// Under Miri (a thousand times slower) the tests still reach the parallel paths with small inputs.
#[cfg(miri)]
pub(crate) const PARALLEL_ELEMENTS: usize = 1 << 9;
pub(crate) const ELEMENTS_PER_TASK: usize = 1 << 14;

/// Runs `kernel(values, other)` over matching chunks of `chunk` elements of two buffers of one length,
/// across rayon's pool once they reach [`PARALLEL_ELEMENTS`], otherwise on the calling thread in one go.
pub(super) fn split_paired(
    values: &mut [f32],
    other: &[f32],
    chunk: usize,
    kernel: impl Fn(&mut [f32], &[f32]) + Sync + Send,
) {
    if values.len() >= PARALLEL_ELEMENTS {
        values
            .par_chunks_mut(chunk)
            .zip(other.par_chunks(chunk))
            .for_each(|(v, o)| kernel(v, o));
    } else {
        kernel(values, other);
    }
}

/// A task's share of a row-wise kernel: whole rows of `width`, about [`ELEMENTS_PER_TASK`] elements.
pub(super) fn whole_rows(width: usize) -> usize {
    (ELEMENTS_PER_TASK / width.max(1)).max(1) * width.max(1)
}

/// Defines `$name`, which runs `$body` compiled for AVX2 when the CPU has it (checked once at run time)
/// and for the build's baseline otherwise. The same source either way, so results agree.
macro_rules! simd_dispatch {
    ($name:ident, $avx2:ident, $body:ident, ($($arg:ident : $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        // Safe to call only where the CPU has AVX2; `$body` itself is safe code.
        unsafe fn $avx2($($arg: $ty),*) {
            $body($($arg),*)
        }

        pub(super) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU supports AVX2 (checked at run time).
                return unsafe { $avx2($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
}

/// A pointer that may cross threads; each task writes a disjoint region through it.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(*mut f32);
// SAFETY: only used to write disjoint regions from rayon tasks that all end before the owner is read.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send` above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    // A method (not field access) so closures capture the whole `Send` wrapper, not the raw pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `work` on a thread of rayon's pool: the calling one when it is already there.
///
/// A parallel kernel called from outside the pool hands its tasks over and parks the caller until they end:
/// two thread wake-ups per kernel, dozens per forward pass. Run on the pool, a forward pass pays that once, and
/// its kernels split between the pool's threads by work stealing (at 1 × 32 tokens in int8 this took a forward
/// pass from 3.8 to 2.6 ms here; docs/BENCHMARKS.md).
pub(crate) fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        work()
    } else {
        rayon::scope(|_| work())
    }
}

/// Number of threads the heavy kernels may use (rayon's pool, which candle also uses).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

pub(super) fn parallelism(work: usize) -> Parallelism {
    let threads = threads();
    if threads > 1 && work >= PARALLEL_GEMM_MIN_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `a · b`, panicking on overflow: these sizes guard unsafe GEMM calls, so they must not wrap.
pub(super) fn size(a: usize, b: usize) -> usize {
    a.checked_mul(b).expect("kernel size overflows usize")
}

mod attention;
mod elementwise;
mod matmul;

pub use attention::*;
pub use elementwise::*;
pub use matmul::*;

#[cfg(test)]
mod tests;
