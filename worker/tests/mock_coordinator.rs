//! Runs the worker's gRPC loop against an in-process mock coordinator: retries, re-join, train, push, eval, done.
//! Every call after a join must carry that join's session token.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_core::codec::{self, DType};
use cohort_core::model::ModelConfig;
use cohort_core::params::{init_params, ParamLayout};
use cohort_core::shard_file;
use cohort_proto::v1 as pb;
use cohort_worker::client::{self, ClientConfig, ClientError, RetryPolicy};
use futures::StreamExt;
use pb::coordinator_server::{Coordinator, CoordinatorServer};
use tonic::{Request, Response, Status, Streaming};

const MAX_CHUNK_BYTES: u32 = 256;

fn model() -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        context_length: 8,
        n_layer: 1,
        n_head: 2,
        d_model: 16,
        dropout: 0.0,
    }
}

fn job_spec(model: &ModelConfig) -> pb::JobSpec {
    pb::JobSpec {
        federated: None,
        job_name: "mock job".into(),
        model: Some(pb::ModelConfig {
            vocab_size: model.vocab_size,
            context_length: model.context_length,
            n_layer: model.n_layer,
            n_head: model.n_head,
            d_model: model.d_model,
            dropout: model.dropout,
        }),
        inner: Some(pb::InnerOptimizer {
            kind: pb::InnerOptimizerKind::InnerOptimizerAdamw as i32,
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            warmup_steps: 0,
        }),
        inner_steps: 3,
        micro_batch_size: 2,
        update_dtype: pb::DType::DtypeBf16 as i32,
        tensors: model
            .tensor_specs()
            .iter()
            .map(|t| pb::TensorSpec {
                name: t.name.clone(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
            })
            .collect(),
        tokenizer: pb::Tokenizer::Byte as i32,
        max_chunk_bytes: MAX_CHUNK_BYTES,
        seed: 9,
    }
}

enum Scripted {
    Task(pb::next_task_response::Task),
    Fail(Status),
}

#[derive(Default)]
struct Record {
    join_calls: u32,
    heartbeats: u32,
    header: Option<pb::PushHeader>,
    chunks: Vec<(u32, u64, usize)>,
    delta: Vec<f32>,
    eval: Option<(u64, f64, u64)>,
}

/// The session token the mock issues at its `join_calls`-th join.
fn session_token(join_calls: u32) -> String {
    format!("session-{join_calls}")
}

struct Mock {
    job: pb::JobSpec,
    params: Vec<f32>,
    layout: ParamLayout,
    /// Join fails with UNAVAILABLE this many times first.
    join_failures: u32,
    script: Mutex<VecDeque<Scripted>>,
    record: Arc<Mutex<Record>>,
}

impl Mock {
    /// Refuses a call that does not carry the latest join's session token.
    fn check_session<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let expected = session_token(self.record.lock().unwrap().join_calls);
        match cohort_proto::session::bearer_token(request.metadata()) {
            Some(token) if token == expected => Ok(()),
            other => Err(Status::permission_denied(format!(
                "session {other:?}, expected {expected}"
            ))),
        }
    }
}

