//! Power-cut tests of the qcow2 node (see `test_support::power_cut`): a guest workload runs
//! on an image while every write and sync that reaches its file (the guest's data through
//! the queue, the metadata the node writes itself) is recorded; the image is opened again
//! from each crash state built from that log. Opening must succeed, our check must find no
//! corruption (leaked clusters are allowed, as after a crash in QEMU), and every block must
//! hold a version the guest may see.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::*;
use crate::disk::{Disk, DiskOp, RawDisk};
use crate::engine::faulty::{Device, Event, Faults};
use crate::engine::EngineKind;
use crate::test_support::power_cut::{self, crash_states, data, PastEnd, Workload, BS, ZERO};
use crate::test_support::queue::{read, run};

/// One image and how the test uses it.
struct Setup {
    cluster: u64,
    /// Guest blocks; the workload writes all of them.
    blocks: u64,
    /// A raw backing file holding every block at version 0; without one, blocks read as
    /// zeroes until written (or until prefilled).
    backing: bool,
    /// Blocks written (at version 0) and flushed before recording begins.
    prefill: u64,
    /// The L2 cache (the growing image's is small enough that tables are evicted).
    l2_cache: u64,
}

impl Setup {
    /// The version block `b` holds when recording begins.
    fn initial(&self, b: u64) -> u32 {
        if self.backing || b < self.prefill {
            0
        } else {
            ZERO
        }
    }
}

fn open(image: &Path, setup: &Setup, faults: Option<Arc<Faults>>) -> Qcow2Disk {
    let mut file = RawDisk::open(image, false, false, EngineKind::Sync).unwrap();
    if let Some(f) = faults {
        file.set_faults(f);
    }
    Qcow2Disk::open(
        AnyDisk::Raw(file),
        image,
        false,
        &Backing::FromImage,
        setup.l2_cache,
        0,
        None,
    )
    .unwrap_or_else(|e| panic!("opening {}: {e}", image.display()))
}

fn make(dir: &Path, setup: &Setup) -> std::path::PathBuf {
    let image = dir.join("disk.qcow2");
    let backing = setup.backing.then(|| {
        let base: Vec<u8> = (0..setup.blocks).flat_map(|b| data(b, 0)).collect();
        std::fs::write(dir.join("base.raw"), base).unwrap();
        ("base.raw".to_string(), "raw".to_string())
    });
    create(
        &image,
        &CreateOptions {
            size: setup.blocks * BS,
            cluster_size: setup.cluster,
            backing,
            encryption: None,
        },
    )
    .unwrap();
    image
}

/// Records a workload on a new image, then checks its crash states. Returns each
/// workload's log.
fn power_cuts(setup: &Setup, seed: u64, ops: usize) -> Vec<Vec<Event>> {
    let mut logs = Vec::new();
    for seed in power_cut::seeds(seed) {
        let dir = tempfile::tempdir().unwrap();
        let image = make(dir.path(), setup);
        let faults = Arc::new(Faults::default());
        let disk = open(&image, setup, Some(faults.clone()));
        let mut q = disk.new_queue(8).unwrap();
        prefill(&mut q, setup.prefill);
        faults.start_recording();
        let start = std::fs::read(&image).unwrap();
        let workload = Workload::run(&mut q, &faults, setup.blocks, ops, seed);
        drop(q);
        let log = faults.take_log();
        drop(disk);
        let label = format!("cluster {}, seed {seed:#x}", setup.cluster);
        explore(&image, setup, start, &log, &workload, &label, seed);
        logs.push(log);
    }
    logs
}

/// Writes blocks `0..n` at version 0 and flushes.
fn prefill(q: &mut Qcow2Queue, n: u64) {
    if n > 0 {
        let buf: Vec<u8> = (0..n).flat_map(|b| data(b, 0)).collect();
        let buffers = crate::disk::IoVecs::from_bytes(&buf);
        assert_eq!(
            run(q, DiskOp::Write { offset: 0, buffers }),
            buf.len() as i32
        );
    }
    assert_eq!(run(q, DiskOp::Flush), 0);
}

/// Builds crash states of `image` (as `start` when recording began, then `log`), and
/// checks each: our check finds no corruption, and the image, opened again over whatever
/// chain its header names, reads what `workload` allows.
fn explore(
    image: &Path,
    setup: &Setup,
    start: Vec<u8>,
    log: &[Event],
    workload: &Workload,
    label: &str,
    seed: u64,
) {
    assert!(
        workload.flushes() > 10,
        "the workload must flush ({} flushes)",
        workload.flushes()
    );
    let checked = crash_states(
        &[start],
        log,
        |d| match d {
            Device::Capacity => 0,
            Device::Cache => unreachable!("one file"),
        },
        PastEnd::Grow,
        (power_cut::states(300), seed),
        |cut, imgs| {
            let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
            f.set_len(imgs[0].len() as u64).unwrap();
            f.write_all_at(&imgs[0], 0).unwrap();
            drop(f);
            let report = check::check(image, check::Repair::None).unwrap();
            assert!(
                report.corruptions == 0 && report.check_errors == 0,
                "{label}: after a power cut at {cut} of the log, the image is corrupt: {:?}",
                report.messages
            );
            let disk = open(image, setup, None);
            let mut q = disk.new_queue(8).unwrap();
            let buf = read(&mut q, 0, (setup.blocks * BS) as usize);
            let torn = setup.cluster.min(BS) as usize;
            workload.check_blocks(label, &buf, cut, torn, |b| setup.initial(b));
        },
    );
    eprintln!(
        "{label}: {checked} crash states from a log of {} events checked",
        log.len()
    );
}

