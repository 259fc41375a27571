//! Live snapshots of a qcow2 disk: a libblkio client writes numbered records one after
//! another while `strata snapshot create` takes a snapshot every so often. The client sees
//! no error; each snapshot, read back with qemu-img, holds exactly a prefix of the records:
//! at least those acknowledged before the snapshot was asked for, at most those
//! acknowledged by the time it was taken, and nothing after a gap. Every image of the chain
//! passes `qemu-img check`, and `strata snapshot list` names them.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use testkit::blkio_client::Client;
use testkit::daemon::{binary_path, DaemonCommand};
use testkit::tools::qemu_img_ok;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 32768; // 128 MiB: records to go on through every snapshot

fn record(n: u64) -> Vec<u8> {
    let mut b = vec![(n % 251) as u8; BLOCK];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..16].copy_from_slice(&(!n).to_le_bytes());
    b
}

/// How many records from the first hold, and whether anything follows the gap.
fn prefix(image: &[u8]) -> (u64, bool) {
    let mut n = 0;
    while n < BLOCKS && image[(n as usize) * BLOCK..(n as usize + 1) * BLOCK] == record(n)[..] {
        n += 1;
    }
    let rest = &image[(n as usize) * BLOCK..];
    (n, rest.iter().any(|&b| b != 0))
}

fn strata(api: &Path, args: &[&str]) -> String {
    let out = Command::new(binary_path("strata"))
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn snapshots_taken_while_the_guest_writes_hold_a_prefix_of_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    let (sock, api) = (dir.path().join("vm.sock"), dir.path().join("api.sock"));
    qemu_img_ok(&["create", "-f", "qcow2", img.to_str().unwrap(), "128M"]);
    let mut daemon = DaemonCommand::vhost_blk()
        .unwrap_or_else(|e| panic!("{e}"))
        .arg("--socket")
        .arg(&sock)
        .arg("--id")
        .arg("vm")
        .arg("--api-socket")
        .arg(&api)
        .arg("--disk")
        .arg(format!("path={},format=qcow2", img.display()))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, sock) = (acked.clone(), stop.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut c = Client::open(&sock, 1).expect("libblkio connects");
            let q = c.queue(0);
            for n in 0..BLOCKS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                q.write(n * BLOCK as u64, &record(n))
                    .unwrap_or_else(|e| panic!("record {n}: {e}"));
                acked.store(n + 1, Ordering::SeqCst);
            }
        })
    };
    let mut taken = Vec::new();
    for i in 0..5 {
        // Paced by the writer, not the clock: snapshot i once (i + 1) / 7 of the records are
        // written, so that every snapshot is taken while it writes, however fast it is.
        while acked.load(Ordering::SeqCst) < (i + 1) * BLOCKS / 7 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let before = acked.load(Ordering::SeqCst);
        let name = format!("s{i}");
        let out = strata(&api, &["--json", "snapshot", "create", "vm", &name]);
        let after = acked.load(Ordering::SeqCst);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        eprintln!(
            "snapshot {name}: records {before}..={after} acknowledged around it; the guest \
             paused {:.2} ms",
            v["pause_ms"].as_f64().unwrap()
        );
        assert!(
            after < BLOCKS,
            "the writer finished before snapshot {name}: the test proves nothing"
        );
        taken.push((v["file"].as_str().unwrap().to_string(), before, after));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("the writer saw no error");
    let written = acked.load(Ordering::SeqCst);
    let list = strata(&api, &["snapshot", "list", "vm"]);
    for i in 0..5 {
        assert!(list.contains(&format!("s{i} ")), "{list}");
    }
    let metrics = testkit::http::get(&api, "/metrics").unwrap().text();
    assert!(
        metrics.contains("strata_blk_snapshots{disk=\"vm\"} 5"),
        "{metrics}"
    );
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());

    for (file, before, after) in &taken {
        qemu_img_ok(&["check", file]);
        let raw = dir.path().join("snapshot.raw");
        let _ = std::fs::remove_file(&raw);
        qemu_img_ok(&["convert", "-O", "raw", file, raw.to_str().unwrap()]);
        let (held, stray) = prefix(&std::fs::read(&raw).unwrap());
        assert!(!stray, "{file}: data after the first missing record");
        // The request in flight when the queues stopped is answered before the snapshot
        // and lands in it, perhaps before the client counted it: one more than `after`.
        assert!(
            *before <= held && held <= *after + 1,
            "{file}: holds records 0..{held}, but {before} were acknowledged before it was \
             asked for and {after} when it was taken"
        );
    }
    qemu_img_ok(&["check", img.to_str().unwrap()]);
    // The top holds every record written.
    let raw = dir.path().join("top.raw");
    qemu_img_ok(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let (held, stray) = prefix(&std::fs::read(&raw).unwrap());
    assert!(
        !stray && held == written,
        "top: {held} records of {written}"
    );
}
