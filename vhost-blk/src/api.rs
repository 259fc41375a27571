//! The management API (`daemon_support::http`: HTTP on a unix socket, roles, audit): the
//! disks (list, get, add, remove), health, and `/metrics` in the Prometheus text format.
//! [`ROUTES`] lists every route with the operation and role it needs.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::{Extension, Json, Router};

use daemon_support::access::Role;
use daemon_support::audit::AuditLog;
use daemon_support::http::{self, ApiError, Caller, Gate, JsonBody, Limits, Operation};
use daemon_support::socket::{self, SocketFile};
use storage_core::metrics::{Exposition, Kind};

use crate::config::{Config, DiskText, LimitsText};
use crate::daemon::{DiskSet, SetError};
use crate::device::BlkDevice;
use crate::disk_server::{DiskServer, ResizeError};
use crate::history::History;
use daemon_support::jobs::{JobError, Outcome};
use daemon_support::transport::ConfigNotice;
use storage_core::disk::Preallocation;
use storage_core::error::StorageErrorKind;
use storage_core::units::ByteSize;

pub const HEALTH: Operation = Operation::read("health");
pub const METRICS: Operation = Operation::read("metrics");
pub const DISK_LIST: Operation = Operation::read("disk.list");
pub const DISK_GET: Operation = Operation::read("disk.get");
/// A disk given its passphrase (`passphrase`, admin only) keeps it out of the audit log,
/// as any key not a disk's setting (a misspelt one).
pub const DISK_ADD: Operation =
    Operation::write("disk.add", Role::Operator).with_public_keys(crate::config::DISK_KEYS);
pub const DISK_RESIZE: Operation = Operation::write("disk.resize", Role::Operator);
pub const DISK_LIMITS: Operation = Operation::write("disk.limits", Role::Operator);
pub const HISTORY: Operation = Operation::read("history");
pub const SNAPSHOT_LIST: Operation = Operation::read("snapshot.list");
pub const SNAPSHOT_CREATE: Operation = Operation::write("snapshot.create", Role::Operator);
pub const SNAPSHOT_POLICY: Operation = Operation::write("snapshot.policy", Role::Operator);
pub const SNAPSHOT_DELETE: Operation = Operation::write("snapshot.delete", Role::Operator);
/// Throws away what the guest wrote since the snapshot, and the newer snapshots.
pub const SNAPSHOT_REVERT: Operation = Operation::write("snapshot.revert", Role::Admin);
pub const JOB_LIST: Operation = Operation::read("job.list");
pub const JOB_GET: Operation = Operation::read("job.get");
pub const JOB_CANCEL: Operation = Operation::write("job.cancel", Role::Operator);
pub const GROUP_LIST: Operation = Operation::read("throttle-group.list");
pub const GROUP_LIMITS: Operation = Operation::write("throttle-group.limits", Role::Operator);
/// Reads (and with a repair writes) any qcow2 file the daemon can reach: admin only.
pub const KEYSLOT_LIST: Operation = Operation::read("keyslot.list");
/// Key material: an admin's, as adding a disk with a key file is.
pub const KEYSLOT_ADD: Operation = Operation::write("keyslot.add", Role::Admin).with_secret_body();
pub const KEYSLOT_REMOVE: Operation =
    Operation::write("keyslot.remove", Role::Admin).with_secret_body();
pub const KEYSLOT_CHANGE: Operation =
    Operation::write("keyslot.change", Role::Admin).with_secret_body();
pub const IMAGE_CHECK: Operation = Operation::write("image.check", Role::Admin);
/// Removing a disk a frontend is using (`?force=true`) needs [`Role::Admin`] besides.
pub const DISK_REMOVE: Operation = Operation::write("disk.remove", Role::Operator);

/// One route of the API.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    /// With `{id}` for the disk's name, as OpenAPI writes it.
    pub path: &'static str,
    pub op: Operation,
}

pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/v1/health",
        op: HEALTH,
    },
    Route {
        method: "GET",
        path: "/metrics",
        op: METRICS,
    },
    Route {
        method: "GET",
        path: "/v1/history",
        op: HISTORY,
    },
    Route {
        method: "GET",
        path: "/v1/disks",
        op: DISK_LIST,
    },
    Route {
        method: "POST",
        path: "/v1/disks",
        op: DISK_ADD,
    },
    Route {
        method: "GET",
        path: "/v1/disks/{id}",
        op: DISK_GET,
    },
    Route {
        method: "DELETE",
        path: "/v1/disks/{id}",
        op: DISK_REMOVE,
    },
    Route {
        method: "POST",
        path: "/v1/disks/{id}/resize",
        op: DISK_RESIZE,
    },
    Route {
        method: "PUT",
        path: "/v1/disks/{id}/limits",
        op: DISK_LIMITS,
    },
    Route {
        method: "GET",
        path: "/v1/disks/{id}/snapshots",
        op: SNAPSHOT_LIST,
    },
    Route {
        method: "POST",
        path: "/v1/disks/{id}/snapshots",
        op: SNAPSHOT_CREATE,
    },
    Route {
        method: "DELETE",
        path: "/v1/disks/{id}/snapshots/{name}",
        op: SNAPSHOT_DELETE,
    },
    Route {
        method: "PUT",
        path: "/v1/disks/{id}/snapshot-policy",
        op: SNAPSHOT_POLICY,
    },
    Route {
        method: "POST",
        path: "/v1/disks/{id}/snapshots/{name}/revert",
        op: SNAPSHOT_REVERT,
    },
    Route {
        method: "POST",
        path: "/v1/images/check",
        op: IMAGE_CHECK,
    },
    Route {
        method: "GET",
        path: "/v1/disks/{id}/keyslots",
        op: KEYSLOT_LIST,
    },
    Route {
        method: "POST",
        path: "/v1/disks/{id}/keyslots",
        op: KEYSLOT_ADD,
    },
    Route {
        method: "DELETE",
        path: "/v1/disks/{id}/keyslots/{slot}",
        op: KEYSLOT_REMOVE,
    },
    Route {
        method: "POST",
        path: "/v1/disks/{id}/passphrase",
        op: KEYSLOT_CHANGE,
    },
    Route {
        method: "GET",
        path: "/v1/throttle-groups",
        op: GROUP_LIST,
    },
    Route {
        method: "GET",
        path: "/v1/jobs",
        op: JOB_LIST,
    },
    Route {
        method: "GET",
        path: "/v1/jobs/{id}",
        op: JOB_GET,
    },
    Route {
        method: "DELETE",
        path: "/v1/jobs/{id}",
        op: JOB_CANCEL,
    },
    Route {
        method: "PUT",
        path: "/v1/throttle-groups/{name}",
        op: GROUP_LIMITS,
    },
];

/// Binds the API socket and serves it.
pub fn start(
    path: &Path,
    config: &Config,
    disks: Arc<DiskSet>,
    history: Arc<History>,
) -> anyhow::Result<SocketFile> {
    let audit = match &config.audit {
        Some(a) => Some(AuditLog::open(a.clone())?),
        None => {
            log::warn!(
                "no audit log configured (audit-log, --audit-log): API calls are not recorded"
            );
            None
        }
    };
    let gate = Gate::new(config.access.clone(), audit, true);
    // The unix socket first: "listening" lines mean every API socket answers.
    let (listener, file) = socket::bind(path, config.socket_group)?;
    http::serve(
        listener,
        router(&gate, disks.clone(), history.clone()),
        Limits::default(),
    )?;
    if let Some(tls) = &config.api_tls {
        let server =
            http::tls_config(&tls.cert, &tls.key).map_err(|e| anyhow::anyhow!("api-tls: {e}"))?;
        let listener = std::net::TcpListener::bind(tls.listen)
            .map_err(|e| anyhow::anyhow!("api-tls: cannot listen on {}: {e}", tls.listen))?;
        let addr = listener.local_addr()?;
        http::serve_tls(
            listener,
            server,
            router(&gate, disks, history),
            Limits::default(),
        )?;
        eprintln!("vhost-blk: API (TLS) listening on {addr}");
    }
    Ok(file)
}

/// The router, made from [`ROUTES`] alone: a route is served only as it is listed (with
/// its operation and role), which the OpenAPI and role tests check. The one exception is
/// the dashboard's page ([`crate::dashboard`]): code without data, which gets its data
/// from the routes listed, as its caller.
fn router(gate: &Arc<Gate>, disks: Arc<DiskSet>, history: Arc<History>) -> Router {
    let mut r = Router::new();
    for route in ROUTES {
        r = r.route(route.path, http::guarded(gate, route.op, handler(route)));
    }
    let r = r
        .route(crate::dashboard::PATH, get(crate::dashboard::page))
        .route(crate::dashboard::ASSETS_PATH, get(crate::dashboard::asset))
        .layer(Extension(history));
    http::finish(r.with_state(disks))
}

/// The handler of a listed route.
fn handler(route: &Route) -> MethodRouter<Arc<DiskSet>> {
    match (route.method, route.op.name) {
        ("GET", "health") => get(health),
        ("GET", "metrics") => get(metrics),
        ("GET", "disk.list") => get(list),
        ("GET", "history") => get(history),
        ("GET", "snapshot.list") => get(snapshots),
        ("POST", "snapshot.create") => post(take_snapshot),
        ("DELETE", "snapshot.delete") => delete(delete_snapshot),
        ("PUT", "snapshot.policy") => put(snapshot_policy),
        ("POST", "image.check") => post(image_check),
        ("GET", "keyslot.list") => get(keyslots),
        ("POST", "keyslot.add") => post(add_keyslot),
        ("DELETE", "keyslot.remove") => delete(remove_keyslot),
        ("POST", "keyslot.change") => post(change_passphrase),
        ("POST", "snapshot.revert") => post(revert_snapshot),
        ("POST", "disk.add") => post(add),
        ("GET", "disk.get") => get(show),
        ("DELETE", "disk.remove") => delete(remove),
        ("POST", "disk.resize") => post(resize),
        ("PUT", "disk.limits") => put(disk_limits),
        ("GET", "throttle-group.list") => get(groups),
        ("PUT", "throttle-group.limits") => put(group_limits),
        ("GET", "job.list") => get(jobs),
        ("GET", "job.get") => get(job),
        ("DELETE", "job.cancel") => delete(cancel_job),
        (m, op) => unreachable!("no handler for {m} {op}"),
    }
}

