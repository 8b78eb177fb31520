//! Wall-clock time as the stores and the API record it: whole seconds since the Unix epoch.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 on a clock set before it).
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_reads_a_time_after_this_code_was_written() {
        // 2026-01-01T00:00:00Z.
        assert!(super::unix_seconds() > 1_767_225_600);
    }
}
