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
//! Thread mapping of `reshape_and_cache` (vLLM layout): a CTA takes `tokens_per_cta` (16, fewer for
//! heads past 256) consecutive tokens of one KV head (grid `(ceil(num_tokens / tokens_per_cta),
//! num_kv_heads)`, `RESHAPE_TILE_THREADS` threads) and transposes them through shared memory: the
//! rows are read along the head dim, 16 bytes per thread where aligned; then lane `l` of warp `w`
//! writes token `l % 16`'s dims (and key chunks) `2w + l / 16`, `2w + l / 16 + 2 * num_warps`, ...
//! So when consecutive tokens have consecutive slots (a prefill) a warp writes 64 contiguous bytes
//! of the value cache (`[.., dim, slot]` is contiguous in the slot; bf16) and 256-byte runs of
//! 16-byte key chunks. One token per CTA, vLLM's mapping, wrote the value cache one element per
//! 32-byte sector (5x slower at prefill sizes).
//!
//! `reshape_and_cache_flash`: one CTA per token (grid `num_tokens`); its threads walk the token's
//! `num_kv_heads * head_size` elements (16-byte chunks when `vec16` is set) with a block-stride
//! loop. A head's row is contiguous in both tensors, so reads and writes are both coalesced.
//!
//! `copy_blocks`: grid `(num_pairs, num_layers)`, `COPY_BLOCKS_THREADS` threads; CTA `(i, l)` copies
//! block `block_mapping[i][0]` to block `block_mapping[i][1]` in layer `l`'s key and value caches,
//! 16 bytes per thread and four loads in flight.
//!
//! `swap_blocks` (the kernel path of the op): grid `num_pairs`; CTA `i` copies one block between
//! two allocations, device or mapped pinned host memory, with the same copy loop.
//!
//! fp8 caches (`reshape_and_cache[_flash]_<dtype>_<e4m3|e5m2>`): the same kernels quantize on the
//! way, `encode(x / scale)` with the per-tensor `k_scale` / `v_scale` read from device memory
//! (hardware `cvt.rn.satfinite` on sm_89+, the exact software conversion on sm_80); a scale that is
//! not finite and positive makes the launch write nothing and raise `BAD_SCALE`.
//!
//! Device-side data is guarded: a slot `>= num_slots` or a block id outside `0..num_blocks` is never
//! used as an address; that token or pair is skipped and a flag is OR-ed into the status word.

use core::marker::PhantomData;

use crate::fp8::{self, Fp8Code};
use crate::intrinsics::{
    Chunk, Element, atomic_or, block_dim_x, block_idx_x, block_idx_y, dynamic_smem_chunks, load_chunk, store_chunk, sync_threads,
    thread_idx_x,
};
use pagedattn_layout::cache::{RESHAPE_TILE_TOKENS, reshape_tile_index_offset};
use pagedattn_layout::{CopyBlocksParams, ReshapeAndCacheFlashParams, ReshapeAndCacheParams, SwapBlocksParams, status};

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

/// How the cache kernels turn an input element into a cache element: a bit copy (`auto` caches:
/// `u16`, `u32`) or fp8 quantization ([`Quantize`]).
pub trait Store: Copy {
    /// An input element (its bits, or the element type).
    type In: Copy;
    /// A cache element.
    type Out: Copy;
    /// A bit copy: no scales, and 16-byte chunks move unchanged.
    const IDENTITY: bool;
    /// Element `j` (`< 16 / size_of::<In>()`) of a 16-byte chunk of input, stored with `scale`.
    fn from_chunk(c: &Chunk, j: usize, scale: f32) -> Self::Out;
    /// One input element, stored with `scale`.
    fn convert(x: Self::In, scale: f32) -> Self::Out;
}

impl Store for u16 {
    type In = u16;
    type Out = u16;
    const IDENTITY: bool = true;
    #[inline(always)]
    fn from_chunk(c: &Chunk, j: usize, _: f32) -> u16 {
        (c.0[j / 2] >> (16 * (j % 2))) as u16
    }
    #[inline(always)]
    fn convert(x: u16, _: f32) -> u16 {
        x
    }
}

