//! The single-subject benchmark: Subjects200K (OminiControl) and SubjectSpatial200K (UniCombine)
//! parquet shards, as published, turned into single-subject samples of this project's format.
//!
//! Each row holds one two-panel image (`image`, a struct `{bytes, path}`): the left panel is the
//! scene, the right panel the subject on its own. SubjectSpatial200K adds `bbox`, the subject's
//! box in the scene as `[cx, cy, w, h]` normalised over the whole two-panel image (so `cx` lies
//! in `[0, 0.5]`). A sample is: reference = the right panel, target = the left panel, mask =
//! the box, background = the scene with the box blacked out (the "fill" condition), prompt =
//! `description.description_0` (the left panel's description).
//!
//! Which rows: the evaluation partition of the SubjectSpatial200K authors (quality scores
//! `objectConsistency == 5`, `imageQuality == 5`, `compositeStructure >= 3`, not all three 5;
//! the training partition is all three 5), then `count` of those rows drawn without replacement
//! with a seeded generator, written in their order in the shards. Shards are read twice: once
//! for the small columns (scores, descriptions, boxes), once for the images of the chosen rows
//! only, so a 5 GB shard never has to fit in memory.

use super::format::{Meta, SubjectMeta};
use super::instructar::{write_sample, SampleImages};
use crate::error::{Error, IoContext, Result};
use crate::imageio;
use image::{imageops, GrayImage, Luma, RgbImage};
use parquet::file::reader::{FileReader, RowGroupReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::{Type, TypePtr};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `dataset.json` names as the writer (a folder holding it may be replaced with `--force`).
pub const GENERATOR: &str = "tokenar data import-subjects200k v1";

/// Which rows are eligible, by their `quality_assessment` scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Partition {
    /// The evaluation partition: object consistency and image quality 5, composite structure
    /// 3 or 4.
    Test,
    /// The training partition: all three scores 5.
    Train,
    /// Every row with a usable description (and box), scores not read.
    All,
}

impl std::str::FromStr for Partition {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "test" => Ok(Partition::Test),
            "train" => Ok(Partition::Train),
            "all" => Ok(Partition::All),
            _ => Err(Error::invalid("--partition", format!("`{s}` (expected test, train or all)"))),
        }
    }
}

