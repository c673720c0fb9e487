//! The HTTP loop around an [`App`]: a fixed pool of threads reads the connections, one
//! thread (the caller's) runs the generations from a bounded queue, and every request passes
//! the [`Access`] rules before its body is read.

use super::http::{self, Head, ReadError};
use super::{App, Reply, MAX_BODY};
use crate::error::{Error, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Retry-After (seconds) when every connection thread is taken.
const RETRY_BUSY_S: u32 = 1;
/// Retry-After (seconds) when the generation queue is full.
const RETRY_QUEUE_S: u32 = 10;

/// How the server takes its load and whom it answers.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Threads that read requests and answer everything but generations.
    pub workers: usize,
    /// Generation requests that may wait behind the running one; more get 503.
    pub queue: usize,
    /// A whole request (line, headers, body) must arrive within this time of the connection.
    pub read_timeout: Duration,
    /// Bearer token the API requires (`Authorization: Bearer TOKEN`), if any.
    pub token: Option<String>,
    /// Host names answered besides the bound address and the loopback names; `*` = any.
    pub allow_hosts: Vec<String>,
    /// Listen beyond loopback without a token.
    pub allow_no_token: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { workers: 8, queue: 4, read_timeout: Duration::from_secs(30), token: None, allow_hosts: Vec::new(), allow_no_token: false }
    }
}

/// The most connection threads and queued generations allowed.
pub const MAX_WORKERS: usize = 256;
pub const MAX_QUEUE: usize = 64;

impl ServeOptions {
    /// Check the values (each error names its flag).
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(Error::invalid("--workers", format!("{} is not between 1 and {MAX_WORKERS}", self.workers)));
        }
        if !(1..=MAX_QUEUE).contains(&self.queue) {
            return Err(Error::invalid("--queue", format!("{} is not between 1 and {MAX_QUEUE}", self.queue)));
        }
        if self.read_timeout.is_zero() || self.read_timeout > Duration::from_secs(3600) {
            return Err(Error::invalid("--read-timeout", format!("{:?} is not above 0 and at most 3600 s", self.read_timeout)));
        }
        if let Some(t) = &self.token {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::invalid("--token", "must be non-empty visible ASCII without spaces (it travels in an HTTP header)"));
            }
        }
        for h in &self.allow_hosts {
            if h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._*[]:".contains(&b)) {
                return Err(Error::invalid("--allow-host", format!("`{}` is not a host name", http::escape(h.as_bytes()))));
            }
        }
        Ok(())
    }
}

/// Who is answered: the Host (and Origin) a request names, and its token.
#[derive(Debug, Clone)]
pub struct Access {
    bound: IpAddr,
    /// Lower-case names from `--allow-host`.
    names: Vec<String>,
    any_host: bool,
    token: Option<String>,
}

/// The host of a `Host` header value or of an origin's authority: lower case, without port,
/// brackets or a final dot.
fn host_of(authority: &str) -> String {
    let a = authority.trim();
    let host = if let Some(rest) = a.strip_prefix('[') {
        // A bracketed IPv6 address; without its closing bracket, nothing.
        rest.split_once(']').map_or("", |(ip, _)| ip)
    } else {
        a.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(a, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Compare without stopping at the first difference (the time taken does not tell how much
/// of a guessed token was right).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Access {
    pub fn new(bound: IpAddr, opts: &ServeOptions) -> Self {
        let names: Vec<String> = opts.allow_hosts.iter().map(|h| host_of(h)).collect();
        Access { bound, any_host: names.iter().any(|n| n == "*"), names, token: opts.token.clone() }
    }

    /// Whether a request naming `host` is answered: the loopback names, the bound address
    /// (any IP address when bound to all of them), or a name allowed by `--allow-host`.
    /// A name the user did not allow may be an attacker's, pointed at this machine (DNS
    /// rebinding).
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host_of(host);
        if self.any_host || host == "localhost" || self.names.contains(&host) {
            return true;
        }
        match host.parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback() || ip == self.bound || self.bound.is_unspecified(),
            Err(_) => false,
        }
    }

    /// Whether `path` needs the token: everything but the page and its demo images.
    fn needs_token(path: &str) -> bool {
        !matches!(path, "/" | "/index.html") && !path.starts_with("/demo/")
    }

    /// The reply refusing `head`, if it is refused: 421 for a Host not answered, 403 for a
    /// foreign Origin, 401 without the right token, 415 for a POST that is not JSON.
    pub fn check(&self, head: &Head) -> std::result::Result<(), Reply> {
        let Some(host) = head.header("Host") else {
            return Err(Reply::error(400, "the request has no Host header"));
        };
        if !self.host_allowed(host) {
            return Err(Reply::error(
                421,
                format!("this server does not answer for host `{}`; start it with `--allow-host {}` to answer for that name", http::escape(host.as_bytes()), http::escape(host_of(host).as_bytes())),
            ));
        }
        if let Some(origin) = head.header("Origin") {
            let authority = origin.split_once("://").map(|(_, a)| a);
            if !authority.is_some_and(|a| self.host_allowed(a)) {
                return Err(Reply::error(403, format!("requests from pages of origin `{}` are not answered", http::escape(origin.as_bytes()))));
            }
        }
        if let (Some(token), true) = (&self.token, Self::needs_token(head.path())) {
            let given = head.header("Authorization").and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
            if !given.is_some_and(|g| same_secret(g.trim().as_bytes(), token.as_bytes())) {
                let mut r = Reply::error(401, "this server needs its token: send `Authorization: Bearer TOKEN` (the page takes it from its address, `/#token=TOKEN`, or its token field)");
                r.headers.push(("WWW-Authenticate", "Bearer".into()));
                return Err(r);
            }
        }
        if head.method == "POST" {
            let media = head.header("Content-Type").unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if media != "application/json" {
                return Err(Reply::error(415, format!("a POST body must be JSON sent as `Content-Type: application/json` (got `{}`)", http::escape(media.as_bytes()))));
            }
        }
        Ok(())
    }
}

/// A generation accepted into the queue, with its connection.
struct Job<'a> {
    stream: TcpStream,
    head: Head,
    body: Vec<u8>,
    t0: Instant,
    _slot: Slot<'a>,
}

