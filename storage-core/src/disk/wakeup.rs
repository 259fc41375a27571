//! What wakes a worker: a node with more than one source of completions (a child's engine,
//! a timer) gathers them into one descriptor, an epoll set, which is readable when any of
//! them is, so the worker's event loop still waits on one fd per queue.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// An epoll set used only as a readiness aggregate (never waited on here).
pub(crate) struct FdSet {
    epoll: OwnedFd,
}

impl FdSet {
    pub(crate) fn new() -> io::Result<FdSet> {
        // SAFETY: epoll_create1 has no memory preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(FdSet { epoll })
    }

    /// Adds `fd` (level-triggered, readable). The caller keeps `fd` open while the set
    /// exists.
    pub(crate) fn add(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// A set of `own` and the fds a child queue wakes on (each once).
    pub(crate) fn joining(own: RawFd, child: &impl crate::disk::DiskQueue) -> io::Result<FdSet> {
        let set = FdSet::new()?;
        let mut fds = vec![own];
        child.wake_fds(&mut fds);
        fds.sort_unstable();
        fds.dedup();
        for fd in fds {
            set.add(fd)?;
        }
        Ok(set)
    }
}

/// A one-shot monotonic timer whose expiry makes its descriptor readable.
pub(crate) struct Timer {
    fd: OwnedFd,
}

impl Timer {
    pub(crate) fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create has no memory preconditions; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Timer {
            // SAFETY: a fresh descriptor that nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires once, `after` from now (replacing any earlier setting).
    pub(crate) fn arm(&self, after: Duration) {
        // A zero it_value would disarm the timer; a nanosecond fires at once.
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        // Only EBADF/EINVAL can fail here, neither possible with our own fd and a
        // normalised value.
        debug_assert_eq!(rc, 0);
    }

    /// Clears an expiry (reads the timerfd), if there was one.
    pub(crate) fn ack(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid buffer from our own nonblocking fd.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, timeout_ms) == 1 }
    }

    #[test]
    fn a_set_is_readable_while_a_member_timer_has_fired() {
        let set = FdSet::new().unwrap();
        let t = Timer::new().unwrap();
        set.add(t.fd()).unwrap();
        assert!(!readable(set.fd(), 0));
        t.arm(Duration::from_millis(5));
        assert!(
            readable(set.fd(), 1000),
            "the timer never made the set readable"
        );
        t.ack();
        assert!(
            !readable(set.fd(), 0),
            "an acknowledged timer still wakes the set"
        );
    }
}
