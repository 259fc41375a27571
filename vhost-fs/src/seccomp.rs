//! The system calls the daemon may make once it serves (`--seccomp`, virtiofsd's flag): an
//! allow-list applied to every thread (TSYNC) at the end of start-up, built with rust-vmm's
//! `seccompiler`. A call outside it kills the daemon (`kill`, the default), is logged to
//! the kernel log and allowed (`log`, to find what a new code path needs), or raises
//! SIGSYS (`trap`), which names the call on stderr and then ends the daemon with a core dump.
//!
//! The list is what the serving daemon does: the vhost-user protocol (messages with
//! descriptors, guest memory maps, eventfds, epoll), the FUSE operations on the share (the
//! `*at` calls, file handles, xattrs, locks), io_uring, per-thread credential switching,
//! threads, signals and logging. Start-up (namespaces, mounts, rlimits, binding) happens
//! before the filter and is not on it.

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// What a system call outside the list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filter.
    None,
    Kill,
    Log,
    Trap,
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(SeccompMode::None),
            "kill" => Ok(SeccompMode::Kill),
            "log" => Ok(SeccompMode::Log),
            "trap" => Ok(SeccompMode::Trap),
            other => Err(format!(
                "--seccomp {other}: expected none, kill, log or trap"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    #[error("cannot install the seccomp filter: {0}")]
    Install(String),
}

/// The system calls allowed while serving.
const ALLOWED: &[libc::c_long] = &[
    // Memory, threads, scheduling, time.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    // The polling window reads its thread's preemption count (daemon_support::polling).
    libc::SYS_getrusage,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_prctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    // Signals.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_kill,
    libc::SYS_restart_syscall,
    // Descriptors, events, sockets (vhost-user, the API).
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // io_uring (its operations are the ones registered on each ring).
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // The share.
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_lseek,
    libc::SYS_getdents64,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_syncfs,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_copy_file_range,
    libc::SYS_flock,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat2,
    libc::SYS_renameat,
    // The older path calls, which libraries still make in places.
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_readlink,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_mkdir,
    libc::SYS_link,
    libc::SYS_symlink,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_lchown,
    libc::SYS_truncate,
    libc::SYS_getcwd,
    libc::SYS_fchdir,
    libc::SYS_readlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchownat,
    libc::SYS_fchown,
    libc::SYS_utimensat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_umask,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    // Credentials of the calling thread.
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_capget,
    libc::SYS_capset,
];

/// The compiled filter for `mode` (`None` for `SeccompMode::None`).
pub fn filter(mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::None => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Trap => SeccompAction::Trap,
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    BpfProgram::try_from(f)
        .map(Some)
        .map_err(|e| SeccompError::Build(e.to_string()))
}

/// Installs the filter for `mode` on every thread of the process.
pub fn install(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Trap {
        report_sigsys()?;
    }
    if let Some(prog) = filter(mode)? {
        seccompiler::apply_filter_all_threads(&prog)
            .map_err(|e| SeccompError::Install(e.to_string()))?;
    }
    Ok(())
}

/// Makes SIGSYS print the number of the refused call before it ends the process as it would
/// have without a handler (`trap` exists to find what is missing from the list).
fn report_sigsys() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid (no flags, empty mask); the handler is an
    // `extern "C"` function of the SA_SIGINFO signature and stays valid for the life of
    // the process; `act` outlives the call.
    let r = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        // SA_RESETHAND: the handler's own re-raise meets the default action (core dump).
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(SeccompError::Install(format!(
            "cannot install the SIGSYS handler: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The SIGSYS handler: only async-signal-safe calls that are on the list (write, tgkill).
extern "C" fn on_sigsys(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The kernel's `_sigsys` member: the calling address (a pointer) at the start of the
    // union that follows three ints and padding, then the call's number.
    const SYSCALL_OFFSET: usize = 16 + std::mem::size_of::<*const libc::c_void>();
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers, 128 bytes long,
    // and for a seccomp SIGSYS its `_sigsys._syscall` int is at SYSCALL_OFFSET.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let mut msg = [0u8; 96];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        msg[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    };
    put(b"vhost-fs: --seccomp trap: system call ");
    let (mut digits, mut first, mut n) = ([0u8; 10], 10, nr.unsigned_abs());
    loop {
        first -= 1;
        digits[first] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[first..]);
    put(b" is not on the allow-list\n");
    // SAFETY: write takes a valid buffer and its length; tgkill no memory. SIGSYS is blocked
    // in its handler and reset to the default action (SA_RESETHAND): the signal is taken
    // as the handler returns, before the refused call's caller runs on.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call outside the list ends the process with SIGSYS (in a child, so the test
    /// runner survives), and one on it goes through.
    #[test]
    fn a_call_outside_the_list_kills_the_process() {
        let prog = filter(SeccompMode::Kill).unwrap().unwrap();
        for (call_listed, expect_killed) in [(true, false), (false, true)] {
            // SAFETY: the child only installs the filter, makes one system call and exits.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                if seccompiler::apply_filter(&prog).is_err() {
                    // SAFETY: _exit is always safe.
                    unsafe { libc::_exit(3) };
                }
                // SAFETY: plain system calls on no memory of ours.
                unsafe {
                    if call_listed {
                        libc::syscall(libc::SYS_getpid);
                    } else {
                        // Not on the list: the serving daemon never mounts anything.
                        libc::syscall(libc::SYS_umount2, c"/nonexistent".as_ptr(), 0);
                    }
                    libc::_exit(0);
                }
            }
            let mut status = 0;
            // SAFETY: `status` is a valid out-parameter; `pid` is our child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            if expect_killed {
                assert!(
                    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                    "status {status:#x}"
                );
            } else {
                assert!(
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                    "status {status:#x}"
                );
            }
        }
    }
}
