//! Admission control on the shipped defaults, over real HTTP with the real model: the ordinary load of many
//! concurrent clients with short texts is served in full, from the server's very first requests. A test
//! binary of its own with one test, so that no other server shares the machine's cores while it runs (the
//! load must be one an idle server carries; shedding under real overload is tests/server.rs').

mod common;

use common::Server;
use serde_json::{json, Value};

/// `clients` threads each sending `rounds` requests made by `body(client, round)` to `path`; every
/// (status, body), in no particular order.
fn load(
    server: &Server,
    path: &str,
    clients: usize,
    rounds: usize,
    body: impl Fn(usize, usize) -> Value + Sync,
) -> Vec<(u16, Value)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let body = &body;
                s.spawn(move || {
                    (0..rounds)
                        .map(|j| server.post(path, &body(i, j)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    })
}

#[test]
fn ordinary_concurrent_load_on_the_default_config_is_never_refused() {
    // The load of the admission issue: 32 clients, one short sentence each, 20 rounds, starting with the
    // server's very first requests. The start-up calibration prices the queue as the batches it forms, so
    // none of it is refused (a correctness check; no timing asserted).
    let server = Server::start(&[], &[]);
    let log = server.log_lines();
    assert!(
        log.iter().any(|l| l.contains("batch cost calibrated")),
        "the start-up log names the fitted batch cost: {log:?}"
    );
    let answers = load(
        &server,
        "/v1/embed",
        32,
        20,
        |i, j| json!({ "inputs": format!("client {i} asks for sentence number {j} to be embedded") }),
    );
    assert_eq!(answers.len(), 640);
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }

    // 16 clients classifying through a LoRA adapter (the Python PEFT fixture).
    let (status, body) = server.post(
        "/v1/tasks",
        &json!({"name": "sentiment", "labels": ["negative", "neutral", "positive"]}),
    );
    assert_eq!(status, 201, "{body}");
    common::copy_peft_fixture(&server, "fixture");
    let (status, body) = server.post(
        "/v1/adapters",
        &json!({"path": "fixture", "task": "sentiment"}),
    );
    assert_eq!(status, 201, "{body}");
    let answers = load(&server, "/v1/predict", 16, 20, |i, j| {
        json!({
            "task": "sentiment",
            "inputs": format!("customer {i} writes review number {j}: it works well"),
            "routing_key": format!("customer-{i}"),
        })
    });
    assert_eq!(answers.len(), 320);
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    let (_, metrics) = server.get_text("/metrics");
    let rejected: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("flywheel_requests_rejected_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(rejected, 0.0, "{metrics}");
}
