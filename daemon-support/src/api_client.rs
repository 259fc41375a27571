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

/// `method path` with an optional JSON body.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Answer, CallError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CallError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    runtime.block_on(async {
        match tokio::time::timeout(TIMEOUT, call_async(socket, method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(socket.to_owned(), TIMEOUT)),
        }
    })
}

async fn call_async(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Answer, CallError> {
    let http = |e: &dyn std::fmt::Display| CallError::Http {
        path: socket.to_owned(),
        message: e.to_string(),
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| CallError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(&e))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
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
