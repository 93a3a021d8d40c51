//! vLLM's KV-cache ops: [`reshape_and_cache`], [`reshape_and_cache_flash`], [`copy_blocks`] and
//! [`swap_blocks`].
//!
//! Kernels: `kernels-gpu/src/cache.rs` (`swap_blocks` is a series of `cuMemcpyAsync` calls and has no
//! kernel); CPU reference: `cpu/cache.rs`; tests: `tests/cache.rs`. Layouts and params:
//! `pagedattn_layout::cache`.
//!
//! Every op validates what the host can see (shapes, dtypes, strides, alignment, sizes, device
//! placement, and the contents of tables handed over as host tensors) and then launches
//! asynchronously on the device's stream. Tables in device memory are guarded by the kernels: a bad
//! entry is skipped, never used as an address, and raises a flag that [`Gpu::check_status`] turns into
//! [`Error::DeviceData`].

use std::collections::HashMap;

use cudarc::driver::{DevicePtr, LaunchConfig};
use pagedattn_layout::cache::{
    COPY_BLOCKS_THREADS, RESHAPE_MAX_SMEM_BYTES, RESHAPE_TILE_THREADS, reshape_threads, reshape_tile_bytes, reshape_tile_tokens,
};
use pagedattn_layout::{
    CopyBlocksParams, DType, KernelFamily, KvCacheDType, ReshapeAndCacheFlashParams, ReshapeAndCacheParams, SwapBlocksParams,
};

use crate::device::{Device, Gpu, check_placement};
use crate::error::{Error, Result};
use crate::tensor::{ScalarType, Tensor, contiguous_strides};
use crate::{cpu, dispatch, launch};

const RESHAPE: &str = "reshape_and_cache";
const FLASH: &str = "reshape_and_cache_flash";
const COPY: &str = "copy_blocks";
const SWAP: &str = "swap_blocks";

/// The cache layout of a reshape op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLayout {
    /// vLLM's paged-attention layout: key `[num_blocks, H, D / x, block_size, x]`, value
    /// `[num_blocks, H, D, block_size]`.
    Vllm,
    /// The flash layout: key and value `[num_blocks, block_size, H, D]` (any block/slot/head strides).
    Flash,
}

/// Sizes of a reshape op, once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReshapePlan {
    /// The caches' layout (which op it is).
    pub layout: CacheLayout,
    /// The inputs' dtype.
    pub dtype: DType,
    /// The caches' element type: the inputs' (a bit copy) or fp8 codes (quantized).
    pub cache: KvCacheDType,
    /// Tokens written: `slot_mapping.len()`. `key` and `value` may have more rows (vLLM pads them
    /// for CUDA graphs); those are not read.
    pub num_tokens: usize,
    /// KV heads per token.
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
    /// Tokens (slots) per cache block.
    pub block_size: usize,
    /// Blocks in each cache (axis 0); slots run over `0..num_blocks * block_size`.
    pub num_blocks: usize,
    /// Flash layout: every row of the four tensors starts on a 16-byte boundary and a row is a whole
    /// number of 16-byte chunks, so the kernel copies 16 bytes at a time (fp8 caches: input rows
    /// so, and cache rows on `16 / input element size`-byte boundaries).
    pub vec16: bool,
}

/// The per-tensor scales of an fp8 KV cache (vLLM's `k_scale`, `v_scale`): `[1]` f32 tensors on
/// the op's device, finite and positive. The cache holds `encode(key / k_scale)` and the attention
/// ops read `decode(code) · k_scale` (likewise for values). Kernels read them from device memory
/// at each launch, so a captured graph follows their updates; a bad device value makes the
/// quantizing kernels write nothing and raise `BAD_SCALE`.
#[derive(Clone, Copy)]
pub struct Fp8Scales<'a> {
    /// The key cache's scale, `[1]` f32.
    pub k_scale: &'a Tensor,
    /// The value cache's scale, `[1]` f32.
    pub v_scale: &'a Tensor,
}

/// Writes each token's key and value into its cache slot, vLLM's `reshape_and_cache`.
///
/// - `key`, `value`: `[num_tokens', num_kv_heads, head_size]` float (`num_tokens' >= num_tokens`), the
///   head dim contiguous, any token/head strides;
/// - `key_cache`: `[num_blocks, num_kv_heads, head_size / x, block_size, x]`, `x = 16 / element
///   size`, the three inner axes contiguous; `value_cache`: `[num_blocks, num_kv_heads, head_size,
///   block_size]`, the two inner axes contiguous (block and head strides free, per cache);
/// - `slot_mapping`: `[num_tokens]` i64, contiguous: token `t` goes to block `s / block_size`, offset
///   `s % block_size` (`s = slot_mapping[t]`); negative slots are padding and skipped.
///
/// Any block size; head sizes up to 6140 (f32) or 12280 (f16/bf16), the largest whose keys and
/// values of one token fit the kernel's shared-memory tile. The two caches may be views of one
/// allocation, but must not overlap each other or `key`/`value` (the result would be unspecified;
/// nothing is written outside the views either way).
///
/// A host `slot_mapping` is checked entry by entry (a slot `>= num_blocks * block_size`, or one that
/// two tokens share, is [`Error::HostData`]) and copied to the device. A device `slot_mapping` is
/// guarded by the kernel (an out-of-range slot is skipped and raises `BAD_SLOT`); when two tokens
/// share a slot there, one of the writes wins.
pub fn reshape_and_cache(
    device: &Device,
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut Tensor,
    value_cache: &mut Tensor,
    slot_mapping: &Tensor,
) -> Result<()> {
    reshape(device, CacheLayout::Vllm, key, value, key_cache, value_cache, slot_mapping, None)
}

/// [`reshape_and_cache`] into fp8 caches (`key_cache`/`value_cache` of [`ScalarType::Fp8E4m3`] or
/// [`ScalarType::Fp8E5m2`], `x = 16`, so `head_size` a multiple of 16): each element is stored as
/// `encode(x / scale)`, rounded to nearest even and saturating to the format's largest finite value
/// (vLLM's `kv_cache_dtype` `fp8_e4m3` / `fp8_e5m2`). The conversion is the hardware `cvt` on sm_89
/// and later, an exact software one on sm_80, both equal to the CPU backend's.
#[allow(clippy::too_many_arguments)]
pub fn reshape_and_cache_fp8(
    device: &Device,
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut Tensor,
    value_cache: &mut Tensor,
    slot_mapping: &Tensor,
    scales: Fp8Scales,
) -> Result<()> {
    reshape(device, CacheLayout::Vllm, key, value, key_cache, value_cache, slot_mapping, Some(scales))
}

