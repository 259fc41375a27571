//! The vhost-blk daemon over a real socket, driven by libblkio (the client QEMU's own
//! vhost-user-blk frontend resembles): data integrity, flush, discard, write-zeroes,
//! read-only disks, range checks, multiqueue, reconnects, the null device, SIGTERM, the API
//! socket and start-up errors.
//!
//! The daemon binary must be built first (`cargo build --workspace --bins`; scripts/test.sh
//! does); each test says so if it is missing.
//!
//! `STRATA_BLK_DAEMON=qemu-storage-daemon` runs the data-path tests against QEMU's daemon
//! instead, to check that the tests encode the vhost-user-blk contract rather than our
//! implementation's quirks. Tests of our own CLI and API socket skip themselves in that mode
//! (they print why); by default every test runs against vhost-blk.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::blkio_client::{Client, ClientOptions, Queue, SlotOp, Target};
use testkit::daemon::{self, Daemon, DaemonCommand};
use testkit::http;

const MIB: u64 = 1 << 20;
/// Disk size for file-backed tests: small enough to create quickly, big enough for 1 MiB holes.
const SIZE: u64 = 32 * MIB;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Ours,
    Qsd,
}

fn backend() -> Backend {
    match std::env::var("STRATA_BLK_DAEMON").as_deref() {
        Err(_) | Ok("") | Ok("vhost-blk") => Backend::Ours,
        Ok("qemu-storage-daemon") | Ok("qsd") => Backend::Qsd,
        Ok(other) => panic!("STRATA_BLK_DAEMON={other:?}: use vhost-blk or qemu-storage-daemon"),
    }
}

/// True if the test may run; prints why not otherwise. Only for tests of our own CLI and API,
/// which the peer does not have.
fn ours_only(test: &str) -> bool {
    if backend() == Backend::Ours {
        return true;
    }
    eprintln!("{test}: skipped, tests vhost-blk's own interface (STRATA_BLK_DAEMON is set)");
    false
}

#[derive(Clone, Debug)]
struct DiskOpts {
    /// `None` for the null device of this size.
    file_size: Option<u64>,
    null_size: u64,
    readonly: bool,
    direct: bool,
    queues: usize,
    api: bool,
    /// Fill the file with a pattern before starting, so that every block is allocated.
    prefill: bool,
}

impl Default for DiskOpts {
    fn default() -> Self {
        Self {
            file_size: Some(SIZE),
            null_size: 0,
            readonly: false,
            direct: false,
            queues: 1,
            api: false,
            prefill: false,
        }
    }
}

/// A daemon serving one disk, and where its files are.
struct Fixture {
    _dir: tempfile::TempDir,
    img: Option<PathBuf>,
    sock: PathBuf,
    api_sock: PathBuf,
    daemon: Daemon,
}

impl Fixture {
    fn start(opts: DiskOpts) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("blk.sock");
        let api_sock = dir.path().join("api.sock");
        let img = opts.file_size.map(|size| {
            let img = dir.path().join("disk.img");
            let mut f = File::create(&img).expect("create image");
            if opts.prefill {
                let chunk = pattern(0xA5, MIB as usize);
                for _ in 0..size / MIB {
                    f.write_all(&chunk).expect("prefill image");
                }
                f.sync_all().expect("sync image");
            }
            f.set_len(size).expect("size image");
            img
        });
        let cmd = match backend() {
            Backend::Ours => {
                let mut spec = match &img {
                    Some(img) => format!("path={}", img.display()),
                    None => format!("path=null,size={}", opts.null_size),
                };
                if opts.readonly {
                    spec.push_str(",readonly=on");
                }
                if opts.direct {
                    spec.push_str(",direct=on");
                }
                let mut cmd = DaemonCommand::vhost_blk()
                    .unwrap_or_else(|e| panic!("{e}"))
                    .arg("--socket")
                    .arg(&sock)
                    .arg("--disk")
                    .arg(spec)
                    .arg("--queues")
                    .arg(opts.queues.to_string())
                    // libblkio asks for 256-entry virtqueues; say so rather than rely on the
                    // daemon's default.
                    .arg("--queue-size")
                    .arg("256");
                if opts.api {
                    cmd = cmd.arg("--api-socket").arg(&api_sock);
                }
                cmd
            }
            Backend::Qsd => {
                assert!(!opts.api, "qemu-storage-daemon has no API socket");
                let blockdev = match &img {
                    Some(img) => format!(
                        "driver=file,node-name=d0,filename={},aio=io_uring,cache.direct={},discard=unmap{}",
                        img.display(),
                        if opts.direct { "on" } else { "off" },
                        if opts.readonly { ",read-only=on" } else { "" },
                    ),
                    None => format!(
                        "driver=null-co,node-name=d0,size={},read-zeroes=on",
                        opts.null_size
                    ),
                };
                DaemonCommand::qemu_storage_daemon(&sock)
                    .arg("--blockdev")
                    .arg(blockdev)
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable={},num-queues={}",
                        sock.display(),
                        if opts.readonly { "off" } else { "on" },
                        opts.queues
                    ))
            }
        };
        let daemon = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting the daemon: {e}"));
        Fixture {
            _dir: dir,
            img,
            sock,
            api_sock,
            daemon,
        }
    }

    fn img(&self) -> &Path {
        self.img.as_deref().expect("file-backed disk")
    }

    fn client(&self, queues: usize) -> Client {
        Client::open(&self.sock, queues)
            .unwrap_or_else(|e| panic!("{e}\ndaemon output:\n{}", self.daemon.output()))
    }
}

