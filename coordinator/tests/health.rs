//! The gRPC health service that Kubernetes probes: SERVING while a job runs,
//! NOT_SERVING as soon as shutdown starts, then the server stops. With a
//! health listener the same statuses are served in plaintext on a second
//! port while the main port speaks only TLS.

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

#[tokio::test]
async fn plaintext_health_port_beside_a_tls_main_port_shares_its_statuses() {
    use cohort_coordinator::dev_certs::{self, DevCertsOptions};
    use cohort_coordinator::tls::{ServerTls, TlsFiles};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    const LIMIT: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let plan = waiting_plan(dir.path());
    let certs = dev_certs::generate(&DevCertsOptions {
        out: dir.path().join("certs"),
        clients: 0,
        hosts: vec!["localhost".into(), "127.0.0.1".into()],
        valid_days: 1,
    })
    .unwrap();
    let tls = ServerTls::load(&TlsFiles {
        cert: certs.server_cert.clone(),
        key: certs.server_key.clone(),
        client_ca: None,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let main_addr = listener.local_addr().unwrap();
    let health_addr = format!("http://{}", health_listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = server::RunOptions {
        tls: Some(tls),
        health_listener: Some(health_listener),
        ..server::RunOptions::default()
    };
    let server = tokio::spawn(server::run_with_options(
        listener,
        plan,
        async {
            let _ = stopped.await;
        },
        options,
    ));

    // The health port answers in plaintext, for both names.
    let channel = tokio::time::timeout(
        LIMIT,
        Endpoint::from_shared(health_addr.clone())
            .unwrap()
            .connect(),
    )
    .await
    .expect("health port connects in time")
    .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", COORDINATOR_SERVICE] {
        assert_eq!(
            status_of(&mut health, service).await,
            ServingStatus::Serving,
            "health port, service {service:?}"
        );
    }
    // ... and serves nothing but health.
    let mut coordinator = cohort_proto::v1::coordinator_client::CoordinatorClient::new(channel);
    let refused = tokio::time::timeout(
        LIMIT,
        coordinator.status(cohort_proto::v1::StatusRequest {}),
    )
    .await
    .expect("answered in time")
    .expect_err("the health port does not serve the coordinator");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");

    // The main port refuses plaintext ...
    let plaintext = async {
        let channel = Endpoint::from_shared(format!("http://{main_addr}"))
            .unwrap()
            .connect()
            .await?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(Into::into)
    };
    let plaintext: Result<_, Box<dyn std::error::Error + Send + Sync>> =
        tokio::time::timeout(LIMIT, plaintext)
            .await
            .expect("a plaintext attempt fails in time");
    assert!(
        plaintext.is_err(),
        "the TLS port answered plaintext: {plaintext:?}"
    );
    // ... and answers over TLS with the same statuses.
    let tls_channel = tokio::time::timeout(
        LIMIT,
        Endpoint::from_shared(format!("https://localhost:{}", main_addr.port()))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(
                        std::fs::read(&certs.ca_cert).unwrap(),
                    ))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect(),
    )
    .await
    .expect("TLS connects in time")
    .unwrap();
    let mut tls_health = HealthClient::new(tls_channel);
    assert_eq!(status_of(&mut tls_health, "").await, ServingStatus::Serving);

    // Watching on the health port sees NOT_SERVING once shutdown starts.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: COORDINATOR_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.expect("a first status").unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    stop.send(()).unwrap();
    let next = tokio::time::timeout(LIMIT, watch.next())
        .await
        .expect("a status change within 10 s of shutdown")
        .expect("the watch reports NOT_SERVING before it ends")
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);

    let outcome = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the server stops within 30 s of shutdown")
        .unwrap()
        .expect("the server ran");
    assert!(outcome.checkpoint.is_some(), "shutdown writes a checkpoint");
    // The health port closes with the server.
    let after = tokio::time::timeout(LIMIT, Endpoint::from_shared(health_addr).unwrap().connect())
        .await
        .expect("a closed port fails in time");
    assert!(after.is_err(), "the health port outlived the server");
}
