//! A real Linux guest (Debian's cloud kernel under QEMU TCG) mounts a vhost-fs share with its
//! own virtiofs driver and runs a workload that touches the FUSE operations a shell can
//! reach: create, write, read, stat, chmod, chown, truncate, fallocate, mkdir, rmdir, mknod
//! (FIFO), symlink, readlink, hard links, rename, unlink, readdir of many entries, statfs,
//! sync, and a create by an unprivileged user. The host checks what the guest left behind.
//!
//! The same workload also runs against virtiofsd (`cargo install virtiofsd`, see
//! scripts/setup.sh), and every result the guest observed must match between the two.
//! The escape attempts a guest can make from a shell (`..` at the root, a symlink to /etc,
//! a hard link and a rename across the share's edge) run here too; the daemon-side escape
//! tests are vhost-fs's own unit tests.
//!
//! Needs `scripts/setup.sh` and our binaries built (`cargo build --workspace --bins`); a
//! missing piece is a test failure, never a skip.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use testkit::daemon::{Daemon, DaemonCommand, Readiness, LISTENING_MARKER};
use testkit::guest::{Guest, GuestRun};

const TAG: &str = "strata";

/// The guest's workload. Every line it prints as `RESULT key=value` is compared between
/// our daemon and virtiofsd; values are deterministic (no inode numbers, no times).
const WORKLOAD: &str = r#"
set -u
mount -t virtiofs strata /mnt || { echo "STRATA-GUEST-ERROR mount failed"; exit 1; }
cd /mnt
r() { echo "RESULT $1=$2"; }
e() { # run, report the exit status as ok or the error
    if out=$("$@" 2>&1); then echo ok; else echo "fail"; fi
}
r host_file "$(cat from-host.txt)"
# create, write, read back
echo hello > a.txt
r read_back "$(cat a.txt)"
dd if=/dev/zero bs=4096 count=300 2>/dev/null | tr '\0' 'x' > big.bin
r big_size "$(stat -c %s big.bin)"
r big_md5 "$(md5sum big.bin | cut -d' ' -f1)"
dd if=big.bin of=copy.bin bs=1M 2>/dev/null
r copy_cmp "$(cmp big.bin copy.bin && echo same)"
# overwrite in the middle, append
printf 'MIDDLE' | dd of=big.bin bs=1 seek=5000 conv=notrunc 2>/dev/null
echo tail >> big.bin
r big_md5_after "$(md5sum big.bin | cut -d' ' -f1)"
r big_size_after "$(stat -c %s big.bin)"
# attributes
chmod 640 a.txt
r mode "$(stat -c %a a.txt)"
chown 1234:5678 a.txt
r owner "$(stat -c %u:%g a.txt)"
chmod 4755 a.txt
chown 1000:1000 a.txt
r suid_after_chown "$(stat -c %a a.txt)"
truncate -s 100000 a.txt
r truncated "$(stat -c %s a.txt)"
fallocate -l 200000 falloc.bin
r fallocated "$(stat -c %s falloc.bin)"
touch -d '2020-01-02 03:04:05' a.txt
r mtime "$(stat -c %Y a.txt)"
# directories
mkdir -p d1/d2/d3
r mkdir "$(stat -c %F d1/d2/d3)"
r dir_nlink "$(stat -c %h d1/d2)"
r rmdir_nonempty "$(e rmdir d1/d2)"
rmdir d1/d2/d3
r rmdir "$(e test ! -e d1/d2/d3)"
# special files: a FIFO exists but is never opened by the daemon
mkfifo fifo
r fifo_type "$(stat -c %F fifo)"
# symlinks: created and read, never followed by the host
ln -s a.txt link
r readlink "$(readlink link)"
r link_type "$(stat -c %F link)"
r through_link "$(stat -L -c %s link)"
# hard links
ln copy.bin hard.bin
r nlink "$(stat -c %h copy.bin)"
r same_inode "$(test copy.bin -ef hard.bin && echo yes)"
# rename, overwrite by rename, unlink
mv hard.bin renamed.bin
r rename_old_gone "$(e test ! -e hard.bin)"
echo other > other.txt
mv other.txt renamed.bin
r rename_replaced "$(cat renamed.bin)"
r nlink_after "$(stat -c %h copy.bin)"
rm copy.bin
r unlinked "$(e test ! -e copy.bin)"
# errors the guest sees
r err_enoent "$(e cat missing.txt)"
r err_mkdir_exists "$(e mkdir d1)"
r err_rmdir_file "$(e rmdir a.txt)"
r err_unlink_dir "$(e rm d1)"
# a directory of many entries
mkdir many
i=0
while [ $i -lt 300 ]; do : > many/f$i; i=$((i+1)); done
r many_count "$(ls many | wc -l)"
r many_sorted_first "$(ls many | sort | head -1)"
rm many/f1*
r many_after_rm "$(ls many | wc -l)"
# statfs
r statfs "$(e df /mnt)"
# an unprivileged guest user creates a file: the host owner is that user
mkdir pub && chmod 777 pub
su -s /bin/sh user -c 'echo mine > /mnt/pub/user.txt'
r user_owner "$(stat -c %u:%g pub/user.txt)"
r user_denied "$(su -s /bin/sh user -c 'echo x >> /mnt/from-host.txt' 2>/dev/null && echo written || echo denied)"
# escape attempts from inside the guest
r dotdot_root "$(ls -d /mnt/.. )"
r dotdot_listing "$(ls /mnt/../ | grep -c from-host.txt)"
ln -s /etc etc-link
r etc_link "$(readlink etc-link)"
r link_outside "$(e ln /init /mnt/init-link)"
echo moving > leaving.txt
mv leaving.txt /tmp/ 2>/dev/null
r moved_out "$(e test ! -e /mnt/leaving.txt)"
sync
r listing "$(ls /mnt | tr '\n' ,)"
cd /
umount /mnt
r umount ok
"#;

