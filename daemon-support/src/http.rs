//! The management API's server: HTTP/1.1 on a unix socket (as Cloud Hypervisor's API), on
//! hyper and axum. This module owns what every route shares:
//! - limits: request head size and time, body size, time per connection, connections at
//!   once (more are answered 503);
//! - who is calling: the peer's credentials from the kernel, and the role the access table
//!   gives them ([`crate::access`]);
//! - one [`Operation`] per route, with the role it needs: a caller without it gets 403, and
//!   the denial is audited;
//! - the audit log: a mutating call's line is written and fsynced before its answer goes
//!   out ([`crate::audit`]);
//! - errors as JSON (`{"error": "..."}`), 404 and 405 included.
//!
//! Each daemon supplies its routes (an axum `Router`) and the blocking work behind them.
//! The server runs on one thread of its own with a single-threaded tokio runtime; work that
//! blocks (opening a disk, draining queues) goes to tokio's blocking pool. A control plane,
//! not a data path.

use std::os::unix::net::UnixListener as StdUnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::access::{AccessTable, Principal, Role};
use crate::audit::{self, AuditLog, Entry};

/// What one client may take of the API.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of request line and headers (hyper's buffer; at least 8 KiB).
    pub head_bytes: usize,
    /// Time to send them.
    pub head_time: Duration,
    /// Bytes of a request body.
    pub body_bytes: usize,
    /// Time one connection may stay open, all its requests together.
    pub connection_time: Duration,
    /// Connections served at once.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            head_bytes: 16 << 10,
            head_time: Duration::from_secs(5),
            body_bytes: 64 << 10,
            connection_time: Duration::from_secs(60),
            connections: 16,
        }
    }
}

/// An API operation: how the audit log names it, the role it needs, and whether it
/// changes anything (then it is audited when allowed, not only when denied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Operation {
    pub name: &'static str,
    pub role: Role,
    pub mutating: bool,
    /// Its body carries secrets: the audit log records the body's keys, no value at all
    /// (a misspelt key would escape redaction by name).
    pub secret_body: bool,
    /// Its body may carry a secret beside what is not: the audit log records the values
    /// of these top-level keys only, any other key's redacted.
    pub public_keys: Option<&'static [&'static str]>,
}

impl Operation {
    pub const fn read(name: &'static str) -> Self {
        Operation {
            name,
            role: Role::Viewer,
            mutating: false,
            secret_body: false,
            public_keys: None,
        }
    }

    pub const fn write(name: &'static str, role: Role) -> Self {
        Operation {
            name,
            role,
            mutating: true,
            secret_body: false,
            public_keys: None,
        }
    }

    /// The same operation, its body's values kept out of the audit log.
    pub const fn with_secret_body(self) -> Self {
        Operation {
            secret_body: true,
            ..self
        }
    }

    /// The same operation, the audit log recording the values of `keys` only.
    pub const fn with_public_keys(self, keys: &'static [&'static str]) -> Self {
        Operation {
            public_keys: Some(keys),
            ..self
        }
    }
}

/// An error answer: `{"error": message}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_error(self.status, &self.message)
    }
}

/// An error answer with a JSON body `{"error": message}`.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// A JSON request body whose rejection (bad JSON, wrong type, too large) is an
/// [`ApiError`] naming the problem.
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(e) => Err(ApiError::new(e.status(), e.body_text())),
        }
    }
}

/// Runs blocking work (opening a disk, draining queues) off the server's thread.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("the operation failed: {e}")))
}

/// Who may call, and where calls are recorded.
pub struct Gate {
    access: AccessTable,
    audit: Option<Mutex<AuditLog>>,
    /// Whether callers' user names are looked up ([`Principal::name`]).
    lookup_names: bool,
    /// Refusals of callers over TCP without a token, by address.
    unauthenticated: Refusals,
}

/// How often a refusal without a token is written down, per address.
const REFUSAL_LINE_EVERY: Duration = Duration::from_secs(10);

