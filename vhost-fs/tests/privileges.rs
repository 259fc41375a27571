//! What the daemon does on the guest's behalf never takes more than the guest's caller could:
//! fallocate and copy_file_range clear set-user-ID as WRITE does for a caller without
//! CAP_FSETID; the files that hold POSIX locks are opened with no more access than the
//! caller has (never read-write as root, never for writing on a read-only share); and the
//! number of such files one guest can make the daemon hold is bounded.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use testkit::daemon::Daemon;
use testkit::fuse_client::{vhost_fs_command, ClientOptions, FileLock, FuseClient, ROOT_ID};

fn serve(dir: &Path, share: &Path, extra: &[&str]) -> (Daemon, FuseClient) {
    let socket = dir.join("fs.sock");
    let daemon = vhost_fs_command(&socket, share)
        .unwrap()
        .args(extra)
        .spawn()
        .unwrap();
    let mut c = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
    c.init().unwrap();
    (daemon, c)
}

fn share() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    (dir, share)
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn fallocate_and_copy_file_range_clear_setuid_for_an_unprivileged_caller() {
    let (dir, share) = share();
    for name in ["fallocated", "copied_into", "source"] {
        let p = share.join(name);
        std::fs::write(&p, vec![1u8; 8192]).unwrap();
        std::os::unix::fs::chown(&p, Some(1000), Some(1000)).unwrap();
        set_mode(&p, 0o6755);
    }
    let (_d, mut c) = serve(dir.path(), &share, &[]);
    c.caller.uid = 1000;
    c.caller.gid = 1000;
    let open = |c: &mut FuseClient, name: &[u8]| {
        let e = c.lookup(ROOT_ID, name).unwrap();
        let fh = c.open(e.nodeid, libc::O_RDWR as u32).unwrap();
        (e.nodeid, fh)
    };
    let (f, ffh) = open(&mut c, b"fallocated");
    c.fallocate(f, ffh, 0, 65536, 0).unwrap();
    let (src, sfh) = open(&mut c, b"source");
    let (dst, dfh) = open(&mut c, b"copied_into");
    assert_eq!(
        c.copy_file_range(src, sfh, 0, dst, dfh, 0, 4096).unwrap(),
        4096
    );
    for name in ["fallocated", "copied_into"] {
        let mode = std::fs::metadata(share.join(name)).unwrap().mode();
        assert_eq!(
            mode & 0o7777,
            0o755,
            "{name}: set-user-ID and set-group-ID cleared"
        );
    }
    // The source is only read: it keeps its bits.
    let mode = std::fs::metadata(share.join("source")).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o6755);
}

/// The daemon's descriptors on `path`, with their access mode (O_RDONLY, O_WRONLY, O_RDWR).
fn daemon_fds_on(daemon: &Daemon, path: &Path) -> Vec<i32> {
    let mut modes = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{}/fd", daemon.pid())).unwrap() {
        let e = e.unwrap();
        if std::fs::read_link(e.path()).ok().as_deref() != Some(path) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{}/fdinfo/{}",
            daemon.pid(),
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| i32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap_or(0);
        if flags & libc::O_PATH == 0 {
            modes.push(flags & libc::O_ACCMODE);
        }
    }
    modes
}

const READ_LOCK: FileLock = FileLock {
    start: 0,
    end: 100,
    typ: libc::F_RDLCK as u32,
    pid: 1,
};

#[test]
fn lock_files_get_no_more_access_than_the_caller() {
    // A file the caller may only read, and (on a read-only share) one anybody may write.
    for readonly in [false, true] {
        let (dir, share) = share();
        let p = share.join("file");
        std::fs::write(&p, b"data").unwrap();
        set_mode(&p, if readonly { 0o666 } else { 0o444 });
        let extra: &[&str] = if readonly { &["--readonly"] } else { &[] };
        let (d, mut c) = serve(dir.path(), &share, extra);
        if !readonly {
            c.caller.uid = 1000;
            c.caller.gid = 1000;
        }
        let e = c.lookup(ROOT_ID, b"file").unwrap();
        let fh = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
        c.setlk(e.nodeid, fh, 7, READ_LOCK, 0).unwrap();
        let modes = daemon_fds_on(&d, &p);
        assert!(!modes.is_empty(), "no descriptor holds the lock");
        assert!(
            modes.iter().all(|&m| m == libc::O_RDONLY),
            "readonly={readonly}: the daemon holds {modes:?} on a file the caller may only read"
        );
    }
}

