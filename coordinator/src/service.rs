//! The gRPC service: thin adapters that decode and validate a request, make
//! one call into the engine, and encode the answer.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use cohort_core::codec::{DType, FiniteValues};
use cohort_core::engine::EngineError;
use cohort_core::ids::{SessionDigest, Version, WorkerId};
use cohort_core::params::ParamLayout;
use cohort_proto::session::bearer_token;
use cohort_proto::v1 as pb;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};
use tracing::{instrument, warn};

use crate::actor::EngineHandle;
use crate::config::JobPlan;
use crate::convert::{
    dtype_from_proto, job_spec_to_proto, push_header_from_proto, status_from_codec,
    status_from_engine, status_to_proto, task_to_proto, worker_id, worker_info_from_proto,
};
use crate::identity::{self, CertificateSite};
use crate::observe::Observer;

/// The SHA-256 of the operator's bearer token (the token itself is not kept).
#[derive(Clone, Debug)]
pub struct OperatorToken(SessionDigest);

impl OperatorToken {
    /// The digest of `token` with surrounding whitespace removed; `None` when
    /// that leaves nothing.
    pub fn new(token: &str) -> Option<OperatorToken> {
        let token = token.trim();
        (!token.is_empty()).then(|| OperatorToken(session_digest(token)))
    }
}

pub struct CoordinatorService {
    engine: EngineHandle,
    plan: Arc<JobPlan>,
    job_spec: pb::JobSpec,
    layout: Arc<ParamLayout>,
    /// Pushes fold one at a time (see `cohort_core::aggregate`).
    fold_permit: Arc<Semaphore>,
    /// Pulls that stream at once. Each streaming pull holds up to the
    /// client's receive window of encoded chunks in the coordinator; without a
    /// bound, 200 simultaneous pulls held O(workers x parameters).
    pull_permits: Arc<Semaphore>,
    /// The frozen base model of a LoRA job, with its layout.
    base: Option<(Arc<ParamLayout>, Arc<Vec<f32>>)>,
    /// The operator token's digest: when set, only its bearer may call Status.
    operator: Option<OperatorToken>,
    /// The run's progress as the actor records it (for Status).
    observer: Arc<Observer>,
    /// The health statuses the server reports; Stop turns them NOT_SERVING.
    health: Option<tonic_health::server::HealthReporter>,
}

/// The longest reason Stop accepts, in bytes.
pub const MAX_STOP_REASON_BYTES: usize = 1024;

/// What workers are told, and the log says, when an operator stops the job.
fn stop_reason(given: &str) -> Result<String, Status> {
    if given.len() > MAX_STOP_REASON_BYTES {
        return Err(Status::invalid_argument(format!(
            "the stop reason is {} bytes; at most {MAX_STOP_REASON_BYTES}",
            given.len()
        )));
    }
    // One line in logs and in the workers' Done.
    let given: String = given
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Ok(if given.is_empty() {
        "stopped by an operator".to_string()
    } else {
        format!("stopped by an operator: {given}")
    })
}

/// How many pulls stream at the same time; the others wait their turn.
pub const CONCURRENT_PULLS: usize = 4;

impl CoordinatorService {
    pub fn new(
        engine: EngineHandle,
        plan: Arc<JobPlan>,
        observer: Arc<Observer>,
    ) -> CoordinatorService {
        let base = plan.federated.as_ref().and_then(|f| {
            f.base_params.as_ref().map(|params| {
                (
                    Arc::new(ParamLayout::new(&f.base_tensors)),
                    Arc::clone(&params.0),
                )
            })
        });
        CoordinatorService {
            job_spec: job_spec_to_proto(&plan),
            layout: Arc::new(ParamLayout::new(&plan.engine.tensors)),
            engine,
            plan,
            fold_permit: Arc::new(Semaphore::new(1)),
            pull_permits: Arc::new(Semaphore::new(CONCURRENT_PULLS)),
            base,
            observer,
            operator: None,
            health: None,
        }
    }

