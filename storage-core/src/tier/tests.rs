//! The tier's data path driven directly, without a daemon: each test opens a tiered disk on
//! temporary files (its engines are the synchronous one with injected faults, see
//! `engine::faulty`), drives a queue as a worker does, and checks what a guest would read.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;

use super::layout::SlotState;
use std::sync::atomic::AtomicU64;

use super::*;
use crate::disk::{AnyDisk, Disk, DiskOp, DiskQueue, IoVecs, Rejected, StartError};
use crate::engine::faulty::{Device, Fault, Faults, OpKind};
use crate::engine::EngineKind;
use crate::iov::AlignedBuf;
use std::sync::Arc;

const BS: u64 = 4096;
const CAP: u64 = 32 << 20;
const CACHE: u64 = 16 << 20;

/// The capacity device's initial contents: every 8-byte word names its offset.
fn initial(len: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| ((i * 8) ^ 0x5a5a_0000).to_le_bytes())
        .collect()
}

struct Fixture {
    dir: tempfile::TempDir,
    /// `None` only between closing and reopening it.
    open: Option<TieredDisk>,
    /// What the disk must read back.
    model: Vec<u8>,
}

impl Fixture {
    fn new(mode: CacheMode) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let model = initial(CAP);
        std::fs::write(dir.path().join("cap.img"), &model).unwrap();
        let open = Some(Self::open_in(&dir, mode, false));
        Fixture { dir, open, model }
    }

    fn open_in(dir: &tempfile::TempDir, mode: CacheMode, read_only: bool) -> TieredDisk {
        open_tier(dir.path(), mode, CACHE, read_only).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn faults(&self) -> &Faults {
        &self.disk().shared.cache.faults
    }

    fn metric(&self, m: impl Fn(&TierMetrics) -> &AtomicU64) -> u64 {
        m(&self.disk().shared.metrics).load(Relaxed)
    }

    fn disk(&self) -> &TieredDisk {
        self.open.as_ref().expect("the disk is open")
    }

    fn reopen(&mut self, mode: CacheMode) {
        // The old disk's threads stop (and flush) before the new one opens the files.
        drop(self.open.take());
        self.open = Some(Self::open_in(&self.dir, mode, false));
    }
}

/// A tiered disk over `dir/cap.img` with its cache at `dir/cache.img` (4 KiB blocks, no
/// sequential cutoff; under test, the synchronous engines with faults).
pub(super) fn open_tier(
    dir: &std::path::Path,
    mode: CacheMode,
    cache_size: u64,
    read_only: bool,
) -> Result<TieredDisk, crate::StorageError> {
    let spec = TierSpec {
        cache: dir.join("cache.img"),
        cache_size,
        mode,
        policy: None,
        block_size: BS,
        seq_cutoff: u64::MAX,
        force_format: false,
        locking: true,
    };
    let capacity =
        crate::disk::RawDisk::open(&dir.join("cap.img"), read_only, false, EngineKind::Sync)?;
    TieredDisk::open(AnyDisk::Raw(capacity), read_only, EngineKind::Sync, &spec)
}

/// A buffer the test can still write while a request uses it, as a guest can.
pub(super) fn shared(len: usize) -> (IoVecs, Arc<AlignedBuf>) {
    let mem = Arc::new(AlignedBuf::new(len));
    let mut v = IoVecs::with_capacity(1);
    v.reset(mem.clone());
    // SAFETY: the buffer belongs to `mem`, the keep-alive just set, and holds `len` bytes.
    unsafe { v.push(mem.as_ptr(), len) }.unwrap();
    (v, mem)
}

pub(super) use crate::test_support::queue::{read, run, settle, settle_all, start};

fn write(q: &mut impl DiskQueue, offset: u64, data: &[u8]) -> i32 {
    let buffers = IoVecs::from_bytes(data);
    run(q, DiskOp::Write { offset, buffers })
}

