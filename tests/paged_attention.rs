//! `paged_attention_v1` and `paged_attention_v2` against the float64 reference.
//!
//! CPU section (runs everywhere): the reference against an independent naive formula, the CPU
//! backend over random cases, analytic cases, strided views. GPU section (skips loudly without a
//! GPU): the verification grid, random cases, analytic cases, device-side guards, host-resident
//! tables, strided views, a long context.

use std::collections::BTreeMap;

use approx::assert_relative_eq;
use pagedattn::layout::{BLOCK_SIZES, DTYPES, DType, FP8_HEAD_SIZES, Fp8Kind, HEAD_SIZES, KvCacheDType, status};
use pagedattn::testing::{self, Case, Inputs, Rng};
use pagedattn::{
    Device, Error, PagedAttentionArgs, PagedAttentionWorkspace, ReduceMode, ScalarType, Tensor, Version, paged_attention,
    paged_attention_v1, paged_attention_v2, reshape_and_cache,
};

use crate::common::{self, MODES, Mode, assert_matches, reference, row, run_inputs, run_op};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Decodes a contiguous host tensor's bytes by hand (no `Tensor` indexing), as f64.
fn decode(t: &Tensor) -> Vec<f64> {
    assert!(t.is_contiguous() && t.offset() == 0, "decode wants a contiguous tensor at offset 0");
    let b = t.cpu_bytes().expect("host tensor");
    let n = t.numel();
    match t.dtype() {
        ScalarType::F32 => b.chunks_exact(4).take(n).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        ScalarType::F16 => b.chunks_exact(2).take(n).map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f64()).collect(),
        ScalarType::BF16 => b.chunks_exact(2).take(n).map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64()).collect(),
        ScalarType::I32 => b.chunks_exact(4).take(n).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        ScalarType::I64 => b.chunks_exact(8).take(n).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        ScalarType::Fp8E4m3 => b.iter().take(n).map(|&c| fp8_value(Fp8Kind::E4m3, c)).collect(),
        ScalarType::Fp8E5m2 => b.iter().take(n).map(|&c| fp8_value(Fp8Kind::E5m2, c)).collect(),
    }
}

/// An fp8 code's value from its bit fields (sign, exponent, mantissa), written out here rather than
/// taken from the library; NaN codes give NaN, e5m2's infinities infinity.
fn fp8_value(kind: Fp8Kind, c: u8) -> f64 {
    let (mb, bias) = match kind {
        Fp8Kind::E4m3 => (3, 7),
        Fp8Kind::E5m2 => (2, 15),
    };
    let (e, m) = (((c & 0x7f) >> mb) as i32, (c & ((1 << mb) - 1)) as f64);
    let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let top = (1 << (7 - mb)) - 1;
    if e == top && (kind == Fp8Kind::E5m2 || m == 7.0) {
        return if kind == Fp8Kind::E5m2 && m == 0.0 { sign * f64::INFINITY } else { f64::NAN };
    }
    let mag = if e == 0 { m / (1 << mb) as f64 * 2f64.powi(1 - bias) } else { (1.0 + m / (1 << mb) as f64) * 2f64.powi(e - bias) };
    sign * mag
}

/// The op written out independently of the library: each sequence's keys and values gathered into
/// dense `[len, head_size]` matrices with vLLM's index math
/// (`key_cache[block][kvh][d / x][slot][d % x]`, `value_cache[block][kvh][d][slot]`), then a dense
/// softmax in f64. Contiguous inputs only.
fn naive(inp: &Inputs) -> Vec<f64> {
    let (q, kc, vc) = (decode(&inp.query), decode(&inp.key_cache), decode(&inp.value_cache));
    let (bt, sl) = (decode(&inp.block_tables), decode(&inp.seq_lens));
    let alibi = inp.alibi_slopes.as_ref().map(decode);
    let &[num_seqs, num_heads, hs] = inp.query.shape() else { panic!("query rank") };
    let &[_, nkv, hx, bs, x] = inp.key_cache.shape() else { panic!("key rank") };
    let max_blocks = inp.block_tables.shape()[1];
    let group = num_heads / nkv;
    let scale = inp.scale as f64;
    // fp8 caches hold codes of value / scale.
    let (ks, vs) = inp.kv_scales.as_ref().map_or((1.0, 1.0), |(k, v)| (decode(k)[0], decode(v)[0]));
    let mut out = vec![0f64; num_seqs * num_heads * hs];
    for s in 0..num_seqs {
        let len = sl[s] as usize;
        for kvh in 0..nkv {
            let mut k = vec![0f64; len * hs];
            let mut v = vec![0f64; len * hs];
            for t in 0..len {
                let block = bt[s * max_blocks + t / bs] as usize;
                let slot = t % bs;
                for d in 0..hs {
                    k[t * hs + d] = kc[(((block * nkv + kvh) * hx + d / x) * bs + slot) * x + d % x] * ks;
                    v[t * hs + d] = vc[((block * nkv + kvh) * hs + d) * bs + slot] * vs;
                }
            }
            for h in kvh * group..(kvh + 1) * group {
                let qh = &q[(s * num_heads + h) * hs..][..hs];
                let scores: Vec<f64> = (0..len)
                    .map(|t| {
                        let dot: f64 = (0..hs).map(|d| qh[d] * k[t * hs + d]).sum();
                        scale * dot + alibi.as_ref().map_or(0.0, |a| a[h] * (t as f64 - (len as f64 - 1.0)))
                    })
                    .collect();
                let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f64> = scores.iter().map(|&sc| (sc - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let o = &mut out[(s * num_heads + h) * hs..][..hs];
                for t in 0..len {
                    let p = e[t] / z;
                    for d in 0..hs {
                        o[d] += p * v[t * hs + d];
                    }
                }
            }
        }
    }
    out
}

/// Replaces the block table of host inputs (same shape).
fn set_table(inp: &mut Inputs, table: &[i32]) {
    inp.block_tables = Tensor::from_i32(inp.block_tables.shape(), table).unwrap();
}

/// Lengths around the block size: 0, 1, multiples ±1, and random ones.
fn random_len(rng: &mut Rng, bs: usize, max_random: usize) -> usize {
    let k = 1 + rng.below(8);
    match rng.below(8) {
        0 => 0,
        1 => 1,
        2 => bs - 1,
        3 => bs,
        4 => bs + 1,
        5 => k * bs - 1,
        6 => k * bs + 1,
        _ => rng.below(max_random + 1),
    }
}

/// A random case: any dtype, head size, block size, GQA ratio (including groups that do not fill
/// the kernel's per-CTA head count), 1..=max_seqs sequences, ALiBi or not.
fn random_case(seed: u64, max_seqs: usize, max_random_len: usize) -> Case {
    let mut rng = Rng::new(seed);
    let dtype = DTYPES[rng.below(DTYPES.len())];
    let head_size = HEAD_SIZES[rng.below(HEAD_SIZES.len())];
    let block_size = BLOCK_SIZES[rng.below(BLOCK_SIZES.len())];
    let num_kv_heads = 1 + rng.below(4);
    let group = [1, 2, 3, 4, 5, 7, 8, 12, 16][rng.below(9)];
    let num_seqs = 1 + rng.below(max_seqs);
    let seq_lens = (0..num_seqs).map(|_| random_len(&mut rng, block_size, max_random_len)).collect();
    // A third of the cases (where the head size has an fp8 layout) on fp8 caches.
    let cache = KvCacheDType::ALL[rng.below(3)];
    let cache = if FP8_HEAD_SIZES.contains(&head_size) { cache } else { KvCacheDType::Auto };
    Case {
        dtype,
        cache,
        num_heads: num_kv_heads * group,
        num_kv_heads,
        head_size,
        block_size,
        seq_lens,
        alibi: rng.below(2) == 1,
        blocksparse: None,
        seed: seed.wrapping_mul(31).wrapping_add(7),
    }
}

/// Per-element tolerance (max relative, absolute floor) for outputs that are exact in f64 up to the
/// GPU's f32 accumulation and the final rounding to `dtype`.
fn elem_tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-6),
        DType::F16 => (2f64.powi(-10), 1e-5),
        DType::BF16 => (2f64.powi(-7), 1e-4),
    }
}

