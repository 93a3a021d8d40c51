//! `pagedattn bench`: the paged-attention decode benchmark (`pagedattn::bench`) or a cache op's
//! bandwidth (`pagedattn::bench_cache`), as tables and optionally JSON.

use std::path::PathBuf;

use clap::Args;
use pagedattn::bench_cache::{self, CacheOp};
use pagedattn::layout::{DType, KvCacheDType};
use pagedattn::testing::cache::{KvLayout, SwapDirection};
use pagedattn::{Device, FlashKernel, ReduceMode, Version, bench};

use crate::{
    CliError, CliResult, Op, check_cache_shape, check_shape, check_status, gib, open_gpu, parse_dtype, parse_kv_cache_dtype, progress_bar,
    resolve_layout, write_json,
};

#[derive(Args)]
pub struct BenchArgs {
    /// The op to time: paged-attention (decode) or a cache op.
    #[arg(long, value_enum, default_value_t = Op::PagedAttention)]
    op: Op,
    #[arg(long, value_delimiter = ',', default_value = "f16,bf16", value_parser = parse_dtype)]
    dtype: Vec<DType>,
    /// paged-attention: KV cache dtypes (auto = the query's; fp8_e4m3, fp8_e5m2).
    #[arg(long, value_delimiter = ',', default_value = "auto", value_parser = parse_kv_cache_dtype)]
    kv_cache_dtype: Vec<KvCacheDType>,
    /// paged-attention: sequences per batch.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    batch: Vec<usize>,
    /// paged-attention: tokens per sequence.
    #[arg(long, value_delimiter = ',', default_value = "512,4096,16384")]
    context: Vec<usize>,
    /// paged-attention: query heads.
    #[arg(long, default_value_t = 32)]
    num_heads: usize,
    #[arg(long, default_value_t = 8)]
    num_kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_size: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// paged-attention: kernels to time at each point: v1, v2 (512-token partitions) and/or auto
    /// (the library's choice).
    #[arg(long, value_delimiter = ',', default_value = "v1,v2,auto")]
    version: Vec<Version>,
    /// paged-attention: v2 partition sizes (tokens, multiples of 32); v2 and auto run once per size.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    partition_size: Vec<usize>,
    /// reshape ops: tokens written per call (one run of consecutive slots through shuffled blocks).
    #[arg(long, value_delimiter = ',', default_value = "16,256,2048,8192")]
    tokens: Vec<usize>,
    /// copy-blocks, swap-blocks: blocks copied per call (copy-blocks: in every layer).
    #[arg(long, value_delimiter = ',', default_value = "16,256,1024")]
    pairs: Vec<usize>,
    /// copy-blocks: layers per call (a key and a value cache each).
    #[arg(long, default_value_t = 8)]
    num_layers: usize,
    /// swap-blocks: d2h (GPU to pinned host memory), h2d and/or d2d.
    #[arg(long, value_delimiter = ',', default_value = "d2h,h2d,d2d")]
    direction: Vec<SwapDirection>,
    /// Cache ops: layout (vllm, nhd, hnd, combined, combined-inner; as in `run`).
    #[arg(long)]
    layout: Option<KvLayout>,
    /// paged-attention: also time a decode step (reshape_and_cache of one token per sequence, then
    /// the attention) launched op by op and replayed as a CUDA graph.
    #[arg(long)]
    pub graph: bool,
    /// paged-attention: how v2 merges its partitions: fused (the last partition CTA, one launch),
    /// separate (vLLM's reduce kernel) or auto (fused while the grid is small).
    #[arg(long, default_value = "auto")]
    pub reduce: ReduceMode,
    /// flash-attn-varlen: the kernels to time (mma: `mma.sync`, every GPU; wgmma: Hopper; auto:
    /// the library's choice); one the GPU cannot run is skipped.
    #[arg(long, value_delimiter = ',', default_value = "mma,wgmma")]
    pub flash_kernel: Vec<FlashKernel>,
    /// Timed runs per point (cold and hot each).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    #[arg(long, default_value_t = 10)]
    warmup: u32,
    /// Seed of the cache fill and block shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip points whose K+V cache (paged-attention) or allocations (cache ops) exceed this many GiB.
    #[arg(long, default_value_t = 40.0)]
    max_kv_gib: f64,
    /// Write all figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn bench(a: BenchArgs) -> CliResult {
    if a.max_kv_gib.is_nan() || a.max_kv_gib <= 0.0 {
        return Err(CliError::Input(format!("--max-kv-gib {} must be positive", a.max_kv_gib)));
    }
    let layout = resolve_layout(a.op, a.layout)?;
    match a.op {
        Op::PagedAttention => attention(&a),
        Op::ReshapeAndCache => cache(&a, CacheOp::ReshapeAndCache, layout),
        Op::ReshapeAndCacheFlash => cache(&a, CacheOp::ReshapeAndCacheFlash, layout),
        Op::CopyBlocks => cache(&a, CacheOp::CopyBlocks, layout),
        Op::SwapBlocks => cache(&a, CacheOp::SwapBlocks, layout),
        Op::FlashAttnVarlen => varlen(&a),
    }
}

