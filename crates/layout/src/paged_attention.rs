//! vLLM's paged-attention decode op: params, cache layout and launch geometry.
//!
//! Layouts (vLLM's, elements; `x = 16 bytes / element size`):
//! - `query`, `out`: `[num_seqs, num_heads, head_size]` (sequence and head strides given; dims contiguous);
//! - `key_cache`: `[num_blocks, num_kv_heads, head_size / x, block_size, x]`;
//! - `value_cache`: `[num_blocks, num_kv_heads, head_size, block_size]`;
//!   (block and head strides given, so both caches may be views of a larger tensor);
//! - `block_tables`: `[num_seqs, max_num_blocks_per_seq]` int32 (row stride given);
//! - `seq_lens`: `[num_seqs]` int32.
//!
//! Token `t` of sequence `s` lives in physical block `block_tables[s][t / block_size]` at slot
//! `t % block_size`.
//!
//! v1 and v2 run one kernel. With `partition_size == 0` (v1) a CTA covers a whole sequence and
//! writes the normalised output. With `partition_size > 0` (v2) the grid's z axis splits each
//! sequence into partitions of that many tokens: a sequence that fits one partition is still
//! written directly by partition 0; a longer one leaves, per partition `p`, the partial output
//! `tmp_out[s][h][p]` (normalised by its own sum), the running max `max_logits[s][h][p]` (log2
//! domain) and the sum `exp_sums[s][h][p]`, which `paged_attention_v2_reduce` combines:
//! `out = sum_p w_p tmp_out_p / sum_p w_p`, `w_p = 2^(m_p - max_q m_q) * l_p`.

use crate::{DType, KvCacheDType};

/// Kernel parameters of `paged_attention` (v1 and v2's partition kernel), passed by value. Pointers are device addresses (`u64`),
/// strides are in elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PagedAttentionParams {
    /// `[num_seqs, num_heads, head_size]`, strides `out_stride_seq`, `out_stride_head`.
    pub out: u64,
    /// `[num_seqs, num_heads, head_size]`, strides `q_stride_seq`, `q_stride_head`.
    pub query: u64,
    /// `[num_blocks, num_kv_heads, head_size / x, block_size, x]`, strides `kv_block_stride`, `kv_head_stride`.
    pub key_cache: u64,
    /// `[num_blocks, num_kv_heads, head_size, block_size]`, strides `kv_block_stride`, `kv_head_stride`.
    pub value_cache: u64,
    /// `[num_seqs, max_num_blocks_per_seq]` int32, row stride `block_table_stride`.
    pub block_tables: u64,
    /// `[num_seqs]` int32: tokens in each sequence's cache (0 gives a zero output).
    pub seq_lens: u64,
    /// `[num_heads]` f32 ALiBi slopes, or 0 when absent.
    pub maybe_alibi_slopes: u64,
    /// `*mut u32` device status word (see [`crate::status`]), or 0 to report nothing.
    pub maybe_status: u64,
    /// v2 only (0 for v1): f32 `[num_seqs, num_heads, max_num_partitions, head_size]` partial outputs.
    pub tmp_out: u64,
    /// v2 only: f32 `[num_seqs, num_heads, max_num_partitions]` partial sums of `2^(s - m)`.
    pub exp_sums: u64,
    /// v2 only: f32 `[num_seqs, num_heads, max_num_partitions]` partial maxima (log2 domain).
    pub max_logits: u64,
    /// fp8 caches only (0 otherwise): `*const f32` per-tensor dequantization scales in device
    /// memory (read at every launch, so a captured graph follows their updates). A key is
    /// `decode(code) · k_scale`, a value `decode(code) · v_scale`; a scale that is not finite and
    /// positive gives NaN outputs and `BAD_SCALE`.
    pub k_scale: u64,
    pub v_scale: u64,
    /// v2: `*mut u32` arrival counters `[num_seqs, gridDim.y]`, zero between launches; the last
    /// partition CTA of a split sequence merges the partials into `out` and resets its counter. 0:
    /// the partials are left for the separate `paged_attention_v2_reduce` launch.
    pub counters: u64,
    /// Tokens per partition (a multiple of [`PagedAttentionGeometry::TILE`]), or 0 for v1.
    pub partition_size: u32,
    /// Partitions the workspace holds per (sequence, head) = the grid's z extent (v2); longer
    /// sequences are a device-data error (`BAD_SEQ_LEN`).
    pub max_num_partitions: u32,
    pub num_seqs: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    /// Physical blocks in the cache: block ids must be in `0..num_blocks`.
    pub num_blocks: u32,
    pub max_num_blocks_per_seq: u32,
    pub block_table_stride: u32,
    pub q_stride_seq: u32,
    pub q_stride_head: u32,
    pub out_stride_seq: u32,
    pub out_stride_head: u32,
    pub kv_block_stride: u32,
    pub kv_head_stride: u32,
    /// `softmax_scale * log2(e)`: the kernels work in the log2 domain (`ex2` instead of `exp`).
    pub scale_log2: f32,
    /// Longest valid sequence: `max_num_blocks_per_seq * block_size`, or less when the caller
    /// declared a smaller bound (v2's workspace); longer device lengths are `BAD_SEQ_LEN`.
    pub max_seq_len: u32,
    /// vLLM's block-sparse pattern ([`BlockSparse`]); `bs_vert_stride <= 1` is dense attention.
    pub bs_vert_stride: u32,
    /// Sparse block size in tokens (a positive multiple of the cache block size when sparse).
    pub bs_block_size: u32,
    pub bs_local_blocks: u32,
    pub bs_head_sliding_step: i32,
    pub bs_tp_rank: u32,
    pub _pad: u32,
}

