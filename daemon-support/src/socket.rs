//! The daemon's unix sockets: a stale socket file left by a dead daemon is replaced, a live
//! one is refused. The file is removed on exit through a descriptor of its directory, which
//! still works after the sandbox has hidden the host's file system.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
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
}

/// Binds a listening unix socket at `path`, replacing a stale socket file and refusing a
/// live one; the returned guard removes the file when dropped.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
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
    let listener = UnixListener::bind(path).map_err(err)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::File::open(parent).map_err(err)?;
    let name = CString::new(path.file_name().unwrap_or_default().as_bytes()).unwrap_or_default();
    Ok((
        listener,
        SocketFile {
            dir: dir.into(),
            name,
        },
    ))
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

/// Removes the socket file when dropped.
pub struct SocketFile {
    dir: OwnedFd,
    name: CString,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
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
        let (live, file) = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        drop(live);
        let (_again, file2) = bind(&path).unwrap();
        drop(file);
        drop(file2);
        assert!(!path.exists());
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(matches!(bind(&plain), Err(SocketError::NotASocket(_))));
    }
}
