//! `guest-fs-ops`: the file operations a Linux guest's busybox has no tool for, run on a
//! virtio-fs mount, one deterministic line per result.
//!
//! firmware-tests builds this as a static binary, puts it in the guest's initramfs and runs
//! it on a vhost-fs share and on a virtiofsd share in the same guest; the two outputs are
//! compared line for line and the host checks what was left behind. It touches flock,
//! POSIX byte-range and OFD locks (GETLK/SETLK/SETLKW), the four xattr operations,
//! RENAME2 (NOREPLACE, EXCHANGE), LSEEK (SEEK_DATA/SEEK_HOLE), COPY_FILE_RANGE, FALLOCATE
//! (with punch hole), SYNCFS, FSYNC, FSYNCDIR, MKNOD of a FIFO, ACCESS and the usual error
//! cases.
//!
//! Usage:
//! - `guest-fs-ops run DIR PREFIX`: works in `DIR/ops` (created here, must not exist);
//! - `guest-fs-ops cross DIR_A DIR_B PREFIX`: operations across two mounts (EXDEV edges).
//!
//! Every line is `RESULT PREFIX.key=value`, the format testkit's guest harness reads; values
//! have no spaces and hold nothing that differs between runs (no inode numbers, times or pids):
//! `ok`, an errno name such as `EEXIST`, a number or a short string.

use std::ffi::CString;
use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Prints result lines under one prefix.
struct Report {
    prefix: String,
}

impl Report {
    fn line(&self, key: &str, value: impl Display) {
        println!("RESULT {}.{key}={value}", self.prefix);
    }

    /// `ok`, the value, or the errno name.
    fn res<T: Display>(&self, key: &str, r: io::Result<T>) {
        match r {
            Ok(v) => self.line(key, v),
            Err(e) => self.line(key, errno_name(&e)),
        }
    }

    /// `ok` or the errno name, for calls whose value is not interesting.
    fn done<T>(&self, key: &str, r: io::Result<T>) {
        self.res(key, r.map(|_| "ok"));
    }
}

fn errno_name(e: &io::Error) -> String {
    let Some(n) = e.raw_os_error() else {
        return format!("error:{}", e.kind()).replace(' ', "_");
    };
    let name = match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::EDEADLK => "EDEADLK",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOLCK => "ENOLCK",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESTALE => "ESTALE",
        libc::ETXTBSY => "ETXTBSY",
        _ => return format!("E{n}"),
    };
    name.to_owned()
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt64(ret: i64) -> io::Result<i64> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn c(path: &Path) -> CString {
    // Paths here are built from fixed names and the command line, never with a NUL.
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn cname(name: &str) -> CString {
    CString::new(name).expect("name without NUL")
}

// ---- thin syscall wrappers ------------------------------------------------------------------

fn access(path: &Path, mode: libc::c_int) -> io::Result<()> {
    let p = c(path);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    cvt(unsafe { libc::access(p.as_ptr(), mode) }).map(drop)
}

fn setxattr(path: &Path, name: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (p, n) = (c(path), cname(name));
    // SAFETY: path and name are NUL-terminated; `value` is valid for `value.len()` bytes.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `getxattr` into a buffer of `size` bytes (0 asks for the size only).
fn getxattr(path: &Path, name: &str, size: usize) -> io::Result<Vec<u8>> {
    let (p, n) = (c(path), cname(name));
    let mut buf = vec![0u8; size];
    // SAFETY: path and name are NUL-terminated; `buf` is writable for `size` bytes (a null
    // pointer is never passed: an empty Vec's pointer is dangling but the size is 0).
    let got = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let got = cvt64(got as i64)? as usize;
    if size == 0 {
        return Ok(got.to_string().into_bytes());
    }
    buf.truncate(got);
    Ok(buf)
}

/// The `user.` attributes of `path`, sorted and joined with `,` (a guest or host may add
/// others, such as `security.*`, which are not ours to compare).
fn listxattr_user(path: &Path) -> io::Result<String> {
    let p = c(path);
    let mut buf = vec![0u8; 4096];
    // SAFETY: `p` is NUL-terminated; `buf` is writable for its length.
    let got = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let got = cvt64(got as i64)? as usize;
    let mut names: Vec<String> = buf[..got]
        .split(|&b| b == 0)
        .filter(|n| n.starts_with(b"user."))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    Ok(if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(",")
    })
}

fn removexattr(path: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (c(path), cname(name));
    // SAFETY: path and name are NUL-terminated.
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (f, t) = (c(from), c(to));
    // SAFETY: both paths are NUL-terminated; AT_FDCWD with absolute or cwd-relative paths.
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid open descriptor; no memory is passed.
    cvt(unsafe { libc::flock(file.as_raw_fd(), op) }).map(drop)
}

fn lock_arg(typ: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: `flock` is plain old data; all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

/// `fcntl(cmd, &flock)` for F_SETLK/F_SETLKW/F_GETLK and their OFD forms.
fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: a valid descriptor and a valid, writable `struct flock` for the lock commands.
    cvt(unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) }).map(drop)
}

