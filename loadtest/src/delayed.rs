//! Feedback posted a fixed delay after the prediction it corrects, from one background thread.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the posted feedback fared.
#[derive(Debug, Default, Clone, Copy)]
pub struct FeedbackCounts {
    /// Answered 202.
    pub accepted: usize,
    /// Answered anything else, or not at all.
    pub failed: usize,
}

/// Posts JSON bodies to `/v1/feedback`, each `delay` after it was handed over, in order.
pub struct DelayedFeedback {
    tx: mpsc::Sender<(Instant, serde_json::Value)>,
    worker: JoinHandle<FeedbackCounts>,
    delay: Duration,
}

impl DelayedFeedback {
    /// Starts the posting thread for the server at `base_url`.
    pub fn start(agent: ureq::Agent, base_url: &str, delay: Duration) -> Self {
        let url = format!("{}/v1/feedback", base_url.trim_end_matches('/'));
        let (tx, rx) = mpsc::channel::<(Instant, serde_json::Value)>();
        let worker = std::thread::spawn(move || {
            let mut counts = FeedbackCounts::default();
            // The delay is the same for every item, so arrival order is due order.
            for (due, body) in rx {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                match agent.post(&url).send_json(body) {
                    Ok(r) if r.status() == 202 => counts.accepted += 1,
                    _ => counts.failed += 1,
                }
            }
            counts
        });
        Self { tx, worker, delay }
    }

    /// Queues `body` (e.g. `{"request_id": …, "label": …}`) to be posted after the delay.
    pub fn post_later(&self, body: serde_json::Value) {
        // The worker only stops when every sender is gone, so the send cannot fail while `self` lives.
        let _ = self.tx.send((Instant::now() + self.delay, body));
    }

    /// Posts what is still queued (at its due time) and returns the counts.
    pub fn finish(self) -> FeedbackCounts {
        drop(self.tx);
        self.worker.join().unwrap_or_default()
    }
}