impl Partition {
    /// Whether a row with these scores (composite structure, object consistency, image
    /// quality) belongs to the partition.
    pub fn accepts(self, scores: Option<[i64; 3]>) -> bool {
        match (self, scores) {
            (Partition::All, _) => true,
            (_, None) => false,
            (Partition::Train, Some(s)) => s == [5, 5, 5],
            (Partition::Test, Some([composite, object, quality])) => {
                object == 5 && quality == 5 && composite >= 3 && composite != 5
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportOptions {
    /// Samples to write (fewer when fewer rows are eligible).
    pub count: usize,
    /// Seed of the draw of `count` rows among the eligible ones.
    pub seed: u64,
    /// Side of every written image (panels are square; they are resized straight).
    pub size: u32,
    pub partition: Partition,
    /// Pixels cut from every side of each panel before resizing (Subjects200K draws its
    /// 512-pixel panels with an 8-pixel margin); 0 keeps the panels as split.
    pub padding: u32,
    /// The shards have no `bbox` column (Subjects200K): the whole scene is masked, and the
    /// background is black.
    pub no_box: bool,
}

/// One shard as read, for the provenance record.
#[derive(Debug, Clone, Serialize)]
pub struct ShardInfo {
    pub file: String,
    pub bytes: u64,
    pub rows: u64,
    /// [`super::provenance::file_fingerprint`] of the file.
    pub fingerprint: String,
}

/// Where a written sample came from.
#[derive(Debug, Clone, Serialize)]
pub struct SampleSource {
    pub id: String,
    /// Index into `shards`.
    pub shard: usize,
    /// Row within the shard (0-based, across row groups).
    pub row: u64,
    pub collection: Option<String>,
    pub item: String,
    /// compositeStructure, objectConsistency, imageQuality.
    pub scores: Option<[i64; 3]>,
    /// `[cx, cy, w, h]` as stored.
    pub bbox: Option<[f64; 4]>,
    /// The box in target pixels: x0, y0 inclusive, x1, y1 exclusive.
    #[serde(rename = "box")]
    pub pixel_box: [u32; 4],
}

/// What an import did; also written as the output's `dataset.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub generator: &'static str,
    pub options: ImportOptions,
    pub shards: Vec<ShardInfo>,
    pub rows: u64,
    pub eligible: usize,
    /// Rows left out, counted by reason (not in the partition, no description, no usable box).
    pub excluded: BTreeMap<String, u64>,
    pub samples: Vec<SampleSource>,
}

/// The small columns of one row.
#[derive(Debug, Clone)]
struct RowMeta {
    shard: usize,
    row: u64,
    prompt: String,
    item: String,
    category: String,
    collection: Option<String>,
    scores: Option<[i64; 3]>,
    bbox: Option<[f64; 4]>,
}

fn parquet_err<'a>(path: &'a Path, what: &str) -> impl Fn(parquet::errors::ParquetError) -> Error + 'a {
    let what = what.to_string();
    move |e| Error::bad_file(path, format!("{what}: {e}"))
}

fn open_shard(path: &Path) -> Result<SerializedFileReader<std::fs::File>> {
    let file = std::fs::File::open(path).with_path(path)?;
    SerializedFileReader::new(file).map_err(parquet_err(path, "not a readable parquet file"))
}

/// The top-level field `name` of the shard's schema, if any.
fn column(reader: &SerializedFileReader<std::fs::File>, name: &str) -> Option<TypePtr> {
    let root = reader.metadata().file_metadata().schema_descr().root_schema_ptr();
    root.get_fields().iter().find(|f| f.name() == name).cloned()
}

/// The named child of a group column, if it is a group with one.
fn child<'a>(t: &'a Type, name: &str) -> Option<&'a TypePtr> {
    t.is_group().then(|| t.get_fields().iter().find(|f| f.name() == name)).flatten()
}

/// The top-level columns the metadata pass and the image pass read; an error names the shard
/// and the missing or malformed column.
struct Columns {
    meta: Vec<TypePtr>,
    image: TypePtr,
}

fn check_schema(path: &Path, reader: &SerializedFileReader<std::fs::File>, opts: &ImportOptions) -> Result<Columns> {
    let names = || {
        let root = reader.metadata().file_metadata().schema_descr().root_schema_ptr();
        root.get_fields().iter().map(|f| f.name().to_string()).collect::<Vec<_>>().join(", ")
    };
    let need = |name: &str, why: &str| {
        column(reader, name).ok_or_else(|| {
            Error::bad_file(path, format!("missing column `{name}` ({why}); the shard has: {}", names()))
        })
    };
    // The compressions this build decodes; the published shards, written by pyarrow, use its
    // default (snappy).
    for g in reader.metadata().row_groups() {
        for c in g.columns() {
            let codec = c.compression();
            if !matches!(codec, parquet::basic::Compression::UNCOMPRESSED | parquet::basic::Compression::SNAPPY) {
                return Err(Error::bad_file(
                    path,
                    format!("column `{}` is compressed with {codec}; only snappy and uncompressed shards can be read", c.column_path()),
                ));
            }
        }
    }
    let image = need("image", "the two-panel image, a struct {bytes, path}")?;
    if child(&image, "bytes").is_none_or(|b| !b.is_primitive()) {
        return Err(Error::bad_file(path, "column `image` is not a struct with a binary `bytes` field"));
    }
    let description = need("description", "a struct with `description_0`, the scene's description")?;
    if child(&description, "description_0").is_none() {
        return Err(Error::bad_file(path, "column `description` has no field `description_0`"));
    }
    let mut meta = vec![description];
    if opts.partition != Partition::All {
        let qa = need("quality_assessment", "the scores the partition is chosen by; --partition all does without")?;
        for f in ["compositeStructure", "objectConsistency", "imageQuality"] {
            if child(&qa, f).is_none() {
                return Err(Error::bad_file(path, format!("column `quality_assessment` has no field `{f}`")));
            }
        }
        meta.push(qa);
    }
    if !opts.no_box {
        meta.push(need("bbox", "the subject's box in the scene, as SubjectSpatial200K has; --no-box masks the whole scene")?);
    }
    if let Some(c) = column(reader, "collection") {
        meta.push(c);
    }
    Ok(Columns { meta, image })
}

