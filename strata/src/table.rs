//! How `strata` shows the API's answers to people.

use serde_json::Value;

/// `10.0 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Columns padded to their widest cell.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn disks(v: &Value) -> String {
    let empty = Vec::new();
    let rows: Vec<Vec<String>> = v["disks"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|d| {
            vec![
                text(&d["id"]),
                size(d["size"].as_u64().unwrap_or(0)),
                text(&d["format"]),
                if d["frontend_connected"].as_bool() == Some(true) {
                    "connected".into()
                } else {
                    "-".into()
                },
                text(&d["socket"]),
                text(&d["path"]),
            ]
        })
        .collect();
    render(
        &["ID", "SIZE", "FORMAT", "FRONTEND", "SOCKET", "PATH"],
        &rows,
    )
}

pub fn disk(v: &Value) -> String {
    let mut rows = Vec::new();
    for key in [
        "id",
        "socket",
        "path",
        "format",
        "size",
        "read_only",
        "engine",
        "serial",
        "queues",
        "queue_depth",
        "write_cache",
        "frontend_connected",
        "frontend_connections",
    ] {
        let value = if key == "size" {
            format!("{} ({} bytes)", size(v[key].as_u64().unwrap_or(0)), v[key])
        } else {
            text(&v[key])
        };
        rows.push(vec![format!("{key}:"), value]);
    }
    if let Some(t) = v.get("throttle").filter(|t| !t.is_null()) {
        rows.push(vec!["throttle:".into(), t.to_string()]);
    }
    if let Some(c) = v.get("cache").filter(|c| !c.is_null()) {
        rows.push(vec!["cache:".into(), c.to_string()]);
    }
    let mut out = String::new();
    let w = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
    for r in rows {
        out.push_str(&format!("{:<w$} {}\n", r[0], r[1]));
    }
    out
}

pub fn groups(v: &Value) -> String {
    let empty = Vec::new();
    let rows: Vec<Vec<String>> = v["groups"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|g| {
            let limits: Vec<String> = g["limits"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            let disks: Vec<String> = g["disks"]
                .as_array()
                .map(|a| a.iter().map(text).collect())
                .unwrap_or_default();
            vec![text(&g["name"]), limits.join(","), disks.join(",")]
        })
        .collect();
    render(&["GROUP", "LIMITS", "DISKS"], &rows)
}

pub fn snapshots(v: &Value) -> String {
    let empty = Vec::new();
    let rows: Vec<Vec<String>> = v["snapshots"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|s| {
            let name = if s["name"].is_null() {
                "(backing)".to_string()
            } else {
                text(&s["name"])
            };
            vec![name, text(&s["format"]), text(&s["file"])]
        })
        .collect();
    render(&["SNAPSHOT", "FORMAT", "FILE"], &rows)
}

fn job_row(j: &Value) -> Vec<String> {
    vec![
        text(&j["id"]),
        text(&j["kind"]),
        text(&j["object"]),
        text(&j["state"]),
        format!("{:.0}%", j["progress_percent"].as_f64().unwrap_or(0.0)),
        format!(
            "{} of {}",
            size(j["done"].as_u64().unwrap_or(0)),
            size(j["total"].as_u64().unwrap_or(0))
        ),
        j["error"].as_str().unwrap_or("").to_owned(),
    ]
}

const JOB_HEADER: [&str; 7] = ["ID", "KIND", "OBJECT", "STATE", "PROGRESS", "DONE", "ERROR"];

pub fn jobs(v: &Value) -> String {
    let empty = Vec::new();
    let rows: Vec<Vec<String>> = v["jobs"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(job_row)
        .collect();
    render(&JOB_HEADER, &rows)
}

pub fn job(v: &Value) -> String {
    render(&JOB_HEADER, &[job_row(v)])
}

pub fn health(v: &Value) -> String {
    format!(
        "status: {}\nversion: {}\nuptime: {} s\ndisks: {}\nfrontends connected: {}\nconfig persistent: {}\n",
        text(&v["status"]),
        text(&v["version"]),
        text(&v["uptime_seconds"]),
        text(&v["disks"]),
        text(&v["frontends_connected"]),
        text(&v["config_persistent"]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(10 << 30), "10.0 GiB");
        assert_eq!(size(1536), "1.5 KiB");
    }

    #[test]
    fn columns_line_up() {
        let t = render(
            &["A", "BB"],
            &[
                vec!["long".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        );
        assert_eq!(t, "A     BB\nlong  x\ns     y\n");
    }
}
