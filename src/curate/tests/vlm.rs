//! Tests of the VLM filter against a mock OpenAI-compatible server on 127.0.0.1 (one thread per
//! connection): what each request holds, how every kind of answer is decided, resumption, and
//! an unreachable endpoint.

use super::{pattern, temp_dir, write_sample};
use crate::curate::vlm::{self, completions_url, judge, prompt_text, VlmOptions, PROMPT_TEMPLATE};
use crate::curate::report::Report;
use crate::data::{Dataset, OpenOptions};
use base64::Engine;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the mock server saw it.
struct Seen {
    method: String,
    path: String,
    body: Value,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// The text part of a request (the question), if any.
fn question(body: &Value) -> String {
    body["messages"][0]["content"]
        .as_array()
        .and_then(|c| c.iter().find(|p| p["type"] == "text"))
        .and_then(|p| p["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
}

fn chat(content: Value) -> String {
    json!({"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})
        .to_string()
}

/// Read one HTTP request from `stream`: its method, path and body.
fn read_request(stream: &TcpStream) -> (String, String, Vec<u8>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut len = 0;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap() == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
        }
    }
    let mut raw = vec![0; len];
    reader.read_exact(&mut raw).unwrap();
    (method, path, raw)
}

/// Read one request, log it, and answer as its description asks ("answer yes", ...).
fn serve_one(stream: TcpStream, log: Log) {
    let (method, path, raw) = read_request(&stream);
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let q = question(&body);
    log.lock().unwrap().push(Seen { method, path, body });
    let mut stream = stream;
    if q.contains("answer slow") {
        std::thread::sleep(Duration::from_secs(3));
    }
    if q.contains("answer 500") {
        respond(&mut stream, "500 Internal Server Error", "{\"error\": \"model crashed\"}");
    } else if q.contains("answer garbage") {
        respond(&mut stream, "200 OK", "<html>oops");
    } else if q.contains("answer parts") {
        respond(&mut stream, "200 OK", &chat(json!([{"type": "text", "text": "YES"}, {"type": "text", "text": ", they are"}])));
    } else {
        let reply = if q.contains("answer no") {
            "No."
        } else if q.contains("answer maybe") {
            "Maybe, hard to say."
        } else {
            "  Yes, both subjects are there."
        };
        respond(&mut stream, "200 OK", &chat(json!(reply)));
    }
}

/// A mock server; its URL and the log of the requests it saw.
fn mock() -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log: Log = Arc::default();
    let l = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let l = l.clone();
            std::thread::spawn(move || serve_one(stream, l));
        }
    });
    (url, log)
}

