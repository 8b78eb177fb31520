//! One LoRA training step (forward, backward, AdamW) on the real model at 16 × 48 tokens, r=8 on
//! query+value with a 2-label head: the figure to compare with PEFT (benches/pytorch_train_step.py).
//! `cargo bench --bench train_step`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use flywheel::model::lora::Target;
use flywheel::model::{LoadOptions, Model};
use flywheel::trainer::lora::{cross_entropy, LoraTrainable};
use flywheel::trainer::train::flush_denormals;

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    let model = Model::load(
        &dir,
        &LoadOptions {
            max_length: 256,
            device: Device::Cpu,
        },
    )
    .expect("run models/fetch.sh");
    flush_denormals();
    let _heap = flywheel::heap::TrainingHeap::enter();
    let (batch, len) = (16usize, 48usize);
    let ids: Vec<u32> = (0..batch * len)
        .map(|i| 1000 + (i as u32 * 37) % 20000)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, len), &Device::Cpu).unwrap();
    let mask = Tensor::ones((batch, len), candle_core::DType::U8, &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(
        (0..batch as u32).map(|i| i % 2).collect::<Vec<_>>(),
        batch,
        &Device::Cpu,
    )
    .unwrap();
    let lora = LoraTrainable::new(
        &model.config,
        &[Target::Query, Target::Value],
        8,
        16.0,
        2,
        0,
        &Device::Cpu,
    )
    .unwrap();
    let mut opt = AdamW::new(
        lora.vars(),
        ParamsAdamW {
            lr: 2e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    let mut times = Vec::new();
    for i in 0..8 {
        let t = Instant::now();
        let loss = cross_entropy(
            &lora.logits(&model.bert, &ids, &mask).unwrap(),
            &targets,
            0.1,
            None,
        )
        .unwrap();
        opt.backward_step(&loss).unwrap();
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "flywheel LoRA step {batch} x {len}: median {:.0} ms over {} steps",
        times[times.len() / 2],
        times.len()
    );
}
