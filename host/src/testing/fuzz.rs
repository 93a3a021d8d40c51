//! The fuzz harness: one input (bytes) becomes one call, with arguments drawn from the bytes, to the
//! validation layer and the CPU backend of an op, or a sequence of block-manager calls. Every call
//! must return a typed error or a result that passes the op's property; a panic (or a hang) is a
//! finding. Shared by the `cargo fuzz` target (`fuzz/fuzz_targets/ops.rs`, coverage-guided) and a
//! bounded run in the test suite over the seed corpus (`fuzz/corpus/ops`) plus random inputs.
//!
//! Inputs are contiguous or, now and then, views with random strides and offsets (padded axes, a
//! non-unit inner stride, broadcast axes). Properties of accepted calls:
//! - `paged_attention` v1/v2 (any dtype, GQA, ALiBi, fp8 caches with scales, block-sparse): the
//!   output is finite, and for dense float caches it equals a naive gather-then-attend formula
//!   written here (independent of the backend's loops);
//! - `flash_attn_varlen_func` (random `cu_seqlens_q`, `seqused_k`, tables, masks, soft-cap, ALiBi):
//!   finite output; a row without visible keys is zero with LSE `-inf`, other LSEs finite;
//! - `reshape_and_cache` / `reshape_and_cache_flash` (random and duplicate slots, padding): every
//!   slot written by exactly one token holds that token's key and value, other slots are untouched;
//! - `copy_blocks`, `swap_blocks`: every destination block equals its source as it was before the
//!   call, other blocks are untouched;
//! - the block manager: [`BlockManager::check`] holds after every call, and freeing everything
//!   returns every block.

use pagedattn_layout::{BlockSparse, DType};

use super::Rng;
use crate::block_manager::{BlockManager, BlockManagerConfig, Pool};
use crate::cache::{self, Fp8Scales};
use crate::device::Device;
use crate::flash_attn::{FlashAttnVarlenArgs, flash_attn_varlen_func};
use crate::paged_attention::{PagedAttentionArgs, PagedAttentionWorkspace, paged_attention_v1, paged_attention_v2};
use crate::tensor::{ScalarType, Tensor};

/// What a fuzz input did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The op accepted its arguments and its result passed the property.
    Accepted,
    /// The op returned a typed error.
    Rejected,
}

/// Reads bytes as small choices; past the end every read is 0 (so any input is a complete case).
/// (A `Cell` position, so that one choice can be an argument of another: `b.mostly(b.below(3), ..)`.)
struct Bytes<'a> {
    data: &'a [u8],
    pos: std::cell::Cell<usize>,
}

impl Bytes<'_> {
    fn u8(&self) -> u8 {
        let p = self.pos.get();
        self.pos.set(p + 1);
        self.data.get(p).copied().unwrap_or(0)
    }

    /// `0..n` (0 when `n` is 0).
    fn below(&self, n: usize) -> usize {
        let v = (self.u8() as usize) << 8 | self.u8() as usize;
        if n == 0 { 0 } else { v % n }
    }

    fn pick<T: Copy>(&self, options: &[T]) -> T {
        options[self.below(options.len())]
    }

    /// Mostly `usual`, sometimes an extreme from `odd`.
    fn mostly<T: Copy>(&self, usual: T, odd: &[T]) -> T {
        if self.u8() < 224 { usual } else { self.pick(odd) }
    }
}

const FLOATS: [ScalarType; 3] = [ScalarType::F32, ScalarType::F16, ScalarType::BF16];
const ANY: [ScalarType; 7] =
    [ScalarType::F32, ScalarType::F16, ScalarType::BF16, ScalarType::I32, ScalarType::I64, ScalarType::Fp8E4m3, ScalarType::Fp8E5m2];

/// A host tensor of `dtype` with uniform values in [-1, 1) (integers: small values).
fn random(dtype: ScalarType, shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
    Tensor::from_values(dtype, shape, &vals).expect("host tensors of any dtype")
}