type Disks = State<Arc<DiskSet>>;

/// The disk `id`, or 404.
fn served(disks: &DiskSet, id: &str) -> Result<Arc<DiskServer>, ApiError> {
    disks
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no disk {id:?}")))
}

async fn health(State(disks): Disks) -> Json<serde_json::Value> {
    let all = disks.list();
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": disks.started.elapsed().as_secs(),
        "disks": all.len(),
        "frontends_connected": all.iter().filter(|d| d.connected()).count(),
        "config_persistent": disks.persistent(),
    }))
}

async fn metrics(State(disks): Disks) -> Result<Response, ApiError> {
    // statvfs of each disk's files: off the API's thread (a hung mount).
    let text = http::blocking(move || render_metrics(&disks.list())).await?;
    Ok(http::prometheus(text))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    disk: Option<String>,
    /// Only each list's last points.
    last: Option<usize>,
}

async fn history(
    State(disks): Disks,
    Extension(history): Extension<Arc<History>>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut points = history.points(q.disk.as_deref(), q.last);
    if let (Some(id), true) = (&q.disk, points.is_empty()) {
        // A disk served since before its first sample has a history, empty so far.
        if disks.get(id).is_none() {
            return Err(ApiError::not_found(format!("no history of disk {id:?}")));
        }
        points.push(crate::history::DiskPoints {
            id: id.clone(),
            served: true,
            recent: Vec::new(),
            trend: Vec::new(),
        });
    }
    let p = &history.policy;
    Ok(Json(serde_json::json!({
        "sample_seconds": p.sample.as_secs(),
        "trend_seconds": p.trend.as_secs(),
        "recent_points": crate::history::RECENT_POINTS,
        "retention_days": p.retention_days,
        "persistent": p.file.is_some(),
        "now": crate::history::unix_now() as u64,
        "disks": points,
    })))
}

async fn list(State(disks): Disks) -> Json<serde_json::Value> {
    let items: Vec<_> = disks.list().iter().map(|d| summary(d)).collect();
    Json(serde_json::json!({ "disks": items }))
}

async fn show(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let d = served(&disks, &id)?;
    Ok(Json(disk_json(&d, disks.persistent())))
}

async fn add(
    State(disks): Disks,
    Extension(caller): Extension<Caller>,
    JsonBody(mut body): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    let admin = caller.role >= Role::Admin;
    // A passphrase for the disk's encrypted nodes (those naming no key file): an admin's
    // to give, copied into locked memory, written nowhere.
    let given = match body.as_object_mut().and_then(|m| m.remove("passphrase")) {
        None => None,
        Some(mut v) => {
            let p = match &v {
                serde_json::Value::String(_) if !admin => Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "giving a disk its passphrase needs the admin role",
                )),
                serde_json::Value::String(s) => {
                    storage_core::crypto::key_file::Passphrase::from_bytes(s.as_bytes())
                        .map(Arc::new)
                        .map_err(|e| match e.kind() {
                            std::io::ErrorKind::InvalidInput => {
                                ApiError::bad_request(format!("passphrase: {e}"))
                            }
                            // Locked memory refused (RLIMIT_MEMLOCK): ours, not the caller's.
                            _ => ApiError::internal(format!("holding the passphrase: {e}")),
                        })
                }
                _ => Err(ApiError::bad_request("passphrase: a string")),
            };
            if let serde_json::Value::String(s) = &mut v {
                use zeroize::Zeroize;
                s.zeroize();
            }
            Some(p?)
        }
    };
    // Parsed as any other body is (a 422 naming the field), the passphrase taken out.
    let bytes = serde_json::to_vec(&body).map_err(|e| ApiError::internal(e.to_string()))?;
    let axum::Json(text) = axum::Json::<DiskText>::from_bytes(&bytes)
        .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let config = text
        .check_given(given)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut config = config;
    // Checked as an operator's again whenever the daemon starts.
    config.text.added_by_operator = !admin;
    let kept = disks.persistent();
    let server = http::blocking(move || {
        // Opens an operator's files (off the API's thread: a hung mount must not stop it).
        let admitted = crate::admission::check(
            &config.spec,
            &config.text.socket,
            disks.operator_paths(),
            admin,
        )
        .map_err(|m| ApiError::new(StatusCode::FORBIDDEN, m))?;
        let open_as = (!admitted.held.is_empty()).then_some(&admitted.spec);
        disks.add(config.clone(), open_as, true).map_err(|e| {
            let mut answer = set_error(e);
            answer.message = admitted.with_caller_names(&answer.message);
            answer
        })
    })
    .await??;
    Ok((StatusCode::CREATED, Json(disk_json(&server, kept))).into_response())
}

#[derive(serde::Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

async fn remove(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<RemoveQuery>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let d = served(&disks, &id)?;
    drop(d);
    let removed = id.clone();
    let admin = caller.role >= Role::Admin;
    http::blocking(move || disks.remove(&id, q.force, admin))
        .await?
        .map_err(set_error)?;
    Ok(Json(serde_json::json!({ "removed": removed })))
}

