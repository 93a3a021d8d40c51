//! Bandwidth benchmark of the KV-cache ops (used by `pagedattn bench --op ...`): each op timed with
//! CUDA events as in [`crate::bench`] (warm-up, then the median of runs with the L2 flushed before
//! each, "cold", and of back-to-back runs, "hot"), the bytes it moves per call, and its rate as a
//! share of a copy ceiling measured on the same device: a device-to-device copy for the on-device
//! ops, and for `swap_blocks` a single copy of the same total size in the same direction (pinned
//! host memory for the host end). After the timed runs every point's result is checked bit for bit:
//! the reshape ops' whole caches against the CPU backend, every copied or swapped block against its
//! source.
//!
//! Library code: nothing here prints; [`run`] reports through a callback and returns a [`Report`].

use cudarc::driver::sys;
use pagedattn_layout::{DType, KvCacheDType};
use serde::Serialize;

use crate::bench::{ceiling_half_bytes, ceiling_runs, gbps, gib, measure_device_copy, median_min, ser_dtype, ser_dtypes, time_each};
use crate::device::{Device, Gpu};
use crate::error::{Error, Result};
use crate::swap_blocks;
use crate::tensor::{ScalarType, Tensor};
use crate::testing::Rng;
use crate::testing::cache::{self as cases, BitCheck, CacheShape, KvCaches, KvLayout, ReshapeCase, SwapDirection, compare_caches};
use crate::util::fill_uniform;

/// The op a cache benchmark measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheOp {
    /// [`reshape_and_cache`](crate::reshape_and_cache): new tokens' keys and values into vLLM's layout.
    ReshapeAndCache,
    /// [`reshape_and_cache_flash`](crate::reshape_and_cache_flash): the same into a flash layout.
    ReshapeAndCacheFlash,
    /// [`copy_blocks`](crate::copy_blocks): block pairs copied within every layer's caches.
    CopyBlocks,
    /// [`swap_blocks`]: blocks copied between two caches (device and/or pinned host memory).
    SwapBlocks,
}

impl CacheOp {
    /// Every op, in the order above.
    pub const ALL: [CacheOp; 4] = [CacheOp::ReshapeAndCache, CacheOp::ReshapeAndCacheFlash, CacheOp::CopyBlocks, CacheOp::SwapBlocks];

    /// The op's function name, e.g. `"reshape_and_cache"` (also its [`Display`](std::fmt::Display) and
    /// what [`FromStr`](std::str::FromStr) parses).
    pub const fn name(self) -> &'static str {
        match self {
            CacheOp::ReshapeAndCache => "reshape_and_cache",
            CacheOp::ReshapeAndCacheFlash => "reshape_and_cache_flash",
            CacheOp::CopyBlocks => "copy_blocks",
            CacheOp::SwapBlocks => "swap_blocks",
        }
    }
}

impl std::fmt::Display for CacheOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CacheOp {
    type Err = String;
    /// The op's name with `_` or `-`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.replace('-', "_");
        CacheOp::ALL.into_iter().find(|o| o.name() == s).ok_or_else(|| format!("unknown cache op {s:?}"))
    }
}

/// What to measure. Every (dtype, size) combination is one point; for `swap_blocks` every
/// (dtype, direction, size).
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// The op to measure.
    #[serde(serialize_with = "ser_display")]
    pub op: CacheOp,
    /// Element types of the keys, values and caches.
    #[serde(serialize_with = "ser_dtypes")]
    pub dtypes: Vec<DType>,
    /// KV heads of the caches.
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Cache layout: [`KvLayout::Vllm`] for `reshape_and_cache`, a flash layout for
    /// `reshape_and_cache_flash`, any for `copy_blocks` and `swap_blocks` (which see whole blocks).
    #[serde(serialize_with = "ser_display")]
    pub layout: KvLayout,
    /// Reshape ops: tokens per call, one prefill run of consecutive slots through shuffled blocks.
    pub tokens: Vec<usize>,
    /// `copy_blocks`, `swap_blocks`: blocks per call (`copy_blocks`: in every layer).
    pub pairs: Vec<usize>,
    /// `copy_blocks`: layers per call (a key and a value cache each).
    pub num_layers: usize,
    /// `swap_blocks`: directions to measure.
    #[serde(serialize_with = "ser_displays")]
    pub directions: Vec<SwapDirection>,
    /// Timed calls per point in each of the cold and hot series (positive); the ceilings run
    /// `iters` clamped to 5..=20 times.
    pub iters: usize,
    /// Untimed calls per point before the timed ones.
    pub warmup: usize,
    /// Seed of the inputs, the cache fill and the shuffled blocks.
    pub seed: u64,
    /// Points that allocate more (device plus pinned host memory) are skipped.
    pub max_bytes: u64,
}

