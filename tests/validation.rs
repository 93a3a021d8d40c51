//! Bad inputs give typed errors (the right variant, carrying the offending values), never a panic.

use pagedattn::layout::{BlockSparse, DType, Fp8Kind, KvCacheDType};
use pagedattn::testing::{Case, Inputs, Rng};
use pagedattn::{
    Device, Error, PagedAttentionArgs, PagedAttentionWorkspace, ScalarType, Tensor, Version, choose_plan, choose_version, paged_attention,
    paged_attention_v1, paged_attention_v2,
};

use crate::common;

const OP: &str = "paged_attention";

// Base case: f16 (x = 8), 4 heads over 2 KV heads, head 64, block 16; sequence lengths 5, 20, 0
// (max 2 blocks per sequence), ALiBi. `Case::inputs` puts out-of-range ids in unused table slots.
const NS: usize = 3;
const NH: usize = 4;
const NKV: usize = 2;
const HS: usize = 64;
const BS: usize = 16;
const X: usize = 8;
const M: usize = 2;

fn base_case() -> Case {
    Case {
        dtype: DType::F16,
        cache: pagedattn::layout::KvCacheDType::Auto,
        num_heads: NH,
        num_kv_heads: NKV,
        head_size: HS,
        block_size: BS,
        seq_lens: vec![5, 20, 0],
        alibi: true,
        blocksparse: None,
        seed: 77,
    }
}

fn base() -> Inputs {
    base_case().inputs().unwrap()
}

fn num_blocks(inp: &Inputs) -> usize {
    inp.key_cache.shape()[0]
}

/// A random contiguous host tensor of any dtype.
fn rand(dtype: ScalarType, shape: &[usize]) -> Tensor {
    let mut rng = Rng::new(shape.iter().product::<usize>() as u64 + 5);
    let n: usize = shape.iter().product();
    match dtype {
        ScalarType::F32 | ScalarType::F16 | ScalarType::BF16 => {
            let v: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
            Tensor::from_f32(dtype.float().unwrap(), shape, &v).unwrap()
        }
        ScalarType::I32 => Tensor::from_i32(shape, &(0..n).map(|_| rng.below(4) as i32).collect::<Vec<_>>()).unwrap(),
        ScalarType::I64 => {
            Tensor::from_bytes(ScalarType::I64, shape, (0..n).flat_map(|_| (rng.below(4) as i64).to_le_bytes()).collect()).unwrap()
        }
        ScalarType::Fp8E4m3 | ScalarType::Fp8E5m2 => {
            Tensor::from_bytes(dtype, shape, (0..n).map(|_| rng.below(0x70) as u8).collect()).unwrap()
        }
    }
}

/// A random host view: `shape`/`strides`/`offset` over a storage of `len` elements.
fn view(dtype: ScalarType, len: usize, shape: &[usize], strides: &[usize], offset: usize) -> Tensor {
    let storage = rand(dtype, &[len]);
    storage.view(shape, strides, offset).unwrap()
}

/// Runs on the CPU backend into a fresh output of the query's dtype and shape.
fn run(inp: &Inputs) -> pagedattn::Result<()> {
    let mut out = Tensor::nan(inp.query.dtype(), inp.query.shape());
    paged_attention_v1(&Device::Cpu, &mut out, &inp.args())
}

fn run_out(inp: &Inputs, out: &mut Tensor) -> pagedattn::Result<()> {
    paged_attention_v1(&Device::Cpu, out, &inp.args())
}

#[test]
fn base_case_is_valid() {
    let inp = base();
    let mut out = Tensor::nan(inp.query.dtype(), inp.query.shape());
    run_out(&inp, &mut out).unwrap();
    assert!(out.to_f64_vec().iter().all(|v| v.is_finite()));
}

#[test]
fn query_rank_and_dtype() {
    let mut inp = base();
    inp.query = rand(ScalarType::F16, &[NS, NH * HS]);
    expect_err!(run(&inp), Error::Shape { op: OP, tensor: "query", got, .. } => assert_eq!(got, vec![NS, NH * HS]));
    inp.query = rand(ScalarType::F16, &[NS, NH, HS, 1]);
    expect_err!(run(&inp), Error::Shape { tensor: "query", got, .. } => assert_eq!(got, vec![NS, NH, HS, 1]));
    inp.query = rand(ScalarType::I32, &[NS, NH, HS]);
    expect_err!(run(&inp), Error::DType { op: OP, tensor: "query", got: ScalarType::I32, .. });
}

#[test]
fn key_cache_shape_and_x() {
    let mut inp = base();
    let nb = num_blocks(&inp);
    // Rank 4.
    inp.key_cache = rand(ScalarType::F16, &[nb, NKV, HS, BS]);
    expect_err!(run(&inp), Error::Shape { op: OP, tensor: "key_cache", got, .. } => assert_eq!(got, vec![nb, NKV, HS, BS]));
    // x = 4 for an f16 cache (x must be 16 bytes / 2 = 8).
    inp.key_cache = rand(ScalarType::F16, &[nb, NKV, HS / 4, BS, 4]);
    expect_err!(run(&inp), Error::Shape { tensor: "key_cache", got, expected, .. } => {
        assert_eq!(got, vec![nb, NKV, HS / 4, BS, 4]);
        assert!(expected.contains("8]"), "{expected}");
    });
    // head_size / x times x differs from the query's head size.
    inp.key_cache = rand(ScalarType::F16, &[nb, NKV, 2 * HS / X, BS, X]);
    expect_err!(run(&inp), Error::Shape { tensor: "key_cache", .. });
}

