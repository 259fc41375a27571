//! What the daemon serves, checked once: from the command line (one disk, or `--config
//! FILE`), and each disk the API adds later through the same check ([`DiskText::check`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use daemon_support::access::AccessTable;
use daemon_support::audit::AuditConfig;
use storage_core::disk::graph::GraphSpec;
use storage_core::disk::{DiskSpec, NodeSpec, SpecError, ThrottleSpec};
use storage_core::throttle::{LimitError, ThrottleLimits};

use crate::config_file;

/// `--poll-us` when none is given. Where waking a sleeping CPU costs 16-18 µs, a driver's
/// next request often comes more than 32 µs after the last completion (its own wake-up
/// and refill), and a 32 µs window kept collapsing. blk-compare, 32 -> 100 µs (ours/qemu-
/// storage-daemon): null-randread-4k-qd32 0.76x -> 1.50x, randread-4k-qd1 1.01x -> 1.51x
/// (p50 82 -> 62 µs). KVM's halt polling allows 200 µs; the window still adapts and closes
/// while the CPU is shared.
const DEFAULT_POLL_US: u64 = 100;

/// vhost-user-blk daemon: serves disks to VMMs over vhost-user sockets: one from the command
/// line, or any number from a config file and the API.
/// The command-line definition, for the man pages.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Debug, Parser)]
#[command(name = "vhost-blk", version, about)]
struct Cli {
    /// The daemon's configuration: disks, API, access and audit (TOML; see
    /// vhost-blk.example.toml). Disks added or removed through the API are written back to it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["socket", "disk", "blockdev", "object", "id"])]
    config: Option<PathBuf>,
    /// Path of the vhost-user socket to listen on.
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    socket: Option<PathBuf>,
    /// The disk: path=FILE|null[,size=BYTES][,read-zeroes=on|off][,readonly=on|off]
    /// [,direct=on|off][,serial=STR][,engine=io_uring|sync], plus the cache and throttle keys
    /// (see README); or node=NAME[,serial=STR][,readonly=on], the root of the --blockdev graph.
    #[arg(long, value_name = "SPEC", required_unless_present = "config")]
    disk: Option<String>,
    /// The disk's name in the API and metrics.
    #[arg(long, value_name = "NAME", default_value = "disk0")]
    id: String,
    /// One node of the disk's graph, as qemu-storage-daemon's --blockdev: driver=...,
    /// node-name=..., children by name (key=value,... or JSON). Repeatable.
    #[arg(long, value_name = "NODE")]
    blockdev: Vec<String>,
    /// An object the nodes refer to: throttle-group,id=NAME,iops-total=N,... Repeatable.
    #[arg(long, value_name = "OBJECT")]
    object: Vec<String>,
    /// Number of request queues offered (one worker thread each).
    #[arg(long, value_name = "N")]
    queues: Option<u16>,
    /// Largest virtqueue size offered to the driver.
    #[arg(long, value_name = "N")]
    queue_size: Option<u16>,
    /// Requests in flight per queue (io_uring entries per worker).
    #[arg(long, value_name = "N")]
    queue_depth: Option<u32>,
    /// Keep polling a queue for this many microseconds after its last request before
    /// sleeping (adaptive polling: lower latency, costs CPU only while busy). Default 100; 0
    /// disables.
    #[arg(long, value_name = "US")]
    poll_us: Option<u64>,
    /// Serve the management API (HTTP on a unix socket) here.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Let this group (a name or a number) connect to the sockets too (mode 0660); without
    /// it they are the owner's alone (0600).
    #[arg(long = "socket-group", value_name = "GROUP")]
    socket_group: Option<String>,
    /// Record every mutating API call and every denial here (JSON lines, hash-chained).
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
}

/// The keys of [`DiskText`], as written.
pub const DISK_KEYS: &[&str] = &[
    "id",
    "socket",
    "disk",
    "blockdev",
    "object",
    "queues",
    "queue-size",
    "queue-depth",
    "poll-us",
    "limits",
    "snapshot-policy",
    "added-by-operator",
];

/// One disk as the user writes it: a `[[disk]]` table of the config file, the body of
/// `POST /v1/disks`, or the command line's flags.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DiskText {
    /// The disk's name: letters, digits, `.`, `_`, `-`; at most 64.
    pub id: String,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// As `--disk`.
    pub disk: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blockdev: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub object: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_us: Option<u64>,
    /// QoS limits with QEMU's names (`iops-total`, `bps-read`, `iops-total-max`, ...): the
    /// disk gets a throttle node of its own at its root, whose limits the API can change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsText>,
    /// Snapshots on a schedule, and how many to keep (qcow2 disks; see `lifecycle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_policy: Option<crate::lifecycle::PolicyText>,
    /// Added through the API by an operator (set by the daemon): its files are checked as
    /// an operator's again whenever the daemon starts (see `admission`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub added_by_operator: bool,
}

