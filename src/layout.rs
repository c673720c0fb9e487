//! The sequence plan of one sample: which segments the token sequence holds and in which order,
//! each position's token-index id, its 2D RoPE grid cell, and which positions carry loss.
//!
//! Training and sampling both read a [`Layout`]; nothing else computes offsets.
//!
//! Order (both schemes): conditions (reference slots, background), text, instruct tokens, then
//! the generated part (ITD copies of the references when ITD is on, then the target). The
//! training input is the full sequence minus its last token; an input position carries loss
//! when the token that follows it is a generated token.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// How the condition images and the generated images are placed on the RoPE grid and which
/// index ids they get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    /// The reference code's scheme (public EditAR / TokenAR checkpoints).
    ///
    /// - `pad_to`: the number of reference slots the checkpoint requires (TokenAR: 3; the
    ///   caller fills unused slots with the codes of a mid-grey image). `None`: one slot per
    ///   given reference, no padding.
    /// - `quirk_index`: the background gets the last reference loop index (as the reference
    ///   code does) instead of its own id `max_refs`.
    Reference { pad_to: Option<usize>, quirk_index: bool },
    /// Every image on its own `h x w` tile; tiles laid out along the column axis so that each
    /// generated image sits `max_refs + 1` tiles to the right of its source.
    Tiles,
}

impl Default for Scheme {
    fn default() -> Self {
        Scheme::Tiles
    }
}

/// Description of one sample's sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutSpec {
    /// References given in this sample.
    pub n_refs: usize,
    /// References the model supports (index embedding has `max_refs + 1` rows).
    pub max_refs: usize,
    /// Token grid of the background and the target (rows, cols).
    pub grid: (usize, usize),
    /// Token grid of every reference and its ITD copy when it differs from `grid` (`None`:
    /// `grid`). Smaller only (each reference cell is also a cell of `grid`), Tiles scheme only.
    #[serde(default)]
    pub ref_grid: Option<(usize, usize)>,
    /// Caption positions.
    pub text_len: usize,
    /// Instruct tokens (0 = off).
    pub n_instruct: usize,
    /// Identity-token disentanglement: generate every reference before the target.
    pub itd: bool,
    /// Whether a background (condition) image is part of the sequence (false for t2i).
    pub background: bool,
    pub scheme: Scheme,
}

