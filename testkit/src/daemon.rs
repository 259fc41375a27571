//! Daemon processes for tests and benches.
//!
//! This module owns everything about running a storage daemon as a child process: finding our
//! own binaries in the cargo target directory ([`binary_path`]), spawning a daemon and waiting
//! until it serves ([`Daemon::spawn`]), forwarding its output into the test's captured output,
//! and stopping it ([`Daemon::terminate`], [`Daemon::kill`], or `Drop`). It knows our
//! `vhost-blk` and QEMU's `qemu-storage-daemon`, but [`DaemonCommand`] runs any program.
//!
//! A test never waits forever: readiness, termination and [`run_with_timeout`] all take a
//! deadline and report what the process printed when it is missed.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Environment variable naming a directory that holds our binaries, overriding the search in
/// the cargo target directory (e.g. to test an installed build).
pub const BIN_DIR_ENV: &str = "STRATA_BIN_DIR";

/// How long a daemon gets to become ready, unless the command says otherwise. Generous because
/// two cores may be busy compiling while tests run.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long [`Daemon::terminate`] waits by default for a clean exit.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The line our daemons print on stderr once their socket accepts connections.
pub const LISTENING_MARKER: &str = "listening on";

/// Errors from finding, starting and stopping daemons. Each carries what the daemon printed so
/// far, because that is nearly always the explanation.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "binary `{name}` not found at {}: run `cargo build --workspace --bins` first \
         (scripts/test.sh does), or set {BIN_DIR_ENV} to the directory holding it",
        path.display()
    )]
    BinaryMissing { name: String, path: PathBuf },
    #[error("cannot locate the cargo target directory from the running executable: {0}")]
    NoTargetDir(String),
    #[error("cannot spawn {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before it was ready; its output:\n{output}")]
    ExitedEarly {
        name: String,
        status: ExitStatus,
        output: String,
    },
    #[error("{name} was not ready after {timeout:?} ({waiting_for}); its output:\n{output}")]
    NotReady {
        name: String,
        timeout: Duration,
        waiting_for: String,
        output: String,
    },
    #[error(
        "{name} did not exit within {timeout:?} after SIGTERM (killed it); its output:\n{output}"
    )]
    StopTimeout {
        name: String,
        timeout: Duration,
        output: String,
    },
    #[error("{program} did not exit within {timeout:?} (killed it); its output:\n{output}")]
    RunTimeout {
        program: String,
        timeout: Duration,
        output: String,
    },
    #[error("waiting for {name}: {source}")]
    Wait {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Finds one of our binaries, or explains how to build it.
///
/// With `STRATA_BIN_DIR` set, looks there. Otherwise looks in the cargo profile directory of the
/// running executable: tests run from `target/<profile>/deps/`, binaries and benches from
/// `target/<profile>/`, and both find `target/<profile>/<name>`.
pub fn try_binary_path(name: &str) -> Result<PathBuf, DaemonError> {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => profile_dir()?,
    };
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(DaemonError::BinaryMissing {
            name: name.to_owned(),
            path,
        })
    }
}

/// [`try_binary_path`] for tests: panics with the explanation if the binary is absent.
pub fn binary_path(name: &str) -> PathBuf {
    try_binary_path(name).unwrap_or_else(|e| panic!("{e}"))
}

/// `target/<profile>` of the running executable.
fn profile_dir() -> Result<PathBuf, DaemonError> {
    let exe = std::env::current_exe().map_err(|e| DaemonError::NoTargetDir(e.to_string()))?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| DaemonError::NoTargetDir(format!("{} has no parent", exe.display())))?
        .to_path_buf();
    // Test and bench executables live in target/<profile>/deps; examples in .../examples.
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    Ok(dir)
}

