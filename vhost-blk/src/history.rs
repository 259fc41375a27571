//! What the daemon remembers of how its disks were used, for the dashboard (`/dashboard`)
//! and `GET /v1/history`.
//!
//! Every `history-sample-seconds` (10 by default) each disk's counters are read and what
//! changed since the last reading becomes a recent point; the last hour's worth are kept.
//! Every `history-trend-seconds` (an hour) the recent points since the last trend point are
//! folded into one, kept `history-retention-days` (30) and appended to `history-file`, so
//! the trend outlives restarts (at shutdown the hour under way is written as a shorter
//! point). A counter that went down (the disk or the daemon started again) counts from
//! zero, as Prometheus's `rate` does. Latency quantiles come from the difference of the
//! latency histograms, so each point's quantiles are that period's alone.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use storage_core::metrics::{quantile_us, BucketCounts, ErrorClass, OpClass};

use crate::daemon::DiskSet;
use crate::disk_server::DiskServer;

/// Recent points kept per disk (an hour at the default sample interval).
pub const RECENT_POINTS: usize = 360;

/// Most trend points a disk may keep (`history-retention-days` over
/// `history-trend-seconds`): 30 days at one a minute.
pub const MAX_TREND_POINTS: u64 = 43_200;

/// Removed disks whose trend is kept (the most recently active).
const REMOVED_KEPT: usize = 256;

/// How often the history file is rewritten without the points past retention.
const COMPACT_EVERY: Duration = Duration::from_secs(24 * 3600);

/// How often and how long, and where the trend is kept.
#[derive(Debug, Clone)]
pub struct HistoryPolicy {
    /// Where trend points are kept across restarts (none: in memory only).
    pub file: Option<PathBuf>,
    pub sample: Duration,
    pub trend: Duration,
    pub retention_days: u32,
}

impl Default for HistoryPolicy {
    fn default() -> Self {
        HistoryPolicy {
            file: None,
            sample: Duration::from_secs(10),
            trend: Duration::from_secs(3600),
            retention_days: 30,
        }
    }
}

/// Latency quantiles of one period, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// A tier's read hits and misses over one period.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheCounts {
    pub read_hits: u64,
    pub read_misses: u64,
}

/// Failed requests of one period, by kind (the kinds of `/metrics`' `errors_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorCounts {
    pub io: u64,
    pub out_of_range: u64,
    pub read_only: u64,
    pub unsupported: u64,
    pub malformed: u64,
}

impl ErrorCounts {
    fn of(counts: &[u64; 5]) -> ErrorCounts {
        let mut e = ErrorCounts::default();
        for (class, n) in ErrorClass::ALL.iter().zip(counts) {
            *match class {
                ErrorClass::Io => &mut e.io,
                ErrorClass::OutOfRange => &mut e.out_of_range,
                ErrorClass::ReadOnly => &mut e.read_only,
                ErrorClass::Unsupported => &mut e.unsupported,
                ErrorClass::Malformed => &mut e.malformed,
            } = *n;
        }
        e
    }
}

/// What one disk did over one period, and how full it was at its end.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// End of the period, Unix seconds.
    pub t: u64,
    /// Length of the period, seconds.
    pub seconds: f64,
    /// The disk's size.
    pub size: u64,
    /// Bytes the disk's files take on the host (what a sparse image or a cache has grown
    /// to); absent for disks without regular files (null, RBD, block devices).
    pub used: Option<u64>,
    /// Free bytes on the fullest host file system under the disk's files.
    pub host_free: Option<u64>,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Flushes, discards, write-zeroes and requests the device answered itself.
    pub other: u64,
    pub errors: ErrorCounts,
    /// Absent when no request completed in the period.
    pub latency_us: Option<Quantiles>,
    /// Absent for disks without a cache tier.
    pub cache: Option<CacheCounts>,
}

/// A disk's counters at one moment, summed over its queues.
#[derive(Debug, Clone, Default, PartialEq)]
struct Totals {
    requests: [u64; 6],
    bytes: [u64; 6],
    errors: [u64; 5],
    latency: BucketCounts,
    cache: Option<(u64, u64)>,
}

/// `now - before` of a counter, or `now` when it went down (started again).
fn delta(now: u64, before: u64) -> u64 {
    now.checked_sub(before).unwrap_or(now)
}

fn zip_with<const N: usize>(a: &mut [u64; N], b: &[u64; N], f: impl Fn(u64, u64) -> u64) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = f(*x, *y);
    }
}