fn case(dtype: DType, heads: (usize, usize), head_size: usize, block_size: usize, seq_lens: &[usize], alibi: bool, seed: u64) -> Case {
    Case::new(dtype, heads, head_size, block_size, seq_lens, alibi, seed)
}

/// Block `b` of sequence `s` in host inputs' table.
fn table_entry(inp: &Inputs, s: usize, b: usize) -> usize {
    inp.block_tables.get_f64(&[s, b]) as usize
}

// ---------------------------------------------------------------------------------------------
// Analytic cases, run on any device
// ---------------------------------------------------------------------------------------------

/// seq_len 1: the softmax has one term, so the output is that token's value row.
fn check_single_token_in(device: &Device, mode: Mode) {
    for (i, &dtype) in DTYPES.iter().enumerate() {
        let c = case(dtype, (8, 2), 64, 16, &[1, 1, 1], i == 1, 300 + i as u64);
        let host = c.inputs().unwrap();
        let got = run_inputs(device, &host, mode).unwrap();
        for s in 0..3 {
            let block = table_entry(&host, s, 0);
            for h in 0..8 {
                let want: Vec<f64> = (0..64).map(|d| host.value_cache.get_f64(&[block, h / 4, d, 0])).collect();
                assert_relative_eq!(row(&got, 8, 64, s, h), &want[..], epsilon = 0.0, max_relative = 1e-6);
            }
        }
    }
}

fn check_single_token(device: &Device) {
    for mode in MODES {
        check_single_token_in(device, mode);
    }
}

/// Every key identical: uniform weights, so the output is the mean of the sequence's value rows.
fn check_identical_keys_in(device: &Device, mode: Mode) {
    for (i, &dtype) in DTYPES.iter().enumerate() {
        let (nh, nkv, hs, bs) = (6, 2, 128, [8, 16, 32][i]);
        let c = case(dtype, (nh, nkv), hs, bs, &[1, 37, 2 * bs, 100], false, 400 + i as u64);
        let mut host = c.inputs().unwrap();
        let x = dtype.x();
        let mut rng = Rng::new(41 + i as u64);
        let key_rows: Vec<f64> = (0..nkv * hs).map(|_| rng.uniform() as f64).collect();
        let num_blocks = host.key_cache.shape()[0];
        let mut writes = Vec::new();
        for b in 0..num_blocks {
            for kvh in 0..nkv {
                for d in 0..hs {
                    for slot in 0..bs {
                        writes.push((host.key_cache.storage_index(&[b, kvh, d / x, slot, d % x]), key_rows[kvh * hs + d]));
                    }
                }
            }
        }
        let mut bytes = host.key_cache.cpu_bytes_mut().expect("host tensor");
        for (at, v) in writes {
            ScalarType::from(dtype).write_f64(&mut bytes, at, v);
        }
        drop(bytes);
        let got = run_inputs(device, &host, mode).unwrap();
        let (max_relative, epsilon) = elem_tol(dtype);
        for (s, &len) in c.seq_lens.iter().enumerate() {
            for h in 0..nh {
                let want: Vec<f64> = (0..hs)
                    .map(|d| {
                        let sum: f64 =
                            (0..len).map(|t| host.value_cache.get_f64(&[table_entry(&host, s, t / bs), h / (nh / nkv), d, t % bs])).sum();
                        sum / len as f64
                    })
                    .collect();
                assert_relative_eq!(row(&got, nh, hs, s, h), &want[..], epsilon = epsilon, max_relative = max_relative);
            }
        }
    }
}

fn check_identical_keys(device: &Device) {
    for mode in MODES {
        check_identical_keys_in(device, mode);
    }
}

