//! qcow2 against its oracle, qemu-img: images qemu-img makes (every cluster size, refcount
//! width, compression, version 2) read through our node as qemu-img converted them; after
//! random writes, write-zeroes and discards through our node (on images made by us and by
//! qemu-img, alone and over backing chains) `qemu-img check` finds nothing wrong and
//! `qemu-img compare` finds the image equal to a plain copy of what was written; a write
//! cut short (no flush, the process gone) leaves leaks at worst. And a raw disk whose guest
//! writes a qcow2 header into it stays raw.

use std::path::Path;

use storage_core::disk::{open_disk, Disk, DiskOp, DiskQueue, DiskSpec, IoVecs};
use storage_core::qcow2::{create, CreateOptions};
use testkit::tools::{qemu_img_check, qemu_img_ok};

const MIB: u64 = 1 << 20;

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `size` bytes of a pattern with zero runs, so images have unallocated and zero clusters.
fn pattern(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut v = vec![0u8; size as usize];
    let mut at = 0;
    while at < v.len() {
        let run = (rng.below(96) as usize + 1) * 4096;
        let end = (at + run).min(v.len());
        if rng.below(3) != 0 {
            for b in &mut v[at..end] {
                *b = rng.next() as u8 | 1;
            }
        }
        at = end;
    }
    v
}

