//! `flash_attn_varlen_func` over a paged KV cache: params and launch geometry (kernel in
//! `kernels-gpu/src/flash_attn.rs`).
//!
//! Layouts (elements): `q`, `out` `[total_q, num_heads, head_size]` (token and head strides given);
//! `k_cache`, `v_cache` `[num_blocks, block_size, num_kv_heads, head_size]` (block, slot and head
//! strides given, per cache); `cu_seqlens_q` `[batch + 1]`, `seqused_k` `[batch]`, `block_table`
//! `[batch, max_blocks]` (row stride given), all i32; `softmax_lse` `[num_heads, total_q]` f32.

/// Kernel parameters, passed by value. Pointers are device addresses (`u64`, 0 when absent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FlashAttnVarlenParams {
    pub out: u64,
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub cu_seqlens_q: u64,
    pub seqused_k: u64,
    pub block_table: u64,
    /// `[num_heads]` f32, or 0.
    pub alibi_slopes: u64,
    /// `[num_heads, total_q]` f32, or 0.
    pub softmax_lse: u64,
    /// `*mut u32` status word, or 0.
    pub maybe_status: u64,
    /// Hopper kernel: device addresses of the bulk-copy tensor maps (`CUtensorMap`, 128 bytes,
    /// 64-byte aligned) of the key and value caches, each over `(head_size, num_kv_heads,
    /// num_blocks · block_size)` with a box of `(64, 1, FlashAttnSm90Geometry::box_rows)` and the
    /// 128-byte swizzle; 0 for the `mma.sync` kernel.
    pub k_map: u64,
    pub v_map: u64,
    /// Hopper kernel: `*mut [u32; 2]` (the next work item, the CTAs finished), zero at launch and
    /// left zero by the kernel, with a grid of at most one CTA per SM; or 0, with a CTA per work
    /// item. 0 for the `mma.sync` kernel.
    pub work_counter: u64,
    pub batch: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub block_size: u32,
    pub max_blocks: u32,
    pub num_blocks: u32,
    pub total_q: u32,
    /// Bounds the host fixed (the grid's row tiles come from `max_seqlen_q`); device data beyond
    /// them is `BAD_SEQ_LEN`.
    pub max_seqlen_q: u32,
    pub max_seqlen_k: u32,
    pub q_stride_token: u32,
    pub q_stride_head: u32,
    pub out_stride_token: u32,
    pub out_stride_head: u32,
    pub k_stride_block: u32,
    pub k_stride_slot: u32,
    pub k_stride_head: u32,
    pub v_stride_block: u32,
    pub v_stride_slot: u32,
    pub v_stride_head: u32,
    pub block_table_stride: u32,
    /// Row tiles per (sequence, KV head): the longest sequence's, `ceil(max_seqlen_q · group /
    /// block_m)`.
    pub row_tiles: u32,
    /// (sequence, KV head) pairs per group of the tile order (see [`varlen_tile`]), ≥ 1.
    pub tile_group: u32,
    /// `softmax_scale` (natural units: soft-cap and ALiBi apply before the kernel moves to log2).
    pub scale: f32,
    /// 0: off.
    pub softcap: f32,
    /// Window bounds with causality folded in (`right = 0` when causal); -1: unbounded.
    pub window_left: i32,
    pub window_right: i32,
}

const _: () = assert!(core::mem::size_of::<FlashAttnVarlenParams>() == 13 * 8 + 26 * 4);

/// A `CUtensorMap` passed by value: 128 opaque bytes (all zeros: none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TensorMapBytes(pub [u64; 16]);

/// Parameters of the Hopper varlen kernel (`kernels-gpu/src/flash_attn_sm90.rs`), passed by value:
/// the Q tensor map by value, so that the kernel's bulk copies read it from its parameter space (a
/// map per call costs no upload and no device memory, and a captured launch keeps its own), then
/// the varlen parameters.
///
/// A map must be 64-byte aligned, and rustc's PTX kernel ABI aligns a parameter to 16 bytes at
/// most: `q_map` sits at offset [`Self::Q_MAP_OFFSET`], which lands 64-byte aligned where the
/// driver places the parameters on `sm_90` (every H100 run so). The kernel checks the generic
/// address it gets (`cvta.param`) and gathers Q rows with `cp.async` when it is not aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FlashAttnSm90Params {
    /// 1: `q_map` is valid (the group divides `BLOCK_M`); 0: the kernel gathers Q rows.
    pub q_tma: u32,
    pub _pad: [u32; 11],
    /// The query tensor `(head_size, num_heads, total_q)` (strides: head, token) with a box of `(64,
    /// group, BLOCK_M / group)` and the 128-byte swizzle: one box is a 64-column panel of a work
    /// item's Q tile, its rows packed as the kernel packs them.
    pub q_map: TensorMapBytes,
    pub varlen: FlashAttnVarlenParams,
}

