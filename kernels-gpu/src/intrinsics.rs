//! Device intrinsics (the role of rust-cuda's `cuda_std`): thread indices, barriers, warp shuffles and
//! votes, dynamic shared memory, fast exp2, FMA, element conversions and 16-byte loads and stores.
//!
//! Warp-collective operations go through NVVM intrinsics (`link_llvm_intrinsics`), which LLVM knows are
//! convergent, so it never moves them into a branch that only some lanes take (an inline-`asm!` shuffle
//! marked `pure` was hoisted into a one-lane branch in the prototype and hung the GPU). This module is
//! the only place in the crate with `extern` intrinsic declarations.

use core::arch::nvptx;
use core::sync::atomic::{AtomicU32, Ordering};
use pagedattn_layout::{DType, KvCacheDType};

const FULL_MASK: u32 = 0xffff_ffff;

#[allow(improper_ctypes)]
unsafe extern "C" {
    #[link_name = "llvm.nvvm.shfl.sync.bfly.f32"]
    fn shfl_sync_bfly_f32(mask: u32, val: f32, lane_mask: u32, clamp: u32) -> f32;
    #[link_name = "llvm.nvvm.shfl.sync.idx.f32"]
    fn shfl_sync_idx_f32(mask: u32, val: f32, src_lane: u32, clamp: u32) -> f32;
    #[link_name = "llvm.nvvm.vote.any.sync"]
    fn vote_any_sync(mask: u32, pred: bool) -> bool;
    #[link_name = "llvm.nvvm.vote.ballot.sync"]
    fn vote_ballot_sync(mask: u32, pred: bool) -> u32;
    #[link_name = "llvm.nvvm.bar.warp.sync"]
    fn bar_warp_sync(mask: u32);
    #[link_name = "llvm.nvvm.ex2.approx.ftz.f"]
    fn ex2_approx_ftz(x: f32) -> f32;
}

/// `threadIdx.x`.
#[inline(always)]
pub fn thread_idx_x() -> usize {
    // SAFETY: reads a special register; no preconditions.
    unsafe { nvptx::_thread_idx_x() as usize }
}

/// `blockIdx.x`.
#[inline(always)]
pub fn block_idx_x() -> usize {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_idx_x() as usize }
}

/// `blockIdx.y`.
#[inline(always)]
pub fn block_idx_y() -> usize {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_idx_y() as usize }
}

/// `blockIdx.z`.
#[inline(always)]
pub fn block_idx_z() -> usize {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_idx_z() as usize }
}

/// `blockDim.x`.
#[inline(always)]
pub fn block_dim_x() -> usize {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_dim_x() as usize }
}

/// `gridDim.x`.
#[inline(always)]
pub fn grid_dim_x() -> usize {
    // SAFETY: reads a special register.
    unsafe { nvptx::_grid_dim_x() as usize }
}

/// `gridDim.y`.
#[inline(always)]
pub fn grid_dim_y() -> usize {
    // SAFETY: reads a special register.
    unsafe { nvptx::_grid_dim_y() as usize }
}

/// `__syncthreads()`: every thread of the CTA must reach it (uniform control flow).
#[inline(always)]
pub fn sync_threads() {
    // SAFETY: `bar.sync 0`; callers keep it in CTA-uniform control flow.
    unsafe { nvptx::_syncthreads() }
}

/// `__syncwarp()` over the full warp: orders shared-memory accesses among its lanes.
#[inline(always)]
pub fn sync_warp() {
    // SAFETY: convergent NVVM intrinsic; callers keep it in warp-uniform control flow.
    unsafe { bar_warp_sync(FULL_MASK) }
}

/// Butterfly shuffle over the full warp: the value of lane `lane ^ lane_mask`.
#[inline(always)]
pub fn shfl_xor(v: f32, lane_mask: u32) -> f32 {
    // SAFETY: convergent NVVM intrinsic, called by all 32 lanes (warp-uniform control flow).
    unsafe { shfl_sync_bfly_f32(FULL_MASK, v, lane_mask, 0x1f) }
}

/// Indexed shuffle over the full warp: the value of lane `src`.
#[inline(always)]
pub fn shfl_idx(v: f32, src: u32) -> f32 {
    // SAFETY: as `shfl_xor`.
    unsafe { shfl_sync_idx_f32(FULL_MASK, v, src, 0x1f) }
}

