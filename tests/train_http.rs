//! The loop over real HTTP: real mail posted as feedback, a LoRA job trained by the server, the result
//! published as a generation that serves `/v1/predict`; jobs can be cancelled and survive a restart.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

fn mails(group: &str, n: usize) -> Vec<String> {
    common::sample_mails(group, 0, 7, n, 40)
}

/// Feedback for task `spam`: `ham` mails of easy-ham-1 and `spam` mails of spam-1, labelled.
fn feedback_items(ham: usize, spam: usize) -> Vec<Value> {
    mails("easy-ham-1", ham)
        .into_iter()
        .map(|t| json!({"task": "spam", "text": t, "label": "ham"}))
        .chain(
            mails("spam-1", spam)
                .into_iter()
                .map(|t| json!({"task": "spam", "text": t, "label": "spam"})),
        )
        .collect()
}

fn wait_for(server: &Server, job: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = server.get_json(&format!("/v1/jobs/{job}"));
        assert_eq!(status, 200, "{body}");
        if !matches!(body["state"].as_str(), Some("queued") | Some("running")) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "job still {} after {timeout:?}: {body}",
            body["state"]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn feedback_trains_a_generation_that_then_serves_predictions() {
    let data = tempfile::tempdir().unwrap();
    let job_id = {
        let server = Server::start_in(data.path(), &[]);
        assert_eq!(
            server
                .post(
                    "/v1/tasks",
                    &json!({"name": "spam", "labels": ["ham", "spam"]})
                )
                .0,
            201
        );
        let (status, body) = server.post("/v1/train", &json!({"task": "spam"}));
        assert_eq!(status, 202, "{body}");
        let failed = wait_for(
            &server,
            body["job_id"].as_str().unwrap(),
            Duration::from_secs(60),
        );
        assert_eq!(failed["state"], "failed");
        assert!(
            failed["error"].as_str().unwrap().contains("at least 2"),
            "{failed}"
        );

        let items = feedback_items(40, 40);
        let (status, ack) = server.post("/v1/feedback", &json!({ "items": items }));
        assert_eq!(status, 202, "{ack}");

        // Full fine-tuning, the comparison method: a whole checkpoint, not a served generation.
        let (status, full) = server.post(
            "/v1/train",
            &json!({"task": "spam", "method": "full", "epochs": 1, "max_length": 32}),
        );
        assert_eq!(status, 202, "{full}");
        let full_id = full["job_id"].as_str().unwrap().to_owned();
        assert_eq!(
            server
                .post("/v1/train", &json!({"task": "spam", "method": "half"}))
                .0,
            422
        );
        assert_eq!(
            server
                .post(
                    "/v1/train",
                    &json!({"task": "spam", "class_weights": [1.0, 2.0, 3.0]})
                )
                .0,
            422,
            "class_weights needs one weight per label"
        );
        assert_eq!(
            server
                .post("/v1/train", &json!({"task": "spam", "epochs": 0}))
                .0,
            422
        );
        assert_eq!(
            server
                .post("/v1/train", &json!({"task": "spam", "bogus": 1}))
                .0,
            422
        );
        assert_eq!(
            server
                .post("/v1/train", &json!({"task": "spam", "max_grad_norm": -1.0}))
                .0,
            422,
            "a negative gradient bound"
        );
        assert_eq!(
            server
                .post(
                    "/v1/train",
                    &json!({"task": "spam", "divergence_rollbacks": 11})
                )
                .0,
            422,
            "more rollbacks than the limit"
        );
        // Refused when submitted, not after training: what the registry would not publish, what the model
        // does not have.
        for (body, why) in [
            (
                json!({"task": "spam", "rank": 65}),
                "over [adapters] max_rank",
            ),
            (
                json!({"task": "spam", "targets": ["query", "query"]}),
                "a linear named twice",
            ),
            (
                json!({"task": "spam", "method": "full", "freeze_layers": 7}),
                "more frozen layers than the model's 6",
            ),
        ] {
            let (status, error) = server.post("/v1/train", &body);
            assert_eq!(status, 422, "{why}: {error}");
        }
        let (status, error) = server.get_json("/v1/jobs/job-%00");
        assert_eq!(status, 404, "{error}");
        assert_eq!(server.post("/v1/train", &json!({"task": "nope"})).0, 404);

        let config = json!({"task": "spam", "epochs": 5, "max_length": 48, "learning_rate": 0.003, "batch_size": 8});
        let (status, body) = server.post("/v1/train", &config);
        assert_eq!(status, 202, "{body}");
        let job_id = body["job_id"].as_str().unwrap().to_owned();
        let (status, cancelled) = server.post("/v1/train", &config);
        assert_eq!(status, 202);
        let cancel_id = cancelled["job_id"].as_str().unwrap();
        let (status, _) = server.send("DELETE", &format!("/v1/jobs/{cancel_id}"), &json!({}));
        assert_eq!(status, 200);

        let full = wait_for(&server, &full_id, Duration::from_secs(600));
        assert_eq!(full["state"], "succeeded", "{full}");
        assert_eq!(full["method"], "full");
        assert!(full["adapter"].is_null(), "{full}");
        let dir = server.data_dir.join(full["output"].as_str().unwrap());
        for file in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "flywheel.json",
        ] {
            assert!(dir.join(file).is_file(), "{} lacks {file}", dir.display());
        }
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["id2label"]["1"], "spam");
        assert_eq!(config["architectures"][0], "BertForSequenceClassification");
        assert!(
            full["trainable_params"].as_u64().unwrap() > 22_000_000,
            "{full}"
        );

        let done = wait_for(&server, &job_id, Duration::from_secs(600));
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["step"], done["total_steps"]);
        let macro_f1 = done["val"]["macro_f1"].as_f64().unwrap();
        assert!(macro_f1 >= 0.8, "{done}");
        let norm = done["grad_norm"]
            .as_f64()
            .expect("clipping on reports the norm");
        assert!(norm.is_finite() && norm > 0.0, "{done}");
        eprintln!("job {job_id}: {done}");
        assert_eq!(
            wait_for(&server, cancel_id, Duration::from_secs(60))["state"],
            "cancelled"
        );

        let adapter = done["adapter"].as_str().unwrap().to_owned();
        let (_, list) = server.get_json("/v1/adapters");
        let trained = list
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == adapter.as_str())
            .expect("listed");
        assert_eq!(
            trained["aliases"],
            json!(["spam"]),
            "the task had no generation, so it becomes stable"
        );
        assert!(trained["metrics"]["val"]["macro_f1"].is_number());
        let (_, metrics) = server.get_text("/metrics");
        let ready = format!(
            "flywheel_adapters_loaded {}",
            list.as_array().unwrap().len()
        );
        assert!(
            metrics.lines().any(|l| l == ready),
            "the trainer's generation counts: {ready}"
        );
        let (status, body) = server.post(
            "/v1/predict",
            &json!({"task": "spam", "inputs": ["Meeting notes attached"]}),
        );
        assert_eq!(
            (status, body["adapter"].as_str()),
            (200, Some(adapter.as_str())),
            "{body}"
        );
        (job_id, adapter)
    };
    let (job_id, adapter) = job_id;
    // What a crash between the publish and the job's own record leaves on disk: the generation in the
    // registry, the job still running. The restart must record it as succeeded, not train it again.
    let list_path = data.path().join("jobs.json");
    let mut list: Value =
        serde_json::from_str(&std::fs::read_to_string(&list_path).unwrap()).unwrap();
    let record = list
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|j| j["id"] == job_id.as_str())
        .unwrap();
    record["state"] = json!("running");
    record["adapter"] = Value::Null;
    std::fs::write(&list_path, serde_json::to_vec(&list).unwrap()).unwrap();
    let server = Server::start_in(data.path(), &[]);
    let (_, job) = server.get_json(&format!("/v1/jobs/{job_id}"));
    assert_eq!(
        job["state"], "succeeded",
        "finished jobs survive a restart: {job}"
    );
    assert_eq!(job["adapter"], adapter.as_str(), "{job}");
    let (_, jobs) = server.get_json("/v1/jobs?task=spam");
    assert_eq!(
        jobs.as_array().unwrap().len(),
        4,
        "failed, full, LoRA and cancelled jobs"
    );
}

