//! Crash safety over HTTP on the real model: ten `kill -9`s at seeded random moments (0.3–6 s into each
//! life) while two clients post feedback (distinct mail, to an `inbox` task) and a short training job of the
//! `spam` task runs or publishes. After every restart each 202-acknowledged feedback row is present, every registered generation is whole
//! and serves, no job but the re-runs the start queued reads as live, each interrupted job was re-run once, and
//! rollouts read back. And a data directory serves one process at a time: a second `serve` or a `migrate`
//! beside a live one is refused, naming it, and its `kill -9` frees the directory.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{mails, Server};
use serde_json::{json, Value};

/// Every stored feedback id of `task`, paging through `GET /v1/feedback`.
fn stored_ids(server: &Server, task: &str) -> BTreeSet<i64> {
    let mut ids = BTreeSet::new();
    let mut after = 0;
    loop {
        let (status, page) = server.get_json(&format!(
            "/v1/feedback?task={task}&after_id={after}&limit=1000"
        ));
        assert_eq!(status, 200, "{page}");
        let rows = page.as_array().expect("a list");
        if rows.is_empty() {
            return ids;
        }
        for row in rows {
            let id = row["id"].as_i64().expect("an id");
            ids.insert(id);
            after = after.max(id);
        }
    }
}

/// What a restarted server must show: the acknowledged rows, whole generations that serve, no job still
/// running, a readable rollout state.
fn check_consistent(server: &Server, acked: &BTreeSet<i64>, round: usize) {
    let stored: BTreeSet<i64> = stored_ids(server, "inbox")
        .union(&stored_ids(server, "spam"))
        .copied()
        .collect();
    let lost: Vec<&i64> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "round {round}: acknowledged feedback lost: {lost:?}"
    );
    let (status, adapters) = server.get_json("/v1/adapters");
    assert_eq!(status, 200, "{adapters}");
    for generation in adapters.as_array().expect("a list") {
        assert_eq!(
            generation["state"], "ready",
            "round {round}: a generation did not load whole: {generation}"
        );
        let id = generation["id"].as_str().expect("an id");
        let (status, body) = server.post(
            "/v1/predict",
            &json!({"task": "spam", "inputs": ["cheap pills, click now"], "adapter": id}),
        );
        assert_eq!(status, 200, "round {round}: {id} does not serve: {body}");
    }
    let (status, task) = server.get_json("/v1/tasks/spam");
    assert_eq!(status, 200, "{task}");
    if task["stable"].is_string() {
        let (status, body) = server.post(
            "/v1/predict",
            &json!({"task": "spam", "inputs": ["meeting moved to friday"]}),
        );
        assert_eq!(
            status, 200,
            "round {round}: the stable alias does not serve: {body}"
        );
    }
    let (status, jobs) = server.get_json("/v1/jobs?task=spam");
    assert_eq!(status, 200, "{jobs}");
    for job in jobs.as_array().expect("a list") {
        // Live now: only the re-runs this start queued. Every job the crash stopped is failed, marked
        // interrupted, and re-run once (a re-run is not re-run again).
        let live = matches!(job["state"].as_str(), Some("queued") | Some("running"));
        assert!(
            !live || job["rerun_of"].is_string(),
            "round {round}: a job survived the crash as live: {job}"
        );
        if job["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("interrupted by a restart"))
        {
            assert_eq!(job["interrupted"], true, "round {round}: {job}");
            assert!(
                job["rerun_as"].is_string() || job["rerun_of"].is_string(),
                "round {round}: an interrupted job was not re-run: {job}"
            );
        }
    }
    let (status, rollout) = server.get_json("/v1/rollouts/spam");
    assert!(
        status == 200 || status == 404,
        "round {round}: {status} {rollout}"
    );
}

