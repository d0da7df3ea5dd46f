//! Runs the federated client against an in-process mock coordinator: LoRA rounds with the base
//! pulled once, updates of exactly the adapters, clipping and noise norms, unknown tokens and
//! pretraining jobs refused.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_core::clip::l2_norm;
use cohort_core::codec::{self, DType};
use cohort_core::model::{ModelConfig, TensorSpec};
use cohort_core::params::{init_params, ParamLayout};
use cohort_proto::v1 as pb;
use cohort_worker::client::{ClientError, RetryPolicy};
use cohort_worker::federated::{self, EnrollmentToken, FederatedConfig};
use futures::StreamExt;
use pb::coordinator_server::{Coordinator, CoordinatorServer};
use pb::next_task_response::Task;
use tonic::{Request, Response, Status, Streaming};

const MAX_CHUNK_BYTES: u32 = 256;
// A fake OTLP collector, shared with the coordinator's tests.
#[path = "../../coordinator/tests/support/otlp_collector.rs"]
#[allow(dead_code)] // unreachable_endpoint is for the coordinator's tests
mod otlp_collector;

const TOKEN: &str = "site-a-secret";
const RANK: u32 = 2;

fn model() -> ModelConfig {
    ModelConfig {
        vocab_size: 256,
        context_length: 8,
        n_layer: 1,
        n_head: 2,
        d_model: 16,
        dropout: 0.0,
    }
}

fn wire(specs: &[TensorSpec]) -> Vec<pb::TensorSpec> {
    specs
        .iter()
        .map(|t| pb::TensorSpec {
            name: t.name.clone(),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
        })
        .collect()
}

fn lora_job(clip_norm: f64, noise_stddev: f64) -> pb::JobSpec {
    let model = model();
    pb::JobSpec {
        job_name: "federated mock".into(),
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
            weight_decay: 0.0,
            grad_clip: 1.0,
            warmup_steps: 0,
        }),
        inner_steps: 0,
        micro_batch_size: 2,
        update_dtype: pb::DType::DtypeF32 as i32,
        tensors: wire(&model.lora_specs(RANK)),
        tokenizer: pb::Tokenizer::Byte as i32,
        max_chunk_bytes: MAX_CHUNK_BYTES,
        seed: 5,
        federated: Some(pb::FederatedSpec {
            trainable: pb::Trainable::Lora as i32,
            lora: Some(pb::LoraSpec {
                rank: RANK,
                alpha: 4.0,
            }),
            local_steps: 3,
            clip_norm,
            dp_mode: if noise_stddev > 0.0 {
                pb::DpMode::Local
            } else {
                pb::DpMode::None
            } as i32,
            client_noise_stddev: noise_stddev,
            base_tensors: wire(&model.tensor_specs()),
            ..Default::default()
        }),
    }
}

#[derive(Default)]
struct Record {
    join_calls: u32,
    base_pulls: u32,
    version_pulls: Vec<u64>,
    /// Per push: the header and the decoded update.
    pushes: Vec<(pb::PushHeader, Vec<f32>)>,
}

struct Mock {
    job: pb::JobSpec,
    base: Vec<f32>,
    base_layout: ParamLayout,
    adapters: Vec<f32>,
    adapter_layout: ParamLayout,
    script: Mutex<VecDeque<Result<Task, Status>>>,
    record: Arc<Mutex<Record>>,
}

fn chunks_of(
    layout: &ParamLayout,
    flat: &[f32],
    version: u64,
) -> Vec<Result<pb::ParamChunk, Status>> {
    let mut chunks = Vec::new();
    for (index, slot) in layout.tensors().iter().enumerate() {
        let mut offset = 0;
        while offset < slot.numel {
            let len = 40.min(slot.numel - offset);
            let start = slot.offset + offset;
            chunks.push(Ok(pb::ParamChunk {
                version,
                tensor_index: index as u32,
                offset: offset as u64,
                data: codec::encode(DType::F32, &flat[start..start + len]).into(),
            }));
            offset += len;
        }
    }
    chunks
}

