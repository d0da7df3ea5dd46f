//! Federated fine-tuning over real processes: a coordinator and client sites
//! (`cohort-worker federated`) on loopback, each site with its own slice of
//! Shakespeare (next-token) or of the sentiment sentences (classification) and
//! its own enrollment token.

use std::time::Duration;

use cohort_tests::{binary, send_signal, wait_until, FederatedJob, Proc};

const TIMEOUT: Duration = Duration::from_secs(240);

/// A LoRA job on a tiny model with distributed DP.
fn job(rounds: u64, sample_rate: f64, min_clients: usize, epsilon: f64) -> String {
    format!(
        r#"
name = "federated-e2e"
seed = 7
[model]
vocab_size = 256
context_length = 32
n_layer = 1
n_head = 2
d_model = 32
[train]
rounds = {rounds}
inner_steps = 4
micro_batch_size = 8
checkpoint_every = 1
[inner]
kind = "adamw"
lr = 3e-3
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
weight_decay = 0.0
grad_clip = 1.0
warmup_steps = 0
[cluster]
min_workers = {min_clients}
min_participants = {min_clients}
lease_ms = 6000
heartbeat_ms = 500
round_deadline_ms = 60000
[federated]
trainable = "lora"
lora_rank = 2
sample_rate = {sample_rate}
[federated.dp]
mode = "distributed"
clip_norm = 0.5
noise_multiplier = 1.0
epsilon = {epsilon}
delta = 1e-5
"#
    )
}

#[test]
fn six_clients_five_dp_rounds_charge_the_ledger_before_every_release() {
    let mut fed = FederatedJob::new(6);
    fed.write_job(&job(5, 1.0, 6, 50.0));
    fed.job.start_coordinator();
    for name in fed.clients.clone() {
        fed.start_client(&name, &[]);
    }
    fed.job.wait_all(TIMEOUT);

    let rounds: Vec<serde_json::Value> = fed
        .job
        .metrics()
        .into_iter()
        .filter(|m| m.get("epsilon_spent").is_some())
        .collect();
    assert_eq!(rounds.len(), 5, "{rounds:?}");
    let charges = fed.privacy_charges();
    assert_eq!(charges.len(), 5);
    let mut previous = 0.0;
    for (line, (round, epsilon_after)) in rounds.iter().zip(&charges) {
        assert_eq!(line["round"].as_u64(), Some(*round));
        assert_eq!(line["participants"].as_u64(), Some(6));
        // Every client took part and was accounted: six shares of σC/√6.
        assert_eq!(line["noise_multiplier"].as_f64(), Some(1.0));
        let spent = line["epsilon_spent"].as_f64().unwrap();
        assert!(
            (spent - epsilon_after).abs() < 1e-9 * spent,
            "the ledger row is what the round reports: {spent} vs {epsilon_after}"
        );
        assert!(spent > previous, "epsilon grows: {spent} after {previous}");
        previous = spent;
        assert!(line["eval_loss"].as_f64().is_some_and(f64::is_finite));
        // Clipped to 0.5 plus noise of sd 1·0.5/√6 in d = 2·(4·2·32 + ...) coordinates.
        assert!(line["mean_update_norm"].as_f64().unwrap() > 0.0);
    }
    // q = 1, σ = 1, 5 rounds: the accountant's own value.
    let expected = cohort_core::privacy::epsilon(1.0, 1.0, 5, 1e-5)
        .unwrap()
        .epsilon;
    assert!(
        (previous - expected).abs() < 1e-9,
        "{previous} vs {expected}"
    );
    for client in &fed.job.workers {
        assert!(
            client.output().contains("federated round pushed"),
            "{}",
            client.report("never pushed")
        );
    }
}

#[test]
fn the_budget_stops_the_job_cleanly_and_reports_what_was_spent() {
    let mut fed = FederatedJob::new(3);
    // q = 1, σ = 1: one round costs ε ≈ 3.8 at δ = 1e-5, two ≈ 5.6.
    fed.write_job(&job(50, 1.0, 3, 5.0));
    fed.job.start_coordinator();
    for name in fed.clients.clone() {
        fed.start_client(&name, &[]);
    }
    fed.job.wait_all(TIMEOUT);
    let charges = fed.privacy_charges();
    assert_eq!(charges.len(), 1, "{charges:?}");
    let metrics = fed.job.metrics();
    let stop = metrics
        .iter()
        .find(|m| m.get("budget_exhausted").is_some())
        .expect("a budget line in metrics.jsonl");
    let spent = stop["epsilon_spent"].as_f64().unwrap();
    assert!(spent <= 5.0 && (spent - charges[0].1).abs() < 1e-12);
    assert!(stop["epsilon_if_next_round"].as_f64().unwrap() > 5.0);
    for client in &fed.job.workers {
        assert!(
            client.output().contains("privacy budget"),
            "{}",
            client.report("was not told why the job ended")
        );
    }
}

