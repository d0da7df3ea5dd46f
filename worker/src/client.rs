//! The worker's gRPC loop against the coordinator: join, heartbeat, pull, train, push, evaluate, with retries.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_core::codec::{self, DType};
use cohort_core::model::ModelConfig;
use cohort_core::params::ParamLayout;
use cohort_core::rng::SplitMix64;
use cohort_proto::v1 as pb;
use futures::{Stream, StreamExt};
use pb::coordinator_client::CoordinatorClient;
use tch::Device;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;
use tracing::{debug, error, info, warn};

use crate::data::{self, DataError};
use crate::device::device_name;
use crate::optim::{InnerConfig, InnerKind};
use crate::trainer::{TrainStats, TrainerConfig, TrainerError, TrainerHandle};

/// HTTP/2 frame size the client advertises (the coordinator uses the same).
pub use cohort_proto::HTTP2_MAX_FRAME_SIZE;
/// Largest gRPC message the client encodes or decodes; chunks are far smaller.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

type Client = CoordinatorClient<Channel>;

/// Exponential backoff with jitter for transient failures (UNAVAILABLE, dropped connections).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// Attempts before giving up, the first one included.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    /// 200 ms doubling to 5 s, 20 attempts: about a minute of waiting in all.
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(5),
            max_attempts: 20,
        }
    }
}

impl RetryPolicy {
    /// Delay after failed attempt `attempt` (0-based): `min(cap, base·2^attempt)`, scaled
    /// into `[½, 1]` of that by `jitter` ∈ [0, 1).
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap);
        ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// Upper bound of the total time spent waiting before giving up.
    pub fn max_total_wait(&self) -> Duration {
        (0..self.max_attempts.saturating_sub(1))
            .map(|a| self.delay(a, 1.0))
            .sum()
    }
}

/// How the worker reaches the coordinator and what it runs on.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port`.
    pub coordinator: String,
    pub data_dir: PathBuf,
    pub device: Device,
    /// libtorch intra-op threads (0: libtorch's default).
    pub threads: usize,
    /// Where the inner optimizer state is kept between rounds and restarts (one directory per worker).
    pub state_dir: Option<PathBuf>,
    pub retry: RetryPolicy,
    pub hostname: String,
    /// Reported to the coordinator; 0 when unknown.
    pub device_memory_bytes: u64,
}

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid coordinator address {url:?}: {reason}")]
    BadAddress { url: String, reason: String },
    #[error(
        "coordinator unreachable: {op} failed {attempts} times, last with {code:?}: {message}"
    )]
    Unreachable {
        op: &'static str,
        attempts: u32,
        code: Code,
        message: String,
    },
    #[error("{op} failed with {code:?}: {message}")]
    Rpc {
        op: &'static str,
        code: Code,
        message: String,
    },
    #[error("the coordinator's job spec is unusable: {0}")]
    JobSpec(String),
    #[error("protocol violation in {op}: {reason}")]
    Protocol { op: &'static str, reason: String },
    #[error(transparent)]
    Trainer(#[from] TrainerError),
    #[error(transparent)]
    Data(#[from] DataError),
}

/// What the worker did before the coordinator said it was done.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSummary {
    pub rounds_pushed: u64,
    pub evals_reported: u64,
    /// Times the worker joined (more than one after lease expiries).
    pub joins: u64,
    pub done_reason: String,
}

/// A validated job spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub name: String,
    pub model: ModelConfig,
    pub inner: InnerConfig,
    pub inner_steps: u32,
    pub micro_batch_size: u32,
    pub update_dtype: DType,
    pub max_chunk_bytes: usize,
    pub seed: u64,
    pub layout: ParamLayout,
}

