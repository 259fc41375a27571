//! Metrics owned by the device that counts them: per-queue request, byte and error counters,
//! the in-flight gauge and a latency histogram. Each renders its samples into the one
//! Prometheus writer, [`exposition::Exposition`].
//!
//! Each queue's counters have one writer at a time: that queue's worker, or the control
//! thread while it holds the worker (drain). So an update is a relaxed load and store, not a
//! locked read-modify-write: those cost about 20 cycles each and serialise the pipeline, and
//! a request makes five of them. Readers (the API) see each counter whole, a little late.

pub mod exposition;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

pub use exposition::{Exposition, Kind};

/// Request classes counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// Requests answered by the device itself (identify, unsupported types).
    Other,
}

impl OpClass {
    pub const ALL: [OpClass; 6] = [
        OpClass::Read,
        OpClass::Write,
        OpClass::Flush,
        OpClass::Discard,
        OpClass::WriteZeroes,
        OpClass::Other,
    ];
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Read => "read",
            OpClass::Write => "write",
            OpClass::Flush => "flush",
            OpClass::Discard => "discard",
            OpClass::WriteZeroes => "write_zeroes",
            OpClass::Other => "other",
        }
    }
}

/// Error classes counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The storage returned an error.
    Io,
    /// The request addressed sectors outside the disk.
    OutOfRange,
    /// A write to a read-only disk.
    ReadOnly,
    /// A request type the device does not implement.
    Unsupported,
    /// A descriptor chain that does not form a valid request.
    Malformed,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::Io,
        ErrorClass::OutOfRange,
        ErrorClass::ReadOnly,
        ErrorClass::Unsupported,
        ErrorClass::Malformed,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Io => "io",
            ErrorClass::OutOfRange => "out_of_range",
            ErrorClass::ReadOnly => "read_only",
            ErrorClass::Unsupported => "unsupported",
            ErrorClass::Malformed => "malformed",
        }
    }
}

/// Upper bounds of the latency buckets, in microseconds: 1 µs to about 16 s in powers of two.
const BUCKETS: usize = 25;

/// Adds `n` to a counter that only the calling thread writes (see the module docs).
#[inline]
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

/// Per-bucket counts of a [`LatencyHistogram`] (bucket `i` holds latencies up to 2^i µs;
/// the last one, everything longer).
pub type BucketCounts = [u64; BUCKETS + 1];

/// The `q` quantile (0..=1) of `counts` in microseconds, interpolated linearly inside its
/// bucket as Prometheus's `histogram_quantile` does; `None` when nothing was counted.
/// Power-of-two buckets make it exact to within a factor of two.
pub fn quantile_us(counts: &BucketCounts, q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (below + n) as f64 >= rank {
            if i == BUCKETS {
                // Past the last bound: the bound is all that is known.
                return Some((1u64 << (BUCKETS - 1)) as f64);
            }
            let upper = (1u64 << i) as f64;
            let lower = if i == 0 { 0.0 } else { upper / 2.0 };
            let within = (rank - below as f64) / n as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        below += n;
    }
    Some((1u64 << (BUCKETS - 1)) as f64)
}

/// A latency histogram with power-of-two microsecond buckets (one writer at a time).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    overflow: AtomicU64,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    #[inline]
    pub fn record(&self, latency: Duration) {
        let ns = latency.as_nanos().min(u128::from(u64::MAX)) as u64;
        let us = ns / 1000;
        // Bucket i holds latencies <= 2^i µs.
        let i = if us <= 1 {
            0
        } else {
            (64 - (us - 1).leading_zeros()) as usize
        };
        bump(self.buckets.get(i).unwrap_or(&self.overflow), 1);
        bump(&self.sum_ns, ns);
        bump(&self.count, 1);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The count in each bucket (not cumulative), the overflow last.
    pub fn counts(&self) -> BucketCounts {
        let mut out = [0; BUCKETS + 1];
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            *o = b.load(Relaxed);
        }
        out[BUCKETS] = self.overflow.load(Relaxed);
        out
    }

    /// Adds this histogram (in seconds) to `out` as family `name`.
    pub fn render(
        &self,
        out: &mut Exposition,
        name: &str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) {
        let mut cumulative = 0;
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                cumulative += b.load(Relaxed);
                ((1u64 << i) as f64 / 1e6, cumulative)
            })
            .collect();
        let count = cumulative + self.overflow.load(Relaxed);
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        out.histogram(name, help, labels, buckets, sum, count);
    }
}

/// The counters of one queue of one device.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    requests: [AtomicU64; 6],
    bytes: [AtomicU64; 6],
    errors: [AtomicU64; 5],
    in_flight: AtomicU64,
    /// Times the engine had no room and a request waited in the virtqueue.
    throttled: AtomicU64,
    pub latency: LatencyHistogram,
}

fn op_index(op: OpClass) -> usize {
    OpClass::ALL.iter().position(|o| *o == op).unwrap_or(5)
}

