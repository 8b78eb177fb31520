//! The base model's embeddings of watched inputs, computed off the request path.
//!
//! Input drift is measured in the base model's space, not the serving generation's: it is the same for
//! every generation (a promoted generation's reference and its predecessor's describe the same inputs),
//! and fine-tuning folds together inputs the head need not tell apart (a trained spam adapter hid the later
//! SpamAssassin corpus from the cosine and MMD tests; docs/DRIFT.md). That costs a forward pass per input,
//! so it runs on a thread of its own that steps aside for serving between the encoder's products
//! ([`crate::pressure`]): inputs are embedded while the model thread has nothing to do and queued (up to
//! [`QUEUE`], the oldest dropped beyond that) while it is busy, so a saturated server tests its prediction
//! signals on every request and the embedding signal on the recent share it had time for. On the candle
//! path (an accelerator) the products do not step aside; the forward pass runs there, not on the cores.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use super::DriftMonitor;
use crate::metrics::Metrics;
use crate::model::ServingModel;
use crate::pressure::ServingPressure;

/// Inputs waiting to be embedded, at most; a newer input evicts the oldest of the task with the most waiting,
/// so the embedding window follows the traffic rather than a backlog, and a busy task cannot starve a quiet
/// one of the embeddings its window needs.
pub const QUEUE: usize = 1024;

/// Tokens embedded together at most (a batch closes once it reaches them): about one long input.
const BATCH_TOKENS: usize = 128;

/// Bytes of an input kept for embedding: the model reads its first few hundred tokens only, and this bounds
/// the queue's memory (16 MiB).
const KEEP_BYTES: usize = 16 * 1024;

/// The longest the thread waits for serving at one yield point before running one product anyway, so a
/// saturated server still embeds an input every ten seconds or so, at under 1 % of its model time.
const MAX_WAIT: Duration = Duration::from_millis(250);

/// An input a stable generation answered, to embed.
struct Watched {
    task: String,
    generation: String,
    text: String,
}

/// The inputs waiting, how many of them each task has, and whether the handle is gone.
#[derive(Default)]
struct Waiting {
    inputs: VecDeque<Watched>,
    per_task: HashMap<String, usize>,
    closed: bool,
}

impl Waiting {
    /// Queues `watched`; when full, first evicts the oldest input of the task with the most waiting.
    /// Returns whether an input was evicted.
    fn push(&mut self, watched: Watched) -> bool {
        let mut evicted = false;
        if self.inputs.len() >= QUEUE {
            let busiest = self
                .per_task
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(task, _)| task.clone());
            let at = busiest.and_then(|task| self.inputs.iter().position(|w| w.task == task));
            if let Some(w) = at.and_then(|i| self.inputs.remove(i)) {
                self.forget(&w.task);
                evicted = true;
            }
        }
        *self.per_task.entry(watched.task.clone()).or_default() += 1;
        self.inputs.push_back(watched);
        evicted
    }

    fn pop_front(&mut self) -> Option<Watched> {
        let w = self.inputs.pop_front()?;
        self.forget(&w.task);
        Some(w)
    }

    fn forget(&mut self, task: &str) {
        if let Some(n) = self.per_task.get_mut(task) {
            *n -= 1;
            if *n == 0 {
                self.per_task.remove(task);
            }
        }
    }
}

