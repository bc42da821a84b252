//! See targets.rs.
include!("targets.rs");
