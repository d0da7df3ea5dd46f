//! `cohort-coordinator plot`: loss curves (and, for classification jobs,
//! held-out accuracy; for federated jobs with DP, epsilon spent) from a run
//! directory's `metrics.jsonl`, drawn to an SVG with plotters, so a person
//! can look at a run instead of reading it.
//!
//! Per-round lines are drawn as curves; the `resumed` and
//! `budget_exhausted` lines are skipped, and of the `final` line only its
//! held-out accuracy is drawn (one marker, at the round that made the version
//! it evaluated). A round that a resumed job ran again has two lines: the
//! later one wins.

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
    #[error("{path}:{line}: eval_accuracy {value} is not a fraction in [0, 1]")]
    Accuracy {
        path: PathBuf,
        line: usize,
        value: f64,
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
    /// Held-out accuracy, a fraction in [0, 1] (classification jobs only).
    pub eval_accuracy: Option<f64>,
    pub epsilon_spent: Option<f64>,
}

/// The final evaluation's held-out accuracy, at the round whose commit made
/// the version it evaluated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FinalAccuracy {
    pub round: u64,
    pub accuracy: f64,
}

/// What `plot` draws from a `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Run {
    /// In round order.
    pub rounds: Vec<RoundPoint>,
    /// From the last `final` line, when it carries an accuracy and a round
    /// line made the version it names.
    pub final_accuracy: Option<FinalAccuracy>,
}

/// The lines that are not rounds.
const NOT_ROUNDS: [&str; 3] = ["resumed", "final", "budget_exhausted"];

/// A line's `eval_accuracy`: absent, null or not a number reads as none (as
/// for every other field here); a number outside [0, 1] is refused.
fn accuracy(value: &serde_json::Value, path: &Path, line: usize) -> Result<Option<f64>, PlotError> {
    match value
        .get("eval_accuracy")
        .and_then(serde_json::Value::as_f64)
    {
        Some(fraction) if !(0.0..=1.0).contains(&fraction) => Err(PlotError::Accuracy {
            path: path.to_owned(),
            line,
            value: fraction,
        }),
        fraction => Ok(fraction),
    }
}

/// The rounds of a `metrics.jsonl`, in round order, and the final
/// evaluation's accuracy; a round listed twice (run again after a resume)
/// keeps its last line, and so does `final`. A torn last line (a crash
/// mid-write) is ignored.
pub fn read_run(path: &Path) -> Result<Run, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read {
        path: path.to_owned(),
        source,
    })?;
    let lines: Vec<&str> = text.lines().collect();
    let mut rounds = BTreeMap::new();
    // The last `final` line's (version, accuracy).
    let mut last_final = None;
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
        if value.get("final").is_some() {
            let version = value.get("version").and_then(serde_json::Value::as_u64);
            last_final = Some((version, accuracy(&value, path, index + 1)?));
            continue;
        }
        if NOT_ROUNDS.iter().any(|key| value.get(key).is_some()) {
            continue;
        }
        let Some(round) = value.get("round").and_then(serde_json::Value::as_u64) else {
            continue;
        };
        let number = |key: &str| value.get(key).and_then(serde_json::Value::as_f64);
        let point = RoundPoint {
            round,
            mean_loss: number("mean_loss"),
            eval_loss: number("eval_loss"),
            eval_accuracy: accuracy(&value, path, index + 1)?,
            epsilon_spent: number("epsilon_spent"),
        };
        let version = value.get("version").and_then(serde_json::Value::as_u64);
        rounds.insert(round, (point, version));
    }
    let final_accuracy = match last_final {
        Some((Some(version), Some(accuracy))) => rounds
            .values()
            .rev()
            .find(|(_, v)| *v == Some(version))
            .map(|(point, _)| FinalAccuracy {
                round: point.round,
                accuracy,
            }),
        _ => None,
    };
    Ok(Run {
        rounds: rounds.into_values().map(|(point, _)| point).collect(),
        final_accuracy,
    })
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

