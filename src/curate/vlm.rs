//! The VLM filter of the InstructAR construction: a vision-language model served behind an
//! OpenAI-compatible `/v1/chat/completions` endpoint sees [target, ref0, ref1, ...] (PNG data
//! URLs) and the reference question with the sample's description; greedy (temperature 0), at
//! most 100 new tokens. A reply starting with "yes" keeps the sample; "no", any other reply and
//! any failure (HTTP status, timeout, unreachable server, malformed JSON, unreadable image)
//! drop it with the reason. Plain http only, without a proxy (such a model server runs
//! locally).

use super::report::{Report, Summary, Verdict};
use crate::data::{instructar::png_bytes, Dataset, Sample};
use crate::error::{Error, IoContext, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// The question of the reference pipeline; `{description}` is the sample's prompt.
pub const PROMPT_TEMPLATE: &str = "Is the last two image contains in the first image? And the Picture Color is normal. \
Not too extreme. And the image fit the description: {description}. Reply Yes or No.";

/// New tokens the model may write.
pub const MAX_TOKENS: u32 = 100;

/// Report and manifest names in the output folder.
pub const REPORT: &str = "vlm.jsonl";
pub const KEPT: &str = "vlm_kept.jsonl";

/// A reply longer than this is cut in the report.
const MAX_REPLY_CHARS: usize = 2000;

#[derive(Debug, Clone)]
pub struct VlmOptions {
    /// `http://host:port` (the path `/v1/chat/completions` is added), or the full URL.
    pub endpoint: String,
    pub model: String,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Decide again the samples an earlier run dropped because something failed.
    pub retry_errors: bool,
    pub prompt_template: String,
    /// Requests in flight at once (a model server batches concurrent requests).
    pub concurrency: usize,
}

impl VlmOptions {
    pub fn new(endpoint: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            model: model.into(),
            timeout: Duration::from_secs(120),
            retry_errors: false,
            prompt_template: PROMPT_TEMPLATE.to_string(),
            concurrency: 1,
        }
    }
}

/// The chat-completions URL for an endpoint given as `http://host:port`, `.../v1` or the
/// full URL. Anything but plain `http://` is an error naming the value.
pub fn completions_url(endpoint: &str) -> Result<String> {
    let e = endpoint.trim();
    let Some(rest) = e.strip_prefix("http://").map(|r| r.trim_end_matches('/')) else {
        let why = if e.starts_with("https://") {
            "https is not supported (plain http only)"
        } else {
            "expected http://HOST:PORT"
        };
        return Err(Error::invalid("--endpoint", format!("`{endpoint}`: {why}")));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(Error::invalid("--endpoint", format!("`{endpoint}`: no host (expected http://HOST:PORT)")));
    }
    let e = format!("http://{rest}");
    Ok(if e.ends_with("/chat/completions") {
        e.to_string()
    } else if e.ends_with("/v1") {
        format!("{e}/chat/completions")
    } else {
        format!("{e}/v1/chat/completions")
    })
}

/// The question for one sample.
pub fn prompt_text(template: &str, description: &str) -> String {
    template.replace("{description}", description)
}

/// An image file as a `data:image/png;base64,...` URL: a PNG file's bytes as they are (after
/// checking that it decodes), any other format re-encoded as PNG.
pub fn png_data_url(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_path(path)?;
    let img = crate::imageio::decode(&bytes).map_err(|m| Error::bad_file(path, m))?;
    let png = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") { bytes } else { png_bytes(&img)? };
    Ok(crate::imageio::png_data_url(&png))
}

/// The request body for one sample: the images [target, refs...] then the question.
pub fn request_body(sample: &Sample, model: &str, template: &str) -> Result<Value> {
    let target = sample
        .target
        .as_ref()
        .ok_or_else(|| Error::invalid("sample", format!("{} has no target image (real.png)", sample.id)))?;
    let mut content = Vec::new();
    for p in std::iter::once(target).chain(&sample.refs) {
        content.push(json!({"type": "image_url", "image_url": {"url": png_data_url(p)?}}));
    }
    content.push(json!({"type": "text", "text": prompt_text(template, &sample.prompt)}));
    Ok(json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }))
}