/// 512-byte clusters: every few writes need a new L2 table or refcount block, and the
/// image (filled first to just below what one refcount table cluster covers, 8 MiB of
/// file) outgrows its refcount table, which moves while the guest writes.
#[test]
fn power_cuts_while_an_image_grows_lose_nothing_flushed() {
    let setup = Setup {
        cluster: 512,
        blocks: 3072,
        backing: false,
        prefill: 1900,
        l2_cache: 16 << 10,
    };
    for log in power_cuts(&setup, 0x5eed_0001, 400) {
        // The header naming the moved table is in the log, a sync after it.
        let moved = log.iter().position(
            |e| matches!(e, Event::Write { offset, .. } if *offset == header::OFF_REFCOUNT_TABLE),
        );
        assert!(
            moved.is_some_and(|i| log[i..].iter().any(|e| matches!(e, Event::Sync { .. }))),
            "the workload must outgrow the refcount table while recorded"
        );
    }
}

/// An overlay with clusters twice the guest's block: a block written alone copies its
/// neighbour up from the backing file into the new cluster, and write-zeroes over a
/// backing file must hide what is below.
#[test]
fn power_cuts_on_an_overlay_keep_what_the_backing_file_shows() {
    let setup = Setup {
        cluster: 8192,
        blocks: 512,
        backing: true,
        prefill: 0,
        l2_cache: 64 << 10,
    };
    power_cuts(&setup, 0x5eed_0002, 400);
}

/// Deleting the snapshot under the disk's image while the guest writes: its clusters are
/// copied up between the guest's requests, then the image names the snapshot's backing
/// file (none here). Every crash state reads the same, through the snapshot or without it;
/// after the delete, the image reads the same with the snapshot's file gone.
#[test]
fn power_cuts_while_a_snapshot_is_deleted_lose_nothing() {
    let setup = Setup {
        cluster: 4096,
        blocks: 512,
        backing: false,
        // Every cluster: the last copies come just before the header is rewritten.
        prefill: 512,
        l2_cache: 64 << 10,
    };
    for seed in power_cut::seeds(0x5eed_0003) {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("disk@s1.qcow2");
        let opts = |backing| CreateOptions {
            size: setup.blocks * BS,
            cluster_size: setup.cluster,
            backing,
            encryption: None,
        };
        create(&snap, &opts(None)).unwrap();
        {
            let disk = open(&snap, &setup, None);
            prefill(&mut disk.new_queue(8).unwrap(), setup.prefill);
        }
        let image = dir.path().join("disk.qcow2");
        create(
            &image,
            &opts(Some(("disk@s1.qcow2".into(), "qcow2".into()))),
        )
        .unwrap();
        let faults = Arc::new(Faults::default());
        let disk = open(&image, &setup, Some(faults.clone()));
        let mut q = disk.new_queue(8).unwrap();
        assert_eq!(run(&mut q, DiskOp::Flush), 0);
        faults.start_recording();
        let start = std::fs::read(&image).unwrap();
        let mut workload = Workload::new(setup.blocks, seed);
        let mut rng = power_cut::Rng(seed ^ 0x51);
        let mut prepared = disk
            .stream_snapshot("s1", &mut |_, _| {
                if rng.below(2) == 0 {
                    workload.step(&mut q, &faults);
                }
                true
            })
            .unwrap();
        disk.commit_delete(&mut prepared).unwrap();
        let committed = faults.mark();
        for _ in 0..100 {
            workload.step(&mut q, &faults);
        }
        assert!(
            faults.mark() > committed,
            "the image's writes after the delete must be recorded"
        );
        assert_eq!(run(&mut q, DiskOp::Flush), 0);
        let end = read(&mut q, 0, (setup.blocks * BS) as usize);
        drop(q);
        let log = faults.take_log();
        drop(disk);
        let kept = std::fs::read(&snap).unwrap();
        remove_snapshot_file(&snap).unwrap();
        let gone = read(
            &mut open(&image, &setup, None).new_queue(8).unwrap(),
            0,
            end.len(),
        );
        assert!(
            gone == end,
            "without the snapshot's file the disk reads otherwise"
        );
        // The crash states before the header was rewritten read through the snapshot.
        std::fs::write(&snap, kept).unwrap();
        let label = format!("deleting a snapshot, seed {seed:#x}");
        explore(&image, &setup, start, &log, &workload, &label, seed);
    }
}