/// Usually `t` itself; else the same values in a view with random strides and offset over a larger
/// storage: padded axes, and sometimes a non-unit inner stride or a broadcast (stride 0) axis, which
/// the ops must reject or handle. Properties read inputs through the same views.
fn restride(t: Tensor, b: &Bytes) -> Tensor {
    if b.u8() >= 72 || t.numel() == 0 {
        return t;
    }
    let shape = t.shape().to_vec();
    let n = shape.len();
    let mut strides = vec![0usize; n];
    let mut reach = 1usize;
    for i in (0..n).rev() {
        strides[i] = if i == n - 1 { b.mostly(1, &[2, 0]) } else { b.mostly(reach + b.pick(&[0, 1, 8]), &[0, reach / 2]) };
        reach = strides[i].max(1) * shape[i].max(1);
    }
    let offset = b.mostly(0, &[1, 8]);
    let len = offset + shape.iter().zip(&strides).map(|(&d, &st)| (d.max(1) - 1) * st).sum::<usize>() + 1;
    let Ok(mut view) = Tensor::nan(t.dtype(), &[len]).view(&shape, &strides, offset) else { return t };
    view.set_from_f64(&t.to_f64_vec());
    view
}

/// Runs one fuzz input. Panics when a property fails.
pub fn run(data: &[u8]) -> Outcome {
    let b = Bytes { data, pos: std::cell::Cell::new(0) };
    let op = b.u8() % 6;
    let mut rng = Rng::new(b.u8() as u64 * 257 + b.u8() as u64);
    match op {
        0 => paged_attention_case(&b, &mut rng),
        1 => varlen_case(&b, &mut rng),
        2 => reshape_case(&b, &mut rng),
        3 => copy_blocks_case(&b, &mut rng),
        4 => block_manager_case(&b),
        _ => swap_blocks_case(&b, &mut rng),
    }
}

fn outcome<T>(r: &crate::Result<T>) -> Outcome {
    if r.is_ok() { Outcome::Accepted } else { Outcome::Rejected }
}

/// Naive paged attention of one sequence and head: gather the keys and values through the table,
/// then softmax(scale · q·k + ALiBi)·V in f64 (dense float caches).
fn naive_paged(a: &PagedAttentionArgs, s: usize, h: usize) -> Vec<f64> {
    let (kc, vc) = (a.key_cache, a.value_cache);
    let (nh, hs) = (a.query.shape()[1], a.query.shape()[2]);
    let (nkv, x, bs) = (kc.shape()[1], kc.shape()[4], kc.shape()[3]);
    let kh = h / (nh / nkv);
    let len = a.seq_lens.get_f64(&[s]) as usize;
    let q: Vec<f64> = (0..hs).map(|d| a.query.get_f64(&[s, h, d])).collect();
    let slope = a.alibi_slopes.map_or(0.0, |t| t.get_f64(&[h]));
    let mut scores = Vec::with_capacity(len);
    let mut values = Vec::with_capacity(len);
    for t in 0..len {
        let blk = a.block_tables.get_f64(&[s, t / bs]) as usize;
        let k: f64 = (0..hs).map(|d| q[d] * kc.get_f64(&[blk, kh, d / x, t % bs, d % x])).sum();
        scores.push(a.scale as f64 * k + slope * (t as f64 - len as f64 + 1.0));
        values.push((0..hs).map(|d| vc.get_f64(&[blk, kh, d, t % bs])).collect::<Vec<f64>>());
    }
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|v| (v - m).exp()).collect();
    let z: f64 = w.iter().sum();
    (0..hs).map(|d| if len == 0 { 0.0 } else { w.iter().zip(&values).map(|(w, v)| w * v[d]).sum::<f64>() / z }).collect()
}

