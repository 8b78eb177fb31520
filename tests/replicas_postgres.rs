//! Several replicas over one PostgreSQL and one adapter directory, on the real model over real HTTP
//! (`[store] backend = "postgres"`): two serving replicas and a `flywheel worker`. A task created on one is
//! known to the others, feedback posted to either replica is stored once and seen by both, a job queued on
//! a replica is claimed and run by the worker on what was posted to the other, and its generation serves on
//! both, an alias moved on one moves on the other within a second; the worker's next generation is
//! canaried, the rollout's split is sticky across the replicas, their evidence adds up, and a promotion on
//! one is seen on the other within a second; one process leads the autopilot; a `kill -9` of the worker running a job has another
//! worker run it again, and one of a replica while clients post loses no acknowledged row. Needs the tests'
//! PostgreSQL (`scripts/test.sh` starts one).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{sample_mails, Server};
use serde_json::{json, Value};

/// One database that replicas share, and where they share generations' files: one adapter directory, or
/// an S3-compatible bucket (each replica then caches them in a directory of its own).
struct Shared {
    url: String,
    adapters: tempfile::TempDir,
    /// `FLYWHEEL_STORE__OBJECTS_URL` and the `AWS_*` variables, when generations go through a bucket.
    objects: Vec<(String, String)>,
}

impl Shared {
    /// The variables every process on it gets.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("FLYWHEEL_STORE__BACKEND".to_owned(), "postgres".to_owned()),
            ("FLYWHEEL_STORE__URL".to_owned(), self.url.clone()),
        ];
        if self.objects.is_empty() {
            env.push((
                "FLYWHEEL_DATA__ADAPTERS_DIR".to_owned(),
                self.adapters.path().to_str().unwrap().to_owned(),
            ));
        }
        env.extend(self.objects.iter().cloned());
        env
    }
}

fn shared() -> Option<Shared> {
    Some(Shared {
        url: common::postgres_scratch()?,
        adapters: tempfile::tempdir().unwrap(),
        objects: Vec::new(),
    })
}

/// [`shared`] with generations in a new bucket on the tests' S3-compatible server, and no shared directory.
fn shared_through_a_bucket() -> Option<Shared> {
    let (objects_url, mut objects) = flywheel::adapters::objects::test_bucket()?;
    objects.push(("FLYWHEEL_STORE__OBJECTS_URL".to_owned(), objects_url));
    Some(Shared {
        objects,
        ..shared()?
    })
}

/// `shared`'s variables and `extra`, as the server helpers take them.
fn with<'a>(
    shared: &'a [(String, String)],
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    shared
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(extra.iter().copied())
        .collect()
}

/// A replica with a data directory of its own over the shared database and adapters.
fn replica(shared: &Shared) -> Server {
    replica_with(shared, &[])
}

fn replica_with(shared: &Shared, args: &[&str]) -> Server {
    Server::start(args, &with(&shared.env(), &[]))
}

/// A `flywheel worker` over the shared database and adapters, with `env` besides.
fn worker(shared: &Shared, env: &[(&str, &str)]) -> Server {
    Server::start_worker(&with(&shared.env(), env))
}

fn create_task(server: &Server, name: &str) {
    let (status, body) = server.post(
        "/v1/tasks",
        &json!({"name": name, "labels": ["ham", "spam"]}),
    );
    assert_eq!(status, 201, "{body}");
}

/// Polls `path` on `server` until `done` holds for its answer; returns how long that took. Fails after 1 s,
/// the convergence the replicas promise (they look every 500 ms).
fn within_a_second(server: &Server, path: &str, done: impl Fn(u16, &Value) -> bool) -> Duration {
    wait_for(server, path, Duration::from_secs(1), done)
}

/// Polls `path` on `server` until `done` holds for its answer, failing after `limit`; returns how long it
/// took.
fn wait_for(
    server: &Server,
    path: &str,
    limit: Duration,
    done: impl Fn(u16, &Value) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let (status, body) = server.get_json(path);
        if done(status, &body) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{path} did not converge within {limit:?}: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every stored row of `task` as (id, text, count), paging through `GET /v1/feedback`.
fn stored(server: &Server, task: &str) -> Vec<(i64, String, i64)> {
    let mut rows = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = server.get_json(&format!(
            "/v1/feedback?task={task}&after_id={after}&limit=1000"
        ));
        assert_eq!(status, 200, "{page}");
        let page = page.as_array().expect("a list").clone();
        if page.is_empty() {
            return rows;
        }
        for row in page {
            let id = row["id"].as_i64().expect("an id");
            rows.push((
                id,
                row["text"].as_str().expect("a text").to_owned(),
                row["count"].as_i64().expect("a count"),
            ));
            after = id;
        }
    }
}

