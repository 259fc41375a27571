//! The qcow2 header and its extensions, as QEMU's `docs/interop/qcow2.txt` lays them out
//! (big-endian): read, checked against what this node implements, and the fields it
//! changes written back in place (a header rewrite would have to carry every extension
//! along; updating fields keeps the ones we do not know).

use std::path::PathBuf;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Compatible feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_BITMAPS: u32 = 0x2385_2875;

/// `crypt_method` of LUKS encryption (1 is legacy AES-CBC).
pub const CRYPT_LUKS: u32 = 2;

/// The largest LUKS header an image may point at (LUKS1's with 8 keyslots of 4000
/// stripes is about 2 MiB).
pub const MAX_CRYPTO_HEADER: u64 = 16 << 20;

/// Field offsets written back in place.
/// The virtual size (what the guest sees), a big-endian u64.
pub const OFF_SIZE: u64 = 24;
pub const OFF_REFCOUNT_TABLE: u64 = 48;
pub const OFF_L1_SIZE: u64 = 36;
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

/// How the data of compressed clusters is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file: Option<String>,
    /// From the backing-format extension (`raw`, `qcow2`), if given.
    pub backing_format: Option<String>,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    /// An external data file is named (we refuse those).
    pub data_file: bool,
    /// Where the LUKS header of an encrypted image lies in the file (offset, length), from
    /// the full-disk-encryption header extension.
    pub crypto: Option<(u64, u64)>,
    /// A persistent dirty bitmaps extension is present.
    pub bitmaps: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a qcow2 image (no QFI\\xfb magic)")]
    Magic,
    #[error("qcow2 version {0}: only versions 2 and 3 exist")]
    Version(u32),
    #[error("the header is cut short ({0} bytes)")]
    Short(usize),
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid(msg: impl Into<String>) -> HeaderError {
    HeaderError::Invalid(msg.into())
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parses the header in `b`, the image's first cluster (or its first 64 KiB, at least
    /// the header and its extensions), with `file_len` the image file's length.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        if b.len() < 72 {
            return Err(HeaderError::Short(b.len()));
        }
        if be32(b, 0) != MAGIC {
            return Err(HeaderError::Magic);
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let cluster_bits = be32(b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits}: clusters are 512 bytes to 2 MiB"
            )));
        }
        let mut h = Header {
            version,
            backing_file: None,
            backing_format: None,
            cluster_bits,
            size: be64(b, OFF_SIZE as usize),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
            data_file: false,
            crypto: None,
            bitmaps: false,
        };
        if version == 3 {
            if b.len() < 104 {
                return Err(HeaderError::Short(b.len()));
            }
            h.incompatible = be64(b, 72);
            h.compatible = be64(b, 80);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104 || h.header_length as usize > b.len() {
                return Err(invalid(format!("header_length {}", h.header_length)));
            }
            if h.refcount_order > 6 {
                return Err(invalid(format!(
                    "refcount_order {}: at most 6 (64-bit refcounts)",
                    h.refcount_order
                )));
            }
            if h.header_length > 104 {
                h.compression = match b[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => return Err(invalid(format!("compression type {t} is not known"))),
                };
            }
        }
        let cluster = h.cluster_size();
        let aligned = |v: u64, what: &str| {
            if !v.is_multiple_of(cluster) || v == 0 {
                Err(invalid(format!(
                    "{what} at {v:#x} is not a cluster boundary"
                )))
            } else if v >= file_len {
                Err(invalid(format!(
                    "{what} at {v:#x} lies past the end of the file ({file_len} bytes)"
                )))
            } else {
                Ok(())
            }
        };
        aligned(h.refcount_table_offset, "the refcount table")?;
        // QEMU's own limit: an 8 MiB refcount table (it is read whole into memory).
        if h.refcount_table_clusters == 0
            || u64::from(h.refcount_table_clusters) * cluster > (8 << 20)
        {
            return Err(invalid(format!(
                "refcount_table_clusters {}: at most 8 MiB of refcount table",
                h.refcount_table_clusters
            )));
        }
        // Enough L1 entries to map `size`, and not absurdly many (QEMU's own limit: 32 MiB
        // of L1 table).
        let per_l2 = cluster / 8;
        let needed = h.size.div_ceil(cluster).div_ceil(per_l2);
        if u64::from(h.l1_size) < needed {
            return Err(invalid(format!(
                "l1_size {} cannot map {} bytes (needs {needed})",
                h.l1_size, h.size
            )));
        }
        if u64::from(h.l1_size) > (32 << 20) / 8 {
            return Err(invalid(format!("l1_size {} is too large", h.l1_size)));
        }
        // The L1 table may lie past the end of the file (qemu-img leaves a new image's
        // there, to read as zeroes), but on a cluster boundary.
        if h.l1_size > 0 && (!h.l1_table_offset.is_multiple_of(cluster) || h.l1_table_offset == 0) {
            return Err(invalid(format!(
                "the L1 table at {:#x} is not a cluster boundary",
                h.l1_table_offset
            )));
        }
        let backing_offset = be64(b, 8);
        let backing_len = be32(b, 16) as usize;
        if backing_offset != 0 && backing_len > 0 {
            if backing_len > 1023 {
                return Err(invalid(format!(
                    "backing file name of {backing_len} bytes (at most 1023)"
                )));
            }
            let start = usize::try_from(backing_offset).unwrap_or(usize::MAX);
            let name = b
                .get(start..start.saturating_add(backing_len))
                .ok_or_else(|| invalid("the backing file name lies outside the header cluster"))?;
            h.backing_file = Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| invalid("the backing file name is not UTF-8"))?,
            );
        }
        for ext in extensions(b, h.header_length as usize) {
            let (ty, data) = ext?;
            match ty {
                EXT_BACKING_FORMAT => {
                    h.backing_format = Some(
                        String::from_utf8(data.to_vec())
                            .map_err(|_| invalid("the backing format is not UTF-8"))?,
                    )
                }
                EXT_CRYPTO => {
                    if data.len() != 16 {
                        return Err(invalid(format!(
                            "the encryption header extension holds {} bytes (16 expected)",
                            data.len()
                        )));
                    }
                    h.crypto = Some((be64(data, 0), be64(data, 8)))
                }
                EXT_DATA_FILE => h.data_file = true,
                EXT_BITMAPS => h.bitmaps = true,
                // Names for feature bits (0x6803f857), and the ones we keep without
                // knowing them.
                _ => {}
            }
        }
        match (h.crypt_method, h.crypto) {
            (0, None) => {}
            (0, Some(_)) | (CRYPT_LUKS, None) => {
                return Err(invalid(
                    "the encryption method and the encryption header extension disagree",
                ))
            }
            (CRYPT_LUKS, Some((offset, len))) => {
                aligned(offset, "the encryption header")?;
                if len == 0 || len > MAX_CRYPTO_HEADER || offset + len > file_len {
                    return Err(invalid(format!(
                        "the encryption header ({len} bytes at {offset:#x}) does not fit in \
                         the file or is larger than {MAX_CRYPTO_HEADER} bytes"
                    )));
                }
            }
            // Legacy AES-CBC (1) is refused by `refusal`, by name.
            (1, _) => {}
            (m, _) => return Err(invalid(format!("encryption method {m} is not known"))),
        }
        Ok(h)
    }

    /// Why this node cannot open the image, if it cannot; `writable`: for writing.
    pub fn refusal(&self, writable: bool) -> Option<String> {
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        if self.incompatible & !known != 0 {
            return Some(format!(
                "incompatible feature bits {:#x} that this version does not know",
                self.incompatible & !known
            ));
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Some("extended L2 entries (subclusters) are not supported".into());
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 || self.data_file {
            return Some("an external data file is not supported".into());
        }
        if self.crypt_method == 1 {
            return Some(
                "qcow2's legacy AES-CBC encryption (encrypt.format=aes) is not supported, as \
                 in QEMU for writing: convert the image to LUKS encryption \
                 (qemu-img convert -o encrypt.format=luks)"
                    .into(),
            );
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Some(
                "the image is marked corrupt; check it with `qemu-img check -r all`".into(),
            );
        }
        if writable {
            if self.incompatible & INCOMPAT_DIRTY != 0 {
                return Some(
                    "the image was not closed cleanly with lazy refcounts; repair it with \
                     `qemu-img check -r all` first"
                        .into(),
                );
            }
            if self.nb_snapshots > 0 {
                return Some(format!(
                    "the image holds {} internal snapshots, which writing would have to \
                     copy around; open it read-only, or remove them (qemu-img snapshot -d)",
                    self.nb_snapshots
                ));
            }
        }
        None
    }

    /// The backing file's path, relative names taken from the image's directory (as QEMU
    /// does).
    pub fn backing_path(&self, image: &std::path::Path) -> Option<PathBuf> {
        let name = self.backing_file.as_ref()?;
        let p = PathBuf::from(name);
        Some(if p.is_absolute() {
            p
        } else {
            image.parent().unwrap_or(std::path::Path::new(".")).join(p)
        })
    }
}

