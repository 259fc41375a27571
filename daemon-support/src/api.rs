//! The HTTP/1.1 API listener on a unix socket (as Cloud Hypervisor's API): one request per
//! connection, each connection on a thread of its own, at most [`Limits::connections`] at
//! once. The daemon supplies the routes; this module reads the request head (at most
//! [`Limits::head_bytes`], within [`Limits::head_time`]), skips the headers and writes the
//! response. A client that trickles bytes or never ends its request holds one connection
//! until the time is up and no more memory than the limit, and never the others. A control
//! plane, not a data path. (The management API replaces this with an HTTP library; the
//! limits carry over.)

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one client may take of the API.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of request line and headers.
    pub head_bytes: usize,
    /// Time to send them, from the connection's acceptance.
    pub head_time: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            head_bytes: 16 << 10,
            head_time: Duration::from_secs(5),
            connections: 16,
        }
    }
}

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
/// path)`, within the default [`Limits`].
pub fn serve(
    listener: UnixListener,
    route: impl Fn(&str, &str) -> Response + Send + Sync + 'static,
) -> std::io::Result<()> {
    serve_with(listener, Limits::default(), route)
}

/// [`serve`] within `limits`.
pub fn serve_with(
    listener: UnixListener,
    limits: Limits,
    route: impl Fn(&str, &str) -> Response + Send + Sync + 'static,
) -> std::io::Result<()> {
    let route = Arc::new(route);
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("api: accept failed: {e}");
                        continue;
                    }
                };
                let Some(slot) = Slot::take(&active, limits.connections) else {
                    let _ = refuse(stream, "503 Service Unavailable", "too many connections");
                    continue;
                };
                let route = route.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            let _slot = slot;
                            if let Err(e) = handle(stream, limits, &*route) {
                                log::debug!("api: {e}");
                            }
                        });
                // A thread that did not start dropped its closure, and the slot with it.
                if let Err(e) = spawned {
                    log::warn!("api: cannot start a connection thread: {e}");
                }
            }
        })?;
    Ok(())
}

/// One of the [`Limits::connections`] places, given back when dropped: also when a route
/// panics, so a panic costs one request, not a place for good.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        if active.fetch_add(1, Ordering::SeqCst) >= max {
            active.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a request head could not be read.
#[derive(Debug)]
enum HeadError {
    TooLarge,
    TooSlow,
    Io(std::io::Error),
}

/// Reads the request head (up to the blank line), within the limits.
fn read_head(stream: &mut UnixStream, limits: Limits) -> Result<Vec<u8>, HeadError> {
    let deadline = Instant::now() + limits.head_time;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::TooSlow);
        }
        stream.set_read_timeout(Some(left)).map_err(HeadError::Io)?;
        let room = limits.head_bytes + 1 - head.len();
        let n = match stream.read(&mut chunk[..room.min(1024)]) {
            Ok(0) => return Ok(head),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeadError::TooSlow)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HeadError::Io(e)),
        };
        // Only the new bytes, and the three before them, can complete the blank line.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        let tail = &head[from..];
        if tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > limits.head_bytes {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Answers `status` with a JSON error and closes.
fn refuse(mut stream: UnixStream, status: &str, message: &str) -> std::io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let body = format!(r#"{{"error":"{message}"}}"#);
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn handle(
    mut stream: UnixStream,
    limits: Limits,
    route: &dyn Fn(&str, &str) -> Response,
) -> std::io::Result<()> {
    let head = match read_head(&mut stream, limits) {
        Ok(h) => h,
        Err(HeadError::TooLarge) => {
            return refuse(
                stream,
                "431 Request Header Fields Too Large",
                "request head too large",
            )
        }
        Err(HeadError::TooSlow) => {
            return refuse(stream, "408 Request Timeout", "request too slow")
        }
        Err(HeadError::Io(e)) => return Err(e),
    };
    let head = String::from_utf8_lossy(&head);
    let request_line = head.lines().next().unwrap_or("");
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let r = route(method, path);
    stream.set_write_timeout(Some(limits.head_time))?;
    write!(
        stream,
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )?;
    stream.write_all(r.body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(limits: Limits) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        serve_with(listener, limits, |_, path| {
            assert_ne!(path, "/panic", "a route that panics");
            Response::ok("text/plain", format!("you asked for {path}"))
        })
        .unwrap();
        (dir, path)
    }

    fn limits() -> Limits {
        Limits {
            head_bytes: 4096,
            head_time: Duration::from_millis(500),
            connections: 4,
        }
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

    /// Asks until a request is served (200), for at most 5 s.
    fn served_again(path: &std::path::Path) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = ask(path, b"GET /metrics HTTP/1.1\r\n\r\n");
            if answer.starts_with("HTTP/1.1 200 ") {
                return;
            }
            assert!(Instant::now() < deadline, "still refused: {answer:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_stalled_client_does_not_hold_up_another() {
        let (_dir, path) = server(Limits {
            head_time: Duration::from_secs(30),
            ..limits()
        });
        let mut stalled = UnixStream::connect(&path).unwrap();
        stalled.write_all(b"GET /met").unwrap();
        let start = Instant::now();
        let answer = ask(&path, b"GET /v1/disk HTTP/1.1\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("you asked for /v1/disk"), "{answer}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_request_head_without_end_is_cut_off_at_the_limit() {
        let (_dir, path) = server(limits());
        let answer = ask(&path, &vec![b'a'; 1 << 20]);
        assert!(
            answer.starts_with("HTTP/1.1 431 "),
            "a 1 MiB request line: {answer:?}"
        );
        // What the server holds of a request is at most what it has taken from the socket:
        // a client that keeps sending is refused after the limit and the socket's buffer.
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
    }

    #[test]
    fn a_route_that_panics_gives_its_connection_back() {
        let (_dir, path) = server(limits());
        // More panics than connections: each must give its place back.
        for _ in 0..2 * limits().connections {
            ask(&path, b"GET /panic HTTP/1.1\r\n\r\n");
        }
        served_again(&path);
    }

    #[test]
    fn a_client_slower_than_the_limit_is_cut_off() {
        let (_dir, path) = server(limits());
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = Instant::now();
        // A byte every 100 ms never completes the head within 500 ms.
        for b in b"GET /metrics HTTP/1.1\r\n".iter() {
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
        assert!(out.starts_with("HTTP/1.1 408 "), "{out:?}");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn connections_past_the_limit_are_refused_not_queued() {
        let (_dir, path) = server(Limits {
            head_time: Duration::from_secs(30),
            ..limits()
        });
        let held: Vec<UnixStream> = (0..4)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        // Let the server take all four before the fifth arrives.
        std::thread::sleep(Duration::from_millis(200));
        let answer = ask(&path, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
        drop(held);
        // Their threads end when they see the end of file; then the next one is served.
        served_again(&path);
    }
}
