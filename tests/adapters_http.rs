//! Adapters over real HTTP with the real model: a Python PEFT adapter served by /v1/predict with PyTorch's
//! probabilities, bad adapters refused while serving goes on, alias hot-swap under load, restart recovery.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::Server;
use flywheel::adapters::peft;
use flywheel::model::adapter::Pooling;
use flywheel::model::BertConfig;
use serde_json::{json, Value};

fn reference() -> (Vec<String>, Vec<(String, Vec<f32>)>) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_seq_cls_reference.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let labels = doc["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect();
    let items = doc["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let probs = i["probs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_f64().unwrap() as f32)
                .collect();
            (i["text"].as_str().unwrap().to_owned(), probs)
        })
        .collect();
    (labels, items)
}

/// A second, different adapter: the fixture with its classifier bias shifted, written by Flywheel's writer.
fn write_variant(server: &Server, name: &str) {
    let model: BertConfig = serde_json::from_str(
        &std::fs::read_to_string(common::model_dir().join("config.json")).unwrap(),
    )
    .unwrap();
    let (config, mut adapter) =
        peft::read(&common::peft_fixture_dir(), &model, Pooling::Cls).unwrap();
    adapter.head.as_mut().unwrap().classifier.bias[0] += 3.0;
    let dir = server.data_dir.join("adapters").join(name);
    peft::write_dir(&dir, &adapter, config.lora_alpha, "all-MiniLM-L6-v2").unwrap();
}

fn setup(server: &Server) -> String {
    let (labels, _) = reference();
    let (status, body) = server.post("/v1/tasks", &json!({"name": "sentiment", "labels": labels}));
    assert_eq!(status, 201, "{body}");
    common::copy_peft_fixture(server, "peft-fixture");
    let (status, body) = server.post(
        "/v1/adapters",
        &json!({"path": "peft-fixture", "task": "sentiment"}),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["aliases"], json!(["sentiment"]));
    assert_eq!(
        (body["rank"].as_u64(), body["alpha"].as_f64()),
        (Some(8), Some(16.0))
    );
    body["id"].as_str().unwrap().to_owned()
}

