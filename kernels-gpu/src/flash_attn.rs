//! `flash_attn_varlen_func` over a paged KV cache, on tensor cores (FlashAttention-2's scheme).
//!
//! Grid `batch · num_kv_heads · row_tiles` (1-D; `varlen_tile` orders the work), `NUM_THREADS` threads,
//! `smem_bytes(HEAD_SIZE)` of dynamic shared memory (`pagedattn_layout::FlashAttnGeometry`). A CTA
//! takes `block_m` packed rows of one sequence and one KV head: row `r` is query `r / group` with
//! query head `kv_head · group + r % group`, so one staged K/V tile serves the whole GQA group
//! (decode tokens of a group share a tile too). Warp `w` owns `m_tiles` row tiles of 16. The CTA
//! walks the keys its rows can see (causal and window bounds cut the range) `block_n` (64 or 32) at a
//! time, two stages deep (the next tile's copies fly while this one is used):
//! - K and V rows are gathered through the block table into shared memory with `cp.async` (rows past
//!   the sequence's keys are zeros);
//! - `S = Q·Kᵀ` with `mma.sync.m16n8k16` (Q and K fragments from `ldmatrix`), f32 accumulators; each
//!   K fragment feeds every row tile of the warp;
//! - per element: scale, soft-cap (`softcap · tanh(s / softcap)`), ALiBi (`-slope · |d - j|`), the
//!   masks (`j < seqused_k`, causal/window around `d = i + seqused_k - seqlen_q`), then log2 units;
//!   a tile that every row sees whole without soft-cap or ALiBi only scales;
//! - online softmax per row (a row's values of a step live in the 4 lanes of a quad: max and sum by two
//!   shuffles), rows without a visible key so far keep max −∞ and contribute nothing;
//! - `O += P·V`: the probabilities, rounded to the input type, are already in the A-fragment layout
//!   (two adjacent 8-column accumulator tiles form one 16-column A tile); V fragments come from
//!   `ldmatrix.trans`.
//!
//! `ldmatrix` addresses are 32-bit shared addresses formed from one base per stage: 64-bit generic
//! pointers per fragment, hoisted out of the loop by LLVM, cost 700 bytes of spills.
//!
//! Head sizes that are not a multiple of 16 (120) run as the next multiple: the extra columns of
//! the Q, K and V tiles are zeros, so the dot products are exact and the extra output columns are
//! dropped.
//!
//! Finally `O / l` is written (rows without a visible key: 0) and, when asked, the natural-log LSE
//! (`-inf` for those rows). Device data is guarded: bad `cu_seqlens_q` skip the sequence, a bad
//! `seqused_k` makes its outputs and LSEs NaN, both raise `BAD_SEQ_LEN`; a block id outside
//! `0..num_blocks` is never read (zeros instead), raises `BAD_BLOCK_ID` and makes the CTA's outputs
//! NaN.

use crate::intrinsics::{
    Chunk, Element, atomic_or, block_idx_x, block_idx_y, dynamic_smem_chunks, exp2, fmax, log2, store_chunk, sync_threads, thread_idx_x,
    vote_any,
};
use crate::tensor_core::{self as tc, MmaElem};
use crate::varlen::{self, LOG2E, Logits};
use pagedattn_layout::{FlashAttnGeometry as Geo, FlashAttnVarlenParams, MERGE_THREADS, MergeAttnStatesParams, status};

const NT: usize = Geo::NUM_THREADS;
const LN2: f32 = core::f32::consts::LN_2;

