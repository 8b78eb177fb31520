//! `flywheel-scenario`: the drift-recovery scenario against a running Flywheel (`loadtest/drift-scenario.sh`
//! starts one with `loadtest/scenario.toml` and runs this).
//!
//! 1. Bootstrap: create the `spam` task, post labelled mail from the older corpus (spam-1 + easy-ham-1) as
//!    feedback, train the first generation and wait for it.
//! 2. Old stream: predict held-back mail of the same groups at a steady rate; the server takes its drift
//!    reference from these predictions.
//! 3. New stream: predict mail of the later corpus (spam-2 + easy-ham-2) at the same rate. For a share of the
//!    requests the true label is posted as feedback after a delay, naming the request, as users clicking
//!    "spam" / "not spam" would. The server's own policies must notice the drift, train, canary and promote;
//!    the stream goes on for a while after the promotion (or until the time limit).
//! 4. Evaluation: held-out mail of both corpora, never streamed, predicted by the bootstrap generation and by
//!    the final stable one (pinned).
//!
//! Writes `timeline.csv` (one row per window), `timeline.png` and `summary.json` into `--out`.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use flywheel_loadtest::chart::{self, Event, Window};
use flywheel_loadtest::delayed::DelayedFeedback;
use flywheel_loadtest::rng::Rng;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// The drift-recovery scenario.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Base URL of the server.
    #[arg(long)]
    url: String,
    /// Directory of the SpamAssassin JSONL files (datasets/fetch-spamassassin.sh).
    #[arg(long, default_value = "datasets/spamassassin")]
    data: PathBuf,
    /// Where the timeline, chart and summary go.
    #[arg(long, default_value = "target/scenario")]
    out: PathBuf,
    /// Predict requests per second (open loop).
    #[arg(long, default_value_t = 6.0)]
    rate: f64,
    /// Share of streamed requests whose true label is posted as feedback.
    #[arg(long, default_value_t = 0.5)]
    feedback: f64,
    /// Seconds between a prediction and its feedback.
    #[arg(long, default_value_t = 5.0)]
    feedback_delay: f64,
    /// Seconds per timeline window.
    #[arg(long, default_value_t = 10.0)]
    window: f64,
    /// Mails per class the bootstrap generation trains on.
    #[arg(long, default_value_t = 150)]
    bootstrap: usize,
    /// Hyperparameters of the bootstrap job (JSON object, as POST /v1/train takes them).
    #[arg(long, default_value = r#"{"epochs": 3, "max_length": 64}"#)]
    bootstrap_params: String,
    /// Seconds of old-corpus traffic before the later corpus starts.
    #[arg(long, default_value_t = 60.0)]
    old_seconds: f64,
    /// Seconds of traffic after the first promotion.
    #[arg(long, default_value_t = 90.0)]
    after_seconds: f64,
    /// Give up streaming after this many seconds (the scenario then reports what it saw).
    #[arg(long, default_value_t = 660.0)]
    max_seconds: f64,
    /// Held-out mails per group for the final evaluation.
    #[arg(long, default_value_t = 150)]
    holdout: usize,
    /// Seed of the shuffles and the feedback choice.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// A TrueType font for the chart (default: the first of the usual system fonts).
    #[arg(long)]
    font: Option<PathBuf>,
}

#[derive(Clone)]
struct Mail {
    text: String,
    label: String,
}

fn read_group(dir: &Path, group: &str, rng: &mut Rng) -> anyhow::Result<Vec<Mail>> {
    let path = dir.join(format!("{group}.jsonl"));
    let file = std::fs::File::open(&path).with_context(|| {
        format!(
            "opening {} (run datasets/fetch-spamassassin.sh)",
            path.display()
        )
    })?;
    let mut mails = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let row: Value = serde_json::from_str(&line?)?;
        let (Some(text), Some(label)) = (row["text"].as_str(), row["label"].as_str()) else {
            bail!("{}: a row without text or label", path.display());
        };
        if !text.trim().is_empty() {
            mails.push(Mail {
                text: text.to_owned(),
                label: label.to_owned(),
            });
        }
    }
    // Neighbouring mails share threads and topics: shuffle so every split is a sample of the group.
    rng.shuffle(&mut mails);
    Ok(mails)
}

/// Ham and spam alternating.
fn interleave(a: &[Mail], b: &[Mail]) -> Vec<Mail> {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| [x.clone(), y.clone()])
        .collect()
}

struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        let result = match body {
            Some(b) => request.send_json(b.clone()),
            None => request.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e).with_context(|| format!("{method} {path}")),
        };
        let status = response.status();
        let text = response.into_string()?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.call("GET", path, None)
    }

    fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.call("POST", path, Some(body))
    }
}

/// One streamed prediction.
struct Done {
    /// Seconds since the stream started, when the request was due.
    at: f64,
    micros: u64,
    correct: Option<bool>,
    arm: String,
    training: bool,
    new_corpus: bool,
}

/// What the poller learns about jobs and rollouts.
#[derive(Default)]
struct Watch {
    events: Vec<Event>,
    jobs_seen: BTreeSet<String>,
    jobs_done: BTreeSet<String>,
    decisions_seen: usize,
    rollout_id: String,
    candidate_share: f64,
    drift_seen: bool,
    first_promotion: Option<f64>,
    /// Jobs started by the server's own policy after the later corpus began.
    auto_jobs: Vec<Value>,
    rollouts: Vec<Value>,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn wait_for_job(client: &Client, id: &str) -> anyhow::Result<Value> {
    loop {
        let (_, job) = client.get(&format!("/v1/jobs/{id}"))?;
        match job["state"].as_str() {
            Some("queued") | Some("running") => std::thread::sleep(Duration::from_secs(1)),
            Some("succeeded") => return Ok(job),
            _ => bail!("job {id} ended badly: {job}"),
        }
    }
}

/// Accuracy of `generation` (pinned) on `mails`.
fn accuracy(client: &Client, generation: &str, mails: &[Mail]) -> anyhow::Result<f64> {
    let mut right = 0;
    for chunk in mails.chunks(16) {
        let inputs: Vec<&str> = chunk.iter().map(|m| m.text.as_str()).collect();
        let (status, body) = client.post(
            "/v1/predict",
            &json!({"task": "spam", "inputs": inputs, "adapter": generation}),
        )?;
        if status != 200 {
            bail!("predict with {generation} answered {status}: {body}");
        }
        let predictions = body["predictions"].as_array().context("no predictions")?;
        right += predictions
            .iter()
            .zip(chunk)
            .filter(|(p, m)| p["label"].as_str() == Some(m.label.as_str()))
            .count();
    }
    Ok(right as f64 / mails.len().max(1) as f64)
}

/// An empty latency histogram in microseconds (1 µs to 120 s, 3 significant digits).
fn latencies() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 120_000_000, 3)?)
}

