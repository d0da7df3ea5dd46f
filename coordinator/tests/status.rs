//! `cohort-coordinator status --json` against a job served in-process: the
//! live workers with their state and the running round, parsed from the
//! real binary's output; the table form names the same.

#[path = "support/session_client.rs"]
mod session_client;
#[path = "support/tiny_job.rs"]
#[allow(dead_code)] // the metrics address is for prometheus.rs
mod tiny_job;

use std::time::Duration;

use cohort_core::params::ParamLayout;

use tiny_job::{plan, start, Worker};

async fn status_command(addr: &str, json: bool) -> String {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"));
    command.args(["status", "--coordinator", addr]);
    if json {
        command.arg("--json");
    }
    let output = command.output().await.unwrap();
    assert!(
        output.status.success(),
        "status exited with {}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn status_shows_the_round_and_what_each_worker_does() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), 3);
    let layout = ParamLayout::new(&plan.engine.tensors);
    let running = start(plan).await;
    let mut a = Worker::join(&running.addr, "host-a").await;
    let mut b = Worker::join(&running.addr, "host-b").await;

    // Round 1 commits; in round 2, a has pushed and b is still training.
    for worker in [&mut a, &mut b] {
        worker.train_task().await;
    }
    for worker in [&mut a, &mut b] {
        worker.pull(0).await;
        worker.push(&layout, 1, 0, 0.1).await.unwrap();
    }
    let (round, version) = a.train_task().await;
    assert_eq!((round, version), (2, 1));
    b.train_task().await;
    a.pull(version).await;
    a.push(&layout, round, version, 0.1).await.unwrap();

    let text = status_command(&running.addr, true).await;
    let status: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(status["job_name"], "observed", "{status}");
    assert_eq!(status["phase"], "training");
    assert_eq!(status["federated"], false);
    assert_eq!(status["current_round"], 2);
    assert_eq!(status["version"], 1);
    assert_eq!(status["committed_rounds"], 1);
    assert_eq!(status["max_rounds"], 3);
    assert_eq!(status["last_round"], 1);
    assert_eq!(status["last_mean_loss"], 3.0);
    assert_eq!(status["privacy"], serde_json::Value::Null);
    assert!(status["rounds_per_second"].as_f64().unwrap() > 0.0);
    assert!(status["eta_seconds"].as_f64().is_some(), "{status}");
    let workers: Vec<(String, String, u64)> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["hostname"].as_str().unwrap().to_string(),
                w["state"].as_str().unwrap().to_string(),
                w["round"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        workers,
        [
            ("host-a".to_string(), "pushed".to_string(), 2),
            ("host-b".to_string(), "training".to_string(), 2),
        ]
    );

    let table = status_command(&running.addr, false).await;
    for needle in [
        "job observed (pretraining)",
        "round 2",
        "committed 1/3",
        "pushed r2",
        "training r2",
    ] {
        assert!(table.contains(needle), "{needle:?} not in\n{table}");
    }

    drop(running.stop);
    tokio::time::timeout(Duration::from_secs(10), running.outcome)
        .await
        .expect("stopped in time")
        .unwrap();
}
