//! The real server (the `flywheel` binary on port 0 with all-MiniLM-L6-v2) over real HTTP.

mod common;

use common::{compare, reference, response, Server};
use serde_json::{json, Value};

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    body["embeddings"]
        .as_array()
        .expect("embeddings array")
        .iter()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

#[test]
fn health_ready_and_embeddings_that_match_pytorch() {
    let server = Server::start(&[], &[]);
    assert_eq!(
        server.get_text("/health"),
        (200, r#"{"status":"ok"}"#.to_owned())
    );
    assert_eq!(server.get_text("/ready").0, 200);

    let reference = reference();
    let texts: Vec<&str> = reference.iter().map(|(t, _)| t.as_str()).collect();
    let (status, body) = server.post("/v1/embed", &json!({ "inputs": texts }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "all-MiniLM-L6-v2");
    let got = vectors(&body);
    assert_eq!(got.len(), reference.len());
    for ((text, want), got) in reference.iter().zip(&got) {
        let (cos, max) = compare(got, want);
        assert!(
            cos >= 0.9999 && max <= 1e-4,
            "{text:?}: cosine {cos}, max abs diff {max}"
        );
    }

    let (status, body) = server.post("/v1/embed", &json!({ "inputs": reference[4].0 }));
    assert_eq!(status, 200);
    let (cos, _) = compare(&vectors(&body)[0], &reference[4].1);
    assert!(cos >= 0.9999);
}

#[test]
fn normalize_false_returns_the_raw_mean_and_headers_carry_timings() {
    let server = Server::start(&[], &[]);
    let response = ureq::post(&server.url("/v1/embed"))
        .send_json(json!({"inputs": ["hello world"], "normalize": false}))
        .unwrap();
    for h in [
        "x-request-id",
        "x-tokenize-time-ms",
        "x-queue-time-ms",
        "x-inference-time-ms",
    ] {
        assert!(response.header(h).is_some(), "missing header {h}");
    }
    let body: Value = response.into_json().unwrap();
    let v = &vectors(&body)[0];
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert_eq!(v.len(), 384);
    assert!((norm - 1.0).abs() > 0.01, "unnormalised norm was {norm}");
}

#[test]
fn a_request_larger_than_one_batch_is_answered_in_parts_as_if_sent_alone() {
    // A small token budget, so that 24 texts of up to about 120 tokens need several forward passes.
    let server = Server::start(&[], &[("FLYWHEEL_BATCHING__MAX_BATCH_TOKENS", "512")]);
    let texts: Vec<String> = (0..24)
        .map(|i| {
            format!("request {i}: ")
                + &"the quick brown fox jumps over the lazy dog ".repeat(1 + i % 12)
        })
        .collect();
    let (status, body) = server.post("/v1/embed", &json!({ "inputs": texts }));
    assert_eq!(status, 200, "{body}");
    let together = vectors(&body);
    assert_eq!(together.len(), texts.len());
    for i in [0, 11, 23] {
        let (status, alone) = server.post("/v1/embed", &json!({ "inputs": [texts[i]] }));
        assert_eq!(status, 200, "{alone}");
        let (cos, max) = compare(&together[i], &vectors(&alone)[0]);
        assert!(
            cos >= 0.99999 && max <= 1e-5,
            "text {i}: cosine {cos}, max abs diff {max}"
        );
    }
}

#[test]
fn keys_are_checked_before_the_body_is_read() {
    let server = Server::start(
        &[],
        &[
            ("FLYWHEEL_API_KEYS", "user-key"),
            ("FLYWHEEL_ADMIN_KEYS", "root-key"),
        ],
    );
    let call = |method: &str, path: &str, key: Option<&str>, body: &str| {
        let mut request = ureq::request(method, &server.url(path));
        if let Some(key) = key {
            request = request.set("authorization", key);
        }
        match request
            .set("content-type", "application/json")
            .send_string(body)
        {
            Ok(r) => (r.status(), None, r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (
                code,
                r.header("www-authenticate").map(str::to_owned),
                r.into_string().unwrap(),
            ),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    };
    // Without a key, a body that is empty, not JSON or of the wrong shape is not looked at: 401, naming the
    // scheme, in each route family's own error shape.
    for (path, body) in [
        ("/v1/embed", ""),
        ("/v1/embed", "not json"),
        ("/v1/embed", r#"{"inputs": []}"#),
        ("/embed", r#"{"wrong": 1}"#),
        ("/v1/feedback", "{}"),
    ] {
        let (status, challenge, body) = call("POST", path, None, body);
        assert_eq!(
            (status, challenge.as_deref()),
            (401, Some("Bearer")),
            "{path}: {body}"
        );
        assert!(
            body.contains(r#""error_type":"unauthorized""#),
            "{path}: {body}"
        );
    }
    let (status, challenge, body) = call("POST", "/v1/embeddings", Some("Bearer nope"), "{}");
    assert_eq!(
        (status, challenge.as_deref()),
        (401, Some("Bearer")),
        "{body}"
    );
    assert!(body.contains(r#""type":"authentication_error""#), "{body}");
    // An inference key on an admin endpoint: 403 before the missing `path` would have been a 422.
    let (status, _, body) = call("POST", "/v1/adapters", Some("Bearer user-key"), "{}");
    assert_eq!(status, 403, "{body}");
    // The scheme's name is case-insensitive (RFC 9110); /info needs no key, as TEI's.
    let (status, _, body) = call(
        "POST",
        "/v1/embed",
        Some("bearer user-key"),
        r#"{"inputs": "hi"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.get_json("/info").0, 200);
}

/// A server with three requests of `texts` texts of 256 tokens each in flight (seen in its metrics), and
/// the threads that wait for their statuses.
fn busy_server(texts: usize) -> (Server, Vec<std::thread::JoinHandle<Result<u16, String>>>) {
    // Admission off: the three requests together are more than the default budget admits.
    let server = Server::start(&[], &[("FLYWHEEL_BATCHING__MAX_EXPECTED_WAIT_MS", "0")]);
    let text = "the quick brown fox jumps over the lazy dog ".repeat(40);
    let in_flight: Vec<_> = (0..3)
        .map(|_| {
            let (url, texts) = (server.url("/v1/embed"), vec![text.clone(); texts]);
            std::thread::spawn(move || {
                ureq::post(&url)
                    .send_json(json!({ "inputs": texts }))
                    .map(|r| r.status())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    // Three requests and the scrape that counts them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !server
        .get_text("/metrics")
        .1
        .lines()
        .any(|l| l == "flywheel_requests_in_flight 4")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the requests never got in flight"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (server, in_flight)
}

#[test]
fn sigint_answers_the_requests_in_flight_before_the_server_exits() {
    let (server, in_flight) = busy_server(24);
    server.signal(libc::SIGINT);
    for request in in_flight {
        assert_eq!(request.join().unwrap(), Ok(200));
    }
    let (status, log) = server.wait_exit(std::time::Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {log:?}");
}

#[test]
fn a_second_signal_stops_the_server_without_waiting_for_the_drain() {
    // Three times the work: the drain is still going when the second signal comes.
    let (server, in_flight) = busy_server(72);
    server.signal(libc::SIGINT);
    std::thread::sleep(std::time::Duration::from_millis(100));
    server.signal(libc::SIGTERM);
    let (status, log) = server.wait_exit(std::time::Duration::from_secs(3));
    assert_eq!(status.and_then(|s| s.code()), Some(130), "{log:?}");
    drop(in_flight);
}

#[test]
fn head_answers_wherever_get_does_without_a_body() {
    use std::io::{Read, Write};
    let server = Server::start(&[], &[]);
    let raw = |request: &str| {
        let address = server.url("").trim_start_matches("http://").to_owned();
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    };
    for path in ["/health", "/ready", "/info", "/openapi.json", "/metrics"] {
        let answer = raw(&format!(
            "HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        ));
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(body.is_empty(), "{path}: a body after {head}");
    }
    // A POST-only route: 405, naming what it allows.
    let answer = raw("HEAD /v1/embed HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("allow: post"),
        "{answer}"
    );
}

#[test]
fn a_body_that_trickles_in_past_the_deadline_answers_408() {
    use std::io::{Read, Write};
    let server = Server::start(&[], &[("FLYWHEEL_SERVER__BODY_TIMEOUT_SECS", "1")]);
    let address = server.url("").trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let started = std::time::Instant::now();
    stream
        .write_all(
            b"POST /v1/embed HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"inputs\": ",
        )
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    // Others are served meanwhile and after.
    let (status, _) = server.post("/v1/embed", &json!({ "inputs": "hello" }));
    assert_eq!(status, 200);
}

#[test]
fn bad_input_gets_json_errors_with_the_right_status() {
    let server = Server::start(
        &["--max-length", "128"],
        &[("FLYWHEEL_LIMITS__MAX_INPUTS", "4")],
    );
    let cases: Vec<(Value, u16)> = vec![
        (json!({"inputs": []}), 422),
        (json!({"inputs": ""}), 422),
        (json!({"inputs": ["ok", ""]}), 422),
        (json!({"inputs": 5}), 422),
        (json!({"texts": ["x"]}), 422),
        (json!({"inputs": ["a", "b", "c", "d", "e"]}), 422),
    ];
    for (body, want) in cases {
        let (status, answer) = server.post("/v1/embed", &body);
        assert_eq!(status, want, "{body} → {answer}");
        assert!(
            answer["error"].is_string() && answer["error_type"].is_string(),
            "{answer}"
        );
    }
    // White space is a text (a chunker's blank chunk): the model reads its special tokens alone.
    let (status, answer) = server.post("/v1/embed", &json!({"inputs": ["ok", " \n "]}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["embeddings"].as_array().map(Vec::len), Some(2));
    let malformed = ureq::post(&server.url("/v1/embed"))
        .set("content-type", "application/json")
        .send_string("{\"inputs\": [");
    let (status, answer) = response(malformed);
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error_type"], "malformed_request");

    let huge = "x".repeat(5 * 1024 * 1024);
    let (status, answer) =
        response(ureq::post(&server.url("/v1/embed")).send_json(json!({ "inputs": huge })));
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error_type"], "payload_too_large");

    let (status, answer) = response(ureq::get(&server.url("/v1/nothing")).call());
    assert_eq!(
        (status, answer["error_type"].as_str()),
        (404, Some("not_found"))
    );
    let wrong_method = ureq::get(&server.url("/v1/embed")).call();
    let Err(ureq::Error::Status(405, wrong_method)) = wrong_method else {
        panic!("GET /v1/embed should be 405: {wrong_method:?}");
    };
    assert_eq!(wrong_method.header("allow"), Some("POST"));

    // Serving goes on after the errors.
    let (status, _) = server.post("/v1/embed", &json!({"inputs": "still here"}));
    assert_eq!(status, 200);
}

#[test]
fn concurrent_requests_are_batched_and_all_answered() {
    // A functional test of batching, not of admission: its burst (texts up to 256 tokens) shares the two
    // cores with this binary's other servers, whose work slows its batches past the production budget. The
    // defaults' admission under ordinary load is tests/admission_http.rs', on a machine to itself.
    let server = Server::start(&[], &[("FLYWHEEL_BATCHING__MAX_EXPECTED_WAIT_MS", "5000")]);
    let reference = reference();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let (text, want) = &reference[i % reference.len()];
                let server = &server;
                s.spawn(move || {
                    for _ in 0..3 {
                        let (status, body) = server.post("/v1/embed", &json!({ "inputs": [text] }));
                        assert_eq!(status, 200, "{body}");
                        let (cos, _) = compare(&vectors(&body)[0], want);
                        assert!(cos >= 0.9999, "{text:?}: {cos}");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("client thread");
        }
    });
    let (_, metrics) = server.get_text("/metrics");
    let batches: Vec<f64> = metrics
        .lines()
        .filter_map(|l| {
            l.strip_prefix("flywheel_batch_size_count ")
                .or(l.strip_prefix("flywheel_batch_size_sum "))
        })
        .map(|v| v.parse().unwrap())
        .collect();
    let (sum, count) = (batches[0], batches[1]);
    assert_eq!(sum, 96.0, "every sequence went through the model once");
    assert!(
        count < 96.0,
        "some requests shared a forward pass ({count} passes for 96 sequences)"
    );
}

#[test]
fn metrics_expose_request_and_stage_durations() {
    let server = Server::start(&[], &[]);
    server.post("/v1/embed", &json!({"inputs": "count me"}));
    let (status, text) = server.get_text("/metrics");
    assert_eq!(status, 200);
    for name in [
        "flywheel_request_duration_seconds_bucket{arm=\"\",route=\"/v1/embed\",task=\"\"",
        "flywheel_requests_total{route=\"/v1/embed\",status=\"200\"} 1",
        "flywheel_queue_duration_seconds_count 1",
        "flywheel_tokenize_duration_seconds_count 1",
        "flywheel_inference_duration_seconds_count 1",
        "flywheel_batch_size_count 1",
        "flywheel_model_ready 1",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
}

#[test]
fn a_model_directory_missing_a_file_stops_the_server_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        common::model_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"));
    let out = cmd
        .args(["serve", "--port", "0", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokenizer.json"), "{stderr}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn a_cuda_trainer_in_a_build_without_cuda_stops_the_server_naming_the_feature() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["serve", "--port", "0", "--model"])
        .arg(common::model_dir())
        .env("FLYWHEEL_TRAINER__DEVICE", "cuda:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`cuda` cargo feature"), "{stderr}");
}

/// Sends `clients` concurrent 256-token requests to a server started with `env`, expects some to be shed
/// with 429 `overloaded` and `Retry-After`, none to fail otherwise, serving to go on, and the rejections
/// counted under `reason`.
fn shed_a_storm(env: &[(&str, &str)], clients: usize, reason: &str) {
    let server = Server::start(&[], env);
    let long = "overload ".repeat(300);
    // A first request measures the model's speed, which admission by expected wait needs.
    let (status, _) = server.post("/v1/embed", &json!({ "inputs": [&long] }));
    assert_eq!(status, 200);
    let results: Vec<(u16, Option<String>, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (server, long) = (&server, &long);
                s.spawn(move || {
                    match ureq::post(&server.url("/v1/embed"))
                        .send_json(json!({ "inputs": [long] }))
                    {
                        Ok(r) => (r.status(), None, Value::Null),
                        Err(ureq::Error::Status(code, r)) => {
                            let retry = r.header("retry-after").map(str::to_owned);
                            (code, retry, r.into_json().unwrap_or(Value::Null))
                        }
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let rejected: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(
        results.iter().all(|r| r.0 == 200 || r.0 == 429),
        "{results:?}"
    );
    assert!(!rejected.is_empty(), "nothing was shed: {results:?}");
    assert!(rejected
        .iter()
        .all(|r| r.1.is_some() && r.2["error_type"] == "overloaded"));
    let (status, _) = server.post("/v1/embed", &json!({"inputs": "after the storm"}));
    assert_eq!(status, 200);
    let (_, metrics) = server.get_text("/metrics");
    let counter = format!(r#"flywheel_requests_rejected_total{{reason="{reason}"}}"#);
    assert!(metrics.contains(&counter), "no {counter} in {metrics}");
}

#[test]
fn a_full_queue_answers_429_with_retry_after_and_recovers() {
    shed_a_storm(
        &[
            ("FLYWHEEL_LIMITS__MAX_INPUTS", "1"),
            ("FLYWHEEL_BATCHING__QUEUE_CAPACITY", "1"),
            ("FLYWHEEL_BATCHING__MAX_EXPECTED_WAIT_MS", "0"),
        ],
        16,
        "queue_full",
    );
}

#[test]
fn a_request_expected_to_wait_over_the_budget_answers_429_with_retry_after() {
    // One 256-token pass takes tens of milliseconds, so 128 arriving at once are seconds of work: more
    // than the model serves in the time the offered load is averaged over (overload), and far more than
    // the 20 ms budget; the queue itself has room for all of them.
    shed_a_storm(
        &[("FLYWHEEL_BATCHING__MAX_EXPECTED_WAIT_MS", "20")],
        128,
        "expected_wait",
    );
}

#[test]
fn a_request_the_model_cannot_answer_in_time_gets_503_with_retry_after() {
    let server = Server::start(&[], &[("FLYWHEEL_BATCHING__REQUEST_TIMEOUT_MS", "1")]);
    // A 256-token forward pass takes tens of milliseconds: far over the 1 ms limit.
    let long = "timeout ".repeat(300);
    let answer = ureq::post(&server.url("/v1/embed")).send_json(json!({ "inputs": [long] }));
    let Err(ureq::Error::Status(code, response)) = answer else {
        panic!("expected an error status, got {answer:?}");
    };
    assert_eq!(code, 503);
    assert!(response.header("retry-after").is_some());
    let body: Value = response.into_json().unwrap();
    assert_eq!(body["error_type"], "timeout", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("request_timeout_ms"),
        "{body}"
    );
    let (_, metrics) = server.get_text("/metrics");
    assert!(
        metrics.contains(r#"flywheel_requests_rejected_total{reason="timeout"} 1"#),
        "{metrics}"
    );
    // The server is still up.
    let (status, _) = server.get_json("/health");
    assert_eq!(status, 200);
}

#[test]
fn the_exposition_passes_promtool_and_carries_a_p99_per_route() {
    let server = Server::start(&[], &[]);
    for _ in 0..20 {
        server.post("/v1/embed", &json!({"inputs": "latency sample"}));
    }
    let (_, text) = server.get_text("/metrics");
    assert!(
        text.contains("# TYPE flywheel_request_latency_seconds summary"),
        "{text}"
    );
    let p99 = text
        .lines()
        .find(|l| {
            l.starts_with(r#"flywheel_request_latency_seconds{route="/v1/embed",quantile="0.99"}"#)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .expect("a P99 line for /v1/embed");
    assert!(p99 > 0.0 && p99 < 10.0, "{p99}");
    assert!(
        text.contains(r#"flywheel_request_latency_seconds_count{route="/v1/embed"} 20"#),
        "{text}"
    );

    common::promtool_check(&text);
}

#[test]
fn openapi_document_lists_every_route_the_server_answers() {
    let server = Server::start(&[], &[]);
    let (status, doc) = server.get_json("/openapi.json");
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        // Path parameters get a value no resource has: the route must still be matched (no "no such endpoint").
        let concrete = path.replace('{', "").replace('}', "-none");
        for method in item.as_object().unwrap().keys() {
            operations += 1;
            let method = method.to_uppercase();
            let request = ureq::request(&method, &server.url(&concrete));
            let (status, body) = if method == "GET" || method == "DELETE" {
                response(request.call())
            } else {
                response(request.send_json(json!({})))
            };
            assert_ne!(status, 405, "{method} {path}: {body}");
            assert!(
                !(status == 404 && body["error"] == "no such endpoint"),
                "{method} {path} is documented but not routed"
            );
            let documented = &item[method.to_lowercase()]["responses"][status.to_string()];
            assert!(
                documented.is_object(),
                "{method} {path} answered {status}, which the document does not list: {body}"
            );
        }
    }
    assert_eq!(operations, 37);
    let trace = ureq::request("TRACE", &server.url("/health")).call();
    let Err(ureq::Error::Status(405, trace)) = trace else {
        panic!("TRACE /health should be 405: {trace:?}");
    };
    assert_eq!(trace.header("allow"), Some("GET"));
}
