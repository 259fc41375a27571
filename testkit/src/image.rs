//! Bootable disk images built in memory, for firmware tests: a FAT16 file system with files in
//! its root directory, and a GPT disk holding it as an EFI system partition.
//!
//! Only what a firmware needs to find and load files is written: 8.3 names (no long names),
//! one directory level, no timestamps. UEFI firmware (OVMF's FAT driver) and Linux read it;
//! `blkid` and `file` recognise it, which the unit tests check.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use testkit::image::{FatImage, GptDisk};
//! let mut esp = FatImage::new(32 << 20);
//! esp.file("STARTUP.NSH", b"echo hello\r\n".to_vec())?;
//! let disk = GptDisk::new(64 << 20).esp(esp.build()?)?.build()?;
//! std::fs::write("/tmp/disk.img", disk)?;
//! # Ok(())
//! # }
//! ```

use anyhow::{bail, ensure, Result};

/// Bytes per sector in every image built here.
pub const SECTOR: usize = 512;

/// A FAT16 file system, built in memory, with regular files in its root directory.
#[derive(Debug, Clone)]
pub struct FatImage {
    size: usize,
    label: [u8; 11],
    files: Vec<([u8; 11], Vec<u8>)>,
}

/// Root directory entries a FAT16 volume has room for (the usual 512: 32 sectors).
const ROOT_ENTRIES: usize = 512;
const DIR_ENTRY: usize = 32;
const RESERVED_SECTORS: usize = 1;
const FATS: usize = 2;
/// Cluster counts that make a volume FAT16 by the FAT specification's rule.
const FAT16_CLUSTERS: std::ops::Range<usize> = 4085..65525;

impl FatImage {
    /// An empty volume of `size` bytes (a multiple of 512, between about 2 MiB and 2 GiB).
    pub fn new(size: usize) -> Self {
        Self {
            size,
            label: *b"STRATA ESP ",
            files: Vec::new(),
        }
    }

    /// Adds a file to the root directory. `name` is an 8.3 name ("VMLINUZ", "INITRD.IMG");
    /// it is stored upper case, and firmware looks names up without regard to case.
    pub fn file(&mut self, name: &str, data: Vec<u8>) -> Result<&mut Self> {
        let short = short_name(name)?;
        ensure!(
            !self.files.iter().any(|(n, _)| *n == short),
            "{name}: already in the image"
        );
        ensure!(
            self.files.len() < ROOT_ENTRIES - 1,
            "{name}: root directory full"
        );
        ensure!(
            u32::try_from(data.len()).is_ok(),
            "{name}: larger than FAT allows"
        );
        self.files.push((short, data));
        Ok(self)
    }

