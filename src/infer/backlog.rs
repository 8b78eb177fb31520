//! Admission by expected wait: the work queued for (or running on) the model thread, cut into the batches
//! the batcher will form and priced by the fitted [`CostModel`], gives the time a new request would wait
//! for its answer. Under overload — more work offered per second than the model can do — refusing a
//! request whose expected wait exceeds the budget keeps admitted requests' latency bounded, where a
//! queue-length cap alone would admit a queue minutes long.
//!
//! Below capacity the queue cannot grow without bound: its length is set by the callers themselves (64
//! clients that each wait for their answer never queue more than 64 requests), and refusing one of them
//! makes nobody faster — a client that retries at once only adds refusals to the model's work. So the
//! budget applies only while the offered load exceeds capacity; below it, only a queue that outgrows one
//! batch and several budgets is refused (the work ahead of the request, not its own: a large request is
//! not refused for its size while the model keeps up). A request with nothing ahead of it is always
//! admitted, however large.
//!
//! A request larger than one batch, or than half the budget's worth of work, is queued a part at a time,
//! each part once the one before it is answered, so only its current part is in the backlog: a request
//! arriving meanwhile waits behind one part of it, not all of it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::cost::{CostModel, Work};

/// Offered load (work offered per second, refused requests included, over what the model serves per
/// second) over which the server counts as overloaded and the budget applies: above 1 the queue grows;
/// the margin keeps the jitter of callers that each wait for their answer (who offer exactly what the
/// model serves) from counting as overload.
const OVERLOAD: f64 = 1.2;

/// Each served batch's weight in the model's throughput is multiplied by this when a newer one is served.
const SERVED_DECAY: f64 = 0.98;

/// Below overload, a request is still refused when its expected wait exceeds this many budgets and the
/// work waiting for the model no longer fits in one batch. Callers that each wait for their answer never
/// queue more than one batch takes (the batcher takes everything waiting, up to its limits, at every
/// pass), so such a queue is one that outruns the model however slightly, which the offered load may not
/// show yet.
const HARD_CAP_BUDGETS: u32 = 8;

/// Seconds over which the offered load is averaged (an exponential decay with this time constant).
const DEMAND_SECONDS: f64 = 2.0;

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
    /// The batch on the model now (part of the admitted work) and when it started: only what is left
    /// of it counts towards a new request's wait.
    running: Mutex<Option<(Instant, Work)>>,
    /// When the oldest admitted request not yet on the model was admitted. The batcher packs everything
    /// waiting into the next batch, later arrivals included, and answers the batch when it all has run:
    /// a request admitted into that batch lengthens the wait of every request already in it.
    waiting_since: Mutex<Option<Instant>>,
    /// The offered load.
    demand: Mutex<Demand>,
}

/// The offered load: work offered per second (refused requests included), priced at the fitted per-token
/// and per-square costs, over the same price of what the model gets through per second of work. In model
/// seconds the price would carry the fit's error (a fit 20 % high would make a server that is merely
/// busy look overloaded); as a ratio of the same prices it is 1 when the model serves exactly what is
/// offered, as it does for callers that each wait for their answer.
#[derive(Debug)]
struct Demand {
    /// When `offered` was last decayed.
    at: Option<Instant>,
    /// Priced work offered per second, decaying over [`DEMAND_SECONDS`].
    offered: f64,
    /// Mean price of one request (to count a request refused before it was tokenized).
    mean_request: f64,
    /// Priced work and seconds of recent forward passes, each batch counting a little less than the
    /// next: their ratio is what the model gets through per second, large batches weighing most.
    served: (f64, f64),
}

impl Default for Demand {
    fn default() -> Self {
        Self {
            at: None,
            offered: 0.0,
            mean_request: 0.0,
            served: (0.0, 0.0),
        }
    }
}

impl Demand {
    /// Adds a request priced `price` (`None`: the mean price) and returns the offered load.
    fn offer(&mut self, price: Option<f64>) -> f64 {
        let now = Instant::now();
        let elapsed = self.at.map_or(0.0, |at| (now - at).as_secs_f64());
        self.at = Some(now);
        let price = match price {
            Some(p) => {
                self.mean_request = if self.mean_request == 0.0 {
                    p
                } else {
                    0.95 * self.mean_request + 0.05 * p
                };
                p
            }
            None => self.mean_request,
        };
        self.offered = self.offered * (-elapsed / DEMAND_SECONDS).exp() + price / DEMAND_SECONDS;
        self.load()
    }

