//! Runs a job: validated plan in, gRPC server on an already-bound listener,
//! until the job finishes or `shutdown` resolves.
//!
//! Before serving, the run directory's store is opened: when it holds a
//! checkpoint of the same job (name, model, tensors, training shards) the
//! engine resumes from the newest intact one; a store of another job is
//! refused.
//!
//! It also serves `grpc.health.v1.Health` for Kubernetes gRPC probes: the
//! server ("") and `cohort.v1.Coordinator` report SERVING while the job runs
//! and NOT_SERVING from the moment shutdown starts (or the job ends) until
//! the process stops serving. With a health listener the same statuses are
//! also served in plaintext on a second port, for probes that cannot speak
//! TLS.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cohort_core::engine::{RestoreError, RoundEngine};
use cohort_core::params::init_params;
use cohort_core::privacy::PrivacyLedger;
use cohort_proto::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::actor::{self, JobOutcome, SharedStore};
use crate::config::JobPlan;
use crate::convert::job_spec_to_proto;
use crate::observe::{self, Observer};
use crate::service::{CoordinatorService, OperatorToken};
use crate::store::{JobIdentity, RunStore, StoreError};
use crate::tls::ServerTls;

/// How a job starts when its run directory already has checkpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartMode {
    /// Resume from the newest intact checkpoint of the same job, if any.
    #[default]
    Resume,
    /// Refuse to start if the run directory holds checkpoints.
    Fresh,
}

/// How [`run_with_options`] runs a job, beyond the plan.
#[derive(Debug, Default)]
pub struct RunOptions {
    pub mode: StartMode,
    /// Serve Prometheus metrics at `/metrics` on this listener (plain HTTP).
    pub metrics_listener: Option<TcpListener>,
    /// Serve gRPC over TLS (with client certificates when it is mutual).
    pub tls: Option<ServerTls>,
    /// When set, only this token's bearer may call Status and Stop.
    pub operator_token: Option<OperatorToken>,
    /// Also serve `grpc.health.v1.Health`, and nothing else, in plaintext on
    /// this listener (for probes that cannot speak TLS, like the kubelet's):
    /// the same statuses as the main port's health service.
    pub health_listener: Option<TcpListener>,
}

pub use cohort_proto::HTTP2_MAX_FRAME_SIZE;

/// Per-stream receive window. A push waiting for the fold holds this much in
/// the coordinator, so it bounds memory per connected worker. Measured on the
/// round bench (10M params): 64 KiB throttled the active push (N=32 round
/// 5.4 s), hyper's 1 MiB default cost 1 MiB per waiting worker; 256 KiB: 2.6 s.
pub const HTTP2_STREAM_WINDOW: u32 = 256 * 1024;
/// Per-connection receive window (a worker has one push or pull at a time).
pub const HTTP2_CONNECTION_WINDOW: u32 = 512 * 1024;

/// Room a gRPC message has beyond a chunk's payload. A pushed or pulled chunk
/// is `max_chunk_bytes` of data plus under 32 bytes of framing (tensor index,
/// offset, field tags and lengths); every other message (a push header, a
/// join with its hostname and enrollment token, a task) fits in it whole.
pub const MESSAGE_OVERHEAD_BYTES: usize = 4 * 1024;

/// The largest gRPC message the coordinator decodes: one pushed chunk of
/// `max_chunk_bytes` plus [`MESSAGE_OVERHEAD_BYTES`]. tonic refuses a larger
/// one with OUT_OF_RANGE from its length prefix, before buffering it; a push
/// that carries one is discarded like any other failed push.
pub fn max_decoding_message_bytes(plan: &JobPlan) -> usize {
    plan.max_chunk_bytes as usize + MESSAGE_OVERHEAD_BYTES
}