impl LayoutSpec {
    /// The grid of the references and their ITD copies.
    pub fn ref_grid(&self) -> (usize, usize) {
        self.ref_grid.unwrap_or(self.grid)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// Reference slot `i` (a padded slot is still a `Ref`).
    Ref(usize),
    Background,
    Text,
    Instruct,
    /// The ITD copy of reference slot `i` (generated).
    ItdRef(usize),
    /// The target image (generated).
    Target,
}

impl SegmentKind {
    pub fn is_generated(self) -> bool {
        matches!(self, SegmentKind::ItdRef(_) | SegmentKind::Target)
    }
    pub fn is_image_condition(self) -> bool {
        matches!(self, SegmentKind::Ref(_) | SegmentKind::Background)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub kind: SegmentKind,
    pub start: usize,
    pub len: usize,
}

/// A position's RoPE rotation: a (row, col) cell, or `Zero` for LlamaGen's caption quirk
/// (cos = sin = 0, which zeroes q and k at that position).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeCell {
    Zero,
    Cell(usize, usize),
}

/// The plan of one sample's sequence (see the module docs).
#[derive(Clone, Debug)]
pub struct Layout {
    spec: LayoutSpec,
    segments: Vec<Segment>,
    index_ids: Vec<Option<usize>>,
    cells: Vec<RopeCell>,
    image_cells: Vec<Option<(usize, usize)>>,
    prefix_len: usize,
    total_len: usize,
    ref_slots: usize,
}

impl Layout {
    pub fn new(spec: &LayoutSpec) -> Result<Self> {
        let (h, w) = spec.grid;
        if h == 0 || w == 0 {
            return Err(Error::invalid("layout grid", format!("{h}x{w} must be positive")));
        }
        if spec.n_refs > spec.max_refs {
            return Err(Error::invalid(
                "layout",
                format!("{} references given but the model supports at most {}", spec.n_refs, spec.max_refs),
            ));
        }
        let ref_slots = match spec.scheme {
            Scheme::Reference { pad_to: Some(p), .. } => {
                if p < spec.n_refs || p > spec.max_refs {
                    return Err(Error::invalid(
                        "layout",
                        format!("pad_to {p} must lie between n_refs {} and max_refs {}", spec.n_refs, spec.max_refs),
                    ));
                }
                p
            }
            _ => spec.n_refs,
        };
        let (rh, rw) = spec.ref_grid();
        if rh == 0 || rw == 0 || rh > h || rw > w {
            return Err(Error::invalid("layout reference grid", format!("{rh}x{rw} must be positive and within the image grid {h}x{w}")));
        }
        if (rh, rw) != (h, w) && spec.scheme != Scheme::Tiles {
            return Err(Error::invalid(
                "layout reference grid",
                format!("{rh}x{rw} differs from the image grid {h}x{w}, which only the Tiles scheme supports"),
            ));
        }
        let hw = h * w;
        let rhw = rh * rw;
        let mut kinds: Vec<(SegmentKind, usize)> = Vec::new();
        kinds.extend((0..ref_slots).map(|i| (SegmentKind::Ref(i), rhw)));
        if spec.background {
            kinds.push((SegmentKind::Background, hw));
        }
        kinds.push((SegmentKind::Text, spec.text_len));
        kinds.push((SegmentKind::Instruct, spec.n_instruct));
        if spec.itd {
            kinds.extend((0..ref_slots).map(|i| (SegmentKind::ItdRef(i), rhw)));
        }
        kinds.push((SegmentKind::Target, hw));

        let mut segments = Vec::new();
        let mut pos = 0;
        for (kind, len) in kinds {
            if len > 0 {
                segments.push(Segment { kind, start: pos, len });
            }
            pos += len;
        }
        let total_len = pos;
        let prefix_len = segments
            .iter()
            .filter(|s| !s.kind.is_generated())
            .map(|s| s.len)
            .sum::<usize>();

        let mut index_ids = vec![None; total_len];
        let mut cells = vec![RopeCell::Zero; total_len];
        let mut image_cells = vec![None; total_len];
        let n_cond = ref_slots + spec.background as usize;
        let generated_len = total_len - prefix_len;
        for seg in &segments {
            let id = match (seg.kind, spec.scheme) {
                (SegmentKind::Ref(i), _) => Some(i),
                // Quirk of the reference code: the background reuses the last loop index.
                (SegmentKind::Background, Scheme::Reference { quirk_index: true, .. }) => {
                    Some(ref_slots.saturating_sub(1))
                }
                (SegmentKind::Background, _) => Some(spec.max_refs),
                _ => None,
            };
            let seg_w = match seg.kind {
                SegmentKind::Ref(_) | SegmentKind::ItdRef(_) => rw,
                _ => w,
            };
            for j in 0..seg.len {
                let p = seg.start + j;
                index_ids[p] = id;
                if !matches!(seg.kind, SegmentKind::Text | SegmentKind::Instruct) {
                    image_cells[p] = Some((j / seg_w, j % seg_w));
                }
                if spec.scheme == Scheme::Tiles {
                    cells[p] = tile_cell(seg.kind, j, seg_w, spec);
                }
            }
        }
        if let Scheme::Reference { .. } = spec.scheme {
            reference_cells(&segments, spec, n_cond, prefix_len, generated_len, &mut cells)?;
        }
        Ok(Self {
            spec: spec.clone(),
            segments,
            index_ids,
            cells,
            image_cells,
            prefix_len,
            total_len,
            ref_slots,
        })
    }

