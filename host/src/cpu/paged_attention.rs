//! CPU reference of `paged_attention_v1`, written naively in f64: gather each sequence's keys and
//! values through the block table (honouring the tensors' strides), then a dense softmax. It shares
//! none of the kernel's tiling, so it is the oracle the GPU is tested against.

use crate::error::Result;
use crate::paged_attention::{PagedAttentionArgs, Plan};
use crate::tensor::Tensor;
use pagedattn_layout::KvCacheDType;

/// The exact (f64) result, `[num_seqs, num_heads, head_size]` row-major, from inputs already
/// validated into `plan` (CPU tensors).
pub fn reference(plan: &Plan, a: &PagedAttentionArgs) -> Vec<f64> {
    let (hs, bs, x) = (plan.head_size, plan.block_size, plan.cache.x(plan.dtype));
    // fp8 caches: dequantize with the per-tensor scales (validated present and positive).
    let scale_of = |t: Option<&Tensor>| if plan.cache == KvCacheDType::Auto { 1.0 } else { t.expect("validated").to_f64_vec()[0] };
    let (k_scale, v_scale) = (scale_of(a.k_scale), scale_of(a.v_scale));
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
            let key =
                |t: usize, d: usize| kc.dtype().read_f64(&key_bytes, kc.storage_index(&[block_of(t), kvh, d / x, t % bs, d % x])) * k_scale;
            let value = |t: usize, d: usize| vc.dtype().read_f64(value_bytes, vc.storage_index(&[block_of(t), kvh, d, t % bs])) * v_scale;
            let scores: Vec<f64> = (0..len)
                .map(|t| {
                    if !sparse_attends(a, plan, h, t, len) {
                        return f64::NEG_INFINITY;
                    }
                    let dot: f64 = (0..hs).map(|d| q[d] * key(t, d)).sum();
                    let bias = alibi.as_ref().map_or(0.0, |sl| sl[h] * (t as f64 - len as f64 + 1.0));
                    a.scale as f64 * dot + bias
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            // Masked tokens (block-sparse) have score -inf and weight 0.
            let weights: Vec<f64> = scores.iter().map(|&s| if s == f64::NEG_INFINITY { 0.0 } else { (s - max).exp() }).collect();
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

/// vLLM's block-sparse rule, written out from its definition (i64 arithmetic, the cache block's
/// first token): does head `h` attend token `t` of a sequence of `len` tokens?
fn sparse_attends(a: &PagedAttentionArgs, plan: &Plan, h: usize, t: usize, len: usize) -> bool {
    let Some(b) = a.blocksparse.filter(|b| b.vert_stride > 1) else { return true };
    let s = b.block_size as i64;
    let q_bs = (len as i64 - 1) / s;
    let k_bs = ((t / plan.block_size) * plan.block_size) as i64 / s;
    let step = b.head_sliding_step as i64;
    let offset = if step >= 0 {
        (b.tp_rank as i64 * plan.num_heads as i64 + h as i64) * step + 1
    } else {
        let kvh = h / (plan.num_heads / plan.num_kv_heads);
        (b.tp_rank as i64 * plan.num_kv_heads as i64 + kvh as i64) * -step + 1
    };
    (k_bs + offset) % b.vert_stride as i64 == 0 || k_bs > q_bs - b.local_blocks as i64
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Case;
    use pagedattn_layout::{BlockSparse, DType, KvCacheDType};

    /// The rule on hand-worked values: cache blocks of 16, sparse blocks of 32 (two cache blocks),
    /// vertical stride 3, one local block, 4 heads over 2 KV heads, 200 tokens (q_bs = 6).
    #[test]
    fn sparse_rule_by_hand() {
        let case = Case {
            dtype: DType::F32,
            cache: KvCacheDType::Auto,
            num_heads: 4,
            num_kv_heads: 2,
            head_size: 32,
            block_size: 16,
            seq_lens: vec![200],
            alibi: false,
            blocksparse: None,
            seed: 1,
        };
        let inp = case.inputs().unwrap();
        let out = Tensor::nan(inp.query.dtype(), inp.query.shape());
        let plan = crate::paged_attention::validate(&crate::Device::Cpu, &out, &inp.args()).unwrap();
        let sparse = |step: i32, rank: u32| {
            let mut a = inp.args();
            a.blocksparse = Some(BlockSparse { tp_rank: rank, local_blocks: 1, vert_stride: 3, block_size: 32, head_sliding_step: step });
            move |h: usize, t: usize| sparse_attends(&a, &plan, h, t, 200)
        };
        // step 1, rank 0: head h has offset h + 1; sparse block k is kept when (k + h + 1) % 3 == 0,
        // and block 6 (tokens 192..200) always.
        let f = sparse(1, 0);
        let kept = |h: usize| (0..7).filter(|&k| f(h, 32 * k)).collect::<Vec<_>>();
        assert_eq!(kept(0), [2, 5, 6]);
        assert_eq!(kept(1), [1, 4, 6]);
        assert_eq!(kept(2), [0, 3, 6]);
        assert_eq!(kept(3), [2, 5, 6]);
        // Every token of a sparse block shares its fate (token 70 is in block 2).
        assert!(f(0, 64) && f(0, 70) && f(0, 95) && !f(0, 96));
        // step -2, rank 1: per KV head, offset (2 + kvh) * 2 + 1 = 5 or 7.
        let f = sparse(-2, 1);
        let kept = |h: usize| (0..7).filter(|&k| f(h, 32 * k)).collect::<Vec<_>>();
        assert_eq!(kept(0), [1, 4, 6]);
        assert_eq!(kept(1), [1, 4, 6]);
        assert_eq!(kept(2), [2, 5, 6]);
        // The kernels' form (residue per head) agrees with the rule everywhere.
        for (step, rank) in [(1, 0), (-2, 1), (0, 0), (5, 3), (-1, 2)] {
            let b = BlockSparse { tp_rank: rank, local_blocks: 1, vert_stride: 3, block_size: 32, head_sliding_step: step };
            let f = sparse(step, rank);
            for h in 0..4u32 {
                let r = b.residue(4, 2, h, h / 2);
                for k in 0..6u32 {
                    assert_eq!(f(h as usize, 32 * k as usize), k % 3 == r, "step {step} rank {rank} head {h} block {k}");
                }
            }
        }
        // Dense when vert_stride <= 1.
        let mut a = inp.args();
        a.blocksparse = Some(BlockSparse { tp_rank: 0, local_blocks: 1, vert_stride: 1, block_size: 32, head_sliding_step: 1 });
        assert!((0..200).all(|t| sparse_attends(&a, &plan, 0, t, 200)));
    }
}
