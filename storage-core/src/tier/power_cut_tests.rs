//! Power-cut tests of the tier, in the manner of CrashMonkey and ALICE: a workload runs on
//! a tiered disk while every write and sync that reaches either device is recorded (the
//! engines' and the background threads', in one order); then crash states are built from
//! the log, each one what a power cut at some point could leave: per device, every write
//! before its last completed sync, and any subset of the later ones, each possibly torn at
//! 4 KiB. The disk is recovered from each state and read whole: every block must hold a
//! value the guest may see (at least what it wrote before the last completed FLUSH), never
//! another block's data, and recovery must succeed.
//!
//! `STRATA_POWER_CUT_STATES` sets how many crash states each workload explores (default
//! 1000; at most three per log position), `STRATA_POWER_CUT_RUNS` how many workloads (other
//! seeds) each mode runs (default 1): the long run raises both.

use std::os::unix::fs::FileExt;

use super::tests::{read, run};
use crate::disk::IoVecs;
use std::path::Path;

use super::*;
use crate::disk::{Disk, DiskOp};
use crate::engine::faulty::{Device, Event};
use crate::StorageError;

const BS: u64 = 4096;
/// Blocks of the capacity device; the workload writes the first `HOT` of them, more than
/// the cache holds, so blocks are evicted and slots reused.
const BLOCKS: u64 = 512;
const HOT: u64 = 320;
const CACHE: u64 = 1 << 20;

/// What block `b` holds at version `v` (0: the initial contents; `ZERO`: zeroes).
fn data(b: u64, v: u32) -> Vec<u8> {
    if v == ZERO {
        return vec![0; BS as usize];
    }
    let word = (b << 32 | u64::from(v)) ^ 0x9e37_79b9_7f4a_7c15;
    word.to_le_bytes().repeat(BS as usize / 8)
}
const ZERO: u32 = u32::MAX;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A guest write of one block: its version, when it started and when it was acknowledged
/// (positions in the device log).
struct Written {
    block: u64,
    version: u32,
    start: usize,
    ack: usize,
}

/// A completed FLUSH: when it started and when it completed.
struct Flushed {
    start: usize,
    done: usize,
}

fn open(dir: &Path, mode: CacheMode) -> Result<TieredDisk, StorageError> {
    super::tests::open_tier(dir, mode, CACHE, false)
}

/// A recorded run: the device images when recording began (capacity, cache), the log, and
/// the guest's writes and flushes.
struct Recording {
    images: [Vec<u8>; 2],
    log: Vec<Event>,
    writes: Vec<Written>,
    flushes: Vec<Flushed>,
}

/// Runs the workload while recording.
fn record(dir: &Path, mode: CacheMode, seed: u64, ops: usize) -> Recording {
    let initial: Vec<u8> = (0..BLOCKS).flat_map(|b| data(b, 0)).collect();
    std::fs::write(dir.join("cap.img"), &initial).unwrap();
    let disk = open(dir, mode).unwrap();
    let faults = disk.shared.cache.faults.clone();
    let mut q = disk.new_queue(8).unwrap();
    assert_eq!(run(&mut q, DiskOp::Flush), 0);
    faults.start_recording();
    let images = [
        std::fs::read(dir.join("cap.img")).unwrap(),
        std::fs::read(dir.join("cache.img")).unwrap(),
    ];
    let mut rng = Rng(seed);
    let mut writes = Vec::new();
    let mut flushes = Vec::new();
    let mut version = 0u32;
    for _ in 0..ops {
        let roll = rng.below(100);
        let first = rng.below(HOT);
        let n = (1 + rng.below(4)).min(HOT - first);
        if roll < 45 || (50..55).contains(&roll) {
            let zero = roll >= 50;
            version += 1;
            let v = if zero { ZERO } else { version };
            let start = faults.mark();
            let r = if zero {
                run(
                    &mut q,
                    DiskOp::WriteZeroes {
                        offset: first * BS,
                        len: n * BS,
                        unmap: rng.below(2) == 0,
                    },
                )
            } else {
                let buf: Vec<u8> = (first..first + n).flat_map(|b| data(b, v)).collect();
                run(
                    &mut q,
                    DiskOp::Write {
                        offset: first * BS,
                        buffers: IoVecs::from_bytes(&buf),
                    },
                )
            };
            assert!(r >= 0, "write failed: {r}");
            let ack = faults.mark();
            for block in first..first + n {
                writes.push(Written {
                    block,
                    version: v,
                    start,
                    ack,
                });
            }
        } else if roll < 90 {
            read(&mut q, first * BS, (n * BS) as usize);
        } else {
            let start = faults.mark();
            assert_eq!(run(&mut q, DiskOp::Flush), 0);
            flushes.push(Flushed {
                start,
                done: faults.mark(),
            });
        }
    }
    drop(q);
    let log = faults.take_log();
    drop(disk);
    Recording {
        images,
        log,
        writes,
        flushes,
    }
}

