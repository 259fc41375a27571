//! Passphrases from key files. A key file is used as cryptsetup's `--key-file` and QEMU's
//! `--object secret,file=` use it: every byte of it, trailing newline included. It is
//! refused unless it is a regular file owned by the daemon's user and readable by nobody
//! else (mode 0600 or stricter), as ssh refuses a private key others can read: a key that
//! others can read is no longer a secret, and a check now beats a leak found later. The
//! checks are of the file opened (its last component not a symbolic link, and without
//! blocking on a FIFO), and the passphrase is read straight into locked memory.

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::secret::Locked;

/// The longest key file read (cryptsetup takes passphrases of at most 512 characters
/// typed, and key files of any size; ours are passphrases).
pub const MAX_KEY_FILE: u64 = 8192;

/// Why a key file was refused. Names the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: not a regular file")]
    NotAFile(String),
    #[error("{0}: mode {1:04o} lets others read it (chmod 600)")]
    Mode(String, u32),
    #[error("{0}: owned by uid {1}, not this daemon's user (uid {2})")]
    Owner(String, u32, u32),
    #[error("{0}: empty")]
    Empty(String),
    #[error("{0}: longer than {MAX_KEY_FILE} bytes")]
    TooLong(String),
}

/// A passphrase read from a key file, in locked memory zeroed when dropped.
pub struct Passphrase {
    bytes: Locked<[u8; MAX_KEY_FILE as usize]>,
    len: usize,
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

impl std::ops::Deref for Passphrase {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Passphrase {
    /// A passphrase given otherwise than in a file (through the API): copied into locked
    /// memory; the caller zeroes its own copy.
    pub fn from_bytes(bytes: &[u8]) -> io::Result<Passphrase> {
        if bytes.is_empty() || bytes.len() > MAX_KEY_FILE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a passphrase is 1 to {MAX_KEY_FILE} bytes"),
            ));
        }
        let mut key = Passphrase {
            bytes: Locked::new([0u8; MAX_KEY_FILE as usize])?,
            len: bytes.len(),
        };
        key.bytes[..bytes.len()].copy_from_slice(bytes);
        Ok(key)
    }
}

/// Reads the passphrase in `path` (see the module docs).
pub fn read(path: &Path) -> Result<Passphrase, KeyFileError> {
    let name = path.display().to_string();
    let io = |e| KeyFileError::Io(name.clone(), e);
    // Not through a symbolic link: the checks are of the file read.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile(name));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Mode(name, mode));
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(KeyFileError::Owner(name, meta.uid(), uid));
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(KeyFileError::TooLong(name));
    }
    let mut key = Passphrase {
        bytes: Locked::new([0u8; MAX_KEY_FILE as usize]).map_err(io)?,
        len: 0,
    };
    let mut file = file;
    loop {
        if key.len == key.bytes.len() {
            // Grown since the size was read: one more byte means too long.
            let mut more = [0u8; 1];
            if file.read(&mut more).map_err(io)? > 0 {
                return Err(KeyFileError::TooLong(name));
            }
            break;
        }
        match file.read(&mut key.bytes[key.len..]).map_err(io)? {
            0 => break,
            n => key.len += n,
        }
    }
    if key.len == 0 {
        return Err(KeyFileError::Empty(name));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_a_private_file_of_ours_is_read_and_all_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, b"pass phrase\n").unwrap();
        let set = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        set(0o600).unwrap();
        assert_eq!(&read(&path).unwrap()[..], b"pass phrase\n");
        set(0o400).unwrap();
        assert!(read(&path).is_ok());
        for mode in [0o640, 0o604, 0o660, 0o644] {
            set(mode).unwrap();
            let e = read(&path).unwrap_err();
            assert!(matches!(e, KeyFileError::Mode(..)), "{mode:o}: {e}");
            assert!(!e.to_string().contains("pass phrase"), "{e}");
        }
        set(0o600).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(read(&link), Err(KeyFileError::Io(..))));
        assert!(matches!(
            read(dir.path()),
            Err(KeyFileError::Io(..) | KeyFileError::NotAFile(_))
        ));
        // A FIFO: refused at once, not waited on for a writer.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(read(&fifo), Err(KeyFileError::NotAFile(_))));
        // Another user's file (only root can give one away here).
        if std::os::unix::fs::chown(&path, Some(65534), None).is_ok() {
            assert!(matches!(read(&path), Err(KeyFileError::Owner(..))));
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            std::os::unix::fs::chown(&path, Some(uid), None).unwrap();
        }
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(read(&path), Err(KeyFileError::Empty(_))));
        std::fs::write(&path, vec![b'x'; MAX_KEY_FILE as usize + 1]).unwrap();
        assert!(matches!(read(&path), Err(KeyFileError::TooLong(_))));
        std::fs::write(&path, vec![b'x'; MAX_KEY_FILE as usize]).unwrap();
        assert!(read(&path).is_ok());
    }
}
