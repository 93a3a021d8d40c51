//! `pagedattn`: device and kernel-image info, one-off runs of every op, verification against the
//! CPU backend, and benchmarks. The library never prints; this binary owns all output. One module
//! per subcommand (`pagedattn/*.rs`); shared arguments, errors and output helpers live here.

mod bench;
mod info;
mod run;
mod verify;

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pagedattn::layout::{BLOCK_SIZES, DType, FP8_HEAD_SIZES, HEAD_SIZES, KvCacheDType};
use pagedattn::testing::cache::KvLayout;
use pagedattn::{Device, Error, Gpu, ScalarType, Tensor};
use safetensors::{Dtype, tensor::TensorView};
use serde::Serialize;

const EXIT_CODES: &str = "Exit codes: 0 success, 1 a check failed (verification, spot check, device-side data), \
2 bad usage or input, 3 no GPU (verify, bench), 4 CUDA driver or I/O error.";

#[derive(Parser)]
#[command(
    name = "pagedattn",
    version,
    about = "vLLM's paged attention and KV-cache ops as Rust GPU kernels",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// GPU, embedded kernel images, build report, every compiled variant of every kernel family, and
    /// the v1/v2 choice (works without a GPU).
    Info(info::InfoArgs),
    /// Runs one op once on random (or, for paged attention, file) inputs, on the GPU if there is one,
    /// else on the CPU backend; writes inputs and outputs to a safetensors file.
    Run(run::RunArgs),
    /// Checks every op on the GPU against the CPU backend: paged attention within tolerance over a
    /// grid of variants (v1 and v2), the cache ops bit for bit, and the device-side guards.
    Verify(verify::VerifyArgs),
    /// Benchmarks one op with CUDA events: paged-attention decode, or a cache op's bandwidth.
    Bench(bench::BenchArgs),
}

/// The op of `run` and `bench` (`--op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Op {
    /// paged_attention v1/v2 (`--version`).
    PagedAttention,
    /// reshape_and_cache: tokens' keys and values into paged attention's cache layout.
    ReshapeAndCache,
    /// reshape_and_cache_flash: into flash-layout caches (`--layout`).
    ReshapeAndCacheFlash,
    /// copy_blocks: blocks within every layer's caches (`--num-layers`, `--pairs`).
    CopyBlocks,
    /// swap_blocks: blocks between caches, GPU and pinned host memory (`--direction`, `--pairs`).
    SwapBlocks,
    /// flash_attn_varlen_func: mixed prefill/decode batches over a paged cache (bench only so far).
    FlashAttnVarlen,
}

impl Op {
    /// The library's name of the op.
    fn name(self) -> &'static str {
        match self {
            Op::PagedAttention => "paged_attention",
            Op::ReshapeAndCache => "reshape_and_cache",
            Op::ReshapeAndCacheFlash => "reshape_and_cache_flash",
            Op::CopyBlocks => "copy_blocks",
            Op::SwapBlocks => "swap_blocks",
            Op::FlashAttnVarlen => "flash_attn_varlen_func",
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    /// Exit 1: a check failed.
    #[error("{0}")]
    Failed(String),
    /// Exit 2: bad arguments or input file.
    #[error("{0}")]
    Input(String),
    /// Exit 3: the command needs a GPU.
    #[error("{0}")]
    NoGpu(String),
    /// Exit 4: I/O.
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Lib(#[from] Error),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Failed(_) | CliError::Lib(Error::DeviceData { .. }) => 1,
            CliError::Input(_)
            | CliError::Lib(
                Error::Shape { .. }
                | Error::DType { .. }
                | Error::Layout { .. }
                | Error::Value { .. }
                | Error::Unsupported { .. }
                | Error::HostData { .. }
                | Error::Device { .. },
            ) => 2,
            CliError::NoGpu(_) | CliError::Lib(Error::NoGpu(_)) => 3,
            CliError::Io(_) | CliError::Lib(_) => 4,
        }
    }
}

type CliResult<T = ()> = Result<T, CliError>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pagedattn: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn try_main(cli: Cli) -> CliResult {
    match cli.cmd {
        Cmd::Info(a) => info::info(a),
        Cmd::Run(a) => run::run(a),
        Cmd::Verify(a) => verify::verify(a),
        Cmd::Bench(a) => bench::bench(a),
    }
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| format!("unknown dtype `{s}` (f32, f16 or bf16)"))
}

fn parse_kv_cache_dtype(s: &str) -> Result<KvCacheDType, String> {
    KvCacheDType::parse(s).ok_or_else(|| format!("unknown KV cache dtype `{s}` (auto, fp8, fp8_e4m3 or fp8_e5m2)"))
}

/// Rejects an fp8 cache with a head size that has no fp8 layout.
fn check_cache_dtype(cache: KvCacheDType, head_size: usize) -> CliResult {
    if cache != KvCacheDType::Auto && !FP8_HEAD_SIZES.contains(&head_size) {
        return Err(CliError::Input(format!("--head-size {head_size} has no fp8 cache variant (one of {FP8_HEAD_SIZES:?})")));
    }
    Ok(())
}