fn paged_attention_case(b: &Bytes, rng: &mut Rng) -> Outcome {
    let dtype = b.pick(&FLOATS);
    let fp8 = b.u8() < 40;
    let cache_dtype = if fp8 { b.pick(&[ScalarType::Fp8E4m3, ScalarType::Fp8E5m2]) } else { b.mostly(dtype, &ANY) };
    let nkv = b.mostly(1 + b.below(3), &[0, 3, 5]);
    let nh = b.mostly(nkv * (1 + b.below(3)), &[0, 1, 7]);
    let hs = b.mostly(b.pick(&[32, 64, 80, 128]), &[0, 1, 48, 512, 33]);
    let x = b.mostly(16 / cache_dtype.size_bytes(), &[0, 1, 3, 16]);
    let bs = b.mostly(b.pick(&[8, 16, 32]), &[0, 1, 7, 512]);
    let ns = b.mostly(1 + b.below(4), &[0, 9]);
    let m = b.mostly(1 + b.below(4), &[0, 1]);
    let nb = b.mostly(1 + b.below(8), &[0, 1]);
    let query = restride(random(b.mostly(dtype, &ANY), &[ns, nh, b.mostly(hs, &[0, hs + 1])], rng), b);
    let key_cache = restride(random(cache_dtype, &[nb, nkv, hs.checked_div(x).unwrap_or(0), bs, x], rng), b);
    let value_cache = restride(random(cache_dtype, &[nb, b.mostly(nkv, &[nkv + 1]), hs, b.mostly(bs, &[bs + 1])], rng), b);
    let table: Vec<i32> = (0..ns * m).map(|_| b.mostly(b.below(nb.max(1)) as i32, &[-1, nb as i32, i32::MIN, i32::MAX])).collect();
    let block_tables = Tensor::from_i32(&[ns, m], &table).expect("shape");
    let cap = (m * bs) as i32;
    let lns = b.mostly(ns, &[ns + 1, 0]);
    let lens: Vec<i32> = (0..lns).map(|_| b.mostly(b.below(m * bs + 1) as i32, &[-1, cap + 1, i32::MAX, 0])).collect();
    let seq_lens = Tensor::from_i32(&[lns], &lens).expect("shape");
    let alibi = (b.u8() < 64).then(|| random(ScalarType::F32, &[b.mostly(nh, &[nh + 1])], rng));
    let scale = b.mostly(0.125f32, &[0.0, f32::NAN, f32::INFINITY, -1.0, 1e30]);
    let scale_value = |b: &Bytes| b.mostly(0.05f32, &[0.0, f32::NAN, f32::INFINITY, -1.0]);
    let (ks, vs) = (
        Tensor::from_f32(DType::F32, &[1], &[scale_value(b)]).expect("1"),
        Tensor::from_f32(DType::F32, &[1], &[scale_value(b)]).expect("1"),
    );
    let blocksparse = (b.u8() < 32).then(|| BlockSparse {
        tp_rank: b.below(3) as u32,
        local_blocks: b.below(4) as u32,
        vert_stride: b.below(5) as u32,
        block_size: b.pick(&[0, 8, 16, 24, 64]),
        head_sliding_step: b.pick(&[-2, -1, 0, 1, 3]),
    });
    let args = PagedAttentionArgs {
        query: &query,
        key_cache: &key_cache,
        value_cache: &value_cache,
        block_tables: &block_tables,
        seq_lens: &seq_lens,
        scale,
        alibi_slopes: alibi.as_ref(),
        k_scale: (fp8 || b.u8() < 16).then_some(&ks),
        v_scale: (fp8 || b.u8() < 16).then_some(&vs),
        blocksparse,
    };
    let mut out = Tensor::nan(b.mostly(dtype, &ANY), &[b.mostly(ns, &[ns + 1]), nh, hs]);
    let res = if b.u8() < 128 {
        paged_attention_v1(&Device::Cpu, &mut out, &args)
    } else {
        let bound = b.mostly(m * bs, &[0, 1]);
        PagedAttentionWorkspace::new(&Device::Cpu, ns, nh, hs, bound)
            .and_then(|mut ws| paged_attention_v2(&Device::Cpu, &mut out, &args, &mut ws))
    };
    if res.is_ok() {
        let got = out.to_f64_vec();
        assert!(got.iter().all(|v| v.is_finite()), "paged attention accepted arguments and gave a non-finite output");
        let dense = !fp8 && blocksparse.is_none_or(|s| !s.is_sparse()) && cache_dtype.float().is_some();
        if dense {
            for s in 0..ns {
                for h in 0..nh {
                    let want = naive_paged(&args, s, h);
                    for (d, w) in want.iter().enumerate() {
                        let g = got[(s * nh + h) * hs + d];
                        let tol = match out.dtype() {
                            ScalarType::F32 => 1e-5,
                            ScalarType::F16 => 2e-3,
                            _ => 1.6e-2,
                        };
                        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "paged attention: seq {s} head {h} dim {d}: {g} vs naive {w}");
                    }
                }
            }
        }
    }
    outcome(&res)
}

