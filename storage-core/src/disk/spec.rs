//! The disk spec: the `key=value,...` string a user gives on the command line, parsed once
//! into a checked [`DiskSpec`].

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::crypto::key_file::Passphrase;

use crate::engine::EngineKind;
use crate::throttle::ThrottleLimits;
use crate::tier::{CacheMode, TierSpec};
use crate::units::{ByteSize, SECTOR_SIZE};

/// Longest serial number virtio-blk's GET_ID can return.
pub const MAX_SERIAL_LEN: usize = 20;

/// One node of a disk's graph, as specified.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeSpec {
    /// A regular file or block device, through the engine seam.
    File {
        path: PathBuf,
        /// Open with O_DIRECT (bypass the host page cache).
        direct: bool,
        /// Force an engine (`engine=sync`); by default io_uring where it helps.
        engine: Option<EngineKind>,
        /// Take QEMU's lock bytes on the image, refusing it if another program uses it
        /// in a conflicting way (`locking=off`: an image shared on purpose).
        locking: bool,
    },
    /// No storage: writes are accepted and dropped. Reads fill the buffer with zeroes, or with
    /// `read_zeroes` off (QEMU null-co's `read-zeroes=off`) leave it untouched: the guest
    /// then reads back its own buffer, which measures the daemon alone.
    Null { size: u64, read_zeroes: bool },
    /// A cache file in front of a capacity child.
    Tier {
        capacity: Box<NodeSpec>,
        tier: TierSpec,
        /// The cache file's engine, if forced.
        cache_engine: Option<EngineKind>,
    },
    /// An image on a Ceph cluster, through librbd (cargo feature `rbd`).
    Rbd(RbdSpec),
    /// IOPS and bandwidth limits over a child.
    Throttle {
        child: Box<NodeSpec>,
        limits: ThrottleSpec,
    },
    /// A qcow2 image in its `file` child, over the backing chain it names.
    Qcow2 {
        file: Box<NodeSpec>,
        backing: crate::qcow2::Backing,
        /// Bytes of L2 tables kept in memory (QEMU's `l2-cache-size`).
        l2_cache: u64,
        /// For an encrypted image (LUKS in qcow2): its passphrase, for every encrypted
        /// image of its chain.
        key: Option<KeySource>,
    },
    /// A LUKS image in its `file` child, served decrypted, unlocked with the passphrase
    /// `key` gives.
    Luks { file: Box<NodeSpec>, key: KeySource },
}

/// Where an encrypted node's passphrase comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A key file (see [`crate::crypto::key_file`]), read when the node opens.
    File(PathBuf),
    /// Given through the management API: held in locked memory, never written anywhere.
    Given(Arc<Passphrase>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(p) => f.debug_tuple("File").field(p).finish(),
            KeySource::Given(_) => f.write_str("Given(..)"),
        }
    }
}

