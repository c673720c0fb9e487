//! The order in which training reads its samples, and which rank reads which.
//!
//! Samples come in groups (a batch must come from one group: e.g. one number of references).
//! Each epoch shuffles every group (seeded by the seed and the epoch), cuts it into global
//! batches of `batch x accum x world` samples (the last one of a group filled up from the
//! group's start), and shuffles the order of those batches. Optimiser step `s` takes global
//! batch `s` of this sequence; rank `r` reads its micro-step `m` from positions
//! `[(r * accum + m) * batch, ... + batch)` of it. So within a step the ranks read disjoint
//! samples, an epoch covers every sample once (plus the fill-up) across all ranks, and the
//! global batch of a step does not depend on how it is split: `world` ranks of `batch`,
//! one process of `world x batch`, or `accum` micro-steps read the same samples.
//!
//! Nothing is stored: a step's batch follows from (seed, step, global batch size), so a resumed
//! run continues where it stopped, also with another number of ranks (the step is kept, the
//! epoch is re-cut for the new global batch size).

use crate::error::{Error, Result};
use crate::util::{splitmix64, Rng};
use rand::seq::SliceRandom;

/// How a global batch is split: `batch` samples per micro-step, `accum` micro-steps per
/// optimiser step on each of `world` ranks; this is rank `rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub batch: usize,
    pub accum: usize,
    pub rank: usize,
    pub world: usize,
}

impl Split {
    /// One process, no accumulation.
    pub fn single(batch: usize) -> Self {
        Self { batch, accum: 1, rank: 0, world: 1 }
    }

    /// Samples per optimiser step over all ranks.
    pub fn global(&self) -> usize {
        self.batch * self.accum * self.world
    }

    fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.accum == 0 || self.world == 0 || self.rank >= self.world {
            return Err(Error::invalid("batch split", format!("{self:?} (batch, accum and world must be >= 1, rank < world)")));
        }
        Ok(())
    }
}

/// The seeded epoch order over groups of sample indices (see the module documentation).
#[derive(Clone, Debug)]
pub struct EpochSampler {
    groups: Vec<Vec<usize>>,
    seed: u64,
}

/// A seed derived from `seed` and a few numbers (order matters).
fn mix(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(splitmix64(seed), |h, &p| splitmix64(h ^ splitmix64(p)))
}

impl EpochSampler {
    /// `groups`: sample indices, one list per group; empty groups are ignored.
    pub fn new(groups: Vec<Vec<usize>>, seed: u64) -> Result<Self> {
        let groups: Vec<Vec<usize>> = groups.into_iter().filter(|g| !g.is_empty()).collect();
        if groups.is_empty() {
            return Err(Error::invalid("training samples", "none to draw batches from"));
        }
        Ok(Self { groups, seed })
    }

    /// Global batches per epoch for a global batch of `size` samples.
    pub fn batches_per_epoch(&self, size: usize) -> u64 {
        self.groups.iter().map(|g| g.len().div_ceil(size.max(1)) as u64).sum()
    }

    /// The `size` samples of optimiser step `step` (1-based), all from one group.
    pub fn global_batch(&self, step: u64, size: usize) -> Vec<usize> {
        let size = size.max(1);
        let i = step.saturating_sub(1);
        let per_epoch = self.batches_per_epoch(size);
        let (epoch, j) = (i / per_epoch, (i % per_epoch) as usize);
        let mut order: Vec<(usize, usize)> =
            self.groups.iter().enumerate().flat_map(|(g, s)| (0..s.len().div_ceil(size)).map(move |c| (g, c))).collect();
        order.shuffle(&mut crate::util::rng(mix(self.seed, &[epoch, u64::MAX])));
        let (g, chunk) = order[j];
        let mut perm = self.groups[g].clone();
        perm.shuffle(&mut crate::util::rng(mix(self.seed, &[epoch, g as u64])));
        (0..size).map(|k| perm[(chunk * size + k) % perm.len()]).collect()
    }

    /// What rank `split.rank` reads at micro-step `micro` of optimiser step `step`: the sample
    /// indices and the position of the first of them in the global batch.
    pub fn micro_batch(&self, step: u64, split: &Split, micro: usize) -> Result<(Vec<usize>, usize)> {
        split.validate()?;
        if micro >= split.accum {
            return Err(Error::invalid("micro-step", format!("{micro} of {}", split.accum)));
        }
        let global = self.global_batch(step, split.global());
        let start = (split.rank * split.accum + micro) * split.batch;
        Ok((global[start..start + split.batch].to_vec(), start))
    }

    /// A generator for the random draws of one sample of a step (e.g. its CFG dropout), seeded
    /// by the step and the sample's position in the global batch, so that the draws do not
    /// depend on how the batch is split.
    pub fn sample_rng(&self, step: u64, position: usize) -> Rng {
        crate::util::rng(mix(self.seed, &[step, position as u64, 0x5a3b]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_read_disjoint_parts_and_an_epoch_covers_every_sample() {
        // Groups of 10 and 3 samples; global batch 2 x 2 x 2 = 8.
        let groups = vec![(0..10).collect::<Vec<_>>(), vec![], vec![10, 11, 12]];
        let s = EpochSampler::new(groups, 7).unwrap();
        assert_eq!(s.batches_per_epoch(8), 2 + 1);
        let mut seen = vec![0usize; 13];
        for step in 1..=3 {
            let global = s.global_batch(step, 8);
            let group = |i: usize| i >= 10;
            assert!(global.iter().all(|&i| group(i) == group(global[0])), "one group per batch: {global:?}");
            let mut parts = Vec::new();
            for rank in 0..2 {
                for micro in 0..2 {
                    let split = Split { batch: 2, accum: 2, rank, world: 2 };
                    let (idx, start) = s.micro_batch(step, &split, micro).unwrap();
                    assert_eq!(idx, global[start..start + 2]);
                    parts.extend(idx);
                }
            }
            assert_eq!(parts, global, "the ranks' parts make up the global batch");
            for i in global {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n >= 1), "every sample read in the epoch: {seen:?}");
        assert_eq!(seen.iter().sum::<usize>(), 24);
        // Samples 0..10: each read once, plus the 6 fill-up reads of the last batch.
        assert_eq!(seen[..10].iter().sum::<usize>(), 16);

        // The same seed gives the same order; the next epoch another one; another split of
        // the same global batch size the same samples.
        let again = EpochSampler::new(vec![(0..10).collect(), vec![10, 11, 12]], 7).unwrap();
        assert_eq!(again.global_batch(2, 8), s.global_batch(2, 8));
        let epochs: Vec<Vec<usize>> = (0..4).map(|e| s.global_batch(1 + 3 * e, 8)).collect();
        assert!(epochs.windows(2).any(|w| w[0] != w[1]), "{epochs:?}");
        let one = s.micro_batch(5, &Split::single(8), 0).unwrap().0;
        assert_eq!(one, s.global_batch(5, 8));
        // Bad splits are refused.
        assert!(s.micro_batch(1, &Split { batch: 2, accum: 1, rank: 2, world: 2 }, 0).is_err());
        assert!(s.micro_batch(1, &Split::single(2), 1).is_err());
        assert!(EpochSampler::new(vec![vec![]], 0).is_err());
    }
}
