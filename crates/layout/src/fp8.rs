//! fp8 KV-cache element formats (OCP "FP8"): `e4m3` (vLLM's `fp8_e4m3`, the "fn" variant: no
//! infinities, one NaN per sign, max ±448) and `e5m2` (IEEE-like: infinities and NaNs, max ±57344).
//!
//! The exact software conversions live here, `no_std`, so the CPU reference and the kernels of
//! arches without fp8 `cvt` (the sm_80 build) run the same code. Encoding is vLLM's quantize step
//! after the division by the scale: round to nearest even, saturating (`cvt.rn.satfinite`): finite
//! values beyond the largest finite code and ±inf become that code with their sign; NaN stays NaN.

/// An fp8 format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fp8Kind {
    E4m3,
    E5m2,
}

impl Fp8Kind {
    pub const ALL: [Fp8Kind; 2] = [Fp8Kind::E4m3, Fp8Kind::E5m2];

    /// vLLM's `kv_cache_dtype` spelling.
    pub const fn name(self) -> &'static str {
        match self {
            Fp8Kind::E4m3 => "fp8_e4m3",
            Fp8Kind::E5m2 => "fp8_e5m2",
        }
    }

    const fn mant_bits(self) -> u32 {
        match self {
            Fp8Kind::E4m3 => 3,
            Fp8Kind::E5m2 => 2,
        }
    }

    const fn bias(self) -> i32 {
        match self {
            Fp8Kind::E4m3 => 7,
            Fp8Kind::E5m2 => 15,
        }
    }

    /// The largest finite code (positive): e4m3 `0x7e` (448), e5m2 `0x7b` (57344).
    pub const fn max_code(self) -> u8 {
        match self {
            Fp8Kind::E4m3 => 0x7e,
            Fp8Kind::E5m2 => 0x7b,
        }
    }

    /// The positive NaN code this module produces.
    pub const fn nan_code(self) -> u8 {
        match self {
            Fp8Kind::E4m3 => 0x7f,
            Fp8Kind::E5m2 => 0x7f,
        }
    }

    /// The largest finite value.
    pub fn max_value(self) -> f32 {
        self.decode(self.max_code())
    }

    /// Whether `code` is a NaN.
    pub const fn is_nan(self, code: u8) -> bool {
        match self {
            Fp8Kind::E4m3 => code & 0x7f == 0x7f,
            Fp8Kind::E5m2 => code & 0x7f > 0x7c,
        }
    }

    /// The exact value of `code`.
    #[inline(always)]
    pub fn decode(self, code: u8) -> f32 {
        let (mb, bias) = (self.mant_bits(), self.bias());
        let neg = code & 0x80 != 0;
        let e = ((code & 0x7f) >> mb) as i32;
        let m = (code & ((1 << mb) - 1)) as u32;
        let mag = if self.is_nan(code) {
            f32::NAN
        } else if self == Fp8Kind::E5m2 && code & 0x7f == 0x7c {
            f32::INFINITY
        } else if e == 0 {
            // Subnormal: m quanta of 2^(1 - bias - mb).
            m as f32 * pow2(1 - bias - mb as i32)
        } else {
            ((1 << mb) + m) as f32 * pow2(e - bias - mb as i32)
        };
        if neg { -mag } else { mag }
    }

    /// `x` rounded to the nearest code (ties to even), saturating to ±max; NaN gives NaN.
    #[inline(always)]
    pub fn encode(self, x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        if x.is_nan() {
            return sign | self.nan_code();
        }
        let a = if x < 0.0 { -x } else { x };
        let (mb, bias) = (self.mant_bits() as i32, self.bias());
        if a >= self.max_value() {
            return sign | self.max_code();
        }
        // floor(log2(a)); f32 subnormals are far below half the smallest fp8 subnormal.
        let bits = a.to_bits();
        if bits < 0x0080_0000 {
            return sign;
        }
        let e = ((bits >> 23) & 0xff) as i32 - 127;
        let emin = 1 - bias;
        // Quantum of the binade (or of the subnormals); a / q is exact (a power-of-two scaling).
        let q_exp = if e < emin { emin - mb } else { e - mb };
        let t = a * pow2(-q_exp);
        let mut n = t as u32;
        let frac = t - n as f32;
        if frac > 0.5 || (frac == 0.5 && n & 1 == 1) {
            n += 1;
        }
        // Subnormal codes are the quantum count; a count of 2^mb is the smallest normal, which is
        // the same bit pattern. Normal codes: the biased exponent above the mantissa; a mantissa
        // that rounded up to 2^(mb+1) carries into the exponent (same bit arithmetic).
        let code = if e < emin { n } else { (((e + bias) as u32) << mb) + (n - (1 << mb)) };
        let code = if code > self.max_code() as u32 { self.max_code() as u32 } else { code };
        sign | code as u8
    }
}

