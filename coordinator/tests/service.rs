//! The gRPC service on 127.0.0.1:0 with fake workers as tasks: every kind of
//! bad push is refused with the right status and leaves the round intact; a
//! clean round then commits exactly the expected parameters.

#[path = "support/grpc_edge.rs"]
mod grpc_edge;
#[path = "support/session_client.rs"]
mod session_client;

use std::path::Path;
use std::time::Duration;

use cohort_coordinator::config::{JobFile, JobPlan};
use cohort_coordinator::data::{prepare, PrepareOptions, TokenizerKind};
use cohort_core::codec::{encode, DType};
use cohort_core::params::ParamLayout;
use cohort_proto::v1 as pb;
use futures::StreamExt;
use grpc_edge::{assert_refused, chunk, chunks, push, start, MAX_CHUNK_BYTES};
use session_client::Client;
use tonic::Code;

fn plan(dir: &Path, extra_toml: &str) -> JobPlan {
    let text: String = (0..200)
        .map(|i| format!("sentence number {i} of the test corpus. "))
        .collect();
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    prepare(&PrepareOptions {
        inputs: vec![dir.join("corpus.txt")],
        output: dir.join("data"),
        tokenizer: TokenizerKind::Byte,
        context_length: 8,
        shard_tokens: 256,
        val_every: 4,
        show_progress: false,
    })
    .unwrap();
    let toml = format!(
        r#"
name = "service-test"
data_dir = "data"
run_dir = "run"
seed = 5
[model]
vocab_size = 256
context_length = 8
n_layer = 1
n_head = 1
d_model = 4
[train]
rounds = 1
inner_steps = 1
[outer]
kind = "average"
[cluster]
min_workers = 2
min_participants = 2
lease_ms = 30000
heartbeat_ms = 1000
max_chunk_bytes = {MAX_CHUNK_BYTES}
chunk_timeout_ms = 2000
{extra_toml}
"#
    );
    JobFile::parse(&toml, &dir.join("job.toml"))
        .unwrap()
        .validate()
        .unwrap()
}

async fn client(addr: &str) -> Client {
    Client::connect(addr).await
}

async fn join(c: &mut Client) -> (String, pb::JobSpec) {
    let info = pb::WorkerInfo {
        hostname: "test".into(),
        device: "cpu".into(),
        device_memory_bytes: 0,
        role: 1,
    };
    let response = c
        .join(pb::JoinRequest {
            info: Some(info),
            token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    c.remember(&response);
    (response.worker_id, response.job.unwrap())
}

async fn next_task(c: &mut Client, worker: &str) -> pb::next_task_response::Task {
    c.next_task(pb::NextTaskRequest {
        worker_id: worker.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .task
    .unwrap()
}

async fn pull(c: &mut Client, worker: &str, version: u64) -> Result<Vec<f32>, tonic::Status> {
    let mut stream = c
        .pull_params(pb::PullParamsRequest {
            base: false,
            worker_id: worker.into(),
            version,
        })
        .await?
        .into_inner();
    let mut values = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        assert_eq!(chunk.version, version);
        assert!(chunk.data.len() <= MAX_CHUNK_BYTES);
        values.extend(
            chunk
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap())),
        );
    }
    Ok(values)
}

fn header(worker: &str, round: u64, version: u64, dtype: pb::DType) -> pb::UpdateChunk {
    pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Header(pb::PushHeader {
            worker_id: worker.into(),
            round,
            base_version: version,
            dtype: dtype as i32,
            stats: Some(pb::TrainStats {
                mean_loss: 3.0,
                tokens: 64,
                train_seconds: 0.5,
                eval_loss: None,
                eval_tokens: 0,
                eval_accuracy: None,
            }),
        })),
    }
}

