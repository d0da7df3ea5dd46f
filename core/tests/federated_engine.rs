//! The round engine in federated mode: cohorts, the norm bound, the privacy
//! charge before every release, the budget stop, and the server step.

use std::time::{Duration, Instant};

use cohort_core::codec::{DType, FiniteValues};
use cohort_core::engine::{
    EngineConfig, EngineError, EvalScore, Event, PushHeader, PushStats, RoundEngine, Task,
    WorkerInfo,
};
use cohort_core::federated::{CohortSampling, DpMode, FederatedRules};
use cohort_core::ids::{RoundId, Version, WorkerId};
use cohort_core::model::{Init, TensorSpec};
use cohort_core::outer::OuterOptimizerConfig;
use cohort_core::privacy::{self, PrivacyBudget};

const DIMS: usize = 400;
const CLIP: f64 = 1.0;
const SIGMA: f64 = 1.0;

fn rules(mode: DpMode, rate: f64, epsilon: f64) -> FederatedRules {
    FederatedRules {
        sampling: CohortSampling::Poisson { rate },
        enrolled_clients: 6,
        clip_norm: CLIP,
        dp_mode: mode,
        noise_multiplier: if mode == DpMode::None { 0.0 } else { SIGMA },
        budget: (mode != DpMode::None).then_some(PrivacyBudget {
            epsilon,
            delta: 1e-5,
        }),
        sampling_seed: 42,
    }
}

fn engine(rules: FederatedRules, min_clients: usize, max_rounds: u64) -> RoundEngine {
    let config = EngineConfig {
        tensors: vec![
            TensorSpec {
                name: "h.0.attn.c_attn.lora_a".into(),
                shape: vec![4, 50],
                init: Init::Zeros,
            },
            TensorSpec {
                name: "h.0.attn.c_attn.lora_b".into(),
                shape: vec![200],
                init: Init::Zeros,
            },
        ],
        update_dtype: DType::F32,
        lease: Duration::from_secs(60),
        round_deadline: Duration::from_secs(30),
        min_workers: min_clients,
        min_participants: min_clients,
        max_workers_per_round: 0,
        shards_per_worker: 1,
        max_rounds,
        max_epochs: 0,
        eval_every: 0,
        outer: OuterOptimizerConfig::Sgd { lr: 1.0 },
        max_chunk_elems: 64,
        seed: 1,
        federated: Some(rules),
    };
    RoundEngine::new(config, vec![], vec![], vec![0.0; DIMS]).unwrap()
}

fn join_clients(engine: &mut RoundEngine, n: usize, now: Instant) -> Vec<WorkerId> {
    (0..n)
        .map(|i| {
            let info = WorkerInfo {
                client: Some(format!("site-{i}")),
                ..WorkerInfo::default()
            };
            engine.join(info, now).0
        })
        .collect()
}

fn stats() -> PushStats {
    PushStats {
        mean_loss: 2.0,
        tokens: 100,
        train_seconds: 0.5,
        eval_loss: Some(2.5),
        eval_tokens: 50,
        eval_accuracy: None,
    }
}

/// The round each client was asked to train in, if any.
fn assignments(
    engine: &mut RoundEngine,
    clients: &[WorkerId],
    now: Instant,
) -> Vec<(WorkerId, RoundId)> {
    clients
        .iter()
        .filter_map(|&c| match engine.next_task(c, now).unwrap() {
            Task::Train { round, .. } => Some((c, round)),
            _ => None,
        })
        .collect()
}

fn push(
    engine: &mut RoundEngine,
    worker: WorkerId,
    round: RoundId,
    values: &[f32],
    now: Instant,
) -> Result<(), EngineError> {
    push_with(engine, worker, round, values, stats(), now)
}