fn open(spec: &str) -> storage_core::disk::AnyDisk {
    let spec: DiskSpec = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
    open_disk(&spec).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs one request to completion.
fn run(q: &mut impl DiskQueue, op: DiskOp) -> (i32, Option<IoVecs>) {
    q.start(op, 0)
        .unwrap_or_else(|r| panic!("refused: {}", r.error));
    q.submit().unwrap();
    loop {
        if let Some(c) = q.pop_completion() {
            return (c.result, c.buffers);
        }
        q.wait().unwrap();
    }
}

fn read(q: &mut impl DiskQueue, offset: u64, len: usize) -> Vec<u8> {
    let (r, b) = run(
        q,
        DiskOp::Read {
            offset,
            buffers: IoVecs::owned(&[len]),
        },
    );
    assert_eq!(r, len as i32, "read of {len} at {offset}");
    b.unwrap().to_vec()
}

fn write(q: &mut impl DiskQueue, offset: u64, data: &[u8]) {
    let (r, _) = run(
        q,
        DiskOp::Write {
            offset,
            buffers: IoVecs::from_bytes(data),
        },
    );
    assert_eq!(r, data.len() as i32, "write of {} at {offset}", data.len());
}

/// Reads the whole disk in pieces of odd sizes and places (across clusters, so both the
/// direct and the piece-by-piece paths run) and compares with `model`.
fn assert_reads(q: &mut impl DiskQueue, model: &[u8], what: &str) {
    let mut rng = Rng(7);
    let mut at = 0usize;
    while at < model.len() {
        let len = ((rng.below(64) as usize + 1) * 512 * if rng.below(4) == 0 { 37 } else { 1 })
            .min(model.len() - at);
        let got = read(q, at as u64, len);
        if got != model[at..at + len] {
            let first = got
                .iter()
                .zip(&model[at..])
                .position(|(a, b)| a != b)
                .unwrap();
            panic!("{what}: byte {} differs", at + first);
        }
        at += len;
    }
}

/// Random writes, write-zeroes, discards and flushes, mirrored into `model`.
fn random_workload(q: &mut impl DiskQueue, model: &mut [u8], seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    let size = model.len() as u64;
    for _ in 0..ops {
        let sectors = match rng.below(4) {
            0 => rng.below(256) + 1,
            _ => rng.below(16) + 1,
        };
        let len = (sectors * 512).min(size);
        let offset = rng.below((size - len) / 512 + 1) * 512;
        let (o, l) = (offset as usize, len as usize);
        match rng.below(10) {
            0..=5 => {
                let data: Vec<u8> = (0..l).map(|_| rng.next() as u8).collect();
                write(q, offset, &data);
                model[o..o + l].copy_from_slice(&data);
            }
            6 => {
                let (r, _) = run(
                    q,
                    DiskOp::WriteZeroes {
                        offset,
                        len,
                        unmap: rng.below(2) == 0,
                    },
                );
                assert_eq!(r, 0);
                model[o..o + l].fill(0);
            }
            7 => {
                // Discard: each byte it touches reads as before or as zero (whole clusters
                // become zero clusters; never other data, never the backing file's).
                let (r, _) = run(q, DiskOp::Discard { offset, len });
                assert_eq!(r, 0);
                let now = read(q, offset, l);
                for (i, (&n, m)) in now.iter().zip(&mut model[o..o + l]).enumerate() {
                    assert!(
                        n == *m || n == 0,
                        "byte {} after a discard is neither its old value nor zero",
                        o + i
                    );
                    *m = n;
                }
            }
            8 => {
                let (r, _) = run(q, DiskOp::Flush);
                assert_eq!(r, 0);
            }
            _ => {
                let got = read(q, offset, l);
                assert!(got == model[o..o + l], "read at {offset} differs");
            }
        }
    }
    let (r, _) = run(q, DiskOp::Flush);
    assert_eq!(r, 0);
}

fn assert_compares(img: &Path, model: &[u8], dir: &Path) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    // -U: the disk under test still holds the image (flushed).
    qemu_img_ok(&[
        "compare",
        "-U",
        "-f",
        "qcow2",
        "-F",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn images_qemu_img_makes_read_as_it_made_them() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = pattern(4 * MIB, 1);
    std::fs::write(&raw, &data).unwrap();
    for opts in [
        &["-o", "cluster_size=65536"][..],
        &["-o", "cluster_size=512"],
        &["-o", "cluster_size=2M"],
        &["-o", "compat=0.10"],
        &["-o", "refcount_bits=1"],
        &["-o", "refcount_bits=64,cluster_size=4096"],
        &["-c"],
        &["-c", "-o", "compression_type=zstd"],
    ] {
        let img = dir.path().join("img.qcow2");
        let _ = std::fs::remove_file(&img);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend([p(&raw), p(&img)]);
        qemu_img_ok(&args);
        let disk = open(&format!("path={},format=qcow2,readonly=on", p(&img)));
        assert_eq!(disk.info().format, "qcow2");
        assert_eq!(disk.info().capacity.get(), 4 * MIB, "{opts:?}");
        let mut q = disk.new_queue(32).unwrap();
        assert_reads(&mut q, &data, &format!("{opts:?}"));
    }
}

#[test]
fn our_writes_pass_qemu_img_check_and_compare() {
    for (creator, cluster) in [("ours", 65536u64), ("ours", 4096), ("qemu-img", 65536)] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.qcow2");
        let size = 8 * MIB;
        if creator == "ours" {
            create(
                &img,
                &CreateOptions {
                    size,
                    cluster_size: cluster,
                    backing: None,
                    encryption: None,
                },
            )
            .unwrap();
        } else {
            qemu_img_ok(&["create", "-f", "qcow2", p(&img), "8M"]);
        }
        qemu_img_check(&img, false);
        let mut model = vec![0u8; size as usize];
        {
            let disk = open(&format!("path={},format=qcow2", p(&img)));
            let mut q = disk.new_queue(32).unwrap();
            random_workload(&mut q, &mut model, cluster ^ 99, 400);
            assert_reads(&mut q, &model, creator);
        }
        qemu_img_check(&img, false);
        assert_compares(&img, &model, dir.path());
        // And again after reopening.
        let disk = open(&format!("path={},format=qcow2", p(&img)));
        let mut q = disk.new_queue(32).unwrap();
        assert_reads(&mut q, &model, "reopened");
    }
}

#[test]
fn overlays_read_through_their_backing_chain_and_write_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let base = dir.path().join("base.raw");
    let mut model = pattern(size, 3);
    std::fs::write(&base, &model).unwrap();
    // base.raw <- mid.qcow2 (qemu-img's) <- top.qcow2 (ours)
    let mid = dir.path().join("mid.qcow2");
    testkit::tools::qemu_img_overlay_on_raw_base(&mid);
    {
        let disk = open(&format!("path={},format=qcow2", p(&mid)));
        assert!(disk.describe().contains("backing"), "{}", disk.describe());
        let mut q = disk.new_queue(32).unwrap();
        assert_reads(&mut q, &model, "mid before writes");
        random_workload(&mut q, &mut model, 11, 200);
    }
    qemu_img_check(&mid, false);
    let top = dir.path().join("top.qcow2");
    create(
        &top,
        &CreateOptions {
            size,
            cluster_size: 65536,
            backing: Some(("mid.qcow2".into(), "qcow2".into())),
            encryption: None,
        },
    )
    .unwrap();
    let mid_model = model.clone();
    {
        let disk = open(&format!("path={},format=qcow2", p(&top)));
        let mut q = disk.new_queue(32).unwrap();
        assert_reads(&mut q, &model, "top before writes");
        random_workload(&mut q, &mut model, 12, 300);
    }
    qemu_img_check(&top, false);
    qemu_img_check(&mid, false);
    assert_compares(&top, &model, dir.path());
    // Writing to the top left the images below as they were.
    assert_compares(&mid, &mid_model, dir.path());
    // qemu-img reads our overlay's chain the same way.
    let out = dir.path().join("flat.raw");
    qemu_img_ok(&["convert", "-O", "raw", p(&top), p(&out)]);
    assert!(std::fs::read(&out).unwrap() == model);
}