#[tonic::async_trait]
impl Coordinator for Mock {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let request = request.into_inner();
        let info = request
            .info
            .ok_or_else(|| Status::invalid_argument("no info"))?;
        assert_eq!(info.role, pb::Role::Federated as i32);
        let mut record = self.record.lock().unwrap();
        record.join_calls += 1;
        if request.token != TOKEN {
            return Err(Status::unauthenticated("unknown enrollment token"));
        }
        Ok(Response::new(pb::JoinResponse {
            worker_id: format!("site-{}", record.join_calls),
            lease_ms: 10_000,
            heartbeat_interval_ms: 50,
            job: Some(self.job.clone()),
            session_token: String::new(),
        }))
    }

    async fn heartbeat(
        &self,
        _request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(pb::HeartbeatResponse { lease_ms: 10_000 }))
    }

    async fn next_task(
        &self,
        _request: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::NextTaskResponse>, Status> {
        let next = self.script.lock().unwrap().pop_front().unwrap_or_else(|| {
            Ok(Task::Done(pb::DoneTask {
                reason: "script exhausted".into(),
            }))
        });
        next.map(|task| Response::new(pb::NextTaskResponse { task: Some(task) }))
    }

    type PullParamsStream =
        futures::stream::Iter<std::vec::IntoIter<Result<pb::ParamChunk, Status>>>;

    async fn pull_params(
        &self,
        request: Request<pb::PullParamsRequest>,
    ) -> Result<Response<Self::PullParamsStream>, Status> {
        let request = request.into_inner();
        let mut record = self.record.lock().unwrap();
        let chunks = if request.base {
            record.base_pulls += 1;
            chunks_of(&self.base_layout, &self.base, 0)
        } else {
            record.version_pulls.push(request.version);
            chunks_of(&self.adapter_layout, &self.adapters, request.version)
        };
        Ok(Response::new(futures::stream::iter(chunks)))
    }

    async fn push_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::PushUpdateResponse>, Status> {
        let mut stream = request.into_inner();
        let mut header = None;
        let mut update = vec![f32::NAN; self.adapter_layout.total()];
        let mut values = Vec::new();
        let mut next = (0u32, 0u64);
        while let Some(message) = stream.next().await {
            match message?.kind {
                Some(pb::update_chunk::Kind::Header(h)) => {
                    assert_eq!(
                        h.dtype,
                        pb::DType::DtypeF32 as i32,
                        "federated pushes are f32"
                    );
                    header = Some(h);
                }
                Some(pb::update_chunk::Kind::Chunk(c)) => {
                    assert!(header.is_some(), "chunk before header");
                    assert!(c.data.len() <= MAX_CHUNK_BYTES as usize);
                    assert_eq!((c.tensor_index, c.offset), next, "chunks in order");
                    codec::decode_into(DType::F32, &c.data, &mut values)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                    let slot = self
                        .adapter_layout
                        .tensor(c.tensor_index as usize)
                        .ok_or_else(|| {
                            Status::invalid_argument("tensor index past the adapters")
                        })?;
                    let end = c.offset as usize + values.len();
                    assert!(end <= slot.numel, "chunk spans tensors");
                    update[slot.offset + c.offset as usize..slot.offset + end]
                        .copy_from_slice(&values);
                    next = if end == slot.numel {
                        (c.tensor_index + 1, 0)
                    } else {
                        (c.tensor_index, end as u64)
                    };
                }
                None => return Err(Status::invalid_argument("empty message")),
            }
        }
        assert_eq!(
            next,
            (self.adapter_layout.tensors().len() as u32, 0),
            "every adapter tensor, nothing else"
        );
        let header = header.ok_or_else(|| Status::invalid_argument("no header"))?;
        let round = header.round;
        self.record.lock().unwrap().pushes.push((header, update));
        Ok(Response::new(pb::PushUpdateResponse {
            round,
            received: 1,
            expected: 1,
        }))
    }

    async fn report_eval(
        &self,
        _request: Request<pb::ReportEvalRequest>,
    ) -> Result<Response<pb::ReportEvalResponse>, Status> {
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

fn mock(job: pb::JobSpec, script: Vec<Result<Task, Status>>) -> (Mock, Arc<Mutex<Record>>) {
    let model = model();
    let record = Arc::new(Mutex::new(Record::default()));
    let mock = Mock {
        job,
        base: init_params(&model.tensor_specs(), 1),
        base_layout: ParamLayout::new(&model.tensor_specs()),
        adapters: init_params(&model.lora_specs(RANK), 2),
        adapter_layout: ParamLayout::new(&model.lora_specs(RANK)),
        script: Mutex::new(script.into()),
        record: record.clone(),
    };
    (mock, record)
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

fn site_data(dir: &Path) {
    std::fs::write(
        dir.join("train.txt"),
        "Alice sends letters to Bob; Bob answers Alice. ".repeat(6),
    )
    .unwrap();
    std::fs::write(dir.join("test.txt"), "Bob writes to Alice again.").unwrap();
}

fn config(address: String, data_dir: &Path, token: &str) -> FederatedConfig {
    FederatedConfig {
        coordinator: address,
        tls: Default::default(),
        data_dir: data_dir.to_path_buf(),
        token: EnrollmentToken::new(token),
        device: tch::Device::Cpu,
        threads: 1,
        retry: RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            max_attempts: 3,
        },
        hostname: "site-a".into(),
        device_memory_bytes: 0,
    }
}

fn train(round: u64, version: u64) -> Result<Task, Status> {
    Ok(Task::Train(pb::TrainTask {
        round,
        version,
        shards: vec![],
        eval_shards: vec![],
        deadline_ms: 60_000,
    }))
}

/// Two LoRA rounds with a lost lease in between; returns the record.
async fn two_rounds(clip_norm: f64, noise_stddev: f64) -> Record {
    let dir = tempfile::tempdir().unwrap();
    site_data(dir.path());
    let (mock, record) = mock(
        lora_job(clip_norm, noise_stddev),
        vec![
            train(1, 1),
            Ok(Task::Wait(pb::WaitTask { retry_after_ms: 20 })),
            // The coordinator forgot the site: it joins again but keeps its base.
            Err(Status::not_found("unknown worker")),
            train(2, 2),
            Ok(Task::Done(pb::DoneTask {
                reason: "federated rounds done".into(),
            })),
        ],
    );
    let address = serve(mock).await;
    let summary = federated::run(config(address, dir.path(), TOKEN))
        .await
        .unwrap();
    assert_eq!(summary.rounds_pushed, 2);
    assert_eq!(summary.joins, 2);
    assert_eq!(summary.done_reason, "federated rounds done");
    let record = std::mem::take(&mut *record.lock().unwrap());
    assert_eq!(record.base_pulls, 1, "the frozen base is pulled once");
    assert_eq!(record.version_pulls, vec![1, 2]);
    assert_eq!(record.pushes.len(), 2);
    let adapters: usize = model().lora_specs(RANK).iter().map(|s| s.numel()).sum();
    for (round, (header, update)) in record.pushes.iter().enumerate() {
        assert_eq!(header.round, round as u64 + 1);
        assert_eq!(header.base_version, round as u64 + 1);
        assert_eq!(update.len(), adapters);
        assert!(
            update.iter().all(|x| x.is_finite()),
            "every adapter value was sent"
        );
        let stats = header.stats.unwrap();
        assert_eq!(stats.tokens, 3 * 2 * 8);
        let eval_loss = stats.eval_loss.unwrap();
        assert!((eval_loss - 256f64.ln()).abs() < 0.5, "{eval_loss}");
        assert_eq!(stats.eval_tokens, 3 * 8);
        assert!(stats.mean_loss.is_finite());
    }
    record
}

#[tokio::test]
async fn lora_rounds_send_clipped_adapter_updates_and_pull_the_base_once() {
    let clip_norm = 1e-3;
    let record = two_rounds(clip_norm, 0.0).await;
    for (_, update) in &record.pushes {
        let norm = l2_norm(update);
        assert!(norm <= clip_norm * (1.0 + 1e-6), "{norm} > {clip_norm}");
        // Three AdamW steps at lr 1e-2 move the adapters far more than 1e-3: clipped.
        assert!(norm > clip_norm * 0.999, "{norm}");
    }
}

#[tokio::test]
async fn noised_updates_have_the_norm_of_clip_plus_noise() {
    let (clip_norm, stddev) = (0.05, 0.01);
    let record = two_rounds(clip_norm, stddev).await;
    for (_, update) in &record.pushes {
        let d = update.len() as f64;
        // ‖Δ + z‖² = C² + 2⟨Δ, z⟩ + ‖z‖² ≈ C² + d s², with standard deviation about
        // s² sqrt(2d) + 2 s C.
        let expected = clip_norm * clip_norm + d * stddev * stddev;
        let spread = stddev * stddev * (2.0 * d).sqrt() + 2.0 * stddev * clip_norm;
        let got = l2_norm(update).powi(2);
        assert!(
            (got - expected).abs() < 6.0 * spread,
            "‖update‖² = {got}, expected {expected} ± {spread}"
        );
        assert!(
            l2_norm(update)
                <= cohort_core::clip::update_norm_bound(clip_norm, stddev, update.len())
        );
    }
}

#[tokio::test]
async fn an_unknown_token_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    site_data(dir.path());
    let (mock, record) = mock(lora_job(1.0, 0.0), vec![]);
    let address = serve(mock).await;
    let err = federated::run(config(address.clone(), dir.path(), "stolen-or-typo"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Unauthenticated { .. }), "{err}");
    assert!(err.to_string().contains("enrollment token"), "{err}");
    assert_eq!(record.lock().unwrap().join_calls, 1, "not retried");

    // The binary exits non-zero and says why.
    let data = dir.path().to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cohort-worker"))
            .args(["federated", "--coordinator", &address, "--device", "cpu"])
            .arg("--data")
            .arg(&data)
            .args(["--token", "stolen-or-typo", "--retry-attempts", "2"])
            .env_remove("COHORT_TOKEN")
            .env_remove("COHORT_TOKEN_FILE")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("refused the enrollment token"), "{stderr}");
    assert!(
        !stderr.contains("stolen-or-typo"),
        "the token is never printed: {stderr}"
    );
}

