//! Bad input, limits and failures at the gRPC edge, on 127.0.0.1:0 with fake
//! workers as tasks: oversized and malformed messages, duplicated chunks,
//! replays of a committed push, pushes after a lease expired, stragglers past
//! the round deadline and a push cut off by a dead connection. Each is refused
//! with a clear status (or discarded) and the round then commits exactly the
//! parameters of the pushes it accepted.

#[path = "support/grpc_edge.rs"]
mod grpc_edge;
#[path = "support/session_client.rs"]
mod session_client;

use std::path::Path;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use cohort_coordinator::config::{JobFile, JobPlan};
use cohort_coordinator::data::{prepare, PrepareOptions, TokenizerKind};
use cohort_coordinator::server;
use cohort_core::params::ParamLayout;
use cohort_proto::v1 as pb;
use futures::StreamExt;
use grpc_edge::{assert_refused, chunk, chunks, push, start, Running, MAX_CHUNK_BYTES};
use pb::next_task_response::Task;
use prost::Message;
use session_client::Client;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Bound on every wait for the coordinator in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// A validated job of `rounds` rounds over a tiny model; `cluster` is the
/// `[cluster]` section without `max_chunk_bytes`.
fn plan(dir: &Path, rounds: u32, cluster: &str) -> JobPlan {
    let text: String = (0..200)
        .map(|i| format!("sentence number {i} of the test corpus. "))
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
    let toml = format!(
        r#"
name = "limits-test"
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
rounds = {rounds}
inner_steps = 1
[outer]
kind = "average"
[cluster]
max_chunk_bytes = {MAX_CHUNK_BYTES}
{cluster}
"#
    );
    JobFile::parse(&toml, &dir.join("job.toml"))
        .unwrap()
        .validate()
        .unwrap()
}

/// Two workers, both needed for every round, long leases and deadlines.
const TWO_OF_TWO: &str = "min_workers = 2
min_participants = 2
lease_ms = 30000
heartbeat_ms = 1000
chunk_timeout_ms = 2000";

async fn client(addr: &str) -> Client {
    Client::connect(addr).await
}

fn worker_info(hostname: String) -> pb::WorkerInfo {
    pb::WorkerInfo {
        hostname,
        device: "cpu".into(),
        device_memory_bytes: 0,
        role: 1,
    }
}

