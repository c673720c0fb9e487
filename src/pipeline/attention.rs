//! Where the generated cells look (`tokenar attention`): for one request, the image is
//! generated as `generate` does, then the model reads the whole sequence once more
//! (teacher-forced, the conditional row only) with its attention recorded
//! ([`crate::nn::attention_record`]). For every layer and head and every generated target cell
//! this gives the cell's attention over all earlier positions; [`AttentionMaps`] groups those
//! keys by segment of the layout (each reference, the background, the text, the instruct
//! tokens, the ITD copies, the target's earlier cells), so that a cell's shares over the
//! groups sum to 1.
//!
//! A target cell's token is predicted at the position before it, so the query of cell `j` is
//! input position `target.start + j - 1` of the layout.

use super::bundle::Bundle;
use super::generate::{generate, request_condition, GenerateRequest};
use crate::error::{Error, Result};
use crate::layout::SegmentKind;
use candle_core::Tensor;
use image::{Rgb, RgbImage};
use std::ops::Range;

/// What a group of keys is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// Reference slot `i` (an image of the model's grid).
    Reference(usize),
    Background,
    Text,
    Instruct,
    /// The ITD copies of the references (generated before the target).
    Itd,
    /// The target's own earlier cells.
    Target,
}

impl GroupKind {
    /// A short name for files and tables (`ref1`, `background`, `text`, ...).
    pub fn name(self) -> String {
        match self {
            GroupKind::Reference(i) => format!("ref{}", i + 1),
            GroupKind::Background => "background".into(),
            GroupKind::Text => "text".into(),
            GroupKind::Instruct => "instruct".into(),
            GroupKind::Itd => "itd".into(),
            GroupKind::Target => "target".into(),
        }
    }
}

/// The keys of one group: position ranges of the layout.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyGroup {
    pub kind: GroupKind,
    pub ranges: Vec<Range<usize>>,
}

