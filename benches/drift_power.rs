//! How often drift is detected, and falsely alarmed, by window size, on real mail: a LoRA generation trained
//! on SpamAssassin easy-ham-1 + spam-1 (100 + 100 mails, as the HTTP drift test), then 20 seeded windows of
//! each size drawn from held-out mail of the same groups (any detection is a false alarm) and from the later
//! corpus, easy-ham-2 + spam-2 (a detection is a hit). Half ham, half spam in every window; the first 80
//! words of each mail; the shipped drift settings otherwise.
//!
//! `cargo bench --bench drift_power` (needs models/fetch.sh and datasets/fetch-spamassassin.sh) measures what
//! Flywheel does: the training reference, inputs compared by the base model's embeddings. Switches for the
//! comparisons in docs/DRIFT.md: `DRIFT_REFERENCE=live` (the reference is 200 served predictions of other
//! held-out mail instead), `DRIFT_FEATURES=adapted` (embeddings from the serving generation's hidden states
//! on both sides, as before), `TRAIN_PER_CLASS=N` (mails per class to train on).

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use flywheel::config::DriftConfig;
use flywheel::drift::DriftMonitor;
use flywheel::metrics::Metrics;
use flywheel::model::adapter::Adapter;
use flywheel::model::{pooling, CpuEncoder, Model};
use flywheel::rng::Rng;
use flywheel::trainer::data::{stratified_split_by, truncate, Example};
use flywheel::trainer::reference::{base_embeddings, drift_reference, probabilities};
use flywheel::trainer::train::{train_lora, TrainConfig};

const WINDOWS: usize = 20;
const SIZES: [usize; 4] = [50, 100, 200, 300];

/// Every mail of `group` (its first 80 words) in a seeded random order: training, held-out and later
/// samples are drawn from the whole corpus, as the HTTP drift test's are, not from neighbouring lines
/// (which share threads and topics).
fn shuffled(group: &str) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("datasets/spamassassin/{group}.jsonl"));
    let text = std::fs::read_to_string(&path).expect("run datasets/fetch-spamassassin.sh");
    let mut mails: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            let words: Vec<&str> = v["text"]
                .as_str()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            words[..words.len().min(80)].join(" ")
        })
        .collect();
    Rng::new(group.bytes().fold(7, |h, b| h * 31 + u64::from(b))).shuffle(&mut mails);
    mails
}

/// Mails `from..from + n` of a shuffled corpus (fewer where it ends).
fn slice(mails: &[String], from: usize, n: usize) -> Vec<String> {
    mails.iter().skip(from).take(n).cloned().collect()
}

/// Whether the bench compares the generation's own hidden states (`DRIFT_FEATURES=adapted`), as Flywheel
/// did before, instead of the base model's embeddings that serving watches.
fn adapted_features() -> bool {
    std::env::var("DRIFT_FEATURES").is_ok_and(|v| v == "adapted")
}

/// L2-normalised mean-pooled hidden states under `adapter`.
fn adapted_embeddings(cpu: &CpuEncoder, adapter: &Adapter, sequences: &[&[u32]]) -> Vec<Vec<f32>> {
    sequences
        .chunks(32)
        .flat_map(|chunk| {
            let choice = vec![Some(adapter); chunk.len()];
            pooling::mean_pool(&cpu.forward_adapted(chunk, &choice).unwrap(), true)
        })
        .collect()
}

/// Probabilities and watched embeddings of `texts` under `adapter`, as serving computes them (the
/// embeddings from the generation itself with `DRIFT_FEATURES=adapted`).
fn served(
    model: &Model,
    cpu: &CpuEncoder,
    adapter: &Adapter,
    texts: &[String],
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| model.tokenizer.encode(t).unwrap())
        .collect();
    let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let probs = probabilities(cpu, adapter, &seqs).unwrap();
    let features = if adapted_features() {
        adapted_embeddings(cpu, adapter, &seqs)
    } else {
        base_embeddings(cpu, &seqs).unwrap()
    };
    probs.into_iter().zip(features).collect()
}

