//! Federated client sites identified by their client certificate, over real
//! mutual TLS on 127.0.0.1:0 (certificates from `dev_certs::generate`):
//! admitted by certificate alone, certificate and matching token, another
//! site's token refused, an unenrolled certificate refused, a session that
//! another site's certificate replays refused on every call, and a job whose
//! enrollment file is malformed never starts.

#[path = "support/session_client.rs"]
#[allow(dead_code)]
mod session_client;

use std::path::Path;
use std::time::Duration;

use cohort_coordinator::config::{JobFile, JobPlan};
use cohort_coordinator::dev_certs::{self, DevCerts, DevCertsOptions};
use cohort_coordinator::server::{self, RunOptions};
use cohort_coordinator::tls::{ServerTls, TlsFiles};
use cohort_proto::v1 as pb;
use futures::StreamExt;
use session_client::Client;
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// Every test is over well within this.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Sites: `alpha` by certificate `client-01` and token `token-alpha`;
/// `bravo` by certificate `client-02` alone (written `CLIENT-02`: case is
/// ignored); `charlie` by token `token-charlie` alone. `client-03`'s
/// certificate is from the same CA but enrolls nobody.
fn enrollment() -> String {
    format!(
        "[[client]]\nname = \"alpha\"\ntoken_sha256 = \"{}\"\ncertificate_name = \"client-01\"\n\
         [[client]]\nname = \"bravo\"\ncertificate_name = \"CLIENT-02\"\n\
         [[client]]\nname = \"charlie\"\ntoken_sha256 = \"{}\"\n",
        sha256_hex("token-alpha"),
        sha256_hex("token-charlie"),
    )
}

fn plan(dir: &Path, enrollment: &str) -> Result<JobPlan, String> {
    std::fs::write(dir.join("enrollment.toml"), enrollment).unwrap();
    let toml = r#"
name = "federated-mtls-test"
run_dir = "run"
seed = 5
[model]
vocab_size = 256
context_length = 8
n_layer = 1
n_head = 1
d_model = 8
[train]
rounds = 2
inner_steps = 1
[cluster]
min_workers = 3
min_participants = 3
lease_ms = 30000
heartbeat_ms = 1000
max_chunk_bytes = 1024
chunk_timeout_ms = 2000
[federated]
enrollment = "enrollment.toml"
trainable = "lora"
lora_rank = 2
sample_rate = 1.0
[federated.dp]
mode = "central"
clip_norm = 1.0
noise_multiplier = 1.0
epsilon = 100.0
delta = 1e-5
"#;
    let plan = JobFile::parse(toml, &dir.join("job.toml"))
        .map_err(|e| e.to_string())?
        .validate()
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&plan.run_dir).unwrap();
    Ok(plan)
}

/// A coordinator over mutual TLS; dropping it stops the server.
struct Running {
    addr: String,
    certs: DevCerts,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs::generate(&DevCertsOptions {
        out: dir.path().join("certs"),
        clients: 3,
        hosts: vec!["localhost".into(), "127.0.0.1".into()],
        valid_days: 1,
    })
    .unwrap();
    let plan = plan(dir.path(), &enrollment()).unwrap();
    let tls = ServerTls::load(&TlsFiles {
        cert: certs.server_cert.clone(),
        key: certs.server_key.clone(),
        client_ca: Some(certs.ca_cert.clone()),
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("https://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let options = RunOptions {
            tls: Some(tls),
            ..RunOptions::default()
        };
        server::run_with_options(
            listener,
            plan,
            async {
                let _ = stopped.await;
            },
            options,
        )
        .await
        .expect("server ran")
    });
    Running {
        addr,
        certs,
        _dir: dir,
        _stop: stop,
    }
}

impl Running {
    /// A client presenting the certificate of `client-0N` (N from 1).
    async fn client(&self, n: usize) -> Client {
        let (_, cert, key) = &self.certs.clients[n - 1];
        let read = |path: &Path| std::fs::read(path).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.certs.ca_cert)))
            .identity(Identity::from_pem(read(cert), read(key)));
        let channel = Endpoint::from_shared(self.addr.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        Client::over(channel)
    }
}

async fn join(c: &mut Client, token: &str) -> Result<String, tonic::Status> {
    let response = c
        .join(pb::JoinRequest {
            info: Some(pb::WorkerInfo {
                hostname: "site".into(),
                device: "cpu".into(),
                device_memory_bytes: 0,
                role: pb::Role::Federated as i32,
            }),
            token: token.into(),
        })
        .await?
        .into_inner();
    c.remember(&response);
    Ok(response.worker_id)
}