/// A fresh version 3 header for `size` bytes (for [`super::create`]): the header with its
/// backing file name and backing-format extension, the refcount table at cluster 1, a
/// refcount block at cluster 2 and the L1 table from cluster 3.
pub fn new_image(
    size: u64,
    cluster_bits: u32,
    backing: Option<(&str, &str)>,
    l1_size: u32,
    crypto: Option<(u64, u64)>,
) -> Vec<u8> {
    let cluster = 1usize << cluster_bits;
    let mut b = vec![0u8; cluster];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, cluster_bits);
    put64(&mut b, 24, size);
    put32(&mut b, 36, l1_size);
    put64(&mut b, 40, 3 << cluster_bits);
    put64(&mut b, 48, 1 << cluster_bits);
    put32(&mut b, 56, 1);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, 112);
    let mut at = 112;
    if let Some((offset, len)) = crypto {
        put32(&mut b, 32, CRYPT_LUKS);
        put32(&mut b, at, EXT_CRYPTO);
        put32(&mut b, at + 4, 16);
        put64(&mut b, at + 8, offset);
        put64(&mut b, at + 16, len);
        at += 24;
    }
    if let Some((name, format)) = backing {
        put32(&mut b, at, EXT_BACKING_FORMAT);
        put32(&mut b, at + 4, format.len() as u32);
        b[at + 8..at + 8 + format.len()].copy_from_slice(format.as_bytes());
        at += 8 + format.len().div_ceil(8) * 8;
        // The end-of-extensions marker is the zeroes already there.
        at += 8;
        put64(&mut b, 8, at as u64);
        put32(&mut b, 16, name.len() as u32);
        b[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    b
}

/// The header extensions of header cluster `b`, whose header is `head` bytes long: (type,
/// data) each, from after the header up to the end marker, the backing file name or the
/// cluster's end.
fn extensions(
    b: &[u8],
    head: usize,
) -> impl Iterator<Item = Result<(u32, &[u8]), HeaderError>> + '_ {
    let name = usize::try_from(be64(b, 8)).unwrap_or(usize::MAX);
    let end = if name != 0 && name > head {
        name.min(b.len())
    } else {
        b.len()
    };
    let mut at = head;
    std::iter::from_fn(move || {
        if at + 8 > end {
            return None;
        }
        let (ty, len) = (be32(b, at), be32(b, at + 4) as usize);
        if ty == EXT_END {
            at = end;
            return None;
        }
        let data = b.get(at + 8..at + 8 + len);
        at = match data {
            Some(_) => at + 8 + len.div_ceil(8) * 8,
            None => end,
        };
        Some(
            data.map(|d| (ty, d))
                .ok_or_else(|| invalid(format!("header extension {ty:#x} overruns the header"))),
        )
    })
}