fn lock_type_name(t: libc::c_short) -> &'static str {
    match t as libc::c_int {
        libc::F_RDLCK => "F_RDLCK",
        libc::F_WRLCK => "F_WRLCK",
        libc::F_UNLCK => "F_UNLCK",
        _ => "F_BAD",
    }
}

/// What F_GETLK (or F_OFD_GETLK) reports for a `typ` lock on `[start, start + len)`:
/// `type:start:len` of the conflicting lock (no pid: it differs between runs), or `F_UNLCK`.
fn getlk(
    file: &File,
    cmd: libc::c_int,
    typ: libc::c_int,
    start: i64,
    len: i64,
) -> io::Result<String> {
    let mut fl = lock_arg(typ, start, len);
    fcntl_lock(file, cmd, &mut fl)?;
    if fl.l_type as libc::c_int == libc::F_UNLCK {
        return Ok("F_UNLCK".to_owned());
    }
    Ok(format!(
        "{}:{}:{}",
        lock_type_name(fl.l_type),
        fl.l_start,
        fl.l_len
    ))
}

fn setlk(file: &File, cmd: libc::c_int, typ: libc::c_int, start: i64, len: i64) -> io::Result<()> {
    fcntl_lock(file, cmd, &mut lock_arg(typ, start, len))
}

fn lseek(file: &File, offset: i64, whence: libc::c_int) -> io::Result<i64> {
    // SAFETY: a valid descriptor; no memory is passed.
    cvt64(unsafe { libc::lseek(file.as_raw_fd(), offset, whence) })
}

fn copy_file_range(
    src: &File,
    off_in: i64,
    dst: &File,
    off_out: i64,
    len: usize,
) -> io::Result<i64> {
    let (mut i, mut o) = (off_in, off_out);
    // SAFETY: valid descriptors and valid, writable offsets that outlive the call.
    let n =
        unsafe { libc::copy_file_range(src.as_raw_fd(), &mut i, dst.as_raw_fd(), &mut o, len, 0) };
    cvt64(n as i64)
}

fn fallocate(file: &File, mode: libc::c_int, offset: i64, len: i64) -> io::Result<()> {
    // SAFETY: a valid descriptor; no memory is passed.
    cvt(unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) }).map(drop)
}

fn syncfs(file: &File) -> io::Result<()> {
    // SAFETY: a valid descriptor; no memory is passed.
    cvt(unsafe { libc::syncfs(file.as_raw_fd()) }).map(drop)
}

fn mknod(path: &Path, mode: libc::mode_t) -> io::Result<()> {
    let p = c(path);
    // SAFETY: `p` is NUL-terminated; device number 0 (FIFOs and regular files only).
    cvt(unsafe { libc::mknod(p.as_ptr(), mode, 0) }).map(drop)
}

/// The child's end of a pipe: tells the parent the child got as far as the parent waits for.
struct Ready(File);

impl Ready {
    fn signal(&self) {
        let _ = (&self.0).write_all(b"r");
    }
}

/// The parent's end: waits for [`Ready::signal`], or for the child to exit without it.
struct WaitReady(File);

