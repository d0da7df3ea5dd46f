//! What an operator sees of a running job: Prometheus metrics served at
//! `/metrics` (`run --metrics-listen`), and the progress the `Status` RPC
//! reports (last round, rounds per second).
//!
//! The actor is the only writer: it updates both from the engine's events.
//! Readers (the metrics endpoint, the gRPC handler) take a consistent copy and
//! never reach the engine for these numbers.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_core::engine::RoundSummary;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The label set of a rejected push: `reason` is the engine's stable code
/// ([`cohort_core::engine::EngineError::rejection_code`]).
type ReasonLabels = Vec<(String, String)>;

/// The coordinator's Prometheus metrics, all prefixed `cohort_`.
pub struct Metrics {
    registry: Registry,
    pub rounds_committed: Counter,
    pub rounds_aborted: Counter,
    pub round_participants: Gauge,
    pub live_workers: Gauge,
    pub model_version: Gauge,
    pub update_bytes_pushed: Counter,
    pub update_bytes_pulled: Counter,
    pub tokens_trained: Counter,
    pub round_wall_seconds: Histogram,
    pub round_mean_loss: Gauge<f64, AtomicU64>,
    pub eval_loss: Gauge<f64, AtomicU64>,
    pub eval_accuracy: Gauge<f64, AtomicU64>,
    pub epsilon_spent: Gauge<f64, AtomicU64>,
    pub epsilon_remaining: Gauge<f64, AtomicU64>,
    pub workers_joined: Counter,
    pub leases_expired: Counter,
    pushes_rejected: Family<ReasonLabels, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("cohort"),
            rounds_committed: Counter::default(),
            rounds_aborted: Counter::default(),
            round_participants: Gauge::default(),
            live_workers: Gauge::default(),
            model_version: Gauge::default(),
            update_bytes_pushed: Counter::default(),
            update_bytes_pulled: Counter::default(),
            tokens_trained: Counter::default(),
            // 50 ms .. about 14 min.
            round_wall_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 15)),
            round_mean_loss: Gauge::default(),
            eval_loss: Gauge::default(),
            eval_accuracy: Gauge::default(),
            epsilon_spent: Gauge::default(),
            epsilon_remaining: Gauge::default(),
            workers_joined: Counter::default(),
            leases_expired: Counter::default(),
            pushes_rejected: Family::default(),
        };
        let r = &mut metrics.registry;
        r.register(
            "rounds_committed",
            "Rounds committed (a new model version published) by this process",
            metrics.rounds_committed.clone(),
        );
        r.register(
            "rounds_aborted",
            "Rounds aborted: too few pushes at the deadline, or too small a cohort",
            metrics.rounds_aborted.clone(),
        );
        r.register(
            "round_participants",
            "Workers whose update the last committed round averaged",
            metrics.round_participants.clone(),
        );
        r.register(
            "live_workers",
            "Workers holding a lease",
            metrics.live_workers.clone(),
        );
        r.register(
            "model_version",
            "The published model version",
            metrics.model_version.clone(),
        );
        r.register_with_unit(
            "update_bytes_pushed",
            "Bytes of updates pushed in committed rounds",
            Unit::Bytes,
            metrics.update_bytes_pushed.clone(),
        );
        r.register_with_unit(
            "update_bytes_pulled",
            "Bytes of parameters pulled in committed rounds",
            Unit::Bytes,
            metrics.update_bytes_pulled.clone(),
        );
        r.register(
            "tokens_trained",
            "Training tokens of committed rounds",
            metrics.tokens_trained.clone(),
        );
        r.register_with_unit(
            "round_wall",
            "Wall time of a committed round, from its start to its commit (aggregation included)",
            Unit::Seconds,
            metrics.round_wall_seconds.clone(),
        );
        r.register(
            "round_mean_loss",
            "Mean training loss the participants of the last committed round reported",
            metrics.round_mean_loss.clone(),
        );
        r.register(
            "eval_loss",
            "Latest held-out loss",
            metrics.eval_loss.clone(),
        );
        r.register(
            "eval_accuracy",
            "Latest held-out accuracy (classification jobs)",
            metrics.eval_accuracy.clone(),
        );
        r.register(
            "epsilon_spent",
            "Differential privacy epsilon spent so far (federated jobs with DP)",
            metrics.epsilon_spent.clone(),
        );
        r.register(
            "epsilon_remaining",
            "Epsilon left in the job's privacy budget (federated jobs with a budget)",
            metrics.epsilon_remaining.clone(),
        );
        r.register(
            "workers_joined",
            "Joins accepted",
            metrics.workers_joined.clone(),
        );
        r.register(
            "leases_expired",
            "Workers removed because their lease expired",
            metrics.leases_expired.clone(),
        );
        r.register(
            "pushes_rejected",
            "Pushes refused or discarded, by reason code",
            metrics.pushes_rejected.clone(),
        );
        metrics
    }

    pub fn push_rejected(&self, reason: &str) {
        self.pushes_rejected
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// The last committed round, as the Status RPC reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LastRound {
    pub round: u64,
    pub version: u64,
    pub participants: usize,
    pub mean_loss: f64,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub tokens_per_second: f64,
    pub wall_seconds: f64,
}

/// Progress of this coordinator process, for the Status RPC.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub started_at: Instant,
    /// Rounds this process committed (a resumed job's earlier rounds are not counted).
    pub rounds_committed_here: u64,
    pub last_round: Option<LastRound>,
    /// The latest held-out loss from any source (a round's eval, the final eval).
    pub latest_eval_loss: Option<f64>,
    /// The latest held-out accuracy (classification jobs).
    pub latest_eval_accuracy: Option<f64>,
}

