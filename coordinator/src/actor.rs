//! The single owner of the round engine: an actor task, and a cloneable
//! handle through which gRPC handlers reach it.
//!
//! Every input to the engine is a closure sent over one channel and run on
//! the actor's task with the current time, so the engine needs no lock. The
//! actor also ticks the engine (leases, deadlines) and turns its events into
//! logs, metrics lines and checkpoints.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_core::engine::{Event, RoundEngine, RoundSummary};
use cohort_core::ids::Version;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;
use tracing::{error, info, warn};

use crate::checkpoint::{checkpoint_path, write_ledger, write_params};
use crate::config::JobPlan;

type EngineCall = Box<dyn FnOnce(&mut RoundEngine, Instant) + Send>;

/// How a job ended.
#[derive(Clone, Debug, PartialEq)]
pub struct JobOutcome {
    pub finished: bool,
    pub version: Version,
    pub final_eval_loss: Option<f64>,
    pub checkpoint: Option<PathBuf>,
}

/// Cloneable access to the engine for the gRPC handlers.
#[derive(Clone)]
pub struct EngineHandle {
    calls: mpsc::Sender<EngineCall>,
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
}

/// Tokio's clock (so tests can pause it), as the std `Instant` the engine takes.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Starts the actor. It ends when the job is finished and every worker has
/// been told, or when `stop` turns true (then it checkpoints first).
pub fn spawn(
    engine: RoundEngine,
    plan: Arc<JobPlan>,
    mut stop: watch::Receiver<bool>,
) -> (EngineHandle, tokio::task::JoinHandle<JobOutcome>) {
    let (calls, mut inbox) = mpsc::channel::<EngineCall>(1024);
    let task = tokio::spawn(async move {
        let mut engine = engine;
        let mut records = RunRecords::new(plan.clone());
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut finished_at: Option<tokio::time::Instant> = None;
        // After the job ends, workers get this long to hear "done".
        let release_grace = plan.engine.lease;
        loop {
            tokio::select! {
                call = inbox.recv() => match call {
                    Some(call) => call(&mut engine, now()),
                    None => break,
                },
                _ = ticker.tick() => engine.tick(now()),
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        info!(version = %engine.version(), "stopping: writing a checkpoint of the current version");
                        records.checkpoint(&engine);
                        break;
                    }
                }
            }
            for event in engine.drain_events() {
                records.on_event(&engine, event);
            }
            if engine.is_finished() {
                let since = *finished_at.get_or_insert_with(tokio::time::Instant::now);
                if engine.all_workers_released() || since.elapsed() >= release_grace {
                    break;
                }
            }
        }
        JobOutcome {
            finished: engine.is_finished(),
            version: engine.version(),
            final_eval_loss: records.final_eval_loss,
            checkpoint: records.last_checkpoint.clone(),
        }
    });
    (EngineHandle { calls }, task)
}

/// Logs, metrics lines and checkpoints for one run directory.
struct RunRecords {
    plan: Arc<JobPlan>,
    metrics: Option<std::fs::File>,
    final_eval_loss: Option<f64>,
    last_checkpoint: Option<PathBuf>,
}

impl RunRecords {
    fn new(plan: Arc<JobPlan>) -> RunRecords {
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(plan.run_dir.join("metrics.jsonl"))
            .map_err(|e| error!(error = %e, "cannot open metrics.jsonl; per-round metrics will only be logged"))
            .ok();
        RunRecords {
            plan,
            metrics,
            final_eval_loss: None,
            last_checkpoint: None,
        }
    }

    fn append_metrics(&mut self, line: serde_json::Value) {
        use std::io::Write;
        if let Some(file) = &mut self.metrics {
            if let Err(e) = writeln!(file, "{line}") {
                warn!(error = %e, "cannot append to metrics.jsonl");
            }
        }
    }

    fn on_event(&mut self, engine: &RoundEngine, event: Event) {
        match event {
            Event::WorkerJoined { worker, info } => {
                info!(worker = %worker, host = %info.hostname, device = %info.device, "worker joined")
            }
            Event::WorkerExpired {
                worker,
                returned_shards,
            } => {
                warn!(worker = %worker, returned_shards = returned_shards.len(), "worker lease expired")
            }
            Event::RoundStarted {
                round,
                version,
                participants,
                shards,
            } => {
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
                reason,
            } => {
                warn!(worker = %worker, round = round.map(|r| r.0), reason = %reason, "push rejected")
            }
            Event::RoundCommitted(summary) => self.on_commit(&summary),
            Event::RoundAborted {
                round,
                pushed,
                needed,
                returned_shards,
            } => {
                warn!(
                    round = round.0,
                    pushed, needed, returned_shards, "round aborted at its deadline"
                )
            }
            Event::EpochCompleted { epoch } => {
                info!(epoch, "epoch complete: every training shard used once")
            }
            Event::EvalReported {
                version,
                loss,
                tokens,
            } => {
                info!(
                    version = version.0,
                    loss, tokens, "held-out loss of the final version"
                )
            }
            Event::JobFinished {
                version,
                final_eval_loss,
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
                    checkpoint = %checkpoint_text,
                    "job finished"
                );
                self.append_metrics(json!({
                    "final": true,
                    "version": version.0,
                    "rounds": rounds,
                    "epochs": epochs,
                    "eval_loss": final_eval_loss,
                    "checkpoint": checkpoint_text,
                }));
            }
        }
    }

    fn on_commit(&mut self, s: &RoundSummary) {
        let bytes_moved = s.bytes_pulled + s.bytes_pushed;
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

    /// Writes the current version's parameters and the shard ledger.
    fn checkpoint(&mut self, engine: &RoundEngine) -> Option<PathBuf> {
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
