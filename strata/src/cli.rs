//! The command line of `strata`, apart so that the man pages are generated from it.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "strata", version, about = "Manage Strata's storage daemons.")]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(
        long,
        global = true,
        env = "STRATA_API",
        default_value = "/run/strata/blk-api.sock"
    )]
    pub api: PathBuf,
    /// The API over TCP instead: https://HOST:PORT (with --token and --cacert).
    #[arg(long, global = true, env = "STRATA_URL", value_name = "URL")]
    pub url: Option<String>,
    /// The bearer token for --url.
    #[arg(
        long,
        global = true,
        env = "STRATA_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Read the bearer token from this file instead (it stays out of the process list).
    #[arg(long, global = true, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// The certificate (or its CA) to trust for --url, PEM.
    #[arg(long, global = true, env = "STRATA_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The disks a vhost-blk daemon serves.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Named throttle groups (QoS limits shared by several disks).
    #[command(subcommand, name = "throttle-group")]
    ThrottleGroup(GroupCommand),
    /// Snapshots of qcow2 disks (external: the image as it was keeps the snapshot's name).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Image files on this host, not served by a daemon (qemu-img's checks).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Passphrases of encrypted (LUKS) disks, changed while they serve. Passphrases are read
    /// from key files (mode 0600, yours), never from the command line.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Long operations (a preallocating resize): list them, or show or cancel one.
    Jobs {
        #[command(subcommand)]
        action: Option<JobsCommand>,
    },
    /// Whether the daemon is up, and what it serves.
    Health,
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Bearer tokens for the API over TCP.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Any API call, for scripts and debugging: METHOD PATH [--data JSON].
    Raw {
        method: String,
        path: String,
        #[arg(long, value_name = "JSON")]
        data: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// List the disks.
    List,
    /// One disk in full.
    Show { id: String },
    /// Add a disk: its socket appears and serves at once.
    Add {
        id: String,
        /// Its vhost-user socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The disk spec, as vhost-blk's --disk.
        #[arg(long, value_name = "SPEC")]
        disk: String,
        #[arg(long, value_name = "NODE")]
        blockdev: Vec<String>,
        #[arg(long, value_name = "OBJECT")]
        object: Vec<String>,
        #[arg(long)]
        queues: Option<u16>,
        #[arg(long)]
        queue_size: Option<u16>,
        #[arg(long)]
        queue_depth: Option<u32>,
        #[arg(long)]
        poll_us: Option<u64>,
        /// A key file (mode 0600, yours) whose passphrase the daemon opens the disk's
        /// encrypted nodes with (admin; those that name no key file of their own). The
        /// passphrase is written nowhere: the disk is not kept for the next start.
        #[arg(long, value_name = "PATH")]
        passphrase_file: Option<PathBuf>,
    },
    /// Set a disk's own QoS limits, QEMU's names: strata disk limits vm1 iops-total=5000
    /// bps-read=104857600 (none: no limits). The disk must have been given limits when added.
    Limits {
        id: String,
        #[arg(value_name = "KEY=VALUE")]
        limits: Vec<String>,
    },
    /// Grow a disk (bytes, or with a unit: 20G); the guest sees the new size at once. With
    /// --preallocate, the new space is allocated first, as a job (see `strata jobs`).
    Resize {
        id: String,
        size: String,
        /// falloc (the file system reserves the space) or full (zeroes written).
        #[arg(long, value_name = "MODE", value_parser = ["falloc", "full"])]
        preallocate: Option<String>,
        /// With --preallocate: wait until the job ends, and fail if it does not succeed.
        #[arg(long, requires = "preallocate")]
        wait: bool,
    },
    /// Remove a disk: refused while a frontend is connected, unless --force (admin), which
    /// disconnects it after draining and flushing.
    Remove {
        id: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a new token: prints it once, and the [[token]] table (its hash) for the config.
    New {
        /// Who holds it (the audit log names it token:NAME).
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// The jobs, running and finished (the default).
    List,
    /// One job.
    Show { id: String },
    /// Ask a running job to stop; it undoes what it did.
    Cancel { id: String },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Check a qcow2 image's or a tier cache device's metadata as `qemu-img check` does
    /// (exit 0 clean, 2 corrupt, 3 leaks only, 1 not checked); with --repair, repair what
    /// is safe (leaks: space lost, a cache's damaged spare superblock; all: refcounts,
    /// entries past the end of the file, COPIED flags, cache slots past the capacity
    /// device or doubling a block). The file must not be in use.
    Check {
        file: std::path::PathBuf,
        #[arg(long, value_name = "WHAT", value_parser = ["leaks", "all"])]
        repair: Option<String>,
    },
    /// Make an image file of SIZE bytes (or with a unit: 20G), as qemu-img create and
    /// cryptsetup luksFormat do: qcow2 (encrypted with --key-file: LUKS inside qcow2, QEMU's
    /// encrypt.format=luks), or luks (LUKS1, which QEMU reads too, or LUKS2) with a new
    /// random master key in keyslot 0 under the passphrase in --key-file.
    Create {
        file: std::path::PathBuf,
        size: String,
        #[arg(long, value_parser = ["qcow2", "luks"])]
        format: String,
        /// The key file holding the passphrase (mode 0600 or stricter, yours).
        #[arg(long, value_name = "PATH")]
        key_file: Option<std::path::PathBuf>,
        /// With --format luks: 1 (QEMU and cryptsetup read it) or 2 (cryptsetup's default).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        luks_version: u8,
        /// With --luks-version 2: the payload's sector size, 512 to 4096.
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
        /// Milliseconds of key derivation for the keyslot (2000 unless given, as QEMU's
        /// iter-time): PBKDF2 for LUKS1 and qcow2, Argon2id for LUKS2.
        #[arg(long, default_value_t = 2000)]
        iter_time: u64,
        /// With --format qcow2: the cluster size (64K unless given).
        #[arg(long, default_value = "64K")]
        cluster_size: String,
        /// With --format qcow2: a backing file, as the image will record it.
        #[arg(long, value_name = "NAME")]
        backing: Option<String>,
        /// The backing file's format (qcow2 or raw).
        #[arg(long, value_parser = ["qcow2", "raw"], requires = "backing")]
        backing_format: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// A disk's snapshots, nearest first.
    List { disk: String },
    /// Take a snapshot of a disk while its guest runs (the guest pauses briefly).
    Create { disk: String, name: String },
    /// Delete a snapshot while the guest runs: a job copies its data up into the image
    /// above it, then it leaves the chain.
    Delete {
        disk: String,
        name: String,
        /// Wait until the job ends, and fail if it does not succeed.
        #[arg(long)]
        wait: bool,
    },
    /// Put a disk back as it was at a snapshot (admin; no frontend connected): what was
    /// written since, and the newer snapshots, are removed.
    Revert { disk: String, name: String },
    /// Set a disk's snapshot policy (kept in the config), or remove it with --off.
    Policy {
        disk: String,
        /// "every N" with a unit (s, m, h: "every 30m"), or "daily HH:MM" (UTC).
        #[arg(long, required_unless_present = "off")]
        schedule: Option<String>,
        /// Delete policy snapshots older than this many days.
        #[arg(long, value_name = "DAYS")]
        retention: Option<u64>,
        /// Keep at most this many policy snapshots (10 unless given).
        #[arg(long, value_name = "N")]
        max_snapshots: Option<u32>,
        /// Minutes between clean-ups (1440 unless given).
        #[arg(long, value_name = "MINUTES")]
        cleanup_interval: Option<u64>,
        /// Remove the policy (its snapshots stay).
        #[arg(long, conflicts_with_all = ["schedule", "retention", "max_snapshots", "cleanup_interval"])]
        off: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// An encrypted disk's LUKS version and keyslots in use.
    List { disk: String },
    /// Add a passphrase (a new keyslot), authorised by one the disk takes now (admin).
    Add {
        disk: String,
        /// A passphrase the disk takes now.
        #[arg(long, value_name = "FILE")]
        key_file: std::path::PathBuf,
        /// The passphrase to add.
        #[arg(long, value_name = "FILE")]
        new_key_file: std::path::PathBuf,
        /// Milliseconds of key derivation for the new keyslot (2000 unless given): PBKDF2
        /// in LUKS1, Argon2id in LUKS2.
        #[arg(long, value_name = "MS")]
        iter_time: Option<u64>,
    },
    /// Remove a keyslot, authorised by the passphrase of another one (admin).
    Remove {
        disk: String,
        slot: u32,
        #[arg(long, value_name = "FILE")]
        key_file: std::path::PathBuf,
    },
    /// Change a passphrase (key rotation): the new one gets a keyslot, then the old one's
    /// keyslot is removed (admin).
    Change {
        disk: String,
        #[arg(long, value_name = "FILE")]
        key_file: std::path::PathBuf,
        #[arg(long, value_name = "FILE")]
        new_key_file: std::path::PathBuf,
        #[arg(long, value_name = "MS")]
        iter_time: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// The groups the disks use, with their limits and members.
    List,
    /// Set a group's limits (every member at once): KEY=VALUE with QEMU's names.
    Limits {
        name: String,
        #[arg(value_name = "KEY=VALUE")]
        limits: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the log's hash chain; report the first line that breaks it.
    Verify { file: PathBuf },
}

/// The command-line definition, for the man pages.
pub fn command() -> clap::Command {
    Cli::command()
}