/// Throttle limits as the config file and the API spell them: QEMU's key, a number.
pub type LimitsText = std::collections::BTreeMap<String, u64>;

/// Checked limits from their text.
pub fn parse_limits(text: &LimitsText) -> Result<ThrottleLimits, LimitError> {
    let mut limits = ThrottleLimits::default();
    for (k, v) in text {
        limits.set(k, &v.to_string())?;
    }
    limits.check()
}

/// A snapshot policy for the disk `spec` describes: refused where a snapshot would be
/// refused every time (not qcow2, backing=null, read-only, an operator's disk).
pub fn check_policy(
    spec: &DiskSpec,
    added_by_operator: bool,
    text: &crate::lifecycle::PolicyText,
) -> Result<crate::lifecycle::SnapshotPolicy, String> {
    let qcow2_root = match &spec.root {
        NodeSpec::Qcow2 { backing, .. } => Some(backing),
        NodeSpec::Throttle { child, .. } => match &**child {
            NodeSpec::Qcow2 { backing, .. } => Some(backing),
            _ => None,
        },
        _ => None,
    };
    let refusal = match qcow2_root {
        None => Some("snapshots are of qcow2 disks (format=qcow2)"),
        Some(storage_core::qcow2::Backing::Without) => {
            Some("the disk is opened with backing=null, which takes no snapshots")
        }
        Some(_) if spec.read_only => Some("a read-only disk takes no snapshots"),
        Some(_) if added_by_operator => Some("an operator's disk takes no snapshots yet"),
        Some(_) => None,
    };
    match refusal {
        Some(m) => Err(m.into()),
        None => text.check(),
    }
}

/// One disk, checked.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// As given: what the config file and the API show.
    pub text: DiskText,
    pub spec: DiskSpec,
    pub queues: u16,
    pub queue_size: u16,
    pub queue_depth: u32,
    pub poll: Duration,
    pub policy: Option<crate::lifecycle::SnapshotPolicy>,
    /// Kept in the config file (when there is one): not a disk given its passphrase
    /// through the API.
    pub in_file: bool,
}

impl DiskConfig {
    pub fn id(&self) -> &str {
        &self.text.id
    }
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub disks: Vec<DiskConfig>,
    pub api_socket: Option<PathBuf>,
    /// The group that may connect to the sockets besides their owner.
    pub socket_group: Option<u32>,
    /// Who may call the API.
    pub access: AccessTable,
    pub audit: Option<AuditConfig>,
    /// Where disks added or removed at run time are written back.
    pub config_file: Option<PathBuf>,
    /// Named throttle groups' limits set through the API (they win over the disks' own).
    pub group_limits: Vec<(String, ThrottleLimits)>,
    /// Where an operator's disks may have their files and sockets.
    pub operator_paths: crate::admission::OperatorPaths,
    /// The access table came from `[[access]]` rules (not the default).
    pub access_rules_given: bool,
    /// When free space under a disk's files is worth an alert.
    pub space: crate::space::SpacePolicy,
    /// What the dashboard's history keeps, and where.
    pub history: crate::history::HistoryPolicy,
    /// The API over TCP with TLS (config file only).
    pub api_tls: Option<TlsConfig>,
}