impl Store for u32 {
    type In = u32;
    type Out = u32;
    const IDENTITY: bool = true;
    #[inline(always)]
    fn from_chunk(c: &Chunk, j: usize, _: f32) -> u32 {
        c.0[j]
    }
    #[inline(always)]
    fn convert(x: u32, _: f32) -> u32 {
        x
    }
}

/// fp8 quantization of `T` inputs into codes of `K`: `encode(x / scale)` (round to nearest even,
/// saturating; the build's conversion, see `crate::fp8`).
#[derive(Clone, Copy)]
pub struct Quantize<T, K>(PhantomData<(T, K)>);

impl<T: Element, K: Fp8Code> Store for Quantize<T, K> {
    type In = T;
    type Out = u8;
    const IDENTITY: bool = false;
    #[inline(always)]
    fn from_chunk(c: &Chunk, j: usize, scale: f32) -> u8 {
        fp8::quantize(K::KIND, T::chunk_elem(c, j), scale)
    }
    #[inline(always)]
    fn convert(x: T, scale: f32) -> u8 {
        fp8::quantize(K::KIND, x.to_f32(), scale)
    }
}

/// `(k_scale, v_scale)` of a quantizing launch, or `None` (after raising `BAD_SCALE` from the
/// first thread of the grid) when one is not finite and positive. Bit copies need none: `(1, 1)`.
///
/// # Safety
/// For quantizing stores, both pointers are device f32 (host-validated).
#[inline(always)]
unsafe fn scales<S: Store>(k_scale: u64, v_scale: u64, maybe_status: u64) -> Option<(f32, f32)> {
    if S::IDENTITY {
        return Some((1.0, 1.0));
    }
    // SAFETY: the caller's promise.
    let (ks, vs) = unsafe { (*(k_scale as *const f32), *(v_scale as *const f32)) };
    if ks > 0.0 && ks < f32::INFINITY && vs > 0.0 && vs < f32::INFINITY {
        return Some((ks, vs));
    }
    if block_idx_x() == 0 && block_idx_y() == 0 && thread_idx_x() == 0 {
        // SAFETY: forwarded status pointer.
        unsafe { raise(maybe_status, status::BAD_SCALE) };
    }
    None
}

/// Marks a token of the tile that writes nothing (padding, bad slot, past `num_tokens`).
const NO_BLOCK: u32 = u32::MAX;