    pub fn spec(&self) -> &LayoutSpec {
        &self.spec
    }
    /// Positions of the conditions (images, text, instruct): what prefill consumes.
    pub fn prefix_len(&self) -> usize {
        self.prefix_len
    }
    /// Positions of the generated part (ITD copies and target).
    pub fn generated_len(&self) -> usize {
        self.total_len - self.prefix_len
    }
    pub fn total_len(&self) -> usize {
        self.total_len
    }
    /// Reference segments in the sequence (including padded slots).
    pub fn ref_slots(&self) -> usize {
        self.ref_slots
    }
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
    pub fn segment(&self, kind: SegmentKind) -> Option<&Segment> {
        self.segments.iter().find(|s| s.kind == kind)
    }
    /// Token-index id of every position (`None`: no index embedding there).
    pub fn index_ids(&self) -> &[Option<usize>] {
        &self.index_ids
    }
    /// RoPE cell of every position.
    pub fn rope_cells(&self) -> &[RopeCell] {
        &self.cells
    }
    /// For every image position, its (row, col) inside its own image; `None` for text and
    /// instruct positions. (What the cell embedding adds; independent of the RoPE scheme.)
    pub fn image_cells(&self) -> &[Option<(usize, usize)>] {
        &self.image_cells
    }
    /// Length of the training input (the full sequence minus its last token).
    pub fn input_len(&self) -> usize {
        self.total_len - 1
    }
    /// For every training-input position, whether it carries loss (its next token is generated).
    pub fn loss_mask(&self) -> Vec<bool> {
        (0..self.input_len()).map(|p| p + 1 >= self.prefix_len).collect()
    }
    /// The input positions that carry loss: a contiguous range `prefix_len - 1 .. total_len - 1`.
    pub fn loss_range(&self) -> std::ops::Range<usize> {
        self.prefix_len - 1..self.total_len - 1
    }
    /// Offset of the target image inside the generated part.
    pub fn target_offset_in_generated(&self) -> usize {
        self.generated_len() - self.spec.grid.0 * self.spec.grid.1
    }
}

/// Tiles scheme: tile `t` covers columns `t*w .. (t+1)*w` (`w` the image grid's width; an image
/// of `seg_w` columns, a reference on a smaller grid, fills the tile's top-left corner); text
/// and instruct sit on (0, 0) with an ordinary (identity) rotation, so they are not zeroed like
/// LlamaGen captions.
fn tile_cell(kind: SegmentKind, j: usize, seg_w: usize, spec: &LayoutSpec) -> RopeCell {
    let (_, w) = spec.grid;
    let m = spec.max_refs;
    let tile = match kind {
        SegmentKind::Ref(i) => i,
        SegmentKind::Background => m,
        SegmentKind::ItdRef(i) => m + 1 + i,
        SegmentKind::Target => 2 * m + 1,
        SegmentKind::Text | SegmentKind::Instruct => return RopeCell::Cell(0, 0),
    };
    RopeCell::Cell(j / seg_w, tile * w + j % seg_w)
}

/// Reference scheme: the RoPE tables of the reference code, chosen by the number `n` of
/// condition images (reference slots plus background). Text and instruct tokens get the zero
/// quirk. Each table places the condition images, flattened row-major, on one block of cells
/// and the generated tokens, flattened row-major, on another:
///
/// | n | reference function | table | conditions | generated |
/// |---|---|---|---|---|
/// | 0 | LlamaGen `precompute_freqs_cis_2d` | `h x w` | - | the whole table |
/// | 1 | EditAR `precompute_freqs_cis_2d_edit` | `2h x 2w` | `[0:h, 0:w]` | `[h:2h, w:2w]` |
/// | 2 | TokenAR `precompute_freqs_cis_2d_edit2` | `4h x 4w` | `[0:h, 0:2w]` | `[3h:4h, 3w:4w]` |
/// | >= 3 | TokenAR `precompute_freqs_cis_2d_editplus` | `(m+e)h x (m+e)w` | `[0:mh, 0:mw]` | the last `eh x ew` |
///
/// with `m = isqrt(n)` and `e = isqrt(edited)`, where `edited = n` when ITD is on (the
/// reference's training script sets `max_edited_num = max_ref_num` when the target is
/// concatenated) and 1 otherwise. With ITD and four slots (TokenAR) the 4 generated images thus
/// sit on their own `2h x 2w` block, each image a strip of `h/2` rows by `2w` columns.
///
/// Where the reference's table has fewer cells than the sequence needs (ITD with one or two
/// condition images, or `n` that is not a square for `editplus`) the reference code cannot run
/// that sequence; this is an error here too.
struct ReferenceTable {
    /// (row, col) of the first cell and the width of the condition block.
    cond: (usize, usize, usize),
    cond_cells: usize,
    /// (row, col) of the first cell and the width of the generated block.
    gen: (usize, usize, usize),
    gen_cells: usize,
}

impl ReferenceTable {
    fn new(n_cond: usize, itd: bool, (h, w): (usize, usize)) -> Self {
        let hw = h * w;
        match n_cond {
            0 => Self { cond: (0, 0, w), cond_cells: 0, gen: (0, 0, w), gen_cells: hw },
            1 => Self { cond: (0, 0, w), cond_cells: hw, gen: (h, w, w), gen_cells: hw },
            2 => Self { cond: (0, 0, 2 * w), cond_cells: 2 * hw, gen: (3 * h, 3 * w, w), gen_cells: hw },
            n => {
                let m = isqrt(n);
                let e = if itd { isqrt(n).max(1) } else { 1 };
                Self {
                    cond: (0, 0, m * w),
                    cond_cells: m * m * hw,
                    gen: (m * h, m * w, e * w),
                    gen_cells: e * e * hw,
                }
            }
        }
    }