/// Where the API listens over TCP, and with which certificate.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: std::net::SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Usage(String),
    #[error("disk {id:?}: {source}")]
    Disk {
        id: String,
        #[source]
        source: SpecError,
    },
    #[error("disk {id:?}: blockdev: {source}")]
    Blockdev {
        id: String,
        #[source]
        source: SpecError,
    },
    #[error("disk {id:?}: object: {source}")]
    Object {
        id: String,
        #[source]
        source: SpecError,
    },
    #[error("disk {id:?}: limits: {message}")]
    Limits { id: String, message: String },
    #[error("disk {id:?}: snapshot-policy: {message}")]
    Policy { id: String, message: String },
    #[error("disk id {0:?}: use 1 to 64 letters, digits, '.', '_' or '-'")]
    Id(String),
    #[error(
        "disk {0:?}: a passphrase is given, but no node takes it (format=luks, or an \
         encrypted format=qcow2, with no key-file=)"
    )]
    Passphrase(String),
    #[error("disk {0:?}: queues must be between 1 and 64 (not {1})")]
    Queues(String, u16),
    #[error("disk {0:?}: queue-size must be a power of two between 2 and 1024 (not {1})")]
    QueueSize(String, u16),
    #[error("disk {0:?}: queue-depth must be between 1 and 4096 (not {1})")]
    QueueDepth(String, u32),
    #[error("disk {0:?}: poll-us must be at most 1000000 (not {1})")]
    Poll(String, u64),
    #[error("disk {0:?} is given twice")]
    DuplicateId(String),
    #[error("disks {0:?} and {1:?} have the same socket")]
    DuplicateSocket(String, String),
    #[error(transparent)]
    SocketGroup(#[from] daemon_support::socket::SocketError),
    #[error(transparent)]
    File(#[from] config_file::FileError),
}

/// What the command line asks for.
pub enum Command {
    Run(Box<Config>),
    /// `--help` or `--version`: print this and exit 0.
    Print(String),
}

impl DiskText {
    /// The checks every disk passes, wherever it comes from.
    pub fn check(self) -> Result<DiskConfig, ConfigError> {
        self.check_given(None)
    }

    /// [`check`](Self::check), with a passphrase given through the API for the encrypted
    /// nodes that name no key file (one of them at least must take it). Such a disk is not
    /// kept in the config file: the passphrase is written nowhere.
    pub fn check_given(
        self,
        given: Option<std::sync::Arc<storage_core::crypto::key_file::Passphrase>>,
    ) -> Result<DiskConfig, ConfigError> {
        let id = self.id.clone();
        let id_ok = (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !id_ok {
            return Err(ConfigError::Id(id));
        }
        let mut graph = GraphSpec::default();
        let in_file = given.is_none();
        if let Some(p) = given {
            graph.give_passphrase(p);
        }
        for o in &self.object {
            graph.add_object(o).map_err(|source| ConfigError::Object {
                id: id.clone(),
                source,
            })?;
        }
        for b in &self.blockdev {
            graph
                .add_blockdev(b)
                .map_err(|source| ConfigError::Blockdev {
                    id: id.clone(),
                    source,
                })?;
        }
        let mut spec = graph
            .resolve(&self.disk)
            .map_err(|source| ConfigError::Disk {
                id: id.clone(),
                source,
            })?;
        spec.root.settle_given_key();
        if !in_file && !spec.root.takes_given_key() {
            return Err(ConfigError::Passphrase(id));
        }
        if let Some(text) = &self.limits {
            let limits = parse_limits(text).map_err(|e| ConfigError::Limits {
                id: id.clone(),
                message: e.to_string(),
            })?;
            spec.root = match spec.root {
                NodeSpec::Throttle {
                    child,
                    limits: ThrottleSpec::Private(_),
                } => NodeSpec::Throttle {
                    child,
                    limits: ThrottleSpec::Private(limits),
                },
                NodeSpec::Throttle {
                    limits: ThrottleSpec::Group { name, .. },
                    ..
                } => {
                    return Err(ConfigError::Limits {
                        id,
                        message: format!(
                            "its throttle node uses group {name:?}: set the group's limits"
                        ),
                    })
                }
                root => NodeSpec::Throttle {
                    child: Box::new(root),
                    limits: ThrottleSpec::Private(limits),
                },
            };
        }
        let policy = match &self.snapshot_policy {
            Some(text) => Some(check_policy(&spec, self.added_by_operator, text).map_err(
                |message| ConfigError::Policy {
                    id: id.clone(),
                    message,
                },
            )?),
            None => None,
        };
        let queues = self.queues.unwrap_or(1);
        if !(1..=64).contains(&queues) {
            return Err(ConfigError::Queues(id, queues));
        }
        let queue_size = self.queue_size.unwrap_or(256);
        if !(2..=1024).contains(&queue_size) || !queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize(id, queue_size));
        }
        let queue_depth = self.queue_depth.unwrap_or(32);
        if !(1..=4096).contains(&queue_depth) {
            return Err(ConfigError::QueueDepth(id, queue_depth));
        }
        let poll_us = self.poll_us.unwrap_or(DEFAULT_POLL_US);
        if poll_us > 1_000_000 {
            return Err(ConfigError::Poll(id, poll_us));
        }
        Ok(DiskConfig {
            text: self,
            spec,
            queues,
            queue_size,
            queue_depth,
            poll: Duration::from_micros(poll_us),
            policy,
            in_file,
        })
    }
}