impl FlashAttnSm90Params {
    pub const Q_MAP_OFFSET: usize = 48;
}

const _: () = assert!(
    core::mem::size_of::<FlashAttnSm90Params>() == 384
        && core::mem::offset_of!(FlashAttnSm90Params, q_map) == FlashAttnSm90Params::Q_MAP_OFFSET
);

/// The work of CTA `cta` of a varlen launch (a 1-D grid of `batch · num_kv_heads · row_tiles`):
/// `(sequence, KV head, row tile)`. The (sequence, KV head) pairs go in groups of `tile_group`
/// whose keys and values fit in L2 together; inside a group the row tiles go last to first, each
/// across the group's pairs, so the heavy (late, causal) tiles start first while the CTAs running
/// at once still share their keys and values in L2. `tile_group` 1 is pair by pair; `batch ·
/// num_kv_heads`, every pair's tile `r` before any tile `r − 1`.
#[inline(always)]
pub fn varlen_tile(cta: u32, batch: u32, num_kv_heads: u32, row_tiles: u32, tile_group: u32) -> (u32, u32, u32) {
    let pairs = batch * num_kv_heads;
    let per_group = tile_group * row_tiles;
    let (g, r) = (cta / per_group, cta % per_group);
    let first = g * tile_group;
    let width = (pairs - first).min(tile_group);
    let pair = first + r % width;
    (pair / num_kv_heads, pair % num_kv_heads, row_tiles - 1 - r / width)
}

/// Launch geometry of the varlen kernel. Rows of a tile are (query, query head) pairs of one
/// sequence and one KV head, query-major: packed row `r` is query `r / group`, head
/// `kv_head · group + r % group` (`group = num_heads / num_kv_heads`), so the K/V tiles a CTA
/// stages serve every query head of the group. A CTA of [`Self::NUM_WARPS`] warps takes
/// [`Self::block_m`] packed rows (each warp `16 · m_tiles` rows, `m_tiles` `mma.m16n8k16` row
/// tiles sharing every K/V fragment) and walks the visible keys [`Self::block_n`] at a time.
/// Grid `(ceil(max_seqlen_q · group / block_m), num_kv_heads, batch)`.
pub struct FlashAttnGeometry;

impl FlashAttnGeometry {
    pub const NUM_WARPS: usize = 4;
    pub const NUM_THREADS: usize = Self::NUM_WARPS * 32;
    /// The largest `block_n`.
    pub const MAX_BLOCK_N: usize = 64;
    /// The largest `block_m`.
    pub const MAX_BLOCK_M: usize = 32 * Self::NUM_WARPS;
    /// Halves of padding per shared-memory row: rows of `head_size + 8` halves start 16 bytes apart
    /// in the bank cycle, so the eight rows an `ldmatrix` reads hit distinct banks.
    pub const ROW_PAD: usize = 8;

    /// `head_size` rounded up to whole `k` steps of the mma (16): the kernel's tiles are this wide,
    /// the columns past `head_size` zeros (head 120 runs as 128).
    pub const fn padded(head_size: usize) -> usize {
        head_size.div_ceil(16) * 16
    }

    /// Row tiles of 16 per warp: 2 up to head 128 (each K/V fragment feeds two mmas), 1 above (the
    /// output accumulators of two tiles would not fit in registers).
    pub const fn m_tiles(head_size: usize) -> usize {
        if Self::padded(head_size) <= 128 { 2 } else { 1 }
    }

    /// Keys per step: 64, or 32 where two row tiles of a wide head (80–128) would otherwise need more
    /// than 255 registers (the scores of 2 × 16 rows × 64 keys are 64 per lane).
    pub const fn block_n(head_size: usize) -> usize {
        if Self::m_tiles(head_size) == 2 && Self::padded(head_size) > 64 { 32 } else { 64 }
    }

