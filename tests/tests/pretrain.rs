//! End-to-end pretraining over real processes: a coordinator and workers on
//! loopback, training a tiny GPT on the committed State of the Union slice.

use std::time::Duration;

use cohort_tests::{binary, DataOptions, Job, Proc, TINY_MODEL};

const TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn two_workers_three_rounds_lower_the_held_out_loss() {
    let mut job = Job::new(DataOptions {
        context_length: 32,
        shard_tokens: 4096,
        val_every: 10,
    });
    job.write_job(&format!(
        r#"
name = "e2e-loss"
{TINY_MODEL}
[train]
rounds = 3
inner_steps = 8
micro_batch_size = 32
eval_every = 1
eval_max_shards = 2
[inner]
kind = "adamw"
lr = 3e-3
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
weight_decay = 0.0
grad_clip = 1.0
warmup_steps = 0
[outer]
kind = "nesterov"
lr = 0.7
momentum = 0.9
[cluster]
min_workers = 2
min_participants = 2
lease_ms = 10000
heartbeat_ms = 1000
"#
    ));
    job.start_coordinator();
    job.start_worker(&[]);
    job.start_worker(&[]);
    job.wait_all(TIMEOUT);

    let metrics = job.metrics();
    let rounds: Vec<_> = metrics
        .iter()
        .filter(|m| m.get("round").is_some())
        .collect();
    assert_eq!(rounds.len(), 3, "{metrics:?}");
    for (i, round) in rounds.iter().enumerate() {
        assert_eq!(round["round"], i as u64 + 1);
        assert_eq!(round["participants"], 2);
        assert!(
            round["bytes_pushed"].as_u64().unwrap() > 0 && round["tokens"].as_u64().unwrap() > 0
        );
    }
    let initial = rounds[0]["eval_loss"]
        .as_f64()
        .expect("round 1 evaluated version 0");
    // An untrained byte-level model predicts ~uniformly: ln(256) = 5.55.
    assert!(
        (initial - 256f64.ln()).abs() < 0.3,
        "initial held-out loss {initial}"
    );
    let last = metrics.last().unwrap();
    assert_eq!(last["final"], true);
    assert_eq!(last["version"], 3);
    let final_loss = last["eval_loss"].as_f64().expect("final held-out loss");
    assert!(
        final_loss < initial * 0.85,
        "held-out loss {initial} -> {final_loss} did not fall"
    );

    // The checkpoint holds every parameter under its spec name, all finite.
    let checkpoint = job.checkpoint();
    let names: Vec<&str> = checkpoint.iter().map(|(n, _, _)| n.as_str()).collect();
    for expected in [
        "wte",
        "wpe",
        "h.0.attn.c_attn.weight",
        "h.0.mlp.c_proj.bias",
        "ln_f.weight",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let wte = checkpoint.iter().find(|(n, _, _)| n == "wte").unwrap();
    assert_eq!(wte.1, vec![256, 32]);
    assert!(checkpoint
        .iter()
        .all(|(_, _, v)| v.iter().all(|x| x.is_finite())));
    let log = job.coordinator.as_ref().unwrap().output();
    assert!(
        log.contains("round committed") && log.contains("job finished"),
        "{log}"
    );
}

#[test]
fn every_training_shard_is_consumed_exactly_once_per_epoch() {
    let mut job = Job::new(DataOptions {
        context_length: 32,
        shard_tokens: 16384,
        val_every: 5,
    });
    let manifest = job.manifest();
    let train_shards = manifest["train"].as_array().unwrap().len() as u64;
    assert!(train_shards >= 5, "{train_shards} shards");
    job.write_job(&format!(
        r#"
name = "e2e-epochs"
{TINY_MODEL}
[train]
epochs = 2
inner_steps = 1
micro_batch_size = 128
eval_max_shards = 1
[outer]
kind = "average"
[cluster]
min_workers = 2
min_participants = 1
lease_ms = 10000
heartbeat_ms = 1000
"#
    ));
    job.start_coordinator();
    job.start_worker(&[]);
    job.start_worker(&[]);
    job.wait_all(TIMEOUT);

    job.assert_each_shard_consumed_once(2);
    let last = job.metrics().pop().unwrap();
    assert_eq!(
        (last["final"].as_bool(), last["epochs"].as_u64()),
        (Some(true), Some(2))
    );
}

/// One data-parallel step (H = 1, inner SGD, outer SGD at lr 1.0) is the same
/// whether one worker takes the whole batch or two workers take half each.
#[test]
fn two_workers_with_half_batches_match_one_worker_with_the_full_batch() {
    let run = |workers: usize| {
        // val_every is larger than the shard count: only the final, partial
        // shard is held out, so every training shard has the same size.
        let mut job = Job::new(DataOptions {
            context_length: 32,
            shard_tokens: 2048,
            val_every: 1000,
        });
        job.write_job(&format!(
            r#"
name = "e2e-data-parallel"
seed = 11
{TINY_MODEL}
[train]
rounds = 2
inner_steps = 1
micro_batch_size = 8
shards_per_worker = {shards}
eval_max_shards = 1
[inner]
kind = "sgd"
lr = 0.5
beta1 = 0.9
beta2 = 0.999
eps = 1e-8
weight_decay = 0.0
grad_clip = 0.0
warmup_steps = 0
[outer]
kind = "sgd"
lr = 1.0
[cluster]
min_workers = {workers}
min_participants = {workers}
lease_ms = 10000
heartbeat_ms = 1000
"#,
            shards = 2 / workers,
        ));
        job.start_coordinator();
        for _ in 0..workers {
            job.start_worker(&[]);
        }
        job.wait_all(TIMEOUT);
        let losses: Vec<f64> = job
            .metrics()
            .iter()
            .filter_map(|m| m.get("round").and(m["mean_loss"].as_f64()))
            .collect();
        (job.checkpoint(), losses)
    };
    let (one, one_losses) = run(1);
    let (two, two_losses) = run(2);
    assert_eq!(one_losses.len(), 2);
    assert!(
        one_losses[1] < one_losses[0],
        "training moved nothing: {one_losses:?}"
    );
    for (a, b) in one_losses.iter().zip(&two_losses) {
        assert!(
            (a - b).abs() < 1e-5,
            "round losses differ: {one_losses:?} vs {two_losses:?}"
        );
    }
    assert_eq!(one.len(), two.len());
    let mut worst = 0f32;
    for ((name, shape_a, a), (_, shape_b, b)) in one.iter().zip(&two) {
        assert_eq!(shape_a, shape_b, "{name}");
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst < 1e-5, "largest parameter difference {worst}");
}

#[test]
fn a_broken_job_file_fails_before_binding_and_names_the_field() {
    let job = Job::new(DataOptions {
        context_length: 32,
        shard_tokens: 4096,
        val_every: 10,
    });
    let cases = [
        ("[train]\nrounds = 1\ninner_steps = 1\n[cluster]\nmin_participants = 3\nmax_workers_per_round = 2\n", "cluster.min_participants"),
        ("[train]\nrounds = 1\ninner_stepz = 1\n", "inner_stepz"),
        ("[train]\ninner_steps = 1\n", "train.rounds"),
        ("[train]\nrounds = 1\ninner_steps = 1\n[cluster]\nheartbeat_ms = 20000\nlease_ms = 10000\n", "cluster.heartbeat_ms"),
        ("[train]\nrounds = 1\ninner_steps = 1\n[outer]\nkind = \"nesterov\"\nlr = 0.7\nmomentum = 1.5\n", "momentum"),
    ];
    for (body, field) in cases {
        job.write_job(&format!("name = \"broken\"\n{TINY_MODEL}\n{body}"));
        let addr_file = job.path("addr-broken");
        let args: Vec<String> = vec![
            "run".into(),
            "--job".into(),
            job.path("job.toml").display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--addr-file".into(),
            addr_file.display().to_string(),
        ];
        let mut proc = Proc::spawn(
            "broken-coordinator",
            &binary("cohort-coordinator"),
            &args,
            job.dir.path(),
        );
        let status = proc.wait(Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{}", proc.report("should fail"));
        assert!(
            proc.output().contains(field),
            "{}",
            proc.report(&format!("should name {field}"))
        );
        assert!(
            !addr_file.exists(),
            "bound a port despite a broken job file"
        );
    }
    // A data directory that is missing is named too.
    job.write_job(&format!(
        "name = \"no-data\"\n{TINY_MODEL}\n[train]\nrounds = 1\ninner_steps = 1\n"
    ));
    std::fs::remove_file(job.path("data/manifest.json")).unwrap();
    let args: Vec<String> = vec![
        "run".into(),
        "--job".into(),
        job.path("job.toml").display().to_string(),
    ];
    let mut proc = Proc::spawn(
        "no-data-coordinator",
        &binary("cohort-coordinator"),
        &args,
        job.dir.path(),
    );
    assert_eq!(proc.wait(Duration::from_secs(30)).code(), Some(2));
    assert!(
        proc.output().contains("manifest.json"),
        "{}",
        proc.report("should name the manifest")
    );
}
