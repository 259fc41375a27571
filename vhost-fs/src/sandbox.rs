//! Confining the daemon to the share before it serves a guest.
//!
//! - `namespace`: a private mount namespace whose root is the shared directory (bind-mounted
//!   onto itself, then `pivot_root`), so no path the process could ever form names anything
//!   outside the share, and network and IPC namespaces of its own (no network, no System V
//!   IPC: the sockets it serves are bound before). `/proc/self/fd` is opened from a proc of
//!   the daemon's own, bind-mounted over `/proc` so nothing else of it is reachable, before
//!   the pivot hides it. Before all that, [`fork_into_pid_namespace`] makes the daemon the
//!   first process of a PID namespace of its own, as virtiofsd does.
//! - `chroot`: `chroot` into the share (weaker: no new namespace).
//! - `none`: nothing beyond the per-request checks (`openat2` with `RESOLVE_BENEATH`).
//!
//! Runs before any thread is started (`unshare` of the mount namespace needs that).

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::config::Sandbox;
use crate::passthrough::sys::cvt;

#[derive(Debug, thiserror::Error)]
#[error("sandbox ({step}): {source}")]
pub struct SandboxError {
    step: &'static str,
    #[source]
    source: io::Error,
}

fn step(step: &'static str, r: io::Result<i32>) -> Result<(), SandboxError> {
    r.map(drop).map_err(|source| SandboxError { step, source })
}

/// Enters the sandbox. For `namespace`, returns `/proc/self/fd` opened from inside it: a
/// proc of the daemon's own PID namespace, of which nothing but that directory is reachable
/// (it is bind-mounted over `/proc` before being opened).
pub fn enter(kind: Sandbox, shared_dir: &Path) -> Result<Option<OwnedFd>, SandboxError> {
    let dir = CString::new(shared_dir.as_os_str().as_bytes()).map_err(|_| SandboxError {
        step: "path",
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    match kind {
        Sandbox::None => Ok(None),
        Sandbox::Chroot => {
            // SAFETY: `dir` is NUL-terminated; chroot and chdir take no other memory.
            step("chroot", cvt(unsafe { libc::chroot(dir.as_ptr()) }))?;
            // SAFETY: a static NUL-terminated path.
            step("chdir /", cvt(unsafe { libc::chdir(c"/".as_ptr()) }))?;
            Ok(None)
        }
        Sandbox::Namespace => {
            // SAFETY: every call below takes NUL-terminated static or owned strings and
            // null pointers where the kernel allows them; results are checked.
            unsafe {
                step(
                    "unshare",
                    cvt(libc::unshare(
                        libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC,
                    )),
                )?;
                // Our mounts must not propagate back to the host.
                step(
                    "make / a slave",
                    cvt(libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_SLAVE | libc::MS_REC,
                        std::ptr::null(),
                    )),
                )?;
                // A proc of our own PID namespace, then only its /proc/self/fd.
                step(
                    "mount proc",
                    cvt(libc::mount(
                        c"proc".as_ptr(),
                        c"/proc".as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOSUID | libc::MS_RELATIME,
                        std::ptr::null(),
                    )),
                )?;
                step(
                    "bind-mount /proc/self/fd over /proc",
                    cvt(libc::mount(
                        c"/proc/self/fd".as_ptr(),
                        c"/proc".as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )),
                )?;
                let proc_fd = libc::open(
                    c"/proc".as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                );
                step("open /proc/self/fd", cvt(proc_fd))?;
                let proc_fd = OwnedFd::from_raw_fd(proc_fd);
                step(
                    "bind-mount the share",
                    cvt(libc::mount(
                        dir.as_ptr(),
                        dir.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    )),
                )?;
                step("chdir into the share", cvt(libc::chdir(dir.as_ptr())))?;
                step(
                    "pivot_root",
                    cvt(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as i32),
                )?;
                // The old root is stacked on the new one: detach it.
                step(
                    "unmount the old root",
                    cvt(libc::umount2(c".".as_ptr(), libc::MNT_DETACH)),
                )?;
                step("chdir /", cvt(libc::chdir(c"/".as_ptr())))?;
                Ok(Some(proc_fd))
            }
        }
    }
}

/// Makes the rest of the daemon run as the first process of a new PID namespace (it sees
/// no other process, and none can be started into it): forks after `unshare`, and returns
/// in the child only. The calling process stays outside as the daemon's monitor: it passes
/// termination signals on and exits with the daemon's status, so whoever started it (a
/// unit file, a test) still sees one process to signal and wait for. Call it while the
/// process has a single thread.
pub fn fork_into_pid_namespace() -> Result<(), SandboxError> {
    let sigs = [
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGCHLD,
    ];
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which initialises it;
    // sigaddset and sigprocmask take pointers to it and to a valid out-set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in sigs {
            libc::sigaddset(&mut set, s);
        }
        // Blocked before the fork so that none is lost, and kept blocked in the child: as
        // the first process of its namespace it drops signals it neither handles nor blocks
        // (its signal thread waits for them once it starts).
        step(
            "block signals",
            cvt(libc::sigprocmask(
                libc::SIG_BLOCK,
                &set,
                std::ptr::null_mut(),
            )),
        )?;
        set
    };
    // SAFETY: no memory is passed.
    let unshared = unsafe { libc::unshare(libc::CLONE_NEWPID) };
    step("unshare a PID namespace", cvt(unshared))?;
    // SAFETY: the process has one thread (the caller's contract), so the child may go on
    // running ordinary code.
    let child = unsafe { libc::fork() };
    step("fork", cvt(child))?;
    if child == 0 {
        // SAFETY: prctl and setpgid with integer arguments only.
        unsafe {
            // The daemon ends with its monitor (it drains and exits on SIGTERM).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            // A terminal's signals reach the monitor alone, which passes them on once.
            libc::setpgid(0, 0);
        }
        return Ok(());
    }
    // The monitor needs no capabilities.
    let _ = crate::capabilities::keep_only(&std::collections::HashSet::new());
    loop {
        // SAFETY: `set` is an initialised sigset_t; no siginfo is asked for.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if sig == libc::SIGCHLD || sig < 0 {
            let mut status = 0;
            // SAFETY: `status` is a valid out-parameter; `child` is ours.
            if unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) } == child {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                std::process::exit(code);
            }
            continue;
        }
        // The daemon stops on SIGTERM and SIGINT; as PID 1 of its namespace it would drop
        // a hang-up or quit it does not handle, which used to end it: they stop it too.
        let sig = if sig == libc::SIGINT {
            sig
        } else {
            libc::SIGTERM
        };
        // SAFETY: kill takes no memory; `child` is our child.
        unsafe { libc::kill(child, sig) };
    }
}

/// Sets the open-file limit: `n`, or the hard limit capped at 1 Mi when `n` is `None`.
pub fn set_nofile(n: Option<u64>) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-buffer.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    let want = n.unwrap_or_else(|| lim.rlim_max.min(1 << 20));
    lim.rlim_cur = want;
    if lim.rlim_max < want {
        lim.rlim_max = want;
    }
    // SAFETY: `lim` is a valid rlimit.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    Ok(want)
}
