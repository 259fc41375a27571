//! The tier's background threads.
//!
//! - The journal thread owns the [`Journal`]: every few milliseconds, and at once when a
//!   queue asks for a flush, it writes the records the queues produced, syncs the cache
//!   device (and the capacity device when data went there), checkpoints when the journal
//!   ring is half used, releases evicted slots whose `Free` records are now durable, and
//!   completes the flushes it served (group commit: one sync pair serves every flush that
//!   arrived meanwhile).
//! - The cleaner (write-back mode) copies dirty blocks to the capacity device above the low
//!   watermark, syncs it, and marks the blocks clean if nobody wrote them meanwhile.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::journal::{Journal, Media};
use super::layout::{Record, SlotState};
use super::shared::{lock, Link, Shared};
use super::state::Use;
use super::CacheMode;
use crate::engine::Completion;
use crate::iov::AlignedBuf;
use std::os::fd::{AsRawFd, FromRawFd};

/// How often the journal thread writes records when nobody asks for a flush.
pub(super) const JOURNAL_INTERVAL: Duration = Duration::from_millis(20);
/// How often the cleaner looks for work.
const CLEANER_INTERVAL: Duration = Duration::from_millis(10);
/// Dirty blocks copied per cleaner pass.
pub(super) const CLEAN_BATCH: usize = 64;

pub(super) fn spawn(sh: Arc<Shared>, journal: Journal) -> io::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    let j = sh.clone();
    threads.push(
        std::thread::Builder::new()
            .name("tier-journal".into())
            .spawn(move || journal_thread(j, journal))?,
    );
    if sh.mode == CacheMode::WriteBack {
        let c = sh.clone();
        threads.push(
            std::thread::Builder::new()
                .name("tier-cleaner".into())
                .spawn(move || cleaner_thread(c))?,
        );
    }
    Ok(threads)
}

/// One round of the journal thread. Returns the result to report to the flushes it serves.
///
/// Order, for a power cut at any point: the cache device's data is synced before any record
/// or checkpoint that names it is written, and those are synced before a flush completes.
fn journal_round(sh: &Shared, journal: &mut Journal, sync: bool, checkpoint_anyway: bool) -> i32 {
    let mut result = 0;
    // The capacity device first: the `Free` records of dirty blocks that capacity writes
    // replaced may be written only once those writes are durable (they are written below,
    // in this round). A round with such blocks syncs even when nobody flushes, so that
    // their slots come back into use.
    let (cap_unsynced, dropped) = {
        let mut st = sh.state();
        // After a failed capacity sync (every later flush fails: `flush_error`), the slots
        // of dropped blocks stay out of use, and only a flush tries the device again:
        // retrying every round for them would only log the same failure over and over.
        let for_dropped = !st.dropped_dirty.is_empty() && st.flush_error == 0;
        let cap = (sync || for_dropped) && std::mem::take(&mut st.capacity_unsynced);
        let dropped = if cap {
            std::mem::take(&mut st.dropped_dirty)
        } else {
            Vec::new()
        };
        (cap, dropped)
    };
    if cap_unsynced {
        match sh.cap.sync() {
            Ok(()) => sh.state().capacity_synced(dropped),
            Err(e) => {
                result = capacity_sync_failed(sh, &e);
                sh.state().dropped_dirty.extend(dropped);
            }
        }
    }
    let (records, pending, snapshot, failed) = {
        let mut st = sh.state();
        let records: Vec<Record> = std::mem::take(&mut st.records);
        let snapshot =
            (checkpoint_anyway || journal.wants_checkpoint(records.len())).then(|| st.snapshot());
        (records, st.pending_free.len(), snapshot, st.failed)
    };
    if failed {
        retire(sh, journal);
    }
    let cache_result = {
        let mut result = 0;
        let mut wrote = false;
        if !journal.retired() {
            let names_data =
                snapshot.is_some() || records.iter().any(|r| r.state != SlotState::Free);
            if names_data {
                // Data before the records that point at it.
                if let Err(e) = sh.cache.sync() {
                    result = cache_sync_failed(sh, "data sync", &e);
                }
            }
            if result != 0 {
                requeue(sh, records);
            } else if let Some(snapshot) = snapshot {
                // The snapshot already includes every record taken with it.
                if let Err(e) = journal.checkpoint(&sh.cache, &snapshot) {
                    result = cache_sync_failed(sh, "checkpoint", &e);
                }
            } else if !records.is_empty() {
                if let Err(e) = journal.append(&sh.cache, &records) {
                    result = cache_sync_failed(sh, "journal write", &e);
                    requeue(sh, records);
                }
                wrote = true;
            }
            if result == 0 && (wrote || sync || pending > 0) {
                if let Err(e) = sh.cache.sync() {
                    result = cache_sync_failed(sh, "journal sync", &e);
                }
            }
        }
        result
    };
    if cache_result != 0 && sh.mode != CacheMode::WriteBack {
        // The capacity device holds every block: the flush lost nothing, provided the
        // cache, whose slots may now be stale, is never trusted again.
        retire(sh, journal);
    } else if result == 0 {
        result = cache_result;
    }
    if journal.retired() && !journal.erased() && result == 0 {
        result = -libc::EIO;
    }
    let sticky = sh.state().flush_error;
    if sticky != 0 {
        result = sticky;
    }
    if result == 0 {
        sh.state().release_pending(pending);
    }
    result
}

