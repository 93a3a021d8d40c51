//! Hopper building blocks (`sm_90a`): `wgmma.mma_async` (warpgroup matrix products with shared-memory
//! descriptors), `mbarrier` waits, bulk tensor copies, proxy fences, `setmaxnreg` and named barriers. Inline `asm!`,
//! never `pure`: these are collective or ordered operations LLVM must not move, merge or drop.
//!
//! A warpgroup is 4 consecutive warps starting at a warp index divisible by 4. `wgmma` m64nNk16
//! with f32 accumulators: warp `w` of the group owns rows `16w ..`, and its lanes hold the
//! accumulators exactly as `mma.m16n8k16`'s C fragments, one `[f32; 4]` per 8 columns (see
//! `tensor_core`); an A operand from registers is `mma.m16n8k16`'s A fragment of the warp's rows.
//!
//! Shared-memory operands use the 128-byte swizzle: a tile is stored as column panels of 64
//! elements; in a panel, row `r` is 128 bytes at `r · 128` whose 16-byte piece `c` sits at
//! `(c ^ (r % 8)) · 16`; panels start 1024-byte aligned. Descriptors (PTX ISA, "matrix
//! descriptor"): start address, leading and stride byte offsets (each `>> 4`, 14 bits), swizzle mode
//! 1 (128 bytes) in bits 62–63. K-major operands (K and Q for `S = Q·Kᵀ`: rows of keys or queries,
//! the head dim contiguous): the stride offset is 1024 (8 rows), the leading offset unused; a k step
//! of 16 elements moves the start by 32 bytes inside the panel. MN-major (V for `O = P·V`: rows of
//! keys, the head dim contiguous, `imm-trans-b = 1`): the leading offset is the distance between
//! panels (64 columns of N), the stride offset 1024 (8 rows of K).
//!
//! Accumulator registers are in flight between a `wgmma` and the `wait` that retires it: every
//! access in between is undefined. [`fence_regs`] pins them on both sides (an empty `asm!` that
//! "modifies" each register), so LLVM cannot move their uses across the wait.

use core::arch::asm;

use crate::tensor_core::MmaElem;

/// A 128-byte-swizzle shared-memory descriptor: start `addr` (a shared-state-space byte address),
/// leading and stride byte offsets.
#[inline(always)]
pub fn desc(addr: u32, leading: u32, stride: u32) -> u64 {
    let f = |x: u32| ((x & 0x3FFFF) >> 4) as u64;
    f(addr) | (f(leading) << 16) | (f(stride) << 32) | (1u64 << 62)
}

/// The descriptor of `d`'s matrix moved `bytes` further (a multiple of 16; the address stays below
/// 256 KiB, so the start-address field does not carry into the next). Only the low word changes:
/// the high one (stride, swizzle) stays a constant, so a descriptor costs one 32-bit add, not a
/// 64-bit add and shifts.
#[inline(always)]
pub fn desc_add(d: u64, bytes: u32) -> u64 {
    let lo = (d as u32).wrapping_add(bytes >> 4);
    (d & !0xFFFF_FFFF) | lo as u64
}

/// `wgmma.fence`: orders this warp's register accesses before the next `wgmma`s (before the first
/// `wgmma` of a group and whenever accumulator or A registers were written by other instructions).
#[inline(always)]
pub fn fence() {
    // SAFETY: no operands; all warps of the warpgroup run it together.
    unsafe { asm!("wgmma.fence.sync.aligned;", options(nostack)) };
}

/// `wgmma.commit_group`: closes the group of the `wgmma`s issued so far.
#[inline(always)]
pub fn commit() {
    // SAFETY: no operands.
    unsafe { asm!("wgmma.commit_group.sync.aligned;", options(nostack)) };
}

/// `wgmma.wait_group N`: at most `N` groups still in flight.
#[inline(always)]
pub fn wait<const N: u32>() {
    // SAFETY: no operands.
    unsafe { asm!("wgmma.wait_group.sync.aligned {n};", n = const N, options(nostack)) };
}

/// Pins accumulator registers around `wgmma`s (see the module docs).
#[inline(always)]
pub fn fence_regs<const N: usize>(d: &mut [[f32; 4]; N]) {
    // (Index loops: iterator adapters kept arrays in local memory.)
    for i in 0..N {
        for e in 0..4 {
            // SAFETY: an empty instruction on a register.
            unsafe { asm!("/* {0} */", inout(reg32) d[i][e], options(nomem, nostack, preserves_flags)) };
        }
    }
}

