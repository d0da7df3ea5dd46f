//! Shard leasing: every training shard is consumed exactly once per epoch.
//!
//! A shard is always in exactly one of three places: pending (not yet used
//! this epoch), leased (handed to a worker for a round in flight) or consumed
//! (its round committed). A shard leaves "leased" only when the round that
//! used it commits (consumed) or the lease is given up (pending again, at the
//! front, so it is retried first).

use std::collections::{BTreeMap, VecDeque};

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

#[derive(Debug)]
pub struct ShardScheduler {
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
    fn released_shards_are_leased_again_first() {
        let mut s = ShardScheduler::new((0..6).map(ShardId).collect(), 1);
        let first = s.lease(WorkerId(1), RoundId(1), 2);
        s.release(WorkerId(1));
        assert_eq!(s.lease(WorkerId(2), RoundId(2), 2), first);
    }
}
