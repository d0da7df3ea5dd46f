//! Load: one real coordinator and 200 simulated clients (`cohort-loadgen`)
//! for 5 rounds of a ~120k-parameter model. Heartbeats must stay far inside
//! the lease and the coordinator's memory must stay bounded.

use std::time::Duration;

use cohort_core::model::ModelConfig;
use cohort_tests::{binary, json_line_with, DataOptions, Job, Proc, RssPeak, RssSampler};

const CLIENTS: u64 = 200;
const ROUNDS: u64 = 5;
const LEASE_MS: u64 = 10_000;
/// The whole run (5 rounds of 200 pulls and 200 serialised pushes of ~0.5 MB)
/// takes well under a minute on two cores; this is the hang guard.
const LOADGEN_TIMEOUT_S: u64 = 240;
/// Simulated training time per round, so that rounds overlap heartbeats.
const TRAIN_MS: u64 = 500;
/// Fixed part of the coordinator's memory: binary, runtime, tracing, and
/// 200 connections' bookkeeping. Measured: 8.5 MiB at start, 12 MiB peak
/// with one client, 20-21 MiB peak with 200 clients whose pulls and pushes
/// are paced one at a time (that includes the model copies below).
const FIXED_MIB: f64 = 32.0;
/// The coordinator's HTTP/2 stream window (`server::HTTP2_STREAM_WINDOW`,
/// 256 KiB): how much of a push it accepts before the handler reads it.
const SERVER_STREAM_WINDOW_MIB: f64 = 256.0 / 1024.0;

struct Load {
    summary: serde_json::Value,
    metrics: Vec<serde_json::Value>,
    peak: RssPeak,
    parameters: u64,
    model_mib: f64,
}

impl Load {
    fn peak_mib(&self) -> f64 {
        self.peak.hwm_kib as f64 / 1024.0
    }

    /// The coordinator's own state: the parameters, the running sum, its undo
    /// buffer and the momentum buffer (ARCHITECTURE.md: O(parameters),
    /// independent of the number of workers), 4 model copies plus a transient
    /// fifth while a commit swaps buffers; 8 copies leave margin.
    fn parameters_bound_mib(&self) -> f64 {
        FIXED_MIB + 8.0 * self.model_mib
    }
}