/// Checks a job spec against what this worker builds; refuses anything it cannot train exactly.
pub fn validate_job(spec: &pb::JobSpec) -> Result<Job, ClientError> {
    let bad = |reason: String| ClientError::JobSpec(reason);
    let m = spec
        .model
        .as_ref()
        .ok_or_else(|| bad("no model config".into()))?;
    let model = ModelConfig {
        vocab_size: m.vocab_size,
        context_length: m.context_length,
        n_layer: m.n_layer,
        n_head: m.n_head,
        d_model: m.d_model,
        dropout: m.dropout,
    };
    model.validate().map_err(|e| bad(e.to_string()))?;
    let specs = model.tensor_specs();
    if spec.tensors.len() != specs.len() {
        return Err(bad(format!(
            "job lists {} tensors, the worker's model has {} (incompatible model definitions)",
            spec.tensors.len(),
            specs.len()
        )));
    }
    for (index, (theirs, ours)) in spec.tensors.iter().zip(&specs).enumerate() {
        let shape: Vec<usize> = theirs.shape.iter().map(|&d| d as usize).collect();
        if theirs.name != ours.name || shape != ours.shape {
            return Err(bad(format!(
                "tensor {index} is {} {:?} in the job but {} {:?} in the worker's model",
                theirs.name, theirs.shape, ours.name, ours.shape
            )));
        }
    }
    let inner = spec
        .inner
        .as_ref()
        .ok_or_else(|| bad("no inner optimizer".into()))?;
    let kind = match pb::InnerOptimizerKind::try_from(inner.kind) {
        Ok(pb::InnerOptimizerKind::InnerOptimizerAdamw) => InnerKind::AdamW,
        Ok(pb::InnerOptimizerKind::InnerOptimizerSgd) => InnerKind::Sgd,
        _ => return Err(bad(format!("unknown inner optimizer kind {}", inner.kind))),
    };
    let finite_non_negative = |name: &str, x: f64| {
        if x.is_finite() && x >= 0.0 {
            Ok(())
        } else {
            Err(bad(format!(
                "inner.{name} must be finite and non-negative, got {x}"
            )))
        }
    };
    finite_non_negative("lr", inner.lr)?;
    finite_non_negative("eps", inner.eps)?;
    finite_non_negative("weight_decay", inner.weight_decay)?;
    finite_non_negative("grad_clip", inner.grad_clip)?;
    if kind == InnerKind::AdamW {
        for (name, beta) in [("beta1", inner.beta1), ("beta2", inner.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(bad(format!("inner.{name} must be in [0, 1), got {beta}")));
            }
        }
    }
    if spec.inner_steps == 0 {
        return Err(bad("inner_steps must be at least 1".into()));
    }
    if spec.micro_batch_size == 0 {
        return Err(bad("micro_batch_size must be at least 1".into()));
    }
    let update_dtype = match pb::DType::try_from(spec.update_dtype) {
        Ok(pb::DType::DtypeF32) => DType::F32,
        Ok(pb::DType::DtypeBf16) => DType::Bf16,
        _ => return Err(bad(format!("unknown update dtype {}", spec.update_dtype))),
    };
    let max_chunk_bytes = spec.max_chunk_bytes as usize;
    if max_chunk_bytes < 4 {
        return Err(bad(format!(
            "max_chunk_bytes must hold at least one f32, got {max_chunk_bytes}"
        )));
    }
    Ok(Job {
        name: spec.job_name.clone(),
        layout: ParamLayout::new(&specs),
        model,
        inner: InnerConfig {
            kind,
            lr: inner.lr,
            beta1: inner.beta1,
            beta2: inner.beta2,
            eps: inner.eps,
            weight_decay: inner.weight_decay,
            grad_clip: inner.grad_clip,
            warmup_steps: inner.warmup_steps,
        },
        inner_steps: spec.inner_steps,
        micro_batch_size: spec.micro_batch_size,
        update_dtype,
        max_chunk_bytes,
        seed: spec.seed,
    })
}

/// One chunk of a push: `len` elements of tensor `tensor_index` from element `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRange {
    pub tensor_index: u32,
    /// Offset in elements within the tensor.
    pub offset: usize,
    /// Offset in elements within the flat buffer.
    pub flat_offset: usize,
    pub len: usize,
}

/// Splits every tensor into chunks of at most `max_chunk_bytes` bytes of `dtype` (at least one
/// element), in spec order, never spanning two tensors.
pub fn chunk_plan(layout: &ParamLayout, dtype: DType, max_chunk_bytes: usize) -> Vec<ChunkRange> {
    let per_chunk = (max_chunk_bytes / dtype.size_bytes()).max(1);
    let mut plan = Vec::new();
    for (index, slot) in layout.tensors().iter().enumerate() {
        let mut offset = 0;
        while offset < slot.numel {
            let len = per_chunk.min(slot.numel - offset);
            plan.push(ChunkRange {
                tensor_index: index as u32,
                offset,
                flat_offset: slot.offset + offset,
                len,
            });
            offset += len;
        }
    }
    plan
}

