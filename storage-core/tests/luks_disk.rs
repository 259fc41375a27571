//! The `luks` node against its oracles: LUKS1 images made by `qemu-img` and by `cryptsetup`
//! open through the node with a key file; what a random workload writes through it (buffers
//! split mid-sector, write-zeroes of many pieces, discards) reads back the same, and
//! `qemu-img convert` decrypts the image to what was written. Over a tier, neither the
//! cache file nor the image holds a byte of plaintext. Bad keys and key files are refused
//! by name, without the secret.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use storage_core::disk::{Disk, DiskOp, DiskQueue, IoVecs};
use testkit::tools::{qemu_img_ok, require_tool};
use testkit::workload::{
    complete, key_file, open, random_workload, random_workload_in, read, read_all, run, split, Rng,
};

const PASS: &str = "correct horse battery staple";
const MIB: u64 = 1 << 20;

/// The image decrypted by qemu-img (`-U`: the node may still hold it open).
fn qemu_img_plain(img: &Path, key: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("plain.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img_ok(&[
        "convert",
        "-U",
        "--object",
        &format!("secret,id=sec0,file={}", key.display()),
        "--image-opts",
        &format!(
            "driver=luks,key-secret=sec0,file.filename={}",
            img.display()
        ),
        "-O",
        "raw",
        out.to_str().unwrap(),
    ]);
    std::fs::read(&out).unwrap()
}

fn qemu_img_luks(img: &Path, key: &Path, size: u64) {
    let args = [
        "create",
        "-q",
        "--object",
        &format!("secret,id=sec0,file={}", key.display()),
        "-f",
        "luks",
        "-o",
        "key-secret=sec0,iter-time=10",
        img.to_str().unwrap(),
        &size.to_string(),
    ];
    testkit::tools::qemu_img_luks(&args, img);
}

fn cryptsetup_luks1(img: &Path, key: &Path, size: u64) {
    let bin = require_tool("cryptsetup").unwrap_or_else(|e| panic!("{e}"));
    // cryptsetup puts a LUKS1 payload at 2 MiB (4096 sectors).
    std::fs::write(img, vec![0u8; (size + 2 * MIB) as usize]).unwrap();
    let out = Command::new(bin)
        .args(["luksFormat", "--batch-mode", "--type", "luks1"])
        .args(["--pbkdf-force-iterations", "1000", "--key-file"])
        .arg(key)
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cryptsetup luksFormat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn images_qemu_img_and_cryptsetup_make_serve_through_the_node_as_qemu_img_reads_them() {
    type Maker = fn(&Path, &Path, u64);
    for (name, make) in [
        ("qemu-img", qemu_img_luks as Maker),
        ("cryptsetup", cryptsetup_luks1),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), PASS);
        let img = dir.path().join("disk.luks");
        let size = 4 * MIB;
        make(&img, &key, size);
        let spec = format!(
            "path={},format=luks,key-file={}",
            img.display(),
            key.display()
        );
        let disk = open(&spec).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(disk.info().capacity.get(), size, "{name}");
        assert_eq!(disk.describe(), "luks(raw)");
        let mut q = disk.new_queue(8).unwrap();
        // Before any write, both decrypt what the maker left (noise) the same way.
        let mut model = read_all(&mut q, size);
        assert!(model == qemu_img_plain(&img, &key, dir.path()), "{name}");
        random_workload(&mut q, &mut model, 11, 300);
        assert!(
            read_all(&mut q, size) == model,
            "{name}: reads after writes"
        );
        drop(q);
        drop(disk);
        assert!(
            qemu_img_plain(&img, &key, dir.path()) == model,
            "{name}: qemu-img reads what was written otherwise"
        );
    }
}