    /// Packed rows per CTA.
    pub const fn block_m(head_size: usize) -> usize {
        16 * Self::NUM_WARPS * Self::m_tiles(head_size)
    }

    /// Shared-memory row length (halves) for `head_size`.
    pub const fn row(head_size: usize) -> usize {
        Self::padded(head_size) + Self::ROW_PAD
    }

    /// Dynamic shared memory: Q `[block_m][row]`, two stages of K and V `[block_n][row]` halves
    /// (the next tile loads while this one is used), then a flag word (16 bytes kept).
    pub const fn smem_bytes(head_size: usize) -> usize {
        (Self::block_m(head_size) + 4 * Self::block_n(head_size)) * Self::row(head_size) * 2 + 16
    }
}

/// Head sizes of the varlen kernel (every head size of the walking skeleton; 120 runs padded to 128).
pub const FLASH_HEAD_SIZES: &[usize] = &[32, 64, 80, 96, 112, 120, 128, 192, 256];

/// Head sizes of the Hopper varlen kernel (`kernels-gpu/src/flash_attn_sm90.rs`); the others run
/// on the `mma.sync` kernel everywhere.
pub const FLASH_SM90_HEAD_SIZES: &[usize] = &[64, 128, 256];

/// Launch geometry of the Hopper varlen kernel: three warpgroups of 128 threads, the first the
/// producer (it loads the Q tile with bulk tensor copies or a `cp.async` gather, then K and V
/// tiles page by page with bulk tensor copies), the other two consumers of [`Self::CONSUMER_ROWS`] packed rows each (rows packed as in [`FlashAttnGeometry`]). Grid
/// `(ceil(max_seqlen_q · group / BLOCK_M), num_kv_heads, batch)`.
///
/// Shared memory, from a 1024-byte aligned base (the 128-byte swizzle repeats every 8 rows of 128
/// bytes): Q `[BLOCK_M][head]`, then [`Self::stages`] stages of K and V `[block_n][head]`, each tile
/// stored as column panels of 64 elements (128-byte rows, the 16-byte pieces of row `r` rotated by
/// XOR with `r % 8`), then the barriers (per stage: K full, V full, K empty, V empty; then Q's) and
/// the flag word.
pub struct FlashAttnSm90Geometry;

impl FlashAttnSm90Geometry {
    pub const NUM_WARPGROUPS: usize = 3;
    pub const NUM_THREADS: usize = Self::NUM_WARPGROUPS * 128;
    /// Packed rows per consumer warpgroup (one `wgmma` m64 tile).
    pub const CONSUMER_ROWS: usize = 64;
    pub const BLOCK_M: usize = 2 * Self::CONSUMER_ROWS;
    /// Registers per thread the producer keeps and the consumers take (`setmaxnreg`, from the 168
    /// of the entry cap): 128 · (24 + 2 · 240) = 64512, all the CTA has.
    pub const PRODUCER_REGS: u32 = 24;
    pub const CONSUMER_REGS: u32 = 240;

    /// Keys per tile.
    pub const fn block_n(head_size: usize) -> usize {
        if head_size <= 128 { 128 } else { 64 }
    }

    /// Q tiles in flight: two at head 64 (the next work item's Q loads while the consumers finish
    /// this one), one above. At head 128 a second Q buffer fits only in place of a third key or
    /// value stage, which measured 5% slower (H100, paged prefix: 3.87 M cycles against 3.69 M).
    pub const fn q_buffers(head_size: usize) -> usize {
        if head_size <= 64 { 2 } else { 1 }
    }

    /// Key stages in flight (three up to head 128; two of 64 keys at 256).
    pub const fn k_stages(head_size: usize) -> usize {
        if head_size <= 128 { 3 } else { 2 }
    }

    /// Value stages in flight (as many as key stages).
    pub const fn v_stages(head_size: usize) -> usize {
        Self::k_stages(head_size)
    }

    /// Byte offset of Q buffer `q` (the tiles start with the Q buffers, then the key stages, then
    /// the value stages).
    pub const fn q_offset(head_size: usize, q: usize) -> usize {
        q * Self::BLOCK_M * head_size * 2
    }

    /// Byte offset of key stage `stage`.
    pub const fn k_offset(head_size: usize, stage: usize) -> usize {
        (Self::q_buffers(head_size) * Self::BLOCK_M + stage * Self::block_n(head_size)) * head_size * 2
    }

