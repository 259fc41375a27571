//! How long a queue worker polls an idle queue before it sleeps: adaptive, so that polling
//! wins on an idle host and costs nothing on a busy one.
//!
//! The window follows KVM's halt polling: after each sleep, if the worker was woken within
//! the longest window (`--poll-us`), a longer window would have caught the request without
//! the wake-up, so the window doubles; if it slept longer, polling was wasted, so it halves.
//!
//! And it stops while the CPU is contended: beside a guest's busy vCPUs, a polling worker
//! takes CPU time from the very threads it waits for (the client's, io_uring's workers),
//! and lost 3:1 to a daemon that never polls (blk-compare `--busy 2`). Contention shows
//! three ways: a look during polling that comes much later than the one before (the thread
//! was preempted, or its `sched_yield` gave the CPU to someone who wanted it); the thread
//! being preempted (its involuntary context switches, from `getrusage(RUSAGE_THREAD)`); and,
//! where the daemon allows it, the thread waiting long for a CPU (the scheduler's run
//! delay). The last two are read at most every 10 ms, when the worker goes to sleep or asks
//! [`PollWindow::shared`]. Any of them turns polling off for a cool-down; it then starts
//! again from the smallest window.
//!
//! Whether the worker's CPU is shared ([`PollWindow::shared`], which sizes vhost-blk's
//! batches) rests on the run delay alone: a poll's late look, and a preemption now and
//! then, also happen on a quiet host (an interrupt, the hypervisor), and a worker that
//! sleeps between requests is rarely preempted, however long it waits for a CPU after each
//! wake-up. Shared also keeps polling off for as long as it lasts.
//!
//! The run delay is a file (`/proc/thread-self/schedstat`), so it is read only when the
//! daemon asks ([`PollWindow::with_run_delay`]): vhost-fs's workers run with the guest's
//! shared directory as their root, where `/proc/...` would be a path the guest controls.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// A look that comes this long after the previous one means the thread did not have the CPU.
const PREEMPTED_GAP: Duration = Duration::from_micros(25);
/// How long polling stays off after contention was seen.
const COOL_DOWN: Duration = Duration::from_millis(50);
/// How long the CPU counts as shared after two readings running showed it. Longer than polling's cool-down:
/// beside busy vCPUs the signs come and go from one 10 ms reading to the next (a reading
/// where the worker had a CPU to itself), while the batch should stay the shared one.
const SHARED_COOL_DOWN: Duration = Duration::from_secs(1);
/// How often the preemptions and the run delay are read.
const PREEMPTIONS_EVERY: Duration = Duration::from_millis(10);
/// Preemptions per second above which others want our CPU (a preempted thread on a busy
/// CPU is switched out at every scheduler tick, hundreds of times a second).
const CONTENDED_RATE: f64 = 100.0;
/// The share of the time between readings that the thread spent runnable but waiting for a
/// CPU above which others want it ([`others_waited`]).
const WAITING_SHARE: f64 = 0.10;
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
    /// Until when the CPU counts as shared.
    shared_until: Option<Instant>,
    /// Whether the last reading showed the CPU shared.
    shared_sign: bool,
    /// The last reading: when, involuntary context switches, run delay (ns).
    reading: Option<Reading>,
    /// The thread the last reading was of: a worker moves to a new thread when its
    /// frontend reconnects, and the counters are per thread.
    thread: Option<libc::pid_t>,
    run_delay: RunDelay,
    /// Whether the thread's counters are read at all (off only in unit tests, whose
    /// made-up instants would otherwise meet real counters).
    reads_counters: bool,
}

/// When, involuntary context switches, run delay (ns).
type Reading = (Instant, Option<u64>, Option<u64>);

/// Where the thread's run delay comes from.
#[derive(Debug)]
enum RunDelay {
    /// Not read (the daemon did not ask).
    Off,
    /// Opened at the next reading, by the thread it is of (`thread-self`).
    Unopened,
    /// The file, and the thread it is of.
    Open(File, libc::pid_t),
    /// No such file, or the kernel keeps no scheduler statistics (all zeros).
    Unavailable,
}