#[test]
fn a_chain_of_mixed_cluster_sizes_over_shorter_images_reads_as_qemu_img_reads_it() {
    // base.raw (2 MiB and 3 sectors) <- mid.qcow2 (qemu-img's, 4 KiB clusters, 3 MiB and
    // 3 sectors) <- low.qcow2 (ours, 512-byte clusters, 3.5 MiB and a sector) <- top.qcow2
    // (ours, 64 KiB, 4 MiB): reads look through images whose clusters differ, and past the
    // end of shorter ones, mid-cluster.
    let dir = tempfile::tempdir().unwrap();
    let base_len = 2 * MIB + 3 * 512;
    let mut model = pattern(4 * MIB, 5);
    model[base_len as usize..].fill(0);
    std::fs::write(dir.path().join("base.raw"), &model[..base_len as usize]).unwrap();
    let mid = dir.path().join("mid.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&mid),
        &(3 * MIB + 3 * 512).to_string(),
    ]);
    let mut layers = vec![(mid.clone(), 3 * MIB + 3 * 512)];
    for (name, cluster, size, below) in [
        ("low.qcow2", 512, 3 * MIB + MIB / 2 + 512, "mid.qcow2"),
        ("top.qcow2", 65536, 4 * MIB, "low.qcow2"),
    ] {
        let img = dir.path().join(name);
        create(
            &img,
            &CreateOptions {
                size,
                cluster_size: cluster,
                backing: Some((below.into(), "qcow2".into())),
                encryption: None,
            },
        )
        .unwrap();
        layers.push((img, size));
    }
    // The ends of the images below, where a read may run past one.
    let ends = [base_len, 3 * MIB + 3 * 512, 3 * MIB + MIB / 2 + 512];
    for (i, (img, size)) in layers.iter().enumerate() {
        let disk = open(&format!("path={},format=qcow2", p(img)));
        let mut q = disk.new_queue(8).unwrap();
        let m = &mut model[..*size as usize];
        assert_reads(&mut q, m, "before writes");
        for &end in ends.iter().filter(|&&e| e < *size) {
            // Ending where the cluster holding the end does, or beyond.
            for start in (end - 4096..end).step_by(512) {
                for stop in [end.next_multiple_of(4096), start + 8192] {
                    let len = (stop.min(*size) - start) as usize;
                    let got = read(&mut q, start, len);
                    assert!(
                        got == m[start as usize..][..len],
                        "read at {start} over {end}"
                    );
                }
            }
        }
        random_workload(&mut q, m, 30 + i as u64, 150);
        assert_reads(&mut q, m, "after writes");
        // Above a shorter image, what lies past its end reads as zeroes.
        model[*size as usize..].fill(0);
    }
    let (top, _) = layers.last().unwrap();
    // Many reads in flight at once, each from wherever its data is (any image of the
    // chain, the raw base, zeroes past them), completed in any order.
    {
        let disk = open(&format!("path={},format=qcow2", p(top)));
        let mut q = disk.new_queue(16).unwrap();
        let mut rng = Rng(77);
        let mut want = std::collections::HashMap::new();
        for tag in 0..16u64 {
            let len = (rng.below(8) + 1) * 4096;
            let offset = rng.below((4 * MIB - len) / 4096) * 4096;
            let op = DiskOp::Read {
                offset,
                buffers: IoVecs::owned(&[len as usize]),
            };
            q.start(op, tag)
                .unwrap_or_else(|r| panic!("refused: {}", r.error));
            want.insert(tag, (offset as usize, len as usize));
        }
        q.submit().unwrap();
        while !want.is_empty() {
            let Some(c) = q.pop_completion() else {
                q.wait().unwrap();
                continue;
            };
            let (o, l) = want.remove(&c.tag).expect("each tag completes once");
            assert_eq!(c.result, l as i32, "read of {l} at {o}");
            assert!(
                c.buffers.unwrap().to_vec() == model[o..o + l],
                "read at {o}"
            );
        }
    }
    qemu_img_check(top, false);
    let out = dir.path().join("flat.raw");
    qemu_img_ok(&["convert", "-O", "raw", p(top), p(&out)]);
    assert!(
        std::fs::read(&out).unwrap() == model,
        "qemu-img reads another chain"
    );
}