#[test]
fn a_job_the_server_cannot_write_down_is_refused_and_an_unreadable_list_stops_the_start() {
    let data = tempfile::tempdir().unwrap();
    let jobs = data.path().join("jobs.json");
    {
        let server = Server::start_in(data.path(), &[]);
        let (status, _) = server.post(
            "/v1/tasks",
            &json!({"name": "spam", "labels": ["ham", "spam"]}),
        );
        assert_eq!(status, 201);
        // The list's place taken by a directory: the rename over it fails, as on a full or read-only disk.
        let _ = std::fs::remove_file(&jobs);
        std::fs::create_dir_all(jobs.join("in-the-way")).unwrap();
        let (status, body) = server.post("/v1/train", &json!({"task": "spam"}));
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error_type"], "storage_unavailable", "{body}");
        let (status, list) = server.get_json("/v1/jobs");
        assert_eq!(status, 200);
        assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    }
    // A list that cannot be read is not started over (which would overwrite it): the start stops, naming it.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["serve", "--port", "0", "--host", "127.0.0.1", "--data-dir"])
        .arg(data.path())
        .arg("--model")
        .arg(common::model_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server started on a job list it cannot read");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("jobs.json"), "{stderr}");
    assert!(jobs.join("in-the-way").is_dir());
}

/// A server whose autopilot trains every `every` new feedback rows, with no interval between jobs, on the
/// CPU where the build or the machine has no GPU (`auto`), with `extra` settings.
fn autopilot_server(every: &str, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("FLYWHEEL_TRAINER__AUTO_EVERY_FEEDBACK", every),
        ("FLYWHEEL_TRAINER__DEVICE", "auto"),
        ("FLYWHEEL_TRAINER__AUTO_MIN_INTERVAL_SECS", "0"),
        ("FLYWHEEL_ROLLOUTS__EVALUATE_EVERY_MS", "200"),
    ];
    env.extend_from_slice(extra);
    Server::start(&[], &env)
}

