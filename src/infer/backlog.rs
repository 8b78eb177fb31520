//! Admission by expected wait: the work queued for (or running on) the model thread, cut into the batches
//! the batcher will form and priced by the fitted [`CostModel`], gives the time a new request would wait
//! for its answer. Refusing a request whose expected wait exceeds the budget keeps admitted requests'
//! latency bounded under overload, where a queue-length cap alone would admit a queue minutes long. A
//! request with nothing ahead of it is always admitted, however large: refusing it would not make anyone
//! faster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::cost::{CostModel, Work};

/// The model thread's outstanding work, what a batch costs, and the wait a request may be asked to accept.
#[derive(Debug, Default)]
pub struct Backlog {
    /// The longest expected wait admitted when something is ahead; `None` admits all.
    budget: Option<Duration>,
    /// The batcher's limits, which decide how many forward passes the queued work takes.
    max_batch_size: usize,
    max_batch_tokens: usize,
    /// Work of every admitted entry not yet answered or dropped.
    sequences: AtomicU64,
    tokens: AtomicU64,
    squares: AtomicU64,
    /// The model thread's latest fit; unknown (admit all) until a batch has been measured.
    cost: RwLock<CostModel>,
}

/// An admitted request's work; it leaves the backlog when this is dropped (answered or abandoned).
#[derive(Debug)]
pub struct Admitted {
    backlog: Arc<Backlog>,
    work: Work,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.backlog.remove(self.work);
    }
}

impl Backlog {
    /// An empty backlog that refuses expected waits over `budget` (`None`: admits all), for a batcher that
    /// packs at most `max_batch_size` sequences and `max_batch_tokens` tokens into one forward pass.
    pub fn new(budget: Option<Duration>, max_batch_size: usize, max_batch_tokens: usize) -> Self {
        Self {
            budget,
            max_batch_size,
            max_batch_tokens,
            ..Self::default()
        }
    }

    /// The configured budget.
    pub fn budget(&self) -> Option<Duration> {
        self.budget
    }

    /// Adds a request of `work` and returns its ticket, or the wait it would have had (the work ahead of
    /// it and its own) when that exceeds the budget and something is ahead (then nothing is added). While
    /// no batch has been measured the cost is unknown and all is admitted.
    pub fn admit(self: &Arc<Self>, work: Work) -> Result<Admitted, Duration> {
        let ahead = Work {
            sequences: self.sequences.fetch_add(work.sequences, Ordering::Relaxed),
            tokens: self.tokens.fetch_add(work.tokens, Ordering::Relaxed),
            squares: self.squares.fetch_add(work.squares, Ordering::Relaxed),
        };
        let ticket = Admitted {
            backlog: self.clone(),
            work,
        };
        let wait = self.wait_for(ahead.plus(work));
        match self.budget {
            Some(budget) if ahead.sequences > 0 && wait > budget => Err(wait),
            _ => Ok(ticket),
        }
    }

    /// The wait of the work already admitted, when it alone exceeds the budget: then any new request would
    /// be refused by [`Backlog::admit`], and the caller can refuse it before paying for its tokenization.
    pub fn refuses_all(&self) -> Option<Duration> {
        let wait = self.wait_for(self.outstanding());
        self.budget.filter(|&b| wait > b).map(|_| wait)
    }

    /// Publishes the model thread's latest fit.
    pub fn set_cost(&self, cost: CostModel) {
        *self.cost.write().unwrap_or_else(|e| e.into_inner()) = cost;
    }

    /// The cost model admission judges by.
    pub fn cost(&self) -> CostModel {
        *self.cost.read().unwrap_or_else(|e| e.into_inner())
    }

    /// How long `work` takes, cut into the batches the batcher forms, at the fitted cost (zero while the
    /// cost is unknown).
    pub fn wait_for(&self, work: Work) -> Duration {
        if work.sequences == 0 {
            return Duration::ZERO;
        }
        let batches = work.batches(self.max_batch_size, self.max_batch_tokens);
        Duration::from_nanos(self.cost().nanos(work, batches) as u64)
    }

