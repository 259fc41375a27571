//! Encrypted qcow2 images (LUKS inside qcow2, QEMU's `encrypt.format=luks`) against
//! `qemu-img`: images qemu-img makes serve through our qcow2 node and read what qemu-img
//! wrote; what a random workload writes through the node (partial clusters over a backing
//! chain, write-zeroes, discards, many requests in flight) `qemu-img convert` decrypts the
//! same, and `qemu-img check` finds the image consistent. Images we create and snapshots
//! we take open in qemu-img with the same passphrase. No file holds plaintext.

use std::path::{Path, PathBuf};

use storage_core::crypto::KeyslotCost;
use storage_core::disk::graph::GraphSpec;
use storage_core::disk::lock::conflicting_use;
use storage_core::disk::{open_disk, AnyDisk, Disk, DiskOp, DiskQueue, IoVecs};
use storage_core::qcow2::{self, CreateOptions, LuksHeader};
use testkit::tools::{qcow2_key_opts, qemu_img, qemu_img_decrypted, qemu_img_luks, qemu_img_ok};
use testkit::workload::{key_file, open, random_workload, read, read_all, run, Rng};

const PASS: &str = "correct horse battery staple";
const MIB: u64 = 1 << 20;

/// Every 16 bytes different and recognisable: "secret-NNNNNNNN" and `mark`.
fn marked(len: usize, mark: char) -> Vec<u8> {
    (0..len / 16)
        .flat_map(|i| format!("secret-{i:08x}{mark}").into_bytes())
        .collect()
}

fn plaintext(len: usize) -> Vec<u8> {
    marked(len, '!')
}

/// Whether any 16 bytes of `file` are plaintext [`marked`] wrote (ciphertext matches
/// "secret-" by chance once in 2^56 places).
fn holds_plaintext(file: &Path) -> bool {
    let bytes = std::fs::read(file).unwrap();
    bytes.windows(7).any(|w| w == b"secret-")
}

fn secret(key: &Path) -> String {
    format!("secret,id=sec0,file={}", key.display())
}

/// The image (and `below` encrypted images under it) decrypted by qemu-img.
fn qemu_img_plain(img: &Path, below: usize, key: &Path) -> Vec<u8> {
    qemu_img_decrypted(img, below, key)
        .unwrap_or_else(|| panic!("qemu-img cannot decrypt {}", img.display()))
}

/// `qemu-img check` (with the key) and our own checker find `img` clean.
fn check_clean(img: &Path, below: usize, key: &Path) {
    let opts = qcow2_key_opts(img, below);
    // -U: the node under test may still hold the image (flushed).
    let out = qemu_img(&[
        "check",
        "-U",
        "--output=json",
        "--object",
        &secret(key),
        "--image-opts",
        &opts,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {}: {text}{}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for field in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(v[field].as_u64().unwrap_or(0), 0, "{field}: {text}");
    }
    let ours = qcow2::check::check(img, qcow2::check::Repair::None).unwrap();
    assert_eq!(
        (ours.corruptions, ours.leaks, ours.check_errors),
        (0, 0, 0),
        "our check of {}: {:?}",
        img.display(),
        ours.messages
    );
}

/// `qemu-img convert` of `plain` (raw) into an encrypted qcow2 image.
fn qemu_img_encrypted(plain: &Path, img: &Path, key: &Path, cluster: u64) {
    let opts = format!(
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size={cluster}"
    );
    let args = [
        "convert",
        "--object",
        &secret(key),
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &opts,
        plain.to_str().unwrap(),
        img.to_str().unwrap(),
    ];
    qemu_img_luks(&args, img);
}

fn spec(img: &Path, key: &Path) -> String {
    format!(
        "path={},format=qcow2,key-file={}",
        img.display(),
        key.display()
    )
}

#[test]
fn images_qemu_img_encrypts_serve_through_the_node_and_qemu_img_reads_what_was_written() {
    for cluster in [4096, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), PASS);
        let size = 4 * MIB;
        // Three MiB of recognisable data, then one of zeroes (left unallocated).
        let mut plain = plaintext(3 * MIB as usize);
        plain.resize(size as usize, 0);
        let raw = dir.path().join("plain.raw");
        std::fs::write(&raw, &plain).unwrap();
        let img = dir.path().join("disk.qcow2");
        qemu_img_encrypted(&raw, &img, &key, cluster);
        assert!(!holds_plaintext(&img), "qemu-img wrote plaintext?");

        let disk = open(&spec(&img, &key)).unwrap_or_else(|e| panic!("{cluster}: {e}"));
        assert_eq!(disk.info().capacity.get(), size);
        let mut q = disk.new_queue(8).unwrap();
        let mut model = read_all(&mut q, size);
        assert!(
            model == plain,
            "cluster {cluster}: reads what qemu-img wrote"
        );
        random_workload(&mut q, &mut model, 17, 300);
        assert!(read_all(&mut q, size) == model, "cluster {cluster}");
        drop(q);
        drop(disk);
        assert!(
            qemu_img_plain(&img, 0, &key) == model,
            "cluster {cluster}: qemu-img reads what was written otherwise"
        );
        check_clean(&img, 0, &key);
        assert!(
            !holds_plaintext(&img),
            "cluster {cluster}: plaintext in the image"
        );
    }
}

