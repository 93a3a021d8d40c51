//! What the two `flash_attn_varlen_func` kernels share: `flash_attn.rs` (`mma.sync`, every arch)
//! and `flash_attn_sm90.rs` (`wgmma`, Hopper). Both tile packed rows the same way (row `r` of a
//! sequence is query `r / group` with query head `kv_head · group + r % group`) and hold scores in
//! the same accumulator layout: a 16-row tile as `[[f32; 4]; n / 8]`, lane `l` holding rows
//! `g = l / 4` (elements 0, 1) and `g + 8` (elements 2, 3), keys `8 · nt + 2t` and `+ 1`
//! (`t = l % 4`). So the sequence bounds, the visible key range, the masks, the online-softmax step
//! and the row output are written once, here.

use crate::intrinsics::{atomic_or, block_idx_x, exp2, fma, log2, rcp, shfl_xor};
use crate::tensor_core::{self as tc, MmaElem};
use pagedattn_layout::{FlashAttnVarlenParams, status, varlen_tile};

pub const LOG2E: f32 = core::f32::consts::LOG2_E;
const LN2: f32 = core::f32::consts::LN_2;

/// `tanh(x)` from `ex2` and `rcp` (saturates to ±1 for large |x|).
#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 * rcp(exp2(2.0 * LOG2E * x) + 1.0)
}

/// This CTA's work, `(sequence, KV head, row tile)`, in `varlen_tile`'s order: heavy (late, causal)
/// tiles first, in groups sharing their keys and values in L2.
#[inline(always)]
pub fn tile(p: &FlashAttnVarlenParams) -> (usize, usize, usize) {
    let (b, kvh, mt) = varlen_tile(block_idx_x() as u32, p.batch, p.num_kv_heads, p.row_tiles, p.tile_group);
    (b as usize, kvh as usize, mt as usize)
}

/// One sequence's rows as a CTA of KV head `kvh` sees them.
#[derive(Clone, Copy)]
pub struct Seq {
    /// First query token, query count, key count.
    pub q0: usize,
    pub sq: usize,
    pub sk: usize,
    pub group: usize,
    pub kvh: usize,
}

impl Seq {
    /// Query of packed row `r` (32-bit: rows < 2^32).
    #[inline(always)]
    pub fn query(&self, r: usize) -> usize {
        (r as u32 / self.group as u32) as usize
    }

    /// Query head of packed row `r`.
    #[inline(always)]
    pub fn head(&self, r: usize) -> usize {
        self.kvh * self.group + (r as u32 % self.group as u32) as usize
    }

    /// Packed rows of the sequence.
    #[inline(always)]
    pub fn rows(&self) -> usize {
        self.sq * self.group
    }
}

/// Sequence `b`'s bounds, read from `cu_seqlens_q` and `seqused_k`. Bad device data raises
/// `BAD_SEQ_LEN` and gives `None`; when only the key count is bad, the CTA's rows
/// `m0 .. m0 + bm` (its threads striding by `nthreads`) are written NaN (outputs and LSEs).
///
/// # Safety
/// `p` is the launch's validated params, `b < batch`.
#[inline(always)]
pub unsafe fn sequence<E: MmaElem, const D: usize>(
    p: &FlashAttnVarlenParams,
    b: usize,
    kvh: usize,
    m0: usize,
    bm: usize,
    tid: usize,
    nthreads: usize,
) -> Option<Seq> {
    // SAFETY: b < batch (grid); cu_seqlens_q has batch + 1 entries, seqused_k batch.
    let (c0, c1, sk_raw) = unsafe {
        (*(p.cu_seqlens_q as *const i32).add(b), *(p.cu_seqlens_q as *const i32).add(b + 1), *(p.seqused_k as *const i32).add(b))
    };
    let group = (p.num_heads / p.num_kv_heads) as usize;
    let rows_ok = c0 >= 0 && c1 >= c0 && c1 as u32 <= p.total_q && (c1 - c0) as u32 <= p.max_seqlen_q;
    if rows_ok && sk_raw >= 0 && sk_raw as u32 <= p.max_seqlen_k {
        return Some(Seq { q0: c0 as usize, sq: (c1 - c0) as usize, sk: sk_raw as usize, group, kvh });
    }
    if m0 == 0 && kvh == 0 && tid == 0 && p.maybe_status != 0 {
        // SAFETY: a non-null status pointer is a device u32.
        unsafe { atomic_or(p.maybe_status as *mut u32, status::BAD_SEQ_LEN) };
    }
    if rows_ok {
        // Only the key count is bad: the sequence's rows are known, mark them NaN.
        let seq = Seq { q0: c0 as usize, sq: (c1 - c0) as usize, sk: 0, group, kvh };
        let mut r = m0 + tid;
        while r < seq.rows() && r < m0 + bm {
            let (i, h) = (seq.query(r), seq.head(r));
            let base = (seq.q0 + i) * p.out_stride_token as usize + h * p.out_stride_head as usize;
            for e in 0..D / 2 {
                // SAFETY: row q0 + i < total_q of out (4-byte aligned pairs, host-checked).
                unsafe { *(p.out as *mut u32).add(base / 2 + e) = tc::pack2::<E>(f32::NAN, f32::NAN) };
            }
            if p.softmax_lse != 0 {
                // SAFETY: `[num_heads, total_q]`.
                unsafe { *(p.softmax_lse as *mut f32).add(h * p.total_q as usize + seq.q0 + i) = f32::NAN };
            }
            r += nthreads;
        }
    }
    None
}

