//! `tokenar serve`: the web page for generation (and its JSON API) on a local port.

use clap::Args;
use std::time::Duration;
use tokenar::serve::{App, ServeOptions, WebServer};

#[derive(Args)]
#[command(after_help = "Security: the server answers only requests whose Host is the bound address, \
a loopback name (localhost, 127.0.0.1, [::1]) or a name given with --allow-host (any IP address \
when bound to 0.0.0.0 or ::); a POST must be `Content-Type: application/json`. With --token, \
everything but the page and its demo images needs `Authorization: Bearer TOKEN` (the page takes \
the token from its address, http://HOST:PORT/#token=TOKEN, or its token field). Listening beyond \
loopback (e.g. --addr 0.0.0.0:8080) refuses to start without --token, unless --allow-no-token \
says to serve anyone who can reach the port. There is no TLS: a token crosses the network in \
clear text.")]
pub struct ServeArgs {
    /// Address to listen on (`host:port`; port 0 picks a free one). Use 0.0.0.0 to accept
    /// connections from other machines (needs --token or --allow-no-token).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Require `Authorization: Bearer TOKEN` on the API (everything but the page and its demo
    /// images).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Also answer requests for this host name (repeatable; `*` answers any Host, which
    /// exposes the server to DNS rebinding from web pages).
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_host: Vec<String>,
    /// Listen beyond loopback without a token: anyone who can reach the port may generate.
    #[arg(long)]
    allow_no_token: bool,
    /// Threads reading requests (and answering all but generations); connections beyond
    /// these and as many waiting get 503.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Generation requests that may wait behind the running one; more get 503.
    #[arg(long, default_value_t = 4)]
    queue: usize,
    /// Seconds a client has to send its whole request (line, headers and body) from
    /// connecting; a stalled one is dropped with 408.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    read_timeout: f64,
    #[command(flatten)]
    model: super::ModelArgs,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    if !(a.read_timeout.is_finite() && a.read_timeout > 0.0 && a.read_timeout <= 3600.0) {
        anyhow::bail!("invalid --read-timeout: {} is not above 0 and at most 3600 seconds", a.read_timeout);
    }
    let opts = ServeOptions {
        workers: a.workers,
        queue: a.queue,
        read_timeout: Duration::from_secs_f64(a.read_timeout),
        token: a.token,
        allow_hosts: a.allow_host,
        allow_no_token: a.allow_no_token,
    };
    // Bind first: a taken port or a refused address is reported before the model is loaded.
    let server = WebServer::bind(&a.addr, opts)?;
    let bundle = a.model.load()?;
    eprintln!("model: {} ({} px, up to {} references)", bundle.source, bundle.image_size(), bundle.config().max_refs);
    eprintln!("serving on http://{}/ (Ctrl-C to stop)", server.local_addr()?);
    server.run(&App::new(bundle))?;
    Ok(())
}
