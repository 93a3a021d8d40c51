//! vLLM's KV-cache ops: `reshape_and_cache`, `reshape_and_cache_flash` and `copy_blocks`.
//!
//! Writing a cache is a bit copy, so the kernels move raw bits (`u32` for f32, `u16` for f16 and
//! bf16): no conversion, NaN payloads kept. Layouts and index math: `pagedattn_layout::cache`.
//!
//! `reshape_and_cache_<dtype>` and `reshape_and_cache_flash_<dtype>`:
//! - `key`, `value`: `[num_tokens, num_kv_heads, head_size]` (token and head strides; dims contiguous);
//! - `slot_mapping`: `[num_tokens]` i64: token `t` goes to block `s / block_size`, offset
//!   `s % block_size` of both caches (`s = slot_mapping[t]`); `s < 0` is padding and is skipped;
//! - `reshape_and_cache`: `key_cache` `[num_blocks, num_kv_heads, head_size / x, block_size, x]`,
//!   `value_cache` `[num_blocks, num_kv_heads, head_size, block_size]`;
//! - `reshape_and_cache_flash`: `key_cache`, `value_cache` `[num_blocks, block_size, num_kv_heads,
//!   head_size]`, block/slot/head strides per cache.
//!
//! Thread mapping of `reshape_and_cache` (vLLM layout): a CTA takes `tokens_per_cta` consecutive
//! tokens of one KV head (grid `(ceil(num_tokens / tokens_per_cta), num_kv_heads)`) and transposes
//! them through shared memory: the rows are read along the head dim (coalesced), then written with
//! the token index fastest, so when consecutive tokens have consecutive slots (a prefill) the value
//! cache receives whole 32-byte sectors (`[.., dim, slot]` is contiguous in the slot) and the key
//! cache 16-token runs of 16-byte chunks. One token per CTA, as in vLLM, wrote the value cache one
//! element per sector.
//!
//! `reshape_and_cache_flash`: one CTA per token (grid `num_tokens`); its threads walk the token's
//! `num_kv_heads * head_size` elements (16-byte chunks when `vec16` is set) with a block-stride
//! loop. A head's row is contiguous in both tensors, so reads and writes are both coalesced.
//!
//! `copy_blocks`: grid `(num_pairs, num_layers)`, `COPY_BLOCKS_THREADS` threads; CTA `(i, l)` copies
//! block `block_mapping[i][0]` to block `block_mapping[i][1]` in layer `l`'s key and value caches,
//! 16 bytes per thread and four loads in flight.
//!
//! Device-side data is guarded: a slot `>= num_slots` or a block id outside `0..num_blocks` is never
//! used as an address; that token or pair is skipped and a flag is OR-ed into the status word.

use crate::intrinsics::{
    Chunk, atomic_or, block_dim_x, block_idx_x, block_idx_y, dynamic_smem, load_chunk, store_chunk, sync_threads, thread_idx_x,
};
use pagedattn_layout::{CopyBlocksParams, ReshapeAndCacheFlashParams, ReshapeAndCacheParams, status};

/// ORs `flag` into the status word, if there is one.
#[inline(always)]
unsafe fn raise(maybe_status: u64, flag: u32) {
    if maybe_status != 0 {
        // SAFETY: a non-null status pointer is a device u32 (host-provided).
        unsafe { atomic_or(maybe_status as *mut u32, flag) };
    }
}

/// Where `token` goes: `(block, offset)`, or `None` for a padding slot (negative) or one past the
/// cache (then `BAD_SLOT` is raised when `report`).
///
/// # Safety
/// `slot_mapping` has an entry for `token`.
#[inline(always)]
unsafe fn token_slot(
    slot_mapping: u64,
    token: usize,
    block_size: u32,
    num_slots: u64,
    maybe_status: u64,
    report: bool,
) -> Option<(usize, usize)> {
    // SAFETY: the caller guarantees the entry exists.
    let slot = unsafe { *(slot_mapping as *const i64).add(token) };
    if slot < 0 {
        return None;
    }
    if slot as u64 >= num_slots {
        if report {
            // SAFETY: forwarded status pointer.
            unsafe { raise(maybe_status, status::BAD_SLOT) };
        }
        return None;
    }
    let (slot, bs) = (slot as u64, block_size as u64);
    Some(((slot / bs) as usize, (slot % bs) as usize))
}

/// The bits of a cache element (`u16` or `u32`), widened to a shared-memory word and back.
pub trait Bits: Copy {
    fn to_word(self) -> u32;
    fn from_word(w: u32) -> Self;
}

