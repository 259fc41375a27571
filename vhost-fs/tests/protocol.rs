//! FUSE over vhost-user without a VM: testkit's FUSE client drives the vhost-fs process
//! through its socket, and every effect is checked from the host.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::daemon::Daemon;
use testkit::fuse_client::{
    init_flags, opcode, vhost_fs_command, Args, ClientOptions, FileLock, FuseClient, FATTR_SIZE,
    HIPRIO, LK_FLOCK, ROOT_ID,
};

/// A vhost-fs process serving `share`, with a sibling directory `outside` that the guest
/// must never reach, and a connected, initialised client.
struct Fixture {
    _dir: tempfile::TempDir,
    share: PathBuf,
    outside: PathBuf,
    daemon: Daemon,
    client: FuseClient,
}

fn start(extra: &[&str]) -> Fixture {
    start_with(extra, ClientOptions::default(), |_| {})
}

/// [`start`] with client options, and `prepare` run on the share before the daemon starts.
fn start_with(extra: &[&str], opts: ClientOptions, prepare: impl FnOnce(&Path)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&share).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    prepare(&share);
    let socket = dir.path().join("fs.sock");
    let daemon = vhost_fs_command(&socket, &share)
        .unwrap()
        .args(extra)
        .spawn()
        .unwrap();
    let mut client = FuseClient::connect(&socket, opts).unwrap();
    client.init().unwrap();
    Fixture {
        _dir: dir,
        share,
        outside,
        daemon,
        client,
    }
}

impl Fixture {
    /// The daemon is still running and answers a GETATTR of the root.
    fn assert_alive(&mut self) {
        assert!(
            self.daemon.try_wait().unwrap().is_none(),
            "daemon exited:\n{}",
            self.daemon.output()
        );
        self.client
            .getattr(ROOT_ID)
            .expect("daemon stopped serving");
    }

    /// The outside directory holds exactly the secret, unchanged.
    fn assert_outside_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
        assert_eq!(
            std::fs::read(self.outside.join("secret")).unwrap(),
            b"host secret"
        );
        let parent = self.share.parent().unwrap();
        let mut top: Vec<_> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(top, ["fs.sock", "outside", "share"]);
    }
}

fn errno(r: std::io::Result<impl std::fmt::Debug>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("not an errno: {e}")),
    }
}

const RW_CREATE: u32 = libc::O_RDWR as u32;
const LONG: Duration = Duration::from_secs(10);

#[test]
fn init_lookup_getattr_create_write_read() {
    let mut f = start(&[]);
    let c = &mut f.client;
    assert_eq!(c.max_write, 1 << 20);
    let root = c.getattr(ROOT_ID).unwrap();
    assert_eq!(root.ino, std::fs::metadata(&f.share).unwrap().ino());
    assert_eq!(root.mode & libc::S_IFMT, libc::S_IFDIR);

    let (e, fh) = c.create(ROOT_ID, b"file", 0o640, RW_CREATE).unwrap();
    assert_eq!(e.attr.mode, libc::S_IFREG | 0o640);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        c.write(e.nodeid, fh, 4096, &data).unwrap(),
        data.len() as u32
    );
    let host = std::fs::read(f.share.join("file")).unwrap();
    assert_eq!(host.len(), 4096 + data.len());
    assert_eq!(&host[4096..], &data[..]);
    // Reads span the hole, the data and stop at the end of the file.
    let back = c.read(e.nodeid, fh, 0, 128 * 1024).unwrap();
    assert_eq!(back.len(), 4096 + data.len());
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..], &data[..]);
    let tail = c
        .read(e.nodeid, fh, (4096 + data.len() - 10) as u64, 4096)
        .unwrap();
    assert_eq!(tail, &data[data.len() - 10..]);
    let looked = c.lookup(ROOT_ID, b"file").unwrap();
    assert_eq!(looked.nodeid, e.nodeid);
    assert_eq!(c.getattr(e.nodeid).unwrap().size, host.len() as u64);
    // Truncate through SETATTR.
    assert_eq!(c.setattr(e.nodeid, FATTR_SIZE, 10, 0).unwrap().size, 10);
    assert_eq!(std::fs::metadata(f.share.join("file")).unwrap().len(), 10);
    c.release(e.nodeid, fh).unwrap();
    assert_eq!(errno(c.lookup(ROOT_ID, b"missing")), libc::ENOENT);
    // A handle that was released is gone.
    assert_eq!(errno(c.read(e.nodeid, fh, 0, 10)), libc::EBADF);
}

#[test]
fn readdirplus_lists_every_entry_with_attributes() {
    let mut f = start(&[]);
    for i in 0..300 {
        std::fs::write(f.share.join(format!("f{i:03}")), vec![1u8; i]).unwrap();
    }
    std::fs::create_dir(f.share.join("sub")).unwrap();
    // Small chunks, so the listing takes many calls and offsets must resume correctly.
    let all = f.client.readdir_all(ROOT_ID, true, 4096).unwrap();
    let mut names: Vec<String> = all
        .iter()
        .map(|d| String::from_utf8(d.name.clone()).unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..300).map(|i| format!("f{i:03}")).collect();
    want.extend([".".into(), "..".into(), "sub".into()]);
    want.sort();
    assert_eq!(names, want);
    for d in &all {
        let e = d.entry.unwrap();
        match &d.name[..] {
            b"." | b".." => assert_eq!(e.nodeid, 0),
            b"sub" => assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFDIR),
            name => {
                let i: usize = std::str::from_utf8(&name[1..]).unwrap().parse().unwrap();
                assert_eq!(e.attr.size, i as u64);
                assert_ne!(e.nodeid, 0);
            }
        }
    }
    let plain = f.client.readdir_all(ROOT_ID, false, 8192).unwrap();
    assert_eq!(plain.len(), all.len());
    assert!(plain.iter().all(|d| d.entry.is_none()));
}

