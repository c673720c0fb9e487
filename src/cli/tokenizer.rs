use clap::Subcommand;

#[derive(Subcommand)]
pub enum TokenizerCmd {}

pub fn run(cmd: TokenizerCmd) -> anyhow::Result<()> {
    match cmd {}
}
