//! The federated job over real gRPC on 127.0.0.1:0 with fake clients:
//! enrollment tokens, the frozen base pull, every bad update refused, central
//! DP noise of the advertised size in the released model, the durable
//! privacy ledger, and the budget stop.

#[path = "support/grpc_edge.rs"]
mod grpc_edge;
#[path = "support/session_client.rs"]
mod session_client;

use std::path::Path;

use cohort_coordinator::config::{JobFile, JobPlan};
use cohort_coordinator::store::RunStore;
use cohort_core::codec::{encode, DType};
use cohort_core::params::ParamLayout;
use cohort_proto::v1 as pb;
use futures::StreamExt;
use grpc_edge::{assert_refused, chunks, push, start, MAX_CHUNK_BYTES};
use session_client::Client;
use sha2::{Digest, Sha256};
use tonic::Code;

const TOKENS: [&str; 3] = ["token-alpha", "token-bravo", "token-charlie"];

fn enrollment(dir: &Path) {
    let mut text = String::from("# test enrollment\n");
    for (i, token) in TOKENS.iter().enumerate() {
        let hash: String = Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        text.push_str(&format!(
            "[[client]]\nname = \"site-{i}\"\ntoken_sha256 = \"{hash}\"\n"
        ));
    }
    std::fs::write(dir.join("enrollment.toml"), text).unwrap();
}

fn plan(dir: &Path, dp: &str) -> JobPlan {
    enrollment(dir);
    let toml = format!(
        r#"
name = "federated-service-test"
run_dir = "run"
seed = 5
[model]
vocab_size = 256
context_length = 8
n_layer = 1
n_head = 1
d_model = 8
[train]
rounds = 2
inner_steps = 1
[cluster]
min_workers = 3
min_participants = 3
lease_ms = 30000
heartbeat_ms = 1000
max_chunk_bytes = {MAX_CHUNK_BYTES}
chunk_timeout_ms = 2000
[federated]
enrollment = "enrollment.toml"
trainable = "lora"
lora_rank = 2
sample_rate = 1.0
[federated.dp]
{dp}
"#
    );
    let plan = JobFile::parse(&toml, &dir.join("job.toml"))
        .unwrap()
        .validate()
        .unwrap();
    std::fs::create_dir_all(&plan.run_dir).unwrap();
    plan
}

async fn client(addr: &str) -> Client {
    Client::connect(addr).await
}

async fn join(
    c: &mut Client,
    role: pb::Role,
    token: &str,
) -> Result<(String, pb::JobSpec), tonic::Status> {
    let info = pb::WorkerInfo {
        hostname: "site".into(),
        device: "cpu".into(),
        device_memory_bytes: 0,
        role: role as i32,
    };
    let response = c
        .join(pb::JoinRequest {
            info: Some(info),
            token: token.into(),
        })
        .await?
        .into_inner();
    c.remember(&response);
    Ok((response.worker_id, response.job.unwrap()))
}

async fn pull(
    c: &mut Client,
    worker: &str,
    version: u64,
    base: bool,
) -> Result<Vec<f32>, tonic::Status> {
    let mut stream = c
        .pull_params(pb::PullParamsRequest {
            worker_id: worker.into(),
            version,
            base,
        })
        .await?
        .into_inner();
    let mut values = Vec::new();
    while let Some(chunk) = stream.next().await {
        values.extend(
            chunk?
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap())),
        );
    }
    Ok(values)
}

async fn train_round(c: &mut Client, worker: &str) -> Option<u64> {
    let task = c
        .next_task(pb::NextTaskRequest {
            worker_id: worker.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    match task {
        pb::next_task_response::Task::Train(t) => Some(t.round),
        _ => None,
    }
}

fn header(worker: &str, round: u64, version: u64) -> pb::UpdateChunk {
    pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Header(pb::PushHeader {
            worker_id: worker.into(),
            round,
            base_version: version,
            dtype: pb::DType::DtypeF32 as i32,
            stats: Some(pb::TrainStats {
                mean_loss: 3.0,
                tokens: 64,
                train_seconds: 0.5,
                eval_loss: Some(3.5),
                eval_tokens: 32,
                eval_accuracy: None,
            }),
        })),
    }
}