/// True if `pred` holds on any lane of the warp.
#[inline(always)]
pub fn vote_any(pred: bool) -> bool {
    // SAFETY: convergent NVVM intrinsic, called by all 32 lanes.
    unsafe { vote_any_sync(FULL_MASK, pred) }
}

/// Bit `i` set when `pred` holds on lane `i` (every lane gets the word).
#[inline(always)]
pub fn ballot(pred: bool) -> u32 {
    // SAFETY: convergent NVVM intrinsic, called by all 32 lanes.
    unsafe { vote_ballot_sync(FULL_MASK, pred) }
}

/// Sum over the warp (every lane gets the result).
#[inline(always)]
pub fn warp_sum(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v += shfl_xor(v, m);
        m >>= 1;
    }
    v
}

/// Max over the warp (every lane gets the result).
#[inline(always)]
pub fn warp_max(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v = fmax(v, shfl_xor(v, m));
        m >>= 1;
    }
    v
}

/// The CTA's dynamic shared memory (sized at launch), as `f32` words.
#[inline(always)]
pub fn dynamic_smem() -> *mut f32 {
    core::intrinsics::gpu::gpu_launch_sized_workgroup_mem::<f32>()
}

/// The CTA's dynamic shared memory (sized at launch), as 16-byte chunks (16-byte aligned).
#[inline(always)]
pub fn dynamic_smem_chunks() -> *mut Chunk {
    core::intrinsics::gpu::gpu_launch_sized_workgroup_mem::<Chunk>()
}

/// `2^x` on the SFU (`ex2.approx.ftz`). Flushing denormals matters: without `.ftz` every exp2 is
/// four instructions (a range test, a pre-scale, the SFU op and a fix-up), which in the softmax of a
/// tile was a quarter of the consumers' instructions. A result below 2^-126 reads as 0, far below a
/// softmax term that matters next to the row maximum's 1.
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    // SAFETY: register-only NVVM intrinsic.
    unsafe { ex2_approx_ftz(x) }
}

