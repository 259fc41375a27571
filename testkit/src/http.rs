//! A minimal HTTP/1.1 client over a unix socket, for our daemons' `--api-socket`.
//!
//! This module owns only what tests need to read a daemon's API: one `GET` per connection
//! (`Connection: close`), a body delimited by `Content-Length`, chunked encoding, or EOF, and a
//! deadline on every read. It is deliberately not a general client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long one request may take in total before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed response from {path}: {reason}; raw response:\n{raw}")]
    Malformed {
        path: String,
        reason: String,
        raw: String,
    },
}

/// A parsed response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order of arrival.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` on the HTTP server listening on unix socket `socket`.
pub fn get(socket: impl AsRef<Path>, path: &str) -> Result<Response, HttpError> {
    request(socket.as_ref(), "GET", path)
}

fn request(socket: &Path, method: &str, path: &str) -> Result<Response, HttpError> {
    let sock_name = socket.display().to_string();
    let io = |source| HttpError::Io {
        path: sock_name.clone(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| HttpError::Connect {
        path: sock_name.clone(),
        source,
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;

    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    // Read until the headers are complete, then until the body is (a server may keep the
    // connection open despite `Connection: close`, so EOF is not the only end).
    loop {
        if let Some(resp) =
            parse(&raw, false).map_err(|reason| malformed(&sock_name, reason, &raw))?
        {
            return Ok(resp);
        }
        let n = stream.read(&mut chunk).map_err(io)?;
        if n == 0 {
            return parse(&raw, true)
                .map_err(|reason| malformed(&sock_name, reason, &raw))?
                .ok_or_else(|| malformed(&sock_name, "connection closed early".into(), &raw));
        }
        raw.extend_from_slice(&chunk[..n]);
    }
}

fn malformed(path: &str, reason: String, raw: &[u8]) -> HttpError {
    HttpError::Malformed {
        path: path.to_owned(),
        reason,
        raw: String::from_utf8_lossy(raw).into_owned(),
    }
}

/// Parses a complete response from `raw`, or returns `Ok(None)` if more bytes are needed.
/// `eof` says the server closed the connection (which ends an undelimited body).
fn parse(raw: &[u8], eof: bool) -> Result<Option<Response>, String> {
    let Some(head_end) = find(raw, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|e| format!("head: {e}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| format!("header line {line:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let rest = &raw[head_end + 4..];
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);

    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        match dechunk(rest)? {
            Some(body) => body,
            None => return Ok(None),
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| format!("content-length {len:?}"))?;
        if rest.len() < len {
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if eof || status == 204 || status == 304 {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Response {
        status,
        headers,
        body,
    }))
}

fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(rest, b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|e| e.to_string())?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One sample of Prometheus text exposition: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    /// The label set as written, without braces (empty if none).
    pub labels: String,
    pub value: f64,
}

/// Whether sample `name` belongs to family `family` (a histogram's `_bucket`, `_sum` and
/// `_count` do).
fn in_family(name: &str, family: &str) -> bool {
    name == family
        || name
            .strip_prefix(family)
            .is_some_and(|rest| matches!(rest, "_bucket" | "_sum" | "_count"))
}

/// Parses Prometheus text format; errors name the offending line. Checks what scrapers
/// insist on: a family is declared (`# TYPE`) once, and its samples form one group.
pub fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    let mut declared: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let family = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            if declared.contains(&family) {
                return Err(format!("family {family} is declared twice: {line:?}"));
            }
            declared.push(family.clone());
            current = Some(family);
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(open) => {
                let close = line[open..]
                    .find('}')
                    .map(|c| open + c)
                    .ok_or_else(|| format!("unclosed labels: {line:?}"))?;
                (
                    (&line[..open], &line[open + 1..close]),
                    line[close + 1..].trim(),
                )
            }
            None => {
                let (name, rest) = line
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| format!("no value: {line:?}"))?;
                ((name, ""), rest.trim())
            }
        };
        let value_text = rest.split_whitespace().next().unwrap_or_default();
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .map_err(|_| format!("bad value {v:?} in {line:?}"))?,
        };
        let name = series.0.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("bad metric name {name:?} in {line:?}"));
        }
        if !current.as_deref().is_some_and(|f| in_family(name, f)) {
            if let Some(f) = declared.iter().find(|f| in_family(name, f)) {
                return Err(format!(
                    "a sample of family {f} outside its group (after another family): {line:?}"
                ));
            }
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels: series.1.to_owned(),
            value,
        });
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve_once(response: &'static [u8]) -> (tempfile::TempDir, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while find(&req, b"\r\n\r\n").is_none() {
                let n = s.read(&mut buf).unwrap();
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(response).unwrap();
            // Keep the connection open briefly: the client must stop at Content-Length.
            std::thread::sleep(Duration::from_millis(50));
            String::from_utf8(req).unwrap()
        });
        (dir, handle)
    }

    #[test]
    fn content_length_body() {
        let (dir, h) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
        );
        let r = get(dir.path().join("api.sock"), "/metrics").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.body, b"hello");
        assert!(h.join().unwrap().starts_with("GET /metrics HTTP/1.1\r\n"));
    }

    #[test]
    fn chunked_body() {
        let (dir, h) = serve_once(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        );
        let r = get(dir.path().join("api.sock"), "/nope").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.text(), "abcde");
        h.join().unwrap();
    }

    #[test]
    fn prometheus_text() {
        let s = parse_prometheus(
            "# HELP a_total x\n# TYPE a_total counter\na_total 3\nb{queue=\"0\",op=\"read\"} 4.5 1700000000\nc +Inf\n",
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "a_total");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].labels, "queue=\"0\",op=\"read\"");
        assert_eq!(s[1].value, 4.5);
        assert!(s[2].value.is_infinite());
        assert!(parse_prometheus("x{a=\"b\" 1\n").is_err());
        let split = "# TYPE a counter\na{q=\"0\"} 1\n# TYPE b gauge\nb 2\na{q=\"1\"} 1\n";
        assert!(parse_prometheus(split)
            .unwrap_err()
            .contains("outside its group"));
        let twice = "# TYPE a counter\na 1\n# TYPE a counter\na 2\n";
        assert!(parse_prometheus(twice)
            .unwrap_err()
            .contains("declared twice"));
        let hist = "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.1\nh_count 1\n";
        assert_eq!(parse_prometheus(hist).unwrap().len(), 3);
        assert!(parse_prometheus("bad-name 1\n").is_err());
    }
}
