//! TLS end to end over real processes: certificates from `cohort-coordinator
//! dev-certs`, a pretraining job that completes over mutual TLS, and the
//! refusals: a client certificate from another CA, no client certificate, a
//! plaintext client, plaintext beyond loopback, and bad or expired session
//! tokens; federated client sites enrolled by their certificate's name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_proto::session::SessionAuth;
use cohort_proto::v1 as pb;
use cohort_tests::{binary, DataOptions, FederatedJob, Job, Proc, TINY_MODEL};
use pb::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(240);

/// Runs `dev-certs` into `<dir>/<name>` and returns that directory.
fn dev_certs(dir: &Path, name: &str, clients: usize) -> PathBuf {
    let out = dir.join(name);
    let args: Vec<String> = vec![
        "dev-certs".into(),
        "--out".into(),
        out.display().to_string(),
        "--clients".into(),
        clients.to_string(),
    ];
    let mut proc = Proc::spawn(
        &format!("dev-certs-{name}"),
        &binary("cohort-coordinator"),
        &args,
        dir,
    );
    proc.wait_success(Duration::from_secs(30));
    assert!(
        proc.output().contains("--tls-client-ca"),
        "{}",
        proc.report("printed no instructions")
    );
    out
}

/// A one-round job for one worker; `lease_ms` bounds how long a lost
/// worker keeps its lease.
fn tiny_job(lease_ms: u64) -> Job {
    let job = Job::new(DataOptions {
        context_length: 32,
        shard_tokens: 4096,
        val_every: 10,
    });
    job.write_job(&format!(
        r#"
name = "e2e-tls"
{TINY_MODEL}
[train]
rounds = 1
inner_steps = 2
micro_batch_size = 8
[cluster]
min_workers = 1
min_participants = 1
lease_ms = {lease_ms}
heartbeat_ms = 200
"#
    ));
    job
}

fn path(dir: &Path, file: &str) -> String {
    dir.join(file).display().to_string()
}

/// Starts the coordinator with TLS from `certs`, mutual when `mutual`.
fn start_tls_coordinator(job: &mut Job, certs: &Path, mutual: bool) {
    let (cert, key, ca) = (
        path(certs, "server.pem"),
        path(certs, "server.key"),
        path(certs, "ca.pem"),
    );
    let mut flags = vec!["--tls-cert", &cert, "--tls-key", &key];
    if mutual {
        flags.extend(["--tls-client-ca", &ca]);
    }
    job.start_coordinator_with(&flags);
}

