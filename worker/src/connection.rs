//! The coordinator connection shared by the pretraining worker and the federated client: one
//! channel, retries with backoff, heartbeats, parameter pulls and update pushes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_core::codec::{self, DType};
use cohort_core::params::ParamLayout;
use cohort_core::rng::SplitMix64;
use cohort_proto::session::SessionAuth;
use cohort_proto::v1 as pb;
use futures::{Stream, StreamExt};
use pb::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tracing::{debug, error, warn, Instrument};

use crate::data::DataError;
use crate::trainer::{TrainStats, TrainerError};

/// HTTP/2 frame size the client advertises (the coordinator uses the same).
pub use cohort_proto::HTTP2_MAX_FRAME_SIZE;
/// Largest gRPC message the client encodes or decodes; chunks are far smaller.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Every call carries the session token of the worker's current membership.
type Client = CoordinatorClient<InterceptedService<Channel, SessionAuth>>;

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

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid coordinator address {url:?}: {reason}")]
    BadAddress { url: String, reason: String },
    #[error("TLS setup for {url:?}: {reason}")]
    Tls { url: String, reason: String },
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
    #[error(
        "the coordinator refused the enrollment token or certificate ({code:?}: {message}); \
         check --token, --token-file or COHORT_TOKEN, and the site's --tls-cert"
    )]
    Unauthenticated { code: Code, message: String },
    #[error(
        "not a federated job: the coordinator's job {job:?} carries no federated spec \
         (pretraining jobs are for `cohort-worker pretrain`)"
    )]
    NotFederated { job: String },
}

/// TLS for the coordinator connection: used for `https://` URLs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA certificates that signed the coordinator's certificate; `None`:
    /// the system's trusted roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate and its key, for a coordinator that requires
    /// client certificates (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    fn is_set(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }

    /// The rustls client configuration for an `https://` URL; `None` for
    /// `http://`, where setting any TLS file is an error rather than ignored.
    fn config(&self, url: &str) -> Result<Option<ClientTlsConfig>, ClientError> {
        let https = url.starts_with("https://");
        let fail = |reason: String| ClientError::Tls {
            url: url.to_string(),
            reason,
        };
        if !https {
            return if self.is_set() {
                Err(fail(
                    "--tls-ca, --tls-cert and --tls-key need an https:// coordinator URL".into(),
                ))
            } else {
                Ok(None)
            };
        }
        let read = |what: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| fail(format!("cannot read {what} {}: {e}", path.display())))
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(path) => config.ca_certificate(Certificate::from_pem(read("--tls-ca", path)?)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
        }
        Ok(Some(config))
    }
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

