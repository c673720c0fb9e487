use clap::Subcommand;

#[derive(Subcommand)]
pub enum DataCmd {}

pub fn run(cmd: DataCmd) -> anyhow::Result<()> {
    match cmd {}
}
