//! Online resize: a Linux guest reads its disk's size, the disk grows through the API
//! (`strata disk resize`), and the guest sees the new size without a reboot (the daemon
//! sends the frontend a config-change message; QEMU interrupts the guest) and uses the new
//! space.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testkit::daemon::{binary_path, DaemonCommand};
use testkit::guest::{target_dir, Guest};

#[test]
fn a_guest_sees_its_disk_grow_without_a_reboot() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)?.set_len(64 << 20)?;
    let (sock, api) = (dir.path().join("blk.sock"), dir.path().join("api.sock"));
    let mut daemon = DaemonCommand::vhost_blk()
        .context("vhost-blk binary")?
        .arg("--socket")
        .arg(&sock)
        .arg("--api-socket")
        .arg(&api)
        .arg("--disk")
        .arg(format!("path={}", image.display()))
        .spawn()
        .context("starting vhost-blk")?;

    let name = "resize-online";
    let log = target_dir().join("guest-logs").join(format!("{name}.log"));
    let _ = std::fs::remove_file(&log);
    let api_w = api.clone();
    let resizer = std::thread::spawn(move || -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(200);
        while Instant::now() < deadline {
            if std::fs::read_to_string(&log).is_ok_and(|c| c.contains("SIZE-BEFORE")) {
                let out = Command::new(binary_path("strata"))
                    .arg("--api")
                    .arg(&api_w)
                    .args(["disk", "resize", "disk0", "128M"])
                    .output()?;
                if !out.status.success() {
                    bail!(
                        "strata disk resize: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the guest never reported SIZE-BEFORE")
    });
    // The last 4 KiB of the grown disk: sector 262136.
    let run = Guest::new(name)
        .script(
            "echo RESULT before=$(cat /sys/block/vda/size)\n\
             echo SIZE-BEFORE\n\
             i=0\n\
             while [ \"$(cat /sys/block/vda/size)\" = 131072 ] && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done\n\
             echo RESULT after=$(cat /sys/block/vda/size)\n\
             head -c 4096 /dev/urandom > /tmp/x\n\
             dd if=/tmp/x of=/dev/vda bs=4096 seek=32767 oflag=direct conv=fsync 2>&1 | tail -1\n\
             dd if=/dev/vda of=/tmp/y bs=4096 skip=32767 count=1 iflag=direct 2>&1 | tail -1\n\
             cmp /tmp/x /tmp/y && echo RESULT tail=same || echo RESULT tail=differs\n",
        )
        .blk_disk(&sock, 1)
        .timeout(Duration::from_secs(180))
        .run()?;
    run.ensure_success()?;
    let told = resizer.join().expect("resizer thread")?;
    assert!(told.contains("frontend told: yes"), "{told}");
    assert_eq!(run.require("before")?, "131072", "{}", run.context());
    assert_eq!(run.require("after")?, "262144", "{}", run.context());
    assert_eq!(run.require("tail")?, "same", "{}", run.context());
    assert_eq!(std::fs::metadata(&image)?.len(), 128 << 20);
    assert!(daemon.terminate()?.success());
    Ok(())
}