/// ALiBi with a huge slope: every token but the last gets a weight of exp(-1e4 or less), so the
/// output is the last token's value row.
fn check_alibi_last_token_in(device: &Device, mode: Mode) {
    for (i, &dtype) in DTYPES.iter().enumerate() {
        let (nh, nkv, hs, bs) = (4, 4, 96, 16);
        let lens = [2, 17, 95, 200];
        let c = case(dtype, (nh, nkv), hs, bs, &lens, true, 500 + i as u64);
        let mut host = c.inputs().unwrap();
        host.alibi_slopes = Some(Tensor::from_f32(DType::F32, &[nh], &[1e4, 2e4, 5e4, 1e5]).unwrap());
        let got = run_inputs(device, &host, mode).unwrap();
        for (s, &len) in lens.iter().enumerate() {
            let t = len - 1;
            for h in 0..nh {
                let want: Vec<f64> = (0..hs).map(|d| host.value_cache.get_f64(&[table_entry(&host, s, t / bs), h, d, t % bs])).collect();
                assert_relative_eq!(row(&got, nh, hs, s, h), &want[..], epsilon = 0.0, max_relative = 1e-6);
            }
        }
    }
}

fn check_alibi_last_token(device: &Device) {
    for mode in MODES {
        check_alibi_last_token_in(device, mode);
    }
}

/// seq_len 0: exact zeros (over a NaN-poisoned output), next to non-empty sequences.
fn check_zero_length_in(device: &Device, mode: Mode) {
    for (i, &dtype) in DTYPES.iter().enumerate() {
        let lens = [0, 5, 0, 40, 0];
        let c = case(dtype, (8, 8), 128, 16, &lens, i == 2, 600 + i as u64);
        let host = c.inputs().unwrap();
        let got = run_inputs(device, &host, mode).unwrap();
        for (s, &len) in lens.iter().enumerate() {
            for h in 0..8 {
                let r = row(&got, 8, 128, s, h);
                if len == 0 {
                    assert!(r.iter().all(|&v| v == 0.0), "{c} {mode}: seq {s} head {h} is not all zeros: {:?}", &r[..4]);
                } else {
                    assert!(r.iter().all(|v| v.is_finite()), "{c}: seq {s} head {h} not finite");
                }
            }
        }
        assert_matches(&got, &reference(&host), dtype, &c.to_string());
    }
}

fn check_zero_length(device: &Device) {
    for mode in MODES {
        check_zero_length_in(device, mode);
    }
}

/// Sequences sharing physical blocks (prefix caching) and a table naming one block twice.
fn shared_blocks_inputs(dtype: DType) -> (Case, Inputs) {
    let c = case(dtype, (8, 2), 64, 16, &[70, 70, 40], true, 700);
    let mut host = c.inputs().unwrap();
    let m = host.block_tables.shape()[1];
    let mut table = host.block_tables.to_i32_vec();
    // seq 1: seq 0's five blocks in reverse order; seq 2: block 3 of seq 0, twice, then its own.
    for b in 0..5 {
        table[m + b] = table[4 - b];
    }
    table[2 * m] = table[3];
    table[2 * m + 1] = table[3];
    set_table(&mut host, &table);
    (c, host)
}

/// Strided copies of host inputs: query and output with padded head and sequence strides, the KV
/// caches as views of one buffer in vLLM's combined `[num_blocks, 2, ...]`-style layout (padded
/// block and head strides), the block table with a padded row stride. Padding holds NaN (inputs)
/// or `sentinel` (output), so stray reads and writes show.
struct Strided {
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    out: Tensor,
}

/// Exact in every dtype.
const SENTINEL: f64 = 96.0;

fn strided_copy(host: &Inputs) -> Strided {
    let dtype = host.query.dtype();
    let es = dtype.size_bytes();
    let align = 16 / es; // elements per 16 bytes
    let &[ns, nh, hs] = host.query.shape() else { unreachable!() };
    let &[nb, nkv, hx, bs, x] = host.key_cache.shape() else { unreachable!() };
    let nan = f64::NAN;

    // query / out: head stride hs + 3, sequence stride nh * (hs + 3) + 5, offset 2.
    let (qh, qs, qo) = (hs + 3, nh * (hs + 3) + 5, 2);
    let qlen = qo + ns * qs;
    let query = common::strided(dtype, &[ns, nh, hs], &[qs, qh, 1], qo, qlen, nan, &host.query.to_f64_vec()).unwrap();
    let out = common::strided(dtype, &[ns, nh, hs], &[qs, qh, 1], qo, qlen, SENTINEL, &vec![nan; ns * nh * hs]).unwrap();

    // KV: head stride padded by 16 bytes, per block [key heads | value heads | 16 bytes], key at
    // offset 16 bytes, value one block half later.
    let head_stride = hs * bs + align;
    let half = nkv * head_stride;
    let block_stride = 2 * half + align;
    let (k_off, v_off) = (align, align + half);
    let len = v_off + nb * block_stride;
    let k_strides = [block_stride, head_stride, bs * x, x, 1];
    let v_strides = [block_stride, head_stride, bs, 1];
    let with_keys = common::strided(dtype, &[nb, nkv, hx, bs, x], &k_strides, k_off, len, nan, &host.key_cache.to_f64_vec()).unwrap();
    // Write the values through a second view of the same buffer: one combined KV allocation.
    let mut value_cache = with_keys.view(&[nb, nkv, hs, bs], &v_strides, v_off).unwrap();
    let (indices, values) = (common::view_indices(&value_cache), host.value_cache.to_f64_vec());
    let mut bytes = value_cache.cpu_bytes_mut().unwrap();
    for (i, v) in indices.into_iter().zip(values) {
        dtype.write_f64(&mut bytes, i, v);
    }
    drop(bytes);
    let key_cache = with_keys;
    assert!(key_cache.shares_storage(&value_cache), "one combined buffer");
    // Unused blocks hold NaN: compare bit patterns.
    let bits = |t: &Tensor| t.to_f64_vec().into_iter().map(f64::to_bits).collect::<Vec<_>>();
    assert_eq!(bits(&key_cache), bits(&host.key_cache), "values written beside the keys, not over them");

    // Block table: row stride m + 3, offset 1, padding -7 (out of range, must never be read).
    let m = host.block_tables.shape()[1];
    let table: Vec<f64> = host.block_tables.to_i32_vec().into_iter().map(f64::from).collect();
    let block_tables = common::strided(ScalarType::I32, &[ns, m], &[m + 3, 1], 1, 1 + ns * (m + 3), -7.0, &table).unwrap();
    Strided { query, key_cache, value_cache, block_tables, out }
}

