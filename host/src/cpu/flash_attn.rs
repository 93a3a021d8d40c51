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
///
/// Work items (sequence, KV head, 128 queries) run on all cores: the long cases of the tests and of
/// `verify` (8k × 8k causal) are tens of GFLOP in f64.
pub fn reference(plan: &VarlenPlan, a: &FlashAttnVarlenArgs) -> (Vec<f64>, Vec<f64>) {
    const QUERIES_PER_ITEM: usize = 128;
    let (hs, nh) = (plan.head_size, plan.num_heads);
    let cu = a.cu_seqlens_q.to_i32_vec();
    let used = a.seqused_k.to_i32_vec();
    let table = a.block_table.to_i32_vec();
    let alibi = a.alibi_slopes.map(Tensor::to_f64_vec);
    // One read lock per tensor. A combined KV cache (two views of one storage) is read through one
    // guard: a second read lock of it on this thread could wait behind a writer.
    let (qb, kb) = (a.q.host_bytes().expect("validated"), a.k.host_bytes().expect("validated"));
    let v_guard = (!a.v.shares_storage(a.k)).then(|| a.v.host_bytes().expect("validated"));
    let vb: &[u8] = v_guard.as_deref().unwrap_or(&kb);
    let src = Sources { plan, a, cu: &cu, used: &used, table: &table, alibi: alibi.as_deref(), qb: &qb, kb: &kb, vb };
    let mut items = Vec::new();
    for b in 0..plan.batch {
        let sq = (cu[b + 1] - cu[b]) as usize;
        for kvh in 0..plan.num_kv_heads {
            items.extend((0..sq).step_by(QUERIES_PER_ITEM).map(|i0| (b, kvh, i0..(i0 + QUERIES_PER_ITEM).min(sq))));
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len().max(1));
    let done: Vec<Vec<Row>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut rows = Vec::new();
                    while let Some((b, kvh, range)) = items.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)).cloned() {
                        src.item(b, kvh, range, &mut rows);
                    }
                    rows
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("reference worker")).collect()
    });
    let mut out = vec![0f64; plan.total_q * nh * hs];
    let mut lse = vec![f64::NEG_INFINITY; nh * plan.total_q];
    for row in done.into_iter().flatten() {
        out[(row.t * nh + row.h) * hs..][..hs].copy_from_slice(&row.out);
        lse[row.h * plan.total_q + row.t] = row.lse;
    }
    (out, lse)
}

/// One (query token, head) result of the reference.
struct Row {
    t: usize,
    h: usize,
    out: Vec<f64>,
    lse: f64,
}

/// What every work item of [`reference`] reads.
struct Sources<'a> {
    plan: &'a VarlenPlan,
    a: &'a FlashAttnVarlenArgs<'a>,
    cu: &'a [i32],
    used: &'a [i32],
    table: &'a [i32],
    alibi: Option<&'a [f64]>,
    qb: &'a [u8],
    kb: &'a [u8],
    vb: &'a [u8],
}