#[test]
fn rename2_noreplace_and_exchange() {
    let mut f = start(&[]);
    std::fs::write(f.share.join("a"), b"A").unwrap();
    std::fs::write(f.share.join("b"), b"B").unwrap();
    let c = &mut f.client;
    assert_eq!(
        errno(c.rename2(ROOT_ID, b"a", ROOT_ID, b"b", libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    assert_eq!(std::fs::read(f.share.join("b")).unwrap(), b"B");
    c.rename2(ROOT_ID, b"a", ROOT_ID, b"b", libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(std::fs::read(f.share.join("a")).unwrap(), b"B");
    assert_eq!(std::fs::read(f.share.join("b")).unwrap(), b"A");
    let d = c.mkdir(ROOT_ID, b"d", 0o755).unwrap();
    c.rename2(ROOT_ID, b"a", d.nodeid, b"moved", libc::RENAME_NOREPLACE)
        .unwrap();
    assert_eq!(std::fs::read(f.share.join("d/moved")).unwrap(), b"B");
    assert_eq!(
        errno(c.rename2(ROOT_ID, b"a", ROOT_ID, b"z", 0)),
        libc::ENOENT
    );
    // Unknown flags are refused.
    assert_eq!(
        errno(c.rename2(ROOT_ID, b"b", ROOT_ID, b"c", 1 << 7)),
        libc::EINVAL
    );
}

#[test]
fn posix_locks_conflict_and_flock() {
    let mut f = start(&[]);
    let c = &mut f.client;
    let (e, fh1) = c.create(ROOT_ID, b"locked", 0o644, RW_CREATE).unwrap();
    let fh2 = c.open(e.nodeid, libc::O_RDWR as u32).unwrap();
    let wr = |start, end| FileLock {
        start,
        end,
        typ: libc::F_WRLCK as u32,
        pid: 1,
    };
    c.setlk(e.nodeid, fh1, 1, wr(0, 99), 0).unwrap();
    assert_eq!(
        errno(c.setlk(e.nodeid, fh2, 2, wr(50, 60), 0)),
        libc::EAGAIN
    );
    // A range that does not overlap is free.
    c.setlk(e.nodeid, fh2, 2, wr(100, 200), 0).unwrap();
    let seen = c.getlk(e.nodeid, fh2, 2, wr(0, 10)).unwrap();
    assert_eq!(seen.typ, libc::F_WRLCK as u32);
    assert_eq!((seen.start, seen.end), (0, 99));
    let free = c.getlk(e.nodeid, fh2, 2, wr(300, 400)).unwrap();
    assert_eq!(free.typ, libc::F_UNLCK as u32);
    let unlock = FileLock {
        typ: libc::F_UNLCK as u32,
        ..wr(0, 99)
    };
    c.setlk(e.nodeid, fh1, 1, unlock, 0).unwrap();
    c.setlk(e.nodeid, fh2, 2, wr(50, 60), 0).unwrap();

    // BSD flock: exclusive on one handle excludes the other.
    let ex = wr(0, u64::MAX);
    c.setlk(e.nodeid, fh1, 1, ex, LK_FLOCK).unwrap();
    assert_eq!(
        errno(c.setlk(e.nodeid, fh2, 2, ex, LK_FLOCK)),
        libc::EWOULDBLOCK
    );
    // The host sees the flock too.
    let host = std::fs::File::open(f.share.join("locked")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(host.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, -1);
    c.setlk(
        e.nodeid,
        fh1,
        1,
        FileLock {
            typ: libc::F_UNLCK as u32,
            ..ex
        },
        LK_FLOCK,
    )
    .unwrap();
    c.setlk(e.nodeid, fh2, 2, ex, LK_FLOCK).unwrap();
}

/// Sends INTERRUPT of `target` on the high-priority queue with room for a reply (the
/// kernel's INTERRUPT can be answered EAGAIN); returns its own request id.
fn send_interrupt(c: &mut FuseClient, target: u64) -> u64 {
    let args = Args::new().u64(target);
    c.start_on(HIPRIO, opcode::INTERRUPT, 0, &args.0, &[], 64, true)
        .unwrap()
}

#[test]
fn interrupt_ends_a_blocked_setlkw() {
    let mut f = start(&[]);
    let c = &mut f.client;
    let (e, fh1) = c.create(ROOT_ID, b"wait", 0o644, RW_CREATE).unwrap();
    let fh2 = c.open(e.nodeid, libc::O_RDWR as u32).unwrap();
    let wr = FileLock {
        start: 0,
        end: 9,
        typ: libc::F_WRLCK as u32,
        pid: 1,
    };
    let unlock = FileLock {
        typ: libc::F_UNLCK as u32,
        ..wr
    };
    c.setlk(e.nodeid, fh1, 1, wr, 0).unwrap();
    let args = FuseClient::lk_args(fh2, 2, wr, 0);
    let waiting = c.start(opcode::SETLKW, e.nodeid, &args.0, &[], 64).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!c.is_done(waiting), "SETLKW did not block");
    // Other requests are still served while it blocks.
    c.getattr(e.nodeid).unwrap();
    // One INTERRUPT is enough: the request is answered EINTR, the INTERRUPT gets no reply.
    let int = send_interrupt(c, waiting);
    assert_eq!(c.wait(waiting, LONG).unwrap().error, -libc::EINTR);
    let r = c.wait(int, LONG).unwrap();
    assert_eq!(
        r.used_len, 0,
        "an INTERRUPT that found its request is not answered"
    );

    // An INTERRUPT naming nothing in flight (a request answered already, or an id never
    // used) is answered EAGAIN with its own id and nothing else (fuse.rst, "Interrupting
    // filesystem operations"): the kernel requeues it if the original is still pending.
    let answered = c
        .start(opcode::GETATTR, e.nodeid, &[0; 16], &[], 256)
        .unwrap();
    assert_eq!(c.wait(answered, LONG).unwrap().error, 0);
    for target in [answered, 0xdead_0000] {
        let int = send_interrupt(c, target);
        let r = c.wait(int, LONG).unwrap();
        assert_eq!(
            (r.error, r.unique, r.used_len),
            (-libc::EAGAIN, int, 16),
            "INTERRUPT of {target:#x}"
        );
    }

    // The INTERRUPT overtakes its SETLKW (it travels on the high-priority queue): it is
    // sent first, naming the id the SETLKW gets next. Like the kernel, the client sends it
    // again whenever it is answered EAGAIN while the SETLKW is still pending.
    let target = c.next_unique() + 1;
    let mut int = send_interrupt(c, target);
    let overtaken = c.start(opcode::SETLKW, e.nodeid, &args.0, &[], 64).unwrap();
    assert_eq!(overtaken, target);
    let mut resent = 0;
    loop {
        let r = c.wait(int, LONG).unwrap();
        if r.used_len == 0 || c.is_done(overtaken) {
            break;
        }
        assert_eq!(r.error, -libc::EAGAIN);
        resent += 1;
        assert!(resent < 100, "the SETLKW never showed up for its INTERRUPT");
        int = send_interrupt(c, target);
    }
    assert_eq!(c.wait(overtaken, LONG).unwrap().error, -libc::EINTR);

    // The lock holder is unaffected and the waiter can retry once it is released.
    c.setlk(e.nodeid, fh1, 1, unlock, 0).unwrap();
    let again = c.start(opcode::SETLKW, e.nodeid, &args.0, &[], 64).unwrap();
    assert_eq!(c.wait(again, LONG).unwrap().error, 0);
    f.assert_alive();
}

/// Takes a read lease on `path` for this process: an open for writing (by anyone else)
/// then blocks until the lease is given up (or /proc/sys/fs/lease-break-time passes).
/// The break is signalled with SIGURG, which is ignored by default, not SIGIO, which would
/// kill the test.
fn read_lease(path: &Path) -> std::fs::File {
    // <fcntl.h>'s F_SETSIG, which the libc crate does not export.
    const F_SETSIG: i32 = 10;
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    unsafe {
        assert_eq!(libc::fcntl(file.as_raw_fd(), F_SETSIG, libc::SIGURG), 0);
        assert_eq!(
            libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK),
            0,
            "F_SETLEASE: {}",
            std::io::Error::last_os_error()
        );
    }
    file
}

fn give_up_lease(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: as in `read_lease`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    assert_eq!(r, 0);
}

/// `--thread-pool-size`: an OPEN that blocks in the host kernel (it waits for a lease we
/// hold to be given up) holds up one pool thread, not its queue: later requests on the
/// same queue are answered meanwhile. Without the pool the same OPEN holds up the queue,
/// which is what the flag is for.
#[test]
fn thread_pool_serves_a_queue_past_a_blocked_open() {
    for pool in ["2", "0"] {
        let mut f = start(&["--thread-pool-size", pool]);
        std::fs::write(f.share.join("leased"), b"x").unwrap();
        let lease = read_lease(&f.share.join("leased"));
        let c = &mut f.client;
        let e = c.lookup(ROOT_ID, b"leased").unwrap();
        let open_args = Args::new().u32(libc::O_RDWR as u32).u32(0);
        let open = c
            .start(opcode::OPEN, e.nodeid, &open_args.0, &[], 64)
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !c.is_done(open),
            "pool {pool}: OPEN did not wait for the lease"
        );
        let getattr = c
            .start(opcode::GETATTR, ROOT_ID, &[0; 16], &[], 256)
            .unwrap();
        if pool == "0" {
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !c.is_done(getattr),
                "without a pool the queue should be held up"
            );
            give_up_lease(&lease);
            assert_eq!(c.wait(open, LONG).unwrap().error, 0);
            assert_eq!(c.wait(getattr, LONG).unwrap().error, 0);
            continue;
        }
        assert_eq!(c.wait(getattr, LONG).unwrap().error, 0);
        // More of everything while the OPEN still waits: metadata on the pool, data on
        // the queue's engine.
        let d = c.mkdir(ROOT_ID, b"d", 0o755).unwrap();
        let (file, fh) = c.create(d.nodeid, b"f", 0o644, RW_CREATE).unwrap();
        c.write(file.nodeid, fh, 0, b"while blocked").unwrap();
        assert_eq!(c.read(file.nodeid, fh, 0, 64).unwrap(), b"while blocked");
        assert!(!c.is_done(open), "the lease was given up behind our back");
        give_up_lease(&lease);
        let r = c.wait(open, LONG).unwrap();
        assert_eq!(r.error, 0);
        assert_eq!(
            std::fs::read(f.share.join("d/f")).unwrap(),
            b"while blocked"
        );
        f.assert_alive();
    }
}

/// Many requests at once on two queues, served by a pool of three threads: every reply
/// comes back, matched to its request, and every effect is on the host.
#[test]
fn thread_pool_serves_many_concurrent_requests() {
    let opts = ClientOptions {
        request_queues: 2,
        slots: 32,
        ..ClientOptions::default()
    };
    let mut f = start_with(&["--thread-pool-size", "3", "--queues", "2"], opts, |_| {});
    let c = &mut f.client;
    let mut dirs = Vec::new();
    for round in 0..4 {
        let mut in_flight = Vec::new();
        for i in 0..32 {
            let name = format!("d{round}-{i}");
            let args = Args::new().u32(0o755).u32(0).name(name.as_bytes());
            let queue = 1 + i % 2;
            let u = c
                .start_on(queue, opcode::MKDIR, ROOT_ID, &args.0, &[], 256, true)
                .unwrap();
            in_flight.push((u, name));
        }
        for (u, name) in in_flight {
            let r = c.wait(u, LONG).unwrap();
            assert_eq!((r.error, r.unique), (0, u), "{name}");
            let nodeid = u64::from_le_bytes(r.body[..8].try_into().unwrap());
            dirs.push((nodeid, name));
        }
    }
    // Lookups and getattrs of all of them, all in flight at once.
    for chunk in dirs.chunks(16) {
        let mut in_flight = Vec::new();
        for (i, (nodeid, name)) in chunk.iter().enumerate() {
            let args = Args::new().name(name.as_bytes());
            let l = c
                .start_on(1 + i % 2, opcode::LOOKUP, ROOT_ID, &args.0, &[], 256, true)
                .unwrap();
            let g = c
                .start_on(
                    2 - i % 2,
                    opcode::GETATTR,
                    *nodeid,
                    &[0; 16],
                    &[],
                    256,
                    true,
                )
                .unwrap();
            in_flight.push((l, g, *nodeid));
        }
        for (l, g, nodeid) in in_flight {
            let r = c.wait(l, LONG).unwrap();
            assert_eq!(r.error, 0);
            assert_eq!(u64::from_le_bytes(r.body[..8].try_into().unwrap()), nodeid);
            let r = c.wait(g, LONG).unwrap();
            assert_eq!(r.error, 0);
            // fuse_attr_out: valid (8), valid_nsec, dummy, then fuse_attr (mode at 60).
            let mode = u32::from_le_bytes(r.body[16 + 60..16 + 64].try_into().unwrap());
            assert_eq!(mode & libc::S_IFMT, libc::S_IFDIR);
        }
    }
    let on_host = std::fs::read_dir(&f.share).unwrap().count();
    assert_eq!(on_host, dirs.len());
    f.assert_alive();
}

/// Mounts a tmpfs on `dir` until dropped (lazily unmounted: the daemon may still hold a
/// descriptor in it).
struct TmpfsMount(CString);

impl TmpfsMount {
    fn new(dir: &Path) -> Self {
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=1m".as_ptr().cast(),
            )
        };
        assert_eq!(
            r,
            0,
            "mounting a tmpfs needs root: {}",
            std::io::Error::last_os_error()
        );
        TmpfsMount(target)
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
    }
}

