//! `strata-demo`: the README's main command. In a scratch directory it starts `vhost-blk` on a
//! tiered disk (a capacity image behind a write-back cache file) and `vhost-fs` on a shared
//! directory, boots a Linux guest under QEMU that writes, reads back and checks raw data
//! through the kernel's virtio-blk driver, builds an ext2 filesystem, copies a tree from the
//! virtio-fs share onto it and checks it both ways, then prints what was served (from the
//! daemons' `/metrics`, cache hit ratio included), checks the image from the host, and shuts
//! everything down cleanly.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testkit::daemon::DaemonCommand;
use testkit::guest::Guest;
use testkit::http;

const IMAGE_MIB: u64 = 256;
const CACHE_MIB: u64 = 64;
const DATA_MIB: u64 = 8;
/// Where the guest puts the raw data: past the filesystem, which takes the first 192 MiB.
const DATA_OFFSET_MIB: u64 = 224;

fn say(msg: impl AsRef<str>) {
    println!("[demo] {}", msg.as_ref());
}

/// Deterministic test data (xorshift), so the host can check what the guest wrote.
fn data(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x5eed_0f57_7a7a;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

const GUEST_SCRIPT: &str = r#"
set -e
mkdir -p /share && mount -t virtiofs share /share
echo "guest: mounted the virtio-fs share: $(ls /share | wc -l) entries, $(du -s /share | cut -f1) KiB"
echo "guest: /dev/vda is $(( $(cat /sys/block/vda/size) / 2048 )) MiB with $(ls /sys/block/vda/mq | wc -l) queue(s)"
echo "guest: writing 8 MiB of test data at 224 MiB (O_DIRECT, fsync)"
dd if=/data.bin of=/dev/vda bs=1M seek=224 oflag=direct conv=fsync 2>&1 | tail -1 | sed 's/^/guest:   /'
echo "guest: reading it back"
dd if=/dev/vda of=/tmp/back.bin bs=1M skip=224 count=8 iflag=direct 2>&1 | tail -1 | sed 's/^/guest:   /'
want=$(md5sum < /data.bin | cut -d' ' -f1); got=$(md5sum < /tmp/back.bin | cut -d' ' -f1)
echo "guest: md5 written $want, read back $got"
[ "$want" = "$got" ] && echo "RESULT raw=ok" || { echo "RESULT raw=mismatch"; exit 1; }
echo "guest: making an ext2 filesystem on the first 192 MiB"
mke2fs -q -b 4096 /dev/vda 49152
mkdir -p /mnt && mount -t ext2 /dev/vda /mnt
cp /data.bin /mnt/a.bin && cp -a /share/tree /mnt/tree
(cd /share/tree && find . -type f | sort | xargs md5sum) > /tmp/share.md5
sync && umount /mnt
echo "guest: copied the share's tree onto the disk; remounted; checking checksums both ways"
mount -t ext2 /dev/vda /mnt
(cd /mnt/tree && md5sum -c -s /tmp/share.md5) && (cd /mnt/tree && find . -type f | sort | xargs md5sum) | cmp -s - /tmp/share.md5 && [ "$(md5sum < /mnt/a.bin | cut -d' ' -f1)" = "$want" ] && echo "RESULT fs=ok" || { echo "RESULT fs=mismatch"; exit 1; }
echo "guest:   $(find /mnt/tree -type f | wc -l) files, $(du -s /mnt/tree | cut -f1) KiB verified"
cp /mnt/a.bin /share/from-guest.bin && sync
umount /mnt
umount /share
"#;

/// A small tree to share: nested directories, text and binary files.
fn make_tree(root: &Path) -> Result<()> {
    for (i, d) in ["docs", "docs/notes", "bin", "data/a/b"].iter().enumerate() {
        let dir = root.join(d);
        std::fs::create_dir_all(&dir)?;
        for j in 0..5 {
            std::fs::write(
                dir.join(format!("file-{j}.txt")),
                format!("file {j} in {d}\n").repeat(100 * (i + 1)),
            )?;
        }
        std::fs::write(dir.join("blob.bin"), data(256 << 10))?;
    }
    Ok(())
}

fn metric(samples: &[http::Sample], name: &str, label: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && (label.is_empty() || s.labels.contains(label)))
        .map(|s| s.value)
        .sum()
}