/// Posts `ham` and `spam` mail as feedback of the task `spam` to `server`; returns how many rows.
fn post_mail(server: &Server, ham: &[String], spam: &[String]) -> usize {
    let items: Vec<Value> = ham
        .iter()
        .map(|t| json!({"task": "spam", "text": t, "label": "ham"}))
        .chain(
            spam.iter()
                .map(|t| json!({"task": "spam", "text": t, "label": "spam"})),
        )
        .collect();
    let (status, ack) = server.post("/v1/feedback", &json!({ "items": items }));
    assert_eq!(status, 202, "{ack}");
    items.len()
}

/// Polls job `id` on `server` until it trains (running, a step done); returns it then.
fn wait_until_training(server: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, job) = server.get_json(&format!("/v1/jobs/{id}"));
        if job["state"] == "running" && job["step"].as_u64().unwrap_or(0) >= 1 {
            return job;
        }
        assert!(
            matches!(job["state"].as_str(), Some("queued") | Some("running")),
            "{job}"
        );
        assert!(Instant::now() < deadline, "the job never ran: {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls job `id` on `server` until it is neither queued nor running.
fn wait_for_job(server: &Server, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, job) = server.get_json(&format!("/v1/jobs/{id}"));
        assert_eq!(status, 200, "{job}");
        if !matches!(job["state"].as_str(), Some("queued") | Some("running")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job still live: {job}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The name a replica claims jobs under: its host's name and its process id.
fn worker_of(server: &Server) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("the host name");
    format!("{}/{}", host.trim(), server.pid())
}

fn post_feedback(server: &Server, items: &[(&str, &str)]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|(text, label)| json!({"task": "inbox", "text": text, "label": label}))
        .collect();
    let (status, body) = server.post("/v1/feedback", &json!({ "items": items }));
    assert_eq!(status, 202, "{body}");
    body
}

