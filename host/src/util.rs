//! Device helpers (kernels in `kernels-gpu/src/util.rs`): deterministic random fill, so large caches
//! need no host copy, and a read-only streaming pass, the bandwidth ceiling benchmarks compare with.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use pagedattn_layout::util::UTIL_THREADS;
use pagedattn_layout::{FillParams, Fp8CodecParams, Fp8Kind, KernelFamily, MmaProbeParams, StreamReadParams, hash_uniform};

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::{dispatch, launch};

fn grid(gpu: &Gpu) -> Result<u32> {
    let sms = gpu.context().attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    Ok(sms as u32 * 8)
}

/// Fills a contiguous float or fp8 GPU tensor's storage with `scale * hash_uniform(i, seed)` (i =
/// storage element index; fp8: its code), the same values [`host_uniform`] computes.
pub fn fill_uniform(gpu: &Gpu, t: &mut Tensor, seed: u64, scale: f32) -> Result<()> {
    let symbol = match (t.dtype().float(), t.dtype().fp8()) {
        (Some(dtype), _) => dispatch::fill_uniform_symbol(dtype),
        (None, Some(Fp8Kind::E4m3)) => dispatch::FILL_UNIFORM_E4M3,
        (None, Some(Fp8Kind::E5m2)) => dispatch::FILL_UNIFORM_E5M2,
        _ => {
            return Err(Error::DType { op: "fill_uniform", tensor: "t", got: t.dtype(), expected: "f32, f16, bf16 or fp8".into() });
        }
    };
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

/// What [`fp8_codec`] returns: the 256 decoded codes, the encoded inputs, and whether the hardware
/// `cvt` ran (only where the loaded image was built for sm_89 or later).
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8CodecOutput {
    /// `decoded[c]`: code `c` (0..256) decoded one at a time.
    pub decoded: Vec<f32>,
    /// The attention kernels' bulk decode of the 256 codes (times its unit).
    pub decoded4: Vec<f32>,
    /// `encoded[i]`: the code of `input[i]` (nearest, saturating), one per input.
    pub encoded: Vec<u8>,
    /// Whether the hardware conversion ran (asked for, and the loaded image has it).
    pub used_hardware: bool,
}

/// Runs the device fp8 conversions (the `fp8_codec` test kernel) on `input`: the hardware path if
/// `hardware` and the build has it, else the software path the sm_80 build uses. Synchronizes.
pub fn fp8_codec(gpu: &Gpu, kind: Fp8Kind, hardware: bool, input: &[f32]) -> Result<Fp8CodecOutput> {
    let stream = gpu.stream();
    let mut decoded = stream.alloc_zeros::<f32>(256)?;
    let mut decoded4 = stream.alloc_zeros::<f32>(256)?;
    let inp = stream.clone_htod(if input.is_empty() { &[0f32][..] } else { input })?;
    let mut encoded = stream.alloc_zeros::<u8>(input.len().max(1))?;
    let mut used = stream.alloc_zeros::<u32>(1)?;
    let params = Fp8CodecParams {
        decoded: decoded.device_ptr_mut(stream).0,
        decoded4: decoded4.device_ptr_mut(stream).0,
        input: inp.device_ptr(stream).0,
        encoded: encoded.device_ptr_mut(stream).0,
        used_hardware: used.device_ptr_mut(stream).0,
        n: u32::try_from(input.len()).map_err(|_| Error::Value {
            op: "fp8_codec",
            what: "input",
            got: input.len().to_string(),
            why: "too long".into(),
        })?,
        kind: match kind {
            Fp8Kind::E4m3 => 0,
            Fp8Kind::E5m2 => 1,
        },
        hardware: hardware as u32,
        _pad: 0,
    };
    let cfg = LaunchConfig { grid_dim: (grid(gpu)?, 1, 1), block_dim: (UTIL_THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.function(KernelFamily::Util, dispatch::FP8_CODEC)?;
    // SAFETY: `Fp8CodecParams` is the kernel's parameter; the buffers hold 256 / n / n / 1 elements.
    unsafe { launch::launch(stream, &f, cfg, &params) }?;
    let mut encoded = stream.clone_dtoh(&encoded)?;
    encoded.truncate(input.len());
    Ok(Fp8CodecOutput {
        decoded: stream.clone_dtoh(&decoded)?,
        decoded4: stream.clone_dtoh(&decoded4)?,
        encoded,
        used_hardware: stream.clone_dtoh(&used)?[0] != 0,
    })
}

/// Runs the tensor-core probe (the `mma_probe` test kernel, one warp) on `a` `[16][16]`, `k`
/// `[8][16]`, `v` `[16][8]` (rounded to f16, or bf16 when `bf16`): returns `(A · Kᵀ, A · V)`, each
/// `[16][8]` f32 row-major, computed with `cp.async`, `ldmatrix` and `mma.sync`. Synchronizes.
pub fn mma_probe(gpu: &Gpu, bf16: bool, a: &[f32; 256], k: &[f32; 128], v: &[f32; 128]) -> Result<(Vec<f32>, Vec<f32>)> {
    let stream = gpu.stream();
    let halves = |x: &[f32]| -> Vec<u16> {
        x.iter().map(|&f| if bf16 { half::bf16::from_f32(f).to_bits() } else { half::f16::from_f32(f).to_bits() }).collect()
    };
    let (a_d, k_d, v_d) = (stream.clone_htod(&halves(a))?, stream.clone_htod(&halves(k))?, stream.clone_htod(&halves(v))?);
    let (mut qk, mut pv) = (stream.alloc_zeros::<f32>(128)?, stream.alloc_zeros::<f32>(128)?);
    let params = MmaProbeParams {
        a: a_d.device_ptr(stream).0,
        k: k_d.device_ptr(stream).0,
        v: v_d.device_ptr(stream).0,
        qk: qk.device_ptr_mut(stream).0,
        pv: pv.device_ptr_mut(stream).0,
        bf16: bf16 as u32,
        _pad: 0,
    };
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 1024 };
    let f = gpu.function(KernelFamily::Util, dispatch::MMA_PROBE)?;
    // SAFETY: `MmaProbeParams` is the kernel's parameter; the buffers hold 256 / 128 / 128 halves
    // (cudarc allocations are 256-byte aligned) and 128 + 128 floats; one warp, 1024 B shared.
    unsafe { launch::launch(stream, &f, cfg, &params) }?;
    Ok((stream.clone_dtoh(&qk)?, stream.clone_dtoh(&pv)?))
}