fn decode_data_url(url: &str) -> Vec<u8> {
    let b64 = url.strip_prefix("data:image/png;base64,").expect("a PNG data URL");
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

#[test]
fn endpoint_urls_and_replies() {
    assert_eq!(completions_url("http://h:1").unwrap(), "http://h:1/v1/chat/completions");
    assert_eq!(completions_url(" http://h:1/ ").unwrap(), "http://h:1/v1/chat/completions");
    assert_eq!(completions_url("http://h:1/v1").unwrap(), "http://h:1/v1/chat/completions");
    assert_eq!(completions_url("http://h:1/v1/chat/completions").unwrap(), "http://h:1/v1/chat/completions");
    for (bad, why) in [("https://h:1", "https"), ("h:1", "http://HOST:PORT"), ("http://", "no host")] {
        let e = completions_url(bad).unwrap_err().to_string();
        assert!(e.contains("--endpoint") && e.contains(bad.trim()) && e.contains(why), "{e}");
    }
    assert!(judge(" YES.").0 && judge("yes").0 && judge("Yes, it fits").0);
    assert!(!judge("No").0 && !judge("no, the colours are odd").0 && !judge("").0 && !judge("I think yes").0);
    assert!(judge("No").1.contains("No") && judge("maybe").1.contains("neither"));
    assert_eq!(vlm::reply_text(&chat(json!("Yes"))).unwrap(), "Yes");
    assert!(vlm::reply_text("{\"choices\": []}").unwrap_err().contains("malformed"));
    assert!(vlm::reply_text("nope").unwrap_err().contains("not JSON"));
    let q = prompt_text(PROMPT_TEMPLATE, "a dog left of a cat");
    assert!(q.starts_with("Is the last two image contains in the first image?"));
    assert!(q.ends_with("fit the description: a dog left of a cat. Reply Yes or No."), "{q}");
}

#[test]
fn vlm_filter_asks_decides_and_resumes() {
    let root = temp_dir("vlm");
    let data = root.join("data");
    let answers = ["yes", "no", "500", "garbage", "maybe", "parts", "slow", "unread"];
    for (i, a) in answers.iter().enumerate() {
        let k = i as u32 * 3;
        let refs = [pattern(k + 1, 6, 5), pattern(k + 2, 5, 6)];
        write_sample(&data, &format!("s_{}", i + 1), &pattern(k, 8, 7), &refs, &format!("two things, answer {a}"), true);
    }
    // A WebP reference travels re-encoded as PNG; an unreadable one is a drop with no request.
    let s6 = data.join("s_6/ref");
    std::fs::remove_file(s6.join("1.png")).unwrap();
    image::DynamicImage::ImageRgb8(pattern(77, 5, 6)).save_with_format(s6.join("1.webp"), image::ImageFormat::WebP).unwrap();
    std::fs::write(data.join("s_8/ref/0.png"), b"\x89PNG broken").unwrap();
    let ds = Dataset::open_quiet(&data, &OpenOptions::default()).unwrap();
    assert_eq!(ds.len(), 8);

    let (url, log) = mock();
    let out = root.join("out");
    let mut opts = VlmOptions::new(url.clone(), "test-vlm");
    opts.timeout = Duration::from_millis(700);
    let sum = vlm::run_vlm(&ds, &opts, &out, None).unwrap();
    assert_eq!((sum.total, sum.decided, sum.resumed, sum.kept, sum.dropped, sum.errors), (8, 8, 0, 2, 6, 4));

    let seen = log.lock().unwrap();
    assert_eq!(seen.len(), 7, "every readable sample is asked once");
    for r in seen.iter() {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v1/chat/completions"));
        let b = &r.body;
        assert_eq!(b["model"], "test-vlm");
        assert_eq!(b["temperature"].as_f64(), Some(0.0));
        assert_eq!(b["max_tokens"], 100);
        assert_eq!(b["messages"].as_array().unwrap().len(), 1);
        assert_eq!(b["messages"][0]["role"], "user");
        let content = b["messages"][0]["content"].as_array().unwrap();
        assert_eq!(content.len(), 4);
        let q = question(b);
        let s = ds.samples.iter().find(|s| q.contains(&format!("{}.", s.prompt))).expect("the description is in the question");
        assert_eq!(q, prompt_text(PROMPT_TEMPLATE, &s.prompt));
        let files: Vec<&std::path::Path> = std::iter::once(s.target.as_deref().unwrap()).chain(s.refs.iter().map(|p| p.as_path())).collect();
        for (part, file) in content[..3].iter().zip(&files) {
            assert_eq!(part["type"], "image_url");
            let png = decode_data_url(part["image_url"]["url"].as_str().unwrap());
            assert!(png.starts_with(b"\x89PNG"));
            let sent = image::load_from_memory(&png).unwrap().to_rgb8();
            assert_eq!(sent, image::open(file).unwrap().to_rgb8(), "{}", file.display());
            if file.extension().unwrap() == "png" {
                assert_eq!(png, std::fs::read(file).unwrap(), "a PNG file is sent as it is");
            }
        }
        assert_eq!(content[3]["type"], "text");
    }
    drop(seen);

    let label = vlm::filter_label("test-vlm");
    let report = Report::open(&out.join(vlm::REPORT), &label).unwrap();
    let v = |i: usize| report.get(&format!("s_{i}")).unwrap().clone();
    assert!(v(1).kept && !v(1).error && v(1).reply.as_deref() == Some("  Yes, both subjects are there."));
    assert!(!v(2).kept && !v(2).error && v(2).reply.as_deref() == Some("No."));
    assert!(!v(3).kept && v(3).error && v(3).reason.contains("HTTP 500") && v(3).reason.contains("model crashed"), "{:?}", v(3));
    assert!(!v(4).kept && v(4).error && v(4).reason.contains("malformed") && v(4).reason.contains("<html>oops"), "{:?}", v(4));
    assert!(!v(5).kept && !v(5).error && v(5).reason.contains("neither"), "{:?}", v(5));
    assert!(v(6).kept && v(6).reply.as_deref() == Some("YES, they are"), "{:?}", v(6));
    assert!(!v(7).kept && v(7).error && v(7).reason.contains("failed"), "{:?}", v(7));
    assert!(!v(8).kept && v(8).error && v(8).reason.contains("s_8/ref/0.png") && v(8).reply.is_none(), "{:?}", v(8));
    drop(report);
    let kept = Dataset::open_quiet(&out.join(vlm::KEPT), &OpenOptions::default()).unwrap();
    let ids: Vec<&str> = kept.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["s_1", "s_6"]);

    // A rerun asks nothing; --retry-errors asks the failed ones again.
    let again = vlm::run_vlm(&ds, &opts, &out, None).unwrap();
    assert_eq!((again.decided, again.resumed, again.kept), (0, 8, 2));
    assert_eq!(log.lock().unwrap().len(), 7);
    let lines = std::fs::read_to_string(out.join(vlm::REPORT)).unwrap().lines().count();
    assert_eq!(lines, 8);
    let retry = VlmOptions { retry_errors: true, ..opts.clone() };
    assert_eq!(vlm::run_vlm(&ds, &retry, &out, None).unwrap().decided, 4);
    assert_eq!(log.lock().unwrap().len(), 10);
    // Another model into the same report is refused.
    let err = vlm::run_vlm(&ds, &VlmOptions::new(url, "other"), &out, None).unwrap_err().to_string();
    assert!(err.contains("vlm.jsonl") && err.contains("model=test-vlm"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn unreachable_endpoint_drops_every_sample_with_the_reason() {
    let root = temp_dir("vlm-down");
    let data = root.join("data");
    for i in 1..=2 {
        write_sample(&data, &format!("s_{i}"), &pattern(i, 6, 6), &[pattern(i + 1, 6, 6), pattern(i + 2, 6, 6)], "a pair", true);
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ds = Dataset::open_quiet(&data, &OpenOptions::default()).unwrap();
    let mut opts = VlmOptions::new(format!("http://127.0.0.1:{port}"), "m");
    opts.timeout = Duration::from_secs(5);
    let out = root.join("out");
    let sum = vlm::run_vlm(&ds, &opts, &out, None).unwrap();
    assert_eq!((sum.decided, sum.kept, sum.dropped, sum.errors), (2, 0, 2, 2));
    let report = Report::open(&out.join(vlm::REPORT), &vlm::filter_label("m")).unwrap();
    let r = &report.get("s_1").unwrap().reason;
    assert!(r.contains(&format!("127.0.0.1:{port}/v1/chat/completions")) && r.contains("failed"), "{r}");
    // The kept manifest declares the dataset's folder as its root and lists no sample.
    let kept = std::fs::read_to_string(out.join(vlm::KEPT)).unwrap();
    assert_eq!(kept, format!("#root {}\n", data.canonicalize().unwrap().display()));
    // Bad settings are errors before anything is asked.
    assert!(vlm::run_vlm(&ds, &VlmOptions::new("https://x:1", "m"), &root.join("o2"), None).unwrap_err().to_string().contains("https"));
    assert!(vlm::run_vlm(&ds, &VlmOptions::new("http://x:1", " "), &root.join("o2"), None).unwrap_err().to_string().contains("--model"));
    let zero = VlmOptions { timeout: Duration::ZERO, ..opts };
    assert!(vlm::run_vlm(&ds, &zero, &root.join("o2"), None).unwrap_err().to_string().contains("--timeout-s"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn concurrent_requests_overlap_and_every_sample_is_decided_once() {
    let root = temp_dir("vlm-concurrent");
    let data = root.join("data");
    for i in 1..=6u32 {
        write_sample(&data, &format!("s_{i}"), &pattern(i, 6, 6), &[pattern(i + 1, 6, 6), pattern(i + 2, 6, 6)], "a pair", true);
    }
    let ds = Dataset::open_quiet(&data, &OpenOptions::default()).unwrap();
    // A server that answers Yes after 200 ms and records the most requests it held at once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (now, most, seen) = (Arc::new(Mutex::new(0usize)), Arc::new(Mutex::new(0usize)), Arc::new(Mutex::new(0usize)));
    let (n, m, k) = (now.clone(), most.clone(), seen.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (n, m, k) = (n.clone(), m.clone(), k.clone());
            std::thread::spawn(move || {
                read_request(&stream);
                {
                    let mut now = n.lock().unwrap();
                    *now += 1;
                    let mut most = m.lock().unwrap();
                    *most = (*most).max(*now);
                }
                std::thread::sleep(Duration::from_millis(200));
                *n.lock().unwrap() -= 1;
                *k.lock().unwrap() += 1;
                respond(&mut { stream }, "200 OK", &chat(json!("Yes")));
            });
        }
    });
    let out = root.join("out");
    let opts = VlmOptions { concurrency: 3, ..VlmOptions::new(url.clone(), "m") };
    let sum = vlm::run_vlm(&ds, &opts, &out, None).unwrap();
    assert_eq!((sum.decided, sum.kept, sum.errors), (6, 6, 0));
    assert_eq!(*seen.lock().unwrap(), 6);
    assert!(*most.lock().unwrap() >= 2, "requests never overlapped");
    let report = std::fs::read_to_string(out.join(vlm::REPORT)).unwrap();
    assert_eq!(report.lines().count(), 6);
    let kept = Dataset::open_quiet(&out.join(vlm::KEPT), &OpenOptions::default()).unwrap();
    assert_eq!(kept.samples.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["s_1", "s_2", "s_3", "s_4", "s_5", "s_6"]);
    let zero = VlmOptions { concurrency: 0, ..VlmOptions::new(url, "m") };
    assert!(vlm::run_vlm(&ds, &zero, &root.join("o2"), None).unwrap_err().to_string().contains("--concurrency"));
    std::fs::remove_dir_all(&root).unwrap();
}