fn projection(fields: Vec<TypePtr>) -> Result<Type> {
    Type::group_type_builder("schema")
        .with_fields(fields)
        .build()
        .map_err(|e| Error::invalid("parquet projection", e.to_string()))
}

fn get<'a>(row: &'a Row, name: &str) -> Option<&'a Field> {
    row.get_column_iter().find(|(n, _)| n.as_str() == name).map(|(_, f)| f)
}

fn text(f: Option<&Field>) -> Option<String> {
    match f {
        Some(Field::Str(s)) => Some(s.clone()),
        Some(Field::Bytes(b)) => std::str::from_utf8(b.data()).ok().map(str::to_string),
        _ => None,
    }
}

fn integer(f: Option<&Field>) -> Option<i64> {
    match f {
        Some(Field::Long(v)) => Some(*v),
        Some(Field::Int(v)) => Some(*v as i64),
        Some(Field::Short(v)) => Some(*v as i64),
        Some(Field::Byte(v)) => Some(*v as i64),
        _ => None,
    }
}

fn number(f: &Field) -> Option<f64> {
    match f {
        Field::Double(v) => Some(*v),
        Field::Float(v) => Some(*v as f64),
        _ => integer(Some(f)).map(|v| v as f64),
    }
}

/// `bbox` of a row: `Ok(None)` when null, an error text when it is not 4 finite numbers.
fn read_bbox(f: Option<&Field>) -> std::result::Result<Option<[f64; 4]>, String> {
    match f {
        None | Some(Field::Null) => Ok(None),
        Some(Field::ListInternal(list)) => {
            let v: Vec<f64> = list.elements().iter().filter_map(number).collect();
            if v.len() != 4 || list.len() != 4 || v.iter().any(|x| !x.is_finite()) {
                return Err(format!("`bbox` is {f:?}, not 4 finite numbers [cx, cy, w, h]", f = list.elements()));
            }
            Ok(Some([v[0], v[1], v[2], v[3]]))
        }
        Some(other) => Err(format!("`bbox` is {other}, not a list of 4 numbers")),
    }
}

fn read_meta(row: &Row, shard: usize, index: u64) -> std::result::Result<RowMeta, String> {
    let group = |name: &str| match get(row, name) {
        Some(Field::Group(g)) => Some(g),
        _ => None,
    };
    let desc = group("description");
    let d = |k: &str| desc.and_then(|g| text(get(g, k))).unwrap_or_default();
    let scores = group("quality_assessment").and_then(|g| {
        Some([
            integer(get(g, "compositeStructure"))?,
            integer(get(g, "objectConsistency"))?,
            integer(get(g, "imageQuality"))?,
        ])
    });
    Ok(RowMeta {
        shard,
        row: index,
        prompt: d("description_0").trim().to_string(),
        item: d("item"),
        category: d("category"),
        collection: text(get(row, "collection")),
        scores,
        bbox: read_bbox(get(row, "bbox"))?,
    })
}

/// Whether a normalised box `[cx, cy, w, h]` has an area and overlaps the scene (left) panel.
fn box_usable(b: &[f64; 4]) -> bool {
    let [cx, cy, w, h] = *b;
    w > 0.0 && h > 0.0 && cx - w / 2.0 < 0.5 && cx + w / 2.0 > 0.0 && cy - h / 2.0 < 1.0 && cy + h / 2.0 > 0.0
}

