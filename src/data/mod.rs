//! Datasets: the InstructAR on-disk format (and a JSONL manifest alternative), validation, the
//! procedural synthetic benchmark, and the code cache training reads.

pub mod cache;
pub mod check;
pub mod format;
pub mod instructar;
pub mod manifest;
pub mod provenance;
pub mod sheet;
pub mod subjects200k;
pub mod synth;

pub use format::{Dataset, LoadedSample, Meta, OpenOptions, Sample, SubjectMeta};
pub use check::{check, CheckReport};

#[cfg(test)]
mod tests;