/// # Safety
/// Launched with grid `(ceil(num_tokens / tokens_per_cta), num_kv_heads)`, a multiple of 32
/// threads and `reshape_tile_bytes(tokens_per_cta, head_size, size_of::<S::Out>())` bytes of
/// dynamic shared memory, on buffers the host validated for `p` (`kv_vec16`, `key_cache_vec16`:
/// the host's alignment promises); `S` has the inputs' and caches' element types.
#[inline(always)]
pub unsafe fn reshape_and_cache<S: Store>(p: &ReshapeAndCacheParams) {
    // SAFETY: forwarded (scale pointers of quantizing launches).
    let Some((ks, vs)) = (unsafe { scales::<S>(p.k_scale, p.v_scale, p.maybe_status) }) else { return };
    // Input elements per 16-byte load, cache elements per 16-byte key chunk.
    let xi = const { 16 / core::mem::size_of::<S::In>() };
    let x = const { 16 / core::mem::size_of::<S::Out>() };
    let (tile, head) = (block_idx_x(), block_idx_y());
    let (tid, nthreads) = (thread_idx_x(), block_dim_x());
    let (warp, lane, nwarps) = (tid / 32, tid % 32, nthreads / 32);
    let (tok_n, d) = (p.tokens_per_cta as usize, p.head_size as usize);
    let (chunks_in, chunks) = (d / xi, d / x);
    let t0 = tile * tok_n;
    let num_tokens = p.num_tokens as usize;
    // Shared memory: keys [tok_n][d + x] and values [tok_n][d + 2] (cache elements), then blocks
    // and offsets [tok_n] (u32); see `reshape_tile_bytes`.
    let (kw, vw) = (d + x, d + 2);
    let smem = dynamic_smem_chunks() as *mut S::Out;
    let idx = reshape_tile_index_offset(tok_n, d, core::mem::size_of::<S::Out>());
    // SAFETY: offsets inside the launch-sized carve-up; the key rows are whole chunks, so the key
    // tile is 16-byte aligned like the base, and the u32 regions start 4-byte aligned (`idx`).
    let (k_s, v_s, blk_s) = unsafe { (smem, smem.add(tok_n * kw), (smem as *mut u8).add(idx) as *mut u32) };
    // SAFETY: the offsets follow the blocks in the carve-up.
    let off_s = unsafe { blk_s.add(tok_n) };

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

    // The tile's rows, along the head dim: 16 bytes at a time when the rows are aligned.
    let (key, value) = (p.key as *const S::In, p.value as *const S::In);
    let rows = if num_tokens - t0 < tok_n { num_tokens - t0 } else { tok_n };
    if p.kv_vec16 != 0 {
        let mut i = tid;
        while i < rows * chunks_in {
            let (tok, c) = (i / chunks_in, i % chunks_in);
            // SAFETY: t0 + tok < num_tokens, head < num_kv_heads, chunk c < head_size / xi: inside the
            // validated key and value, 16-byte aligned (`kv_vec16`); the tile rows hold d elements
            // (a bit copy stores whole chunks: xi == x).
            unsafe {
                let kc = load_chunk(key.add(p.key_offset(t0 + tok, head, c * xi)));
                let vc = load_chunk(value.add(p.value_offset(t0 + tok, head, c * xi)));
                if S::IDENTITY {
                    store_chunk(k_s.add(tok * kw + c * xi), kc);
                } else {
                    for j in 0..xi {
                        *k_s.add(tok * kw + c * xi + j) = S::from_chunk(&kc, j, ks);
                    }
                }
                for j in 0..xi {
                    *v_s.add(tok * vw + c * xi + j) = S::from_chunk(&vc, j, vs);
                }
            }
            i += nthreads;
        }
    } else {
        let mut i = tid;
        while i < rows * d {
            let (tok, e) = (i / d, i % d);
            // SAFETY: as above, one element at a time.
            unsafe {
                *k_s.add(tok * kw + e) = S::convert(*key.add(p.key_offset(t0 + tok, head, e)), ks);
                *v_s.add(tok * vw + e) = S::convert(*value.add(p.value_offset(t0 + tok, head, e)), vs);
            }
            i += nthreads;
        }
    }
    sync_threads();

    // Token fastest: lane -> (token lane % 16, second index lane / 16), warps over the rest, so
    // consecutive lanes write consecutive slots when the slots are consecutive.
    let (tok, sub) = (lane % RESHAPE_TILE_TOKENS, lane / RESHAPE_TILE_TOKENS);
    // SAFETY: tok < tok_n inside the blocks/offsets regions.
    let b = if tok < tok_n { unsafe { *blk_s.add(tok) } } else { NO_BLOCK };
    if b == NO_BLOCK {
        return;
    }
    // SAFETY: as above.
    let o = unsafe { *off_s.add(tok) } as usize;
    let b = b as usize;
    let (key_cache, value_cache) = (p.key_cache as *mut S::Out, p.value_cache as *mut S::Out);
    // Value `[block, head, dim, slot]`: dims warp * 2 + sub, stepping by all the warps' pairs.
    // SAFETY: b < num_blocks and o < block_size (`token_slot`), head < num_kv_heads: the slot's
    // column of this head in the validated value cache; dims below d; (tok, e) inside the tile.
    unsafe {
        let col = value_cache.add(p.value_cache_offset(b, head, 0, o));
        let bs = p.block_size as usize;
        let mut e = warp * 2 + sub;
        while e < d {
            *col.add(e * bs) = *v_s.add(tok * vw + e);
            e += 2 * nwarps;
        }
    }
    // Key `[block, head, chunk, slot, x]`: whole chunks, same mapping over the chunks.
    let mut c = warp * 2 + sub;
    while c < chunks {
        // SAFETY: chunk c of the slot in the validated key cache (16-byte aligned when
        // `key_cache_vec16`); the tile's chunk c of this token (16-byte aligned: rows of whole chunks).
        unsafe {
            let dst = key_cache.add(p.key_cache_offset(b, head, c * x, o, x));
            let src = k_s.add(tok * kw + c * x);
            if p.key_cache_vec16 != 0 {
                store_chunk(dst, load_chunk(src));
            } else {
                for j in 0..x {
                    *dst.add(j) = *src.add(j);
                }
            }
        }
        c += 2 * nwarps;
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

/// `reshape_and_cache_flash` into an fp8 cache: thread `i` of the token quantizes one 16-byte
/// chunk of a head row (`16 / size_of::<T>()` elements, stored as one 4- or 8-byte word of codes)
/// when `p.vec16` is set, else one element.
///
/// # Safety
/// Launched with grid `(num_tokens)` on buffers the host validated for `p`; with `p.vec16`, every
/// input row starts on a 16-byte boundary, `head_size` is a whole number of input chunks and every
/// cache row starts on a `16 / size_of::<T>()`-byte boundary.
#[inline(always)]
pub unsafe fn reshape_and_cache_flash_fp8<T: Element, K: Fp8Code>(p: &ReshapeAndCacheFlashParams) {
    // SAFETY: forwarded (an fp8 launch carries both scale pointers).
    let Some((ks, vs)) = (unsafe { scales::<Quantize<T, K>>(p.k_scale, p.v_scale, p.maybe_status) }) else { return };
    let token = block_idx_x();
    // SAFETY: token < num_tokens (grid) and the mapping has num_tokens entries.
    let Some((block, offset)) =
        (unsafe { token_slot(p.slot_mapping, token, p.block_size, p.num_slots, p.maybe_status, thread_idx_x() == 0) })
    else {
        return;
    };
    let (key, value) = (p.key as *const T, p.value as *const T);
    let (key_cache, value_cache) = (p.key_cache as *mut u8, p.value_cache as *mut u8);
    let xi = const { 16 / core::mem::size_of::<T>() };
    let per = if p.vec16 != 0 { xi as u32 } else { 1 };
    let units = p.head_size / per;
    let n = p.num_kv_heads * units;
    let mut i = thread_idx_x() as u32;
    while i < n {
        let (head, e) = ((i / units) as usize, ((i % units) * per) as usize);
        // SAFETY: elements e .. e + per of rows inside the validated shapes and strides (token <
        // num_tokens, head < num_kv_heads, block < num_blocks, offset < block_size); with vec16 the
        // input chunk is 16-byte aligned and the `xi` codes start on an `xi`-byte boundary.
        unsafe {
            let (ksrc, vsrc) = (key.add(p.key_row(token, head) + e), value.add(p.value_row(token, head) + e));
            let kdst = key_cache.add(p.key_cache_row(block, offset, head) + e);
            let vdst = value_cache.add(p.value_cache_row(block, offset, head) + e);
            if p.vec16 != 0 {
                let (kc, vc) = (load_chunk(ksrc), load_chunk(vsrc));
                store_codes::<Quantize<T, K>>(kdst, &kc, ks);
                store_codes::<Quantize<T, K>>(vdst, &vc, vs);
            } else {
                *kdst = Quantize::<T, K>::convert(*ksrc, ks);
                *vdst = Quantize::<T, K>::convert(*vsrc, vs);
            }
        }
        i += block_dim_x() as u32;
    }
}

/// Quantizes the `16 / size_of::<In>()` elements of `c` and stores their codes at `dst` as one
/// 4-byte (f32 inputs) or 8-byte (16-bit inputs) word.
///
/// # Safety
/// `dst` is valid for that many bytes and aligned to them.
#[inline(always)]
unsafe fn store_codes<S: Store<Out = u8>>(dst: *mut u8, c: &Chunk, scale: f32) {
    #[repr(C, align(8))]
    struct W2([u32; 2]);
    let xi = const { 16 / core::mem::size_of::<S::In>() };
    let word = |w: usize| -> u32 { (0..4).fold(0, |acc, b| acc | ((S::from_chunk(c, 4 * w + b, scale) as u32) << (8 * b))) };
    // SAFETY: the caller's promise.
    unsafe {
        if xi == 4 {
            *(dst as *mut u32) = word(0);
        } else {
            *(dst as *mut W2) = W2([word(0), word(1)]);
        }
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

/// `swap_blocks`' kernel path: CTA `blockIdx.x` copies block `block_mapping[i][0]` of `src` to
/// block `block_mapping[i][1]` of `dst`, either of which may be mapped pinned host memory (the
/// loads or stores then cross PCIe; four 16-byte loads in flight per thread keep it busy). An id
/// out of range is skipped and raises `BAD_BLOCK_ID`.
///
/// # Safety
/// Launched with grid `num_pairs` on a device mapping and spans the host validated for `p`.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn swap_blocks(p: SwapBlocksParams) {
    let pair = block_idx_x();
    let map = p.block_mapping as *const i64;
    // SAFETY: pair < num_pairs (grid); the mapping is `[num_pairs, 2]`, contiguous.
    let (src, dst) = unsafe { (*map.add(2 * pair), *map.add(2 * pair + 1)) };
    if src < 0 || src >= p.src_num_blocks as i64 || dst < 0 || dst >= p.dst_num_blocks as i64 {
        if thread_idx_x() == 0 {
            // SAFETY: forwarded status pointer.
            unsafe { raise(p.maybe_status, status::BAD_BLOCK_ID) };
        }
        return;
    }
    let (s, d) = (p.src + src as u64 * p.src_block_stride_bytes, p.dst + dst as u64 * p.dst_block_stride_bytes);
    // SAFETY: ids in range: each block is `block_bytes` (a multiple of 16) at a 16-byte aligned
    // address inside its tensor; src and dst are different allocations.
    unsafe { copy_span(s as *const Chunk, d as *mut Chunk, (p.block_bytes / 16) as usize) };
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

macro_rules! export_cache_fp8_kernels {
    ($dt:ident, $dtn:literal, $k:ident, $kn:literal) => {
        const _: () = {
            /// `reshape_and_cache` into an fp8 cache; see the module docs.
            ///
            /// # Safety
            /// Launched by the host (`host/src/cache.rs`) on validated buffers.
            #[unsafe(export_name = pagedattn_layout::cache_fp8_symbol!("reshape_and_cache", $dtn, $kn))]
            pub unsafe extern "ptx-kernel" fn kernel(p: ReshapeAndCacheParams) {
                // SAFETY: forwarded from the entry point's contract.
                unsafe { reshape_and_cache::<Quantize<elem!($dt), fp8_elem!($k)>>(&p) }
            }
        };
        const _: () = {
            /// `reshape_and_cache_flash` into an fp8 cache; see the module docs.
            ///
            /// # Safety
            /// Launched by the host (`host/src/cache.rs`) on validated buffers.
            #[unsafe(export_name = pagedattn_layout::cache_fp8_symbol!("reshape_and_cache_flash", $dtn, $kn))]
            pub unsafe extern "ptx-kernel" fn kernel(p: ReshapeAndCacheFlashParams) {
                // SAFETY: forwarded from the entry point's contract.
                unsafe { reshape_and_cache_flash_fp8::<elem!($dt), fp8_elem!($k)>(&p) }
            }
        };
    };
}

pagedattn_layout::for_each_cache_fp8!(export_cache_fp8_kernels);

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
