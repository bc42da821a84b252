//! The fuzz targets' library: the bodies live in targets.rs, shared with tests/fuzz_corpus.rs.

#[path = "targets.rs"]
mod targets;

pub use targets::*;
