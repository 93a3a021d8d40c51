//! The KV-cache ops (`reshape_and_cache`, `reshape_and_cache_flash`, `copy_blocks`, `swap_blocks`).
//!
//! CPU section (runs everywhere): the reference semantics on small hand-checkable cases (padding
//! slots skipped, vLLM, flash, HND and combined-tensor layouts, whole-block copies), then argument
//! validation (typed errors, never a panic). GPU section (skips loudly without a GPU): every op
//! bit-exact against the CPU backend on random data over randomly prefilled or NaN-poisoned caches
//! (so untouched slots are checked too), device-side guards, and a round trip through
//! `paged_attention_v1`.

use pagedattn::cache::CacheLayout;
use pagedattn::layout::{BLOCK_SIZES, DTYPES, DType, HEAD_SIZES, KvCacheDType, status};
use pagedattn::testing::{Inputs, Rng};
use pagedattn::{
    Device, Error, Fp8Scales, PagedAttentionArgs, ScalarType, Tensor, copy_blocks, reshape_and_cache, reshape_and_cache_flash,
    reshape_and_cache_fp8, swap_blocks,
};

/// `(k_scale, v_scale)` of the fp8 round trips.
const RT_FP8_SCALES: (f32, f32) = (0.03, 0.0625);

use crate::common::{self, assert_matches, run_op};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A contiguous host i64 tensor.
fn i64s(shape: &[usize], data: &[i64]) -> Tensor {
    Tensor::from_i64(shape, data).unwrap()
}

/// Uniform in `[-1, 1)` but never zero, so a zeroed element cannot pass for a written one.
fn nonzero(rng: &mut Rng) -> f64 {
    let v = rng.uniform() as f64;
    if v == 0.0 { 0.5 } else { v }
}

/// A host view `shape`/`strides` at `offset` over a storage of `len` elements, holding random
/// non-zero values everywhere (inside and outside the view).
fn random_view(dtype: ScalarType, shape: &[usize], strides: &[usize], offset: usize, len: usize, rng: &mut Rng) -> Tensor {
    let mut base = Tensor::nan(dtype, &[len]);
    {
        let mut b = base.cpu_bytes_mut().unwrap();
        for i in 0..len {
            dtype.write_f64(&mut b, i, nonzero(rng));
        }
    }
    base.view(shape, strides, offset).unwrap()
}

/// A host view over a storage of `len` elements all NaN (`nan`) or random non-zero.
fn cache_view(dtype: ScalarType, shape: &[usize], strides: &[usize], offset: usize, len: usize, nan: bool, rng: &mut Rng) -> Tensor {
    if nan {
        Tensor::nan(dtype, &[len]).view(shape, strides, offset).unwrap()
    } else {
        random_view(dtype, shape, strides, offset, len, rng)
    }
}

/// A contiguous random non-zero host tensor.
fn random(dtype: ScalarType, shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    random_view(dtype, shape, &pagedattn::tensor::contiguous_strides(shape), 0, n, rng)
}

/// Panics unless the two tensors' whole storages (view and padding) hold the same bytes.
fn assert_same_bits(got: &Tensor, want: &Tensor, what: &str) {
    let (g, w) = (got.to_cpu().unwrap(), want.to_cpu().unwrap());
    let (g, w) = (g.cpu_bytes().unwrap(), w.cpu_bytes().unwrap());
    assert_eq!(g.len(), w.len(), "{what}: storage sizes differ");
    let es = got.dtype().size_bytes();
    let bad: Vec<usize> = (0..g.len() / es).filter(|&i| g[i * es..(i + 1) * es] != w[i * es..(i + 1) * es]).collect();
    assert!(bad.is_empty(), "{what}: {} of {} storage elements differ, first at {}", bad.len(), g.len() / es, bad[0]);
}

/// Runs a reshape op of `layout`.
fn reshape(
    device: &Device,
    layout: CacheLayout,
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut Tensor,
    value_cache: &mut Tensor,
    slot_mapping: &Tensor,
) -> pagedattn::Result<()> {
    match layout {
        CacheLayout::Vllm => reshape_and_cache(device, key, value, key_cache, value_cache, slot_mapping),
        CacheLayout::Flash => reshape_and_cache_flash(device, key, value, key_cache, value_cache, slot_mapping),
    }
}

/// `key[t][h][d]` of the hand-checked cases: distinct, non-zero, exact in every dtype.
fn hand_value(t: usize, h: usize, d: usize, value: bool) -> f64 {
    (t * 64 + h * 16 + d + 1) as f64 * if value { -1.0 } else { 1.0 }
}

fn hand_kv(dtype: ScalarType, rows: usize, h: usize, d: usize) -> (Tensor, Tensor) {
    let make = |value: bool| {
        let v: Vec<f32> = (0..rows * h * d).map(|i| hand_value(i / (h * d), i / d % h, i % d, value) as f32).collect();
        Tensor::from_f32(dtype.float().unwrap(), &[rows, h, d], &v).unwrap()
    };
    (make(false), make(true))
}

/// Storage elements that are not NaN.
fn written(t: &Tensor) -> usize {
    let n = t.storage().len_bytes() / t.dtype().size_bytes();
    (0..n).filter(|&i| !t.storage_f64(i).is_nan()).count()
}

// ---------------------------------------------------------------------------------------------
// CPU: reference semantics by hand
// ---------------------------------------------------------------------------------------------

/// vLLM layout, f32 (x = 4): 2 KV heads, head 8, block 4, 3 blocks. Token 1 is padding; token 3
/// goes to the last slot; key rows past `slot_mapping`'s length are not read.
#[test]
fn cpu_reshape_and_cache_vllm_layout_by_hand() {
    let (h, d, bs, nb, x) = (2, 8, 4, 3, 4);
    let (key, value) = hand_kv(ScalarType::F32, 5, h, d);
    let mut kc = Tensor::nan(ScalarType::F32, &[nb, h, d / x, bs, x]);
    let mut vc = Tensor::nan(ScalarType::F32, &[nb, h, d, bs]);
    let slots = i64s(&[4], &[5, -1, 0, 11]);
    reshape_and_cache(&Device::Cpu, &key, &value, &mut kc, &mut vc, &slots).unwrap();
    for (t, s) in [(0, 5), (2, 0), (3, 11)] {
        let (b, o) = (s / bs, s % bs);
        for hh in 0..h {
            for dd in 0..d {
                assert_eq!(kc.get_f64(&[b, hh, dd / x, o, dd % x]), hand_value(t, hh, dd, false), "key t{t} h{hh} d{dd}");
                assert_eq!(vc.get_f64(&[b, hh, dd, o]), hand_value(t, hh, dd, true), "value t{t} h{hh} d{dd}");
            }
        }
    }
    // Slot 5 = block 1, offset 1: key dim 6 of head 1 is storage element ((1*2 + 1)*2 + 1)*16 + 1*4 + 2.
    assert_eq!(kc.storage_f64(((2 + 1) * 2 + 1) * 16 + 4 + 2), hand_value(0, 1, 6, false));
    assert_eq!(vc.storage_f64((2 + 1) * 32 + 6 * 4 + 1), hand_value(0, 1, 6, true));
    // Nothing else was written: the padding token and the rows past the mapping are skipped.
    assert_eq!(written(&kc), 3 * h * d);
    assert_eq!(written(&vc), 3 * h * d);
}

/// Flash layout `[num_blocks, block_size, H, D]`, bf16.
#[test]
fn cpu_reshape_and_cache_flash_by_hand() {
    let (h, d, bs, nb) = (2, 8, 4, 2);
    let (key, value) = hand_kv(ScalarType::BF16, 3, h, d);
    let mut kc = Tensor::nan(ScalarType::BF16, &[nb, bs, h, d]);
    let mut vc = Tensor::nan(ScalarType::BF16, &[nb, bs, h, d]);
    let slots = i64s(&[3], &[-7, 6, 1]);
    reshape_and_cache_flash(&Device::Cpu, &key, &value, &mut kc, &mut vc, &slots).unwrap();
    for (t, s) in [(1, 6), (2, 1)] {
        for hh in 0..h {
            for dd in 0..d {
                // Contiguous storage: element ((b * bs + o) * h + hh) * d + dd.
                let at = ((s / bs * bs + s % bs) * h + hh) * d + dd;
                assert_eq!(kc.storage_f64(at), hand_value(t, hh, dd, false));
                assert_eq!(vc.storage_f64(at), hand_value(t, hh, dd, true));
            }
        }
    }
    assert_eq!(written(&kc), 2 * h * d);
    assert_eq!(written(&vc), 2 * h * d);
}

/// The HND layout `[num_blocks, H, block_size, D]`, passed as a `[num_blocks, block_size, H, D]`
/// view with permuted strides: rows land at `[b][h][o][..]` of the storage.
#[test]
fn cpu_reshape_and_cache_flash_hnd_view() {
    let (h, d, bs, nb) = (3, 8, 4, 2);
    let (key, value) = hand_kv(ScalarType::F16, 2, h, d);
    let strides = [h * bs * d, d, bs * d, 1];
    let n = nb * h * bs * d;
    let view = || Tensor::nan(ScalarType::F16, &[n]).view(&[nb, bs, h, d], &strides, 0).unwrap();
    let (mut kc, mut vc) = (view(), view());
    reshape_and_cache_flash(&Device::Cpu, &key, &value, &mut kc, &mut vc, &i64s(&[2], &[7, 2])).unwrap();
    for (t, s) in [(0, 7), (1, 2)] {
        for hh in 0..h {
            for dd in 0..d {
                let at = ((s / bs * h + hh) * bs + s % bs) * d + dd;
                assert_eq!(kc.storage_f64(at), hand_value(t, hh, dd, false));
                assert_eq!(vc.storage_f64(at), hand_value(t, hh, dd, true));
            }
        }
    }
    assert_eq!(written(&kc), 2 * h * d);
}

/// vLLM's combined caches, one allocation split with `select`: `[2, num_blocks, block_size, H, D]`
/// (key = kv[0], value = kv[1]) and `[num_blocks, 2, block_size, H, D]` (key = kv[:, 0], value =
/// kv[:, 1]).
#[test]
fn cpu_reshape_and_cache_flash_combined_views() {
    let (h, d, bs, nb) = (2, 4, 2, 3);
    let (key, value) = hand_kv(ScalarType::F32, 2, h, d);
    for (name, shape, axis) in [("[2, nb, ...]", [2, nb, bs, h, d], 0), ("[nb, 2, ...]", [nb, 2, bs, h, d], 1)] {
        let kv = Tensor::nan(ScalarType::F32, &shape);
        let (mut kc, mut vc) = (kv.select(axis, 0).unwrap(), kv.select(axis, 1).unwrap());
        reshape_and_cache_flash(&Device::Cpu, &key, &value, &mut kc, &mut vc, &i64s(&[2], &[5, 0])).unwrap();
        // The combined tensor's element [kv][b][o][hh][dd] (or [b][kv][o][hh][dd]).
        let at = |which: usize, b: usize, o: usize, hh: usize, dd: usize| {
            if axis == 0 { kv.get_f64(&[which, b, o, hh, dd]) } else { kv.get_f64(&[b, which, o, hh, dd]) }
        };
        for (t, s) in [(0, 5), (1, 0)] {
            for hh in 0..h {
                for dd in 0..d {
                    assert_eq!(at(0, s / bs, s % bs, hh, dd), hand_value(t, hh, dd, false), "{name}");
                    assert_eq!(at(1, s / bs, s % bs, hh, dd), hand_value(t, hh, dd, true), "{name}");
                }
            }
        }
        assert_eq!(written(&kv), 2 * 2 * h * d, "{name}: only the two tokens' rows");
    }
}