async fn join(c: &mut Client) -> String {
    let response = c
        .join(pb::JoinRequest {
            info: Some(worker_info("test".into())),
            token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    c.remember(&response);
    response.worker_id
}

async fn next_task(c: &mut Client, worker: &str) -> Task {
    c.next_task(pb::NextTaskRequest {
        worker_id: worker.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .task
    .unwrap()
}

async fn heartbeat(c: &mut Client, worker: &str) -> Result<u64, Status> {
    c.heartbeat(pb::HeartbeatRequest {
        worker_id: worker.into(),
    })
    .await
    .map(|r| r.into_inner().lease_ms)
}

/// Heartbeats every 150 ms for `duration`: keeps a worker alive while time passes.
async fn stay_alive(c: &mut Client, worker: &str, duration: Duration) {
    let until = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < until {
        heartbeat(c, worker).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Asks for tasks until the coordinator has published `version` (a train
/// task from it, or the final evaluation of it), within [`WAIT`].
async fn wait_for_version(c: &mut Client, worker: &str, version: u64) {
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            match next_task(c, worker).await {
                Task::Train(t) if t.version >= version => return,
                Task::Eval(e) if e.version >= version => return,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    assert!(waited.is_ok(), "version {version} was not published");
}

async fn pull(c: &mut Client, worker: &str, version: u64) -> Result<Vec<f32>, Status> {
    let mut stream = c
        .pull_params(pb::PullParamsRequest {
            base: false,
            worker_id: worker.into(),
            version,
        })
        .await?
        .into_inner();
    let mut values = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        assert_eq!(chunk.version, version);
        values.extend(
            chunk
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap())),
        );
    }
    Ok(values)
}

fn header(worker: &str, round: u64, version: u64) -> pb::UpdateChunk {
    pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Header(pb::PushHeader {
            worker_id: worker.into(),
            round,
            base_version: version,
            dtype: pb::DType::DtypeF32 as i32,
            stats: Some(pb::TrainStats {
                mean_loss: 3.0,
                tokens: 64,
                train_seconds: 0.5,
                eval_loss: None,
                eval_tokens: 0,
                eval_accuracy: None,
            }),
        })),
    }
}

/// A header for `worker` followed by `update` as chunks.
fn whole_push(
    layout: &ParamLayout,
    worker: &str,
    round: u64,
    version: u64,
    update: &[f32],
) -> Vec<pb::UpdateChunk> {
    [vec![header(worker, round, version)], chunks(layout, update)].concat()
}

/// Two pseudo-gradients that differ in every tensor.
fn deltas(layout: &ParamLayout) -> (Vec<f32>, Vec<f32>) {
    let a = (0..layout.total())
        .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
        .collect();
    let b = (0..layout.total())
        .map(|i| ((i % 5) as f32 - 2.0) * 0.02)
        .collect();
    (a, b)
}

/// Two joined workers, both told to train round 1 from version 0.
struct RoundOne {
    layout: ParamLayout,
    a: Client,
    b: Client,
    wa: String,
    wb: String,
    initial: Vec<f32>,
}

async fn round_one(running: &Running, plan_layout: ParamLayout) -> RoundOne {
    round_one_via(running, &running.addr, plan_layout).await
}

/// [`round_one`], with worker a connected through `a_addr`.
async fn round_one_via(running: &Running, a_addr: &str, plan_layout: ParamLayout) -> RoundOne {
    let mut a = client(a_addr).await;
    let mut b = client(&running.addr).await;
    let wa = join(&mut a).await;
    let wb = join(&mut b).await;
    for (c, w) in [(&mut a, &wa), (&mut b, &wb)] {
        let Task::Train(task) = next_task(c, w).await else {
            panic!("no train task")
        };
        assert_eq!((task.round, task.version), (1, 0));
    }
    let initial = pull(&mut a, &wa, 0).await.unwrap();
    assert_eq!(initial.len(), plan_layout.total());
    RoundOne {
        layout: plan_layout,
        a,
        b,
        wa,
        wb,
        initial,
    }
}

/// `params` minus the mean of `updates`, as the "average" outer step gives it.
fn minus_mean(params: &[f32], updates: &[&[f32]]) -> Vec<f32> {
    (0..params.len())
        .map(|i| match updates {
            [one] => params[i] - one[i],
            [x, y] => params[i] - (x[i] + y[i]) * 0.5,
            _ => unreachable!("one or two updates"),
        })
        .collect()
}

/// A TCP relay to the coordinator; aborting the returned task closes every
/// relayed connection at once, as the kernel does for a killed process.
async fn relay(running: &Running) -> (String, tokio::task::JoinHandle<()>) {
    let target = running.addr.trim_start_matches("http://").to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            let mut outbound = tokio::net::TcpStream::connect(&target).await.unwrap();
            connections.spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (addr, task)
}

// ---- raw gRPC: bytes the typed client cannot send -----------------------------

/// A codec that puts pre-encoded bytes on the wire as gRPC messages and
/// hands back the response's bytes undecoded.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

async fn raw_client(addr: &str) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc
}

/// A push of hand-encoded messages with the session token of `session`'s worker.
async fn raw_push(
    addr: &str,
    session: &str,
    messages: Vec<Bytes>,
) -> Result<pb::PushUpdateResponse, Status> {
    let mut grpc = raw_client(addr).await;
    let request = tonic::Request::new(tokio_stream::iter(messages));
    let response = grpc
        .client_streaming(
            cohort_proto::session::with_bearer(request, session)?,
            PathAndQuery::from_static("/cohort.v1.Coordinator/PushUpdate"),
            RawCodec,
        )
        .await?;
    Ok(pb::PushUpdateResponse::decode(response.into_inner()).expect("a push receipt"))
}

async fn raw_join(addr: &str, message: Bytes) -> Result<Bytes, Status> {
    let mut grpc = raw_client(addr).await;
    grpc.unary(
        tonic::Request::new(message),
        PathAndQuery::from_static("/cohort.v1.Coordinator/Join"),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

fn protobuf_key(field: u8, wire_type: u8) -> u8 {
    (field << 3) | wire_type
}

const VARINT: u8 = 0;
const LENGTH_DELIMITED: u8 = 2;
const FIXED32: u8 = 5;

// ---- the tests ----------------------------------------------------------------

#[tokio::test]
async fn an_oversized_message_is_refused_with_out_of_range_and_the_round_commits_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), 1, TWO_OF_TWO);
    // The limit follows the job's chunk size: a chunk plus a 4 KiB allowance.
    let limit = server::max_decoding_message_bytes(&plan);
    assert_eq!(limit, MAX_CHUNK_BYTES + server::MESSAGE_OVERHEAD_BYTES);
    assert!(server::max_encoding_message_bytes(&plan) >= limit);
    let running = start(plan.clone()).await;
    let mut r = round_one(&running, ParamLayout::new(&plan.engine.tensors)).await;
    let (delta_a, delta_b) = deltas(&r.layout);

    // A join whose hostname alone is over the limit.
    assert_refused(
        r.a.join(pb::JoinRequest {
            info: Some(worker_info("h".repeat(limit))),
            token: String::new(),
        })
        .await,
        Code::OutOfRange,
        "too large",
    );
    // A push whose second chunk carries 64 KiB: refused from its length
    // prefix, and the push (its first chunk already folded) is discarded.
    let mut oversized = whole_push(&r.layout, &r.wa, 1, 0, &delta_a);
    oversized[2] = chunk(0, 256, vec![0; 64 * 1024]);
    assert_refused(
        push(&mut r.a, oversized).await,
        Code::OutOfRange,
        "too large",
    );
    // An oversized header opens nothing.
    let mut fat_header = header(&r.wa, 1, 0);
    if let Some(pb::update_chunk::Kind::Header(h)) = &mut fat_header.kind {
        h.worker_id.push_str(&" ".repeat(limit));
    }
    assert_refused(
        push(&mut r.a, vec![fat_header]).await,
        Code::OutOfRange,
        "too large",
    );

    // The same worker's clean push is accepted, and the round is exact.
    let receipt = push(&mut r.a, whole_push(&r.layout, &r.wa, 1, 0, &delta_a))
        .await
        .unwrap();
    assert_eq!((receipt.received, receipt.expected), (1, 2));
    push(&mut r.b, whole_push(&r.layout, &r.wb, 1, 0, &delta_b))
        .await
        .unwrap();
    wait_for_version(&mut r.a, &r.wa, 1).await;
    assert_eq!(
        pull(&mut r.a, &r.wa, 1).await.unwrap(),
        minus_mean(&r.initial, &[&delta_a, &delta_b])
    );
}

#[tokio::test]
async fn a_malformed_protobuf_message_is_refused_with_internal_and_the_round_commits_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), 1, TWO_OF_TWO);
    let running = start(plan.clone()).await;
    let mut r = round_one(&running, ParamLayout::new(&plan.engine.tensors)).await;
    let (delta_a, delta_b) = deltas(&r.layout);
    let encoded = |messages: Vec<pb::UpdateChunk>| -> Vec<Bytes> {
        messages
            .iter()
            .map(|m| Bytes::from(m.encode_to_vec()))
            .collect()
    };
    let good = encoded(whole_push(&r.layout, &r.wa, 1, 0, &delta_a));

    // tonic answers a message that does not parse with INTERNAL, as gRPC's
    // status code table says for parse errors; the push is discarded.
    // TensorChunk.data (field 3, bytes) sent as a varint, mid-push.
    let inner = [
        protobuf_key(1, VARINT),
        0,
        protobuf_key(2, VARINT),
        0,
        protobuf_key(3, VARINT),
        7,
    ];
    let mut wrong_type = vec![protobuf_key(2, LENGTH_DELIMITED), inner.len() as u8];
    wrong_type.extend_from_slice(&inner);
    let mut pushed = good.clone();
    pushed[2] = Bytes::from(wrong_type);
    assert_refused(
        raw_push(&running.addr, r.a.session_token(), pushed).await,
        Code::Internal,
        "failed to decode",
    );
    // A chunk that announces 16 bytes and holds 2: truncated inside the message.
    let mut truncated = good.clone();
    truncated[3] = Bytes::from(vec![
        protobuf_key(2, LENGTH_DELIMITED),
        16,
        protobuf_key(1, VARINT),
        0,
    ]);
    assert_refused(
        raw_push(&running.addr, r.a.session_token(), truncated).await,
        Code::Internal,
        "failed to decode",
    );
    // JoinRequest.info (a message) sent as a fixed32.
    assert_refused(
        raw_join(
            &running.addr,
            Bytes::from(vec![protobuf_key(1, FIXED32), 1, 2, 3, 4]),
        )
        .await,
        Code::Internal,
        "failed to decode",
    );

    // Unknown fields, by contrast, are skipped (proto3): a clean push with
    // an unknown varint field 15 appended to every message is accepted.
    let with_unknown: Vec<Bytes> = good
        .iter()
        .map(|m| {
            let mut m = m.to_vec();
            m.extend_from_slice(&[protobuf_key(15, VARINT), 1]);
            Bytes::from(m)
        })
        .collect();
    let receipt = raw_push(&running.addr, r.a.session_token(), with_unknown)
        .await
        .unwrap();
    assert_eq!((receipt.received, receipt.expected), (1, 2));
    push(&mut r.b, whole_push(&r.layout, &r.wb, 1, 0, &delta_b))
        .await
        .unwrap();
    wait_for_version(&mut r.a, &r.wa, 1).await;
    assert_eq!(
        pull(&mut r.a, &r.wa, 1).await.unwrap(),
        minus_mean(&r.initial, &[&delta_a, &delta_b])
    );
}

