//! Real firmware boots from disks that vhost-blk serves, under QEMU TCG.
//!
//! - SeaBIOS (QEMU's default BIOS) boots a vhost-user-blk disk with `bootindex=0`. The disk
//!   carries a boot program (`asm/bios-boot.asm`, assembled here with nasm) that reads a
//!   512 KiB payload through the BIOS disk services, hashes it, reads across and past the end
//!   of the disk, writes one sector and reads it back, and reports each step on the serial
//!   port. It runs on a raw disk, on a tiered disk, on a read-only disk, and on legacy-only
//!   and modern-only virtio devices.
//! - OVMF (UEFI) boots a GPT disk whose EFI system partition, built here, holds the Debian
//!   cloud kernel (an EFI program), an initramfs with a test script, and a `startup.nsh` that
//!   OVMF's UEFI shell runs to start the kernel. The guest then reads the whole boot disk
//!   through Linux's virtio-blk driver and reports its checksum. OVMF drives QEMU's default,
//!   transitional device through the legacy virtio interface (no VERSION_1), which
//!   qemu-storage-daemon refuses; a test here shows that, next to ours booting.
//!
//! Each QEMU run has a timeout and keeps its console log in `target/guest-logs/`.
//! Needs `scripts/setup.sh` (QEMU, seabios, ovmf, nasm, the guest kernel) and our binaries
//! built (`cargo build --workspace --bins`); a missing piece fails the test.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use testkit::daemon::{Daemon, DaemonCommand};
use testkit::guest::{BlkDisk, Firmware, Guest, GuestAssets, GuestRun};
use testkit::http;
use testkit::image::{FatImage, GptDisk};
use testkit::tools::require_tool;

const SECTOR: u64 = 512;
const DISK_SIZE: u64 = 64 << 20;
const DISK_SECTORS: u64 = DISK_SIZE / SECTOR;
/// The payload starts 3 sectors past 4 MiB: not aligned to any cache block or page.
const PAYLOAD_LBA: u64 = (4 << 20) / SECTOR + 3;
const PAYLOAD_SECTORS: u64 = 1024;
/// Where the boot program writes its pattern sector.
const WRITE_LBA: u64 = 100_003;
/// The line after which the boot program halts; the harness stops QEMU there.
const DONE: &str = "RESULT done=";
const SEABIOS_TIMEOUT: Duration = Duration::from_secs(60);
const OVMF_TIMEOUT: Duration = Duration::from_secs(180);
/// VIRTIO_F_VERSION_1: a modern driver negotiates it, a legacy one cannot.
const VERSION_1: u64 = 1 << 32;
/// What vhost-blk logs when a driver uses the legacy interface.
const LEGACY_LOG: &str = "legacy virtio driver";
/// What qemu-storage-daemon (libvhost-user) says when a driver uses the legacy interface.
const QSD_LEGACY_REFUSAL: &str = "virtio legacy devices aren't supported by libvhost-user";