/// Whole blocks in every layer's key and value cache; other blocks untouched.
#[test]
fn cpu_copy_blocks_by_hand() {
    let mut rng = Rng::new(5);
    let (nb, h, d, bs, x) = (5, 2, 16, 4, 8);
    let mut keys: Vec<Tensor> = (0..2).map(|_| random(ScalarType::F16, &[nb, h, d / x, bs, x], &mut rng)).collect();
    let mut values: Vec<Tensor> = (0..2).map(|_| random(ScalarType::F16, &[nb, h, d, bs], &mut rng)).collect();
    let before: Vec<Vec<f64>> = keys.iter().chain(&values).map(Tensor::to_f64_vec).collect();
    let mapping = i64s(&[2, 2], &[0, 3, 4, 1]);
    {
        let mut k: Vec<&mut Tensor> = keys.iter_mut().collect();
        let mut v: Vec<&mut Tensor> = values.iter_mut().collect();
        copy_blocks(&Device::Cpu, &mut k, &mut v, &mapping).unwrap();
    }
    let per = h * d * bs;
    for (i, t) in keys.iter().chain(&values).enumerate() {
        let (old, new) = (&before[i], t.to_f64_vec());
        let block = |v: &[f64], b: usize| v[b * per..(b + 1) * per].to_vec();
        assert_eq!(block(&new, 3), block(old, 0), "cache {i}: block 3 = old block 0");
        assert_eq!(block(&new, 1), block(old, 4), "cache {i}: block 1 = old block 4");
        for b in [0, 2, 4] {
            assert_eq!(block(&new, b), block(old, b), "cache {i}: block {b} untouched");
        }
    }
}

/// A cache that is a view with a block stride larger than a block (`kv[:, 0]` of a combined
/// `[num_blocks, 2, ...]` tensor): only the view's blocks move.
#[test]
fn cpu_copy_blocks_strided_blocks() {
    let mut rng = Rng::new(6);
    let (nb, bs, h, d) = (4, 2, 1, 8);
    let page = bs * h * d;
    let mut key = random_view(ScalarType::F32, &[nb, bs, h, d], &[2 * page, h * d, d, 1], 0, 2 * nb * page, &mut rng);
    let mut value = random_view(ScalarType::F32, &[nb, bs, h, d], &[2 * page, h * d, d, 1], page, 2 * nb * page, &mut rng);
    let (k0, v0) = (key.to_cpu().unwrap(), value.to_cpu().unwrap());
    copy_blocks(&Device::Cpu, &mut [&mut key], &mut [&mut value], &i64s(&[1, 2], &[2, 0])).unwrap();
    for (new, old, off) in [(&key, &k0, 0), (&value, &v0, page)] {
        for i in 0..2 * nb * page {
            let (b, within) = (i / (2 * page), i % (2 * page));
            let in_view = (off..off + page).contains(&within);
            let want = if in_view && b == 0 { old.storage_f64(2 * 2 * page + within) } else { old.storage_f64(i) };
            assert_eq!(new.storage_f64(i).to_bits(), want.to_bits(), "storage element {i}");
        }
    }
}

#[test]
fn cpu_swap_blocks_by_hand() {
    let mut rng = Rng::new(7);
    let src = random(ScalarType::BF16, &[3, 4, 8], &mut rng);
    let mut dst = Tensor::nan(ScalarType::BF16, &[5, 4, 8]);
    swap_blocks(&Device::Cpu, &src, &mut dst, &i64s(&[2, 2], &[2, 0, 0, 4])).unwrap();
    let (s, d) = (src.to_f64_vec(), dst.to_f64_vec());
    assert_eq!(d[..32], s[64..96]);
    assert_eq!(d[128..160], s[..32]);
    assert!(d[32..128].iter().all(|v| v.is_nan()));
}

#[test]
fn cpu_empty_inputs_are_noops() {
    let (key, value) = hand_kv(ScalarType::F32, 2, 1, 4);
    let mut kc = Tensor::nan(ScalarType::F32, &[1, 1, 1, 2, 4]);
    let mut vc = Tensor::nan(ScalarType::F32, &[1, 1, 4, 2]);
    reshape_and_cache(&Device::Cpu, &key, &value, &mut kc, &mut vc, &i64s(&[0], &[])).unwrap();
    reshape_and_cache(&Device::Cpu, &key, &value, &mut kc, &mut vc, &i64s(&[2], &[-1, -1])).unwrap();
    assert_eq!(written(&kc) + written(&vc), 0);
    copy_blocks(&Device::Cpu, &mut [], &mut [], &i64s(&[1, 2], &[0, 1])).unwrap();
    copy_blocks(&Device::Cpu, &mut [&mut kc], &mut [&mut vc], &i64s(&[0, 2], &[])).unwrap();
    let src = Tensor::nan(ScalarType::F32, &[2, 4]);
    swap_blocks(&Device::Cpu, &src, &mut kc.to_cpu().unwrap(), &i64s(&[0, 2], &[])).unwrap_err();
    let mut dst = Tensor::nan(ScalarType::F32, &[2, 4]);
    swap_blocks(&Device::Cpu, &src, &mut dst, &i64s(&[0, 2], &[])).unwrap();
}

/// Writing with `reshape_and_cache` and reading back with `paged_attention_v1` (CPU backend) gives
/// the attention of the dense keys and values, computed here without any cache.
#[test]
fn cpu_reshape_then_attention_equals_dense_attention() {
    let rt = RoundTrip::new(DType::F32, (4, 2), 64, 16, &[5, 33, 16], 41);
    let (kc, vc) = rt.caches(&Device::Cpu);
    let inputs = rt.inputs(kc, vc);
    let got = common::reference(&inputs);
    let want = rt.dense_attention();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-9 * w.abs().max(1.0), "{g} vs {w}");
    }
}

// ---------------------------------------------------------------------------------------------
// Validation: typed errors, never a panic
// ---------------------------------------------------------------------------------------------

/// A valid vLLM-layout call: f16 (x = 8), 3 tokens over 4 rows, 2 KV heads, head 16, block 4,
/// 3 blocks.
struct Args {
    key: Tensor,
    value: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slots: Tensor,
}

fn args(layout: CacheLayout) -> Args {
    let mut rng = Rng::new(9);
    let (h, d, bs, nb, x) = (2, 16, 4, 3, 8);
    let dt = ScalarType::F16;
    let (key_cache, value_cache) = match layout {
        CacheLayout::Vllm => (random(dt, &[nb, h, d / x, bs, x], &mut rng), random(dt, &[nb, h, d, bs], &mut rng)),
        CacheLayout::Flash => (random(dt, &[nb, bs, h, d], &mut rng), random(dt, &[nb, bs, h, d], &mut rng)),
    };
    Args {
        key: random(dt, &[4, h, d], &mut rng),
        value: random(dt, &[4, h, d], &mut rng),
        key_cache,
        value_cache,
        slots: i64s(&[3], &[0, -1, 11]),
    }
}

fn run_args(layout: CacheLayout, a: &mut Args) -> pagedattn::Result<()> {
    reshape(&Device::Cpu, layout, &a.key, &a.value, &mut a.key_cache, &mut a.value_cache, &a.slots)
}

#[test]
fn reshape_valid_base_cases() {
    for layout in [CacheLayout::Vllm, CacheLayout::Flash] {
        run_args(layout, &mut args(layout)).unwrap();
    }
}

#[test]
fn reshape_dtype_errors() {
    for layout in [CacheLayout::Vllm, CacheLayout::Flash] {
        let op = if layout == CacheLayout::Vllm { "reshape_and_cache" } else { "reshape_and_cache_flash" };
        let mut rng = Rng::new(1);
        let mut a = args(layout);
        a.key = random(ScalarType::I32, &[4, 2, 16], &mut rng);
        expect_err!(run_args(layout, &mut a), Error::DType { op: o, tensor: "key", got: ScalarType::I32, .. } => assert_eq!(o, op));
        let mut a = args(layout);
        a.value = random(ScalarType::BF16, &[4, 2, 16], &mut rng);
        expect_err!(run_args(layout, &mut a), Error::DType { tensor: "value", got: ScalarType::BF16, .. });
        let mut a = args(layout);
        a.value_cache = random(ScalarType::F32, a.value_cache.shape(), &mut rng);
        expect_err!(run_args(layout, &mut a), Error::DType { tensor: "value_cache", got: ScalarType::F32, .. });
        let mut a = args(layout);
        a.slots = Tensor::from_i32(&[3], &[0, 1, 2]).unwrap();
        expect_err!(run_args(layout, &mut a), Error::DType { tensor: "slot_mapping", got: ScalarType::I32, .. });
    }
}