/// The messages of a push: the header, then the encoded chunks (produced lazily).
pub fn update_stream(
    header: pb::PushHeader,
    delta: Arc<Vec<f32>>,
    plan: Vec<ChunkRange>,
    dtype: DType,
) -> impl Stream<Item = pb::UpdateChunk> + Send + 'static {
    let head = pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Header(header)),
    };
    let chunks = plan.into_iter().map(move |r| pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Chunk(pb::TensorChunk {
            tensor_index: r.tensor_index,
            offset: r.offset as u64,
            data: codec::encode(dtype, &delta[r.flat_offset..r.flat_offset + r.len]).into(),
        })),
    });
    futures::stream::iter(std::iter::once(head).chain(chunks))
}

/// Assembles a parameter stream into one flat buffer, validating every chunk: version,
/// tensor index and offset (contiguous, in order, in bounds), whole f32 values, all finite.
/// Validation failures are `DATA_LOSS` statuses; stream errors pass through.
pub async fn assemble_params<S>(
    layout: &ParamLayout,
    version: u64,
    mut stream: S,
) -> Result<(Vec<f32>, u64), Status>
where
    S: Stream<Item = Result<pb::ParamChunk, Status>> + Unpin,
{
    let mut flat = vec![0f32; layout.total()];
    let mut tensor = 0usize;
    let mut offset = 0usize;
    let mut bytes = 0u64;
    let mut scratch = Vec::new();
    let tensors = layout.tensors();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let fail = |reason: String| {
            Status::data_loss(format!(
                "bad parameter chunk (tensor {}, offset {}): {reason}",
                chunk.tensor_index, chunk.offset
            ))
        };
        if chunk.version != version {
            return Err(fail(format!(
                "version {} but {version} was pulled",
                chunk.version
            )));
        }
        let Some(slot) = tensors.get(tensor) else {
            return Err(fail("more data than the model has parameters".into()));
        };
        if chunk.tensor_index as usize != tensor || chunk.offset != offset as u64 {
            return Err(fail(format!("expected tensor {tensor} at offset {offset}")));
        }
        codec::decode_into(DType::F32, &chunk.data, &mut scratch)
            .map_err(|e| fail(e.to_string()))?;
        if scratch.is_empty() {
            return Err(fail("empty chunk".into()));
        }
        if offset + scratch.len() > slot.numel {
            return Err(fail(format!(
                "{} values overrun {} ({} elements)",
                scratch.len(),
                slot.name,
                slot.numel
            )));
        }
        let start = slot.offset + offset;
        flat[start..start + scratch.len()].copy_from_slice(&scratch);
        bytes += chunk.data.len() as u64;
        offset += scratch.len();
        if offset == slot.numel {
            tensor += 1;
            offset = 0;
        }
    }
    if tensor != tensors.len() {
        return Err(Status::data_loss(format!(
            "parameter stream ended at tensor {tensor} offset {offset} of {} tensors",
            tensors.len()
        )));
    }
    Ok((flat, bytes))
}

/// Codes worth retrying with backoff: the coordinator is restarting or the connection dropped.
pub fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::Aborted
        | Code::ResourceExhausted => true,
        Code::Internal => status.message().starts_with("h2 protocol error"),
        _ => false,
    }
}

/// A call that failed for good (after retries where they apply).
#[derive(Debug)]
struct Failure {
    op: &'static str,
    status: Status,
    /// Set when retries were exhausted.
    attempts: Option<u32>,
}

impl From<Failure> for ClientError {
    fn from(f: Failure) -> ClientError {
        match f.attempts {
            Some(attempts) => ClientError::Unreachable {
                op: f.op,
                attempts,
                code: f.status.code(),
                message: f.status.message().to_string(),
            },
            None if f.status.code() == Code::DataLoss => ClientError::Protocol {
                op: f.op,
                reason: f.status.message().to_string(),
            },
            None => ClientError::Rpc {
                op: f.op,
                code: f.status.code(),
                message: f.status.message().to_string(),
            },
        }
    }
}

/// How a task ended other than successfully.
enum Interrupt {
    /// The coordinator no longer knows this worker: join again.
    Rejoin,
    /// The task was refused (stale, unassigned, invalid): ask for the next one.
    Skip,
    Fatal(ClientError),
}

impl From<ClientError> for Interrupt {
    fn from(e: ClientError) -> Interrupt {
        Interrupt::Fatal(e)
    }
}

