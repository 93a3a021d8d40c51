//! `flash_attn_varlen_func` over a paged KV cache on Hopper (`sm_90a`): `wgmma` and warp
//! specialization. The same function as `flash_attn.rs` (masks, soft-cap, ALiBi, LSE, device-data
//! guards; the shared pieces are `varlen.rs`), the same CPU reference (`host/src/cpu/flash_attn.rs`)
//! and tests (`tests/flash_attn.rs`, run on both kernels).
//!
//! Persistent: a grid of at most one CTA per SM (a CTA per item while a graph is captured), 384
//! threads (launch bounds 384 × 1 CTA, so `ptxas` caps registers at 168 on entry),
//! `FlashAttnSm90Geometry::smem_bytes(D)` of dynamic shared memory. The work items — 128 packed rows
//! of one sequence and KV head, `batch · num_kv_heads · row_tiles` of them in `varlen_tile`'s order —
//! come from a device counter, one at a time per CTA:
//! - warpgroup 0, the producer, drops to 24 registers (`setmaxnreg`). It takes the next item, hands
//!   it to the consumers (a shared slot on the item's `item_full` barrier) and loads its Q tile into
//!   a free Q buffer (`q_empty`; completing on `q_full`; two buffers at head 64, one above): one
//!   bulk tensor copy per 64-column panel from the Q tensor map passed by value in the kernel's
//!   parameter (`FlashAttnSm90Params`), or, where the query group does not divide the tile's 128
//!   rows (or the map's address is not aligned), a `cp.async` gather row by row. With the map the
//!   consumers release the buffer right after their last `S = Q·Kᵀ` of an item, so the next
//!   item's Q loads under the last softmax, `P·V` and stores. Then its four warps fill the
//!   key and value stages with bulk tensor copies (`cp.async.bulk.tensor`), one box per page and
//!   64-column panel, from the tensor maps the host keeps for the caches (`host/src/tma.rs`), in
//!   the 128-byte swizzled layout `wgmma` reads. Each key or value stage completes on its `full`
//!   barrier (byte counts) and is refilled after both consumers released it on its `empty`
//!   barrier. A bad block id reads as zeros (its box lies outside the tensor) and raises the
//!   item's flag bit.
//! - warpgroups 1 and 2, the consumers, grow to 240 registers and own 64 rows each: per tile,
//!   `S = Q·Kᵀ` (`wgmma` m64nNk16, Q and K from shared memory), the logits and online softmax of
//!   `varlen.rs` on the accumulators, then `O += P·V` (`wgmma` m64nDk16, P from registers, V from
//!   shared memory transposed). A tile's `Q·Kᵀ` is issued with the previous tile's `P·V`, so its
//!   softmax runs while that product finishes, and the two consumers take turns issuing (named
//!   barriers), so one's softmax runs under the other's products. After a row's first tile the
//!   exps do not wait for the tile's row maxima (`varlen::exponentiate_ahead`): they use the
//!   reference of the tiles before, which may lag the maximum as long as the probabilities stay
//!   below `varlen::P_LIMIT`; past it the warp rebases after the tile's `P·V` (`varlen::rebase`,
//!   rare), recomputing any score whose exp overflowed from q and the cache (`logit`).
//!
//! Finally `O / l` and the LSE are written from registers, as in the `mma.sync` kernel, while the
//! producer already loads the next item.

use crate::intrinsics::{
    Bf16, Chunk, Element, atomic_add, atomic_add_acq_rel, atomic_and, atomic_or, block_idx_x, dynamic_smem_chunks, fma, grid_dim_x,
    shfl_idx, store_chunk, sync_threads, sync_warp, thread_idx_x, vote_any,
};
use crate::tensor_core::{self as tc, MmaElem};
use crate::varlen::{self, Logits};
use crate::wgmma as wg;
use pagedattn_layout::{FlashAttnSm90Geometry as Geo, FlashAttnSm90Params, FlashAttnVarlenParams, status, varlen_tile};

const BM: usize = Geo::BLOCK_M;

/// The first barrier of each kind (K, V) of the stages; stage `st`'s is 8 · `st` bytes further.
#[derive(Clone, Copy)]
struct Stages {
    k: u32,
    v: u32,
}

/// A work item as the producer hands it to the consumers (`b == u32::MAX`: no more): the
/// sequence, KV head and first packed row, and the sequence's bounds it validated.
#[derive(Clone, Copy)]
struct Slot {
    b: u32,
    kvh: u32,
    m0: u32,
    q0: u32,
    sq: u32,
    sk: u32,
}

/// Stage and barrier parity of tile `it` with `stages` stages (32-bit: a division by 3 on 64
/// bits cost a wide multiply in every loop).
#[inline(always)]
fn stage_of(it: usize, stages: usize) -> (usize, u32) {
    let (it, n) = (it as u32, stages as u32);
    ((it % n) as usize, (it / n) & 1)
}

/// Byte offset of 16-byte piece `c` of row `r` in a swizzled tile of `rows` rows (see `wgmma`).
#[inline(always)]
fn swizzled(r: usize, c: usize, rows: usize) -> usize {
    (c / 8) * rows * 128 + r * 128 + (((c % 8) ^ (r % 8)) * 16)
}