impl PartialEq for KeySource {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (KeySource::File(a), KeySource::File(b)) => a == b,
            (KeySource::Given(a), KeySource::Given(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl NodeSpec {
    /// A passphrase given through the API goes to the topmost encrypted nodes: a qcow2
    /// image under a luks node holds the LUKS payload, and does not take it.
    pub fn settle_given_key(&mut self) {
        self.settle(false)
    }

    fn settle(&mut self, under_luks: bool) {
        match self {
            NodeSpec::Luks { file, key } => {
                let given = matches!(key, KeySource::Given(_));
                file.settle(under_luks || given)
            }
            NodeSpec::Qcow2 { file, key, .. } => {
                if under_luks && matches!(key, Some(KeySource::Given(_))) {
                    *key = None;
                }
                file.settle(under_luks)
            }
            NodeSpec::Tier { capacity, .. } => capacity.settle(under_luks),
            NodeSpec::Throttle { child, .. } => child.settle(under_luks),
            NodeSpec::File { .. } | NodeSpec::Null { .. } | NodeSpec::Rbd(_) => {}
        }
    }

    /// Whether a node of the graph takes the passphrase given through the API.
    pub fn takes_given_key(&self) -> bool {
        match self {
            NodeSpec::Luks { file, key } => {
                matches!(key, KeySource::Given(_)) || file.takes_given_key()
            }
            NodeSpec::Qcow2 { file, key, .. } => {
                matches!(key, Some(KeySource::Given(_))) || file.takes_given_key()
            }
            NodeSpec::Tier { capacity, .. } => capacity.takes_given_key(),
            NodeSpec::Throttle { child, .. } => child.takes_given_key(),
            NodeSpec::File { .. } | NodeSpec::Null { .. } | NodeSpec::Rbd(_) => false,
        }
    }
}

impl KeySource {
    /// The passphrase (a key file read now).
    pub fn passphrase(&self) -> Result<Arc<Passphrase>, crate::crypto::key_file::KeyFileError> {
        match self {
            KeySource::File(p) => crate::crypto::key_file::read(p).map(Arc::new),
            KeySource::Given(p) => Ok(p.clone()),
        }
    }
}

/// Where an RBD image is: `driver=rbd,pool=P,image=I[,conf=FILE][,id=USER]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    pub image: String,
    /// ceph.conf to read; librados's default search otherwise.
    pub conf: Option<PathBuf>,
    /// The client id (`admin` for client.admin); librados's default otherwise.
    pub id: Option<String>,
}

/// Where a throttle node's limits come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ThrottleSpec {
    /// Its own limits, shared with nobody.
    Private(ThrottleLimits),
    /// A named group, shared by every node (of any disk) that names it; the limits are
    /// given where the group is first named.
    Group {
        name: String,
        limits: Option<ThrottleLimits>,
    },
}

impl NodeSpec {
    /// The first leaf's name (a path, or `null:SIZE`): what the disk is called when nobody
    /// named it.
    pub fn leaf_name(&self) -> String {
        match self {
            NodeSpec::File { path, .. } => std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.clone())
                .to_string_lossy()
                .into_owned(),
            NodeSpec::Null { size, .. } => format!("null:{size}"),
            NodeSpec::Rbd(r) => format!("rbd:{}/{}", r.pool, r.image),
            NodeSpec::Tier { capacity, .. } => capacity.leaf_name(),
            NodeSpec::Throttle { child, .. } => child.leaf_name(),
            NodeSpec::Qcow2 { file, .. } | NodeSpec::Luks { file, .. } => file.leaf_name(),
        }
    }

    /// Where the data lives, as the user named it (what `DiskInfo::path` says for a disk
    /// opened from this spec), without touching the file system.
    pub fn data_path(&self) -> String {
        match self {
            NodeSpec::File { path, .. } => path.display().to_string(),
            NodeSpec::Null { .. } => "null".to_string(),
            NodeSpec::Rbd(r) => format!("rbd:{}/{}", r.pool, r.image),
            NodeSpec::Tier { capacity, .. } => capacity.data_path(),
            NodeSpec::Throttle { child, .. } => child.data_path(),
            NodeSpec::Qcow2 { file, .. } | NodeSpec::Luks { file, .. } => file.data_path(),
        }
    }

    /// Calls `f` on every file the graph stores data in, with whether the node creates it
    /// when missing (a tier's cache file).
    pub fn files_mut(&mut self, f: &mut dyn FnMut(&mut PathBuf, bool)) {
        match self {
            NodeSpec::File { path, .. } => f(path, false),
            NodeSpec::Tier { capacity, tier, .. } => {
                f(&mut tier.cache, true);
                capacity.files_mut(f);
            }
            NodeSpec::Throttle { child, .. } => child.files_mut(f),
            // The backing chain's files are named by the image, not by the spec.
            NodeSpec::Qcow2 { file, .. } => file.files_mut(f),
            // A key file is read, not stored in (and admission asks an admin for it).
            NodeSpec::Luks { file, .. } => file.files_mut(f),
            NodeSpec::Null { .. } | NodeSpec::Rbd(_) => {}
        }
    }

