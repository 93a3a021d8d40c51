//! Decode benchmark harness (used by `pagedattn bench`): paged attention (v1, v2 or the automatic
//! choice) over device-filled
//! caches, timed with CUDA events with a cold (L2 flushed) and a hot L2, compared with two bandwidth
//! ceilings measured on the same device, and spot-checked against a float64 host reference.
//!
//! Library code: nothing here prints; [`run`] reports through a callback and returns a [`Report`].

use cudarc::driver::{CudaEvent, CudaSlice, sys};
use half::{bf16, f16};
use pagedattn_layout::{DType, KvCacheDType};
use serde::Serialize;

use crate::cache::{Fp8Scales, reshape_and_cache, reshape_and_cache_fp8};
use crate::device::{Device, Gpu};
use crate::error::{Error, Result};
use crate::paged_attention::{PagedAttentionArgs, PagedAttentionWorkspace, ReduceMode, Version, paged_attention};
use crate::tensor::{ScalarType, Tensor};
use crate::testing::{Rng, compare, tolerance};
use crate::util::{fill_uniform, host_uniform, stream_read, stream_read_out_len};

const GIB: usize = 1 << 30;

/// What to measure. Every (dtype, batch, context) combination is one point.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Query and output dtypes.
    #[serde(serialize_with = "ser_dtypes")]
    pub dtypes: Vec<DType>,
    /// KV cache dtypes: `auto` (the query's) and/or fp8 (dequantized with [`BENCH_FP8_SCALES`]).
    #[serde(serialize_with = "ser_caches")]
    pub caches: Vec<KvCacheDType>,
    /// Batch sizes: sequences per decode step, one query token each.
    pub batches: Vec<usize>,
    /// Context lengths in tokens (every sequence of a point has the same length).
    pub contexts: Vec<usize>,
    /// Query heads (a multiple of `num_kv_heads`).
    pub num_heads: usize,
    /// KV heads of the caches.
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Each point is measured once per version (v2 and auto with a workspace bounded by the context).
    #[serde(serialize_with = "ser_versions")]
    pub versions: Vec<Version>,
    /// v2 and auto run once per partition size (tokens; vLLM's is 512).
    pub partition_sizes: Vec<usize>,
    /// Timed calls per point in each of the cold and hot series (the back-to-back series and the
    /// decode step run at least 20); each ceiling is measured `iters` times, clamped to 5..=20.
    pub iters: usize,
    /// Untimed calls per point before the timed ones.
    pub warmup: usize,
    /// Points whose KV cache is larger are skipped.
    pub max_kv_bytes: u64,
    /// Seed of the device fill (query, keys, values) and of the shuffled block tables.
    pub seed: u64,
    /// Also time a decode step (cache update + attention) launched op by op and as a CUDA graph.
    pub graph: bool,
    /// How v2 merges its partitions.
    #[serde(serialize_with = "ser_display")]
    pub reduce: ReduceMode,
}

/// Bandwidth ceilings of the device, measured once per run.
#[derive(Clone, Debug, Serialize)]
pub struct Ceilings {
    /// Device-to-device copy: bytes read + written per copy.
    pub copy_bytes: u64,
    /// Median milliseconds of one device-to-device copy.
    pub copy_ms: f64,
    /// Device-to-device copy rate in GB/s (10^9 bytes per second, read + written).
    pub copy_gbps: f64,
    /// Read-only streaming pass ([`stream_read`]): bytes read per pass.
    pub read_bytes: u64,
    /// Median milliseconds of one streaming pass.
    pub read_ms: f64,
    /// Streaming read rate in GB/s.
    pub read_gbps: f64,
    /// The launch floor: a one-CTA kernel (`util` fill of 16 elements) enqueued back to back, µs per
    /// launch on the GPU's clock.
    pub launch_gpu_us: f64,
    /// The launch floor's CPU µs per launch (the median; the driver's share of every op's host time).
    pub launch_host_us: f64,
}

