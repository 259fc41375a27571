//! Tiered disks through the daemon, driven by libblkio: in each cache mode, data written
//! comes back through cache hits, misses, evictions and write-back, and survives a restart;
//! a restart keeps the cache warm; a cache that belongs to another disk is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::blkio_client::Client;
use testkit::daemon::{Daemon, DaemonCommand};
use testkit::http;

const MIB: u64 = 1 << 20;
const CAP: u64 = 16 * MIB;
const CACHE: u64 = 2 * MIB;

struct Tier {
    dir: tempfile::TempDir,
    spec: String,
}

impl Tier {
    fn new(mode: &str, extra: &str) -> Tier {
        let dir = tempfile::tempdir().expect("temp dir");
        let cap = dir.path().join("capacity.img");
        // Every capacity block starts out with a pattern, so reads of unwritten blocks are
        // checked too.
        std::fs::write(&cap, initial()).expect("capacity image");
        let spec = format!(
            "path={},cache={},cache-size={CACHE},cache-mode={mode}{extra}",
            cap.display(),
            dir.path().join("cache.img").display()
        );
        Tier { dir, spec }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(&self) -> Daemon {
        DaemonCommand::vhost_blk()
            .unwrap_or_else(|e| panic!("{e}"))
            .arg("--socket")
            .arg(self.path("blk.sock"))
            .arg("--api-socket")
            .arg(self.path("api.sock"))
            .arg("--disk")
            .arg(&self.spec)
            .arg("--queue-size")
            .arg("256")
            .spawn()
            .unwrap_or_else(|e| panic!("starting vhost-blk: {e}"))
    }

    fn client(&self, d: &Daemon) -> Client {
        Client::open(self.path("blk.sock"), 1)
            .unwrap_or_else(|e| panic!("{e}\ndaemon output:\n{}", d.output()))
    }

    fn metric(&self, name: &str) -> f64 {
        let text = http::get(self.path("api.sock"), "/metrics")
            .expect("GET /metrics")
            .text();
        http::parse_prometheus(&text)
            .expect("valid metrics")
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }
}

fn initial() -> Vec<u8> {
    (0..CAP as usize)
        .map(|i| ((i / 4096) as u8).wrapping_mul(13) ^ (i as u8))
        .collect()
}

/// A deterministic generator for offsets and data.
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

/// Random reads and writes over a working set larger than the cache (so blocks are
/// promoted, hit, evicted and written back), each read checked against the model. Sizes mix
/// whole blocks, multi-block requests and sector-sized pieces at odd sector offsets.
fn workload(c: &mut Client, model: &mut [u8], seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    let q = c.queue(0);
    let span = 6 * MIB; // three times the cache
    for i in 0..ops {
        let (offset, len) = match rng.below(4) {
            0 => (rng.below(span / 4096) * 4096, 4096),
            1 => (rng.below(span / 4096 - 4) * 4096, 4096 * (1 + rng.below(4))),
            2 => (rng.below(span / 512 - 8) * 512, 512 * (1 + rng.below(8))),
            _ => (rng.below(span / 4096) * 4096, 4096),
        };
        let (o, l) = (offset as usize, len as usize);
        if rng.below(3) == 0 {
            let data: Vec<u8> = (0..l).map(|_| rng.next() as u8).collect();
            q.write(offset, &data).expect("write");
            model[o..o + l].copy_from_slice(&data);
        } else {
            let got = q.read(offset, l).expect("read");
            assert!(
                got == model[o..o + l],
                "op {i}: read at {offset}+{len} differs"
            );
        }
        if i % 97 == 0 {
            q.flush().expect("flush");
        }
    }
    q.flush().expect("flush");
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let q = c.queue(0);
    let mut all = Vec::with_capacity(CAP as usize);
    for off in (0..CAP).step_by(MIB as usize) {
        all.extend(q.read(off, MIB as usize).expect("read back"));
    }
    all
}

fn check_mode(mode: &str) {
    let tier = Tier::new(mode, ",cache-policy=lru");
    let mut model = initial();
    let mut d = tier.start();
    {
        let mut c = tier.client(&d);
        workload(&mut c, &mut model, 0x9e37_79b9_7f4a_7c15, 3000);
        assert!(
            read_all(&mut c) == model,
            "{mode}: disk differs from the model"
        );
    }
    let hits = tier.metric("strata_blk_cache_read_hits_total");
    let misses = tier.metric("strata_blk_cache_read_misses_total");
    let evictions = tier.metric("strata_blk_cache_evictions_total");
    let promotions = tier.metric("strata_blk_cache_promotions_total");
    assert!(hits > 100.0, "{mode}: {hits} read hits");
    assert!(misses > 100.0, "{mode}: {misses} read misses");
    assert!(promotions > 100.0, "{mode}: {promotions} promotions");
    assert!(evictions > 10.0, "{mode}: {evictions} evictions");
    if mode == "writeback" {
        let wb = tier.metric("strata_blk_cache_writeback_blocks_total");
        assert!(wb > 0.0, "writeback: nothing was written back ({wb})");
    }
    let status = d.terminate().expect("stop");
    assert!(status.success(), "{mode}: exit {status}\n{}", d.output());

    if mode != "writeback" {
        // Write-through and write-around keep the capacity device complete on its own.
        assert!(
            std::fs::read(tier.path("capacity.img")).unwrap() == model,
            "{mode}: the capacity device alone differs from the model"
        );
    }
    // A restart (recovering the cache from its journal) serves the same data.
    let mut d = tier.start();
    let mut c = tier.client(&d);
    assert!(
        read_all(&mut c) == model,
        "{mode}: after restart, disk differs from the model"
    );
    drop(c);
    assert!(d.terminate().expect("stop").success());
}

#[test]
fn writethrough_round_trips_through_hits_misses_and_evictions() {
    check_mode("writethrough");
}

#[test]
fn writeback_round_trips_through_hits_misses_evictions_and_writeback() {
    check_mode("writeback");
}

#[test]
fn writearound_round_trips_through_hits_misses_and_evictions() {
    check_mode("writearound");
}

#[test]
fn a_restart_keeps_the_cache_warm() {
    let tier = Tier::new("writethrough", ",seq-cutoff=0");
    let mut d = tier.start();
    let hot = 1024 * 1024u64; // 256 blocks, well inside the 2 MiB cache
                              // Admission is best effort (a busy queue skips promotions rather than wait), so read the
                              // region until every block has been promoted, waiting for promotions in between.
    let mut promoted = 0.0;
    for _pass in 0..10 {
        {
            let mut c = tier.client(&d);
            let q = c.queue(0);
            for off in (0..hot).step_by(4096) {
                q.read(off, 4096).expect("read");
            }
        }
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let now = tier.metric("strata_blk_cache_promotions_total");
            if now == promoted {
                break;
            }
            promoted = now;
        }
        if promoted >= 256.0 {
            break;
        }
    }
    assert_eq!(promoted, 256.0, "promotions after repeated reads");
    assert!(d.terminate().expect("stop").success());

