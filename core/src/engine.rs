//! The round state machine: membership, leases, shard assignment, push
//! validation, aggregation and publishing of model versions.
//!
//! Sans-IO in the style of raft-rs' `RawNode`: callers feed inputs (a worker
//! joined, asked for a task, sent a chunk; time passed) with `now` as a
//! parameter, and drain [`Event`]s to act on (log, checkpoint, exit). The
//! engine never reads the clock, never touches a socket or a file.
//!
//! Rules, in the words of the job's operator:
//! - A round starts once `min_workers` workers are live. Each live worker (up
//!   to `max_workers_per_round`) is leased `shards_per_worker` shards.
//! - A worker pulls the current version, trains, and pushes its
//!   pseudo-gradient. A push is validated chunk by chunk before each chunk is
//!   folded; a push that fails half way is undone exactly and the round goes
//!   on (the worker may push again).
//! - The round commits when every participant has pushed (and at least
//!   `min_participants` did), or at the deadline if at least
//!   `min_participants` pushed. Otherwise it is aborted at the deadline and
//!   all its shards go back to the pool.
//! - A worker whose lease expires is removed; its shards go back to the pool
//!   and a worker that joins later may take its place in the round.
//! - A shard counts as consumed only when the round that used it commits.
//!
//! Federated jobs ([`EngineConfig::federated`]) follow the same life cycle
//! with these differences (see [`crate::federated`] for the rules):
//! - There are no shards: clients train on their own data. Each round's
//!   cohort is drawn from the connected clients (Poisson with rate q, or a
//!   fixed size without DP); a round whose cohort is smaller than
//!   `min_participants` (m) is aborted at once, and lost members are not
//!   replaced.
//! - A push must stay within the norm an honest clipped-and-noised update can
//!   have ([`crate::clip::update_norm_bound`]); a larger one is undone.
//! - With DP, a round that would overrun the budget is refused before its
//!   cohort is told to train (the job finishes), and a round ready to commit
//!   is first reported as [`Event::ReleaseReady`]: the caller writes the
//!   privacy charge durably and only then calls [`RoundEngine::release`],
//!   which adds the central noise (if any), divides by the expected cohort
//!   size and applies the server optimizer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aggregate::{Accumulator, FoldError};
use crate::clip::update_norm_bound;
use crate::codec::DType;
use crate::federated::{FederatedRoundSummary, FederatedRules, FederatedRulesError};
use crate::ids::{RoundId, SessionDigest, ShardId, Version, WorkerId};
use crate::model::TensorSpec;
use crate::outer::{OuterOptimizer, OuterOptimizerConfig};
use crate::params::ParamLayout;
use crate::privacy::{PrivacyLedger, SampledGaussianRound};
use crate::rng::SplitMix64;
use crate::scheduler::{Consumption, SchedulerRestoreError, SchedulerSnapshot, ShardScheduler};

/// Everything the engine needs to know about the job.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub tensors: Vec<TensorSpec>,
    pub update_dtype: DType,
    /// How long a worker stays a member without a heartbeat.
    pub lease: Duration,
    /// How long a round may run before it commits with what it has or aborts.
    pub round_deadline: Duration,
    /// Live workers needed before a round starts.
    pub min_workers: usize,
    /// Pushes needed to commit a round.
    pub min_participants: usize,
    /// Upper bound on participants per round; 0 means every live worker.
    pub max_workers_per_round: usize,
    pub shards_per_worker: usize,
    /// Stop after this many committed rounds; 0 means no limit.
    pub max_rounds: u64,
    /// Stop after this many complete epochs; 0 means no limit.
    pub max_epochs: u64,
    /// One participant evaluates the pulled version on the held-out split in
    /// rounds 1, 1 + k, 1 + 2k, ...; 0 evaluates only the final version.
    pub eval_every: u64,
    pub outer: OuterOptimizerConfig,
    /// Largest accepted chunk, in elements.
    pub max_chunk_elems: usize,
    pub seed: u64,
    /// Federated fine-tuning rules; `None` for pretraining.
    pub federated: Option<FederatedRules>,
}

/// One token shard as the scheduler and workers see it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    pub id: ShardId,
    pub file_name: String,
    pub num_tokens: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineConfigError {
    #[error("the job has no parameters")]
    NoTensors,
    #[error("the training split has no shards")]
    NoShards,
    #[error("initial parameters have {got} values, the model has {expected}")]
    InitialParams { got: usize, expected: usize },
    #[error("{field} must be at least 1")]
    Zero { field: &'static str },
    #[error("min_participants ({min_participants}) exceeds min_workers ({min_workers}): rounds start with min_workers live workers")]
    QuorumAboveMinWorkers {
        min_participants: usize,
        min_workers: usize,
    },
    #[error("min_participants ({min_participants}) exceeds max_workers_per_round ({max_workers_per_round})")]
    ImpossibleQuorum {
        min_participants: usize,
        max_workers_per_round: usize,
    },
    #[error("neither max_rounds nor max_epochs is set: the job would never end")]
    Endless,
    #[error(transparent)]
    Outer(#[from] crate::outer::OuterConfigError),
    #[error(transparent)]
    Federated(#[from] FederatedRulesError),
    #[error("a federated job ends after train.max_rounds rounds (> 0); epochs do not apply")]
    FederatedLimits,
}

/// Why an input was refused. Each maps to one gRPC status at the service edge.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("unknown worker {0} (never joined, or its lease expired)")]
    UnknownWorker(WorkerId),
    #[error("worker id does not match its session: {0} joined with another session token")]
    SessionMismatch(WorkerId),
    #[error("no session token for worker {0}: send the session token that Join returned (authorization: Bearer <token>)")]
    MissingSession(WorkerId),
    #[error("stale round: push is for {got}, the current round is {current}")]
    StaleRound { got: RoundId, current: String },
    #[error("stale version: {got} requested, the current version is {current}")]
    StaleVersion { got: Version, current: Version },
    #[error("worker {worker} is not a participant of round {round}")]
    NotAssigned { worker: WorkerId, round: RoundId },
    #[error("worker {worker} already pushed for round {round}")]
    AlreadyPushed { worker: WorkerId, round: RoundId },
    #[error("worker {0} has no push in progress")]
    NoOpenPush(WorkerId),
    #[error("another push is being folded")]
    PushInProgress,
    #[error("update dtype is {got:?}, the job uses {expected:?}")]
    WrongDtype { got: DType, expected: DType },
    #[error("tensor index {index} out of range (the model has {count} tensors)")]
    UnknownTensor { index: usize, count: usize },
    #[error("chunk for tensor {got_tensor} at offset {got_offset}, expected tensor {expected_tensor} at offset {expected_offset}")]
    ChunkOutOfOrder {
        expected_tensor: usize,
        expected_offset: usize,
        got_tensor: usize,
        got_offset: usize,
    },
    #[error("chunk of {len} values at offset {offset} overruns tensor {tensor} ({name}, {numel} values)")]
    ChunkOverrunsTensor {
        tensor: usize,
        name: String,
        offset: usize,
        len: usize,
        numel: usize,
    },
    #[error("chunk of {len} values exceeds the limit of {max}")]
    ChunkTooLarge { len: usize, max: usize },
    #[error("empty chunk")]
    EmptyChunk,
    #[error("push ended after {received} of {expected} values")]
    IncompletePush { received: usize, expected: usize },
    #[error("push statistics are invalid: {0}")]
    InvalidStats(&'static str),
    #[error("worker {worker} was not asked to evaluate version {version}")]
    UnexpectedEval { worker: WorkerId, version: Version },
    #[error("the job has finished")]
    JobFinished,
    #[error("push stream failed: {0}")]
    StreamFailed(String),
    #[error("update norm {norm:.6} exceeds {bound:.6}, the most that clipping to the job's norm plus its noise can produce")]
    UpdateNormTooLarge { norm: f64, bound: f64 },
    #[error("round {0} is not waiting for its release")]
    NoPendingRelease(RoundId),
}

impl EngineError {
    /// A short, stable name for why a push was refused, for metrics labels
    /// and dashboards (the message text may change; these do not). Errors
    /// that never refuse a push are `"other"`.
    pub fn rejection_code(&self) -> &'static str {
        match self {
            EngineError::StaleRound { .. } => "stale_round",
            EngineError::StaleVersion { .. } => "stale_version",
            EngineError::NotAssigned { .. } => "not_assigned",
            EngineError::AlreadyPushed { .. } => "already_pushed",
            EngineError::WrongDtype { .. } => "wrong_dtype",
            EngineError::UnknownTensor { .. } => "unknown_tensor",
            EngineError::ChunkOutOfOrder { .. } => "chunk_out_of_order",
            EngineError::ChunkOverrunsTensor { .. } => "chunk_overruns_tensor",
            EngineError::ChunkTooLarge { .. } => "chunk_too_large",
            EngineError::EmptyChunk => "empty_chunk",
            EngineError::IncompletePush { .. } => "incomplete_push",
            EngineError::InvalidStats(_) => "invalid_stats",
            EngineError::StreamFailed(_) => "stream_failed",
            EngineError::UpdateNormTooLarge { .. } => "update_norm_too_large",
            EngineError::JobFinished => "job_finished",
            // Membership and other errors never reach a push's rejection.
            _ => "other",
        }
    }
}

/// The format of [`EngineSnapshot`]; bumped when its meaning changes.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// Where the job stood when a snapshot was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotPhase {
    Training,
    /// Training was over; the final version was waiting for its evaluation.
    FinalEval,
    Finished,
}

/// A tensor's identity: its name and shape.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorIdentity {
    pub name: String,
    pub shape: Vec<usize>,
}

/// The engine's durable state, without the parameters and the momentum
/// buffer (which the caller stores as tensors). A round in flight is not part
/// of it: its shards are pending again, first, and its number is reused.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineSnapshot {
    pub format: u32,
    pub version: Version,
    pub next_round: u64,
    pub next_worker: u64,
    pub committed_rounds: u64,
    pub epochs_completed: u64,
    pub phase: SnapshotPhase,
    pub final_eval_loss: Option<f64>,
    /// Absent in snapshots written before classification jobs existed.
    #[serde(default)]
    pub final_eval_accuracy: Option<f64>,
    pub outer: OuterOptimizerConfig,
    /// What the parameters are: restoring onto other tensors is refused.
    pub tensors: Vec<TensorIdentity>,
    /// The training split: restoring onto other shards is refused.
    pub train_shards: Vec<ShardInfo>,
    pub scheduler: SchedulerSnapshot,
    /// State of the federated cohort sampler (federated jobs only). The
    /// privacy ledger is not here: it is stored on its own, charged before
    /// every release, so that it is never older than the parameters.
    #[serde(default)]
    pub sampling_rng_state: Option<u64>,
}

/// Why a snapshot cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RestoreError {
    #[error("snapshot format {got} is not supported (expected {expected})")]
    Format { got: u32, expected: u32 },
    #[error(transparent)]
    Config(#[from] EngineConfigError),
    #[error("the model differs from the snapshot's: {detail}")]
    Tensors { detail: String },
    #[error("the training shards differ from the snapshot's: {detail}")]
    Shards { detail: String },
    #[error("the outer optimizer differs from the snapshot's: job {job:?}, snapshot {snapshot:?}")]
    Outer {
        job: OuterOptimizerConfig,
        snapshot: OuterOptimizerConfig,
    },
    #[error("the momentum buffer has {got} values, {expected} expected")]
    Momentum { got: usize, expected: usize },
    #[error("the shard schedule does not fit: {0}")]
    Scheduler(#[from] SchedulerRestoreError),
}

/// The first difference between two tensor lists, in words.
fn tensor_difference(job: &[TensorIdentity], snapshot: &[TensorIdentity]) -> Option<String> {
    if let Some((a, b)) = job.iter().zip(snapshot).find(|(a, b)| a != b) {
        return Some(format!(
            "job has {} {:?}, snapshot has {} {:?}",
            a.name, a.shape, b.name, b.shape
        ));
    }
    (job.len() != snapshot.len()).then(|| {
        format!(
            "job has {} tensors, snapshot has {}",
            job.len(),
            snapshot.len()
        )
    })
}

/// The first difference between two shard lists, in words.
fn shard_difference(job: &[ShardInfo], snapshot: &[ShardInfo]) -> Option<String> {
    if let Some((a, b)) = job.iter().zip(snapshot).find(|(a, b)| a != b) {
        return Some(format!(
            "job has {} {} ({} tokens), snapshot has {} {} ({} tokens)",
            a.id, a.file_name, a.num_tokens, b.id, b.file_name, b.num_tokens
        ));
    }
    (job.len() != snapshot.len()).then(|| {
        format!(
            "job has {} shards, snapshot has {}",
            job.len(),
            snapshot.len()
        )
    })
}

/// The identities of `tensors`, as a snapshot records them.
pub fn tensor_identities(tensors: &[TensorSpec]) -> Vec<TensorIdentity> {
    tensors
        .iter()
        .map(|t| TensorIdentity {
            name: t.name.clone(),
            shape: t.shape.clone(),
        })
        .collect()
}

/// What a worker says about itself when it joins.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerInfo {
    pub hostname: String,
    pub device: String,
    pub device_memory_bytes: u64,
    /// The enrolled client this worker speaks for (federated jobs); a client
    /// that joins again replaces its previous membership.
    pub client: Option<String>,
    /// The digest of the session token the coordinator issued at this join:
    /// every later call must present the token ([`RoundEngine::authenticate`]).
    /// `None`: no session was issued, so no call authenticates.
    pub session: Option<SessionDigest>,
}

