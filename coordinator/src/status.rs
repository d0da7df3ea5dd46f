//! `cohort-coordinator status`: asks a running coordinator for the job at a
//! glance (the `Status` RPC) and prints it as a compact table or one JSON
//! object. `cohort-coordinator stop` (the `Stop` RPC) reaches the coordinator
//! the same way.

use std::fmt::Write as _;

use cohort_proto::v1 as pb;
use pb::coordinator_client::CoordinatorClient;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum StatusCommandError {
    #[error("invalid coordinator URL {url:?}: {source}")]
    Url {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("the coordinator at {url} refused {call}: {status}")]
    Rpc {
        url: String,
        call: &'static str,
        status: tonic::Status,
    },
    #[error("{0}")]
    Access(String),
}

/// How the `status` command proves it is the operator and reaches a TLS
/// coordinator.
#[derive(Clone, Debug, Default)]
pub struct StatusAccess {
    /// The operator token (`--operator-token-file`), sent as a bearer token.
    pub operator_token: Option<String>,
    /// PEM CA of the coordinator's certificate (https:// URLs).
    pub tls_ca: Option<Vec<u8>>,
    /// PEM client certificate and key, for a coordinator with mutual TLS.
    pub tls_identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Calls `Status` on the coordinator at `url` (`http://host:port`).
pub async fn fetch(
    url: &str,
    access: &StatusAccess,
) -> Result<pb::StatusResponse, StatusCommandError> {
    let request = operator_request(pb::StatusRequest {}, access)?;
    connect(url, access)
        .await?
        .status(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| StatusCommandError::Rpc {
            url: url.to_string(),
            call: "Status",
            status,
        })
}

/// Calls `Stop` on the coordinator at `url`, giving `reason` (may be
/// empty). The coordinator answers once the checkpoint is written.
pub async fn stop(
    url: &str,
    access: &StatusAccess,
    reason: &str,
) -> Result<pb::StopResponse, StatusCommandError> {
    let request = operator_request(
        pb::StopRequest {
            reason: reason.to_string(),
        },
        access,
    )?;
    connect(url, access)
        .await?
        .stop(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| StatusCommandError::Rpc {
            url: url.to_string(),
            call: "Stop",
            status,
        })
}

/// What `stop` prints: the coordinator's answer in one line.
pub fn render_stop(url: &str, response: &pb::StopResponse) -> String {
    format!(
        "the coordinator at {url} is stopping: it was {} after {} committed rounds; the current version is checkpointed",
        response.phase, response.committed_rounds
    )
}

/// `message` with the operator token as its bearer, if there is one.
fn operator_request<T>(
    message: T,
    access: &StatusAccess,
) -> Result<tonic::Request<T>, StatusCommandError> {
    let request = tonic::Request::new(message);
    match &access.operator_token {
        Some(token) => cohort_proto::session::with_bearer(request, token.trim())
            .map_err(|status| StatusCommandError::Access(status.message().to_string())),
        None => Ok(request),
    }
}

/// A client of the coordinator at `url`, over TLS for `https://` URLs.
async fn connect(
    url: &str,
    access: &StatusAccess,
) -> Result<CoordinatorClient<tonic::transport::Channel>, StatusCommandError> {
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(url.to_string()).map_err(|source| {
            StatusCommandError::Url {
                url: url.to_string(),
                source,
            }
        })?;
    if url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        tls = match &access.tls_ca {
            Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &access.tls_identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|source| StatusCommandError::Url {
                url: url.to_string(),
                source,
            })?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| StatusCommandError::Connect {
            url: url.to_string(),
            source,
        })?;
    Ok(CoordinatorClient::new(channel))
}

/// The lowercase name of a worker state, as the table and JSON print it.
pub fn state_name(state: i32) -> &'static str {
    match pb::WorkerState::try_from(state) {
        Ok(pb::WorkerState::Idle) => "idle",
        Ok(pb::WorkerState::Training) => "training",
        Ok(pb::WorkerState::Pushing) => "pushing",
        Ok(pb::WorkerState::Pushed) => "pushed",
        Ok(pb::WorkerState::Evaluating) => "evaluating",
        Ok(pb::WorkerState::Released) => "released",
        Ok(pb::WorkerState::Unspecified) | Err(_) => "unknown",
    }
}

/// Zero on the wire means "none" for rounds and limits.
fn nonzero(value: u64) -> Option<u64> {
    (value != 0).then_some(value)
}

/// The status as one JSON object (the `--json` form). Rounds and limits
/// that are absent on the wire (0) are `null`.
pub fn to_json(status: &pb::StatusResponse) -> serde_json::Value {
    let workers: Vec<serde_json::Value> = status
        .workers
        .iter()
        .map(|w| {
            json!({
                "worker_id": w.worker_id,
                "hostname": w.hostname,
                "device": w.device,
                "client": (!w.client.is_empty()).then_some(&w.client),
                "state": state_name(w.state),
                "round": nonzero(w.round),
                "lease_remaining_ms": w.lease_remaining_ms,
            })
        })
        .collect();
    let privacy = status.privacy.as_ref().map(|p| {
        json!({
            "epsilon_spent": p.epsilon_spent,
            "epsilon_budget": p.epsilon_budget,
            "epsilon_remaining": p.epsilon_remaining,
            "delta": p.delta,
            "rounds_charged": p.rounds_charged,
        })
    });
    json!({
        "job_name": status.job_name,
        "phase": status.phase,
        "federated": status.federated,
        "current_round": nonzero(status.current_round),
        "version": status.version,
        "committed_rounds": status.committed_rounds,
        "max_rounds": nonzero(status.max_rounds),
        "max_epochs": nonzero(status.max_epochs),
        "epochs_completed": status.epochs_completed,
        "workers": workers,
        "last_round": nonzero(status.last_round),
        "last_mean_loss": status.last_mean_loss,
        "last_eval_loss": status.last_eval_loss,
        "last_eval_accuracy": status.last_eval_accuracy,
        "privacy": privacy,
        "rounds_per_second": status.rounds_per_second,
        "eta_seconds": status.eta_seconds,
    })
}

