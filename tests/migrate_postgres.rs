//! `flywheel migrate` on the real model over real HTTP: a single process (SQLite and JSON files) learns a
//! task — a PEFT generation, feedback with a duplicate, a trained generation canaried against it — and is
//! stopped; its state is migrated into PostgreSQL twice, once with generations copied into a shared adapter
//! directory and once stored in an S3-compatible bucket, and a replica with an empty data directory then
//! serves the same feedback, tasks, generations, predictions, jobs and rollout history. A migration is
//! refused while a rollout is active and into a database that holds state already, and writes nothing then.
//! Needs the tests' PostgreSQL and S3-compatible server (`scripts/test.sh` starts them).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

/// What the single process served, to compare a replica against.
struct Served {
    tasks: Value,
    feedback: Value,
    intents_feedback: Value,
    adapters: Vec<(String, Value)>,
    predictions: Vec<Value>,
    job: Value,
    rollout: Value,
}

const PROBES: [&str; 3] = [
    "Win a free cruise, reply now",
    "Minutes of Tuesday's meeting attached",
    "Your invoice is overdue",
];

fn capture(server: &Server, candidate: &str, job_id: &str) -> Served {
    let get = |path: &str| {
        let (status, body) = server.get_json(path);
        assert_eq!(status, 200, "{path}: {body}");
        body
    };
    let mut adapters: Vec<(String, Value)> = get("/v1/adapters")
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_str().unwrap().to_owned(), a["aliases"].clone()))
        .collect();
    adapters.sort_by(|a, b| a.0.cmp(&b.0));
    let predictions = ["spam", candidate]
        .iter()
        .map(|adapter| {
            let (status, body) = server.post(
                "/v1/predict",
                &json!({"task": "spam", "inputs": PROBES, "adapter": adapter}),
            );
            assert_eq!(status, 200, "{body}");
            body["predictions"].clone()
        })
        .collect();
    Served {
        tasks: get("/v1/tasks"),
        feedback: get("/v1/feedback?task=spam&limit=10000"),
        intents_feedback: get("/v1/feedback?task=intents"),
        adapters,
        predictions,
        job: get(&format!("/v1/jobs/{job_id}")),
        rollout: get("/v1/rollouts/spam"),
    }
}

