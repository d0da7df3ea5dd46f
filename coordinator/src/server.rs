//! Runs a job: validated plan in, gRPC server on an already-bound listener,
//! until the job finishes or `shutdown` resolves.

use std::future::Future;
use std::sync::Arc;

use cohort_core::engine::RoundEngine;
use cohort_core::params::init_params;
use cohort_proto::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::actor::{self, JobOutcome};
use crate::config::JobPlan;
use crate::service::CoordinatorService;

/// HTTP/2 frames of 1 MiB: measured here, 256 KiB chunks with 1 MiB frames
/// and one connection per worker moved 8 × 40 MB in 0.30 s against 0.46 s
/// with tonic's defaults (raw TCP: 0.25 s).
pub const HTTP2_MAX_FRAME_SIZE: u32 = 1 << 20;

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
}

/// Serves `plan` on `listener` until the job is done or `shutdown` resolves
/// (then the current version is checkpointed).
pub async fn run(
    listener: TcpListener,
    plan: JobPlan,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<JobOutcome, ServeError> {
    std::fs::create_dir_all(&plan.run_dir).map_err(|source| ServeError::RunDir {
        path: plan.run_dir.clone(),
        source,
    })?;
    let params = init_params(&plan.engine.tensors, plan.engine.seed);
    let engine = RoundEngine::new(
        plan.engine.clone(),
        plan.train_shards.clone(),
        plan.eval_shards.clone(),
        params,
    )?;
    let plan = Arc::new(plan);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, actor_task) = actor::spawn(engine, plan.clone(), stop_rx);
    let service = CoordinatorService::new(handle, plan.clone());

    let (done_tx, mut done_rx) = watch::channel(false);
    let actor_task = tokio::spawn(async move {
        let outcome = actor_task.await;
        let _ = done_tx.send(true);
        outcome
    });
    let server_stop = async move {
        tokio::select! {
            () = shutdown => {
                info!("shutdown requested");
                let _ = stop_tx.send(true);
            }
            _ = done_rx.wait_for(|done| *done) => {}
        }
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
        "coordinator serving"
    );
    // The builder's tcp_nodelay does not apply to an incoming stream: set it
    // here. With Nagle on, a 40 MB push took 1.26 s instead of 0.07 s.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .max_frame_size(Some(HTTP2_MAX_FRAME_SIZE))
        .add_service(CoordinatorServer::new(service))
        .serve_with_incoming_shutdown(incoming, server_stop)
        .await?;
    Ok(actor_task.await??)
}