/// The boot program, assembled for the disk layout above.
fn boot_program(dir: &Path) -> Result<Vec<u8>> {
    let nasm = require_tool("nasm")?;
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("asm/bios-boot.asm");
    let out = dir.join("bios-boot.bin");
    let output = Command::new(nasm)
        .args(["-f", "bin", "-w+all"])
        .arg(format!("-DPAYLOAD_LBA={PAYLOAD_LBA}"))
        .arg(format!("-DPAYLOAD_SECTORS={PAYLOAD_SECTORS}"))
        .arg(format!("-DDISK_SECTORS={DISK_SECTORS}"))
        .arg(format!("-DWRITE_LBA={WRITE_LBA}"))
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .output()
        .context("running nasm")?;
    ensure!(
        output.status.success(),
        "nasm {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let program = fs::read(&out)?;
    ensure!(
        program.len() == 4 * SECTOR as usize && program[510..512] == [0x55, 0xaa],
        "the boot program must be 4 sectors with a boot signature, got {} bytes",
        program.len()
    );
    Ok(program)
}

/// Deterministic pseudo-random bytes (xorshift64).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// 32-bit FNV-1a, the boot program's checksum.
fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5, |h: u32, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The sector the boot program writes: byte i is ((512 - i) & 0xff) ^ 0xa5.
fn pattern_sector() -> Vec<u8> {
    (0..512u32)
        .map(|i| ((512 - i) & 0xff) as u8 ^ 0xa5)
        .collect()
}

/// A BIOS boot disk: the boot program, the payload, noise everywhere else.
struct BiosDisk {
    image: Vec<u8>,
    payload_sum: u32,
}

fn bios_disk(dir: &Path) -> Result<BiosDisk> {
    let mut image = noise(0x5eab_1050, DISK_SIZE as usize);
    let program = boot_program(dir)?;
    image[..program.len()].copy_from_slice(&program);
    let payload = noise(0x9a71_0ad5, (PAYLOAD_SECTORS * SECTOR) as usize);
    let start = (PAYLOAD_LBA * SECTOR) as usize;
    image[start..start + payload.len()].copy_from_slice(&payload);
    Ok(BiosDisk {
        image,
        payload_sum: fnv1a(&payload),
    })
}

fn sector(image: &[u8], lba: u64) -> &[u8] {
    &image[(lba * SECTOR) as usize..((lba + 1) * SECTOR) as usize]
}

/// vhost-blk serving `disk_spec`, with its HTTP API on `dir/api.sock`.
fn vhost_blk(dir: &Path, name: &str, disk_spec: &str) -> Result<(Daemon, PathBuf, PathBuf)> {
    let socket = dir.join(format!("{name}.sock"));
    let api = dir.join(format!("{name}-api.sock"));
    let daemon = DaemonCommand::vhost_blk()?
        .name(name)
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(disk_spec)
        .arg("--api-socket")
        .arg(&api)
        .spawn()?;
    Ok((daemon, socket, api))
}

/// The features the last frontend acknowledged, from the daemon's API.
fn negotiated_features(api: &Path) -> Result<u64> {
    let body = http::get(api, "/v1/disks/disk0")?.text();
    let field = body
        .split("\"features_negotiated\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .with_context(|| format!("no features_negotiated in {body}"))?;
    Ok(u64::from_str_radix(field.trim_start_matches("0x"), 16)?)
}

/// The daemon's error counter of `kind`, summed over queues.
fn errors(api: &Path, kind: &str) -> Result<u64> {
    let text = http::get(api, "/metrics")?.text();
    let samples = http::parse_prometheus(&text).map_err(anyhow::Error::msg)?;
    Ok(samples
        .iter()
        .filter(|s| s.name == "strata_blk_errors_total")
        .filter(|s| s.labels.contains(&format!("kind=\"{kind}\"")))
        .map(|s| s.value as u64)
        .sum())
}

/// Boots SeaBIOS from `disk` and returns the run, failed unless the program finished.
fn seabios_boot(name: &str, disk: BlkDisk) -> Result<GuestRun> {
    let run = Guest::new(name)
        .firmware(Firmware::SeaBios)
        .memory_mib(128)
        .cpus(1)
        .blk_device(disk.bootindex(0))
        .stop_when_console_contains(DONE)
        .timeout(SEABIOS_TIMEOUT)
        .run()?;
    eprintln!("{name}: SeaBIOS run took {:.1?}", run.elapsed);
    run.ensure_success()?;
    ensure!(
        run.require("done")? == "yes",
        "the boot program stopped early\n{}",
        run.context()
    );
    Ok(run)
}

/// What every SeaBIOS boot must report about reading: the payload's checksum, an error for
/// the read that crosses the end (the device's IOERR: SeaBIOS passes it on) and for the one
/// past it (SeaBIOS refuses it itself), and the last sector readable.
fn check_bios_reads(run: &GuestRun, disk: &BiosDisk) -> Result<()> {
    ensure!(run.require("ext")? == "ok", "{}", run.context());
    ensure!(
        run.require("read")? == "ok",
        "payload read failed\n{}",
        run.context()
    );
    let sum = run.require("sum")?;
    ensure!(
        sum == format!("{:08X}", disk.payload_sum),
        "payload checksum {sum}, expected {:08X}\n{}",
        disk.payload_sum,
        run.context()
    );
    ensure!(
        run.require("straddle")?.starts_with("err"),
        "a read across the end of the disk succeeded\n{}",
        run.context()
    );
    ensure!(
        run.require("pastend")?.starts_with("err"),
        "a read past the end succeeded\n{}",
        run.context()
    );
    ensure!(run.require("lastsector")? == "ok", "{}", run.context());
    Ok(())
}

fn stop(daemon: &mut Daemon) -> Result<()> {
    let status = daemon.terminate()?;
    ensure!(
        status.success(),
        "{} exited {status}; its output:\n{}",
        daemon.name(),
        daemon.output()
    );
    Ok(())
}

#[test]
fn seabios_boots_from_a_raw_vhost_blk_disk() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = bios_disk(dir.path())?;
    let image = dir.path().join("disk.img");
    fs::write(&image, &disk.image)?;
    let (mut daemon, socket, api) =
        vhost_blk(dir.path(), "raw", &format!("path={}", image.display()))?;

    let run = seabios_boot(
        "seabios_boots_from_a_raw_vhost_blk_disk",
        BlkDisk::new(&socket),
    )?;
    check_bios_reads(&run, &disk)?;
    ensure!(run.require("write")? == "ok", "{}", run.context());
    ensure!(run.require("readback")? == "same", "{}", run.context());
    // The read across the end reached the daemon, which refused it as the spec says.
    ensure!(
        errors(&api, "out_of_range")? >= 1,
        "vhost-blk counted no out-of-range request"
    );
    stop(&mut daemon)?;

    // The image holds the written sector and nothing else changed.
    let after = fs::read(&image)?;
    ensure!(
        sector(&after, WRITE_LBA) == pattern_sector(),
        "sector {WRITE_LBA} does not hold what the boot program wrote"
    );
    let mut expected = disk.image.clone();
    let at = (WRITE_LBA * SECTOR) as usize;
    expected[at..at + 512].copy_from_slice(&pattern_sector());
    if let Some(pos) = after.iter().zip(&expected).position(|(a, e)| a != e) {
        bail!("the image changed at byte {pos}, outside the written sector");
    }
    Ok(())
}

#[test]
fn seabios_boots_from_a_tiered_vhost_blk_disk() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = bios_disk(dir.path())?;
    let image = dir.path().join("capacity.img");
    let cache = dir.path().join("cache.img");
    fs::write(&image, &disk.image)?;
    let spec = format!(
        "path={},cache={},cache-size=16M,cache-mode=writeback",
        image.display(),
        cache.display()
    );
    let (mut daemon, socket, _api) = vhost_blk(dir.path(), "tiered", &spec)?;
    let run = seabios_boot(
        "seabios_boots_from_a_tiered_vhost_blk_disk",
        BlkDisk::new(&socket),
    )?;
    check_bios_reads(&run, &disk)?;
    ensure!(run.require("write")? == "ok", "{}", run.context());
    ensure!(run.require("readback")? == "same", "{}", run.context());
    stop(&mut daemon)?;

    // A second boot from the same tier, reopened: the payload still reads back (this time
    // partly from the cache the first boot filled).
    let (mut daemon, socket, _api) = vhost_blk(dir.path(), "tiered2", &spec)?;
    let run = seabios_boot(
        "seabios_boots_from_a_tiered_vhost_blk_disk_again",
        BlkDisk::new(&socket),
    )?;
    check_bios_reads(&run, &disk)?;
    ensure!(run.require("readback")? == "same", "{}", run.context());
    stop(&mut daemon)
}