/// An update of L2 norm `norm` spread evenly over `len` coordinates.
fn even_update(len: usize, norm: f64) -> Vec<f32> {
    vec![(norm / (len as f64).sqrt()) as f32; len]
}

#[tokio::test]
async fn clients_are_admitted_by_token_and_bad_updates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(
        dir.path(),
        "mode = \"central\"\nclip_norm = 1.0\nnoise_multiplier = 1.0\nepsilon = 100.0\ndelta = 1e-5",
    );
    let layout = ParamLayout::new(&plan.engine.tensors);
    let run_dir = plan.run_dir.clone();
    let base_len = ParamLayout::new(&plan.federated.as_ref().unwrap().base_tensors).total();
    let running = start(plan).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(client(&running.addr).await);
    }

    // Admission.
    assert_refused(
        join(&mut clients[0], pb::Role::Federated, "not-a-token").await,
        Code::Unauthenticated,
        "unknown enrollment token",
    );
    assert_refused(
        join(&mut clients[0], pb::Role::Federated, "").await,
        Code::Unauthenticated,
        "enrollment token",
    );
    assert_refused(
        join(&mut clients[0], pb::Role::Pretrain, TOKENS[0]).await,
        Code::PermissionDenied,
        "federated job",
    );
    let mut ids = Vec::new();
    let mut spec = None;
    for (c, token) in clients.iter_mut().zip(TOKENS) {
        let (id, s) = join(c, pb::Role::Federated, token).await.unwrap();
        ids.push(id);
        spec = Some(s);
    }
    let spec = spec.unwrap();
    let federated = spec.federated.expect("a federated job says so");
    assert_eq!(federated.trainable, pb::Trainable::Lora as i32);
    assert_eq!(federated.dp_mode, pb::DpMode::Central as i32);
    assert_eq!(
        federated.client_noise_stddev, 0.0,
        "central: clients only clip"
    );
    assert_eq!(federated.clip_norm, 1.0);
    assert!(spec.tensors.iter().all(|t| t.name.contains(".lora_")));

    // The frozen base streams to members only.
    let base = pull(&mut clients[0], &ids[0], 0, true).await.unwrap();
    assert_eq!(base.len(), base_len);
    assert_refused(
        pull(&mut clients[0], "w999", 0, true).await,
        Code::NotFound,
        "unknown worker",
    );

    // Rate 1: everyone is in round 1.
    let mut round = 0;
    for (c, id) in clients.iter_mut().zip(&ids) {
        round = train_round(c, id).await.expect("sampled");
    }
    let initial = pull(&mut clients[0], &ids[0], 0, false).await.unwrap();
    assert_eq!(initial.len(), layout.total());

    // Bad updates: NaN, a wrong-shaped adapter, too large a norm.
    let w = &ids[0];
    let mut nan = even_update(layout.total(), 0.5);
    nan[3] = f32::NAN;
    let mut messages = vec![header(w, round, 0)];
    messages.extend(chunks(&layout, &nan));
    assert_refused(
        push(&mut clients[0], messages).await,
        Code::InvalidArgument,
        "finite",
    );
    let mut messages = vec![header(w, round, 0)];
    let first = &layout.tensors()[0];
    messages.push(pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Chunk(pb::TensorChunk {
            tensor_index: 0,
            offset: 0,
            data: encode(DType::F32, &vec![0.01; first.numel + 3]).into(),
        })),
    });
    assert_refused(
        push(&mut clients[0], messages).await,
        Code::InvalidArgument,
        "overruns",
    );
    let mut messages = vec![header(w, round, 0)];
    messages.extend(chunks(&layout, &even_update(layout.total(), 1.5)));
    assert_refused(
        push(&mut clients[0], messages).await,
        Code::InvalidArgument,
        "exceeds",
    );

    // Clean, clipped updates from all three release the round.
    let update = even_update(layout.total(), 0.9);
    for (c, id) in clients.iter_mut().zip(&ids) {
        let mut messages = vec![header(id, round, 0)];
        messages.extend(chunks(&layout, &update));
        push(c, messages).await.unwrap();
    }
    // A replay of a released push is stale.
    let mut messages = vec![header(&ids[1], round, 0)];
    messages.extend(chunks(&layout, &update));
    assert_refused(
        push(&mut clients[1], messages).await,
        Code::FailedPrecondition,
        "stale",
    );

    // Version 1 = initial - (3 u + N(0, σ²C²)) / 3 with σC = 1: the noise in
    // each released coordinate has standard deviation 1/3.
    let released = pull(&mut clients[0], &ids[0], 1, false).await.unwrap();
    let residuals: Vec<f64> = released
        .iter()
        .zip(&initial)
        .zip(&update)
        .map(|((&r, &i), &u)| f64::from(r) - (f64::from(i) - f64::from(u)))
        .collect();
    let n = residuals.len() as f64;
    let mean = residuals.iter().sum::<f64>() / n;
    let std = (residuals.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    // n ≈ 400 coordinates: the sample std has relative standard error
    // 1/sqrt(2n) ≈ 3.5%; 20% is over 5 standard errors.
    assert!(
        (std - 1.0 / 3.0).abs() < 0.2 / 3.0,
        "noise std {std}, expected 1/3"
    );
    assert!(mean.abs() < 5.0 / 3.0 / n.sqrt(), "noise mean {mean}");

    // The charge is on disk before the release, with the epsilon it brought.
    let store = RunStore::open(&run_dir).unwrap();
    let charges = store.privacy_charges().unwrap();
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].round, round);
    assert_eq!(charges[0].shares, 3);
    assert_eq!(charges[0].cost.noise_multiplier, 1.0);
    let expected = cohort_core::privacy::epsilon(1.0, 1.0, 1, 1e-5)
        .unwrap()
        .epsilon;
    assert!((charges[0].epsilon_after - expected).abs() < 1e-9);
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"epsilon_spent\""), "{metrics}");
    drop(running);
}

