use super::*;
use crate::pipeline::bundle::SamplingDefaults;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use std::sync::OnceLock;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/demo");

fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| App::new(Bundle::builtin(&candle_core::Device::Cpu).unwrap()))
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
}

fn data_url(bytes: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The demo scene as a request body.
fn demo_request() -> serde_json::Value {
    serde_json::json!({
        "refs": [data_url(&fixture("ref0.png")), data_url(&fixture("ref1.png"))],
        "background": data_url(&fixture("background.png")),
        "mask": data_url(&fixture("mask.png")),
        "prompt": "a heart above a square",
        "seed": 3,
    })
}

fn post(body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = app().handle("POST", "/api/generate", body.to_string().as_bytes());
    assert_eq!(r.content_type, "application/json");
    (r.status, serde_json::from_slice(&r.body).unwrap())
}

/// The status and error message of a request the server must refuse.
fn refused(body: serde_json::Value) -> (u16, String) {
    let (status, v) = post(&body);
    (status, v["error"].as_str().unwrap_or_default().to_string())
}

#[test]
fn data_urls_decode_and_bad_ones_are_named() {
    assert_eq!(data_url_bytes("data:image/png;base64,AAEC").unwrap(), vec![0, 1, 2]);
    assert_eq!(data_url_bytes("AAEC").unwrap(), vec![0, 1, 2]);
    assert!(data_url_bytes("data:image/png,abc").unwrap_err().contains("base64"));
    assert!(data_url_bytes("data:image/png;base64").unwrap_err().contains("comma"));
    assert!(data_url_bytes("data:image/png;base64,@@@").unwrap_err().contains("base64"));
}

#[test]
fn pages_info_and_demo_images_are_served() {
    let page = app().handle("GET", "/", b"");
    assert_eq!((page.status, page.content_type), (200, "text/html; charset=utf-8"));
    assert!(String::from_utf8(page.body).unwrap().contains("/api/generate"));

    let info = app().handle("GET", "/api/info?x=1", b"");
    assert_eq!(info.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(v["image_size"], 64);
    assert_eq!(v["max_refs"], app().bundle().config().max_refs);
    assert_eq!(v["itd"], true);
    assert_eq!(v["sampling"]["top_k"], app().bundle().sampling.top_k);

    let demo = app().handle("GET", "/demo/mask.png", b"");
    assert_eq!((demo.status, demo.content_type), (200, "image/png"));
    assert_eq!(demo.body, fixture("mask.png"));

    assert_eq!(app().handle("GET", "/demo/other.png", b"").status, 404);
    assert_eq!(app().handle("GET", "/nothing", b"").status, 404);
    assert_eq!(app().handle("GET", "/api/generate", b"").status, 405);
    assert_eq!(app().handle("DELETE", "/", b"").status, 405);
    assert_eq!(app().handle("POST", "/api/progress", b"").status, 405);
    assert!(App::is_quick("GET", "/api/generate") && App::is_quick("POST", "/api/info"));
    assert!(!App::is_quick("POST", "/api/generate?x=1"));
}

#[test]
fn generation_over_the_api_equals_the_library_call() {
    let (status, v) = post(&demo_request());
    assert_eq!(status, 200, "{v}");
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(v["itd"], "exact");
    assert_eq!(v["itd_refs"].as_array().unwrap().len(), 0);
    let png = data_url_bytes(images[0].as_str().unwrap()).unwrap();
    let img = imageio::decode(&png).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));

    // The same request built from the files, as `tokenar generate` builds it.
    let bundle = app().bundle();
    let req = GenerateRequest {
        refs: vec![imageio::load_rgb(format!("{FIXTURES}/ref0.png"), None).unwrap(), imageio::load_rgb(format!("{FIXTURES}/ref1.png"), None).unwrap()],
        background: Some(imageio::load_rgb(format!("{FIXTURES}/background.png"), None).unwrap()),
        mask: Some(imageio::load_mask(format!("{FIXTURES}/mask.png"), None).unwrap()),
        prompt: "a heart above a square".into(),
        options: SamplingDefaults::options(&bundle.sampling, 3),
        itd: None,
        num_samples: 1,
        paste_back: false,
        decode_itd: false,
    };
    let direct = generate(bundle, &req, None).unwrap();
    assert_eq!(images[0].as_str().unwrap(), png_data_url(&direct.images[0]).unwrap());
    assert_eq!(v["draft_accepted"], direct.stats.draft_accepted);


    // Two samples with their ITD copies: one list of references per image.
    let mut two = demo_request();
    two["num_samples"] = 2.into();
    two["show_itd"] = true.into();
    two["itd"] = "forced".into();
    let (status, v) = post(&two);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["images"].as_array().unwrap().len(), 2);
    assert_eq!(v["itd"], "forced");
    let itd = v["itd_refs"].as_array().unwrap();
    assert_eq!(itd.len(), 2);
    assert!(itd.iter().all(|per| per.as_array().unwrap().len() == 2));
    assert!(v["attention"].is_null(), "no attention unless asked");

    // With `attention`: the figure and each group's mean share (summing to 1) of the first
    // image, the same as the library computes for it.
    let mut a = demo_request();
    a["attention"] = true.into();
    let (status, v) = post(&a);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["images"][0], images[0], "the image does not change");
    let groups = v["attention"]["groups"].as_array().unwrap();
    let names: Vec<&str> = groups.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names[..3], ["ref1", "ref2", "background"]);
    let total: f64 = groups.iter().map(|g| g["share"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");
    let fig = imageio::decode(&data_url_bytes(v["attention"]["figure"].as_str().unwrap()).unwrap()).unwrap();
    let layers = bundle.config().n_layer as u32;
    assert_eq!(fig.height(), (layers + 2) * 98 + 2, "header, one row per layer, the mean");
    let r = crate::pipeline::attention::attention_of(bundle, &req, direct.images[0].clone(), &direct.target_codes[0]).unwrap();
    let mean = r.maps.shares(crate::pipeline::attention::Pick::Mean, crate::pipeline::attention::Pick::Mean).unwrap();
    let want = mean.iter().map(|c| c[0] as f64).sum::<f64>() / mean.len() as f64;
    assert!((groups[0]["share"].as_f64().unwrap() - want).abs() < 1e-6);
}

#[test]
fn progress_follows_the_generations() {
    // An app of its own: the shared one serves other tests at the same time.
    let own = App::new(Bundle::builtin(&candle_core::Device::Cpu).unwrap());
    let progress = || -> serde_json::Value { serde_json::from_slice(&own.handle("GET", "/api/progress", b"").body).unwrap() };
    assert_eq!(progress(), serde_json::json!({"busy": false, "done": 0, "total": 0, "queued": 0}));
    assert_eq!(own.handle("POST", "/api/generate", demo_request().to_string().as_bytes()).status, 200);
    // Every token of the generation decoded, nothing running.
    let p = progress();
    assert_eq!(p["busy"], false);
    assert!(p["total"].as_u64().unwrap() >= 64, "{p}");
    assert_eq!(p["done"], p["total"]);
    // A generation that fails once started (ITD off on an ITD model) leaves it idle too.
    let mut r = demo_request();
    r["itd"] = "off".into();
    assert_eq!(own.handle("POST", "/api/generate", r.to_string().as_bytes()).status, 400);
    assert_eq!(progress()["busy"], false);
}

#[test]
fn bad_requests_are_refused_naming_the_field() {
    let mut r = demo_request();
    r.as_object_mut().unwrap().remove("prompt");
    let (status, msg) = refused(r);
    assert_eq!(status, 400);
    assert!(msg.contains("prompt"), "{msg}");

    let mut r = demo_request();
    r["refs"][1] = data_url(b"not an image").into();
    let (status, msg) = refused(r);
    assert_eq!(status, 400);
    assert!(msg.contains("refs[1]") && msg.contains("decode"), "{msg}");

    let mut r = demo_request();
    r["refs"][0] = "data:image/png;base64,%%%".into();
    let (_, msg) = refused(r);
    assert!(msg.contains("refs[0]") && msg.contains("base64"), "{msg}");

    // A mask of another size than the background.
    let small = image::DynamicImage::ImageLuma8(image::GrayImage::new(8, 4));
    let mut r = demo_request();
    r["mask"] = data_url(&crate::data::instructar::png_bytes(&small).unwrap()).into();
    let (status, msg) = refused(r);
    assert_eq!(status, 400);
    assert!(msg.contains("invalid mask") && msg.contains("8x4"), "{msg}");

    let mut r = demo_request();
    r["num_samples"] = (MAX_SAMPLES + 1).into();
    let (_, msg) = refused(r);
    assert!(msg.contains("num_samples"), "{msg}");

    let mut r = demo_request();
    r["num_samples"] = 0.into();
    let (_, msg) = refused(r);
    assert!(msg.contains("invalid num_samples"), "{msg}");

    // One reference more than the model takes: refused, naming its maximum.
    let max = app().bundle().config().max_refs;
    let mut r = demo_request();
    let first = r["refs"][0].clone();
    let refs = r["refs"].as_array_mut().unwrap();
    refs.resize(max + 1, first);
    let (_, msg) = refused(r);
    assert!(msg.contains("invalid refs") && msg.contains(&format!("at most {max}")), "{msg}");

    let mut r = demo_request();
    r["itd"] = "off".into();
    let (_, msg) = refused(r);
    assert!(msg.contains("invalid itd"), "{msg}");

    let mut r = demo_request();
    r["top_p"] = 2.0.into();
    let (status, _) = refused(r);
    assert_eq!(status, 400);

    let mut r = demo_request();
    r["colour"] = "red".into();
    let (_, msg) = refused(r);
    assert!(msg.contains("colour"), "{msg}");

    let r = app().handle("POST", "/api/generate", b"{not json");
    assert_eq!(r.status, 400);
}

/// An answer read off the wire: status, head (status line and headers) and body.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn parse_answer(raw: &[u8]) -> Answer {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no header in `{}`", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Answer { status, head, body: raw[split + 4..].to_vec() }
}