/// How rows `m0 .. m0 + bm` of a sequence see its keys: the tiles of `bn` keys to walk (causal and
/// window bounds cut the range) and the logits' transform.
#[derive(Clone, Copy)]
pub struct Logits {
    /// First key of the first tile, and the tile count.
    pub first: usize,
    pub tiles: usize,
    scale: f32,
    softcap: f32,
    inv_softcap: f32,
    alibi: bool,
    /// Neither soft-cap nor ALiBi, and a scale ≥ 0.
    plain: bool,
    left: i32,
    right: i32,
    sq: i32,
    sk: i32,
    /// Key position of query `i` is `i + d_off`.
    d_off: i32,
    /// Tiles starting at a key in `whole_lo ..= whole_hi` are seen whole by every row.
    whole_lo: i64,
    whole_hi: i64,
}

impl Logits {
    #[inline(always)]
    pub fn new(p: &FlashAttnVarlenParams, seq: &Seq, m0: usize, bm: usize, bn: usize) -> Logits {
        let (left, right) = (p.window_left, p.window_right);
        let (sq, sk) = (seq.sq, seq.sk);
        // The keys any row of this tile can see (its queries are m0 / group ..= last / group).
        let last = if m0 + bm < seq.rows() { m0 + bm } else { seq.rows() } - 1;
        let (d_lo, d_hi) = ((seq.query(m0) + sk) as i64 - sq as i64, (seq.query(last) + sk) as i64 - sq as i64);
        let j_lo = if left >= 0 { (d_lo - left as i64).max(0) } else { 0 } as usize;
        let j_hi = if right >= 0 { (d_hi + right as i64 + 1).clamp(0, sk as i64) } else { sk as i64 } as usize;
        let first = j_lo / bn * bn;
        let tiles = if j_hi > first { (j_hi - first).div_ceil(bn) } else { 0 };
        let (scale, softcap) = (p.scale, p.softcap);
        let alibi = p.alibi_slopes != 0;
        Logits {
            first,
            tiles,
            scale,
            softcap,
            inv_softcap: if softcap > 0.0 { 1.0 / softcap } else { 0.0 },
            alibi,
            plain: softcap <= 0.0 && !alibi && scale >= 0.0,
            left,
            right,
            // Lengths are below 2^31 (host-checked i32 tables).
            sq: sq as i32,
            sk: sk as i32,
            d_off: sk as i32 - sq as i32,
            // n0 >= d_hi - left (every row's window starts by n0), n0 + bn - 1 <= d_lo + right
            // (every row's window reaches the tile's last key) and n0 + bn <= sk.
            whole_lo: if left >= 0 { d_hi - left as i64 } else { i64::MIN },
            whole_hi: (sk as i64 - bn as i64).min(if right >= 0 { d_lo + right as i64 + 1 - bn as i64 } else { i64::MAX }),
        }
    }

    /// Whether every row sees the keys `n0 .. n0 + bn` (`bn` as at construction) whole (inside the keys and every row's
    /// window): such a tile needs no mask.
    #[inline(always)]
    pub fn whole(&self, n0: usize) -> bool {
        (n0 as i64) >= self.whole_lo && (n0 as i64) <= self.whole_hi
    }