#[test]
fn value_cache_shape_mismatch() {
    let inp0 = base();
    let nb = num_blocks(&inp0);
    for shape in [[nb, NKV, HS, 8], [nb, 1, HS, BS], [nb - 1, NKV, HS, BS], [nb, NKV, 2 * HS, BS]] {
        let mut inp = base();
        inp.value_cache = rand(ScalarType::F16, &shape);
        expect_err!(run(&inp), Error::Shape { op: OP, tensor: "value_cache", got, .. } => assert_eq!(got, shape.to_vec()));
    }
    let mut inp = base();
    inp.value_cache = rand(ScalarType::F16, &[nb, NKV, HS, BS, 1]);
    expect_err!(run(&inp), Error::Shape { tensor: "value_cache", .. });
}

#[test]
fn unsupported_head_size() {
    let mut inp = base();
    let nb = num_blocks(&inp);
    for hs in [48, 0, 512] {
        inp.query = rand(ScalarType::F16, &[NS, NH, hs]);
        inp.key_cache = rand(ScalarType::F16, &[nb, NKV, hs / X, BS, X]);
        inp.value_cache = rand(ScalarType::F16, &[nb, NKV, hs, BS]);
        expect_err!(run(&inp), Error::Unsupported { op: OP, what: "head_size", got, supported } => {
            assert_eq!(got, hs.to_string());
            assert!(supported.contains("128"), "{supported}");
        });
    }
}

#[test]
fn unsupported_block_size() {
    let mut inp = base();
    let nb = num_blocks(&inp);
    for bs in [12, 48, 1, 512] {
        inp.key_cache = rand(ScalarType::F16, &[nb, NKV, HS / X, bs, X]);
        inp.value_cache = rand(ScalarType::F16, &[nb, NKV, HS, bs]);
        expect_err!(run(&inp), Error::Unsupported { op: OP, what: "block_size", got, supported } => {
            assert_eq!(got, bs.to_string());
            assert!(supported.contains("16"), "{supported}");
        });
    }
}

#[test]
fn dtype_mismatch() {
    let nb = num_blocks(&base());
    // Caches of another dtype with the query's x (f32 x would be 4; keep 8 so the shape passes).
    let mut inp = base();
    inp.key_cache = rand(ScalarType::BF16, &[nb, NKV, HS / X, BS, X]);
    expect_err!(run(&inp), Error::DType { op: OP, tensor: "key_cache", got: ScalarType::BF16, expected } => assert!(expected.contains("f16"), "{expected}"));
    let mut inp = base();
    inp.value_cache = rand(ScalarType::F32, &[nb, NKV, HS, BS]);
    expect_err!(run(&inp), Error::DType { tensor: "value_cache", got: ScalarType::F32, .. });
    let mut inp = base();
    inp.key_cache = rand(ScalarType::I32, &[nb, NKV, HS / X, BS, X]);
    expect_err!(run(&inp), Error::DType { tensor: "key_cache", got: ScalarType::I32, .. });
    // Output of another dtype.
    let inp = base();
    let mut out = Tensor::nan(ScalarType::F32, &[NS, NH, HS]);
    expect_err!(run_out(&inp, &mut out), Error::DType { op: OP, tensor: "out", got: ScalarType::F32, .. });
}

#[test]
fn out_shape() {
    let inp = base();
    for shape in [vec![NS, NH, HS + 8], vec![NS + 1, NH, HS], vec![NS * NH * HS]] {
        let mut out = Tensor::nan(ScalarType::F16, &shape);
        expect_err!(run_out(&inp, &mut out), Error::Shape { op: OP, tensor: "out", got, .. } => assert_eq!(got, shape));
    }
}

#[test]
fn heads_not_a_multiple_of_kv_heads() {
    let mut inp = base();
    inp.query = rand(ScalarType::F16, &[NS, 3, HS]);
    inp.alibi_slopes = None;
    expect_err!(run(&inp), Error::Value { op: OP, what: "num_heads / num_kv_heads", got, .. } => assert_eq!(got, "3 / 2"));
    // More KV heads than heads.
    inp.query = rand(ScalarType::F16, &[NS, 1, HS]);
    expect_err!(run(&inp), Error::Value { what: "num_heads / num_kv_heads", got, .. } => assert_eq!(got, "1 / 2"));
    // No KV heads at all (no division by zero).
    let nb = num_blocks(&inp);
    inp.query = rand(ScalarType::F16, &[NS, NH, HS]);
    inp.key_cache = rand(ScalarType::F16, &[nb, 0, HS / X, BS, X]);
    inp.value_cache = rand(ScalarType::F16, &[nb, 0, HS, BS]);
    expect_err!(run(&inp), Error::Value { what: "num_heads / num_kv_heads", got, .. } => assert_eq!(got, "4 / 0"));
}