/// Read what the server sends until it closes (at most 20 s).
fn read_answer(s: &mut TcpStream) -> Answer {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_answer(&raw)
}

/// Send one raw HTTP request; the answer.
fn http(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request).unwrap();
    read_answer(&mut s)
}

/// A request for `target` with the given headers (Host: localhost unless one is given).
fn request(method: &str, target: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("host:")) {
        r.push_str("Host: localhost\r\n");
    }
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if !body.is_empty() {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

fn quick_options() -> ServeOptions {
    ServeOptions { read_timeout: Duration::from_secs(2), ..ServeOptions::default() }
}

/// Run a server of `app` on a free port while `client` talks to it; stopped after.
fn with_server_of(app: &App, opts: ServeOptions, client: impl FnOnce(SocketAddr)) {
    let server = WebServer::bind("127.0.0.1:0", opts).unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| server.run(app));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| client(addr)));
        server.stop();
        handle.join().unwrap().unwrap();
        if let Err(p) = outcome {
            std::panic::resume_unwind(p);
        }
    });
}

fn with_server(opts: ServeOptions, client: impl FnOnce(SocketAddr)) {
    with_server_of(app(), opts, client)
}

fn head_of(method: &str, target: &str, headers: &[(&str, &str)]) -> http::Head {
    http::Head { method: method.into(), target: target.into(), headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect() }
}

