//! `flywheel-loadtest`: drives a running Flywheel over HTTP and reports throughput and latency
//! percentiles (HdrHistogram).
//!
//! Embeds through `/v1/embed`, or with `--task` classifies through `/v1/predict`, optionally pinning
//! `--adapters` round-robin. Closed loop (the default): `--concurrency` workers each send one request, wait for
//! the answer, and send the next, for `--duration` seconds after a `--warmup`. Open loop (`--rate R`): requests
//! are due at a constant R per second whatever the answers do, up to `--concurrency` in flight, and each
//! latency counts from when the request was due, so a slow server cannot hide its queue (no coordinated
//! omission). With `--task` and `--feedback F`, a share F of the answered requests gets its text's true label
//! (a `"label"` field in the JSONL) posted as feedback naming the request, `--feedback-delay` seconds later,
//! as users correcting predictions would. Every request is bounded by a timeout and the run stops by
//! itself; it only ever talks to the URL given (loopback in every documented use).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use flywheel_loadtest::delayed::DelayedFeedback;
use flywheel_loadtest::rng::Rng;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Load generator for Flywheel's HTTP API.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Base URL of the server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// Texts to send: JSONL with a "text" field per line, or plain text, one per line.
    #[arg(long)]
    texts: PathBuf,
    /// Concurrent workers (closed loop), or most requests in flight (open loop).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Open loop: requests per second, due on a fixed schedule; 0 runs closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Texts per request.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of unmeasured load first.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Append the summary as a CSV row to this file (header written when the file is new).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Classify with this task through /v1/predict instead of embedding through /v1/embed.
    #[arg(long)]
    task: Option<String>,
    /// With --task: comma-separated adapter ids or aliases, pinned round-robin, one per request.
    #[arg(long, value_delimiter = ',')]
    adapters: Vec<String>,
    /// A label for this run in the outputs.
    #[arg(long, default_value = "flywheel")]
    label: String,
    /// With --task: share of answered requests whose true label is posted as feedback.
    #[arg(long, default_value_t = 0.0)]
    feedback: f64,
    /// Seconds between a prediction and its feedback.
    #[arg(long, default_value_t = 5.0)]
    feedback_delay: f64,
}

/// What one run measured.
#[derive(Serialize, Debug)]
struct Summary {
    label: String,
    concurrency: usize,
    /// Open-loop rate (requests/s), 0 for closed loop.
    rate: f64,
    batch: usize,
    seconds: f64,
    requests: u64,
    /// Failed requests other than `shed` ones.
    errors: u64,
    /// Requests the server refused with 429 (load shedding); not in the latency percentiles.
    shed: u64,
    texts_per_second: f64,
    requests_per_second: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    feedback_accepted: usize,
    feedback_failed: usize,
}

/// A text to send, with its true label when the file gives one.
struct Text {
    text: String,
    label: Option<String>,
}

