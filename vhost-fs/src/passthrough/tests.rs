//! Unit tests of the passthrough filesystem against a temporary directory: the operations
//! and, above all, that a guest cannot get out of the share.

use std::ffi::CString;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

thread_local! {
    /// How the tests on this thread hold inodes (each test runs on its own thread).
    static MODE: std::cell::Cell<InodeFileHandles> =
        const { std::cell::Cell::new(InodeFileHandles::Never) };
}

fn fs_for(share: &Path) -> PassthroughFs {
    let root = sys::openat(
        std::fs::File::open("/").unwrap().as_fd(),
        &CString::new(share.to_str().unwrap()).unwrap(),
        libc::O_PATH | libc::O_DIRECTORY,
    )
    .unwrap();
    let proc_fd = sys::openat(
        std::fs::File::open("/").unwrap().as_fd(),
        c"/proc/self/fd",
        libc::O_PATH | libc::O_DIRECTORY,
    )
    .unwrap();
    let fs = PassthroughFs::new(
        root,
        proc_fd,
        PassthroughConfig {
            cache: CachePolicy::Auto,
            xattr: true,
            announce_submounts: false,
            uid_map: IdMap::default(),
            gid_map: IdMap::default(),
            switch_creds: is_root(),
            inode_file_handles: MODE.get(),
            readonly: false,
        },
    )
    .unwrap();
    fs.init(u64::MAX).unwrap();
    fs
}

/// A share inside a parent that also holds a "secret" the guest must never reach.
fn setup() -> (tempfile::TempDir, std::path::PathBuf, PassthroughFs) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "host secret").unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("file"), "inside").unwrap();
    std::fs::create_dir(share.join("sub")).unwrap();
    let fs = fs_for(&share);
    (dir, share, fs)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

const CTX: Context = Context {
    uid: 0,
    gid: 0,
    pid: 1,
};

fn errno_of<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    r.unwrap_err().raw_os_error().unwrap()
}

#[test]
fn lookup_of_dotdot_at_the_root_stays_at_the_root() {
    let (_d, _share, fs) = setup();
    let e = fs.lookup(CTX, fuse::ROOT_ID, c"..").unwrap();
    assert_eq!(e.nodeid, fuse::ROOT_ID);
    // From a subdirectory, `..` is the root, and `..` again is still the root.
    let sub = fs.lookup(CTX, fuse::ROOT_ID, c"sub").unwrap();
    let up = fs.lookup(CTX, sub.nodeid, c"..").unwrap();
    assert_eq!(up.nodeid, fuse::ROOT_ID);
    // The parent's files are never reachable by name.
    assert_eq!(
        errno_of(fs.lookup(CTX, fuse::ROOT_ID, c"secret")),
        libc::ENOENT
    );
}

#[test]
fn names_with_slashes_or_empty_are_refused_everywhere() {
    let (_d, _share, fs) = setup();
    for name in [c"../secret", c"", c"sub/../../secret", c"/etc"] {
        assert_eq!(
            errno_of(fs.lookup(CTX, fuse::ROOT_ID, name)),
            libc::EINVAL,
            "{name:?}"
        );
        assert_eq!(
            errno_of(fs.mkdir(CTX, fuse::ROOT_ID, name, 0o755, 0)),
            libc::EINVAL
        );
        assert_eq!(errno_of(fs.unlink(CTX, fuse::ROOT_ID, name)), libc::EINVAL);
    }
    for name in [c".", c".."] {
        assert_eq!(
            errno_of(fs.mkdir(CTX, fuse::ROOT_ID, name, 0o755, 0)),
            libc::EINVAL
        );
        assert_eq!(errno_of(fs.rmdir(CTX, fuse::ROOT_ID, name)), libc::EINVAL);
        assert_eq!(
            errno_of(fs.rename(CTX, fuse::ROOT_ID, c"file", fuse::ROOT_ID, name, 0)),
            libc::EINVAL
        );
        assert_eq!(
            errno_of(fs.symlink(CTX, fuse::ROOT_ID, name, c"x")),
            libc::EINVAL
        );
    }
}

