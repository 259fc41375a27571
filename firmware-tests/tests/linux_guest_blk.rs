//! A real Linux guest (Debian's cloud kernel under QEMU TCG) uses a 2-queue vhost-user-blk
//! disk through its own virtio-blk driver: it writes data from both vCPUs, reads it back, and
//! the host checks the image holds exactly what the guest wrote and nothing else changed.
//!
//! The same workload runs against qemu-storage-daemon as a reference server, so a failure
//! against ours can be told apart from a broken guest setup. The first tests here check the
//! guest harness itself (boot, modules, results, failure and timeout reporting).
//!
//! Needs `scripts/setup.sh` (QEMU, busybox-static, the guest kernel) and our binaries built
//! (`cargo build --workspace --bins`); every missing piece is a test failure, never a skip.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use testkit::daemon::{Daemon, DaemonCommand};
use testkit::guest::{Guest, GUEST_MODULES};

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 64 * MIB;
const DATA_LEN: usize = 4 << 20;
/// dd block size in the guest; the offsets below are multiples of it.
const BLOCK: u64 = 64 * 1024;
/// Where the guest writes its two data files: apart, and not aligned to anything larger
/// than the dd block, so an offset mix-up in the request path shows.
const OFFSET_A: u64 = MIB;
const OFFSET_B: u64 = 40 * MIB + 3 * BLOCK;
const QUEUES: u16 = 2;

#[test]
fn guest_boots_loads_modules_and_reports_results() -> Result<()> {
    let run = Guest::new("guest_boots_loads_modules_and_reports_results")
        .file("/etc/strata/greeting", "hello from the host\n")
        .script(
            r#"
echo "RESULT cpus=$(nproc)"
echo "RESULT modules=$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ,)"
echo "RESULT greeting=$(tr ' ' _ < /etc/strata/greeting)" "other=1"
"#,
        )
        .run()?;
    run.ensure_success()?;
    eprintln!("guest boot and script took {:.1?}", run.elapsed);
    assert_eq!(run.require("cpus")?, "2");
    assert_eq!(run.require("greeting")?, "hello_from_the_host");
    assert_eq!(run.require("other")?, "1");
    let loaded: Vec<&str> = run
        .require("modules")?
        .split(',')
        .filter(|m| !m.is_empty())
        .collect();
    for module in GUEST_MODULES {
        assert!(
            loaded.contains(&module),
            "{module} not loaded: {loaded:?}\n{}",
            run.context()
        );
    }
    Ok(())
}

#[test]
fn failing_guest_script_fails_the_run() -> Result<()> {
    let run = Guest::new("failing_guest_script_fails_the_run")
        .script("echo 'RESULT reached=yes'\nexit 7\n")
        .run()?;
    assert_eq!(run.script_status(), Some(7), "{}", run.context());
    assert_eq!(run.value("reached"), Some("yes"));
    let err = run.ensure_success().unwrap_err().to_string();
    assert!(err.contains("/test.sh exited with status 7"), "{err}");
    Ok(())
}

#[test]
fn hung_guest_is_killed_at_the_timeout() -> Result<()> {
    let run = Guest::new("hung_guest_is_killed_at_the_timeout")
        .script("sleep 100000\n")
        .timeout(Duration::from_secs(3))
        .run()?;
    assert!(run.timed_out, "{}", run.context());
    assert!(
        run.elapsed < Duration::from_secs(30),
        "took {:?}",
        run.elapsed
    );
    let err = run.ensure_success().unwrap_err().to_string();
    assert!(err.contains("timeout"), "{err}");
    Ok(())
}

/// The acceptance test: our vhost-blk serving a 2-queue disk to the guest's virtio-blk driver.
#[test]
fn linux_guest_writes_and_reads_vhost_blk_disk() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("vhost-blk.sock");
    fs::write(&image, pattern_image())?;

    let mut daemon = DaemonCommand::vhost_blk()?
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(format!("path={}", image.display()))
        .args(["--queues", &QUEUES.to_string()])
        .spawn()?;
    let run_result = guest_write_read(&socket, "linux_guest_writes_and_reads_vhost_blk_disk");
    let status = daemon.terminate();
    run_result?;
    let status = status?;
    ensure!(
        status.success(),
        "vhost-blk exited {status} on SIGTERM; output:\n{}",
        daemon.output()
    );
    check_image(&image)
}