    /// Logits of a 16-row tile's scores `s` (`n` keys from `n0`; rows of queries `qi`, ALiBi slopes
    /// `slope`, this lane's `t`), in log2 units and masked. `EXTRAS`: soft-cap and ALiBi compiled
    /// in (a variant without them serves calls that use neither: fewer registers). Returns the
    /// factor still to apply (see [`row_max`]): without soft-cap or ALiBi the scaling folds into
    /// the FMA under the exp2 (the row max is taken on the raw scores, scale ≥ 0) and a tile that
    /// is not `whole` is only masked; else it is 1.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn prepare<const NT: usize, const EXTRAS: bool>(
        &self,
        s: &mut [[f32; 4]; NT],
        n: usize,
        n0: usize,
        whole: bool,
        t: usize,
        qi: [i32; 2],
        slope: [f32; 2],
    ) -> f32 {
        let plain = if EXTRAS { self.plain } else { self.scale >= 0.0 };
        if whole && plain {
            return self.scale * LOG2E;
        }
        // Each row's visible keys as one range lo ..= hi (empty for rows past the queries), then
        // one pass per element: every temporary dies at once (separate passes kept a key index per
        // element live between them, and spilled).
        let (mut lo, mut hi) = ([1i32; 2], [0i32; 2]);
        for r in 0..2 {
            let d = qi[r] + self.d_off;
            if qi[r] < self.sq {
                lo[r] = if self.left >= 0 { d.saturating_sub(self.left) } else { 0 };
                hi[r] = if self.right >= 0 { d.saturating_add(self.right).min(self.sk - 1) } else { self.sk - 1 };
            }
        }
        let j0 = (n0 + 2 * t) as i32;
        if plain {
            // Masked only: the scaling still folds into the FMA under the exp2.
            for nt in 0..n / 8 {
                for e in 0..4 {
                    let (r, j) = (e / 2, j0 + (nt * 8 + e % 2) as i32);
                    if j < lo[r] || j > hi[r] {
                        s[nt][e] = f32::NEG_INFINITY;
                    }
                }
            }
            return self.scale * LOG2E;
        }
        for nt in 0..n / 8 {
            for e in 0..4 {
                let (r, j) = (e / 2, j0 + (nt * 8 + e % 2) as i32);
                let mut x = s[nt][e] * self.scale;
                if EXTRAS && self.softcap > 0.0 {
                    x = self.softcap * tanh(x * self.inv_softcap);
                }
                if EXTRAS && self.alibi {
                    x -= slope[r] * ((qi[r] + self.d_off - j).abs() as f32);
                }
                s[nt][e] = if j >= lo[r] && j <= hi[r] { x * LOG2E } else { f32::NEG_INFINITY };
            }
        }
        1.0
    }
}

/// One tile of the online softmax for a 16-row tile's two rows of this lane, first half: the row
/// maxima of the logits `s · ls` (four chains, then the quad's lanes), the running max `m_run` and
/// sum `l_run` updated. Returns each row's reference for [`exponentiate`] and correction factor for
/// the output accumulated so far. Rows without a visible key so far (max −∞) use 0 as the
/// reference: every exp2 is then 0, and so is the correction of their (zero) sums. (Two halves, so
/// a kernel with two row tiles runs both maxima before the exps: independent chains side by side.)
#[inline(always)]
pub fn row_max<const NT: usize>(s: &[[f32; 4]; NT], n: usize, ls: f32, m_run: &mut [f32; 2], l_run: &mut [f32; 2]) -> ([f32; 2], [f32; 2]) {
    let mut corr = [1f32; 2];
    let mut m_ref = [0f32; 2];
    for r in 0..2 {
        let half = 2 * r;
        let mut part = [f32::NEG_INFINITY; 4];
        for nt in 0..n / 8 {
            part[nt % 4] = part[nt % 4].max(s[nt][half].max(s[nt][half + 1]));
        }
        let mut mx = part[0].max(part[1]).max(part[2].max(part[3]));
        mx = mx.max(shfl_xor(mx, 1));
        mx = mx.max(shfl_xor(mx, 2));
        let m_new = m_run[r].max(mx * ls);
        m_ref[r] = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
        corr[r] = exp2(m_run[r] - m_ref[r]);
        m_run[r] = m_new;
        l_run[r] *= corr[r];
    }
    (m_ref, corr)
}

