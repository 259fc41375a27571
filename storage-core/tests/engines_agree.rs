//! Property test: the io_uring engine and the synchronous engine give identical results for
//! random mixes of reads, writes, discards and write-zeroes on a raw disk, and both agree
//! with a plain in-memory model of the disk.

use std::io::Write;

use proptest::prelude::*;
use storage_core::disk::{Disk, DiskOp, DiskQueue, IoVecs, RawDisk, StartError};
use storage_core::engine::EngineKind;
use testkit::workload::complete;

const DISK: u64 = 256 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Read {
        sector: u64,
        sectors: u64,
    },
    Write {
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    WriteZeroes {
        sector: u64,
        sectors: u64,
        unmap: bool,
    },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..DISK / 512).prop_flat_map(|s| (Just(s), 1..=(DISK / 512 - s).min(64)));
    prop_oneof![
        3 => range.clone().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        3 => (range.clone(), any::<u8>())
            .prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        1 => range.clone().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        1 => (range, any::<bool>()).prop_map(|((sector, sectors), unmap)| Op::WriteZeroes {
            sector,
            sectors,
            unmap
        }),
        1 => Just(Op::Flush),
    ]
}

/// Runs one op to completion on `q`, returning data read (for reads) and the result.
fn run(q: &mut impl DiskQueue, op: &Op) -> (i32, Vec<u8>) {
    // Buffers split in two to exercise scatter-gather.
    let split = |len: u64| {
        let half = ((len / 2) & !511) as usize;
        let lens: Vec<usize> = [half, len as usize - half]
            .into_iter()
            .filter(|&n| n > 0)
            .collect();
        IoVecs::owned(&lens)
    };
    let disk_op = match *op {
        Op::Read { sector, sectors } => {
            let mut buffers = split(sectors * 512);
            buffers.copy_from(0, &vec![0xEE; (sectors * 512) as usize]);
            DiskOp::Read {
                offset: sector * 512,
                buffers,
            }
        }
        Op::Write {
            sector,
            sectors,
            seed,
        } => {
            let data: Vec<u8> = (0..sectors * 512)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            let mut buffers = split(sectors * 512);
            buffers.copy_from(0, &data);
            DiskOp::Write {
                offset: sector * 512,
                buffers,
            }
        }
        Op::Discard { sector, sectors } => DiskOp::Discard {
            offset: sector * 512,
            len: sectors * 512,
        },
        Op::WriteZeroes {
            sector,
            sectors,
            unmap,
        } => DiskOp::WriteZeroes {
            offset: sector * 512,
            len: sectors * 512,
            unmap,
        },
        Op::Flush => DiskOp::Flush,
    };
    q.start(disk_op, 7).expect("start");
    q.submit().unwrap();
    let c = loop {
        if let Some(c) = q.pop_completion() {
            break c;
        }
        q.wait().unwrap();
    };
    assert_eq!(c.tag, 7);
    (c.result, c.buffers.map(|b| b.to_vec()).unwrap_or_default())
}

fn apply_model(model: &mut [u8], op: &Op) -> Option<Vec<u8>> {
    match *op {
        Op::Read { sector, sectors } => {
            Some(model[(sector * 512) as usize..((sector + sectors) * 512) as usize].to_vec())
        }
        Op::Write {
            sector,
            sectors,
            seed,
        } => {
            for i in 0..sectors * 512 {
                model[(sector * 512 + i) as usize] = (i as u8).wrapping_mul(31).wrapping_add(seed);
            }
            None
        }
        Op::Discard { .. } => None, // contents after discard are unspecified; see below
        Op::WriteZeroes {
            sector, sectors, ..
        } => {
            model[(sector * 512) as usize..((sector + sectors) * 512) as usize].fill(0);
            None
        }
        Op::Flush => None,
    }
}