/// Starts `a` on `qa` and `b` on `qb`, then completes both: two workers' requests in
/// flight at once on one image.
fn run_two(qa: &mut impl DiskQueue, a: DiskOp, qb: &mut impl DiskQueue, b: DiskOp) -> [i32; 2] {
    qa.start(a, 0)
        .unwrap_or_else(|r| panic!("refused: {}", r.error));
    qb.start(b, 0)
        .unwrap_or_else(|r| panic!("refused: {}", r.error));
    qa.submit().unwrap();
    qb.submit().unwrap();
    let mut out = [i32::MIN; 2];
    while out.contains(&i32::MIN) {
        let mut any = false;
        if out[0] == i32::MIN {
            if let Some(c) = qa.pop_completion() {
                out[0] = c.result;
                any = true;
            }
        }
        if out[1] == i32::MIN {
            if let Some(c) = qb.pop_completion() {
                out[1] = c.result;
                any = true;
            }
        }
        if !any {
            if out[0] == i32::MIN {
                qa.wait().unwrap();
            } else {
                qb.wait().unwrap();
            }
        }
    }
    out
}

/// Small clusters, so that a few MiB of writes need new refcount blocks, a larger refcount
/// table (moved, with the header), and more L2 tables than a tiny L2 cache holds; version
/// 2 and refcount widths other than 16 too; from two queues at once.
#[test]
fn small_clusters_grow_the_tables_and_evict_l2_tables_from_two_queues() {
    use storage_core::disk::NodeSpec;
    use storage_core::qcow2::Backing;
    for opts in [
        "cluster_size=512",
        "cluster_size=512,compat=0.10",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=4096,refcount_bits=64",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.qcow2");
        let size = 12 * MIB;
        qemu_img_ok(&["create", "-f", "qcow2", "-o", opts, p(&img), "12M"]);
        let spec = DiskSpec {
            root: NodeSpec::Qcow2 {
                file: Box::new(NodeSpec::File {
                    path: img.clone(),
                    direct: false,
                    engine: None,
                    locking: true,
                }),
                backing: Backing::FromImage,
                // A handful of L2 tables: most lookups miss, dirty tables force flushes.
                l2_cache: 4096,
                key: None,
            },
            read_only: false,
            serial: None,
        };
        let mut model = vec![0u8; size as usize];
        {
            let disk = open_disk(&spec).unwrap_or_else(|e| panic!("{opts}: {e}"));
            let (mut qa, mut qb) = (disk.new_queue(8).unwrap(), disk.new_queue(8).unwrap());
            let mut rng = Rng(opts.len() as u64);
            for _ in 0..400 {
                let one = |rng: &mut Rng| {
                    let len = (rng.below(64) + 1) * 512;
                    let offset = rng.below((size - len) / 512) * 512;
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
                    (offset, data)
                };
                // Neighbours: often in the same clusters, being allocated by both queues.
                let (oa, da) = one(&mut rng);
                let ob = (oa + da.len() as u64).min(size - 512);
                let db: Vec<u8> = vec![rng.next() as u8 | 1; (512 * (rng.below(8) + 1)) as usize]
                    .into_iter()
                    .take((size - ob) as usize)
                    .collect();
                let r = run_two(
                    &mut qa,
                    DiskOp::Write {
                        offset: oa,
                        buffers: IoVecs::from_bytes(&da),
                    },
                    &mut qb,
                    DiskOp::Write {
                        offset: ob,
                        buffers: IoVecs::from_bytes(&db),
                    },
                );
                assert_eq!(r, [da.len() as i32, db.len() as i32], "{opts}");
                model[oa as usize..oa as usize + da.len()].copy_from_slice(&da);
                model[ob as usize..ob as usize + db.len()].copy_from_slice(&db);
            }
            // And all of the disk, in large writes: the file grows past what the first
            // refcount table can name.
            for chunk in 0..(size / MIB) {
                {
                    let data = vec![(chunk as u8) | 0x80; MIB as usize];
                    write(&mut qa, chunk * MIB, &data);
                    model[(chunk * MIB) as usize..((chunk + 1) * MIB) as usize]
                        .copy_from_slice(&data);
                }
            }
            random_workload(&mut qb, &mut model, 77, 200);
            assert_reads(&mut qa, &model, opts);
        }
        qemu_img_check(&img, false);
        assert_compares(&img, &model, dir.path());
    }
}