#[test]
fn non_contiguous_inner_dims() {
    let nb = num_blocks(&base());
    let f16 = ScalarType::F16;
    // Query with a head-dim stride of 2.
    let mut inp = base();
    inp.query = view(f16, NS * NH * HS * 2, &[NS, NH, HS], &[NH * HS * 2, HS * 2, 2], 0);
    expect_err!(run(&inp), Error::Layout { op: OP, tensor: "query", strides, .. } => assert_eq!(strides, vec![NH * HS * 2, HS * 2, 2]));
    // Output with a head-dim stride of 2.
    let inp = base();
    let mut out = view(f16, NS * NH * HS * 2, &[NS, NH, HS], &[NH * HS * 2, HS * 2, 2], 0);
    expect_err!(run_out(&inp, &mut out), Error::Layout { tensor: "out", .. });
    // Key cache with slot-major inner axes (shape right, strides permuted).
    let per_head = HS * BS;
    let mut inp = base();
    inp.key_cache = view(f16, nb * NKV * per_head, &[nb, NKV, HS / X, BS, X], &[NKV * per_head, per_head, X, HS, 1], 0);
    expect_err!(run(&inp), Error::Layout { op: OP, tensor: "key_cache", strides, .. } => assert_eq!(strides[2..], [X, HS, 1]));
    // Value cache transposed inside a head.
    let mut inp = base();
    inp.value_cache = view(f16, nb * NKV * per_head, &[nb, NKV, HS, BS], &[NKV * per_head, per_head, 1, HS], 0);
    expect_err!(run(&inp), Error::Layout { tensor: "value_cache", strides, .. } => assert_eq!(strides[2..], [1, HS]));
    // Block table with non-contiguous rows.
    let mut inp = base();
    let table = inp.block_tables.to_i32_vec();
    let mut bt = view(ScalarType::I32, NS * M * 2, &[NS, M], &[2 * M, 2], 0);
    for (i, v) in common::view_indices(&bt).into_iter().zip(table) {
        bt.set_storage_f64(i, v as f64);
    }
    inp.block_tables = bt;
    expect_err!(run(&inp), Error::Layout { tensor: "block_tables", strides, .. } => assert_eq!(strides, vec![2 * M, 2]));
}

#[test]
fn key_value_stride_mismatch() {
    let nb = num_blocks(&base());
    let per_block = NKV * HS * BS;
    // Value cache with a padded block stride (a view), key cache contiguous.
    let mut inp = base();
    inp.value_cache = view(ScalarType::F16, nb * (per_block + 64), &[nb, NKV, HS, BS], &[per_block + 64, HS * BS, BS, 1], 0);
    expect_err!(run(&inp), Error::Layout { op: OP, tensor: "value_cache", strides, why, .. } => {
        assert_eq!(strides[0], per_block + 64);
        assert!(why.contains("key cache"), "{why}");
    });
    // Both padded the same way is fine.
    let mut inp = base();
    inp.key_cache = view(ScalarType::F16, nb * (per_block + 64), &[nb, NKV, HS / X, BS, X], &[per_block + 64, HS * BS, BS * X, X, 1], 0);
    inp.value_cache = view(ScalarType::F16, nb * (per_block + 64), &[nb, NKV, HS, BS], &[per_block + 64, HS * BS, BS, 1], 0);
    run(&inp).unwrap();
}

#[test]
fn caches_not_16_byte_aligned() {
    let nb = num_blocks(&base());
    let per_block = NKV * HS * BS;
    // Offset of one f16 element.
    let mut inp = base();
    inp.key_cache = view(ScalarType::F16, nb * per_block + 1, &[nb, NKV, HS / X, BS, X], &[per_block, HS * BS, BS * X, X, 1], 1);
    expect_err!(run(&inp), Error::Layout { op: OP, tensor: "key_cache", offset: 1, .. });
    // Block stride padded by one element (on both caches, so the strides agree).
    let bstride = per_block + 1;
    let mut inp = base();
    inp.key_cache = view(ScalarType::F16, nb * bstride, &[nb, NKV, HS / X, BS, X], &[bstride, HS * BS, BS * X, X, 1], 0);
    inp.value_cache = view(ScalarType::F16, nb * bstride, &[nb, NKV, HS, BS], &[bstride, HS * BS, BS, 1], 0);
    expect_err!(run(&inp), Error::Layout { tensor: "key_cache", strides, .. } => assert_eq!(strides[0], bstride));
}

#[test]
fn block_tables_dtype_and_shape() {
    let mut inp = base();
    inp.block_tables = rand(ScalarType::I64, &[NS, M]);
    expect_err!(run(&inp), Error::DType { op: OP, tensor: "block_tables", got: ScalarType::I64, .. });
    inp.block_tables = rand(ScalarType::F32, &[NS, M]);
    expect_err!(run(&inp), Error::DType { tensor: "block_tables", got: ScalarType::F32, .. });
    inp.block_tables = rand(ScalarType::I32, &[NS * M]);
    expect_err!(run(&inp), Error::Shape { op: OP, tensor: "block_tables", got, .. } => assert_eq!(got, vec![NS * M]));
    inp.block_tables = rand(ScalarType::I32, &[NS - 1, M]);
    expect_err!(run(&inp), Error::Shape { tensor: "block_tables", got, .. } => assert_eq!(got, vec![NS - 1, M]));
}

