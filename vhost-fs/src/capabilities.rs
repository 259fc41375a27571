//! The capabilities the daemon keeps once started (`--modcaps`, virtiofsd's flag): those
//! its file operations need as root (owners, modes, device nodes, file capabilities,
//! switching to the caller's ids, and reading through file handles when inodes are held
//! as handles), dropped from the effective, permitted, inheritable and bounding sets alike,
//! so nothing the daemon runs later can regain the others. CAP_SYS_ADMIN goes too: with it,
//! a guest could set `trusted.*` extended attributes on the host (virtiofsd refuses them
//! the same way).

use std::collections::HashSet;

use caps::{CapSet, Capability};

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("--modcaps {0:?}: expected +name or -name entries separated by ':' (e.g. +sys_admin:-mknod)")]
    Syntax(String),
    #[error("--modcaps: unknown capability {0:?}")]
    Unknown(String),
    #[error("cannot drop capabilities: {0}")]
    Drop(String),
}

/// Adds (`true`) or removes a capability from the kept set.
pub type CapChange = (bool, Capability);

/// Parses virtiofsd's `--modcaps` syntax: `+name` or `-name` entries joined by `:`, names
/// with or without `cap_`, any case.
pub fn parse_modcaps(s: &str) -> Result<Vec<CapChange>, CapsError> {
    s.split(':')
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (add, name) = match e.split_at(1) {
                ("+", n) => (true, n),
                ("-", n) => (false, n),
                _ => return Err(CapsError::Syntax(s.to_owned())),
            };
            let upper = name.to_ascii_uppercase();
            let full = if upper.starts_with("CAP_") {
                upper
            } else {
                format!("CAP_{upper}")
            };
            full.parse::<Capability>()
                .map(|c| (add, c))
                .map_err(|_| CapsError::Unknown(name.to_owned()))
        })
        .collect()
}

/// The set kept by default, changed by `changes`.
pub fn kept(file_handles: bool, changes: &[CapChange]) -> HashSet<Capability> {
    use Capability::*;
    let mut set: HashSet<Capability> = [
        CAP_CHOWN,
        CAP_DAC_OVERRIDE,
        CAP_FOWNER,
        CAP_FSETID,
        CAP_SETGID,
        CAP_SETUID,
        CAP_MKNOD,
        CAP_SETFCAP,
    ]
    .into_iter()
    .collect();
    if file_handles {
        // open_by_handle_at needs it.
        set.insert(CAP_DAC_READ_SEARCH);
    }
    for &(add, cap) in changes {
        if add {
            set.insert(cap);
        } else {
            set.remove(&cap);
        }
    }
    set
}

/// Keeps only `keep`, on the calling thread (call it before any other thread starts: they
/// inherit it). A process without capabilities (not root) has nothing to drop.
pub fn keep_only(keep: &HashSet<Capability>) -> Result<(), CapsError> {
    let err = |e: caps::errors::CapsError| CapsError::Drop(e.to_string());
    let permitted = caps::read(None, CapSet::Permitted).map_err(err)?;
    if permitted.is_empty() {
        return Ok(());
    }
    // The bounding set first: dropping from it takes CAP_SETPCAP, dropped below.
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(err)?;
        }
    }
    let kept: HashSet<Capability> = keep.intersection(&permitted).copied().collect();
    caps::set(None, CapSet::Inheritable, &HashSet::new()).map_err(err)?;
    caps::set(None, CapSet::Effective, &kept).map_err(err)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modcaps_takes_virtiofsds_syntax() {
        let c = parse_modcaps("+sys_admin:-CAP_MKNOD:+Sys_Resource").unwrap();
        assert_eq!(
            c,
            vec![
                (true, Capability::CAP_SYS_ADMIN),
                (false, Capability::CAP_MKNOD),
                (true, Capability::CAP_SYS_RESOURCE),
            ]
        );
        let set = kept(false, &c);
        assert!(set.contains(&Capability::CAP_SYS_ADMIN));
        assert!(!set.contains(&Capability::CAP_MKNOD));
        assert!(!set.contains(&Capability::CAP_DAC_READ_SEARCH));
        assert!(kept(true, &[]).contains(&Capability::CAP_DAC_READ_SEARCH));
        assert!(matches!(
            parse_modcaps("sys_admin"),
            Err(CapsError::Syntax(_))
        ));
        assert!(matches!(
            parse_modcaps("+no_such"),
            Err(CapsError::Unknown(_))
        ));
    }
}
