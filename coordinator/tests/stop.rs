//! The operator's Stop RPC: it ends a run as SIGTERM does (health
//! NOT_SERVING, the current version checkpointed) and tells every worker the
//! job is done with the operator's reason; only the operator may call it.
//! In-process first, then `cohort-coordinator stop` against a real
//! coordinator process, which exits 0.

#[path = "support/grpc_edge.rs"]
mod grpc_edge;
#[path = "support/session_client.rs"]
mod session_client;
#[path = "support/tiny_job.rs"]
#[allow(dead_code)] // the metrics address is for prometheus.rs
mod tiny_job;

use std::path::Path;
use std::time::Duration;

use cohort_coordinator::actor::JobOutcome;
use cohort_coordinator::config::JobPlan;
use cohort_coordinator::server::{self, RunOptions};
use cohort_coordinator::service::OperatorToken;
use cohort_core::params::ParamLayout;
use cohort_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use grpc_edge::assert_refused;
use session_client::Client;
use tiny_job::{plan, prepare_job, Worker};

const OPERATOR_TOKEN: &str = "operator-token-for-the-stop-tests";
const LIMIT: Duration = Duration::from_secs(20);

/// Serves `plan` in-process with the operator token set; never signalled,
/// so only Stop (or the job's end) ends it.
async fn start_with_operator(
    plan: JobPlan,
) -> (
    String,
    tokio::task::JoinHandle<JobOutcome>,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
    let outcome = tokio::spawn(async move {
        let options = RunOptions {
            operator_token: OperatorToken::new(OPERATOR_TOKEN),
            ..RunOptions::default()
        };
        server::run_with_options(
            listener,
            plan,
            async {
                let _ = signalled.await;
            },
            options,
        )
        .await
        .expect("server ran")
    });
    (addr, outcome, signal)
}

async fn next_task(worker: &mut Worker) -> pb::next_task_response::Task {
    tokio::time::timeout(
        LIMIT,
        worker.client.next_task(pb::NextTaskRequest {
            worker_id: worker.id.clone(),
        }),
    )
    .await
    .expect("next task in time")
    .unwrap()
    .into_inner()
    .task
    .unwrap()
}

async fn stop(client: &mut Client, reason: &str) -> Result<pb::StopResponse, tonic::Status> {
    tokio::time::timeout(
        LIMIT,
        client.stop(pb::StopRequest {
            reason: reason.into(),
        }),
    )
    .await
    .expect("Stop answers in time")
    .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn stop_checkpoints_tells_workers_done_and_ends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), 5);
    let run_dir = plan.run_dir.clone();
    let layout = ParamLayout::new(&plan.engine.tensors);
    let (addr, outcome, _signal) = start_with_operator(plan.clone()).await;
    let mut a = Worker::join(&addr, "host-a").await;
    let mut b = Worker::join(&addr, "host-b").await;
    // Round 1 commits; round 2 is open when the operator stops the job.
    for worker in [&mut a, &mut b] {
        worker.train_task().await;
    }
    for worker in [&mut a, &mut b] {
        worker.pull(0).await;
        worker.push(&layout, 1, 0, 0.1).await.unwrap();
    }
    assert_eq!(a.train_task().await, (2, 1));

    // Nobody but the operator may stop it.
    let mut anonymous = Client::connect(&addr).await;
    assert_refused(
        stop(&mut anonymous, "no token").await,
        Code::Unauthenticated,
        "operator token",
    );
    anonymous.use_session("not-the-operator-token");
    assert_refused(
        stop(&mut anonymous, "wrong token").await,
        Code::PermissionDenied,
        "operator token",
    );
    assert_refused(
        stop(&mut a.client, "a worker's session").await,
        Code::PermissionDenied,
        "operator token",
    );
    let channel = tonic::transport::Endpoint::from_shared(addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let serving = || HealthCheckRequest {
        service: String::new(),
    };
    assert_eq!(
        health.check(serving()).await.unwrap().into_inner().status(),
        ServingStatus::Serving,
        "refused stops change nothing"
    );

    let mut operator = Client::connect(&addr).await;
    operator.use_session(OPERATOR_TOKEN);
    let answer = stop(&mut operator, "maintenance window").await.unwrap();
    assert_eq!(answer.phase, "training");
    assert_eq!(answer.committed_rounds, 1);
    assert_eq!(
        health.check(serving()).await.unwrap().into_inner().status(),
        ServingStatus::NotServing,
        "health turns NOT_SERVING when Stop is accepted"
    );

    // Both workers, the one training round 2 and the idle one, are told.
    for worker in [&mut a, &mut b] {
        match next_task(worker).await {
            pb::next_task_response::Task::Done(done) => assert_eq!(
                done.reason, "stopped by an operator: maintenance window",
                "{}",
                worker.id
            ),
            other => panic!("{}: expected Done, got {other:?}", worker.id),
        }
    }

    let outcome = tokio::time::timeout(LIMIT, outcome)
        .await
        .expect("the run ends once its workers are told")
        .unwrap();
    assert!(!outcome.finished, "stopped, not finished: {outcome:?}");
    assert_eq!(outcome.version.0, 1);
    assert_eq!(
        outcome.stopped_by_operator.as_deref(),
        Some("stopped by an operator: maintenance window")
    );
    let checkpoint = outcome.checkpoint.expect("Stop writes a checkpoint");
    assert!(checkpoint.exists(), "{}", checkpoint.display());
    assert_eq!(checkpoint.parent(), Some(run_dir.as_path()));

    // Running the job again resumes from that checkpoint, training.
    let running = tiny_job::start(plan).await;
    let mut status_client = Client::connect(&running.addr).await;
    let status = tokio::time::timeout(LIMIT, status_client.status(pb::StatusRequest {}))
        .await
        .expect("Status in time")
        .unwrap()
        .into_inner();
    assert_eq!(status.phase, "training", "{status:?}");
    assert_eq!((status.version, status.committed_rounds), (1, 1));
    drop(running.stop);
    tokio::time::timeout(LIMIT, running.outcome)
        .await
        .expect("stopped in time")
        .unwrap();
}

