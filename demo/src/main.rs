//! `strata-demo`: the README's main command. In a scratch directory it creates a disk image,
//! starts `vhost-blk` on it with an API socket, boots a Linux guest under QEMU that writes,
//! reads back and checks data through the kernel's virtio-blk driver and builds a filesystem,
//! then prints what was served (from the daemon's `/metrics`), checks the image from the
//! host, and shuts the daemon down cleanly.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testkit::daemon::DaemonCommand;
use testkit::guest::Guest;
use testkit::http;

const IMAGE_MIB: u64 = 256;
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
cp /data.bin /mnt/a.bin && cp /data.bin /mnt/b.bin && mkdir /mnt/dir && echo hello > /mnt/dir/hello.txt
sync && umount /mnt
echo "guest: remounted; checking files"
mount -t ext2 /dev/vda /mnt
[ "$(md5sum < /mnt/a.bin | cut -d' ' -f1)" = "$want" ] && [ "$(md5sum < /mnt/b.bin | cut -d' ' -f1)" = "$want" ] && [ "$(cat /mnt/dir/hello.txt)" = hello ] && echo "RESULT fs=ok" || { echo "RESULT fs=mismatch"; exit 1; }
ls -l /mnt | sed 's/^/guest:   /'
umount /mnt
"#;

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

fn summary(api: &Path) -> Result<()> {
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
    if let (Some(p50), Some(p99)) = (quantile(&s, 0.5), quantile(&s, 0.99)) {
        say(format!(
            "  latency: p50 <= {:.0} us, p99 <= {:.0} us (histogram bucket bounds)",
            p50 * 1e6,
            p99 * 1e6
        ));
    }
    let disk: serde_json::Value =
        serde_json::from_str(&http::get(api, "/v1/disk")?.text()).context("GET /v1/disk")?;
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
    say(format!("created a {IMAGE_MIB} MiB raw disk image"));

    let (sock, api) = (dir.join("blk.sock"), dir.join("blk-api.sock"));
    let mut daemon = DaemonCommand::vhost_blk()?
        .args(["--socket".as_ref(), sock.as_os_str()])
        .args([
            "--disk".to_string(),
            format!("path={},serial=strata-demo", image.display()),
        ])
        .args(["--queues", "2"])
        .args(["--api-socket".as_ref(), api.as_os_str()])
        .spawn()
        .context("cannot start vhost-blk")?;
    say(format!(
        "vhost-blk is serving the image on {} (2 queues, io_uring)",
        sock.display()
    ));

    say("booting a Linux guest under QEMU (TCG, about 5-10 s)...");
    let payload = data((DATA_MIB << 20) as usize);
    let run = Guest::new("strata-demo")
        .script(GUEST_SCRIPT)
        .file("/data.bin", payload.clone())
        .blk_disk(&sock, 2)
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
    summary(&api)?;

    let status = daemon.terminate()?;
    if !status.success() {
        bail!("vhost-blk exited with {status} on SIGTERM");
    }
    say("vhost-blk drained, flushed and exited cleanly on SIGTERM");

    let img = std::fs::read(&image)?;
    let at = (DATA_OFFSET_MIB << 20) as usize;
    if img[at..at + payload.len()] != payload[..] {
        bail!("the image does not hold what the guest wrote at {DATA_OFFSET_MIB} MiB");
    }
    say(format!(
        "host check: the image holds exactly the {DATA_MIB} MiB the guest wrote at {DATA_OFFSET_MIB} MiB"
    ));
    say(format!(
        "done in {:.1} s; no process left behind",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