#[test]
fn an_unknown_token_is_refused_with_a_clear_error() {
    let mut fed = FederatedJob::new(2);
    fed.write_job(&job(1, 1.0, 2, 50.0));
    fed.job.start_coordinator();
    let site = fed.job.path("clients").join(&fed.clients[0]);
    let args: Vec<String> = vec![
        "federated".into(),
        "--coordinator".into(),
        fed.job.addr.clone().unwrap(),
        "--data".into(),
        site.display().to_string(),
        "--token".into(),
        "0000000000000000000000000000000000000000000000000000000000000000".into(),
        "--device".into(),
        "cpu".into(),
    ];
    let mut intruder = Proc::spawn(
        "intruder",
        &binary("cohort-worker"),
        &args,
        fed.job.dir.path(),
    );
    let status = intruder.wait(Duration::from_secs(60));
    assert!(!status.success(), "{}", intruder.report("was admitted"));
    assert!(
        intruder.output().contains("unknown enrollment token"),
        "{}",
        intruder.report("did not say why")
    );
}

#[test]
fn a_coordinator_killed_mid_job_resumes_and_never_spends_less_privacy() {
    let mut fed = FederatedJob::new(3);
    fed.write_job(&job(8, 1.0, 3, 100.0));
    fed.job.start_coordinator();
    for name in fed.clients.clone() {
        fed.start_client(&name, &[]);
    }
    assert!(wait_until(TIMEOUT, || fed.privacy_charges().len() >= 3));
    let pid = fed.job.coordinator.as_ref().unwrap().pid();
    send_signal(pid, "KILL");
    let before = fed.privacy_charges();
    let spent_before = before.last().unwrap().1;
    fed.job.restart_coordinator("coordinator-2");
    fed.job.wait_all(TIMEOUT);
    let after = fed.privacy_charges();
    assert!(after.len() >= 8, "{after:?}");
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "no charge is ever removed"
    );
    let mut previous = spent_before;
    for &(_, epsilon) in &after[before.len()..] {
        assert!(epsilon > previous, "{epsilon} after {previous}");
        previous = epsilon;
    }
    let log = fed.job.coordinator.as_ref().unwrap().output();
    assert!(log.contains("privacy ledger restored"), "{log}");
}

#[test]
fn full_fine_tuning_with_fedavgm_and_no_dp_lowers_the_sites_held_out_loss() {
    let mut fed = FederatedJob::new(3);
    let lora = job(4, 1.0, 3, 50.0);
    let (head, _dp) = lora.split_once("[federated.dp]").unwrap();
    let body = format!("{head}[federated.dp]\nmode = \"none\"\n")
        .replace(
            "trainable = \"lora\"\nlora_rank = 2",
            "trainable = \"full\"",
        )
        .replace(
            "[cluster]",
            "[outer]\nkind = \"momentum\"\nlr = 1.0\nmomentum = 0.5\n[cluster]",
        );
    assert!(body.contains("trainable = \"full\"") && body.contains("mode = \"none\""));
    fed.write_job(&body);
    fed.job.start_coordinator();
    for name in fed.clients.clone() {
        fed.start_client(&name, &[]);
    }
    fed.job.wait_all(TIMEOUT);
    let metrics = fed.job.metrics();
    let first = metrics
        .iter()
        .find(|m| m.get("sampled").is_some())
        .and_then(|m| m["eval_loss"].as_f64())
        .expect("round 1 evaluated the starting model");
    let last = metrics
        .iter()
        .find(|m| m.get("final").is_some())
        .and_then(|m| m["eval_loss"].as_f64())
        .expect("the final model was evaluated");
    // A random byte-level model starts at ln 256 ≈ 5.55.
    assert!(first > 5.0, "{first}");
    assert!(last < first - 0.5, "held-out loss {first} -> {last}");
    assert!(fed.privacy_charges().is_empty(), "no DP, no charges");
}

