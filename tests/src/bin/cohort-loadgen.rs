//! `cohort-loadgen`: many simulated pretraining clients in one process, without tch.
//!
//! Each client is a tokio task with its own connection. It joins (role
//! PRETRAIN), heartbeats at the interval the coordinator gives, asks for tasks,
//! pulls the parameters (validating every chunk, then discarding them) and
//! pushes a small random pseudo-gradient generated chunk by chunk from a seeded
//! PRNG, until the coordinator says it is done. No client holds a copy of the
//! model. At the end a summary is printed to stderr and, as one JSON line, to
//! stdout; the exit status is non-zero if any client hit an unexpected error
//! or the deadline passed.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use cohort_core::codec::{self, DType};
use cohort_core::rng::SplitMix64;
use cohort_proto::session::SessionAuth;
use cohort_proto::v1 as pb;
use futures::StreamExt;
use pb::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Largest gRPC message a client encodes or decodes (chunks are far smaller).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Attempts per call on transient failures (UNAVAILABLE and the like).
const MAX_ATTEMPTS: u32 = 6;
/// Upper bound on the tasks one client asks for, so every loop is bounded.
const MAX_TASKS_PER_CLIENT: u64 = 1_000_000;
/// Times one client may join (the first join included) after losing its lease.
const MAX_JOINS: u32 = 3;
/// Unexpected error messages kept for the summary.
const MAX_ERROR_MESSAGES: usize = 20;

#[derive(Parser, Debug)]
#[command(
    name = "cohort-loadgen",
    about = "Simulated pretraining clients for load-testing a coordinator"
)]
struct Cli {
    /// The coordinator, `http://host:port`.
    #[arg(long)]
    coordinator: String,
    /// Simulated clients, each with its own connection.
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Rounds each client takes part in at most: after pushing this many
    /// times a client leaves when offered another round (0: no limit). Clients
    /// stay for evaluation and waits until the coordinator says done.
    #[arg(long, default_value_t = 0)]
    rounds: u64,
    /// Deadline for the whole run, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Simulated training time per round, in milliseconds.
    #[arg(long, default_value_t = 0)]
    train_ms: u64,
    /// Seed of the pseudo-gradients.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Magnitude of the uniform pseudo-gradient values.
    #[arg(long, default_value_t = 1e-3)]
    amplitude: f32,
    /// Pulls in flight at once across all clients (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_pulls_in_flight: usize,
    /// Pushes in flight at once across all clients (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_pushes_in_flight: usize,
}

/// An optional cap on concurrent calls of one kind.
fn limiter(limit: usize) -> Option<Arc<tokio::sync::Semaphore>> {
    (limit > 0).then(|| Arc::new(tokio::sync::Semaphore::new(limit)))
}

async fn permit(
    limit: &Option<Arc<tokio::sync::Semaphore>>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match limit {
        Some(semaphore) => semaphore.clone().acquire_owned().await.ok(),
        None => None,
    }
}

/// The job as a client needs it: tensor sizes, dtype and chunk size.
#[derive(Clone, Debug)]
struct Job {
    numels: Vec<usize>,
    update_dtype: DType,
    max_chunk_bytes: usize,
}

impl Job {
    fn from_spec(spec: &pb::JobSpec) -> Result<Job, String> {
        let numels: Vec<usize> = spec
            .tensors
            .iter()
            .map(|t| t.shape.iter().map(|&d| d as usize).product())
            .collect();
        if numels.is_empty() || numels.contains(&0) {
            return Err(format!("job lists unusable tensors: {:?}", spec.tensors));
        }
        let update_dtype = match pb::DType::try_from(spec.update_dtype) {
            Ok(pb::DType::DtypeF32) => DType::F32,
            Ok(pb::DType::DtypeBf16) => DType::Bf16,
            _ => return Err(format!("unknown update dtype {}", spec.update_dtype)),
        };
        let max_chunk_bytes = spec.max_chunk_bytes as usize;
        if max_chunk_bytes < 4 {
            return Err(format!("max_chunk_bytes {max_chunk_bytes} holds no value"));
        }
        Ok(Job {
            numels,
            update_dtype,
            max_chunk_bytes,
        })
    }