    let mut d = tier.start();
    {
        let mut c = tier.client(&d);
        let q = c.queue(0);
        let expected = initial();
        for off in (0..hot).step_by(4096) {
            let got = q.read(off, 4096).expect("read");
            assert!(got[..] == expected[off as usize..off as usize + 4096]);
        }
    }
    let hits = tier.metric("strata_blk_cache_read_hits_total");
    let misses = tier.metric("strata_blk_cache_read_misses_total");
    assert_eq!(
        (hits, misses),
        (256.0, 0.0),
        "the restarted cache was not warm"
    );
    assert!(d.terminate().expect("stop").success());
}

fn start_fails(spec: &str, dir: &Path) -> String {
    let out = Command::new(testkit::daemon::binary_path("vhost-blk"))
        .arg("--socket")
        .arg(dir.join("x.sock"))
        .arg("--disk")
        .arg(spec)
        .output()
        .expect("run vhost-blk");
    assert_eq!(out.status.code(), Some(2), "{spec}: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn a_cache_of_another_disk_or_format_is_refused_unless_forced() {
    let tier = Tier::new("writeback", "");
    let mut d = tier.start();
    {
        let mut c = tier.client(&d);
        c.queue(0).write(0, &[7u8; 4096]).expect("write");
        c.queue(0).flush().expect("flush");
    }
    assert!(d.terminate().expect("stop").success());

    let other = tier.path("other.img");
    std::fs::write(&other, vec![0u8; CAP as usize]).unwrap();
    let cache = tier.path("cache.img");
    let base = format!("cache={},cache-size={CACHE}", cache.display());
    let e = start_fails(&format!("path={},{base}", other.display()), tier.dir.path());
    assert!(e.contains("another capacity device"), "{e}");
    let e = start_fails(
        &format!(
            "path={},{base},cache-block=8K",
            tier.path("capacity.img").display()
        ),
        tier.dir.path(),
    );
    assert!(e.contains("formatted with"), "{e}");
    let junk = tier.path("junk.img");
    std::fs::write(&junk, vec![0x5a; CACHE as usize]).unwrap();
    let e = start_fails(
        &format!(
            "path={},cache={},cache-size={CACHE}",
            other.display(),
            junk.display()
        ),
        tier.dir.path(),
    );
    assert!(e.contains("not a Strata cache"), "{e}");

    // The refused cache still holds the first disk's dirty block.
    let mut d = tier.start();
    {
        let mut c = tier.client(&d);
        assert_eq!(c.queue(0).read(0, 4096).unwrap(), vec![7u8; 4096]);
    }
    assert!(d.terminate().expect("stop").success());

    // Forcing a reformat for the other disk works.
    let mut d = DaemonCommand::vhost_blk()
        .unwrap()
        .arg("--socket")
        .arg(tier.path("o.sock"))
        .arg("--disk")
        .arg(format!(
            "path={},{base},cache-format=force",
            other.display()
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(d.terminate().expect("stop").success());
}

#[test]
fn capacity_device_errors_reach_the_guest_and_are_counted() {
    let tier = Tier::new("writethrough", "");
    let mut d = tier.start();
    {
        let mut c = tier.client(&d);
        let q = c.queue(0);
        assert_eq!(q.read(0, 4096).expect("read"), initial()[..4096].to_vec());
        // The capacity device shrinks under the daemon (a failing or resized device): a
        // read past its new end must fail, not return whatever was in the buffer.
        std::fs::OpenOptions::new()
            .write(true)
            .open(tier.path("capacity.img"))
            .unwrap()
            .set_len(CAP / 2)
            .unwrap();
        let err = q
            .read(CAP / 2 + 8 * MIB / 2, 4096)
            .expect_err("read past the new end");
        assert_eq!(err.errno(), Some(libc::EIO), "{err}");
        // The rest of the disk keeps working.
        assert_eq!(
            q.read(4096, 4096).expect("read"),
            initial()[4096..8192].to_vec()
        );
    }
    let errors = tier.metric("strata_blk_capacity_device_errors_total");
    assert!(errors >= 1.0, "capacity errors counted: {errors}");
    assert!(d.terminate().expect("stop").success());
}

#[test]
fn a_failed_cache_device_is_taken_out_of_service_without_losing_data() {
    let tier = Tier::new("writethrough", ",seq-cutoff=0");
    let mut d = tier.start();
    let hot = 256 * 4096u64;
    {
        let mut c = tier.client(&d);
        let q = c.queue(0);
        for off in (0..hot).step_by(4096) {
            q.read(off, 4096).expect("read");
        }
    }
    for _ in 0..100 {
        if tier.metric("strata_blk_cache_promotions_total") >= 128.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(tier.metric("strata_blk_cache_promotions_total") >= 1.0);
    // The cache device loses its data area (every cached block now reads short).
    std::fs::OpenOptions::new()
        .write(true)
        .open(tier.path("cache.img"))
        .unwrap()
        .set_len(0)
        .unwrap();
    {
        let mut c = tier.client(&d);
        let q = c.queue(0);
        let expected = initial();
        for off in (0..hot).step_by(4096) {
            let got = q.read(off, 4096).expect("read after the cache failed");
            assert!(
                got[..] == expected[off as usize..off as usize + 4096],
                "block at {off}"
            );
        }
        // Writes go on (write-through: to the capacity device).
        q.write(0, &[9u8; 4096]).expect("write");
        assert_eq!(q.read(0, 4096).expect("read"), vec![9u8; 4096]);
    }
    assert_eq!(
        tier.metric("strata_blk_cache_failed"),
        1.0,
        "cache out of service"
    );
    assert!(tier.metric("strata_blk_cache_device_errors_total") >= 1.0);
    assert!(d.terminate().expect("stop").success());
    let output = d.output();
    assert!(
        output.contains("taking the cache out of service"),
        "{output}"
    );
}

/// Waits up to 10 s for `cond` on the daemon's metrics.
fn wait_for_metric(tier: &Tier, name: &str, cond: impl Fn(f64) -> bool) -> f64 {
    let mut value = tier.metric(name);
    for _ in 0..500 {
        if cond(value) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        value = tier.metric(name);
    }
    value
}

#[test]
fn a_failed_cache_in_writeback_mode_keeps_serving_and_writes_back_its_dirty_blocks() {
    let tier = Tier::new("writeback", ",seq-cutoff=0,cache-policy=lru");
    let mut d = tier.start();
    let mut model = initial();
    let layout = storage_core::tier::Layout::for_size(CACHE, 4096).expect("layout");
    // Slots are handed out from slot 0 up on a fresh cache: 48 written blocks (dirty) and
    // 16 read ones (clean) fill slots 0..64. Every write this test makes lands below `limit`.
    let limit = layout.slot_offset(64);
    let written = 48 * 4096u64;
    assert!(128 * 4096 < limit);
    let mut c = tier.client(&d);
    let q = c.queue(0);
    for b in 0..48u64 {
        let data = vec![b as u8 ^ 0x5a; 4096];
        q.write(b * 4096, &data).expect("write");
        model[(b * 4096) as usize..((b + 1) * 4096) as usize].copy_from_slice(&data);
    }
    q.flush().expect("flush");
    for b in 64..80u64 {
        q.read(b * 4096, 4096).expect("read");
    }
    // Blocks filled by write-back writes count as promotions too.
    let promoted = wait_for_metric(&tier, "strata_blk_cache_promotions_total", |v| v >= 64.0);
    assert_eq!(promoted, 64.0);
    let dirty = tier.metric("strata_blk_cache_dirty_blocks");
    assert!(dirty >= 1.0, "dirty blocks before the failure: {dirty}");

    // The cache device fails for writes past slot 63 (RLIMIT_FSIZE on the daemon: such
    // writes get EFBIG), while every block already on it stays readable.
    testkit::daemon::limit_file_size(d.pid(), limit).expect("prlimit");
    // Misses elsewhere on the disk are promoted into slots 64 and up: those writes fail.
    for off in (8 * MIB..8 * MIB + 32 * 4096).step_by(4096) {
        let got = q.read(off, 4096).expect("read of a missed block");
        assert!(got[..] == model[off as usize..off as usize + 4096], "{off}");
    }
    let failed = wait_for_metric(&tier, "strata_blk_cache_failed", |v| v == 1.0);
    assert_eq!(failed, 1.0, "cache out of service\n{}", d.output());

    // Dirty blocks are still served from the cache device.
    let got = q.read(0, written as usize).expect("read back");
    assert!(got[..] == model[..written as usize], "data written before");
    // Writes go on: a whole block over a cached clean block, part of a (possibly still
    // dirty) block, and a block that was never cached. Only the partial write may still go
    // to the cache device (the rest of its block may exist only there).
    let hits_before = tier.metric("strata_blk_cache_write_hits_total");
    for (offset, len, byte) in [
        (64 * 4096u64, 4096usize, 0xe1u8),
        (4096 + 512, 1024, 0xe2),
        (100 * 4096, 4096, 0xe3),
    ] {
        q.write(offset, &vec![byte; len])
            .expect("write after the failure");
        model[offset as usize..offset as usize + len].fill(byte);
    }
    q.flush().expect("flush after the failure");
    let hits = tier.metric("strata_blk_cache_write_hits_total") - hits_before;
    assert!(hits <= 1.0, "{hits} writes went to the failed cache device");
    let got = q.read(0, 128 * 4096).expect("read back");
    assert!(got[..] == model[..128 * 4096], "data after the failure");

    // The cleaner empties the cache of every dirty block, whatever the watermarks.
    let dirty = wait_for_metric(&tier, "strata_blk_cache_dirty_blocks", |v| v == 0.0);
    assert_eq!(dirty, 0.0, "dirty blocks left\n{}", d.output());
    assert_eq!(tier.metric("strata_blk_cache_lost_blocks_total"), 0.0);
    drop(c);
    assert!(d.terminate().expect("stop").success());
    let output = d.output();
    assert!(
        output.contains("taking the cache out of service"),
        "{output}"
    );
    // The capacity device alone now holds everything the guest wrote.
    let capacity = std::fs::read(tier.path("capacity.img")).expect("capacity image");
    assert!(
        capacity == model,
        "capacity device differs from what was written"
    );
}
