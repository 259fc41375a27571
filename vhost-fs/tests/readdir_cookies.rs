//! Directory offsets of 2^63 and above, end to end: the share is a host FUSE mount served
//! by this test (through `/dev/fuse`), whose directory hands out cookies with the top bit
//! set, as NFS does. The host kernel refuses `lseek` to them (a negative `off_t`), so the
//! daemon must find them by reading; a guest listing the directory a few entries per
//! READDIR (or READDIRPLUS) resumes from such cookies and must see every entry once.
//!
//! Needs root and `/dev/fuse` (as CI has); fails, not skips, without them.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::fuse_client::{vhost_fs_command, ClientOptions, FuseClient, ROOT_ID};

/// The entries of the served directory, after `.` and `..`, with their cookies: big and
/// small ones mixed, so the daemon both seeks and reads its way to them.
fn entries() -> Vec<(String, u64)> {
    (0..12u64)
        .map(|i| {
            let big = if i % 3 == 2 { 0 } else { 1 << 63 };
            (format!("entry-{i:02}"), big | (100 + i))
        })
        .collect()
}

/// `.`, `..` and [`entries`]: (name, cookie, inode number, DT_*).
fn listing() -> Vec<(String, u64, u64, u32)> {
    let mut all = vec![
        (".".to_owned(), 1, 1, libc::DT_DIR as u32),
        ("..".to_owned(), 2, 1, libc::DT_DIR as u32),
    ];
    for (i, (name, cookie)) in entries().into_iter().enumerate() {
        all.push((name, cookie, i as u64 + 2, libc::DT_REG as u32));
    }
    all
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// `fuse_attr` of the root directory (node 1) or of entry node `n`.
fn attr(node: u64) -> Vec<u8> {
    let mode = if node == 1 {
        libc::S_IFDIR | 0o755
    } else {
        libc::S_IFREG | 0o644
    };
    let mut a = Vec::with_capacity(88);
    a.extend_from_slice(&node.to_le_bytes()); // ino
    a.extend_from_slice(&[0; 40]); // size, blocks, atime, mtime, ctime
    a.extend_from_slice(&[0; 12]); // nsecs
    a.extend_from_slice(&mode.to_le_bytes());
    a.extend_from_slice(&1u32.to_le_bytes()); // nlink
    a.extend_from_slice(&[0; 12]); // uid, gid, rdev
    a.extend_from_slice(&4096u32.to_le_bytes()); // blksize
    a.extend_from_slice(&0u32.to_le_bytes()); // flags
    a
}

/// The reply body to one request, or `Err(errno)`, or `None` for requests without replies.
fn answer(opcode: u32, node: u64, args: &[u8]) -> Option<Result<Vec<u8>, i32>> {
    const LOOKUP: u32 = 1;
    const FORGET: u32 = 2;
    const GETATTR: u32 = 3;
    const OPENDIR: u32 = 27;
    const READDIR: u32 = 28;
    const RELEASEDIR: u32 = 29;
    const INIT: u32 = 26;
    const INTERRUPT: u32 = 36;
    const DESTROY: u32 = 38;
    const BATCH_FORGET: u32 = 42;
    let valid = |mut v: Vec<u8>| {
        v.extend_from_slice(&[0; 8]); // valid seconds: never cache
        v
    };
    Some(match opcode {
        INIT => {
            let mut out = Vec::new();
            out.extend_from_slice(&7u32.to_le_bytes());
            out.extend_from_slice(&31u32.to_le_bytes());
            out.extend_from_slice(&le32(args, 8).to_le_bytes()); // max_readahead
            out.extend_from_slice(&0u32.to_le_bytes()); // flags
            out.extend_from_slice(&16u16.to_le_bytes()); // max_background
            out.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
            out.extend_from_slice(&65536u32.to_le_bytes()); // max_write
            out.extend_from_slice(&1u32.to_le_bytes()); // time_gran
            out.resize(64, 0);
            Ok(out)
        }
        GETATTR => {
            let mut out = valid(Vec::new());
            out.extend_from_slice(&[0; 8]); // nsec, dummy
            out.extend(attr(node));
            Ok(out)
        }
        LOOKUP if node == 1 => {
            let name = args.split(|&b| b == 0).next().unwrap_or(&[]);
            match listing().iter().skip(2).find(|e| e.0.as_bytes() == name) {
                Some(&(_, _, ino, _)) => {
                    let mut out = Vec::new();
                    out.extend_from_slice(&ino.to_le_bytes()); // nodeid
                    out.extend_from_slice(&[0; 8]); // generation
                    out = valid(valid(out)); // entry_valid, attr_valid
                    out.extend_from_slice(&[0; 8]); // their nsecs
                    out.extend(attr(ino));
                    Ok(out)
                }
                None => Err(libc::ENOENT),
            }
        }
        OPENDIR if node == 1 => Ok(vec![0; 16]),
        READDIR if node == 1 => {
            // After the entry whose cookie is the offset; from the start at 0.
            let (offset, size) = (le64(args, 8), le32(args, 16) as usize);
            let all = listing();
            let from = match offset {
                0 => 0,
                o => all
                    .iter()
                    .position(|e| e.1 == o)
                    .map_or(all.len(), |i| i + 1),
            };
            let mut out = Vec::new();
            for (name, cookie, ino, typ) in &all[from..] {
                let len = (24 + name.len()).next_multiple_of(8);
                if out.len() + len > size {
                    break;
                }
                out.extend_from_slice(&ino.to_le_bytes());
                out.extend_from_slice(&cookie.to_le_bytes());
                out.extend_from_slice(&(name.len() as u32).to_le_bytes());
                out.extend_from_slice(&typ.to_le_bytes());
                out.extend_from_slice(name.as_bytes());
                out.resize(out.len().next_multiple_of(8), 0);
            }
            Ok(out)
        }
        RELEASEDIR => Ok(Vec::new()),
        FORGET | BATCH_FORGET | INTERRUPT | DESTROY => return None,
        _ => Err(libc::ENOSYS),
    })
}

/// Serves [`listing`] on `dev` (an open `/dev/fuse` whose mount is made) until unmounted.
fn serve(mut dev: File) {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match dev.read(&mut buf) {
            Ok(n) => n,
            // The request's process was interrupted: read the next.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            // ENODEV once unmounted.
            Err(_) => return,
        };
        let req = &buf[..n];
        let (opcode, unique, node) = (le32(req, 4), le64(req, 8), le64(req, 16));
        let Some(reply) = answer(opcode, node, &req[40..]) else {
            continue;
        };
        let (error, body) = match reply {
            Ok(body) => (0, body),
            Err(e) => (-e, Vec::new()),
        };
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&((16 + body.len()) as u32).to_le_bytes());
        out.extend_from_slice(&error.to_le_bytes());
        out.extend_from_slice(&unique.to_le_bytes());
        out.extend(body);
        // A request interrupted meanwhile has no one to answer: ENOENT, ignored.
        let _ = dev.write_all(&out);
    }
}