/// Storage elements of `t` outside its view.
fn outside_view(t: &Tensor) -> Vec<f64> {
    let inside: std::collections::HashSet<usize> = common::view_indices(t).into_iter().collect();
    let bytes = t.cpu_bytes().expect("host tensor");
    let n = bytes.len() / t.dtype().size_bytes();
    (0..n).filter(|i| !inside.contains(i)).map(|i| t.dtype().read_f64(&bytes, i)).collect()
}

fn strided_cases() -> Vec<Case> {
    vec![
        case(DType::F32, (8, 2), 64, 16, &[37, 0, 100], false, 800),
        case(DType::F16, (12, 4), 128, 32, &[1, 65, 200], true, 801),
        case(DType::BF16, (16, 1), 80, 8, &[33, 7], false, 802),
        case(DType::F16, (4, 4), 256, 8, &[17, 90], false, 803),
    ]
}

// ---------------------------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------------------------

/// The library's f64 reference against the naive formula above, on cases covering every dtype,
/// GQA, ALiBi, lengths 0/1/block multiples ±1, and tables with shared and repeated blocks.
#[test]
fn cpu_reference_matches_naive_formula() {
    let mut cases: Vec<(Case, Inputs)> = vec![
        case(DType::F32, (8, 8), 64, 16, &[0, 1, 15, 16, 17, 48], false, 1),
        case(DType::F16, (8, 2), 128, 8, &[7, 9, 100], true, 2),
        case(DType::BF16, (16, 1), 256, 32, &[31, 33, 64, 1], true, 3),
        case(DType::F32, (12, 4), 80, 32, &[200, 3], true, 4),
        case(DType::F16, (6, 3), 32, 16, &[160, 0, 47], false, 5),
        case(DType::BF16, (5, 5), 120, 8, &[63, 65], false, 6),
        Case { cache: KvCacheDType::Fp8(Fp8Kind::E4m3), ..case(DType::F16, (8, 2), 128, 16, &[7, 40, 100], true, 7) },
        Case { cache: KvCacheDType::Fp8(Fp8Kind::E5m2), ..case(DType::BF16, (4, 4), 80, 8, &[63, 1], false, 8) },
        Case { cache: KvCacheDType::Fp8(Fp8Kind::E4m3), ..case(DType::F32, (16, 1), 256, 32, &[70], false, 9) },
    ]
    .into_iter()
    .map(|c| {
        let i = c.inputs().unwrap();
        (c, i)
    })
    .collect();
    cases.push(shared_blocks_inputs(DType::F32));
    for seed in 0..6 {
        let c = random_case(9000 + seed, 4, 200);
        let i = c.inputs().unwrap();
        cases.push((c, i));
    }
    for (c, host) in &cases {
        let want = naive(host);
        let got = reference(host);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(w.is_finite(), "{c}: naive value {i} is not finite");
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{c}: element {i}: reference {g} vs naive {w}");
        }
    }
}

/// The CPU backend over random cases: every element written (NaN-poisoned output), finite, and
/// within the dtype's tolerance of the reference.
#[test]
fn cpu_backend_random_cases() {
    for seed in 0..30 {
        let c = random_case(seed, 4, 300);
        common::check(&Device::Cpu, &c, Version::V1);
    }
}

#[test]
fn cpu_single_token_is_its_value_row() {
    check_single_token(&Device::Cpu);
}

#[test]
fn cpu_identical_keys_give_mean_of_values() {
    check_identical_keys(&Device::Cpu);
}

#[test]
fn cpu_huge_alibi_slope_selects_last_token() {
    check_alibi_last_token(&Device::Cpu);
}

#[test]
fn cpu_zero_length_gives_zeros() {
    check_zero_length(&Device::Cpu);
}

#[test]
fn cpu_shared_and_repeated_blocks() {
    for &dtype in DTYPES {
        let (c, host) = shared_blocks_inputs(dtype);
        let got = run_inputs(&Device::Cpu, &host, Mode::V1).unwrap();
        assert_matches(&got, &naive(&host), dtype, &c.to_string());
    }
}

/// Strided query/output/caches/table give exactly the contiguous result, and the output's padding
/// is untouched.
#[test]
fn cpu_strided_views_match_contiguous() {
    for c in strided_cases() {
        let host = c.inputs().unwrap();
        let want = run_inputs(&Device::Cpu, &host, Mode::V1).unwrap();
        let mut st = strided_copy(&host);
        let args = PagedAttentionArgs {
            query: &st.query,
            key_cache: &st.key_cache,
            value_cache: &st.value_cache,
            block_tables: &st.block_tables,
            seq_lens: &host.seq_lens,
            scale: host.scale,
            alibi_slopes: host.alibi_slopes.as_ref(),
            k_scale: None,
            v_scale: None,
            blocksparse: None,
        };
        paged_attention_v1(&Device::Cpu, &mut st.out, &args).unwrap();
        let got = st.out.to_f64_vec();
        assert_eq!(got, want, "{c}: strided result differs from contiguous");
        assert!(outside_view(&st.out).iter().all(|&v| v == SENTINEL), "{c}: output padding was written");
    }
}