    fn total(&self) -> usize {
        self.numels.iter().sum()
    }

    /// (tensor index, offset, len) of every push chunk, in tensor order.
    fn chunk_plan(&self) -> Vec<(u32, usize, usize)> {
        let per_chunk = (self.max_chunk_bytes / self.update_dtype.size_bytes()).max(1);
        let mut plan = Vec::new();
        for (index, &numel) in self.numels.iter().enumerate() {
            let mut offset = 0;
            while offset < numel {
                let len = per_chunk.min(numel - offset);
                plan.push((index as u32, offset, len));
                offset += len;
            }
        }
        plan
    }
}

/// Counters shared by every client.
#[derive(Default)]
struct Stats {
    heartbeat_us: Mutex<Vec<u64>>,
    /// Largest gap between two renewals of one client's lease (join included).
    max_lease_gap_us: AtomicU64,
    heartbeats_slower_than_lease: AtomicU64,
    pulls: AtomicU64,
    pulled_bytes: AtomicU64,
    pushes_accepted: AtomicU64,
    pushed_bytes: AtomicU64,
    evals_reported: AtomicU64,
    joins: AtomicU64,
    done: AtomicU64,
    left: AtomicU64,
    rounds_pushed: Mutex<BTreeSet<u64>>,
    /// (operation, gRPC code) -> count, transient failures included.
    errors: Mutex<BTreeMap<(String, String), u64>>,
    unexpected: AtomicU64,
    messages: Mutex<Vec<String>>,
}

impl Stats {
    fn error(&self, op: &str, status: &Status) {
        let key = (op.to_string(), format!("{:?}", status.code()));
        *lock(&self.errors).entry(key).or_default() += 1;
    }

    fn unexpected(&self, client: usize, message: String) {
        self.unexpected.fetch_add(1, Ordering::Relaxed);
        let mut messages = lock(&self.messages);
        if messages.len() < MAX_ERROR_MESSAGES {
            messages.push(format!("client {client}: {message}"));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Codes worth retrying: the coordinator is busy or the connection dropped.
fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::ResourceExhausted
    )
}

/// Why a client stopped before the coordinator said done.
#[derive(Debug)]
enum Stop {
    /// The lease was lost: join again.
    Rejoin,
    /// Unexpected: recorded and the client gives up.
    Fail(String),
}

/// A client's gRPC handle: every call carries the session of its last join.
type Grpc = CoordinatorClient<InterceptedService<Channel, SessionAuth>>;

struct Client {
    index: usize,
    cli: Arc<Cli>,
    stats: Arc<Stats>,
    grpc: Grpc,
    session: SessionAuth,
    deadline: tokio::time::Instant,
    pushes: u64,
    pull_limit: Option<Arc<tokio::sync::Semaphore>>,
    push_limit: Option<Arc<tokio::sync::Semaphore>>,
}

struct Session {
    worker_id: String,
    job: Job,
    lost: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.heartbeat.abort();
    }
}

