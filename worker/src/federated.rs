//! The federated client (`cohort-worker federated`): joins with the site's enrollment token
//! or, under mutual TLS, the client certificate it is enrolled by; pulls the frozen base
//! once (LoRA), then each round pulls the trainable parameters,
//! evaluates them on the local test text, trains locally and pushes only the clipped (and,
//! by DP mode, noised) update. The site's text never leaves it.
//!
//! Submodules: [`local`] (the trainer on the tensor thread) and [`privatize`] (clipping and
//! noise, no tch).

pub mod local;
pub mod privatize;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cohort_core::codec::DType;
use cohort_proto::v1 as pb;
use tch::Device;
use tonic::Code;
use tracing::{info, warn};

use crate::connection::{
    serve_tasks, stats_to_proto, ClientError, ClientTls, Connection, Heartbeat, Interrupt,
    RetryPolicy, RunSummary, Tasks,
};
use crate::device::device_name;
use crate::job::{validate_federated_job, FederatedJob, TrainableSet};
use crate::labeled::LabeledExamples;
use crate::tensor_thread::{TensorThread, ThreadError};
use crate::text::LocalText;
use crate::trainer::TrainerError;
use local::{LocalConfig, LocalTrainer, SiteData};
use privatize::PrivacyConfig;

/// A site's enrollment token; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken(String);

impl EnrollmentToken {
    /// The token with surrounding whitespace (a file's trailing newline) removed; `None`
    /// when nothing is left.
    pub fn new(raw: &str) -> Option<EnrollmentToken> {
        let token = raw.trim();
        (!token.is_empty()).then(|| EnrollmentToken(token.to_string()))
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrollmentToken(<redacted>)")
    }
}

/// How the client reaches the coordinator, who it is and what it trains on.
#[derive(Clone, Debug)]
pub struct FederatedConfig {
    /// `http://host:port`, or `https://host:port` over TLS.
    pub coordinator: String,
    /// TLS files for an `https://` coordinator.
    pub tls: ClientTls,
    /// Holds `train.txt` and `test.txt`.
    pub data_dir: PathBuf,
    /// The enrollment token; `None` for a site enrolled by the name on its
    /// client certificate (`tls.identity`), which joins by certificate alone.
    pub token: Option<EnrollmentToken>,
    pub device: Device,
    /// libtorch intra-op threads (0: libtorch's default).
    pub threads: usize,
    pub retry: RetryPolicy,
    pub hostname: String,
    /// Reported to the coordinator; 0 when unknown.
    pub device_memory_bytes: u64,
}

/// Connects (lazily) and runs the client until the coordinator says the job is done.
pub async fn run(config: FederatedConfig) -> Result<RunSummary, ClientError> {
    crate::text::preflight(&config.data_dir)
        .map_err(|e| ClientError::Trainer(TrainerError::LocalData(e)))?;
    let connection = Connection::new(&config.coordinator, config.retry, &config.tls)?;
    let mut site = Site {
        config,
        job: None,
        trainer: None,
        summary: RunSummary::default(),
    };
    loop {
        let (worker_id, heartbeat) = site.join(&connection).await?;
        match serve_tasks(&connection, &worker_id, &heartbeat, &mut site).await {
            Ok(reason) => {
                info!(reason = %reason, rounds = site.summary.rounds_pushed, "coordinator says the job is done");
                site.summary.done_reason = reason;
                return Ok(site.summary);
            }
            Err(Interrupt::Rejoin) => {
                warn!(worker_id = %worker_id, "lease lost, joining again");
            }
            Err(Interrupt::Skip) => {}
            Err(Interrupt::Fatal(e)) => return Err(e),
        }
    }
}

/// The local trainer's thread and whether its frozen base is loaded.
struct LocalHandle {
    thread: TensorThread<LocalTrainer>,
    config: LocalConfig,
    needs_base: bool,
}

/// The client's state between tasks.
struct Site {
    config: FederatedConfig,
    job: Option<FederatedJob>,
    trainer: Option<LocalHandle>,
    summary: RunSummary,
}

fn stopped() -> Interrupt {
    Interrupt::Fatal(ClientError::Trainer(TrainerError::Thread(
        ThreadError::Stopped,
    )))
}

