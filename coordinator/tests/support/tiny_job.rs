//! A tiny pretraining job served in-process on 127.0.0.1:0 (metrics on a
//! second port), and fake workers that train it over gRPC with the session
//! of their join: shared by the observability tests (`prometheus.rs`,
//! `status.rs`).

use std::path::Path;

use cohort_coordinator::actor::JobOutcome;
use cohort_coordinator::config::{JobFile, JobPlan};
use cohort_coordinator::data::{prepare, PrepareOptions, TokenizerKind};
use cohort_coordinator::server::{self, RunOptions};
use cohort_core::codec::{encode, DType};
use cohort_core::params::ParamLayout;
use cohort_proto::v1 as pb;
use futures::StreamExt;

use crate::session_client::Client;

pub const MAX_CHUNK_BYTES: usize = 1024;

/// Two workers per round, `rounds` rounds, an 8-token context.
pub fn plan(dir: &Path, rounds: u64) -> JobPlan {
    let toml = prepare_job(dir, rounds);
    JobFile::parse(&toml, &dir.join("job.toml"))
        .unwrap()
        .validate()
        .unwrap()
}

/// Prepares the data in `dir` and returns the job file's text (paths
/// relative to `dir`), for [`plan`] or a coordinator process.
pub fn prepare_job(dir: &Path, rounds: u64) -> String {
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
    format!(
        r#"
name = "observed"
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
rounds = {rounds}
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
"#
    )
}

pub struct Running {
    /// The gRPC URL.
    pub addr: String,
    /// The metrics endpoint's `host:port`.
    pub metrics_addr: String,
    pub outcome: tokio::task::JoinHandle<JobOutcome>,
    pub stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn start(plan: JobPlan) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let metrics_addr = metrics.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let outcome = tokio::spawn(async move {
        let options = RunOptions {
            metrics_listener: Some(metrics),
            ..RunOptions::default()
        };
        server::run_with_options(
            listener,
            plan,
            async {
                let _ = stopped.await;
            },
            options,
        )
        .await
        .expect("server ran")
    });
    Running {
        addr,
        metrics_addr,
        outcome,
        stop,
    }
}

/// A fake worker: a client that joined, with its id.
pub struct Worker {
    pub client: Client,
    pub id: String,
}

impl Worker {
    pub async fn join(addr: &str, hostname: &str) -> Worker {
        let mut client = Client::connect(addr).await;
        let response = client
            .join(pb::JoinRequest {
                info: Some(pb::WorkerInfo {
                    hostname: hostname.into(),
                    device: "cpu".into(),
                    device_memory_bytes: 0,
                    role: pb::Role::Pretrain as i32,
                }),
                token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        client.remember(&response);
        Worker {
            client,
            id: response.worker_id,
        }
    }

    /// The next task, which must be a train task: (round, version).
    pub async fn train_task(&mut self) -> (u64, u64) {
        let task = self
            .client
            .next_task(pb::NextTaskRequest {
                worker_id: self.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        match task {
            pb::next_task_response::Task::Train(t) => (t.round, t.version),
            other => panic!("expected a train task, got {other:?}"),
        }
    }

    /// Pulls `version` (and discards it).
    pub async fn pull(&mut self, version: u64) {
        let mut stream = self
            .client
            .pull_params(pb::PullParamsRequest {
                worker_id: self.id.clone(),
                version,
                base: false,
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(chunk) = stream.next().await {
            chunk.unwrap();
        }
    }

    /// Pushes an update of `value` everywhere, claiming `round` and `version`.
    pub async fn push(
        &mut self,
        layout: &ParamLayout,
        round: u64,
        version: u64,
        value: f32,
    ) -> Result<pb::PushUpdateResponse, tonic::Status> {
        let mut messages = vec![pb::UpdateChunk {
            kind: Some(pb::update_chunk::Kind::Header(pb::PushHeader {
                worker_id: self.id.clone(),
                round,
                base_version: version,
                dtype: pb::DType::DtypeF32 as i32,
                stats: Some(pb::TrainStats {
                    mean_loss: 3.0,
                    tokens: 64,
                    train_seconds: 0.5,
                    eval_loss: None,
                    eval_tokens: 0,
                    eval_accuracy: None,
                }),
            })),
        }];
        let per = MAX_CHUNK_BYTES / 4;
        for (index, slot) in layout.tensors().iter().enumerate() {
            let mut offset = 0;
            while offset < slot.numel {
                let len = per.min(slot.numel - offset);
                messages.push(pb::UpdateChunk {
                    kind: Some(pb::update_chunk::Kind::Chunk(pb::TensorChunk {
                        tensor_index: index as u32,
                        offset: offset as u64,
                        data: encode(DType::F32, &vec![value; len]).into(),
                    })),
                });
                offset += len;
            }
        }
        self.client
            .push_update(tokio_stream::iter(messages))
            .await
            .map(|r| r.into_inner())
    }
}
