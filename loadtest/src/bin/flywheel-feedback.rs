//! Closed-loop feedback load: `--clients` clients each post batches of `--batch` distinct labelled texts to
//! `/v1/feedback` for `--seconds`, waiting for each acknowledgement before the next post. Prints one JSON line:
//! acknowledged posts and rows per second, and the acknowledgement latency's percentiles. What it measures is
//! the store's commit: the server answers 202 only after the rows are durable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;

#[derive(Parser)]
struct Args {
    /// Server base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// The task the rows are posted to (it must exist, with labels `ham` and `spam`).
    #[arg(long, default_value = "bench")]
    task: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Items per post.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// A label for the output line.
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.batch == 0 {
        bail!("--clients and --batch must be positive");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.clients)
        .map(|client| {
            let (url, task, batch, stop) = (
                format!("{}/v1/feedback", args.url),
                args.task.clone(),
                args.batch,
                stop.clone(),
            );
            std::thread::spawn(move || -> Result<(Histogram<u64>, usize)> {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(30))
                    .build();
                let mut latency = Histogram::<u64>::new(3)?;
                let mut failed = 0;
                for post in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Distinct rows: every acknowledgement is a fresh insert, not a duplicate's count.
                    let items: Vec<serde_json::Value> = (0..batch)
                        .map(|i| {
                            serde_json::json!({
                                "task": task,
                                "text": format!("feedback bench mail {client}/{post}/{i}: the quarterly report is attached"),
                                "label": if i % 2 == 0 { "ham" } else { "spam" },
                            })
                        })
                        .collect();
                    let sent = Instant::now();
                    match agent
                        .post(&url)
                        .send_json(serde_json::json!({ "items": items }))
                    {
                        Ok(r) if r.status() == 202 => {
                            latency.record(sent.elapsed().as_micros() as u64)?;
                        }
                        _ => failed += 1,
                    }
                }
                Ok((latency, failed))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new(3)?;
    let mut failed = 0;
    for w in workers {
        let (h, f) = w.join().expect("a client thread").context("a client")?;
        latency.add(h)?;
        failed += f;
    }
    let seconds = started.elapsed().as_secs_f64();
    let posts = latency.len();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "label": args.label,
            "clients": args.clients,
            "batch": args.batch,
            "seconds": seconds,
            "posts": posts,
            "failed": failed,
            "posts_per_second": posts as f64 / seconds,
            "rows_per_second": (posts as usize * args.batch) as f64 / seconds,
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
            "max_ms": latency.max() as f64 / 1000.0,
        })
    );
    Ok(())
}