/// A size: bytes, or a string with a unit (`20G`).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SizeText {
    Bytes(u64),
    Text(String),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeBody {
    size: SizeText,
    /// `off` (the default), `falloc` or `full`: allocate the new space first, as a job.
    #[serde(default)]
    preallocate: PreallocText,
}

#[derive(serde::Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum PreallocText {
    #[default]
    Off,
    Falloc,
    Full,
}

async fn resize(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<ResizeBody>,
) -> Result<Response, ApiError> {
    let bytes = match body.size {
        SizeText::Bytes(b) => b,
        SizeText::Text(t) => {
            t.parse::<ByteSize>()
                .map_err(|e| ApiError::bad_request(format!("size {t:?}: {e}")))?
                .0
        }
    };
    let d = served(&disks, &id)?;
    let mode = match body.preallocate {
        PreallocText::Off => None,
        PreallocText::Falloc => Some(Preallocation::Falloc),
        PreallocText::Full => Some(Preallocation::Full),
    };
    if let Some(mode) = mode {
        let total = bytes.saturating_sub(d.device.capacity());
        let server = d.clone();
        let job = disks
            .start_disk_job(&id, "resize", total, move |p| {
                let mut progress = |done, _total| p.update(done);
                match server.resize(bytes, Some((mode, &mut progress))) {
                    Ok(_) => Outcome::Done,
                    Err(ResizeError::Disk(e)) if e.kind() == StorageErrorKind::Cancelled => {
                        Outcome::Cancelled
                    }
                    Err(e) => Outcome::Failed(e.to_string()),
                }
            })
            .map_err(set_error)?;
        return Ok((StatusCode::ACCEPTED, Json(job.json())).into_response());
    }
    let server = d.clone();
    let notice = http::blocking(move || server.resize(bytes, None))
        .await?
        .map_err(|e| resize_error(&id, &e))?;
    let mut v = disk_json(&d, disks.persistent());
    v["frontend_notified"] = match notice {
        Some(ConfigNotice::Delivered) => "yes",
        Some(ConfigNotice::NoChannel) => "no frontend channel",
        Some(ConfigNotice::Unanswered) => "sent, not acknowledged yet",
        None => "unchanged (the disk already had that size)",
    }
    .into();
    Ok(Json(v).into_response())
}

/// Resizes and snapshots asked of a disk that cannot have them: 400 for a resize (the
/// request's fault), 409 for a snapshot (the disk's format's).
fn resize_error(id: &str, e: &ResizeError) -> ApiError {
    disk_change_error(id, e, StatusCode::BAD_REQUEST)
}

fn disk_change_error(id: &str, e: &ResizeError, unsupported: StatusCode) -> ApiError {
    match e {
        ResizeError::Disk(se) => match se.kind() {
            StorageErrorKind::InvalidArgument => ApiError::bad_request(format!("disk {id:?}: {e}")),
            StorageErrorKind::NotFound => ApiError::not_found(format!("disk {id:?}: {e}")),
            StorageErrorKind::InUse => ApiError::conflict(format!("disk {id:?}: {e}")),
            StorageErrorKind::Unsupported => {
                ApiError::new(unsupported, format!("disk {id:?}: {e}"))
            }
            _ => ApiError::internal(format!("disk {id:?}: {e}")),
        },
        ResizeError::Notice(_) => ApiError::internal(format!("disk {id:?}: {e}")),
        ResizeError::Busy | ResizeError::Connected => {
            ApiError::conflict(format!("disk {id:?}: {e}"))
        }
    }
}

async fn snapshots(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let d = served(&disks, &id)?;
    let list = http::blocking(move || d.snapshots())
        .await?
        .ok_or_else(|| ApiError::conflict(format!("disk {id:?} is not a qcow2 disk")))?;
    Ok(Json(serde_json::json!({ "snapshots": list })))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    name: String,
}

