//! Records forward-pass timings of the real model at the batch shapes admission must price, as the JSON
//! fixture the cost model's unit test fits: single requests of several lengths, and the batches that
//! concurrent requests form.
//!
//! `cargo bench --bench batch_cost > src/infer/batch_timings.json`

mod common;

use std::time::Instant;

fn main() {
    let model = common::load_model(256);
    let shapes = [
        (1usize, 8usize),
        (1, 16),
        (1, 32),
        (1, 64),
        (1, 128),
        (1, 256),
        (16, 16),
        (32, 16),
        (64, 16),
        (128, 16),
        (32, 32),
        (16, 64),
        (16, 128),
        (8, 256),
    ];
    let mut rows = Vec::new();
    for (n, len) in shapes {
        let sequence: Vec<u32> = (0..len as u32)
            .map(|t| (t * 7919 + 1000) % 30_000)
            .collect();
        let sequences: Vec<&[u32]> = vec![sequence.as_slice(); n];
        let mut times: Vec<f64> = (0..7)
            .map(|_| {
                let t = Instant::now();
                model.encode(&sequences).expect("encodes");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        rows.push(serde_json::json!({"sequences": n, "length": len, "median_ms": times[3]}));
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let out = serde_json::json!({
        "made_by": "cargo bench --bench batch_cost",
        "model": "all-MiniLM-L6-v2",
        "cpu": cpu,
        "threads": rayon::current_num_threads(),
        "batches": rows,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&out).expect("serializes")
    );
}
