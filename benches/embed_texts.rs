//! The in-process side of the per-request overhead benchmark (`loadtest/bench-overhead.sh`): the real model,
//! no HTTP, on the same texts the HTTP client sends. Tokenization is timed with the encoder, as the server
//! does both for a request. Prints one JSON line per batch size:
//! - batch 1: each text alone, in order (median and P99 per text), the floor under HTTP at concurrency 1;
//! - batch N: consecutive texts packed N at a time, as the batcher packs concurrent requests (texts/s).
//!
//! `cargo bench --bench embed_texts -- --texts FILE [--batches 1,32] [--duration 10]`

mod common;

use std::time::{Duration, Instant};

use flywheel::model::{pooling, Model};

fn read_texts(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("--texts names a readable file")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) => v["text"].as_str().unwrap_or(l).to_owned(),
            Err(_) => l.to_owned(),
        })
        .collect()
}

fn embed(model: &Model, texts: &[String]) {
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| model.tokenizer.encode(t).expect("tokenizes"))
        .collect();
    let sequences: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let packed = model.encode(&sequences).expect("encodes");
    for i in 0..sequences.len() {
        let mut v = pooling::mean_of_rows(packed.sequence(i), packed.width);
        pooling::l2_normalize(&mut v);
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let texts = read_texts(&arg("--texts").expect("--texts FILE"));
    let duration = Duration::from_secs_f64(
        arg("--duration").map_or(10.0, |d| d.parse().expect("--duration in seconds")),
    );
    let batches: Vec<usize> = arg("--batches")
        .unwrap_or_else(|| "1,32".to_owned())
        .split(',')
        .map(|b| b.parse().expect("--batches as numbers"))
        .collect();
    let model = common::load_model(256);
    for batch in batches {
        let chunk = |i: usize| -> Vec<String> {
            (0..batch)
                .map(|j| texts[(i * batch + j) % texts.len()].clone())
                .collect()
        };
        for i in 0..3 {
            embed(&model, &chunk(i));
        }
        let mut times = Vec::new();
        let started = Instant::now();
        let mut i = 0;
        while started.elapsed() < duration {
            let chunk = chunk(i);
            let t = Instant::now();
            embed(&model, &chunk);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            i += 1;
        }
        let busy: f64 = times.iter().sum::<f64>() / 1e3;
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        println!(
            "{}",
            serde_json::json!({
                "label": "flywheel-in-process",
                "batch": batch,
                "calls": times.len(),
                "texts_per_second": (times.len() * batch) as f64 / busy,
                "p50_ms": at(0.5),
                "p99_ms": at(0.99),
            })
        );
    }
}
