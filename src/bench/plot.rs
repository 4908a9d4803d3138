//! `--plot FILE.svg`: the latency percentiles of each target side by side, and beside
//! them what failed.

use std::path::Path;

use plotters::prelude::*;

use super::{Latency, Report, Run};

/// Which latency a scenario is judged by.
fn headline(run: &Run) -> Option<(&'static str, Latency)> {
    run.end_to_end
        .map(|l| ("end-to-end", l))
        .or(run.query.map(|l| ("query", l)))
        .or(run.connect.map(|l| ("connect", l)))
}

const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

pub fn svg(report: &Report, path: &Path) -> Result<(), String> {
    draw(report, path).map_err(|e| format!("plot {}: {e}", path.display()))
}

fn draw(report: &Report, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let percentiles = ["p50", "p95", "p99", "max"];
    let runs: Vec<(&Run, &'static str, Latency)> = report
        .runs
        .iter()
        .filter_map(|r| headline(r).map(|(what, l)| (r, what, l)))
        .collect();
    let what = runs.first().map_or("latency", |r| r.1);
    let top_ms = runs
        .iter()
        .map(|(_, _, l)| l.max_us as f64 / 1000.0)
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&left)
        .caption(
            format!("{}: {what} latency (ms)", report.scenario),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..percentiles.len() as f64, 0f64..top_ms)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(percentiles.len() * 2 + 1)
        .x_label_formatter(&|x| category_label(*x, &percentiles))
        .draw()?;
    let width = 0.8 / runs.len().max(1) as f64;
    for (n, (run, _, l)) in runs.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        let values = [l.p50_us, l.p95_us, l.p99_us, l.max_us];
        chart
            .draw_series(values.iter().enumerate().map(|(i, us)| {
                let x0 = i as f64 + 0.1 + width * n as f64;
                Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.95, *us as f64 / 1000.0)],
                    colour.filled(),
                )
            }))?
            .label(format!("{} ({})", run.label, run.address))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;

    let failed_top = report
        .runs
        .iter()
        .map(|r| r.failed + r.completed)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut outcomes = ChartBuilder::on(&right)
        .caption("completed / failed", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(
            0f64..report.runs.len().max(1) as f64,
            0f64..failed_top * 1.1,
        )?;
    let labels: Vec<String> = report.runs.iter().map(|r| r.label.clone()).collect();
    outcomes
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels.len() * 2 + 1)
        .x_label_formatter(&|x| category_label(*x, &labels))
        .draw()?;
    for (i, run) in report.runs.iter().enumerate() {
        let x0 = i as f64 + 0.2;
        let ok = run.completed as f64;
        outcomes.draw_series([
            Rectangle::new([(x0, 0.0), (x0 + 0.6, ok)], COLOURS[2].filled()),
            Rectangle::new(
                [(x0, ok), (x0 + 0.6, ok + run.failed as f64)],
                RGBColor(214, 39, 40).filled(),
            ),
        ])?;
    }
    root.present()?;
    Ok(())
}

/// The name of bar group `i` at the tick in its middle (`i + 0.5`); nothing at the others.
fn category_label(x: f64, names: &[impl AsRef<str>]) -> String {
    let i = x.floor() as usize;
    match names.get(i) {
        Some(name) if (x - x.floor() - 0.5).abs() < 0.01 => name.as_ref().to_owned(),
        _ => String::new(),
    }
}
