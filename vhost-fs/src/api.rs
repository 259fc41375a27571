//! The management API (`daemon_support::http`, as vhost-blk's: HTTP on a unix socket, roles
//! from the peer's credentials, JSON errors): `GET /metrics` in the Prometheus text format,
//! with the same per-queue series as vhost-blk under the `strata_fs` prefix, `GET
//! /v1/share` and `GET /v1/health` as JSON. One share per process (its sandbox is per
//! process); nothing here changes the share yet, so there is no audit log: a denial is
//! logged as a warning.

use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use daemon_support::access::AccessTable;
use daemon_support::http::{self, Gate, Limits, Operation};
use storage_core::metrics::{Exposition, Kind};

use crate::device::FsDevice;

pub const HEALTH: Operation = Operation::read("health");
pub const METRICS: Operation = Operation::read("metrics");
pub const SHARE_GET: Operation = Operation::read("share.get");

/// Serves the API on `listener` from a thread of its own. The socket's owner is admin and
/// `socket_group`'s members are viewers. User names are not looked up: inside the sandbox
/// that would read the share's own passwd file.
pub fn spawn(
    listener: UnixListener,
    socket_group: Option<u32>,
    device: Arc<FsDevice>,
) -> std::io::Result<()> {
    let gate = Gate::new(AccessTable::owner_and_group(socket_group), None, false);
    let started = Instant::now();
    let router = Router::new()
        .route("/metrics", http::guarded(&gate, METRICS, get(metrics)))
        .route("/v1/share", http::guarded(&gate, SHARE_GET, get(share)))
        .route(
            "/v1/health",
            http::guarded(
                &gate,
                HEALTH,
                get(move |State(d): State<Arc<FsDevice>>| async move {
                    Json(serde_json::json!({
                        "status": "ok",
                        "version": env!("CARGO_PKG_VERSION"),
                        "uptime_seconds": started.elapsed().as_secs(),
                        "frontend_connected": d.connected.load(Ordering::Relaxed),
                    }))
                }),
            ),
        )
        .with_state(device);
    http::serve(listener, http::finish(router), Limits::default())
}

async fn metrics(State(d): State<Arc<FsDevice>>) -> Response {
    http::prometheus(render_metrics(&d))
}

async fn share(State(d): State<Arc<FsDevice>>) -> Json<serde_json::Value> {
    Json(share_json(&d))
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
