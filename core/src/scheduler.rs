//! Shard leasing: every training shard is consumed exactly once per epoch.
//!
//! A shard is always in exactly one of three places: pending (not yet used
//! this epoch), leased (handed to a worker for a round in flight) or consumed
//! (its round committed). A shard leaves "leased" only when the round that
//! used it commits (consumed) or the lease is given up (pending again, at the
//! front, so it is retried first).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::ids::{RoundId, ShardId, WorkerId};
use crate::rng::SplitMix64;

/// One line of the consumption ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Consumption {
    pub epoch: u64,
    pub shard: ShardId,
    pub round: RoundId,
    pub worker: WorkerId,
}

/// The scheduler's durable state between rounds: nothing is leased. Shards
/// that were leased when the snapshot was taken are pending again, first.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SchedulerSnapshot {
    pub epoch: u64,
    /// Shards not yet consumed this epoch, in the order they will be leased.
    pub pending: Vec<ShardId>,
    /// Shards consumed this epoch, in commit order.
    pub consumed: Vec<ShardId>,
    pub ledger: Vec<Consumption>,
    /// The shuffle seed. The generator's state is the seed advanced by one
    /// shuffle of every shard per epoch started so far (`epoch + 1`), which
    /// `restore` replays.
    pub seed: u64,
}

/// A scheduler snapshot that does not fit the shard list it is restored onto.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedulerRestoreError {
    #[error("shard {shard} appears more than once in the snapshot")]
    Duplicate { shard: ShardId },
    #[error("shard {shard} is in the snapshot but not in the shard list")]
    Unknown { shard: ShardId },
    #[error("{missing} shards of the shard list are neither pending nor consumed in the snapshot")]
    Missing { missing: usize },
    #[error("the snapshot's consumed set ({consumed} shards) disagrees with its ledger for epoch {epoch} ({ledger} shards)")]
    LedgerMismatch {
        epoch: u64,
        consumed: usize,
        ledger: usize,
    },
}

#[derive(Debug)]
pub struct ShardScheduler {
    seed: u64,
    all: Vec<ShardId>,
    pending: VecDeque<ShardId>,
    leased: BTreeMap<ShardId, (WorkerId, RoundId)>,
    consumed_this_epoch: usize,
    epoch: u64,
    rng: SplitMix64,
    ledger: Vec<Consumption>,
}

impl ShardScheduler {
    /// Starts epoch 0 with `shards` in an order shuffled by `seed`.
    pub fn new(shards: Vec<ShardId>, seed: u64) -> ShardScheduler {
        let mut scheduler = ShardScheduler {
            seed,
            all: shards,
            pending: VecDeque::new(),
            leased: BTreeMap::new(),
            consumed_this_epoch: 0,
            epoch: 0,
            rng: SplitMix64::new(seed),
            ledger: Vec::new(),
        };
        scheduler.refill();
        scheduler
    }

    fn refill(&mut self) {
        let mut order = self.all.clone();
        self.rng.shuffle(&mut order);
        self.pending = order.into();
        self.consumed_this_epoch = 0;
    }