/// Runs a worker expected to fail and returns its output.
fn failing_worker(job: &mut Job, coordinator: &str, extra: &[&str]) -> String {
    let mut args: Vec<String> = vec![
        "pretrain".into(),
        "--coordinator".into(),
        coordinator.into(),
        "--data-dir".into(),
        job.path("data").display().to_string(),
        "--device".into(),
        "cpu".into(),
        "--retry-attempts".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let name = format!("refused-{}", job.workers.len());
    let mut worker = Proc::spawn(&name, &binary("cohort-worker"), &args, job.dir.path());
    let status = worker.wait(Duration::from_secs(60));
    assert!(!status.success(), "{}", worker.report("was not refused"));
    let output = worker.output();
    job.workers.push(worker);
    output
}

#[test]
fn a_pretraining_job_completes_over_mutual_tls() {
    let mut job = tiny_job(10_000);
    let certs = dev_certs(job.dir.path(), "certs", 1);
    start_tls_coordinator(&mut job, &certs, true);
    assert!(job.addr.as_deref().unwrap().starts_with("https://"));
    let (ca, cert, key) = (
        path(&certs, "ca.pem"),
        path(&certs, "client-01.pem"),
        path(&certs, "client-01.key"),
    );
    job.start_worker(&["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key]);
    job.wait_all(TIMEOUT);
    let metrics = job.metrics();
    assert!(
        metrics.iter().any(|m| m["round"] == 1),
        "no committed round: {metrics:?}"
    );
    let log = job.coordinator.as_ref().unwrap().output();
    assert!(
        log.lines()
            .any(|l| l.contains("coordinator serving") && l.contains("mutual")),
        "{log}"
    );
}

#[test]
fn a_client_certificate_from_another_ca_or_none_is_refused() {
    let mut job = tiny_job(10_000);
    let certs = dev_certs(job.dir.path(), "certs", 1);
    let stranger = dev_certs(job.dir.path(), "stranger", 1);
    start_tls_coordinator(&mut job, &certs, true);
    let addr = job.addr.clone().unwrap();
    let ca = path(&certs, "ca.pem");
    // Trusts the right server, but its own certificate is from another CA.
    let (cert, key) = (
        path(&stranger, "client-01.pem"),
        path(&stranger, "client-01.key"),
    );
    let output = failing_worker(
        &mut job,
        &addr,
        &["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key],
    );
    // TLS 1.3 checks the client's certificate after the client has sent its
    // request: the refusal arrives as the server's alert or, when the
    // connection is already closed, as that; the worker's hint names the cause.
    let refused_client = |output: &str, alert: &str| {
        output.contains("coordinator unreachable")
            && output.contains("--tls-cert/--tls-key are given and signed by a CA it trusts")
            && (!output.contains("fatal alert") || output.contains(alert))
    };
    assert!(refused_client(&output, "UnknownCA"), "{output}");
    // No client certificate at all.
    let output = failing_worker(&mut job, &addr, &["--tls-ca", &ca]);
    assert!(refused_client(&output, "CertificateRequired"), "{output}");
    // A worker that trusts another CA refuses the coordinator itself.
    let other_ca = path(&stranger, "ca.pem");
    let output = failing_worker(&mut job, &addr, &["--tls-ca", &other_ca]);
    assert!(output.contains("UnknownIssuer"), "{output}");
    let coordinator = job.coordinator.as_mut().unwrap();
    assert!(
        coordinator.try_status().is_none(),
        "{}",
        coordinator.report("stopped")
    );
}

#[test]
fn a_plaintext_client_is_refused_by_a_tls_coordinator() {
    let mut job = tiny_job(10_000);
    let certs = dev_certs(job.dir.path(), "certs", 1);
    start_tls_coordinator(&mut job, &certs, false);
    let plaintext = job.addr.clone().unwrap().replace("https://", "http://");
    let output = failing_worker(&mut job, &plaintext, &[]);
    assert!(
        output.contains("coordinator unreachable") && output.contains("https://"),
        "{output}"
    );
}

#[test]
fn plaintext_beyond_loopback_is_refused_unless_asked_for() {
    let job = tiny_job(10_000);
    let args: Vec<String> = vec![
        "run".into(),
        "--job".into(),
        job.path("job.toml").display().to_string(),
        "--listen".into(),
        "0.0.0.0:0".into(),
    ];
    let mut coordinator = Proc::spawn(
        "plaintext-coordinator",
        &binary("cohort-coordinator"),
        &args,
        job.dir.path(),
    );
    let status = coordinator.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", coordinator.report("exit"));
    let output = coordinator.output();
    assert!(
        output.contains("not a loopback address") && output.contains("--insecure-plaintext"),
        "{output}"
    );
}

/// A raw gRPC client whose calls carry the session its `SessionAuth` holds.
type Client = CoordinatorClient<InterceptedService<Channel, SessionAuth>>;

/// A raw client over mutual TLS.
async fn tls_client(addr: &str, certs: &Path) -> (Client, SessionAuth) {
    let read = |file: &str| std::fs::read(certs.join(file)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read("client-01.pem"),
            read("client-01.key"),
        ));
    let channel = Endpoint::from_shared(addr.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let session = SessionAuth::default();
    (
        CoordinatorClient::with_interceptor(channel, session.clone()),
        session,
    )
}

async fn join(client: &mut Client) -> pb::JoinResponse {
    client
        .join(pb::JoinRequest {
            info: Some(pb::WorkerInfo {
                hostname: "probe".into(),
                device: "cpu".into(),
                device_memory_bytes: 0,
                role: pb::Role::Pretrain as i32,
            }),
            token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_expired_session_token_is_refused() {
    let mut job = tiny_job(1_000);
    let certs = dev_certs(job.dir.path(), "certs", 1);
    start_tls_coordinator(&mut job, &certs, true);
    let addr = job.addr.clone().unwrap();
    let (mut client, session) = tls_client(&addr, &certs).await;
    let joined = join(&mut client).await;
    let heartbeat = |worker_id: &str| pb::HeartbeatRequest {
        worker_id: worker_id.to_string(),
    };

    session.set(&joined.session_token).unwrap();
    client
        .heartbeat(heartbeat(&joined.worker_id))
        .await
        .unwrap();
    session.set(&"f".repeat(64)).unwrap();
    let refused = client
        .heartbeat(heartbeat(&joined.worker_id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("worker id does not match its session"),
        "{refused:?}"
    );
    session.set("").unwrap();
    let refused = client
        .heartbeat(heartbeat(&joined.worker_id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // The lease (1 s) runs out: the session ended with it.
    session.set(&joined.session_token).unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let expired = client
        .heartbeat(heartbeat(&joined.worker_id))
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::NotFound, "{expired:?}");
    assert!(expired.message().contains("lease expired"), "{expired:?}");
    // Joining again gives a new id; the old session does not speak for it.
    let again = join(&mut client).await;
    assert_ne!(again.worker_id, joined.worker_id);
    let refused = client
        .heartbeat(heartbeat(&again.worker_id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    session.set(&again.session_token).unwrap();
    client.heartbeat(heartbeat(&again.worker_id)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_needs_the_operator_token_and_a_worker_session_is_not_it() {
    let mut job = tiny_job(10_000);
    let certs = dev_certs(job.dir.path(), "certs", 1);
    let token_file = job.path("operator.token");
    std::fs::write(&token_file, "operator-secret\n").unwrap();
    let token_path = token_file.display().to_string();
    let (cert, key, ca) = (
        path(&certs, "server.pem"),
        path(&certs, "server.key"),
        path(&certs, "ca.pem"),
    );
    job.start_coordinator_with(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
        "--operator-token-file",
        &token_path,
    ]);
    let addr = job.addr.clone().unwrap();
    let (mut client, session) = tls_client(&addr, &certs).await;

    let refused = client.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // A worker's own session is no operator token.
    let joined = join(&mut client).await;
    session.set(&joined.session_token).unwrap();
    let refused = client.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("operator token"), "{refused:?}");
    session.set("operator-secret").unwrap();
    let status = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.job_name, "e2e-tls");

    // The status command, over mutual TLS with the operator token.
    let (client_cert, client_key) = (path(&certs, "client-01.pem"), path(&certs, "client-01.key"));
    let args: Vec<String> = [
        "status",
        "--coordinator",
        &addr,
        "--operator-token-file",
        &token_path,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &client_cert,
        "--tls-key",
        &client_key,
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut command = Proc::spawn(
        "status",
        &binary("cohort-coordinator"),
        &args,
        job.dir.path(),
    );
    command.wait_success(Duration::from_secs(30));
    assert!(
        command.output().contains("e2e-tls"),
        "{}",
        command.report("no job name")
    );
}

/// Two client sites enrolled by their certificates' names (`client-01`,
/// `client-02` from dev-certs) join a federated job over mutual TLS and
/// finish its rounds: the first by its certificate alone, the second with
/// its token too.
#[test]
fn federated_sites_enrolled_by_certificate_complete_their_rounds() {
    let mut fed = FederatedJob::new(2);
    let certs = dev_certs(fed.job.dir.path(), "certs", 2);
    let enrollment_path = fed.job.path("clients/enrollment.toml");
    let enrollment: toml::Value =
        toml::from_str(&std::fs::read_to_string(&enrollment_path).unwrap()).unwrap();
    let mut text = String::new();
    for (i, client) in enrollment["client"].as_array().unwrap().iter().enumerate() {
        text.push_str(&format!(
            "[[client]]\nname = {:?}\ncertificate_name = \"client-{:02}\"\n",
            client["name"].as_str().unwrap(),
            i + 1
        ));
        if i == 1 {
            let hash = client["token_sha256"].as_str().unwrap();
            text.push_str(&format!("token_sha256 = \"{hash}\"\n"));
        }
    }
    std::fs::write(&enrollment_path, text).unwrap();
    fed.write_job(
        r#"
name = "federated-by-certificate"
seed = 3
[model]
vocab_size = 256
context_length = 32
n_layer = 1
n_head = 2
d_model = 32
[train]
rounds = 2
inner_steps = 2
micro_batch_size = 4
[cluster]
min_workers = 2
min_participants = 2
lease_ms = 6000
heartbeat_ms = 500
round_deadline_ms = 60000
[federated]
trainable = "lora"
lora_rank = 2
sample_rate = 1.0
[federated.dp]
mode = "central"
clip_norm = 0.5
noise_multiplier = 1.0
epsilon = 50.0
delta = 1e-5
"#,
    );
    // Without --tls-client-ca the certificate-only site could never join:
    // the coordinator refuses to start, naming it.
    let args: Vec<String> = [
        "run",
        "--job",
        &fed.job.path("job.toml").display().to_string(),
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &path(&certs, "server.pem"),
        "--tls-key",
        &path(&certs, "server.key"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut refused = Proc::spawn(
        "no-client-ca",
        &binary("cohort-coordinator"),
        &args,
        fed.job.dir.path(),
    );
    let status = refused.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", refused.report("exit"));
    let output = refused.output();
    assert!(
        output.contains(&format!(
            "sites {} are enrolled by certificate name only",
            fed.clients[0]
        )) && output.contains("--tls-client-ca"),
        "{output}"
    );

    start_tls_coordinator(&mut fed.job, &certs, true);
    let addr = fed.job.addr.clone().unwrap();
    for (i, name) in fed.clients.clone().iter().enumerate() {
        let site = fed.job.path("clients").join(name);
        let client = format!("client-{:02}", i + 1);
        let mut args: Vec<String> = [
            "federated",
            "--coordinator",
            &addr,
            "--device",
            "cpu",
            "--threads",
            "1",
            "--tls-ca",
            &path(&certs, "ca.pem"),
            "--tls-cert",
            &path(&certs, &format!("{client}.pem")),
            "--tls-key",
            &path(&certs, &format!("{client}.key")),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["--data".to_string(), site.display().to_string()]);
        if i == 1 {
            args.extend([
                "--token-file".to_string(),
                site.join("token").display().to_string(),
            ]);
        }
        let proc = Proc::spawn(name, &binary("cohort-worker"), &args, fed.job.dir.path());
        fed.job.workers.push(proc);
    }
    fed.job.wait_all(Duration::from_secs(120));
    let rounds: Vec<serde_json::Value> = fed
        .job
        .metrics()
        .into_iter()
        .filter(|m| m.get("epsilon_spent").is_some())
        .collect();
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    assert!(rounds.iter().all(|r| r["participants"].as_u64() == Some(2)));
    for client in &fed.job.workers {
        assert!(
            client.output().contains("federated round pushed")
                && client.output().contains("enrolled_by"),
            "{}",
            client.report("never pushed")
        );
    }
    assert!(fed.job.workers[0].output().contains("certificate"));
}