/// Waits for the coordinator process to write its address file.
async fn address_of(addr_file: &Path, child: &mut tokio::process::Child) -> String {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(addr_file) {
            if !text.trim().is_empty() {
                return format!("http://{}", text.trim());
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the coordinator exited early with {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no address file within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn stop_command_makes_a_coordinator_process_checkpoint_and_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("job.toml"), prepare_job(dir.path(), 5)).unwrap();
    let token_file = dir.path().join("operator-token");
    std::fs::write(&token_file, format!("{OPERATOR_TOKEN}\n")).unwrap();
    let addr_file = dir.path().join("coordinator.addr");
    let log_file = dir.path().join("coordinator.log");
    let binary = env!("CARGO_BIN_EXE_cohort-coordinator");
    let mut coordinator = tokio::process::Command::new(binary)
        .arg("run")
        .arg("--job")
        .arg(dir.path().join("job.toml"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--addr-file")
        .arg(&addr_file)
        .arg("--operator-token-file")
        .arg(&token_file)
        .env_remove("COHORT_HEALTH_LISTEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = address_of(&addr_file, &mut coordinator).await;
    let mut worker = Worker::join(&addr, "host-a").await;

    let stop = |token: Option<&Path>| {
        let mut command = tokio::process::Command::new(binary);
        command
            .args([
                "stop",
                "--coordinator",
                &addr,
                "--reason",
                "end of the test",
            ])
            .env_remove("COHORT_OPERATOR_TOKEN_FILE")
            .kill_on_drop(true);
        if let Some(token) = token {
            command.arg("--operator-token-file").arg(token);
        }
        command.output()
    };
    // Without the token the coordinator refuses, and the command fails.
    let refused = tokio::time::timeout(LIMIT, stop(None))
        .await
        .expect("stop in time")
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("refused Stop"), "{stderr}");

    let output = tokio::time::timeout(LIMIT, stop(Some(&token_file)))
        .await
        .expect("stop in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stop exited with {}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("training after 0 committed rounds"),
        "{stdout}"
    );

    match next_task(&mut worker).await {
        pb::next_task_response::Task::Done(done) => {
            assert!(done.reason.contains("end of the test"), "{}", done.reason)
        }
        other => panic!("expected Done, got {other:?}"),
    }
    let status = tokio::time::timeout(LIMIT, coordinator.wait())
        .await
        .expect("the coordinator exits once its worker is told")
        .unwrap();
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        status.success(),
        "the coordinator exited with {status}:\n{log}"
    );
    assert!(
        log.contains("end of the test"),
        "the reason is logged:\n{log}"
    );
    assert!(
        dir.path()
            .join("run/checkpoint-000000.safetensors")
            .exists(),
        "{log}"
    );
    assert!(dir.path().join("run/cohort.sqlite").exists());
}