impl WaitReady {
    fn wait(&self) {
        let _ = (&self.0).read(&mut [0u8; 1]);
    }
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Forks; the child runs `child` (which prints its own lines) and exits. The parent runs
/// `parent` while the child lives and reports its result as `parent_key` once the child
/// has exited (so lines never interleave), then the child's exit status as `key`. The two
/// sides synchronise through the pipe, not through timing.
fn with_child(
    r: &Report,
    key: &str,
    child: impl FnOnce(&Ready) -> i32,
    parent_key: &str,
    parent: impl FnOnce(&WaitReady) -> io::Result<()>,
) {
    let (read_end, write_end) = match pipe() {
        Ok(p) => p,
        Err(e) => {
            r.line(key, errno_name(&e));
            return;
        }
    };
    // Nothing buffered may be printed twice.
    let _ = io::stdout().flush();
    // SAFETY: this program is single-threaded, so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        r.line(key, errno_name(&io::Error::last_os_error()));
        return;
    }
    if pid == 0 {
        drop(read_end);
        let code = child(&Ready(write_end));
        let _ = io::stdout().flush();
        // SAFETY: ends the child without running the parent's exit handlers twice.
        unsafe { libc::_exit(code) };
    }
    // Without the parent's copy of the write end, a child that exits unready ends the wait.
    drop(write_end);
    let parent_result = parent(&WaitReady(read_end));
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out-pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    r.done(parent_key, parent_result);
    if waited != pid {
        r.line(key, errno_name(&io::Error::last_os_error()));
    } else if libc::WIFEXITED(status) {
        r.line(key, format!("exit{}", libc::WEXITSTATUS(status)));
    } else {
        r.line(key, "killed");
    }
}

fn rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Gives a child that said it is about to block time to do so before the parent lets it go.
/// Results do not depend on it: a child that has not blocked yet gets the lock at once.
fn pause() {
    std::thread::sleep(Duration::from_millis(300));
}

// ---- the workload ---------------------------------------------------------------------------

fn access_ops(d: &Path, r: &Report) -> io::Result<()> {
    let f = d.join("access.txt");
    fs::write(&f, b"x")?;
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644))?;
    r.done("access_rw", access(&f, libc::R_OK | libc::W_OK));
    // Even root needs an execute bit somewhere to execute.
    r.done("access_x_no_exec_bit", access(&f, libc::X_OK));
    fs::set_permissions(&f, fs::Permissions::from_mode(0o755))?;
    r.done("access_x_after_chmod", access(&f, libc::X_OK));
    r.done("access_missing", access(&d.join("missing"), libc::F_OK));
    r.done(
        "access_dir",
        access(d, libc::R_OK | libc::W_OK | libc::X_OK),
    );
    Ok(())
}

fn xattr_ops(d: &Path, r: &Report) -> io::Result<()> {
    let f = d.join("xattr.txt");
    fs::write(&f, b"xattrs")?;
    r.done("xattr_set", setxattr(&f, "user.one", b"alpha", 0));
    r.done(
        "xattr_create_existing",
        setxattr(&f, "user.one", b"again", libc::XATTR_CREATE),
    );
    r.done(
        "xattr_replace_missing",
        setxattr(&f, "user.none", b"x", libc::XATTR_REPLACE),
    );
    r.done(
        "xattr_replace",
        setxattr(&f, "user.one", b"alpha2", libc::XATTR_REPLACE),
    );
    r.res(
        "xattr_get",
        getxattr(&f, "user.one", 64).map(|v| String::from_utf8_lossy(&v).into_owned()),
    );
    r.res(
        "xattr_get_size",
        getxattr(&f, "user.one", 0).map(|v| String::from_utf8_lossy(&v).into_owned()),
    );
    r.done("xattr_get_small_buffer", getxattr(&f, "user.one", 2));
    r.done("xattr_get_missing", getxattr(&f, "user.missing", 64));
    r.done("xattr_set_two", setxattr(&f, "user.two", b"beta", 0));
    r.res("xattr_list", listxattr_user(&f));
    r.done("xattr_remove", removexattr(&f, "user.two"));
    r.done("xattr_remove_again", removexattr(&f, "user.two"));
    r.done("xattr_get_removed", getxattr(&f, "user.two", 64));
    r.res("xattr_list_after", listxattr_user(&f));
    // Directories carry xattrs too.
    let dir = d.join("xattr-dir");
    fs::create_dir(&dir)?;
    r.done("xattr_dir_set", setxattr(&dir, "user.dir", b"on-a-dir", 0));
    r.res(
        "xattr_dir_get",
        getxattr(&dir, "user.dir", 64).map(|v| String::from_utf8_lossy(&v).into_owned()),
    );
    // Left for the host to read back.
    r.done("xattr_kept", setxattr(&f, "user.kept", b"host-visible", 0));
    Ok(())
}

