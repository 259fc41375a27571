//! The snapshot lifecycle policy of qcow2 disks (`snapshot-policy` in a disk's config):
//! snapshots taken on a schedule, and those beyond the limits deleted (merged away, as
//! `strata snapshot delete` does). No peer daemon runs one; storage teams script it around
//! QEMU.
//!
//! Policy snapshots are named `auto-YYYYMMDDTHHMMSSZ` (UTC): the chain itself records when
//! each was taken, so a restart neither takes one twice nor loses one (the next is due one
//! interval after the last, or at once if that time passed while the daemon was down, once).
//! The limits apply to the policy's own snapshots only (snapshots taken by hand are the
//! user's), and the newest one is never deleted: it is what a revert would go back to.
//! The decisions are pure functions of the snapshots' times and the clock, tested with a
//! made-up clock; a thread of its own applies them every second.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::daemon::DiskSet;
use crate::disk_server::DiskServer;

/// Snapshots kept unless `max-snapshots` says otherwise.
pub const DEFAULT_MAX_SNAPSHOTS: u32 = 10;
/// Minutes between clean-ups unless `cleanup-interval` says otherwise (a day).
pub const DEFAULT_CLEANUP_MINUTES: u64 = 1440;
const PREFIX: &str = "auto-";

/// When snapshots are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every so many seconds (`every 30m`, `every 6h`, `every 90s`).
    Every(u64),
    /// Once a day at this second of the day, UTC (`daily 02:30`).
    Daily(u64),
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Schedule, String> {
        let bad = || {
            format!(
                "schedule {s:?}: use \"every N\" with a unit (s, m, h: \"every 30m\") or \
                 \"daily HH:MM\" (UTC)"
            )
        };
        let s = s.trim();
        if let Some(n) = s.strip_prefix("every ") {
            let n = n.trim();
            let (digits, unit) =
                n.split_at(n.find(|c: char| !c.is_ascii_digit()).unwrap_or(n.len()));
            let count: u64 = digits.parse().map_err(|_| bad())?;
            let per = match unit {
                "s" => 1,
                "m" => 60,
                "h" => 3600,
                _ => return Err(bad()),
            };
            let secs = count.saturating_mul(per);
            if secs == 0 || secs > 366 * 86400 {
                return Err(format!("schedule {s:?}: from 1 s to a year"));
            }
            return Ok(Schedule::Every(secs));
        }
        let at = s.strip_prefix("daily ").ok_or_else(bad)?.trim();
        let (h, m) = at.split_once(':').ok_or_else(bad)?;
        let (h, m): (u64, u64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(Schedule::Daily(h * 3600 + m * 60))
    }
}

/// A disk's policy, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPolicy {
    pub schedule: Schedule,
    /// Policy snapshots older than this many days go (none: kept for their number only).
    pub retention_days: Option<u64>,
    pub max_snapshots: u32,
    pub cleanup_interval: Duration,
}

/// The policy as the config file and the API spell it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PolicyText {
    pub schedule: String,
    /// Days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_snapshots: Option<u32>,
    /// Minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_interval: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<bool>,
}

impl PolicyText {
    pub fn check(&self) -> Result<SnapshotPolicy, String> {
        if self.quiesce == Some(false) {
            return Err(
                "quiesce = false: every snapshot is taken with the disk's queues \
                        drained and its image flushed; not draining is not supported"
                    .into(),
            );
        }
        let max_snapshots = self.max_snapshots.unwrap_or(DEFAULT_MAX_SNAPSHOTS);
        // The chain holds at most MAX_CHAIN images: the top, a base, and the snapshots.
        let most = storage_core::qcow2::MAX_CHAIN as u32 - 2;
        if !(1..=most).contains(&max_snapshots) {
            return Err(format!(
                "max-snapshots = {max_snapshots}: from 1 to {most} (a chain holds at most {} \
                 images)",
                storage_core::qcow2::MAX_CHAIN
            ));
        }
        if let Some(days) = self.retention {
            if !(1..=36500).contains(&days) {
                return Err(format!("retention = {days} (days): from 1 to 36500"));
            }
        }
        let minutes = self.cleanup_interval.unwrap_or(DEFAULT_CLEANUP_MINUTES);
        if !(1..=525_600).contains(&minutes) {
            return Err(format!(
                "cleanup-interval = {minutes} (minutes): from 1 to 525600 (a year)"
            ));
        }
        Ok(SnapshotPolicy {
            schedule: self.schedule.parse()?,
            retention_days: self.retention,
            max_snapshots,
            cleanup_interval: Duration::from_secs(minutes * 60),
        })
    }
}

