//! `--inode-file-handles`: inodes held as file handles instead of open O_PATH descriptors,
//! driven through the vhost-user socket by testkit's FUSE client (no VM) and checked from
//! the host: operations work the same, the daemon's open descriptors stay bounded however
//! many inodes the guest looks up, `prefer` falls back to descriptors on a filesystem
//! without handles, and `mandatory` there is refused at start-up.
//!
//! Opening a file handle needs CAP_DAC_READ_SEARCH: these tests run the daemon as root,
//! as the rest of the suite does.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::daemon::Daemon;
use testkit::fuse_client::{vhost_fs_command, ClientOptions, FuseClient, ROOT_ID};

struct Fixture {
    _dir: tempfile::TempDir,
    share: PathBuf,
    daemon: Daemon,
    client: FuseClient,
}

fn start_on(share: &Path, dir: tempfile::TempDir, mode: &str, extra: &[&str]) -> Fixture {
    let socket = dir.path().join("fs.sock");
    let daemon = vhost_fs_command(&socket, share)
        .unwrap()
        .arg(format!("--inode-file-handles={mode}"))
        .args(extra)
        .spawn()
        .unwrap();
    let mut client = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
    client.init().unwrap();
    Fixture {
        _dir: dir,
        share: share.to_path_buf(),
        daemon,
        client,
    }
}

fn start(mode: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    start_on(&share, dir, mode, &[])
}

/// Descriptors the daemon process has open.
fn open_fds(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count()
}

const RW: u32 = libc::O_RDWR as u32;

#[test]
fn lookups_reads_and_writes_work_with_file_handles() {
    let mut f = start("mandatory");
    std::fs::create_dir_all(f.share.join("a/b")).unwrap();
    std::fs::write(f.share.join("a/b/host.txt"), b"from the host").unwrap();
    let c = &mut f.client;

    let a = c.lookup(ROOT_ID, b"a").unwrap();
    let b = c.lookup(a.nodeid, b"b").unwrap();
    let host = c.lookup(b.nodeid, b"host.txt").unwrap();
    assert_eq!(
        host.attr.ino,
        std::fs::metadata(f.share.join("a/b/host.txt"))
            .unwrap()
            .ino()
    );
    let fh = c.open(host.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(host.nodeid, fh, 0, 4096).unwrap(), b"from the host");
    c.release(host.nodeid, fh).unwrap();

    // Create and write under a directory held only by its handle.
    let (e, fh) = c.create(b.nodeid, b"new.txt", 0o640, RW).unwrap();
    assert_eq!(
        c.write(e.nodeid, fh, 0, b"written by the guest").unwrap(),
        20
    );
    c.release(e.nodeid, fh).unwrap();
    assert_eq!(
        std::fs::read(f.share.join("a/b/new.txt")).unwrap(),
        b"written by the guest"
    );
    let d = c.mkdir(b.nodeid, b"dir", 0o755).unwrap();
    c.symlink(d.nodeid, b"link", b"../new.txt").unwrap();
    assert_eq!(
        std::fs::read_link(f.share.join("a/b/dir/link")).unwrap(),
        Path::new("../new.txt")
    );
    c.rename2(b.nodeid, b"new.txt", d.nodeid, b"moved.txt", 0)
        .unwrap();
    assert!(f.share.join("a/b/dir/moved.txt").exists());

    // A handle follows its inode: renamed on the host, the guest's node still reads it.
    std::fs::rename(f.share.join("a/b/host.txt"), f.share.join("a/renamed.txt")).unwrap();
    let fh = c.open(host.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(host.nodeid, fh, 0, 4096).unwrap(), b"from the host");
    c.release(host.nodeid, fh).unwrap();

    // Identity: the same host inode under another name is the same node.
    std::fs::hard_link(f.share.join("a/renamed.txt"), f.share.join("a/b/alias.txt")).unwrap();
    assert_eq!(
        c.lookup(b.nodeid, b"alias.txt").unwrap().nodeid,
        host.nodeid
    );
    let names: Vec<String> = c
        .readdir_all(b.nodeid, true, 4096)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect();
    assert!(names.contains(&"alias.txt".to_string()), "{names:?}");

    // `..` from a directory held by handle still stops at the share's root.
    let up = c.lookup(a.nodeid, b"..").unwrap();
    assert_eq!(up.nodeid, ROOT_ID);
    let up = c.lookup(ROOT_ID, b"..").unwrap();
    assert_eq!(up.nodeid, ROOT_ID);

    // Removed on the host while the guest only holds the handle: ESTALE, never another file.
    std::fs::remove_dir_all(f.share.join("a/b/dir")).unwrap();
    let err = c.getattr(d.nodeid).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    assert!(f.daemon.try_wait().unwrap().is_none());
}

