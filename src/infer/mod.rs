//! The inference path: an [`Infer`] handle that async callers share, and the model thread that owns the
//! network and runs dynamically batched forward passes.
//!
//! Callers tokenize, take queue permits and a place in the [`backlog::Backlog`] (no permits left, or an
//! expected wait over `[batching] max_expected_wait_ms` → [`InferError::Overloaded`]), and send an entry to the
//! model thread; the thread packs whatever is queued into one forward pass, skips entries whose caller
//! has gone, and answers each entry on its own channel. This layer knows nothing of HTTP.

mod backlog;
mod batcher;
mod calibrate;
pub mod cost;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use backlog::{Admitted, Backlog};
use cost::{CostModel, Work};

use crate::config::BatchingConfig;
use crate::metrics::Metrics;
use crate::model::adapter::Adapter;
use crate::model::pooling;
use crate::model::{Prompts, ServingModel, TextTokenizer};
use crate::pressure::{Pending, ServingPressure};
use crate::supervise::Alive;

/// Requests with at most this many bytes of text are tokenized on the async worker that received them
/// (see [`Infer::tokenize`]).
const INLINE_TOKENIZE_BYTES: usize = 2_048;

/// Why an inference request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    /// The queue is full, or the request would wait longer than the budget; retry shortly.
    #[error("{0}")]
    Overloaded(String),
    /// Tokenization or the input itself was refused.
    #[error("{0}")]
    Invalid(String),
    /// The model thread failed on this batch (the error is shared by every request of the batch).
    #[error("model failure: {0}")]
    Model(String),
    /// The model thread has stopped.
    #[error("the model is shutting down")]
    ShuttingDown,
    /// The answer did not come within `batching.request_timeout_ms`.
    #[error("no answer from the model within {0:?} (batching.request_timeout_ms); retry shortly")]
    TimedOut(Duration),
}

impl InferError {
    /// Whether the request or the load caused it (a full queue, a refused input) rather than the model:
    /// such failures say nothing about the generation that was asked to serve. A timeout is not among
    /// them: a slow arm's slowest requests are the ones that time out, and leaving them out would measure
    /// its latency on the requests fast enough to finish.
    pub fn is_not_the_models(&self) -> bool {
        matches!(self, InferError::Overloaded(_) | InferError::Invalid(_))
    }
}

/// Per-stage timings of one request, reported in response headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Tokenization.
    pub tokenize: Duration,
    /// Waiting in the queue.
    pub queue: Duration,
    /// The forward pass that served the request (shared with its batch mates).
    pub inference: Duration,
}

/// What the model returns for one request: embeddings or class probabilities.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// One vector per input, in order: an embedding, or a probability per label.
    pub vectors: Vec<Vec<f32>>,
    /// For classification, each input's logits (the head's raw scores) behind `vectors`. Empty otherwise.
    pub logits: Vec<Vec<f32>>,
    /// Tokens per input after truncation, special tokens included.
    pub tokens: Vec<usize>,
    /// Where the time went.
    pub timings: Timings,
}

/// What the model thread returns for one entry.
struct EntryResult {
    vectors: Vec<Vec<f32>>,
    queue: Duration,
    inference: Duration,
}

/// What an entry asks of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Job {
    /// Mean-pooled sentence embeddings.
    Embed { normalize: bool },
    /// The adapter head's logits (softmaxed by the caller).
    Classify,
}

/// One request's work waiting for the model thread.
struct Entry {
    sequences: Vec<Vec<u32>>,
    job: Job,
    /// The adapter applied to every sequence of the entry (a lease: it lives until the entry is answered).
    adapter: Option<Arc<Adapter>>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<EntryResult, InferError>>,
    /// Released when the entry is answered or dropped, freeing queue capacity.
    _permits: OwnedSemaphorePermit,
    /// Tells the trainer to step aside until the entry is answered or dropped.
    _pending: Pending,
    /// The entry's tokens in the backlog, until it is answered or dropped.
    _admitted: Admitted,
    /// Counts the entry as waiting, then (once in a batch) as running.
    stage: Stage,
}

/// Counts an entry in one gauge while it is in one stage; leaving the stage (or being dropped) takes it
/// off again.
struct Stage(prometheus::IntGauge);