impl From<TrainerError> for Interrupt {
    fn from(e: TrainerError) -> Interrupt {
        Interrupt::Fatal(e.into())
    }
}

impl From<DataError> for Interrupt {
    fn from(e: DataError) -> Interrupt {
        Interrupt::Fatal(e.into())
    }
}

impl From<Failure> for Interrupt {
    fn from(f: Failure) -> Interrupt {
        if f.attempts.is_some() {
            return Interrupt::Fatal(f.into());
        }
        match f.status.code() {
            Code::NotFound => {
                warn!(
                    op = f.op,
                    detail = f.status.message(),
                    "coordinator does not know this worker"
                );
                Interrupt::Rejoin
            }
            Code::FailedPrecondition => {
                warn!(
                    op = f.op,
                    detail = f.status.message(),
                    "task refused, asking for the next one"
                );
                Interrupt::Skip
            }
            Code::InvalidArgument => {
                error!(
                    op = f.op,
                    detail = f.status.message(),
                    "coordinator rejected the request as invalid"
                );
                Interrupt::Skip
            }
            _ => Interrupt::Fatal(f.into()),
        }
    }
}

/// Aborts the heartbeat task when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Session {
    worker_id: String,
    job: Job,
    lost: Arc<AtomicBool>,
    _heartbeat: AbortOnDrop,
}

/// The worker: one channel to the coordinator, one training thread.
pub struct Worker {
    config: ClientConfig,
    client: Client,
    rng: Mutex<SplitMix64>,
    trainer: Option<TrainerHandle>,
    summary: RunSummary,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("summary", &self.summary)
            .finish()
    }
}

/// Connects (lazily) and runs the worker until the coordinator says it is done.
pub async fn run(config: ClientConfig) -> Result<RunSummary, ClientError> {
    Worker::new(config)?.run().await
}

impl Worker {
    /// Sets up the channel; nothing is sent until [`Worker::run`].
    pub fn new(config: ClientConfig) -> Result<Worker, ClientError> {
        let bad = |reason: String| ClientError::BadAddress {
            url: config.coordinator.clone(),
            reason,
        };
        let endpoint = Endpoint::from_shared(config.coordinator.clone())
            .map_err(|e| bad(e.to_string()))?
            .max_frame_size(HTTP2_MAX_FRAME_SIZE)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let channel = endpoint.connect_lazy();
        let client = CoordinatorClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        Ok(Worker {
            config,
            client,
            rng: Mutex::new(SplitMix64::new(seed)),
            trainer: None,
            summary: RunSummary::default(),
        })
    }

    fn jitter(&self) -> f64 {
        self.rng.lock().map_or(0.5, |mut r| r.next_f64())
    }

    /// Runs `f` with a fresh client handle, retrying transient failures with backoff.
    async fn call<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let policy = self.config.retry;
        let mut attempt = 0u32;
        loop {
            match f(self.client.clone()).await {
                Ok(value) => return Ok(value),
                Err(status) if is_transient(&status) => {
                    attempt += 1;
                    if attempt >= policy.max_attempts.max(1) {
                        return Err(Failure {
                            op,
                            status,
                            attempts: Some(attempt),
                        });
                    }
                    let delay = policy.delay(attempt - 1, self.jitter());
                    warn!(
                        op,
                        attempt,
                        code = ?status.code(),
                        detail = status.message(),
                        retry_in_ms = delay.as_millis() as u64,
                        "coordinator call failed, retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(status) => {
                    return Err(Failure {
                        op,
                        status,
                        attempts: None,
                    })
                }
            }
        }
    }

    /// Joins until the coordinator says done or an error is fatal.
    pub async fn run(mut self) -> Result<RunSummary, ClientError> {
        loop {
            let session = self.join().await?;
            match self.serve(&session).await {
                Ok(reason) => {
                    info!(reason = %reason, rounds = self.summary.rounds_pushed, "coordinator says the job is done");
                    self.summary.done_reason = reason;
                    return Ok(self.summary);
                }
                Err(Interrupt::Rejoin) => {
                    warn!(worker_id = %session.worker_id, "lease lost, joining again");
                }
                Err(Interrupt::Skip) => {}
                Err(Interrupt::Fatal(e)) => return Err(e),
            }
        }
    }