#[test]
fn seq_lens_dtype_and_shape() {
    let mut inp = base();
    for shape in [vec![NS + 1], vec![NS, 1], vec![]] {
        inp.seq_lens = Tensor::from_i32(&shape, &vec![1; shape.iter().product()]).unwrap();
        expect_err!(run(&inp), Error::Shape { op: OP, tensor: "seq_lens", got, .. } => assert_eq!(got, shape));
    }
    inp.seq_lens = rand(ScalarType::I64, &[NS]);
    expect_err!(run(&inp), Error::DType { tensor: "seq_lens", got: ScalarType::I64, .. });
}

/// The kernel reads lengths and slopes densely: strided ones are rejected, not misread.
#[test]
fn strided_seq_lens_and_alibi() {
    let mut inp = base();
    let mut sl = view(ScalarType::I32, 2 * NS, &[NS], &[2], 0);
    for (i, v) in common::view_indices(&sl).into_iter().zip([5, 20, 0]) {
        sl.set_storage_f64(i, v as f64);
    }
    inp.seq_lens = sl;
    expect_err!(run(&inp), Error::Layout { op: OP, tensor: "seq_lens", strides, .. } => assert_eq!(strides, vec![2]));
    let mut inp = base();
    inp.alibi_slopes = Some(view(ScalarType::F32, 2 * NH, &[NH], &[2], 1));
    expect_err!(run(&inp), Error::Layout { tensor: "alibi_slopes", strides, offset: 1, .. } => assert_eq!(strides, vec![2]));
    // A single sequence / head may have any stride (and an offset).
    let mut c = base_case();
    c.seq_lens = vec![9];
    c.num_heads = 2;
    c.num_kv_heads = 2;
    let mut inp = c.inputs().unwrap();
    let mut sl = view(ScalarType::I32, 3, &[1], &[2], 1);
    sl.set_storage_f64(1, 9.0);
    inp.seq_lens = sl;
    run(&inp).unwrap();
}

#[test]
fn host_seq_len_out_of_range() {
    let cap = (M * BS) as i32;
    for (s, len) in [(1, cap + 1), (1, -1), (0, i32::MAX), (2, i32::MIN)] {
        let mut inp = base();
        let mut lens = vec![5, 20, 0];
        lens[s] = len;
        inp.seq_lens = Tensor::from_i32(&[NS], &lens).unwrap();
        expect_err!(run(&inp), Error::HostData { op: OP, what } => {
            assert!(what.contains(&format!("seq_lens[{s}] = {len}")), "{what}");
            assert!(what.contains(&format!("0..={cap}")), "{what}");
        });
    }
    // At capacity, seq 1 (20 tokens, 2 blocks) is valid; seq 0 would need its unused second slot,
    // which holds an out-of-range id: that becomes a host-data error about the table.
    let mut inp = base();
    inp.seq_lens = Tensor::from_i32(&[NS], &[5, cap, 0]).unwrap();
    run(&inp).unwrap();
    inp.seq_lens = Tensor::from_i32(&[NS], &[cap, 20, 0]).unwrap();
    expect_err!(run(&inp), Error::HostData { what, .. } => assert!(what.contains("block_tables[0][1]"), "{what}"));
}

#[test]
fn host_block_id_out_of_range() {
    let nb = num_blocks(&base()) as i32;
    // Used blocks: seq 0 block 0 (5 tokens), seq 1 blocks 0 and 1 (20 tokens).
    for (s, b, id) in [(1, 1, -1), (1, 1, nb), (0, 0, nb + 100), (1, 0, i32::MIN), (1, 0, i32::MAX)] {
        let mut inp = base();
        let mut table = inp.block_tables.to_i32_vec();
        table[s * M + b] = id;
        inp.block_tables = Tensor::from_i32(&[NS, M], &table).unwrap();
        expect_err!(run(&inp), Error::HostData { op: OP, what } => {
            assert!(what.contains(&format!("block_tables[{s}][{b}] = {id}")), "{what}");
            assert!(what.contains(&format!("0..{nb}")), "{what}");
        });
    }
}

/// Out-of-range ids in table slots no sequence uses are accepted, and the result is unchanged.
#[test]
fn host_unused_block_ids_are_ignored() {
    let inp = base();
    let mut want = Tensor::nan(ScalarType::F16, &[NS, NH, HS]);
    run_out(&inp, &mut want).unwrap();
    let mut table = inp.block_tables.to_i32_vec();
    table[1] = -1; // seq 0, block 1 (5 tokens use block 0 only)
    table[2 * M] = i32::MIN; // seq 2 has no tokens
    table[2 * M + 1] = i32::MAX;
    let mut inp = inp;
    inp.block_tables = Tensor::from_i32(&[NS, M], &table).unwrap();
    let mut got = Tensor::nan(ScalarType::F16, &[NS, NH, HS]);
    run_out(&inp, &mut got).unwrap();
    assert_eq!(got.to_f64_vec(), want.to_f64_vec());
}

#[test]
fn non_finite_scale() {
    for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut inp = base();
        inp.scale = scale;
        expect_err!(run(&inp), Error::Value { op: OP, what: "scale", got, .. } => assert_eq!(got, scale.to_string()));
    }
}

#[test]
fn alibi_wrong_shape_or_dtype() {
    let mut inp = base();
    for shape in [vec![NH + 1], vec![NH - 1], vec![1, NH]] {
        inp.alibi_slopes = Some(rand(ScalarType::F32, &shape));
        expect_err!(run(&inp), Error::Shape { op: OP, tensor: "alibi_slopes", got, .. } => assert_eq!(got, shape));
    }
    inp.alibi_slopes = Some(rand(ScalarType::F16, &[NH]));
    expect_err!(run(&inp), Error::Shape { tensor: "alibi_slopes", expected, .. } => assert!(expected.contains("f32"), "{expected}"));
}