    /// The volume's bytes.
    pub fn build(&self) -> Result<Vec<u8>> {
        ensure!(
            self.size.is_multiple_of(SECTOR),
            "FAT volume size {} is not a multiple of {SECTOR}",
            self.size
        );
        let total_sectors = self.size / SECTOR;
        let root_sectors = ROOT_ENTRIES * DIR_ENTRY / SECTOR;
        // The smallest power-of-two cluster size that keeps the cluster count within
        // FAT16's range; then the FAT size that covers those clusters.
        let layout = [1usize, 2, 4, 8, 16, 32, 64].into_iter().find_map(|spc| {
            let mut fat_sectors = 1;
            loop {
                let meta = RESERVED_SECTORS + FATS * fat_sectors + root_sectors;
                let clusters = total_sectors.checked_sub(meta)? / spc;
                let needed = ((clusters + 2) * 2).div_ceil(SECTOR);
                if needed <= fat_sectors {
                    return FAT16_CLUSTERS.contains(&clusters).then_some((
                        spc,
                        fat_sectors,
                        clusters,
                    ));
                }
                fat_sectors = needed;
            }
        });
        let Some((spc, fat_sectors, clusters)) = layout else {
            bail!(
                "a {} byte volume cannot be FAT16 with 512-byte sectors",
                self.size
            );
        };
        let cluster_bytes = spc * SECTOR;
        let fat_start = RESERVED_SECTORS * SECTOR;
        let root_start = fat_start + FATS * fat_sectors * SECTOR;
        let data_start = root_start + root_sectors * SECTOR;

        let mut img = vec![0u8; self.size];
        self.boot_sector(&mut img[..SECTOR], spc, fat_sectors, total_sectors);

        let mut fat = vec![0u16; clusters + 2];
        fat[0] = 0xfff8; // media descriptor in the low byte
        fat[1] = 0xffff; // clean shutdown, no errors
        let mut next_cluster = 2usize;
        let mut root = Vec::with_capacity((self.files.len() + 1) * DIR_ENTRY);
        root.extend_from_slice(&dir_entry(&self.label, 0x08, 0, 0));
        for (name, data) in &self.files {
            let count = data.len().div_ceil(cluster_bytes);
            ensure!(
                next_cluster + count <= clusters + 2,
                "files do not fit in a {} byte volume",
                self.size
            );
            let first = if count == 0 { 0 } else { next_cluster };
            for i in 0..count {
                let cluster = next_cluster + i;
                fat[cluster] = if i + 1 == count {
                    0xffff
                } else {
                    u16::try_from(cluster + 1).expect("FAT16 cluster numbers fit u16")
                };
                let off = data_start + (cluster - 2) * cluster_bytes;
                let chunk = &data[i * cluster_bytes..data.len().min((i + 1) * cluster_bytes)];
                img[off..off + chunk.len()].copy_from_slice(chunk);
            }
            next_cluster += count;
            let size = u32::try_from(data.len()).expect("checked when added");
            let first = u16::try_from(first).expect("FAT16 cluster numbers fit u16");
            root.extend_from_slice(&dir_entry(name, 0x20, first, size));
        }
        img[root_start..root_start + root.len()].copy_from_slice(&root);
        let fat_bytes: Vec<u8> = fat.iter().flat_map(|e| e.to_le_bytes()).collect();
        for copy in 0..FATS {
            let off = fat_start + copy * fat_sectors * SECTOR;
            img[off..off + fat_bytes.len()].copy_from_slice(&fat_bytes);
        }
        Ok(img)
    }

    fn boot_sector(&self, s: &mut [u8], spc: usize, fat_sectors: usize, total: usize) {
        let put16 = |s: &mut [u8], off: usize, v: usize| {
            let v = u16::try_from(v).expect("BPB field fits u16");
            s[off..off + 2].copy_from_slice(&v.to_le_bytes());
        };
        s[..3].copy_from_slice(&[0xeb, 0x3c, 0x90]); // jmp short over the BPB; nop
        s[3..11].copy_from_slice(b"STRATA  ");
        put16(s, 11, SECTOR);
        s[13] = u8::try_from(spc).expect("sectors per cluster fits u8");
        put16(s, 14, RESERVED_SECTORS);
        s[16] = FATS as u8;
        put16(s, 17, ROOT_ENTRIES);
        put16(s, 19, if total < 0x10000 { total } else { 0 });
        s[21] = 0xf8; // fixed disk
        put16(s, 22, fat_sectors);
        put16(s, 24, 63); // sectors per track (CHS geometry, unused)
        put16(s, 26, 255); // heads
                           // Hidden sectors (the partition's start) stay 0: UEFI does not use them.
        let total32 =
            u32::try_from(if total < 0x10000 { 0 } else { total }).expect("volume below 2 TiB");
        s[32..36].copy_from_slice(&total32.to_le_bytes());
        s[36] = 0x80; // drive number
        s[38] = 0x29; // extended boot signature: the next three fields are valid
        s[39..43].copy_from_slice(&0x5354_5241u32.to_le_bytes()); // volume serial
        s[43..54].copy_from_slice(&self.label);
        s[54..62].copy_from_slice(b"FAT16   ");
        s[510] = 0x55;
        s[511] = 0xaa;
    }
}

/// "vmlinuz" -> `b"VMLINUZ    "`, "initrd.img" -> `b"INITRD  IMG"`.
fn short_name(name: &str) -> Result<[u8; 11]> {
    let (base, ext) = name.split_once('.').unwrap_or((name, ""));
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-~!#$%&'()@^`{}".contains(&b);
    let part_ok = |part: &str, max: usize| part.len() <= max && part.bytes().all(allowed);
    if base.is_empty() || !part_ok(base, 8) || !part_ok(ext, 3) {
        bail!("{name:?} is not an 8.3 file name");
    }
    let mut out = [b' '; 11];
    for (i, b) in base.bytes().enumerate() {
        out[i] = b.to_ascii_uppercase();
    }
    for (i, b) in ext.bytes().enumerate() {
        out[8 + i] = b.to_ascii_uppercase();
    }
    Ok(out)
}