/// Starts a job that deletes a snapshot (its data copied up into the image above it).
async fn delete_snapshot(
    State(disks): Disks,
    UrlPath((id, name)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let d = served(&disks, &id)?;
    // An unknown snapshot or a disk that is not qcow2 is refused at once; the other
    // refusals (a resize or snapshot under way, a read-only disk) end the job as failed.
    let listed = d.clone();
    let known = http::blocking(move || listed.snapshots())
        .await?
        .ok_or_else(|| ApiError::conflict(format!("disk {id:?} is not a qcow2 disk")))?;
    if !known.iter().any(|s| s["name"] == name.as_str()) {
        return Err(ApiError::not_found(format!(
            "disk {id:?} has no snapshot named {name:?}"
        )));
    }
    let server = d.clone();
    let snapshot = name.clone();
    let total = d.device.capacity();
    let job = disks
        .start_disk_job(&id, "snapshot-delete", total, move |p| {
            let mut progress = |done: u64, all: u64| {
                // In clusters: shown as bytes of the disk gone through.
                p.update(if all == 0 {
                    total
                } else {
                    (u128::from(total) * u128::from(done) / u128::from(all)) as u64
                })
            };
            match server.delete_snapshot(&snapshot, &mut progress) {
                Ok(_) => {
                    p.update(total);
                    Outcome::Done
                }
                Err(ResizeError::Disk(e)) if e.kind() == StorageErrorKind::Cancelled => {
                    Outcome::Cancelled
                }
                Err(e) => Outcome::Failed(e.to_string()),
            }
        })
        .map_err(set_error)?;
    Ok((StatusCode::ACCEPTED, Json(job.json())).into_response())
}

async fn revert_snapshot(
    State(disks): Disks,
    UrlPath((id, name)): UrlPath<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let d = served(&disks, &id)?;
    let snapshot = name.clone();
    let removed = http::blocking(move || d.revert_snapshot(&snapshot))
        .await?
        .map_err(|e| disk_change_error(&id, &e, StatusCode::CONFLICT))?;
    Ok(Json(serde_json::json!({
        "disk": id,
        "snapshot": name,
        "removed": removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    })))
}

async fn take_snapshot(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<SnapshotBody>,
) -> Result<Response, ApiError> {
    let d = served(&disks, &id)?;
    if crate::lifecycle::taken_at(&body.name).is_some() {
        return Err(ApiError::bad_request(format!(
            "snapshot name {:?}: names auto-YYYYMMDDTHHMMSSZ are the snapshot policy's",
            body.name
        )));
    }
    let name = body.name.clone();
    let taken = http::blocking(move || d.snapshot(&name))
        .await?
        .map_err(|e| disk_change_error(&id, &e, StatusCode::CONFLICT))?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "disk": id,
            "name": body.name,
            "file": taken.file.display().to_string(),
            "pause_ms": taken.pause.as_secs_f64() * 1000.0,
        })),
    )
        .into_response())
}

/// Passphrases in a keyslot request: the one that authorises it, and the new one. Never
/// logged, echoed or kept (the audit log redacts them by name).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyslotBody {
    /// JSON values, checked here: a type error from the parser would quote the value.
    passphrase: serde_json::Value,
    new_passphrase: Option<serde_json::Value>,
    /// How long the new keyslot's PBKDF2 takes here (cryptsetup's `--iter-time`); a
    /// value too, so that a passphrase put here by mistake is not quoted either.
    iter_time_ms: Option<serde_json::Value>,
}

impl Drop for KeyslotBody {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        for v in [Some(&mut self.passphrase), self.new_passphrase.as_mut()]
            .into_iter()
            .flatten()
        {
            if let serde_json::Value::String(s) = v {
                s.zeroize();
            }
        }
    }
}

/// The default `iter_time_ms`, as cryptsetup's for PBKDF2.
const ITER_TIME_MS: u64 = 2000;

impl KeyslotBody {
    fn passphrase(&self) -> Result<&[u8], ApiError> {
        match self.passphrase.as_str() {
            Some(p) => Ok(p.as_bytes()),
            None => Err(ApiError::bad_request("passphrase: a string")),
        }
    }

    fn new_passphrase(&self) -> Result<&[u8], ApiError> {
        match self.new_passphrase.as_ref().and_then(|v| v.as_str()) {
            Some(p) if !p.is_empty() => Ok(p.as_bytes()),
            _ => Err(ApiError::bad_request(
                "new_passphrase: a non-empty passphrase (a string)",
            )),
        }
    }

    /// The new keyslot's key derivation time (its cost is measured off the API's thread).
    fn iterations_ms(&self) -> Result<u64, ApiError> {
        let t = match &self.iter_time_ms {
            None => ITER_TIME_MS,
            Some(v) => v.as_u64().unwrap_or(0),
        };
        match t {
            1..=60_000 => Ok(t),
            _ => Err(ApiError::bad_request("iter_time_ms: 1 to 60000")),
        }
    }
}

/// The served disk `id` and that it is encrypted, or 404 / 409.
fn luks_disk(disks: &DiskSet, id: &str) -> Result<Arc<DiskServer>, ApiError> {
    let d = served(disks, id)?;
    if d.device.disk.keyslot_changes().is_none() {
        return Err(ApiError::conflict(format!("disk {id:?} is not encrypted")));
    }
    Ok(d)
}

fn keyslot_error(id: &str, e: storage_core::error::StorageError) -> ApiError {
    match e.kind() {
        StorageErrorKind::InvalidArgument => ApiError::bad_request(format!("disk {id:?}: {e}")),
        StorageErrorKind::NotFound => ApiError::not_found(format!("disk {id:?}: {e}")),
        // Unsupported: the disk cannot take the change; InUse: a snapshot whose header the
        // change writes has a reader, or a snapshot is being deleted.
        StorageErrorKind::Unsupported | StorageErrorKind::InUse => {
            ApiError::conflict(format!("disk {id:?}: {e}"))
        }
        _ => ApiError::internal(format!("disk {id:?}: {e}")),
    }
}

async fn keyslots(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let d = luks_disk(&disks, &id)?;
    let (version, slots) = http::blocking(move || {
        d.device
            .disk
            .keyslot_changes()
            .expect("checked above")
            .keyslots()
    })
    .await?
    .map_err(|e| keyslot_error(&id, e))?;
    let slots: Vec<_> = slots
        .iter()
        .map(|s| serde_json::json!({ "id": s.id, "kdf": s.kdf }))
        .collect();
    Ok(Json(
        serde_json::json!({ "disk": id, "luks_version": version, "keyslots": slots }),
    ))
}

