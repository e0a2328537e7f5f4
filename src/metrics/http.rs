//! The metrics endpoint's HTTP side: one thread, one `poll` loop, non-blocking sockets.
//!
//! Requests are parsed by `httparse`. What a slow or hostile client can take is bounded:
//! at most [`MAX_CONNECTIONS`] connections (a new one evicts the connection that has waited
//! longest for its request), [`MAX_HEAD`] bytes of request head, [`HEAD_TIMEOUT`] to send it
//! and [`WRITE_TIMEOUT`] to take the answer. Every answer closes its connection. Nothing here
//! touches the data path: a scrape copies counters (see [`super::Sources`]).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{MetricsError, Profile};

/// Connections served at once; a new one past this evicts the oldest unanswered one.
pub const MAX_CONNECTIONS: usize = 128;
/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head after connecting.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to read the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADERS: usize = 32;

/// Where the endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address (`127.0.0.1:9100`, `[::1]:9100`; port 0 picks a free one).
    Tcp(SocketAddr),
    /// A unix socket path (`unix:/run/thinblk/vm1.metrics`).
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = MetricsError;

    fn from_str(s: &str) -> Result<Endpoint, MetricsError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || path.contains('\0') {
                return Err(MetricsError::BadAddress(s.to_string()));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(Endpoint::Tcp).map_err(|_| MetricsError::BadAddress(s.to_string()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "http://{a}/metrics"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What the endpoint serves: the metrics text of a profile.
pub type Render = Arc<dyn Fn(Profile) -> Result<String, MetricsError> + Send + Sync>;

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn close_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        let s = match self {
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
        };
        match &s {
            Stream::Tcp(t) => {
                t.set_nonblocking(true)?;
                let _ = t.set_nodelay(true);
            }
            Stream::Unix(u) => u.set_nonblocking(true)?,
        }
        Ok(s)
    }
}

/// One client connection.
struct Conn {
    stream: Stream,
    deadline: Instant,
    accepted: Instant,
    /// The request head read so far (while `out` is None).
    head: Vec<u8>,
    /// The answer and how much of it was written.
    out: Option<(Vec<u8>, usize)>,
}

/// The running endpoint; stops (and removes its unix socket) when dropped.
pub struct MetricsServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    local: Endpoint,
}