/// The inputs waiting, behind a lock the embedding thread waits on.
#[derive(Default)]
struct Queue {
    state: Mutex<Waiting>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // Plain pushes and pops: the queue stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The oldest input, waiting for one; `None` once closed.
    fn pop(&self) -> Option<Watched> {
        let mut state = self.lock();
        loop {
            if let Some(w) = state.pop_front() {
                return Some(w);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The oldest input if one waits.
    fn try_pop(&self) -> Option<Watched> {
        self.lock().pop_front()
    }
}

/// The handle that queues inputs for the embedding thread; dropping it ends the thread.
pub(super) struct Embedder {
    queue: Arc<Queue>,
    counters: Arc<Counters>,
}

impl Drop for Embedder {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

/// Watched inputs embedded, and dropped (evicted from a full queue, or failed).
struct Counters {
    embedded: prometheus::IntCounter,
    dropped: prometheus::IntCounter,
}

impl Counters {
    fn of(metrics: &Metrics) -> Self {
        Self {
            embedded: metrics.drift_inputs.with_label_values(&["embedded"]),
            dropped: metrics.drift_inputs.with_label_values(&["dropped"]),
        }
    }
}

impl Embedder {
    /// Starts the thread.
    pub(super) fn start(
        model: ServingModel,
        monitor: Weak<DriftMonitor>,
        pressure: Arc<ServingPressure>,
        metrics: &Metrics,
    ) -> std::io::Result<Self> {
        let embedder = Self {
            queue: Arc::new(Queue::default()),
            counters: Arc::new(Counters::of(metrics)),
        };
        let (queue, counters, metrics) = (
            embedder.queue.clone(),
            embedder.counters.clone(),
            metrics.clone(),
        );
        std::thread::Builder::new()
            .name("drift-embedder".to_owned())
            .spawn(move || run(&queue, &model, &monitor, pressure, &counters, &metrics))?;
        Ok(embedder)
    }

    /// Queues `text`; when the queue is full, the oldest waiting input of the busiest task is dropped for it.
    pub(super) fn submit(&self, task: &str, generation: &str, text: &str) {
        let mut end = KEEP_BYTES.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let watched = Watched {
            task: task.to_owned(),
            generation: generation.to_owned(),
            text: text[..end].to_owned(),
        };
        if self.queue.lock().push(watched) {
            self.counters.dropped.inc();
        }
        self.queue.ready.notify_one();
    }
}

fn run(
    queue: &Queue,
    model: &ServingModel,
    monitor: &Weak<DriftMonitor>,
    pressure: Arc<ServingPressure>,
    counters: &Counters,
    metrics: &Metrics,
) {
    crate::pressure::yield_quietly_on_this_thread((pressure, MAX_WAIT));
    while let Some(first) = queue.pop() {
        crate::pressure::yield_point();
        // Short inputs go together, up to about one long input's tokens, so a product takes about as long
        // as a long input's would while a batch of them shares its fixed costs.
        let mut batch = Vec::new();
        let mut tokens = 0;
        let mut next = Some(first);
        while let Some(watched) = next.take() {
            match model.tokenizer.encode(&watched.text) {
                Ok(ids) => {
                    tokens += ids.len();
                    batch.push((watched, ids));
                }
                Err(e) => {
                    counters.dropped.inc();
                    tracing::warn!(task = %watched.task, error = %e, "could not tokenize a watched input");
                }
            }
            if tokens < BATCH_TOKENS {
                next = queue.try_pop();
            }
        }
        if batch.is_empty() {
            continue;
        }
        let sequences: Vec<&[u32]> = batch.iter().map(|(_, ids)| ids.as_slice()).collect();
        // A panic here costs this batch its embeddings, not the thread.
        let embedded = crate::supervise::catch(metrics, "drift-embedder", || {
            model.embed(&sequences, true).map_err(|e| e.to_string())
        })
        .and_then(|r| r);
        let embeddings = match embedded {
            Ok(rows) => rows,
            Err(e) => {
                counters.dropped.inc_by(batch.len() as u64);
                tracing::warn!(error = %e, inputs = batch.len(), "could not embed watched inputs");
                continue;
            }
        };
        let Some(monitor) = monitor.upgrade() else {
            return;
        };
        for ((watched, _), embedding) in batch.into_iter().zip(embeddings) {
            counters.embedded.inc();
            monitor.observe_embedding(&watched.task, &watched.generation, embedding);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_its_oldest_input_and_a_dropped_handle_ends_the_wait() {
        let metrics = Metrics::new();
        let embedder = Embedder {
            queue: Arc::new(Queue::default()),
            counters: Arc::new(Counters::of(&metrics)),
        };
        for i in 0..QUEUE + 2 {
            embedder.submit("spam", "g1", &format!("mail {i}"));
        }
        assert_eq!(embedder.counters.dropped.get(), 2);
        assert_eq!(
            embedder.queue.try_pop().map(|w| w.text).as_deref(),
            Some("mail 2")
        );
        // A long input keeps a prefix that ends on a character boundary.
        while embedder.queue.try_pop().is_some() {}
        embedder.submit("spam", "g1", &"é".repeat(KEEP_BYTES));
        let kept = embedder.queue.try_pop().expect("queued").text;
        assert!(kept.len() <= KEEP_BYTES && kept.len() >= KEEP_BYTES - 1);
        // A quiet task keeps its inputs while a busy one fills the queue: the busy one's oldest go.
        embedder.submit("support", "g7", "a rare ticket");
        for i in 0..QUEUE + 10 {
            embedder.submit("spam", "g1", &format!("mail {i}"));
        }
        assert_eq!(
            embedder.queue.try_pop().map(|w| w.text).as_deref(),
            Some("a rare ticket")
        );
        assert_eq!(
            embedder.queue.try_pop().map(|w| w.text).as_deref(),
            Some("mail 11")
        );
        while embedder.queue.try_pop().is_some() {}
        assert!(embedder.queue.lock().per_task.is_empty());
        let queue = embedder.queue.clone();
        embedder.submit("spam", "g1", "last");
        drop(embedder);
        assert_eq!(queue.pop().map(|w| w.text).as_deref(), Some("last"));
        assert!(queue.pop().is_none(), "closed and empty: the thread ends");
    }
}
