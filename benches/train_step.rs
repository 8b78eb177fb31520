//! One training step (forward, backward, AdamW) on the real model at 16 × L tokens (L = 48 unless given):
//! LoRA r=8, alpha 16, dropout 0.1 on query+value with a 2-label head, and full fine-tuning (also once with
//! candle's composed AdamW in place of the trainer's fused one). The figures to
//! compare with PEFT and PyTorch (benches/pytorch_train_step.py, same shapes).
//! `cargo bench --bench train_step [-- L]`.

mod common;

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use flywheel::model::adapter::Target;
use flywheel::trainer::full::FullTrainable;
use flywheel::trainer::lora::{cross_entropy, LoraTrainable};
use flywheel::trainer::optim::FusedAdamW;
use flywheel::trainer::train::flush_denormals;

/// Medians over steps 3 to 10 of optimizer `O` (AdamW) at `lr` on `vars`, the loss from `logits`.
struct Timing {
    /// Milliseconds of a whole step.
    step: f64,
    /// Of its forward pass (logits and loss), backward pass and optimizer update.
    parts: [f64; 3],
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn median_step<O: Optimizer<Config = ParamsAdamW>>(
    vars: Vec<Var>,
    lr: f64,
    targets: &Tensor,
    logits: impl Fn() -> Tensor,
) -> Timing {
    let mut opt = O::new(
        vars,
        ParamsAdamW {
            lr,
            weight_decay: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let (mut steps, mut parts) = (Vec::new(), [Vec::new(), Vec::new(), Vec::new()]);
    for i in 0..10 {
        let start = Instant::now();
        let loss = cross_entropy(&logits(), targets, 0.1, None).unwrap();
        let forward = ms(start);
        let t = Instant::now();
        let grads = loss.backward().unwrap();
        let backward = ms(t);
        let t = Instant::now();
        opt.step(&grads).unwrap();
        let update = ms(t);
        if i >= 2 {
            steps.push(ms(start));
            for (all, one) in parts.iter_mut().zip([forward, backward, update]) {
                all.push(one);
            }
        }
    }
    Timing {
        step: median(steps),
        parts: parts.map(median),
    }
}

fn report(what: &str, timing: &Timing) {
    let [f, b, u] = timing.parts;
    println!(
        "{what}: median {:.0} ms over 8 steps (forward {f:.0}, backward {b:.0}, update {u:.0})",
        timing.step
    );
}

fn main() {
    let len: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(48);
    let model = common::load_model(256);
    flush_denormals();
    let _heap = flywheel::heap::TrainingHeap::enter();
    let batch = 16usize;
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
    .unwrap()
    .with_dropout(0.1, 0);
    let lora = match model.bert.pooler {
        Some(_) => lora,
        None => lora
            .with_own_pooler(model.config.hidden_size, 0, &Device::Cpu)
            .unwrap(),
    };
    let timing = median_step::<FusedAdamW>(lora.vars(), 2e-3, &targets, || {
        lora.logits(&model.bert, &ids, &mask).unwrap()
    });
    report(&format!("flywheel LoRA step {batch} x {len}"), &timing);
    let full = FullTrainable::new(&model.bert, 2, 0).unwrap();
    let timing = median_step::<FusedAdamW>(full.vars(), 5e-5, &targets, || {
        full.logits(&ids, &mask).unwrap()
    });
    report(
        &format!("flywheel full fine-tuning step {batch} x {len}"),
        &timing,
    );
    let timing = median_step::<AdamW>(full.vars(), 5e-5, &targets, || {
        full.logits(&ids, &mask).unwrap()
    });
    report("  the same with candle's composed AdamW", &timing);
}