/// Every 512-byte sector of the data is different and recognisable: "secret-NNNNNNNN" over
/// and over.
fn plaintext(len: usize) -> Vec<u8> {
    (0..len / 16)
        .flat_map(|i| format!("secret-{i:08x}!").into_bytes())
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn over_a_tier_the_cache_and_the_image_hold_ciphertext_only() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let img = dir.path().join("disk.luks");
    let cache = dir.path().join("cache.img");
    let size = 4 * MIB;
    qemu_img_luks(&img, &key, size);
    let spec = format!(
        "path={},format=luks,key-file={},cache={},cache-size=8M,cache-mode=writeback,seq-cutoff=4G",
        img.display(),
        key.display(),
        cache.display()
    );
    let data = plaintext(2 * MIB as usize);
    {
        let disk = open(&spec).unwrap();
        assert_eq!(disk.describe(), "luks(tier(raw, cache))");
        let mut q = disk.new_queue(8).unwrap();
        for (i, chunk) in data.chunks(64 << 10).enumerate() {
            let (r, _) = run(
                &mut q,
                DiskOp::Write {
                    offset: (i * chunk.len()) as u64,
                    buffers: IoVecs::from_bytes(chunk),
                },
            );
            assert_eq!(r, chunk.len() as i32);
        }
        assert_eq!(run(&mut q, DiskOp::Flush).0, 0);
        let mut rng = Rng(1);
        assert!(read(&mut q, &mut rng, 0, data.len()) == data);
        // The cache holds what was written, not yet written back.
        let m = disk.tier_metrics().expect("a tier under the luks node");
        let dirty = m.dirty_blocks.load(std::sync::atomic::Ordering::Relaxed);
        assert!(dirty > 0, "the writes went around the cache");
    }
    for file in [&cache, &img] {
        let bytes = std::fs::read(file).unwrap();
        assert!(
            !contains(&bytes, b"secret-0000"),
            "{} holds plaintext",
            file.display()
        );
    }
    // And the disk reads back through a fresh open.
    let disk = open(&spec).unwrap();
    let mut q = disk.new_queue(8).unwrap();
    let mut rng = Rng(2);
    assert!(read(&mut q, &mut rng, 0, data.len()) == data);
}

#[test]
fn many_requests_in_flight_and_writes_larger_than_a_piece() {
    use storage_core::crypto::PIECE;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let img = dir.path().join("disk.luks");
    let size = 16 * MIB;
    qemu_img_luks(&img, &key, size);
    let spec = format!(
        "path={},format=luks,key-file={}",
        img.display(),
        key.display()
    );
    let disk = open(&spec).unwrap();
    let mut q = disk.new_queue(16).unwrap();
    let mut model = read_all(&mut q, size);
    let mut rng = Rng(5);
    // Eight writes and four write-zeroes at once, each in its own MiB-aligned region, some
    // of several pieces; then twelve reads at once.
    let region = 4 * MIB / 3 / 4096 * 4096;
    let mut ops = Vec::new();
    for tag in 0..12u64 {
        let offset = tag * region;
        let len = match tag % 4 {
            0 => PIECE + 4096,
            1 => 2 * PIECE / 3 / 512 * 512,
            _ => (rng.below(64) + 1) * 512,
        }
        .min(region);
        let o = offset as usize;
        let op = if tag < 8 {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            model[o..o + len as usize].copy_from_slice(&data);
            let mut buffers = split(&mut rng, len as usize);
            buffers.copy_from(0, &data);
            DiskOp::Write { offset, buffers }
        } else {
            model[o..o + len as usize].fill(0);
            DiskOp::WriteZeroes {
                offset,
                len,
                unmap: false,
            }
        };
        q.start(op, tag)
            .unwrap_or_else(|r| panic!("refused: {}", r.error));
        ops.push((tag, len));
    }
    let mut left: std::collections::HashMap<u64, u64> = ops.into_iter().collect();
    for c in complete(&mut q, left.len()) {
        let len = left.remove(&c.tag).expect("each tag completes once");
        let want = if c.tag < 8 { len as i32 } else { 0 };
        assert_eq!(c.result, want, "tag {}", c.tag);
    }
    assert_eq!(q.in_flight(), 0);
    for tag in 0..12u64 {
        let len = region.min(2 * PIECE) / 512 * 512;
        let op = DiskOp::Read {
            offset: tag * region,
            buffers: split(&mut rng, len as usize),
        };
        q.start(op, tag)
            .unwrap_or_else(|r| panic!("refused: {}", r.error));
    }
    for c in complete(&mut q, 12) {
        let o = (c.tag * region) as usize;
        let got = c.buffers.unwrap().to_vec();
        assert_eq!(c.result, got.len() as i32);
        assert!(got == model[o..o + got.len()], "tag {}", c.tag);
    }
    drop(q);
    drop(disk);
    assert!(qemu_img_plain(&img, &key, dir.path()) == model);
}