#[test]
fn reshape_shape_errors() {
    let mut rng = Rng::new(2);
    let dt = ScalarType::F16;
    let l = CacheLayout::Vllm;
    let mut a = args(l);
    a.key = random(dt, &[4, 32], &mut rng);
    expect_err!(run_args(l, &mut a), Error::Shape { tensor: "key", got, .. } => assert_eq!(got, vec![4, 32]));
    let mut a = args(l);
    a.value = random(dt, &[4, 2, 8], &mut rng);
    expect_err!(run_args(l, &mut a), Error::Shape { tensor: "value", .. });
    // x = 4 for an f16 cache (must be 8).
    let mut a = args(l);
    a.key_cache = random(dt, &[3, 2, 4, 4, 4], &mut rng);
    expect_err!(run_args(l, &mut a), Error::Shape { tensor: "key_cache", expected, .. } => assert!(expected.contains(", 8]"), "{expected}"));
    // Wrong number of KV heads, and a value cache of another block size.
    let mut a = args(l);
    a.key_cache = random(dt, &[3, 1, 2, 4, 8], &mut rng);
    expect_err!(run_args(l, &mut a), Error::Shape { tensor: "key_cache", .. });
    let mut a = args(l);
    a.value_cache = random(dt, &[3, 2, 16, 8], &mut rng);
    expect_err!(run_args(l, &mut a), Error::Shape { tensor: "value_cache", got, .. } => assert_eq!(got, vec![3, 2, 16, 8]));
    // A head size that is not a multiple of x cannot have a vLLM key cache.
    let mut a = args(l);
    a.key = random(dt, &[4, 2, 12], &mut rng);
    a.value = random(dt, &[4, 2, 12], &mut rng);
    expect_err!(run_args(l, &mut a), Error::Shape { tensor: "key_cache", expected, .. } => assert!(expected.contains("not a multiple"), "{expected}"));
    // More slots than key rows; a 2-D mapping.
    let mut a = args(l);
    a.slots = i64s(&[5], &[0, 1, 2, 3, 4]);
    expect_err!(run_args(l, &mut a), Error::Shape { tensor: "slot_mapping", got, .. } => assert_eq!(got, vec![5]));
    let mut a = args(l);
    a.slots = i64s(&[3, 1], &[0, 1, 2]);
    expect_err!(run_args(l, &mut a), Error::Shape { tensor: "slot_mapping", .. });
    // Flash: rank and value cache shape.
    let f = CacheLayout::Flash;
    let mut a = args(f);
    a.key_cache = random(dt, &[3, 4, 32], &mut rng);
    expect_err!(run_args(f, &mut a), Error::Shape { tensor: "key_cache", .. });
    let mut a = args(f);
    a.value_cache = random(dt, &[3, 8, 2, 16], &mut rng);
    expect_err!(run_args(f, &mut a), Error::Shape { tensor: "value_cache", .. });
    // A head too large for one token's tile in the vLLM kernel (f32: at most 6140).
    let big = random(ScalarType::F32, &[1, 1, 6144], &mut rng);
    let mut kc = random(ScalarType::F32, &[1, 1, 1536, 1, 4], &mut rng);
    let mut vc = random(ScalarType::F32, &[1, 1, 6144, 1], &mut rng);
    expect_err!(reshape_and_cache(&Device::Cpu, &big, &big, &mut kc, &mut vc, &i64s(&[1], &[0])), Error::Unsupported { what: "head_size", supported, .. } => assert!(supported.contains("6140"), "{supported}"));
    // Block size 0.
    let mut a = args(f);
    a.key_cache = random(dt, &[3, 0, 2, 16], &mut rng);
    a.value_cache = random(dt, &[3, 0, 2, 16], &mut rng);
    expect_err!(run_args(f, &mut a), Error::Value { what: "block_size", .. });
}

#[test]
fn reshape_layout_errors() {
    let mut rng = Rng::new(3);
    let dt = ScalarType::F16;
    // Key with a strided head dim.
    for l in [CacheLayout::Vllm, CacheLayout::Flash] {
        let mut a = args(l);
        a.key = random_view(dt, &[4, 2, 16], &[64, 32, 2], 0, 256, &mut rng);
        expect_err!(run_args(l, &mut a), Error::Layout { tensor: "key", .. });
    }
    // vLLM key cache with a padded x axis; value cache with a strided slot axis.
    let l = CacheLayout::Vllm;
    let mut a = args(l);
    a.key_cache = random_view(dt, &[3, 2, 2, 4, 8], &[256, 128, 64, 16, 1], 0, 768, &mut rng);
    expect_err!(run_args(l, &mut a), Error::Layout { tensor: "key_cache", .. });
    let mut a = args(l);
    a.value_cache = random_view(dt, &[3, 2, 16, 4], &[256, 128, 8, 2], 0, 768, &mut rng);
    expect_err!(run_args(l, &mut a), Error::Layout { tensor: "value_cache", .. });
    // Flash cache whose head dim is strided; one whose slots overlap (stride 0).
    let f = CacheLayout::Flash;
    let mut a = args(f);
    a.value_cache = random_view(dt, &[3, 4, 2, 16], &[256, 64, 32, 2], 0, 768, &mut rng);
    expect_err!(run_args(f, &mut a), Error::Layout { tensor: "value_cache", .. });
    let mut a = args(f);
    a.key_cache = random_view(dt, &[3, 4, 2, 16], &[32, 0, 16, 1], 0, 128, &mut rng);
    expect_err!(run_args(f, &mut a), Error::Layout { tensor: "key_cache", why, .. } => assert!(why.contains("overlaps"), "{why}"));
    // A strided slot mapping.
    let mut a = args(f);
    a.slots = i64s(&[6], &[0, 9, 1, 9, 2, 9]).view(&[3], &[2], 0).unwrap();
    expect_err!(run_args(f, &mut a), Error::Layout { tensor: "slot_mapping", .. });
}

#[test]
fn reshape_host_slots_are_checked() {
    for l in [CacheLayout::Vllm, CacheLayout::Flash] {
        // 3 blocks of 4: slots 0..12.
        for (slots, needle) in [
            (vec![0, 12, 1], "slot_mapping[1] = 12 is outside 0..12"),
            (vec![i64::MAX, 0, 1], "slot_mapping[0] = 9223372036854775807"),
            (vec![3, -1, 3], "slot_mapping[2] = 3 repeats slot_mapping[0]"),
        ] {
            let mut a = args(l);
            let before = a.key_cache.to_f64_vec();
            a.slots = i64s(&[3], &slots);
            expect_err!(run_args(l, &mut a), Error::HostData { what, .. } => assert!(what.contains(needle), "{what}"));
            assert_eq!(a.key_cache.to_f64_vec(), before, "nothing written on error");
        }
        // Padding repeats freely; the last slot is fine.
        let mut a = args(l);
        a.slots = i64s(&[3], &[-1, -5, 11]);
        run_args(l, &mut a).unwrap();
    }
}

fn caches(n: usize, shape: &[usize], dt: ScalarType, rng: &mut Rng) -> Vec<Tensor> {
    (0..n).map(|_| random(dt, shape, rng)).collect()
}

fn run_copy(keys: &mut [Tensor], values: &mut [Tensor], mapping: &Tensor) -> pagedattn::Result<()> {
    let mut k: Vec<&mut Tensor> = keys.iter_mut().collect();
    let mut v: Vec<&mut Tensor> = values.iter_mut().collect();
    copy_blocks(&Device::Cpu, &mut k, &mut v, mapping)
}

#[test]
fn copy_blocks_errors() {
    let mut rng = Rng::new(4);
    let dt = ScalarType::F16;
    let (ks, vs) = ([4, 2, 2, 4, 8], [4, 2, 16, 4]);
    let ok = i64s(&[1, 2], &[0, 1]);
    let mut k = caches(2, &ks, dt, &mut rng);
    let mut v = caches(2, &vs, dt, &mut rng);
    run_copy(&mut k, &mut v, &ok).unwrap();
    // Layer counts differ.
    expect_err!(run_copy(&mut k, &mut v[..1], &ok), Error::Value { what: "value_caches.len()", .. });
    // One layer's shape, dtype or strides differ from layer 0's.
    let mut k2 = caches(2, &ks, dt, &mut rng);
    k2[1] = random(dt, &[5, 2, 2, 4, 8], &mut rng);
    expect_err!(run_copy(&mut k2, &mut v, &ok), Error::Shape { tensor: "key_caches", expected, .. } => assert!(expected.contains("layer 1"), "{expected}"));
    let mut v2 = caches(2, &vs, dt, &mut rng);
    v2[1] = random(ScalarType::BF16, &vs, &mut rng);
    expect_err!(run_copy(&mut k, &mut v2, &ok), Error::DType { tensor: "value_caches", .. });
    let mut v3 = caches(1, &vs, dt, &mut rng);
    v3.push(random_view(dt, &vs, &[256, 64, 4, 1], 16, 1040, &mut rng));
    expect_err!(run_copy(&mut k, &mut v3, &ok), Error::Layout { tensor: "value_caches", .. });
    // num_blocks differ between key and value caches.
    let mut v4 = caches(2, &[3, 2, 16, 4], dt, &mut rng);
    expect_err!(run_copy(&mut k, &mut v4, &ok), Error::Shape { tensor: "value_caches", .. });
    // A block that is not one span; a block of 8 bytes; a misaligned offset.
    let mut k5 = vec![random_view(dt, &[4, 2, 16], &[64, 32, 1], 0, 256, &mut rng)];
    let mut v5 = vec![random(dt, &[4, 2, 16], &mut rng)];
    expect_err!(run_copy(&mut k5, &mut v5, &ok), Error::Layout { tensor: "key_caches", why, .. } => assert!(why.contains("contiguous"), "{why}"));
    let mut k6 = vec![random(dt, &[4, 4], &mut rng)];
    let mut v6 = vec![random(dt, &[4, 4], &mut rng)];
    expect_err!(run_copy(&mut k6, &mut v6, &ok), Error::Layout { tensor: "key_caches", why, .. } => assert!(why.contains("16-byte"), "{why}"));
    let mut k7 = vec![random_view(dt, &[4, 8], &[8, 1], 1, 40, &mut rng)];
    let mut v7 = vec![random(dt, &[4, 8], &mut rng)];
    expect_err!(run_copy(&mut k7, &mut v7, &ok), Error::Layout { tensor: "key_caches", .. });
    // Mapping type and shape.
    expect_err!(run_copy(&mut k, &mut v, &Tensor::from_i32(&[1, 2], &[0, 1]).unwrap()), Error::DType { tensor: "block_mapping", .. });
    expect_err!(run_copy(&mut k, &mut v, &i64s(&[1, 3], &[0, 1, 2])), Error::Shape { tensor: "block_mapping", .. });
    expect_err!(run_copy(&mut k, &mut v, &i64s(&[2], &[0, 1])), Error::Shape { tensor: "block_mapping", .. });
    // Host mapping contents: range, repeated destination, a chain.
    for (pairs, needle) in [
        (vec![0, 4], "block_mapping[0][1] = 4 is outside 0..4"),
        (vec![1, 2, -1, 3], "block_mapping[1][0] = -1"),
        (vec![0, 2, 1, 2], "block_mapping[1][1] = 2 repeats block_mapping[0][1]"),
        (vec![0, 1, 1, 2], "block_mapping[1][0] = 1 is written by block_mapping[0]"),
    ] {
        let before: Vec<Vec<f64>> = k.iter().map(Tensor::to_f64_vec).collect();
        expect_err!(run_copy(&mut k, &mut v, &i64s(&[pairs.len() / 2, 2], &pairs)), Error::HostData { what, .. } => assert!(what.contains(needle), "{what}"));
        assert_eq!(k.iter().map(Tensor::to_f64_vec).collect::<Vec<_>>(), before, "nothing copied on error");
    }
    // A pair copying a block onto itself is a no-op, and allowed.
    run_copy(&mut k, &mut v, &i64s(&[2, 2], &[1, 1, 0, 2])).unwrap();
}