/// The rare path of `varlen::rebase`: this lane's element `e` of score tile `nt` of tile `it` of
/// the item in `slot`, in log2 units, recomputed from q and the key cache in global memory as an f32
/// dot product of the rows the copies read (a padding row or a bad block id: 0, not read). It
/// derives everything from the slot, the parameters and the thread index, so the loop keeps none
/// of it live.
///
/// # Safety
/// `slot` is the item's slot in shared memory (it stays until the item is done), `p` the launch's
/// validated parameters, called by a consumer thread.
#[inline(always)]
unsafe fn logit<E: MmaElem, const D: usize, const NS: usize>(
    p: &FlashAttnVarlenParams,
    slot: *const Slot,
    it: u32,
    nt: u32,
    e: u32,
) -> f32 {
    let f = |x: u16| if E::BF16 { Bf16(x).to_f32() } else { f16::from_bits(x).to_f32() };
    // SAFETY: the caller's slot.
    let sl = unsafe { slot.read_volatile() };
    // (Both ≥ 1, host-checked; `max` spares the divisions their panic branch.)
    let (group, bs) = ((p.num_heads / p.num_kv_heads.max(1)).max(1), p.block_size.max(1));
    let seq = varlen::Seq { q0: sl.q0 as usize, sq: sl.sq as usize, sk: sl.sk as usize, group: group as usize, kvh: sl.kvh as usize };
    let first = Logits::new(p, &seq, sl.m0 as usize, BM, NS * 8).first as u32;
    let tid = thread_idx_x() as u32;
    let lane = tid % 32;
    let pr = sl.m0 + (tid / 128 - 1) * 64 + (tid % 128 / 32) * 16 + lane / 4 + 8 * (e / 2);
    let j = first + it * (NS * 8) as u32 + nt * 8 + 2 * (lane % 4) + e % 2;
    let mut acc = 0f32;
    if pr < sl.sq * group && j < sl.sk {
        // SAFETY: row b of the block table (b < batch: the producer validated the slot);
        // j < sk ≤ max_blocks · block_size: the entry exists.
        let blk = unsafe { *(p.block_table as *const i32).add(sl.b as usize * p.block_table_stride as usize + (j / bs) as usize) };
        if blk >= 0 && (blk as u32) < p.num_blocks {
            let (token, head) = ((sl.q0 + pr / group) as usize, (sl.kvh * group + pr % group) as usize);
            let q = token * p.q_stride_token as usize + head * p.q_stride_head as usize;
            let k = blk as usize * p.k_stride_block as usize
                + (j % bs) as usize * p.k_stride_slot as usize
                + sl.kvh as usize * p.k_stride_head as usize;
            // SAFETY: a query row and a cache row of D elements (host-validated shapes and strides).
            let (q, k) = unsafe { ((p.q as *const u16).add(q), (p.k_cache as *const u16).add(k)) };
            for d in 0..D {
                // SAFETY: d < D.
                acc = fma(f(unsafe { *q.add(d) }), f(unsafe { *k.add(d) }), acc);
            }
        }
    }
    acc * p.scale * varlen::LOG2E
}