#[tokio::test]
async fn a_duplicated_chunk_is_refused_and_the_round_commits_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), 1, TWO_OF_TWO);
    let running = start(plan.clone()).await;
    let mut r = round_one(&running, ParamLayout::new(&plan.engine.tensors)).await;
    let (delta_a, delta_b) = deltas(&r.layout);
    let good = whole_push(&r.layout, &r.wa, 1, 0, &delta_a);

    // The first chunk (tensor 0, offset 0, 256 values) sent twice.
    let mut twice = good.clone();
    twice.insert(2, good[1].clone());
    assert_refused(
        push(&mut r.a, twice).await,
        Code::InvalidArgument,
        "chunk for tensor 0 at offset 0, expected tensor 0 at offset 256",
    );
    // The last chunk sent again after a complete update.
    let mut last_again = good.clone();
    last_again.push(good[good.len() - 1].clone());
    assert_refused(
        push(&mut r.a, last_again).await,
        Code::InvalidArgument,
        "expected tensor",
    );

    push(&mut r.a, good).await.unwrap();
    push(&mut r.b, whole_push(&r.layout, &r.wb, 1, 0, &delta_b))
        .await
        .unwrap();
    wait_for_version(&mut r.a, &r.wa, 1).await;
    assert_eq!(
        pull(&mut r.a, &r.wa, 1).await.unwrap(),
        minus_mean(&r.initial, &[&delta_a, &delta_b])
    );
}

