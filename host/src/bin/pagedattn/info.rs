//! `pagedattn info`: the GPU, which kernel image each family loads, the build report, every compiled
//! variant of every family, and how paged attention picks v1 or v2.

use std::collections::BTreeSet;

use clap::Args;
use cudarc::driver::sys;
use pagedattn::dispatch::{self, KernelVariant};
use pagedattn::layout::{DEFAULT_PARTITION_SIZE, DType, KernelFamily, KvCacheDType, PagedAttentionGeometry};
use pagedattn::{Gpu, Version, choose_version, ptx};
use serde::Serialize;
use serde_json::json;

use crate::{CliError, CliResult, gib, size};

#[derive(Args)]
pub struct InfoArgs {
    /// Print JSON (with every compiled symbol) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct GpuInfo {
    name: String,
    compute_capability: String,
    sm_count: i32,
    l2_bytes: i32,
    memory_bytes: usize,
    free_bytes: usize,
    driver_version: Option<String>,
    device_count: Option<i32>,
}

fn gpu_info(g: &Gpu) -> pagedattn::Result<GpuInfo> {
    let ctx = g.context();
    let (free_bytes, memory_bytes) = ctx.mem_get_info()?;
    let mut v = 0;
    // SAFETY: a context exists, so the driver library is loaded; the call writes one int.
    let driver = unsafe { sys::cuDriverGetVersion(&mut v) }.result().ok().map(|()| format!("{}.{}", v / 1000, (v % 1000) / 10));
    Ok(GpuInfo {
        name: g.name(),
        compute_capability: format!("{}.{}", g.arch.0, g.arch.1),
        sm_count: ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        l2_bytes: ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
        memory_bytes,
        free_bytes,
        driver_version: driver,
        device_count: cudarc::driver::CudaContext::device_count().ok(),
    })
}

/// Which embedded image a family loads at a compute capability.
#[derive(Serialize)]
struct LoadChoice {
    family: &'static str,
    compute_capability: String,
    image: String,
}

fn load_choice(family: KernelFamily, cc: (i32, i32)) -> LoadChoice {
    let image = match ptx::choose_image(family, cc) {
        Ok((img, kind)) => format!("{} {}", img.arch, kind.describe()),
        Err(e) => format!("none: {e}"),
    };
    LoadChoice { family: family.name(), compute_capability: format!("{}.{}", cc.0, cc.1), image }
}

/// SMs the examples of the automatic choice assume without a GPU (an H100's).
const EXAMPLE_SMS: usize = 132;

const V1: &str = "one CTA per (sequence, group of query heads sharing a KV head) walks the whole sequence";
const V2: &str = "each sequence is split into partitions (vLLM: 512 tokens) that separate CTAs process in parallel, \
then their partial results are merged: by the last partition CTA in the same launch while the grid is small, else \
by a reduce kernel (ReduceMode); needs a caller-owned workspace";
const AUTO: &str = "v1 when one 128-token partition holds every sequence, or when v1's CTAs (num_seqs x head groups) \
cover the GPU (>= 0.9 x SMs); else v2 with the largest partition of 2048, 1024, 512, 256, 128 tokens whose CTAs \
fill 1.5 x SMs. Decided from bounds the caller fixes (the workspace's max_seq_len), never from device data, so a \
captured CUDA graph stays valid";

/// The fewest v1 CTAs for which the automatic choice keeps v1 on long sequences with `sms` SMs.
fn v1_min_ctas(sms: usize) -> usize {
    (0..=3 * sms).find(|&c| choose_version(usize::MAX, c, sms) == Version::V1).unwrap_or(3 * sms)
}

