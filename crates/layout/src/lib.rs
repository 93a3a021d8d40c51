//! Types shared by the `pagedattn` host library and the `pagedattn-kernels` GPU crate.
//!
//! Everything that both sides must agree on is defined here once: the `#[repr(C)]` params structs
//! passed by value to the kernels, the KV-cache layouts with their index math, the status flags the
//! kernels raise, the launch geometry of each kernel, and the lists of compiled variants
//! ([`for_each_paged_attention_variant!`], [`for_each_cache_dtype!`]), which expand into the kernels' entry points on one side
//! and into the host's dispatch table on the other.
#![no_std]

pub mod cache;
#[cfg(feature = "cudarc")]
mod device_repr;
mod dtype;
pub mod flash_attn;
pub mod fp8;
pub mod paged_attention;
pub mod status;
pub mod util;
mod variants;

pub use cache::{CopyBlocksParams, ReshapeAndCacheFlashParams, ReshapeAndCacheParams, SwapBlocksParams};
pub use dtype::{DType, KvCacheDType};
pub use flash_attn::{
    FLASH_HEAD_SIZES, FLASH_SM90_HEAD_SIZES, FlashAttnGeometry, FlashAttnSm90Geometry, FlashAttnSm90Params, FlashAttnVarlenParams,
    MERGE_THREADS, MergeAttnStatesParams, TensorMapBytes, varlen_tile,
};
pub use fp8::Fp8Kind;
pub use paged_attention::{
    BlockSparse, DEFAULT_PARTITION_SIZE, PagedAttentionGeometry, PagedAttentionParams, PagedAttentionReduceParams, REDUCE_THREADS,
};
pub use util::{FillParams, Fp8CodecParams, MmaProbeParams, StreamReadParams};

/// Head sizes with a compiled variant (vLLM's list).
pub const HEAD_SIZES: &[usize] = &[32, 64, 80, 96, 112, 120, 128, 192, 256];
/// Cache block sizes (tokens per block) with a compiled variant.
pub const BLOCK_SIZES: &[usize] = &[8, 16, 32, 64, 128, 256];
/// Element types with a compiled variant.
pub const DTYPES: &[DType] = &[DType::F32, DType::F16, DType::BF16];
/// Head sizes with an fp8-cache variant: vLLM's key layout holds `head_size / 16` chunks of 16
/// codes, so 120 has no fp8 layout.
pub const FP8_HEAD_SIZES: &[usize] = &[32, 64, 80, 96, 112, 128, 192, 256];
/// GPU architectures the builder compiles for, lowest first. Cubins for `sm_80` also run on sm_86/sm_89.
pub const ARCHS: &[&str] = &["sm_80", "sm_90"];
/// Arch-specific targets of the families that use instructions only one chip has (`wgmma` and
/// `setmaxnreg` need `sm_90a`): see [`KernelFamily::archs`]. Each is built when its base arch
/// (`sm_90`) is.
pub const SPECIFIC_ARCHS: &[&str] = &["sm_90a"];

/// Kernel families: each is one PTX module, compiled and loaded on its own (lazily, on first use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFamily {
    /// vLLM's `paged_attention_v1`/`v2` (one kernel, optionally split into partitions) and the v2
    /// reduce, every (dtype, head size, block size).
    PagedAttention,
    /// vLLM's KV-cache ops: `reshape_and_cache`, `reshape_and_cache_flash` (every dtype) and `copy_blocks`.
    Cache,
    /// Device-side helpers: random fill, streaming-read probe (benchmarks and tests).
    Util,
    /// `paged_attention` over fp8 caches (e4m3 / e5m2), every (dtype, head size, block size): a
    /// module of its own, so that fp16-cache users never load it.
    PagedAttentionFp8,
    /// `flash_attn_varlen_func` (tensor cores), every (dtype f16/bf16, head size), and
    /// `merge_attn_states` (f32/f16/bf16).
    FlashAttn,
    /// `flash_attn_varlen_func` on Hopper (`wgmma`, warp-specialized), built for `sm_90a` only;
    /// the host takes it on compute capability 9.0 for the head sizes it has.
    FlashAttnSm90,
}

impl KernelFamily {
    /// Every family, in the order of the host's module table.
    pub const ALL: [KernelFamily; 6] = [
        KernelFamily::PagedAttention,
        KernelFamily::Cache,
        KernelFamily::Util,
        KernelFamily::PagedAttentionFp8,
        KernelFamily::FlashAttn,
        KernelFamily::FlashAttnSm90,
    ];

    /// The family's name: the cargo feature of `pagedattn-kernels` that compiles it, and the stem of
    /// its PTX/cubin files.
    pub const fn name(self) -> &'static str {
        match self {
            KernelFamily::PagedAttention => "paged_attention",
            KernelFamily::Cache => "cache",
            KernelFamily::Util => "util",
            KernelFamily::PagedAttentionFp8 => "paged_attention_fp8",
            KernelFamily::FlashAttn => "flash_attn",
            KernelFamily::FlashAttnSm90 => "flash_attn_sm90",
        }
    }

    /// The archs the family is compiled for: [`ARCHS`], or an arch-specific target for a family
    /// that uses that chip's own instructions.
    pub const fn archs(self) -> &'static [&'static str] {
        match self {
            KernelFamily::FlashAttnSm90 => SPECIFIC_ARCHS,
            _ => ARCHS,
        }
    }

    /// Entry-point bounds the builder writes into the PTX (`.maxntid`, `.minnctapersm`) for the
    /// family's kernels whose names start with the prefix: a register cap at entry, which
    /// `setmaxnreg` needs.
    pub const fn launch_bounds(self) -> Option<(&'static str, u32, u32)> {
        match self {
            KernelFamily::FlashAttnSm90 => Some(("flash_attn_sm90_", flash_attn::FlashAttnSm90Geometry::NUM_THREADS as u32, 1)),
            _ => None,
        }
    }

    /// Index into [`KernelFamily::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Deterministic pseudo-random value in `[-1, 1)` for element `index` of a buffer filled with `seed`
/// (a splitmix64 hash, so any element can be computed alone). The GPU fill kernel and the host use
/// this one function, so data filled on the device can be checked on the host without a copy of it.
#[inline(always)]
pub fn hash_uniform(index: u64, seed: u64) -> f32 {
    let mut z = index.wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 24 random bits: exact in f32.
    (z >> 40) as f32 * (2.0 / 16_777_216.0) - 1.0
}
