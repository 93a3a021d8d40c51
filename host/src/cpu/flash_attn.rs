//! CPU reference of `flash_attn_varlen_func` and `merge_attn_states`, written naively in f64 from
//! FlashAttention's definitions (see `crate::flash_attn`): per (query token, head) the visible keys
//! are listed, their logits computed, soft-capped, biased, and a dense softmax taken.

use crate::error::Result;
use crate::flash_attn::{FlashAttnVarlenArgs, VarlenPlan};
use crate::tensor::Tensor;

/// Whether key `j` is visible to the query at key position `d` (`d = i + sk - sq`, may be negative)
/// under `window` = `(left, right)` bounds (`None`: unbounded), keys `0..sk`.
pub fn visible(d: i64, j: i64, window: (Option<usize>, Option<usize>)) -> bool {
    window.0.is_none_or(|l| j >= d - l as i64) && window.1.is_none_or(|r| j <= d + r as i64)
}

/// The exact result: `out` `[total_q, num_heads, head_size]` row-major and `lse` `[num_heads, total_q]`
/// (natural log; `-inf` for rows without a visible key, whose output is 0).
pub fn reference(plan: &VarlenPlan, a: &FlashAttnVarlenArgs) -> (Vec<f64>, Vec<f64>) {
    let (hs, nh, bs) = (plan.head_size, plan.num_heads, plan.block_size);
    let group = nh / plan.num_kv_heads;
    let cu = a.cu_seqlens_q.to_i32_vec();
    let used = a.seqused_k.to_i32_vec();
    let table = a.block_table.to_i32_vec();
    let alibi = a.alibi_slopes.map(Tensor::to_f64_vec);
    let (scale, softcap) = (plan.scale as f64, a.softcap as f64);
    // One read lock per tensor: the query rows, and each sequence's keys and values gathered per KV
    // head into dense [sk][head_size] rows (through the block table and the caches' strides).
    // A combined KV cache (two views of one storage) is read through one guard: a second read lock
    // of it on this thread could wait behind a writer.
    let (qb, kb) = (a.q.host_bytes().expect("validated"), a.k.host_bytes().expect("validated"));
    let v_guard = (!a.v.shares_storage(a.k)).then(|| a.v.host_bytes().expect("validated"));
    let vb: &[u8] = v_guard.as_deref().unwrap_or(&kb);
    let read = |t: &Tensor, bytes: &[u8], idx: &[usize]| t.dtype().read_f64(bytes, t.storage_index(idx));
    let mut out = vec![0f64; plan.total_q * nh * hs];
    let mut lse = vec![f64::NEG_INFINITY; nh * plan.total_q];
    for b in 0..plan.batch {
        let (q0, sq, sk) = (cu[b] as usize, (cu[b + 1] - cu[b]) as usize, used[b] as usize);
        let block = |j: usize| table[b * plan.max_blocks + j / bs] as usize;
        for kvh in 0..plan.num_kv_heads {
            let gather = |t: &Tensor, bytes: &[u8]| -> Vec<f64> {
                (0..sk).flat_map(|j| (0..hs).map(move |e| (j, e))).map(|(j, e)| read(t, bytes, &[block(j), j % bs, kvh, e])).collect()
            };
            let (keys, values) = (gather(a.k, &kb), gather(a.v, vb));
            for i in 0..sq {
                let t = q0 + i;
                let d = i as i64 + sk as i64 - sq as i64;
                let visible: Vec<usize> = (0..sk).filter(|&j| visible(d, j as i64, plan.window)).collect();
                if visible.is_empty() {
                    continue;
                }
                for h in kvh * group..(kvh + 1) * group {
                    let q: Vec<f64> = (0..hs).map(|e| read(a.q, &qb, &[t, h, e])).collect();
                    let logits: Vec<f64> = visible
                        .iter()
                        .map(|&j| {
                            let dot: f64 = q.iter().zip(&keys[j * hs..(j + 1) * hs]).map(|(x, y)| x * y).sum();
                            let s = scale * dot;
                            let s = if softcap > 0.0 { softcap * (s / softcap).tanh() } else { s };
                            s - alibi.as_ref().map_or(0.0, |sl| sl[h] * (d - j as i64).abs() as f64)
                        })
                        .collect();
                    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = logits.iter().map(|s| (s - m).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    lse[h * plan.total_q + t] = m + sum.ln();
                    let o = &mut out[(t * nh + h) * hs..][..hs];
                    for (&j, wj) in visible.iter().zip(&w) {
                        for (oe, ve) in o.iter_mut().zip(&values[j * hs..(j + 1) * hs]) {
                            *oe += wj / sum * ve;
                        }
                    }
                }
            }
        }
    }
    (out, lse)
}

/// The CPU backend's op: the reference, rounded into `out` (and `lse`).
pub fn run(plan: &VarlenPlan, out: &mut Tensor, lse: Option<&mut Tensor>, a: &FlashAttnVarlenArgs) -> Result<()> {
    let (o, l) = reference(plan, a);
    let (nh, hs) = (plan.num_heads, plan.head_size);
    for t in 0..plan.total_q {
        for h in 0..nh {
            for e in 0..hs {
                let at = out.storage_index(&[t, h, e]);
                out.set_storage_f64(at, o[(t * nh + h) * hs + e]);
            }
        }
    }
    if let Some(lse) = lse {
        for h in 0..nh {
            for t in 0..plan.total_q {
                let at = lse.storage_index(&[h, t]);
                lse.set_storage_f64(at, l[h * plan.total_q + t]);
            }
        }
    }
    Ok(())
}

/// `merge_attn_states` on host tensors (validated): see `crate::flash_attn::merge_attn_states`.
pub fn merge(
    output: &mut Tensor,
    output_lse: Option<&mut Tensor>,
    prefix_output: &Tensor,
    prefix_lse: &Tensor,
    suffix_output: &Tensor,
    suffix_lse: &Tensor,
) -> Result<()> {
    let &[num_tokens, num_heads, head_size] = prefix_output.shape() else { unreachable!("validated rank") };
    // Read everything first: the output may alias an input.
    let (po, so) = (prefix_output.to_f64_vec(), suffix_output.to_f64_vec());
    let (pl, sl) = (prefix_lse.to_f64_vec(), suffix_lse.to_f64_vec());
    let mut merged_lse = vec![f64::NEG_INFINITY; num_heads * num_tokens];
    let mut merged = vec![0f64; po.len()];
    for t in 0..num_tokens {
        for h in 0..num_heads {
            let (lp, ls) = (pl[h * num_tokens + t], sl[h * num_tokens + t]);
            let m = lp.max(ls);
            if m == f64::NEG_INFINITY {
                continue;
            }
            let (wp, ws) = ((lp - m).exp(), (ls - m).exp());
            merged_lse[h * num_tokens + t] = m + (wp + ws).ln();
            for e in 0..head_size {
                let i = (t * num_heads + h) * head_size + e;
                merged[i] = (wp * po[i] + ws * so[i]) / (wp + ws);
            }
        }
    }
    for t in 0..num_tokens {
        for h in 0..num_heads {
            for e in 0..head_size {
                let at = output.storage_index(&[t, h, e]);
                output.set_storage_f64(at, merged[(t * num_heads + h) * head_size + e]);
            }
        }
    }
    if let Some(l) = output_lse {
        for h in 0..num_heads {
            for t in 0..num_tokens {
                let at = l.storage_index(&[h, t]);
                l.set_storage_f64(at, merged_lse[h * num_tokens + t]);
            }
        }
    }
    Ok(())
}