/// Refusals without a token: when each address was last written down, and how many since.
#[derive(Default)]
struct Refusals(Mutex<std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u64)>>);

impl Refusals {
    /// `Some(n)` when this refusal is to be written down (`n` more since the last line).
    fn note(&self, ip: std::net::IpAddr) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Forget quiet addresses, so the table stays small.
        if m.len() > 4096 {
            m.retain(|_, (t, _)| now.duration_since(*t) < REFUSAL_LINE_EVERY);
        }
        match m.get_mut(&ip) {
            Some((t, n)) if now.duration_since(*t) < REFUSAL_LINE_EVERY => {
                *n += 1;
                None
            }
            Some((t, n)) => {
                let since = *n;
                *t = now;
                *n = 0;
                Some(since)
            }
            None => {
                m.insert(ip, (now, 0));
                Some(0)
            }
        }
    }
}

impl Gate {
    pub fn new(access: AccessTable, audit: Option<AuditLog>, lookup_names: bool) -> Arc<Gate> {
        Arc::new(Gate {
            access,
            audit: audit.map(Mutex::new),
            lookup_names,
            unauthenticated: Refusals::default(),
        })
    }

    /// Writes `entry` (naming a local `caller` in full) on the blocking pool.
    fn record(
        self: &Arc<Gate>,
        caller: Option<&Principal>,
        mut entry: Entry,
    ) -> impl std::future::Future<Output = Result<(), String>> {
        let gate = self.clone();
        let caller = caller.cloned();
        async move {
            if gate.audit.is_none() {
                return Ok(());
            }
            tokio::task::spawn_blocking(move || {
                let Some(log) = &gate.audit else {
                    return Ok(());
                };
                if let Some(c) = &caller {
                    entry.principal = c.name(gate.lookup_names);
                }
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                log.append(&entry).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        }
    }
}

/// The caller of a route that let it in, for handlers that want it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `uid=1000` or `token:NAME@ADDR`.
    pub who: String,
    pub role: Role,
}

/// The address of a caller over TCP (its identity is its bearer token).
#[derive(Debug, Clone, Copy)]
pub struct Remote(pub std::net::SocketAddr);

/// The token of `Authorization: Bearer TOKEN`.
fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Puts `op`'s check (and audit) in front of `route`.
pub fn guarded<S: Clone + Send + Sync + 'static>(
    gate: &Arc<Gate>,
    op: Operation,
    route: axum::routing::MethodRouter<S>,
) -> axum::routing::MethodRouter<S> {
    route.layer(axum::middleware::from_fn_with_state(
        (gate.clone(), op),
        check,
    ))
}

/// The query string as a JSON object, for the audit log (and its redaction).
fn query_json(query: Option<&str>) -> serde_json::Value {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).unwrap_or_default();
    serde_json::Value::Object(pairs.into_iter().map(|(k, v)| (k, v.into())).collect())
}

/// Why a browser's request on the unix socket is refused, if it is. There the kernel
/// names the caller, so whatever reaches the socket for a user (a port forwarded to it)
/// acts with that user's role; a web page could then call it through DNS rebinding (its
/// own name resolving to the forwarded port) or across sites. Browsers mark their
/// requests (`Origin`, `Sec-Fetch-Site`): those must name a loopback host and not come
/// from another site. Other clients (strata, curl) are not browsers and pass.
fn browser_refusal(req: &Request) -> Option<String> {
    let h = req.headers();
    let site = h.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if h.get(axum::http::header::ORIGIN).is_none() && site.is_none() {
        return None;
    }
    if site.is_some_and(|s| s != "same-origin" && s != "none") {
        return Some("a browser's request from another site is refused here".into());
    }
    let host = h
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let name = match host.rsplit_once(':') {
        Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => host,
    };
    if matches!(name, "localhost" | "127.0.0.1" | "[::1]") {
        None
    } else {
        Some(format!(
            "a browser's request for host {host:?} is refused on the unix socket (only \
             localhost)"
        ))
    }
}

