//! Real drift over real HTTP: a spam adapter trained on SpamAssassin spam-1 + easy-ham-1 sees more mail from
//! the same groups without drift, then mail from the later corpus (spam-2 + easy-ham-2) and reports drift,
//! in `GET /v1/drift/{task}` and in the metrics, whose exposition (P99, drift, online accuracy) passes
//! `promtool check metrics`.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

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

fn predict_all(server: &Server, texts: &[String]) {
    for chunk in texts.chunks(10) {
        let (status, body) = server.post("/v1/predict", &json!({"task": "spam", "inputs": chunk}));
        assert_eq!(status, 200, "{body}");
    }
}

fn signal<'a>(report: &'a Value, method: &str) -> &'a Value {
    report["signals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["method"] == method)
        .unwrap()
}

#[test]
fn later_mail_drifts_and_mail_from_the_training_groups_does_not() {
    let server = Server::start(
        &[],
        &[
            ("FLYWHEEL_DRIFT__REFERENCE_SIZE", "250"),
            ("FLYWHEEL_DRIFT__WINDOW_SIZE", "250"),
            ("FLYWHEEL_DRIFT__MIN_WINDOW", "250"),
            ("FLYWHEEL_DRIFT__MMD_SAMPLE", "250"),
            ("FLYWHEEL_DRIFT__PERMUTATIONS", "499"),
            ("FLYWHEEL_DRIFT__P_VALUE", "0.01"),
        ],
    );
    let (status, body) = server.post(
        "/v1/tasks",
        &json!({"name": "spam", "labels": ["ham", "spam"]}),
    );
    assert_eq!(status, 201, "{body}");
    // Train on the first mails of spam-1 and easy-ham-1.
    let mut items = Vec::new();
    for (group, label) in [("easy-ham-1", "ham"), ("spam-1", "spam")] {
        for text in mails(group, 0, 20) {
            items.push(json!({"task": "spam", "text": text, "label": label}));
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
    // The reference: later mail of the training groups.
    predict_all(
        &server,
        &interleave(mails("easy-ham-1", 1, 125), mails("spam-1", 1, 125)),
    );
    let (status, body) = server.get_json("/v1/drift/spam");
    assert_eq!(status, 202, "the window is still empty: {body}");

    // More mail from the same groups: no drift.
    predict_all(
        &server,
        &interleave(mails("easy-ham-1", 3, 125), mails("spam-1", 3, 125)),
    );
    let (status, same) = server.get_json("/v1/drift/spam");
    assert_eq!(status, 200, "{same}");
    eprintln!("same groups: {same:#}");
    assert_eq!(same["detected"], false, "{same}");

    // Mail from the later corpus: drift on the inputs.
    predict_all(
        &server,
        &interleave(mails("easy-ham-2", 0, 125), mails("spam-2", 0, 125)),
    );
    let (status, later) = server.get_json("/v1/drift/spam");
    assert_eq!(status, 200, "{later}");
    eprintln!("later corpus: {later:#}");
    assert_eq!(later["detected"], true, "{later}");
    assert_eq!(signal(&later, "mmd")["detected"], true, "{later}");
    assert!(
        signal(&later, "mean_distance")["score"].as_f64().unwrap()
            > signal(&same, "mean_distance")["score"].as_f64().unwrap(),
        "the mean embedding moved more for the later corpus"
    );

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
        "flywheel_online_accuracy{arm=\"stable\",task=\"spam\"}",
        "flywheel_drift_detected{signal=\"embedding\",task=\"spam\"} 1",
        "flywheel_drift_score{method=\"mmd\",signal=\"embedding\",task=\"spam\"}",
        "flywheel_drift_score{method=\"psi\",signal=\"prediction\",task=\"spam\"}",
    ] {
        assert!(metrics.contains(series), "missing {series}");
    }
}