#[test]
fn a_symlink_to_etc_is_created_and_read_but_never_followed() {
    let (_d, share, fs) = setup();
    let link = fs.symlink(CTX, fuse::ROOT_ID, c"etc", c"/etc").unwrap();
    assert_eq!(fs.readlink(CTX, link.nodeid).unwrap(), b"/etc");
    // Looking up through it, opening it, listing it: all refused.
    assert!(fs.lookup(CTX, link.nodeid, c"passwd").is_err());
    assert_eq!(
        errno_of(fs.open(CTX, link.nodeid, libc::O_RDONLY as u32, 0)),
        libc::ELOOP
    );
    assert_eq!(errno_of(fs.opendir(CTX, link.nodeid, 0)), libc::ENOTDIR);
    // A symlink to the parent's secret, then a create through it: the name is not followed.
    fs.symlink(CTX, fuse::ROOT_ID, c"up", c"../secret").unwrap();
    assert_eq!(
        errno_of(fs.create(
            CTX,
            fuse::ROOT_ID,
            c"up",
            0o644,
            libc::O_WRONLY as u32,
            0,
            0
        )),
        libc::EEXIST
    );
    assert_eq!(
        std::fs::read_to_string(share.parent().unwrap().join("secret")).unwrap(),
        "host secret"
    );
    assert!(std::fs::symlink_metadata(share.join("etc"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_symlink_planted_by_the_host_is_not_followed_either() {
    let (_d, share, fs) = setup();
    std::os::unix::fs::symlink("../secret", share.join("planted")).unwrap();
    std::os::unix::fs::symlink("/", share.join("rootlink")).unwrap();
    let e = fs.lookup(CTX, fuse::ROOT_ID, c"planted").unwrap();
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        errno_of(fs.open(CTX, e.nodeid, libc::O_RDONLY as u32, 0)),
        libc::ELOOP
    );
    let r = fs.lookup(CTX, fuse::ROOT_ID, c"rootlink").unwrap();
    assert!(fs.lookup(CTX, r.nodeid, c"etc").is_err());
}

#[test]
fn rename_and_link_cannot_cross_the_share_edge() {
    let (_d, share, fs) = setup();
    // The only directories a guest can name are inodes inside the share; `..` of the root
    // is the root, so a rename "up" lands inside.
    let up = fs.lookup(CTX, fuse::ROOT_ID, c"..").unwrap();
    fs.rename(CTX, fuse::ROOT_ID, c"file", up.nodeid, c"moved", 0)
        .unwrap();
    assert!(share.join("moved").exists());
    assert!(!share.parent().unwrap().join("moved").exists());
    // A hard link needs an inode the guest has looked up: nothing outside can be named.
    assert_eq!(
        errno_of(fs.link(CTX, 999_999, fuse::ROOT_ID, c"stolen")),
        libc::EBADF
    );
    let f = fs.lookup(CTX, fuse::ROOT_ID, c"moved").unwrap();
    fs.link(CTX, f.nodeid, fuse::ROOT_ID, c"second").unwrap();
    assert_eq!(std::fs::metadata(share.join("second")).unwrap().nlink(), 2);
    // RENAME_WHITEOUT and unknown flags are refused; NOREPLACE and EXCHANGE work.
    assert_eq!(
        errno_of(fs.rename(CTX, fuse::ROOT_ID, c"moved", fuse::ROOT_ID, c"x", 4)),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(fs.rename(
            CTX,
            fuse::ROOT_ID,
            c"moved",
            fuse::ROOT_ID,
            c"second",
            libc::RENAME_NOREPLACE
        )),
        libc::EEXIST
    );
    std::fs::write(share.join("other"), "B").unwrap();
    fs.rename(
        CTX,
        fuse::ROOT_ID,
        c"moved",
        fuse::ROOT_ID,
        c"other",
        libc::RENAME_EXCHANGE,
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(share.join("moved")).unwrap(), "B");
}

#[test]
fn fifos_sockets_and_devices_are_never_opened() {
    let (_d, share, fs) = setup();
    let fifo = fs
        .mknod(CTX, fuse::ROOT_ID, c"fifo", libc::S_IFIFO | 0o666, 0, 0)
        .unwrap();
    assert!(std::fs::symlink_metadata(share.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // Opening a FIFO for read would block the daemon forever; it is refused at once.
    assert_eq!(
        errno_of(fs.open(CTX, fifo.nodeid, libc::O_RDONLY as u32, 0)),
        libc::EACCES
    );
    assert_eq!(
        errno_of(fs.setattr(
            CTX,
            fifo.nodeid,
            &SetattrIn {
                valid: fattr::SIZE,
                ..Default::default()
            }
        )),
        libc::EINVAL
    );
    // A FIFO that appears under a name the guest then creates is not opened either.
    let made = fs.create(
        CTX,
        fuse::ROOT_ID,
        c"fifo",
        0o644,
        libc::O_RDONLY as u32,
        0,
        0,
    );
    assert_eq!(errno_of(made), libc::EEXIST);
    if is_root() {
        let dev = fs
            .mknod(
                CTX,
                fuse::ROOT_ID,
                c"null",
                libc::S_IFCHR | 0o666,
                (1 << 8) | 3,
                0,
            )
            .unwrap();
        assert_eq!(
            errno_of(fs.open(CTX, dev.nodeid, libc::O_RDWR as u32, 0)),
            libc::EACCES
        );
    }
}

#[test]
fn create_read_write_readdir_and_forget() {
    let (_d, share, fs) = setup();
    let (e, o) = fs
        .create(
            CTX,
            fuse::ROOT_ID,
            c"new",
            0o640,
            libc::O_RDWR as u32,
            0o022,
            0,
        )
        .unwrap();
    assert_eq!(e.attr.mode & 0o777, 0o640 & !0o022);
    let f = fs.write_file(CTX, e.nodeid, o.fh, false).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"data", 0).unwrap();
    assert_eq!(std::fs::read_to_string(share.join("new")).unwrap(), "data");
    // A second CREATE of an existing name without O_EXCL opens it; with O_EXCL, EEXIST.
    assert!(fs
        .create(CTX, fuse::ROOT_ID, c"new", 0o644, libc::O_RDWR as u32, 0, 0)
        .is_ok());
    assert_eq!(
        errno_of(fs.create(
            CTX,
            fuse::ROOT_ID,
            c"new",
            0o644,
            (libc::O_RDWR | libc::O_EXCL) as u32,
            0,
            0
        )),
        libc::EEXIST
    );
    let d = fs.opendir(CTX, fuse::ROOT_ID, 0).unwrap();
    let buf = fs
        .readdir(CTX, fuse::ROOT_ID, d.fh, 0, 4096, false)
        .unwrap();
    let names = dirent_names(&buf, false);
    for n in [".", "..", "file", "sub", "new"] {
        assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
    }
    // A tiny buffer returns fewer entries, never a partial one.
    let small = fs.readdir(CTX, fuse::ROOT_ID, d.fh, 0, 40, false).unwrap();
    assert_eq!(dirent_names(&small, false).len(), 1);
    let plus = fs.readdir(CTX, fuse::ROOT_ID, d.fh, 0, 4096, true).unwrap();
    assert_eq!(dirent_names(&plus, true).len(), names.len());
    fs.releasedir(CTX, fuse::ROOT_ID, d.fh).unwrap();
    // Lookups are counted: READDIRPLUS and two CREATEs added to `new`'s count.
    let before = fs.inode_count();
    fs.forget(e.nodeid, 100);
    assert_eq!(fs.inode_count(), before - 1);
    // The root is never forgotten.
    fs.forget(fuse::ROOT_ID, 100);
    assert!(fs.getattr(CTX, fuse::ROOT_ID, None).is_ok());
}

fn dirent_names(buf: &[u8], plus: bool) -> Vec<String> {
    let mut names = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        if plus {
            pos += fuse::ENTRY_OUT_LEN;
        }
        let namelen = u32::from_le_bytes(buf[pos + 16..pos + 20].try_into().unwrap()) as usize;
        names.push(String::from_utf8_lossy(&buf[pos + 24..pos + 24 + namelen]).into_owned());
        pos += fuse::dirent_size(namelen);
    }
    names
}

#[test]
fn writes_clear_setuid_when_the_guest_asks_and_chown_clears_it_too() {
    let (_d, share, fs) = setup();
    let path = share.join("suid");
    std::fs::write(&path, "x").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o6755)).unwrap();
    let e = fs.lookup(CTX, fuse::ROOT_ID, c"suid").unwrap();
    let o = fs.open(CTX, e.nodeid, libc::O_RDWR as u32, 0).unwrap();
    fs.write_file(CTX, e.nodeid, o.fh, true).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    if is_root() {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let a = SetattrIn {
            valid: fattr::UID | fattr::GID,
            uid: 1000,
            gid: 1000,
            ..Default::default()
        };
        let (attr, _) = fs.setattr(CTX, e.nodeid, &a).unwrap();
        assert_eq!(attr.mode & 0o7777, 0o755);
        assert_eq!((attr.uid, attr.gid), (1000, 1000));
    }
}

#[test]
fn files_are_created_with_the_callers_ids() {
    if !is_root() {
        eprintln!("not root: credentials are not switched, nothing to check");
        return;
    }
    let (_d, share, fs) = setup();
    std::fs::set_permissions(&share, std::fs::Permissions::from_mode(0o777)).unwrap();
    let user = Context {
        uid: 1000,
        gid: 1000,
        pid: 1,
    };
    fs.mkdir(user, fuse::ROOT_ID, c"mine", 0o755, 0).unwrap();
    let m = std::fs::metadata(share.join("mine")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1000));
    // The thread is root again afterwards.
    assert!(is_root());
    // The user cannot create where only root may write.
    let sub = fs.lookup(CTX, fuse::ROOT_ID, c"sub").unwrap();
    std::fs::set_permissions(share.join("sub"), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        errno_of(fs.mkdir(user, sub.nodeid, c"no", 0o755, 0)),
        libc::EACCES
    );
}