/// "1h 02m", "3m 05s", "42s".
fn duration_text(seconds: f64) -> String {
    let total = seconds.max(0.0).round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s:02}s"),
        _ => format!("{h}h {m:02}m"),
    }
}

/// The status as a compact, human-readable table.
pub fn render_table(status: &pb::StatusResponse) -> String {
    let mut out = String::new();
    let round = nonzero(status.current_round).map_or("none".to_string(), |r| r.to_string());
    let limit = match (nonzero(status.max_rounds), nonzero(status.max_epochs)) {
        (Some(rounds), _) => format!("/{rounds}"),
        (None, Some(epochs)) => format!(
            " (epoch {} of {epochs})",
            (status.epochs_completed + 1).min(epochs)
        ),
        (None, None) => String::new(),
    };
    let kind = if status.federated {
        "federated"
    } else {
        "pretraining"
    };
    let _ = writeln!(
        out,
        "job {} ({kind})  phase {}  round {round}  version {}  committed {}{limit}",
        status.job_name, status.phase, status.version, status.committed_rounds
    );
    let loss = |value: Option<f64>| value.map_or("-".to_string(), |l| format!("{l:.4}"));
    let accuracy = status.last_eval_accuracy.map_or(String::new(), |a| {
        format!("  eval accuracy {:.1}%", 100.0 * a)
    });
    let _ = writeln!(
        out,
        "last round {}  loss {}  eval loss {}{accuracy}",
        nonzero(status.last_round).map_or("-".to_string(), |r| r.to_string()),
        loss(status.last_mean_loss),
        loss(status.last_eval_loss),
    );
    if let Some(p) = &status.privacy {
        let _ = writeln!(
            out,
            "privacy  epsilon {:.4} spent of {:.4} ({:.4} left)  delta {:e}  {} rounds charged",
            p.epsilon_spent, p.epsilon_budget, p.epsilon_remaining, p.delta, p.rounds_charged
        );
    }
    let eta = status
        .eta_seconds
        .map_or("unknown".to_string(), duration_text);
    let _ = writeln!(
        out,
        "rate {:.3} rounds/s  eta {eta}",
        status.rounds_per_second
    );
    let _ = writeln!(out);
    let header = ["WORKER", "HOST", "DEVICE", "CLIENT", "STATE", "LEASE"];
    let rows: Vec<[String; 6]> = status
        .workers
        .iter()
        .map(|w| {
            let state = match nonzero(w.round) {
                Some(r) => format!("{} r{r}", state_name(w.state)),
                None => state_name(w.state).to_string(),
            };
            [
                w.worker_id.clone(),
                w.hostname.clone(),
                w.device.clone(),
                if w.client.is_empty() {
                    "-".to_string()
                } else {
                    w.client.clone()
                },
                state,
                format!("{:.1}s", w.lease_remaining_ms as f64 / 1000.0),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|row| row[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no live workers)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::StatusResponse {
        pb::StatusResponse {
            job_name: "fed".into(),
            phase: "training".into(),
            federated: true,
            current_round: 4,
            version: 3,
            committed_rounds: 3,
            max_rounds: 10,
            workers: vec![pb::WorkerStatus {
                worker_id: "w2".into(),
                hostname: "site-a".into(),
                device: "cpu".into(),
                state: pb::WorkerState::Training as i32,
                round: 4,
                lease_remaining_ms: 9500,
                client: "hamlet".into(),
            }],
            last_round: 3,
            last_mean_loss: Some(2.5),
            privacy: Some(pb::PrivacyStatus {
                epsilon_spent: 1.5,
                epsilon_budget: 8.0,
                epsilon_remaining: 6.5,
                delta: 1e-5,
                rounds_charged: 3,
            }),
            rounds_per_second: 0.5,
            eta_seconds: Some(14.0),
            ..pb::StatusResponse::default()
        }
    }

    #[test]
    fn the_table_shows_round_workers_privacy_and_eta() {
        let table = render_table(&sample());
        for needle in [
            "round 4",
            "committed 3/10",
            "loss 2.5000",
            "epsilon 1.5000 spent of 8.0000 (6.5000 left)",
            "eta 14s",
            "w2      site-a  cpu     hamlet  training r4  9.5s",
        ] {
            assert!(table.contains(needle), "{needle:?} not in\n{table}");
        }
    }

    #[test]
    fn the_json_form_uses_null_for_absent_rounds() {
        let mut status = sample();
        status.current_round = 0;
        status.workers[0].state = pb::WorkerState::Idle as i32;
        status.workers[0].round = 0;
        let value = to_json(&status);
        assert_eq!(value["current_round"], serde_json::Value::Null);
        assert_eq!(value["workers"][0]["state"], "idle");
        assert_eq!(value["workers"][0]["round"], serde_json::Value::Null);
        assert_eq!(value["privacy"]["epsilon_remaining"], 6.5);
        assert_eq!(duration_text(3725.0), "1h 02m");
        assert_eq!(duration_text(185.0), "3m 05s");
    }
}