/// Out of service in write-through or write-around mode, the cache's own contents can no
/// longer be trusted (a write into a slot may have been lost): its superblocks are erased so
/// that the disk reformats it when it reopens. Retried each round until the erase is
/// durable; write-back caches keep their metadata (their dirty blocks are still written
/// back from them).
fn retire(sh: &Shared, journal: &mut Journal) {
    if sh.mode == CacheMode::WriteBack || journal.erased() {
        return;
    }
    match journal.retire(&sh.cache) {
        Ok(()) => log::warn!("tier: the failed cache will be reformatted when the disk reopens"),
        Err(e) => log::error!("tier: could not mark the failed cache for reformatting: {e}"),
    }
}

/// Records that were not written go back in front of newer ones, for the next round.
fn requeue(sh: &Shared, records: Vec<Record>) {
    let mut st = sh.state();
    let newer = std::mem::take(&mut st.records);
    st.records = records;
    st.records.extend(newer);
}

/// A write or sync of the cache device's metadata or data failed: the cache goes out of
/// service, and in write-back mode, where it holds the only copy of dirty blocks, every
/// later FLUSH fails too (what the failed sync covered may be gone). Returns the result
/// for the flushes of this round.
fn cache_sync_failed(sh: &Shared, what: &str, e: &io::Error) -> i32 {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    log::error!("tier: cache device {what} failed: {e}");
    let mut st = sh.state();
    sh.cache_failed(&mut st, what, errno);
    if sh.mode == CacheMode::WriteBack && st.flush_error == 0 {
        st.flush_error = -errno;
    }
    -errno
}

/// A sync of the capacity device failed: data acknowledged to the guest may be lost, and the
/// kernel will not say so again, so every later FLUSH fails.
fn capacity_sync_failed(sh: &Shared, e: &io::Error) -> i32 {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    log::error!("tier: capacity device sync failed: {e}; every later flush fails");
    sh.metrics.capacity_errors.fetch_add(1, Relaxed);
    let mut st = sh.state();
    st.capacity_unsynced = true;
    if st.flush_error == 0 {
        st.flush_error = -errno;
    }
    -errno
}