fn push_with(
    engine: &mut RoundEngine,
    worker: WorkerId,
    round: RoundId,
    values: &[f32],
    stats: PushStats,
    now: Instant,
) -> Result<(), EngineError> {
    let header = PushHeader {
        round,
        base_version: engine.version(),
        dtype: DType::F32,
        stats,
    };
    engine.begin_push(worker, header, now)?;
    let mut offset_in_flat = 0;
    for (index, numel) in [(0usize, 200usize), (1, 200)] {
        for start in (0..numel).step_by(64) {
            let end = (start + 64).min(numel);
            let chunk = values[offset_in_flat + start..offset_in_flat + end].to_vec();
            let chunk = FiniteValues::new(chunk).unwrap();
            engine.push_chunk(worker, index, start, &chunk, (end - start) * 4)?;
        }
        offset_in_flat += numel;
    }
    engine.finish_push(worker, now).map(|_| ())
}

/// An update of norm `norm` along the all-ones direction.
fn update(norm: f64) -> Vec<f32> {
    vec![(norm / (DIMS as f64).sqrt()) as f32; DIMS]
}

fn release_ready(events: &[Event]) -> Option<(RoundId, usize, f64, f64)> {
    events.iter().find_map(|e| match e {
        Event::ReleaseReady {
            round,
            shares,
            cost,
            epsilon_after,
        } => Some((*round, *shares, cost.noise_multiplier, *epsilon_after)),
        _ => None,
    })
}

/// Runs rounds until one has a cohort of at least `min` and returns it.
fn cohort_round(
    engine: &mut RoundEngine,
    clients: &[WorkerId],
    now: Instant,
) -> Vec<(WorkerId, RoundId)> {
    for _ in 0..200 {
        let assigned = assignments(engine, clients, now);
        if !assigned.is_empty() {
            return assigned;
        }
        engine.tick(now);
    }
    panic!("no cohort in 200 draws");
}

#[test]
fn a_dp_round_is_charged_before_it_is_released_and_divides_by_the_expected_cohort() {
    let now = Instant::now();
    let mut e = engine(rules(DpMode::Distributed, 0.5, 50.0), 2, 5);
    let clients = join_clients(&mut e, 6, now);
    let cohort = cohort_round(&mut e, &clients, now);
    let round = cohort[0].1;
    e.drain_events();
    for &(worker, _) in &cohort {
        push(&mut e, worker, round, &update(0.5), now).unwrap();
    }
    let events = e.drain_events();
    let (ready_round, shares, sigma_eff, epsilon_after) =
        release_ready(&events).expect("a DP round waits for its charge");
    assert_eq!((ready_round, shares), (round, cohort.len()));
    // Distributed: k shares of N(0, (σC)²/m) each: σ_eff = σ sqrt(k/m).
    assert!((sigma_eff - SIGMA * (cohort.len() as f64 / 2.0).sqrt()).abs() < 1e-12);
    // Nothing is published before the release.
    assert_eq!(e.version(), Version(0));
    assert!(!events.iter().any(|e| matches!(e, Event::RoundCommitted(_))));
    assert_eq!(e.privacy_ledger().rounds(), 0);
    // A late push for the closed round is stale.
    assert!(matches!(
        push(&mut e, clients[0], round, &update(0.1), now),
        Err(EngineError::StaleRound { .. }) | Err(EngineError::NotAssigned { .. })
    ));

    e.release(round, now, |_, _| {
        panic!("no central noise in distributed mode")
    })
    .unwrap();
    assert_eq!(e.version(), Version(1));
    assert_eq!(e.privacy_ledger().rounds(), 1);
    let spent = e.privacy_ledger().epsilon(1e-5).unwrap().epsilon;
    assert!((spent - epsilon_after).abs() < 1e-12);
    let expected = privacy::epsilon(sigma_eff, 0.5, 1, 1e-5).unwrap().epsilon;
    assert!((spent - expected).abs() < 1e-9, "{spent} vs {expected}");
    // FedAvg (SGD lr 1): new = 0 - sum / (q N) = -k * u / 3.
    let per_coord = (0.5 / (DIMS as f64).sqrt()) as f32;
    let want = -(cohort.len() as f32) * per_coord / 3.0;
    for &v in e.global_params().iter() {
        assert!((v - want).abs() < 1e-6, "{v} vs {want}");
    }
    let summary = e
        .drain_events()
        .into_iter()
        .find_map(|e| match e {
            Event::RoundCommitted(s) => Some(s),
            _ => None,
        })
        .unwrap();
    let fed = summary.federated.unwrap();
    assert_eq!(fed.sampled, cohort.len());
    assert!((fed.mean_update_norm - 0.5).abs() < 1e-4);
    assert_eq!(fed.epsilon_spent, Some(spent));
    assert_eq!(summary.eval_loss, Some(2.5));
    // Releasing again is refused.
    assert!(e.release(round, now, |_, _| Ok(())).is_err());
}