#[test]
fn swap_blocks_errors() {
    let mut rng = Rng::new(8);
    let dt = ScalarType::F32;
    let src = random(dt, &[3, 4, 8], &mut rng);
    let mut dst = random(dt, &[2, 4, 8], &mut rng);
    let ok = i64s(&[1, 2], &[2, 1]);
    swap_blocks(&Device::Cpu, &src, &mut dst, &ok).unwrap();
    expect_err!(
        swap_blocks(&Device::Cpu, &random(ScalarType::F16, &[3, 4, 8], &mut rng), &mut dst, &ok),
        Error::DType { tensor: "dst", .. }
    );
    expect_err!(swap_blocks(&Device::Cpu, &random(dt, &[3, 8, 4], &mut rng), &mut dst, &ok), Error::Shape { tensor: "dst", .. });
    let kv = random(dt, &[2, 3, 4, 8], &mut rng);
    expect_err!(swap_blocks(&Device::Cpu, &kv.select(0, 0).unwrap(), &mut kv.select(0, 1).unwrap(), &ok), Error::Layout { tensor: "dst", why, .. } => assert!(why.contains("shares"), "{why}"));
    let strided = random_view(dt, &[3, 4, 8], &[64, 16, 1], 0, 192, &mut rng);
    expect_err!(swap_blocks(&Device::Cpu, &strided, &mut dst, &ok), Error::Layout { tensor: "src", .. });
    for (pairs, needle) in [
        (vec![3, 0], "block_mapping[0][0] = 3 is outside 0..3"),
        (vec![0, 2], "block_mapping[0][1] = 2 is outside 0..2"),
        (vec![0, 1, 2, 1], "repeats"),
    ] {
        expect_err!(swap_blocks(&Device::Cpu, &src, &mut dst, &i64s(&[pairs.len() / 2, 2], &pairs)), Error::HostData { what, .. } => assert!(what.contains(needle), "{what}"));
    }
}

/// Random argument soup for every op: each call returns Ok or a typed error, never panics.
#[test]
fn random_arguments_never_panic() {
    let mut rng = Rng::new(2024);
    let dts = [ScalarType::F32, ScalarType::F16, ScalarType::BF16, ScalarType::I32, ScalarType::I64];
    let (mut accepted, mut rejected) = (0, 0);
    let mut tally = |r: pagedattn::Result<()>| match r {
        Ok(()) => accepted += 1,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            rejected += 1;
        }
    };
    for _ in 0..400 {
        let pick = |rng: &mut Rng, v: &[usize]| v[rng.below(v.len())];
        let dt = if rng.below(4) == 0 { dts[rng.below(dts.len())] } else { ScalarType::F16 };
        let (t, h, d, bs, nb) = (
            pick(&mut rng, &[0, 1, 3]),
            pick(&mut rng, &[1, 2]),
            pick(&mut rng, &[8, 16, 12]),
            pick(&mut rng, &[1, 4]),
            pick(&mut rng, &[1, 3]),
        );
        let rows = t + rng.below(2);
        let dt_or = |rng: &mut Rng| if rng.below(8) == 0 { dts[rng.below(dts.len())] } else { dt };
        let key = random(dt, &[rows, h, d], &mut rng);
        let value = random(dt_or(&mut rng), &[rows, h, pick(&mut rng, &[d, d, d + 8])], &mut rng);
        let x = 8;
        let slots: Vec<i64> = (0..t).map(|_| rng.below(nb * bs + 2) as i64 - 1).collect();
        let slot_t = i64s(&[t], &slots);
        let mut kc = random(dt_or(&mut rng), &[nb, h, d / x, bs, pick(&mut rng, &[x, 4])], &mut rng);
        let mut vc = random(dt, &[nb, h, d, pick(&mut rng, &[bs, bs, 2])], &mut rng);
        tally(reshape_and_cache(&Device::Cpu, &key, &value, &mut kc, &mut vc, &slot_t));
        let mut kc = random(dt_or(&mut rng), &[nb, bs, h, pick(&mut rng, &[d, d, 4])], &mut rng);
        let mut vc = random(dt, &[nb, bs, h, d], &mut rng);
        tally(reshape_and_cache_flash(&Device::Cpu, &key, &value, &mut kc, &mut vc, &slot_t));
        let pairs: Vec<i64> = (0..2 * t).map(|_| rng.below(nb + 2) as i64 - 1).collect();
        let mapping = i64s(&[t, 2], &pairs);
        tally(copy_blocks(&Device::Cpu, &mut [&mut kc], &mut [&mut vc], &mapping));
        tally(swap_blocks(&Device::Cpu, &key, &mut value.to_cpu().unwrap(), &mapping));
    }
    assert!(accepted > 50 && rejected > 200, "accepted {accepted}, rejected {rejected}");
}

// ---------------------------------------------------------------------------------------------
// Random cases for the GPU
// ---------------------------------------------------------------------------------------------

/// Where the flash caches live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlashLayout {
    /// `[num_blocks, block_size, H, D]`, contiguous.
    Nhd,
    /// `[num_blocks, H, block_size, D]`, viewed with permuted strides.
    Hnd,
    /// vLLM's `[2, num_blocks, block_size, H, D]`: key = kv[0], value = kv[1].
    KvOuter,
    /// `[num_blocks, 2, block_size, H, D]`: key = kv[:, 0], value = kv[:, 1].
    KvInner,
}

const FLASH_LAYOUTS: [FlashLayout; 4] = [FlashLayout::Nhd, FlashLayout::Hnd, FlashLayout::KvOuter, FlashLayout::KvInner];

/// One random reshape case.
#[derive(Clone, Debug)]
struct ReshapeCase {
    layout: CacheLayout,
    flash: FlashLayout,
    dtype: DType,
    num_tokens: usize,
    num_kv_heads: usize,
    head_size: usize,
    block_size: usize,
    /// Key/value rows padded by this many elements per token (keeps 16-byte rows when a multiple of x).
    row_pad: usize,
    /// Key/value views start this many elements into their storage (1: rows not 16-byte aligned).
    kv_offset: usize,
    nan_caches: bool,
    device_slots: bool,
    /// Prefill-style slots: consecutive positions through shuffled blocks (else a random permutation).
    runs: bool,
    seed: u64,
}

impl std::fmt::Display for ReshapeCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}{} {} tokens {} heads {}x h{} b{} pad {} off {}{}{}{} seed {}",
            self.layout,
            if self.layout == CacheLayout::Flash { format!("/{:?}", self.flash) } else { String::new() },
            self.dtype,
            self.num_tokens,
            self.num_kv_heads,
            self.head_size,
            self.block_size,
            self.row_pad,
            self.kv_offset,
            if self.nan_caches { " nan-caches" } else { "" },
            if self.device_slots { " device-slots" } else { "" },
            if self.runs { " runs" } else { "" },
            self.seed
        )
    }
}

struct ReshapeInputs {
    key: Tensor,
    value: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slots: Vec<i64>,
}

impl ReshapeCase {
    fn random(seed: u64, layout: CacheLayout) -> ReshapeCase {
        let mut rng = Rng::new(seed);
        let dtype = DTYPES[rng.below(DTYPES.len())];
        let x = dtype.x();
        ReshapeCase {
            layout,
            flash: FLASH_LAYOUTS[rng.below(4)],
            dtype,
            num_tokens: 1 + rng.below(48),
            num_kv_heads: [1, 2, 4, 8][rng.below(4)],
            head_size: HEAD_SIZES[rng.below(HEAD_SIZES.len())],
            block_size: [8, 16, 32, 64, 128, 256][rng.below(6)],
            row_pad: [0, x, 3][rng.below(3)],
            kv_offset: [0, 0, x, 1][rng.below(4)],
            nan_caches: rng.below(2) == 0,
            device_slots: rng.below(2) == 0,
            runs: rng.below(2) == 0,
            seed,
        }
    }

    fn num_blocks(&self) -> usize {
        self.num_tokens.div_ceil(self.block_size) + 2
    }

    fn inputs(&self) -> ReshapeInputs {
        let mut rng = Rng::new(self.seed ^ 0x5eed);
        let (t, h, d, bs, nb) = (self.num_tokens, self.num_kv_heads, self.head_size, self.block_size, self.num_blocks());
        let st = ScalarType::from(self.dtype);
        // Key/value: two extra rows that the mapping does not cover.
        let rows = t + 2;
        let (tok, off) = (h * d + self.row_pad, self.kv_offset);
        let kv = |rng: &mut Rng| random_view(st, &[rows, h, d], &[tok, d, 1], off, off + rows * tok, rng);
        let (key, value) = (kv(&mut rng), kv(&mut rng));
        // Distinct slots, about one token in eight padding.
        let all: Vec<i64> = if self.runs {
            let mut blocks: Vec<i64> = (0..nb as i64).collect();
            rng.shuffle(&mut blocks);
            let start = rng.below(bs);
            (start..nb * bs).map(|p| blocks[p / bs] * bs as i64 + (p % bs) as i64).collect()
        } else {
            let mut all: Vec<i64> = (0..(nb * bs) as i64).collect();
            rng.shuffle(&mut all);
            all
        };
        let slots: Vec<i64> = (0..t).map(|i| if rng.below(8) == 0 { -1 - rng.below(3) as i64 } else { all[i] }).collect();
        let nan = self.nan_caches;
        let (key_cache, value_cache) = match self.layout {
            CacheLayout::Vllm => {
                let x = self.dtype.x();
                // Padded head and block strides (whole 16-byte chunks), the key cache 16 bytes into
                // its storage (one element more, not 16-byte aligned, when the key rows are not either).
                let (hs_k, bs_k) = (d * bs + x, h * (d * bs + x) + 2 * x);
                let k_off = x + (self.kv_offset == 1) as usize;
                let k = cache_view(st, &[nb, h, d / x, bs, x], &[bs_k, hs_k, bs * x, x, 1], k_off, k_off + nb * bs_k, nan, &mut rng);
                let (hs_v, bs_v) = (d * bs + 1, h * (d * bs + 1) + 3);
                let v = cache_view(st, &[nb, h, d, bs], &[bs_v, hs_v, bs, 1], 2, 2 + nb * bs_v, nan, &mut rng);
                (k, v)
            }
            CacheLayout::Flash => flash_caches(self.flash, st, nb, bs, h, d, nan, &mut rng),
        };
        ReshapeInputs { key, value, key_cache, value_cache, slots }
    }
}

/// Flash caches `[num_blocks, block_size, H, D]` of a layout: separate allocations (NHD, HND), or
/// the two halves of one combined allocation split with `select`.
#[allow(clippy::too_many_arguments)]
fn flash_caches(
    layout: FlashLayout,
    st: ScalarType,
    nb: usize,
    bs: usize,
    h: usize,
    d: usize,
    nan: bool,
    rng: &mut Rng,
) -> (Tensor, Tensor) {
    let page = bs * h * d;
    let shape = [nb, bs, h, d];
    let combined = |shape: &[usize], axis: usize, rng: &mut Rng| {
        let n = shape.iter().product();
        let kv = cache_view(st, shape, &pagedattn::tensor::contiguous_strides(shape), 0, n, nan, rng);
        (kv.select(axis, 0).unwrap(), kv.select(axis, 1).unwrap())
    };
    match layout {
        FlashLayout::Nhd => {
            let strides = [page, h * d, d, 1];
            (cache_view(st, &shape, &strides, 0, nb * page, nan, rng), cache_view(st, &shape, &strides, 0, nb * page, nan, rng))
        }
        FlashLayout::Hnd => {
            let strides = [page, d, bs * d, 1];
            (cache_view(st, &shape, &strides, 0, nb * page, nan, rng), cache_view(st, &shape, &strides, 0, nb * page, nan, rng))
        }
        FlashLayout::KvOuter => combined(&[2, nb, bs, h, d], 0, rng),
        FlashLayout::KvInner => combined(&[nb, 2, bs, h, d], 1, rng),
    }
}