impl KeyGroup {
    pub fn len(&self) -> usize {
        self.ranges.iter().map(|r| r.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Layers or heads to look at: one, or the mean over all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    One(usize),
    Mean,
}

/// The recorded attention of the generated target cells: `probs[layer][head]` holds, for each
/// of the `h * w` target cells (raster order), its probabilities over the `keys` positions.
#[derive(Clone, Debug)]
pub struct AttentionMaps {
    pub layers: usize,
    pub heads: usize,
    /// The token grid of one image (rows, cols): the target's, the background's.
    pub grid: (usize, usize),
    /// The token grid of a reference (`grid` unless the model has references on a grid of
    /// their own).
    pub ref_grid: (usize, usize),
    /// Keys every query row spans (the training input's length; a cell sees those before it).
    pub keys: usize,
    pub groups: Vec<KeyGroup>,
    probs: Vec<Vec<Vec<f32>>>,
}

impl AttentionMaps {
    /// Build from per-layer probabilities (H, h*w, keys) and the layout's groups.
    pub fn new(grid: (usize, usize), keys: usize, groups: Vec<KeyGroup>, per_layer: Vec<Vec<Vec<f32>>>) -> Result<Self> {
        let cells = grid.0 * grid.1;
        let heads = per_layer.first().map_or(0, |l| l.len());
        if per_layer.is_empty() || heads == 0 {
            return Err(Error::invalid("attention", "no attention layer was recorded"));
        }
        for (l, layer) in per_layer.iter().enumerate() {
            if layer.len() != heads || layer.iter().any(|h| h.len() != cells * keys) {
                return Err(Error::invalid("attention", format!("layer {l}: expected {heads} heads of {cells} x {keys} probabilities")));
            }
        }
        if let Some(r) = groups.iter().flat_map(|g| &g.ranges).find(|r| r.end > keys) {
            return Err(Error::invalid("attention", format!("key group {r:?} beyond the {keys} keys")));
        }
        Ok(Self { layers: per_layer.len(), heads, grid, ref_grid: grid, keys, groups, probs: per_layer })
    }

    fn picks(pick: Pick, n: usize, what: &str) -> Result<Vec<usize>> {
        match pick {
            Pick::Mean => Ok((0..n).collect()),
            Pick::One(i) if i < n => Ok(vec![i]),
            Pick::One(i) => Err(Error::invalid(what, format!("{i} (the model has {n}, counted from 0)"))),
        }
    }

    /// The probabilities of target cell `cell` over all keys for `layer` and `head` (means
    /// over the picked layers and heads).
    pub fn cell(&self, layer: Pick, head: Pick, cell: usize) -> Result<Vec<f32>> {
        let cells = self.grid.0 * self.grid.1;
        if cell >= cells {
            return Err(Error::invalid("cell", format!("{cell} (the target has {cells} cells)")));
        }
        let (ls, hs) = (Self::picks(layer, self.layers, "layer")?, Self::picks(head, self.heads, "head")?);
        let mut out = vec![0.0f32; self.keys];
        for &l in &ls {
            for &h in &hs {
                let row = &self.probs[l][h][cell * self.keys..(cell + 1) * self.keys];
                out.iter_mut().zip(row).for_each(|(o, p)| *o += p);
            }
        }
        let n = (ls.len() * hs.len()) as f32;
        out.iter_mut().for_each(|o| *o /= n);
        Ok(out)
    }

    /// Per target cell, the share of its attention that goes to each group (`[cell][group]`,
    /// in the order of [`AttentionMaps::groups`]); each cell's shares sum to 1.
    pub fn shares(&self, layer: Pick, head: Pick) -> Result<Vec<Vec<f32>>> {
        (0..self.grid.0 * self.grid.1)
            .map(|c| {
                let p = self.cell(layer, head, c)?;
                Ok(self.groups.iter().map(|g| g.ranges.iter().map(|r| p[r.clone()].iter().sum::<f32>()).sum()).collect())
            })
            .collect()
    }

    /// The token grid of a group's image (a reference's grid for a reference).
    pub fn image_grid(&self, kind: GroupKind) -> (usize, usize) {
        match kind {
            GroupKind::Reference(_) => self.ref_grid,
            _ => self.grid,
        }
    }

    /// The attention of target cell `cell` over the keys of group `group` (the group's keys in
    /// order: for an image, its cells in raster order).
    pub fn cell_over(&self, layer: Pick, head: Pick, cell: usize, group: usize) -> Result<Vec<f32>> {
        let g = self.groups.get(group).ok_or_else(|| Error::invalid("group", format!("{group} (there are {})", self.groups.len())))?;
        let p = self.cell(layer, head, cell)?;
        Ok(g.ranges.iter().flat_map(|r| p[r.clone()].iter().copied()).collect())
    }
}

/// The key groups of a layout, for the query rows of the target (every key before the last
/// target query, all of them in one group).
pub fn key_groups(layout: &crate::layout::Layout) -> Vec<KeyGroup> {
    let mut groups: Vec<KeyGroup> = Vec::new();
    let mut add = |kind: GroupKind, r: Range<usize>| match groups.iter_mut().find(|g| g.kind == kind) {
        Some(g) => g.ranges.push(r),
        None => groups.push(KeyGroup { kind, ranges: vec![r] }),
    };
    let keys = layout.input_len();
    for seg in layout.segments() {
        let r = seg.start..(seg.start + seg.len).min(keys);
        if r.is_empty() {
            continue;
        }
        let kind = match seg.kind {
            SegmentKind::Ref(i) => GroupKind::Reference(i),
            SegmentKind::Background => GroupKind::Background,
            SegmentKind::Text => GroupKind::Text,
            SegmentKind::Instruct => GroupKind::Instruct,
            SegmentKind::ItdRef(_) => GroupKind::Itd,
            SegmentKind::Target => GroupKind::Target,
        };
        add(kind, r);
    }
    groups
}

/// One request's generated image, its condition images at the model's size, and the
/// attention of its target cells.
pub struct AttentionResult {
    pub image: RgbImage,
    /// The references at the model's size.
    pub refs: Vec<RgbImage>,
    /// The background as the model sees it (blacked out where the subjects go).
    pub background: RgbImage,
    pub maps: AttentionMaps,
}

/// Generate one image for `req` (its first sample) and record where its target cells look.
pub fn attention(bundle: &Bundle, req: &GenerateRequest) -> Result<AttentionResult> {
    let req = GenerateRequest { num_samples: 1, decode_itd: false, ..req.clone() };
    let mut out = generate(bundle, &req, None)?;
    attention_of(bundle, &req, out.images.remove(0), &out.target_codes[0])
}

/// Where the target cells of an image already generated for `req` (its target `codes`) look.
pub fn attention_of(bundle: &Bundle, req: &GenerateRequest, image: RgbImage, codes: &[u32]) -> Result<AttentionResult> {
    let (cond, refs, background) = request_condition(bundle, req)?;
    let gpt = &bundle.gpt;
    let layout = gpt.layout_for(&cond)?;
    let target = layout.segment(SegmentKind::Target).ok_or_else(|| Error::invalid("layout", "the sequence has no target segment"))?;
    let hw = target.len;
    if codes.len() != hw {
        return Err(Error::invalid("attention", format!("{} target codes given, the model's grid has {hw}", codes.len())));
    }
    let rows = target.start - 1..target.start - 1 + hw;
    let codes = Tensor::from_vec(codes.to_vec(), (1, hw), gpt.device())?;
    let mut rng = crate::util::rng(0);
    let (_, layers) = crate::nn::attention_record::record(rows, || gpt.forward_train_full(&cond, &codes, false, &mut rng))?;
    let keys = layout.input_len();
    let per_layer = layers
        .iter()
        .map(|l| -> Result<Vec<Vec<f32>>> {
            let p = l.probs.squeeze(0)?.to_dtype(candle_core::DType::F32)?;
            let heads = p.dim(0)?;
            (0..heads).map(|h| Ok(p.get(h)?.flatten_all()?.to_vec1::<f32>()?)).collect()
        })
        .collect::<Result<Vec<_>>>()?;
    let mut maps = AttentionMaps::new(gpt.config().grid, keys, key_groups(&layout), per_layer)?;
    maps.ref_grid = gpt.config().ref_grid();
    Ok(AttentionResult { image, refs, background, maps })
}

/// Colour of a value in [0, 1]: black, red, yellow, white (a "hot" map).
pub fn heat(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0) * 3.0;
    let c = |x: f32| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
    [c(v), c(v - 1.0), c(v - 2.0)]
}

/// `values` (a `grid` of cells, raster order) as a heat map of `size` x `size` pixels over a
/// dimmed grey copy of `under` (resized to `size`); `scale` maps a value to [0, 1].
pub fn overlay(under: &RgbImage, values: &[f32], grid: (usize, usize), size: u32, scale: f32) -> RgbImage {
    let base = crate::imageio::resize_rgb(under, size, size);
    let (gh, gw) = grid;
    RgbImage::from_fn(size, size, |x, y| {
        let (r, c) = ((y as usize * gh) / size as usize, (x as usize * gw) / size as usize);
        let v = values.get(r * gw + c).copied().unwrap_or(0.0) / scale.max(f32::MIN_POSITIVE);
        let p = base.get_pixel(x, y).0;
        let grey = (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) * 0.45;
        let h = heat(v);
        let a = 0.75;
        Rgb([0, 1, 2].map(|i| (a * h[i] as f32 + (1.0 - a) * grey).round() as u8))
    })
}

/// The largest value of several maps (the common scale of one figure), at least 1e-6.
pub fn max_of<'a>(maps: impl IntoIterator<Item = &'a Vec<f32>>) -> f32 {
    maps.into_iter().flatten().copied().fold(1e-6, f32::max)
}

