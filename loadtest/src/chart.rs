//! The scenario's timeline as a PNG: accuracy and candidate share, P99 with training spans shaded, and the
//! drift score, one panel each over the same time axis, with the events marked on all three.

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// One window of the timeline.
#[derive(Debug, Clone)]
pub struct Window {
    /// Seconds since the start of the stream.
    pub start: f64,
    /// Seconds since the start of the stream.
    pub end: f64,
    /// Share of the window's predictions that were right.
    pub accuracy: Option<f64>,
    /// P99 latency of the window's requests.
    pub p99_ms: Option<f64>,
    /// The embedding drift score (cosine distance of mean embeddings) when a report existed.
    pub drift: Option<f64>,
    /// Whether any drift signal was over its threshold.
    pub drift_detected: bool,
    /// The candidate's share of traffic (0 without a rollout).
    pub candidate_share: f64,
    /// Whether a training job ran during the window.
    pub training: bool,
}

/// Something that happened, marked with a vertical line.
#[derive(Debug, Clone)]
pub struct Event {
    /// Seconds since the start of the stream.
    pub at: f64,
    /// A few words.
    pub label: String,
}

/// Where TrueType fonts usually live; the first that exists is used.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers `font` (or the first of the usual system fonts) as plotters' sans-serif.
pub fn load_font(font: Option<&Path>) -> anyhow::Result<()> {
    let path = match font {
        Some(p) => p.to_owned(),
        None => FONT_CANDIDATES
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .map(Path::to_owned)
            .ok_or_else(|| anyhow!("no TrueType font found; pass --font FILE.ttf"))?,
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable font", path.display()))
}

/// Draws the timeline into `path` (PNG, 1400×1000).
pub fn draw(path: &Path, title: &str, windows: &[Window], events: &[Event]) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let root = root
        .titled(title, ("sans-serif", 24))
        .map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((3, 1));
    let t_max = windows.last().map_or(1.0, |w| w.end).max(1.0);
    let training: Vec<(f64, f64)> = windows
        .iter()
        .filter(|w| w.training)
        .map(|w| (w.start, w.end))
        .collect();
    let p99_max = windows
        .iter()
        .filter_map(|w| w.p99_ms)
        .fold(1.0f64, f64::max)
        * 1.15;
    let drift_max = windows
        .iter()
        .filter_map(|w| w.drift)
        .fold(0.01f64, f64::max)
        * 1.2;

    let specs: [(&str, f64); 3] = [
        ("accuracy / candidate share", 1.05),
        ("P99 latency (ms)", p99_max),
        ("embedding drift (cosine distance)", drift_max),
    ];
    for (panel, (index, (y_desc, y_max))) in panels.iter().zip(specs.into_iter().enumerate()) {
        let mut chart = ChartBuilder::on(panel)
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds since the stream started")
            .y_desc(y_desc)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let shade = RGBColor(255, 190, 110).mix(0.35).filled();
        chart
            .draw_series(
                training
                    .iter()
                    .map(|&(a, b)| Rectangle::new([(a, 0.0), (b, y_max)], shade)),
            )
            .map_err(|e| anyhow!("{e}"))?
            .label("training job running")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], shade));
        for event in events {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(event.at, 0.0), (event.at, y_max)],
                    BLACK.mix(0.45),
                )))
                .map_err(|e| anyhow!("{e}"))?;
        }
        let series = |f: &dyn Fn(&Window) -> Option<f64>| -> Vec<(f64, f64)> {
            windows
                .iter()
                .filter_map(|w| f(w).map(|v| ((w.start + w.end) / 2.0, v)))
                .collect()
        };
        match index {
            0 => {
                chart
                    .draw_series(LineSeries::new(
                        series(&|w| w.accuracy),
                        BLUE.stroke_width(2),
                    ))
                    .map_err(|e| anyhow!("{e}"))?
                    .label("accuracy on the streamed mail")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
                chart
                    .draw_series(LineSeries::new(
                        series(&|w| Some(w.candidate_share)),
                        GREEN.stroke_width(2),
                    ))
                    .map_err(|e| anyhow!("{e}"))?
                    .label("candidate's traffic share")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
                for (i, event) in events.iter().enumerate() {
                    // Four heights in turn, so labels of events close in time do not overlap.
                    let y = 0.08 + 0.12 * (i % 4) as f64;
                    chart
                        .draw_series(std::iter::once(Text::new(
                            event.label.clone(),
                            (event.at, y),
                            ("sans-serif", 14),
                        )))
                        .map_err(|e| anyhow!("{e}"))?;
                }
            }
            1 => {
                chart
                    .draw_series(LineSeries::new(series(&|w| w.p99_ms), RED.stroke_width(2)))
                    .map_err(|e| anyhow!("{e}"))?
                    .label("P99 per window")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            }
            _ => {
                chart
                    .draw_series(LineSeries::new(
                        series(&|w| w.drift),
                        MAGENTA.stroke_width(2),
                    ))
                    .map_err(|e| anyhow!("{e}"))?
                    .label("drift score")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA));
                chart
                    .draw_series(
                        windows
                            .iter()
                            .filter(|w| w.drift_detected)
                            .filter_map(|w| w.drift.map(|d| ((w.start + w.end) / 2.0, d)))
                            .map(|p| Circle::new(p, 5, RED.filled())),
                    )
                    .map_err(|e| anyhow!("{e}"))?
                    .label("drift detected")
                    .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