    /// The reporter of the server's health service, so Stop can report
    /// NOT_SERVING before it checkpoints, as a shutdown does.
    pub fn with_health(
        mut self,
        health: tonic_health::server::HealthReporter,
    ) -> CoordinatorService {
        self.health = Some(health);
        self
    }

    /// Operator calls (Status, Stop) need `token` from now on; worker sessions and
    /// enrollment tokens do not pass.
    pub fn with_operator_token(mut self, token: Option<OperatorToken>) -> CoordinatorService {
        self.operator = token;
        self
    }

    /// Admits an operator call: anyone when no operator token is set, else
    /// only its bearer.
    fn admit_operator<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(operator) = &self.operator else {
            return Ok(());
        };
        match presented_session(request) {
            Some(presented) if presented == operator.0 => Ok(()),
            Some(_) => Err(Status::permission_denied(
                "operator calls need the operator token (--operator-token-file); this token is not it",
            )),
            None => Err(Status::unauthenticated(
                "operator calls need the operator token: authorization: Bearer <token>",
            )),
        }
    }

    async fn engine_call<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(
                &mut cohort_core::engine::RoundEngine,
                std::time::Instant,
            ) -> Result<T, EngineError>
            + Send
            + 'static,
    {
        self.engine
            .call(f)
            .await?
            .map_err(|e| status_from_engine(&e))
    }

    /// Checks that a joining process may take part: pretraining workers in a
    /// pretraining job; in a federated job only enrolled client sites,
    /// identified by their token or the certificate they presented (see
    /// [`identity::admit_site`]), whose identity (the enrolled name) is
    /// returned.
    fn admit(
        &self,
        role: i32,
        token: &str,
        certificate: &CertificateSite,
    ) -> Result<Option<String>, Status> {
        let federated_role = role == pb::Role::Federated as i32;
        let Some(federated) = &self.plan.federated else {
            if federated_role {
                return Err(Status::permission_denied(
                    "this coordinator runs a pretraining job; federated clients cannot join it",
                ));
            }
            return Ok(None);
        };
        if !federated_role {
            return Err(Status::permission_denied(
                "this coordinator runs a federated job: join as a federated client (cohort-worker federated) with an enrollment token or an enrolled client certificate",
            ));
        }
        identity::admit_site(
            &federated.clients,
            &federated.certificate_names,
            certificate,
            token,
        )
        .map(Some)
    }

    /// What the client certificate of `request` says about the caller. Only
    /// a federated job's client sites are identified by certificate; for
    /// pretraining and without mutual TLS this is [`CertificateSite::Absent`].
    fn certificate_site<T>(&self, request: &Request<T>) -> Result<CertificateSite, Status> {
        let Some(federated) = &self.plan.federated else {
            return Ok(CertificateSite::Absent);
        };
        let Some(certificates) = request.peer_certs() else {
            return Ok(CertificateSite::Absent);
        };
        let Some(leaf) = certificates.first() else {
            return Ok(CertificateSite::Absent);
        };
        identity::site_of_certificate(leaf.as_ref(), &federated.certificate_names)
    }

    /// The session a worker call presents, bound to the site its certificate
    /// names (see [`identity::session_digest`]).
    fn worker_session<T>(&self, request: &Request<T>) -> Result<WorkerSession, Status> {
        let certificate = self.certificate_site(request)?;
        let digest = bearer_token(request.metadata())
            .map(|token| identity::session_digest(token, certificate.site()));
        Ok(WorkerSession {
            digest,
            certificate,
        })
    }

    /// Streams the frozen base model under a federated job's LoRA adapters.
    async fn pull_base(
        &self,
        worker: WorkerId,
        session: WorkerSession,
    ) -> Result<Response<PullStream>, Status> {
        let Some((layout, params)) = &self.base else {
            return Err(Status::failed_precondition(
                "this job has no frozen base model (it trains every parameter)",
            ));
        };
        // Only members may pull, and pulling renews the lease.
        let digest = session.digest;
        self.engine_call(move |engine, now| {
            engine.authenticate(worker, digest.as_ref())?;
            engine.heartbeat(worker, now)
        })
        .await
        .map_err(|status| session.explain(worker, status))?;
        let permit = Arc::clone(&self.pull_permits)
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        let chunks = param_chunks(
            layout,
            Arc::clone(params),
            Version(0),
            self.plan.max_chunk_bytes as usize,
        );
        Ok(Response::new(Box::pin(chunks.map(move |chunk| {
            let _streaming = &permit;
            chunk
        }))))
    }

    async fn abort_push(&self, worker: WorkerId, reason: EngineError) {
        let _ = self
            .engine
            .call(move |engine, _| engine.abort_push(worker, &reason))
            .await;
    }

    /// Receives a push's chunks and folds them; the caller aborts the push on error.
    async fn receive_push(
        &self,
        worker: WorkerId,
        dtype: DType,
        stream: &mut Streaming<pb::UpdateChunk>,
    ) -> Result<pb::PushUpdateResponse, Status> {
        let chunk_timeout = self.plan.chunk_timeout;
        let mut values = Vec::new();
        loop {
            let message = match tokio::time::timeout(chunk_timeout, stream.next()).await {
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "no chunk for {} ms; push discarded",
                        chunk_timeout.as_millis()
                    )))
                }
                Ok(None) => break,
                Ok(Some(Err(status))) => return Err(status),
                Ok(Some(Ok(message))) => message,
            };
            let chunk = match message.kind {
                Some(pb::update_chunk::Kind::Chunk(chunk)) => chunk,
                Some(pb::update_chunk::Kind::Header(_)) => {
                    return Err(Status::invalid_argument("second header inside a push"))
                }
                None => return Err(Status::invalid_argument("empty update message")),
            };
            let wire_bytes = chunk.data.len();
            let finite = FiniteValues::decode(dtype, &chunk.data, std::mem::take(&mut values))
                .map_err(|e| status_from_codec(&e))?;
            let tensor = chunk.tensor_index as usize;
            let offset = usize::try_from(chunk.offset)
                .map_err(|_| Status::invalid_argument("offset overflows"))?;
            let (folded, buffer) = self
                .engine
                .call(move |engine, _| {
                    let folded = engine.push_chunk(worker, tensor, offset, &finite, wire_bytes);
                    (folded, finite.into_inner())
                })
                .await?;
            values = buffer;
            folded.map_err(|e| status_from_engine(&e))?;
        }
        let receipt = self
            .engine_call(move |engine, now| engine.finish_push(worker, now))
            .await?;
        Ok(pb::PushUpdateResponse {
            round: receipt.round.0,
            received: receipt.received as u32,
            expected: receipt.expected as u32,
        })
    }
}