    /// Offered work over the work the model serves in the same time; 0 until a batch has been served.
    fn load(&self) -> f64 {
        let decayed = self.at.map_or(0.0, |at| {
            self.offered * (-at.elapsed().as_secs_f64() / DEMAND_SECONDS).exp()
        });
        let (price, seconds) = self.served;
        if price > 0.0 && seconds > 0.0 {
            decayed / (price / seconds)
        } else {
            0.0
        }
    }

    /// Records a forward pass that served work priced `price` in `seconds`.
    fn served(&mut self, price: f64, seconds: f64) {
        let (p, s) = self.served;
        self.served = (SERVED_DECAY * p + price, SERVED_DECAY * s + seconds);
    }
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

    /// Admits a request by its first part, `first` (all of it when it fits one part), and adds that part
    /// to the backlog; or returns the wait it would have had when it is refused (then nothing is added).
    /// With something ahead, it is refused while the offered load exceeds capacity and its first part's
    /// answer (after the work ahead) would come later than the budget; or, at any load, when the work
    /// ahead no longer fits in one batch and takes longer than [`HARD_CAP_BUDGETS`] budgets. A large
    /// request is judged by its first part: its own size is what it asks for, and judging the whole would
    /// refuse it whenever anything at all is ahead, however briefly; its later parts enter as they are
    /// queued ([`Backlog::enter`]). While no batch has been measured the cost is unknown and all is
    /// admitted.
    pub fn admit(self: &Arc<Self>, first: Work) -> Result<Admitted, Duration> {
        self.admit_as(first, false)
    }

    /// Admits background work no caller waits for (a shadow run) as [`Backlog::admit`] does a request,
    /// except that it is refused past the budget at any load, and a refusal is not counted in the offered
    /// load: it says nothing of what callers offer.
    pub fn admit_background(self: &Arc<Self>, first: Work) -> Result<Admitted, Duration> {
        self.admit_as(first, true)
    }

    fn admit_as(self: &Arc<Self>, first: Work, background: bool) -> Result<Admitted, Duration> {
        let ahead = Work {
            sequences: self.sequences.fetch_add(first.sequences, Ordering::Relaxed),
            tokens: self.tokens.fetch_add(first.tokens, Ordering::Relaxed),
            squares: self.squares.fetch_add(first.squares, Ordering::Relaxed),
        };
        let ticket = Admitted {
            backlog: self.clone(),
            work: first,
        };
        let now = Instant::now();
        let oldest = self.waiting_since().unwrap_or(now);
        let running = self.running_work();
        // The request's first batch ends at `wait` from now for the oldest request in it too, which has
        // waited since `oldest` already (when the queue is longer than one batch, the request's batch is a
        // later one and the oldest waiting request is not in it).
        let one_batch = ahead
            .plus(first)
            .minus(running)
            .batches(self.max_batch_size, self.max_batch_tokens)
            == 1;
        let answer = self.wait_for(ahead.plus(first))
            + if one_batch {
                oldest.elapsed()
            } else {
                Duration::ZERO
            };
        let queue_ahead = ahead.minus(running);
        let beyond_one_batch = queue_ahead.batches(self.max_batch_size, self.max_batch_tokens) > 1;
        // Offered as it is queued, a part at a time: a large request priced whole at its arrival would
        // look, for the seconds the average remembers it, like a burst over capacity.
        let load = match background {
            true => self.demand().load(),
            false => self.demand().offer(Some(self.price(first))),
        };
        if ahead.sequences > 0
            && (self.refuses(answer, self.wait_for(ahead), load, beyond_one_batch)
                || (background && self.budget.is_some_and(|budget| answer > budget)))
        {
            return Err(answer);
        }
        if background {
            self.demand().offer(Some(self.price(first)));
        }
        self.waiting_from(now);
        Ok(ticket)
    }

    /// Adds `work`, a later part of an admitted request, as it is queued: it was admitted with its
    /// request and is never refused.
    pub fn enter(self: &Arc<Self>, work: Work) -> Admitted {
        self.sequences.fetch_add(work.sequences, Ordering::Relaxed);
        self.tokens.fetch_add(work.tokens, Ordering::Relaxed);
        self.squares.fetch_add(work.squares, Ordering::Relaxed);
        self.waiting_from(Instant::now());
        self.demand().offer(Some(self.price(work)));
        Admitted {
            backlog: self.clone(),
            work,
        }
    }

