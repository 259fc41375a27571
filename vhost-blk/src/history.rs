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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use storage_core::metrics::{quantile_us, BucketCounts, ErrorClass, OpClass};

use crate::daemon::DiskSet;
use crate::disk_server::DiskServer;

/// Recent points kept per disk (an hour at the default sample interval).
const RECENT_POINTS: usize = 360;

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

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history-file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    /// to); absent for disks without files (null, RBD).
    pub used: Option<u64>,
    /// Free bytes on the fullest host file system under the disk's files.
    pub host_free: Option<u64>,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Flushes, discards, write-zeroes and requests the device answered itself.
    pub other: u64,
    /// Failed requests by kind (the kinds of `/metrics`' `errors_total`).
    pub errors: BTreeMap<String, u64>,
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

/// How full a disk is, read outside the history's lock (stat and statvfs may block).
#[derive(Debug, Clone, Copy, Default)]
struct Fill {
    size: u64,
    used: Option<u64>,
    host_free: Option<u64>,
}

impl Fill {
    fn of(d: &DiskServer) -> Fill {
        let host_free = crate::space::files(&d.config.spec)
            .iter()
            .filter_map(|p| crate::space::usage(p))
            .map(|u| u.free)
            .min();
        Fill {
            size: d.device.capacity(),
            used: crate::space::allocated(&d.config.spec),
            host_free,
        }
    }
}

