//! `flash_attn_varlen_func` benchmark (used by `pagedattn bench --op flash-attn-varlen`): the
//! scenarios of issue 6 (causal prefill over a paged prefix, plain long prefills, a mixed
//! prefill + decode batch) on device-filled caches, timed with CUDA events (cold and hot L2).
//! TFLOP/s counts `4 · head_size · num_heads · Σ visible (query, key) pairs` per call.
//! Correctness is the tests' job (`tests/flash_attn.rs`); here every output is checked finite.

use cudarc::driver::CudaSlice;
use pagedattn_layout::DType;
use serde::Serialize;

use crate::bench::{median_min, time_each};
use crate::device::{Device, Gpu};
use crate::error::{Error, Result};
use crate::flash_attn::{FlashAttnVarlenArgs, FlashKernel, flash_attn_varlen_func_with};
use crate::tensor::{ScalarType, Tensor};
use crate::testing::Rng;
use crate::util::fill_uniform;

/// One batch: per sequence `(new query tokens, cached prefix tokens)`; keys = prefix + new.
#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    /// A one-line description, e.g. "causal prefill, 1 × 8k".
    pub name: String,
    /// Per sequence `(new query tokens, cached prefix tokens)`.
    pub seqs: Vec<(usize, usize)>,
    /// Causal masking (each query sees the prefix and the new keys up to its own position).
    pub causal: bool,
}

/// The scenarios of the issue: 8 sequences of 1k–4k new tokens on 2k cached tokens; 1 × 8k and 8 × 4k
/// prefills; 4 prefill chunks of 2k (on 2k cached) plus 60 decode tokens at 4k context.
pub fn issue_scenarios() -> Vec<Scenario> {
    let prefix: Vec<(usize, usize)> = (0..8).map(|i| (1024 + i * 3072 / 7, 2048)).collect();
    let mut mixed: Vec<(usize, usize)> = vec![(2048, 2048); 4];
    mixed.extend(std::iter::repeat_n((1, 4095), 60));
    vec![
        Scenario { name: "causal prefill, 8 × 1k–4k new on 2k cached".into(), seqs: prefix, causal: true },
        Scenario { name: "causal prefill, 1 × 8k".into(), seqs: vec![(8192, 0)], causal: true },
        Scenario { name: "causal prefill, 8 × 4k".into(), seqs: vec![(4096, 0); 8], causal: true },
        Scenario { name: "mixed: 4 × 2k chunks on 2k cached + 60 decode at 4k".into(), seqs: mixed, causal: true },
    ]
}

/// One measured (scenario, dtype, kernel).
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// The batch that ran.
    pub scenario: Scenario,
    /// The kernel that ran (`mma` or `wgmma`).
    pub kernel: &'static str,
    /// Query, cache and output dtype.
    #[serde(serialize_with = "crate::bench::ser_dtype")]
    pub dtype: DType,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads of the paged caches.
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Σ over sequences and queries of the visible keys.
    pub pairs: u64,
    /// Median µs per call with the L2 flushed before each call.
    pub cold_us: f64,
    /// Median µs per call with a warm L2.
    pub hot_us: f64,
    /// TFLOP/s at the cold median (`4 · head_size · num_heads · pairs` per call).
    pub cold_tflops: f64,
    /// TFLOP/s at the hot median.
    pub hot_tflops: f64,
    /// Every output element is finite after the timed runs.
    pub finite: bool,
}

/// Visible (query, key) pairs of a causal (or full) sequence with `new` queries over `prefix + new` keys.
fn pairs(new: usize, prefix: usize, causal: bool) -> u64 {
    let (n, p) = (new as u64, prefix as u64);
    if causal { n * p + n * (n + 1) / 2 } else { n * (n + p) }
}

