//! A LoRA adapter made by Python PEFT on all-MiniLM-L6-v2 (tests/fixtures/make_peft_fixture.py) gives
//! PyTorch's logits in Flywheel, and survives a write/read round trip through Flywheel's PEFT writer.

mod common;

use std::path::Path;

use flywheel::adapters::peft;
use flywheel::model::adapter::{Adapter, Pooling};
use flywheel::model::Model;

/// Text, PyTorch logits, PyTorch probabilities.
type Row = (String, Vec<f32>, Vec<f32>);

fn fixture() -> (Vec<Row>, Vec<String>) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_seq_cls_reference.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let floats = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let items = doc["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["text"].as_str().unwrap().to_owned(),
                floats(&i["logits"]),
                floats(&i["probs"]),
            )
        })
        .collect();
    let labels = doc["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect();
    (items, labels)
}

fn logits(model: &Model, adapter: &Adapter, text: &str) -> Vec<f32> {
    let ids = model.tokenizer.encode(text).unwrap();
    let cpu = model.cpu().expect("CPU model");
    let packed = cpu.forward_adapted(&[&ids], &[Some(adapter)]).unwrap();
    cpu.classify(&packed, &[Some(adapter)])
        .unwrap()
        .remove(0)
        .unwrap()
}

#[test]
fn a_python_peft_seq_cls_adapter_gives_pytorchs_logits_within_1e4() {
    let model = common::load_model();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_seq_cls");
    let (config, adapter) = peft::read(&dir, &model.config, Pooling::Cls).unwrap();
    assert_eq!(
        (config.r, config.lora_alpha, config.task_type.as_deref()),
        (8, 16.0, Some("SEQ_CLS"))
    );
    assert_eq!(adapter.deltas().count(), 12, "query and value in 6 layers");
    let (items, labels) = fixture();
    assert_eq!(
        adapter.head.as_ref().unwrap().classifier.out_features,
        labels.len()
    );
    for (text, want_logits, want_probs) in &items {
        let got = logits(&model, &adapter, text);
        let max_logit = got
            .iter()
            .zip(want_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let max_prob = flywheel::model::pooling::softmax(&got)
            .iter()
            .zip(want_probs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            max_logit < 1e-4 && max_prob < 1e-4,
            "{text:?}: logits {max_logit:e}, probabilities {max_prob:e}"
        );
    }

    // Flywheel's writer, read back, serves the same numbers.
    let out = tempfile::tempdir().unwrap();
    peft::write_dir(out.path(), &adapter, config.lora_alpha, "all-MiniLM-L6-v2").unwrap();
    let (_, back) = peft::read(out.path(), &model.config, Pooling::Cls).unwrap();
    assert_eq!(back, adapter);
}

fn lcg(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    flywheel::rng::Rng::new(seed).uniform(n, scale)
}

/// Writes an adapter made by Flywheel (rank 4 on all six linears, a 3-label head) and Flywheel's
/// probabilities for the fixture texts to target/peft-export/, for tests/fixtures/check_flywheel_adapter_in_peft.py
/// to load in Python PEFT and compare.
#[test]
fn flywheel_exports_an_adapter_for_python_peft() {
    use flywheel::model::adapter::{Dense, Head, LoraDelta, Target};
    let model = common::load_model();
    let mut adapter = Adapter::empty(model.config.num_hidden_layers);
    for layer in 0..model.config.num_hidden_layers {
        for (k, target) in Target::ALL.into_iter().enumerate() {
            let (i, o) = target.shape(&model.config);
            let seed = (layer * 10 + k) as u64;
            let delta = LoraDelta {
                a: lcg(seed, 4 * i, 0.05),
                b: lcg(seed + 500, o * 4, 0.05),
                rank: 4,
                scale: 2.0,
            };
            adapter.set(layer, target, delta).unwrap();
        }
    }
    let h = model.config.hidden_size;
    let classifier = Dense {
        weight: lcg(99, 3 * h, 0.5),
        bias: lcg(98, 3, 0.1),
        in_features: h,
        out_features: 3,
    };
    adapter.head = Some(Head {
        pooling: Pooling::Cls,
        pooler: None,
        classifier,
    });

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peft-export");
    peft::write_dir(&out, &adapter, 8.0, "all-MiniLM-L6-v2").unwrap();
    let (items, _) = fixture();
    let rows: Vec<serde_json::Value> = items
        .iter()
        .map(|(text, _, _)| serde_json::json!({"text": text, "probs": flywheel::model::pooling::softmax(&logits(&model, &adapter, text))}))
        .collect();
    std::fs::write(
        out.join("flywheel_probs.json"),
        serde_json::to_string_pretty(&rows).unwrap(),
    )
    .unwrap();
    let (_, back) = peft::read(&out, &model.config, Pooling::Cls).unwrap();
    assert_eq!(back, adapter);
}
