//! fp8 (e4m3 / e5m2) conversions on the device. Arches with fp8 `cvt` (sm_89 and up, so our sm_90
//! build) use the hardware instructions; the sm_80 build (whose ptxas rejects them) runs the exact
//! software conversions of `pagedattn_layout::fp8`, which the CPU reference runs too. Both round to
//! nearest even and saturate to the largest finite value (`cvt.rn.satfinite`); a GPU test checks
//! every code and every rounding midpoint of both paths against the CPU.

use pagedattn_layout::Fp8Kind;

/// Whether this build converts with the hardware `cvt` (else the software path).
pub const HARDWARE: bool = cfg!(target_feature = "sm_89");

/// The value of fp8 `code` of `kind`; `hardware` selects the `cvt` path where the build has it.
#[inline(always)]
pub fn decode(kind: Fp8Kind, code: u8, hardware: bool) -> f32 {
    #[cfg(target_feature = "sm_89")]
    if hardware {
        return hw::decode(kind, code);
    }
    let _ = hardware;
    kind.decode(code)
}

/// `x` to fp8 `kind` (round to nearest even, saturating); `hardware` as in [`decode`].
#[inline(always)]
pub fn encode(kind: Fp8Kind, x: f32, hardware: bool) -> u8 {
    #[cfg(target_feature = "sm_89")]
    if hardware {
        return hw::encode(kind, x);
    }
    let _ = hardware;
    kind.encode(x)
}

#[cfg(target_feature = "sm_89")]
mod hw {
    use core::arch::asm;
    use pagedattn_layout::Fp8Kind;

    /// `cvt.rn.f16x2.e4m3x2` / `.e5m2x2` on the code in the low byte, then the low half to f32.
    #[inline(always)]
    pub fn decode(kind: Fp8Kind, code: u8) -> f32 {
        let out: f32;
        // SAFETY: register-only conversions; not `pure` (house rule for device asm).
        unsafe {
            match kind {
                Fp8Kind::E4m3 => asm!(
                    "{{ .reg .b32 t; .reg .b16 lo, hi; cvt.rn.f16x2.e4m3x2 t, {c}; mov.b32 {{lo, hi}}, t; cvt.f32.f16 {o}, lo; }}",
                    c = in(reg16) code as u16,
                    o = out(reg32) out,
                    options(nomem, nostack)
                ),
                Fp8Kind::E5m2 => asm!(
                    "{{ .reg .b32 t; .reg .b16 lo, hi; cvt.rn.f16x2.e5m2x2 t, {c}; mov.b32 {{lo, hi}}, t; cvt.f32.f16 {o}, lo; }}",
                    c = in(reg16) code as u16,
                    o = out(reg32) out,
                    options(nomem, nostack)
                ),
            }
        }
        out
    }

    /// `cvt.rn.satfinite.e4m3x2.f32` / `.e5m2x2` with `x` in the low byte.
    #[inline(always)]
    pub fn encode(kind: Fp8Kind, x: f32) -> u8 {
        let out: u16;
        // SAFETY: as above.
        unsafe {
            match kind {
                Fp8Kind::E4m3 => asm!(
                    "cvt.rn.satfinite.e4m3x2.f32 {o}, {z}, {x};",
                    o = out(reg16) out,
                    z = in(reg32) 0f32,
                    x = in(reg32) x,
                    options(nomem, nostack)
                ),
                Fp8Kind::E5m2 => asm!(
                    "cvt.rn.satfinite.e5m2x2.f32 {o}, {z}, {x};",
                    o = out(reg16) out,
                    z = in(reg32) 0f32,
                    x = in(reg32) x,
                    options(nomem, nostack)
                ),
            }
        }
        out as u8
    }
}
