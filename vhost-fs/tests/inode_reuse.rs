//! A host inode number reused by a new file must not map the new file to the guest inode
//! of the old one. With `--inode-file-handles`, an inode the guest knows is not held open,
//! so once its file is unlinked the filesystem may give its number to the next file. The
//! new file has another file handle (another generation): it must get a guest inode of its
//! own, and every operation on it must work and show its attributes, not fail with ESTALE
//! or act on the old inode. With `--inode-file-handles=never` the old inode's O_PATH
//! descriptor keeps it alive, so its number is not reused while the guest knows it.
//!
//! On a loop-mounted ext4 (which reuses a freed inode number at once), made by the test:
//! needs root, loop devices and mkfs.ext4 (e2fsprogs), as CI has; fails, not skips,
//! without them.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::daemon::Daemon;
use testkit::fuse_client::{
    vhost_fs_command, ClientOptions, Entry, FuseClient, FATTR_MODE, FATTR_SIZE, ROOT_ID,
};

const RW: u32 = libc::O_RDWR as u32;

/// New objects made looking for the old number before giving up.
const TRIES: usize = 1000;

/// An ext4 file system in a file, loop-mounted at `mnt` until dropped.
struct Ext4 {
    dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Ext4 {
    fn new() -> Ext4 {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("ext4.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("this test needs {cmd:?}: {e}"));
            assert!(
                out.status.success(),
                "{cmd:?} failed (this test needs root and loop devices): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("truncate").args(["-s", "64M"]).arg(&img));
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        Ext4 { dir, mnt }
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        // Lazily if still busy (a test that failed with the daemon running): the loop
        // device is released with the mount either way (`-o loop` sets autoclear).
        let busy = !Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if busy {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A daemon on the directory `share` of a new ext4 and an initialised client.
fn serve(fs: &Ext4, mode: &str) -> (PathBuf, Daemon, FuseClient) {
    let share = fs.mnt.join("share");
    std::fs::create_dir(&share).unwrap();
    let socket = fs.dir.path().join("fs.sock");
    let daemon = vhost_fs_command(&socket, &share)
        .unwrap()
        .arg(format!("--inode-file-handles={mode}"))
        .spawn()
        .unwrap();
    let mut c = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
    c.init().unwrap();
    (share, daemon, c)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    fn s_ifmt(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
        }
    }
}

const TARGET: &[u8] = b"the new symlink's target";

/// Makes `name` in the share's root through the guest, as the guest makes each kind.
fn make(c: &mut FuseClient, name: &[u8], kind: Kind) -> Entry {
    match kind {
        Kind::File => {
            let (e, fh) = c.create(ROOT_ID, name, 0o644, RW).unwrap();
            c.release(e.nodeid, fh).unwrap();
            e
        }
        Kind::Dir => c.mkdir(ROOT_ID, name, 0o755).unwrap(),
        Kind::Symlink => c.symlink(ROOT_ID, name, TARGET).unwrap(),
    }
}

/// A regular file made, written and then unlinked by the guest, which sends no FORGET for
/// it: the daemon still knows its guest inode. Returns that entry.
fn unlinked_file(c: &mut FuseClient, name: &[u8]) -> Entry {
    let (old, fh) = c.create(ROOT_ID, name, 0o600, RW).unwrap();
    c.write(old.nodeid, fh, 0, b"the old file's contents")
        .unwrap();
    c.release(old.nodeid, fh).unwrap();
    c.unlink(ROOT_ID, name).unwrap();
    old
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().expect("an errno"),
    }
}

/// Every operation on `new` (made by the guest as `name`, with the number of the unlinked
/// `old`) works on the new object and shows its attributes.
fn check_new(c: &mut FuseClient, share: &Path, name: &[u8], new: Entry, old: Entry, kind: Kind) {
    let what = format!("{kind:?} {}", String::from_utf8_lossy(name));
    let path = share.join(std::ffi::OsStr::from_bytes(name));
    assert_eq!(new.attr.mode & libc::S_IFMT, kind.s_ifmt(), "{what}");

    let again = c
        .lookup(ROOT_ID, name)
        .unwrap_or_else(|e| panic!("{what}: lookup: {e}"));
    assert_eq!(again.nodeid, new.nodeid, "{what}: lookup");
    assert_eq!(again.attr.mode & libc::S_IFMT, kind.s_ifmt(), "{what}");
    let attr = c
        .getattr(new.nodeid)
        .unwrap_or_else(|e| panic!("{what}: getattr: {e}"));
    assert_eq!(
        (attr.ino, attr.mode & libc::S_IFMT),
        (old.attr.ino, kind.s_ifmt())
    );

    // chown (lchown for a symlink): the host and the guest see the new owner.
    let attr = c
        .chown(new.nodeid, 1234, 5678)
        .unwrap_or_else(|e| panic!("{what}: chown: {e}"));
    assert_eq!((attr.uid, attr.gid), (1234, 5678), "{what}: chown's reply");
    let host = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(
        (host.uid(), host.gid()),
        (1234, 5678),
        "{what}: on the host"
    );
    let attr = c.getattr(new.nodeid).unwrap();
    assert_eq!(
        (attr.uid, attr.gid),
        (1234, 5678),
        "{what}: getattr after chown"
    );

    match kind {
        Kind::File => {
            c.setattr(new.nodeid, FATTR_MODE, 0, 0o640)
                .unwrap_or_else(|e| panic!("{what}: chmod: {e}"));
            assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
            let fh = c
                .open(new.nodeid, RW)
                .unwrap_or_else(|e| panic!("{what}: open: {e}"));
            c.write(new.nodeid, fh, 0, b"the new file's contents, longer")
                .unwrap_or_else(|e| panic!("{what}: write: {e}"));
            assert_eq!(
                c.read(new.nodeid, fh, 0, 64).unwrap(),
                b"the new file's contents, longer"
            );
            c.release(new.nodeid, fh).unwrap();
            assert_eq!(c.getattr(new.nodeid).unwrap().size, 31);
            c.setattr(new.nodeid, FATTR_SIZE, 7, 0)
                .unwrap_or_else(|e| panic!("{what}: truncate: {e}"));
            assert_eq!(std::fs::read(&path).unwrap(), b"the new");
        }
        Kind::Dir => {
            c.setattr(new.nodeid, FATTR_MODE, 0, 0o750)
                .unwrap_or_else(|e| panic!("{what}: chmod: {e}"));
            assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o750);
            let child = c
                .mkdir(new.nodeid, b"child", 0o755)
                .unwrap_or_else(|e| panic!("{what}: mkdir in it: {e}"));
            assert!(path.join("child").is_dir());
            assert_eq!(c.lookup(new.nodeid, b"child").unwrap().nodeid, child.nodeid);
            let names: Vec<Vec<u8>> = c
                .readdir_all(new.nodeid, false, 4096)
                .unwrap_or_else(|e| panic!("{what}: readdir: {e}"))
                .into_iter()
                .map(|d| d.name)
                .collect();
            assert!(names.contains(&b"child".to_vec()), "{what}: {names:?}");
        }
        Kind::Symlink => {
            assert_eq!(
                c.readlink(new.nodeid)
                    .unwrap_or_else(|e| panic!("{what}: readlink: {e}")),
                TARGET
            );
        }
    }

    // The old guest inode is another, and stale: it never reaches the new object.
    assert_ne!(
        new.nodeid, old.nodeid,
        "{what}: the new object got the old guest inode"
    );
    assert_eq!(
        errno(c.getattr(old.nodeid)),
        libc::ESTALE,
        "{what}: the old inode"
    );
    assert_eq!(errno(c.open(old.nodeid, RW)), libc::ESTALE, "{what}");
}

/// Through the guest: a file is made and unlinked without FORGET, then files, directories
/// and symlinks are made until one gets its inode number; that one is a guest inode of its
/// own on which lookup, getattr, chown, chmod, open, read, write, truncate, mkdir, readdir
/// and readlink work and show the new object.
#[test]
fn a_reused_inode_number_is_a_new_guest_inode() {
    for mode in ["prefer", "mandatory"] {
        let fs = Ext4::new();
        let (share, mut daemon, mut c) = serve(&fs, mode);
        for kind in [Kind::File, Kind::Dir, Kind::Symlink] {
            let old = unlinked_file(&mut c, format!("old-{kind:?}").as_bytes());
            let found = (0..TRIES).find_map(|i| {
                let name = format!("new-{kind:?}-{i}").into_bytes();
                let e = make(&mut c, &name, kind);
                (e.attr.ino == old.attr.ino).then_some((name, e))
            });
            let (name, new) = found.unwrap_or_else(|| {
                panic!("{mode}: ext4 gave no {kind:?} of {TRIES} the freed inode number")
            });
            check_new(&mut c, &share, &name, new, old, kind);
            c.forget(old.nodeid, 1).unwrap();
        }
        assert!(daemon.try_wait().unwrap().is_none(), "{}", daemon.output());
        drop(c);
        let _ = daemon.terminate();
    }
}

/// Without file handles an inode is known by its number, which is safe because its O_PATH
/// descriptor keeps it allocated: while the guest knows an unlinked file, no new file gets
/// its number; once the guest forgets it, one does.
#[test]
fn an_inode_held_by_its_descriptor_keeps_its_number() {
    let fs = Ext4::new();
    let (share, mut daemon, mut c) = serve(&fs, "never");
    let old = unlinked_file(&mut c, b"old");
    for i in 0..100 {
        let e = make(&mut c, format!("held-{i}").as_bytes(), Kind::File);
        assert_ne!(
            e.attr.ino, old.attr.ino,
            "a new file got the number of an inode the daemon holds"
        );
        assert_ne!(e.nodeid, old.nodeid);
    }
    // FORGET has no reply and goes on another queue: keep making files until it lands.
    c.forget(old.nodeid, 1).unwrap();
    let found = (0..TRIES).find_map(|i| {
        let name = format!("after-{i}").into_bytes();
        let e = make(&mut c, &name, Kind::File);
        (e.attr.ino == old.attr.ino).then_some((name, e))
    });
    let (name, new) = found.expect("the forgotten inode's number was never reused");
    assert_ne!(new.nodeid, old.nodeid);
    let attr = c.chown(new.nodeid, 1234, 5678).unwrap();
    assert_eq!((attr.uid, attr.gid), (1234, 5678));
    let path = share.join(std::ffi::OsStr::from_bytes(&name));
    assert_eq!(std::fs::metadata(path).unwrap().uid(), 1234);
    assert!(daemon.try_wait().unwrap().is_none(), "{}", daemon.output());
    drop(c);
    let _ = daemon.terminate();
}