/// Copies two tensors to `device`, keeping them views of one allocation if they share one (a
/// combined KV cache), so that whole-storage comparisons see both halves.
fn upload_pair(device: &Device, a: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
    let a_dev = device.upload(a).unwrap();
    let b_dev = if a.shares_storage(b) { a_dev.view(b.shape(), b.strides(), b.offset()).unwrap() } else { device.upload(b).unwrap() };
    (a_dev, b_dev)
}

/// Runs a reshape case on the CPU and on `device` and checks the caches bit for bit.
fn check_reshape(device: &Device, c: &ReshapeCase) {
    let inp = c.inputs();
    let slots = i64s(&[c.num_tokens], &inp.slots);
    let (mut kc_cpu, mut vc_cpu) = upload_pair(&Device::Cpu, &inp.key_cache, &inp.value_cache);
    reshape(&Device::Cpu, c.layout, &inp.key, &inp.value, &mut kc_cpu, &mut vc_cpu, &slots).unwrap_or_else(|e| panic!("{c}: CPU: {e}"));
    let up = |t: &Tensor| device.upload(t).unwrap();
    let (key, value) = (up(&inp.key), up(&inp.value));
    let (mut kc, mut vc) = upload_pair(device, &inp.key_cache, &inp.value_cache);
    // Host slots alternate between pageable and pinned memory (both are checked, then uploaded).
    let slots_dev = match device {
        _ if c.device_slots => up(&slots),
        Device::Gpu(g) if c.seed % 2 == 1 => slots.to_pinned(g).unwrap(),
        _ => slots.to_cpu().unwrap(),
    };
    reshape(device, c.layout, &key, &value, &mut kc, &mut vc, &slots_dev).unwrap_or_else(|e| panic!("{c}: GPU: {e}"));
    assert_same_bits(&kc, &kc_cpu, &format!("{c}: key cache"));
    assert_same_bits(&vc, &vc_cpu, &format!("{c}: value cache"));
}

// ---------------------------------------------------------------------------------------------
// GPU
// ---------------------------------------------------------------------------------------------

#[test]
fn gpu_reshape_and_cache_matches_cpu() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for i in 0..60 {
        check_reshape(&device, &ReshapeCase::random(100 + i, CacheLayout::Vllm));
    }
    // Every dtype × head size once, with GQA-style head counts.
    for (i, (&dtype, &head_size)) in DTYPES.iter().flat_map(|d| HEAD_SIZES.iter().map(move |h| (d, h))).enumerate() {
        let mut c = ReshapeCase::random(300 + i as u64, CacheLayout::Vllm);
        (c.dtype, c.head_size, c.row_pad, c.kv_offset) = (dtype, head_size, 0, 0);
        check_reshape(&device, &c);
    }
    common::gpu_of(&mut device).check_status().expect("no device-side flags for valid inputs");
}

#[test]
fn gpu_reshape_and_cache_flash_matches_cpu() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for i in 0..60 {
        check_reshape(&device, &ReshapeCase::random(500 + i, CacheLayout::Flash));
    }
    // Every layout × dtype with aligned rows (16-byte copies) and misaligned ones (per element).
    let mut i = 0;
    for flash in FLASH_LAYOUTS {
        for &dtype in DTYPES {
            for kv_offset in [0, 1] {
                let mut c = ReshapeCase::random(700 + i, CacheLayout::Flash);
                (c.flash, c.dtype, c.kv_offset, c.row_pad) = (flash, dtype, kv_offset, 0);
                check_reshape(&device, &c);
                i += 1;
            }
        }
    }
    common::gpu_of(&mut device).check_status().expect("no device-side flags for valid inputs");
}

/// Block sizes beyond paged attention's (up to 256) and one token per block.
#[test]
fn gpu_reshape_block_sizes() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for (i, bs) in [1, 8, 16, 32, 64, 128, 256].into_iter().enumerate() {
        for layout in [CacheLayout::Vllm, CacheLayout::Flash] {
            let mut c = ReshapeCase::random(900 + i as u64, layout);
            c.block_size = bs;
            c.num_tokens = 3 * bs.min(20) + 1;
            check_reshape(&device, &c);
        }
    }
    common::gpu_of(&mut device).check_status().unwrap();
}

/// Head sizes past paged attention's: the vLLM-layout kernel's tile shrinks (f32: 11, 5, 2 tokens
/// per CTA).
#[test]
fn gpu_reshape_large_heads() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for (i, hs) in [512, 1024, 2048].into_iter().enumerate() {
        for layout in [CacheLayout::Vllm, CacheLayout::Flash] {
            let mut c = ReshapeCase::random(950 + i as u64, layout);
            (c.head_size, c.num_kv_heads, c.block_size, c.num_tokens) = (hs, 2, 16, 37);
            check_reshape(&device, &c);
        }
    }
    common::gpu_of(&mut device).check_status().unwrap();
}

/// Device-resident slots past the cache: those tokens are skipped, the others written, and the
/// status word reports BAD_SLOT (then clears).
#[test]
fn gpu_bad_device_slot_is_flagged() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for (i, layout) in [CacheLayout::Vllm, CacheLayout::Flash, CacheLayout::Vllm, CacheLayout::Flash].into_iter().enumerate() {
        let mut c = ReshapeCase::random(1100 + i as u64, layout);
        c.num_tokens = 12;
        let inp = c.inputs();
        let num_slots = (c.num_blocks() * c.block_size) as i64;
        let mut bad = inp.slots.clone();
        bad[3] = num_slots;
        bad[7] = [i64::MAX, num_slots + 12345][i % 2];
        let mut good = bad.clone();
        (good[3], good[7]) = (-1, -1);
        let (mut kc_cpu, mut vc_cpu) = upload_pair(&Device::Cpu, &inp.key_cache, &inp.value_cache);
        reshape(&Device::Cpu, layout, &inp.key, &inp.value, &mut kc_cpu, &mut vc_cpu, &i64s(&[12], &good)).unwrap();
        let up = |t: &Tensor| device.upload(t).unwrap();
        let (key, value) = (up(&inp.key), up(&inp.value));
        let (mut kc, mut vc) = upload_pair(&device, &inp.key_cache, &inp.value_cache);
        reshape(&device, layout, &key, &value, &mut kc, &mut vc, &up(&i64s(&[12], &bad))).unwrap();
        let what = format!("{c} with slots {} and {}", bad[3], bad[7]);
        assert_same_bits(&kc, &kc_cpu, &format!("{what}: key cache"));
        assert_same_bits(&vc, &vc_cpu, &format!("{what}: value cache"));
        let gpu = common::gpu_of(&mut device);
        match gpu.check_status() {
            Err(Error::DeviceData { flags }) => assert_eq!(flags, status::BAD_SLOT, "{what}: flags {flags:#x}"),
            other => panic!("{what}: expected Error::DeviceData with BAD_SLOT, got {other:?}"),
        }
        assert!(gpu.check_status().is_ok(), "{what}: flags not cleared");
    }
}

/// Two tokens naming one slot in a device-resident mapping: documented as "one of the writes wins"
/// (per element); nothing else changes and no flag is raised.
#[test]
fn gpu_duplicate_device_slots_one_write_wins() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for layout in [CacheLayout::Vllm, CacheLayout::Flash] {
        let mut c = ReshapeCase::random(1200, layout);
        (c.num_tokens, c.dtype) = (6, DType::F32);
        let inp = c.inputs();
        let mut slots = inp.slots.clone();
        (slots[1], slots[4]) = (5, 5);
        let alone = |t: usize| {
            let mut only = vec![-1i64; 6];
            for (j, s) in slots.iter().enumerate() {
                if j != 1 && j != 4 || j == t {
                    only[j] = *s;
                }
            }
            let (mut kc, mut vc) = upload_pair(&Device::Cpu, &inp.key_cache, &inp.value_cache);
            reshape(&Device::Cpu, layout, &inp.key, &inp.value, &mut kc, &mut vc, &i64s(&[6], &only)).unwrap();
            (kc.to_f64_vec(), vc.to_f64_vec())
        };
        let (a, b) = (alone(1), alone(4));
        let up = |t: &Tensor| device.upload(t).unwrap();
        let (key, value) = (up(&inp.key), up(&inp.value));
        let (mut kc, mut vc) = upload_pair(&device, &inp.key_cache, &inp.value_cache);
        reshape(&device, layout, &key, &value, &mut kc, &mut vc, &up(&i64s(&[6], &slots))).unwrap();
        let got = (kc.to_cpu().unwrap().to_f64_vec(), vc.to_cpu().unwrap().to_f64_vec());
        for (g, (x, y)) in [(&got.0, (&a.0, &b.0)), (&got.1, (&a.1, &b.1))] {
            for i in 0..g.len() {
                let same = |p: f64, q: f64| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan());
                assert!(same(g[i], x[i]) || same(g[i], y[i]), "{c}: element {i} is neither write");
            }
        }
        common::gpu_of(&mut device).check_status().unwrap();
    }
}