/// A measured copy rate.
#[derive(Clone, Debug, Serialize)]
pub struct Ceiling {
    /// What was copied, e.g. "device-to-device copy" or "one d2h copy, pinned host memory".
    pub what: String,
    /// Bytes counted per copy (read + written for the device copy, copied for a transfer).
    pub bytes: u64,
    /// Median milliseconds per copy.
    pub ms: f64,
    /// `bytes` per median copy, GB/s (10^9 bytes per second).
    pub gbps: f64,
}

/// Figures of one measured point. Rates use the median time.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// Bytes per call: read + written for the on-device ops (keys, values and the slot mapping for
    /// the reshape ops; source and destination blocks for `copy_blocks`), copied for `swap_blocks`.
    pub bytes: u64,
    /// Median µs per call with the L2 flushed before each call ([`Report::flush_bytes`] written).
    pub cold_us: f64,
    /// Fastest cold call, µs.
    pub cold_min_us: f64,
    /// Median µs per call with a warm L2 (no flush between calls).
    pub hot_us: f64,
    /// Fastest hot call, µs.
    pub hot_min_us: f64,
    /// `bytes` per median cold call, GB/s.
    pub cold_gbps: f64,
    /// `bytes` per median hot call, GB/s.
    pub hot_gbps: f64,
    /// The ceiling of this point: the device copy, or for `swap_blocks` a copy of `bytes` in the
    /// same direction, timed cold.
    pub ceiling: Ceiling,
    /// The cold rate as a percentage of `ceiling`'s.
    pub pct_ceiling_cold: f64,
    /// The hot rate as a percentage of `ceiling`'s.
    pub pct_ceiling_hot: f64,
    /// Elements compared with the expected result after the timed runs (0: too large to check on
    /// the host).
    pub checked_elements: usize,
    /// Checked elements whose bits differ from the expected result.
    pub mismatches: usize,
    /// No checked element differs (also true when nothing was checked).
    pub correct: bool,
}

/// One point: measured, or skipped with the reason.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Element type of the keys, values and caches.
    #[serde(serialize_with = "ser_dtype")]
    pub dtype: DType,
    /// Tokens (reshape ops) or block pairs (`copy_blocks`, `swap_blocks`).
    pub size: usize,
    /// `swap_blocks`: the direction of the copy; `None` for the other ops.
    #[serde(serialize_with = "ser_opt_display")]
    pub direction: Option<SwapDirection>,
    /// Bytes the point allocates (device memory, plus pinned host memory for swaps).
    pub footprint_bytes: u64,
    /// Why the point was not run (footprint above [`Config::max_bytes`], or too little free device
    /// memory); `None` when measured.
    pub skipped: Option<String>,
    /// The figures; `None` when skipped.
    pub measured: Option<Measurement>,
}

/// What [`run`] returns: the device, its copy ceiling and every point of the configuration.
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
    /// The device-to-device copy ceiling, measured once.
    pub device_copy: Ceiling,
    /// Every point in grid order (dtype, direction, size; the first varies slowest).
    pub points: Vec<Point>,
}

/// Progress events passed to [`run`]'s callback.
pub enum Progress<'a> {
    /// Measuring the device copy ceiling (before any point).
    Ceiling,
    /// Ceiling known; `points` points follow.
    Ready {
        /// The measured device-to-device copy ceiling.
        device_copy: &'a Ceiling,
        /// How many points the run measures (or skips).
        points: usize,
    },
    /// Point `index` starts.
    Start {
        /// The point's position in [`Report::points`].
        index: usize,
        /// Element type of the point.
        dtype: DType,
        /// Tokens (reshape ops) or block pairs (`copy_blocks`, `swap_blocks`).
        size: usize,
        /// `swap_blocks`: the direction; `None` for the other ops.
        direction: Option<SwapDirection>,
    },
    /// Point `index` is done (measured or skipped).
    Done {
        /// The point's position in [`Report::points`].
        index: usize,
        /// The point's result.
        point: &'a Point,
    },
}

