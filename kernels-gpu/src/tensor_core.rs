//! Tensor-core building blocks (sm_80+): `mma.sync.m16n8k16` with f16/bf16 inputs and f32
//! accumulators, `ldmatrix` (plain and transposed) from shared memory, and `cp.async` 16-byte copies
//! from global to shared memory. Inline `asm!`, never `pure`: these are warp-collective (every lane
//! of the warp must execute them together), and LLVM must not move, merge or drop them.
//!
//! Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane `l`, `g = l / 4`,
//! `t = l % 4`:
//! - A (16×16, row-major), four `b32` of two halves each: rows `g` / `g + 8`, columns
//!   `2t, 2t+1` (regs 0, 1) and `2t+8, 2t+9` (regs 2, 3) — reg 0 = (g, 2t..), 1 = (g+8, 2t..),
//!   2 = (g, 2t+8..), 3 = (g+8, 2t+8..);
//! - B (16×8, "col": `B[k][n]`), two `b32`: k = `2t, 2t+1` (reg 0) and `2t+8, 2t+9` (reg 1), n = `g`;
//! - C/D (16×8 f32), four floats: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
//!
//! `ldmatrix.x4` gives lane `l` element pair (row `l / 4`, columns `2(l % 4)..`) of each of four 8×8
//! matrices whose row addresses lanes 0–7, 8–15, 16–23, 24–31 supply, which is the A layout when the
//! four matrices are (rows 0–7, cols 0–7), (rows 8–15, cols 0–7), (rows 0–7, cols 8–15),
//! (rows 8–15, cols 8–15); on a row-major `[n][k]` tile (keys) it is the B layout of `Kᵀ`; with
//! `.trans` on a row-major `[k][n]` tile (values) it is the B layout of `V`.

use core::arch::asm;

/// The element type of an mma.
pub trait MmaElem {
    /// bf16 (else f16).
    const BF16: bool;
}

/// IEEE half.
pub struct F16;
/// bfloat16.
pub struct Bf16;

impl MmaElem for F16 {
    const BF16: bool = false;
}
impl MmaElem for Bf16 {
    const BF16: bool = true;
}

/// `d = a · b + c` for one 16×8×16 tile (f32 accumulators).
#[inline(always)]
pub fn mma_16816<E: MmaElem>(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    macro_rules! mma {
        ($ty:literal) => {{
            let (d0, d1, d2, d3): (f32, f32, f32, f32);
            // SAFETY: register-only tensor-core op; the caller runs it on all 32 lanes.
            unsafe {
                asm!(
                    concat!(
                        "mma.sync.aligned.m16n8k16.row.col.f32.", $ty, ".", $ty, ".f32 ",
                        "{{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{c0}, {c1}, {c2}, {c3}}};"
                    ),
                    d0 = out(reg32) d0, d1 = out(reg32) d1, d2 = out(reg32) d2, d3 = out(reg32) d3,
                    a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
                    b0 = in(reg32) b[0], b1 = in(reg32) b[1],
                    c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], c3 = in(reg32) c[3],
                    options(nomem, nostack)
                )
            };
            [d0, d1, d2, d3]
        }};
    }
    if E::BF16 { mma!("bf16") } else { mma!("f16") }
}

/// The 32-bit shared-state-space address of a generic pointer into shared memory. Kernels take it
/// once for their dynamic shared memory and form every `ldmatrix` address as base + offset: a
/// generic (64-bit) pointer per fragment kept live across a loop costs two registers each.
#[inline(always)]
pub fn shared_addr<T>(p: *const T) -> u32 {
    let s: u32;
    // SAFETY: address arithmetic only.
    unsafe {
        asm!(
            "{{ .reg .u64 a; cvta.to.shared.u64 a, {p}; cvt.u32.u64 {s}, a; }}",
            p = in(reg64) p as u64,
            s = out(reg32) s,
            options(nomem, nostack)
        )
    };
    s
}

