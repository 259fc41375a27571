//! The whole stack in one Linux guest (Debian's cloud kernel under QEMU TCG): two vhost-blk
//! disks, a raw one with 2 queues and a tiered one in writeback mode with a cache smaller than
//! the data, and a vhost-fs share.
//!
//! On each disk the guest makes an ext2 file system (busybox `mke2fs`), copies a tree from the
//! share onto it and checks it against the host's checksums, copies it back from the disk
//! onto the share (the host compares those bytes with its originals), unmounts, drops its
//! caches, remounts and checks again. Afterwards the host runs `e2fsck` on the raw image, and
//! a second boot on the reopened tiered disk checks the tree once more: what the writeback
//! tier acknowledged survived a daemon restart.
//!
//! A daemon that loses writes fails this test: a dropped data block shows up as a checksum
//! mismatch after the remount, a dropped metadata block as a mount or e2fsck error.
//!
//! Needs `scripts/setup.sh` and our binaries built (`cargo build --workspace --bins`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use testkit::daemon::{Daemon, DaemonCommand, Readiness, LISTENING_MARKER};
use testkit::guest::{BlkDisk, Guest, GuestRun};
use testkit::tools::require_tool;

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 64 * MIB;
const TAG: &str = "stack";
const TIMEOUT: Duration = Duration::from_secs(180);

/// Files of the tree: sizes around block and page edges, and a few larger ones.
const FILE_SIZES: [(&str, usize); 12] = [
    ("empty", 0),
    ("one", 1),
    ("a/block-1", 4095),
    ("a/block", 4096),
    ("a/block+1", 4097),
    ("a/b/odd", 12_345),
    ("a/b/c/big", 1_048_579),
    ("a/b/c/bigger", 2_621_447),
    ("d/x", 65_536),
    ("d/y", 131_071),
    ("d/e/z", 777_777),
    ("d/e/last", 1_500_000),
];