/// A new session for a joining worker: the token it is given (256 bits from
/// the OS CSPRNG, hex) and the digest the coordinator keeps, bound to `site`
/// when the worker's certificate names one.
fn new_session(site: Option<&str>) -> Result<(String, SessionDigest), Status> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|e| Status::internal(format!("no randomness for a session token: {e}")))?;
    let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let digest = identity::session_digest(&token, site);
    Ok((token, digest))
}

/// The session a worker call presents and what its certificate names.
struct WorkerSession {
    digest: Option<SessionDigest>,
    certificate: CertificateSite,
}

impl WorkerSession {
    /// A session that does not match says why it may not when the call
    /// carries a client certificate: its session may be bound to another
    /// site's certificate.
    fn explain(&self, worker: WorkerId, status: Status) -> Status {
        let mismatch = EngineError::SessionMismatch(worker).to_string();
        if status.code() != tonic::Code::PermissionDenied
            || status.message() != mismatch
            || self.certificate == CertificateSite::Absent
        {
            return status;
        }
        warn!(%worker, certificate = %self.certificate.describe(), "call refused: session and certificate do not match");
        Status::permission_denied(format!(
            "{mismatch}: the session token is not this worker's, or the session was admitted \
             by a site's client certificate and this call came with {}; every call of a \
             session needs the certificate it joined with",
            self.certificate.describe()
        ))
    }
}

fn session_digest(token: &str) -> SessionDigest {
    SessionDigest(Sha256::digest(token.as_bytes()).into())
}

