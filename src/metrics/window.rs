//! A sliding-window latency summary: P50/P95/P99 of the last minute per route, computed from HdrHistograms
//! at scrape time, so a plain scrape shows the P99 without PromQL.
//!
//! The window is a ring of slots (10 s each by default); a slot older than the window is cleared before it
//! is reused, and a scrape merges the window's complete slots and the current one, so it always covers at
//! least the window (60 to 70 s with the defaults), never less.

use std::collections::HashMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};

/// Quantiles exported.
pub const QUANTILES: [f64; 3] = [0.5, 0.95, 0.99];
/// Highest latency tracked exactly (longer ones are clamped): 10 minutes, in microseconds.
const MAX_MICROS: u64 = 600_000_000;

struct Ring {
    slots: Vec<(u64, Histogram<u64>)>,
}

/// Per-route rolling latency histograms exported as a Prometheus summary.
pub struct LatencyWindow {
    desc: Desc,
    slot_secs: u64,
    slots: usize,
    routes: Mutex<HashMap<String, Ring>>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3)
        .expect("static histogram bounds are valid; this is a bug")
}

impl LatencyWindow {
    /// A window of `slots × slot_secs` seconds exported as `name` with a `route` label.
    pub fn new(name: &str, help: &str, slot_secs: u64, slots: usize) -> Self {
        let desc = Desc::new(
            name.to_owned(),
            help.to_owned(),
            vec!["route".to_owned()],
            HashMap::new(),
        )
        .expect("static metric definition is valid; this is a bug");
        Self {
            desc,
            slot_secs: slot_secs.max(1),
            slots: slots.max(1),
            routes: Mutex::new(HashMap::new()),
        }
    }

    fn now_slot(&self) -> u64 {
        crate::clock::unix_seconds() / self.slot_secs
    }

    /// Records one request of `route` that took `seconds`.
    pub fn record(&self, route: &str, seconds: f64) {
        self.record_at(route, seconds, self.now_slot());
    }

    fn record_at(&self, route: &str, seconds: f64, slot: u64) {
        let micros = ((seconds * 1e6) as u64).clamp(1, MAX_MICROS);
        let mut routes = self
            .routes
            .lock()
            .expect("latency window lock poisoned; this is a bug");
        // One slot more than the window: the current one, filling, beside `slots` complete ones.
        let n = self.slots + 1;
        let ring = routes.entry(route.to_owned()).or_insert_with(|| Ring {
            slots: (0..n).map(|_| (u64::MAX, histogram())).collect(),
        });
        let (epoch, h) = &mut ring.slots[(slot % n as u64) as usize];
        if *epoch != slot {
            h.reset();
            *epoch = slot;
        }
        h.saturating_record(micros);
    }

    /// `(route, merged histogram)` over the window ending at `slot`.
    fn merged_at(&self, slot: u64) -> Vec<(String, Histogram<u64>)> {
        let routes = self
            .routes
            .lock()
            .expect("latency window lock poisoned; this is a bug");
        let oldest = slot.saturating_sub(self.slots as u64);
        routes
            .iter()
            .map(|(route, ring)| {
                let mut merged = histogram();
                for (epoch, h) in &ring.slots {
                    if *epoch != u64::MAX && *epoch >= oldest && *epoch <= slot {
                        merged
                            .add(h)
                            .expect("histograms share bounds; this is a bug");
                    }
                }
                (route.clone(), merged)
            })
            .collect()
    }
}

impl Collector for LatencyWindow {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::SUMMARY);
        let mut merged = self.merged_at(self.now_slot());
        merged.sort_by(|a, b| a.0.cmp(&b.0));
        for (route, h) in merged {
            let mut summary = Summary::default();
            summary.set_sample_count(h.len());
            summary.set_sample_sum(h.mean() * h.len() as f64 / 1e6);
            summary.set_quantile(
                QUANTILES
                    .iter()
                    .map(|&q| {
                        let mut quantile = Quantile::default();
                        quantile.set_quantile(q);
                        quantile.set_value(if h.is_empty() {
                            f64::NAN
                        } else {
                            h.value_at_quantile(q) as f64 / 1e6
                        });
                        quantile
                    })
                    .collect(),
            );
            let mut label = LabelPair::default();
            label.set_name("route".to_owned());
            label.set_value(route);
            let mut metric = Metric::default();
            metric.set_label(vec![label]);
            metric.set_summary(summary);
            family.mut_metric().push(metric);
        }
        vec![family]
    }
}

/// A registrable handle to a shared [`LatencyWindow`].
pub struct SharedWindow(pub std::sync::Arc<LatencyWindow>);

impl Collector for SharedWindow {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_cover_only_the_slots_inside_the_window() {
        let w = LatencyWindow::new("t", "h", 10, 6);
        // Slot 92 is outside the window ending at 100, and its ring entry is not reused before 106.
        w.record_at("/r", 5.0, 92);
        for i in 1..=100 {
            w.record_at("/r", i as f64 / 1000.0, 100);
        }
        let merged = w.merged_at(100);
        let h = &merged[0].1;
        assert_eq!(
            h.len(),
            100,
            "the sample from slot 92 is outside a window of 6 complete slots before slot 100"
        );
        let p99 = h.value_at_quantile(0.99) as f64 / 1e6;
        assert!((p99 - 0.099).abs() < 0.001, "{p99}");
        w.record_at("/r", 1.0, 106);
        assert_eq!(
            w.merged_at(106)[0].1.len(),
            101,
            "slot 100 is the oldest complete slot while slot 106 fills"
        );
        w.record_at("/r", 1.0, 107);
        assert_eq!(
            w.merged_at(107)[0].1.len(),
            2,
            "slot 100 was reused and cleared"
        );
    }
}