/// The versions block `b` may hold after a power cut at log position `cut`.
fn allowed(b: u64, cut: usize, writes: &[Written], flushes: &[Flushed]) -> Vec<u32> {
    let flushed_before = flushes
        .iter()
        .filter(|f| f.done <= cut)
        .map(|f| f.start)
        .max();
    let mine = writes.iter().filter(|w| w.block == b && w.start < cut);
    let floor = mine
        .clone()
        .filter(|w| flushed_before.is_some_and(|f| w.ack <= f))
        .max_by_key(|w| w.start);
    let mut ok = vec![floor.map_or(0, |w| w.version)];
    ok.extend(
        mine.filter(|w| floor.is_none_or(|f| w.start > f.start))
            .map(|w| w.version),
    );
    ok
}

/// Applies a write to an image (a write past the end is cut off, as the file would grow
/// but nobody reads there).
fn apply(image: &mut [u8], offset: u64, data: &[u8]) {
    let (o, end) = (
        offset as usize,
        (offset as usize + data.len()).min(image.len()),
    );
    if o < end {
        image[o..end].copy_from_slice(&data[..end - o]);
    }
}

/// Builds crash states from the log, recovers each and checks every block. Returns how
/// many states were checked.
fn explore(dir: &Path, mode: CacheMode, rec: &Recording, states: usize, seed: u64) -> usize {
    let log = &rec.log;
    let mut rng = Rng(seed ^ 0xdead_beef);
    let index = |d: Device| match d {
        Device::Capacity => 0,
        Device::Cache => 1,
    };
    let cuts = log.len() + 1;
    let per_cut = 3usize;
    let step = (cuts * per_cut).div_ceil(states).max(1);
    let mut checked = 0;
    let mut cut = 0;
    while cut < cuts {
        // The last sync of each device before the cut: writes before what it covers are
        // durable; those after may or may not have landed.
        let mut covers = [0usize; 2];
        for e in &log[..cut] {
            if let Event::Sync { device, covers: c } = e {
                covers[index(*device)] = covers[index(*device)].max(*c);
            }
        }
        for _ in 0..per_cut {
            let mut imgs = rec.images.clone();
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
                    apply(&mut imgs[d], *offset, data);
                    continue;
                }
                match rng.below(3) {
                    0 => apply(&mut imgs[d], *offset, data),
                    1 => {}
                    _ => {
                        // Torn: each 4 KiB page of the write lands or not.
                        for (k, page) in data.chunks(BS as usize).enumerate() {
                            if rng.below(2) == 0 {
                                apply(&mut imgs[d], offset + k as u64 * BS, page);
                            }
                        }
                    }
                }
            }
            check_state(dir, mode, &imgs, cut, rec);
            checked += 1;
        }
        cut += step;
    }
    checked
}

fn check_state(dir: &Path, mode: CacheMode, imgs: &[Vec<u8>; 2], cut: usize, rec: &Recording) {
    for (name, img) in [("cap.img", &imgs[0]), ("cache.img", &imgs[1])] {
        // In place: the cache names its capacity device by inode.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(name))
            .unwrap();
        f.set_len(img.len() as u64).unwrap();
        f.write_all_at(img, 0).unwrap();
    }
    let disk = open(dir, mode)
        .unwrap_or_else(|e| panic!("{mode:?}: recovery after a cut at {cut} failed: {e}"));
    let mut q = disk.new_queue(8).unwrap();
    let buf = read(&mut q, 0, (BLOCKS * BS) as usize);
    for b in 0..BLOCKS {
        let got = &buf[(b * BS) as usize..((b + 1) * BS) as usize];
        let ok = allowed(b, cut, &rec.writes, &rec.flushes);
        assert!(
            ok.iter().any(|&v| got == data(b, v)),
            "{mode:?}: after a power cut at {cut} of the log, block {b} holds {:02x?}..., \
             expected one of versions {ok:?}",
            &got[..16]
        );
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn power_cuts(mode: CacheMode, seed: u64) {
    for run in 0..env_or("STRATA_POWER_CUT_RUNS", 1) as u64 {
        power_cut_run(mode, seed.wrapping_add(run.wrapping_mul(0x9e37_79b9)));
    }
}

fn power_cut_run(mode: CacheMode, seed: u64) {
    let states = env_or("STRATA_POWER_CUT_STATES", 1000);
    let dir = tempfile::tempdir().unwrap();
    let rec = record(dir.path(), mode, seed, 400);
    let syncs = rec
        .log
        .iter()
        .filter(|e| matches!(e, Event::Sync { .. }))
        .count();
    assert!(
        rec.flushes.len() > 10 && syncs > 10,
        "the workload must flush ({} flushes, {syncs} syncs)",
        rec.flushes.len()
    );
    let checked = explore(dir.path(), mode, &rec, states, seed);
    eprintln!(
        "{mode:?}, seed {seed:#x}: {checked} crash states from a log of {} events checked",
        rec.log.len()
    );
}

#[test]
fn power_cuts_in_writeback_mode_lose_nothing_flushed() {
    power_cuts(CacheMode::WriteBack, 0x1234_5678);
}

#[test]
fn power_cuts_in_writethrough_mode_lose_nothing_flushed() {
    power_cuts(CacheMode::WriteThrough, 0x8765_4321);
}

#[test]
fn power_cuts_in_writearound_mode_lose_nothing_flushed() {
    power_cuts(CacheMode::WriteAround, 0x0bad_cafe);
}