/// The digest of the session token a request presents, if it presents one.
fn presented_session<T>(request: &Request<T>) -> Option<SessionDigest> {
    bearer_token(request.metadata()).map(session_digest)
}

/// A `Bytes` owner over the published parameters, so pull chunks are slices, not copies.
struct ParamBytes(Arc<Vec<f32>>);

impl AsRef<[u8]> for ParamBytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(self.0.as_slice())
    }
}

type PullStream = Pin<Box<dyn Stream<Item = Result<pb::ParamChunk, Status>> + Send>>;

/// Splits the parameters into chunks of at most `max_chunk_bytes`, each within one tensor.
fn param_chunks(
    layout: &ParamLayout,
    params: Arc<Vec<f32>>,
    version: Version,
    max_chunk_bytes: usize,
) -> PullStream {
    let all = Bytes::from_owner(ParamBytes(params));
    let per_chunk = (max_chunk_bytes / 4).max(1);
    let mut pieces = Vec::new();
    for (index, slot) in layout.tensors().iter().enumerate() {
        let mut offset = 0;
        while offset < slot.numel {
            let len = per_chunk.min(slot.numel - offset);
            pieces.push((
                index as u32,
                offset as u64,
                (slot.offset + offset) * 4,
                len * 4,
            ));
            offset += len;
        }
    }
    Box::pin(futures::stream::iter(pieces.into_iter().map(
        move |(tensor_index, offset, start, len)| {
            Ok(pb::ParamChunk {
                version: version.0,
                tensor_index,
                offset,
                data: all.slice(start..start + len),
            })
        },
    )))
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    #[instrument(skip_all)]
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let certificate = self.certificate_site(&request)?;
        let request = request.into_inner();
        let role = request.info.as_ref().map_or(0, |i| i.role);
        let mut info = worker_info_from_proto(request.info)?;
        info.client = self.admit(role, &request.token, &certificate)?;
        let (session_token, session) = new_session(certificate.site())?;
        info.session = Some(session);
        let (worker, lease) = self
            .engine
            .call(move |engine, now| engine.join(info, now))
            .await?;
        Ok(Response::new(pb::JoinResponse {
            worker_id: worker.to_string(),
            lease_ms: lease.as_millis() as u64,
            heartbeat_interval_ms: self.plan.heartbeat_interval.as_millis() as u64,
            job: Some(self.job_spec.clone()),
            session_token,
        }))
    }

    #[instrument(skip_all, fields(worker))]
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let session = self.worker_session(&request)?;
        let digest = session.digest;
        let worker = worker_id(&request.into_inner().worker_id)?;
        tracing::Span::current().record("worker", tracing::field::display(worker));
        let lease = self
            .engine_call(move |engine, now| {
                engine.authenticate(worker, digest.as_ref())?;
                engine.heartbeat(worker, now)
            })
            .await
            .map_err(|status| session.explain(worker, status))?;
        Ok(Response::new(pb::HeartbeatResponse {
            lease_ms: lease.as_millis() as u64,
        }))
    }

    #[instrument(skip_all, fields(worker))]
    async fn next_task(
        &self,
        request: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::NextTaskResponse>, Status> {
        let session = self.worker_session(&request)?;
        let digest = session.digest;
        let worker = worker_id(&request.into_inner().worker_id)?;
        tracing::Span::current().record("worker", tracing::field::display(worker));
        let task = self
            .engine_call(move |engine, now| {
                engine.authenticate(worker, digest.as_ref())?;
                engine.next_task(worker, now)
            })
            .await
            .map_err(|status| session.explain(worker, status))?;
        Ok(Response::new(task_to_proto(task)))
    }

    type PullParamsStream = PullStream;

    #[instrument(skip_all, fields(worker, version))]
    async fn pull_params(
        &self,
        request: Request<pb::PullParamsRequest>,
    ) -> Result<Response<Self::PullParamsStream>, Status> {
        let session = self.worker_session(&request)?;
        let digest = session.digest;
        let request = request.into_inner();
        let worker = worker_id(&request.worker_id)?;
        let version = Version(request.version);
        tracing::Span::current().record("worker", tracing::field::display(worker));
        tracing::Span::current().record("version", version.0);
        if request.base {
            return self.pull_base(worker, session).await;
        }
        let params = self
            .engine_call(move |engine, now| {
                engine.authenticate(worker, digest.as_ref())?;
                engine.pull(worker, version, now)
            })
            .await
            .map_err(|status| session.explain(worker, status))?;
        let permit = Arc::clone(&self.pull_permits)
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        let chunks = param_chunks(
            &self.layout,
            params,
            version,
            self.plan.max_chunk_bytes as usize,
        );
        // The permit lives as long as the stream: released when it ends or is dropped.
        Ok(Response::new(Box::pin(chunks.map(move |chunk| {
            let _streaming = &permit;
            chunk
        }))))
    }

    #[instrument(skip_all, fields(worker, round))]
    async fn push_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::PushUpdateResponse>, Status> {
        let session = self.worker_session(&request)?;
        let digest = session.digest;
        let mut stream = request.into_inner();
        // Wait for the fold before reading anything: a waiting push then holds
        // only its HTTP/2 stream window in the coordinator, not decoded chunks.
        let _permit = self
            .fold_permit
            .acquire()
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        let first = tokio::time::timeout(self.plan.chunk_timeout, stream.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no push header arrived"))?
            .ok_or_else(|| Status::invalid_argument("empty push"))??;
        let Some(pb::update_chunk::Kind::Header(header)) = first.kind else {
            return Err(Status::invalid_argument(
                "a push must start with its header",
            ));
        };
        dtype_from_proto(header.dtype)?;
        let (worker, header) = push_header_from_proto(header)?;
        tracing::Span::current().record("worker", tracing::field::display(worker));
        tracing::Span::current().record("round", header.round.0);
        self.engine_call(move |engine, now| {
            engine.authenticate(worker, digest.as_ref())?;
            engine.begin_push(worker, header, now)
        })
        .await
        .map_err(|status| session.explain(worker, status))?;
        match self.receive_push(worker, header.dtype, &mut stream).await {
            Ok(response) => Ok(Response::new(response)),
            Err(status) => {
                warn!(code = ?status.code(), message = status.message(), "push discarded");
                self.abort_push(
                    worker,
                    EngineError::StreamFailed(status.message().to_string()),
                )
                .await;
                Err(status)
            }
        }
    }

    #[instrument(skip_all, fields(worker))]
    async fn report_eval(
        &self,
        request: Request<pb::ReportEvalRequest>,
    ) -> Result<Response<pb::ReportEvalResponse>, Status> {
        let session = self.worker_session(&request)?;
        let digest = session.digest;
        let request = request.into_inner();
        let worker = worker_id(&request.worker_id)?;
        let version = Version(request.version);
        let score = cohort_core::engine::EvalScore {
            loss: request.loss,
            weight: request.tokens,
            accuracy: request.accuracy,
        };
        self.engine_call(move |engine, now| {
            engine.authenticate(worker, digest.as_ref())?;
            engine.report_eval(worker, version, score, now)
        })
        .await
        .map_err(|status| session.explain(worker, status))?;
        Ok(Response::new(pb::ReportEvalResponse {}))
    }

    /// The job at a glance for operators: read-only, it changes nothing.
    #[instrument(skip_all)]
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.admit_operator(&request)?;
        let progress = self.observer.progress();
        let name = self.plan.name.clone();
        let status = self
            .engine
            .call(move |engine, now| status_to_proto(&name, engine, &progress, now))
            .await?;
        Ok(Response::new(status))
    }

    #[instrument(skip_all)]
    async fn stop(
        &self,
        request: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopResponse>, Status> {
        self.admit_operator(&request)?;
        let reason = stop_reason(&request.into_inner().reason)?;
        warn!(reason = %reason, "an operator asked to stop the job");
        if let Some(health) = &self.health {
            crate::server::set_health(health, tonic_health::ServingStatus::NotServing).await;
        }
        let ack = self.engine.stop(reason).await?;
        Ok(Response::new(pb::StopResponse {
            phase: ack.phase.to_string(),
            committed_rounds: ack.committed_rounds,
        }))
    }
}