/// Second half of the online-softmax step: `s` becomes the probabilities `exp2(s · ls − m_ref)`,
/// summed into `l_run` (four chains per row).
#[inline(always)]
pub fn exponentiate<const NT: usize>(s: &mut [[f32; 4]; NT], n: usize, ls: f32, m_ref: [f32; 2], l_run: &mut [f32; 2]) {
    for r in 0..2 {
        let half = 2 * r;
        let mut part = [0f32; 4];
        for nt in 0..n / 8 {
            for e in half..half + 2 {
                let pe = exp2(fma(s[nt][e], ls, -m_ref[r]));
                s[nt][e] = pe;
                part[nt % 4] += pe;
            }
        }
        l_run[r] += (part[0] + part[1]) + (part[2] + part[3]);
    }
}

/// The largest probability [`exponentiate_ahead`] lets through without moving a row's reference:
/// 2^14, well inside f16's range (the `P·V` operand), and far enough above 1 that a reference
/// rarely moves after a row's first tile.
pub const P_LIMIT: f32 = 16384.0;

/// The online-softmax step of a tile after the first, for rows that all have a finite reference
/// `m_ref` (set by an earlier tile's maximum), first half: `s` becomes `exp2(s · ls − m_ref)`
/// without waiting for this tile's row maxima (their reduction was the longest dependency of the
/// step), and the lane's row sums are returned. The reference may lag a row's maximum: the caller
/// keeps probabilities up to [`P_LIMIT`] as they are. A lane's sum bounds each of its
/// probabilities, so only when a sum passes `P_LIMIT` does the warp need [`rebase`].
#[inline(always)]
pub fn exponentiate_ahead<const NT: usize>(s: &mut [[f32; 4]; NT], n: usize, ls: f32, m_ref: [f32; 2]) -> [f32; 2] {
    let mut part = [[0f32; 4]; 2];
    for r in 0..2 {
        for nt in 0..n / 8 {
            for e in 2 * r..2 * r + 2 {
                let pe = exp2(fma(s[nt][e], ls, -m_ref[r]));
                s[nt][e] = pe;
                part[r][nt % 4] += pe;
            }
        }
    }
    let mut l = [0f32; 2];
    for r in 0..2 {
        l[r] = (part[r][0] + part[r][1]) + (part[r][2] + part[r][3]);
    }
    l
}

/// [`exponentiate_ahead`]'s slow path (the whole warp, after the caller's `P·V` is done): each
/// row's reference moves up to its maximum and its probabilities `p` are rescaled through their
/// logarithms `log2 p`, except where `p` overflowed to +∞ (a score ≥ 128 above the reference),
/// whose logits `logit(nt, e)` (element `e` of score tile `nt`, log2 units) are recomputed.
/// Returns the corrections of the output so far; `l` becomes the new row sums.
#[inline(always)]
pub fn rebase<const NT: usize>(
    s: &mut [[f32; 4]; NT],
    n: usize,
    m_ref: &mut [f32; 2],
    l: &mut [f32; 2],
    logit: impl Fn(usize, usize) -> f32,
) -> [f32; 2] {
    // Logarithms; overflowed elements marked in `inf` (bit 4 nt + e).
    let mut inf = 0u64;
    for nt in 0..n / 8 {
        for e in 0..4 {
            if s[nt][e] == f32::INFINITY {
                inf |= 1 << (4 * nt + e);
            }
            s[nt][e] = log2(s[nt][e]);
        }
    }
    // Rarer still: one recomputation site in a loop over the marked elements, its result put in
    // place by a static scan (a dynamic index would put `s` in local memory).
    // (Selecting between two values read here: a select between the array's elements became a load.)
    let (ref0, ref1) = (m_ref[0], m_ref[1]);
    while inf != 0 {
        let k = inf.trailing_zeros() as usize;
        inf &= inf - 1;
        let v = logit(k / 4, k % 4) - if k % 4 < 2 { ref0 } else { ref1 };
        for nt in 0..n / 8 {
            for e in 0..4 {
                if 4 * nt + e == k {
                    s[nt][e] = v;
                }
            }
        }
    }
    // (Loops with small bodies only, so that all of them unroll: a row index left dynamic would
    // put `s` in local memory.)
    let mut mx = [f32::NEG_INFINITY; 2];
    for nt in 0..n / 8 {
        for e in 0..4 {
            mx[e / 2] = mx[e / 2].max(s[nt][e]);
        }
    }
    let mut d = [0f32; 2];
    let mut corr = [1f32; 2];
    for r in 0..2 {
        let m = mx[r].max(shfl_xor(mx[r], 1));
        let m = m.max(shfl_xor(m, 2));
        // (The reference never moves down: a lagging one is exact, a raised one bounds p by 1.)
        d[r] = if m > 0.0 { m } else { 0.0 };
        corr[r] = exp2(-d[r]);
        m_ref[r] += d[r];
    }
    *l = [0f32; 2];
    for nt in 0..n / 8 {
        for e in 0..4 {
            let pe = exp2(s[nt][e] - d[e / 2]);
            s[nt][e] = pe;
            l[e / 2] += pe;
        }
    }
    corr
}