/// `log2(x)` on the SFU (`lg2.approx.f32`).
#[inline(always)]
pub fn log2(x: f32) -> f32 {
    let r: f32;
    // SAFETY: register-only; not `pure` (house rule for device asm).
    unsafe { core::arch::asm!("lg2.approx.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(nomem, nostack)) };
    r
}

/// `1 / x` on the SFU (`rcp.approx.ftz.f32`, ~1 ulp): an IEEE `/` costs a slow-path call and a
/// dozen registers per use.
#[inline(always)]
pub fn rcp(x: f32) -> f32 {
    let r: f32;
    // SAFETY: register-only; not `pure` (house rule for device asm).
    unsafe { core::arch::asm!("rcp.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(nomem, nostack)) };
    r
}

/// Fused `a * b + c` (plain `a * b + c` is never contracted).
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    core::intrinsics::fmaf32(a, b, c)
}

/// Max that propagates NaN (`max.NaN.f32`; `-inf` is the identity): a NaN logit makes its row's
/// max NaN on every lane, so the row's output is NaN as in the float64 reference. (A select
/// `if a > b` keeps whichever operand comes second when one is NaN: lanes of a warp then disagree,
/// and a row whose logits are all NaN could come out as an empty row of zeros.)
#[inline(always)]
pub fn fmax(a: f32, b: f32) -> f32 {
    let r: f32;
    // SAFETY: register operands only; `max.NaN` needs sm_80, the oldest arch built. (LLVM's
    // `llvm.maximum.f32` became a compare-and-select sequence here, not this one instruction.)
    unsafe {
        core::arch::asm!("max.NaN.f32 {r}, {a}, {b};", r = out(reg32) r, a = in(reg32) a, b = in(reg32) b, options(pure, nomem, nostack))
    };
    r
}

/// `atomicOr` on a global `u32` (the status word).
///
/// # Safety
/// `p` is a valid, 4-byte aligned device pointer.
#[inline(always)]
pub unsafe fn atomic_or(p: *mut u32, v: u32) {
    // SAFETY: the caller guarantees `p` is valid and aligned.
    unsafe { AtomicU32::from_ptr(p) }.fetch_or(v, Ordering::Relaxed);
}

/// `atomicAdd` on a global `u32`; returns the old value.
///
/// # Safety
/// `p` is a valid, 4-byte aligned device pointer.
#[inline(always)]
pub unsafe fn atomic_add(p: *mut u32, v: u32) -> u32 {
    // SAFETY: the caller guarantees `p` is valid and aligned.
    unsafe { AtomicU32::from_ptr(p) }.fetch_add(v, Ordering::Relaxed)
}

/// `atomicAnd` (relaxed) on a `u32` in global or shared memory.
///
/// # Safety
/// `p` is a valid, 4-byte aligned pointer.
#[inline(always)]
pub unsafe fn atomic_and(p: *mut u32, v: u32) {
    // SAFETY: the caller guarantees `p` is valid and aligned.
    unsafe { AtomicU32::from_ptr(p) }.fetch_and(v, Ordering::Relaxed);
}

/// `atomicAdd` on a global `u32` with acquire-release ordering (orders this thread's earlier
/// memory operations before it and later ones after); returns the old value.
///
/// # Safety
/// `p` is a valid, 4-byte aligned device pointer.
#[inline(always)]
pub unsafe fn atomic_add_acq_rel(p: *mut u32, v: u32) -> u32 {
    // SAFETY: the caller guarantees `p` is valid and aligned.
    unsafe { AtomicU32::from_ptr(p) }.fetch_add(v, Ordering::AcqRel)
}

/// `fence.acq_rel.gpu` (CUDA's `__threadfence()`): this thread's earlier writes are visible
/// GPU-wide before its later ones (and reads after it see what fenced writers published).
#[inline(always)]
pub fn fence_gpu() {
    // SAFETY: no operands; not `nomem`, so the compiler keeps memory accesses on their side.
    unsafe { core::arch::asm!("fence.acq_rel.gpu;", options(nostack)) };
}

/// `ld.global.cg.f32`: a load cached in the L2 only, for data other CTAs wrote during this launch
/// (read after a fence that orders it).
///
/// # Safety
/// `p` is a valid, 4-byte aligned global address.
#[inline(always)]
pub unsafe fn load_cg(p: *const f32) -> f32 {
    let r: f32;
    // SAFETY: the caller's promise; not `pure` (house rule for device asm).
    unsafe { core::arch::asm!("ld.global.cg.f32 {r}, [{p}];", r = out(reg32) r, p = in(reg64) p as u64, options(nostack, readonly)) };
    r
}

/// Four f32 with one `ld.global.cg.v4.f32` (see [`load_cg`]).
///
/// # Safety
/// `p` is a valid, 16-byte aligned global address of four f32.
#[inline(always)]
pub unsafe fn load_cg4(p: *const f32) -> [f32; 4] {
    let (a, b, c, d): (f32, f32, f32, f32);
    // SAFETY: the caller's promise; not `pure` (house rule for device asm).
    unsafe {
        core::arch::asm!(
            "ld.global.cg.v4.f32 {{{a}, {b}, {c}, {d}}}, [{p}];",
            a = out(reg32) a,
            b = out(reg32) b,
            c = out(reg32) c,
            d = out(reg32) d,
            p = in(reg64) p as u64,
            options(nostack, readonly)
        )
    };
    [a, b, c, d]
}

/// Asks the L2 to fetch `bytes` bytes at `p` from device memory, so later loads hit the L2: one
/// `cp.async.bulk.prefetch.L2` with PTX 8.0 (sm_90 builds), else `prefetch.global.L2` per 128-byte
/// line. Nothing waits for it and no register holds the data: bytes in flight that cost no
/// occupancy.
///
/// # Safety
/// `p` is 16-byte aligned global memory and `bytes` a multiple of 16, the range inside one
/// allocation.
#[inline(always)]
pub unsafe fn prefetch_l2<T>(p: *const T, bytes: usize) {
    #[cfg(target_feature = "ptx80")]
    // SAFETY: the caller's promise; not `pure` (house rule for device asm).
    unsafe {
        core::arch::asm!("cp.async.bulk.prefetch.L2.global [{p}], {n};", p = in(reg64) p as u64, n = in(reg32) bytes as u32, options(nostack))
    };
    #[cfg(not(target_feature = "ptx80"))]
    {
        let mut off = 0;
        while off < bytes {
            // SAFETY: the caller's promise (a prefetch never faults).
            unsafe { core::arch::asm!("prefetch.global.L2 [{p}];", p = in(reg64) p as u64 + off as u64, options(nostack)) };
            off += 128;
        }
    }
}

/// 16 bytes, 16-byte aligned: the unit of every K/V load (`ld.global.v4.u32`).
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Chunk(pub [u32; 4]);

/// Loads 16 bytes.
///
/// # Safety
/// `p` is valid for reads of 16 bytes and 16-byte aligned.
#[inline(always)]
pub unsafe fn load_chunk<T>(p: *const T) -> Chunk {
    // SAFETY: the caller guarantees validity and alignment.
    unsafe { *(p as *const Chunk) }
}

/// Stores 16 bytes (`st.global.v4.u32`). Word by word into the aligned place: a whole-struct store
/// became a `memcpy` that went through local memory in 8-byte halves; four aligned word stores are
/// merged into one vector store.
///
/// # Safety
/// `p` is valid for writes of 16 bytes and 16-byte aligned.
#[inline(always)]
pub unsafe fn store_chunk<T>(p: *mut T, c: Chunk) {
    let q = p as *mut Chunk;
    // SAFETY: the caller guarantees validity and alignment.
    unsafe {
        (*q).0[0] = c.0[0];
        (*q).0[1] = c.0[1];
        (*q).0[2] = c.0[2];
        (*q).0[3] = c.0[3];
    }
}

/// An element of a KV cache as the attention kernels read it: the query's own type (`auto`), or an
/// fp8 code (`crate::fp8::{E4m3, E5m2}`).
pub trait KvElement: Copy {
    const CACHE: KvCacheDType;
    /// Elements per 16-byte chunk (vLLM's `x` of the key cache).
    const X: usize;
    /// What [`KvElement::quad`]'s results are multiplied by to give the elements' values (folded
    /// into the scales): 1, except for the software e4m3 decode (see `crate::fp8::unit`).
    const UNIT: f32;
    /// Elements `4q .. 4q + 4` of a chunk, as f32 divided by `UNIT`.
    fn quad(c: &Chunk, q: usize) -> [f32; 4];
}

macro_rules! auto_kv_element {
    ($($t:ty),*) => {$(
        impl KvElement for $t {
            const CACHE: KvCacheDType = KvCacheDType::Auto;
            const X: usize = <$t as Element>::X;
            const UNIT: f32 = 1.0;
            #[inline(always)]
            fn quad(c: &Chunk, q: usize) -> [f32; 4] {
                core::array::from_fn(|e| <$t as Element>::chunk_elem(c, 4 * q + e))
            }
        }
    )*};
}
auto_kv_element!(f32, f16, Bf16);

/// Loads the first 8 bytes of a chunk (the other two words are zero).
///
/// # Safety
/// `p` is valid for reads of 8 bytes and 8-byte aligned.
#[inline(always)]
pub unsafe fn load_half_chunk<T>(p: *const T) -> Chunk {
    /// 8 bytes, 8-byte aligned (`ld.global.v2.u32`).
    #[repr(C, align(8))]
    #[derive(Clone, Copy)]
    struct Half([u32; 2]);
    // SAFETY: the caller guarantees validity and alignment.
    let w = unsafe { *(p as *const Half) };
    Chunk([w.0[0], w.0[1], 0, 0])
}

/// An element type of queries, caches and outputs: how to widen it to f32 and narrow back.
pub trait Element: Copy {
    /// The host-side name of this type.
    const DTYPE: DType;
    /// Elements per 16-byte chunk (vLLM's `x`).
    const X: usize;
    /// Element `i` (`< X`) of a chunk, as f32.
    fn chunk_elem(c: &Chunk, i: usize) -> f32;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    const X: usize = 4;
    #[inline(always)]
    fn chunk_elem(c: &Chunk, i: usize) -> f32 {
        f32::from_bits(c.0[i])
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    const X: usize = 8;
    #[inline(always)]
    fn chunk_elem(c: &Chunk, i: usize) -> f32 {
        f16::from_bits((c.0[i / 2] >> (16 * (i % 2))) as u16) as f32
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v as f16
    }
}

/// bfloat16 as raw bits (core has no bf16 type). Widening is exact (a shift); narrowing rounds to
/// nearest even in software, so it is the same on every arch and matches the host's `half` crate.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct Bf16(pub u16);

impl Element for Bf16 {
    const DTYPE: DType = DType::BF16;
    const X: usize = 8;
    #[inline(always)]
    fn chunk_elem(c: &Chunk, i: usize) -> f32 {
        let w = c.0[i / 2];
        f32::from_bits(if i.is_multiple_of(2) { w << 16 } else { w & 0xffff_0000 })
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        let b = v.to_bits();
        if v.is_nan() {
            return Bf16(((b >> 16) | 0x40) as u16);
        }
        let round = 0x7fff + ((b >> 16) & 1);
        Bf16((b.wrapping_add(round) >> 16) as u16)
    }
}