/// One random `copy_blocks` case: `num_layers` layers of a cache layout, distinct destinations
/// disjoint from the sources (and one block copied onto itself).
fn check_copy_blocks(device: &Device, seed: u64) {
    let mut rng = Rng::new(seed);
    let dtype = DTYPES[rng.below(3)];
    let st = ScalarType::from(dtype);
    let (h, d, bs) = ([1, 2, 4, 8][rng.below(4)], HEAD_SIZES[rng.below(HEAD_SIZES.len())], BLOCK_SIZES[rng.below(BLOCK_SIZES.len())]);
    let nb = 4 + rng.below(20);
    let num_layers = 1 + rng.below(4);
    let kind = rng.below(3);
    let x = dtype.x();
    let make = |rng: &mut Rng| -> (Tensor, Tensor) {
        let nan = rng.below(2) == 0;
        match kind {
            0 => (random(st, &[nb, h, d / x, bs, x], rng), random(st, &[nb, h, d, bs], rng)),
            1 => flash_caches(FlashLayout::KvInner, st, nb, bs, h, d, nan, rng),
            _ => flash_caches(FlashLayout::KvOuter, st, nb, bs, h, d, nan, rng),
        }
    };
    let (mut keys, mut values): (Vec<Tensor>, Vec<Tensor>) = (0..num_layers).map(|_| make(&mut rng)).unzip();
    let mut perm: Vec<i64> = (0..nb as i64).collect();
    rng.shuffle(&mut perm);
    // At most (nb - 1) / 2 pairs, so the last block of the permutation is free for a self-copy.
    let n = 1 + rng.below((nb - 1) / 2);
    let mut pairs: Vec<i64> = (0..n).flat_map(|i| [perm[i], perm[n + i]]).collect();
    pairs.extend([perm[nb - 1], perm[nb - 1]]);
    let mapping = i64s(&[n + 1, 2], &pairs);
    let what = format!("copy_blocks {dtype} kind {kind} {num_layers} layers h{h} d{d} b{bs} nb{nb} pairs {n} seed {seed}");

    let (mut k_cpu, mut v_cpu): (Vec<Tensor>, Vec<Tensor>) = keys.iter().zip(&values).map(|(k, v)| upload_pair(&Device::Cpu, k, v)).unzip();
    run_copy(&mut k_cpu, &mut v_cpu, &mapping).unwrap_or_else(|e| panic!("{what}: CPU: {e}"));
    (keys, values) = keys.iter().zip(&values).map(|(k, v)| upload_pair(device, k, v)).unzip();
    let map_dev = if seed.is_multiple_of(2) { device.upload(&mapping).unwrap() } else { mapping.to_cpu().unwrap() };
    {
        let mut k: Vec<&mut Tensor> = keys.iter_mut().collect();
        let mut v: Vec<&mut Tensor> = values.iter_mut().collect();
        copy_blocks(device, &mut k, &mut v, &map_dev).unwrap_or_else(|e| panic!("{what}: GPU: {e}"));
    }
    for l in 0..num_layers {
        assert_same_bits(&keys[l], &k_cpu[l], &format!("{what}: layer {l} keys"));
        assert_same_bits(&values[l], &v_cpu[l], &format!("{what}: layer {l} values"));
    }
}

#[test]
fn gpu_copy_blocks_matches_cpu() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for seed in 0..40 {
        check_copy_blocks(&device, 2000 + seed);
    }
    common::gpu_of(&mut device).check_status().expect("no device-side flags for valid inputs");
}

/// Device-resident pairs with ids out of range: those pairs are skipped, the others copied, and
/// BAD_BLOCK_ID is reported.
#[test]
fn gpu_bad_device_block_id_in_copy_blocks_is_flagged() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let mut rng = Rng::new(77);
    let nb = 6;
    let st = ScalarType::F16;
    for bad in [[nb as i64, 0], [1, -1], [i64::MIN, 2], [3, i64::MAX]] {
        let mut keys = [random(st, &[nb, 2, 8, 16, 8], &mut rng), random(st, &[nb, 2, 8, 16, 8], &mut rng)];
        let mut values = [random(st, &[nb, 2, 64, 16], &mut rng), random(st, &[nb, 2, 64, 16], &mut rng)];
        let good = [0i64, 4, 2, 5];
        let (mut k_cpu, mut v_cpu): (Vec<Tensor>, Vec<Tensor>) =
            (keys.iter().map(|t| t.to_cpu().unwrap()).collect(), values.iter().map(|t| t.to_cpu().unwrap()).collect());
        run_copy(&mut k_cpu, &mut v_cpu, &i64s(&[2, 2], &good)).unwrap();
        for t in keys.iter_mut().chain(values.iter_mut()) {
            *t = device.upload(t).unwrap();
        }
        let pairs = [good[0], good[1], bad[0], bad[1], good[2], good[3]];
        let mapping = device.upload(&i64s(&[3, 2], &pairs)).unwrap();
        {
            let mut k: Vec<&mut Tensor> = keys.iter_mut().collect();
            let mut v: Vec<&mut Tensor> = values.iter_mut().collect();
            copy_blocks(&device, &mut k, &mut v, &mapping).unwrap();
        }
        let what = format!("copy_blocks with pair {bad:?}");
        for l in 0..2 {
            assert_same_bits(&keys[l], &k_cpu[l], &format!("{what}: layer {l} keys"));
            assert_same_bits(&values[l], &v_cpu[l], &format!("{what}: layer {l} values"));
        }
        let gpu = common::gpu_of(&mut device);
        match gpu.check_status() {
            Err(Error::DeviceData { flags }) => assert_eq!(flags, status::BAD_BLOCK_ID, "{what}: flags {flags:#x}"),
            other => panic!("{what}: expected Error::DeviceData with BAD_BLOCK_ID, got {other:?}"),
        }
        assert!(gpu.check_status().is_ok(), "{what}: flags not cleared");
    }
}

/// `swap_blocks` between two device caches of different block counts and strides.
#[test]
fn gpu_swap_blocks_device_to_device() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let mut rng = Rng::new(88);
    for (i, &dtype) in DTYPES.iter().enumerate() {
        let st = ScalarType::from(dtype);
        let (bs, h, d) = (16, 2, 64);
        let src = random(st, &[7, bs, h, d], &mut rng);
        // Destination: `kv[:, 1]` of a `[5, 2, bs, h, d]` tensor (block stride twice the block).
        let page = bs * h * d;
        let dst = random_view(st, &[5, bs, h, d], &[2 * page, h * d, d, 1], page, 10 * page, &mut rng);
        let mapping = i64s(&[3, 2], &[[6, 0, 1, 4, 3, 2], [0, 1, 1, 0, 6, 4], [2, 2, 5, 3, 0, 0]][i]);
        let mut want = dst.to_cpu().unwrap();
        swap_blocks(&Device::Cpu, &src, &mut want, &mapping).unwrap();
        let src_dev = device.upload(&src).unwrap();
        let mut got = device.upload(&dst).unwrap();
        swap_blocks(&device, &src_dev, &mut got, &mapping).unwrap();
        assert_same_bits(&got, &want, &format!("swap_blocks {dtype}"));
        // A contiguous destination: blocks 0, 1, 2 -> 1, 2, 3 are adjacent on both sides (one copy).
        let dst = random(st, &[5, bs, h, d], &mut rng);
        let mapping = i64s(&[4, 2], &[0, 1, 1, 2, 2, 3, 6, 0]);
        let mut want = dst.to_cpu().unwrap();
        swap_blocks(&Device::Cpu, &src, &mut want, &mapping).unwrap();
        let mut got = device.upload(&dst).unwrap();
        swap_blocks(&device, &src_dev, &mut got, &mapping).unwrap();
        assert_same_bits(&got, &want, &format!("swap_blocks {dtype}, a run of adjacent blocks"));
        // 40 scattered blocks into a strided view: the kernel path (more than SWAP_KERNEL_MIN_RUNS runs).
        let big_src = random(st, &[48, bs, h, d], &mut rng);
        let dst = random_view(st, &[44, bs, h, d], &[2 * page, h * d, d, 1], page, 88 * page, &mut rng);
        let (mut from, mut to): (Vec<i64>, Vec<i64>) = ((0..48).collect(), (0..44).collect());
        rng.shuffle(&mut from);
        rng.shuffle(&mut to);
        let pairs: Vec<i64> = (0..40).flat_map(|k| [from[k], to[k]]).collect();
        let mapping = i64s(&[40, 2], &pairs);
        let mut want = dst.to_cpu().unwrap();
        swap_blocks(&Device::Cpu, &big_src, &mut want, &mapping).unwrap();
        let mut got = device.upload(&dst).unwrap();
        swap_blocks(&device, &device.upload(&big_src).unwrap(), &mut got, &mapping).unwrap();
        assert_same_bits(&got, &want, &format!("swap_blocks {dtype}, 40 scattered blocks (kernel path)"));
    }
    common::gpu_of(&mut device).check_status().unwrap();
}

/// GPU ops with operands on the host (other than the tables), and CPU ops with device operands.
#[test]
fn gpu_tensors_on_the_wrong_device() {
    let Some(gpu) = gpu_or_skip!() else { return };
    for layout in [CacheLayout::Vllm, CacheLayout::Flash] {
        let mut host = args(layout);
        let up = |t: &Tensor| gpu.upload(t).unwrap();
        let (key, value, mut kc, mut vc, slots) =
            (up(&host.key), up(&host.value), up(&host.key_cache), up(&host.value_cache), up(&host.slots));
        expect_err!(reshape(&gpu, layout, &host.key, &value, &mut kc, &mut vc, &slots), Error::Device { tensor: "key", got: "CPU", .. });
        expect_err!(reshape(&gpu, layout, &key, &value, &mut host.key_cache, &mut vc, &slots), Error::Device { tensor: "key_cache", .. });
        expect_err!(
            reshape(&Device::Cpu, layout, &host.key, &host.value, &mut host.key_cache, &mut host.value_cache, &slots),
            Error::Device { tensor: "slot_mapping", got: "GPU", expected: "CPU", .. }
        );
        expect_err!(
            reshape(&Device::Cpu, layout, &host.key, &value, &mut host.key_cache, &mut host.value_cache, &host.slots),
            Error::Device { tensor: "value", got: "GPU", .. }
        );
        // Host slots on the GPU are checked before anything is launched.
        expect_err!(reshape(&gpu, layout, &key, &value, &mut kc, &mut vc, &i64s(&[3], &[1, 1, 2])), Error::HostData { .. });
    }
    let mut rng = Rng::new(3);
    let mut host_k = random(ScalarType::F32, &[4, 8], &mut rng);
    let mut dev_v = gpu.upload(&random(ScalarType::F32, &[4, 8], &mut rng)).unwrap();
    let mapping = i64s(&[1, 2], &[0, 1]);
    expect_err!(copy_blocks(&gpu, &mut [&mut host_k], &mut [&mut dev_v], &mapping), Error::Device { tensor: "key_caches", got: "CPU", .. });
    let mut dev_k = gpu.upload(&host_k).unwrap();
    expect_err!(
        copy_blocks(&Device::Cpu, &mut [&mut dev_k], &mut [&mut dev_v], &mapping),
        Error::Device { tensor: "key_caches", got: "GPU", .. }
    );
    // swap_blocks: the mapping must be host data; pageable host memory is not a GPU operand.
    expect_err!(swap_blocks(&gpu, &dev_k, &mut dev_v, &gpu.upload(&mapping).unwrap()), Error::Device { tensor: "block_mapping", .. });
    expect_err!(swap_blocks(&gpu, &host_k, &mut dev_v, &mapping), Error::Device { tensor: "src", got: "CPU", .. });
    expect_err!(swap_blocks(&Device::Cpu, &host_k, &mut dev_v, &mapping), Error::Device { tensor: "dst", got: "GPU", .. });

    // Pinned memory: a host table anywhere (checked, uploaded), never a cache operand of a kernel,
    // and not an operand of the CPU backend.
    let Device::Gpu(g) = &gpu else { unreachable!() };
    let mut host = args(CacheLayout::Flash);
    let up = |t: &Tensor| gpu.upload(t).unwrap();
    let (key, value, mut kc, mut vc) = (up(&host.key), up(&host.value), up(&host.key_cache), up(&host.value_cache));
    let pinned_slots = host.slots.to_pinned(g).unwrap();
    reshape_and_cache_flash(&gpu, &key, &value, &mut kc, &mut vc, &pinned_slots).unwrap();
    let bad_pinned = i64s(&[3], &[0, 99, 1]).to_pinned(g).unwrap();
    expect_err!(reshape_and_cache_flash(&gpu, &key, &value, &mut kc, &mut vc, &bad_pinned), Error::HostData { what, .. } => assert!(what.contains("slot_mapping[1] = 99"), "{what}"));
    let mut pinned_kc = host.key_cache.to_pinned(g).unwrap();
    expect_err!(
        reshape_and_cache_flash(&gpu, &key, &value, &mut pinned_kc, &mut vc, &host.slots),
        Error::Device { tensor: "key_cache", got: "pinned host", .. }
    );
    expect_err!(
        reshape_and_cache_flash(&Device::Cpu, &host.key, &host.value, &mut host.key_cache, &mut host.value_cache, &pinned_slots),
        Error::Device { tensor: "slot_mapping", got: "pinned host", .. }
    );
    let (mut k1, mut v1) = (up(&host.key_cache), up(&host.value_cache));
    copy_blocks(&gpu, &mut [&mut k1], &mut [&mut v1], &i64s(&[1, 2], &[0, 1]).to_pinned(g).unwrap()).unwrap();
    // swap_blocks between two pinned tensors: no GPU end.
    let (p1, mut p2) = (host_k.to_pinned(g).unwrap(), host_k.to_pinned(g).unwrap());
    expect_err!(swap_blocks(&gpu, &p1, &mut p2, &mapping), Error::Device { tensor: "dst", got: "pinned host", .. });
    g.synchronize().unwrap();
}