/// `O *= corr` per row of a 16-row tile's output accumulators.
#[inline(always)]
pub fn rescale<const NT: usize>(o: &mut [[f32; 4]; NT], n: usize, corr: [f32; 2]) {
    for nt in 0..n / 8 {
        for e in 0..4 {
            o[nt][e] *= corr[e / 2];
        }
    }
}

/// The A fragment (16 rows × 16 keys, `E` pairs) of keys `16 ks ..` from probabilities in the
/// accumulator layout: tiles `2 ks` and `2 ks + 1` side by side are already the A layout.
#[inline(always)]
pub fn a_fragment<E: MmaElem, const NT: usize>(s: &[[f32; 4]; NT], ks: usize) -> [u32; 4] {
    let (lo, hi) = (s[2 * ks], s[2 * ks + 1]);
    [tc::pack2::<E>(lo[0], lo[1]), tc::pack2::<E>(lo[2], lo[3]), tc::pack2::<E>(hi[0], hi[1]), tc::pack2::<E>(hi[2], hi[3])]
}

/// Writes this lane's part of packed row `pr` (half 0: accumulator elements 0, 1; half 1: 2, 3) of a
/// 16-row tile's output `o` scaled by `1 / l` (`l` this lane's partial sum: the quad's lanes are
/// added here, so every lane of the quad calls it), and the LSE from lane `t == 0`. `bad`: the
/// CTA read a bad block id; the row becomes NaN. Rows without a visible key get 0 and −∞.
///
/// # Safety
/// `pr` is below the sequence's rows; `p` the validated params.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn store_row<E: MmaElem, const D: usize, const NT: usize>(
    p: &FlashAttnVarlenParams,
    seq: &Seq,
    pr: usize,
    o: &[[f32; 4]; NT],
    half: usize,
    t: usize,
    l: f32,
    m_run: f32,
    bad: bool,
) {
    let (i, h) = (seq.query(pr), seq.head(pr));
    // l ≥ 1 with a visible key, 0 without (a zero row); NaN (a NaN logit) propagates.
    let inv = if bad {
        f32::NAN
    } else if l == 0.0 {
        0.0
    } else {
        1.0 / l
    };
    let base = (seq.q0 + i) * p.out_stride_token as usize + h * p.out_stride_head as usize;
    let out = p.out as *mut u32;
    for nt in 0..D / 8 {
        // SAFETY: two halves of the row's dims nt*8 + 2t (4-byte aligned: the host checked even
        // strides and offset).
        unsafe { *out.add((base + nt * 8 + 2 * t) / 2) = tc::pack2::<E>(o[nt][2 * half] * inv, o[nt][2 * half + 1] * inv) };
    }
    if t == 0 && p.softmax_lse != 0 {
        let lse = if bad {
            f32::NAN
        } else if l == 0.0 {
            f32::NEG_INFINITY
        } else {
            (m_run + log2(l)) * LN2
        };
        // SAFETY: `[num_heads, total_q]`, q0 + i < total_q.
        unsafe { *(p.softmax_lse as *mut f32).add(h * p.total_q as usize + seq.q0 + i) = lse };
    }
}

/// A row's sum over the quad's four lanes.
#[inline(always)]
pub fn quad_sum(v: f32) -> f32 {
    let v = v + shfl_xor(v, 1);
    v + shfl_xor(v, 2)
}