fn ser_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_displays<T: std::fmt::Display, S: serde::Serializer>(v: &[T], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(ToString::to_string))
}

fn ser_opt_display<T: std::fmt::Display, S: serde::Serializer>(v: &Option<T>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// Reshape points check against the CPU backend up to this many key elements (its index lists take
/// about 32 bytes per element).
const MAX_CHECKED_ELEMS: usize = 1 << 24;

/// Runs every point of `cfg` on the GPU of `device` (an error for the CPU backend). Kernel status
/// flags are left for the caller's [`Gpu::check_status`].
pub fn run(device: &Device, cfg: &Config, progress: &mut dyn FnMut(Progress)) -> Result<Report> {
    let Device::Gpu(gpu) = device else { return Err(Error::NoGpu("the benchmark needs a GPU".into())) };
    check_config(cfg)?;
    let l2_bytes = gpu.context().attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(1) as usize;

    progress(Progress::Ceiling);
    let half = ceiling_half_bytes(gpu)?;
    let copy_ms = measure_device_copy(gpu, half, ceiling_runs(cfg.iters))?;
    let device_copy =
        Ceiling { what: "device-to-device copy".into(), bytes: 2 * half as u64, ms: copy_ms, gbps: gbps(2 * half as u64, copy_ms) };
    // 4× the L2, so nothing of the previous run survives the flush.
    let mut flush = gpu.stream().alloc_zeros::<u8>(4 * l2_bytes)?;

    let sizes = match cfg.op {
        CacheOp::ReshapeAndCache | CacheOp::ReshapeAndCacheFlash => &cfg.tokens,
        CacheOp::CopyBlocks | CacheOp::SwapBlocks => &cfg.pairs,
    };
    let directions: Vec<Option<SwapDirection>> =
        if cfg.op == CacheOp::SwapBlocks { cfg.directions.iter().copied().map(Some).collect() } else { vec![None] };
    let mut grid = Vec::new();
    for &dtype in &cfg.dtypes {
        for &direction in &directions {
            for &size in sizes {
                grid.push((dtype, direction, size));
            }
        }
    }
    progress(Progress::Ready { device_copy: &device_copy, points: grid.len() });
    let mut points = Vec::with_capacity(grid.len());
    for (index, &(dtype, direction, size)) in grid.iter().enumerate() {
        progress(Progress::Start { index, dtype, size, direction });
        let mut bench = PointBench { device, gpu, cfg, flush: &mut flush, device_copy: &device_copy, dtype, size };
        let point = match (cfg.op, direction) {
            (CacheOp::ReshapeAndCache | CacheOp::ReshapeAndCacheFlash, _) => bench.reshape()?,
            (CacheOp::CopyBlocks, _) => bench.copy_blocks()?,
            (CacheOp::SwapBlocks, Some(d)) => bench.swap_blocks(d)?,
            (CacheOp::SwapBlocks, None) => unreachable!("swap points have a direction"),
        };
        // Buffers were freed stream-ordered; wait so the next point's free-memory check sees it.
        gpu.synchronize()?;
        progress(Progress::Done { index, point: &point });
        points.push(point);
    }
    Ok(Report {
        device: device.name(),
        l2_bytes: l2_bytes as u64,
        flush_bytes: flush.len() as u64,
        config: cfg.clone(),
        device_copy,
        points,
    })
}

fn check_config(cfg: &Config) -> Result<()> {
    let op = "cache benchmark";
    let bad = |what: &'static str, got: String, why: &str| Err(Error::Value { op, what, got, why: why.into() });
    let layout_ok = match cfg.op {
        CacheOp::ReshapeAndCache => cfg.layout == KvLayout::Vllm,
        CacheOp::ReshapeAndCacheFlash => cfg.layout != KvLayout::Vllm,
        CacheOp::CopyBlocks | CacheOp::SwapBlocks => true,
    };
    if !layout_ok {
        return bad(
            "layout",
            cfg.layout.to_string(),
            &format!("{} writes {}", cfg.op, if cfg.op == CacheOp::ReshapeAndCache { "vllm" } else { "a flash layout" }),
        );
    }
    if [cfg.num_kv_heads, cfg.head_size, cfg.block_size, cfg.num_layers, cfg.iters].contains(&0) {
        return bad(
            "sizes",
            format!(
                "kv heads {}, head size {}, block size {}, layers {}, iters {}",
                cfg.num_kv_heads, cfg.head_size, cfg.block_size, cfg.num_layers, cfg.iters
            ),
            "must be positive",
        );
    }
    if cfg.tokens.contains(&0) || cfg.pairs.contains(&0) {
        return bad("tokens / pairs", format!("{:?} / {:?}", cfg.tokens, cfg.pairs), "must be positive");
    }
    Ok(())
}

/// One point's context.
struct PointBench<'a> {
    device: &'a Device,
    gpu: &'a Gpu,
    cfg: &'a Config,
    flush: &'a mut cudarc::driver::CudaSlice<u8>,
    device_copy: &'a Ceiling,
    dtype: DType,
    size: usize,
}

