//! `run --otlp-endpoint`: a real coordinator process exports its RPC spans to
//! a fake OTLP collector as `service.name` cohort-coordinator, flushing them
//! when it stops on SIGTERM; with no collector listening it trains and stops
//! as before, with a warning.

#[path = "support/otlp_collector.rs"]
mod otlp_collector;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use otlp_collector::{unreachable_endpoint, FakeCollector};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_cohort-coordinator");

/// Prepares the committed State of the Union fixture and writes a tiny job.
async fn job(dir: &Path) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/fixtures/sotu");
    let output = Command::new(BIN)
        .args(["prepare", "--input"])
        .arg(&fixture)
        .arg("--output")
        .arg(dir.join("data"))
        .args(["--context-length", "32", "--shard-tokens", "4096"])
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("prepare took over a minute")
        .unwrap();
    assert!(
        output.status.success(),
        "prepare: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        r#"
name = "otlp"
data_dir = "data"
run_dir = "run"
[model]
vocab_size = 256
context_length = 32
n_layer = 1
n_head = 2
d_model = 32
[train]
rounds = 2
inner_steps = 2
micro_batch_size = 4
[outer]
kind = "average"
[cluster]
min_workers = 1
min_participants = 1
"#,
    )
    .unwrap();
    path
}

/// Starts `run` on 127.0.0.1:0 with `--otlp-endpoint`; returns the process
/// and its gRPC URL once it listens.
async fn start(dir: &Path, job: &Path, endpoint: &str) -> (Child, String) {
    let addr_file = dir.join("addr");
    let child = Command::new(BIN)
        .arg("run")
        .arg("--job")
        .arg(job)
        .args(["--listen", "127.0.0.1:0", "--otlp-endpoint", endpoint])
        .arg("--addr-file")
        .arg(&addr_file)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !addr_file.exists() {
        assert!(Instant::now() < deadline, "the coordinator did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addr = std::fs::read_to_string(&addr_file).unwrap();
    (child, format!("http://{addr}"))
}

/// One Status RPC through the `status` subcommand (a `status` span in the coordinator).
async fn call_status(addr: &str) {
    let output = Command::new(BIN)
        .args(["status", "--json", "--coordinator", addr])
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("status took over 30 s")
        .unwrap();
    assert!(
        output.status.success(),
        "status: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// SIGTERM, then waits (bounded) for a clean exit; returns the elapsed time and stderr.
async fn stop(child: Child) -> (Duration, String) {
    let pid = child.id().expect("running").to_string();
    let sent = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-s", "TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the coordinator did not stop within 30 s of SIGTERM")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "exit {}:\n{stderr}", output.status);
    (sent.elapsed(), stderr)
}

#[tokio::test]
async fn rpc_spans_reach_the_collector_as_cohort_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path()).await;
    let collector = FakeCollector::start().await;
    let (child, addr) = start(dir.path(), &job, &collector.endpoint).await;
    call_status(&addr).await;
    // Stopped well before the batch processor's 5 s schedule: the span can
    // only arrive through the flush at shutdown.
    let (_, stderr) = stop(child).await;
    let spans = collector.wait_for("status", Duration::from_secs(5)).await;
    let status: Vec<_> = spans.iter().filter(|s| s.name == "status").collect();
    assert!(!status.is_empty(), "no status span in {spans:?}\n{stderr}");
    assert!(
        spans.iter().all(|s| s.service == "cohort-coordinator"),
        "{spans:?}"
    );
    assert!(stderr.contains("exporting spans over OTLP"), "{stderr}");
    assert!(!stderr.contains("cannot export spans"), "{stderr}");
}

#[tokio::test]
async fn an_unreachable_collector_costs_a_warning_not_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path()).await;
    let (child, addr) = start(dir.path(), &job, &unreachable_endpoint()).await;
    let started = Instant::now();
    call_status(&addr).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a Status call took {:?}",
        started.elapsed()
    );
    let (stopping, stderr) = stop(child).await;
    // The checkpoint, then at most the exporter's bounded flush.
    assert!(
        stopping < Duration::from_secs(15),
        "stopping took {stopping:?}\n{stderr}"
    );
    assert!(stderr.contains("cannot export spans"), "{stderr}");
}

#[path = "support/session_client.rs"]
mod session_client;

/// Joins as a pretraining worker and pushes a zero update for round 1, which
/// commits it (one participant is the quorum).
async fn push_round_one(addr: &str) {
    use cohort_proto::v1 as pb;
    let mut client = session_client::Client::connect(addr).await;
    let joined = client
        .join(pb::JoinRequest {
            info: Some(pb::WorkerInfo {
                hostname: "otlp-test".into(),
                device: "cpu".into(),
                device_memory_bytes: 0,
                role: pb::Role::Pretrain as i32,
            }),
            token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    client.remember(&joined);
    let worker_id = joined.worker_id.clone();
    let task = client
        .next_task(pb::NextTaskRequest {
            worker_id: worker_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::next_task_response::Task::Train(train)) = task.task else {
        panic!("expected a training task, got {task:?}");
    };
    let mut messages = vec![pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Header(pb::PushHeader {
            worker_id,
            round: train.round,
            base_version: train.version,
            dtype: pb::DType::DtypeF32 as i32,
            stats: Some(pb::TrainStats {
                mean_loss: 5.0,
                tokens: 64,
                train_seconds: 0.1,
                ..Default::default()
            }),
        })),
    }];
    let job = joined.job.expect("a job spec");
    for (index, tensor) in job.tensors.iter().enumerate() {
        let numel: u64 = tensor.shape.iter().product();
        messages.push(pb::UpdateChunk {
            kind: Some(pb::update_chunk::Kind::Chunk(pb::TensorChunk {
                tensor_index: index as u32,
                offset: 0,
                data: vec![0u8; numel as usize * 4].into(),
            })),
        });
    }
    client
        .push_update(tokio_stream::iter(messages))
        .await
        .expect("the push is accepted");
}

#[tokio::test]
async fn a_committed_round_reaches_the_collector_as_a_round_span() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path()).await;
    let collector = FakeCollector::start().await;
    let (child, addr) = start(dir.path(), &job, &collector.endpoint).await;
    push_round_one(&addr).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(dir.path().join("run/metrics.jsonl"))
        .is_ok_and(|m| m.contains("\"round\":1"))
    {
        assert!(Instant::now() < deadline, "round 1 did not commit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, stderr) = stop(child).await;
    let spans = collector.wait_for("round", Duration::from_secs(5)).await;
    assert!(
        spans
            .iter()
            .any(|s| s.name == "round" && s.service == "cohort-coordinator"),
        "no round span in {spans:?}\n{stderr}"
    );
}
