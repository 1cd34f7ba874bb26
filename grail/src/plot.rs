//! The run's plot: mean reward per step and held-out accuracy, as a PNG (plotters).

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// Registers a system sans-serif font for plot text (plotters' ab_glyph backend has none built in).
fn register_font() -> Result<()> {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    let bytes = candidates
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or_else(|| anyhow!("no DejaVuSans.ttf found (install fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("bad font file"))
}

/// Draws reward (per step) and held-out accuracy (where measured, plus before/after) to `path`.
pub fn plot_curves(
    path: &Path,
    curve: &[(usize, f64, Option<f64>)],
    baseline: f64,
    final_acc: f64,
) -> Result<PathBuf> {
    register_font()?;
    let steps = curve.last().map_or(1, |c| c.0).max(1);
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "grail GRPO: reward and held-out accuracy",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..steps as f64, 0f64..1.1f64)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("GRPO step")
        .y_desc("value")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(
            curve.iter().map(|c| (c.0 as f64, c.1)),
            &BLUE,
        ))
        .map_err(|e| anyhow!("{e}"))?
        .label("mean reward (train)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE));
    let mut acc: Vec<(f64, f64)> = vec![(0.0, baseline)];
    acc.extend(curve.iter().filter_map(|c| c.2.map(|a| (c.0 as f64, a))));
    acc.push((steps as f64, final_acc));
    chart
        .draw_series(LineSeries::new(acc.clone(), RED.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?
        .label("held-out accuracy")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
    chart
        .draw_series(acc.iter().map(|&p| Circle::new(p, 3, RED.filled())))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(path.to_path_buf())
}
