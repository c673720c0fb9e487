//! `tokenar serve` as a user runs it: the rules its help states, the addresses it refuses,
//! and what reaches the terminal.

use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

fn tokenar(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenar")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn help_states_the_access_rules() {
    let (code, help) = tokenar(&["serve", "--help"]);
    assert_eq!(code, 0, "{help}");
    for needle in ["--token", "--allow-host", "--allow-no-token", "--read-timeout", "--workers", "--queue", "Host", "loopback", "application/json", "Bearer"] {
        assert!(help.contains(needle), "help should mention `{needle}`:\n{help}");
    }
}

#[test]
fn listening_beyond_loopback_without_a_token_is_refused() {
    let (code, err) = tokenar(&["serve", "--addr", "0.0.0.0:0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--token") && err.contains("--allow-no-token") && !err.contains("panicked"), "{err}");
    for (args, flag) in [
        (vec!["--workers", "0"], "--workers"),
        (vec!["--queue", "100000"], "--queue"),
        (vec!["--read-timeout", "0"], "--read-timeout"),
        (vec!["--read-timeout", "nan"], "--read-timeout"),
        (vec!["--token", ""], "--token"),
    ] {
        let mut full = vec!["serve", "--addr", "127.0.0.1:0"];
        full.extend(args);
        let (code, err) = tokenar(&full);
        assert_eq!(code, 2, "{full:?}: {err}");
        assert!(err.contains(flag) && !err.contains("panicked"), "{full:?}: {err}");
    }
}

#[test]
fn the_log_shows_request_bytes_escaped() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenar"))
        .args(["serve", "--addr", "127.0.0.1:0", "--token", "tok", "--read-timeout", "5"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let addr = loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("serve ended before listening: {seen}");
        }
        seen.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("serving on http://") {
            break rest.split('/').next().unwrap().to_string();
        }
    };
    let ask = |request: &[u8]| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(request).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    // A terminal escape (clear screen, set the window title) and a NUL in the request line, and
    // in a path that is a valid request.
    let a = ask(b"GET /\x1b[2J\x1b]0;owned\x07\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    let a = ask(b"GET /%1b[2J HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(a.starts_with("HTTP/1.1 401"), "{a}");
    let a = ask(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer tok\r\n\r\n");
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    // The server logs a request after answering it: give the last line time to be written.
    std::thread::sleep(Duration::from_millis(1000));
    child.kill().unwrap();
    let mut log = Vec::new();
    err.read_to_end(&mut log).unwrap();
    child.wait().unwrap();
    let text = String::from_utf8_lossy(&log);
    assert!(!log.iter().any(|&b| b < 0x20 && b != b'\n' || b == 0x7f), "control bytes in the log: {text:?}");
    assert!(text.contains("\\x1b[2J\\x1b]0;owned\\x07\\x00") && text.contains("-> 400"), "{text}");
    assert!(text.contains("GET /api/info -> 200"), "{text}");
}
