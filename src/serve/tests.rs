use super::*;
use crate::pipeline::bundle::SamplingDefaults;
use std::io::Write;
use std::net::TcpStream;
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
    assert_eq!(v["max_refs"], 2);
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

    let mut r = demo_request();
    let third = r["refs"][0].clone();
    r["refs"].as_array_mut().unwrap().push(third);
    let (_, msg) = refused(r);
    assert!(msg.contains("invalid refs") && msg.contains("at most 2"), "{msg}");

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

/// Send one raw HTTP request; the status and body of the answer.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    s.write_all(request).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, raw[split + 4..].to_vec())
}

/// Run a server on a free port for `max` requests while `client` talks to it.
fn with_server(max: usize, client: impl FnOnce(SocketAddr)) {
    let server = WebServer::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| server.run(app(), Some(max)));
        client(addr);
        handle.join().unwrap().unwrap();
    });
}

#[test]
fn the_server_answers_over_http() {
    with_server(3, |addr| {
        let (status, body) = http(addr, b"GET /api/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["image_size"], 64);

        let json = b"{\"refs\": []}";
        let mut req = format!("POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", json.len()).into_bytes();
        req.extend_from_slice(json);
        let (status, body) = http(addr, &req);
        assert_eq!(status, 400);
        assert!(String::from_utf8_lossy(&body).contains("prompt"));

        // Announced too large: refused before anything is read.
        let req = format!("POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{}}", MAX_BODY + 1);
        let (status, _) = http(addr, req.as_bytes());
        assert_eq!(status, 413);
    });
    assert!(WebServer::bind("no-such-host-name.invalid:80").is_err());
}

#[test]
fn a_stalled_upload_does_not_hold_up_other_requests() {
    with_server(2, |addr| {
        // Announces 5000 bytes, sends one, and waits (tiny_http reads bodies of up to 1 KiB
        // itself before handing the request over; a longer one is read by the server's
        // reader thread).
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled.write_all(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (status, _) = http(addr, b"GET /api/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_eq!(status, 200);
        drop(stalled);
    });
}