    /// The current epoch, counted from 0.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn leased(&self) -> usize {
        self.leased.len()
    }

    pub fn total(&self) -> usize {
        self.all.len()
    }

    /// Every shard of this epoch has been consumed.
    pub fn epoch_complete(&self) -> bool {
        self.pending.is_empty() && self.leased.is_empty()
    }

    /// Moves to the next epoch. Only valid once the current one is complete.
    pub fn start_next_epoch(&mut self) {
        assert!(
            self.epoch_complete(),
            "next epoch started with shards outstanding"
        );
        self.epoch += 1;
        self.refill();
    }

    /// Leases up to `count` pending shards to `worker` for `round`.
    pub fn lease(&mut self, worker: WorkerId, round: RoundId, count: usize) -> Vec<ShardId> {
        let take = count.min(self.pending.len());
        let shards: Vec<ShardId> = self.pending.drain(..take).collect();
        for &shard in &shards {
            self.leased.insert(shard, (worker, round));
        }
        shards
    }

    /// The round of `worker` committed: its leased shards are consumed.
    pub fn commit(&mut self, worker: WorkerId) -> Vec<ShardId> {
        let shards = self.leased_to(worker);
        for &shard in &shards {
            let (_, round) = self.leased.remove(&shard).expect("leased shard");
            self.consumed_this_epoch += 1;
            self.ledger.push(Consumption {
                epoch: self.epoch,
                shard,
                round,
                worker,
            });
        }
        shards
    }

    /// `worker` gives its shards back (it left, or its push was not used).
    /// They go to the front of the queue, in their original order.
    pub fn release(&mut self, worker: WorkerId) -> Vec<ShardId> {
        let shards = self.leased_to(worker);
        for &shard in shards.iter().rev() {
            self.leased.remove(&shard);
            self.pending.push_front(shard);
        }
        shards
    }

    fn leased_to(&self, worker: WorkerId) -> Vec<ShardId> {
        self.leased
            .iter()
            .filter(|(_, (owner, _))| *owner == worker)
            .map(|(&shard, _)| shard)
            .collect()
    }

    /// Every consumption so far, in commit order.
    pub fn ledger(&self) -> &[Consumption] {
        &self.ledger
    }

    /// The scheduler as if every lease had been given back, worker by worker
    /// in id order, as [`Self::release`] does: leased shards are pending
    /// again, at the front of the queue.
    pub fn snapshot(&self) -> SchedulerSnapshot {
        let mut pending = self.pending.clone();
        let owners: BTreeSet<WorkerId> = self.leased.values().map(|&(w, _)| w).collect();
        for worker in owners {
            for shard in self.leased_to(worker).into_iter().rev() {
                pending.push_front(shard);
            }
        }
        let consumed = self
            .ledger
            .iter()
            .filter(|c| c.epoch == self.epoch)
            .map(|c| c.shard)
            .collect();
        SchedulerSnapshot {
            epoch: self.epoch,
            pending: pending.into(),
            consumed,
            ledger: self.ledger.clone(),
            seed: self.seed,
        }
    }

    /// Rebuilds a scheduler over `shards` from `snapshot`, checking that every
    /// shard is exactly once either pending or consumed.
    pub fn restore(
        shards: Vec<ShardId>,
        snapshot: SchedulerSnapshot,
    ) -> Result<ShardScheduler, SchedulerRestoreError> {
        let known: BTreeSet<ShardId> = shards.iter().copied().collect();
        let mut seen = BTreeSet::new();
        for &shard in snapshot.pending.iter().chain(&snapshot.consumed) {
            if !known.contains(&shard) {
                return Err(SchedulerRestoreError::Unknown { shard });
            }
            if !seen.insert(shard) {
                return Err(SchedulerRestoreError::Duplicate { shard });
            }
        }
        if seen.len() != known.len() {
            return Err(SchedulerRestoreError::Missing {
                missing: known.len() - seen.len(),
            });
        }
        let ledger_this_epoch: BTreeSet<ShardId> = snapshot
            .ledger
            .iter()
            .filter(|c| c.epoch == snapshot.epoch)
            .map(|c| c.shard)
            .collect();
        let consumed: BTreeSet<ShardId> = snapshot.consumed.iter().copied().collect();
        if ledger_this_epoch != consumed {
            return Err(SchedulerRestoreError::LedgerMismatch {
                epoch: snapshot.epoch,
                consumed: consumed.len(),
                ledger: ledger_this_epoch.len(),
            });
        }
        // Replay the shuffles so the next epoch's order is the one an
        // uninterrupted run would have drawn.
        let mut rng = SplitMix64::new(snapshot.seed);
        for _ in 0..=snapshot.epoch {
            let mut order = shards.clone();
            rng.shuffle(&mut order);
        }
        Ok(ShardScheduler {
            seed: snapshot.seed,
            all: shards,
            pending: snapshot.pending.into(),
            leased: BTreeMap::new(),
            consumed_this_epoch: consumed.len(),
            epoch: snapshot.epoch,
            rng,
            ledger: snapshot.ledger,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Lease { worker: u64, count: usize },
        Commit { worker: u64 },
        Release { worker: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..4, 1usize..4).prop_map(|(worker, count)| Op::Lease { worker, count }),
            (0u64..4).prop_map(|worker| Op::Commit { worker }),
            (0u64..4).prop_map(|worker| Op::Release { worker }),
        ]
    }

    proptest! {
        /// Whatever mix of leases, failures and commits happens, each shard is
        /// consumed exactly once per epoch and never lost.
        #[test]
        fn every_shard_is_consumed_exactly_once_per_epoch(
            ops in prop::collection::vec(op(), 1..200),
            shards in 1u64..20,
            seed in any::<u64>(),
        ) {
            let mut s = ShardScheduler::new((0..shards).map(ShardId).collect(), seed);
            for (round, op) in ops.into_iter().enumerate() {
                let round = RoundId(round as u64);
                match op {
                    Op::Lease { worker, count } => { s.lease(WorkerId(worker), round, count); }
                    Op::Commit { worker } => { s.commit(WorkerId(worker)); }
                    Op::Release { worker } => { s.release(WorkerId(worker)); }
                }
                prop_assert_eq!(s.pending() + s.leased() + s.consumed_this_epoch, shards as usize);
                if s.epoch_complete() { s.start_next_epoch(); }
            }
            // Drain: commit everything outstanding for the current epoch.
            for worker in 0..4 { s.commit(WorkerId(worker)); }
            while s.pending() > 0 { s.lease(WorkerId(0), RoundId(u64::MAX), 5); s.commit(WorkerId(0)); }
            let epochs = s.epoch() + 1;
            for epoch in 0..epochs {
                let mut used: Vec<u64> = s.ledger().iter().filter(|c| c.epoch == epoch).map(|c| c.shard.0).collect();
                used.sort();
                prop_assert_eq!(used, (0..shards).collect::<Vec<_>>(), "epoch {}", epoch);
            }
        }
    }

    #[test]
    fn a_restored_scheduler_leases_what_the_original_would_have() {
        let shards: Vec<ShardId> = (0..7).map(ShardId).collect();
        let mut a = ShardScheduler::new(shards.clone(), 5);
        a.lease(WorkerId(1), RoundId(1), 2);
        a.commit(WorkerId(1));
        let mut in_flight = a.lease(WorkerId(2), RoundId(2), 3);
        let snapshot = a.snapshot();
        in_flight.sort();
        assert_eq!(&snapshot.pending[..3], in_flight.as_slice());
        let json = serde_json::to_string(&snapshot).unwrap();
        let mut b =
            ShardScheduler::restore(shards.clone(), serde_json::from_str(&json).unwrap()).unwrap();
        // The original gives its lease back; both then agree for two epochs.
        a.release(WorkerId(2));
        for round in 3..20 {
            let got_a = a.lease(WorkerId(1), RoundId(round), 2);
            let got_b = b.lease(WorkerId(1), RoundId(round), 2);
            assert_eq!(got_a, got_b, "round {round}");
            a.commit(WorkerId(1));
            b.commit(WorkerId(1));
            if a.epoch_complete() {
                a.start_next_epoch();
                b.start_next_epoch();
            }
        }
        assert_eq!(a.ledger(), b.ledger());
    }

    #[test]
    fn a_snapshot_that_does_not_fit_the_shards_is_refused() {
        let shards: Vec<ShardId> = (0..4).map(ShardId).collect();
        let s = ShardScheduler::new(shards.clone(), 1);
        let snapshot = s.snapshot();
        assert_eq!(
            ShardScheduler::restore(shards[..3].to_vec(), snapshot.clone()).err(),
            Some(SchedulerRestoreError::Unknown {
                shard: *snapshot.pending.iter().find(|s| s.0 == 3).unwrap()
            })
        );
        let mut more = shards.clone();
        more.push(ShardId(9));
        assert_eq!(
            ShardScheduler::restore(more, snapshot.clone()).err(),
            Some(SchedulerRestoreError::Missing { missing: 1 })
        );
        let mut twice = snapshot;
        twice.consumed.push(twice.pending[0]);
        assert!(matches!(
            ShardScheduler::restore(shards, twice),
            Err(SchedulerRestoreError::Duplicate { .. })
        ));
    }

    #[test]
    fn released_shards_are_leased_again_first() {
        let mut s = ShardScheduler::new((0..6).map(ShardId).collect(), 1);
        let first = s.lease(WorkerId(1), RoundId(1), 2);
        s.release(WorkerId(1));
        assert_eq!(s.lease(WorkerId(2), RoundId(2), 2), first);
    }
}
