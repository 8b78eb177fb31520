//! `flywheel train`, the offline trainer: real mail in JSONL, a PEFT adapter directory and a JSON report
//! out; clear errors for bad input.

mod common;

use std::process::Command;

use serde_json::Value;

/// `n` mails of `group` (every 9th from `skip`, first 40 words) as JSONL lines labelled `label`.
fn jsonl(group: &str, label: &str, skip: usize, n: usize) -> String {
    common::sample_mails(group, skip, 9, n, 40)
        .iter()
        .map(|t| serde_json::json!({"text": t, "label": label}).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn flywheel(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("train")
        .args(args)
        .arg("--model")
        .arg(common::model_dir())
        .output()
        .expect("run flywheel train")
}

#[test]
fn offline_training_writes_a_peft_adapter_and_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    let test = dir.path().join("test.jsonl");
    std::fs::write(
        &data,
        [
            jsonl("easy-ham-1", "ham", 0, 14),
            jsonl("spam-1", "spam", 0, 14),
        ]
        .join("\n"),
    )
    .unwrap();
    std::fs::write(
        &test,
        [
            jsonl("easy-ham-1", "ham", 4, 8),
            jsonl("spam-1", "spam", 4, 8),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = dir.path().join("adapter");
    let args = [
        "--task",
        "spam",
        "--data",
        data.to_str().unwrap(),
        "--test",
        test.to_str().unwrap(),
        "--params",
        r#"{"epochs": 2, "max_length": 32, "learning_rate": 0.003}"#,
        "--out",
        out.to_str().unwrap(),
    ];
    let run = flywheel(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value = serde_json::from_slice(&run.stdout).expect("a JSON report on stdout");
    assert_eq!(report["method"], "lora");
    assert_eq!(report["labels"], serde_json::json!(["ham", "spam"]));
    // r = 8 on query and value of 6 layers (384 × 8 × 2 × 2 × 6) plus a 2-way head (384 × 2 + 2).
    assert_eq!(report["trainable_params"], 74_498);
    assert_eq!(report["test"]["examples"], 16);
    assert!(
        report["test"]["macro_f1"].as_f64().unwrap() > 0.6,
        "{report}"
    );
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "flywheel.json",
        "drift_reference.safetensors",
    ] {
        assert!(out.join(file).is_file(), "missing {file}");
    }
    // The drift reference a server will watch the adapter's traffic against: one embedding per example
    // (up to 500), a prediction per validation example.
    let reference = flywheel::adapters::reference::DriftReference::from_bytes(
        &std::fs::read(out.join("drift_reference.safetensors")).unwrap(),
        384,
        2,
    )
    .unwrap();
    // 14 mails per label would validate on 2 each: the small-data guard trains on all 28 and keeps the
    // last epoch; the reference then holds the training rows' embeddings and no predictions (those on the
    // training rows would be more confident than traffic's; the monitor takes them live).
    assert_eq!(
        (
            report["train_examples"].as_u64(),
            report["val_examples"].as_u64()
        ),
        (Some(28), Some(0)),
        "{report}"
    );
    assert!(
        report["val"].is_null() && report["best_epoch"] == 2,
        "{report}"
    );
    let note = report["validation_note"].as_str().expect("a note");
    assert!(
        note.contains("label \"ham\" would have 2 validation examples"),
        "{note}"
    );
    assert_eq!(reference.embeddings.len(), 28);
    assert!(reference.labels.is_empty() && reference.confidences.is_empty());
    let sidecar: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("flywheel.json")).unwrap()).unwrap();
    assert_eq!(sidecar["task"], "spam");

    // The output directory is never overwritten.
    let again = flywheel(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));

    // Bad lines and unknown methods are named.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"no label here\"}\n").unwrap();
    let run = flywheel(&["--task", "spam", "--data", bad.to_str().unwrap()]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("line 1"));
    let run = flywheel(&[
        "--task",
        "spam",
        "--data",
        data.to_str().unwrap(),
        "--method",
        "half",
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("possible values: lora, full"));
}