/// The rows of a figure: (layer, head) picks, per layer (heads averaged) or per layer and
/// head, then the mean over everything.
pub fn figure_rows(maps: &AttentionMaps, per_head: bool) -> Vec<(Pick, Pick)> {
    let mut rows = Vec::new();
    for l in 0..maps.layers {
        if per_head {
            rows.extend((0..maps.heads).map(|h| (Pick::One(l), Pick::One(h))));
        } else {
            rows.push((Pick::One(l), Pick::Mean));
        }
    }
    rows.push((Pick::Mean, Pick::Mean));
    rows
}

/// The picture a group's keys belong to (a reference, the background), if any.
fn group_image(r: &AttentionResult, kind: GroupKind) -> Option<&RgbImage> {
    match kind {
        GroupKind::Reference(i) => r.refs.get(i),
        GroupKind::Background => Some(&r.background),
        _ => None,
    }
}

/// A flat panel standing for a group without a picture (text, instruct, ITD, target), shaded
/// so that the columns can be told apart.
fn plain(size: u32, kind: GroupKind) -> RgbImage {
    let v = match kind {
        GroupKind::Text => 200,
        GroupKind::Instruct => 170,
        GroupKind::Itd => 140,
        _ => 110,
    };
    RgbImage::from_pixel(size, size, Rgb([v, v, v]))
}