/// Figures of one measured point. Rates use the median time.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// The kernel that ran (v1 or v2; the automatic choice resolved).
    #[serde(serialize_with = "ser_version")]
    pub ran: Version,
    /// v2's partition size that ran (0 for v1).
    pub ran_partition_size: usize,
    /// K and V bytes the sequences' tokens occupy, plus query and output.
    pub bytes: u64,
    /// Median µs per call with the L2 flushed before each call ([`Report::flush_bytes`] written).
    pub cold_us: f64,
    /// Fastest cold call, µs.
    pub cold_min_us: f64,
    /// Median µs per call with a warm L2 (no flush between calls; each call between its own events).
    pub hot_us: f64,
    /// Fastest hot call, µs.
    pub hot_min_us: f64,
    /// `runs` calls enqueued back to back between one event pair, per call: the GPU's time per
    /// call when the host keeps ahead, else the host's.
    pub back_to_back_us: f64,
    /// CPU time per call (validation, dispatch, launch; no sync): the median over the same
    /// back-to-back runs.
    pub host_us: f64,
    /// `bytes` per median cold call, GB/s.
    pub cold_gbps: f64,
    /// `bytes` per median hot call, GB/s.
    pub hot_gbps: f64,
    /// Cold rate as a percentage of the device-to-device copy ceiling ([`Ceilings::copy_gbps`]).
    pub pct_copy: f64,
    /// Cold rate as a percentage of the streaming read ceiling ([`Ceilings::read_gbps`]).
    pub pct_stream_read: f64,
    /// The sequences spot-checked against the float64 reference (the first and the last).
    pub checked_seqs: Vec<usize>,
    /// Relative L2 error of the checked sequences' outputs ([`Errors::rel_l2`](crate::testing::Errors::rel_l2)).
    pub rel_l2: f64,
    /// Largest absolute error of a finite output element of the checked sequences.
    pub max_abs: f64,
    /// NaN or infinite output elements of the checked sequences.
    pub non_finite: usize,
    /// The dtype's bound on `rel_l2` ([`tolerance`]).
    pub tolerance: f64,
    /// No non-finite element and `rel_l2 <= tolerance`.
    pub correct: bool,
    /// The decode step of this point (`Config::graph`).
    pub step: Option<DecodeStep>,
}

/// A decode step: `reshape_and_cache` of one new token per sequence (into its last slot), then
/// this point's attention. Launched op by op, and replayed as one CUDA graph (captured once; no
/// host work between replays). Each figure: calls enqueued back to back, per step.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeStep {
    /// GPU µs per step, ops launched one by one.
    pub plain_us: f64,
    /// CPU µs per step to validate and launch both ops.
    pub plain_host_us: f64,
    /// GPU µs per graph replay.
    pub graph_us: f64,
    /// CPU µs per replay (`cuGraphLaunch`).
    pub graph_host_us: f64,
    /// Whether the replays' output equals the plain launches' bit for bit.
    pub same_output: bool,
}

/// One (dtype, batch, context) point: measured, or skipped with the reason.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Query and output dtype.
    #[serde(serialize_with = "ser_dtype")]
    pub dtype: DType,
    /// KV cache dtype (`auto` or fp8).
    #[serde(serialize_with = "ser_cache")]
    pub cache: KvCacheDType,
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub context: usize,
    /// The version asked for.
    #[serde(serialize_with = "ser_version")]
    pub version: Version,
    /// v2's partition size (also auto's when it runs v2); 0 for v1.
    pub partition_size: usize,
    /// Bytes of the allocated K and V caches.
    pub kv_bytes: u64,
    /// Why the point was not run (KV cache above [`Config::max_kv_bytes`], or too little free device
    /// memory); `None` when measured.
    pub skipped: Option<String>,
    /// The figures; `None` when skipped.
    pub measured: Option<Measurement>,
}

/// What [`run`] returns: the device, its ceilings and every point of the configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The device's name ([`Device::name`]).
    pub device: String,
    /// The device's L2 cache size in bytes.
    pub l2_bytes: u64,
    /// Bytes written before each cold run to evict the L2.
    pub flush_bytes: u64,
    /// The configuration that ran.
    pub config: Config,
    /// The bandwidth ceilings, measured before the points.
    pub ceilings: Ceilings,
    /// Every point in grid order (dtype, cache, batch, context, version, partition size; the first
    /// varies slowest).
    pub points: Vec<Point>,
}

