//! vLLM's `paged_attention_v1` and `paged_attention_v2`: single-query (decode) attention over a paged
//! KV cache. v1 and v2 share one kernel (`paged_attention`); v2 adds `paged_attention_v2_reduce`.
//!
//! Buffers (shapes in elements; see `pagedattn_layout::paged_attention` for strides):
//! - `out`, `query`: `[num_seqs, num_heads, HEAD_SIZE]`;
//! - `key_cache`: `[num_blocks, num_kv_heads, HEAD_SIZE / x, BLOCK_SIZE, x]`, `x = 16 B / element`;
//! - `value_cache`: `[num_blocks, num_kv_heads, HEAD_SIZE, BLOCK_SIZE]`;
//! - `block_tables`: `[num_seqs, max_num_blocks_per_seq]` i32; `seq_lens`: `[num_seqs]` i32;
//! - `maybe_alibi_slopes`: `[num_heads]` f32 or null; `maybe_status`: `*mut u32` or null;
//! - v2 workspace: `tmp_out` f32 `[num_seqs, num_heads, max_num_partitions, HEAD_SIZE]`,
//!   `exp_sums`, `max_logits` f32 `[num_seqs, num_heads, max_num_partitions]`.
//!
//! Grid `(num_seqs, head_groups, 1)` for v1, `(num_seqs, head_groups, max_num_partitions)` for v2;
//! `NUM_THREADS` threads, `smem_bytes()` of dynamic shared memory (all from `PagedAttentionGeometry`).
//! A CTA serves one sequence (v1) or one partition of `partition_size` tokens of it (v2), for up to
//! `heads_per_cta` query heads that share one KV head, so each K/V element is read once for all of
//! them, with 16-byte loads. A sequence that fits one partition is finished by partition 0 as in v1;
//! longer ones leave per-partition results for the reduce.
//!
//! Thread mapping: each warp walks tiles of 32 tokens (tile `w`, `w + NUM_WARPS`, ...), keeping an
//! online softmax (running max `m`, sum `l`, output `acc`) per head, in the log2 domain:
//! - `q·k`: lane `i` owns token `i` of the tile and reads its key 16 bytes at a time (lanes of one
//!   cache block read one contiguous span); the scaled query sits in shared memory (broadcast reads);
//! - `p·v`: the tile's probabilities go through shared memory; lane `i` then owns value chunk
//!   `j = i % CT` (`x` consecutive tokens, `CT = 32 / x` chunks per dim) of dims `i / CT + k * 32 / CT`,
//!   so a warp's loads again cover contiguous spans, and the `CT` partial sums of a dim are combined
//!   with shuffles once at the end;
//! - the warps' states are merged through shared memory and the CTA writes the normalised output
//!   (or, for a v2 partition, the partial output, max and sum).
//!
//! fp8 caches (`paged_attention_<dtype>_<e4m3|e5m2>_h<H>_b<B>`, family `paged_attention_fp8`): the
//! same kernel with `C` = fp8 codes, `x = 16` (16 codes per key chunk; value chunks of 16 tokens,
//! 8 with 8-token blocks). Codes are decoded four at a time (`cvt.rn.f16x2.e4m3x2` on sm_89+, bit
//! arithmetic on sm_80) and the per-tensor scales, read from device memory at launch, are folded
//! into the query (`k_scale`) and the output (`v_scale`). A scale that is not finite and positive
//! gives NaN and `BAD_SCALE`.
//!
//! Block-sparse (vLLM's pattern, runtime parameters, see `BlockSparse`): each tile computes which of
//! the CTA's heads attend each token; a tile no head attends is skipped (keys and values unread),
//! masked tokens get no weight, and value chunks no head attends are not loaded. The dense path
//! only tests one CTA-uniform flag per tile.
//!
//! Device-side data is guarded: a sequence length outside `0..=max_seq_len` (at most
//! `max_num_blocks_per_seq * BLOCK_SIZE`, and for v2 at most the workspace's bound) or a block id outside `0..num_blocks` is
//! never used to address memory; the sequence's output is NaN and a flag is OR-ed into the status word.

use crate::intrinsics::{
    Chunk, Element, KvElement, atomic_add, atomic_or, ballot, block_idx_x, block_idx_y, block_idx_z, dynamic_smem, exp2, fence_gpu, fma,
    fmax, grid_dim_y, load_cg, load_cg4, load_chunk, load_half_chunk, prefetch_l2, shfl_xor, sync_threads, sync_warp, thread_idx_x,
    warp_max, warp_sum,
};
use pagedattn_layout::{
    BlockSparse, PagedAttentionGeometry as Geometry, PagedAttentionParams, PagedAttentionReduceParams, REDUCE_THREADS, status,
};

const NUM_WARPS: usize = Geometry::NUM_WARPS;
const NUM_THREADS: usize = Geometry::NUM_THREADS;
const TILE: usize = Geometry::TILE;
const MAX_HEADS: usize = Geometry::MAX_HEADS_PER_CTA;
/// Output partials per lane (`heads_per_cta * HEAD_SIZE * CT / 32`), bounded by the geometry.
const MAX_ACC: usize = 64;
/// Value chunks a lane holds at once in the fp8 `p·v` (`HEAD_SIZE / dims_per_pass`), at most.
const MAX_PASSES: usize = 32;

/// Four f32, 16-byte aligned: vector reads of the scaled query and probabilities in shared memory.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct F32x4([f32; 4]);

/// Per-CTA facts, computed once at kernel start (FlashAttention's `BlockInfo`).
struct Cta {
    seq: usize,
    /// Partition (v2; 0 for v1).
    part: usize,
    kv_head: usize,
    /// First query head of this CTA, and how many it serves (`<= heads_per_cta`).
    head0: usize,
    num_heads_here: usize,
}

impl Cta {
    #[inline(always)]
    fn new(p: &PagedAttentionParams, heads_per_cta: usize) -> Cta {
        let group = (p.num_heads / p.num_kv_heads) as usize;
        let groups_per_kv = group.div_ceil(heads_per_cta);
        let hg = block_idx_y();
        let kv_head = hg / groups_per_kv;
        let head0 = kv_head * group + (hg % groups_per_kv) * heads_per_cta;
        let end = kv_head * group + group;
        let num_heads_here = if end - head0 < heads_per_cta { end - head0 } else { heads_per_cta };
        Cta { seq: block_idx_x(), part: block_idx_z(), kv_head, head0, num_heads_here }
    }