/// `fuse_attr.flags` of a LOOKUP reply (`fuse_entry_out`: 40 bytes, then `fuse_attr`
/// with `flags` at 84).
fn lookup_attr_flags(c: &mut FuseClient, parent: u64, name: &[u8]) -> u32 {
    let r = c
        .call(opcode::LOOKUP, parent, &Args::new().name(name).0, &[], 256)
        .unwrap();
    assert_eq!(r.error, 0, "LOOKUP {name:?}");
    u32::from_le_bytes(r.body[40 + 84..40 + 88].try_into().unwrap())
}

const INIT_SUBMOUNTS: u64 = 1 << 27;
const ATTR_SUBMOUNT: u32 = 1;

/// Submounts are announced by default, as virtiofsd does (`--announce-submounts` says so
/// explicitly): SUBMOUNTS is negotiated in INIT, and a directory on another device than
/// its parent (a tmpfs mounted inside the share) carries FUSE_ATTR_SUBMOUNT, so the guest
/// gives it its own st_dev. Other directories do not, and with `--no-announce-submounts`
/// (or when the guest does not offer SUBMOUNTS) nothing is announced.
#[test]
fn announce_submounts_marks_mount_points() {
    let mut f = start_with(&[], ClientOptions::default(), |share| {
        std::fs::create_dir(share.join("mnt")).unwrap();
        std::fs::create_dir(share.join("plain")).unwrap();
    });
    let _mount = TmpfsMount::new(&f.share.join("mnt"));
    std::fs::create_dir(f.share.join("mnt/inner")).unwrap();
    let st_dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
    assert_ne!(st_dev(&f.share.join("mnt")), st_dev(&f.share));
    let c = &mut f.client;
    let want = init_flags::DEFAULT | INIT_SUBMOUNTS;
    let got = c.init_with(want).unwrap();
    assert_ne!(
        got & INIT_SUBMOUNTS,
        0,
        "SUBMOUNTS not negotiated: {got:#x}"
    );
    assert_eq!(
        lookup_attr_flags(c, ROOT_ID, b"mnt") & ATTR_SUBMOUNT,
        ATTR_SUBMOUNT
    );
    assert_eq!(lookup_attr_flags(c, ROOT_ID, b"plain") & ATTR_SUBMOUNT, 0);
    // Inside the submount, a directory on the same device is not a mount point.
    let m = c.lookup(ROOT_ID, b"mnt").unwrap();
    assert_eq!(lookup_attr_flags(c, m.nodeid, b"inner") & ATTR_SUBMOUNT, 0);
    // A guest that does not offer SUBMOUNTS is told nothing.
    let got = c.init_with(init_flags::DEFAULT).unwrap();
    assert_eq!(got & INIT_SUBMOUNTS, 0);
    assert_eq!(lookup_attr_flags(c, ROOT_ID, b"mnt") & ATTR_SUBMOUNT, 0);

    // With --no-announce-submounts, nothing is announced either.
    let mut plain = start_with(
        &["--no-announce-submounts"],
        ClientOptions::default(),
        |share| {
            std::fs::create_dir(share.join("mnt")).unwrap();
        },
    );
    let _mount2 = TmpfsMount::new(&plain.share.join("mnt"));
    let got = plain.client.init_with(want).unwrap();
    assert_eq!(got & INIT_SUBMOUNTS, 0);
    assert_eq!(
        lookup_attr_flags(&mut plain.client, ROOT_ID, b"mnt") & ATTR_SUBMOUNT,
        0
    );
}

