//! The file operations a guest's busybox has no tool for, run by a real Linux guest on a
//! vhost-fs share and on a virtiofsd share side by side.
//!
//! One guest (Debian's cloud kernel under QEMU TCG) mounts three shares, all with `--xattr`:
//! `ours` from vhost-fs as it runs by default (inodes held as file handles), `fds` from
//! vhost-fs with `--inode-file-handles=never` (inodes held as O_PATH descriptors) and
//! `theirs` from virtiofsd. It runs `guest-fs-ops` (a static Rust
//! program from this workspace, put in its initramfs) on each: flock, POSIX byte-range and
//! OFD locks, the four xattr operations, RENAME2 (NOREPLACE, EXCHANGE), SEEK_DATA/SEEK_HOLE,
//! COPY_FILE_RANGE, FALLOCATE with punch hole, SYNCFS, FSYNC, FSYNCDIR, MKNOD of a FIFO,
//! ACCESS and the usual errors; then renames and links across two mounts. Every result
//! line from each of our shares must equal virtiofsd's, in the same order; the values that matter are
//! also checked for themselves. The host then checks what each share holds: contents,
//! xattrs, names, and the hole layout.
//!
//! Locks reach the two daemons differently: virtiofsd does not offer POSIX or flock locks, so
//! the guest kernel keeps them locally, while vhost-fs takes them on the host file. The guest
//! must not be able to tell: POSIX locks belong to the process (two descriptors of one process
//! never conflict, closing either drops both), OFD locks and flocks to the open file.
//!
//! Needs `scripts/setup.sh` (QEMU, the guest kernel, virtiofsd) and our binaries built
//! (`cargo build --workspace --bins`); a missing piece is a test failure, never a skip.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use testkit::daemon::Daemon;
use testkit::fuse_client::{vhost_fs_command, virtiofsd_command};
use testkit::guest::{static_guest_program, Guest};

const PROGRAM: &str = "guest-fs-ops";

const SCRIPT: &str = r#"
set -u
for tag in ours fds theirs; do
    mkdir -p /mnt/$tag
    mount -t virtiofs $tag /mnt/$tag || { echo "STRATA-GUEST-ERROR mount $tag failed"; exit 1; }
done
for tag in ours fds theirs; do
    /bin/guest-fs-ops run /mnt/$tag $tag || echo "RESULT $tag.program_failed=$?"
done
/bin/guest-fs-ops cross /mnt/ours /mnt/theirs cross || echo "RESULT cross.program_failed=$?"
sync
umount /mnt/ours && umount /mnt/fds && umount /mnt/theirs && echo "RESULT umount=ok"
"#;

/// The result lines under `prefix.`, in the order printed, with the prefix removed.
fn lines_for<'a>(results: &[(&'a str, &'a str)], prefix: &str) -> Vec<(&'a str, &'a str)> {
    let prefix = format!("{prefix}.");
    results
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix.as_str()).map(|k| (k, *v)))
        .collect()
}