/// Writes `blocks` blocks of `block` bytes from `base` on, block `b` holding
/// `pattern(seed(b), block)`, keeping up to `depth` in flight.
fn write_pattern_blocks(
    q: &mut Queue,
    depth: usize,
    block: usize,
    blocks: usize,
    base: u64,
    seed: impl Fn(usize) -> u8,
    what: &str,
) {
    let mut p = q.pipeline(depth, block).unwrap();
    let mut next = 0usize;
    let mut done = 0usize;
    while done < blocks {
        for slot in 0..depth {
            if next < blocks && p.is_free(slot) {
                p.slot_mut(slot)
                    .copy_from_slice(&pattern(seed(next), block));
                p.submit(slot, SlotOp::Write(base + (next * block) as u64));
                next += 1;
            }
        }
        done += p
            .wait(1, |slot, r| {
                r.unwrap_or_else(|e| panic!("{what} slot {slot}: {e}"))
            })
            .unwrap();
    }
}

/// Deterministic, position-dependent bytes, different for each seed.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8) ^ ((i >> 8) as u8).wrapping_mul(7) ^ seed)
        .collect()
}

fn host_read(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(img).expect("open image");
    f.seek(SeekFrom::Start(offset)).expect("seek image");
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).expect("read image");
    buf
}

/// Bytes the file occupies on the host filesystem.
fn allocated(img: &Path) -> u64 {
    std::fs::metadata(img).expect("stat image").blocks() * 512
}

/// Compares byte buffers, reporting the first difference instead of dumping both.
#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(pos) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: first difference at byte {pos}: got {:#04x}, want {:#04x}",
            got[pos], want[pos]
        );
    }
}

#[track_caller]
fn assert_zero(data: &[u8], what: &str) {
    if let Some(pos) = data.iter().position(|&b| b != 0) {
        panic!("{what}: byte {pos} is {:#x}, expected zero", data[pos]);
    }
}