    /// Byte offset of value stage `stage`; stage `v_stages` is the end of the tiles.
    pub const fn v_offset(head_size: usize, stage: usize) -> usize {
        Self::k_offset(head_size, Self::k_stages(head_size)) + stage * Self::block_n(head_size) * head_size * 2
    }

    /// Bytes of the tiles (the Q buffers and every stage).
    pub const fn tile_bytes(head_size: usize) -> usize {
        Self::v_offset(head_size, Self::v_stages(head_size))
    }

    /// `mbarrier`s: K and V full and empty per stage; Q full and empty and the item's per Q buffer.
    pub const fn barriers(head_size: usize) -> usize {
        2 * (Self::k_stages(head_size) + Self::v_stages(head_size)) + 3 * Self::q_buffers(head_size)
    }

    /// Rows of one bulk copy (the tensor maps' box): a page, at most a tile.
    pub const fn box_rows(block_size: usize, head_size: usize) -> usize {
        let bn = Self::block_n(head_size);
        if block_size < bn { block_size } else { bn }
    }

    /// Dynamic shared memory: the tiles, up to 1008 bytes of alignment, then 256 bytes for the
    /// barriers ([`Self::barriers`]) and words (the flag word, a spare, a broadcast word, two
    /// 24-byte item slots).
    pub const fn smem_bytes(head_size: usize) -> usize {
        Self::tile_bytes(head_size) + 1024 + 256
    }
}

/// `merge_attn_states` parameters, passed by value: `[num_tokens, num_heads, head_size]` outputs
/// (token and head strides given, the head dim contiguous) and `[num_heads, num_tokens]` f32 LSEs
/// (head and token strides given). Pointers are device addresses; `output_lse` 0 when absent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MergeAttnStatesParams {
    pub output: u64,
    pub output_lse: u64,
    pub prefix_output: u64,
    pub prefix_lse: u64,
    pub suffix_output: u64,
    pub suffix_lse: u64,
    pub num_tokens: u32,
    pub num_heads: u32,
    pub head_size: u32,
    /// `[token, head]` strides of output, prefix_output, suffix_output.
    pub out_strides: [u32; 2],
    pub prefix_strides: [u32; 2],
    pub suffix_strides: [u32; 2],
    /// `[head, token]` strides of output_lse, prefix_lse, suffix_lse.
    pub out_lse_strides: [u32; 2],
    pub prefix_lse_strides: [u32; 2],
    pub suffix_lse_strides: [u32; 2],
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<MergeAttnStatesParams>() == 6 * 8 + 15 * 4 + 4);

/// `merge_attn_states` launch: grid `(num_tokens, num_heads)`, one CTA of this many threads per
/// (token, head), the threads striding over the head dim.
pub const MERGE_THREADS: usize = 64;

const _: () = assert!(8 * FlashAttnSm90Geometry::barriers(64) + 12 + 48 <= 256);
const _: () = assert!(8 * FlashAttnSm90Geometry::barriers(128) + 12 + 48 <= 256);
const _: () = assert!(8 * FlashAttnSm90Geometry::barriers(256) + 12 + 48 <= 256);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::varlen_tile;
    use std::vec;

    /// Every (sequence, KV head, row tile) once, row tiles descending inside a group.
    #[test]
    fn varlen_tile_order_is_a_permutation() {
        for (batch, kvh, rows) in [(1, 1, 1), (3, 2, 5), (8, 8, 13), (7, 3, 1), (1, 8, 64)] {
            for group in [1, 2, 3, 5, batch * kvh, batch * kvh + 4] {
                let n = batch * kvh * rows;
                let mut seen = vec![false; n as usize];
                let mut last = None;
                for cta in 0..n {
                    let (b, h, r) = varlen_tile(cta, batch, kvh, rows, group);
                    assert!(b < batch && h < kvh && r < rows, "{cta}: {b} {h} {r}");
                    let i = ((b * kvh + h) * rows + r) as usize;
                    assert!(!seen[i], "{cta} repeats ({b}, {h}, {r})");
                    seen[i] = true;
                    let g = (b * kvh + h) / group;
                    if let Some((lg, lr)) = last {
                        assert!(g > lg || (g == lg && r <= lr), "group {group}: cta {cta} breaks the order");
                    }
                    last = Some((g, r));
                }
                assert!(seen.iter().all(|&s| s));
            }
        }
    }
}