impl Bits for u16 {
    #[inline(always)]
    fn to_word(self) -> u32 {
        self as u32
    }
    #[inline(always)]
    fn from_word(w: u32) -> Self {
        w as u16
    }
}

impl Bits for u32 {
    #[inline(always)]
    fn to_word(self) -> u32 {
        self
    }
    #[inline(always)]
    fn from_word(w: u32) -> Self {
        w
    }
}

/// Marks a token of the tile that writes nothing (padding, bad slot, past `num_tokens`).
const NO_BLOCK: u32 = u32::MAX;

/// # Safety
/// Launched with grid `(ceil(num_tokens / tokens_per_cta), num_kv_heads)` and
/// `4 * reshape_tile_words(tokens_per_cta, head_size, x)` bytes of dynamic shared memory on buffers
/// the host validated for `p`; `T` has the caches' element size.
#[inline(always)]
pub unsafe fn reshape_and_cache<T: Bits>(p: &ReshapeAndCacheParams) {
    let x = const { 16 / core::mem::size_of::<T>() };
    let (tile, head) = (block_idx_x(), block_idx_y());
    let (tid, nthreads) = (thread_idx_x(), block_dim_x());
    let (tok_n, d) = (p.tokens_per_cta as usize, p.head_size as usize);
    let t0 = tile * tok_n;
    let num_tokens = p.num_tokens as usize;
    // Shared memory (u32 words): keys [tok_n][d + x], values [tok_n][d + 1], blocks and offsets [tok_n].
    let smem = dynamic_smem() as *mut u32;
    let (kw, vw) = (d + x, d + 1);
    // SAFETY: offsets inside the launch-sized carve-up (`reshape_tile_words`).
    let (k_s, v_s, blk_s, off_s) = unsafe { (smem, smem.add(tok_n * kw), smem.add(tok_n * (kw + vw)), smem.add(tok_n * (kw + vw + 1))) };

    // Each token's destination (one thread per token, which also reports a bad slot).
    if tid < tok_n {
        let t = t0 + tid;
        let dst = if t < num_tokens {
            // SAFETY: t < num_tokens, so the mapping has the entry.
            unsafe { token_slot(p.slot_mapping, t, p.block_size, p.num_slots, p.maybe_status, true) }
        } else {
            None
        };
        let (b, o) = match dst {
            Some((b, o)) => (b as u32, o as u32),
            None => (NO_BLOCK, 0),
        };
        // SAFETY: tid < tok_n: inside the blocks and offsets regions.
        unsafe {
            *blk_s.add(tid) = b;
            *off_s.add(tid) = o;
        }
    }
    // The tile's rows, along the head dim (coalesced reads).
    let (key, value) = (p.key as *const T, p.value as *const T);
    let mut i = tid;
    while i < tok_n * d {
        let (tok, e) = (i / d, i % d);
        let t = t0 + tok;
        if t < num_tokens {
            // SAFETY: t < num_tokens, head < num_kv_heads, e < head_size: inside the validated key and
            // value; tok < tok_n and e < d inside the key and value regions of the tile.
            unsafe {
                *k_s.add(tok * kw + e) = (*key.add(p.key_offset(t, head, e))).to_word();
                *v_s.add(tok * vw + e) = (*value.add(p.value_offset(t, head, e))).to_word();
            }
        }
        i += nthreads;
    }
    sync_threads();

    // Token fastest: consecutive threads write consecutive slots when the slots are consecutive.
    let (key_cache, value_cache) = (p.key_cache as *mut T, p.value_cache as *mut T);
    let mut i = tid;
    while i < tok_n * d {
        // Value `[.., dim, slot]`: thread -> (dim = i / tok_n, token = i % tok_n).
        let (e, tok) = (i / tok_n, i % tok_n);
        // SAFETY: tok < tok_n inside the blocks/offsets regions and (tok, e) inside the value tile; a
        // block other than NO_BLOCK is < num_blocks and its offset < block_size (`token_slot`).
        unsafe {
            let b = *blk_s.add(tok);
            if b != NO_BLOCK {
                let at = p.value_cache_offset(b as usize, head, e, *off_s.add(tok) as usize);
                *value_cache.add(at) = T::from_word(*v_s.add(tok * vw + e));
            }
        }
        // Key `[.., chunk, slot, x]`: thread -> (chunk, token, element), element fastest.
        let (c, tok, el) = (i / (x * tok_n), i / x % tok_n, i % x);
        let e = c * x + el;
        // SAFETY: as above, for the key tile (e < d since d is a multiple of x).
        unsafe {
            let b = *blk_s.add(tok);
            if b != NO_BLOCK {
                let at = p.key_cache_offset(b as usize, head, e, *off_s.add(tok) as usize, x);
                *key_cache.add(at) = T::from_word(*k_s.add(tok * kw + e));
            }
        }
        i += nthreads;
    }
}

