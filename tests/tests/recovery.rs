//! Crash recovery over real processes: the coordinator is killed (-9),
//! stopped (SIGTERM) or finds its newest checkpoint corrupt, and a restarted
//! coordinator resumes from the run store without losing a committed round or
//! consuming a shard twice.

use std::time::{Duration, Instant};

use cohort_tests::{
    binary, log_field, send_signal, wait_until, DataOptions, Job, Proc, TINY_MODEL,
};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A job of one epoch over ~34 shards, one shard per round and worker, a
/// checkpoint after every round.
fn job_body(name: &str, limit: &str) -> String {
    format!(
        r#"
name = "{name}"
{TINY_MODEL}
[train]
{limit}
inner_steps = 4
micro_batch_size = 16
eval_max_shards = 1
checkpoint_every = 1
[outer]
kind = "nesterov"
lr = 0.7
momentum = 0.9
[cluster]
min_workers = 1
min_participants = 1
lease_ms = 4000
heartbeat_ms = 500
"#
    )
}

fn new_job() -> Job {
    Job::new(DataOptions {
        context_length: 32,
        shard_tokens: 4096,
        val_every: 10,
    })
}

/// The log without ANSI colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn lines_with<'a>(log: &'a str, message: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(message)).collect()
}

fn field_u64(line: &str, key: &str) -> u64 {
    log_field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn wait_for_rounds(job: &mut Job, rounds: usize) {
    let ok = wait_until(TIMEOUT, || {
        job.round_numbers().len() >= rounds
            || job.coordinator.as_mut().unwrap().try_status().is_some()
    });
    let coordinator = job.coordinator.as_ref().unwrap();
    assert!(
        ok && job.round_numbers().len() >= rounds,
        "{}",
        coordinator.report(&format!("did not commit {rounds} rounds"))
    );
    assert!(
        !job.metrics().iter().any(|m| m["final"] == true),
        "the job ended before it could be interrupted"
    );
}

#[test]
fn a_killed_coordinator_resumes_without_losing_or_repeating_a_shard() {
    let mut job = new_job();
    job.write_job(&job_body("recovery-kill", "epochs = 1"));
    job.start_coordinator();
    job.start_worker(&[]);
    wait_for_rounds(&mut job, 3);
    job.coordinator.as_mut().unwrap().kill();
    let before = job.round_numbers();

    let restarted = Instant::now();
    job.restart_coordinator("coordinator-2");
    let listening_ms = restarted.elapsed().as_millis();
    job.wait_all(TIMEOUT);

    let log = plain(&job.coordinator.as_ref().unwrap().output());
    let resumed = lines_with(&log, "resumed from checkpoint");
    assert_eq!(resumed.len(), 1, "{log}");
    let next_round = field_u64(resumed[0], "next_round");
    let recovery_ms = field_u64(resumed[0], "recovery_ms");
    eprintln!(
        "resumed at round {next_round} after {} rounds committed before the kill; recovery {recovery_ms} ms, listening again after {listening_ms} ms",
        before.len()
    );
    // Rounds before the resume point ran once, in order; at most the last
    // committed round (not yet durable at the kill) is run again.
    let first_run: Vec<u64> = before.iter().copied().filter(|&r| r < next_round).collect();
    assert_eq!(first_run, (1..next_round).collect::<Vec<_>>(), "{before:?}");
    assert!(
        before.len() as u64 - first_run.len() as u64 <= 2,
        "lost more than the round in flight: {before:?}, resumed at {next_round}"
    );
    assert!(next_round >= 2, "no checkpoint before the kill");
    let after: Vec<u64> = job.round_numbers()[before.len()..].to_vec();
    assert_eq!(
        after,
        (next_round..next_round + after.len() as u64).collect::<Vec<_>>(),
        "round numbers continue from the checkpoint"
    );
    job.assert_each_shard_consumed_once(1);
    let markers: Vec<_> = job
        .metrics()
        .into_iter()
        .filter(|m| m["resumed"] == true)
        .collect();
    assert_eq!(markers.len(), 1);
    assert_eq!(markers[0]["next_round"].as_u64(), Some(next_round));
    let last = job.metrics().pop().unwrap();
    assert_eq!(
        (last["final"].as_bool(), last["epochs"].as_u64()),
        (Some(true), Some(1))
    );
    assert_eq!(
        last["version"].as_u64(),
        Some(next_round - 1 + after.len() as u64)
    );
}

#[test]
fn a_corrupt_checkpoint_falls_back_to_the_previous_one() {
    let mut job = new_job();
    job.write_job(&job_body("recovery-corrupt", "rounds = 3"));
    job.start_coordinator();
    job.start_worker(&[]);
    job.wait_all(TIMEOUT);
    let log = plain(&job.coordinator.as_ref().unwrap().output());
    let stored = lines_with(&log, "checkpoint stored");
    assert!(stored.len() >= 3, "{log}");
    let file_of = |line: &str| log_field(line, "file").expect("file").to_string();
    let newest = file_of(stored[stored.len() - 1]);
    let previous = file_of(stored[stored.len() - 2]);

    // Flip bytes in the middle of the newest checkpoint's tensors.
    let path = job.path("run").join(&newest);
    let mut bytes = std::fs::read(&path).expect("newest checkpoint");
    let middle = bytes.len() / 2;
    for byte in &mut bytes[middle..middle + 16] {
        *byte ^= 0xff;
    }
    std::fs::write(&path, bytes).unwrap();

    job.write_job(&job_body("recovery-corrupt", "rounds = 5"));
    job.workers.clear();
    job.restart_coordinator("coordinator-2");
    job.start_worker(&[]);
    job.wait_all(TIMEOUT);
    let log = plain(&job.coordinator.as_ref().unwrap().output());
    let warning = lines_with(&log, "checkpoint is corrupt or torn");
    assert!(
        warning.len() == 1 && warning[0].contains(&newest),
        "no warning naming {newest}:\n{log}"
    );
    let resumed = lines_with(&log, "resumed from checkpoint");
    assert!(
        resumed.len() == 1 && resumed[0].contains(&previous),
        "did not resume from {previous}:\n{log}"
    );
    let rounds = job.round_numbers();
    assert_eq!(&rounds[..3], &[1, 2, 3]);
    let resumed_round = field_u64(resumed[0], "next_round");
    assert_eq!(
        &rounds[3..],
        (resumed_round..=5).collect::<Vec<_>>().as_slice(),
        "{rounds:?}"
    );
    let last = job.metrics().pop().unwrap();
    assert_eq!(
        (last["final"].as_bool(), last["version"].as_u64()),
        (Some(true), Some(5))
    );
}

#[test]
fn sigterm_checkpoints_exits_zero_and_a_restart_resumes_there() {
    let mut job = new_job();
    job.write_job(&job_body("recovery-sigterm", "epochs = 1"));
    job.start_coordinator();
    job.start_worker(&[]);
    wait_for_rounds(&mut job, 2);
    let coordinator = job.coordinator.as_mut().unwrap();
    let stopped = Instant::now();
    send_signal(coordinator.pid(), "TERM");
    let status = coordinator.wait(Duration::from_secs(15));
    let stop_ms = stopped.elapsed().as_millis();
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        coordinator.report("exit after SIGTERM")
    );
    let log = plain(&coordinator.output());
    let stored = lines_with(&log, "checkpoint stored");
    let last_stored = *stored.last().expect("a checkpoint on shutdown");
    let version = field_u64(last_stored, "version");
    let file = log_field(last_stored, "file").unwrap().to_string();
    assert!(lines_with(&log, "stopping: writing a checkpoint").len() == 1);

    job.restart_coordinator("coordinator-2");
    job.wait_all(TIMEOUT);
    let log = plain(&job.coordinator.as_ref().unwrap().output());
    let resumed = lines_with(&log, "resumed from checkpoint");
    assert!(
        resumed.len() == 1 && resumed[0].contains(&file),
        "did not resume from {file}:\n{log}"
    );
    assert_eq!(field_u64(resumed[0], "version"), version);
    eprintln!(
        "stopped in {stop_ms} ms at version {version}; recovery {} ms",
        field_u64(resumed[0], "recovery_ms")
    );
    job.assert_each_shard_consumed_once(1);
    let rounds = job.round_numbers();
    let mut sorted = rounds.clone();
    sorted.dedup();
    assert_eq!(sorted, rounds, "a round number was reused: {rounds:?}");
    assert_eq!(
        rounds,
        (1..=rounds.len() as u64).collect::<Vec<_>>(),
        "{rounds:?}"
    );
}