/// A read-only boot disk boots, and the write fails as on a write-protected disk: the
/// daemon refuses it (VIRTIO_BLK_F_RO; IOERR), keeps serving, and the image is unchanged.
#[test]
fn seabios_boots_from_a_read_only_disk_and_its_write_fails() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = bios_disk(dir.path())?;
    let image = dir.path().join("disk.img");
    fs::write(&image, &disk.image)?;
    let (mut daemon, socket, api) = vhost_blk(
        dir.path(),
        "readonly",
        &format!("path={},readonly=on", image.display()),
    )?;
    let run = seabios_boot(
        "seabios_boots_from_a_read_only_disk_and_its_write_fails",
        BlkDisk::new(&socket),
    )?;
    check_bios_reads(&run, &disk)?;
    ensure!(
        run.require("write")?.starts_with("err"),
        "a write to a read-only disk succeeded\n{}",
        run.context()
    );
    ensure!(
        run.value("readback").is_none(),
        "read back after a failed write\n{}",
        run.context()
    );
    ensure!(
        errors(&api, "read_only")? >= 1,
        "vhost-blk counted no refused write"
    );
    stop(&mut daemon)?;
    ensure!(
        fs::read(&image)? == disk.image,
        "the read-only image changed"
    );
    Ok(())
}

/// SeaBIOS drives a legacy-only device (`disable-modern=on`) without VERSION_1 and a
/// modern-only one (`disable-legacy=on`) with it; our daemon boots both.
#[test]
fn seabios_boots_through_legacy_and_modern_virtio() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = bios_disk(dir.path())?;
    for (property, legacy) in [("disable-modern=on", true), ("disable-legacy=on", false)] {
        let image = dir.path().join("disk.img");
        fs::write(&image, &disk.image)?;
        let (mut daemon, socket, api) =
            vhost_blk(dir.path(), "blk", &format!("path={}", image.display()))?;
        let name = format!(
            "seabios_boots_through_{}_virtio",
            if legacy { "legacy" } else { "modern" }
        );
        let run = seabios_boot(&name, BlkDisk::new(&socket).property(property))?;
        check_bios_reads(&run, &disk)?;
        ensure!(run.require("readback")? == "same", "{}", run.context());
        let features = negotiated_features(&api)?;
        ensure!(
            (features & VERSION_1 == 0) == legacy,
            "{property}: negotiated features {features:#x}"
        );
        stop(&mut daemon)?;
        ensure!(sector(&fs::read(&image)?, WRITE_LBA) == pattern_sector());
    }
    Ok(())
}

