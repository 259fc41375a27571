//! `strata image check FILE [--repair leaks|all]` on a qcow2 image that leaks a cluster: the
//! exit codes and the report qemu-img check gives, a repair that leaves qemu-img check
//! clean, `--json` with qemu-img's keys, and one line with exit 2 for a file that is not
//! a qcow2 image; the same check of a tier's cache device, refused by the API while a disk
//! serves it.

use std::os::unix::fs::FileExt;

use testkit::tools::{qemu_img_check, qemu_img_ok};

fn strata(args: &[&str]) -> (i32, String, String) {
    testkit::daemon::strata_local(args)
}

/// A vhost-blk daemon serving `disk`, its sockets in `dir` (the API's: `dir/api.sock`).
fn serve(dir: &std::path::Path, disk: &str) -> testkit::daemon::Daemon {
    testkit::daemon::DaemonCommand::vhost_blk()
        .unwrap_or_else(|e| panic!("{e}"))
        .arg("--socket")
        .arg(dir.join("vm.sock"))
        .arg("--api-socket")
        .arg(dir.join("api.sock"))
        .arg("--disk")
        .arg(disk)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_leaking_image_is_reported_and_repaired_as_qemu_img_would() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    let path = img.to_str().unwrap();
    qemu_img_ok(&["create", "-f", "qcow2", path, "16M"]);
    let (code, out, err) = strata(&["image", "check", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("No errors were found on the image."), "{out}");

    // A cluster past everything, with a refcount: leaked (16-bit refcounts, 64 KiB
    // clusters, the first refcount block named by the table at the header's offset 48).
    {
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 48).unwrap();
        let table = u64::from_be_bytes(b);
        f.read_exact_at(&mut b, table).unwrap();
        let block = u64::from_be_bytes(b);
        let end = f.metadata().unwrap().len().div_ceil(65536);
        f.set_len((end + 1) * 65536).unwrap();
        f.write_all_at(&1u16.to_be_bytes(), block + end * 2)
            .unwrap();
    }
    let (code, out, err) = strata(&["image", "check", path]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.contains("1 leaked clusters were found on the image."),
        "{out}"
    );
    let (code, out, _) = strata(&["--json", "image", "check", path]);
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["leaks"].as_u64(), v["corruptions"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );

    let (code, out, err) = strata(&["image", "check", "--repair", "leaks", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 leaked clusters"), "{out}");
    qemu_img_check(&img, false);

    // Not an image: one line, exit 2.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    let (code, out, err) = strata(&["image", "check", raw.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("neither a qcow2 image"), "{err}");
}

/// The same check as a job of the API (admin): its result is qemu-img check's report; an
/// image a disk serves is refused.
#[test]
fn the_api_checks_an_image_as_a_job_but_not_one_a_disk_serves() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.qcow2");
    let other = dir.path().join("other.qcow2");
    for img in [&served, &other] {
        qemu_img_ok(&["create", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    }
    let api = dir.path().join("api.sock");
    let mut daemon = serve(
        dir.path(),
        &format!("path={},format=qcow2", served.display()),
    );
    let api_arg = api.to_str().unwrap();
    let ask = |p: &std::path::Path| {
        let body = format!(r#"{{"path": "{}"}}"#, p.display());
        strata(&[
            "--api",
            api_arg,
            "raw",
            "POST",
            "/v1/images/check",
            "--data",
            &body,
        ])
    };
    let (code, out, err) = ask(&served);
    assert!(
        code != 0 && err.contains("409") && err.contains("in use"),
        "{out}{err}"
    );
    let (code, out, err) = ask(&other);
    assert_eq!(code, 0, "{err}");
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    let path = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let done = loop {
        let (_, out, _) = strata(&["--api", api_arg, "raw", "GET", &path]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if v["state"] != "running" {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["result"]["corruptions"], 0, "{done}");
    assert_eq!(done["result"]["leaks"], 0, "{done}");
    assert_eq!(done["result"]["format"], "qcow2", "{done}");
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());
}

/// A write-back tier's cache device: the API refuses to check it while the disk serves it;
/// once the daemon is gone, `strata image check` reads it as the tier would and reports
/// its slots; a slot table that fails its checksum is reported and not repaired.
#[test]
fn a_cache_device_is_checked_once_no_disk_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap.img");
    let cache = dir.path().join("cap.cache");
    std::fs::write(&cap, vec![0u8; 16 << 20]).unwrap();
    let api = dir.path().join("api.sock");
    let mut daemon = serve(
        dir.path(),
        &format!(
            "path={},cache={},cache-size=4M,cache-mode=writeback",
            cap.display(),
            cache.display()
        ),
    );
    let body = format!(r#"{{"path": "{}"}}"#, cache.display());
    let (code, out, err) = strata(&[
        "--api",
        api.to_str().unwrap(),
        "raw",
        "POST",
        "/v1/images/check",
        "--data",
        &body,
    ]);
    assert!(
        code != 0 && err.contains("409") && err.contains("cache device of disk"),
        "{out}{err}"
    );
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{}", daemon.output());

    let path = cache.to_str().unwrap();
    let (code, out, err) = strata(&["image", "check", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("No errors were found"), "{out}");
    assert!(out.contains("of the cache slots in use"), "{out}");
    let (code, out, _) = strata(&["--json", "image", "check", path]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "strata-cache", "{v}");
    assert_eq!(v["image-end-offset"], 4 << 20, "{v}");
    assert!(v["total-clusters"].as_u64().unwrap() > 0, "{v}");

    // Damage the live slot table: the tier would refuse it, and the check says so (exit 2,
    // nothing repaired).
    let layout = storage_core::tier::Layout::for_size(4 << 20, 4096).unwrap();
    let f = std::fs::File::options().write(true).open(&cache).unwrap();
    for region in 0..2 {
        f.write_all_at(&[0xa5; 64], layout.map_offset(region))
            .unwrap();
    }
    drop(f);
    let (code, out, err) = strata(&["image", "check", "--repair", "all", path]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains("not repairable"), "{out}");
}
