//! Image locks, as QEMU takes them: an image our daemon serves is refused to a second
//! daemon (ours or qemu-storage-daemon) and to qemu-img without `-U`, and an image QEMU
//! serves is refused to ours; a tier's cache device is one tier's; `locking=off` opts
//! out; and the image is free again as soon as the daemon that held it has stopped.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testkit::daemon::{expect_usage_error, run_with_timeout, Daemon, DaemonCommand};
use testkit::tools::{qemu_img, qemu_img_ok, require_tool};

const MIB: u64 = 1 << 20;

fn serve(dir: &Path, name: &str, disk: &str) -> Daemon {
    DaemonCommand::vhost_blk()
        .unwrap_or_else(|e| panic!("{e}"))
        .name(name)
        .arg("--socket")
        .arg(dir.join(format!("{name}.sock")))
        .arg("--disk")
        .arg(disk)
        .spawn()
        .unwrap_or_else(|e| panic!("{name} ({disk}): {e}"))
}

/// A second vhost-blk on `disk`: refused with exit code 2 and one line naming `file`.
fn refused(dir: &Path, disk: &str, file: &Path) -> String {
    let sock = dir.join("second.sock");
    let msg = expect_usage_error(
        "vhost-blk",
        &["--socket", sock.to_str().unwrap(), "--disk", disk],
    );
    assert!(
        msg.contains("in use") && msg.contains(&file.display().to_string()),
        "{disk}: {msg}"
    );
    msg
}

fn raw_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    img
}

#[test]
fn an_image_we_serve_is_refused_to_a_second_daemon_and_to_qemu() {
    let qsd = require_tool("qemu-storage-daemon").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.img");
    let disk = format!("path={}", img.display());
    let mut first = serve(dir.path(), "first", &disk);

    // Neither a writer nor a reader: the reader would see the first one's writes land
    // under it.
    let msg = refused(dir.path(), &disk, &img);
    assert!(msg.contains("write"), "{msg}");
    refused(dir.path(), &format!("{disk},readonly=on"), &img);

    // QEMU sees our lock bytes as its own (qemu-img info reads nothing of a raw image:
    // convert reads it all).
    let copy = dir.path().join("copy.raw");
    let convert = |extra: &[&str]| {
        let mut args = vec!["convert"];
        args.extend_from_slice(extra);
        args.extend(["-O", "raw", img.to_str().unwrap(), copy.to_str().unwrap()]);
        qemu_img(&args)
    };
    let out = convert(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Failed to get shared \"write\" lock"),
        "qemu-img convert of a served image: {err}"
    );
    let out = convert(&["-U"]);
    assert!(out.status.success(), "{out:?}");
    let out = run_with_timeout(
        Command::new(&qsd).args([
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={}", img.display()),
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
                dir.path().join("qsd.sock").display()
            ),
        ]),
        Duration::from_secs(20),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("lock"),
        "qemu-storage-daemon on a served image: {err}"
    );

    // locking=off: shared on purpose, the user's call.
    let mut shared = serve(dir.path(), "shared", &format!("{disk},locking=off"));
    shared.terminate().unwrap();

    // Free as soon as the first has stopped (its lock goes at its close, not when the
    // kernel gets round to tearing down its io_uring rings).
    let status = first.terminate().unwrap();
    assert!(status.success(), "{}", first.output());
    let mut next = serve(dir.path(), "next", &disk);
    next.terminate().unwrap();
    assert!(convert(&[]).status.success());
}

#[test]
fn an_image_qemu_serves_is_refused_to_our_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    let mut qsd = testkit::daemon::qsd_serving_qcow2(&img, &dir.path().join("qsd.sock"));
    let disk = format!("path={},format=qcow2", img.display());
    let msg = refused(dir.path(), &disk, &img);
    assert!(msg.contains("lock byte"), "{msg}");
    refused(dir.path(), &format!("{disk},readonly=on"), &img);
    // Nor as the backing file of an overlay: the base would change under it.
    let top = dir.path().join("top.qcow2");
    testkit::tools::qemu_img_overlay(&top, "vm.qcow2", "qcow2");
    let over = format!("path={},format=qcow2", top.display());
    let msg = refused(dir.path(), &over, &img);
    assert!(msg.contains("backing file"), "{msg}");
    // locking=off reaches the whole chain: the user's call.
    let mut shared = serve(dir.path(), "shared", &format!("{over},locking=off"));
    shared.terminate().unwrap();
    qsd.terminate().unwrap();
    let mut ours = serve(dir.path(), "ours", &disk);
    ours.terminate().unwrap();
}

#[test]
fn a_cache_device_serves_one_tier() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.img");
    let a = raw_image(dir.path(), "a.img");
    let b = raw_image(dir.path(), "b.img");
    let tier = |cap: &Path| {
        format!(
            "path={},cache={},cache-size=4M",
            cap.display(),
            cache.display()
        )
    };
    let mut first = serve(dir.path(), "first", &tier(&a));
    // Another disk's tier would format the cache under the first one.
    refused(dir.path(), &tier(&b), &cache);
    // A repair would rewrite its slot table under the tier; a check alone reads.
    use storage_core::check::{check_file, Repair};
    let e = check_file(&cache, Repair::All).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    check_file(&cache, Repair::None).unwrap();
    first.terminate().unwrap();
    check_file(&cache, Repair::All).unwrap();
}
