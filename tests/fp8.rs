//! fp8 conversions on the GPU (hardware `cvt` on sm_89+, the exact software path of the sm_80
//! build) against the CPU's (`pagedattn::layout::fp8`): every code, every rounding midpoint and
//! its neighbours, saturation, zeros, infinities, NaN, and random values over the whole range.

use pagedattn::layout::Fp8Kind;
use pagedattn::testing::Rng;
use pagedattn::util::fp8_codec;

use crate::common;

/// Inputs that pin down rounding: each finite code's value, the midpoints between neighbours and
/// one ulp either side, values past the largest code, specials, and random values.
fn probe_inputs(kind: Fp8Kind) -> Vec<f32> {
    let finite: Vec<f32> = (0..0x80u8).map(|c| kind.decode(c)).filter(|v| v.is_finite()).collect();
    let mut v = Vec::new();
    for w in finite.windows(2) {
        let mid = (w[0] + w[1]) / 2.0;
        v.extend([w[0], mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1)]);
    }
    let max = kind.max_value();
    v.extend([max, max * 1.01, max * 1.5, 1e30, f32::MAX, f32::INFINITY, f32::NAN, 0.0, f32::from_bits(1), 1e-30]);
    let mut rng = Rng::new(7);
    for _ in 0..20_000 {
        // Log-uniform over the format's range and a bit beyond.
        let e = rng.uniform() * 20.0 - 4.0;
        v.push(rng.uniform() * 2f32.powf(e) * max / 64.0);
    }
    let neg: Vec<f32> = v.iter().map(|x| -x).collect();
    v.extend(neg);
    v
}

#[test]
fn gpu_fp8_conversions_match_the_cpu() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let gpu = common::gpu_of(&mut device);
    let hardware_expected = gpu.arch >= (8, 9);
    for kind in Fp8Kind::ALL {
        let input = probe_inputs(kind);
        for hardware in [false, true] {
            let out = fp8_codec(gpu, kind, hardware, &input).unwrap();
            let path = if out.used_hardware { "hardware cvt" } else { "software" };
            assert_eq!(out.used_hardware, hardware && hardware_expected, "{kind:?}: asked hardware {hardware}, ran {path}");
            for c in 0..=255u8 {
                let want = kind.decode(c);
                for (how, got) in [("decode", out.decoded[c as usize]), ("decode4", out.decoded4[c as usize])] {
                    if kind.is_nan(c) {
                        assert!(got.is_nan(), "{kind:?} {path} {how}: code {c:#04x} decoded to {got}, want NaN");
                    } else {
                        assert_eq!(got.to_bits(), want.to_bits(), "{kind:?} {path} {how}: code {c:#04x} decoded to {got}, want {want}");
                    }
                }
            }
            let mut bad = Vec::new();
            for (x, &got) in input.iter().zip(&out.encoded) {
                let want = kind.encode(*x);
                let same = if kind.is_nan(want) { kind.is_nan(got) } else { got == want };
                if !same {
                    bad.push(format!("{x:e} -> {got:#04x}, want {want:#04x}"));
                }
            }
            assert!(bad.is_empty(), "{kind:?} {path}: {} of {} encodings differ: {:?}", bad.len(), input.len(), &bad[..bad.len().min(10)]);
            common::note(&format!("gpu_fp8_conversions_match_the_cpu: {kind:?} {path}: 256 codes and {} encodings agree", input.len()));
        }
    }
}
