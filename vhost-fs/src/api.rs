//! The HTTP API on a unix socket (as vhost-blk's): `GET /metrics` in the Prometheus text
//! format, with the same per-queue series as vhost-blk under the `strata_fs` prefix, and
//! `GET /v1/share` as JSON. One request per connection; a control plane, not a data path.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use storage_core::metrics::QueueMetrics;

use crate::device::FsDevice;

/// Serves the API on `listener` from a thread of its own.
pub fn spawn(listener: UnixListener, device: Arc<FsDevice>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = handle(s, &device) {
                            log::debug!("api: {e}");
                        }
                    }
                    Err(e) => log::warn!("api: accept failed: {e}"),
                }
            }
        })?;
    Ok(())
}

fn handle(stream: UnixStream, device: &FsDevice) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, target) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            render_metrics(device),
        ),
        ("GET", "/v1/share") => ("200 OK", "application/json", share_json(device).to_string()),
        (_, "/metrics" | "/v1/share") => (
            "405 Method Not Allowed",
            "application/json",
            r#"{"error":"only GET is allowed"}"#.to_string(),
        ),
        _ => (
            "404 Not Found",
            "application/json",
            r#"{"error":"unknown path; try /metrics or /v1/share"}"#.to_string(),
        ),
    };
    let mut stream = stream;
    write!(stream, "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    stream.write_all(body.as_bytes())
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

pub fn render_metrics(device: &FsDevice) -> String {
    let prefix = "strata_fs";
    let share = escape(device.tag.as_deref().unwrap_or(&device.shared_dir));
    let mut out = String::new();
    QueueMetrics::render_help(&mut out, prefix);
    for (i, q) in device.all_queue_metrics().iter().enumerate() {
        q.render(
            &mut out,
            prefix,
            &format!("share=\"{share}\",queue=\"{i}\""),
        );
    }
    let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {prefix}_{name} {help}\n# TYPE {prefix}_{name} {kind}\n{prefix}_{name}{{share=\"{share}\"}} {v}\n"
        ));
    };
    gauge(
        &mut out,
        "inodes",
        "Inodes the guest holds.",
        "gauge",
        device.passthrough.inode_count() as u64,
    );
    gauge(
        &mut out,
        "open_handles",
        "Files and directories the guest has open.",
        "gauge",
        device.passthrough.handle_count() as u64,
    );
    gauge(
        &mut out,
        "frontend_connected",
        "Whether a frontend is connected.",
        "gauge",
        u64::from(device.connected.load(Ordering::Relaxed)),
    );
    gauge(
        &mut out,
        "frontend_connections_total",
        "Frontend connections accepted.",
        "counter",
        device.connections.load(Ordering::Relaxed),
    );
    out
}

pub fn share_json(device: &FsDevice) -> serde_json::Value {
    serde_json::json!({
        "shared_dir": device.shared_dir,
        "tag": device.tag,
        "read_only": device.read_only,
        "request_queues": device.request_queues,
        "queue_size": device.queue_size,
        "queue_depth": device.queue_depth,
        "engine": device.engine,
        "inodes": device.passthrough.inode_count(),
        "open_handles": device.passthrough.handle_count(),
        "features_negotiated": format!("{:#x}", device.acked_features.load(Ordering::Relaxed)),
        "frontend_connected": device.connected.load(Ordering::Relaxed),
        "frontend_connections": device.connections.load(Ordering::Relaxed),
    })
}
