//! Live snapshots of a qcow2 disk: a libblkio client writes numbered records one after
//! another while `strata snapshot create` takes a snapshot every so often. The client sees
//! no error; each snapshot, read back with qemu-img, holds exactly a prefix of the records:
//! at least those acknowledged before the snapshot was asked for, at most those
//! acknowledged by the time it was taken, and nothing after a gap. Every image of the chain
//! passes `qemu-img check`, and `strata snapshot list` names them. Two snapshots are
//! deleted while the client still writes (the newest, whose data goes up into the image
//! the client writes, and one in the middle) and the others still hold their prefixes;
//! then the disk is reverted to one of them, refused while a frontend is connected.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use testkit::blkio_client::Client;
use testkit::daemon::{strata, strata_run, Daemon, DaemonCommand};
use testkit::tools::{qemu_img_ok, qemu_img_read};

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

/// A new qcow2 image `vm.qcow2` of `size` in `dir`, served as disk `vm` with the API up:
/// the daemon, the image, the disk's socket and the API's.
fn serve_vm(dir: &Path, size: &str) -> (Daemon, PathBuf, PathBuf, PathBuf) {
    let img = dir.join("vm.qcow2");
    let (sock, api) = (dir.join("vm.sock"), dir.join("api.sock"));
    qemu_img_ok(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), size]);
    let daemon = DaemonCommand::vhost_blk()
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
    (daemon, img, sock, api)
}

