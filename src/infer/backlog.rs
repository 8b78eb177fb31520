//! Admission by expected wait: the tokens queued for (or running on) the model thread, and how long a token
//! has recently taken, give the time a new request would wait for its answer. Refusing a request whose
//! expected wait exceeds the budget keeps admitted requests' latency bounded under overload,
//! where a queue-length cap alone would admit a queue minutes long. A request with nothing ahead of it is
//! always admitted, however large: refusing it would not make anyone faster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Weight of the newest batch in the per-token estimate (1/8: smooths batch-to-batch noise while still
/// following a change of load within a second or so of batches).
const NEWEST_WEIGHT: u64 = 8;

/// The model thread's outstanding work, its recent speed, and the wait a request may be asked to accept.
#[derive(Debug, Default)]
pub struct Backlog {
    /// The longest expected wait admitted when something is ahead; `None` admits all.
    budget: Option<Duration>,
    /// Tokens of every admitted entry not yet answered or dropped.
    tokens: AtomicU64,
    /// Recent compute time per token in nanoseconds; 0 until a batch has run.
    ns_per_token: AtomicU64,
}

/// An admitted request's tokens; they leave the backlog when this is dropped (answered or abandoned).
#[derive(Debug)]
pub struct Admitted {
    backlog: Arc<Backlog>,
    tokens: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.backlog
            .tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

impl Backlog {
    /// An empty backlog that refuses expected waits over `budget` (`None`: admits all).
    pub fn new(budget: Option<Duration>) -> Self {
        Self {
            budget,
            ..Self::default()
        }
    }

    /// The configured budget.
    pub fn budget(&self) -> Option<Duration> {
        self.budget
    }

    /// Adds a request of `tokens` and returns its ticket, or the wait it would have had (the work ahead of
    /// it and its own) when that exceeds the budget and something is ahead (then nothing is added). Before
    /// the first batch has run the speed is unknown and all is admitted.
    pub fn admit(self: &Arc<Self>, tokens: usize) -> Result<Admitted, Duration> {
        let tokens = tokens as u64;
        let ahead = self.tokens.fetch_add(tokens, Ordering::Relaxed);
        let ticket = Admitted {
            backlog: self.clone(),
            tokens,
        };
        let wait = self.wait_for(ahead + tokens);
        match self.budget {
            Some(budget) if ahead > 0 && wait > budget => Err(wait),
            _ => Ok(ticket),
        }
    }

    /// The wait of the work already admitted, when it alone exceeds the budget: then any new request would
    /// be refused by [`Backlog::admit`], and the caller can refuse it before paying for its tokenization.
    pub fn refuses_all(&self) -> Option<Duration> {
        let wait = self.wait_for(self.tokens.load(Ordering::Relaxed));
        self.budget.filter(|&b| wait > b).map(|_| wait)
    }

    /// Records a batch of `tokens` that took `took` to compute.
    pub fn record(&self, tokens: usize, took: Duration) {
        if tokens == 0 {
            return;
        }
        let sample = u64::try_from(took.as_nanos() / tokens as u128).unwrap_or(u64::MAX);
        let old = self.ns_per_token.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * (NEWEST_WEIGHT - 1) + sample) / NEWEST_WEIGHT
        };
        // One writer (the model thread): a plain store cannot lose an update.
        self.ns_per_token.store(new.max(1), Ordering::Relaxed);
    }

    /// How long `tokens` of work take at the recent speed.
    pub fn wait_for(&self, tokens: u64) -> Duration {
        Duration::from_nanos(tokens.saturating_mul(self.ns_per_token.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Backlog {
        fn tokens(&self) -> u64 {
            self.tokens.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn admits_until_the_expected_wait_exceeds_the_budget_and_forgets_answered_work() {
        let backlog = Arc::new(Backlog::new(Some(Duration::from_millis(100))));
        // Speed unknown: admitted whatever the size.
        let first = backlog.admit(10_000).unwrap();
        backlog.record(1_000, Duration::from_millis(10)); // 10 µs per token
        assert_eq!(backlog.wait_for(1_000), Duration::from_millis(10));
        drop(first);
        assert_eq!(backlog.tokens(), 0);

        // Nothing ahead: admitted however long its own work takes.
        let a = backlog.admit(50_000).unwrap();
        drop(a);
        let a = backlog.admit(6_000).unwrap(); // answered in 60 ms
        let b = backlog.admit(4_000).unwrap(); // in 100 ms: at the budget, admitted
        let refused = backlog.admit(100).unwrap_err();
        assert_eq!(refused, Duration::from_millis(101));
        assert_eq!(backlog.tokens(), 10_000, "a refused request adds nothing");
        drop(a);
        let c = backlog.admit(100).unwrap();
        assert_eq!(backlog.tokens(), 4_100);
        drop((b, c));
        // Nothing ahead: admitted however large.
        let big = backlog.admit(1_000_000).unwrap();
        // 10 s of work ahead: any request would be refused, so it need not even be tokenized.
        assert_eq!(backlog.refuses_all(), Some(Duration::from_secs(10)));
        drop(big);
        assert_eq!(backlog.refuses_all(), None);
        // No budget: everything is admitted.
        let unbounded = Arc::new(Backlog::new(None));
        unbounded.record(1_000, Duration::from_millis(10));
        let _first = unbounded.admit(1_000_000).unwrap();
        let _second = unbounded.admit(1_000_000).unwrap();
        assert_eq!(unbounded.refuses_all(), None);
    }

    #[test]
    fn the_speed_follows_recent_batches() {
        let backlog = Backlog::default();
        backlog.record(100, Duration::from_micros(800)); // 8 µs per token
        for _ in 0..40 {
            backlog.record(100, Duration::from_micros(200)); // now 2 µs per token
        }
        let per_token = backlog.wait_for(1_000).as_nanos() as f64 / 1_000.0;
        assert!(
            (per_token - 2_000.0).abs() < 50.0,
            "{per_token} ns per token"
        );
    }
}
