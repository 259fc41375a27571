//! The config file (`--config FILE`, TOML; `vhost-blk.example.toml` shows every key): the
//! daemon's API, access table and audit log, and its disks as `[[disk]]` tables. Disks the
//! API adds or removes are written back, so the set survives a restart: the file is
//! rewritten whole (a temporary file, fsynced, renamed over it, the directory fsynced), and
//! `toml_edit` keeps the user's comments and layout.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use daemon_support::access::{AccessTable, RuleText};
use daemon_support::audit::AuditConfig;

use crate::config::{check_distinct, parse_limits, Config, ConfigError, DiskText, LimitsText};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: access rule {index}: {source}")]
    Access {
        path: PathBuf,
        index: usize,
        #[source]
        source: daemon_support::access::AccessError,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The file as written.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileText {
    api_socket: Option<PathBuf>,
    socket_group: Option<String>,
    audit_log: Option<PathBuf>,
    audit_retention_days: Option<u32>,
    audit_max_bytes: Option<u64>,
    #[serde(default)]
    access: Vec<RuleText>,
    /// The API over TCP with TLS 1.3 (off unless given).
    api_tls: Option<TlsText>,
    /// Bearer tokens for callers over TCP (their SHA-256).
    #[serde(default)]
    token: Vec<daemon_support::access::TokenText>,
    /// The role an API operation needs, where it is not the default (README: Roles).
    #[serde(default)]
    privileges: std::collections::BTreeMap<String, String>,
    space_alert_percent: Option<f64>,
    space_check_seconds: Option<u64>,
    /// The dashboard's usage trend, kept across restarts.
    history_file: Option<PathBuf>,
    history_sample_seconds: Option<u64>,
    history_trend_seconds: Option<u64>,
    history_retention_days: Option<u32>,
    #[serde(default)]
    operator_image_dirs: Vec<PathBuf>,
    #[serde(default)]
    operator_socket_dirs: Vec<PathBuf>,
    /// Limits of named throttle groups set through the API, over what the disks declare.
    #[serde(default)]
    throttle_groups: std::collections::BTreeMap<String, LimitsText>,
    #[serde(default)]
    disk: Vec<DiskText>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TlsText {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
}

/// Reads and checks the config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let file: FileText = toml::from_str(&text).map_err(|e| FileError::Syntax {
        path: path.to_owned(),
        line: e.span().map_or(0, |s| {
            text[..s.start.min(text.len())].lines().count().max(1)
        }),
        message: e.message().replace('\n', " "),
    })?;
    let socket_group = file
        .socket_group
        .as_deref()
        .map(daemon_support::socket::group_id)
        .transpose()?;
    let access = if file.access.is_empty() {
        AccessTable::owner_and_group(socket_group)
    } else {
        let rules = file
            .access
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.resolve().map_err(|source| FileError::Access {
                    path: path.to_owned(),
                    index: i + 1,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        AccessTable::new(rules)
    };
    let tokens = file
        .token
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.resolve().map_err(|source| FileError::Access {
                path: path.to_owned(),
                index: i + 1,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (i, t) in tokens.iter().enumerate() {
        if let Some(other) = tokens[..i]
            .iter()
            .find(|o| o.name == t.name || o.sha256 == t.sha256)
        {
            return Err(FileError::Invalid {
                path: path.to_owned(),
                message: format!(
                    "tokens {:?} and {:?}: each token needs a name and a secret of its own",
                    other.name, t.name
                ),
            }
            .into());
        }
    }
    let mut privileges = std::collections::BTreeMap::new();
    for (op, role) in &file.privileges {
        if !crate::api::ROUTES.iter().any(|r| r.op.name == op) {
            let mut known: Vec<&str> = crate::api::ROUTES.iter().map(|r| r.op.name).collect();
            known.sort();
            return Err(FileError::Invalid {
                path: path.to_owned(),
                message: format!(
                    "privileges: no operation {op:?} (operations: {})",
                    known.join(", ")
                ),
            }
            .into());
        }
        let role = role.parse().map_err(|e| FileError::Invalid {
            path: path.to_owned(),
            message: format!("privileges.{op}: {e}"),
        })?;
        privileges.insert(op.clone(), role);
    }
    let access = access.with_tokens(tokens).with_privileges(privileges);
    let api_tls = match &file.api_tls {
        None => None,
        Some(t) => Some(crate::config::TlsConfig {
            listen: t.listen.parse().map_err(|e| FileError::Invalid {
                path: path.to_owned(),
                message: format!("api-tls.listen {:?}: {e} (HOST:PORT)", t.listen),
            })?,
            cert: t.cert.clone(),
            key: t.key.clone(),
        }),
    };
    check_distinct(&file.disk)?;
    let disks = file
        .disk
        .into_iter()
        .map(DiskText::check)
        .collect::<Result<Vec<_>, _>>()?;
    let audit = file.audit_log.map(|p| {
        let mut a = AuditConfig::new(p);
        if let Some(d) = file.audit_retention_days {
            a.retention_days = d;
        }
        if let Some(b) = file.audit_max_bytes {
            a.max_bytes = b;
        }
        a
    });
    let group_limits = file
        .throttle_groups
        .iter()
        .map(|(name, text)| {
            parse_limits(text)
                .map(|l| (name.clone(), l))
                .map_err(|e| FileError::Invalid {
                    path: path.to_owned(),
                    message: format!("throttle-groups.{name}: {e}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let canonical = |key: &str, dirs: &[PathBuf]| {
        dirs.iter()
            .map(|d| {
                std::fs::canonicalize(d).map_err(|e| FileError::Invalid {
                    path: path.to_owned(),
                    message: format!("{key}: {}: {e}", d.display()),
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    // The daemon binds operators' sockets there by name: nobody else may write it.
    for d in &file.operator_socket_dirs {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o022 != 0) {
            return Err(FileError::Invalid {
                path: path.to_owned(),
                message: format!(
                    "operator-socket-dirs: {} is writable by its group or others; the daemon \
                     makes the sockets there, so only its owner may write it",
                    d.display()
                ),
            }
            .into());
        }
    }
    let operator_paths = crate::admission::OperatorPaths {
        image_dirs: canonical("operator-image-dirs", &file.operator_image_dirs)?,
        socket_dirs: canonical("operator-socket-dirs", &file.operator_socket_dirs)?,
    };
    let mut space = crate::space::SpacePolicy::default();
    if let Some(p) = file.space_alert_percent {
        if !(0.0..=100.0).contains(&p) {
            return Err(FileError::Invalid {
                path: path.to_owned(),
                message: format!("space-alert-percent = {p}: must be between 0 and 100"),
            }
            .into());
        }
        space.alert_percent = p;
    }
    if let Some(s) = file.space_check_seconds {
        if s == 0 {
            return Err(FileError::Invalid {
                path: path.to_owned(),
                message: "space-check-seconds must be at least 1".into(),
            }
            .into());
        }
        space.interval = std::time::Duration::from_secs(s);
    }
    let mut history = crate::history::HistoryPolicy {
        file: file.history_file,
        ..Default::default()
    };
    for (key, value, slot) in [
        (
            "history-sample-seconds",
            file.history_sample_seconds,
            &mut history.sample,
        ),
        (
            "history-trend-seconds",
            file.history_trend_seconds,
            &mut history.trend,
        ),
    ] {
        match value {
            Some(0) => {
                return Err(FileError::Invalid {
                    path: path.to_owned(),
                    message: format!("{key} must be at least 1"),
                }
                .into())
            }
            Some(s) => *slot = std::time::Duration::from_secs(s),
            None => {}
        }
    }
    if history.trend < history.sample {
        return Err(FileError::Invalid {
            path: path.to_owned(),
            message: "history-trend-seconds must be at least history-sample-seconds".into(),
        }
        .into());
    }
    if let Some(d) = file.history_retention_days {
        if d == 0 {
            return Err(FileError::Invalid {
                path: path.to_owned(),
                message: "history-retention-days must be at least 1".into(),
            }
            .into());
        }
        history.retention_days = d;
    }
    let points = u64::from(history.retention_days) * 86400 / history.trend.as_secs();
    if points > crate::history::MAX_TREND_POINTS {
        return Err(FileError::Invalid {
            path: path.to_owned(),
            message: format!(
                "history-retention-days over history-trend-seconds makes {points} trend points per disk; at most {} (a longer history-trend-seconds, or fewer days)",
                crate::history::MAX_TREND_POINTS
            ),
        }
        .into());
    }
    Ok(Config {
        api_tls,
        space,
        history,
        access_rules_given: !file.access.is_empty(),
        operator_paths,
        group_limits,
        disks,
        api_socket: file.api_socket,
        socket_group,
        access,
        audit,
        config_file: Some(path.to_owned()),
    })
}

/// Writes disk changes back to the file, one change at a time.
#[derive(Debug)]
pub struct ConfigWriter {
    path: PathBuf,
    /// Held across read, change and rename: two changes at once would each write back
    /// the file without the other's.
    writing: std::sync::Mutex<()>,
}

impl ConfigWriter {
    pub fn new(path: PathBuf) -> Self {
        ConfigWriter {
            path,
            writing: std::sync::Mutex::new(()),
        }
    }

    /// Appends a `[[disk]]` table.
    pub fn add_disk(&self, disk: &DiskText) -> Result<(), FileError> {
        self.edit(|doc| {
            let table = toml_edit::ser::to_document(disk)
                .map_err(|e| e.to_string())?
                .as_table()
                .clone();
            let disks = doc
                .entry("disk")
                .or_insert(toml_edit::Item::ArrayOfTables(Default::default()));
            let Some(array) = disks.as_array_of_tables_mut() else {
                return Err("`disk` is not an array of tables".into());
            };
            array.push(table);
            Ok(())
        })
    }

    /// Sets (or, with `None`, removes) a disk's `limits`.
    pub fn set_disk_limits(&self, id: &str, limits: Option<&LimitsText>) -> Result<(), FileError> {
        let value = limits.map(limits_table).transpose()?;
        self.set_disk_key(id, "limits", value)
    }

    /// Sets (or, with `None`, removes) a disk's `snapshot-policy`.
    pub fn set_disk_policy(
        &self,
        id: &str,
        policy: Option<&crate::lifecycle::PolicyText>,
    ) -> Result<(), FileError> {
        let value = policy.map(|p| {
            let mut t = toml_edit::InlineTable::new();
            t.insert("schedule", p.schedule.as_str().into());
            let ints = [
                ("retention", p.retention),
                ("max-snapshots", p.max_snapshots.map(u64::from)),
                ("cleanup-interval", p.cleanup_interval),
            ];
            for (k, v) in ints {
                if let Some(v) = v {
                    t.insert(k, (v.min(i64::MAX as u64) as i64).into());
                }
            }
            if let Some(q) = p.quiesce {
                t.insert("quiesce", q.into());
            }
            t
        });
        self.set_disk_key(id, "snapshot-policy", value)
    }

    /// Sets (or, with `None`, removes) `key` of a disk's `[[disk]]` table.
    fn set_disk_key(
        &self,
        id: &str,
        key: &str,
        value: Option<toml_edit::InlineTable>,
    ) -> Result<(), FileError> {
        self.edit(|doc| {
            let Some(table) = doc
                .get_mut("disk")
                .and_then(|d| d.as_array_of_tables_mut())
                .and_then(|a| {
                    a.iter_mut()
                        .find(|t| t.get("id").and_then(|v| v.as_str()) == Some(id))
                })
            else {
                return Err(format!("no disk {id:?} in the file"));
            };
            match value {
                Some(v) => table.insert(key, toml_edit::Item::Value(v.into())),
                None => table.remove(key),
            };
            Ok(())
        })
    }

    /// Sets a throttle group's limits under `[throttle-groups]`.
    pub fn set_group_limits(&self, name: &str, limits: &LimitsText) -> Result<(), FileError> {
        let value = limits_table(limits)?;
        self.edit(|doc| {
            let groups = doc
                .entry("throttle-groups")
                .or_insert(toml_edit::Item::Table(toml_edit::Table::new()));
            let Some(groups) = groups.as_table_mut() else {
                return Err("`throttle-groups` is not a table".into());
            };
            groups.set_implicit(true);
            let mut table = toml_edit::Table::new();
            for (k, v) in value.iter() {
                table.insert(k, toml_edit::Item::Value(v.clone()));
            }
            groups.insert(name, toml_edit::Item::Table(table));
            Ok(())
        })
    }

    /// Removes the `[[disk]]` table with this id.
    pub fn remove_disk(&self, id: &str) -> Result<(), FileError> {
        self.edit(|doc| {
            let Some(array) = doc.get_mut("disk").and_then(|d| d.as_array_of_tables_mut()) else {
                return Err(format!("no disk {id:?} in the file"));
            };
            let before = array.len();
            array.retain(|t| t.get("id").and_then(|v| v.as_str()) != Some(id));
            if array.len() == before {
                return Err(format!("no disk {id:?} in the file"));
            }
            Ok(())
        })
    }

    fn edit(
        &self,
        change: impl FnOnce(&mut toml_edit::DocumentMut) -> Result<(), String>,
    ) -> Result<(), FileError> {
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let path = &self.path;
        let io = |source| FileError::Io {
            path: path.clone(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(io)?;
        let mut doc: toml_edit::DocumentMut =
            text.parse()
                .map_err(|e: toml_edit::TomlError| FileError::Invalid {
                    path: path.clone(),
                    message: format!("changed since start and no longer TOML: {}", e.message()),
                })?;
        change(&mut doc).map_err(|message| FileError::Invalid {
            path: path.clone(),
            message,
        })?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // One name: writes take turns (above), and a leftover of a daemon that stopped
        // between writing it and renaming it is replaced, not left to pile up.
        let tmp = dir.join(format!(".{name}.tmp"));
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        // A leftover of a daemon that died mid-write goes; then the name must be new to us
        // (create_new: never through a link someone planted).
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io)?;
        // The file keeps its owner (a root daemon editing an admin's file); only root may
        // give a file away, and only a differing owner needs it.
        use std::os::unix::fs::MetadataExt;
        let new = f.metadata().map_err(io)?;
        if (new.uid(), new.gid()) != (meta.uid(), meta.gid()) {
            std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid())).map_err(io)?;
        }
        f.write_all(doc.to_string().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

fn limits_table(limits: &LimitsText) -> Result<toml_edit::InlineTable, FileError> {
    let mut t = toml_edit::InlineTable::new();
    for (k, v) in limits {
        let v = i64::try_from(*v).map_err(|_| FileError::Invalid {
            path: PathBuf::new(),
            message: format!("limit {k} = {v} is too large"),
        })?;
        t.insert(k, v.into());
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../vhost-blk.example.toml");

    #[test]
    fn the_example_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        // The example's paths are a host's: its disks are null devices, and its operator
        // directories (which must exist) are made here.
        let d = dir.path().display();
        let text = EXAMPLE
            .replace(
                r#"operator-image-dirs = ["/var/lib/strata/images"]"#,
                &format!(r#"operator-image-dirs = ["{d}"]"#),
            )
            .replace(
                r#"operator-socket-dirs = ["/run/strata/operator"]"#,
                &format!(r#"operator-socket-dirs = ["{d}"]"#),
            );
        assert_ne!(text, EXAMPLE);
        std::fs::write(&path, text).unwrap();
        let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.disks.len() >= 2);
        assert!(c.api_socket.is_some());
        assert!(c.audit.is_some());
    }

    #[test]
    fn bad_files_get_one_line_naming_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        for (text, needle) in [
            ("api-socket = \n", "line 1"),
            ("bogus = 1\n", "bogus"),
            ("[[disk]]\nid = \"a\"\nsocket = \"s\"\ndisk = \"path=null,size=1M\"\n[[disk]]\nid = \"a\"\nsocket = \"t\"\ndisk = \"path=null,size=1M\"\n", "twice"),
            ("[[disk]]\nid = \"a\"\nsocket = \"s\"\ndisk = \"size=1M\"\n", "disk \"a\""),
            ("[[access]]\nuid = 1\nrole = \"god\"\n", "god"),
            ("history-sample-seconds = 0\n", "history-sample-seconds"),
            ("history-sample-seconds = 60\nhistory-trend-seconds = 10\n", "at least history-sample"),
            ("history-retention-days = 0\n", "history-retention-days"),
            ("history-trend-seconds = 10\nhistory-sample-seconds = 10\n", "trend points"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = load(&path).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_rewrite_cut_short_before_its_rename_leaves_the_config_whole() {
        // A power cut after the temporary file was written, before the rename: the config
        // is the old one, and the next change goes through.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let text = "[[disk]]\nid = \"a\"\nsocket = \"/run/a\"\ndisk = \"path=null,size=1M\"\n";
        std::fs::write(&path, text).unwrap();
        std::fs::write(dir.path().join(".c.toml.tmp"), "[[disk]]\nid = \"half").unwrap();
        assert_eq!(load(&path).unwrap().disks.len(), 1);
        ConfigWriter::new(path.clone()).remove_disk("a").unwrap();
        assert_eq!(load(&path).unwrap().disks.len(), 0);
        assert!(!dir.path().join(".c.toml.tmp").exists());
    }

    #[test]
    fn disks_written_back_keep_the_users_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "# my daemon\napi-socket = \"/run/a.sock\"\n\n# the root disk\n[[disk]]\nid = \"a\"\nsocket = \"/run/a\"\ndisk = \"path=null,size=1M\"\n",
        )
        .unwrap();
        let w = ConfigWriter::new(path.clone());
        let b = DiskText {
            id: "b".into(),
            socket: "/run/b".into(),
            disk: "path=null,size=2M".into(),
            blockdev: vec![],
            object: vec![],
            queues: Some(2),
            queue_size: None,
            queue_depth: None,
            poll_us: None,
            limits: None,
            snapshot_policy: None,
            added_by_operator: false,
        };
        w.add_disk(&b).unwrap();
        let c = load(&path).unwrap();
        assert_eq!(
            c.disks.iter().map(|d| d.id()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(c.disks[1].text, b);
        w.remove_disk("a").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("# my daemon"), "{text}");
        let c = load(&path).unwrap();
        assert_eq!(c.disks.iter().map(|d| d.id()).collect::<Vec<_>>(), ["b"]);
        assert!(w.remove_disk("a").is_err());
    }
}
