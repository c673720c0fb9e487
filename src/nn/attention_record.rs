//! Recording the attention probabilities of a forward pass, for inspection (`tokenar
//! attention`): while [`record`] runs its closure on this thread, every attention layer takes
//! its composed path (the fused kernels never materialise the probabilities) and hands this
//! module its projection `qkv` (B, S, 3 * H * D) and the rows `rows` of its probabilities
//! `softmax(q k^T + mask)` (B, H, |rows|, S), in layer order. Outside [`record`] nothing is
//! kept and the attention layers run as always.

use crate::error::{Error, Result};
use candle_core::Tensor;
use std::cell::RefCell;
use std::ops::Range;

/// One attention layer's record.
#[derive(Clone, Debug)]
pub struct LayerRecord {
    /// The layer's fused projection (B, S, 3 * H * D), before RoPE.
    pub qkv: Tensor,
    /// Probabilities of the recorded query rows over all keys (B, H, rows, S).
    pub probs: Tensor,
}

struct Recorder {
    rows: Range<usize>,
    layers: Vec<LayerRecord>,
    error: Option<Error>,
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Whether a [`record`] is running on this thread (the attention layers then take the
/// composed path and report to [`push`]).
pub fn active() -> bool {
    RECORDER.with(|r| r.borrow().is_some())
}

/// Called by an attention layer on its composed path with its projection and probabilities
/// (B, H, S, S); keeps the recorded rows. Does nothing outside [`record`].
pub fn push(qkv: &Tensor, probs: &Tensor) {
    RECORDER.with(|r| {
        if let Some(rec) = r.borrow_mut().as_mut() {
            let kept = (|| -> Result<LayerRecord> {
                let s = probs.dim(2)?;
                if rec.rows.end > s {
                    return Err(Error::invalid("attention record", format!("rows {:?} beyond the {s} queries of the forward", rec.rows)));
                }
                let probs = probs.narrow(2, rec.rows.start, rec.rows.len())?.contiguous()?;
                Ok(LayerRecord { qkv: qkv.clone(), probs })
            })();
            match kept {
                Ok(l) => rec.layers.push(l),
                Err(e) => {
                    rec.error.get_or_insert(e);
                }
            }
        }
    });
}

/// Run `f` with recording on for the query rows `rows`; returns its result and one record per
/// attention layer it ran, in order. Nested calls are refused.
pub fn record<R>(rows: Range<usize>, f: impl FnOnce() -> Result<R>) -> Result<(R, Vec<LayerRecord>)> {
    if active() {
        return Err(Error::invalid("attention record", "a recording is already running on this thread"));
    }
    RECORDER.with(|r| *r.borrow_mut() = Some(Recorder { rows, layers: Vec::new(), error: None }));
    let out = f();
    let rec = RECORDER.with(|r| r.borrow_mut().take()).expect("the recorder set above");
    let out = out?;
    if let Some(e) = rec.error {
        return Err(e);
    }
    Ok((out, rec.layers))
}
