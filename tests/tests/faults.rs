//! Faults over real processes: a worker killed with SIGKILL mid-run. Its lease
//! expires, its shards go back to the pool, and the job still consumes every
//! training shard exactly once, with or without a replacement worker.

use std::time::{Duration, Instant};

use cohort_tests::{wait_until, DataOptions, Job, TINY_MODEL};

const LEASE_MS: u64 = 3000;
const TIMEOUT: Duration = Duration::from_secs(240);
/// The worker that is killed (of workers 0, 1, 2).
const VICTIM: usize = 1;

fn kill_a_worker_after_round_one(replace: bool) {
    // 4097-token shards: ~29 training shards, so one epoch is about ten rounds
    // of three workers and the kill lands mid-epoch.
    let mut job = Job::new(DataOptions {
        context_length: 32,
        shard_tokens: 4096,
        val_every: 10,
    });
    let train_shards = job.manifest()["train"].as_array().unwrap().len() as u64;
    assert!(train_shards >= 12, "{train_shards} shards");
    job.write_job(&format!(
        r#"
name = "e2e-fault"
{TINY_MODEL}
[train]
epochs = 1
inner_steps = 16
micro_batch_size = 16
eval_max_shards = 1
[cluster]
min_workers = 2
min_participants = 2
lease_ms = {LEASE_MS}
heartbeat_ms = 500
round_deadline_ms = 120000
"#
    ));
    let start = Instant::now();
    job.start_coordinator();
    for _ in 0..3 {
        job.start_worker(&[]);
    }
    // The victim must hold a lease when it dies: on a loaded machine the
    // other two can commit round 1 before it has even joined.
    let round_one = wait_until(TIMEOUT, || {
        (job.committed_rounds() >= 1 && job.workers[VICTIM].output().contains("joined"))
            || job.coordinator.as_mut().unwrap().try_status().is_some()
    });
    assert!(
        round_one && job.committed_rounds() >= 1,
        "{}",
        job.coordinator
            .as_ref()
            .unwrap()
            .report("no round committed")
    );
    let round_one_at = start.elapsed();
    let rounds_before_kill = job.committed_rounds();
    job.workers[VICTIM].kill();
    let killed_at = Instant::now();
    assert!(
        rounds_before_kill < train_shards as usize / 3,
        "the epoch was nearly over before the kill ({rounds_before_kill} rounds)"
    );
    if replace {
        // Named worker-3: the victim keeps its slot (and log file).
        job.start_worker(&[]);
    }

    let coordinator = job.coordinator.as_mut().unwrap();
    coordinator.wait_success(TIMEOUT);
    let finished_after_kill = killed_at.elapsed();
    for (i, worker) in job.workers.iter_mut().enumerate() {
        if i != VICTIM {
            worker.wait_success(Duration::from_secs(30));
        }
    }
    let log = job.coordinator.as_ref().unwrap().output();
    let rounds_after_kill = job.committed_rounds() - rounds_before_kill;
    println!(
        "faults (replace = {replace}): round 1 committed {:.1} s after start; killed {} after {rounds_before_kill} rounds; \
         job finished {:.1} s after the kill, {rounds_after_kill} more rounds; total {:.1} s",
        round_one_at.as_secs_f64(),
        job.workers[VICTIM].name,
        finished_after_kill.as_secs_f64(),
        start.elapsed().as_secs_f64(),
    );

    assert!(log.contains("worker lease expired"), "{log}");
    assert!(log.contains("job finished"), "{log}");
    // The lease, not the round deadline, freed the round.
    assert!(
        !log.contains("round aborted"),
        "a round was aborted instead of going on without the dead worker:\n{log}"
    );
    assert!(
        finished_after_kill < Duration::from_secs(120),
        "{finished_after_kill:?}"
    );

    job.assert_each_shard_consumed_once(1);
    let metrics = job.metrics();
    let last = metrics.last().unwrap();
    assert_eq!(
        (last["final"].as_bool(), last["epochs"].as_u64()),
        (Some(true), Some(1)),
        "{metrics:?}"
    );
    if !replace {
        // Two workers are left: every round after the kill has both (the
        // round right after the count may have committed before the kill),
        // except the epoch's last, which may have a single shard left.
        let rounds: Vec<_> = metrics
            .iter()
            .filter(|m| m.get("round").is_some())
            .collect();
        let after = &rounds[(rounds_before_kill + 1).min(rounds.len())..];
        for (i, round) in after.iter().enumerate() {
            let expected = if i + 1 == after.len() { 1..=2 } else { 2..=2 };
            let participants = round["participants"].as_u64().unwrap();
            assert!(expected.contains(&participants), "{round}");
        }
    }
    if replace {
        let newcomer = job.workers.last().unwrap();
        assert!(
            newcomer.output().contains("round trained"),
            "{}",
            newcomer.report("the replacement worker never trained")
        );
        assert_eq!(log.matches("worker joined").count(), 4, "{log}");
    }
}

#[test]
fn a_worker_killed_mid_run_loses_its_lease_and_no_shard_is_lost_or_reused() {
    kill_a_worker_after_round_one(false);
}

#[test]
fn a_replacement_worker_joins_mid_run_after_a_kill() {
    kill_a_worker_after_round_one(true);
}

/// Regression: two workers, one shard each per round, `min_participants = 2`
/// and an odd number of training shards. The epoch's last round can lease
/// only one shard; it used to wait for a quorum of two that could never come,
/// be aborted at its deadline and restarted with the same shard, forever. Its
/// quorum is now the number of participants it could be given.
#[test]
fn an_epoch_whose_last_round_has_fewer_shards_than_the_quorum_still_finishes() {
    let mut job = Job::new(DataOptions {
        context_length: 32,
        shard_tokens: 4096,
        val_every: 10,
    });
    let train_shards = job.manifest()["train"].as_array().unwrap().len() as u64;
    assert_eq!(train_shards % 2, 1, "needs an odd number of shards");
    job.write_job(&format!(
        r#"
name = "e2e-quorum-tail"
{TINY_MODEL}
[train]
epochs = 1
inner_steps = 1
micro_batch_size = 4
eval_max_shards = 1
[cluster]
min_workers = 2
min_participants = 2
lease_ms = {LEASE_MS}
heartbeat_ms = 500
round_deadline_ms = 2000
"#
    ));
    job.start_coordinator();
    job.start_worker(&[]);
    job.start_worker(&[]);
    let coordinator = job.coordinator.as_mut().unwrap();
    let finished = wait_until(Duration::from_secs(60), || {
        coordinator.try_status().is_some()
    });
    assert!(
        finished,
        "{}",
        coordinator.report("still running a minute later")
    );
    job.wait_all(Duration::from_secs(30));
}
