//! The HTTP API on a unix socket (as vhost-blk's): `GET /metrics` in the Prometheus text
//! format, with the same per-queue series as vhost-blk under the `strata_fs` prefix, and
//! `GET /v1/share` as JSON. One request per connection; a control plane, not a data path.

use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use daemon_support::api::{self, Response};
use storage_core::metrics::{Exposition, Kind};

use crate::device::FsDevice;

/// Serves the API on `listener` from a thread of its own.
pub fn spawn(listener: UnixListener, device: Arc<FsDevice>) -> std::io::Result<()> {
    api::serve(listener, move |method, target| match (method, target) {
        ("GET", "/metrics") => Response::ok("text/plain; version=0.0.4", render_metrics(&device)),
        ("GET", "/v1/share") => Response::ok("application/json", share_json(&device).to_string()),
        _ => Response::not_found_or_not_allowed(method, target, &["/metrics", "/v1/share"]),
    })
}

pub fn render_metrics(device: &FsDevice) -> String {
    let mut out = Exposition::new("strata_fs");
    let share = device.tag.as_deref().unwrap_or(&device.shared_dir);
    for (i, q) in device.all_queue_metrics().iter().enumerate() {
        q.render(&mut out, &[("share", share), ("queue", &i.to_string())]);
    }
    let labels = [("share", share)];
    for (name, help, kind, v) in [
        (
            "inodes",
            "Inodes the guest holds.",
            Kind::Gauge,
            device.passthrough.inode_count() as u64,
        ),
        (
            "open_handles",
            "Files and directories the guest has open.",
            Kind::Gauge,
            device.passthrough.handle_count() as u64,
        ),
        (
            "frontend_connected",
            "Whether a frontend is connected.",
            Kind::Gauge,
            u64::from(device.connected.load(Ordering::Relaxed)),
        ),
        (
            "frontend_connections_total",
            "Frontend connections accepted.",
            Kind::Counter,
            device.connections.load(Ordering::Relaxed),
        ),
    ] {
        out.sample(name, kind, help, &labels, v);
    }
    out.finish()
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