#[test]
fn replicas_share_tasks_feedback_generations_and_alias_moves() {
    let Some(shared) = shared() else {
        return;
    };
    // A and B only serve; W trains.
    let (a, b) = (
        replica_with(&shared, &["--no-trainer"]),
        replica_with(&shared, &["--no-trainer"]),
    );
    let w = worker(&shared, &[]);
    create_task(&a, "inbox");
    let took = within_a_second(&b, "/v1/tasks/inbox", |status, _| status == 200);
    eprintln!("a task created on A was known to B after {took:?}");
    let to_a = post_feedback(
        &a,
        &[("lunch on friday?", "ham"), ("cheap pills now", "spam")],
    );
    let to_b = post_feedback(
        &b,
        &[
            ("cheap pills now", "spam"),
            ("minutes of the meeting", "ham"),
        ],
    );
    assert_eq!(to_a["duplicates"], 0, "{to_a}");
    assert_eq!(
        to_b["duplicates"], 1,
        "the mail A stored is a duplicate at B: {to_b}"
    );
    assert_eq!(to_b["ids"][0], to_a["ids"][1], "one row, one id");
    let (seen_a, seen_b) = (stored(&a, "inbox"), stored(&b, "inbox"));
    assert_eq!(seen_a, seen_b, "both replicas read one store");
    assert_eq!(seen_a.len(), 3);
    assert_eq!(
        seen_a.iter().find(|r| r.1 == "cheap pills now").unwrap().2,
        2
    );
    for server in [&a, &b] {
        let (_, task) = server.get_json("/v1/tasks/inbox");
        assert_eq!(task["feedback_count"], 3, "{task}");
    }

    // A job on W learns from mail posted to A: the trainer reads the shared store.
    let (ham, spam) = (
        sample_mails("easy-ham-1", 0, 7, 40, 60),
        sample_mails("spam-1", 0, 7, 40, 60),
    );
    create_task(&a, "spam");
    within_a_second(&b, "/v1/tasks/spam", |status, _| status == 200);
    let posted = post_mail(&a, &ham, &spam);
    // Queued on A, which does not train: W claims it from the shared queue and runs it.
    let (status, job) = a.post(
        "/v1/train",
        &json!({"task": "spam", "epochs": 1, "max_length": 32}),
    );
    assert_eq!(status, 202, "{job}");
    let id = job["job_id"].as_str().expect("a job id");
    let done = wait_for_job(&a, id, Duration::from_secs(120));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["worker"].as_str().unwrap(), worker_of(&w), "{done}");
    assert_eq!(done["attempts"], 1, "{done}");
    let (_, on_b) = b.get_json(&format!("/v1/jobs/{id}"));
    assert_eq!(on_b["state"], "succeeded", "one job, listed alike: {on_b}");
    let seen = done["train_examples"].as_u64().unwrap() + done["val"]["examples"].as_u64().unwrap();
    assert_eq!(
        seen, posted as u64,
        "W's job trained and validated on every mail posted to A: {done}"
    );

    // The generation W's job published serves on A as the task's stable generation.
    let generation = done["adapter"].as_str().expect("a published generation");
    let took = within_a_second(&a, "/v1/tasks/spam", |_, task| task["stable"] == generation);
    eprintln!("W's new generation was A's stable one after {took:?}");
    let text = "Congratulations! You have been selected for a cash prize, click here to claim";
    let answers: Vec<Value> = [&a, &b]
        .iter()
        .map(|server| {
            let (status, body) =
                server.post("/v1/predict", &json!({"task": "spam", "inputs": [text]}));
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["adapter"], generation, "{body}");
            body["predictions"][0].clone()
        })
        .collect();
    assert_eq!(
        answers[0]["label"], answers[1]["label"],
        "one generation, one answer: {answers:?}"
    );
    for (label, score) in answers[0]["scores"].as_object().expect("scores") {
        let other = answers[1]["scores"][label]
            .as_f64()
            .expect("the same labels");
        assert!(
            (score.as_f64().unwrap() - other).abs() < 1e-5,
            "{answers:?}"
        );
    }

    // An alias moved on A moves on B.
    let (status, body) = a.send(
        "PUT",
        "/v1/aliases/spam-pinned",
        &json!({"adapter": generation}),
    );
    assert!(status == 200 || status == 201, "{status} {body}");
    let took = within_a_second(&b, "/v1/adapters", |_, list| {
        list.as_array().is_some_and(|gs| {
            gs.iter().any(|g| {
                g["aliases"]
                    .as_array()
                    .is_some_and(|a| a.contains(&json!("spam-pinned")))
            })
        })
    });
    eprintln!("an alias set on A was seen on B after {took:?}");

    // Corrections posted to B train W's next generation, which is canaried: the rollout is stored in
    // PostgreSQL and both replicas route it.
    post_mail(
        &b,
        &sample_mails("easy-ham-1", 3, 7, 20, 60),
        &sample_mails("spam-1", 3, 7, 20, 60),
    );
    let (status, job) = b.post(
        "/v1/train",
        &json!({"task": "spam", "epochs": 1, "max_length": 32, "seed": 7}),
    );
    assert_eq!(status, 202, "{job}");
    let done = wait_for_job(
        &b,
        job["job_id"].as_str().unwrap(),
        Duration::from_secs(120),
    );
    assert_eq!(done["state"], "succeeded", "{done}");
    let candidate = done["adapter"]
        .as_str()
        .expect("a second generation")
        .to_owned();
    assert_ne!(candidate, generation);
    let canary = |_: u16, r: &Value| r["candidate"] == candidate.as_str() && r["phase"] == "active";
    wait_for(&a, "/v1/rollouts/spam", Duration::from_secs(10), canary);
    let took = within_a_second(&b, "/v1/rollouts/spam", canary);
    eprintln!("W's canary was routed on both replicas {took:?} after A saw it");
    let (status, body) = a.send("PUT", "/v1/rollouts/spam/traffic", &json!({"traffic": 0.5}));
    assert_eq!(status, 200, "{body}");
    let took = within_a_second(&b, "/v1/rollouts/spam", |_, r| r["traffic"] == 0.5);
    eprintln!("a share set on A was B's after {took:?}");

    // Sticky across replicas: a routing key sees one arm wherever it lands.
    let mut arms = BTreeSet::new();
    for i in 0..40 {
        let request = json!({"task": "spam", "inputs": [text], "routing_key": format!("user-{i}")});
        let answers: Vec<(Value, Value)> = [&a, &b]
            .iter()
            .map(|server| {
                let (status, body) = server.post("/v1/predict", &request);
                assert_eq!(status, 200, "{body}");
                (body["adapter"].clone(), body["arm"].clone())
            })
            .collect();
        assert_eq!(answers[0], answers[1], "user-{i}");
        arms.insert(answers[0].1.as_str().unwrap().to_owned());
    }
    assert_eq!(arms.len(), 2, "both arms serve at a share of 0.5: {arms:?}");
    // Each replica's evidence counts on the other.
    let took = wait_for(&a, "/v1/rollouts/spam", Duration::from_secs(5), |_, r| {
        r["arms"]["stable"]["requests"].as_u64().unwrap_or(0)
            + r["arms"]["candidate"]["requests"].as_u64().unwrap_or(0)
            == 80
    });
    eprintln!("both replicas' 80 requests were counted on A after {took:?}");

    // A promotion on A ends the rollout and moves the alias on B.
    let (status, body) = a.post("/v1/rollouts/spam/promote", &json!({}));
    assert_eq!(status, 200, "{body}");
    let took = within_a_second(&b, "/v1/rollouts/spam", |_, r| r["phase"] == "promoted");
    eprintln!("a promotion on A was seen on B after {took:?}");
    within_a_second(&b, "/v1/tasks/spam", |_, task| {
        task["stable"] == candidate.as_str()
    });
    let (_, body) = b.post(
        "/v1/predict",
        &json!({"task": "spam", "inputs": [text], "routing_key": "user-1"}),
    );
    assert_eq!(body["adapter"], candidate.as_str(), "{body}");

    // One of the three processes leads the autopilot (acts on analyses, starts automatic jobs).
    let leading = |server: &Server| {
        let (_, text) = server.get_text("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("flywheel_autopilot_leader "))
            .map_or(0, |v| v.trim().parse::<u32>().unwrap())
    };
    let started = Instant::now();
    while [&a, &b, &w].iter().map(|s| leading(s)).sum::<u32>() != 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "one leader, not {:?}",
            [&a, &b, &w].map(leading)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kill_9_of_a_replica_while_clients_post_loses_no_acknowledged_row() {
    let Some(shared) = shared() else {
        return;
    };
    let (a, b) = (replica(&shared), replica(&shared));
    create_task(&a, "inbox");
    within_a_second(&b, "/v1/tasks/inbox", |status, _| status == 200);
    let acked = Arc::new(Mutex::new(BTreeSet::<i64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    // Two clients on A until it dies under them, one on B until told to stop; distinct rows throughout.
    let clients: Vec<_> = [
        (a.base.clone(), 0),
        (a.base.clone(), 1),
        (b.base.clone(), 2),
    ]
    .into_iter()
    .map(|(base, client)| {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut batches = 0;
            for batch in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let items: Vec<Value> = (0..5)
                    .map(|i| {
                        json!({"task": "inbox", "text": format!("mail {client}/{batch}/{i}"),
                                   "label": if i % 2 == 0 { "ham" } else { "spam" }})
                    })
                    .collect();
                match ureq::post(&format!("{base}/v1/feedback"))
                    .timeout(Duration::from_secs(10))
                    .send_json(json!({ "items": items }))
                {
                    Ok(r) if r.status() == 202 => {
                        let body: Value = r.into_json().expect("a JSON acknowledgement");
                        let ids = body["ids"].as_array().expect("ids");
                        acked
                            .lock()
                            .unwrap()
                            .extend(ids.iter().map(|id| id.as_i64().expect("an id")));
                        batches += 1;
                    }
                    // The replica was killed: a request in flight has no answer, so no promise.
                    Err(ureq::Error::Transport(_)) => break,
                    Ok(r) => panic!("feedback answered {}", r.status()),
                    Err(e) => panic!("feedback failed: {e}"),
                }
            }
            batches
        })
    })
    .collect();
    std::thread::sleep(Duration::from_millis(1500));
    drop(a); // SIGKILL, mid-stream
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let batches: Vec<usize> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(
        batches.iter().all(|&n| n > 0),
        "every client got acknowledgements before the kill: {batches:?}"
    );
    let acked = acked.lock().unwrap().clone();
    let present: BTreeSet<i64> = stored(&b, "inbox").iter().map(|r| r.0).collect();
    let lost: Vec<&i64> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "acknowledged rows lost: {lost:?} of {}",
        acked.len()
    );
    eprintln!(
        "{} acknowledged rows ({batches:?} batches per client), all present after the kill",
        acked.len()
    );
    // A replacement replica knows the task and reads the same rows.
    let c = replica(&shared);
    let again: BTreeSet<i64> = stored(&c, "inbox").iter().map(|r| r.0).collect();
    assert_eq!(again, present);
}