impl RunDelay {
    /// Nanoseconds the calling thread (`thread`) has spent runnable but waiting for a CPU.
    fn read(&mut self, thread: libc::pid_t) -> Option<u64> {
        if matches!(self, RunDelay::Open(_, of) if *of != thread) {
            // The worker moved to a new thread (its frontend reconnected).
            *self = RunDelay::Unopened;
        }
        if let RunDelay::Unopened = self {
            *self = match File::open("/proc/thread-self/schedstat") {
                Ok(f) => RunDelay::Open(f, thread),
                Err(_) => RunDelay::Unavailable,
            };
        }
        let RunDelay::Open(f, _) = self else {
            return None;
        };
        // "<on-CPU ns> <run delay ns> <time slices>\n"
        let mut buf = [0u8; 96];
        let Ok(n) = f.read_at(&mut buf, 0) else {
            // Its thread has ended (a new one that reused its id has a new file).
            *self = RunDelay::Unopened;
            return None;
        };
        let mut fields = std::str::from_utf8(&buf[..n])
            .ok()?
            .split_ascii_whitespace();
        let delay: u64 = fields.nth(1)?.parse().ok()?;
        let slices: u64 = fields.next()?.parse().ok()?;
        if slices == 0 {
            // The calling thread runs, so it has had a time slice: the kernel keeps no
            // statistics (sched_info off prints "0 0 0").
            *self = RunDelay::Unavailable;
            return None;
        }
        Some(delay)
    }
}