#[tokio::test]
async fn a_replayed_push_after_its_round_committed_is_refused_as_stale() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), 2, TWO_OF_TWO);
    let running = start(plan.clone()).await;
    let mut r = round_one(&running, ParamLayout::new(&plan.engine.tensors)).await;
    let (delta_a, delta_b) = deltas(&r.layout);
    let push_a = whole_push(&r.layout, &r.wa, 1, 0, &delta_a);
    push(&mut r.a, push_a.clone()).await.unwrap();
    push(&mut r.b, whole_push(&r.layout, &r.wb, 1, 0, &delta_b))
        .await
        .unwrap();
    let version_1 = minus_mean(&r.initial, &[&delta_a, &delta_b]);

    // Round 2 is open; both workers are told to train it from version 1.
    for (c, w) in [(&mut r.a, &r.wa), (&mut r.b, &r.wb)] {
        let Task::Train(task) = next_task(c, w).await else {
            panic!("no train task for round 2")
        };
        assert_eq!((task.round, task.version), (2, 1));
    }
    // The committed push, sent again as it was.
    assert_refused(
        push(&mut r.a, push_a.clone()).await,
        Code::FailedPrecondition,
        "stale round",
    );
    // And by the other worker, with its own identity.
    assert_refused(
        push(&mut r.b, whole_push(&r.layout, &r.wb, 1, 0, &delta_a)).await,
        Code::FailedPrecondition,
        "stale round",
    );
    assert_eq!(pull(&mut r.a, &r.wa, 1).await.unwrap(), version_1);

    // Round 2 goes on undisturbed: its fold holds only its own two pushes.
    push(&mut r.a, whole_push(&r.layout, &r.wa, 2, 1, &delta_b))
        .await
        .unwrap();
    push(&mut r.b, whole_push(&r.layout, &r.wb, 2, 1, &delta_b))
        .await
        .unwrap();
    wait_for_version(&mut r.a, &r.wa, 2).await;
    assert_eq!(
        pull(&mut r.a, &r.wa, 2).await.unwrap(),
        minus_mean(&version_1, &[&delta_b, &delta_b])
    );
}

/// Two workers start each round, one push is enough, leases are short.
const SHORT_LEASES: &str = "min_workers = 2
min_participants = 1
lease_ms = 600
heartbeat_ms = 200";