/// `swap_blocks` between the GPU and pinned host memory, both ways; the host side is one half of a
/// combined `[num_blocks, 2, ...]` pinned cache (the other half must stay untouched).
#[test]
fn gpu_swap_blocks_with_pinned_host_memory() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let mut rng = Rng::new(99);
    for (i, &dtype) in DTYPES.iter().enumerate() {
        let st = ScalarType::from(dtype);
        let (bs, h, d) = ([8, 16, 32][i], 4, 128);
        let gpu_host = random(st, &[9, bs, h, d], &mut rng);
        let kv_host = random(st, &[6, 2, bs, h, d], &mut rng);
        let g = common::gpu_of(&mut device);
        let mut on_gpu = gpu_host.to_gpu(g.stream()).unwrap();
        let kv = kv_host.to_pinned(g).unwrap();
        let (pinned_key, mut pinned_value) = (kv.select(1, 0).unwrap(), kv.select(1, 1).unwrap());

        // Out: GPU blocks -> pinned value half.
        let out = i64s(&[3, 2], &[8, 0, 2, 5, 0, 3]);
        let kv_want = kv_host.to_cpu().unwrap();
        swap_blocks(&Device::Cpu, &gpu_host, &mut kv_want.select(1, 1).unwrap(), &out).unwrap();
        swap_blocks(&device, &on_gpu, &mut pinned_value, &out).unwrap();
        common::gpu_of(&mut device).synchronize().unwrap();
        assert_same_bits(&kv, &kv_want, &format!("swap out {dtype}"));

        // In: pinned key half -> GPU blocks (blocks 2, 3, 4 -> 5, 6, 7 are one run of copies).
        let into = i64s(&[5, 2], &[1, 4, 2, 5, 3, 6, 4, 7, 5, 0]);
        let mut gpu_want = gpu_host.to_cpu().unwrap();
        swap_blocks(&Device::Cpu, &kv_want.select(1, 0).unwrap(), &mut gpu_want, &into).unwrap();
        swap_blocks(&device, &pinned_key, &mut on_gpu, &into).unwrap();
        assert_same_bits(&on_gpu, &gpu_want, &format!("swap in {dtype}"));
    }
    common::gpu_of(&mut device).check_status().unwrap();
}

/// Quantizing into fp8 caches (both ops, both kinds, every input dtype and fp8 head size, the
/// layouts, padding, strided rows and slot placements of the verification grid) is bit-exact
/// against the CPU backend: the device's conversion (hardware `cvt` on sm_89+) rounds exactly
/// like the CPU's.
#[test]
fn gpu_reshape_fp8_matches_cpu() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let mut n = 0;
    for flash in [false, true] {
        for c in pagedattn::testing::cache::reshape_grid(flash).iter().filter(|c| c.cache != KvCacheDType::Auto) {
            let check = pagedattn::testing::cache::check_reshape(&device, c).unwrap();
            assert!(
                check.passes(),
                "{c}: {} of {} elements differ (first at {:?})",
                check.mismatches,
                check.elements,
                check.first_mismatch
            );
            n += 1;
        }
    }
    common::note(&format!("gpu_reshape_fp8_matches_cpu: {n} cases bit-exact"));
    common::gpu_of(&mut device).check_status().expect("no device-side flags for valid inputs");
}

/// A device scale that is not finite and positive: the quantizing ops write nothing, attention over
/// fp8 caches writes NaN, and both raise BAD_SCALE (then the word clears).
#[test]
fn gpu_bad_device_scale_is_flagged() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let rt = RoundTrip {
        cache: KvCacheDType::Fp8(pagedattn::layout::Fp8Kind::E4m3),
        ..RoundTrip::new(DType::F16, (8, 2), 128, 16, &[40, 7], 77)
    };
    let (kc, vc) = rt.caches(&device);
    let up = |device: &Device, t: &Tensor| device.upload(t).unwrap();
    let good = up(&device, &Tensor::from_f32(DType::F32, &[1], &[0.5]).unwrap());
    for bad in [0.0, -2.0, f32::NAN, f32::INFINITY] {
        let bad_t = up(&device, &Tensor::from_f32(DType::F32, &[1], &[bad]).unwrap());
        for (k, v) in [(&bad_t, &good), (&good, &bad_t)] {
            // Quantizing: the caches keep their contents.
            let (mut kc2, mut vc2) = (up(&device, &kc.to_cpu().unwrap()), up(&device, &vc.to_cpu().unwrap()));
            let (key, value) = (up(&device, &rt.key), up(&device, &rt.value));
            let slots = up(&device, &i64s(&[rt.slots.len()], &rt.slots));
            reshape_and_cache_fp8(&device, &key, &value, &mut kc2, &mut vc2, &slots, Fp8Scales { k_scale: k, v_scale: v }).unwrap();
            assert_same_bits(&kc2, &kc, &format!("scale {bad}: key cache"));
            assert_same_bits(&vc2, &vc, &format!("scale {bad}: value cache"));
            let gpu = common::gpu_of(&mut device);
            match gpu.check_status() {
                Err(Error::DeviceData { flags }) => assert_eq!(flags, status::BAD_SCALE, "reshape, scale {bad}"),
                other => panic!("reshape, scale {bad}: expected BAD_SCALE, got {other:?}"),
            }
            // Attention: NaN outputs.
            let host = rt.inputs(kc.to_cpu().unwrap(), vc.to_cpu().unwrap());
            let (kd, vd, q) = (up(&device, &host.key_cache), up(&device, &host.value_cache), up(&device, &host.query));
            let args =
                PagedAttentionArgs { query: &q, key_cache: &kd, value_cache: &vd, k_scale: Some(k), v_scale: Some(v), ..host.args() };
            for mode in common::MODES {
                let got = run_op(&device, &args, mode).unwrap();
                assert!(got.iter().all(|v| v.is_nan()), "attention {mode}, scale {bad}: outputs not all NaN");
                let gpu = common::gpu_of(&mut device);
                match gpu.check_status() {
                    Err(Error::DeviceData { flags }) => assert_eq!(flags, status::BAD_SCALE, "attention {mode}, scale {bad}"),
                    other => panic!("attention {mode}, scale {bad}: expected BAD_SCALE, got {other:?}"),
                }
            }
        }
    }
    assert!(common::gpu_of(&mut device).check_status().is_ok(), "flags not cleared");
}

// ---------------------------------------------------------------------------------------------
// Round trip: reshape_and_cache, then paged_attention_v1
// ---------------------------------------------------------------------------------------------

/// Dense keys and values of a batch of sequences (rows of sequence `s` follow those of `s - 1`),
/// the slots their tokens go to through a shuffled block table, and a query per sequence.
struct RoundTrip {
    dtype: DType,
    /// Cache element type: the dtype, or fp8 codes quantized with [`RT_FP8_SCALES`].
    cache: KvCacheDType,
    num_heads: usize,
    num_kv_heads: usize,
    head_size: usize,
    block_size: usize,
    seq_lens: Vec<usize>,
    num_blocks: usize,
    block_tables: Vec<i32>,
    max_blocks: usize,
    key: Tensor,
    value: Tensor,
    query: Tensor,
    slots: Vec<i64>,
}

impl RoundTrip {
    fn new(dtype: DType, heads: (usize, usize), head_size: usize, block_size: usize, seq_lens: &[usize], seed: u64) -> RoundTrip {
        let mut rng = Rng::new(seed);
        let (nh, nkv) = heads;
        let st = ScalarType::from(dtype);
        let blocks_of = |l: usize| l.div_ceil(block_size);
        let max_blocks = seq_lens.iter().map(|&l| blocks_of(l)).max().unwrap_or(0).max(1);
        let num_blocks = seq_lens.iter().map(|&l| blocks_of(l)).sum::<usize>() + 3;
        let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
        rng.shuffle(&mut perm);
        let mut block_tables = vec![0i32; seq_lens.len() * max_blocks];
        let mut next = 0;
        let mut slots = Vec::new();
        for (s, &len) in seq_lens.iter().enumerate() {
            for b in 0..blocks_of(len) {
                block_tables[s * max_blocks + b] = perm[next];
                next += 1;
            }
            for t in 0..len {
                slots.push(block_tables[s * max_blocks + t / block_size] as i64 * block_size as i64 + (t % block_size) as i64);
            }
        }
        let total = slots.len();
        RoundTrip {
            dtype,
            cache: KvCacheDType::Auto,
            num_heads: nh,
            num_kv_heads: nkv,
            head_size,
            block_size,
            seq_lens: seq_lens.to_vec(),
            num_blocks,
            block_tables,
            max_blocks,
            key: random(st, &[total, nkv, head_size], &mut rng),
            value: random(st, &[total, nkv, head_size], &mut rng),
            query: random(st, &[seq_lens.len(), nh, head_size], &mut rng),
            slots,
        }
    }

    /// `[1]` f32 host tensors of the fp8 scales.
    fn scales(&self) -> Option<(Tensor, Tensor)> {
        let t = |v: f32| Tensor::from_f32(DType::F32, &[1], &[v]).unwrap();
        (self.cache != KvCacheDType::Auto).then(|| (t(RT_FP8_SCALES.0), t(RT_FP8_SCALES.1)))
    }

