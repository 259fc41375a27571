//! Image locks, as QEMU takes them: two programs never write one image at once, and
//! none writes an image another reads as a backing file.
//!
//! QEMU's file driver (`block/file-posix.c`) marks what an open of an image does with
//! shared open-file-description (OFD) locks on single bytes past the first hundred:
//! byte 100+n says "this open uses permission n", byte 200+n "this open lets nobody else
//! have permission n". Before it keeps an image open, it asks the kernel whether another
//! open description holds the bytes its own use conflicts with. Taking the same bytes
//! the same way makes QEMU, qemu-img, qemu-storage-daemon and our daemons see each
//! other: a second writer of a served image is refused on either side, and `qemu-img
//! info` on it says "Is another process using the image?" unless given `-U`.
//!
//! The bytes are locks on the file's open description, never on its contents (they are
//! advisory and cover no data), released when the last descriptor of that open closes.
//! Another open of the same file, even in this process, is another holder: a node that
//! opens an image again beside the one served takes the bytes without the check
//! ([`Locking::Again`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{StorageError, StorageErrorKind};

/// QEMU's `RAW_LOCK_PERM_BASE`: byte 100+n held: this open uses permission n.
const PERM_BASE: i64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`: byte 200+n held: this open shares no permission n.
const SHARED_BASE: i64 = 200;

/// QEMU's block permissions (`BLK_PERM_*`), by bit number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Perm {
    /// Reads see what the image holds (nobody changes it under them unseen).
    ConsistentRead = 0,
    Write = 1,
    /// Writes that leave the contents as they are (QEMU's block jobs); never ours.
    #[allow(dead_code)] // Named so that the bytes' numbers read as QEMU's.
    WriteUnchanged = 2,
    Resize = 3,
}

impl Perm {
    fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }
}

/// What an open of an image uses and what it lets others use. A writable image is used
/// as a guest's disk in QEMU with a format on top (`share-rw=off`): read, write and
/// grow it (a qcow2 image grows, an operator resizes), and let nobody else write or
/// resize it. A read-only one (a backing file, a read-only disk): read it, and let
/// nobody write or resize it under the reads.
fn uses(read_only: bool) -> &'static [Perm] {
    if read_only {
        &[Perm::ConsistentRead]
    } else {
        &[Perm::ConsistentRead, Perm::Write, Perm::Resize]
    }
}

/// What no other open may use while we hold the image, writable or not.
const UNSHARED: &[Perm] = &[Perm::Write, Perm::Resize];

/// How a file node treats the image's lock bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locking {
    /// Take them, then check that no other open holds a use ours conflicts with (QEMU's
    /// `locking=on`, its default here, where OFD locks exist).
    On,
    /// Take them without the check: this process holds the image already, through a node
    /// that opens it again beside the one served (its other holder is ourselves).
    Again,
    /// Neither (QEMU's `locking=off`): for images shared on purpose, or on file systems
    /// without byte locks.
    Off,
}

impl Locking {
    /// The spec's `locking=on` (true) or `off`.
    pub fn on_if(on: bool) -> Locking {
        if on {
            Locking::On
        } else {
            Locking::Off
        }
    }
}

/// An OFD lock command on `len` bytes from `byte`.
fn ofd(
    file: &File,
    cmd: libc::c_int,
    kind: libc::c_int,
    byte: i64,
    len: i64,
) -> io::Result<libc::flock> {
    let mut lock = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: len,
        // OFD locks require 0 here.
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK and F_OFD_GETLK read (and GETLK writes) the flock we own, on a
    // descriptor `file` keeps open for the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut lock) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lock)
}

/// Takes a shared lock on `byte` (never blocks: only an exclusive lock would stop it, and
/// nobody takes one on these bytes).
fn take(file: &File, byte: i64) -> io::Result<()> {
    ofd(file, libc::F_OFD_SETLK, libc::F_RDLCK, byte, 1).map(drop)
}

/// Releases `len` bytes from `byte` (those not held need no care).
fn release(file: &File, byte: i64, len: i64) -> io::Result<()> {
    ofd(file, libc::F_OFD_SETLK, libc::F_UNLCK, byte, len).map(drop)
}

/// Whether another open description holds any lock on `byte` (as QEMU's
/// `qemu_lock_fd_test`: would an exclusive lock be refused).
fn held_elsewhere(file: &File, byte: i64) -> io::Result<bool> {
    let l = ofd(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte, 1)?;
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

/// How long a conflict is looked at again before it is believed: a process forked by
/// another thread holds copies of every descriptor until it execs, so an image this
/// process has just let go of can look held for a moment.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// What another open's bytes say we may not do, if anything, once it has lasted
/// [`SETTLE`].
fn lasting_conflict(file: &File, read_only: bool) -> io::Result<Option<String>> {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        match conflict(file, read_only)? {
            Some(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            found => return Ok(found),
        }
    }
}

/// What another open's lock bytes say an open of the image at `path`, read-only or
/// writable, may not do, if anything: the check an open makes, taking nothing (as
/// `qemu-img info` without `-U` asks).
pub fn conflicting_use(path: &Path, read_only: bool) -> io::Result<Option<String>> {
    conflict(&File::open(path)?, read_only)
}

/// What another open's bytes say we may not do, if anything.
fn conflict(file: &File, read_only: bool) -> io::Result<Option<String>> {
    for &p in uses(read_only) {
        if held_elsewhere(file, SHARED_BASE + p as i64)? {
            return Ok(Some(format!(
                "another process has the image open and allows no other {} (it holds \
                 QEMU's lock byte {})",
                p.name(),
                SHARED_BASE + p as i64
            )));
        }
    }
    for &p in UNSHARED {
        if held_elsewhere(file, PERM_BASE + p as i64)? {
            return Ok(Some(format!(
                "another process has the image open for {} (it holds QEMU's lock byte {})",
                p.name(),
                PERM_BASE + p as i64
            )));
        }
    }
    Ok(None)
}

/// The lock bytes one open of an image holds, on a descriptor of their own: an io_uring
/// ring keeps the files registered with it open for a while after it is dropped, even
/// after its process has died (its teardown is asynchronous), so bytes held on the file
/// the data path uses would refuse the next open of the image (a daemon restarted after a
/// crash) until the kernel got round to it. This descriptor never reaches a ring: its
/// bytes go when it closes, with the last handle on it or with the process.
#[derive(Debug)]
pub struct ImageLock(File);

impl ImageLock {
    /// Marks the image open in `file` (at `path`) as used read-only or writable, as
    /// `locking` says (`None` when off). Fails, holding nothing, when another open
    /// conflicts, or when the file system takes no byte locks (`locking=off` opens it
    /// then).
    pub fn take(
        file: &File,
        path: &Path,
        read_only: bool,
        locking: Locking,
    ) -> Result<Option<ImageLock>, StorageError> {
        if locking == Locking::Off {
            return Ok(None);
        }
        // The same file whatever `path` leads to by now: reopened through our descriptor.
        let lock = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map(ImageLock)
            .map_err(|e| {
                StorageError::new(
                    StorageErrorKind::Open,
                    format!("cannot open the image for its lock: {e}"),
                )
                .with_path(path)
            })?;
        // (A failure drops `lock`, and with it whatever it took.)
        let advice = |kind| match kind {
            StorageErrorKind::InUse => {
                ". Stop that user (QEMU, qemu-img, another daemon), or give locking=off if \
                 the image is shared on purpose"
            }
            _ => "; give locking=off if the file system has no byte locks",
        };
        match lock.hold(read_only, locking == Locking::On) {
            Ok(()) => Ok(Some(lock)),
            Err((kind, why)) => {
                Err(StorageError::new(kind, format!("{why}{}", advice(kind))).with_path(path))
            }
        }
    }

    /// Takes a reader's or a writer's bytes (beside any this lock holds) and, when
    /// `check`, looks for another open they conflict with, as QEMU does: take first,
    /// then check, so that two opens racing each see the other.
    fn hold(&self, read_only: bool, check: bool) -> Result<(), (StorageErrorKind, String)> {
        let bytes = uses(read_only)
            .iter()
            .map(|&p| PERM_BASE + p as i64)
            .chain(UNSHARED.iter().map(|&p| SHARED_BASE + p as i64));
        for byte in bytes {
            take(&self.0, byte).map_err(|e| {
                (
                    StorageErrorKind::Open,
                    format!("cannot take the image's lock ({e})"),
                )
            })?;
        }
        if !check {
            return Ok(());
        }
        match lasting_conflict(&self.0, read_only) {
            Ok(None) => Ok(()),
            Ok(Some(why)) => Err((
                StorageErrorKind::InUse,
                format!("the image is in use: {why}"),
            )),
            Err(e) => Err((
                StorageErrorKind::Open,
                format!("cannot test the image's lock ({e})"),
            )),
        }
    }

    /// Takes a writer's bytes beside the reader's this lock holds, for a while (a snapshot
    /// being deleted or reverted away, or its LUKS keyslots changing): refused, and back to
    /// a reader's bytes, while any other open reads the image: another program, or another
    /// disk of this one (a clone's backing file).
    pub fn upgrade_to_writer(&self, path: &Path) -> Result<(), StorageError> {
        self.hold(false, true).map_err(|(kind, why)| {
            let _ = self.downgrade_to_read_only();
            StorageError::new(kind, why).with_path(path)
        })
    }

    /// Keeps only a reader's bytes: the image is read-only from now on (it became a
    /// snapshot), and others may open it as a backing file.
    pub fn downgrade_to_read_only(&self) -> io::Result<()> {
        for p in [Perm::Write, Perm::Resize] {
            release(&self.0, PERM_BASE + p as i64, 1)?;
        }
        Ok(())
    }

    /// Releases every byte now (a disk closing while its handles live on in queues still
    /// winding down): 100 to 299, QEMU's whole range.
    pub fn release(&self) -> io::Result<()> {
        release(&self.0, PERM_BASE, 2 * (SHARED_BASE - PERM_BASE))
    }
}

/// An image's file and the lock held for it, shared by a node and its queues: the lock
/// goes with the last of them.
#[derive(Debug)]
pub struct LockedFile {
    file: File,
    lock: Option<ImageLock>,
}

impl LockedFile {
    pub(crate) fn new(file: File, lock: Option<ImageLock>) -> LockedFile {
        LockedFile { file, lock }
    }

    /// The lock, unless the image was opened with `locking=off`.
    pub fn lock(&self) -> Option<&ImageLock> {
        self.lock.as_ref()
    }

    /// Keeps a reader's bytes only ([`ImageLock::downgrade_to_read_only`]), if locked.
    pub fn downgrade_to_read_only(&self) -> io::Result<()> {
        self.lock
            .as_ref()
            .map_or(Ok(()), ImageLock::downgrade_to_read_only)
    }

    /// Releases every byte now ([`ImageLock::release`]), if locked.
    pub fn release(&self) -> io::Result<()> {
        self.lock.as_ref().map_or(Ok(()), ImageLock::release)
    }
}

impl std::ops::Deref for LockedFile {
    type Target = File;

    fn deref(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        (dir, path)
    }

    fn open(path: &Path) -> File {
        File::options().read(true).write(true).open(path).unwrap()
    }

    fn lock(
        path: &Path,
        read_only: bool,
        locking: Locking,
    ) -> Result<Option<ImageLock>, StorageError> {
        ImageLock::take(&open(path), path, read_only, locking)
    }

    fn writer(path: &Path) -> ImageLock {
        lock(path, false, Locking::On).unwrap().unwrap()
    }

    /// Whether a writer may take the image now.
    fn free(path: &Path) -> bool {
        lock(path, false, Locking::On).is_ok()
    }

    #[test]
    fn a_second_writer_is_refused_and_names_the_conflict() {
        let (_d, path) = image();
        let first = writer(&path);
        let e = lock(&path, false, Locking::On).unwrap_err();
        assert_eq!(e.kind(), StorageErrorKind::InUse);
        assert!(
            e.to_string().contains("in use") && e.to_string().contains("201"),
            "{e}"
        );
        // The refused open holds nothing: once the first lets go, the image is free.
        drop(first);
        assert!(free(&path));
    }

    #[test]
    fn the_lock_outlives_the_descriptor_it_was_taken_for() {
        // The data path's descriptor may linger in an io_uring ring; the lock has its own.
        let (_d, path) = image();
        let file = open(&path);
        let held = ImageLock::take(&file, &path, false, Locking::On).unwrap();
        drop(file);
        assert!(!free(&path));
        drop(held);
        assert!(free(&path));
    }

    #[test]
    fn readers_share_an_image_that_nobody_writes() {
        let (_d, path) = image();
        let a = lock(&path, true, Locking::On).unwrap();
        let b = lock(&path, true, Locking::On).unwrap();
        // But nobody may write what they read, nor read what another writes.
        assert!(!free(&path));
        drop((a, b));
        let _w = writer(&path);
        assert!(lock(&path, true, Locking::On).is_err());
    }

    #[test]
    fn a_writer_turned_read_only_lets_readers_in() {
        let (_d, path) = image();
        let w = writer(&path);
        assert!(lock(&path, true, Locking::On).is_err());
        w.downgrade_to_read_only().unwrap();
        let _r = lock(&path, true, Locking::On).unwrap();
        // Still no second writer.
        assert!(!free(&path));
    }

    #[test]
    fn a_reader_turns_writer_only_while_nobody_else_reads() {
        let (_d, path) = image();
        let ours = lock(&path, true, Locking::On).unwrap().unwrap();
        let other = lock(&path, true, Locking::On).unwrap();
        let e = ours.upgrade_to_writer(&path).unwrap_err();
        assert_eq!(e.kind(), StorageErrorKind::InUse, "{e}");
        // Refused, it is a reader again: the other reader is not locked out.
        assert!(lock(&path, true, Locking::On).is_ok());
        drop(other);
        ours.upgrade_to_writer(&path).unwrap();
        assert!(lock(&path, true, Locking::On).is_err());
        ours.downgrade_to_read_only().unwrap();
        assert!(lock(&path, true, Locking::On).is_ok());
    }

    #[test]
    fn again_takes_without_checking_and_off_takes_nothing() {
        let (_d, path) = image();
        let w = writer(&path);
        let again = lock(&path, false, Locking::Again).unwrap();
        assert!(again.is_some());
        // Held by the second alone once the first goes.
        drop(w);
        assert!(lock(&path, true, Locking::On).is_err());
        drop(again);
        assert!(lock(&path, false, Locking::Off).unwrap().is_none());
        assert!(free(&path));
    }

    #[test]
    fn releasing_frees_the_image_while_the_lock_lives() {
        let (_d, path) = image();
        let w = writer(&path);
        w.release().unwrap();
        assert!(free(&path));
    }
}