    /// `out[seq][head0 + g][d] = v` for every `(g, d)` of the CTA, `v(g, d)` from the closure.
    #[inline(always)]
    unsafe fn write_out<T: Element, const HEAD_SIZE: usize>(&self, p: &PagedAttentionParams, v: impl Fn(usize, usize) -> f32) {
        let out = p.out as *mut T;
        let mut i = thread_idx_x();
        while i < self.num_heads_here * HEAD_SIZE {
            let (g, d) = (i / HEAD_SIZE, i % HEAD_SIZE);
            let off = self.seq * p.out_stride_seq as usize + (self.head0 + g) * p.out_stride_head as usize + d;
            // SAFETY: the host validated the output shape and strides for every (seq, head, dim).
            unsafe { *out.add(off) = T::from_f32(v(g, d)) };
            i += NUM_THREADS;
        }
    }
}

/// The block id of cache block `blk` of this sequence, if it is in range.
#[inline(always)]
unsafe fn physical_block(p: &PagedAttentionParams, seq: usize, blk: usize) -> Option<usize> {
    // SAFETY: `blk < ceil(seq_len / BLOCK_SIZE) <= max_num_blocks_per_seq` (seq_len was checked), and
    // the host validated the table's shape and row stride.
    let b = unsafe { *(p.block_tables as *const i32).add(seq * p.block_table_stride as usize + blk) };
    if b >= 0 && (b as u32) < p.num_blocks { Some(b as usize) } else { None }
}

