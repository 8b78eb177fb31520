//! Helpers shared by the integration suites: start the real `flywheel` binary on port 0 and talk HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The default model directory, fetched by `models/fetch.sh`.
pub fn model_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the real model is missing: run models/fetch.sh first ({} has no model.safetensors)",
        dir.display()
    );
    dir
}

/// The real model loaded in-process on the CPU, truncating at 256 tokens.
pub fn load_model() -> flywheel::model::Model {
    let options = flywheel::model::LoadOptions {
        max_length: 256,
        device: candle_core::Device::Cpu,
        ..Default::default()
    };
    flywheel::model::Model::load(&model_dir(), &options).expect("the real model loads")
}

/// A running `flywheel serve` child process, killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The server's data directory.
    pub data_dir: PathBuf,
    _data: Option<tempfile::TempDir>,
    log: std::sync::Mutex<mpsc::Receiver<String>>,
}

impl Server {
    /// Starts the server on the real model with extra flags and environment, and waits until `/ready`.
    pub fn start(extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        let server = Self::spawn(&model_dir(), extra_args, env);
        server.wait_ready(Duration::from_secs(60));
        server
    }

    /// Starts the server without waiting for readiness.
    pub fn spawn(model: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        let data = tempfile::tempdir().expect("temp data dir");
        let dir = data.path().to_owned();
        Self::spawn_in("serve", model, &dir, Some(data), extra_args, env)
    }

    /// Starts `flywheel worker` (training from the shared queue, answering only `/health`, `/ready` and
    /// `/metrics`) on the real model with a fresh data directory, and waits until `/ready`.
    pub fn start_worker(env: &[(&str, &str)]) -> Server {
        let data = tempfile::tempdir().expect("temp data dir");
        let dir = data.path().to_owned();
        let server = Self::spawn_in("worker", &model_dir(), &dir, Some(data), &[], env);
        server.wait_ready(Duration::from_secs(60));
        server
    }

    /// Starts the server on the real model with an existing data directory, and waits until `/ready`.
    pub fn start_in(data_dir: &Path, extra_args: &[&str]) -> Server {
        Self::start_in_env(data_dir, extra_args, &[])
    }

    /// [`Self::start_in`] with environment overrides.
    pub fn start_in_env(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        let server = Self::spawn_in("serve", &model_dir(), data_dir, None, extra_args, env);
        server.wait_ready(Duration::from_secs(60));
        server
    }

    fn spawn_in(
        command: &str,
        model: &Path,
        data_dir: &Path,
        owned: Option<tempfile::TempDir>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flywheel"));
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([command, "--port", "0", "--host", "127.0.0.1"])
            .arg("--model")
            .arg(model)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn flywheel");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[flywheel] {line}");
                if tx.send(line).is_err() {
                    // Keep draining so the child never blocks on a full pipe.
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let base = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(i) = line.find("listening on http://") {
                        break line[i + "listening on ".len()..].trim().to_owned();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("flywheel did not log its address within 30 s");
                }
            }
        };
        Server {
            child,
            base,
            data_dir: data_dir.to_owned(),
            _data: owned,
            log: std::sync::Mutex::new(rx),
        }
    }

    /// Polls `/ready` until 200.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = ureq::get(&self.url("/ready")).call() {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "flywheel not ready within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs JSON and returns (status, body as JSON), whatever the status.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        response(ureq::post(&self.url(path)).send_json(body.clone()))
    }

    /// Sends `method` with a JSON body and returns (status, body as JSON).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        response(ureq::request(method, &self.url(path)).send_json(body.clone()))
    }

    /// GETs and returns (status, body as JSON).
    pub fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        response(ureq::get(&self.url(path)).call())
    }

    /// GETs and returns (status, body text).
    pub fn get_text(&self, path: &str) -> (u16, String) {
        match ureq::get(&self.url(path)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM: a graceful stop.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("a pid fits an i32");
        // SAFETY: signals only our own child process.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "signal {signal} not delivered");
    }

    /// The log lines the server has written since the last call (the first call: since its address).
    pub fn log_lines(&self) -> Vec<String> {
        self.log
            .lock()
            .map(|rx| rx.try_iter().collect())
            .unwrap_or_default()
    }

    /// Waits for the process to exit and returns its status and remaining log lines.
    pub fn wait_exit(
        mut self,
        timeout: Duration,
    ) -> (Option<std::process::ExitStatus>, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let lines = self
            .log
            .lock()
            .map(|rx| rx.try_iter().collect())
            .unwrap_or_default();
        (status, lines)
    }
}

/// Turns a ureq result into (status, JSON body).
pub fn response(result: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
    match result {
        Ok(r) => {
            let status = r.status();
            (status, r.into_json().unwrap_or(serde_json::Value::Null))
        }
        Err(ureq::Error::Status(code, r)) => {
            (code, r.into_json().unwrap_or(serde_json::Value::Null))
        }
        Err(e) => panic!("request failed: {e}"),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The PyTorch reference embeddings committed by tests/fixtures/make_embed_reference.py.
pub fn reference() -> Vec<(String, Vec<f32>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embed_reference.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
    doc["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            let text = item["text"].as_str().expect("text").to_owned();
            let v = item["embedding"]
                .as_array()
                .expect("embedding")
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (text, v)
        })
        .collect()
}

/// Cosine similarity and max absolute difference of two vectors.
pub fn compare(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "vector lengths differ");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    (dot / (na * nb), max)
}

/// The committed Python-PEFT adapter fixture.
pub fn peft_fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_seq_cls")
}

/// Copies the PEFT fixture into the server's adapter root as `name`.
pub fn copy_peft_fixture(server: &Server, name: &str) {
    let dir = server.data_dir.join("adapters").join(name);
    std::fs::create_dir_all(&dir).expect("adapter dir");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(peft_fixture_dir().join(f), dir.join(f)).expect("copy fixture");
    }
}

/// Every mail of a SpamAssassin group in file order (prepared by datasets/fetch-spamassassin.sh).
pub fn mails(group: &str) -> Vec<String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("datasets/spamassassin/{group}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing: run datasets/fetch-spamassassin.sh",
            path.display()
        )
    });
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("a JSON line")["text"]
                .as_str()
                .expect("a text field")
                .to_owned()
        })
        .collect()
}

/// `n` mails of `group`, every `step`th from `skip`, each cut to its first `words` words.
pub fn sample_mails(group: &str, skip: usize, step: usize, n: usize, words: usize) -> Vec<String> {
    mails(group)
        .iter()
        .skip(skip)
        .step_by(step)
        .take(n)
        .map(|t| {
            t.split_whitespace()
                .take(words)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Runs `promtool check metrics` (Debian's `prometheus` package) on an exposition and fails with its output.
pub fn promtool_check(exposition: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed: install Debian's prometheus package (scripts/test.sh does)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(exposition.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new empty database on the tests' PostgreSQL, as its URL (see `flywheel::postgres::test_database`).
pub fn postgres_scratch() -> Option<String> {
    flywheel::postgres::test_database()
}