    async fn join(&mut self) -> Result<Session, ClientError> {
        let request = pb::JoinRequest {
            token: String::new(),
            info: Some(pb::WorkerInfo {
                hostname: self.config.hostname.clone(),
                device: device_name(self.config.device),
                device_memory_bytes: self.config.device_memory_bytes,
                role: pb::Role::Pretrain as i32,
            }),
        };
        let response = self
            .call("join", |mut c| {
                let request = request.clone();
                async move { c.join(request).await.map(tonic::Response::into_inner) }
            })
            .await?;
        let spec = response
            .job
            .as_ref()
            .ok_or_else(|| ClientError::JobSpec("the join response carries no job".into()))?;
        let job = validate_job(spec)?;
        info!(
            worker_id = %response.worker_id,
            job = %job.name,
            parameters = job.layout.total(),
            lease_ms = response.lease_ms,
            heartbeat_interval_ms = response.heartbeat_interval_ms,
            inner_steps = job.inner_steps,
            "joined"
        );
        self.summary.joins += 1;
        self.ensure_trainer(&job).await?;

        let lost = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_millis(response.heartbeat_interval_ms.max(50));
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            response.worker_id.clone(),
            interval,
            lost.clone(),
        ));
        Ok(Session {
            worker_id: response.worker_id,
            job,
            lost,
            _heartbeat: AbortOnDrop(heartbeat),
        })
    }

    async fn ensure_trainer(&mut self, job: &Job) -> Result<(), ClientError> {
        let state_path = self.config.state_dir.as_ref().map(|dir| {
            let name: String = job
                .name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            dir.join(format!("{name}.inner-optimizer.safetensors"))
        });
        let wanted = TrainerConfig {
            model: job.model.clone(),
            inner: job.inner.clone(),
            inner_steps: job.inner_steps,
            micro_batch_size: job.micro_batch_size,
            device: self.config.device,
            threads: self.config.threads,
            seed: job.seed,
            state_path,
        };
        if self.trainer.as_ref().is_some_and(|t| *t.config() == wanted) {
            return Ok(());
        }
        if self.trainer.is_some() {
            warn!(job = %job.name, "the job changed, restarting the trainer");
        }
        self.trainer = None;
        self.trainer = Some(TrainerHandle::spawn(wanted).await?);
        Ok(())
    }

    fn trainer(&self) -> Result<&TrainerHandle, Interrupt> {
        self.trainer
            .as_ref()
            .ok_or(Interrupt::Fatal(ClientError::Trainer(
                TrainerError::Stopped,
            )))
    }

    /// Serves tasks until Done (returns its reason) or an interrupt.
    async fn serve(&mut self, session: &Session) -> Result<String, Interrupt> {
        loop {
            if session.lost.load(Ordering::Relaxed) {
                return Err(Interrupt::Rejoin);
            }
            let request = pb::NextTaskRequest {
                worker_id: session.worker_id.clone(),
            };
            let task = self
                .call("next_task", |mut c| {
                    let request = request.clone();
                    async move { c.next_task(request).await.map(tonic::Response::into_inner) }
                })
                .await
                .map_err(Interrupt::from);
            let task = match task {
                Ok(response) => response.task,
                Err(Interrupt::Skip) => {
                    tokio::time::sleep(self.config.retry.base).await;
                    continue;
                }
                Err(other) => return Err(other),
            };
            let outcome = match task {
                Some(pb::next_task_response::Task::Train(train)) => {
                    // One span per round: every line the round logs carries its ids.
                    let span = tracing::info_span!(
                        "round",
                        worker = %session.worker_id,
                        round = train.round,
                        version = train.version
                    );
                    self.train(session, train).instrument(span).await
                }
                Some(pb::next_task_response::Task::Eval(eval)) => {
                    let span = tracing::info_span!(
                        "eval",
                        worker = %session.worker_id,
                        version = eval.version
                    );
                    self.eval(session, eval).instrument(span).await
                }
                Some(pb::next_task_response::Task::Wait(wait)) => {
                    let ms = wait.retry_after_ms.clamp(10, 60_000);
                    debug!(retry_after_ms = ms, "waiting");
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(())
                }
                Some(pb::next_task_response::Task::Done(done)) => return Ok(done.reason),
                None => {
                    return Err(Interrupt::Fatal(ClientError::Protocol {
                        op: "next_task",
                        reason: "empty task".into(),
                    }))
                }
            };
            match outcome {
                Ok(()) | Err(Interrupt::Skip) => {}
                Err(other) => return Err(other),
            }
        }
    }

    async fn pull(&self, session: &Session, version: u64) -> Result<(Vec<f32>, u64), Interrupt> {
        let request = pb::PullParamsRequest {
            base: false,
            worker_id: session.worker_id.clone(),
            version,
        };
        let layout = &session.job.layout;
        Ok(self
            .call("pull_params", |mut c| {
                let request = request.clone();
                async move {
                    let stream = c.pull_params(request).await?.into_inner();
                    assemble_params(layout, version, stream).await
                }
            })
            .await?)
    }

    fn shard_paths(&self, shards: &[pb::ShardRef]) -> Result<Vec<PathBuf>, DataError> {
        shards
            .iter()
            .map(|s| data::shard_path(&self.config.data_dir, &s.file_name))
            .collect()
    }

    async fn train(&mut self, session: &Session, task: pb::TrainTask) -> Result<(), Interrupt> {
        let start = Instant::now();
        let shards = self.shard_paths(&task.shards)?;
        let eval_shards = self.shard_paths(&task.eval_shards)?;
        debug!(
            round = task.round,
            version = task.version,
            shards = shards.len(),
            deadline_ms = task.deadline_ms,
            "train task"
        );
        let (params, pulled_bytes) = self.pull(session, task.version).await?;
        let out = self.trainer()?.train(params, shards, eval_shards).await?;
        let stats = out.stats;
        let job = &session.job;
        let plan = chunk_plan(&job.layout, job.update_dtype, job.max_chunk_bytes);
        let pushed_bytes: u64 = plan
            .iter()
            .map(|r| (r.len * job.update_dtype.size_bytes()) as u64)
            .sum();
        let header = pb::PushHeader {
            worker_id: session.worker_id.clone(),
            round: task.round,
            base_version: task.version,
            dtype: match job.update_dtype {
                DType::F32 => pb::DType::DtypeF32,
                DType::Bf16 => pb::DType::DtypeBf16,
            } as i32,
            stats: Some(stats_to_proto(&stats)),
        };
        let delta = Arc::new(out.delta);
        let dtype = job.update_dtype;
        let response = self
            .call("push_update", |mut c| {
                let stream = update_stream(header.clone(), delta.clone(), plan.clone(), dtype);
                async move { c.push_update(stream).await.map(tonic::Response::into_inner) }
            })
            .await?;
        self.summary.rounds_pushed += 1;
        let seconds = start.elapsed().as_secs_f64();
        info!(
            round = task.round,
            version = task.version,
            loss = stats.mean_loss,
            eval_loss = stats.eval_loss,
            tokens = stats.tokens,
            tokens_per_s = stats.tokens as f64 / stats.seconds.max(1e-9),
            pulled_bytes,
            pushed_bytes,
            train_seconds = stats.seconds,
            seconds,
            received = response.received,
            expected = response.expected,
            "round trained"
        );
        Ok(())
    }

    async fn eval(&mut self, session: &Session, task: pb::EvalTask) -> Result<(), Interrupt> {
        let start = Instant::now();
        let eval_shards = self.shard_paths(&task.eval_shards)?;
        let (params, pulled_bytes) = self.pull(session, task.version).await?;
        let out = self.trainer()?.eval(params, eval_shards).await?;
        let request = pb::ReportEvalRequest {
            worker_id: session.worker_id.clone(),
            version: task.version,
            loss: out.loss,
            tokens: out.tokens,
        };
        self.call("report_eval", |mut c| {
            let request = request.clone();
            async move { c.report_eval(request).await }
        })
        .await?;
        self.summary.evals_reported += 1;
        info!(
            version = task.version,
            eval_loss = out.loss,
            tokens = out.tokens,
            pulled_bytes,
            seconds = start.elapsed().as_secs_f64(),
            "version evaluated"
        );
        Ok(())
    }
}

