//! The sequence plan of one sample. See DESIGN.md (module map).