/// A seeded generator for the kill moments (SplitMix64).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn ten_kill_9s_during_feedback_and_training_lose_nothing_acknowledged() {
    let data = tempfile::tempdir().expect("a temporary data directory");
    let ham = mails("easy-ham-1");
    let spam = mails("spam-1");
    let mut acked: BTreeSet<i64> = BTreeSet::new();
    {
        let server = Server::start_in(data.path(), &[]);
        for task in ["spam", "inbox"] {
            let (status, body) = server.post(
                "/v1/tasks",
                &json!({"name": task, "labels": ["ham", "spam"]}),
            );
            assert_eq!(status, 201, "{body}");
        }
        // The job's data: 30 mails of each label, a few seconds of training.
        let items: Vec<Value> = ham[..30]
            .iter()
            .map(|t| json!({"task": "spam", "text": t, "label": "ham"}))
            .chain(
                spam[..30]
                    .iter()
                    .map(|t| json!({"task": "spam", "text": t, "label": "spam"})),
            )
            .collect();
        let (status, body) = server.post("/v1/feedback", &json!({ "items": items }));
        assert_eq!(status, 202, "{body}");
        acked.extend(
            body["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_i64().unwrap()),
        );
    }
    let mut seed = 0x5EED_u64;
    let mut killed: Vec<String> = Vec::new();
    let mut last_job: Option<String> = None;
    for round in 0..10 {
        let server = Server::start_in(data.path(), &[]);
        check_consistent(&server, &acked, round);
        // Two clients post labelled mail until the server dies under them; each remembers what was acked.
        let round_acked = Arc::new(Mutex::new(Vec::<i64>::new()));
        let posters: Vec<_> = (0..2)
            .map(|client| {
                let (base, acked) = (server.base.clone(), round_acked.clone());
                let (ham, spam) = (ham.clone(), spam.clone());
                std::thread::spawn(move || {
                    for batch in 0.. {
                        let items: Vec<Value> = (0..5)
                            .map(|i| {
                                let n = (batch * 5 + i) % 400;
                                let (text, label) = if i % 2 == 0 {
                                    (&ham[n], "ham")
                                } else {
                                    (&spam[n], "spam")
                                };
                                // Distinct rows: every acknowledgement is a fresh insert.
                                let text = format!("{text}\n[{round}/{client}/{batch}/{i}]");
                                json!({"task": "inbox", "text": text, "label": label})
                            })
                            .collect();
                        let answer = ureq::post(&format!("{base}/v1/feedback"))
                            .timeout(Duration::from_secs(10))
                            .send_json(json!({ "items": items }));
                        match answer {
                            Ok(r) if r.status() == 202 => {
                                let body: Value = r.into_json().expect("a JSON acknowledgement");
                                let ids = body["ids"].as_array().expect("ids");
                                acked
                                    .lock()
                                    .expect("acked lock")
                                    .extend(ids.iter().map(|id| id.as_i64().expect("an id")));
                            }
                            // The server was killed: a request in flight has no answer, so no promise.
                            Err(ureq::Error::Transport(_)) => return,
                            Ok(r) => panic!("feedback answered {}", r.status()),
                            Err(e) => panic!("feedback failed: {e}"),
                        }
                    }
                })
            })
            .collect();
        // Even rounds train long enough (3 epochs at 64 tokens, well over the longest wait on any machine)
        // that the kill hits the running job; odd rounds train for about a second on a fast machine, so the
        // kill may come while the job trains, publishes, or after.
        let (epochs, max_length) = if round % 2 == 0 { (3, 64) } else { (1, 16) };
        if let Some(previous) = &last_job {
            // The start re-queued the job the kill interrupted; cancel that re-run so this round's job
            // runs at once.
            let (_, before) = server.get_json(&format!("/v1/jobs/{previous}"));
            if let Some(rerun) = before["rerun_as"].as_str() {
                let (status, body) =
                    server.send("DELETE", &format!("/v1/jobs/{rerun}"), &json!({}));
                assert_eq!(status, 200, "cancelling the re-run: {body}");
            }
        }
        let (status, body) = server.post(
            "/v1/train",
            &json!({"task": "spam", "epochs": epochs, "max_length": max_length, "warm_start": false}),
        );
        assert_eq!(status, 202, "{body}");
        let job = body["job_id"].as_str().expect("a job id").to_owned();
        last_job = Some(job.clone());
        let wait = Duration::from_millis(300 + next(&mut seed) % 5_700);
        std::thread::sleep(wait);
        let (_, state) = server.get_json(&format!("/v1/jobs/{job}"));
        drop(server); // SIGKILL
        killed.push(state["state"].as_str().unwrap_or_default().to_owned());
        for p in posters {
            p.join().expect("a feedback client");
        }
        let mut round_acked = round_acked.lock().expect("acked lock");
        eprintln!(
            "round {round}: killed after {wait:?}, {} rows acknowledged, job {}",
            round_acked.len(),
            state["state"]
        );
        acked.extend(round_acked.drain(..));
    }
    let server = Server::start_in(data.path(), &[]);
    check_consistent(&server, &acked, 10);
    eprintln!(
        "{} acknowledged rows all present; the job was {killed:?} when each kill came",
        acked.len()
    );
    assert!(
        killed.iter().filter(|s| *s == "running").count() >= 2,
        "most kills should hit a running job: {killed:?}"
    );
}

/// `flywheel serve` or `flywheel migrate` on `data`, run to its end: (exit success, stderr). One still
/// running after 30 s (a server the lock failed to stop) is killed, and the test fails.
fn run_on(command: &str, data: &std::path::Path, env: &[(&str, &str)]) -> (bool, String) {
    use std::io::Read;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([command, "--port", "0", "--host", "127.0.0.1", "--model"])
        .arg(common::model_dir())
        .arg("--data-dir")
        .arg(data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run flywheel");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for flywheel") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flywheel {command} was still running after 30 s on a held data directory");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (status.success(), stderr)
}

#[test]
fn a_data_directory_serves_one_process_at_a_time_and_a_kill_9_frees_it() {
    let data = tempfile::tempdir().expect("a temporary data directory");
    let first = Server::start_in(data.path(), &[]);
    let holder = format!("pid {}", first.pid());

    let (ok, stderr) = run_on("serve", data.path(), &[]);
    assert!(!ok, "a second server on the same data directory started");
    assert!(
        stderr.contains("is in use by another flywheel process") && stderr.contains(&holder),
        "the refusal names the holder: {stderr}"
    );
    // The migration reads the single process's files; it is refused before it reaches the database, so the
    // URL is never dialled.
    let (ok, stderr) = run_on(
        "migrate",
        data.path(),
        &[
            ("FLYWHEEL_STORE__BACKEND", "postgres"),
            ("FLYWHEEL_STORE__URL", "postgres://nobody@127.0.0.1:1/none"),
        ],
    );
    assert!(!ok, "a migration ran beside the live process");
    assert!(
        stderr.contains("is in use by another flywheel process") && stderr.contains(&holder),
        "{stderr}"
    );
    let (status, body) = first.get_json("/ready");
    assert_eq!(status, 200, "the first server serves on: {body}");

    drop(first); // SIGKILL: the system drops the lock with the process.
    let second = Server::start_in(data.path(), &[]);
    let (status, body) = second.get_json("/v1/tasks");
    assert_eq!(status, 200, "{body}");
}