/// Assembles a parameter stream into one flat buffer, validating every chunk: version
/// (`None` for a base pull, whose chunks may carry any version as long as it is one),
/// tensor index and offset (contiguous, in order, in bounds), whole f32 values, all finite.
/// Validation failures are `DATA_LOSS` statuses; stream errors pass through.
pub async fn assemble_params<S>(
    layout: &ParamLayout,
    version: Option<u64>,
    mut stream: S,
) -> Result<(Vec<f32>, u64), Status>
where
    S: Stream<Item = Result<pb::ParamChunk, Status>> + Unpin,
{
    let mut version = version;
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
        let expected = *version.get_or_insert(chunk.version);
        if chunk.version != expected {
            return Err(fail(format!(
                "version {} but {expected} was pulled",
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

/// `status` with the sources of its error (a TLS alert under "transport error", say)
/// in its message.
fn with_sources(status: Status) -> Status {
    match std::error::Error::source(&status) {
        Some(source) => {
            let message = format!("{}: {}", status.message(), error_chain(source));
            Status::new(status.code(), message)
        }
        None => status,
    }
}

/// An error and its sources, one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
pub(crate) struct Failure {
    pub(crate) op: &'static str,
    pub(crate) status: Status,
    /// Set when retries were exhausted.
    pub(crate) attempts: Option<u32>,
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
pub(crate) enum Interrupt {
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
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A worker's heartbeat task: renews the lease every interval and raises `lost` when the
/// coordinator no longer knows the worker. Stops when dropped.
pub(crate) struct Heartbeat {
    lost: Arc<AtomicBool>,
    _task: AbortOnDrop,
}

impl Heartbeat {
    /// Whether the coordinator said the lease expired.
    pub(crate) fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

/// One lazily connected channel to the coordinator and the retry policy for its calls.
pub struct Connection {
    url: String,
    client: Client,
    /// The session token the last join returned, sent by `client` and its clones.
    session: SessionAuth,
    retry: RetryPolicy,
    rng: Mutex<SplitMix64>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.url)
            .field("retry", &self.retry)
            .finish()
    }
}

impl Connection {
    /// Sets up the channel (over TLS for an `https://` URL); nothing is sent until the
    /// first call.
    pub fn new(url: &str, retry: RetryPolicy, tls: &ClientTls) -> Result<Connection, ClientError> {
        let bad = |reason: String| ClientError::BadAddress {
            url: url.to_string(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| bad(e.to_string()))?
            .max_frame_size(HTTP2_MAX_FRAME_SIZE)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        if let Some(config) = tls.config(url)? {
            endpoint = endpoint.tls_config(config).map_err(|e| ClientError::Tls {
                url: url.to_string(),
                reason: error_chain(&e),
            })?;
        }
        let channel = endpoint.connect_lazy();
        let session = SessionAuth::default();
        let client = CoordinatorClient::with_interceptor(channel, session.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        Ok(Connection {
            url: url.to_string(),
            client,
            session,
            retry,
            rng: Mutex::new(SplitMix64::new(seed)),
        })
    }

    /// A join that never got through says what the likely cause is: a TLS coordinator
    /// hangs up on plaintext with a bare protocol error, and one that requires client
    /// certificates may close a refused connection before its alert arrives.
    fn hint_connection(&self, mut failure: Failure) -> Failure {
        if failure.attempts.is_none() {
            return failure;
        }
        let hint = if self.url.starts_with("http://") {
            "if the coordinator serves TLS, use an https:// URL, with --tls-ca for a private CA"
        } else {
            "if the coordinator is up, check that --tls-ca signed its certificate and, where it \
             requires client certificates, that --tls-cert/--tls-key are given and signed by a \
             CA it trusts"
        };
        failure.status = Status::new(
            failure.status.code(),
            format!("{} ({hint})", failure.status.message()),
        );
        failure
    }

    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    fn jitter(&self) -> f64 {
        self.rng.lock().map_or(0.5, |mut r| r.next_f64())
    }

    /// Runs `f` with a fresh client handle, retrying transient failures with backoff.
    pub(crate) async fn call<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let policy = self.retry;
        let mut attempt = 0u32;
        loop {
            match f(self.client.clone()).await {
                Ok(value) => return Ok(value),
                Err(status) if is_transient(&status) => {
                    attempt += 1;
                    if attempt >= policy.max_attempts.max(1) {
                        return Err(Failure {
                            op,
                            status: with_sources(status),
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
                        status: with_sources(status),
                        attempts: None,
                    })
                }
            }
        }
    }

    /// Joins (with retries) and sends the new session's token on every later call; the
    /// caller validates the job.
    pub(crate) async fn join(&self, request: pb::JoinRequest) -> Result<pb::JoinResponse, Failure> {
        let response = self
            .call("join", |mut c| {
                let request = request.clone();
                async move { c.join(request).await.map(tonic::Response::into_inner) }
            })
            .await
            .map_err(|failure| self.hint_connection(failure))?;
        self.session
            .set(&response.session_token)
            .map_err(|status| Failure {
                op: "join",
                status: Status::data_loss(format!("unusable session token: {}", status.message())),
                attempts: None,
            })?;
        Ok(response)
    }

    /// Asks for the next task (with retries).
    pub(crate) async fn next_task(
        &self,
        worker_id: &str,
    ) -> Result<Option<pb::next_task_response::Task>, Failure> {
        let request = pb::NextTaskRequest {
            worker_id: worker_id.to_string(),
        };
        self.call("next_task", |mut c| {
            let request = request.clone();
            async move { c.next_task(request).await.map(tonic::Response::into_inner) }
        })
        .await
        .map(|response| response.task)
    }

    /// Pulls the parameters of `version` laid out as `layout`, or with `base` the frozen
    /// base model (any version). Returns the flat values and the bytes received.
    pub(crate) async fn pull(
        &self,
        worker_id: &str,
        layout: &ParamLayout,
        version: u64,
        base: bool,
    ) -> Result<(Vec<f32>, u64), Failure> {
        let request = pb::PullParamsRequest {
            base,
            worker_id: worker_id.to_string(),
            version,
        };
        let expected = (!base).then_some(version);
        self.call("pull_params", |mut c| {
            let request = request.clone();
            async move {
                let stream = c.pull_params(request).await?.into_inner();
                assemble_params(layout, expected, stream).await
            }
        })
        .await
    }

    /// Pushes `delta` (laid out as `layout`) after `header`, encoded as `dtype` in chunks
    /// of at most `max_chunk_bytes`. Returns the response and the payload bytes sent.
    pub(crate) async fn push(
        &self,
        header: pb::PushHeader,
        delta: Vec<f32>,
        layout: &ParamLayout,
        dtype: DType,
        max_chunk_bytes: usize,
    ) -> Result<(pb::PushUpdateResponse, u64), Failure> {
        let plan = chunk_plan(layout, dtype, max_chunk_bytes);
        let pushed_bytes: u64 = plan
            .iter()
            .map(|r| (r.len * dtype.size_bytes()) as u64)
            .sum();
        let header = pb::PushHeader {
            dtype: dtype_to_proto(dtype) as i32,
            ..header
        };
        let delta = Arc::new(delta);
        let response = self
            .call("push_update", |mut c| {
                let stream = update_stream(header.clone(), delta.clone(), plan.clone(), dtype);
                async move { c.push_update(stream).await.map(tonic::Response::into_inner) }
            })
            .await?;
        Ok((response, pushed_bytes))
    }

    /// Reports the held-out loss of `version` (with retries).
    pub(crate) async fn report_eval(&self, request: pb::ReportEvalRequest) -> Result<(), Failure> {
        self.call("report_eval", |mut c| {
            let request = request.clone();
            async move { c.report_eval(request).await }
        })
        .await
        .map(drop)
    }

    /// Starts renewing `worker_id`'s lease every `interval`.
    pub(crate) fn start_heartbeat(&self, worker_id: &str, interval: Duration) -> Heartbeat {
        let lost = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            worker_id.to_string(),
            interval,
            lost.clone(),
        ));
        Heartbeat {
            lost,
            _task: AbortOnDrop(task),
        }
    }
}

/// What a worker does with the tasks the coordinator hands out (the pretraining worker and
/// the federated client differ only here).
pub(crate) trait Tasks {
    async fn train(
        &mut self,
        connection: &Connection,
        worker_id: &str,
        task: pb::TrainTask,
    ) -> Result<(), Interrupt>;

    async fn eval(
        &mut self,
        connection: &Connection,
        worker_id: &str,
        task: pb::EvalTask,
    ) -> Result<(), Interrupt>;
}

/// Asks for tasks and runs them until the coordinator says Done (returns its reason) or an
/// interrupt; waits as told; a refused task or request moves on to the next one.
pub(crate) async fn serve_tasks<T: Tasks>(
    connection: &Connection,
    worker_id: &str,
    heartbeat: &Heartbeat,
    tasks: &mut T,
) -> Result<String, Interrupt> {
    loop {
        if heartbeat.lost() {
            return Err(Interrupt::Rejoin);
        }
        let task = match connection
            .next_task(worker_id)
            .await
            .map_err(Interrupt::from)
        {
            Ok(task) => task,
            Err(Interrupt::Skip) => {
                tokio::time::sleep(connection.retry().base).await;
                continue;
            }
            Err(other) => return Err(other),
        };
        let outcome = match task {
            Some(pb::next_task_response::Task::Train(train)) => {
                // One span per round: every line the round logs carries its ids.
                let span = tracing::info_span!(
                    "round",
                    worker = %worker_id,
                    round = train.round,
                    version = train.version
                );
                tasks
                    .train(connection, worker_id, train)
                    .instrument(span)
                    .await
            }
            Some(pb::next_task_response::Task::Eval(eval)) => {
                let span = tracing::info_span!(
                    "eval",
                    worker = %worker_id,
                    version = eval.version
                );
                tasks
                    .eval(connection, worker_id, eval)
                    .instrument(span)
                    .await
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

/// The wire form of an update encoding.
pub fn dtype_to_proto(dtype: DType) -> pb::DType {
    match dtype {
        DType::F32 => pb::DType::DtypeF32,
        DType::Bf16 => pb::DType::DtypeBf16,
    }
}

/// The wire form of a round's statistics.
pub fn stats_to_proto(stats: &TrainStats) -> pb::TrainStats {
    pb::TrainStats {
        mean_loss: stats.mean_loss,
        tokens: stats.tokens,
        train_seconds: stats.seconds,
        eval_loss: stats.eval_loss,
        eval_tokens: stats.eval_tokens,
        eval_accuracy: stats.eval_accuracy,
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
    use cohort_core::model::ModelConfig;

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
        let (got, bytes) = assemble_params(&layout, Some(4), futures::stream::iter(chunks.clone()))
            .await
            .unwrap();
        assert_eq!(got, flat);
        assert_eq!(bytes, layout.total() as u64 * 4);

        let check = |mut chunks: Chunks, edit: &dyn Fn(&mut Chunks), needle: &str| {
            edit(&mut chunks);
            let layout = layout.clone();
            let needle = needle.to_string();
            async move {
                let err = assemble_params(&layout, Some(4), futures::stream::iter(chunks))
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
        let err = assemble_params(&layout, Some(4), futures::stream::iter(overrun))
            .await
            .unwrap_err();
        assert!(err.message().contains("overrun"), "{}", err.message());
        // Errors from the stream itself pass through unchanged for the retry logic.
        let mut broken = chunks.clone();
        broken[3] = Err(Status::unavailable("connection reset"));
        let err = assemble_params(&layout, Some(4), futures::stream::iter(broken))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }

    #[tokio::test]
    async fn a_base_pull_accepts_one_version_whatever_it_is() {
        let layout = ParamLayout::new(&tiny().tensor_specs());
        let flat: Vec<f32> = (0..layout.total()).map(|i| (i as f32).cos()).collect();
        let chunks = good_chunks(&layout, &flat, 17);
        let (got, _) = assemble_params(&layout, None, futures::stream::iter(chunks.clone()))
            .await
            .unwrap();
        assert_eq!(got, flat);
        let mut mixed = chunks;
        mixed[3] = chunk(18, 0, 18, &[0.0; 6]);
        let err = assemble_params(&layout, None, futures::stream::iter(mixed))
            .await
            .unwrap_err();
        assert!(
            err.message().contains("version 18 but 17"),
            "{}",
            err.message()
        );
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