fn flock_ops(d: &Path, r: &Report) -> io::Result<()> {
    let path = d.join("flock.txt");
    fs::write(&path, b"flock")?;
    let a = rw(&path)?;
    let b = rw(&path)?;
    r.done("flock_ex", flock(&a, libc::LOCK_EX | libc::LOCK_NB));
    r.done(
        "flock_ex_conflict",
        flock(&b, libc::LOCK_EX | libc::LOCK_NB),
    );
    r.done(
        "flock_sh_conflict",
        flock(&b, libc::LOCK_SH | libc::LOCK_NB),
    );
    r.done("flock_un", flock(&a, libc::LOCK_UN));
    r.done("flock_sh_b", flock(&b, libc::LOCK_SH | libc::LOCK_NB));
    r.done("flock_sh_a", flock(&a, libc::LOCK_SH | libc::LOCK_NB));
    r.done(
        "flock_upgrade_conflict",
        flock(&a, libc::LOCK_EX | libc::LOCK_NB),
    );
    r.done("flock_un_b", flock(&b, libc::LOCK_UN));
    r.done("flock_upgrade", flock(&a, libc::LOCK_EX | libc::LOCK_NB));
    // A blocking flock waits for the holder to let go.
    with_child(
        r,
        "flock_wait_child",
        |ready| {
            ready.signal();
            match flock(&b, libc::LOCK_EX) {
                Ok(()) => 0,
                Err(_) => 1,
            }
        },
        "flock_release_for_child",
        |ready| {
            ready.wait();
            pause();
            flock(&a, libc::LOCK_UN)
        },
    );
    // Closing the last descriptor of the holder releases its flock.
    drop(b);
    let c = rw(&path)?;
    r.done(
        "flock_after_close",
        flock(&c, libc::LOCK_EX | libc::LOCK_NB),
    );
    Ok(())
}

fn posix_lock_ops(d: &Path, r: &Report) -> io::Result<()> {
    let path = d.join("posix.txt");
    fs::write(&path, vec![b'p'; 512])?;
    let a = rw(&path)?;
    r.done(
        "posix_setlk",
        setlk(&a, libc::F_SETLK, libc::F_WRLCK, 0, 100),
    );
    // Locks belong to the process: its own second descriptor sees no conflict.
    let b = rw(&path)?;
    r.res(
        "posix_getlk_same_process",
        getlk(&b, libc::F_GETLK, libc::F_WRLCK, 0, 10),
    );
    // Another process does.
    let child_report = Report {
        prefix: r.prefix.clone(),
    };
    with_child(
        r,
        "posix_child",
        |ready| {
            let r = child_report;
            let Ok(c) = rw(&path) else { return 2 };
            r.res(
                "posix_child_getlk",
                getlk(&c, libc::F_GETLK, libc::F_WRLCK, 50, 10),
            );
            r.res(
                "posix_child_getlk_read",
                getlk(&c, libc::F_GETLK, libc::F_RDLCK, 99, 1),
            );
            r.done(
                "posix_child_setlk_conflict",
                setlk(&c, libc::F_SETLK, libc::F_WRLCK, 50, 10),
            );
            r.done(
                "posix_child_setlk_disjoint",
                setlk(&c, libc::F_SETLK, libc::F_WRLCK, 200, 10),
            );
            // Blocks until the parent unlocks, which it does only after this signal.
            ready.signal();
            r.done(
                "posix_child_setlkw",
                setlk(&c, libc::F_SETLKW, libc::F_WRLCK, 0, 1),
            );
            0
        },
        "posix_unlock_for_child",
        |ready| {
            ready.wait();
            pause();
            setlk(&a, libc::F_SETLK, libc::F_UNLCK, 0, 100)
        },
    );
    // The child's locks went with it.
    r.res(
        "posix_getlk_after_child",
        getlk(&a, libc::F_GETLK, libc::F_WRLCK, 0, 512),
    );
    r.done(
        "posix_read_lock",
        setlk(&a, libc::F_SETLK, libc::F_RDLCK, 0, 0),
    );
    // Closing any descriptor of the file drops the process's locks on it.
    drop(b);
    let child_report = Report {
        prefix: r.prefix.clone(),
    };
    with_child(
        r,
        "posix_after_close_child",
        |_| {
            let Ok(c) = rw(&path) else { return 2 };
            child_report.done(
                "posix_child_setlk_after_close",
                setlk(&c, libc::F_SETLK, libc::F_WRLCK, 0, 0),
            );
            0
        },
        "posix_after_close_parent",
        |_| Ok(()),
    );
    Ok(())
}