#[test]
fn xattrs_need_the_flag() {
    let mut f = start(&["--xattr"]);
    let c = &mut f.client;
    let (e, fh) = c.create(ROOT_ID, b"x", 0o644, RW_CREATE).unwrap();
    c.release(e.nodeid, fh).unwrap();
    c.setxattr(e.nodeid, b"user.color", b"blue").unwrap();
    let size = c.getxattr(e.nodeid, b"user.color", 0).unwrap();
    assert_eq!(u32::from_le_bytes(size[..4].try_into().unwrap()), 4);
    assert_eq!(c.getxattr(e.nodeid, b"user.color", 64).unwrap(), b"blue");
    let list = c.listxattr(e.nodeid, 256).unwrap();
    assert!(list.split(|&b| b == 0).any(|n| n == b"user.color"));
    // The host sees it.
    let path = CString::new(f.share.join("x").as_os_str().as_bytes()).unwrap();
    let mut buf = [0u8; 16];
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.color".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n as usize], b"blue");
    c.removexattr(e.nodeid, b"user.color").unwrap();
    assert_eq!(
        errno(c.getxattr(e.nodeid, b"user.color", 64)),
        libc::ENODATA
    );
    // Without --xattr, the guest is told xattrs are not supported.
    let mut plain = start(&[]);
    let (e, _) = plain
        .client
        .create(ROOT_ID, b"y", 0o644, RW_CREATE)
        .unwrap();
    assert_eq!(
        errno(plain.client.setxattr(e.nodeid, b"user.a", b"1")),
        libc::ENOSYS
    );
}

