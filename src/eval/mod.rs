//! See DESIGN.md (module map).
pub mod nets;
