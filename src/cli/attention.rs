//! `tokenar attention`: where the generated cells look, as PNG heat maps.

use anyhow::{bail, Context};
use clap::Args;
use image::RgbImage;
use std::path::{Path, PathBuf};
use tokenar::pipeline::attention::{self, AttentionResult, Pick};
use tokenar::pipeline::GenerateRequest;

#[derive(Args)]
pub struct AttentionArgs {
    #[command(flatten)]
    scene: super::generate::SceneArgs,
    /// Output folder: generated.png; shares.png (columns: the image, then each group of keys
    /// -- ref1.., background, text, instruct, itd, target -- under a header row of their
    /// pictures; rows: each layer with its heads averaged, or each head with --per-head, then
    /// the mean; each panel the group's share of every cell's attention, on one scale); one
    /// cell_<row>_<col>.png per --cell; attention.json (every layer's and head's mean shares).
    #[arg(long)]
    out: PathBuf,
    /// Also draw where this target cell (token row, column; `tokenar info` gives the grid)
    /// looks inside each reference and the background; repeat for more cells.
    #[arg(long, value_name = "ROW,COL", value_parser = parse_cell)]
    cell: Vec<(usize, usize)>,
    /// One row per layer and head instead of per layer (averaged over its heads).
    #[arg(long)]
    per_head: bool,
    /// Side of each picture in the figures, in pixels.
    #[arg(long, default_value_t = 128)]
    panel: u32,
    #[command(flatten)]
    model: super::ModelArgs,
    #[command(flatten)]
    sampling: super::SamplingArgs,
}

fn parse_cell(s: &str) -> Result<(usize, usize), String> {
    let (r, c) = s.split_once(',').ok_or_else(|| format!("`{s}`: expected ROW,COL, e.g. 3,4"))?;
    let n = |t: &str| t.trim().parse::<usize>().map_err(|_| format!("`{t}` in `{s}` is not a row or column number"));
    Ok((n(r)?, n(c)?))
}

/// attention.json: the groups, and for every layer and head (and their means) each group's
/// share of the target cells' attention, averaged over the cells.
fn summary(r: &AttentionResult, figure_scale: f32, cells: &[(usize, usize)]) -> anyhow::Result<serde_json::Value> {
    let m = &r.maps;
    let mean_share = |l: Pick, h: Pick| -> anyhow::Result<Vec<f64>> {
        let s = m.shares(l, h)?;
        Ok((0..m.groups.len()).map(|g| s.iter().map(|c| c[g] as f64).sum::<f64>() / s.len() as f64).collect())
    };
    let mut layers = Vec::new();
    for l in 0..m.layers {
        let heads = (0..m.heads).map(|h| mean_share(Pick::One(l), Pick::One(h))).collect::<anyhow::Result<Vec<_>>>()?;
        layers.push(serde_json::json!({ "layer": l, "heads": heads, "mean": mean_share(Pick::One(l), Pick::Mean)? }));
    }
    Ok(serde_json::json!({
        "about": "share of the attention of the generated target cells that goes to each group of keys, averaged over the cells (each cell's shares sum to 1)",
        "groups": m.groups.iter().map(|g| g.kind.name()).collect::<Vec<_>>(),
        "grid": [m.grid.0, m.grid.1],
        "layers": layers,
        "mean": mean_share(Pick::Mean, Pick::Mean)?,
        "shares_png_scale": figure_scale,
        "cells": cells.iter().map(|c| [c.0, c.1]).collect::<Vec<_>>(),
    }))
}

fn write_png(path: &Path, img: &RgbImage) -> anyhow::Result<()> {
    tokenar::imageio::save_rgb(path, img).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

pub fn run(a: AttentionArgs) -> anyhow::Result<()> {
    if !(16..=1024).contains(&a.panel) {
        bail!("--panel {}: expected 16 to 1024 pixels", a.panel);
    }
    let (refs, background, mask) = a.scene.load()?;
    let mut req = GenerateRequest {
        refs,
        background,
        mask,
        prompt: a.scene.prompt.clone(),
        options: a.sampling.options(&Default::default(), 0),
        itd: a.sampling.itd,
        num_samples: 1,
        paste_back: a.sampling.paste_back,
        decode_itd: false,
    };
    req.validate()?;
    if a.model.dtype != tokenar::nn::WeightDtype::F32 {
        bail!("--dtype {}: the attention is read from the f32 weights (leave --dtype out)", a.model.dtype);
    }
    let bundle = a.model.load()?;
    let (gh, gw) = bundle.config().grid;
    if let Some(c) = a.cell.iter().find(|c| c.0 >= gh || c.1 >= gw) {
        bail!("--cell {},{}: the model's target grid is {gh} x {gw} (rows and columns from 0)", c.0, c.1);
    }
    req.options = a.sampling.options(&bundle.sampling, 0);
    req.validate()?;
    for w in tokenar::pipeline::generate::warnings(&bundle, &req) {
        eprintln!("warning: {w}");
    }
    let r = attention::attention(&bundle, &req)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    write_png(&a.out.join("generated.png"), &r.image)?;
    let rows = attention::figure_rows(&r.maps, a.per_head);
    let (fig, scale) = attention::shares_figure(&r, &rows, a.panel)?;
    write_png(&a.out.join("shares.png"), &fig)?;
    for &c in &a.cell {
        write_png(&a.out.join(format!("cell_{}_{}.png", c.0, c.1)), &attention::cell_figure(&r, &rows, c, a.panel)?)?;
    }
    let json = serde_json::to_string_pretty(&summary(&r, scale, &a.cell)?)?;
    tokenar::util::atomic_write(a.out.join("attention.json"), json.as_bytes())?;
    let names: Vec<String> = r.maps.groups.iter().map(|g| g.kind.name()).collect();
    let mean = r.maps.shares(Pick::Mean, Pick::Mean)?;
    let avg: Vec<String> = (0..names.len())
        .map(|g| format!("{} {:.3}", names[g], mean.iter().map(|c| c[g]).sum::<f32>() / mean.len() as f32))
        .collect();
    eprintln!(
        "{} layers x {} heads; mean share of the target cells' attention: {}. shares.png: rows = {}, then the mean; columns = generated, {}",
        r.maps.layers,
        r.maps.heads,
        avg.join(", "),
        if a.per_head { "each layer's heads" } else { "layers (heads averaged)" },
        names.join(", ")
    );
    Ok(())
}