#[test]
fn the_autopilot_trains_once_enough_feedback_arrived() {
    let server = autopilot_server("20", &[]);
    let (status, body) = server.post(
        "/v1/tasks",
        &json!({"name": "spam", "labels": ["ham", "spam"]}),
    );
    assert_eq!(status, 201, "{body}");
    // Let the autopilot see the task (its baseline is the count at first sight: 0).
    std::thread::sleep(Duration::from_millis(600));
    let items = feedback_items(10, 9);
    assert_eq!(
        server.post("/v1/feedback", &json!({ "items": items })).0,
        202
    );
    std::thread::sleep(Duration::from_millis(1000));
    let (_, jobs) = server.get_json("/v1/jobs?task=spam");
    assert_eq!(
        jobs.as_array().unwrap().len(),
        0,
        "19 items are not enough: {jobs}"
    );
    let one = json!({"task": "spam", "text": "one more mail about cheap watches", "label": "spam"});
    assert_eq!(server.post("/v1/feedback", &one).0, 202);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, jobs) = server.get_json("/v1/jobs?task=spam");
        if jobs.as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no automatic job: {jobs}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // One job per threshold: nothing more starts while it runs.
    std::thread::sleep(Duration::from_millis(1000));
    let (_, jobs) = server.get_json("/v1/jobs?task=spam");
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    // 20 rows would validate on 1–2 mails per label: the small-data guard trains on all 20 for the
    // job's epochs, keeps the last, and says so.
    let id = jobs[0]["id"].as_str().unwrap().to_owned();
    let done = wait_for(&server, &id, Duration::from_secs(300));
    assert_eq!(done["state"], "succeeded", "{done}");
    let note = done["validation_note"].as_str().expect("a note");
    assert!(note.starts_with("validation skipped: label"), "{note}");
    assert!(
        note.contains("trained on all 20 examples for 3 epochs"),
        "{note}"
    );
    assert_eq!(done["train_examples"], 20);
    assert!(
        done["val"].is_null() && done["stable_val"].is_null(),
        "{done}"
    );
    assert_eq!(done["epoch"], 3, "LoRA's default epochs");
}