fn image() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![0xA5; DISK as usize]).unwrap();
    f
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn io_uring_and_sync_engines_agree(ops in proptest::collection::vec(op(), 1..40)) {
        let (fa, fb) = (image(), image());
        let uring = RawDisk::open(fa.path(), false, false, EngineKind::IoUring).unwrap();
        let sync = RawDisk::open(fb.path(), false, false, EngineKind::Sync).unwrap();
        let (mut qa, mut qb) = (uring.new_queue(8).unwrap(), sync.new_queue(8).unwrap());
        let mut model = vec![0xA5u8; DISK as usize];
        for op in &ops {
            // Both engines punch holes for discard, so the model follows them there.
            if let Op::Discard { sector, sectors } = *op {
                model[(sector * 512) as usize..((sector + sectors) * 512) as usize].fill(0);
            }
            let expected = apply_model(&mut model, op);
            let (ra, da) = run(&mut qa, op);
            let (rb, db) = run(&mut qb, op);
            prop_assert_eq!(ra, rb, "results differ for {:?}", op);
            prop_assert!(ra >= 0, "{:?} failed with {}", op, ra);
            if let Some(expected) = expected {
                prop_assert_eq!(ra as usize, expected.len());
                prop_assert!(da == expected, "io_uring read differs from model for {:?}", op);
                prop_assert!(db == expected, "sync read differs from model for {:?}", op);
            }
        }
        let (ca, cb) = (std::fs::read(fa.path()).unwrap(), std::fs::read(fb.path()).unwrap());
        prop_assert!(ca == cb, "final images differ");
        prop_assert!(ca == model, "final image differs from model");
    }
}

#[test]
fn out_of_range_and_read_only_are_refused_before_any_io() {
    let f = image();
    // Read-only is enforced where every format's queue is wrapped: `AnyQueue`.
    let disk = storage_core::disk::AnyDisk::Raw(
        RawDisk::open(f.path(), true, false, EngineKind::IoUring).unwrap(),
    );
    let mut q = disk.new_queue(4).unwrap();
    let refused =
        |q: &mut storage_core::disk::AnyQueue, op: DiskOp| q.start(op, 1).map_err(|r| r.error);
    let buffers = || IoVecs::owned(&[4096]);
    assert_eq!(
        refused(
            &mut q,
            DiskOp::Read {
                offset: DISK - 512,
                buffers: buffers()
            }
        ),
        Err(StartError::OutOfRange)
    );
    assert_eq!(
        refused(
            &mut q,
            DiskOp::Read {
                offset: u64::MAX - 100,
                buffers: buffers()
            }
        ),
        Err(StartError::OutOfRange)
    );
    assert_eq!(
        refused(
            &mut q,
            DiskOp::Write {
                offset: 0,
                buffers: buffers()
            }
        ),
        Err(StartError::ReadOnly)
    );
    assert_eq!(q.in_flight(), 0);
}

/// Several requests in one submission go through the ring rather than the engine's inline
/// path for a lone request: one-buffer ones as READ and WRITE, the others as READV and
/// WRITEV. Reads and writes on disjoint ranges, checked against the file's contents; with
/// the page cache and with O_DIRECT (buffered writes on ext4 bypass the ring).
#[test]
fn a_batch_of_one_and_two_buffer_requests_reads_and_writes_the_right_bytes() {
    batch_of_one_and_two_buffer_requests(false);
    batch_of_one_and_two_buffer_requests(true);
}

fn batch_of_one_and_two_buffer_requests(direct: bool) {
    let f = image();
    let pattern: Vec<u8> = (0..DISK).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(f.path(), &pattern).unwrap();
    let disk = RawDisk::open(f.path(), false, direct, EngineKind::IoUring).unwrap();
    let mut q = disk.new_queue(16).unwrap();
    // Sixteen 8 KiB ranges, 4 KiB-aligned (O_DIRECT on a 4Kn disk): even ones read, odd ones
    // written; half of them in two buffers.
    let range = |i: u64| (i * 16384 + 4096 * (i % 3), 8192u64);
    let mut expected = pattern.clone();
    for i in 0..16u64 {
        let (offset, len) = range(i);
        let lens: &[usize] = if i % 4 < 2 { &[8192] } else { &[4096, 4096] };
        let mut buffers = IoVecs::owned(lens);
        let op = if i % 2 == 0 {
            DiskOp::Read { offset, buffers }
        } else {
            let data: Vec<u8> = (0..len).map(|b| (b as u8) ^ (i as u8 * 17)).collect();
            expected[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            buffers.copy_from(0, &data);
            DiskOp::Write { offset, buffers }
        };
        q.start(op, i).expect("start");
    }
    for c in complete(&mut q, 16) {
        assert_eq!(
            c.result, 8192,
            "request {} came back short or failed (direct={direct})",
            c.tag
        );
        if c.tag % 2 == 0 {
            let (offset, len) = range(c.tag);
            let got = c.buffers.expect("a read's buffers").to_vec();
            assert!(
                got == pattern[offset as usize..(offset + len) as usize],
                "read {} at {offset} differs from the file (direct={direct})",
                c.tag
            );
        }
    }
    drop(q);
    assert!(
        std::fs::read(f.path()).unwrap() == expected,
        "writes landed in the wrong place (direct={direct})"
    );
}