/// A keyslot for the body's new passphrase, authorised by its passphrase: added beside
/// the others, or (`rotate`) replacing the one that passphrase opens. Its id.
async fn new_keyslot(
    disks: &DiskSet,
    id: &str,
    body: KeyslotBody,
    rotate: bool,
) -> Result<u32, ApiError> {
    let d = luks_disk(disks, id)?;
    body.passphrase()?;
    body.new_passphrase()?;
    let ms = body.iterations_ms()?;
    http::blocking(move || {
        let luks = d.device.disk.keyslot_changes().expect("checked above");
        // PBKDF2 for LUKS1 keyslots, Argon2id for LUKS2 ones, as cryptsetup's.
        let cost = storage_core::crypto::KeyslotCost::for_time(ms);
        let (old, new) = (
            body.passphrase().expect("checked above"),
            body.new_passphrase().expect("checked above"),
        );
        if rotate {
            luks.change_passphrase(old, new, &cost)
        } else {
            luks.add_keyslot(old, new, &cost)
        }
    })
    .await?
    .map_err(|e| keyslot_error(id, e))
}

async fn add_keyslot(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<KeyslotBody>,
) -> Result<Response, ApiError> {
    let slot = new_keyslot(&disks, &id, body, false).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "disk": id, "keyslot": slot })),
    )
        .into_response())
}

async fn remove_keyslot(
    State(disks): Disks,
    UrlPath((id, slot)): UrlPath<(String, u32)>,
    JsonBody(body): JsonBody<KeyslotBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let d = luks_disk(&disks, &id)?;
    if body.new_passphrase.is_some() || body.iter_time_ms.is_some() {
        return Err(ApiError::bad_request(
            "removing a keyslot takes only the passphrase of another one",
        ));
    }
    body.passphrase()?;
    http::blocking(move || {
        let luks = d.device.disk.keyslot_changes().expect("checked above");
        luks.remove_keyslot(body.passphrase().expect("checked above"), slot)
    })
    .await?
    .map_err(|e| keyslot_error(&id, e))?;
    Ok(Json(serde_json::json!({ "disk": id, "removed": slot })))
}

async fn change_passphrase(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<KeyslotBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let slot = new_keyslot(&disks, &id, body, true).await?;
    Ok(Json(serde_json::json!({ "disk": id, "keyslot": slot })))
}

async fn jobs(State(disks): Disks) -> Json<serde_json::Value> {
    let all: Vec<_> = disks.jobs.list().iter().map(|j| j.json()).collect();
    Json(serde_json::json!({ "jobs": all }))
}

async fn job(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let j = disks
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("no job {id:?}")))?;
    Ok(Json(j.json()))
}

async fn cancel_job(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let j = disks.jobs.cancel(&id).map_err(|e| match e {
        JobError::NotFound(_) => ApiError::not_found(e.to_string()),
        _ => ApiError::conflict(e.to_string()),
    })?;
    Ok(Json(j.json()))
}