/// The same on a qcow2 overlay over a raw base: the guest reads the base through the
/// overlay and writes into it; afterwards qemu-img finds the overlay clean, its contents (as
/// qemu-img reads them) are the base plus what the guest wrote, and the base is untouched.
#[test]
fn linux_guest_writes_and_reads_a_qcow2_overlay() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.raw");
    let overlay = dir.path().join("vm.qcow2");
    let socket = dir.path().join("vhost-blk.sock");
    fs::write(&base, pattern_image())?;
    testkit::tools::qemu_img_overlay_on_raw_base(&overlay);
    let mut daemon = DaemonCommand::vhost_blk()?
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(format!("path={},format=qcow2", overlay.display()))
        .args(["--queues", &QUEUES.to_string()])
        .spawn()?;
    let run_result = guest_write_read(&socket, "linux_guest_writes_and_reads_a_qcow2_overlay");
    let status = daemon.terminate();
    run_result?;
    let status = status?;
    ensure!(
        status.success(),
        "vhost-blk exited {status} on SIGTERM; output:\n{}",
        daemon.output()
    );
    testkit::tools::qemu_img_ok(&["check", overlay.to_str().context("path")?]);
    let flat = dir.path().join("flat.raw");
    testkit::tools::qemu_img_ok(&[
        "convert",
        "-O",
        "raw",
        overlay.to_str().context("path")?,
        flat.to_str().context("path")?,
    ]);
    check_image(&flat)?;
    ensure!(
        fs::read(&base)? == pattern_image(),
        "the base image changed"
    );
    Ok(())
}

/// The same workload against qemu-storage-daemon: proves the guest side of the test is sound.
#[test]
fn linux_guest_writes_and_reads_qemu_storage_daemon_disk() -> Result<()> {
    testkit::tools::require_tool("qemu-storage-daemon")?;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("qsd.sock");
    fs::write(&image, pattern_image())?;

    let mut daemon: Daemon = DaemonCommand::qemu_storage_daemon(&socket)
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f0,filename={}", image.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={QUEUES}",
            socket.display()
        ))
        .spawn()?;
    let run_result = guest_write_read(
        &socket,
        "linux_guest_writes_and_reads_qemu_storage_daemon_disk",
    );
    // Stop it before reading the image so every write it accepted is in the file.
    daemon.terminate()?;
    run_result?;
    check_image(&image)
}

/// Boots a guest on the disk at `socket`; the guest writes `data(SEED_A)` at `OFFSET_A` from
/// vCPU 0 and `data(SEED_B)` at `OFFSET_B` from vCPU 1 at the same time, with O_DIRECT and
/// fsync, drops its caches, reads both regions back with O_DIRECT from the other vCPU, and
/// compares them with the files it wrote.
fn guest_write_read(socket: &Path, name: &str) -> Result<()> {
    let script = format!(
        r#"
fail() {{ echo "RESULT error=$1"; exit 1; }}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || fail no-/dev/vda
echo "RESULT size=$(blockdev --getsize64 /dev/vda)"
echo "RESULT hw_queues=$(ls /sys/block/vda/mq | wc -l)"

taskset -c 0 dd if=/data_a.bin of=/dev/vda bs={bs} seek={seek_a} oflag=direct conv=fsync 2>/tmp/dd_a &
pid_a=$!
taskset -c 1 dd if=/data_b.bin of=/dev/vda bs={bs} seek={seek_b} oflag=direct conv=fsync 2>/tmp/dd_b &
pid_b=$!
wait $pid_a; write_a=$?
wait $pid_b; write_b=$?
cat /tmp/dd_a /tmp/dd_b
echo "RESULT write_a=$write_a write_b=$write_b"
[ $write_a = 0 ] && [ $write_b = 0 ] || fail write

sync
echo 3 > /proc/sys/vm/drop_caches
taskset -c 1 dd if=/dev/vda of=/tmp/read_a bs={bs} skip={seek_a} count={count} iflag=direct 2>/tmp/dd_a &
pid_a=$!
taskset -c 0 dd if=/dev/vda of=/tmp/read_b bs={bs} skip={seek_b} count={count} iflag=direct 2>/tmp/dd_b &
pid_b=$!
wait $pid_a; read_a=$?
wait $pid_b; read_b=$?
cat /tmp/dd_a /tmp/dd_b
echo "RESULT read_a=$read_a read_b=$read_b"
[ $read_a = 0 ] && [ $read_b = 0 ] || fail read

md5() {{ md5sum < "$1" | cut -d' ' -f1; }}
echo "RESULT md5_data_a=$(md5 /data_a.bin) md5_read_a=$(md5 /tmp/read_a)"
echo "RESULT md5_data_b=$(md5 /data_b.bin) md5_read_b=$(md5 /tmp/read_b)"
cmp /data_a.bin /tmp/read_a || fail readback-a
cmp /data_b.bin /tmp/read_b || fail readback-b
echo "RESULT verified=yes"
"#,
        bs = BLOCK,
        seek_a = OFFSET_A / BLOCK,
        seek_b = OFFSET_B / BLOCK,
        count = DATA_LEN as u64 / BLOCK,
    );
    let run = Guest::new(name)
        .blk_disk(socket, QUEUES)
        .file("/data_a.bin", data(SEED_A))
        .file("/data_b.bin", data(SEED_B))
        .script(script)
        .run()?;
    eprintln!(
        "guest run took {:.1?}; console log: {}",
        run.elapsed,
        run.log_path.display()
    );
    run.ensure_success()?;
    ensure!(
        run.require("size")? == IMAGE_SIZE.to_string(),
        "disk size\n{}",
        run.context()
    );
    ensure!(
        run.require("hw_queues")? == QUEUES.to_string(),
        "virtio-blk queues\n{}",
        run.context()
    );
    ensure!(
        run.require("md5_read_a")? == run.require("md5_data_a")?,
        "region A\n{}",
        run.context()
    );
    ensure!(
        run.require("md5_read_b")? == run.require("md5_data_b")?,
        "region B\n{}",
        run.context()
    );
    ensure!(run.require("verified")? == "yes", "{}", run.context());
    Ok(())
}