/// The name of the policy snapshot taken at `unix` seconds: `auto-20261205T231500Z`.
pub fn auto_name(unix: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix);
    let text = humantime::format_rfc3339_seconds(t).to_string();
    format!("{PREFIX}{}", text.replace(['-', ':'], ""))
}

/// When a policy snapshot was taken, from its name.
pub fn taken_at(name: &str) -> Option<u64> {
    let s = name.strip_prefix(PREFIX)?;
    let b = s.as_bytes();
    if b.len() != 16 || !s.is_ascii() || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    humantime::parse_rfc3339(&text)
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// When the next policy snapshot is due, given the last one's time. With none yet: the
/// next scheduled time after `since` (when the daemon began to run the policy), or one
/// interval after it. A due time that passed (the daemon was down) is due at once, and
/// only once: the next counts from the one then taken.
pub fn next_due(schedule: Schedule, last: Option<u64>, since: u64) -> u64 {
    match schedule {
        Schedule::Every(secs) => last.unwrap_or(since).saturating_add(secs),
        Schedule::Daily(at) => {
            let after = last.unwrap_or(since);
            let day = after - after % 86400;
            let today = day + at;
            if today > after {
                today
            } else {
                today + 86400
            }
        }
    }
}

/// Which policy snapshots go (`autos`: name and time, any order): beyond `max-snapshots`
/// the oldest, and those older than `retention`; never the newest.
pub fn to_delete(policy: &SnapshotPolicy, autos: &[(String, u64)], now: u64) -> Vec<String> {
    let mut sorted: Vec<&(String, u64)> = autos.iter().collect();
    sorted.sort_by_key(|(_, t)| *t);
    // The newest is kept, whatever the limits say.
    if sorted.pop().is_none() {
        return Vec::new();
    }
    let over = (sorted.len() + 1).saturating_sub(policy.max_snapshots as usize);
    sorted
        .iter()
        .enumerate()
        .filter(|(i, (_, t))| {
            *i < over
                || policy
                    .retention_days
                    .is_some_and(|days| now.saturating_sub(*t) > days * 86400)
        })
        .map(|(_, (n, _))| n.clone())
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The policy snapshots of a disk's chain: name and time.
fn autos(d: &DiskServer) -> Vec<(String, u64)> {
    d.snapshot_names()
        .into_iter()
        .filter_map(|n| taken_at(&n).map(|t| (n, t)))
        .collect()
}

/// What the runner keeps per disk (not across restarts: the chain's names are what lasts).
struct DiskState {
    policy: SnapshotPolicy,
    /// When this policy began to run here.
    since: u64,
    /// When the limits were last applied (none: at the next pass).
    cleaned: Option<u64>,
    /// After a failed snapshot: not tried again before this, and the error, logged once.
    retry_at: u64,
    last_error: Option<String>,
}

/// The policy thread's state.
#[derive(Default)]
struct Runner {
    disks: std::collections::HashMap<(String, u64), DiskState>,
}

impl Runner {
    /// One pass over every disk with a policy, at `now`.
    fn pass(&mut self, disks: &DiskSet, now: u64) {
        let served = disks.list();
        self.disks
            .retain(|(id, inc), _| served.iter().any(|d| d.id() == id && d.incarnation == *inc));
        for d in served {
            let key = (d.id().to_owned(), d.incarnation);
            let Some(policy) = d.snapshot_policy() else {
                self.disks.remove(&key);
                continue;
            };
            // A new or changed policy starts afresh and applies its limits at once.
            let st = self.disks.entry(key).or_insert_with(|| DiskState {
                policy: policy.clone(),
                since: now,
                cleaned: None,
                retry_at: 0,
                last_error: None,
            });
            if st.policy != policy {
                *st = DiskState {
                    policy: policy.clone(),
                    since: now,
                    cleaned: None,
                    retry_at: 0,
                    last_error: None,
                };
            }
            // A job on the disk (a clean-up, a deletion) holds its snapshots: wait for it.
            if disks.has_running_job(d.id()) {
                continue;
            }
            // A snapshot time ahead of the clock (the clock stepped back) counts as now.
            let last = autos(&d).iter().map(|(_, t)| (*t).min(now)).max();
            let mut clean = st
                .cleaned
                .is_none_or(|at| now >= at.saturating_add(policy.cleanup_interval.as_secs()));
            // Due, not already taken this second (a name is per second), and not backing
            // off after a failure.
            if now >= next_due(policy.schedule, last, st.since)
                && last != Some(now)
                && now >= st.retry_at
            {
                match d.snapshot(&auto_name(now)) {
                    Ok(taken) => {
                        log::info!(
                            "disk {}: policy snapshot {} (the guest paused {:.2} ms)",
                            d.id(),
                            auto_name(now),
                            taken.pause.as_secs_f64() * 1000.0
                        );
                        st.last_error = None;
                        clean = true;
                    }
                    Err(e) => {
                        // Counted in the snapshot metrics; tried again a while later, and
                        // logged again only when the reason changes.
                        let msg = e.to_string();
                        if st.last_error.as_deref() != Some(&msg) {
                            log::warn!("disk {}: policy snapshot: {msg}", d.id());
                        }
                        st.last_error = Some(msg);
                        let wait = match policy.schedule {
                            Schedule::Every(secs) => secs.min(60),
                            Schedule::Daily(_) => 60,
                        };
                        st.retry_at = now + wait;
                    }
                }
            }
            if clean {
                st.cleaned = Some(now);
                let gone = to_delete(&policy, &autos(&d), now);
                if !gone.is_empty() {
                    start_cleanup(disks, &d, gone);
                }
            }
        }
    }
}

/// Deletes `names` as one job (one at a time; a disk with a job running waits for the next
/// clean-up).
fn start_cleanup(disks: &DiskSet, d: &Arc<DiskServer>, names: Vec<String>) {
    let server = d.clone();
    let total = names.len() as u64;
    let started = disks.start_disk_job(d.id(), "snapshot-cleanup", total, move |p| {
        let mut kept = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if !p.update(i as u64) {
                return daemon_support::jobs::Outcome::Cancelled;
            }
            let mut go_on = |_, _| !p.cancelled();
            match server.delete_snapshot(name, &mut go_on) {
                Ok(_) => {}
                // Gone meanwhile (deleted by hand, or a revert): nothing to do.
                Err(crate::disk_server::ResizeError::Disk(e))
                    if e.kind() == storage_core::error::StorageErrorKind::NotFound => {}
                Err(crate::disk_server::ResizeError::Disk(e))
                    if e.kind() == storage_core::error::StorageErrorKind::Cancelled =>
                {
                    return daemon_support::jobs::Outcome::Cancelled;
                }
                // Another program reads it (a clone's backing file): kept until it stops,
                // the next clean-up tries again; the older ones go meanwhile.
                Err(crate::disk_server::ResizeError::Disk(e))
                    if e.kind() == storage_core::error::StorageErrorKind::InUse =>
                {
                    log::warn!("policy snapshot {name:?} kept: {e}");
                    kept.push(format!("{name:?} ({e})"));
                }
                Err(e) => {
                    let kept = if kept.is_empty() {
                        String::new()
                    } else {
                        format!(" (kept before it, in use: {})", kept.join(", "))
                    };
                    return daemon_support::jobs::Outcome::Failed(format!(
                        "deleting policy snapshot {name:?}: {e}{kept}"
                    ));
                }
            }
        }
        p.update(total);
        if kept.is_empty() {
            daemon_support::jobs::Outcome::Done
        } else {
            daemon_support::jobs::Outcome::Failed(format!(
                "policy snapshots kept, in use: {}",
                kept.join(", ")
            ))
        }
    });
    if let Err(e) = started {
        log::info!("disk {}: policy clean-up waits: {e}", d.id());
    }
}

/// The thread that runs every disk's policy, until [`Lifecycle::stop`] (or it is dropped).
pub struct Lifecycle {
    stopped: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lifecycle {
    pub fn start(disks: Arc<DiskSet>) -> std::io::Result<Lifecycle> {
        let stopped = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stopped.clone();
        let thread = std::thread::Builder::new()
            .name("snapshot-policy".into())
            .spawn(move || {
                let mut runner = Runner::default();
                loop {
                    runner.pass(&disks, unix_now());
                    let (stop, wake) = &*flag;
                    let guard = stop.lock().unwrap_or_else(|p| p.into_inner());
                    let (guard, _) = wake
                        .wait_timeout_while(guard, Duration::from_secs(1), |s| !*s)
                        .unwrap_or_else(|p| p.into_inner());
                    if *guard {
                        return;
                    }
                }
            })?;
        Ok(Lifecycle {
            stopped,
            thread: Some(thread),
        })
    }

    /// Stops the thread (after the snapshot it may be taking).
    pub fn stop(&mut self) {
        if self.thread.is_none() {
            return;
        }
        let (stop, wake) = &*self.stopped;
        *stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86400;
    /// 2026-12-05 00:00:00 UTC.
    const T0: u64 = 1_796_428_800;

    fn policy(schedule: &str, retention: Option<u64>, max: u32) -> SnapshotPolicy {
        PolicyText {
            schedule: schedule.into(),
            retention,
            max_snapshots: Some(max),
            cleanup_interval: None,
            quiesce: None,
        }
        .check()
        .unwrap()
    }

    #[test]
    fn names_carry_the_time_they_were_taken() {
        let n = auto_name(T0 + 23 * 3600 + 15 * 60 + 7);
        assert_eq!(n, "auto-20261205T231507Z");
        assert_eq!(taken_at(&n), Some(T0 + 23 * 3600 + 15 * 60 + 7));
        for other in ["nightly", "auto-2026", "auto-20261205X231507Z", "s1"] {
            assert_eq!(taken_at(other), None, "{other}");
        }
    }

    #[test]
    fn schedules_parse_and_say_what_is_wrong() {
        assert_eq!("every 30m".parse(), Ok(Schedule::Every(1800)));
        assert_eq!("every 2h".parse(), Ok(Schedule::Every(7200)));
        assert_eq!("every 5s".parse(), Ok(Schedule::Every(5)));
        assert_eq!("daily 02:30".parse(), Ok(Schedule::Daily(9000)));
        for bad in [
            "every",
            "every 0m",
            "every 5 minutes",
            "daily 24:00",
            "weekly",
        ] {
            let e = bad.parse::<Schedule>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        let mut t = PolicyText {
            schedule: "every 1h".into(),
            retention: None,
            max_snapshots: None,
            cleanup_interval: None,
            quiesce: Some(false),
        };
        assert!(t.check().unwrap_err().contains("quiesce"));
        t.quiesce = None;
        let p = t.check().unwrap();
        assert_eq!(p.max_snapshots, 10);
        assert_eq!(p.cleanup_interval, Duration::from_secs(1440 * 60));
    }

    #[test]
    fn a_due_time_missed_while_down_is_taken_once_at_start() {
        let every = Schedule::Every(3600);
        // None yet: one interval from when the policy began.
        assert_eq!(next_due(every, None, T0), T0 + 3600);
        // Taken at T0: due at T0 + 1 h, whenever the daemon looks.
        assert_eq!(next_due(every, Some(T0), T0 + 60), T0 + 3600);
        // Down for five hours: due at once (a time in the past), and after the one then
        // taken, an hour later: one snapshot, not five.
        assert!(next_due(every, Some(T0), T0 + 5 * 3600) <= T0 + 5 * 3600);
        assert_eq!(
            next_due(every, Some(T0 + 5 * 3600), T0 + 5 * 3600),
            T0 + 6 * 3600
        );
        let daily = Schedule::Daily(2 * 3600);
        assert_eq!(next_due(daily, None, T0 + 3600), T0 + 2 * 3600);
        assert_eq!(next_due(daily, None, T0 + 3 * 3600), T0 + DAY + 2 * 3600);
        assert_eq!(
            next_due(daily, Some(T0 + 2 * 3600), T0 + 5 * 3600),
            T0 + DAY + 2 * 3600
        );
        // Down over two nights: one at start.
        assert!(next_due(daily, Some(T0 + 2 * 3600), T0 + 3 * DAY) <= T0 + 3 * DAY);
    }

    #[test]
    fn the_oldest_go_beyond_the_limits_but_never_the_newest() {
        let autos: Vec<(String, u64)> = (0..12)
            .map(|i| (auto_name(T0 + i * DAY), T0 + i * DAY))
            .collect();
        let now = T0 + 11 * DAY + 60;
        // Ten at most: the two oldest go.
        assert_eq!(
            to_delete(&policy("daily 00:00", None, 10), &autos, now),
            [auto_name(T0), auto_name(T0 + DAY)]
        );
        // Seven days: those taken more than seven days ago go (days 0 to 4; day 4's is
        // seven days and a minute old).
        let gone = to_delete(&policy("daily 00:00", Some(7), 10), &autos, now);
        assert_eq!(
            gone,
            (0..5).map(|i| auto_name(T0 + i * DAY)).collect::<Vec<_>>()
        );
        // The newest stays even when older than the retention and beyond a limit of one.
        let old = [(auto_name(T0), T0)];
        assert!(to_delete(&policy("daily 00:00", Some(1), 1), &old, T0 + 30 * DAY).is_empty());
        let two = [(auto_name(T0), T0), (auto_name(T0 + DAY), T0 + DAY)];
        assert_eq!(
            to_delete(&policy("daily 00:00", None, 1), &two, T0 + DAY),
            [auto_name(T0)]
        );
    }
}