/// Variants grouped by (family, kernel), in table order.
fn groups(variants: &[KernelVariant]) -> Vec<(KernelFamily, &'static str, Vec<&KernelVariant>)> {
    let mut out: Vec<(KernelFamily, &'static str, Vec<&KernelVariant>)> = Vec::new();
    for v in variants {
        match out.iter_mut().find(|(f, k, _)| *f == v.family && *k == v.kernel) {
            Some((_, _, vs)) => vs.push(v),
            None => out.push((v.family, v.kernel, vec![v])),
        }
    }
    out
}

fn list<T: Ord + ToString>(it: impl Iterator<Item = T>) -> String {
    it.collect::<BTreeSet<T>>().iter().map(T::to_string).collect::<Vec<_>>().join(", ")
}

/// One line per (family, kernel): count, symbol pattern and the value sets.
fn group_line(kernel: &str, vs: &[&KernelVariant]) -> String {
    let dtypes = list(vs.iter().filter_map(|v| v.dtype));
    let heads = list(vs.iter().filter_map(|v| v.head_size));
    let blocks = list(vs.iter().filter_map(|v| v.block_size));
    // fp8 caches: `_<kind>` after the dtype (optional where auto-cache variants share the kernel);
    // kernels on fp8 codes alone (the fill) are named by the kind instead of a dtype.
    let kinds = list(vs.iter().filter_map(|v| v.cache.fp8()).map(|k| &k.name()[4..]));
    let auto = vs.iter().any(|v| v.cache == KvCacheDType::Auto);
    let caches = list(vs.iter().map(|v| v.cache.name()));
    let (dt, cache_sets) = match (kinds.is_empty(), auto, vs.iter().any(|v| v.cache.fp8().is_some() && v.dtype.is_none())) {
        (true, _, _) => ("<dtype>".to_string(), String::new()),
        (false, _, true) => ("<dtype|e4m3|e5m2>".to_string(), String::new()),
        (false, true, false) => ("<dtype>[_<e4m3|e5m2>]".to_string(), format!(" x caches {{{caches}}}")),
        (false, false, false) => ("<dtype>_<e4m3|e5m2>".to_string(), format!(" x caches {{{caches}}}")),
    };
    let (pattern, sets) = match (dtypes.is_empty(), heads.is_empty()) {
        (false, false) => (
            format!("{kernel}_{dt}_h<head_size>_b<block_size>"),
            format!("dtypes {{{dtypes}}}{cache_sets} x head sizes {{{heads}}} x block sizes {{{blocks}}}"),
        ),
        (false, true) => (format!("{kernel}_{dt}"), format!("dtypes {{{dtypes}}}{cache_sets}")),
        _ => (kernel.to_string(), "one variant (works on bytes)".to_string()),
    };
    format!("{:>4} x {pattern:<52} {sets}", vs.len())
}

pub fn info(a: InfoArgs) -> CliResult {
    let gpu = Gpu::new(0);
    let gpu_info = gpu.as_ref().ok().map(gpu_info).transpose()?;
    // Without a GPU, show what common devices would load.
    let ccs = match &gpu {
        Ok(g) => vec![g.arch],
        Err(_) => vec![(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)],
    };
    let load: Vec<LoadChoice> = KernelFamily::ALL.iter().flat_map(|&f| ccs.iter().map(move |&cc| load_choice(f, cc))).collect();
    let variants = dispatch::kernel_variants();
    let sms = gpu.as_ref().map_or(EXAMPLE_SMS, |g| g.sm_count);
    let min_ctas = v1_min_ctas(sms);
    if a.json {
        let images: Vec<_> = ptx::images().iter().map(|i| {
            json!({"family": i.family, "arch": i.arch, "ptx_deflate_bytes": i.ptx_deflate.len(), "cubin_deflate_bytes": i.cubin_deflate.map(<[u8]>::len)})
        }).collect();
        let kernels: Vec<_> = variants
            .iter()
            .map(|v| {
                json!({
                    "family": v.family.name(),
                    "kernel": v.kernel,
                    "dtype": v.dtype.map(|d| d.name()),
                    "kv_cache_dtype": v.cache.name(),
                    "head_size": v.head_size,
                    "block_size": v.block_size,
                    "symbol": v.symbol,
                })
            })
            .collect();
        let attention: Vec<_> = dispatch::paged_attention_variants()
            .iter()
            .map(|v| {
                json!({"dtype": v.dtype.name(), "kv_cache_dtype": v.cache.name(), "head_size": v.head_size, "block_size": v.block_size, "symbol": v.symbol})
            })
            .collect();
        let v = json!({
            "gpu": gpu_info,
            "gpu_error": gpu.as_ref().err().map(ToString::to_string),
            "kernel_load": load,
            "images": images,
            "build_report": ptx::BUILD_REPORT,
            "kernels": kernels,
            "paged_attention_variants": attention,
            "paged_attention_versions": {
                "v1": V1,
                "v2": V2,
                "auto": AUTO,
                "default_partition_size": DEFAULT_PARTITION_SIZE,
                "auto_sm_count": sms,
                "auto_v1_min_ctas": min_ctas,
            },
            "swap_blocks": "no kernel: one cuMemcpyAsync per run of blocks adjacent in both caches",
        });
        println!("{}", serde_json::to_string_pretty(&v).map_err(|e| CliError::Io(e.to_string()))?);
        return Ok(());
    }

    match (&gpu_info, &gpu) {
        (Some(i), _) => {
            println!("GPU 0: {} (compute capability {})", i.name, i.compute_capability);
            let driver = i.driver_version.as_deref().unwrap_or("unknown");
            let count = i.device_count.unwrap_or(1);
            println!(
                "  {} SMs, {} memory ({} free), L2 {}, driver {driver}, {count} device(s)",
                i.sm_count,
                gib(i.memory_bytes as u64),
                gib(i.free_bytes as u64),
                size(i.l2_bytes as u64)
            );
            println!("\nKernel images this device loads:");
        }
        (None, Err(e)) => {
            println!("GPU: none ({e})");
            println!("\nKernel images a device of each compute capability would load:");
        }
        (None, Ok(_)) => {}
    }
    for l in &load {
        println!("  {:<20} {:>5}  {}", l.family, l.compute_capability, l.image);
    }
    println!("\nEmbedded images (deflate-compressed sizes):");
    for i in ptx::images() {
        let cubin = i.cubin_deflate.map_or("no cubin".to_string(), |c| format!("cubin {}", size(c.len() as u64)));
        println!("  {:<20} {:<6} PTX {:>10}, {cubin}", i.family, i.arch, size(i.ptx_deflate.len() as u64));
    }
    println!("\nKernel build report:");
    for line in ptx::BUILD_REPORT.lines() {
        println!("  {line}");
    }

    println!("\nCompiled variants: {} entry points (`pagedattn info --json` lists every symbol)", variants.len());
    let mut last = None;
    for (family, kernel, vs) in groups(variants) {
        let name = if last == Some(family) { "" } else { family.name() };
        last = Some(family);
        println!("  {name:<16}{}", group_line(kernel, &vs));
    }
    println!("  swap_blocks: one cuMemcpyAsync per run of blocks adjacent in both caches (up to 8 runs), else its kernel.");

    println!("\nPaged attention versions (one decode kernel per variant serves both):");
    println!("  v1    {V1}.");
    println!("  v2    {V2}.");
    println!("  auto  {AUTO}.");
    let on = if gpu.is_ok() { format!("on this GPU ({sms} SMs)") } else { format!("with {sms} SMs (an H100)") };
    // A Llama-like example: 32 query heads over 8 KV heads, f16, head size 128.
    let groups = PagedAttentionGeometry::new(DType::F16, 128, 16).head_groups(32, 8);
    let v1_len = (1..=DEFAULT_PARTITION_SIZE).take_while(|&l| choose_version(l, 1, sms) == Version::V1).last().unwrap_or(0);
    println!("        {on}: v1 for sequences of up to {v1_len} tokens or from {min_ctas} CTAs, else v2");
    println!(
        "        (32 heads / 8 KV heads, f16, h128: {groups} head groups per sequence, so v1 from {} sequences).",
        min_ctas.div_ceil(groups)
    );
    Ok(())
}
