//! qcow2 disks served by the daemon, with libblkio as the frontend and qemu-img as the
//! oracle: an overlay over a raw base takes writes 32 at a time (many landing on clusters
//! being allocated) and, after the daemon drains and stops, `qemu-img check` finds it clean
//! and `qemu-img compare` finds it equal to what was written; and the SIGKILL rounds the
//! raw and tiered disks go through (tagged writes with FLUSH barriers, killed mid-stream,
//! every block checked after each restart) leave a qcow2 image that qemu-img calls
//! consistent (leaked clusters allowed, as QEMU allows them after a crash).

use std::path::Path;

use testkit::blkio_client::{Client, SlotOp};
use testkit::crash::run_rounds;
use testkit::daemon::DaemonCommand;
use testkit::tools::{qemu_img_check, qemu_img_ok};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_overlay_takes_concurrent_writes_and_qemu_img_agrees_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let base = dir.path().join("base.raw");
    let mut model: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&base, &model).unwrap();
    let img = dir.path().join("vm.qcow2");
    testkit::tools::qemu_img_overlay_on_raw_base(&img);
    let sock = dir.path().join("blk.sock");
    let mut daemon = DaemonCommand::vhost_blk()
        .unwrap_or_else(|e| panic!("{e}"))
        .arg("--socket")
        .arg(&sock)
        .arg("--disk")
        .arg(format!("path={},format=qcow2", s(&img)))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    {
        let mut c = Client::open(&sock, 1).unwrap();
        assert_eq!(c.capacity(), size);
        let q = c.queue(0);
        // The backing file shows through.
        assert!(q.read(0, 65536).unwrap() == model[..65536]);
        // 32 writes in flight at a time, 4 KiB each, spread so that neighbours share
        // 64 KiB clusters that are being allocated (copy-on-write from the base).
        let mut p = q.pipeline(32, 4096).unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for n in 0..2000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let block = x % (size / 4096);
            let slot = loop {
                if let Some(s) = (0..32).find(|&s| p.is_free(s)) {
                    break s;
                }
                p.wait(1, |_, r| r.expect("a write failed")).unwrap();
            };
            let fill = (n % 250 + 1) as u8;
            p.slot_mut(slot).fill(fill);
            p.submit(slot, SlotOp::Write(block * 4096));
            model[(block * 4096) as usize..((block + 1) * 4096) as usize].fill(fill);
        }
        while p.in_flight() > 0 {
            p.wait(1, |_, r| r.expect("a write failed")).unwrap();
        }
        drop(p);
        // Read back through the daemon.
        for chunk in 0..(size / MIB) {
            let got = q.read(chunk * MIB, MIB as usize).unwrap();
            assert!(
                got == model[(chunk * MIB) as usize..((chunk + 1) * MIB) as usize],
                "MiB {chunk} differs"
            );
        }
    }
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());
    qemu_img_check(&img, false);
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_img_ok(&["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&raw)]);
    // The base is as it was.
    let base_now = std::fs::read(&base).unwrap();
    assert!(base_now
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i as u64 / 4096 % 251) as u8));
}

#[test]
fn sigkill_rounds_leave_a_consistent_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    let blocks = 2048u64; // 8 MiB
    qemu_img_ok(&["create", "-f", "qcow2", s(&img), "8M"]);
    let sock = dir.path().join("blk.sock");
    let report = run_rounds(blocks, 20, 0x9c0_2cafe, &sock, |_| {
        DaemonCommand::vhost_blk()
            .unwrap_or_else(|e| panic!("{e}"))
            .arg("--socket")
            .arg(&sock)
            .arg("--queue-size")
            .arg("256")
            .arg("--disk")
            .arg(format!("path={},format=qcow2", img.display()))
    });
    assert!(
        report.problems.is_empty(),
        "problems:\n{}",
        report.problems.join("\n")
    );
    assert_eq!(report.rounds, 20);
    assert!(report.flushes > 20, "too few flushes: {}", report.flushes);
    // Leaked clusters are allowed, as after QEMU's own crashes.
    qemu_img_check(&img, true);
}