impl Totals {
    fn of(d: &DiskServer) -> Totals {
        let mut t = Totals::default();
        for q in d.device.all_queue_metrics() {
            for (i, op) in OpClass::ALL.into_iter().enumerate() {
                t.requests[i] += q.requests(op);
                t.bytes[i] += q.bytes(op);
            }
            for (i, e) in ErrorClass::ALL.into_iter().enumerate() {
                t.errors[i] += q.errors(e);
            }
            zip_with(&mut t.latency, &q.latency.counts(), |a, b| a + b);
        }
        t.cache = d.device.disk.tier_metrics().map(|m| {
            use std::sync::atomic::Ordering::Relaxed;
            (m.read_hits.load(Relaxed), m.read_misses.load(Relaxed))
        });
        t
    }

    /// What happened between `before` and `self`.
    fn since(&self, before: &Totals) -> Totals {
        let mut d = self.clone();
        zip_with(&mut d.requests, &before.requests, delta);
        zip_with(&mut d.bytes, &before.bytes, delta);
        zip_with(&mut d.errors, &before.errors, delta);
        // A histogram started again is wholly new: mixing per-bucket resets would invent
        // latencies that never happened.
        if self
            .latency
            .iter()
            .zip(&before.latency)
            .all(|(n, b)| n >= b)
        {
            zip_with(&mut d.latency, &before.latency, |n, b| n - b);
        }
        d.cache = match (self.cache, before.cache) {
            (Some((h, m)), Some((bh, bm))) => Some((delta(h, bh), delta(m, bm))),
            (now, _) => now,
        };
        d
    }

    fn add(&mut self, other: &Totals) {
        zip_with(&mut self.requests, &other.requests, |a, b| a + b);
        zip_with(&mut self.bytes, &other.bytes, |a, b| a + b);
        zip_with(&mut self.errors, &other.errors, |a, b| a + b);
        zip_with(&mut self.latency, &other.latency, |a, b| a + b);
        self.cache = match (self.cache, other.cache) {
            (Some((h, m)), Some((oh, om))) => Some((h + oh, m + om)),
            (mine, theirs) => mine.or(theirs),
        };
    }
}

/// How full a disk is (stat and statvfs: they may block on a hung mount, so never under
/// the history's lock, and not at shutdown).
#[derive(Debug, Clone, Copy, Default)]
struct Fill {
    size: u64,
    used: Option<u64>,
    host_free: Option<u64>,
}

impl Fill {
    fn of(d: &DiskServer) -> Fill {
        Fill {
            size: d.device.capacity(),
            used: crate::space::allocated(&d.config.spec),
            host_free: crate::space::files(&d.config.spec)
                .iter()
                .filter_map(|p| crate::space::usage(p))
                .map(|u| u.free)
                .min(),
        }
    }

    fn of_point(p: Option<&Point>) -> Fill {
        p.map_or(Fill::default(), |p| Fill {
            size: p.size,
            used: p.used,
            host_free: p.host_free,
        })
    }
}

fn point(t: f64, seconds: f64, fill: Fill, d: &Totals) -> Point {
    let op = |o: OpClass| OpClass::ALL.iter().position(|x| *x == o).unwrap_or(5);
    let (r, w) = (op(OpClass::Read), op(OpClass::Write));
    let latency_us = quantile_us(&d.latency, 0.5).map(|p50| Quantiles {
        p50,
        p90: quantile_us(&d.latency, 0.9).unwrap_or(p50),
        p99: quantile_us(&d.latency, 0.99).unwrap_or(p50),
    });
    Point {
        t: t as u64,
        seconds: seconds.max(0.001),
        size: fill.size,
        used: fill.used,
        host_free: fill.host_free,
        reads: d.requests[r],
        writes: d.requests[w],
        read_bytes: d.bytes[r],
        write_bytes: d.bytes[w],
        other: d.requests.iter().sum::<u64>() - d.requests[r] - d.requests[w],
        errors: ErrorCounts::of(&d.errors),
        latency_us,
        cache: d.cache.map(|(read_hits, read_misses)| CacheCounts {
            read_hits,
            read_misses,
        }),
    }
}

