//! Dataset construction, the steps after a relation-guided generator has drawn the targets
//! (InstructAR): the matte split (matte -> background, mask, foreground), the VLM filter and
//! the identity filter. Each filter appends one JSON line per sample to its report (a rerun
//! resumes) and writes the kept samples as a JSONL manifest that `tokenar data encode` and
//! training read directly, and that the next filter can take as its dataset.

pub mod ben2;
pub mod identity;
pub mod matte;
pub mod report;
pub mod vlm;

pub use identity::{run_identity, IdentityOptions};
pub use matte::{run_matte, MatteRun};
pub use report::{Report, Summary, Verdict};
pub use vlm::{run_vlm, VlmClient, VlmOptions};

#[cfg(test)]
mod tests;