#[test]
fn an_update_larger_than_clipping_plus_noise_can_make_is_undone() {
    let now = Instant::now();
    let mut e = engine(rules(DpMode::Local, 1.0, 1e6), 2, 3);
    let clients = join_clients(&mut e, 3, now);
    let cohort = cohort_round(&mut e, &clients, now);
    let (worker, round) = cohort[0];
    // Local mode: s = σC = 1 per coordinate, bound ≈ sqrt(1 + 24 + (20 + 12)²) ≈ 32.4.
    let bound = cohort_core::clip::update_norm_bound(CLIP, SIGMA * CLIP, DIMS);
    let err = push(&mut e, worker, round, &update(bound * 1.01), now).unwrap_err();
    assert!(
        matches!(err, EngineError::UpdateNormTooLarge { .. }),
        "{err}"
    );
    // The sum is untouched and the client may push an honest update.
    push(&mut e, worker, round, &update(bound * 0.99), now).unwrap();
}

#[test]
fn the_budget_stops_the_job_before_a_round_that_would_overrun_it() {
    let now = Instant::now();
    let budget = 3.0;
    let mut e = engine(rules(DpMode::Central, 1.0, budget), 2, 1000);
    let clients = join_clients(&mut e, 3, now);
    let mut released = 0;
    loop {
        let cohort = cohort_round_or_done(&mut e, &clients, now);
        let Some(cohort) = cohort else { break };
        for &(worker, round) in &cohort {
            push(&mut e, worker, round, &update(0.9), now).unwrap();
        }
        let (round, ..) = release_ready(&e.drain_events()).unwrap();
        let mut noise_stddev = None;
        e.release(round, now, |sum, stddev| {
            assert_eq!(sum.len(), DIMS);
            noise_stddev = Some(stddev);
            Ok(())
        })
        .unwrap();
        assert_eq!(noise_stddev, Some(SIGMA * CLIP));
        released += 1;
        assert!(released < 100, "the budget never ran out");
    }
    let spent = e.privacy_ledger().epsilon(1e-5).unwrap().epsilon;
    assert!(spent <= budget, "{spent} > {budget}");
    let next = privacy::epsilon(SIGMA, 1.0, released + 1, 1e-5)
        .unwrap()
        .epsilon;
    assert!(next > budget, "one more round ({next}) would have fit");
    // The final version is evaluated by every client, then the job ends.
    for (i, &client) in clients.iter().enumerate() {
        match e.next_task(client, now).unwrap() {
            Task::Eval { version, .. } => e
                .report_eval(
                    client,
                    version,
                    EvalScore {
                        loss: 1.0 + i as f64,
                        weight: 10 * (i as u64 + 1),
                        accuracy: Some(0.5 + 0.1 * i as f64),
                    },
                    now,
                )
                .unwrap(),
            other => panic!("expected Eval, got {other:?}"),
        }
    }
    assert!(e.is_finished());
    let events = e.drain_events();
    assert!(events.iter().any(|e| matches!(
        e,
        // Weighted by examples: (1·10 + 2·20 + 3·30) / 60 and (0.5·10 + 0.6·20 + 0.7·30) / 60.
        Event::EvalReported { loss, tokens: 60, accuracy: Some(accuracy), .. }
            if (*loss - 140.0 / 60.0).abs() < 1e-12 && (*accuracy - 38.0 / 60.0).abs() < 1e-12
    )));
    match e.next_task(clients[0], now) {
        Ok(Task::Done { reason }) => assert!(reason.contains("privacy budget"), "{reason}"),
        other => panic!("expected Done, got {other:?}"),
    }
}

