//! vLLM's KV-cache ops: params and index math of `reshape_and_cache`, `reshape_and_cache_flash` and
//! `copy_blocks` (kernels in `kernels-gpu/src/cache.rs`). `swap_blocks` is a series of driver copies
//! and has no kernel.
//!
//! Layouts (vLLM's, elements; `x = 16 bytes / element size`):
//! - `key`, `value`: `[num_tokens, num_kv_heads, head_size]` (token and head strides given; dims contiguous);
//! - `slot_mapping`: `[num_tokens]` int64: token `t` goes to slot `s = slot_mapping[t]` of the cache,
//!   i.e. block `s / block_size`, offset `s % block_size`; a negative slot is padding (skipped);
//! - `reshape_and_cache`: `key_cache` `[num_blocks, num_kv_heads, head_size / x, block_size, x]`,
//!   `value_cache` `[num_blocks, num_kv_heads, head_size, block_size]` (block and head strides given);
//! - `reshape_and_cache_flash`: `key_cache`, `value_cache` `[num_blocks, block_size, num_kv_heads, head_size]`
//!   (block, slot and head strides given, separately per cache), so that vLLM's combined
//!   `[2, num_blocks, block_size, H, D]` and `[num_blocks, 2, block_size, H, D]` tensors and the HND
//!   layout `[num_blocks, H, block_size, D]` are all views of this shape;
//! - `copy_blocks`: per layer one key and one value cache of any layout whose axis 0 is the block and
//!   whose other axes are contiguous, so a block is one span of bytes.

/// Threads per CTA of `reshape_and_cache_flash`, at most (one CTA per token loops over its elements).
pub const RESHAPE_MAX_THREADS: usize = 512;
/// Threads per CTA of `reshape_and_cache` (vLLM layout).
pub const RESHAPE_TILE_THREADS: usize = 256;
/// Tokens per CTA of `reshape_and_cache` (vLLM layout), at most: 16 consecutive slots fill a 32-byte
/// sector of a bf16/f16 value-cache row, and 16 keys make 256 contiguous bytes of a key chunk row.
pub const RESHAPE_TILE_TOKENS: usize = 16;
/// Dynamic shared memory a `reshape_and_cache` CTA may use (the default limit, no opt-in needed).
pub const RESHAPE_MAX_SMEM_BYTES: usize = 48 * 1024;
/// Threads per CTA of `copy_blocks`.
pub const COPY_BLOCKS_THREADS: usize = 256;

/// Shared-memory bytes of a `reshape_and_cache` tile of `tokens` tokens with elements of
/// `elem_bytes` (`x = 16 / elem_bytes`): keys `[tokens, head_size + x]` (rows of whole 16-byte
/// chunks, one chunk of padding so that 16-byte reads of one chunk across tokens do not conflict),
/// values `[tokens, head_size + 2]` (the padding spreads the token-fastest reads over the banks), then
/// the tokens' blocks and offsets (`u32`, `[tokens]` each). `head_size` is a multiple of `x`.
pub const fn reshape_tile_bytes(tokens: usize, head_size: usize, elem_bytes: usize) -> usize {
    reshape_tile_index_offset(tokens, head_size, elem_bytes) + tokens * 8
}

/// Byte offset of the blocks/offsets arrays in a `reshape_and_cache` tile: after the key and value
/// rows, rounded up to 4 bytes (fp8 rows have odd lengths).
pub const fn reshape_tile_index_offset(tokens: usize, head_size: usize, elem_bytes: usize) -> usize {
    let x = 16 / elem_bytes;
    (tokens * (2 * head_size + x + 2) * elem_bytes).next_multiple_of(4)
}

/// Tokens per `reshape_and_cache` CTA for a head size: [`RESHAPE_TILE_TOKENS`], or fewer when that
/// tile would not fit [`RESHAPE_MAX_SMEM_BYTES`]; 0 when not even one token fits.
pub const fn reshape_tile_tokens(head_size: usize, elem_bytes: usize) -> usize {
    let fit = RESHAPE_MAX_SMEM_BYTES / reshape_tile_bytes(1, head_size, elem_bytes);
    if fit < RESHAPE_TILE_TOKENS { fit } else { RESHAPE_TILE_TOKENS }
}

/// Threads of a `reshape_and_cache_flash` CTA that moves `units` items per token: one per item, in
/// whole warps, capped at [`RESHAPE_MAX_THREADS`].
pub const fn reshape_threads(units: usize) -> usize {
    let t = units.div_ceil(32) * 32;
    if t > RESHAPE_MAX_THREADS {
        RESHAPE_MAX_THREADS
    } else if t == 0 {
        32
    } else {
        t
    }
}