/// Rejects shapes paged attention has no variant for before any work (and before `Case` divides by them).
fn check_shape(head_size: usize, block_size: usize, num_heads: usize, num_kv_heads: usize) -> CliResult {
    if !HEAD_SIZES.contains(&head_size) {
        return Err(CliError::Input(format!("--head-size {head_size} is not compiled (one of {HEAD_SIZES:?})")));
    }
    if !BLOCK_SIZES.contains(&block_size) {
        return Err(CliError::Input(format!("--block-size {block_size} is not compiled (one of {BLOCK_SIZES:?})")));
    }
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(CliError::Input(format!("--num-heads {num_heads} must be a positive multiple of --num-kv-heads {num_kv_heads}")));
    }
    Ok(())
}

/// Cache ops take any positive sizes (the library rejects what a kernel cannot do).
fn check_cache_shape(head_size: usize, block_size: usize, num_kv_heads: usize) -> CliResult {
    for (flag, v) in [("--head-size", head_size), ("--block-size", block_size), ("--num-kv-heads", num_kv_heads)] {
        if v == 0 {
            return Err(CliError::Input(format!("{flag} must be positive")));
        }
    }
    Ok(())
}

/// The cache layout of an op: `--layout`, or the op's natural one.
fn resolve_layout(op: Op, layout: Option<KvLayout>) -> CliResult<KvLayout> {
    let bad = |why: String| Err(CliError::Input(why));
    match (op, layout) {
        (Op::PagedAttention | Op::ReshapeAndCache, Some(l)) if l != KvLayout::Vllm => {
            bad(format!("{} uses paged attention's layout (vllm); --layout {l} is for reshape-and-cache-flash", op.name()))
        }
        (Op::ReshapeAndCacheFlash, Some(KvLayout::Vllm)) => bad(
            "reshape-and-cache-flash writes the flash layouts (nhd, hnd, combined, combined-inner); use --op reshape-and-cache for vllm"
                .into(),
        ),
        (Op::ReshapeAndCacheFlash, None) => Ok(KvLayout::Nhd),
        (_, l) => Ok(l.unwrap_or(KvLayout::Vllm)),
    }
}

/// The first GPU, or exit 3 saying why `what` needs one.
fn open_gpu(what: &str) -> CliResult<Gpu> {
    Gpu::new(0).map_err(|e| match e {
        Error::NoGpu(why) => CliError::NoGpu(format!("cannot {what} without a GPU ({why})")),
        other => other.into(),
    })
}

/// The CPU backend when asked for, else the first GPU, else the CPU backend (saying why).
fn pick_device(cpu: bool) -> Device {
    if cpu {
        return Device::Cpu;
    }
    match Gpu::new(0) {
        Ok(g) => Device::Gpu(g),
        Err(e) => {
            eprintln!("pagedattn: {e}; using the CPU backend (float64 reference)");
            Device::Cpu
        }
    }
}

fn check_status(device: &mut Device) -> pagedattn::Result<()> {
    match device {
        Device::Gpu(g) => g.check_status(),
        Device::Cpu => Ok(()),
    }
}

fn synchronize(device: &Device) -> pagedattn::Result<()> {
    match device {
        Device::Gpu(g) => g.synchronize(),
        Device::Cpu => Ok(()),
    }
}

fn progress_bar(len: u64) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {wide_msg}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

fn write_json(path: &Path, value: &impl Serialize) -> CliResult {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Io(format!("JSON: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|e| CliError::Io(format!("cannot write {}: {e}", path.display())))
}

/// Binary-prefixed size: "512 B", "9.5 KiB", "1.4 MiB".
fn size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Element types that travel through safetensors files.
const ST_DTYPES: [(ScalarType, Dtype); 7] = [
    (ScalarType::F32, Dtype::F32),
    (ScalarType::F16, Dtype::F16),
    (ScalarType::BF16, Dtype::BF16),
    (ScalarType::I32, Dtype::I32),
    (ScalarType::I64, Dtype::I64),
    (ScalarType::Fp8E4m3, Dtype::F8_E4M3),
    (ScalarType::Fp8E5m2, Dtype::F8_E5M2),
];

/// Writes contiguous host tensors (each at offset 0 of its own storage) with metadata.
fn write_safetensors(path: &Path, tensors: &[(&str, &Tensor)], meta: HashMap<String, String>) -> CliResult {
    let io = |e: String| CliError::Io(format!("cannot write {}: {e}", path.display()));
    // Read guards of the tensors' storages, held until the file is written. Two tensors could share
    // a storage, but no other thread holds these tensors, so no writer can queue between the two
    // read locks (the deadlock the tensor module warns about).
    let mut guards = Vec::new();
    for &(name, t) in tensors {
        let bytes = t.cpu_bytes().filter(|b| t.is_contiguous() && t.offset() == 0 && b.len() == t.numel() * t.dtype().size_bytes());
        guards.push(bytes.ok_or_else(|| io(format!("`{name}` is not a contiguous host tensor")))?);
    }
    let mut views = Vec::new();
    for (&(name, t), bytes) in tensors.iter().zip(&guards) {
        let dtype = ST_DTYPES.iter().find(|(s, _)| *s == t.dtype()).map(|&(_, d)| d).ok_or_else(|| io(format!("`{name}`: no dtype")))?;
        views.push((name, TensorView::new(dtype, t.shape().to_vec(), bytes).map_err(|e| io(e.to_string()))?));
    }
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| io(e.to_string()))
}