/// Progress events passed to [`run`]'s callback.
pub enum Progress<'a> {
    /// Measuring the ceilings (before any point).
    Ceilings,
    /// Ceilings known; `points` points follow.
    Ready {
        /// The measured ceilings.
        ceilings: &'a Ceilings,
        /// How many points the run measures (or skips).
        points: usize,
    },
    /// Point `index` starts.
    Start {
        /// The point's position in [`Report::points`].
        index: usize,
        /// Query and output dtype.
        dtype: DType,
        /// KV cache dtype.
        cache: KvCacheDType,
        /// Sequences in the batch.
        batch: usize,
        /// Tokens per sequence.
        context: usize,
        /// The version asked for.
        version: Version,
    },
    /// Point `index` is done (measured or skipped).
    Done {
        /// The point's position in [`Report::points`].
        index: usize,
        /// The point's result.
        point: &'a Point,
    },
}

pub(crate) fn ser_dtype<S: serde::Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

fn ser_version<S: serde::Serializer>(v: &Version, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_versions<S: serde::Serializer>(v: &[Version], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|v| v.to_string()))
}

fn ser_cache<S: serde::Serializer>(c: &KvCacheDType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(c.name())
}

fn ser_caches<S: serde::Serializer>(c: &[KvCacheDType], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(c.iter().map(|c| c.name()))
}

pub(crate) fn ser_dtypes<S: serde::Serializer>(d: &[DType], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(d.iter().map(|d| d.name()))
}

/// Runs every point of `cfg` on the GPU of `device` (an error for the CPU backend). Kernel status
/// flags are left for the caller's [`Gpu::check_status`].
pub fn run(device: &Device, cfg: &Config, progress: &mut dyn FnMut(Progress)) -> Result<Report> {
    let Device::Gpu(gpu) = device else { return Err(Error::NoGpu("the benchmark needs a GPU".into())) };
    let attr = |a| gpu.context().attribute(a);
    let l2_bytes = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(1) as usize;

    progress(Progress::Ceilings);
    let ceilings = measure_ceilings(gpu, cfg)?;
    // 4× the L2, so nothing of the previous run survives the flush.
    let mut flush = gpu.stream().alloc_zeros::<u8>(4 * l2_bytes)?;

    let mut grid = Vec::new();
    for &dtype in &cfg.dtypes {
        for &cache in &cfg.caches {
            for &batch in &cfg.batches {
                for &context in &cfg.contexts {
                    for &version in &cfg.versions {
                        let parts: &[usize] = if version == Version::V1 { &[0] } else { &cfg.partition_sizes };
                        for &partition_size in parts {
                            grid.push((dtype, cache, batch, context, version, partition_size));
                        }
                    }
                }
            }
        }
    }
    progress(Progress::Ready { ceilings: &ceilings, points: grid.len() });
    let mut points = Vec::with_capacity(grid.len());
    for (index, &(dtype, cache, batch, context, version, partition_size)) in grid.iter().enumerate() {
        progress(Progress::Start { index, dtype, cache, batch, context, version });
        let at = PointAt { dtype, cache, batch, context, version, partition_size };
        let point = run_point(device, gpu, cfg, &ceilings, &mut flush, at)?;
        // Buffers were freed stream-ordered; wait so the next point's free-memory check sees it.
        gpu.synchronize()?;
        progress(Progress::Done { index, point: &point });
        points.push(point);
    }
    Ok(Report { device: device.name(), l2_bytes: l2_bytes as u64, flush_bytes: flush.len() as u64, config: cfg.clone(), ceilings, points })
}

/// Median and minimum of `ms` (NaN when empty).
pub(crate) fn median_min(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    };
    (median, ms.first().copied().unwrap_or(f64::NAN))
}

/// Rate in GB/s (10^9 bytes per second) of `bytes` in `ms` milliseconds.
pub(crate) fn gbps(bytes: u64, ms: f64) -> f64 {
    bytes as f64 / (ms * 1e-3) / 1e9
}

