//! The model thread: collects queued entries into batches and runs them.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backlog::Backlog;
use super::cost::{CostFit, Work};
use super::{Entry, EntryResult, InferError, Job, Stage};
use crate::config::BatchingConfig;
use crate::metrics::Metrics;
use crate::model::{pooling, ServingModel};
use crate::supervise::{self, AliveGuard};

/// Starts the thread that owns `model`; it ends when every [`super::Infer`] handle is dropped. Returns once
/// the thread has calibrated the batch cost model, so the first requests are judged on a warm estimate.
pub(super) fn spawn(
    model: ServingModel,
    config: BatchingConfig,
    rx: Receiver<Entry>,
    metrics: Metrics,
    backlog: Arc<Backlog>,
    alive: AliveGuard,
) -> std::io::Result<()> {
    let (calibrated, done) = std::sync::mpsc::sync_channel(1);
    // A batch holding this input panics (fault injection for the supervision test; none in production).
    let poison = crate::faults::get()
        .panic_on_text
        .as_ref()
        .and_then(|text| model.tokenizer.encode(text).ok());
    std::thread::Builder::new()
        .name("flywheel-model".to_owned())
        .spawn(move || {
            let _alive = alive;
            let mut fit = CostFit::new();
            match super::calibrate::calibrate(&model, &config, &mut fit) {
                Ok(batches) => {
                    backlog.set_cost(fit.model());
                    for (work, took) in batches {
                        backlog.served(work, took);
                    }
                }
                // Admission then admits all until the first batch has been measured.
                Err(e) => tracing::error!(error = %e, "batch cost calibration failed"),
            }
            let _ = calibrated.send(());
            batch_task(model, config, rx, metrics, backlog, fit, poison)
        })?;
    // A thread that died while calibrating shows as a closed channel; the requests then find it gone.
    let _ = done.recv();
    Ok(())
}

fn batch_task(
    model: ServingModel,
    config: BatchingConfig,
    rx: Receiver<Entry>,
    metrics: Metrics,
    backlog: Arc<Backlog>,
    mut fit: CostFit,
    poison: Option<Vec<u32>>,
) {
    let mut waiting: VecDeque<Entry> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match rx.recv() {
                Ok(entry) => waiting.push_back(entry),
                Err(_) => return,
            }
        }
        while let Ok(entry) = rx.try_recv() {
            waiting.push_back(entry);
        }
        if config.max_wait_us > 0 {
            let deadline = Instant::now() + Duration::from_micros(config.max_wait_us);
            while !batch_full(&waiting, &config) {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(entry) => waiting.push_back(entry),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        let batch = take_batch(&mut waiting, &config, &metrics);
        backlog.taken(waiting.front().map(|e| e.enqueued));
        if !batch.is_empty() {
            if let Some((work, took)) =
                run_batch(&model, batch, &metrics, &backlog, poison.as_deref())
            {
                fit.record(work, took.as_nanos() as f64);
                backlog.set_cost(fit.model());
                backlog.served(work, took);
            }
        }
    }
}

fn batch_full(waiting: &VecDeque<Entry>, config: &BatchingConfig) -> bool {
    let sequences: usize = waiting.iter().map(|e| e.sequences.len()).sum();
    let tokens: usize = waiting.iter().map(Entry::tokens).sum();
    sequences >= config.max_batch_size || tokens >= config.max_batch_tokens
}

