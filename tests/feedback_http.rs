//! Feedback over real HTTP: durable before 202 (it survives kill -9), by text or by request id,
//! duplicates counted, bad items refused with the item named.

mod common;

use common::Server;
use serde_json::{json, Value};

fn setup(server: &Server) {
    let labels = ["negative", "neutral", "positive"];
    assert_eq!(
        server
            .post("/v1/tasks", &json!({"name": "sentiment", "labels": labels}))
            .0,
        201
    );
    common::copy_peft_fixture(server, "fixture");
    assert_eq!(
        server
            .post(
                "/v1/adapters",
                &json!({"path": "fixture", "task": "sentiment"})
            )
            .0,
        201
    );
}

fn listed(server: &Server) -> Vec<Value> {
    let (status, rows) = server.get_json("/v1/feedback?task=sentiment&after_id=0&limit=100");
    assert_eq!(status, 200, "{rows}");
    rows.as_array().unwrap().clone()
}

#[test]
fn acknowledged_feedback_survives_kill_9_and_names_what_served_the_request() {
    let data = tempfile::tempdir().unwrap();
    let (ids, request_id, generation) = {
        let server = Server::start_in(data.path(), &[]);
        setup(&server);
        let (status, body) = server.post(
            "/v1/predict",
            &json!({"task": "sentiment", "inputs": ["great stuff", "awful"]}),
        );
        assert_eq!(status, 200, "{body}");
        let request_id = body["request_id"].as_str().unwrap().to_owned();
        let generation = body["adapter"].as_str().unwrap().to_owned();
        let (status, ack) = server.post(
            "/v1/feedback",
            &json!({"items": [
                {"task": "sentiment", "text": "the food was cold", "label": "negative"},
                {"request_id": request_id, "label": "positive"},
                {"request_id": request_id, "index": 1, "label": "negative"},
            ]}),
        );
        assert_eq!(status, 202, "{ack}");
        assert_eq!(ack["accepted"], 3);
        (ack["ids"].clone(), request_id, generation)
        // The server is killed with SIGKILL here, right after the 202.
    };
    let server = Server::start_in(data.path(), &[]);
    let rows = listed(&server);
    assert_eq!(
        rows.iter().map(|r| r["id"].clone()).collect::<Vec<_>>(),
        ids.as_array().unwrap().clone()
    );
    assert_eq!(rows[0]["text"], "the food was cold");
    assert_eq!(
        (rows[1]["text"].as_str(), rows[1]["label"].as_str()),
        (Some("great stuff"), Some("positive"))
    );
    assert_eq!(rows[2]["text"], "awful");
    for row in &rows[1..] {
        assert_eq!(row["request_id"], request_id.as_str());
        assert_eq!(row["adapter"], generation.as_str());
        assert_eq!(row["arm"], "stable");
    }
    let (_, task) = server.get_json("/v1/tasks/sentiment");
    assert_eq!(task["feedback_count"], 3);
}

#[test]
fn duplicates_are_counted_and_bad_items_are_refused_by_name() {
    let server = Server::start(&[], &[]);
    setup(&server);
    let one = json!({"task": "sentiment", "text": "fine", "label": "neutral"});
    let (_, first) = server.post("/v1/feedback", &one);
    let (status, again) = server.post("/v1/feedback", &one);
    assert_eq!((status, again["duplicates"].as_u64()), (202, Some(1)));
    assert_eq!(first["ids"], again["ids"]);
    assert_eq!(listed(&server)[0]["count"], 2);

    let cases = [
        (
            json!({"task": "nope", "text": "x", "label": "neutral"}),
            404,
            "nope",
        ),
        (
            json!({"task": "sentiment", "text": "x", "label": "meh"}),
            422,
            "meh",
        ),
        (json!({"text": "x", "label": "neutral"}), 422, "task"),
        (
            json!({"task": "sentiment", "text": "", "label": "neutral"}),
            422,
            "text",
        ),
        (
            json!({"task": "sentiment", "text": "a\u{0}b", "label": "neutral"}),
            422,
            "NUL",
        ),
        (
            json!({"request_id": "no-such-request", "label": "neutral"}),
            404,
            "no-such-request",
        ),
        (json!({"items": []}), 422, "1 to 1000"),
        (
            json!({"items": [one.clone(), {"task": "sentiment", "text": "y", "label": "bad"}]}),
            422,
            "items[1]",
        ),
        // A malformed item is named with what is wrong with it, in either shape.
        (
            json!({"items": [one.clone(), {"task": "sentiment", "text": "y"}]}),
            422,
            "items[1]: missing field `label`",
        ),
        (
            json!({"task": "sentiment", "text": "y", "lable": "neutral"}),
            422,
            "unknown field `lable`",
        ),
    ];
    for (body, status, mention) in cases {
        let (got, answer) = server.post("/v1/feedback", &body);
        assert_eq!(got, status, "{body} → {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(mention),
            "{body} → {answer}"
        );
    }
    let (status, answer) = server.get_json("/v1/feedback?limit=5");
    assert_eq!(
        (status, answer["error_type"].as_str()),
        (422, Some("invalid_request")),
        "{answer}"
    );
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"task": "sentiment", "text": format!("t{i}"), "label": "neutral"}))
        .collect();
    assert_eq!(
        server.post("/v1/feedback", &json!({ "items": too_many })).0,
        422
    );
    assert_eq!(listed(&server).len(), 1, "refused batches stored nothing");
    let (_, metrics) = server.get_text("/metrics");
    assert!(
        metrics.contains(r#"flywheel_feedback_total{task="sentiment"} 2"#),
        "{metrics}"
    );
}

#[test]
fn a_long_listing_pages_exactly_in_id_order() {
    let server = Server::start(&[], &[]);
    setup(&server);
    // Over twelve of the reader's 100-row batches, each text a few kilobytes.
    let mut ids = Vec::new();
    for chunk in 0..5 {
        let items: Vec<Value> = (chunk * 250..(chunk + 1) * 250)
            .map(|i| {
                json!({"task": "sentiment", "label": "neutral",
                       "text": format!("第{i}条评论 {}", "服务一般，价格合理。".repeat(100))})
            })
            .collect();
        let (status, ack) = server.post("/v1/feedback", &json!({ "items": items }));
        assert_eq!(status, 202, "{ack}");
        ids.extend(
            ack["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap()),
        );
    }
    let page = |after: i64, limit: usize| -> Vec<Value> {
        let (status, rows) = server.get_json(&format!(
            "/v1/feedback?task=sentiment&after_id={after}&limit={limit}"
        ));
        assert_eq!(status, 200, "{rows}");
        rows.as_array().unwrap().clone()
    };
    let ids_of = |rows: &[Value]| {
        rows.iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    let all = page(0, 10_000);
    assert_eq!(ids_of(&all), ids, "every row once, in id order");
    assert!(all[1_249]["text"]
        .as_str()
        .unwrap()
        .starts_with("第1249条评论"));
    let head = page(0, 1_000);
    assert_eq!(ids_of(&head), ids[..1_000]);
    let tail = page(ids[999], 1_000);
    assert_eq!(ids_of(&tail), ids[1_000..]);
    assert_eq!(ids_of(&page(ids[499], 501)), ids[500..1_001]);
    assert!(page(ids[1_249], 10_000).is_empty());
}