/// # Safety
/// Launched with the geometry of `(T, C, HEAD_SIZE, BLOCK_SIZE)` on buffers the host validated.
#[inline(always)]
pub unsafe fn paged_attention<T: Element, C: KvElement, const HEAD_SIZE: usize, const BLOCK_SIZE: usize>(p: &PagedAttentionParams) {
    let geo = const { Geometry::with_cache(T::DTYPE, C::CACHE, HEAD_SIZE, BLOCK_SIZE) };
    let gh = const { Geometry::with_cache(T::DTYPE, C::CACHE, HEAD_SIZE, BLOCK_SIZE).heads_per_cta() };
    let carve = geo.smem_words();
    // Key chunk (cache elements), value chunk (tokens).
    let (x, vx) = (geo.key_x(), geo.value_x());
    // Value chunks per dim in a tile, dims per pass of the warp, passes over the head.
    let ct = TILE / vx;
    let dims_per_pass = 32 / ct;
    let passes = HEAD_SIZE / dims_per_pass;
    let fp8 = const { C::CACHE.fp8().is_some() };
    const {
        let g = Geometry::with_cache(T::DTYPE, C::CACHE, HEAD_SIZE, BLOCK_SIZE);
        assert!(g.key_x() == C::X);
        // A tile holds whole blocks, or lies inside one; value chunks never straddle blocks.
        assert!((TILE.is_multiple_of(BLOCK_SIZE) || BLOCK_SIZE.is_multiple_of(TILE)) && BLOCK_SIZE.is_multiple_of(g.value_x()));
        assert!(HEAD_SIZE.is_multiple_of(C::X) && HEAD_SIZE.is_multiple_of(32 / g.value_chunks_per_row()));
        // Value chunks are 16 bytes, or 8 (fp8, 8-token blocks); the fp8 p·v holds them all.
        let vbytes = g.value_x() * core::mem::size_of::<C>();
        assert!(vbytes == 16 || vbytes == 8);
        assert!(C::CACHE.fp8().is_none() || HEAD_SIZE / (32 / g.value_chunks_per_row()) <= MAX_PASSES);
        assert!(g.value_x().is_multiple_of(4));
        assert!(g.heads_per_cta() <= MAX_HEADS);
        assert!(g.heads_per_cta() * HEAD_SIZE * g.value_chunks_per_row() / 32 <= MAX_ACC);
    };

    let cta = Cta::new(p, gh);
    let tid = thread_idx_x();
    let (warp, lane) = (tid / 32, tid % 32);
    // The host sets max_seq_len <= max_num_blocks_per_seq * BLOCK_SIZE (and, for v2, <=
    // max_num_partitions * partition_size); the min keeps the table bound even if it did not.
    let cap = (p.max_seq_len as usize).min(p.max_num_blocks_per_seq as usize * BLOCK_SIZE);
    let psize = p.partition_size as usize;
    let kv_base = cta.kv_head * p.kv_head_stride as usize;
    // L2 prefetch of K/V ahead of the loads (dense attention, and tiles of at most 16 KB: head 256's
    // 32 KB per warp and tile crowded the L2 and ran slower). In the first partition (all of v1)
    // this warp's first tile is known before the length (the table's capacity bounds the lookup):
    // its block ids load now, beside the length and the query, and the prefetch goes out after the
    // query loads. Later partitions may lie past the length, so they wait for it.
    let prefetch = const { 2 * TILE * HEAD_SIZE * core::mem::size_of::<C>() <= 16384 } && !BlockSparse::of(p).is_sparse();
    let first_t0 = warp * TILE;
    let first_phys = if prefetch && cta.part == 0 {
        // SAFETY: tokens below cap, inside the table row.
        unsafe { prefetch_block::<BLOCK_SIZE>(p, cta.seq, first_t0, cap, lane) }
    } else {
        u32::MAX
    };

    // SAFETY: `seq < num_seqs` (grid), seq_lens has num_seqs entries (host-validated).
    let seq_len_raw = unsafe { *(p.seq_lens as *const i32).add(cta.seq) };
    // fp8: the dequantization scales (device memory), folded into the query (keys) and the output
    // (values) with the decode's unit.
    let (k_mul, v_mul, scale_ok) = if fp8 {
        // SAFETY: fp8 launches carry two device f32 pointers (host-validated).
        let (ks, vs) = unsafe { (*(p.k_scale as *const f32), *(p.v_scale as *const f32)) };
        let ok = ks > 0.0 && ks < f32::INFINITY && vs > 0.0 && vs < f32::INFINITY;
        (ks * C::UNIT, vs * C::UNIT, ok)
    } else {
        (1.0, 1.0, true)
    };
    if seq_len_raw < 0 || seq_len_raw as usize > cap {
        if cta.part != 0 {
            return;
        }
        if tid == 0 && p.maybe_status != 0 {
            // SAFETY: a non-null status pointer is a device u32 (host-provided).
            unsafe { atomic_or(p.maybe_status as *mut u32, status::BAD_SEQ_LEN) };
        }
        // SAFETY: validated output.
        unsafe { cta.write_out::<T, HEAD_SIZE>(p, |_, _| f32::NAN) };
        return;
    }
    let seq_len = seq_len_raw as usize;
    // Tokens of this CTA: the whole sequence (v1, or v2 when it fits one partition), else one partition.
    let whole = psize == 0 || seq_len <= psize;
    let (t_begin, t_end) = if whole { (0, seq_len) } else { (cta.part * psize, seq_len.min(cta.part * psize + psize)) };
    if (whole && cta.part != 0) || (!whole && t_begin >= t_end) {
        return;
    }
    if !scale_ok {
        if tid == 0 && cta.part == 0 && p.maybe_status != 0 {
            // SAFETY: a non-null status pointer is a device u32 (host-provided).
            unsafe { atomic_or(p.maybe_status as *mut u32, status::BAD_SCALE) };
        }
        if whole {
            // SAFETY: validated output.
            unsafe { cta.write_out::<T, HEAD_SIZE>(p, |_, _| f32::NAN) };
        } else {
            if tid < cta.num_heads_here {
                // A NaN sum makes the reduce write NaN.
                let row = (cta.seq * p.num_heads as usize + cta.head0 + tid) * p.max_num_partitions as usize + cta.part;
                // SAFETY: `[num_seqs, num_heads, max_num_partitions]` rows (host-sized), part < max_num_partitions.
                unsafe {
                    *(p.max_logits as *mut f32).add(row) = 0.0;
                    *(p.exp_sums as *mut f32).add(row) = f32::NAN;
                }
            }
            // SAFETY: the partials are written; the flag word of the carve-up is unused so far.
            unsafe {
                let smem = dynamic_smem();
                arrive::<T, HEAD_SIZE>(
                    p,
                    &cta,
                    seq_len.div_ceil(psize),
                    smem.add(carve.flag) as *mut u32,
                    smem.add(carve.m),
                    smem.add(carve.l),
                    smem.add(carve.o),
                )
            };
        }
        return;
    }

    let smem = dynamic_smem();
    // SAFETY: offsets inside the launch-sized carve-up of this variant's geometry (all shared-memory pointers below).
    let (q_s, p_s, m_s, l_s, o_s, flag_s, sparse_s) = unsafe {
        (
            smem.add(carve.q),
            smem.add(carve.p),
            smem.add(carve.m),
            smem.add(carve.l),
            smem.add(carve.o),
            smem.add(carve.flag) as *mut u32,
            smem.add(carve.sparse) as *mut u32,
        )
    };

    // Scaled query of the CTA's heads (zero for padding heads), and the ALiBi slopes in log2 units.
    let q = p.query as *const T;
    let mut i = tid;
    while i < gh * HEAD_SIZE {
        let (g, d) = (i / HEAD_SIZE, i % HEAD_SIZE);
        let v = if g < cta.num_heads_here {
            let off = cta.seq * p.q_stride_seq as usize + (cta.head0 + g) * p.q_stride_head as usize + d;
            // SAFETY: host-validated query shape and strides.
            unsafe { (*q.add(off)).to_f32() * (p.scale_log2 * k_mul) }
        } else {
            0.0
        };
        // SAFETY: i < gh * HEAD_SIZE, the q region.
        unsafe { *q_s.add(i) = v };
        i += NUM_THREADS;
    }
    // SAFETY: first_phys is this lane's block of the tile at first_t0.
    unsafe { prefetch_tile::<C, HEAD_SIZE, BLOCK_SIZE>(p, kv_base, first_t0, first_phys, lane) };
    if tid == 0 {
        // SAFETY: flag word of the carve-up.
        unsafe { *flag_s = 0 };
    }
    // Block-sparse (vLLM's pattern, see `BlockSparse`): head g attends token t when
    // `(t / S) % vert_stride == sparse_s[g]` or `t / S > q_lim`. The pattern sits in shared memory
    // and is read only on the sparse path, so the dense loop keeps no extra registers but `sparse`.
    let bsp = BlockSparse::of(p);
    let sparse = bsp.is_sparse() && seq_len > 0;
    if sparse {
        if tid < gh {
            // Padding heads never match a stripe.
            let r = if tid < cta.num_heads_here {
                bsp.residue(p.num_heads, p.num_kv_heads, (cta.head0 + tid) as u32, cta.kv_head as u32)
            } else {
                u32::MAX
            };
            // SAFETY: tid < gh <= MAX_HEADS_PER_CTA words of the sparse region.
            unsafe { *sparse_s.add(tid) = r };
        } else if tid == MAX_HEADS {
            let q_lim = ((seq_len - 1) / bsp.block_size as usize) as i64 - bsp.local_blocks as i64;
            // SAFETY: the three pattern words after the per-head residues.
            unsafe {
                *sparse_s.add(MAX_HEADS) = bsp.block_size;
                *sparse_s.add(MAX_HEADS + 1) = bsp.vert_stride;
                *sparse_s.add(MAX_HEADS + 2) = q_lim.clamp(i32::MIN as i64, i32::MAX as i64) as i32 as u32;
            }
        }
    }
    let mut alibi = [0f32; MAX_HEADS];
    if p.maybe_alibi_slopes != 0 {
        for g in 0..gh {
            if g < cta.num_heads_here {
                // SAFETY: `[num_heads]` slopes, head0 + g < num_heads.
                alibi[g] = unsafe { *(p.maybe_alibi_slopes as *const f32).add(cta.head0 + g) } * core::f32::consts::LOG2_E;
            }
        }
    }
    sync_threads();

    let key_cache = p.key_cache as *const C;
    let value_cache = p.value_cache as *const C;

    let mut m = [f32::NEG_INFINITY; MAX_HEADS];
    let mut l = [0f32; MAX_HEADS];
    let mut acc = [0f32; MAX_ACC];
    let mut bad = false;
    let tile_end = t_end.div_ceil(TILE);
    // SAFETY: this warp's slice of the p region `[NUM_WARPS, gh, TILE]`.
    let p_w = unsafe { p_s.add(warp * gh * TILE) };

    // Partitions are whole tiles (the host checks `partition_size % TILE == 0`).
    let mut tile = t_begin / TILE + warp;
    if prefetch && cta.part != 0 {
        // SAFETY: tokens below t_end <= seq_len, inside the table row.
        unsafe {
            let phys = prefetch_block::<BLOCK_SIZE>(p, cta.seq, tile * TILE, t_end, lane);
            prefetch_tile::<C, HEAD_SIZE, BLOCK_SIZE>(p, kv_base, tile * TILE, phys, lane);
        }
    }
    while tile < tile_end {
        let t0 = tile * TILE;
        let tok = t0 + lane;
        // The next tile's block ids, loaded now and used once this tile's keys are in.
        let next = t0 + NUM_WARPS * TILE;
        // SAFETY: tokens below t_end <= seq_len, inside the table row.
        let next_phys = if prefetch { unsafe { prefetch_block::<BLOCK_SIZE>(p, cta.seq, next, t_end, lane) } } else { u32::MAX };

        // ---- block-sparse: bit g of `head_on`, whether head g attends this lane's token; bit i of
        // `tile_on`, whether any head attends token t0 + i. A tile nobody attends is skipped, and so
        // are its keys and values.
        let (head_on, tile_on) = if sparse {
            // SAFETY: the sparse region, written before the first barrier.
            let on = unsafe {
                let (sb, vs, q_lim) = (*sparse_s.add(MAX_HEADS), *sparse_s.add(MAX_HEADS + 1), *sparse_s.add(MAX_HEADS + 2) as i32);
                let kb = tok as u32 / sb;
                let (local, r) = (kb as i64 > q_lim as i64, kb % vs);
                let mut on = 0u32;
                for g in 0..gh {
                    if local || r == *sparse_s.add(g) {
                        on |= 1 << g;
                    }
                }
                on
            };
            (on, ballot(on != 0 && tok < t_end))
        } else {
            (u32::MAX, u32::MAX)
        };
        if tile_on == 0 {
            tile += NUM_WARPS;
            continue;
        }

        // ---- q·k: lane owns token t0 + lane.
        let mut s = [0f32; MAX_HEADS];
        let mut ok = false;
        if tok < t_end && head_on != 0 {
            // SAFETY: tok < seq_len, so the block index is inside the sequence's table row.
            if let Some(phys) = unsafe { physical_block(p, cta.seq, tok / BLOCK_SIZE) } {
                ok = true;
                let slot = tok % BLOCK_SIZE;
                // SAFETY: the token's slot in block `phys` (a validated id) of this KV head.
                let kp = unsafe { key_cache.add(phys * p.kv_block_stride as usize + kv_base + slot * x) };
                for c in 0..HEAD_SIZE / x {
                    // SAFETY: chunk c of this token's key, inside block `phys` (validated id).
                    let k = unsafe { load_chunk(kp.add(c * BLOCK_SIZE * x)) };
                    for e4 in 0..x / 4 {
                        let kv = C::quad(&k, e4);
                        for g in 0..gh {
                            // SAFETY: q region, 16-byte aligned (HEAD_SIZE and x are multiples of 4).
                            let q4 = unsafe { *(q_s.add(g * HEAD_SIZE + c * x + e4 * 4) as *const F32x4) };
                            for e in 0..4 {
                                s[g] = fma(q4.0[e], kv[e], s[g]);
                            }
                        }
                    }
                }
            }
            bad |= !ok;
        }
        // SAFETY: next_phys is this lane's block of the tile at `next`.
        unsafe { prefetch_tile::<C, HEAD_SIZE, BLOCK_SIZE>(p, kv_base, next, next_phys, lane) };

        // ---- online softmax per head (warp-uniform max and correction).
        for g in 0..gh {
            let sg = if ok && (head_on >> g) & 1 != 0 { s[g] + alibi[g] * (tok as f32 + 1.0 - seq_len as f32) } else { f32::NEG_INFINITY };
            let m_new = fmax(m[g], warp_max(sg));
            let (corr, pg) = if m_new == f32::NEG_INFINITY { (1.0, 0.0) } else { (exp2(m[g] - m_new), exp2(sg - m_new)) };
            m[g] = m_new;
            l[g] = fma(l[g], corr, pg);
            for k in 0..passes {
                acc[g * passes + k] *= corr;
            }
            // SAFETY: this warp's p region.
            unsafe { *p_w.add(g * TILE + lane) = pg };
        }
        sync_warp();

        // ---- p·v: lane owns value chunk j of the tile (tokens t0 + j*x ..), dims lane / ct + k * dims_per_pass.
        // A chunk lies inside one sparse block: all its tokens are attended, or none (then skipped).
        let j = lane % ct;
        let ctok = t0 + j * vx;
        let chunk_on = (tile_on >> (j * vx)) & (u32::MAX >> (32 - vx)) != 0;
        if ctok < t_end && chunk_on && fp8 {
            // SAFETY: as in the branch below.
            unsafe { pv_fp8::<C, HEAD_SIZE, BLOCK_SIZE>(p, cta.seq, kv_base, ctok, t_end, lane, gh, p_w, &mut acc) };
        } else if ctok < t_end && chunk_on {
            // SAFETY: ctok < t_end <= seq_len, inside the table row.
            if let Some(phys) = unsafe { physical_block(p, cta.seq, ctok / BLOCK_SIZE) } {
                let nvalid = if t_end - ctok < x { t_end - ctok } else { x };
                let mut pv = [[0f32; 8]; MAX_HEADS];
                for g in 0..gh {
                    for e4 in 0..x / 4 {
                        // SAFETY: p region, 16-byte aligned (TILE and x are multiples of 4).
                        let v4 = unsafe { *(p_w.add(g * TILE + j * x + e4 * 4) as *const F32x4) };
                        for e in 0..4 {
                            pv[g][e4 * 4 + e] = v4.0[e];
                        }
                    }
                }
                // SAFETY: the chunk's first slot in block `phys` (a validated id) of this KV head.
                let vp = unsafe { value_cache.add(phys * p.kv_block_stride as usize + kv_base + ctok % BLOCK_SIZE) };
                let d0 = lane / ct;
                for k in 0..passes {
                    // SAFETY: dim d0 + k * dims_per_pass < HEAD_SIZE, slots ctok % BLOCK_SIZE .. + x inside the block.
                    let v = unsafe { load_chunk(vp.add((d0 + k * dims_per_pass) * BLOCK_SIZE)) };
                    for e in 0..x {
                        // Slots past seq_len hold whatever the cache has (maybe NaN): never multiply them.
                        let ve = if e < nvalid { C::quad(&v, e / 4)[e % 4] } else { 0.0 };
                        for g in 0..gh {
                            acc[g * passes + k] = fma(pv[g][e], ve, acc[g * passes + k]);
                        }
                    }
                }
            }
        }
        sync_warp();
        tile += NUM_WARPS;
    }

    // ---- combine: lanes sharing a dim, then warps.
    for g in 0..gh {
        l[g] = warp_sum(l[g]);
    }
    for i in 0..gh * passes {
        let mut o = 1;
        while o < ct {
            acc[i] += shfl_xor(acc[i], o as u32);
            o <<= 1;
        }
    }
    if lane % ct == 0 {
        for g in 0..gh {
            for k in 0..passes {
                // SAFETY: o region `[NUM_WARPS, gh, HEAD_SIZE]`.
                unsafe { *o_s.add((warp * gh + g) * HEAD_SIZE + lane / ct + k * dims_per_pass) = acc[g * passes + k] * v_mul };
            }
        }
    }
    if lane == 0 {
        for g in 0..gh {
            // SAFETY: m and l regions `[NUM_WARPS, gh]`.
            unsafe {
                *m_s.add(warp * gh + g) = m[g];
                *l_s.add(warp * gh + g) = l[g];
            }
        }
    }
    if bad {
        // SAFETY: flag word; concurrent stores all write 1.
        unsafe { *flag_s = 1 };
    }
    sync_threads();

    // SAFETY: flag word, written before the barrier.
    let bad = unsafe { *flag_s } != 0;
    if bad && tid == 0 && p.maybe_status != 0 {
        // SAFETY: a non-null status pointer is a device u32.
        unsafe { atomic_or(p.maybe_status as *mut u32, status::BAD_BLOCK_ID) };
    }
    // Merge the warps' states of head g: (max, sum) and, per dim, the output numerator.
    let merged_ml = |g: usize| {
        // SAFETY: reads inside the m and l regions of the carve-up, written before the barrier.
        unsafe {
            let mut mx = f32::NEG_INFINITY;
            for w in 0..NUM_WARPS {
                mx = fmax(mx, *m_s.add(w * gh + g));
            }
            let mut den = 0f32;
            for w in 0..NUM_WARPS {
                let mw = *m_s.add(w * gh + g);
                if mw != f32::NEG_INFINITY {
                    den = fma(*l_s.add(w * gh + g), exp2(mw - mx), den);
                }
            }
            (mx, den)
        }
    };
    let merged = |g: usize, d: usize| {
        if bad {
            return f32::NAN;
        }
        let (mx, den) = merged_ml(g);
        let mut num = 0f32;
        for w in 0..NUM_WARPS {
            // SAFETY: the m region, written before the barrier.
            let mw = unsafe { *m_s.add(w * gh + g) };
            if mw != f32::NEG_INFINITY {
                // SAFETY: the o region, written before the barrier.
                num = fma(unsafe { *o_s.add((w * gh + g) * HEAD_SIZE + d) }, exp2(mw - mx), num);
            }
        }
        // den ≥ 1 with a visible key, 0 without; NaN (a NaN logit) propagates as in the reference.
        if den == 0.0 { 0.0 } else { num / den }
    };
    if whole {
        // SAFETY: validated output.
        unsafe { cta.write_out::<T, HEAD_SIZE>(p, merged) };
        return;
    }
    // v2 partition: normalised partial output, max and sum per head, for the reduce.
    let parts = p.max_num_partitions as usize;
    let row = |g: usize| (cta.seq * p.num_heads as usize + cta.head0 + g) * parts + cta.part;
    let mut i = tid;
    while i < cta.num_heads_here * HEAD_SIZE {
        let (g, d) = (i / HEAD_SIZE, i % HEAD_SIZE);
        // SAFETY: the host sized tmp_out for num_seqs x num_heads x max_num_partitions x HEAD_SIZE,
        // and part < max_num_partitions (grid z).
        unsafe { *(p.tmp_out as *mut f32).add(row(g) * HEAD_SIZE + d) = merged(g, d) };
        i += NUM_THREADS;
    }
    if tid < cta.num_heads_here {
        let (mx, den) = merged_ml(tid);
        // SAFETY: as above, `[num_seqs, num_heads, max_num_partitions]`.
        unsafe {
            *(p.max_logits as *mut f32).add(row(tid)) = mx;
            *(p.exp_sums as *mut f32).add(row(tid)) = if bad { f32::NAN } else { den };
        }
    }
    // SAFETY: this CTA's partials are written; flag_s is the CTA's flag word (its last read, `bad`,
    // was before a barrier every thread passed).
    unsafe { arrive::<T, HEAD_SIZE>(p, &cta, seq_len.div_ceil(psize), flag_s, m_s, l_s, o_s) };
}