/// An empty batch (no sequences, or no heads) is a no-op that returns Ok.
fn check_empty_batch(device: &Device) {
    let x = DType::F32.x();
    let up = |t: Tensor| device.upload(&t).unwrap();
    let key = up(Tensor::from_f32(DType::F32, &[2, 1, 64 / x, 16, x], &vec![0.5; 2 * 64 * 16]).unwrap());
    let value = up(Tensor::from_f32(DType::F32, &[2, 1, 64, 16], &vec![0.5; 2 * 64 * 16]).unwrap());
    for (ns, nh) in [(0, 4), (3, 0), (0, 0)] {
        let query = up(Tensor::from_f32(DType::F32, &[ns, nh, 64], &vec![0.25; ns * nh * 64]).unwrap());
        let bt = up(Tensor::from_i32(&[ns, 1], &vec![0; ns]).unwrap());
        let sl = up(Tensor::from_i32(&[ns], &vec![3; ns]).unwrap());
        let mut out = device.nan(ScalarType::F32, &[ns, nh, 64]).unwrap();
        let args = PagedAttentionArgs {
            query: &query,
            key_cache: &key,
            value_cache: &value,
            block_tables: &bt,
            seq_lens: &sl,
            scale: 0.125,
            alibi_slopes: None,
            k_scale: None,
            v_scale: None,
            blocksparse: None,
        };
        paged_attention_v1(device, &mut out, &args).unwrap_or_else(|e| panic!("{ns} seqs, {nh} heads: {e}"));
        assert_eq!(out.to_cpu().unwrap().to_f64_vec(), Vec::<f64>::new());
        let mut ws = PagedAttentionWorkspace::new(device, ns, nh, 64, 16).unwrap();
        paged_attention_v2(device, &mut out, &args, &mut ws).unwrap_or_else(|e| panic!("v2, {ns} seqs, {nh} heads: {e}"));
        assert_eq!(out.to_cpu().unwrap().to_f64_vec(), Vec::<f64>::new());
    }
}

#[test]
fn cpu_empty_batch_is_a_noop() {
    check_empty_batch(&Device::Cpu);
}

// ---------------------------------------------------------------------------------------------
// GPU (skipped loudly without one)
// ---------------------------------------------------------------------------------------------

/// Runs `cases` on the GPU, references prepared on worker threads; returns failures and the worst
/// rel-L2 per dtype.
fn run_cases_gpu(device: &Device, cases: &[Case], mode: Mode) -> (Vec<String>, BTreeMap<(DType, KvCacheDType), f64>) {
    let mut failures = Vec::new();
    let mut worst: BTreeMap<(DType, KvCacheDType), f64> = BTreeMap::new();
    common::pipelined(
        cases.len(),
        |i| {
            let host = cases[i].inputs().expect("case inputs");
            let want = reference(&host);
            (host, want)
        },
        |i, (host, want)| {
            let c = &cases[i];
            match run_inputs(device, &host, mode) {
                Ok(got) => {
                    let e = testing::compare(&got, &want);
                    let w = worst.entry((c.dtype, c.cache)).or_insert(0.0);
                    *w = w.max(e.rel_l2);
                    if !e.passes(testing::tolerance(c.dtype)) {
                        failures.push(format!(
                            "{c} {mode}: rel-L2 {:.3e} (tolerance {:.0e}), max |err| {:.3e}, {} non-finite",
                            e.rel_l2,
                            testing::tolerance(c.dtype),
                            e.max_abs,
                            e.non_finite
                        ));
                    }
                }
                Err(err) => failures.push(format!("{c} {mode}: {err}")),
            }
        },
    );
    (failures, worst)
}

fn describe_worst(worst: &BTreeMap<(DType, KvCacheDType), f64>) -> String {
    worst.iter().map(|((d, c), w)| format!("{d}/{c} {w:.3e} (tolerance {:.0e})", testing::tolerance(*d))).collect::<Vec<_>>().join(", ")
}

/// The whole verification grid (every dtype × head size × block size, long cases included), with
/// v1 and with v2 (vLLM's 512-token partitions), merged in the partition kernel and by the reduce.
#[test]
fn gpu_grid() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let cases = testing::grid(true);
    for mode in [Mode::V1, Mode::V2With(512, ReduceMode::Fused), Mode::V2With(512, ReduceMode::Separate)] {
        let (failures, worst) = run_cases_gpu(&device, &cases, mode);
        assert!(
            failures.is_empty(),
            "{mode}: {} of {} grid cases failed; worst rel-L2 per dtype: {}\n{}",
            failures.len(),
            cases.len(),
            describe_worst(&worst),
            failures.join("\n")
        );
        common::note(&format!("gpu_grid {mode}: {} cases on {}; worst rel-L2: {}", cases.len(), device.name(), describe_worst(&worst)));
        // Unused table slots hold out-of-range ids and spare blocks hold NaN: neither may raise a flag.
        common::gpu_of(&mut device).check_status().expect("no device-side flags for valid inputs");
    }
}

/// Random cases: odd GQA groups (partial head groups per CTA), many lengths, ALiBi.
#[test]
fn gpu_random_cases() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let cases: Vec<Case> = (0..120).map(|seed| random_case(50_000 + seed, 8, 2000)).collect();
    for mode in MODES {
        let (failures, worst) = run_cases_gpu(&device, &cases, mode);
        assert!(
            failures.is_empty(),
            "{mode}: {} of {} random cases failed; worst rel-L2 per dtype: {}\n{}",
            failures.len(),
            cases.len(),
            describe_worst(&worst),
            failures.join("\n")
        );
    }
    common::gpu_of(&mut device).check_status().expect("no device-side flags for valid inputs");
}

#[test]
fn gpu_single_token_is_its_value_row() {
    let Some(device) = gpu_or_skip!() else { return };
    check_single_token(&device);
}

#[test]
fn gpu_identical_keys_give_mean_of_values() {
    let Some(device) = gpu_or_skip!() else { return };
    check_identical_keys(&device);
}

#[test]
fn gpu_huge_alibi_slope_selects_last_token() {
    let Some(device) = gpu_or_skip!() else { return };
    check_alibi_last_token(&device);
}

#[test]
fn gpu_zero_length_gives_zeros() {
    let Some(device) = gpu_or_skip!() else { return };
    check_zero_length(&device);
}