#[test]
fn when_the_database_goes_away_feedback_answers_503_and_serving_goes_on() {
    let Some(shared) = shared() else {
        return;
    };
    let server = replica(&shared);
    create_task(&server, "inbox");
    post_feedback(&server, &[("before the outage", "ham")]);
    // The database is dropped under the replica, its connections cut: as unavailable as it gets.
    let admin = std::env::var("FLYWHEEL_TEST_POSTGRES_URL").unwrap();
    let (_, name) = shared.url.rsplit_once('/').unwrap();
    postgres::Client::connect(&admin, postgres::NoTls)
        .unwrap()
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .unwrap();
    let (status, body) = server.post(
        "/v1/feedback",
        &json!({"items": [{"task": "inbox", "text": "during the outage", "label": "ham"}]}),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error_type"], "storage_unavailable", "{body}");
    let (status, body) = server.get_json("/v1/feedback?task=inbox&after_id=0&limit=10");
    assert_eq!(status, 503, "{body}");
    let (status, body) = server.post("/v1/embed", &json!({"inputs": ["still serving"]}));
    assert_eq!(status, 200, "embeddings do not touch the store: {body}");
    let (status, body) = server.get_json("/ready");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_job_whose_flywheel_worker_is_killed_is_run_again_by_another() {
    // No directory is shared here: each process keeps generations in its own, and they go through a bucket.
    let Some(shared) = shared_through_a_bucket() else {
        return;
    };
    // `flywheel worker`s, with leases of 3 s so a dead worker's job is claimed again within seconds.
    let worker = || worker(&shared, &[("FLYWHEEL_TRAINER__LEASE_SECS", "3")]);
    let front = replica_with(&shared, &["--no-trainer"]);
    let workers = [worker(), worker()];
    for w in &workers {
        let (status, _) = w.get_text("/metrics");
        assert_eq!(status, 200, "a worker answers its probes and metrics");
        let (status, body) = w.post("/v1/predict", &json!({"task": "spam", "inputs": ["x"]}));
        assert_eq!(status, 404, "but not the API: {body}");
    }
    create_task(&front, "spam");
    let (ham, spam) = (
        sample_mails("easy-ham-1", 1, 5, 80, 80),
        sample_mails("spam-1", 1, 5, 80, 80),
    );
    post_mail(&front, &ham, &spam);
    // Long enough (3 epochs at 64 tokens) that the kill lands while it trains.
    let (status, job) = front.post(
        "/v1/train",
        &json!({"task": "spam", "epochs": 3, "max_length": 64}),
    );
    assert_eq!(status, 202, "{job}");
    let id = job["job_id"].as_str().expect("a job id").to_owned();
    let running = wait_until_training(&front, &id);
    let first = running["worker"].as_str().expect("a worker").to_owned();
    let (victim, survivor): (Vec<_>, Vec<_>) =
        workers.into_iter().partition(|w| worker_of(w) == first);
    assert_eq!(victim.len(), 1, "{first} is one of the two workers");
    drop(victim); // SIGKILL mid-training
    let done = wait_for_job(&front, &id, Duration::from_secs(180));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "run again once: {done}");
    assert_eq!(
        done["worker"].as_str().unwrap(),
        worker_of(&survivor[0]),
        "by the other worker: {done}"
    );
    let generation = done["adapter"].as_str().expect("a generation");
    let took = within_a_second(&front, "/v1/tasks/spam", |_, task| {
        task["stable"] == generation
    });
    eprintln!("the re-run's generation served on the front replica after {took:?}");
    // Fetched from the bucket into the front replica's own directory, and served from there.
    let (status, body) = front.post(
        "/v1/predict",
        &json!({"task": "spam", "inputs": ["win a prize now"]}),
    );
    assert_eq!(
        (status, &body["adapter"]),
        (200, &json!(generation)),
        "{body}"
    );
    let (_, adapters) = front.get_json("/v1/adapters");
    let path = adapters
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["id"] == generation))
        .and_then(|g| g["path"].as_str())
        .expect("the generation is listed with its path")
        .to_owned();
    assert!(
        front
            .data_dir
            .join("adapters")
            .join(&path)
            .join("adapter_model.safetensors")
            .is_file(),
        "{path} is in the front replica's own directory"
    );

    // A graceful stop (SIGTERM) mid-job puts the job back at once, without spending an attempt: a third
    // worker, started once the survivor has claimed the job, takes it over without waiting for a lease.
    let survivor = survivor.into_iter().next().expect("the surviving worker");
    let (status, job) = front.post(
        "/v1/train",
        &json!({"task": "spam", "epochs": 3, "max_length": 64, "warm_start": false}),
    );
    assert_eq!(status, 202, "{job}");
    let id = job["job_id"].as_str().expect("a job id").to_owned();
    let training = wait_until_training(&front, &id);
    assert_eq!(
        training["worker"].as_str().unwrap(),
        worker_of(&survivor),
        "{training}"
    );
    let third = worker();
    survivor.terminate();
    let done = wait_for_job(&front, &id, Duration::from_secs(180));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        done["attempts"], 1,
        "a graceful stop spends no attempt: {done}"
    );
    assert_eq!(
        done["worker"].as_str().unwrap(),
        worker_of(&third),
        "{done}"
    );
}
