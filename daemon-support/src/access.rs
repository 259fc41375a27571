//! Who may do what through the management API. A caller on the unix socket is the peer
//! process's user and groups, as the kernel reports them (`SO_PEERCRED`, `SO_PEERGROUPS`):
//! nothing the caller says about itself counts. The access table (from the daemon's config)
//! maps users and groups to a [`Role`]; each API operation needs one role. No role, no
//! access.

use std::ffi::CString;
use std::fmt;
use std::os::fd::AsRawFd;

/// The roles storage admins know, each including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only: every GET, metrics.
    Viewer,
    /// Attach, detach, resize, limits, snapshots, jobs.
    Operator,
    /// Everything: keys, roles, destructive operations.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| AccessError::UnknownRole(s.to_owned()))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("unknown role {0:?} (viewer, operator or admin)")]
    UnknownRole(String),
    #[error("no such user {0:?}")]
    UnknownUser(String),
    #[error("no such group {0:?}")]
    UnknownGroup(String),
    #[error("an access rule names exactly one of user, uid, group or gid")]
    Ambiguous,
    #[error("token {0:?}: sha256 must be 64 hex digits (strata token new makes one)")]
    BadTokenHash(String),
}

/// A bearer token for callers over TCP. Only its SHA-256 is kept (a token is 32 random
/// bytes, so a plain hash is enough: there is nothing to guess).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Who holds it: the audit log's principal is `token:NAME`.
    pub name: String,
    pub sha256: [u8; 32],
    pub role: Role,
}

/// A token as the config file spells it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenText {
    pub name: String,
    pub sha256: String,
    pub role: String,
}

impl TokenText {
    pub fn resolve(&self) -> Result<Token, AccessError> {
        let bytes = hex::decode(&self.sha256)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| AccessError::BadTokenHash(self.name.clone()))?;
        Ok(Token {
            name: self.name.clone(),
            sha256: bytes,
            role: self.role.parse()?,
        })
    }
}

/// The SHA-256 of a token, as the config keeps it.
pub fn token_hash(secret: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

/// Whom a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Uid(u32),
    /// Members of the group, as primary or supplementary group of the caller.
    Gid(u32),
}

/// One line of the access table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub subject: Subject,
    pub role: Role,
}

/// A rule as the config file spells it: one of `user`, `uid`, `group`, `gid`, and `role`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleText {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    pub role: String,
}

impl RuleText {
    pub fn resolve(&self) -> Result<Rule, AccessError> {
        let subject = match (&self.user, self.uid, &self.group, self.gid) {
            (Some(u), None, None, None) => Subject::Uid(user_id(u)?),
            (None, Some(u), None, None) => Subject::Uid(u),
            (None, None, Some(g), None) => Subject::Gid(
                crate::socket::group_id(g).map_err(|_| AccessError::UnknownGroup(g.clone()))?,
            ),
            (None, None, None, Some(g)) => Subject::Gid(g),
            _ => return Err(AccessError::Ambiguous),
        };
        Ok(Rule {
            subject,
            role: self.role.parse()?,
        })
    }
}

/// Who may do what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessTable {
    rules: Vec<Rule>,
    tokens: Vec<Token>,
    /// The role an operation needs, where the config says otherwise than the daemon.
    privileges: std::collections::BTreeMap<String, Role>,
}

impl AccessTable {
    pub fn new(rules: Vec<Rule>) -> Self {
        AccessTable {
            rules,
            tokens: Vec::new(),
            privileges: Default::default(),
        }
    }

    /// With the role each named operation needs, instead of the daemon's default for it.
    pub fn with_privileges(mut self, privileges: std::collections::BTreeMap<String, Role>) -> Self {
        self.privileges = privileges;
        self
    }

    /// The role operation `name` needs: the config's, or else `default`.
    pub fn needed(&self, name: &str, default: Role) -> Role {
        self.privileges.get(name).copied().unwrap_or(default)
    }

    /// The bearer tokens.
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// With bearer tokens, for callers over TCP.
    pub fn with_tokens(mut self, tokens: Vec<Token>) -> Self {
        self.tokens = tokens;
        self
    }

    /// The token `secret` is, if any. Every token is compared, in time that does not
    /// depend on where they differ.
    pub fn token(&self, secret: &str) -> Option<&Token> {
        let h = token_hash(secret);
        let mut found = None;
        for t in &self.tokens {
            let diff = t
                .sha256
                .iter()
                .zip(&h)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(t);
            }
        }
        found
    }

    /// Without a table in the config: the daemon's own user is admin, and the group the
    /// sockets are shared with (`--socket-group`), if any, may look (viewer). Nobody else
    /// has a role (the socket's mode keeps others out as well).
    pub fn owner_and_group(group: Option<u32>) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        let mut rules = vec![Rule {
            subject: Subject::Uid(uid),
            role: Role::Admin,
        }];
        rules.extend(group.map(|g| Rule {
            subject: Subject::Gid(g),
            role: Role::Viewer,
        }));
        AccessTable::new(rules)
    }

    /// The highest role any rule gives the caller.
    pub fn role_of(&self, caller: &Principal) -> Option<Role> {
        self.rules
            .iter()
            .filter(|r| match r.subject {
                Subject::Uid(u) => u == caller.uid,
                Subject::Gid(g) => caller.gid == g || caller.groups.contains(&g),
            })
            .map(|r| r.role)
            .max()
    }
}

