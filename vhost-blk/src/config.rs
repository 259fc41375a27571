//! The command line, parsed once into a checked [`Config`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use storage_core::disk::graph::GraphSpec;
use storage_core::disk::{DiskSpec, SpecError};

/// vhost-user-blk daemon: serves one disk to a VMM over a vhost-user socket.
#[derive(Debug, Parser)]
#[command(name = "vhost-blk", version, about)]
struct Cli {
    /// Path of the vhost-user socket to listen on.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The disk: path=FILE|null[,size=BYTES][,read-zeroes=on|off][,readonly=on|off]
    /// [,direct=on|off][,serial=STR][,engine=io_uring|sync], plus the cache and throttle keys
    /// (see README); or node=NAME[,serial=STR][,readonly=on], the root of the --blockdev graph.
    #[arg(long, value_name = "SPEC")]
    disk: String,
    /// One node of the disk's graph, as qemu-storage-daemon's --blockdev: driver=...,
    /// node-name=..., children by name (key=value,... or JSON). Repeatable.
    #[arg(long, value_name = "NODE")]
    blockdev: Vec<String>,
    /// An object the nodes refer to: throttle-group,id=NAME,iops-total=N,... Repeatable.
    #[arg(long, value_name = "OBJECT")]
    object: Vec<String>,
    /// Number of request queues offered (one worker thread each).
    #[arg(long, default_value_t = 1, value_name = "N")]
    queues: u16,
    /// Largest virtqueue size offered to the driver.
    #[arg(long, default_value_t = 256, value_name = "N")]
    queue_size: u16,
    /// Requests in flight per queue (io_uring entries per worker).
    #[arg(long, default_value_t = 32, value_name = "N")]
    queue_depth: u32,
    /// Keep polling a queue for this many microseconds after its last request before
    /// sleeping (adaptive polling: lower latency, costs CPU only while busy). 0 disables.
    #[arg(long, default_value_t = 32, value_name = "US")]
    poll_us: u64,
    /// Serve the HTTP API (GET /metrics, GET /v1/disk) on this unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Let this group (a name or a number) connect to the sockets too (mode 0660); without
    /// it they are the owner's alone (0600).
    #[arg(long = "socket-group", value_name = "GROUP")]
    socket_group: Option<String>,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub disk: DiskSpec,
    pub queues: u16,
    pub queue_size: u16,
    pub queue_depth: u32,
    pub poll: Duration,
    pub api_socket: Option<PathBuf>,
    /// The group that may connect to the sockets besides their owner.
    pub socket_group: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Usage(String),
    #[error("--disk: {0}")]
    Disk(#[from] SpecError),
    #[error("--blockdev: {0}")]
    Blockdev(SpecError),
    #[error("--object: {0}")]
    Object(SpecError),
    #[error("--queues {0}: must be between 1 and 64")]
    Queues(u16),
    #[error("--queue-size {0}: must be a power of two between 2 and 1024")]
    QueueSize(u16),
    #[error("--queue-depth {0}: must be between 1 and 4096")]
    QueueDepth(u32),
    #[error("--poll-us {0}: must be at most 1000000")]
    Poll(u64),
    #[error(transparent)]
    SocketGroup(#[from] daemon_support::socket::SocketError),
}

/// What the command line asks for.
pub enum Command {
    Run(Box<Config>),
    /// `--help` or `--version`: print this and exit 0.
    Print(String),
}

impl Config {
    /// Parses `args` (including the program name).
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
        Config::try_from(cli).map(|c| Command::Run(Box::new(c)))
    }
}

impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, Self::Error> {
        let mut graph = GraphSpec::default();
        for o in &cli.object {
            graph.add_object(o).map_err(ConfigError::Object)?;
        }
        for b in &cli.blockdev {
            graph.add_blockdev(b).map_err(ConfigError::Blockdev)?;
        }
        let disk: DiskSpec = graph.resolve(&cli.disk)?;
        if !(1..=64).contains(&cli.queues) {
            return Err(ConfigError::Queues(cli.queues));
        }
        if !(2..=1024).contains(&cli.queue_size) || !cli.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(cli.queue_size));
        }
        if !(1..=4096).contains(&cli.queue_depth) {
            return Err(ConfigError::QueueDepth(cli.queue_depth));
        }
        if cli.poll_us > 1_000_000 {
            return Err(ConfigError::Poll(cli.poll_us));
        }
        Ok(Config {
            poll: Duration::from_micros(cli.poll_us),
            socket: cli.socket,
            disk,
            queues: cli.queues,
            queue_size: cli.queue_size,
            queue_depth: cli.queue_depth,
            api_socket: cli.api_socket,
            socket_group: cli
                .socket_group
                .as_deref()
                .map(daemon_support::socket::group_id)
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["vhost-blk"];
        all.extend_from_slice(args);
        match Config::parse(all) {
            Ok(Command::Run(c)) => Ok(*c),
            Ok(Command::Print(_)) => Err("print".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn parses_a_full_command_line() {
        let c = parse(&[
            "--socket",
            "/tmp/s",
            "--disk",
            "path=null,size=1G",
            "--queues",
            "2",
            "--queue-depth",
            "64",
            "--api-socket",
            "/tmp/a",
        ])
        .unwrap();
        assert_eq!(c.queues, 2);
        assert_eq!(c.queue_depth, 64);
        assert_eq!(c.queue_size, 256);
        assert_eq!(c.api_socket, Some(PathBuf::from("/tmp/a")));
    }

    #[test]
    fn errors_are_one_line_and_name_the_problem() {
        for (args, needle) in [
            (vec!["--disk", "path=x"], "--socket"),
            (
                vec!["--socket", "s", "--disk", "path=x", "--bogus"],
                "--bogus",
            ),
            (vec!["--socket", "s", "--disk", "readonly=on"], "path="),
            (
                vec!["--socket", "s", "--disk", "path=x", "--queues", "0"],
                "--queues",
            ),
            (
                vec!["--socket", "s", "--disk", "path=x", "--queue-size", "100"],
                "--queue-size",
            ),
            (
                vec!["--socket", "s", "--disk", "path=x", "--queues", "many"],
                "many",
            ),
        ] {
            let e = parse(&args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
            assert!(!e.contains('\n'), "{args:?}: {e}");
        }
    }
}