#[test]
fn lseek_copy_file_range_fallocate_statfs_syncfs() {
    let mut f = start(&[]);
    let c = &mut f.client;
    let (e, fh) = c.create(ROOT_ID, b"sparse", 0o644, RW_CREATE).unwrap();
    c.write(e.nodeid, fh, 1 << 20, &[7u8; 4096]).unwrap();
    c.fsync(e.nodeid, fh).unwrap();
    // Compare with what the host's lseek says on the same file.
    let host = std::fs::File::open(f.share.join("sparse")).unwrap();
    use std::os::fd::AsRawFd;
    let host_seek = |off: i64, whence| {
        // SAFETY: lseek on a descriptor we own.
        unsafe { libc::lseek(host.as_raw_fd(), off, whence) as u64 }
    };
    for (off, whence) in [
        (0, libc::SEEK_DATA),
        (0, libc::SEEK_HOLE),
        (1 << 20, libc::SEEK_HOLE),
    ] {
        assert_eq!(
            c.lseek(e.nodeid, fh, off as u64, whence as u32).unwrap(),
            host_seek(off, whence),
            "lseek({off}, {whence})"
        );
    }
    assert_eq!(
        errno(c.lseek(e.nodeid, fh, 2 << 20, libc::SEEK_DATA as u32)),
        libc::ENXIO
    );

    let (e2, fh2) = c.create(ROOT_ID, b"copy", 0o644, RW_CREATE).unwrap();
    let n = c
        .copy_file_range(e.nodeid, fh, 1 << 20, e2.nodeid, fh2, 100, 4096)
        .unwrap();
    assert_eq!(n, 4096);
    let copied = std::fs::read(f.share.join("copy")).unwrap();
    assert_eq!(copied.len(), 4196);
    assert!(copied[100..].iter().all(|&b| b == 7));

    c.fallocate(e2.nodeid, fh2, 0, 3 << 20, 0).unwrap();
    let m = std::fs::metadata(f.share.join("copy")).unwrap();
    assert_eq!(m.len(), 3 << 20);
    assert!(m.blocks() * 512 >= 3 << 20, "not allocated");
    c.fallocate(
        e2.nodeid,
        fh2,
        0,
        1 << 20,
        (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
    )
    .unwrap();
    let m2 = std::fs::metadata(f.share.join("copy")).unwrap();
    assert_eq!(m2.len(), 3 << 20);
    assert!(m2.blocks() < m.blocks(), "hole not punched");

    let st = c.statfs(ROOT_ID).unwrap();
    let path = CString::new(f.share.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed struct we own.
    let host_st = unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(path.as_ptr(), &mut s), 0);
        s
    };
    assert_eq!(st.blocks, host_st.f_blocks);
    assert_eq!(u64::from(st.bsize), host_st.f_bsize);
    assert_eq!(u64::from(st.namelen), host_st.f_namemax);
    c.syncfs().unwrap();
}