/// Item 1 of the security review: a read miss is promoted from the capacity device's data,
/// never from the guest's buffer, which the guest can rewrite before the promotion runs.
#[test]
fn a_promotion_never_caches_what_the_guest_wrote_into_its_read_buffer() {
    let f = Fixture::new(CacheMode::WriteThrough);
    let mut q = f.disk().new_queue(8).unwrap();
    let (buffers, mem) = shared(BS as usize);
    start(&mut q, DiskOp::Read { offset: 0, buffers }, 0);
    // The capacity read has run (the engine is synchronous); the worker has not yet seen
    // its completion. A guest rewrites its buffer meanwhile.
    q.submit().unwrap();
    // SAFETY: `mem` keeps the buffer alive; the engine has finished with it (synchronous
    // engine), and the test plays the guest, which may write it at any time.
    unsafe { std::ptr::write_bytes(mem.as_ptr(), 0xee, BS as usize) };
    let done = settle(&mut q);
    assert_eq!(done, vec![(0, BS as i32)]);
    assert_eq!(f.metric(|m| &m.promotions), 1, "the miss was promoted");
    let again = read(&mut q, 0, BS as usize);
    assert_eq!(
        f.metric(|m| &m.read_hits),
        1,
        "the second read came from the cache"
    );
    assert!(
        again == f.model[..BS as usize],
        "the cache holds what the guest wrote into its read buffer"
    );
}

/// Item 6: a read that misses while a capacity write of the same block is in flight must
/// not cache the data that write replaces.
#[test]
fn a_read_racing_a_capacity_write_never_caches_the_old_data() {
    let f = Fixture::new(CacheMode::WriteThrough);
    let mut q = f.disk().new_queue(8).unwrap();
    f.faults()
        .add(Device::Capacity, OpKind::Write, Fault::Hold, Some(1));
    let buffers = IoVecs::from_bytes(&[0xab; BS as usize]);
    start(&mut q, DiskOp::Write { offset: 0, buffers }, 0);
    q.submit().unwrap();
    let buffers = IoVecs::owned(&[BS as usize]);
    start(&mut q, DiskOp::Read { offset: 0, buffers }, 1);
    q.submit().unwrap();
    f.faults().release();
    let mut done = settle(&mut q);
    done.sort();
    assert_eq!(done, vec![(0, BS as i32), (1, BS as i32)]);
    assert_eq!(read(&mut q, 0, BS as usize), vec![0xab; BS as usize]);
}

/// Item 7: requests far larger than the rings (4 MiB = 1024 cache blocks, many at once, in
/// many iovecs) work, and so do discards of any size.
#[test]
fn large_requests_work_under_load() {
    for mode in [CacheMode::WriteThrough, CacheMode::WriteBack] {
        let mut f = Fixture::new(mode);
        let mut q = f.disk().new_queue(8).unwrap();
        const MIB4: usize = 4 << 20;
        // Warm part of the range, so requests mix hits and misses.
        for i in 0..64u64 {
            read(&mut q, (1 << 20) + i * 3 * BS, BS as usize);
        }
        let data: Vec<Vec<u8>> = (0..3)
            .map(|k| (0..MIB4).map(|i| (i / 4096 + k * 7 + i) as u8).collect())
            .collect();
        // One write in 4 KiB iovecs, the others in one iovec each.
        let mut iovs0 = IoVecs::owned(&vec![BS as usize; MIB4 / BS as usize]);
        iovs0.copy_from(0, &data[0]);
        let offsets = [1u64 << 20, 6 << 20, (12 << 20) + 512];
        let writes = [
            iovs0,
            IoVecs::from_bytes(&data[1]),
            IoVecs::from_bytes(&data[2]),
        ];
        for (k, buffers) in writes.into_iter().enumerate() {
            let offset = offsets[k];
            start(&mut q, DiskOp::Write { offset, buffers }, k as u64);
        }
        let mut done = settle(&mut q);
        done.sort();
        assert_eq!(
            done,
            vec![(0, MIB4 as i32), (1, MIB4 as i32), (2, MIB4 as i32)]
        );
        for (k, &o) in offsets.iter().enumerate() {
            f.model[o as usize..o as usize + MIB4].copy_from_slice(&data[k]);
        }
        let discard = (20u64 << 20, 8u64 << 20);
        let r = run(
            &mut q,
            DiskOp::WriteZeroes {
                offset: discard.0,
                len: discard.1,
                unmap: false,
            },
        );
        assert_eq!(r, 0, "{mode:?}: write-zeroes of 8 MiB");
        f.model[discard.0 as usize..(discard.0 + discard.1) as usize].fill(0);
        // Read everything back, 4 MiB at a time, several at once.
        for i in 0..CAP as usize / MIB4 {
            let offset = (i * MIB4) as u64;
            let buffers = IoVecs::owned(&[MIB4]);
            start(&mut q, DiskOp::Read { offset, buffers }, i as u64);
        }
        let mut done = settle_all(&mut q);
        done.sort_by_key(|c| c.tag);
        assert!(done.iter().all(|c| c.result == MIB4 as i32), "{done:?}");
        for (i, c) in done.iter().enumerate() {
            assert!(
                c.buffers.as_ref().unwrap().to_vec() == f.model[i * MIB4..(i + 1) * MIB4],
                "{mode:?}: 4 MiB at {} MiB differs",
                i * 4
            );
        }
        drop(q);
        f.reopen(mode);
        let mut q = f.disk().new_queue(8).unwrap();
        assert!(
            read(&mut q, 0, CAP as usize) == f.model,
            "{mode:?}: after reopening"
        );
    }
}

