//! The binding loss experiment (see docs/experiments.md): a linear head on the GPT's final
//! features at each target position predicts which reference the token about to be generated
//! shows, trained with cross-entropy on the code cells a subject covers (the cache's owner
//! grids).

use crate::error::{Error, Result};
use crate::model;
use candle_core::Tensor;

/// The target cells the binding loss counts, gathered over a batch.
pub struct BindingCells {
    /// Row `b * h*w + cell` of each counted cell in the batch's (B * h*w) target positions.
    pub rows: Vec<u32>,
    /// Its subject (reference index).
    pub labels: Vec<u32>,
    /// Whether it is its subject's first cell in raster order.
    pub first: Vec<bool>,
    /// Whether it is its sample's first subject cell: the one decision generation makes
    /// unaided (a later subject can be told by elimination from the cells already drawn).
    pub decision: Vec<bool>,
}

impl BindingCells {
    /// The cells a subject covers (`owners[b][cell]` = k + 1 for subject k): all of them
    /// (`first` = 0) or each subject's first `first` cells in raster order; samples whose
    /// images were dropped are left out.
    pub fn select(owners: &[&[u8]], dropped: &[bool], hw: usize, first: usize) -> Result<Self> {
        let mut c = Self { rows: Vec::new(), labels: Vec::new(), first: Vec::new(), decision: Vec::new() };
        for (i, o) in owners.iter().enumerate() {
            if dropped.get(i).copied().unwrap_or(false) {
                continue;
            }
            if o.len() != hw {
                return Err(Error::invalid("owner grid", format!("sample {i} has {} cells, the target {hw}", o.len())));
            }
            // Cells seen so far of each subject, and of any subject.
            let mut seen = [0usize; 256];
            let mut any = 0;
            for (cell, &k) in o.iter().enumerate() {
                if k > 0 {
                    seen[k as usize] += 1;
                    any += 1;
                    if first == 0 || seen[k as usize] <= first {
                        c.rows.push((i * hw + cell) as u32);
                        c.labels.push(k as u32 - 1);
                        c.first.push(seen[k as usize] == 1);
                        c.decision.push(any == 1);
                    }
                }
            }
        }
        Ok(c)
    }
}

/// What [`binding_loss`] returns.
pub struct Binding {
    /// Mean cross-entropy over the counted cells (a scalar).
    pub loss: Tensor,
    /// Accuracy over the counted cells.
    pub acc: f64,
    /// Accuracy over each subject's first cell in raster order.
    pub first_acc: f64,
    /// Accuracy over each sample's first subject cell (see [`BindingCells::decision`]).
    pub decision_acc: f64,
}