#[test]
fn a_run_directory_of_another_job_is_refused_with_what_differs() {
    let mut job = new_job();
    job.write_job(&job_body("recovery-mismatch", "rounds = 2"));
    job.start_coordinator();
    job.start_worker(&[]);
    job.wait_all(TIMEOUT);
    job.write_job(
        &job_body("recovery-mismatch", "rounds = 2").replace("d_model = 32", "d_model = 64"),
    );
    let args: Vec<String> = vec![
        "run".into(),
        "--job".into(),
        job.path("job.toml").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    let mut proc = Proc::spawn(
        "coordinator-2",
        &binary("cohort-coordinator"),
        &args,
        job.dir.path(),
    );
    let status = proc.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", proc.report("should refuse"));
    let log = plain(&proc.output());
    assert!(
        log.contains("belongs to another job") && log.contains("model is"),
        "{}",
        proc.report("should name the model")
    );
    // --fresh refuses a run directory with checkpoints even of the same job.
    job.write_job(&job_body("recovery-mismatch", "rounds = 2"));
    let mut args = args;
    args.push("--fresh".into());
    let mut proc = Proc::spawn(
        "coordinator-3",
        &binary("cohort-coordinator"),
        &args,
        job.dir.path(),
    );
    assert_eq!(proc.wait(Duration::from_secs(30)).code(), Some(2));
    assert!(
        proc.output().contains("--fresh"),
        "{}",
        proc.report("should explain --fresh")
    );
}
