//! cudarc's `DeviceRepr` for the params structs (host only, behind the `cudarc` feature).

use crate::{
    CopyBlocksParams, FillParams, FlashAttnSm90Params, FlashAttnVarlenParams, Fp8CodecParams, MergeAttnStatesParams, MmaProbeParams,
    PagedAttentionParams, PagedAttentionReduceParams, ReshapeAndCacheFlashParams, ReshapeAndCacheParams, StreamReadParams,
    SwapBlocksParams,
};

// SAFETY: `PagedAttentionParams` is `#[repr(C)]`, `Copy`, made only of `u64`/`u32`/`f32` fields with
// explicit padding, and the kernels declare a parameter of the identical layout (same crate), so
// passing its bytes by value into `.param` space is exactly what the kernel reads.
unsafe impl cudarc::driver::DeviceRepr for PagedAttentionParams {}

// SAFETY: as above: `#[repr(C)]`, `Copy`, plain integer/float fields, mirrored by the util kernels.
unsafe impl cudarc::driver::DeviceRepr for FillParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for Fp8CodecParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for StreamReadParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for MmaProbeParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for PagedAttentionReduceParams {}

// SAFETY: as above: `#[repr(C)]`, `Copy`, `u64`/`u32` fields with explicit padding, mirrored by the
// cache kernels (`kernels-gpu/src/cache.rs`), which take them by value.
unsafe impl cudarc::driver::DeviceRepr for ReshapeAndCacheParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for ReshapeAndCacheFlashParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for CopyBlocksParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for SwapBlocksParams {}
// SAFETY: as above, mirrored by `kernels-gpu/src/flash_attn.rs`.
unsafe impl cudarc::driver::DeviceRepr for FlashAttnVarlenParams {}
// SAFETY: as above (the padding explicit; the map's alignment is the kernel's run-time check),
// mirrored by `kernels-gpu/src/flash_attn_sm90.rs`.
unsafe impl cudarc::driver::DeviceRepr for FlashAttnSm90Params {}
// SAFETY: as above, mirrored by `kernels-gpu/src/flash_attn.rs`.
unsafe impl cudarc::driver::DeviceRepr for MergeAttnStatesParams {}
