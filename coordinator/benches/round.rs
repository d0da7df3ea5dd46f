//! One round end to end on loopback: N simulated workers pull P f32, push a
//! pseudo-gradient of P f32, and the coordinator folds and commits, beside raw
//! TCP moving the same bytes; prints a table.
//!
//! The coordinator runs in a child process (this binary re-executed with
//! `COHORT_ROUND_BENCH_CHILD=coordinator`) so that its peak RSS (`VmHWM` from
//! `/proc/<pid>/status`) is its own; the raw-TCP baseline server is a child too
//! (`COHORT_ROUND_BENCH_CHILD=tcp`). Clients are tokio tasks in this process,
//! one connection each, sharing one random update (`Bytes` slices, no copies).
//!
//! Timing: the clock starts once every worker has joined and holds its Train
//! task (so the first pull starts at t0) and stops when the last push is
//! answered; the last push's answer comes after `finish_push` committed the
//! round (the outer step ran and the next version is published).
//!
//! `cargo bench -p cohort-coordinator --bench round`
//! (`COHORT_ROUND_BENCH_P=1000000,10000000 COHORT_ROUND_BENCH_N=2,8,32` are the
//! defaults; without `--bench`, e.g. under `cargo test --benches`, a small smoke
//! configuration runs instead.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use cohort_coordinator::config::JobFile;
use cohort_coordinator::data::{prepare, PrepareOptions, TokenizerKind};
use cohort_coordinator::server::{self, HTTP2_MAX_FRAME_SIZE};
use cohort_core::model::{Init, TensorSpec};
use cohort_core::rng::SplitMix64;
use cohort_proto::session::SessionAuth;
use cohort_proto::v1 as pb;
use cohort_proto::v1::coordinator_client::CoordinatorClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

const CHILD_ENV: &str = "COHORT_ROUND_BENCH_CHILD";
const P_ENV: &str = "COHORT_ROUND_BENCH_P";
const N_ENV: &str = "COHORT_ROUND_BENCH_N";
/// Bytes per pushed chunk (the coordinator's default `max_chunk_bytes`).
const CHUNK_BYTES: usize = 256 * 1024;
/// Combinations whose clients would need more than this are skipped.
const CLIENT_MEMORY_LIMIT: u64 = 6 << 30;
/// Rough per-connection client memory: HTTP/2 and socket buffers, in-flight frames.
const PER_CONNECTION_BYTES: u64 = 8 << 20;
/// Longest a single combination may take before it is abandoned.
const COMBINATION_TIMEOUT: Duration = Duration::from_secs(180);

fn main() -> Result<()> {
    if let Ok(role) = std::env::var(CHILD_ENV) {
        return child_main(&role);
    }
    let full = std::env::args().any(|a| a == "--bench");
    let (ps, ns) = if full {
        (
            list_from_env(P_ENV, &[1_000_000, 10_000_000])?,
            list_from_env(N_ENV, &[2, 8, 32])?,
        )
    } else {
        println!(
            "round bench: smoke run (pass --bench, as `cargo bench` does, for the full table)"
        );
        (vec![65_536], vec![2])
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(parent_main(&ps, &ns))
}

fn list_from_env(name: &str, default: &[usize]) -> Result<Vec<usize>> {
    match std::env::var(name) {
        Ok(text) => text
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("{name}={text}"))
            })
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}

// ---- parent: clients and the table ---------------------------------------------

struct Row {
    p: usize,
    n: usize,
    round: Duration,
    last_pull: Duration,
    raw: Duration,
    hwm_commit: u64,
    hwm_exit: Option<u64>,
    raw_hwm: Option<u64>,
}

