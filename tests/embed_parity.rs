//! The real all-MiniLM-L6-v2 in-process: both encoder paths match PyTorch's committed embeddings, and
//! packing sequences into one batch changes nothing.

mod common;

use candle_core::Device;
use flywheel::model::{LoadOptions, Model};

fn load() -> Model {
    common::load_model()
}

#[test]
fn fused_cpu_path_matches_pytorch_on_every_reference_sentence() {
    let model = load();
    let reference = common::reference();
    assert!(reference.len() >= 30);
    let mut worst = (1.0f64, 0.0f64);
    for (text, want) in &reference {
        let ids = model.tokenizer.encode(text).unwrap();
        let got = model.embed(&[&ids], true).unwrap().remove(0);
        let (cos, max) = common::compare(&got, want);
        worst = (worst.0.min(cos), worst.1.max(max));
        assert!(
            cos >= 0.9999 && max <= 1e-4,
            "{text:?}: cosine {cos}, max abs diff {max}"
        );
    }
    eprintln!(
        "fused path vs PyTorch: min cosine {:.7}, max abs diff {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn candle_reference_path_matches_pytorch() {
    let model = load();
    for (text, want) in common::reference().iter().step_by(3) {
        let ids = model.tokenizer.encode(text).unwrap();
        let packed = model.encode_reference(&[&ids]).unwrap();
        let got = flywheel::model::pooling::mean_pool(&packed, true).remove(0);
        let (cos, max) = common::compare(&got, want);
        assert!(
            cos >= 0.9999 && max <= 1e-4,
            "{text:?}: cosine {cos}, max abs diff {max}"
        );
    }
}

#[test]
fn a_packed_mixed_length_batch_equals_each_text_alone() {
    let model = load();
    let reference = common::reference();
    let ids: Vec<Vec<u32>> = reference
        .iter()
        .map(|(t, _)| model.tokenizer.encode(t).unwrap())
        .collect();
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let batched = model.embed(&refs, true).unwrap();
    for (i, seq) in refs.iter().enumerate() {
        let alone = model.embed(&[seq], true).unwrap().remove(0);
        let (cos, max) = common::compare(&batched[i], &alone);
        assert!(
            cos > 0.999999 && max < 1e-5,
            "item {i}: cosine {cos}, max {max}"
        );
    }
}

#[test]
fn padded_reference_batch_does_not_leak_padding() {
    let model = load();
    let texts = [
        "short",
        "a somewhat longer sentence with more tokens in it than the first one",
    ];
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| model.tokenizer.encode(t).unwrap())
        .collect();
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let padded = model.encode_reference(&refs).unwrap();
    let alone = model.encode_reference(&refs[..1]).unwrap();
    let (cos, max) = common::compare(padded.sequence(0), alone.sequence(0));
    assert!(cos > 0.999999 && max < 1e-5, "cosine {cos}, max {max}");
}

#[test]
fn truncation_is_256_tokens_not_the_tokenizer_files_128() {
    let model = load();
    let long = "word ".repeat(1000);
    assert_eq!(model.tokenizer.encode(&long).unwrap().len(), 256);
    let longer = Model::load(
        &common::model_dir(),
        &LoadOptions {
            max_length: 512,
            device: Device::Cpu,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(longer.tokenizer.encode(&long).unwrap().len(), 512);
}

#[test]
fn a_directory_without_weights_is_a_clear_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(common::model_dir().join(f), dir.path().join(f)).unwrap();
    }
    let err = Model::load(
        dir.path(),
        &LoadOptions {
            max_length: 256,
            device: Device::Cpu,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[tokio::test]
async fn every_request_shares_the_models_one_tokenizer_short_or_long() {
    let model = load();
    let infer = flywheel::infer::Infer::start(
        model.serving(),
        &flywheel::config::BatchingConfig::default(),
        flywheel::metrics::Metrics::new(),
        flywheel::pressure::ServingPressure::new(),
    )
    .expect("the model thread starts");
    assert!(std::sync::Arc::ptr_eq(infer.tokenizer(), &model.tokenizer));
    // The model, the handle and the model thread's view of the model hold it.
    let held = std::sync::Arc::strong_count(&model.tokenizer);
    // A short request is tokenized inline, a long one on the blocking pool: both through the shared one.
    let short =
        vec!["A twelve word sentence about nothing in particular, sent by a user.".to_owned()];
    let long = vec!["word ".repeat(2_000)];
    for texts in [&short, &long, &short] {
        let out = infer.embed(texts, true).await.expect("embeds");
        assert_eq!(out.vectors.len(), 1);
    }
    assert_eq!(
        std::sync::Arc::strong_count(&model.tokenizer),
        held,
        "no request kept or made a copy of the tokenizer"
    );
}
