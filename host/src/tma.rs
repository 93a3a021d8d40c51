//! Bulk-copy tensor maps (`CUtensorMap`) of paged KV caches, for the Hopper varlen kernel
//! (`kernels-gpu/src/flash_attn_sm90.rs`): a cache `[num_blocks, block_size, num_kv_heads,
//! head_size]` whose blocks follow one another slot by slot is the 3-D tensor `(head_size,
//! num_kv_heads, num_blocks · block_size)`, and a page of a head is one box `(64, 1, rows)` of it
//! per 64-column panel, written into shared memory with the 128-byte swizzle that `wgmma` reads.
//!
//! The kernel reads the maps from device memory. Each is encoded and uploaded once per (address,
//! shape, strides, box) and kept in the [`Gpu`]: after the first call on a cache, a launch uploads
//! nothing (so a step captured into a CUDA graph after a first eager call replays without copies).

use std::collections::HashMap;

use cudarc::driver::sys::{
    CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use cudarc::driver::{CudaSlice, DevicePtr, sys};

use pagedattn_layout::{FlashAttnSm90Geometry, TensorMapBytes};

use crate::device::Gpu;
use crate::error::Result;
use crate::tensor::{ScalarType, Tensor};

/// Maps kept per GPU, by what they describe.
#[derive(Default)]
pub struct MapCache {
    maps: HashMap<MapKey, CudaSlice<u8>>,
}

/// Entries kept before the cache starts over (each is 128 bytes of device memory).
const MAX_MAPS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct MapKey {
    addr: u64,
    bf16: bool,
    dims: [u64; 3],
    strides: [u64; 2],
    rows: u32,
}

/// Why the Hopper kernel's bulk copies cannot read `cache` (`[num_blocks, block_size,
/// num_kv_heads, head_size]` f16/bf16 on the GPU), or `None` when they can: the blocks follow one
/// another slot by slot (block stride = block_size × slot stride), a power-of-two block size, a
/// 16-byte aligned base, slot and head strides multiples of 16 bytes, at most 2^31 slots.
pub fn unsupported(cache: &Tensor) -> Option<String> {
    let (sh, st) = (cache.shape(), cache.strides());
    let bytes = cache.dtype().size_bytes();
    let addr = cache.device_ptr()?;
    let (blocks, bs) = (sh[0], sh[1]);
    if st[0] != bs * st[1] {
        return Some(format!("block stride {} is not block_size × slot stride ({} × {})", st[0], bs, st[1]));
    }
    if !bs.is_power_of_two() {
        return Some(format!("block size {bs} is not a power of two"));
    }
    if !addr.is_multiple_of(16) || !(st[1] * bytes).is_multiple_of(16) || !(st[2] * bytes).is_multiple_of(16) {
        return Some("base, slot and head strides must be multiples of 16 bytes".into());
    }
    if blocks * bs > i32::MAX as usize || (st[1] * bytes) as u64 >= 1 << 40 {
        return Some("more than 2^31 slots or a slot stride of 2^40 bytes".into());
    }
    None
}

/// Device address of the tensor map of `cache` with boxes of `rows` slots (checked by
/// [`unsupported`] first), encoding and uploading it on first use.
pub fn kv_map(gpu: &Gpu, cache: &Tensor, rows: usize) -> Result<u64> {
    let (sh, st) = (cache.shape(), cache.strides());
    let bytes = cache.dtype().size_bytes() as u64;
    let key = MapKey {
        addr: cache.device_ptr().expect("a GPU tensor"),
        bf16: cache.dtype() == ScalarType::BF16,
        dims: [sh[3] as u64, sh[2] as u64, (sh[0] * sh[1]) as u64],
        strides: [st[2] as u64 * bytes, st[1] as u64 * bytes],
        rows: rows as u32,
    };
    let mut cache_lock = gpu.tensor_maps.lock().expect("tensor map cache");
    if let Some(m) = cache_lock.maps.get(&key) {
        return Ok(m.device_ptr(gpu.stream()).0);
    }
    let map = encode(&key)?;
    // SAFETY: CUtensorMap is 128 bytes of plain data.
    let raw: [u8; 128] = unsafe { std::mem::transmute(map) };
    if cache_lock.maps.len() >= MAX_MAPS {
        cache_lock.maps.clear();
    }
    let dev = gpu.stream().clone_htod(&raw[..])?;
    let addr = dev.device_ptr(gpu.stream()).0;
    cache_lock.maps.insert(key, dev);
    Ok(addr)
}

/// The Hopper kernel's tensor map of `q` (`[total_q, num_heads, head_size]` f16/bf16 on the GPU,
/// rows 16-byte aligned), by value: the 3-D tensor `(head_size, num_heads, total_q)` with a box of
/// `(64, group, BLOCK_M / group)`, one 64-column panel of a work item's packed Q rows. `None` where
/// a box cannot be a work item's rows (the group does not divide `BLOCK_M`) or the driver refuses
/// the map: the kernel then gathers Q rows with `cp.async`.
pub fn q_map(q: &Tensor, group: usize) -> Option<TensorMapBytes> {
    let block_m = FlashAttnSm90Geometry::BLOCK_M;
    if group == 0 || !block_m.is_multiple_of(group) || block_m / group > 256 {
        return None;
    }
    let (sh, st) = (q.shape(), q.strides());
    let bytes = q.dtype().size_bytes() as u64;
    let key = MapKey {
        addr: q.device_ptr()?,
        bf16: q.dtype() == ScalarType::BF16,
        dims: [sh[2] as u64, sh[1] as u64, sh[0] as u64],
        strides: [st[1] as u64 * bytes, st[0] as u64 * bytes],
        rows: 0,
    };
    let map = encode_box(&key, [64, group as u32, (block_m / group) as u32]).ok()?;
    // SAFETY: CUtensorMap is 128 bytes of plain data, as is TensorMapBytes.
    Some(TensorMapBytes(unsafe { std::mem::transmute::<CUtensorMap, [u64; 16]>(map) }))
}

fn encode(k: &MapKey) -> Result<CUtensorMap> {
    encode_box(k, [64, 1, k.rows])
}

fn encode_box(k: &MapKey, boxes: [u32; 3]) -> Result<CUtensorMap> {
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::uninit();
    let dtype =
        if k.bf16 { CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 } else { CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16 };
    let element_strides = [1u32; 3];
    // SAFETY: every pointer is to a live array of the rank's length (strides: rank − 1); the map
    // is written by the call.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype,
            3,
            k.addr as *mut std::ffi::c_void,
            k.dims.as_ptr(),
            k.strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result()?;
    // SAFETY: initialized by the successful call.
    Ok(unsafe { map.assume_init() })
}
