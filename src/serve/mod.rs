//! `tokenar serve`: a web page for generation and the JSON API behind it, over one loaded
//! bundle.
//!
//! [`App::handle`] maps a request (method, path, body) to a [`Reply`] without any network, so
//! the API is tested directly; [`WebServer`] (`server.rs`) is the HTTP loop around it, on the
//! small HTTP/1.1 reader of `http.rs`. Generations run one at a time (each holds the model and
//! the CPU) from a bounded queue; everything else (the page, the model's description, the
//! progress of the running generation) is answered at once by a fixed pool of threads, also
//! while a generation runs. [`Access`] decides whom the server answers (Host, Origin, token,
//! JSON content type); docs/serve.md states the rules.
//!
//! Routes:
//! - `GET /`: the page (one self-contained HTML file, no external resources);
//! - `GET /api/info`: the model (image size, references, ITD, sampling defaults) as JSON;
//! - `POST /api/generate`: a [`GenerateJson`] body, images as data URLs (or bare base64) of
//!   PNG, JPEG or WebP; answers with the generated images as PNG data URLs and the decoding
//!   statistics;
//! - `GET /api/progress`: the running generation's decoded tokens and the requests waiting;
//! - `GET /demo/<name>.png`: the demo scene (two references, background, mask).
//!
//! Errors answer with a status (400 bad request, 401, 403, 404, 405, 408, 411, 413, 415, 421,
//! 431, 500, 503) and `{"error": "..."}` naming the field and what is wrong.

use crate::error::{Error, Result};
use crate::imageio;
use crate::pipeline::{generate, Bundle, GenerateRequest};
use crate::sample::ItdMode;
use base64::Engine;
use image::{GrayImage, RgbImage};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

pub mod http;
mod server;
#[cfg(test)]
mod tests;

pub use server::{Access, ServeOptions, WebServer, MAX_QUEUE, MAX_WORKERS};

/// The largest request body accepted (images travel base64-encoded in JSON).
pub const MAX_BODY: usize = 32 << 20;
/// The most images one request may ask for.
pub const MAX_SAMPLES: usize = 8;
/// The largest side of an uploaded image (they are resized to the model's size anyway).
pub const MAX_SIDE: u32 = 4096;

const PAGE: &str = include_str!("page.html");
const DEMO_PROMPT: &str = "a heart above a square";
const DEMO: [(&str, &[u8]); 4] = [
    ("ref0", include_bytes!("../../tests/fixtures/demo/ref0.png")),
    ("ref1", include_bytes!("../../tests/fixtures/demo/ref1.png")),
    ("background", include_bytes!("../../tests/fixtures/demo/background.png")),
    ("mask", include_bytes!("../../tests/fixtures/demo/mask.png")),
];

/// An answer: status, content type, body and any further headers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Reply { status, content_type, body, headers: Vec::new() }
    }

    fn json(status: u16, value: &serde_json::Value) -> Self {
        Self::new(status, "application/json", value.to_string().into_bytes())
    }

    pub fn error(status: u16, msg: impl std::fmt::Display) -> Self {
        Self::json(status, &serde_json::json!({ "error": msg.to_string() }))
    }
}

/// The body of `POST /api/generate`. Unset sampling fields take the bundle's defaults.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateJson {
    /// One image per subject, in order.
    pub refs: Vec<String>,
    #[serde(default)]
    pub background: Option<String>,
    /// White where the subjects go, the size of the background.
    #[serde(default)]
    pub mask: Option<String>,
    pub prompt: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub cfg_scale: Option<f32>,
    /// Guidance stops after this many decode steps (LlamaGen's `cfg_interval`).
    #[serde(default)]
    pub cfg_interval: Option<usize>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub itd: Option<ItdMode>,
    #[serde(default)]
    pub num_samples: Option<usize>,
    #[serde(default)]
    pub paste_back: bool,
    /// Also return what the model wrote at the ITD positions, decoded.
    #[serde(default)]
    pub show_itd: bool,
    /// Also return where the first image's cells look (`attention`: a figure of each group's
    /// share per cell and layer, and the mean shares), as `tokenar attention` draws it.
    #[serde(default)]
    pub attention: bool,
}

/// The bytes of a data URL (`data:<type>;base64,<data>`) or of bare base64.
pub fn data_url_bytes(s: &str) -> std::result::Result<Vec<u8>, String> {
    let payload = match s.strip_prefix("data:") {
        Some(rest) => {
            let (head, data) = rest.split_once(',').ok_or("a data URL without a comma")?;
            if !head.ends_with(";base64") {
                return Err(format!("a data URL must be base64-encoded (got `data:{head},...`)"));
            }
            data
        }
        None => s,
    };
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| format!("not valid base64: {e}"))
}

/// A PNG data URL of an image.
pub fn png_data_url(img: &RgbImage) -> Result<String> {
    let png = crate::data::instructar::png_bytes(&image::DynamicImage::ImageRgb8(img.clone()))?;
    Ok(imageio::png_data_url(&png))
}