/// Times `runs` executions of `op`, each between its own event pair; `before` runs ahead of each,
/// outside the timed region. Returns milliseconds per run.
pub(crate) fn time_each(
    gpu: &Gpu,
    runs: usize,
    mut before: impl FnMut() -> Result<()>,
    mut op: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let ev = || gpu.context().new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
    let events: Vec<(CudaEvent, CudaEvent)> = (0..runs).map(|_| Ok((ev()?, ev()?))).collect::<Result<_>>()?;
    for (start, end) in &events {
        before()?;
        start.record(gpu.stream())?;
        op()?;
        end.record(gpu.stream())?;
    }
    events.iter().map(|(s, e)| Ok(s.elapsed_ms(e)? as f64)).collect()
}

/// `runs` executions of `op` enqueued back to back between one event pair: (µs per run on the
/// GPU's clock, median µs of CPU per call to enqueue one; a median, so an OS hiccup during one
/// call does not count as every call's cost).
pub(crate) fn back_to_back(gpu: &Gpu, runs: usize, mut op: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let ev = || gpu.context().new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
    let (start, end) = (ev()?, ev()?);
    gpu.synchronize()?;
    start.record(gpu.stream())?;
    let mut host = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = std::time::Instant::now();
        op()?;
        host.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    end.record(gpu.stream())?;
    gpu.synchronize()?;
    Ok((start.elapsed_ms(&end)? as f64 * 1e3 / runs as f64, median_min(host).0))
}

/// Bytes of each half of the ceiling measurements: 2 GiB, shrunk on small devices (a multiple of 16).
pub(crate) fn ceiling_half_bytes(gpu: &Gpu) -> Result<usize> {
    let (free, _) = gpu.context().mem_get_info()?;
    Ok((2 * GIB).min(free / 4) & !15)
}

