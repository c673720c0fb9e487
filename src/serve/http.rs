//! Just enough HTTP/1.1 for the page and its API, on a plain [`TcpStream`]: one request per
//! connection (every answer closes it), bodies by `Content-Length` only, and every read
//! bounded by a deadline, so a client that stalls or drips its request cannot hold a thread
//! past it.

use super::Reply;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// The longest request line plus headers accepted.
pub const MAX_HEAD: usize = 16 << 10;
/// The most header lines accepted.
pub const MAX_HEADERS: usize = 64;

/// A request's line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target as sent (path and query), visible ASCII only.
    pub target: String,
    /// Names as sent; compare them with [`Head::header`], which ignores case.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The value of the first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The path, without query or fragment.
    pub fn path(&self) -> &str {
        self.target.split(['?', '#']).next().unwrap_or("")
    }

    /// The announced body length: 0 without one; an error reply for a chunked body, a
    /// malformed length or two different lengths.
    pub fn content_length(&self) -> Result<usize, Reply> {
        if self.header("Transfer-Encoding").is_some() {
            return Err(Reply::error(411, "chunked request bodies are not accepted: send the body with a Content-Length"));
        }
        let mut length = None;
        for (_, v) in self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("Content-Length")) {
            let n: usize = v.trim().parse().map_err(|_| Reply::error(400, format!("Content-Length `{}` is not a byte count", escape(v.as_bytes()))))?;
            if length.is_some_and(|l| l != n) {
                return Err(Reply::error(400, "two different Content-Length headers"));
            }
            length = Some(n);
        }
        Ok(length.unwrap_or(0))
    }
}

/// Why no request came: the client went away or stalled (nothing to answer, or a 408), or
/// sent something that is not a request this server reads (an error reply).
#[derive(Debug)]
pub enum ReadError {
    /// The connection closed (or failed) before a whole request arrived.
    Closed,
    /// The deadline passed first.
    TimedOut,
    /// Not a request this server reads; the reply says why. `line` is the raw first line,
    /// for the log.
    Bad { reply: Reply, line: Vec<u8> },
}

/// Read from `stream` into `buf`, giving up at `deadline`.
fn read_until(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<usize, ReadError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::TimedOut);
        }
        // A zero timeout means "none" to the socket; the deadline is never that close here.
        stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))).map_err(|_| ReadError::Closed)?;
        match stream.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return Err(ReadError::Closed),
        }
    }
}

/// Read the request line and headers. Returns them and the bytes read past them (the start
/// of the body).
pub fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<(Head, Vec<u8>), ReadError> {
    let mut raw = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = read_until(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        let from = raw.len().saturating_sub(3);
        raw.extend_from_slice(&chunk[..n]);
        if let Some(p) = raw[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            break from + p;
        }
        if raw.len() > MAX_HEAD {
            let line = first_line(&raw);
            return Err(ReadError::Bad { reply: Reply::error(431, format!("request line and headers over {} KiB", MAX_HEAD >> 10)), line });
        }
    };
    if end > MAX_HEAD {
        let line = first_line(&raw);
        return Err(ReadError::Bad { reply: Reply::error(431, format!("request line and headers over {} KiB", MAX_HEAD >> 10)), line });
    }
    let head = parse_head(&raw[..end]).map_err(|msg| ReadError::Bad { reply: Reply::error(400, msg), line: first_line(&raw) })?;
    Ok((head, raw[end + 4..].to_vec()))
}

/// The first line of `raw` (at most 256 bytes), for the log.
fn first_line(raw: &[u8]) -> Vec<u8> {
    let line = raw.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line[..line.len().min(256)].to_vec()
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parse a request line and headers (without the blank line that ends them).
pub fn parse_head(raw: &[u8]) -> Result<Head, String> {
    let mut lines = raw.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().unwrap_or(&[]);
    let bad_line = || format!("not an HTTP request line: `{}`", escape(&line[..line.len().min(256)]));
    let text = std::str::from_utf8(line).map_err(|_| bad_line())?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad_line());
    };
    if !is_token(method) || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad_line());
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("the request target `{}` is not a path of visible ASCII", escape(target.as_bytes())));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(format!("HTTP version `{}` is not 1.0 or 1.1", escape(version.as_bytes())));
    }
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() == MAX_HEADERS {
            return Err(format!("more than {MAX_HEADERS} headers"));
        }
        let shown = || escape(&line[..line.len().min(256)]);
        let colon = line.iter().position(|&b| b == b':').ok_or_else(|| format!("not a header line: `{}`", shown()))?;
        let name = std::str::from_utf8(&line[..colon]).ok().filter(|n| is_token(n)).ok_or_else(|| format!("not a header name: `{}`", shown()))?;
        let value = &line[colon + 1..];
        // Visible characters, spaces and tabs (and bytes of UTF-8 text); no control bytes.
        if value.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
            return Err(format!("control bytes in header `{name}`"));
        }
        let value = String::from_utf8_lossy(value).trim_matches([' ', '\t']).to_string();
        headers.push((name.to_string(), value));
    }
    Ok(Head { method: method.to_string(), target: target.to_string(), headers })
}

/// Read a body of `len` bytes whose first bytes (`start`) came with the head.
pub fn read_body(stream: &mut TcpStream, mut start: Vec<u8>, len: usize, deadline: Instant) -> Result<Vec<u8>, ReadError> {
    // Bytes past the body (a pipelined request) are not served: every answer closes.
    start.truncate(len);
    let mut body = start;
    body.reserve_exact(len - body.len());
    let mut chunk = vec![0u8; 64 << 10];
    while body.len() < len {
        let want = (len - body.len()).min(chunk.len());
        let n = read_until(stream, &mut chunk[..want], deadline)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(body)
}

/// The reason phrase of the statuses this server answers with.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The bytes of `reply` as an HTTP/1.1 answer that closes the connection.
pub fn encode(reply: &Reply) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n", reply.status, reason(reply.status), reply.content_type, reply.body.len());
    out.push_str("Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n");
    for (name, value) in &reply.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&reply.body);
    bytes
}

/// Send `reply` and close the sending side; a client that does not read gets `timeout`.
pub fn send(stream: &mut TcpStream, reply: &Reply, timeout: Duration) -> std::io::Result<()> {
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    stream.write_all(&encode(reply))?;
    stream.flush()?;
    stream.shutdown(Shutdown::Write)
}

/// After an answer sent before the request was read to its end: read and drop what the
/// client still sends for a short while (at most `max` bytes), so that closing does not
/// reset the connection before the client has read the answer.
pub fn linger(stream: &mut TcpStream, max: usize) {
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut chunk = [0u8; 16 << 10];
    let mut seen = 0;
    while seen < max {
        match read_until(stream, &mut chunk, deadline) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen += n,
        }
    }
}

/// `bytes` for a log line: visible ASCII as it is, a backslash doubled, every other byte
/// (control bytes, escape sequences, NUL, bytes above 0x7e) as `\xNN`. Nothing written this
/// way can move the cursor or change a terminal's state.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}