/// Training statistics a worker reports with its push.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PushStats {
    pub mean_loss: f64,
    pub tokens: u64,
    pub train_seconds: f64,
    pub eval_loss: Option<f64>,
    /// The weight of `eval_loss`: tokens, or examples for classification.
    pub eval_tokens: u64,
    /// Fraction of held-out examples classified correctly (classification).
    pub eval_accuracy: Option<f64>,
}

/// A held-out evaluation a worker reports: the mean loss, its weight
/// (tokens, or examples for classification) and, for classification, the
/// fraction classified correctly.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EvalScore {
    pub loss: f64,
    pub weight: u64,
    pub accuracy: Option<f64>,
}

impl EvalScore {
    /// A loss without accuracy (next-token prediction).
    pub fn loss(loss: f64, weight: u64) -> EvalScore {
        EvalScore {
            loss,
            weight,
            accuracy: None,
        }
    }
}

/// Weighted means of reported evaluations: the loss over all, the
/// accuracy over those that carry one.
#[derive(Clone, Copy, Debug, Default)]
struct EvalMean {
    loss_sum: f64,
    loss_weight: u64,
    accuracy_sum: f64,
    accuracy_weight: u64,
}

impl EvalMean {
    fn add(&mut self, loss: f64, weight: u64, accuracy: Option<f64>) {
        let weight = weight.max(1);
        self.loss_sum += loss * weight as f64;
        self.loss_weight += weight;
        if let Some(accuracy) = accuracy {
            self.accuracy_sum += accuracy * weight as f64;
            self.accuracy_weight += weight;
        }
    }

    fn loss(&self) -> Option<f64> {
        (self.loss_weight > 0).then(|| self.loss_sum / self.loss_weight as f64)
    }

    fn accuracy(&self) -> Option<f64> {
        (self.accuracy_weight > 0).then(|| self.accuracy_sum / self.accuracy_weight as f64)
    }
}

/// A push's header, as received.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PushHeader {
    pub round: RoundId,
    pub base_version: Version,
    pub dtype: DType,
    pub stats: PushStats,
}

pub use crate::codec::FiniteValues;

/// What a worker should do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    Train {
        round: RoundId,
        version: Version,
        shards: Vec<ShardInfo>,
        eval_shards: Vec<ShardInfo>,
        deadline_in: Duration,
    },
    Eval {
        version: Version,
        eval_shards: Vec<ShardInfo>,
    },
    Wait {
        retry_after: Duration,
    },
    Done {
        reason: String,
    },
}

/// Receipt for a complete push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushReceipt {
    pub round: RoundId,
    pub received: usize,
    pub expected: usize,
}

/// Summary of a committed round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundSummary {
    pub round: RoundId,
    pub base_version: Version,
    pub new_version: Version,
    pub participants: usize,
    pub mean_loss: f64,
    pub tokens: u64,
    /// Tokens per second of wall time, from round start to commit.
    pub tokens_per_second: f64,
    pub bytes_pulled: u64,
    pub bytes_pushed: u64,
    pub wall: Duration,
    /// Held-out loss of `base_version`, when this round evaluated it.
    pub eval_loss: Option<f64>,
    /// Held-out accuracy of `base_version` (classification jobs).
    pub eval_accuracy: Option<f64>,
    pub epoch: u64,
    pub federated: Option<FederatedRoundSummary>,
}

/// Things that happened, for the caller to log or act on.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    WorkerJoined {
        worker: WorkerId,
        info: WorkerInfo,
    },
    WorkerExpired {
        worker: WorkerId,
        returned_shards: Vec<ShardId>,
    },
    RoundStarted {
        round: RoundId,
        version: Version,
        participants: usize,
        shards: usize,
    },
    PushRejected {
        worker: WorkerId,
        round: Option<RoundId>,
        /// A short, stable name for the kind of rejection (metrics label):
        /// see [`EngineError::rejection_code`].
        code: &'static str,
        reason: String,
    },
    RoundCommitted(RoundSummary),
    /// A federated round with DP is ready: charge `cost` durably, then call
    /// [`RoundEngine::release`]. Nothing has been published yet.
    ReleaseReady {
        round: RoundId,
        shares: usize,
        cost: SampledGaussianRound,
        /// Epsilon spent once this round is charged (at the budget's delta).
        epsilon_after: f64,
    },
    /// The next round could overrun the privacy budget: the job ends.
    BudgetExhausted {
        epsilon_spent: f64,
        epsilon_if_next_round: f64,
        budget_epsilon: f64,
        delta: f64,
    },
    RoundAborted {
        round: RoundId,
        pushed: usize,
        needed: usize,
        returned_shards: usize,
    },
    EpochCompleted {
        epoch: u64,
    },
    EvalReported {
        version: Version,
        loss: f64,
        tokens: u64,
        accuracy: Option<f64>,
    },
    JobFinished {
        version: Version,
        final_eval_loss: Option<f64>,
        final_eval_accuracy: Option<f64>,
        rounds: u64,
        epochs: u64,
    },
}

/// What a live worker is doing, as far as the coordinator knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerActivity {
    /// Not in the running round (or no round is running).
    Idle,
    /// A participant of `round` that has not pushed yet.
    Training { round: RoundId },
    /// Its push for `round` is being received and folded.
    Pushing { round: RoundId },
    /// Its update for `round` is in the sum; it waits for the round to end.
    Pushed { round: RoundId },
    /// Evaluating the final version.
    Evaluating { version: Version },
    /// Told that the job is over.
    Released,
}

/// One live worker at a glance ([`RoundEngine::worker_statuses`]).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerStatus {
    pub worker: WorkerId,
    pub hostname: String,
    pub device: String,
    /// The enrolled client (federated jobs).
    pub client: Option<String>,
    pub activity: WorkerActivity,
    /// Time left on its lease at `now`.
    pub lease_remaining: Duration,
}

/// Where the job stands ([`RoundEngine::phase_name`]).
pub const PHASE_NAMES: [&str; 4] = ["training", "final_eval", "federated_eval", "finished"];

#[derive(Clone, Debug)]
struct WorkerEntry {
    info: WorkerInfo,
    lease_expires: Instant,
    told_done: bool,
}

#[derive(Clone, Debug, PartialEq)]
enum PushState {
    Assigned,
    Pushing {
        next_tensor: usize,
        next_offset: usize,
        wire_bytes: u64,
        header: PushHeader,
        /// Σ v² of the values folded so far (federated norm check).
        sum_squares: f64,
    },
    Pushed(PushStats),
}

#[derive(Clone, Debug)]
struct Participant {
    shards: Vec<ShardId>,
    evaluates: bool,
    state: PushState,
}

#[derive(Debug)]
struct ActiveRound {
    id: RoundId,
    started_at: Instant,
    deadline: Instant,
    /// Participants the round started with; lost ones may be replaced up to this.
    target_participants: usize,
    /// Pushes needed to commit: `min_participants`, or fewer when the epoch
    /// had fewer shards left than that (the epoch's last round). Without the
    /// exception such a round could never commit and would be retried forever.
    quorum: usize,
    participants: BTreeMap<WorkerId, Participant>,
    bytes_pulled: u64,
    bytes_pushed: u64,
    /// Norms of the complete pushes (federated).
    update_norms: Vec<f64>,
}

/// A federated round whose sum waits for its privacy charge to be durable.
#[derive(Debug)]
struct PendingRelease {
    round: ActiveRound,
    shares: usize,
    cost: SampledGaussianRound,
}

#[derive(Debug)]
enum Phase {
    /// Rounds run.
    Training,
    /// Training is over; the final version is evaluated by one worker.
    FinalEval {
        assignee: Option<(WorkerId, Instant)>,
    },
    /// A federated job's training is over; every connected client evaluates
    /// the final version on its own held-out text until all have reported
    /// or the deadline passes.
    FederatedEval {
        asked: std::collections::BTreeSet<WorkerId>,
        reports: BTreeMap<WorkerId, EvalScore>,
        deadline: Instant,
    },
    Finished,
}

/// The coordinator's state for one pretraining job.
#[derive(Debug)]
pub struct RoundEngine {
    config: EngineConfig,
    layout: ParamLayout,
    shards: BTreeMap<ShardId, ShardInfo>,
    eval_shards: Vec<ShardInfo>,
    scheduler: ShardScheduler,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    next_worker: u64,
    next_round: u64,
    committed_rounds: u64,
    epochs_completed: u64,
    version: Version,
    global: Arc<Vec<f32>>,
    accumulator: Accumulator,
    outer: OuterOptimizer,
    round: Option<ActiveRound>,
    phase: Phase,
    final_eval_loss: Option<f64>,
    final_eval_accuracy: Option<f64>,
    events: Vec<Event>,
    /// Privacy spent so far (federated jobs with DP).
    privacy: PrivacyLedger,
    /// Draws federated cohorts.
    sampling_rng: SplitMix64,
    /// The push a round's deadline cut off mid-stream (worker, round): its
    /// next chunk is answered as stale, not as a push that never began.
    cut_push: Option<(WorkerId, RoundId)>,
    pending_release: Option<PendingRelease>,
    /// Why the job ended early (the privacy budget), if it did.
    stop_reason: Option<String>,
}

/// How long an idle worker is told to wait before asking again.
const IDLE_RETRY: Duration = Duration::from_millis(200);

impl RoundEngine {
    pub fn new(
        config: EngineConfig,
        train_shards: Vec<ShardInfo>,
        eval_shards: Vec<ShardInfo>,
        initial_params: Vec<f32>,
    ) -> Result<RoundEngine, EngineConfigError> {
        if config.tensors.is_empty() {
            return Err(EngineConfigError::NoTensors);
        }
        if let Some(rules) = &config.federated {
            rules.validate(config.min_participants)?;
            if config.max_rounds == 0 || config.max_epochs != 0 {
                return Err(EngineConfigError::FederatedLimits);
            }
        } else if train_shards.is_empty() {
            return Err(EngineConfigError::NoShards);
        }
        let shards_per_worker = match config.federated {
            Some(_) => 1,
            None => config.shards_per_worker,
        };
        for (field, value) in [
            ("min_workers", config.min_workers),
            ("min_participants", config.min_participants),
            ("shards_per_worker", shards_per_worker),
            ("max_chunk_elems", config.max_chunk_elems),
        ] {
            if value == 0 {
                return Err(EngineConfigError::Zero { field });
            }
        }
        if config.max_workers_per_round != 0
            && config.min_participants > config.max_workers_per_round
        {
            return Err(EngineConfigError::ImpossibleQuorum {
                min_participants: config.min_participants,
                max_workers_per_round: config.max_workers_per_round,
            });
        }
        if config.min_participants > config.min_workers {
            return Err(EngineConfigError::QuorumAboveMinWorkers {
                min_participants: config.min_participants,
                min_workers: config.min_workers,
            });
        }
        if config.max_rounds == 0 && config.max_epochs == 0 {
            return Err(EngineConfigError::Endless);
        }
        config.outer.validate()?;
        let layout = ParamLayout::new(&config.tensors);
        if initial_params.len() != layout.total() {
            return Err(EngineConfigError::InitialParams {
                got: initial_params.len(),
                expected: layout.total(),
            });
        }
        let scheduler =
            ShardScheduler::new(train_shards.iter().map(|s| s.id).collect(), config.seed);
        Ok(RoundEngine {
            accumulator: Accumulator::new(layout.total()),
            outer: OuterOptimizer::new(config.outer, layout.total()),
            layout,
            shards: train_shards.into_iter().map(|s| (s.id, s)).collect(),
            eval_shards,
            scheduler,
            workers: BTreeMap::new(),
            next_worker: 1,
            next_round: 1,
            committed_rounds: 0,
            epochs_completed: 0,
            version: Version(0),
            global: Arc::new(initial_params),
            round: None,
            phase: Phase::Training,
            final_eval_loss: None,
            final_eval_accuracy: None,
            events: Vec::new(),
            privacy: PrivacyLedger::default(),
            cut_push: None,
            sampling_rng: SplitMix64::new(
                config
                    .federated
                    .as_ref()
                    .map_or(0, |rules| rules.sampling_seed),
            ),
            pending_release: None,
            stop_reason: None,
            config,
        })
    }