#[tokio::test]
async fn the_binary_exports_its_round_spans_as_cohort_worker() {
    let dir = tempfile::tempdir().unwrap();
    site_data(dir.path());
    let (mock, record) = mock(
        lora_job(1.0, 0.0),
        vec![
            train(1, 1),
            Ok(Task::Done(pb::DoneTask {
                reason: "federated rounds done".into(),
            })),
        ],
    );
    let address = serve(mock).await;
    let collector = otlp_collector::FakeCollector::start().await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_cohort-worker"))
        .args(["federated", "--coordinator", &address, "--device", "cpu"])
        .arg("--data")
        .arg(dir.path())
        .args(["--token", TOKEN, "--otlp-endpoint", &collector.endpoint])
        .env_remove("COHORT_TOKEN")
        .env_remove("COHORT_TOKEN_FILE")
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("the worker did not finish within 2 minutes")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(record.lock().unwrap().pushes.len(), 1, "{stderr}");
    // The worker exits long before the batch processor's 5 s schedule: the
    // spans arrive through the flush at exit.
    let spans = collector.wait_for("round", Duration::from_secs(5)).await;
    assert!(
        spans.iter().any(|s| s.name == "round"),
        "no round span in {spans:?}\n{stderr}"
    );
    assert!(
        spans.iter().all(|s| s.service == "cohort-worker"),
        "{spans:?}"
    );
    assert!(!stderr.contains("cannot export spans"), "{stderr}");
}

