//! Property test: the io_uring engine and the synchronous engine give identical results for
//! random mixes of reads, writes, discards and write-zeroes on a raw disk, and both agree
//! with a plain in-memory model of the disk.

use std::io::Write;

use proptest::prelude::*;
use storage_core::disk::{Disk, DiskOp, DiskQueue, RawDisk};
use storage_core::engine::EngineKind;

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
    let mut buf = Vec::new();
    // Split buffers into two iovecs to exercise scatter-gather.
    let mk_iov = |buf: &mut Vec<u8>| {
        let half = (buf.len() / 2) & !511;
        let (a, b) = buf.split_at_mut(half);
        let mut iov = Vec::new();
        for part in [a, b] {
            if !part.is_empty() {
                iov.push(libc::iovec {
                    iov_base: part.as_mut_ptr().cast(),
                    iov_len: part.len(),
                });
            }
        }
        iov
    };
    let iov;
    let disk_op = match *op {
        Op::Read { sector, sectors } => {
            buf = vec![0xEE; (sectors * 512) as usize];
            iov = mk_iov(&mut buf);
            DiskOp::Read {
                offset: sector * 512,
                iov: &iov,
            }
        }
        Op::Write {
            sector,
            sectors,
            seed,
        } => {
            buf = (0..sectors * 512)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            iov = mk_iov(&mut buf);
            DiskOp::Write {
                offset: sector * 512,
                iov: &iov,
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
    // SAFETY: `iov` and `buf` live until the completion is popped below.
    unsafe { q.start(disk_op, 7) }.expect("start");
    q.submit().unwrap();
    let c = loop {
        if let Some(c) = q.pop_completion() {
            break c;
        }
        q.wait().unwrap();
    };
    assert_eq!(c.user_data, 7);
    (c.result, buf)
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
    let mut buf = vec![0u8; 4096];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the buffers outlive the calls, and refused requests never reach the engine.
    unsafe {
        assert_eq!(
            q.start(
                DiskOp::Read {
                    offset: DISK - 512,
                    iov: &iov
                },
                1
            ),
            Err(storage_core::disk::StartError::OutOfRange)
        );
        assert_eq!(
            q.start(
                DiskOp::Read {
                    offset: u64::MAX - 100,
                    iov: &iov
                },
                1
            ),
            Err(storage_core::disk::StartError::OutOfRange)
        );
        assert_eq!(
            q.start(
                DiskOp::Write {
                    offset: 0,
                    iov: &iov
                },
                1
            ),
            Err(storage_core::disk::StartError::ReadOnly)
        );
    }
    assert_eq!(q.in_flight(), 0);
}