    /// NaN caches on `device`, filled by `reshape_and_cache` (fp8: `reshape_and_cache_fp8`) there.
    fn caches(&self, device: &Device) -> (Tensor, Tensor) {
        let st = self.cache.fp8().map_or(ScalarType::from(self.dtype), ScalarType::of_fp8);
        let (nb, h, d, bs, x) = (self.num_blocks, self.num_kv_heads, self.head_size, self.block_size, self.cache.x(self.dtype));
        let mut kc = device.nan(st, &[nb, h, d / x, bs, x]).unwrap();
        let mut vc = device.nan(st, &[nb, h, d, bs]).unwrap();
        let (key, value) = (device.upload(&self.key).unwrap(), device.upload(&self.value).unwrap());
        let slots = device.upload(&i64s(&[self.slots.len()], &self.slots)).unwrap();
        match self.scales() {
            None => reshape_and_cache(device, &key, &value, &mut kc, &mut vc, &slots).unwrap(),
            Some((k, v)) => {
                let (k, v) = (device.upload(&k).unwrap(), device.upload(&v).unwrap());
                let scales = Fp8Scales { k_scale: &k, v_scale: &v };
                reshape_and_cache_fp8(device, &key, &value, &mut kc, &mut vc, &slots, scales).unwrap();
            }
        }
        (kc, vc)
    }

    /// Attention inputs over the given caches (host tables).
    fn inputs(&self, key_cache: Tensor, value_cache: Tensor) -> Inputs {
        let ns = self.seq_lens.len();
        Inputs {
            query: self.query.to_cpu().unwrap(),
            key_cache,
            value_cache,
            block_tables: Tensor::from_i32(&[ns, self.max_blocks], &self.block_tables).unwrap(),
            seq_lens: Tensor::from_i32(&[ns], &self.seq_lens.iter().map(|&l| l as i32).collect::<Vec<_>>()).unwrap(),
            alibi_slopes: None,
            scale: 1.0 / (self.head_size as f32).sqrt(),
            kv_scales: self.scales(),
            blocksparse: None,
        }
    }

    /// Softmax attention straight from the dense keys and values, in f64.
    fn dense_attention(&self) -> Vec<f64> {
        let (nh, d) = (self.num_heads, self.head_size);
        let group = nh / self.num_kv_heads;
        let scale = 1.0 / (d as f32).sqrt() as f64;
        let mut out = Vec::new();
        let mut first = 0;
        for (s, &len) in self.seq_lens.iter().enumerate() {
            for h in 0..nh {
                let kvh = h / group;
                let scores: Vec<f64> = (0..len)
                    .map(|t| (0..d).map(|i| self.query.get_f64(&[s, h, i]) * self.key.get_f64(&[first + t, kvh, i])).sum::<f64>() * scale)
                    .collect();
                let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let w: Vec<f64> = scores.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for i in 0..d {
                    let o: f64 = (0..len).map(|t| w[t] * self.value.get_f64(&[first + t, kvh, i])).sum();
                    out.push(if z > 0.0 { o / z } else { 0.0 });
                }
            }
            first += len;
        }
        out
    }
}

/// Keys and values written on the GPU by `reshape_and_cache` and read by paged attention (v1, and
/// v2 with 512- and 32-token partitions) on the GPU match the CPU backend doing both (caches bit for
/// bit, attention within tolerance).
#[test]
fn gpu_reshape_then_paged_attention_round_trip() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let mut i = 0u64;
    for (&dtype, cache) in DTYPES.iter().flat_map(|d| KvCacheDType::ALL.into_iter().map(move |c| (d, c))) {
        for &(heads, head_size, block_size) in
            &[((8, 2), 128, 16), ((4, 4), 64, 8), ((16, 1), 256, 32), ((12, 4), 80, 16), ((8, 1), 128, 64), ((4, 2), 96, 256)]
        {
            let lens = [1, block_size - 1, 3 * block_size + 5, 200 + 17 * i as usize];
            let rt = RoundTrip { cache, ..RoundTrip::new(dtype, heads, head_size, block_size, &lens, 3000 + i) };
            let what = format!("round trip {dtype} {cache} heads {heads:?} h{head_size} b{block_size}");
            let (kc_cpu, vc_cpu) = rt.caches(&Device::Cpu);
            let (kc, vc) = rt.caches(&device);
            assert_same_bits(&kc, &kc_cpu, &format!("{what}: key cache"));
            assert_same_bits(&vc, &vc_cpu, &format!("{what}: value cache"));
            let want = common::reference(&rt.inputs(kc_cpu, vc_cpu));
            let host = rt.inputs(kc, vc);
            let query = device.upload(&host.query).unwrap();
            let scales = host.kv_scales.as_ref().map(|(k, v)| (device.upload(k).unwrap(), device.upload(v).unwrap()));
            let (k_scale, v_scale) = (scales.as_ref().map(|s| &s.0), scales.as_ref().map(|s| &s.1));
            for mode in common::MODES {
                let got = run_op(&device, &PagedAttentionArgs { query: &query, k_scale, v_scale, ..host.args() }, mode).unwrap();
                assert_matches(&got, &want, dtype, &format!("{what} {mode}"));
            }
            i += 1;
        }
    }
    common::gpu_of(&mut device).check_status().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Throughput (a note for the record, not a check)
// ---------------------------------------------------------------------------------------------

/// Mean milliseconds per execution of `op` over `runs` back-to-back executions (host clock around
/// synchronized batches: ops are asynchronous, so this is their throughput on the stream).
fn time_ms(device: &Device, runs: usize, mut op: impl FnMut()) -> f64 {
    let Device::Gpu(g) = device else { unreachable!("GPU only") };
    op(); // warm-up (module load)
    g.synchronize().unwrap();
    let start = std::time::Instant::now();
    for _ in 0..runs {
        op();
    }
    g.synchronize().unwrap();
    start.elapsed().as_secs_f64() * 1e3 / runs as f64
}

/// Effective bandwidth (bytes read + written) of each op at serving sizes: bf16, 8 KV heads of 128,
/// block 16; a prefill of 8192 tokens, copy-on-write of 256 blocks over 8 layers, a swap of 256
/// blocks to pinned memory.
#[test]
fn gpu_cache_ops_bandwidth_note() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let (t, h, d, bs) = (8192usize, 8, 128, 16);
    let st = ScalarType::BF16;
    let x = 8;
    let nb = t / bs + 64;
    let gbps = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
    let (key, value) = {
        let g = common::gpu_of(&mut device);
        (g.zeros(st, &[t, h, d]).unwrap(), g.zeros(st, &[t, h, d]).unwrap())
    };
    let mut rng = Rng::new(1);
    let mut blocks: Vec<i64> = (0..nb as i64).collect();
    rng.shuffle(&mut blocks);
    let slots: Vec<i64> = (0..t).map(|i| blocks[i / bs] * bs as i64 + (i % bs) as i64).collect();
    let slots = device.upload(&i64s(&[t], &slots)).unwrap();
    let moved = 2 * 2 * t * h * d * 2;
    for layout in [CacheLayout::Vllm, CacheLayout::Flash] {
        let g = common::gpu_of(&mut device);
        let (mut kc, mut vc) = match layout {
            CacheLayout::Vllm => (g.zeros(st, &[nb, h, d / x, bs, x]).unwrap(), g.zeros(st, &[nb, h, d, bs]).unwrap()),
            CacheLayout::Flash => (g.zeros(st, &[nb, bs, h, d]).unwrap(), g.zeros(st, &[nb, bs, h, d]).unwrap()),
        };
        let ms = time_ms(&device, 21, || reshape(&device, layout, &key, &value, &mut kc, &mut vc, &slots).unwrap());
        common::note(&format!(
            "{layout:?} reshape_and_cache bf16 {t} tokens h{h} d{d} b{bs}: {:.1} us, {:.0} GB/s",
            ms * 1e3,
            gbps(moved, ms)
        ));
        // Decode: 256 sequences, one token each, at random slots (the first 256 rows of the keys).
        let decode = device.upload(&i64s(&[256], &(0..256).map(|i| blocks[i] * bs as i64 + (i % bs) as i64).collect::<Vec<_>>())).unwrap();
        let ms = time_ms(&device, 21, || reshape(&device, layout, &key, &value, &mut kc, &mut vc, &decode).unwrap());
        common::note(&format!("{layout:?} reshape_and_cache bf16 decode, 256 scattered tokens: {:.1} us", ms * 1e3));
    }

    let (layers, pairs, cb_blocks) = (8, 256, 1024);
    let block_bytes = bs * h * d * 2;
    let (mut keys, mut values): (Vec<Tensor>, Vec<Tensor>) = {
        let g = common::gpu_of(&mut device);
        (0..layers).map(|_| (g.zeros(st, &[cb_blocks, bs, h, d]).unwrap(), g.zeros(st, &[cb_blocks, bs, h, d]).unwrap())).unzip()
    };
    let mut perm: Vec<i64> = (0..cb_blocks as i64).collect();
    rng.shuffle(&mut perm);
    let pairs_v: Vec<i64> = (0..pairs).flat_map(|i| [perm[i], perm[pairs + i]]).collect();
    let mapping = device.upload(&i64s(&[pairs, 2], &pairs_v)).unwrap();
    let ms = time_ms(&device, 21, || {
        let mut k: Vec<&mut Tensor> = keys.iter_mut().collect();
        let mut v: Vec<&mut Tensor> = values.iter_mut().collect();
        copy_blocks(&device, &mut k, &mut v, &mapping).unwrap();
    });
    let moved = layers * pairs * 2 * block_bytes * 2;
    common::note(&format!(
        "copy_blocks bf16 {layers} layers x {pairs} pairs of {block_bytes} B: {:.1} us, {:.0} GB/s",
        ms * 1e3,
        gbps(moved, ms)
    ));

    let (src, mut pinned) = {
        let g = common::gpu_of(&mut device);
        (g.zeros(st, &[cb_blocks, bs, h, d]).unwrap(), g.pinned(st, &[pairs, bs, h, d]).unwrap())
    };
    let out: Vec<i64> = (0..pairs).flat_map(|i| [perm[i], i as i64]).collect();
    let out = i64s(&[pairs, 2], &out);
    let ms = time_ms(&device, 11, || swap_blocks(&device, &src, &mut pinned, &out).unwrap());
    common::note(&format!(
        "swap_blocks GPU->pinned bf16 {pairs} scattered blocks of {block_bytes} B: {:.1} us, {:.1} GB/s",
        ms * 1e3,
        gbps(pairs * block_bytes, ms)
    ));
    let run: Vec<i64> = (0..pairs as i64).flat_map(|i| [100 + i, i]).collect();
    let run = i64s(&[pairs, 2], &run);
    let ms = time_ms(&device, 11, || swap_blocks(&device, &src, &mut pinned, &run).unwrap());
    common::note(&format!(
        "swap_blocks GPU->pinned bf16 {pairs} adjacent blocks of {block_bytes} B: {:.1} us, {:.1} GB/s",
        ms * 1e3,
        gbps(pairs * block_bytes, ms)
    ));
    common::gpu_of(&mut device).check_status().unwrap();
}
