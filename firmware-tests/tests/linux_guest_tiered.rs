//! A Linux guest on a write-back tiered disk: it writes data through the kernel's virtio-blk
//! driver and syncs; the daemon is then killed with SIGKILL while the guest is still up (the
//! data is dirty in the cache, not yet on the capacity device). After a restart, which
//! recovers the cache from its journal, a second guest reads back exactly what was written.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testkit::daemon::DaemonCommand;
use testkit::guest::{target_dir, Guest};
use testkit::http;

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn dirty_blocks(api: &std::path::Path) -> f64 {
    http::get(api, "/metrics")
        .ok()
        .and_then(|r| http::parse_prometheus(&r.text()).ok())
        .map(|s| {
            s.iter()
                .filter(|x| x.name == "strata_blk_cache_dirty_blocks")
                .map(|x| x.value)
                .sum()
        })
        .unwrap_or(-1.0)
}

#[test]
fn writeback_data_survives_sigkill_and_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cap = dir.path().join("capacity.img");
    std::fs::File::create(&cap)?.set_len(64 << 20)?;
    let (sock, api) = (dir.path().join("blk.sock"), dir.path().join("api.sock"));
    // seq-cutoff=0: dd's sequential stream would otherwise bypass the cache.
    let spec = format!(
        "path={},cache={},cache-size=16M,cache-mode=writeback,seq-cutoff=0",
        cap.display(),
        dir.path().join("cache.img").display()
    );
    let start = || {
        DaemonCommand::vhost_blk()
            .context("vhost-blk binary")?
            .arg("--socket")
            .arg(&sock)
            .arg("--api-socket")
            .arg(&api)
            .arg("--disk")
            .arg(&spec)
            .spawn()
            .context("starting vhost-blk")
    };
    let payload = data(8 << 20, 0x7157_ab1e);

    let mut daemon = start()?;
    let pid = daemon.pid();
    let name = "tiered-writeback-sigkill";
    let log = target_dir().join("guest-logs").join(format!("{name}.log"));
    let _ = std::fs::remove_file(&log);
    // Kill the daemon as soon as the guest has synced, while it is still running.
    let api_w = api.clone();
    let watcher = std::thread::spawn(move || -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(200);
        while Instant::now() < deadline {
            if std::fs::read_to_string(&log).is_ok_and(|c| c.contains("SYNCED")) {
                let dirty = dirty_blocks(&api_w);
                // SAFETY: signalling our own child, which is not reaped until `daemon.kill()`.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                return Ok(dirty);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the guest never reported SYNCED")
    });
    let run = Guest::new(name)
        .file("/data.bin", payload.clone())
        .script(
            "dd if=/data.bin of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>&1 | tail -1\n\
             sync\n\
             echo SYNCED\n\
             sleep 3\n\
             echo GUEST-IDLE\n\
             sleep 60\n",
        )
        .blk_disk(&sock, 1)
        .stop_when_console_contains("GUEST-IDLE")
        .timeout(Duration::from_secs(180))
        .run()?;
    run.ensure_success()?;
    let dirty = watcher.join().expect("watcher thread")?;
    let status = daemon.kill();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the daemon should have died of SIGKILL: {status:?}"
    );
    assert!(
        dirty > 0.0,
        "the written data should have been dirty in the cache ({dirty})"
    );

    let mut daemon = start()?;
    let run = Guest::new("tiered-writeback-after-restart")
        .file("/data.bin", payload)
        .script(
            "dd if=/dev/vda of=/tmp/back.bin bs=64k skip=16 count=128 iflag=direct 2>&1 | tail -1\n\
             cmp /data.bin /tmp/back.bin && echo RESULT same=yes || echo RESULT same=no\n",
        )
        .blk_disk(&sock, 1)
        .timeout(Duration::from_secs(180))
        .run()?;
    run.ensure_success()?;
    assert_eq!(run.require("same")?, "yes", "{}", run.context());
    assert!(daemon.terminate()?.success());
    Ok(())
}
