//! CPU reference of the KV-cache ops, written naively: every element is addressed by its
//! multi-index in the documented shapes through the tensors' own strides (none of the kernels'
//! offset functions or byte spans are reused). A cache write is a bit copy, so elements move as raw
//! bits, NaN payloads included. Every op reads all its sources before it writes, so each copy sees
//! the original contents.

use pagedattn_layout::KvCacheDType;

use crate::cache::{CacheLayout, CopyBlocksPlan, Fp8Scales, ReshapePlan, SwapBlocksPlan};
use crate::error::Result;
use crate::tensor::Tensor;

/// The raw bits of the storage elements `at` of a host tensor (under one read lock).
fn read_bits(t: &Tensor, at: &[usize]) -> Vec<u64> {
    let es = t.dtype().size_bytes();
    let b = t.cpu_bytes().expect("validated: host tensor");
    at.iter()
        .map(|&i| {
            let mut v = [0u8; 8];
            v[..es].copy_from_slice(&b[i * es..(i + 1) * es]);
            u64::from_le_bytes(v)
        })
        .collect()
}

/// Stores raw bits into storage elements of a host tensor (under one write lock).
fn write_bits(t: &mut Tensor, at: &[usize], bits: &[u64]) {
    let es = t.dtype().size_bytes();
    let mut b = t.cpu_bytes_mut().expect("validated: host tensor");
    for (&i, v) in at.iter().zip(bits) {
        b[i * es..(i + 1) * es].copy_from_slice(&v.to_le_bytes()[..es]);
    }
}

/// Every multi-index of `shape`, row-major.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        out.push(idx.clone());
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// `reshape_and_cache` / `reshape_and_cache_flash`: for every token `t` with a slot `s >= 0`,
/// `key[t][h][d]` goes to `key_cache[s / block_size][h][d / x][s % block_size][d % x]` (vLLM layout)
/// or `key_cache[s / block_size][s % block_size][h][d]` (flash layout), and likewise the value to
/// `value_cache[b][h][d][o]` or `value_cache[b][o][h][d]`. `slots` were validated. An fp8 cache
/// gets `encode(x / scale)` of the input's exact value (f32 division, then round to nearest even,
/// saturating), otherwise the input's bits.
pub fn reshape_and_cache(
    plan: &ReshapePlan,
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut Tensor,
    value_cache: &mut Tensor,
    slots: &[i64],
    scales: Option<Fp8Scales>,
) -> Result<()> {
    let (bs, x) = (plan.block_size, plan.cache.x(plan.dtype));
    // Storage indices: (key, key_cache) and (value, value_cache) of every element written.
    let (mut k_src, mut k_dst, mut v_src, mut v_dst) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (t, &s) in slots.iter().enumerate().take(plan.num_tokens) {
        if s < 0 {
            continue;
        }
        let (b, o) = (s as usize / bs, s as usize % bs);
        for h in 0..plan.num_kv_heads {
            for d in 0..plan.head_size {
                let (k_at, v_at) = match plan.layout {
                    CacheLayout::Vllm => (key_cache.storage_index(&[b, h, d / x, o, d % x]), value_cache.storage_index(&[b, h, d, o])),
                    CacheLayout::Flash => (key_cache.storage_index(&[b, o, h, d]), value_cache.storage_index(&[b, o, h, d])),
                };
                k_src.push(key.storage_index(&[t, h, d]));
                v_src.push(value.storage_index(&[t, h, d]));
                k_dst.push(k_at);
                v_dst.push(v_at);
            }
        }
    }
    if let KvCacheDType::Fp8(kind) = plan.cache {
        let sc = scales.expect("validated: fp8 caches come with scales");
        let scale = |t: &Tensor| t.to_f64_vec()[0] as f32;
        let quantize = |src: &Tensor, at: &[usize], s: f32| -> Vec<u64> {
            let b = src.cpu_bytes().expect("validated: host tensor");
            at.iter().map(|&i| kind.encode(src.dtype().read_f64(&b, i) as f32 / s) as u64).collect()
        };
        let (k_codes, v_codes) = (quantize(key, &k_src, scale(sc.k_scale)), quantize(value, &v_src, scale(sc.v_scale)));
        write_bits(key_cache, &k_dst, &k_codes);
        write_bits(value_cache, &v_dst, &v_codes);
        return Ok(());
    }
    let (k_bits, v_bits) = (read_bits(key, &k_src), read_bits(value, &v_src));
    write_bits(key_cache, &k_dst, &k_bits);
    write_bits(value_cache, &v_dst, &v_bits);
    Ok(())
}

/// Copies block `pairs[i][0]` of `src` to block `pairs[i][1]` of `dst` for every pair, element by
/// element (reads first).
fn copy_pairs(src: &Tensor, dst: &mut Tensor, pairs: &[i64]) {
    let inner = indices(&src.shape()[1..]);
    let (mut from, mut to) = (Vec::new(), Vec::new());
    for p in pairs.chunks_exact(2) {
        for idx in &inner {
            let at = |block: i64, t: &Tensor| t.storage_index(&[&[block as usize], &idx[..]].concat());
            from.push(at(p[0], src));
            to.push(at(p[1], dst));
        }
    }
    let bits = read_bits(src, &from);
    write_bits(dst, &to, &bits);
}

/// `copy_blocks`: in every layer's key and value cache, block `src` is copied to block `dst` for
/// every `(src, dst)` of `pairs` (validated: in range, no chains).
pub fn copy_blocks(plan: &CopyBlocksPlan, key_caches: &mut [&mut Tensor], value_caches: &mut [&mut Tensor], pairs: &[i64]) -> Result<()> {
    for l in 0..plan.num_layers {
        for cache in [&mut *key_caches[l], &mut *value_caches[l]] {
            // A second view of the same storage: `copy_pairs` reads every source before it writes.
            let source = cache.alias();
            copy_pairs(&source, cache, pairs);
        }
    }
    Ok(())
}

/// `swap_blocks` between host tensors: block `src_id` of `src` to block `dst_id` of `dst`.
pub fn swap_blocks(_plan: &SwapBlocksPlan, src: &Tensor, dst: &mut Tensor, pairs: &[i64]) -> Result<()> {
    copy_pairs(src, dst, pairs);
    Ok(())
}