fn max_bytes(a: &BenchArgs) -> u64 {
    (a.max_kv_gib * (1u64 << 30) as f64) as u64
}

// ------------------------------------------------------------------------------ paged attention

fn attention(a: &BenchArgs) -> CliResult {
    check_shape(a.head_size, a.block_size, a.num_heads, a.num_kv_heads)?;
    for &c in &a.kv_cache_dtype {
        crate::check_cache_dtype(c, a.head_size)?;
    }
    if a.batch.contains(&0) || a.context.contains(&0) {
        return Err(CliError::Input("--batch and --context values must be positive".into()));
    }
    let mut device = Device::Gpu(open_gpu("benchmark")?);
    let cfg = bench::Config {
        dtypes: a.dtype.clone(),
        caches: a.kv_cache_dtype.clone(),
        batches: a.batch.clone(),
        contexts: a.context.clone(),
        num_heads: a.num_heads,
        num_kv_heads: a.num_kv_heads,
        head_size: a.head_size,
        block_size: a.block_size,
        versions: a.version.clone(),
        partition_sizes: a.partition_size.clone(),
        iters: a.iters as usize,
        warmup: a.warmup as usize,
        max_kv_bytes: max_bytes(a),
        seed: a.seed,
        graph: a.graph,
        reduce: a.reduce,
    };
    println!(
        "paged attention decode on {}: {} heads / {} KV heads, head size {}, block size {}, {} timed runs after {} warm-up",
        device.name(),
        a.num_heads,
        a.num_kv_heads,
        a.head_size,
        a.block_size,
        a.iters,
        a.warmup
    );
    let pb = progress_bar(0);
    let report = bench::run(&device, &cfg, &mut |p| match p {
        bench::Progress::Ceilings => pb.set_message("measuring bandwidth ceilings"),
        bench::Progress::Ready { ceilings: c, points } => {
            pb.set_length(points as u64);
            pb.suspend(|| {
                println!(
                    "ceilings: copy {:.0} GB/s ({} read+written, {:.3} ms), stream read {:.0} GB/s ({}, {:.3} ms); \
                     launch floor {:.1} µs GPU, {:.1} µs host (one-CTA kernel back to back)\n",
                    c.copy_gbps,
                    gib(c.copy_bytes),
                    c.copy_ms,
                    c.read_gbps,
                    gib(c.read_bytes),
                    c.read_ms,
                    c.launch_gpu_us,
                    c.launch_host_us
                );
                println!(
                    "{:<5} {:>8} {:>6} {:>8} {:>7} {:>10} {:>10} {:>10} {:>8} {:>8} {:>10} {:>7} {:>7} {:>9}",
                    "dtype",
                    "cache",
                    "batch",
                    "context",
                    "kernel",
                    "KV MB",
                    "cold µs",
                    "hot µs",
                    "b2b µs",
                    "host µs",
                    "cold GB/s",
                    "% copy",
                    "% read",
                    "rel-L2"
                );
            });
        }
        bench::Progress::Start { dtype, cache, batch, context, version, .. } => {
            pb.set_message(format!("{dtype} {cache} batch {batch} context {context} {version}"))
        }
        bench::Progress::Done { point, .. } => {
            pb.suspend(|| println!("{}", attention_row(point)));
            pb.inc(1);
        }
    });
    pb.finish_and_clear();
    let report = report?;
    let status = check_status(&mut device);
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    status?;
    let bad: Vec<String> = report
        .points
        .iter()
        .filter(|p| p.measured.as_ref().is_some_and(|m| !m.correct || m.step.as_ref().is_some_and(|s| !s.same_output)))
        .map(|p| format!("{} {} batch {} context {} {}", p.dtype, p.cache, p.batch, p.context, p.version))
        .collect();
    if !bad.is_empty() {
        return Err(CliError::Failed(format!("spot check above tolerance, or graph replay differs: {}", bad.join("; "))));
    }
    Ok(())
}

