//! Drift over real HTTP on real mail. A spam adapter trained on SpamAssassin spam-1 + easy-ham-1 is published
//! with its training reference: the drift gauges exist from its first prediction (NaN scores, a window of
//! one), 200 held-out mails of the same groups show no drift against that reference, and 200 of the later
//! corpus (spam-2 + easy-ham-2) do, on the embedding signal. An adapter made elsewhere (the PEFT fixture) is
//! compared with its own first predictions instead, and same-group mail shows no drift there either; the
//! metrics exposition passes `promtool check metrics` throughout.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;

/// `n` mails of `group` spread evenly over the whole corpus, starting at line `offset` (the first 80 words
/// each). Neighbouring mails share threads and topics, so a window of consecutive lines is not a sample of
/// its group.
fn mails(group: &str, offset: usize, n: usize) -> Vec<String> {
    let step = common::mails(group).len() / n;
    common::sample_mails(group, offset, step, n, 80)
}

/// Ham and spam alternating, so every window holds the same label mix.
fn interleave(ham: Vec<String>, spam: Vec<String>) -> Vec<String> {
    ham.into_iter()
        .zip(spam)
        .flat_map(|(h, s)| [h, s])
        .collect()
}

/// The task's drift answer once `field` (`reference_size` or `embedding_window_size`) reaches `n`: inputs
/// are embedded after their answers, when serving leaves the time.
fn once_embedded(server: &Server, task: &str, field: &str, n: u64) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = server.get_json(&format!("/v1/drift/{task}"));
        if body[field].as_u64() >= Some(n) {
            return (status, body);
        }
        assert!(Instant::now() < deadline, "inputs not embedded: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn predict_all(server: &Server, texts: &[String]) {
    predict_task(server, "spam", texts);
}

fn predict_task(server: &Server, task: &str, texts: &[String]) {
    for chunk in texts.chunks(10) {
        let (status, body) = server.post("/v1/predict", &json!({"task": task, "inputs": chunk}));
        assert_eq!(status, 200, "{body}");
    }
}

