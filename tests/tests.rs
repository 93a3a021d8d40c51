//! pagedattn's integration tests: one binary, one module per kernel, plus argument validation.
//! GPU tests print `SKIPPED (no GPU): ...` and pass on a machine without one (set
//! `PAGEDATTN_REQUIRE_GPU=1` to make that a failure).
#[macro_use]
mod common;
mod cache;
mod edge_cases;
mod flash_attn;
mod fp8;
mod paged_attention;
mod sanitize;
mod serving;
mod validation;