/// An overlay qemu-img makes (a key of its own) over an encrypted base (another key, the
/// same passphrase) over a raw file: copy-on-write from every layer, each decrypted with
/// its own key and written encrypted with the overlay's.
#[test]
fn a_chain_of_images_with_their_own_keys_copies_on_write_through_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let size = 4 * MIB;
    let plain = plaintext(size as usize);
    let raw = dir.path().join("base.raw");
    std::fs::write(&raw, &plain).unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img_encrypted(&raw, &base, &key, 65536);
    let top = dir.path().join("top.qcow2");
    let args = [
        "create",
        "--object",
        &secret(&key),
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        top.to_str().unwrap(),
    ];
    qemu_img_luks(&args, &top);
    let disk = open(&spec(&top, &key)).unwrap();
    let mut q = disk.new_queue(8).unwrap();
    let mut model = read_all(&mut q, size);
    assert!(model == plain, "reads the base through the overlay");
    random_workload(&mut q, &mut model, 23, 200);
    drop(q);
    drop(disk);
    assert!(qemu_img_plain(&top, 1, &key) == model);
    check_clean(&top, 1, &key);
    for f in [&top, &base] {
        assert!(!holds_plaintext(f), "{}", f.display());
    }
}

fn create_encrypted(img: &Path, size: u64) {
    qcow2::create(
        img,
        &CreateOptions {
            size,
            cluster_size: 65536,
            backing: None,
            encryption: Some(LuksHeader::new(PASS.as_bytes(), 1000).unwrap()),
        },
    )
    .unwrap();
}

fn write_all(q: &mut impl DiskQueue, data: &[u8], from: u64) {
    for (i, chunk) in data.chunks(256 << 10).enumerate() {
        let offset = from + (i * (256 << 10)) as u64;
        let (r, _) = run(
            q,
            DiskOp::Write {
                offset,
                buffers: IoVecs::from_bytes(chunk),
            },
        );
        assert_eq!(r, chunk.len() as i32);
    }
    assert_eq!(run(q, DiskOp::Flush).0, 0);
}

fn luks_header_of(img: &Path) -> Vec<u8> {
    let bytes = std::fs::read(img).unwrap();
    let h = qcow2::Header::parse(&bytes[..65536], bytes.len() as u64).unwrap();
    let (at, len) = h.crypto.expect("an encrypted image");
    bytes[at as usize..(at + len) as usize].to_vec()
}

#[test]
fn images_we_make_and_their_snapshots_open_in_qemu_img_with_the_same_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let img = dir.path().join("disk.qcow2");
    let size = 4 * MIB;
    create_encrypted(&img, size);
    let info = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["encrypted"], true, "{info}");
    assert_eq!(info["format-specific"]["data"]["encrypt"]["format"], "luks");

    let mut model = plaintext(size as usize);
    let disk = open(&spec(&img, &key)).unwrap();
    let mut q = disk.new_queue(8).unwrap();
    write_all(&mut q, &model, 0);
    drop(q);
    assert!(!holds_plaintext(&img));
    assert!(qemu_img_plain(&img, 0, &key) == model);
    check_clean(&img, 0, &key);

    // A snapshot: the image as it was keeps the snapshot's name, a new image on top takes
    // the writes, encrypted with the same key (its LUKS header is the image's).
    let q2 = qcow2_node(&disk);
    let frozen = q2
        .commit_snapshot(q2.prepare_snapshot("s1").unwrap())
        .unwrap();
    assert_eq!(luks_header_of(&img), luks_header_of(&frozen));
    let mut q = disk.new_queue(8).unwrap();
    let second = marked(MIB as usize, '+');
    write_all(&mut q, &second, MIB + 4096);
    model[(MIB + 4096) as usize..(2 * MIB + 4096) as usize].copy_from_slice(&second);
    let mut rng = Rng(3);
    assert!(read(&mut q, &mut rng, 0, size as usize) == model);
    drop(q);
    drop(disk);
    for f in [&img, &frozen] {
        assert!(!holds_plaintext(f), "{}", f.display());
    }
    assert!(
        qemu_img_plain(&img, 1, &key) == model,
        "the chain in qemu-img"
    );
    check_clean(&img, 1, &key);
    // And the chain opens again through the node, with the one key file.
    let disk = open(&spec(&img, &key)).unwrap();
    let mut q = disk.new_queue(8).unwrap();
    assert!(read_all(&mut q, size) == model);
}