#[test]
fn gpu_empty_batch_is_a_noop() {
    let Some(mut device) = gpu_or_skip!() else { return };
    check_empty_batch(&device);
    common::gpu_of(&mut device).check_status().unwrap();
}

/// Shuffled tables (every case), shared blocks between sequences and a block named twice.
#[test]
fn gpu_shared_and_repeated_blocks() {
    let Some(device) = gpu_or_skip!() else { return };
    for &dtype in DTYPES {
        let (c, host) = shared_blocks_inputs(dtype);
        for mode in MODES {
            let got = run_inputs(&device, &host, mode).unwrap();
            assert_matches(&got, &reference(&host), dtype, &format!("{c} {mode}"));
        }
    }
}

/// Host-resident block tables and lengths (checked, then copied by the op) with device tensors.
#[test]
fn gpu_host_tables_are_uploaded() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for c in [case(DType::F16, (8, 2), 128, 16, &[0, 1, 300, 1000], true, 900), case(DType::BF16, (16, 4), 64, 32, &[77, 31], false, 901)] {
        let host = c.inputs().unwrap();
        let mut dev = host.upload(&device).unwrap();
        // Tables stay on the host; also a host seq_lens with a device table, and the reverse.
        dev.block_tables = Tensor::from_i32(host.block_tables.shape(), &host.block_tables.to_i32_vec()).unwrap();
        dev.seq_lens = Tensor::from_i32(host.seq_lens.shape(), &host.seq_lens.to_i32_vec()).unwrap();
        let want = reference(&host);
        let dev_bt = device.upload(&host.block_tables).unwrap();
        let dev_sl = device.upload(&host.seq_lens).unwrap();
        for mode in MODES {
            assert_matches(&run_op(&device, &dev.args(), mode).unwrap(), &want, c.dtype, &format!("{c} {mode} (host tables)"));
            let mixed = PagedAttentionArgs { block_tables: &dev_bt, ..dev.args() };
            assert_matches(&run_op(&device, &mixed, mode).unwrap(), &want, c.dtype, &format!("{c} {mode} (host lengths, device table)"));
            let mixed = PagedAttentionArgs { seq_lens: &dev_sl, ..dev.args() };
            assert_matches(&run_op(&device, &mixed, mode).unwrap(), &want, c.dtype, &format!("{c} {mode} (device lengths, host table)"));
        }
    }
    common::gpu_of(&mut device).check_status().unwrap();
}

/// The rows of sequence `s` in a `[num_seqs, num_heads, head_size]` output.
fn seq_rows(out: &[f64], num_seqs: usize, s: usize) -> &[f64] {
    let per = out.len() / num_seqs;
    &out[s * per..][..per]
}

/// A device-resident table naming an out-of-range block for one sequence: that sequence's output is
/// NaN, the others are right, and the status word reports BAD_BLOCK_ID once.
#[test]
fn gpu_bad_device_block_id_is_flagged() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let c = case(DType::F16, (8, 2), 128, 16, &[40, 70, 33], false, 1000);
    let host = c.inputs().unwrap();
    let want = reference(&host);
    let num_blocks = host.key_cache.shape()[0] as i32;
    let m = host.block_tables.shape()[1];
    // (sequence, block, bad id): a middle block, the last (one-token) block, the first block.
    let bad_entries = [(1, 2, num_blocks), (1, 2, -1), (1, 0, i32::MAX), (2, 2, i32::MIN), (2, 2, num_blocks + 7), (0, 0, -5)];
    for (mode, (bad_seq, bad_block, id)) in MODES.into_iter().flat_map(|m| bad_entries.map(|e| (m, e))) {
        let mut table = host.block_tables.to_i32_vec();
        table[bad_seq * m + bad_block] = id;
        let mut dev = host.upload(&device).unwrap();
        dev.block_tables = device.upload(&Tensor::from_i32(&[3, m], &table).unwrap()).unwrap();
        let got = run_op(&device, &dev.args(), mode).unwrap();
        let what = format!("{c} {mode} with block_tables[{bad_seq}][{bad_block}] = {id}");
        assert!(seq_rows(&got, 3, bad_seq).iter().all(|v| v.is_nan()), "{what}: the bad sequence's output is not all NaN");
        for s in (0..3).filter(|&s| s != bad_seq) {
            assert_matches(seq_rows(&got, 3, s), seq_rows(&want, 3, s), c.dtype, &format!("{what}: sequence {s}"));
        }
        let gpu = common::gpu_of(&mut device);
        match gpu.check_status() {
            Err(Error::DeviceData { flags }) => {
                assert_eq!(flags, status::BAD_BLOCK_ID, "{what}: flags {flags:#x}");
            }
            other => panic!("{what}: expected Error::DeviceData with BAD_BLOCK_ID, got {other:?}"),
        }
        assert!(gpu.check_status().is_ok(), "{what}: flags not cleared by check_status");
    }
}

