//! Checking an image file that no daemon serves, as `qemu-img check` does: the report and
//! repair levels the checkers share, and [`check_file`], which picks the checker by what
//! the file says it is (a qcow2 image, [`crate::qcow2::check`]; a tier's cache device,
//! [`crate::tier::check`]). Looking at the contents is safe here: a check only reads, and a
//! repair writes only metadata of the format found.

use std::io::Read;
use std::path::Path;

use crate::error::{StorageError, StorageErrorKind};

/// What a check repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    None,
    /// Only what costs space or redundancy, never data (leaked clusters; a damaged spare
    /// copy of a cache's superblock).
    Leaks,
    All,
}

impl std::str::FromStr for Repair {
    type Err = String;
    fn from_str(s: &str) -> Result<Repair, String> {
        match s {
            "leaks" => Ok(Repair::Leaks),
            "all" => Ok(Repair::All),
            other => Err(format!("repair {other:?}: leaks or all")),
        }
    }
}

/// What a check found (and, with a repair, what it fixed), in qemu-img check's terms. For
/// a cache device, "clusters" are cache slots and "leaks" harmless damage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// `qcow2`, or `strata-cache` for a tier's cache device.
    pub format: &'static str,
    /// Corruptions left (after repairs).
    pub corruptions: u64,
    /// Leaked clusters left.
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// Metadata that could not be read or checked.
    pub check_errors: u64,
    /// One line per problem found (before repairs), as qemu-img prints them.
    pub messages: Vec<String>,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    /// A cache device's slots holding data not yet written to its capacity device.
    pub dirty_blocks: Option<u64>,
}

impl CheckReport {
    /// The report as `qemu-img check --output=json` gives it (its keys), with the messages.
    pub fn json(&self, file: &Path) -> serde_json::Value {
        let mut v = serde_json::json!({
            "filename": file.display().to_string(),
            "format": self.format,
            "check-errors": self.check_errors,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "corruptions-fixed": self.corruptions_fixed,
            "leaks-fixed": self.leaks_fixed,
            "image-end-offset": self.image_end_offset,
            "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "messages": self.messages,
        });
        if let Some(d) = self.dirty_blocks {
            v["dirty-blocks"] = d.into();
        }
        v
    }

    /// `qemu-img check`'s exit status: 0 clean, 2 corrupt, 3 leaks only, 1 not checked.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Checks the qcow2 image or cache device at `path`, repairing as `repair` says: a repair
/// is refused while another program holds the file's lock (QEMU, a daemon serving it), and
/// holds it itself until done.
pub fn check_file(path: &Path, repair: Repair) -> Result<CheckReport, StorageError> {
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| {
            StorageError::new(
                StorageErrorKind::InvalidImage,
                format!("{}: cannot read its header: {e}", path.display()),
            )
        })?;
    if head[..4] == crate::qcow2::header::MAGIC.to_be_bytes() {
        crate::qcow2::check::check(path, repair)
    } else if crate::tier::check::looks_like_cache(path) {
        crate::tier::check::check(path, repair)
    } else {
        Err(StorageError::new(
            StorageErrorKind::InvalidImage,
            format!(
                "{}: neither a qcow2 image nor a Strata cache device (a raw image has no \
                 metadata to check)",
                path.display()
            ),
        ))
    }
}