#[test]
fn locks_conflict_between_handles_and_flock_works() {
    let (_d, _share, fs) = setup();
    let e = fs.lookup(CTX, fuse::ROOT_ID, c"file").unwrap();
    let a = fs.open(CTX, e.nodeid, libc::O_RDWR as u32, 0).unwrap();
    let b = fs.open(CTX, e.nodeid, libc::O_RDWR as u32, 0).unwrap();
    let lk = |fh, typ: i32, flock: bool| LkIn {
        fh,
        owner: fh,
        lock: FileLock {
            start: 0,
            end: u64::MAX,
            typ: typ as u32,
            pid: 1,
        },
        lk_flags: if flock { fuse::LK_FLOCK } else { 0 },
    };
    fs.setlk(CTX, e.nodeid, &lk(a.fh, libc::F_WRLCK, false), false)
        .unwrap();
    assert_eq!(
        errno_of(fs.setlk(CTX, e.nodeid, &lk(b.fh, libc::F_WRLCK, false), false)),
        libc::EAGAIN
    );
    let seen = fs
        .getlk(CTX, e.nodeid, &lk(b.fh, libc::F_WRLCK, false))
        .unwrap();
    assert_eq!(seen.typ, libc::F_WRLCK as u32);
    fs.flush(CTX, e.nodeid, a.fh, a.fh).unwrap();
    fs.setlk(CTX, e.nodeid, &lk(b.fh, libc::F_WRLCK, false), false)
        .unwrap();
    fs.setlk(CTX, e.nodeid, &lk(a.fh, libc::F_WRLCK, true), false)
        .unwrap();
    assert_eq!(
        errno_of(fs.setlk(CTX, e.nodeid, &lk(b.fh, libc::F_WRLCK, true), false)),
        libc::EWOULDBLOCK
    );
}