/// Random malformed arguments (extents, dtypes, table contents, lengths, scale and slopes, a few
/// at a time): the op returns (Ok or a typed error) and never panics; when it accepts, the output
/// is finite.
#[test]
fn random_bad_inputs_never_panic() {
    let mut rng = Rng::new(4242);
    let (mut accepted, mut rejected) = (0, 0);
    for _ in 0..600 {
        // ns, nh, nkv, hs, x, bs, m, nb, then the value cache's nkv/hs/bs, seq_lens' and out's ns, the slopes' nh.
        let mut d = [NS, NH, NKV, HS, X, BS, M, 4, NKV, HS, BS, NS, NS, NH];
        let mut dt = [ScalarType::F16; 4]; // query, key, value, out
        for _ in 0..rng.below(3) {
            if rng.below(4) == 0 {
                dt[rng.below(4)] = [ScalarType::F32, ScalarType::BF16, ScalarType::I32, ScalarType::I64][rng.below(4)];
            } else {
                let i = rng.below(d.len());
                d[i] = match rng.below(5) {
                    0 => 0,
                    1 => 1,
                    2 => d[i] + 1,
                    3 => d[i].saturating_sub(1),
                    _ => 2 * d[i],
                };
            }
        }
        let [ns, nh, nkv, hs, x, bs, m, nb, vkv, vhs, vbs, lns, ons, anh] = d;
        let query = rand(dt[0], &[ns, nh, hs]);
        let key_cache = rand(dt[1], &[nb, nkv, hs.checked_div(x).unwrap_or(0), bs, x]);
        let value_cache = rand(dt[2], &[nb, vkv, vhs, vbs]);
        let table: Vec<i32> = (0..ns * m)
            .map(|_| if rng.below(10) > 0 { rng.below(nb.max(1)) as i32 } else { [-1, nb as i32, i32::MIN][rng.below(3)] })
            .collect();
        let block_tables = Tensor::from_i32(&[ns, m], &table).unwrap();
        let cap = (m * bs) as i32;
        let lens: Vec<i32> = (0..lns)
            .map(|_| if rng.below(10) > 0 { rng.below(m * bs + 1) as i32 } else { [-1, cap + 1, i32::MAX][rng.below(3)] })
            .collect();
        let seq_lens = Tensor::from_i32(&[lns], &lens).unwrap();
        let alibi = (rng.below(3) == 0).then(|| rand(ScalarType::F32, &[anh]));
        let scale = if rng.below(10) > 0 { 0.125 } else { [f32::NAN, f32::INFINITY, 1e30][rng.below(3)] };
        let mut out = Tensor::nan(dt[3], &[ons, nh, hs]);
        let args = PagedAttentionArgs {
            query: &query,
            key_cache: &key_cache,
            value_cache: &value_cache,
            block_tables: &block_tables,
            seq_lens: &seq_lens,
            scale,
            alibi_slopes: alibi.as_ref(),
            k_scale: None,
            v_scale: None,
            blocksparse: None,
        };
        let v2 = rng.below(2) == 0;
        let res = if v2 {
            PagedAttentionWorkspace::new(&Device::Cpu, lns, nh, hs, m * bs)
                .and_then(|mut ws| paged_attention_v2(&Device::Cpu, &mut out, &args, &mut ws))
        } else {
            paged_attention_v1(&Device::Cpu, &mut out, &args)
        };
        match res {
            Ok(()) => {
                accepted += 1;
                assert!(out.to_f64_vec().iter().all(|v| v.is_finite()), "accepted arguments gave a non-finite output: {d:?} {dt:?}");
            }
            Err(e) => {
                rejected += 1;
                // Every error renders (no panic in Display either).
                assert!(!e.to_string().is_empty());
            }
        }
    }
    // Both paths were exercised.
    assert!(accepted > 20 && rejected > 100, "accepted {accepted}, rejected {rejected}");
}

// ---------------------------------------------------------------------------------------------
// v2's workspace and the automatic choice
// ---------------------------------------------------------------------------------------------

#[test]
fn workspace_bounds_are_enforced() {
    let inp = base();
    let mut out = Tensor::nan(inp.query.dtype(), inp.query.shape());
    // Lengths are 5, 20, 0: a bound of 19 rejects sequence 1 (host data), for v2 and for v1 through `paged_attention`.
    let mut ws = PagedAttentionWorkspace::new(&Device::Cpu, NS, NH, HS, 19).unwrap();
    expect_err!(paged_attention_v2(&Device::Cpu, &mut out, &inp.args(), &mut ws), Error::HostData { op: OP, what } => {
        assert!(what.contains("seq_lens[1] = 20") && what.contains("max_seq_len 19"), "{what}");
    });
    expect_err!(paged_attention(&Device::Cpu, &mut out, &inp.args(), &mut ws, Version::V1), Error::HostData { .. });
    // Too few sequences x heads, or a smaller head size.
    for (seqs, heads, hs) in [(NS - 1, NH, HS), (NS, NH - 1, HS), (NS, NH, HS / 2)] {
        let mut ws = PagedAttentionWorkspace::new(&Device::Cpu, seqs, heads, hs, 64).unwrap();
        expect_err!(paged_attention_v2(&Device::Cpu, &mut out, &inp.args(), &mut ws), Error::Value { op: OP, what: "workspace", .. });
    }
    // Enough: larger bounds in every direction.
    let mut ws = PagedAttentionWorkspace::new(&Device::Cpu, NS + 5, NH, 256, 100_000).unwrap();
    paged_attention_v2(&Device::Cpu, &mut out, &inp.args(), &mut ws).unwrap();
    assert!(out.to_f64_vec().iter().all(|v| v.is_finite()));
}