/// Kernel parameters of `reshape_and_cache_<dtype>`, passed by value. Pointers are device addresses,
/// strides are in elements. Grid `(ceil(num_tokens / tokens_per_cta), num_kv_heads)`,
/// [`RESHAPE_TILE_THREADS`] threads, [`reshape_tile_bytes`]`(tokens_per_cta, head_size, element
/// size)` bytes of dynamic shared memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReshapeAndCacheParams {
    /// `[num_tokens, num_kv_heads, head_size]`, strides `key_stride_token`, `key_stride_head`.
    pub key: u64,
    /// `[num_tokens, num_kv_heads, head_size]`, strides `value_stride_token`, `value_stride_head`.
    pub value: u64,
    /// `[num_blocks, num_kv_heads, head_size / x, block_size, x]`, strides `key_cache_stride_block`,
    /// `key_cache_stride_head`; the three inner axes contiguous.
    pub key_cache: u64,
    /// `[num_blocks, num_kv_heads, head_size, block_size]`, strides `value_cache_stride_block`,
    /// `value_cache_stride_head`; the two inner axes contiguous.
    pub value_cache: u64,
    /// `[num_tokens]` int64, contiguous.
    pub slot_mapping: u64,
    /// `*mut u32` device status word (see [`crate::status`]), or 0 to report nothing.
    pub maybe_status: u64,
    /// `num_blocks * block_size`: slots must be below it ([`crate::status::BAD_SLOT`] otherwise).
    pub num_slots: u64,
    /// fp8 caches only (0 otherwise): `*const f32` per-tensor scales in device memory; the cache
    /// stores `encode(key / k_scale)` and `encode(value / v_scale)` (round to nearest even,
    /// saturating). A scale that is not finite and positive skips the launch's writes and raises
    /// `BAD_SCALE`.
    pub k_scale: u64,
    pub v_scale: u64,
    pub num_tokens: u32,
    pub num_kv_heads: u32,
    pub head_size: u32,
    pub block_size: u32,
    pub key_stride_token: u32,
    pub key_stride_head: u32,
    pub value_stride_token: u32,
    pub value_stride_head: u32,
    pub key_cache_stride_block: u32,
    pub key_cache_stride_head: u32,
    pub value_cache_stride_block: u32,
    pub value_cache_stride_head: u32,
    /// Consecutive tokens per CTA ([`reshape_tile_tokens`]).
    pub tokens_per_cta: u32,
    /// 1 when every row of `key` and `value` starts on a 16-byte boundary (16-byte loads).
    pub kv_vec16: u32,
    /// 1 when every 16-byte chunk of the key cache is 16-byte aligned (16-byte stores).
    pub key_cache_vec16: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<ReshapeAndCacheParams>() == 9 * 8 + 16 * 4);
const _: () = assert!(core::mem::align_of::<ReshapeAndCacheParams>() == 8);

impl ReshapeAndCacheParams {
    /// Element offset of `key[token][head][dim]`.
    #[inline(always)]
    pub fn key_offset(&self, token: usize, head: usize, dim: usize) -> usize {
        token * self.key_stride_token as usize + head * self.key_stride_head as usize + dim
    }

    /// Element offset of `value[token][head][dim]`.
    #[inline(always)]
    pub fn value_offset(&self, token: usize, head: usize, dim: usize) -> usize {
        token * self.value_stride_token as usize + head * self.value_stride_head as usize + dim
    }

    /// Element offset of `key_cache[block][head][dim / x][offset][dim % x]` (`x` elements per 16 bytes).
    #[inline(always)]
    pub fn key_cache_offset(&self, block: usize, head: usize, dim: usize, offset: usize, x: usize) -> usize {
        block * self.key_cache_stride_block as usize
            + head * self.key_cache_stride_head as usize
            + (dim / x * self.block_size as usize + offset) * x
            + dim % x
    }

    /// Element offset of `value_cache[block][head][dim][offset]`.
    #[inline(always)]
    pub fn value_cache_offset(&self, block: usize, head: usize, dim: usize, offset: usize) -> usize {
        block * self.value_cache_stride_block as usize
            + head * self.value_cache_stride_head as usize
            + dim * self.block_size as usize
            + offset
    }
}

