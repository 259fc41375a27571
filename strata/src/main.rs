//! `strata`: the command-line client for people (tables) and scripts (`--json`). It talks
//! to a daemon's management API over its unix socket; `strata audit verify` reads an audit
//! log directly, and `strata image check` an image file. Exit codes: 0 done, 1 the API or
//! the check said no, 2 bad usage (`image check`: as `qemu-img check`).

mod image;
mod table;

use strata::cli::{
    AuditCommand, Cli, Command, DiskCommand, GroupCommand, ImageCommand, JobsCommand, KeyCommand,
    SnapshotCommand, TokenCommand,
};

use std::process::ExitCode;

use clap::Parser;
use serde_json::{json, Value};

use daemon_support::api_client::{call_endpoint, Answer, Endpoint};

/// `iops-total=5000 ...` as the API's JSON object.
fn limits_body(pairs: &[String]) -> Result<Value, Failure> {
    let mut map = serde_json::Map::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| Failure(format!("{p:?}: expected KEY=VALUE")))?;
        let v: u64 = v
            .parse()
            .map_err(|_| Failure(format!("{p:?}: the value is not a whole number")))?;
        map.insert(k.to_owned(), v.into());
    }
    Ok(Value::Object(map))
}

/// Why a command failed: the message, and exit code 1.
struct Failure(String);

/// The passphrase in a key file, checked as the daemon checks its own (mode 0600, ours),
/// as the API takes it (text).
fn passphrase(path: &std::path::Path) -> Result<String, Failure> {
    let p = storage_core::crypto::key_file::read(path).map_err(|e| Failure(e.to_string()))?;
    String::from_utf8(p.to_vec()).map_err(|_| {
        Failure(format!(
            "{}: the API takes passphrases that are UTF-8 text",
            path.display()
        ))
    })
}

