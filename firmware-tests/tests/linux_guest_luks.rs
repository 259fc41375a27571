//! The kernel's dm-crypt, inside a Linux guest (this host has no device-mapper), opens LUKS
//! images our node wrote: a LUKS1 image we made and a LUKS2 one cryptsetup made with 4 KiB
//! sectors. On the host, data goes in through our `luks` node and a keyslot for a second
//! passphrase is added by our keyslot code (PBKDF2 in LUKS1, Argon2id in LUKS2, as
//! cryptsetup makes them); the image is then served raw to the guest, where `cryptsetup
//! open` with that second passphrase must give back the data.
//!
//! Needs `scripts/setup.sh` (QEMU, busybox-static, the guest kernel with its dm-crypt
//! modules, cryptsetup-bin) and our binaries built; a missing piece fails the test.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use storage_core::crypto::keyslots::KeyslotChanges;

use anyhow::{ensure, Context, Result};
use storage_core::disk::{open_disk, Disk, DiskOp, DiskQueue, DiskSpec, IoVecs};
use testkit::daemon::DaemonCommand;
use testkit::guest::{extra_modules, host_program, Guest};

const MIB: u64 = 1 << 20;
const DATA: usize = 4 << 20;
const MODULES: [&str; 5] = ["dm-mod", "dm-crypt", "gf128mul", "ecb", "xts"];

fn pattern() -> Vec<u8> {
    (0..DATA / 8)
        .flat_map(|i| ((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes())
        .collect()
}

fn key_file(dir: &Path, name: &str, pass: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, pass)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// Writes the pattern at 1 MiB through our luks node, then adds `new_pass` in a keyslot.
fn write_through_our_node(img: &Path, key: &Path, new_pass: &str) -> Result<()> {
    let spec: DiskSpec = format!(
        "path={},format=luks,key-file={}",
        img.display(),
        key.display()
    )
    .parse()?;
    let disk = open_disk(&spec)?;
    let mut q = disk.new_queue(4)?;
    let data = pattern();
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        let op = DiskOp::Write {
            offset: MIB + i as u64 * MIB,
            buffers: IoVecs::from_bytes(chunk),
        };
        q.start(op, 0)
            .map_err(|r| anyhow::anyhow!("refused: {}", r.error))?;
        q.submit()?;
        let c = loop {
            if let Some(c) = q.pop_completion() {
                break c;
            }
            q.wait()?;
        };
        ensure!(c.result == chunk.len() as i32, "write: {}", c.result);
    }
    disk.flush()?;
    let passphrase = std::fs::read(key)?;
    let slot = disk.luks().context("a luks disk")?.add_keyslot(
        &passphrase,
        new_pass.as_bytes(),
        &storage_core::crypto::KeyslotCost::minimal(),
    )?;
    eprintln!(
        "{}: the second passphrase is in keyslot {slot}",
        img.display()
    );
    Ok(())
}

#[test]
fn the_kernels_dm_crypt_opens_images_our_node_wrote() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let key1 = key_file(d, "key1", "the first passphrase")?;
    let key2 = key_file(d, "key2", "a second passphrase")?;
    // LUKS1, made by us.
    let luks1 = d.join("ours.luks1");
    storage_core::crypto::luks1::create_image(&luks1, 16 * MIB, b"the first passphrase", 1000)?;
    write_through_our_node(&luks1, &key1, "a second passphrase")?;
    // LUKS2 in 4 KiB sectors, made by cryptsetup.
    let luks2 = d.join("theirs.luks2");
    std::fs::write(&luks2, vec![0u8; 32 << 20])?;
    let cryptsetup = testkit::tools::require_tool("cryptsetup")?;
    let out = Command::new(&cryptsetup)
        .args([
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--sector-size",
            "4096",
        ])
        .args([
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
        ])
        .arg(&key1)
        .arg(&luks2)
        .output()?;
    ensure!(
        out.status.success(),
        "luksFormat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_through_our_node(&luks2, &key1, "a second passphrase")?;

    // Both served raw: the guest sees the ciphertext and decrypts it itself.
    let mut daemons = Vec::new();
    let mut guest = Guest::new("the_kernels_dm_crypt_opens_images_our_node_wrote");
    for (i, img) in [&luks1, &luks2].iter().enumerate() {
        let socket = d.join(format!("disk{i}.sock"));
        daemons.push(
            DaemonCommand::vhost_blk()?
                .arg("--socket")
                .arg(&socket)
                .arg("--disk")
                .arg(format!("path={}", img.display()))
                .spawn()?,
        );
        guest = guest.blk_disk(&socket, 1);
    }
    for (name, bytes) in extra_modules(&MODULES)? {
        guest = guest.file(&format!("/lib/modules/extra/{name}.ko"), bytes);
    }
    let files = host_program("cryptsetup")?;
    // The program first, at the path the script runs it by.
    let cryptsetup_path = files[0].0.clone();
    for (path, bytes) in files {
        guest = guest.executable(&path, bytes);
    }
    let script = format!(
        r#"
fail() {{ echo "RESULT error=$1"; exit 1; }}
for m in {modules}; do insmod /lib/modules/extra/$m.ko || fail insmod-$m; done
for d in vda vdb; do
    i=0
    while [ ! -b /dev/$d ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    [ -b /dev/$d ] || fail no-$d
done
mkdir -p /run/cryptsetup
export DM_DISABLE_UDEV=1
for d in vda vdb; do
    {cryptsetup} open --disable-locks --key-file /key2 /dev/$d c$d 2>/tmp/err || {{ cat /tmp/err; fail open-$d; }}
    dd if=/dev/mapper/c$d of=/tmp/read bs=1M skip=1 count=4 2>/dev/null || fail read-$d
    cmp /tmp/read /pattern.bin || fail data-$d
    echo "RESULT ok_$d=yes"
    {cryptsetup} close --disable-locks c$d || fail close-$d
done
"#,
        modules = MODULES.join(" "),
        cryptsetup = cryptsetup_path,
    );
    let run = guest
        .file("/key2", std::fs::read(&key2)?)
        .file("/pattern.bin", pattern())
        .memory_mib(512)
        .script(script)
        .run()?;
    for mut daemon in daemons {
        daemon.terminate()?;
    }
    eprintln!("console log: {}", run.log_path.display());
    run.ensure_success()?;
    ensure!(run.require("ok_vda")? == "yes", "{}", run.context());
    ensure!(run.require("ok_vdb")? == "yes", "{}", run.context());
    Ok(())
}
