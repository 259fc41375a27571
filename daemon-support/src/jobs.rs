//! Jobs: operations that take time (a preallocating resize now; snapshots, commits and
//! replication later), run on a thread of their own while the API answers, the way QMP's
//! block jobs are: each has an id, a kind, the object it works on, progress (done of
//! total), a state, and can be cancelled. Finished jobs stay listed (the last
//! [`KEEP_FINISHED`]) so that a caller can see how they ended.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Finished jobs kept for callers to look at.
pub const KEEP_FINISHED: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "error")]
pub enum JobState {
    Running,
    Done,
    Failed(String),
    Cancelled,
}

/// One job.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub kind: &'static str,
    /// What it works on (a disk's id).
    pub object: String,
    created: SystemTime,
    done: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
    state: Mutex<(JobState, Option<SystemTime>)>,
    /// What the work found, for jobs that report something (an image check's verdict).
    result: Mutex<Option<serde_json::Value>>,
}

/// What a job's work sees of its job.
pub struct Progress<'a>(&'a Job);

impl Progress<'_> {
    /// Records how far the work is; false once the job was asked to stop.
    pub fn update(&self, done: u64) -> bool {
        self.0.done.store(done, Ordering::Relaxed);
        !self.0.cancel.load(Ordering::Relaxed)
    }

    pub fn cancelled(&self) -> bool {
        self.0.cancel.load(Ordering::Relaxed)
    }

    /// Records what the work found (shown as the job's `result`).
    pub fn set_result(&self, v: serde_json::Value) {
        *self.0.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }
}

/// How a job's work ended.
pub enum Outcome {
    Done,
    Failed(String),
    /// It stopped because it was asked to, and undid what it had done.
    Cancelled,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    #[error("no job {0:?}")]
    NotFound(String),
    #[error("job {0:?} has finished")]
    Finished(String),
    #[error("{0:?} has a job running ({1}): wait for it or cancel it")]
    Busy(String, String),
    #[error("the daemon is shutting down")]
    Closed,
}

impl Job {
    pub fn state(&self) -> JobState {
        self.lock().0.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (JobState, Option<SystemTime>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job as the API shows it.
    pub fn json(&self) -> serde_json::Value {
        let (state, finished) = self.lock().clone();
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        let mut v = serde_json::json!({
            "id": self.id,
            "kind": self.kind,
            "object": self.object,
            "done": done,
            "total": total,
            "progress_percent": if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 },
            "cancel_requested": self.cancel.load(Ordering::Relaxed),
            "created": humantime::format_rfc3339_millis(self.created).to_string(),
            "finished": finished.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        });
        if let serde_json::Value::Object(s) = serde_json::to_value(&state).unwrap_or_default() {
            for (k, val) in s {
                v[k] = val;
            }
        }
        if let Some(r) = self
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            v["result"] = r;
        }
        v
    }
}