fn err_index(e: ErrorClass) -> usize {
    ErrorClass::ALL.iter().position(|o| *o == e).unwrap_or(0)
}

impl QueueMetrics {
    /// A request finished successfully, moving `bytes` of data.
    #[inline]
    pub fn completed(&self, op: OpClass, bytes: u64, latency: Duration) {
        let i = op_index(op);
        bump(&self.requests[i], 1);
        bump(&self.bytes[i], bytes);
        self.latency.record(latency);
    }

    /// A request failed.
    #[inline]
    pub fn failed(&self, op: OpClass, error: ErrorClass) {
        bump(&self.requests[op_index(op)], 1);
        bump(&self.errors[err_index(error)], 1);
    }

    #[inline]
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as u64, Relaxed);
    }

    #[inline]
    pub fn throttled(&self) {
        bump(&self.throttled, 1);
    }

    pub fn requests(&self, op: OpClass) -> u64 {
        self.requests[op_index(op)].load(Relaxed)
    }

    pub fn bytes(&self, op: OpClass) -> u64 {
        self.bytes[op_index(op)].load(Relaxed)
    }

    pub fn errors(&self, e: ErrorClass) -> u64 {
        self.errors[err_index(e)].load(Relaxed)
    }

    /// Adds this queue's samples, labelled with `labels` (e.g. disk and queue).
    pub fn render(&self, out: &mut Exposition, labels: &[(&str, &str)]) {
        let with = |extra: (&'static str, &'static str)| {
            let mut l = labels.to_vec();
            l.push(extra);
            l
        };
        for op in OpClass::ALL {
            let l = with(("op", op.name()));
            out.sample(
                "requests_total",
                Kind::Counter,
                "Requests completed, by type.",
                &l,
                self.requests(op),
            );
            out.sample(
                "bytes_total",
                Kind::Counter,
                "Data bytes moved, by request type.",
                &l,
                self.bytes(op),
            );
        }
        for e in ErrorClass::ALL {
            out.sample(
                "errors_total",
                Kind::Counter,
                "Requests failed, by error kind.",
                &with(("kind", e.name())),
                self.errors(e),
            );
        }
        out.sample(
            "in_flight",
            Kind::Gauge,
            "Requests submitted and not yet completed.",
            labels,
            self.in_flight.load(Relaxed),
        );
        out.sample(
            "throttled_total",
            Kind::Counter,
            "Times requests waited because the engine was full.",
            labels,
            self.throttled.load(Relaxed),
        );
        self.latency.render(
            out,
            "request_duration_seconds",
            "Request latency, from the daemon taking a request to answering it.",
            labels,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_nanos(500));
        h.record(Duration::from_micros(3));
        h.record(Duration::from_secs(100));
        let mut e = Exposition::new("x");
        h.render(&mut e, "lat", "Latency.", &[("q", "0")]);
        let out = e.finish();
        assert!(
            out.contains("x_lat_bucket{q=\"0\",le=\"0.000001\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("x_lat_bucket{q=\"0\",le=\"0.000004\"} 2"),
            "{out}"
        );
        assert!(out.contains("x_lat_bucket{q=\"0\",le=\"+Inf\"} 3"), "{out}");
        assert!(out.contains("x_lat_count{q=\"0\"} 3"), "{out}");
    }

    #[test]
    fn quantiles_fall_in_the_right_bucket() {
        let h = LatencyHistogram::default();
        assert_eq!(quantile_us(&h.counts(), 0.5), None);
        for _ in 0..90 {
            h.record(Duration::from_micros(20)); // bucket (16, 32]
        }
        for _ in 0..10 {
            h.record(Duration::from_micros(1000)); // bucket (512, 1024]
        }
        let c = h.counts();
        let p50 = quantile_us(&c, 0.5).unwrap();
        assert!((16.0..=32.0).contains(&p50), "{p50}");
        let p99 = quantile_us(&c, 0.99).unwrap();
        assert!((512.0..=1024.0).contains(&p99), "{p99}");
        h.record(Duration::from_secs(100));
        assert_eq!(quantile_us(&h.counts(), 1.0), Some((1u64 << 24) as f64));
    }

    #[test]
    fn counters_render_by_op_and_error() {
        let m = QueueMetrics::default();
        m.completed(OpClass::Read, 4096, Duration::from_micros(10));
        m.failed(OpClass::Write, ErrorClass::ReadOnly);
        let mut e = Exposition::new("blk");
        m.render(&mut e, &[("disk", "d"), ("queue", "0")]);
        let out = e.finish();
        assert!(out.contains("blk_requests_total{disk=\"d\",queue=\"0\",op=\"read\"} 1"));
        assert!(out.contains("blk_bytes_total{disk=\"d\",queue=\"0\",op=\"read\"} 4096"));
        assert!(out.contains("blk_errors_total{disk=\"d\",queue=\"0\",kind=\"read_only\"} 1"));
    }
}
