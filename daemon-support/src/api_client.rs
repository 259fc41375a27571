//! A client of the management API: one call over the daemon's unix socket, on hyper's
//! HTTP/1.1 client (`strata`, the benches and tests use it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// How long one call may take, connection to last byte.
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach the API at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the API at {path}: {message}")]
    Http { path: PathBuf, message: String },
    #[error("the API at {0} did not answer within {1:?}")]
    Timeout(PathBuf, Duration),
}

/// An answer: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The API's error message, or the body as text.
    pub fn message(&self) -> String {
        self.json()
            .and_then(|v| v.get("error").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_owned())
    }
}

/// Where the API is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The daemon's unix socket (who calls is the kernel's to say).
    Unix(PathBuf),
    /// HTTPS over TCP (TLS 1.3), with a bearer token.
    Https {
        /// `host:port`; the host is also the name the certificate must carry.
        host: String,
        port: u16,
        /// PEM file of the certificate (or its CA) to trust.
        ca: PathBuf,
        token: String,
    },
}

impl Endpoint {
    /// From `https://HOST:PORT` (with the CA and token), or a socket path.
    pub fn https(url: &str, ca: PathBuf, token: String) -> Result<Endpoint, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("{url}: the API over TCP is https://HOST:PORT"))?
            .trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("{url}: expected https://HOST:PORT"))?;
        Ok(Endpoint::Https {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            ca,
            token,
        })
    }

    fn describe(&self) -> PathBuf {
        match self {
            Endpoint::Unix(p) => p.clone(),
            Endpoint::Https { host, port, .. } => PathBuf::from(format!("https://{host}:{port}")),
        }
    }
}

/// `method path` with an optional JSON body, on the unix socket.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Answer, CallError> {
    call_endpoint(&Endpoint::Unix(socket.to_owned()), method, path, body)
}

/// `method path` with an optional JSON body, wherever the API is.
pub fn call_endpoint(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Answer, CallError> {
    let socket = endpoint.describe();
    let socket = socket.as_path();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CallError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    runtime.block_on(async {
        match tokio::time::timeout(TIMEOUT, call_async(endpoint, method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(socket.to_owned(), TIMEOUT)),
        }
    })
}

async fn call_async(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Answer, CallError> {
    let socket = endpoint.describe();
    let socket = socket.as_path();
    let http = |e: &dyn std::fmt::Display| CallError::Http {
        path: socket.to_owned(),
        message: e.to_string(),
    };
    let connect = |source| CallError::Connect {
        path: socket.to_owned(),
        source,
    };
    match endpoint {
        Endpoint::Unix(p) => {
            let stream = tokio::net::UnixStream::connect(p).await.map_err(connect)?;
            exchange(stream, socket, method, path, body, None).await
        }
        Endpoint::Https {
            host,
            port,
            ca,
            token,
        } => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| http(&e))? {
                roots.add(c.map_err(|e| http(&e))?).map_err(|e| http(&e))?;
            }
            // ring, as the server (see daemon_support::http::tls_config).
            #[allow(deprecated)]
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| http(&e))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| http(&e))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(connect)?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(connect)?;
            exchange(tls, socket, method, path, body, Some(token)).await
        }
    }
}

/// One request and its answer on a connected stream.
async fn exchange<S>(
    stream: S,
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    token: Option<&str>,
) -> Result<Answer, CallError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: &dyn std::fmt::Display| CallError::Http {
        path: socket.to_owned(),
        message: e.to_string(),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(&e))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let bytes = match body {
        Some(v) => {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            serde_json::to_vec(v).map_err(|e| http(&e))?
        }
        None => Vec::new(),
    };
    let req = req
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| http(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http(&e))?
        .to_bytes()
        .to_vec();
    Ok(Answer { status, body })
}
