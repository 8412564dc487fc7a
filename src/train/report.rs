//! Training reports: the progress bar, the JSONL metrics log (one object per
//! step, `val_loss_{block}` on evaluation steps) and a PNG plot of the train
//! and val loss of every exit.

use std::io::Write;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

use crate::model::config::Config;

/// A named series of (x, y) points; thick when the flag is set.
pub type Curve = (String, Vec<(f64, f64)>, bool);

pub fn progress(total: u64, pos: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_position(pos);
    pb
}

pub fn append_log(path: &Path, rec: &serde_json::Value) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{rec}")
}

/// Drops log lines past `step` (a run killed after its last checkpoint).
pub fn truncate_log(path: &Path, step: u64) -> std::io::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(path, body)
}

/// Reads `(x, y)` series `key` from a JSONL log.
pub fn series(path: &Path, key: &str) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_f64()?, v[key].as_f64()?))
        })
        .collect()
}

/// Registers a system sans-serif font for plot labels when one exists;
/// without it the plot is drawn without text.
fn register_font() -> bool {
    for p in [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ] {
        if let Ok(bytes) = std::fs::read(p) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                bytes,
            )
            .is_ok();
        }
    }
    false
}

/// Loss per exit vs step: thin lines for train, thick for val.
pub fn plot(log: &Path, png: &Path, cfg: &Config) -> anyhow::Result<()> {
    let curves: Vec<Curve> = cfg
        .exits
        .iter()
        .flat_map(|e| {
            [
                (
                    format!("train exit {}", e.block),
                    smooth(&series(log, &format!("train_loss_{}", e.block)), 20),
                    false,
                ),
                (
                    format!("val exit {}", e.block),
                    series(log, &format!("val_loss_{}", e.block)),
                    true,
                ),
            ]
        })
        .filter(|c| !c.1.is_empty())
        .collect();
    multi_plot(png, "loss per exit", "step", &curves)
}

/// Trailing moving average over `k` points.
pub fn smooth(xs: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    (0..xs.len())
        .map(|i| {
            let lo = i.saturating_sub(k - 1);
            let w = &xs[lo..=i];
            (xs[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect()
}

/// A line plot of named series (thick when the flag is set).
pub fn multi_plot(png: &Path, title: &str, x_label: &str, curves: &[Curve]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let pts = curves.iter().flat_map(|c| c.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        if y.is_finite() {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
    }
    if x0 > x1 {
        anyhow::bail!("nothing to plot");
    }
    let text = register_font();
    let root = BitMapBackend::new(png, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut b = ChartBuilder::on(&root);
    b.margin(15)
        .x_label_area_size(if text { 35 } else { 5 })
        .y_label_area_size(if text { 50 } else { 5 });
    if text {
        b.caption(title, ("sans-serif", 22));
    }
    let mut chart = b.build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - 0.05)..(y1 + 0.05))?;
    if text {
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("loss")
            .draw()?;
    }
    for (i, (name, pts, thick)) in curves.iter().enumerate() {
        let color = Palette99::pick(i / 2 * 2 + usize::from(*thick)).to_rgba();
        let style = ShapeStyle {
            color,
            filled: false,
            stroke_width: if *thick { 3 } else { 1 },
        };
        let s = chart.draw_series(LineSeries::new(pts.iter().copied(), style))?;
        if text {
            s.label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
