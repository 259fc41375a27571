//! Criterion benches for the data path's hot spots: parsing a virtio-blk descriptor chain,
//! and a batch of 32 reads through each engine (submit once, reap all). The engines run on a
//! file in /dev/shm so the numbers are the software's cost, not a disk's.

use std::hint::black_box;
use std::io::Write;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use storage_core::disk::{Disk, DiskOp, DiskQueue, IoVecs, NullDisk, RawDisk};
use storage_core::engine::EngineKind;
use vhost_blk::request::{parse, Parsed};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn bench_parse(c: &mut Criterion) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut header = [0u8; 16];
    header[8..16].copy_from_slice(&8u64.to_le_bytes()); // IN, sector 8
    mem.write_slice(&header, GuestAddress(0x1_0000)).unwrap();
    let write = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x1_0000, 16, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x2_0000, 4096, write, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x3_0000, 1, write, 0)),
    ];
    // The mock queue lives at guest address 0; the request buffers sit above it.
    let queue = MockSplitQueue::new(&mem, 256);
    let chain = queue.build_desc_chain(&descs).unwrap();
    let shared = std::sync::Arc::new(mem.clone());
    let (mut segs, mut iov) = (Vec::with_capacity(1024), IoVecs::with_capacity(1024));
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("read_4k_chain", |b| {
        b.iter_batched(
            || chain.clone(),
            |chain| {
                let p = parse(chain, &shared, 1 << 30, &mut segs, &mut iov);
                assert!(matches!(p, Parsed::Request { .. }));
                black_box(p)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

const BATCH: usize = 32;
const BLOCK: usize = 4096;

/// Starts BATCH 4 KiB reads, submits once, reaps all. `bufs` holds each tag's buffers
/// between batches.
fn read_batch(q: &mut impl DiskQueue, bufs: &mut [Option<IoVecs>], seed: &mut u64) {
    for (i, buf) in bufs.iter_mut().enumerate() {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (*seed >> 33) % (64 << 20) / BLOCK as u64 * BLOCK as u64;
        let buffers = buf.take().expect("buffers are back after each batch");
        q.start(DiskOp::Read { offset, buffers }, i as u64).unwrap();
    }
    q.submit().unwrap();
    let mut done = 0;
    while done < BATCH {
        match q.pop_completion() {
            Some(c) => {
                assert_eq!(c.result, BLOCK as i32);
                bufs[c.tag as usize] = c.buffers;
                done += 1;
            }
            None => q.wait().unwrap(),
        }
    }
}

fn bench_engines(c: &mut Criterion) {
    let mut file =
        tempfile::NamedTempFile::new_in(std::env::var("BENCH_DIR").unwrap_or("/dev/shm".into()))
            .unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..64 {
        file.write_all(&chunk).unwrap();
    }
    let mut g = c.benchmark_group("engine_batch32_read4k");
    g.throughput(Throughput::Elements(BATCH as u64));
    for kind in [EngineKind::IoUring, EngineKind::Sync] {
        let disk = RawDisk::open(file.path(), true, false, kind).unwrap();
        let mut q = disk.new_queue(BATCH as u32).unwrap();
        let mut bufs: Vec<_> = (0..BATCH).map(|_| Some(IoVecs::owned(&[BLOCK]))).collect();
        let mut seed = 1;
        g.bench_function(kind.name(), |b| {
            b.iter(|| read_batch(&mut q, &mut bufs, &mut seed))
        });
    }
    let null = NullDisk::new(64 << 20, false, true);
    let mut q = null.new_queue(BATCH as u32).unwrap();
    let mut bufs: Vec<_> = (0..BATCH).map(|_| Some(IoVecs::owned(&[BLOCK]))).collect();
    let mut seed = 1;
    g.bench_function("null", |b| {
        b.iter(|| read_batch(&mut q, &mut bufs, &mut seed))
    });
    g.finish();
}

criterion_group!(benches, bench_parse, bench_engines);
criterion_main!(benches);