/// Runs `flywheel migrate` on `data_dir` with `env`; its exit status, stdout and stderr.
fn migrate(data_dir: &Path, env: &[(String, String)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("migrate")
        .arg("--model")
        .arg(common::model_dir())
        .arg("--data-dir")
        .arg(data_dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run flywheel migrate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_for_job(server: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, job) = server.get_json(&format!("/v1/jobs/{id}"));
        match job["state"].as_str() {
            Some("queued") | Some("running") => {}
            _ => return job,
        }
        assert!(Instant::now() < deadline, "job too slow: {job}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn stop(server: Server) {
    server.terminate();
    let (status, _) = server.wait_exit(Duration::from_secs(30));
    assert!(status.is_some(), "the server did not stop");
}

#[test]
fn a_single_process_moves_to_postgres_with_everything_it_learned() {
    let Some(first_db) = common::postgres_scratch() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_in(data.path(), &[]);
    // The PEFT fixture's head has three outputs.
    let (status, body) = server.post(
        "/v1/tasks",
        &json!({"name": "spam", "labels": ["a", "b", "c"]}),
    );
    assert_eq!(status, 201, "{body}");
    server.post(
        "/v1/tasks",
        &json!({"name": "intents", "labels": ["x", "y"]}),
    );
    common::copy_peft_fixture(&server, "first");
    let (status, first) = server.post("/v1/adapters", &json!({"path": "first", "task": "spam"}));
    assert_eq!(status, 201, "{first}");
    let texts = common::sample_mails("easy-ham-1", 0, 3, 30, 30);
    let mut items: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let label = ["a", "b", "c"][i % 3];
            json!({"task": "spam", "text": t, "label": label})
        })
        .collect();
    items.push(items[0].clone());
    items.push(json!({"task": "intents", "text": "where is my parcel", "label": "x"}));
    let (status, body) = server.post("/v1/feedback", &json!({ "items": items }));
    assert_eq!(status, 202, "{body}");
    let (status, body) = server.post(
        "/v1/train",
        &json!({"task": "spam", "epochs": 1, "max_length": 32}),
    );
    assert_eq!(status, 202, "{body}");
    let job_id = body["job_id"].as_str().unwrap().to_owned();
    let job = wait_for_job(&server, &job_id);
    assert_eq!(job["state"], "succeeded", "{job}");
    let candidate = job["adapter"].as_str().unwrap().to_owned();
    let (_, rollout) = server.get_json("/v1/rollouts/spam");
    assert_eq!(
        rollout["phase"], "active",
        "the trained generation is canaried: {rollout}"
    );
    stop(server);

    // An active rollout's evidence is the single process's own: the migration is refused, and writes
    // nothing.
    let shared_dir = tempfile::tempdir().unwrap();
    let first_env = vec![
        ("FLYWHEEL_STORE__BACKEND".to_owned(), "postgres".to_owned()),
        ("FLYWHEEL_STORE__URL".to_owned(), first_db.clone()),
        (
            "FLYWHEEL_DATA__ADAPTERS_DIR".to_owned(),
            shared_dir.path().to_str().unwrap().to_owned(),
        ),
    ];
    let (ok, _, stderr) = migrate(data.path(), &first_env);
    assert!(!ok && stderr.contains("active rollout"), "{stderr}");
    let server = Server::start_in(data.path(), &[]);
    let (status, body) = server.post("/v1/rollouts/spam/rollback", &json!({}));
    assert_eq!(status, 200, "{body}");
    let served = capture(&server, &candidate, &job_id);
    assert_eq!(
        served.feedback.as_array().unwrap().len(),
        30,
        "30 distinct rows"
    );
    assert_eq!(served.feedback[0]["count"], 2, "{}", served.feedback[0]);
    stop(server);

    let second_db = common::postgres_scratch().expect("the same PostgreSQL");
    let mut targets = vec![(first_db, first_env, Some(shared_dir))];
    match flywheel::adapters::objects::test_bucket() {
        Some((objects_url, mut env)) => {
            env.push(("FLYWHEEL_STORE__BACKEND".to_owned(), "postgres".to_owned()));
            env.push(("FLYWHEEL_STORE__URL".to_owned(), second_db.clone()));
            env.push(("FLYWHEEL_STORE__OBJECTS_URL".to_owned(), objects_url));
            targets.push((second_db, env, None));
        }
        None => eprintln!("no S3-compatible server: the bucket case is skipped"),
    }
    for (_, env, shared_dir) in &targets {
        let (ok, stdout, stderr) = migrate(data.path(), env);
        assert!(ok, "{stderr}");
        let report: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(report["feedback_rows"], 31, "{report}");
        assert_eq!(
            (&report["tasks"], &report["generations"], &report["aliases"]),
            (&json!(2), &json!(2), &json!(1)),
            "{report}"
        );
        assert_eq!(
            (&report["jobs"], &report["requeued_jobs"]),
            (&json!(1), &json!(0)),
            "{report}"
        );
        assert_eq!(report["rollouts"], 1, "{report}");
        match shared_dir {
            Some(dir) => {
                assert_eq!(report["copied_generations"], 2, "{report}");
                assert!(dir.path().join("first/adapter_model.safetensors").is_file());
            }
            None => assert_eq!(report["stored_generations"], 2, "{report}"),
        }
        let (ok, _, stderr) = migrate(data.path(), env);
        assert!(
            !ok && stderr.contains("already holds"),
            "a second migration merges nothing: {stderr}"
        );

        // A replica with an empty data directory of its own sees everything the single process had.
        let replica_dir = tempfile::tempdir().unwrap();
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let replica = Server::start_in_env(replica_dir.path(), &[], &pairs);
        let seen = capture(&replica, &candidate, &job_id);
        assert_eq!(seen.tasks, served.tasks);
        assert_eq!(seen.feedback, served.feedback, "ids, counts and times kept");
        assert_eq!(seen.intents_feedback, served.intents_feedback);
        assert_eq!(seen.adapters, served.adapters);
        assert_eq!(
            seen.predictions, served.predictions,
            "the same generations serve"
        );
        for field in [
            "state",
            "adapter",
            "val",
            "train_examples",
            "config",
            "created_at",
        ] {
            assert_eq!(seen.job[field], served.job[field], "{field}");
        }
        for field in [
            "id",
            "phase",
            "candidate",
            "stable",
            "ended_at",
            "totals",
            "decisions",
        ] {
            assert_eq!(seen.rollout[field], served.rollout[field], "{field}");
        }
        // New feedback continues after the migrated ids.
        let (status, body) = replica.post(
            "/v1/feedback",
            &json!({"task": "spam", "text": "a new correction", "label": "b"}),
        );
        assert_eq!(status, 202, "{body}");
        let newest = served.feedback.as_array().unwrap().last().unwrap()["id"]
            .as_i64()
            .unwrap();
        let (_, listed) = replica.get_json(&format!("/v1/feedback?task=spam&after_id={newest}"));
        assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
        assert_eq!(
            listed[0]["id"], 32,
            "after the 30 rows of spam and the one of intents: {listed}"
        );
        stop(replica);
    }
}