async fn parent_main(ps: &[usize], ns: &[usize]) -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for &p in ps {
        let update = random_update(p, 42);
        for &n in ns {
            let client_bytes = (p * 4) as u64 + n as u64 * PER_CONNECTION_BYTES;
            if client_bytes > CLIENT_MEMORY_LIMIT {
                println!(
                    "skipping P = {p}, N = {n}: clients would need about {} MiB",
                    client_bytes >> 20
                );
                continue;
            }
            let dir = scratch.path().join(format!("p{p}-n{n}"));
            std::fs::create_dir_all(&dir)?;
            let row =
                tokio::time::timeout(COMBINATION_TIMEOUT, measure(p, n, update.clone(), &dir))
                    .await
                    .with_context(|| {
                        format!("P = {p}, N = {n} took over {COMBINATION_TIMEOUT:?}")
                    })??;
            eprintln!(
                "P = {p}, N = {n}: round {:.3} s, raw TCP {:.3} s",
                row.round.as_secs_f64(),
                row.raw.as_secs_f64()
            );
            rows.push(row);
        }
    }
    print_table(&rows);
    Ok(())
}

async fn measure(p: usize, n: usize, update: Bytes, dir: &Path) -> Result<Row> {
    let (round, last_pull, hwm_commit, hwm_exit) = coordinator_round(p, n, update.clone(), dir)
        .await
        .with_context(|| format!("coordinator round, P = {p}, N = {n}"))?;
    let (raw, raw_hwm) = raw_tcp(p, n, update, dir)
        .await
        .with_context(|| format!("raw TCP baseline, P = {p}, N = {n}"))?;
    Ok(Row {
        p,
        n,
        round,
        last_pull,
        raw,
        hwm_commit,
        hwm_exit,
        raw_hwm,
    })
}

fn print_table(rows: &[Row]) {
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    let opt_mib = |bytes: Option<u64>| bytes.map_or("-".to_string(), |b| format!("{:.0}", mib(b)));
    println!();
    println!("One round on loopback (f32, 256 KiB chunks, one connection per worker)");
    println!(
        "{:>10} {:>3} {:>8} {:>8} {:>9} {:>6} {:>10} {:>6} {:>7} {:>9} {:>8}",
        "P",
        "N",
        "round s",
        "pull s",
        "raw TCP s",
        "ratio",
        "VmHWM MiB",
        "model",
        "HWM/mdl",
        "exit HWM",
        "raw HWM"
    );
    for r in rows {
        let model = (r.p * 4) as u64;
        println!(
            "{:>10} {:>3} {:>8.3} {:>8.3} {:>9.3} {:>6.2} {:>10.0} {:>6.1} {:>7.2} {:>9} {:>8}",
            r.p,
            r.n,
            r.round.as_secs_f64(),
            r.last_pull.as_secs_f64(),
            r.raw.as_secs_f64(),
            r.round.as_secs_f64() / r.raw.as_secs_f64(),
            mib(r.hwm_commit),
            mib(model),
            r.hwm_commit as f64 / model as f64,
            opt_mib(r.hwm_exit),
            opt_mib(r.raw_hwm),
        );
    }
    println!(
        "round s: first pull to last push answered (the last answer follows the commit); \
         pull s: first pull to last pull finished;"
    );
    println!(
        "raw TCP s: same bytes over plain loopback TCP, received f32 folded into one sum; \
         ratio = round / raw;"
    );
    println!(
        "VmHWM MiB: coordinator peak RSS read when the last push is answered; model = P x 4 B (MiB); \
         HWM/mdl = VmHWM / model bytes;"
    );
    println!(
        "exit HWM: coordinator peak RSS at exit (after the final checkpoint); raw HWM: baseline server peak RSS (MiB)."
    );
    if let Some(hwm) = vm_hwm(Path::new("/proc/self/status")) {
        println!("clients (this process) VmHWM: {:.0} MiB", mib(hwm));
    }
}