fn dir_entry(name: &[u8; 11], attr: u8, cluster: u16, size: u32) -> [u8; DIR_ENTRY] {
    let mut e = [0u8; DIR_ENTRY];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    // 2024-01-01 00:00 as the creation, access and modification date.
    let date: u16 = ((2024 - 1980) << 9) | (1 << 5) | 1;
    e[16..18].copy_from_slice(&date.to_le_bytes());
    e[18..20].copy_from_slice(&date.to_le_bytes());
    e[24..26].copy_from_slice(&date.to_le_bytes());
    e[26..28].copy_from_slice(&cluster.to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// The EFI system partition type, C12A7328-F81F-11D2-BA4B-00A0C93EC93B, in GPT byte order.
pub const ESP_TYPE_GUID: [u8; 16] = guid(0xc12a_7328, 0xf81f, 0x11d2, 0xba4b_00a0_c93e_c93b);

/// A GUID in the mixed-endian byte order GPT stores.
const fn guid(a: u32, b: u16, c: u16, d: u64) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    let d = d.to_be_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// A GPT-partitioned disk (protective MBR, primary and backup tables) with one partition.
#[derive(Debug, Clone)]
pub struct GptDisk {
    size: usize,
    partition: Option<([u8; 16], Vec<u8>)>,
}

/// First LBA of the partition: 1 MiB, where partitioning tools put it.
pub const PARTITION_START_LBA: usize = 2048;
const ENTRIES: usize = 128;
const ENTRY_SIZE: usize = 128;
const ENTRY_SECTORS: usize = ENTRIES * ENTRY_SIZE / SECTOR;

impl GptDisk {
    /// An empty disk of `size` bytes (a multiple of 512).
    pub fn new(size: usize) -> Self {
        Self {
            size,
            partition: None,
        }
    }

    /// Puts `volume` (e.g. a [`FatImage`]) in the disk's partition as an EFI system
    /// partition, starting at [`PARTITION_START_LBA`].
    pub fn esp(mut self, volume: Vec<u8>) -> Result<Self> {
        ensure!(
            volume.len().is_multiple_of(SECTOR) && !volume.is_empty(),
            "partition size {} is not a positive multiple of {SECTOR}",
            volume.len()
        );
        self.partition = Some((ESP_TYPE_GUID, volume));
        Ok(self)
    }

    /// The disk's bytes.
    pub fn build(&self) -> Result<Vec<u8>> {
        ensure!(
            self.size.is_multiple_of(SECTOR),
            "disk size {} is not a multiple of {SECTOR}",
            self.size
        );
        let sectors = self.size / SECTOR;
        ensure!(
            sectors > PARTITION_START_LBA + 1 + ENTRY_SECTORS,
            "disk too small for GPT"
        );
        let last_lba = sectors - 1;
        let first_usable = 2 + ENTRY_SECTORS;
        let last_usable = last_lba - 1 - ENTRY_SECTORS;
        let mut img = vec![0u8; self.size];

        let mut entries = vec![0u8; ENTRIES * ENTRY_SIZE];
        if let Some((type_guid, volume)) = &self.partition {
            let first = PARTITION_START_LBA;
            let last = first + volume.len() / SECTOR - 1;
            ensure!(
                last <= last_usable,
                "a {} byte partition does not fit a {} byte disk",
                volume.len(),
                self.size
            );
            let e = &mut entries[..ENTRY_SIZE];
            e[..16].copy_from_slice(type_guid);
            e[16..32].copy_from_slice(&guid(0x5354_5241, 0x0001, 0x4553, 0x5000_0000_0000_0001));
            e[32..40].copy_from_slice(&(first as u64).to_le_bytes());
            e[40..48].copy_from_slice(&(last as u64).to_le_bytes());
            for (i, unit) in "EFI system partition".encode_utf16().enumerate() {
                e[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
            }
            img[first * SECTOR..first * SECTOR + volume.len()].copy_from_slice(volume);
        }
        let entries_crc = crc32(&entries);

        // Protective MBR: one partition of type 0xEE covering the disk.
        let mbr = &mut img[..SECTOR];
        let p = &mut mbr[446..462];
        p[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
        p[4] = 0xee;
        p[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        p[8..12].copy_from_slice(&1u32.to_le_bytes());
        let covered = u32::try_from(last_lba).unwrap_or(u32::MAX);
        p[12..16].copy_from_slice(&covered.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;

        let disk_guid = guid(0x5354_5241, 0x0000, 0x4449, 0x534b_0000_0000_0001);
        let header = |my_lba: usize, alt_lba: usize, entries_lba: usize| {
            let mut h = [0u8; 92];
            h[..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&(my_lba as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(alt_lba as u64).to_le_bytes());
            h[40..48].copy_from_slice(&(first_usable as u64).to_le_bytes());
            h[48..56].copy_from_slice(&(last_usable as u64).to_le_bytes());
            h[56..72].copy_from_slice(&disk_guid);
            h[72..80].copy_from_slice(&(entries_lba as u64).to_le_bytes());
            h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
            h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
            h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
            let crc = crc32(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            h
        };
        let backup_entries = last_lba - ENTRY_SECTORS;
        img[SECTOR..SECTOR + 92].copy_from_slice(&header(1, last_lba, 2));
        img[2 * SECTOR..2 * SECTOR + entries.len()].copy_from_slice(&entries);
        img[backup_entries * SECTOR..backup_entries * SECTOR + entries.len()]
            .copy_from_slice(&entries);
        img[last_lba * SECTOR..last_lba * SECTOR + 92].copy_from_slice(&header(
            last_lba,
            1,
            backup_entries,
        ));
        Ok(img)
    }
}

/// CRC-32 (IEEE 802.3, reflected), the checksum GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::require_tool;
    use std::process::Command;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn short_names() {
        assert_eq!(&short_name("vmlinuz").unwrap(), b"VMLINUZ    ");
        assert_eq!(&short_name("initrd.img").unwrap(), b"INITRD  IMG");
        assert_eq!(&short_name("STARTUP.NSH").unwrap(), b"STARTUP NSH");
        for bad in [
            "",
            ".x",
            "toolongname",
            "a.toolong",
            "a.b.c",
            "sp ace",
            "a/b",
        ] {
            assert!(short_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn esp_is_read_back_by_blkid() {
        let mut fat = FatImage::new(16 << 20);
        let kernel: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fat.file("vmlinuz", kernel.clone()).unwrap();
        fat.file("empty.txt", Vec::new()).unwrap();
        let volume = fat.build().unwrap();
        let disk = GptDisk::new(32 << 20)
            .esp(volume.clone())
            .unwrap()
            .build()
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, &disk).unwrap();
        let blkid = require_tool("blkid").unwrap();
        let out = Command::new(&blkid).arg("-p").arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("PTTYPE=\"gpt\""), "{text}");

        let offset = (PARTITION_START_LBA * SECTOR).to_string();
        let out = Command::new(&blkid)
            .args(["-p", "-O", &offset])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("TYPE=\"vfat\""), "{text}");
        assert!(text.contains("VERSION=\"FAT16\""), "{text}");
        assert!(text.contains("LABEL=\"STRATA ESP\""), "{text}");

        // The file's clusters are contiguous right after the root directory.
        let spc = usize::from(volume[13]);
        let fat_sectors = usize::from(u16::from_le_bytes([volume[22], volume[23]]));
        let data = (RESERVED_SECTORS + FATS * fat_sectors + 32) * SECTOR;
        assert_eq!(&volume[data..data + kernel.len()], &kernel[..]);
        let clusters = kernel.len().div_ceil(spc * SECTOR);
        let fat_entry =
            |i: usize| u16::from_le_bytes([volume[SECTOR + 2 * i], volume[SECTOR + 2 * i + 1]]);
        assert_eq!(usize::from(fat_entry(2)), 3);
        assert_eq!(fat_entry(2 + clusters - 1), 0xffff);
        assert_eq!(fat_entry(2 + clusters), 0);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let mut fat = FatImage::new(4 << 20);
        fat.file("big.bin", vec![1; 5 << 20]).unwrap();
        assert!(fat.build().is_err());
        assert!(FatImage::new(100 * SECTOR).build().is_err());
        assert!(GptDisk::new(4 << 20)
            .esp(vec![0; 4 << 20])
            .unwrap()
            .build()
            .is_err());
    }
}