/// Pins A-operand registers (see [`fence_regs`]).
#[inline(always)]
pub fn fence_a(a: &mut [u32; 4]) {
    for i in 0..4 {
        // SAFETY: an empty instruction on a register.
        unsafe { asm!("/* {0} */", inout(reg32) a[i], options(nomem, nostack, preserves_flags)) };
    }
}

/// Orders `x`'s computation before the next `wait` in `ptxas`'s schedule. `wait` has no operands,
/// so `ptxas` may hoist it above independent arithmetic, and it did: above a whole tile's softmax,
/// which then no longer overlapped the `P·V` in flight (it also took the in-flight A registers for
/// the softmax's temporaries, which forces the wait early). A shared store of `x` that never runs
/// (`never` is false at run time, which `ptxas` cannot see) is not moved below the wait after it.
#[inline(always)]
pub fn before_wait(x: [f32; 2], never: bool, addr: u32) {
    // SAFETY: a predicated shared store whose predicate is false at run time.
    unsafe {
        asm!(
            "{{ .reg .pred p; setp.ne.u32 p, {n}, 0; @p st.shared.v2.f32 [{addr}], {{{x0}, {x1}}}; }}",
            n = in(reg32) never as u32, addr = in(reg32) addr, x0 = in(reg32) x[0], x1 = in(reg32) x[1],
            options(nostack)
        )
    };
}

macro_rules! list {
    ($first:literal $($i:literal)*) => { concat!("{", stringify!($first), "}" $(, ", {", stringify!($i), "}")*) };
}

macro_rules! wgmma_ss_asm {
    ($n:literal, $ty:literal, $d:ident, $a:ident, $b:ident, $acc:ident, [$($i:literal)*]) => {
        asm!(
            concat!(
                "{{ .reg .pred p; setp.ne.b32 p, {acc}, 0; wgmma.mma_async.sync.aligned.m64n", $n, "k16.f32.", $ty, ".", $ty,
                " {{", list!($($i)*), "}}, {a}, {b}, p, 1, 1, 0, 0; }}"
            ),
            $(inout(reg32) $d[$i / 4][$i % 4],)*
            a = in(reg64) $a, b = in(reg64) $b, acc = in(reg32) $acc as u32,
            options(nostack)
        )
    };
}

macro_rules! wgmma_rs_asm {
    ($n:literal, $ty:literal, $d:ident, $a:ident, $b:ident, $acc:ident, [$($i:literal)*]) => {
        asm!(
            concat!(
                "{{ .reg .pred p; setp.ne.b32 p, {acc}, 0; wgmma.mma_async.sync.aligned.m64n", $n, "k16.f32.", $ty, ".", $ty,
                " {{", list!($($i)*), "}}, {{{a0}, {a1}, {a2}, {a3}}}, {b}, p, 1, 1, 1; }}"
            ),
            $(inout(reg32) $d[$i / 4][$i % 4],)*
            a0 = in(reg32) $a[0], a1 = in(reg32) $a[1], a2 = in(reg32) $a[2], a3 = in(reg32) $a[3], b = in(reg64) $b,
            acc = in(reg32) $acc as u32,
            options(nostack)
        )
    };
}

macro_rules! wgmma_fns {
    ($ss:ident, $rs:ident, $n:literal, $tiles:literal, [$($i:literal)*]) => {
        /// `D (+)= A·B` for a 64 × N × 16 step, A and B from shared memory (descriptors, both
        /// K-major); `accumulate == false` overwrites `d`. `d` holds at least N / 8 tiles (see
        /// [`ss`], which picks the variant by the tile count).
        ///
        /// # Safety
        /// All 128 threads of a warpgroup call it together with descriptors of live shared memory;
        /// `d` is untouched until a [`wait`] retires it.
        #[inline(always)]
        pub unsafe fn $ss<E: MmaElem, const T: usize>(d: &mut [[f32; 4]; T], a: u64, b: u64, accumulate: bool) {
            // SAFETY: the caller's promise.
            unsafe {
                if E::BF16 {
                    wgmma_ss_asm!($n, "bf16", d, a, b, accumulate, [$($i)*])
                } else {
                    wgmma_ss_asm!($n, "f16", d, a, b, accumulate, [$($i)*])
                }
            }
        }

        /// `D (+)= A·B` for a 64 × N × 16 step, A from registers (the warp's 16 rows as an
        /// `mma.m16n8k16` A fragment), B from shared memory MN-major (descriptor, `imm-trans-b`).
        ///
        /// # Safety
        /// As the shared-memory form.
        #[inline(always)]
        pub unsafe fn $rs<E: MmaElem, const T: usize>(d: &mut [[f32; 4]; T], a: [u32; 4], b: u64, accumulate: bool) {
            // SAFETY: the caller's promise.
            unsafe {
                if E::BF16 {
                    wgmma_rs_asm!($n, "bf16", d, a, b, accumulate, [$($i)*])
                } else {
                    wgmma_rs_asm!($n, "f16", d, a, b, accumulate, [$($i)*])
                }
            }
        }
    };
}