/// Sixteen writes, then sixteen reads, in flight at once on allocated clusters (the fast
/// path: each write encrypted in its own tag's buffer, each read decrypted in place).
#[test]
fn many_requests_in_flight_each_with_its_own_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let img = dir.path().join("disk.qcow2");
    let size = 4 * MIB;
    create_encrypted(&img, size);
    let disk = open(&spec(&img, &key)).unwrap();
    let mut q = disk.new_queue(16).unwrap();
    let mut model = vec![0u8; size as usize];
    write_all(&mut q, &model, 0);
    let mut rng = Rng(9);
    let mut datas = Vec::new();
    for tag in 0..16u64 {
        let offset = tag * (size / 16) + rng.below(64) * 512;
        let len = (1 + rng.below(128)) as usize * 512;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        q.start(
            DiskOp::Write {
                offset,
                buffers: IoVecs::from_bytes(&data),
            },
            tag,
        )
        .unwrap_or_else(|r| panic!("{}", r.error));
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        datas.push((offset, len, data));
    }
    q.submit().unwrap();
    let mut done = 0;
    while done < 16 {
        match q.pop_completion() {
            Some(c) => {
                let (_, len, data) = &datas[c.tag as usize];
                assert_eq!(c.result, *len as i32);
                assert!(
                    c.buffers.unwrap().to_vec() == *data,
                    "the guest's buffer changed"
                );
                done += 1;
            }
            None => q.wait().unwrap(),
        }
    }
    for (tag, (offset, len, _)) in datas.iter().enumerate() {
        let buffers = IoVecs::owned(&[*len / 2 + 1, *len - *len / 2 - 1]);
        q.start(
            DiskOp::Read {
                offset: *offset,
                buffers,
            },
            tag as u64,
        )
        .unwrap_or_else(|r| panic!("{}", r.error));
    }
    q.submit().unwrap();
    let mut done = 0;
    while done < 16 {
        match q.pop_completion() {
            Some(c) => {
                let (offset, len, _) = &datas[c.tag as usize];
                assert_eq!(c.result, *len as i32);
                let o = *offset as usize;
                assert!(
                    c.buffers.unwrap().to_vec() == model[o..o + len],
                    "tag {}",
                    c.tag
                );
                done += 1;
            }
            None => q.wait().unwrap(),
        }
    }
    drop(q);
    drop(disk);
    assert!(qemu_img_plain(&img, 0, &key) == model);
}

/// Control-plane reads and writes at any byte offset: partly covered sectors are read,
/// decrypted, patched and encrypted again.
#[test]
fn unaligned_control_plane_io_keeps_the_sectors_around_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let img = dir.path().join("disk.qcow2");
    let size = MIB;
    create_encrypted(&img, size);
    let disk = open(&spec(&img, &key)).unwrap();
    let mut model = plaintext(size as usize);
    disk.write_at(&model, 0).unwrap();
    let mut rng = Rng(41);
    for _ in 0..50 {
        let at = rng.below(size - 3000);
        let len = 1 + rng.below(2999) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        disk.write_at(&data, at).unwrap();
        model[at as usize..at as usize + len].copy_from_slice(&data);
        let (a, l) = (rng.below(size - 3000), 1 + rng.below(2999) as usize);
        let mut got = vec![0u8; l];
        disk.read_at(&mut got, a).unwrap();
        assert!(
            got == model[a as usize..a as usize + l],
            "read of {l} at {a}"
        );
    }
    disk.flush().unwrap();
    drop(disk);
    assert!(qemu_img_plain(&img, 0, &key) == model);
}