/// The binding loss: mean cross-entropy of the binding head's prediction (which reference)
/// at the `cells`; `None` when there are none. `features`: (B, h*w, dim), the GPT's
/// normalised features where it predicts each target token.
pub fn binding_loss(features: &Tensor, w: &Tensor, bias: &Tensor, cells: &BindingCells) -> Result<Option<Binding>> {
    let (b, hw, d) = features.dims3()?;
    let n = cells.rows.len();
    if n == 0 {
        return Ok(None);
    }
    if let Some(r) = cells.rows.iter().find(|&&r| r as usize >= b * hw) {
        return Err(Error::invalid("binding cells", format!("row {r} outside the {b} x {hw} target positions")));
    }
    let classes = w.dim(0)?;
    if let Some(bad) = cells.labels.iter().find(|&&k| k as usize >= classes) {
        return Err(Error::invalid("owner grid", format!("subject {bad} but the binding head has {classes} references")));
    }
    let dev = features.device();
    let x = features.reshape((b * hw, d))?.index_select(&Tensor::from_vec(cells.rows.clone(), n, dev)?, 0)?;
    let logits = x.matmul(&w.t()?)?.broadcast_add(bias)?;
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    let right: Vec<bool> = pred.iter().zip(&cells.labels).map(|(p, l)| p == l).collect();
    let acc_over = |sel: &[bool]| {
        let k = sel.iter().filter(|f| **f).count();
        right.iter().zip(sel).filter(|(r, f)| **r && **f).count() as f64 / k.max(1) as f64
    };
    let acc = acc_over(&vec![true; n]);
    let (first_acc, decision_acc) = (acc_over(&cells.first), acc_over(&cells.decision));
    let loss = model::loss::cross_entropy(&logits, &Tensor::from_vec(cells.labels.clone(), n, dev)?)?;
    Ok(Some(Binding { loss, acc, first_acc, decision_acc }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn binding_loss_counts_subject_cells_of_kept_samples() {
        let dev = Device::Cpu;
        // Two samples of 3 cells, dim 2; the head reads feature 0 as reference 0, feature 1
        // as reference 1.
        let f = Tensor::new(&[[[2f32, 0.], [0., 1.], [5., 5.]], [[0., 3.], [1., 0.], [1., 0.]]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap();
        let bias = Tensor::new(&[0f32, 0.], &dev).unwrap();
        let ce = |l: [f32; 2], k: usize| {
            let m = l[0].max(l[1]);
            (m + ((l[0] - m).exp() + (l[1] - m).exp()).ln() - l[k]) as f64
        };
        // Sample 0: cells owned by subject 0, subject 0 (wrongly predicted), none.
        let owners: [&[u8]; 2] = [&[1, 1, 0], &[2, 0, 2]];
        let value = |b: &Binding| b.loss.to_scalar::<f32>().unwrap() as f64;
        let bl = binding_loss(&f, &w, &bias, &BindingCells::select(&owners, &[false, false], 3, 0).unwrap()).unwrap().unwrap();
        let want = (ce([2., 0.], 0) + ce([0., 1.], 0) + ce([0., 3.], 1) + ce([1., 0.], 1)) / 4.0;
        assert!((value(&bl) - want).abs() < 1e-6);
        // Right: cells 0 of both samples (each its subject's first); wrong: sample 0 cell 1
        // and sample 1 cell 2.
        assert_eq!((bl.acc, bl.first_acc, bl.decision_acc), (0.5, 1.0, 1.0));
        // Only each subject's first cell.
        let bl = binding_loss(&f, &w, &bias, &BindingCells::select(&owners, &[false, false], 3, 1).unwrap()).unwrap().unwrap();
        assert!((value(&bl) - (ce([2., 0.], 0) + ce([0., 3.], 1)) / 2.0).abs() < 1e-6);
        assert_eq!((bl.acc, bl.first_acc), (1.0, 1.0));
        // A sample whose images were dropped does not count.
        let bl = binding_loss(&f, &w, &bias, &BindingCells::select(&owners, &[false, true], 3, 0).unwrap()).unwrap().unwrap();
        assert!((value(&bl) - (ce([2., 0.], 0) + ce([0., 1.], 0)) / 2.0).abs() < 1e-6);
        assert_eq!(bl.acc, 0.5);
        // The decision is each sample's first subject cell: sample 1's (cell 0, right) and,
        // with its first cell swapped to subject 0 (then predicted wrongly), none right.
        let bl = binding_loss(&f, &w, &bias, &BindingCells::select(&[&[0, 0, 0], &[1, 0, 2]], &[false, false], 3, 0).unwrap()).unwrap().unwrap();
        assert_eq!((bl.acc, bl.first_acc, bl.decision_acc), (0.0, 0.0, 0.0));
        let bl = binding_loss(&f, &w, &bias, &BindingCells::select(&[&[0, 0, 0], &[2, 0, 1]], &[false, false], 3, 0).unwrap()).unwrap().unwrap();
        assert_eq!((bl.acc, bl.first_acc, bl.decision_acc), (1.0, 1.0, 1.0));
        assert!(binding_loss(&f, &w, &bias, &BindingCells::select(&[&[0, 0, 0], &[0, 0, 0]], &[false, false], 3, 0).unwrap()).unwrap().is_none());
        // Bad owner grids are reported.
        let e = BindingCells::select(&[&[1, 1], &[0, 0, 0]], &[false, false], 3, 0).err().unwrap();
        assert!(e.to_string().contains("2 cells"), "{e}");
        let e = binding_loss(&f, &w, &bias, &BindingCells::select(&[&[3, 0, 0], &[0, 0, 0]], &[false, false], 3, 0).unwrap()).err().unwrap();
        assert!(e.to_string().contains("subject 2"), "{e}");
    }
}
