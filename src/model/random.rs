//! Seeded random BERT weights of any shape: the tiny networks of unit tests, and the real model's shapes
//! where its weights cannot go (the device check on a GPU machine).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::bert::Bert;
use super::error::Result;
use super::hf_config::BertConfig;
use crate::rng::Rng;

/// Named tensors of a random BERT with `config`'s shapes, names prefixed with `prefix`: values uniform in
/// `±scale`, LayerNorm gains around 1.
pub fn tensors(
    config: &BertConfig,
    seed: u64,
    prefix: &str,
    scale: f32,
) -> HashMap<String, Tensor> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![config.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![config.max_position_embeddings, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![config.type_vocab_size, h],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
        ("pooler.dense.weight".into(), vec![h, h]),
        ("pooler.dense.bias".into(), vec![h]),
    ];
    for l in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for name in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            shapes.push((format!("{p}.{name}.weight"), vec![h, h]));
            shapes.push((format!("{p}.{name}.bias"), vec![h]));
        }
        shapes.push((format!("{p}.intermediate.dense.weight"), vec![i, h]));
        shapes.push((format!("{p}.intermediate.dense.bias"), vec![i]));
        shapes.push((format!("{p}.output.dense.weight"), vec![h, i]));
        shapes.push((format!("{p}.output.dense.bias"), vec![h]));
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{p}.{norm}.weight"), vec![h]));
            shapes.push((format!("{p}.{norm}.bias"), vec![h]));
        }
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n = shape.iter().product();
            let mut v = Rng::new(seed + k as u64).uniform(n, scale);
            if name.ends_with("LayerNorm.weight") {
                v.iter_mut().for_each(|x| *x += 1.0);
            }
            let t = Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches length");
            (format!("{prefix}{name}"), t)
        })
        .collect()
}

/// A random BERT with `config`'s shapes on `device` (see [`tensors`]).
pub fn bert(config: &BertConfig, seed: u64, scale: f32, device: &Device) -> Result<Bert> {
    let vb = VarBuilder::from_tensors(tensors(config, seed, "", scale), DType::F32, device);
    Bert::load(vb, config)
}