/// Why the legacy support matters: qemu-storage-daemon (libvhost-user) cannot serve a
/// device that a firmware drives through the legacy interface, so SeaBIOS cannot boot
/// from it; ours boots (the test above).
#[test]
fn qemu_storage_daemon_cannot_boot_a_legacy_device() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = bios_disk(dir.path())?;
    let image = dir.path().join("disk.img");
    fs::write(&image, &disk.image)?;
    let socket = dir.path().join("qsd.sock");
    let mut qsd = DaemonCommand::qemu_storage_daemon(&socket)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .spawn()?;
    let run = Guest::new("qemu_storage_daemon_cannot_boot_a_legacy_device")
        .firmware(Firmware::SeaBios)
        .memory_mib(128)
        .cpus(1)
        .blk_device(
            BlkDisk::new(&socket)
                .bootindex(0)
                .property("disable-modern=on"),
        )
        .stop_when_console_contains(DONE)
        // Ours finishes in about a second; this one hangs at "Booting from Hard Disk".
        .timeout(Duration::from_secs(10))
        .run()?;
    let _ = qsd.terminate();
    ensure!(
        run.value("done") != Some("yes") && run.value("sum").is_none(),
        "qemu-storage-daemon booted a legacy device after all\n{}",
        run.context()
    );
    let output = qsd.output();
    ensure!(
        output.contains(QSD_LEGACY_REFUSAL),
        "expected libvhost-user's refusal of a legacy device; qsd said:\n{output}\n{}",
        run.context()
    );
    Ok(())
}

/// The guest script of the OVMF boot: Linux reads its own boot disk through virtio-blk.
const OVMF_GUEST_SCRIPT: &str = r#"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || { echo "RESULT error=no-vda"; exit 1; }
echo "RESULT efi=$([ -d /sys/firmware/efi ] && echo yes || echo no)"
echo "RESULT size=$(blockdev --getsize64 /dev/vda)"
echo "RESULT disk_md5=$(md5sum < /dev/vda | cut -d' ' -f1)"
"#;

/// A GPT disk whose EFI system partition holds the guest kernel, `initrd` and a
/// `startup.nsh` that starts the kernel with `cmdline`.
fn esp_disk(initrd: Vec<u8>, cmdline: &str) -> Result<Vec<u8>> {
    let assets = GuestAssets::locate()?;
    let kernel =
        fs::read(&assets.kernel).with_context(|| format!("reading {}", assets.kernel.display()))?;
    ensure!(
        kernel.get(..2) == Some(b"MZ".as_slice()),
        "{} is not an EFI program",
        assets.kernel.display()
    );
    let mut esp = FatImage::new(32 << 20);
    esp.file("VMLINUZ.EFI", kernel)?;
    esp.file("INITRD.IMG", initrd)?;
    // OVMF finds no EFI\BOOT\BOOTX64.EFI, falls back to its UEFI shell, and the shell runs
    // this from the first file system: the ESP.
    let startup = format!("fs0:\r\n\\VMLINUZ.EFI {cmdline} initrd=\\INITRD.IMG\r\n");
    esp.file("STARTUP.NSH", startup.into_bytes())?;
    GptDisk::new(40 << 20).esp(esp.build()?)?.build()
}

/// Which server OVMF boots from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    VhostBlk,
    QemuStorageDaemon,
}

/// What one OVMF boot did.
struct OvmfBoot {
    /// The guest run, not yet checked.
    run: GuestRun,
    /// The boot disk's size and md5 on the host.
    disk_size: usize,
    disk_md5: String,
    /// For vhost-blk, the features the last driver (Linux) negotiated.
    features: Option<u64>,
    /// What the server printed.
    server_output: String,
}

