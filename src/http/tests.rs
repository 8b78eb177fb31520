//! The request chains in process: the real routes, services, stores and threads on a tiny model whose
//! serving encoder is a [`FakeEncoder`], so what a text is classified as follows from its words and each
//! test runs in milliseconds to a second. The real model over real HTTP is `tests/*_http.rs`.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::Method;
use actix_web::test::{call_service, init_service, read_body, TestRequest};
use actix_web::web;
use serde_json::{json, Value};

use super::{app, AppState, Role};
use crate::adapters::peft;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::fake::{voting_adapter, FakeEncoder};
use crate::model::{BertConfig, Model};

/// The words the tiny model's tokenizer knows: ids 4–9.
const WORDS: [&str; 6] = ["win", "cash", "prize", "hello", "meeting", "lunch"];
/// Ids of the words that make a text spam, and of those that make it ham.
const SPAM: &[u32] = &[4, 5, 6];
const HAM: &[u32] = &[7, 8, 9];

/// A loaded application and what its tests look into.
struct Harness {
    _data: tempfile::TempDir,
    state: web::Data<AppState>,
    encoder: Arc<FakeEncoder>,
}

impl Harness {
    /// The application on a fresh data directory, its encoder spending `per_token` on each token, with
    /// `configure` applied to the default configuration.
    fn new(per_token: Duration, configure: impl FnOnce(&mut Config)) -> Self {
        let data = tempfile::tempdir().expect("a temp dir");
        let mut config = Config::default();
        config.data.dir = data.path().to_owned();
        config.trainer.threads = 1;
        configure(&mut config);
        let model = Model::tiny(1, &WORDS);
        let encoder = Arc::new(FakeEncoder::new(model.config.hidden_size, per_token));
        let mut serving = model.serving();
        serving.encoder = encoder.clone();
        let metrics = Metrics::new();
        let services = crate::app::assemble(&config, metrics.clone(), Arc::new(model), serving)
            .expect("the services start");
        let state = web::Data::new(AppState::loaded(config, metrics, services));
        Self {
            _data: data,
            state,
            encoder,
        }
    }

    /// Writes an adapter that votes spam for [`SPAM`] words and ham for [`HAM`] ones (or the reverse
    /// when `flipped`) under the adapter root as `name`.
    fn write_adapter(&self, name: &str, flipped: bool) {
        let votes: [&[u32]; 2] = if flipped { [SPAM, HAM] } else { [HAM, SPAM] };
        let adapter = voting_adapter(&BertConfig::tiny(), 3, &votes);
        let root = self.state.services().expect("loaded").registry.root();
        peft::write_dir(&root.join(name), &adapter, 4.0, "tiny").expect("written");
    }
}

/// Sends a request to the application; answers the status, the headers and the JSON body (null when
/// there is none).
macro_rules! send {
    ($app:expr, $method:ident $path:expr) => {
        send!($app, $method $path, None::<Value>)
    };
    ($app:expr, $method:ident $path:expr, $body:expr) => {{
        // From loopback: admin routes answer only loopback callers while no admin key is set.
        let mut request = TestRequest::default()
            .method(Method::$method)
            .uri(&$path)
            .peer_addr(std::net::SocketAddr::from(([127, 0, 0, 1], 40000)));
        if let Some(body) = Option::<Value>::from($body) {
            request = request.set_json(body);
        }
        let response = call_service(&$app, request.to_request()).await;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = read_body(response).await;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, headers, json)
    }};
}

/// Creates task `spam` (labels ham, spam) with `right` as its stable generation; returns its id.
macro_rules! spam_task {
    ($harness:expr, $app:expr) => {{
        let (status, _, body) = send!($app, POST "/v1/tasks", json!({"name": "spam", "labels": ["ham", "spam"]}));
        assert_eq!(status, 201, "{body}");
        $harness.write_adapter("right", false);
        let (status, _, body) = send!($app, POST "/v1/adapters", json!({"path": "right", "task": "spam"}));
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().expect("an id").to_owned()
    }};
}

