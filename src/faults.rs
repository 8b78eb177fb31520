//! Fault injection for the supervision and crash tests: the `FLYWHEEL_FAULTS` environment variable, read
//! once, holds comma-separated `name=value` faults. Unset (as in any real deployment) every hook is a
//! no-op. The faults:
//! - `panic_on_text=T`: the model thread panics in a batch that holds an input equal to `T`;
//! - `panic_in_job=TASK`: the trainer panics in the first job of task `TASK` (later ones run);
//! - `slow_write_ms=N`: every durable state-file write sleeps `N` ms first (a slow disk);
//! - `pause_after_alias_ms=N`: a promotion sleeps `N` ms between moving the alias and recording the
//!   rollout as promoted (a window for a kill between the two writes).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The faults configured for this process.
#[derive(Debug, Default)]
pub struct Faults {
    /// Panic in a batch holding this input.
    pub panic_on_text: Option<String>,
    /// Panic in the first training job of this task.
    pub panic_in_job: Option<String>,
    /// Whether the job fault has fired.
    job_fault_fired: AtomicBool,
    /// Sleep before every durable state-file write.
    pub slow_write: Option<Duration>,
    /// Sleep between a promotion's alias move and its rollout record.
    pub pause_after_alias: Option<Duration>,
}

impl Faults {
    fn parse(spec: &str) -> Self {
        let mut faults = Self::default();
        for (name, value) in spec.split(',').filter_map(|f| f.split_once('=')) {
            let ms = || value.trim().parse().ok().map(Duration::from_millis);
            match name.trim() {
                "panic_on_text" => faults.panic_on_text = Some(value.to_owned()),
                "panic_in_job" => faults.panic_in_job = Some(value.trim().to_owned()),
                "slow_write_ms" => faults.slow_write = ms(),
                "pause_after_alias_ms" => faults.pause_after_alias = ms(),
                other => tracing::warn!(fault = other, "unknown fault in FLYWHEEL_FAULTS ignored"),
            }
        }
        faults
    }
}

/// This process's faults (none unless `FLYWHEEL_FAULTS` is set).
pub fn get() -> &'static Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    FAULTS.get_or_init(|| {
        std::env::var("FLYWHEEL_FAULTS")
            .map(|spec| {
                tracing::warn!(%spec, "fault injection is on (FLYWHEEL_FAULTS); for tests only");
                Faults::parse(&spec)
            })
            .unwrap_or_default()
    })
}

/// Whether a job of `task` should panic now (once: the first job of the configured task).
pub fn job_should_panic(task: &str) -> bool {
    let faults = get();
    faults.panic_in_job.as_deref() == Some(task)
        && !faults.job_fault_fired.swap(true, Ordering::Relaxed)
}

/// Called before a durable state-file write.
pub fn before_durable_write(path: &Path) {
    if let Some(delay) = get().slow_write {
        tracing::info!(path = %path.display(), ?delay, "injected slow write");
        std::thread::sleep(delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_from_their_specification() {
        let f = Faults::parse("panic_on_text=boom now,slow_write_ms=40,panic_in_job=spam,bogus=1");
        assert_eq!(f.panic_on_text.as_deref(), Some("boom now"));
        assert_eq!(f.panic_in_job.as_deref(), Some("spam"));
        assert_eq!(f.slow_write, Some(Duration::from_millis(40)));
        assert_eq!(f.pause_after_alias, None);
    }
}
