//! CPU reference of the KV-cache ops, written naively: every element is addressed by its
//! multi-index in the documented shapes through the tensors' own strides (none of the kernels'
//! offset functions or byte spans are reused). A cache write is a bit copy, so elements move as raw
//! bits, NaN payloads included. Every op reads all its sources before it writes, so each copy sees
//! the original contents.

use crate::cache::{CacheLayout, CopyBlocksPlan, ReshapePlan, SwapBlocksPlan};
use crate::error::Result;
use crate::tensor::Tensor;

/// The raw bits of element `idx` of a host tensor.
fn get_bits(t: &Tensor, idx: &[usize]) -> u64 {
    let es = t.dtype().size_bytes();
    let at = t.storage_index(idx) * es;
    let b = t.cpu_bytes().expect("validated: host tensor");
    let mut v = [0u8; 8];
    v[..es].copy_from_slice(&b[at..at + es]);
    u64::from_le_bytes(v)
}

/// Stores raw bits into element `idx` of a host tensor.
fn set_bits(t: &mut Tensor, idx: &[usize], bits: u64) {
    let es = t.dtype().size_bytes();
    let at = t.storage_index(idx) * es;
    let b = t.cpu_bytes_mut().expect("validated: host tensor");
    b[at..at + es].copy_from_slice(&bits.to_le_bytes()[..es]);
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
/// `value_cache[b][h][d][o]` or `value_cache[b][o][h][d]`. `slots` were validated.
pub fn reshape_and_cache(
    plan: &ReshapePlan,
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut Tensor,
    value_cache: &mut Tensor,
    slots: &[i64],
) -> Result<()> {
    let (bs, x) = (plan.block_size, plan.dtype.x());
    let mut key_writes = Vec::new();
    let mut value_writes = Vec::new();
    for (t, &s) in slots.iter().enumerate().take(plan.num_tokens) {
        if s < 0 {
            continue;
        }
        let (b, o) = (s as usize / bs, s as usize % bs);
        for h in 0..plan.num_kv_heads {
            for d in 0..plan.head_size {
                let (k_at, v_at) = match plan.layout {
                    CacheLayout::Vllm => (vec![b, h, d / x, o, d % x], vec![b, h, d, o]),
                    CacheLayout::Flash => (vec![b, o, h, d], vec![b, o, h, d]),
                };
                key_writes.push((k_at, get_bits(key, &[t, h, d])));
                value_writes.push((v_at, get_bits(value, &[t, h, d])));
            }
        }
    }
    for (at, bits) in key_writes {
        set_bits(key_cache, &at, bits);
    }
    for (at, bits) in value_writes {
        set_bits(value_cache, &at, bits);
    }
    Ok(())
}

/// Copies block `pairs[i][0]` of `src` to block `pairs[i][1]` of `dst` for every pair, element by
/// element (reads first).
fn copy_pairs(src: &Tensor, dst: &mut Tensor, pairs: &[i64]) {
    let inner = indices(&src.shape()[1..]);
    let mut writes = Vec::with_capacity(pairs.len() / 2 * inner.len());
    for p in pairs.chunks_exact(2) {
        let (from, to) = (p[0] as usize, p[1] as usize);
        for idx in &inner {
            let s: Vec<usize> = std::iter::once(from).chain(idx.iter().copied()).collect();
            let d: Vec<usize> = std::iter::once(to).chain(idx.iter().copied()).collect();
            writes.push((d, get_bits(src, &s)));
        }
    }
    for (at, bits) in writes {
        set_bits(dst, &at, bits);
    }
}

/// `copy_blocks`: in every layer's key and value cache, block `src` is copied to block `dst` for
/// every `(src, dst)` of `pairs` (validated: in range, no chains).
pub fn copy_blocks(plan: &CopyBlocksPlan, key_caches: &mut [&mut Tensor], value_caches: &mut [&mut Tensor], pairs: &[i64]) -> Result<()> {
    for l in 0..plan.num_layers {
        for cache in [&mut *key_caches[l], &mut *value_caches[l]] {
            let snapshot = cache.to_cpu()?;
            copy_pairs(&snapshot, cache, pairs);
        }
    }
    Ok(())
}

/// `swap_blocks` between host tensors: block `src_id` of `src` to block `dst_id` of `dst`.
pub fn swap_blocks(_plan: &SwapBlocksPlan, src: &Tensor, dst: &mut Tensor, pairs: &[i64]) -> Result<()> {
    copy_pairs(src, dst, pairs);
    Ok(())
}