impl Client {
    /// Runs `f`, retrying transient failures with a short backoff; every
    /// failure is counted under `op`.
    async fn call<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0;
        loop {
            let remaining = self
                .deadline
                .saturating_duration_since(tokio::time::Instant::now());
            let result = match tokio::time::timeout(remaining, f(self.grpc.clone())).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded("loadgen deadline passed")),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(status) => {
                    self.stats.error(op, &status);
                    attempt += 1;
                    if !is_transient(&status) || attempt >= MAX_ATTEMPTS {
                        return Err(status);
                    }
                    let delay = Duration::from_millis(100 << attempt.min(5));
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn run(mut self) {
        for _ in 0..MAX_JOINS {
            let session = match self.join().await {
                Ok(session) => session,
                Err(status) => {
                    self.stats.unexpected(
                        self.index,
                        format!("join: {:?}: {}", status.code(), status.message()),
                    );
                    return;
                }
            };
            match self.serve(&session).await {
                Ok(()) => return,
                Err(Stop::Rejoin) => {
                    self.stats
                        .unexpected(self.index, "lease lost, joining again".into());
                }
                Err(Stop::Fail(message)) => {
                    self.stats.unexpected(self.index, message);
                    return;
                }
            }
        }
        self.stats
            .unexpected(self.index, format!("gave up after {MAX_JOINS} joins"));
    }

    async fn join(&self) -> Result<Session, Status> {
        let request = pb::JoinRequest {
            token: String::new(),
            info: Some(pb::WorkerInfo {
                hostname: format!("loadgen-{}", self.index),
                device: "sim".into(),
                device_memory_bytes: 0,
                role: pb::Role::Pretrain as i32,
            }),
        };
        let response = self
            .call("join", |mut c| {
                let request = request.clone();
                async move { c.join(request).await.map(tonic::Response::into_inner) }
            })
            .await?;
        self.session.set(&response.session_token)?;
        let job = response
            .job
            .as_ref()
            .ok_or_else(|| Status::internal("join response without a job"))
            .and_then(|spec| Job::from_spec(spec).map_err(Status::internal))?;
        self.stats.joins.fetch_add(1, Ordering::Relaxed);
        let lease = Duration::from_millis(response.lease_ms);
        let interval = Duration::from_millis(response.heartbeat_interval_ms.max(50));
        let lost = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(AtomicBool::new(false));
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.grpc.clone(),
            response.worker_id.clone(),
            interval,
            lease,
            self.deadline,
            self.stats.clone(),
            lost.clone(),
            stopped.clone(),
        ));
        Ok(Session {
            worker_id: response.worker_id,
            job,
            lost,
            stopped,
            heartbeat,
        })
    }

    /// Serves tasks until done (`Ok`), a lost lease or an unexpected error.
    async fn serve(&mut self, session: &Session) -> Result<(), Stop> {
        for _ in 0..MAX_TASKS_PER_CLIENT {
            if session.lost.load(Ordering::Relaxed) {
                return Err(Stop::Rejoin);
            }
            let request = pb::NextTaskRequest {
                worker_id: session.worker_id.clone(),
            };
            let task = self
                .call("next_task", |mut c| {
                    let request = request.clone();
                    async move { c.next_task(request).await.map(tonic::Response::into_inner) }
                })
                .await;
            let task = match task {
                Ok(response) => response.task,
                Err(status) => return Err(self.classify("next_task", status)),
            };
            match task {
                Some(pb::next_task_response::Task::Train(train)) => {
                    if self.cli.rounds != 0 && self.pushes >= self.cli.rounds {
                        // Leave: the coordinator expires the lease and hands the shards on.
                        session.stopped.store(true, Ordering::Relaxed);
                        self.stats.left.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    match self.train(session, train).await {
                        Ok(()) => {}
                        Err(status) if status.code() == Code::FailedPrecondition => {
                            // Refused (the round moved on): counted, ask again.
                        }
                        Err(status) => return Err(self.classify("train", status)),
                    }
                }
                Some(pb::next_task_response::Task::Eval(eval)) => {
                    match self.eval(session, eval).await {
                        Ok(()) => {}
                        Err(status) if status.code() == Code::FailedPrecondition => {}
                        Err(status) => return Err(self.classify("eval", status)),
                    }
                }
                Some(pb::next_task_response::Task::Wait(wait)) => {
                    let ms = wait.retry_after_ms.clamp(10, 60_000);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Some(pb::next_task_response::Task::Done(_)) => {
                    session.stopped.store(true, Ordering::Relaxed);
                    self.stats.done.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                None => return Err(Stop::Fail("next_task: empty task".into())),
            }
            if tokio::time::Instant::now() >= self.deadline {
                return Err(Stop::Fail("deadline passed".into()));
            }
        }
        Err(Stop::Fail(format!(
            "asked for {MAX_TASKS_PER_CLIENT} tasks without being done"
        )))
    }

    fn classify(&self, op: &str, status: Status) -> Stop {
        if status.code() == Code::NotFound {
            Stop::Rejoin
        } else {
            Stop::Fail(format!("{op}: {:?}: {}", status.code(), status.message()))
        }
    }

    async fn pull(&self, session: &Session, version: u64) -> Result<(), Status> {
        let request = pb::PullParamsRequest {
            base: false,
            worker_id: session.worker_id.clone(),
            version,
        };
        let job = &session.job;
        let _permit = permit(&self.pull_limit).await;
        let bytes = self
            .call("pull", |mut c| {
                let request = request.clone();
                async move {
                    let stream = c.pull_params(request).await?.into_inner();
                    validate_params(job, version, stream).await
                }
            })
            .await?;
        self.stats.pulls.fetch_add(1, Ordering::Relaxed);
        self.stats.pulled_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    async fn train(&mut self, session: &Session, task: pb::TrainTask) -> Result<(), Status> {
        let start = Instant::now();
        self.pull(session, task.version).await?;
        if self.cli.train_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.cli.train_ms)).await;
        }
        let tokens: u64 = task.shards.iter().map(|s| s.num_tokens).sum();
        let eval_tokens: u64 = task.eval_shards.iter().map(|s| s.num_tokens).sum();
        let header = pb::PushHeader {
            worker_id: session.worker_id.clone(),
            round: task.round,
            base_version: task.version,
            dtype: match session.job.update_dtype {
                DType::F32 => pb::DType::DtypeF32,
                DType::Bf16 => pb::DType::DtypeBf16,
            } as i32,
            stats: Some(pb::TrainStats {
                // Near ln(256), the loss of an untrained byte-level model.
                mean_loss: 5.5 - 0.01 * task.round as f64,
                tokens,
                train_seconds: start.elapsed().as_secs_f64(),
                eval_loss: (!task.eval_shards.is_empty()).then_some(5.5),
                eval_tokens,
                eval_accuracy: None,
            }),
        };
        let seed = self
            .cli
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((self.index as u64) << 32)
            .wrapping_add(task.round);
        let plan = session.job.chunk_plan();
        let dtype = session.job.update_dtype;
        let amplitude = self.cli.amplitude;
        let bytes = (session.job.total() * dtype.size_bytes()) as u64;
        let permit = permit(&self.push_limit).await;
        let response = self
            .call("push", |mut c| {
                let stream = update_stream(header.clone(), plan.clone(), dtype, seed, amplitude);
                async move { c.push_update(stream).await.map(tonic::Response::into_inner) }
            })
            .await?;
        drop(permit);
        if response.round != task.round {
            return Err(Status::internal(format!(
                "push for round {} acknowledged as round {}",
                task.round, response.round
            )));
        }
        self.pushes += 1;
        self.stats.pushes_accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.pushed_bytes.fetch_add(bytes, Ordering::Relaxed);
        lock(&self.stats.rounds_pushed).insert(task.round);
        Ok(())
    }

    async fn eval(&self, session: &Session, task: pb::EvalTask) -> Result<(), Status> {
        self.pull(session, task.version).await?;
        let request = pb::ReportEvalRequest {
            worker_id: session.worker_id.clone(),
            version: task.version,
            loss: 5.4,
            tokens: task.eval_shards.iter().map(|s| s.num_tokens).sum(),
            accuracy: None,
        };
        self.call("report_eval", |mut c| {
            let request = request.clone();
            async move { c.report_eval(request).await }
        })
        .await?;
        self.stats.evals_reported.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The messages of one push, generated lazily: the header, then each chunk's
/// uniform values in `[-amplitude, amplitude)` from a PRNG seeded by `seed`.
fn update_stream(
    header: pb::PushHeader,
    plan: Vec<(u32, usize, usize)>,
    dtype: DType,
    seed: u64,
    amplitude: f32,
) -> impl futures::Stream<Item = pb::UpdateChunk> + Send + 'static {
    let head = pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Header(header)),
    };
    let mut rng = SplitMix64::new(seed);
    let mut values = Vec::new();
    let chunks = plan.into_iter().map(move |(tensor_index, offset, len)| {
        values.clear();
        values.extend((0..len).map(|_| ((rng.next_f64() * 2.0 - 1.0) as f32) * amplitude));
        pb::UpdateChunk {
            kind: Some(pb::update_chunk::Kind::Chunk(pb::TensorChunk {
                tensor_index,
                offset: offset as u64,
                data: codec::encode(dtype, &values).into(),
            })),
        }
    });
    futures::stream::iter(std::iter::once(head).chain(chunks))
}

