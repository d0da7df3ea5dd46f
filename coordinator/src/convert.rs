//! The one place where wire types meet domain types, and where domain errors
//! become gRPC statuses.

use cohort_core::codec::{CodecError, DType};
use cohort_core::engine::{EngineError, PushHeader, PushStats, ShardInfo, Task, WorkerInfo};
use cohort_core::ids::{RoundId, Version, WorkerId};
use cohort_proto::v1 as pb;
use tonic::{Code, Status};

use crate::config::{FederatedPlan, InnerKind, JobPlan, Trainable};
use crate::data::TokenizerKind;
use cohort_core::federated::{DpMode, FederatedTask};
use cohort_core::model::TensorSpec;

/// Maps each domain error to its gRPC status. Workers treat NOT_FOUND as
/// "join again", FAILED_PRECONDITION as "ask for the next task",
/// INVALID_ARGUMENT as a bug on their side, UNAVAILABLE as "retry";
/// PERMISSION_DENIED and UNAUTHENTICATED (a worker id used without its
/// session) stop them.
pub fn status_from_engine(error: &EngineError) -> Status {
    let code = match error {
        EngineError::UnknownWorker(_) => Code::NotFound,
        EngineError::SessionMismatch(_) => Code::PermissionDenied,
        EngineError::MissingSession(_) => Code::Unauthenticated,
        EngineError::StaleRound { .. }
        | EngineError::StaleVersion { .. }
        | EngineError::NotAssigned { .. }
        | EngineError::AlreadyPushed { .. }
        | EngineError::NoOpenPush(_)
        | EngineError::UnexpectedEval { .. }
        | EngineError::NoPendingRelease(_)
        | EngineError::JobFinished => Code::FailedPrecondition,
        EngineError::PushInProgress => Code::Unavailable,
        EngineError::StreamFailed(_) => Code::Aborted,
        EngineError::WrongDtype { .. }
        | EngineError::UnknownTensor { .. }
        | EngineError::ChunkOutOfOrder { .. }
        | EngineError::ChunkOverrunsTensor { .. }
        | EngineError::ChunkTooLarge { .. }
        | EngineError::EmptyChunk
        | EngineError::IncompletePush { .. }
        | EngineError::UpdateNormTooLarge { .. }
        | EngineError::InvalidStats(_) => Code::InvalidArgument,
    };
    Status::new(code, error.to_string())
}

pub fn status_from_codec(error: &CodecError) -> Status {
    Status::invalid_argument(format!("update rejected: {error}"))
}

pub fn worker_id(text: &str) -> Result<WorkerId, Status> {
    WorkerId::parse(text)
        .ok_or_else(|| Status::invalid_argument(format!("malformed worker id {text:?}")))
}

pub fn dtype_from_proto(value: i32) -> Result<DType, Status> {
    match pb::DType::try_from(value) {
        Ok(pb::DType::DtypeF32) => Ok(DType::F32),
        Ok(pb::DType::DtypeBf16) => Ok(DType::Bf16),
        _ => Err(Status::invalid_argument(format!(
            "unknown or unspecified dtype {value}"
        ))),
    }
}

pub fn dtype_to_proto(dtype: DType) -> pb::DType {
    match dtype {
        DType::F32 => pb::DType::DtypeF32,
        DType::Bf16 => pb::DType::DtypeBf16,
    }
}

pub fn worker_info_from_proto(info: Option<pb::WorkerInfo>) -> Result<WorkerInfo, Status> {
    let info = info.ok_or_else(|| Status::invalid_argument("join request without worker info"))?;
    Ok(WorkerInfo {
        hostname: info.hostname,
        device: info.device,
        device_memory_bytes: info.device_memory_bytes,
        client: None,
        session: None,
    })
}

