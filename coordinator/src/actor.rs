//! The single owner of the round engine: an actor task, and a cloneable
//! handle through which gRPC handlers reach it.
//!
//! Every input to the engine is a closure sent over one channel and run on
//! the actor's task with the current time, so the engine needs no lock. The
//! actor also ticks the engine (leases, deadlines) and turns its events into
//! logs, metrics lines and checkpoints.
//!
//! Every `checkpoint_every` committed rounds the engine's snapshot, an `Arc`
//! of the published parameters and a copy of the momentum buffer go to a
//! blocking task that writes them to the run store, off the actor's path. The
//! checkpoints at the end of the job and on shutdown are written in place,
//! before the actor returns.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_core::engine::{EngineSnapshot, Event, RoundEngine, RoundSummary};
use cohort_core::ids::{RoundId, Version};
use cohort_core::params::ParamLayout;
use cohort_core::privacy::SampledGaussianRound;
use cohort_dp::{add_gaussian_noise, NoiseOptions};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;
use tracing::{error, info, warn};

use crate::checkpoint::{checkpoint_path, write_ledger, write_params};
use crate::config::JobPlan;
use crate::observe::Observer;
use crate::store::{PrivacyCharge, RunStore};

/// The run store, shared with the blocking tasks that write checkpoints.
/// Checkpoints are numbered as they are taken; one older than the last
/// written is dropped, so a late background write never follows a newer one.
pub struct SharedStore {
    store: RunStore,
    last_written: u64,
}

impl SharedStore {
    pub fn new(store: RunStore) -> Arc<Mutex<SharedStore>> {
        Arc::new(Mutex::new(SharedStore {
            store,
            last_written: 0,
        }))
    }
}

/// Everything a checkpoint needs, taken from the engine at one moment.
struct CheckpointJob {
    sequence: u64,
    snapshot: EngineSnapshot,
    layout: ParamLayout,
    params: Arc<Vec<f32>>,
    momentum: Vec<f32>,
}

impl CheckpointJob {
    /// Writes the checkpoint to the store; logs the outcome.
    fn run(self, store: &Mutex<SharedStore>) -> bool {
        let started = Instant::now();
        let mut shared = match store.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.sequence <= shared.last_written {
            return false;
        }
        match shared.store.write_checkpoint(
            &self.snapshot,
            &self.layout,
            &self.params,
            &self.momentum,
        ) {
            Ok(record) => {
                shared.last_written = self.sequence;
                info!(
                    version = record.version,
                    next_round = record.next_round,
                    file = %record.file_name,
                    ms = started.elapsed().as_millis() as u64,
                    "checkpoint stored"
                );
                true
            }
            Err(e) => {
                error!(error = %e, version = self.snapshot.version.0, "storing a checkpoint failed");
                false
            }
        }
    }
}

type EngineCall = Box<dyn FnOnce(&mut RoundEngine, Instant) + Send>;

/// How a job ended.
#[derive(Clone, Debug, PartialEq)]
pub struct JobOutcome {
    /// The job reached its limits (not stopped by a signal or an operator).
    pub finished: bool,
    pub version: Version,
    pub final_eval_loss: Option<f64>,
    pub checkpoint: Option<PathBuf>,
    /// The reason an operator gave when stopping the job (the Stop RPC).
    pub stopped_by_operator: Option<String>,
}

/// An operator's request to stop the job, with where to send the answer.
struct StopCall {
    reason: String,
    reply: oneshot::Sender<StopAck>,
}

/// What the job was doing when the actor accepted a stop.
#[derive(Clone, Debug, PartialEq)]
pub struct StopAck {
    /// The engine's phase before the stop (`training`, ..., `finished`).
    pub phase: &'static str,
    pub committed_rounds: u64,
    /// The checkpoint written for the stop; `None` when the job had already
    /// finished (or had no run store).
    pub checkpoint: Option<PathBuf>,
}

/// Cloneable access to the engine for the gRPC handlers.
#[derive(Clone)]
pub struct EngineHandle {
    calls: mpsc::Sender<EngineCall>,
    stops: mpsc::Sender<StopCall>,
}

impl EngineHandle {
    /// Runs `f` on the engine and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut RoundEngine, Instant) -> T + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let call: EngineCall = Box::new(move |engine, now| {
            let _ = reply.send(f(engine, now));
        });
        self.calls
            .send(call)
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))
    }

    /// Stops the job as an operator asked: the actor checkpoints the current
    /// version, ends the job with `reason` (every worker's next task is Done
    /// with it) and returns once workers are told or their lease has passed.
    /// Answers once the checkpoint is written.
    pub async fn stop(&self, reason: String) -> Result<StopAck, Status> {
        let (reply, answer) = oneshot::channel();
        self.stops
            .send(StopCall { reason, reply })
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))
    }
}

