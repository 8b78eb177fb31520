//! A/B rollouts over real HTTP on real mail: a candidate trained on flipped labels is rolled back by the
//! guardrail analysis, a candidate the server trained on more feedback is canaried by the trainer's hook and
//! promoted, and no request fails along the way; shadow mode judges the candidate without serving it; promote
//! and rollback under concurrent clients fail no request.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::Server;
use flywheel::trainer::data::{stratified_split, truncate, Example};
use flywheel::trainer::train::{train_lora, TrainConfig};
use serde_json::{json, Value};

fn mails(group: &str, offset: usize, n: usize) -> Vec<String> {
    common::sample_mails(group, offset, 5, n, 40)
}

fn labelled(offset: usize, n: usize) -> Vec<(String, &'static str)> {
    let ham = mails("easy-ham-1", offset, n);
    let spam = mails("spam-1", offset, n);
    ham.into_iter()
        .map(|t| (t, "ham"))
        .chain(spam.into_iter().map(|t| (t, "spam")))
        .collect()
}

fn post_feedback(server: &Server, items: &[(String, &str)]) {
    let items: Vec<Value> = items
        .iter()
        .map(|(t, l)| json!({"task": "spam", "text": t, "label": l}))
        .collect();
    let (status, body) = server.post("/v1/feedback", &json!({ "items": items }));
    assert_eq!(status, 202, "{body}");
}