#[test]
fn written_data_reads_back_at_many_offsets_and_sizes() {
    let f = Fixture::start(DiskOpts::default());
    let mut c = f.client(1);
    assert_eq!(c.capacity(), SIZE, "capacity from the config space");
    let max_segments = c.blkio().get_i32("max-segments").unwrap();
    let max_segment_len = c.blkio().get_i32("max-segment-len").unwrap();
    assert!(
        max_segments >= 2,
        "device must allow multi-segment requests (seg_max = {max_segments})"
    );
    let q = c.queue(0);

    // (offset, len): sector-aligned but not page-aligned, spanning page and MiB boundaries,
    // the first and the last sector.
    let cases: [(u64, usize); 7] = [
        (0, 512),
        (512, 1024),
        (4096, 4096),
        (MIB - 512, 8192),
        (3 * MIB + 1536, 64 * 1024 + 512),
        (SIZE - 8192, 4096),
        (SIZE - 512, 512),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(i as u8 + 1, len);
        q.write(offset, &data).unwrap();
        assert_bytes(
            &q.read(offset, len).unwrap(),
            &data,
            &format!("offset {offset} len {len}"),
        );
    }
    // Earlier writes survive later ones that do not overlap them.
    for (i, &(offset, len)) in cases.iter().enumerate().skip(2) {
        let what = format!("re-read offset {offset} len {len}");
        assert_bytes(
            &q.read(offset, len).unwrap(),
            &pattern(i as u8 + 1, len),
            &what,
        );
    }
    // A partial overwrite changes only what it covers.
    q.write(4096 + 1024, &[0xEE; 512]).unwrap();
    let mut expect = pattern(3, 4096);
    expect[1024..1536].fill(0xEE);
    assert_bytes(&q.read(4096, 4096).unwrap(), &expect, "partial overwrite");

    // Multi-segment requests with uneven segments; read back with a different split.
    let segs = [pattern(40, 512), pattern(41, 7 * 512), pattern(42, 8192)];
    let refs: Vec<&[u8]> = segs.iter().map(|s| s.as_slice()).collect();
    let joined = segs.concat();
    q.writev(5 * MIB, &refs).unwrap();
    let back = q.readv(5 * MIB, &[4096, 512, joined.len() - 4608]).unwrap();
    assert_bytes(&back.concat(), &joined, "readv after writev");
    assert_bytes(
        &q.read(5 * MIB, joined.len()).unwrap(),
        &joined,
        "read after writev",
    );

    // A 1 MiB transfer within the device's advertised segment limits.
    let seg_len = (max_segment_len.max(0) as usize).clamp(4096, 256 * 1024) / 512 * 512;
    let nsegs = (MIB as usize).div_ceil(seg_len).min(max_segments as usize);
    let big: Vec<Vec<u8>> = (0..nsegs).map(|i| pattern(50 + i as u8, seg_len)).collect();
    let refs: Vec<&[u8]> = big.iter().map(|s| s.as_slice()).collect();
    q.writev(8 * MIB, &refs).unwrap();
    let big = big.concat();
    assert_bytes(&q.read(8 * MIB, big.len()).unwrap(), &big, "large transfer");

    // The host file holds exactly what was written.
    q.flush().unwrap();
    assert_bytes(
        &host_read(f.img(), 5 * MIB, joined.len()),
        &joined,
        "file after writev",
    );
    assert_bytes(
        &host_read(f.img(), 8 * MIB, big.len()),
        &big,
        "file after large write",
    );
    assert_bytes(
        &host_read(f.img(), SIZE - 512, 512),
        &pattern(7, 512),
        "file's last sector",
    );
    assert_eq!(std::fs::metadata(f.img()).unwrap().len(), SIZE);
}

#[test]
fn o_direct_disk_round_trips() {
    let f = Fixture::start(DiskOpts {
        direct: true,
        ..Default::default()
    });
    let mut c = f.client(1);
    let q = c.queue(0);
    for (i, &(offset, len)) in [(0u64, 4096usize), (MIB, 128 * 1024), (2 * MIB + 4096, 8192)]
        .iter()
        .enumerate()
    {
        let data = pattern(i as u8 + 90, len);
        q.write(offset, &data).unwrap();
        assert_bytes(&q.read(offset, len).unwrap(), &data, "O_DIRECT round trip");
    }
    q.flush().unwrap();
    assert_bytes(
        &host_read(f.img(), MIB, 128 * 1024),
        &pattern(91, 128 * 1024),
        "file",
    );
}

#[test]
fn flush_completes_and_data_is_in_the_file() {
    let f = Fixture::start(DiskOpts::default());
    let mut c = f.client(1);
    let q = c.queue(0);
    let data = pattern(3, 256 * 1024);
    q.write(2 * MIB, &data).unwrap();
    q.flush().unwrap();
    assert_bytes(
        &host_read(f.img(), 2 * MIB, data.len()),
        &data,
        "file after flush",
    );
    // Flush with nothing dirty, and twice in a row.
    q.flush().unwrap();
    q.flush().unwrap();
}