/// Checks every byte of the image: the guest's data at its two offsets, the fill pattern
/// everywhere else.
fn check_image(image: &Path) -> Result<()> {
    let actual = fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let mut expected = pattern_image();
    splice(&mut expected, OFFSET_A, &data(SEED_A));
    splice(&mut expected, OFFSET_B, &data(SEED_B));
    ensure!(
        actual.len() == expected.len(),
        "image is {} bytes, expected {}",
        actual.len(),
        expected.len()
    );
    if let Some(pos) = actual.iter().zip(&expected).position(|(a, e)| a != e) {
        let mismatched = actual.iter().zip(&expected).filter(|(a, e)| a != e).count();
        let region = if in_region(pos as u64, OFFSET_A) {
            "inside region A"
        } else if in_region(pos as u64, OFFSET_B) {
            "inside region B"
        } else {
            "outside the written regions"
        };
        anyhow::bail!(
            "image differs from what the guest wrote: first at byte {pos} ({region}), \
             {mismatched} bytes in all; actual {:02x?}, expected {:02x?}",
            &actual[pos..(pos + 16).min(actual.len())],
            &expected[pos..(pos + 16).min(expected.len())],
        );
    }
    Ok(())
}

fn in_region(pos: u64, start: u64) -> bool {
    (start..start + DATA_LEN as u64).contains(&pos)
}

fn splice(image: &mut [u8], offset: u64, data: &[u8]) {
    let start = usize::try_from(offset).expect("offset fits usize");
    image[start..start + data.len()].copy_from_slice(data);
}

const SEED_A: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED_B: u64 = 0xd1b5_4a32_d192_ed03;

/// Deterministic pseudo-random data (xorshift64), so a failure reproduces exactly.
fn data(seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(DATA_LEN);
    while out.len() < DATA_LEN {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out
}

/// The image before the guest runs: each 8-byte word holds its own offset mixed with a tag,
/// so a stray write anywhere, or data landing at the wrong offset, is visible.
fn pattern_image() -> Vec<u8> {
    const TAG: u64 = 0x5354_5241_5441_0000; // "STRATA"
    (0..IMAGE_SIZE / 8)
        .flat_map(|word| ((word * 8) ^ TAG).to_le_bytes())
        .collect()
}

#[test]
fn test_data_is_deterministic_and_distinct() {
    assert_eq!(data(SEED_A), data(SEED_A));
    assert_ne!(data(SEED_A), data(SEED_B));
    let image = pattern_image();
    assert_eq!(image.len() as u64, IMAGE_SIZE);
    assert_ne!(
        image[OFFSET_A as usize..][..8],
        image[OFFSET_B as usize..][..8]
    );
}

#[test]
fn image_check_catches_missing_and_stray_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");

    fs::write(&image, pattern_image())?;
    let err = check_image(&image).unwrap_err().to_string();
    assert!(
        err.contains(&format!("first at byte {OFFSET_A} (inside region A)")),
        "{err}"
    );

    let mut written = pattern_image();
    splice(&mut written, OFFSET_A, &data(SEED_A));
    splice(&mut written, OFFSET_B, &data(SEED_B));
    fs::write(&image, &written)?;
    check_image(&image)?;

    written[7] ^= 1;
    fs::write(&image, &written)?;
    let err = check_image(&image).unwrap_err().to_string();
    assert!(
        err.contains("first at byte 7 (outside the written regions)"),
        "{err}"
    );
    Ok(())
}
