//! The leaky bucket behind every limit, as QEMU's `util/throttle.c` defines it, so that a
//! limit set here behaves as the same limit set on qemu-storage-daemon.
//!
//! A bucket fills by the units each request costs (bytes or operations) and leaks at the
//! average rate. A request may go while the level is at most the bucket's size: a tenth of
//! a second's worth at the average rate, or, with a burst (`max`), `max * burst_length`.
//! The burst itself is paced by a second level that leaks at `max` and may hold a tenth of
//! a second of it.

use std::time::Duration;

/// One limit: an average rate, and optionally a burst rate allowed for `burst_length`
/// seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limit {
    /// Units per second; 0: no limit.
    pub avg: f64,
    /// Burst rate in units per second; 0: no burst beyond the bucket.
    pub max: f64,
    /// Seconds the burst rate may last (at least 1).
    pub burst_length: f64,
}

/// A limit's state: how full its bucket is.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Bucket {
    pub(super) limit: Limit,
    level: f64,
    burst_level: f64,
}

impl Bucket {
    pub(super) fn new(limit: Limit) -> Bucket {
        Bucket {
            limit,
            level: 0.0,
            burst_level: 0.0,
        }
    }

    /// Lets `elapsed` worth of units leak out.
    pub(super) fn leak(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        self.level = (self.level - self.limit.avg * secs).max(0.0);
        if self.limit.max > 0.0 {
            self.burst_level = (self.burst_level - self.limit.max * secs).max(0.0);
        }
    }

    /// How long until a request may go; zero if it may go now.
    pub(super) fn wait(&self) -> Duration {
        let Limit {
            avg,
            max,
            burst_length,
        } = self.limit;
        if avg <= 0.0 {
            return Duration::ZERO;
        }
        let (size, burst_size) = if max <= 0.0 {
            (avg / 10.0, 0.0)
        } else {
            (max * burst_length, max / 10.0)
        };
        let extra = self.level - size;
        if extra > 0.0 {
            return Duration::from_secs_f64(extra / avg);
        }
        if burst_length > 1.0 {
            let extra = self.burst_level - burst_size;
            if extra > 0.0 {
                return Duration::from_secs_f64(extra / max);
            }
        }
        Duration::ZERO
    }

    /// Adds a request's cost.
    pub(super) fn account(&mut self, units: f64) {
        if self.limit.avg > 0.0 {
            self.level += units;
            if self.limit.max > 0.0 {
                self.burst_level += units;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs requests of one unit as fast as the bucket allows for `secs` simulated seconds;
    /// returns how many went.
    fn run(limit: Limit, secs: f64) -> u64 {
        let mut b = Bucket::new(limit);
        let mut now = 0.0f64;
        let mut sent = 0;
        while now < secs {
            let w = b.wait();
            if w.is_zero() {
                b.account(1.0);
                sent += 1;
            } else {
                b.leak(w);
                now += w.as_secs_f64();
            }
        }
        sent
    }

    #[test]
    fn an_average_limit_holds_with_a_tenth_of_a_second_of_slack() {
        let limit = Limit {
            avg: 1000.0,
            ..Limit::default()
        };
        // 10 s at 1000/s plus the bucket (100) and the one request that may overfill it.
        let sent = run(limit, 10.0);
        assert!((10_000..=10_102).contains(&sent), "{sent}");
    }

    #[test]
    fn a_burst_runs_at_most_max_for_burst_length_then_falls_to_the_average() {
        let limit = Limit {
            avg: 100.0,
            max: 1000.0,
            burst_length: 2.0,
        };
        // The first 2 s may carry the burst bucket (2000) and the average's leak; never more
        // than max per second plus a tenth of a second of it.
        let first = run(limit, 2.0);
        assert!(first <= 2 * 1000 + 100 + 2, "burst exceeded max: {first}");
        assert!(first >= 1900, "burst not allowed: {first}");
        let long = run(limit, 60.0);
        // After the burst, the average: 60 s * 100 plus the burst bucket.
        assert!(long <= 6_000 + 2_000 + 2, "{long}");
        assert!(long >= 6_000 + 1_900, "{long}");
    }

    #[test]
    fn no_limit_never_waits() {
        let mut b = Bucket::new(Limit::default());
        for _ in 0..1000 {
            b.account(1e9);
        }
        assert!(b.wait().is_zero());
    }
}
