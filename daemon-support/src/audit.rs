//! The audit log: one JSON line per mutating API call and per denial, written and fsynced
//! before the caller gets its answer. Each line carries `prev`, the SHA-256 of the line
//! before it (across rotated files too), and a head file next to the log holds the hash of
//! the last line, so an edited, removed or truncated line breaks the chain where
//! [`verify`] finds it. This is tamper evidence, not proof: whoever can rewrite the whole
//! log and its head can forge a consistent one.
//!
//! Files: `audit.log` (the one being written), `audit.log.<UTC time>` (rotated when it
//! grows past [`AuditConfig::max_bytes`] or the day changes), `audit.log.head`. Rotated
//! files older than [`AuditConfig::retention_days`] are deleted.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// The operation of the line a daemon writes when it finds the log changed while no daemon
/// held it.
pub const MISMATCH: &str = "audit.mismatch";
/// The operation of the line that records expired files.
pub const EXPIRED: &str = "audit.expired";

/// The `prev` of the first line ever written.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const DAY: u64 = 86_400;

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub path: PathBuf,
    /// Rotate when the file would grow past this.
    pub max_bytes: u64,
    /// Delete rotated files older than this.
    pub retention_days: u32,
}

impl AuditConfig {
    pub fn new(path: PathBuf) -> Self {
        AuditConfig {
            path,
            max_bytes: 64 << 20,
            retention_days: 180,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What one line records (the log adds `time` and `prev`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// `uid=1000(alice)`.
    pub principal: String,
    /// The caller's role; none for a caller without one.
    pub role: Option<crate::access::Role>,
    /// The API operation, as `disk.add`.
    pub operation: String,
    /// What it acted on: the request's path.
    pub object: String,
    /// The request's parameters, secrets redacted ([`redact`]).
    pub params: serde_json::Value,
    /// The HTTP status of the answer.
    pub status: u16,
    /// `ok`, `denied`, or the error message.
    pub result: String,
}

/// Replaces the values of keys that hold secrets (`passphrase`, `key`, `secret`, `token`,
/// `password`, at any depth) with `"<redacted>"`.
pub fn redact(mut v: serde_json::Value) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, val) in map.iter_mut() {
                    let k = k.to_ascii_lowercase();
                    if ["passphrase", "key", "secret", "token", "password"]
                        .iter()
                        .any(|s| k.contains(s))
                    {
                        *val = serde_json::Value::String("<redacted>".into());
                    } else {
                        walk(val);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

/// A body whose values are secret but for those of `public` keys (top level): every other
/// value `"<redacted>"` (and anything but an object, redacted whole).
pub fn public_only(v: serde_json::Value, public: &[&str]) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if public.contains(&k.as_str()) {
                        v
                    } else {
                        serde_json::Value::String("<redacted>".into())
                    };
                    (k, v)
                })
                .collect(),
        ),
        serde_json::Value::Null => serde_json::Value::Null,
        _ => serde_json::Value::String("<redacted>".into()),
    }
}

/// A body whose values are all secret: its keys, each value `"<redacted>"` (and anything
/// but an object, redacted whole).
pub fn keys_only(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.into_iter()
                .map(|(k, _)| (k, serde_json::Value::String("<redacted>".into())))
                .collect(),
        ),
        serde_json::Value::Null => serde_json::Value::Null,
        _ => serde_json::Value::String("<redacted>".into()),
    }
}

fn hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

fn head_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".head");
    PathBuf::from(p)
}

/// `20261205T173500Z`: rotated files sort by time.
fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace(['-', ':'], "")
}

/// `20261205T173500Z` or `20261205T173500Z-N` (a second rotation in the same second):
/// the time and N. Nothing else is a rotated file of ours.
fn parse_stamp(s: &str) -> Option<(SystemTime, u32)> {
    let (stamp, n) = match s.split_once('-') {
        Some((stamp, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (stamp, n.parse().ok()?)
        }
        Some(_) => return None,
        None => (s, 0),
    };
    let b = stamp.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 16 || !digits(0..8) || b[8] != b'T' || !digits(9..15) || b[15] != b'Z' {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &stamp[..4],
        &stamp[4..6],
        &stamp[6..8],
        &stamp[9..11],
        &stamp[11..13],
        &stamp[13..15]
    );
    Some((humantime::parse_rfc3339(&text).ok()?, n))
}

fn day_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / DAY
}