#[test]
fn a_trained_generation_is_watched_against_its_training_data_and_an_outside_adapter_against_its_first_predictions(
) {
    // The shipped drift settings (a reference of up to 500), but a window of exactly 200 predictions.
    let server = Server::start(&[], &[("FLYWHEEL_DRIFT__WINDOW_SIZE", "200")]);
    let (status, body) = server.post(
        "/v1/tasks",
        &json!({"name": "spam", "labels": ["ham", "spam"]}),
    );
    assert_eq!(status, 201, "{body}");
    // Train on 600 mails of spam-1 and easy-ham-1: offsets 0, 1 and 3 of every five hundredths of each
    // corpus (2 and 4 stay held out).
    let mut items = Vec::new();
    for (group, label) in [("easy-ham-1", "ham"), ("spam-1", "spam")] {
        for offset in [0, 1, 3] {
            for text in mails(group, offset, 100) {
                items.push(json!({"task": "spam", "text": text, "label": label}));
            }
        }
    }
    let (status, body) = server.post("/v1/feedback", &json!({ "items": items }));
    assert_eq!(status, 202, "{body}");
    let (status, body) = server.post(
        "/v1/train",
        &json!({"task": "spam", "epochs": 2, "max_length": 48, "learning_rate": 0.003}),
    );
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, j) = server.get_json(&format!("/v1/jobs/{job}"));
        if j["state"] == "succeeded" {
            break;
        }
        assert!(
            matches!(j["state"].as_str(), Some("queued") | Some("running")),
            "{j}"
        );
        assert!(Instant::now() < deadline, "training too slow: {j}");
        std::thread::sleep(Duration::from_millis(500));
    }

    let (status, body) = server.get_json("/v1/drift/spam");
    assert_eq!(status, 202, "no predictions yet: {body}");
    // From the first prediction the gauges exist: NaN scores, a window of one.
    predict_all(&server, &mails("easy-ham-1", 2, 1));
    let (_, metrics) = server.get_text("/metrics");
    common::promtool_check(&metrics);
    for series in [
        "flywheel_drift_score{method=\"mmd\",signal=\"embedding\",task=\"spam\"} NaN",
        "flywheel_drift_score{method=\"psi\",signal=\"prediction\",task=\"spam\"} NaN",
        "flywheel_drift_window_size{task=\"spam\"} 1",
    ] {
        assert!(metrics.contains(series), "missing {series}");
    }
    let (status, warming) = server.get_json("/v1/drift/spam");
    assert_eq!(status, 202, "{warming}");
    assert_eq!(warming["reference"], "training", "{warming}");
    assert!(
        warming["reference_size"].as_u64().unwrap() >= 500,
        "{warming}"
    );

    // 200 held-out mails of the training groups: no drift.
    predict_all(
        &server,
        &interleave(mails("easy-ham-1", 2, 100), mails("spam-1", 2, 100)),
    );
    let (status, same) = once_embedded(&server, "spam", "embedding_window_size", 200);
    assert_eq!(status, 200, "{same}");
    eprintln!("same groups: {same:#}");
    assert_eq!(same["reference"], "training", "{same}");
    assert_eq!(same["window_size"], 200, "{same}");
    let signals: Vec<&str> = same["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["signal"].as_str().unwrap())
        .collect();
    assert_eq!(
        signals,
        [
            "prediction",
            "confidence",
            "embedding",
            "embedding",
            "embedding"
        ],
        "{same}"
    );
    assert_eq!(same["detected"], false, "{same}");

    // One judged prediction, so the exposition also carries online accuracy.
    let (_, served) = server.post(
        "/v1/predict",
        &json!({"task": "spam", "inputs": "cheap pills"}),
    );
    let (status, body) = server.post(
        "/v1/feedback",
        &json!({"request_id": served["request_id"], "label": "spam"}),
    );
    assert_eq!(status, 202, "{body}");
    let (_, metrics) = server.get_text("/metrics");
    common::promtool_check(&metrics);
    for series in [
        "flywheel_request_latency_seconds{route=\"/v1/predict\",quantile=\"0.99\"}",
        "flywheel_drift_window_size{task=\"spam\"} 200",
        "flywheel_drift_detected{signal=\"embedding\",task=\"spam\"} 0",
    ] {
        assert!(metrics.contains(series), "missing {series}");
    }
    let judged: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("flywheel_online_judgements_total{arm=\"stable\",outcome="))
        .filter(|l| l.contains("task=\"spam\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(judged, 1.0, "one judgement, agreed or not: {metrics}");
    assert!(
        !metrics.contains("flywheel_online_accuracy{arm=\"stable\",task=\"spam\"}"),
        "one judgement is no accuracy yet (20 are needed)"
    );

    // 200 mails of the later corpus: drift, found in the inputs once they are embedded.
    predict_all(
        &server,
        &interleave(mails("easy-ham-2", 0, 100), mails("spam-2", 0, 100)),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let later = loop {
        let (status, later) = server.get_json("/v1/drift/spam");
        assert_eq!(status, 200, "{later}");
        if later["detected"] == true || Instant::now() > deadline {
            break later;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("later corpus: {later:#}");
    let detected: Vec<String> = later["signals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["detected"] == true)
        .map(|s| format!("{}/{}", s["signal"], s["method"]))
        .collect();
    assert!(
        detected.iter().any(|s| s.starts_with("\"embedding\"")),
        "the later corpus is not detected: {later:#}"
    );
    let (_, metrics) = server.get_text("/metrics");
    common::promtool_check(&metrics);
    let series = "flywheel_drift_detected{signal=\"embedding\",task=\"spam\"} 1";
    assert!(metrics.contains(series), "missing {series}");

    // An adapter made elsewhere (PEFT, no reference) is compared with its own first 500 predictions.
    let (status, _) = server.post(
        "/v1/tasks",
        &json!({"name": "sentiment", "labels": ["negative", "neutral", "positive"]}),
    );
    assert_eq!(status, 201);
    common::copy_peft_fixture(&server, "fixture");
    let (status, body) = server.post(
        "/v1/adapters",
        &json!({"path": "fixture", "task": "sentiment"}),
    );
    assert_eq!(status, 201, "{body}");
    let first: Vec<String> = [0, 1, 4]
        .into_iter()
        .flat_map(|o| interleave(mails("easy-ham-1", o, 100), mails("spam-1", o, 100)))
        .take(500)
        .collect();
    predict_task(&server, "sentiment", &first);
    let (status, warming) = once_embedded(&server, "sentiment", "reference_size", 500);
    assert_eq!(status, 202, "{warming}");
    assert_eq!(warming["reference"], "live", "{warming}");
    assert_eq!(warming["reference_size"], 500, "{warming}");
    assert_eq!(warming["window_size"], 0, "{warming}");
    predict_task(
        &server,
        "sentiment",
        &interleave(mails("easy-ham-1", 2, 100), mails("spam-1", 2, 100)),
    );
    let (status, same) = once_embedded(&server, "sentiment", "embedding_window_size", 200);
    assert_eq!(status, 200, "{same}");
    eprintln!("live reference, same groups: {same:#}");
    assert_eq!(same["reference"], "live", "{same}");
    assert_eq!(same["detected"], false, "{same}");
    let (_, metrics) = server.get_text("/metrics");
    common::promtool_check(&metrics);
    let series = "flywheel_drift_window_size{task=\"sentiment\"} 200";
    assert!(metrics.contains(series), "missing {series}");
}