    // ---- read access -------------------------------------------------------

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The published parameters of the current version.
    pub fn global_params(&self) -> &Arc<Vec<f32>> {
        &self.global
    }

    pub fn outer_optimizer(&self) -> &OuterOptimizer {
        &self.outer
    }

    pub fn ledger(&self) -> &[Consumption] {
        self.scheduler.ledger()
    }

    pub fn worker_info(&self, worker: WorkerId) -> Option<&WorkerInfo> {
        self.workers.get(&worker).map(|w| &w.info)
    }

    pub fn live_workers(&self) -> usize {
        self.workers.len()
    }

    pub fn current_round(&self) -> Option<RoundId> {
        self.round.as_ref().map(|r| r.id)
    }

    pub fn committed_rounds(&self) -> u64 {
        self.committed_rounds
    }

    /// Every live worker with what it is doing, in worker id order. Pure:
    /// `now` only computes the leases' remaining time.
    pub fn worker_statuses(&self, now: Instant) -> Vec<WorkerStatus> {
        let round = self
            .round
            .as_ref()
            .or(self.pending_release.as_ref().map(|p| &p.round));
        self.workers
            .iter()
            .map(|(&worker, entry)| {
                let in_round = round.and_then(|r| r.participants.get(&worker).map(|p| (r.id, p)));
                let activity = match (&self.phase, in_round) {
                    _ if entry.told_done => WorkerActivity::Released,
                    (_, Some((round, p))) => match p.state {
                        PushState::Assigned => WorkerActivity::Training { round },
                        PushState::Pushing { .. } => WorkerActivity::Pushing { round },
                        PushState::Pushed(_) => WorkerActivity::Pushed { round },
                    },
                    (Phase::FinalEval { assignee }, None)
                        if assignee.is_some_and(|(w, _)| w == worker) =>
                    {
                        WorkerActivity::Evaluating {
                            version: self.version,
                        }
                    }
                    (Phase::FederatedEval { asked, reports, .. }, None)
                        if asked.contains(&worker) && !reports.contains_key(&worker) =>
                    {
                        WorkerActivity::Evaluating {
                            version: self.version,
                        }
                    }
                    _ => WorkerActivity::Idle,
                };
                WorkerStatus {
                    worker,
                    hostname: entry.info.hostname.clone(),
                    device: entry.info.device.clone(),
                    client: entry.info.client.clone(),
                    activity,
                    lease_remaining: entry.lease_expires.saturating_duration_since(now),
                }
            })
            .collect()
    }