fn random_update(p: usize, seed: u64) -> Bytes {
    let mut rng = SplitMix64::new(seed);
    let mut bytes = Vec::with_capacity(p * 4);
    for _ in 0..p {
        let value = ((rng.next_f64() * 2.0 - 1.0) * 1e-3) as f32;
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    Bytes::from(bytes)
}

/// A child process killed on drop unless it has exited.
struct ChildProc(Child);

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl ChildProc {
    fn spawn(role: &str, p: usize, n: usize, addr_file: &Path) -> Result<ChildProc> {
        let child = Command::new(std::env::current_exe()?)
            .env(CHILD_ENV, role)
            .env("COHORT_ROUND_BENCH_CHILD_P", p.to_string())
            .env("COHORT_ROUND_BENCH_CHILD_N", n.to_string())
            .env("COHORT_ROUND_BENCH_CHILD_ADDR", addr_file)
            .spawn()
            .with_context(|| format!("spawning the {role} child"))?;
        Ok(ChildProc(child))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the child to write its address (it is listening by then).
    async fn address(&mut self, addr_file: &Path) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(addr_file) {
                return Ok(text.trim().to_string());
            }
            if let Some(status) = self.0.try_wait()? {
                bail!("child exited before listening: {status}");
            }
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "child did not listen within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for a clean exit.
    async fn exit(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait()? {
                ensure!(status.success(), "child failed: {status}");
                return Ok(());
            }
            ensure!(
                start.elapsed() < timeout,
                "child did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `VmHWM` of a `/proc/<pid>/status` file, in bytes.
fn vm_hwm(status: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(status).ok()?;
    parse_vm_hwm(&text)
}

fn parse_vm_hwm(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A simulated worker's client: its calls carry the session of its join.
type Client = CoordinatorClient<InterceptedService<Channel, SessionAuth>>;

struct Pushed {
    client: Client,
    worker_id: String,
    pulled_at: Instant,
    pushed_at: Instant,
}

/// Returns (round wall, last pull, VmHWM when the last push is answered, VmHWM at exit).
async fn coordinator_round(
    p: usize,
    n: usize,
    update: Bytes,
    dir: &Path,
) -> Result<(Duration, Duration, u64, Option<u64>)> {
    let addr_file = dir.join("coordinator.addr");
    let mut child = ChildProc::spawn("coordinator", p, n, &addr_file)?;
    let addr = child.address(&addr_file).await?;
    let joined = Arc::new(Barrier::new(n + 1));
    let ready = Arc::new(Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .max_frame_size(HTTP2_MAX_FRAME_SIZE)
            .connect()
            .await?;
        tasks.push(tokio::spawn(simulated_worker(
            channel,
            joined.clone(),
            ready.clone(),
            update.clone(),
            p,
        )));
    }
    joined.wait().await;
    ready.wait().await;
    let t0 = Instant::now();
    let mut done = Vec::with_capacity(n);
    for task in tasks {
        done.push(task.await??);
    }
    let hwm_commit = vm_hwm(&PathBuf::from(format!("/proc/{}/status", child.pid())))
        .context("reading the coordinator's VmHWM")?;
    let round = done.iter().map(|d| d.pushed_at).max().expect("N >= 1") - t0;
    let last_pull = done.iter().map(|d| d.pulled_at).max().expect("N >= 1") - t0;
    // Let every worker hear "done" so the coordinator exits at once.
    for mut d in done {
        let task = d
            .client
            .next_task(pb::NextTaskRequest {
                worker_id: d.worker_id.clone(),
            })
            .await?
            .into_inner();
        ensure!(
            matches!(task.task, Some(pb::next_task_response::Task::Done(_))),
            "expected a Done task after the only round, got {task:?}"
        );
    }
    child.exit(Duration::from_secs(60)).await?;
    let hwm_exit = read_exit_hwm(&addr_file);
    Ok((round, last_pull, hwm_commit, hwm_exit))
}

async fn simulated_worker(
    channel: Channel,
    joined: Arc<Barrier>,
    ready: Arc<Barrier>,
    update: Bytes,
    p: usize,
) -> Result<Pushed> {
    let session = SessionAuth::default();
    let mut client = CoordinatorClient::with_interceptor(channel, session.clone());
    let join = client
        .join(pb::JoinRequest {
            token: String::new(),
            info: Some(pb::WorkerInfo {
                hostname: "round-bench".into(),
                device: "cpu".into(),
                device_memory_bytes: 0,
                role: pb::Role::Pretrain as i32,
            }),
        })
        .await?
        .into_inner();
    session.set(&join.session_token)?;
    let worker_id = join.worker_id;
    joined.wait().await;
    let task = client
        .next_task(pb::NextTaskRequest {
            worker_id: worker_id.clone(),
        })
        .await?
        .into_inner();
    let Some(pb::next_task_response::Task::Train(train)) = task.task else {
        bail!("expected a Train task once every worker joined, got {task:?}");
    };
    ready.wait().await;

    let mut stream = client
        .pull_params(pb::PullParamsRequest {
            base: false,
            worker_id: worker_id.clone(),
            version: train.version,
        })
        .await?
        .into_inner();
    let mut pulled = 0;
    while let Some(chunk) = stream.message().await? {
        pulled += chunk.data.len();
    }
    ensure!(pulled == p * 4, "pulled {pulled} bytes, expected {}", p * 4);
    let pulled_at = Instant::now();

    let header = pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Header(pb::PushHeader {
            worker_id: worker_id.clone(),
            round: train.round,
            base_version: train.version,
            dtype: pb::DType::DtypeF32 as i32,
            stats: Some(pb::TrainStats {
                mean_loss: 1.0,
                tokens: 1,
                train_seconds: 0.0,
                eval_loss: None,
                eval_tokens: 0,
                eval_accuracy: None,
            }),
        })),
    };
    let total = update.len();
    let chunks = (0..total.div_ceil(CHUNK_BYTES)).map(move |i| {
        let start = i * CHUNK_BYTES;
        let end = (start + CHUNK_BYTES).min(total);
        pb::UpdateChunk {
            kind: Some(pb::update_chunk::Kind::Chunk(pb::TensorChunk {
                tensor_index: 0,
                offset: (start / 4) as u64,
                data: update.slice(start..end),
            })),
        }
    });
    let messages = futures::stream::iter(std::iter::once(header).chain(chunks));
    let receipt = client.push_update(messages).await?.into_inner();
    let pushed_at = Instant::now();
    ensure!(
        receipt.round == train.round && receipt.received >= 1,
        "unexpected push receipt {receipt:?}"
    );
    Ok(Pushed {
        client,
        worker_id,
        pulled_at,
        pushed_at,
    })
}

/// Returns (wall time, baseline server VmHWM at exit).
async fn raw_tcp(p: usize, n: usize, update: Bytes, dir: &Path) -> Result<(Duration, Option<u64>)> {
    let addr_file = dir.join("tcp.addr");
    let mut child = ChildProc::spawn("tcp", p, n, &addr_file)?;
    let addr = child.address(&addr_file).await?;
    let ready = Arc::new(Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = TcpStream::connect(&addr).await?;
        socket.set_nodelay(true)?;
        let (ready, update) = (ready.clone(), update.clone());
        tasks.push(tokio::spawn(async move {
            let mut socket = socket;
            ready.wait().await;
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut left = p * 4;
            while left > 0 {
                let want = left.min(buf.len());
                let got = socket.read(&mut buf[..want]).await?;
                ensure!(got > 0, "server closed early");
                left -= got;
            }
            socket.write_all(&update).await?;
            let mut ack = [0u8; 1];
            socket.read_exact(&mut ack).await?;
            anyhow::Ok(Instant::now())
        }));
    }
    ready.wait().await;
    let t0 = Instant::now();
    let mut last = t0;
    for task in tasks {
        last = last.max(task.await??);
    }
    child.exit(Duration::from_secs(60)).await?;
    Ok((last - t0, read_exit_hwm(&addr_file)))
}

fn exit_hwm_file(addr_file: &Path) -> PathBuf {
    addr_file.with_extension("hwm")
}

fn read_exit_hwm(addr_file: &Path) -> Option<u64> {
    std::fs::read_to_string(exit_hwm_file(addr_file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

// ---- children ----------------------------------------------------------------------

fn child_main(role: &str) -> Result<()> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} not set"));
    let p: usize = var("COHORT_ROUND_BENCH_CHILD_P")?.parse()?;
    let n: usize = var("COHORT_ROUND_BENCH_CHILD_N")?.parse()?;
    let addr_file = PathBuf::from(var("COHORT_ROUND_BENCH_CHILD_ADDR")?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match role {
        "coordinator" => runtime.block_on(run_coordinator(p, n, &addr_file))?,
        "tcp" => runtime.block_on(run_tcp_server(p, n, &addr_file))?,
        other => bail!("unknown child role {other:?}"),
    }
    drop(runtime);
    let hwm = vm_hwm(Path::new("/proc/self/status")).context("reading own VmHWM")?;
    std::fs::write(exit_hwm_file(&addr_file), hwm.to_string())?;
    Ok(())
}

/// Writes the address so that the parent never reads a partial file.
fn publish_address(listener: &TcpListener, addr_file: &Path) -> Result<()> {
    let tmp = addr_file.with_extension("tmp");
    std::fs::write(&tmp, listener.local_addr()?.to_string())?;
    std::fs::rename(&tmp, addr_file)?;
    Ok(())
}

async fn run_coordinator(p: usize, n: usize, addr_file: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let corpus = dir.path().join("corpus.txt");
    // Byte tokens, 65-token shards: at least n training shards (one per worker).
    let sentence = "the coordinator folds every push into one running sum. ";
    let text = sentence.repeat(((n + 8) * 80).div_ceil(sentence.len()));
    std::fs::write(&corpus, text)?;
    let data_dir = dir.path().join("data");
    prepare(&PrepareOptions {
        inputs: vec![corpus],
        output: data_dir.clone(),
        tokenizer: TokenizerKind::Byte,
        context_length: 64,
        shard_tokens: 64,
        val_every: 1_000_000,
        show_progress: false,
    })?;
    let job = format!(
        r#"
name = "round-bench"
data_dir = {data:?}
run_dir = {run:?}

[model]
preset = "tiny"

[train]
rounds = 1
inner_steps = 1
shards_per_worker = 1
update_dtype = "f32"
eval_max_shards = 0

[outer]
kind = "average"

[cluster]
min_workers = {n}
min_participants = {n}
lease_ms = 600000
heartbeat_ms = 10000
round_deadline_ms = 600000
max_chunk_bytes = {CHUNK_BYTES}
chunk_timeout_ms = 120000
"#,
        data = data_dir.display().to_string(),
        run = dir.path().join("run").display().to_string(),
    );
    let job_path = dir.path().join("job.toml");
    let mut plan = JobFile::parse(&job, &job_path)?.validate()?;
    ensure!(
        plan.train_shards.len() >= n,
        "{} training shards for {n} workers",
        plan.train_shards.len()
    );
    plan.engine.tensors = vec![TensorSpec {
        name: "bench.flat".into(),
        shape: vec![p],
        init: Init::Zeros,
    }];
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    publish_address(&listener, addr_file)?;
    let outcome = server::run(listener, plan, std::future::pending()).await?;
    ensure!(outcome.finished, "job did not finish: {outcome:?}");
    Ok(())
}

async fn run_tcp_server(p: usize, n: usize, addr_file: &Path) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    publish_address(&listener, addr_file)?;
    // Non-zero so that every page is really resident, like published parameters.
    let params = Bytes::from(vec![1u8; p * 4]);
    let sum = Arc::new(Mutex::new(vec![0.0f32; p]));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (mut socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let (params, sum) = (params.clone(), sum.clone());
        tasks.push(tokio::spawn(async move {
            socket.write_all(&params).await?;
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut offset = 0;
            while offset < p {
                let len = (p - offset).min(CHUNK_BYTES / 4);
                socket.read_exact(&mut buf[..len * 4]).await?;
                let mut sum = sum.lock().expect("no panics while folding");
                let values = buf[..len * 4]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                for (s, v) in sum[offset..offset + len].iter_mut().zip(values) {
                    *s += v;
                }
                offset += len;
            }
            socket.write_all(&[1]).await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let sum = sum.lock().expect("no panics while folding");
    std::hint::black_box(sum[0]);
    Ok(())
}
