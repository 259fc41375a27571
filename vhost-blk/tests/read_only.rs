//! A read-only disk refuses writes in the daemon itself, whatever the client does: these
//! requests go through a raw vhost-user transport (testkit's, which checks nothing), not
//! libblkio, which refuses writes to a read-only device before they leave the client.

use std::time::Duration;

use testkit::daemon::DaemonCommand;
use testkit::fuse_client::transport::{Segment, Transport, TransportOptions};

const MIB: u64 = 1 << 20;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
const VIRTIO_BLK_S_OK: u8 = 0;

/// Sends one request (a header, an optional data segment the device reads, a status byte)
/// and returns its status.
fn request(t: &mut Transport, req_type: u32, sector: u64, data: &[u8]) -> u8 {
    let buf = t.alloc(16 + data.len() as u64 + 1).unwrap();
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&req_type.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    buf.write(0, &hdr);
    buf.write(16, data);
    let status_at = 16 + data.len() as u64;
    buf.write(status_at as usize, &[0xff]);
    let mut segs = vec![Segment {
        gpa: buf.gpa,
        len: 16,
        writable: false,
    }];
    if !data.is_empty() {
        segs.push(Segment {
            gpa: buf.gpa + 16,
            len: data.len() as u32,
            writable: false,
        });
    }
    segs.push(Segment {
        gpa: buf.gpa + status_at,
        len: 1,
        writable: true,
    });
    t.add_chain(0, &segs).unwrap();
    t.kick(0).unwrap();
    t.wait_used(0, Duration::from_secs(10)).unwrap();
    let mut status = [0u8];
    buf.read(status_at as usize, &mut status);
    status[0]
}

fn discard_segment(sector: u64, sectors: u32) -> Vec<u8> {
    let mut d = vec![0u8; 16];
    d[0..8].copy_from_slice(&sector.to_le_bytes());
    d[8..12].copy_from_slice(&sectors.to_le_bytes());
    d
}

#[test]
fn a_read_only_tiered_disk_refuses_writes_from_any_client_and_changes_nothing() {
    for mode in ["writeback", "writethrough"] {
        let dir = tempfile::tempdir().unwrap();
        let cap = dir.path().join("capacity.img");
        let cache = dir.path().join("cache.img");
        std::fs::write(&cap, vec![0x5au8; (4 * MIB) as usize]).unwrap();
        let spec = |ro: &str| {
            format!(
                "path={},cache={},cache-size={},cache-mode={mode},readonly={ro}",
                cap.display(),
                cache.display(),
                2 * MIB
            )
        };
        let socket = dir.path().join("blk.sock");
        let start = |ro: &str| {
            DaemonCommand::vhost_blk()
                .unwrap_or_else(|e| panic!("{e}"))
                .arg("--socket")
                .arg(&socket)
                .arg("--disk")
                .arg(spec(ro))
                .spawn()
                .unwrap_or_else(|e| panic!("starting vhost-blk: {e}"))
        };
        // Create the cache read-write once, so the read-only run opens an existing one.
        let mut d = start("off");
        d.terminate().unwrap();
        let (cap_before, cache_before) =
            (std::fs::read(&cap).unwrap(), std::fs::read(&cache).unwrap());

        let mut d = start("on");
        let mut t = Transport::connect(
            &socket,
            TransportOptions {
                queues: 1,
                queue_size: 64,
                buffer_bytes: MIB,
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", d.output()));
        let status = request(&mut t, VIRTIO_BLK_T_OUT, 0, &[0xa5; 4096]);
        assert_ne!(status, VIRTIO_BLK_S_OK, "{mode}: a write was accepted");
        for req_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let status = request(&mut t, req_type, 0, &discard_segment(0, 8));
            assert_ne!(
                status, VIRTIO_BLK_S_OK,
                "{mode}: request type {req_type} accepted"
            );
        }
        drop(t);
        d.terminate().unwrap();
        assert!(
            std::fs::read(&cap).unwrap() == cap_before,
            "{mode}: capacity changed"
        );
        let cache_after = std::fs::read(&cache).unwrap();
        // The cache's data region (past its metadata) is untouched: nothing was cached.
        let data_from = (cache_after.len() / 2).min(cache_before.len());
        assert!(
            cache_after[data_from..] == cache_before[data_from..],
            "{mode}: cached data changed"
        );
    }
}