/// Kernel parameters of `reshape_and_cache_flash_<dtype>`, passed by value. Pointers are device
/// addresses, strides are in elements. Grid `(num_tokens)`, [`reshape_threads`]`(num_kv_heads *
/// head_size / unit)` threads, where the unit is 16 bytes when `vec16` is set, else one element.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReshapeAndCacheFlashParams {
    /// `[num_tokens, num_kv_heads, head_size]`, strides `key_stride_token`, `key_stride_head`.
    pub key: u64,
    /// `[num_tokens, num_kv_heads, head_size]`, strides `value_stride_token`, `value_stride_head`.
    pub value: u64,
    /// `[num_blocks, block_size, num_kv_heads, head_size]`, strides `key_cache_stride_block`,
    /// `key_cache_stride_slot`, `key_cache_stride_head`; the head dim contiguous.
    pub key_cache: u64,
    /// `[num_blocks, block_size, num_kv_heads, head_size]`, strides `value_cache_stride_block`,
    /// `value_cache_stride_slot`, `value_cache_stride_head`; the head dim contiguous.
    pub value_cache: u64,
    /// `[num_tokens]` int64, contiguous.
    pub slot_mapping: u64,
    /// `*mut u32` device status word (see [`crate::status`]), or 0 to report nothing.
    pub maybe_status: u64,
    /// `num_blocks * block_size`: slots must be below it ([`crate::status::BAD_SLOT`] otherwise).
    pub num_slots: u64,
    /// fp8 caches only (0 otherwise): `*const f32` per-tensor scales in device memory; the cache
    /// stores `encode(key / k_scale)` and `encode(value / v_scale)` (round to nearest even,
    /// saturating). A scale that is not finite and positive skips the launch's writes and raises
    /// `BAD_SCALE`.
    pub k_scale: u64,
    pub v_scale: u64,
    pub num_tokens: u32,
    pub num_kv_heads: u32,
    pub head_size: u32,
    pub block_size: u32,
    pub key_stride_token: u32,
    pub key_stride_head: u32,
    pub value_stride_token: u32,
    pub value_stride_head: u32,
    pub key_cache_stride_block: u32,
    pub key_cache_stride_slot: u32,
    pub key_cache_stride_head: u32,
    pub value_cache_stride_block: u32,
    pub value_cache_stride_slot: u32,
    pub value_cache_stride_head: u32,
    /// 1 when every row (a head of a token, in the four tensors) starts on a 16-byte boundary and
    /// `head_size` is a whole number of 16-byte chunks: the kernel then copies 16 bytes at a time.
    /// fp8 caches: 1 when every row of `key`/`value` holds whole 16-byte chunks at 16-byte
    /// boundaries and every cache row starts on a `16 / element size`-byte boundary.
    pub vec16: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<ReshapeAndCacheFlashParams>() == 9 * 8 + 16 * 4);
const _: () = assert!(core::mem::align_of::<ReshapeAndCacheFlashParams>() == 8);

impl ReshapeAndCacheFlashParams {
    /// Element offset of row `key[token][head][..]`.
    #[inline(always)]
    pub fn key_row(&self, token: usize, head: usize) -> usize {
        token * self.key_stride_token as usize + head * self.key_stride_head as usize
    }

    /// Element offset of row `value[token][head][..]`.
    #[inline(always)]
    pub fn value_row(&self, token: usize, head: usize) -> usize {
        token * self.value_stride_token as usize + head * self.value_stride_head as usize
    }

    /// Element offset of row `key_cache[block][offset][head][..]`.
    #[inline(always)]
    pub fn key_cache_row(&self, block: usize, offset: usize, head: usize) -> usize {
        block * self.key_cache_stride_block as usize
            + offset * self.key_cache_stride_slot as usize
            + head * self.key_cache_stride_head as usize
    }

    /// Element offset of row `value_cache[block][offset][head][..]`.
    #[inline(always)]
    pub fn value_cache_row(&self, block: usize, offset: usize, head: usize) -> usize {
        block * self.value_cache_stride_block as usize
            + offset * self.value_cache_stride_slot as usize
            + head * self.value_cache_stride_head as usize
    }
}

/// Kernel parameters of `copy_blocks`, passed by value. Grid `(num_pairs, num_layers)` (pairs on x,
/// whose limit is 2³¹ − 1; layers on y, at most 65535), [`COPY_BLOCKS_THREADS`] threads.
///
/// Block `b` of layer `l`'s key cache is the `key_block_bytes` bytes at
/// `key_cache_ptrs[l] + b * key_block_stride_bytes` (likewise for values); every one of these
/// numbers and addresses is a multiple of 16.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CopyBlocksParams {
    /// `[num_layers]` u64: device address of block 0 of each layer's key cache.
    pub key_cache_ptrs: u64,
    /// `[num_layers]` u64: device address of block 0 of each layer's value cache.
    pub value_cache_ptrs: u64,
    /// `[num_pairs, 2]` int64, contiguous: `(src, dst)` block ids.
    pub block_mapping: u64,
    /// `*mut u32` device status word (see [`crate::status`]), or 0 to report nothing.
    pub maybe_status: u64,
    pub key_block_stride_bytes: u64,
    pub value_block_stride_bytes: u64,
    /// Bytes copied per key block (the block's contiguous span).
    pub key_block_bytes: u64,
    /// Bytes copied per value block.
    pub value_block_bytes: u64,
    pub num_layers: u32,
    pub num_pairs: u32,
    /// Block ids must be in `0..num_blocks` ([`crate::status::BAD_BLOCK_ID`] otherwise).
    pub num_blocks: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<CopyBlocksParams>() == 8 * 8 + 4 * 4);