/// The share the workload starts from.
fn make_share(dir: &Path) -> Result<PathBuf> {
    let share = dir.join("share");
    fs::create_dir(&share)?;
    fs::write(share.join("from-host.txt"), "host-data\n")?;
    Ok(share)
}

/// What the host sees after the workload: names, types, sizes, modes, owners, link counts.
fn host_view(share: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![share.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path)?;
            let rel = path.strip_prefix(share)?.display().to_string();
            let kind = if meta.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if meta.file_type().is_symlink() {
                format!("link->{}", fs::read_link(&path)?.display())
            } else if meta.file_type().is_fifo() {
                "fifo".to_string()
            } else {
                format!("file:{}", meta.len())
            };
            let nlink = if meta.is_dir() { 0 } else { meta.nlink() };
            out.insert(
                rel,
                format!(
                    "{kind} {:o} {}:{} n{nlink}",
                    meta.permissions().mode() & 0o7777,
                    meta.uid(),
                    meta.gid()
                ),
            );
        }
    }
    Ok(out)
}

fn run_workload(name: &str, socket: &Path) -> Result<GuestRun> {
    let run = Guest::new(name)
        .fs_share(socket, TAG)
        .file(
            "/etc/passwd",
            "root:x:0:0:root:/:/bin/sh\nuser:x:1000:1000:user:/:/bin/sh\n",
        )
        .file("/etc/group", "root:x:0:\nuser:x:1000:\n")
        .script(WORKLOAD)
        .timeout(Duration::from_secs(180))
        .run()?;
    run.ensure_success()?;
    Ok(run)
}

fn vhost_fs(share: &Path, socket: &Path, extra: &[&str]) -> Result<Daemon> {
    Ok(
        DaemonCommand::new(testkit::daemon::try_binary_path("vhost-fs")?)
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(share)
            .args(extra)
            .readiness(Readiness::StderrContains(LISTENING_MARKER.to_owned()))
            .spawn()?,
    )
}

fn virtiofsd(share: &Path, socket: &Path) -> Result<Daemon> {
    let program = testkit::tools::require_tool("virtiofsd").context(
        "virtiofsd is the reference server for this test: scripts/setup.sh installs it (cargo install virtiofsd)",
    )?;
    let daemon = DaemonCommand::new(program)
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .args(["--cache=auto", "--sandbox=none"])
        .readiness(Readiness::Spawned)
        .spawn()?;
    // virtiofsd prints nothing on readiness: wait for its socket file.
    ensure!(
        testkit::daemon::wait_for_path(socket, Duration::from_secs(20)),
        "virtiofsd did not create {}",
        socket.display()
    );
    Ok(daemon)
}