pub fn push_header_from_proto(header: pb::PushHeader) -> Result<(WorkerId, PushHeader), Status> {
    let worker = worker_id(&header.worker_id)?;
    let stats = header
        .stats
        .ok_or_else(|| Status::invalid_argument("push header without stats"))?;
    Ok((
        worker,
        PushHeader {
            round: RoundId(header.round),
            base_version: Version(header.base_version),
            dtype: dtype_from_proto(header.dtype)?,
            stats: PushStats {
                mean_loss: stats.mean_loss,
                tokens: stats.tokens,
                train_seconds: stats.train_seconds,
                eval_loss: stats.eval_loss,
                eval_tokens: stats.eval_tokens,
                eval_accuracy: stats.eval_accuracy,
            },
        },
    ))
}

fn shard_to_proto(shard: ShardInfo) -> pb::ShardRef {
    pb::ShardRef {
        shard_id: shard.id.0,
        file_name: shard.file_name,
        num_tokens: shard.num_tokens,
    }
}

pub fn task_to_proto(task: Task) -> pb::NextTaskResponse {
    use pb::next_task_response::Task as T;
    let task = match task {
        Task::Train {
            round,
            version,
            shards,
            eval_shards,
            deadline_in,
        } => T::Train(pb::TrainTask {
            round: round.0,
            version: version.0,
            shards: shards.into_iter().map(shard_to_proto).collect(),
            eval_shards: eval_shards.into_iter().map(shard_to_proto).collect(),
            deadline_ms: deadline_in.as_millis() as u64,
        }),
        Task::Eval {
            version,
            eval_shards,
        } => T::Eval(pb::EvalTask {
            version: version.0,
            eval_shards: eval_shards.into_iter().map(shard_to_proto).collect(),
        }),
        Task::Wait { retry_after } => T::Wait(pb::WaitTask {
            retry_after_ms: retry_after.as_millis() as u64,
        }),
        Task::Done { reason } => T::Done(pb::DoneTask { reason }),
    };
    pb::NextTaskResponse { task: Some(task) }
}

