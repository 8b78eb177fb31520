//! The base model's embeddings of watched inputs, computed off the request path.
//!
//! Input drift is measured in the base model's space, not the serving generation's: fine-tuning for the
//! task folds inputs the head no longer tells apart together (a trained spam adapter maps the later
//! SpamAssassin corpus onto its training data; the base model keeps them apart, docs/DRIFT.md), and the
//! base space is the same for every generation. That costs a forward pass per input, so it runs on a
//! thread of its own that steps aside for serving between the encoder's products ([`crate::pressure`]):
//! inputs are embedded while the model thread has nothing to do, queued (up to [`QUEUE`]) while it is
//! busy, and dropped beyond that, so a saturated server tests its prediction signals on every request and
//! the embedding signal on the share it had time for.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::DriftMonitor;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::pressure::ServingPressure;

/// Inputs waiting to be embedded, at most.
pub const QUEUE: usize = 1024;

/// Tokens embedded together at most (a batch closes once it reaches them): about one long input.
const BATCH_TOKENS: usize = 128;

/// Bytes of an input kept for embedding: the model reads its first few hundred tokens only, and this bounds
/// the queue's memory (16 MiB).
const KEEP_BYTES: usize = 16 * 1024;

/// The longest the thread waits for serving at one yield point before running one product anyway, so a
/// saturated server still embeds an input every ten seconds or so, at under 1 % of its model time.
pub(super) const MAX_WAIT: Duration = Duration::from_millis(250);

/// An input a stable generation answered, to embed.
struct Watched {
    task: String,
    generation: String,
    text: String,
}

/// The handle that queues inputs for the embedding thread.
pub(super) struct Embedder {
    tx: SyncSender<Watched>,
    dropped: prometheus::IntCounter,
}

impl Embedder {
    /// Starts the thread; it ends when the monitor is dropped.
    pub(super) fn start(
        model: Arc<Model>,
        monitor: Weak<DriftMonitor>,
        pressure: Arc<ServingPressure>,
        metrics: &Metrics,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        let (dropped, embedded) = (
            metrics.drift_inputs.with_label_values(&["dropped"]),
            metrics.drift_inputs.with_label_values(&["embedded"]),
        );
        std::thread::Builder::new()
            .name("drift-embedder".to_owned())
            .spawn(move || run(&rx, &model, &monitor, pressure, &embedded))?;
        Ok(Self { tx, dropped })
    }

    /// Queues `text`, unless the queue is full (then this input goes unembedded).
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
        match self.tx.try_send(watched) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped.inc(),
            Err(TrySendError::Disconnected(_)) => {
                tracing::warn!("the drift embedder has stopped; embedding drift is not measured")
            }
        }
    }
}

fn run(
    rx: &Receiver<Watched>,
    model: &Model,
    monitor: &Weak<DriftMonitor>,
    pressure: Arc<ServingPressure>,
    counted: &prometheus::IntCounter,
) {
    crate::pressure::yield_quietly_on_this_thread((pressure, MAX_WAIT));
    while let Ok(first) = rx.recv() {
        crate::pressure::yield_point();
        // Short inputs go together, up to about one long input's tokens, so a product takes no longer
        // than a long input's would while a batch of them shares its fixed costs.
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
                    tracing::warn!(task = %watched.task, error = %e, "could not tokenize a watched input")
                }
            }
            if tokens < BATCH_TOKENS {
                next = rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        let sequences: Vec<&[u32]> = batch.iter().map(|(_, ids)| ids.as_slice()).collect();
        let embeddings = match model.embed(&sequences, true) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, inputs = batch.len(), "could not embed watched inputs");
                continue;
            }
        };
        let Some(monitor) = monitor.upgrade() else {
            return;
        };
        for ((watched, _), embedding) in batch.into_iter().zip(embeddings) {
            counted.inc();
            monitor.observe_embedding(&watched.task, &watched.generation, embedding);
        }
    }
}
