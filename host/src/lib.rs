//! # pagedattn
//!
//! vLLM's paged-attention ops as Rust GPU kernels (compiled to PTX and cubins at build time, loaded
//! with the CUDA driver API at run time), with a float64 CPU reference backend behind the same API.
//!
//! 1. Pick a device: [`Device::auto`] (the first GPU, else the CPU reference), [`Gpu::new`].
//! 2. Make tensors: [`Tensor::from_f32`] / [`Tensor::from_i32`] on the host, [`Device::upload`].
//!    [`Tensor::select`] and [`Tensor::view`] make views that share one storage (vLLM's combined KV
//!    cache); [`Gpu::pinned`] / [`Tensor::to_pinned`] put a tensor in page-locked host memory.
//! 3. Call an op, e.g. [`reshape_and_cache`] to write keys and values into the paged cache, then
//!    [`paged_attention()`] (v1 or v2, chosen from bounds you fix); on the GPU each is queued on the
//!    device's stream. fp8 KV caches: [`reshape_and_cache_fp8`] quantizes into caches of
//!    [`ScalarType::Fp8E4m3`] / [`ScalarType::Fp8E5m2`], and the attention ops dequantize them with
//!    the same `k_scale` / `v_scale`.
//! 4. Read results with [`Tensor::to_cpu`]; check device-side guards with [`Gpu::check_status`].
//!
//! ```
//! use pagedattn::{Device, PagedAttentionArgs, Tensor, paged_attention_v1};
//! use pagedattn::layout::DType;
//! # fn main() -> pagedattn::Result<()> {
//! let (num_seqs, num_heads, num_kv_heads, head_size, block_size, num_blocks) = (1, 4, 2, 64, 16, 2);
//! let x = DType::F32.x();
//! let rand = |n: usize| (0..n).map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0).collect::<Vec<_>>();
//! let query = Tensor::from_f32(DType::F32, &[num_seqs, num_heads, head_size], &rand(num_heads * head_size))?;
//! let kv = num_blocks * num_kv_heads * head_size * block_size;
//! let key_cache = Tensor::from_f32(DType::F32, &[num_blocks, num_kv_heads, head_size / x, block_size, x], &rand(kv))?;
//! let value_cache = Tensor::from_f32(DType::F32, &[num_blocks, num_kv_heads, head_size, block_size], &rand(kv))?;
//! let block_tables = Tensor::from_i32(&[1, 2], &[1, 0])?;
//! let seq_lens = Tensor::from_i32(&[1], &[20])?;
//! let device = Device::Cpu; // or Device::auto()
//! let up = |t: &Tensor| device.upload(t);
//! let mut out = device.nan(query.dtype(), query.shape())?;
//! let (q, k, v) = (up(&query)?, up(&key_cache)?, up(&value_cache)?);
//! paged_attention_v1(&device, &mut out, &PagedAttentionArgs {
//!     query: &q, key_cache: &k, value_cache: &v, block_tables: &block_tables, seq_lens: &seq_lens,
//!     scale: 0.125, alibi_slopes: None, k_scale: None, v_scale: None, blocksparse: None,
//! })?;
//! assert!(out.to_cpu()?.to_f64_vec().iter().all(|v| v.is_finite()));
//! # Ok(()) }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

pub mod bench;
pub mod bench_cache;
pub mod bench_varlen;
pub mod block_manager;
pub mod cache;
pub mod cpu;
pub mod device;
pub mod dispatch;
pub mod error;
pub mod flash_attn;
pub mod graph;
pub mod kv_cache;
mod launch;
pub mod paged_attention;
pub mod ptx;
pub mod tensor;
pub mod testing;
pub mod tma;
pub mod util;

pub use block_manager::{BlockError, BlockManager, BlockManagerConfig};
pub use cache::{
    CacheLayout, Fp8Scales, copy_blocks, reshape_and_cache, reshape_and_cache_flash, reshape_and_cache_flash_fp8, reshape_and_cache_fp8,
    swap_blocks,
};
pub use device::{Device, Gpu};
pub use error::{Error, Result};
pub use flash_attn::{FlashAttnVarlenArgs, FlashKernel, flash_attn_varlen_func, flash_attn_varlen_func_with, merge_attn_states};
pub use graph::{DecodeStep, Graph};
pub use kv_cache::{KvCache, KvCacheConfig};
pub use paged_attention::{
    PagedAttentionArgs, PagedAttentionWorkspace, ReduceMode, Version, choose_plan, choose_version, paged_attention, paged_attention_v1,
    paged_attention_v2,
};
pub use tensor::{ScalarType, Storage, Tensor};

/// The types shared with the kernels (params, layouts, variant lists).
pub use pagedattn_layout as layout;