#[test]
fn discard_punches_a_hole_that_reads_as_zeroes() {
    let f = Fixture::start(DiskOpts {
        prefill: true,
        ..Default::default()
    });
    let mut c = f.client(1);
    let max_discard = c.blkio().get_u64("max-discard-len").unwrap();
    assert!(
        max_discard >= MIB,
        "max-discard-len {max_discard} should allow a 1 MiB discard"
    );
    let q = c.queue(0);
    let before = allocated(f.img());

    q.discard(4 * MIB, MIB).unwrap();
    assert_zero(
        &q.read(4 * MIB, MIB as usize).unwrap(),
        "discarded range via client",
    );
    // Neighbours are untouched.
    let fill = pattern(0xA5, MIB as usize);
    assert_bytes(
        &q.read(3 * MIB, MIB as usize).unwrap(),
        &fill,
        "MiB before the hole",
    );
    assert_bytes(
        &q.read(5 * MIB, MIB as usize).unwrap(),
        &fill,
        "MiB after the hole",
    );
    q.flush().unwrap();

    assert_zero(
        &host_read(f.img(), 4 * MIB, MIB as usize),
        "discarded range in the file",
    );
    assert_bytes(
        &host_read(f.img(), 5 * MIB, 4096),
        &fill[..4096],
        "file after the hole",
    );
    let after = allocated(f.img());
    assert!(
        after + MIB <= before,
        "the file should have lost 1 MiB of allocation: {before} -> {after} bytes"
    );
    assert_eq!(
        std::fs::metadata(f.img()).unwrap().len(),
        SIZE,
        "file size unchanged"
    );
}

#[test]
fn write_zeroes_without_unmap_keeps_allocation() {
    let f = Fixture::start(DiskOpts {
        prefill: true,
        ..Default::default()
    });
    let mut c = f.client(1);
    assert!(c.blkio().get_u64("max-write-zeroes-len").unwrap() >= MIB);
    let q = c.queue(0);
    let before = allocated(f.img());
    q.write_zeroes(6 * MIB, MIB, false).unwrap();
    // Unaligned to 4 KiB, a single sector.
    q.write_zeroes(8 * MIB + 512, 512, false).unwrap();
    assert_zero(&q.read(6 * MIB, MIB as usize).unwrap(), "zeroed range");
    let around = q.read(8 * MIB, 1536).unwrap();
    assert_zero(&around[512..1024], "zeroed sector");
    let fill = pattern(0xA5, MIB as usize);
    assert_bytes(&around[..512], &fill[..512], "sector before");
    assert_bytes(&around[1024..], &fill[1024..1536], "sector after");
    q.flush().unwrap();
    assert_zero(
        &host_read(f.img(), 6 * MIB, MIB as usize),
        "zeroed range in the file",
    );
    let after = allocated(f.img());
    assert!(
        after + MIB / 2 > before,
        "without UNMAP the blocks must stay allocated: {before} -> {after} bytes"
    );
}

#[test]
fn write_zeroes_with_unmap_reads_zeroes() {
    let f = Fixture::start(DiskOpts {
        prefill: true,
        ..Default::default()
    });
    let mut c = f.client(1);
    let q = c.queue(0);
    q.write_zeroes(10 * MIB, 2 * MIB, true).unwrap();
    assert_zero(&q.read(10 * MIB, 2 * MIB as usize).unwrap(), "zeroed range");
    let fill = pattern(0xA5, MIB as usize);
    assert_bytes(&q.read(9 * MIB, MIB as usize).unwrap(), &fill, "MiB before");
    assert_bytes(&q.read(12 * MIB, MIB as usize).unwrap(), &fill, "MiB after");
    q.flush().unwrap();
    assert_zero(
        &host_read(f.img(), 10 * MIB, 2 * MIB as usize),
        "zeroed range in the file",
    );
    assert_eq!(std::fs::metadata(f.img()).unwrap().len(), SIZE);
}

#[test]
fn read_only_disk_refuses_writes() {
    let f = Fixture::start(DiskOpts {
        readonly: true,
        prefill: true,
        ..Default::default()
    });
    let original = std::fs::read(f.img()).unwrap();

    // The device offers VIRTIO_BLK_F_RO: libblkio refuses a read-write start with EROFS.
    let err = Client::open(&f.sock, 1)
        .err()
        .expect("a read-write client must be refused");
    assert_eq!(err.errno(), Some(libc::EROFS), "{err}");

    // Read-only clients read; every kind of write fails.
    let mut c = Client::open_with(
        Target::VhostUser(&f.sock),
        &ClientOptions::default().read_only(true),
    )
    .unwrap();
    let q = c.queue(0);
    assert_bytes(
        &q.read(MIB, 4096).unwrap(),
        &original[MIB as usize..][..4096],
        "read-only read",
    );
    assert!(q.write(MIB, &[0; 4096]).is_err(), "write");
    assert!(q.writev(MIB, &[&[1; 512], &[2; 512]]).is_err(), "writev");
    assert!(q.discard(2 * MIB, MIB).is_err(), "discard");
    assert!(q.write_zeroes(3 * MIB, MIB, false).is_err(), "write-zeroes");
    q.flush().unwrap();
    drop(c);
    assert!(
        std::fs::read(f.img()).unwrap() == original,
        "a read-only disk's file changed"
    );
}

