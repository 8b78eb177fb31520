//! Supervision and crash consistency over real HTTP with the real model, through the fault hooks of
//! `FLYWHEEL_FAULTS`: a panic in a batch or a job fails only that batch or job, and a kill between a
//! promotion's two writes (the alias, then the rollout) leaves them agreeing after the restart.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use flywheel::adapters::peft;
use flywheel::model::adapter::Pooling;
use flywheel::model::BertConfig;
use serde_json::{json, Value};

fn wait_for_job(server: &Server, job: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (status, body) = server.get_json(&format!("/v1/jobs/{job}"));
        assert_eq!(status, 200, "{body}");
        if !matches!(body["state"].as_str(), Some("queued") | Some("running")) {
            return body;
        }
        assert!(Instant::now() < deadline, "job still running: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn panics(server: &Server, thread: &str) -> f64 {
    let (_, metrics) = server.get_text("/metrics");
    let series = format!("flywheel_thread_panics_total{{thread=\"{thread}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_panic_in_a_batch_or_a_job_fails_only_that_batch_or_job() {
    let poison = "please panic on this very sentence";
    let server = Server::start(
        &[],
        &[(
            "FLYWHEEL_FAULTS",
            &format!("panic_on_text={poison},panic_in_job=spam"),
        )],
    );
    // The batch holding the poisoned input fails with a 500 `model_error`; the model thread goes on.
    let (status, body) = server.post("/v1/embed", &json!({ "inputs": poison }));
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error_type"], "model_error", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("panicked"),
        "{body}"
    );
    let (status, body) = server.post("/v1/embed", &json!({"inputs": "an ordinary sentence"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.get_json("/ready").0, 200, "the model thread lives");
    assert_eq!(panics(&server, "model"), 1.0);
    let (_, exposition) = server.get_text("/metrics");
    assert!(
        exposition.lines().any(|l| l == "flywheel_model_ready 1"),
        "a caught panic leaves the replica ready"
    );

    // The first job of `spam` panics: it reads failed with the panic's message, and the next one runs.
    let (status, _) = server.post(
        "/v1/tasks",
        &json!({"name": "spam", "labels": ["ham", "spam"]}),
    );
    assert_eq!(status, 201);
    let items: Vec<Value> = common::sample_mails("easy-ham-1", 0, 7, 20, 30)
        .into_iter()
        .map(|t| json!({"task": "spam", "text": t, "label": "ham"}))
        .chain(
            common::sample_mails("spam-1", 0, 7, 20, 30)
                .into_iter()
                .map(|t| json!({"task": "spam", "text": t, "label": "spam"})),
        )
        .collect();
    let (status, body) = server.post("/v1/feedback", &json!({ "items": items }));
    assert_eq!(status, 202, "{body}");
    let job = json!({"task": "spam", "epochs": 1, "max_length": 32});
    let (_, first) = server.post("/v1/train", &job);
    let failed = wait_for_job(&server, first["job_id"].as_str().unwrap());
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("panicked"),
        "{failed}"
    );
    assert_eq!(panics(&server, "trainer"), 1.0);
    assert_eq!(server.get_json("/ready").0, 200, "the trainer thread lives");
    let (_, second) = server.post("/v1/train", &job);
    let done = wait_for_job(&server, second["job_id"].as_str().unwrap());
    assert_eq!(done["state"], "succeeded", "{done}");
}

/// Loads the PEFT fixture and a variant of it (the classifier bias shifted) as two generations of task
/// `sentiment`; returns (stable, candidate).
fn two_generations(server: &Server) -> (String, String) {
    let (status, _) = server.post(
        "/v1/tasks",
        &json!({"name": "sentiment", "labels": ["negative", "neutral", "positive"]}),
    );
    assert_eq!(status, 201);
    common::copy_peft_fixture(server, "fixture");
    let model: BertConfig = serde_json::from_str(
        &std::fs::read_to_string(common::model_dir().join("config.json")).unwrap(),
    )
    .unwrap();
    let (config, mut adapter) =
        peft::read(&common::peft_fixture_dir(), &model, Pooling::Cls).unwrap();
    adapter.head.as_mut().unwrap().classifier.bias[0] += 3.0;
    let variant = server.data_dir.join("adapters/variant");
    peft::write_dir(&variant, &adapter, config.lora_alpha, "all-MiniLM-L6-v2").unwrap();
    let mut ids = Vec::new();
    for path in ["fixture", "variant"] {
        let (status, body) =
            server.post("/v1/adapters", &json!({"path": path, "task": "sentiment"}));
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    (ids[0].clone(), ids[1].clone())
}

#[test]
fn a_kill_between_a_promotions_two_writes_leaves_the_rollout_and_the_alias_agreeing() {
    let data = tempfile::tempdir().unwrap();
    let candidate = {
        let server = Server::start_in_env(
            data.path(),
            &[],
            &[("FLYWHEEL_FAULTS", "pause_after_alias_ms=60000")],
        );
        let (stable, candidate) = two_generations(&server);
        let (status, body) = server.post(
            "/v1/rollouts",
            &json!({"task": "sentiment", "candidate": candidate, "traffic": 0.5, "automatic": false}),
        );
        assert_eq!(status, 201, "{body}");
        // The promotion moves the alias, then pauses before recording the rollout: kill it there.
        let url = server.url("/v1/rollouts/sentiment/promote");
        std::thread::spawn(move || {
            let _ = ureq::post(&url).call();
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, task) = server.get_json("/v1/tasks/sentiment");
            if task["stable"] == candidate.as_str() {
                break;
            }
            assert_eq!(task["stable"], stable.as_str(), "{task}");
            assert!(Instant::now() < deadline, "the alias never moved: {task}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let (_, rollout) = server.get_json("/v1/rollouts/sentiment");
        assert_eq!(rollout["phase"], "active", "killed before the second write");
        candidate
        // Dropping the server kills it (SIGKILL).
    };
    let server = Server::start_in(data.path(), &[]);
    let (_, task) = server.get_json("/v1/tasks/sentiment");
    assert_eq!(task["stable"], candidate.as_str(), "{task}");
    let (_, rollout) = server.get_json("/v1/rollouts/sentiment");
    assert_eq!(rollout["phase"], "promoted", "{rollout}");
    let last = rollout["decisions"].as_array().unwrap().last().unwrap();
    assert_eq!(last["by"], "restart", "{rollout}");
    // And the reconciled state was written: a second restart reads it as it is.
    drop(server);
    let server = Server::start_in(data.path(), &[]);
    let (_, rollout) = server.get_json("/v1/rollouts/sentiment");
    assert_eq!(rollout["phase"], "promoted", "{rollout}");
}
