//! A tiny seeded random BERT for unit tests (2 layers, hidden 32).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::bert::Bert;
use super::hf_config::BertConfig;

fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    crate::rng::Rng::new(seed).uniform(n, scale)
}

/// Named tensors of a random BERT with `config`'s shapes, names prefixed with `prefix`.
pub fn tensors(config: &BertConfig, seed: u64, prefix: &str) -> HashMap<String, Tensor> {
    super::random::tensors(config, seed, prefix, 0.5)
}

/// A random tiny BERT.
pub fn bert(seed: u64) -> Bert {
    super::random::bert(&BertConfig::tiny(), seed, 0.5, &Device::Cpu).expect("tiny BERT loads")
}

/// A random adapter for `config` on `targets` (B zero when `zero_b`), with a 3-label `[CLS]` head.
pub fn adapter(
    config: &BertConfig,
    seed: u64,
    targets: &[super::adapter::Target],
    rank: usize,
    zero_b: bool,
) -> super::adapter::Adapter {
    use super::adapter::{Adapter, Dense, Head, LoraDelta, Pooling};
    let mut adapter = Adapter::empty(config.num_hidden_layers);
    for layer in 0..config.num_hidden_layers {
        for (k, &target) in targets.iter().enumerate() {
            let (i, o) = target.shape(config);
            let s = seed * 1000 + (layer * 10 + k) as u64;
            let b = if zero_b {
                vec![0.0; o * rank]
            } else {
                values(s + 500, o * rank, 0.3)
            };
            let delta = LoraDelta {
                a: values(s, rank * i, 0.3),
                b,
                rank,
                scale: 2.0,
            };
            adapter.set(layer, target, delta).expect("layer exists");
        }
    }
    let h = config.hidden_size;
    adapter.head = Some(Head {
        pooling: Pooling::Cls,
        pooler: None,
        classifier: Dense {
            weight: values(seed + 77, 3 * h, 0.5),
            bias: values(seed + 78, 3, 0.1),
            in_features: h,
            out_features: 3,
        },
    });
    adapter
}

/// A variable of `shape` holding seeded values uniform in `[-range, range]`.
pub fn var(shape: &[usize], seed: u64, range: f32) -> candle_core::Var {
    let values = crate::rng::Rng::new(seed).uniform(shape.iter().product(), range);
    candle_core::Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap()).unwrap()
}

/// The gradients of `Σ t ⊙ weights`: a loss whose gradient differs per element.
pub fn weighted_loss(t: &Tensor, weights: &Tensor) -> candle_core::backprop::GradStore {
    (t * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

/// The largest absolute elementwise difference of two slices of one length.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The largest absolute elementwise difference of two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape")
}