#[test]
fn the_server_answers_over_http() {
    with_server(quick_options(), |addr| {
        let a = http(addr, &request("GET", "/api/info", &[&format!("Host: {addr}")], b""));
        assert_eq!(a.status, 200);
        assert!(a.head.contains("Connection: close") && a.head.contains("Content-Type: application/json"), "{}", a.head);
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["image_size"], 64);

        let page = http(addr, &request("GET", "/", &[], b""));
        assert_eq!(page.status, 200);
        assert!(page.text().contains("Authorization"));

        let a = http(addr, &request("POST", "/api/generate", &["Content-Type: application/json"], b"{\"refs\": []}"));
        assert_eq!(a.status, 400);
        assert!(a.text().contains("prompt"), "{}", a.text());

        // Announced too large: refused before anything is read.
        let r = format!("POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{}}", MAX_BODY + 1);
        assert_eq!(http(addr, r.as_bytes()).status, 413);
        // Chunked bodies are not read.
        let r = "POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(http(addr, r.as_bytes()).status, 411);

        // `Expect: 100-continue`: the body is asked for once the head passed.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n").unwrap();
        let mut interim = [0u8; 25];
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"{}").unwrap();
        assert_eq!(read_answer(&mut s).status, 400);
    });
    assert!(WebServer::bind("no-such-host-name.invalid:80", ServeOptions::default()).is_err());
}

