//! fp8 (e4m3 / e5m2) conversions on the device. Arches with fp8 `cvt` (sm_89 and up, so our sm_90
//! build) use the hardware instructions; the sm_80 build (whose ptxas rejects them) runs the exact
//! software conversions of `pagedattn_layout::fp8`, which the CPU reference runs too. Both round to
//! nearest even and saturate to the largest finite value (`cvt.rn.satfinite`); a GPU test checks
//! every code and every rounding midpoint of both paths against the CPU.

use pagedattn_layout::{Fp8Kind, KvCacheDType};

use crate::intrinsics::{Chunk, KvElement};

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

/// What [`decode4`] results are multiplied by to give the codes' values: 1 on the hardware path;
/// on the software path 256 for e4m3 (its codes are decoded as f16 bit patterns, 2^-8 of the
/// value), 1 for e5m2 (its codes are the top byte of the f16 of the same value).
#[inline(always)]
pub const fn unit(kind: Fp8Kind, hardware: bool) -> f32 {
    if hardware && HARDWARE {
        1.0
    } else {
        match kind {
            Fp8Kind::E4m3 => 256.0,
            Fp8Kind::E5m2 => 1.0,
        }
    }
}

/// The four codes of `w` (lowest byte first), decoded and divided by [`unit`]: the attention
/// kernels' bulk decode, which folds the unit into the scales. NaN codes give NaN.
#[inline(always)]
pub fn decode4(kind: Fp8Kind, w: u32, hardware: bool) -> [f32; 4] {
    #[cfg(target_feature = "sm_89")]
    if hardware {
        return hw::decode4(kind, w);
    }
    let _ = hardware;
    core::array::from_fn(|i| {
        let c = (w >> (8 * i)) & 0xff;
        match kind {
            // Sign to bit 15, exponent and mantissa under the f16 exponent's low bits: the f16 of
            // value · 2^-8 (biases 7 and 15), subnormals included; 0x7f / 0xff are NaN.
            Fp8Kind::E4m3 => {
                let v = f16::from_bits((((c & 0x80) << 8) | ((c & 0x7f) << 7)) as u16) as f32;
                if c & 0x7f == 0x7f { f32::NAN } else { v }
            }
            // e5m2 is the top byte of an f16: exact for every code, infinities and NaNs included.
            Fp8Kind::E5m2 => f16::from_bits((c << 8) as u16) as f32,
        }
    })
}

/// fp8 e4m3 cache codes (the attention kernels' `KvElement`).
#[derive(Clone, Copy)]
pub struct E4m3(pub u8);
/// fp8 e5m2 cache codes.
#[derive(Clone, Copy)]
pub struct E5m2(pub u8);

/// The format of a code type.
pub trait Fp8Code: Copy {
    const KIND: Fp8Kind;
}

macro_rules! fp8_element {
    ($t:ident, $kind:expr) => {
        impl Fp8Code for $t {
            const KIND: Fp8Kind = $kind;
        }

        impl KvElement for $t {
            const CACHE: KvCacheDType = KvCacheDType::Fp8($kind);
            const X: usize = 16;
            const UNIT: f32 = unit($kind, true);
            #[inline(always)]
            fn quad(c: &Chunk, q: usize) -> [f32; 4] {
                decode4($kind, c.0[q], true)
            }
        }
    };
}
fp8_element!(E4m3, Fp8Kind::E4m3);
fp8_element!(E5m2, Fp8Kind::E5m2);

/// `x / scale` to fp8 `kind` with the build's conversion (the cache kernels' quantize step).
#[inline(always)]
pub fn quantize(kind: Fp8Kind, x: f32, scale: f32) -> u8 {
    encode(kind, x / scale, true)
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

    /// Four codes: two `cvt.rn.f16x2.e4m3x2` (`.e5m2x2`), then four `cvt.f32.f16`.
    #[inline(always)]
    pub fn decode4(kind: Fp8Kind, w: u32) -> [f32; 4] {
        let (a, b, c, d): (f32, f32, f32, f32);
        macro_rules! cvt4 {
            ($ty:literal) => {
                // SAFETY: register-only conversions; not `pure` (house rule for device asm).
                unsafe {
                    asm!(
                        concat!(
                            "{{ .reg .b16 p0, p1, h0, h1, h2, h3; .reg .b32 t0, t1; mov.b32 {{p0, p1}}, {w}; ",
                            "cvt.rn.f16x2.", $ty, "x2 t0, p0; cvt.rn.f16x2.", $ty, "x2 t1, p1; ",
                            "mov.b32 {{h0, h1}}, t0; mov.b32 {{h2, h3}}, t1; ",
                            "cvt.f32.f16 {a}, h0; cvt.f32.f16 {b}, h1; cvt.f32.f16 {c}, h2; cvt.f32.f16 {d}, h3; }}"
                        ),
                        w = in(reg32) w,
                        a = out(reg32) a,
                        b = out(reg32) b,
                        c = out(reg32) c,
                        d = out(reg32) d,
                        options(nomem, nostack)
                    )
                }
            };
        }
        match kind {
            Fp8Kind::E4m3 => cvt4!("e4m3"),
            Fp8Kind::E5m2 => cvt4!("e5m2"),
        }
        [a, b, c, d]
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