/// POSIX locks belong to the lock owner (the guest process), not to the handle: an owner's
/// locks through two handles never conflict, another owner's do even through the same
/// handle, FLUSH drops all of the owner's locks, and releasing the only handle an owner
/// locked through (an OFD lock's owner is its open file) drops them too.
#[test]
fn posix_locks_belong_to_the_lock_owner() {
    let (_d, _share, fs) = setup();
    let e = fs.lookup(CTX, fuse::ROOT_ID, c"file").unwrap();
    let a = fs.open(CTX, e.nodeid, libc::O_RDWR as u32, 0).unwrap();
    let b = fs.open(CTX, e.nodeid, libc::O_RDONLY as u32, 0).unwrap();
    let lk = |fh, owner, typ: i32, start: u64, end: u64| LkIn {
        fh,
        owner,
        lock: FileLock {
            start,
            end,
            typ: typ as u32,
            pid: 1,
        },
        lk_flags: 0,
    };
    const P1: u64 = 0x1111;
    const P2: u64 = 0x2222;
    fs.setlk(CTX, e.nodeid, &lk(a.fh, P1, libc::F_WRLCK, 0, 99), false)
        .unwrap();
    // The same owner through another handle (read-only, even): no conflict.
    let own = fs
        .getlk(CTX, e.nodeid, &lk(b.fh, P1, libc::F_WRLCK, 0, 9))
        .unwrap();
    assert_eq!(own.typ, libc::F_UNLCK as u32);
    fs.setlk(CTX, e.nodeid, &lk(b.fh, P1, libc::F_RDLCK, 200, 209), false)
        .unwrap();
    // Another owner through the very handle P1 locked with: a conflict.
    assert_eq!(
        errno_of(fs.setlk(CTX, e.nodeid, &lk(a.fh, P2, libc::F_WRLCK, 50, 59), false)),
        libc::EAGAIN
    );
    let seen = fs
        .getlk(CTX, e.nodeid, &lk(a.fh, P2, libc::F_WRLCK, 50, 59))
        .unwrap();
    assert_eq!(
        (seen.typ, seen.start, seen.end),
        (libc::F_WRLCK as u32, 0, 99)
    );
    // P1 closes one descriptor: all of its locks go, whichever handle they came through.
    fs.flush(CTX, e.nodeid, b.fh, P1).unwrap();
    fs.setlk(CTX, e.nodeid, &lk(a.fh, P2, libc::F_WRLCK, 0, 299), false)
        .unwrap();
    // An owner that locked only through `b` loses its locks when `b` is released.
    fs.setlk(CTX, e.nodeid, &lk(a.fh, P2, libc::F_UNLCK, 0, 299), false)
        .unwrap();
    fs.setlk(CTX, e.nodeid, &lk(b.fh, P1, libc::F_RDLCK, 0, 9), false)
        .unwrap();
    assert_eq!(
        errno_of(fs.setlk(CTX, e.nodeid, &lk(a.fh, P2, libc::F_WRLCK, 0, 9), false)),
        libc::EAGAIN
    );
    fs.release(CTX, e.nodeid, b.fh, false, 0).unwrap();
    fs.setlk(CTX, e.nodeid, &lk(a.fh, P2, libc::F_WRLCK, 0, 9), false)
        .unwrap();
}