    /// Where the job stands: one of [`PHASE_NAMES`].
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Training => PHASE_NAMES[0],
            Phase::FinalEval { .. } => PHASE_NAMES[1],
            Phase::FederatedEval { .. } => PHASE_NAMES[2],
            Phase::Finished => PHASE_NAMES[3],
        }
    }

    /// Complete epochs over the training shards.
    pub fn epochs_completed(&self) -> u64 {
        self.epochs_completed
    }

    /// Privacy spent so far (empty for pretraining and jobs without DP).
    pub fn privacy_ledger(&self) -> &PrivacyLedger {
        &self.privacy
    }

    /// Installs the privacy ledger a restarted coordinator read back from its
    /// store. The durable ledger is authoritative: it may hold charges for
    /// rounds that were never published (spent, never refunded).
    pub fn restore_privacy_ledger(&mut self, ledger: PrivacyLedger) {
        self.privacy = ledger;
    }

    /// Why the job finished, once it has.
    pub fn finish_reason_text(&self) -> String {
        self.finish_reason()
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// The job is finished and every live worker has been told so.
    pub fn all_workers_released(&self) -> bool {
        self.is_finished() && self.workers.values().all(|w| w.told_done)
    }

    /// Ends the job now at the current version, as an operator asked: the
    /// open round (and a DP round waiting for its release) is dropped
    /// uncommitted, its shards go back to the pool, no round starts again,
    /// and every worker's next task is Done with `reason`. Emits no event:
    /// the caller checkpoints before stopping, and a restart resumes from
    /// that checkpoint (restore derives the phase from the limits). Does
    /// nothing once the job is finished.
    pub fn stop(&mut self, reason: String) {
        if self.is_finished() {
            return;
        }
        if let Some(round) = self.round.take() {
            for &worker in round.participants.keys() {
                self.scheduler.release(worker);
            }
        }
        self.pending_release = None;
        // Drops an open push too.
        self.accumulator.reset();
        self.stop_reason = Some(reason);
        self.phase = Phase::Finished;
    }

    pub fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    // ---- membership ----------------------------------------------------------

    pub fn join(&mut self, info: WorkerInfo, now: Instant) -> (WorkerId, Duration) {
        if let Some(client) = &info.client {
            let previous: Vec<WorkerId> = self
                .workers
                .iter()
                .filter(|(_, w)| w.info.client.as_ref() == Some(client))
                .map(|(&id, _)| id)
                .collect();
            for worker in previous {
                self.expire(worker);
            }
        }
        let worker = WorkerId(self.next_worker);
        self.next_worker += 1;
        self.workers.insert(
            worker,
            WorkerEntry {
                info: info.clone(),
                lease_expires: now + self.config.lease,
                told_done: false,
            },
        );
        self.events.push(Event::WorkerJoined { worker, info });
        self.maybe_start_round(now);
        (worker, self.config.lease)
    }

    /// Checks that `session` is the one `worker` joined with: the worker's
    /// identity is bound to its lease, so one worker cannot speak for another.
    /// An unknown worker is [`EngineError::UnknownWorker`] whatever the
    /// session (it joins again); nothing changes either way.
    pub fn authenticate(
        &self,
        worker: WorkerId,
        session: Option<&SessionDigest>,
    ) -> Result<(), EngineError> {
        let entry = self
            .workers
            .get(&worker)
            .ok_or(EngineError::UnknownWorker(worker))?;
        let Some(session) = session else {
            return Err(EngineError::MissingSession(worker));
        };
        match &entry.info.session {
            Some(issued) if issued == session => Ok(()),
            _ => Err(EngineError::SessionMismatch(worker)),
        }
    }

    /// Renews the worker's lease.
    pub fn heartbeat(&mut self, worker: WorkerId, now: Instant) -> Result<Duration, EngineError> {
        self.touch(worker, now)?;
        Ok(self.config.lease)
    }

    fn touch(&mut self, worker: WorkerId, now: Instant) -> Result<(), EngineError> {
        let lease = self.config.lease;
        let entry = self
            .workers
            .get_mut(&worker)
            .ok_or(EngineError::UnknownWorker(worker))?;
        if entry.lease_expires <= now {
            // Expired but not yet swept by a tick: treat it as gone.
            self.expire(worker);
            return Err(EngineError::UnknownWorker(worker));
        }
        entry.lease_expires = now + lease;
        Ok(())
    }

    /// Advances time: expires leases, enforces the round deadline, starts rounds.
    pub fn tick(&mut self, now: Instant) {
        let expired: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.lease_expires <= now)
            .map(|(&id, _)| id)
            .collect();
        for worker in expired {
            self.expire(worker);
        }
        if let Some(round) = &self.round {
            if now >= round.deadline {
                self.on_deadline(now);
            }
        }
        self.maybe_finish_federated_eval(now);
        self.check_round(now);
        self.maybe_start_round(now);
    }

    fn expire(&mut self, worker: WorkerId) {
        self.workers.remove(&worker);
        let mut returned = Vec::new();
        if let Some(round) = &mut self.round {
            if let Some(participant) = round.participants.remove(&worker) {
                if matches!(participant.state, PushState::Pushing { .. }) {
                    self.accumulator.abort_push();
                }
                if matches!(participant.state, PushState::Pushed(_)) {
                    // Its update is already in the sum: keep it and its shards.
                    round.participants.insert(worker, participant);
                } else {
                    returned = self.scheduler.release(worker);
                }
            }
        }
        if let Phase::FinalEval { assignee } = &mut self.phase {
            if assignee.is_some_and(|(w, _)| w == worker) {
                *assignee = None;
            }
        }
        if let Phase::FederatedEval { asked, .. } = &mut self.phase {
            asked.remove(&worker);
        }
        self.events.push(Event::WorkerExpired {
            worker,
            returned_shards: returned,
        });
    }

    // ---- tasks -----------------------------------------------------------------

    pub fn next_task(&mut self, worker: WorkerId, now: Instant) -> Result<Task, EngineError> {
        self.touch(worker, now)?;
        self.tick(now);
        match &mut self.phase {
            Phase::Finished => {
                if let Some(entry) = self.workers.get_mut(&worker) {
                    entry.told_done = true;
                }
                return Ok(Task::Done {
                    reason: self.finish_reason(),
                });
            }
            Phase::FinalEval { assignee } => {
                let free = assignee.is_none_or(|(w, _)| w == worker);
                if free {
                    *assignee = Some((worker, now));
                    return Ok(Task::Eval {
                        version: self.version,
                        eval_shards: self.eval_shards.clone(),
                    });
                }
                return Ok(Task::Wait {
                    retry_after: IDLE_RETRY,
                });
            }
            Phase::FederatedEval { asked, reports, .. } => {
                if reports.contains_key(&worker) {
                    return Ok(Task::Wait {
                        retry_after: IDLE_RETRY,
                    });
                }
                asked.insert(worker);
                return Ok(Task::Eval {
                    version: self.version,
                    eval_shards: Vec::new(),
                });
            }
            Phase::Training => {}
        }
        self.maybe_join_running_round(worker);
        let Some(round) = &self.round else {
            return Ok(Task::Wait {
                retry_after: IDLE_RETRY,
            });
        };
        match round.participants.get(&worker) {
            Some(Participant {
                state: PushState::Assigned,
                shards,
                evaluates,
            }) => Ok(Task::Train {
                round: round.id,
                version: self.version,
                shards: shards.iter().map(|id| self.shards[id].clone()).collect(),
                eval_shards: if *evaluates {
                    self.eval_shards.clone()
                } else {
                    Vec::new()
                },
                deadline_in: round.deadline.saturating_duration_since(now),
            }),
            _ => Ok(Task::Wait {
                retry_after: IDLE_RETRY,
            }),
        }
    }

    fn finish_reason(&self) -> String {
        if let Some(reason) = &self.stop_reason {
            return reason.clone();
        }
        format!(
            "job finished after {} rounds and {} epochs at {}",
            self.committed_rounds, self.epochs_completed, self.version
        )
    }

    /// A worker that is not in the running round replaces a lost participant,
    /// if the round lost one and shards are waiting.
    fn maybe_join_running_round(&mut self, worker: WorkerId) {
        if self.config.federated.is_some() {
            // A cohort is drawn at the start of the round; nobody joins it later.
            return;
        }
        let Some(round) = &mut self.round else { return };
        if round.participants.contains_key(&worker)
            || round.participants.len() >= round.target_participants
            || self.scheduler.pending() == 0
        {
            return;
        }
        let shards = self
            .scheduler
            .lease(worker, round.id, self.config.shards_per_worker);
        round.participants.insert(
            worker,
            Participant {
                shards,
                evaluates: false,
                state: PushState::Assigned,
            },
        );
    }

    fn maybe_start_round(&mut self, now: Instant) {
        if self.round.is_some()
            || self.pending_release.is_some()
            || !matches!(self.phase, Phase::Training)
        {
            return;
        }
        if self.workers.len() < self.config.min_workers {
            return;
        }
        if self.config.federated.is_some() {
            self.start_federated_round(now);
            return;
        }
        let cap = match self.config.max_workers_per_round {
            0 => usize::MAX,
            n => n,
        };
        let id = RoundId(self.next_round);
        let mut participants = BTreeMap::new();
        for &worker in self.workers.keys().take(cap) {
            let shards = self
                .scheduler
                .lease(worker, id, self.config.shards_per_worker);
            if shards.is_empty() {
                break;
            }
            participants.insert(
                worker,
                Participant {
                    shards,
                    evaluates: false,
                    state: PushState::Assigned,
                },
            );
        }
        if participants.is_empty() {
            return;
        }
        let eval_due = match self.config.eval_every {
            0 => false,
            k => (id.0 - 1).is_multiple_of(k),
        };
        if eval_due && !self.eval_shards.is_empty() {
            if let Some(first) = participants.values_mut().next() {
                first.evaluates = true;
            }
        }
        self.next_round += 1;
        let shards = participants.values().map(|p| p.shards.len()).sum();
        self.events.push(Event::RoundStarted {
            round: id,
            version: self.version,
            participants: participants.len(),
            shards,
        });
        self.round = Some(ActiveRound {
            id,
            started_at: now,
            deadline: now + self.config.round_deadline,
            target_participants: participants.len(),
            quorum: self.config.min_participants.min(participants.len()),
            participants,
            bytes_pulled: 0,
            bytes_pushed: 0,
            update_norms: Vec::new(),
        });
    }

    /// Refuses the round if it could overrun the budget, then draws its cohort.
    fn start_federated_round(&mut self, now: Instant) {
        let rules = self.config.federated.as_ref().expect("federated job");
        let m = self.config.min_participants;
        if let (Some(budget), Some(worst_case)) = (rules.budget, rules.round_cost(m, m)) {
            // The cheapest release this round may make has m shares; with
            // more, the noise in the sum (and so the cost) only improves.
            let check = self
                .privacy
                .check(&worst_case, &budget)
                .expect("rules and budget were validated");
            if !check.within_budget {
                let spent = self
                    .privacy
                    .epsilon(budget.delta)
                    .expect("validated delta")
                    .epsilon;
                self.stop_reason = Some(format!(
                    "privacy budget reached: epsilon spent {spent:.4} of {:.4} (delta {:e}); the next round would bring it to {:.4}",
                    budget.epsilon, budget.delta, check.epsilon_after.epsilon
                ));
                self.events.push(Event::BudgetExhausted {
                    epsilon_spent: spent,
                    epsilon_if_next_round: check.epsilon_after.epsilon,
                    budget_epsilon: budget.epsilon,
                    delta: budget.delta,
                });
                self.start_federated_eval(now);
                return;
            }
        }
        let clients: Vec<WorkerId> = self.workers.keys().copied().collect();
        let cohort = rules.sample_cohort(&clients, &mut self.sampling_rng);
        let id = RoundId(self.next_round);
        self.next_round += 1;
        self.events.push(Event::RoundStarted {
            round: id,
            version: self.version,
            participants: cohort.len(),
            shards: 0,
        });
        // Central DP releases every round, whatever arrives (even only the
        // noise): then whether a round is released does not depend on who
        // was sampled, as DP-FedAvg's accounting assumes. The other modes
        // need m noise shares (distributed) or m updates to release.
        let quorum = if rules.releases_every_round() { 0 } else { m };
        if cohort.len() < quorum {
            // Nothing can be released: no charge, try again with a new draw.
            self.events.push(Event::RoundAborted {
                round: id,
                pushed: 0,
                needed: m,
                returned_shards: 0,
            });
            return;
        }
        let participants = cohort
            .into_iter()
            .map(|worker| {
                (
                    worker,
                    Participant {
                        shards: Vec::new(),
                        evaluates: false,
                        state: PushState::Assigned,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>();
        self.round = Some(ActiveRound {
            id,
            started_at: now,
            deadline: now + self.config.round_deadline,
            target_participants: participants.len(),
            quorum,
            participants,
            bytes_pulled: 0,
            bytes_pushed: 0,
            update_norms: Vec::new(),
        });
    }

    // ---- pulls -------------------------------------------------------------------

    /// The parameters of `version` for `worker` to pull; only the current version is served.
    pub fn pull(
        &mut self,
        worker: WorkerId,
        version: Version,
        now: Instant,
    ) -> Result<Arc<Vec<f32>>, EngineError> {
        self.touch(worker, now)?;
        if version != self.version {
            return Err(EngineError::StaleVersion {
                got: version,
                current: self.version,
            });
        }
        if let Some(round) = &mut self.round {
            round.bytes_pulled += (self.global.len() * 4) as u64;
        }
        Ok(Arc::clone(&self.global))
    }

    // ---- pushes ----------------------------------------------------------------

    fn round_name(&self) -> String {
        self.round
            .as_ref()
            .map_or_else(|| "none".to_string(), |r| r.id.to_string())
    }

    /// Opens a push. Refused if another worker's push is being folded: the
    /// caller serialises pushes and retries.
    pub fn begin_push(
        &mut self,
        worker: WorkerId,
        header: PushHeader,
        now: Instant,
    ) -> Result<(), EngineError> {
        self.touch(worker, now)?;
        self.tick(now);
        if self.cut_push.is_some_and(|(w, _)| w == worker) {
            self.cut_push = None;
        }
        let result = self.check_push_header(worker, &header);
        if let Err(error) = &result {
            if !matches!(error, EngineError::PushInProgress) {
                self.reject(worker, Some(header.round), error);
            }
            return result;
        }
        self.accumulator.begin_push().expect("no push open");
        let round = self.round.as_mut().expect("checked");
        round.participants.get_mut(&worker).expect("checked").state = PushState::Pushing {
            next_tensor: 0,
            next_offset: 0,
            wire_bytes: 0,
            header,
            sum_squares: 0.0,
        };
        Ok(())
    }

    fn check_push_header(&self, worker: WorkerId, header: &PushHeader) -> Result<(), EngineError> {
        let Some(round) = &self.round else {
            return Err(EngineError::StaleRound {
                got: header.round,
                current: self.round_name(),
            });
        };
        if header.round != round.id {
            return Err(EngineError::StaleRound {
                got: header.round,
                current: self.round_name(),
            });
        }
        if header.base_version != self.version {
            return Err(EngineError::StaleVersion {
                got: header.base_version,
                current: self.version,
            });
        }
        let participant = round
            .participants
            .get(&worker)
            .ok_or(EngineError::NotAssigned {
                worker,
                round: round.id,
            })?;
        match participant.state {
            PushState::Assigned => {}
            PushState::Pushed(_) => {
                return Err(EngineError::AlreadyPushed {
                    worker,
                    round: round.id,
                })
            }
            PushState::Pushing { .. } => return Err(EngineError::PushInProgress),
        }
        if header.dtype != self.config.update_dtype {
            return Err(EngineError::WrongDtype {
                got: header.dtype,
                expected: self.config.update_dtype,
            });
        }
        let stats = &header.stats;
        if !stats.mean_loss.is_finite() || stats.mean_loss < 0.0 {
            return Err(EngineError::InvalidStats(
                "mean_loss must be finite and non-negative",
            ));
        }
        if !stats.train_seconds.is_finite() || stats.train_seconds < 0.0 {
            return Err(EngineError::InvalidStats(
                "train_seconds must be finite and non-negative",
            ));
        }
        if stats.eval_loss.is_some_and(|l| !l.is_finite() || l < 0.0) {
            return Err(EngineError::InvalidStats(
                "eval_loss must be finite and non-negative",
            ));
        }
        if stats
            .eval_accuracy
            .is_some_and(|a| !(0.0..=1.0).contains(&a))
        {
            return Err(EngineError::InvalidStats("eval_accuracy must be in [0, 1]"));
        }
        if self.accumulator.is_push_open() {
            return Err(EngineError::PushInProgress);
        }
        Ok(())
    }

    fn reject(&mut self, worker: WorkerId, round: Option<RoundId>, error: &EngineError) {
        self.events.push(Event::PushRejected {
            worker,
            round,
            code: error.rejection_code(),
            reason: error.to_string(),
        });
    }

    /// Folds one chunk of the worker's open push. On error the whole push is
    /// undone and the worker may push again from the start.
    pub fn push_chunk(
        &mut self,
        worker: WorkerId,
        tensor_index: usize,
        offset: usize,
        values: &FiniteValues,
        wire_bytes: usize,
    ) -> Result<(), EngineError> {
        let result = self.fold_chunk(worker, tensor_index, offset, values.as_slice(), wire_bytes);
        if let Err(error) = &result {
            if !matches!(error, EngineError::NoOpenPush(_)) {
                self.abort_push(worker, error);
            }
        }
        result.map_err(|e| self.explain_cut_push(e))
    }

    /// A chunk or finish from a worker whose push the deadline cut off is
    /// stale: say so rather than that no push began.
    fn explain_cut_push(&self, error: EngineError) -> EngineError {
        match (error, self.cut_push) {
            (EngineError::NoOpenPush(worker), Some((cut, round))) if cut == worker => {
                EngineError::StaleRound {
                    got: round,
                    current: self.round_name(),
                }
            }
            (error, _) => error,
        }
    }

    fn fold_chunk(
        &mut self,
        worker: WorkerId,
        tensor_index: usize,
        offset: usize,
        values: &[f32],
        wire_bytes: usize,
    ) -> Result<(), EngineError> {
        let round = self.round.as_mut().ok_or(EngineError::NoOpenPush(worker))?;
        let participant = round
            .participants
            .get_mut(&worker)
            .ok_or(EngineError::NoOpenPush(worker))?;
        let PushState::Pushing {
            next_tensor,
            next_offset,
            wire_bytes: push_bytes,
            sum_squares,
            ..
        } = &mut participant.state
        else {
            return Err(EngineError::NoOpenPush(worker));
        };
        let count = self.layout.tensors().len();
        let slot = self
            .layout
            .tensor(tensor_index)
            .ok_or(EngineError::UnknownTensor {
                index: tensor_index,
                count,
            })?;
        if values.is_empty() {
            return Err(EngineError::EmptyChunk);
        }
        if values.len() > self.config.max_chunk_elems {
            return Err(EngineError::ChunkTooLarge {
                len: values.len(),
                max: self.config.max_chunk_elems,
            });
        }
        if (tensor_index, offset) != (*next_tensor, *next_offset) {
            return Err(EngineError::ChunkOutOfOrder {
                expected_tensor: *next_tensor,
                expected_offset: *next_offset,
                got_tensor: tensor_index,
                got_offset: offset,
            });
        }
        if offset + values.len() > slot.numel {
            return Err(EngineError::ChunkOverrunsTensor {
                tensor: tensor_index,
                name: slot.name.clone(),
                offset,
                len: values.len(),
                numel: slot.numel,
            });
        }
        self.accumulator
            .fold(slot.offset + offset, values)
            .map_err(|e| match e {
                // The checks above make these unreachable; keep the invariant loud.
                FoldError::OutOfOrder { .. } | FoldError::PastEnd { .. } => {
                    EngineError::ChunkOutOfOrder {
                        expected_tensor: *next_tensor,
                        expected_offset: *next_offset,
                        got_tensor: tensor_index,
                        got_offset: offset,
                    }
                }
                _ => EngineError::NoOpenPush(worker),
            })?;
        *next_offset += values.len();
        if *next_offset == slot.numel {
            *next_tensor += 1;
            *next_offset = 0;
        }
        *push_bytes += wire_bytes as u64;
        if self.config.federated.is_some() {
            *sum_squares += crate::clip::sum_of_squares(values);
        }
        Ok(())
    }

    /// Completes the worker's push; the round may commit as a result.
    pub fn finish_push(
        &mut self,
        worker: WorkerId,
        now: Instant,
    ) -> Result<PushReceipt, EngineError> {
        self.finish_open_push(worker, now)
            .map_err(|e| self.explain_cut_push(e))
    }

    fn finish_open_push(
        &mut self,
        worker: WorkerId,
        now: Instant,
    ) -> Result<PushReceipt, EngineError> {
        let Some(round) = self.round.as_mut() else {
            return Err(EngineError::NoOpenPush(worker));
        };
        let Some(participant) = round.participants.get_mut(&worker) else {
            return Err(EngineError::NoOpenPush(worker));
        };
        let PushState::Pushing {
            next_tensor,
            header,
            wire_bytes,
            sum_squares,
            ..
        } = participant.state
        else {
            return Err(EngineError::NoOpenPush(worker));
        };
        let norm = sum_squares.sqrt();
        if let Some(rules) = &self.config.federated {
            if rules.clip_norm > 0.0 && next_tensor == self.layout.tensors().len() {
                let bound = update_norm_bound(
                    rules.clip_norm,
                    rules.client_noise_stddev(self.config.min_participants),
                    self.layout.total(),
                );
                if norm > bound {
                    let error = EngineError::UpdateNormTooLarge { norm, bound };
                    self.abort_push(worker, &error);
                    return Err(error);
                }
            }
        }
        let Some(round) = self.round.as_mut() else {
            return Err(EngineError::NoOpenPush(worker));
        };
        let participant = round.participants.get_mut(&worker).expect("checked above");
        if next_tensor != self.layout.tensors().len() {
            let received = self
                .layout
                .tensor(next_tensor)
                .map_or(self.layout.total(), |slot| slot.offset);
            let error = EngineError::IncompletePush {
                received,
                expected: self.layout.total(),
            };
            self.abort_push(worker, &error);
            return Err(error);
        }
        self.accumulator
            .finish_push()
            .expect("every element folded");
        participant.state = PushState::Pushed(header.stats);
        // Only updates that count are reported as pushed bytes.
        round.bytes_pushed += wire_bytes;
        round.update_norms.push(norm);
        let receipt = PushReceipt {
            round: round.id,
            received: round
                .participants
                .values()
                .filter(|p| matches!(p.state, PushState::Pushed(_)))
                .count(),
            expected: round.participants.len(),
        };
        self.check_round(now);
        Ok(receipt)
    }

    /// Discards the worker's open push (its stream broke, or a chunk was bad).
    pub fn abort_push(&mut self, worker: WorkerId, reason: &EngineError) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        let round_id = round.id;
        let Some(participant) = round.participants.get_mut(&worker) else {
            return;
        };
        if matches!(participant.state, PushState::Pushing { .. }) {
            self.accumulator.abort_push();
            participant.state = PushState::Assigned;
            self.reject(worker, Some(round_id), reason);
        }
    }

    // ---- evaluation ------------------------------------------------------------

    pub fn report_eval(
        &mut self,
        worker: WorkerId,
        version: Version,
        score: EvalScore,
        now: Instant,
    ) -> Result<(), EngineError> {
        self.touch(worker, now)?;
        if !score.loss.is_finite() || score.loss < 0.0 {
            return Err(EngineError::InvalidStats(
                "eval loss must be finite and non-negative",
            ));
        }
        if score.accuracy.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
            return Err(EngineError::InvalidStats("eval accuracy must be in [0, 1]"));
        }
        if let Phase::FederatedEval { asked, reports, .. } = &mut self.phase {
            if version != self.version || !asked.contains(&worker) || reports.contains_key(&worker)
            {
                return Err(EngineError::UnexpectedEval { worker, version });
            }
            reports.insert(worker, score);
            self.maybe_finish_federated_eval(now);
            return Ok(());
        }
        let Phase::FinalEval { assignee } = &self.phase else {
            return Err(EngineError::UnexpectedEval { worker, version });
        };
        if version != self.version || !assignee.is_some_and(|(w, _)| w == worker) {
            return Err(EngineError::UnexpectedEval { worker, version });
        }
        self.final_eval_loss = Some(score.loss);
        self.final_eval_accuracy = score.accuracy;
        self.events.push(Event::EvalReported {
            version,
            loss: score.loss,
            tokens: score.weight,
            accuracy: score.accuracy,
        });
        self.finish();
        Ok(())
    }

    // ---- round completion ------------------------------------------------------

    fn on_deadline(&mut self, now: Instant) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if self.accumulator.is_push_open() {
            self.accumulator.abort_push();
            self.cut_push = round
                .participants
                .iter()
                .find(|(_, p)| matches!(p.state, PushState::Pushing { .. }))
                .map(|(&w, _)| (w, round.id));
        }
        let pushed = round
            .participants
            .values()
            .filter(|p| matches!(p.state, PushState::Pushed(_)))
            .count();
        if pushed < round.quorum {
            self.abort_round();
            return;
        }
        // Stragglers' shards go back to the pool; the round commits without them.
        let late: Vec<WorkerId> = round
            .participants
            .iter()
            .filter(|(_, p)| !matches!(p.state, PushState::Pushed(_)))
            .map(|(&w, _)| w)
            .collect();
        for worker in late {
            round.participants.remove(&worker);
            self.scheduler.release(worker);
        }
        self.commit(now);
    }

    fn abort_round(&mut self) {
        let Some(round) = self.round.take() else {
            return;
        };
        let mut returned = 0;
        for &worker in round.participants.keys() {
            returned += self.scheduler.release(worker).len();
        }
        let pushed = self.accumulator.pushes();
        self.accumulator.reset();
        self.events.push(Event::RoundAborted {
            round: round.id,
            pushed,
            needed: round.quorum,
            returned_shards: returned,
        });
    }

    /// Commits the round if every participant has pushed and the quorum is met.
    fn check_round(&mut self, now: Instant) {
        let Some(round) = &self.round else { return };
        if round.participants.is_empty() {
            if round.quorum == 0 && self.config.federated.is_some() {
                // Central DP: the noise alone is released.
                self.commit(now);
            } else {
                self.abort_round();
            }
            return;
        }
        let all_pushed = round
            .participants
            .values()
            .all(|p| matches!(p.state, PushState::Pushed(_)));
        if all_pushed && round.participants.len() >= round.quorum {
            self.commit(now);
        }
    }

    fn commit(&mut self, now: Instant) {
        let round = self.round.take().expect("commit without a round");
        let count = self.accumulator.pushes();
        debug_assert_eq!(count, round.participants.len());
        let noise_only = round.quorum == 0 && self.config.federated.is_some();
        if count == 0 && !noise_only {
            self.round = Some(round);
            self.abort_round();
            return;
        }
        if let Some(rules) = &self.config.federated {
            let m = self.config.min_participants;
            match (rules.budget, rules.round_cost(count, m)) {
                (Some(budget), Some(cost)) => {
                    let epsilon_after = self
                        .privacy
                        .epsilon_after(&cost, budget.delta)
                        .expect("validated")
                        .epsilon;
                    self.events.push(Event::ReleaseReady {
                        round: round.id,
                        shares: count,
                        cost,
                        epsilon_after,
                    });
                    self.pending_release = Some(PendingRelease {
                        round,
                        shares: count,
                        cost,
                    });
                }
                _ => self.publish_federated(round, count, None, now),
            }
            return;
        }
        let base_version = self.publish_next_version(count as f64);

        let mut tokens = 0u64;
        let mut weighted_loss = 0.0;
        let mut eval_loss = None;
        for (&worker, participant) in &round.participants {
            if let PushState::Pushed(stats) = participant.state {
                tokens += stats.tokens;
                weighted_loss += stats.mean_loss * stats.tokens as f64;
                eval_loss = eval_loss.or(stats.eval_loss);
            }
            self.scheduler.commit(worker);
        }
        let wall = now.saturating_duration_since(round.started_at);
        self.events.push(Event::RoundCommitted(RoundSummary {
            round: round.id,
            base_version,
            new_version: self.version,
            participants: count,
            mean_loss: if tokens > 0 {
                weighted_loss / tokens as f64
            } else {
                0.0
            },
            tokens,
            tokens_per_second: tokens as f64 / wall.as_secs_f64().max(1e-9),
            bytes_pulled: round.bytes_pulled,
            bytes_pushed: round.bytes_pushed,
            wall,
            eval_loss,
            eval_accuracy: None,
            epoch: self.scheduler.epoch(),
            federated: None,
        }));
        if self.scheduler.epoch_complete() {
            self.epochs_completed += 1;
            self.events.push(Event::EpochCompleted {
                epoch: self.scheduler.epoch(),
            });
            self.scheduler.start_next_epoch();
        }
        let rounds_done =
            self.config.max_rounds != 0 && self.committed_rounds >= self.config.max_rounds;
        let epochs_done =
            self.config.max_epochs != 0 && self.epochs_completed >= self.config.max_epochs;
        if rounds_done || epochs_done {
            self.phase = if self.eval_shards.is_empty() {
                Phase::Finished
            } else {
                Phase::FinalEval { assignee: None }
            };
            if matches!(self.phase, Phase::Finished) {
                self.finish();
            }
        } else {
            self.maybe_start_round(now);
        }
    }

    /// Applies the outer optimizer to the round's sum divided by `divisor`
    /// and publishes the result as the next version; returns the base version.
    ///
    /// The sum buffer becomes the next parameters in place; the old
    /// parameters' buffer becomes the next sum unless a pull still holds it,
    /// so steady-state memory stays at three model-sized buffers (parameters,
    /// sum, undo) plus momentum. Allocating first would make a fourth
    /// resident (swap_sum zero-fills it).
    fn publish_next_version(&mut self, divisor: f64) -> Version {
        self.outer
            .step_with_divisor(&self.global, self.accumulator.sum_mut(), divisor);
        let len = self.global.len();
        let old = std::mem::take(&mut self.global);
        let recycled = Arc::try_unwrap(old).unwrap_or_else(|_still_pulled| vec![0.0; len]);
        self.global = Arc::new(self.accumulator.swap_sum(recycled));
        let base_version = self.version;
        self.version = Version(self.version.0 + 1);
        self.committed_rounds += 1;
        base_version
    }

    /// Publishes a federated round whose privacy charge (if any) is durable:
    /// adds the central noise through `add_central_noise(sum, stddev)` when
    /// the DP mode is central, divides by the expected cohort size and
    /// applies the server optimizer. If the noise cannot be added the round
    /// is aborted (its charge stays spent) and the error returned.
    pub fn release(
        &mut self,
        round: RoundId,
        now: Instant,
        add_central_noise: impl FnOnce(&mut [f32], f64) -> Result<(), String>,
    ) -> Result<(), String> {
        let Some(pending) = self.pending_release.take_if(|p| p.round.id == round) else {
            return Err(EngineError::NoPendingRelease(round).to_string());
        };
        self.privacy
            .charge(&pending.cost)
            .expect("the cost was computed from validated rules");
        let rules = self.config.federated.as_ref().expect("federated job");
        let stddev = rules.central_noise_stddev();
        if stddev > 0.0 {
            if let Err(error) = add_central_noise(self.accumulator.sum_mut(), stddev) {
                self.round = Some(pending.round);
                self.abort_round();
                self.maybe_start_round(now);
                return Err(error);
            }
        }
        self.publish_federated(pending.round, pending.shares, Some(pending.cost), now);
        Ok(())
    }

    /// Ends training of a federated job: the connected clients evaluate
    /// the final version.
    fn start_federated_eval(&mut self, now: Instant) {
        self.phase = Phase::FederatedEval {
            asked: Default::default(),
            reports: BTreeMap::new(),
            deadline: now + self.config.round_deadline,
        };
        self.maybe_finish_federated_eval(now);
    }

    /// Finishes the final federated evaluation once every connected client
    /// has reported, or at its deadline, with the token-weighted mean loss.
    fn maybe_finish_federated_eval(&mut self, now: Instant) {
        let Phase::FederatedEval {
            reports, deadline, ..
        } = &self.phase
        else {
            return;
        };
        let everyone =
            !self.workers.is_empty() && self.workers.keys().all(|w| reports.contains_key(w));
        if !everyone && now < *deadline {
            return;
        }
        let mut mean = EvalMean::default();
        for score in reports.values() {
            mean.add(score.loss, score.weight, score.accuracy);
        }
        if let Some(loss) = mean.loss() {
            self.final_eval_loss = Some(loss);
            self.final_eval_accuracy = mean.accuracy();
            self.events.push(Event::EvalReported {
                version: self.version,
                loss,
                tokens: mean.loss_weight,
                accuracy: mean.accuracy(),
            });
        }
        self.finish();
    }

    fn publish_federated(
        &mut self,
        round: ActiveRound,
        count: usize,
        cost: Option<SampledGaussianRound>,
        now: Instant,
    ) {
        let rules = self.config.federated.as_ref().expect("federated job");
        // With DP the divisor must not depend on who arrived (DP-FedAvg);
        // without it, plain FedAvg averages what arrived.
        let divisor = match rules.round_cost(count, self.config.min_participants) {
            Some(_) => rules.expected_cohort(),
            None => count as f64,
        };
        let sampled = round.target_participants;
        let summary_privacy = rules.budget.map(|budget| {
            let spent = self
                .privacy
                .epsilon(budget.delta)
                .expect("validated delta")
                .epsilon;
            (spent, budget)
        });
        let local_epsilon_per_client = match (rules.dp_mode, rules.budget) {
            (crate::federated::DpMode::Local, Some(budget)) => crate::privacy::epsilon(
                rules.noise_multiplier / 2.0,
                1.0,
                self.committed_rounds + 1,
                budget.delta,
            )
            .ok()
            .map(|r| r.epsilon),
            _ => None,
        };
        let base_version = self.publish_next_version(divisor);

        let (mut tokens, mut weighted_loss) = (0u64, 0.0);
        let mut eval = EvalMean::default();
        for participant in round.participants.values() {
            if let PushState::Pushed(stats) = participant.state {
                tokens += stats.tokens;
                weighted_loss += stats.mean_loss * stats.tokens as f64;
                if let Some(loss) = stats.eval_loss {
                    eval.add(loss, stats.eval_tokens, stats.eval_accuracy);
                }
            }
        }
        let wall = now.saturating_duration_since(round.started_at);
        let mean_update_norm =
            round.update_norms.iter().sum::<f64>() / round.update_norms.len().max(1) as f64;
        self.events.push(Event::RoundCommitted(RoundSummary {
            round: round.id,
            base_version,
            new_version: self.version,
            participants: count,
            mean_loss: if tokens > 0 {
                weighted_loss / tokens as f64
            } else {
                0.0
            },
            tokens,
            tokens_per_second: tokens as f64 / wall.as_secs_f64().max(1e-9),
            bytes_pulled: round.bytes_pulled,
            bytes_pushed: round.bytes_pushed,
            wall,
            eval_loss: eval.loss(),
            eval_accuracy: eval.accuracy(),
            epoch: 0,
            federated: Some(FederatedRoundSummary {
                sampled,
                mean_update_norm,
                noise_multiplier: cost.map_or(0.0, |c| c.noise_multiplier),
                epsilon_spent: summary_privacy.map(|(spent, _)| spent),
                epsilon_budget: summary_privacy.map(|(_, b)| b.epsilon),
                delta: summary_privacy.map(|(_, b)| b.delta),
                local_epsilon_per_client,
            }),
        }));
        if self.committed_rounds >= self.config.max_rounds {
            self.start_federated_eval(now);
        } else {
            self.maybe_start_round(now);
        }
    }

    // ---- snapshots --------------------------------------------------------------

    /// The durable state of the job, as if the round in flight (if any) had
    /// never started. Pair it with [`Self::global_params`] and the momentum
    /// buffer ([`OuterOptimizer::momentum`]) of the same moment.
    pub fn snapshot(&self) -> EngineSnapshot {
        let next_round = self.round.as_ref().map_or(self.next_round, |r| r.id.0);
        EngineSnapshot {
            format: SNAPSHOT_FORMAT,
            version: self.version,
            next_round,
            next_worker: self.next_worker,
            committed_rounds: self.committed_rounds,
            epochs_completed: self.epochs_completed,
            phase: match self.phase {
                Phase::Training => SnapshotPhase::Training,
                Phase::FinalEval { .. } | Phase::FederatedEval { .. } => SnapshotPhase::FinalEval,
                Phase::Finished => SnapshotPhase::Finished,
            },
            final_eval_loss: self.final_eval_loss,
            final_eval_accuracy: self.final_eval_accuracy,
            outer: self.outer.config(),
            tensors: tensor_identities(&self.config.tensors),
            train_shards: self.shards.values().cloned().collect(),
            scheduler: self.scheduler.snapshot(),
            sampling_rng_state: self
                .config
                .federated
                .as_ref()
                .map(|_| self.sampling_rng.state()),
        }
    }

    /// Resumes a job from `snapshot` with the parameters and momentum buffer
    /// saved with it. The job's limits (rounds, epochs) may have changed: a
    /// finished job whose new limits are not reached trains on. Its model,
    /// training shards and outer optimizer may not.
    pub fn restore(
        config: EngineConfig,
        train_shards: Vec<ShardInfo>,
        eval_shards: Vec<ShardInfo>,
        snapshot: EngineSnapshot,
        params: Vec<f32>,
        momentum: Vec<f32>,
    ) -> Result<RoundEngine, RestoreError> {
        if snapshot.format != SNAPSHOT_FORMAT {
            return Err(RestoreError::Format {
                got: snapshot.format,
                expected: SNAPSHOT_FORMAT,
            });
        }
        if let Some(detail) =
            tensor_difference(&tensor_identities(&config.tensors), &snapshot.tensors)
        {
            return Err(RestoreError::Tensors { detail });
        }
        let mut sorted_shards = train_shards.clone();
        sorted_shards.sort_by_key(|s| s.id);
        if let Some(detail) = shard_difference(&sorted_shards, &snapshot.train_shards) {
            return Err(RestoreError::Shards { detail });
        }
        if config.outer != snapshot.outer {
            return Err(RestoreError::Outer {
                job: config.outer,
                snapshot: snapshot.outer,
            });
        }
        let mut engine = RoundEngine::new(config, train_shards, eval_shards, params)?;
        let total = engine.layout.total();
        engine.outer = OuterOptimizer::with_state(engine.config.outer, total, momentum.clone())
            .ok_or(RestoreError::Momentum {
                got: momentum.len(),
                expected: engine.config.outer.state_buffers() * total,
            })?;
        engine.scheduler =
            ShardScheduler::restore(engine.shards.keys().copied().collect(), snapshot.scheduler)?;
        engine.version = snapshot.version;
        engine.next_round = snapshot.next_round.max(1);
        engine.next_worker = snapshot.next_worker.max(1);
        engine.committed_rounds = snapshot.committed_rounds;
        engine.epochs_completed = snapshot.epochs_completed;
        if let Some(state) = snapshot.sampling_rng_state {
            engine.sampling_rng = SplitMix64::new(state);
        }
        let c = &engine.config;
        let limits_reached = (c.max_rounds != 0 && engine.committed_rounds >= c.max_rounds)
            || (c.max_epochs != 0 && engine.epochs_completed >= c.max_epochs);
        match (limits_reached, snapshot.phase) {
            (false, _) => engine.phase = Phase::Training,
            (true, SnapshotPhase::Finished) => {
                engine.phase = Phase::Finished;
                engine.final_eval_loss = snapshot.final_eval_loss;
                engine.final_eval_accuracy = snapshot.final_eval_accuracy;
            }
            (true, _) if engine.eval_shards.is_empty() => engine.finish(),
            (true, _) => engine.phase = Phase::FinalEval { assignee: None },
        }
        Ok(engine)
    }

    fn finish(&mut self) {
        self.phase = Phase::Finished;
        self.events.push(Event::JobFinished {
            version: self.version,
            final_eval_loss: self.final_eval_loss,
            final_eval_accuracy: self.final_eval_accuracy,
            rounds: self.committed_rounds,
            epochs: self.epochs_completed,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Init;

    fn spec() -> Vec<TensorSpec> {
        vec![
            TensorSpec {
                name: "w".into(),
                shape: vec![2, 2],
                init: Init::Zeros,
            },
            TensorSpec {
                name: "b".into(),
                shape: vec![2],
                init: Init::Zeros,
            },
        ]
    }

    fn config() -> EngineConfig {
        EngineConfig {
            tensors: spec(),
            update_dtype: DType::F32,
            lease: Duration::from_secs(10),
            round_deadline: Duration::from_secs(60),
            min_workers: 2,
            min_participants: 1,
            max_workers_per_round: 0,
            shards_per_worker: 1,
            max_rounds: 0,
            max_epochs: 1,
            eval_every: 0,
            outer: OuterOptimizerConfig::Average,
            max_chunk_elems: 4,
            seed: 3,
            federated: None,
        }
    }

    fn shards(n: u64) -> Vec<ShardInfo> {
        (0..n)
            .map(|i| ShardInfo {
                id: ShardId(i),
                file_name: format!("train-{i}.tok"),
                num_tokens: 65,
            })
            .collect()
    }

    fn engine(config: EngineConfig, train: u64) -> RoundEngine {
        let eval = vec![ShardInfo {
            id: ShardId(1000),
            file_name: "val-0.tok".into(),
            num_tokens: 65,
        }];
        RoundEngine::new(config, shards(train), eval, vec![1.0; 6]).unwrap()
    }

    fn header(round: RoundId, version: Version) -> PushHeader {
        PushHeader {
            round,
            base_version: version,
            dtype: DType::F32,
            stats: PushStats {
                mean_loss: 2.0,
                tokens: 64,
                train_seconds: 0.1,
                eval_loss: None,
                eval_tokens: 0,
                eval_accuracy: None,
            },
        }
    }

    fn values(v: &[f32]) -> FiniteValues {
        FiniteValues::new(v.to_vec()).unwrap()
    }

    /// Pushes a whole update of 6 values in the two tensors.
    fn push_all(
        e: &mut RoundEngine,
        w: WorkerId,
        round: RoundId,
        delta: [f32; 6],
        now: Instant,
    ) -> Result<PushReceipt, EngineError> {
        e.begin_push(w, header(round, e.version()), now)?;
        e.push_chunk(w, 0, 0, &values(&delta[..4]), 16)?;
        e.push_chunk(w, 1, 0, &values(&delta[4..]), 8)?;
        e.finish_push(w, now)
    }

    fn train_task(
        e: &mut RoundEngine,
        w: WorkerId,
        now: Instant,
    ) -> (RoundId, Version, Vec<ShardInfo>) {
        match e.next_task(w, now).unwrap() {
            Task::Train {
                round,
                version,
                shards,
                ..
            } => (round, version, shards),
            other => panic!("expected a train task, got {other:?}"),
        }
    }

    #[test]
    fn a_round_commits_the_mean_of_local_parameters() {
        let t0 = Instant::now();
        let mut e = engine(config(), 4);
        let (a, _) = e.join(WorkerInfo::default(), t0);
        assert_eq!(
            e.next_task(a, t0).unwrap(),
            Task::Wait {
                retry_after: IDLE_RETRY
            },
            "waits for min_workers"
        );
        let (b, _) = e.join(WorkerInfo::default(), t0);
        let (round, version, shards_a) = train_task(&mut e, a, t0);
        let (_, _, shards_b) = train_task(&mut e, b, t0);
        assert_ne!(shards_a, shards_b);
        // Locals are global - delta: a moved every value by -1, b by +1... mean stays at 1.
        push_all(&mut e, a, round, [1.0; 6], t0).unwrap();
        assert_eq!(
            e.version(),
            version,
            "no commit before every participant pushed"
        );
        let receipt = push_all(&mut e, b, round, [-3.0; 6], t0).unwrap();
        assert_eq!(
            receipt,
            PushReceipt {
                round,
                received: 2,
                expected: 2
            }
        );
        assert_eq!(e.version(), Version(1));
        // global - mean(delta) = 1 - (-1) = 2
        assert_eq!(e.global_params().as_slice(), &[2.0; 6]);
        let committed = e.drain_events().into_iter().find_map(|ev| match ev {
            Event::RoundCommitted(s) => Some(s),
            _ => None,
        });
        let summary = committed.expect("a committed round");
        assert_eq!(
            (summary.participants, summary.tokens, summary.bytes_pushed),
            (2, 128, 48)
        );
    }

    #[test]
    fn a_worker_authenticates_only_with_its_own_session() {
        let t0 = Instant::now();
        let mut e = engine(config(), 4);
        let joined = |session: u8| WorkerInfo {
            session: Some(SessionDigest([session; 32])),
            ..WorkerInfo::default()
        };
        let (a, _) = e.join(joined(1), t0);
        let (b, _) = e.join(joined(2), t0);
        assert_eq!(e.authenticate(a, Some(&SessionDigest([1; 32]))), Ok(()));
        assert_eq!(
            e.authenticate(a, Some(&SessionDigest([2; 32]))),
            Err(EngineError::SessionMismatch(a)),
            "b's session does not speak for a"
        );
        assert_eq!(e.authenticate(a, None), Err(EngineError::MissingSession(a)));
        assert_eq!(
            e.authenticate(WorkerId(99), Some(&SessionDigest([1; 32]))),
            Err(EngineError::UnknownWorker(WorkerId(99)))
        );
        let (c, _) = e.join(WorkerInfo::default(), t0);
        assert_eq!(
            e.authenticate(c, Some(&SessionDigest::default())),
            Err(EngineError::SessionMismatch(c)),
            "a worker that was issued no session authenticates with none"
        );
        assert_eq!(e.authenticate(b, Some(&SessionDigest([2; 32]))), Ok(()));
    }

    #[test]
    fn every_malformed_push_is_refused_and_undone() {
        let t0 = Instant::now();
        let mut e = engine(config(), 4);
        let (a, _) = e.join(WorkerInfo::default(), t0);
        let (b, _) = e.join(WorkerInfo::default(), t0);
        let (round, version, _) = train_task(&mut e, a, t0);
        train_task(&mut e, b, t0);
        let ghost = WorkerId(99);
        assert_eq!(
            e.begin_push(ghost, header(round, version), t0),
            Err(EngineError::UnknownWorker(ghost))
        );
        assert!(matches!(
            e.begin_push(a, header(RoundId(7), version), t0),
            Err(EngineError::StaleRound { .. })
        ));
        assert!(matches!(
            e.begin_push(a, header(round, Version(5)), t0),
            Err(EngineError::StaleVersion { .. })
        ));
        let mut bf16 = header(round, version);
        bf16.dtype = DType::Bf16;
        assert_eq!(
            e.begin_push(a, bf16, t0),
            Err(EngineError::WrongDtype {
                got: DType::Bf16,
                expected: DType::F32
            })
        );
        let mut nan_loss = header(round, version);
        nan_loss.stats.mean_loss = f64::NAN;
        assert!(matches!(
            e.begin_push(a, nan_loss, t0),
            Err(EngineError::InvalidStats(_))
        ));
        assert_eq!(FiniteValues::new(vec![0.0, f32::NAN]), Err(1));

        // Half a push, then each kind of bad chunk: the sum must not move.
        let bad_chunks: Vec<(usize, usize, Vec<f32>)> = vec![
            (5, 0, vec![1.0]),    // unknown tensor
            (1, 0, vec![1.0]),    // out of order: tensor 0 not finished
            (0, 3, vec![1.0]),    // out of order: wrong offset
            (0, 2, vec![1.0; 3]), // overruns tensor 0
            (0, 2, vec![1.0; 5]), // too large
            (0, 2, vec![]),       // empty
        ];
        for (tensor, offset, chunk) in bad_chunks {
            e.begin_push(a, header(round, version), t0).unwrap();
            e.push_chunk(a, 0, 0, &values(&[100.0, 100.0]), 8).unwrap();
            let result = e.push_chunk(a, tensor, offset, &values(&chunk), chunk.len() * 4);
            assert!(
                result.is_err(),
                "chunk ({tensor}, {offset}, {chunk:?}) accepted"
            );
            assert_eq!(
                e.push_chunk(a, 0, 2, &values(&[1.0]), 4),
                Err(EngineError::NoOpenPush(a)),
                "push closed"
            );
        }
        // A push that ends early is refused too.
        e.begin_push(a, header(round, version), t0).unwrap();
        e.push_chunk(a, 0, 0, &values(&[100.0; 4]), 16).unwrap();
        assert_eq!(
            e.finish_push(a, t0),
            Err(EngineError::IncompletePush {
                received: 4,
                expected: 6
            })
        );
        // A push from a participant whose push is not its own round is refused.
        // After all that, two good pushes give exactly the clean result.
        push_all(&mut e, a, round, [0.5; 6], t0).unwrap();
        assert_eq!(
            push_all(&mut e, a, round, [0.5; 6], t0),
            Err(EngineError::AlreadyPushed { worker: a, round })
        );
        push_all(&mut e, b, round, [0.5; 6], t0).unwrap();
        assert_eq!(e.global_params().as_slice(), &[0.5; 6]);
        let rejected = e
            .drain_events()
            .iter()
            .filter(|ev| matches!(ev, Event::PushRejected { .. }))
            .count();
        assert!(rejected >= 10, "{rejected} rejections logged");
    }

    #[test]
    fn worker_statuses_follow_a_round_from_idle_to_pushed() {
        let t0 = Instant::now();
        let mut e = engine(config(), 4);
        let named = |host: &str| WorkerInfo {
            hostname: host.into(),
            device: "cpu".into(),
            ..WorkerInfo::default()
        };
        let (a, _) = e.join(named("a"), t0);
        let activities = |e: &RoundEngine, now| {
            e.worker_statuses(now)
                .into_iter()
                .map(|s| (s.hostname, s.activity))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            activities(&e, t0),
            vec![("a".to_string(), WorkerActivity::Idle)]
        );
        let (b, _) = e.join(named("b"), t0);
        let (round, version, _) = train_task(&mut e, a, t0);
        train_task(&mut e, b, t0);
        e.begin_push(b, header(round, version), t0).unwrap();
        assert_eq!(
            activities(&e, t0),
            vec![
                ("a".to_string(), WorkerActivity::Training { round }),
                ("b".to_string(), WorkerActivity::Pushing { round }),
            ]
        );
        e.abort_push(b, &EngineError::StreamFailed("test".into()));
        push_all(&mut e, a, round, [0.0; 6], t0).unwrap();
        let later = t0 + Duration::from_secs(4);
        let statuses = e.worker_statuses(later);
        assert_eq!(statuses[0].activity, WorkerActivity::Pushed { round });
        assert_eq!(statuses[1].activity, WorkerActivity::Training { round });
        assert_eq!(statuses[0].lease_remaining, Duration::from_secs(6));
        assert_eq!(e.phase_name(), "training");
    }

    #[test]
    fn rejected_pushes_carry_a_stable_code() {
        let t0 = Instant::now();
        let mut e = engine(config(), 4);
        let (a, _) = e.join(WorkerInfo::default(), t0);
        let (b, _) = e.join(WorkerInfo::default(), t0);
        let (round, version, _) = train_task(&mut e, a, t0);
        train_task(&mut e, b, t0);
        e.drain_events();
        let stale = RoundId(round.0 + 7);
        assert!(e.begin_push(a, header(stale, version), t0).is_err());
        e.begin_push(a, header(round, version), t0).unwrap();
        assert!(e.push_chunk(a, 1, 0, &values(&[1.0]), 4).is_err());
        let codes: Vec<&str> = e
            .drain_events()
            .into_iter()
            .filter_map(|ev| match ev {
                Event::PushRejected { code, .. } => Some(code),
                _ => None,
            })
            .collect();
        assert_eq!(codes, ["stale_round", "chunk_out_of_order"]);
    }

    #[test]
    fn a_second_push_waits_while_one_is_folding() {
        let t0 = Instant::now();
        let mut e = engine(config(), 4);
        let (a, _) = e.join(WorkerInfo::default(), t0);
        let (b, _) = e.join(WorkerInfo::default(), t0);
        let (round, version, _) = train_task(&mut e, a, t0);
        train_task(&mut e, b, t0);
        e.begin_push(a, header(round, version), t0).unwrap();
        assert_eq!(
            e.begin_push(b, header(round, version), t0),
            Err(EngineError::PushInProgress)
        );
        e.abort_push(a, &EngineError::NoOpenPush(a));
        e.begin_push(b, header(round, version), t0).unwrap();
    }

    #[test]
    fn a_lost_worker_returns_its_shards_and_is_replaced() {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.min_participants = 2;
        let mut e = engine(cfg, 4);
        let (a, _) = e.join(WorkerInfo::default(), t0);
        let (b, _) = e.join(WorkerInfo::default(), t0);
        let (round, _, _) = train_task(&mut e, a, t0);
        let (_, _, lost_shards) = train_task(&mut e, b, t0);
        push_all(&mut e, a, round, [0.0; 6], t0).unwrap();
        // b stops heartbeating; a keeps going.
        let t1 = t0 + Duration::from_secs(8);
        e.heartbeat(a, t1).unwrap();
        let t2 = t0 + Duration::from_secs(11);
        e.tick(t2);
        assert_eq!(e.heartbeat(b, t2), Err(EngineError::UnknownWorker(b)));
        assert_eq!(e.version(), Version(0), "quorum of 2 not met yet");
        let (c, _) = e.join(WorkerInfo::default(), t2);
        let (round_c, _, shards_c) = train_task(&mut e, c, t2);
        assert_eq!(round_c, round);
        assert_eq!(
            shards_c, lost_shards,
            "the replacement takes over the lost shards"
        );
        push_all(&mut e, c, round, [0.0; 6], t2).unwrap();
        assert_eq!(e.version(), Version(1));
        let used: Vec<WorkerId> = e.ledger().iter().map(|c| c.worker).collect();
        assert!(used.contains(&a) && used.contains(&c) && !used.contains(&b));
    }

    #[test]
    fn the_deadline_commits_with_the_quorum_or_aborts_without_it() {
        for (min_participants, expect_commit) in [(1, true), (2, false)] {
            let t0 = Instant::now();
            let mut cfg = config();
            cfg.min_participants = min_participants;
            cfg.lease = Duration::from_secs(100);
            let mut e = engine(cfg, 4);
            let (a, _) = e.join(WorkerInfo::default(), t0);
            let (b, _) = e.join(WorkerInfo::default(), t0);
            let (round, version, _) = train_task(&mut e, a, t0);
            train_task(&mut e, b, t0);
            push_all(&mut e, a, round, [1.0; 6], t0).unwrap();
            // b is still pushing when the deadline passes.
            e.begin_push(b, header(round, version), t0).unwrap();
            e.push_chunk(b, 0, 0, &values(&[9.0; 4]), 16).unwrap();
            let late = t0 + Duration::from_secs(61);
            e.heartbeat(a, late - Duration::from_secs(5)).unwrap();
            e.heartbeat(b, late - Duration::from_secs(5)).unwrap();
            e.tick(late);
            // b's next chunk and its finish hear that its round is over.
            let stale = |e: &RoundEngine| EngineError::StaleRound {
                got: round,
                current: e.round_name(),
            };
            assert_eq!(e.push_chunk(b, 1, 0, &values(&[9.0; 2]), 8), Err(stale(&e)));
            assert_eq!(e.finish_push(b, late), Err(stale(&e)));
            // a never had a push cut off: no push is open for it.
            assert_eq!(
                e.push_chunk(a, 0, 0, &values(&[1.0]), 4),
                Err(EngineError::NoOpenPush(a))
            );
            // A new push by b clears the record: a stray chunk after it is
            // just a chunk without a push.
            assert!(matches!(
                e.begin_push(b, header(round, version), late),
                Err(EngineError::StaleRound { .. })
            ));
            assert_eq!(
                e.push_chunk(b, 0, 4, &values(&[9.0]), 4),
                Err(EngineError::NoOpenPush(b))
            );
            if expect_commit {
                assert_eq!(e.version(), Version(1));
                assert_eq!(
                    e.global_params().as_slice(),
                    &[0.0; 6],
                    "only a's update counts"
                );
                assert_eq!(e.ledger().len(), 1);
            } else {
                assert_eq!(e.version(), Version(0));
                assert!(e.ledger().is_empty());
                let events = e.drain_events();
                assert!(events.iter().any(|ev| matches!(
                    ev,
                    Event::RoundAborted {
                        pushed: 1,
                        needed: 2,
                        returned_shards: 2,
                        ..
                    }
                )));
            }
            // Either way a new round starts for the live workers.
            assert!(e.current_round().is_some_and(|r| r > round));
            let next = e.next_task(b, late);
            assert!(matches!(next, Ok(Task::Train { .. })), "{next:?}");
        }
    }

    #[test]
    fn the_job_ends_with_a_final_eval_then_done() {
        let t0 = Instant::now();
        let mut e = engine(config(), 2);
        let (a, _) = e.join(WorkerInfo::default(), t0);
        let (b, _) = e.join(WorkerInfo::default(), t0);
        let (round, _, _) = train_task(&mut e, a, t0);
        train_task(&mut e, b, t0);
        push_all(&mut e, a, round, [0.0; 6], t0).unwrap();
        push_all(&mut e, b, round, [0.0; 6], t0).unwrap();
        // One epoch of two shards is done.
        let Task::Eval {
            version,
            eval_shards,
        } = e.next_task(a, t0).unwrap()
        else {
            panic!("expected eval")
        };
        assert_eq!((version, eval_shards.len()), (Version(1), 1));
        assert!(matches!(e.next_task(b, t0), Ok(Task::Wait { .. })));
        assert_eq!(
            e.report_eval(b, version, EvalScore::loss(1.0, 10), t0),
            Err(EngineError::UnexpectedEval { worker: b, version })
        );
        assert!(matches!(
            e.report_eval(a, version, EvalScore::loss(f64::NAN, 10), t0),
            Err(EngineError::InvalidStats(_))
        ));
        e.report_eval(a, version, EvalScore::loss(1.25, 10), t0)
            .unwrap();
        assert!(matches!(e.next_task(a, t0), Ok(Task::Done { .. })));
        assert!(!e.all_workers_released());
        assert!(matches!(e.next_task(b, t0), Ok(Task::Done { .. })));
        assert!(e.all_workers_released());
        let finished = e.drain_events().into_iter().find_map(|ev| match ev {
            Event::JobFinished {
                final_eval_loss,
                epochs,
                ..
            } => Some((final_eval_loss, epochs)),
            _ => None,
        });
        assert_eq!(finished, Some((Some(1.25), 1)));
    }

    /// Every participant of the current round trains and pushes an update
    /// that depends only on its shards; returns the round and its shards.
    fn run_round(e: &mut RoundEngine, workers: &[WorkerId], now: Instant) -> (RoundId, Vec<u64>) {
        let mut round_id = None;
        let mut used = Vec::new();
        let mut pushes = Vec::new();
        for &w in workers {
            if let Ok(Task::Train { round, shards, .. }) = e.next_task(w, now) {
                round_id = Some(round);
                let ids: Vec<u64> = shards.iter().map(|s| s.id.0).collect();
                used.extend(&ids);
                pushes.push((w, round, ids));
            }
        }
        for (w, round, ids) in pushes {
            let x = ids.iter().sum::<u64>() as f32 * 0.25 + ids[0] as f32 * 0.125;
            push_all(e, w, round, [x, -x, 0.5 * x, 1.0, -0.5, x * x], now).unwrap();
        }
        (round_id.expect("a round ran"), used)
    }

    #[test]
    fn a_restored_engine_continues_like_an_uninterrupted_one() {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.max_epochs = 2;
        cfg.outer = OuterOptimizerConfig::Nesterov {
            lr: 0.7,
            momentum: 0.9,
        };
        let mut a = engine(cfg.clone(), 6);
        let (w1, _) = a.join(WorkerInfo::default(), t0);
        let (w2, _) = a.join(WorkerInfo::default(), t0);
        run_round(&mut a, &[w1, w2], t0);
        // Round 2 is in flight (leased, one push half folded) at the snapshot.
        let (round2, _, _) = train_task(&mut a, w1, t0);
        train_task(&mut a, w2, t0);
        a.begin_push(w1, header(round2, Version(1)), t0).unwrap();
        a.push_chunk(w1, 0, 0, &values(&[9.0; 4]), 16).unwrap();
        let snapshot = a.snapshot();
        assert_eq!(
            snapshot.next_round, round2.0,
            "the round in flight is re-run"
        );
        assert_eq!(snapshot.version, Version(1));
        let json = serde_json::to_string(&snapshot).unwrap();
        let params = a.global_params().as_slice().to_vec();
        let momentum = a.outer_optimizer().state().to_vec();
        assert!(momentum.iter().any(|&m| m != 0.0));
        let eval = vec![ShardInfo {
            id: ShardId(1000),
            file_name: "val-0.tok".into(),
            num_tokens: 65,
        }];
        let mut b = RoundEngine::restore(
            cfg,
            shards(6),
            eval,
            serde_json::from_str(&json).unwrap(),
            params,
            momentum,
        )
        .unwrap();
        assert_eq!(b.version(), Version(1));
        assert_eq!(b.current_round(), None);

        // The uninterrupted engine loses round 2 (its workers vanish) and
        // goes on with new workers; the restored one gets the same new workers.
        let t1 = t0 + Duration::from_secs(11);
        a.tick(t1);
        assert_eq!(a.current_round(), None);
        let mut trace_a = Vec::new();
        let mut trace_b = Vec::new();
        let (a1, _) = a.join(WorkerInfo::default(), t1);
        let (a2, _) = a.join(WorkerInfo::default(), t1);
        let (b1, _) = b.join(WorkerInfo::default(), t1);
        let (b2, _) = b.join(WorkerInfo::default(), t1);
        assert_eq!((a1, a2), (b1, b2), "worker ids continue");
        while !a.is_finished() && matches!(a.phase, Phase::Training) {
            trace_a.push(run_round(&mut a, &[a1, a2], t1));
            trace_b.push(run_round(&mut b, &[b1, b2], t1));
        }
        // The uninterrupted engine aborted round 2 and numbers on from 3; the
        // restored one never committed it and re-runs it as round 2.
        let shards_a: Vec<_> = trace_a.iter().map(|(_, s)| s.clone()).collect();
        let shards_b: Vec<_> = trace_b.iter().map(|(_, s)| s.clone()).collect();
        assert_eq!(shards_a, shards_b);
        assert_eq!(
            trace_b[0].0, round2,
            "the lost round is re-run under its number"
        );
        assert!(trace_a
            .iter()
            .zip(&trace_b)
            .all(|(x, y)| x.0 .0 == y.0 .0 + 1));
        assert_eq!(trace_a.len(), 5, "6 rounds over two epochs of 6 shards");
        assert_eq!(a.global_params(), b.global_params());
        assert_eq!(a.outer_optimizer().state(), b.outer_optimizer().state());
        let key = |c: &Consumption| (c.epoch, c.shard);
        let ledger_a: Vec<_> = a.ledger().iter().map(key).collect();
        let ledger_b: Vec<_> = b.ledger().iter().map(key).collect();
        assert_eq!(ledger_a, ledger_b);
        assert_eq!(ledger_a.len(), 12, "every shard once in each epoch");
        assert!(matches!(b.phase, Phase::FinalEval { .. }));
    }

    #[test]
    fn a_snapshot_of_another_job_is_refused() {
        let t0 = Instant::now();
        let mut e = engine(config(), 4);
        let (w, _) = e.join(WorkerInfo::default(), t0);
        e.join(WorkerInfo::default(), t0);
        train_task(&mut e, w, t0);
        let snapshot = e.snapshot();
        let params = vec![0.0; 6];
        let mut other_model = config();
        other_model.tensors[1].shape = vec![3];
        let refused = RoundEngine::restore(
            other_model,
            shards(4),
            vec![],
            snapshot.clone(),
            vec![0.0; 7],
            vec![],
        );
        assert!(
            matches!(&refused, Err(RestoreError::Tensors { detail }) if detail.contains("b [3]")),
            "{refused:?}"
        );
        let refused = RoundEngine::restore(
            config(),
            shards(5),
            vec![],
            snapshot.clone(),
            params.clone(),
            vec![],
        );
        assert!(
            matches!(&refused, Err(RestoreError::Shards { detail }) if detail.contains("5 shards")),
            "{refused:?}"
        );
        let mut renamed = shards(4);
        renamed[2].file_name = "other.tok".into();
        let refused = RoundEngine::restore(
            config(),
            renamed,
            vec![],
            snapshot.clone(),
            params.clone(),
            vec![],
        );
        assert!(
            matches!(&refused, Err(RestoreError::Shards { detail }) if detail.contains("other.tok")),
            "{refused:?}"
        );
        let mut nesterov = config();
        nesterov.outer = OuterOptimizerConfig::default();
        assert!(matches!(
            RoundEngine::restore(
                nesterov,
                shards(4),
                vec![],
                snapshot.clone(),
                params.clone(),
                vec![]
            ),
            Err(RestoreError::Outer { .. })
        ));
        assert_eq!(
            RoundEngine::restore(
                config(),
                shards(4),
                vec![],
                snapshot.clone(),
                params.clone(),
                vec![1.0]
            )
            .err(),
            Some(RestoreError::Momentum {
                got: 1,
                expected: 0
            })
        );
        let mut future = snapshot;
        future.format = 99;
        assert!(matches!(
            RoundEngine::restore(config(), shards(4), vec![], future, params, vec![]),
            Err(RestoreError::Format { got: 99, .. })
        ));
    }

    #[test]
    fn a_finished_job_trains_on_when_its_limit_is_raised() {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.max_epochs = 0;
        cfg.max_rounds = 1;
        let mut e = RoundEngine::new(cfg.clone(), shards(4), vec![], vec![1.0; 6]).unwrap();
        let (a, _) = e.join(WorkerInfo::default(), t0);
        let (b, _) = e.join(WorkerInfo::default(), t0);
        run_round(&mut e, &[a, b], t0);
        assert!(e.is_finished());
        let snapshot = e.snapshot();
        assert_eq!(snapshot.phase, SnapshotPhase::Finished);
        let params = e.global_params().as_slice().to_vec();
        let same = RoundEngine::restore(
            cfg.clone(),
            shards(4),
            vec![],
            snapshot.clone(),
            params.clone(),
            vec![],
        )
        .unwrap();
        assert!(same.is_finished());
        cfg.max_rounds = 2;
        let mut more =
            RoundEngine::restore(cfg, shards(4), vec![], snapshot, params, vec![]).unwrap();
        assert!(!more.is_finished());
        let (c, _) = more.join(WorkerInfo::default(), t0);
        let (d, _) = more.join(WorkerInfo::default(), t0);
        let (round, _) = run_round(&mut more, &[c, d], t0);
        assert_eq!(round, RoundId(2));
        assert!(more.is_finished());
        assert_eq!(more.ledger().len(), 4, "all four shards, each once");
    }

    #[test]
    fn an_epochs_last_round_with_fewer_shards_than_the_quorum_still_commits() {
        let t0 = Instant::now();
        let mut cfg = config();
        cfg.min_participants = 2;
        let mut e = engine(cfg, 3);
        let (a, _) = e.join(WorkerInfo::default(), t0);
        let (b, _) = e.join(WorkerInfo::default(), t0);
        let (round, _, _) = train_task(&mut e, a, t0);
        train_task(&mut e, b, t0);
        push_all(&mut e, a, round, [0.0; 6], t0).unwrap();
        push_all(&mut e, b, round, [0.0; 6], t0).unwrap();
        // One shard is left for two workers: the round has one participant.
        let (last, _, shards) = train_task(&mut e, a, t0);
        assert_eq!(shards.len(), 1);
        assert!(matches!(e.next_task(b, t0), Ok(Task::Wait { .. })));
        push_all(&mut e, a, last, [0.0; 6], t0).unwrap();
        assert_eq!(
            e.version(),
            Version(2),
            "the tail round commits with its one push"
        );
        assert_eq!(e.ledger().len(), 3);
    }

    #[test]
    fn invalid_configs_are_refused_with_the_field() {
        let mut cfg = config();
        cfg.min_participants = 3;
        cfg.max_workers_per_round = 2;
        cfg.min_workers = 3;
        assert!(matches!(
            RoundEngine::new(cfg, shards(2), vec![], vec![0.0; 6]),
            Err(EngineConfigError::ImpossibleQuorum { .. })
        ));
        let mut cfg = config();
        cfg.min_participants = 3;
        assert_eq!(
            RoundEngine::new(cfg, shards(2), vec![], vec![0.0; 6]).err(),
            Some(EngineConfigError::QuorumAboveMinWorkers {
                min_participants: 3,
                min_workers: 2
            })
        );
        let mut cfg = config();
        cfg.max_epochs = 0;
        assert_eq!(
            RoundEngine::new(cfg, shards(2), vec![], vec![0.0; 6]).err(),
            Some(EngineConfigError::Endless)
        );
        assert_eq!(
            RoundEngine::new(config(), shards(2), vec![], vec![0.0; 5]).err(),
            Some(EngineConfigError::InitialParams {
                got: 5,
                expected: 6
            })
        );
        assert_eq!(
            RoundEngine::new(config(), vec![], vec![], vec![0.0; 6]).err(),
            Some(EngineConfigError::NoShards)
        );
    }
}