/// Tokio's clock (so tests can pause it), as the std `Instant` the engine takes.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Starts the actor. It ends when the job is finished (or stopped by an
/// operator through [`EngineHandle::stop`]) and every worker has been told,
/// or when `stop` turns true (then it checkpoints first). It reports what
/// happens to `observer` (metrics, progress).
pub fn spawn(
    engine: RoundEngine,
    plan: Arc<JobPlan>,
    store: Option<Arc<Mutex<SharedStore>>>,
    mut stop: watch::Receiver<bool>,
    observer: Arc<Observer>,
) -> (EngineHandle, tokio::task::JoinHandle<JobOutcome>) {
    let (calls, mut inbox) = mpsc::channel::<EngineCall>(1024);
    let (stops, mut stop_calls) = mpsc::channel::<StopCall>(8);
    let task = tokio::spawn(async move {
        let mut engine = engine;
        let mut records = RunRecords::new(plan.clone(), store, observer);
        records.observe_start(&engine);
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut finished_at: Option<tokio::time::Instant> = None;
        let mut stopped_by_operator: Option<String> = None;
        // After the job ends, workers get this long to hear "done".
        let release_grace = plan.engine.lease;
        loop {
            tokio::select! {
                call = inbox.recv() => match call {
                    Some(call) => call(&mut engine, now()),
                    None => break,
                },
                _ = ticker.tick() => engine.tick(now()),
                Some(StopCall { reason, reply }) = stop_calls.recv() => {
                    let mut ack = StopAck {
                        phase: engine.phase_name(),
                        committed_rounds: engine.committed_rounds(),
                        checkpoint: None,
                    };
                    if engine.is_finished() {
                        info!(reason = %reason, "an operator asked to stop a job that has already ended");
                    } else {
                        info!(
                            reason = %reason,
                            version = %engine.version(),
                            phase = ack.phase,
                            committed_rounds = ack.committed_rounds,
                            "stopping on an operator's request: writing a checkpoint of the current version"
                        );
                        ack.checkpoint = records.checkpoint(&engine);
                        engine.stop(reason.clone());
                        stopped_by_operator = Some(reason);
                    }
                    let _ = reply.send(ack);
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        info!(version = %engine.version(), "stopping: writing a checkpoint of the current version");
                        records.checkpoint(&engine);
                        break;
                    }
                }
            }
            // Releasing a DP round produces more events (its commit, the
            // next round's start), so drain until quiet.
            loop {
                let events = engine.drain_events();
                if events.is_empty() {
                    break;
                }
                for event in events {
                    if let Event::ReleaseReady {
                        round,
                        shares,
                        cost,
                        epsilon_after,
                    } = event
                    {
                        records.release(&mut engine, round, shares, cost, epsilon_after);
                    } else {
                        records.on_event(&engine, event);
                    }
                }
            }
            records.maybe_checkpoint_in_background(&engine);
            if engine.is_finished() {
                let since = *finished_at.get_or_insert_with(tokio::time::Instant::now);
                if engine.all_workers_released() || since.elapsed() >= release_grace {
                    break;
                }
            }
        }
        if let Some(writing) = records.writing.take() {
            let _ = writing.await;
        }
        JobOutcome {
            finished: engine.is_finished() && stopped_by_operator.is_none(),
            version: engine.version(),
            final_eval_loss: records.final_eval_loss,
            checkpoint: records.last_checkpoint.clone(),
            stopped_by_operator,
        }
    });
    (EngineHandle { calls, stops }, task)
}

/// A metrics file cut off mid-line by a crash gets its line ended, so the
/// resumed run's lines stay whole.
fn end_with_newline(mut file: std::fs::File) -> std::fs::File {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut last = [0u8; 1];
    let torn = file.metadata().is_ok_and(|m| m.len() > 0)
        && file.seek(SeekFrom::End(-1)).is_ok()
        && file.read_exact(&mut last).is_ok()
        && last[0] != b'\n';
    if torn {
        let _ = file.write_all(b"\n");
    }
    file
}

/// Appends a `{"resumed": true, ...}` line to the run's `metrics.jsonl`:
/// rounds listed before it from `next_round` on were not durable and run again.
pub fn append_resume_marker(run_dir: &std::path::Path, marker: serde_json::Value) {
    use std::io::Write;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(run_dir.join("metrics.jsonl"))
        .map(end_with_newline);
    let written = file.and_then(|mut f| f.write_all(format!("{marker}\n").as_bytes()));
    if let Err(e) = written {
        warn!(error = %e, "cannot append to metrics.jsonl");
    }
}