/// # Safety
/// Launched with the geometry above on buffers the host validated (16-byte aligned rows of q, k, v;
/// 4-byte aligned rows of out).
#[inline(always)]
pub unsafe fn flash_attn_sm90<E: MmaElem, const D: usize, const ND: usize, const NS: usize, const EXTRAS: bool>(
    p: &FlashAttnVarlenParams,
    q_map: u64,
    param: impl Fn() -> u64,
) {
    // ND: 8-column tiles of the output (D / 8); NS: of the scores (block_n / 8).
    const { assert!((D == 64 || D == 128 || D == 256) && ND * 8 == D && NS * 8 == Geo::block_n(D) && NS <= 16) };
    let bn = NS * 8;
    let (k_stages, v_stages, q_bufs) = (Geo::k_stages(D), Geo::v_stages(D), Geo::q_buffers(D) as u32);
    // Work item wi's Q buffer (and `q_full`, `q_empty`, `item_full` barrier) and that barrier's
    // phase parity for it.
    let q_ring = |wi: u32| ((wi % q_bufs) as usize, (wi / q_bufs) & 1);
    let tid = thread_idx_x();

    // Shared memory from a 1024-byte boundary: Q, the K/V stages, the barriers, the flag words.
    let smem = dynamic_smem_chunks() as *mut u8;
    let raw = tc::shared_addr(smem);
    let pad = (raw.wrapping_neg() & 1023) as usize;
    let base = raw + pad as u32;
    // SAFETY: the launch-sized carve-up (smem_bytes keeps 1024 bytes for the alignment).
    let gbase = unsafe { smem.add(pad) };
    let k_at = |st: usize| Geo::k_offset(D, st);
    let v_at = |st: usize| Geo::v_offset(D, st);
    let bars = base + Geo::tile_bytes(D) as u32;
    // Each key and value stage has a `full` barrier (the producer's bytes landed) and an `empty`
    // one (both consumers are done with it): a key tile is refilled as soon as its S = Q·Kᵀ is
    // done, values a tile later. Each Q buffer has `q_full` (the producer's copies landed) and
    // `q_empty` (every consumer warp's last S = Q·Kᵀ of its work item is done), and `item_full`.
    let bar = |i: usize| bars + 8 * i as u32;
    let full = Stages { k: bar(0), v: bar(k_stages) };
    let empty = Stages { k: bar(k_stages + v_stages), v: bar(2 * k_stages + v_stages) };
    let nb = 2 * (k_stages + v_stages);
    // (Per Q buffer, one after the other.)
    let (q_full, q_empty) = (bar(nb), bar(nb + q_bufs as usize));
    // The producer hands each work item to the consumers in a slot of `ring` (even and odd items),
    // on its Q buffer's `item_full`.
    let item_full = bar(nb + 2 * q_bufs as usize);
    // After the barriers: the flag word (a bit per item, see `produce_kv`), a spare word, the
    // producer's broadcast word, the two item slots (`Slot`).
    // SAFETY: after the barriers, inside the carve-up (`smem_bytes` keeps 256 bytes for them).
    let words = unsafe { gbase.add(Geo::tile_bytes(D) + 8 * Geo::barriers(D)) as *mut u32 };
    let flags = words;
    // SAFETY: as above.
    let (fetched, ring) = unsafe { (words.add(2), words.add(3) as *mut Slot) };
    if tid == 0 {
        for (bars, n) in [(full.k, k_stages), (full.v, v_stages)] {
            for st in 0..n {
                // SAFETY: 8-byte aligned words of the carve-up, used by no thread before the
                // barrier below.
                unsafe { wg::mbarrier_init(bars + 8 * st as u32, 1) };
            }
        }
        for (bars, n) in [(empty.k, k_stages), (empty.v, v_stages)] {
            for st in 0..n {
                // SAFETY: as above.
                unsafe { wg::mbarrier_init(bars + 8 * st as u32, 8) };
            }
        }
        for qb in 0..q_bufs {
            // SAFETY: as above.
            unsafe {
                // (The producer threads' `cp.async` arrivals, or one with the byte count.)
                wg::mbarrier_init(q_full + 8 * qb, if q_map != 0 { 1 } else { 128 });
                wg::mbarrier_init(q_empty + 8 * qb, 8);
                wg::mbarrier_init(item_full + 8 * qb, 1);
            }
        }
        // SAFETY: the flag word.
        unsafe { *flags = 0 };
        wg::fence_mbarrier_init();
    }
    sync_threads();

    // Persistent: the grid's CTAs (one per SM at most) take work items from a device counter
    // (`work_counter[0]`) in `varlen_tile`'s order, heavy (late, causal) tiles first in groups
    // sharing their keys and values in L2: a CTA that finishes early takes the next item, as the
    // hardware would start the next CTA, but the producer runs ahead into it (its Q once a Q
    // buffer is free, its keys and values as stages free up) while the consumers finish this one's
    // P·V and store it, so most of an item's start-up is hidden. The last CTA to finish
    // zeroes the counters for the next launch (`work_counter[1]` counts finished CTAs). Items,
    // K/V tiles (`kv`) and barrier phases are counted alike on both sides. Without a counter (the
    // host passes none while capturing a graph) the grid has a CTA per item and each takes its own.
    let items = p.batch * p.num_kv_heads * p.row_tiles;
    let counter = p.work_counter as *mut u32;

    if tid < 128 {
        wg::setmaxnreg_dec::<{ Geo::PRODUCER_REGS }>();
        let (mut kv, mut wi) = (0usize, 0u32);
        let mut own = Some(block_idx_x() as u32);
        // The CTA's `wi`-th item: the next one with rows (a bad sequence's rows are written NaN
        // here, its flag raised), its flag bit cleared (see `produce_kv`). (An L2 prefetch of its Q
        // rows here measured 2.6% slower: ncu cycles, paged prefix.)
        let mut fetch = |wi: u32| loop {
            if tid == 0 {
                let w = if counter.is_null() {
                    own.take().unwrap_or(items)
                } else {
                    // SAFETY: the host's two-word counter.
                    unsafe { atomic_add(counter, 1) }
                };
                // SAFETY: the shared broadcast word.
                unsafe { *fetched = w };
                // SAFETY: the shared flag word; bit wi % 32 was last read by the consumers 32
                // items ago.
                unsafe { atomic_and(flags, !(1 << (wi % 32))) };
            }
            wg::barrier_sync(4, 128);
            // SAFETY: written before the barrier above.
            let w = unsafe { *fetched };
            wg::barrier_sync(4, 128);
            if w >= items {
                return None;
            }
            let (b, kvh, mt) = varlen_tile(w, p.batch, p.num_kv_heads, p.row_tiles, p.tile_group);
            let (b, m0) = (b as usize, mt as usize * BM);
            // SAFETY: b < batch.
            if let Some(seq) = unsafe { varlen::sequence::<E, D>(p, b, kvh as usize, m0, BM, tid, 128) }
                && m0 < seq.rows()
            {
                return Some((b, m0, seq));
            }
        };
        loop {
            // (Fetched once the previous item's copies are all issued: the consumers are then a
            // few tiles from its end, time enough for the atomic and the table reads.)
            let item = fetch(wi).map(|(b, m0, seq)| {
                let lg = Logits::new(p, &seq, m0, BM, bn);
                (b, m0, seq, lg.first, lg.tiles)
            });
            let (qb, parity) = q_ring(wi);
            if wi >= q_bufs {
                // SAFETY: an initialized barrier: the consumers' last S = Q·Kᵀ of item wi − q_bufs,
                // the last in this Q buffer, is done (so they also waited for its `item_full`
                // phase and read its slot, and the slot before it).
                unsafe { wg::mbarrier_wait(q_empty + 8 * qb as u32, parity ^ 1) };
            }
            if tid == 0 {
                let slot = match item {
                    Some((b, m0, seq, ..)) => {
                        Slot { b: b as u32, kvh: seq.kvh as u32, m0: m0 as u32, q0: seq.q0 as u32, sq: seq.sq as u32, sk: seq.sk as u32 }
                    }
                    None => Slot { b: u32::MAX, kvh: 0, m0: 0, q0: 0, sq: 0, sk: 0 },
                };
                // SAFETY: this item's slot; read by the consumers after the arrival below.
                unsafe { *ring.add(wi as usize & 1) = slot };
                // SAFETY: an initialized barrier (one arrival).
                unsafe { wg::mbarrier_arrive(item_full + 8 * qb as u32) };
            }
            let Some((b, m0, seq, first, tiles)) = item else { break };
            // SAFETY: the carve-up above; the consumers are done with this Q buffer.
            unsafe { produce_q::<D, ND>(p, q_map, &seq, m0, tid, base + Geo::q_offset(D, qb) as u32, q_full + 8 * qb as u32) };
            // SAFETY: as above.
            unsafe { produce_kv::<D>(p, &seq, b, first, tiles, kv, wi, bn, tid, base, flags, full, empty) };
            kv += tiles;
            wi += 1;
        }
        if tid == 0 && !counter.is_null() {
            // Every CTA's last fetch happened before its count here (release / acquire): the last
            // one zeroes both words.
            // SAFETY: the host's two-word counter.
            if unsafe { atomic_add_acq_rel(counter.add(1), 1) } == grid_dim_x() as u32 - 1 {
                // SAFETY: as above; no CTA of this launch touches them any more.
                unsafe {
                    *counter = 0;
                    *counter.add(1) = 0;
                }
            }
        }
        return;
    }
    wg::setmaxnreg_inc::<{ Geo::CONSUMER_REGS }>();
    // Broadcast from lane 0, so `ptxas` sees a warp-uniform value: the descriptors derived from it
    // took fewer vector instructions and `R2UR` moves (48 → 40 per tile).
    let cw = f32::to_bits(shfl_idx(f32::from_bits((tid / 128 - 1) as u32), 0)) as usize;
    let ctid = tid % 128;
    let (warp, lane) = (ctid / 32, ctid % 32);
    let (g, t) = (lane / 4, lane % 4);
    // This lane's rows: tile-local rows cw · 64 + warp · 16 + g and + 8.
    let local = |r: usize| cw * 64 + warp * 16 + g + 8 * r;
    // Descriptors: Q rows cw · 64 .. (K-major, k step kk: panel kk / 4, 32 bytes per step inside
    // it); K of stage st the same over bn rows; V of stage st at keys 16 ks (MN-major, panels bn ·
    // 128 bytes apart). Each is a base descriptor plus an offset (`wgmma::desc_add`), so no
    // descriptor is kept in registers across the loop.
    let (kq_desc, v_desc0) = (wg::desc(base, 16, 1024), wg::desc(base, (bn * 128) as u32, 1024));
    let q_desc =
        |qb: usize, kk: usize| wg::desc_add(kq_desc, (Geo::q_offset(D, qb) + (kk / 4) * BM * 128 + cw * 64 * 128 + (kk % 4) * 32) as u32);
    let k_desc = |st: usize, kk: usize| wg::desc_add(kq_desc, (k_at(st) + (kk / 4) * bn * 128 + (kk % 4) * 32) as u32);
    let v_desc = |st: usize, ks: usize| wg::desc_add(v_desc0, (v_at(st) + ks * 16 * 128) as u32);

    let (my_turn, their_turn) = (1 + cw as u32, 2 - cw as u32);
    let early = q_map != 0;
    // False at run time (the host always passes the key map), unknown to `ptxas` (see
    // `wgmma::before_wait`).
    let never = p.k_map == 0;
    let group = (p.num_heads / p.num_kv_heads) as usize;
    // Ping-pong: the consumers take turns issuing their products (named barriers 1 + cw, 256
    // threads: this consumer syncs on its own, the other arrives on it), so one's softmax runs
    // under the other's products. The turns run on across work items (both consumers take the
    // same number per item): consumer 1 hands the first one to consumer 0 here, and consumer 0
    // takes the last hand-over after the loop. Handing the turn over afresh per item would let
    // consumer 1 arrive twice in a row (its last turn of one item, its first of the next) before
    // consumer 0 synced: the two arrivals complete the barrier without consumer 0, which then
    // waits forever.
    if cw == 1 {
        wg::barrier_arrive(their_turn, 256);
    }
    let (mut kv, mut wi) = (0usize, 0u32);
    loop {
        let (qb, q_parity) = q_ring(wi);
        // SAFETY: an initialized barrier: the producer wrote this item's slot before arriving.
        unsafe { wg::mbarrier_wait(item_full + 8 * qb as u32, q_parity) };
        // SAFETY: as above.
        let slot = unsafe { *ring.add(wi as usize & 1) };
        if slot.b == u32::MAX {
            break;
        }
        let m0 = slot.m0 as usize;
        let seq = varlen::Seq { q0: slot.q0 as usize, sq: slot.sq as usize, sk: slot.sk as usize, group, kvh: slot.kvh as usize };
        let lg = Logits::new(p, &seq, m0, BM, bn);
        let (first, tiles) = (lg.first, lg.tiles);
        let mut slope = [0f32; 2];
        let mut qi = [0i32; 2];
        for r in 0..2 {
            let pr = m0 + local(r);
            qi[r] = seq.query(pr) as i32;
            if EXTRAS && p.alibi_slopes != 0 {
                // SAFETY: `[num_heads]` slopes.
                slope[r] = unsafe { *(p.alibi_slopes as *const f32).add(seq.head(pr)) };
            }
        }
        // Tile it's S = Q·Kᵀ (64 rows × bn keys) is issued together with tile it − 1's O += P·V: the
        // softmax of tile it then runs while the tensor cores finish that P·V (FlashAttention-3's
        // intra-warpgroup overlap). P waits in registers, as A fragments of 16 keys.
        let issue_s = #[inline(always)]
        |s: &mut [[f32; 4]; NS], st: usize| {
            for kk in 0..D / 16 {
                // SAFETY: descriptors of the landed Q tile and stage st; the whole warpgroup runs it.
                unsafe { wg::ss::<E, NS>(s, q_desc(qb, kk), k_desc(st, kk), kk > 0) };
            }
            wg::commit();
        };
        let issue_pv = #[inline(always)]
        |o: &mut [[f32; 4]; ND], pa: &[[u32; 4]; 8], st: usize| {
            for ks in 0..bn / 16 {
                // SAFETY: a descriptor of stage st's V tile; the whole warpgroup runs it.
                unsafe { wg::rs::<E, ND>(o, pa[ks], v_desc(st, ks), true) };
            }
            wg::commit();
        };
        // Tile it's keys or values are done in this warp: one of the 8 arrivals.
        let release = #[inline(always)]
        |bars: u32, stages: usize, it: usize| {
            if lane == 0 {
                // SAFETY: an initialized barrier (8 arrivals: every consumer warp).
                unsafe { wg::mbarrier_arrive(bars + 8 * stage_of(kv + it, stages).0 as u32) };
            }
        };
        let wait_k = #[inline(always)]
        |it: usize| {
            // SAFETY: an initialized barrier; the fill's bytes have all landed when its phase completes.
            let (st, parity) = stage_of(kv + it, k_stages);
            // SAFETY: as above.
            unsafe { wg::mbarrier_wait(full.k + 8 * st as u32, parity) };
        };
        // A tile's bulk copies read whole pages: past the sequence's last key the page holds whatever
        // the cache holds there, which the masks hide from S but P · V would still multiply (0 · NaN).
        // On the tile that holds the last key, consumer 0 zeroes those value rows, then both meet.
        let sk = seq.sk;
        let wait_v = #[inline(always)]
        |it: usize| {
            let (st, parity) = stage_of(kv + it, v_stages);
            // SAFETY: an initialized barrier; the fill's bytes have all landed when its phase completes.
            unsafe { wg::mbarrier_wait(full.v + 8 * st as u32, parity) };
            let n0 = first + it * bn;
            if n0 + bn > sk {
                if cw == 0 {
                    let mut c = ctid;
                    while c < bn * ND {
                        let (r, cc) = (c / ND, c % ND);
                        if n0 + r >= sk {
                            // SAFETY: a 16-byte piece of stage st's value tile.
                            unsafe { store_chunk(gbase.add(v_at(st) + swizzled(r, cc, bn)), Chunk([0; 4])) };
                        }
                        c += 128;
                    }
                    // Ordinary stores, read next by the tensor cores.
                    wg::fence_proxy_async();
                }
                wg::barrier_sync(3, 256);
            }
        };
        // Logits and the online softmax of tile it: returns the correction of the output so far,
        // and whether the exps went ahead of the row maxima (`varlen::exponentiate_ahead`: every
        // row of the warp has a reference, no soft-cap or ALiBi), with the lane's row sums, which
        // `finish` adds once the tile's P·V is done. Else the sums are `l_run`.
        let softmax = #[inline(always)]
        |s: &mut [[f32; 4]; NS], it: usize, m_run: &mut [f32; 2], l_run: &mut [f32; 2]| {
            let n0 = first + it * bn;
            let ls = lg.prepare::<NS, EXTRAS>(s, bn, n0, lg.whole(n0), t, qi, slope);
            if !EXTRAS && it > 0 && !vote_any(m_run[0] == f32::NEG_INFINITY || m_run[1] == f32::NEG_INFINITY) {
                return ([1f32; 2], varlen::exponentiate_ahead(s, bn, ls, *m_run), true);
            }
            let (m_ref, corr) = varlen::row_max(s, bn, ls, m_run, l_run);
            varlen::exponentiate(s, bn, ls, m_ref, l_run);
            (corr, *l_run, false)
        };
        // After an ahead step: the rare rebase (a probability past `P_LIMIT`), then the row sums.
        let finish = #[inline(always)]
        |s: &mut [[f32; 4]; NS], it: usize, m_run: &mut [f32; 2], l_run: &mut [f32; 2], mut l: [f32; 2]| {
            let mut corr = [1f32; 2];
            if vote_any(l[0] > varlen::P_LIMIT || l[1] > varlen::P_LIMIT) {
                // `logit` reads the parameters through their address taken here (an `asm`, so
                // nothing of it is hoisted into the loop's live registers) and takes nothing else
                // from the loop but the item's slot and the tile.
                let (slot, it) = (ring.wrapping_add(wi as usize & 1), it as u32);
                let pp = (param() + core::mem::offset_of!(FlashAttnSm90Params, varlen) as u64) as *const FlashAttnVarlenParams;
                corr = varlen::rebase(s, bn, m_run, &mut l, |nt, e| {
                    // SAFETY: the kernel's parameter; this item's slot (see `logit`).
                    unsafe { logit::<E, D, NS>(&*pp, slot, it, nt as u32, e as u32) }
                });
            }
            for r in 0..2 {
                l_run[r] = fma(l_run[r], corr[r], l[r]);
            }
            corr
        };
        let to_a = #[inline(always)]
        |s: &[[f32; 4]; NS], pa: &mut [[u32; 4]; 8]| {
            for ks in 0..bn / 16 {
                pa[ks] = varlen::a_fragment::<E, NS>(s, ks);
                wg::fence_a(&mut pa[ks]);
            }
        };

        // Every S = Q·Kᵀ of the item is done: the producer may load the next item's Q (with a Q
        // map, right after the last S; the `cp.async` gather, issued by the producer's 128
        // threads, measured faster after the last softmax).
        let q_release = #[inline(always)]
        || {
            if lane == 0 {
                // SAFETY: an initialized barrier (8 arrivals: every consumer warp).
                unsafe { wg::mbarrier_arrive(q_empty + 8 * qb as u32) };
            }
        };
        let mut o = [[0f32; 4]; ND];
        let (mut m_run, mut l_run) = ([f32::NEG_INFINITY; 2], [0f32; 2]);
        let mut pa = [[0u32; 4]; 8];
        // (Waited even without tiles: no copy is left in flight when the CTA ends.)
        // SAFETY: an initialized barrier: every producer thread's Q copies landed (generic proxy).
        unsafe { wg::mbarrier_wait(q_full + 8 * qb as u32, q_parity) };
        wg::fence_proxy_async();
        if tiles > 0 {
            wait_k(0);
            let mut s = [[0f32; 4]; NS];
            wg::barrier_sync(my_turn, 256);
            wg::fence();
            issue_s(&mut s, stage_of(kv, k_stages).0);
            wg::barrier_arrive(their_turn, 256);
            wg::wait::<0>();
            wg::fence_regs(&mut s);
            release(empty.k, k_stages, 0);
            if early && tiles == 1 {
                q_release();
            }
            // (The first tile has no reference yet: never ahead.)
            softmax(&mut s, 0, &mut m_run, &mut l_run);
            to_a(&s, &mut pa);
        }
        for it in 1..tiles {
            wait_k(it);
            wait_v(it - 1);
            let mut s = [[0f32; 4]; NS];
            wg::fence_regs(&mut o);
            wg::barrier_sync(my_turn, 256);
            wg::fence();
            issue_s(&mut s, stage_of(kv + it, k_stages).0);
            issue_pv(&mut o, &pa, stage_of(kv + it - 1, v_stages).0);
            wg::barrier_arrive(their_turn, 256);
            wg::wait::<1>();
            wg::fence_regs(&mut s);
            release(empty.k, k_stages, it);
            if early && it + 1 == tiles {
                q_release();
            }
            let (mut corr, sums, ahead) = softmax(&mut s, it, &mut m_run, &mut l_run);
            // The row sums need every probability of the tile: the wait stays below the softmax.
            wg::before_wait(sums, never, base);
            wg::wait::<0>();
            wg::fence_regs(&mut o);
            release(empty.v, v_stages, it - 1);
            if ahead {
                corr = finish(&mut s, it, &mut m_run, &mut l_run, sums);
            }
            if vote_any(corr[0] != 1.0 || corr[1] != 1.0) {
                varlen::rescale(&mut o, D, corr);
            }
            to_a(&s, &mut pa);
        }
        if !early || tiles == 0 {
            q_release();
        }
        if tiles > 0 {
            wait_v(tiles - 1);
            wg::fence_regs(&mut o);
            wg::barrier_sync(my_turn, 256);
            wg::fence();
            issue_pv(&mut o, &pa, stage_of(kv + tiles - 1, v_stages).0);
            wg::barrier_arrive(their_turn, 256);
            wg::wait::<0>();
            wg::fence_regs(&mut o);
            release(empty.v, v_stages, tiles - 1);
        }
        // SAFETY: the flag word: this item's bit was set by the producer before its arrivals on the
        // `full` barriers this thread waited on, and is cleared 32 items later (see `produce_kv`).
        let bad = unsafe { flags.read_volatile() } & (1 << (wi % 32)) != 0;
        if bad && ctid == 0 && cw == 0 && p.maybe_status != 0 {
            // SAFETY: a non-null status pointer is a device u32.
            unsafe { atomic_or(p.maybe_status as *mut u32, status::BAD_BLOCK_ID) };
        }
        for r in 0..2 {
            let l = varlen::quad_sum(l_run[r]);
            let pr = m0 + local(r);
            if pr < seq.rows() {
                // SAFETY: pr is one of the sequence's rows.
                unsafe { varlen::store_row::<E, D, ND>(p, &seq, pr, &o, r, t, l, m_run[r], bad) };
            }
        }
        kv += tiles;
        wi += 1;
    }
    // Consumer 1's last hand-over has no turn after it: consumer 0 takes it, so both barriers end
    // balanced.
    if cw == 0 {
        wg::barrier_sync(my_turn, 256);
    }
}