#[test]
fn out_of_range_requests_fail_and_the_disk_keeps_working() {
    let f = Fixture::start(DiskOpts::default());
    let mut c = f.client(1);
    let q = c.queue(0);
    let cases: [(&str, Result<(), testkit::blkio_client::ClientError>); 7] = [
        ("read at capacity", q.read(SIZE, 4096).map(drop)),
        ("read across the end", q.read(SIZE - 4096, 8192).map(drop)),
        ("read far beyond", q.read(SIZE * 64, 512).map(drop)),
        ("write at capacity", q.write(SIZE, &[7; 4096])),
        ("write across the end", q.write(SIZE - 512, &[7; 1024])),
        ("discard across the end", q.discard(SIZE - MIB, 2 * MIB)),
        ("write-zeroes beyond", q.write_zeroes(SIZE, MIB, false)),
    ];
    for (what, result) in cases {
        let err = result.err().unwrap_or_else(|| panic!("{what} succeeded"));
        assert!(err.errno().is_some(), "{what}: {err}");
    }
    // The partial write at the end must not have touched the last sector or grown the file.
    assert_zero(&q.read(SIZE - 512, 512).unwrap(), "last sector");
    assert_eq!(std::fs::metadata(f.img()).unwrap().len(), SIZE, "file grew");
    // The queue still works.
    q.write(0, &[9; 4096]).unwrap();
    assert_bytes(&q.read(0, 4096).unwrap(), &[9; 4096], "after errors");
}

#[test]
fn two_queues_from_two_threads() {
    let f = Fixture::start(DiskOpts {
        queues: 2,
        ..Default::default()
    });
    let c = f.client(2);
    let depth = 16;
    let block = 4096usize;
    let per_queue = 8 * MIB;
    let workers: Vec<_> = c
        .into_queues()
        .into_iter()
        .map(|mut q| {
            std::thread::spawn(move || {
                let idx = q.index();
                let base = idx as u64 * per_queue;
                let blocks = (per_queue / block as u64) as usize;
                let seed = |b: usize| (b as u8).wrapping_add(idx as u8 * 100);
                let what = format!("queue {idx}");
                write_pattern_blocks(&mut q, depth, block, blocks, base, seed, &what);
                q
            })
        })
        .collect();
    let mut queues: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    // Each queue reads what the other wrote.
    for (reader, writer) in [(0usize, 1usize), (1, 0)] {
        let q = &mut queues[reader];
        for b in (0..(per_queue / block as u64) as usize).step_by(97) {
            let off = writer as u64 * per_queue + (b * block) as u64;
            let seed = (b as u8).wrapping_add(writer as u8 * 100);
            let what = format!("queue {reader} reading block {b} of queue {writer}");
            assert_bytes(&q.read(off, block).unwrap(), &pattern(seed, block), &what);
        }
    }
}

/// A client that polls its used ring (libblkio poll queues, as SPDK-style pollers do) asks
/// the device not to signal it; completions must still be published without a notification.
#[test]
fn polling_client_gets_completions_without_notifications() {
    let f = Fixture::start(DiskOpts::default());
    let opts = ClientOptions::default()
        .poll(true)
        .io_timeout(Duration::from_secs(10));
    let mut c = Client::open_with(Target::VhostUser(&f.sock), &opts)
        .unwrap_or_else(|e| panic!("{e}\ndaemon output:\n{}", f.daemon.output()));
    let q = c.queue(0);
    let (block, blocks) = (4096usize, 256usize);
    write_pattern_blocks(q, 8, block, blocks, 0, |b| b as u8, "polling client");
    for b in (0..blocks).step_by(17) {
        let what = format!("block {b} read back by the polling client");
        assert_bytes(
            &q.read((b * block) as u64, block).unwrap(),
            &pattern(b as u8, block),
            &what,
        );
        assert_bytes(
            &host_read(f.img.as_ref().unwrap(), (b * block) as u64, block),
            &pattern(b as u8, block),
            &format!("block {b} in the image"),
        );
    }
}