#[tokio::test]
async fn every_bad_request_is_refused_and_a_clean_round_commits_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), "");
    let layout = ParamLayout::new(&plan.engine.tensors);
    let run_dir = plan.run_dir.clone();
    let running = start(plan).await;
    let mut a = client(&running.addr).await;
    let mut b = client(&running.addr).await;
    let (wa, spec) = join(&mut a).await;
    assert_eq!(spec.tensors.len(), layout.tensors().len());
    assert_eq!(spec.max_chunk_bytes as usize, MAX_CHUNK_BYTES);

    // Membership errors.
    assert_refused(
        a.heartbeat(pb::HeartbeatRequest {
            worker_id: "w999".into(),
        })
        .await,
        Code::NotFound,
        "unknown worker",
    );
    assert_refused(
        a.next_task(pb::NextTaskRequest {
            worker_id: "bogus".into(),
        })
        .await,
        Code::InvalidArgument,
        "malformed",
    );
    assert_refused(
        a.join(pb::JoinRequest {
            info: None,
            token: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "worker info",
    );
    // One worker is not enough to start (min_workers = 2).
    assert!(matches!(
        next_task(&mut a, &wa).await,
        pb::next_task_response::Task::Wait(_)
    ));
    let (wb, _) = join(&mut b).await;
    let pb::next_task_response::Task::Train(task_a) = next_task(&mut a, &wa).await else {
        panic!("no train task")
    };
    let pb::next_task_response::Task::Train(task_b) = next_task(&mut b, &wb).await else {
        panic!("no train task")
    };
    assert_eq!((task_a.round, task_a.version), (1, 0));
    assert_ne!(task_a.shards[0].shard_id, task_b.shards[0].shard_id);

    let initial = pull(&mut a, &wa, 0).await.unwrap();
    assert_eq!(initial.len(), layout.total());
    assert_refused(
        pull(&mut a, &wa, 3).await,
        Code::FailedPrecondition,
        "stale version",
    );
    assert_refused(
        pull(&mut a, "w999", 0).await,
        Code::NotFound,
        "unknown worker",
    );

    let delta_a: Vec<f32> = (0..layout.total())
        .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
        .collect();
    let delta_b: Vec<f32> = (0..layout.total())
        .map(|i| ((i % 5) as f32 - 2.0) * 0.02)
        .collect();
    let good = chunks(&layout, &delta_a);
    let f32_header = || header(&wa, 1, 0, pb::DType::DtypeF32);
    let with =
        |first: Vec<pb::UpdateChunk>, rest: &[pb::UpdateChunk]| [first, rest.to_vec()].concat();

    // Headers.
    assert_refused(
        push(&mut a, good.clone()).await,
        Code::InvalidArgument,
        "start with its header",
    );
    assert_refused(
        push(&mut a, vec![]).await,
        Code::InvalidArgument,
        "empty push",
    );
    assert_refused(
        push(
            &mut a,
            with(vec![header(&wa, 9, 0, pb::DType::DtypeF32)], &good),
        )
        .await,
        Code::FailedPrecondition,
        "stale round",
    );
    assert_refused(
        push(
            &mut a,
            with(vec![header(&wa, 1, 4, pb::DType::DtypeF32)], &good),
        )
        .await,
        Code::FailedPrecondition,
        "stale version",
    );
    assert_refused(
        push(
            &mut a,
            with(vec![header(&wa, 1, 0, pb::DType::DtypeBf16)], &good),
        )
        .await,
        Code::InvalidArgument,
        "dtype",
    );
    assert_refused(
        push(
            &mut a,
            with(vec![header(&wa, 1, 0, pb::DType::DtypeUnspecified)], &good),
        )
        .await,
        Code::InvalidArgument,
        "dtype",
    );
    assert_refused(
        push(
            &mut a,
            with(vec![header("w999", 1, 0, pb::DType::DtypeF32)], &good),
        )
        .await,
        Code::NotFound,
        "unknown worker",
    );

    // Chunks: each bad push is discarded whole.
    let mut nan = good.clone();
    nan[1] = chunk(0, 256, encode(DType::F32, &[f32::NAN; 256]));
    assert_refused(
        push(&mut a, with(vec![f32_header()], &nan)).await,
        Code::InvalidArgument,
        "not finite",
    );
    let mut inf = good.clone();
    let last = inf.len() - 1;
    inf[last] = chunk(
        layout.tensors().len() as u32 - 1,
        0,
        encode(DType::F32, &[f32::INFINITY; 4]),
    );
    assert_refused(
        push(&mut a, with(vec![f32_header()], &inf)).await,
        Code::InvalidArgument,
        "not finite",
    );
    let mut unknown_tensor = good.clone();
    unknown_tensor[0] = chunk(999, 0, encode(DType::F32, &[0.0; 4]));
    assert_refused(
        push(&mut a, with(vec![f32_header()], &unknown_tensor)).await,
        Code::InvalidArgument,
        "out of range",
    );
    // The last tensor (ln_f.bias, 4 values) sent as 8 values: a wrong shape.
    let mut wrong_shape = good.clone();
    wrong_shape[last] = chunk(
        layout.tensors().len() as u32 - 1,
        0,
        encode(DType::F32, &[0.0; 8]),
    );
    assert_refused(
        push(&mut a, with(vec![f32_header()], &wrong_shape)).await,
        Code::InvalidArgument,
        "overruns",
    );
    assert_refused(
        push(&mut a, with(vec![f32_header()], &good[1..])).await,
        Code::InvalidArgument,
        "expected tensor 0 at offset 0",
    );
    let mut too_large = good.clone();
    too_large[0] = chunk(0, 0, encode(DType::F32, &[0.0; 512]));
    assert_refused(
        push(&mut a, with(vec![f32_header()], &too_large)).await,
        Code::InvalidArgument,
        "exceeds the limit",
    );
    let mut ragged = good.clone();
    ragged[0] = chunk(0, 0, vec![0; 5]);
    assert_refused(
        push(&mut a, with(vec![f32_header()], &ragged)).await,
        Code::InvalidArgument,
        "whole number",
    );
    assert_refused(
        push(&mut a, with(vec![f32_header()], &good[..3])).await,
        Code::InvalidArgument,
        "push ended after",
    );
    let mut two_headers = good.clone();
    two_headers.insert(2, f32_header());
    assert_refused(
        push(&mut a, with(vec![f32_header()], &two_headers)).await,
        Code::InvalidArgument,
        "second header",
    );
    let empty = pb::UpdateChunk { kind: None };
    assert_refused(
        push(&mut a, vec![f32_header(), empty]).await,
        Code::InvalidArgument,
        "empty update",
    );

    // A third worker joins mid-round: it is not a participant.
    let mut c = client(&running.addr).await;
    let (wc, _) = join(&mut c).await;
    assert!(matches!(
        next_task(&mut c, &wc).await,
        pb::next_task_response::Task::Wait(_)
    ));
    assert_refused(
        push(
            &mut c,
            with(vec![header(&wc, 1, 0, pb::DType::DtypeF32)], &good),
        )
        .await,
        Code::FailedPrecondition,
        "not a participant",
    );

    // After all that, the clean pushes give exactly init - mean(delta).
    let receipt = push(&mut a, with(vec![f32_header()], &good)).await.unwrap();
    assert_eq!(
        (receipt.round, receipt.received, receipt.expected),
        (1, 1, 2)
    );
    assert_refused(
        push(&mut a, with(vec![f32_header()], &good)).await,
        Code::FailedPrecondition,
        "already pushed",
    );
    push(
        &mut b,
        with(
            vec![header(&wb, 1, 0, pb::DType::DtypeF32)],
            &chunks(&layout, &delta_b),
        ),
    )
    .await
    .unwrap();
    let expected: Vec<f32> = (0..layout.total())
        .map(|i| initial[i] - (delta_a[i] + delta_b[i]) * 0.5)
        .collect();
    // The job had one round: now the final version is evaluated.
    let task = next_task(&mut a, &wa).await;
    let pb::next_task_response::Task::Eval(eval) = task else {
        panic!("expected eval, got {task:?}")
    };
    assert_eq!(eval.version, 1);
    assert_eq!(pull(&mut a, &wa, 1).await.unwrap(), expected);
    assert_refused(
        push(
            &mut b,
            with(vec![header(&wb, 1, 0, pb::DType::DtypeF32)], &good),
        )
        .await,
        Code::FailedPrecondition,
        "stale",
    );
    assert_refused(
        b.report_eval(pb::ReportEvalRequest {
            worker_id: wb.clone(),
            version: 1,
            loss: 2.0,
            tokens: 8,
            accuracy: None,
        })
        .await,
        Code::FailedPrecondition,
        "not asked to evaluate",
    );
    a.report_eval(pb::ReportEvalRequest {
        worker_id: wa.clone(),
        version: 1,
        loss: 2.5,
        tokens: 8,
        accuracy: None,
    })
    .await
    .unwrap();
    for (client, worker) in [(&mut a, &wa), (&mut b, &wb), (&mut c, &wc)] {
        assert!(matches!(
            next_task(client, worker).await,
            pb::next_task_response::Task::Done(_)
        ));
    }
    let outcome = tokio::time::timeout(Duration::from_secs(10), running.outcome)
        .await
        .unwrap()
        .unwrap();
    assert!(outcome.finished);
    assert_eq!(outcome.final_eval_loss, Some(2.5));
    let checkpoint = outcome.checkpoint.expect("checkpoint written");
    assert!(checkpoint.starts_with(&run_dir));
    let bytes = std::fs::read(&checkpoint).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ln_f = tensors.tensor("ln_f.bias").unwrap();
    let slot = layout
        .tensors()
        .iter()
        .find(|t| t.name == "ln_f.bias")
        .unwrap();
    let saved: Vec<f32> = bytemuck::pod_collect_to_vec(ln_f.data());
    assert_eq!(saved, expected[slot.offset..slot.offset + slot.numel]);
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(first["participants"], 2);
    assert_eq!(first["bytes_pushed"], (2 * layout.total() * 4) as u64);
}

#[tokio::test]
async fn a_push_that_stalls_is_discarded_after_the_chunk_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), "");
    let layout = ParamLayout::new(&plan.engine.tensors);
    let running = start(plan).await;
    let mut a = client(&running.addr).await;
    let mut b = client(&running.addr).await;
    let (wa, _) = join(&mut a).await;
    let (wb, _) = join(&mut b).await;
    next_task(&mut a, &wa).await;
    next_task(&mut b, &wb).await;
    let good = chunks(&layout, &vec![0.0; layout.total()]);
    // A stream that sends its header and one chunk, then goes quiet.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header(&wa, 1, 0, pb::DType::DtypeF32))
        .await
        .unwrap();
    tx.send(good[0].clone()).await.unwrap();
    let stalled = a.push_update(tokio_stream::wrappers::ReceiverStream::new(rx));
    let result = tokio::time::timeout(Duration::from_secs(10), stalled)
        .await
        .expect("refused within the timeout");
    assert_refused(result, Code::DeadlineExceeded, "no chunk");
    drop(tx);
    // The other worker's push was not blocked for good, and a's retry is accepted.
    push(
        &mut b,
        [vec![header(&wb, 1, 0, pb::DType::DtypeF32)], good.clone()].concat(),
    )
    .await
    .unwrap();
    let receipt = push(
        &mut a,
        [vec![header(&wa, 1, 0, pb::DType::DtypeF32)], good].concat(),
    )
    .await
    .unwrap();
    assert_eq!(receipt.received, 2);
}