/// No two disks share an id or a socket.
pub fn check_distinct<'a>(
    disks: impl IntoIterator<Item = &'a DiskText>,
) -> Result<(), ConfigError> {
    let mut seen: Vec<&DiskText> = Vec::new();
    for d in disks {
        for s in &seen {
            if s.id == d.id {
                return Err(ConfigError::DuplicateId(d.id.clone()));
            }
            if s.socket == d.socket {
                return Err(ConfigError::DuplicateSocket(s.id.clone(), d.id.clone()));
            }
        }
        seen.push(d);
    }
    Ok(())
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
        let mut config = match &cli.config {
            Some(path) => config_file::load(path)?,
            None => {
                let text = DiskText {
                    id: cli.id,
                    socket: cli.socket.expect("clap requires --socket without --config"),
                    disk: cli.disk.expect("clap requires --disk without --config"),
                    blockdev: cli.blockdev,
                    object: cli.object,
                    queues: None,
                    queue_size: None,
                    queue_depth: None,
                    poll_us: None,
                    limits: None,
                    snapshot_policy: None,
                    added_by_operator: false,
                };
                Config {
                    disks: vec![text.check()?],
                    api_socket: None,
                    socket_group: None,
                    access: AccessTable::owner_and_group(None),
                    audit: None,
                    config_file: None,
                    group_limits: Vec::new(),
                    operator_paths: Default::default(),
                    access_rules_given: false,
                    space: Default::default(),
                    history: Default::default(),
                    api_tls: None,
                }
            }
        };
        // Flags given beside a config file override its daemon-wide keys and every
        // disk's tuning.
        if cli.queues.is_some()
            || cli.queue_size.is_some()
            || cli.queue_depth.is_some()
            || cli.poll_us.is_some()
        {
            let disks = std::mem::take(&mut config.disks);
            for d in disks {
                let mut text = d.text;
                text.queues = cli.queues.or(text.queues);
                text.queue_size = cli.queue_size.or(text.queue_size);
                text.queue_depth = cli.queue_depth.or(text.queue_depth);
                text.poll_us = cli.poll_us.or(text.poll_us);
                config.disks.push(text.check()?);
            }
        }
        if cli.api_socket.is_some() {
            config.api_socket = cli.api_socket;
        }
        if let Some(g) = cli.socket_group.as_deref() {
            config.socket_group = Some(daemon_support::socket::group_id(g)?);
            if !config.access_rules_given {
                let tokens = config.access.tokens().to_vec();
                config.access =
                    AccessTable::owner_and_group(config.socket_group).with_tokens(tokens);
            }
        }
        if let Some(path) = cli.audit_log {
            // The file's retention and size keys stay.
            let mut audit = config
                .audit
                .take()
                .unwrap_or_else(|| AuditConfig::new(path.clone()));
            audit.path = path;
            config.audit = Some(audit);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit log keeps the values of exactly a disk's settings (anything else in a
    /// `POST /v1/disks` body, a passphrase, is redacted).
    #[test]
    fn disk_keys_are_the_settings_of_a_disk() {
        let all = serde_json::json!({
            "id": "a", "socket": "/s", "disk": "path=null,size=1M", "blockdev": ["b"],
            "object": ["o"], "queues": 1, "queue-size": 2, "queue-depth": 3, "poll-us": 4,
            "limits": {"iops-total": 5}, "snapshot-policy": {"schedule": "every 1h"},
            "added-by-operator": true,
        });
        let keys: Vec<&str> = all
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut want = DISK_KEYS.to_vec();
        want.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, want);
        let text: DiskText = serde_json::from_value(all.clone()).unwrap();
        assert_eq!(serde_json::to_value(&text).unwrap(), all);
    }

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
        let d = &c.disks[0];
        assert_eq!(d.id(), "disk0");
        assert_eq!(d.queues, 2);
        assert_eq!(d.queue_depth, 64);
        assert_eq!(d.queue_size, 256);
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
                "queues",
            ),
            (
                vec!["--socket", "s", "--disk", "path=x", "--queue-size", "100"],
                "queue-size",
            ),
            (
                vec!["--socket", "s", "--disk", "path=x", "--queues", "many"],
                "many",
            ),
            (
                vec!["--socket", "s", "--disk", "path=x", "--id", "a/b"],
                "a/b",
            ),
            (vec!["--config", "c.toml", "--disk", "path=x"], "--disk"),
        ] {
            let e = parse(&args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
            assert!(!e.contains('\n'), "{args:?}: {e}");
        }
    }
}