#[tokio::test]
async fn a_push_after_the_lease_expired_is_refused_with_not_found_and_the_round_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), 1, SHORT_LEASES);
    let running = start(plan.clone()).await;
    let mut r = round_one(&running, ParamLayout::new(&plan.engine.tensors)).await;
    let (delta_a, delta_b) = deltas(&r.layout);

    // a goes quiet past its lease while b heartbeats.
    stay_alive(&mut r.b, &r.wb, Duration::from_millis(1000)).await;
    assert_refused(
        push(&mut r.a, whole_push(&r.layout, &r.wa, 1, 0, &delta_a)).await,
        Code::NotFound,
        "lease expired",
    );
    assert_refused(
        heartbeat(&mut r.a, &r.wa).await,
        Code::NotFound,
        "unknown worker",
    );

    // The round goes on with b alone, and holds only b's update.
    let receipt = push(&mut r.b, whole_push(&r.layout, &r.wb, 1, 0, &delta_b))
        .await
        .unwrap();
    assert_eq!(
        (receipt.round, receipt.received, receipt.expected),
        (1, 1, 1)
    );
    wait_for_version(&mut r.b, &r.wb, 1).await;
    assert_eq!(
        pull(&mut r.b, &r.wb, 1).await.unwrap(),
        minus_mean(&r.initial, &[&delta_b])
    );
}

#[tokio::test]
async fn a_straggler_past_the_round_deadline_is_refused_as_stale_and_not_folded_in() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(
        dir.path(),
        1,
        "min_workers = 2
min_participants = 1
lease_ms = 30000
heartbeat_ms = 1000
round_deadline_ms = 1500",
    );
    let running = start(plan.clone()).await;
    let mut r = round_one(&running, ParamLayout::new(&plan.engine.tensors)).await;
    let (delta_a, delta_b) = deltas(&r.layout);

    let receipt = push(&mut r.a, whole_push(&r.layout, &r.wa, 1, 0, &delta_a))
        .await
        .unwrap();
    assert_eq!((receipt.received, receipt.expected), (1, 2));
    // b misses the deadline: the round commits with a alone.
    wait_for_version(&mut r.a, &r.wa, 1).await;
    assert_refused(
        push(&mut r.b, whole_push(&r.layout, &r.wb, 1, 0, &delta_b)).await,
        Code::FailedPrecondition,
        "stale round",
    );
    assert_eq!(
        pull(&mut r.a, &r.wa, 1).await.unwrap(),
        minus_mean(&r.initial, &[&delta_a])
    );
}

#[tokio::test]
async fn a_worker_cut_off_mid_push_loses_only_its_partial_push() {
    let dir = tempfile::tempdir().unwrap();
    // A chunk timeout far beyond the test's waits: the cut-off push must be
    // discarded because its connection died, not because it went quiet.
    let plan = plan(
        dir.path(),
        1,
        &format!("{SHORT_LEASES}\nchunk_timeout_ms = 60000"),
    );
    let running = start(plan.clone()).await;
    let (a_addr, a_connection) = relay(&running).await;
    let RoundOne {
        layout,
        mut a,
        mut b,
        wa,
        wb,
        initial,
    } = round_one_via(&running, &a_addr, ParamLayout::new(&plan.engine.tensors)).await;
    let (delta_a, delta_b) = deltas(&layout);

    // a sends its header and half its update, and is killed before the rest:
    // its socket closes with the push stream still open.
    let good = whole_push(&layout, &wa, 1, 0, &delta_a);
    let (tx, rx) = tokio::sync::mpsc::channel(good.len());
    for message in &good[..good.len() / 2] {
        tx.send(message.clone()).await.unwrap();
    }
    let pushing = tokio::spawn(async move {
        a.push_update(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // Give the chunks time to be folded (the outcome is the same if they
    // were not), then kill the worker.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a_connection.abort();
    let cut_off = tokio::time::timeout(WAIT, pushing)
        .await
        .expect("the killed worker's call ended")
        .unwrap();
    assert!(cut_off.is_err(), "{cut_off:?}");
    drop(tx);
    heartbeat(&mut b, &wb).await.unwrap();

    // b's push gets the fold at once and is accepted; a's lease then runs out.
    let receipt =
        tokio::time::timeout(WAIT, push(&mut b, whole_push(&layout, &wb, 1, 0, &delta_b)))
            .await
            .expect("the dead push released the fold")
            .unwrap();
    assert_eq!(receipt.round, 1);
    wait_for_version(&mut b, &wb, 1).await;
    assert_eq!(
        pull(&mut b, &wb, 1).await.unwrap(),
        minus_mean(&initial, &[&delta_b])
    );
    let mut probe = client(&running.addr).await;
    assert_refused(
        heartbeat(&mut probe, &wa).await,
        Code::NotFound,
        "unknown worker",
    );
}