/// Item 2: a read-only tiered disk refuses writes, discards and write-zeroes, and neither
/// device changes.
#[test]
fn a_read_only_tiered_disk_refuses_every_write_and_changes_nothing() {
    let f = Fixture::new(CacheMode::WriteBack);
    let mut f = f;
    drop(f.open.take());
    let slots = |dir: &tempfile::TempDir| {
        let cache = std::fs::File::open(dir.path().join("cache.img")).unwrap();
        super::journal::recover_file(&cache).unwrap().1
    };
    let cache_before = slots(&f.dir);
    let disk = AnyDisk::Tiered(Fixture::open_in(&f.dir, CacheMode::WriteBack, true));
    let mut q = disk.new_queue(8).unwrap();
    for op in [
        DiskOp::Write {
            offset: 0,
            buffers: IoVecs::from_bytes(&[1u8; BS as usize]),
        },
        DiskOp::Discard { offset: 0, len: BS },
        DiskOp::WriteZeroes {
            offset: 0,
            len: BS,
            unmap: true,
        },
    ] {
        let what = format!("{op:?}");
        let r = q.start(op, 0).map_err(|r| r.error);
        assert_eq!(r, Err(StartError::ReadOnly), "{what}");
    }
    drop(q);
    drop(disk);
    assert!(std::fs::read(f.dir.path().join("cap.img")).unwrap() == f.model);
    assert!(slots(&f.dir) == cache_before);
}

/// Item 4: in write-back mode a failed sync of the cache takes it out of service and fails
/// that flush and every later one (the kernel reports a writeback error once).
#[test]
fn a_failed_cache_sync_in_writeback_mode_fails_every_later_flush() {
    let f = Fixture::new(CacheMode::WriteBack);
    let mut q = f.disk().new_queue(8).unwrap();
    assert_eq!(write(&mut q, 0, &[3u8; BS as usize]), BS as i32);
    assert_eq!(run(&mut q, DiskOp::Flush), 0);
    assert_eq!(write(&mut q, BS, &[4u8; BS as usize]), BS as i32);
    f.faults().add(
        Device::Cache,
        OpKind::Sync,
        Fault::Error(libc::EIO),
        Some(1),
    );
    assert_eq!(run(&mut q, DiskOp::Flush), -libc::EIO);
    assert!(
        f.disk().metrics().failed.load(Relaxed),
        "cache out of service"
    );
    assert_eq!(run(&mut q, DiskOp::Flush), -libc::EIO, "a later flush");
    // Reads still return every acknowledged write (dirty blocks are served from the cache).
    assert_eq!(read(&mut q, 0, BS as usize), vec![3u8; BS as usize]);
    assert_eq!(read(&mut q, BS, BS as usize), vec![4u8; BS as usize]);
}

/// Item 4, the capacity device: a failed sync fails that flush and every later one.
#[test]
fn a_failed_capacity_sync_fails_every_later_flush() {
    for mode in [CacheMode::WriteThrough, CacheMode::WriteAround] {
        let f = Fixture::new(mode);
        let mut q = f.disk().new_queue(8).unwrap();
        assert_eq!(write(&mut q, 0, &[3u8; BS as usize]), BS as i32);
        f.faults().add(
            Device::Capacity,
            OpKind::Sync,
            Fault::Error(libc::EIO),
            Some(1),
        );
        assert_eq!(run(&mut q, DiskOp::Flush), -libc::EIO, "{mode:?}");
        assert_eq!(write(&mut q, BS, &[4u8; BS as usize]), BS as i32);
        assert_eq!(
            run(&mut q, DiskOp::Flush),
            -libc::EIO,
            "{mode:?}: a later flush"
        );
    }
}