#[test]
fn snapshots_taken_while_the_guest_writes_hold_a_prefix_of_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, img, sock, api) = serve_vm(dir.path(), "128M");

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // The writer never runs more than a seventh of the records past the snapshot under way
    // (a slow snapshot on a busy machine would otherwise see it finish first).
    let gate = Arc::new(AtomicU64::new(2 * BLOCKS / 7));
    let writer = {
        let (acked, stop, gate, sock) = (acked.clone(), stop.clone(), gate.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut c = Client::open(&sock, 1).expect("libblkio connects");
            let q = c.queue(0);
            for n in 0..BLOCKS {
                while n >= gate.load(Ordering::SeqCst) && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
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
        gate.store(((i + 3) * BLOCKS / 7).min(BLOCKS), Ordering::SeqCst);
    }
    gate.store(BLOCKS, Ordering::SeqCst);
    let list = strata(&api, &["snapshot", "list", "vm"]);
    for i in 0..5 {
        assert!(list.contains(&format!("s{i} ")), "{list}");
    }
    // Deleted while the client writes: the newest (into the image it writes), then one in
    // the middle.
    for name in ["s4", "s1"] {
        let still = acked.load(Ordering::SeqCst);
        let out = strata(&api, &["snapshot", "delete", "vm", name, "--wait"]);
        eprintln!(
            "deleted {name}: records {still}..={} acknowledged meanwhile: {out}",
            acked.load(Ordering::SeqCst)
        );
    }
    let (ok, _, err) = strata_run(&api, &["snapshot", "delete", "vm", "s1"]);
    assert!(!ok && err.contains("404"), "deleted twice: {err}");
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("the writer saw no error");
    let written = acked.load(Ordering::SeqCst);
    let list = strata(&api, &["snapshot", "list", "vm"]);
    for (i, kept) in [true, false, true, true, false].iter().enumerate() {
        assert_eq!(list.contains(&format!("s{i} ")), *kept, "s{i}: {list}");
    }
    let metrics = testkit::http::get(&api, "/metrics").unwrap().text();
    for line in [
        "strata_blk_snapshots{disk=\"vm\"} 3",
        "strata_blk_snapshot_operations_total{disk=\"vm\",op=\"delete\",result=\"ok\"} 2",
        "strata_blk_snapshot_last_age_seconds{disk=\"vm\"} ",
        "strata_blk_snapshot_last_operation_seconds{disk=\"vm\",op=\"delete\"} ",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    for (file, _, _) in [&taken[1], &taken[4]] {
        assert!(!Path::new(file).exists(), "{file} stays after its deletion");
    }
    // A frontend's flush puts the top's metadata on disk for qemu-img to read.
    let mut client = Client::open(&sock, 1).expect("libblkio connects");
    client.queue(0).flush().unwrap();
    let kept: Vec<_> = [0, 2, 3].iter().map(|&i| taken[i].clone()).collect();
    check_prefixes(dir.path(), &kept);
    // -U: the daemon still serves the image (its lock would refuse qemu-img).
    qemu_img_ok(&["check", "-U", img.to_str().unwrap()]);
    // The top holds every record written.
    let (held, stray) = prefix(&qemu_img_read(&img, dir.path()));
    assert!(
        !stray && held == written,
        "top: {held} records of {written}"
    );

    // Revert: refused while a frontend is connected, then back to s2, s3 gone.
    let (ok, _, err) = strata_run(&api, &["snapshot", "revert", "vm", "s2"]);
    assert!(!ok && err.contains("409"), "revert with a frontend: {err}");
    drop(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = strata_run(&api, &["snapshot", "revert", "vm", "s2"]);
        if ok {
            assert!(
                out.contains("removed") && out.contains("vm@s3.qcow2"),
                "{out}"
            );
            break;
        }
        // The daemon sees the client go a moment after it closes its socket.
        assert!(err.contains("409"), "{err}");
        assert!(std::time::Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !Path::new(&taken[3].0).exists(),
        "s3 stays after the revert"
    );
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());
    qemu_img_ok(&["check", img.to_str().unwrap()]);
    assert!(
        qemu_img_read(&img, dir.path()) == qemu_img_read(Path::new(&taken[2].0), dir.path()),
        "the reverted disk reads as s2"
    );
}

/// Each snapshot, read back with qemu-img, holds a prefix of the records: at least those
/// acknowledged before it was asked for, at most those acknowledged once it was taken.
fn check_prefixes(dir: &Path, taken: &[(String, u64, u64)]) {
    for (file, before, after) in taken {
        qemu_img_ok(&["check", file]);
        let (held, stray) = prefix(&qemu_img_read(Path::new(file), dir));
        assert!(!stray, "{file}: data after the first missing record");
        // The request in flight when the queues stopped is answered before the snapshot
        // and lands in it, perhaps before the client counted it: one more than `after`.
        assert!(
            *before <= held && held <= *after + 1,
            "{file}: holds records 0..{held}, but {before} were acknowledged before it was \
             asked for and {after} when it was taken"
        );
    }
}

/// The snapshot policy of a disk in the config, on a fast schedule (every 2 s, at most 3
/// kept) while a client writes: snapshots come on schedule, named for their time, the
/// oldest are merged away down to 3, the guest sees no error; after a restart the next is
/// due one interval after the last, not at once.
#[test]
fn a_snapshot_policy_takes_them_on_schedule_and_keeps_at_most_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    let (sock, api) = (dir.path().join("vm.sock"), dir.path().join("api.sock"));
    qemu_img_ok(&["create", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let config = dir.path().join("vhost-blk.toml");
    std::fs::write(
        &config,
        format!(
            "api-socket = \"{}\"\n[[disk]]\nid = \"vm\"\nsocket = \"{}\"\n\
             disk = \"path={},format=qcow2\"\n\
             snapshot-policy = {{ schedule = \"every 2s\", max-snapshots = 3 }}\n",
            api.display(),
            sock.display(),
            img.display()
        ),
    )
    .unwrap();
    let start = || {
        DaemonCommand::vhost_blk()
            .unwrap_or_else(|e| panic!("{e}"))
            .arg("--config")
            .arg(&config)
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let autos = || -> Vec<u64> {
        let v: serde_json::Value =
            serde_json::from_str(&strata(&api, &["--json", "snapshot", "list", "vm"])).unwrap();
        let mut times: Vec<u64> = v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let name = s["name"].as_str().unwrap_or_default();
                vhost_blk::lifecycle::taken_at(name)
                    .unwrap_or_else(|| panic!("{name}: not a policy snapshot"))
            })
            .collect();
        times.sort();
        times
    };
    let mut daemon = start();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, sock) = (stop.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut c = Client::open(&sock, 1).expect("libblkio connects");
            let q = c.queue(0);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                q.write((n % 16384) * BLOCK as u64, &record(n))
                    .unwrap_or_else(|e| panic!("record {n}: {e}"));
                n += 1;
            }
        })
    };
    // Five intervals and more: at least five taken, the oldest merged away.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let taken_by_now = || {
        let m = testkit::http::get(&api, "/metrics").unwrap().text();
        testkit::http::parse_prometheus(&m)
            .unwrap()
            .into_iter()
            .find(|s| {
                s.name == "strata_blk_snapshot_operations_total"
                    && s.labels.contains("op=\"create\"")
                    && s.labels.contains("result=\"ok\"")
            })
            .map_or(0.0, |s| s.value)
    };
    while taken_by_now() < 5.0 {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.output());
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("the writer saw no error");
    // The clean-up after the last one finishes (a job): at most 3 are kept, and never
    // fewer (the newest stays).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let kept = loop {
        let now = autos();
        if now.len() <= 3 {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "{now:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(kept.len(), 3, "{kept:?}");
    for w in kept.windows(2) {
        assert!(
            w[1] - w[0] >= 2,
            "two policy snapshots within 2 s: {kept:?}"
        );
    }
    // The next start runs every 20 s: none is due at once.
    let every_2s = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, every_2s.replace("every 2s", "every 20s")).unwrap();
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());
    qemu_img_ok(&["check", img.to_str().unwrap()]);
    // The last one taken, from the files (taken until the daemon stopped).
    let last = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let snap = name.strip_prefix("vm@")?.strip_suffix(".qcow2")?.to_owned();
            vhost_blk::lifecycle::taken_at(&snap)
        })
        .max()
        .unwrap();

    let mut daemon = start();
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(30);
    while !strata_run(&api, &["snapshot", "list", "vm"]).0 {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.output());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Five seconds serving: any policy snapshot since comes an interval after the last.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(started.elapsed()));
    for t in autos() {
        assert!(
            t <= last || t >= last + 20,
            "after a restart, one at {t}, less than an interval after the last ({last})"
        );
    }

    // Changed through the API and kept in the config; removed; a bad one refused.
    strata(
        &api,
        &[
            "snapshot",
            "policy",
            "vm",
            "--schedule",
            "daily 03:00",
            "--max-snapshots",
            "5",
        ],
    );
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains(r#"snapshot-policy = { schedule = "daily 03:00", max-snapshots = 5 }"#),
        "{text}"
    );
    let (ok, _, err) = strata_run(&api, &["snapshot", "policy", "vm", "--schedule", "weekly"]);
    assert!(
        !ok && err.contains("400") && err.contains("weekly"),
        "{err}"
    );
    strata(&api, &["snapshot", "policy", "vm", "--off"]);
    assert!(!std::fs::read_to_string(&config)
        .unwrap()
        .contains("snapshot-policy"));
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());

    // A policy the daemon cannot run stops it at start, with one line.
    std::fs::write(
        &config,
        text.replace(
            r#"{ schedule = "daily 03:00", max-snapshots = 5 }"#,
            r#"{ schedule = "daily 03:00", quiesce = false }"#,
        ),
    )
    .unwrap();
    let err =
        testkit::daemon::expect_usage_error("vhost-blk", &["--config", config.to_str().unwrap()]);
    assert!(
        err.contains("snapshot-policy") && err.contains("quiesce"),
        "{err}"
    );
}

