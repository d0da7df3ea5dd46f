//! The pretraining worker's loop against the coordinator: join, then train on leased shards,
//! push pseudo-gradients and evaluate until the job is done.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cohort_proto::v1 as pb;
use tch::Device;
use tracing::{debug, info, warn};

pub use crate::connection::{
    assemble_params, chunk_plan, hostname, is_transient, update_stream, ChunkRange, ClientError,
    ClientTls, RetryPolicy, RunSummary, HTTP2_MAX_FRAME_SIZE, MAX_MESSAGE_BYTES,
};
pub use crate::job::{validate_job, Job};

use crate::connection::{serve_tasks, stats_to_proto, Connection, Heartbeat, Interrupt, Tasks};
use crate::data::{self, DataError};
use crate::device::device_name;
use crate::trainer::{TrainerConfig, TrainerError, TrainerHandle};

/// How the worker reaches the coordinator and what it runs on.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port`, or `https://host:port` over TLS.
    pub coordinator: String,
    /// TLS files for an `https://` coordinator.
    pub tls: ClientTls,
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

/// Connects (lazily) and runs the worker until the coordinator says it is done.
pub async fn run(config: ClientConfig) -> Result<RunSummary, ClientError> {
    Worker::new(config)?.run().await
}

/// The pretraining worker: one channel to the coordinator, one training thread.
#[derive(Debug)]
pub struct Worker {
    connection: Connection,
    state: Pretrain,
}

/// Everything but the connection (so tasks can borrow both).
#[derive(Debug)]
struct Pretrain {
    config: ClientConfig,
    job: Option<Job>,
    trainer: Option<TrainerHandle>,
    summary: RunSummary,
}

impl Worker {
    /// Sets up the channel; nothing is sent until [`Worker::run`].
    pub fn new(config: ClientConfig) -> Result<Worker, ClientError> {
        Ok(Worker {
            connection: Connection::new(&config.coordinator, config.retry, &config.tls)?,
            state: Pretrain {
                config,
                job: None,
                trainer: None,
                summary: RunSummary::default(),
            },
        })
    }

    /// Joins until the coordinator says done or an error is fatal.
    pub async fn run(mut self) -> Result<RunSummary, ClientError> {
        loop {
            let (worker_id, heartbeat) = self.join().await?;
            match serve_tasks(&self.connection, &worker_id, &heartbeat, &mut self.state).await {
                Ok(reason) => {
                    info!(reason = %reason, rounds = self.state.summary.rounds_pushed, "coordinator says the job is done");
                    self.state.summary.done_reason = reason;
                    return Ok(self.state.summary);
                }
                Err(Interrupt::Rejoin) => {
                    warn!(worker_id = %worker_id, "lease lost, joining again");
                }
                Err(Interrupt::Skip) => {}
                Err(Interrupt::Fatal(e)) => return Err(e),
            }
        }
    }

    async fn join(&mut self) -> Result<(String, Heartbeat), ClientError> {
        let config = &self.state.config;
        let request = pb::JoinRequest {
            token: String::new(),
            info: Some(pb::WorkerInfo {
                hostname: config.hostname.clone(),
                device: device_name(config.device),
                device_memory_bytes: config.device_memory_bytes,
                role: pb::Role::Pretrain as i32,
            }),
        };
        let response = self.connection.join(request).await?;
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
        self.state.summary.joins += 1;
        self.state.ensure_trainer(&job).await?;
        self.state.job = Some(job);
        let interval = Duration::from_millis(response.heartbeat_interval_ms.max(50));
        let heartbeat = self
            .connection
            .start_heartbeat(&response.worker_id, interval);
        Ok((response.worker_id, heartbeat))
    }
}

/// A file-name-safe form of a job name.
pub(crate) fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Pretrain {
    async fn ensure_trainer(&mut self, job: &Job) -> Result<(), ClientError> {
        let state_path = self.config.state_dir.as_ref().map(|dir| {
            dir.join(format!(
                "{}.inner-optimizer.safetensors",
                file_stem(&job.name)
            ))
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

    fn ready(&self) -> Result<(&Job, &TrainerHandle), Interrupt> {
        match (&self.job, &self.trainer) {
            (Some(job), Some(trainer)) => Ok((job, trainer)),
            _ => Err(Interrupt::Fatal(ClientError::Trainer(
                TrainerError::Thread(crate::tensor_thread::ThreadError::Stopped),
            ))),
        }
    }

    fn shard_paths(&self, shards: &[pb::ShardRef]) -> Result<Vec<PathBuf>, DataError> {
        shards
            .iter()
            .map(|s| data::shard_path(&self.config.data_dir, &s.file_name))
            .collect()
    }
}

impl Tasks for Pretrain {
    async fn train(
        &mut self,
        connection: &Connection,
        worker_id: &str,
        task: pb::TrainTask,
    ) -> Result<(), Interrupt> {
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
        let (job, trainer) = self.ready()?;
        let (params, pulled_bytes) = connection
            .pull(worker_id, &job.layout, task.version, false)
            .await?;
        let out = trainer.train(params, shards, eval_shards).await?;
        let stats = out.stats;
        let header = pb::PushHeader {
            worker_id: worker_id.to_string(),
            round: task.round,
            base_version: task.version,
            dtype: 0,
            stats: Some(stats_to_proto(&stats)),
        };
        let (response, pushed_bytes) = connection
            .push(
                header,
                out.delta,
                &job.layout,
                job.update_dtype,
                job.max_chunk_bytes,
            )
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

    async fn eval(
        &mut self,
        connection: &Connection,
        worker_id: &str,
        task: pb::EvalTask,
    ) -> Result<(), Interrupt> {
        let start = Instant::now();
        let eval_shards = self.shard_paths(&task.eval_shards)?;
        let (job, trainer) = self.ready()?;
        let (params, pulled_bytes) = connection
            .pull(worker_id, &job.layout, task.version, false)
            .await?;
        let out = trainer.eval(params, eval_shards).await?;
        connection
            .report_eval(pb::ReportEvalRequest {
                worker_id: worker_id.to_string(),
                version: task.version,
                loss: out.loss,
                tokens: out.tokens,
                accuracy: None,
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
