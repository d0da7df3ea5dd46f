//! A real coordinator process against hand-written gRPC clients that
//! misbehave the ways a broken or hostile client site could: an update for a
//! round it was not sampled in, NaN, a wrong-shaped adapter, an update larger
//! than clipping plus the advertised noise can produce. Each is refused with a
//! clear status and the round then releases the honest updates.

use std::time::{Duration, Instant};

use cohort_core::codec::{encode, DType};
use cohort_core::model::TensorSpec;
use cohort_core::params::ParamLayout;
use cohort_proto::session::with_bearer;
use cohort_proto::v1 as pb;
use cohort_tests::FederatedJob;
use pb::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

const CLIENTS: usize = 6;
const CLIP: f64 = 0.5;

fn job() -> String {
    format!(
        r#"
name = "federated-bad-clients"
[model]
vocab_size = 256
context_length = 16
n_layer = 1
n_head = 1
d_model = 16
[train]
rounds = 1
inner_steps = 1
[cluster]
min_workers = {CLIENTS}
min_participants = 1
lease_ms = 60000
heartbeat_ms = 1000
round_deadline_ms = 60000
max_chunk_bytes = 4096
[federated]
trainable = "lora"
lora_rank = 2
sample_rate = 0.5
[federated.dp]
mode = "distributed"
clip_norm = {CLIP}
noise_multiplier = 1.0
epsilon = 50.0
delta = 1e-5
"#
    )
}

struct Site {
    client: CoordinatorClient<Channel>,
    id: String,
    session: String,
}

impl Site {
    fn request<T>(&self, message: T) -> Request<T> {
        with_bearer(Request::new(message), &self.session).unwrap()
    }

    async fn next_task(&mut self) -> pb::next_task_response::Task {
        let request = self.request(pb::NextTaskRequest {
            worker_id: self.id.clone(),
        });
        self.client
            .next_task(request)
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap()
    }

    async fn push(&mut self, messages: Vec<pb::UpdateChunk>) -> Result<(), tonic::Status> {
        let request = self.request(tokio_stream::iter(messages));
        self.client.push_update(request).await.map(|_| ())
    }
}

fn header(worker: &str, round: u64) -> pb::UpdateChunk {
    pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Header(pb::PushHeader {
            worker_id: worker.into(),
            round,
            base_version: 0,
            dtype: pb::DType::DtypeF32 as i32,
            stats: Some(pb::TrainStats {
                mean_loss: 4.0,
                tokens: 16,
                train_seconds: 0.1,
                eval_loss: Some(4.5),
                eval_tokens: 16,
                eval_accuracy: None,
            }),
        })),
    }
}

fn update(worker: &str, round: u64, layout: &ParamLayout, values: &[f32]) -> Vec<pb::UpdateChunk> {
    let mut out = vec![header(worker, round)];
    for (index, slot) in layout.tensors().iter().enumerate() {
        let data = &values[slot.offset..slot.offset + slot.numel];
        for (k, part) in data.chunks(1024).enumerate() {
            out.push(pb::UpdateChunk {
                kind: Some(pb::update_chunk::Kind::Chunk(pb::TensorChunk {
                    tensor_index: index as u32,
                    offset: (k * 1024) as u64,
                    data: encode(DType::F32, part).into(),
                })),
            });
        }
    }
    out
}

fn even(len: usize, norm: f64) -> Vec<f32> {
    vec![(norm / (len as f64).sqrt()) as f32; len]
}

#[track_caller]
fn assert_refused(result: Result<(), tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err(needle);
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} does not mention {needle:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_are_refused_and_the_round_releases_the_honest_updates() {
    let mut fed = FederatedJob::new(CLIENTS);
    fed.write_job(&job());
    fed.job.start_coordinator();
    let addr = fed.job.addr.clone().unwrap();

    let mut sites = Vec::new();
    let mut spec = None;
    for name in &fed.clients {
        let token =
            std::fs::read_to_string(fed.job.path("clients").join(name).join("token")).unwrap();
        let mut client = CoordinatorClient::connect(addr.clone()).await.unwrap();
        let joined = client
            .join(pb::JoinRequest {
                info: Some(pb::WorkerInfo {
                    hostname: name.clone(),
                    device: "cpu".into(),
                    device_memory_bytes: 0,
                    role: pb::Role::Federated as i32,
                }),
                token,
            })
            .await
            .unwrap()
            .into_inner();
        spec = joined.job;
        sites.push(Site {
            client,
            id: joined.worker_id,
            session: joined.session_token,
        });
    }
    let spec = spec.unwrap();
    let federated = spec.federated.clone().unwrap();
    let tensors: Vec<TensorSpec> = spec
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.shape.iter().map(|&d| d as usize).collect(),
            init: cohort_core::model::Init::Zeros,
        })
        .collect();
    let layout = ParamLayout::new(&tensors);
    // Distributed with m = 1: each client adds N(0, (σC)²).
    assert_eq!(federated.client_noise_stddev, CLIP);

    // Ask until a cohort is drawn (Poisson: an empty draw is redrawn).
    let started = Instant::now();
    let (sampled, round) = loop {
        let mut sampled = Vec::new();
        let mut round = 0;
        for (i, site) in sites.iter_mut().enumerate() {
            if let pb::next_task_response::Task::Train(t) = site.next_task().await {
                sampled.push(i);
                round = t.round;
            }
        }
        if !sampled.is_empty() {
            break (sampled, round);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no cohort drawn"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // An update for a round the client was not sampled in.
    if let Some(outsider) = (0..CLIENTS).find(|i| !sampled.contains(i)) {
        let id = sites[outsider].id.clone();
        let messages = update(&id, round, &layout, &even(layout.total(), 0.1));
        assert_refused(
            sites[outsider].push(messages).await,
            Code::FailedPrecondition,
            "not a participant",
        );
    }

    let first = sampled[0];
    let id = sites[first].id.clone();
    // NaN.
    let mut nan = even(layout.total(), 0.1);
    nan[7] = f32::NAN;
    assert_refused(
        sites[first].push(update(&id, round, &layout, &nan)).await,
        Code::InvalidArgument,
        "finite",
    );
    // A wrong-shaped adapter: the first tensor one value too long.
    let mut messages = vec![header(&id, round)];
    messages.push(pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Chunk(pb::TensorChunk {
            tensor_index: 0,
            offset: 0,
            data: encode(DType::F32, &vec![0.0; layout.tensors()[0].numel + 1]).into(),
        })),
    });
    assert_refused(
        sites[first].push(messages).await,
        Code::InvalidArgument,
        "overruns",
    );
    // Larger than clipping plus the advertised noise can produce.
    let bound = cohort_core::clip::update_norm_bound(CLIP, CLIP, layout.total());
    assert_refused(
        sites[first]
            .push(update(
                &id,
                round,
                &layout,
                &even(layout.total(), bound * 1.05),
            ))
            .await,
        Code::InvalidArgument,
        "exceeds",
    );

    // The honest updates (clipped, plus noise of the advertised size) release the round.
    for &i in &sampled {
        let id = sites[i].id.clone();
        let honest = even(layout.total(), bound * 0.9);
        sites[i]
            .push(update(&id, round, &layout, &honest))
            .await
            .unwrap();
    }
    let charged = cohort_tests::wait_until(Duration::from_secs(30), || {
        !fed.privacy_charges().is_empty()
    });
    assert!(charged, "the round was not released");
    let charges = fed.privacy_charges();
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].0, round);
    drop(sites);
}