#[tokio::test]
async fn a_pretraining_job_is_not_a_federated_job() {
    let dir = tempfile::tempdir().unwrap();
    site_data(dir.path());
    let mut job = lora_job(1.0, 0.0);
    job.federated = None;
    let (mock, _) = mock(job, vec![]);
    let address = serve(mock).await;
    let err = federated::run(config(address, dir.path(), TOKEN))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NotFederated { .. }), "{err}");
    assert!(err.to_string().contains("not a federated job"), "{err}");
}

#[tokio::test]
async fn missing_local_text_is_reported_before_training() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("test.txt"), "some held-out text").unwrap();
    let (mock, record) = mock(lora_job(1.0, 0.0), vec![train(1, 1)]);
    let address = serve(mock).await;
    let err = federated::run(config(address.clone(), dir.path(), TOKEN))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("train.txt"), "{err}");
    assert_eq!(
        record.lock().unwrap().join_calls,
        0,
        "checked before joining"
    );
    // Text too short for one window is found once the job's context length is known.
    std::fs::write(dir.path().join("train.txt"), "tiny").unwrap();
    let err = federated::run(config(address, dir.path(), TOKEN))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fewer than one window"), "{err}");
    assert_eq!(record.lock().unwrap().pushes.len(), 0);
}

#[test]
fn a_site_needs_a_token_or_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    site_data(dir.path());
    let run = |extra: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_cohort-worker"))
            .args(["federated", "--coordinator", "https://127.0.0.1:9"])
            .args(["--device", "cpu", "--retry-attempts", "1", "--data"])
            .arg(dir.path())
            .args(extra)
            .env_remove("COHORT_TOKEN")
            .env_remove("COHORT_TOKEN_FILE")
            .env_remove("COHORT_WORKER_TLS_CERT")
            .env_remove("COHORT_WORKER_TLS_KEY")
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let neither = run(&[]);
    assert!(
        neither.contains("needs an enrollment token") && neither.contains("--tls-cert"),
        "{neither}"
    );
    // With a client certificate (here a missing file) the token is optional:
    // what fails is the certificate, not the missing token.
    let missing = dir.path().join("missing.pem").display().to_string();
    let by_certificate = run(&["--tls-cert", &missing, "--tls-key", &missing]);
    assert!(
        !by_certificate.contains("needs an enrollment token")
            && by_certificate.contains("missing.pem"),
        "{by_certificate}"
    );
}