/// A plain image over an encrypted one (as `qemu-img create -b` without encryption
/// makes) opens with the base's key; a cache under an encrypted image is refused, since it
/// would hold plaintext.
#[test]
fn a_plain_overlay_takes_the_key_for_its_base_and_no_cache_goes_under_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let base = dir.path().join("base.qcow2");
    create_encrypted(&base, MIB);
    {
        let disk = open(&spec(&base, &key)).unwrap();
        disk.write_at(&plaintext(MIB as usize), 0).unwrap();
        disk.flush().unwrap();
    }
    let top = dir.path().join("top.qcow2");
    qcow2::create(
        &top,
        &CreateOptions {
            size: MIB,
            cluster_size: 65536,
            backing: Some(("base.qcow2".into(), "qcow2".into())),
            encryption: None,
        },
    )
    .unwrap();
    let disk = open(&spec(&top, &key)).unwrap();
    let mut q = disk.new_queue(4).unwrap();
    assert!(read_all(&mut q, MIB) == plaintext(MIB as usize));
    drop(q);
    drop(disk);
    let no_key = open(&format!("path={},format=qcow2", top.display()))
        .err()
        .unwrap();
    assert!(no_key.contains("encrypted"), "{no_key}");
    let cached = format!(
        "{},cache={},cache-size=4M",
        spec(&base, &key),
        dir.path().join("cache.img").display()
    );
    let e = open(&cached).err().unwrap();
    assert!(e.contains("plaintext"), "{e}");
    assert!(
        !dir.path().join("cache.img").exists(),
        "a refused cache is not made"
    );
}

#[test]
fn a_wrong_or_missing_key_is_refused_by_name_without_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create_encrypted(&img, MIB);
    let no_key = open(&format!("path={},format=qcow2", img.display()))
        .err()
        .unwrap();
    assert!(no_key.contains("encrypted"), "{no_key}");
    let wrong = key_file(dir.path(), "not the passphrase");
    let e = open(&spec(&img, &wrong)).err().unwrap();
    assert!(e.contains("no keyslot opens"), "{e}");
    assert!(!e.contains("not the passphrase"), "{e}");
    // A key for an image that is not encrypted: refused, not ignored.
    let plain = dir.path().join("plain.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", plain.to_str().unwrap(), "1M"]);
    let e = open(&spec(&plain, &wrong)).err().unwrap();
    assert!(e.contains("no image of the chain is encrypted"), "{e}");
    // QEMU's names on a --blockdev graph, with the key by secret.
    let good = dir.path().join("good.key");
    std::fs::rename(key_file(dir.path(), PASS), &good).unwrap();
    let mut g = GraphSpec::default();
    g.add_object(&format!("secret,id=s0,file={}", good.display()))
        .unwrap();
    g.add_blockdev(&format!(
        "driver=file,node-name=f,filename={}",
        img.display()
    ))
    .unwrap();
    g.add_blockdev("driver=qcow2,node-name=q,file=f,encrypt.format=luks,encrypt.key-secret=s0")
        .unwrap();
    let disk = open_disk(&g.resolve("node=q").unwrap()).unwrap();
    assert_eq!(disk.info().capacity.get(), MIB);
}

/// A snapshot made ready before a passphrase change and put in place after it: the new
/// image takes the passphrases the disk takes then.
#[test]
fn a_snapshot_prepared_before_a_passphrase_change_takes_the_new_passphrase() {
    use storage_core::crypto::keyslots::KeyslotChanges;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), PASS);
    let img = dir.path().join("disk.qcow2");
    create_encrypted(&img, MIB);
    let disk = open(&spec(&img, &key)).unwrap();
    let q2 = qcow2_node(&disk);
    let prepared = q2.prepare_snapshot("s1").unwrap();
    q2.change_passphrase(PASS.as_bytes(), b"the new one", &KeyslotCost::minimal())
        .unwrap();
    let frozen = q2.commit_snapshot(prepared).unwrap();
    assert_eq!(luks_header_of(&img), luks_header_of(&frozen));
    drop(disk);
    let new_dir = dir.path().join("new");
    std::fs::create_dir(&new_dir).unwrap();
    let new = key_file(&new_dir, "the new one");
    let disk = open(&spec(&img, &new)).unwrap();
    assert_eq!(disk.info().capacity.get(), MIB);
    drop(disk);
    let e = open(&spec(&img, &key)).err().unwrap();
    assert!(e.contains("no keyslot opens"), "{e}");
}