#[test]
fn writes_cut_short_without_a_flush_leave_leaks_at_worst() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let size = 8 * MIB;
    create(
        &img,
        &CreateOptions {
            size,
            cluster_size: 65536,
            backing: None,
            encryption: None,
        },
    )
    .unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(5);
    {
        let disk = open(&format!("path={},format=qcow2", p(&img)));
        let mut q = disk.new_queue(32).unwrap();
        random_workload(&mut q, &mut model, 21, 200);
        // More writes, never flushed: the disk goes away as a killed process's would.
        for _ in 0..100 {
            let offset = rng.below(size / 4096) * 4096;
            write(&mut q, offset, &[0xee; 4096]);
        }
        std::mem::forget(q);
        std::mem::forget(disk);
    }
    qemu_img_check(&img, true);
}

#[test]
fn a_raw_disk_holding_a_qcow2_header_stays_raw() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("guest.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", p(&img), "1G"]);
    let header = std::fs::read(&img).unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 4 * MIB as usize]).unwrap();
    {
        let disk = open(&format!("path={}", p(&raw)));
        let mut q = disk.new_queue(4).unwrap();
        // The guest writes a qcow2 header (naming a backing file it would like to read).
        write(&mut q, 0, &header[..65536]);
        let (r, _) = run(&mut q, DiskOp::Flush);
        assert_eq!(r, 0);
    }
    let disk = open(&format!("path={}", p(&raw)));
    assert_eq!(disk.info().format, "raw");
    assert_eq!(disk.info().capacity.get(), 4 * MIB);
}

