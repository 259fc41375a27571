//! The running daemon is confined as virtiofsd confines itself: a seccomp allow-list
//! (`--seccomp`, kill by default) and only the capabilities its file operations need
//! (`--modcaps` changes the set), read from /proc/PID/status of the running process. With
//! CAP_SYS_ADMIN gone, `trusted.*` extended attributes are refused as virtiofsd refuses
//! them (the same client against both). That a call outside the list kills the process is
//! tested on the filter itself (`seccomp::tests`).

use std::path::Path;

use testkit::daemon::Daemon;
use testkit::fuse_client::{
    vhost_fs_command, virtiofsd_command, ClientOptions, FuseClient, ROOT_ID,
};

fn status_field(daemon: &Daemon, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
        .trim()
        .to_owned()
}

fn start(dir: &Path, extra: &[&str]) -> (Daemon, FuseClient) {
    let share = dir.join("share");
    let _ = std::fs::create_dir(&share);
    let socket = dir.join("fs.sock");
    let daemon = vhost_fs_command(&socket, &share)
        .unwrap()
        .args(extra)
        .spawn()
        .unwrap();
    let mut c = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
    c.init().unwrap();
    (daemon, c)
}

/// CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD, SETFCAP.
const DEFAULT_CAPS: u64 = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 4 | 1 << 6 | 1 << 7 | 1 << 27 | 1 << 31;
const CAP_DAC_READ_SEARCH: u64 = 1 << 2;
const CAP_SYS_ADMIN: u64 = 1 << 21;
const CAP_MKNOD: u64 = 1 << 27;

fn cap_eff(d: &Daemon) -> u64 {
    u64::from_str_radix(&status_field(d, "CapEff"), 16).unwrap()
}

#[test]
fn the_daemon_runs_under_seccomp_with_only_the_capabilities_it_needs() {
    // File handles (the default, `prefer`) need CAP_DAC_READ_SEARCH too.
    let handles = DEFAULT_CAPS | CAP_DAC_READ_SEARCH;
    for (extra, seccomp, caps) in [
        (&[][..], "2", handles),
        (&["--seccomp", "none"][..], "0", handles),
        (&["--seccomp", "log"][..], "2", handles),
        (&["--inode-file-handles=never"][..], "2", DEFAULT_CAPS),
        (
            &["--modcaps=+sys_admin:-mknod"][..],
            "2",
            (handles | CAP_SYS_ADMIN) & !CAP_MKNOD,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (d, mut c) = start(dir.path(), extra);
        assert_eq!(status_field(&d, "Seccomp"), seccomp, "{extra:?}");
        assert_eq!(cap_eff(&d), caps, "{extra:?}: CapEff {:#x}", cap_eff(&d));
        let bounding = u64::from_str_radix(&status_field(&d, "CapBnd"), 16).unwrap();
        assert_eq!(bounding, caps, "{extra:?}: CapBnd");
        // And it serves.
        c.getattr(ROOT_ID).unwrap();
    }
}

#[test]
fn trusted_xattrs_are_refused_as_virtiofsd_refuses_them() {
    let mut results = Vec::new();
    for ours in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(share.join("file"), b"x").unwrap();
        let socket = dir.path().join("fs.sock");
        let cmd = if ours {
            vhost_fs_command(&socket, &share).unwrap()
        } else {
            virtiofsd_command(&socket, &share)
                .unwrap_or_else(|e| panic!("this test needs virtiofsd: {e:#}"))
        };
        let _d = cmd.arg("--xattr").spawn().unwrap();
        let mut c = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
        c.init().unwrap();
        let f = c.lookup(ROOT_ID, b"file").unwrap().nodeid;
        let set = c
            .setxattr(f, b"trusted.strata", b"v")
            .map_err(|e| e.raw_os_error());
        let user = c
            .setxattr(f, b"user.strata", b"v")
            .map_err(|e| e.raw_os_error());
        results.push((set, user));
    }
    assert_eq!(results[0], results[1], "vhost-fs, then virtiofsd");
    assert_eq!(results[0].0, Err(Some(libc::EPERM)), "trusted.* refused");
    assert_eq!(results[0].1, Ok(()), "user.* allowed");
}

/// `--sandbox namespace` (the default as root) runs the daemon as the first process of
/// PID, network and IPC namespaces of its own besides its mount namespace; the process that
/// was started stays outside, passes SIGTERM on and exits as the daemon does.
#[test]
fn the_namespace_sandbox_shares_no_namespace_with_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let socket = dir.path().join("fs.sock");
    let mut cmd = vhost_fs_command(&socket, &share).unwrap();
    // testkit runs vhost-fs without a sandbox (`--sandbox none`): this test wants it.
    let at = cmd.args.iter().position(|a| a == "--sandbox").unwrap();
    cmd.args[at + 1] = "namespace".into();
    let mut d = cmd.spawn().unwrap();
    let mut c = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
    c.init().unwrap();
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", d.pid())).unwrap();
    let server: u32 = children
        .split_whitespace()
        .next()
        .expect("the daemon runs as a child of the process started")
        .parse()
        .unwrap();
    for ns in ["mnt", "net", "ipc", "pid"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{server}/ns/{ns}")).unwrap();
        assert_ne!(ours, its, "{ns} namespace shared with the host");
    }
    let status = std::fs::read_to_string(format!("/proc/{server}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(
        nspid.trim_end().ends_with("\t1"),
        "the daemon is not PID 1 there: {nspid}"
    );
    // It serves the share through the root it opened inside its namespaces.
    c.getattr(ROOT_ID).unwrap();
    let sub = c.mkdir(ROOT_ID, b"sub", 0o755).unwrap();
    assert_eq!(c.lookup(sub.nodeid, b"..").unwrap().nodeid, ROOT_ID);
    assert!(share.join("sub").is_dir());
    // Opening a looked-up inode goes through the daemon's own /proc/self/fd.
    let (e, fh) = c.create(ROOT_ID, b"f", 0o644, libc::O_RDWR as u32).unwrap();
    assert_eq!(c.write(e.nodeid, fh, 0, b"inside").unwrap(), 6);
    c.release(e.nodeid, fh).unwrap();
    let f = c.lookup(ROOT_ID, b"f").unwrap();
    let fh = c.open(f.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(f.nodeid, fh, 0, 16).unwrap(), b"inside");
    c.release(f.nodeid, fh).unwrap();
    // SIGTERM to the process started reaches the daemon, which drains and exits 0.
    let exit = d.terminate().unwrap();
    assert!(exit.success(), "{exit:?}\n{}", d.output());
    assert!(
        !Path::new(&format!("/proc/{server}")).exists(),
        "the daemon outlived its monitor"
    );
}