fn main() {
    let model = common::load_model(256);
    let cpu = model.cpu().expect("the CPU encoder");
    let config = TrainConfig {
        epochs: Some(2),
        max_length: 48,
        learning_rate: Some(3e-3),
        ..TrainConfig::default()
    };
    // 100 + 100 mails to train on; held-out pools of 150 + 150 of each corpus.
    let per_class: usize = std::env::var("TRAIN_PER_CLASS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let (ham_1, spam_1) = (shuffled("easy-ham-1"), shuffled("spam-1"));
    let (ham, spam) = (slice(&ham_1, 0, per_class), slice(&spam_1, 0, per_class));
    let rows: Vec<(Example, Vec<u32>)> = ham
        .iter()
        .map(|t| (t, 0))
        .chain(spam.iter().map(|t| (t, 1)))
        .map(|(t, label)| {
            let ids = model.tokenizer.encode(t).unwrap();
            (
                Example {
                    ids: truncate(ids.clone(), config.max_length),
                    label,
                },
                ids,
            )
        })
        .collect();
    let (train, val) =
        stratified_split_by(rows, |(e, _)| e.label, 2, config.val_fraction, config.seed);
    let (train, train_ids): (Vec<Example>, Vec<Vec<u32>>) = train.into_iter().unzip();
    let (val, val_ids): (Vec<Example>, Vec<Vec<u32>>) = val.into_iter().unzip();
    let report = train_lora(
        &model.bert,
        cpu,
        2,
        &train,
        &val,
        &config,
        None,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect("trains");
    let adapter = report.result;
    let started = std::time::Instant::now();
    let mut reference =
        drift_reference(cpu, &adapter, &train_ids, &val_ids, 500, config.seed).unwrap();
    if adapted_features() {
        let seqs: Vec<&[u32]> = val_ids
            .iter()
            .chain(&train_ids)
            .map(Vec::as_slice)
            .take(reference.embeddings.len())
            .collect();
        reference.embeddings = adapted_embeddings(cpu, &adapter, &seqs);
    }
    let reference = Arc::new(reference);
    eprintln!(
        "trained in {:.1} s (val macro-F1 {:.3}); reference of {} embeddings and {} validation predictions in {:.1} s",
        report.wall_seconds,
        report.val.as_ref().map_or(f64::NAN, |v| v.macro_f1),
        reference.embeddings.len(),
        reference.labels.len(),
        started.elapsed().as_secs_f64()
    );
    let pool = |ham: &[String], spam: &[String], from: usize| {
        let ham = served(&model, cpu, &adapter, &slice(ham, from, 150));
        let spam = served(&model, cpu, &adapter, &slice(spam, from, 150));
        (ham, spam)
    };
    let same = pool(&ham_1, &spam_1, per_class);
    let reference = if std::env::var("DRIFT_REFERENCE").is_ok_and(|v| v == "live") {
        let (h, sp) = pool(&ham_1, &spam_1, per_class + 150);
        let all: Vec<_> = h
            .into_iter()
            .take(100)
            .chain(sp.into_iter().take(100))
            .collect();
        Arc::new(flywheel::adapters::reference::DriftReference {
            labels: all.iter().map(|(p, _)| usize::from(p[1] > p[0])).collect(),
            confidences: all.iter().map(|(p, _)| p[0].max(p[1])).collect(),
            embeddings: all.into_iter().map(|(_, f)| f).collect(),
        })
    } else {
        reference
    };
    let later = pool(&shuffled("easy-ham-2"), &shuffled("spam-2"), 0);

    println!("| window | false alarms (same groups) | detected (later corpus) | later, by test: prediction PSI / confidence PSI / cosine / Mahalanobis / MMD |");
    println!("| --- | --- | --- | --- |");
    for size in SIZES {
        let mut drift = DriftConfig {
            window_size: size,
            min_window: size,
            ..DriftConfig::default()
        };
        if let Some(n) = std::env::var("DRIFT_MMD_SAMPLE")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            drift.mmd_sample = n;
        }
        let mut counts = [0usize; 7];
        for (which, (ham, spam)) in [&same, &later].into_iter().enumerate() {
            for w in 0..WINDOWS {
                let mut rng = Rng::new(1000 * size as u64 + 10 * w as u64 + which as u64);
                let mut pick = |v: &Vec<(Vec<f32>, Vec<f32>)>| {
                    let mut idx: Vec<usize> = (0..v.len()).collect();
                    rng.shuffle(&mut idx);
                    idx.truncate(size / 2);
                    idx.into_iter().map(|i| v[i].clone()).collect::<Vec<_>>()
                };
                let mut window = pick(ham);
                window.extend(pick(spam));
                rng.shuffle(&mut window);
                let monitor = DriftMonitor::new(drift.clone(), Metrics::new());
                for (probs, features) in &window {
                    monitor.observe_prediction("spam", "g", Some(&reference), probs);
                    monitor.observe_embedding("spam", "g", features.clone());
                }
                let computed = std::time::Instant::now();
                let r = monitor
                    .report("spam")
                    .expect("a task")
                    .expect("a full window");
                let computed = computed.elapsed();
                counts[which] += usize::from(r.detected);
                if w == 0 {
                    let p: Vec<String> = r
                        .signals
                        .iter()
                        .map(|s| {
                            format!(
                                "{}:{:.4}(p {:.3})",
                                s.method,
                                s.score,
                                s.p_value.unwrap_or(f64::NAN)
                            )
                        })
                        .collect();
                    eprintln!(
                        "size {size} {} window 0 (report in {:.0} ms): {}",
                        ["same", "later"][which],
                        computed.as_secs_f64() * 1e3,
                        p.join(" ")
                    );
                }
                if which == 1 {
                    for (k, s) in r.signals.iter().enumerate() {
                        counts[2 + k] += usize::from(s.detected);
                    }
                }
            }
        }
        println!(
            "| {size} | {}/{WINDOWS} | {}/{WINDOWS} | {} / {} / {} / {} / {} |",
            counts[0], counts[1], counts[2], counts[3], counts[4], counts[5], counts[6]
        );
    }
}
