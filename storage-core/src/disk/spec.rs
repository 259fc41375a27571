//! The disk spec: the `key=value,...` string a user gives on the command line, parsed once
//! into a checked [`DiskSpec`].

use std::path::PathBuf;
use std::str::FromStr;

use crate::engine::EngineKind;
use crate::tier::{CacheMode, TierSpec};
use crate::units::{ByteSize, SECTOR_SIZE};

/// Longest serial number virtio-blk's GET_ID can return.
pub const MAX_SERIAL_LEN: usize = 20;

/// Where a disk's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A regular file or block device.
    File(PathBuf),
    /// No storage: writes are accepted and dropped. Reads fill the buffer with zeroes, or with
    /// `read_zeroes` off (QEMU null-co's `read-zeroes=off`) leave it untouched: the guest
    /// then reads back its own buffer, which measures the daemon alone.
    Null { size: u64, read_zeroes: bool },
}

/// A parsed, checked disk spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub source: DiskSource,
    pub read_only: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
    /// Serial number reported to the guest; derived from the path when absent.
    pub serial: Option<String>,
    /// Force an engine (`engine=sync`); by default io_uring when available.
    pub engine: Option<EngineKind>,
    /// A cache device in front of the file (`cache=...`): a tiered disk.
    pub tier: Option<TierSpec>,
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
        "unknown disk spec key {0:?} (known: path, size, read-zeroes, readonly, direct, serial, \
         engine, cache, cache-size, cache-mode, cache-policy, cache-block, seq-cutoff, cache-format)"
    )]
    UnknownKey(String),
    #[error("disk spec {key}={value:?}: {reason}")]
    BadValue {
        key: &'static str,
        value: String,
        reason: String,
    },
}