/// [`reshape_and_cache_flash`] into fp8 caches; quantization as in [`reshape_and_cache_fp8`].
#[allow(clippy::too_many_arguments)]
pub fn reshape_and_cache_flash_fp8(
    device: &Device,
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut Tensor,
    value_cache: &mut Tensor,
    slot_mapping: &Tensor,
    scales: Fp8Scales,
) -> Result<()> {
    reshape(device, CacheLayout::Flash, key, value, key_cache, value_cache, slot_mapping, Some(scales))
}

/// [`reshape_and_cache`] into caches of the flash layout, vLLM's `reshape_and_cache_flash`:
/// `key_cache` and `value_cache` are `[num_blocks, block_size, num_kv_heads, head_size]` with the
/// head dim contiguous and any block, slot and head strides (per cache). So vLLM's combined
/// `[2, num_blocks, block_size, H, D]` tensor (key = `kv[0]`, value = `kv[1]`), the
/// `[num_blocks, 2, block_size, H, D]` one and the HND layout `[num_blocks, H, block_size, D]`
/// (viewed with permuted strides) all work. Rows are copied 16 bytes at a time where every row is
/// 16-byte aligned. Slots, padding and errors as in [`reshape_and_cache`] (any head size).
pub fn reshape_and_cache_flash(
    device: &Device,
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut Tensor,
    value_cache: &mut Tensor,
    slot_mapping: &Tensor,
) -> Result<()> {
    reshape(device, CacheLayout::Flash, key, value, key_cache, value_cache, slot_mapping, None)
}

#[allow(clippy::too_many_arguments)]
fn reshape(
    device: &Device,
    layout: CacheLayout,
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut Tensor,
    value_cache: &mut Tensor,
    slot_mapping: &Tensor,
    scales: Option<Fp8Scales>,
) -> Result<()> {
    let plan = validate_reshape(device, layout, key, value, key_cache, value_cache, slot_mapping, scales)?;
    if plan.num_tokens == 0 || plan.num_kv_heads == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => {
            let slots = slot_mapping.to_i64_vec();
            cpu::cache::reshape_and_cache(&plan, key, value, key_cache, value_cache, &slots, scales)
        }
        Device::Gpu(gpu) => launch_reshape(gpu, &plan, key, value, key_cache, value_cache, slot_mapping, scales),
    }
}

fn op_name(layout: CacheLayout) -> &'static str {
    match layout {
        CacheLayout::Vllm => RESHAPE,
        CacheLayout::Flash => FLASH,
    }
}

fn shape_err(op: &'static str, tensor: &'static str, t: &Tensor, expected: String) -> Error {
    Error::Shape { op, tensor, got: t.shape().to_vec(), expected }
}

fn layout_err(op: &'static str, tensor: &'static str, t: &Tensor, why: String) -> Error {
    Error::Layout { op, tensor, strides: t.strides().to_vec(), offset: t.offset(), why }
}

fn too_big(op: &'static str, what: &'static str, got: usize, limit: &str) -> Error {
    Error::Value { op, what, got: got.to_string(), why: format!("does not fit the kernel's index fields (at most {limit})") }
}

/// Whether two different indices of the view can address the same element (a broadcast or
/// overlapping view): sorted by stride, each axis must step past everything the smaller ones reach.
/// Written caches must not overlap, or two slots would race.
fn self_overlapping(t: &Tensor) -> bool {
    if t.shape().contains(&0) {
        return false;
    }
    let mut axes: Vec<(usize, usize)> = t.shape().iter().zip(t.strides()).filter(|(n, _)| **n > 1).map(|(&n, &s)| (s, n)).collect();
    axes.sort_unstable();
    let mut reach = 0usize;
    for (s, n) in axes {
        if s <= reach {
            return true;
        }
        reach = reach.saturating_add(s.saturating_mul(n - 1));
    }
    false
}

/// Whether axes `from..` of the view are contiguous among themselves (size-1 axes ignored), so that
/// an index of the axes before `from` selects one contiguous span.
fn inner_contiguous(t: &Tensor, from: usize) -> bool {
    let want = contiguous_strides(&t.shape()[from..]);
    t.shape()[from..].iter().zip(&t.strides()[from..]).zip(&want).all(|((&n, &s), &w)| n <= 1 || s == w)
}

