//! The OpenAI-style and TEI-style routes over real HTTP with the real model: each answers in its
//! ecosystem's shape and agrees with Flywheel's own routes; `model` selects the base model, a task, an
//! alias or a generation; and the real OpenAI Python SDK and LangChain work against the server.

mod common;

use base64::Engine as _;
use common::Server;
use serde_json::{json, Value};

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

const TEXTS: [&str; 3] = [
    "The quarterly report is due on Friday.",
    "Win a free cruise! Click here now to claim your prize.",
    "退货很麻烦，客服也不回复。",
];

/// Flywheel's own `/v1/embed` vectors of `TEXTS`.
fn own_embeddings(server: &Server) -> Vec<Vec<f32>> {
    let (status, body) = server.post("/v1/embed", &json!({ "inputs": TEXTS }));
    assert_eq!(status, 200, "{body}");
    body["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect()
}

fn sentiment_task(server: &Server) -> String {
    let (status, _) = server.post(
        "/v1/tasks",
        &json!({"name": "sentiment", "labels": ["negative", "neutral", "positive"]}),
    );
    assert_eq!(status, 201);
    common::copy_peft_fixture(server, "fixture");
    let (status, body) = server.post(
        "/v1/adapters",
        &json!({"path": "fixture", "task": "sentiment", "alias": "sentiment-v1"}),
    );
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

#[test]
fn openai_embeddings_match_the_own_route_as_floats_base64_token_ids_and_shortened() {
    let server = Server::start(&[], &[]);
    let own = own_embeddings(&server);

    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({"input": TEXTS, "model": "all-MiniLM-L6-v2", "encoding_format": "float"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "all-MiniLM-L6-v2");
    let (_, own_body) = server.post("/v1/embed", &json!({ "inputs": TEXTS }));
    assert_eq!(body["usage"]["prompt_tokens"], own_body["usage"]["tokens"]);
    assert_eq!(body["usage"]["total_tokens"], own_body["usage"]["tokens"]);
    for (i, item) in body["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert!(max_diff(&floats(&item["embedding"]), &own[i]) <= 1e-6);
    }

    // base64 (the OpenAI Python SDK's default): little-endian f32 bytes, bit for bit.
    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({"input": TEXTS[1], "model": "sentence-transformers/all-MiniLM-L6-v2",
                "encoding_format": "base64", "user": "someone"}),
    );
    assert_eq!(status, 200, "{body}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(max_diff(&decoded, &own[1]) <= 1e-6);

    // dimensions: the first 128 values, unit length again.
    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({"input": TEXTS[0], "dimensions": 128}),
    );
    assert_eq!(status, 200, "{body}");
    let short = floats(&body["data"][0]["embedding"]);
    assert_eq!(short.len(), 128);
    assert!(max_diff(&short, &unit(own[0][..128].to_vec())) <= 1e-6);

    // Token ids as /tokenize gives them embed like the text.
    let (status, tokens) = server.post("/tokenize", &json!({ "inputs": TEXTS[0] }));
    assert_eq!(status, 200, "{tokens}");
    let ids: Vec<u64> = tokens[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let (status, body) = server.post("/v1/embeddings", &json!({ "input": [ids.clone()] }));
    assert_eq!(status, 200, "{body}");
    assert!(max_diff(&floats(&body["data"][0]["embedding"]), &own[0]) <= 1e-6);
    let (status, body) = server.post("/v1/embeddings", &json!({ "input": ids }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["usage"]["prompt_tokens"],
        tokens[0].as_array().unwrap().len()
    );
    // Ids longer than the model's length are cut as the text is, keeping [SEP] (102): 300 × "the" (1996).
    let long_ids: Vec<u64> = std::iter::once(101)
        .chain(std::iter::repeat_n(1996, 300))
        .chain(std::iter::once(102))
        .collect();
    let (_, by_ids) = server.post("/v1/embeddings", &json!({ "input": [long_ids] }));
    let (_, by_text) = server.post("/v1/embeddings", &json!({ "input": "the ".repeat(300) }));
    let (a, b) = (
        floats(&by_ids["data"][0]["embedding"]),
        floats(&by_text["data"][0]["embedding"]),
    );
    assert!(max_diff(&a, &b) <= 1e-6, "{}", max_diff(&a, &b));

    // Errors in OpenAI's shape.
    for (request, status, param, code) in [
        (
            json!({"input": "x", "model": "gpt-4"}),
            404,
            Value::from("model"),
            "model_not_found",
        ),
        (
            json!({"input": "x", "dimensions": 385}),
            400,
            Value::from("dimensions"),
            "invalid_request",
        ),
        (
            json!({"input": "x", "dimensions": 0}),
            400,
            Value::from("dimensions"),
            "invalid_request",
        ),
        (
            json!({"input": []}),
            400,
            Value::from("input"),
            "invalid_request",
        ),
        (
            json!({"input": [[]]}),
            400,
            Value::from("input"),
            "invalid_request",
        ),
        (
            json!({"input": [[999999]]}),
            400,
            Value::from("input"),
            "invalid_request",
        ),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            400,
            Value::Null,
            "invalid_request",
        ),
        (
            json!({"model": "all-MiniLM-L6-v2"}),
            400,
            Value::Null,
            "invalid_request",
        ),
    ] {
        let (got, body) = server.post("/v1/embeddings", &request);
        assert_eq!(got, status, "{request} → {body}");
        let error = &body["error"];
        assert_eq!(error["code"], code, "{body}");
        assert_eq!(error["param"], param, "{body}");
        assert!(!error["message"].as_str().unwrap().is_empty());
        let kind = if status == 404 {
            "not_found_error"
        } else {
            "invalid_request_error"
        };
        assert_eq!(error["type"], kind, "{body}");
    }
    let (status, body) = common::response(
        ureq::post(&server.url("/v1/embeddings"))
            .set("content-type", "application/json")
            .send_string("{not json"),
    );
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "malformed_request", "{body}");
}

#[test]
fn models_list_the_base_tasks_aliases_and_generations_and_model_selects_each() {
    let server = Server::start(&[], &[]);
    let generation = sentiment_task(&server);

    let (status, list) = server.get_json("/v1/models");
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["object"], "list");
    let cards = list["data"].as_array().unwrap();
    let card = |id: &str| {
        cards
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no card {id} in {list}"))
    };
    let base = card("all-MiniLM-L6-v2");
    assert_eq!(base["kind"], "base");
    assert_eq!(base["object"], "model");
    assert_eq!(base["owned_by"], "flywheel");
    assert!(base["parent"].is_null());
    let task = card("sentiment");
    assert_eq!(
        (task["kind"].as_str(), task["parent"].as_str()),
        (Some("task"), Some("all-MiniLM-L6-v2"))
    );
    let alias = card("sentiment-v1");
    assert_eq!(alias["kind"], "alias");
    assert_eq!(alias["parent"], generation.as_str());
    let gen = card(&generation);
    assert_eq!(gen["kind"], "generation");
    assert_eq!(gen["parent"], "sentiment");
    for c in cards {
        assert_eq!(c["root"], "all-MiniLM-L6-v2", "{c}");
        assert!(c["created"].as_u64().unwrap() > 1_600_000_000, "{c}");
    }
    assert_eq!(cards.len(), 4, "{list}");
    let (status, one) = server.get_json(&format!("/v1/models/{generation}"));
    assert_eq!(status, 200);
    assert_eq!(&one, gen);
    let (status, hub) = server.get_json("/v1/models/sentence-transformers%2Fall-MiniLM-L6-v2");
    assert_eq!(status, 200, "{hub}");
    assert_eq!(hub["kind"], "base", "{hub}");
    // Older OpenAI SDKs send the slash unencoded.
    let (status, unencoded) = server.get_json("/v1/models/sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!((status, &unencoded), (200, &hub));
    let (status, missing) = server.get_json("/v1/models/nope");
    assert_eq!(status, 404);
    assert_eq!(missing["error"]["code"], "model_not_found");

    // The task through /v1/classify and through /v1/predict agree; alias and generation pin.
    let (status, predicted) = server.post(
        "/v1/predict",
        &json!({"task": "sentiment", "inputs": TEXTS}),
    );
    assert_eq!(status, 200, "{predicted}");
    for (model, arm) in [
        ("sentiment", "stable"),
        ("sentiment-v1", "pinned"),
        (generation.as_str(), "pinned"),
    ] {
        let (status, body) = server.post(
            "/v1/classify",
            &json!({"model": model, "input": TEXTS, "routing_key": "customer-7"}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], model);
        assert_eq!(body["arm"], arm);
        assert_eq!(body["adapter"], generation.as_str());
        assert_eq!(body["labels"], json!(["negative", "neutral", "positive"]));
        assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
        for (i, item) in body["data"].as_array().unwrap().iter().enumerate() {
            let own = &predicted["predictions"][i];
            assert_eq!(item["index"], i);
            assert_eq!(item["label"], own["label"]);
            assert_eq!(item["num_classes"], 3);
            let probs = floats(&item["probs"]);
            for (p, label) in probs.iter().zip(["negative", "neutral", "positive"]) {
                assert!((p - own["scores"][label].as_f64().unwrap() as f32).abs() <= 1e-6);
            }
        }
        // Feedback may name the answer's id, as it names /v1/predict's request_id.
        let (status, fb) = server.post(
            "/v1/feedback",
            &json!({"request_id": body["id"], "label": "negative", "index": 0}),
        );
        assert_eq!(status, 202, "{fb}");
    }
    // vLLM's path, without `model` (the only task) and with raw logits (`use_activation: false`).
    let (status, vllm) = server.post(
        "/classify",
        &json!({"input": TEXTS, "use_activation": false}),
    );
    assert_eq!(status, 200, "{vllm}");
    assert_eq!(vllm["model"], "sentiment");
    for (i, item) in vllm["data"].as_array().unwrap().iter().enumerate() {
        let logits = floats(&item["probs"]);
        let top = logits.iter().map(|l| l.exp()).sum::<f32>();
        let probs: Vec<f32> = logits.iter().map(|l| l.exp() / top).collect();
        let own = &predicted["predictions"][i];
        assert_eq!(item["label"], own["label"]);
        for (p, label) in probs.iter().zip(["negative", "neutral", "positive"]) {
            assert!((p - own["scores"][label].as_f64().unwrap() as f32).abs() <= 1e-5);
        }
    }
    for (model, status, code) in [
        ("all-MiniLM-L6-v2", 400, "invalid_request"),
        ("nope", 404, "model_not_found"),
    ] {
        let (got, body) = server.post("/v1/classify", &json!({"model": model, "input": "hello"}));
        assert_eq!(got, status, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(body["error"]["param"], "model", "{body}");
    }
    // What LoRA-aware routers read: every adapter name resident, none waiting; queue gauges.
    let (_, metrics) = server.get_text("/metrics");
    let info = metrics
        .lines()
        .find(|l| l.starts_with("flywheel_lora_requests_info{"))
        .unwrap_or_else(|| panic!("no flywheel_lora_requests_info in {metrics}"));
    for name in ["sentiment", "sentiment-v1", generation.as_str()] {
        assert!(info.contains(name), "{info}");
    }
    assert!(
        info.contains(r#"max_lora="64""#) && info.contains(r#"waiting_lora_adapters="""#),
        "{info}"
    );
    for gauge in [
        "flywheel_num_requests_waiting 0",
        "flywheel_num_requests_running 0",
        "flywheel_kv_cache_usage_perc 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == gauge),
            "no {gauge:?} in {metrics}"
        );
    }
    common::promtool_check(&metrics);

    // A classifier's name is no embedding model.
    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({"model": "sentiment", "input": "x"}),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "model");
}

#[test]
fn tei_routes_answer_in_teis_shapes() {
    let server = Server::start(&[], &[]);
    let own = own_embeddings(&server);

    // TEI's documented examples: `{"inputs": "What is Deep Learning?"}` → [[...]].
    let (status, body) = server.post("/embed", &json!({ "inputs": TEXTS[0] }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().unwrap().len(), 1);
    assert!(max_diff(&floats(&body[0]), &own[0]) <= 1e-6);
    let (status, body) = server.post(
        "/embed",
        &json!({"inputs": TEXTS, "normalize": true, "truncate": true, "truncation_direction": "Right"}),
    );
    assert_eq!(status, 200, "{body}");
    for (i, v) in body.as_array().unwrap().iter().enumerate() {
        assert!(max_diff(&floats(v), &own[i]) <= 1e-6);
    }
    let (_, body) = server.post("/embed", &json!({"inputs": TEXTS[2], "dimensions": 64}));
    assert!(max_diff(&floats(&body[0]), &unit(own[2][..64].to_vec())) <= 1e-6);
    let long = "word ".repeat(400);
    let (status, body) = server.post("/embed", &json!({"inputs": long, "truncate": false}));
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error_type"], "input_too_long");
    let (status, _) = server.post("/embed", &json!({ "inputs": long }));
    assert_eq!(status, 200, "truncated by default (TEI's --auto-truncate)");
    let (status, _) = server.post(
        "/embed",
        &json!({"inputs": "x", "truncation_direction": "Left"}),
    );
    assert_eq!(status, 422);
    // huggingface_hub's InferenceClient posts to the root, and spells the direction in lower case.
    let (status, body) = server.post(
        "/",
        &json!({"inputs": TEXTS[1], "truncation_direction": "right"}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(max_diff(&floats(&body[0]), &own[1]) <= 1e-6);

    // /tokenize: a list of tokens per input, special tokens without offsets, text the bytes covered.
    let (status, body) = server.post("/tokenize", &json!({"inputs": ["Hello, world!", "退货"]}));
    assert_eq!(status, 200, "{body}");
    let first = body[0].as_array().unwrap();
    assert_eq!(
        first[0],
        json!({"id": 101, "text": "[CLS]", "special": true, "start": null, "stop": null})
    );
    assert_eq!(
        first[1],
        json!({"id": 7592, "text": "Hello", "special": false, "start": 0, "stop": 5})
    );
    assert_eq!(first.last().unwrap()["text"], "[SEP]");
    let second = body[1].as_array().unwrap();
    assert_eq!(second[1]["text"], "退");
    assert_eq!(
        (second[2]["start"].as_u64(), second[2]["stop"].as_u64()),
        (Some(3), Some(6))
    );
    let (_, bare) = server.post(
        "/tokenize",
        &json!({"inputs": "Hello", "add_special_tokens": false}),
    );
    assert_eq!(
        bare,
        json!([[{"id": 7592, "text": "Hello", "special": false, "start": 0, "stop": 5}]])
    );

    // /info
    let (status, info) = server.get_json("/info");
    assert_eq!(status, 200);
    assert_eq!(info["model_id"], "all-MiniLM-L6-v2");
    assert_eq!(info["model_dtype"], "float32");
    assert_eq!(
        info["model_type"],
        json!({"embedding": {"pooling": "mean"}})
    );
    assert_eq!(info["max_input_length"], 256);
    assert_eq!(info["auto_truncate"], true);
    assert!(
        info["sha"].is_null() && info["docker_label"].is_null(),
        "{info}"
    );
    for key in [
        "max_batch_tokens",
        "max_client_batch_size",
        "max_concurrent_requests",
    ] {
        assert!(info[key].as_u64().unwrap() > 0, "{key}: {info}");
    }

    // /predict needs a classifier: none yet.
    let (status, body) = server.post("/predict", &json!({"inputs": "I like you."}));
    assert_eq!(status, 422, "{body}");
    sentiment_task(&server);
    let (status, single) = server.post("/predict", &json!({"inputs": "I like you."}));
    assert_eq!(status, 200, "{single}");
    let scores: Vec<f32> = single
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["score"].as_f64().unwrap() as f32)
        .collect();
    assert_eq!(scores.len(), 3);
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "highest first: {single}"
    );
    assert!((scores.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    let (_, raw) = server.post(
        "/predict",
        &json!({"inputs": "I like you.", "raw_scores": true}),
    );
    let logits: Vec<(String, f32)> = raw
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["label"].as_str().unwrap().to_owned(),
                p["score"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    let z: f32 = logits.iter().map(|(_, l)| l.exp()).sum();
    for p in single.as_array().unwrap() {
        let logit = logits
            .iter()
            .find(|(l, _)| p["label"] == l.as_str())
            .unwrap()
            .1;
        assert!((logit.exp() / z - p["score"].as_f64().unwrap() as f32).abs() < 1e-5);
    }
    let (status, batch) = server.post(
        "/predict",
        &json!({"inputs": [["I like you."], ["I hate pineapples"]]}),
    );
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch.as_array().unwrap().len(), 2);
    assert_eq!(batch[0], single);
    let (status, body) = server.post(
        "/predict",
        &json!({"inputs": ["I like you.", "I hate pineapples"]}),
    );
    assert_eq!(status, 422, "a TEI sentence pair: {body}");
}

/// The real OpenAI Python SDK (default arguments: base64; float; dimensions) and LangChain's
/// `OpenAIEmbeddings`, pointed at the server, give `/v1/embed`'s vectors (tests/clients/openai_clients.py).
#[test]
fn the_openai_python_sdk_and_langchain_embed_through_the_server() {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ready = std::process::Command::new(&python)
        .args(["-c", "import openai, langchain_openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ready,
        "the OpenAI SDK and LangChain are missing: run scripts/python-clients.sh (scripts/test.sh does)"
    );
    let server = Server::start(&[], &[]);
    let output = std::process::Command::new(&python)
        .arg(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/clients/openai_clients.py"),
        )
        .arg(&server.base)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for check in ["sdk-base64", "sdk-float", "sdk-dimensions", "langchain"] {
        assert!(stdout.contains(&format!("ok {check}")), "{stdout}");
    }
}