/// When a spawned daemon counts as ready to serve.
#[derive(Clone, Debug)]
pub enum Readiness {
    /// A line on its stderr contains this text (our daemons print [`LISTENING_MARKER`]).
    StderrContains(String),
    /// A unix socket at this path accepts a connection. The probe connection is closed at once;
    /// use this only for daemons that serve clients one after another (qemu-storage-daemon's
    /// vhost-user export does: it returns to listening when a client goes away).
    SocketAccepts(PathBuf),
    /// No wait: the process counts as ready once spawned.
    Spawned,
}

/// What to run and how to tell that it is serving.
#[derive(Clone, Debug)]
pub struct DaemonCommand {
    /// Prefix for forwarded output lines and error messages.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub readiness: Readiness,
    pub ready_timeout: Duration,
}

impl DaemonCommand {
    /// A command for `program`, ready when spawned until [`Self::readiness`] says otherwise.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        let program = program.into();
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| program.display().to_string());
        Self {
            name,
            program,
            args: Vec::new(),
            env: Vec::new(),
            readiness: Readiness::Spawned,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }

    /// Our `vhost-blk` from the target directory, ready when it prints "listening on".
    pub fn vhost_blk() -> Result<Self, DaemonError> {
        Ok(Self::new(try_binary_path("vhost-blk")?)
            .readiness(Readiness::StderrContains(LISTENING_MARKER.to_owned())))
    }

    /// `qemu-storage-daemon` from `PATH`, ready when its vhost-user socket accepts.
    pub fn qemu_storage_daemon(socket: impl Into<PathBuf>) -> Self {
        Self::new("qemu-storage-daemon")
            .name("qsd")
            .readiness(Readiness::SocketAccepts(socket.into()))
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Spawns the daemon and waits until it is ready.
    pub fn spawn(self) -> Result<Daemon, DaemonError> {
        Daemon::spawn(self)
    }
}

/// A running daemon. Dropping it kills the process (SIGKILL) and reaps it, so a failing test
/// never leaves a daemon behind.
pub struct Daemon {
    name: String,
    child: Child,
    output: Arc<Mutex<String>>,
    /// Each output forwarder sends once on EOF; `None` once both have been waited for.
    forwarders_done: Option<mpsc::Receiver<()>>,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// Spawns `cmd` and waits for its [`Readiness`]. Its stdout and stderr are forwarded, line by
    /// line and prefixed with its name, to our stderr (which the test harness captures, also
    /// from the forwarding threads) and kept for [`Daemon::output`].
    pub fn spawn(cmd: DaemonCommand) -> Result<Daemon, DaemonError> {
        let mut command = Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &cmd.env {
            command.env(k, v);
        }
        let mut child = command.spawn().map_err(|source| DaemonError::Spawn {
            program: cmd.program.clone(),
            source,
        })?;

        let output = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let marker = match &cmd.readiness {
            Readiness::StderrContains(text) => Some(text.clone()),
            _ => None,
        };
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (done_tx, done_rx) = mpsc::channel();
        forward(
            format!("{} stdout", cmd.name),
            stdout,
            Arc::clone(&output),
            None,
            done_tx.clone(),
        );
        forward(
            cmd.name.clone(),
            stderr,
            Arc::clone(&output),
            marker.map(|m| (m, ready_tx)),
            done_tx,
        );

        let mut daemon = Daemon {
            name: cmd.name.clone(),
            child,
            output,
            forwarders_done: Some(done_rx),
            status: None,
        };
        daemon.wait_ready(&cmd, ready_rx)?;
        Ok(daemon)
    }