impl MetricsServer {
    /// Where it actually listens (the port is resolved if 0 was asked for).
    pub fn endpoint(&self) -> &Endpoint {
        &self.local
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Endpoint::Unix(p) = &self.local {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds `endpoint` and serves `render` on a thread of its own.
pub fn serve(endpoint: &Endpoint, render: Render) -> Result<MetricsServer, MetricsError> {
    let (listener, local) = match endpoint {
        Endpoint::Tcp(addr) => {
            let l = TcpListener::bind(addr)?;
            let local = Endpoint::Tcp(l.local_addr()?);
            l.set_nonblocking(true)?;
            (Listener::Tcp(l), local)
        }
        Endpoint::Unix(path) => {
            // A stale socket from a previous run is replaced; any other file is not.
            if let Ok(m) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if m.file_type().is_socket() {
                    std::fs::remove_file(path)?;
                }
            }
            let l = UnixListener::bind(path)?;
            l.set_nonblocking(true)?;
            (Listener::Unix(l), endpoint.clone())
        }
    };
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let stop_rx = stop.try_clone()?;
    let thread = std::thread::Builder::new().name("metrics".into()).spawn(move || run(listener, &stop_rx, &render))?;
    Ok(MetricsServer { stop, thread: Some(thread), local })
}

fn run(listener: Listener, stop: &EventFd, render: &Render) {
    let mut conns: Vec<Conn> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut accept_errors = 0u64;
    loop {
        let now = Instant::now();
        conns.retain(|c| c.deadline > now);
        fds.clear();
        fds.push(libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        fds.push(libc::pollfd { fd: listener.fd(), events: libc::POLLIN, revents: 0 });
        for c in &conns {
            let events = if c.out.is_some() { libc::POLLOUT } else { libc::POLLIN };
            fds.push(libc::pollfd { fd: c.stream.fd(), events, revents: 0 });
        }
        let timeout = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .map(|d| d.as_millis().clamp(1, 60_000) as i32)
            .unwrap_or(-1);
        // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "metrics endpoint poll failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        if fds[0].revents != 0 {
            return;
        }
        // Connections first (their indices match `fds` from 2 on), then new ones.
        let mut closed = Vec::new();
        for (i, c) in conns.iter_mut().enumerate() {
            let revents = fds.get(i + 2).map(|p| p.revents).unwrap_or(0);
            if revents != 0 && !progress(c, render) {
                closed.push(i);
            }
        }
        for i in closed.into_iter().rev() {
            conns.swap_remove(i);
        }
        if fds[1].revents & libc::POLLIN != 0 {
            // Accept what is waiting (bounded per round, so connections keep being served).
            for _ in 0..MAX_CONNECTIONS {
                match listener.accept() {
                    Ok(stream) => {
                        accept_errors = 0;
                        if conns.len() >= MAX_CONNECTIONS {
                            evict_oldest(&mut conns);
                        }
                        let now = Instant::now();
                        conns.push(Conn { stream, deadline: now + HEAD_TIMEOUT, accepted: now, head: Vec::new(), out: None });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EMFILE and the like: logged (rate-limited), the endpoint stays up.
                        accept_errors += 1;
                        if accept_errors <= 10 || accept_errors % 1000 == 0 {
                            tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        }
                        std::thread::sleep(Duration::from_millis(10));
                        break;
                    }
                }
            }
        }
    }
}

/// Drops the connection that has waited longest without sending a whole request (else the
/// oldest one).
fn evict_oldest(conns: &mut Vec<Conn>) {
    let victim = conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.out.is_none())
        .min_by_key(|(_, c)| c.accepted)
        .or_else(|| conns.iter().enumerate().min_by_key(|(_, c)| c.accepted))
        .map(|(i, _)| i);
    if let Some(i) = victim {
        conns.swap_remove(i);
    }
}

/// Reads or writes what the socket allows; false once the connection is done with.
fn progress(c: &mut Conn, render: &Render) -> bool {
    if c.out.is_none() {
        let mut buf = [0u8; 2048];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => {
                    let room = MAX_HEAD.saturating_sub(c.head.len());
                    c.head.extend_from_slice(&buf[..n.min(room)]);
                    match answer(&c.head, render) {
                        Some(out) => {
                            c.out = Some((out, 0));
                            c.deadline = Instant::now() + WRITE_TIMEOUT;
                            break;
                        }
                        None if c.head.len() >= MAX_HEAD => {
                            c.out = Some((response(431, "Request Header Fields Too Large", "text/plain", b"request head too large\n", &[]), 0));
                            c.deadline = Instant::now() + WRITE_TIMEOUT;
                            break;
                        }
                        None => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
    let Some((out, pos)) = &mut c.out else { return true };
    while *pos < out.len() {
        match c.stream.write(&out[*pos..]) {
            Ok(0) => return false,
            Ok(n) => *pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    // All written: the answer says `Connection: close`; end our side and let go.
    c.stream.close_write();
    false
}

/// The answer to a complete request head, or None while it is incomplete.
fn answer(head: &[u8], render: &Render) -> Option<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => {
            Some(response(431, "Request Header Fields Too Large", "text/plain", b"too many headers\n", &[]))
        }
        Err(e) => Some(response(400, "Bad Request", "text/plain", format!("bad request: {e}\n").as_bytes(), &[])),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("").split(['?', '#']).next().unwrap_or("");
            let method = req.method.unwrap_or("");
            if path != "/metrics" {
                return Some(response(404, "Not Found", "text/plain", b"not found: the metrics are at /metrics\n", &[]));
            }
            if method != "GET" && method != "HEAD" {
                return Some(response(405, "Method Not Allowed", "text/plain", b"method not allowed\n", &[("Allow", "GET, HEAD")]));
            }
            let accept = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("accept"))
                .and_then(|h| std::str::from_utf8(h.value).ok());
            let profile = Profile::negotiate(accept);
            let mut out = match render(profile) {
                Ok(body) => response(200, "OK", profile.content_type(), body.as_bytes(), &[]),
                Err(e) => {
                    tracing::error!(error = %e, "rendering metrics failed");
                    response(500, "Internal Server Error", "text/plain", format!("{e}\n").as_bytes(), &[])
                }
            };
            if method == "HEAD" {
                if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                    out.truncate(end + 4);
                }
            }
            Some(out)
        }
    }
}

fn response(code: u16, reason: &str, content_type: &str, body: &[u8], extra: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 160);
    let _ = write!(out, "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in extra {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render() -> Render {
        Arc::new(|p: Profile| Ok(format!("# profile {p:?}\n")))
    }