/// One disk's history.
#[derive(Debug, Default)]
struct DiskHistory {
    /// The served disk's incarnation, the time (Unix seconds) and its counters at the last
    /// sample; none while it is not served.
    last: Option<(u64, f64, Totals)>,
    recent: VecDeque<Point>,
    /// Changes since the last trend point, and when that period began.
    pending: Option<(f64, Totals)>,
    trend: VecDeque<Point>,
}

impl DiskHistory {
    /// The period under way as a trend point, if one began.
    fn close_pending(&mut self, now: f64) -> Option<Point> {
        let (start, acc) = self.pending.take()?;
        let p = point(now, now - start, Fill::of_point(self.recent.back()), &acc);
        self.trend.push_back(p.clone());
        Some(p)
    }

    fn latest(&self) -> u64 {
        self.recent.back().or(self.trend.back()).map_or(0, |p| p.t)
    }
}

/// A disk's history as the API gives it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiskPoints {
    pub id: String,
    /// Whether the daemon serves it now (a removed disk's trend is kept to its end).
    pub served: bool,
    pub recent: Vec<Point>,
    pub trend: Vec<Point>,
}

/// One line of the history file.
#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    disk: String,
    #[serde(flatten)]
    point: Point,
}

#[derive(Debug, Default)]
struct State {
    disks: HashMap<String, DiskHistory>,
    /// When the file was last rewritten without expired points.
    compacted: u64,
}

/// The history of every disk.
#[derive(Debug)]
pub struct History {
    pub policy: HistoryPolicy,
    state: Mutex<State>,
    /// One sample (and its file writes) at a time, whole: the sampler's and shutdown's.
    sampling: Mutex<()>,
    /// Set at shutdown; the sampler waits on it between samples.
    stopped: (Mutex<bool>, Condvar),
    sampler: Mutex<Option<std::thread::JoinHandle<()>>>,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl History {
    /// Loads the trend kept in `policy.file`, dropping what is past retention. A file that
    /// cannot be read or rewritten is logged, never fatal: the disks matter more than
    /// their charts. Lines that do not parse (one cut short by a crash) are skipped.
    pub fn open(policy: HistoryPolicy) -> History {
        let history = History {
            policy,
            state: Mutex::new(State::default()),
            sampling: Mutex::new(()),
            stopped: (Mutex::new(false), Condvar::new()),
            sampler: Mutex::new(None),
        };
        let Some(path) = history.policy.file.clone() else {
            return history;
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                log::error!(
                    "history-file {}: {e}; the trend starts again",
                    path.display()
                );
                Vec::new()
            }
        };
        let oldest = history.oldest(unix_now());
        let mut bad = 0;
        {
            let mut st = lock(&history.state);
            for line in bytes.split(|b| *b == b'\n') {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<Line>(line) {
                    Ok(l) if l.point.t >= oldest => {
                        st.disks.entry(l.disk).or_default().trend.push_back(l.point)
                    }
                    Ok(_) => {}
                    Err(_) => bad += 1,
                }
            }
            for d in st.disks.values_mut() {
                d.trend.make_contiguous().sort_by_key(|p| p.t);
            }
        }
        if bad > 0 {
            log::warn!(
                "history-file {}: skipped {bad} lines that do not parse",
                path.display()
            );
        }
        history.persist(&[], unix_now(), true);
        history
    }

    fn oldest(&self, now: f64) -> u64 {
        (now as u64).saturating_sub(u64::from(self.policy.retention_days) * 86400)
    }

    /// Samples every `policy.sample` on a thread of its own until [`History::close`].
    pub fn start(self: &Arc<Self>, disks: Arc<DiskSet>) -> std::io::Result<()> {
        let history = self.clone();
        let handle = std::thread::Builder::new()
            .name("history".into())
            .spawn(move || {
                let every = history.policy.sample;
                let mut next = Instant::now();
                loop {
                    let disks = disks.list();
                    let fills: Vec<Fill> = disks.iter().map(|d| Fill::of(d)).collect();
                    history.sample(&disks, Some(&fills), unix_now());
                    // On a schedule, not a sleep after the work: the periods stay even.
                    next += every;
                    let now = Instant::now();
                    if next < now {
                        next = now + every;
                    }
                    let (flag, wake) = &history.stopped;
                    let stopped = lock(flag);
                    let (stopped, _) = wake
                        .wait_timeout_while(stopped, next - now, |s| !*s)
                        .unwrap_or_else(|p| p.into_inner());
                    if *stopped {
                        return;
                    }
                }
            })?;
        *lock(&self.sampler) = Some(handle);
        Ok(())
    }