#[test]
fn malformed_messages_get_errors_and_the_daemon_survives() {
    let mut f = start(&[]);
    let c = &mut f.client;
    let reply_room = 4096;
    // The header's length says more than arrived.
    let u = c.next_unique();
    let mut h = c.header(200, opcode::LOOKUP, u, ROOT_ID);
    let u = c.start_raw(1, &[&h, b"name\0"], reply_room, true).unwrap();
    let r = c.wait(u, LONG).unwrap();
    assert_eq!((r.error, r.unique), (-libc::EINVAL, u));
    // A name without its NUL.
    let u = c.next_unique();
    h = c.header(44, opcode::LOOKUP, u, ROOT_ID);
    let r = c.start_raw(1, &[&h, b"name"], reply_room, true).unwrap();
    assert_eq!(c.wait(r, LONG).unwrap().error, -libc::EINVAL);
    // Arguments cut short, for every opcode that has fixed arguments.
    for op in [
        opcode::GETATTR,
        opcode::SETATTR,
        opcode::OPEN,
        opcode::READ,
        opcode::WRITE,
        opcode::CREATE,
        opcode::MKNOD,
        opcode::RENAME2,
        opcode::SETLK,
        opcode::GETLK,
        opcode::LSEEK,
        opcode::FALLOCATE,
        opcode::COPY_FILE_RANGE,
        opcode::SETXATTR,
    ] {
        let u = c.next_unique();
        let h = c.header(43, op, u, ROOT_ID);
        let r = c.start_raw(1, &[&h, &[1, 2, 3]], reply_room, true).unwrap();
        assert_eq!(c.wait(r, LONG).unwrap().error, -libc::EINVAL, "opcode {op}");
    }
    // A READ larger than we announced.
    let args = FuseClient::read_args(0, 0, 64 << 20);
    let r = c.call(opcode::READ, ROOT_ID, &args.0, &[], 64).unwrap();
    assert_eq!(r.error, -libc::E2BIG);
    // Unknown opcodes are ENOSYS.
    let r = c.call(9999, ROOT_ID, &[], &[], 64).unwrap();
    assert_eq!(r.error, -libc::ENOSYS);
    // Shorter than a header: no reply, the chain comes back empty.
    let r = c.start_raw(1, &[&[0u8; 12]], reply_room, true).unwrap();
    assert_eq!(c.wait(r, LONG).unwrap().used_len, 0);
    // No room for even the reply header.
    let args = FuseClient::read_args(0, 0, 8);
    let r = c
        .start(opcode::GETATTR, ROOT_ID, &args.0[..16], &[], 8)
        .unwrap();
    assert_eq!(c.wait(r, LONG).unwrap().used_len, 0);
    f.assert_alive();
}

#[test]
fn malformed_chains_are_refused_and_the_daemon_survives() {
    use testkit::fuse_client::transport::Segment;
    let mut f = start(&[]);
    let c = &mut f.client;
    let size = c.transport().memory_size();
    let scratch = c.transport().alloc(4096).unwrap();
    let h = c.header(56, opcode::GETATTR, 999, ROOT_ID);
    scratch.write(0, &h);
    scratch.write(40, &[0; 16]);
    let chains: Vec<Vec<Segment>> = vec![
        // A writable descriptor before the readable one.
        vec![
            Segment {
                gpa: scratch.gpa + 1024,
                len: 1024,
                writable: true,
            },
            Segment {
                gpa: scratch.gpa,
                len: 56,
                writable: false,
            },
        ],
        // The request lies outside guest memory.
        vec![
            Segment {
                gpa: size + 4096,
                len: 56,
                writable: false,
            },
            Segment {
                gpa: scratch.gpa + 1024,
                len: 1024,
                writable: true,
            },
        ],
        // The reply buffer runs off the end of guest memory.
        vec![
            Segment {
                gpa: scratch.gpa,
                len: 56,
                writable: false,
            },
            Segment {
                gpa: size - 8,
                len: 4096,
                writable: true,
            },
        ],
        // A length that wraps the address space.
        vec![
            Segment {
                gpa: u64::MAX - 16,
                len: 56,
                writable: false,
            },
            Segment {
                gpa: scratch.gpa + 1024,
                len: 1024,
                writable: true,
            },
        ],
    ];
    for chain in &chains {
        let t = c.transport();
        t.add_chain(1, chain).unwrap();
        t.force_kick(1).unwrap();
        let used = t.wait_used(1, LONG).unwrap();
        assert!(
            used.len <= 16,
            "{chain:?}: device claims {} bytes",
            used.len
        );
    }
    f.assert_alive();
}