fn getxattr_host(path: &Path, name: &str) -> Result<String> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    let mut buf = [0u8; 256];
    // SAFETY: path and name are NUL-terminated; `buf` is writable for its length.
    let got = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if got < 0 {
        bail!(
            "getxattr {} {name}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(String::from_utf8_lossy(&buf[..got as usize]).into_owned())
}

fn seek_host(path: &Path, offset: i64, whence: libc::c_int) -> Result<i64> {
    let f = File::open(path)?;
    // SAFETY: a valid descriptor; no memory is passed.
    let got = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
    ensure!(
        got >= 0,
        "lseek {} {offset} {whence}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(got)
}

/// What the guest left in `share/ops`, checked from the host.
fn check_host_side(name: &str, share: &Path) -> Result<()> {
    let ops = share.join("ops");
    let ctx = || format!("{name}'s share {}", share.display());
    // xattrs written by the guest are the host file's own.
    ensure!(
        getxattr_host(&ops.join("xattr.txt"), "user.kept")? == "host-visible",
        "{}",
        ctx()
    );
    ensure!(getxattr_host(&ops.join("xattr.txt"), "user.one")? == "alpha2");
    ensure!(getxattr_host(&ops.join("xattr-dir"), "user.dir")? == "on-a-dir");
    ensure!(
        getxattr_host(&ops.join("xattr.txt"), "user.two").is_err(),
        "removed xattr still on the host: {}",
        ctx()
    );
    // RENAME2: x went to z (NOREPLACE), z and y were exchanged, then the directory `sub`
    // and the file `z` traded places.
    let ren = ops.join("ren");
    ensure!(!ren.join("x").exists(), "x still exists: {}", ctx());
    ensure!(fs::read_to_string(ren.join("y"))? == "x", "{}", ctx());
    ensure!(fs::read_to_string(ren.join("sub"))? == "y", "{}", ctx());
    ensure!(
        fs::read_to_string(ren.join("z/inner"))? == "inner",
        "{}",
        ctx()
    );
    // The hole layout the guest made is the host file's.
    let sparse = ops.join("sparse.bin");
    ensure!(fs::metadata(&sparse)?.len() == (1 << 20) + 4096);
    ensure!(seek_host(&sparse, 0, libc::SEEK_DATA)? == 0);
    ensure!(seek_host(&sparse, 0, libc::SEEK_HOLE)? == 4096, "{}", ctx());
    ensure!(
        seek_host(&sparse, 4096, libc::SEEK_DATA)? == 1 << 20,
        "{}",
        ctx()
    );
    let punch = ops.join("punch.bin");
    ensure!(seek_host(&punch, 0, libc::SEEK_HOLE)? == 4096, "{}", ctx());
    ensure!(
        seek_host(&punch, 4096, libc::SEEK_DATA)? == 8192,
        "{}",
        ctx()
    );
    let punched = fs::read(&punch)?;
    ensure!(punched.len() == 3 * 4096);
    ensure!(punched[4096..8192].iter().all(|&b| b == 0));
    ensure!(punched[..4096]
        .iter()
        .chain(&punched[8192..])
        .all(|&b| b == b'c'));
    ensure!(fs::metadata(ops.join("falloc.bin"))?.len() == 101_000);
    // COPY_FILE_RANGE landed on the host.
    let src = fs::read(ops.join("cfr-src.bin"))?;
    let dst = fs::read(ops.join("cfr-dst.bin"))?;
    ensure!(
        dst.len() == 5050 && dst[50..] == src[100..5100],
        "{}",
        ctx()
    );
    // The FIFO exists with its mode; nothing crossed to the other share.
    let fifo = fs::symlink_metadata(ops.join("fifo"))?;
    ensure!(fifo.file_type().is_fifo() && fifo.permissions().mode() & 0o7777 == 0o640);
    ensure!(!share.join("cross.txt").exists() && !share.join("cross-link.txt").exists());
    Ok(())
}

#[test]
fn guest_file_ops_match_between_vhost_fs_and_virtiofsd() -> Result<()> {
    let program = static_guest_program(PROGRAM).context("building the guest program")?;
    let dir = tempfile::tempdir()?;
    let names = ["ours", "fds", "theirs"];
    let mut shares = Vec::new();
    for name in names {
        let share = dir.path().join(format!("{name}-share"));
        fs::create_dir(&share)?;
        shares.push(share);
    }
    let sock = |name: &str| dir.path().join(format!("{name}.sock"));
    let ours: Daemon = vhost_fs_command(&sock("ours"), &shares[0])?
        .arg("--xattr")
        .spawn()?;
    let fds: Daemon = vhost_fs_command(&sock("fds"), &shares[1])?
        .args(["--xattr", "--inode-file-handles=never"])
        .spawn()?;
    let theirs: Daemon = virtiofsd_command(&sock("theirs"), &shares[2])
        .context("virtiofsd is the reference server here: run scripts/setup.sh")?
        .arg("--xattr")
        .spawn()?;
    let daemons = [ours, fds, theirs];

    let started = Instant::now();
    let mut guest = Guest::new("guest_file_ops_match_between_vhost_fs_and_virtiofsd");
    for name in names {
        guest = guest.fs_share(sock(name), name);
    }
    let run = guest
        .executable(&format!("/bin/{PROGRAM}"), program.as_slice())
        .script(SCRIPT)
        .timeout(Duration::from_secs(120))
        .run()?;
    eprintln!("guest run took {:.1?}", started.elapsed());
    let outputs = || {
        names
            .iter()
            .zip(&daemons)
            .map(|(n, d)| format!("{n} output:\n{}", d.output()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    run.ensure_success().with_context(outputs)?;
    ensure!(run.require("umount")? == "ok");

    let results = run.results();
    let theirs_lines = lines_for(&results, "theirs");
    let theirs_keys: Vec<_> = theirs_lines.iter().map(|(k, _)| *k).collect();
    for ours_name in ["ours", "fds"] {
        let ours_lines = lines_for(&results, ours_name);
        ensure!(
            ours_lines.len() > 100,
            "too few results from the {ours_name} share ({}):\n{}",
            ours_lines.len(),
            run.context()
        );
        let ours_keys: Vec<_> = ours_lines.iter().map(|(k, _)| *k).collect();
        ensure!(
            ours_keys == theirs_keys,
            "the runs reported different operations:\n{ours_name} {ours_keys:?}\ntheirs {theirs_keys:?}"
        );
        let mismatches: Vec<String> = ours_lines
            .iter()
            .zip(&theirs_lines)
            .filter(|((_, o), (_, t))| o != t)
            .map(|((key, o), (_, t))| format!("{key}: vhost-fs ({ours_name}) {o}, virtiofsd {t}"))
            .collect();
        ensure!(
            mismatches.is_empty(),
            "vhost-fs ({ours_name}) and virtiofsd differ:\n{}",
            mismatches.join("\n")
        );
    }
    let ours_lines = lines_for(&results, "ours");

    // The values themselves, where a wrong answer on both sides would otherwise pass.
    let ours_map: std::collections::HashMap<_, _> = ours_lines.iter().copied().collect();
    for (key, want) in [
        ("access_x_no_exec_bit", "EACCES"),
        ("access_missing", "ENOENT"),
        ("xattr_create_existing", "EEXIST"),
        ("xattr_replace_missing", "ENODATA"),
        ("xattr_get", "alpha2"),
        ("xattr_get_size", "6"),
        ("xattr_get_small_buffer", "ERANGE"),
        ("xattr_list", "user.one,user.two"),
        ("xattr_remove_again", "ENODATA"),
        ("xattr_list_after", "user.one"),
        ("flock_ex_conflict", "EAGAIN"),
        ("flock_wait_child", "exit0"),
        ("flock_after_close", "ok"),
        ("posix_getlk_same_process", "F_UNLCK"),
        ("posix_child_getlk", "F_WRLCK:0:100"),
        ("posix_child_setlk_conflict", "EAGAIN"),
        ("posix_child_setlk_disjoint", "ok"),
        ("posix_child_setlkw", "ok"),
        ("posix_child_setlk_after_close", "ok"),
        ("ofd_setlk_conflict", "EAGAIN"),
        ("ofd_getlk", "F_WRLCK:0:0"),
        ("rename_noreplace_existing", "EEXIST"),
        ("rename_exchanged", "z:y,y:x"),
        ("rename_exchange_missing", "ENOENT"),
        ("rename_exchanged_types", "sub:file,z:dir"),
        ("err_mkdir_exists", "EEXIST"),
        ("err_rmdir_nonempty", "ENOTEMPTY"),
        ("err_rename_onto_nonempty_dir", "ENOTEMPTY"),
        ("err_unlink_missing", "ENOENT"),
        ("seek_hole_0", "4096"),
        ("seek_data_in_hole", "1048576"),
        ("seek_data_at_eof", "ENXIO"),
        ("fallocate_keep_size_size", "65536"),
        ("punch_hole", "ok"),
        ("punch_content", "zeros:4096,c:8192"),
        ("cfr", "5000"),
        ("cfr_content", "match"),
        ("syncfs", "ok"),
        ("fsyncdir", "ok"),
        ("mknod_fifo_type", "fifo"),
        ("mknod_fifo_again", "EEXIST"),
        ("fifo_data", "through-fifo"),
    ] {
        ensure!(
            ours_map.get(key) == Some(&want),
            "{key}: vhost-fs reported {:?}, expected {want}",
            ours_map.get(key)
        );
    }
    for (key, want) in [
        ("cross_rename", "EXDEV"),
        ("cross_link", "EXDEV"),
        ("cross_source_kept", "file"),
        ("cross_target_absent", "missing"),
    ] {
        ensure!(
            run.value(&format!("cross.{key}")) == Some(want),
            "cross.{key}: {:?}\n{}",
            run.value(&format!("cross.{key}")),
            run.context()
        );
    }

    for ((name, share), daemon) in names.iter().zip(&shares).zip(&daemons) {
        check_host_side(name, share).with_context(|| daemon.output())?;
    }
    Ok(())
}