/// Logs, metrics lines and checkpoints for one run directory.
struct RunRecords {
    plan: Arc<JobPlan>,
    metrics: Option<std::fs::File>,
    final_eval_loss: Option<f64>,
    last_checkpoint: Option<PathBuf>,
    store: Option<Arc<Mutex<SharedStore>>>,
    /// A periodic checkpoint is due (written once no other is being written).
    checkpoint_due: bool,
    checkpoints_taken: u64,
    writing: Option<tokio::task::JoinHandle<bool>>,
    observer: Arc<Observer>,
    /// The running round's span, from its start to its commit or abort, so a
    /// trace (OTLP) shows each round's wall time with its outcome.
    round_span: Option<tracing::Span>,
}

impl RunRecords {
    fn new(
        plan: Arc<JobPlan>,
        store: Option<Arc<Mutex<SharedStore>>>,
        observer: Arc<Observer>,
    ) -> RunRecords {
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(plan.run_dir.join("metrics.jsonl"))
            .map_err(|e| error!(error = %e, "cannot open metrics.jsonl; per-round metrics will only be logged"))
            .ok()
            .map(end_with_newline);
        RunRecords {
            plan,
            metrics,
            final_eval_loss: None,
            last_checkpoint: None,
            store,
            checkpoint_due: false,
            checkpoints_taken: 0,
            round_span: None,
            writing: None,
            observer,
        }
    }

    /// Gauges that hold before any round of this process: the version, and
    /// the privacy already spent by a resumed job.
    fn observe_start(&self, engine: &RoundEngine) {
        self.observer
            .metrics
            .model_version
            .set(engine.version().0 as i64);
        let budget = engine
            .config()
            .federated
            .as_ref()
            .and_then(|f| f.budget.as_ref());
        if let Some(budget) = budget {
            let spent = engine
                .privacy_ledger()
                .epsilon(budget.delta)
                .map_or(0.0, |report| report.epsilon);
            self.observer.set_epsilon(spent, Some(budget.epsilon));
        }
    }

    fn checkpoint_job(&mut self, engine: &RoundEngine) -> CheckpointJob {
        self.checkpoints_taken += 1;
        CheckpointJob {
            sequence: self.checkpoints_taken,
            snapshot: engine.snapshot(),
            layout: engine.layout().clone(),
            params: Arc::clone(engine.global_params()),
            momentum: engine.outer_optimizer().state().to_vec(),
        }
    }

    /// Starts the due periodic checkpoint unless one is still being written.
    fn maybe_checkpoint_in_background(&mut self, engine: &RoundEngine) {
        if !self.checkpoint_due || self.writing.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        self.checkpoint_due = false;
        let Some(store) = self.store.clone() else {
            return;
        };
        let job = self.checkpoint_job(engine);
        self.writing = Some(tokio::task::spawn_blocking(move || job.run(&store)));
    }

    /// Writes a checkpoint to the store now, on this thread.
    fn checkpoint_in_place(&mut self, engine: &RoundEngine) {
        self.checkpoint_due = false;
        if let Some(store) = self.store.clone() {
            let job = self.checkpoint_job(engine);
            job.run(&store);
        }
    }

    fn append_metrics(&mut self, line: serde_json::Value) {
        use std::io::Write;
        if let Some(file) = &mut self.metrics {
            // One write per line, so a crash leaves whole lines behind.
            if let Err(e) = file.write_all(format!("{line}\n").as_bytes()) {
                warn!(error = %e, "cannot append to metrics.jsonl");
            }
        }
    }

