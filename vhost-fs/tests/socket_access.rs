//! Who may connect: the vhost-user and API sockets are their owner's alone (0600), or their
//! owner's and `--socket-group`'s (0660), although the daemon runs with umask 0 (so that
//! the guest's file modes apply as given). Whoever connects to the vhost-user socket drives
//! the share with the daemon's rights, root's here.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use testkit::daemon::{connect_as, expect_usage_error};
use testkit::fuse_client::vhost_fs_command;

const NOBODY: u32 = 65534;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn sockets_are_the_owners_alone_unless_a_group_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let (socket, api) = (dir.path().join("fs.sock"), dir.path().join("api.sock"));
    let start = |extra: &[&str]| {
        vhost_fs_command(&socket, &share)
            .unwrap_or_else(|e| panic!("{e}"))
            .arg("--api-socket")
            .arg(&api)
            .args(extra)
            .spawn()
            .unwrap_or_else(|e| panic!("starting vhost-fs: {e}"))
    };
    let mut d = start(&[]);
    for s in [&api, &socket] {
        assert_eq!(mode(s), 0o600, "{}", s.display());
        assert_eq!(
            connect_as(s, NOBODY, NOBODY),
            Err(libc::EACCES),
            "another user connected to {}",
            s.display()
        );
    }
    d.terminate().unwrap();

    let mut d = start(&["--socket-group", "nogroup"]);
    let nogroup = std::fs::metadata(&socket).unwrap().gid();
    for s in [&api, &socket] {
        assert_eq!(mode(s), 0o660, "{}", s.display());
        assert_eq!(std::fs::metadata(s).unwrap().gid(), nogroup);
        assert_eq!(connect_as(s, NOBODY, nogroup + 1), Err(libc::EACCES));
    }
    // A member of the group gets in (vhost-fs then serves that frontend, and exits when
    // it leaves, as virtiofsd does).
    assert_eq!(connect_as(&api, NOBODY, nogroup), Ok(()));
    assert_eq!(connect_as(&socket, NOBODY, nogroup), Ok(()));
    let _ = d.terminate();

    let err = expect_usage_error(
        "vhost-fs",
        &[
            "--socket-path",
            socket.to_str().unwrap(),
            "--shared-dir",
            share.to_str().unwrap(),
            "--sandbox",
            "none",
            "--socket-group",
            "no-such-group-here",
        ],
    );
    assert!(err.contains("no-such-group-here"), "{err}");
}
