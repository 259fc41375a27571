//! The thread pool behind `--thread-pool-size N`: N threads, shared by every queue worker,
//! that run requests which make blocking system calls (see `server::runs_inline`), so a
//! slow one (an open that waits for a lease break, a fsync, a lookup on a slow host
//! filesystem) holds up one pool thread instead of its whole queue.
//!
//! Jobs are bounded by their callers: a queue worker hands over a request only when it has
//! a free request slot, so at most the sum of the queue depths wait here. Threads are
//! created at start-up, after the sandbox is entered and the termination signals are
//! blocked, so they inherit both. Each job switches credentials itself (on its own
//! thread, with the raw syscalls) for as long as it runs.

use std::io;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

pub type Job = Box<dyn FnOnce() + Send>;

/// The threads and the channel that feeds them (crossbeam's: many threads receive from one
/// channel without a mutex of ours, and a closed channel still hands out what it holds).
pub struct ThreadPool {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    /// Starts `size` threads (at least one).
    pub fn new(size: usize) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let mut pool = ThreadPool {
            jobs: Some(tx),
            threads: Vec::with_capacity(size),
        };
        for i in 0..size.max(1) {
            let rx = rx.clone();
            // On failure, dropping `pool` stops the threads already started.
            let t = std::thread::Builder::new()
                .name(format!("fs-pool-{i}"))
                .spawn(move || work(&rx))?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    pub fn size(&self) -> usize {
        self.threads.len()
    }

    /// Queues `job` for the next free thread.
    pub fn execute(&self, job: Job) {
        if let Some(tx) = &self.jobs {
            // Sending fails only once every thread has gone, which only `drop` does.
            let _ = tx.send(job);
        }
    }
}

fn work(jobs: &Receiver<Job>) {
    // Ends when the pool is dropped and the queue is empty.
    for job in jobs.iter() {
        job();
    }
}

impl Drop for ThreadPool {
    /// Runs the jobs still queued, then stops the threads.
    fn drop(&mut self) {
        drop(self.jobs.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn runs_jobs_on_its_threads_and_a_blocked_one_does_not_stop_the_others() {
        let pool = ThreadPool::new(2).unwrap();
        assert_eq!(pool.size(), 2);
        let (block_tx, block_rx) = channel::<()>();
        let (done_tx, done_rx) = channel();
        // One job blocks a thread until we let it go...
        let tx = done_tx.clone();
        pool.execute(Box::new(move || {
            let _ = block_rx.recv();
            let _ = tx.send(usize::MAX);
        }));
        // ...and the other thread still serves everything else.
        for i in 0..100 {
            let tx = done_tx.clone();
            pool.execute(Box::new(move || {
                let name = std::thread::current().name().map(str::to_owned);
                assert!(name.is_some_and(|n| n.starts_with("fs-pool-")));
                let _ = tx.send(i);
            }));
        }
        let mut seen: Vec<usize> = (0..100)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        block_tx.send(()).unwrap();
        assert_eq!(
            done_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            usize::MAX
        );
    }

    #[test]
    fn drop_finishes_queued_jobs() {
        let (tx, rx) = channel();
        {
            let pool = ThreadPool::new(1).unwrap();
            for i in 0..10 {
                let tx = tx.clone();
                pool.execute(Box::new(move || {
                    let _ = tx.send(i);
                }));
            }
        }
        assert_eq!(rx.try_iter().count(), 10);
    }
}