async fn disk_limits(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
    JsonBody(text): JsonBody<LimitsText>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let set = disks.clone();
    let id2 = id.clone();
    http::blocking(move || set.set_disk_limits(&id2, text))
        .await?
        .map_err(set_error)?;
    let d = served(&disks, &id)?;
    Ok(Json(disk_json(&d, disks.persistent())))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageCheckBody {
    path: PathBuf,
    /// "leaks" or "all"; none: check only.
    #[serde(default)]
    repair: Option<String>,
}

/// Starts a job that checks a qcow2 image file or a tier's cache device as `qemu-img
/// check` does (its report in the job's `result`). Refused for a file a disk serves: its
/// metadata in memory is newer than the file's, and a repair would write under the daemon.
async fn image_check(
    State(disks): Disks,
    JsonBody(body): JsonBody<ImageCheckBody>,
) -> Result<Response, ApiError> {
    let repair = match body.repair.as_deref() {
        None => storage_core::check::Repair::None,
        Some(r) => r.parse().map_err(ApiError::bad_request)?,
    };
    let path = body.path.clone();
    let set = disks.clone();
    let in_use = http::blocking(move || {
        let wanted = std::fs::canonicalize(&path)
            .map_err(|e| ApiError::bad_request(format!("{}: {e}", path.display())))?;
        let identity = std::fs::metadata(&wanted).map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        for d in set.list() {
            if identity
                .as_ref()
                .is_ok_and(|i| d.device.disk.cache_files().contains(i))
            {
                return Err(ApiError::conflict(format!(
                    "{} is the cache device of disk {:?}: check it when no daemon serves it",
                    path.display(),
                    d.id()
                )));
            }
            let mut files = vec![d.device.info().path.clone()];
            if let Some(q) = d.device.disk.qcow2() {
                files.extend(q.chain().into_iter().map(|c| c.path));
            }
            if files
                .iter()
                .any(|f| std::fs::canonicalize(f).is_ok_and(|f| f == wanted))
            {
                return Err(ApiError::conflict(format!(
                    "{} is in use by disk {:?}: check it when no daemon serves it",
                    path.display(),
                    d.id()
                )));
            }
        }
        Ok(wanted)
    })
    .await?;
    let file = in_use?;
    let object = file.display().to_string();
    let job = disks
        .jobs
        .start(
            "image-check",
            &object,
            1,
            move |p| match storage_core::check::check_file(&file, repair) {
                Ok(report) => {
                    p.set_result(report.json(&file));
                    p.update(1);
                    Outcome::Done
                }
                Err(e) => Outcome::Failed(e.to_string()),
            },
        )
        .map_err(|e| ApiError::conflict(e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(job.json())).into_response())
}

/// Sets a disk's snapshot policy (`null` removes it).
async fn snapshot_policy(
    State(disks): Disks,
    UrlPath(id): UrlPath<String>,
    JsonBody(text): JsonBody<Option<crate::lifecycle::PolicyText>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let set = disks.clone();
    let id2 = id.clone();
    http::blocking(move || set.set_snapshot_policy(&id2, text))
        .await?
        .map_err(set_error)?;
    let d = served(&disks, &id)?;
    Ok(Json(disk_json(&d, disks.persistent())))
}

fn group_json(g: &storage_core::throttle::ThrottleGroup, members: &[String]) -> serde_json::Value {
    serde_json::json!({
        "name": g.name(),
        "limits": g.limits().entries().into_iter().map(|(k, v)| (k, serde_json::Value::from(v))).collect::<serde_json::Map<_, _>>(),
        "disks": members,
    })
}

async fn groups(State(disks): Disks) -> Json<serde_json::Value> {
    let all: Vec<_> = disks
        .groups()
        .iter()
        .map(|(g, m)| group_json(g, m))
        .collect();
    Json(serde_json::json!({ "groups": all }))
}

async fn group_limits(
    State(disks): Disks,
    UrlPath(name): UrlPath<String>,
    JsonBody(text): JsonBody<LimitsText>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let set = disks.clone();
    let n = name.clone();
    http::blocking(move || set.set_group_limits(&n, text))
        .await?
        .map_err(set_error)?;
    let groups = disks.groups();
    let (g, m) = groups
        .iter()
        .find(|(g, _)| g.name() == name)
        .ok_or_else(|| ApiError::not_found(format!("no throttle group {name:?}")))?;
    Ok(Json(group_json(g, m)))
}

fn set_error(e: SetError) -> ApiError {
    let status = match &e {
        SetError::Exists(_) | SetError::SocketTaken(..) | SetError::InUse(_) => {
            StatusCode::CONFLICT
        }
        SetError::NotFound(_) => StatusCode::NOT_FOUND,
        // The user's input (a spec, a missing file, a socket in use) or the host's (EIO)?
        SetError::Open(e) => {
            let storage = e
                .chain()
                .find_map(|c| c.downcast_ref::<storage_core::error::StorageError>());
            let socket = e
                .chain()
                .find_map(|c| c.downcast_ref::<daemon_support::socket::SocketError>());
            match (storage.map(|s| s.kind()), socket) {
                (_, Some(daemon_support::socket::SocketError::InUse(_))) => StatusCode::CONFLICT,
                // Another program (or disk) holds the image: a conflict with that, not a
                // malformed request.
                (Some(StorageErrorKind::InUse), _) => StatusCode::CONFLICT,
                (Some(StorageErrorKind::Io | StorageErrorKind::Engine), _) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                _ => StatusCode::BAD_REQUEST,
            }
        }
        SetError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        SetError::Persist { .. } | SetError::Stop { .. } | SetError::AddThrottle(..) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        SetError::BadLimits(_) | SetError::BadPolicy(..) => StatusCode::BAD_REQUEST,
        SetError::Forbidden(_) => StatusCode::FORBIDDEN,
        SetError::JobRunning(..) | SetError::Job(_) => StatusCode::CONFLICT,
        SetError::GroupLimits(..) => StatusCode::CONFLICT,
        SetError::NoGroup(_) => StatusCode::NOT_FOUND,
    };
    ApiError::new(status, e.to_string())
}

/// The Prometheus exposition of every disk: per queue counters and latency, plus each
/// disk's size and its frontend's state.
pub fn render_metrics(disks: &[Arc<DiskServer>]) -> String {
    let mut out = Exposition::new("strata_blk");
    for d in disks {
        let device = &d.device;
        for (i, q) in device.all_queue_metrics().iter().enumerate() {
            q.render(&mut out, &[("disk", &device.id), ("queue", &i.to_string())]);
        }
    }
    for d in disks {
        if let Some(tier) = d.device.disk.tier_metrics() {
            tier.render(&mut out, &[("disk", d.id())]);
        }
    }
    type Series = (&'static str, Kind, &'static str, fn(&BlkDevice) -> u64);
    let gauges: [Series; 3] = [
        ("capacity_bytes", Kind::Gauge, "Disk size.", |d| {
            d.capacity()
        }),
        (
            "frontend_connected",
            Kind::Gauge,
            "Whether a frontend is connected.",
            |d| u64::from(d.connected.load(Ordering::Relaxed)),
        ),
        (
            "frontend_connections_total",
            Kind::Counter,
            "Frontend connections accepted.",
            |d| d.connections.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in gauges {
        for d in disks {
            out.sample(name, kind, help, &[("disk", d.id())], value(&d.device));
        }
    }
    out.sample("disks", Kind::Gauge, "Disks served.", &[], disks.len());
    let usage: Vec<(&str, crate::space::Usage)> = disks
        .iter()
        .flat_map(|d| {
            crate::space::files(&d.config.spec)
                .into_iter()
                .filter_map(|p| crate::space::usage(&p))
                .map(move |u| (d.id(), u))
        })
        .collect();
    for (name, help, value) in [
        (
            "host_fs_free_bytes",
            "Free space on the host file system holding one of the disk's files.",
            (|u: &crate::space::Usage| u.free) as fn(&crate::space::Usage) -> u64,
        ),
        (
            "host_fs_size_bytes",
            "Size of the host file system holding one of the disk's files.",
            |u: &crate::space::Usage| u.size,
        ),
    ] {
        for (id, u) in &usage {
            let path = u.path.display().to_string();
            out.sample(
                name,
                Kind::Gauge,
                help,
                &[("disk", id), ("path", &path)],
                value(u),
            );
        }
    }
    for d in disks {
        if let Some(used) = crate::space::allocated(&d.config.spec) {
            out.sample(
                "used_bytes",
                Kind::Gauge,
                "Bytes the disk's files take on the host (allocated blocks).",
                &[("disk", d.id())],
                used,
            );
        }
    }
    for d in disks {
        // Counted from the chain in memory: no file is looked at.
        let Some(named) = d.snapshot_count() else {
            continue;
        };
        let s = &d.snapshots;
        let l = [("disk", d.id())];
        out.sample(
            "snapshots",
            Kind::Gauge,
            "Snapshots in the disk's qcow2 chain.",
            &l,
            named,
        );
        for (op, result, n) in [
            ("create", "ok", &s.taken),
            ("create", "failed", &s.failed),
            ("delete", "ok", &s.deleted),
            ("delete", "failed", &s.delete_failed),
            ("revert", "ok", &s.reverted),
        ] {
            out.sample(
                "snapshot_operations_total",
                Kind::Counter,
                "Snapshot operations since the daemon started, by operation and result.",
                &[("disk", d.id()), ("op", op), ("result", result)],
                n.load(Ordering::Relaxed),
            );
        }
        out.sample(
            "snapshot_last_timestamp_seconds",
            Kind::Gauge,
            "When the last snapshot was taken (Unix seconds; 0: none since start).",
            &l,
            s.last_unix.load(Ordering::Relaxed),
        );
        let last = s.last_unix.load(Ordering::Relaxed);
        if last > 0 {
            out.sample(
                "snapshot_last_age_seconds",
                Kind::Gauge,
                "How long ago the last snapshot was taken (absent: none since start).",
                &l,
                (crate::history::unix_now() as u64).saturating_sub(last),
            );
        }
        out.sample(
            "snapshot_last_pause_microseconds",
            Kind::Gauge,
            "How long the guest's requests waited during the last snapshot.",
            &l,
            s.last_pause_us.load(Ordering::Relaxed),
        );
        for (op, name) in crate::disk_server::SnapshotOp::ALL {
            let ls = [("disk", d.id()), ("op", name)];
            out.sample(
                "snapshot_operation_seconds_total",
                Kind::Counter,
                "Time spent in snapshot operations (a delete's copying included), by operation.",
                &ls,
                s.total_us[op as usize].load(Ordering::Relaxed) as f64 / 1e6,
            );
            out.sample(
                "snapshot_last_operation_seconds",
                Kind::Gauge,
                "How long the last snapshot operation of each kind took.",
                &ls,
                s.last_us[op as usize].load(Ordering::Relaxed) as f64 / 1e6,
            );
        }
    }
    for d in disks {
        out.sample(
            "host_fs_low_space",
            Kind::Gauge,
            "Whether free space under the disk's files is below the alert threshold.",
            &[("disk", d.id())],
            u8::from(d.low_space.load(Ordering::Relaxed)),
        );
    }
    out.finish()
}

/// What `GET /v1/disks` reports of each disk.
fn summary(d: &DiskServer) -> serde_json::Value {
    let info = d.device.info();
    serde_json::json!({
        "id": d.id(),
        "socket": d.config.text.socket,
        // As configured: an operator's disk is opened through /proc/self/fd paths.
        "path": d.config.spec.root.data_path(),
        "format": info.format,
        "size": info.capacity.get(),
        "read_only": info.read_only,
        "frontend_connected": d.connected(),
        "snapshots": d.snapshot_summary(),
    })
}

/// What `GET /v1/disks/{id}` reports.
/// A disk as the API shows it; `kept`: whether the daemon keeps its disks in a config
/// file.
pub fn disk_json(d: &DiskServer, kept: bool) -> serde_json::Value {
    let device = &d.device;
    let info = device.info();
    let acked = device.acked_features.load(Ordering::Relaxed);
    serde_json::json!({
        "id": d.id(),
        "socket": d.config.text.socket,
        // Whether it comes back at the next start (not one given its passphrase).
        "persistent": kept && d.config.in_file,
        "config": d.text(),
        // As configured: an operator's disk is opened through /proc/self/fd paths.
        "path": d.config.spec.root.data_path(),
        "format": info.format,
        "size": info.capacity.get(),
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
        "graph": device.describe(),
        "throttle": device.throttle_group().map(|g| serde_json::json!({
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
