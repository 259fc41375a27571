//! The HTTP API on a unix socket (HTTP/1.1, as Cloud Hypervisor's API): `GET /metrics` in the
//! Prometheus text format and `GET /v1/disk` as JSON. One request per connection (see
//! `daemon_support::api` for the limits); this is a control plane, not a data path.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use daemon_support::api::{self, Response};
use daemon_support::socket::{self, SocketError, SocketFile};
use storage_core::metrics::{Exposition, Kind};

use crate::device::BlkDevice;

/// The API server; the socket file goes away when this is dropped.
pub struct ApiServer {
    _file: SocketFile,
}

impl ApiServer {
    pub fn start(
        path: &Path,
        group: Option<u32>,
        device: Arc<BlkDevice>,
    ) -> Result<Self, SocketError> {
        let (listener, file) = socket::bind(path, group)?;
        api::serve(listener, move |method, target| {
            route(method, target, &device)
        })
        .map_err(|source| SocketError::Bind {
            path: path.to_owned(),
            source,
        })?;
        Ok(ApiServer { _file: file })
    }
}

fn route(method: &str, target: &str, device: &BlkDevice) -> Response {
    match (method, target) {
        ("GET", "/metrics") => Response::ok("text/plain; version=0.0.4", render_metrics(device)),
        ("GET", "/v1/disk") => Response::ok("application/json", disk_json(device).to_string()),
        _ => Response::not_found_or_not_allowed(method, target, &["/metrics", "/v1/disk"]),
    }
}

/// The Prometheus exposition of the device: per queue counters and latency, plus the disk's
/// size and the frontend's state.
pub fn render_metrics(device: &BlkDevice) -> String {
    let mut out = Exposition::new("strata_blk");
    let disk = device.spec.serial_or_default();
    for (i, q) in device.all_queue_metrics().iter().enumerate() {
        q.render(&mut out, &[("disk", &disk), ("queue", &i.to_string())]);
    }
    let labels = [("disk", disk.as_str())];
    if let Some(tier) = device.disk.tier_metrics() {
        tier.render(&mut out, &labels);
    }
    out.sample(
        "capacity_bytes",
        Kind::Gauge,
        "Disk size.",
        &labels,
        device.capacity(),
    );
    out.sample(
        "frontend_connected",
        Kind::Gauge,
        "Whether a frontend is connected.",
        &labels,
        u8::from(device.connected.load(Ordering::Relaxed)),
    );
    out.sample(
        "frontend_connections_total",
        Kind::Counter,
        "Frontend connections accepted.",
        &labels,
        device.connections.load(Ordering::Relaxed),
    );
    out.finish()
}

/// What `GET /v1/disk` reports.
pub fn disk_json(device: &BlkDevice) -> serde_json::Value {
    let info = device.info();
    let acked = device.acked_features.load(Ordering::Relaxed);
    serde_json::json!({
        "path": info.path,
        "format": info.format,
        "size": info.capacity,
        "read_only": info.read_only,
        "direct": info.direct,
        "engine": info.engine.name(),
        "serial": device.spec.serial_or_default(),
        "queues": device.num_queues,
        "queue_size": device.queue_size,
        "queue_depth": device.queue_depth,
        "poll_us": device.poll.as_micros() as u64,
        "write_cache": if device.writeback.load(Ordering::Relaxed) { "writeback" } else { "writethrough" },
        "features_offered": format!("{:#x}", device.features()),
        "features_negotiated": format!("{acked:#x}"),
        "features_negotiated_names": feature_names(acked),
        "frontend_connected": device.connected.load(Ordering::Relaxed),
        "frontend_connections": device.connections.load(Ordering::Relaxed),
        "graph": device.disk.describe(),
        "throttle": device.disk.throttle_group().map(|g| serde_json::json!({
            "group": g.name(),
            "limits": g.limits().entries().into_iter().map(|(k, v)| (k, serde_json::Value::from(v))).collect::<serde_json::Map<_, _>>(),
        })),
        "cache": device.spec.root.tier().map(|t| serde_json::json!({
            "path": t.cache.display().to_string(),
            "size": t.cache_size,
            "mode": t.mode.name(),
            "policy": t.policy.clone().unwrap_or_else(|| storage_core::cache::DEFAULT_POLICY.to_string()),
            "block_size": t.block_size,
            "seq_cutoff": t.seq_cutoff,
            "slots": device.disk.tier_metrics().map(|m| m.slots.load(Ordering::Relaxed)),
            "failed": device.disk.tier_metrics().map(|m| m.failed.load(Ordering::Relaxed)),
        })),
    })
}

fn feature_names(bits: u64) -> Vec<&'static str> {
    use crate::virtio_blk::*;
    [
        (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
        (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
        (VIRTIO_BLK_F_RO, "RO"),
        (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
        (VIRTIO_BLK_F_FLUSH, "FLUSH"),
        (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
        (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
        (VIRTIO_BLK_F_MQ, "MQ"),
        (VIRTIO_BLK_F_DISCARD, "DISCARD"),
        (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
        (VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
    ]
    .iter()
    .filter(|(bit, _)| bits & (1 << bit) != 0)
    .map(|(_, name)| *name)
    .collect()
}