wgmma_fns!(ss_n64, rs_n64, "64", 8, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31]);
wgmma_fns!(ss_n256, rs_n256, "256", 32, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98 99 100 101 102 103 104 105 106 107 108 109 110 111 112 113 114 115 116 117 118 119 120 121 122 123 124 125 126 127]);
wgmma_fns!(ss_n128, rs_n128, "128", 16, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63]);

/// `mbarrier.init` with an expected arrival count.
///
/// # Safety
/// `bar` is an 8-byte aligned shared address no thread uses yet.
#[inline(always)]
pub unsafe fn mbarrier_init(bar: u32, count: u32) {
    // SAFETY: the caller's promise.
    unsafe { asm!("mbarrier.init.shared::cta.b64 [{b}], {c};", b = in(reg32) bar, c = in(reg32) count, options(nostack)) };
}

/// `fence.mbarrier_init`: initialized barriers are visible before a CTA barrier that follows.
#[inline(always)]
pub fn fence_mbarrier_init() {
    // SAFETY: no operands.
    unsafe { asm!("fence.mbarrier_init.release.cluster;", options(nostack)) };
}

/// `mbarrier.arrive` (release): one arrival on the barrier's current phase.
///
/// # Safety
/// `bar` is an initialized barrier.
#[inline(always)]
pub unsafe fn mbarrier_arrive(bar: u32) {
    // SAFETY: the caller's promise.
    unsafe { asm!("{{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [{b}]; }}", b = in(reg32) bar, options(nostack)) };
}

/// Waits (acquire) until the barrier's phase of parity `parity` has completed.
///
/// # Safety
/// `bar` is an initialized barrier.
#[inline(always)]
pub unsafe fn mbarrier_wait(bar: u32, parity: u32) {
    loop {
        let done: u32;
        // SAFETY: the caller's promise.
        unsafe {
            asm!(
                "{{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [{b}], {ph}; selp.u32 {d}, 1, 0, p; }}",
                b = in(reg32) bar, ph = in(reg32) parity, d = out(reg32) done,
                options(nostack)
            )
        };
        if done != 0 {
            return;
        }
    }
}

/// `mbarrier.arrive.expect_tx`: one arrival on `bar`, and `bytes` more bytes of bulk copies the
/// current phase waits for.
///
/// # Safety
/// `bar` is an initialized barrier.
#[inline(always)]
pub unsafe fn mbarrier_arrive_expect_tx(bar: u32, bytes: u32) {
    // SAFETY: the caller's promise.
    unsafe {
        asm!(
            "{{ .reg .b64 st; mbarrier.arrive.expect_tx.shared::cta.b64 st, [{b}], {n}; }}",
            b = in(reg32) bar, n = in(reg32) bytes,
            options(nostack)
        )
    };
}

/// `cp.async.bulk.tensor.3d`: the box of the tensor map `map` at coordinates `c` (innermost first)
/// into shared memory at `dst` (the map's swizzle applied), completing `bytes` of `bar`'s
/// transaction count. Coordinates outside the tensor read as zeros.
///
/// # Safety
/// `map` is the device address of a valid `CUtensorMap` (64-byte aligned) that no thread writes;
/// `dst` a shared address aligned for the map's swizzle with room for the box; `bar` a barrier whose
/// phase expects these bytes.
#[inline(always)]
pub unsafe fn tma_load_3d(dst: u32, map: u64, c: [i32; 3], bar: u32) {
    // SAFETY: the caller's promise.
    unsafe {
        asm!(
            "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [{d}], [{m}, {{{c0}, {c1}, {c2}}}], [{b}];",
            d = in(reg32) dst, m = in(reg64) map, c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], b = in(reg32) bar,
            options(nostack)
        )
    };
}

/// The generic address of the first parameter of kernel `$kernel` (its symbol): `mov` of the
/// parameter's address, then `cvta.param` (PTX 7.7). Bulk copies read a tensor map passed by value
/// through it, as CUDA's `__grid_constant__` parameters; nothing may write through it.
macro_rules! param_address {
    ($kernel:expr) => {{
        let a: u64;
        // SAFETY: takes the address of the entry point's own parameter; reads and writes nothing.
        unsafe {
            core::arch::asm!(
                concat!("mov.b64 {a}, ", $kernel, "_param_0;\n\tcvta.param.u64 {a}, {a};"),
                a = out(reg64) a,
                options(nostack)
            )
        };
        a
    }};
}
pub(crate) use param_address;