fn attention_row(p: &bench::Point) -> String {
    let part = |v: Version| if v == Version::V2 && p.partition_size != 512 { format!("/{}", p.partition_size) } else { String::new() };
    let kernel = match (&p.measured, p.version) {
        (Some(m), Version::Auto) if m.ran == Version::V2 => format!("auto=v2/{}", m.ran_partition_size),
        (Some(m), Version::Auto) => format!("auto={}", m.ran),
        _ => format!("{}{}", p.version, part(p.version)),
    };
    let head =
        format!("{:<5} {:>8} {:>6} {:>8} {:>7} {:>10.1}", p.dtype, p.cache.name(), p.batch, p.context, kernel, p.kv_bytes as f64 / 1e6);
    match (&p.measured, &p.skipped) {
        (Some(m), _) => {
            format!(
                "{head} {:>10.1} {:>10.1} {:>8.1} {:>8.1} {:>10.0} {:>6.1}% {:>6.1}% {:>8.1e}{}",
                m.cold_us,
                m.hot_us,
                m.back_to_back_us,
                m.host_us,
                m.cold_gbps,
                m.pct_copy,
                m.pct_stream_read,
                m.rel_l2,
                if m.correct { "" } else { " !" }
            ) + &m.step.as_ref().map_or(String::new(), |s| {
                format!(
                    "  step: launched {:.1} µs ({:.1} host), graph {:.1} µs ({:.1} host){}",
                    s.plain_us,
                    s.plain_host_us,
                    s.graph_us,
                    s.graph_host_us,
                    if s.same_output { "" } else { " DIFFERS" }
                )
            })
        }
        (None, Some(why)) => format!("{head}  skipped: {why}"),
        (None, None) => head,
    }
}

// ------------------------------------------------------------------------------ varlen attention