/// Median and minimum milliseconds of the cold and the hot runs.
struct Timing {
    cold: (f64, f64),
    hot: (f64, f64),
}

impl PointBench<'_> {
    fn shape(&self, num_blocks: usize) -> CacheShape {
        CacheShape {
            cache: KvCacheDType::Auto,
            dtype: self.dtype,
            num_blocks,
            block_size: self.cfg.block_size,
            num_kv_heads: self.cfg.num_kv_heads,
            head_size: self.cfg.head_size,
        }
    }

    fn point(&self, direction: Option<SwapDirection>, footprint_bytes: u64) -> Point {
        Point { dtype: self.dtype, size: self.size, direction, footprint_bytes, skipped: None, measured: None }
    }

    /// The reason to skip a point that allocates `bytes`, if any.
    fn too_big(&self, bytes: u64) -> Result<Option<String>> {
        if bytes > self.cfg.max_bytes {
            return Ok(Some(format!("{:.2} GiB exceeds the {:.1} GiB limit", gib(bytes), gib(self.cfg.max_bytes))));
        }
        let (free, _) = self.gpu.context().mem_get_info()?;
        // Headroom for the allocator and the module's own allocations.
        let needed = bytes + (256 << 20);
        Ok((needed > free as u64).then(|| format!("needs {:.2} GiB, {:.2} GiB free", gib(needed), gib(free as u64))))
    }

    /// Warm-up, then cold (L2 flushed before each run) and hot runs of `op`.
    fn time(&mut self, mut op: impl FnMut() -> Result<()>) -> Result<Timing> {
        let (gpu, cfg) = (self.gpu, self.cfg);
        time_each(gpu, cfg.warmup, || Ok(()), &mut op)?;
        let flush = &mut *self.flush;
        let cold = time_each(gpu, cfg.iters, || Ok(gpu.stream().memset_zeros(flush)?), &mut op)?;
        let hot = time_each(gpu, cfg.iters, || Ok(()), &mut op)?;
        Ok(Timing { cold: median_min(cold), hot: median_min(hot) })
    }

    fn measurement(&self, bytes: u64, t: &Timing, ceiling: Ceiling, check: BitCheck) -> Measurement {
        let (cold_gbps, hot_gbps) = (gbps(bytes, t.cold.0), gbps(bytes, t.hot.0));
        Measurement {
            bytes,
            cold_us: t.cold.0 * 1e3,
            cold_min_us: t.cold.1 * 1e3,
            hot_us: t.hot.0 * 1e3,
            hot_min_us: t.hot.1 * 1e3,
            cold_gbps,
            hot_gbps,
            pct_ceiling_cold: 100.0 * cold_gbps / ceiling.gbps,
            pct_ceiling_hot: 100.0 * hot_gbps / ceiling.gbps,
            ceiling,
            checked_elements: check.elements,
            mismatches: check.mismatches,
            correct: check.passes(),
        }
    }

    /// `reshape_and_cache[_flash]` of `size` tokens into consecutive slots of shuffled blocks.
    fn reshape(&mut self) -> Result<Point> {
        let cfg = self.cfg;
        let (h, d, bs, es) = (cfg.num_kv_heads, cfg.head_size, cfg.block_size, self.dtype.size_bytes());
        let tokens = self.size;
        let mut case = ReshapeCase::new(cfg.layout, self.dtype, h, d, bs, vec![tokens], cfg.seed);
        case.device_slots = true;
        let row_bytes = (h * d * es) as u64;
        let num_blocks = tokens.div_ceil(bs) + 3;
        let footprint = 2 * (tokens as u64 + 2) * row_bytes + 2 * (num_blocks * bs) as u64 * row_bytes + 8 * tokens as u64;
        let mut point = self.point(None, footprint);
        if let Some(why) = self.too_big(footprint)? {
            point.skipped = Some(why);
            return Ok(point);
        }
        let inp = case.inputs()?;
        let device = self.device;
        let (key, value) = (device.upload(&inp.key)?, device.upload(&inp.value)?);
        let mut caches = inp.caches.upload(device)?;
        let slots = device.upload(&inp.slot_mapping)?;
        let layout = cfg.layout.cache_layout();
        let timing = self.time(|| cases::reshape(device, layout, &key, &value, &mut caches, &slots, None))?;
        // Each run writes the same elements, so the caches hold one run's result.
        let check = if tokens * h * d <= MAX_CHECKED_ELEMS {
            compare_caches(&caches, &case.run(&Device::Cpu, &inp)?)?
        } else {
            BitCheck::default()
        };
        let bytes = 4 * tokens as u64 * row_bytes + 8 * tokens as u64;
        point.measured = Some(self.measurement(bytes, &timing, self.device_copy.clone(), check));
        Ok(point)
    }

    /// `copy_blocks` of `size` pairs (distinct sources and destinations) in every layer.
    fn copy_blocks(&mut self) -> Result<Point> {
        let cfg = self.cfg;
        let pairs = self.size;
        let shape = self.shape(2 * pairs);
        let block_bytes = shape.block_bytes() as u64;
        let footprint = cfg.num_layers as u64 * 2 * shape.num_blocks as u64 * block_bytes;
        let mut point = self.point(None, footprint);
        if let Some(why) = self.too_big(footprint)? {
            point.skipped = Some(why);
            return Ok(point);
        }
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let caches = KvCaches::zeros(self.gpu, cfg.layout, &shape)?.block_views()?;
            fill(self.gpu, &caches, cfg.seed.wrapping_add(l as u64))?;
            layers.push(caches);
        }
        let mut perm: Vec<i64> = (0..shape.num_blocks as i64).collect();
        Rng::new(cfg.seed).shuffle(&mut perm);
        let pair_list: Vec<i64> = (0..pairs).flat_map(|i| [perm[i], perm[pairs + i]]).collect();
        let mapping = self.device.upload(&Tensor::from_i64(&[pairs, 2], &pair_list)?)?;
        let device = self.device;
        let timing = self.time(|| cases::run_copy_blocks(device, &mut layers, &mapping))?;
        let mut check = BitCheck::default();
        for caches in &layers {
            for t in [&caches.key, &caches.value] {
                let host = t.to_cpu()?;
                check = check.merge(blocks_equal(&host, &host, &pair_list)?);
            }
        }
        let bytes = 2 * cfg.num_layers as u64 * pairs as u64 * 2 * block_bytes;
        point.measured = Some(self.measurement(bytes, &timing, self.device_copy.clone(), check));
        Ok(point)
    }

    /// `swap_blocks` of `size` blocks of the key and of the value cache (two calls, as vLLM swaps a
    /// layer) in `direction`: the device side has `2 * size` blocks, the host side `size`.
    fn swap_blocks(&mut self, direction: SwapDirection) -> Result<Point> {
        let cfg = self.cfg;
        let n = self.size;
        let (src_host, dst_host) = direction.host_ends();
        let blocks = |host: bool| if host { n } else { 2 * n };
        let (src_shape, dst_shape) = (self.shape(blocks(src_host)), self.shape(blocks(dst_host)));
        let block_bytes = src_shape.block_bytes() as u64;
        let bytes = 2 * n as u64 * block_bytes;
        // Both caches, plus the two ceiling buffers.
        let footprint = 2 * (src_shape.num_blocks + dst_shape.num_blocks) as u64 * block_bytes + 2 * bytes;
        let mut point = self.point(Some(direction), footprint);
        if let Some(why) = self.too_big(footprint)? {
            point.skipped = Some(why);
            return Ok(point);
        }
        let gpu = self.gpu;
        let end = |shape: &CacheShape, host: bool, seed: u64| -> Result<KvCaches> {
            let caches = KvCaches::zeros(gpu, cfg.layout, shape)?.block_views()?;
            fill(gpu, &caches, seed)?;
            if host { caches.map(|t| t.to_pinned(gpu)) } else { Ok(caches) }
        };
        let src = end(&src_shape, src_host, cfg.seed)?;
        let mut dst = end(&dst_shape, dst_host, cfg.seed.wrapping_add(1))?;
        let mut rng = Rng::new(cfg.seed);
        let (mut from, mut to): (Vec<i64>, Vec<i64>) =
            ((0..src_shape.num_blocks as i64).collect(), (0..dst_shape.num_blocks as i64).collect());
        rng.shuffle(&mut from);
        rng.shuffle(&mut to);
        let pair_list: Vec<i64> = (0..n).flat_map(|i| [from[i], to[i]]).collect();
        let mapping = Tensor::from_i64(&[n, 2], &pair_list)?;
        let device = self.device;
        let timing = self.time(|| {
            swap_blocks(device, &src.key, &mut dst.key, &mapping)?;
            swap_blocks(device, &src.value, &mut dst.value, &mapping)
        })?;
        gpu.synchronize()?;
        let mut check = BitCheck::default();
        for (s, d) in [(&src.key, &dst.key), (&src.value, &dst.value)] {
            check = check.merge(blocks_equal(&s.to_cpu()?, &d.to_cpu()?, &pair_list)?);
        }

        // The ceiling: one copy of the same bytes in the same direction, between contiguous buffers
        // (a one-pair swap of a single block holding everything).
        let (st, elems) = (ScalarType::from(self.dtype), 2 * n * src_shape.block_elems());
        let buffer = |host: bool| if host { gpu.pinned(st, &[1, elems]) } else { gpu.zeros(st, &[1, elems]) };
        let (one_src, mut one_dst) = (buffer(src_host)?, buffer(dst_host)?);
        let one = Tensor::from_i64(&[1, 2], &[0, 0])?;
        let ceiling_timing = self.time(|| swap_blocks(device, &one_src, &mut one_dst, &one))?;
        gpu.synchronize()?;
        let ms = ceiling_timing.cold.0;
        let ceiling = Ceiling {
            what: format!(
                "one {direction} copy of the same bytes{}",
                if direction == SwapDirection::DeviceToDevice { "" } else { ", pinned host memory" }
            ),
            bytes,
            ms,
            gbps: gbps(bytes, ms),
        };
        point.measured = Some(self.measurement(bytes, &timing, ceiling, check));
        Ok(point)
    }
}

