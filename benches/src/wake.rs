//! How long this machine takes to run a thread that sleeps on an eventfd once another CPU
//! writes to it: the wake-up at the end of every request whose client sleeps until it is
//! signalled (libblkio's default).
//!
//! On a VM a sleeping vCPU has halted, and waking it is an inter-processor interrupt that
//! the hypervisor delivers: on our test VM about 5.5 µs until the thread runs, plus about
//! 2 µs of the writer's own time (a VM exit). That is more than a polling daemon's whole
//! path for a page-cached 4 KiB read, so blk-compare prints it beside its depth-1 figures.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pin;

/// Medians over the samples.
#[derive(Debug, Clone, Copy)]
pub struct WakeLatency {
    /// From the start of the eventfd write to the sleeper running again.
    pub wake: Duration,
    /// What the write cost the writer.
    pub write: Duration,
}

/// What the two threads share. Times are nanoseconds since `base`; 0 means not yet.
struct Shared {
    base: Instant,
    efd: OwnedFd,
    /// When the sleeper was about to sleep.
    sleeping_since: AtomicU64,
    /// When the sleeper ran again.
    woke_at: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn now(&self) -> u64 {
        (self.base.elapsed().as_nanos() as u64).max(1)
    }

    fn write(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to the eventfd, open while `self` lives.
        unsafe { libc::write(self.efd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// Sleeps on the eventfd until stopped, noting when it goes to sleep and when it wakes.
fn sleeper(shared: &Shared) {
    let fd: RawFd = shared.efd.as_raw_fd();
    while !shared.stop.load(Ordering::Acquire) {
        shared.sleeping_since.store(shared.now(), Ordering::Release);
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a 100 ms timeout so a lost write cannot hang us.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        let t = shared.now();
        if n == 1 {
            let mut buf = [0u8; 8];
            // SAFETY: reads 8 bytes into a valid buffer from the nonblocking eventfd.
            unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) };
            shared.woke_at.store(t, Ordering::Release);
        }
    }
}

/// Waits for `cond`, spinning, for at most a second.
fn spin_until(mut cond: impl FnMut() -> bool) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !cond() {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the sleeping thread did not answer within 1 s",
            ));
        }
        std::hint::spin_loop();
    }
    Ok(())
}

/// Writes the eventfd from `waker_cpu` `samples` times, each `asleep_for` after a thread on
/// `sleeper_cpu` went to sleep on it (at least once), and times the wake-ups.
pub fn measure(
    waker_cpu: usize,
    sleeper_cpu: usize,
    asleep_for: Duration,
    samples: usize,
) -> io::Result<WakeLatency> {
    // SAFETY: eventfd() has no memory preconditions; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    let shared = Arc::new(Shared {
        base: Instant::now(),
        // SAFETY: `efd` is a new descriptor nothing else owns.
        efd: unsafe { OwnedFd::from_raw_fd(efd) },
        sleeping_since: AtomicU64::new(0),
        woke_at: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let s = Arc::clone(&shared);
    let sleeping = std::thread::spawn(move || -> io::Result<()> {
        pin::current_thread(sleeper_cpu)?;
        sleeper(&s);
        Ok(())
    });
    let s = Arc::clone(&shared);
    let waking = std::thread::spawn(move || -> io::Result<(Vec<f64>, Vec<f64>)> {
        pin::current_thread(waker_cpu)?;
        let gap = asleep_for.as_nanos() as u64;
        let (mut wakes, mut writes) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
        for _ in 0..samples.max(1) {
            // A fresh sleep: the sleeper stored its time after its last wake-up.
            spin_until(|| {
                let since = s.sleeping_since.load(Ordering::Acquire);
                since != 0 && since >= s.woke_at.load(Ordering::Acquire)
            })?;
            let since = s.sleeping_since.load(Ordering::Acquire);
            spin_until(|| s.now() >= since + gap)?;
            s.woke_at.store(0, Ordering::Release);
            let t0 = s.now();
            s.write();
            writes.push((s.now() - t0) as f64);
            spin_until(|| s.woke_at.load(Ordering::Acquire) != 0)?;
            wakes.push(s.woke_at.load(Ordering::Acquire).saturating_sub(t0) as f64);
        }
        Ok((wakes, writes))
    });
    let measured = waking
        .join()
        .map_err(|_| io::Error::other("the waking thread panicked"));
    shared.stop.store(true, Ordering::Release);
    shared.write();
    let slept = sleeping
        .join()
        .map_err(|_| io::Error::other("the sleeping thread panicked"));
    slept??;
    let (wakes, writes) = measured??;
    let median_of = |ns: &[f64]| Duration::from_nanos(crate::median(ns) as u64);
    Ok(WakeLatency {
        wake: median_of(&wakes),
        write: median_of(&writes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample completes (a lost or misattributed wake-up would time out), and the
    /// figures are plausible: a wake-up takes longer than nothing and less than the poll
    /// timeout that would otherwise have ended the sleep.
    #[test]
    fn a_sleeping_thread_is_woken_and_timed() {
        let (waker, sleeper) = (pin::daemon_cpu(), pin::client_cpu());
        let w = measure(waker, sleeper, Duration::from_micros(20), 200).unwrap();
        assert!(
            w.wake > Duration::ZERO && w.wake < Duration::from_millis(100),
            "{w:?}"
        );
        assert!(w.write < w.wake + Duration::from_millis(1), "{w:?}");
    }
}