/// The latency below which `q` of requests completed, from the histogram buckets.
fn quantile(samples: &[http::Sample], q: f64) -> Option<f64> {
    let name = "strata_blk_request_duration_seconds_bucket";
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for s in samples.iter().filter(|s| s.name == name) {
        let le = s.labels.split("le=\"").nth(1)?.trim_end_matches('"');
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some(b) => b.1 += s.value,
            None => buckets.push((le, s.value)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

fn summary(api: &Path, fs_api: &Path) -> Result<()> {
    let text = http::get(api, "/metrics").context("GET /metrics")?.text();
    let s = http::parse_prometheus(&text).map_err(anyhow::Error::msg)?;
    let mib = |b: f64| b / (1 << 20) as f64;
    say("what vhost-blk served (from its /metrics):");
    for op in ["read", "write", "flush", "discard", "write_zeroes"] {
        let n = metric(&s, "strata_blk_requests_total", &format!("op=\"{op}\""));
        let b = metric(&s, "strata_blk_bytes_total", &format!("op=\"{op}\""));
        if n > 0.0 {
            say(format!("  {op:>12}: {n:>7} requests, {:>8.1} MiB", mib(b)));
        }
    }
    let errors = metric(&s, "strata_blk_errors_total", "");
    say(format!("  errors: {errors}"));
    let hits = metric(&s, "strata_blk_cache_read_hits_total", "");
    let misses = metric(&s, "strata_blk_cache_read_misses_total", "");
    if hits + misses > 0.0 {
        say(format!(
            "  cache: {:.1}% read hit ratio ({hits} hits, {misses} misses), {} promotions, {} dirty blocks, {} written back",
            100.0 * hits / (hits + misses),
            metric(&s, "strata_blk_cache_promotions_total", ""),
            metric(&s, "strata_blk_cache_dirty_blocks", ""),
            metric(&s, "strata_blk_cache_writeback_blocks_total", ""),
        ));
    }
    if let Ok(r) = http::get(fs_api, "/metrics") {
        if let Ok(fs) = http::parse_prometheus(&r.text()) {
            let total: f64 = fs
                .iter()
                .filter(|x| x.name.ends_with("_requests_total"))
                .map(|x| x.value)
                .sum();
            let bytes: f64 = fs
                .iter()
                .filter(|x| x.name.ends_with("_bytes_total"))
                .map(|x| x.value)
                .sum();
            say(format!(
                "what vhost-fs served: {total} FUSE requests, {:.1} MiB of file data",
                mib(bytes)
            ));
        }
    }
    if let (Some(p50), Some(p99)) = (quantile(&s, 0.5), quantile(&s, 0.99)) {
        say(format!(
            "  latency: p50 <= {:.0} us, p99 <= {:.0} us (histogram bucket bounds)",
            p50 * 1e6,
            p99 * 1e6
        ));
    }
    let disk: serde_json::Value = serde_json::from_str(&http::get(api, "/v1/disks/disk0")?.text())
        .context("GET /v1/disks/disk0")?;
    say(format!(
        "  disk: {} ({}, {} engine), features negotiated: {}",
        disk["path"].as_str().unwrap_or("?"),
        disk["format"].as_str().unwrap_or("?"),
        disk["engine"].as_str().unwrap_or("?"),
        disk["features_negotiated_names"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default()
    ));
    Ok(())
}

fn main() -> Result<()> {
    let started = Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix("strata-demo-")
        .tempdir()
        .context("cannot create a scratch directory")?;
    let dir = scratch.path();
    say(format!("scratch directory: {}", dir.display()));

    let image = dir.join("disk.img");
    let file = std::fs::File::create(&image)?;
    file.set_len(IMAGE_MIB << 20)?;
    drop(file);
    let cache = dir.join("cache.img");
    say(format!(
        "created a {IMAGE_MIB} MiB capacity image; its {CACHE_MIB} MiB write-back cache file is created by vhost-blk"
    ));

    let (sock, api) = (dir.join("blk.sock"), dir.join("blk-api.sock"));
    let mut daemon = DaemonCommand::vhost_blk()?
        .args(["--socket".as_ref(), sock.as_os_str()])
        .args([
            "--disk".to_string(),
            format!(
                "path={},cache={},cache-size={CACHE_MIB}M,cache-mode=writeback,serial=strata-demo",
                image.display(),
                cache.display()
            ),
        ])
        .args(["--queues", "2"])
        .args(["--api-socket".as_ref(), api.as_os_str()])
        .spawn()
        .context("cannot start vhost-blk")?;
    say(format!(
        "vhost-blk is serving the tiered disk on {} (2 queues)",
        sock.display()
    ));

    let share = dir.join("share");
    make_tree(&share.join("tree"))?;
    let (fs_sock, fs_api) = (dir.join("fs.sock"), dir.join("fs-api.sock"));
    let mut fs_daemon = DaemonCommand::new(testkit::daemon::try_binary_path("vhost-fs")?)
        .readiness(testkit::daemon::Readiness::StderrContains(
            "listening on".into(),
        ))
        .args(["--socket-path".as_ref(), fs_sock.as_os_str()])
        .args(["--shared-dir".as_ref(), share.as_os_str()])
        .args(["--tag", "share", "--sandbox", "none"])
        .args(["--api-socket".as_ref(), fs_api.as_os_str()])
        .spawn()
        .context("cannot start vhost-fs")?;
    say(format!(
        "vhost-fs is sharing {} on {} (tag \"share\")",
        share.display(),
        fs_sock.display()
    ));

    say("booting a Linux guest under QEMU (TCG, about 5-10 s)...");
    let payload = data((DATA_MIB << 20) as usize);
    let run = Guest::new("strata-demo")
        .script(GUEST_SCRIPT)
        .file("/data.bin", payload.clone())
        .blk_disk(&sock, 2)
        .fs_share(&fs_sock, "share")
        .timeout(Duration::from_secs(240))
        .run()?;
    for line in run.console.lines().filter(|l| l.starts_with("guest:")) {
        say(line);
    }
    run.ensure_success()?;
    if run.value("raw") != Some("ok") || run.value("fs") != Some("ok") {
        bail!("the guest's checks failed:\n{}", run.context());
    }
    say(format!(
        "guest finished in {:.1} s",
        run.elapsed.as_secs_f64()
    ));
    summary(&api, &fs_api)?;
    let back = std::fs::read(share.join("from-guest.bin"))?;
    if back != payload {
        bail!("the file the guest wrote into the share differs");
    }
    say("host check: the file the guest wrote into the share is exactly the test data");

    let status = daemon.terminate()?;
    if !status.success() {
        bail!("vhost-blk exited with {status} on SIGTERM");
    }
    say("vhost-blk drained, flushed and exited cleanly on SIGTERM");
    // Like virtiofsd, vhost-fs exits when its frontend goes away; stop it if it has not.
    if fs_daemon.try_wait()?.is_none() {
        fs_daemon.terminate()?;
    }

    // In write-back mode part of the data may still be only in the cache: check through the
    // disk as a whole (a fresh daemon recovering the cache), not the capacity image alone.
    let mut check = DaemonCommand::vhost_blk()?
        .args(["--socket".as_ref(), sock.as_os_str()])
        .args([
            "--disk".to_string(),
            format!(
                "path={},cache={},cache-size={CACHE_MIB}M,cache-mode=writeback",
                image.display(),
                cache.display()
            ),
        ])
        .spawn()?;
    let mut client = testkit::blkio_client::Client::open(&sock, 1)?;
    let at = DATA_OFFSET_MIB << 20;
    let mut got = Vec::new();
    for k in 0..DATA_MIB {
        got.extend(client.queue(0).read(at + (k << 20), 1 << 20)?);
    }
    drop(client);
    if got != payload {
        bail!("the disk does not hold what the guest wrote at {DATA_OFFSET_MIB} MiB");
    }
    check.terminate()?;
    say(format!(
        "host check: after a restart (the cache recovered from its journal), the disk holds exactly the {DATA_MIB} MiB the guest wrote at {DATA_OFFSET_MIB} MiB"
    ));
    say(format!(
        "done in {:.1} s; no process left behind",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