#[test]
fn a_python_peft_adapter_predicts_pytorchs_probabilities_over_http() {
    let server = Server::start(&[], &[]);
    let id = setup(&server);
    let (labels, items) = reference();
    let texts: Vec<&str> = items.iter().map(|(t, _)| t.as_str()).collect();
    let (status, body) = server.post(
        "/v1/predict",
        &json!({"task": "sentiment", "inputs": texts}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["adapter"].as_str(), body["arm"].as_str()),
        (Some(id.as_str()), Some("stable"))
    );
    assert!(body["request_id"].is_string());
    for ((text, want), got) in items.iter().zip(body["predictions"].as_array().unwrap()) {
        for (label, p) in labels.iter().zip(want) {
            let q = got["scores"][label].as_f64().unwrap() as f32;
            assert!((q - p).abs() < 1e-4, "{text:?} {label}: {q} vs PyTorch {p}");
        }
        let best = want
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(got["label"], labels[best]);
    }
    let (_, task) = server.get_json("/v1/tasks/sentiment");
    assert_eq!(task["stable"], id);
    let (_, list) = server.get_json("/v1/adapters");
    assert_eq!(
        list[0]["trainable_params"],
        6 * 2 * 2 * 8 * 384 + 3 * 384 + 3
    );
    let (_, metrics) = server.get_text("/metrics");
    assert!(metrics.contains("flywheel_adapters_loaded 1"), "{metrics}");
    assert!(
        metrics.contains(r#"route="/v1/predict",task="sentiment""#),
        "{metrics}"
    );
}

#[test]
fn bad_adapters_and_requests_get_4xx_while_serving_goes_on() {
    let server = Server::start(&[], &[]);
    setup(&server);
    let root = server.data_dir.join("adapters");
    std::fs::create_dir_all(root.join("truncated")).unwrap();
    let bytes = std::fs::read(common::peft_fixture_dir().join(peft::WEIGHTS_FILE)).unwrap();
    std::fs::write(
        root.join("truncated").join(peft::WEIGHTS_FILE),
        &bytes[..bytes.len() / 3],
    )
    .unwrap();
    std::fs::copy(
        common::peft_fixture_dir().join(peft::CONFIG_FILE),
        root.join("truncated").join(peft::CONFIG_FILE),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("garbage")).unwrap();
    std::fs::write(
        root.join("garbage").join(peft::WEIGHTS_FILE),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
    )
    .unwrap();
    std::fs::write(root.join("garbage").join(peft::CONFIG_FILE), b"{\"r\": 8}").unwrap();
    let cases = [
        (
            json!({"path": "../../etc", "task": "sentiment"}),
            422,
            "path_outside_adapter_root",
        ),
        (
            json!({"path": "/etc", "task": "sentiment"}),
            422,
            "path_outside_adapter_root",
        ),
        (
            json!({"path": "truncated", "task": "sentiment"}),
            422,
            "invalid_request",
        ),
        (
            json!({"path": "garbage", "task": "sentiment"}),
            422,
            "invalid_request",
        ),
        (
            json!({"path": "missing", "task": "sentiment"}),
            404,
            "not_found",
        ),
        (
            json!({"path": "peft-fixture", "task": "nope"}),
            404,
            "not_found",
        ),
    ];
    for (body, status, kind) in cases {
        let (got, answer) = server.post("/v1/adapters", &body);
        assert_eq!(
            (got, answer["error_type"].as_str()),
            (status, Some(kind)),
            "{body} → {answer}"
        );
    }
    let predict = |body: Value| server.post("/v1/predict", &body);
    assert_eq!(predict(json!({"task": "nope", "inputs": "x"})).0, 404);
    assert_eq!(
        predict(json!({"task": "sentiment", "inputs": "x", "adapter": "g-unknown"})).0,
        404
    );
    assert_eq!(predict(json!({"task": "sentiment", "inputs": []})).0, 422);
    assert_eq!(
        server
            .post("/v1/tasks", &json!({"name": "x y", "labels": ["a", "b"]}))
            .0,
        422
    );
    assert_eq!(
        server
            .post(
                "/v1/tasks",
                &json!({"name": "sentiment", "labels": ["a", "b"]})
            )
            .0,
        409
    );
    assert_eq!(
        server
            .post("/v1/tasks", &json!({"name": "empty", "labels": ["a", "b"]}))
            .0,
        201
    );
    assert_eq!(
        predict(json!({"task": "empty", "inputs": "x"})).0,
        409,
        "a task without a generation"
    );
    let (_, list) = server.get_json("/v1/adapters");
    let id = list[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        server
            .send("DELETE", &format!("/v1/adapters/{id}"), &json!({}))
            .0,
        409,
        "the stable alias uses it"
    );
    let (status, error) = server.send("DELETE", "/v1/adapters/sentiment", &json!({}));
    assert_eq!(
        status, 409,
        "by its alias: the generation the alias keeps, {error}"
    );
    assert!(error["error"].as_str().unwrap().contains(&id), "{error}");
    let (status, error) = server.post(
        "/v1/tasks",
        &json!({"name": "controls", "labels": ["a\u{0}", "b"]}),
    );
    assert_eq!(status, 422, "a label with a NUL: {error}");
    let (status, _) = predict(json!({"task": "sentiment", "inputs": "still serving"}));
    assert_eq!(status, 200);
}

#[test]
fn moving_an_alias_100_times_under_load_fails_no_request() {
    let server = Server::start(&[], &[]);
    let first = setup(&server);
    write_variant(&server, "variant");
    let (status, body) = server.post(
        "/v1/adapters",
        &json!({"path": "variant", "task": "sentiment"}),
    );
    assert_eq!(status, 201, "{body}");
    let second = body["id"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    let stop = AtomicBool::new(false);
    let (served, failures) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    std::thread::scope(|s| {
        for worker in 0..4 {
            let (server, stop, served, failures, seen) =
                (&server, &stop, &served, &failures, &seen);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let text = format!("request from worker {worker}");
                    let (status, body) =
                        server.post("/v1/predict", &json!({"task": "sentiment", "inputs": text}));
                    if status == 200 {
                        served.fetch_add(1, Ordering::Relaxed);
                        seen.lock()
                            .unwrap()
                            .insert(body["adapter"].as_str().unwrap().to_owned());
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        for i in 0..100 {
            let target = if i % 2 == 0 { &second } else { &first };
            let (status, body) = server.send(
                "PUT",
                "/v1/aliases/sentiment",
                &json!({ "adapter": target }),
            );
            assert_eq!(status, 200, "{body}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(served.load(Ordering::Relaxed) > 0);
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter().all(|id| *id == first || *id == second),
        "{seen:?}"
    );
    eprintln!(
        "{} requests served during 100 alias moves, generations seen: {seen:?}",
        served.load(Ordering::Relaxed)
    );
}

#[test]
fn a_restart_restores_tasks_generations_and_aliases() {
    let data = tempfile::tempdir().unwrap();
    let (id, variant) = {
        let server = Server::start_in(data.path(), &[]);
        let id = setup(&server);
        write_variant(&server, "variant");
        let (_, body) = server.post(
            "/v1/adapters",
            &json!({"path": "variant", "task": "sentiment", "alias": "canary"}),
        );
        (id, body["id"].as_str().unwrap().to_owned())
    };
    let server = Server::start_in(data.path(), &[]);
    let (status, body) = server.post(
        "/v1/predict",
        &json!({"task": "sentiment", "inputs": "hello again"}),
    );
    assert_eq!(
        (status, body["adapter"].as_str()),
        (200, Some(id.as_str())),
        "{body}"
    );
    let (status, body) = server.post(
        "/v1/predict",
        &json!({"task": "sentiment", "inputs": "hi", "adapter": "canary"}),
    );
    assert_eq!(
        (status, body["adapter"].as_str(), body["arm"].as_str()),
        (200, Some(variant.as_str()), Some("pinned"))
    );

    // The alias keeps its generation until it is removed; the task's own alias cannot be.
    let delete = |path: &str| server.send("DELETE", path, &json!({}));
    assert_eq!(delete(&format!("/v1/adapters/{variant}")).0, 409);
    let (status, error) = delete("/v1/aliases/sentiment");
    assert_eq!(status, 409, "{error}");
    assert_eq!(delete("/v1/aliases/canary").0, 204);
    assert_eq!(delete("/v1/aliases/canary").0, 404);
    let (status, _) = server.post(
        "/v1/predict",
        &json!({"task": "sentiment", "inputs": "hi", "adapter": "canary"}),
    );
    assert_eq!(status, 404, "the alias is gone");
    assert_eq!(delete(&format!("/v1/adapters/{variant}")).0, 204);
}