/// The box in output pixels (x0, y0 inclusive, x1, y1 exclusive) of a normalised `[cx, cy, w,
/// h]` over the `full_w` x `full_h` two-panel image, for a scene panel whose kept area starts
/// `pad` pixels in and is `panel_w` x `panel_h`, resized to `size`. The edges are rounded
/// outwards, so the box covers every pixel the subject's box touches. `None` when nothing is
/// left inside the panel.
pub fn pixel_box(b: [f64; 4], full_w: u32, full_h: u32, pad: u32, panel_w: u32, panel_h: u32, size: u32) -> Option<[u32; 4]> {
    let [cx, cy, w, h] = b;
    let (fw, fh, p) = (full_w as f64, full_h as f64, pad as f64);
    let x0 = ((cx - w / 2.0) * fw - p).max(0.0);
    let x1 = ((cx + w / 2.0) * fw - p).min(panel_w as f64);
    let y0 = ((cy - h / 2.0) * fh - p).max(0.0);
    let y1 = ((cy + h / 2.0) * fh - p).min(panel_h as f64);
    let (sx, sy) = (size as f64 / panel_w as f64, size as f64 / panel_h as f64);
    let px = |v: f64, s: f64, up: bool| {
        let v = v * s;
        (if up { v.ceil() } else { v.floor() }).clamp(0.0, size as f64) as u32
    };
    let out = [px(x0, sx, false), px(y0, sy, false), px(x1, sx, true), px(y1, sy, true)];
    (out[2] > out[0] && out[3] > out[1]).then_some(out)
}

/// The images of one sample, from the two-panel image's bytes.
struct Made {
    target: RgbImage,
    reference: RgbImage,
    background: RgbImage,
    mask: GrayImage,
    pixel_box: [u32; 4],
}

fn make_sample(bytes: &[u8], meta: &RowMeta, opts: &ImportOptions) -> std::result::Result<Made, String> {
    let img = imageio::decode(bytes).map_err(|e| format!("image: {e}"))?;
    let rgb = imageio::to_rgb_on_white(&img);
    let (w, h) = rgb.dimensions();
    let half = w / 2;
    let p = opts.padding;
    if w % 2 != 0 || half <= 2 * p || h <= 2 * p {
        return Err(format!(
            "image is {w}x{h} pixels: two side-by-side panels need an even width, and each more than twice --padding {p} a side"
        ));
    }
    let (pw, ph) = (half - 2 * p, h - 2 * p);
    let size = opts.size;
    let scene = imageops::crop_imm(&rgb, p, p, pw, ph).to_image();
    let subject = imageops::crop_imm(&rgb, half + p, p, pw, ph).to_image();
    let target = imageio::resize_rgb(&scene, size, size);
    let reference = imageio::resize_rgb(&subject, size, size);
    let pixel_box = match meta.bbox {
        Some(b) if !opts.no_box => pixel_box(b, w, h, p, pw, ph, size)
            .ok_or_else(|| format!("bbox {b:?} leaves nothing of the {pw}x{ph} scene panel"))?,
        _ => [0, 0, size, size],
    };
    let [x0, y0, x1, y1] = pixel_box;
    let inside = |x: u32, y: u32| x >= x0 && x < x1 && y >= y0 && y < y1;
    let mask = GrayImage::from_fn(size, size, |x, y| Luma([if inside(x, y) { 255 } else { 0 }]));
    let mut background = target.clone();
    for (x, y, px) in background.enumerate_pixels_mut() {
        if inside(x, y) {
            px.0 = [0, 0, 0];
        }
    }
    Ok(Made { target, reference, background, mask, pixel_box })
}

/// Folder name of sample `i` (the order of the draw, which is the shards' order).
pub fn sample_name(i: usize) -> String {
    format!("sample_{i}")
}