/// A driver whose avail index runs more than a ring ahead gets that queue stopped, not a
/// worker spinning on it while holding its lock (the frontend's disconnect then never
/// finished, so the daemon never exited).
#[test]
fn a_corrupt_avail_index_stops_its_queue_and_the_daemon_still_ends_cleanly() {
    let mut f = start(&[]);
    let t = f.client.transport();
    t.corrupt_avail_index(1, 1000);
    t.force_kick(1).unwrap();
    let deadline = std::time::Instant::now() + LONG;
    while !f.daemon.output().contains("1000 chains ahead") {
        assert!(
            std::time::Instant::now() < deadline,
            "the bad index was not reported:\n{}",
            f.daemon.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        f.daemon.try_wait().unwrap().is_none(),
        "daemon exited:\n{}",
        f.daemon.output()
    );
    // Like virtiofsd, vhost-fs exits when its frontend goes away.
    drop(f.client);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = f.daemon.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not end within 20 s of the disconnect:\n{}",
            f.daemon.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}\n{}", f.daemon.output());
}

#[test]
fn init_again_without_destroy_resets_the_session() {
    let mut f = start(&[]);
    let c = &mut f.client;
    let (e, fh) = c.create(ROOT_ID, b"held", 0o644, RW_CREATE).unwrap();
    c.write(e.nodeid, fh, 0, b"data").unwrap();
    c.init().unwrap();
    // The old node ids and handles are gone; the root and the file's data are not.
    assert_eq!(errno(c.getattr(e.nodeid)), libc::EBADF);
    assert_eq!(errno(c.read(e.nodeid, fh, 0, 4)), libc::EBADF);
    let again = c.lookup(ROOT_ID, b"held").unwrap();
    let fh = c.open(again.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(again.nodeid, fh, 0, 4).unwrap(), b"data");
    // DESTROY, then nothing but INIT is served.
    c.destroy().unwrap();
    assert_eq!(errno(c.getattr(ROOT_ID)), libc::EIO);
    c.init().unwrap();
    c.getattr(ROOT_ID).unwrap();
}

#[test]
fn escape_attempts_fail_and_leave_the_host_untouched() {
    let mut f = start(&[]);
    let outside = f.outside.clone();
    std::fs::create_dir(f.share.join("sub")).unwrap();
    // Host-made symlinks pointing out of the share.
    std::os::unix::fs::symlink(&outside, f.share.join("to_outside")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), f.share.join("to_secret")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", f.share.join("relative")).unwrap();
    let fifo = CString::new(f.share.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let c = &mut f.client;

    // Names are one component.
    for name in [
        &b"../outside"[..],
        b"sub/../../outside",
        b"/etc",
        b"a/b",
        b"",
    ] {
        assert_eq!(errno(c.lookup(ROOT_ID, name)), libc::EINVAL, "{name:?}");
        assert_eq!(
            errno(c.create(ROOT_ID, name, 0o644, RW_CREATE)),
            libc::EINVAL
        );
        assert_eq!(errno(c.mkdir(ROOT_ID, name, 0o755)), libc::EINVAL);
    }
    // `..` of the root is the root.
    let up = c.lookup(ROOT_ID, b"..").unwrap();
    assert_eq!(up.attr.ino, std::fs::metadata(&f.share).unwrap().ino());
    let up2 = c.lookup(up.nodeid, b"..").unwrap();
    assert_eq!(up2.attr.ino, up.attr.ino);
    assert_eq!(errno(c.lookup(up.nodeid, b"outside")), libc::ENOENT);
    // Creating, removing or renaming `.` and `..` is refused.
    assert_eq!(errno(c.mkdir(ROOT_ID, b"..", 0o755)), libc::EINVAL);
    assert_eq!(errno(c.unlink(ROOT_ID, b"..")), libc::EINVAL);
    assert_eq!(
        errno(c.rename2(ROOT_ID, b"sub", ROOT_ID, b"..", 0)),
        libc::EINVAL
    );

    // Symlinks are never followed: not by lookup, open, create, setattr or xattr.
    let link = c.lookup(ROOT_ID, b"to_outside").unwrap();
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_ne!(errno(c.lookup(link.nodeid, b"secret")), 0);
    assert_ne!(errno(c.opendir(link.nodeid)), 0);
    assert_ne!(
        errno(c.create(link.nodeid, b"planted", 0o644, RW_CREATE)),
        0
    );
    assert_ne!(errno(c.mkdir(link.nodeid, b"planted", 0o755)), 0);
    for name in [&b"to_secret"[..], b"relative"] {
        let l = c.lookup(ROOT_ID, name).unwrap();
        assert_eq!(errno(c.open(l.nodeid, libc::O_RDWR as u32)), libc::ELOOP);
        assert_eq!(
            errno(c.open(l.nodeid, (libc::O_RDWR | libc::O_TRUNC) as u32)),
            libc::ELOOP
        );
        let _ = c.setattr(l.nodeid, FATTR_SIZE, 0, 0);
        assert!(!c.readlink(l.nodeid).unwrap().is_empty());
    }
    // A guest-made symlink to a host path is just text.
    let g = c.symlink(ROOT_ID, b"guest_link", b"/etc/shadow").unwrap();
    assert_eq!(errno(c.open(g.nodeid, libc::O_RDONLY as u32)), libc::ELOOP);
    assert_eq!(c.readlink(g.nodeid).unwrap(), b"/etc/shadow");
    // CREATE over an existing symlink does not write through it.
    assert_ne!(errno(c.create(ROOT_ID, b"to_secret", 0o644, RW_CREATE)), 0);

    // Links and renames name inodes only by node id: unknown ids are refused, and a name
    // never leaves its directory.
    assert_eq!(errno(c.link(12345, ROOT_ID, b"stolen")), libc::EBADF);
    assert_eq!(
        errno(c.rename2(ROOT_ID, b"sub", 12345, b"gone", 0)),
        libc::EBADF
    );
    assert_eq!(
        errno(c.rename2(ROOT_ID, b"sub", ROOT_ID, b"../outside/sub", 0)),
        libc::EINVAL
    );
    assert_eq!(errno(c.link(link.nodeid, ROOT_ID, b"../x")), libc::EINVAL);
    // A hard link of the symlink stays a symlink inside the share.
    let hl = c.link(link.nodeid, ROOT_ID, b"hardlink").unwrap();
    assert_eq!(hl.attr.mode & libc::S_IFMT, libc::S_IFLNK);

    // FIFOs (host-made and guest-made) are never opened: no hang, an error.
    let fifo = c.lookup(ROOT_ID, b"fifo").unwrap();
    assert_eq!(
        errno(c.open(fifo.nodeid, libc::O_RDONLY as u32)),
        libc::EACCES
    );
    let gf = c
        .mknod(ROOT_ID, b"guest_fifo", libc::S_IFIFO | 0o644, 0)
        .unwrap();
    assert_eq!(
        errno(c.open(gf.nodeid, libc::O_WRONLY as u32)),
        libc::EACCES
    );
    assert!(std::fs::symlink_metadata(f.share.join("guest_fifo"))
        .unwrap()
        .file_type()
        .is_fifo());

    f.assert_alive();
    f.assert_outside_untouched();
    // Host-side: the symlinks still point where they did, and nothing was planted.
    assert_eq!(
        std::fs::read_link(f.share.join("to_outside")).unwrap(),
        outside
    );
    assert!(!Path::new(&outside).join("planted").exists());
}

/// The client is a faithful FUSE driver, not one shaped to our daemon: the same sequence
/// against virtiofsd gives the same host-visible results.
#[test]
fn the_same_client_drives_virtiofsd() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let socket = dir.path().join("virtiofsd.sock");
    let _daemon = testkit::fuse_client::virtiofsd_command(&socket, &share)
        .unwrap_or_else(|e| panic!("this test needs virtiofsd: {e:#}"))
        .spawn()
        .unwrap();
    let mut c = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
    c.init().unwrap();
    let (e, fh) = c.create(ROOT_ID, b"file", 0o644, RW_CREATE).unwrap();
    assert_eq!(c.write(e.nodeid, fh, 0, &[5u8; 8192]).unwrap(), 8192);
    assert_eq!(c.read(e.nodeid, fh, 4096, 8192).unwrap(), vec![5u8; 4096]);
    c.release(e.nodeid, fh).unwrap();
    c.mkdir(ROOT_ID, b"dir", 0o755).unwrap();
    let names: Vec<Vec<u8>> = c
        .readdir_all(ROOT_ID, true, 4096)
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert!(names.contains(&b"file".to_vec()) && names.contains(&b"dir".to_vec()));
    c.rename2(ROOT_ID, b"file", ROOT_ID, b"moved", libc::RENAME_NOREPLACE)
        .unwrap();
    assert_eq!(std::fs::read(share.join("moved")).unwrap(), vec![5u8; 8192]);
    // virtiofsd answers ENOENT where we answer EINVAL; both refuse.
    errno(c.lookup(ROOT_ID, b"a/b"));
}

