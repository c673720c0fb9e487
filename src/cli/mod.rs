//! One file per command group; each parses its flags and calls the library.

pub mod bench;
pub mod data;
pub mod eval;
pub mod generate;
pub mod info;
pub mod tokenizer;
pub mod train;
