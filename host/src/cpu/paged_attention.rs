//! CPU reference of `paged_attention_v1`, written naively in f64: gather each sequence's keys and
//! values through the block table (honouring the tensors' strides), then a dense softmax. It shares
//! none of the kernel's tiling, so it is the oracle the GPU is tested against.

use crate::error::Result;
use crate::paged_attention::{PagedAttentionArgs, Plan};
use crate::tensor::Tensor;

/// The exact (f64) result, `[num_seqs, num_heads, head_size]` row-major, from inputs already
/// validated into `plan` (CPU tensors).
pub fn reference(plan: &Plan, a: &PagedAttentionArgs) -> Vec<f64> {
    let (hs, bs, x) = (plan.head_size, plan.block_size, plan.dtype.x());
    let group = plan.num_heads / plan.num_kv_heads;
    let block_tables = a.block_tables.to_i32_vec();
    let seq_lens = a.seq_lens.to_i32_vec();
    let alibi = a.alibi_slopes.map(Tensor::to_f64_vec);
    let query = a.query.to_f64_vec();
    // One read lock per cache for the whole gather; a combined KV cache (two views of one storage) is
    // read through one guard, since a second lock of it on this thread could wait behind a writer.
    let (kc, vc) = (a.key_cache, a.value_cache);
    let key_bytes = kc.cpu_bytes().expect("validated: host tensors");
    let value_guard = (!vc.shares_storage(kc)).then(|| vc.cpu_bytes().expect("validated: host tensors"));
    let value_bytes: &[u8] = value_guard.as_deref().unwrap_or(&key_bytes);
    let mut out = vec![0f64; plan.num_seqs * plan.num_heads * hs];
    for s in 0..plan.num_seqs {
        let len = seq_lens[s] as usize;
        let block_of = |t: usize| block_tables[s * plan.max_num_blocks_per_seq + t / bs] as usize;
        for h in 0..plan.num_heads {
            let kvh = h / group;
            let q = &query[(s * plan.num_heads + h) * hs..][..hs];
            let key = |t: usize, d: usize| kc.dtype().read_f64(&key_bytes, kc.storage_index(&[block_of(t), kvh, d / x, t % bs, d % x]));
            let value = |t: usize, d: usize| vc.dtype().read_f64(value_bytes, vc.storage_index(&[block_of(t), kvh, d, t % bs]));
            let scores: Vec<f64> = (0..len)
                .map(|t| {
                    let dot: f64 = (0..hs).map(|d| q[d] * key(t, d)).sum();
                    let bias = alibi.as_ref().map_or(0.0, |sl| sl[h] * (t as f64 - len as f64 + 1.0));
                    a.scale as f64 * dot + bias
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            let o = &mut out[(s * plan.num_heads + h) * hs..][..hs];
            for (t, w) in weights.iter().enumerate() {
                for (d, od) in o.iter_mut().enumerate() {
                    *od += w * value(t, d);
                }
            }
            if sum > 0.0 {
                o.iter_mut().for_each(|v| *v /= sum);
            }
        }
    }
    out
}

/// The CPU backend's op: the reference, rounded into `out`'s dtype and strides.
pub fn run(plan: &Plan, out: &mut Tensor, a: &PagedAttentionArgs) -> Result<()> {
    let r = reference(plan, a);
    let hs = plan.head_size;
    let (dtype, offset, st) = (out.dtype(), out.offset(), out.strides().to_vec());
    // One write lock for all stores, taken after every input has been read (inputs may share storage).
    let mut b = out.cpu_bytes_mut().expect("validated: a host tensor");
    for s in 0..plan.num_seqs {
        for h in 0..plan.num_heads {
            for d in 0..hs {
                dtype.write_f64(&mut b, offset + s * st[0] + h * st[1] + d * st[2], r[(s * plan.num_heads + h) * hs + d]);
            }
        }
    }
    Ok(())
}