impl Progress {
    /// Committed rounds per second since this process started.
    pub fn rounds_per_second(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.started_at).as_secs_f64();
        if self.rounds_committed_here == 0 || elapsed <= 0.0 {
            return 0.0;
        }
        self.rounds_committed_here as f64 / elapsed
    }

    /// Time until `rounds_left` more rounds commit at the rate so far.
    pub fn eta(&self, rounds_left: u64, now: Instant) -> Option<Duration> {
        let rate = self.rounds_per_second(now);
        (rate > 0.0).then(|| Duration::from_secs_f64(rounds_left as f64 / rate))
    }
}

/// Metrics and progress of one run, shared by the actor (the writer), the
/// metrics endpoint and the gRPC service.
pub struct Observer {
    pub metrics: Metrics,
    progress: watch::Sender<Progress>,
}

impl Observer {
    pub fn new(started_at: Instant) -> Arc<Observer> {
        Arc::new(Observer {
            metrics: Metrics::new(),
            progress: watch::Sender::new(Progress {
                started_at,
                rounds_committed_here: 0,
                last_round: None,
                latest_eval_loss: None,
                latest_eval_accuracy: None,
            }),
        })
    }

    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Records a committed round: metrics and progress.
    pub fn round_committed(&self, s: &RoundSummary) {
        let m = &self.metrics;
        m.rounds_committed.inc();
        m.round_participants.set(s.participants as i64);
        m.model_version.set(s.new_version.0 as i64);
        m.update_bytes_pushed.inc_by(s.bytes_pushed);
        m.update_bytes_pulled.inc_by(s.bytes_pulled);
        m.tokens_trained.inc_by(s.tokens);
        m.round_wall_seconds.observe(s.wall.as_secs_f64());
        m.round_mean_loss.set(s.mean_loss);
        if let Some(loss) = s.eval_loss {
            m.eval_loss.set(loss);
        }
        if let Some(accuracy) = s.eval_accuracy {
            m.eval_accuracy.set(accuracy);
        }
        if let Some(f) = &s.federated {
            if let Some(spent) = f.epsilon_spent {
                self.set_epsilon(spent, f.epsilon_budget);
            }
        }
        self.progress.send_modify(|p| {
            p.rounds_committed_here += 1;
            if s.eval_loss.is_some() {
                p.latest_eval_loss = s.eval_loss;
            }
            if s.eval_accuracy.is_some() {
                p.latest_eval_accuracy = s.eval_accuracy;
            }
            p.last_round = Some(LastRound {
                round: s.round.0,
                version: s.new_version.0,
                participants: s.participants,
                mean_loss: s.mean_loss,
                eval_loss: s.eval_loss,
                eval_accuracy: s.eval_accuracy,
                tokens_per_second: s.tokens_per_second,
                wall_seconds: s.wall.as_secs_f64(),
            });
        });
    }

    pub fn set_epsilon(&self, spent: f64, budget: Option<f64>) {
        self.metrics.epsilon_spent.set(spent);
        if let Some(budget) = budget {
            self.metrics
                .epsilon_remaining
                .set((budget - spent).max(0.0));
        }
    }

    pub fn eval_reported(&self, loss: f64, accuracy: Option<f64>) {
        self.metrics.eval_loss.set(loss);
        if let Some(accuracy) = accuracy {
            self.metrics.eval_accuracy.set(accuracy);
        }
        self.progress.send_modify(|p| {
            p.latest_eval_loss = Some(loss);
            if accuracy.is_some() {
                p.latest_eval_accuracy = accuracy;
            }
        });
    }
}

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    observer: Arc<Observer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let observer = Arc::clone(&observer);
            async move {
                (
                    [(CONTENT_TYPE, METRICS_CONTENT_TYPE)],
                    observer.metrics.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_core::ids::{RoundId, Version};

    fn summary(round: u64) -> RoundSummary {
        RoundSummary {
            round: RoundId(round),
            base_version: Version(round - 1),
            new_version: Version(round),
            participants: 2,
            mean_loss: 3.5,
            tokens: 128,
            tokens_per_second: 64.0,
            bytes_pulled: 100,
            bytes_pushed: 40,
            wall: Duration::from_millis(2000),
            eval_loss: Some(3.25),
            eval_accuracy: Some(0.75),
            epoch: 0,
            federated: None,
        }
    }

    #[test]
    fn committed_rounds_show_in_the_exposition_and_the_progress() {
        let t0 = Instant::now();
        let observer = Observer::new(t0);
        observer.round_committed(&summary(1));
        observer.round_committed(&summary(2));
        observer.metrics.push_rejected("stale_round");
        let text = observer.metrics.encode();
        for line in [
            "cohort_rounds_committed_total 2",
            "cohort_update_bytes_pushed_bytes_total 80",
            "cohort_round_participants 2",
            "cohort_round_wall_seconds_count 2",
            "cohort_eval_loss 3.25",
            "cohort_eval_accuracy 0.75",
            "cohort_pushes_rejected_total{reason=\"stale_round\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        let progress = observer.progress();
        assert_eq!(progress.rounds_committed_here, 2);
        assert_eq!(progress.last_round.as_ref().map(|r| r.round), Some(2));
        assert_eq!(progress.latest_eval_accuracy, Some(0.75));
        // The final evaluation's numbers replace the rounds'.
        observer.eval_reported(2.5, Some(0.8));
        let progress = observer.progress();
        assert_eq!(
            (progress.latest_eval_loss, progress.latest_eval_accuracy),
            (Some(2.5), Some(0.8))
        );
        let later = t0 + Duration::from_secs(4);
        assert_eq!(progress.rounds_per_second(later), 0.5);
        assert_eq!(progress.eta(3, later), Some(Duration::from_secs(6)));
    }
}