#[test]
fn next_client_is_served_after_one_disconnects() {
    let f = Fixture::start(DiskOpts {
        queues: 2,
        ..Default::default()
    });
    {
        let mut c = f.client(2);
        c.queue(0).write(0, &pattern(1, 4096)).unwrap();
        c.queue(1).write(4096, &pattern(2, 4096)).unwrap();
    }
    {
        // Fewer queues than the daemon offers.
        let mut c = f.client(1);
        let want = [pattern(1, 4096), pattern(2, 4096)].concat();
        assert_bytes(&c.queue(0).read(0, 8192).unwrap(), &want, "second client");
    }
    {
        // A client that goes away with requests in flight.
        let mut c = f.client(1);
        let q = c.queue(0);
        let mut p = q.pipeline(32, 4096).unwrap();
        for slot in 0..32 {
            p.submit(slot, SlotOp::Read(slot as u64 * 4096));
        }
        // Hand the requests to the device without waiting for them.
        p.wait(0, |_, _| {}).unwrap();
        std::mem::forget(p);
    }
    for round in 0..3u8 {
        let mut c = f.client(2);
        c.queue(1).write(MIB, &pattern(round, 4096)).unwrap();
        assert_bytes(
            &c.queue(0).read(MIB, 4096).unwrap(),
            &pattern(round, 4096),
            "later client",
        );
    }
}

#[test]
fn null_device_reads_zeroes_and_accepts_writes() {
    let f = Fixture::start(DiskOpts {
        file_size: None,
        null_size: 2 << 30,
        ..Default::default()
    });
    let mut c = f.client(1);
    assert_eq!(c.capacity(), 2 << 30);
    let q = c.queue(0);
    for offset in [0, 4096, 1 << 30, (2 << 30) - 65536] {
        assert_zero(&q.read(offset, 65536).unwrap(), "null device read");
    }
    q.write(4096, &[0xFF; 4096]).unwrap();
    q.flush().unwrap();
    assert_zero(
        &q.read(4096, 4096).unwrap(),
        "null device read after a write",
    );
    assert!(
        q.read(2 << 30, 4096).is_err(),
        "read beyond the null device's size"
    );
}

#[test]
fn sigterm_exits_zero_with_data_in_the_file() {
    let mut f = Fixture::start(DiskOpts::default());
    let mut c = f.client(1);
    let data = pattern(77, 512 * 1024);
    // Written but not flushed by the client; the client is still connected.
    c.queue(0).write(7 * MIB, &data).unwrap();
    let status = f.daemon.terminate().unwrap();
    assert!(
        status.success(),
        "SIGTERM should exit 0, got {}",
        daemon::describe_status(&status)
    );
    drop(c);
    assert_bytes(
        &host_read(f.img(), 7 * MIB, data.len()),
        &data,
        "file after SIGTERM",
    );
}

#[test]
fn sigterm_when_idle_exits_zero() {
    let mut f = Fixture::start(DiskOpts::default());
    // One client came and went first.
    drop(f.client(1));
    let status = f.daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon::describe_status(&status));
}

/// Sums the samples of a Prometheus counter family whose labels contain `label`.
fn metric_sum(text: &str, suffix: &str, label: &str) -> f64 {
    http::parse_prometheus(text)
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{text}"))
        .iter()
        .filter(|s| s.name.ends_with(suffix) && s.labels.contains(label))
        .map(|s| s.value)
        .sum()
}

/// Finds a number anywhere in a JSON document.
fn json_has_number(v: &serde_json::Value, n: u64) -> bool {
    match v {
        serde_json::Value::Number(x) => x.as_u64() == Some(n),
        serde_json::Value::Array(a) => a.iter().any(|v| json_has_number(v, n)),
        serde_json::Value::Object(o) => o.values().any(|v| json_has_number(v, n)),
        _ => false,
    }
}

/// Finds a string containing `s` anywhere in a JSON document.
fn json_has_string(v: &serde_json::Value, s: &str) -> bool {
    match v {
        serde_json::Value::String(x) => x.contains(s),
        serde_json::Value::Array(a) => a.iter().any(|v| json_has_string(v, s)),
        serde_json::Value::Object(o) => o.values().any(|v| json_has_string(v, s)),
        _ => false,
    }
}