#[test]
fn direct_and_read_only_disks() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let img = dir.path().join("disk.luks");
    qemu_img_luks(&img, &key, 4 * MIB);
    let base = format!(
        "path={},format=luks,key-file={}",
        img.display(),
        key.display()
    );
    // O_DIRECT: the header is read in aligned blocks; whole aligned buffers go through.
    let data: Vec<u8> = (0..64 << 10).map(|i| (i * 7 % 251) as u8).collect();
    {
        let disk = open(&format!("{base},direct=on")).unwrap();
        assert!(disk.info().direct);
        let mut q = disk.new_queue(4).unwrap();
        let (r, _) = run(
            &mut q,
            DiskOp::Write {
                offset: 8192,
                buffers: IoVecs::from_bytes(&data),
            },
        );
        assert_eq!(r, data.len() as i32);
        let (r, b) = run(
            &mut q,
            DiskOp::Read {
                offset: 8192,
                buffers: IoVecs::owned(&[data.len()]),
            },
        );
        assert_eq!(r, data.len() as i32);
        assert!(b.unwrap().to_vec() == data);
    }
    // Read-only: reads decrypt, writes are refused before they reach the node.
    let disk = open(&format!("{base},readonly=on")).unwrap();
    assert!(disk.info().read_only);
    let mut q = disk.new_queue(4).unwrap();
    let mut rng = Rng(3);
    assert!(read(&mut q, &mut rng, 8192, data.len()) == data);
    let e = q
        .start(
            DiskOp::Write {
                offset: 0,
                buffers: IoVecs::from_bytes(&[0u8; 512]),
            },
            0,
        )
        .expect_err("a write to a read-only disk");
    assert_eq!(e.error, storage_core::disk::StartError::ReadOnly);
    assert!(disk.write_at(&[0u8; 512], 0).is_err());
}

#[test]
fn bad_keys_and_key_files_are_refused_by_name_without_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let img = dir.path().join("disk.luks");
    qemu_img_luks(&img, &key, MIB);
    let spec = |k: &Path| {
        format!(
            "path={},format=luks,key-file={}",
            img.display(),
            k.display()
        )
    };

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not the passphrase").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = open(&spec(&wrong))
        .err()
        .expect("a wrong passphrase opens nothing");
    assert!(e.contains("no keyslot opens"), "{e}");
    assert!(!e.contains("not the passphrase"), "{e}");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = open(&spec(&key)).err().expect("a key file others can read");
    assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
    assert!(!e.contains(PASS), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(open(&spec(&key)).is_ok());

    // Not a LUKS image.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; MIB as usize]).unwrap();
    let e = open(&format!(
        "path={},format=luks,key-file={}",
        raw.display(),
        key.display()
    ))
    .err()
    .expect("a raw file is no LUKS image");
    assert!(e.contains("not a LUKS image"), "{e}");

    for (spec, needle) in [
        (
            format!("path={},format=luks", img.display()),
            "needs key-file=",
        ),
        (
            format!("path={},key-file={}", img.display(), key.display()),
            "for format=luks",
        ),
    ] {
        let e = open(&spec).err().expect("refused");
        assert!(e.contains(needle), "{spec}: {e}");
    }
}

/// Runs cryptsetup, which must succeed.
fn cryptsetup(args: &[&str]) {
    testkit::tools::cryptsetup_ok(args);
}