/// vLLM's block-sparse attention pattern (runtime parameters, no extra variants). With sparse
/// block size `S` (a multiple of the cache block size), the query's sparse block is
/// `q_bs = (seq_len - 1) / S` and token `t`'s is `k_bs = t / S` (its cache block's first token over
/// `S`, the same thing). Query head `h` (KV head `kvh`) attends the tokens whose `k_bs` satisfies
/// `(k_bs + offset) % vert_stride == 0` or `k_bs > q_bs - local_blocks`, where
/// `offset = (tp_rank * num_heads + h) * head_sliding_step + 1` if `head_sliding_step >= 0`, else
/// `(tp_rank * num_kv_heads + kvh) * (-head_sliding_step) + 1`; other tokens get no weight.
/// `vert_stride <= 1` is dense attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockSparse {
    pub tp_rank: u32,
    pub local_blocks: u32,
    pub vert_stride: u32,
    pub block_size: u32,
    pub head_sliding_step: i32,
}

impl BlockSparse {
    /// Whether the pattern masks anything (`vert_stride > 1`).
    #[inline(always)]
    pub fn is_sparse(&self) -> bool {
        self.vert_stride > 1
    }

    /// `offset mod vert_stride` of query head `head` (of KV head `kv_head`) on this rank.
    #[inline(always)]
    pub fn offset(&self, num_heads: u32, num_kv_heads: u32, head: u32, kv_head: u32) -> u64 {
        let vs = self.vert_stride.max(1) as u64;
        let (idx, step) = if self.head_sliding_step >= 0 {
            (self.tp_rank as u64 * num_heads as u64 + head as u64, self.head_sliding_step as u64)
        } else {
            (self.tp_rank as u64 * num_kv_heads as u64 + kv_head as u64, self.head_sliding_step.unsigned_abs() as u64)
        };
        ((idx % vs) * (step % vs) + 1) % vs
    }

    /// The residue `k_bs % vert_stride` whose sparse blocks head `head`'s vertical stripes keep:
    /// `(vert_stride - offset) % vert_stride`.
    #[inline(always)]
    pub fn residue(&self, num_heads: u32, num_kv_heads: u32, head: u32, kv_head: u32) -> u32 {
        let vs = self.vert_stride.max(1) as u64;
        ((vs - self.offset(num_heads, num_kv_heads, head, kv_head)) % vs) as u32
    }

    /// The pattern of the params (dense when `bs_vert_stride <= 1`).
    #[inline(always)]
    pub fn of(p: &PagedAttentionParams) -> BlockSparse {
        BlockSparse {
            tp_rank: p.bs_tp_rank,
            local_blocks: p.bs_local_blocks,
            vert_stride: p.bs_vert_stride,
            block_size: p.bs_block_size,
            head_sliding_step: p.bs_head_sliding_step,
        }
    }
}

const _: () = assert!(core::mem::size_of::<PagedAttentionParams>() == 14 * 8 + 22 * 4);
const _: () = assert!(core::mem::align_of::<PagedAttentionParams>() == 8);

impl PagedAttentionParams {
    /// Element offset of dims `[c * x, c * x + x)` of token slot `slot` in the key cache, for physical
    /// block `block` and KV head `kv_head` (`c` is the 16-byte chunk index along the head).
    #[inline(always)]
    pub fn key_offset(&self, block: usize, kv_head: usize, chunk: usize, slot: usize, block_size: usize, x: usize) -> usize {
        block * self.kv_block_stride as usize + kv_head * self.kv_head_stride as usize + (chunk * block_size + slot) * x
    }

    /// Element offset of `value_cache[block][kv_head][dim][slot]`.
    #[inline(always)]
    pub fn value_offset(&self, block: usize, kv_head: usize, dim: usize, slot: usize, block_size: usize) -> usize {
        block * self.kv_block_stride as usize + kv_head * self.kv_head_stride as usize + dim * block_size + slot
    }
}