async fn check(
    State((gate, op)): State<(Arc<Gate>, Operation)>,
    mut req: Request,
    next: Next,
) -> Response {
    let object = req.uri().path().to_owned();
    let query = query_json(req.uri().query());
    // Who calls: on the unix socket, the peer's kernel credentials (named by uid here: a
    // user-name lookup may be slow, and this is the server's only thread; the audit line
    // gets the name, off this thread); over TCP, the bearer token.
    let local = req.extensions().get::<Principal>().cloned();
    let remote = req.extensions().get::<Remote>().copied();
    let (who, role) = match (&local, remote) {
        (Some(p), _) => (format!("uid={}", p.uid), gate.access.role_of(p)),
        (None, Some(Remote(addr))) => match bearer(&req).and_then(|t| gate.access.token(t)) {
            Some(t) => (format!("token:{}@{addr}", t.name), Some(t.role)),
            None => {
                let message =
                    "a bearer token this daemon knows is needed (Authorization: Bearer ...)";
                // Anyone who reaches the port can ask: one audited (and logged) refusal per
                // address per interval, the others counted into it, so that asking cannot
                // fill the log or its disk.
                if let Some(also) = gate.unauthenticated.note(addr.ip()) {
                    log::warn!(
                        "api: refused {} {object} from {addr}: no valid token ({also} more from \
                         that address since the last line)",
                        op.name
                    );
                    let entry = Entry {
                        principal: format!("remote@{addr}"),
                        role: None,
                        operation: op.name.into(),
                        object,
                        params: audit::redact(
                            serde_json::json!({ "query": query, "refused_since_last_line": also }),
                        ),
                        status: 401,
                        result: format!("denied: {message}"),
                    };
                    if let Err(e) = gate.record(None, entry).await {
                        log::error!("cannot write the audit log: {e}");
                    }
                }
                let mut r = json_error(StatusCode::UNAUTHORIZED, message);
                r.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                );
                // No second guess on this connection.
                r.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    HeaderValue::from_static("close"),
                );
                return r;
            }
        },
        (None, None) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, "caller unknown"),
    };
    let needed = gate.access.needed(op.name, op.role);
    let browser = local.as_ref().and_then(|_| browser_refusal(&req));
    let allowed = role.filter(|r| *r >= needed && browser.is_none());
    let Some(role) = allowed else {
        let message = match (role, browser) {
            (_, Some(why)) => why,
            (None, _) => format!("{who} has no role here"),
            (Some(r), _) => format!("{} needs the {needed} role; {who} has {r}", op.name),
        };
        log::warn!("api: denied {} {object}: {message}", op.name);
        let entry = Entry {
            principal: who,
            role,
            operation: op.name.into(),
            object,
            params: audit::redact(serde_json::json!({ "query": query })),
            status: 403,
            result: format!("denied: {message}"),
        };
        if let Err(e) = gate.record(local.as_ref(), entry).await {
            log::error!("cannot write the audit log: {e}");
        }
        return json_error(StatusCode::FORBIDDEN, &message);
    };
    req.extensions_mut().insert(Caller {
        who: who.clone(),
        role,
    });
    if !op.mutating {
        return next.run(req).await;
    }
    // Keep the body to record it; the route reads it back from here.
    let (parts, body) = req.into_parts();
    let limit = parts
        .extensions
        .get::<Limits>()
        .map_or(Limits::default().body_bytes, |l| l.body_bytes);
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body: {e} (at most {limit} bytes)"),
            )
        }
    };
    let mut body_json: serde_json::Value =
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    if op.secret_body {
        body_json = audit::keys_only(body_json);
    } else if let Some(keys) = op.public_keys {
        body_json = audit::public_only(body_json, keys);
    }
    let params = audit::redact(serde_json::json!({ "query": query, "body": body_json }));
    let req = Request::from_parts(parts, Body::from(bytes));
    // The operation and its audit line run as a task of their own: a client that hangs up
    // (or a connection past its time) drops this future, not the task, so what was done
    // is always recorded.
    let task_gate = gate.clone();
    let task = tokio::spawn(async move {
        let response = next.run(req).await;
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        let status = parts.status;
        let result = if status.is_success() {
            "ok".to_string()
        } else {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|m| m.as_str()).map(str::to_owned))
                .unwrap_or_else(|| status.to_string())
        };
        let entry = Entry {
            principal: who,
            role: Some(role),
            operation: op.name.into(),
            object,
            params,
            status: status.as_u16(),
            result,
        };
        if let Err(e) = task_gate.record(local.as_ref(), entry).await {
            log::error!("cannot write the audit log: {e}");
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!(
                    "{} was carried out, but its audit record could not be written: {e}",
                    op.name
                ),
            );
        }
        Response::from_parts(parts, Body::from(bytes))
    });
    match task.await {
        Ok(response) => response,
        Err(e) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("{} failed: {e}", op.name),
        ),
    }
}