/// `2^e` for `e` in `-126..=127`, exactly.
#[inline(always)]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finite_codes(k: Fp8Kind) -> impl Iterator<Item = u8> {
        (0..=255u8).filter(move |&c| !k.is_nan(c) && k.decode(c).is_finite())
    }

    #[test]
    fn known_values() {
        let e4 = Fp8Kind::E4m3;
        assert_eq!(e4.decode(0x01), pow2(-9));
        assert_eq!(e4.decode(0x08), pow2(-6));
        assert_eq!(e4.decode(0x38), 1.0);
        assert_eq!(e4.decode(0x7e), 448.0);
        assert_eq!(e4.decode(0xfe), -448.0);
        assert!(e4.decode(0x7f).is_nan() && e4.decode(0xff).is_nan());
        let e5 = Fp8Kind::E5m2;
        assert_eq!(e5.decode(0x01), pow2(-16));
        assert_eq!(e5.decode(0x04), pow2(-14));
        assert_eq!(e5.decode(0x3c), 1.0);
        assert_eq!(e5.decode(0x7b), 57344.0);
        assert_eq!(e5.decode(0x7c), f32::INFINITY);
        assert_eq!(e5.decode(0xfc), f32::NEG_INFINITY);
        assert!((0x7d..=0x7f).all(|c| e5.decode(c).is_nan()));
        assert_eq!(finite_codes(e4).count(), 254);
        assert_eq!(finite_codes(e5).count(), 248);
    }

    #[test]
    fn every_code_round_trips() {
        for k in Fp8Kind::ALL {
            for c in finite_codes(k) {
                assert_eq!(k.encode(k.decode(c)), c, "{k:?} code {c:#04x} = {}", k.decode(c));
            }
            assert!(k.is_nan(k.encode(f32::NAN)));
        }
    }

    /// Between neighbouring codes: below the midpoint rounds down, above rounds up, the midpoint
    /// goes to the even code.
    #[test]
    fn rounds_to_nearest_even() {
        for k in Fp8Kind::ALL {
            let mut pos = [0u8; 128];
            let mut n = 0;
            for c in finite_codes(k).filter(|&c| c < 0x80) {
                pos[n] = c;
                n += 1;
            }
            for w in pos[..n].windows(2) {
                let (lo, hi) = (k.decode(w[0]), k.decode(w[1]));
                let mid = (lo + hi) / 2.0;
                let even = if w[0] & 1 == 0 { w[0] } else { w[1] };
                assert_eq!(k.encode(mid), even, "{k:?} midpoint of {:#04x} and {:#04x}", w[0], w[1]);
                assert_eq!(k.encode(-mid), 0x80 | even);
                let below = f32::from_bits(mid.to_bits() - 1);
                let above = f32::from_bits(mid.to_bits() + 1);
                assert_eq!(k.encode(below), w[0], "{k:?} just below the midpoint {mid}");
                assert_eq!(k.encode(above), w[1], "{k:?} just above the midpoint {mid}");
            }
        }
    }

    #[test]
    fn saturates_and_flushes() {
        for k in Fp8Kind::ALL {
            let max = k.max_value();
            for x in [max * 1.01, max * 2.0, 1e30, f32::INFINITY, f32::MAX] {
                assert_eq!(k.encode(x), k.max_code(), "{k:?} {x}");
                assert_eq!(k.encode(-x), 0x80 | k.max_code(), "{k:?} -{x}");
            }
            let tiny = k.decode(0x01);
            assert_eq!(k.encode(tiny * 0.5), 0x00, "{k:?} half the smallest subnormal rounds to even zero");
            assert_eq!(k.encode(tiny * 0.51), 0x01);
            assert_eq!(k.encode(1e-30), 0x00);
            assert_eq!(k.encode(-1e-30), 0x80);
            assert_eq!(k.encode(f32::from_bits(1)), 0x00);
        }
    }
}
