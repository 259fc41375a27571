//! The daemon's unix sockets: a stale socket file left by a dead daemon is replaced, a live
//! one is refused. A new socket is its owner's alone (mode 0600), or its owner's and one
//! group's (0660, `--socket-group`), whatever the process's umask: whoever connects to a
//! vhost-user socket drives the device, with the daemon's rights over the disk or share.
//! The file is removed on exit through a descriptor of its directory, which still works
//! after the sandbox has hidden the host's file system.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{0}: socket is in use by a running process")]
    InUse(PathBuf),
    #[error("{0}: exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("{path}: cannot bind socket: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: path too long for a unix socket")]
    PathTooLong(PathBuf),
    #[error("--socket-group {0}: no such group")]
    UnknownGroup(String),
}

/// The group id of `name` (a group name, or a number).
pub fn group_id(name: &str) -> Result<libc::gid_t, SocketError> {
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let c = CString::new(name).map_err(|_| SocketError::UnknownGroup(name.to_owned()))?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: a zeroed `group` is a valid out-buffer (plain integers and null pointers).
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: `c` is NUL-terminated; `grp`, `buf` (of the length passed) and `found` are
    // valid out-parameters for the duration of the call.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(SocketError::UnknownGroup(name.to_owned()));
    }
    Ok(grp.gr_gid)
}

/// Binds a listening unix socket at `path`, replacing a stale socket file and refusing a
/// live one; the returned guard removes the file when dropped. The socket is mode 0600, or
/// 0660 owned by `group` when one is given.
pub fn bind(
    path: &Path,
    group: Option<libc::gid_t>,
) -> Result<(UnixListener, SocketFile), SocketError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SocketError::NotASocket(path.to_owned()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.to_owned())),
            // Nobody listens: a leftover from a daemon that died. Replace it.
            Err(_) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let err = |source| SocketError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = bind_private(path, group)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::File::open(parent).map_err(err)?;
    let name = CString::new(path.file_name().unwrap_or_default().as_bytes()).unwrap_or_default();
    let dir: OwnedFd = dir.into();
    let identity = file_identity(&dir, &name).ok_or_else(|| err(io::Error::last_os_error()))?;
    Ok((
        listener,
        SocketFile {
            dir,
            name,
            identity,
        },
    ))
}

/// socket, bind (under a umask that gives the file its final mode), set its group, and only
/// then listen: until `listen` nobody can connect, so there is no moment when the socket
/// takes connections from anyone it should not.
fn bind_private(path: &Path, group: Option<libc::gid_t>) -> Result<UnixListener, SocketError> {
    let err = |source| SocketError::Bind {
        path: path.to_owned(),
        source,
    };
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid (family and an all-NUL path).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(SocketError::PathTooLong(path.to_owned()));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: socket takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // The file is created with its final mode (0600, or 0660 for a group) by the umask:
    // nothing is ever done by path to something another user could have put in its place
    // since. The umask is the process's: nothing else here creates files meanwhile (the
    // daemons bind before their data path starts, and binds take turns below).
    let mask = if group.is_some() { 0o117 } else { 0o177 };
    // Disks are added concurrently: two binds must not interleave their umask changes.
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _umask = UMASK.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: umask has no preconditions; the old mask is restored below.
    let old = unsafe { libc::umask(mask) };
    // SAFETY: `addr` is an initialised sockaddr_un of `len` bytes.
    let bound = unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    let bind_error = io::Error::last_os_error();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    if bound != 0 {
        return Err(err(bind_error));
    }
    if let Some(gid) = group {
        let c = CString::new(bytes).map_err(|_| err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: `c` is NUL-terminated; -1 leaves the owner as it is; lchown never follows
        // a symlink.
        if unsafe { libc::lchown(c.as_ptr(), u32::MAX, gid) } != 0 {
            return Err(err(io::Error::last_os_error()));
        }
    }
    // SAFETY: `fd` is our bound socket.
    if unsafe { libc::listen(fd, 128) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(UnixListener::from(sock))
}

/// Waits until `listener` has a frontend to accept (true), or the daemon is stopping
/// (false): `stopping()` says so, checked whenever `wake` (an eventfd the signal handler
/// writes) or the listener becomes readable.
pub fn wait_for_client(
    listener: std::os::unix::io::RawFd,
    wake: std::os::unix::io::RawFd,
    stopping: impl Fn() -> bool,
) -> io::Result<bool> {
    loop {
        if stopping() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if stopping() {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
    }
}

/// Removes the socket file when dropped, if it is still ours: another server may have
/// bound a socket of the same name since (a disk removed and added again).
pub struct SocketFile {
    dir: OwnedFd,
    name: CString,
    /// (st_dev, st_ino) of the socket we bound.
    identity: (u64, u64),
}

/// (st_dev, st_ino) of `name` in `dir`, not following a symlink.
fn file_identity(dir: &OwnedFd, name: &CString) -> Option<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated, `dir` an open directory, `st` a valid out-buffer.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatat succeeded, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if file_identity(&self.dir, &self.name) != Some(self.identity) {
            return;
        }
        // SAFETY: `name` is NUL-terminated and `dir` is an open directory descriptor.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sockets_are_replaced_live_ones_refused_and_files_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (live, file) = bind(&path, None).unwrap();
        assert!(matches!(bind(&path, None), Err(SocketError::InUse(_))));
        drop(live);
        let (_again, file2) = bind(&path, None).unwrap();
        drop(file);
        drop(file2);
        assert!(!path.exists());
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(matches!(
            bind(&plain, None),
            Err(SocketError::NotASocket(_))
        ));
    }

    /// Sockets are their owner's alone, or their owner's and one group's, whatever the
    /// umask (vhost-fs runs with umask 0); a group name or number is accepted.
    #[test]
    fn sockets_are_owner_only_or_one_group_whatever_the_umask() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: umask has no preconditions; the old mask is restored below.
        let old = unsafe { libc::umask(0) };
        let plain = dir.path().join("plain.sock");
        let (_l1, _f1) = bind(&plain, None).unwrap();
        let grouped = dir.path().join("grouped.sock");
        let gid = group_id("12345").unwrap();
        let (_l2, _f2) = bind(&grouped, Some(gid)).unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let m = std::fs::metadata(&plain).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let m = std::fs::metadata(&grouped).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        assert_eq!(m.gid(), 12345);
        assert_eq!(group_id("root").unwrap(), 0);
        assert!(matches!(
            group_id("no-such-group-here"),
            Err(SocketError::UnknownGroup(_))
        ));
    }
}
