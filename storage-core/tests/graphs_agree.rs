//! Property test: disks built as random graphs (a throttle over a tier over a file, a tier
//! over a throttle over a file, ...) in every cache mode read back what a plain byte array
//! says they hold, after random batches of concurrent writes, write-zeroes, reads and
//! flushes, and again after the disk is closed and reopened. Requests are driven as a
//! worker drives them: started in a batch, submitted once, and completed as the queue's
//! completion fd wakes the loop (so a throttle's timer, not a drain, releases what it held).
//! With the `rbd` feature, the same over an RBD image on a one-node Ceph cluster.

use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use storage_core::disk::{
    open_disk, Disk, DiskOp, DiskQueue, DiskSpec, IoVecs, Rejected, StartError,
};

const DISK: u64 = 2 << 20;
/// Requests of one batch touch disjoint 64 KiB regions, so their order does not matter.
const REGION: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy)]
enum Shape {
    Raw,
    ThrottleOverRaw,
    TierOverRaw,
    ThrottleOverTier,
    TierOverThrottle,
}

#[derive(Debug, Clone)]
enum Op {
    Read { sector: u64, sectors: u64 },
    Write { sector: u64, sectors: u64, seed: u8 },
    Zeroes { sector: u64, sectors: u64 },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    // Within one region (its index chosen by the batch).
    let range = (0..REGION / 512).prop_flat_map(|s| (Just(s), 1..=(REGION / 512 - s).min(48)));
    prop_oneof![
        3 => range.clone().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        4 => (range.clone(), any::<u8>())
            .prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        1 => range.prop_map(|(sector, sectors)| Op::Zeroes { sector, sectors }),
        1 => Just(Op::Flush),
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        Just(Shape::Raw),
        Just(Shape::ThrottleOverRaw),
        Just(Shape::TierOverRaw),
        Just(Shape::ThrottleOverTier),
        Just(Shape::TierOverThrottle),
    ]
}

/// The `--blockdev` nodes and `--disk` for a shape; the throttle allows bursts of 40 and
/// 400 IOPS, so larger batches are held and released by its timer.
fn graph(dir: &Path, shape: Shape, mode: &str) -> DiskSpec {
    let file = format!(
        "driver=file,node-name=file,filename={},engine=sync",
        dir.join("cap.img").display()
    );
    let ssd = format!(
        "driver=file,node-name=ssd,filename={},engine=sync",
        dir.join("cache.img").display()
    );
    let tier = |capacity: &str| {
        format!(
            "driver=tier,node-name=tier,capacity={capacity},cache=ssd,cache-size=1M,\
             cache-mode={mode},seq-cutoff=0"
        )
    };
    let qos = |child: &str| format!("driver=throttle,node-name=qos,file={child},iops-total=400");
    let (nodes, root) = match shape {
        Shape::Raw => (vec![file], "file"),
        Shape::ThrottleOverRaw => (vec![file, qos("file")], "qos"),
        Shape::TierOverRaw => (vec![file, ssd, tier("file")], "tier"),
        Shape::ThrottleOverTier => (vec![file, ssd, tier("file"), qos("tier")], "qos"),
        Shape::TierOverThrottle => (vec![file, ssd, qos("file"), tier("qos")], "tier"),
    };
    let mut g = storage_core::disk::graph::GraphSpec::default();
    for n in &nodes {
        g.add_blockdev(n).unwrap();
    }
    g.resolve(&format!("node={root}")).unwrap()
}

fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((offset as usize + i) as u8).wrapping_mul(7) ^ seed)
        .collect()
}

/// One request of a batch: what it writes or read, and its buffers while they are ours.
struct Pending {
    op: Op,
    offset: u64,
    buf: Vec<u8>,
    buffers: Option<IoVecs>,
}