#[test]
fn lock_owners_cannot_make_the_daemon_hold_descriptors_without_bound() {
    let (dir, share) = share();
    std::fs::write(share.join("file"), b"data").unwrap();
    let (d, mut c) = serve(dir.path(), &share, &[]);
    let e = c.lookup(ROOT_ID, b"file").unwrap();
    let fh = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    let mut refused = None;
    for owner in 0..5000u64 {
        if let Err(err) = c.setlk(e.nodeid, fh, owner, READ_LOCK, 0) {
            refused = Some((owner, err.raw_os_error()));
            break;
        }
    }
    let (owner, errno) = refused.expect("5000 lock owners each got a descriptor");
    assert_eq!(errno, Some(libc::ENOLCK));
    assert!(owner <= 4096, "refused only at owner {owner}");
    assert!(daemon_fds_on(&d, &share.join("file")).len() <= 4097);
    // Releasing the handle drops its owners' locks and files: locks work again.
    c.release(e.nodeid, fh).unwrap();
    let fh = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    c.setlk(e.nodeid, fh, 99_999, READ_LOCK, 0).unwrap();
}

/// Without file handles the daemon keeps no CAP_DAC_READ_SEARCH: hard links (which
/// `linkat(AT_EMPTY_PATH)` would need it for) still work, after a non-root caller's request
/// has switched the thread's credentials and back.
#[test]
fn hard_links_work_without_file_handles() {
    let (dir, share) = share();
    set_mode(&share, 0o777);
    let (_d, mut c) = serve(dir.path(), &share, &["--inode-file-handles=never"]);
    c.caller.uid = 1000;
    c.caller.gid = 1000;
    let (e, fh) = c.create(ROOT_ID, b"a", 0o644, libc::O_RDWR as u32).unwrap();
    c.release(e.nodeid, fh).unwrap();
    let l = c.link(e.nodeid, ROOT_ID, b"b").unwrap();
    assert_eq!(l.attr.ino, e.attr.ino);
    assert_eq!(
        std::fs::metadata(share.join("b")).unwrap().ino(),
        std::fs::metadata(share.join("a")).unwrap().ino()
    );
}

/// A lock owner that read-locked through a read-only handle can write-lock through a
/// read-write one, as a local process can (the file that holds its locks is opened for
/// both, as the caller, where the caller may).
#[test]
fn an_owner_write_locks_through_another_handle_after_a_read_lock() {
    for mode in ["prefer", "never"] {
        let (dir, share) = share();
        let p = share.join("file");
        std::fs::write(&p, b"data").unwrap();
        std::os::unix::fs::chown(&p, Some(1000), Some(1000)).unwrap();
        set_mode(&p, 0o644);
        let (_d, mut c) = serve(
            dir.path(),
            &share,
            &[&format!("--inode-file-handles={mode}")],
        );
        c.caller.uid = 1000;
        c.caller.gid = 1000;
        let e = c.lookup(ROOT_ID, b"file").unwrap();
        let ro = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
        c.setlk(e.nodeid, ro, 7, READ_LOCK, 0).unwrap();
        let rw = c.open(e.nodeid, libc::O_RDWR as u32).unwrap();
        let write_lock = FileLock {
            typ: libc::F_WRLCK as u32,
            ..READ_LOCK
        };
        c.setlk(e.nodeid, rw, 7, write_lock, 0)
            .unwrap_or_else(|e| panic!("{mode}: write lock after a read lock: {e}"));
    }
}
