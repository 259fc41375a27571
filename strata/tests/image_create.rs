//! `strata image create`: an encrypted qcow2 image that qemu-img opens with the key and
//! finds clean; a LUKS1 image qemu-img and cryptsetup open; a LUKS2 image (4 KiB sectors)
//! that cryptsetup dumps, takes the passphrase of and adds a keyslot to, whose new
//! passphrase then opens it in our node onto what we wrote; bad input answered with one
//! line and exit 2.

use std::path::Path;

use storage_core::disk::{Disk, DiskOp, IoVecs};
use testkit::tools::{cryptsetup_ok, qemu_img, qemu_img_ok};
use testkit::workload::{key_file, open, run};

const PASS: &str = "a passphrase for image create";
const MIB: u64 = 1 << 20;

fn strata(args: &[&str]) -> (i32, String, String) {
    testkit::daemon::strata_local(args)
}

fn create_ok(args: &[&str]) -> String {
    let mut all = vec!["image", "create"];
    all.extend_from_slice(args);
    let (code, out, err) = strata(&all);
    assert_eq!(code, 0, "strata {all:?}: {err}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_encrypted_qcow2_image_opens_in_qemu_img_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let img = dir.path().join("vm.qcow2");
    let out = create_ok(&[
        s(&img),
        "8M",
        "--format",
        "qcow2",
        "--key-file",
        s(&key),
        "--iter-time",
        "10",
    ]);
    assert!(out.contains("encrypt.format=luks"), "{out}");
    let info = qemu_img(&["info", "--output=json", s(&img)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["encrypted"], true, "{info}");
    assert_eq!(info["virtual-size"], 8 * MIB, "{info}");
    let secret = format!("secret,id=sec0,file={}", key.display());
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        img.display()
    );
    let check = qemu_img(&["check", "--object", &secret, "--image-opts", &opts]);
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // What our node writes into it, qemu-img decrypts with the key.
    let data: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8).collect();
    {
        let disk = open(&format!(
            "path={},format=qcow2,key-file={}",
            img.display(),
            key.display()
        ))
        .unwrap();
        let mut q = disk.new_queue(4).unwrap();
        let (r, _) = run(
            &mut q,
            DiskOp::Write {
                offset: 3 * MIB,
                buffers: IoVecs::from_bytes(&data),
            },
        );
        assert_eq!(r, MIB as i32);
        assert_eq!(run(&mut q, DiskOp::Flush).0, 0);
    }
    qemu_img_ok(&[
        "convert",
        "--object",
        &secret,
        "--image-opts",
        &opts,
        "-O",
        "raw",
        s(&dir.path().join("out.raw")),
    ]);
    let mut want = vec![0u8; 8 << 20];
    want[3 << 20..4 << 20].copy_from_slice(&data);
    assert!(std::fs::read(dir.path().join("out.raw")).unwrap() == want);
}

#[test]
fn luks_images_open_in_qemu_img_and_cryptsetup() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let v1 = dir.path().join("v1.luks");
    create_ok(&[
        s(&v1),
        "4M",
        "--format",
        "luks",
        "--key-file",
        s(&key),
        "--iter-time",
        "10",
    ]);
    let dump = cryptsetup_ok(&["luksDump", s(&v1)]);
    assert!(dump.contains("Version:       \t1"), "{dump}");
    cryptsetup_ok(&["open", "--test-passphrase", "--key-file", s(&key), s(&v1)]);
    let info = qemu_img(&[
        "info",
        "--output=json",
        "--object",
        &format!("secret,id=sec0,file={}", key.display()),
        "--image-opts",
        &format!("driver=luks,key-secret=sec0,file.filename={}", v1.display()),
    ]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&info.stderr)));
    assert_eq!(info["virtual-size"], 4 * MIB, "{info}");

    let v2 = dir.path().join("v2.luks");
    create_ok(&[
        s(&v2),
        "4M",
        "--format",
        "luks",
        "--luks-version",
        "2",
        "--sector-size",
        "4096",
        "--key-file",
        s(&key),
        "--iter-time",
        "10",
    ]);
    let dump = cryptsetup_ok(&["luksDump", s(&v2)]);
    assert!(dump.contains("Version:       \t2"), "{dump}");
    assert!(dump.contains("sector: 4096"), "{dump}");
    // Its keyslot as cryptsetup makes LUKS2 ones: Argon2id.
    assert!(dump.contains("PBKDF:      argon2id"), "{dump}");
    cryptsetup_ok(&["open", "--test-passphrase", "--key-file", s(&key), s(&v2)]);
    // What we write with our passphrase, a passphrase cryptsetup adds reads back: both
    // unwrap the one master key.
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    {
        let disk = open(&format!(
            "path={},format=luks,key-file={}",
            v2.display(),
            key.display()
        ))
        .unwrap();
        assert_eq!(disk.info().capacity.get(), 4 * MIB);
        let mut q = disk.new_queue(4).unwrap();
        let (r, _) = run(
            &mut q,
            DiskOp::Write {
                offset: MIB,
                buffers: IoVecs::from_bytes(&data),
            },
        );
        assert_eq!(r, MIB as i32);
        assert_eq!(run(&mut q, DiskOp::Flush).0, 0);
    }
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = key_file(&other_dir, "another passphrase");
    cryptsetup_ok(&[
        "luksAddKey",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        s(&key),
        s(&v2),
        s(&other),
    ]);
    let disk = open(&format!(
        "path={},format=luks,key-file={}",
        v2.display(),
        other.display()
    ))
    .unwrap();
    let mut q = disk.new_queue(4).unwrap();
    let (r, back) = run(
        &mut q,
        DiskOp::Read {
            offset: MIB,
            buffers: IoVecs::owned(&[MIB as usize]),
        },
    );
    assert_eq!(r, MIB as i32);
    assert!(back.unwrap().to_vec() == data);
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let taken = dir.path().join("taken.qcow2");
    std::fs::write(&taken, b"mine").unwrap();
    let loose = dir.path().join("loose.key");
    std::fs::write(&loose, PASS).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let new = dir.path().join("new.img");
    for (args, says) in [
        (vec![s(&taken), "1M", "--format", "qcow2"], "exists"),
        (vec![s(&new), "1M", "--format", "luks"], "--key-file"),
        (vec![s(&new), "lots", "--format", "qcow2"], "size"),
        (
            vec![s(&new), "1M", "--format", "luks", "--key-file", s(&loose)],
            "loose.key",
        ),
        (
            vec![s(&new), "1M", "--format", "qcow2", "--cluster-size", "3K"],
            "cluster size",
        ),
        (
            vec![
                s(&new),
                "1M",
                "--format",
                "qcow2",
                "--key-file",
                s(&key),
                "--cluster-size",
                "512",
            ],
            "4 KiB",
        ),
    ] {
        let mut all = vec!["image", "create"];
        all.extend_from_slice(&args);
        let (code, _, err) = strata(&all);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains(PASS), "{err}");
    }
    assert!(!new.exists(), "a refused image is not left behind");
    assert_eq!(std::fs::read(&taken).unwrap(), b"mine");
}