/// Device-resident lengths out of range (too long, negative) for one sequence: NaN there, the
/// others right, BAD_SEQ_LEN reported once.
#[test]
fn gpu_bad_device_seq_len_is_flagged() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let c = case(DType::BF16, (8, 8), 64, 16, &[40, 70, 33], true, 1100);
    let host = c.inputs().unwrap();
    let want = reference(&host);
    let m = host.block_tables.shape()[1];
    let cap = (m * 16) as i32;
    let bad_lens = [(1, cap + 1), (0, -1), (2, i32::MAX), (2, i32::MIN)];
    for (mode, (bad_seq, len)) in MODES.into_iter().flat_map(|m| bad_lens.map(|e| (m, e))) {
        let mut lens = host.seq_lens.to_i32_vec();
        lens[bad_seq] = len;
        let mut dev = host.upload(&device).unwrap();
        dev.seq_lens = device.upload(&Tensor::from_i32(&[3], &lens).unwrap()).unwrap();
        let got = run_op(&device, &dev.args(), mode).unwrap();
        let what = format!("{c} {mode} with seq_lens[{bad_seq}] = {len}");
        assert!(seq_rows(&got, 3, bad_seq).iter().all(|v| v.is_nan()), "{what}: the bad sequence's output is not all NaN");
        for s in (0..3).filter(|&s| s != bad_seq) {
            assert_matches(seq_rows(&got, 3, s), seq_rows(&want, 3, s), c.dtype, &format!("{what}: sequence {s}"));
        }
        let gpu = common::gpu_of(&mut device);
        match gpu.check_status() {
            Err(Error::DeviceData { flags }) => assert_eq!(flags, status::BAD_SEQ_LEN, "{what}: flags {flags:#x}"),
            other => panic!("{what}: expected Error::DeviceData with BAD_SEQ_LEN, got {other:?}"),
        }
        assert!(gpu.check_status().is_ok(), "{what}: flags not cleared by check_status");
    }
    // The longest valid length (the table's capacity) is fine.
    let mut lens = host.seq_lens.to_i32_vec();
    lens[1] = cap;
    let mut capped = c.inputs().unwrap();
    capped.seq_lens = Tensor::from_i32(&[3], &lens).unwrap();
    for mode in MODES {
        assert_matches(
            &run_inputs(&device, &capped, mode).unwrap(),
            &reference(&capped),
            c.dtype,
            &format!("{c} {mode}, seq 1 at capacity"),
        );
    }
    common::gpu_of(&mut device).check_status().unwrap();
}

/// Strided views on the GPU: the same result as the CPU backend (within tolerance), output padding
/// untouched.
#[test]
fn gpu_strided_views_match_cpu() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for c in strided_cases() {
        let host = c.inputs().unwrap();
        let dtype = c.dtype;
        let mut st = strided_copy(&host);
        let args = PagedAttentionArgs {
            query: &st.query,
            key_cache: &st.key_cache,
            value_cache: &st.value_cache,
            block_tables: &st.block_tables,
            seq_lens: &host.seq_lens,
            scale: host.scale,
            alibi_slopes: host.alibi_slopes.as_ref(),
            k_scale: None,
            v_scale: None,
            blocksparse: None,
        };
        paged_attention_v1(&Device::Cpu, &mut st.out, &args).unwrap();
        let cpu = st.out.to_f64_vec();

        let up = |t: &Tensor| device.upload(t).unwrap();
        let (q, k, v, sl) = (up(&st.query), up(&st.key_cache), up(&st.value_cache), up(&host.seq_lens));
        let alibi = host.alibi_slopes.as_ref().map(up);
        let poisoned = strided_copy(&host).out;
        let dev_bt = up(&st.block_tables);
        for (tables, bt) in [("device table", &dev_bt), ("host table", &st.block_tables)] {
            let mut out = up(&poisoned);
            let args = PagedAttentionArgs {
                query: &q,
                key_cache: &k,
                value_cache: &v,
                block_tables: bt,
                seq_lens: &sl,
                scale: host.scale,
                alibi_slopes: alibi.as_ref(),
                k_scale: None,
                v_scale: None,
                blocksparse: None,
            };
            let mut ws = PagedAttentionWorkspace::with_partition_size(&device, 3, 64, 256, 4096, 32).unwrap();
            let version = if tables == "device table" { Version::V1 } else { Version::V2 };
            paged_attention(&device, &mut out, &args, &mut ws, version).unwrap();
            let back = out.to_cpu().unwrap();
            let what = format!("{c} strided, {tables}, {version}");
            assert_matches(&back.to_f64_vec(), &cpu, dtype, &format!("{what} vs CPU backend"));
            assert_matches(&back.to_f64_vec(), &reference(&host), dtype, &format!("{what} vs reference"));
            assert!(outside_view(&back).iter().all(|&x| x == SENTINEL), "{what}: output padding was written");
        }
    }
    common::gpu_of(&mut device).check_status().unwrap();
}

/// A 131072-token context (f16, head 128, block 16, one sequence, 4 heads over 2 KV heads).
#[test]
fn gpu_long_context() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let c = case(DType::F16, (4, 2), 128, 16, &[131_072], false, 1200);
    let host = c.inputs().unwrap();
    let want = reference(&host);
    for mode in [Mode::V1, Mode::V2(512)] {
        let got = run_inputs(&device, &host, mode).unwrap();
        let e = testing::compare(&got, &want);
        assert!(e.non_finite == 0 && e.rel_l2 <= 1e-3, "{c} {mode}: rel-L2 {:.3e} (limit 1e-3), {} non-finite", e.rel_l2, e.non_finite);
        common::note(&format!("gpu_long_context {mode}: {c}: rel-L2 {:.3e}", e.rel_l2));
    }
    common::gpu_of(&mut device).check_status().unwrap();
}

/// v1 and v2 agree at 64k+ tokens (and both match the reference): every dtype, block sizes from 8
/// to 256, GQA, ALiBi on one case.
#[test]
fn gpu_v1_v2_agree_at_64k() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let cases = [
        case(DType::F16, (8, 2), 128, 16, &[65_536, 70_001], true, 1300),
        case(DType::BF16, (4, 1), 256, 256, &[65_536], false, 1301),
        case(DType::F32, (4, 4), 64, 64, &[66_000, 3], false, 1302),
        case(DType::F16, (8, 8), 80, 8, &[65_537], false, 1303),
    ];
    for c in cases {
        let host = c.inputs().unwrap();
        let want = reference(&host);
        let v1 = run_inputs(&device, &host, Mode::V1).unwrap();
        let v2 = run_inputs(&device, &host, Mode::V2(512)).unwrap();
        let e1 = assert_matches(&v1, &want, c.dtype, &format!("{c} v1"));
        let e2 = assert_matches(&v2, &want, c.dtype, &format!("{c} v2"));
        let between = assert_matches(&v2, &v1, c.dtype, &format!("{c} v2 vs v1"));
        common::note(&format!(
            "gpu_v1_v2_agree_at_64k: {c}: rel-L2 v1 {:.3e}, v2 {:.3e}, v1 vs v2 {:.3e}",
            e1.rel_l2, e2.rel_l2, between.rel_l2
        ));
    }
    common::gpu_of(&mut device).check_status().unwrap();
}

