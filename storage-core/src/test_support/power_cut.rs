//! Power-cut tests in the manner of CrashMonkey and ALICE, for any node over devices that
//! record their writes and syncs ([`Faults`]): a random guest workload runs while every
//! write and sync that reaches a device is logged in one order; crash states are then built
//! from the log, each what a power cut at some point could leave: per device, every write
//! before its last completed sync, and any subset of the later ones, each possibly torn at
//! 4 KiB. The test recovers the node from each state and checks every block with
//! [`check_blocks`]: it must hold a version the guest may see (at least what it wrote before
//! the last completed FLUSH), never another block's data.
//!
//! `STRATA_POWER_CUT_STATES` sets how many crash states a workload explores at evenly spread
//! points of the log (three per point; three more just before every sync come on top),
//! `STRATA_POWER_CUT_RUNS` how many workloads (other seeds) a test runs: the long run
//! raises both. Requests run one at a time, which the model of what a block may hold
//! assumes (a write's versions are ordered by when they started).

use std::collections::HashMap;

use crate::disk::{DiskOp, DiskQueue, IoVecs};
use crate::engine::faulty::{Device, Event, Faults};

use super::queue::{read, run};

/// The guest's block size.
pub(crate) const BS: u64 = 4096;
/// The version of a block written with zeroes.
pub(crate) const ZERO: u32 = u32::MAX;

/// What block `b` holds at version `v` (0: the initial contents; [`ZERO`]: zeroes).
pub(crate) fn data(b: u64, v: u32) -> Vec<u8> {
    if v == ZERO {
        return vec![0; BS as usize];
    }
    // Each 512-byte sector also names its place in the block: data moved within a block
    // shows (no node maps less than a sector).
    let word = (b << 32 | u64::from(v)) ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(BS as usize);
    for s in 0..BS / 512 {
        out.extend_from_slice(&(word ^ s << 56).to_le_bytes().repeat(64));
    }
    out
}

/// xorshift64: the workloads and crash states are the same for the same seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A guest write of a block: its version, when it started and when it was acknowledged
/// (positions in the device log).
struct Written {
    version: u32,
    start: usize,
    ack: usize,
}

/// A completed FLUSH: when it started and when it completed.
struct Flushed {
    start: usize,
    done: usize,
}

/// What the guest did, in log positions, and what it does next.
pub(crate) struct Workload {
    /// By block.
    writes: HashMap<u64, Vec<Written>>,
    flushes: Vec<Flushed>,
    rng: Rng,
    version: u32,
    /// The blocks written are `0..hot`.
    hot: u64,
}

impl Workload {
    pub(crate) fn new(hot: u64, seed: u64) -> Workload {
        Workload {
            writes: HashMap::new(),
            flushes: Vec::new(),
            rng: Rng(seed),
            version: 0,
            hot,
        }
    }

    /// Runs `ops` random requests on `q` over blocks `0..hot`, `faults` recording.
    pub(crate) fn run(
        q: &mut impl DiskQueue,
        faults: &Faults,
        hot: u64,
        ops: usize,
        seed: u64,
    ) -> Workload {
        let mut w = Workload::new(hot, seed);
        for _ in 0..ops {
            w.step(q, faults);
        }
        w
    }

    /// Runs one random request: a write of 1 to 4 blocks, write-zeroes with or without
    /// unmap, a read or a flush.
    pub(crate) fn step(&mut self, q: &mut impl DiskQueue, faults: &Faults) {
        let rng = &mut self.rng;
        let roll = rng.below(100);
        let first = rng.below(self.hot);
        let n = (1 + rng.below(4)).min(self.hot - first);
        if roll < 45 || (50..55).contains(&roll) {
            let zero = roll >= 50;
            self.version += 1;
            let v = if zero { ZERO } else { self.version };
            let start = faults.mark();
            let r = if zero {
                let unmap = rng.below(2) == 0;
                run(
                    q,
                    DiskOp::WriteZeroes {
                        offset: first * BS,
                        len: n * BS,
                        unmap,
                    },
                )
            } else {
                let buf: Vec<u8> = (first..first + n).flat_map(|b| data(b, v)).collect();
                let buffers = IoVecs::from_bytes(&buf);
                run(
                    q,
                    DiskOp::Write {
                        offset: first * BS,
                        buffers,
                    },
                )
            };
            assert!(r >= 0, "write failed: {r}");
            let ack = faults.mark();
            for block in first..first + n {
                self.writes.entry(block).or_default().push(Written {
                    version: v,
                    start,
                    ack,
                });
            }
        } else if roll < 90 {
            read(q, first * BS, (n * BS) as usize);
        } else {
            let start = faults.mark();
            assert_eq!(run(q, DiskOp::Flush), 0);
            self.flushes.push(Flushed {
                start,
                done: faults.mark(),
            });
        }
    }

    /// How many FLUSHes completed.
    pub(crate) fn flushes(&self) -> usize {
        self.flushes.len()
    }

    /// The versions block `b`, at version `initial` when recording began, may hold after a
    /// power cut at log position `cut`.
    fn allowed(&self, b: u64, initial: u32, cut: usize) -> Vec<u32> {
        let flushed_before = self
            .flushes
            .iter()
            .filter(|f| f.done <= cut)
            .map(|f| f.start)
            .max();
        let mine = self
            .writes
            .get(&b)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .filter(|w| w.start < cut);
        let floor = mine
            .clone()
            .filter(|w| flushed_before.is_some_and(|f| w.ack <= f))
            .max_by_key(|w| w.start);
        let mut ok = vec![floor.map_or(initial, |w| w.version)];
        ok.extend(
            mine.filter(|w| floor.is_none_or(|f| w.start > f.start))
                .map(|w| w.version),
        );
        ok
    }

