//! Serving pressure: how much inference work is waiting or running, so that training can step aside.
//!
//! On a machine with few cores the trainer and the model thread share them (and their caches); nicing the
//! trainer does not stop a running training op from slowing a forward pass that starts beside it. Instead
//! the trainer yields cooperatively: at every frozen linear's forward and backward, and between micro-batches,
//! it waits while inference work is pending, up to a bound so a saturated server still trains, slowly.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Counts inference work in flight; the model's callers raise it, training waits on it.
#[derive(Debug, Default)]
pub struct ServingPressure {
    pending: Mutex<usize>,
    idle: Condvar,
    yielded_nanos: AtomicU64,
}

/// Marks one unit of inference work as pending until dropped.
#[derive(Debug)]
pub struct Pending {
    pressure: Arc<ServingPressure>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut pending = self.pressure.lock();
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            self.pressure.idle.notify_all();
        }
    }
}

impl ServingPressure {
    /// A counter with nothing pending.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        // The count stays meaningful even if a holder panicked: it is only ever incremented or decremented.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks work as pending until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Pending {
        *self.lock() += 1;
        Pending {
            pressure: self.clone(),
        }
    }

    /// Units of work pending now.
    pub fn pending(&self) -> usize {
        *self.lock()
    }

    /// Blocks while work is pending, at most `max`; returns how long it waited, which counts in
    /// [`Self::yielded`].
    pub fn wait_until_idle(&self, max: Duration) -> Duration {
        self.wait(max, true)
    }

    fn wait(&self, max: Duration, counted: bool) -> Duration {
        let started = Instant::now();
        let guard = self.lock();
        if *guard == 0 || max.is_zero() {
            return Duration::ZERO;
        }
        let _ = self
            .idle
            .wait_timeout_while(guard, max, |pending| *pending > 0)
            .unwrap_or_else(|e| e.into_inner());
        let waited = started.elapsed();
        if counted {
            self.yielded_nanos.fetch_add(
                u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
        waited
    }

    /// Total time training spent waiting for inference, over the life of the server.
    pub fn yielded(&self) -> Duration {
        Duration::from_nanos(self.yielded_nanos.load(Ordering::Relaxed))
    }
}

/// Where a thread's yield points wait: the pressure, the longest wait per point, and whether the waits
/// count as training's ([`ServingPressure::yielded`]).
type YieldTo = (Arc<ServingPressure>, Duration, bool);

thread_local! {
    static YIELD_TO: RefCell<Option<YieldTo>> = const { RefCell::new(None) };
}

/// Makes [`yield_point`] on the calling thread wait for `pressure` (at most `max` per call), counting the
/// waits as training's; `None` turns it off. Set on the trainer's threads only: inference itself must never
/// wait on itself.
pub fn yield_on_this_thread(to: Option<(Arc<ServingPressure>, Duration)>) {
    YIELD_TO.with(|cell| *cell.borrow_mut() = to.map(|(p, max)| (p, max, true)));
}

/// Like [`yield_on_this_thread`] for background work that is not training (drift embeddings): its waits are
/// not counted as training's.
pub fn yield_quietly_on_this_thread(to: (Arc<ServingPressure>, Duration)) {
    YIELD_TO.with(|cell| *cell.borrow_mut() = Some((to.0, to.1, false)));
}

/// Runs `work` with the calling thread's yield points waiting quietly for `to` (as
/// [`yield_quietly_on_this_thread`]), then puts back whatever the thread had before.
pub fn yielding_quietly<R>(to: (Arc<ServingPressure>, Duration), work: impl FnOnce() -> R) -> R {
    struct Restore(Option<YieldTo>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            YIELD_TO.with(|cell| *cell.borrow_mut() = before);
        }
    }
    let _restore = Restore(YIELD_TO.with(|cell| cell.borrow_mut().replace((to.0, to.1, false))));
    work()
}

/// Whether [`yield_point`] on the calling thread may wait.
pub fn yields_on_this_thread() -> bool {
    YIELD_TO.with(|cell| cell.borrow().is_some())
}

/// A point where the calling thread steps aside for pending inference, if [`yield_on_this_thread`] asked it
/// to; free otherwise.
pub fn yield_point() {
    YIELD_TO.with(|cell| {
        if let Some((pressure, max, counted)) = &*cell.borrow() {
            pressure.wait(*max, *counted);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_yield_is_restored_to_what_the_thread_had_before() {
        let pressure = ServingPressure::new();
        yield_on_this_thread(Some((pressure.clone(), Duration::from_millis(7))));
        let inside = yielding_quietly((pressure.clone(), Duration::from_millis(1)), || {
            YIELD_TO.with(|c| {
                c.borrow()
                    .as_ref()
                    .map(|(_, max, counted)| (*max, *counted))
            })
        });
        assert_eq!(inside, Some((Duration::from_millis(1), false)));
        let after = YIELD_TO.with(|c| {
            c.borrow()
                .as_ref()
                .map(|(_, max, counted)| (*max, *counted))
        });
        assert_eq!(
            after,
            Some((Duration::from_millis(7), true)),
            "the trainer's state is back"
        );
        yield_on_this_thread(None);
        yielding_quietly((pressure, Duration::from_millis(1)), || {});
        assert!(!yields_on_this_thread());
    }

    #[test]
    fn waits_while_pending_and_wakes_when_idle() {
        let pressure = ServingPressure::new();
        assert_eq!(
            pressure.wait_until_idle(Duration::from_secs(5)),
            Duration::ZERO
        );
        let pending = pressure.begin();
        assert_eq!(pressure.pending(), 1);
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(pending);
        });
        let waited = pressure.wait_until_idle(Duration::from_secs(5));
        releaser.join().expect("releaser thread");
        assert!(waited >= Duration::from_millis(40), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert_eq!(pressure.pending(), 0);
        assert!(pressure.yielded() >= waited);
    }

    #[test]
    fn the_wait_is_bounded_and_only_on_threads_that_asked() {
        let pressure = ServingPressure::new();
        let _pending = pressure.begin();
        yield_point();
        assert_eq!(
            pressure.yielded(),
            Duration::ZERO,
            "no yielding unless asked"
        );
        yield_on_this_thread(Some((pressure.clone(), Duration::from_millis(30))));
        yield_point();
        let yielded = pressure.yielded();
        assert!(yielded >= Duration::from_millis(25), "{yielded:?}");
        yield_on_this_thread(None);
        yield_point();
        assert_eq!(pressure.yielded(), yielded);
    }
}
