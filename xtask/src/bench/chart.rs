//! `--chart`: median time and peak RSS against db size (two panels), one colour per scenario, ours
//! solid and the reference dashed. A PNG drawn with plotters' bitmap backend; its text is rendered with
//! ab_glyph from a TrueType font found on the machine (Debian `fonts-dejavu-core`), so no system
//! library is linked.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::{Row, Scenario};

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// The font the chart's text is drawn with; checked before measuring, so that `--chart` fails early.
pub fn font() -> Result<PathBuf> {
    FONT_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("--chart needs a TrueType font and found none (install Debian's fonts-dejavu-core)")
}

fn register_font() -> Result<()> {
    let path = font()?;
    let bytes: &'static [u8] =
        Box::leak(std::fs::read(&path).with_context(|| format!("read {}", path.display()))?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a font ab_glyph can read", path.display()))
}

fn colour(s: Scenario) -> RGBColor {
    match s {
        Scenario::Limit => RGBColor(0, 0, 0),
        Scenario::Save => RGBColor(31, 119, 180),
        Scenario::SaveS3 => RGBColor(214, 39, 40),
        Scenario::Restore => RGBColor(44, 160, 44),
        Scenario::RestoreNoBump => RGBColor(227, 119, 194),
        Scenario::Status => RGBColor(148, 103, 189),
        Scenario::StatusFast => RGBColor(255, 127, 14),
        Scenario::SaveS3Age => RGBColor(140, 86, 75),
        Scenario::RestoreS3 => RGBColor(23, 190, 207),
        Scenario::DeltaOverhead | Scenario::Replay => RGBColor(127, 127, 127), // never charted: not per size
    }
}

/// `sizes`: each db size (MiB of values) with its rows, in increasing size; at least two. Two
/// panels: median time, and peak RSS (ours: the largest of our runs; the reference's likewise).
pub fn draw(png: &Path, sizes: &[(usize, &[Row])]) -> Result<()> {
    register_font()?;
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| sizes.iter().all(|(_, rows)| rows.iter().any(|r| r.scenario == *s)))
        .collect();
    let root = BitMapBackend::new(png, (1000, 1250)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(650);
    panel(
        &top,
        sizes,
        &scenarios,
        "k3s-snapshot vs etcd tools: median time by db size (solid: ours, dashed: reference)",
        "seconds",
        (Row::ours_median, Row::reference_median),
        false,
    )?;
    panel(
        &bottom,
        sizes,
        &scenarios,
        "peak RSS by db size (solid: ours, dashed: reference)",
        "MiB",
        (
            |r: &Row| r.our_peak_kib() as f64 / 1024.0,
            |r: &Row| r.reference_rss_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
        ),
        true,
    )?;
    root.present().map_err(|e| anyhow::anyhow!("write {}: {e}", png.display()))?;
    Ok(())
}

type Pick = fn(&Row) -> f64;

/// One panel: `value.0` (ours, solid) and `value.1` (reference, dashed) of every scenario
/// against db size. With `cap`, a reference series far above all of ours (etcdutl maps the whole
/// db, so its RSS is the db's size) is not drawn, only named with its largest value, so that the
/// scale stays readable for the rest.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    sizes: &[(usize, &[Row])],
    scenarios: &[Scenario],
    caption: &str,
    unit: &str,
    value: (Pick, Pick),
    cap: bool,
) -> Result<()> {
    let x_max = sizes.iter().map(|(s, _)| *s).max().unwrap_or(1) as f64 * 1.05;
    let max_of = |f: Pick, s: Option<Scenario>| {
        sizes
            .iter()
            .flat_map(|(_, rows)| rows.iter().filter(|r| s.is_none_or(|s| r.scenario == s)).map(f))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
    };
    let ours_max = max_of(value.0, None);
    let off_scale = |s: Scenario| cap && max_of(value.1, Some(s)) > 4.0 * ours_max;
    let y_max = scenarios
        .iter()
        .map(|&s| {
            let ours = max_of(value.0, Some(s));
            if off_scale(s) {
                ours
            } else {
                ours.max(max_of(value.1, Some(s)))
            }
        })
        .fold(0.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max.max(0.1))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("MiB of values in etcd")
        .y_desc(unit)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for &s in scenarios {
        let c = colour(s);
        let pick = |f: Pick| -> Vec<(f64, f64)> {
            sizes
                .iter()
                .filter_map(|(size, rows)| rows.iter().find(|r| r.scenario == s).map(|r| (*size as f64, f(r))))
                .collect()
        };
        let ours = pick(value.0);
        let reference = pick(value.1);
        if off_scale(s) {
            let top = max_of(value.1, Some(s));
            chart
                .draw_series(LineSeries::new(ours.clone(), c.stroke_width(3)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(format!("{} (ours); {}: up to {top:.0} {unit}, off the scale", s.key(), s.reference()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
            chart
                .draw_series(ours.iter().map(|p| Circle::new(*p, 4, c.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            continue;
        }
        chart
            .draw_series(LineSeries::new(ours.clone(), c.stroke_width(3)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("{} (ours)", s.key()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(ours.iter().map(|p| Circle::new(*p, 4, c.filled()))).map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(DashedLineSeries::new(reference, 8, 6, c.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(s.reference().to_string())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 8, y), (x + 12, y), (x + 20, y)], c.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .position(if cap { SeriesLabelPosition::LowerRight } else { SeriesLabelPosition::UpperLeft })
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// `replay`: the whole reset's median time against the chain's length, both on log scales, one
/// series per replay path and etcd version (`rows`: the `replay` scenario's `rows` in
/// `results.json`).
pub fn draw_replay(png: &Path, rows: &[serde_json::Value]) -> Result<()> {
    register_font()?;
    let point = |r: &serde_json::Value| Some((r["revisions"].as_f64()?, r["median_s"].as_f64()?));
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let name = format!("{} replay, etcd {}", r["path"].as_str().unwrap_or("?"), r["etcd"].as_str().unwrap_or("?"));
        let Some(p) = point(r) else { continue };
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, ps)) => ps.push(p),
            None => series.push((name, vec![p])),
        }
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = series.iter().flat_map(|(_, ps)| ps.iter().copied()).unzip();
    let x = (xs.iter().copied().fold(f64::MAX, f64::min) * 0.7, xs.iter().copied().fold(1.0, f64::max) * 1.4);
    let y = (ys.iter().copied().fold(f64::MAX, f64::min) * 0.7, ys.iter().copied().fold(1.0, f64::max) * 1.4);
    let root = BitMapBackend::new(png, (1000, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("restore of latest + its delta chain: median seconds by chain length", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((x.0..x.1).log_scale(), (y.0..y.1).log_scale())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("revisions in the chain")
        .y_desc("seconds, whole reset")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let colours = [RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(31, 119, 180), RGBColor(255, 127, 14)];
    for (i, (name, mut ps)) in series.into_iter().enumerate() {
        ps.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(ps.clone(), c.stroke_width(3)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(ps.iter().map(|p| Circle::new(*p, 5, c.filled()))).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("write {}: {e}", png.display()))?;
    Ok(())
}