/// Fills the storages of device caches with the util kernel's deterministic random values.
fn fill(gpu: &Gpu, caches: &KvCaches, seed: u64) -> Result<()> {
    for (i, t) in caches.storages().into_iter().enumerate() {
        let mut view = t.alias();
        fill_uniform(gpu, &mut view, seed.wrapping_mul(2).wrapping_add(i as u64), 1.0)?;
    }
    Ok(())
}

/// Compares block `src_id` of `src` with block `dst_id` of `dst` for every pair, bit for bit (host
/// block views: the axes after the first contiguous).
fn blocks_equal(src: &Tensor, dst: &Tensor, pairs: &[i64]) -> Result<BitCheck> {
    let es = src.dtype().size_bytes();
    let block_elems: usize = src.shape()[1..].iter().product();
    let span = |t: &Tensor, b: i64| {
        let start = (t.offset() + b as usize * t.strides()[0]) * es;
        start..start + block_elems * es
    };
    let mut check = BitCheck::default();
    // One guard when both are views of one storage (a lock is not reentrant).
    let same = src.shares_storage(dst);
    let s_bytes = src.host_bytes()?;
    let d_guard = if same { None } else { Some(dst.host_bytes()?) };
    let d_bytes: &[u8] = d_guard.as_deref().unwrap_or(&s_bytes);
    for p in pairs.chunks_exact(2) {
        let (a, b) = (&s_bytes[span(src, p[0])], &d_bytes[span(dst, p[1])]);
        check.elements += block_elems;
        for (i, (x, y)) in a.chunks_exact(es).zip(b.chunks_exact(es)).enumerate() {
            if x != y {
                check.mismatches += 1;
                check.first_mismatch.get_or_insert(span(dst, p[1]).start / es + i);
            }
        }
    }
    Ok(check)
}