/// The generated image with target cell `(row, col)` outlined.
fn mark_cell(img: &RgbImage, grid: (usize, usize), (row, col): (usize, usize), size: u32) -> RgbImage {
    let mut out = crate::imageio::resize_rgb(img, size, size);
    let (gh, gw) = (grid.0 as u32, grid.1 as u32);
    let (x0, x1) = (col as u32 * size / gw, ((col as u32 + 1) * size / gw).min(size) - 1);
    let (y0, y1) = (row as u32 * size / gh, ((row as u32 + 1) * size / gh).min(size) - 1);
    for x in x0..=x1 {
        out.put_pixel(x, y0, Rgb([0, 255, 0]));
        out.put_pixel(x, y1, Rgb([0, 255, 0]));
    }
    for y in y0..=y1 {
        out.put_pixel(x0, y, Rgb([0, 255, 0]));
        out.put_pixel(x1, y, Rgb([0, 255, 0]));
    }
    out
}

/// shares.png: a header row (the generated image, then each group's picture), then per row of
/// [`figure_rows`] the generated image and each group's share of every cell's attention laid
/// over it, on one scale for the whole figure (its largest share is white).
pub fn shares_figure(r: &AttentionResult, rows: &[(Pick, Pick)], size: u32) -> Result<(RgbImage, f32)> {
    let m = &r.maps;
    let all: Vec<Vec<Vec<f32>>> = rows.iter().map(|&(l, h)| m.shares(l, h)).collect::<Result<_>>()?;
    let per_group: Vec<Vec<Vec<f32>>> =
        all.iter().map(|cells| (0..m.groups.len()).map(|g| cells.iter().map(|c| c[g]).collect()).collect()).collect();
    let scale = max_of(per_group.iter().flatten());
    let gen = crate::imageio::resize_rgb(&r.image, size, size);
    let mut panels = vec![gen.clone()];
    for g in &m.groups {
        panels.push(group_image(r, g.kind).map(|i| crate::imageio::resize_rgb(i, size, size)).unwrap_or_else(|| plain(size, g.kind)));
    }
    for maps in &per_group {
        panels.push(gen.clone());
        for v in maps {
            panels.push(overlay(&r.image, v, m.grid, size, scale));
        }
    }
    Ok((crate::imageio::grid(&panels, m.groups.len() + 1, 2), scale))
}