/// A place in the generation queue, held from the moment the request is accepted until its
/// generation starts.
struct Slot<'a>(&'a AtomicUsize);

/// The HTTP server: a listener and its rules.
pub struct WebServer {
    listener: TcpListener,
    addr: SocketAddr,
    opts: ServeOptions,
    access: Access,
    stop: AtomicBool,
}

impl WebServer {
    /// Listen on `addr` (`host:port`; port 0 picks a free one). Refuses an address beyond
    /// loopback without a token unless `opts.allow_no_token`.
    pub fn bind(addr: &str, opts: ServeOptions) -> Result<Self> {
        opts.validate()?;
        let listener = TcpListener::bind(addr).map_err(|e| Error::invalid("--addr", format!("cannot listen on {addr}: {e}")))?;
        let bound = listener.local_addr().map_err(|e| Error::invalid("--addr", format!("cannot listen on {addr}: {e}")))?;
        if !bound.ip().is_loopback() && opts.token.is_none() && !opts.allow_no_token {
            return Err(Error::invalid(
                "--addr",
                format!("{bound} accepts connections from other machines: set a --token (the API then requires it), or pass --allow-no-token to serve anyone who can reach it"),
            ));
        }
        let access = Access::new(bound.ip(), &opts);
        Ok(WebServer { listener, addr: bound, opts, access, stop: AtomicBool::new(false) })
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.addr)
    }

    /// Make [`WebServer::run`] return: it stops accepting, finishes the requests it holds
    /// (a stalled one at its read timeout) and the queued generations.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor with a connection of our own.
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let _ = TcpStream::connect_timeout(&SocketAddr::new(ip, self.addr.port()), Duration::from_secs(1));
    }

    /// Answer requests until [`WebServer::stop`]. `opts.workers` threads read the requests
    /// (a connection that is not read within `opts.read_timeout` is dropped with 408) and
    /// answer all but generations; a connection that finds every thread taken (and the few
    /// waiting places full) gets 503. Generations run on the calling thread one after the
    /// other; `opts.queue` may wait, more get 503. Each answer is logged to stderr with its
    /// status and time (waiting included), the request line escaped.
    pub fn run(&self, app: &App) -> Result<()> {
        let opts = &self.opts;
        super::purge_freed_memory();
        let (conn_tx, conn_rx) = sync_channel::<(TcpStream, Instant)>(opts.workers);
        let conn_rx = Mutex::new(conn_rx);
        // Every job holds a slot and there are `queue` slots: sending never blocks.
        let (job_tx, job_rx) = sync_channel::<Job<'_>>(opts.queue);
        std::thread::scope(|scope| {
            for _ in 0..opts.workers {
                let job_tx = job_tx.clone();
                let conn_rx = &conn_rx;
                scope.spawn(move || self.worker(app, conn_rx, job_tx));
            }
            drop(job_tx);
            scope.spawn(move || self.accept(conn_tx));
            self.generations(app, job_rx);
        });
        Ok(())
    }

    fn accept(&self, conn_tx: SyncSender<(TcpStream, Instant)>) {
        for conn in self.listener.incoming() {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("warning: cannot accept a connection: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            match conn_tx.try_send((stream, Instant::now())) {
                Ok(()) => {}
                Err(TrySendError::Full((mut stream, _))) => {
                    let mut r = Reply::error(503, format!("all {} connection threads are busy; try again shortly", self.opts.workers));
                    r.headers.push(("Retry-After", RETRY_BUSY_S.to_string()));
                    let _ = http::send(&mut stream, &r, Duration::from_millis(200));
                    eprintln!("(connection) -> 503 (all {} connection threads busy)", self.opts.workers);
                }
                Err(TrySendError::Disconnected(_)) => break,
            }
        }
    }

    fn worker<'a>(&self, app: &'a App, conn_rx: &Mutex<Receiver<(TcpStream, Instant)>>, job_tx: SyncSender<Job<'a>>) {
        loop {
            // The lock is held only while waiting for the next connection.
            let next = match conn_rx.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok((stream, t0)) = next else { return };
            self.connection(app, stream, t0, &job_tx);
        }
    }

    /// Read one request from `stream` and answer it (or queue its generation).
    fn connection<'a>(&self, app: &'a App, mut stream: TcpStream, t0: Instant, job_tx: &SyncSender<Job<'a>>) {
        let deadline = t0 + self.opts.read_timeout;
        let (head, start) = match http::read_head(&mut stream, deadline) {
            Ok(x) => x,
            Err(ReadError::Closed) => return,
            Err(ReadError::TimedOut) => {
                let r = Reply::error(408, format!("the request did not arrive within {} s", self.opts.read_timeout.as_secs_f64()));
                self.refuse(&mut stream, r, "(incomplete request)", t0);
                return;
            }
            Err(ReadError::Bad { reply, line }) => {
                self.refuse(&mut stream, reply, &http::escape(&line), t0);
                return;
            }
        };
        let line = request_line(&head);
        if let Err(r) = self.access.check(&head) {
            self.refuse(&mut stream, r, &line, t0);
            return;
        }
        let len = match head.content_length() {
            Ok(n) if n > MAX_BODY => {
                self.refuse(&mut stream, Reply::error(413, format!("request body over {} MiB", MAX_BODY >> 20)), &line, t0);
                return;
            }
            Ok(n) => n,
            Err(r) => {
                self.refuse(&mut stream, r, &line, t0);
                return;
            }
        };
        let quick = App::is_quick(&head.method, &head.target);
        let slot = if quick {
            None
        } else {
            match Slot::take(app, self.opts.queue) {
                Some(s) => Some(s),
                None => {
                    let mut r = Reply::error(503, format!("{} generations are already waiting; try again later", self.opts.queue));
                    r.headers.push(("Retry-After", RETRY_QUEUE_S.to_string()));
                    self.refuse(&mut stream, r, &line, t0);
                    return;
                }
            }
        };
        if len > start.len() && head.header("Expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
            use std::io::Write;
            let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let body = match http::read_body(&mut stream, start, len, deadline) {
            Ok(b) => b,
            Err(ReadError::TimedOut) => {
                let r = Reply::error(408, format!("the request body did not arrive within {} s", self.opts.read_timeout.as_secs_f64()));
                self.refuse(&mut stream, r, &line, t0);
                return;
            }
            Err(_) => return,
        };
        match slot {
            None => {
                let reply = answer(app, &head, body);
                self.respond(&mut stream, &reply, &line, t0);
            }
            Some(slot) => {
                // Cannot fail while `run` holds the receiver (it does until every worker ends).
                let _ = job_tx.send(Job { stream, head, body, t0, _slot: slot });
            }
        }
    }

    fn generations(&self, app: &App, job_rx: Receiver<Job<'_>>) {
        for job in job_rx {
            let Job { mut stream, head, body, t0, _slot } = job;
            drop(_slot);
            let line = request_line(&head);
            let reply = answer(app, &head, body);
            self.respond(&mut stream, &reply, &line, t0);
            drop(reply);
            super::return_memory();
        }
    }

    fn respond(&self, stream: &mut TcpStream, reply: &Reply, line: &str, t0: Instant) {
        if let Err(e) = http::send(stream, reply, self.opts.read_timeout) {
            eprintln!("warning: {line}: the answer could not be sent: {e}");
        }
        eprintln!("{line} -> {} ({:.0} ms)", reply.status, t0.elapsed().as_secs_f64() * 1e3);
    }

    /// Answer a request refused before its body was read.
    fn refuse(&self, stream: &mut TcpStream, reply: Reply, line: &str, t0: Instant) {
        self.respond(stream, &reply, line, t0);
        http::linger(stream, MAX_BODY);
    }
}

impl<'a> Slot<'a> {
    /// A place in the queue of `app`, if fewer than `cap` are taken.
    fn take(app: &'a App, cap: usize) -> Option<Slot<'a>> {
        app.queued.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < cap).then_some(n + 1)).ok()?;
        Some(Slot(&app.queued))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The request line for the log, escaped.
fn request_line(head: &Head) -> String {
    format!("{} {}", http::escape(head.method.as_bytes()), http::escape(head.target.as_bytes()))
}

/// [`App::handle_owned`] for `head`; a panic inside (a bug) becomes a 500 answer instead of
/// stopping the server.
fn answer(app: &App, head: &Head, body: Vec<u8>) -> Reply {
    let run = std::panic::AssertUnwindSafe(|| app.handle_owned(&head.method, &head.target, body));
    std::panic::catch_unwind(run).unwrap_or_else(|panic| {
        let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
        Reply::error(500, format!("internal error: {what}"))
    })
}