#[actix_web::test]
async fn a_prediction_runs_on_the_stable_generation_and_feedback_may_name_it() {
    // No drift monitor: its embedder would run batches of its own on the encoder.
    let harness = Harness::new(Duration::ZERO, |config| config.drift.enabled = false);
    let app = init_service(app(harness.state.clone(), Role::Api)).await;
    let (status, _, body) =
        send!(app, POST "/v1/predict", json!({"task": "nope", "inputs": "win"}));
    assert_eq!(
        (status, body["error_type"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (status, _, body) =
        send!(app, POST "/v1/tasks", json!({"name": "spam", "labels": ["ham", "spam"]}));
    assert_eq!(status, 201, "{body}");
    let (status, _, body) =
        send!(app, POST "/v1/predict", json!({"task": "spam", "inputs": "win"}));
    assert_eq!(
        (status, body["error_type"].as_str()),
        (409, Some("conflict")),
        "no generation yet: {body}"
    );

    harness.write_adapter("right", false);
    let (status, _, body) =
        send!(app, POST "/v1/adapters", json!({"path": "right", "task": "spam"}));
    assert_eq!(status, 201, "{body}");
    let stable = body["id"].as_str().unwrap().to_owned();
    let batches = harness.encoder.batches();
    let (status, headers, body) = send!(app, POST "/v1/predict",
        json!({"task": "spam", "inputs": ["win cash now", "lunch meeting at noon"]}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["adapter"], stable.as_str());
    assert_eq!(body["arm"], "stable");
    let labels: Vec<&str> = body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["spam", "ham"]);
    assert!(body["predictions"][0]["score"].as_f64().unwrap() > 0.99);
    assert_eq!(
        harness.encoder.batches(),
        batches + 1,
        "both inputs ran in one batch"
    );
    assert_eq!(
        headers.get("x-request-id").unwrap().to_str().unwrap(),
        body["request_id"].as_str().unwrap()
    );

    // Feedback naming the request's second input stores that input's text.
    let request_id = body["request_id"].clone();
    let (status, _, body) = send!(app, POST "/v1/feedback",
        json!({"request_id": request_id, "index": 1, "label": "spam"}));
    assert_eq!(status, 202, "{body}");
    let (status, _, body) = send!(app, POST "/v1/feedback",
        json!({"request_id": request_id, "label": "eggs"}));
    assert_eq!(status, 422, "{body}");
    let (status, _, body) = send!(app, GET "/v1/feedback?task=spam");
    assert_eq!(status, 200, "{body}");
    let items = body.as_array().unwrap();
    assert_eq!(items.len(), 1, "{body}");
    assert_eq!(items[0]["text"], "lunch meeting at noon");
    assert_eq!(items[0]["label"], "spam");
}

#[actix_web::test]
async fn a_candidate_that_answers_wrong_is_rolled_back_on_its_online_accuracy() {
    let harness = Harness::new(Duration::ZERO, |config| {
        config.rollouts.min_feedback = 30;
        config.rollouts.min_requests = 30;
    });
    let app = init_service(app(harness.state.clone(), Role::Api)).await;
    let stable = spam_task!(harness, app);
    harness.write_adapter("flipped", true);
    let (status, _, body) =
        send!(app, POST "/v1/adapters", json!({"path": "flipped", "task": "spam"}));
    assert_eq!(status, 201, "{body}");
    let flipped = body["id"].as_str().unwrap().to_owned();
    let (status, _, body) = send!(app, POST "/v1/rollouts",
        json!({"task": "spam", "candidate": flipped, "traffic": 0.5, "steps": [0.5]}));
    assert_eq!(status, 201, "{body}");

    let mut arms = std::collections::HashMap::new();
    for i in 0..160 {
        let (text, truth) = if i % 2 == 0 {
            ("win a cash prize", "spam")
        } else {
            ("hello from the lunch meeting", "ham")
        };
        let key = format!("user-{i}");
        let (status, _, body) = send!(app, POST "/v1/predict",
            json!({"task": "spam", "inputs": text, "routing_key": key}));
        assert_eq!(status, 200, "{body}");
        let arm = body["arm"].as_str().unwrap().to_owned();
        let adapter = if arm == "stable" { &stable } else { &flipped };
        assert_eq!(body["adapter"], adapter.as_str());
        let right = if arm == "stable" {
            truth
        } else if truth == "spam" {
            "ham"
        } else {
            "spam"
        };
        assert_eq!(
            body["predictions"][0]["label"], right,
            "{arm} answers {text:?}"
        );
        // Sticky: the same key sees the same arm again.
        let (_, _, again) = send!(app, POST "/v1/predict",
            json!({"task": "spam", "inputs": text, "routing_key": key}));
        assert_eq!(again["arm"], arm.as_str());
        *arms.entry(arm).or_insert(0) += 1;
        let (status, _, body) = send!(app, POST "/v1/feedback",
            json!({"request_id": body["request_id"], "label": truth}));
        assert_eq!(status, 202, "{body}");
    }
    assert!(arms.values().all(|&n| n >= 50), "a 50 % split: {arms:?}");

    let services = harness.state.services().unwrap();
    assert_eq!(
        services.rollouts.evaluate(true),
        [("spam".to_owned(), "rollback".to_owned())]
    );
    let (status, _, body) = send!(app, GET "/v1/rollouts/spam");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["phase"], "rolled_back", "{body}");
    let (_, _, body) = send!(app, POST "/v1/predict",
        json!({"task": "spam", "inputs": "win cash", "routing_key": "user-1"}));
    assert_eq!(
        (body["arm"].as_str(), body["adapter"].as_str()),
        (Some("stable"), Some(stable.as_str()))
    );
}

#[actix_web::test]
async fn past_the_expected_wait_requests_are_refused_with_429_and_the_rest_are_served() {
    // One text of 20 tokens a batch, 20 ms each: 50 requests/s at most, offered 200 requests/s for 1.5 s
    // by callers that do not wait for each other (closed-loop callers never push the offered load past
    // what is served, and are not refused).
    let harness = Harness::new(Duration::from_millis(1), |config| {
        config.batching.max_batch_size = 1;
        config.batching.max_expected_wait_ms = 100;
    });
    let app = Rc::new(init_service(app(harness.state.clone(), Role::Api)).await);
    let text = "hello meeting lunch ".repeat(6);
    let mut clients = Vec::new();
    for _ in 0..300 {
        let (app, text) = (app.clone(), text.clone());
        clients.push(actix_web::rt::spawn(async move {
            let (status, headers, body) = send!(app, POST "/v1/embed", json!({"inputs": text}));
            (status, headers.get("retry-after").is_some(), body)
        }));
        actix_web::rt::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut served, mut refused) = (0, 0);
    for client in clients {
        let (status, retry_after, body) = client.await.unwrap();
        match status {
            200 => served += 1,
            429 => {
                assert!(retry_after, "a 429 says when to retry: {body}");
                assert_eq!(body["error_type"], "overloaded", "{body}");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(
        served >= 30 && refused >= 100,
        "{served} served, {refused} refused"
    );
}

#[actix_web::test]
async fn inputs_unlike_the_reference_are_reported_as_drift() {
    let harness = Harness::new(Duration::ZERO, |config| {
        config.drift.reference_size = 40;
        config.drift.window_size = 40;
        config.drift.min_window = 40;
        config.drift.permutations = 99;
        // 99 permutations resolve p-values down to 0.01.
        config.drift.p_value = 0.05;
    });
    let app = init_service(app(harness.state.clone(), Role::Api)).await;
    let _stable = spam_task!(harness, app);
    let (status, _, body) = send!(app, GET "/v1/drift/spam");
    assert_eq!(status, 202, "{body}");
    let predict = |texts: Vec<String>| json!({"task": "spam", "inputs": texts});
    let ham: Vec<String> = (0..40).map(|i| format!("hello meeting {i}")).collect();
    let (status, _, body) = send!(app, POST "/v1/predict", predict(ham.clone()));
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send!(app, POST "/v1/predict", predict(ham));
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send!(app, GET "/v1/drift/spam");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["detected"], false, "the same traffic: {body}");

    let spam: Vec<String> = (0..40).map(|i| format!("win cash {i}")).collect();
    let (status, _, body) = send!(app, POST "/v1/predict", predict(spam));
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send!(app, GET "/v1/drift/spam");
    assert_eq!(status, 200, "{body}");
    let prediction = body["signals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["signal"] == "prediction")
        .unwrap();
    assert_eq!(prediction["detected"], true, "{body}");
    assert_eq!(body["detected"], true, "{body}");
}

#[test]
fn a_request_dropped_unanswered_leaves_the_in_flight_gauge_and_counts_as_499() {
    let metrics = Metrics::new();
    let started = std::time::Instant::now();
    let answered = super::InFlight::begin(metrics.clone(), "/v1/embed".to_owned(), started);
    let dropped = super::InFlight::begin(metrics.clone(), "/v1/embed".to_owned(), started);
    assert_eq!(metrics.in_flight.get(), 2);
    answered.finish(200, "", "");
    // What a reset connection or a drain out of time does to the request's future: drops it.
    drop(dropped);
    assert_eq!(metrics.in_flight.get(), 0);
    let exposition = metrics.render();
    for status in ["200", "499"] {
        let line = format!(r#"flywheel_requests_total{{route="/v1/embed",status="{status}"}} 1"#);
        assert!(
            exposition.lines().any(|l| l == line),
            "{line} in {exposition}"
        );
    }
}

#[actix_web::test]
async fn an_error_quotes_at_most_a_bounded_part_of_what_the_caller_sent() {
    let harness = Harness::new(Duration::ZERO, |config| config.drift.enabled = false);
    let app = init_service(app(harness.state.clone(), Role::Api)).await;
    let long = "é".repeat(500_000);
    for (path, body) in [
        ("/v1/predict", json!({"task": long, "inputs": "win"})),
        ("/v1/embeddings", json!({"model": long, "input": "win"})),
    ] {
        let (status, _, body) = send!(app, POST path, body);
        assert_eq!(status, 404, "{path}");
        let message = body["error"]
            .as_str()
            .or(body["error"]["message"].as_str())
            .unwrap_or_else(|| panic!("{path}: {body}"));
        assert!(
            message.len() <= 2048 + "…".len(),
            "{path}: {} bytes",
            message.len()
        );
        assert!(message.ends_with('…'), "{path}");
    }
}

#[actix_web::test]
async fn openai_routes_answer_a_wrong_method_in_openai_shape() {
    let harness = Harness::new(Duration::ZERO, |config| config.drift.enabled = false);
    let app = init_service(app(harness.state.clone(), Role::Api)).await;
    for (method, path, allow) in [
        (Method::GET, "/v1/embeddings", "POST"),
        (Method::DELETE, "/v1/models/all-MiniLM-L6-v2", "GET"),
    ] {
        let request = TestRequest::default()
            .method(method.clone())
            .uri(path)
            .to_request();
        let response = call_service(&app, request).await;
        assert_eq!(response.status().as_u16(), 405, "{method} {path}");
        assert_eq!(
            response
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok()),
            Some(allow)
        );
        let body: Value = serde_json::from_slice(&read_body(response).await).unwrap();
        assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
    // Flywheel's own routes keep their shape.
    let request = TestRequest::get().uri("/v1/embed").to_request();
    let body: Value =
        serde_json::from_slice(&read_body(call_service(&app, request).await).await).unwrap();
    assert_eq!(body["error_type"], "method_not_allowed", "{body}");
}