#[test]
fn heads_are_parsed_strictly() {
    let h = http::parse_head(b"GET /a?b=1 HTTP/1.1\r\nHost: x:1\r\ncontent-length:  5 ").unwrap();
    assert_eq!((h.method.as_str(), h.path(), h.header("HOST")), ("GET", "/a", Some("x:1")));
    assert_eq!(h.content_length().unwrap(), 5);
    for bad in [&b"GET /a b HTTP/1.1"[..], b"GET /\x1b[2J HTTP/1.1", b"GET /\0 HTTP/1.1", b"get / HTTP/1.1", b"GET / HTTP/2", b"GET http://x/ HTTP/1.1", b"GET / HTTP/1.1\r\nno colon", b"GET / HTTP/1.1\r\nX: a\x07b", b"GET / HTTP/1.1\r\nbad name: v", b"\xff / HTTP/1.1"] {
        let e = http::parse_head(bad).unwrap_err();
        assert!(!e.bytes().any(|b| b < 0x20), "{e:?}");
    }
    let twice = http::parse_head(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2").unwrap();
    assert_eq!(twice.content_length().unwrap_err().status, 400);
    let word = http::parse_head(b"POST / HTTP/1.1\r\nContent-Length: many").unwrap();
    assert_eq!(word.content_length().unwrap_err().status, 400);
    let chunked = http::parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked").unwrap();
    assert_eq!(chunked.content_length().unwrap_err().status, 411);
}

#[test]
fn a_stalled_request_is_dropped_at_the_read_timeout() {
    let opts = ServeOptions { read_timeout: Duration::from_millis(1000), workers: 2, ..ServeOptions::default() };
    with_server(opts, |addr| {
        // Announces 5000 bytes, sends one, and waits: answered 408 and closed at the timeout.
        let t0 = std::time::Instant::now();
        let mut body_stalled = TcpStream::connect(addr).unwrap();
        body_stalled.write_all(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{").unwrap();
        // Half a head, then a byte every 200 ms (each read would succeed on its own).
        let mut dripping = TcpStream::connect(addr).unwrap();
        dripping.write_all(b"GET /api/info HTTP/1.1\r\nHo").unwrap();
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(200));
            let _ = dripping.write_all(b"s");
        }
        // Meanwhile, with both threads taken, the next connection waits its turn.
        let a = read_answer(&mut body_stalled);
        let waited = t0.elapsed();
        assert_eq!(a.status, 408, "{}", a.text());
        assert!(a.text().contains("1 s"), "{}", a.text());
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(10), "{waited:?}");
        assert_eq!(read_answer(&mut dripping).status, 408);
        assert!(t0.elapsed() < Duration::from_secs(10));
        // The threads are free again.
        assert_eq!(http(addr, &request("GET", "/api/info", &[], b"")).status, 200);
    });
}

#[test]
fn a_stalled_upload_does_not_hold_up_other_requests() {
    with_server(quick_options(), |addr| {
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled.write_all(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(http(addr, &request("GET", "/api/info", &[], b"")).status, 200);
        drop(stalled);
    });
}

#[test]
fn connections_beyond_the_pool_get_503() {
    let opts = ServeOptions { read_timeout: Duration::from_secs(6), workers: 2, ..ServeOptions::default() };
    with_server(opts, |addr| {
        // Idle connections: two are read (until the timeout), two wait for a thread, the
        // rest are answered 503 at once.
        let mut idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(600));
        idle.extend((0..8).map(|_| TcpStream::connect(addr).unwrap()));
        std::thread::sleep(Duration::from_millis(600));
        let mut refused = 0;
        for s in &mut idle {
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut raw = Vec::new();
            match s.read_to_end(&mut raw) {
                Ok(_) => {
                    let a = parse_answer(&raw);
                    assert_eq!(a.status, 503);
                    assert!(a.head.contains("Retry-After: 1"), "{}", a.head);
                    refused += 1;
                }
                Err(e) => assert!(matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{e}"),
            }
        }
        assert_eq!(refused, 6);
        drop(idle);
        // Closed connections free their threads (once the server has seen them close).
        let answered = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            http(addr, &request("GET", "/api/info", &[], b"")).status == 200
        });
        assert!(answered);
    });
}

#[test]
fn a_full_generation_queue_answers_503() {
    let own = App::new(Bundle::builtin(&candle_core::Device::Cpu).unwrap());
    let opts = ServeOptions { queue: 2, ..quick_options() };
    with_server_of(&own, opts, |addr| {
        let post = || request("POST", "/api/generate", &["Content-Type: application/json"], b"{\"refs\": []}");
        // Two requests waiting (as if received): the next generation is refused before its
        // body is read; everything else is still answered.
        own.queued.store(2, Ordering::SeqCst);
        let a = http(addr, &post());
        assert_eq!(a.status, 503, "{}", a.text());
        assert!(a.head.contains("Retry-After: 10") && a.text().contains("2 generations"), "{} {}", a.head, a.text());
        assert_eq!(http(addr, &request("GET", "/api/progress", &[], b"")).status, 200);
        own.queued.store(1, Ordering::SeqCst);
        assert_eq!(http(addr, &post()).status, 400);
        // The place it took was given back.
        assert_eq!(own.queued.load(Ordering::SeqCst), 1);
        own.queued.store(0, Ordering::SeqCst);
    });
}

