//! pagedattn's integration tests: one binary, one module per kernel.
mod common;