impl Stage {
    fn enter(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Entry {
    fn tokens(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }

    /// Sends the answer once the entry has left the backlog, the queue and the serving pressure: a caller
    /// that sends its next request the moment this one is answered must not find its finished work still
    /// counted ahead of it (which priced a sequential client's next request as waiting behind its last).
    /// A caller that has gone simply never reads it.
    fn answer(self, result: Result<EntryResult, InferError>) {
        let Entry {
            reply,
            _permits,
            _pending,
            _admitted,
            stage,
            ..
        } = self;
        drop((_admitted, _permits, _pending, stage));
        let _ = reply.send(result);
    }
}

/// The most one part of a larger request may cost on the model, as a share of
/// `[batching] max_expected_wait_ms`: a request arriving behind a part (or behind two large requests' parts
/// batched together) is still answered within the budget.
const PART_SHARE_OF_BUDGET: f64 = 0.5;

/// Cuts sequences of these lengths, in order, into parts that each fit one batch: at most `max_size`
/// sequences and `max_tokens` tokens, and, given a cost model and a cost in nanoseconds, tokens costing at
/// most that (the fixed cost of a forward pass left out: were it near the cap, every text would make a
/// pass of its own). A single sequence over a limit is a part of its own. Returns each part's number of
/// sequences; always at least one part.
fn parts(
    lengths: &[usize],
    max_size: usize,
    max_tokens: usize,
    max_cost: Option<(CostModel, f64)>,
) -> Vec<usize> {
    let mut parts = vec![0];
    let mut work = Work::default();
    for &n in lengths {
        let current = parts.last_mut().expect("parts start with one");
        let one = Work::of_lengths([n]);
        let with = work.plus(one);
        let over = with.sequences > max_size as u64
            || with.tokens > max_tokens as u64
            || max_cost.is_some_and(|(cost, max)| cost.nanos(with, 0) > max);
        if *current > 0 && over {
            parts.push(1);
            work = one;
        } else {
            *current += 1;
            work = with;
        }
    }
    parts
}

/// The handle callers use to run the model; cheap to clone.
#[derive(Clone)]
pub struct Infer {
    tx: mpsc::Sender<Entry>,
    permits: Arc<Semaphore>,
    capacity: usize,
    max_batch_size: usize,
    max_batch_tokens: usize,
    timeout: Option<Duration>,
    backlog: Arc<Backlog>,
    tokenizer: Arc<TextTokenizer>,
    prompts: Arc<Prompts>,
    model_name: String,
    dtype: &'static str,
    dimensions: usize,
    vocab_size: usize,
    adapters_supported: bool,
    metrics: Metrics,
    pressure: Arc<ServingPressure>,
    alive: Alive,
}

impl Infer {
    /// Moves `model` onto its own OS thread and returns the handle that feeds it; every queued request counts
    /// in `pressure` until it is answered.
    pub fn start(
        model: ServingModel,
        config: &BatchingConfig,
        metrics: Metrics,
        pressure: Arc<ServingPressure>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let backlog = Arc::new(Backlog::new(
            (config.max_expected_wait_ms > 0)
                .then(|| Duration::from_millis(config.max_expected_wait_ms)),
            config.max_batch_size,
            config.max_batch_tokens,
        ));
        let (alive, guard) = Alive::new();
        let handle = Self {
            alive,
            tx,
            permits: Arc::new(Semaphore::new(config.queue_capacity)),
            capacity: config.queue_capacity,
            max_batch_size: config.max_batch_size,
            max_batch_tokens: config.max_batch_tokens,
            timeout: (config.request_timeout_ms > 0)
                .then(|| Duration::from_millis(config.request_timeout_ms)),
            backlog: backlog.clone(),
            tokenizer: model.tokenizer.clone(),
            prompts: model.prompts.clone(),
            model_name: model.name.clone(),
            dtype: model.encoder.dtype(),
            adapters_supported: model.encoder.serves_adapters(),
            dimensions: model.hidden_size,
            vocab_size: model.vocab_size,
            metrics: metrics.clone(),
            pressure,
        };
        batcher::spawn(model, config.clone(), rx, metrics, backlog, guard)?;
        Ok(handle)
    }

    /// Whether the model thread still runs (a panic in a batch is caught; this turns false only if the
    /// thread itself has ended).
    pub fn is_alive(&self) -> bool {
        self.alive.get()
    }

    /// Name of the served model.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The serving path's number format, `float32` or `int8` (see [`crate::model::Encoder::dtype`]).
    pub fn dtype(&self) -> &'static str {
        self.dtype
    }

    /// The tokenizer requests use: the model's own, shared, never copied.
    pub fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }

