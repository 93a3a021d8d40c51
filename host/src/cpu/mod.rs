//! The CPU reference backend: every op in float64, naively (the test oracle, and the fallback when
//! no GPU is present). One file per kernel, named as in `kernels-gpu/src/`.

pub mod cache;
pub mod flash_attn;
pub mod paged_attention;