impl Site {
    async fn join(&mut self, connection: &Connection) -> Result<(String, Heartbeat), ClientError> {
        let request = pb::JoinRequest {
            token: self
                .config
                .token
                .as_ref()
                .map_or_else(String::new, |token| token.expose().to_string()),
            info: Some(pb::WorkerInfo {
                hostname: self.config.hostname.clone(),
                device: device_name(self.config.device),
                device_memory_bytes: self.config.device_memory_bytes,
                role: pb::Role::Federated as i32,
            }),
        };
        let response = connection.join(request).await.map_err(|failure| {
            match (failure.attempts, failure.status.code()) {
                (None, code @ (Code::Unauthenticated | Code::PermissionDenied)) => {
                    ClientError::Unauthenticated {
                        code,
                        message: failure.status.message().to_string(),
                    }
                }
                _ => ClientError::from(failure),
            }
        })?;
        let spec = response
            .job
            .as_ref()
            .ok_or_else(|| ClientError::JobSpec("the join response carries no job".into()))?;
        let job = validate_federated_job(spec)?;
        if spec.update_dtype == pb::DType::DtypeBf16 as i32 {
            warn!("the job asks for bf16 updates; a federated client sends f32 so that rounding cannot push a clipped update past the norm bound");
        }
        info!(
            worker_id = %response.worker_id,
            job = %job.name,
            trainable = ?job.trainable,
            trainable_parameters = job.layout.total(),
            local_steps = job.local_steps,
            clip_norm = job.clip_norm,
            dp_mode = ?job.dp_mode,
            noise_stddev = job.noise_stddev,
            lease_ms = response.lease_ms,
            "joined"
        );
        self.summary.joins += 1;
        self.ensure_trainer(&job).await?;
        self.job = Some(job);
        let interval = Duration::from_millis(response.heartbeat_interval_ms.max(50));
        let heartbeat = connection.start_heartbeat(&response.worker_id, interval);
        Ok((response.worker_id, heartbeat))
    }

    /// Starts the local trainer (reading and tokenizing the site's text) unless one for the
    /// same job runs already.
    async fn ensure_trainer(&mut self, job: &FederatedJob) -> Result<(), ClientError> {
        let wanted = LocalConfig {
            model: job.model.clone(),
            lora: match job.trainable {
                TrainableSet::Full => None,
                TrainableSet::Lora(lora) => Some(lora),
            },
            num_classes: job.task.num_classes(),
            inner: job.inner.clone(),
            local_steps: job.local_steps,
            micro_batch_size: job.micro_batch_size,
            device: self.config.device,
            threads: self.config.threads,
            seed: job.seed,
            privacy: PrivacyConfig {
                clip_norm: job.clip_norm,
                noise_stddev: job.noise_stddev,
                noise_threads: self.config.threads,
            },
        };
        if self.trainer.as_ref().is_some_and(|t| t.config == wanted) {
            return Ok(());
        }
        if self.trainer.is_some() {
            warn!(job = %job.name, "the job changed, restarting the local trainer");
        }
        self.trainer = None;
        let data_dir = self.config.data_dir.clone();
        let tokenizer = job.tokenizer;
        let context = job.model.context_length as usize;
        let config = wanted.clone();
        let thread = TensorThread::spawn("cohort-federated", move || {
            let data = match config.num_classes {
                None => {
                    let text = LocalText::load(&data_dir, tokenizer, context)?;
                    info!(
                        train_tokens = text.train.len(),
                        test_tokens = text.test.len(),
                        tokenizer = %tokenizer,
                        "local text loaded"
                    );
                    SiteData::Text(text)
                }
                Some(num_classes) => {
                    let examples =
                        LabeledExamples::load(&data_dir, tokenizer, context, num_classes)?;
                    info!(
                        train_examples = examples.train.len(),
                        test_examples = examples.test.len(),
                        train_per_class = ?LabeledExamples::class_counts(&examples.train, num_classes),
                        truncated_to_context = examples.truncated,
                        tokenizer = %tokenizer,
                        "local labeled examples loaded"
                    );
                    SiteData::Labeled(examples)
                }
            };
            LocalTrainer::new(config, data)
        })
        .await
        .map_err(ClientError::Trainer)?;
        self.trainer = Some(LocalHandle {
            thread,
            needs_base: wanted.lora.is_some(),
            config: wanted,
        });
        Ok(())
    }

