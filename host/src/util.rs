//! Device helpers (kernels in `kernels-gpu/src/util.rs`): deterministic random fill, so large caches
//! need no host copy, and a read-only streaming pass, the bandwidth ceiling benchmarks compare with.

use cudarc::driver::{CudaSlice, LaunchConfig};
use pagedattn_layout::util::UTIL_THREADS;
use pagedattn_layout::{FillParams, KernelFamily, StreamReadParams, hash_uniform};

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::{dispatch, launch};

fn grid(gpu: &Gpu) -> Result<u32> {
    let sms = gpu.context().attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    Ok(sms as u32 * 8)
}

/// Fills a contiguous float GPU tensor's storage with `scale * hash_uniform(i, seed)` (i = storage
/// element index), the same values [`host_uniform`] computes.
pub fn fill_uniform(gpu: &Gpu, t: &mut Tensor, seed: u64, scale: f32) -> Result<()> {
    let Some(dtype) = t.dtype().float() else {
        return Err(Error::DType { op: "fill_uniform", tensor: "t", got: t.dtype(), expected: "f32, f16 or bf16".into() });
    };
    let symbol = dispatch::fill_uniform_symbol(dtype);
    let base = t.device_ptr().ok_or(Error::Device { op: "fill_uniform", tensor: "t", got: t.storage().location(), expected: "GPU" })?
        - (t.offset() * t.dtype().size_bytes()) as u64;
    let n = (t.storage().len_bytes() / t.dtype().size_bytes()) as u64;
    let params = FillParams { ptr: base, n, seed, scale, _pad: 0 };
    let cfg = LaunchConfig { grid_dim: (grid(gpu)?, 1, 1), block_dim: (UTIL_THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.function(KernelFamily::Util, symbol)?;
    // SAFETY: `FillParams` is the kernel's parameter; it writes exactly `n` elements of the storage.
    unsafe { launch::launch(gpu.stream(), &f, cfg, &params) }
}

/// Host twin of [`fill_uniform`]: storage element `i` of a tensor filled with `seed`, before rounding.
pub fn host_uniform(i: usize, seed: u64, scale: f32) -> f32 {
    scale * hash_uniform(i as u64, seed)
}

/// Reads `bytes` bytes of `src` once with 16-byte loads (asynchronous). `out` must hold at least
/// [`stream_read_out_len`] words.
pub fn stream_read(gpu: &Gpu, src: &CudaSlice<u8>, out: &mut CudaSlice<u32>) -> Result<()> {
    use cudarc::driver::DevicePtr;
    let g = grid(gpu)?;
    if out.len() < g as usize {
        return Err(Error::Value { op: "stream_read", what: "out.len()", got: out.len().to_string(), why: format!("needs {g} words") });
    }
    let params =
        StreamReadParams { src: src.device_ptr(gpu.stream()).0, n_chunks: (src.len() / 16) as u64, out: out.device_ptr(gpu.stream()).0 };
    let cfg = LaunchConfig { grid_dim: (g, 1, 1), block_dim: (UTIL_THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.function(KernelFamily::Util, dispatch::STREAM_READ)?;
    // SAFETY: `StreamReadParams` is the kernel's parameter; it reads `n_chunks * 16 <= src.len()` bytes
    // (cudarc allocations are 256-byte aligned) and writes `g <= out.len()` words.
    unsafe { launch::launch(gpu.stream(), &f, cfg, &params) }
}

/// Words [`stream_read`] writes on this GPU.
pub fn stream_read_out_len(gpu: &Gpu) -> Result<usize> {
    Ok(grid(gpu)? as usize)
}
