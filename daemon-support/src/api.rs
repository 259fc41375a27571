//! The HTTP/1.1 API listener on a unix socket (as Cloud Hypervisor's API): one request per
//! connection, from a thread of its own. The daemon supplies the routes; this module reads
//! the request line, skips the headers and writes the response. A control plane, not a data
//! path.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// What a route answers.
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn ok(content_type: &'static str, body: String) -> Response {
        Response {
            status: "200 OK",
            content_type,
            body,
        }
    }

    /// 405 for a known path with another method, 404 otherwise, naming the known paths.
    pub fn not_found_or_not_allowed(method: &str, path: &str, known: &[&str]) -> Response {
        if known.contains(&path) && method != "GET" {
            return Response {
                status: "405 Method Not Allowed",
                content_type: "application/json",
                body: r#"{"error":"only GET is allowed"}"#.to_string(),
            };
        }
        Response {
            status: "404 Not Found",
            content_type: "application/json",
            body: format!(r#"{{"error":"unknown path; try {}"}}"#, known.join(" or ")),
        }
    }
}

/// Serves `listener` from a thread named `api`, answering each request with `route(method,
/// path)`.
pub fn serve(
    listener: UnixListener,
    route: impl Fn(&str, &str) -> Response + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = handle(stream, &route) {
                            log::debug!("api: {e}");
                        }
                    }
                    Err(e) => log::warn!("api: accept failed: {e}"),
                }
            }
        })?;
    Ok(())
}

fn handle(stream: UnixStream, route: &dyn Fn(&str, &str) -> Response) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers; no request here has a body.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let r = route(method, path);
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )?;
    stream.write_all(r.body.as_bytes())
}

/// Escapes a Prometheus label value.
pub fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
