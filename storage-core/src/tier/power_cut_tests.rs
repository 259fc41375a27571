//! Power-cut tests of the tier (see `test_support::power_cut`): a workload runs on a tiered
//! disk while every write and sync that reaches either device is recorded (the engines' and
//! the background threads', in one order); the disk is recovered from each crash state
//! built from that log and read whole. Recovery must succeed and every block must hold a
//! value the guest may see.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::*;
use crate::disk::{Disk, DiskOp};
use crate::engine::faulty::{Device, Event};
use crate::test_support::power_cut::{self, crash_states, data, PastEnd, Workload, BS};
use crate::test_support::queue::{read, run};
use crate::StorageError;

/// Blocks of the capacity device; the workload writes the first `HOT` of them, more than
/// the cache holds, so blocks are evicted and slots reused.
const BLOCKS: u64 = 512;
const HOT: u64 = 320;
const CACHE: u64 = 1 << 20;

fn open(dir: &Path, mode: CacheMode) -> Result<TieredDisk, StorageError> {
    super::tests::open_tier(dir, mode, CACHE, false)
}

/// A recorded run: the device images when recording began (capacity, cache), the log, and
/// what the guest did.
struct Recording {
    images: [Vec<u8>; 2],
    log: Vec<Event>,
    workload: Workload,
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
    let workload = Workload::run(&mut q, &faults, HOT, ops, seed);
    drop(q);
    let log = faults.take_log();
    drop(disk);
    Recording {
        images,
        log,
        workload,
    }
}

fn check_state(dir: &Path, mode: CacheMode, imgs: &[Vec<u8>], cut: usize, rec: &Recording) {
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
    rec.workload
        .check_blocks(&format!("{mode:?}"), &buf, cut, BS as usize, |_| 0);
}

fn power_cuts(mode: CacheMode, seed: u64) {
    for seed in power_cut::seeds(seed) {
        let dir = tempfile::tempdir().unwrap();
        let rec = record(dir.path(), mode, seed, 400);
        let syncs = rec
            .log
            .iter()
            .filter(|e| matches!(e, Event::Sync { .. }))
            .count();
        assert!(
            rec.workload.flushes() > 10 && syncs > 10,
            "the workload must flush ({} flushes, {syncs} syncs)",
            rec.workload.flushes()
        );
        let index = |d: Device| match d {
            Device::Capacity => 0,
            Device::Cache => 1,
        };
        let checked = crash_states(
            &rec.images,
            &rec.log,
            index,
            PastEnd::Drop,
            (power_cut::states(1000), seed),
            |cut, imgs| check_state(dir.path(), mode, imgs, cut, &rec),
        );
        eprintln!(
            "{mode:?}, seed {seed:#x}: {checked} crash states from a log of {} events checked",
            rec.log.len()
        );
    }
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