async fn heartbeat(c: &mut Client, worker: &str) -> Result<(), tonic::Status> {
    c.heartbeat(pb::HeartbeatRequest {
        worker_id: worker.into(),
    })
    .await
    .map(|_| ())
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    match result {
        Ok(ok) => panic!("expected {code:?} ({needle}), got {ok:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "{:?} does not mention {needle:?}",
                status.message()
            );
        }
    }
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_joins_by_its_certificate_with_no_token_or_its_own() {
    bounded(async {
        let running = start().await;
        // bravo: certificate alone.
        let mut bravo = running.client(2).await;
        let worker = join(&mut bravo, "").await.unwrap();
        heartbeat(&mut bravo, &worker).await.unwrap();
        bravo
            .next_task(pb::NextTaskRequest {
                worker_id: worker.clone(),
            })
            .await
            .unwrap();
        // alpha: certificate alone, and certificate with its own token.
        let mut alpha = running.client(1).await;
        let first = join(&mut alpha, "").await.unwrap();
        heartbeat(&mut alpha, &first).await.unwrap();
        let second = join(&mut alpha, "token-alpha\n").await.unwrap();
        heartbeat(&mut alpha, &second).await.unwrap();
        // The unenrolled certificate joins as charlie by charlie's token,
        // as without certificate identities.
        let mut stranger = running.client(3).await;
        let charlie = join(&mut stranger, "token-charlie").await.unwrap();
        heartbeat(&mut stranger, &charlie).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_and_a_token_of_different_sites_are_refused() {
    bounded(async {
        let running = start().await;
        let mut alpha = running.client(1).await;
        // alpha's certificate, charlie's token.
        assert_refused(
            join(&mut alpha, "token-charlie").await,
            Code::PermissionDenied,
            "names site \"alpha\" but the enrollment token is site \"charlie\"'s",
        );
        // alpha's certificate, a token nobody enrolled.
        assert_refused(
            join(&mut alpha, "token-nobody").await,
            Code::PermissionDenied,
            "unknown enrollment token",
        );
        // bravo's certificate, alpha's token.
        let mut bravo = running.client(2).await;
        assert_refused(
            join(&mut bravo, "token-alpha").await,
            Code::PermissionDenied,
            "site \"bravo\"",
        );
        // An unenrolled certificate with the token of alpha, which is
        // enrolled by certificate: the token alone does not speak for it.
        let mut stranger = running.client(3).await;
        assert_refused(
            join(&mut stranger, "token-alpha").await,
            Code::PermissionDenied,
            "enrolled with certificate_name \"client-01\"",
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unenrolled_certificate_without_a_token_is_refused() {
    bounded(async {
        let running = start().await;
        let mut stranger = running.client(3).await;
        assert_refused(
            join(&mut stranger, "").await,
            Code::Unauthenticated,
            "(CN/DNS names \"client-03\") names no enrolled site and no enrollment token was presented",
        );
        assert_refused(
            join(&mut stranger, "token-nobody").await,
            Code::Unauthenticated,
            "unknown enrollment token",
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sites_certificate_cannot_replay_a_session() {
    bounded(async {
        let running = start().await;
        let mut bravo = running.client(2).await;
        let worker = join(&mut bravo, "").await.unwrap();
        let token = bravo.session_token().to_string();
        // alpha, a valid enrolled site with its own certificate, replays
        // bravo's worker id and session token on every call.
        let mut alpha = running.client(1).await;
        alpha.use_session(&token);
        let needle = "this call came with the client certificate of site \"alpha\"";
        assert_refused(
            heartbeat(&mut alpha, &worker).await,
            Code::PermissionDenied,
            needle,
        );
        assert_refused(
            alpha
                .next_task(pb::NextTaskRequest {
                    worker_id: worker.clone(),
                })
                .await,
            Code::PermissionDenied,
            needle,
        );
        for base in [false, true] {
            let pulled = match alpha
                .pull_params(pb::PullParamsRequest {
                    worker_id: worker.clone(),
                    version: 0,
                    base,
                })
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    stream
                        .next()
                        .await
                        .expect("a chunk or an error")
                        .map(|_| ())
                }
                Err(status) => Err(status),
            };
            assert_refused(pulled, Code::PermissionDenied, needle);
        }
        let header = pb::UpdateChunk {
            kind: Some(pb::update_chunk::Kind::Header(pb::PushHeader {
                worker_id: worker.clone(),
                dtype: pb::DType::DtypeF32 as i32,
                stats: Some(pb::TrainStats::default()),
                ..Default::default()
            })),
        };
        assert_refused(
            alpha.push_update(tokio_stream::iter(vec![header])).await,
            Code::PermissionDenied,
            needle,
        );
        assert_refused(
            alpha
                .report_eval(pb::ReportEvalRequest {
                    worker_id: worker.clone(),
                    loss: 1.0,
                    tokens: 1,
                    ..Default::default()
                })
                .await,
            Code::PermissionDenied,
            needle,
        );
        // The unenrolled certificate cannot replay it either.
        let mut stranger = running.client(3).await;
        stranger.use_session(&token);
        assert_refused(
            heartbeat(&mut stranger, &worker).await,
            Code::PermissionDenied,
            "naming no enrolled site",
        );
        // bravo itself still speaks for its session.
        heartbeat(&mut bravo, &worker).await.unwrap();
    })
    .await;
}

#[test]
fn a_malformed_enrollment_keeps_the_job_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let token = sha256_hex("t");
    for (enrollment, needle) in [
        (
            "[[client]]\nname = \"a\"\ncertificate_name = \"client-01\"\n\
             [[client]]\nname = \"b\"\ncertificate_name = \"Client-01\"\n"
                .to_string(),
            "clients \"a\" and \"b\" have the same certificate_name",
        ),
        (
            "[[client]]\nname = \"a\"\n".to_string(),
            "has neither token_sha256 nor certificate_name",
        ),
        (
            format!(
                "[[client]]\nname = \"a\"\ncertificate_name = \"x\"\n\
                 [[client]]\nname = \"a\"\ntoken_sha256 = \"{token}\"\n"
            ),
            "client name \"a\" is enrolled twice",
        ),
        (
            "[[client]]\nname = \"a\"\ncertificate_name = \"CN=client-01, O=x\"\n".to_string(),
            "without spaces",
        ),
    ] {
        let error = plan(dir.path(), &enrollment).unwrap_err();
        assert!(
            error.contains("federated.enrollment") && error.contains(needle),
            "{error} does not mention {needle}"
        );
    }
    // Three sites, whatever they are enrolled by, count towards min_workers.
    if let Err(error) = plan(dir.path(), &enrollment()) {
        panic!("a valid enrollment was refused: {error}");
    }
}