/// Deterministic pseudo-random bytes (xorshift64), a different stream per file.
fn content(index: usize, len: usize) -> Vec<u8> {
    let mut state =
        0x243f_6a88_85a3_08d3u64 ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
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

/// Writes the tree into `share/tree` and its checksums into `share/MD5SUMS` (md5sum -c
/// format, paths relative to the tree).
fn make_share(share: &Path) -> Result<()> {
    let tree = share.join("tree");
    for (i, (name, size)) in FILE_SIZES.iter().enumerate() {
        let path = tree.join(name);
        fs::create_dir_all(path.parent().expect("files are under the tree"))?;
        fs::write(&path, content(i, *size))?;
    }
    let mut cmd = Command::new(require_tool("md5sum")?);
    cmd.current_dir(&tree);
    for (name, _) in FILE_SIZES {
        cmd.arg(name);
    }
    let out = cmd.output().context("md5sum on the host")?;
    ensure!(out.status.success(), "md5sum failed");
    fs::write(share.join("MD5SUMS"), out.stdout)?;
    Ok(())
}

/// Shell functions both guest scripts use.
const COMMON: &str = r#"
fail() { echo "RESULT error=$1"; exit 1; }
for d in vda vdb; do
    i=0
    while [ ! -b /dev/$d ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    [ -b /dev/$d ] || fail no-$d
done
mkdir -p /share
mount -t virtiofs stack /share || fail mount-share
check() { # dir label: md5sum -c of the tree copy in dir against the host's sums
    (cd "$1/tree" && md5sum -c /share/MD5SUMS > /tmp/md5.out 2>&1) || {
        cat /tmp/md5.out; fail "checksum-$2"; }
    echo "RESULT $2=ok"
}
"#;

/// The first boot: make the file systems, copy both ways, remount, check.
const FIRST_BOOT: &str = r#"
echo "RESULT vda_queues=$(ls /sys/block/vda/mq | wc -l)"
for d in vda vdb; do
    # Small requests: many of them, so a daemon that loses one in a hundred is caught.
    echo 16 > /sys/block/$d/queue/max_sectors_kb || fail max-sectors-$d
    mke2fs -F -L strata-$d /dev/$d > /tmp/mke2fs.out 2>&1 || { cat /tmp/mke2fs.out; fail mke2fs-$d; }
    mkdir -p /mnt/$d
    mount -t ext2 /dev/$d /mnt/$d || fail mount-$d
    cp -a /share/tree /mnt/$d/ || fail copy-in-$d
    sync
    check /mnt/$d copied_$d
    cp -a /mnt/$d/tree /share/back-$d || fail copy-out-$d
    umount /mnt/$d || fail umount-$d
done
sync
echo 3 > /proc/sys/vm/drop_caches
for d in vda vdb; do
    mount -t ext2 /dev/$d /mnt/$d || fail remount-$d
    check /mnt/$d remounted_$d
    umount /mnt/$d || fail umount2-$d
done
umount /share
echo "RESULT done=yes"
"#;

/// The second boot, on the reopened tiered disk: the tree is still there.
const SECOND_BOOT: &str = r#"
mkdir -p /mnt/vdb
mount -t ext2 -o ro /dev/vdb /mnt/vdb || fail mount-again
check /mnt/vdb reopened_vdb
umount /mnt/vdb
umount /share
echo "RESULT done=yes"
"#;

struct Stack {
    dir: tempfile::TempDir,
    raw_image: PathBuf,
    tier_spec: String,
    share: PathBuf,
}

impl Stack {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let raw_image = dir.path().join("raw.img");
        let capacity = dir.path().join("capacity.img");
        let cache = dir.path().join("cache.img");
        // Noise, not zeros, under the file systems: a lost write of mke2fs's zeroed tables
        // must leave garbage that e2fsck or the mount notices.
        let noise = content(usize::MAX >> 1, MIB as usize);
        for image in [&raw_image, &capacity] {
            let mut bytes = Vec::with_capacity(DISK_SIZE as usize);
            while (bytes.len() as u64) < DISK_SIZE {
                bytes.extend_from_slice(&noise);
            }
            fs::write(image, bytes)?;
        }
        let share = dir.path().join("share");
        make_share(&share)?;
        // A cache smaller than the tree: the writeback tier must evict and write back while
        // the guest works.
        let tier_spec = format!(
            "path={},cache={},cache-size=4M,cache-mode=writeback",
            capacity.display(),
            cache.display()
        );
        Ok(Self {
            dir,
            raw_image,
            tier_spec,
            share,
        })
    }

    fn blk(&self, name: &str, spec: &str, queues: u16) -> Result<(Daemon, PathBuf)> {
        let socket = self.dir.path().join(format!("{name}.sock"));
        let daemon = DaemonCommand::vhost_blk()?
            .name(name)
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(spec)
            .args(["--queues", &queues.to_string()])
            .spawn()?;
        Ok((daemon, socket))
    }

    fn fs(&self) -> Result<(Daemon, PathBuf)> {
        let socket = self.dir.path().join("fs.sock");
        let daemon = DaemonCommand::new(testkit::daemon::try_binary_path("vhost-fs")?)
            .name("vhost-fs")
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&self.share)
            .readiness(Readiness::StderrContains(LISTENING_MARKER.to_owned()))
            .spawn()?;
        Ok((daemon, socket))
    }

    /// Boots a guest with both disks and the share, running `script` after [`COMMON`].
    fn boot(&self, name: &str, script: &str) -> Result<GuestRun> {
        let raw_spec = format!("path={}", self.raw_image.display());
        let (mut raw, raw_sock) = self.blk("raw", &raw_spec, 2)?;
        let (mut tier, tier_sock) = self.blk("tiered", &self.tier_spec, 1)?;
        let (mut fs_daemon, fs_sock) = self.fs()?;
        let run = Guest::new(name)
            .blk_device(BlkDisk::new(&raw_sock).queues(2))
            .blk_device(BlkDisk::new(&tier_sock))
            .fs_share(&fs_sock, TAG)
            .script(format!("{COMMON}{script}"))
            .timeout(TIMEOUT)
            .run()?;
        eprintln!("{name}: guest took {:.1?}", run.elapsed);
        // Every daemon must shut down cleanly: the tier writes back and closes its journal.
        for daemon in [&mut raw, &mut tier, &mut fs_daemon] {
            let status = daemon.terminate()?;
            ensure!(
                status.success(),
                "{} exited {status}; its output:\n{}",
                daemon.name(),
                daemon.output()
            );
        }
        run.ensure_success()?;
        ensure!(run.require("done")? == "yes", "{}", run.context());
        Ok(run)
    }
}

#[test]
fn guest_uses_raw_and_tiered_disks_and_a_share_at_once() -> Result<()> {
    let stack = Stack::new()?;
    let run = stack.boot(
        "guest_uses_raw_and_tiered_disks_and_a_share_at_once",
        FIRST_BOOT,
    )?;
    ensure!(run.require("vda_queues")? == "2", "{}", run.context());
    for key in ["copied_vda", "copied_vdb", "remounted_vda", "remounted_vdb"] {
        ensure!(run.require(key)? == "ok", "{key}\n{}", run.context());
    }

    // Disk to share: the copies the guest made from its ext2 file systems match the originals.
    for disk in ["vda", "vdb"] {
        for (i, (name, size)) in FILE_SIZES.iter().enumerate() {
            let path = stack.share.join(format!("back-{disk}")).join(name);
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            ensure!(
                bytes == content(i, *size),
                "{} differs from the original {name}",
                path.display()
            );
        }
    }

    // The raw image is a clean ext2 file system to the host's e2fsck.
    let out = Command::new(require_tool("e2fsck")?)
        .args(["-f", "-n"])
        .arg(&stack.raw_image)
        .output()?;
    ensure!(
        out.status.success(),
        "e2fsck -fn on the raw image: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The tiered disk, reopened by a new daemon, still holds the tree.
    let run = stack.boot(
        "guest_uses_raw_and_tiered_disks_and_a_share_at_once_reopened",
        SECOND_BOOT,
    )?;
    ensure!(run.require("reopened_vdb")? == "ok", "{}", run.context());
    Ok(())
}