/// Everything the host can check for a reshape op without reading device memory, and the contents
/// of a host `slot_mapping`.
#[allow(clippy::too_many_arguments)]
pub fn validate_reshape(
    device: &Device,
    layout: CacheLayout,
    key: &Tensor,
    value: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slot_mapping: &Tensor,
    scales: Option<Fp8Scales>,
) -> Result<ReshapePlan> {
    let op = op_name(layout);
    let dtype =
        key.dtype().float().ok_or_else(|| Error::DType { op, tensor: "key", got: key.dtype(), expected: "f32, f16 or bf16".into() })?;
    let &[key_rows, num_kv_heads, head_size] = key.shape() else {
        return Err(shape_err(op, "key", key, "[num_tokens, num_kv_heads, head_size]".into()));
    };
    if value.dtype() != key.dtype() {
        return Err(Error::DType { op, tensor: "value", got: value.dtype(), expected: format!("{} (the key's)", key.dtype()) });
    }
    let cache = match (key_cache.dtype().fp8(), scales) {
        (Some(kind), Some(_)) => KvCacheDType::Fp8(kind),
        (None, None) => KvCacheDType::Auto,
        (Some(_), None) => {
            return Err(Error::Value {
                op,
                what: "key_cache",
                got: key_cache.dtype().to_string(),
                why: format!("fp8 caches need scales: call {op}_fp8"),
            });
        }
        (None, Some(_)) => {
            return Err(Error::DType { op, tensor: "key_cache", got: key_cache.dtype(), expected: "fp8_e4m3 or fp8_e5m2".into() });
        }
    };
    let want_cache = if cache == KvCacheDType::Auto { key.dtype() } else { key_cache.dtype() };
    for (name, t) in [("key_cache", key_cache), ("value_cache", value_cache)] {
        if t.dtype() != want_cache {
            let expected =
                if cache == KvCacheDType::Auto { format!("{want_cache} (the key's)") } else { format!("{want_cache} (the key cache's)") };
            return Err(Error::DType { op, tensor: name, got: t.dtype(), expected });
        }
    }
    if let Some(sc) = scales {
        crate::paged_attention::check_fp8_scale(op, "k_scale", Some(sc.k_scale), device)?;
        crate::paged_attention::check_fp8_scale(op, "v_scale", Some(sc.v_scale), device)?;
    }
    if value.shape() != key.shape() {
        return Err(shape_err(op, "value", value, format!("{:?} (the key's)", key.shape())));
    }
    let x = cache.x(dtype);
    let (num_blocks, block_size) = match layout {
        CacheLayout::Vllm => {
            let expected = || {
                if head_size.is_multiple_of(x) {
                    format!("[num_blocks, {num_kv_heads}, {}, block_size, {x}] (head_size {head_size}, {want_cache})", head_size / x)
                } else {
                    format!(
                        "[num_blocks, {num_kv_heads}, head_size / x, block_size, {x}]: head_size {head_size} is not a multiple of x = {x}"
                    )
                }
            };
            let &[nb, kh, hx, bs, kx] = key_cache.shape() else { return Err(shape_err(op, "key_cache", key_cache, expected())) };
            if kh != num_kv_heads || kx != x || hx * kx != head_size {
                return Err(shape_err(op, "key_cache", key_cache, expected()));
            }
            if value_cache.shape() != [nb, num_kv_heads, head_size, bs] {
                return Err(shape_err(op, "value_cache", value_cache, format!("[{nb}, {num_kv_heads}, {head_size}, {bs}]")));
            }
            if key_cache.strides()[2..] != [bs * x, x, 1] {
                return Err(layout_err(op, "key_cache", key_cache, "the three inner axes must be contiguous".into()));
            }
            if value_cache.strides()[2..] != [bs, 1] {
                return Err(layout_err(op, "value_cache", value_cache, "the two inner axes must be contiguous".into()));
            }
            (nb, bs)
        }
        CacheLayout::Flash => {
            let &[nb, bs, kh, kd] = key_cache.shape() else {
                return Err(shape_err(op, "key_cache", key_cache, format!("[num_blocks, block_size, {num_kv_heads}, {head_size}]")));
            };
            if kh != num_kv_heads || kd != head_size {
                return Err(shape_err(op, "key_cache", key_cache, format!("[num_blocks, block_size, {num_kv_heads}, {head_size}]")));
            }
            if value_cache.shape() != key_cache.shape() {
                return Err(shape_err(op, "value_cache", value_cache, format!("{:?} (the key cache's)", key_cache.shape())));
            }
            for (name, t) in [("key_cache", key_cache), ("value_cache", value_cache)] {
                if t.strides()[3] != 1 && head_size > 1 {
                    return Err(layout_err(op, name, t, "the head dim must be contiguous".into()));
                }
            }
            (nb, bs)
        }
    };
    if block_size == 0 {
        return Err(Error::Value { op, what: "block_size", got: "0".into(), why: "a block holds at least one token".into() });
    }
    for (name, t) in [("key", key), ("value", value)] {
        if t.strides()[2] != 1 && head_size > 1 {
            return Err(layout_err(op, name, t, "the head dim must be contiguous".into()));
        }
    }
    for (name, t) in [("key_cache", key_cache), ("value_cache", value_cache)] {
        if self_overlapping(t) {
            return Err(layout_err(op, name, t, "the view overlaps itself: two cache slots would share memory".into()));
        }
    }

    if slot_mapping.dtype() != ScalarType::I64 {
        return Err(Error::DType { op, tensor: "slot_mapping", got: slot_mapping.dtype(), expected: "i64".into() });
    }
    let &[num_tokens] = slot_mapping.shape() else {
        return Err(shape_err(op, "slot_mapping", slot_mapping, "[num_tokens]".into()));
    };
    if num_tokens > key_rows {
        return Err(shape_err(op, "slot_mapping", slot_mapping, format!("[num_tokens] with num_tokens <= {key_rows} (the key's rows)")));
    }
    if num_tokens > 1 && slot_mapping.strides()[0] != 1 {
        return Err(layout_err(op, "slot_mapping", slot_mapping, "must be contiguous".into()));
    }

    // Sizes and strides travel as u32 (slots as u64); grid.x is at most 2^31 - 1.
    let u32_max = u32::MAX as usize;
    let mut strides = vec![key.strides()[0], key.strides()[1], value.strides()[0], value.strides()[1]];
    strides.extend_from_slice(&key_cache.strides()[..key_cache.strides().len() - 1]);
    strides.extend_from_slice(&value_cache.strides()[..value_cache.strides().len() - 1]);
    if let Some(&s) = strides.iter().find(|&&s| s > u32_max) {
        return Err(too_big(op, "stride", s, "u32::MAX"));
    }
    if num_tokens > i32::MAX as usize {
        return Err(too_big(op, "num_tokens", num_tokens, "2^31 - 1"));
    }
    if num_kv_heads.saturating_mul(head_size) > u32_max || block_size > u32_max {
        return Err(too_big(op, "num_kv_heads * head_size", num_kv_heads.saturating_mul(head_size), "u32::MAX"));
    }
    let num_slots = num_blocks.checked_mul(block_size).ok_or_else(|| too_big(op, "num_blocks * block_size", num_blocks, "u64::MAX"))?;
    if layout == CacheLayout::Vllm {
        // The kernel tiles (tokens, one KV head) in shared memory: heads on grid.y, block ids as u32.
        if reshape_tile_tokens(head_size, cache.size_bytes(dtype)) == 0 {
            return Err(Error::Unsupported {
                op,
                what: "head_size",
                got: head_size.to_string(),
                supported: format!("up to {} (one token's keys and values in shared memory)", max_tile_head_size(x)),
            });
        }
        if num_kv_heads > 65535 {
            return Err(too_big(op, "num_kv_heads", num_kv_heads, "65535"));
        }
        if num_blocks >= u32::MAX as usize {
            return Err(too_big(op, "num_blocks", num_blocks, "u32::MAX - 1"));
        }
    }

    check_placement(
        op,
        device,
        &[("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)],
        &[("slot_mapping", slot_mapping)],
    )?;

    // 16-byte copies in the flash kernel: the device base of every storage is 256-byte aligned, so a
    // row is `align`-byte aligned exactly when its byte offset is a multiple of it. fp8 caches take
    // the codes of one 16-byte input chunk as one word of `16 / es` bytes.
    let es = dtype.size_bytes();
    let rows_aligned = |t: &Tensor, align: usize| {
        let ts = t.dtype().size_bytes();
        (t.offset() * ts).is_multiple_of(align) && t.strides()[..t.strides().len() - 1].iter().all(|s| (s * ts).is_multiple_of(align))
    };
    let cache_align = if cache == KvCacheDType::Auto { 16 } else { 16 / es };
    let vec16 = layout == CacheLayout::Flash
        && (head_size * es).is_multiple_of(16)
        && [key, value].into_iter().all(|t| rows_aligned(t, 16))
        && [key_cache, value_cache].into_iter().all(|t| rows_aligned(t, cache_align));

    let plan = ReshapePlan { layout, dtype, cache, num_tokens, num_kv_heads, head_size, block_size, num_blocks, vec16 };
    if slot_mapping.is_host() {
        check_slots(op, &slot_mapping.to_i64_vec(), num_slots, &plan)?;
    }
    Ok(plan)
}

/// The largest head size with a `reshape_and_cache` tile of at least one token.
fn max_tile_head_size(x: usize) -> usize {
    // `reshape_tile_bytes(1, d, es) = (2d + x + 2) * es + 8` must fit, and d is a multiple of x.
    let es = 16 / x;
    ((RESHAPE_MAX_SMEM_BYTES - 8) / es - x - 2) / 2 / x * x
}

/// Checks a host `slot_mapping`: every non-negative slot below `num_slots`, no slot named twice.
fn check_slots(op: &'static str, slots: &[i64], num_slots: usize, plan: &ReshapePlan) -> Result<()> {
    let mut first = HashMap::with_capacity(slots.len());
    for (t, &s) in slots.iter().enumerate() {
        if s < 0 {
            continue;
        }
        if s as u64 >= num_slots as u64 {
            return Err(Error::HostData {
                op,
                what: format!(
                    "slot_mapping[{t}] = {s} is outside 0..{num_slots} (num_blocks {} × block_size {})",
                    plan.num_blocks, plan.block_size
                ),
            });
        }
        if let Some(t0) = first.insert(s, t) {
            return Err(Error::HostData {
                op,
                what: format!("slot_mapping[{t}] = {s} repeats slot_mapping[{t0}]: two tokens would write one slot"),
            });
        }
    }
    Ok(())
}

/// The device copy of a host table (`None` when it already is on the device).
fn upload_if_host(gpu: &Gpu, t: &Tensor) -> Result<Option<Tensor>> {
    if t.is_host() { Ok(Some(t.to_gpu(gpu.stream())?)) } else { Ok(None) }
}

fn ptr(t: &Tensor) -> u64 {
    t.device_ptr().expect("validated: on the GPU")
}

#[allow(clippy::too_many_arguments)]
fn launch_reshape(
    gpu: &Gpu,
    plan: &ReshapePlan,
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut Tensor,
    value_cache: &mut Tensor,
    slot_mapping: &Tensor,
    scales: Option<Fp8Scales>,
) -> Result<()> {
    // Host-resident slots were checked in `validate_reshape`; the copy is freed stream-ordered after the kernel.
    let slots_dev = upload_if_host(gpu, slot_mapping)?;
    let slots = slots_dev.as_ref().unwrap_or(slot_mapping);
    let num_slots = (plan.num_blocks * plan.block_size) as u64;
    let (ks, vs, kcs, vcs) = (key.strides(), value.strides(), key_cache.strides(), value_cache.strides());
    let symbol = dispatch::cache_symbol(plan.dtype, plan.cache, plan.layout == CacheLayout::Flash)?;
    let func = gpu.function(KernelFamily::Cache, symbol)?;
    let (k_scale, v_scale) = scales.map_or((0, 0), |s| (ptr(s.k_scale), ptr(s.v_scale)));
    match plan.layout {
        CacheLayout::Vllm => {
            let ces = plan.cache.size_bytes(plan.dtype);
            let tokens_per_cta = reshape_tile_tokens(plan.head_size, ces);
            let cfg = LaunchConfig {
                grid_dim: (plan.num_tokens.div_ceil(tokens_per_cta) as u32, plan.num_kv_heads as u32, 1),
                block_dim: (RESHAPE_TILE_THREADS as u32, 1, 1),
                shared_mem_bytes: reshape_tile_bytes(tokens_per_cta, plan.head_size, ces) as u32,
            };
            // 16-byte accesses: the device base of every storage is 256-byte aligned, so a row or
            // chunk is 16-byte aligned exactly when its byte offset is a multiple of 16.
            let aligned = |t: &Tensor, axes: usize| {
                let es = t.dtype().size_bytes();
                (t.offset() * es).is_multiple_of(16) && t.strides()[..axes].iter().all(|s| (s * es).is_multiple_of(16))
            };
            let (kv_vec16, key_cache_vec16) = (aligned(key, 2) && aligned(value, 2), aligned(key_cache, 2));
            log::debug!("{symbol}: grid {:?}, {} threads, {} B shared", cfg.grid_dim, cfg.block_dim.0, cfg.shared_mem_bytes);
            let params = ReshapeAndCacheParams {
                key: ptr(key),
                value: ptr(value),
                key_cache: ptr(key_cache),
                value_cache: ptr(value_cache),
                slot_mapping: ptr(slots),
                maybe_status: gpu.status_ptr(),
                num_slots,
                k_scale,
                v_scale,
                num_tokens: plan.num_tokens as u32,
                num_kv_heads: plan.num_kv_heads as u32,
                head_size: plan.head_size as u32,
                block_size: plan.block_size as u32,
                key_stride_token: ks[0] as u32,
                key_stride_head: ks[1] as u32,
                value_stride_token: vs[0] as u32,
                value_stride_head: vs[1] as u32,
                key_cache_stride_block: kcs[0] as u32,
                key_cache_stride_head: kcs[1] as u32,
                value_cache_stride_block: vcs[0] as u32,
                value_cache_stride_head: vcs[1] as u32,
                tokens_per_cta: tokens_per_cta as u32,
                kv_vec16: kv_vec16 as u32,
                key_cache_vec16: key_cache_vec16 as u32,
                _pad: 0,
            };
            // SAFETY: `ReshapeAndCacheParams` is the kernel's parameter type; `validate_reshape`
            // checked every shape, stride, dtype and size it addresses with (the kernel reads slot
            // entries and rows only below `num_tokens`; grid.y is `num_kv_heads`; the dynamic shared
            // memory is the tile the kernel carves up for `tokens_per_cta`; the vec16 flags are set only
            // for 16-byte aligned rows and chunks); the slot copy lives until
            // its stream-ordered free after the kernel; device-side slots are bounds-checked in the kernel.
            unsafe { launch::launch(gpu.stream(), &func, cfg, &params) }
        }
        CacheLayout::Flash => {
            let units = plan.num_kv_heads * plan.head_size / if plan.vec16 { plan.dtype.x() } else { 1 };
            let cfg = LaunchConfig {
                grid_dim: (plan.num_tokens as u32, 1, 1),
                block_dim: (reshape_threads(units) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            log::debug!("{symbol}: grid {:?}, {} threads, vec16 {}", cfg.grid_dim, cfg.block_dim.0, plan.vec16);
            let params = ReshapeAndCacheFlashParams {
                key: ptr(key),
                value: ptr(value),
                key_cache: ptr(key_cache),
                value_cache: ptr(value_cache),
                slot_mapping: ptr(slots),
                maybe_status: gpu.status_ptr(),
                num_slots,
                k_scale,
                v_scale,
                num_tokens: plan.num_tokens as u32,
                num_kv_heads: plan.num_kv_heads as u32,
                head_size: plan.head_size as u32,
                block_size: plan.block_size as u32,
                key_stride_token: ks[0] as u32,
                key_stride_head: ks[1] as u32,
                value_stride_token: vs[0] as u32,
                value_stride_head: vs[1] as u32,
                key_cache_stride_block: kcs[0] as u32,
                key_cache_stride_slot: kcs[1] as u32,
                key_cache_stride_head: kcs[2] as u32,
                value_cache_stride_block: vcs[0] as u32,
                value_cache_stride_slot: vcs[1] as u32,
                value_cache_stride_head: vcs[2] as u32,
                vec16: plan.vec16 as u32,
                _pad: 0,
            };
            // SAFETY: as above, for `ReshapeAndCacheFlashParams`; `vec16` is set only when every row
            // of the four tensors is 16-byte aligned and a whole number of chunks (`validate_reshape`).
            unsafe { launch::launch(gpu.stream(), &func, cfg, &params) }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// copy_blocks
// ---------------------------------------------------------------------------------------------

/// Sizes of a [`copy_blocks`] call, once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyBlocksPlan {
    /// Layers: key (and value) caches in the call.
    pub num_layers: usize,
    /// `(src, dst)` rows of `block_mapping`.
    pub num_pairs: usize,
    /// Blocks in each cache (axis 0; 0 when there are no layers).
    pub num_blocks: usize,
    /// Bytes of one key block (axes 1.. of a cache, contiguous).
    pub key_block_bytes: usize,
    /// Bytes between consecutive key blocks.
    pub key_block_stride_bytes: usize,
    /// Bytes of one value block.
    pub value_block_bytes: usize,
    /// Bytes between consecutive value blocks.
    pub value_block_stride_bytes: usize,
}

/// vLLM's `copy_blocks`: for every layer `l` and every pair `(src, dst)` of `block_mapping`, copies
/// block `src` to block `dst` (axis 0) in `key_caches[l]` and in `value_caches[l]`. One launch for
/// all layers.
///
/// - `key_caches`, `value_caches`: one per layer (same count); all key caches share dtype, shape and
///   strides, and so do all value caches; any cache layout whose axes after the first are
///   contiguous (the vLLM or flash layouts, or views such as `kv[:, 0]` of a combined
///   `[num_blocks, 2, ...]` tensor), with blocks and block strides a multiple of 16 bytes and
///   16-byte aligned; key and value caches have the same `num_blocks`;
/// - `block_mapping`: `[num_pairs, 2]` i64, contiguous.
///
/// A host `block_mapping` is checked (ids in `0..num_blocks`; a destination named twice, or a block
/// written by one pair and read by another, is [`Error::HostData`]) and copied to the device. A
/// device `block_mapping` is guarded by the kernel: a pair with an id out of range is skipped and
/// raises `BAD_BLOCK_ID`; with repeated destinations one of the copies wins, and chains (a block
/// both written and read) give either content.
pub fn copy_blocks(
    device: &Device,
    key_caches: &mut [&mut Tensor],
    value_caches: &mut [&mut Tensor],
    block_mapping: &Tensor,
) -> Result<()> {
    let plan = validate_copy_blocks(device, key_caches, value_caches, block_mapping)?;
    if plan.num_layers == 0 || plan.num_pairs == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => cpu::cache::copy_blocks(&plan, key_caches, value_caches, &block_mapping.to_i64_vec()),
        Device::Gpu(gpu) => launch_copy_blocks(gpu, &plan, key_caches, value_caches, block_mapping),
    }
}

/// Checks one cache list: same dtype, shape and strides as its first entry; blocks contiguous,
/// 16-byte multiples and aligned. Returns `(block_bytes, block_stride_bytes)`.
fn check_cache_list(op: &'static str, name: &'static str, caches: &[&mut Tensor]) -> Result<(usize, usize)> {
    let first = &*caches[0];
    if first.shape().is_empty() {
        return Err(shape_err(op, name, first, "[num_blocks, ...]".into()));
    }
    for (l, t) in caches.iter().enumerate().skip(1) {
        if t.dtype() != first.dtype() {
            return Err(Error::DType {
                op,
                tensor: name,
                got: t.dtype(),
                expected: format!("{} (layer {l} differs from layer 0)", first.dtype()),
            });
        }
        if t.shape() != first.shape() {
            return Err(shape_err(op, name, t, format!("{:?} (layer {l} differs from layer 0)", first.shape())));
        }
        if t.strides() != first.strides() {
            return Err(layout_err(op, name, t, format!("layer {l}'s strides differ from layer 0's {:?}", first.strides())));
        }
    }
    let es = first.dtype().size_bytes();
    if !inner_contiguous(first, 1) {
        return Err(layout_err(op, name, first, "the axes after the block axis must be contiguous (a block is one span)".into()));
    }
    let block_bytes = first.shape()[1..].iter().product::<usize>() * es;
    let stride_bytes = first.strides()[0] * es;
    for t in caches {
        if !(t.offset() * es).is_multiple_of(16) || !block_bytes.is_multiple_of(16) || !stride_bytes.is_multiple_of(16) {
            return Err(layout_err(
                op,
                name,
                t,
                format!("blocks ({block_bytes} bytes, {stride_bytes} apart) must be 16-byte multiples at 16-byte aligned offsets"),
            ));
        }
    }
    if first.shape()[0] > 1 && stride_bytes < block_bytes {
        return Err(layout_err(op, name, first, format!("blocks of {block_bytes} bytes overlap ({stride_bytes} bytes apart)")));
    }
    Ok((block_bytes, stride_bytes))
}

/// Checks a `[num_pairs, 2]` i64 block mapping's type, shape and strides; returns `num_pairs`.
fn check_mapping_shape(op: &'static str, m: &Tensor) -> Result<usize> {
    if m.dtype() != ScalarType::I64 {
        return Err(Error::DType { op, tensor: "block_mapping", got: m.dtype(), expected: "i64".into() });
    }
    let &[num_pairs, 2] = m.shape() else { return Err(shape_err(op, "block_mapping", m, "[num_pairs, 2]".into())) };
    if num_pairs > 0 && !inner_contiguous(m, 0) {
        return Err(layout_err(op, "block_mapping", m, "must be contiguous".into()));
    }
    Ok(num_pairs)
}

/// Everything the host can check for [`copy_blocks`], and the contents of a host `block_mapping`.
pub fn validate_copy_blocks(
    device: &Device,
    key_caches: &[&mut Tensor],
    value_caches: &[&mut Tensor],
    block_mapping: &Tensor,
) -> Result<CopyBlocksPlan> {
    let op = COPY;
    let num_pairs = check_mapping_shape(op, block_mapping)?;
    let num_layers = key_caches.len();
    if value_caches.len() != num_layers {
        return Err(Error::Value {
            op,
            what: "value_caches.len()",
            got: value_caches.len().to_string(),
            why: format!("one value cache per key cache ({num_layers})"),
        });
    }
    if num_layers > 65535 {
        return Err(too_big(op, "num_layers", num_layers, "65535"));
    }
    if num_pairs > i32::MAX as usize {
        return Err(too_big(op, "num_pairs", num_pairs, "2^31 - 1"));
    }
    let mut tensors: Vec<(&'static str, &Tensor)> = key_caches.iter().map(|t| ("key_caches", &**t)).collect();
    tensors.extend(value_caches.iter().map(|t| ("value_caches", &**t)));
    check_placement(op, device, &tensors, &[("block_mapping", block_mapping)])?;
    if num_layers == 0 {
        return Ok(CopyBlocksPlan {
            num_layers,
            num_pairs,
            num_blocks: 0,
            key_block_bytes: 0,
            key_block_stride_bytes: 0,
            value_block_bytes: 0,
            value_block_stride_bytes: 0,
        });
    }
    let (key_block_bytes, key_block_stride_bytes) = check_cache_list(op, "key_caches", key_caches)?;
    let (value_block_bytes, value_block_stride_bytes) = check_cache_list(op, "value_caches", value_caches)?;
    let num_blocks = key_caches[0].shape()[0];
    if value_caches[0].shape()[0] != num_blocks {
        return Err(shape_err(op, "value_caches", value_caches[0], format!("[{num_blocks}, ...] (the key caches' num_blocks)")));
    }
    if num_blocks > u32::MAX as usize {
        return Err(too_big(op, "num_blocks", num_blocks, "u32::MAX"));
    }
    let plan = CopyBlocksPlan {
        num_layers,
        num_pairs,
        num_blocks,
        key_block_bytes,
        key_block_stride_bytes,
        value_block_bytes,
        value_block_stride_bytes,
    };
    if block_mapping.is_host() {
        check_pairs(op, &block_mapping.to_i64_vec(), num_blocks, num_blocks, true)?;
    }
    Ok(plan)
}

/// Checks host `(src, dst)` pairs: ids in range, no destination twice, and (`no_chains`) no block
/// written by one pair and read by another (the outcome would depend on the order of the copies).
fn check_pairs(op: &'static str, pairs: &[i64], src_blocks: usize, dst_blocks: usize, no_chains: bool) -> Result<()> {
    let mut dst_of = HashMap::with_capacity(pairs.len() / 2);
    for (i, p) in pairs.chunks_exact(2).enumerate() {
        for (j, (&id, n, what)) in [(&p[0], src_blocks, "source"), (&p[1], dst_blocks, "destination")].into_iter().enumerate() {
            if id < 0 || id as u64 >= n as u64 {
                return Err(Error::HostData { op, what: format!("block_mapping[{i}][{j}] = {id} is outside 0..{n} ({what} blocks)") });
            }
        }
        if let Some(i0) = dst_of.insert(p[1], i) {
            return Err(Error::HostData {
                op,
                what: format!("block_mapping[{i}][1] = {} repeats block_mapping[{i0}][1]: two copies would write one block", p[1]),
            });
        }
    }
    if no_chains {
        for (i, p) in pairs.chunks_exact(2).enumerate() {
            if let Some(&i0) = dst_of.get(&p[0])
                && i0 != i
            {
                return Err(Error::HostData {
                    op,
                    what: format!("block_mapping[{i}][0] = {} is written by block_mapping[{i0}]: the copies would race", p[0]),
                });
            }
        }
    }
    Ok(())
}

fn launch_copy_blocks(
    gpu: &Gpu,
    plan: &CopyBlocksPlan,
    key_caches: &[&mut Tensor],
    value_caches: &[&mut Tensor],
    block_mapping: &Tensor,
) -> Result<()> {
    let map_dev = upload_if_host(gpu, block_mapping)?;
    let map = map_dev.as_ref().unwrap_or(block_mapping);
    // The per-layer base addresses, uploaded like a host table (freed stream-ordered after the kernel).
    let key_ptrs = gpu.stream().clone_htod(&key_caches.iter().map(|t| ptr(t)).collect::<Vec<u64>>())?;
    let value_ptrs = gpu.stream().clone_htod(&value_caches.iter().map(|t| ptr(t)).collect::<Vec<u64>>())?;
    let params = CopyBlocksParams {
        key_cache_ptrs: key_ptrs.device_ptr(gpu.stream()).0,
        value_cache_ptrs: value_ptrs.device_ptr(gpu.stream()).0,
        block_mapping: ptr(map),
        maybe_status: gpu.status_ptr(),
        key_block_stride_bytes: plan.key_block_stride_bytes as u64,
        value_block_stride_bytes: plan.value_block_stride_bytes as u64,
        key_block_bytes: plan.key_block_bytes as u64,
        value_block_bytes: plan.value_block_bytes as u64,
        num_layers: plan.num_layers as u32,
        num_pairs: plan.num_pairs as u32,
        num_blocks: plan.num_blocks as u32,
        _pad: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (plan.num_pairs as u32, plan.num_layers as u32, 1),
        block_dim: (COPY_BLOCKS_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    log::debug!("copy_blocks: grid {:?}, {} + {} bytes per block", cfg.grid_dim, plan.key_block_bytes, plan.value_block_bytes);
    let func = gpu.function(KernelFamily::Cache, "copy_blocks")?;
    // SAFETY: `CopyBlocksParams` is the kernel's parameter type; the pointer tables hold
    // `num_layers` addresses of caches `validate_copy_blocks` checked (every block of
    // `*_block_bytes` at `*_block_stride_bytes` spacing inside each cache, 16-byte multiples and
    // aligned, blocks disjoint); the grid covers `num_pairs` mapping rows; the uploaded tables live
    // until their stream-ordered free after the kernel; block ids are bounds-checked in the kernel.
    unsafe { launch::launch(gpu.stream(), &func, cfg, &params) }
}

// ---------------------------------------------------------------------------------------------
// swap_blocks
// ---------------------------------------------------------------------------------------------

/// Sizes of a [`swap_blocks`] call, once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwapBlocksPlan {
    /// `(src_id, dst_id)` rows of `block_mapping`.
    pub num_pairs: usize,
    /// Bytes of one block (axes 1.., contiguous).
    pub block_bytes: usize,
    /// Bytes between consecutive blocks of `src`.
    pub src_block_stride_bytes: usize,
    /// Bytes between consecutive blocks of `dst`.
    pub dst_block_stride_bytes: usize,
}

/// vLLM's `swap_blocks`: copies block `src_id` of `src` to block `dst_id` of `dst` (axis 0) for
/// every row `(src_id, dst_id)` of `block_mapping`, a host `[num_pairs, 2]` i64 tensor.
///
/// `src` and `dst` have the same dtype and the same shape after axis 0, which must be contiguous
/// (a block is one span of bytes). On the GPU the copies are queued on the device's stream without
/// waiting: one `cuMemcpyAsync` per run of blocks adjacent on both sides when there are at most
/// [`SWAP_KERNEL_MIN_RUNS`] runs (copy engines), else one kernel launch for all blocks (the
/// `swap_blocks` kernel reads and writes pinned memory directly over PCIe). Device to device, or
/// between the device and pinned host memory
/// ([`Tensor::to_pinned`], [`Gpu::pinned`]; pageable memory cannot be copied asynchronously and is
/// an [`Error::Device`], as is a pair of pinned tensors). These copies are not tracked: synchronize
/// the stream before touching a pinned `dst` (or changing a pinned `src`) on the host, and keep
/// both alive until then. On the CPU backend both are pageable host tensors. `block_mapping` is
/// host data (pageable or pinned); ids must be in range and no destination may repeat
/// ([`Error::HostData`]).
pub fn swap_blocks(device: &Device, src: &Tensor, dst: &mut Tensor, block_mapping: &Tensor) -> Result<()> {
    let plan = validate_swap_blocks(device, src, dst, block_mapping)?;
    if plan.num_pairs == 0 || plan.block_bytes == 0 {
        return Ok(());
    }
    let pairs = block_mapping.to_i64_vec();
    match device {
        Device::Cpu => cpu::cache::swap_blocks(&plan, src, dst, &pairs),
        Device::Gpu(gpu) => copy_swap_gpu(gpu, &plan, src, dst, &pairs),
    }
}

/// Everything [`swap_blocks`] checks before copying.
pub fn validate_swap_blocks(device: &Device, src: &Tensor, dst: &Tensor, block_mapping: &Tensor) -> Result<SwapBlocksPlan> {
    let op = SWAP;
    let num_pairs = check_mapping_shape(op, block_mapping)?;
    if !block_mapping.is_host() {
        return Err(Error::Device { op, tensor: "block_mapping", got: block_mapping.storage().location(), expected: "CPU" });
    }
    if dst.dtype() != src.dtype() {
        return Err(Error::DType { op, tensor: "dst", got: dst.dtype(), expected: format!("{} (the source's)", src.dtype()) });
    }
    if src.shape().is_empty() {
        return Err(shape_err(op, "src", src, "[num_blocks, ...]".into()));
    }
    if dst.shape().len() != src.shape().len() || dst.shape()[1..] != src.shape()[1..] {
        return Err(shape_err(op, "dst", dst, format!("[num_blocks, {:?}] (the source's block shape)", &src.shape()[1..])));
    }
    if src.shares_storage(dst) {
        // Overlapping spans would make the driver's copy undefined; blocks move within one cache with `copy_blocks`.
        return Err(layout_err(op, "dst", dst, "shares its storage with src (copy within one cache with copy_blocks)".into()));
    }
    let es = src.dtype().size_bytes();
    for (name, t) in [("src", src), ("dst", dst)] {
        if !inner_contiguous(t, 1) {
            return Err(layout_err(op, name, t, "the axes after the block axis must be contiguous (a block is one span)".into()));
        }
    }
    let block_bytes = src.shape()[1..].iter().product::<usize>() * es;
    let (src_stride, dst_stride) = (src.strides()[0] * es, dst.strides()[0] * es);
    if dst.shape()[0] > 1 && dst_stride < block_bytes {
        return Err(layout_err(op, "dst", dst, format!("blocks of {block_bytes} bytes overlap ({dst_stride} bytes apart)")));
    }
    match device {
        Device::Cpu => check_placement(op, device, &[("src", src), ("dst", dst)], &[])?,
        Device::Gpu(_) => {
            for (name, t) in [("src", src), ("dst", dst)] {
                if t.is_cpu() {
                    return Err(Error::Device { op, tensor: name, got: "CPU", expected: "GPU or pinned host" });
                }
            }
            if !src.is_gpu() && !dst.is_gpu() {
                return Err(Error::Device {
                    op,
                    tensor: "dst",
                    got: dst.storage().location(),
                    expected: "GPU (src is pinned host memory)",
                });
            }
        }
    }
    check_pairs(op, &block_mapping.to_i64_vec(), src.shape()[0], dst.shape()[0], false)?;
    Ok(SwapBlocksPlan { num_pairs, block_bytes, src_block_stride_bytes: src_stride, dst_block_stride_bytes: dst_stride })
}

/// More runs of adjacent blocks than this take the kernel path (one launch) instead of one
/// `cuMemcpyAsync` per run: each driver call costs a few microseconds, as much as moving a 64 KiB
/// block over PCIe, so scattered blocks (preemption swaps) were call-bound at ~11 GB/s (H100).
/// Few, long runs stay on the copy engines, which overlap with kernels on other streams.
pub const SWAP_KERNEL_MIN_RUNS: usize = 8;

fn copy_swap_gpu(gpu: &Gpu, plan: &SwapBlocksPlan, src: &Tensor, dst: &mut Tensor, pairs: &[i64]) -> Result<()> {
    // Unified addressing: device and pinned host addresses are both `cuMemcpyAsync` endpoints and
    // kernel addresses. `None` only when the driver could not map pinned memory (the error is
    // recorded in the context).
    let base = |name: &'static str, t: &Tensor| {
        t.raw_ptr().ok_or_else(|| Error::Device { op: SWAP, tensor: name, got: t.storage().location(), expected: "a mapped address" })
    };
    let (s0, d0) = (base("src", src)?, base("dst", dst)?);
    // Pairs whose blocks follow the previous pair's in both tensors extend its copy: one driver call
    // per run of adjacent blocks.
    let mut runs: Vec<(u64, u64, usize)> = Vec::new();
    for p in pairs.chunks_exact(2) {
        let s = s0 + p[0] as u64 * plan.src_block_stride_bytes as u64;
        let d = d0 + p[1] as u64 * plan.dst_block_stride_bytes as u64;
        match runs.last_mut() {
            Some((rs, rd, n)) if *rs + *n as u64 == s && *rd + *n as u64 == d => *n += plan.block_bytes,
            _ => runs.push((s, d, plan.block_bytes)),
        }
    }
    let aligned = [s0, d0, plan.block_bytes as u64, plan.src_block_stride_bytes as u64, plan.dst_block_stride_bytes as u64]
        .iter()
        .all(|v| v % 16 == 0);
    if runs.len() > SWAP_KERNEL_MIN_RUNS && aligned && plan.num_pairs <= i32::MAX as usize {
        return launch_swap_kernel(gpu, plan, s0, d0, src.shape()[0], dst.shape()[0], pairs);
    }
    let stream = gpu.stream().cu_stream();
    log::debug!("swap_blocks: {} blocks of {} bytes in {} copies", plan.num_pairs, plan.block_bytes, runs.len());
    for (s, d, n) in runs {
        // SAFETY: `validate_swap_blocks` checked both ids of every pair against their tensors'
        // num_blocks and that a block is `block_bytes` contiguous bytes of its view, so each span (a
        // block, or a run of blocks adjacent in memory) lies inside the views' allocations. Device
        // memory is freed stream-ordered after the copy; pinned memory must stay alive until the
        // caller synchronizes (the documented contract of `swap_blocks` and of `Tensor::raw_ptr`).
        unsafe { cudarc::driver::sys::cuMemcpyAsync(d, s, n, stream) }.result()?;
    }
    Ok(())
}

fn launch_swap_kernel(
    gpu: &Gpu,
    plan: &SwapBlocksPlan,
    src: u64,
    dst: u64,
    src_blocks: usize,
    dst_blocks: usize,
    pairs: &[i64],
) -> Result<()> {
    // The mapping is host data (checked by `validate_swap_blocks`); the kernel reads a device copy,
    // freed stream-ordered after it.
    let map = gpu.stream().clone_htod(pairs)?;
    let params = SwapBlocksParams {
        src,
        dst,
        block_mapping: map.device_ptr(gpu.stream()).0,
        maybe_status: gpu.status_ptr(),
        src_block_stride_bytes: plan.src_block_stride_bytes as u64,
        dst_block_stride_bytes: plan.dst_block_stride_bytes as u64,
        block_bytes: plan.block_bytes as u64,
        num_pairs: plan.num_pairs as u32,
        src_num_blocks: src_blocks.min(u32::MAX as usize) as u32,
        dst_num_blocks: dst_blocks.min(u32::MAX as usize) as u32,
        _pad: 0,
    };
    let cfg = LaunchConfig { grid_dim: (plan.num_pairs as u32, 1, 1), block_dim: (COPY_BLOCKS_THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    log::debug!("swap_blocks: kernel over {} blocks of {} bytes", plan.num_pairs, plan.block_bytes);
    let func = gpu.function(KernelFamily::Cache, crate::dispatch::SWAP_BLOCKS)?;
    // SAFETY: `SwapBlocksParams` is the kernel's parameter type; `validate_swap_blocks` checked every
    // id against its tensor's blocks, that a block is `block_bytes` contiguous bytes of its view and
    // that src and dst are different allocations; addresses, sizes and strides are 16-byte multiples
    // (checked by the caller); pinned memory is mapped (unified addressing) and, per the op's
    // contract, stays alive until the caller synchronizes.
    unsafe { launch::launch(gpu.stream(), &func, cfg, &params) }
}