#[test]
fn a_write_past_the_file_size_limit_fails_and_the_daemon_survives() {
    // On tmpfs, where writes are plain pwritev calls on the queue's thread (on io_uring they
    // run on io-wq threads, which never take the signal).
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let socket = dir.path().join("fs.sock");
    let mut daemon = vhost_fs_command(&socket, &share).unwrap().spawn().unwrap();
    let mut c = FuseClient::connect(&socket, ClientOptions::default()).unwrap();
    c.init().unwrap();
    // The host limits the daemon's file size (RLIMIT_FSIZE, as a platform team may): a guest
    // write past it must fail with EFBIG, not kill the daemon with SIGXFSZ.
    testkit::daemon::limit_file_size(daemon.pid(), 1 << 20).expect("prlimit");
    let (e, fh) = c.create(ROOT_ID, b"big", 0o600, RW_CREATE).unwrap();
    assert_eq!(errno(c.write(e.nodeid, fh, 2 << 20, b"past")), libc::EFBIG);
    assert_eq!(c.write(e.nodeid, fh, 0, b"below").unwrap(), 5);
    c.release(e.nodeid, fh).unwrap();
    assert_eq!(std::fs::read(share.join("big")).unwrap(), b"below");
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "daemon exited:\n{}",
        daemon.output()
    );
    c.getattr(ROOT_ID).expect("daemon stopped serving");
}

/// Directory offsets are the host's cookies, which on network filesystems can be 2^63 or
/// more: such an offset is served (as virtiofsd 1.14 does), not refused with EINVAL. On a
/// local share no entry has one, so the listing from it is empty.
#[test]
fn readdir_takes_offsets_of_2_63_and_above() {
    let mut f = start(&[]);
    std::fs::write(f.share.join("a"), b"").unwrap();
    let c = &mut f.client;
    let fh = c.opendir(ROOT_ID).unwrap();
    for plus in [false, true] {
        let all = c.readdir(ROOT_ID, fh, 0, 4096, plus).unwrap();
        assert!(all.iter().any(|d| d.name == b"a"));
        let past = c
            .readdir(ROOT_ID, fh, (1 << 63) | 7, 4096, plus)
            .unwrap_or_else(|e| panic!("plus={plus}: {e}"));
        assert!(past.is_empty(), "{past:?}");
    }
    c.releasedir(ROOT_ID, fh).unwrap();
}
