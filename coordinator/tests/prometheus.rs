//! `run --metrics-listen`: a tiny job trained by fake gRPC workers, with
//! `/metrics` scraped over HTTP: committed rounds, participants, bytes and a
//! rejected push counted under its reason code.

#[path = "support/session_client.rs"]
mod session_client;
#[path = "support/tiny_job.rs"]
mod tiny_job;

use std::time::{Duration, Instant};

use cohort_core::params::ParamLayout;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use tiny_job::{plan, start, Worker};

/// `GET /metrics`: (content type, body).
async fn scrape(address: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: cohort\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (content_type, body.to_string())
}

/// The value of the sample named exactly `name` (labels included).
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_committed_rounds_and_rejected_pushes_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), 3);
    let layout = ParamLayout::new(&plan.engine.tensors);
    let running = start(plan).await;

    let (content_type, before) = scrape(&running.metrics_addr).await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert_eq!(sample(&before, "cohort_rounds_committed_total"), Some(0.0));

    let mut a = Worker::join(&running.addr, "a").await;
    let mut b = Worker::join(&running.addr, "b").await;
    for expected_round in 1..=2 {
        let (round, version) = a.train_task().await;
        assert_eq!(round, expected_round);
        b.train_task().await;
        if round == 1 {
            let stale = a.push(&layout, 99, version, 0.1).await.unwrap_err();
            assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
        }
        for worker in [&mut a, &mut b] {
            worker.pull(version).await;
            worker.push(&layout, round, version, 0.1).await.unwrap();
        }
    }

    // The actor records a commit right after the push that caused it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (_, body) = scrape(&running.metrics_addr).await;
        if sample(&body, "cohort_rounds_committed_total") == Some(2.0) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "two rounds never counted:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let expect = |name: &str, value: f64| {
        assert_eq!(sample(&body, name), Some(value), "{name} in\n{body}");
    };
    expect("cohort_pushes_rejected_total{reason=\"stale_round\"}", 1.0);
    expect("cohort_round_participants", 2.0);
    expect("cohort_model_version", 2.0);
    expect("cohort_live_workers", 2.0);
    expect("cohort_workers_joined_total", 2.0);
    expect("cohort_rounds_aborted_total", 0.0);
    expect("cohort_leases_expired_total", 0.0);
    expect("cohort_round_wall_seconds_count", 2.0);
    expect("cohort_round_mean_loss", 3.0);
    let update_bytes = 2.0 * 2.0 * 4.0 * layout.total() as f64;
    expect("cohort_update_bytes_pushed_bytes_total", update_bytes);
    expect("cohort_update_bytes_pulled_bytes_total", update_bytes);
    assert!(body.trim_end().ends_with("# EOF"), "{body}");

    drop(running.stop);
    tokio::time::timeout(Duration::from_secs(10), running.outcome)
        .await
        .expect("stopped in time")
        .unwrap();
}
