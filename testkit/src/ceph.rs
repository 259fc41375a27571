//! A one-node Ceph cluster for tests: one monitor and one OSD on 127.0.0.1 (a free port per
//! cluster, so tests run side by side), authentication off, pools of size 1, bluestore on a
//! sparse file in a temporary directory. It reaches "OSD up" in a few seconds on this kind
//! of machine; dropping it stops the daemons and removes everything.
//!
//! The binaries come from Debian's ceph-mon, ceph-osd and ceph-common (scripts/setup.sh
//! installs them); without them, [`Cluster::start`] says what to install.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running cluster with a pool `rbd`.
pub struct Cluster {
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
}

/// Why a cluster could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum CephError {
    #[error(
        "{0} not found: the RBD tests need a Ceph cluster; install ceph-mon ceph-osd \
         ceph-common (bash scripts/setup.sh does)"
    )]
    Missing(&'static str),
    #[error("{what}: {detail}")]
    Failed { what: String, detail: String },
}

fn failed(what: impl Into<String>, detail: impl Into<String>) -> CephError {
    CephError::Failed {
        what: what.into(),
        detail: detail.into(),
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address").port()
}

fn find(program: &'static str) -> Result<PathBuf, CephError> {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(CephError::Missing(program))
}

impl Cluster {
    /// Starts the cluster and creates the pool `rbd`.
    pub fn start() -> Result<Cluster, CephError> {
        for p in ["ceph-mon", "ceph-osd", "ceph", "monmaptool", "rbd"] {
            find(p)?;
        }
        let dir = tempfile::tempdir().map_err(|e| failed("temp dir", e.to_string()))?;
        let d = dir.path();
        let port = free_port();
        let fsid = uuid_like();
        // `mon data avail crit = 1`: a monitor refuses to start on a host file system under
        // 5% free by default, and a test cluster's data is a few megabytes.
        let conf = format!(
            "[global]\n\
             fsid = {fsid}\n\
             mon host = v2:127.0.0.1:{port}\n\
             auth cluster required = none\n\
             auth service required = none\n\
             auth client required = none\n\
             auth supported = none\n\
             auth allow insecure global id reclaim = false\n\
             osd pool default size = 1\n\
             osd pool default min size = 1\n\
             mon allow pool size one = true\n\
             mon warn on pool no redundancy = false\n\
             mon data avail warn = 1\n\
             mon data avail crit = 1\n\
             osd crush chooseleaf type = 0\n\
             osd objectstore = bluestore\n\
             bluestore block create = true\n\
             bluestore block size = 4294967296\n\
             keyring = /dev/null\n\
             run dir = {d}/run\n\
             admin socket = {d}/run/$name.asok\n\
             log file = {d}/$name.log\n\
             mon data = {d}/mon-$id\n\
             osd data = {d}/osd-$id\n\
             client mount timeout = 10\n\
             [osd]\n\
             osd memory target = 536870912\n\
             osd fast shutdown notify mon = false\n",
            d = d.display()
        );
        std::fs::create_dir_all(d.join("run")).map_err(|e| failed("run dir", e.to_string()))?;
        std::fs::write(d.join("ceph.conf"), conf)
            .map_err(|e| failed("ceph.conf", e.to_string()))?;
        let mut cluster = Cluster {
            dir,
            daemons: Vec::new(),
        };
        let monmap = cluster.path("monmap");
        cluster.run(
            "monmaptool",
            &[
                "--create",
                "--fsid",
                &fsid,
                "--addv",
                "a",
                &format!("[v2:127.0.0.1:{port}]"),
                monmap.to_str().unwrap_or_default(),
            ],
        )?;
        cluster.run(
            "ceph-mon",
            &[
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                monmap.to_str().unwrap_or_default(),
            ],
        )?;
        cluster.spawn("ceph-mon", &["-f", "-i", "a"])?;
        let osd_uuid = uuid_like();
        // A monitor that does not answer says why in its log (a host file system under 1%
        // free, say): its last lines go with the error.
        let id = cluster
            .run("ceph", &["osd", "new", &osd_uuid])
            .map_err(|e| match e {
                CephError::Failed { what, detail } => {
                    let log =
                        std::fs::read_to_string(cluster.path("mon.a.log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(8).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    failed(
                        what,
                        format!("{detail}\nthe monitor's log ends:\n{}", tail.join("\n")),
                    )
                }
                other => other,
            })?;
        let id = id.trim().to_string();
        std::fs::create_dir_all(cluster.path(&format!("osd-{id}")))
            .map_err(|e| failed("osd dir", e.to_string()))?;
        cluster.run("ceph-osd", &["-i", &id, "--mkfs", "--osd-uuid", &osd_uuid])?;
        cluster.spawn("ceph-osd", &["-f", "-i", &id])?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let stat = cluster.run("ceph", &["osd", "stat", "-f", "json"])?;
            if stat.contains("\"num_up_osds\":1") {
                break;
            }
            if Instant::now() > deadline {
                return Err(failed("the OSD did not come up in 60 s", stat));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        cluster.run("ceph", &["osd", "pool", "create", "rbd", "8"])?;
        cluster.run("rbd", &["pool", "init", "rbd"])?;
        Ok(cluster)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The configuration file clients use (`conf=` of an rbd node).
    pub fn conf(&self) -> PathBuf {
        self.path("ceph.conf")
    }

    fn command(&self, program: &'static str) -> Result<Command, CephError> {
        let mut c = Command::new(find(program)?);
        c.arg("-c").arg(self.conf());
        Ok(c)
    }

    /// Runs a Ceph tool against the cluster; its stdout, or an error with its stderr.
    pub fn run(&self, program: &'static str, args: &[&str]) -> Result<String, CephError> {
        let out = self
            .command(program)?
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| failed(format!("{program} {args:?}"), e.to_string()))?;
        if !out.status.success() {
            return Err(failed(
                format!("{program} {args:?} ({})", out.status),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(&mut self, program: &'static str, args: &[&str]) -> Result<(), CephError> {
        let child = self
            .command(program)?
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| failed(format!("{program} {args:?}"), e.to_string()))?;
        self.daemons.push(child);
        Ok(())
    }

    /// Creates image `rbd/NAME` of `size_mib` MiB.
    pub fn create_image(&self, name: &str, size_mib: u64) -> Result<(), CephError> {
        self.run(
            "rbd",
            &[
                "create",
                "--size",
                &size_mib.to_string(),
                &format!("rbd/{name}"),
            ],
        )
        .map(|_| ())
    }

    /// Removes the locks on image `rbd/NAME`, blocklisting their holders (`rbd lock rm`):
    /// what an operator does to fence a client that died holding the image's exclusive
    /// lock, which its successor would otherwise wait for until the dead client's watch
    /// times out (30 s). Returns how many locks were removed.
    pub fn break_locks(&self, name: &str) -> Result<usize, CephError> {
        let image = format!("rbd/{name}");
        let listed = self.run("rbd", &["lock", "ls", "--format", "json", &image])?;
        let locks: Vec<serde_json::Value> = serde_json::from_str(&listed)
            .map_err(|e| failed("parsing rbd lock ls", format!("{e}: {listed}")))?;
        for lock in &locks {
            let field = |k: &str| {
                lock.get(k)
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| failed("parsing rbd lock ls", format!("no {k}: {listed}")))
            };
            self.run(
                "rbd",
                &["lock", "rm", &image, field("id")?, field("locker")?],
            )?;
        }
        Ok(locks.len())
    }

    /// The contents of image `rbd/NAME` (`rbd export`).
    pub fn export(&self, name: &str) -> Result<Vec<u8>, CephError> {
        let out = self.path(&format!("{name}.export"));
        let _ = std::fs::remove_file(&out);
        self.run(
            "rbd",
            &[
                "export",
                &format!("rbd/{name}"),
                out.to_str().unwrap_or_default(),
            ],
        )?;
        std::fs::read(&out).map_err(|e| failed("reading the export", e.to_string()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The OSD first, then the monitor; SIGTERM lets them exit in about 2 s.
        for child in self.daemons.iter_mut().rev() {
            // SAFETY: kill has no memory preconditions; the pid is our child's.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        for child in self.daemons.iter_mut().rev() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A random UUID in text form (from the kernel's generator).
fn uuid_like() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("reading the kernel's UUID generator")
        .trim()
        .to_string()
}