    /// The files the graph stores data in (see [`files_mut`](Self::files_mut)).
    pub fn files(&self) -> Vec<(PathBuf, bool)> {
        let mut out = Vec::new();
        self.clone()
            .files_mut(&mut |p, create| out.push((p.clone(), create)));
        out
    }

    /// The first tier in the graph, from the root down.
    pub fn tier(&self) -> Option<&TierSpec> {
        match self {
            NodeSpec::Tier { tier, .. } => Some(tier),
            NodeSpec::Throttle { child, .. } | NodeSpec::Luks { file: child, .. } => child.tier(),
            _ => None,
        }
    }

    /// The first throttle node's limits, from the root down.
    pub fn throttle(&self) -> Option<&ThrottleSpec> {
        match self {
            NodeSpec::Throttle { limits, .. } => Some(limits),
            NodeSpec::Tier { capacity, .. } => capacity.throttle(),
            NodeSpec::Luks { file, .. } => file.throttle(),
            _ => None,
        }
    }
}

/// A parsed, checked disk: its graph and what the guest is told about it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    pub root: NodeSpec,
    pub read_only: bool,
    /// Serial number reported to the guest; derived from the first leaf when absent.
    pub serial: Option<String>,
}

/// What is wrong with a disk spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("disk spec is missing path= (a file, a block device, or null)")]
    MissingPath,
    #[error("disk spec has an entry without '=': {0:?}")]
    NotKeyValue(String),
    #[error("disk spec key {0:?} is given twice")]
    Duplicate(String),
    #[error(
        "unknown disk spec key {0:?} (known: path, format, key-file, size, read-zeroes, readonly, \
         direct, locking, serial, engine, cache, cache-size, cache-mode, cache-policy, cache-block, seq-cutoff, \
         cache-format, throttle-group and the throttle limits: iops-total, bps-read, ...)"
    )]
    UnknownKey(String),
    #[error("throttle: {0}")]
    Throttle(#[from] crate::throttle::LimitError),
    #[error("{0}")]
    Graph(String),
    #[error("disk spec {key}={value:?}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: String,
    },
}

pub(super) fn bad(key: &str, value: &str, reason: impl Into<String>) -> SpecError {
    SpecError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

pub(super) fn on_off(key: &str, value: &str) -> Result<bool, SpecError> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(bad(key, value, "expected on or off")),
    }
}

fn byte_size(key: &str, value: &str) -> Result<u64, SpecError> {
    Ok(value
        .parse::<ByteSize>()
        .map_err(|e| bad(key, value, e.to_string()))?
        .0)
}

/// A null disk's size.
pub(super) fn null_size(value: &str) -> Result<u64, SpecError> {
    let bytes = byte_size("size", value)?;
    if bytes == 0 || bytes % SECTOR_SIZE != 0 {
        return Err(bad("size", value, "must be a non-zero multiple of 512"));
    }
    Ok(bytes)
}