/// A FUSE file system serving [`listing`] at `mnt`, unmounted when dropped.
struct CookieFs {
    mnt: PathBuf,
}

impl CookieFs {
    fn mount(mnt: &Path) -> CookieFs {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .unwrap_or_else(|e| panic!("this test needs /dev/fuse (and root): {e}"));
        let opts = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
            dev.as_raw_fd()
        ))
        .unwrap();
        let target = CString::new(mnt.as_os_str().as_bytes()).unwrap();
        // SAFETY: every pointer is to a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"cookiefs".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mounting a FUSE file system (this test needs root): {}",
            std::io::Error::last_os_error()
        );
        std::thread::spawn(move || serve(dev));
        CookieFs {
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for CookieFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

#[test]
fn a_directory_with_cookies_of_2_63_and_above_lists_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _fs = CookieFs::mount(&mnt);
    // The premise: the host kernel refuses to seek to such a cookie.
    let d = File::open(&mnt).unwrap();
    // SAFETY: no memory is passed.
    let rc = unsafe { libc::lseek(d.as_raw_fd(), ((1u64 << 63) | 100) as i64, libc::SEEK_SET) };
    assert_eq!(rc, -1, "lseek took a negative offset");
    drop(d);

    let socket = dir.path().join("fs.sock");
    let mut daemon = vhost_fs_command(&socket, &mnt).unwrap().spawn().unwrap();
    let mut c = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
    c.init().unwrap();
    let want: Vec<(Vec<u8>, u64)> = listing()
        .into_iter()
        .map(|(n, cookie, ..)| (n.into_bytes(), cookie))
        .collect();
    // Room for one or two entries per call (a `fuse_direntplus` is 128 bytes more).
    for (plus, chunk) in [(false, 40), (false, 80), (true, 168), (true, 336)] {
        let got: Vec<(Vec<u8>, u64)> = c
            .readdir_all(ROOT_ID, plus, chunk)
            .unwrap_or_else(|e| panic!("plus={plus}, {chunk} bytes a call: {e}"))
            .into_iter()
            .map(|d| (d.name, d.off))
            .collect();
        assert_eq!(got, want, "plus={plus}, {chunk} bytes a call");
    }
    assert!(daemon.try_wait().unwrap().is_none(), "{}", daemon.output());
    drop(c);
    let _ = daemon.terminate();
}
