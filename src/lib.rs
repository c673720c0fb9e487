//! TokenAR: multi-subject image generation with an autoregressive token model.
//!
//! The data flow and the module map are described in `docs/design.md`; each TokenAR idea has one
//! home: `model::index_embedding`, `model::instruct_tokens`, and the ITD sequence plan in
//! `layout`.

pub mod bench;
pub mod curate;
pub mod data;
pub mod error;
pub mod eval;
pub mod imageio;
pub mod layout;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod sample;
pub mod serve;
pub mod text;
pub mod tokenizer;
pub mod train;
pub mod util;
pub mod vmath;
pub mod weights;

pub use error::{Error, Result};

// Linked for `util::tune_allocator` (the binaries make mimalloc their global allocator).
extern crate mimalloc;