/// # Safety
/// Launched with grid `(num_tokens)` on buffers the host validated for `p` (and, when `p.vec16` is
/// set, checked that every row starts on a 16-byte boundary and `head_size` is a whole number of
/// chunks); `T` has the caches' element size.
#[inline(always)]
pub unsafe fn reshape_and_cache_flash<T: Unit>(p: &ReshapeAndCacheFlashParams) {
    let token = block_idx_x();
    // SAFETY: token < num_tokens (grid) and the mapping has num_tokens entries.
    let Some((block, offset)) =
        (unsafe { token_slot(p.slot_mapping, token, p.block_size, p.num_slots, p.maybe_status, thread_idx_x() == 0) })
    else {
        return;
    };
    // SAFETY: forwarded; `vec16` is the host's alignment promise for `Chunk` units.
    unsafe {
        if p.vec16 != 0 { copy_token_rows::<T, Chunk>(p, token, block, offset) } else { copy_token_rows::<T, T>(p, token, block, offset) }
    }
}

/// A unit the flash kernel copies: one element (its bits), or a 16-byte chunk.
pub trait Unit: Copy {
    /// # Safety
    /// `p` is valid for reads and aligned for `Self`.
    unsafe fn load(p: *const Self) -> Self;
    /// # Safety
    /// `p` is valid for writes and aligned for `Self`.
    unsafe fn store(p: *mut Self, v: Self);
}