fn varlen_case(b: &Bytes, rng: &mut Rng) -> Outcome {
    let dtype = b.mostly(b.pick(&[ScalarType::F16, ScalarType::BF16]), &ANY);
    let nkv = b.mostly(1 + b.below(2), &[0, 3]);
    let nh = b.mostly(nkv * (1 + b.below(3)), &[0, 5]);
    let hs = b.mostly(b.pick(&[32, 64, 128]), &[0, 8, 40, 512]);
    let bs = b.mostly(b.pick(&[8, 16]), &[0, 1, 3]);
    let batch = b.mostly(1 + b.below(4), &[0]);
    let m = b.mostly(1 + b.below(4), &[0]);
    let nb = b.mostly(1 + b.below(8), &[0]);
    let mut cu = vec![0i32];
    for _ in 0..batch {
        let next = cu.last().copied().unwrap_or(0) + b.mostly(b.below(6) as i32, &[-3, 1000]);
        cu.push(next);
    }
    let total_q = b.mostly(cu.last().copied().unwrap_or(0).max(0) as usize, &[0, 3]);
    let used: Vec<i32> = (0..batch).map(|_| b.mostly(b.below(m * bs + 1) as i32, &[-1, (m * bs + 1) as i32, i32::MAX])).collect();
    let table: Vec<i32> = (0..batch * m).map(|_| b.mostly(b.below(nb.max(1)) as i32, &[-1, nb as i32, i32::MIN])).collect();
    let q = restride(random(dtype, &[total_q, nh, hs], rng), b);
    let k = restride(random(dtype, &[nb, bs, nkv, hs], rng), b);
    let v = restride(random(b.mostly(dtype, &ANY), &[nb, bs, nkv, hs], rng), b);
    let cu_len = b.mostly(cu.len(), &[0, 1]).min(cu.len());
    let cu_t = Tensor::from_i32(&[cu_len], &cu[..cu_len]).expect("shape");
    let used_t = Tensor::from_i32(&[batch], &used).expect("shape");
    let table_t = Tensor::from_i32(&[batch, m], &table).expect("shape");
    let alibi = (b.u8() < 48).then(|| random(ScalarType::F32, &[b.mostly(nh, &[nh + 1])], rng));
    let window = (b.mostly(-1, &[-2, 0, 5, i32::MIN, i32::MAX]), b.mostly(-1, &[-2, 0, 3, i32::MAX]));
    let args = FlashAttnVarlenArgs {
        q: &q,
        k: &k,
        v: &v,
        max_seqlen_q: b.mostly(cu.windows(2).map(|w| (w[1] - w[0]).max(0) as usize).max().unwrap_or(0), &[0, 1, usize::MAX]),
        cu_seqlens_q: &cu_t,
        max_seqlen_k: b.mostly(m * bs, &[0, 1, usize::MAX]),
        seqused_k: &used_t,
        softmax_scale: b.mostly(None, &[Some(0.0), Some(f32::NAN), Some(-1.0), Some(f32::INFINITY)]),
        causal: b.u8() < 128,
        window_size: window,
        softcap: b.mostly(0.0, &[-1.0, f32::NAN, f32::INFINITY, 1e-30, 30.0]),
        alibi_slopes: alibi.as_ref(),
        block_table: &table_t,
    };
    let mut out = Tensor::nan(b.mostly(q.dtype(), &ANY), &[total_q, nh, hs]);
    let mut lse = Tensor::nan(ScalarType::F32, &[nh, total_q]);
    let res = flash_attn_varlen_func(&Device::Cpu, &mut out, Some(&mut lse), &args);
    if res.is_ok() {
        let (o, l) = (out.to_f64_vec(), lse.to_f64_vec());
        assert!(o.iter().all(|v| v.is_finite()), "varlen accepted arguments and gave a non-finite output");
        for t in 0..total_q {
            for h in 0..nh {
                let row = &o[(t * nh + h) * hs..][..hs];
                let lse = l[h * total_q + t];
                assert!(
                    lse.is_finite() || (lse == f64::NEG_INFINITY && row.iter().all(|&v| v == 0.0)),
                    "varlen row {t} head {h}: LSE {lse}"
                );
            }
        }
    }
    outcome(&res)
}