    /// Reads every disk's counters at `now` (Unix seconds) and folds the trend when due.
    /// `fills`: each disk's [`Fill`], or none to reuse the last one (at shutdown).
    fn sample(&self, disks: &[Arc<DiskServer>], fills: Option<&[Fill]>, now: f64) {
        let _turn = lock(&self.sampling);
        let trend_secs = self.policy.trend.as_secs_f64().max(1.0);
        let sample_secs = self.policy.sample.as_secs_f64();
        let mut written = Vec::new();
        let mut st = lock(&self.state);
        let mut served = std::collections::HashSet::new();
        for (i, d) in disks.iter().enumerate() {
            let id = d.id().to_string();
            served.insert(id.clone());
            let totals = Totals::of(d);
            let h = st.disks.entry(id.clone()).or_default();
            let fill = fills
                .and_then(|f| f.get(i).copied())
                .unwrap_or_else(|| Fill::of_point(h.recent.back()));
            match h.last.take() {
                // The same disk, and time went forward: a point.
                Some((incarnation, then, before)) if incarnation == d.incarnation && now > then => {
                    let change = totals.since(&before);
                    h.recent.push_back(point(now, now - then, fill, &change));
                    while h.recent.len() > RECENT_POINTS {
                        h.recent.pop_front();
                    }
                    let (start, acc) = h.pending.get_or_insert_with(|| (then, Totals::default()));
                    acc.add(&change);
                    // At the sample nearest the period's end (samples come a little early or
                    // late: a strict comparison would fold one sample later at random).
                    if now - *start + sample_secs / 2.0 >= trend_secs {
                        let p = point(now, now - *start, fill, acc);
                        h.pending = None;
                        h.trend.push_back(p.clone());
                        written.push(Line { disk: id, point: p });
                    }
                }
                // Another disk with that id since: the old one's period ends; this one's
                // counters are a new start.
                Some((incarnation, ..)) if incarnation != d.incarnation => {
                    written.extend(h.close_pending(now).map(|point| Line { disk: id, point }));
                }
                _ => {}
            }
            h.last = Some((d.incarnation, now, totals));
        }
        // Disks no longer served: their last period ends here.
        for (id, h) in st.disks.iter_mut() {
            if served.contains(id) || h.last.is_none() {
                continue;
            }
            written.extend(h.close_pending(now).map(|point| Line {
                disk: id.clone(),
                point,
            }));
            h.last = None;
            h.recent.clear();
        }
        let oldest = self.oldest(now);
        st.disks.retain(|_, h| {
            while h.trend.front().is_some_and(|p| p.t < oldest) {
                h.trend.pop_front();
            }
            h.last.is_some() || !h.trend.is_empty()
        });
        // Removed disks beyond the cap: the longest quiet go first.
        let mut removed: Vec<(u64, String)> = st
            .disks
            .iter()
            .filter(|(_, h)| h.last.is_none())
            .map(|(id, h)| (h.latest(), id.clone()))
            .collect();
        if removed.len() > REMOVED_KEPT {
            removed.sort();
            for (_, id) in &removed[..removed.len() - REMOVED_KEPT] {
                st.disks.remove(id);
            }
        }
        let compact = (now as u64).saturating_sub(st.compacted) >= COMPACT_EVERY.as_secs();
        drop(st);
        self.persist(&written, now, compact);
    }

    /// At shutdown: the sampler stops, a last reading of the counters (no file system
    /// calls: a hung mount must not hold up the drain), and the period under way is
    /// written as a trend point.
    pub fn close(&self, disks: &[Arc<DiskServer>]) {
        *lock(&self.stopped.0) = true;
        self.stopped.1.notify_all();
        if let Some(h) = lock(&self.sampler).take() {
            let _ = h.join();
        }
        let now = unix_now();
        self.sample(disks, None, now);
        let _turn = lock(&self.sampling);
        let mut written = Vec::new();
        for (id, h) in lock(&self.state).disks.iter_mut() {
            written.extend(h.close_pending(now).map(|point| Line {
                disk: id.clone(),
                point,
            }));
        }
        self.persist(&written, now, false);
    }