#[test]
fn workspace_rejects_bad_partitions() {
    for p in [0, 16, 48, 100] {
        expect_err!(
            PagedAttentionWorkspace::with_partition_size(&Device::Cpu, 1, 1, 64, 1000, p),
            Error::Value { what: "partition_size", .. }
        );
    }
    // More partitions than the reduce can weigh.
    expect_err!(
        PagedAttentionWorkspace::with_partition_size(&Device::Cpu, 1, 1, 64, 1 << 30, 32),
        Error::Value { what: "max_seq_len", .. }
    );
    expect_err!(PagedAttentionWorkspace::new(&Device::Cpu, usize::MAX, 2, 64, 1000), Error::Value { .. });
    let ws = PagedAttentionWorkspace::new(&Device::Cpu, 4, 8, 128, 1025).unwrap();
    assert_eq!((ws.partition_size(), ws.max_num_partitions(), ws.max_seq_len()), (512, 3, 1025));
    // At least 4096 partial rows: room for the automatic choice's small partitions.
    assert_eq!(PagedAttentionWorkspace::size_bytes(4, 8, 128, 1025), 4 * 4096 * 130);
    assert_eq!(PagedAttentionWorkspace::size_bytes(64, 32, 128, 4096), 4 * 64 * 32 * 8 * 130);
}

#[test]
fn automatic_choice_follows_the_bounds() {
    // One 128-token partition: v1 whatever the grid. Longer: v1 only when its CTAs cover 0.9x the SMs.
    assert_eq!(choose_version(128, 1, 132), Version::V1);
    assert_eq!(choose_version(129, 1, 132), Version::V2);
    assert_eq!(choose_version(512, 1, 132), Version::V2);
    assert_eq!(choose_version(100_000, 118, 132), Version::V2);
    assert_eq!(choose_version(100_000, 119, 132), Version::V1);
    assert_eq!(choose_version(4096, 128, 132), Version::V1);
    assert_eq!(choose_version(4096, 118, 132), Version::V2);
    assert_eq!(choose_version(4096, 128, 80), Version::V1);
    // v2's partition size: the largest of 2048 .. 128 whose CTAs fill 1.5x the SMs, else 128 (the
    // H100 sweep in the docs of `choose_plan`).
    let all = |_| true;
    assert_eq!(choose_plan(32, 8, 132, 512, all), (Version::V1, 0));
    assert_eq!(choose_plan(512, 8, 132, 512, all), (Version::V2, 128));
    assert_eq!(choose_plan(4096, 8, 132, 512, all), (Version::V2, 128));
    assert_eq!(choose_plan(16384, 8, 132, 512, all), (Version::V2, 512));
    assert_eq!(choose_plan(512, 64, 132, 512, all), (Version::V2, 128));
    assert_eq!(choose_plan(4096, 512, 132, 512, all), (Version::V1, 0));
    // A workspace without room for the small partitions keeps its own size (or v1 for one partition).
    assert_eq!(choose_plan(4096, 8, 132, 512, |p| p == 512), (Version::V2, 512));
    assert_eq!(choose_plan(512, 8, 132, 512, |p| p == 512), (Version::V1, 0));
    // Larger partitions than vLLM's when they still fill the GPU: one wave, fewer partials.
    assert_eq!(choose_plan(4096, 100, 132, 512, all), (Version::V2, 2048));
    assert_eq!(choose_plan(16384, 100, 132, 512, all), (Version::V2, 2048));
    assert_eq!(choose_plan(16384, 16, 132, 512, all), (Version::V2, 1024));
    // The workspace's partition size is one more candidate, not a bound.
    assert_eq!(choose_plan(16384, 8, 132, 256, all), (Version::V2, 512));
    assert_eq!(choose_plan(16384, 8, 132, 96, |p| p == 96), (Version::V2, 96));
    let inp = base();
    let mut out = Tensor::nan(inp.query.dtype(), inp.query.shape());
    let mut ws = PagedAttentionWorkspace::new(&Device::Cpu, NS, NH, HS, 20).unwrap();
    assert_eq!(paged_attention(&Device::Cpu, &mut out, &inp.args(), &mut ws, Version::Auto).unwrap(), Version::V1);
    // The block table bounds the length too: its few blocks fit one partition, so v1 even under a
    // 20k-token workspace.
    let mut ws = PagedAttentionWorkspace::new(&Device::Cpu, NS, NH, HS, 20_000).unwrap();
    assert_eq!(paged_attention(&Device::Cpu, &mut out, &inp.args(), &mut ws, Version::Auto).unwrap(), Version::V1);
    assert_eq!(paged_attention(&Device::Cpu, &mut out, &inp.args(), &mut ws, Version::V1).unwrap(), Version::V1);
}

