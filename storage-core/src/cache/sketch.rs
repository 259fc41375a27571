//! Approximate access frequency for admission decisions (TinyLFU, Einziger et al.): a
//! count-min sketch of 4-bit counters behind a one-bit "doorkeeper" Bloom filter, aged by
//! halving every counter after a sample of `10 × capacity` increments.
//!
//! Why these pieces: exact per-block counts of every block ever seen would cost memory per
//! *distinct* block of the capacity device; the sketch costs a few bytes per cache slot. The
//! doorkeeper keeps the many blocks seen only once out of the counters (one-hit wonders are
//! the bulk of a block trace), and aging lets the sketch follow a shifting working set.

use super::policy::BlockId;

const ROWS: u32 = 4;
const MAX_COUNT: u64 = 15;

pub(crate) struct FrequencySketch {
    /// 16 four-bit counters per word.
    counters: Box<[u64]>,
    /// `64 - log2(number of counters)`.
    counter_shift: u32,
    doorkeeper: Box<[u64]>,
    door_shift: u32,
    additions: usize,
    sample: usize,
}

/// Two independent-enough 64-bit hashes of a block id (splitmix64 finaliser twice); the
/// `ROWS` counter positions are derived from them by double hashing.
#[inline]
fn hashes(block: BlockId) -> (u64, u64) {
    let mut z = block.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let h1 = z ^ (z >> 31);
    let h2 = (h1 ^ (h1 >> 29)).wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1;
    (h1, h2)
}

impl FrequencySketch {
    /// A sketch for a cache of `capacity` blocks.
    pub(crate) fn new(capacity: usize) -> Self {
        let counters = (capacity.max(16) * 4).next_power_of_two();
        let door_bits = (capacity.max(64) * 8).next_power_of_two();
        Self {
            counters: vec![0; counters / 16].into_boxed_slice(),
            counter_shift: 64 - counters.trailing_zeros(),
            doorkeeper: vec![0; door_bits / 64].into_boxed_slice(),
            door_shift: 64 - door_bits.trailing_zeros(),
            additions: 0,
            sample: capacity.max(16) * 10,
        }
    }

    #[inline]
    fn counter_positions(&self, block: BlockId) -> [usize; ROWS as usize] {
        let (h1, h2) = hashes(block);
        std::array::from_fn(|i| {
            (h1.wrapping_add(h2.wrapping_mul(i as u64)) >> self.counter_shift) as usize
        })
    }

    #[inline]
    fn door_positions(&self, block: BlockId) -> [usize; 2] {
        let (h1, h2) = hashes(block);
        // Rotated so that the doorkeeper's bits are not the counters' positions.
        let (a, b) = (h1.rotate_left(32), h2.rotate_left(17));
        [
            (a >> self.door_shift) as usize,
            (b >> self.door_shift) as usize,
        ]
    }

    #[inline]
    fn counter(&self, pos: usize) -> u64 {
        (self.counters[pos / 16] >> ((pos % 16) * 4)) & 0xF
    }

    fn in_doorkeeper(&self, block: BlockId) -> bool {
        self.door_positions(block)
            .iter()
            .all(|&p| self.doorkeeper[p / 64] & (1 << (p % 64)) != 0)
    }

    /// Estimated accesses of `block` in the current sample (0..=16).
    pub(crate) fn estimate(&self, block: BlockId) -> u8 {
        let min = self
            .counter_positions(block)
            .iter()
            .map(|&p| self.counter(p))
            .min()
            .unwrap_or(0);
        (min + u64::from(self.in_doorkeeper(block))) as u8
    }

    /// Records one access to `block`.
    pub(crate) fn increment(&mut self, block: BlockId) {
        if !self.in_doorkeeper(block) {
            for p in self.door_positions(block) {
                self.doorkeeper[p / 64] |= 1 << (p % 64);
            }
        } else {
            let positions = self.counter_positions(block);
            let min = positions
                .iter()
                .map(|&p| self.counter(p))
                .min()
                .unwrap_or(0);
            if min < MAX_COUNT {
                // Conservative update: only the counters at the minimum grow, which keeps
                // collisions from inflating everyone's estimate.
                for p in positions {
                    if self.counter(p) == min {
                        self.counters[p / 16] += 1 << ((p % 16) * 4);
                    }
                }
            }
        }
        self.additions += 1;
        if self.additions >= self.sample {
            self.age();
        }
    }

    /// Halves every counter and clears the doorkeeper: recent history weighs more. Costs a
    /// pass over the sketch once per `sample` increments, i.e. O(1) amortised.
    fn age(&mut self) {
        for word in self.counters.iter_mut() {
            *word = (*word >> 1) & 0x7777_7777_7777_7777;
        }
        self.doorkeeper.fill(0);
        self.additions /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_ages() {
        let mut s = FrequencySketch::new(1000);
        assert_eq!(s.estimate(7), 0);
        s.increment(7);
        assert_eq!(s.estimate(7), 1, "doorkeeper holds the first access");
        for _ in 0..5 {
            s.increment(7);
        }
        assert_eq!(s.estimate(7), 6);
        for _ in 0..100 {
            s.increment(8);
        }
        assert_eq!(
            s.estimate(8),
            16,
            "counter saturates at 15 plus the doorkeeper"
        );
        assert!(s.estimate(9) <= 1);
        s.age();
        assert_eq!(s.estimate(8), 7);
        assert_eq!(s.estimate(7), 2);
    }
}
