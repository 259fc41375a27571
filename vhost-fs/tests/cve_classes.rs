//! Tests for the classes of attack that virtio-fs servers have had CVEs for, each run on
//! vhost-fs and, where the answer is the kernel's, on virtiofsd too (same client, same
//! requests, same results):
//! - CVE-2022-0358: a file created in a set-group-ID directory by a caller outside that
//!   group must not keep the set-group-ID bit it asked for (virtiofsd kept CAP_FSETID);
//! - device nodes, made on the host or by the guest, are never opened by the daemon (the
//!   guest could otherwise reach host devices through them);
//! - names with a `/`, absolute or not, are refused by MKNOD and SYMLINK too, not only
//!   LOOKUP and CREATE (Kata GHSA-2gv2-cffp-j227 wrote through such names);
//! - a symlink's target is the guest's to resolve: one the guest (or the host) made pointing
//!   outside the share, absolutely or through `..`, is never followed by the daemon, so no
//!   later request through it reaches outside.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use testkit::daemon::Daemon;
use testkit::fuse_client::{
    vhost_fs_command, virtiofsd_command, ClientOptions, FuseClient, FATTR_MODE, FATTR_SIZE, ROOT_ID,
};

const RW: u32 = libc::O_RDWR as u32;
const OTHER_GROUP: u32 = 4242;

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().expect("an errno"),
    }
}

/// A daemon (`ours`: vhost-fs; else virtiofsd) on `share`, and an initialised client.
fn serve(dir: &Path, share: &Path, ours: bool) -> (Daemon, FuseClient) {
    let socket = dir.join(if ours { "ours.sock" } else { "virtiofsd.sock" });
    let cmd = if ours {
        vhost_fs_command(&socket, share).unwrap_or_else(|e| panic!("{e}"))
    } else {
        virtiofsd_command(&socket, share)
            .unwrap_or_else(|e| panic!("this test needs virtiofsd: {e:#}"))
    };
    let daemon = cmd.spawn().unwrap();
    let mut c = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
    c.init().unwrap();
    (daemon, c)
}

/// CVE-2022-0358: in a set-group-ID directory of another group, a file or node created
/// with S_ISGID by a caller outside that group loses the bit (as the kernel does for a
/// local process); a member keeps it, so the check can fail.
#[test]
fn a_non_member_never_gets_the_setgid_bit_in_a_setgid_directory() {
    for ours in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let sgid = share.join("sgid");
        std::fs::create_dir(&sgid).unwrap();
        std::os::unix::fs::chown(&sgid, Some(0), Some(OTHER_GROUP)).unwrap();
        std::fs::set_permissions(&sgid, std::fs::Permissions::from_mode(0o2777)).unwrap();
        let (_d, mut c) = serve(dir.path(), &share, ours);
        let dir_id = c.lookup(ROOT_ID, b"sgid").unwrap().nodeid;
        let who = if ours { "vhost-fs" } else { "virtiofsd" };

        c.caller.uid = 1000;
        c.caller.gid = 1000;
        let (e, fh) = c.create(dir_id, b"file", 0o2755, RW).unwrap();
        c.release(e.nodeid, fh).unwrap();
        c.mknod(dir_id, b"node", libc::S_IFREG | 0o2755, 0).unwrap();
        for name in ["file", "node"] {
            let m = std::fs::metadata(sgid.join(name)).unwrap();
            assert_eq!(
                m.mode() & libc::S_ISGID,
                0,
                "{who}: {name} made by a non-member kept S_ISGID (CVE-2022-0358)"
            );
            assert_eq!(m.gid(), OTHER_GROUP, "{who}: {name} inherits the group");
            assert_eq!(m.uid(), 1000, "{who}: {name}");
        }

        c.caller.gid = OTHER_GROUP;
        let (e, fh) = c.create(dir_id, b"member", 0o2755, RW).unwrap();
        c.release(e.nodeid, fh).unwrap();
        let m = std::fs::metadata(sgid.join("member")).unwrap();
        assert_ne!(m.mode() & libc::S_ISGID, 0, "{who}: a member keeps S_ISGID");
    }
}

fn mknod_host(path: &Path, kind: u32, major: u32, minor: u32) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; mknod takes no other memory.
    let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o666, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
}

/// Device nodes, made on the host or by the guest, are never opened by the daemon: a
/// guest must not reach host devices through its share.
#[test]
fn device_nodes_are_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    // /dev/zero's and /dev/loop0's numbers: opening either would succeed on this host.
    mknod_host(&share.join("host_char"), libc::S_IFCHR, 1, 5);
    mknod_host(&share.join("host_block"), libc::S_IFBLK, 7, 0);
    let (mut d, mut c) = serve(dir.path(), &share, true);
    c.mknod(
        ROOT_ID,
        b"guest_char",
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 5) as u32,
    )
    .unwrap();
    for name in [&b"host_char"[..], b"host_block", b"guest_char"] {
        let e = c.lookup(ROOT_ID, name).unwrap();
        for flags in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR] {
            assert_eq!(
                errno(c.open(e.nodeid, flags as u32)),
                libc::EACCES,
                "{}: opened with flags {flags:#o}",
                String::from_utf8_lossy(name)
            );
        }
        // Nor through CREATE of its name without O_EXCL, nor to truncate it.
        assert_eq!(errno(c.create(ROOT_ID, name, 0o666, RW)), libc::EEXIST);
        assert_eq!(errno(c.setattr(e.nodeid, FATTR_SIZE, 0, 0)), libc::EINVAL);
    }
    assert!(d.try_wait().unwrap().is_none(), "{}", d.output());
}