#[test]
fn a_round_reports_the_example_weighted_accuracy_of_its_pushes() {
    let now = Instant::now();
    let mut e = engine(rules(DpMode::None, 1.0, 0.0), 2, 1);
    let clients = join_clients(&mut e, 2, now);
    let cohort = cohort_round(&mut e, &clients, now);
    assert_eq!(cohort.len(), 2);
    let (first, round) = cohort[0];
    // An accuracy outside [0, 1] is refused before any chunk is taken.
    let bad = PushStats {
        eval_accuracy: Some(1.01),
        ..stats()
    };
    assert!(matches!(
        push_with(&mut e, first, round, &update(0.2), bad, now),
        Err(EngineError::InvalidStats(_))
    ));
    for (i, &(worker, round)) in cohort.iter().enumerate() {
        let stats = PushStats {
            eval_loss: Some(0.5 + i as f64),
            eval_tokens: 30 + 10 * i as u64,
            eval_accuracy: Some(0.6 + 0.2 * i as f64),
            ..stats()
        };
        push_with(&mut e, worker, round, &update(0.2), stats, now).unwrap();
    }
    let summary = e
        .drain_events()
        .into_iter()
        .find_map(|event| match event {
            Event::RoundCommitted(summary) => Some(summary),
            _ => None,
        })
        .expect("the round committed");
    // (0.5·30 + 1.5·40) / 70 and (0.6·30 + 0.8·40) / 70.
    let loss = summary.eval_loss.unwrap();
    let accuracy = summary.eval_accuracy.unwrap();
    assert!((loss - 75.0 / 70.0).abs() < 1e-12, "{loss}");
    assert!((accuracy - 50.0 / 70.0).abs() < 1e-12, "{accuracy}");
}

#[test]
fn the_final_evaluation_ends_at_its_deadline_with_the_reports_it_has() {
    let now = Instant::now();
    let mut e = engine(rules(DpMode::None, 1.0, 0.0), 2, 1);
    let clients = join_clients(&mut e, 2, now);
    let cohort = cohort_round(&mut e, &clients, now);
    for &(worker, round) in &cohort {
        push(&mut e, worker, round, &update(0.2), now).unwrap();
    }
    assert_eq!(e.version(), Version(1));
    let Task::Eval { version, .. } = e.next_task(clients[0], now).unwrap() else {
        panic!("expected an evaluation");
    };
    // Nobody else was asked: an unasked report is refused.
    assert!(e
        .report_eval(clients[1], version, EvalScore::loss(1.0, 5), now)
        .is_err());
    // An accuracy outside [0, 1] is refused and the report can be sent again.
    for accuracy in [1.5, -0.1, f64::NAN] {
        let score = EvalScore {
            loss: 3.0,
            weight: 5,
            accuracy: Some(accuracy),
        };
        assert!(matches!(
            e.report_eval(clients[0], version, score, now),
            Err(EngineError::InvalidStats(_))
        ));
    }
    e.report_eval(clients[0], version, EvalScore::loss(3.0, 5), now)
        .unwrap();
    assert!(!e.is_finished(), "waits for the other client");
    e.tick(now + Duration::from_secs(31));
    assert!(e.is_finished());
}

fn cohort_round_or_done(
    engine: &mut RoundEngine,
    clients: &[WorkerId],
    now: Instant,
) -> Option<Vec<(WorkerId, RoundId)>> {
    for _ in 0..200 {
        let mut assigned = Vec::new();
        for &c in clients {
            match engine.next_task(c, now).unwrap() {
                Task::Train { round, .. } => assigned.push((c, round)),
                Task::Eval { .. } | Task::Done { .. } => return None,
                Task::Wait { .. } => {}
            }
        }
        if !assigned.is_empty() {
            return Some(assigned);
        }
        engine.tick(now);
    }
    panic!("no cohort in 200 draws");
}

