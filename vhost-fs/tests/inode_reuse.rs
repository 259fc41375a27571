//! A host inode number reused by a new file must not map the new file to the guest inode
//! of the old one: with `--inode-file-handles`, an inode the guest knows is not held open,
//! so once its file is unlinked the filesystem may give its number to the next file. The
//! new file has another file handle (another generation); it must get a guest inode of its
//! own and every operation on it must work and show its attributes, not fail with ESTALE.
//!
//! On a loop-mounted ext4 (which reuses a freed inode number at once), made by the test:
//! needs root, loop devices and mkfs.ext4 (e2fsprogs), as CI has.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::fuse_client::{
    vhost_fs_command, ClientOptions, FuseClient, FATTR_MODE, FATTR_SIZE, ROOT_ID,
};

const RW: u32 = libc::O_RDWR as u32;

/// An ext4 file system in a file, loop-mounted at `mnt` until dropped.
struct Ext4 {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Ext4 {
    fn new() -> Ext4 {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("ext4.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
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
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        Ext4 { _dir: dir, mnt }
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn ino(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn a_reused_inode_number_is_a_new_guest_inode() {
    for mode in ["prefer", "mandatory"] {
        let fs = Ext4::new();
        let share = fs.mnt.join("share");
        std::fs::create_dir(&share).unwrap();
        let socket = fs._dir.path().join(format!("{mode}.sock"));
        let mut daemon = vhost_fs_command(&socket, &share)
            .unwrap()
            .arg(format!("--inode-file-handles={mode}"))
            .spawn()
            .unwrap();
        let mut c = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
        c.init().unwrap();

        // The guest creates and looks up a file, which is then unlinked; the guest never
        // sends FORGET, so the daemon still knows the old inode.
        let (old, fh) = c.create(ROOT_ID, b"old", 0o600, RW).unwrap();
        c.write(old.nodeid, fh, 0, b"old contents").unwrap();
        c.release(old.nodeid, fh).unwrap();
        let old_ino = ino(&share.join("old"));
        std::fs::remove_file(share.join("old")).unwrap();

        // New files on the host until one gets the old inode number.
        let mut reused = None;
        for i in 0..1000 {
            let p = share.join(format!("new{i}"));
            std::fs::write(&p, b"the new file, longer than the old one").unwrap();
            if ino(&p) == old_ino {
                reused = Some(p);
                break;
            }
        }
        let reused = reused.expect("ext4 did not reuse the inode number within 1000 files");
        let name = reused.file_name().unwrap().as_encoded_bytes().to_vec();
        std::os::unix::fs::chown(&reused, Some(1234), Some(5678)).unwrap();

        let new = c
            .lookup(ROOT_ID, &name)
            .unwrap_or_else(|e| panic!("{mode}: lookup of the new file: {e}"));
        assert_ne!(
            new.nodeid, old.nodeid,
            "{mode}: the new file got the old guest inode"
        );
        assert_eq!(new.attr.ino, old_ino);
        assert_eq!(new.attr.size, 37, "{mode}: the new file's size");
        assert_eq!((new.attr.uid, new.attr.gid), (1234, 5678), "{mode}");
        let attr = c
            .getattr(new.nodeid)
            .unwrap_or_else(|e| panic!("{mode}: getattr: {e}"));
        assert_eq!(attr.size, 37);
        c.setattr(new.nodeid, FATTR_MODE, 0, 0o640)
            .unwrap_or_else(|e| panic!("{mode}: chmod: {e}"));
        assert_eq!(std::fs::metadata(&reused).unwrap().mode() & 0o777, 0o640);
        let fh = c
            .open(new.nodeid, RW)
            .unwrap_or_else(|e| panic!("{mode}: open: {e}"));
        assert_eq!(
            c.read(new.nodeid, fh, 0, 64).unwrap(),
            b"the new file, longer than the old one"
        );
        c.release(new.nodeid, fh).unwrap();
        c.setattr(new.nodeid, FATTR_SIZE, 3, 0)
            .unwrap_or_else(|e| panic!("{mode}: truncate: {e}"));
        assert_eq!(std::fs::read(&reused).unwrap(), b"the");
        // The old guest inode is stale: it never reaches the new file.
        if let Ok(a) = c.getattr(old.nodeid) {
            assert_ne!(a.size, 3, "{mode}: the old inode reached the new file");
        }
        c.forget(old.nodeid, 1).unwrap();
        assert!(daemon.try_wait().unwrap().is_none(), "{}", daemon.output());
        drop(c);
        let _ = daemon.terminate();
    }
}