    fn wait_ready(
        &mut self,
        cmd: &DaemonCommand,
        ready_rx: mpsc::Receiver<()>,
    ) -> Result<(), DaemonError> {
        let deadline = Instant::now() + cmd.ready_timeout;
        let poll = Duration::from_millis(20);
        loop {
            let ready = match &cmd.readiness {
                Readiness::Spawned => true,
                Readiness::StderrContains(_) => ready_rx.recv_timeout(poll).is_ok(),
                Readiness::SocketAccepts(path) => {
                    if UnixStream::connect(path).is_ok() {
                        true
                    } else {
                        thread::sleep(poll);
                        false
                    }
                }
            };
            if ready {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                self.join_forwarders();
                return Err(DaemonError::ExitedEarly {
                    name: self.name.clone(),
                    status,
                    output: self.output(),
                });
            }
            if Instant::now() >= deadline {
                let waiting_for = match &cmd.readiness {
                    Readiness::StderrContains(m) => format!("waiting for {m:?} on stderr"),
                    Readiness::SocketAccepts(p) => {
                        format!("waiting for {} to accept a connection", p.display())
                    }
                    Readiness::Spawned => unreachable!("spawned is ready at once"),
                };
                self.kill();
                return Err(DaemonError::NotReady {
                    name: self.name.clone(),
                    timeout: cmd.ready_timeout,
                    waiting_for,
                    output: self.output(),
                });
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything the daemon printed so far (stdout and stderr, interleaved by line).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Non-blocking check for exit; remembers the status once seen.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, DaemonError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| DaemonError::Wait {
                name: self.name.clone(),
                source,
            })?;
        }
        Ok(self.status)
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status. On timeout the daemon is
    /// killed and the error carries its output.
    pub fn terminate_within(&mut self, timeout: Duration) -> Result<ExitStatus, DaemonError> {
        if let Some(status) = self.try_wait()? {
            self.join_forwarders();
            return Ok(status);
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                self.join_forwarders();
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(DaemonError::StopTimeout {
                    name: self.name.clone(),
                    timeout,
                    output: self.output(),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`Self::terminate_within`] with [`DEFAULT_STOP_TIMEOUT`].
    pub fn terminate(&mut self) -> Result<ExitStatus, DaemonError> {
        self.terminate_within(DEFAULT_STOP_TIMEOUT)
    }

    /// SIGKILL and reap. Returns the exit status (a signal death unless it had already exited).
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            // Errors mean it is already gone, which is what we want.
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.join_forwarders();
        self.status
    }

    /// Sends `signal` to the daemon, unless it has already been reaped (its pid could then
    /// belong to another process).
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.status.is_some() {
            return;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child, so
        // it cannot have been recycled for another process.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// Waits for the forwarding threads, so that [`Self::output`] is complete once the process
    /// has exited (its pipes reach EOF), but not for ever: a grandchild may hold the pipes.
    fn join_forwarders(&mut self) {
        if let Some(done) = self.forwarders_done.take() {
            wait_done(&done, 2);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies `pipe` line by line to our stderr and into `output`, and signals `ready` once a line
/// contains the marker.
fn forward(
    prefix: String,
    pipe: impl Read + Send + 'static,
    output: Arc<Mutex<String>>,
    mut ready: Option<(String, mpsc::Sender<()>)>,
    done: mpsc::Sender<()>,
) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            eprintln!("[{prefix}] {text}");
            {
                let mut out = output.lock().unwrap_or_else(|e| e.into_inner());
                out.push_str(text);
                out.push('\n');
            }
            if ready
                .as_ref()
                .is_some_and(|(m, _)| text.contains(m.as_str()))
            {
                let (_, tx) = ready.take().expect("checked above");
                let _ = tx.send(());
            }
        }
        let _ = done.send(());
    });
}

/// Runs a command to completion with a deadline, collecting its output; kills it on timeout.
/// For commands expected to exit by themselves (e.g. a daemon given a bad flag).
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Result<Output, DaemonError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| DaemonError::Spawn {
            program: PathBuf::from(&program),
            source,
        })?;
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = collect(
        child.stdout.take().expect("stdout is piped"),
        done_tx.clone(),
    );
    let stderr = collect(child.stderr.take().expect("stderr is piped"), done_tx);
    let take = |buf: &Arc<Mutex<Vec<u8>>>| {
        std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()))
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                wait_done(&done_rx, 2);
                return Err(DaemonError::RunTimeout {
                    program,
                    timeout,
                    output: format!(
                        "{}{}",
                        String::from_utf8_lossy(&take(&stdout)),
                        String::from_utf8_lossy(&take(&stderr))
                    ),
                });
            }
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DaemonError::Wait {
                    name: program,
                    source,
                });
            }
        }
    };
    wait_done(&done_rx, 2);
    Ok(Output {
        status,
        stdout: take(&stdout),
        stderr: take(&stderr),
    })
}