fn ofd_lock_ops(d: &Path, r: &Report) -> io::Result<()> {
    let path = d.join("ofd.txt");
    fs::write(&path, vec![b'o'; 64])?;
    // OFD locks belong to the open file description: two opens conflict in one process.
    let a = rw(&path)?;
    let b = rw(&path)?;
    r.done(
        "ofd_setlk",
        setlk(&a, libc::F_OFD_SETLK, libc::F_WRLCK, 0, 0),
    );
    r.done(
        "ofd_setlk_conflict",
        setlk(&b, libc::F_OFD_SETLK, libc::F_RDLCK, 0, 10),
    );
    r.res(
        "ofd_getlk",
        getlk(&b, libc::F_OFD_GETLK, libc::F_RDLCK, 5, 5),
    );
    r.done(
        "ofd_unlock",
        setlk(&a, libc::F_OFD_SETLK, libc::F_UNLCK, 0, 0),
    );
    r.done(
        "ofd_setlk_after_unlock",
        setlk(&b, libc::F_OFD_SETLK, libc::F_RDLCK, 0, 10),
    );
    r.done(
        "ofd_shared",
        setlk(&a, libc::F_OFD_SETLK, libc::F_RDLCK, 0, 10),
    );
    Ok(())
}

fn rename2_ops(d: &Path, r: &Report) -> io::Result<()> {
    let dir = d.join("ren");
    fs::create_dir(&dir)?;
    let (x, y, z) = (dir.join("x"), dir.join("y"), dir.join("z"));
    fs::write(&x, b"x")?;
    fs::write(&y, b"y")?;
    r.done(
        "rename_noreplace_existing",
        renameat2(&x, &y, libc::RENAME_NOREPLACE),
    );
    r.done(
        "rename_noreplace_new",
        renameat2(&x, &z, libc::RENAME_NOREPLACE),
    );
    r.done("rename_exchange", renameat2(&z, &y, libc::RENAME_EXCHANGE));
    r.line(
        "rename_exchanged",
        format!(
            "z:{},y:{}",
            fs::read_to_string(&z).unwrap_or_default(),
            fs::read_to_string(&y).unwrap_or_default()
        ),
    );
    r.done(
        "rename_exchange_missing",
        renameat2(&z, &dir.join("missing"), libc::RENAME_EXCHANGE),
    );
    r.done(
        "rename_both_flags",
        renameat2(&z, &y, libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE),
    );
    // A directory and a file trade places.
    let sub = dir.join("sub");
    fs::create_dir(&sub)?;
    fs::write(sub.join("inner"), b"inner")?;
    r.done(
        "rename_exchange_dir_file",
        renameat2(&sub, &z, libc::RENAME_EXCHANGE),
    );
    r.line(
        "rename_exchanged_types",
        format!("sub:{},z:{}", kind(&sub), kind(&z),),
    );
    r.res(
        "rename_exchanged_inner",
        fs::read_to_string(z.join("inner")),
    );
    Ok(())
}

fn kind(path: &Path) -> &'static str {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => "dir",
        Ok(m) if m.is_file() => "file",
        Ok(m) if m.file_type().is_fifo() => "fifo",
        Ok(m) if m.file_type().is_symlink() => "symlink",
        Ok(_) => "other",
        Err(_) => "missing",
    }
}

fn error_ops(d: &Path, r: &Report) -> io::Result<()> {
    let dir = d.join("errs");
    fs::create_dir(&dir)?;
    let file = dir.join("file");
    fs::write(&file, b"f")?;
    let full = dir.join("full");
    fs::create_dir(&full)?;
    fs::write(full.join("inside"), b"i")?;
    let empty = dir.join("empty");
    fs::create_dir(&empty)?;
    r.done("err_mkdir_exists", fs::create_dir(&full));
    r.done(
        "err_create_excl_exists",
        OpenOptions::new().write(true).create_new(true).open(&file),
    );
    r.done("err_open_missing", File::open(dir.join("missing")));
    r.done("err_unlink_missing", fs::remove_file(dir.join("missing")));
    r.done(
        "err_rename_missing",
        fs::rename(dir.join("missing"), dir.join("m2")),
    );
    r.done("err_rmdir_nonempty", fs::remove_dir(&full));
    r.done("err_rename_onto_nonempty_dir", fs::rename(&empty, &full));
    r.done("err_rename_file_onto_dir", fs::rename(&file, &empty));
    r.done("err_rename_dir_onto_file", fs::rename(&empty, &file));
    r.done("err_rmdir_file", fs::remove_dir(&file));
    r.done("err_unlink_dir", fs::remove_file(&empty));
    r.done("err_link_exists", fs::hard_link(&file, full.join("inside")));
    r.done("err_through_file", File::open(file.join("below")));
    r.done(
        "err_rename_into_self",
        fs::rename(&full, full.join("deeper")),
    );
    r.done(
        "rename_onto_empty_dir",
        fs::rename(&empty, dir.join("moved")),
    );
    Ok(())
}