/// The producer warpgroup's (threads `ptid` 0..128) Q tile of a work item with `cp.async` into Q
/// buffer `base`, on its `q_full`; called once the consumers released the buffer (`q_empty`).
///
/// # Safety
/// Called by the producer warpgroup of [`flash_attn_sm90`] with its carve-up.
#[inline(always)]
unsafe fn produce_q<const D: usize, const ND: usize>(
    p: &FlashAttnVarlenParams,
    q_map: u64,
    seq: &varlen::Seq,
    m0: usize,
    ptid: usize,
    base: u32,
    q_full: u32,
) {
    if q_map != 0 {
        // One box per 64-column panel: the rows from (query m0 / group, the KV head's first query
        // head) on, packed as the kernel packs them (the group divides BLOCK_M, so m0 is a
        // multiple of it). Rows past the sequence hold the next sequence's queries or zeros (past
        // the tensor); their outputs are never stored.
        if ptid == 0 {
            let (token, head) = ((seq.q0 + seq.query(m0)) as i32, (seq.kvh * seq.group) as i32);
            // SAFETY: an initialized barrier (one arrival: this thread).
            unsafe { wg::mbarrier_arrive_expect_tx(q_full, (BM * D * 2) as u32) };
            for panel in 0..D / 64 {
                // SAFETY: the kernel parameter's map of q; 1024-byte aligned panels of the buffer.
                unsafe { wg::tma_load_3d(base + (panel * BM * 128) as u32, q_map, [(panel * 64) as i32, head, token], q_full) };
            }
        }
        return;
    }
    // Q rows (rows past the sequence: zeros, through the copy path too so that the barrier, which
    // counts this thread's copies, covers them).
    // Thread ptid copies piece cc of rows r0, r0 + step, ...: the (query, head) of each row
    // follows from the last by adding step's quotient and remainder by the group, so its address
    // by adding a fixed byte step and, when the head wraps, one more token less a group of heads
    // (one division per item: the per-row divisions and their spills, then the per-row address
    // products, were most of the producer's issue time). Rows past the sequence are zero-filled.
    let (step, cc) = (128 / ND, ptid % ND);
    let r0 = ptid / ND;
    let (g, valid) = (seq.group as u32, seq.rows().saturating_sub(m0));
    let (dq, dh) = (step / seq.group, (step % seq.group) as u32);
    let mut hi = (seq.head(m0 + r0) - seq.kvh * seq.group) as u32;
    let (st, sh) = (p.q_stride_token as usize * 2, p.q_stride_head as usize * 2);
    let (byte_step, wrap) = ((dq * st).wrapping_add(dh as usize * sh), st.wrapping_sub(seq.group * sh));
    let mut src = (p.q as usize).wrapping_add((seq.q0 + seq.query(m0 + r0)) * st + (seq.kvh * seq.group + hi as usize) * sh + cc * 16);
    // 32-bit row counters; with a step of whole swizzle periods (8 rows: head ≤ 128) the
    // destination moves by a constant too.
    let (r0, valid) = (r0 as u32, valid.min(BM) as u32);
    let mut at = base + swizzled(r0 as usize, cc, BM) as u32;
    for k in 0..ND as u32 {
        let r = r0 + k * step as u32;
        let ok = r < valid;
        // SAFETY: a query's head row (16-byte aligned, host-checked) where ok; else nothing is
        // read (the source is q itself).
        unsafe { tc::cp_async_16_fill(at, if ok { src } else { p.q as usize } as *const u8, if ok { 16 } else { 0 }) };
        src = src.wrapping_add(byte_step);
        hi += dh;
        if hi >= g {
            hi -= g;
            src = src.wrapping_add(wrap);
        }
        at = if step % 8 == 0 { at + (step * 128) as u32 } else { base + swizzled((r + step as u32) as usize, cc, BM) as u32 };
    }
    // SAFETY: an initialized barrier (128 arrivals: every producer thread).
    unsafe { wg::cp_async_mbarrier_arrive(q_full) };
}