/// v2 with a device length inside the block table's capacity but beyond the workspace's
/// `max_seq_len`: NaN for that sequence, the others right, BAD_SEQ_LEN.
#[test]
fn gpu_v2_length_beyond_workspace_is_flagged() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let c = case(DType::F16, (8, 2), 64, 16, &[1000, 300, 2000], false, 1400);
    let host = c.inputs().unwrap();
    let want = reference(&host);
    let dev = host.upload(&device).unwrap();
    for (bound, partition) in [(1024, 512), (1999, 64)] {
        let mut out = device.nan(host.query.dtype(), host.query.shape()).unwrap();
        let mut ws = PagedAttentionWorkspace::with_partition_size(&device, 3, 8, 64, bound, partition).unwrap();
        paged_attention_v2(&device, &mut out, &dev.args(), &mut ws).unwrap();
        let got = out.to_cpu().unwrap().to_f64_vec();
        // The grid covers ceil(bound / partition) partitions; seq 2 (2000 tokens) does not fit.
        let what = format!("{c}, workspace max_seq_len {bound}, partitions of {partition}");
        assert!(seq_rows(&got, 3, 2).iter().all(|v| v.is_nan()), "{what}: sequence 2 is not all NaN");
        for s in 0..2 {
            assert_matches(seq_rows(&got, 3, s), seq_rows(&want, 3, s), c.dtype, &format!("{what}: sequence {s}"));
        }
        match common::gpu_of(&mut device).check_status() {
            Err(Error::DeviceData { flags }) => assert_eq!(flags, status::BAD_SEQ_LEN, "{what}: flags {flags:#x}"),
            other => panic!("{what}: expected BAD_SEQ_LEN, got {other:?}"),
        }
    }
}

/// A decode step (`reshape_and_cache` of one token per sequence, then paged attention) captured
/// once as a CUDA graph and replayed while the caller writes the next step's lengths, slots, keys
/// and values into the same device tensors (`Tensor::write_from`): every replay matches the float64
/// reference of its own step, with v1 and with v2 under both merges.
#[test]
fn gpu_decode_step_replays_in_a_graph() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let modes = [(Version::V1, ReduceMode::Auto), (Version::V2, ReduceMode::Fused), (Version::V2, ReduceMode::Separate)];
    for (i, (version, reduce)) in modes.into_iter().enumerate() {
        let base = [33usize, 70, 5];
        let c = case(DType::F16, (8, 2), 128, 16, &base, false, 1500 + i as u64);
        let mut host = c.inputs().unwrap();
        let Inputs { query, mut key_cache, mut value_cache, block_tables, mut seq_lens, .. } = host.upload(&device).unwrap();
        let (k_view, v_view) = (key_cache.alias(), value_cache.alias());
        let args = PagedAttentionArgs {
            query: &query,
            key_cache: &k_view,
            value_cache: &v_view,
            block_tables: &block_tables,
            seq_lens: &seq_lens,
            scale: host.scale,
            alibi_slopes: None,
            k_scale: None,
            v_scale: None,
            blocksparse: None,
        };
        let token = [3, 2, 128];
        let (mut new_k, mut new_v) = (device.nan(ScalarType::F16, &token).unwrap(), device.nan(ScalarType::F16, &token).unwrap());
        let mut slots = device.upload(&Tensor::from_i64(&[3], &[0, 0, 0]).unwrap()).unwrap();
        // 32-token partitions: v2 splits every sequence but the last.
        let mut ws = PagedAttentionWorkspace::with_partition_size(&device, 3, 8, 128, 80, 32).unwrap();
        ws.set_reduce_mode(reduce);
        let mut out = device.nan(ScalarType::F16, &[3, 8, 128]).unwrap();
        let Device::Gpu(gpu) = &device else { unreachable!() };
        let graph = gpu
            .capture(|| {
                reshape_and_cache(&device, &new_k, &new_v, &mut key_cache, &mut value_cache, &slots)?;
                paged_attention(&device, &mut out, &args, &mut ws, version)?;
                Ok(())
            })
            .unwrap();
        let table = host.block_tables.to_i32_vec();
        let row = host.block_tables.shape()[1];
        let mut rng = Rng::new(1600 + i as u64);
        for step in 1..=3 {
            // Each sequence gains one token; the step writes it into its slot, then attends.
            let lens: Vec<i32> = base.iter().map(|&l| (l + step) as i32).collect();
            let slot: Vec<i64> =
                (0..3).map(|s| table[s * row + (lens[s] as usize - 1) / 16] as i64 * 16 + (lens[s] as i64 - 1) % 16).collect();
            let fresh =
                |rng: &mut Rng| Tensor::from_f32(DType::F16, &token, &(0..3 * 2 * 128).map(|_| rng.uniform()).collect::<Vec<_>>()).unwrap();
            let (k, v) = (fresh(&mut rng), fresh(&mut rng));
            let (lens_t, slot_t) = (Tensor::from_i32(&[3], &lens).unwrap(), Tensor::from_i64(&[3], &slot).unwrap());
            seq_lens.write_from(&lens_t).unwrap();
            slots.write_from(&slot_t).unwrap();
            new_k.write_from(&k).unwrap();
            new_v.write_from(&v).unwrap();
            graph.replay().unwrap();
            gpu.synchronize().unwrap();
            reshape_and_cache(&Device::Cpu, &k, &v, &mut host.key_cache, &mut host.value_cache, &slot_t).unwrap();
            host.seq_lens = lens_t;
            let what = format!("{c}, {version} ({reduce} merge), graph replay {step}");
            assert_matches(&out.to_cpu().unwrap().to_f64_vec(), &reference(&host), DType::F16, &what);
        }
        drop(graph);
    }
    common::gpu_of(&mut device).check_status().unwrap();
}