/// Item 4, write-through: a failed cache sync takes the cache out of service; the capacity
/// device has every block, so later flushes succeed, and the cache, whose slots may now
/// hold stale data, is formatted afresh when the disk reopens.
#[test]
fn a_failed_cache_sync_in_writethrough_mode_retires_the_cache() {
    let mut f = Fixture::new(CacheMode::WriteThrough);
    let mut q = f.disk().new_queue(8).unwrap();
    // The next sync of the cache fails, whichever round makes it: the one that journals
    // the promotion below, or the flush's.
    f.faults().add(
        Device::Cache,
        OpKind::Sync,
        Fault::Error(libc::EIO),
        Some(1),
    );
    read(&mut q, 0, BS as usize);
    assert_eq!(f.metric(|m| &m.resident_blocks), 1);
    // The capacity device holds every block: the flush loses nothing.
    assert_eq!(run(&mut q, DiskOp::Flush), 0);
    assert!(f.disk().metrics().failed.load(Relaxed));
    let sb = std::fs::read(f.path("cache.img")).unwrap();
    assert!(
        sb[..8192].iter().all(|&b| b == 0),
        "the failed cache's superblocks were not erased"
    );
    assert_eq!(write(&mut q, 0, &[9u8; BS as usize]), BS as i32);
    assert_eq!(
        run(&mut q, DiskOp::Flush),
        0,
        "the capacity device holds everything"
    );
    drop(q);
    f.reopen(CacheMode::WriteThrough);
    assert_eq!(f.metric(|m| &m.resident_blocks), 0, "reformatted");
    let mut q = f.disk().new_queue(8).unwrap();
    assert_eq!(read(&mut q, 0, BS as usize), vec![9u8; BS as usize]);
}

/// Item 5: a journal record that names a slot is written only after the slot's data is
/// durable. The data sync fails here, so no record may be on the device.
#[test]
fn no_record_reaches_the_device_before_its_data_is_synced() {
    let f = Fixture::new(CacheMode::WriteBack);
    let mut q = f.disk().new_queue(8).unwrap();
    // The first sync of data, whichever round makes it (a periodic one or the flush's).
    f.faults().add(
        Device::Cache,
        OpKind::Sync,
        Fault::Error(libc::EIO),
        Some(1),
    );
    read(&mut q, 0, BS as usize);
    assert_eq!(f.metric(|m| &m.promotions), 1);
    assert_eq!(run(&mut q, DiskOp::Flush), -libc::EIO);
    let cache = std::fs::File::open(f.path("cache.img")).unwrap();
    let (_, states, _) = super::journal::recover_file(&cache).unwrap();
    assert!(
        states.iter().all(|s| *s == SlotState::Free),
        "a record was written although its data's sync failed"
    );
}

/// Fault injection: failed and short reads and writes on either device reach the guest as
/// errors, and nothing acknowledged is lost.
#[test]
fn device_errors_reach_the_guest_and_lose_nothing_acknowledged() {
    for mode in [CacheMode::WriteThrough, CacheMode::WriteBack] {
        let f = Fixture::new(mode);
        let mut q = f.disk().new_queue(8).unwrap();
        let mut model = f.model[..(1 << 20)].to_vec();
        let block = |b: u64, v: u8| (b * BS, vec![v; BS as usize]);
        // Acknowledged writes and cached reads before the faults.
        for b in 0..16u64 {
            let (o, d) = block(b, b as u8 + 1);
            assert_eq!(write(&mut q, o, &d), BS as i32);
            model[o as usize..(o + BS) as usize].copy_from_slice(&d);
        }
        assert_eq!(run(&mut q, DiskOp::Flush), 0);
        for b in 16..32u64 {
            read(&mut q, b * BS, BS as usize);
        }
        // A failed capacity write, and a short one, are errors and change nothing.
        for fault in [Fault::Error(libc::EIO), Fault::Short(100)] {
            f.faults()
                .add(Device::Capacity, OpKind::Write, fault, Some(1));
            let (o, d) = block(40, 0x77);
            let r = write(&mut q, o, &d);
            if mode == CacheMode::WriteThrough {
                assert!(r < 0, "{mode:?} {fault:?}: {r}");
                // A failed write leaves the block undefined for the guest; restore it.
                f.faults().clear();
                assert_eq!(
                    write(&mut q, o, &model[o as usize..(o + BS) as usize]),
                    BS as i32
                );
            } else {
                // Write-back puts a whole block in the cache: the capacity device is not
                // written.
                assert_eq!(r, BS as i32, "{mode:?} {fault:?}");
                model[o as usize..(o + BS) as usize].copy_from_slice(&d);
                f.faults().clear();
            }
        }
        // A failed capacity read is an error.
        f.faults().add(
            Device::Capacity,
            OpKind::Read,
            Fault::Error(libc::EIO),
            Some(1),
        );
        let buffers = IoVecs::owned(&[BS as usize]);
        assert_eq!(
            run(
                &mut q,
                DiskOp::Read {
                    offset: 100 * BS,
                    buffers
                }
            ),
            -libc::EIO
        );
        f.faults().clear();
        // A failed cache read of a clean block is retried on the capacity device.
        f.faults().add(
            Device::Cache,
            OpKind::Read,
            Fault::Error(libc::EIO),
            Some(1),
        );
        assert_eq!(
            read(&mut q, 16 * BS, BS as usize),
            model[16 * BS as usize..17 * BS as usize]
        );
        f.faults().clear();
        // Every acknowledged write reads back.
        assert!(read(&mut q, 0, 1 << 20) == model, "{mode:?}");
    }
}