/// Adds the JSON 404 and 405 answers to a daemon's routes.
pub fn finish(router: Router) -> Router {
    router
        .fallback(|req: Request| async move {
            json_error(
                StatusCode::NOT_FOUND,
                &format!("no such resource: {}", req.uri().path()),
            )
        })
        .method_not_allowed_fallback(|req: Request| async move {
            json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
}

/// Serves `router` on `listener` from a thread named `api`, within `limits`.
pub fn serve(listener: StdUnixListener, router: Router, limits: Limits) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    on_own_thread("api", async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                log::error!("api: cannot use the listening socket: {e}");
                return;
            }
        };
        accept_loop(listener, router, limits).await;
    })
}

/// Runs `work` on a thread named `name`, with a single-threaded tokio runtime of its own
/// (the API is a control plane: one thread, blocking work on tokio's blocking pool).
fn on_own_thread(
    name: &str,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || runtime.block_on(work))?;
    Ok(())
}

async fn accept_loop(listener: tokio::net::UnixListener, router: Router, limits: Limits) {
    let places = Arc::new(Semaphore::new(limits.connections));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("api: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let principal = match Principal::of_peer(&stream) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("api: cannot tell who is calling: {e}");
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let _place = place;
            serve_connection(stream, Who::Local(principal), router, limits).await;
        });
    }
}

/// Who is at the other end of a connection.
#[derive(Clone)]
enum Who {
    Local(Principal),
    Remote(std::net::SocketAddr),
}

/// HTTP on one connection, within the limits.
async fn serve_connection<S>(stream: S, who: Who, router: Router, limits: Limits)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        match &who {
            Who::Local(p) => req.extensions_mut().insert(p.clone()).map(|_| ()),
            Who::Remote(a) => req.extensions_mut().insert(Remote(*a)).map(|_| ()),
        };
        req.extensions_mut().insert(limits);
        let router = router.clone();
        async move {
            use tower::ServiceExt;
            router.oneshot(req.map(Body::new)).await
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_time)
        .max_buf_size(limits.head_bytes.max(8192))
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_time, conn).await {
        Ok(Err(e)) => log::debug!("api: connection: {e}"),
        Err(_) => log::debug!("api: connection held past its time; closed"),
        Ok(Ok(())) => {}
    }
}

/// Serves `router` over TCP with TLS (`tls`: TLS 1.3 only, see [`tls_config`]) from a
/// thread named `api-tls`, within `limits`. Callers prove who they are with a bearer
/// token; the handshake counts against the head time.
pub fn serve_tls(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: Limits,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    on_own_thread("api-tls", async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                log::error!("api: cannot use the TCP socket: {e}");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let places = Arc::new(Semaphore::new(limits.connections));
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("api: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Over the limit: closed before the handshake (no plain-text answer).
            let Ok(place) = places.clone().try_acquire_owned() else {
                continue;
            };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                let _place = place;
                match tokio::time::timeout(limits.head_time, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        serve_connection(stream, Who::Remote(addr), router, limits).await
                    }
                    Ok(Err(e)) => log::debug!("api: TLS handshake with {addr}: {e}"),
                    Err(_) => log::debug!("api: TLS handshake with {addr} too slow"),
                }
            });
        }
    })
}