/// A LoRA classification job on the sentiment sites: the head trains with the
/// adapters, and every round and the final evaluation report accuracy.
fn sentiment_job(rounds: u64, clients: usize, dp: &str) -> String {
    let text = job(rounds, 1.0, clients, 50.0);
    let (head, _dp) = text.split_once("[federated.dp]").unwrap();
    let body = format!("{head}[federated.dp]\n{dp}\n").replace(
        "sample_rate = 1",
        "task = \"classification\"\nnum_classes = 2\nsample_rate = 1",
    );
    assert!(body.contains("num_classes = 2"), "{body}");
    body
}

#[test]
fn sentiment_sites_train_a_classifier_with_central_dp_and_report_accuracy() {
    let mut fed = FederatedJob::sentiment(4);
    assert_eq!(
        fed.clients,
        ["imdb-1", "yelp-1", "amazon-1", "imdb-2"],
        "sites are assigned to domains in turn"
    );
    let dp =
        "mode = \"central\"\nclip_norm = 0.5\nnoise_multiplier = 1.0\nepsilon = 50.0\ndelta = 1e-5";
    fed.write_job(&sentiment_job(3, 4, dp));
    fed.job.start_coordinator();
    for name in fed.clients.clone() {
        fed.start_client(&name, &[]);
    }
    fed.job.wait_all(TIMEOUT);
    let metrics = fed.job.metrics();
    let rounds: Vec<_> = metrics
        .iter()
        .filter(|m| m.get("sampled").is_some())
        .collect();
    assert_eq!(rounds.len(), 3, "{metrics:?}");
    for round in &rounds {
        let accuracy = round["eval_accuracy"].as_f64().expect("round accuracy");
        assert!((0.0..=1.0).contains(&accuracy), "{round}");
        assert!(
            round["eval_loss"].as_f64().is_some_and(|l| l > 0.0),
            "{round}"
        );
        assert_eq!(round["participants"], 4, "{round}");
    }
    let last = metrics
        .iter()
        .find(|m| m.get("final").is_some())
        .expect("final line");
    let accuracy = last["eval_accuracy"].as_f64().expect("final accuracy");
    assert!((0.0..=1.0).contains(&accuracy), "{last}");
    // Each release was charged first.
    assert_eq!(
        fed.privacy_charges()
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // The head is part of the model the coordinator keeps.
    let names: Vec<String> = fed.job.checkpoint().into_iter().map(|t| t.0).collect();
    assert!(
        names.iter().any(|n| n == "cls_head.weight") && names.iter().any(|n| n == "cls_head.bias"),
        "{names:?}"
    );
    let client_log = fed.job.workers[0].output();
    assert!(
        client_log.contains("local labeled examples loaded"),
        "{client_log}"
    );
}

#[test]
fn without_dp_the_sentiment_sites_fit_their_training_examples() {
    let mut fed = FederatedJob::sentiment(2);
    // Full fine-tuning at a higher learning rate: a random model's features
    // are too weak for a head and rank-2 adapters to move in a few steps, and
    // averaging many domains slows fitting each one (1 site: 0.75 -> 0.37 in
    // 10 rounds; 3 sites: 0.77 -> 0.68 in 5).
    let body = sentiment_job(8, 2, "mode = \"none\"")
        .replace("inner_steps = 4", "inner_steps = 32")
        .replace("lr = 3e-3", "lr = 3e-2")
        .replace(
            "trainable = \"lora\"\nlora_rank = 2",
            "trainable = \"full\"",
        );
    assert!(body.contains("trainable = \"full\""), "{body}");
    fed.write_job(&body);
    fed.job.start_coordinator();
    for name in fed.clients.clone() {
        fed.start_client(&name, &[]);
    }
    fed.job.wait_all(TIMEOUT);
    let losses: Vec<f64> = fed
        .job
        .metrics()
        .iter()
        .filter(|m| m.get("sampled").is_some())
        .map(|m| m["mean_loss"].as_f64().expect("loss"))
        .collect();
    assert_eq!(losses.len(), 8);
    // Two classes start near ln 2; the sites' local training loss falls as
    // the shared model learns their sentences.
    assert!((losses[0] - 2f64.ln()).abs() < 0.2, "{losses:?}");
    assert!(losses[7] < losses[0] - 0.15, "{losses:?}");
}