pub fn job_spec_to_proto(plan: &JobPlan) -> pb::JobSpec {
    let m = &plan.model;
    let i = &plan.inner;
    pb::JobSpec {
        federated: plan
            .federated
            .as_ref()
            .map(|f| federated_spec_to_proto(plan, f)),
        job_name: plan.name.clone(),
        model: Some(pb::ModelConfig {
            vocab_size: m.vocab_size,
            context_length: m.context_length,
            n_layer: m.n_layer,
            n_head: m.n_head,
            d_model: m.d_model,
            dropout: m.dropout,
        }),
        inner: Some(pb::InnerOptimizer {
            kind: match i.kind {
                InnerKind::Adamw => pb::InnerOptimizerKind::InnerOptimizerAdamw,
                InnerKind::Sgd => pb::InnerOptimizerKind::InnerOptimizerSgd,
            } as i32,
            lr: i.lr,
            beta1: i.beta1,
            beta2: i.beta2,
            eps: i.eps,
            weight_decay: i.weight_decay,
            grad_clip: i.grad_clip,
            warmup_steps: i.warmup_steps,
        }),
        inner_steps: plan.inner_steps,
        micro_batch_size: plan.micro_batch_size,
        update_dtype: dtype_to_proto(plan.engine.update_dtype) as i32,
        tensors: plan
            .engine
            .tensors
            .iter()
            .map(|t| pb::TensorSpec {
                name: t.name.clone(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
            })
            .collect(),
        tokenizer: match plan.tokenizer {
            TokenizerKind::Byte => pb::Tokenizer::Byte,
            TokenizerKind::Gpt2 => pb::Tokenizer::Gpt2,
        } as i32,
        max_chunk_bytes: plan.max_chunk_bytes,
        seed: plan.engine.seed,
    }
}

fn tensor_specs_to_proto(tensors: &[TensorSpec]) -> Vec<pb::TensorSpec> {
    tensors
        .iter()
        .map(|t| pb::TensorSpec {
            name: t.name.clone(),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
        })
        .collect()
}

fn federated_spec_to_proto(plan: &JobPlan, f: &FederatedPlan) -> pb::FederatedSpec {
    let rules = plan
        .engine
        .federated
        .as_ref()
        .expect("a federated plan has federated rules");
    let (trainable, lora) = match f.trainable {
        Trainable::Full => (pb::Trainable::Full, None),
        Trainable::Lora { rank, alpha } => {
            (pb::Trainable::Lora, Some(pb::LoraSpec { rank, alpha }))
        }
    };
    pb::FederatedSpec {
        trainable: trainable as i32,
        lora,
        local_steps: plan.inner_steps,
        clip_norm: rules.clip_norm,
        dp_mode: match rules.dp_mode {
            DpMode::None => pb::DpMode::None,
            DpMode::Distributed => pb::DpMode::Distributed,
            DpMode::Local => pb::DpMode::Local,
            DpMode::Central => pb::DpMode::Central,
        } as i32,
        client_noise_stddev: f.client_noise_stddev,
        base_tensors: tensor_specs_to_proto(&f.base_tensors),
        task: match f.task {
            FederatedTask::NextToken => pb::FederatedTask::NextToken,
            FederatedTask::Classification { .. } => pb::FederatedTask::Classification,
        } as i32,
        num_classes: f.task.num_classes().unwrap_or(0),
    }
}

/// The Status RPC's answer: the engine's view (phase, round, workers,
/// privacy) with this process's progress (last round, rate, ETA).
pub fn status_to_proto(
    job_name: &str,
    engine: &cohort_core::engine::RoundEngine,
    progress: &crate::observe::Progress,
    now: std::time::Instant,
) -> pb::StatusResponse {
    let config = engine.config();
    let committed = engine.committed_rounds();
    let privacy = config
        .federated
        .as_ref()
        .and_then(|f| f.budget.as_ref())
        .map(|budget| {
            let ledger = engine.privacy_ledger();
            let spent = ledger
                .epsilon(budget.delta)
                .map_or(0.0, |report| report.epsilon);
            pb::PrivacyStatus {
                epsilon_spent: spent,
                epsilon_budget: budget.epsilon,
                epsilon_remaining: (budget.epsilon - spent).max(0.0),
                delta: budget.delta,
                rounds_charged: ledger.rounds(),
            }
        });
    let eta_seconds = (config.max_rounds > 0 && !engine.is_finished())
        .then(|| progress.eta(config.max_rounds.saturating_sub(committed), now))
        .flatten()
        .map(|eta| eta.as_secs_f64());
    pb::StatusResponse {
        job_name: job_name.to_string(),
        phase: engine.phase_name().to_string(),
        federated: config.federated.is_some(),
        current_round: engine.current_round().map_or(0, |r| r.0),
        version: engine.version().0,
        committed_rounds: committed,
        max_rounds: config.max_rounds,
        max_epochs: config.max_epochs,
        epochs_completed: engine.epochs_completed(),
        workers: engine
            .worker_statuses(now)
            .iter()
            .map(worker_status_to_proto)
            .collect(),
        last_round: progress.last_round.as_ref().map_or(0, |r| r.round),
        last_mean_loss: progress.last_round.as_ref().map(|r| r.mean_loss),
        last_eval_loss: progress.latest_eval_loss,
        privacy,
        rounds_per_second: progress.rounds_per_second(now),
        eta_seconds,
        last_eval_accuracy: progress.latest_eval_accuracy,
    }
}

fn worker_status_to_proto(status: &cohort_core::engine::WorkerStatus) -> pb::WorkerStatus {
    use cohort_core::engine::WorkerActivity;
    let (state, round) = match status.activity {
        WorkerActivity::Idle => (pb::WorkerState::Idle, 0),
        WorkerActivity::Training { round } => (pb::WorkerState::Training, round.0),
        WorkerActivity::Pushing { round } => (pb::WorkerState::Pushing, round.0),
        WorkerActivity::Pushed { round } => (pb::WorkerState::Pushed, round.0),
        WorkerActivity::Evaluating { .. } => (pb::WorkerState::Evaluating, 0),
        WorkerActivity::Released => (pb::WorkerState::Released, 0),
    };
    pb::WorkerStatus {
        worker_id: status.worker.to_string(),
        hostname: status.hostname.clone(),
        device: status.device.clone(),
        state: state as i32,
        round,
        lease_remaining_ms: status.lease_remaining.as_millis() as u64,
        client: status.client.clone().unwrap_or_default(),
    }
}