/// Takes entries from the front while they fit; a lone oversized entry still runs on its own. Entries
/// whose caller has gone are dropped here, wherever they wait, before they cost compute: each still held
/// queue capacity, a place in the backlog (the wait new requests are priced at) and the trainer's yield.
fn take_batch(
    waiting: &mut VecDeque<Entry>,
    config: &BatchingConfig,
    metrics: &Metrics,
) -> Vec<Entry> {
    waiting.retain(|entry| {
        if !entry.reply.is_closed() {
            return true;
        }
        metrics.queue_depth.sub(entry.sequences.len() as i64);
        metrics.rejected.with_label_values(&["caller_gone"]).inc();
        metrics
            .queue_duration
            .observe(entry.enqueued.elapsed().as_secs_f64());
        false
    });
    let mut batch = Vec::new();
    let (mut sequences, mut tokens) = (0, 0);
    while let Some(entry) = waiting.front() {
        let fits = sequences + entry.sequences.len() <= config.max_batch_size
            && tokens + entry.tokens() <= config.max_batch_tokens;
        if !fits && !batch.is_empty() {
            break;
        }
        let mut entry = waiting.pop_front().expect("front exists; this is a bug");
        entry.stage = Stage::enter(&metrics.requests_running);
        sequences += entry.sequences.len();
        tokens += entry.tokens();
        batch.push(entry);
    }
    batch
}