#[test]
fn api_socket_serves_metrics_and_disk_info() {
    if !ours_only("api_socket_serves_metrics_and_disk_info") {
        return;
    }
    let f = Fixture::start(DiskOpts {
        api: true,
        queues: 2,
        ..Default::default()
    });
    assert!(
        daemon::wait_for_path(&f.api_sock, Duration::from_secs(10)),
        "no API socket at {}",
        f.api_sock.display()
    );
    let before = http::get(&f.api_sock, "/metrics").unwrap();
    assert_eq!(before.status, 200, "{}", before.text());
    let before = before.text();

    let mut c = f.client(2);
    for i in 0..10u64 {
        c.queue(0).read(i * 4096, 4096).unwrap();
    }
    for i in 0..5u64 {
        c.queue(1).write(i * 8192, &[1; 8192]).unwrap();
    }
    c.queue(0).flush().unwrap();
    c.queue(0).read(SIZE, 512).unwrap_err();
    drop(c);

    let after = http::get(&f.api_sock, "/metrics").unwrap();
    assert_eq!(after.status, 200);
    assert!(
        after
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "content-type {:?}",
        after.header("content-type")
    );
    let after = after.text();
    let delta = |suffix: &str, label: &str| {
        metric_sum(&after, suffix, label) - metric_sum(&before, suffix, label)
    };
    // Counters are per queue; sum over queues. libblkio may add requests of its own
    // (e.g. a flush after FUA), so "at least".
    assert!(
        delta("_requests_total", "op=\"read\"") >= 10.0,
        "reads:\n{after}"
    );
    assert!(
        delta("_requests_total", "op=\"write\"") >= 5.0,
        "writes:\n{after}"
    );
    assert!(
        delta("_requests_total", "op=\"flush\"") >= 1.0,
        "flushes:\n{after}"
    );
    assert!(
        delta("_bytes_total", "op=\"write\"") >= 5.0 * 8192.0,
        "bytes written:\n{after}"
    );
    assert!(
        delta("_bytes_total", "op=\"read\"") >= 10.0 * 4096.0,
        "bytes read:\n{after}"
    );
    assert!(
        delta("_errors_total", "") >= 1.0,
        "out-of-range error counted:\n{after}"
    );

    let disk = http::get(&f.api_sock, "/v1/disks/disk0").unwrap();
    assert_eq!(disk.status, 200, "{}", disk.text());
    let json: serde_json::Value = serde_json::from_slice(&disk.body)
        .unwrap_or_else(|e| panic!("/v1/disks/disk0 is not JSON ({e}): {}", disk.text()));
    assert!(json.is_object(), "{json}");
    assert!(
        json_has_number(&json, SIZE),
        "size in bytes missing: {json}"
    );
    assert!(
        json_has_string(&json, &f.img().display().to_string()),
        "image path missing: {json}"
    );

    let missing = http::get(&f.api_sock, "/no/such/thing").unwrap();
    assert_eq!(missing.status, 404);
}

/// Runs the daemon with `args` and expects exit code 2 with one line on stderr.
fn expect_usage_error(args: &[&str]) -> String {
    daemon::expect_usage_error("vhost-blk", args)
}

#[test]
fn bad_flags_and_missing_files_exit_2_with_one_line() {
    if !ours_only("bad_flags_and_missing_files_exit_2_with_one_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let img = dir.path().join("d.img");
    File::create(&img).unwrap().set_len(MIB).unwrap();
    let good_disk = format!("path={}", img.display());

    expect_usage_error(&["--socket", sock, "--disk", &good_disk, "--no-such-flag"]);
    expect_usage_error(&["--disk", &good_disk]);
    expect_usage_error(&["--socket", sock]);
    let missing = dir.path().join("missing.img");
    let msg = expect_usage_error(&[
        "--socket",
        sock,
        "--disk",
        &format!("path={}", missing.display()),
    ]);
    assert!(
        msg.contains("missing.img"),
        "the error should name the file: {msg}"
    );
    expect_usage_error(&[
        "--socket",
        sock,
        "--disk",
        &format!("{good_disk},readonly=maybe"),
    ]);
    expect_usage_error(&[
        "--socket",
        sock,
        "--disk",
        &format!("{good_disk},frobnicate=on"),
    ]);
    expect_usage_error(&["--socket", sock, "--disk", "path=null,size=lots"]);
    expect_usage_error(&["--socket", sock, "--disk", &good_disk, "--queues", "0"]);
    assert!(!Path::new(sock).exists(), "no socket should be left behind");
}
