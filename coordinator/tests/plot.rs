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
const PURPLE: &str = "#800080";

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
    assert!(
        !svg.contains("accuracy"),
        "no accuracy panel without accuracy"
    );
    assert!(svg.contains(r#"height="480""#), "one panel");
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
    assert_eq!(curves(&svg, PURPLE), [0; 0]);
    assert!(
        !svg.contains("accuracy"),
        "no accuracy panel without accuracy"
    );
    assert!(svg.contains(r#"height="800""#), "two panels");
}

/// The filled circles in `color`: (cx, cy, r).
fn markers(svg: &str, color: &str) -> Vec<(u32, u32, u32)> {
    let attribute = |line: &str, name: &str| -> u32 {
        let value = line.split(&format!(" {name}=\"")).nth(1).unwrap();
        value[..value.find('"').unwrap()].parse().unwrap()
    };
    svg.lines()
        .filter(|l| l.starts_with("<circle") && l.contains(&format!("fill=\"{color}\"")))
        .map(|l| (attribute(l, "cx"), attribute(l, "cy"), attribute(l, "r")))
        .collect()
}

/// A classification job's rounds, some evaluated, accuracy given by `accuracy(round)`.
fn classification_lines(accuracy: impl Fn(u64) -> String) -> Vec<String> {
    // Round 4 aborted: no line, and round 5 made version 4.
    [1, 2, 3, 5, 6]
        .into_iter()
        .enumerate()
        .map(|(index, round)| {
            format!(
                r#"{{"round":{round},"version":{},"sampled":3,"participants":3,"mean_loss":0.7,"eval_loss":0.69,"eval_accuracy":{},"epsilon_spent":null,"delta":null}}"#,
                index + 1,
                accuracy(round)
            )
        })
        .collect()
}

#[test]
fn classification_runs_get_an_accuracy_panel_in_percent_with_the_final_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = classification_lines(|round| match round {
        3 => "null".to_string(),
        // 50%, 55%, ...: the curve's points, and 0 and 1 at the axis ends.
        1 => "0".to_string(),
        6 => "1.0".to_string(),
        _ => format!("{}", 0.5 + round as f64 * 0.05),
    });
    lines.push(
        r#"{"final":true,"version":4,"rounds":4,"epochs":0,"eval_loss":0.6,"eval_accuracy":0.664,"checkpoint":"none"}"#
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
    assert_eq!(
        curves(&svg, PURPLE),
        [4],
        "eval accuracy, the rounds that evaluated"
    );
    assert_eq!(curves(&svg, GREEN), [0; 0], "no epsilon without DP");
    for label in [
        "held-out accuracy",
        "accuracy (%)",
        "eval accuracy",
        "final eval accuracy: 66.4%",
        "100",
        "50",
    ] {
        assert!(svg.lines().any(|l| l == label), "{label:?} missing:\n{svg}");
    }
    assert!(!svg.contains("epsilon"));
    assert!(svg.contains(r#"height="800""#), "loss and accuracy panels");

    // The curve's first point (round 1, 0%) and last (round 6, 100%) sit at
    // the panel's bottom and top; the final evaluation's marker (version 4,
    // made by round 5) between them, at 66%.
    let polyline = svg
        .lines()
        .find(|l| {
            l.starts_with("<polyline")
                && l.contains(&format!("stroke=\"{PURPLE}\" stroke-width=\"2\""))
        })
        .unwrap();
    let points: Vec<(f64, f64)> = polyline
        .split("points=\"")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .filter_map(|p| p.split_once(','))
        .map(|(x, y)| (x.parse().unwrap(), y.parse().unwrap()))
        .collect();
    let (x1, bottom) = points[0];
    let (x6, top) = points[3];
    assert!(
        top > 440.0 && bottom - top > 200.0,
        "{points:?}: in the lower panel, 0% to 100% spanning it"
    );
    let (x5, _) = points[2];
    let marker = markers(&svg, PURPLE)
        .into_iter()
        .find(|&(_, _, r)| r == 5)
        .expect("the final evaluation's marker");
    assert!(
        (marker.0 as f64 - x5).abs() <= 1.0,
        "{marker:?} at round 5 ({x5})"
    );
    let expected = bottom - (bottom - top) * 0.664;
    assert!(
        (marker.1 as f64 - expected).abs() <= 2.0,
        "{marker:?} at 66% ({expected})"
    );
    assert!(x1 < x5 && x5 < x6);
}

#[test]
fn an_accuracy_panel_sits_between_loss_and_epsilon() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = classification_lines(|round| format!("{}", round as f64 / 10.0))
        .into_iter()
        .map(|l| l.replace(r#""epsilon_spent":null"#, r#""epsilon_spent":0.5"#))
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
    assert_eq!(curves(&svg, PURPLE), [5]);
    assert_eq!(curves(&svg, GREEN), [5]);
    assert!(
        markers(&svg, PURPLE).iter().all(|&(_, _, r)| r != 5),
        "no final line, no marker"
    );
    assert!(svg.contains(r#"height="1160""#), "three panels");
    let at = |label: &str| {
        svg.find(&format!("\n{label}\n"))
            .unwrap_or_else(|| panic!("{label:?}"))
    };
    assert!(at("held-out accuracy") < at("epsilon spent"));
}

#[test]
fn an_accuracy_that_is_not_a_fraction_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let lines = classification_lines(|round| if round == 3 { "66.4" } else { "0.6" }.to_string());
    std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("curves.svg");
    let output = plot(dir.path(), &out);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("metrics.jsonl:3: eval_accuracy 66.4 is not a fraction in [0, 1]"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing drawn");
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