/// Times one scenario (median of `iters` runs after `warmup`, cold: L2 flushed before each).
#[allow(clippy::too_many_arguments)]
pub fn run_scenario(
    device: &Device,
    sc: &Scenario,
    dtype: DType,
    heads: (usize, usize),
    head_size: usize,
    block_size: usize,
    kernel: FlashKernel,
    iters: usize,
    warmup: usize,
) -> Result<Point> {
    let Device::Gpu(gpu) = device else { return Err(Error::NoGpu("the benchmark needs a GPU".into())) };
    let kernel = kernel.resolve(gpu, dtype, head_size)?;
    let (nh, nkv) = heads;
    let total_q: usize = sc.seqs.iter().map(|s| s.0).sum();
    let blocks: Vec<usize> = sc.seqs.iter().map(|s| (s.0 + s.1).div_ceil(block_size)).collect();
    let max_blocks = blocks.iter().copied().max().unwrap_or(1).max(1);
    let num_blocks: usize = blocks.iter().sum::<usize>().max(1);
    let st = ScalarType::from(dtype);
    let mut q = gpu.zeros(st, &[total_q, nh, head_size])?;
    let mut k = gpu.zeros(st, &[num_blocks, block_size, nkv, head_size])?;
    let mut v = gpu.zeros(st, &[num_blocks, block_size, nkv, head_size])?;
    for (t, seed) in [(&mut q, 11), (&mut k, 12), (&mut v, 13)] {
        fill_uniform(gpu, t, seed, 1.0)?;
    }
    let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
    Rng::new(5).shuffle(&mut perm);
    let mut table = vec![0i32; sc.seqs.len() * max_blocks];
    let mut next = 0;
    for (b, &n) in blocks.iter().enumerate() {
        table[b * max_blocks..b * max_blocks + n].copy_from_slice(&perm[next..next + n]);
        next += n;
    }
    let mut cu = vec![0i32];
    for s in &sc.seqs {
        cu.push(cu.last().copied().unwrap_or(0) + s.0 as i32);
    }
    let used: Vec<i32> = sc.seqs.iter().map(|s| (s.0 + s.1) as i32).collect();
    let to_dev = |t: Tensor| t.to_gpu(gpu.stream());
    let cu_t = to_dev(Tensor::from_i32(&[cu.len()], &cu)?)?;
    let used_t = to_dev(Tensor::from_i32(&[used.len()], &used)?)?;
    let table_t = to_dev(Tensor::from_i32(&[sc.seqs.len(), max_blocks], &table)?)?;
    let mut out = gpu.zeros(st, &[total_q, nh, head_size])?;
    let args = FlashAttnVarlenArgs {
        q: &q,
        k: &k,
        v: &v,
        max_seqlen_q: sc.seqs.iter().map(|s| s.0).max().unwrap_or(0),
        cu_seqlens_q: &cu_t,
        max_seqlen_k: used.iter().copied().max().unwrap_or(0) as usize,
        seqused_k: &used_t,
        softmax_scale: None,
        causal: sc.causal,
        window_size: (-1, -1),
        softcap: 0.0,
        alibi_slopes: None,
        block_table: &table_t,
    };
    let l2 = gpu.context().attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(1) as usize;
    let mut flush: CudaSlice<u8> = gpu.stream().alloc_zeros(4 * l2)?;
    let mut op = || flash_attn_varlen_func_with(device, &mut out, None, &args, kernel);
    time_each(gpu, warmup, || Ok(()), &mut op)?;
    let (cold, _) = median_min(time_each(gpu, iters, || Ok(gpu.stream().memset_zeros(&mut flush)?), &mut op)?);
    let (hot, _) = median_min(time_each(gpu, iters, || Ok(()), &mut op)?);
    let finite = out.to_cpu()?.to_f64_vec().iter().all(|x| x.is_finite());
    let pairs: u64 = sc.seqs.iter().map(|s| pairs(s.0, s.1, sc.causal)).sum();
    let flops = 4.0 * head_size as f64 * nh as f64 * pairs as f64;
    Ok(Point {
        scenario: sc.clone(),
        kernel: kernel.name(),
        dtype,
        num_heads: nh,
        num_kv_heads: nkv,
        head_size,
        block_size,
        pairs,
        cold_us: cold * 1e3,
        hot_us: hot * 1e3,
        cold_tflops: flops / (cold * 1e-3) / 1e12,
        hot_tflops: flops / (hot * 1e-3) / 1e12,
        finite,
    })
}

/// Every issue scenario for every dtype and kernel (a kernel the device cannot run is skipped), 32 q /
/// 8 KV heads of `head_size`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    device: &Device,
    dtypes: &[DType],
    kernels: &[FlashKernel],
    head_size: usize,
    block_size: usize,
    iters: usize,
    warmup: usize,
    mut each: impl FnMut(&Point),
) -> Result<Vec<Point>> {
    let gpu: &Gpu = match device {
        Device::Gpu(g) => g,
        Device::Cpu => return Err(Error::NoGpu("the benchmark needs a GPU".into())),
    };
    let mut points = Vec::new();
    for &dtype in dtypes {
        for &kernel in kernels {
            if kernel.resolve(gpu, dtype, head_size).is_err() {
                continue;
            }
            for sc in issue_scenarios() {
                let p = run_scenario(device, &sc, dtype, (32, 8), head_size, block_size, kernel, iters, warmup)?;
                each(&p);
                points.push(p);
            }
        }
    }
    Ok(points)
}