#[tokio::test]
async fn a_worker_cannot_heartbeat_pull_or_push_as_another() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), "");
    let layout = ParamLayout::new(&plan.engine.tensors);
    let running = start(plan).await;
    let mut a = client(&running.addr).await;
    let mut b = client(&running.addr).await;
    let (wa, _) = join(&mut a).await;
    let (wb, _) = join(&mut b).await;
    let pb::next_task_response::Task::Train(task) = next_task(&mut a, &wa).await else {
        panic!("no train task")
    };
    next_task(&mut b, &wb).await;
    let good = chunks(&layout, &vec![0.01; layout.total()]);
    let as_a = || {
        [
            vec![header(&wa, task.round, task.version, pb::DType::DtypeF32)],
            good.clone(),
        ]
        .concat()
    };

    // b, with its own session, names a's worker id.
    let denied = "worker id does not match its session";
    assert_refused(
        b.heartbeat(pb::HeartbeatRequest {
            worker_id: wa.clone(),
        })
        .await,
        Code::PermissionDenied,
        denied,
    );
    assert_refused(
        b.next_task(pb::NextTaskRequest {
            worker_id: wa.clone(),
        })
        .await,
        Code::PermissionDenied,
        denied,
    );
    assert_refused(pull(&mut b, &wa, 0).await, Code::PermissionDenied, denied);
    assert_refused(push(&mut b, as_a()).await, Code::PermissionDenied, denied);
    assert_refused(
        b.report_eval(pb::ReportEvalRequest {
            worker_id: wa.clone(),
            version: 0,
            loss: 1.0,
            tokens: 1,
            accuracy: None,
        })
        .await,
        Code::PermissionDenied,
        denied,
    );
    // A made-up token and no token at all fare no better.
    let mut forger = client(&running.addr).await;
    forger.use_session(&"0".repeat(64));
    assert_refused(
        forger
            .heartbeat(pb::HeartbeatRequest {
                worker_id: wa.clone(),
            })
            .await,
        Code::PermissionDenied,
        denied,
    );
    let mut anonymous = client(&running.addr).await;
    assert_refused(
        pull(&mut anonymous, &wa, 0).await,
        Code::Unauthenticated,
        "no session token",
    );

    // Nothing changed: a's push is still its own to make, and is accepted.
    let receipt = push(&mut a, as_a()).await.unwrap();
    assert_eq!((receipt.received, receipt.expected), (1, 2));
    let receipt = push(
        &mut b,
        [
            vec![header(&wb, task.round, task.version, pb::DType::DtypeF32)],
            good.clone(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    assert_eq!(receipt.received, 2);
}
