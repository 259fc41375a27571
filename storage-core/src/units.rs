//! Units of storage addressing: sectors, byte sizes and block sizes, as newtypes so that a
//! sector number is never mistaken for a byte offset.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

/// The fixed 512-byte sector that virtio-blk and most block protocols address.
pub const SECTOR_SIZE: u64 = 512;

/// A 512-byte sector number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sector(pub u64);

impl Sector {
    /// The byte offset of this sector, or `None` when it does not fit in 64 bits.
    pub fn byte_offset(self) -> Option<u64> {
        self.0.checked_mul(SECTOR_SIZE)
    }
}

/// A logical block size: a power of two of at least 512 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize(NonZeroU32);

impl BlockSize {
    /// 512 bytes.
    pub const SECTOR: BlockSize = BlockSize(NonZeroU32::MIN.saturating_add(511));

    /// A block size, if `bytes` is a power of two of at least 512.
    pub fn new(bytes: u32) -> Option<Self> {
        if bytes >= 512 && bytes.is_power_of_two() {
            NonZeroU32::new(bytes).map(BlockSize)
        } else {
            None
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0.get()
    }
}

/// A byte count given by a user, with optional binary suffix (`K`, `M`, `G`, `T`; `KiB`
/// style also accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// Why a byte size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix")]
pub struct ByteSizeError(pub String);

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ByteSizeError(s.to_string());
        let t = s.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        if digits_end == 0 {
            return Err(err());
        }
        let n: u64 = t[..digits_end].parse().map_err(|_| err())?;
        let shift = match t[digits_end..].to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(err()),
        };
        n.checked_mul(1u64 << shift).map(ByteSize).ok_or_else(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
        for (name, shift) in UNITS {
            if self.0 != 0 && self.0.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{}", self.0 >> shift, name);
            }
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_suffixes() {
        assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert_eq!("4K".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert_eq!("2G".parse::<ByteSize>(), Ok(ByteSize(2 << 30)));
        assert_eq!("1MiB".parse::<ByteSize>(), Ok(ByteSize(1 << 20)));
        assert!("".parse::<ByteSize>().is_err());
        assert!("G".parse::<ByteSize>().is_err());
        assert!("12Q".parse::<ByteSize>().is_err());
        assert!("99999999999T".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(2 << 30).to_string(), "2G");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn block_size_must_be_a_power_of_two() {
        assert_eq!(BlockSize::SECTOR.bytes(), 512);
        assert!(BlockSize::new(4096).is_some());
        assert!(BlockSize::new(256).is_none());
        assert!(BlockSize::new(3000).is_none());
    }

    #[test]
    fn sector_offsets_do_not_overflow_silently() {
        assert_eq!(Sector(8).byte_offset(), Some(4096));
        assert_eq!(Sector(u64::MAX).byte_offset(), None);
    }
}