#[test]
fn damaged_images_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", p(&img), "64M"]);
    let good = std::fs::read(&img).unwrap();
    // (what the refusal names, the byte range changed, its new bytes)
    let cases: [(&str, std::ops::Range<usize>, Vec<u8>); 3] = [
        ("not a qcow2 image", 0..1, b"X".to_vec()),
        ("cluster", 23..24, vec![30]),
        (
            "refcount table",
            48..56,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
    ];
    for (needle, range, bytes) in cases {
        let mut b = good.clone();
        b[range].copy_from_slice(&bytes);
        std::fs::write(&img, &b).unwrap();
        let spec: DiskSpec = format!("path={},format=qcow2", p(&img)).parse().unwrap();
        let e = open_disk(&spec)
            .err()
            .expect("opened a damaged image")
            .to_string();
        assert!(e.contains(needle), "{needle}: {e}");
    }
    // A backing file that does not exist is named.
    let top = dir.path().join("top.qcow2");
    create(
        &top,
        &CreateOptions {
            size: MIB,
            cluster_size: 65536,
            backing: Some(("gone.raw".into(), "raw".into())),
            encryption: None,
        },
    )
    .unwrap();
    let spec: DiskSpec = format!("path={},format=qcow2", p(&top)).parse().unwrap();
    let e = open_disk(&spec).err().unwrap().to_string();
    assert!(e.contains("backing file") && e.contains("gone.raw"), "{e}");
}

fn snapshot(
    q: &storage_core::qcow2::Qcow2Disk,
    name: &str,
) -> Result<std::path::PathBuf, storage_core::error::StorageError> {
    q.commit_snapshot(q.prepare_snapshot(name)?)
}

/// Waits on the queue's completion fd, as a worker does (not `wait()`, which would block
/// inside the queue): a completion that never signals the fd fails the test.
fn run_by_fd(q: &mut impl DiskQueue, op: DiskOp) -> i32 {
    q.start(op, 0)
        .unwrap_or_else(|r| panic!("refused: {}", r.error));
    q.submit().unwrap();
    let fd = q.completion_fd().expect("a completion fd");
    loop {
        if let Some(c) = q.pop_completion() {
            return c.result;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, 5000) };
        assert!(n > 0, "a request in flight and no wake-up within 5 s");
        q.ack_completion_fd();
    }
}

#[test]
fn snapshots_under_a_throttle_wake_the_worker_and_some_disks_refuse_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", p(&img), "4M"]);
    let disk = open(&format!("path={},format=qcow2,iops-total=100000", p(&img)));
    assert!(
        disk.describe().starts_with("throttle(qcow2"),
        "{}",
        disk.describe()
    );
    let qcow2 = disk.qcow2().expect("qcow2 under the throttle");
    let mut q = disk.new_queue(8).unwrap();
    let data = vec![0x5a; 65536];
    assert_eq!(
        run_by_fd(
            &mut q,
            DiskOp::Write {
                offset: 0,
                buffers: IoVecs::from_bytes(&data)
            }
        ),
        65536
    );
    snapshot(qcow2, "a").unwrap();
    // Read through the new top into the snapshot below, woken by the completion fd.
    for _ in 0..50 {
        let r = run_by_fd(
            &mut q,
            DiskOp::Read {
                offset: 0,
                buffers: IoVecs::owned(&[65536]),
            },
        );
        assert_eq!(r, 65536);
    }
    assert!(read(&mut q, 0, 65536) == data);
    // backing=null: its image would name a snapshot that the next start does not read.
    let spec = DiskSpec {
        root: storage_core::disk::NodeSpec::Qcow2 {
            file: Box::new(storage_core::disk::NodeSpec::File {
                path: img.clone(),
                direct: false,
                engine: None,
                locking: true,
            }),
            backing: storage_core::qcow2::Backing::Without,
            l2_cache: 1 << 20,
            key: None,
        },
        read_only: false,
        serial: None,
    };
    drop(q);
    drop(disk);
    let disk = open_disk(&spec).unwrap();
    let e = snapshot(disk.qcow2().unwrap(), "b")
        .unwrap_err()
        .to_string();
    assert!(e.contains("backing=null"), "{e}");
}