/// A TLS 1.3 server configuration from PEM files: the certificate chain, and a private
/// key that only its owner may read (as ssh insists for its keys).
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(key).map_err(|e| format!("{}: {e}", key.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{}: the private key is readable by others (mode {:o}); chmod 600 it",
            key.display(),
            meta.mode() & 0o777
        ));
    }
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    // ring, not aws-lc-rs (rustls's default, which builds a C library with cmake): ring has
    // no post-quantum key exchange, hence the deprecation.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Arc::new(config))
}

/// Answers 503 to a connection over the limit, and closes it.
async fn refuse(mut stream: tokio::net::UnixStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"error":"too many API connections; try again"}"#;
    let text = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(text.as_bytes())).await;
}

/// A `Content-Type` for Prometheus text.
pub fn prometheus(text: String) -> Response {
    let mut r = text.into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    use axum::routing::{get, post};

    #[test]
    fn browsers_reach_the_unix_socket_only_as_localhost_from_the_same_site() {
        let req = |headers: &[(&str, &str)]| {
            let mut b = Request::builder().uri("/v1/disks");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            browser_refusal(&b.body(Body::empty()).unwrap())
        };
        // strata and curl send no Origin nor Sec-Fetch-*: any Host.
        assert_eq!(req(&[("host", "x")]), None);
        assert_eq!(req(&[("host", "localhost")]), None);
        // A page served by the daemon through a forwarded port.
        let same = ("sec-fetch-site", "same-origin");
        assert_eq!(req(&[("host", "localhost:8080"), same]), None);
        assert_eq!(
            req(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:8080")
            ]),
            None
        );
        // DNS rebinding: same origin as far as the browser knows, but not localhost.
        assert!(req(&[("host", "evil.example:8080"), same]).is_some());
        assert!(req(&[("host", "evil.example"), ("origin", "http://evil.example")]).is_some());
        // Another site's page.
        assert!(req(&[("host", "localhost:8080"), ("sec-fetch-site", "cross-site")]).is_some());
    }

    fn server(limits: Limits, access: AccessTable) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = StdUnixListener::bind(&path).unwrap();
        let audit =
            AuditLog::open(crate::audit::AuditConfig::new(dir.path().join("audit.log"))).unwrap();
        let gate = Gate::new(access, Some(audit), false);
        let router = Router::new()
            .route(
                "/look",
                guarded(
                    &gate,
                    Operation::read("look"),
                    get(|| async { "you looked" }),
                ),
            )
            .route(
                "/panic",
                guarded(
                    &gate,
                    Operation::read("panic"),
                    get(|| async {
                        if true {
                            panic!("a route that panics");
                        }
                        "never"
                    }),
                ),
            )
            .route(
                "/change",
                guarded(
                    &gate,
                    Operation::write("change", Role::Operator),
                    post(|body: String| async move { format!("changed by {body}") }),
                ),
            );
        serve(listener, finish(router), limits).unwrap();
        (dir, path)
    }

    fn limits() -> Limits {
        Limits {
            head_bytes: 8192,
            head_time: Duration::from_millis(500),
            body_bytes: 1024,
            connection_time: Duration::from_secs(5),
            connections: 4,
        }
    }

    fn owner() -> AccessTable {
        AccessTable::owner_and_group(None)
    }

    /// Sends `request`, then reads the answer to its end.
    fn ask(path: &std::path::Path, request: &[u8]) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The server may answer and close before taking everything: a refused write is fine.
        let _ = s.write_all(request);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    const LOOK: &[u8] = b"GET /look HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    /// Asks until a request is served (200), for at most 5 s.
    fn served_again(path: &std::path::Path) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = ask(path, LOOK);
            if answer.starts_with("HTTP/1.1 200 ") {
                return;
            }
            assert!(Instant::now() < deadline, "still refused: {answer:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_stalled_client_does_not_hold_up_another() {
        let (_dir, path) = server(
            Limits {
                head_time: Duration::from_secs(30),
                ..limits()
            },
            owner(),
        );
        let mut stalled = UnixStream::connect(&path).unwrap();
        stalled.write_all(b"GET /lo").unwrap();
        let start = Instant::now();
        let answer = ask(&path, LOOK);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("you looked"), "{answer}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_request_head_or_body_past_its_limit_is_refused() {
        let (_dir, path) = server(limits(), owner());
        let answer = ask(&path, &vec![b'a'; 1 << 20]);
        assert!(
            answer.starts_with("HTTP/1.1 431 "),
            "a 1 MiB request line: {answer:?}"
        );
        // A client that keeps sending is refused after the limit and the socket's buffer.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let chunk = vec![b'a'; 64 << 10];
        let mut sent = 0usize;
        while sent < 64 << 20 {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        assert!(
            sent < 4 << 20,
            "the server took {sent} bytes of one request"
        );
        let body = vec![b'b'; 4096];
        let mut req = format!(
            "POST /change HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let answer = ask(&path, &req);
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer:?}");
        assert!(answer.contains("\"error\""), "{answer:?}");
    }

    #[test]
    fn a_route_that_panics_gives_its_connection_back() {
        let (_dir, path) = server(limits(), owner());
        // More panics than connections: each must give its place back.
        for _ in 0..2 * limits().connections {
            ask(&path, b"GET /panic HTTP/1.1\r\nHost: x\r\n\r\n");
        }
        served_again(&path);
    }

    #[test]
    fn a_client_slower_than_the_limit_is_cut_off() {
        let (_dir, path) = server(limits(), owner());
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = Instant::now();
        // A byte every 100 ms never completes the head within 500 ms.
        for b in b"GET /look HTTP/1.1\r\nHost: x\r\n".iter() {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            if start.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(!out.contains("you looked"), "{out:?}");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn connections_past_the_limit_are_refused_not_queued() {
        let (_dir, path) = server(
            Limits {
                head_time: Duration::from_secs(30),
                ..limits()
            },
            owner(),
        );
        let held: Vec<UnixStream> = (0..4)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        // Let the server take all four before the fifth arrives.
        std::thread::sleep(Duration::from_millis(200));
        let answer = ask(&path, LOOK);
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
        drop(held);
        served_again(&path);
    }

    #[test]
    fn callers_without_the_role_are_refused_and_recorded() {
        let (dir, path) = server(limits(), AccessTable::new(vec![]));
        let answer = ask(&path, LOOK);
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer:?}");
        assert!(answer.contains("has no role here"), "{answer:?}");
        let log = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        assert!(
            log.contains("\"operation\":\"look\"") && log.contains("\"status\":403"),
            "{log}"
        );

        let (dir, path) = server(limits(), owner());
        let answer = ask(
            &path,
            b"POST /change?x=1&token=opensesame HTTP/1.1\r\nHost: x\r\nContent-Length: 21\r\nConnection: close\r\n\r\n{\"password\":\"sesame\"}",
        );
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
        // The route saw the body the gate had read.
        assert!(
            answer.ends_with("changed by {\"password\":\"sesame\"}"),
            "{answer:?}"
        );
        let log = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        assert!(
            log.contains("\"operation\":\"change\"") && log.contains("\"x\":\"1\""),
            "{log}"
        );
        assert!(!log.contains("sesame"), "{log}");
        assert!(!log.contains("opensesame"), "{log}");
        let answer = ask(
            &path,
            b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(
            answer.starts_with("HTTP/1.1 404 ") && answer.contains("/nothing"),
            "{answer:?}"
        );
        let answer = ask(
            &path,
            b"DELETE /look HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(
            answer.starts_with("HTTP/1.1 405 ") && answer.contains("DELETE"),
            "{answer:?}"
        );
    }
}