fn write_luks_header(img: &Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let all = std::fs::read(img).unwrap();
    let h = qcow2::Header::parse(&all[..65536], all.len() as u64).unwrap();
    let (at, _) = h.crypto.unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// The qcow2 node `disk` is.
fn qcow2_node(disk: &AnyDisk) -> &qcow2::Qcow2Disk {
    match disk {
        AnyDisk::Qcow2(q) => q,
        _ => panic!("a qcow2 node"),
    }
}

/// An encrypted qcow2 image served in `dir` with one snapshot taken: the key file, the
/// image, its node and the snapshot's file.
fn encrypted_disk_with_snapshot(dir: &Path) -> (PathBuf, PathBuf, AnyDisk, PathBuf) {
    let key = key_file(dir, PASS);
    let img = dir.join("disk.qcow2");
    create_encrypted(&img, MIB);
    let disk = open(&spec(&img, &key)).unwrap();
    let q2 = qcow2_node(&disk);
    let s1 = q2
        .commit_snapshot(q2.prepare_snapshot("s1").unwrap())
        .unwrap();
    (key, img, disk, s1)
}

/// A keyslot change writes the snapshots' LUKS headers, so it is refused (nothing written
/// anywhere) while another program reads a snapshot, as a clone's backing file; it goes
/// through once the reader has gone, and the snapshot is a reader's again after it.
#[test]
fn a_passphrase_change_is_refused_while_a_snapshot_has_a_reader() {
    use storage_core::crypto::keyslots::KeyslotChanges;
    use storage_core::error::StorageErrorKind;
    let dir = tempfile::tempdir().unwrap();
    let (key, img, disk, s1) = encrypted_disk_with_snapshot(dir.path());
    let q2 = qcow2_node(&disk);
    let (top_before, s1_before) = (luks_header_of(&img), luks_header_of(&s1));
    let reader = open(&format!("{},readonly=on", spec(&s1, &key))).unwrap();
    let e = q2
        .change_passphrase(PASS.as_bytes(), b"the new one", &KeyslotCost::minimal())
        .expect_err("refused while the snapshot has a reader");
    assert_eq!(e.kind(), StorageErrorKind::InUse, "{e}");
    assert!(
        e.to_string().contains("disk@s1.qcow2: "),
        "names the snapshot's file: {e}"
    );
    assert_eq!(
        luks_header_of(&img),
        top_before,
        "the top's header unchanged"
    );
    assert_eq!(
        luks_header_of(&s1),
        s1_before,
        "the snapshot's header unchanged"
    );
    drop(reader);
    q2.change_passphrase(PASS.as_bytes(), b"the new one", &KeyslotCost::minimal())
        .unwrap();
    assert_eq!(luks_header_of(&img), luks_header_of(&s1));
    // Back to a reader's lock: another reader opens the snapshot.
    let new_dir = dir.path().join("new");
    std::fs::create_dir(&new_dir).unwrap();
    let new = key_file(&new_dir, "the new one");
    drop(open(&format!("{},readonly=on", spec(&s1, &new))).unwrap());
}

/// A snapshot delete changes the chain a keyslot change writes: a change is refused while
/// one is under way (from its copy to its file's removal), and goes through after one
/// ends, stopped or done.
#[test]
fn a_passphrase_change_is_refused_while_a_snapshot_is_deleted() {
    use storage_core::crypto::keyslots::KeyslotChanges;
    use storage_core::error::StorageErrorKind;
    let dir = tempfile::tempdir().unwrap();
    let (_, _, disk, s1) = encrypted_disk_with_snapshot(dir.path());
    let q2 = qcow2_node(&disk);
    let change = || q2.add_keyslot(PASS.as_bytes(), b"another", &KeyslotCost::minimal());
    assert!(
        q2.stream_snapshot("s1", &mut |_, _| false).is_err(),
        "stopped"
    );
    change().expect("a stopped delete is over");
    let mut prepared = q2.stream_snapshot("s1", &mut |_, _| true).unwrap();
    let e = change().expect_err("refused while a delete is under way");
    assert_eq!(e.kind(), StorageErrorKind::InUse, "{e}");
    assert!(e.to_string().contains("being deleted"), "{e}");
    q2.commit_delete(&mut prepared).unwrap();
    let e = change().expect_err("refused until the file is gone");
    assert_eq!(e.kind(), StorageErrorKind::InUse, "{e}");
    prepared.remove_file(true).unwrap();
    assert!(!s1.exists());
    change().unwrap();
    let (_, slots) = q2.keyslots().unwrap();
    assert_eq!(slots.len(), 3, "{slots:?}");
}

/// A disk closed (removed, or its daemon stopping) while a passphrase change runs lets go
/// of its images' locks only once the change has written every header (it holds the
/// snapshots for writing meanwhile), and no change starts after.
#[test]
fn a_disk_closes_after_a_running_passphrase_change() {
    use std::time::{Duration, Instant};
    use storage_core::crypto::keyslots::KeyslotChanges;
    let dir = tempfile::tempdir().unwrap();
    let (_, img, disk, s1) = encrypted_disk_with_snapshot(dir.path());
    let q2 = qcow2_node(&disk);
    let before = luks_header_of(&s1);
    std::thread::scope(|s| {
        let change = s.spawn(|| {
            // Key derivation fitted to a second, after the snapshot is claimed.
            q2.add_keyslot(PASS.as_bytes(), b"slow", &KeyslotCost::for_time(1000))
                .unwrap()
        });
        // The change has claimed the snapshot: a reader would be refused now.
        let began = Instant::now();
        while conflicting_use(&s1, true).unwrap().is_none() {
            assert!(
                !change.is_finished() && began.elapsed() < Duration::from_secs(10),
                "the change ended, or never claimed the snapshot, before this thread saw it"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        disk.close();
        let after = luks_header_of(&s1);
        assert_ne!(
            after, before,
            "the disk closed before the change wrote the snapshot"
        );
        assert_eq!(after, luks_header_of(&img));
        change.join().unwrap();
    });
    assert!(
        conflicting_use(&s1, false).unwrap().is_none()
            && conflicting_use(&img, false).unwrap().is_none(),
        "a lock stayed after the close"
    );
    let e = q2
        .add_keyslot(PASS.as_bytes(), b"late", &KeyslotCost::minimal())
        .expect_err("no change starts after the close");
    assert!(e.to_string().contains("stopped"), "{e}");
}

/// A passphrase change reaches the snapshots (their headers become the top's again, even
/// one a failed copy left behind); a chain image with a master key of its own is refused
/// by name.
#[test]
fn passphrase_changes_reach_every_image_holding_the_key() {
    use storage_core::crypto::keyslots::KeyslotChanges;
    let dir = tempfile::tempdir().unwrap();
    let (key, img, disk, s1) = encrypted_disk_with_snapshot(dir.path());
    let q2 = qcow2_node(&disk);
    let before = luks_header_of(&s1);
    q2.add_keyslot(PASS.as_bytes(), b"second", &KeyslotCost::minimal())
        .unwrap();
    assert_eq!(luks_header_of(&img), luks_header_of(&s1));
    assert_ne!(luks_header_of(&s1), before);
    // As if copying to the snapshot had failed: the next change copies again.
    write_luks_header(&s1, &before);
    q2.change_passphrase(PASS.as_bytes(), b"third", &KeyslotCost::minimal())
        .unwrap();
    assert_eq!(luks_header_of(&img), luks_header_of(&s1));
    let (_, slots) = q2.keyslots().unwrap();
    assert_eq!(slots.len(), 2, "{slots:?}");
    drop(disk);
    let third_dir = dir.path().join("third");
    std::fs::create_dir(&third_dir).unwrap();
    let third = key_file(&third_dir, "third");
    for f in [&img, &s1] {
        let d = open(&format!("{},readonly=on", spec(f, &third)))
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        drop(d);
        let e = open(&format!("{},readonly=on", spec(f, &key)))
            .err()
            .unwrap();
        assert!(e.contains("no keyslot opens"), "{e}");
    }

    // An overlay qemu-img encrypts with a key of its own over our image.
    let top = dir.path().join("top.qcow2");
    let args = [
        "create",
        "--object",
        &secret(&third),
        "-f",
        "qcow2",
        "-b",
        img.to_str().unwrap(),
        "-F",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        top.to_str().unwrap(),
    ];
    qemu_img_luks(&args, &top);
    let disk = open(&spec(&top, &third)).unwrap();
    let q2 = qcow2_node(&disk);
    let e = q2
        .add_keyslot(b"third", b"fourth", &KeyslotCost::minimal())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("master key of its own"), "{e}");
}
