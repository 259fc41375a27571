//! Who may connect: the vhost-user and API sockets are their owner's alone (0600), or their
//! owner's and `--socket-group`'s (0660); another user cannot connect and so cannot drive
//! the disk.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use testkit::daemon::{connect_as, expect_usage_error, DaemonCommand};

const NOBODY: u32 = 65534;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn sockets_are_the_owners_alone_unless_a_group_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // Another user must be able to reach the sockets' directory, or the test proves nothing.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (socket, api) = (dir.path().join("blk.sock"), dir.path().join("api.sock"));
    let start = |extra: &[&str]| {
        DaemonCommand::vhost_blk()
            .unwrap_or_else(|e| panic!("{e}"))
            .arg("--socket")
            .arg(&socket)
            .arg("--api-socket")
            .arg(&api)
            .arg("--disk")
            .arg("path=null,size=1M")
            .args(extra)
            .spawn()
            .unwrap_or_else(|e| panic!("starting vhost-blk: {e}"))
    };
    let mut d = start(&[]);
    for s in [&socket, &api] {
        assert_eq!(mode(s), 0o600, "{}", s.display());
        assert_eq!(
            connect_as(s, NOBODY, NOBODY),
            Err(libc::EACCES),
            "another user connected to {}",
            s.display()
        );
    }
    d.terminate().unwrap();

    let mut d = start(&["--socket-group", &NOBODY.to_string()]);
    for s in [&socket, &api] {
        assert_eq!(mode(s), 0o660, "{}", s.display());
        assert_eq!(std::fs::metadata(s).unwrap().gid(), NOBODY);
        assert_eq!(connect_as(s, NOBODY, NOBODY), Ok(()), "{}", s.display());
        assert_eq!(connect_as(s, NOBODY, NOBODY + 1), Err(libc::EACCES));
    }
    // The group's member connected and left: the daemon still serves.
    assert!(d.try_wait().unwrap().is_none(), "{}", d.output());
    d.terminate().unwrap();

    let err = expect_usage_error(
        "vhost-blk",
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--disk",
            "path=null,size=1M",
            "--socket-group",
            "no-such-group-here",
        ],
    );
    assert!(err.contains("no-such-group-here"), "{err}");
}
