//! `check` (and `strata image check`) against `qemu-img check` on images damaged in known
//! ways: a refcount too high (a leak), one too low (a cluster in use that could be handed
//! out again), an L2 entry pointing past the end of the file, and two L2 entries sharing a
//! cluster. Our verdict agrees with qemu-img's; after our repair qemu-img finds the image
//! clean and reads the data that survived as before.

use std::os::unix::fs::FileExt;
use std::path::Path;

use storage_core::qcow2::check::{check, Repair};
use testkit::tools::{qemu_img, qemu_img_check, qemu_img_ok};

const CLUSTER: u64 = 65536;

fn be64(f: &std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn put64(f: &std::fs::File, at: u64, v: u64) {
    f.write_all_at(&v.to_be_bytes(), at).unwrap();
}

/// Runs one qemu-io command (`write -P ...`) on the qcow2 image `img`.
fn qemu_io_write(img: &Path, command: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", command, img.to_str().unwrap()])
        .output()
        .expect("qemu-io (Debian's qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An image of 4 MiB with its first 1 MiB written (16 data clusters).
fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    qemu_img_ok(&["create", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    qemu_io_write(&img, "write -P 0x5a 0 1M");
    img
}

/// Where things are: the first L2 table, and the refcount block (16-bit refcounts).
struct Layout {
    l2: u64,
    refblock: u64,
}

fn layout(f: &std::fs::File) -> Layout {
    let l1 = be64(f, 40);
    let rt = be64(f, 48);
    Layout {
        l2: be64(f, l1) & 0x00ff_ffff_ffff_fe00,
        refblock: be64(f, rt),
    }
}

fn refcount_at(f: &std::fs::File, l: &Layout, host: u64) -> u64 {
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, l.refblock + host / CLUSTER * 2)
        .unwrap();
    u64::from(u16::from_be_bytes(b))
}

fn set_refcount(f: &std::fs::File, l: &Layout, host: u64, v: u16) {
    f.write_all_at(&v.to_be_bytes(), l.refblock + host / CLUSTER * 2)
        .unwrap();
}

/// A fresh image (`image`) with `damage` done to it, synced.
fn damaged(dir: &Path, name: &str, damage: impl Fn(&std::fs::File, &Layout)) -> std::path::PathBuf {
    let img = image(dir, name);
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    damage(&f, &layout(&f));
    f.sync_all().unwrap();
    img
}

/// A cluster past everything, with a refcount: leaked.
fn leak_a_cluster(f: &std::fs::File, l: &Layout) {
    let end = f.metadata().unwrap().len().div_ceil(CLUSTER) * CLUSTER;
    f.set_len(end + CLUSTER).unwrap();
    set_refcount(f, l, end, 1);
}

/// qemu-img check's exit code and its JSON report.
fn qemu_check(img: &Path) -> (i32, serde_json::Value) {
    let out = qemu_img(&["check", "--output=json", img.to_str().unwrap()]);
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap_or(-1), v)
}

/// Damages a fresh image with `damage`, and checks that our verdict agrees with qemu-img's
/// (`expect`: 2 corrupt, 3 leaks only), then that our repair leaves it clean for qemu-img.
fn case(
    dir: &Path,
    name: &str,
    expect: i32,
    repair: Repair,
    damage: impl Fn(&std::fs::File, &Layout),
) {
    let img = damaged(dir, name, damage);
    let (code, theirs) = qemu_check(&img);
    assert_eq!(code, expect, "{name}: qemu-img check: {theirs}");
    let ours = check(&img, Repair::None).unwrap();
    assert_eq!(
        i32::from(ours.exit_code()),
        code,
        "{name}: ours {ours:?}, qemu-img's {theirs}"
    );
    assert_eq!(
        ours.leaks,
        theirs["leaks"].as_u64().unwrap_or(0),
        "{name}: leaks: ours {ours:?}, qemu-img's {theirs}"
    );
    assert_eq!(
        ours.corruptions > 0,
        theirs["corruptions"].as_u64().unwrap_or(0) > 0,
        "{name}"
    );
    let fixed = check(&img, repair).unwrap();
    assert_eq!(fixed.exit_code(), 0, "{name}: after our repair: {fixed:?}");
    assert!(
        fixed.corruptions_fixed + fixed.leaks_fixed > 0,
        "{name}: {fixed:?}"
    );
    qemu_img_check(&img, false);
}

#[test]
fn damaged_images_get_qemu_imgs_verdict_and_our_repair_satisfies_it() {
    let dir = tempfile::tempdir().unwrap();
    // A clean image is clean for both.
    let img = image(dir.path(), "clean.qcow2");
    let r = check(&img, Repair::None).unwrap();
    assert_eq!((r.exit_code(), r.corruptions, r.leaks), (0, 0, 0), "{r:?}");
    assert_eq!(r.allocated_clusters, 16);

    // A cluster nothing uses with a refcount: a leak; repaired with "leaks".
    case(dir.path(), "leak.qcow2", 3, Repair::Leaks, leak_a_cluster);
    // A data cluster's refcount too high: a leak, and its COPIED flag now wrong (a
    // corruption for both checkers); repaired with "all".
    case(dir.path(), "high.qcow2", 2, Repair::All, |f, l| {
        let host = be64(f, l.l2) & 0x00ff_ffff_ffff_fe00;
        set_refcount(f, l, host, 2);
    });
    // A data cluster in use with refcount 0: a corruption; repaired with "all".
    case(dir.path(), "low.qcow2", 2, Repair::All, |f, l| {
        let host = be64(f, l.l2 + 8) & 0x00ff_ffff_ffff_fe00;
        set_refcount(f, l, host, 0);
    });
    // An L2 entry past the end of the file.
    case(dir.path(), "outside.qcow2", 2, Repair::All, |f, l| {
        let end = f.metadata().unwrap().len().div_ceil(CLUSTER) * CLUSTER;
        put64(f, l.l2 + 3 * 8, (end + 64 * CLUSTER) | 1 << 63);
    });
    // Two entries sharing one cluster (the second's own cluster leaks).
    case(dir.path(), "overlap.qcow2", 2, Repair::All, |f, l| {
        let first = be64(f, l.l2);
        put64(f, l.l2 + 5 * 8, first);
        assert_eq!(refcount_at(f, l, first & 0x00ff_ffff_ffff_fe00), 1);
    });
}

/// Images of every layout qemu-img makes, with data, a compressed image, and one with an
/// internal snapshot: clean for both checkers (`qemu_img_check` runs ours beside it).
#[test]
fn clean_images_of_every_layout_are_clean_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let layouts: &[&[&str]] = &[
        &["-o", "compat=0.10"],
        &["-o", "refcount_bits=1"],
        &["-o", "refcount_bits=64"],
        &["-o", "cluster_size=4096"],
        &["-o", "cluster_size=2M"],
    ];
    for (i, opts) in layouts.iter().enumerate() {
        let img = dir.path().join(format!("l{i}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.extend([img.to_str().unwrap(), "8M"]);
        qemu_img_ok(&args);
        qemu_io_write(&img, "write -P 0x33 64k 3M");
        qemu_img_check(&img, false);
    }
    let raw = dir.path().join("data.raw");
    std::fs::write(
        &raw,
        (0..4 << 20)
            .map(|i: u32| (i / 512) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let compressed = dir.path().join("c.qcow2");
    qemu_img_ok(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        compressed.to_str().unwrap(),
    ]);
    qemu_img_check(&compressed, false);
    let snapped = image(dir.path(), "snapped.qcow2");
    qemu_img_ok(&["snapshot", "-c", "one", snapped.to_str().unwrap()]);
    qemu_io_write(&snapped, "write -P 0x77 0 256k");
    qemu_img_check(&snapped, false);
}

#[test]
fn a_leak_repair_never_leaves_a_corruption_and_unknown_layouts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Refcount 2, COPIED clear: consistent flags, one leaked reference. Lowered to 1, the
    // flag must be set too.
    case(dir.path(), "leak-copied.qcow2", 3, Repair::Leaks, |f, l| {
        let e = be64(f, l.l2);
        set_refcount(f, l, e & 0x00ff_ffff_ffff_fe00, 2);
        put64(f, l.l2, e & !(1 << 63));
    });
    let extl2 = dir.path().join("extl2.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        extl2.to_str().unwrap(),
        "4M",
    ]);
    let e = check(&extl2, Repair::None).unwrap_err().to_string();
    assert!(e.contains("subclusters"), "{e}");
}

/// An image qemu-storage-daemon has open (its locks held) is not repaired.
#[test]
fn an_image_qemu_holds_is_not_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let img = damaged(dir.path(), "held.qcow2", leak_a_cluster);
    let mut qsd = testkit::daemon::qsd_serving_qcow2(&img, &dir.path().join("qsd.sock"));
    let e = check(&img, Repair::Leaks).unwrap_err().to_string();
    assert!(e.contains("QEMU"), "{e}");
    qsd.terminate().unwrap();
    assert_eq!(check(&img, Repair::Leaks).unwrap().exit_code(), 0);
}
