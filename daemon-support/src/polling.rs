//! How long a queue worker polls an idle queue before it sleeps: adaptive, so that polling
//! wins on an idle host and costs nothing on a busy one.
//!
//! The window follows KVM's halt polling: after each sleep, if the worker was woken within
//! the longest window (`--poll-us`), a longer window would have caught the request without
//! the wake-up, so the window doubles; if it slept longer, polling was wasted, so it halves.
//!
//! And it stops while the CPU is contended: beside a guest's busy vCPUs, a polling worker
//! takes CPU time from the very threads it waits for (the client's, io_uring's workers),
//! and lost 3:1 to a daemon that never polls (blk-compare `--busy 2`). Contention shows two
//! ways: a look during polling that comes much later than the one before (the thread was
//! preempted, or its `sched_yield` gave the CPU to someone who wanted it), and the thread
//! being preempted (its involuntary context switches, from `getrusage(RUSAGE_THREAD)`, read
//! at most every 10 ms, when the worker goes to sleep). Either turns polling off for a
//! cool-down; it then starts again from the smallest window.
//!
//! No file is read for this: vhost-fs's workers run with the guest's shared directory as
//! their root, where `/proc/...` would be a path the guest controls.

use std::time::{Duration, Instant};

/// A look that comes this long after the previous one means the thread did not have the CPU.
const PREEMPTED_GAP: Duration = Duration::from_micros(25);
/// How long polling stays off after contention was seen.
const COOL_DOWN: Duration = Duration::from_millis(50);
/// How often the preemption count is read.
const PREEMPTIONS_EVERY: Duration = Duration::from_millis(10);
/// Preemptions per second above which others want our CPU (a preempted thread on a busy
/// CPU is switched out at every scheduler tick, hundreds of times a second).
const CONTENDED_RATE: f64 = 100.0;
/// The smallest window polling grows from.
const MIN_WINDOW: Duration = Duration::from_micros(2);

/// One worker's polling window.
#[derive(Debug)]
pub struct PollWindow {
    max: Duration,
    window: Duration,
    slept_at: Option<Instant>,
    last_look: Option<Instant>,
    off_until: Option<Instant>,
    /// (when, involuntary context switches) at the last reading.
    preempted: Option<(Instant, u64)>,
}

/// The calling thread's involuntary context switches so far.
fn preemptions() -> Option<u64> {
    // SAFETY: getrusage writes one rusage struct into the zeroed local it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD reads the calling thread's counters.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    (rc == 0).then_some(ru.ru_nivcsw as u64)
}

impl PollWindow {
    /// A window of at most `max` (zero: never polls).
    pub fn new(max: Duration) -> PollWindow {
        PollWindow {
            max,
            window: max,
            slept_at: None,
            last_look: None,
            off_until: None,
            preempted: None,
        }
    }

    /// How long to poll now.
    pub fn current(&self) -> Duration {
        self.window
    }

    fn contended(&mut self, now: Instant) {
        self.window = Duration::ZERO;
        self.off_until = Some(now + COOL_DOWN);
    }

    /// A look at the idle queue, at `now`, during a poll window.
    pub fn look(&mut self, now: Instant) {
        if let Some(prev) = self.last_look.replace(now) {
            if now.saturating_duration_since(prev) > PREEMPTED_GAP {
                self.contended(now);
            }
        }
    }

    /// The worker found work (the window is kept) and is no longer in a poll window.
    pub fn busy(&mut self) {
        self.last_look = None;
    }

    /// The worker goes to sleep on its eventfds.
    pub fn sleeping(&mut self, now: Instant) {
        self.last_look = None;
        self.slept_at = Some(now);
        if self.max.is_zero() {
            return;
        }
        let due = self
            .preempted
            .is_none_or(|(at, _)| now.saturating_duration_since(at) >= PREEMPTIONS_EVERY);
        if due {
            if let Some(count) = preemptions() {
                if let Some((at, before)) = self.preempted {
                    let secs = now.saturating_duration_since(at).as_secs_f64();
                    let switched = count.saturating_sub(before) as f64;
                    if secs > 0.0 && switched / secs > CONTENDED_RATE {
                        self.contended(now);
                    }
                }
                self.preempted = Some((now, count));
            }
        }
    }

    /// The worker was woken (a kick or a completion) at `now`.
    pub fn woke(&mut self, now: Instant) {
        let Some(slept_at) = self.slept_at.take() else {
            return;
        };
        if self.max.is_zero() {
            return;
        }
        if let Some(until) = self.off_until {
            if now < until {
                return;
            }
            self.off_until = None;
        }
        if now.saturating_duration_since(slept_at) <= self.max {
            // A window this long would have caught it.
            // (A maximum below MIN_WINDOW is the maximum.)
            self.window = (self.window * 2).clamp(MIN_WINDOW.min(self.max), self.max);
        } else {
            self.window /= 2;
            if self.window < MIN_WINDOW {
                self.window = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sleeps_grow_the_window_and_long_ones_shrink_it() {
        let max = Duration::from_micros(32);
        let mut p = PollWindow::new(max);
        let t0 = Instant::now();
        // Long sleeps: 32 -> 16 -> 8 -> 4 -> 2 -> 0.
        let mut t = t0;
        for _ in 0..5 {
            p.sleeping(t);
            t += Duration::from_millis(5);
            p.woke(t);
        }
        assert_eq!(p.current(), Duration::ZERO);
        // Short sleeps: back up to the maximum, never past it.
        for _ in 0..10 {
            p.sleeping(t);
            t += Duration::from_micros(10);
            p.woke(t);
        }
        assert_eq!(p.current(), max);
    }

    #[test]
    fn a_preempted_look_turns_polling_off_for_a_cool_down() {
        let mut p = PollWindow::new(Duration::from_micros(32));
        let t0 = Instant::now();
        p.look(t0);
        p.look(t0 + Duration::from_micros(1));
        assert_eq!(p.current(), Duration::from_micros(32));
        p.look(t0 + Duration::from_micros(200));
        assert_eq!(p.current(), Duration::ZERO);
        // Short sleeps during the cool-down do not bring it back...
        p.sleeping(t0 + Duration::from_millis(1));
        p.woke(t0 + Duration::from_millis(1) + Duration::from_micros(5));
        assert_eq!(p.current(), Duration::ZERO);
        // ...after it, they do.
        let later = t0 + COOL_DOWN + Duration::from_millis(1);
        p.sleeping(later);
        p.woke(later + Duration::from_micros(5));
        assert_eq!(p.current(), MIN_WINDOW);
    }

    #[test]
    fn a_maximum_below_the_smallest_window_is_kept() {
        let max = Duration::from_micros(1);
        let mut p = PollWindow::new(max);
        let t = Instant::now();
        for i in 0..4 {
            p.sleeping(t + Duration::from_micros(10 * i));
            p.woke(t + Duration::from_micros(10 * i) + Duration::from_nanos(500));
        }
        assert_eq!(p.current(), max);
    }

    #[test]
    fn zero_never_polls() {
        let mut p = PollWindow::new(Duration::ZERO);
        let t = Instant::now();
        p.sleeping(t);
        p.woke(t + Duration::from_micros(1));
        assert_eq!(p.current(), Duration::ZERO);
    }
}