/// The colour of the accuracy curve and of the final evaluation's marker.
const ACCURACY: RGBColor = RGBColor(128, 0, 128);

/// The loss panel's height when other panels sit under it, and theirs.
const LOSS_HEIGHT: u32 = 440;
const PANEL_HEIGHT: u32 = 360;

/// Draws the loss curves (training loss, and held-out loss where rounds
/// evaluated) and, when the run carries them, held-out accuracy (in %, with
/// the final evaluation as a marker) and epsilon spent on panels under it,
/// to `out` (an `.svg` file).
pub fn render(run: &Run, title: &str, out: &Path) -> Result<(), PlotError> {
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
    let points = &run.rounds;
    let train = series(points, |p| p.mean_loss);
    let eval = series(points, |p| p.eval_loss);
    let accuracy: Vec<(f64, f64)> = series(points, |p| p.eval_accuracy)
        .into_iter()
        .map(|(round, fraction)| (round, fraction * 100.0))
        .collect();
    let final_accuracy = run
        .final_accuracy
        .map(|f| (f.round as f64, f.accuracy * 100.0));
    let epsilon = series(points, |p| p.epsilon_spent);
    let first = points.first().map_or(0, |p| p.round) as f64;
    let last = points.last().map_or(1, |p| p.round) as f64;
    let rounds = if last > first {
        first..last
    } else {
        (first - 1.0)..(last + 1.0)
    };

    let has_accuracy = !accuracy.is_empty() || final_accuracy.is_some();
    let panels = u32::from(has_accuracy) + u32::from(!epsilon.is_empty());
    let height = if panels == 0 {
        480
    } else {
        LOSS_HEIGHT + PANEL_HEIGHT * panels
    };
    let root = SVGBackend::new(out, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_error(&e))?;
    let (loss_area, mut rest) = if panels == 0 {
        (root.clone(), None)
    } else {
        let (top, bottom) = root.split_vertically(LOSS_HEIGHT);
        (top, Some(bottom))
    };
    let accuracy_area = if has_accuracy {
        let area = rest.take().expect("a panel under the loss");
        if epsilon.is_empty() {
            Some(area)
        } else {
            let (top, bottom) = area.split_vertically(PANEL_HEIGHT);
            rest = Some(bottom);
            Some(top)
        }
    } else {
        None
    };
    let epsilon_area = rest;

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

    if let Some(area) = accuracy_area {
        let mut chart = ChartBuilder::on(&area)
            .caption("held-out accuracy", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(rounds.clone(), 0.0..100.0)
            .map_err(|e| draw_error(&e))?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc("accuracy (%)")
            .y_label_formatter(&|percent| format!("{percent:.0}"))
            .draw()
            .map_err(|e| draw_error(&e))?;
        if !accuracy.is_empty() {
            chart
                .draw_series(LineSeries::new(accuracy, ACCURACY.stroke_width(2)))
                .map_err(|e| draw_error(&e))?
                .label("eval accuracy")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], ACCURACY));
        }
        if let Some((round, percent)) = final_accuracy {
            chart
                .draw_series(std::iter::once(Circle::new(
                    (round, percent),
                    5,
                    ACCURACY.filled(),
                )))
                .map_err(|e| draw_error(&e))?
                .label(format!("final eval accuracy: {percent:.1}%"))
                .legend(|(x, y)| Circle::new((x + 10, y), 4, ACCURACY.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_error(&e))?;
    }

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
    let run = read_run(&metrics)?;
    if run.rounds.is_empty() {
        return Err(PlotError::NoRounds(metrics));
    }
    let title = run_dir
        .file_name()
        .map_or("run".to_string(), |n| n.to_string_lossy().into_owned());
    render(&run, &title, out)?;
    Ok(run.rounds.len())
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
        let run = read_run(&path).unwrap();
        assert_eq!(run.final_accuracy, None);
        let rounds = run.rounds;
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
        let run = Run {
            rounds: vec![RoundPoint {
                round: 1,
                mean_loss: Some(1.0),
                ..RoundPoint::default()
            }],
            final_accuracy: None,
        };
        let error = render(&run, "t", &dir.path().join("out.png")).unwrap_err();
        assert!(matches!(error, PlotError::Format { .. }), "{error}");
    }

    fn read(text: &str) -> Result<Run, PlotError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, text).unwrap();
        read_run(&path)
    }

    #[test]
    fn accuracy_is_read_and_the_final_one_sits_at_the_round_that_made_its_version() {
        let run = read(concat!(
            "{\"round\":1,\"version\":1,\"sampled\":2,\"eval_accuracy\":0.5}\n",
            "{\"round\":2,\"version\":2,\"sampled\":2,\"eval_accuracy\":null}\n",
            "{\"round\":4,\"version\":3,\"sampled\":2,\"eval_accuracy\":1}\n",
            "{\"round\":5,\"version\":4,\"sampled\":2}\n",
            "{\"final\":true,\"version\":3,\"rounds\":3,\"eval_accuracy\":0.75}\n",
        ))
        .unwrap();
        let accuracy: Vec<_> = run.rounds.iter().map(|p| p.eval_accuracy).collect();
        assert_eq!(accuracy, [Some(0.5), None, Some(1.0), None]);
        // Round 3 aborted (no line), so version 3 is round 4's: not round 3,
        // nor the "rounds" count, nor the last round drawn.
        assert_eq!(
            run.final_accuracy,
            Some(FinalAccuracy {
                round: 4,
                accuracy: 0.75
            })
        );
    }

    #[test]
    fn the_last_final_line_wins_and_an_unplaceable_one_is_left_out() {
        let run = read(concat!(
            "{\"round\":1,\"version\":1,\"eval_accuracy\":0.5}\n",
            "{\"final\":true,\"version\":1,\"eval_accuracy\":0.6}\n",
            "{\"final\":true,\"version\":1,\"eval_accuracy\":null}\n",
        ))
        .unwrap();
        assert_eq!(run.final_accuracy, None);
        let run = read(concat!(
            "{\"round\":1,\"version\":1,\"eval_accuracy\":0.5}\n",
            "{\"final\":true,\"version\":7,\"eval_accuracy\":0.6}\n",
        ))
        .unwrap();
        assert_eq!(run.final_accuracy, None, "no round made version 7");
        assert_eq!(run.rounds[0].eval_accuracy, Some(0.5));
    }

    #[test]
    fn accuracy_outside_zero_to_one_is_refused_with_its_line_and_a_non_number_is_none() {
        for (text, line, value) in [
            (
                "{\"round\":1,\"eval_accuracy\":0.5}\n{\"round\":2,\"eval_accuracy\":66.1}\n",
                2,
                66.1,
            ),
            ("{\"round\":1,\"eval_accuracy\":-0.01}\n", 1, -0.01),
            (
                "{\"round\":1,\"version\":1}\n{\"final\":true,\"version\":1,\"eval_accuracy\":1.5}\n",
                2,
                1.5,
            ),
        ] {
            let error = read(text).unwrap_err();
            match &error {
                PlotError::Accuracy {
                    line: l, value: v, ..
                } => assert_eq!((*l, *v), (line, value), "{text}"),
                other => panic!("{text}: {other}"),
            }
            let message = error.to_string();
            assert!(
                message.contains(&format!("metrics.jsonl:{line}: eval_accuracy {value} is not a fraction in [0, 1]")),
                "{message}"
            );
        }
        // Like a loss or epsilon that is not a number: read as none.
        let run = read(concat!(
            "{\"round\":1,\"eval_accuracy\":\"0.5\",\"eval_loss\":\"2.0\"}\n",
            "{\"round\":2,\"eval_accuracy\":true}\n",
        ))
        .unwrap();
        assert!(run.rounds.iter().all(|p| p.eval_accuracy.is_none()));
        assert_eq!(run.rounds[0].eval_loss, None);
    }
}