fn bad(key: &'static str, value: &str, reason: impl Into<String>) -> SpecError {
    SpecError::BadValue {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn on_off(key: &'static str, value: &str) -> Result<bool, SpecError> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(bad(key, value, "expected on or off")),
    }
}

impl FromStr for DiskSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path: Option<String> = None;
        let mut size: Option<u64> = None;
        let mut read_only = None;
        let mut direct = None;
        let mut serial: Option<String> = None;
        let mut engine = None;
        let mut cache: Option<String> = None;
        let mut cache_size: Option<u64> = None;
        let mut cache_mode = None;
        let mut cache_policy: Option<String> = None;
        let mut cache_block: Option<u64> = None;
        let mut seq_cutoff: Option<u64> = None;
        let mut force_format = false;
        let mut read_zeroes = None;
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
                "size" => {
                    let bytes = value
                        .parse::<ByteSize>()
                        .map_err(|e| bad("size", value, e.to_string()))?
                        .0;
                    if bytes == 0 || bytes % SECTOR_SIZE != 0 {
                        return Err(bad("size", value, "must be a non-zero multiple of 512"));
                    }
                    size = Some(bytes);
                }
                "readonly" => read_only = Some(on_off("readonly", value)?),
                "direct" => direct = Some(on_off("direct", value)?),
                "read-zeroes" => read_zeroes = Some(on_off("read-zeroes", value)?),
                "serial" => {
                    if value.len() > MAX_SERIAL_LEN {
                        return Err(bad("serial", value, "at most 20 bytes"));
                    }
                    if !value.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(bad("serial", value, "printable ASCII without spaces"));
                    }
                    serial = Some(value.to_string());
                }
                "engine" => {
                    engine = Some(match value {
                        "io_uring" => EngineKind::IoUring,
                        "sync" => EngineKind::Sync,
                        _ => return Err(bad("engine", value, "expected io_uring or sync")),
                    })
                }
                "cache" => {
                    if value.is_empty() {
                        return Err(bad("cache", value, "empty path"));
                    }
                    cache = Some(value.to_string());
                }
                "cache-size" => {
                    let bytes = value
                        .parse::<ByteSize>()
                        .map_err(|e| bad("cache-size", value, e.to_string()))?
                        .0;
                    cache_size = Some(bytes);
                }
                "cache-mode" => {
                    cache_mode = Some(
                        value
                            .parse::<CacheMode>()
                            .map_err(|e| bad("cache-mode", value, e))?,
                    )
                }
                "cache-policy" => {
                    if !crate::cache::POLICY_NAMES.contains(&value) {
                        return Err(bad(
                            "cache-policy",
                            value,
                            format!("known policies: {}", crate::cache::POLICY_NAMES.join(", ")),
                        ));
                    }
                    cache_policy = Some(value.to_string());
                }
                "cache-block" => {
                    let bytes = value
                        .parse::<ByteSize>()
                        .map_err(|e| bad("cache-block", value, e.to_string()))?
                        .0;
                    if !(4096..=65536).contains(&bytes) || !bytes.is_power_of_two() {
                        return Err(bad("cache-block", value, "a power of two from 4K to 64K"));
                    }
                    cache_block = Some(bytes);
                }
                "seq-cutoff" => {
                    let bytes = value
                        .parse::<ByteSize>()
                        .map_err(|e| bad("seq-cutoff", value, e.to_string()))?
                        .0;
                    // 0 turns the cutoff off, as in bcache.
                    seq_cutoff = Some(if bytes == 0 { u64::MAX } else { bytes });
                }
                "cache-format" => {
                    if value != "force" {
                        return Err(bad("cache-format", value, "the only value is force"));
                    }
                    force_format = true;
                }
                other => return Err(SpecError::UnknownKey(other.to_string())),
            }
        }
        let path = path.ok_or(SpecError::MissingPath)?;
        let source = if path == "null" {
            let size = size.ok_or_else(|| bad("path", "null", "a null disk needs size="))?;
            DiskSource::Null {
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
            DiskSource::File(PathBuf::from(path))
        };
        let tier = match cache {
            Some(cache) => {
                if matches!(source, DiskSource::Null { .. }) {
                    return Err(bad("cache", &cache, "a null disk cannot have a cache"));
                }
                let cache_size = cache_size.ok_or_else(|| {
                    bad(
                        "cache",
                        &cache,
                        "cache= needs cache-size= (the size of the cache file)",
                    )
                })?;
                Some(TierSpec {
                    cache: PathBuf::from(cache),
                    cache_size,
                    mode: cache_mode.unwrap_or(CacheMode::WriteThrough),
                    policy: cache_policy,
                    block_size: cache_block.unwrap_or(4096),
                    seq_cutoff: seq_cutoff.unwrap_or(4 << 20),
                    force_format,
                })
            }
            None => {
                if let Some(key) = seen
                    .iter()
                    .find(|k| k.starts_with("cache-") || **k == "seq-cutoff")
                {
                    return Err(bad("cache", "", format!("{key}= needs cache=")));
                }
                None
            }
        };
        Ok(DiskSpec {
            tier,
            source,
            read_only: read_only.unwrap_or(false),
            direct: direct.unwrap_or(false),
            serial,
            engine,
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
        let name = match &self.source {
            DiskSource::File(p) => std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .to_string_lossy()
                .into_owned(),
            DiskSource::Null { size, .. } => format!("null:{size}"),
        };
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
        assert_eq!(spec.source, DiskSource::File("/tmp/a.img".into()));
        assert!(spec.read_only);
        assert!(!spec.direct);
        assert_eq!(spec.serial.as_deref(), Some("abc"));
    }

    #[test]
    fn parses_a_tiered_spec_with_defaults() {
        let spec: DiskSpec = "path=/cap.img,cache=/ssd/c,cache-size=256M"
            .parse()
            .unwrap();
        let t = spec.tier.unwrap();
        assert_eq!(t.cache_size, 256 << 20);
        assert_eq!(t.mode, CacheMode::WriteThrough);
        assert_eq!(t.block_size, 4096);
        assert_eq!(t.seq_cutoff, 4 << 20);
        assert!(t.policy.is_none() && !t.force_format);
        let spec: DiskSpec =
            "path=/cap.img,cache=/ssd/c,cache-size=1G,cache-mode=writeback,cache-policy=lru,cache-block=64K,seq-cutoff=0,cache-format=force"
                .parse()
                .unwrap();
        let t = spec.tier.unwrap();
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
            spec.source,
            DiskSource::Null {
                size: 2 << 30,
                read_zeroes: true
            }
        );
        let spec: DiskSpec = "path=null,size=1M,read-zeroes=off".parse().unwrap();
        assert_eq!(
            spec.source,
            DiskSource::Null {
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
        ] {
            let err = input.parse::<DiskSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{input:?} gave {err:?}");
        }
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