/// The text of the first choice of a chat-completions response (`content` as a string, or as
/// a list of text parts).
pub fn reply_text(body: &str) -> std::result::Result<String, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("malformed response (not JSON: {e}): {}", excerpt(body)))?;
    let content = &v["choices"][0]["message"]["content"];
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => Ok(parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("")),
        _ => Err(format!("malformed response (no choices[0].message.content): {}", excerpt(body))),
    }
}

/// Keep on a reply starting with "yes" (trimmed, any case); drop on "no" or anything else.
pub fn judge(reply: &str) -> (bool, String) {
    let r = reply.trim().to_lowercase();
    if r.starts_with("yes") {
        (true, "model replied Yes".to_string())
    } else if r.starts_with("no") {
        (false, "model replied No".to_string())
    } else {
        (false, "reply is neither Yes nor No".to_string())
    }
}

fn excerpt(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// A blocking client for one endpoint.
pub struct VlmClient {
    agent: ureq::Agent,
    url: String,
}

impl VlmClient {
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self> {
        if timeout.is_zero() {
            return Err(Error::invalid("--timeout-s", "must be positive"));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        Ok(Self { agent, url: completions_url(endpoint)? })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// POST one request; the reply text, or why there is none.
    pub fn ask(&self, body: &Value) -> std::result::Result<String, String> {
        let mut resp = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|e| format!("request to {} failed: {e}", self.url))?;
        let status = resp.status();
        let text = resp.body_mut().read_to_string().map_err(|e| format!("reading the response of {} failed: {e}", self.url))?;
        if !status.is_success() {
            return Err(format!("HTTP {}: {}", status.as_u16(), excerpt(&text)));
        }
        reply_text(&text)
    }

    /// The verdict on one sample.
    pub fn decide(&self, sample: &Sample, model: &str, template: &str, label: &str) -> Verdict {
        let body = match request_body(sample, model, template) {
            Ok(b) => b,
            Err(e) => return Verdict::failed(sample, label, e.to_string()),
        };
        match self.ask(&body) {
            Ok(reply) => {
                let (kept, reason) = judge(&reply);
                let reply: String = reply.chars().take(MAX_REPLY_CHARS).collect();
                Verdict { reply: Some(reply), ..Verdict::new(sample, label, kept, reason) }
            }
            Err(reason) => Verdict::failed(sample, label, reason),
        }
    }
}

/// The report's filter label; a rerun into the same report must ask the same model.
pub fn filter_label(model: &str) -> String {
    format!("vlm model={model}")
}

/// Ask about every sample of `ds` not yet in `out/vlm.jsonl`, `opts.concurrency` requests at
/// a time, appending each verdict there as it comes (in the order the answers arrive), then
/// write the kept samples of the whole report to `out/vlm_kept.jsonl`. `progress(done, todo)`
/// counts the samples of this run.
pub fn run_vlm(ds: &Dataset, opts: &VlmOptions, out: &Path, progress: Option<&dyn Fn(usize, usize)>) -> Result<Summary> {
    if opts.model.trim().is_empty() {
        return Err(Error::invalid("--model", "empty model name"));
    }
    if opts.concurrency == 0 {
        return Err(Error::invalid("--concurrency", "must be at least 1"));
    }
    let client = VlmClient::new(&opts.endpoint, opts.timeout)?;
    let label = filter_label(&opts.model);
    let mut report = Report::open(&out.join(REPORT), &label)?;
    let todo: Vec<&Sample> = ds.samples.iter().filter(|s| report.pending(&s.id, opts.retry_errors)).collect();
    // Workers take the next sample in turn and send their verdicts here, where the report
    // is written (one writer).
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<Verdict>();
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..opts.concurrency.min(todo.len()) {
            let tx = tx.clone();
            let (next, todo, client, label) = (&next, &todo, &client, &label);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(s) = todo.get(i) else { break };
                // The receiver is gone only when writing the report failed: stop.
                if tx.send(client.decide(s, &opts.model, &opts.prompt_template, label)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for (i, v) in rx.iter().enumerate() {
            report.record(v)?;
            if let Some(p) = progress {
                p(i + 1, todo.len());
            }
        }
        Ok(())
    })?;
    report.write_kept(&ds.samples, &ds.root, &out.join(KEPT))?;
    Ok(Summary { decided: todo.len(), resumed: ds.samples.len() - todo.len(), ..report.summary(&ds.samples) })
}
