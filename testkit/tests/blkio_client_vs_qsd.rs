//! Checks testkit's libblkio client against the reference vhost-user-blk backend,
//! qemu-storage-daemon, so that when a daemon test fails we know the client is not the cause.
//! Requires `qemu-storage-daemon` (scripts/setup.sh installs it).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use testkit::blkio_client::{Client, ClientOptions, SlotOp, Target};
use testkit::daemon::{Daemon, DaemonCommand};

const SIZE: u64 = 64 << 20;

struct Qsd {
    _dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
    daemon: Daemon,
}

fn qsd(num_queues: usize) -> Qsd {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("blk.sock");
    File::create(&img).unwrap().set_len(SIZE).unwrap();
    let daemon = DaemonCommand::qemu_storage_daemon(&sock)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},aio=io_uring,cache.direct=off,discard=unmap",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
            sock.display()
        ))
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{e}\n(qemu-storage-daemon is needed: run scripts/setup.sh)")
        });
    Qsd {
        _dir: dir,
        img,
        sock,
        daemon,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn host_read(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(img).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn data_ops_round_trip_through_qsd() {
    let q = qsd(1);
    let mut c = Client::open(&q.sock, 1).unwrap();
    assert_eq!(c.capacity(), SIZE);
    let queue = c.queue(0);

    let data = pattern(7, 64 << 10);
    queue.write(1 << 20, &data).unwrap();
    assert_eq!(queue.read(1 << 20, data.len()).unwrap(), data);

    let segs = [pattern(1, 4096), pattern(2, 512), pattern(3, 12288)];
    let refs: Vec<&[u8]> = segs.iter().map(|s| s.as_slice()).collect();
    queue.writev(8 << 20, &refs).unwrap();
    let back = queue.readv(8 << 20, &[512, 16384]).unwrap();
    let all: Vec<u8> = segs.concat();
    assert_eq!([back[0].as_slice(), back[1].as_slice()].concat(), all);
    queue.flush().unwrap();
    assert_eq!(host_read(&q.img, 8 << 20, all.len()), all);

    queue.write_zeroes(1 << 20, 4096, false).unwrap();
    assert_eq!(queue.read(1 << 20, 4096).unwrap(), vec![0; 4096]);
    queue.discard(8 << 20, 1 << 20).unwrap();
    queue.flush().unwrap();

    let err = queue.read(SIZE, 4096).unwrap_err();
    assert!(err.errno().is_some(), "{err}");
}

#[test]
fn two_queues_pipeline_and_reconnect() {
    let mut q = qsd(2);
    let c = Client::open(&q.sock, 2).unwrap();
    let handles: Vec<_> = c
        .into_queues()
        .into_iter()
        .map(|mut queue| {
            std::thread::spawn(move || {
                let base = queue.index() as u64 * (16 << 20);
                let mut p = queue.pipeline(8, 4096).unwrap();
                for slot in 0..8 {
                    p.slot_mut(slot).fill(slot as u8 + 1);
                    p.submit(slot, SlotOp::Write(base + slot as u64 * 4096));
                }
                let mut ok = 0;
                while p.in_flight() > 0 {
                    p.wait(1, |_, r| {
                        r.unwrap();
                        ok += 1;
                    })
                    .unwrap();
                }
                assert_eq!(ok, 8);
                drop(p);
                for slot in 0..8u64 {
                    let got = queue.read(base + slot * 4096, 4096).unwrap();
                    assert_eq!(got, vec![slot as u8 + 1; 4096]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // A second client after the first went away.
    let mut c = Client::open(&q.sock, 1).unwrap();
    assert_eq!(c.queue(0).read(16 << 20, 4096).unwrap(), vec![1; 4096]);
    drop(c);
    let status = q.daemon.terminate().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn io_uring_driver_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.img");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.write_all(&pattern(9, 1 << 20)).unwrap();
    drop(f);
    let mut c = Client::open_with(
        Target::IoUring {
            path: &img,
            direct: false,
        },
        &ClientOptions::default(),
    )
    .unwrap();
    assert_eq!(c.capacity(), 1 << 20);
    assert_eq!(
        c.queue(0).read(4096, 8192).unwrap(),
        pattern(9, 1 << 20)[4096..12288]
    );
}