    fn waiting_since(&self) -> Option<Instant> {
        *self.waiting_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that something waits for the model from `at`, unless something waits from earlier.
    fn waiting_from(&self, at: Instant) {
        self.waiting_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(at);
    }

    /// Whether a request is refused whose answer would come after `answer`, behind work ahead that takes
    /// `ahead` and does or does not fit in one batch (`beyond_one_batch`), when the offered load is `load`.
    fn refuses(
        &self,
        answer: Duration,
        ahead: Duration,
        load: f64,
        beyond_one_batch: bool,
    ) -> bool {
        self.budget.is_some_and(|budget| {
            (answer > budget && load > OVERLOAD)
                || (beyond_one_batch && ahead > budget * HARD_CAP_BUDGETS)
        })
    }

    /// Records a forward pass over `work` that took `took`, for the offered load's denominator.
    pub fn served(&self, work: Work, took: Duration) {
        let price = self.price(work);
        self.demand().served(price, took.as_secs_f64());
    }

    /// The price of `work` in the offered load: its share of a batch's cost (tokens and attention, not the
    /// per-batch part, which depends on what else is in the batch).
    fn price(&self, work: Work) -> f64 {
        let cost = self.cost();
        cost.per_token_ns * work.tokens as f64 + cost.per_square_ns * work.squares as f64
    }

    fn demand(&self) -> std::sync::MutexGuard<'_, Demand> {
        self.demand.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the batcher has taken what was waiting into a batch; `next` is when the oldest request
    /// left waiting was enqueued (`None`: nothing is left).
    pub fn taken(&self, next: Option<Instant>) {
        *self.waiting_since.lock().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// The wait of the work already admitted, when it alone would have any new request refused by
    /// [`Backlog::admit`]: the caller can refuse it before paying for its tokenization. Such a refusal
    /// still counts in the offered load, at the mean cost of a request.
    pub fn refuses_all(&self) -> Option<Duration> {
        let outstanding = self.outstanding();
        let waiting = outstanding.minus(self.running_work());
        let beyond_one_batch = waiting.batches(self.max_batch_size, self.max_batch_tokens) > 1;
        let wait = self.wait_for(outstanding);
        if !self.refuses(wait, wait, self.demand().load(), beyond_one_batch) {
            return None;
        }
        self.demand().offer(None);
        Some(wait)
    }

    /// Publishes the model thread's latest fit.
    pub fn set_cost(&self, cost: CostModel) {
        *self.cost.write().unwrap_or_else(|e| e.into_inner()) = cost;
    }

    /// The cost model admission judges by.
    pub fn cost(&self) -> CostModel {
        *self.cost.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `work` as the batch now on the model (`None`: its forward pass has ended).
    pub fn set_running(&self, work: Option<Work>) {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = work.map(|w| (Instant::now(), w));
    }

    /// How long admitted `work` takes at the fitted cost (zero while the cost is unknown): what is left of
    /// the batch on the model now, then the rest cut into the batches the batcher will form.
    pub fn wait_for(&self, work: Work) -> Duration {
        let cost = self.cost();
        let running = *self.running.lock().unwrap_or_else(|e| e.into_inner());
        let (left, rest) = match running {
            Some((started, batch)) if batch.sequences <= work.sequences => {
                let elapsed = started.elapsed().as_nanos() as f64;
                ((cost.nanos(batch, 1) - elapsed).max(0.0), work.minus(batch))
            }
            _ => (0.0, work),
        };
        if rest.sequences == 0 {
            return Duration::from_nanos(left as u64);
        }
        let batches = rest.batches(self.max_batch_size, self.max_batch_tokens);
        Duration::from_nanos((left + cost.nanos(rest, batches)) as u64)
    }

    fn running_work(&self) -> Work {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(Work::default(), |(_, w)| w)
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

    /// Admits a request that fits one batch.
    fn admit(backlog: &Arc<Backlog>, work: Work) -> Result<Admitted, Duration> {
        backlog.admit(work)
    }

    /// Serves work at 1 ms of price per ms, then offers three seconds' worth at once: well over capacity
    /// for the next second or so.
    fn overload(backlog: &Backlog) {
        backlog.demand().served(1e6, 1e-3);
        backlog.demand().offer(Some(3e9));
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
    fn under_overload_admits_until_the_expected_wait_exceeds_the_budget_and_forgets_answered_work()
    {
        let backlog = Arc::new(Backlog::new(Some(Duration::from_millis(100)), 128, 16_384));
        // Cost unknown: admitted whatever the size.
        let first = admit(&backlog, requests(1, 10_000)).unwrap();
        backlog.set_cost(cost());
        drop(first);
        assert_eq!(backlog.outstanding(), Work::default());
        overload(&backlog);

        // Nothing ahead: admitted however long its own work takes.
        let a = admit(&backlog, requests(1, 50_000)).unwrap();
        drop(a);
        let a = admit(&backlog, requests(1, 5_000)).unwrap(); // 52 ms
        let b = admit(&backlog, requests(1, 4_000)).unwrap(); // both: 2 + 90 ms, one batch
        let refused = admit(&backlog, requests(1, 1_000)).unwrap_err(); // all three: 2 + 100 ms
        assert!(refused >= Duration::from_millis(102), "{refused:?}");
        assert!(refused < Duration::from_millis(150), "{refused:?}");
        assert_eq!(
            backlog.outstanding().tokens,
            9_000,
            "a refused request adds nothing"
        );
        drop(a);
        let c = admit(&backlog, requests(1, 100)).unwrap();
        assert_eq!(backlog.outstanding().tokens, 4_100);
        drop((b, c));
        // Nothing ahead: admitted however large.
        let big = admit(&backlog, requests(1, 1_000_000)).unwrap();
        // 10 s of work ahead: any request would be refused, so it need not even be tokenized.
        assert!(backlog.refuses_all().unwrap() > Duration::from_secs(10));
        drop(big);
        assert_eq!(backlog.refuses_all(), None);
        // No budget: everything is admitted.
        let unbounded = Arc::new(Backlog::new(None, 128, 16_384));
        unbounded.set_cost(cost());
        let _first = admit(&unbounded, requests(1, 1_000_000)).unwrap();
        let _second = admit(&unbounded, requests(1, 1_000_000)).unwrap();
        assert_eq!(unbounded.refuses_all(), None);
    }

    #[test]
    fn many_short_requests_are_priced_as_the_few_batches_they_form() {
        let backlog = Arc::new(Backlog::new(Some(Duration::from_millis(250)), 128, 16_384));
        backlog.set_cost(cost());
        // 64 closed-loop clients with 15-token sentences: one forward pass of 960 tokens, 11.6 ms, not
        // 64 passes of 2.15 ms each (138 ms) as a per-request or per-token average would say.
        let tickets: Vec<_> = (0..64)
            .map(|_| admit(&backlog, requests(1, 15)).expect("admitted"))
            .collect();
        assert_eq!(
            backlog.wait_for(backlog.outstanding()),
            Duration::from_micros(11_600)
        );
        // 300 of them take three passes: the batcher holds at most 128 sequences.
        let more: Vec<_> = (0..236)
            .map(|_| admit(&backlog, requests(1, 15)).expect("admitted"))
            .collect();
        assert_eq!(
            backlog.wait_for(backlog.outstanding()),
            Duration::from_micros(3 * 2_000 + 300 * 150)
        );
        drop((tickets, more));
    }

    #[test]
    fn below_capacity_only_a_wait_of_several_budgets_is_refused() {
        let backlog = Arc::new(Backlog::new(Some(Duration::from_millis(100)), 128, 16_384));
        backlog.set_cost(cost());
        // 64 callers that each wait for their answer: a queue over the budget, but one they bound
        // themselves, offering no more than the model serves.
        let callers: Vec<_> = (0..64)
            .map(|_| admit(&backlog, requests(1, 200)).expect("admitted"))
            .collect();
        assert!(backlog.wait_for(backlog.outstanding()) > Duration::from_millis(100));
        backlog.served(requests(32, 200), Duration::from_millis(66));
        assert!(backlog.demand().load() < OVERLOAD, "{:?}", backlog.demand());
        // A queue over eight budgets that no longer fits in one batch is refused all the same: 838 ms
        // ahead (the callers' batch, then the long one alone), then 918 ms with the newcomer's own work.
        let long = admit(&backlog, requests(1, 70_000)).expect("admitted");
        let refused = admit(&backlog, requests(1, 8_000)).unwrap_err();
        assert!(refused > Duration::from_millis(900), "{refused:?}");
        drop((callers, long));
    }

    #[test]
    fn background_work_yields_past_the_budget_at_any_load_and_its_refusal_is_not_demand() {
        let backlog = Arc::new(Backlog::new(Some(Duration::from_millis(100)), 128, 16_384));
        backlog.set_cost(cost());
        backlog.served(requests(32, 200), Duration::from_millis(66));
        let _caller = admit(&backlog, requests(1, 8_000)).unwrap(); // 82 ms
        let load = backlog.demand().load();
        assert!(load < OVERLOAD, "{load}");
        // A caller's request with 2 + 40 ms of its own would be admitted below overload...
        let caller = admit(&backlog, requests(1, 4_000)).expect("below overload");
        drop(caller);
        // ...but background work of the same size waits for a quieter moment, and offers nothing.
        let offered = backlog.demand().offered;
        assert!(backlog.admit_background(requests(1, 4_000)).is_err());
        assert_eq!(backlog.demand().offered, offered);
        // Small enough to answer within the budget, it runs, and counts as what it is: work on the model.
        assert!(backlog.admit_background(requests(1, 100)).is_ok());
        assert!(backlog.demand().offered > offered);
    }

    #[test]
    fn a_large_request_is_judged_by_its_first_part_and_others_wait_behind_one_part_of_it() {
        let backlog = Arc::new(Backlog::new(Some(Duration::from_millis(100)), 128, 16_384));
        backlog.set_cost(cost());
        overload(&backlog);
        // A small request on the model, then a request of 256 texts of 60 tokens (about 158 ms, over the
        // budget), which comes in by its first part (16 texts here, 2 + 9.6 ms): that part's answer comes
        // within the budget, under overload too.
        let small = admit(&backlog, requests(1, 20)).unwrap();
        backlog.taken(None);
        backlog.set_running(Some(requests(1, 20)));
        let big = admit(&backlog, requests(16, 60)).expect("its first part fits the budget");
        assert_eq!(
            backlog.outstanding().sequences,
            17,
            "only its first part is queued"
        );
        // Its next part goes in when the first is answered; a request arriving then waits behind that
        // part, not the rest of it.
        backlog.set_running(None);
        drop((small, big));
        let _second = backlog.enter(requests(16, 60));
        let _small = admit(&backlog, requests(1, 20)).expect("one part ahead");
        assert_eq!(backlog.outstanding().sequences, 17);
    }

    #[test]
    fn a_request_joining_a_batch_counts_against_the_wait_of_those_already_in_it() {
        let backlog = Arc::new(Backlog::new(Some(Duration::from_millis(100)), 128, 16_384));
        backlog.set_cost(cost());
        overload(&backlog);
        let _first = admit(&backlog, requests(1, 4_000)).unwrap(); // 42 ms
        std::thread::sleep(Duration::from_millis(40));
        // Alone, the newcomer's batch would end within 2 + 90 ms; but the first request, waiting for 40 ms
        // already, is in that batch too and would be answered after 130 ms.
        let refused = admit(&backlog, requests(1, 5_000)).unwrap_err();
        assert!(refused >= Duration::from_millis(130), "{refused:?}");
        // Once the batcher has taken the first request, the newcomer starts a batch of its own.
        backlog.taken(None);
        backlog.set_running(Some(requests(1, 4_000)));
        let _second = admit(&backlog, requests(1, 5_000)).unwrap();
    }

    #[test]
    fn only_what_is_left_of_the_running_batch_counts() {
        let backlog = Arc::new(Backlog::new(Some(Duration::from_millis(250)), 128, 16_384));
        backlog.set_cost(cost());
        let running = requests(10, 100); // 2 + 10 ms
        let _on_the_model = admit(&backlog, running).unwrap();
        let _queued = admit(&backlog, requests(5, 100)).unwrap();
        let both = backlog.outstanding();
        // Not started: one batch of everything, 2 + 15 ms.
        assert_eq!(backlog.wait_for(both), Duration::from_millis(17));
        backlog.set_running(Some(running));
        std::thread::sleep(Duration::from_millis(5));
        // Running for ≥ 5 ms: ≤ 7 ms of it left, then a batch of the queued five (2 + 5 ms).
        let wait = backlog.wait_for(both);
        assert!(wait <= Duration::from_millis(14), "{wait:?}");
        assert!(wait >= Duration::from_millis(7), "{wait:?}");
        backlog.set_running(None);
        assert_eq!(backlog.wait_for(both), Duration::from_millis(17));
    }
}
