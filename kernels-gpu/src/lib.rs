//! pagedattn's GPU kernels: `#![no_std]` Rust compiled for `nvptx64-nvidia-cuda` by
//! `crates/ptx-builder` (called from `host/build.rs`). Each kernel family is a cargo feature and a PTX
//! module of its own; every variant is a monomorphized `#[export_name]` entry point generated from
//! the variant lists in `pagedattn-layout`.
//!
//! Where to look: `intrinsics.rs` (the only home of NVVM intrinsics), `tensor_core.rs` (`mma.sync`,
//! `ldmatrix`, `cp.async`) and `wgmma.rs` (Hopper: `wgmma`, `mbarrier`, `setmaxnreg`), one file per
//! kernel family (`varlen.rs`: what the two `flash_attn_varlen_func` kernels share).
//! The CPU reference of each kernel is `host/src/cpu/<same name>.rs`, its tests `tests/<same name>.rs`.
#![no_std]
#![feature(
    abi_ptx,
    f16,
    core_intrinsics,
    gpu_intrinsics,
    gpu_launch_sized_workgroup_mem,
    link_llvm_intrinsics,
    stdarch_nvptx,
    stmt_expr_attributes
)]
// Inline asm: tensor cores (sm_80+) and fp8 `cvt` (sm_89+ builds only).
#![feature(asm_experimental_arch)]
#![allow(internal_features)]
// Index loops over register arrays with compile-time bounds are the idiom that LLVM fully unrolls into
// registers; iterator adapters (`iter_mut().enumerate().take(n)`) left arrays in local memory.
#![allow(clippy::needless_range_loop)]

/// The element type of a `DType` variant name, as the variant lists spell it (`F32`, `F16`, `BF16`).
#[allow(unused_macros)]
macro_rules! elem {
    (F32) => {
        f32
    };
    (F16) => {
        f16
    };
    (BF16) => {
        $crate::intrinsics::Bf16
    };
}

/// The tensor-core element type of a `DType` variant name (`F16`, `BF16`).
#[allow(unused_macros)]
macro_rules! tc_elem {
    (F16) => {
        $crate::tensor_core::F16
    };
    (BF16) => {
        $crate::tensor_core::Bf16
    };
}

/// The code type of an fp8 kind name (`E4m3`, `E5m2`).
#[allow(unused_macros)]
macro_rules! fp8_elem {
    (E4m3) => {
        $crate::fp8::E4m3
    };
    (E5m2) => {
        $crate::fp8::E5m2
    };
}

#[cfg(feature = "cache")]
pub mod cache;
#[cfg(feature = "flash_attn")]
pub mod flash_attn;
#[cfg(feature = "flash_attn_sm90")]
pub mod flash_attn_sm90;
pub mod fp8;
pub mod intrinsics;
#[cfg(any(feature = "paged_attention", feature = "paged_attention_fp8"))]
pub mod paged_attention;
pub mod tensor_core;
#[cfg(feature = "util")]
pub mod util;
#[cfg(any(feature = "flash_attn", feature = "flash_attn_sm90"))]
pub mod varlen;
pub mod wgmma;

#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: `trap` aborts the kernel; no preconditions.
    unsafe { core::arch::nvptx::trap() }
}