/// A snapshot is read-only from the moment it is taken: others may read it (a clone's
/// backing file, `qemu-img info`) while the image the guest writes stays locked to them,
/// as QEMU's lock bytes say.
#[test]
fn a_snapshot_is_open_to_readers_while_the_image_stays_locked() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, img, sock, api) = serve_vm(dir.path(), "16M");
    let locked = |path: &Path| {
        let out = testkit::tools::qemu_img(&["info", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success() || err.contains("lock"), "{err}");
        !out.status.success()
    };
    assert!(locked(&img), "the served image is open to qemu-img");
    // A guest writes across the snapshot, then goes: the queues hold the chain as they
    // last used it (the new image on top), and nothing moves them off it.
    {
        let mut c = Client::open(&sock, 1).expect("libblkio connects");
        c.queue(0).write(0, &record(1)).unwrap();
        strata(&api, &["snapshot", "create", "vm", "s1"]);
        c.queue(0).write(0, &record(2)).unwrap();
        c.queue(0).flush().unwrap();
    }
    let snapshot = dir.path().join("vm@s1.qcow2");
    assert!(snapshot.exists());
    assert!(
        !locked(&snapshot),
        "the snapshot is still locked for writing"
    );
    assert!(locked(&img), "the new image is open to qemu-img");
    // Deleting the newest snapshot reopens the image above it, the one served: the image
    // as it was opened before must not keep its lock bytes (the queues still hold it, and
    // with no frontend nothing moves them off it), or the next snapshot would stay locked
    // for writing.
    strata(&api, &["snapshot", "delete", "vm", "s1", "--wait"]);
    assert!(!snapshot.exists());
    strata(&api, &["snapshot", "create", "vm", "s2"]);
    let s2 = dir.path().join("vm@s2.qcow2");
    assert!(
        !locked(&s2),
        "the second snapshot is still locked for writing"
    );
    assert!(locked(&img));
    // A clone based on the snapshot, served by QEMU: deleting the snapshot would pull its
    // file from under the clone, so it is refused until the clone stops.
    let clone = dir.path().join("clone.qcow2");
    testkit::tools::qemu_img_overlay(&clone, "vm@s2.qcow2", "qcow2");
    let mut qsd = testkit::daemon::qsd_serving_qcow2(&clone, &dir.path().join("qsd.sock"));
    let (ok, out, err) = strata_run(&api, &["snapshot", "delete", "vm", "s2", "--wait"]);
    assert!(
        !ok && err.contains("in use") && err.contains("vm@s2.qcow2: "),
        "names the snapshot's file: {out}{err}"
    );
    assert!(s2.exists());
    assert!(
        !locked(&s2),
        "a refused delete left the snapshot locked for writing"
    );
    qsd.terminate().unwrap();
    strata(&api, &["snapshot", "delete", "vm", "s2", "--wait"]);
    assert!(!s2.exists());
    // Nor is one removed by a revert to an older one while a clone reads it.
    strata(&api, &["snapshot", "create", "vm", "s3"]);
    strata(&api, &["snapshot", "create", "vm", "s4"]);
    let s4 = dir.path().join("vm@s4.qcow2");
    let clone = dir.path().join("clone4.qcow2");
    testkit::tools::qemu_img_overlay(&clone, "vm@s4.qcow2", "qcow2");
    let mut qsd = testkit::daemon::qsd_serving_qcow2(&clone, &dir.path().join("qsd.sock"));
    let (ok, out, err) = strata_run(&api, &["snapshot", "revert", "vm", "s3"]);
    assert!(
        !ok && err.contains("409") && err.contains("in use") && err.contains("vm@s4.qcow2: "),
        "{out}{err}"
    );
    assert!(s4.exists() && !locked(&s4));
    qsd.terminate().unwrap();
    strata(&api, &["snapshot", "revert", "vm", "s3"]);
    assert!(!s4.exists());
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());
    assert!(!locked(&img));
}