    /// Pulls the frozen base into the trainer once (LoRA only).
    async fn ensure_base(
        &mut self,
        connection: &Connection,
        worker_id: &str,
    ) -> Result<(), Interrupt> {
        let (Some(job), Some(trainer)) = (&self.job, &mut self.trainer) else {
            return Err(stopped());
        };
        let Some(base_layout) = job.base_layout.as_ref().filter(|_| trainer.needs_base) else {
            return Ok(());
        };
        let start = Instant::now();
        let (base, bytes) = connection.pull(worker_id, base_layout, 0, true).await?;
        trainer
            .thread
            .run(move |t| t.load_base(&base))
            .await
            .map_err(TrainerError::from)??;
        trainer.needs_base = false;
        info!(
            parameters = base_layout.total(),
            pulled_bytes = bytes,
            seconds = start.elapsed().as_secs_f64(),
            "frozen base model pulled"
        );
        Ok(())
    }

    fn ready(&self) -> Result<(&FederatedJob, &LocalHandle), Interrupt> {
        match (&self.job, &self.trainer) {
            (Some(job), Some(trainer)) => Ok((job, trainer)),
            _ => Err(stopped()),
        }
    }
}

impl Tasks for Site {
    async fn train(
        &mut self,
        connection: &Connection,
        worker_id: &str,
        task: pb::TrainTask,
    ) -> Result<(), Interrupt> {
        let start = Instant::now();
        if !task.shards.is_empty() {
            warn!(
                shards = task.shards.len(),
                "a federated round names shards; the client trains on its own text only"
            );
        }
        self.ensure_base(connection, worker_id).await?;
        let (job, trainer) = self.ready()?;
        let (global, pulled_bytes) = connection
            .pull(worker_id, &job.layout, task.version, false)
            .await?;
        let round = task.round;
        let out = trainer
            .thread
            .run(move |t| t.round(round, global))
            .await
            .map_err(TrainerError::from)??;
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
                DType::F32,
                job.max_chunk_bytes,
            )
            .await?;
        let clip_norm = job.clip_norm;
        self.summary.rounds_pushed += 1;
        info!(
            round = task.round,
            version = task.version,
            update_norm = out.privacy.norm,
            clipped = out.privacy.clipped,
            clip_norm,
            noise_stddev = out.privacy.noise.as_ref().map_or(0.0, |n| n.stddev),
            sent_norm = out.privacy.sent_norm,
            loss = stats.mean_loss,
            eval_loss = stats.eval_loss,
            eval_accuracy = stats.eval_accuracy,
            tokens = stats.tokens,
            pulled_bytes,
            pushed_bytes,
            train_seconds = stats.seconds,
            seconds = start.elapsed().as_secs_f64(),
            received = response.received,
            expected = response.expected,
            "federated round pushed"
        );
        Ok(())
    }

    /// Evaluates a version on the site's test text (the only held-out data it has).
    async fn eval(
        &mut self,
        connection: &Connection,
        worker_id: &str,
        task: pb::EvalTask,
    ) -> Result<(), Interrupt> {
        self.ensure_base(connection, worker_id).await?;
        let (job, trainer) = self.ready()?;
        let (params, _) = connection
            .pull(worker_id, &job.layout, task.version, false)
            .await?;
        let out = trainer
            .thread
            .run(move |t| t.evaluate(&params))
            .await
            .map_err(TrainerError::from)??;
        connection
            .report_eval(pb::ReportEvalRequest {
                worker_id: worker_id.to_string(),
                version: task.version,
                loss: out.loss,
                tokens: out.tokens,
                accuracy: out.accuracy,
            })
            .await?;
        self.summary.evals_reported += 1;
        info!(
            version = task.version,
            eval_loss = out.loss,
            eval_accuracy = out.accuracy,
            weight = out.tokens,
            "version evaluated on the site's held-out data"
        );
        Ok(())
    }
}