fn point(t: u64, seconds: f64, fill: Fill, d: &Totals) -> Point {
    let op = |o: OpClass| OpClass::ALL.iter().position(|x| *x == o).unwrap_or(5);
    let (r, w) = (op(OpClass::Read), op(OpClass::Write));
    let latency_us = quantile_us(&d.latency, 0.5).map(|p50| Quantiles {
        p50,
        p90: quantile_us(&d.latency, 0.9).unwrap_or(p50),
        p99: quantile_us(&d.latency, 0.99).unwrap_or(p50),
    });
    Point {
        t,
        seconds,
        size: fill.size,
        used: fill.used,
        host_free: fill.host_free,
        reads: d.requests[r],
        writes: d.requests[w],
        read_bytes: d.bytes[r],
        write_bytes: d.bytes[w],
        other: d.requests.iter().sum::<u64>() - d.requests[r] - d.requests[w],
        errors: ErrorClass::ALL
            .iter()
            .zip(d.errors)
            .map(|(e, n)| (e.name().to_string(), n))
            .collect(),
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
    /// The counters at the last sample (none before the first since the disk was served).
    last: Option<(u64, Totals)>,
    recent: VecDeque<Point>,
    /// Changes since the last trend point, and when that period began.
    pending: Option<(u64, Totals)>,
    trend: VecDeque<Point>,
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
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl History {
    /// Loads the trend kept in `policy.file` (dropping what is past retention; lines that
    /// do not parse, such as one cut short by a crash, are skipped and counted in the log).
    pub fn open(policy: HistoryPolicy) -> Result<History, HistoryError> {
        let history = History {
            policy,
            state: Mutex::new(State::default()),
        };
        if let Some(path) = &history.policy.file {
            let io = |source| HistoryError::Io {
                path: path.clone(),
                source,
            };
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(io(e)),
            };
            let oldest = history.oldest(unix_now());
            let mut bad = 0;
            {
                let mut st = history.lock();
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match serde_json::from_str::<Line>(line) {
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
            history.compact(unix_now()).map_err(io)?;
        }
        Ok(history)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn oldest(&self, now: u64) -> u64 {
        now.saturating_sub(u64::from(self.policy.retention_days) * 86400)
    }

    /// Reads every disk's counters at `now` (Unix seconds), and folds the trend when due.
    pub fn sample(&self, disks: &[Arc<DiskServer>], now: u64) {
        let read: Vec<(String, Fill, Totals)> = disks
            .iter()
            .map(|d| (d.id().to_string(), Fill::of(d), Totals::of(d)))
            .collect();
        let trend_secs = self.policy.trend.as_secs().max(1);
        let mut written = Vec::new();
        let mut st = self.lock();
        for (id, fill, totals) in read {
            let h = st.disks.entry(id.clone()).or_default();
            if let Some((then, before)) = h.last.take() {
                let d = totals.since(&before);
                let seconds = now.saturating_sub(then).max(1) as f64;
                h.recent.push_back(point(now, seconds, fill, &d));
                while h.recent.len() > RECENT_POINTS {
                    h.recent.pop_front();
                }
                let (start, acc) = h.pending.get_or_insert_with(|| (then, Totals::default()));
                acc.add(&d);
                if now.saturating_sub(*start) >= trend_secs {
                    let p = point(now, (now - *start) as f64, fill, acc);
                    h.pending = None;
                    h.trend.push_back(p.clone());
                    written.push(Line {
                        disk: id.clone(),
                        point: p,
                    });
                }
            }
            h.last = Some((now, totals));
        }
        // Disks no longer served: their last period ends here.
        let served: std::collections::HashSet<&str> = disks.iter().map(|d| d.id()).collect();
        for (id, h) in st.disks.iter_mut() {
            if served.contains(id.as_str()) {
                continue;
            }
            if let Some(p) = Self::close_pending(h, now) {
                written.push(Line {
                    disk: id.clone(),
                    point: p,
                });
            }
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
        let compact = now.saturating_sub(st.compacted) >= COMPACT_EVERY.as_secs();
        drop(st);
        self.persist(&written, now, compact);
    }

    /// The period under way as a trend point, if anything was counted in it.
    fn close_pending(h: &mut DiskHistory, now: u64) -> Option<Point> {
        let (start, acc) = h.pending.take()?;
        let fill = h.recent.back().map_or(Fill::default(), |p| Fill {
            size: p.size,
            used: p.used,
            host_free: p.host_free,
        });
        let p = point(now, now.saturating_sub(start).max(1) as f64, fill, &acc);
        h.trend.push_back(p.clone());
        Some(p)
    }

    /// At shutdown: a last sample, and the period under way written as a trend point.
    pub fn close(&self, disks: &[Arc<DiskServer>]) {
        let now = unix_now();
        self.sample(disks, now);
        let mut written = Vec::new();
        {
            let mut st = self.lock();
            for (id, h) in st.disks.iter_mut() {
                if let Some(p) = Self::close_pending(h, now) {
                    written.push(Line {
                        disk: id.clone(),
                        point: p,
                    });
                }
            }
        }
        self.persist(&written, now, false);
    }

    fn persist(&self, lines: &[Line], now: u64, compact: bool) {
        let Some(path) = &self.policy.file else {
            return;
        };
        let result = if compact {
            self.compact(now)
        } else if lines.is_empty() {
            Ok(())
        } else {
            append(path, lines)
        };
        if let Err(e) = result {
            log::error!("history-file {}: {e}", path.display());
        }
    }

    /// Rewrites the file with the points kept (a new file renamed over the old one).
    fn compact(&self, now: u64) -> std::io::Result<()> {
        let Some(path) = &self.policy.file else {
            return Ok(());
        };
        let mut st = self.lock();
        st.compacted = now;
        let mut text = String::new();
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
        drop(st);
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        {
            let mut f = open_private(&tmp, false)?;
            f.write_all(text.as_bytes())?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, path)
    }

    /// Points of disk `only` (or of all), each list cut to its `last` points if given.
    pub fn points(
        &self,
        only: Option<&str>,
        last: Option<usize>,
        served: &[String],
    ) -> Vec<DiskPoints> {
        let st = self.lock();
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
                served: served.contains(id),
                recent: tail(&h.recent),
                trend: tail(&h.trend),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

fn open_private(path: &Path, append: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.create(true).mode(0o640);
    if append {
        o.append(true);
    } else {
        o.write(true).truncate(true);
    }
    o.open(path)
}

fn append(path: &Path, lines: &[Line]) -> std::io::Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l).unwrap_or_default());
        text.push('\n');
    }
    let mut f = open_private(path, true)?;
    // One write: a crash leaves at most the last line cut short, which loading skips.
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// Samples every `history.policy.sample` on a thread of its own, from now on.
pub fn watch(history: Arc<History>, disks: Arc<DiskSet>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("history".into())
        .spawn(move || loop {
            history.sample(&disks.list(), unix_now());
            std::thread::sleep(history.policy.sample);
        })?;
    Ok(())
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
        let p = point(100, 10.0, Fill::default(), &d);
        assert_eq!(p.reads, 10);
        assert_eq!(p.errors["out_of_range"], 2);
        let q = p.latency_us.unwrap();
        assert!((16.0..=32.0).contains(&q.p50), "{q:?}");
        assert_eq!(
            point(100, 10.0, Fill::default(), &Totals::default()).latency_us,
            None
        );
    }

    #[test]
    fn the_file_keeps_the_trend_within_retention_and_skips_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("history.jsonl");
        let now = unix_now();
        let p = |t| point(t, 3600.0, Fill::default(), &totals(5, 3));
        let mut text = String::new();
        for (disk, t) in [
            ("a", now - 40 * 86400),
            ("a", now - 86400),
            ("b", now - 3600),
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
        })
        .unwrap();
        let all = h.points(None, None, &[]);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].trend, vec![p(now - 86400)]);
        assert_eq!(all[1].trend, vec![p(now - 3600)]);
        // Rewritten without the expired point and the cut line.
        let kept = std::fs::read_to_string(&file).unwrap();
        assert_eq!(kept.lines().count(), 2, "{kept}");
    }
}