#[test]
fn a_failed_central_noise_aborts_the_round_and_keeps_the_charge() {
    let now = Instant::now();
    let mut e = engine(rules(DpMode::Central, 1.0, 100.0), 2, 3);
    let clients = join_clients(&mut e, 2, now);
    let cohort = cohort_round(&mut e, &clients, now);
    for &(worker, round) in &cohort {
        push(&mut e, worker, round, &update(0.3), now).unwrap();
    }
    let (round, ..) = release_ready(&e.drain_events()).unwrap();
    let err = e
        .release(round, now, |_, _| Err("sampler failed".into()))
        .unwrap_err();
    assert_eq!(err, "sampler failed");
    assert_eq!(e.version(), Version(0));
    assert_eq!(e.privacy_ledger().rounds(), 1, "a charge is never refunded");
    assert!(e
        .drain_events()
        .iter()
        .any(|e| matches!(e, Event::RoundAborted { .. })));
}

#[test]
fn a_cohort_below_the_minimum_is_aborted_without_a_charge() {
    let now = Instant::now();
    // Rate 0.2 over 3 clients with m = 3: most draws are too small.
    let mut e = engine(rules(DpMode::Distributed, 0.2, 100.0), 3, 3);
    let clients = join_clients(&mut e, 3, now);
    for _ in 0..20 {
        e.tick(now);
    }
    let events = e.drain_events();
    let aborted = events
        .iter()
        .filter(|e| matches!(e, Event::RoundAborted { pushed: 0, .. }))
        .count();
    assert!(aborted >= 10, "{aborted} aborted draws");
    assert_eq!(e.privacy_ledger().rounds(), 0);
    // A client outside any cohort is told to wait, and a push is refused.
    let tasks: Vec<Task> = clients
        .iter()
        .map(|&c| e.next_task(c, now).unwrap())
        .collect();
    if tasks.iter().all(|t| matches!(t, Task::Wait { .. })) {
        let round = RoundId(1);
        let err = push(&mut e, clients[0], round, &update(0.1), now).unwrap_err();
        assert!(matches!(
            err,
            EngineError::StaleRound { .. } | EngineError::NotAssigned { .. }
        ));
    }
}

#[test]
fn a_client_outside_the_cohort_cannot_push() {
    let now = Instant::now();
    let mut e = engine(rules(DpMode::Distributed, 0.5, 100.0), 2, 3);
    let clients = join_clients(&mut e, 6, now);
    let cohort = cohort_round(&mut e, &clients, now);
    let round = cohort[0].1;
    let outsider = clients
        .iter()
        .copied()
        .find(|c| !cohort.iter().any(|(w, _)| w == c));
    if let Some(outsider) = outsider {
        assert_eq!(
            push(&mut e, outsider, round, &update(0.1), now).unwrap_err(),
            EngineError::NotAssigned {
                worker: outsider,
                round
            }
        );
    }
}

#[test]
fn a_rejoining_client_replaces_its_old_membership() {
    let now = Instant::now();
    let mut e = engine(rules(DpMode::None, 1.0, 0.0), 2, 3);
    let clients = join_clients(&mut e, 2, now);
    assert_eq!(e.live_workers(), 2);
    let info = WorkerInfo {
        client: Some("site-0".into()),
        ..WorkerInfo::default()
    };
    let (again, _) = e.join(info, now);
    assert_eq!(e.live_workers(), 2);
    assert_eq!(
        e.heartbeat(clients[0], now),
        Err(EngineError::UnknownWorker(clients[0]))
    );
    assert!(e.heartbeat(again, now).is_ok());
}