// ---------------------------------------------------------------------------------------------
// GPU: tensors on the wrong device
// ---------------------------------------------------------------------------------------------

#[test]
fn gpu_tensor_on_wrong_device() {
    let Some(gpu) = gpu_or_skip!() else { return };
    let host = base();
    let dev = host.upload(&gpu).unwrap();
    let mut dev_out = gpu.nan(ScalarType::F16, &[NS, NH, HS]).unwrap();
    let mut host_out = Tensor::nan(ScalarType::F16, &[NS, NH, HS]);

    // GPU op, one operand on the host.
    let cases: Vec<(&str, PagedAttentionArgs)> = vec![
        ("query", PagedAttentionArgs { query: &host.query, ..dev.args() }),
        ("key_cache", PagedAttentionArgs { key_cache: &host.key_cache, ..dev.args() }),
        ("value_cache", PagedAttentionArgs { value_cache: &host.value_cache, ..dev.args() }),
        ("alibi_slopes", PagedAttentionArgs { alibi_slopes: host.alibi_slopes.as_ref(), ..dev.args() }),
    ];
    for (name, args) in &cases {
        expect_err!(paged_attention_v1(&gpu, &mut dev_out, args), Error::Device { op: OP, tensor, got: "CPU", expected: "GPU" } => assert_eq!(tensor, *name));
    }
    expect_err!(paged_attention_v1(&gpu, &mut host_out, &dev.args()), Error::Device { op: OP, tensor: "out", got: "CPU", expected: "GPU" });

    // CPU op, one operand on the GPU (tables included: the CPU backend reads them directly).
    let cases: Vec<(&str, PagedAttentionArgs)> = vec![
        ("query", PagedAttentionArgs { query: &dev.query, ..host.args() }),
        ("key_cache", PagedAttentionArgs { key_cache: &dev.key_cache, ..host.args() }),
        ("value_cache", PagedAttentionArgs { value_cache: &dev.value_cache, ..host.args() }),
        ("alibi_slopes", PagedAttentionArgs { alibi_slopes: dev.alibi_slopes.as_ref(), ..host.args() }),
        ("block_tables", PagedAttentionArgs { block_tables: &dev.block_tables, ..host.args() }),
        ("seq_lens", PagedAttentionArgs { seq_lens: &dev.seq_lens, ..host.args() }),
    ];
    for (name, args) in &cases {
        expect_err!(paged_attention_v1(&Device::Cpu, &mut host_out, args), Error::Device { op: OP, tensor, got: "GPU", expected: "CPU" } => assert_eq!(tensor, *name));
    }
    expect_err!(
        paged_attention_v1(&Device::Cpu, &mut dev_out, &host.args()),
        Error::Device { op: OP, tensor: "out", got: "GPU", expected: "CPU" }
    );

    // Host-resident tables on the GPU are still checked before anything is launched.
    let mut table = host.block_tables.to_i32_vec();
    table[M] = -3;
    let bad_table = Tensor::from_i32(&[NS, M], &table).unwrap();
    let args = PagedAttentionArgs { block_tables: &bad_table, seq_lens: &host.seq_lens, ..dev.args() };
    expect_err!(paged_attention_v1(&gpu, &mut dev_out, &args), Error::HostData { what, .. } => assert!(what.contains("block_tables[1][0] = -3"), "{what}"));
    let bad_lens = Tensor::from_i32(&[NS], &[5, 20, 33]).unwrap();
    let args = PagedAttentionArgs { seq_lens: &bad_lens, ..dev.args() };
    expect_err!(paged_attention_v1(&gpu, &mut dev_out, &args), Error::HostData { what, .. } => assert!(what.contains("seq_lens[2] = 33"), "{what}"));
}

/// An fp8 (e4m3) version of the base case.
fn fp8_base() -> Inputs {
    Case { cache: KvCacheDType::Fp8(Fp8Kind::E4m3), ..base_case() }.inputs().unwrap()
}

#[test]
fn fp8_cache_needs_valid_scales() {
    let inp = fp8_base();
    run(&inp).unwrap();
    let scalar = |v: f32| Tensor::from_f32(DType::F32, &[1], &[v]).unwrap();
    let with = |k: Option<&Tensor>, v: Option<&Tensor>| {
        let mut out = Tensor::nan(inp.query.dtype(), inp.query.shape());
        paged_attention_v1(&Device::Cpu, &mut out, &PagedAttentionArgs { k_scale: k, v_scale: v, ..inp.args() })
    };
    let good = scalar(0.5);
    expect_err!(with(None, Some(&good)), Error::Value { op: OP, what: "k_scale", .. });
    expect_err!(with(Some(&good), None), Error::Value { op: OP, what: "v_scale", .. });
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let b = scalar(bad);
        expect_err!(with(Some(&b), Some(&good)), Error::HostData { op: OP, what } => assert!(what.contains("k_scale"), "{what}"));
        expect_err!(with(Some(&good), Some(&b)), Error::HostData { op: OP, what } => assert!(what.contains("v_scale"), "{what}"));
    }
    let two = Tensor::from_f32(DType::F32, &[2], &[1.0, 1.0]).unwrap();
    expect_err!(with(Some(&two), Some(&good)), Error::Shape { op: OP, tensor: "k_scale", .. });
    let half = Tensor::from_f32(DType::F16, &[1], &[1.0]).unwrap();
    expect_err!(with(Some(&good), Some(&half)), Error::Shape { op: OP, tensor: "v_scale", .. });
    // Scales given with auto caches are ignored, as in vLLM.
    let auto = base();
    let mut out = Tensor::nan(auto.query.dtype(), auto.query.shape());
    let bad = scalar(-1.0);
    paged_attention_v1(&Device::Cpu, &mut out, &PagedAttentionArgs { k_scale: Some(&bad), v_scale: None, ..auto.args() }).unwrap();
}