fn seek_ops(d: &Path, r: &Report) -> io::Result<()> {
    const MIB: i64 = 1 << 20;
    let path = d.join("sparse.bin");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    f.write_all_at(&[b'a'; 4096], 0)?;
    f.write_all_at(&[b'b'; 4096], MIB as u64)?;
    r.done("fsync", f.sync_all());
    r.done("fdatasync", f.sync_data());
    r.line("sparse_size", f.metadata()?.len());
    r.res("seek_data_0", lseek(&f, 0, libc::SEEK_DATA));
    r.res("seek_hole_0", lseek(&f, 0, libc::SEEK_HOLE));
    r.res("seek_data_in_hole", lseek(&f, 8192, libc::SEEK_DATA));
    r.res("seek_hole_in_tail", lseek(&f, MIB, libc::SEEK_HOLE));
    r.res("seek_data_at_eof", lseek(&f, MIB + 4096, libc::SEEK_DATA));
    r.res("seek_hole_past_eof", lseek(&f, 2 * MIB, libc::SEEK_HOLE));
    r.res("seek_end", lseek(&f, -10, libc::SEEK_END));
    Ok(())
}

fn fallocate_ops(d: &Path, r: &Report) -> io::Result<()> {
    let path = d.join("falloc.bin");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    r.done("fallocate", fallocate(&f, 0, 0, 65536));
    r.line("fallocate_size", f.metadata()?.len());
    r.done(
        "fallocate_keep_size",
        fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 65536, 65536),
    );
    r.line("fallocate_keep_size_size", f.metadata()?.len());
    r.done("fallocate_grow", fallocate(&f, 0, 100_000, 1000));
    r.line("fallocate_grow_size", f.metadata()?.len());

    let path = d.join("punch.bin");
    let p = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    p.write_all_at(&[b'c'; 3 * 4096], 0)?;
    p.sync_all()?;
    r.done(
        "punch_hole",
        fallocate(
            &p,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            4096,
            4096,
        ),
    );
    r.done(
        "punch_hole_without_keep_size",
        fallocate(&p, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096),
    );
    r.line("punch_size", p.metadata()?.len());
    r.res("punch_seek_hole", lseek(&p, 0, libc::SEEK_HOLE));
    r.res("punch_seek_data", lseek(&p, 4096, libc::SEEK_DATA));
    let mut buf = vec![0xffu8; 3 * 4096];
    p.read_exact_at(&mut buf, 0)?;
    let zeros = buf.iter().filter(|&&b| b == 0).count();
    let cs = buf.iter().filter(|&&b| b == b'c').count();
    r.line("punch_content", format!("zeros:{zeros},c:{cs}"));
    Ok(())
}

fn copy_ops(d: &Path, r: &Report) -> io::Result<()> {
    let src_path = d.join("cfr-src.bin");
    let dst_path = d.join("cfr-dst.bin");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(&src_path, &data)?;
    let src = File::open(&src_path)?;
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&dst_path)?;
    r.res("cfr", copy_file_range(&src, 100, &dst, 50, 5000));
    r.line("cfr_dst_size", dst.metadata()?.len());
    let mut back = Vec::new();
    File::open(&dst_path)?.read_to_end(&mut back)?;
    let same =
        back.len() == 5050 && back[..50].iter().all(|&b| b == 0) && back[50..] == data[100..5100];
    r.line("cfr_content", if same { "match" } else { "differs" });
    r.res("cfr_past_eof", copy_file_range(&src, 20_000, &dst, 0, 100));
    let rw_src = rw(&src_path)?;
    r.res(
        "cfr_overlap_same_file",
        copy_file_range(&rw_src, 0, &rw_src, 10, 100),
    );
    Ok(())
}

