//! Ceph RBD disks through the daemon (cargo feature `rbd`): a one-node cluster started for
//! the test (testkit::ceph), data written with libblkio read back through the daemon and,
//! after it stops, with `rbd export`; a tier in front of an RBD image (an SSD cache over
//! Ceph) writes through to the image; a daemon killed mid-write with librbd's write-back
//! cache on loses nothing a FLUSH covered.
#![cfg(feature = "rbd")]

use std::path::Path;

use testkit::blkio_client::Client;
use testkit::ceph::Cluster;
use testkit::daemon::{Daemon, DaemonCommand};

const MIB: usize = 1 << 20;

fn cluster() -> Cluster {
    Cluster::start().unwrap_or_else(|e| panic!("starting a Ceph cluster: {e}"))
}

fn start(dir: &Path, blockdevs: &[String], root: &str) -> Daemon {
    let mut cmd = DaemonCommand::vhost_blk()
        .unwrap_or_else(|e| panic!("{e}"))
        .arg("--socket")
        .arg(dir.join("blk.sock"));
    for b in blockdevs {
        cmd = cmd.arg("--blockdev").arg(b);
    }
    cmd.arg("--disk")
        .arg(format!("node={root}"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting vhost-blk: {e}"))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect()
}

/// Writes, vectored writes, write-zeroes and discard through the daemon; returns what the
/// image must hold (`size` bytes), having read it back through the daemon.
fn exercise(c: &mut Client, size: usize) -> Vec<u8> {
    let mut model = vec![0u8; size];
    let q = c.queue(0);
    for (i, at) in [0usize, 4096, 3 * MIB + 512, size - 8192]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u8 + 1, 8192);
        q.write(at as u64, &data).unwrap();
        model[at..at + 8192].copy_from_slice(&data);
    }
    let (a, b) = (pattern(7, 4096), pattern(8, 12288));
    q.writev(MIB as u64, &[&a, &b]).unwrap();
    model[MIB..MIB + 4096].copy_from_slice(&a);
    model[MIB + 4096..MIB + 16384].copy_from_slice(&b);
    q.write_zeroes(4096, 4096, false).unwrap();
    model[4096..8192].fill(0);
    q.flush().unwrap();
    for at in [0usize, MIB, 3 * MIB, size - 65536] {
        assert_eq!(
            q.read(at as u64, 65536).unwrap(),
            model[at..at + 65536],
            "read back at {at}"
        );
    }
    model
}

#[test]
fn an_rbd_image_serves_through_the_daemon_and_rbd_export_reads_it() {
    let ceph = cluster();
    ceph.create_image("disk1", 16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rbd = format!(
        "driver=rbd,node-name=img,pool=rbd,image=disk1,conf={}",
        ceph.conf().display()
    );
    let mut d = start(dir.path(), &[rbd], "img");
    let mut c = Client::open(dir.path().join("blk.sock"), 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.output()));
    assert_eq!(c.capacity(), 16 * MIB as u64);
    let model = exercise(&mut c, 16 * MIB);
    drop(c);
    let status = d.terminate().unwrap();
    assert!(status.success(), "{status:?}\n{}", d.output());
    let exported = ceph.export("disk1").unwrap();
    assert!(
        exported == model,
        "rbd export differs from what was written"
    );
}

#[test]
fn a_cache_tier_over_an_rbd_image_writes_through_to_it() {
    let ceph = cluster();
    ceph.create_image("disk2", 16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nodes = vec![
        format!(
            "driver=rbd,node-name=cap,pool=rbd,image=disk2,conf={}",
            ceph.conf().display()
        ),
        format!(
            "driver=file,node-name=ssd,filename={}",
            dir.path().join("cache.img").display()
        ),
        "driver=tier,node-name=t,capacity=cap,cache=ssd,cache-size=4M".to_string(),
    ];
    let mut d = start(dir.path(), &nodes, "t");
    let mut c = Client::open(dir.path().join("blk.sock"), 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.output()));
    let model = exercise(&mut c, 16 * MIB);
    // Read again: now from the cache.
    assert_eq!(c.queue(0).read(0, 65536).unwrap(), model[..65536]);
    drop(c);
    let status = d.terminate().unwrap();
    assert!(status.success(), "{status:?}\n{}", d.output());
    assert!(
        ceph.export("disk2").unwrap() == model,
        "the image misses writes"
    );
}

/// librbd's write-back cache lives in the daemon's memory, so a SIGKILL loses what it holds
/// just as a power cut loses a disk's volatile cache: every FLUSH the daemon acknowledged
/// must have reached the OSDs. After each kill the dead daemon's lock is broken (`rbd lock
/// rm`, which blocklists it), so the next daemon writes at once. The client configuration
/// turns the cache to write-back (the default policy, write-around, acknowledges writes
/// only moments before they are sent) from the first write, and keeps dirty data for a
/// minute, so a flush that did not go through librbd would lose data here.
#[test]
fn every_flushed_write_survives_a_crash_of_the_daemon_with_librbd_caching() {
    let ceph = cluster();
    let blocks = 1024u64; // 4 MiB
    ceph.create_image("crash", 4).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("client.conf");
    let mut text = std::fs::read_to_string(ceph.conf()).unwrap();
    text.push_str(
        "[client]\n\
         rbd cache = true\n\
         rbd cache policy = writeback\n\
         rbd cache writethrough until flush = false\n\
         rbd cache max dirty age = 60\n",
    );
    std::fs::write(&conf, text).unwrap();
    let sock = dir.path().join("blk.sock");
    let started = std::time::Instant::now();
    // The killed daemon held the image's exclusive lock: fence it, as an operator would.
    let (mut locks_broken, mut fencing) = (0, Vec::new());
    let report = testkit::crash::run_rounds_killing_within(
        blocks,
        6,
        0x0bd_c0de,
        300..1500,
        &sock,
        |_| {
            DaemonCommand::vhost_blk()
                .unwrap_or_else(|e| panic!("{e}"))
                .arg("--socket")
                .arg(&sock)
                .arg("--blockdev")
                .arg(format!(
                    "driver=rbd,node-name=img,pool=rbd,image=crash,conf={}",
                    conf.display()
                ))
                .arg("--disk")
                .arg("node=img")
        },
        || match ceph.break_locks("crash") {
            Ok(n) => locks_broken += n,
            Err(e) => fencing.push(e.to_string()),
        },
    );
    eprintln!(
        "{} rounds ({} with a flush), {} writes acknowledged, {} flushes, {} blocks \
         checked, {locks_broken} stale locks broken in {:?}",
        report.rounds,
        report.rounds_flushed,
        report.writes_acknowledged,
        report.flushes,
        report.blocks_checked,
        started.elapsed()
    );
    assert!(fencing.is_empty(), "fencing failed: {fencing:?}");
    assert!(
        report.problems.is_empty(),
        "problems:\n{}",
        report.problems.join("\n")
    );
    assert_eq!(report.rounds, 6);
    // Every round must have written and flushed: a round stuck on the killed daemon's
    // exclusive lock would test nothing.
    assert_eq!(
        report.rounds_flushed, 6,
        "rounds without a flush before the kill"
    );
}