/// The calling thread's id. (The system call rather than glibc's wrapper, which needs 2.30.)
fn this_thread() -> libc::pid_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
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
            shared_until: None,
            shared_sign: false,
            reading: None,
            thread: None,
            run_delay: RunDelay::Off,
            reads_counters: true,
        }
    }

    /// A window that never reads the thread's counters: the tests' readings are their own.
    #[cfg(test)]
    fn without_counters(mut self) -> PollWindow {
        self.reads_counters = false;
        self
    }

    /// Also reads the thread's run delay from `/proc/thread-self/schedstat`; for a daemon
    /// whose workers see the host's `/proc`.
    pub fn with_run_delay(mut self) -> PollWindow {
        self.run_delay = RunDelay::Unopened;
        self
    }

    /// Whether the CPU is shared: two readings running found the thread waiting for a CPU
    /// over 10% of the time, less than a second ago (never without a run delay). Polling or
    /// not: a worker then does more per wake-up.
    ///
    /// Also reads the signs when they are due: a worker that never sleeps would otherwise
    /// never look again.
    pub fn shared(&mut self, now: Instant) -> bool {
        self.read_signs(now);
        self.shared_until.is_some_and(|until| now < until)
    }

    /// How long to poll now.
    pub fn current(&self) -> Duration {
        self.window
    }

    fn contended(&mut self, now: Instant) {
        self.window = Duration::ZERO;
        // A longer hold (the CPU is shared) stands.
        self.off_until = self.off_until.max(Some(now + COOL_DOWN));
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
        self.read_signs(now);
    }

    /// Reads the preemptions and run delay if they are due, and acts on what they show.
    /// With polling off too: `shared` is for more than polling.
    fn read_signs(&mut self, now: Instant) {
        let due = self.reads_counters
            && self
                .reading
                .is_none_or(|(at, ..)| now.saturating_duration_since(at) >= PREEMPTIONS_EVERY);
        if !due {
            return;
        }
        let thread = this_thread();
        if self.thread.replace(thread) != Some(thread) {
            // Another thread's counters say nothing of this one's.
            self.reading = None;
            self.shared_sign = false;
        }
        let reading = (now, preemptions(), self.run_delay.read(thread));
        self.observe(reading);
    }

    /// Acts on a new reading of the signs.
    fn observe(&mut self, reading: Reading) {
        let now = reading.0;
        let Some(before) = self.reading.replace(reading) else {
            return;
        };
        let signs = others_waited(before, reading);
        if signs.contended {
            self.contended(now);
        }
        // Two readings running: one can be a moment's crowd on a quiet host (the client
        // and the daemon's other threads starting up together).
        if signs.shared && self.shared_sign {
            self.shared_until = Some(now + SHARED_COOL_DOWN);
            // No polling while shared either (a window that grew back between two
            // cool-downs cost a third of the IOPS beside two busy loops).
            self.off_until = self.off_until.max(self.shared_until);
        }
        self.shared_sign = signs.shared;
    }

    /// The worker was woken (a kick or a completion) at `now`.
    pub fn woke(&mut self, now: Instant) {
        let Some(slept_at) = self.slept_at.take() else {
            return;
        };
        if let Some(until) = self.off_until {
            if now < until {
                return;
            }
            self.off_until = None;
        }
        if self.max.is_zero() {
            return;
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

/// What two readings show of others wanting this CPU in between: whether to stop polling
/// (many preemptions, or much time spent waiting for a CPU), and whether the CPU is shared.
///
/// Shared rests on the run delay alone (without one, never): on a quiet host a worker is still
/// preempted now and then (up to 700 times a second over a 10 ms reading, in blk-compare's
/// quiet randread), which costs a poll little but a batch of the wrong size much. Waiting
/// separates the two: over 10 ms readings, at most 4% in the quiet run; at least 15% in nine
/// readings of ten beside two busy loops (`--busy 2`), 39% in the median one.
fn others_waited(
    (then, preempted_then, delay_then): Reading,
    (now, preempted_now, delay_now): Reading,
) -> Signs {
    let secs = now.saturating_duration_since(then).as_secs_f64();
    if secs <= 0.0 {
        return Signs::default();
    }
    let rate = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 / secs);
    let preempted = rate(preempted_then, preempted_now).is_some_and(|r| r > CONTENDED_RATE);
    let waiting = rate(delay_then, delay_now).map(|ns| ns / 1e9);
    let waited = waiting.is_some_and(|w| w > WAITING_SHARE);
    Signs {
        contended: preempted || waited,
        shared: waited,
    }
}

/// What [`others_waited`] found.
#[derive(Debug, Default, PartialEq)]
struct Signs {
    contended: bool,
    shared: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sleeps_grow_the_window_and_long_ones_shrink_it() {
        let max = Duration::from_micros(32);
        let mut p = PollWindow::new(max).without_counters();
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
        let mut p = PollWindow::new(Duration::from_micros(32)).without_counters();
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
        let mut p = PollWindow::new(max).without_counters();
        let t = Instant::now();
        for i in 0..4 {
            p.sleeping(t + Duration::from_micros(10 * i));
            p.woke(t + Duration::from_micros(10 * i) + Duration::from_nanos(500));
        }
        assert_eq!(p.current(), max);
    }

    const MS: u64 = 1_000_000;

    fn signs(contended: bool, shared: bool) -> Signs {
        Signs { contended, shared }
    }

    #[test]
    fn waiting_for_a_cpu_tells_a_shared_one_from_a_quiet_one() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(10);
        let waited = |ns: u64, preempted: u64| {
            others_waited((t0, Some(0), Some(0)), (t1, Some(preempted), Some(ns)))
        };
        // Run delay known: 0.4 ms of 10 waiting (a quiet host) is neither; many preemptions
        // stop polling but do not make the CPU shared; 2 ms waiting is a shared CPU.
        assert_eq!(waited(MS * 4 / 10, 0), Signs::default());
        assert_eq!(waited(MS * 4 / 10, 7), signs(true, false));
        assert_eq!(waited(2 * MS, 0), signs(true, true));
        // One threshold, 10%, for both.
        assert_eq!(waited(MS * 9 / 10, 0), Signs::default());
        assert_eq!(waited(MS * 11 / 10, 0), signs(true, true));
        // No run delay (vhost-fs): preemptions stop polling, and the CPU is never shared.
        let preempted = others_waited((t0, Some(0), None), (t1, Some(7), None));
        assert_eq!(preempted, signs(true, false));
        let calm = others_waited((t0, Some(0), None), (t1, Some(0), None));
        assert_eq!(calm, Signs::default());
        // Readings at the same instant say nothing.
        let same = others_waited((t0, Some(0), Some(0)), (t0, Some(9), Some(MS)));
        assert_eq!(same, Signs::default());
    }

    /// Feeds `p` readings every 10 ms from `t0`, each with `waiting` ns of run delay more.
    fn feed(p: &mut PollWindow, t0: Instant, from: u32, waiting: &[u64]) -> Instant {
        let mut delay = p.reading.and_then(|r| r.2).unwrap_or(0);
        let mut t = t0;
        for (i, w) in waiting.iter().enumerate() {
            delay += w;
            t = t0 + Duration::from_millis(10 * (from as u64 + i as u64));
            p.observe((t, Some(0), Some(delay)));
        }
        t
    }

    #[test]
    fn a_shared_cpu_takes_two_readings_running_and_holds_for_a_second() {
        let mut p = PollWindow::new(Duration::from_micros(32)).without_counters();
        let t0 = Instant::now();
        // One busy reading between quiet ones is not enough.
        let t = feed(&mut p, t0, 0, &[0, 0, 3 * MS, 0, 0]);
        assert!(!p.shared(t));
        // Two running are.
        let t = feed(&mut p, t0, 5, &[3 * MS, 3 * MS]);
        assert!(p.shared(t));
        // Polling stays off through the hold, even after a contended-only reading (whose own
        // cool-down is shorter) and a short sleep that would grow the window.
        let t = feed(&mut p, t0, 7, &[MS / 2]) + Duration::from_millis(10);
        p.observe((t, Some(50), p.reading.unwrap().2));
        assert!(!p.shared_sign);
        p.slept_at = Some(t + Duration::from_millis(200));
        p.woke(t + Duration::from_millis(200) + Duration::from_micros(5));
        assert_eq!(p.current(), Duration::ZERO);
        assert!(p.shared(t + Duration::from_millis(900)));
        // After the hold, quiet readings: not shared, and polling comes back.
        let later = t + SHARED_COOL_DOWN + Duration::from_millis(10);
        assert!(!p.shared(later));
        p.slept_at = Some(later);
        p.woke(later + Duration::from_micros(5));
        assert_eq!(p.current(), MIN_WINDOW);
    }

    #[test]
    fn the_run_delay_is_read_from_the_thread_that_reads_it() {
        let t = Instant::now();
        // The first reading on a thread that then ends (a frontend's connection)...
        let mut p = std::thread::spawn(move || {
            let mut p = PollWindow::new(Duration::ZERO).with_run_delay();
            p.read_signs(t);
            p
        })
        .join()
        .unwrap();
        assert!(
            matches!(p.run_delay, RunDelay::Open(..)),
            "no scheduler statistics in /proc/thread-self/schedstat"
        );
        // ...and the next on this one (the next connection's): the ended thread's file
        // reads nothing, this thread's does.
        p.read_signs(t + Duration::from_millis(20));
        assert_eq!(p.thread, Some(this_thread()));
        assert!(
            matches!(p.run_delay, RunDelay::Open(_, of) if of == this_thread()),
            "the run delay is read from another thread's file"
        );
        let reading = p.reading.expect("a reading");
        assert_eq!(reading.0, t + Duration::from_millis(20));
        assert!(
            reading.2.is_some(),
            "the run delay was read from another thread's file"
        );
        assert_eq!(RunDelay::Off.read(this_thread()), None);
    }

    #[test]
    fn zero_never_polls() {
        let mut p = PollWindow::new(Duration::ZERO).without_counters();
        let t = Instant::now();
        p.sleeping(t);
        p.woke(t + Duration::from_micros(1));
        assert_eq!(p.current(), Duration::ZERO);
    }
}