/// The block id [`prefetch_tile`] needs on this lane for the tile at `t0` (`u32::MAX`: nothing to
/// prefetch: past `t_end`, a lane without a block, or an id out of range). A separate step so the
/// table load can be issued early and its value used later, off the loads' critical path.
///
/// # Safety
/// `t_end` is at most the table row's capacity (`max_num_blocks_per_seq * BLOCK_SIZE`): a checked
/// length, or the kernel's `cap`.
#[inline(always)]
unsafe fn prefetch_block<const BLOCK_SIZE: usize>(p: &PagedAttentionParams, seq: usize, t0: usize, t_end: usize, lane: usize) -> u32 {
    if t0 >= t_end {
        return u32::MAX;
    }
    // Blocks of at most a tile: lanes 2b and 2b + 1 take block b of the tile (keys, values).
    let blk = if BLOCK_SIZE <= TILE {
        if lane / 2 >= (t_end - t0).min(TILE).div_ceil(BLOCK_SIZE) {
            return u32::MAX;
        }
        t0 / BLOCK_SIZE + lane / 2
    } else {
        t0 / BLOCK_SIZE
    };
    // SAFETY: a token of block `blk` is below t_end, inside the table row (the caller's promise).
    unsafe { physical_block(p, seq, blk) }.map_or(u32::MAX, |b| b as u32)
}