/// Read `shards`, draw the rows and write the samples to `out` as one folder, atomically: it
/// is built next to `out` and renamed into place at the end. `out` must be absent or empty, or
/// (with `force`) a folder an earlier import wrote, which is then replaced. `progress` is
/// called with a stage name, the count done and the total.
pub fn import(
    shards: &[PathBuf],
    out: &Path,
    opts: &ImportOptions,
    force: bool,
    progress: Option<&(dyn Fn(&str, usize, usize) + Sync)>,
) -> Result<ImportReport> {
    if shards.is_empty() {
        return Err(Error::invalid("shards", "no parquet shard given"));
    }
    if opts.count == 0 {
        return Err(Error::invalid("--count", "must be at least 1"));
    }
    crate::util::check_image_size("--size", opts.size)?;
    let replace = check_output(out, force)?;

    // Pass 1: the small columns of every row.
    let mut infos = Vec::with_capacity(shards.len());
    let mut columns = Vec::with_capacity(shards.len());
    let mut eligible: Vec<RowMeta> = Vec::new();
    let mut excluded: BTreeMap<String, u64> = BTreeMap::new();
    let mut rows_total = 0u64;
    for (si, path) in shards.iter().enumerate() {
        let reader = open_shard(path)?;
        let cols = check_schema(path, &reader, opts)?;
        let rows = reader.metadata().file_metadata().num_rows().max(0) as u64;
        let proj = projection(cols.meta.clone())?;
        let iter = reader.get_row_iter(Some(proj)).map_err(parquet_err(path, "cannot read rows"))?;
        for (ri, row) in iter.enumerate() {
            let row = row.map_err(parquet_err(path, &format!("row {ri}")))?;
            let m = read_meta(&row, si, ri as u64).map_err(|e| Error::bad_file(path, format!("row {ri}: {e}")))?;
            let why = if !opts.partition.accepts(m.scores) {
                Some("not in the partition")
            } else if m.prompt.is_empty() {
                Some("empty description_0")
            } else if !opts.no_box && !m.bbox.as_ref().is_some_and(box_usable) {
                Some("no usable bbox")
            } else {
                None
            };
            match why {
                Some(w) => *excluded.entry(w.to_string()).or_default() += 1,
                None => eligible.push(m),
            }
        }
        rows_total += rows;
        let bytes = std::fs::metadata(path).with_path(path)?.len();
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        infos.push(ShardInfo { file, bytes, rows, fingerprint: super::provenance::file_fingerprint(path)? });
        columns.push(cols);
        if let Some(p) = progress {
            p("shards scanned", si + 1, shards.len());
        }
    }
    if eligible.is_empty() {
        return Err(Error::invalid(
            "shards",
            format!("none of the {rows_total} rows is eligible ({excluded:?}); see --partition and --no-box"),
        ));
    }

    // The draw: `count` of the eligible rows, seeded, kept in the shards' order.
    let n_eligible = eligible.len();
    let chosen = choose(n_eligible, opts.count, opts.seed);
    let picked: Vec<RowMeta> = chosen.into_iter().map(|i| eligible[i].clone()).collect();
    drop(eligible);

    // Pass 2: the images of the chosen rows, one row group at a time.
    let tmp = crate::util::temp_path(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_path(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_path(&tmp)?;
    let written = write_all(shards, &columns, &picked, &tmp, opts, progress);
    let samples = match written {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let report = ImportReport {
        generator: GENERATOR,
        options: opts.clone(),
        shards: infos,
        rows: rows_total,
        eligible: n_eligible,
        excluded,
        samples,
    };
    let finish = || -> Result<()> {
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::invalid("dataset.json", e.to_string()))?;
        crate::util::atomic_write(tmp.join("dataset.json"), text.as_bytes())?;
        if replace {
            std::fs::remove_dir_all(out).with_path(out)?;
        }
        std::fs::rename(&tmp, out).with_path(out)
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(report)
}

/// `count` indices of `0..n` (all of them when `count >= n`) drawn without replacement with
/// the seeded generator, ascending.
pub fn choose(n: usize, count: usize, seed: u64) -> Vec<usize> {
    if count >= n {
        return (0..n).collect();
    }
    let mut rng = crate::util::rng(seed);
    let mut v = rand::seq::index::sample(&mut rng, n, count).into_vec();
    v.sort_unstable();
    v
}

/// `Ok(true)` when `out` holds an earlier import to be replaced (`force`), `Ok(false)` when it
/// is absent or empty; anything else is refused.
fn check_output(out: &Path, force: bool) -> Result<bool> {
    if !out.exists() {
        return Ok(false);
    }
    if !out.is_dir() {
        return Err(Error::bad_file(out, "exists and is not a folder"));
    }
    if std::fs::read_dir(out).with_path(out)?.next().is_none() {
        std::fs::remove_dir(out).with_path(out)?;
        return Ok(false);
    }
    let ours = std::fs::read_to_string(out.join("dataset.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("generator").and_then(|g| g.as_str()) == Some(GENERATOR));
    match (ours, force) {
        (true, true) => Ok(true),
        (true, false) => Err(Error::bad_file(out, "holds an earlier import; choose another --out, or --force to replace it")),
        (false, _) => Err(Error::bad_file(out, "is not empty and was not written by `data import-subjects200k`; choose another --out")),
    }
}

fn write_all(
    shards: &[PathBuf],
    columns: &[Columns],
    picked: &[RowMeta],
    dir: &Path,
    opts: &ImportOptions,
    progress: Option<&(dyn Fn(&str, usize, usize) + Sync)>,
) -> Result<Vec<SampleSource>> {
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut sources = Vec::with_capacity(picked.len());
    let mut k = 0;
    while k < picked.len() {
        let si = picked[k].shard;
        let end = k + picked[k..].iter().take_while(|m| m.shard == si).count();
        let path = &shards[si];
        let reader = open_shard(path)?;
        let proj = projection(vec![columns[si].image.clone()])?;
        // Row groups in order; the chosen rows of this shard are ascending.
        let mut first_row = 0u64;
        let mut j = k;
        for g in 0..reader.num_row_groups() {
            if j == end {
                break;
            }
            let group_rows = reader.metadata().row_group(g).num_rows().max(0) as u64;
            let last = first_row + group_rows;
            let mut wanted: Vec<(usize, &RowMeta)> = Vec::new();
            while j < end && picked[j].row < last {
                wanted.push((j, &picked[j]));
                j += 1;
            }
            if !wanted.is_empty() {
                let group = reader.get_row_group(g).map_err(parquet_err(path, &format!("row group {g}")))?;
                let bytes = image_bytes(path, group.as_ref(), proj.clone(), first_row, &wanted)?;
                let made: Vec<SampleSource> = bytes
                    .into_par_iter()
                    .map(|(idx, m, data)| {
                        let r = write_one(dir, idx, m, &data, opts).map_err(|e| Error::bad_file(path, format!("row {}: {e}", m.row)));
                        if let Some(p) = progress {
                            let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                            p("samples written", d, picked.len());
                        }
                        r
                    })
                    .collect::<Result<Vec<_>>>()?;
                sources.extend(made);
            }
            first_row = last;
        }
        if j != end {
            return Err(Error::bad_file(path, format!("row {} is beyond the shard's row groups", picked[j].row)));
        }
        k = end;
    }
    Ok(sources)
}

/// The image bytes of the `wanted` rows (ascending, all in this row group, which starts at row
/// `first_row` of the shard).
fn image_bytes<'a>(
    path: &Path,
    group: &dyn RowGroupReader,
    proj: Type,
    first_row: u64,
    wanted: &[(usize, &'a RowMeta)],
) -> Result<Vec<(usize, &'a RowMeta, Vec<u8>)>> {
    let iter = group.get_row_iter(Some(proj)).map_err(parquet_err(path, "cannot read column `image`"))?;
    let mut out = Vec::with_capacity(wanted.len());
    let mut w = wanted.iter().peekable();
    for (offset, row) in iter.enumerate() {
        let Some(&&(idx, m)) = w.peek() else { break };
        let index = first_row + offset as u64;
        if index != m.row {
            continue;
        }
        let row = row.map_err(parquet_err(path, &format!("row {index}")))?;
        let bytes = match get(&row, "image") {
            Some(Field::Group(g)) => match get(g, "bytes") {
                Some(Field::Bytes(b)) => b.data().to_vec(),
                _ => return Err(Error::bad_file(path, format!("row {index}: `image.bytes` is empty (null)"))),
            },
            _ => return Err(Error::bad_file(path, format!("row {index}: `image` is null"))),
        };
        if bytes.len() as u64 > imageio::MAX_IMAGE_FILE_BYTES {
            return Err(Error::bad_file(
                path,
                format!("row {index}: image of {} bytes, more than the {} an image may have", bytes.len(), imageio::MAX_IMAGE_FILE_BYTES),
            ));
        }
        out.push((idx, m, bytes));
        w.next();
    }
    if let Some((_, m)) = w.next() {
        return Err(Error::bad_file(path, format!("row {} not found in its row group", m.row)));
    }
    Ok(out)
}

fn write_one(dir: &Path, idx: usize, m: &RowMeta, bytes: &[u8], opts: &ImportOptions) -> std::result::Result<SampleSource, String> {
    let s = make_sample(bytes, m, opts)?;
    let id = sample_name(idx);
    let meta = Meta {
        prompt: m.prompt.clone(),
        subjects: vec![SubjectMeta {
            category: if m.category.is_empty() { m.item.clone() } else { m.category.clone() },
            bbox: Some(s.pixel_box),
            // The box is the subject's region: the single subject owns all of the mask.
            mask: Some(super::instructar::MASK.to_string()),
            reference: Some(format!("{}/0.png", super::instructar::REF_DIR)),
            ..SubjectMeta::default()
        }],
        ..Meta::default()
    };
    let images = SampleImages {
        refs: std::slice::from_ref(&s.reference),
        background: &s.background,
        target: Some(&s.target),
        mask: Some(&s.mask),
        prompt: &m.prompt,
        meta: Some(&meta),
        extra_masks: &[],
    };
    write_sample(&dir.join(&id), &images).map_err(|e| e.to_string())?;
    Ok(SampleSource {
        id,
        shard: m.shard,
        row: m.row,
        collection: m.collection.clone(),
        item: m.item.clone(),
        scores: m.scores,
        bbox: m.bbox,
        pixel_box: s.pixel_box,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_follow_the_scores() {
        let t = Partition::Test;
        assert!(t.accepts(Some([3, 5, 5])) && t.accepts(Some([4, 5, 5])));
        assert!(!t.accepts(Some([5, 5, 5])) && !t.accepts(Some([2, 5, 5])));
        assert!(!t.accepts(Some([4, 4, 5])) && !t.accepts(Some([4, 5, 4])) && !t.accepts(None));
        assert!(Partition::Train.accepts(Some([5, 5, 5])) && !Partition::Train.accepts(Some([4, 5, 5])));
        assert!(Partition::All.accepts(None));
        assert!("bogus".parse::<Partition>().is_err());
        assert_eq!("test".parse::<Partition>().unwrap(), Partition::Test);
    }

    #[test]
    fn boxes_map_from_the_two_panel_image_to_target_pixels() {
        // A 200x100 pair: the scene is x in [0, 100). A box centred in the scene covering half
        // of it each way.
        let b = [0.25, 0.5, 0.25, 0.5];
        assert_eq!(pixel_box(b, 200, 100, 0, 100, 100, 100), Some([25, 25, 75, 75]));
        assert_eq!(pixel_box(b, 200, 100, 0, 100, 100, 50), Some([12, 12, 38, 38]));
        // A 10-pixel margin cut from each side: the panel is 80x80, the box 25..75 -> 15..65.
        assert_eq!(pixel_box(b, 200, 100, 10, 80, 80, 80), Some([15, 15, 65, 65]));
        // Spilling into the subject panel is clipped to the scene.
        assert_eq!(pixel_box([0.5, 0.5, 0.2, 0.2], 200, 100, 0, 100, 100, 100), Some([80, 40, 100, 60]));
        // Entirely in the subject panel: nothing left.
        assert_eq!(pixel_box([0.75, 0.5, 0.1, 0.1], 200, 100, 0, 100, 100, 100), None);
        assert!(box_usable(&b) && !box_usable(&[0.75, 0.5, 0.1, 0.1]) && !box_usable(&[0.2, 0.5, 0.0, 0.1]));
    }

    #[test]
    fn the_draw_is_seeded_sorted_and_without_repeats() {
        let a = choose(1000, 200, 7);
        assert_eq!(a, choose(1000, 200, 7));
        assert_ne!(a, choose(1000, 200, 8));
        assert_eq!(a.len(), 200);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && *a.last().unwrap() < 1000);
        assert_eq!(choose(5, 200, 7), vec![0, 1, 2, 3, 4]);
    }
}