/// A write-through write over a resident block slices the guest's iovecs twice (the whole
/// range to the capacity device, the block to the cache): a write in hundreds of tiny
/// iovecs still fits the request's iovec storage, which never grows under the engines.
#[test]
fn a_write_in_many_tiny_iovecs_over_cached_blocks_works() {
    let f = Fixture::new(CacheMode::WriteThrough);
    let mut q = f.disk().new_queue(8).unwrap();
    read(&mut q, 0, 2 * BS as usize);
    assert_eq!(f.metric(|m| &m.resident_blocks), 2);
    let data: Vec<u8> = (0..2 * BS as usize).map(|i| (i * 7 % 251) as u8).collect();
    let mut buffers = IoVecs::owned(&[16; 512]);
    buffers.copy_from(0, &data);
    assert_eq!(buffers.count(), 512);
    start(&mut q, DiskOp::Write { offset: 0, buffers }, 0);
    assert_eq!(settle(&mut q), vec![(0, 2 * BS as i32)]);
    let expected: Vec<u8> = (0..2 * BS as usize).map(|i| (i * 7 % 251) as u8).collect();
    assert!(read(&mut q, 0, 2 * BS as usize) == expected);
    assert_eq!(f.metric(|m| &m.read_hits), 2, "read back from the cache");
}

/// A tag still in flight, or beyond the queue's depth, is refused with the request given
/// back whole: a second request under the same tag would replace the buffers the first
/// one's pieces are using.
#[test]
fn a_tag_in_flight_or_beyond_the_depth_is_refused() {
    let f = Fixture::new(CacheMode::WriteThrough);
    let mut q = f.disk().new_queue(8).unwrap();
    let read = || DiskOp::Read {
        offset: 0,
        buffers: IoVecs::owned(&[BS as usize]),
    };
    start(&mut q, read(), 3);
    for tag in [3, 8, u64::from(u32::MAX)] {
        match q.start(read(), tag) {
            Err(Rejected {
                error: StartError::BadTag,
                op,
            }) => assert_eq!(op.into_buffers().map(|b| b.len()), Some(BS), "tag {tag}"),
            other => panic!("tag {tag}: {other:?}"),
        }
    }
    assert_eq!(settle(&mut q), vec![(3, BS as i32)]);
    // Once answered, the tag serves again.
    start(&mut q, read(), 3);
    assert_eq!(settle(&mut q), vec![(3, BS as i32)]);
}

/// After a failed capacity sync, the slots of dirty blocks a write-zeroes dropped wait for
/// a flush to try the device again (which fails, as every later flush does): the journal
/// thread does not retry on its own every round, logging the same failure each time.
#[test]
fn a_failed_capacity_sync_is_not_retried_every_journal_round() {
    let f = Fixture::new(CacheMode::WriteBack);
    let mut q = f.disk().new_queue(8).unwrap();
    assert_eq!(write(&mut q, 0, &[5u8; BS as usize]), BS as i32);
    f.faults().add(
        Device::Capacity,
        OpKind::Sync,
        Fault::Error(libc::EIO),
        None,
    );
    // Drops the dirty block: its slot is freed once the capacity device is synced.
    let zeroes = DiskOp::WriteZeroes {
        offset: 0,
        len: BS,
        unmap: false,
    };
    assert_eq!(run(&mut q, zeroes), 0);
    assert_eq!(run(&mut q, DiskOp::Flush), -libc::EIO);
    let errors = f.metric(|m| &m.capacity_errors);
    assert!(errors >= 1);
    // Ten journal rounds later, nobody has tried again.
    std::thread::sleep(10 * super::background::JOURNAL_INTERVAL);
    assert_eq!(f.metric(|m| &m.capacity_errors), errors);
    assert_eq!(run(&mut q, DiskOp::Flush), -libc::EIO, "a later flush");
}