/// The request field a library error names: the library names the command-line flag
/// (`--ref`, `--num-samples`), the API its JSON field (`refs`, `num_samples`).
fn field_name(what: &str) -> String {
    match what.strip_prefix("--") {
        Some("ref") => "refs".into(),
        Some(flag) => flag.replace('-', "_"),
        None => what.to_string(),
    }
}

/// Decode the image of request field `field`.
fn field_image(field: &str, s: &str) -> Result<image::DynamicImage> {
    let bytes = data_url_bytes(s).map_err(|m| Error::invalid(field, m))?;
    // The size is checked from the header, before anything is decoded.
    imageio::decode_within(&bytes, MAX_SIDE).map_err(|m| Error::invalid(field, m))
}

/// The page's model, loaded once, and the state of its generations.
pub struct App {
    bundle: Bundle,
    busy: AtomicBool,
    /// Tokens decoded so far of the running generation, and its total.
    done: AtomicUsize,
    total: AtomicUsize,
    /// Generation requests received and not yet started.
    queued: AtomicUsize,
}

impl App {
    pub fn new(bundle: Bundle) -> Self {
        App { bundle, busy: AtomicBool::new(false), done: AtomicUsize::new(0), total: AtomicUsize::new(0), queued: AtomicUsize::new(0) }
    }

