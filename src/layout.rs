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
    /// Token grid of one image (rows, cols).
    pub grid: (usize, usize),
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
        let hw = h * w;
        let mut kinds: Vec<(SegmentKind, usize)> = Vec::new();
        kinds.extend((0..ref_slots).map(|i| (SegmentKind::Ref(i), hw)));
        if spec.background {
            kinds.push((SegmentKind::Background, hw));
        }
        kinds.push((SegmentKind::Text, spec.text_len));
        kinds.push((SegmentKind::Instruct, spec.n_instruct));
        if spec.itd {
            kinds.extend((0..ref_slots).map(|i| (SegmentKind::ItdRef(i), hw)));
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
            for j in 0..seg.len {
                let p = seg.start + j;
                index_ids[p] = id;
                if !matches!(seg.kind, SegmentKind::Text | SegmentKind::Instruct) {
                    image_cells[p] = Some((j / w, j % w));
                }
                cells[p] = match spec.scheme {
                    Scheme::Tiles => tile_cell(seg.kind, j, spec),
                    Scheme::Reference { .. } => reference_cell(seg, j, spec, n_cond, generated_len, prefix_len),
                };
            }
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

/// Tiles scheme: tile `t` covers columns `t*w .. (t+1)*w`; text and instruct sit on (0, 0) with
/// an ordinary (identity) rotation, so they are not zeroed like LlamaGen captions.
fn tile_cell(kind: SegmentKind, j: usize, spec: &LayoutSpec) -> RopeCell {
    let (_, w) = spec.grid;
    let m = spec.max_refs;
    let tile = match kind {
        SegmentKind::Ref(i) => i,
        SegmentKind::Background => m,
        SegmentKind::ItdRef(i) => m + 1 + i,
        SegmentKind::Target => 2 * m + 1,
        SegmentKind::Text | SegmentKind::Instruct => return RopeCell::Cell(0, 0),
    };
    RopeCell::Cell(j / w, tile * w + j % w)
}

/// Reference scheme (REFERENCE.md sections 1, 3, 4). Text and instruct get the zero quirk.
/// - no condition image (LlamaGen t2i): the target on its own `h x w` grid;
/// - one condition image (EditAR): a `2h x 2w` grid, condition on block [0:h, 0:w], target on
///   block [h:2h, w:2w];
/// - two or more (TokenAR): the condition images flattened row-major onto a grid `2w` wide
///   (a 32x32 image fills 16 rows x 64 columns), the generated tokens on the last cells of the
///   `2h x 2w` grid (ITD with 4 slots: the whole grid again).
fn reference_cell(
    seg: &Segment,
    j: usize,
    spec: &LayoutSpec,
    n_cond: usize,
    generated_len: usize,
    prefix_len: usize,
) -> RopeCell {
    let (h, w) = spec.grid;
    if matches!(seg.kind, SegmentKind::Text | SegmentKind::Instruct) {
        return RopeCell::Zero;
    }
    let hw = h * w;
    match n_cond {
        0 => RopeCell::Cell(j / w, j % w),
        1 if !seg.kind.is_generated() => RopeCell::Cell(j / w, j % w),
        1 if !spec.itd => RopeCell::Cell(h + j / w, w + j % w),
        _ => {
            let width = 2 * w;
            let flat = if seg.kind.is_generated() {
                let g = seg.start - prefix_len + j;
                (4 * hw).saturating_sub(generated_len) + g
            } else {
                // Condition images come first in the sequence: position = flattened index.
                seg.start + j
            };
            RopeCell::Cell(flat / width, flat % width)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n_refs: usize, itd: bool, scheme: Scheme) -> LayoutSpec {
        LayoutSpec {
            n_refs,
            max_refs: 3,
            grid: (2, 2),
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
        // Target: the last 4 cells of the 4x4 grid.
        assert_eq!(&c[21..25], &[RopeCell::Cell(3, 0), RopeCell::Cell(3, 1), RopeCell::Cell(3, 2), RopeCell::Cell(3, 3)]);
        // Distinct ids when the quirk is off.
        let l2 = Layout::new(&spec(2, false, Scheme::Reference { pad_to: Some(3), quirk_index: false })).unwrap();
        assert_eq!(l2.index_ids()[12], Some(3));
    }

    #[test]
    fn reference_itd_covers_whole_grid() {
        let s = spec(3, true, Scheme::Reference { pad_to: Some(3), quirk_index: true });
        let l = Layout::new(&s).unwrap();
        assert_eq!(l.generated_len(), 16);
        let c = l.rope_cells();
        assert_eq!(c[21], RopeCell::Cell(0, 0));
        assert_eq!(c[36], RopeCell::Cell(3, 3));
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

    #[test]
    fn rejects_bad_specs() {
        assert!(Layout::new(&spec(4, false, Scheme::Tiles)).is_err());
        assert!(Layout::new(&spec(3, false, Scheme::Reference { pad_to: Some(2), quirk_index: true })).is_err());
        let mut s = spec(1, false, Scheme::Tiles);
        s.grid = (0, 2);
        assert!(Layout::new(&s).is_err());
    }
}