macro_rules! ldmatrix {
    ($(#[$doc:meta])* $name:ident, $shape:literal, $n:literal, [$($r:ident),*]) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// Every lane's `addr` is a 16-byte aligned shared-memory address (see [`shared_addr`]) with
        /// 16 readable bytes; all 32 lanes call it together.
        #[inline(always)]
        pub unsafe fn $name(addr: u32) -> [u32; $n] {
            $(let $r: u32;)*
            // SAFETY: the caller's promise.
            unsafe {
                asm!(
                    concat!("ldmatrix.sync.aligned.m8n8.", $shape, ".shared.b16 {{", ldmatrix!(@list $($r),*), "}}, [{a}];"),
                    a = in(reg32) addr,
                    $($r = out(reg32) $r,)*
                    options(nostack, readonly)
                )
            };
            [$($r),*]
        }
    };
    (@list $first:ident $(, $r:ident)*) => { concat!("{", stringify!($first), "}" $(, ", {", stringify!($r), "}")*) };
}

ldmatrix!(
    /// `ldmatrix.x4`: lane `l` passes the address of row `l % 8` of matrix `l / 8` (16 bytes) and
    /// receives one `b32` of each of the four matrices.
    ldmatrix_x4, "x4", 4, [r0, r1, r2, r3]
);
ldmatrix!(
    /// `ldmatrix.x4.trans`: as [`ldmatrix_x4`], each matrix transposed.
    ldmatrix_x4_trans, "x4.trans", 4, [r0, r1, r2, r3]
);
ldmatrix!(
    /// `ldmatrix.x2`: two matrices (lanes 0–15 pass row addresses; the others' must still be valid
    /// shared addresses).
    ldmatrix_x2, "x2", 2, [r0, r1]
);
ldmatrix!(
    /// `ldmatrix.x2.trans`: as [`ldmatrix_x2`], each matrix transposed.
    ldmatrix_x2_trans, "x2.trans", 2, [r0, r1]
);

/// `cp.async.cg.shared.global` of 16 bytes (asynchronous; see [`cp_async_commit`], [`cp_async_wait_all`]).
///
/// # Safety
/// `dst` is a 16-byte aligned shared-memory address (see [`shared_addr`]), `src` 16-byte aligned
/// global memory with 16 readable bytes.
#[inline(always)]
pub unsafe fn cp_async_16<T>(dst: u32, src: *const T) {
    // SAFETY: the caller's promise.
    unsafe {
        asm!(
            "cp.async.cg.shared.global [{d}], [{s}], 16;",
            d = in(reg32) dst,
            s = in(reg64) src as u64,
            options(nostack)
        )
    };
}

/// `cp.async` of 16 bytes to `dst`, the first `bytes` (0 or 16) read from `src`, the rest zeros.
///
/// # Safety
/// As [`cp_async_16`] where `bytes` is 16; `src` any address where it is 0.
#[inline(always)]
pub unsafe fn cp_async_16_fill<T>(dst: u32, src: *const T, bytes: u32) {
    // SAFETY: the caller's promise.
    unsafe {
        asm!(
            "cp.async.cg.shared.global [{d}], [{s}], 16, {n};",
            d = in(reg32) dst,
            s = in(reg64) src as u64,
            n = in(reg32) bytes,
            options(nostack)
        )
    };
}

/// `cp.async.commit_group`: closes the group of the copies issued so far.
#[inline(always)]
pub fn cp_async_commit() {
    // SAFETY: no operands.
    unsafe { asm!("cp.async.commit_group;", options(nostack)) };
}

/// `cp.async.wait_all`: this thread's copies have landed (a barrier then publishes them to the CTA).
#[inline(always)]
pub fn cp_async_wait_all() {
    // SAFETY: no operands.
    unsafe { asm!("cp.async.wait_all;", options(nostack)) };
}

/// Two f32 as one `b32` of two halves of `E` (low half first), rounded to nearest even.
#[inline(always)]
pub fn pack2<E: MmaElem>(lo: f32, hi: f32) -> u32 {
    let r: u32;
    // SAFETY: register-only conversion (`cvt.rn.f16x2.f32` / `.bf16x2`: the first source is the high half).
    unsafe {
        if !E::BF16 {
            asm!("cvt.rn.f16x2.f32 {r}, {h}, {l};", r = out(reg32) r, h = in(reg32) hi, l = in(reg32) lo, options(nomem, nostack));
        } else {
            asm!("cvt.rn.bf16x2.f32 {r}, {h}, {l};", r = out(reg32) r, h = in(reg32) hi, l = in(reg32) lo, options(nomem, nostack));
        }
    }
    r
}
