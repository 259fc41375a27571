//! Space alerts: how full the host file systems under each disk's files are. A disk whose
//! files' file system has less free space than the threshold (`space-alert-percent`, 10 by
//! default) is flagged in the metrics, and a line is logged when it crosses the threshold
//! either way, checked every `space-check-seconds`. A guest writing into a sparse image, or
//! a cache file, can fill a host file system long before the image reaches its size.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use storage_core::disk::DiskSpec;

use crate::daemon::DiskSet;

/// When to alert.
#[derive(Debug, Clone, Copy)]
pub struct SpacePolicy {
    /// Alert under this share of free space, in percent (0 turns alerts off).
    pub alert_percent: f64,
    pub interval: Duration,
}

impl Default for SpacePolicy {
    fn default() -> Self {
        SpacePolicy {
            alert_percent: 10.0,
            interval: Duration::from_secs(60),
        }
    }
}

/// The free space of the file system holding one of a disk's files.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub path: PathBuf,
    /// Bytes available to the daemon (not counting the reserve for root).
    pub free: u64,
    pub size: u64,
}

impl Usage {
    pub fn free_percent(&self) -> f64 {
        if self.size == 0 {
            return 100.0;
        }
        self.free as f64 * 100.0 / self.size as f64
    }
}

/// The files a disk stores data in (not an RBD image: the cluster watches its own space).
pub fn files(spec: &DiskSpec) -> Vec<PathBuf> {
    spec.root.files().into_iter().map(|(p, _)| p).collect()
}

/// Bytes a disk's files take on the host (their allocated blocks: what a sparse image or
/// a cache has grown to); `None` for a disk without regular files. A name that is now a
/// symlink is not followed (an operator's file swapped for a link must not report another
/// file's size).
pub fn allocated(spec: &DiskSpec) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    files(spec)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .reduce(|a, b| a + b)
}

/// statvfs of the file system holding `path` (a regular file: a block device's is /dev's).
pub fn usage(path: &Path) -> Option<Usage> {
    use std::os::unix::ffi::OsStrExt;
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is NUL-terminated and `st` a valid out-buffer.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    Some(Usage {
        path: path.to_owned(),
        free: st.f_bavail * st.f_frsize,
        size: st.f_blocks * st.f_frsize,
    })
}

/// Checks every disk now: sets each one's flag and logs the crossings.
pub fn check(disks: &DiskSet, policy: SpacePolicy) {
    for d in disks.list() {
        let low = files(&d.config.spec)
            .iter()
            .filter_map(|p| usage(p))
            .filter(|u| u.free_percent() < policy.alert_percent)
            .min_by(|a, b| a.free_percent().total_cmp(&b.free_percent()));
        let was = d.low_space.swap(low.is_some(), Ordering::Relaxed);
        match (&low, was) {
            (Some(u), false) => log::warn!(
                "disk {}: the file system holding {} has {:.1}% free ({} of {} bytes), under \
                 the {}% alert threshold",
                d.id(),
                u.path.display(),
                u.free_percent(),
                u.free,
                u.size,
                policy.alert_percent
            ),
            (None, true) => log::info!(
                "disk {}: free space is back above the {}% alert threshold",
                d.id(),
                policy.alert_percent
            ),
            _ => {}
        }
    }
}

/// Checks every `policy.interval` on a thread of its own, from now on.
pub fn watch(disks: Arc<DiskSet>, policy: SpacePolicy) -> std::io::Result<()> {
    if policy.alert_percent <= 0.0 {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("space-watch".into())
        .spawn(move || loop {
            check(&disks, policy);
            std::thread::sleep(policy.interval);
        })?;
    Ok(())
}