/// cell_<row>_<col>.png: a header row (the generated image with the cell outlined, then each
/// reference and the background), then per row of [`figure_rows`] the cell's attention inside
/// each of those pictures, each panel on its own scale (its largest value is white).
pub fn cell_figure(r: &AttentionResult, rows: &[(Pick, Pick)], cell: (usize, usize), size: u32) -> Result<RgbImage> {
    let m = &r.maps;
    let index = cell.0 * m.grid.1 + cell.1;
    let images: Vec<(usize, &RgbImage)> = m.groups.iter().enumerate().filter_map(|(i, g)| group_image(r, g.kind).map(|img| (i, img))).collect();
    let marked = mark_cell(&r.image, m.grid, cell, size);
    let mut panels = vec![marked.clone()];
    panels.extend(images.iter().map(|(_, img)| crate::imageio::resize_rgb(img, size, size)));
    for &(l, h) in rows {
        panels.push(marked.clone());
        for &(g, img) in &images {
            let v = m.cell_over(l, h, index, g)?;
            let scale = max_of([&v]);
            panels.push(overlay(img, &v, m.image_grid(m.groups[g].kind), size, scale));
        }
    }
    Ok(crate::imageio::grid(&panels, images.len() + 1, 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Layout, LayoutSpec, Scheme};

    #[test]
    fn groups_cover_every_key_once_and_shares_sum_to_one() {
        let spec = LayoutSpec { n_refs: 2, max_refs: 3, grid: (2, 2), ref_grid: None, text_len: 3, n_instruct: 2, itd: true, background: true, scheme: Scheme::Tiles };
        let layout = Layout::new(&spec).unwrap();
        let groups = key_groups(&layout);
        let kinds: Vec<GroupKind> = groups.iter().map(|g| g.kind).collect();
        use GroupKind::*;
        assert_eq!(kinds, [Reference(0), Reference(1), Background, Text, Instruct, Itd, Target]);
        let keys = layout.input_len();
        let mut seen = vec![0; keys];
        for r in groups.iter().flat_map(|g| &g.ranges) {
            r.clone().for_each(|k| seen[k] += 1);
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
        assert_eq!(groups[5].len(), 8, "two ITD copies of four cells");
        // Random rows normalised to 1 over the keys each cell may see.
        let mut rng = crate::util::rng(3);
        use rand::Rng as _;
        let start = layout.segment(SegmentKind::Target).unwrap().start;
        let probs: Vec<Vec<Vec<f32>>> = (0..2)
            .map(|_| {
                (0..3)
                    .map(|_| {
                        (0..4)
                            .flat_map(|c| {
                                let seen = start + c; // the query of cell c sits at start + c - 1
                                let mut row: Vec<f32> = (0..keys).map(|k| if k < seen { rng.random::<f32>() } else { 0.0 }).collect();
                                let s: f32 = row.iter().sum();
                                row.iter_mut().for_each(|v| *v /= s);
                                row
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let maps = AttentionMaps::new((2, 2), keys, groups, probs).unwrap();
        for (l, h) in [(Pick::One(0), Pick::One(2)), (Pick::Mean, Pick::One(1)), (Pick::Mean, Pick::Mean)] {
            for cell in maps.shares(l, h).unwrap() {
                assert!((cell.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{cell:?}");
            }
        }
        // Cell 0 sees no target cell yet; the mean over heads is the mean of the heads.
        assert_eq!(maps.shares(Pick::Mean, Pick::Mean).unwrap()[0][6], 0.0);
        let mean = maps.cell(Pick::One(1), Pick::Mean, 3).unwrap();
        let one: Vec<Vec<f32>> = (0..3).map(|h| maps.cell(Pick::One(1), Pick::One(h), 3).unwrap()).collect();
        for k in 0..keys {
            assert!((mean[k] - (one[0][k] + one[1][k] + one[2][k]) / 3.0).abs() < 1e-6);
        }
        assert_eq!(maps.cell_over(Pick::One(0), Pick::One(0), 2, 2).unwrap().len(), 4);
        assert!(maps.cell(Pick::One(2), Pick::Mean, 0).unwrap_err().to_string().contains("layer"));
        assert!(maps.cell(Pick::Mean, Pick::Mean, 4).unwrap_err().to_string().contains("4 cells"));
    }

    /// A tiny random model with every addition, two references of three given slots.
    fn tiny() -> (crate::model::TokenAr, crate::model::Condition, Tensor) {
        use crate::model::{Dropouts, Family, GptConfig};
        use candle_core::Device;
        let cfg = GptConfig {
            family: Family::Native,
            vocab_size: 32,
            n_layer: 2,
            n_head: 2,
            dim: 32,
            ffn_multiple_of: 16,
            rope_base: 10000.0,
            norm_eps: 1e-5,
            caption_dim: 8,
            caption_len: 4,
            max_refs: 3,
            background: true,
            n_instruct: 2,
            index_embedding: true,
            itd: true,
            cell_embedding: true,
            scheme: Scheme::Tiles,
            grid: (2, 3),
            ref_grid: None,
            img_uncond: true,
            align_dim: None,
            dropouts: Dropouts::default(),
        };
        let (m, _vars) = crate::model::build(&cfg, &Device::Cpu, 4).unwrap();
        let codes = |n: usize, salt: u32| Tensor::from_vec((0..n as u32).map(|i| (i * 7 + salt) % 32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
        let refs = codes(12, 1).reshape((1, 2, 6)).unwrap();
        let bg = codes(6, 5).reshape((1, 6)).unwrap();
        let text = Tensor::randn(0f32, 1.0, (1, 4, 8), &Device::Cpu).unwrap();
        // One padded caption row: its key gets no attention.
        let mask = Tensor::new(&[[0f32, 1.0, 1.0, 1.0]], &Device::Cpu).unwrap();
        let target = codes(6, 3).reshape((1, 6)).unwrap();
        (m, crate::model::Condition::new(refs, bg, text, Some(mask)), target)
    }

    #[test]
    fn recorded_maps_are_softmax_of_the_layers_rotated_queries_and_keys() {
        let (m, cond, target) = tiny();
        let layout = m.layout_for(&cond).unwrap();
        let t = layout.segment(SegmentKind::Target).unwrap();
        let rows = t.start - 1..t.start - 1 + t.len;
        let mut rng = crate::util::rng(0);
        let plain = m.forward_train_full(&cond, &target, false, &mut rng).unwrap().hidden;
        let (out, layers) = crate::nn::attention_record::record(rows.clone(), || m.forward_train_full(&cond, &target, false, &mut rng)).unwrap();
        // Recording takes the composed path: the same outputs as the fused one.
        let diff = (out.hidden - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "recording changed the forward by {diff}");
        assert_eq!(layers.len(), 2);
        let s = layout.input_len();
        let (h, d) = (2, 16);
        let (cos, sin) = crate::model::rope::tables(&layout.rope_cells()[..s], d, 10000.0, &candle_core::Device::Cpu).unwrap();
        let (cos, sin) = (cos.to_vec2::<f32>().unwrap(), sin.to_vec2::<f32>().unwrap());
        let text = layout.segment(SegmentKind::Text).unwrap().start;
        for rec in &layers {
            assert_eq!(rec.probs.dims(), [1, h, rows.len(), s]);
            let qkv = rec.qkv.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            let probs = rec.probs.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
            // RoPE on interleaved pairs, straight from the tables.
            let rot = |row: &[f32], p: usize| -> Vec<f32> {
                (0..d / 2).flat_map(|k| {
                    let (x0, x1, c, sn) = (row[2 * k], row[2 * k + 1], cos[p][k], sin[p][k]);
                    [x0 * c - x1 * sn, x0 * sn + x1 * c]
                }).collect()
            };
            for head in 0..h {
                for (i, q_pos) in rows.clone().enumerate() {
                    let q = rot(&qkv[q_pos][head * d..(head + 1) * d], q_pos);
                    let mut logits: Vec<f64> = (0..s)
                        .map(|k| {
                            if k > q_pos || k == text {
                                return f64::NEG_INFINITY; // causal; the padded caption row
                            }
                            let kr = rot(&qkv[k][(h + head) * d..(h + head + 1) * d], k);
                            q.iter().zip(&kr).map(|(a, b)| (a * b) as f64).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    logits.iter_mut().for_each(|l| *l = (*l - mx).exp());
                    let z: f64 = logits.iter().sum();
                    for k in 0..s {
                        let want = logits[k] / z;
                        let got = probs[head][i][k] as f64;
                        assert!((got - want).abs() < 1e-5, "head {head} cell {i} key {k}: {got} vs {want}");
                    }
                    assert!((probs[head][i].iter().sum::<f32>() - 1.0).abs() < 1e-5);
                }
            }
        }
        // Outside a recording nothing is kept and the fused path runs again.
        assert!(!crate::nn::attention_record::active());
        crate::nn::attention_record::push(&layers[0].qkv, &layers[0].probs);
        let nested = crate::nn::attention_record::record(0..1, || crate::nn::attention_record::record(0..1, || Ok(())));
        assert!(nested.unwrap_err().to_string().contains("already running"));
        assert!(!crate::nn::attention_record::active());
    }

    #[test]
    fn heat_map_runs_from_black_to_white_over_the_image() {
        assert_eq!((heat(0.0), heat(1.0), heat(0.5)), ([0, 0, 0], [255, 255, 255], [255, 128, 0]));
        let under = RgbImage::from_pixel(8, 8, Rgb([255, 255, 255]));
        let img = overlay(&under, &[0.0, 1.0, 0.0, 0.5], (2, 2), 16, 1.0);
        assert_eq!(img.dimensions(), (16, 16));
        // Top right cell (value 1) is brighter than top left (value 0).
        assert!(img.get_pixel(12, 2).0[1] > img.get_pixel(2, 2).0[1]);
    }
}