#[tonic::async_trait]
impl Coordinator for Mock {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let info = request
            .into_inner()
            .info
            .ok_or_else(|| Status::invalid_argument("no info"))?;
        assert_eq!(info.role, pb::Role::Pretrain as i32);
        assert_eq!(info.device, "cpu");
        let mut record = self.record.lock().unwrap();
        record.join_calls += 1;
        if record.join_calls <= self.join_failures {
            return Err(Status::unavailable("starting up"));
        }
        Ok(Response::new(pb::JoinResponse {
            worker_id: format!("w{}", record.join_calls),
            lease_ms: 10_000,
            heartbeat_interval_ms: 20,
            job: Some(self.job.clone()),
            session_token: session_token(record.join_calls),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.check_session(&request)?;
        self.record.lock().unwrap().heartbeats += 1;
        Ok(Response::new(pb::HeartbeatResponse { lease_ms: 10_000 }))
    }

    async fn next_task(
        &self,
        request: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::NextTaskResponse>, Status> {
        self.check_session(&request)?;
        let next = self.script.lock().unwrap().pop_front();
        match next {
            Some(Scripted::Task(task)) => {
                Ok(Response::new(pb::NextTaskResponse { task: Some(task) }))
            }
            Some(Scripted::Fail(status)) => Err(status),
            None => Ok(Response::new(pb::NextTaskResponse {
                task: Some(pb::next_task_response::Task::Done(pb::DoneTask {
                    reason: "script exhausted".into(),
                })),
            })),
        }
    }

    type PullParamsStream =
        futures::stream::Iter<std::vec::IntoIter<Result<pb::ParamChunk, Status>>>;

    async fn pull_params(
        &self,
        request: Request<pb::PullParamsRequest>,
    ) -> Result<Response<Self::PullParamsStream>, Status> {
        self.check_session(&request)?;
        let version = request.into_inner().version;
        if version != 1 {
            return Err(Status::failed_precondition(format!(
                "version {version} is not current"
            )));
        }
        let mut chunks = Vec::new();
        for (index, slot) in self.layout.tensors().iter().enumerate() {
            let mut offset = 0;
            while offset < slot.numel {
                let len = 50.min(slot.numel - offset);
                let start = slot.offset + offset;
                chunks.push(Ok(pb::ParamChunk {
                    version,
                    tensor_index: index as u32,
                    offset: offset as u64,
                    data: codec::encode(DType::F32, &self.params[start..start + len]).into(),
                }));
                offset += len;
            }
        }
        Ok(Response::new(futures::stream::iter(chunks)))
    }

    async fn push_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::PushUpdateResponse>, Status> {
        self.check_session(&request)?;
        let mut stream = request.into_inner();
        let mut header = None;
        let mut chunks = Vec::new();
        let mut delta = vec![f32::NAN; self.layout.total()];
        let mut values = Vec::new();
        while let Some(message) = stream.next().await {
            match message?.kind {
                Some(pb::update_chunk::Kind::Header(h)) => {
                    assert!(
                        header.is_none() && chunks.is_empty(),
                        "header must come first, once"
                    );
                    header = Some(h);
                }
                Some(pb::update_chunk::Kind::Chunk(c)) => {
                    assert!(header.is_some(), "chunk before header");
                    codec::decode_into(DType::Bf16, &c.data, &mut values)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                    let slot = &self.layout.tensors()[c.tensor_index as usize];
                    let start = slot.offset + c.offset as usize;
                    assert!(
                        c.offset as usize + values.len() <= slot.numel,
                        "chunk spans tensors"
                    );
                    delta[start..start + values.len()].copy_from_slice(&values);
                    chunks.push((c.tensor_index, c.offset, c.data.len()));
                }
                None => return Err(Status::invalid_argument("empty message")),
            }
        }
        let mut record = self.record.lock().unwrap();
        record.header = header;
        record.chunks = chunks;
        record.delta = delta;
        Ok(Response::new(pb::PushUpdateResponse {
            round: 1,
            received: 1,
            expected: 1,
        }))
    }

    async fn report_eval(
        &self,
        request: Request<pb::ReportEvalRequest>,
    ) -> Result<Response<pb::ReportEvalResponse>, Status> {
        self.check_session(&request)?;
        let r = request.into_inner();
        self.record.lock().unwrap().eval = Some((r.version, r.loss, r.tokens));
        Ok(Response::new(pb::ReportEvalResponse {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("the mock has no status"))
    }

    async fn stop(
        &self,
        _request: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopResponse>, Status> {
        Err(Status::unimplemented("the mock has no stop"))
    }
}

async fn serve(mock: Mock) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(mock))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    address
}

fn write_shard(dir: &Path, name: &str, windows: usize) {
    let tokens: Vec<u32> = (0..windows * 8 + 1).map(|i| (i % 5) as u32 * 7).collect();
    std::fs::write(dir.join(name), shard_file::encode(&tokens, 64)).unwrap();
}

fn shard(id: u64, name: &str, windows: u64) -> pb::ShardRef {
    pb::ShardRef {
        shard_id: id,
        file_name: name.into(),
        num_tokens: windows * 8 + 1,
    }
}

fn config(
    address: String,
    data_dir: &Path,
    state_dir: Option<&Path>,
    attempts: u32,
) -> ClientConfig {
    ClientConfig {
        coordinator: address,
        tls: Default::default(),
        data_dir: data_dir.to_path_buf(),
        device: tch::Device::Cpu,
        threads: 1,
        state_dir: state_dir.map(Path::to_path_buf),
        retry: RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            max_attempts: attempts,
        },
        hostname: "test-host".into(),
        device_memory_bytes: 0,
    }
}

#[tokio::test]
async fn worker_trains_pushes_evaluates_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    write_shard(dir.path(), "train-0.bin", 3);
    write_shard(dir.path(), "train-1.bin", 4);
    write_shard(dir.path(), "eval.bin", 2);
    let model = model();
    let layout = ParamLayout::new(&model.tensor_specs());
    let record = Arc::new(Mutex::new(Record::default()));
    use pb::next_task_response::Task;
    let script = VecDeque::from([
        // The coordinator forgot us: the worker must join again.
        Scripted::Fail(Status::not_found("unknown worker")),
        Scripted::Task(Task::Train(pb::TrainTask {
            round: 1,
            version: 1,
            shards: vec![shard(0, "train-0.bin", 3), shard(1, "train-1.bin", 4)],
            eval_shards: vec![shard(9, "eval.bin", 2)],
            deadline_ms: 60_000,
        })),
        // A stale task: the pull is refused and the worker moves on.
        Scripted::Task(Task::Train(pb::TrainTask {
            round: 2,
            version: 7,
            shards: vec![shard(0, "train-0.bin", 3)],
            eval_shards: vec![],
            deadline_ms: 60_000,
        })),
        Scripted::Fail(Status::invalid_argument("bad request")),
        Scripted::Task(Task::Wait(pb::WaitTask { retry_after_ms: 30 })),
        Scripted::Task(Task::Eval(pb::EvalTask {
            version: 1,
            eval_shards: vec![shard(9, "eval.bin", 2)],
        })),
        Scripted::Task(Task::Done(pb::DoneTask {
            reason: "all epochs done".into(),
        })),
    ]);
    let mock = Mock {
        job: job_spec(&model),
        params: init_params(&model.tensor_specs(), 9),
        layout: layout.clone(),
        join_failures: 2,
        script: Mutex::new(script),
        record: record.clone(),
    };
    let address = serve(mock).await;
    let state_dir = dir.path().join("state");
    let summary = client::run(config(address, dir.path(), Some(&state_dir), 5))
        .await
        .unwrap();
    assert_eq!(summary.joins, 2);
    assert_eq!(summary.rounds_pushed, 1);
    assert_eq!(summary.evals_reported, 1);
    assert_eq!(summary.done_reason, "all epochs done");

    let record = record.lock().unwrap();
    assert_eq!(
        record.join_calls, 4,
        "two UNAVAILABLE, one join, one re-join"
    );
    let header = record.header.clone().unwrap();
    assert_eq!(
        (header.worker_id.as_str(), header.round, header.base_version),
        ("w4", 1, 1)
    );
    assert_eq!(header.dtype, pb::DType::DtypeBf16 as i32);
    let stats = header.stats.unwrap();
    assert_eq!(stats.tokens, 7 * 8);
    assert_eq!(stats.eval_tokens, 2 * 8);
    let eval_loss = stats.eval_loss.unwrap();
    assert!((eval_loss - 64f64.ln()).abs() < 0.5, "{eval_loss}");
    assert!(stats.mean_loss.is_finite() && stats.mean_loss < eval_loss + 0.5);
    // Chunks: within the byte limit, in order, contiguous, covering everything.
    let mut expected = (0u32, 0u64);
    for &(index, offset, bytes) in &record.chunks {
        assert!(bytes <= MAX_CHUNK_BYTES as usize && bytes > 0);
        assert_eq!((index, offset), expected);
        let numel = layout.tensors()[index as usize].numel as u64;
        let next = offset + bytes as u64 / 2;
        expected = if next == numel {
            (index + 1, 0)
        } else {
            (index, next)
        };
    }
    assert_eq!(expected, (layout.tensors().len() as u32, 0));
    assert!(record.delta.iter().all(|x| x.is_finite()));
    assert!(record.delta.iter().any(|&x| x != 0.0));
    let (version, loss, tokens) = record.eval.unwrap();
    assert_eq!((version, tokens), (1, 16));
    assert!(
        (loss - eval_loss).abs() < 1e-9,
        "same version, same loss: {loss} vs {eval_loss}"
    );
    assert!(record.heartbeats >= 1);
    assert!(state_dir
        .join("mock_job.inner-optimizer.safetensors")
        .exists());
}

#[tokio::test]
async fn a_job_for_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = model();
    let mut job = job_spec(&model);
    job.tensors.swap(2, 3);
    let mock = Mock {
        job,
        params: Vec::new(),
        layout: ParamLayout::new(&model.tensor_specs()),
        join_failures: 0,
        script: Mutex::new(VecDeque::new()),
        record: Arc::new(Mutex::new(Record::default())),
    };
    let address = serve(mock).await;
    let err = client::run(config(address, dir.path(), None, 3))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::JobSpec(_)), "{err}");
    assert!(err.to_string().contains("h.0.ln_1"), "{err}");
}

#[tokio::test]
async fn an_unreachable_coordinator_is_given_up_on() {
    // Bind then drop a listener to get a port with nobody behind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let err = client::run(config(
        format!("http://127.0.0.1:{port}"),
        dir.path(),
        None,
        4,
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Unreachable {
                op: "join",
                attempts: 4,
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}
