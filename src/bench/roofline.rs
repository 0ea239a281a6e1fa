//! The roofline plot of a report: achieved GFLOP/s against arithmetic intensity (FLOP per byte
//! moved) on log axes, under the measured streaming-read roof and the measured f32 FMA ceiling.

use std::path::Path;

use plotters::prelude::*;

use crate::bench::entry::{Entry, Group, Timing};
use crate::bench::report::{Report, write_file};
use crate::error::{Error, Result};

const SIZE: (u32, u32) = (960, 640);

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(format!("drawing the roofline plot: {e}")),
    }
}

/// The plotted point of an entry: (FLOP/byte, GFLOP/s), for GPU-timed entries that move bytes
/// and do arithmetic.
fn point(e: &Entry) -> Option<(f64, f64)> {
    let gflops = e.gflop_per_s?;
    (e.timing == Timing::GpuTimestamps && e.bytes > 0.0).then(|| (e.flops / e.bytes, gflops))
}

fn group_style(group: Group) -> (&'static str, RGBColor) {
    match group {
        Group::Yardstick => ("dense f16", RGBColor(120, 120, 120)),
        Group::Base => ("quantized matmul", RGBColor(31, 119, 180)),
        Group::Layer => ("layer (+ adapter)", RGBColor(214, 39, 40)),
        Group::Mixed => ("mixed adapters", RGBColor(44, 160, 44)),
        Group::Merge => ("merge", RGBColor(148, 103, 189)),
    }
}

/// Writes the plot of `report` to `path` as SVG.
pub fn write_svg(report: &Report, path: &Path) -> Result<()> {
    let mut svg = String::new();
    draw(report, &mut svg).map_err(|e| plot_error(path, e))?;
    write_file(path, svg.as_bytes())
}

fn draw(report: &Report, svg: &mut String) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let bandwidth = report.read_gb_per_s;
    let peak = report.fma_gflop_per_s;
    let points: Vec<(Group, (f64, f64))> = report
        .entries
        .iter()
        .filter_map(|e| point(e).map(|p| (e.group, p)))
        .collect();
    if points.is_empty() || !(bandwidth > 0.0 && peak > 0.0) {
        return Err("no timed matmul and yardsticks to plot".into());
    }
    let ridge = peak / bandwidth;
    let x_min = points.iter().map(|(_, p)| p.0).fold(ridge, f64::min) / 2.0;
    let x_max = points.iter().map(|(_, p)| p.0).fold(ridge, f64::max) * 2.0;
    let y_min = points.iter().map(|(_, p)| p.1).fold(peak, f64::min) / 2.0;
    let y_max = points.iter().map(|(_, p)| p.1).fold(peak, f64::max) * 2.0;

    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "Roofline: {} ({} scale, {})",
        report.device.split(" (").next().unwrap_or(&report.device),
        report.scale.name(),
        report.date
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x_min..x_max).log_scale(), (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("arithmetic intensity (FLOP per byte moved)")
        .y_desc("GFLOP/s")
        .draw()?;

    let roof = [(x_min, bandwidth * x_min), (ridge, peak), (x_max, peak)];
    chart
        .draw_series(LineSeries::new(roof, BLACK.stroke_width(2)))?
        .label(format!(
            "roof: streaming read {bandwidth:.1} GB/s, f32 FMA {peak:.1} GFLOP/s"
        ))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));

    for group in [Group::Yardstick, Group::Base, Group::Layer, Group::Mixed] {
        let (label, color) = group_style(group);
        let members: Vec<(f64, f64)> = points
            .iter()
            .filter(|(g, _)| *g == group)
            .map(|(_, p)| *p)
            .collect();
        if members.is_empty() {
            continue;
        }
        chart
            .draw_series(
                members
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )?
            .label(label)
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