/// MKNOD and SYMLINK take one name component, like every other request: an absolute or
/// relative path is refused and nothing appears outside the share.
#[test]
fn mknod_and_symlink_refuse_names_that_are_paths() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let outside = dir.path().join("planted");
    let (_d, mut c) = serve(dir.path(), &share, true);
    let abs = outside.as_os_str().as_bytes().to_vec();
    for name in [abs.as_slice(), b"../planted", b"a/b"] {
        assert_eq!(
            errno(c.mknod(ROOT_ID, name, libc::S_IFREG | 0o644, 0)),
            libc::EINVAL
        );
        assert_eq!(
            errno(c.symlink(ROOT_ID, name, b"/etc/shadow")),
            libc::EINVAL
        );
    }
    assert!(
        !outside.exists(),
        "a name that is a path planted a file outside"
    );
    assert!(std::fs::read_dir(&share).unwrap().next().is_none());
}

/// Symlinks pointing outside the share (absolute, through `..`, to a directory or a file,
/// made by the guest or found on the host) are inodes of their own: the daemon reads them
/// but never follows them, so lookups, creation, opening, chmod, chown and truncation
/// through them stay in the share and leave their targets untouched.
#[test]
fn symlinks_pointing_outside_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&share).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let secret = outside.join("secret");
    std::fs::write(&secret, b"host only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = std::fs::metadata(&secret).unwrap();
    let abs = |p: &Path| p.as_os_str().as_bytes().to_vec();
    std::os::unix::fs::symlink(&outside, share.join("host_made")).unwrap();
    let (mut d, mut c) = serve(dir.path(), &share, true);
    let links: [(&[u8], Vec<u8>); 5] = [
        (b"abs_dir", abs(&outside)),
        (b"abs_file", abs(&secret)),
        (b"up", b"../outside".to_vec()),
        (b"root", b"/".to_vec()),
        (b"host_made", abs(&outside)),
    ];
    for (name, target) in &links {
        let what = String::from_utf8_lossy(name);
        let link = if *name == b"host_made" {
            c.lookup(ROOT_ID, name).unwrap()
        } else {
            c.symlink(ROOT_ID, name, target).unwrap()
        };
        assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{what}");
        assert_eq!(
            c.getattr(link.nodeid).unwrap().mode & libc::S_IFMT,
            libc::S_IFLNK,
            "{what}: getattr is the link's own"
        );
        // The guest resolves the target itself, in its own namespace.
        assert_eq!(&c.readlink(link.nodeid).unwrap(), target, "{what}");

        // Names under it are not looked up or made in its target.
        for under in [&b"secret"[..], b"..", b"."] {
            assert_eq!(errno(c.lookup(link.nodeid, under)), libc::ENOTDIR, "{what}");
        }
        assert_eq!(
            errno(c.create(link.nodeid, b"planted", 0o644, RW)),
            libc::ENOTDIR,
            "{what}"
        );
        assert_eq!(
            errno(c.mkdir(link.nodeid, b"planted", 0o755)),
            libc::ENOTDIR,
            "{what}"
        );
        assert_eq!(
            errno(c.mknod(link.nodeid, b"planted", libc::S_IFREG | 0o644, 0)),
            libc::ENOTDIR,
            "{what}"
        );
        assert_eq!(
            errno(c.symlink(link.nodeid, b"planted", b"x")),
            libc::ENOTDIR,
            "{what}"
        );
        // Never opened, so never read, written or listed through.
        for flags in [
            libc::O_RDONLY,
            libc::O_RDWR,
            libc::O_RDONLY | libc::O_DIRECTORY,
        ] {
            assert!(c.open(link.nodeid, flags as u32).is_err(), "{what}: opened");
        }
        assert!(
            c.opendir(link.nodeid).is_err(),
            "{what}: opened as a directory"
        );
        assert_eq!(
            errno(c.setattr(link.nodeid, FATTR_SIZE, 0, 0)),
            libc::EINVAL,
            "{what}: truncated"
        );
        // chmod and chown act on the link (lchmod, lchown) or are refused: its target keeps
        // its mode and owner.
        let _ = c.setattr(link.nodeid, FATTR_MODE, 0, 0o777);
        c.chown(link.nodeid, 1234, 5678).unwrap();
        let host = std::fs::symlink_metadata(share.join(std::ffi::OsStr::from_bytes(name)));
        assert_eq!(host.unwrap().uid(), 1234, "{what}: lchown");
        for p in [&secret, &outside] {
            let m = std::fs::metadata(p).unwrap();
            assert_eq!(m.uid(), 0, "{what}: chown reached {p:?}");
        }
        let m = std::fs::metadata(&secret).unwrap();
        assert_eq!(m.mode(), before.mode(), "{what}: chmod reached the target");
        assert_eq!(m.len(), before.len(), "{what}: truncate reached the target");
    }
    // A hard link of the link is another link, not a link of its target.
    let link = c.lookup(ROOT_ID, b"abs_file").unwrap();
    c.link(link.nodeid, ROOT_ID, b"hard").unwrap();
    assert!(std::fs::symlink_metadata(share.join("hard"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);

    assert_eq!(std::fs::read(&secret).unwrap(), b"host only");
    let left: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["secret"], "something was made outside the share");
    assert!(!dir.path().join("planted").exists() && !Path::new("/planted").exists());
    assert!(d.try_wait().unwrap().is_none(), "{}", d.output());
}