/// With `never`, every looked-up inode keeps a descriptor open in the daemon; with handles
/// (`prefer`, the default, and `mandatory`) the count stays flat.
#[test]
fn open_descriptors_stay_bounded_with_file_handles() {
    const FILES: usize = 500;
    let mut grown = Vec::new();
    for mode in ["never", "prefer", "mandatory"] {
        let mut f = start(mode);
        for i in 0..FILES {
            std::fs::write(f.share.join(format!("f{i}")), b"x").unwrap();
        }
        let before = open_fds(&f.daemon);
        for i in 0..FILES {
            let e = f
                .client
                .lookup(ROOT_ID, format!("f{i}").as_bytes())
                .unwrap();
            assert_eq!(e.attr.size, 1);
        }
        // Still all usable: read the last one looked up.
        let last = f
            .client
            .lookup(ROOT_ID, format!("f{}", FILES - 1).as_bytes())
            .unwrap();
        let fh = f.client.open(last.nodeid, libc::O_RDONLY as u32).unwrap();
        assert_eq!(f.client.read(last.nodeid, fh, 0, 16).unwrap(), b"x");
        f.client.release(last.nodeid, fh).unwrap();
        grown.push((mode, open_fds(&f.daemon) as i64 - before as i64));
    }
    eprintln!("descriptors opened by {FILES} lookups: {grown:?}");
    let [(_, never), (_, prefer), (_, mandatory)] = grown[..] else {
        unreachable!()
    };
    assert!(never >= FILES as i64, "never: {grown:?}");
    // One mount descriptor, give or take a transient one.
    assert!(prefer <= 4, "prefer: {grown:?}");
    assert!(mandatory <= 4, "mandatory: {grown:?}");
}

/// tmpfs has file handles too (shares on /dev/shm are common where speed matters), so
/// `mandatory` serves it.
#[test]
fn tmpfs_has_file_handles() {
    let shm = Path::new("/dev/shm");
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    let path = std::ffi::CString::new("/dev/shm").unwrap();
    // SAFETY: a NUL-terminated path and a valid out-buffer.
    let ok = unsafe { libc::statfs(path.as_ptr(), st.as_mut_ptr()) } == 0;
    // SAFETY: statfs succeeded and filled the buffer (zeroed before in any case).
    let fs_type = unsafe { st.assume_init() }.f_type;
    assert!(
        ok && fs_type == libc::TMPFS_MAGIC,
        "/dev/shm is not a tmpfs on this machine"
    );
    let dir = tempfile::tempdir_in(shm).unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir_all(share.join("d")).unwrap();
    std::fs::write(share.join("d/f"), b"on tmpfs").unwrap();
    let mut f = start_on(&share, dir, "mandatory", &[]);
    let d = f.client.lookup(ROOT_ID, b"d").unwrap();
    let e = f.client.lookup(d.nodeid, b"f").unwrap();
    let fh = f.client.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(f.client.read(e.nodeid, fh, 0, 64).unwrap(), b"on tmpfs");
    f.client.release(e.nodeid, fh).unwrap();
}

/// procfs has no file handles: `prefer` holds its inodes as descriptors and serves them.
#[test]
fn prefer_falls_back_to_descriptors_where_there_are_no_handles() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = start_on(
        Path::new("/proc/sys/kernel"),
        dir,
        "prefer",
        &["--readonly"],
    );
    let before = open_fds(&f.daemon);
    let e = f.client.lookup(ROOT_ID, b"ostype").unwrap();
    let fh = f.client.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(f.client.read(e.nodeid, fh, 0, 64).unwrap(), b"Linux\n");
    f.client.release(e.nodeid, fh).unwrap();
    // The fallback holds the inode's descriptor.
    assert_eq!(open_fds(&f.daemon), before + 1);
}

/// `mandatory` on a filesystem without handles: one line naming the problem, exit code 2.
#[test]
fn mandatory_without_handle_support_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fs.sock");
    let program = testkit::daemon::binary_path("vhost-fs");
    let mut child = Command::new(&program)
        .arg("--socket-path")
        .arg(&socket)
        .args(["--shared-dir", "/proc/sys/kernel", "--sandbox", "none"])
        .arg("--inode-file-handles=mandatory")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("vhost-fs kept running with --inode-file-handles=mandatory on procfs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains(": info: ")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("--inode-file-handles=mandatory")
            && lines[0].contains("does not support file handles"),
        "{stderr}"
    );
    assert!(!socket.exists(), "the socket was left behind");
}

/// A bad mode is a flag error like any other.
#[test]
fn an_unknown_mode_is_a_usage_error() {
    let out = Command::new(testkit::daemon::binary_path("vhost-fs"))
        .args(["--socket-path", "/nonexistent/s", "--shared-dir", "/tmp"])
        .arg("--inode-file-handles=always")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--inode-file-handles always"), "{stderr}");
}
