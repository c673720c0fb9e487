//! `tokenar serve`: the web page for generation (and its JSON API) on a local port.

use clap::Args;
use tokenar::serve::{App, WebServer};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (`host:port`; port 0 picks a free one). Use 0.0.0.0 to accept
    /// connections from other machines.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    #[command(flatten)]
    model: super::ModelArgs,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    // Bind first: a taken port is reported before the model is loaded.
    let server = WebServer::bind(&a.addr)?;
    let bundle = a.model.load()?;
    eprintln!("model: {} ({} px, up to {} references)", bundle.source, bundle.image_size(), bundle.config().max_refs);
    eprintln!("serving on http://{}/ (Ctrl-C to stop)", server.local_addr()?);
    server.run(&App::new(bundle), None)?;
    Ok(())
}