/// Asks the L2 for the keys and values of the tile at `t0` (see [`prefetch_l2`]), given this
/// lane's [`prefetch_block`]: the tile's whole blocks when blocks are at most a tile (each block's
/// K and V of one KV head are contiguous), else the tile's rows of its block.
///
/// # Safety
/// `phys` comes from [`prefetch_block`] for the same tile; every lane of the warp calls it.
#[inline(always)]
unsafe fn prefetch_tile<C: KvElement, const HEAD_SIZE: usize, const BLOCK_SIZE: usize>(
    p: &PagedAttentionParams,
    kv_base: usize,
    t0: usize,
    phys: u32,
    lane: usize,
) {
    if phys == u32::MAX {
        return;
    }
    let es = core::mem::size_of::<C>();
    let base = phys as usize * p.kv_block_stride as usize + kv_base;
    let (key_cache, value_cache) = (p.key_cache as *const C, p.value_cache as *const C);
    if BLOCK_SIZE <= TILE {
        let cache = if lane.is_multiple_of(2) { key_cache } else { value_cache };
        // SAFETY: the block's KV-head slice (a validated id), 16-byte aligned (host-checked strides).
        unsafe { prefetch_l2(cache.add(base), BLOCK_SIZE * HEAD_SIZE * es) };
    } else {
        // Slots slot0 .. slot0 + TILE of the block (a multiple of TILE): HEAD_SIZE / x key rows of
        // TILE * x elements, then HEAD_SIZE value rows of TILE elements.
        let (x, slot0) = (C::X, t0 % BLOCK_SIZE);
        let krows = HEAD_SIZE / x;
        let mut r = lane;
        while r < krows + HEAD_SIZE {
            // SAFETY: rows of block `phys` (a validated id), 16-byte aligned pieces (slot0 is a
            // multiple of 32 tokens; strides host-checked).
            unsafe {
                if r < krows {
                    prefetch_l2(key_cache.add(base + r * BLOCK_SIZE * x + slot0 * x), TILE * x * es);
                } else {
                    prefetch_l2(value_cache.add(base + (r - krows) * BLOCK_SIZE + slot0), TILE * es);
                }
            }
            r += 32;
        }
    }
}