/// Checks a parameter stream chunk by chunk without keeping it: version,
/// tensor order, contiguous offsets, whole finite f32 values, nothing
/// missing or extra. Returns the bytes received; violations are `DATA_LOSS`.
async fn validate_params(
    job: &Job,
    version: u64,
    mut stream: tonic::Streaming<pb::ParamChunk>,
) -> Result<u64, Status> {
    let mut tensor = 0usize;
    let mut offset = 0usize;
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let fail = |reason: String| {
            Status::data_loss(format!(
                "bad parameter chunk (tensor {}, offset {}): {reason}",
                chunk.tensor_index, chunk.offset
            ))
        };
        if chunk.version != version {
            return Err(fail(format!("version {}, pulled {version}", chunk.version)));
        }
        let Some(&numel) = job.numels.get(tensor) else {
            return Err(fail("more data than the model has parameters".into()));
        };
        if chunk.tensor_index as usize != tensor || chunk.offset != offset as u64 {
            return Err(fail(format!("expected tensor {tensor} at offset {offset}")));
        }
        if chunk.data.is_empty() || chunk.data.len() % 4 != 0 {
            return Err(fail(format!(
                "{} bytes are not whole f32s",
                chunk.data.len()
            )));
        }
        let count = chunk.data.len() / 4;
        if offset + count > numel {
            return Err(fail(format!("{count} values overrun {numel} elements")));
        }
        if let Some(bad) = chunk
            .data
            .chunks_exact(4)
            .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
        {
            return Err(fail(format!("value {bad} is not finite")));
        }
        bytes += chunk.data.len() as u64;
        offset += count;
        if offset == numel {
            tensor += 1;
            offset = 0;
        }
    }
    if tensor != job.numels.len() {
        return Err(Status::data_loss(format!(
            "parameter stream ended at tensor {tensor} offset {offset} of {}",
            job.numels.len()
        )));
    }
    Ok(bytes)
}