/// The jobs of a daemon.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<Vec<Arc<Job>>>,
    /// Shutting down: no new jobs.
    closed: AtomicBool,
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `work` on a thread of its own as a job of `kind` on `object` (one running job
    /// per object), `total` units long.
    pub fn start(
        &self,
        kind: &'static str,
        object: &str,
        total: u64,
        work: impl FnOnce(&Progress<'_>) -> Outcome + Send + 'static,
    ) -> Result<Arc<Job>, JobError> {
        let job = {
            let mut jobs = self.lock();
            if self.closed.load(Ordering::Relaxed) {
                return Err(JobError::Closed);
            }
            if let Some(j) = jobs
                .iter()
                .find(|j| j.object == object && j.state() == JobState::Running)
            {
                return Err(JobError::Busy(object.to_owned(), j.id.clone()));
            }
            let job = Arc::new(Job {
                id: format!("job-{}", self.next.fetch_add(1, Ordering::Relaxed) + 1),
                kind,
                object: object.to_owned(),
                created: SystemTime::now(),
                done: AtomicU64::new(0),
                total: AtomicU64::new(total),
                cancel: AtomicBool::new(false),
                state: Mutex::new((JobState::Running, None)),
                result: Mutex::new(None),
            });
            jobs.push(job.clone());
            // Forget the oldest finished ones past the limit.
            let finished = jobs
                .iter()
                .filter(|j| j.state() != JobState::Running)
                .count();
            let mut extra = finished.saturating_sub(KEEP_FINISHED);
            jobs.retain(|j| {
                let drop = extra > 0 && j.state() != JobState::Running;
                extra -= usize::from(drop);
                !drop
            });
            job
        };
        let j = job.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{kind}-{}", job.id))
            .spawn(move || {
                // A job that panics ends failed, not running forever (its object would
                // stay busy, and shutdown would wait for it).
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&Progress(&j))));
                let state = match outcome {
                    Ok(Outcome::Done) => JobState::Done,
                    Ok(Outcome::Failed(e)) => JobState::Failed(e),
                    Ok(Outcome::Cancelled) => JobState::Cancelled,
                    Err(_) => JobState::Failed("the job panicked".into()),
                };
                log::info!("job {} ({} of {}): {:?}", j.id, j.kind, j.object, state);
                *j.lock() = (state, Some(SystemTime::now()));
            });
        if let Err(e) = spawned {
            *job.lock() = (
                JobState::Failed(format!("cannot start its thread: {e}")),
                Some(SystemTime::now()),
            );
        }
        Ok(job)
    }

    pub fn list(&self) -> Vec<Arc<Job>> {
        self.lock().clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.lock().iter().find(|j| j.id == id).cloned()
    }

    /// Asks a running job to stop; it ends as cancelled when its work has undone itself.
    pub fn cancel(&self, id: &str) -> Result<Arc<Job>, JobError> {
        let job = self
            .get(id)
            .ok_or_else(|| JobError::NotFound(id.to_owned()))?;
        if job.state() != JobState::Running {
            return Err(JobError::Finished(id.to_owned()));
        }
        job.cancel.store(true, Ordering::Relaxed);
        Ok(job)
    }

    /// Asks every running job to stop and waits until none runs (shutdown).
    /// Asks every running job to stop, refuses new ones, and waits at most `wait` for the
    /// running ones to end (shutdown: a job stuck on a hung mount must not keep the disks
    /// from being drained).
    pub fn cancel_all_and_wait(&self, wait: std::time::Duration) {
        self.closed.store(true, Ordering::Relaxed);
        for j in self.list() {
            j.cancel.store(true, Ordering::Relaxed);
        }
        let deadline = std::time::Instant::now() + wait;
        while self.list().iter().any(|j| j.state() == JobState::Running) {
            if std::time::Instant::now() >= deadline {
                log::warn!("shutdown: not waiting longer for running jobs");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_until_finished(job: &Job) -> JobState {
        let deadline = Instant::now() + Duration::from_secs(5);
        while job.state() == JobState::Running {
            assert!(Instant::now() < deadline, "job never finished");
            std::thread::sleep(Duration::from_millis(5));
        }
        job.state()
    }

    #[test]
    fn jobs_report_progress_end_and_can_be_cancelled() {
        let jobs = Jobs::default();
        let done = jobs
            .start("count", "a", 10, |p| {
                for i in 1..=10 {
                    p.update(i);
                }
                Outcome::Done
            })
            .unwrap();
        assert_eq!(wait_until_finished(&done), JobState::Done);
        assert_eq!(done.json()["progress_percent"], 100.0);
        assert_eq!(done.json()["state"], "done");

        let slow = jobs
            .start("wait", "b", 1000, |p| {
                let mut i = 0;
                while p.update(i) {
                    i += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Outcome::Cancelled
            })
            .unwrap();
        // One running job per object.
        assert!(matches!(
            jobs.start("x", "b", 1, |_| Outcome::Done),
            Err(JobError::Busy(..))
        ));
        jobs.cancel(&slow.id).unwrap();
        assert_eq!(wait_until_finished(&slow), JobState::Cancelled);
        assert_eq!(
            jobs.cancel(&slow.id).unwrap_err(),
            JobError::Finished(slow.id.clone())
        );
        assert!(matches!(jobs.cancel("job-99"), Err(JobError::NotFound(_))));

        let failed = jobs
            .start("fail", "c", 1, |_| Outcome::Failed("disk full".into()))
            .unwrap();
        assert_eq!(
            wait_until_finished(&failed),
            JobState::Failed("disk full".into())
        );
        assert_eq!(failed.json()["error"], "disk full");
        assert_eq!(jobs.list().len(), 3);
    }

    #[test]
    fn a_job_that_panics_ends_failed_and_shutdown_does_not_wait_forever() {
        let jobs = Jobs::default();
        let j = jobs.start("boom", "a", 1, |_| panic!("boom")).unwrap();
        assert_eq!(
            wait_until_finished(&j),
            JobState::Failed("the job panicked".into())
        );
        // One that ignores cancel: the wait gives up.
        let _stuck = jobs
            .start("stuck", "b", 1, |_| {
                std::thread::sleep(Duration::from_secs(3));
                Outcome::Done
            })
            .unwrap();
        let start = Instant::now();
        jobs.cancel_all_and_wait(Duration::from_millis(200));
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(
            jobs.start("late", "c", 1, |_| Outcome::Done).unwrap_err(),
            JobError::Closed
        );
    }

    #[test]
    fn only_the_last_finished_jobs_are_kept() {
        let jobs = Jobs::default();
        for i in 0..KEEP_FINISHED + 10 {
            let j = jobs
                .start("n", &format!("o{i}"), 1, |_| Outcome::Done)
                .unwrap();
            wait_until_finished(&j);
        }
        assert!(jobs.list().len() <= KEEP_FINISHED + 1);
    }
}