/// The header cluster `b` (whose header is `h`) naming `backing` (file name, format)
/// instead of its backing file, or none: the header's own fields and every other
/// extension kept as they are, then the backing-format extension, the end marker and the
/// name, as QEMU lays them out. The caller writes it over the first cluster.
pub fn with_backing(
    b: &[u8],
    h: &Header,
    backing: Option<(&str, &str)>,
) -> Result<Vec<u8>, HeaderError> {
    let head = h.header_length as usize;
    let mut out = b.get(..head).ok_or(HeaderError::Short(b.len()))?.to_vec();
    out.resize(b.len(), 0);
    let mut put = head;
    let mut push = |out: &mut Vec<u8>, ty: u32, data: &[u8]| -> Result<(), HeaderError> {
        let padded = data.len().div_ceil(8) * 8;
        if put + 8 + padded + 8 > out.len() {
            return Err(invalid(
                "the header extensions would not fit in the first cluster",
            ));
        }
        out[put..put + 4].copy_from_slice(&ty.to_be_bytes());
        out[put + 4..put + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        out[put + 8..put + 8 + data.len()].copy_from_slice(data);
        put += 8 + padded;
        Ok(())
    };
    for ext in extensions(b, head) {
        let (ty, data) = ext?;
        if ty != EXT_BACKING_FORMAT {
            push(&mut out, ty, data)?;
        }
    }
    let (offset, len) = match backing {
        Some((name, format)) => {
            if name.is_empty() || name.len() > 1023 {
                return Err(invalid(format!(
                    "backing file name of {} bytes",
                    name.len()
                )));
            }
            push(&mut out, EXT_BACKING_FORMAT, format.as_bytes())?;
            // The end marker: zeroes already there.
            let at = put + 8;
            if at + name.len() > out.len() {
                return Err(invalid(
                    "the backing file name would not fit in the first cluster",
                ));
            }
            out[at..at + name.len()].copy_from_slice(name.as_bytes());
            (at as u64, name.len() as u32)
        }
        None => (0, 0),
    };
    out[8..16].copy_from_slice(&offset.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backing_file_is_renamed_or_dropped_and_other_extensions_stay() {
        let b = new_image(1 << 30, 16, Some(("a@one.qcow2", "qcow2")), 16, None);
        // Another extension QEMU writes (feature names), kept as it is.
        let mut b2 = b.clone();
        let h = Header::parse(&b2, 1 << 20).unwrap();
        let names = with_backing(&b2, &h, None).unwrap();
        b2.copy_from_slice(&names);
        let at = 112;
        b2[at..at + 4].copy_from_slice(&0x6803_f857u32.to_be_bytes());
        b2[at + 4..at + 8].copy_from_slice(&48u32.to_be_bytes());
        b2[at + 8..at + 56].fill(7);
        let h2 = Header::parse(&b2, 1 << 20).unwrap();
        let renamed = with_backing(&b2, &h2, Some(("base.raw", "raw"))).unwrap();
        let r = Header::parse(&renamed, 1 << 20).unwrap();
        assert_eq!(r.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(r.backing_format.as_deref(), Some("raw"));
        assert_eq!(
            &renamed[at + 8..at + 56],
            &[7u8; 48][..],
            "the other extension"
        );
        let dropped = with_backing(&renamed, &r, None).unwrap();
        let d = Header::parse(&dropped, 1 << 20).unwrap();
        assert_eq!((d.backing_file, d.backing_format), (None, None));
        assert_eq!(&dropped[..8], &renamed[..8]);
        assert_eq!(
            &dropped[20..112],
            &renamed[20..112],
            "the header's own fields"
        );
        let h0 = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(
            with_backing(&b, &h0, Some(("a@one.qcow2", "qcow2"))).unwrap(),
            b,
            "the same backing file makes the same header"
        );
    }

    #[test]
    fn a_new_header_parses_back() {
        let b = new_image(1 << 30, 16, Some(("base.img", "raw")), 2, None);
        let h = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.refusal(true), None);
    }

    #[test]
    fn damaged_headers_are_refused_with_a_reason() {
        let good = new_image(1 << 30, 16, None, 2, None);
        let mut b = good.clone();
        b[0] = 0;
        assert_eq!(Header::parse(&b, 1 << 20), Err(HeaderError::Magic));
        let mut b = good.clone();
        b[23] = 40; // cluster_bits
        assert!(Header::parse(&b, 1 << 20).is_err());
        let mut b = good.clone();
        b[39] = 0; // l1_size 0 for 1 GiB
        assert!(Header::parse(&b, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("l1_size"));
        // The refcount table past the end of the file.
        assert!(Header::parse(&good, 65536).is_err());
        let mut b = good;
        b[79] = 1 << 4; // extended L2
        let h = Header::parse(&b, 1 << 20).unwrap();
        assert!(h.refusal(false).unwrap().contains("subclusters"));

        // An encrypted image's header extension, hostile: where the LUKS header lies.
        let len = 4 << 20;
        let encrypted = |at: u64, size: u64| new_image(1 << 30, 16, None, 2, Some((at, size)));
        let h = Header::parse(&encrypted(3 << 16, 2 << 20), len).unwrap();
        assert_eq!(h.crypto, Some((3 << 16, 2 << 20)));
        assert_eq!(h.refusal(true), None);
        for (at, size, why) in [
            (3 << 16 | 512, 2 << 20, "cluster boundary"),
            (0, 2 << 20, "cluster boundary"),
            (3 << 16, 0, "does not fit"),
            (3 << 16, len, "does not fit"),
            (len, 1 << 16, "past the end"),
            (u64::MAX - 0xffff, 1 << 16, "past the end"),
        ] {
            let e = Header::parse(&encrypted(at, size), len)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{at:#x}+{size:#x}: {e}");
        }
        // Larger than any LUKS header, though inside the file.
        let e = Header::parse(&encrypted(3 << 16, MAX_CRYPTO_HEADER + 1), 64 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than"), "{e}");
        // The method and the extension must agree; legacy AES is refused by name.
        let mut b = encrypted(3 << 16, 2 << 20);
        b[35] = 0;
        assert!(Header::parse(&b, len)
            .unwrap_err()
            .to_string()
            .contains("disagree"));
        let mut b = new_image(1 << 30, 16, None, 2, None);
        b[35] = 2;
        assert!(Header::parse(&b, len)
            .unwrap_err()
            .to_string()
            .contains("disagree"));
        b[35] = 1;
        let h = Header::parse(&b, len).unwrap();
        assert!(h.refusal(false).unwrap().contains("AES-CBC"));
        b[35] = 3;
        assert!(Header::parse(&b, len)
            .unwrap_err()
            .to_string()
            .contains("not known"));
        // An extension of the wrong size.
        let mut b = encrypted(3 << 16, 2 << 20);
        b[112 + 7] = 8;
        assert!(Header::parse(&b, len)
            .unwrap_err()
            .to_string()
            .contains("16 expected"));
    }
}