/// Runs the 200-client job and checks what every load run must satisfy:
/// all rounds committed by all clients, no failed call, no lease at risk.
fn run_load(extra_loadgen_args: &[&str]) -> Load {
    // 97-token shards (3 windows of 32, + 1): ~1,300 training shards, so each
    // of the 5 rounds leases one fresh shard to each of the 200 clients.
    let mut job = Job::new(DataOptions {
        context_length: 32,
        shard_tokens: 96,
        val_every: 100,
    });
    let train_shards = job.manifest()["train"].as_array().unwrap().len() as u64;
    assert!(
        train_shards >= CLIENTS * ROUNDS,
        "{train_shards} training shards cannot give {CLIENTS} clients one each for {ROUNDS} rounds"
    );
    let model = ModelConfig {
        vocab_size: 256,
        context_length: 32,
        n_layer: 2,
        n_head: 2,
        d_model: 64,
        dropout: 0.0,
    };
    let parameters = model.parameter_count() as u64;
    assert!(
        (90_000..150_000).contains(&parameters),
        "{parameters} parameters"
    );
    job.write_job(&format!(
        r#"
name = "load-200"
[model]
vocab_size = {vocab}
context_length = {context}
n_layer = {layers}
n_head = {heads}
d_model = {d_model}
[train]
rounds = {ROUNDS}
inner_steps = 1
micro_batch_size = 1
shards_per_worker = 1
eval_max_shards = 1
[outer]
kind = "nesterov"
lr = 0.7
momentum = 0.9
[cluster]
min_workers = {CLIENTS}
min_participants = 150
lease_ms = {LEASE_MS}
heartbeat_ms = 1000
round_deadline_ms = 180000
# Pushes fold one at a time: a push's chunks may wait behind ~200 others.
chunk_timeout_ms = 120000
max_chunk_bytes = 32768
"#,
        vocab = model.vocab_size,
        context = model.context_length,
        layers = model.n_layer,
        heads = model.n_head,
        d_model = model.d_model,
    ));
    job.start_coordinator();
    let coordinator_pid = job.coordinator.as_ref().unwrap().pid();
    let sampler = RssSampler::start(coordinator_pid, Duration::from_secs(LOADGEN_TIMEOUT_S + 60));

    let mut args: Vec<String> = vec![
        "--coordinator".into(),
        job.addr.clone().unwrap(),
        "--clients".into(),
        CLIENTS.to_string(),
        "--rounds".into(),
        ROUNDS.to_string(),
        "--train-ms".into(),
        TRAIN_MS.to_string(),
        "--timeout-s".into(),
        LOADGEN_TIMEOUT_S.to_string(),
    ];
    args.extend(extra_loadgen_args.iter().map(|a| a.to_string()));
    let mut loadgen = Proc::spawn("loadgen", &binary("cohort-loadgen"), &args, job.dir.path());
    let status = loadgen.wait(Duration::from_secs(LOADGEN_TIMEOUT_S + 30));
    let coordinator = job.coordinator.as_mut().unwrap();
    coordinator.wait_success(Duration::from_secs(60));
    let peak = sampler.stop();
    assert!(
        status.success(),
        "{}",
        loadgen.report(&format!("exited with {status}"))
    );
    let summary = json_line_with(&loadgen.output(), "loadgen")
        .unwrap_or_else(|| panic!("{}", loadgen.report("printed no summary")));
    let load = Load {
        summary,
        metrics: job.metrics(),
        peak,
        parameters,
        model_mib: (parameters * 4) as f64 / (1 << 20) as f64,
    };
    let summary = &load.summary;
    println!(
        "load: {CLIENTS} clients, {ROUNDS} rounds, {parameters} parameters ({:.2} MiB f32), loadgen {extra_loadgen_args:?}: \
         coordinator peak RSS {:.1} MiB (VmHWM, {} samples), heartbeats {} p50 {} ms p99 {} ms max {} ms, \
         max lease gap {} ms, wall {:.1} s",
        load.model_mib,
        load.peak_mib(),
        peak.samples,
        summary["heartbeats"],
        summary["heartbeat_p50_ms"],
        summary["heartbeat_p99_ms"],
        summary["heartbeat_max_ms"],
        summary["max_lease_gap_ms"],
        summary["wall_s"].as_f64().unwrap_or_default(),
    );
    println!("load: loadgen summary {summary}");

    // Every round committed with every client taking part.
    let rounds: Vec<_> = load
        .metrics
        .iter()
        .filter(|m| m.get("round").is_some())
        .collect();
    assert_eq!(rounds.len() as u64, ROUNDS, "{:?}", load.metrics);
    for (i, round) in rounds.iter().enumerate() {
        assert_eq!(round["round"], i as u64 + 1);
        assert_eq!(round["participants"], CLIENTS, "{round}");
    }
    assert_eq!(load.metrics.last().unwrap()["final"], true);
    assert_eq!(summary["clients"], CLIENTS);
    assert_eq!(summary["rounds_committed"], ROUNDS, "{summary}");
    assert_eq!(summary["pushes_accepted"], CLIENTS * ROUNDS, "{summary}");
    assert_eq!(summary["done"], CLIENTS, "{summary}");
    assert_eq!(
        summary["joins"], CLIENTS,
        "a client lost its lease: {summary}"
    );
    assert_eq!(summary["unexpected_errors"], 0, "{summary}");
    assert_eq!(
        summary["errors"],
        serde_json::json!({}),
        "no call may fail, not even transiently: {summary}"
    );
    assert!(
        summary["heartbeats"].as_u64().unwrap() >= CLIENTS,
        "{summary}"
    );
    assert_eq!(summary["heartbeats_slower_than_lease"], 0, "{summary}");
    assert!(
        summary["max_lease_gap_ms"].as_f64().unwrap() < LEASE_MS as f64,
        "{summary}"
    );
    assert!(
        peak.hwm_kib > 0,
        "no RSS sample of the coordinator was taken"
    );
    load
}

/// 200 clients that pull and push as soon as they can. The coordinator holds
/// its own O(parameters) state plus, per connection, at most its HTTP/2 stream
/// window (256 KiB) for a push waiting for the fold: a per-worker constant that
/// does not grow with the model. (Before pushes waited for the fold permit
/// before reading their header, and with hyper's 1 MiB default window, this
/// run peaked at 44-85 MiB.)
#[test]
fn two_hundred_clients_five_rounds_keep_leases_and_memory_bounded() {
    let load = run_load(&[]);
    let bound_mib = load.parameters_bound_mib() + CLIENTS as f64 * SERVER_STREAM_WINDOW_MIB;
    assert!(
        load.peak_mib() < bound_mib,
        "coordinator peak RSS {:.1} MiB exceeds {bound_mib:.1} MiB \
         ({FIXED_MIB} MiB + 8 x {:.2} MiB model + {CLIENTS} x {SERVER_STREAM_WINDOW_MIB} MiB window)",
        load.peak_mib(),
        load.model_mib
    );
}

/// The same clients paced to one pull and one push in flight at a time: the
/// coordinator's memory is then what it holds itself, and must be
/// O(parameters), independent of the 200 connections.
#[test]
fn coordinator_memory_is_o_parameters_when_transfers_do_not_queue() {
    let load = run_load(&["--max-pulls-in-flight", "1", "--max-pushes-in-flight", "1"]);
    let bound_mib = load.parameters_bound_mib();
    assert!(
        load.peak_mib() < bound_mib,
        "coordinator peak RSS {:.1} MiB exceeds {bound_mib:.1} MiB ({FIXED_MIB} MiB + 8 x {:.2} MiB model, {} parameters)",
        load.peak_mib(),
        load.model_mib,
        load.parameters
    );
}