/// The rotated files of the log at `path`, oldest first, with their rotation times.
fn rotated(path: &Path) -> Result<Vec<(PathBuf, SystemTime)>, AuditError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let prefix = format!("{base}.");
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        if let Some((t, n)) = parse_stamp(rest) {
            out.push((t, n, dir.join(&name)));
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(t, _, p)| (p, t)).collect())
}

/// The open log.
pub struct AuditLog {
    config: AuditConfig,
    file: File,
    head: File,
    size: u64,
    /// The UTC day of the file's first line.
    day: Option<u64>,
    prev: String,
}

impl AuditLog {
    /// Opens (or creates) the log and finds where its chain ends. If the head file does
    /// not match the log's last line, the log changed while no daemon held it: the first
    /// line written says so.
    pub fn open(config: AuditConfig) -> Result<AuditLog, AuditError> {
        let path = config.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let file = open_for_append(&path)?;
        let hp = head_path(&path);
        let head = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&hp)
            .map_err(io_err(&hp))?;
        let mut recorded = String::new();
        std::io::Read::read_to_string(&mut (&head), &mut recorded).map_err(io_err(&hp))?;
        let recorded = recorded.trim().to_owned();
        // A line cut short (a crash, a full disk mid-write) is cut off, and said so below:
        // the next line must not be glued onto it.
        let cut = cut_partial_line(&file, &path)?;
        let (size, first, last) = scan(&path)?;
        let earlier = rotated(&path)?;
        let prev = match &last {
            Some(l) => hash(l),
            None => match earlier.last() {
                Some((p, _)) => scan(p)?.2.map(|l| hash(&l)).unwrap_or(GENESIS.into()),
                None => GENESIS.into(),
            },
        };
        let mut log = AuditLog {
            day: first.as_deref().and_then(line_day),
            config,
            file,
            head,
            size,
            prev,
        };
        let mut problems = Vec::new();
        if let Some(bytes) = cut {
            problems.push(format!(
                "a last line cut short ({bytes} bytes) was removed: the daemon stopped while \
                 writing it"
            ));
        }
        let empty = last.is_none() && earlier.is_empty();
        if recorded.is_empty() {
            if !empty {
                problems.push("the head file is missing or empty".into());
            }
        } else if recorded != log.prev {
            let previous_line = last.as_deref().and_then(line_prev);
            // Stopped between writing a line and recording it: not a change.
            if previous_line.as_deref() != Some(recorded.as_str()) {
                problems.push(format!(
                    "the log does not end where its head file says (head {recorded}, last line \
                     {})",
                    log.prev
                ));
            }
        }
        if problems.is_empty() {
            log.write_head()?;
        } else {
            let result = problems.join("; ");
            log::error!(
                "audit log {}: {result}: it changed while no daemon held it",
                path.display()
            );
            log.append(&Entry {
                principal: "daemon".into(),
                role: None,
                operation: MISMATCH.into(),
                object: path.display().to_string(),
                params: serde_json::json!({ "head": recorded }),
                status: 0,
                result,
            })?;
        }
        log.expire(SystemTime::now())?;
        Ok(log)
    }

    /// Appends `entry` and makes it durable before returning.
    pub fn append(&mut self, entry: &Entry) -> Result<(), AuditError> {
        self.append_at(entry, SystemTime::now())
    }

    /// [`Self::append`] as if the time were `now` (tests of rotation and expiry).
    pub fn append_at(&mut self, entry: &Entry, now: SystemTime) -> Result<(), AuditError> {
        let value = serde_json::to_value(entry).expect("an entry is plain JSON");
        let approx = value.to_string().len() as u64 + 160;
        let today = day_of(now);
        if self.size > 0
            && (self.size + approx > self.config.max_bytes || self.day.is_some_and(|d| d != today))
        {
            self.rotate(now)?;
        }
        self.write_line(value, now)
    }

    /// Adds `time` and `prev` to `value`, writes it as a line, syncs it and records it in
    /// the head file.
    fn write_line(
        &mut self,
        mut value: serde_json::Value,
        now: SystemTime,
    ) -> Result<(), AuditError> {
        let obj = value.as_object_mut().expect("an entry is an object");
        obj.insert(
            "time".into(),
            humantime::format_rfc3339_millis(now).to_string().into(),
        );
        obj.insert("prev".into(), self.prev.clone().into());
        let mut line = serde_json::to_vec(&value).expect("JSON values serialize");
        let path = self.config.path.clone();
        let h = hash(&line);
        line.push(b'\n');
        let written = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Leave no partial line for the next one to be glued onto.
            let _ = self.file.set_len(self.size);
            return Err(io_err(&path)(e));
        }
        if self.size == 0 {
            self.day = Some(day_of(now));
        }
        self.size += line.len() as u64;
        self.prev = h;
        self.write_head()
    }

    fn write_head(&mut self) -> Result<(), AuditError> {
        let hp = head_path(&self.config.path);
        let text = format!("{}\n", self.prev);
        self.head
            .write_all_at(text.as_bytes(), 0)
            .map_err(io_err(&hp))?;
        self.head.set_len(text.len() as u64).map_err(io_err(&hp))?;
        self.head.sync_data().map_err(io_err(&hp))
    }

    /// Starts a new file (and expires old ones).
    fn rotate(&mut self, now: SystemTime) -> Result<(), AuditError> {
        let path = self.config.path.clone();
        let mut target = PathBuf::from(format!("{}.{}", path.display(), stamp(now)));
        let mut n = 1;
        while target.exists() {
            target = PathBuf::from(format!("{}.{}-{n}", path.display(), stamp(now)));
            n += 1;
        }
        std::fs::rename(&path, &target).map_err(io_err(&path))?;
        self.file = open_for_append(&path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        }
        self.size = 0;
        self.day = None;
        self.expire(now)
    }

    /// Deletes rotated files past the retention time, after writing (durably) the line
    /// that records the hash the oldest kept line follows, so that [`verify`] can tell
    /// expired lines from removed ones even if the daemon stops half-way.
    fn expire(&mut self, now: SystemTime) -> Result<(), AuditError> {
        let keep = Duration::from_secs(u64::from(self.config.retention_days) * DAY);
        let mut expired = Vec::new();
        // Each expired file's last line: whichever is deleted last, the oldest line kept
        // follows one of these (a stop half-way through the deletions included).
        let mut last_hashes = Vec::new();
        for (p, t) in rotated(&self.config.path)? {
            if now.duration_since(t).unwrap_or_default() > keep {
                last_hashes.extend(scan(&p)?.2.map(|l| hash(&l)));
                expired.push(p);
            }
        }
        let last_hash = last_hashes.last().cloned();
        if expired.is_empty() {
            return Ok(());
        }
        let entry = Entry {
            principal: "daemon".into(),
            role: None,
            operation: EXPIRED.into(),
            object: self.config.path.display().to_string(),
            params: serde_json::json!({
                "files": expired.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "last_hash": last_hash,
                "last_hashes": last_hashes,
            }),
            status: 0,
            result: format!("older than {} days: deleted", self.config.retention_days),
        };
        self.write_line(
            serde_json::to_value(&entry).expect("an entry is plain JSON"),
            now,
        )?;
        for p in expired {
            std::fs::remove_file(&p).map_err(io_err(&p))?;
            log::info!("audit log {} expired", p.display());
        }
        Ok(())
    }
}

