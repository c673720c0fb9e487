//! `tokenar serve`: the web page for generation (and its JSON API) on a local port.

use clap::Args;
use std::path::PathBuf;
use tokenar::pipeline::bundle::LoadHints;
use tokenar::serve::{App, WebServer};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (`host:port`; port 0 picks a free one). Use 0.0.0.0 to accept
    /// connections from other machines.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Bundle folder (tokenizer, model, text encoder); default: the built-in model.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Architecture preset for a .pt GPT checkpoint (e.g. tokenar-xl, editar-xl, XL).
    #[arg(long)]
    preset: Option<String>,
    /// Tokenizer preset for a .pt tokenizer (default vq-16).
    #[arg(long)]
    tokenizer_preset: Option<String>,
    #[arg(long)]
    gpu: bool,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    // Bind first: a taken port is reported before the model is loaded.
    let server = WebServer::bind(&a.addr)?;
    let device = tokenar::util::device(a.gpu)?;
    let hints = LoadHints { preset: a.preset.clone(), tokenizer_preset: a.tokenizer_preset.clone() };
    let bundle = super::load_bundle(a.weights.as_deref(), &hints, &device)?;
    for k in &bundle.report.fresh {
        eprintln!("note: `{k}` is not in the checkpoint and was freshly initialised");
    }
    eprintln!("model: {} ({} px, up to {} references)", bundle.source, bundle.image_size(), bundle.config().max_refs);
    eprintln!("serving on http://{}/ (Ctrl-C to stop)", server.local_addr()?);
    server.run(&App::new(bundle), None)?;
    Ok(())
}