const _: () = assert!(core::mem::align_of::<CopyBlocksParams>() == 8);

/// `swap_blocks` (the kernel path, used when a call's blocks are scattered): CTA `i` copies block
/// `block_mapping[i][0]` of `src` to block `block_mapping[i][1]` of `dst`. Either side may be device
/// memory or page-locked host memory (with unified addressing the host address is valid in a
/// kernel: the copy goes over PCIe). Grid `num_pairs`, [`COPY_BLOCKS_THREADS`] threads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SwapBlocksParams {
    /// Address of block 0 of the source (device or mapped pinned host), 16-byte aligned.
    pub src: u64,
    /// Address of block 0 of the destination, 16-byte aligned.
    pub dst: u64,
    /// `[num_pairs, 2]` int64 on the device, contiguous: `(src, dst)` block ids.
    pub block_mapping: u64,
    /// `*mut u32` device status word (see [`crate::status`]), or 0 to report nothing.
    pub maybe_status: u64,
    pub src_block_stride_bytes: u64,
    pub dst_block_stride_bytes: u64,
    /// Bytes per block (a multiple of 16).
    pub block_bytes: u64,
    pub num_pairs: u32,
    /// Ids must be in `0..src_num_blocks` / `0..dst_num_blocks` ([`crate::status::BAD_BLOCK_ID`]).
    pub src_num_blocks: u32,
    pub dst_num_blocks: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<SwapBlocksParams>() == 7 * 8 + 4 * 4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_offsets_follow_vllm_layout() {
        // head 64, block 16, x = 8, 2 KV heads, contiguous caches.
        let p = ReshapeAndCacheParams {
            head_size: 64,
            block_size: 16,
            key_stride_token: 2 * 64,
            key_stride_head: 64,
            key_cache_stride_block: 2 * 64 * 16,
            key_cache_stride_head: 64 * 16,
            value_cache_stride_block: 2 * 64 * 16,
            value_cache_stride_head: 64 * 16,
            ..Default::default()
        };
        assert_eq!(p.key_offset(3, 1, 5), 3 * 128 + 64 + 5);
        // key_cache[3][1][42 / 8 = 5][7][42 % 8 = 2]
        assert_eq!(p.key_cache_offset(3, 1, 42, 7, 8), 3 * 2048 + 1024 + (5 * 16 + 7) * 8 + 2);
        // value_cache[3][1][42][7]
        assert_eq!(p.value_cache_offset(3, 1, 42, 7), 3 * 2048 + 1024 + 42 * 16 + 7);
    }

    #[test]
    fn flash_rows_follow_strides() {
        // HND view `[num_blocks, block_size, H, D]` of a `[num_blocks, H, block_size, D]` tensor.
        let (h, bs, d) = (4, 16, 128);
        let p = ReshapeAndCacheFlashParams {
            key_cache_stride_block: (h * bs * d) as u32,
            key_cache_stride_slot: d as u32,
            key_cache_stride_head: (bs * d) as u32,
            ..Default::default()
        };
        assert_eq!(p.key_cache_row(2, 5, 3), 2 * h * bs * d + 3 * bs * d + 5 * d);
    }

    #[test]
    fn reshape_tiles_fit() {
        for es in [2, 4] {
            assert_eq!(reshape_tile_tokens(256, es), RESHAPE_TILE_TOKENS);
            for d in [256, 512, 1024, 4096] {
                let t = reshape_tile_tokens(d, es);
                assert!(t >= 1 && reshape_tile_bytes(t, d, es) <= RESHAPE_MAX_SMEM_BYTES, "d {d} es {es}");
            }
        }
        assert_eq!(reshape_tile_tokens(1024, 4), 5);
        assert_eq!(reshape_tile_tokens(8192, 4), 0);
    }

    #[test]
    fn thread_counts() {
        assert_eq!(reshape_threads(0), 32);
        assert_eq!(reshape_threads(1), 32);
        assert_eq!(reshape_threads(33), 64);
        assert_eq!(reshape_threads(8 * 128), RESHAPE_MAX_THREADS);
    }
}