/// Waits for a daemon that exits when its frontend disconnects, as virtiofsd does.
fn expect_exit(daemon: &mut Daemon) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = daemon.try_wait()? {
            ensure!(
                status.success(),
                "{} exited {status}; output:\n{}",
                daemon.name(),
                daemon.output()
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} still running after its frontend left",
            daemon.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_host_side(share: &Path, outside: &Path) -> Result<()> {
    let view = host_view(share)?;
    let get = |k: &str| {
        view.get(k)
            .cloned()
            .unwrap_or_else(|| format!("<missing {k}>"))
    };
    ensure!(
        get("etc-link") == format!("link->/etc {:o} 0:0 n1", 0o777),
        "etc-link: {}",
        get("etc-link")
    );
    ensure!(get("fifo").starts_with("fifo "), "fifo: {}", get("fifo"));
    ensure!(
        get("pub/user.txt").contains(" 1000:1000 "),
        "pub/user.txt: {}",
        get("pub/user.txt")
    );
    ensure!(
        get("a.txt").starts_with("file:100000 "),
        "a.txt: {}",
        get("a.txt")
    );
    ensure!(
        !view.contains_key("leaving.txt") && !view.contains_key("init-link"),
        "{view:?}"
    );
    // Nothing next to the share changed (the daemon removed its socket when it exited).
    let siblings: Vec<_> = fs::read_dir(outside)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    ensure!(
        siblings == ["share"],
        "the share's parent changed: {siblings:?}"
    );
    Ok(())
}

#[test]
fn linux_guest_uses_a_vhost_fs_share() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let share = make_share(dir.path())?;
    let socket = dir.path().join("fs.sock");
    let mut daemon = vhost_fs(&share, &socket, &["--queues", "2"])?;
    let started = Instant::now();
    let run = run_workload("linux_guest_uses_a_vhost_fs_share", &socket);
    let run = match run {
        Ok(r) => r,
        Err(e) => return Err(e.context(format!("vhost-fs output:\n{}", daemon.output()))),
    };
    eprintln!("guest workload on vhost-fs took {:.1?}", started.elapsed());
    expect_exit(&mut daemon)?;
    for (key, want) in [
        ("host_file", "host-data"),
        ("read_back", "hello"),
        ("big_size", "1228800"),
        ("copy_cmp", "same"),
        ("mode", "640"),
        ("owner", "1234:5678"),
        ("suid_after_chown", "755"),
        ("truncated", "100000"),
        ("fallocated", "200000"),
        ("mtime", "1577934245"),
        ("readlink", "a.txt"),
        ("nlink", "2"),
        ("same_inode", "yes"),
        ("rename_replaced", "other"),
        ("nlink_after", "1"),
        ("err_enoent", "fail"),
        ("err_rmdir_file", "fail"),
        ("many_count", "300"),
        ("many_after_rm", "189"),
        ("user_owner", "1000:1000"),
        ("user_denied", "denied"),
        ("dotdot_listing", "0"),
        ("etc_link", "/etc"),
        ("link_outside", "fail"),
        ("moved_out", "ok"),
        ("umount", "ok"),
    ] {
        assert_eq!(run.require(key)?, want, "{key}\n{}", run.context());
    }
    check_host_side(&share, dir.path())
}

#[test]
fn guest_sees_the_same_results_from_vhost_fs_and_virtiofsd() -> Result<()> {
    let mut results = Vec::new();
    for peer in ["vhost-fs", "virtiofsd"] {
        let dir = tempfile::tempdir()?;
        let share = make_share(dir.path())?;
        let socket = dir.path().join("fs.sock");
        let mut daemon = match peer {
            "vhost-fs" => vhost_fs(&share, &socket, &["--sandbox", "none"])?,
            _ => virtiofsd(&share, &socket)?,
        };
        let started = Instant::now();
        let run = run_workload(&format!("fs_compare_{peer}"), &socket)
            .map_err(|e| e.context(format!("{peer} output:\n{}", daemon.output())))?;
        eprintln!("guest workload on {peer} took {:.1?}", started.elapsed());
        expect_exit(&mut daemon)?;
        let observed: BTreeMap<String, String> = run
            .results()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        results.push((peer, observed, host_view(&share)?));
    }
    let (_, ours, ours_host) = &results[0];
    let (_, theirs, theirs_host) = &results[1];
    ensure!(ours.len() > 40, "too few results: {ours:?}");
    for (k, v) in theirs {
        ensure!(
            ours.get(k) == Some(v),
            "{k}: virtiofsd {v:?}, vhost-fs {:?}",
            ours.get(k)
        );
    }
    ensure!(
        ours_host == theirs_host,
        "host side differs:\nvhost-fs  {ours_host:?}\nvirtiofsd {theirs_host:?}"
    );
    Ok(())
}