#[test]
fn without_dp_the_round_commits_at_once_and_averages_what_arrived() {
    let now = Instant::now();
    let mut e = engine(rules(DpMode::None, 1.0, 0.0), 2, 3);
    let clients = join_clients(&mut e, 2, now);
    let cohort = cohort_round(&mut e, &clients, now);
    assert_eq!(cohort.len(), 2, "rate 1 samples everyone");
    push(&mut e, cohort[0].0, cohort[0].1, &update(0.4), now).unwrap();
    push(&mut e, cohort[1].0, cohort[1].1, &update(0.2), now).unwrap();
    assert_eq!(e.version(), Version(1));
    let want = -((0.3 / (DIMS as f64).sqrt()) as f32);
    assert!((e.global_params()[0] - want).abs() < 1e-6);
    assert_eq!(e.privacy_ledger().rounds(), 0);
}

#[test]
fn snapshots_keep_the_cohort_sampler() {
    let now = Instant::now();
    let mut a = engine(rules(DpMode::None, 0.5, 0.0), 2, 50);
    let clients = join_clients(&mut a, 6, now);
    let _ = cohort_round(&mut a, &clients, now);
    let snapshot = a.snapshot();
    assert!(snapshot.sampling_rng_state.is_some());
    let json = serde_json::to_string(&snapshot).unwrap();
    let back: cohort_core::engine::EngineSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snapshot);
}

#[test]
fn central_dp_releases_every_round_even_when_nobody_was_sampled() {
    let now = Instant::now();
    // Rate 0.05 over 2 clients: most cohorts are empty, none is skipped.
    let mut e = engine(rules(DpMode::Central, 0.05, 1000.0), 2, 3);
    let clients = join_clients(&mut e, 2, now);
    let mut noise_only = 0;
    for _ in 0..3 {
        let cohort = assignments(&mut e, &clients, now);
        for &(worker, round) in &cohort {
            push(&mut e, worker, round, &update(0.3), now).unwrap();
        }
        let events = e.drain_events();
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::RoundAborted { .. })),
            "central DP never skips a round: {events:?}"
        );
        let (round, shares, sigma, _) = release_ready(&events).expect("every round is released");
        assert_eq!(shares, cohort.len());
        assert_eq!(
            sigma, SIGMA,
            "the coordinator's noise does not depend on who arrived"
        );
        if shares == 0 {
            noise_only += 1;
        }
        let mut added = None;
        e.release(round, now, |_, stddev| {
            added = Some(stddev);
            Ok(())
        })
        .unwrap();
        assert_eq!(added, Some(SIGMA * CLIP));
    }
    assert!(noise_only >= 1, "the seed should draw an empty cohort");
    assert_eq!(e.privacy_ledger().rounds(), 3);
}

#[test]
fn local_dp_reports_each_clients_own_guarantee() {
    let now = Instant::now();
    let mut e = engine(rules(DpMode::Local, 1.0, 1e6), 2, 3);
    let clients = join_clients(&mut e, 2, now);
    let cohort = cohort_round(&mut e, &clients, now);
    for &(worker, round) in &cohort {
        push(&mut e, worker, round, &update(0.5), now).unwrap();
    }
    let (round, shares, sigma_eff, _) = release_ready(&e.drain_events()).unwrap();
    // The released sum carries both clients' full noise: σ√2.
    assert!((sigma_eff - SIGMA * (shares as f64).sqrt()).abs() < 1e-12);
    e.release(round, now, |_, _| panic!("no central noise"))
        .unwrap();
    let summary = e
        .drain_events()
        .into_iter()
        .find_map(|e| match e {
            Event::RoundCommitted(s) => s.federated,
            _ => None,
        })
        .unwrap();
    // Against the coordinator: the Gaussian mechanism with sensitivity 2C,
    // no amplification, once.
    let expected = privacy::epsilon(SIGMA / 2.0, 1.0, 1, 1e-5).unwrap().epsilon;
    assert_eq!(summary.local_epsilon_per_client, Some(expected));
    assert!(expected > summary.epsilon_spent.unwrap());
}