/// How long to wait for a dead process's pipes to reach EOF. A grandchild that inherited them
/// can keep them open forever; then we stop waiting and report what arrived.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits until `n` collector threads report EOF, or [`PIPE_DRAIN_TIMEOUT`] passes.
fn wait_done(done: &mpsc::Receiver<()>, n: usize) {
    let deadline = Instant::now() + PIPE_DRAIN_TIMEOUT;
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        if done.recv_timeout(left).is_err() {
            return;
        }
    }
}

/// Reads `pipe` to EOF into a shared buffer (readable while the thread still runs), then
/// signals `done`.
fn collect(mut pipe: impl Read + Send + 'static, done: mpsc::Sender<()>) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let out = Arc::clone(&buf);
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            out.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&chunk[..n]);
        }
        let _ = done.send(());
    });
    buf
}

/// Describes an exit status the way a test failure message wants it: "exit code 2" or
/// "killed by signal 9".
pub fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("{status}"),
    }
}

/// Waits until `path` exists, up to `timeout`. For sockets and pid files of daemons that
/// announce nothing.
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Limits the size of files process `pid` may write to `bytes` (RLIMIT_FSIZE, as a host may
/// set it on a daemon): writes past it fail with EFBIG, or raise SIGXFSZ where that is not
/// ignored.
pub fn limit_file_size(pid: u32, bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit reads `limit` and writes nothing (null old-limit pointer).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`. Benches use it to
/// report what a daemon spent per run.
pub fn cpu_time(pid: u32) -> std::io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces; fields after the
    // last ')' are space-separated, starting with field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| std::io::Error::other("malformed /proc/PID/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. indices 11 and 12 after field 2.
    let parse = |i: usize| -> std::io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| std::io::Error::other("malformed /proc/PID/stat"))
    };
    let ticks = parse(11)? + parse(12)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// qemu-storage-daemon serving the qcow2 image `img` (with QEMU's default image locks)
/// writable on the vhost-user socket `socket`, as a VM's disk would hold it.
pub fn qsd_serving_qcow2(img: &Path, socket: &Path) -> Daemon {
    DaemonCommand::qemu_storage_daemon(socket)
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={}", img.display()),
            "--blockdev",
            "driver=qcow2,node-name=q0,file=f0",
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ),
        ])
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs daemon `name` (a binary of this workspace) with `args` and expects what a bad flag
/// gives: exit code 2 and one line on stderr, which is returned. A daemon that took the
/// flags would serve rather than exit; it is killed after 10 s.
pub fn expect_usage_error<S: AsRef<OsStr> + std::fmt::Debug>(name: &str, args: &[S]) -> String {
    let out = run_with_timeout(
        Command::new(binary_path(name)).args(args),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{name} {args:?}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name} {args:?}: {}; stderr:\n{stderr}",
        describe_status(&out.status)
    );
    let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(
        lines, 1,
        "{name} {args:?}: expected one line on stderr, got:\n{stderr}"
    );
    stderr
}

/// Tries to connect to the unix socket at `path` from a child process running as `uid` and
/// `gid` with no supplementary groups (the test runs as root); the connection is closed at
/// once. `Ok(())` if it connected, else the errno.
pub fn connect_as(path: &Path, uid: u32, gid: u32) -> Result<(), i32> {
    use std::os::unix::ffi::OsStrExt;
    // Everything the child needs is made before the fork: after it, only system calls.
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: the child makes only async-signal-safe system calls and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: plain system calls on values made before the fork; `addr` is a valid
        // sockaddr_un of `len` bytes.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(200);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                libc::_exit(201);
            }
            let r = libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len);
            let code = if r == 0 { 0 } else { *libc::__errno_location() };
            libc::_exit(code.min(199));
        }
    }
    let mut status = 0;
    // SAFETY: `status` is a valid out-parameter; `pid` is our child.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
    assert!(libc::WIFEXITED(status), "the child died: {status:#x}");
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        200 => panic!("the child could not switch to uid {uid}, gid {gid}"),
        201 => panic!("the child could not create a socket"),
        errno => Err(errno),
    }
}

/// Runs `strata --api API args`: (success, stdout, stderr).
pub fn strata_run(api: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary_path("strata"))
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running strata: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `strata args` with no daemon (its `image` commands): exit code, stdout, stderr.
pub fn strata_local(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary_path("strata"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running strata: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `strata image create IMG SIZE --format FORMAT --key-file KEY --iter-time 10` (a quick
/// key derivation), which must succeed.
pub fn strata_create_encrypted(img: &Path, size: &str, format: &str, key: &Path) {
    let (code, _, err) = strata_local(&[
        "image",
        "create",
        &img.to_string_lossy(),
        size,
        "--format",
        format,
        "--key-file",
        &key.to_string_lossy(),
        "--iter-time",
        "10",
    ]);
    assert_eq!(code, 0, "strata image create {}: {err}", img.display());
}

/// Runs `strata --api API args`, which must succeed; its standard output.
pub fn strata(api: &Path, args: &[&str]) -> String {
    let (ok, out, err) = strata_run(api, args);
    assert!(ok, "strata {args:?}: {err}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_marker_on_stderr_is_seen_and_output_kept() {
        let mut d = DaemonCommand::new("/bin/sh")
            .args([
                "-c",
                "echo starting >&2; echo 'x: listening on /s' >&2; exec sleep 30",
            ])
            .readiness(Readiness::StderrContains(LISTENING_MARKER.into()))
            .spawn()
            .expect("spawn sh");
        assert!(d.output().contains("listening on /s"), "{}", d.output());
        let status = d.terminate().expect("terminate");
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn early_exit_reports_status_and_output() {
        let err = DaemonCommand::new("/bin/sh")
            .args(["-c", "echo 'bad flag --x' >&2; exit 2"])
            .readiness(Readiness::StderrContains(LISTENING_MARKER.into()))
            .spawn()
            .err()
            .expect("must fail");
        match err {
            DaemonError::ExitedEarly { status, output, .. } => {
                assert_eq!(status.code(), Some(2));
                assert!(output.contains("bad flag --x"), "{output}");
            }
            other => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn readiness_timeout_kills_and_reports() {
        let err = DaemonCommand::new("/bin/sh")
            .args(["-c", "echo quiet >&2; exec sleep 30"])
            .readiness(Readiness::StderrContains(LISTENING_MARKER.into()))
            .ready_timeout(Duration::from_millis(300))
            .spawn()
            .err()
            .expect("must time out");
        assert!(
            matches!(&err, DaemonError::NotReady { output, .. } if output.contains("quiet")),
            "{err}"
        );
    }

    #[test]
    fn run_with_timeout_collects_and_kills() {
        let out = run_with_timeout(
            Command::new("/bin/sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let err = run_with_timeout(
            Command::new("/bin/sh").args(["-c", "sleep 30"]),
            Duration::from_millis(200),
        )
        .expect_err("must time out");
        assert!(matches!(err, DaemonError::RunTimeout { .. }), "{err}");
    }

    #[test]
    fn cpu_time_of_self_is_readable() {
        let t = cpu_time(std::process::id()).unwrap();
        assert!(t < Duration::from_secs(3600));
    }

    #[test]
    fn missing_binary_explains_how_to_build() {
        let err = try_binary_path("no-such-strata-binary").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cargo build --workspace --bins"), "{msg}");
    }
}
