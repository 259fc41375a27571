//! Per-thread credential switching and id translation.
//!
//! Files the guest creates must belong to the guest caller, so creation runs with the
//! caller's effective uid/gid. glibc's `setresuid` changes every thread of the process (it
//! broadcasts with a signal); the raw system calls change only the calling thread, which is
//! what a worker serving one request needs. Setting the effective uid to non-zero also drops
//! the thread's effective capabilities, so the host kernel checks permissions as it would
//! for that user; switching back to 0 restores them.

use std::io;

use super::sys::cvt;

/// Restores root's effective ids on drop.
#[must_use]
pub struct CredsGuard {
    uid: bool,
    gid: bool,
}

/// Switches this thread's effective ids to `uid`/`gid` (host ids). A no-op for ids that are
/// already 0, or when `enabled` is false (the daemon does not run as root).
pub fn switch(enabled: bool, uid: u32, gid: u32) -> io::Result<CredsGuard> {
    let mut guard = CredsGuard {
        uid: false,
        gid: false,
    };
    if !enabled {
        return Ok(guard);
    }
    // The gid first: once the uid is not 0, we lose the capability to change it.
    if gid != 0 {
        // SAFETY: a raw syscall with integer arguments; -1 leaves an id unchanged.
        cvt(unsafe { libc::syscall(libc::SYS_setresgid, -1i64, i64::from(gid), -1i64) })?;
        guard.gid = true;
    }
    if uid != 0 {
        // SAFETY: as above.
        cvt(unsafe { libc::syscall(libc::SYS_setresuid, -1i64, i64::from(uid), -1i64) })?;
        guard.uid = true;
    }
    Ok(guard)
}

impl Drop for CredsGuard {
    fn drop(&mut self) {
        // Failing to switch back would leave a worker running as a guest user: fatal.
        if self.uid {
            // SAFETY: a raw syscall with integer arguments.
            if unsafe { libc::syscall(libc::SYS_setresuid, -1i64, 0i64, -1i64) } != 0 {
                log::error!(
                    "cannot restore the effective uid: {}",
                    io::Error::last_os_error()
                );
                std::process::abort();
            }
        }
        if self.gid {
            // SAFETY: as above.
            if unsafe { libc::syscall(libc::SYS_setresgid, -1i64, 0i64, -1i64) } != 0 {
                log::error!(
                    "cannot restore the effective gid: {}",
                    io::Error::last_os_error()
                );
                std::process::abort();
            }
        }
    }
}

/// Drops the process's supplementary groups (raw syscall, calling thread; done at start-up
/// before any other thread exists, so every thread inherits the empty list).
pub fn drop_supplementary_groups() -> io::Result<()> {
    // SAFETY: a raw syscall: zero groups, null list.
    cvt(unsafe { libc::syscall(libc::SYS_setgroups, 0i64, std::ptr::null::<libc::gid_t>()) })
        .map(drop)
}

/// One rule of `--translate-uid` / `--translate-gid` (virtiofsd's syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdRule {
    /// `guest:FROM:TO:COUNT`: guest ids FROM.. are host ids TO.. (guest to host only).
    Guest { from: u32, to: u32, count: u32 },
    /// `host:FROM:TO:COUNT`: host ids FROM.. are shown to the guest as TO.. (host to guest).
    Host { from: u32, to: u32, count: u32 },
    /// `squash-guest:FROM:TO:COUNT`: guest ids FROM.. all become host id TO.
    SquashGuest { from: u32, to: u32, count: u32 },
    /// `squash-host:FROM:TO:COUNT`: host ids FROM.. all appear as guest id TO.
    SquashHost { from: u32, to: u32, count: u32 },
    /// `forbid-guest:FROM:COUNT`: guest ids FROM.. may not create or own files (EPERM).
    ForbidGuest { from: u32, count: u32 },
    /// `map:GUEST:HOST:COUNT`: both directions.
    Map { guest: u32, host: u32, count: u32 },
}