fn stats_to_proto(stats: &TrainStats) -> pb::TrainStats {
    pb::TrainStats {
        mean_loss: stats.mean_loss,
        tokens: stats.tokens,
        train_seconds: stats.seconds,
        eval_loss: stats.eval_loss,
        eval_tokens: stats.eval_tokens,
    }
}

async fn heartbeat_loop(
    mut client: Client,
    worker_id: String,
    interval: Duration,
    lost: Arc<AtomicBool>,
) {
    loop {
        tokio::time::sleep(interval).await;
        let request = pb::HeartbeatRequest {
            worker_id: worker_id.clone(),
        };
        match client.heartbeat(request).await {
            Ok(_) => debug!(worker_id = %worker_id, "heartbeat"),
            Err(status) if status.code() == Code::NotFound => {
                warn!(worker_id = %worker_id, "heartbeat: lease expired");
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(status) => {
                warn!(worker_id = %worker_id, code = ?status.code(), detail = status.message(), "heartbeat failed");
            }
        }
    }
}

/// This machine's host name (for the coordinator's logs).
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 32,
            context_length: 4,
            n_layer: 1,
            n_head: 2,
            d_model: 4,
            dropout: 0.0,
        }
    }

    pub(crate) fn job_spec(model: &ModelConfig) -> pb::JobSpec {
        pb::JobSpec {
            federated: None,
            job_name: "t".into(),
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
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_clip: 1.0,
                warmup_steps: 10,
            }),
            inner_steps: 2,
            micro_batch_size: 4,
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
            max_chunk_bytes: 64,
            seed: 3,
        }
    }

    #[test]
    fn job_spec_must_match_the_model() {
        let model = tiny();
        let job = validate_job(&job_spec(&model)).unwrap();
        assert_eq!(job.model, model);
        assert_eq!(job.update_dtype, DType::Bf16);
        assert_eq!(job.inner.kind, InnerKind::AdamW);
        assert_eq!(job.layout.total(), model.parameter_count());

        let mut renamed = job_spec(&model);
        renamed.tensors[3].name = "h.0.attn.qkv.weight".into();
        let err = validate_job(&renamed).unwrap_err().to_string();
        assert!(err.contains("h.0.attn.qkv.weight"), "{err}");
        let mut reshaped = job_spec(&model);
        reshaped.tensors[0].shape = vec![4, 32];
        assert!(matches!(
            validate_job(&reshaped),
            Err(ClientError::JobSpec(_))
        ));
        let mut missing = job_spec(&model);
        missing.tensors.pop();
        assert!(validate_job(&missing).is_err());
        let mut dtype = job_spec(&model);
        dtype.update_dtype = 0;
        assert!(validate_job(&dtype).is_err());
        let mut steps = job_spec(&model);
        steps.inner_steps = 0;
        assert!(validate_job(&steps).is_err());
    }

    #[test]
    fn chunks_respect_the_byte_limit_and_tensor_boundaries() {
        let layout = ParamLayout::new(&tiny().tensor_specs());
        for (dtype, max) in [
            (DType::F32, 64usize),
            (DType::Bf16, 64),
            (DType::F32, 5),
            (DType::Bf16, 1),
        ] {
            let plan = chunk_plan(&layout, dtype, max);
            let mut next = 0;
            for r in &plan {
                assert_eq!(r.flat_offset, next, "chunks are contiguous and in order");
                let slot = &layout.tensors()[r.tensor_index as usize];
                assert!(r.offset + r.len <= slot.numel, "a chunk spans two tensors");
                assert_eq!(slot.offset + r.offset, r.flat_offset);
                assert!(r.len * dtype.size_bytes() <= max.max(dtype.size_bytes()));
                next += r.len;
            }
            assert_eq!(next, layout.total());
        }
        // 16 f32 per 64-byte chunk: wte (32x4 = 128) is 8 chunks.
        let plan = chunk_plan(&layout, DType::F32, 64);
        assert_eq!(plan.iter().filter(|r| r.tensor_index == 0).count(), 8);
    }

    #[tokio::test]
    async fn update_stream_encodes_header_then_chunks() {
        let layout = ParamLayout::new(&tiny().tensor_specs());
        let delta: Vec<f32> = (0..layout.total()).map(|i| i as f32 * 0.5).collect();
        let plan = chunk_plan(&layout, DType::F32, 40);
        let n = plan.len();
        let header = pb::PushHeader {
            round: 7,
            ..Default::default()
        };
        let messages: Vec<pb::UpdateChunk> =
            update_stream(header, Arc::new(delta.clone()), plan, DType::F32)
                .collect()
                .await;
        assert_eq!(messages.len(), n + 1);
        assert!(
            matches!(&messages[0].kind, Some(pb::update_chunk::Kind::Header(h)) if h.round == 7)
        );
        let mut rebuilt = Vec::new();
        let mut values = Vec::new();
        for m in &messages[1..] {
            let Some(pb::update_chunk::Kind::Chunk(c)) = &m.kind else {
                panic!("expected a chunk");
            };
            assert!(c.data.len() <= 40);
            codec::decode_into(DType::F32, &c.data, &mut values).unwrap();
            rebuilt.extend_from_slice(&values);
        }
        assert_eq!(rebuilt, delta);
    }

    fn chunk(
        version: u64,
        tensor_index: u32,
        offset: u64,
        values: &[f32],
    ) -> Result<pb::ParamChunk, Status> {
        Ok(pb::ParamChunk {
            version,
            tensor_index,
            offset,
            data: codec::encode(DType::F32, values).into(),
        })
    }

    type Chunks = Vec<Result<pb::ParamChunk, Status>>;

    fn good_chunks(layout: &ParamLayout, flat: &[f32], version: u64) -> Chunks {
        chunk_plan(layout, DType::F32, 24)
            .iter()
            .map(|r| {
                chunk(
                    version,
                    r.tensor_index,
                    r.offset as u64,
                    &flat[r.flat_offset..r.flat_offset + r.len],
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn pulled_chunks_are_assembled_and_validated() {
        let layout = ParamLayout::new(&tiny().tensor_specs());
        let flat: Vec<f32> = (0..layout.total()).map(|i| (i as f32).sin()).collect();
        let chunks = good_chunks(&layout, &flat, 4);
        let (got, bytes) = assemble_params(&layout, 4, futures::stream::iter(chunks.clone()))
            .await
            .unwrap();
        assert_eq!(got, flat);
        assert_eq!(bytes, layout.total() as u64 * 4);

        let check = |mut chunks: Chunks, edit: &dyn Fn(&mut Chunks), needle: &str| {
            edit(&mut chunks);
            let layout = layout.clone();
            let needle = needle.to_string();
            async move {
                let err = assemble_params(&layout, 4, futures::stream::iter(chunks))
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), Code::DataLoss, "{err:?}");
                assert!(
                    err.message().contains(&needle),
                    "{} does not mention {needle}",
                    err.message()
                );
            }
        };
        check(
            chunks.clone(),
            &|c| c[2] = chunk(5, 0, 12, &[0.0; 6]),
            "version 5",
        )
        .await;
        check(
            chunks.clone(),
            &|c| {
                let _ = c.remove(1);
            },
            "expected tensor 0 at offset 6",
        )
        .await;
        check(
            chunks.clone(),
            &|c| {
                c.pop();
            },
            "ended",
        )
        .await;
        check(
            chunks.clone(),
            &|c| c[0] = chunk(4, 0, 0, &[0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0]),
            "not finite",
        )
        .await;
        check(
            chunks.clone(),
            &|c| {
                if let Ok(first) = &mut c[0] {
                    first.data = first.data.slice(..7);
                }
            },
            "whole number",
        )
        .await;
        // Overrunning wte (128 values) from offset 126.
        let mut overrun: Vec<_> = (0..21).map(|i| chunk(4, 0, i * 6, &[0.0; 6])).collect();
        overrun.push(chunk(4, 0, 126, &[0.0; 4]));
        let err = assemble_params(&layout, 4, futures::stream::iter(overrun))
            .await
            .unwrap_err();
        assert!(err.message().contains("overrun"), "{}", err.message());
        // Errors from the stream itself pass through unchanged for the retry logic.
        let mut broken = chunks.clone();
        broken[3] = Err(Status::unavailable("connection reset"));
        let err = assemble_params(&layout, 4, futures::stream::iter(broken))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_is_bounded() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(0, 1.0), Duration::from_millis(200));
        assert_eq!(policy.delay(0, 0.0), Duration::from_millis(100));
        assert_eq!(policy.delay(3, 1.0), Duration::from_millis(1600));
        assert_eq!(policy.delay(10, 1.0), Duration::from_secs(5));
        assert_eq!(policy.delay(100, 1.0), Duration::from_secs(5));
        let total = policy.max_total_wait();
        assert!(
            total >= Duration::from_secs(50) && total <= Duration::from_secs(90),
            "{total:?}"
        );
        assert!(is_transient(&Status::unavailable("x")));
        assert!(!is_transient(&Status::not_found("x")));
        assert!(!is_transient(&Status::failed_precondition("x")));
        assert!(!is_transient(&Status::invalid_argument("x")));
    }
}