async fn next(c: &mut Client, id: &str) -> pb::next_task_response::Task {
    c.next_task(pb::NextTaskRequest {
        worker_id: id.to_string(),
    })
    .await
    .unwrap()
    .into_inner()
    .task
    .unwrap()
}

#[tokio::test]
async fn a_budget_too_small_for_one_round_ends_the_job_before_anyone_trains() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(
        dir.path(),
        "mode = \"distributed\"\nclip_norm = 1.0\nnoise_multiplier = 0.5\nepsilon = 0.5\ndelta = 1e-5",
    );
    let running = start(plan).await;
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for token in TOKENS {
        let mut c = client(&running.addr).await;
        let (id, spec) = join(&mut c, pb::Role::Federated, token).await.unwrap();
        // Distributed: each client's share is σC/√m.
        let share = spec.federated.unwrap().client_noise_stddev;
        assert!((share - 0.5 / 3f64.sqrt()).abs() < 1e-12);
        clients.push(c);
        ids.push(id);
    }
    // Nobody trains: the base version is evaluated by every client, then done.
    for (c, id) in clients.iter_mut().zip(&ids) {
        let task = next(c, id).await;
        let pb::next_task_response::Task::Eval(eval) = task else {
            panic!("expected Eval, got {task:?}");
        };
        assert_eq!(eval.version, 0);
        c.report_eval(pb::ReportEvalRequest {
            worker_id: id.clone(),
            version: 0,
            loss: 5.5,
            tokens: 100,
            accuracy: None,
        })
        .await
        .unwrap();
    }
    for (c, id) in clients.iter_mut().zip(&ids) {
        match next(c, id).await {
            pb::next_task_response::Task::Done(done) => {
                assert!(done.reason.contains("privacy budget"), "{}", done.reason)
            }
            other => panic!("expected Done, got {other:?}"),
        }
    }
    let outcome = running.outcome.await.unwrap();
    assert!(outcome.finished);
    assert_eq!(outcome.version.0, 0, "nothing was released");
}