/// Parameters of `paged_attention_v2_reduce_<dtype>`: grid `(num_seqs, num_heads)`,
/// [`REDUCE_THREADS`] threads, [`reduce_smem_bytes`] of dynamic shared memory. Sequences that fit
/// one partition (or have a bad length) were finished by the partition kernel and are skipped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PagedAttentionReduceParams {
    /// `[num_seqs, num_heads, head_size]`, strides `out_stride_seq`, `out_stride_head`.
    pub out: u64,
    /// As in [`PagedAttentionParams`].
    pub tmp_out: u64,
    pub exp_sums: u64,
    pub max_logits: u64,
    /// `[num_seqs]` int32.
    pub seq_lens: u64,
    pub num_heads: u32,
    pub head_size: u32,
    pub partition_size: u32,
    pub max_num_partitions: u32,
    /// `min(max_num_blocks_per_seq * block_size, max_num_partitions * partition_size)`: longer or
    /// negative lengths were flagged by the partition kernel, which also wrote the NaN output.
    pub max_seq_len: u32,
    pub out_stride_seq: u32,
    pub out_stride_head: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<PagedAttentionReduceParams>() == 5 * 8 + 8 * 4);

/// Threads per CTA of the v2 reduce.
pub const REDUCE_THREADS: usize = 128;
/// vLLM's partition size (tokens), the default of v2.
pub const DEFAULT_PARTITION_SIZE: usize = 512;

/// Dynamic shared memory of the v2 reduce: per-partition weights, then a word per warp for each
/// of the two CTA-wide reductions (max, sum).
pub const fn reduce_smem_bytes(max_num_partitions: usize) -> usize {
    (max_num_partitions + 2 * (REDUCE_THREADS / 32)) * 4
}

/// Launch geometry of `paged_attention` (v1 and v2's partition kernel), shared by the kernel (tile constants, shared-memory
/// carve-up) and the host (grid, block, dynamic shared memory).
///
/// One CTA serves one sequence and `heads_per_cta` query heads of one KV head's group, so each K/V
/// element is read once per group (or once per `heads_per_cta` heads when a group is larger).
/// Each warp takes tiles of [`Self::TILE`] tokens: one lane per token for `q·k`, then the lanes
/// re-map onto 16-byte value chunks for `p·v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedAttentionGeometry {
    pub dtype: DType,
    pub cache: KvCacheDType,
    pub head_size: usize,
    pub block_size: usize,
}

impl PagedAttentionGeometry {
    pub const NUM_WARPS: usize = 4;
    pub const NUM_THREADS: usize = Self::NUM_WARPS * 32;
    /// Tokens per warp iteration: one lane per token in the `q·k` phase.
    pub const TILE: usize = 32;
    /// Upper bound of [`Self::heads_per_cta`] (sizes fixed-length register arrays in the kernel).
    /// 4: a CTA computes all `heads_per_cta` heads whatever the group, so 8 made GQA groups of 4
    /// (and MHA) at head sizes 32–64 do twice the arithmetic on padding heads, with 255 registers
    /// (head 64 decoded at 72–75% of the read ceiling vs 90% at head 128; H100, issue 7).
    pub const MAX_HEADS_PER_CTA: usize = 4;

    /// A cache of the query's dtype (`auto`).
    pub const fn new(dtype: DType, head_size: usize, block_size: usize) -> Self {
        Self { dtype, cache: KvCacheDType::Auto, head_size, block_size }
    }

    /// A cache of `cache` elements.
    pub const fn with_cache(dtype: DType, cache: KvCacheDType, head_size: usize, block_size: usize) -> Self {
        Self { dtype, cache, head_size, block_size }
    }

    /// Cache elements per 16-byte key chunk (vLLM's `x`).
    pub const fn key_x(&self) -> usize {
        self.cache.x(self.dtype)
    }

    /// Consecutive tokens of one value dim a lane loads at once in `p·v`: a 16-byte chunk, or the
    /// whole block when it is shorter (fp8 caches with 8-token blocks: 8-byte loads).
    pub const fn value_x(&self) -> usize {
        let x = self.key_x();
        if self.block_size < x { self.block_size } else { x }
    }

    /// Query heads one CTA serves. Each lane accumulates `heads * head_size * chunks_per_row / 32`
    /// output partials, so the product is capped to keep them in registers (64 floats). fp8 caches
    /// (16-token chunks, 2 per row) get the heads of a 16-bit cache: with twice the heads, the
    /// per-head scores, maxima and sums no longer fit beside the partials (ptxas spilled).
    pub const fn heads_per_cta(&self) -> usize {
        let ct = self.value_chunks_per_row();
        let budget = 64 * 32 / if ct < 4 { 4 } else { ct };
        let h = budget / self.head_size;
        let h = if h > Self::MAX_HEADS_PER_CTA { Self::MAX_HEADS_PER_CTA } else { h };
        if h == 0 { 1 } else { h }
    }

