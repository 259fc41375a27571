//! The bench workload loop against the reference daemon (qemu-storage-daemon): requests land
//! whole and aligned, the loop keeps its depth, and reads see what the writes left.
//! Requires `qemu-storage-daemon` (scripts/setup.sh installs it).

use std::fs::File;
use std::time::Duration;

use benches::{run_workload, Pattern, Workload};
use testkit::blkio_client::Client;
use testkit::daemon::DaemonCommand;

const SIZE: u64 = 16 << 20;
const BLOCK: usize = 4096;

#[test]
fn random_writes_then_reads_through_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("blk.sock");
    File::create(&img).unwrap().set_len(SIZE).unwrap();
    let _qsd = DaemonCommand::qemu_storage_daemon(&sock)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},aio=io_uring,cache.direct=off",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}\n(qemu-storage-daemon is needed: run scripts/setup.sh)"));

    let mut client = Client::open(&sock, 1).unwrap();
    let depth = 8;
    let write = Workload {
        pattern: Pattern::RandWrite,
        block: BLOCK,
        depth,
        span: SIZE,
        zipf: None,
        duration: Duration::from_millis(300),
        seed: 5,
    };
    let w = run_workload(client.queue(0), &write).unwrap();
    assert_eq!(w.errors, 0, "{:?}", w.first_error);
    assert!(w.ops >= depth as u64, "only {} writes", w.ops);
    assert_eq!(w.latency.count(), w.ops);

    let r = run_workload(
        client.queue(0),
        &Workload {
            pattern: Pattern::RandRead,
            ..write
        },
    )
    .unwrap();
    assert_eq!(r.errors, 0, "{:?}", r.first_error);
    assert!(r.iops() > 0.0);
    drop(client);

    // Every 4 KiB block of the file is either untouched or one slot's whole fill pattern.
    let data = std::fs::read(&img).unwrap();
    let fills: Vec<u8> = (0..depth).map(|s| (s as u8).wrapping_mul(37) | 1).collect();
    let mut written = 0;
    for (i, block) in data.chunks(BLOCK).enumerate() {
        let first = block[0];
        assert!(
            block.iter().all(|&b| b == first),
            "block {i} is not uniform: a write landed torn or misaligned"
        );
        if first != 0 {
            assert!(fills.contains(&first), "block {i} holds {first:#x}");
            written += 1;
        }
    }
    assert!(written > 0, "no writes reached the file");
}