/// Cuts a last line without its newline off the file; how many bytes went.
fn cut_partial_line(file: &File, path: &Path) -> Result<Option<u64>, AuditError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(None);
    }
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    file.set_len(keep as u64).map_err(io_err(path))?;
    file.sync_data().map_err(io_err(path))?;
    Ok(Some((bytes.len() - keep) as u64))
}

/// The log file, the owner's alone.
fn open_for_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))
}

/// A file's size, first line and last line.
type Scan = (u64, Option<Vec<u8>>, Option<Vec<u8>>);

fn scan(path: &Path) -> Result<Scan, AuditError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let size = f.seek(SeekFrom::End(0)).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    let (mut first, mut last) = (None, None);
    for line in BufReader::new(f).split(b'\n') {
        let line = line.map_err(io_err(path))?;
        if first.is_none() {
            first = Some(line.clone());
        }
        last = Some(line);
    }
    Ok((size, first, last))
}

fn line_field(line: &[u8], key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get(key)?.as_str().map(str::to_owned)
}

fn line_prev(line: &[u8]) -> Option<String> {
    line_field(line, "prev")
}

fn line_day(line: &[u8]) -> Option<u64> {
    humantime::parse_rfc3339(&line_field(line, "time")?)
        .ok()
        .map(day_of)
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Break {
    pub file: PathBuf,
    /// 1-based.
    pub line: u64,
    pub reason: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub files: usize,
    pub lines: u64,
    /// The first line whose chain does not hold, if any.
    pub first_break: Option<Break>,
    /// The oldest file starts after expired ones, so its first `prev` cannot be checked.
    pub starts_after_expired: bool,
}

/// Walks the log at `path` (rotated files, oldest first, then the current one) and checks
/// every line's `prev`, the head file, and the lines where a daemon said it found the log
/// changed. A first line that follows expired files is accepted only if an expiry line
/// records the hash it follows.
pub fn verify(path: &Path) -> Result<Report, AuditError> {
    let mut files: Vec<PathBuf> = rotated(path)?.into_iter().map(|(p, _)| p).collect();
    files.push(path.to_owned());
    let mut report = Report {
        files: files.len(),
        lines: 0,
        first_break: None,
        starts_after_expired: false,
    };
    let mut expected: Option<String> = None;
    let mut first: Option<(PathBuf, String)> = None;
    let mut anchors = Vec::new();
    let mut broke = None;
    'files: for file in &files {
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file == path => Vec::new(),
            Err(e) => return Err(io_err(file)(e)),
        };
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            let n = bytes.split(|b| *b == b'\n').count() as u64;
            broke = Some(Break {
                file: file.clone(),
                line: n,
                reason: "the last line is cut short (no newline)".into(),
            });
            break;
        }
        let Some(body) = bytes.strip_suffix(b"\n") else {
            continue; // empty
        };
        for (i, line) in body.split(|b| *b == b'\n').enumerate() {
            report.lines += 1;
            let at = |reason: String| Break {
                file: file.clone(),
                line: i as u64 + 1,
                reason,
            };
            // Parsed once; every field below is read from it.
            let v: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
            let Some(prev) = v["prev"].as_str().map(str::to_owned) else {
                broke = Some(at("not a JSON line with a \"prev\" hash".into()));
                break 'files;
            };
            match &expected {
                None => first = Some((file.clone(), prev.clone())),
                Some(e) if *e != prev => {
                    broke = Some(at(format!(
                        "its prev {prev} is not the hash of the line before ({e}): a line \
                         before it was changed or removed"
                    )));
                    break 'files;
                }
                _ => {}
            }
            match v["operation"].as_str() {
                Some(MISMATCH) => {
                    broke = Some(at(format!(
                        "a daemon found the log changed while no daemon held it: {}",
                        v["result"].as_str().unwrap_or_default()
                    )));
                    break 'files;
                }
                Some(EXPIRED) => {
                    if let Some(h) = v["params"]["last_hash"].as_str() {
                        anchors.push(h.to_owned());
                    }
                    if let Some(hs) = v["params"]["last_hashes"].as_array() {
                        anchors.extend(hs.iter().filter_map(|h| h.as_str()).map(str::to_owned));
                    }
                }
                _ => {}
            }
            expected = Some(hash(line));
        }
    }
    // The oldest line must follow nothing, or what an expiry recorded (known only once
    // every line has been read).
    if let (None, Some((file, prev))) = (&broke, &first) {
        if prev != GENESIS {
            if anchors.contains(prev) {
                report.starts_after_expired = true;
            } else {
                broke = Some(Break {
                    file: file.clone(),
                    line: 1,
                    reason: format!(
                        "the oldest line follows {prev}, which no expiry recorded: lines \
                         before it were removed"
                    ),
                });
            }
        }
    }
    if broke.is_none() {
        let hp = head_path(path);
        let recorded = match std::fs::read_to_string(&hp) {
            Ok(t) => t.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(&hp)(e)),
        };
        match &expected {
            None if recorded.is_empty() => {}
            Some(_) if recorded.is_empty() => {
                broke = Some(Break {
                    file: hp.clone(),
                    line: 0,
                    reason: "the head file is missing or empty".into(),
                })
            }
            last => {
                let last = last.clone().unwrap_or_else(|| GENESIS.to_string());
                if recorded != last {
                    broke = Some(Break {
                        file: path.to_owned(),
                        line: report.lines,
                        reason: format!(
                            "the head file records {recorded} as the last line's hash, the log \
                             ends with {last}: lines at the end were changed or removed"
                        ),
                    });
                }
            }
        }
    }
    report.first_break = broke;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(op: &str) -> Entry {
        Entry {
            principal: "uid=1(x)".into(),
            role: Some(crate::access::Role::Operator),
            operation: op.into(),
            object: "/v1/disks/a".into(),
            params: redact(serde_json::json!({"size": 1, "passphrase": "hunter2"})),
            status: 200,
            result: "ok".into(),
        }
    }

    fn log_in(dir: &Path) -> AuditLog {
        AuditLog::open(AuditConfig::new(dir.join("audit.log"))).unwrap()
    }

    #[test]
    fn an_intact_log_verifies_and_holds_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = log_in(dir.path());
            for i in 0..5 {
                log.append(&entry(&format!("op{i}"))).unwrap();
            }
        }
        // Reopened, the chain goes on.
        log_in(dir.path()).append(&entry("op5")).unwrap();
        let r = verify(&dir.path().join("audit.log")).unwrap();
        assert_eq!(r.lines, 6);
        assert_eq!(r.first_break, None, "{r:?}");
        let text = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        assert!(!text.contains("hunter2"));
        assert!(text.contains("<redacted>"));
    }

    fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        f(&mut lines);
        let mut out = lines.join("\n");
        out.push('\n');
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn an_edited_removed_or_truncated_line_breaks_the_chain_where_it_is() {
        // Where the break shows: the line after an edited one, the line that follows a
        // removed one, and the head for the last line.
        for (what, line) in [
            ("edit", 3),
            ("remove", 2),
            ("edit-last", 4),
            ("drop-last", 3),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.log");
            {
                let mut log = log_in(dir.path());
                for i in 0..4 {
                    log.append(&entry(&format!("op{i}"))).unwrap();
                }
            }
            rewrite(&path, |l| match what {
                "edit" => l[1] = l[1].replace("op1", "op9"),
                "remove" => {
                    l.remove(1);
                }
                "edit-last" => l[3] = l[3].replace("op3", "op9"),
                _ => {
                    l.pop();
                }
            });
            let r = verify(&path).unwrap();
            let b = r
                .first_break
                .unwrap_or_else(|| panic!("{what}: no break found"));
            assert_eq!(b.line, line, "{what}: {b:?}");
        }
        // Cut in the middle of a line.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        log_in(dir.path()).append(&entry("a")).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let b = verify(&path).unwrap().first_break.unwrap();
        assert!(b.reason.contains("cut short"), "{b:?}");
    }

    #[test]
    fn a_log_changed_while_closed_says_so_when_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        {
            let mut log = log_in(dir.path());
            log.append(&entry("a")).unwrap();
            log.append(&entry("b")).unwrap();
        }
        rewrite(&path, |l| {
            l.pop();
        });
        log_in(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines().last().unwrap().contains("audit.mismatch"),
            "{text}"
        );
    }

    #[test]
    fn what_happens_to_a_stopped_log_is_found() {
        // A line cut short, a deleted head, the oldest lines removed: each fails verify.
        for what in ["cut", "head", "oldest"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.log");
            {
                let mut log = log_in(dir.path());
                for i in 0..4 {
                    log.append(&entry(&format!("op{i}"))).unwrap();
                }
            }
            match what {
                "cut" => {
                    let len = std::fs::metadata(&path).unwrap().len();
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .unwrap()
                        .set_len(len - 7)
                        .unwrap();
                }
                "head" => std::fs::remove_file(dir.path().join("audit.log.head")).unwrap(),
                _ => rewrite(&path, |l| {
                    l.remove(0);
                }),
            }
            if what != "oldest" {
                // The daemon starts again: it says what it found, and goes on.
                let mut log = log_in(dir.path());
                log.append(&entry("after")).unwrap();
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(text
                    .lines()
                    .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
                assert!(text.contains(MISMATCH), "{what}: {text}");
            }
            let b = verify(&path)
                .unwrap()
                .first_break
                .unwrap_or_else(|| panic!("{what}: intact"));
            let needle = match what {
                "cut" => "cut short",
                "head" => "head file is missing",
                _ => "no expiry recorded",
            };
            assert!(b.reason.contains(needle), "{what}: {b:?}");
        }
    }

    #[test]
    fn a_power_cut_between_a_line_and_its_head_is_no_tampering() {
        // The line reached the disk, the head file's update did not.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let head = dir.path().join("audit.log.head");
        let mut log = log_in(dir.path());
        log.append(&entry("a")).unwrap();
        let after_first = std::fs::read(&head).unwrap();
        log.append(&entry("b")).unwrap();
        drop(log);
        std::fs::write(&head, after_first).unwrap();
        log_in(dir.path()).append(&entry("c")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(MISMATCH), "{text}");
        assert_eq!(verify(&path).unwrap().first_break, None);
    }

    #[test]
    fn verify_alone_finds_a_missing_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        log_in(dir.path()).append(&entry("a")).unwrap();
        std::fs::remove_file(dir.path().join("audit.log.head")).unwrap();
        let b = verify(&path).unwrap().first_break.unwrap();
        assert!(b.reason.contains("head file is missing"), "{b:?}");
    }

    #[test]
    fn only_our_rotated_names_are_part_of_the_log() {
        assert!(parse_stamp("20261205T173500Z").is_some());
        assert_eq!(parse_stamp("20261205T173500Z-12").unwrap().1, 12);
        for bad in [
            "20261205T173500Z.gz",
            "20261205T173500Z-",
            "2026120XT173500Z",
            "x",
            "20261205T1735000",
        ] {
            assert!(parse_stamp(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn rotation_by_day_and_size_keeps_one_chain_and_expiry_drops_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut config = AuditConfig::new(path.clone());
        config.max_bytes = 2_000;
        config.retention_days = 10;
        let mut log = AuditLog::open(config).unwrap();
        let t0 = SystemTime::now() - Duration::from_secs(30 * DAY);
        for day in 0..30u64 {
            log.append_at(&entry("daily"), t0 + Duration::from_secs(day * DAY))
                .unwrap();
        }
        // Today: enough lines to rotate by size.
        for _ in 0..20 {
            log.append(&entry("busy")).unwrap();
        }
        let files = rotated(&path).unwrap();
        assert!(!files.is_empty());
        for (p, t) in &files {
            let age = SystemTime::now().duration_since(*t).unwrap();
            assert!(
                age <= Duration::from_secs(10 * DAY + 60),
                "{} kept",
                p.display()
            );
        }
        // Several files rotated today by size.
        let today = day_of(SystemTime::now());
        assert!(
            files.iter().filter(|(_, t)| day_of(*t) == today).count() >= 2,
            "{files:?}"
        );
        let r = verify(&path).unwrap();
        assert_eq!(r.first_break, None, "{r:?}");
        assert!(r.starts_after_expired);
        assert_eq!(r.files, files.len() + 1);
    }
}
