//! `cohort-coordinator plot`: loss curves (and, for federated jobs with DP,
//! epsilon spent) from a run directory's `metrics.jsonl`, drawn to an SVG
//! with plotters, so a person can look at a run instead of reading it.
//!
//! Only per-round lines are drawn; the `resumed`, `final` and
//! `budget_exhausted` lines are skipped. A round that a resumed job ran again
//! has two lines: the later one wins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a JSON object: {source}")]
    Parse {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{0} has no per-round lines yet: nothing to plot")]
    NoRounds(PathBuf),
    #[error("cannot draw {out} as {extension:?}: only .svg is supported (PNG would need a font library this build leaves out)")]
    Format { out: PathBuf, extension: String },
    #[error("drawing {out} failed: {message}")]
    Draw { out: PathBuf, message: String },
}

/// One committed round's line of `metrics.jsonl`, as far as plots go.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundPoint {
    pub round: u64,
    pub mean_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub epsilon_spent: Option<f64>,
}

/// The lines that are not rounds.
const NOT_ROUNDS: [&str; 3] = ["resumed", "final", "budget_exhausted"];

/// The rounds of a `metrics.jsonl`, in round order; a round listed twice
/// (run again after a resume) keeps its last line. A torn last line (a crash
/// mid-write) is ignored.
pub fn read_rounds(path: &Path) -> Result<Vec<RoundPoint>, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read {
        path: path.to_owned(),
        source,
    })?;
    let lines: Vec<&str> = text.lines().collect();
    let mut rounds = BTreeMap::new();
    for (index, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(value) => value,
            Err(_) if index + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(source) => {
                return Err(PlotError::Parse {
                    path: path.to_owned(),
                    line: index + 1,
                    source,
                })
            }
        };
        if NOT_ROUNDS.iter().any(|key| value.get(key).is_some()) {
            continue;
        }
        let Some(round) = value.get("round").and_then(serde_json::Value::as_u64) else {
            continue;
        };
        let number = |key: &str| value.get(key).and_then(serde_json::Value::as_f64);
        rounds.insert(
            round,
            RoundPoint {
                round,
                mean_loss: number("mean_loss"),
                eval_loss: number("eval_loss"),
                epsilon_spent: number("epsilon_spent"),
            },
        );
    }
    Ok(rounds.into_values().collect())
}

/// A padded range around `values` (never empty).
fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !low.is_finite() || !high.is_finite() {
        return 0.0..1.0;
    }
    let pad = if high > low { (high - low) * 0.05 } else { 0.5 };
    (low - pad)..(high + pad)
}

fn series(points: &[RoundPoint], pick: fn(&RoundPoint) -> Option<f64>) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter_map(|p| {
            pick(p)
                .filter(|v| v.is_finite())
                .map(|v| (p.round as f64, v))
        })
        .collect()
}

/// Draws the loss curves (training loss, and held-out loss where rounds
/// evaluated) and, when the rounds carry it, epsilon spent on a second
/// panel, to `out` (an `.svg` file).
pub fn render(points: &[RoundPoint], title: &str, out: &Path) -> Result<(), PlotError> {
    let extension = out
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if extension != "svg" {
        return Err(PlotError::Format {
            out: out.to_owned(),
            extension,
        });
    }
    let draw_error = |e: &dyn std::fmt::Display| PlotError::Draw {
        out: out.to_owned(),
        message: e.to_string(),
    };
    let train = series(points, |p| p.mean_loss);
    let eval = series(points, |p| p.eval_loss);
    let epsilon = series(points, |p| p.epsilon_spent);
    let first = points.first().map_or(0, |p| p.round) as f64;
    let last = points.last().map_or(1, |p| p.round) as f64;
    let rounds = if last > first {
        first..last
    } else {
        (first - 1.0)..(last + 1.0)
    };

    let height = if epsilon.is_empty() { 480 } else { 800 };
    let root = SVGBackend::new(out, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_error(&e))?;
    let (loss_area, epsilon_area) = if epsilon.is_empty() {
        (root.clone(), None)
    } else {
        let (top, bottom) = root.split_vertically(height / 2 + 40);
        (top, Some(bottom))
    };

    let mut chart = ChartBuilder::on(&loss_area)
        .caption(format!("{title}: loss"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(
            rounds.clone(),
            range(train.iter().chain(&eval).map(|(_, v)| *v)),
        )
        .map_err(|e| draw_error(&e))?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("loss")
        .draw()
        .map_err(|e| draw_error(&e))?;
    for (values, color, label) in [(&train, BLUE, "train loss"), (&eval, RED, "eval loss")] {
        if values.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(
                values.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| draw_error(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_error(&e))?;

    if let Some(area) = epsilon_area {
        let top = epsilon.iter().map(|(_, v)| *v).fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(&area)
            .caption("epsilon spent", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(rounds, 0.0..(top * 1.05).max(1e-6))
            .map_err(|e| draw_error(&e))?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc("epsilon")
            .draw()
            .map_err(|e| draw_error(&e))?;
        chart
            .draw_series(LineSeries::new(epsilon, GREEN.stroke_width(2)))
            .map_err(|e| draw_error(&e))?;
    }
    root.present().map_err(|e| draw_error(&e))?;
    Ok(())
}

/// `plot --run-dir DIR --out FILE.svg`: reads `DIR/metrics.jsonl` and draws it.
/// Returns how many rounds were drawn.
pub fn plot_run(run_dir: &Path, out: &Path) -> Result<usize, PlotError> {
    let metrics = run_dir.join("metrics.jsonl");
    let points = read_rounds(&metrics)?;
    if points.is_empty() {
        return Err(PlotError::NoRounds(metrics));
    }
    let title = run_dir
        .file_name()
        .map_or("run".to_string(), |n| n.to_string_lossy().into_owned());
    render(&points, &title, out)?;
    Ok(points.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_skip_other_lines_and_a_rerun_round_keeps_its_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"round\":1,\"mean_loss\":5.0,\"eval_loss\":null}\n",
                "{\"round\":2,\"mean_loss\":4.0}\n",
                "{\"resumed\":true,\"version\":1,\"next_round\":2}\n",
                "{\"round\":2,\"mean_loss\":3.9,\"eval_loss\":4.1}\n",
                "{\"budget_exhausted\":true,\"epsilon_spent\":1.0}\n",
                "{\"final\":true,\"version\":2,\"eval_loss\":3.8}\n",
                "{\"round\":3,\"mean_lo",
            ),
        )
        .unwrap();
        let rounds = read_rounds(&path).unwrap();
        assert_eq!(
            rounds,
            vec![
                RoundPoint {
                    round: 1,
                    mean_loss: Some(5.0),
                    ..RoundPoint::default()
                },
                RoundPoint {
                    round: 2,
                    mean_loss: Some(3.9),
                    eval_loss: Some(4.1),
                    ..RoundPoint::default()
                },
            ]
        );
    }

    #[test]
    fn only_svg_is_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let points = [RoundPoint {
            round: 1,
            mean_loss: Some(1.0),
            ..RoundPoint::default()
        }];
        let error = render(&points, "t", &dir.path().join("out.png")).unwrap_err();
        assert!(matches!(error, PlotError::Format { .. }), "{error}");
    }
}
