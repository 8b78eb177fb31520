//! int8 serving (`model.precision = "int8"`, default projections) on the real model and real mail gives the
//! f32 path's answers:
//! embeddings of the 32 parity texts and of 1,000 SpamAssassin mails at cosine ≥ 0.999 on average and
//! ≥ 0.995 at worst, and a LoRA spam classifier's labels on those mails agree ≥ 99.5 % with macro-F1 within
//! 0.005. On a CPU without AVX512-VNNI the same arithmetic runs on a scalar loop, so fewer mails are used.

mod common;

use std::sync::atomic::AtomicBool;

use common::mails;
use flywheel::model::{int8, pooling, CpuEncoder, Model, DEFAULT_INT8_PROJECTIONS};
use flywheel::trainer::data::{stratified_split, truncate, Example};
use flywheel::trainer::eval::evaluate;
use flywheel::trainer::train::{predict, train_lora, TrainConfig};
use serde_json::json;

/// Tokens per mail: the first 128, as a classifier of short mail would see them.
const MAX_LENGTH: usize = 128;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Mean and least cosine between the two encoders' mean-pooled embeddings of `sequences`.
fn agreement(f32_path: &CpuEncoder, int8_path: &CpuEncoder, sequences: &[Vec<u32>]) -> (f64, f64) {
    let mut cosines = Vec::new();
    for chunk in sequences.chunks(32) {
        let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let want = pooling::mean_pool(&f32_path.forward(&refs).unwrap(), false);
        let got = pooling::mean_pool(&int8_path.forward(&refs).unwrap(), false);
        cosines.extend(want.iter().zip(&got).map(|(w, g)| cosine(w, g)));
    }
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    (mean, cosines.iter().copied().fold(f64::INFINITY, f64::min))
}

fn tokens(model: &Model, text: &str) -> Vec<u32> {
    truncate(model.tokenizer.encode(text).unwrap(), MAX_LENGTH)
}

