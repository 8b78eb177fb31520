//! Encoder forward-pass timings on the real model, in-process (no HTTP): the fused CPU path at the
//! shapes the project's findings quote (1 × 32 and 32 × 32 tokens, 32 × 128), and the candle reference
//! path for comparison, and the fused path in int8 where the CPU has VNNI (`model.precision = "int8"`).
//! `cargo bench --bench encode [-- fused] [-- short]` (`short`: 1 × 32 only, for profiling); ONNX
//! Runtime's f32 and int8 at the same shapes: benches/onnx_int8_encode.py.

mod common;

use std::time::{Duration, Instant};

fn median_ms(mut f: impl FnMut(), budget: Duration) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || times.len() < 5 {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let model = common::load_model(512);
    let budget = Duration::from_secs(3);
    // `cargo bench --bench encode -- fused` skips the candle path (for profiling the fused one).
    let fused_only = std::env::args().any(|a| a == "fused");
    let short_only = std::env::args().any(|a| a == "short");
    println!("threads: {}", rayon::current_num_threads());
    // int8 on the default projections (`model.precision = "int8"`).
    let int8: Vec<(&str, flywheel::model::CpuEncoder)> = if flywheel::model::int8::available() {
        vec![(
            "int8",
            model
                .int8_encoder(&flywheel::model::DEFAULT_INT8_PROJECTIONS)
                .unwrap()
                .unwrap(),
        )]
    } else {
        Vec::new()
    };
    for (batch, len) in [
        (1usize, 32usize),
        (1, 128),
        (1, 256),
        (8, 32),
        (32, 32),
        (32, 128),
        (8, 256),
    ] {
        if short_only && (batch, len) != (1, 32) {
            continue;
        }
        let seq: Vec<u32> = (0..len).map(|i| 1000 + (i as u32 * 37) % 20000).collect();
        let seqs: Vec<&[u32]> = (0..batch).map(|_| seq.as_slice()).collect();
        let fast = median_ms(|| drop(model.encode(&seqs).unwrap()), budget);
        let int8: String = int8
            .iter()
            .map(|(name, e)| {
                let ms = median_ms(|| drop(e.forward(&seqs).unwrap()), budget);
                format!("   {name} {ms:8.2} ms ({:.2}×)", fast / ms)
            })
            .collect();
        if fused_only {
            println!("{batch:>3} x {len:<4} fused {fast:8.2} ms{int8}");
            continue;
        }
        let reference = median_ms(|| drop(model.encode_reference(&seqs).unwrap()), budget);
        println!("{batch:>3} x {len:<4} fused {fast:8.2} ms   candle {reference:8.2} ms{int8}");
    }
}