impl std::str::FromStr for IdRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let kind = parts.next().unwrap_or("");
        let nums: Result<Vec<u32>, _> = parts.map(str::parse::<u32>).collect();
        let nums = nums.map_err(|e| format!("{s}: {e}"))?;
        let n3 = |f: fn(u32, u32, u32) -> IdRule| match nums.as_slice() {
            [a, b, c] => Ok(f(*a, *b, *c)),
            _ => Err(format!("{s}: expected {kind}:A:B:COUNT")),
        };
        match kind {
            "guest" => n3(|from, to, count| IdRule::Guest { from, to, count }),
            "host" => n3(|from, to, count| IdRule::Host { from, to, count }),
            "squash-guest" => n3(|from, to, count| IdRule::SquashGuest { from, to, count }),
            "squash-host" => n3(|from, to, count| IdRule::SquashHost { from, to, count }),
            "map" => n3(|guest, host, count| IdRule::Map { guest, host, count }),
            "forbid-guest" => match nums.as_slice() {
                [from, count] => Ok(IdRule::ForbidGuest {
                    from: *from,
                    count: *count,
                }),
                _ => Err(format!("{s}: expected forbid-guest:FROM:COUNT")),
            },
            _ => Err(format!(
                "{s}: unknown kind {kind:?} (guest, host, squash-guest, squash-host, forbid-guest, map)"
            )),
        }
    }
}

fn within(id: u32, from: u32, count: u32) -> Option<u32> {
    id.checked_sub(from).filter(|d| *d < count)
}

/// An ordered list of rules; the first that matches wins, unmatched ids pass unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap(pub Vec<IdRule>);

impl IdMap {
    /// A guest id as the host sees it, or `EPERM` if the guest id is forbidden.
    pub fn to_host(&self, id: u32) -> io::Result<u32> {
        for rule in &self.0 {
            match *rule {
                IdRule::Guest { from, to, count }
                | IdRule::Map {
                    guest: from,
                    host: to,
                    count,
                } => {
                    if let Some(d) = within(id, from, count) {
                        return Ok(to.wrapping_add(d));
                    }
                }
                IdRule::SquashGuest { from, to, count } => {
                    if within(id, from, count).is_some() {
                        return Ok(to);
                    }
                }
                IdRule::ForbidGuest { from, count } => {
                    if within(id, from, count).is_some() {
                        return Err(io::Error::from_raw_os_error(libc::EPERM));
                    }
                }
                IdRule::Host { .. } | IdRule::SquashHost { .. } => {}
            }
        }
        Ok(id)
    }

    /// A host id as the guest sees it.
    pub fn to_guest(&self, id: u32) -> u32 {
        for rule in &self.0 {
            match *rule {
                IdRule::Host { from, to, count }
                | IdRule::Map {
                    host: from,
                    guest: to,
                    count,
                } => {
                    if let Some(d) = within(id, from, count) {
                        return to.wrapping_add(d);
                    }
                }
                IdRule::SquashHost { from, to, count } if within(id, from, count).is_some() => {
                    return to;
                }
                _ => {}
            }
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rules_parse_and_translate() {
        let map = IdMap(vec![
            "map:1000:2000:10".parse().unwrap(),
            "squash-guest:0:65534:1".parse().unwrap(),
            "forbid-guest:5000:1".parse().unwrap(),
        ]);
        assert_eq!(map.to_host(1005).unwrap(), 2005);
        assert_eq!(map.to_host(0).unwrap(), 65534);
        assert!(map.to_host(5000).is_err());
        assert_eq!(map.to_host(42).unwrap(), 42);
        assert_eq!(map.to_guest(2003), 1003);
        assert!("map:1:2".parse::<IdRule>().is_err());
        assert!("bogus:1:2:3".parse::<IdRule>().is_err());
    }
}
