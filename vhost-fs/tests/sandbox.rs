//! The running daemon is confined as virtiofsd confines itself: a seccomp allow-list
//! (`--seccomp`, kill by default) and only the capabilities its file operations need
//! (`--modcaps` changes the set), read from /proc/PID/status of the running process. With
//! CAP_SYS_ADMIN gone, `trusted.*` extended attributes are refused as virtiofsd refuses
//! them (the same client against both). A call outside the list ends the running daemon:
//! the test makes one of its threads call it, as a debugger would (ptrace), so no code path
//! of the daemon exists for it.

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
        // Every thread, including those started before the filter (TSYNC).
        let tasks = threads(&d);
        assert!(tasks.len() > 1, "{tasks:?}");
        for tid in tasks {
            let status =
                std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", d.pid())).unwrap();
            assert!(
                status.contains(&format!("\nSeccomp:\t{seccomp}\n")),
                "{extra:?}: thread {tid}"
            );
        }
        assert_eq!(cap_eff(&d), caps, "{extra:?}: CapEff {:#x}", cap_eff(&d));
        let bounding = u64::from_str_radix(&status_field(&d, "CapBnd"), 16).unwrap();
        assert_eq!(bounding, caps, "{extra:?}: CapBnd");
        // And it serves.
        c.getattr(ROOT_ID).unwrap();
    }
}

/// The daemon's exit status once it ends by itself (within 10 s).
fn exit_status(d: &mut Daemon, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(s) = d.try_wait().unwrap() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: still running"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn threads(d: &Daemon) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{}/task", d.pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect()
}

/// Makes thread `tid` call system call `nr` (no arguments) as a debugger would: stops it in
/// the call it is blocked in, points it back at that call's `syscall` instruction with `nr`
/// in place of the number, and lets it go.
#[cfg(target_arch = "x86_64")]
fn make_thread_call(tid: i32, nr: libc::c_long) {
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: ptrace requests on a thread of our own child, with `regs` a valid
    // user_regs_struct for GETREGS/SETREGS and null where a request takes no pointer;
    // waitpid gets a valid out-parameter. Only the tracee's registers change.
    unsafe {
        assert_eq!(
            libc::ptrace(libc::PTRACE_SEIZE, tid, null, null),
            0,
            "seize"
        );
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null), 0);
        let mut status = 0;
        assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        assert!(libc::WIFSTOPPED(status), "{status:#x}");
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        assert_eq!(
            libc::ptrace(libc::PTRACE_GETREGS, tid, null, &mut regs as *mut _),
            0
        );
        // An idle daemon's threads all wait in a system call: `syscall` (0f 05) is just
        // before where it returns.
        assert!(
            (regs.orig_rax as i64) >= 0,
            "thread {tid} is not in a system call"
        );
        let at = regs.rip - 2;
        let text = libc::ptrace(libc::PTRACE_PEEKTEXT, tid, at as *mut libc::c_void, null);
        assert_eq!(text & 0xffff, 0x050f, "no syscall instruction at {at:#x}");
        regs.rip = at;
        regs.rax = nr as u64;
        // Not inside a call any more: the kernel must not restart the interrupted one.
        regs.orig_rax = u64::MAX;
        assert_eq!(
            libc::ptrace(libc::PTRACE_SETREGS, tid, null, &mut regs as *mut _),
            0
        );
        assert_eq!(libc::ptrace(libc::PTRACE_DETACH, tid, null, null), 0);
    }
}

/// A call outside the list ends the daemon, whichever thread makes it: with SIGSYS under
/// `kill`, and under `trap` after naming the call on stderr.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_call_outside_the_list_ends_the_daemon() {
    use std::os::unix::process::ExitStatusExt;
    for mode in ["kill", "trap"] {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, mut c) = start(dir.path(), &["--seccomp", mode]);
        c.getattr(ROOT_ID).unwrap();
        let pid = d.pid() as i32;
        // No core file from the death below.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit reads `no_core` and writes nothing (null old-limit pointer).
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_CORE, &no_core, std::ptr::null_mut()) };
        assert_eq!(rc, 0);
        // Not the main thread, which installed the filter: the first one it started, which
        // was running before that (the filter reached it through TSYNC).
        let tid = threads(&d).into_iter().filter(|&t| t != pid).min().unwrap();
        // getppid: harmless, and nothing in the daemon asks for its parent.
        make_thread_call(tid, libc::SYS_getppid);
        let status = exit_status(&mut d, mode);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{mode}: {status:?}");
        if mode == "trap" {
            d.kill();
            let wanted = format!("system call {} is not on the allow-list", libc::SYS_getppid);
            assert!(d.output().contains(&wanted), "{}", d.output());
        }
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

/// Starts vhost-fs with `--sandbox namespace` on `dir/fs.sock` and connects; returns the
/// process started, the client and the serving process (its child).
fn start_namespaced(dir: &Path) -> (Daemon, FuseClient, u32) {
    let share = dir.join("share");
    let _ = std::fs::create_dir(&share);
    let socket = dir.join("fs.sock");
    let mut cmd = vhost_fs_command(&socket, &share).unwrap();
    // testkit runs vhost-fs without a sandbox (`--sandbox none`): this test wants it.
    let at = cmd.args.iter().position(|a| a == "--sandbox").unwrap();
    cmd.args[at + 1] = "namespace".into();
    let d = cmd.spawn().unwrap();
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
    (d, c, server)
}

/// `--sandbox namespace` (the default as root) runs the daemon as the first process of
/// PID, network and IPC namespaces of its own besides its mount namespace; the process that
/// was started stays outside, passes SIGTERM on and exits as the daemon does. A frontend
/// that disconnects ends it as it ends an unsandboxed daemon, and the next one can start on
/// the same socket.
#[test]
fn the_namespace_sandbox_shares_no_namespace_with_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let share = dir.join("share");
    let (mut d, mut c, server) = start_namespaced(dir);
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
    assert!(!dir.join("fs.sock").exists(), "socket file left behind");

    // Again on the same socket: the frontend goes away, and so does the daemon, with 0.
    let (mut d, c, server) = start_namespaced(dir);
    drop(c);
    let exit = exit_status(&mut d, "after the disconnect");
    assert!(exit.success(), "{exit:?}\n{}", d.output());
    assert!(!Path::new(&format!("/proc/{server}")).exists());
    assert!(!dir.join("fs.sock").exists(), "socket file left behind");
}