/// A LUKS2 image that cryptsetup encrypted in place from `plain` (its offline
/// reencryption, which runs in user space here, where device-mapper does not exist):
/// the header and keyslots take the first 16 MiB and the data follows.
fn cryptsetup_luks2_from(img: &Path, key: &Path, plain: &[u8], sector: &str, kdf: &[&str]) {
    let mut data = plain.to_vec();
    data.resize(plain.len() + (32 << 20), 0);
    std::fs::write(img, &data).unwrap();
    let key = key.to_str().unwrap();
    let mut args = vec![
        "reencrypt",
        "--encrypt",
        "--batch-mode",
        "--type",
        "luks2",
        "--reduce-device-size",
        "32M",
        "--sector-size",
        sector,
        "--key-file",
        key,
    ];
    args.extend_from_slice(kdf);
    args.push(img.to_str().unwrap());
    cryptsetup(&args);
}

#[test]
fn luks2_images_cryptsetup_encrypts_read_back_through_the_node() {
    let plain = plaintext(8 * MIB as usize);
    for (sector, kdf) in [
        (
            "512",
            &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"][..],
        ),
        (
            "4096",
            &[
                "--pbkdf",
                "argon2id",
                "--pbkdf-memory",
                "16384",
                "--pbkdf-parallel",
                "2",
                "--pbkdf-force-iterations",
                "4",
            ][..],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), PASS);
        let img = dir.path().join("disk.luks2");
        cryptsetup_luks2_from(&img, &key, &plain, sector, kdf);
        let spec = format!(
            "path={},format=luks,key-file={}",
            img.display(),
            key.display()
        );
        let disk = open(&spec).unwrap_or_else(|e| panic!("sector {sector}: {e}"));
        assert_eq!(disk.block_size(), sector.parse::<u32>().unwrap());
        let size = disk.info().capacity.get();
        assert!(size >= plain.len() as u64, "sector {sector}: {size} bytes");
        let mut q = disk.new_queue(8).unwrap();
        let got = read_all(&mut q, plain.len() as u64);
        assert!(
            got == plain,
            "sector {sector}: cryptsetup encrypted something else"
        );
        // Requests smaller than a sector are refused, not half done.
        if sector == "4096" {
            let (r, _) = run(
                &mut q,
                DiskOp::Read {
                    offset: 512,
                    buffers: IoVecs::owned(&[512]),
                },
            );
            assert_eq!(r, -libc::EINVAL);
        }
        // What we write reads back, and cryptsetup still takes the key.
        let mut model = read_all(&mut q, size);
        let sectors = sector.parse::<u64>().unwrap();
        random_workload_in(&mut q, &mut model, 21, 200, sectors);
        drop(q);
        drop(disk);
        let disk = open(&spec).unwrap();
        let mut q = disk.new_queue(8).unwrap();
        assert!(
            read_all(&mut q, size) == model,
            "sector {sector}: after reopening"
        );
        cryptsetup(&[
            "open",
            "--test-passphrase",
            "--key-file",
            key.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
    }
}

#[test]
fn a_luks2_image_opens_from_either_header_copy_and_not_from_neither() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let img = dir.path().join("disk.luks2");
    let plain = plaintext(MIB as usize);
    cryptsetup_luks2_from(
        &img,
        &key,
        &plain,
        "512",
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    );
    let spec = format!(
        "path={},format=luks,key-file={}",
        img.display(),
        key.display()
    );
    let reads_plain = |what: &str| {
        let disk = open(&spec).unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut q = disk.new_queue(8).unwrap();
        assert!(read_all(&mut q, plain.len() as u64) == plain, "{what}");
    };
    let damage = |at: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(b"XX", at).unwrap();
    };
    // The first copy's JSON, then the second copy's (at 16 KiB, cryptsetup's default).
    damage(4096 + 10);
    reads_plain("the first copy damaged");
    damage(16384 + 4096 + 10);
    let e = open(&spec).err().expect("both copies damaged");
    assert!(e.contains("neither copy"), "{e}");

    let img2 = dir.path().join("other.luks2");
    cryptsetup_luks2_from(
        &img2,
        &key,
        &plain,
        "512",
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    );
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not it").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = open(&format!(
        "path={},format=luks,key-file={}",
        img2.display(),
        wrong.display()
    ))
    .err()
    .expect("a wrong passphrase");
    assert!(e.contains("no keyslot opens"), "{e}");
}