fn read_texts(path: &PathBuf) -> anyhow::Result<Vec<Text>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut texts = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let (text, label) = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(serde_json::Value::Object(o)) => {
                let field = |f: &str| o.get(f).and_then(|t| t.as_str()).map(str::to_owned);
                (field("text").unwrap_or_default(), field("label"))
            }
            _ => (line, None),
        };
        if !text.trim().is_empty() {
            texts.push(Text { text, label });
        }
    }
    if texts.is_empty() {
        bail!("{} holds no texts", path.display());
    }
    Ok(texts)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let texts = Arc::new(read_texts(&args.texts)?);
    if args.feedback > 0.0 && (args.task.is_none() || texts.iter().any(|t| t.label.is_none())) {
        bail!("--feedback needs --task and a \"label\" on every line of --texts");
    }
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs_f64(args.timeout))
        .max_idle_connections_per_host(args.concurrency.max(1))
        .build();
    let endpoint = if args.task.is_some() {
        "predict"
    } else {
        "embed"
    };
    let url = format!("{}/v1/{endpoint}", args.url.trim_end_matches('/'));
    let task = args.task.clone();
    let adapters = Arc::new(args.adapters.clone());
    let feedback = Arc::new(DelayedFeedback::start(
        agent.clone(),
        &args.url,
        Duration::from_secs_f64(args.feedback_delay),
    ));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        120_000_000,
        3,
    )?));
    let errors = Arc::new(AtomicUsize::new(0));
    let shed = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    // Open loop: a scheduler hands out due times at the constant rate; idle workers take them in order.
    let due: Option<Arc<Mutex<std::sync::mpsc::Receiver<Instant>>>> = if args.rate > 0.0 {
        let (tx, rx) = std::sync::mpsc::channel::<Instant>();
        let (stop, period) = (stop.clone(), Duration::from_secs_f64(1.0 / args.rate));
        std::thread::spawn(move || {
            let mut at = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if tx.send(at).is_err() {
                    break;
                }
                at += period;
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
        });
        Some(Arc::new(Mutex::new(rx)))
    } else {
        None
    };

    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (agent, url, texts) = (agent.clone(), url.clone(), texts.clone());
            let (task, adapters) = (task.clone(), adapters.clone());
            let (measuring, stop, next) = (measuring.clone(), stop.clone(), next.clone());
            let (histogram, errors, requests) =
                (histogram.clone(), errors.clone(), requests.clone());
            let shed = shed.clone();
            let due = due.clone();
            let batch = args.batch.max(1);
            let (feedback, share) = (feedback.clone(), args.feedback);
            std::thread::spawn(move || {
                let mut local =
                    Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("valid bounds");
                while !stop.load(Ordering::Relaxed) {
                    let scheduled = match &due {
                        None => None,
                        Some(rx) => {
                            let next_due = rx
                                .lock()
                                .expect("schedule lock")
                                .recv_timeout(Duration::from_millis(100));
                            match next_due {
                                Ok(at) => Some(at),
                                Err(_) => continue,
                            }
                        }
                    };
                    let start = next.fetch_add(batch, Ordering::Relaxed);
                    let inputs: Vec<&str> = (start..start + batch)
                        .map(|i| texts[i % texts.len()].text.as_str())
                        .collect();
                    let body = match &task {
                        None => serde_json::json!({ "inputs": inputs }),
                        Some(t) if adapters.is_empty() => {
                            serde_json::json!({ "task": t, "inputs": inputs })
                        }
                        Some(t) => {
                            let adapter = &adapters[(start / batch) % adapters.len()];
                            serde_json::json!({ "task": t, "inputs": inputs, "adapter": adapter })
                        }
                    };
                    let sent = scheduled.unwrap_or_else(Instant::now);
                    let answer = agent.post(&url).send_json(body);
                    let ok = answer.is_ok();
                    let refused = matches!(answer, Err(ureq::Error::Status(429, _)));
                    if share > 0.0 && chosen(start, share) {
                        let request_id = answer
                            .ok()
                            .and_then(|r| r.into_json::<serde_json::Value>().ok())
                            .and_then(|v| v["request_id"].as_str().map(str::to_owned));
                        if let Some(request_id) = request_id {
                            let items: Vec<serde_json::Value> = (start..start + batch)
                                .enumerate()
                                .map(|(index, i)| {
                                    serde_json::json!({
                                        "request_id": request_id,
                                        "index": index,
                                        "label": texts[i % texts.len()].label,
                                    })
                                })
                                .collect();
                            feedback.post_later(serde_json::json!({ "items": items }));
                        }
                    }
                    let micros = sent.elapsed().as_micros() as u64;
                    if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                        requests.fetch_add(1, Ordering::Relaxed);
                        if ok {
                            let _ = local.record(micros.max(1));
                        } else if refused {
                            shed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                histogram
                    .lock()
                    .expect("histogram lock")
                    .add(&local)
                    .expect("same bounds");
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.duration));
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?;
    }

    let feedback = Arc::try_unwrap(feedback)
        .map_err(|_| anyhow::anyhow!("a worker still holds the feedback poster"))?
        .finish();
    let h = histogram.lock().expect("histogram lock");
    let done = requests.load(Ordering::Relaxed) as u64;
    let errors = errors.load(Ordering::Relaxed) as u64;
    let shed = shed.load(Ordering::Relaxed) as u64;
    let ok = done - errors - shed;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let summary = Summary {
        label: args.label.clone(),
        concurrency: args.concurrency,
        rate: args.rate,
        batch: args.batch,
        seconds,
        requests: done,
        errors,
        shed,
        texts_per_second: (ok * args.batch as u64) as f64 / seconds,
        requests_per_second: ok as f64 / seconds,
        p50_ms: ms(0.5),
        p95_ms: ms(0.95),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1000.0,
        feedback_accepted: feedback.accepted,
        feedback_failed: feedback.failed,
    };
    println!("{}", serde_json::to_string(&summary)?);
    if let Some(path) = &args.csv {
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if new {
            writeln!(f, "label,concurrency,batch,seconds,requests,errors,texts_per_second,requests_per_second,p50_ms,p95_ms,p99_ms,max_ms,rate,feedback_accepted,feedback_failed,shed")?;
        }
        let s = &summary;
        writeln!(
            f,
            "{},{},{},{:.2},{},{},{:.2},{:.2},{:.3},{:.3},{:.3},{:.3},{},{},{},{}",
            s.label,
            s.concurrency,
            s.batch,
            s.seconds,
            s.requests,
            s.errors,
            s.texts_per_second,
            s.requests_per_second,
            s.p50_ms,
            s.p95_ms,
            s.p99_ms,
            s.max_ms,
            s.rate,
            s.feedback_accepted,
            s.feedback_failed,
            s.shed
        )?;
    }
    if errors > 0 {
        eprintln!("warning: {errors} requests failed");
    }
    if shed > 0 {
        eprintln!("note: the server shed {shed} requests with 429");
    }
    Ok(())
}

/// Whether request `i` gets feedback: a fixed pseudo-random share of the requests, the same on every run.
fn chosen(i: usize, share: f64) -> bool {
    Rng(i as u64).unit() < share
}