fn reshape_case(b: &Bytes, rng: &mut Rng) -> Outcome {
    let flash = b.u8() < 128;
    let dtype = b.mostly(b.pick(&FLOATS), &ANY);
    let cache_dtype = b.mostly(dtype, &ANY);
    let (nkv, hs, bs, nb) = (
        b.mostly(1 + b.below(3), &[0]),
        b.mostly(b.pick(&[16, 32, 64]), &[0, 8, 24]),
        b.mostly(b.pick(&[4, 8, 16]), &[0, 1]),
        b.mostly(1 + b.below(4), &[0]),
    );
    let tokens = b.mostly(b.below(12), &[0, 40]);
    let x = 16 / cache_dtype.size_bytes();
    let (ks, vs) = if flash {
        (vec![nb, bs, nkv, hs], vec![nb, bs, nkv, hs])
    } else {
        (vec![nb, nkv, hs.checked_div(x).unwrap_or(0), bs, x], vec![nb, nkv, hs, bs])
    };
    let key = restride(random(dtype, &[tokens, nkv, hs], rng), b);
    let value = restride(random(b.mostly(dtype, &ANY), &[tokens, nkv, hs], rng), b);
    let mut kc = restride(random(cache_dtype, &ks, rng), b);
    let mut vc = restride(random(cache_dtype, &vs, rng), b);
    let v0 = vc.to_f64_vec();
    let total = (nb * bs) as i64;
    let slots: Vec<i64> = (0..tokens).map(|_| b.mostly(b.below(total.max(1) as usize) as i64, &[-1, total, i64::MIN, 0])).collect();
    let slot_t = Tensor::from_i64(&[tokens], &slots).expect("shape");
    let one = Tensor::from_f32(DType::F32, &[1], &[b.mostly(1.0f32, &[0.0, f32::NAN])]).expect("1");
    let fp8 = cache_dtype.fp8().is_some();
    let res = match (flash, fp8) {
        (false, false) => cache::reshape_and_cache(&Device::Cpu, &key, &value, &mut kc, &mut vc, &slot_t),
        (true, false) => cache::reshape_and_cache_flash(&Device::Cpu, &key, &value, &mut kc, &mut vc, &slot_t),
        (false, true) => {
            cache::reshape_and_cache_fp8(&Device::Cpu, &key, &value, &mut kc, &mut vc, &slot_t, Fp8Scales { k_scale: &one, v_scale: &one })
        }
        (true, true) => cache::reshape_and_cache_flash_fp8(
            &Device::Cpu,
            &key,
            &value,
            &mut kc,
            &mut vc,
            &slot_t,
            Fp8Scales { k_scale: &one, v_scale: &one },
        ),
    };
    if res.is_ok() {
        // Accepted host slots are in range and distinct (or negative padding).
        let (k1, v1) = (kc.to_f64_vec(), vc.to_f64_vec());
        let (kin, vin) = (key.to_f64_vec(), value.to_f64_vec());
        let round = |v: f64| {
            let mut t = Tensor::nan(cache_dtype, &[1]);
            t.set_from_f64(&[v]);
            t.to_f64_vec()[0]
        };
        let mut written = vec![false; (nb * bs).max(1)];
        for (t, &s) in slots.iter().enumerate() {
            if s < 0 {
                continue;
            }
            let (blk, off) = (s as usize / bs, s as usize % bs);
            written[s as usize] = true;
            for h in 0..nkv {
                for d in 0..hs {
                    let (ki, vi) = if flash {
                        (((blk * bs + off) * nkv + h) * hs + d, ((blk * bs + off) * nkv + h) * hs + d)
                    } else {
                        ((((blk * nkv + h) * (hs / x) + d / x) * bs + off) * x + d % x, ((blk * nkv + h) * hs + d) * bs + off)
                    };
                    let (wk, wv) = (round(kin[(t * nkv + h) * hs + d]), round(vin[(t * nkv + h) * hs + d]));
                    assert!(
                        same(k1[ki], wk) && same(v1[vi], wv),
                        "reshape: slot {s} head {h} dim {d}: cache {} / {}, token {wk} / {wv}",
                        k1[ki],
                        v1[vi]
                    );
                }
            }
        }
        // Slots no token wrote keep their old values.
        for s in (0..nb * bs).filter(|&s| !written[s]) {
            let (blk, off) = (s / bs, s % bs);
            for h in 0..nkv {
                for d in 0..hs {
                    let vi = if flash { ((blk * bs + off) * nkv + h) * hs + d } else { ((blk * nkv + h) * hs + d) * bs + off };
                    assert!(same(v1[vi], v0[vi]), "reshape: slot {s} was not written but changed");
                }
            }
        }
    }
    outcome(&res)
}