pub(super) fn parse_serial(value: &str) -> Result<String, SpecError> {
    if value.len() > MAX_SERIAL_LEN {
        return Err(bad("serial", value, "at most 20 bytes"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("serial", value, "printable ASCII without spaces"));
    }
    Ok(value.to_string())
}

/// `locking=`: on, off, or QEMU's auto, which is on where OFD locks exist, as they do on
/// every Linux this runs on.
pub(super) fn parse_locking(value: &str) -> Result<bool, SpecError> {
    match value {
        "auto" => Ok(true),
        _ => on_off("locking", value),
    }
}

pub(super) fn parse_engine(key: &str, value: &str) -> Result<EngineKind, SpecError> {
    match value {
        "io_uring" => Ok(EngineKind::IoUring),
        // qemu-storage-daemon's aio=threads: blocking calls, as our synchronous engine.
        "sync" | "threads" => Ok(EngineKind::Sync),
        _ => Err(bad(key, value, "expected io_uring or sync")),
    }
}

/// The tier's keys, shared by `--disk` and the `tier` node of `--blockdev`.
#[derive(Debug, Default)]
pub(super) struct TierOptions {
    cache_size: Option<u64>,
    mode: Option<CacheMode>,
    policy: Option<String>,
    block: Option<u64>,
    seq_cutoff: Option<u64>,
    force_format: bool,
}

impl TierOptions {
    /// Takes `key` if it is one of the tier's; says whether it was.
    pub(super) fn set(&mut self, key: &str, value: &str) -> Result<bool, SpecError> {
        match key {
            "cache-size" => self.cache_size = Some(byte_size(key, value)?),
            "cache-mode" => {
                self.mode = Some(value.parse::<CacheMode>().map_err(|e| bad(key, value, e))?)
            }
            "cache-policy" => {
                if !crate::cache::POLICY_NAMES.contains(&value) {
                    return Err(bad(
                        key,
                        value,
                        format!("known policies: {}", crate::cache::POLICY_NAMES.join(", ")),
                    ));
                }
                self.policy = Some(value.to_string());
            }
            "cache-block" => {
                let bytes = byte_size(key, value)?;
                if !(4096..=65536).contains(&bytes) || !bytes.is_power_of_two() {
                    return Err(bad(key, value, "a power of two from 4K to 64K"));
                }
                self.block = Some(bytes);
            }
            "seq-cutoff" => {
                let bytes = byte_size(key, value)?;
                // 0 turns the cutoff off, as in bcache.
                self.seq_cutoff = Some(if bytes == 0 { u64::MAX } else { bytes });
            }
            "cache-format" => {
                if value != "force" {
                    return Err(bad(key, value, "the only value is force"));
                }
                self.force_format = true;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The tier over the cache file `cache` (named by `key` in errors).
    pub(super) fn build(self, key: &str, cache: PathBuf) -> Result<TierSpec, SpecError> {
        let cache_size = self.cache_size.ok_or_else(|| {
            bad(
                key,
                &cache.display().to_string(),
                "a cache needs cache-size= (the size of the cache file)",
            )
        })?;
        Ok(TierSpec {
            cache,
            cache_size,
            mode: self.mode.unwrap_or(CacheMode::WriteThrough),
            policy: self.policy,
            block_size: self.block.unwrap_or(4096),
            seq_cutoff: self.seq_cutoff.unwrap_or(4 << 20),
            force_format: self.force_format,
            locking: true,
        })
    }
}

impl FromStr for DiskSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DiskSpec::parse_given(s, None)
    }
}

impl DiskSpec {
    /// Parses the shorthand; `given`: a passphrase given through the API, for an
    /// encrypted node the spec names no key file for.
    pub fn parse_given(s: &str, given: Option<Arc<Passphrase>>) -> Result<Self, SpecError> {
        let mut path: Option<String> = None;
        let mut size: Option<u64> = None;
        let mut read_only = None;
        let mut direct = None;
        let mut locking = None;
        let mut serial: Option<String> = None;
        let mut engine = None;
        let mut cache: Option<String> = None;
        let mut tier_opts = TierOptions::default();
        let mut read_zeroes = None;
        let mut format = None;
        let mut key_file: Option<PathBuf> = None;
        let mut limits = ThrottleLimits::default();
        let mut throttle_group: Option<String> = None;
        // Any limit key, even one that sets no rate (`iops-total-max` alone): it is checked.
        let mut limit_keys = false;
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| SpecError::NotKeyValue(item.to_string()))?;
            if seen.contains(&key) {
                return Err(SpecError::Duplicate(key.to_string()));
            }
            seen.push(key);
            match key {
                "path" => {
                    if value.is_empty() {
                        return Err(bad("path", value, "empty path"));
                    }
                    path = Some(value.to_string());
                }
                "size" => size = Some(null_size(value)?),
                "readonly" => read_only = Some(on_off("readonly", value)?),
                "direct" => direct = Some(on_off("direct", value)?),
                "locking" => locking = Some(parse_locking(value)?),
                "read-zeroes" => read_zeroes = Some(on_off("read-zeroes", value)?),
                // Explicit, never guessed from a writable image's contents.
                "format" => match value {
                    "raw" | "qcow2" | "luks" => format = Some(value.to_string()),
                    _ => return Err(bad("format", value, "raw, qcow2 or luks")),
                },
                "key-file" => {
                    if value.is_empty() {
                        return Err(bad("key-file", value, "empty path"));
                    }
                    key_file = Some(PathBuf::from(value));
                }
                "serial" => serial = Some(parse_serial(value)?),
                "engine" => engine = Some(parse_engine("engine", value)?),
                "cache" => {
                    if value.is_empty() {
                        return Err(bad("cache", value, "empty path"));
                    }
                    cache = Some(value.to_string());
                }
                key if tier_opts.set(key, value)? => {}
                "throttle-group" => {
                    if value.is_empty() {
                        return Err(bad("throttle-group", value, "empty name"));
                    }
                    throttle_group = Some(value.to_string());
                }
                key if ThrottleLimits::is_key(key) => {
                    limits.set(key, value)?;
                    limit_keys = true;
                }
                other => return Err(SpecError::UnknownKey(other.to_string())),
            }
        }
        let path = path.ok_or(SpecError::MissingPath)?;
        let leaf = if path == "null" {
            let size = size.ok_or_else(|| bad("path", "null", "a null disk needs size="))?;
            if locking.is_some() {
                return Err(bad("locking", "", "a null disk has no file to lock"));
            }
            NodeSpec::Null {
                size,
                read_zeroes: read_zeroes.unwrap_or(true),
            }
        } else {
            if read_zeroes.is_some() {
                return Err(bad(
                    "read-zeroes",
                    "",
                    "only a null disk takes read-zeroes=",
                ));
            }
            if let Some(size) = size {
                return Err(bad(
                    "size",
                    &size.to_string(),
                    "only a null disk takes a size; a file's size is its own",
                ));
            }
            let file = NodeSpec::File {
                path: PathBuf::from(path),
                direct: direct.unwrap_or(false),
                engine,
                locking: locking.unwrap_or(true),
            };
            match format.as_deref() {
                Some("qcow2") => NodeSpec::Qcow2 {
                    file: Box::new(file),
                    backing: crate::qcow2::Backing::FromImage,
                    l2_cache: crate::qcow2::DEFAULT_L2_CACHE,
                    // An encrypted qcow2 image decrypts itself (its IVs are its file's
                    // offsets): the key goes to the qcow2 node.
                    key: key_file
                        .take()
                        .map(KeySource::File)
                        .or_else(|| given.clone().map(KeySource::Given)),
                },
                _ => file,
            }
        };
        if format.is_some() && matches!(leaf, NodeSpec::Null { .. }) {
            return Err(bad("format", "", "a null disk has no format"));
        }
        let root = match cache {
            Some(cache) => {
                if matches!(leaf, NodeSpec::Null { .. }) {
                    return Err(bad("cache", &cache, "a null disk cannot have a cache"));
                }
                let mut tier = tier_opts.build("cache", PathBuf::from(cache))?;
                // locking= is the disk's: its image's and its cache's.
                tier.locking = locking.unwrap_or(true);
                NodeSpec::Tier {
                    capacity: Box::new(leaf),
                    tier,
                    cache_engine: engine,
                }
            }
            None => {
                if let Some(key) = seen
                    .iter()
                    .find(|k| k.starts_with("cache-") || **k == "seq-cutoff")
                {
                    return Err(bad("cache", "", format!("{key}= needs cache=")));
                }
                leaf
            }
        };
        // Encryption over the cache: the cache holds ciphertext only.
        let root = match (format.as_deref(), key_file) {
            (Some("luks"), Some(key_file)) => NodeSpec::Luks {
                file: Box::new(root),
                key: KeySource::File(key_file),
            },
            (Some("luks"), None) => match given {
                Some(p) => NodeSpec::Luks {
                    file: Box::new(root),
                    key: KeySource::Given(p),
                },
                None => return Err(bad("format", "luks", "a LUKS disk needs key-file=")),
            },
            (_, Some(_)) => {
                return Err(bad(
                    "key-file",
                    "",
                    "key-file= is for format=luks or an encrypted format=qcow2",
                ))
            }
            (_, None) => root,
        };
        // Limits wrap the whole disk (over its cache), as a per-VM quota does.
        let limits = if limit_keys {
            let l = limits.check()?;
            if !l.any() {
                return Err(SpecError::Throttle(crate::throttle::LimitError::Conflict(
                    "the throttle keys set no rate (iops-... or bps-...)".into(),
                )));
            }
            l
        } else {
            limits
        };
        let root = match (throttle_group, limit_keys) {
            (None, false) => root,
            (None, true) => NodeSpec::Throttle {
                child: Box::new(root),
                limits: ThrottleSpec::Private(limits),
            },
            (Some(name), any) => NodeSpec::Throttle {
                child: Box::new(root),
                limits: ThrottleSpec::Group {
                    name,
                    limits: if any { Some(limits) } else { None },
                },
            },
        };
        Ok(DiskSpec {
            root,
            read_only: read_only.unwrap_or(false),
            serial,
        })
    }
}