impl Sources<'_> {
    /// Queries `range` of sequence `b`, every query head of KV head `kvh`: the sequence's keys and
    /// values gathered into dense `[sk][head_size]` rows (through the block table and the caches'
    /// strides), then per query the visible keys listed, their logits computed, soft-capped, biased,
    /// and a dense softmax taken. Rows without a visible key are left out (0 and -inf).
    fn item(&self, b: usize, kvh: usize, range: std::ops::Range<usize>, rows: &mut Vec<Row>) {
        let (plan, a) = (self.plan, self.a);
        let (hs, bs) = (plan.head_size, plan.block_size);
        let group = plan.num_heads / plan.num_kv_heads;
        let (scale, softcap) = (plan.scale as f64, a.softcap as f64);
        let read = |t: &Tensor, bytes: &[u8], idx: &[usize]| t.dtype().read_f64(bytes, t.storage_index(idx));
        let (q0, sq, sk) = (self.cu[b] as usize, (self.cu[b + 1] - self.cu[b]) as usize, self.used[b] as usize);
        let block = |j: usize| self.table[b * plan.max_blocks + j / bs] as usize;
        let gather = |t: &Tensor, bytes: &[u8]| -> Vec<f64> {
            (0..sk).flat_map(|j| (0..hs).map(move |e| (j, e))).map(|(j, e)| read(t, bytes, &[block(j), j % bs, kvh, e])).collect()
        };
        let (keys, values) = (gather(a.k, self.kb), gather(a.v, self.vb));
        for i in range {
            let t = q0 + i;
            let d = i as i64 + sk as i64 - sq as i64;
            let visible: Vec<usize> = (0..sk).filter(|&j| visible(d, j as i64, plan.window)).collect();
            if visible.is_empty() {
                continue;
            }
            for h in kvh * group..(kvh + 1) * group {
                let q: Vec<f64> = (0..hs).map(|e| read(a.q, self.qb, &[t, h, e])).collect();
                let logits: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        let dot: f64 = q.iter().zip(&keys[j * hs..(j + 1) * hs]).map(|(x, y)| x * y).sum();
                        let s = scale * dot;
                        let s = if softcap > 0.0 { softcap * (s / softcap).tanh() } else { s };
                        s - self.alibi.map_or(0.0, |sl| sl[h] * (d - j as i64).abs() as f64)
                    })
                    .collect();
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = logits.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = w.iter().sum();
                let mut o = vec![0f64; hs];
                for (&j, wj) in visible.iter().zip(&w) {
                    for (oe, ve) in o.iter_mut().zip(&values[j * hs..(j + 1) * hs]) {
                        *oe += wj / sum * ve;
                    }
                }
                rows.push(Row { t, h, out: o, lse: m + sum.ln() });
            }
        }
    }
}

/// The CPU backend's op: the reference, rounded into `out` (and `lse`).
pub fn run(plan: &VarlenPlan, out: &mut Tensor, lse: Option<&mut Tensor>, a: &FlashAttnVarlenArgs) -> Result<()> {
    let (o, l) = reference(plan, a);
    out.set_from_f64(&o);
    if let Some(lse) = lse {
        lse.set_from_f64(&l);
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
    // Read everything first: the output may alias an input.
    let (po, so) = (prefix_output.to_f64_vec(), suffix_output.to_f64_vec());
    let (pl, sl) = (prefix_lse.to_f64_vec(), suffix_lse.to_f64_vec());
    let (merged, merged_lse) = merge_values(&po, &pl, &so, &sl, prefix_lse.shape()[0]);
    output.set_from_f64(&merged);
    if let Some(l) = output_lse {
        l.set_from_f64(&merged_lse);
    }
    Ok(())
}

/// The merge in f64 on row-major values: outputs `[num_tokens, num_heads, head_size]`, LSEs
/// `[num_heads, num_tokens]`. Returns the merged output and LSE.
pub fn merge_values(po: &[f64], pl: &[f64], so: &[f64], sl: &[f64], num_heads: usize) -> (Vec<f64>, Vec<f64>) {
    let num_tokens = pl.len() / num_heads.max(1);
    let head_size = po.len() / pl.len().max(1);
    let mut merged_lse = vec![f64::NEG_INFINITY; pl.len()];
    let mut merged = vec![0f64; po.len()];
    // +inf (FlashAttention-2's LSE of a row without keys) counts as -inf.
    let no_inf = |l: f64| if l == f64::INFINITY { f64::NEG_INFINITY } else { l };
    for t in 0..num_tokens {
        for h in 0..num_heads {
            let (lp, ls) = (no_inf(pl[h * num_tokens + t]), no_inf(sl[h * num_tokens + t]));
            let m = lp.max(ls);
            if m == f64::NEG_INFINITY {
                continue;
            }
            let (wp, ws) = ((lp - m).exp(), (ls - m).exp());
            merged_lse[h * num_tokens + t] = m + (wp + ws).ln();
            for e in 0..head_size {
                let i = (t * num_heads + h) * head_size + e;
                // A side of weight 0 is not read: its output may be anything, NaN included.
                let (vp, vs) = (if wp > 0.0 { wp * po[i] } else { 0.0 }, if ws > 0.0 { ws * so[i] } else { 0.0 });
                merged[i] = (vp + vs) / (wp + ws);
            }
        }
    }
    (merged, merged_lse)
}