/// The scenarios (32 q / 8 KV heads, `--head-size`, `--block-size`), one line each.
fn varlen(a: &BenchArgs) -> CliResult {
    let device = Device::Gpu(open_gpu("benchmark")?);
    println!(
        "flash_attn_varlen_func on {}: 32 heads / 8 KV heads, head {h}, block {}, {} timed runs after {} warm-up; TFLOP/s = 4 · {h} · 32 · visible pairs / time",
        device.name(),
        a.block_size,
        a.iters,
        a.warmup,
        h = a.head_size
    );
    println!(
        "{:<5} {:<6} {:<58} {:>14} {:>10} {:>10} {:>9} {:>9}",
        "dtype", "kernel", "scenario", "pairs", "cold µs", "hot µs", "cold TF/s", "hot TF/s"
    );
    let (iters, warmup) = (a.iters as usize, a.warmup as usize);
    let points = pagedattn::bench_varlen::run(&device, &a.dtype, &a.flash_kernel, a.head_size, a.block_size, iters, warmup, |p| {
        println!(
            "{:<5} {:<6} {:<58} {:>14} {:>10.1} {:>10.1} {:>9.1} {:>9.1}{}",
            p.dtype,
            p.kernel,
            p.scenario.name,
            p.pairs,
            p.cold_us,
            p.hot_us,
            p.cold_tflops,
            p.hot_tflops,
            if p.finite { "" } else { " non-finite output!" }
        )
    })?;
    if let Some(path) = &a.json {
        write_json(path, &points)?;
    }
    if points.iter().any(|p| !p.finite) {
        return Err(CliError::Failed("non-finite outputs".into()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- cache ops

fn cache(a: &BenchArgs, op: CacheOp, layout: KvLayout) -> CliResult {
    check_cache_shape(a.head_size, a.block_size, a.num_kv_heads)?;
    if a.tokens.contains(&0) || a.pairs.contains(&0) || a.num_layers == 0 {
        return Err(CliError::Input("--tokens, --pairs and --num-layers values must be positive".into()));
    }
    let mut device = Device::Gpu(open_gpu("benchmark")?);
    let cfg = bench_cache::Config {
        op,
        dtypes: a.dtype.clone(),
        num_kv_heads: a.num_kv_heads,
        head_size: a.head_size,
        block_size: a.block_size,
        layout,
        tokens: a.tokens.clone(),
        pairs: a.pairs.clone(),
        num_layers: a.num_layers,
        directions: a.direction.clone(),
        iters: a.iters as usize,
        warmup: a.warmup as usize,
        seed: a.seed,
        max_bytes: max_bytes(a),
    };
    let what = match op {
        CacheOp::ReshapeAndCache | CacheOp::ReshapeAndCacheFlash => "tokens per call".to_string(),
        CacheOp::CopyBlocks => format!("block pairs per call in each of {} layers", a.num_layers),
        CacheOp::SwapBlocks => "blocks of the key and of the value cache per call".to_string(),
    };
    println!(
        "{op} on {}: {layout} layout ({}), {} KV heads, head size {}, block size {}; sizes are {what}; {} timed runs after {} warm-up",
        device.name(),
        layout.describe(),
        a.num_kv_heads,
        a.head_size,
        a.block_size,
        a.iters,
        a.warmup
    );
    let size_col = if matches!(op, CacheOp::ReshapeAndCache | CacheOp::ReshapeAndCacheFlash) { "tokens" } else { "pairs" };
    let pb = progress_bar(0);
    let report = bench_cache::run(&device, &cfg, &mut |p| match p {
        bench_cache::Progress::Ceiling => pb.set_message("measuring the device copy ceiling"),
        bench_cache::Progress::Ready { device_copy: c, points } => {
            pb.set_length(points as u64);
            pb.suspend(|| {
                println!("ceiling: {} {:.0} GB/s ({} read+written, {:.3} ms)", c.what, c.gbps, gib(c.bytes), c.ms);
                if op == CacheOp::SwapBlocks {
                    println!("swap_blocks is compared with one copy of the same bytes in the same direction (column `ceil GB/s`)");
                }
                println!(
                    "\n{:<5} {:>4} {:>7} {:>10} {:>9} {:>9} {:>10} {:>10} {:>10} {:>7} {:>7}  check",
                    "dtype", "dir", size_col, "MB moved", "cold µs", "hot µs", "cold GB/s", "hot GB/s", "ceil GB/s", "% cold", "% hot"
                );
            });
        }
        bench_cache::Progress::Start { dtype, size, direction, .. } => {
            let dir = direction.map(|d| format!("{d} ")).unwrap_or_default();
            pb.set_message(format!("{dtype} {dir}{size} {size_col}"))
        }
        bench_cache::Progress::Done { point, .. } => {
            pb.suspend(|| println!("{}", cache_row(point)));
            pb.inc(1);
        }
    });
    pb.finish_and_clear();
    let report = report?;
    let status = check_status(&mut device);
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    status?;
    let bad: Vec<String> = report
        .points
        .iter()
        .filter_map(|p| p.measured.as_ref().filter(|m| !m.correct).map(|m| (p, m)))
        .map(|(p, m)| {
            let dir = p.direction.map(|d| format!(" {d}")).unwrap_or_default();
            format!("{}{dir} {}: {} of {} elements differ", p.dtype, p.size, m.mismatches, m.checked_elements)
        })
        .collect();
    if !bad.is_empty() {
        return Err(CliError::Failed(format!("{op} results wrong after the timed runs: {}", bad.join("; "))));
    }
    Ok(())
}

fn cache_row(p: &bench_cache::Point) -> String {
    let dir = p.direction.map_or("-".to_string(), |d| d.to_string());
    let head = format!("{:<5} {:>4} {:>7}", p.dtype, dir, p.size);
    match (&p.measured, &p.skipped) {
        (Some(m), _) => {
            let check = match (m.checked_elements, m.mismatches) {
                (0, _) => "not checked (too large)".to_string(),
                (_, 0) => "bit-exact".to_string(),
                (n, bad) => format!("{bad} of {n} elements DIFFER"),
            };
            format!(
                "{head} {:>10.2} {:>9.1} {:>9.1} {:>10.0} {:>10.0} {:>10.0} {:>6.1}% {:>6.1}%  {check}",
                m.bytes as f64 / 1e6,
                m.cold_us,
                m.hot_us,
                m.cold_gbps,
                m.hot_gbps,
                m.ceiling.gbps,
                m.pct_ceiling_cold,
                m.pct_ceiling_hot,
            )
        }
        (None, Some(why)) => format!("{head}  skipped: {why}"),
        (None, None) => head,
    }
}