/// The device-to-device copy ceiling: median milliseconds of `runs` copies of `half` bytes (after
/// two warm-up copies); the bytes read + written per copy are `2 * half`.
pub(crate) fn measure_device_copy(gpu: &Gpu, half: usize, runs: usize) -> Result<f64> {
    let stream = gpu.stream();
    let src = stream.alloc_zeros::<u8>(half)?;
    let mut dst = stream.alloc_zeros::<u8>(half)?;
    time_each(gpu, 2, || Ok(()), || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    let (copy_ms, _) = median_min(time_each(gpu, runs, || Ok(()), || Ok(stream.memcpy_dtod(&src, &mut dst)?))?);
    drop((src, dst));
    gpu.synchronize()?;
    Ok(copy_ms)
}

/// Runs of each ceiling measurement.
pub(crate) fn ceiling_runs(iters: usize) -> usize {
    iters.clamp(5, 20)
}

fn measure_ceilings(gpu: &Gpu, cfg: &Config) -> Result<Ceilings> {
    // 2 GiB copies and a 4 GiB read.
    let half = ceiling_half_bytes(gpu)?;
    let runs = ceiling_runs(cfg.iters);
    let stream = gpu.stream();
    let copy_ms = measure_device_copy(gpu, half, runs)?;

    let buf = stream.alloc_zeros::<u8>(2 * half)?;
    let mut out: CudaSlice<u32> = stream.alloc_zeros(stream_read_out_len(gpu)?)?;
    time_each(gpu, 2, || Ok(()), || stream_read(gpu, &buf, &mut out))?;
    let (read_ms, _) = median_min(time_each(gpu, runs, || Ok(()), || stream_read(gpu, &buf, &mut out))?);
    drop((buf, out));
    gpu.synchronize()?;

    let mut tiny = gpu.zeros(ScalarType::F32, &[16])?;
    back_to_back(gpu, 10, || fill_uniform(gpu, &mut tiny, 1, 1.0))?;
    let (launch_gpu_us, launch_host_us) = back_to_back(gpu, 200, || fill_uniform(gpu, &mut tiny, 1, 1.0))?;

    let (copy_bytes, read_bytes) = (2 * half as u64, 2 * half as u64);
    Ok(Ceilings {
        copy_bytes,
        copy_ms,
        copy_gbps: gbps(copy_bytes, copy_ms),
        read_bytes,
        read_ms,
        read_gbps: gbps(read_bytes, read_ms),
        launch_gpu_us,
        launch_host_us,
    })
}

/// Fill seeds of the query, key and value tensors.
const SEEDS: [u64; 3] = [1, 2, 3];

/// `(k_scale, v_scale)` of fp8 points: the caches hold the codes of `hash_uniform / scale`.
pub const BENCH_FP8_SCALES: (f32, f32) = (1.0 / 16.0, 1.0 / 32.0);

/// Where a point sits in the grid.
#[derive(Clone, Copy)]
struct PointAt {
    dtype: DType,
    cache: KvCacheDType,
    batch: usize,
    context: usize,
    version: Version,
    partition_size: usize,
}

fn run_point(device: &Device, gpu: &Gpu, cfg: &Config, ceilings: &Ceilings, flush: &mut CudaSlice<u8>, at: PointAt) -> Result<Point> {
    let PointAt { dtype, cache, batch, context, version, partition_size } = at;
    let (nh, nkv, hs, bs) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.block_size);
    let (es, ces) = (dtype.size_bytes(), cache.size_bytes(dtype));
    let blocks_per_seq = context.div_ceil(bs).max(1);
    let num_blocks = batch * blocks_per_seq;
    let kv_bytes = (2 * num_blocks * nkv * hs * bs * ces) as u64;
    let mut point = Point { dtype, cache, batch, context, version, partition_size, kv_bytes, skipped: None, measured: None };
    let q_bytes = (batch * nh * hs * es) as u64;
    let tables = (batch * (blocks_per_seq + 1) * 4) as u64;
    let (free, _) = gpu.context().mem_get_info()?;
    if kv_bytes > cfg.max_kv_bytes {
        point.skipped = Some(format!("KV {:.1} GiB exceeds the {:.1} GiB limit", gib(kv_bytes), gib(cfg.max_kv_bytes)));
        return Ok(point);
    }
    // Headroom for the allocator and the module's own allocations.
    let needed = kv_bytes + 2 * q_bytes + tables + (256 << 20);
    if needed > free as u64 {
        point.skipped = Some(format!("needs {:.1} GiB, {:.1} GiB free", gib(needed), gib(free as u64)));
        return Ok(point);
    }

    let st = ScalarType::from(dtype);
    let cst = cache.fp8().map_or(st, ScalarType::of_fp8);
    let x = cache.x(dtype);
    let mut query = gpu.zeros(st, &[batch, nh, hs])?;
    let mut key_cache = gpu.zeros(cst, &[num_blocks, nkv, hs / x, bs, x])?;
    let mut value_cache = gpu.zeros(cst, &[num_blocks, nkv, hs, bs])?;
    let mut out = gpu.zeros(st, &[batch, nh, hs])?;
    let (ks, vs) = if cache == KvCacheDType::Auto { (1.0, 1.0) } else { BENCH_FP8_SCALES };
    for ((t, seed), amp) in [&mut query, &mut key_cache, &mut value_cache].into_iter().zip(SEEDS).zip([1.0, 1.0 / ks, 1.0 / vs]) {
        fill_uniform(gpu, t, cfg.seed.wrapping_add(seed), amp)?;
    }
    let k_scale = Tensor::from_f32(DType::F32, &[1], &[ks])?.to_gpu(gpu.stream())?;
    let v_scale = Tensor::from_f32(DType::F32, &[1], &[vs])?.to_gpu(gpu.stream())?;
    let fp8 = cache != KvCacheDType::Auto;
    // Each sequence owns `blocks_per_seq` blocks, scattered over the cache.
    let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
    Rng::new(cfg.seed).shuffle(&mut perm);
    let block_tables = Tensor::from_i32(&[batch, blocks_per_seq], &perm)?.to_gpu(gpu.stream())?;
    let seq_lens = Tensor::from_i32(&[batch], &vec![context as i32; batch])?.to_gpu(gpu.stream())?;
    let scale = 1.0 / (hs as f32).sqrt();
    // The attention reads the caches through views of their storage, so the decode step below can
    // write them (`reshape_and_cache`) between attention calls.
    let (k_view, v_view) = (key_cache.alias(), value_cache.alias());
    let args = PagedAttentionArgs {
        query: &query,
        key_cache: &k_view,
        value_cache: &v_view,
        block_tables: &block_tables,
        seq_lens: &seq_lens,
        scale,
        alibi_slopes: None,
        k_scale: fp8.then_some(&k_scale),
        v_scale: fp8.then_some(&v_scale),
        blocksparse: None,
    };

    let stream = gpu.stream();
    let parts = if partition_size == 0 { pagedattn_layout::DEFAULT_PARTITION_SIZE } else { partition_size };
    let mut ws = PagedAttentionWorkspace::with_partition_size(device, batch, nh, hs, context, parts)?;
    ws.set_reduce_mode(cfg.reduce);
    let mut ran = version;
    let mut op = || -> Result<()> {
        ran = paged_attention(device, &mut out, &args, &mut ws, version)?;
        Ok(())
    };
    time_each(gpu, cfg.warmup, || Ok(()), &mut op)?;
    let cold = time_each(gpu, cfg.iters, || Ok(stream.memset_zeros(flush)?), &mut op)?;
    let hot = time_each(gpu, cfg.iters, || Ok(()), &mut op)?;
    let (back_to_back_us, host_us) = back_to_back(gpu, cfg.iters.max(20), &mut op)?;
    let ran_partition_size = ws.last_plan().1;

    let (cold_ms, cold_min) = median_min(cold);
    let (hot_ms, hot_min) = median_min(hot);
    let bytes = (batch * context * nkv * hs * 2 * ces) as u64 + 2 * q_bytes;

    // Spot check: the first and the last sequence against the f64 reference.
    let got = out.to_cpu()?.to_f64_vec();
    let checked_seqs: Vec<usize> = if batch > 1 { vec![0, batch - 1] } else { vec![0] };
    let shape = Shape { dtype, cache, nh, nkv, hs, bs, num_blocks, len: context, scale: scale as f64, seed: cfg.seed };
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for &s in &checked_seqs {
        g.extend_from_slice(&got[s * nh * hs..(s + 1) * nh * hs]);
        w.extend(reference_seq(&shape, s, &perm[s * blocks_per_seq..(s + 1) * blocks_per_seq]));
    }
    let err = compare(&g, &w);
    let tol = tolerance(dtype);
    let cold_gbps = gbps(bytes, cold_ms);

    // The decode step, after the check (it overwrites each sequence's last token).
    let step = if cfg.graph && context > 0 {
        let (mut new_k, mut new_v) = (gpu.zeros(st, &[batch, nkv, hs])?, gpu.zeros(st, &[batch, nkv, hs])?);
        fill_uniform(gpu, &mut new_k, cfg.seed.wrapping_add(11), 1.0)?;
        fill_uniform(gpu, &mut new_v, cfg.seed.wrapping_add(12), 1.0)?;
        let last = context - 1;
        let slots: Vec<i64> = (0..batch).map(|s| perm[s * blocks_per_seq + last / bs] as i64 * bs as i64 + (last % bs) as i64).collect();
        let slot_mapping = Tensor::from_i64(&[batch], &slots)?.to_gpu(stream)?;
        let mut step_op = |out: &mut Tensor| -> Result<()> {
            if fp8 {
                let scales = Fp8Scales { k_scale: &k_scale, v_scale: &v_scale };
                reshape_and_cache_fp8(device, &new_k, &new_v, &mut key_cache, &mut value_cache, &slot_mapping, scales)?;
            } else {
                reshape_and_cache(device, &new_k, &new_v, &mut key_cache, &mut value_cache, &slot_mapping)?;
            }
            paged_attention(device, out, &args, &mut ws, version)?;
            Ok(())
        };
        let runs = cfg.iters.max(20);
        step_op(&mut out)?;
        let (plain_us, plain_host_us) = back_to_back(gpu, runs, || step_op(&mut out))?;
        let plain_out = out.to_cpu()?.to_f64_vec();
        // The graph writes a NaN-poisoned output of its own.
        let mut graph_out = device.nan(st, &[batch, nh, hs])?;
        let graph = gpu.capture(|| step_op(&mut graph_out))?;
        graph.replay()?;
        let (graph_us, graph_host_us) = back_to_back(gpu, runs, || graph.replay())?;
        let same_output = graph_out.to_cpu()?.to_f64_vec().iter().zip(&plain_out).all(|(a, b)| a.to_bits() == b.to_bits());
        Some(DecodeStep { plain_us, plain_host_us, graph_us, graph_host_us, same_output })
    } else {
        None
    };
    point.measured = Some(Measurement {
        ran,
        ran_partition_size,
        bytes,
        cold_us: cold_ms * 1e3,
        cold_min_us: cold_min * 1e3,
        hot_us: hot_ms * 1e3,
        hot_min_us: hot_min * 1e3,
        back_to_back_us,
        host_us,
        cold_gbps,
        hot_gbps: gbps(bytes, hot_ms),
        pct_copy: 100.0 * cold_gbps / ceilings.copy_gbps,
        pct_stream_read: 100.0 * cold_gbps / ceilings.read_gbps,
        checked_seqs,
        rel_l2: err.rel_l2,
        max_abs: err.max_abs,
        non_finite: err.non_finite,
        tolerance: tol,
        correct: err.passes(tol),
        step,
    });
    Ok(point)
}