/// The largest gRPC message the coordinator encodes: a pulled chunk or the
/// join response, whose job spec grows with the number of tensors, whichever
/// is larger, plus [`MESSAGE_OVERHEAD_BYTES`].
pub fn max_encoding_message_bytes(plan: &JobPlan) -> usize {
    use prost::Message;
    let job_spec = job_spec_to_proto(plan).encoded_len();
    (plan.max_chunk_bytes as usize).max(job_spec) + MESSAGE_OVERHEAD_BYTES
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create run directory {path}: {source}")]
    RunDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("invalid engine configuration: {0}")]
    Engine(#[from] cohort_core::engine::EngineConfigError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("coordinator actor failed: {0}")]
    Actor(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot resume from {file}: {source}")]
    Restore { file: PathBuf, source: RestoreError },
    #[error("the privacy ledger in the run store is invalid: {0}")]
    PrivacyLedger(String),
    #[error("{store} lists {checkpoints} checkpoints but none is intact ({skipped}); refusing to start over and lose committed rounds")]
    NoIntactCheckpoint {
        store: PathBuf,
        checkpoints: usize,
        skipped: String,
    },
}

/// The privacy ledger replayed from the store's charges; `None` when the
/// store has none.
fn privacy_ledger(store: &RunStore) -> Result<Option<PrivacyLedger>, ServeError> {
    let charges = store.privacy_charges()?;
    if charges.is_empty() {
        return Ok(None);
    }
    let mut ledger = PrivacyLedger::default();
    for charge in &charges {
        ledger
            .charge(&charge.cost)
            .map_err(|e| ServeError::PrivacyLedger(format!("round {}: {e}", charge.round)))?;
    }
    info!(
        rounds = ledger.rounds(),
        last_epsilon = charges.last().map(|c| c.epsilon_after),
        "privacy ledger restored"
    );
    Ok(Some(ledger))
}

/// Opens the run store and builds the engine: resumed from the newest intact
/// checkpoint of this job, or new.
fn open_engine(plan: &JobPlan, mode: StartMode) -> Result<(RoundEngine, RunStore), ServeError> {
    let started = Instant::now();
    let mut store = RunStore::open(&plan.run_dir)?;
    let checkpoints = store.checkpoints()?;
    if mode == StartMode::Fresh && !checkpoints.is_empty() {
        return Err(StoreError::NotFresh {
            store: store.path().to_owned(),
            checkpoints: checkpoints.len(),
        }
        .into());
    }
    store.claim(&JobIdentity::of(plan))?;
    // The durable privacy ledger, whatever the checkpoints say: spent privacy
    // never goes down, even for rounds charged after the last checkpoint.
    let privacy = privacy_ledger(&store)?;
    if checkpoints.is_empty() {
        let params = match plan
            .federated
            .as_ref()
            .and_then(|f| f.initial_params.as_ref())
            .or(plan.initial_params.as_ref())
        {
            Some(base) => base.0.as_ref().clone(),
            None => init_params(&plan.engine.tensors, plan.engine.seed),
        };
        let mut engine = RoundEngine::new(
            plan.engine.clone(),
            plan.train_shards.clone(),
            plan.eval_shards.clone(),
            params,
        )?;
        if let Some(ledger) = privacy {
            engine.restore_privacy_ledger(ledger);
        }
        return Ok((engine, store));
    }
    let layout = cohort_core::params::ParamLayout::new(&plan.engine.tensors);
    let Some(loaded) = store.load_latest(&layout)? else {
        return Err(ServeError::NoIntactCheckpoint {
            store: store.path().to_owned(),
            checkpoints: checkpoints.len(),
            skipped: checkpoints
                .iter()
                .map(|c| c.file_name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let mut engine = RoundEngine::restore(
        plan.engine.clone(),
        plan.train_shards.clone(),
        plan.eval_shards.clone(),
        loaded.snapshot,
        loaded.params,
        loaded.momentum,
    )
    .map_err(|source| ServeError::Restore {
        file: loaded.path.clone(),
        source,
    })?;
    if let Some(ledger) = privacy {
        engine.restore_privacy_ledger(ledger);
    }
    let epoch = engine.ledger().last().map_or(0, |c| c.epoch);
    info!(
        checkpoint = %loaded.path.display(),
        version = engine.version().0,
        committed_rounds = engine.committed_rounds(),
        next_round = loaded.record.next_round,
        consumed_shards = engine.ledger().len(),
        epoch,
        skipped_checkpoints = loaded.skipped.len(),
        finished = engine.is_finished(),
        recovery_ms = started.elapsed().as_millis() as u64,
        "resumed from checkpoint"
    );
    actor::append_resume_marker(
        &plan.run_dir,
        serde_json::json!({
            "resumed": true,
            "version": engine.version().0,
            "next_round": loaded.record.next_round,
            "committed_rounds": engine.committed_rounds(),
            "checkpoint": loaded.path.display().to_string(),
            "skipped_checkpoints": loaded.skipped.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>(),
        }),
    );
    if engine.is_finished() {
        warn!(
            version = engine.version().0,
            "the job had already finished; raise train.rounds or train.epochs to train on"
        );
    }
    Ok((engine, store))
}

/// Serves `plan` on `listener` until the job is done or `shutdown` resolves
/// (then the current version is checkpointed). Resumes from the run
/// directory's store when it holds a checkpoint of this job.
pub async fn run(
    listener: TcpListener,
    plan: JobPlan,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<JobOutcome, ServeError> {
    run_with(listener, plan, shutdown, StartMode::Resume).await
}

/// [`run`], choosing what happens when the run directory has checkpoints.
pub async fn run_with(
    listener: TcpListener,
    plan: JobPlan,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mode: StartMode,
) -> Result<JobOutcome, ServeError> {
    let options = RunOptions {
        mode,
        ..RunOptions::default()
    };
    run_with_options(listener, plan, shutdown, options).await
}

/// [`run`] with every option: the start mode, and a listener for metrics.
pub async fn run_with_options(
    listener: TcpListener,
    plan: JobPlan,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: RunOptions,
) -> Result<JobOutcome, ServeError> {
    let mode = options.mode;
    std::fs::create_dir_all(&plan.run_dir).map_err(|source| ServeError::RunDir {
        path: plan.run_dir.clone(),
        source,
    })?;
    let (engine, store) = open_engine(&plan, mode)?;
    let plan = Arc::new(plan);
    let (stop_tx, stop_rx) = watch::channel(false);
    let observer = Observer::new(tokio::time::Instant::now().into_std());
    let (handle, actor_task) = actor::spawn(
        engine,
        plan.clone(),
        Some(SharedStore::new(store)),
        stop_rx,
        Arc::clone(&observer),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let service = CoordinatorService::new(handle, plan.clone(), Arc::clone(&observer))
        .with_operator_token(options.operator_token.clone())
        .with_health(health.clone());

    // The plaintext health port is served until the gRPC server has stopped.
    let (health_stop, health_stopped) = tokio::sync::oneshot::channel::<()>();
    let health_task = options.health_listener.map(|health_listener| {
        let address = health_listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        info!(address = %address, "serving gRPC health checks in plaintext");
        let incoming = tonic::transport::server::TcpIncoming::from(health_listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = health_stopped.await;
                }),
        )
    });

    let (done_tx, mut done_rx) = watch::channel(false);
    // Metrics are served until the gRPC server has stopped.
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = options.metrics_listener.map(|metrics_listener| {
        let address = metrics_listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        info!(address = %address, "serving Prometheus metrics at /metrics");
        tokio::spawn(observe::serve_metrics(
            metrics_listener,
            Arc::clone(&observer),
            async move {
                let _ = metrics_stopped.await;
            },
        ))
    });
    let actor_task = tokio::spawn(async move {
        let outcome = actor_task.await;
        let _ = done_tx.send(true);
        outcome
    });
    // Decide, tell, wait: on shutdown the health service says NOT_SERVING
    // first, then the actor is told to checkpoint and stop, and the server
    // keeps answering (health checks NOT_SERVING, coordinator calls
    // UNAVAILABLE) until the actor is done; only then does it stop accepting.
    let server_stop = async move {
        let shutdown_requested = tokio::select! {
            () = shutdown => true,
            _ = done_rx.wait_for(|done| *done) => false,
        };
        set_health(&health, ServingStatus::NotServing).await;
        if shutdown_requested {
            info!("shutdown requested");
            let _ = stop_tx.send(true);
            let _ = done_rx.wait_for(|done| *done).await;
        }
        end_health_watches(health).await;
    };
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(
        address = %address,
        job = %plan.name,
        parameters = plan.engine.tensors.iter().map(|t| t.numel()).sum::<usize>(),
        train_shards = plan.train_shards.len(),
        eval_shards = plan.eval_shards.len(),
        tls = match &options.tls {
            None => "off",
            Some(tls) if tls.mutual() => "mutual",
            Some(_) => "on",
        },
        "coordinator serving"
    );
    // The builder's tcp_nodelay does not apply to an incoming stream: set it
    // here. With Nagle on, a 40 MB push took 1.26 s instead of 0.07 s.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        builder = builder.tls_config(tls.config())?;
    }
    builder
        .max_frame_size(Some(HTTP2_MAX_FRAME_SIZE))
        // A push waiting for the fold permit is buffered up to its stream
        // window; hyper's 1 MiB default made that O(workers x 1 MiB).
        .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW))
        .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW))
        .add_service(
            CoordinatorServer::new(service)
                .max_decoding_message_size(max_decoding_message_bytes(&plan))
                .max_encoding_message_size(max_encoding_message_bytes(&plan)),
        )
        .add_service(health_service)
        .serve_with_incoming_shutdown(incoming, server_stop)
        .await?;
    let _ = metrics_stop.send(());
    let _ = health_stop.send(());
    if let Some(task) = health_task {
        match task.await {
            Ok(Err(e)) => warn!(error = %e, "the health port failed"),
            Err(e) => warn!(error = %e, "the health port panicked"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(task) = metrics_task {
        match task.await {
            Ok(Err(e)) => warn!(error = %e, "the metrics endpoint failed"),
            Err(e) => warn!(error = %e, "the metrics endpoint panicked"),
            Ok(Ok(())) => {}
        }
    }
    Ok(actor_task.await??)
}

/// The service names the health service reports on: the whole server ("")
/// and `cohort.v1.Coordinator`.
const HEALTH_SERVICES: [&str; 2] = [
    "",
    <CoordinatorServer<CoordinatorService> as NamedService>::NAME,
];

pub(crate) async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_SERVICES {
        health.set_service_status(name, status).await;
    }
}

/// Ends open `Health/Watch` streams (they would otherwise hold the graceful
/// shutdown open forever): a watcher sees its last status, then the end.
async fn end_health_watches(mut health: HealthReporter) {
    for name in HEALTH_SERVICES {
        health.clear_service_status(name).await;
    }
}