#[test]
fn xattrs_seek_and_copy_file_range() {
    let (_d, share, fs) = setup();
    let e = fs.lookup(CTX, fuse::ROOT_ID, c"file").unwrap();
    match fs.setxattr(CTX, e.nodeid, c"user.k", b"v", 0) {
        Ok(()) => {
            assert_eq!(
                fs.getxattr(CTX, e.nodeid, c"user.k", 0).unwrap(),
                XattrReply::Size(1)
            );
            assert_eq!(
                fs.getxattr(CTX, e.nodeid, c"user.k", 10).unwrap(),
                XattrReply::Data(b"v".to_vec())
            );
            fs.removexattr(CTX, e.nodeid, c"user.k").unwrap();
        }
        // tmpfs without user xattrs: the host's answer passes through.
        Err(err) => assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP)),
    }
    std::fs::write(share.join("sparse"), b"").unwrap();
    let s = fs.lookup(CTX, fuse::ROOT_ID, c"sparse").unwrap();
    let o = fs.open(CTX, s.nodeid, libc::O_RDWR as u32, 0).unwrap();
    fs.fallocate(CTX, s.nodeid, o.fh, 0, 1 << 20, 4096).unwrap();
    assert_eq!(
        std::fs::metadata(share.join("sparse")).unwrap().len(),
        (1 << 20) + 4096
    );
    use std::os::unix::fs::FileExt;
    fs.write_file(CTX, s.nodeid, o.fh, false)
        .unwrap()
        .write_all_at(b"x", 2 << 20)
        .unwrap();
    // SEEK_DATA/SEEK_HOLE answer what the host file system answers.
    let host = std::fs::File::open(share.join("sparse")).unwrap();
    for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
        // SAFETY: lseek on an open descriptor.
        let want = unsafe { libc::lseek(host.as_raw_fd(), 4096, whence) } as u64;
        assert_eq!(
            fs.lseek(CTX, s.nodeid, o.fh, 4096, whence as u32).unwrap(),
            want
        );
    }
    assert_eq!(errno_of(fs.lseek(CTX, s.nodeid, o.fh, 0, 99)), libc::EINVAL);
    let src = fs.open(CTX, e.nodeid, libc::O_RDONLY as u32, 0).unwrap();
    let n = fs
        .copy_file_range(CTX, e.nodeid, src.fh, 0, s.nodeid, o.fh, 0, 6, 0)
        .unwrap();
    assert_eq!(n, 6);
    let data = std::fs::read(share.join("sparse")).unwrap();
    assert_eq!(&data[..6], b"inside");
    fs.syncfs(CTX, fuse::ROOT_ID).unwrap();
}

