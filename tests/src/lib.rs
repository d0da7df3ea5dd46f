//! Harness for the end-to-end tests: real `cohort-coordinator` and
//! `cohort-worker` processes on loopback, each in a temp dir, killed on drop,
//! with their output captured and shown when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A binary built by `cargo build --workspace --bins` in the same profile as the test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

/// A child process whose output goes to a log file; killed when dropped.
pub struct Proc {
    pub name: String,
    command_line: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let command_line = format!("{} {}", program.display(), args.join(" "));
        Proc {
            name: name.to_string(),
            command_line,
            child,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits for the process to exit; panics with its output after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        if wait_until(timeout, || self.try_status().is_some()) {
            return self.status.expect("status");
        }
        let _ = self.child.kill();
        panic!(
            "{}",
            self.report(&format!("did not exit within {timeout:?}"))
        );
    }

    /// Waits and asserts a zero exit.
    pub fn wait_success(&mut self, timeout: Duration) {
        let status = self.wait(timeout);
        assert!(
            status.success(),
            "{}",
            self.report(&format!("exited with {status}"))
        );
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The failure text: command line, status and the tail of the output.
    pub fn report(&self, what: &str) -> String {
        let output = self.output();
        let tail: String = {
            let lines: Vec<&str> = output.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        format!(
            "{} {what}\ncommand: {}\n--- last output ---\n{tail}\n---",
            self.name, self.command_line
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            self.kill();
        }
    }
}

/// A model small enough for end-to-end tests on two CPU cores (job-file TOML).
pub const TINY_MODEL: &str = r#"
[model]
vocab_size = 256
context_length = 32
n_layer = 1
n_head = 2
d_model = 32
"#;

/// A job's directory: data prepared from the committed fixture, a job file,
/// and the processes running it.
pub struct Job {
    pub dir: tempfile::TempDir,
    pub coordinator: Option<Proc>,
    pub workers: Vec<Proc>,
    pub addr: Option<String>,
}

/// Options for preparing the fixture corpus.
pub struct DataOptions {
    pub context_length: u32,
    pub shard_tokens: u64,
    pub val_every: usize,
}

impl Job {
    /// Prepares `data/fixtures/sotu` (byte-level) into `<dir>/data`.
    pub fn new(data: DataOptions) -> Job {
        let dir = tempfile::tempdir().expect("temp dir");
        let fixture = workspace_root().join("data/fixtures/sotu");
        let args: Vec<String> = vec![
            "prepare".into(),
            "--input".into(),
            fixture.display().to_string(),
            "--output".into(),
            dir.path().join("data").display().to_string(),
            "--tokenizer".into(),
            "byte".into(),
            "--context-length".into(),
            data.context_length.to_string(),
            "--shard-tokens".into(),
            data.shard_tokens.to_string(),
            "--val-every".into(),
            data.val_every.to_string(),
        ];
        let mut prepare = Proc::spawn("prepare", &binary("cohort-coordinator"), &args, dir.path());
        prepare.wait_success(Duration::from_secs(60));
        Job {
            dir,
            coordinator: None,
            workers: Vec::new(),
            addr: None,
        }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn manifest(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path("data/manifest.json")).expect("manifest");
        serde_json::from_str(&text).expect("manifest json")
    }

    /// Writes the job file (`data_dir = "data"`, `run_dir = "run"` are prepended).
    pub fn write_job(&self, body: &str) -> PathBuf {
        let path = self.path("job.toml");
        std::fs::write(
            &path,
            format!("data_dir = \"data\"\nrun_dir = \"run\"\n{body}"),
        )
        .expect("job file");
        path
    }

    /// Starts the coordinator on 127.0.0.1:0 and waits until it listens.
    pub fn start_coordinator(&mut self) {
        self.start_coordinator_with(&[]);
    }

    /// [`Job::start_coordinator`] with more `run` flags; with `--tls-cert` the
    /// workers' address is `https://`.
    pub fn start_coordinator_with(&mut self, extra: &[&str]) {
        let addr_file = self.path("addr");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--job".into(),
            self.path("job.toml").display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--addr-file".into(),
            addr_file.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let scheme = if extra.contains(&"--tls-cert") {
            "https"
        } else {
            "http"
        };
        let mut proc = Proc::spawn(
            "coordinator",
            &binary("cohort-coordinator"),
            &args,
            self.dir.path(),
        );
        let up = wait_until(Duration::from_secs(30), || {
            addr_file.exists() || proc.try_status().is_some()
        });
        assert!(
            up && addr_file.exists(),
            "{}",
            proc.report("did not start listening")
        );
        self.addr = Some(format!(
            "{scheme}://{}",
            std::fs::read_to_string(&addr_file).expect("addr")
        ));
        self.coordinator = Some(proc);
    }

    /// Starts a pretraining worker against the running coordinator.
    pub fn start_worker(&mut self, extra: &[&str]) {
        let name = format!("worker-{}", self.workers.len());
        let mut args: Vec<String> = vec![
            "pretrain".into(),
            "--coordinator".into(),
            self.addr.clone().expect("coordinator started"),
            "--data-dir".into(),
            self.path("data").display().to_string(),
            "--device".into(),
            "cpu".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(&name, &binary("cohort-worker"), &args, self.dir.path());
        self.workers.push(proc);
    }

    /// Waits for the coordinator and every worker to exit with status 0.
    pub fn wait_all(&mut self, timeout: Duration) {
        let coordinator = self.coordinator.as_mut().expect("coordinator");
        coordinator.wait_success(timeout);
        for worker in &mut self.workers {
            worker.wait_success(Duration::from_secs(30));
        }
    }

    /// The run directory's per-round metrics (one JSON value per line).
    pub fn metrics(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.path("run/metrics.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("metrics line"))
            .collect()
    }

    /// Asserts that `ledger.json` consumes every training shard exactly once
    /// in each of the first `epochs` epochs, and nothing else.
    pub fn assert_each_shard_consumed_once(&self, epochs: u64) {
        let train_shards = self.manifest()["train"]
            .as_array()
            .expect("train shards")
            .len() as u64;
        let mut uses: std::collections::BTreeMap<(u64, u64), u32> = Default::default();
        for line in self.ledger() {
            let key = (
                line["epoch"].as_u64().expect("epoch"),
                line["shard"].as_u64().expect("shard"),
            );
            *uses.entry(key).or_default() += 1;
        }
        for epoch in 0..epochs {
            for shard in 0..train_shards {
                assert_eq!(
                    uses.get(&(epoch, shard)),
                    Some(&1),
                    "epoch {epoch} shard {shard}: {uses:?}"
                );
            }
        }
        assert_eq!(
            uses.len() as u64,
            epochs * train_shards,
            "a shard outside the training split was consumed: {uses:?}"
        );
    }

    pub fn ledger(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.path("run/ledger.json")).expect("ledger.json");
        serde_json::from_str(&text).expect("ledger json")
    }

    /// The final checkpoint's tensors, by name.
    pub fn checkpoint(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let last = self
            .metrics()
            .into_iter()
            .rev()
            .find(|m| m["final"] == true)
            .expect("final metrics line");
        let path = PathBuf::from(last["checkpoint"].as_str().expect("checkpoint path"));
        let bytes = std::fs::read(&path).expect("checkpoint file");
        let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut out: Vec<_> = tensors
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                (
                    name,
                    view.shape().to_vec(),
                    bytemuck::pod_collect_to_vec(view.data()),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// A `kB` field (`VmHWM`, `VmRSS`, ...) of `/proc/<pid>/status`, in KiB;
/// `None` once the process has exited (or off Linux).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// Samples a process's peak resident set (`VmHWM`) every 50 ms on a thread
/// until the process exits or [`RssSampler::stop`] is called. `VmHWM` is a
/// high-water mark, so the last sample before exit holds the peak of the run
/// up to then.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<RssPeak>>,
}

/// What an [`RssSampler`] saw, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RssPeak {
    /// The last `VmHWM` read: the process's peak resident set so far.
    pub hwm_kib: u64,
    /// The largest `VmRSS` sampled.
    pub max_rss_kib: u64,
    pub samples: u64,
}

impl RssSampler {
    /// Starts sampling `pid`; gives up after `limit` in any case.
    pub fn start(pid: u32, limit: Duration) -> RssSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = RssPeak::default();
            let start = Instant::now();
            while start.elapsed() < limit && !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let Some(hwm) = proc_status_kib(pid, "VmHWM") else {
                    break;
                };
                peak.hwm_kib = peak.hwm_kib.max(hwm);
                if let Some(rss) = proc_status_kib(pid, "VmRSS") {
                    peak.max_rss_kib = peak.max_rss_kib.max(rss);
                }
                peak.samples += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling (if the process still runs) and returns the peak.
    pub fn stop(mut self) -> RssPeak {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("sampler thread"))
            .unwrap_or_default()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Job {
    /// Rounds committed so far, from `metrics.jsonl`; safe to call while the
    /// coordinator is writing it (a partly written line is not counted).
    pub fn committed_rounds(&self) -> usize {
        let text = std::fs::read_to_string(self.path("run/metrics.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m.get("round").is_some())
            .count()
    }
}

/// The last line of `output` that is a JSON object with `key` set: how
/// `cohort-loadgen` reports its summary.
pub fn json_line_with(output: &str, key: &str) -> Option<serde_json::Value> {
    output.lines().rev().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
        value.get(key).is_some().then_some(value)
    })
}

impl Job {
    /// Starts another coordinator process for the same job file and run
    /// directory, listening on the address the first one had (so running
    /// workers find it again), and waits until it listens. Its output goes to
    /// `<name>.log`; the previous coordinator is dropped (killed if alive).
    pub fn restart_coordinator(&mut self, name: &str) {
        let listen = self
            .addr
            .clone()
            .expect("coordinator started before")
            .trim_start_matches("http://")
            .to_string();
        let addr_file = self.path("addr");
        let _ = std::fs::remove_file(&addr_file);
        if let Some(mut old) = self.coordinator.take() {
            old.kill();
        }
        let args = vec![
            "run".into(),
            "--job".into(),
            self.path("job.toml").display().to_string(),
            "--listen".into(),
            listen,
            "--addr-file".into(),
            addr_file.display().to_string(),
        ];
        let mut proc = Proc::spawn(name, &binary("cohort-coordinator"), &args, self.dir.path());
        let up = wait_until(Duration::from_secs(30), || {
            addr_file.exists() || proc.try_status().is_some()
        });
        assert!(
            up && addr_file.exists(),
            "{}",
            proc.report("did not start listening")
        );
        self.coordinator = Some(proc);
    }

    /// The round numbers of `metrics.jsonl`'s committed-round lines, in file
    /// order; a partly written line is skipped.
    pub fn round_numbers(&self) -> Vec<u64> {
        let text = std::fs::read_to_string(self.path("run/metrics.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|m| m.get("round").and_then(|r| r.as_u64()))
            .collect()
    }
}

/// Sends `signal` (as `kill -s` names it, e.g. `TERM`) to process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -s {signal} {pid} failed");
}

/// The value of `key=` in a text log line (up to the next space), if present.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!(" {key}=");
    let start = line.find(&pattern)? + pattern.len();
    let rest = &line[start..];
    Some(rest.split(' ').next().unwrap_or(rest))
}

/// A federated job's directory: client sites prepared from a committed
/// fixture (`prepare-federated`: Shakespeare text or labeled sentiment
/// sentences), a job file, and the processes.
pub struct FederatedJob {
    pub job: Job,
    /// Client site names, in `enrollment.toml` order.
    pub clients: Vec<String>,
}

impl FederatedJob {
    /// Prepares `clients` Shakespeare client sites (text) into `<dir>/clients`.
    pub fn new(clients: usize) -> FederatedJob {
        FederatedJob::prepare(clients, &["--plays", "shakespeare", "--min-chars", "300"])
    }

    /// Prepares `clients` sentiment client sites (labeled examples, split by
    /// domain) into `<dir>/clients`.
    pub fn sentiment(clients: usize) -> FederatedJob {
        FederatedJob::prepare(clients, &["--sentiment", "sentiment"])
    }

    /// `source` is prepare-federated's source flag and the fixture under
    /// data/fixtures, then any further flags.
    fn prepare(clients: usize, source: &[&str]) -> FederatedJob {
        let dir = tempfile::tempdir().expect("temp dir");
        let fixture = workspace_root().join("data/fixtures").join(source[1]);
        let mut args: Vec<String> = vec![
            "prepare-federated".into(),
            source[0].into(),
            fixture.display().to_string(),
            "--out".into(),
            dir.path().join("clients").display().to_string(),
            "--clients".into(),
            clients.to_string(),
        ];
        args.extend(source[2..].iter().map(|s| s.to_string()));
        let mut prepare = Proc::spawn(
            "prepare-federated",
            &binary("cohort-coordinator"),
            &args,
            dir.path(),
        );
        prepare.wait_success(Duration::from_secs(60));
        let enrollment: toml::Value = toml::from_str(
            &std::fs::read_to_string(dir.path().join("clients/enrollment.toml"))
                .expect("enrollment"),
        )
        .expect("enrollment toml");
        let clients = enrollment["client"]
            .as_array()
            .expect("clients")
            .iter()
            .map(|c| c["name"].as_str().expect("name").to_string())
            .collect();
        FederatedJob {
            job: Job {
                dir,
                coordinator: None,
                workers: Vec::new(),
                addr: None,
            },
            clients,
        }
    }

    /// Writes the job file (`run_dir = "run"` and the enrollment are set).
    pub fn write_job(&self, body: &str) -> PathBuf {
        let path = self.job.path("job.toml");
        let body = body.replace(
            "[federated]",
            "[federated]\nenrollment = \"clients/enrollment.toml\"",
        );
        std::fs::write(&path, format!("run_dir = \"run\"\n{body}")).expect("job file");
        path
    }

    /// Starts client site `name` with its own token file.
    pub fn start_client(&mut self, name: &str, extra: &[&str]) {
        let site = self.job.path("clients").join(name);
        let mut args: Vec<String> = vec![
            "federated".into(),
            "--coordinator".into(),
            self.job.addr.clone().expect("coordinator started"),
            "--data".into(),
            site.display().to_string(),
            "--token-file".into(),
            site.join("token").display().to_string(),
            "--device".into(),
            "cpu".into(),
            "--threads".into(),
            "1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(name, &binary("cohort-worker"), &args, self.job.dir.path());
        self.job.workers.push(proc);
    }

    /// The privacy ledger's rows: (round, epsilon after the charge).
    pub fn privacy_charges(&self) -> Vec<(u64, f64)> {
        let conn = rusqlite::Connection::open(self.job.path("run/cohort.sqlite")).expect("store");
        let mut statement = conn
            .prepare("SELECT round, epsilon_after FROM privacy_charges ORDER BY id")
            .expect("privacy table");
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)))
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    }
}