/// # Safety
/// Launched with the geometry above on buffers the host validated (16-byte aligned rows of q, k, v;
/// 4-byte aligned rows of out).
#[inline(always)]
pub unsafe fn flash_attn_varlen<E: MmaElem, const D: usize>(p: &FlashAttnVarlenParams) {
    const { assert!(D.is_multiple_of(8) && D <= 256) };
    // The tiles' width: whole k steps of the mma; `chunks` 16-byte pieces of each row are loaded.
    let dp = Geo::padded(D);
    let row = Geo::row(D);
    let chunks = D / 8;
    let mts = Geo::m_tiles(D);
    let bm = Geo::block_m(D);
    let bn = Geo::block_n(D);
    let (b, kvh, mt) = varlen::tile(p);
    let tid = thread_idx_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let (g, t) = (lane / 4, lane % 4);
    let m0 = mt * bm;
    // SAFETY: b < batch (grid), the launch's params.
    let Some(seq) = (unsafe { varlen::sequence::<E, D>(p, b, kvh, m0, bm, tid, NT) }) else { return };
    let (q0, sk) = (seq.q0, seq.sk);
    let rows_total = seq.rows();
    if m0 >= rows_total {
        return;
    }
    let lg = Logits::new(p, &seq, m0, bm, bn);
    let (first, tiles) = (lg.first, lg.tiles);

    let smem = dynamic_smem_chunks() as *mut u16;
    // Shared memory (halves): Q `[bm][row]`, then two stages of K `[bn][row]` and V `[bn][row]`,
    // then the flag word; `row` halves are a multiple of 16 bytes, so every row is 16-byte aligned.
    let stage = |st: usize| (bm + st * 2 * bn) * row;
    // SAFETY: the launch-sized carve-up.
    let flag_s = unsafe { smem.add((bm + 4 * bn) * row) as *mut u32 };
    let base = tc::shared_addr(smem);
    if tid == 0 {
        // SAFETY: the flag word.
        unsafe { *flag_s = 0 };
    }
    if dp != D {
        // Zero the pad columns of every row once: the loads never write them.
        let mut r = tid;
        while r < bm + 4 * bn {
            let mut cc = chunks;
            while cc < dp / 8 {
                // SAFETY: a 16-byte piece of row r's pad, inside the carve-up.
                unsafe { store_chunk(smem.add(r * row + cc * 8), Chunk([0; 4])) };
                cc += 1;
            }
            r += NT;
        }
    }

    // Q tile (rows past the sequence: zeros).
    let q = p.q as *const u16;
    let mut c = tid;
    while c < bm * chunks {
        let (r, cc) = (c / chunks, c % chunks);
        let pr = m0 + r;
        // SAFETY: row r of the Q tile; a row below rows_total is a query's head row, 16-byte
        // aligned (host).
        unsafe {
            if pr < rows_total {
                let src = q.add((q0 + seq.query(pr)) * p.q_stride_token as usize + seq.head(pr) * p.q_stride_head as usize + cc * 8);
                tc::cp_async_16(base + ((r * row + cc * 8) * 2) as u32, src);
            } else {
                store_chunk(smem.add(r * row + cc * 8), Chunk([0; 4]));
            }
        }
        c += NT;
    }

    // K and V rows n0 .. n0 + bn through the block table into stage `st` (rows past the keys: zeros;
    // a bad block id is never read and sets the flag).
    let (k_cache, v_cache) = (p.k_cache as *const u16, p.v_cache as *const u16);
    // SAFETY: row b of the table (b < batch; the row stride validated).
    let table = unsafe { (p.block_table as *const i32).add(b * p.block_table_stride as usize) };
    let bs = p.block_size;
    // Power-of-two pages (the usual case) split a key index with a shift and a mask.
    let (pow2, bs_shift) = (bs.is_power_of_two(), bs.trailing_zeros());
    let (k_head, v_head) = (kvh * p.k_stride_head as usize, kvh * p.v_stride_head as usize);
    let load_kv = |n0: usize, st: usize| {
        let mut c = tid;
        while c < bn * chunks {
            let (r, cc) = (c / chunks, c % chunks);
            let j = (n0 + r) as u32;
            let at = stage(st) + r * row + cc * 8;
            // SAFETY: row r of the stage's K/V tiles; j < sk <= max_blocks * block_size, so the
            // table entry exists; a block id is used only when in range.
            unsafe {
                let (page, slot) = if pow2 { (j >> bs_shift, j & (bs - 1)) } else { (j / bs, j % bs) };
                let blk = if (j as usize) < sk { *table.add(page as usize) } else { -1 };
                if (j as usize) < sk && blk >= 0 && (blk as u32) < p.num_blocks {
                    let ko = blk as usize * p.k_stride_block as usize + slot as usize * p.k_stride_slot as usize + k_head + cc * 8;
                    let vo = blk as usize * p.v_stride_block as usize + slot as usize * p.v_stride_slot as usize + v_head + cc * 8;
                    tc::cp_async_16(base + (at * 2) as u32, k_cache.add(ko));
                    tc::cp_async_16(base + ((at + bn * row) * 2) as u32, v_cache.add(vo));
                } else {
                    if (j as usize) < sk {
                        *flag_s = 1;
                    }
                    store_chunk(smem.add(at), Chunk([0; 4]));
                    store_chunk(smem.add(at + bn * row), Chunk([0; 4]));
                }
            }
            c += NT;
        }
    };
    if tiles > 0 {
        load_kv(first, 0);
    }
    tc::cp_async_commit();

    // This lane's rows: row tile m of the warp holds tile-local rows (warp · mts + m) · 16 + g and
    // + 8.
    let local = |m: usize, r: usize| (warp * mts + m) * 16 + g + 8 * r;
    let mut slope = [[0f32; 2]; 2];
    let mut qi = [[0i32; 2]; 2];
    for m in 0..mts {
        for r in 0..2 {
            let pr = m0 + local(m, r);
            qi[m][r] = seq.query(pr) as i32;
            if p.alibi_slopes != 0 {
                // SAFETY: `[num_heads]` slopes.
                slope[m][r] = unsafe { *(p.alibi_slopes as *const f32).add(seq.head(pr)) };
            }
        }
    }

    // Per-lane byte offsets of the ldmatrix rows (see `tensor_core`): Q as the A operand (rows
    // lane % 16, column half lane / 16); K as B of two 8-key tiles (keys (lane / 16) · 8 + lane % 8,
    // column half (lane / 8) % 2); V transposed as B of two 8-dim tiles (keys lane % 8 +
    // ((lane / 8) % 2) · 8, dim half lane / 16).
    let q_lane = base + (((warp * mts * 16 + lane % 16) * row + (lane / 16) * 8) * 2) as u32;
    let k_lane = ((((lane / 16) * 8 + lane % 8) * row + ((lane / 8) % 2) * 8) * 2) as u32;
    let v_lane = (((lane % 8 + ((lane / 8) % 2) * 8) * row + (lane / 16) * 8) * 2) as u32;
    // Q fragments stay in registers when they take at most 32 (else they are re-read from shared
    // memory each tile: the registers go to the output accumulators).
    let q_in_regs = mts * dp <= 128;
    let mut qf = [[[0u32; 4]; 8]; 2];
    let q_frag = |m: usize, kk: usize| {
        // SAFETY: ldmatrix rows inside the Q tile, all lanes together.
        unsafe { tc::ldmatrix_x4(q_lane + ((m * 16 * row + kk * 16) * 2) as u32) }
    };

    let mut o = [[[0f32; 4]; 32]; 2];
    let (mut m_run, mut l_run) = ([[f32::NEG_INFINITY; 2]; 2], [[0f32; 2]; 2]);

    for it in 0..tiles {
        let n0 = first + it * bn;
        let st = it % 2;
        tc::cp_async_wait_all();
        // Stage st is loaded for every warp, and every warp is done with stage st ^ 1.
        sync_threads();
        if it == 0 && q_in_regs {
            for m in 0..mts {
                for kk in 0..dp / 16 {
                    qf[m][kk] = q_frag(m, kk);
                }
            }
        }
        if it + 1 < tiles {
            load_kv(n0 + bn, st ^ 1);
        }
        tc::cp_async_commit();
        let k_base = base + (stage(st) * 2) as u32;
        let v_base = k_base + (bn * row * 2) as u32;

        // S = Q·Kᵀ for the warp's row tiles × 64 keys (8 tiles of 8 keys).
        let mut s = [[[0f32; 4]; Geo::MAX_BLOCK_N / 8]; 2];
        for kk in 0..dp / 16 {
            let mut a = [[0u32; 4]; 2];
            for m in 0..mts {
                a[m] = if q_in_regs { qf[m][kk] } else { q_frag(m, kk) };
            }
            for np in 0..bn / 16 {
                // SAFETY: ldmatrix rows inside the K tile (16-byte aligned), all lanes together.
                let kb = unsafe { tc::ldmatrix_x4(k_base + k_lane + ((np * 16 * row + kk * 16) * 2) as u32) };
                for m in 0..mts {
                    s[m][2 * np] = tc::mma_16816::<E>(a[m], [kb[0], kb[1]], s[m][2 * np]);
                    s[m][2 * np + 1] = tc::mma_16816::<E>(a[m], [kb[2], kb[3]], s[m][2 * np + 1]);
                }
            }
        }
        // Logits in log2 units, masked; then the online softmax.
        // (Row tiles one by one with constant indices: a loop over m with this body does not
        // unroll, and the arrays it indexes went to local memory.)
        let whole = lg.whole(n0);
        let (mut m_ref, mut corr) = ([[0f32; 2]; 2], [[1f32; 2]; 2]);
        let ls = lg.prepare::<_, true>(&mut s[0], bn, n0, whole, t, qi[0], slope[0]);
        if mts == 2 {
            lg.prepare::<_, true>(&mut s[1], bn, n0, whole, t, qi[1], slope[1]);
        }
        (m_ref[0], corr[0]) = varlen::row_max(&s[0], bn, ls, &mut m_run[0], &mut l_run[0]);
        if mts == 2 {
            (m_ref[1], corr[1]) = varlen::row_max(&s[1], bn, ls, &mut m_run[1], &mut l_run[1]);
        }
        // Rescale the outputs only when some row's max moved (late in long rows it rarely does).
        if vote_any(corr[0][0] != 1.0 || corr[0][1] != 1.0 || corr[1][0] != 1.0 || corr[1][1] != 1.0) {
            for m in 0..mts {
                varlen::rescale(&mut o[m], dp, corr[m]);
            }
        }
        varlen::exponentiate(&mut s[0], bn, ls, m_ref[0], &mut l_run[0]);
        if mts == 2 {
            varlen::exponentiate(&mut s[1], bn, ls, m_ref[1], &mut l_run[1]);
        }
        // O += P·V: P's accumulator tiles 2k, 2k + 1 are the A fragment of keys 16k .. 16k + 16.
        for ks in 0..bn / 16 {
            let mut a = [[0u32; 4]; 2];
            for m in 0..mts {
                a[m] = varlen::a_fragment::<E, { Geo::MAX_BLOCK_N / 8 }>(&s[m], ks);
            }
            for np in 0..dp / 16 {
                // SAFETY: ldmatrix rows inside the V tile, all lanes together.
                let vb = unsafe { tc::ldmatrix_x4_trans(v_base + v_lane + ((ks * 16 * row + np * 16) * 2) as u32) };
                for m in 0..mts {
                    o[m][2 * np] = tc::mma_16816::<E>(a[m], [vb[0], vb[1]], o[m][2 * np]);
                    o[m][2 * np + 1] = tc::mma_16816::<E>(a[m], [vb[2], vb[3]], o[m][2 * np + 1]);
                }
            }
        }
    }
    tc::cp_async_wait_all();
    sync_threads();

    // SAFETY: the flag word, written before the barrier.
    let bad = unsafe { *flag_s } != 0;
    if bad && tid == 0 && p.maybe_status != 0 {
        // SAFETY: a non-null status pointer is a device u32.
        unsafe { atomic_or(p.maybe_status as *mut u32, status::BAD_BLOCK_ID) };
    }
    let store = |m: usize, r: usize| {
        let l = varlen::quad_sum(l_run[m][r]);
        let pr = m0 + local(m, r);
        if pr < rows_total {
            // SAFETY: pr is one of the sequence's rows.
            unsafe { varlen::store_row::<E, D, 32>(p, &seq, pr, &o[m], r, t, l, m_run[m][r], bad) };
        }
    };
    store(0, 0);
    store(0, 1);
    if mts == 2 {
        store(1, 0);
        store(1, 1);
    }
}