    fn cell(&self, generated: bool, flat: usize) -> RopeCell {
        let (r0, c0, width) = if generated { self.gen } else { self.cond };
        RopeCell::Cell(r0 + flat / width, c0 + flat % width)
    }
}

fn isqrt(n: usize) -> usize {
    let mut r = (n as f64).sqrt() as usize;
    while r * r > n {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= n {
        r += 1;
    }
    r
}

fn reference_cells(
    segments: &[Segment],
    spec: &LayoutSpec,
    n_cond: usize,
    prefix_len: usize,
    generated_len: usize,
    cells: &mut [RopeCell],
) -> Result<()> {
    let hw = spec.grid.0 * spec.grid.1;
    let table = ReferenceTable::new(n_cond, spec.itd, spec.grid);
    let function = match n_cond {
        0 => "precompute_freqs_cis_2d",
        1 => "precompute_freqs_cis_2d_edit",
        2 => "precompute_freqs_cis_2d_edit2",
        _ => "precompute_freqs_cis_2d_editplus",
    };
    if n_cond * hw > table.cond_cells {
        return Err(Error::invalid(
            "layout",
            format!(
                "{n_cond} condition images need {} RoPE cells but the reference table ({function}) has {}; \
                 the reference code supports 1, 2, 4, 9, ... condition images",
                n_cond * hw,
                table.cond_cells
            ),
        ));
    }
    if generated_len > table.gen_cells {
        return Err(Error::invalid(
            "layout",
            format!(
                "{generated_len} generated tokens need more RoPE cells than the reference table \
                 ({function}) has for them ({}); ITD needs 4, 9, ... condition images in this scheme",
                table.gen_cells
            ),
        ));
    }
    for seg in segments {
        if matches!(seg.kind, SegmentKind::Text | SegmentKind::Instruct) {
            continue; // RopeCell::Zero
        }
        for j in 0..seg.len {
            let p = seg.start + j;
            cells[p] = if seg.kind.is_generated() {
                table.cell(true, p - prefix_len)
            } else {
                // Condition images come first in the sequence: position = flattened index.
                table.cell(false, p)
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n_refs: usize, itd: bool, scheme: Scheme) -> LayoutSpec {
        LayoutSpec {
            n_refs,
            max_refs: 3,
            grid: (2, 2),
            ref_grid: None,
            text_len: 3,
            n_instruct: 2,
            itd,
            background: true,
            scheme,
        }
    }

    fn kinds(l: &Layout) -> Vec<(SegmentKind, usize, usize)> {
        l.segments().iter().map(|s| (s.kind, s.start, s.len)).collect()
    }

    #[test]
    fn tiles_three_refs_itd() {
        let l = Layout::new(&spec(3, true, Scheme::Tiles)).unwrap();
        use SegmentKind::*;
        assert_eq!(
            kinds(&l),
            vec![
                (Ref(0), 0, 4),
                (Ref(1), 4, 4),
                (Ref(2), 8, 4),
                (Background, 12, 4),
                (Text, 16, 3),
                (Instruct, 19, 2),
                (ItdRef(0), 21, 4),
                (ItdRef(1), 25, 4),
                (ItdRef(2), 29, 4),
                (Target, 33, 4),
            ]
        );
        assert_eq!((l.prefix_len(), l.generated_len(), l.total_len()), (21, 16, 37));
        let ids = l.index_ids();
        assert_eq!(&ids[0..4], &[Some(0); 4]);
        assert_eq!(&ids[8..12], &[Some(2); 4]);
        assert_eq!(&ids[12..16], &[Some(3); 4]);
        assert!(ids[16..].iter().all(|i| i.is_none()));
        let c = l.rope_cells();
        // ref 1 on tile 1 (cols 2..4), background on tile 3, ITD ref 1 on tile 5, target on tile 7.
        assert_eq!(&c[4..8], &[RopeCell::Cell(0, 2), RopeCell::Cell(0, 3), RopeCell::Cell(1, 2), RopeCell::Cell(1, 3)]);
        assert_eq!(c[12], RopeCell::Cell(0, 6));
        assert_eq!(c[16], RopeCell::Cell(0, 0));
        assert_eq!(c[20], RopeCell::Cell(0, 0));
        assert_eq!(c[25], RopeCell::Cell(0, 10));
        assert_eq!(&c[33..37], &[RopeCell::Cell(0, 14), RopeCell::Cell(0, 15), RopeCell::Cell(1, 14), RopeCell::Cell(1, 15)]);
        // Every generated image sits (max_refs + 1) tiles right of its source.
        for (src, dst) in [(4usize, 25usize), (12, 33)] {
            for j in 0..4 {
                let (RopeCell::Cell(r0, c0), RopeCell::Cell(r1, c1)) = (c[src + j], c[dst + j]) else { panic!() };
                assert_eq!((r1, c1), (r0, c0 + 4 * 2));
            }
        }
        let m = l.loss_mask();
        assert_eq!(m.len(), 36);
        assert!(m[..20].iter().all(|x| !x) && m[20..].iter().all(|x| *x));
        assert_eq!(l.loss_range(), 20..36);
    }

    #[test]
    fn tiles_two_refs_no_itd_has_no_padding() {
        let l = Layout::new(&spec(2, false, Scheme::Tiles)).unwrap();
        use SegmentKind::*;
        assert_eq!(
            kinds(&l),
            vec![(Ref(0), 0, 4), (Ref(1), 4, 4), (Background, 8, 4), (Text, 12, 3), (Instruct, 15, 2), (Target, 17, 4)]
        );
        assert_eq!(l.index_ids()[8], Some(3));
        // Target keeps its tile (2*max_refs+1 = 7) whatever the number of references.
        assert_eq!(l.rope_cells()[17], RopeCell::Cell(0, 14));
        assert_eq!(l.loss_range(), 16..20);
        assert_eq!(l.loss_mask().iter().filter(|x| **x).count(), 4);
    }

    #[test]
    fn tiles_with_a_smaller_reference_grid() {
        // Image grid 3x3, references (and their ITD copies) on 2x2: each reference fills the
        // top-left corner of its tile, with its own (row, col) cells.
        let s = LayoutSpec { grid: (3, 3), ref_grid: Some((2, 2)), ..spec(2, true, Scheme::Tiles) };
        let l = Layout::new(&s).unwrap();
        use SegmentKind::*;
        assert_eq!(
            kinds(&l),
            vec![
                (Ref(0), 0, 4),
                (Ref(1), 4, 4),
                (Background, 8, 9),
                (Text, 17, 3),
                (Instruct, 20, 2),
                (ItdRef(0), 22, 4),
                (ItdRef(1), 26, 4),
                (Target, 30, 9),
            ]
        );
        assert_eq!((l.prefix_len(), l.generated_len(), l.target_offset_in_generated()), (22, 17, 8));
        let c = l.rope_cells();
        // Ref 1 on tile 1 (columns 3..6), its ITD copy on tile 5, background on tile 3.
        assert_eq!(&c[4..8], &[RopeCell::Cell(0, 3), RopeCell::Cell(0, 4), RopeCell::Cell(1, 3), RopeCell::Cell(1, 4)]);
        assert_eq!(&c[26..30], &[RopeCell::Cell(0, 15), RopeCell::Cell(0, 16), RopeCell::Cell(1, 15), RopeCell::Cell(1, 16)]);
        assert_eq!(c[8], RopeCell::Cell(0, 9));
        assert_eq!(c[16], RopeCell::Cell(2, 11));
        assert_eq!(c[38], RopeCell::Cell(2, 23));
        let cells = l.image_cells();
        assert_eq!(&cells[4..8], &[Some((0, 0)), Some((0, 1)), Some((1, 0)), Some((1, 1))]);
        assert_eq!(cells[16], Some((2, 2)));
        assert_eq!(cells[29], Some((1, 1)));
        assert_eq!(l.loss_range(), 21..38);
        // A reference grid larger than the image grid, or outside the Tiles scheme, is refused.
        let big = LayoutSpec { ref_grid: Some((4, 4)), ..s.clone() };
        assert!(Layout::new(&big).unwrap_err().to_string().contains("4x4"));
        let reference = LayoutSpec { scheme: Scheme::Reference { pad_to: None, quirk_index: false }, ..s };
        assert!(Layout::new(&reference).unwrap_err().to_string().contains("Tiles"));
    }

    #[test]
    fn reference_tokenar_padded_quirk() {
        // 2 refs given, 3 slots required, background gets the last loop index (2).
        let s = spec(2, false, Scheme::Reference { pad_to: Some(3), quirk_index: true });
        let l = Layout::new(&s).unwrap();
        assert_eq!(l.ref_slots(), 3);
        assert_eq!((l.prefix_len(), l.total_len()), (21, 25));
        let ids = l.index_ids();
        assert_eq!(ids[8], Some(2));
        assert_eq!(ids[12], Some(2));
        let c = l.rope_cells();
        // 4 condition images of 2x2 flattened on a 4-wide grid: position p -> (p/4, p%4).
        assert_eq!(c[0], RopeCell::Cell(0, 0));
        assert_eq!(c[5], RopeCell::Cell(1, 1));
        assert_eq!(c[15], RopeCell::Cell(3, 3));
        assert!(c[16..21].iter().all(|x| *x == RopeCell::Zero));
        // editplus with 4 conditions and no ITD (m = 2, e = 1): a 6x6 table, the target on its
        // bottom-right 2x2 block.
        assert_eq!(&c[21..25], &[RopeCell::Cell(4, 4), RopeCell::Cell(4, 5), RopeCell::Cell(5, 4), RopeCell::Cell(5, 5)]);
        // Distinct ids when the quirk is off.
        let l2 = Layout::new(&spec(2, false, Scheme::Reference { pad_to: Some(3), quirk_index: false })).unwrap();
        assert_eq!(l2.index_ids()[12], Some(3));
    }

    #[test]
    fn reference_itd_on_its_own_block() {
        let s = spec(3, true, Scheme::Reference { pad_to: Some(3), quirk_index: true });
        let l = Layout::new(&s).unwrap();
        assert_eq!(l.generated_len(), 16);
        let c = l.rope_cells();
        // editplus with ITD (m = e = 2): an 8x8 table; the 16 generated tokens flattened
        // row-major over its bottom-right 4x4 block, away from the conditions' 4x4 block.
        assert_eq!(c[21], RopeCell::Cell(4, 4));
        assert_eq!(c[22], RopeCell::Cell(4, 5));
        assert_eq!(c[25], RopeCell::Cell(5, 4));
        assert_eq!(c[36], RopeCell::Cell(7, 7));
        assert_eq!(c[15], RopeCell::Cell(3, 3));
        assert_eq!(l.target_offset_in_generated(), 12);
        assert_eq!(l.loss_range(), 20..36);
    }

    #[test]
    fn reference_editar_and_t2i() {
        let mut s = spec(0, false, Scheme::Reference { pad_to: None, quirk_index: false });
        s.max_refs = 0;
        let l = Layout::new(&s).unwrap();
        // [cond(4), text(3), instruct(2), target(4)]
        let c = l.rope_cells();
        assert_eq!(c[3], RopeCell::Cell(1, 1));
        assert_eq!(&c[9..13], &[RopeCell::Cell(2, 2), RopeCell::Cell(2, 3), RopeCell::Cell(3, 2), RopeCell::Cell(3, 3)]);
        assert_eq!(l.index_ids()[0], Some(0));
        s.background = false;
        s.n_instruct = 0;
        let l = Layout::new(&s).unwrap();
        assert_eq!((l.prefix_len(), l.total_len()), (3, 7));
        assert_eq!(l.rope_cells()[6], RopeCell::Cell(1, 1));
        assert_eq!(l.loss_range(), 2..6);
    }

    /// The reference code's tables for a 32x32 grid, written out from
    /// `precompute_freqs_cis_2d_edit`, `_edit2` and `_editplus` (gpt_edit.py of TokenAR).
    #[test]
    fn reference_tables_at_full_size() {
        let full = |n_refs: usize, background: bool, itd: bool| LayoutSpec {
            n_refs,
            max_refs: 3,
            grid: (32, 32),
            ref_grid: None,
            text_len: 120,
            n_instruct: 120,
            itd,
            background,
            scheme: Scheme::Reference { pad_to: None, quirk_index: true },
        };
        let cell = |l: &Layout, p: usize| match l.rope_cells()[p] {
            RopeCell::Cell(r, c) => (r, c),
            RopeCell::Zero => panic!("zero cell at {p}"),
        };
        // TokenAR, 3 refs + background, ITD: 128x128 table, conditions on [0:64, 0:64],
        // generated on [64:128, 64:128], each flattened row-major.
        let l = Layout::new(&full(3, true, true)).unwrap();
        let g0 = l.prefix_len();
        assert_eq!(g0, 4096 + 240);
        assert_eq!(cell(&l, 1023), (15, 63));
        assert_eq!(cell(&l, 4095), (63, 63));
        assert_eq!(l.rope_cells()[4096], RopeCell::Zero);
        assert_eq!(cell(&l, g0), (64, 64));
        assert_eq!(cell(&l, g0 + 63), (64, 127));
        assert_eq!(cell(&l, g0 + 64), (65, 64));
        assert_eq!(cell(&l, g0 + 1024), (80, 64));
        assert_eq!(cell(&l, l.total_len() - 1), (127, 127));
        // Without ITD (max_edited_num 1): a 96x96 table, the target on [64:96, 64:96].
        let l = Layout::new(&full(3, true, false)).unwrap();
        let g0 = l.prefix_len();
        assert_eq!(cell(&l, g0), (64, 64));
        assert_eq!(cell(&l, g0 + 33), (65, 65));
        assert_eq!(cell(&l, l.total_len() - 1), (95, 95));
        // Two conditions (edit2): conditions on [0:32, 0:64], the target on [96:128, 96:128].
        let l = Layout::new(&full(1, true, false)).unwrap();
        assert_eq!(cell(&l, 1024), (16, 0));
        assert_eq!(cell(&l, 2047), (31, 63));
        let g0 = l.prefix_len();
        assert_eq!(cell(&l, g0), (96, 96));
        assert_eq!(cell(&l, l.total_len() - 1), (127, 127));
        // EditAR's one condition (edit): [0:32, 0:32] and [32:64, 32:64].
        let l = Layout::new(&full(0, true, false)).unwrap();
        assert_eq!(cell(&l, 33), (1, 1));
        assert_eq!(cell(&l, l.prefix_len()), (32, 32));
        // Sequences the reference tables cannot hold.
        let err = Layout::new(&full(2, true, false)).unwrap_err().to_string();
        assert!(err.contains("precompute_freqs_cis_2d_editplus"), "{err}");
        assert!(Layout::new(&full(1, true, true)).is_err());
        assert!(Layout::new(&full(0, true, true)).is_ok(), "no references: nothing to copy");
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(Layout::new(&spec(4, false, Scheme::Tiles)).is_err());
        assert!(Layout::new(&spec(3, false, Scheme::Reference { pad_to: Some(2), quirk_index: true })).is_err());
        let mut s = spec(1, false, Scheme::Tiles);
        s.grid = (0, 2);
        assert!(Layout::new(&s).is_err());
    }
}