#[test]
fn a_snapshot_freezes_the_image_and_writes_go_on_above_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    let size = 4 * MIB;
    qemu_img_ok(&["create", "-f", "qcow2", p(&img), "4M"]);
    let mut model = vec![0u8; size as usize];
    let mut frozen_models = Vec::new();
    {
        let disk = open(&format!("path={},format=qcow2", p(&img)));
        let qcow2 = disk.qcow2().expect("a qcow2 root");
        let mut q = disk.new_queue(8).unwrap();
        for (i, name) in ["monday", "tuesday"].iter().enumerate() {
            random_workload(&mut q, &mut model, 40 + i as u64, 100);
            let file = snapshot(qcow2, name).unwrap();
            assert_eq!(file, dir.path().join(format!("vm@{name}.qcow2")));
            frozen_models.push((file, model.clone()));
        }
        assert!(snapshot(qcow2, "monday").is_err(), "a name taken twice");
        assert!(snapshot(qcow2, "../x").is_err(), "a name with a slash");
        // The same queue goes on, on the new top.
        random_workload(&mut q, &mut model, 50, 100);
        assert_reads(&mut q, &model, "after snapshots");
        let chain: Vec<String> = qcow2.chain().into_iter().map(|c| c.path).collect();
        assert_eq!(
            chain,
            [
                dir.path().join("vm@tuesday.qcow2"),
                dir.path().join("vm@monday.qcow2")
            ]
            .map(|p| p.display().to_string())
        );
    }
    // qemu-img reads each snapshot as the image was, and the top as it is.
    for (file, m) in &frozen_models {
        qemu_img_check(file, false);
        assert_compares(file, m, dir.path());
    }
    qemu_img_check(&img, false);
    assert_compares(&img, &model, dir.path());
    // Reopened, the chain is the same.
    let disk = open(&format!("path={},format=qcow2", p(&img)));
    assert_eq!(disk.qcow2().unwrap().chain().len(), 2);
    let mut q = disk.new_queue(8).unwrap();
    assert_reads(&mut q, &model, "reopened");
}

/// Deletes snapshot `name` with `during` run between cluster copies (a guest's writes).
fn delete_snapshot(q: &storage_core::qcow2::Qcow2Disk, name: &str, during: &mut dyn FnMut(u64)) {
    let mut p = q
        .stream_snapshot(name, &mut |done, _| {
            during(done);
            true
        })
        .unwrap_or_else(|e| panic!("deleting {name}: {e}"));
    q.commit_delete(&mut p).unwrap();
    p.remove_file(true).unwrap();
}