macro_rules! export_flash_attn {
    ($dt:ident, $dtn:literal, $h:literal) => {
        const _: () = {
            /// One varlen variant; see the module docs.
            ///
            /// # Safety
            /// Launched by the host's dispatch with this variant's geometry on validated buffers.
            #[unsafe(export_name = pagedattn_layout::flash_attn_symbol!($dtn, $h))]
            pub unsafe extern "ptx-kernel" fn kernel(p: FlashAttnVarlenParams) {
                // SAFETY: forwarded from the entry point's contract.
                unsafe { flash_attn_varlen::<tc_elem!($dt), $h>(&p) }
            }
        };
    };
}

pagedattn_layout::for_each_flash_attn_variant!(export_flash_attn);

/// `merge_attn_states`: two partial attentions over disjoint key sets, with their LSEs, into one.
/// Per (token, head): `m = max(lse_p, lse_s)`, `w = exp(lse - m)`, `out = (w_p · out_p + w_s ·
/// out_s) / (w_p + w_s)`, `lse = m + ln(w_p + w_s)`. An LSE of +inf (FlashAttention-2's mark of a
/// row without keys) counts as -inf; a side of weight 0 is not read (its output may be anything,
/// NaN included); both sides -inf give 0 and -inf.
///
/// Grid `(num_tokens, num_heads)`, `MERGE_THREADS` threads striding over the head dim.
///
/// # Safety
/// Launched with that geometry on buffers the host validated (shapes and strides in the params).
#[inline(always)]
pub unsafe fn merge_attn_states<T: Element>(p: &MergeAttnStatesParams) {
    let (t, h) = (block_idx_x(), block_idx_y());
    let lse_at = |ptr: u64, st: [u32; 2]| {
        // SAFETY: `[num_heads, num_tokens]` f32 at the given strides; t, h inside (grid).
        let v = unsafe { *(ptr as *const f32).add(h * st[0] as usize + t * st[1] as usize) };
        if v == f32::INFINITY { f32::NEG_INFINITY } else { v }
    };
    let (lp, ls) = (lse_at(p.prefix_lse, p.prefix_lse_strides), lse_at(p.suffix_lse, p.suffix_lse_strides));
    let m = fmax(lp, ls);
    let (wp, ws, lse) = if m == f32::NEG_INFINITY {
        (0.0, 0.0, f32::NEG_INFINITY)
    } else {
        let (ep, es) = (exp2((lp - m) * LOG2E), exp2((ls - m) * LOG2E));
        let sum = ep + es;
        (ep / sum, es / sum, m + log2(sum) * LN2)
    };
    let at = |st: [u32; 2]| t * st[0] as usize + h * st[1] as usize;
    let (po, so, out) = (
        (p.prefix_output as *const T).wrapping_add(at(p.prefix_strides)),
        (p.suffix_output as *const T).wrapping_add(at(p.suffix_strides)),
        (p.output as *mut T).wrapping_add(at(p.out_strides)),
    );
    let mut e = thread_idx_x();
    while e < p.head_size as usize {
        // SAFETY: element e < head_size of the (token, head) rows, head dim contiguous (host).
        unsafe {
            let vp = if wp > 0.0 { wp * (*po.add(e)).to_f32() } else { 0.0 };
            let vs = if ws > 0.0 { ws * (*so.add(e)).to_f32() } else { 0.0 };
            *out.add(e) = T::from_f32(vp + vs);
        }
        e += MERGE_THREADS;
    }
    if thread_idx_x() == 0 && p.output_lse != 0 {
        let st = p.out_lse_strides;
        // SAFETY: as for the input LSEs.
        unsafe { *(p.output_lse as *mut f32).add(h * st[0] as usize + t * st[1] as usize) = lse };
    }
}

macro_rules! export_merge {
    ($dt:ident, $dtn:literal) => {
        const _: () = {
            /// One `merge_attn_states` variant; see [`merge_attn_states`].
            ///
            /// # Safety
            /// Launched by the host's dispatch with the merge geometry on validated buffers.
            #[unsafe(export_name = pagedattn_layout::merge_attn_states_symbol!($dtn))]
            pub unsafe extern "ptx-kernel" fn kernel(p: MergeAttnStatesParams) {
                // SAFETY: forwarded from the entry point's contract.
                unsafe { merge_attn_states::<elem!($dt)>(&p) }
            }
        };
    };
}

pagedattn_layout::for_each_cache_dtype!(export_merge);
