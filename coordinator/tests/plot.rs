//! `cohort-coordinator plot`: a synthetic `metrics.jsonl` (pretraining and
//! federated lines, with the lines that are not rounds) drawn to SVG by the
//! real binary: a polyline per curve, with its labels.

use std::process::Command;

fn plot(run_dir: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"))
        .args(["plot", "--run-dir"])
        .arg(run_dir)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// The points of the curves drawn in `color` (legend marks are thinner).
fn curves(svg: &str, color: &str) -> Vec<usize> {
    let style = format!("stroke=\"{color}\" stroke-width=\"2\"");
    svg.lines()
        .filter(|l| l.starts_with("<polyline") && l.contains(&style))
        .map(|l| {
            let points = l.split("points=\"").nth(1).unwrap_or("");
            points
                .split_whitespace()
                .filter(|p| p.contains(','))
                .count()
        })
        .collect()
}

const BLUE: &str = "#0000FF";
const RED: &str = "#FF0000";
const GREEN: &str = "#00FF00";

#[test]
fn pretraining_losses_are_drawn_as_two_curves() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (1..=6)
        .map(|round| {
            let eval = if round % 2 == 1 {
                format!("{}", 6.0 - round as f64 * 0.4)
            } else {
                "null".to_string()
            };
            format!(
                r#"{{"round":{round},"version":{round},"participants":2,"mean_loss":{},"eval_loss":{eval},"tokens":128,"wall_seconds":0.5,"epoch":0}}"#,
                5.5 - round as f64 * 0.5
            )
        })
        .chain([
            r#"{"resumed":true,"version":6,"next_round":7,"committed_rounds":6}"#.to_string(),
            r#"{"final":true,"version":6,"rounds":6,"epochs":0,"eval_loss":3.1}"#.to_string(),
        ])
        .collect();
    std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("curves.svg");
    let output = plot(dir.path(), &out);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert_eq!(curves(&svg, BLUE), [6], "train loss, every round:\n{svg}");
    assert_eq!(
        curves(&svg, RED),
        [3],
        "eval loss, the rounds that evaluated"
    );
    assert_eq!(curves(&svg, GREEN), [0; 0]);
    for label in ["train loss", "eval loss", "round", "loss"] {
        assert!(svg.lines().any(|l| l == label), "{label:?} missing");
    }
    assert!(!svg.contains("epsilon"), "no epsilon panel for pretraining");
}

#[test]
fn federated_runs_get_an_epsilon_panel() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> = (1..=5)
        .map(|round| {
            format!(
                r#"{{"round":{round},"version":{round},"sampled":3,"participants":3,"mean_loss":4.0,"eval_loss":{},"epsilon_spent":{},"epsilon_remaining":{},"delta":1e-5}}"#,
                4.0 - round as f64 * 0.1,
                round as f64 * 0.3,
                2.0 - round as f64 * 0.3
            )
        })
        .collect();
    lines.push(
        r#"{"budget_exhausted":true,"epsilon_spent":1.5,"epsilon_if_next_round":1.8,"epsilon_budget":2.0,"delta":1e-5}"#
            .to_string(),
    );
    std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("curves.svg");
    let output = plot(dir.path(), &out);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let svg = std::fs::read_to_string(&out).unwrap();
    assert_eq!(curves(&svg, BLUE), [5], "train loss:\n{svg}");
    assert_eq!(curves(&svg, RED), [5], "eval loss");
    assert_eq!(curves(&svg, GREEN), [5], "epsilon spent");
    for label in ["epsilon spent", "epsilon", "eval loss"] {
        assert!(svg.lines().any(|l| l == label), "{label:?} missing");
    }
}

#[test]
fn an_empty_run_and_a_png_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("metrics.jsonl"), "").unwrap();
    let output = plot(dir.path(), &dir.path().join("curves.svg"));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no per-round lines"));
    std::fs::write(
        dir.path().join("metrics.jsonl"),
        "{\"round\":1,\"mean_loss\":2.0}\n",
    )
    .unwrap();
    let output = plot(dir.path(), &dir.path().join("curves.png"));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("only .svg"));
}
