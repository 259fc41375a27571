//! Ceph RBD disks through the daemon (cargo feature `rbd`): a one-node cluster started for
//! the test (testkit::ceph), data written with libblkio read back through the daemon and,
//! after it stops, with `rbd export`; a tier in front of an RBD image (an SSD cache over
//! Ceph) writes through to the image.
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