#[test]
fn posts_must_be_json() {
    let access = Access::new("127.0.0.1".parse().unwrap(), &ServeOptions::default());
    let post = |ct: Option<&str>| {
        let mut h = vec![("Host", "localhost")];
        if let Some(ct) = ct {
            h.push(("Content-Type", ct));
        }
        access.check(&head_of("POST", "/api/generate", &h))
    };
    for bad in [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data; boundary=x"), None] {
        let r = post(bad).unwrap_err();
        assert_eq!(r.status, 415, "{bad:?}");
        assert!(String::from_utf8_lossy(&r.body).contains("application/json"));
    }
    assert!(post(Some("application/json")).is_ok());
    assert!(post(Some("Application/JSON; charset=utf-8")).is_ok());
    with_server(quick_options(), |addr| {
        // What a cross-site form or a no-preflight fetch sends.
        let a = http(addr, &request("POST", "/api/generate", &["Content-Type: text/plain"], b"{\"refs\": []}"));
        assert_eq!(a.status, 415, "{}", a.text());
    });
}

#[test]
fn hosts_and_origins_are_checked() {
    let get = |access: &Access, host: &str| access.check(&head_of("GET", "/api/info", &[("Host", host)])).map_err(|r| r.status);
    let local = Access::new("127.0.0.1".parse().unwrap(), &ServeOptions::default());
    for ok in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST.", "localhost", "[::1]:8080", "127.0.0.2"] {
        assert_eq!(get(&local, ok), Ok(()), "{ok}");
    }
    for bad in ["evil.example:8080", "evil.example", "10.1.2.3", "localhost.evil.example", "[::1", ""] {
        assert_eq!(get(&local, bad), Err(421), "{bad}");
    }
    let r = local.check(&head_of("GET", "/", &[("Host", "rebound.example:8080")])).unwrap_err();
    let msg = String::from_utf8_lossy(&r.body).into_owned();
    assert!(msg.contains("rebound.example") && msg.contains("--allow-host"), "{msg}");
    assert_eq!(local.check(&head_of("GET", "/", &[])).unwrap_err().status, 400);

    let named = Access::new("127.0.0.1".parse().unwrap(), &ServeOptions { allow_hosts: vec!["MyBox.lan".into()], ..ServeOptions::default() });
    assert_eq!(get(&named, "mybox.lan:8080"), Ok(()));
    assert_eq!(get(&named, "other.lan"), Err(421));
    let any = Access::new("127.0.0.1".parse().unwrap(), &ServeOptions { allow_hosts: vec!["*".into()], ..ServeOptions::default() });
    assert_eq!(get(&any, "whatever.example"), Ok(()));
    // Bound to every address: any address, still no foreign name.
    let all = Access::new("0.0.0.0".parse().unwrap(), &ServeOptions::default());
    assert_eq!(get(&all, "192.168.1.20:8080"), Ok(()));
    assert_eq!(get(&all, "evil.example"), Err(421));
    let one = Access::new("192.168.1.20".parse().unwrap(), &ServeOptions::default());
    assert_eq!(get(&one, "192.168.1.20:8080"), Ok(()));
    assert_eq!(get(&one, "192.168.1.21:8080"), Err(421));

    // A page of another origin (its request sent by the visitor's browser) is refused.
    let from = |origin: &str| local.check(&head_of("GET", "/api/info", &[("Host", "localhost:8080"), ("Origin", origin)])).map_err(|r| r.status);
    assert_eq!(from("http://localhost:8080"), Ok(()));
    assert_eq!(from("http://127.0.0.1:8080"), Ok(()));
    assert_eq!(from("https://evil.example"), Err(403));
    assert_eq!(from("null"), Err(403));

    with_server(quick_options(), |addr| {
        let a = http(addr, &request("GET", "/api/info", &["Host: attacker.example"], b""));
        assert_eq!(a.status, 421, "{}", a.text());
        let a = http(addr, &request("POST", "/api/generate", &["Origin: http://attacker.example", "Content-Type: application/json"], b"{}"));
        assert_eq!(a.status, 403, "{}", a.text());
    });
}

