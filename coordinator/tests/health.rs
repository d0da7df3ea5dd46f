//! The gRPC health service that Kubernetes probes: SERVING while a job runs,
//! NOT_SERVING as soon as shutdown starts, then the server stops.

use std::path::Path;
use std::time::Duration;

use cohort_coordinator::config::{JobFile, JobPlan};
use cohort_coordinator::data::{prepare, PrepareOptions, TokenizerKind};
use cohort_coordinator::server;
use futures::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const COORDINATOR_SERVICE: &str = "cohort.v1.Coordinator";

/// A tiny job that waits for two workers, so it runs until told to stop.
fn waiting_plan(dir: &Path) -> JobPlan {
    let text: String = (0..200)
        .map(|i| format!("sentence number {i} of the health corpus. "))
        .collect();
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    prepare(&PrepareOptions {
        inputs: vec![dir.join("corpus.txt")],
        output: dir.join("data"),
        tokenizer: TokenizerKind::Byte,
        context_length: 8,
        shard_tokens: 256,
        val_every: 4,
        show_progress: false,
    })
    .unwrap();
    let toml = r#"
name = "health-test"
data_dir = "data"
run_dir = "run"
seed = 5
[model]
vocab_size = 256
context_length = 8
n_layer = 1
n_head = 1
d_model = 4
[train]
rounds = 1
inner_steps = 1
[outer]
kind = "average"
[cluster]
min_workers = 2
min_participants = 2
"#;
    JobFile::parse(toml, &dir.join("job.toml"))
        .unwrap()
        .validate()
        .unwrap()
}

async fn status_of(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> ServingStatus {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("health check of {service:?} failed: {e}"))
        .into_inner()
        .status()
}

#[tokio::test]
async fn health_is_serving_while_running_and_not_serving_once_shutdown_starts() {
    let dir = tempfile::tempdir().unwrap();
    let plan = waiting_plan(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(listener, plan, async {
        let _ = stopped.await;
    }));

    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    for service in ["", COORDINATOR_SERVICE] {
        assert_eq!(
            status_of(&mut client, service).await,
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
    let unknown = client
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unregistered service is not found");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Watch both names, as a load balancer would, before shutdown starts.
    let mut watches = Vec::new();
    for service in ["", COORDINATOR_SERVICE] {
        let mut watch = client
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.next().await.expect("a first status").unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
        watches.push((service, watch));
    }

    stop.send(()).unwrap();
    for (service, mut watch) in watches {
        let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a status change within 10 s of shutdown")
            .expect("the watch reports NOT_SERVING before it ends")
            .unwrap();
        assert_eq!(next.status(), ServingStatus::NotServing, "{service:?}");
        // Then the stream ends, so it does not hold the graceful shutdown open.
        let end = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the watch ends within 10 s of shutdown");
        assert!(end.is_none(), "{service:?}: {end:?}");
    }

    let outcome = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the server stops within 30 s of shutdown")
        .unwrap()
        .expect("the server ran");
    assert!(!outcome.finished, "the job was stopped, not finished");
    assert!(outcome.checkpoint.is_some(), "shutdown writes a checkpoint");
}