fn p99_ms(h: &Histogram<u64>) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1000.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let mut rng = Rng(args.seed);
    let ham1 = read_group(&args.data, "easy-ham-1", &mut rng)?;
    let spam1 = read_group(&args.data, "spam-1", &mut rng)?;
    let ham2 = read_group(&args.data, "easy-ham-2", &mut rng)?;
    let spam2 = read_group(&args.data, "spam-2", &mut rng)?;
    let (b, h) = (args.bootstrap, args.holdout);
    if spam1.len() < b + h + 50 || spam2.len() < h + 100 {
        bail!("not enough mail for --bootstrap {b} and --holdout {h}");
    }
    // Held-out sets come first, so the streams never touch them.
    let old_holdout = interleave(&ham1[..h], &spam1[..h]);
    let new_holdout = interleave(&ham2[..h], &spam2[..h]);
    let bootstrap = interleave(&ham1[h..h + b], &spam1[h..h + b]);
    let old_stream = interleave(&ham1[h + b..], &spam1[h + b..]);
    let new_stream = interleave(&ham2[h..], &spam2[h..]);

    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .max_idle_connections_per_host(32)
        .build();
    let client = Arc::new(Client {
        agent: agent.clone(),
        base: args.url.trim_end_matches('/').to_owned(),
    });

    // 1. Bootstrap.
    let started = Instant::now();
    let (status, body) = client.post(
        "/v1/tasks",
        &json!({"name": "spam", "labels": ["ham", "spam"]}),
    )?;
    if status != 201 {
        bail!("creating the task answered {status}: {body} (the scenario wants a fresh data directory)");
    }
    let items: Vec<Value> = bootstrap
        .iter()
        .map(|m| json!({"task": "spam", "text": m.text, "label": m.label}))
        .collect();
    let (status, body) = client.post("/v1/feedback", &json!({ "items": items }))?;
    if status != 202 {
        bail!("bootstrap feedback answered {status}: {body}");
    }
    let mut params: Value =
        serde_json::from_str(&args.bootstrap_params).context("--bootstrap-params")?;
    params["task"] = json!("spam");
    let (status, body) = client.post("/v1/train", &params)?;
    if status != 202 {
        bail!("bootstrap training answered {status}: {body}");
    }
    let bootstrap_job = wait_for_job(&client, body["job_id"].as_str().context("no job_id")?)?;
    let bootstrap_generation = bootstrap_job["adapter"]
        .as_str()
        .context("no adapter")?
        .to_owned();
    let bootstrap_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "bootstrap generation {bootstrap_generation}: validation macro-F1 {} in {bootstrap_seconds:.0} s",
        bootstrap_job["val"]["macro_f1"]
    );

    // 2 and 3. The streams.
    let stream_start = Instant::now();
    let stream_start_unix = now_unix();
    let switch_at = Duration::from_secs_f64(args.old_seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let training = Arc::new(AtomicBool::new(false));
    let done: Arc<Mutex<Vec<Done>>> = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicUsize::new(0));
    let feedback = Arc::new(DelayedFeedback::start(
        agent.clone(),
        &client.base,
        Duration::from_secs_f64(args.feedback_delay),
    ));
    let (due_tx, due_rx) = mpsc::channel::<(Instant, usize)>();
    let due_rx = Arc::new(Mutex::new(due_rx));
    let scheduler = {
        let stop = stop.clone();
        let period = Duration::from_secs_f64(1.0 / args.rate);
        std::thread::spawn(move || {
            let mut at = Instant::now();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if due_tx.send((at, i)).is_err() {
                    break;
                }
                i += 1;
                at += period;
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
        })
    };
    let streams = Arc::new((old_stream, new_stream));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (client, due_rx, stop) = (client.clone(), due_rx.clone(), stop.clone());
            let (done, failed, training) = (done.clone(), failed.clone(), training.clone());
            let (feedback, streams) = (feedback.clone(), streams.clone());
            let (share, seed) = (args.feedback, args.seed);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let next = due_rx
                        .lock()
                        .expect("schedule lock")
                        .recv_timeout(Duration::from_millis(100));
                    let Ok((due, i)) = next else { continue };
                    let new_corpus = due.duration_since(stream_start) >= switch_at;
                    let stream = if new_corpus { &streams.1 } else { &streams.0 };
                    let mail = &stream[i % stream.len()];
                    let was_training = training.load(Ordering::Relaxed);
                    let body = json!({
                        "task": "spam",
                        "inputs": [mail.text],
                        // Each simulated user keeps their arm for the whole rollout.
                        "routing_key": format!("user-{}", i % 400),
                    });
                    let answer = client.post("/v1/predict", &body);
                    let micros = due.elapsed().as_micros() as u64;
                    let at = due.duration_since(stream_start).as_secs_f64();
                    let (correct, arm) = match answer {
                        Ok((200, v)) => {
                            let label = v["predictions"][0]["label"].as_str().unwrap_or_default();
                            let mut pick =
                                Rng(seed ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
                            if new_corpus && pick.unit() < share {
                                feedback.post_later(json!({
                                    "request_id": v["request_id"],
                                    "label": mail.label,
                                }));
                            }
                            (
                                Some(label == mail.label),
                                v["arm"].as_str().unwrap_or("").to_owned(),
                            )
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            (None, String::new())
                        }
                    };
                    done.lock().expect("done lock").push(Done {
                        at,
                        micros,
                        correct,
                        arm,
                        training: was_training,
                        new_corpus,
                    });
                }
            })
        })
        .collect();

    // The poller: jobs every second, drift and rollouts at each window's end.
    let mut watch = Watch::default();
    let mut windows: Vec<Window> = Vec::new();
    let mut rows: Vec<String> = Vec::new();
    let mut window_training = false;
    let mut window_start = 0.0;
    let mut switched = false;
    let mut all: Vec<Done> = Vec::new();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let t = stream_start.elapsed().as_secs_f64();
        if !switched && t >= args.old_seconds {
            switched = true;
            watch.events.push(Event {
                at: args.old_seconds,
                label: "later corpus starts".to_owned(),
            });
        }
        let (_, jobs) = client.get("/v1/jobs?task=spam")?;
        let mut running = false;
        for job in jobs.as_array().into_iter().flatten() {
            let id = job["id"].as_str().unwrap_or_default().to_owned();
            let state = job["state"].as_str().unwrap_or_default();
            running |= matches!(state, "queued" | "running");
            if (job["created_at"].as_f64().unwrap_or(0.0)) < stream_start_unix.floor() {
                continue;
            }
            if watch.jobs_seen.insert(id.clone()) {
                watch.events.push(Event {
                    at: t,
                    label: "training starts".to_owned(),
                });
            }
            if matches!(state, "succeeded" | "failed" | "cancelled") && watch.jobs_done.insert(id) {
                watch.events.push(Event {
                    at: t,
                    label: format!("training {state}"),
                });
                watch.auto_jobs.push(job.clone());
            }
        }
        training.store(running, Ordering::Relaxed);
        window_training |= running;

        if t - window_start >= args.window {
            let (status, drift) = client.get("/v1/drift/spam")?;
            let last_drift = if status == 200 {
                let distance = drift["signals"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["method"] == "mean_distance")
                    .and_then(|s| s["score"].as_f64());
                let detected = drift["detected"].as_bool().unwrap_or(false);
                if detected && !watch.drift_seen {
                    watch.drift_seen = true;
                    watch.events.push(Event {
                        at: t,
                        label: "drift detected".to_owned(),
                    });
                }
                (distance, detected)
            } else {
                (None, false)
            };
            let (status, rollout) = client.get("/v1/rollouts/spam")?;
            if status == 200 {
                let id = rollout["id"].as_str().unwrap_or_default().to_owned();
                if id != watch.rollout_id {
                    watch.rollout_id = id;
                    watch.decisions_seen = 0;
                    watch.rollouts.push(Value::Null);
                }
                if let Some(last) = watch.rollouts.last_mut() {
                    *last = rollout.clone();
                }
                let decisions = rollout["decisions"].as_array().cloned().unwrap_or_default();
                for d in decisions.iter().skip(watch.decisions_seen) {
                    let action = d["action"].as_str().unwrap_or_default().to_owned();
                    if action == "promote" && watch.first_promotion.is_none() {
                        watch.first_promotion = Some(t);
                    }
                    watch.events.push(Event {
                        at: t,
                        label: match action.as_str() {
                            "start" => format!(
                                "canary at {:.0} %",
                                d["traffic"].as_f64().unwrap_or(0.0) * 100.0
                            ),
                            other => other.to_owned(),
                        },
                    });
                }
                watch.decisions_seen = decisions.len();
                watch.candidate_share = if rollout["phase"] == "active" {
                    rollout["traffic"].as_f64().unwrap_or(0.0)
                } else {
                    0.0
                };
            }
            let mut batch: Vec<Done> = std::mem::take(&mut *done.lock().expect("done lock"));
            batch.sort_by(|a, b| a.at.total_cmp(&b.at));
            let mut h = latencies()?;
            let (mut right, mut judged, mut errors) = (0usize, 0usize, 0usize);
            let mut candidate_requests = 0;
            for d in &batch {
                match d.correct {
                    Some(c) => {
                        judged += 1;
                        right += usize::from(c);
                        h.record(d.micros.max(1))?;
                    }
                    None => errors += 1,
                }
                candidate_requests += usize::from(d.arm == "candidate");
            }
            let window = Window {
                start: window_start,
                end: t,
                accuracy: (judged > 0).then(|| right as f64 / judged as f64),
                p99_ms: p99_ms(&h),
                drift: last_drift.0,
                drift_detected: last_drift.1,
                candidate_share: watch.candidate_share,
                training: window_training,
            };
            let events_here: Vec<&str> = watch
                .events
                .iter()
                .filter(|e| e.at > window_start && e.at <= t)
                .map(|e| e.label.as_str())
                .collect();
            rows.push(format!(
                "{:.1},{:.1},{},{},{},{},{},{},{},{:.2},{},{},\"{}\"",
                window.start,
                window.end,
                if switched { "later" } else { "older" },
                batch.len(),
                errors,
                window.accuracy.map_or(String::new(), |a| format!("{a:.4}")),
                window.p99_ms.map_or(String::new(), |p| format!("{p:.1}")),
                window.drift.map_or(String::new(), |d| format!("{d:.4}")),
                u8::from(window.drift_detected),
                window.candidate_share,
                candidate_requests,
                u8::from(window.training),
                events_here.join("; "),
            ));
            eprintln!("{}", rows.last().map_or("", String::as_str));
            windows.push(window);
            all.extend(batch);
            window_start = t;
            window_training = running;
        }
        let after = watch
            .first_promotion
            .is_some_and(|p| t - p >= args.after_seconds);
        if after || t >= args.max_seconds {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = scheduler.join();
    for w in workers {
        let _ = w.join();
    }
    all.extend(std::mem::take(&mut *done.lock().expect("done lock")));
    let stream_seconds = stream_start.elapsed().as_secs_f64();
    let feedback = Arc::try_unwrap(feedback)
        .map_err(|_| anyhow::anyhow!("feedback poster still shared"))?
        .finish();

    // 4. Evaluation.
    let (_, task) = client.get("/v1/tasks/spam")?;
    let final_generation = task["stable"]
        .as_str()
        .context("the task has no stable generation")?
        .to_owned();
    let old_before = accuracy(&client, &bootstrap_generation, &old_holdout)?;
    let new_before = accuracy(&client, &bootstrap_generation, &new_holdout)?;
    let old_after = accuracy(&client, &final_generation, &old_holdout)?;
    let new_after = accuracy(&client, &final_generation, &new_holdout)?;

    // Latency of the later-corpus stream, with and without a training job running.
    let mut idle = latencies()?;
    let mut busy = latencies()?;
    let (mut before_right, mut before_n, mut after_right, mut after_n) = (0, 0, 0, 0);
    let first_training = watch
        .events
        .iter()
        .find(|e| e.label == "training starts")
        .map_or(f64::MAX, |e| e.at);
    for d in all.iter().filter(|d| d.new_corpus) {
        if let Some(c) = d.correct {
            if d.training {
                busy.record(d.micros.max(1))?;
            } else {
                idle.record(d.micros.max(1))?;
            }
            match watch.first_promotion {
                Some(p) if d.at >= p => {
                    after_right += usize::from(c);
                    after_n += 1;
                }
                _ if d.at < first_training => {
                    before_right += usize::from(c);
                    before_n += 1;
                }
                _ => {}
            }
        }
    }
    let ratio = |a: usize, n: usize| (n > 0).then(|| a as f64 / n as f64);
    let summary = json!({
        "bootstrap": {
            "generation": bootstrap_generation,
            "train_mails": bootstrap.len(),
            "val_macro_f1": bootstrap_job["val"]["macro_f1"],
            "seconds": bootstrap_seconds,
        },
        "stream": {
            "seconds": stream_seconds,
            "rate": args.rate,
            "requests": all.len(),
            "failed_requests": failed.load(Ordering::Relaxed),
            "feedback_accepted": feedback.accepted,
            "feedback_failed": feedback.failed,
            "later_corpus_accuracy_before_training": ratio(before_right, before_n),
            "later_corpus_accuracy_after_promotion": ratio(after_right, after_n),
            "p99_ms_without_training": p99_ms(&idle),
            "p99_ms_during_training": p99_ms(&busy),
            "requests_during_training": busy.len(),
        },
        "events": watch.events.iter().map(|e| json!({"at": e.at, "event": e.label})).collect::<Vec<_>>(),
        "jobs": watch.auto_jobs,
        "rollouts": watch.rollouts,
        "holdout": {
            "mails_per_corpus": old_holdout.len(),
            "final_generation": final_generation,
            "older_corpus": {"bootstrap": old_before, "final": old_after, "change_points": (old_after - old_before) * 100.0},
            "later_corpus": {"bootstrap": new_before, "final": new_after, "change_points": (new_after - new_before) * 100.0},
        },
        "total_seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    let mut csv = std::fs::File::create(args.out.join("timeline.csv"))?;
    writeln!(
        csv,
        "start_s,end_s,corpus,requests,errors,accuracy,p99_ms,drift_mean_distance,drift_detected,candidate_share,candidate_requests,training,events"
    )?;
    for row in &rows {
        writeln!(csv, "{row}")?;
    }
    let chart_path = args.out.join("timeline.png");
    let title = format!(
        "Flywheel drift recovery: later-corpus accuracy {} -> {} (held out), {} req/s",
        pct(new_before),
        pct(new_after),
        args.rate
    );
    match chart::load_font(args.font.as_deref())
        .and_then(|()| chart::draw(&chart_path, &title, &windows, &watch.events))
    {
        Ok(()) => eprintln!("chart: {}", chart_path.display()),
        Err(e) => eprintln!("warning: no chart ({e:#}); the CSV has the same figures"),
    }
    println!("{}", serde_json::to_string_pretty(&summary["holdout"])?);
    println!("{}", serde_json::to_string_pretty(&summary["stream"])?);
    if watch.first_promotion.is_none() {
        bail!("no promotion within --max-seconds {}", args.max_seconds);
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}
