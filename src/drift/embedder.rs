//! The base model's embeddings of watched inputs, computed off the request path.
//!
//! Input drift is measured in the base model's space, not the serving generation's: fine-tuning for the
//! task folds inputs the head no longer tells apart together (a trained spam adapter maps the later
//! SpamAssassin corpus onto its training data; the base model keeps them apart, docs/DRIFT.md), and the
//! base space is the same for every generation. That costs a forward pass per input, so it runs on a
//! thread of its own that steps aside for serving at every layer ([`crate::pressure`]): inputs are
//! embedded while the model thread has nothing to do, queued (up to [`QUEUE`]) while it is busy, and
//! dropped beyond that, so a saturated server tests its prediction signals on every request and the
//! embedding signal on the share it had time for.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::DriftMonitor;
use crate::model::Model;
use crate::pressure::ServingPressure;

/// Inputs waiting to be embedded, at most.
pub const QUEUE: usize = 1024;

/// Bytes of an input kept for embedding: the model reads its first few hundred tokens only, and this bounds
/// the queue's memory (16 MiB).
const KEEP_BYTES: usize = 16 * 1024;

/// The longest the thread waits for serving at one yield point before running one layer anyway, so a
/// saturated server still embeds a few inputs (one layer of one input per second at most).
const MAX_WAIT: Duration = Duration::from_secs(1);

/// An input a stable generation answered, to embed.
struct Watched {
    task: String,
    generation: String,
    text: String,
}

/// The handle that queues inputs for the embedding thread.
pub(super) struct Embedder {
    tx: SyncSender<Watched>,
}

impl Embedder {
    /// Starts the thread; it ends when the monitor is dropped.
    pub(super) fn start(
        model: Arc<Model>,
        monitor: Weak<DriftMonitor>,
        pressure: Arc<ServingPressure>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("drift-embedder".to_owned())
            .spawn(move || run(&rx, &model, &monitor, pressure))?;
        Ok(Self { tx })
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
            Ok(()) | Err(TrySendError::Full(_)) => {}
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
) {
    crate::pressure::yield_quietly_on_this_thread((pressure, MAX_WAIT));
    while let Ok(watched) = rx.recv() {
        crate::pressure::yield_point();
        let embedded = model
            .tokenizer
            .encode(&watched.text)
            .map_err(|e| e.to_string())
            .and_then(|ids| model.embed(&[&ids], true).map_err(|e| e.to_string()));
        let embedding = match embedded {
            Ok(mut rows) => rows.pop(),
            Err(e) => {
                tracing::warn!(task = %watched.task, error = %e, "could not embed a watched input");
                None
            }
        };
        let Some(monitor) = monitor.upgrade() else {
            return;
        };
        if let Some(embedding) = embedding {
            monitor.observe_embedding(&watched.task, &watched.generation, embedding);
        }
    }
}