pub(crate) fn gib(b: u64) -> f64 {
    b as f64 / GIB as f64
}

/// Sizes of a benchmark point, for the host reference.
struct Shape {
    dtype: DType,
    cache: KvCacheDType,
    nh: usize,
    nkv: usize,
    hs: usize,
    bs: usize,
    num_blocks: usize,
    len: usize,
    scale: f64,
    seed: u64,
}

/// A device-filled element as the GPU holds it: the hash value rounded to the dtype.
fn filled(dtype: DType, i: usize, seed: u64) -> f32 {
    let v = host_uniform(i, seed, 1.0);
    match dtype {
        DType::F32 => v,
        DType::F16 => f16::from_f32(v).to_f32(),
        DType::BF16 => bf16::from_f32(v).to_f32(),
    }
}

/// A device-filled cache element's value: as [`filled`], or for an fp8 cache the code of
/// `hash / scale`, dequantized (`decode · scale`).
fn filled_cache(p: &Shape, i: usize, seed: u64, scale: f32) -> f64 {
    match p.cache.fp8() {
        None => filled(p.dtype, i, seed) as f64,
        Some(kind) => kind.decode(kind.encode(host_uniform(i, seed, 1.0 / scale))) as f64 * scale as f64,
    }
}

/// The float64 reference output `[num_heads, head_size]` of sequence `s` (all tokens in its `row`
/// of blocks), recomputed from the fill hash, one thread per KV head.
fn reference_seq(p: &Shape, s: usize, row: &[i32]) -> Vec<f64> {
    let (hs, bs, x, group) = (p.hs, p.bs, p.cache.x(p.dtype), p.nh / p.nkv);
    let (ks, vs) = if p.cache == KvCacheDType::Auto { (1.0, 1.0) } else { BENCH_FP8_SCALES };
    let [q_seed, k_seed, v_seed] = SEEDS.map(|v| p.seed.wrapping_add(v));
    debug_assert!(row.iter().all(|&b| (b as usize) < p.num_blocks));
    let per_kv_head = |kvh: usize| -> Vec<f64> {
        // Keys and values of this KV head, [token][dim], gathered through the block table.
        let (mut k, mut v) = (vec![0f64; p.len * hs], vec![0f64; p.len * hs]);
        for t in 0..p.len {
            let (blk, slot) = (row[t / bs] as usize, t % bs);
            let head = blk * p.nkv + kvh;
            for d in 0..hs {
                k[t * hs + d] = filled_cache(p, ((head * (hs / x) + d / x) * bs + slot) * x + d % x, k_seed, ks);
                v[t * hs + d] = filled_cache(p, (head * hs + d) * bs + slot, v_seed, vs);
            }
        }
        let mut out = vec![0f64; group * hs];
        for (g, o) in out.chunks_mut(hs).enumerate() {
            let h = kvh * group + g;
            let q: Vec<f64> = (0..hs).map(|d| filled(p.dtype, (s * p.nh + h) * hs + d, q_seed) as f64).collect();
            let scores: Vec<f64> = k.chunks(hs).map(|kt| p.scale * kt.iter().zip(&q).map(|(&a, &b)| a * b).sum::<f64>()).collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for (sc, vt) in scores.iter().zip(v.chunks(hs)) {
                let w = (sc - max).exp();
                sum += w;
                o.iter_mut().zip(vt).for_each(|(od, &vd)| *od += w * vd);
            }
            if sum > 0.0 {
                o.iter_mut().for_each(|od| *od /= sum);
            }
        }
        out
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..p.nkv).map(|kvh| scope.spawn(move || per_kv_head(kvh))).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged_attention::validate;

    /// The hash-based reference agrees with the generic CPU reference on the same (host-built) data.
    #[test]
    fn reference_matches_cpu_backend() {
        let (dtype, nh, nkv, hs, bs, len, seed) = (DType::BF16, 4usize, 2usize, 64usize, 8usize, 21usize, 9u64);
        for cache in KvCacheDType::ALL {
            let blocks_per_seq = len.div_ceil(bs);
            let num_blocks = 2 * blocks_per_seq;
            let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
            Rng::new(3).shuffle(&mut perm);
            let x = cache.x(dtype);
            let (k_amp, v_amp) =
                if cache == KvCacheDType::Auto { (1.0, 1.0) } else { (1.0 / BENCH_FP8_SCALES.0, 1.0 / BENCH_FP8_SCALES.1) };
            let host = |n: usize, seed: u64, amp: f32| (0..n).map(|i| host_uniform(i, seed, amp)).collect::<Vec<_>>();
            let [qs, ks, vs] = SEEDS.map(|v| seed + v);
            let cst = cache.fp8().map_or(ScalarType::from(dtype), ScalarType::of_fp8);
            let n = num_blocks * nkv * hs * bs;
            let q = Tensor::from_f32(dtype, &[2, nh, hs], &host(2 * nh * hs, qs, 1.0)).unwrap();
            let k = Tensor::from_values(cst, &[num_blocks, nkv, hs / x, bs, x], &host(n, ks, k_amp)).unwrap();
            let v = Tensor::from_values(cst, &[num_blocks, nkv, hs, bs], &host(n, vs, v_amp)).unwrap();
            let bt = Tensor::from_i32(&[2, blocks_per_seq], &perm).unwrap();
            let sl = Tensor::from_i32(&[2], &[len as i32; 2]).unwrap();
            let k_scale = Tensor::from_f32(DType::F32, &[1], &[BENCH_FP8_SCALES.0]).unwrap();
            let v_scale = Tensor::from_f32(DType::F32, &[1], &[BENCH_FP8_SCALES.1]).unwrap();
            let scale = 1.0 / (hs as f32).sqrt();
            let args = PagedAttentionArgs {
                query: &q,
                key_cache: &k,
                value_cache: &v,
                block_tables: &bt,
                seq_lens: &sl,
                scale,
                alibi_slopes: None,
                k_scale: Some(&k_scale),
                v_scale: Some(&v_scale),
                blocksparse: None,
            };
            let plan = validate(&Device::Cpu, &Tensor::nan(q.dtype(), q.shape()), &args).unwrap();
            assert_eq!(plan.cache, cache);
            let want = crate::cpu::paged_attention::reference(&plan, &args);
            let shape = Shape { dtype, cache, nh, nkv, hs, bs, num_blocks, len, scale: scale as f64, seed };
            for s in 0..2 {
                let got = reference_seq(&shape, s, &perm[s * blocks_per_seq..(s + 1) * blocks_per_seq]);
                let e = compare(&got, &want[s * nh * hs..(s + 1) * nh * hs]);
                assert!(e.rel_l2 < 1e-12, "{cache} seq {s}: {e:?}");
            }
        }
    }
}