    /// Checks that every block of `disk` (the node's contents from block 0, read after
    /// recovering from a cut at `cut`) holds a version the guest may see; block `b` held
    /// version `initial(b)` when recording began. A block may be torn between such
    /// versions in pieces of `torn` bytes (a write is atomic only per piece: a node that
    /// maps each piece on its own, as qcow2 with small clusters does, makes no promise
    /// across them, nor does a disk for a write not yet flushed).
    pub(crate) fn check_blocks(
        &self,
        label: &str,
        disk: &[u8],
        cut: usize,
        torn: usize,
        initial: impl Fn(u64) -> u32,
    ) {
        for (b, got) in disk.chunks(BS as usize).enumerate() {
            let b = b as u64;
            let ok = self.allowed(b, initial(b), cut);
            let versions: Vec<Vec<u8>> = ok.iter().map(|&v| data(b, v)).collect();
            for (i, piece) in got.chunks(torn).enumerate() {
                let at = i * torn..(i + 1) * torn;
                assert!(
                    versions.iter().any(|v| piece == &v[at.clone()]),
                    "{label}: after a power cut at {cut} of the log, block {b} holds \
                     {:02x?}... at byte {}, expected one of versions {ok:?}",
                    &piece[..16],
                    at.start
                );
            }
        }
    }
}

/// How a write past the end of a device image is applied.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum PastEnd {
    /// Cut off (a fixed-size device: the file would grow, but nobody reads there).
    Drop,
    /// The image grows (an image file whose node allocates at its end).
    Grow,
}

fn apply(image: &mut Vec<u8>, offset: u64, data: &[u8], past_end: PastEnd) {
    let o = offset as usize;
    if past_end == PastEnd::Grow && o + data.len() > image.len() {
        image.resize(o + data.len(), 0);
    }
    let end = (o + data.len()).min(image.len());
    if o < end {
        image[o..end].copy_from_slice(&data[..end - o]);
    }
}

/// Builds crash states from `log` (about `states`, and more where the log syncs often)
/// over the devices' images as recording began (`images[index(device)]`), and calls
/// `check(cut, images)` on each. Returns how many states were checked.
pub(crate) fn crash_states(
    images: &[Vec<u8>],
    log: &[Event],
    index: impl Fn(Device) -> usize,
    past_end: PastEnd,
    (states, seed): (usize, u64),
    mut check: impl FnMut(usize, &[Vec<u8>]),
) -> usize {
    let mut rng = Rng(seed ^ 0xdead_beef);
    let per_cut = 3usize;
    let step = ((log.len() + 1) * per_cut).div_ceil(states).max(1);
    // Evenly spread, and every point just before a sync completes: there, everything
    // written since the device's previous sync is in the air at once (where an ordering
    // mistake shows).
    let mut cuts: Vec<usize> = (0..=log.len()).step_by(step).collect();
    cuts.push(log.len());
    cuts.extend(
        log.iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Event::Sync { .. }))
            .map(|(i, _)| i),
    );
    cuts.sort_unstable();
    cuts.dedup();
    let mut checked = 0;
    for cut in cuts {
        // The last sync of each device before the cut: writes before what it covers are
        // durable; those after may or may not have landed.
        let mut covers = vec![0usize; images.len()];
        for e in &log[..cut] {
            if let Event::Sync { device, covers: c } = e {
                covers[index(*device)] = covers[index(*device)].max(*c);
            }
        }
        for _ in 0..per_cut {
            let mut imgs = images.to_vec();
            for (i, e) in log[..cut].iter().enumerate() {
                let Event::Write {
                    device,
                    offset,
                    data,
                } = e
                else {
                    continue;
                };
                let d = index(*device);
                if i < covers[d] {
                    apply(&mut imgs[d], *offset, data, past_end);
                    continue;
                }
                match rng.below(3) {
                    0 => apply(&mut imgs[d], *offset, data, past_end),
                    1 => {}
                    _ => {
                        // Torn: each 4 KiB page of the file that the write covers lands
                        // or not.
                        let mut at = *offset;
                        let end = offset + data.len() as u64;
                        while at < end {
                            let next = ((at / BS + 1) * BS).min(end);
                            if rng.below(2) == 0 {
                                let piece = &data[(at - offset) as usize..(next - offset) as usize];
                                apply(&mut imgs[d], at, piece, past_end);
                            }
                            at = next;
                        }
                    }
                }
            }
            check(cut, &imgs);
            checked += 1;
        }
    }
    checked
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// How many crash states a workload explores (`STRATA_POWER_CUT_STATES`, or `default`).
pub(crate) fn states(default: usize) -> usize {
    env_or("STRATA_POWER_CUT_STATES", default)
}

/// The seeds of the workloads a test runs (`STRATA_POWER_CUT_RUNS` of them, from `seed`).
pub(crate) fn seeds(seed: u64) -> impl Iterator<Item = u64> {
    (0..env_or("STRATA_POWER_CUT_RUNS", 1) as u64)
        .map(move |run| seed.wrapping_add(run.wrapping_mul(0x9e37_79b9)))
}