#[test]
fn the_token_is_required_when_set() {
    let opts = ServeOptions { token: Some("s3cret-token".into()), ..quick_options() };
    let access = Access::new("127.0.0.1".parse().unwrap(), &opts);
    let get = |path: &str, auth: Option<&str>| {
        let mut h = vec![("Host", "localhost")];
        if let Some(a) = auth {
            h.push(("Authorization", a));
        }
        access.check(&head_of("GET", path, &h)).map_err(|r| r.status)
    };
    for path in ["/api/info", "/api/progress", "/nothing"] {
        assert_eq!(get(path, None), Err(401), "{path}");
        assert_eq!(get(path, Some("Bearer wrong")), Err(401), "{path}");
        assert_eq!(get(path, Some("Bearer s3cret-toke")), Err(401), "{path}");
        assert_eq!(get(path, Some("Basic s3cret-token")), Err(401), "{path}");
        assert_eq!(get(path, Some("Bearer s3cret-token")), Ok(()), "{path}");
    }
    // The page and its demo images load without it (the page then asks for it).
    assert_eq!(get("/", None), Ok(()));
    assert_eq!(get("/demo/mask.png", None), Ok(()));
    let without = Access::new("127.0.0.1".parse().unwrap(), &quick_options());
    assert!(without.check(&head_of("GET", "/api/info", &[("Host", "localhost")])).is_ok());

    with_server(opts, |addr| {
        let a = http(addr, &request("GET", "/api/info", &[], b""));
        assert_eq!(a.status, 401);
        assert!(a.head.contains("WWW-Authenticate: Bearer") && a.text().contains("#token="), "{} {}", a.head, a.text());
        let a = http(addr, &request("POST", "/api/generate", &["Content-Type: application/json"], b"{}"));
        assert_eq!(a.status, 401);
        assert_eq!(http(addr, &request("GET", "/api/info", &["Authorization: Bearer s3cret-token"], b"")).status, 200);
        assert_eq!(http(addr, &request("GET", "/", &[], b"")).status, 200);
    });
}

#[test]
fn listening_beyond_loopback_needs_a_token_or_a_flag() {
    let err = WebServer::bind("0.0.0.0:0", ServeOptions::default()).err().unwrap().to_string();
    assert!(err.contains("--token") && err.contains("--allow-no-token"), "{err}");
    assert!(WebServer::bind("0.0.0.0:0", ServeOptions { token: Some("t".into()), ..ServeOptions::default() }).is_ok());
    assert!(WebServer::bind("0.0.0.0:0", ServeOptions { allow_no_token: true, ..ServeOptions::default() }).is_ok());
    assert!(WebServer::bind("127.0.0.1:0", ServeOptions::default()).is_ok());
    for (opts, flag) in [
        (ServeOptions { workers: 0, ..ServeOptions::default() }, "--workers"),
        (ServeOptions { queue: MAX_QUEUE + 1, ..ServeOptions::default() }, "--queue"),
        (ServeOptions { read_timeout: Duration::ZERO, ..ServeOptions::default() }, "--read-timeout"),
        (ServeOptions { token: Some("two words".into()), ..ServeOptions::default() }, "--token"),
        (ServeOptions { allow_hosts: vec!["a/b".into()], ..ServeOptions::default() }, "--allow-host"),
    ] {
        let err = WebServer::bind("127.0.0.1:0", opts).err().unwrap().to_string();
        assert!(err.contains(flag), "{err}");
    }
}

#[test]
fn logged_bytes_are_escaped() {
    assert_eq!(http::escape(b"/ok?a=1"), "/ok?a=1");
    assert_eq!(http::escape(b"/\x1b[2J\x00\x07\r\n\xff\\"), "/\\x1b[2J\\x00\\x07\\x0d\\x0a\\xff\\\\");
    let all: Vec<u8> = (0..=255).collect();
    assert!(http::escape(&all).bytes().all(|b| (0x20..0x7f).contains(&b)));
    with_server(quick_options(), |addr| {
        // A request line with an escape sequence and a NUL: refused, and the answer (like the
        // log) shows the bytes escaped.
        let a = http(addr, b"GET /\x1b]0;owned\x07\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(a.status, 400);
        assert!(a.text().contains("\\\\x1b]0;owned\\\\x07\\\\x00"), "{}", a.text());
    });
}