/// A caller of the API, as the kernel identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    pub pid: i32,
}

impl Principal {
    /// The process at the other end of a unix stream.
    pub fn of_peer(socket: &impl AsRawFd) -> std::io::Result<Principal> {
        let fd = socket.as_raw_fd();
        // SAFETY: a zeroed ucred is valid (three integers).
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid out-parameters of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut groups = vec![0u32; 256];
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: `groups` has room for `len` bytes; the kernel writes at most that and
        // reports how many it wrote.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        // A caller in more groups than we have room for is judged on its first 256.
        groups.truncate(if rc == 0 { len as usize / 4 } else { 0 });
        Ok(Principal {
            uid: cred.uid,
            gid: cred.gid,
            groups,
            pid: cred.pid,
        })
    }

    /// `uid=1000(alice)`: how the audit log names the caller. With `lookup` false, only
    /// `uid=1000`: a sandboxed daemon must not read a passwd file (or load NSS modules)
    /// from inside what it shares.
    pub fn name(&self, lookup: bool) -> String {
        match lookup.then(|| user_name(self.uid)).flatten() {
            Some(n) => format!("uid={}({n})", self.uid),
            None => format!("uid={}", self.uid),
        }
    }
}

fn user_id(name: &str) -> Result<u32, AccessError> {
    if let Ok(uid) = name.parse() {
        return Ok(uid);
    }
    let c = CString::new(name).map_err(|_| AccessError::UnknownUser(name.to_owned()))?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: a zeroed `passwd` is a valid out-buffer (integers and null pointers).
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: `c` is NUL-terminated; `pwd`, `buf` (of the length passed) and `found` are
    // valid out-parameters for the duration of the call.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(AccessError::UnknownUser(name.to_owned()));
    }
    Ok(pwd.pw_uid)
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: as in `user_id`.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: `pwd`, `buf` (of the length passed) and `found` are valid out-parameters for
    // the duration of the call.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: on success `pw_name` points to a NUL-terminated string inside `buf`, which
    // is alive here.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, gid: u32, groups: &[u32]) -> Principal {
        Principal {
            uid,
            gid,
            groups: groups.to_vec(),
            pid: 1,
        }
    }

    #[test]
    fn the_highest_matching_role_wins_and_strangers_have_none() {
        let t = AccessTable::new(vec![
            Rule {
                subject: Subject::Gid(100),
                role: Role::Viewer,
            },
            Rule {
                subject: Subject::Uid(1000),
                role: Role::Operator,
            },
            Rule {
                subject: Subject::Gid(50),
                role: Role::Admin,
            },
        ]);
        assert_eq!(t.role_of(&caller(1000, 100, &[])), Some(Role::Operator));
        assert_eq!(t.role_of(&caller(1001, 100, &[])), Some(Role::Viewer));
        assert_eq!(t.role_of(&caller(1001, 7, &[9, 50])), Some(Role::Admin));
        assert_eq!(t.role_of(&caller(1002, 7, &[9])), None);
    }

    #[test]
    fn rules_name_one_subject_and_a_known_role() {
        let ok = RuleText {
            uid: Some(5),
            role: "operator".into(),
            ..Default::default()
        };
        assert_eq!(
            ok.resolve().unwrap(),
            Rule {
                subject: Subject::Uid(5),
                role: Role::Operator
            }
        );
        let both = RuleText {
            uid: Some(5),
            gid: Some(5),
            role: "admin".into(),
            ..Default::default()
        };
        assert!(matches!(both.resolve(), Err(AccessError::Ambiguous)));
        let bad_role = RuleText {
            uid: Some(5),
            role: "root".into(),
            ..Default::default()
        };
        assert!(bad_role.resolve().unwrap_err().to_string().contains("root"));
        let root = RuleText {
            user: Some("root".into()),
            role: "viewer".into(),
            ..Default::default()
        };
        assert_eq!(root.resolve().unwrap().subject, Subject::Uid(0));
    }

    #[test]
    fn the_kernel_names_the_peer() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = Principal::of_peer(&a).unwrap();
        // SAFETY: no preconditions.
        assert_eq!(p.uid, unsafe { libc::geteuid() });
        assert_eq!(p.pid, std::process::id() as i32);
        assert!(p.name(true).starts_with(&format!("uid={}", p.uid)));
        assert_eq!(p.name(false), format!("uid={}", p.uid));
    }
}
