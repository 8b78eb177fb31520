//! Supervision of the long-lived threads (the model thread, the trainer): a panic in one batch or one job
//! is caught, counted in `flywheel_thread_panics_total{thread}` and turned into that batch's or job's
//! error, and the thread goes on; a thread that ends anyway shows in its [`Alive`] flag, which `/ready`
//! reads.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::metrics::Metrics;

/// Runs `work`, turning a panic into an error message and counting it under `thread`.
pub fn catch<T>(metrics: &Metrics, thread: &str, work: impl FnOnce() -> T) -> Result<T, String> {
    // The work's state is dropped or rebuilt after a panic (a batch's buffers, a job's model copy), so
    // nothing it left half-updated is used again.
    catch_unwind(AssertUnwindSafe(work)).map_err(|panic| {
        metrics.thread_panics.with_label_values(&[thread]).inc();
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        tracing::error!(thread, %message, "caught a panic; the thread goes on");
        format!("the {thread} thread panicked: {message}")
    })
}

/// Whether a supervised thread is still running: cleared when the thread's [`AliveGuard`] drops, which it
/// does however the thread ends.
#[derive(Debug, Clone)]
pub struct Alive(Arc<AtomicBool>);

/// Held by the supervised thread for its whole life.
#[derive(Debug)]
pub struct AliveGuard(Arc<AtomicBool>);

impl Alive {
    /// A flag for a thread about to start, and the guard to move into it.
    pub fn new() -> (Self, AliveGuard) {
        let flag = Arc::new(AtomicBool::new(true));
        (Self(flag.clone()), AliveGuard(flag))
    }

    /// Whether the thread still runs.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_becomes_an_error_and_is_counted() {
        let metrics = Metrics::new();
        let out = catch(&metrics, "model", || -> u32 { panic!("boom") });
        assert_eq!(out.unwrap_err(), "the model thread panicked: boom");
        assert_eq!(metrics.thread_panics.with_label_values(&["model"]).get(), 1);
        assert_eq!(catch(&metrics, "model", || 7), Ok(7));
    }

    #[test]
    fn the_flag_clears_when_the_thread_ends_even_by_a_panic() {
        let (alive, guard) = Alive::new();
        assert!(alive.get());
        let _ = std::thread::spawn(move || {
            let _guard = guard;
            panic!("the thread dies");
        })
        .join();
        assert!(!alive.get());
    }
}