/// Equal, or both NaN.
fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

fn copy_blocks_case(b: &Bytes, rng: &mut Rng) -> Outcome {
    let layers = b.mostly(1 + b.below(3), &[0]);
    let dtype = b.pick(&FLOATS);
    let nb = b.mostly(2 + b.below(6), &[0, 1]);
    let block = b.mostly(b.pick(&[8usize, 16, 32]), &[0, 3, 5]);
    let mut keys: Vec<Tensor> = (0..layers).map(|_| random(dtype, &[nb, block], rng)).collect();
    let mut values: Vec<Tensor> = (0..layers).map(|_| random(b.mostly(dtype, &ANY), &[nb, block], rng)).collect();
    let before: Vec<Vec<f64>> = keys.iter().map(Tensor::to_f64_vec).collect();
    let pairs = b.mostly(b.below(5), &[0, 9]);
    let map: Vec<i64> = (0..2 * pairs).map(|_| b.mostly(b.below(nb.max(1)) as i64, &[-1, nb as i64, i64::MAX])).collect();
    let mapping = Tensor::from_i64(&[pairs, 2], &map).expect("shape");
    let (mut kr, mut vr): (Vec<&mut Tensor>, Vec<&mut Tensor>) = (keys.iter_mut().collect(), values.iter_mut().collect());
    let res = cache::copy_blocks(&Device::Cpu, &mut kr, &mut vr, &mapping);
    // (With no layers there is nothing to copy and no block count to check ids against: a no-op.)
    if res.is_ok() && layers > 0 {
        let mut dst_of = vec![None; nb];
        for p in map.chunks(2) {
            dst_of[p[1] as usize] = Some(p[0] as usize);
        }
        for (l, k) in keys.iter().enumerate() {
            let after = k.to_f64_vec();
            for (blk, src) in dst_of.iter().enumerate() {
                let from = src.unwrap_or(blk);
                assert!(
                    after[blk * block..][..block].iter().zip(&before[l][from * block..][..block]).all(|(a, b)| same(*a, *b)),
                    "copy_blocks: layer {l} block {blk} (source {from})"
                );
            }
        }
    }
    outcome(&res)
}