/// The producer warpgroup's (threads `ptid` 0..128) K/V tiles of a work item (the `wi`-th of this CTA; its K/V tiles are the CTA's `kv`-th onwards): its four warps
/// fill each stage's keys and values with bulk tensor copies, one per page (box) and 64-column
/// panel, on the stage's `full` barriers, once both consumers released the stage's previous tile.
/// A bad block id sets bit `wi % 32` of the flag word (cleared when the item was fetched): the
/// consumers read it after the item's last `full` wait.
///
/// # Safety
/// Called by the producer warpgroup of [`flash_attn_sm90`] with its carve-up.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn produce_kv<const D: usize>(
    p: &FlashAttnVarlenParams,
    seq: &varlen::Seq,
    b: usize,
    first: usize,
    tiles: usize,
    kv: usize,
    wi: u32,
    bn: usize,
    ptid: usize,
    base: u32,
    flags: *mut u32,
    full: Stages,
    empty: Stages,
) {
    let kv_bytes = bn * D * 2;
    // Warps 0 and 2 load the keys, 1 and 3 the values, each warp every other box: with small
    // pages the copies one thread can issue are the limit (page 16, one warp for all: 337
    // TFLOP/s; a warp per K and V: 425). In each warp, lane l looks up the block of box l of a
    // tile (one table load for the warp) and lane 0 takes the slots by shuffle and issues the
    // copies; warps 0 and 1 set each fill's byte count.
    let (values, half, lane) = (ptid / 32 % 2 == 1, ptid / 64, ptid % 32);
    // SAFETY: row b of the table (b < batch; the row stride validated).
    let table = unsafe { (p.block_table as *const i32).add(b * p.block_table_stride as usize) };
    let bs = p.block_size as usize;
    let rows = Geo::box_rows(bs, D);
    let boxes = bn / rows;
    // A slot past the cache: its box reads as zeros.
    let outside = (p.num_blocks as usize * bs) as i32;
    let (sk, kvh) = (seq.sk, seq.kvh as i32);
    let box_slot = |it: usize| {
        let j = first + it * bn + lane * rows;
        if lane >= boxes || j >= sk {
            return outside;
        }
        // SAFETY: j < sk <= max_blocks · block_size, so the table entry exists.
        let blk = unsafe { *table.add(j / bs) };
        if blk >= 0 && (blk as u32) < p.num_blocks {
            (blk as usize * bs + j % bs) as i32
        } else {
            // SAFETY: the shared flag word.
            unsafe { atomic_or(flags, 1 << (wi % 32)) };
            outside
        }
    };
    // Tile it's keys or values into its stage once both consumers released the stage's
    // previous tile (`slots`: this lane's box slot of tile it).
    let fill = #[inline(always)]
    |it: usize, slots: i32, map: u64, values: bool, full: u32, empty: u32| {
        let stages = if values { Geo::v_stages(D) } else { Geo::k_stages(D) };
        let (st, parity) = stage_of(kv + it, stages);
        let dst = base + if values { Geo::v_offset(D, st) } else { Geo::k_offset(D, st) } as u32;
        let (full, empty) = (full + 8 * st as u32, empty + 8 * st as u32);
        if kv + it >= stages {
            // SAFETY: an initialized barrier.
            unsafe { wg::mbarrier_wait(empty, parity ^ 1) };
        }
        // A lane's flag bit (every warp looks up every box) before lane 0's arrival, which
        // releases it to the consumers.
        sync_warp();
        if lane == 0 && half == 0 {
            // SAFETY: an initialized barrier (one arrival: this thread; the other warp's
            // copies may land first, the count is signed).
            unsafe { wg::mbarrier_arrive_expect_tx(full, kv_bytes as u32) };
        }
        let mut bx = half;
        while bx < boxes {
            let slot = shfl_idx(f32::from_bits(slots as u32), bx as u32).to_bits() as i32;
            if lane == 0 {
                for panel in 0..D / 64 {
                    let at = (panel * bn * 128 + bx * rows * 128) as u32;
                    // SAFETY: the host's map of the cache; 1024-byte aligned rows of the stage.
                    unsafe { wg::tma_load_3d(dst + at, map, [(panel * 64) as i32, kvh, slot], full) };
                }
            }
            bx += 2;
        }
    };
    // Tile by tile; the block ids of the next tile are looked up before this tile's copies
    // are issued, so the lookup is in flight meanwhile.
    let (map, full, empty) = if values { (p.v_map, full.v, empty.v) } else { (p.k_map, full.k, empty.k) };
    let mut next = if tiles > 0 { box_slot(0) } else { outside };
    for it in 0..tiles {
        let slots = next;
        if it + 1 < tiles {
            next = box_slot(it + 1);
        }
        fill(it, slots, map, values, full, empty);
    }
}