    /// Value chunks per head dim in one tile (`TILE / value_x`): lanes that share a dim in `p·v`.
    pub const fn value_chunks_per_row(&self) -> usize {
        Self::TILE / self.value_x()
    }

    /// CTAs along the head axis for `num_heads` query heads over `num_kv_heads` KV heads.
    pub const fn head_groups(&self, num_heads: usize, num_kv_heads: usize) -> usize {
        let group = num_heads / num_kv_heads;
        num_kv_heads * group.div_ceil(self.heads_per_cta())
    }

    /// Shared memory carve-up, in f32 words: `(q, p, m, l, o, flag, total)` offsets.
    /// - `q`: `[heads_per_cta, head_size]` scaled query;
    /// - `p`: `[NUM_WARPS, heads_per_cta, TILE]` probabilities of the current tile;
    /// - `m`, `l`: `[NUM_WARPS, heads_per_cta]` running max and sum per warp;
    /// - `o`: `[NUM_WARPS, heads_per_cta, head_size]` per-warp outputs;
    /// - `flag`: one word, set when a bad block id was skipped;
    /// - `sparse`: block-sparse pattern: per head (`MAX_HEADS_PER_CTA` words) the residue
    ///   `k_bs % vert_stride` of the sparse blocks its vertical stripes keep, then the sparse block
    ///   size, `vert_stride`, `q_bs - local_blocks` (i32) and a spare word.
    pub const fn smem_words(&self) -> SmemCarve {
        let h = self.heads_per_cta();
        let q = 0;
        let p = q + h * self.head_size;
        let m = p + Self::NUM_WARPS * h * Self::TILE;
        let l = m + Self::NUM_WARPS * h;
        let o = l + Self::NUM_WARPS * h;
        let flag = o + Self::NUM_WARPS * h * self.head_size;
        let sparse = flag + 4;
        SmemCarve { q, p, m, l, o, flag, sparse, total: sparse + Self::MAX_HEADS_PER_CTA + 4 }
    }

    /// Dynamic shared memory per CTA.
    pub const fn smem_bytes(&self) -> usize {
        self.smem_words().total * 4
    }
}

/// Offsets (f32 words) into a CTA's dynamic shared memory; see [`PagedAttentionGeometry::smem_words`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmemCarve {
    pub q: usize,
    pub p: usize,
    pub m: usize,
    pub l: usize,
    pub o: usize,
    pub flag: usize,
    pub sparse: usize,
    pub total: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BLOCK_SIZES, DTYPES, FP8_HEAD_SIZES, HEAD_SIZES};

    #[test]
    fn geometry_fits_every_variant() {
        for cache in KvCacheDType::ALL {
            let heads = if cache == KvCacheDType::Auto { HEAD_SIZES } else { FP8_HEAD_SIZES };
            for (&dtype, &head_size, &block_size) in
                DTYPES.iter().flat_map(|d| heads.iter().flat_map(move |h| BLOCK_SIZES.iter().map(move |b| (d, h, b))))
            {
                let g = PagedAttentionGeometry::with_cache(dtype, cache, head_size, block_size);
                let x = g.key_x();
                // A tile never straddles two blocks unevenly.
                let t = PagedAttentionGeometry::TILE;
                assert!(t.is_multiple_of(block_size) || block_size.is_multiple_of(t));
                assert_eq!(DEFAULT_PARTITION_SIZE % t, 0);
                let h = g.heads_per_cta();
                assert!((1..=PagedAttentionGeometry::MAX_HEADS_PER_CTA).contains(&h));
                // p·v: lanes sharing a dim must tile the head exactly.
                let dims_per_pass = 32 / g.value_chunks_per_row();
                assert_eq!(head_size % dims_per_pass, 0, "{dtype} h{head_size}");
                // q·k: the head is a whole number of 16-byte chunks; p·v: chunks inside a block.
                assert_eq!(head_size % x, 0);
                assert_eq!(block_size % g.value_x(), 0);
                assert!(g.smem_bytes() <= 48 * 1024, "{dtype} h{head_size}: {} B", g.smem_bytes());
            }
        }
    }

    #[test]
    fn cache_offsets_follow_vllm_layout() {
        let p = PagedAttentionParams { kv_block_stride: 2 * 64 * 16, kv_head_stride: 64 * 16, ..Default::default() };
        // key_cache[3][1][2][5][:] with head 64, block 16, x = 8
        assert_eq!(p.key_offset(3, 1, 2, 5, 16, 8), 3 * 2048 + 1024 + (2 * 16 + 5) * 8);
        // value_cache[3][1][40][5]
        assert_eq!(p.value_offset(3, 1, 40, 5, 16), 3 * 2048 + 1024 + 40 * 16 + 5);
    }
}