impl Unit for u16 {
    #[inline(always)]
    unsafe fn load(p: *const Self) -> Self {
        // SAFETY: the caller's promise.
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(p: *mut Self, v: Self) {
        // SAFETY: the caller's promise.
        unsafe { *p = v }
    }
}

impl Unit for u32 {
    #[inline(always)]
    unsafe fn load(p: *const Self) -> Self {
        // SAFETY: the caller's promise.
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(p: *mut Self, v: Self) {
        // SAFETY: the caller's promise.
        unsafe { *p = v }
    }
}

impl Unit for Chunk {
    #[inline(always)]
    unsafe fn load(p: *const Self) -> Self {
        // SAFETY: the caller's promise (16 bytes, 16-byte aligned).
        unsafe { load_chunk(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut Self, v: Self) {
        // SAFETY: the caller's promise (16 bytes, 16-byte aligned).
        unsafe { store_chunk(p, v) }
    }
}

/// Copies the token's `num_kv_heads` rows of `key`/`value` into row `(block, offset, head)` of the
/// caches, in units of `U` (an element, or a 16-byte chunk).
///
/// # Safety
/// As [`reshape_and_cache_flash`]; every row is `U`-aligned and `head_size` a multiple of the unit.
#[inline(always)]
unsafe fn copy_token_rows<T: Copy, U: Unit>(p: &ReshapeAndCacheFlashParams, token: usize, block: usize, offset: usize) {
    let per_unit = const { core::mem::size_of::<U>() / core::mem::size_of::<T>() } as u32;
    let units = p.head_size / per_unit;
    let n = p.num_kv_heads * units;
    let (key, value) = (p.key as *const T, p.value as *const T);
    let (key_cache, value_cache) = (p.key_cache as *mut T, p.value_cache as *mut T);
    let mut i = thread_idx_x() as u32;
    while i < n {
        let (head, c) = ((i / units) as usize, (i % units) as usize);
        // SAFETY: unit c < head_size / per_unit of rows inside the validated shapes and strides
        // (token < num_tokens, head < num_kv_heads, block < num_blocks, offset < block_size), each
        // row `U`-aligned (the caller's promise). Loads first, so both are in flight.
        unsafe {
            let k = U::load((key.add(p.key_row(token, head)) as *const U).add(c));
            let v = U::load((value.add(p.value_row(token, head)) as *const U).add(c));
            U::store((key_cache.add(p.key_cache_row(block, offset, head)) as *mut U).add(c), k);
            U::store((value_cache.add(p.value_cache_row(block, offset, head)) as *mut U).add(c), v);
        }
        i += block_dim_x() as u32;
    }
}

/// Copies `n_chunks` 16-byte chunks from `src` to `dst` with the CTA's threads (block-stride loop,
/// four loads in flight).
///
/// # Safety
/// Both spans are valid, 16-byte aligned, and equal or disjoint.
#[inline(always)]
unsafe fn copy_span(src: *const Chunk, dst: *mut Chunk, n_chunks: usize) {
    let stride = block_dim_x();
    let mut i = thread_idx_x();
    while i + 3 * stride < n_chunks {
        // SAFETY: every index < n_chunks; the loads of an iteration all precede its stores.
        unsafe {
            let a = load_chunk(src.add(i));
            let b = load_chunk(src.add(i + stride));
            let c = load_chunk(src.add(i + 2 * stride));
            let d = load_chunk(src.add(i + 3 * stride));
            store_chunk(dst.add(i), a);
            store_chunk(dst.add(i + stride), b);
            store_chunk(dst.add(i + 2 * stride), c);
            store_chunk(dst.add(i + 3 * stride), d);
        }
        i += 4 * stride;
    }
    while i < n_chunks {
        // SAFETY: i < n_chunks.
        unsafe { store_chunk(dst.add(i), load_chunk(src.add(i))) };
        i += stride;
    }
}

/// For layer `blockIdx.y` and pair `blockIdx.x`: copies block `src` to block `dst` in the layer's
/// key cache and value cache (see the module docs). A pair with an id outside `0..num_blocks` is
/// skipped and raises `BAD_BLOCK_ID`.
///
/// # Safety
/// Launched with grid `(num_pairs, num_layers)` on tables and caches the host validated for `p`.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn copy_blocks(p: CopyBlocksParams) {
    let (pair, layer) = (block_idx_x(), block_idx_y());
    let map = p.block_mapping as *const i64;
    // SAFETY: pair < num_pairs (grid); the mapping is `[num_pairs, 2]`, contiguous.
    let (src, dst) = unsafe { (*map.add(2 * pair), *map.add(2 * pair + 1)) };
    let nb = p.num_blocks as i64;
    if src < 0 || src >= nb || dst < 0 || dst >= nb {
        if thread_idx_x() == 0 {
            // SAFETY: forwarded status pointer.
            unsafe { raise(p.maybe_status, status::BAD_BLOCK_ID) };
        }
        return;
    }
    let (src, dst) = (src as u64, dst as u64);
    // SAFETY: layer < num_layers (grid); both pointer tables have num_layers entries.
    let (k, v) = unsafe { (*(p.key_cache_ptrs as *const u64).add(layer), *(p.value_cache_ptrs as *const u64).add(layer)) };
    // SAFETY: src, dst < num_blocks: each block is `*_block_bytes` (a multiple of 16) at a 16-byte
    // aligned address inside the layer's cache; blocks are disjoint (stride >= bytes) or the same.
    unsafe {
        let (ks, vs) = (p.key_block_stride_bytes, p.value_block_stride_bytes);
        copy_span((k + src * ks) as *const Chunk, (k + dst * ks) as *mut Chunk, (p.key_block_bytes / 16) as usize);
        copy_span((v + src * vs) as *const Chunk, (v + dst * vs) as *mut Chunk, (p.value_block_bytes / 16) as usize);
    }
}

/// The bits a cache element of a `DType` variant is moved as.
macro_rules! bits {
    (F32) => {
        u32
    };
    (F16) => {
        u16
    };
    (BF16) => {
        u16
    };
}

macro_rules! export_cache_kernels {
    ($dt:ident, $dtn:literal) => {
        const _: () = {
            /// `reshape_and_cache` for one dtype; see the module docs.
            ///
            /// # Safety
            /// Launched by the host (`host/src/cache.rs`) on validated buffers.
            #[unsafe(export_name = pagedattn_layout::cache_symbol!("reshape_and_cache", $dtn))]
            pub unsafe extern "ptx-kernel" fn kernel(p: ReshapeAndCacheParams) {
                // SAFETY: forwarded from the entry point's contract.
                unsafe { reshape_and_cache::<bits!($dt)>(&p) }
            }
        };
        const _: () = {
            /// `reshape_and_cache_flash` for one dtype; see the module docs.
            ///
            /// # Safety
            /// Launched by the host (`host/src/cache.rs`) on validated buffers.
            #[unsafe(export_name = pagedattn_layout::cache_symbol!("reshape_and_cache_flash", $dtn))]
            pub unsafe extern "ptx-kernel" fn kernel(p: ReshapeAndCacheFlashParams) {
                // SAFETY: forwarded from the entry point's contract.
                unsafe { reshape_and_cache_flash::<bits!($dt)>(&p) }
            }
        };
    };
}

pagedattn_layout::for_each_cache_dtype!(export_cache_kernels);