fn sync_ops(d: &Path, r: &Report) -> io::Result<()> {
    let f = File::open(d.join("cfr-src.bin"))?;
    r.done("syncfs", syncfs(&f));
    r.done("fsyncdir", File::open(d)?.sync_all());
    Ok(())
}

fn fifo_ops(d: &Path, r: &Report) -> io::Result<()> {
    let fifo = d.join("fifo");
    r.done("mknod_fifo", mknod(&fifo, libc::S_IFIFO | 0o640));
    r.line("mknod_fifo_type", kind(&fifo));
    r.res(
        "mknod_fifo_mode",
        fs::symlink_metadata(&fifo).map(|m| format!("{:o}", m.mode() & 0o7777)),
    );
    r.done("mknod_fifo_again", mknod(&fifo, libc::S_IFIFO | 0o640));
    // The guest kernel runs the FIFO: no reader yet, so a non-blocking writer is refused,
    // and data written once a reader exists comes back out.
    r.done(
        "fifo_write_no_reader",
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo),
    );
    let pipe = (|| -> io::Result<String> {
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)?;
        let mut writer = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)?;
        writer.write_all(b"through-fifo")?;
        let mut buf = [0u8; 32];
        let n = reader.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })();
    r.res("fifo_data", pipe);
    let node = d.join("mknod-file");
    r.done("mknod_regular", mknod(&node, libc::S_IFREG | 0o600));
    r.line("mknod_regular_type", kind(&node));
    Ok(())
}

fn listing(d: &Path, r: &Report) -> io::Result<()> {
    let mut names: Vec<String> = fs::read_dir(d)?
        .map(|e| e.map(|e| format!("{}:{}", e.file_name().to_string_lossy(), kind(&e.path()))))
        .collect::<io::Result<_>>()?;
    names.sort();
    r.line("listing", names.join(","));
    Ok(())
}

/// One part of the workload, working in the directory it is given.
type Section = fn(&Path, &Report) -> io::Result<()>;

fn run(share: &Path, r: &Report) -> io::Result<()> {
    let d: PathBuf = share.join("ops");
    fs::create_dir(&d)?;
    let sections: [(&str, Section); 12] = [
        ("access", access_ops),
        ("xattr", xattr_ops),
        ("flock", flock_ops),
        ("posix_locks", posix_lock_ops),
        ("ofd_locks", ofd_lock_ops),
        ("rename2", rename2_ops),
        ("errors", error_ops),
        ("lseek", seek_ops),
        ("fallocate", fallocate_ops),
        ("copy_file_range", copy_ops),
        ("sync", sync_ops),
        ("fifo", fifo_ops),
    ];
    for (name, section) in sections {
        // A section that cannot even set up is one line, and the rest still run.
        if let Err(e) = section(&d, r) {
            r.line(&format!("section_{name}"), errno_name(&e));
        }
    }
    listing(&d, r)
}

/// Operations whose two ends are on different mounts: the guest kernel refuses them.
fn cross(a: &Path, b: &Path, r: &Report) -> io::Result<()> {
    let from = a.join("cross.txt");
    fs::write(&from, b"cross")?;
    r.done("cross_rename", fs::rename(&from, b.join("cross.txt")));
    r.done("cross_link", fs::hard_link(&from, b.join("cross-link.txt")));
    r.done(
        "cross_rename_exchange",
        renameat2(&from, &b.join("ops"), libc::RENAME_EXCHANGE),
    );
    r.line("cross_source_kept", kind(&from));
    r.line("cross_target_absent", kind(&b.join("cross.txt")));
    fs::remove_file(&from)
}

fn main() -> ExitCode {
    // Modes in results are what was asked for, not what a umask left.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["run", dir, prefix] => run(
            Path::new(dir),
            &Report {
                prefix: prefix.to_owned(),
            },
        ),
        ["cross", a, b, prefix] => cross(
            Path::new(a),
            Path::new(b),
            &Report {
                prefix: prefix.to_owned(),
            },
        ),
        _ => {
            eprintln!("usage: guest-fs-ops run DIR PREFIX | guest-fs-ops cross DIR_A DIR_B PREFIX");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-fs-ops: {e}");
            ExitCode::FAILURE
        }
    }
}