#[test]
fn at_the_adapter_limit_a_job_is_refused_at_once_and_the_autopilot_retires_the_oldest_free_generation(
) {
    // Each round posts 20 mails, of which a sampled text may repeat an earlier one: 15 rows start a job.
    let server = autopilot_server(
        "15",
        &[
            ("FLYWHEEL_ADAPTERS__MAX_ADAPTERS", "2"),
            ("FLYWHEEL_ROLLOUTS__AUTO_CANARY", "false"),
        ],
    );
    let (status, body) = server.post(
        "/v1/tasks",
        &json!({"name": "spam", "labels": ["ham", "spam"]}),
    );
    assert_eq!(status, 201, "{body}");
    std::thread::sleep(Duration::from_millis(600));
    let ham = mails("easy-ham-1", 30);
    let spam = mails("spam-1", 30);
    // Each round posts 20 new mails; the autopilot trains on each, and each job publishes a generation.
    let mut generations = Vec::new();
    for round in 0..3 {
        if round == 2 {
            // Two generations are the limit: a job asked for now is refused before it trains.
            let (status, body) = server.post("/v1/train", &json!({"task": "spam"}));
            assert_eq!(
                (status, body["error_type"].as_str()),
                (409, Some("conflict")),
                "{body}"
            );
        }
        let items: Vec<Value> = ham[round * 10..round * 10 + 10]
            .iter()
            .map(|t| json!({"task": "spam", "text": t, "label": "ham"}))
            .chain(
                spam[round * 10..round * 10 + 10]
                    .iter()
                    .map(|t| json!({"task": "spam", "text": t, "label": "spam"})),
            )
            .collect();
        assert_eq!(
            server.post("/v1/feedback", &json!({ "items": items })).0,
            202
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let job = loop {
            let (_, jobs) = server.get_json("/v1/jobs?task=spam");
            if let Some(job) = jobs.as_array().unwrap().iter().find(|j| {
                j["id"].as_str().is_some_and(|id| {
                    !generations
                        .iter()
                        .any(|(job, _): &(String, String)| job == id)
                })
            }) {
                break job["id"].as_str().unwrap().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no automatic job in round {round}: {jobs}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let done = wait_for(&server, &job, Duration::from_secs(300));
        assert_eq!(done["state"], "succeeded", "{done}");
        generations.push((job, done["adapter"].as_str().unwrap().to_owned()));
    }
    let (_, adapters) = server.get_json("/v1/adapters");
    let mut listed: Vec<&str> = adapters
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    listed.sort_unstable();
    let mut want = vec![generations[0].1.as_str(), generations[2].1.as_str()];
    want.sort_unstable();
    // The first is the stable one (aliased); the second, free, made room for the third.
    assert_eq!(listed, want, "{adapters}");
}

/// Creates the task, posts 80 mails, starts a 20-epoch job and waits until it has taken two steps; returns
/// the feedback acknowledgement and the job id.
fn start_long_job(server: &Server) -> (Value, String) {
    server.post(
        "/v1/tasks",
        &json!({"name": "spam", "labels": ["ham", "spam"]}),
    );
    let (status, ack) = server.post("/v1/feedback", &json!({ "items": feedback_items(40, 40) }));
    assert_eq!(status, 202, "{ack}");
    let (status, body) = server.post(
        "/v1/train",
        &json!({"task": "spam", "epochs": 20, "max_length": 64, "patience": 20}),
    );
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, j) = server.get_json(&format!("/v1/jobs/{job}"));
        if j["state"] == "running" && j["step"].as_u64().unwrap_or(0) >= 2 {
            return (ack, job);
        }
        assert!(Instant::now() < deadline, "the job never got going: {j}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kill_9_during_training_loses_no_feedback_and_publishes_no_half_generation() {
    let data = tempfile::tempdir().unwrap();
    let (acked, job) = {
        let server = Server::start_in(data.path(), &[]);
        let (ack, job) = start_long_job(&server);
        (ack["ids"].as_array().unwrap().clone(), job)
        // Dropping the server here kills it with SIGKILL mid-training.
    };
    let server = Server::start_in_env(
        data.path(),
        &[],
        &[("FLYWHEEL_TRAINER__RERUN_INTERRUPTED", "false")],
    );
    let (_, j) = server.get_json(&format!("/v1/jobs/{job}"));
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("interrupted"), "{j}");
    assert_eq!(j["interrupted"], true, "{j}");
    assert!(j["rerun_as"].is_null(), "re-runs are off: {j}");
    let (_, listed) = server.get_json("/v1/jobs");
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let (_, listed) = server.get_json("/v1/feedback?task=spam&limit=1000");
    let ids: Vec<&Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["id"])
        .collect();
    for id in &acked {
        assert!(ids.contains(&id), "acknowledged feedback {id} is gone");
    }
    let (_, adapters) = server.get_json("/v1/adapters");
    assert_eq!(adapters, json!([]), "no generation from the killed job");
    let (_, task) = server.get_json("/v1/tasks/spam");
    assert!(task["stable"].is_null(), "{task}");
}

#[test]
fn a_full_job_queue_answers_429_and_sigterm_drains_requests_and_stops_the_trainer() {
    let data = tempfile::tempdir().unwrap();
    let job = {
        let server = Server::start_in(data.path(), &[]);
        let (_, job) = start_long_job(&server);
        // The queue takes `[trainer] max_queued_jobs` (4) jobs, the running one included; then 429.
        for _ in 0..3 {
            let (status, body) = server.post("/v1/train", &json!({"task": "spam"}));
            assert_eq!(status, 202, "{body}");
        }
        let full = ureq::post(&server.url("/v1/train")).send_json(json!({"task": "spam"}));
        let Err(ureq::Error::Status(429, full)) = full else {
            panic!("a fifth job should be refused with 429: {full:?}");
        };
        assert_eq!(full.header("retry-after"), Some("1"));
        let full: Value = full.into_json().unwrap();
        assert_eq!(full["error_type"], "queue_full", "{full}");
        // Requests in flight when the signal arrives are answered.
        let texts: Vec<String> = mails("easy-ham-1", 8);
        let in_flight: Vec<_> = texts
            .into_iter()
            .map(|text| {
                let url = server.url("/v1/embed");
                std::thread::spawn(move || {
                    match ureq::post(&url).send_json(json!({ "inputs": [text] })) {
                        Ok(r) => Some(r.status()),
                        Err(ureq::Error::Status(code, _)) => Some(code),
                        // Not connected before the listener closed: never accepted.
                        Err(ureq::Error::Transport(_)) => None,
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(30));
        server.terminate();
        let answered: Vec<u16> = in_flight
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        let (status, log) = server.wait_exit(Duration::from_secs(30));
        let status = status.expect("the server exits within the shutdown deadline");
        assert!(status.success(), "exit status {status}: {log:?}");
        assert!(
            !answered.is_empty() && answered.iter().all(|&s| s == 200),
            "a request that was accepted failed: {answered:?}"
        );
        assert!(
            log.iter().any(|l| l.contains("trainer stopped")),
            "the trainer was not stopped cleanly: {log:?}"
        );
        job
    };
    let server = Server::start_in(data.path(), &[]);
    let (_, j) = server.get_json(&format!("/v1/jobs/{job}"));
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"].as_str().unwrap().contains("shutdown"),
        "the job records why it stopped: {j}"
    );
    // The start re-ran each of the four interrupted jobs once, as a new job that names it.
    let rerun = j["rerun_as"]
        .as_str()
        .expect("the interrupted job was re-run");
    let (_, r) = server.get_json(&format!("/v1/jobs/{rerun}"));
    assert_eq!(r["rerun_of"], job.as_str(), "{r}");
    assert_eq!(
        r["config"], j["config"],
        "the re-run keeps the job's parameters"
    );
    assert!(
        matches!(r["state"].as_str(), Some("queued") | Some("running")),
        "{r}"
    );
    let (_, listed) = server.get_json("/v1/jobs?task=spam");
    let reruns = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["rerun_of"].is_string())
        .count();
    assert_eq!(reruns, 4, "{listed}");
    let (_, adapters) = server.get_json("/v1/adapters");
    assert_eq!(adapters, json!([]), "no generation from the stopped job");
}