/// Runs one batch and answers its entries; returns the batch's work and how long its forward pass took,
/// unless the pass failed (a failure's time says nothing of the cost).
fn run_batch(
    model: &ServingModel,
    mut batch: Vec<Entry>,
    metrics: &Metrics,
    backlog: &Backlog,
    poison: Option<&[u32]>,
) -> Option<(Work, Duration)> {
    let started = Instant::now();
    // Entries sharing an adapter sit together, so each adapter's delta runs once over one row range.
    batch.sort_by_key(|e| {
        e.adapter
            .as_ref()
            .map_or(0, |a| std::sync::Arc::as_ptr(a) as usize)
    });
    let mut sequences: Vec<&[u32]> = Vec::new();
    let mut adapters = Vec::new();
    for entry in &batch {
        for s in &entry.sequences {
            sequences.push(s.as_slice());
            adapters.push(entry.adapter.as_deref());
        }
    }
    let work = Work::of_lengths(sequences.iter().map(|s| s.len()));
    metrics.queue_depth.sub(sequences.len() as i64);
    metrics.batch_size.observe(sequences.len() as f64);
    metrics.batch_tokens.observe(work.tokens as f64);
    backlog.set_running(Some(work));
    let classify = batch.iter().any(|e| e.job == Job::Classify);
    // A panic in the forward pass fails this batch's requests, not the thread.
    let result = supervise::catch(metrics, "model", || {
        if poison.is_some_and(|p| sequences.contains(&p)) {
            panic!("injected fault: a batch holding FLYWHEEL_FAULTS' panic_on_text");
        }
        model
            .encoder
            .encode(&sequences, &adapters)
            .and_then(|packed| {
                let logits = if classify {
                    model.encoder.classify(&packed, &adapters)?
                } else {
                    Vec::new()
                };
                Ok((packed, logits))
            })
            .map_err(|e| e.to_string())
    })
    .and_then(|r| r);
    let inference = started.elapsed();
    backlog.set_running(None);
    metrics.inference_duration.observe(inference.as_secs_f64());
    let ok = result.is_ok();
    for entry in &batch {
        let queue = started.saturating_duration_since(entry.enqueued);
        metrics.queue_duration.observe(queue.as_secs_f64());
    }
    match result {
        Ok((packed, logits)) => {
            let mut row = 0;
            for entry in batch {
                let queue = started.saturating_duration_since(entry.enqueued);
                let rows = row..row + entry.sequences.len();
                row = rows.end;
                let vectors: Result<Vec<Vec<f32>>, InferError> = rows
                    .map(|i| match entry.job {
                        Job::Embed { normalize } => {
                            let mut v = pooling::mean_of_rows(packed.sequence(i), packed.width);
                            if normalize {
                                pooling::l2_normalize(&mut v);
                            }
                            Ok(v)
                        }
                        Job::Classify => logits.get(i).and_then(|l| l.clone()).ok_or_else(|| {
                            InferError::Model(
                                "no logits for a classification row; this is a bug".into(),
                            )
                        }),
                    })
                    .collect();
                entry.answer(vectors.map(|vectors| EntryResult {
                    vectors,
                    queue,
                    inference,
                }));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, sequences = sequences.len(), "forward pass failed");
            let err = InferError::Model(e);
            for entry in batch {
                entry.answer(Err(err.clone()));
            }
        }
    }
    ok.then_some((work, inference))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::{oneshot, Semaphore};

    use super::*;

    fn entry(
        tokens: usize,
        permits: &Arc<Semaphore>,
    ) -> (Entry, oneshot::Receiver<Result<EntryResult, InferError>>) {
        let (reply, rx) = oneshot::channel();
        let entry = Entry {
            sequences: vec![vec![1; tokens]],
            job: Job::Embed { normalize: true },
            adapter: None,
            enqueued: Instant::now(),
            reply,
            _permits: permits.clone().try_acquire_owned().expect("a permit"),
            _pending: crate::pressure::ServingPressure::new().begin(),
            _admitted: Arc::new(Backlog::new(None, 128, 16_384))
                .admit(Work::of_lengths([tokens]))
                .expect("no budget admits all"),
            stage: Stage::enter(&prometheus::IntGauge::new("waiting", "test").unwrap()),
        };
        (entry, rx)
    }

    #[test]
    fn entries_whose_caller_has_gone_are_dropped_before_compute_and_free_their_permits() {
        let permits = Arc::new(Semaphore::new(3));
        let metrics = Metrics::new();
        let (kept, _rx) = entry(4, &permits);
        let (gone, rx) = entry(4, &permits);
        drop(rx);
        let mut waiting: VecDeque<Entry> = VecDeque::from([gone, kept]);
        let batch = take_batch(&mut waiting, &BatchingConfig::default(), &metrics);
        assert_eq!(batch.len(), 1);
        assert!(waiting.is_empty());
        assert_eq!(
            permits.available_permits(),
            2,
            "the dropped entry's permit is back"
        );
        assert_eq!(
            metrics.rejected.with_label_values(&["caller_gone"]).get(),
            1
        );
        // One that is not at the front, behind entries that do not fit this batch, goes too.
        let config = BatchingConfig {
            max_batch_tokens: 10,
            ..BatchingConfig::default()
        };
        let permits = Arc::new(Semaphore::new(3));
        let (first, _first) = entry(8, &permits);
        let (second, _second) = entry(8, &permits);
        let (gone, rx) = entry(8, &permits);
        drop(rx);
        let mut waiting: VecDeque<Entry> = VecDeque::from([first, second, gone]);
        assert_eq!(take_batch(&mut waiting, &config, &metrics).len(), 1);
        assert_eq!(
            waiting.len(),
            1,
            "the second waits; the abandoned third is gone"
        );
        assert_eq!(permits.available_permits(), 2, "only the second's is held");
        assert_eq!(
            metrics.rejected.with_label_values(&["caller_gone"]).get(),
            2
        );
    }

    #[test]
    fn a_batch_stops_at_the_token_budget_but_a_lone_oversized_entry_still_runs() {
        let permits = Arc::new(Semaphore::new(8));
        let metrics = Metrics::new();
        let config = BatchingConfig {
            max_batch_tokens: 10,
            ..BatchingConfig::default()
        };
        let entries: Vec<_> = [6, 4, 3, 30].iter().map(|&t| entry(t, &permits)).collect();
        let (entries, _receivers): (Vec<_>, Vec<_>) = entries.into_iter().unzip();
        let mut waiting: VecDeque<Entry> = entries.into();
        let sizes = |b: Vec<Entry>| b.iter().map(Entry::tokens).collect::<Vec<_>>();
        assert_eq!(
            sizes(take_batch(&mut waiting, &config, &metrics)),
            vec![6, 4]
        );
        assert_eq!(sizes(take_batch(&mut waiting, &config, &metrics)), vec![3]);
        assert_eq!(sizes(take_batch(&mut waiting, &config, &metrics)), vec![30]);
    }
}