    fn status(out: &[u8]) -> String {
        String::from_utf8_lossy(out).lines().next().unwrap_or("").to_string()
    }

    #[test]
    fn addresses() {
        assert_eq!("127.0.0.1:9100".parse::<Endpoint>().unwrap(), Endpoint::Tcp("127.0.0.1:9100".parse().unwrap()));
        assert_eq!("[::1]:0".parse::<Endpoint>().unwrap(), Endpoint::Tcp("[::1]:0".parse().unwrap()));
        assert_eq!("unix:/run/x.sock".parse::<Endpoint>().unwrap(), Endpoint::Unix("/run/x.sock".into()));
        for bad in ["", "9100", "localhost:9100", "unix:", "127.0.0.1", "http://127.0.0.1:9100"] {
            assert!(matches!(bad.parse::<Endpoint>(), Err(MetricsError::BadAddress(_))), "{bad}");
        }
    }

    #[test]
    fn routing() {
        let r = render();
        assert_eq!(answer(b"GET /metrics HTTP/1.1\r\nHost: x\r\n", &r), None, "incomplete head");
        let ok = answer(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", &r).unwrap();
        assert_eq!(status(&ok), "HTTP/1.1 200 OK");
        assert!(String::from_utf8_lossy(&ok).contains("text/plain; version=0.0.4"));
        let om = answer(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n", &r).unwrap();
        assert!(String::from_utf8_lossy(&om).contains("application/openmetrics-text; version=1.0.0"));
        assert!(String::from_utf8_lossy(&om).ends_with("# profile OpenMetrics\n"));
        let head = answer(b"HEAD /metrics HTTP/1.0\r\n\r\n", &r).unwrap();
        assert!(head.ends_with(b"\r\n\r\n"), "no body for HEAD");
        assert_eq!(status(&answer(b"GET / HTTP/1.1\r\n\r\n", &r).unwrap()), "HTTP/1.1 404 Not Found");
        assert_eq!(status(&answer(b"POST /nothing HTTP/1.1\r\n\r\n", &r).unwrap()), "HTTP/1.1 404 Not Found");
        let post = answer(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", &r).unwrap();
        assert_eq!(status(&post), "HTTP/1.1 405 Method Not Allowed");
        assert!(String::from_utf8_lossy(&post).contains("Allow: GET, HEAD"));
        assert_eq!(status(&answer(b"\x00\x01 garbage\r\n\r\n", &r).unwrap()), "HTTP/1.1 400 Bad Request");
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        let req = format!("GET /metrics HTTP/1.1\r\n{many}\r\n");
        assert_eq!(status(&answer(req.as_bytes(), &r).unwrap()), "HTTP/1.1 431 Request Header Fields Too Large");
    }

    #[test]
    fn serves_over_tcp_and_unix_and_drops_slow_clients() {
        let server = serve(&"127.0.0.1:0".parse().unwrap(), render()).unwrap();
        let Endpoint::Tcp(addr) = server.endpoint().clone() else { panic!("tcp") };
        // A client that never finishes its head does not block others.
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET /met").unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK") && got.ends_with("# profile Prometheus\n"), "{got}");
        drop(server);
        // IPv6 loopback, where the host has it.
        if let Ok(server) = serve(&"[::1]:0".parse().unwrap(), render()) {
            let Endpoint::Tcp(addr) = server.endpoint().clone() else { panic!("tcp") };
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).unwrap();
            assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        }
        let dir = std::env::temp_dir().join(format!("thinblk-metrics-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sock");
        let server = serve(&Endpoint::Unix(path.clone()), render()).unwrap();
        let mut u = UnixStream::connect(&path).unwrap();
        u.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut got = String::new();
        u.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        drop(server);
        assert!(!path.exists(), "the socket is removed at stop");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connection_cap_evicts_the_oldest_idle_client() {
        let server = serve(&"127.0.0.1:0".parse().unwrap(), render()).unwrap();
        let Endpoint::Tcp(addr) = server.endpoint().clone() else { panic!("tcp") };
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS + 8).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        // The first idle connections were closed by the server.
        let mut first = &idle[0];
        first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(first.read(&mut b).unwrap_or(0), 0);
    }
}