#[test]
fn fp8_cache_dtypes_and_shapes() {
    let mut inp = fp8_base();
    let nb = num_blocks(&inp);
    // The key cache is fp8 (x = 16), the value cache must be the same fp8 kind.
    inp.value_cache = rand(ScalarType::Fp8E5m2, &[nb, NKV, HS, BS]);
    expect_err!(run(&inp), Error::DType { op: OP, tensor: "value_cache", got: ScalarType::Fp8E5m2, .. });
    inp.value_cache = rand(ScalarType::F16, &[nb, NKV, HS, BS]);
    expect_err!(run(&inp), Error::DType { op: OP, tensor: "value_cache", got: ScalarType::F16, .. });
    // An fp8 key cache with the f16 x (8) is a shape error naming x = 16.
    let mut inp = fp8_base();
    inp.key_cache = rand(ScalarType::Fp8E4m3, &[nb, NKV, HS / 8, BS, 8]);
    expect_err!(run(&inp), Error::Shape { tensor: "key_cache", expected, .. } => assert!(expected.contains("16]"), "{expected}"));
    // Head size 120 has no fp8 layout (120 / 16 is not whole).
    let c = Case { head_size: 120, ..base_case() };
    let mut inp = c.inputs().unwrap();
    inp.key_cache = rand(ScalarType::Fp8E4m3, &[nb, NKV, 8, BS, 15]);
    inp.value_cache = rand(ScalarType::Fp8E4m3, &[nb, NKV, 120, BS]);
    inp.kv_scales = fp8_base().kv_scales;
    expect_err!(run(&inp), Error::Unsupported { op: OP, what: "head_size (fp8 cache)", .. });
}

#[test]
fn blocksparse_parameters_are_checked() {
    let inp = base();
    let mut out = Tensor::nan(inp.query.dtype(), inp.query.shape());
    let with = |b: BlockSparse| PagedAttentionArgs { blocksparse: Some(b), ..inp.args() };
    let ok = BlockSparse { tp_rank: 0, local_blocks: 1, vert_stride: 2, block_size: 2 * BS as u32, head_sliding_step: 1 };
    paged_attention_v1(&Device::Cpu, &mut out, &with(ok)).unwrap();
    assert!(out.to_f64_vec().iter().all(|v| v.is_finite()));
    for bad_size in [0, BS as u32 / 2, BS as u32 + 1] {
        expect_err!(
            paged_attention_v1(&Device::Cpu, &mut out, &with(BlockSparse { block_size: bad_size, ..ok })),
            Error::Value { op: OP, what: "blocksparse.block_size", .. }
        );
    }
    expect_err!(
        paged_attention_v1(&Device::Cpu, &mut out, &with(BlockSparse { local_blocks: 0, ..ok })),
        Error::Value { op: OP, what: "blocksparse.local_blocks", .. }
    );
    // vert_stride <= 1 is dense: the other fields are not used, so not checked.
    for vert_stride in [0, 1] {
        paged_attention_v1(&Device::Cpu, &mut out, &with(BlockSparse { vert_stride, block_size: 0, local_blocks: 0, ..ok })).unwrap();
    }
}

/// The fuzz harness (`pagedattn::testing::fuzz`, also `cargo fuzz run ops`) over its seed corpus
/// (`fuzz/corpus/ops`) and 20,000 seeded random inputs: every op call returns a typed error or a
/// result with the op's property, block-manager sequences keep their counts; never a panic. Both
/// outcomes must occur for every op, so the harness reaches past validation.
#[test]
fn fuzz_corpus_and_random_inputs() {
    use pagedattn::testing::fuzz::{Outcome, run};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/ops");
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir).unwrap().map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
    assert!(inputs.len() >= 40, "seed corpus at {} has {} files", dir.display(), inputs.len());
    let mut rng = Rng::new(99);
    for i in 0..20_000 {
        let len = rng.below(if i % 4 == 0 { 40 } else { 400 });
        let mut data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if let Some(first) = data.first_mut() {
            *first = (i % 6) as u8;
        }
        inputs.push(data);
    }
    let mut counts = [[0usize; 2]; 6];
    for data in &inputs {
        let op = data.first().map_or(0, |b| (b % 6) as usize);
        let out = std::panic::catch_unwind(|| run(data)).unwrap_or_else(|_| panic!("fuzz input {data:?} panicked"));
        counts[op][(out == Outcome::Rejected) as usize] += 1;
    }
    for (op, [acc, rej]) in counts.iter().enumerate() {
        assert!(*acc > 20 && *rej > 20, "op {op}: {acc} accepted, {rej} rejected: the harness does not reach both outcomes");
    }
    common::note(&format!("fuzz_corpus_and_random_inputs: {} inputs, (accepted, rejected) per op {counts:?}", inputs.len()));
}