    fn outstanding(&self) -> Work {
        Work {
            sequences: self.sequences.load(Ordering::Relaxed),
            tokens: self.tokens.load(Ordering::Relaxed),
            squares: self.squares.load(Ordering::Relaxed),
        }
    }

    fn remove(&self, work: Work) {
        self.sequences.fetch_sub(work.sequences, Ordering::Relaxed);
        self.tokens.fetch_sub(work.tokens, Ordering::Relaxed);
        self.squares.fetch_sub(work.squares, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(n: usize, len: usize) -> Work {
        Work::of_lengths(std::iter::repeat_n(len, n))
    }

    /// 2 ms per forward pass and 10 µs per token, no attention term.
    fn cost() -> CostModel {
        CostModel {
            per_batch_ns: 2e6,
            per_token_ns: 10e3,
            per_square_ns: 0.0,
        }
    }

    #[test]
    fn admits_until_the_expected_wait_exceeds_the_budget_and_forgets_answered_work() {
        let backlog = Arc::new(Backlog::new(Some(Duration::from_millis(100)), 128, 16_384));
        // Cost unknown: admitted whatever the size.
        let first = backlog.admit(requests(1, 10_000)).unwrap();
        backlog.set_cost(cost());
        drop(first);
        assert_eq!(backlog.outstanding(), Work::default());

        // Nothing ahead: admitted however long its own work takes.
        let a = backlog.admit(requests(1, 50_000)).unwrap();
        drop(a);
        let a = backlog.admit(requests(1, 5_000)).unwrap(); // 52 ms
        let b = backlog.admit(requests(1, 4_000)).unwrap(); // both: 2 + 90 ms, one batch
        let refused = backlog.admit(requests(1, 1_000)).unwrap_err(); // all three: 2 + 100 ms
        assert_eq!(refused, Duration::from_millis(102));
        assert_eq!(
            backlog.outstanding().tokens,
            9_000,
            "a refused request adds nothing"
        );
        drop(a);
        let c = backlog.admit(requests(1, 100)).unwrap();
        assert_eq!(backlog.outstanding().tokens, 4_100);
        drop((b, c));
        // Nothing ahead: admitted however large.
        let big = backlog.admit(requests(1, 1_000_000)).unwrap();
        // 10 s of work ahead: any request would be refused, so it need not even be tokenized.
        assert!(backlog.refuses_all().unwrap() > Duration::from_secs(10));
        drop(big);
        assert_eq!(backlog.refuses_all(), None);
        // No budget: everything is admitted.
        let unbounded = Arc::new(Backlog::new(None, 128, 16_384));
        unbounded.set_cost(cost());
        let _first = unbounded.admit(requests(1, 1_000_000)).unwrap();
        let _second = unbounded.admit(requests(1, 1_000_000)).unwrap();
        assert_eq!(unbounded.refuses_all(), None);
    }

    #[test]
    fn many_short_requests_are_priced_as_the_few_batches_they_form() {
        let backlog = Arc::new(Backlog::new(Some(Duration::from_millis(250)), 128, 16_384));
        backlog.set_cost(cost());
        // 64 closed-loop clients with 15-token sentences: one forward pass of 960 tokens, 11.6 ms, not
        // 64 passes of 2.15 ms each (138 ms) as a per-request or per-token average would say.
        let tickets: Vec<_> = (0..64)
            .map(|_| backlog.admit(requests(1, 15)).expect("admitted"))
            .collect();
        assert_eq!(
            backlog.wait_for(backlog.outstanding()),
            Duration::from_micros(11_600)
        );
        // 300 of them take three passes: the batcher holds at most 128 sequences.
        let more: Vec<_> = (0..236)
            .map(|_| backlog.admit(requests(1, 15)).expect("admitted"))
            .collect();
        assert_eq!(
            backlog.wait_for(backlog.outstanding()),
            Duration::from_micros(3 * 2_000 + 300 * 150)
        );
        drop((tickets, more));
    }
}
