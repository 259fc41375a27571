//! The command line (virtiofsd's flag names, so the two can be swapped), parsed once into a
//! checked [`Config`].

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::passthrough::creds::{IdMap, IdRule};
use crate::passthrough::{CachePolicy, InodeFileHandles};

/// vhost-user-fs daemon: shares a host directory with a guest over virtio-fs.
/// The command-line definition, for the man pages.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Debug, Parser)]
#[command(name = "vhost-fs", version, about)]
struct Cli {
    /// vhost-user socket to listen on.
    #[arg(long = "socket-path", value_name = "PATH", required_unless_present_any = ["fd", "print_capabilities"])]
    socket_path: Option<PathBuf>,
    /// Use this inherited, listening socket descriptor instead of --socket-path.
    #[arg(long, value_name = "FD", conflicts_with = "socket_path")]
    fd: Option<i32>,
    /// The directory to share.
    #[arg(
        long = "shared-dir",
        value_name = "DIR",
        required_unless_present = "print_capabilities"
    )]
    shared_dir: Option<PathBuf>,
    /// The tag the guest mounts (mount -t virtiofs TAG); by default the frontend's.
    #[arg(long, value_name = "TAG")]
    tag: Option<String>,
    /// never | metadata | auto | always.
    #[arg(long, default_value = "auto", value_name = "MODE")]
    cache: String,
    /// namespace | chroot | none (default: namespace when run as root, else none).
    #[arg(long, value_name = "KIND")]
    sandbox: Option<String>,
    /// Refuse every operation that would change the share.
    #[arg(long)]
    readonly: bool,
    /// Serve extended attributes.
    #[arg(long)]
    xattr: bool,
    /// Threads, shared by the queues, that run requests making blocking system calls, so
    /// a slow one does not hold up its queue; 0 serves them on the queue's thread.
    /// READ and WRITE always go through the queue's io_uring.
    #[arg(long = "thread-pool-size", default_value_t = 0, value_name = "N")]
    thread_pool_size: usize,
    /// Request queues offered (virtiofsd offers one).
    #[arg(long, default_value_t = 1, value_name = "N")]
    queues: u16,
    /// Largest virtqueue size offered.
    #[arg(long = "queue-size", default_value_t = 1024, value_name = "N")]
    queue_size: u16,
    /// READs and WRITEs in flight per queue.
    #[arg(long = "queue-depth", default_value_t = 64, value_name = "N")]
    queue_depth: u32,
    /// Keep polling an idle queue for up to this many microseconds before sleeping
    /// (adaptive: shorter when it would not catch the next request, off while the CPU is
    /// contended). 0 disables.
    #[arg(long = "poll-us", default_value_t = 32, value_name = "US")]
    poll_us: u64,
    /// Tell the guest which directories are mount points, so each gets its own st_dev
    /// (the default, as virtiofsd's).
    #[arg(long = "announce-submounts", overrides_with = "no_announce_submounts")]
    announce_submounts: bool,
    /// Do not tell the guest which directories are mount points.
    #[arg(long = "no-announce-submounts", overrides_with = "announce_submounts")]
    no_announce_submounts: bool,
    /// guest:F:T:N | host:F:T:N | squash-guest:F:T:N | squash-host:F:T:N | forbid-guest:F:N | map:G:H:N.
    #[arg(long = "translate-uid", value_name = "MAP")]
    translate_uid: Vec<String>,
    /// As --translate-uid, for group ids.
    #[arg(long = "translate-gid", value_name = "MAP")]
    translate_gid: Vec<String>,
    /// never | prefer | mandatory: hold the inodes the guest knows as file handles instead
    /// of open O_PATH descriptors (needs CAP_DAC_READ_SEARCH); prefer falls back to
    /// descriptors where a filesystem has no handles. virtiofsd's default.
    #[arg(
        long = "inode-file-handles",
        default_value = "prefer",
        value_name = "MODE"
    )]
    inode_file_handles: String,
    /// Limit on open files (default: the hard limit, at most 1048576).
    #[arg(long = "rlimit-nofile", value_name = "N")]
    rlimit_nofile: Option<u64>,
    /// Print the vhost-user capabilities (JSON) and exit.
    #[arg(long = "print-capabilities")]
    print_capabilities: bool,
    /// Serve GET /metrics and GET /v1/share over HTTP on this unix socket.
    #[arg(long = "api-socket", value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Let this group (a name or a number) connect to the sockets too (mode 0660), as
    /// virtiofsd's flag; without it they are the owner's alone (0600).
    #[arg(long = "socket-group", value_name = "GROUP")]
    socket_group: Option<String>,
    /// What a system call outside the daemon's allow-list does: kill (default), log, trap,
    /// or none (no filter).
    #[arg(long, default_value = "kill", value_name = "ACTION")]
    seccomp: String,
    /// Capabilities to keep besides, or drop from, the default set: +name or -name entries
    /// joined by ':' (e.g. +sys_admin:-mknod).
    #[arg(long, value_name = "CAPS")]
    modcaps: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandbox {
    Namespace,
    Chroot,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Path(PathBuf),
    Fd(i32),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub shared_dir: PathBuf,
    pub tag: Option<String>,
    pub cache: CachePolicy,
    pub sandbox: Sandbox,
    pub readonly: bool,
    pub xattr: bool,
    pub queues: u16,
    pub queue_size: u16,
    pub queue_depth: u32,
    pub poll: std::time::Duration,
    pub announce_submounts: bool,
    /// 0: no pool.
    pub thread_pool_size: usize,
    pub uid_map: IdMap,
    pub gid_map: IdMap,
    pub rlimit_nofile: Option<u64>,
    pub inode_file_handles: InodeFileHandles,
    pub api_socket: Option<PathBuf>,
    /// The group that may connect to the sockets besides their owner.
    pub socket_group: Option<u32>,
    pub seccomp: crate::seccomp::SeccompMode,
    pub modcaps: Vec<crate::capabilities::CapChange>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Usage(String),
    #[error("--shared-dir {0}: not a directory")]
    SharedDir(PathBuf),
    #[error("--cache {0}: expected never, metadata, auto or always")]
    Cache(String),
    #[error("--sandbox {0}: expected namespace, chroot or none")]
    Sandbox(String),
    #[error("--sandbox {0}: needs root")]
    SandboxNeedsRoot(String),
    #[error("--queues {0}: must be between 1 and 16")]
    Queues(u16),
    #[error("--queue-size {0}: must be a power of two between 64 and 1024")]
    QueueSize(u16),
    #[error("--queue-depth {0}: must be between 1 and 1024")]
    QueueDepth(u32),
    #[error("--tag {0:?}: must be 1 to 36 bytes")]
    Tag(String),
    #[error("--translate-{0}: {1}")]
    Translate(&'static str, String),
    #[error("--rlimit-nofile {0}: must be at least 64")]
    Rlimit(u64),
    #[error("{0}")]
    InodeFileHandles(String),
    #[error("--thread-pool-size {0}: must be at most 1024")]
    ThreadPoolSize(usize),
    #[error("--poll-us {0}: must be at most 1000000")]
    Poll(u64),
    #[error(transparent)]
    SocketGroup(#[from] daemon_support::socket::SocketError),
    #[error("{0}")]
    Seccomp(String),
    #[error(transparent)]
    Modcaps(#[from] crate::capabilities::CapsError),
}

pub enum Command {
    Run(Box<Config>),
    /// `--help`, `--version` or `--print-capabilities`: print this and exit 0.
    Print(String),
}

/// What `--print-capabilities` prints (the vhost-user backend JSON of the QEMU spec).
pub const CAPABILITIES: &str = "{\n  \"type\": \"fs\"\n}\n";

impl Config {
    pub fn parse<I, T>(args: I) -> Result<Command, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = match Cli::try_parse_from(args) {
            Ok(cli) => cli,
            Err(e) => {
                use clap::error::ErrorKind::*;
                if matches!(e.kind(), DisplayHelp | DisplayVersion) {
                    return Ok(Command::Print(e.to_string()));
                }
                return Err(ConfigError::Usage(daemon_support::cli::one_line(&e)));
            }
        };
        if cli.print_capabilities {
            return Ok(Command::Print(CAPABILITIES.to_string()));
        }
        Config::try_from(cli).map(|c| Command::Run(Box::new(c)))
    }
}

fn id_map(kind: &'static str, rules: &[String]) -> Result<IdMap, ConfigError> {
    rules
        .iter()
        .map(|r| {
            r.parse::<IdRule>()
                .map_err(|e| ConfigError::Translate(kind, e))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(IdMap)
}

impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, ConfigError> {
        let shared_dir = cli
            .shared_dir
            .ok_or_else(|| ConfigError::Usage("--shared-dir is required".into()))?;
        if !shared_dir.is_dir() {
            return Err(ConfigError::SharedDir(shared_dir));
        }
        let cache = match cli.cache.as_str() {
            "never" | "none" => CachePolicy::Never,
            "metadata" => CachePolicy::Metadata,
            "auto" => CachePolicy::Auto,
            "always" => CachePolicy::Always,
            other => return Err(ConfigError::Cache(other.into())),
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let sandbox = match cli.sandbox.as_deref() {
            None => {
                if root {
                    Sandbox::Namespace
                } else {
                    Sandbox::None
                }
            }
            Some("namespace") => Sandbox::Namespace,
            Some("chroot") => Sandbox::Chroot,
            Some("none") => Sandbox::None,
            Some(other) => return Err(ConfigError::Sandbox(other.into())),
        };
        if sandbox != Sandbox::None && !root {
            return Err(ConfigError::SandboxNeedsRoot(
                cli.sandbox.unwrap_or_default(),
            ));
        }
        if !(1..=16).contains(&cli.queues) {
            return Err(ConfigError::Queues(cli.queues));
        }
        if !(64..=1024).contains(&cli.queue_size) || !cli.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(cli.queue_size));
        }
        if !(1..=1024).contains(&cli.queue_depth) {
            return Err(ConfigError::QueueDepth(cli.queue_depth));
        }
        if let Some(tag) = &cli.tag {
            if tag.is_empty() || tag.len() > crate::device::TAG_LEN {
                return Err(ConfigError::Tag(tag.clone()));
            }
        }
        if let Some(n) = cli.rlimit_nofile {
            if n < 64 {
                return Err(ConfigError::Rlimit(n));
            }
        }
        if cli.poll_us > 1_000_000 {
            return Err(ConfigError::Poll(cli.poll_us));
        }
        if cli.thread_pool_size > 1024 {
            return Err(ConfigError::ThreadPoolSize(cli.thread_pool_size));
        }
        let listen = match (cli.socket_path, cli.fd) {
            (Some(p), _) => Listen::Path(p),
            (None, Some(fd)) => Listen::Fd(fd),
            (None, None) => {
                return Err(ConfigError::Usage(
                    "--socket-path or --fd is required".into(),
                ))
            }
        };
        Ok(Config {
            listen,
            shared_dir,
            tag: cli.tag,
            cache,
            sandbox,
            readonly: cli.readonly,
            xattr: cli.xattr,
            queues: cli.queues,
            queue_size: cli.queue_size,
            queue_depth: cli.queue_depth,
            poll: std::time::Duration::from_micros(cli.poll_us),
            // Only one of the two is set at most: the last given overrides the other.
            announce_submounts: cli.announce_submounts || !cli.no_announce_submounts,
            thread_pool_size: cli.thread_pool_size,
            uid_map: id_map("uid", &cli.translate_uid)?,
            gid_map: id_map("gid", &cli.translate_gid)?,
            rlimit_nofile: cli.rlimit_nofile,
            inode_file_handles: cli
                .inode_file_handles
                .parse()
                .map_err(ConfigError::InodeFileHandles)?,
            api_socket: cli.api_socket,
            socket_group: cli
                .socket_group
                .as_deref()
                .map(daemon_support::socket::group_id)
                .transpose()?,
            seccomp: cli.seccomp.parse().map_err(ConfigError::Seccomp)?,
            modcaps: cli
                .modcaps
                .as_deref()
                .map(crate::capabilities::parse_modcaps)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["vhost-fs"];
        all.extend_from_slice(args);
        match Config::parse(all) {
            Ok(Command::Run(c)) => Ok(*c),
            Ok(Command::Print(p)) => Err(format!("print:{p}")),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn parses_virtiofsd_style_flags() {
        let c = parse(&[
            "--socket-path",
            "/tmp/s",
            "--shared-dir",
            "/tmp",
            "--cache",
            "always",
            "--sandbox",
            "none",
            "--queues",
            "4",
            "--xattr",
            "--readonly",
            "--translate-uid",
            "map:0:1000:1",
            "--tag",
            "share",
            "--thread-pool-size",
            "8",
            "--announce-submounts",
        ])
        .unwrap();
        assert_eq!(c.queues, 4);
        assert_eq!(c.cache, CachePolicy::Always);
        assert_eq!(c.sandbox, Sandbox::None);
        assert!(c.readonly && c.xattr && c.announce_submounts);
        let no = |args: &[&str]| {
            let mut all = vec!["--socket-path", "s", "--shared-dir", "/tmp"];
            all.extend_from_slice(args);
            !parse(&all).unwrap().announce_submounts
        };
        // On unless turned off; the last of the two flags wins.
        assert!(!no(&[]));
        assert!(no(&["--no-announce-submounts"]));
        assert!(!no(&["--no-announce-submounts", "--announce-submounts"]));
        assert!(no(&["--announce-submounts", "--no-announce-submounts"]));
        assert_eq!(c.thread_pool_size, 8);
        let plain = parse(&["--socket-path", "s", "--shared-dir", "/tmp"]).unwrap();
        assert_eq!(plain.thread_pool_size, 0);
        assert_eq!(c.uid_map.to_host(0).unwrap(), 1000);
        assert_eq!(c.listen, Listen::Path("/tmp/s".into()));
    }

    #[test]
    fn print_capabilities_needs_nothing_else() {
        assert_eq!(
            parse(&["--print-capabilities"]).unwrap_err(),
            format!("print:{CAPABILITIES}")
        );
    }

    #[test]
    fn bad_flags_are_one_line_naming_the_problem() {
        for (args, needle) in [
            (vec!["--shared-dir", "/tmp"], "--socket-path"),
            (
                vec![
                    "--socket-path",
                    "s",
                    "--shared-dir",
                    "/tmp",
                    "--seccomp",
                    "strict",
                ],
                "--seccomp",
            ),
            (
                vec![
                    "--socket-path",
                    "s",
                    "--shared-dir",
                    "/tmp",
                    "--modcaps",
                    "+nope",
                ],
                "--modcaps",
            ),
            (
                vec![
                    "--socket-path",
                    "s",
                    "--shared-dir",
                    "/tmp",
                    "--socket-group",
                    "no-such-group-x",
                ],
                "--socket-group",
            ),
            (
                vec!["--socket-path", "s", "--shared-dir", "/nonexistent-dir"],
                "--shared-dir",
            ),
            (
                vec![
                    "--socket-path",
                    "s",
                    "--shared-dir",
                    "/tmp",
                    "--cache",
                    "sometimes",
                ],
                "--cache",
            ),
            (
                vec![
                    "--socket-path",
                    "s",
                    "--shared-dir",
                    "/tmp",
                    "--sandbox",
                    "jail",
                ],
                "--sandbox",
            ),
            (
                vec![
                    "--socket-path",
                    "s",
                    "--shared-dir",
                    "/tmp",
                    "--queues",
                    "0",
                ],
                "--queues",
            ),
            (
                vec![
                    "--socket-path",
                    "s",
                    "--shared-dir",
                    "/tmp",
                    "--translate-uid",
                    "map:1",
                ],
                "--translate-uid",
            ),
            (
                vec!["--socket-path", "s", "--shared-dir", "/tmp", "--bogus"],
                "--bogus",
            ),
            (
                vec![
                    "--socket-path",
                    "s",
                    "--shared-dir",
                    "/tmp",
                    "--thread-pool-size",
                    "5000",
                ],
                "--thread-pool-size",
            ),
        ] {
            let e = parse(&args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
            assert!(!e.contains('\n'), "{args:?}: {e}");
        }
    }
}