fn readable(fd: i32, ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// Runs a batch to completion as a worker would; checks reads against `model` and applies
/// writes to it.
fn run_batch(q: &mut impl DiskQueue, batch: &[(u64, Op)], model: &mut [u8]) {
    let mut reqs: Vec<Pending> = batch
        .iter()
        .map(|(region, op)| {
            let (offset, len) = match *op {
                Op::Read { sector, sectors }
                | Op::Write {
                    sector, sectors, ..
                }
                | Op::Zeroes { sector, sectors } => {
                    (region * REGION + sector * 512, (sectors * 512) as usize)
                }
                Op::Flush => (0, 0),
            };
            let buf = match *op {
                Op::Write { seed, .. } => pattern(seed, offset, len),
                Op::Read { .. } => vec![0xeeu8; len],
                _ => Vec::new(),
            };
            // Two buffers where the length allows, for scatter-gather.
            let half = (len / 2) & !511;
            let lens: Vec<usize> = [half, len - half].into_iter().filter(|&n| n > 0).collect();
            let mut buffers = IoVecs::owned(&lens);
            buffers.copy_from(0, &buf);
            Pending {
                op: op.clone(),
                offset,
                buf,
                buffers: Some(buffers),
            }
        })
        .collect();
    let mut done = vec![false; reqs.len()];
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.iter().any(|d| !d) {
        assert!(Instant::now() < deadline, "the batch never completed");
        while next < reqs.len() {
            let r = &mut reqs[next];
            let op = match r.op {
                Op::Read { .. } => DiskOp::Read {
                    offset: r.offset,
                    buffers: r.buffers.take().unwrap(),
                },
                Op::Write { .. } => DiskOp::Write {
                    offset: r.offset,
                    buffers: r.buffers.take().unwrap(),
                },
                Op::Zeroes { sectors, .. } => DiskOp::WriteZeroes {
                    offset: r.offset,
                    len: sectors * 512,
                    unmap: false,
                },
                Op::Flush => DiskOp::Flush,
            };
            match q.start(op, next as u64) {
                Ok(()) => next += 1,
                Err(Rejected {
                    error: StartError::Busy,
                    op,
                }) => {
                    r.buffers = op.into_buffers();
                    break;
                }
                Err(e) => panic!("request {next} refused: {e}"),
            }
        }
        q.submit().unwrap();
        let mut any = false;
        while let Some(c) = q.pop_completion() {
            let i = c.tag as usize;
            let r = &mut reqs[i];
            let want = match r.op {
                Op::Read { .. } | Op::Write { .. } => r.buf.len() as i32,
                _ => 0,
            };
            assert_eq!(c.result, want, "{:?} at {}", r.op, r.offset);
            if let Op::Read { .. } = r.op {
                r.buf = c.buffers.expect("a read gives its buffers back").to_vec();
            }
            done[i] = true;
            any = true;
        }
        if !any && done.iter().any(|d| !d) {
            if let Some(fd) = q.completion_fd() {
                readable(fd, 20);
                q.ack_completion_fd();
            } else {
                q.wait().unwrap();
            }
        }
    }
    for r in &reqs {
        let at = r.offset as usize;
        match r.op {
            Op::Read { .. } => assert!(
                r.buf == model[at..at + r.buf.len()],
                "read of {} bytes at {} differs from the model",
                r.buf.len(),
                at
            ),
            Op::Write { .. } => model[at..at + r.buf.len()].copy_from_slice(&r.buf),
            Op::Zeroes { sectors, .. } => model[at..at + (sectors * 512) as usize].fill(0),
            Op::Flush => {}
        }
    }
}

fn read_all(q: &mut impl DiskQueue) -> Vec<u8> {
    let mut out = vec![0u8; DISK as usize];
    for (i, chunk) in out.chunks_mut(REGION as usize).enumerate() {
        let op = DiskOp::Read {
            offset: i as u64 * REGION,
            buffers: IoVecs::owned(&[chunk.len()]),
        };
        q.start(op, 0).unwrap();
        q.submit().unwrap();
        loop {
            if let Some(c) = q.pop_completion() {
                assert_eq!(c.result, REGION as i32);
                c.buffers.unwrap().copy_to(0, chunk);
                break;
            }
            q.wait().unwrap();
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_graphs_read_back_the_model(
        shape in shape(),
        mode in prop_oneof![Just("writethrough"), Just("writeback"), Just("writearound")],
        batches in proptest::collection::vec(
            proptest::collection::vec((0..DISK / REGION, op()), 1..24), 1..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("cap.img"), &model).unwrap();
        let spec = graph(dir.path(), shape, mode);
        {
            let disk = open_disk(&spec).unwrap();
            let mut q = disk.new_queue(32).unwrap();
            for batch in &batches {
                // One request per region per batch.
                let mut seen = std::collections::HashSet::new();
                let batch: Vec<(u64, Op)> =
                    batch.iter().filter(|(r, _)| seen.insert(*r)).cloned().collect();
                run_batch(&mut q, &batch, &mut model);
            }
            prop_assert!(read_all(&mut q) == model, "{:?}/{}: contents differ", shape, mode);
            disk.flush().unwrap();
        }
        let disk = open_disk(&spec).unwrap();
        let mut q = disk.new_queue(32).unwrap();
        prop_assert!(read_all(&mut q) == model, "{:?}/{}: contents differ after reopening", shape, mode);
    }
}

/// The same for graphs over an RBD image (cargo feature `rbd`): an RBD leaf alone, a
/// throttle over it, and a tier in front of it, on a one-node cluster this test starts;
/// after each case the image, read with `rbd export`, holds what the model says (the tier
/// writes through).
#[cfg(feature = "rbd")]
#[test]
fn random_graphs_over_rbd_read_back_the_model() {
    use proptest::test_runner::{Config, TestRunner};
    let ceph = testkit::ceph::Cluster::start().unwrap_or_else(|e| panic!("{e}"));
    let mut runner = TestRunner::new(Config {
        cases: 6,
        ..Config::default()
    });
    let case = std::cell::Cell::new(0u32);
    let strategy = (
        0..3u8,
        proptest::collection::vec(
            proptest::collection::vec((0..DISK / REGION, op()), 1..16),
            1..4,
        ),
    );
    runner
        .run(&strategy, |(shape, batches)| {
            case.set(case.get() + 1);
            let image = format!("case{}", case.get());
            ceph.create_image(&image, DISK >> 20).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let rbd = format!(
                "driver=rbd,node-name=img,pool=rbd,image={image},conf={}",
                ceph.conf().display()
            );
            let ssd = format!(
                "driver=file,node-name=ssd,filename={},engine=sync",
                dir.path().join("cache.img").display()
            );
            let (nodes, root) = match shape {
                0 => (vec![rbd], "img"),
                1 => (
                    vec![
                        rbd,
                        "driver=throttle,node-name=q,file=img,iops-total=400".into(),
                    ],
                    "q",
                ),
                _ => (
                    vec![
                        rbd,
                        ssd,
                        "driver=tier,node-name=t,capacity=img,cache=ssd,cache-size=1M,\
                         seq-cutoff=0"
                            .into(),
                    ],
                    "t",
                ),
            };
            let mut g = storage_core::disk::graph::GraphSpec::default();
            for n in &nodes {
                g.add_blockdev(n).unwrap();
            }
            let spec = g.resolve(&format!("node={root}")).unwrap();
            let mut model = vec![0u8; DISK as usize];
            {
                let disk = open_disk(&spec).unwrap();
                let mut q = disk.new_queue(32).unwrap();
                for batch in &batches {
                    let mut seen = std::collections::HashSet::new();
                    let batch: Vec<(u64, Op)> = batch
                        .iter()
                        .filter(|(r, _)| seen.insert(*r))
                        .cloned()
                        .collect();
                    run_batch(&mut q, &batch, &mut model);
                }
                prop_assert!(read_all(&mut q) == model, "shape {shape}: contents differ");
                disk.flush().unwrap();
            }
            let exported = ceph.export(&image).unwrap();
            prop_assert!(exported == model, "shape {shape}: rbd export differs");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}