    /// Writes `lines` to the file: by rewriting it whole when `compact` (or when an append
    /// fails), else appended. A failure is logged; the points stay in memory.
    fn persist(&self, lines: &[Line], now: f64, compact: bool) {
        let Some(path) = &self.policy.file else {
            return;
        };
        let result = if compact {
            self.compact(path, now as u64)
        } else if lines.is_empty() {
            return;
        } else {
            append(path, lines).or_else(|e| {
                log::warn!("history-file {}: {e}; rewriting it", path.display());
                self.compact(path, now as u64)
            })
        };
        if let Err(e) = result {
            log::error!("history-file {}: {e}", path.display());
        }
    }

    /// Rewrites the file with the points kept: a new file, synced, renamed over the old
    /// one, then the directory synced.
    fn compact(&self, path: &Path, now: u64) -> std::io::Result<()> {
        let mut text = String::new();
        {
            let st = lock(&self.state);
            for (id, h) in &st.disks {
                for p in &h.trend {
                    let line = Line {
                        disk: id.clone(),
                        point: p.clone(),
                    };
                    text.push_str(&serde_json::to_string(&line).unwrap_or_default());
                    text.push('\n');
                }
            }
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        // A leftover (or a link someone put there) goes; the new one is made, not opened.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        lock(&self.state).compacted = now;
        Ok(())
    }

    /// Points of disk `only` (or of all), each list cut to its `last` points if given.
    pub fn points(&self, only: Option<&str>, last: Option<usize>) -> Vec<DiskPoints> {
        let st = lock(&self.state);
        let tail = |v: &VecDeque<Point>| -> Vec<Point> {
            let skip = last.map_or(0, |n| v.len().saturating_sub(n));
            v.iter().skip(skip).cloned().collect()
        };
        let mut out: Vec<DiskPoints> = st
            .disks
            .iter()
            .filter(|(id, _)| only.is_none_or(|o| o == id.as_str()))
            .map(|(id, h)| DiskPoints {
                id: id.clone(),
                served: h.last.is_some(),
                recent: tail(&h.recent),
                trend: tail(&h.trend),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

fn append(path: &Path, lines: &[Line]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l).unwrap_or_default());
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // One write: a crash leaves at most the last line cut short, which loading skips.
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(reads: u64, latency_bucket: usize) -> Totals {
        let mut t = Totals::default();
        t.requests[0] = reads;
        t.latency[latency_bucket] = reads;
        t
    }

    #[test]
    fn a_counter_that_went_down_counts_from_zero() {
        let before = totals(100, 4);
        let after = totals(30, 4);
        let d = after.since(&before);
        assert_eq!(d.requests[0], 30);
        assert_eq!(d.latency[4], 30);
        let d = totals(130, 4).since(&before);
        assert_eq!(d.requests[0], 30);
        assert_eq!(d.latency[4], 30);
    }

    #[test]
    fn a_point_carries_its_periods_quantiles_and_errors() {
        let mut d = totals(10, 5);
        d.errors[1] = 2;
        let p = point(100.0, 10.0, Fill::default(), &d);
        assert_eq!(p.reads, 10);
        assert_eq!(p.errors.out_of_range, 2);
        assert_eq!(p.errors.io, 0);
        let q = p.latency_us.unwrap();
        assert!((16.0..=32.0).contains(&q.p50), "{q:?}");
        assert_eq!(
            point(100.0, 10.0, Fill::default(), &Totals::default()).latency_us,
            None
        );
    }

    #[test]
    fn the_file_keeps_the_trend_within_retention_and_skips_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("history.jsonl");
        let now = unix_now().floor();
        let p = |t| point(t, 3600.0, Fill::default(), &totals(5, 3));
        let mut text = String::new();
        for (disk, t) in [
            ("a", now - 40.0 * 86400.0),
            ("a", now - 86400.0),
            ("b", now - 3600.0),
        ] {
            let line = Line {
                disk: disk.into(),
                point: p(t),
            };
            text.push_str(&serde_json::to_string(&line).unwrap());
            text.push('\n');
        }
        text.push_str("{\"disk\":\"a\",\"t\":12");
        std::fs::write(&file, text).unwrap();
        let h = History::open(HistoryPolicy {
            file: Some(file.clone()),
            ..HistoryPolicy::default()
        });
        let all = h.points(None, None);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].trend, vec![p(now - 86400.0)]);
        assert_eq!(all[1].trend, vec![p(now - 3600.0)]);
        assert!(!all[0].served);
        // Rewritten without the expired point and the cut line.
        let kept = std::fs::read_to_string(&file).unwrap();
        assert_eq!(kept.lines().count(), 2, "{kept}");
    }
}