/// v2 with arrival counters (`p.counters != 0`): every partition CTA of a split sequence calls this
/// after writing its partials; the last of the sequence's `n` CTAs of this head group merges them
/// into `out` (as [`paged_attention_v2_reduce`] does) and resets the counter for the next launch.
/// One launch instead of two: no kernel boundary, one host launch.
///
/// The merge is latency-bound (one CTA, partials in the L2), so it keeps many loads in flight: a
/// warp per head finds the largest max, the partitions' weights and their sum (lanes over
/// partitions), then each thread merges four consecutive dims of one head with 16-byte loads,
/// eight partitions at a time.
///
/// # Safety
/// Every thread of the CTA calls it (barriers inside); `flag_s` is a shared word, `mx_s` and
/// `sum_s` shared regions of at least `heads_per_cta` floats and `w_s` one of `NUM_WARPS *
/// heads_per_cta * HEAD_SIZE` floats, all free for reuse; this CTA's partials are written.
#[inline(always)]
unsafe fn arrive<T: Element, const HEAD_SIZE: usize>(
    p: &PagedAttentionParams,
    cta: &Cta,
    n: usize,
    flag_s: *mut u32,
    mx_s: *mut f32,
    sum_s: *mut f32,
    w_s: *mut f32,
) {
    if p.counters == 0 {
        return;
    }
    let tid = thread_idx_x();
    // Publish this CTA's partials before its arrival is counted.
    fence_gpu();
    sync_threads();
    if tid == 0 {
        // SAFETY: `[num_seqs, gridDim.y]` counters (host-sized); seq < num_seqs, block_idx_y < gridDim.y.
        unsafe {
            let counter = (p.counters as *mut u32).add(cta.seq * grid_dim_y() + block_idx_y());
            let last = atomic_add(counter, 1) as usize + 1 == n;
            if last {
                // Every partition has arrived: nobody else touches the counter in this launch.
                *counter = 0;
            }
            *flag_s = last as u32;
        }
    }
    sync_threads();
    // SAFETY: written by thread 0 before the barrier.
    if unsafe { *flag_s } == 0 {
        return;
    }
    fence_gpu();
    let parts = p.max_num_partitions as usize;
    let (max_logits, exp_sums, tmp) = (p.max_logits as *const f32, p.exp_sums as *const f32, p.tmp_out as *const f32);
    let row0 = |g: usize| (cta.seq * p.num_heads as usize + cta.head0 + g) * parts;
    // Other CTAs' partials are read with `ld.global.cg` (from the L2, after the fence). Rows row0(g)
    // .. row0(g) + n of the workspace: n <= max_num_partitions (host-checked lengths).
    let weight = |m: f32, l: f32, mx: f32| if m == f32::NEG_INFINITY { 0.0 * l } else { exp2(m - mx) * l };
    let (warp, lane) = (tid / 32, tid % 32);
    // The weights of all (head, partition) pairs stay in shared memory when they fit (`w_s`,
    // `NUM_WARPS * heads_per_cta * HEAD_SIZE` floats: any n <= NUM_WARPS * HEAD_SIZE), so the
    // output loop only loads partial outputs; else it reloads max and sum per partition.
    let keep = n <= NUM_WARPS * HEAD_SIZE;
    let mut g = warp;
    while g < cta.num_heads_here {
        let r = row0(g);
        // Lanes hold partitions lane and lane + 32 in registers; more are reloaded.
        let ld = |k: usize| {
            // SAFETY: see above (k < n).
            if k < n { unsafe { (load_cg(max_logits.add(r + k)), load_cg(exp_sums.add(r + k))) } } else { (f32::NEG_INFINITY, 0.0) }
        };
        let ((m0, l0), (m1, l1)) = (ld(lane), ld(lane + 32));
        let mut mx = fmax(m0, m1);
        let mut k = lane + 64;
        while k < n {
            mx = fmax(mx, ld(k).0);
            k += 32;
        }
        let mx = warp_max(mx);
        let mut sum = 0f32;
        let mut put = |k: usize, (m, l): (f32, f32)| {
            if k < n {
                let w = weight(m, l, mx);
                if keep {
                    // SAFETY: g * n + k < heads_per_cta * NUM_WARPS * HEAD_SIZE floats of w_s.
                    unsafe { *w_s.add(g * n + k) = w };
                }
                sum += w;
            }
        };
        put(lane, (m0, l0));
        put(lane + 32, (m1, l1));
        let mut k = lane + 64;
        while k < n {
            put(k, ld(k));
            k += 32;
        }
        let sum = warp_sum(sum);
        if lane == 0 {
            // SAFETY: g < heads_per_cta floats of each region.
            unsafe {
                *mx_s.add(g) = mx;
                *sum_s.add(g) = sum;
            }
        }
        g += NUM_WARPS;
    }
    sync_threads();
    let out = p.out as *mut T;
    let quads = HEAD_SIZE / 4;
    let mut i = tid;
    while i < cta.num_heads_here * quads {
        let (g, d) = (i / quads, i % quads * 4);
        let r = row0(g);
        // SAFETY: written before the barrier.
        let (mx, sum) = unsafe { (*mx_s.add(g), *sum_s.add(g)) };
        let mut acc = [0f32; 4];
        let mut k = 0;
        if keep {
            // Eight partitions per step, their 16-byte loads issued together.
            while k < n {
                let mut v = [[0f32; 4]; 8];
                for j in 0..8 {
                    if k + j < n {
                        // SAFETY: see above; rows of HEAD_SIZE floats, 16-byte aligned (HEAD_SIZE % 4 == 0).
                        v[j] = unsafe { load_cg4(tmp.add((r + k + j) * HEAD_SIZE + d)) };
                    }
                }
                for j in 0..8 {
                    if k + j < n {
                        // SAFETY: written before the barrier (g * n + k + j < heads * n).
                        let w = unsafe { *w_s.add(g * n + k + j) };
                        for e in 0..4 {
                            acc[e] = fma(w, v[j][e], acc[e]);
                        }
                    }
                }
                k += 8;
            }
        } else {
            while k < n {
                // Up to four partitions per step, their loads issued together.
                let mut w = [0f32; 4];
                let mut v = [[0f32; 4]; 4];
                for j in 0..4 {
                    if k + j < n {
                        // SAFETY: see above; rows of HEAD_SIZE floats, 16-byte aligned (HEAD_SIZE % 4 == 0).
                        unsafe {
                            w[j] = weight(load_cg(max_logits.add(r + k + j)), load_cg(exp_sums.add(r + k + j)), mx);
                            v[j] = load_cg4(tmp.add((r + k + j) * HEAD_SIZE + d));
                        }
                    }
                }
                for j in 0..4 {
                    if k + j < n {
                        for e in 0..4 {
                            acc[e] = fma(w[j], v[j][e], acc[e]);
                        }
                    }
                }
                k += 4;
            }
        }
        let inv = 1.0 / sum;
        for e in 0..4 {
            let off = cta.seq * p.out_stride_seq as usize + (cta.head0 + g) * p.out_stride_head as usize + d + e;
            // SAFETY: host-validated output shape and strides.
            unsafe { *out.add(off) = T::from_f32(acc[e] * inv) };
        }
        i += NUM_THREADS;
    }
}