/// Every test above again, with inodes held as file handles (mandatory, so a fallback to
/// descriptors cannot hide a difference): the escapes fail the same way and every operation
/// works the same. open_by_handle_at needs CAP_DAC_READ_SEARCH, so this needs root.
#[test]
fn everything_holds_with_file_handles() {
    assert!(
        is_root(),
        "file handles need CAP_DAC_READ_SEARCH: run the tests as root"
    );
    MODE.set(InodeFileHandles::Mandatory);
    lookup_of_dotdot_at_the_root_stays_at_the_root();
    names_with_slashes_or_empty_are_refused_everywhere();
    a_symlink_to_etc_is_created_and_read_but_never_followed();
    a_symlink_planted_by_the_host_is_not_followed_either();
    rename_and_link_cannot_cross_the_share_edge();
    fifos_sockets_and_devices_are_never_opened();
    create_read_write_readdir_and_forget();
    writes_clear_setuid_when_the_guest_asks_and_chown_clears_it_too();
    files_are_created_with_the_callers_ids();
    locks_conflict_between_handles_and_flock_works();
    posix_locks_belong_to_the_lock_owner();
    xattrs_seek_and_copy_file_range();
}

/// With handles, a looked-up inode keeps no descriptor: only the share's mount has one.
/// Two names of one host inode are one guest inode either way, and an inode removed on the
/// host while only its handle is held answers ESTALE rather than some other file.
#[test]
fn handles_keep_no_descriptor_per_inode_and_identity_holds() {
    assert!(
        is_root(),
        "file handles need CAP_DAC_READ_SEARCH: run the tests as root"
    );
    MODE.set(InodeFileHandles::Mandatory);
    let (_d, share, fs) = setup();
    assert_eq!(fs.mount_fd_count(), 0);
    let open_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = open_fds();
    let mut ids = Vec::new();
    for i in 0..50 {
        std::fs::write(share.join(format!("f{i}")), "x").unwrap();
        let name = CString::new(format!("f{i}")).unwrap();
        ids.push(fs.lookup(CTX, fuse::ROOT_ID, &name).unwrap().nodeid);
    }
    // Other tests open files on other threads: allow some noise, but not 50.
    assert!(open_fds() < before + 10, "{} -> {}", before, open_fds());
    assert_eq!(fs.mount_fd_count(), 1);
    std::fs::hard_link(share.join("f0"), share.join("sub/alias")).unwrap();
    let sub = fs.lookup(CTX, fuse::ROOT_ID, c"sub").unwrap();
    let alias = fs.lookup(CTX, sub.nodeid, c"alias").unwrap();
    assert_eq!(alias.nodeid, ids[0]);
    let o = fs
        .open(CTX, alias.nodeid, libc::O_RDONLY as u32, 0)
        .unwrap();
    fs.release(CTX, alias.nodeid, o.fh, false, 0).unwrap();
    // Gone on the host: the handle no longer opens.
    std::fs::remove_file(share.join("f1")).unwrap();
    assert_eq!(
        errno_of(fs.open(CTX, ids[1], libc::O_RDONLY as u32, 0)),
        libc::ESTALE
    );
    // Forgetting every inode on the mount closes its descriptor.
    for id in ids {
        fs.forget(id, 2);
    }
    fs.forget(sub.nodeid, 1);
    assert_eq!(fs.mount_fd_count(), 0);
}
