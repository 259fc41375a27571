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

use crate::config::{check_distinct, Config, ConfigError, DiskText};

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
    #[serde(default)]
    disk: Vec<DiskText>,
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
    Ok(Config {
        disks,
        api_socket: file.api_socket,
        socket_group,
        access,
        audit,
        config_file: Some(path.to_owned()),
    })
}

/// Writes disk changes back to the file.
#[derive(Debug)]
pub struct ConfigWriter {
    path: PathBuf,
}

impl ConfigWriter {
    pub fn new(path: PathBuf) -> Self {
        ConfigWriter { path }
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
        let tmp = dir.join(format!(".{name}.tmp"));
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io)?;
        f.write_all(doc.to_string().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../vhost-blk.example.toml");

    #[test]
    fn the_example_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        // The example's paths are a host's; keep its disks on null devices here.
        std::fs::write(&path, EXAMPLE).unwrap();
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
        ] {
            std::fs::write(&path, text).unwrap();
            let e = load(&path).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
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