fn journal_thread(sh: Arc<Shared>, mut journal: Journal) {
    loop {
        let (flushes, shutdown) = {
            let mut bg = lock(&sh.bg);
            if bg.flushes.is_empty() && !bg.shutdown {
                bg = sh
                    .bg_cv
                    .wait_timeout(bg, JOURNAL_INTERVAL)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            (std::mem::take(&mut bg.flushes), bg.shutdown)
        };
        let result = journal_round(&sh, &mut journal, !flushes.is_empty() || shutdown, shutdown);
        for (link, tag) in flushes {
            link.complete(Completion {
                user_data: tag,
                result,
            });
        }
        if shutdown {
            return;
        }
    }
}

/// A synchronous flush from the control plane (shutdown, disconnect): the journal thread
/// writes every pending record and syncs both devices; this waits for it.
pub(super) fn flush_now(sh: &Shared) -> io::Result<()> {
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let link = Arc::new(Link {
        done: std::sync::Mutex::new(Vec::new()),
        ready: std::sync::atomic::AtomicUsize::new(0),
        notify: fd,
    });
    sh.state().capacity_unsynced = true;
    lock(&sh.bg).flushes.push((link.clone(), 0));
    sh.bg_cv.notify_one();
    let mut buf = [0u8; 8];
    // SAFETY: a blocking read of 8 bytes into a valid buffer from our eventfd.
    let n = unsafe { libc::read(owned.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    if n != 8 {
        return Err(io::Error::last_os_error());
    }
    let result = lock(&link.done).first().map_or(-libc::EIO, |c| c.result);
    if result < 0 {
        return Err(io::Error::from_raw_os_error(-result));
    }
    Ok(())
}

fn cleaner_thread(sh: Arc<Shared>) {
    loop {
        if lock(&sh.bg).shutdown {
            return;
        }
        let (dirty, failed) = {
            let st = sh.state();
            (st.dirty, st.failed)
        };
        // Down to the low watermark, so blocks rewritten soon stay in the cache; out of
        // service, every dirty block that can still be read goes to the capacity device.
        let floor = if failed { 0 } else { sh.low_watermark };
        if dirty > floor {
            if clean_batch(&sh, (dirty - floor).min(CLEAN_BATCH)) == 0 {
                std::thread::sleep(CLEANER_INTERVAL);
            }
        } else {
            std::thread::sleep(CLEANER_INTERVAL);
        }
    }
}

/// Writes back up to `max` dirty blocks; returns how many became clean.
pub(super) fn clean_batch(sh: &Shared, max: usize) -> usize {
    let bs = sh.block;
    let mut picked: Vec<(u32, u64, u32)> = Vec::new();
    {
        let mut st = sh.state();
        for (i, s) in st.slots.iter_mut().enumerate() {
            if picked.len() >= max.min(CLEAN_BATCH) {
                break;
            }
            if let Use::Dirty(b) = s.use_ {
                if s.writers == 0 && !s.cleaning && !s.unreadable {
                    s.cleaning = true;
                    picked.push((i as u32, b, s.generation));
                }
            }
        }
    }
    if picked.is_empty() {
        return 0;
    }
    let mut buf = AlignedBuf::new(bs as usize);
    let mut ok = vec![false; picked.len()];
    for (k, &(slot, block, _)) in picked.iter().enumerate() {
        let data = buf.as_mut_slice();
        if let Err(e) = sh.cache.get(data, sh.slot_offset(slot)) {
            sh.metrics.lost_blocks.fetch_add(1, Relaxed);
            let mut st = sh.state();
            st.slots[slot as usize].unreadable = true;
            sh.cache_failed(
                &mut st,
                "write-back read",
                e.raw_os_error().unwrap_or(libc::EIO),
            );
            log::error!("tier: dirty block {block} cannot be read from the cache: {e}");
            continue;
        }
        // The last block of a capacity device that is not a whole number of blocks.
        let at = block * bs;
        let n = (sh.capacity.saturating_sub(at)).min(bs) as usize;
        if let Err(e) = sh.cap.put(&data[..n], at) {
            sh.metrics.capacity_errors.fetch_add(1, Relaxed);
            log::error!("tier: write-back of block {block} failed: {e}");
            continue;
        }
        ok[k] = true;
    }
    let synced = match sh.cap.sync() {
        Ok(()) => true,
        Err(e) => {
            // The blocks stay dirty (their data is still in the cache), but the failed sync
            // may also have covered guests' writes: later flushes must not succeed.
            capacity_sync_failed(sh, &e);
            false
        }
    };
    let mut cleaned = 0;
    let mut st = sh.state();
    for (k, &(slot, block, generation)) in picked.iter().enumerate() {
        let s = &mut st.slots[slot as usize];
        s.cleaning = false;
        if synced && ok[k] && s.use_ == Use::Dirty(block) && s.generation == generation {
            s.use_ = Use::Clean(block);
            st.sync_entry(slot);
            st.dirty -= 1;
            st.records.push(Record {
                slot,
                state: SlotState::Clean(block),
            });
            cleaned += 1;
        }
    }
    sh.metrics
        .writeback_blocks
        .fetch_add(cleaned as u64, Relaxed);
    sh.update_gauges(&st);
    cleaned
}