fn block_manager_case(b: &Bytes) -> Outcome {
    let config = BlockManagerConfig {
        num_gpu_blocks: b.below(12),
        num_cpu_blocks: b.below(8),
        block_size: 1 + b.below(5),
        prefix_caching: b.u8() < 128,
    };
    let mut bm = BlockManager::new(config);
    let (mut next, mut refused) = (0u64, 0usize);
    for _ in 0..b.below(64) {
        let ids: Vec<u64> = {
            let mut v: Vec<u64> = bm.seq_ids().collect();
            v.sort_unstable();
            v
        };
        let seq = if ids.is_empty() || b.u8() < 16 { 1000 } else { ids[b.below(ids.len())] };
        let r = match b.u8() % 6 {
            0 => {
                next += 1;
                let prompt: Vec<u32> = (0..b.below(20)).map(|_| b.below(4) as u32).collect();
                bm.add_sequence(next, &prompt).map(drop)
            }
            1 => bm.append_token(seq, b.below(4) as u32).map(drop),
            2 => {
                next += 1;
                bm.fork(seq, next)
            }
            3 => bm.free(seq),
            4 => bm.swap_out(seq).map(drop),
            _ => bm.swap_in(seq).map(drop),
        };
        refused += r.is_err() as usize;
        if let Err(e) = bm.check() {
            panic!("block manager bookkeeping broken after {r:?}: {e}");
        }
    }
    let ids: Vec<u64> = bm.seq_ids().collect();
    for id in ids {
        bm.free(id).expect("known");
    }
    assert_eq!((bm.num_free(Pool::Gpu), bm.num_free(Pool::Cpu)), (config.num_gpu_blocks, config.num_cpu_blocks), "blocks leaked");
    if refused > 0 { Outcome::Rejected } else { Outcome::Accepted }
}

fn swap_blocks_case(b: &Bytes, rng: &mut Rng) -> Outcome {
    let dtype = b.pick(&ANY);
    let (ns, nd) = (b.mostly(1 + b.below(6), &[0]), b.mostly(1 + b.below(6), &[0]));
    let inner = [b.mostly(2usize, &[0, 3]), b.mostly(16usize, &[1, 7])];
    let src = restride(random(dtype, &[ns, inner[0], inner[1]], rng), b);
    let mut dst = random(b.mostly(dtype, &ANY), &[nd, b.mostly(inner[0], &[inner[0] + 1]), inner[1]], rng);
    let before = dst.to_f64_vec();
    let pairs = b.mostly(b.below(5), &[0, 8]);
    let map: Vec<i64> =
        (0..pairs).flat_map(|_| [b.below(ns.max(1)) as i64, b.below(nd.max(1)) as i64]).map(|v| b.mostly(v, &[-1, 99, i64::MIN])).collect();
    let mapping = Tensor::from_i64(&[pairs, 2], &map).expect("shape");
    let res = cache::swap_blocks(&Device::Cpu, &src, &mut dst, &mapping);
    if res.is_ok() && pairs > 0 {
        let (s, d) = (src.to_f64_vec(), dst.to_f64_vec());
        let block = inner[0] * inner[1];
        let mut from = vec![None; nd];
        for p in map.chunks(2) {
            from[p[1] as usize] = Some(p[0] as usize);
        }
        for (blk, f) in from.iter().enumerate() {
            let want = match f {
                Some(f) => &s[f * block..][..block],
                None => &before[blk * block..][..block],
            };
            assert!(
                d[blk * block..][..block].iter().zip(want).all(|(a, b)| same(*a, *b)),
                "swap_blocks: destination block {blk} (source {f:?})"
            );
        }
    }
    outcome(&res)
}