    /// Whether a request is answered at once, without waiting for the model: everything but
    /// a generation.
    pub fn is_quick(method: &str, path: &str) -> bool {
        !(method == "POST" && path.split(['?', '#']).next() == Some("/api/generate"))
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// Answer one request. Never panics on any input; errors become 4xx/5xx replies.
    pub fn handle(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        self.handle_owned(method, path, body.to_vec())
    }

    /// [`App::handle`] taking the body, which a generation drops once it is parsed (before
    /// the model runs).
    pub fn handle_owned(&self, method: &str, path: &str, body: Vec<u8>) -> Reply {
        let path = path.split(['?', '#']).next().unwrap_or("");
        match (method, path) {
            ("GET", "/") | ("GET", "/index.html") => {
                Reply::new(200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec())
            }
            ("GET", "/api/info") => Reply::json(200, &self.info()),
            ("GET", "/api/progress") => Reply::json(
                200,
                &serde_json::json!({
                    "busy": self.busy.load(Ordering::SeqCst),
                    "done": self.done.load(Ordering::SeqCst),
                    "total": self.total.load(Ordering::SeqCst),
                    "queued": self.queued.load(Ordering::SeqCst),
                }),
            ),
            ("POST", "/api/generate") => match self.generate(body) {
                Ok(v) => Reply::json(200, &v),
                // A request the model cannot serve is the client's to fix; anything else
                // (a failing op) is the server's.
                Err(Error::Invalid { what, msg }) => Reply::error(400, Error::invalid(field_name(&what), msg)),
                Err(e @ Error::BadFile { .. }) => Reply::error(400, e),
                Err(e) => Reply::error(500, e),
            },
            ("GET", p) if p.starts_with("/demo/") => {
                let name = p.trim_start_matches("/demo/").trim_end_matches(".png");
                match DEMO.iter().find(|(n, _)| *n == name) {
                    Some((_, bytes)) => Reply::new(200, "image/png", bytes.to_vec()),
                    None => Reply::error(404, format!("no demo image `{name}`")),
                }
            }
            (_, "/" | "/index.html" | "/api/info" | "/api/progress" | "/api/generate") => {
                Reply::error(405, format!("{method} is not allowed on {path}"))
            }
            _ => Reply::error(404, format!("no such page: {path}")),
        }
    }

    fn info(&self) -> serde_json::Value {
        let c = self.bundle.config();
        let s = &self.bundle.sampling;
        serde_json::json!({
            "source": self.bundle.source,
            "image_size": self.bundle.image_size(),
            "max_refs": c.max_refs,
            "itd": c.itd,
            "text": self.bundle.text.describe(),
            "params": c.num_params(),
            "sampling": { "cfg_scale": s.cfg_scale, "top_k": s.top_k, "top_p": s.top_p, "temperature": s.temperature },
            "max_samples": MAX_SAMPLES,
            "demo_prompt": DEMO_PROMPT,
        })
    }

    /// Parse, check and run a generation request.
    pub fn request(&self, body: &[u8]) -> Result<GenerateRequest> {
        Ok(self.parse(body)?.0)
    }

    /// [`App::request`], and whether the attention figure is asked for.
    fn parse(&self, body: &[u8]) -> Result<(GenerateRequest, bool)> {
        let j: GenerateJson = serde_json::from_slice(body).map_err(|e| Error::invalid("request body", format!("not a generation request: {e}")))?;
        let refs = j
            .refs
            .iter()
            .enumerate()
            .map(|(i, r)| field_image(&format!("refs[{i}]"), r).map(|img| imageio::to_rgb_on_white(&img)))
            .collect::<Result<Vec<RgbImage>>>()?;
        let background = j.background.as_deref().map(|b| field_image("background", b).map(|img| imageio::to_rgb_on_white(&img))).transpose()?;
        let mask: Option<GrayImage> = j.mask.as_deref().map(|m| field_image("mask", m).map(|img| imageio::binarize(&img.to_luma8()))).transpose()?;
        let n = j.num_samples.unwrap_or(1);
        if n > MAX_SAMPLES {
            return Err(Error::invalid("num_samples", format!("{n} asked; this server makes at most {MAX_SAMPLES} per request")));
        }
        let d = &self.bundle.sampling;
        let req = GenerateRequest {
            refs,
            background,
            mask,
            prompt: j.prompt,
            options: crate::sample::SampleOptions {
                cfg_scale: j.cfg_scale.unwrap_or(d.cfg_scale),
                temperature: j.temperature.unwrap_or(d.temperature),
                top_k: j.top_k.unwrap_or(d.top_k),
                top_p: j.top_p.unwrap_or(d.top_p),
                seed: j.seed,
                cfg_interval: j.cfg_interval.or(d.cfg_interval),
            },
            itd: j.itd,
            num_samples: n,
            paste_back: j.paste_back,
            decode_itd: j.show_itd,
        };
        req.validate()?;
        Ok((req, j.attention))
    }

    fn generate(&self, body: Vec<u8>) -> Result<serde_json::Value> {
        let (req, show_attention) = self.parse(&body)?;
        drop(body);
        let t0 = Instant::now();
        self.done.store(0, Ordering::SeqCst);
        self.total.store(0, Ordering::SeqCst);
        // Busy until this returns, however it returns.
        struct Busy<'a>(&'a AtomicBool);
        impl Drop for Busy<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        self.busy.store(true, Ordering::SeqCst);
        let busy = Busy(&self.busy);
        let out = generate(
            &self.bundle,
            &req,
            Some(&|k, n| {
                self.done.store(k, Ordering::SeqCst);
                self.total.store(n, Ordering::SeqCst);
            }),
        );
        drop(busy);
        let out = out?;
        let seconds = t0.elapsed().as_secs_f64();
        let images = out.images.iter().map(png_data_url).collect::<Result<Vec<_>>>()?;
        // With `attention`, where the first image's cells look: each group's share per cell,
        // per layer (heads averaged) and over all layers (see `tokenar attention`).
        let attention = if show_attention {
            let r = crate::pipeline::attention::attention_of(&self.bundle, &req, out.images[0].clone(), &out.target_codes[0])?;
            let rows = crate::pipeline::attention::figure_rows(&r.maps, false);
            let (fig, _) = crate::pipeline::attention::shares_figure(&r, &rows, 96)?;
            let mean = r.maps.shares(crate::pipeline::attention::Pick::Mean, crate::pipeline::attention::Pick::Mean)?;
            let groups: Vec<serde_json::Value> = r
                .maps
                .groups
                .iter()
                .enumerate()
                .map(|(g, k)| serde_json::json!({ "name": k.kind.name(), "share": mean.iter().map(|c| c[g] as f64).sum::<f64>() / mean.len() as f64 }))
                .collect();
            serde_json::json!({ "figure": png_data_url(&fig)?, "groups": groups, "layers": r.maps.layers, "heads": r.maps.heads })
        } else {
            serde_json::Value::Null
        };
        let itd_refs = out
            .itd_refs
            .iter()
            .map(|per| per.iter().map(png_data_url).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        Ok(serde_json::json!({
            "images": images,
            "itd_refs": itd_refs,
            "itd": out.itd.to_string(),
            "seconds": seconds,
            "forward_passes": out.stats.forward_passes,
            "draft_accepted": out.stats.draft_accepted,
            "draft_rejected": out.stats.draft_rejected,
            "seed": req.options.seed,
            "attention": attention,
        }))
    }
}

/// Give the memory freed by a request back to the system. The binaries' allocator (mimalloc)
/// keeps freed pages for reuse by default (`util::tune_allocator`); a server holds the peak of
/// its largest request for as long as it runs that way, so [`WebServer::run`] turns purging
/// back on ([`purge_freed_memory`]) and this purges what is free now. Harmless where another
/// allocator is in use (the tests): mimalloc then holds nothing.
pub fn return_memory() {
    extern "C" {
        fn mi_collect(force: bool);
    }
    // SAFETY: mimalloc is linked (a dependency of this crate); collecting is allowed at any
    // time from any thread.
    unsafe { mi_collect(true) }
}

/// Let mimalloc return freed memory to the system again, 10 ms after it is freed (its own
/// default), undoing `util::tune_allocator` for a long-running server.
pub fn purge_freed_memory() {
    extern "C" {
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    // `mi_option_purge_delay` (see `util::tune_allocator`).
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
    // SAFETY: as in `util::tune_allocator`: setting an option is allowed at any time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 10) }
}