/// `p·v` of one fp8 value chunk per lane (`ctok`: its first token, below `t_end`): the passes'
/// chunks are loaded first (16 codes, or 8 with 8-token blocks), then consumed four tokens at a
/// time, so a lane never holds more than four probabilities per head (with 16 tokens per chunk,
/// the 16-bit path's order would keep `16 × heads` of them in registers).
///
/// # Safety
/// As the kernel's `p·v` step: `p_w` is this warp's probability region, `ctok < t_end <= seq_len`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_fp8<C: KvElement, const HEAD_SIZE: usize, const BLOCK_SIZE: usize>(
    p: &PagedAttentionParams,
    seq: usize,
    kv_base: usize,
    ctok: usize,
    t_end: usize,
    lane: usize,
    gh: usize,
    p_w: *const f32,
    acc: &mut [f32; MAX_ACC],
) {
    let vx = if BLOCK_SIZE < C::X { BLOCK_SIZE } else { C::X };
    let ct = TILE / vx;
    let dims_per_pass = 32 / ct;
    let passes = HEAD_SIZE / dims_per_pass;
    let j = lane % ct;
    // SAFETY: ctok < seq_len, inside the table row.
    let Some(phys) = (unsafe { physical_block(p, seq, ctok / BLOCK_SIZE) }) else { return };
    let nvalid = if t_end - ctok < vx { t_end - ctok } else { vx };
    // SAFETY: the chunk's first slot in block `phys` (a validated id) of this KV head.
    let vp = unsafe { (p.value_cache as *const C).add(phys * p.kv_block_stride as usize + kv_base + ctok % BLOCK_SIZE) };
    let d0 = lane / ct;
    let mut vc = [Chunk([0; 4]); MAX_PASSES];
    for k in 0..passes {
        // SAFETY: dim d0 + k * dims_per_pass < HEAD_SIZE; slots ctok % BLOCK_SIZE .. + vx inside the
        // block, 16- or 8-byte aligned (the host checked the strides; BLOCK_SIZE is a multiple of vx).
        vc[k] = unsafe {
            let a = vp.add((d0 + k * dims_per_pass) * BLOCK_SIZE);
            if vx * core::mem::size_of::<C>() == 16 { load_chunk(a) } else { load_half_chunk(a) }
        };
    }
    for e4 in 0..vx / 4 {
        let mut pq = [[0f32; 4]; MAX_HEADS];
        for g in 0..gh {
            // SAFETY: p region, 16-byte aligned (TILE and vx are multiples of 4).
            pq[g] = unsafe { *(p_w.add(g * TILE + j * vx + e4 * 4) as *const F32x4) }.0;
        }
        for k in 0..passes {
            let v4 = C::quad(&vc[k], e4);
            for e in 0..4 {
                // Slots past seq_len hold whatever the cache has (maybe NaN): never multiply them.
                let ve = if e4 * 4 + e < nvalid { v4[e] } else { 0.0 };
                for g in 0..gh {
                    acc[g * passes + k] = fma(pq[g][e], ve, acc[g * passes + k]);
                }
            }
        }
    }
}