#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    mut client: Grpc,
    worker_id: String,
    interval: Duration,
    lease: Duration,
    deadline: tokio::time::Instant,
    stats: Arc<Stats>,
    lost: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
) {
    let mut last_renewal = Instant::now();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(interval).await;
        if stopped.load(Ordering::Relaxed) {
            return;
        }
        let request = pb::HeartbeatRequest {
            worker_id: worker_id.clone(),
        };
        let sent = Instant::now();
        // Bounded: a heartbeat slower than twice the lease is recorded as such and given up.
        let result = tokio::time::timeout(lease * 2, client.heartbeat(request)).await;
        let elapsed = sent.elapsed();
        if stopped.load(Ordering::Relaxed) {
            // Done while in flight: the coordinator may already have gone.
            return;
        }
        lock(&stats.heartbeat_us).push(elapsed.as_micros() as u64);
        if elapsed > lease {
            stats
                .heartbeats_slower_than_lease
                .fetch_add(1, Ordering::Relaxed);
        }
        match result {
            Ok(Ok(_)) => {
                let gap = last_renewal.elapsed().as_micros() as u64;
                stats.max_lease_gap_us.fetch_max(gap, Ordering::Relaxed);
                last_renewal = Instant::now();
            }
            Ok(Err(status)) => {
                stats.error("heartbeat", &status);
                if status.code() == Code::NotFound {
                    lost.store(true, Ordering::Relaxed);
                    return;
                }
            }
            Err(_) => stats.error("heartbeat", &Status::deadline_exceeded("heartbeat")),
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Arc::new(Cli::parse());
    if cli.clients == 0 {
        eprintln!("cohort-loadgen: --clients must be at least 1");
        return ExitCode::from(2);
    }
    if !(cli.amplitude.is_finite() && cli.amplitude >= 0.0) {
        eprintln!("cohort-loadgen: --amplitude must be finite and non-negative");
        return ExitCode::from(2);
    }
    let endpoint = match Endpoint::from_shared(cli.coordinator.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20)),
        Err(e) => {
            eprintln!("cohort-loadgen: bad coordinator address: {e}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cli.timeout_s);
    let stats = Arc::new(Stats::default());
    let pull_limit = limiter(cli.max_pulls_in_flight);
    let push_limit = limiter(cli.max_pushes_in_flight);
    let mut tasks = Vec::with_capacity(cli.clients);
    for index in 0..cli.clients {
        // One connection per client: `connect_lazy` on the endpoint opens a new one.
        let session = SessionAuth::default();
        let grpc = CoordinatorClient::with_interceptor(endpoint.connect_lazy(), session.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let client = Client {
            index,
            cli: cli.clone(),
            stats: stats.clone(),
            grpc,
            session,
            deadline,
            pushes: 0,
            pull_limit: pull_limit.clone(),
            push_limit: push_limit.clone(),
        };
        tasks.push(tokio::spawn(client.run()));
    }
    let mut deadline_hit = false;
    for task in tasks {
        // A little grace past the deadline: clients check it themselves.
        let grace = deadline + Duration::from_secs(5);
        match tokio::time::timeout_at(grace, task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => stats.unexpected(usize::MAX, format!("client task failed: {e}")),
            Err(_) => deadline_hit = true,
        }
    }
    let wall = start.elapsed();
    deadline_hit |= tokio::time::Instant::now() >= deadline;

    let mut heartbeats = lock(&stats.heartbeat_us).clone();
    heartbeats.sort_unstable();
    let rounds: Vec<u64> = lock(&stats.rounds_pushed).iter().copied().collect();
    let errors: serde_json::Map<String, serde_json::Value> = lock(&stats.errors)
        .iter()
        .map(|((op, code), n)| (format!("{op}:{code}"), (*n).into()))
        .collect();
    let unexpected = stats.unexpected.load(Ordering::Relaxed);
    let messages = lock(&stats.messages).clone();
    let ok = unexpected == 0 && !deadline_hit;
    let summary = serde_json::json!({
        "loadgen": true,
        "ok": ok,
        "clients": cli.clients,
        "joins": stats.joins.load(Ordering::Relaxed),
        "done": stats.done.load(Ordering::Relaxed),
        "left": stats.left.load(Ordering::Relaxed),
        "rounds_committed": rounds.len(),
        "rounds": rounds,
        "pushes_accepted": stats.pushes_accepted.load(Ordering::Relaxed),
        "pushed_bytes": stats.pushed_bytes.load(Ordering::Relaxed),
        "pulls": stats.pulls.load(Ordering::Relaxed),
        "pulled_bytes": stats.pulled_bytes.load(Ordering::Relaxed),
        "evals_reported": stats.evals_reported.load(Ordering::Relaxed),
        "heartbeats": heartbeats.len(),
        "heartbeat_p50_ms": percentile(&heartbeats, 50.0),
        "heartbeat_p99_ms": percentile(&heartbeats, 99.0),
        "heartbeat_max_ms": heartbeats.last().map_or(0.0, |&us| us as f64 / 1000.0),
        "heartbeats_slower_than_lease": stats.heartbeats_slower_than_lease.load(Ordering::Relaxed),
        "max_lease_gap_ms": stats.max_lease_gap_us.load(Ordering::Relaxed) as f64 / 1000.0,
        "errors": errors,
        "unexpected_errors": unexpected,
        "error_messages": messages,
        "deadline_hit": deadline_hit,
        "wall_s": wall.as_secs_f64(),
    });
    eprintln!(
        "cohort-loadgen: {} clients, {} rounds pushed, {} pushes, {} pulls, heartbeat p50 {:.2} ms p99 {:.2} ms max {:.2} ms ({} slower than the lease), {} unexpected errors, wall {:.1} s",
        cli.clients,
        rounds.len(),
        summary["pushes_accepted"],
        summary["pulls"],
        summary["heartbeat_p50_ms"].as_f64().unwrap_or_default(),
        summary["heartbeat_p99_ms"].as_f64().unwrap_or_default(),
        summary["heartbeat_max_ms"].as_f64().unwrap_or_default(),
        summary["heartbeats_slower_than_lease"],
        unexpected,
        wall.as_secs_f64(),
    );
    for message in &messages {
        eprintln!("cohort-loadgen: {message}");
    }
    println!("{summary}");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