/// The 32 texts of the PyTorch parity fixture.
fn parity_texts() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/embed_reference.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fixture["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["text"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn int8_serving_agrees_with_f32_on_real_text_and_a_real_classifier() {
    let model = common::load_model();
    let f32_path = model.cpu().unwrap();
    // What `model.precision = "int8"` loads: the kernel it names and the dtype /info reports.
    let served = Model::load(
        &common::model_dir(),
        &flywheel::model::LoadOptions {
            precision: flywheel::model::Precision::Int8,
            ..Default::default()
        },
    )
    .unwrap();
    if int8::available() {
        assert_eq!(
            (served.serving_dtype(), served.serving_kernel()),
            ("int8", "vnni")
        );
    } else {
        assert_eq!(served.serving_dtype(), "float32");
    }
    drop(served);
    // The projections `model.precision = "int8"` quantises by default.
    let int8_path = model
        .int8_encoder(&DEFAULT_INT8_PROJECTIONS)
        .unwrap()
        .unwrap();
    let per_class = if int8::available() { 500 } else { 30 };
    // Ham and spam from both corpora, the earlier and the later one.
    let (ham, spam) = (
        [mails("easy-ham-1"), mails("easy-ham-2")].concat(),
        [mails("spam-1"), mails("spam-2")].concat(),
    );
    let spread = |v: &[String], n: usize, offset: usize| -> Vec<String> {
        let step = (v.len() / (n + 1)).max(1);
        v.iter()
            .skip(offset)
            .step_by(step)
            .take(n)
            .cloned()
            .collect()
    };
    let test: Vec<Example> = spread(&ham, per_class, 0)
        .iter()
        .map(|t| Example {
            ids: tokens(&model, t),
            label: 0,
        })
        .chain(spread(&spam, per_class, 0).iter().map(|t| Example {
            ids: tokens(&model, t),
            label: 1,
        }))
        .collect();

    let parity: Vec<Vec<u32>> = parity_texts().iter().map(|t| tokens(&model, t)).collect();
    let (mean, least) = agreement(f32_path, &int8_path, &parity);
    eprintln!("parity texts: cosine to f32 mean {mean:.5}, least {least:.5}");
    assert!(
        mean >= 0.999 && least >= 0.995,
        "parity texts: mean {mean}, least {least}"
    );
    let mail_ids: Vec<Vec<u32>> = test.iter().map(|e| e.ids.clone()).collect();
    let (mean, least) = agreement(f32_path, &int8_path, &mail_ids);
    eprintln!(
        "{} mails: cosine to f32 mean {mean:.5}, least {least:.5}",
        test.len()
    );
    assert!(
        mean >= 0.999 && least >= 0.995,
        "mails: mean {mean}, least {least}"
    );

    // A spam classifier trained (in f32, as the trainer always does) on other mails of the same corpora.
    let config = TrainConfig {
        epochs: Some(3),
        max_length: 64,
        learning_rate: Some(3e-3),
        ..TrainConfig::default()
    };
    let sample: Vec<Example> = spread(&ham, 60, 7)
        .iter()
        .map(|t| Example {
            ids: truncate(model.tokenizer.encode(t).unwrap(), 64),
            label: 0,
        })
        .chain(spread(&spam, 60, 7).iter().map(|t| Example {
            ids: truncate(model.tokenizer.encode(t).unwrap(), 64),
            label: 1,
        }))
        .collect();
    let (train, val) = stratified_split(sample, 2, config.val_fraction, config.seed);
    let adapter = train_lora(
        &model.bert,
        f32_path,
        2,
        &train,
        &val,
        &config,
        None,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap()
    .result;
    let truth: Vec<usize> = test.iter().map(|e| e.label).collect();
    let (want, got) = (
        predict(f32_path, &adapter, &test).unwrap(),
        predict(&int8_path, &adapter, &test).unwrap(),
    );
    let label = |p: &Vec<f32>| pooling::best(p).0;
    let agree = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| label(w) == label(g))
        .count() as f64
        / test.len() as f64;
    let (f1_f32, f1_int8) = (
        evaluate(&want, &truth, 2).macro_f1,
        evaluate(&got, &truth, 2).macro_f1,
    );
    eprintln!(
        "classifier on {} mails: labels agree {:.2} %, macro-F1 f32 {f1_f32:.4}, int8 {f1_int8:.4}",
        test.len(),
        agree * 100.0
    );
    assert!(agree >= 0.995, "labels agree on {agree}");
    assert!(
        (f1_f32 - f1_int8).abs() <= 0.005,
        "macro-F1 {f1_f32} vs {f1_int8}"
    );
}

/// A server started with `FLYWHEEL_MODEL__PRECISION=int8` says so in `/info`, `/ready` and
/// `flywheel_model_info`,
/// and its embeddings over HTTP match an f32 server's.
#[test]
fn an_int8_server_reports_its_precision_and_embeds_like_f32() {
    let texts = json!({"inputs": ["The delivery was late and the box was damaged.", "how do I reset my password"]});
    let embed = |server: &common::Server| -> Vec<Vec<f64>> {
        let (status, body) = server.post("/v1/embed", &texts);
        assert_eq!(status, 200, "{body}");
        body["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let f32_server = common::Server::start(&[], &[]);
    let want = embed(&f32_server);
    drop(f32_server);
    let server = common::Server::start(&[], &[("FLYWHEEL_MODEL__PRECISION", "int8")]);
    let (dtype, kernel) = if int8::available() {
        ("int8", "vnni")
    } else {
        ("float32", "avx512")
    };
    let (status, info) = server.get_json("/info");
    assert_eq!(status, 200);
    assert_eq!(info["model_dtype"], dtype);
    let (status, ready) = server.get_json("/ready");
    assert_eq!(status, 200);
    assert_eq!(ready["dtype"], dtype);
    let (_, metrics) = server.get_text("/metrics");
    if int8::available() {
        let series = format!("flywheel_model_info{{dtype=\"{dtype}\",kernel=\"{kernel}\"}} 1");
        assert!(metrics.contains(&series), "no {series} in the metrics");
    }
    for (w, g) in want.iter().zip(embed(&server)) {
        let dot: f64 = w.iter().zip(&g).map(|(a, b)| a * b).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cosine = dot / (norm(w) * norm(&g));
        assert!(cosine > 0.999, "int8 embedding at cosine {cosine} to f32");
    }
}