/// The generic address of the Q map in the kernel's parameter (`param` its address), or 0 (gather Q
/// rows) where it is not 64-byte aligned, as a map must be (see `FlashAttnSm90Params`).
#[inline(always)]
fn q_map_address(param: u64) -> u64 {
    let at = param + FlashAttnSm90Params::Q_MAP_OFFSET as u64;
    if at.is_multiple_of(64) { at } else { 0 }
}

/// The Q map's address for entry point `$symbol` with parameter `$p`, or 0 (gather Q rows).
macro_rules! q_map {
    ($p:expr, $symbol:expr) => {
        if $p.q_tma != 0 { q_map_address(wg::param_address!($symbol)) } else { 0 }
    };
}

macro_rules! export_flash_attn_sm90 {
    ($dt:ident, $dtn:literal, $h:literal) => {
        const _: () = {
            /// One Hopper varlen variant without soft-cap and ALiBi; see the module docs.
            ///
            /// # Safety
            /// Launched by the host's dispatch with this variant's geometry on validated buffers,
            /// `softcap == 0` and no ALiBi slopes.
            #[unsafe(export_name = pagedattn_layout::flash_attn_sm90_symbol!($dtn, $h))]
            pub unsafe extern "ptx-kernel" fn kernel(p: FlashAttnSm90Params) {
                let q_map = q_map!(p, pagedattn_layout::flash_attn_sm90_symbol!($dtn, $h));
                let param = || wg::param_address!(pagedattn_layout::flash_attn_sm90_symbol!($dtn, $h));
                // SAFETY: forwarded from the entry point's contract.
                unsafe { flash_attn_sm90::<tc_elem!($dt), $h, { $h / 8 }, { Geo::block_n($h) / 8 }, false>(&p.varlen, q_map, param) }
            }
        };
        const _: () = {
            /// One Hopper varlen variant with soft-cap and ALiBi; see the module docs.
            ///
            /// # Safety
            /// Launched by the host's dispatch with this variant's geometry on validated buffers.
            #[unsafe(export_name = pagedattn_layout::flash_attn_sm90_extras_symbol!($dtn, $h))]
            pub unsafe extern "ptx-kernel" fn kernel(p: FlashAttnSm90Params) {
                let q_map = q_map!(p, pagedattn_layout::flash_attn_sm90_extras_symbol!($dtn, $h));
                let param = || wg::param_address!(pagedattn_layout::flash_attn_sm90_extras_symbol!($dtn, $h));
                // SAFETY: forwarded from the entry point's contract.
                unsafe { flash_attn_sm90::<tc_elem!($dt), $h, { $h / 8 }, { Geo::block_n($h) / 8 }, true>(&p.varlen, q_map, param) }
            }
        };
    };
}

pagedattn_layout::for_each_flash_attn_sm90_variant!(export_flash_attn_sm90);