impl DiskSpec {
    /// The serial number to report: the user's, or one derived from the path that is stable
    /// for a path and unlikely to collide between disks (FNV-1a of the canonical path).
    pub fn serial_or_default(&self) -> String {
        if let Some(s) = &self.serial {
            return s.clone();
        }
        let name = self.root.leaf_name();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // "strata-" + 13 hex digits = 20 bytes.
        format!("strata-{:013x}", hash & 0x000f_ffff_ffff_ffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_file_spec() {
        let spec: DiskSpec = "path=/tmp/a.img,readonly=on,direct=off,serial=abc"
            .parse()
            .unwrap();
        assert_eq!(
            spec.root,
            NodeSpec::File {
                path: "/tmp/a.img".into(),
                direct: false,
                engine: None,
                locking: true,
            }
        );
        assert!(spec.read_only);
        assert_eq!(spec.serial.as_deref(), Some("abc"));
    }

    #[test]
    fn locking_is_on_off_or_auto_and_reaches_the_cache() {
        let locking = |spec: &str| -> Result<(bool, Option<bool>), SpecError> {
            let d: DiskSpec = spec.parse()?;
            Ok(match d.root {
                NodeSpec::File { locking, .. } => (locking, None),
                NodeSpec::Tier { capacity, tier, .. } => match *capacity {
                    NodeSpec::File { locking, .. } => (locking, Some(tier.locking)),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(locking("path=/a.img").unwrap(), (true, None));
        assert_eq!(locking("path=/a.img,locking=auto").unwrap(), (true, None));
        assert_eq!(locking("path=/a.img,locking=off").unwrap(), (false, None));
        assert_eq!(
            locking("path=/a.img,locking=off,cache=/c,cache-size=1M").unwrap(),
            (false, Some(false))
        );
        let e = locking("path=/a.img,locking=maybe")
            .unwrap_err()
            .to_string();
        assert!(e.contains("locking"), "{e}");
        assert!(locking("path=null,size=1M,locking=off").is_err());
    }

    #[test]
    fn parses_a_tiered_spec_with_defaults() {
        let spec: DiskSpec = "path=/cap.img,cache=/ssd/c,cache-size=256M"
            .parse()
            .unwrap();
        let t = spec.root.tier().unwrap().clone();
        assert_eq!(t.cache_size, 256 << 20);
        assert_eq!(t.mode, CacheMode::WriteThrough);
        assert_eq!(t.block_size, 4096);
        assert_eq!(t.seq_cutoff, 4 << 20);
        assert!(t.policy.is_none() && !t.force_format);
        let spec: DiskSpec =
            "path=/cap.img,cache=/ssd/c,cache-size=1G,cache-mode=writeback,cache-policy=lru,cache-block=64K,seq-cutoff=0,cache-format=force"
                .parse()
                .unwrap();
        let t = spec.root.tier().unwrap().clone();
        assert_eq!(t.mode, CacheMode::WriteBack);
        assert_eq!(t.policy.as_deref(), Some("lru"));
        assert_eq!(t.block_size, 65536);
        assert_eq!(t.seq_cutoff, u64::MAX);
        assert!(t.force_format);
    }

    #[test]
    fn parses_a_null_spec_with_suffix() {
        let spec: DiskSpec = "path=null,size=2G".parse().unwrap();
        assert_eq!(
            spec.root,
            NodeSpec::Null {
                size: 2 << 30,
                read_zeroes: true
            }
        );
        let spec: DiskSpec = "path=null,size=1M,read-zeroes=off".parse().unwrap();
        assert_eq!(
            spec.root,
            NodeSpec::Null {
                size: 1 << 20,
                read_zeroes: false
            }
        );
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (input, needle) in [
            ("", "missing path"),
            ("readonly=on", "missing path"),
            ("path=null", "needs size"),
            ("path=a,size=1G", "only a null disk"),
            ("path=a,read-zeroes=off", "only a null disk"),
            ("path=a,readonly=maybe", "on or off"),
            ("path=a,colour=blue", "unknown"),
            ("path=a,path=b", "twice"),
            ("path=a,serial=123456789012345678901", "20 bytes"),
            ("path=null,size=1000", "multiple of 512"),
            ("path=a,bogus", "without '='"),
            ("path=a,cache=c", "needs cache-size"),
            ("path=a,cache-size=1G", "needs cache="),
            ("path=a,cache=c,cache-size=1G,cache-mode=fast", "writeback"),
            (
                "path=a,cache=c,cache-size=1G,cache-block=3K",
                "power of two",
            ),
            (
                "path=a,cache=c,cache-size=1G,cache-policy=magic",
                "known policies",
            ),
            ("path=null,size=1G,cache=c,cache-size=1M", "null disk"),
            (
                "path=a,iops-total=10,iops-read=5",
                "cannot be used together",
            ),
            ("path=a,iops-total=ten", "whole number"),
            ("path=a,throttle-group=", "empty name"),
            ("path=a,iops-total-max=1000", "needs iops-total"),
            ("path=a,iops-size=8192", "set no rate"),
        ] {
            let err = input.parse::<DiskSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{input:?} gave {err:?}");
        }
    }

    #[test]
    fn limits_wrap_the_whole_disk_in_a_throttle_node() {
        let spec: DiskSpec = "path=/cap.img,cache=/c,cache-size=1G,iops-total=500"
            .parse()
            .unwrap();
        let NodeSpec::Throttle { child, limits } = &spec.root else {
            panic!("no throttle at the root: {:?}", spec.root);
        };
        assert!(matches!(**child, NodeSpec::Tier { .. }));
        let ThrottleSpec::Private(l) = limits else {
            panic!("{limits:?}");
        };
        assert_eq!(l.entries(), vec![("iops-total".to_string(), 500)]);
        let spec: DiskSpec = "path=/a.img,throttle-group=vm1".parse().unwrap();
        assert_eq!(
            spec.root.throttle(),
            Some(&ThrottleSpec::Group {
                name: "vm1".into(),
                limits: None
            })
        );
    }

    #[test]
    fn default_serial_is_stable_unique_and_fits() {
        let a: DiskSpec = "path=/nonexistent/a.img".parse().unwrap();
        let b: DiskSpec = "path=/nonexistent/b.img".parse().unwrap();
        assert_eq!(a.serial_or_default(), a.serial_or_default());
        assert_ne!(a.serial_or_default(), b.serial_or_default());
        assert!(a.serial_or_default().len() <= MAX_SERIAL_LEN);
    }
}