/// Builds the ESP disk for a guest named `name`, serves it with `server` and boots it with
/// OVMF.
fn ovmf_run(
    name: &str,
    server: Server,
    property: Option<&str>,
    timeout: Duration,
) -> Result<OvmfBoot> {
    let dir = tempfile::tempdir()?;
    let guest = Guest::new(name)
        .firmware(Firmware::Ovmf)
        .script(OVMF_GUEST_SCRIPT)
        .timeout(timeout);
    let disk = esp_disk(guest.initramfs()?, &guest.kernel_command_line())?;
    let image = dir.path().join("esp-disk.img");
    fs::write(&image, &disk)?;
    let (mut daemon, socket, api) = match server {
        Server::VhostBlk => {
            let (daemon, socket, api) =
                vhost_blk(dir.path(), "esp", &format!("path={}", image.display()))?;
            (daemon, socket, Some(api))
        }
        Server::QemuStorageDaemon => {
            let socket = dir.path().join("qsd.sock");
            let daemon = DaemonCommand::qemu_storage_daemon(&socket)
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f0,filename={}",
                    image.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
                    socket.display()
                ))
                .spawn()?;
            (daemon, socket, None)
        }
    };
    let mut blk = BlkDisk::new(&socket).bootindex(0);
    if let Some(property) = property {
        blk = blk.property(property);
    }
    let run = guest.blk_device(blk).run()?;
    eprintln!("{name}: OVMF boot and guest took {:.1?}", run.elapsed);
    let features = match &api {
        Some(api) => Some(negotiated_features(api)?),
        None => None,
    };
    if server == Server::VhostBlk {
        stop(&mut daemon)?;
    } else {
        let _ = daemon.terminate();
    }
    Ok(OvmfBoot {
        run,
        disk_size: disk.len(),
        disk_md5: md5_hex(&image)?,
        features,
        server_output: daemon.output(),
    })
}

/// OVMF boots Linux from our disk; the guest reads the whole disk back. Returns the features
/// the last driver (Linux) negotiated.
fn ovmf_boot(name: &str, property: Option<&str>) -> Result<u64> {
    let boot = ovmf_run(name, Server::VhostBlk, property, OVMF_TIMEOUT)?;
    let run = &boot.run;
    run.ensure_success()?;
    ensure!(run.require("efi")? == "yes", "{}", run.context());
    ensure!(
        run.require("size")? == boot.disk_size.to_string(),
        "{}",
        run.context()
    );
    ensure!(
        run.require("disk_md5")? == boot.disk_md5,
        "the guest read a different disk (host md5 {})\n{}",
        boot.disk_md5,
        run.context()
    );
    if property.is_none() {
        // The firmware drove the transitional device through the legacy interface.
        ensure!(
            boot.server_output.contains(LEGACY_LOG),
            "vhost-blk did not see a legacy driver; its output:\n{}",
            boot.server_output
        );
    }
    boot.features.context("vhost-blk reports its features")
}

fn md5_hex(path: &Path) -> Result<String> {
    let out = Command::new(require_tool("md5sum")?).arg(path).output()?;
    ensure!(out.status.success(), "md5sum {}", path.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// OVMF boots Linux from a GPT/ESP disk on QEMU's default (transitional) device.
#[test]
fn ovmf_boots_linux_from_an_esp_on_vhost_blk() -> Result<()> {
    ovmf_boot("ovmf_boots_linux_from_an_esp_on_vhost_blk", None)?;
    Ok(())
}

/// The same on a modern-only device.
#[test]
fn ovmf_boots_linux_from_a_modern_only_device() -> Result<()> {
    let features = ovmf_boot(
        "ovmf_boots_linux_from_a_modern_only_device",
        Some("disable-legacy=on"),
    )?;
    ensure!(features & VERSION_1 != 0, "features {features:#x}");
    Ok(())
}

#[test]
fn boot_program_checksum_matches_a_known_value() {
    // FNV-1a test vectors: "" and "a".
    assert_eq!(fnv1a(b""), 0x811c_9dc5);
    assert_eq!(fnv1a(b"a"), 0xe40c_292c);
    assert_eq!(pattern_sector()[0], 0xa5);
    assert_eq!(pattern_sector()[511], 1 ^ 0xa5);
}

/// qemu-storage-daemon behind the same transitional device: OVMF's boot fails.
#[test]
fn qemu_storage_daemon_cannot_boot_ovmf() -> Result<()> {
    // Ours boots and finishes in about 15 s; this one stops at the firmware.
    let boot = ovmf_run(
        "qemu_storage_daemon_cannot_boot_ovmf",
        Server::QemuStorageDaemon,
        None,
        Duration::from_secs(25),
    )?;
    ensure!(
        boot.run.value("disk_md5").is_none(),
        "OVMF booted from qemu-storage-daemon after all\n{}",
        boot.run.context()
    );
    ensure!(
        boot.server_output.contains(QSD_LEGACY_REFUSAL),
        "expected libvhost-user's refusal of a legacy driver; qsd said:\n{}",
        boot.server_output
    );
    Ok(())
}