#[test]
fn snapshots_are_deleted_by_streaming_and_reverted_while_every_image_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let base = dir.path().join("base.raw");
    let mut model = pattern(size, 7);
    std::fs::write(&base, &model).unwrap();
    let img = dir.path().join("vm.qcow2");
    testkit::tools::qemu_img_overlay_on_raw_base(&img);
    let snap = |n: &str| dir.path().join(format!("vm@{n}.qcow2"));
    let chain_of = |q: &storage_core::qcow2::Qcow2Disk| -> Vec<String> {
        q.chain().into_iter().map(|c| c.path).collect()
    };
    let disk = open(&format!("path={},format=qcow2", p(&img)));
    let qcow2 = disk.qcow2().unwrap();
    let mut q = disk.new_queue(8).unwrap();
    let mut models = std::collections::HashMap::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        random_workload(&mut q, &mut model, 60 + i as u64, 60);
        snapshot(qcow2, name).unwrap();
        models.insert(name.to_string(), model.clone());
    }
    random_workload(&mut q, &mut model, 70, 60);

    let e = qcow2
        .stream_snapshot("nosuch", &mut |_, _| true)
        .err()
        .unwrap();
    assert_eq!(
        e.kind(),
        storage_core::error::StorageErrorKind::NotFound,
        "{e}"
    );

    // A snapshot in the middle: its data goes up into the snapshot above it. Opened
    // afresh (nothing of that snapshot's tables cached), the node reads it once the copies
    // are flushed and before the switch: its tables then name clusters past its old end.
    let (r, _) = run(&mut q, DiskOp::Flush);
    assert_eq!(r, 0);
    drop(q);
    drop(disk);
    let disk = open(&format!("path={},format=qcow2", p(&img)));
    let qcow2 = disk.qcow2().unwrap();
    let mut q = disk.new_queue(8).unwrap();
    let mut prepared = qcow2.stream_snapshot("b", &mut |_, _| true).unwrap();
    assert_reads(&mut q, &model, "between the copies and the switch");
    qcow2.commit_delete(&mut prepared).unwrap();
    prepared.remove_file(true).unwrap();
    assert!(!snap("b").exists());
    // The queue reads the new chain: nothing holds the deleted file open, so its space
    // goes back to the file system.
    assert_reads(&mut q, &model, "after deleting a snapshot in the middle");
    let held: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| {
            l.to_string_lossy()
                .starts_with(&*snap("b").to_string_lossy())
        })
        .collect();
    assert!(
        held.is_empty(),
        "the deleted snapshot is still open: {held:?}"
    );
    assert_eq!(
        chain_of(qcow2),
        [snap("c"), snap("a"), base.clone()].map(|p| p.display().to_string())
    );
    // The newest, while the guest writes the top: its writes are never overtaken.
    let mut rng = Rng(99);
    delete_snapshot(qcow2, "c", &mut |done| {
        if done % 16 == 0 {
            assert_reads(&mut q, &model, "while c is copied up");
        }
        if done % 7 == 0 {
            let len = (rng.below(16) as usize + 1) * 4096;
            let at = rng.below(size - len as u64) & !4095;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            write(&mut q, at, &data);
            model[at as usize..at as usize + len].copy_from_slice(&data);
        }
    });
    assert_reads(&mut q, &model, "after deleting the newest snapshot");
    // The last one: the top now reads through the raw base.
    delete_snapshot(qcow2, "a", &mut |_| {});
    assert_eq!(chain_of(qcow2), [base.display().to_string()]);
    assert_reads(&mut q, &model, "after deleting every snapshot");
    let (r, _) = run(&mut q, DiskOp::Flush);
    assert_eq!(r, 0);
    qemu_img_check(&img, false);
    assert_compares(&img, &model, dir.path());

    // Revert: back to "e", "f" (newer) and what was written since are gone.
    for (i, name) in ["e", "f"].iter().enumerate() {
        random_workload(&mut q, &mut model, 80 + i as u64, 60);
        snapshot(qcow2, name).unwrap();
        models.insert(name.to_string(), model.clone());
    }
    random_workload(&mut q, &mut model, 90, 60);
    let removed = qcow2.revert_to_snapshot("e").unwrap();
    assert_eq!(removed, [snap("f")]);
    assert!(!snap("f").exists() && snap("e").exists());
    model = models["e"].clone();
    assert_reads(&mut q, &model, "reverted to e");
    random_workload(&mut q, &mut model, 91, 60);
    let (r, _) = run(&mut q, DiskOp::Flush);
    assert_eq!(r, 0);
    drop(q);
    drop(disk);
    qemu_img_check(&img, false);
    qemu_img_check(&snap("e"), false);
    assert_compares(&img, &model, dir.path());
    assert_compares(&snap("e"), &models["e"], dir.path());
    // Reopened: the chain the files name.
    let disk = open(&format!("path={},format=qcow2", p(&img)));
    assert_eq!(
        chain_of(disk.qcow2().unwrap()),
        [snap("e"), base.clone()].map(|p| p.display().to_string())
    );
    let mut q = disk.new_queue(8).unwrap();
    assert_reads(&mut q, &model, "reopened");
}