/// A keyslot request's body; the passphrases leave this process only in it.
fn keyslot_body(
    key_file: &std::path::Path,
    new_key_file: Option<&std::path::Path>,
    iter_time: Option<u64>,
) -> Result<Value, Failure> {
    let mut body = json!({ "passphrase": passphrase(key_file)? });
    if let Some(f) = new_key_file {
        body["new_passphrase"] = passphrase(f)?.into();
    }
    if let Some(t) = iter_time {
        body["iter_time_ms"] = t.into();
    }
    Ok(body)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(e.kind(), DisplayHelp | DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            if e.kind() == DisplayHelpOnMissingArgumentOrSubcommand {
                eprint!("{e}");
                return ExitCode::from(2);
            }
            eprintln!("strata: {}", daemon_support::cli::one_line(&e));
            return ExitCode::from(2);
        }
    };
    // A local command, with qemu-img check's exit codes.
    if let Command::Image(ImageCommand::Check { file, repair }) = &cli.command {
        return image::run(file, repair.as_deref(), cli.json);
    }
    if let Command::Image(c @ ImageCommand::Create { .. }) = &cli.command {
        return image::create(c);
    }
    match run(&cli) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(Failure(m)) => {
            eprintln!("strata: {m}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<String, Failure> {
    let endpoint = match &cli.url {
        None => Endpoint::Unix(cli.api.clone()),
        Some(url) => Endpoint::https(
            url,
            cli.cacert
                .clone()
                .ok_or_else(|| Failure("--url needs --cacert (the certificate to trust)".into()))?,
            match (&cli.token, &cli.token_file) {
                (Some(t), _) => t.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| Failure(format!("--token-file {}: {e}", f.display())))?
                    .trim()
                    .to_owned(),
                (None, None) => {
                    return Err(Failure(
                        "--url needs --token, --token-file or STRATA_TOKEN".into(),
                    ))
                }
            },
        )
        .map_err(Failure)?,
    };
    let call = |method: &str, path: &str, body: Option<&Value>| {
        call_endpoint(&endpoint, method, path, body).map_err(|e| Failure(e.to_string()))
    };
    let api = |method: &str, path: &str, body: Option<Value>| -> Result<Value, Failure> {
        let answer = call(method, path, body.as_ref())?;
        ok(answer)
    };
    let show = |v: &Value, table: fn(&Value) -> String| {
        if cli.json {
            format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
        } else {
            table(v)
        }
    };
    // Polls a job until it ends: its table when it is done, else a failure.
    let wait_for_job = |job_id: &str| -> Result<String, Failure> {
        let path = format!("/v1/jobs/{}", encode(job_id));
        loop {
            let j = api("GET", &path, None)?;
            match j["state"].as_str() {
                Some("running") => std::thread::sleep(std::time::Duration::from_millis(100)),
                Some("done") => return Ok(show(&j, table::job)),
                _ => {
                    return Err(Failure(format!(
                        "{job_id} ended {}: {}",
                        j["state"].as_str().unwrap_or("?"),
                        j["error"].as_str().unwrap_or("")
                    )))
                }
            }
        }
    };

    Ok(match &cli.command {
        Command::Disk(DiskCommand::List) => show(&api("GET", "/v1/disks", None)?, table::disks),
        Command::Disk(DiskCommand::Show { id }) => {
            show(&api("GET", &disk_path(id), None)?, table::disk)
        }
        Command::Disk(DiskCommand::Add {
            id,
            socket,
            disk,
            blockdev,
            object,
            queues,
            queue_size,
            queue_depth,
            poll_us,
            passphrase_file,
        }) => {
            let mut body = json!({ "id": id, "socket": socket, "disk": disk });
            if let Some(f) = passphrase_file {
                body["passphrase"] = passphrase(f)?.into();
            }
            let fields = [
                ("blockdev", (!blockdev.is_empty()).then(|| json!(blockdev))),
                ("object", (!object.is_empty()).then(|| json!(object))),
                ("queues", queues.map(Value::from)),
                ("queue-size", queue_size.map(Value::from)),
                ("queue-depth", queue_depth.map(Value::from)),
                ("poll-us", poll_us.map(Value::from)),
            ];
            for (k, v) in fields {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            show(&api("POST", "/v1/disks", Some(body))?, |v| {
                format!(
                    "added disk {} ({}) on {}\n",
                    v["id"].as_str().unwrap_or("?"),
                    table::size(v["size"].as_u64().unwrap_or(0)),
                    v["socket"].as_str().unwrap_or("?")
                )
            })
        }
        Command::Disk(DiskCommand::Limits { id, limits }) => {
            let path = format!("{}/limits", disk_path(id));
            show(&api("PUT", &path, Some(limits_body(limits)?))?, |v| {
                format!(
                    "disk {}: limits {}\n",
                    v["id"].as_str().unwrap_or("?"),
                    v["throttle"]["limits"]
                )
            })
        }
        Command::Key(KeyCommand::List { disk }) => show(
            &api("GET", &format!("{}/keyslots", disk_path(disk)), None)?,
            |v| {
                let slots: Vec<String> = v["keyslots"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| format!("{} ({})", s["id"], s["kdf"].as_str().unwrap_or("?")))
                            .collect()
                    })
                    .unwrap_or_default();
                format!(
                    "disk {}: LUKS{}, keyslots {}\n",
                    v["disk"].as_str().unwrap_or("?"),
                    v["luks_version"],
                    slots.join(", ")
                )
            },
        ),
        Command::Key(
            KeyCommand::Add {
                disk,
                key_file,
                new_key_file,
                iter_time,
            }
            | KeyCommand::Change {
                disk,
                key_file,
                new_key_file,
                iter_time,
            },
        ) => {
            let body = keyslot_body(key_file, Some(new_key_file), *iter_time)?;
            let add = matches!(cli.command, Command::Key(KeyCommand::Add { .. }));
            let (method, path) = if add {
                ("POST", format!("{}/keyslots", disk_path(disk)))
            } else {
                ("POST", format!("{}/passphrase", disk_path(disk)))
            };
            fn slot_line(v: &Value, what: &str) -> String {
                format!(
                    "disk {}: {what} {}\n",
                    v["disk"].as_str().unwrap_or("?"),
                    v["keyslot"]
                )
            }
            let table: fn(&Value) -> String = if add {
                |v| slot_line(v, "the new passphrase is in keyslot")
            } else {
                |v| {
                    slot_line(
                        v,
                        "passphrase changed (the old keyslot removed); now in keyslot",
                    )
                }
            };
            show(&api(method, &path, Some(body))?, table)
        }
        Command::Key(KeyCommand::Remove {
            disk,
            slot,
            key_file,
        }) => {
            let body = keyslot_body(key_file, None, None)?;
            let path = format!("{}/keyslots/{slot}", disk_path(disk));
            show(&api("DELETE", &path, Some(body))?, |v| {
                format!(
                    "disk {}: keyslot {} removed\n",
                    v["disk"].as_str().unwrap_or("?"),
                    v["removed"]
                )
            })
        }
        Command::Snapshot(SnapshotCommand::List { disk }) => show(
            &api("GET", &format!("{}/snapshots", disk_path(disk)), None)?,
            table::snapshots,
        ),
        Command::Snapshot(SnapshotCommand::Create { disk, name }) => {
            let path = format!("{}/snapshots", disk_path(disk));
            show(&api("POST", &path, Some(json!({ "name": name })))?, |v| {
                format!(
                    "snapshot {} of disk {}: {} (the guest paused {:.2} ms)\n",
                    v["name"].as_str().unwrap_or("?"),
                    v["disk"].as_str().unwrap_or("?"),
                    v["file"].as_str().unwrap_or("?"),
                    v["pause_ms"].as_f64().unwrap_or(0.0)
                )
            })
        }
        Command::Snapshot(SnapshotCommand::Delete { disk, name, wait }) => {
            let path = format!("{}/snapshots/{}", disk_path(disk), encode(name));
            let job = api("DELETE", &path, None)?;
            if *wait {
                return wait_for_job(job["id"].as_str().unwrap_or_default());
            }
            show(&job, |v| {
                format!(
                    "started {}: deleting a snapshot of disk {} (its data goes up into the \
                     image above it)\n",
                    v["id"].as_str().unwrap_or("?"),
                    v["object"].as_str().unwrap_or("?")
                )
            })
        }
        Command::Snapshot(SnapshotCommand::Policy {
            disk,
            schedule,
            retention,
            max_snapshots,
            cleanup_interval,
            off,
        }) => {
            let body = if *off {
                Value::Null
            } else {
                let mut p = json!({ "schedule": schedule });
                for (k, v) in [
                    ("retention", retention.map(Value::from)),
                    ("max-snapshots", max_snapshots.map(Value::from)),
                    ("cleanup-interval", cleanup_interval.map(Value::from)),
                ] {
                    if let Some(v) = v {
                        p[k] = v;
                    }
                }
                p
            };
            let path = format!("{}/snapshot-policy", disk_path(disk));
            show(&api("PUT", &path, Some(body))?, |v| {
                format!(
                    "disk {}: snapshot policy {}\n",
                    v["id"].as_str().unwrap_or("?"),
                    v["config"]["snapshot-policy"]
                )
            })
        }
        Command::Snapshot(SnapshotCommand::Revert { disk, name }) => {
            let path = format!("{}/snapshots/{}/revert", disk_path(disk), encode(name));
            show(&api("POST", &path, None)?, |v| {
                let removed: Vec<&str> = v["removed"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
                    .unwrap_or_default();
                format!(
                    "disk {} is back at snapshot {}{}\n",
                    v["disk"].as_str().unwrap_or("?"),
                    v["snapshot"].as_str().unwrap_or("?"),
                    if removed.is_empty() {
                        String::new()
                    } else {
                        format!("; removed {}", removed.join(", "))
                    }
                )
            })
        }
        Command::ThrottleGroup(GroupCommand::List) => {
            show(&api("GET", "/v1/throttle-groups", None)?, table::groups)
        }
        Command::ThrottleGroup(GroupCommand::Limits { name, limits }) => {
            let path = format!("/v1/throttle-groups/{}", encode(name));
            show(&api("PUT", &path, Some(limits_body(limits)?))?, |v| {
                format!(
                    "throttle group {}: limits {}\n",
                    v["name"].as_str().unwrap_or("?"),
                    v["limits"]
                )
            })
        }
        Command::Disk(DiskCommand::Resize {
            id,
            size,
            preallocate,
            wait,
        }) => {
            let size = match size.parse::<u64>() {
                Ok(n) => json!(n),
                Err(_) => json!(size),
            };
            let path = format!("{}/resize", disk_path(id));
            let mut body = json!({ "size": size });
            if let Some(p) = preallocate {
                body["preallocate"] = json!(p);
                let job = api("POST", &path, Some(body))?;
                let job_id = job["id"].as_str().unwrap_or_default().to_owned();
                if !*wait {
                    return Ok(show(&job, |v| {
                        format!(
                            "started {}: preallocating {} for disk {}\n",
                            v["id"].as_str().unwrap_or("?"),
                            table::size(v["total"].as_u64().unwrap_or(0)),
                            v["object"].as_str().unwrap_or("?")
                        )
                    }));
                }
                return wait_for_job(&job_id);
            }
            show(&api("POST", &path, Some(body))?, |v| {
                format!(
                    "disk {} is now {} (frontend told: {})\n",
                    v["id"].as_str().unwrap_or("?"),
                    table::size(v["size"].as_u64().unwrap_or(0)),
                    v["frontend_notified"].as_str().unwrap_or("?")
                )
            })
        }
        Command::Disk(DiskCommand::Remove { id, force }) => {
            let path = format!(
                "{}{}",
                disk_path(id),
                if *force { "?force=true" } else { "" }
            );
            show(&api("DELETE", &path, None)?, |v| {
                format!("removed disk {}\n", v["removed"].as_str().unwrap_or("?"))
            })
        }
        Command::Health => show(&api("GET", "/v1/health", None)?, table::health),
        // Run in `main`, before any connection (an exit code of its own).
        Command::Image(_) => unreachable!("image commands run locally"),
        Command::Jobs { action } => match action.as_ref().unwrap_or(&JobsCommand::List) {
            JobsCommand::List => show(&api("GET", "/v1/jobs", None)?, table::jobs),
            JobsCommand::Show { id } => show(
                &api("GET", &format!("/v1/jobs/{}", encode(id)), None)?,
                table::job,
            ),
            JobsCommand::Cancel { id } => show(
                &api("DELETE", &format!("/v1/jobs/{}", encode(id)), None)?,
                |v| format!("asked {} to stop\n", v["id"].as_str().unwrap_or("?")),
            ),
        },
        Command::Audit(AuditCommand::Verify { file }) => {
            let report = daemon_support::audit::verify(file).map_err(|e| Failure(e.to_string()))?;
            let v = serde_json::to_value(&report).unwrap_or_default();
            let text = show(&v, |_| String::new());
            match &report.first_break {
                Some(b) => {
                    if cli.json {
                        print!("{text}");
                    }
                    return Err(Failure(format!(
                        "{} line {}: {}",
                        b.file.display(),
                        b.line,
                        b.reason
                    )));
                }
                None if cli.json => text,
                None => format!(
                    "{}: intact: {} lines in {} file(s){}\n",
                    file.display(),
                    report.lines,
                    report.files,
                    if report.starts_after_expired {
                        " (it starts after expired files)"
                    } else {
                        ""
                    }
                ),
            }
        }
        Command::Token(TokenCommand::New { name, role }) => {
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                .map_err(|e| Failure(format!("/dev/urandom: {e}")))?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let hash: String = daemon_support::access::token_hash(&token)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!(
                "token (shown once; give it to {name}): {token}\n\n\
                 # for the daemon's config:\n[[token]]\nname = {}\nsha256 = \"{hash}\"\nrole = \"{role}\"\n",
                // A JSON string is a TOML basic string: the name quoted and escaped.
                serde_json::to_string(name).unwrap_or_default()
            )
        }
        Command::Raw { method, path, data } => {
            let body = match data {
                Some(d) => Some(
                    serde_json::from_str(d)
                        .map_err(|e| Failure(format!("--data is not JSON: {e}")))?,
                ),
                None => None,
            };
            let answer = call(&method.to_ascii_uppercase(), path, body.as_ref())?;
            let text = String::from_utf8_lossy(&answer.body).into_owned();
            if answer.status >= 400 {
                return Err(Failure(format!("{}: {}", answer.status, answer.message())));
            }
            text
        }
    })
}

/// `/v1/disks/ID`, the id percent-encoded where it needs to be.
fn disk_path(id: &str) -> String {
    format!("/v1/disks/{}", encode(id))
}

/// A path segment, percent-encoded where it needs to be.
fn encode(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn ok(answer: Answer) -> Result<Value, Failure> {
    if answer.status >= 400 {
        return Err(Failure(format!("{}: {}", answer.status, answer.message())));
    }
    answer.json().ok_or_else(|| {
        Failure(format!(
            "the API answered {} with something that is not JSON: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ))
    })
}