    fn on_event(&mut self, engine: &RoundEngine, event: Event) {
        match event {
            Event::WorkerJoined { worker, info } => {
                self.observer.metrics.workers_joined.inc();
                self.observer
                    .metrics
                    .live_workers
                    .set(engine.live_workers() as i64);
                info!(worker = %worker, host = %info.hostname, device = %info.device, "worker joined")
            }
            Event::WorkerExpired {
                worker,
                returned_shards,
            } => {
                self.observer.metrics.leases_expired.inc();
                self.observer
                    .metrics
                    .live_workers
                    .set(engine.live_workers() as i64);
                warn!(worker = %worker, returned_shards = returned_shards.len(), "worker lease expired")
            }
            Event::RoundStarted {
                round,
                version,
                participants,
                shards,
            } => {
                self.round_span = Some(tracing::info_span!(
                    "round",
                    round = round.0,
                    version = version.0,
                    participants,
                    shards,
                    outcome = tracing::field::Empty,
                    loss = tracing::field::Empty,
                    eval_loss = tracing::field::Empty,
                    epsilon_spent = tracing::field::Empty,
                ));
                info!(
                    round = round.0,
                    version = version.0,
                    participants,
                    shards,
                    "round started"
                )
            }
            Event::PushRejected {
                worker,
                round,
                code,
                reason,
            } => {
                self.observer.metrics.push_rejected(code);
                warn!(worker = %worker, round = round.map(|r| r.0), code, reason = %reason, "push rejected")
            }
            Event::RoundCommitted(summary) => {
                if let Some(span) = self.round_span.take() {
                    span.record("outcome", "committed");
                    span.record("loss", summary.mean_loss);
                    if let Some(loss) = summary.eval_loss {
                        span.record("eval_loss", loss);
                    }
                    if let Some(spent) = summary.federated.as_ref().and_then(|f| f.epsilon_spent) {
                        span.record("epsilon_spent", spent);
                    }
                }
                self.observer.round_committed(&summary);
                self.on_commit(&summary);
                let every = self.plan.checkpoint_every;
                if every != 0 && engine.committed_rounds().is_multiple_of(every) {
                    self.checkpoint_due = true;
                }
            }
            Event::RoundAborted {
                round,
                pushed,
                needed,
                returned_shards,
            } => {
                if let Some(span) = self.round_span.take() {
                    span.record("outcome", "aborted");
                }
                self.observer.metrics.rounds_aborted.inc();
                warn!(
                    round = round.0,
                    pushed, needed, returned_shards, "round aborted at its deadline"
                )
            }
            Event::ReleaseReady { .. } => unreachable!("handled by the actor loop"),
            Event::BudgetExhausted {
                epsilon_spent,
                epsilon_if_next_round,
                budget_epsilon,
                delta,
            } => {
                warn!(
                    epsilon_spent,
                    epsilon_if_next_round,
                    budget_epsilon,
                    delta,
                    "privacy budget reached: no further rounds"
                );
                self.append_metrics(json!({
                    "budget_exhausted": true,
                    "epsilon_spent": epsilon_spent,
                    "epsilon_if_next_round": epsilon_if_next_round,
                    "epsilon_budget": budget_epsilon,
                    "delta": delta,
                }));
            }
            Event::EpochCompleted { epoch } => {
                info!(epoch, "epoch complete: every training shard used once")
            }
            Event::EvalReported {
                version,
                loss,
                tokens,
                accuracy,
            } => {
                self.observer.eval_reported(loss, accuracy);
                info!(
                    version = version.0,
                    loss, tokens, accuracy, "held-out loss of the final version"
                )
            }
            Event::JobFinished {
                version,
                final_eval_loss,
                final_eval_accuracy,
                rounds,
                epochs,
            } => {
                self.final_eval_loss = final_eval_loss;
                let checkpoint = self.checkpoint(engine);
                let checkpoint_text = checkpoint
                    .as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string());
                info!(
                    version = version.0,
                    rounds,
                    epochs,
                    final_eval_loss,
                    final_eval_accuracy,
                    checkpoint = %checkpoint_text,
                    "job finished"
                );
                self.append_metrics(json!({
                    "final": true,
                    "version": version.0,
                    "rounds": rounds,
                    "epochs": epochs,
                    "eval_loss": final_eval_loss,
                    "eval_accuracy": final_eval_accuracy,
                    "checkpoint": checkpoint_text,
                }));
            }
        }
    }

    /// Charges a DP round to the durable privacy ledger, then releases it.
    /// If the charge cannot be written the round is not released (it stays
    /// pending and the job cannot go on: a privacy officer must be able to
    /// trust that every released round is on disk).
    fn release(
        &mut self,
        engine: &mut RoundEngine,
        round: RoundId,
        shares: usize,
        cost: SampledGaussianRound,
        epsilon_after: f64,
    ) {
        let charge = PrivacyCharge {
            round: round.0,
            shares,
            cost,
            epsilon_after,
        };
        let durable = match &self.store {
            Some(store) => {
                let mut shared = match store.lock() {
                    Ok(guard) => guard,
                    Err(poisoned) => poisoned.into_inner(),
                };
                shared.store.charge_privacy(&charge)
            }
            None => {
                warn!(
                    round = round.0,
                    "no run store: the privacy charge is kept in memory only"
                );
                Ok(())
            }
        };
        if let Err(e) = durable {
            error!(round = round.0, error = %e, "cannot write the privacy charge; the round is not released");
            return;
        }
        let noise = NoiseOptions::default();
        let released = engine.release(round, now(), |sum, stddev| {
            add_gaussian_noise(sum, stddev, &noise)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        if let Err(e) = released {
            error!(round = round.0, error = %e, "central noise failed; the round is aborted (its privacy charge stands)");
        }
    }

    fn on_commit(&mut self, s: &RoundSummary) {
        let bytes_moved = s.bytes_pulled + s.bytes_pushed;
        if let Some(f) = &s.federated {
            let remaining = f
                .epsilon_budget
                .zip(f.epsilon_spent)
                .map(|(budget, spent)| budget - spent);
            info!(
                round = s.round.0,
                version = s.new_version.0,
                sampled = f.sampled,
                participants = s.participants,
                loss = format_args!("{:.4}", s.mean_loss),
                eval_loss = s.eval_loss.map(|l| (l * 1e4).round() / 1e4),
                eval_accuracy = s.eval_accuracy.map(|a| (a * 1e4).round() / 1e4),
                mean_update_norm = format_args!("{:.4}", f.mean_update_norm),
                noise_multiplier = f.noise_multiplier,
                epsilon_spent = f.epsilon_spent.map(|e| (e * 1e4).round() / 1e4),
                epsilon_remaining = remaining.map(|e| (e * 1e4).round() / 1e4),
                local_epsilon_per_client =
                    f.local_epsilon_per_client.map(|e| (e * 1e4).round() / 1e4),
                delta = f.delta,
                bytes_moved,
                wall_s = format_args!("{:.2}", s.wall.as_secs_f64()),
                "federated round committed"
            );
            self.append_metrics(json!({
                "round": s.round.0,
                "version": s.new_version.0,
                "base_version": s.base_version.0,
                "sampled": f.sampled,
                "participants": s.participants,
                "mean_loss": s.mean_loss,
                "eval_loss": s.eval_loss,
                "eval_accuracy": s.eval_accuracy,
                "mean_update_norm": f.mean_update_norm,
                "noise_multiplier": f.noise_multiplier,
                "epsilon_spent": f.epsilon_spent,
                "epsilon_remaining": remaining,
                "local_epsilon_per_client": f.local_epsilon_per_client,
                "delta": f.delta,
                "tokens": s.tokens,
                "bytes_pulled": s.bytes_pulled,
                "bytes_pushed": s.bytes_pushed,
                "wall_seconds": s.wall.as_secs_f64(),
            }));
            return;
        }
        info!(
            round = s.round.0,
            version = s.new_version.0,
            workers = s.participants,
            loss = format_args!("{:.4}", s.mean_loss),
            eval_loss = s.eval_loss.map(|l| (l * 1e4).round() / 1e4),
            tokens_per_s = format_args!("{:.0}", s.tokens_per_second),
            bytes_moved,
            wall_s = format_args!("{:.2}", s.wall.as_secs_f64()),
            "round committed"
        );
        self.append_metrics(json!({
            "round": s.round.0,
            "version": s.new_version.0,
            "base_version": s.base_version.0,
            "participants": s.participants,
            "mean_loss": s.mean_loss,
            "eval_loss": s.eval_loss,
            "tokens": s.tokens,
            "tokens_per_second": s.tokens_per_second,
            "bytes_pulled": s.bytes_pulled,
            "bytes_pushed": s.bytes_pushed,
            "wall_seconds": s.wall.as_secs_f64(),
            "epoch": s.epoch,
        }));
    }

    /// Writes the current version's parameters and the shard ledger, and a
    /// checkpoint to the run store.
    fn checkpoint(&mut self, engine: &RoundEngine) -> Option<PathBuf> {
        self.checkpoint_in_place(engine);
        let path = checkpoint_path(&self.plan.run_dir, engine.version());
        let metadata = HashMap::from([
            ("job".to_string(), self.plan.name.clone()),
            ("version".to_string(), engine.version().0.to_string()),
            ("rounds".to_string(), engine.committed_rounds().to_string()),
            ("format".to_string(), "cohort-gpt-v1".to_string()),
        ]);
        let written = write_params(&path, engine.layout(), engine.global_params(), metadata)
            .and_then(|()| write_ledger(&self.plan.run_dir.join("ledger.json"), engine.ledger()));
        match written {
            Ok(()) => {
                info!(path = %path.display(), version = engine.version().0, "checkpoint written");
                self.last_checkpoint = Some(path.clone());
                Some(path)
            }
            Err(e) => {
                error!(error = %e, path = %path.display(), "checkpoint failed");
                None
            }
        }
    }
}