/// Trains a LoRA job and returns its final status.
fn train_job(server: &Server) -> Value {
    let (status, body) = server.post(
        "/v1/train",
        // Enough steps on a few dozen mails that each generation clearly learns what it was shown.
        &json!({"task": "spam", "epochs": 6, "max_length": 48}),
    );
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, job) = server.get_json(&format!("/v1/jobs/{id}"));
        match job["state"].as_str() {
            Some("succeeded") => return job,
            Some("queued") | Some("running") => {}
            other => panic!("job ended {other:?}: {job}"),
        }
        assert!(Instant::now() < deadline, "job too slow: {job}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Streams held-out mail through `/v1/predict` with sticky keys, answers every prediction with the true
/// label as feedback, and repeats until the task's rollout is no longer active. Every request must succeed.
/// Returns the finished rollout.
fn stream_until_decided(server: &Server, held_out: &[(String, &str)]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut round = 0;
    loop {
        let mut feedback = Vec::new();
        for (i, (text, truth)) in held_out.iter().enumerate() {
            let (status, body) = server.post(
                "/v1/predict",
                &json!({"task": "spam", "inputs": text, "routing_key": format!("user-{round}-{i}")}),
            );
            assert_eq!(status, 200, "a request failed during the rollout: {body}");
            feedback.push(json!({"request_id": body["request_id"], "label": truth}));
        }
        let (status, body) = server.post("/v1/feedback", &json!({ "items": feedback }));
        assert_eq!(status, 202, "{body}");
        // Let the analysis (every 300 ms here) look at the new evidence.
        std::thread::sleep(Duration::from_millis(900));
        let (_, rollout) = server.get_json("/v1/rollouts/spam");
        if rollout["phase"] != "active" {
            return rollout;
        }
        assert!(
            Instant::now() < deadline,
            "no decision after {round} rounds: {rollout}"
        );
        round += 1;
    }
}

#[test]
fn a_flipped_candidate_rolls_back_and_a_better_trained_one_is_promoted() {
    let server = Server::start(
        &[],
        &[
            ("FLYWHEEL_ROLLOUTS__STEPS", "[0.4, 0.6]"),
            ("FLYWHEEL_ROLLOUTS__MIN_FEEDBACK", "40"),
            ("FLYWHEEL_ROLLOUTS__MIN_REQUESTS", "40"),
            ("FLYWHEEL_ROLLOUTS__MARGIN", "0.1"),
            // Latency on a shared 2-core test machine is too noisy to judge here; the unit tests cover it.
            ("FLYWHEEL_ROLLOUTS__MAX_P99_RATIO", "10"),
            ("FLYWHEEL_ROLLOUTS__EVALUATE_EVERY_MS", "300"),
        ],
    );
    let (status, body) = server.post(
        "/v1/tasks",
        &json!({"name": "spam", "labels": ["ham", "spam"]}),
    );
    assert_eq!(status, 201, "{body}");

    // A small first generation becomes the task's stable one (no canary: nothing to compare with).
    post_feedback(&server, &labelled(0, 12));
    let stable = train_job(&server)["adapter"].as_str().unwrap().to_owned();
    let (_, task) = server.get_json("/v1/tasks/spam");
    assert_eq!(task["stable"], stable.as_str());

    // A candidate trained (here, in the test) on the same kind of mail with every label flipped.
    let model = common::load_model();
    let config = TrainConfig {
        epochs: Some(8),
        max_length: 48,
        ..TrainConfig::default()
    };
    let flipped: Vec<Example> = labelled(1, 20)
        .iter()
        .map(|(t, l)| Example {
            ids: truncate(model.tokenizer.encode(t).unwrap(), 48),
            label: usize::from(*l == "ham"),
        })
        .collect();
    let (train_set, val) = stratified_split(flipped, 2, 0.2, 1);
    let report = train_lora(
        &model.bert,
        model.cpu().unwrap(),
        2,
        &train_set,
        &val,
        &config,
        None,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    let dir = server.data_dir.join("adapters/flipped");
    std::fs::create_dir_all(&dir).unwrap();
    flywheel::adapters::peft::write_dir(&dir, &report.result, 16.0, &model.name).unwrap();
    let (status, body) = server.post("/v1/adapters", &json!({"path": "flipped", "task": "spam"}));
    assert_eq!(status, 201, "{body}");
    let flipped_id = body["id"].as_str().unwrap().to_owned();
    let (status, body) = server.post(
        "/v1/rollouts",
        &json!({"task": "spam", "candidate": flipped_id, "traffic": 0.5, "steps": [0.5]}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, _) = server.send("DELETE", &format!("/v1/adapters/{flipped_id}"), &json!({}));
    assert_eq!(status, 409, "an arm of an active rollout cannot be deleted");

    let held_out = labelled(3, 30);
    let rollout = stream_until_decided(&server, &held_out);
    eprintln!("flipped rollout: {rollout:#}");
    assert_eq!(rollout["phase"], "rolled_back", "{rollout}");
    let last = rollout["decisions"].as_array().unwrap().last().unwrap();
    assert_eq!(last["by"], "analysis");
    assert!(last["reason"].as_str().unwrap().contains("worse"), "{last}");
    let (_, task) = server.get_json("/v1/tasks/spam");
    assert_eq!(
        task["stable"],
        stable.as_str(),
        "rollback keeps the stable generation"
    );

    // More real feedback; the trainer's new generation is canaried automatically and earns promotion.
    post_feedback(&server, &labelled(2, 40));
    let job = train_job(&server);
    // Warm-started from stable: the 80 new items plus all 24 older ones as replay (2 per new one, capped).
    assert_eq!(job["replayed_examples"], 24, "{job}");
    // It validates on rows the parent never saw (15 % of each label's new rows, the posted ones and those
    // the rollout judged); the 24 replayed ones all train. Drawn from every row, 15 % would be 3 or 4 more.
    let (val, train) = (
        job["val"]["examples"].as_u64().unwrap() as f64,
        job["train_examples"].as_u64().unwrap() as f64,
    );
    let fresh = val + train - 24.0;
    assert!(
        (val - 0.15 * fresh).abs() <= 1.0 && val < 0.15 * (val + train) - 2.0,
        "{val} validation rows of {fresh} new and 24 replayed: {job}"
    );
    let better = job["adapter"].as_str().unwrap().to_owned();
    let (_, rollout) = server.get_json("/v1/rollouts/spam");
    assert_eq!(rollout["phase"], "active", "{rollout}");
    assert_eq!(rollout["candidate"], better.as_str());
    assert_eq!(rollout["decisions"][0]["by"], "trainer");
    let rollout = stream_until_decided(&server, &held_out);
    eprintln!("better rollout: {rollout:#}");
    assert_eq!(rollout["phase"], "promoted", "{rollout}");
    let actions: Vec<&str> = rollout["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["start", "advance", "promote"],
        "staged: 40 % then 60 %, then promoted"
    );
    let (_, task) = server.get_json("/v1/tasks/spam");
    assert_eq!(
        task["stable"],
        better.as_str(),
        "promotion moved the stable alias"
    );

    let (_, metrics) = server.get_text("/metrics");
    for series in [
        "flywheel_training_jobs_total{state=\"succeeded\",task=\"spam\"} 2",
        "flywheel_rollout_events_total{decision=\"rollback\",task=\"spam\"} 1",
        "flywheel_rollout_events_total{decision=\"promote\",task=\"spam\"} 1",
        "flywheel_request_duration_seconds_count{arm=\"candidate\",route=\"/v1/predict\",task=\"spam\"}",
    ] {
        assert!(metrics.contains(series), "missing {series}");
    }
    assert!(
        !metrics.contains("flywheel_online_accuracy{arm=\"candidate\",task=\"spam\"}"),
        "no rollout is active: no candidate's accuracy stands"
    );
}

#[test]
fn rollouts_validate_their_inputs_and_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    {
        let server = Server::start_in(data.path(), &[]);
        // The PEFT fixture's head has three outputs.
        server.post(
            "/v1/tasks",
            &json!({"name": "spam", "labels": ["a", "b", "c"]}),
        );
        let (status, body) = server.post(
            "/v1/rollouts",
            &json!({"task": "spam", "candidate": "nope"}),
        );
        assert_eq!(status, 409, "no stable generation yet: {body}");
        common::copy_peft_fixture(&server, "first");
        common::copy_peft_fixture(&server, "second");
        let (_, first) = server.post("/v1/adapters", &json!({"path": "first", "task": "spam"}));
        assert_eq!(first["aliases"][0], "spam", "{first}");
        // A second generation: the same fixture with its classifier bias changed.
        let dir = data.path().join("adapters/second");
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = Vec::new();
        for (name, view) in tensors.tensors() {
            let mut data = view.data().to_vec();
            if name.ends_with("classifier.bias") {
                data[0] ^= 0x40;
            }
            out.push((name, data, view.shape().to_vec(), view.dtype()));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = out
            .iter()
            .map(|(n, d, s, t)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*t, s.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))
            .unwrap();
        let (status, second) =
            server.post("/v1/adapters", &json!({"path": "second", "task": "spam"}));
        assert_eq!(status, 201, "{second}");
        let candidate = second["id"].as_str().unwrap();
        for (body, want) in [
            (
                json!({"task": "spam", "candidate": candidate, "traffic": 1.5}),
                422,
            ),
            (
                json!({"task": "spam", "candidate": candidate, "mode": "sideways"}),
                422,
            ),
            (json!({"task": "nope", "candidate": candidate}), 404),
            (json!({"task": "spam", "candidate": first["id"]}), 409),
        ] {
            let (status, answer) = server.post("/v1/rollouts", &body);
            assert_eq!(status, want, "{body} → {answer}");
            assert!(answer["error"].is_string(), "{answer}");
        }
        let (status, body) = server.post(
            "/v1/rollouts",
            &json!({"task": "spam", "candidate": candidate, "traffic": 0.1, "automatic": false}),
        );
        assert_eq!(status, 201, "{body}");
        let (status, _) = server.post(
            "/v1/rollouts",
            &json!({"task": "spam", "candidate": candidate}),
        );
        assert_eq!(status, 409, "one active rollout per task");
        let (status, body) =
            server.send("PUT", "/v1/rollouts/spam/traffic", &json!({"traffic": 0.5}));
        assert_eq!(status, 200, "{body}");
        // Sticky: one key keeps its arm across requests.
        let arm_of = |key: &str| {
            let (status, body) = server.post(
                "/v1/predict",
                &json!({"task": "spam", "inputs": "win a prize now", "routing_key": key}),
            );
            assert_eq!(status, 200, "{body}");
            body["arm"].as_str().unwrap().to_owned()
        };
        let arms: Vec<String> = (0..12).map(|i| arm_of(&format!("k{i}"))).collect();
        assert!(arms.iter().any(|a| a == "candidate") && arms.iter().any(|a| a == "stable"));
        for (i, arm) in arms.iter().enumerate() {
            assert_eq!(&arm_of(&format!("k{i}")), arm);
        }
    }
    // After a restart the rollout is still active with its share and log.
    let server = Server::start_in(data.path(), &[]);
    let (status, rollout) = server.get_json("/v1/rollouts/spam");
    assert_eq!(status, 200);
    assert_eq!(rollout["phase"], "active", "{rollout}");
    assert_eq!(rollout["traffic"], 0.5);
    assert_eq!(rollout["decisions"].as_array().unwrap().len(), 2);
    let (status, rollout) = server.post("/v1/rollouts/spam/rollback", &json!({}));
    assert_eq!(status, 200, "{rollout}");
    assert_eq!(rollout["phase"], "rolled_back");
    let (status, _) = server.post("/v1/rollouts/spam/promote", &json!({}));
    assert_eq!(status, 404, "nothing active to promote");
    let (stable, candidate) = (
        rollout["stable"].as_str().unwrap().to_owned(),
        rollout["candidate"].as_str().unwrap().to_owned(),
    );

    // Shadow: stable answers every request; the candidate runs beside it and feedback judges both.
    let (status, body) = server.post(
        "/v1/rollouts",
        &json!({"task": "spam", "candidate": candidate, "traffic": 1.0, "mode": "shadow", "automatic": false}),
    );
    assert_eq!(status, 201, "{body}");
    let mut feedback = Vec::new();
    for i in 0..6 {
        let (status, body) = server.post(
            "/v1/predict",
            &json!({"task": "spam", "inputs": format!("message {i}"), "routing_key": format!("s{i}")}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (body["arm"].as_str(), body["adapter"].as_str()),
            (Some("stable"), Some(stable.as_str()))
        );
        feedback.push(json!({"request_id": body["request_id"], "label": "a"}));
    }
    // The shadow runs after the answer has gone.
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = server.post("/v1/feedback", &json!({ "items": feedback }));
    assert_eq!(status, 202, "{body}");
    let (_, rollout) = server.get_json("/v1/rollouts/spam");
    assert_eq!(rollout["arms"]["candidate"]["requests"], 6, "{rollout}");
    assert_eq!(rollout["arms"]["candidate"]["judged"], 6, "{rollout}");
    assert_eq!(rollout["arms"]["stable"]["judged"], 6, "{rollout}");
    let (status, _) = server.post("/v1/rollouts/spam/rollback", &json!({}));
    assert_eq!(status, 200);

    // Promote and roll back while clients keep predicting: not one request fails.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (served, failed) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..3)
            .map(|c| {
                let (server, stop) = (&server, &stop);
                scope.spawn(move || {
                    let (mut served, mut failed) = (0, 0);
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let (status, _) = server.post(
                            "/v1/predict",
                            &json!({"task": "spam", "inputs": "hello there", "routing_key": format!("c{c}-{i}")}),
                        );
                        if status == 200 { served += 1 } else { failed += 1 }
                        i += 1;
                    }
                    (served, failed)
                })
            })
            .collect();
        let pause = || std::thread::sleep(Duration::from_millis(400));
        let ok = |(status, body): (u16, Value)| assert!(status < 300, "{body}");
        ok(server.post(
            "/v1/rollouts",
            &json!({"task": "spam", "candidate": candidate, "traffic": 0.5, "automatic": false}),
        ));
        pause();
        ok(server.send("PUT", "/v1/rollouts/spam/traffic", &json!({"traffic": 0.9})));
        pause();
        ok(server.post("/v1/rollouts/spam/promote", &json!({})));
        pause();
        ok(server.post(
            "/v1/rollouts",
            &json!({"task": "spam", "candidate": stable, "traffic": 0.5, "automatic": false}),
        ));
        pause();
        ok(server.post("/v1/rollouts/spam/rollback", &json!({})));
        pause();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    assert!(served > 10, "the clients ran ({served} requests)");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during promote/rollback",
        served + failed
    );
    let (_, task) = server.get_json("/v1/tasks/spam");
    assert_eq!(
        task["stable"],
        candidate.as_str(),
        "promoted, and the later rollback kept it"
    );
}