    /// The model's named prompts (e5's `query`, `passage`).
    pub fn prompts(&self) -> &Prompts {
        &self.prompts
    }

    /// Width of the embeddings.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Sentence embeddings of `texts` (mean pooling; L2-normalised when `normalize`).
    pub async fn embed(&self, texts: &[String], normalize: bool) -> Result<Outputs, InferError> {
        let started = Instant::now();
        // Under overload most requests are refused: refuse them before spending CPU on their tokens.
        self.shed()?;
        let sequences = self.tokenize(texts).await?;
        self.run(sequences, started, Job::Embed { normalize }, None, false)
            .await
    }

    /// Sentence embeddings of sequences given as token ids of the model's vocabulary, taken as they are
    /// (special tokens included when the caller put them in) and cut at the model's maximum length.
    pub async fn embed_tokens(
        &self,
        mut sequences: Vec<Vec<u32>>,
        normalize: bool,
    ) -> Result<Outputs, InferError> {
        let started = Instant::now();
        self.shed()?;
        // The text path's truncation keeps the closing special token ([SEP], </s>); ids that end with it
        // keep it too, so the same text embeds alike either way.
        let end = self.tokenizer.end_token();
        let max_length = self.tokenizer.max_length();
        for (i, ids) in sequences.iter_mut().enumerate() {
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                return Err(InferError::Invalid(format!(
                    "inputs[{i}] holds token id {id}; the model's vocabulary has {} ids",
                    self.vocab_size
                )));
            }
            if ids.len() > max_length && end.is_some() && ids.last().copied() == end {
                *ids = crate::model::tokenize::truncate(std::mem::take(ids), max_length);
            } else {
                ids.truncate(max_length);
            }
        }
        self.run(sequences, started, Job::Embed { normalize }, None, false)
            .await
    }

    /// Refuses now, as an overloaded server refuses any new request, where the work already admitted
    /// alone would have it refused: for callers about to spend CPU on a request's texts (tokenizing them)
    /// outside the queue.
    pub fn shed(&self) -> Result<(), InferError> {
        match self.backlog.refuses_all() {
            Some(wait) => Err(self.over_budget(wait)),
            None => Ok(()),
        }
    }

    /// Class probabilities of `texts` under `adapter`'s head (output `i` is the task's label `i`).
    pub async fn classify(
        &self,
        texts: &[String],
        adapter: Arc<Adapter>,
    ) -> Result<Outputs, InferError> {
        self.classify_as(texts, adapter, false).await
    }

    /// [`Infer::classify`] for work no caller waits for (a shadow candidate's run): it yields to callers,
    /// refused past the budget at any load, and its refusals are not counted as callers' (no 429 went out).
    pub async fn classify_background(
        &self,
        texts: &[String],
        adapter: Arc<Adapter>,
    ) -> Result<Outputs, InferError> {
        self.classify_as(texts, adapter, true).await
    }

    async fn classify_as(
        &self,
        texts: &[String],
        adapter: Arc<Adapter>,
        background: bool,
    ) -> Result<Outputs, InferError> {
        if !self.adapters_supported {
            return Err(InferError::Invalid(
                "adapters run on the CPU path only for now; this server's model runs elsewhere"
                    .to_owned(),
            ));
        }
        if adapter.head.is_none() {
            return Err(InferError::Invalid(
                "the adapter has no classification head".to_owned(),
            ));
        }
        let started = Instant::now();
        if !background {
            self.shed()?;
        }
        let sequences = self.tokenize(texts).await?;
        let mut out = self
            .run(sequences, started, Job::Classify, Some(adapter), background)
            .await?;
        // The model thread answers logits; the probabilities are a few exponentials per input.
        out.logits = std::mem::take(&mut out.vectors);
        out.vectors = out.logits.iter().map(|l| pooling::softmax(l)).collect();
        Ok(out)
    }

    /// Counts and describes a refusal for an expected wait over the budget.
    fn over_budget(&self, wait: Duration) -> InferError {
        self.metrics
            .rejected
            .with_label_values(&["expected_wait"])
            .inc();
        InferError::Overloaded(format!(
            "the server is overloaded: this request would wait about {} ms for the model's answer, over \
             the {} ms budget (batching.max_expected_wait_ms); retry shortly",
            wait.as_millis(),
            self.backlog.budget().unwrap_or_default().as_millis()
        ))
    }

    /// Token ids of `texts`. Short requests are tokenized right here: a few sentences take microseconds,
    /// less than the hop to the blocking pool and back. Longer ones (up to a request body's worth of text)
    /// go to the blocking pool, off the async workers.
    async fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, InferError> {
        let encode_all = |tokenizer: &TextTokenizer, texts: &[String]| {
            texts
                .iter()
                .map(|t| {
                    tokenizer
                        .encode(t)
                        .map_err(|e| InferError::Invalid(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        if texts.iter().map(String::len).sum::<usize>() <= INLINE_TOKENIZE_BYTES {
            return encode_all(&self.tokenizer, texts);
        }
        let (tokenizer, owned) = (self.tokenizer.clone(), texts.to_vec());
        tokio::task::spawn_blocking(move || encode_all(&tokenizer, &owned))
            .await
            .map_err(|_| InferError::Model("tokenization task failed".to_owned()))?
    }

    /// Queues `sequences` (tokenized since `started`) for the model thread and waits for the answer.
    async fn run(
        &self,
        sequences: Vec<Vec<u32>>,
        started: Instant,
        job: Job,
        adapter: Option<Arc<Adapter>>,
        background: bool,
    ) -> Result<Outputs, InferError> {
        if let Some(i) = sequences.iter().position(Vec::is_empty) {
            return Err(InferError::Invalid(format!("inputs[{i}] yields no tokens")));
        }
        let tokenize = started.elapsed();
        self.metrics
            .tokenize_duration
            .observe(tokenize.as_secs_f64());
        let tokens: Vec<usize> = sequences.iter().map(Vec::len).collect();
        let mut permits = u32::try_from(sequences.len().max(1))
            .ok()
            .and_then(|n| self.permits.clone().try_acquire_many_owned(n).ok())
            .ok_or_else(|| {
                if !background {
                    self.metrics
                        .rejected
                        .with_label_values(&["queue_full"])
                        .inc();
                }
                InferError::Overloaded(format!(
                    "the inference queue is full ({} sequences); retry shortly",
                    self.capacity
                ))
            })?;
        // A request larger than one batch, or than half the budget's worth of work, goes in as several
        // parts that each fit, each queued once the one before it is answered: no forward pass grows past
        // the batch limits, and a request that arrives meanwhile waits behind one part of it rather than
        // all, so a bulk request beside short ones costs them half a budget at most.
        let cost = self.backlog.cost();
        let max_cost = self
            .backlog
            .budget()
            .filter(|_| cost.is_known())
            .map(|budget| (cost, budget.as_nanos() as f64 * PART_SHARE_OF_BUDGET));
        let parts = parts(
            &tokens,
            self.max_batch_size,
            self.max_batch_tokens,
            max_cost,
        );
        let first = Work::of_lengths(tokens[..parts[0]].iter().copied());
        let admitted = match background {
            false => self
                .backlog
                .admit(first)
                .map_err(|wait| self.over_budget(wait)),
            true => self.backlog.admit_background(first).map_err(|wait| {
                InferError::Overloaded(format!(
                    "background work shed: it would wait about {} ms",
                    wait.as_millis()
                ))
            }),
        };
        let mut admitted = Some(admitted?);
        let mut part_permits = Vec::with_capacity(parts.len());
        for &n in &parts[..parts.len() - 1] {
            part_permits.push(
                permits
                    .split(n)
                    .expect("the request's permits cover its parts"),
            );
        }
        part_permits.push(permits);
        // Between one part's answer and the next part's queueing nothing of the request is pending: the
        // trainer must not take the cores back in that gap.
        let _pending = (parts.len() > 1).then(|| self.pressure.begin());
        let enqueued = Instant::now();
        let mut rest = sequences.into_iter();
        let mut lengths = tokens.as_slice();
        // Dropping this future (an error, the timeout) leaves the parts not yet queued unqueued, and marks
        // the queued one closed: the model thread skips it unrun.
        let all = async {
            let mut results = Vec::with_capacity(parts.len());
            for (&n, permits) in parts.iter().zip(part_permits) {
                let (part, after) = lengths.split_at(n);
                lengths = after;
                let admitted = admitted
                    .take()
                    .unwrap_or_else(|| self.backlog.enter(Work::of_lengths(part.iter().copied())));
                let (reply, answer) = oneshot::channel();
                let entry = Entry {
                    sequences: rest.by_ref().take(n).collect(),
                    job,
                    adapter: adapter.clone(),
                    enqueued: Instant::now(),
                    reply,
                    _permits: permits,
                    _pending: self.pressure.begin(),
                    _admitted: admitted,
                    stage: Stage::enter(&self.metrics.requests_waiting),
                };
                // Counted before the send, so the model thread never takes it off first (the gauge would
                // dip below zero); taken off again if the thread has gone.
                self.metrics.queue_depth.add(n as i64);
                if self.tx.send(entry).is_err() {
                    self.metrics.queue_depth.sub(n as i64);
                    return Err(InferError::ShuttingDown);
                }
                results.push(answer.await.map_err(|_| InferError::ShuttingDown)??);
            }
            Ok::<_, InferError>(results)
        };
        let results = match self.timeout {
            None => all.await?,
            Some(limit) => match tokio::time::timeout(limit, all).await {
                Ok(results) => results?,
                Err(_) => {
                    self.metrics.rejected.with_label_values(&["timeout"]).inc();
                    return Err(InferError::TimedOut(limit));
                }
            },
        };
        let inference: Duration = results.iter().map(|r| r.inference).sum();
        let queue = match results.as_slice() {
            [one] => one.queue,
            _ => enqueued.elapsed().saturating_sub(inference),
        };
        Ok(Outputs {
            vectors: results.into_iter().flat_map(|r| r.vectors).collect(),
            logits: Vec::new(),
            tokens,
            timings: Timings {
                tokenize,
                queue,
                inference,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{parts, CostModel, InferError};

    #[test]
    fn a_timeout_is_evidence_against_the_arm_but_a_full_queue_or_a_bad_input_is_not() {
        assert!(InferError::Overloaded("full".into()).is_not_the_models());
        assert!(InferError::Invalid("empty".into()).is_not_the_models());
        let timeout = InferError::TimedOut(std::time::Duration::from_secs(30));
        assert!(!timeout.is_not_the_models());
    }

    #[test]
    fn a_request_is_cut_into_parts_that_each_fit_one_batch() {
        assert_eq!(parts(&[], 4, 100, None), [0]);
        assert_eq!(parts(&[10, 10], 4, 100, None), [2]);
        // By tokens: 60 + 50 > 100.
        assert_eq!(parts(&[60, 50, 40, 10], 4, 100, None), [1, 3]);
        // By sequences.
        assert_eq!(parts(&[1; 9], 4, 100, None), [4, 4, 1]);
        // A sequence over the token budget alone still makes a part (the batcher runs it on its own).
        assert_eq!(parts(&[5, 200, 5], 4, 100, None), [1, 1, 1]);
        // By cost: 10 µs a token, at most 1 ms a part: 100 tokens (the 1 ms a pass costs is not counted).
        let cost = CostModel {
            per_batch_ns: 1e6,
            per_token_ns: 1e4,
            per_square_ns: 0.0,
        };
        assert_eq!(
            parts(&[40, 40, 40, 40, 200, 10], 128, 16_384, Some((cost, 1e6))),
            [2, 2, 1, 1]
        );
        // The parts cover every sequence, in order.
        let lengths: Vec<usize> = (0..300).map(|i| 1 + i % 256).collect();
        let cut = parts(&lengths, 32, 16_384, None);
        assert_eq!(cut.iter().sum::<usize>(), 300);
        let mut start = 0;
        for n in cut {
            assert!(n <= 32 && lengths[start..start + n].iter().sum::<usize>() <= 16_384);
            start += n;
        }
    }
}