/// `cp.async.mbarrier.arrive.noinc`: one arrival on `bar` once every `cp.async` this thread issued
/// so far has landed (the arrival is one of the barrier's expected count).
///
/// # Safety
/// `bar` is an initialized barrier.
#[inline(always)]
pub unsafe fn cp_async_mbarrier_arrive(bar: u32) {
    // SAFETY: the caller's promise.
    unsafe { asm!("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [{b}];", b = in(reg32) bar, options(nostack)) };
}

/// `fence.proxy.async.shared::cta`: this thread's ordinary shared-memory writes (stores, landed
/// `cp.async`) are ordered before later reads by the async proxy (`wgmma`, the copy engine).
#[inline(always)]
pub fn fence_proxy_async() {
    // SAFETY: no operands.
    unsafe { asm!("fence.proxy.async.shared::cta;", options(nostack)) };
}

/// `setmaxnreg.inc`: this warpgroup's threads grow to `N` registers (all 128 call it together).
#[inline(always)]
pub fn setmaxnreg_inc<const N: u32>() {
    // SAFETY: no operands.
    unsafe { asm!("setmaxnreg.inc.sync.aligned.u32 {n};", n = const N, options(nostack)) };
}

/// `setmaxnreg.dec`: this warpgroup's threads shrink to `N` registers.
#[inline(always)]
pub fn setmaxnreg_dec<const N: u32>() {
    // SAFETY: no operands.
    unsafe { asm!("setmaxnreg.dec.sync.aligned.u32 {n};", n = const N, options(nostack)) };
}

/// `barrier.sync 0` (not `.aligned`): every thread of the CTA meets here, arriving through
/// different instructions. Warp-specialized kernels end with the producer and the consumers at
/// their own copies of the CTA barrier; `bar.sync 0` (= `barrier.sync.aligned`) requires all threads
/// to execute the same instruction, and compute-sanitizer's synccheck reports the split as
/// divergent threads.
#[inline(always)]
pub fn cta_barrier() {
    // SAFETY: no operands; every thread of the CTA reaches one of the kernel's calls.
    unsafe { asm!("barrier.sync 0;", options(nostack)) };
}

/// `bar.sync id, threads`: waits at named barrier `id` until `threads` threads (a multiple of 32)
/// have arrived or synced there, this warp included.
#[inline(always)]
pub fn barrier_sync(id: u32, threads: u32) {
    // SAFETY: register operands only.
    unsafe { asm!("bar.sync {i}, {n};", i = in(reg32) id, n = in(reg32) threads, options(nostack)) };
}

/// `bar.arrive id, threads`: counts this warp at named barrier `id` without waiting.
#[inline(always)]
pub fn barrier_arrive(id: u32, threads: u32) {
    // SAFETY: register operands only.
    unsafe { asm!("bar.arrive {i}, {n};", i = in(reg32) id, n = in(reg32) threads, options(nostack)) };
}

/// [`ss_n64`] / [`ss_n128`] by the accumulator's tile count (`T` 8-column tiles: N = 8T).
///
/// # Safety
/// As [`ss_n64`].
#[inline(always)]
pub unsafe fn ss<E: MmaElem, const T: usize>(d: &mut [[f32; 4]; T], a: u64, b: u64, accumulate: bool) {
    const { assert!(T == 8 || T == 16, "wgmma: N of 64 or 128") };
    // SAFETY: the caller's promise.
    unsafe {
        match T {
            8 => ss_n64::<E, T>(d, a, b, accumulate),
            16 => ss_n128::<E, T>(d, a, b, accumulate),
            _ => {}
        }
    }
}

/// [`rs_n64`] / [`rs_n128`] / [`rs_n256`] by the accumulator's tile count.
///
/// # Safety
/// As [`rs_n64`].
#[inline(always)]
pub unsafe fn rs<E: MmaElem, const T: usize>(d: &mut [[f32; 4]; T], a: [u32; 4], b: u64, accumulate: bool) {
    const { assert!(T == 8 || T == 16 || T == 32, "wgmma: N of 64, 128 or 256") };
    // SAFETY: the caller's promise.
    unsafe {
        match T {
            8 => rs_n64::<E, T>(d, a, b, accumulate),
            16 => rs_n128::<E, T>(d, a, b, accumulate),
            32 => rs_n256::<E, T>(d, a, b, accumulate),
            _ => {}
        }
    }
}