/// v2's reduce: `out[seq][head] = sum_p w_p tmp_out[seq][head][p] / sum_p w_p` with
/// `w_p = 2^(max_logits_p - max) * exp_sums_p` over the sequence's partitions. Grid
/// `(num_seqs, num_heads)`, `REDUCE_THREADS` threads, `reduce_smem_bytes(max_num_partitions)`.
/// A NaN sum (a partition that met a bad block id) makes the output NaN.
///
/// # Safety
/// Launched after the partition kernel on the same workspace, with the geometry above.
#[inline(always)]
pub unsafe fn paged_attention_v2_reduce<T: Element>(r: &PagedAttentionReduceParams) {
    const WARPS: usize = REDUCE_THREADS / 32;
    let (seq, head, tid) = (block_idx_x(), block_idx_y(), thread_idx_x());
    let (warp, lane) = (tid / 32, tid % 32);
    // SAFETY: seq < num_seqs (grid); seq_lens has num_seqs entries.
    let seq_len_raw = unsafe { *(r.seq_lens as *const i32).add(seq) };
    if seq_len_raw < 0 || seq_len_raw as u32 > r.max_seq_len {
        return; // flagged, and written as NaN, by partition 0
    }
    let psize = r.partition_size as usize;
    let n = (seq_len_raw as usize).div_ceil(psize);
    if n <= 1 {
        return; // finished by the partition kernel
    }
    let head_size = r.head_size as usize;
    let base = (seq * r.num_heads as usize + head) * r.max_num_partitions as usize;
    let smem = dynamic_smem();
    // SAFETY: weights `[max_num_partitions]`, then two `[WARPS]` reduction areas (reduce_smem_bytes).
    let (w_s, red_max, red_sum) =
        unsafe { (smem, smem.add(r.max_num_partitions as usize), smem.add(r.max_num_partitions as usize + WARPS)) };
    let (max_logits, exp_sums) = (r.max_logits as *const f32, r.exp_sums as *const f32);

    let mut mx = f32::NEG_INFINITY;
    let mut i = tid;
    while i < n {
        // SAFETY: n <= max_num_partitions (the length was checked against it).
        mx = fmax(mx, unsafe { *max_logits.add(base + i) });
        i += REDUCE_THREADS;
    }
    mx = warp_max(mx);
    if lane == 0 {
        // SAFETY: red_max has WARPS words.
        unsafe { *red_max.add(warp) = mx };
    }
    sync_threads();
    let mut mx = f32::NEG_INFINITY;
    for w in 0..WARPS {
        // SAFETY: as above.
        mx = fmax(mx, unsafe { *red_max.add(w) });
    }

    let mut sum = 0f32;
    let mut i = tid;
    while i < n {
        // SAFETY: as above.
        let (m, l) = unsafe { (*max_logits.add(base + i), *exp_sums.add(base + i)) };
        let w = if m == f32::NEG_INFINITY { 0.0 * l } else { exp2(m - mx) * l };
        // SAFETY: i < n <= max_num_partitions, the weights area.
        unsafe { *w_s.add(i) = w };
        sum += w;
        i += REDUCE_THREADS;
    }
    sum = warp_sum(sum);
    if lane == 0 {
        // SAFETY: red_sum has WARPS words.
        unsafe { *red_sum.add(warp) = sum };
    }
    sync_threads();
    let mut sum = 0f32;
    for w in 0..WARPS {
        // SAFETY: as above.
        sum += unsafe { *red_sum.add(w) };
    }
    let inv = 1.0 / sum;

    let tmp = r.tmp_out as *const f32;
    let out = r.out as *mut T;
    let mut d = tid;
    while d < head_size {
        let mut acc = 0f32;
        for i in 0..n {
            // SAFETY: weights area; tmp_out row `base + i` < num_seqs * num_heads * max_num_partitions.
            acc = fma(unsafe { *w_s.add(i) }, unsafe { *tmp.add((base + i) * head_size + d) }, acc);
        }
        let off = seq * r.out_stride_seq as usize + head * r.out_stride_head as usize + d;
        // SAFETY: host-validated output shape and strides.
        unsafe { *out.add(off) = T::from_f32(acc * inv) };
        d += REDUCE_THREADS;
    }
}

#[cfg(feature = "paged_attention")]
macro_rules! export_paged_attention {
    ($dt:ident, $dtn:literal, $h:literal, $b:literal) => {
        const _: () = {
            /// One monomorphized variant; see the module docs.
            ///
            /// # Safety
            /// Launched by the host's dispatch with this variant's geometry on validated buffers.
            #[unsafe(export_name = pagedattn_layout::paged_attention_symbol!($dtn, $h, $b))]
            pub unsafe extern "ptx-kernel" fn kernel(p: PagedAttentionParams) {
                // SAFETY: forwarded from the entry point's contract.
                unsafe { paged_attention::<elem!($dt), elem!($dt), $h, $b>(&p) }
            }
        };
    };
}

#[cfg(feature = "paged_attention")]
pagedattn_layout::for_each_paged_attention_variant!(export_paged_attention);

#[cfg(feature = "paged_attention_fp8")]
macro_rules! export_paged_attention_fp8 {
    ($dt:ident, $dtn:literal, $k:ident, $kn:literal, $h:literal, $b:literal) => {
        const _: () = {
            /// One fp8-cache variant; see the module docs.
            ///
            /// # Safety
            /// Launched by the host's dispatch with this variant's geometry on validated buffers.
            #[unsafe(export_name = pagedattn_layout::paged_attention_fp8_symbol!($dtn, $kn, $h, $b))]
            pub unsafe extern "ptx-kernel" fn kernel(p: PagedAttentionParams) {
                // SAFETY: forwarded from the entry point's contract.
                unsafe { paged_attention::<elem!($dt), fp8_elem!($k), $h, $b>(&p) }
            }
        };
    };
}

#[cfg(feature = "paged_attention_fp8")]
pagedattn_layout::for_each_paged_attention_fp8_variant!(export_paged_attention_fp8);

macro_rules! export_reduce {
    ($dt:ident, $dtn:literal) => {
        const _: () = {
            /// The v2 reduce for one dtype; see [`paged_attention_v2_reduce`].
            ///
            /// # Safety
            /// Launched by the host after the partition kernel, on its workspace.
            #[unsafe(export_name = pagedattn_layout::paged_attention_v2_reduce_symbol!($dtn))]
            pub unsafe extern "ptx-kernel" fn kernel(r: PagedAttentionReduceParams) {
                // SAFETY: forwarded from the entry point's contract.
                unsafe { paged_attention_v2_reduce::<elem!($dt)>(&r) }
            }
        };
    };
}

export_reduce!(F32, "f32");
export_reduce!(F16, "f16");
export_reduce!(BF16, "bf16");

const _: () = assert!(core::mem::size_of::<Chunk>() == 16);
