//! `pagedattn`: device and kernel-image info, one-off runs, verification against the float64 CPU
//! reference, and the decode benchmark. The library never prints; this binary owns all output.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use cudarc::driver::sys;
use indicatif::{ProgressBar, ProgressStyle};
use pagedattn::layout::{BLOCK_SIZES, DType, HEAD_SIZES, KernelFamily, status};
use pagedattn::paged_attention::validate;
use pagedattn::testing::{self, Case, Inputs};
use pagedattn::{Device, Error, Gpu, ScalarType, Tensor, Version, bench, dispatch, paged_attention_v1, ptx};
use safetensors::{Dtype, SafeTensorError, SafeTensors, tensor::TensorView};
use serde::Serialize;
use serde_json::json;

const EXIT_CODES: &str = "Exit codes: 0 success, 1 a check failed (verification, spot check, device-side data), \
2 bad usage or input, 3 no GPU (verify, bench), 4 CUDA driver or I/O error.";

#[derive(Parser)]
#[command(name = "pagedattn", version, about = "Paged attention (vLLM's paged_attention_v1) as Rust GPU kernels", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// GPU, embedded kernel images, build report and compiled variants (works without a GPU).
    Info(InfoArgs),
    /// Runs paged_attention_v1 once on random or file inputs (GPU, else the CPU reference).
    Run(RunArgs),
    /// Checks the GPU kernels against the float64 CPU reference on a grid of cases.
    Verify(VerifyArgs),
    /// Decode benchmark: time and effective bandwidth per (dtype, batch, context).
    Bench(BenchArgs),
}

#[derive(Args)]
struct InfoArgs {
    /// Print JSON (with every compiled variant) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f16", value_parser = parse_dtype)]
    dtype: DType,
    #[arg(long, default_value_t = 128)]
    head_size: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 32)]
    num_heads: usize,
    #[arg(long, default_value_t = 8)]
    num_kv_heads: usize,
    /// Tokens of each sequence (one sequence per entry).
    #[arg(long, value_delimiter = ',', default_value = "1,17,100,1000")]
    seq_lens: Vec<usize>,
    /// Add ALiBi slopes.
    #[arg(long)]
    alibi: bool,
    /// Read inputs from a safetensors file (query, key_cache, value_cache, block_tables, seq_lens,
    /// optional alibi_slopes; metadata "scale", default 1/sqrt(head_size)).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["seed", "dtype", "head_size", "block_size", "num_heads", "num_kv_heads", "seq_lens", "alibi"])]
    input: Option<PathBuf>,
    /// Output file: `out`, plus the inputs when they are random (so the file works as --input).
    #[arg(short, long, value_name = "FILE", default_value = "out.safetensors")]
    output: PathBuf,
    /// Use the CPU reference even when a GPU is present.
    #[arg(long)]
    cpu: bool,
}

#[derive(Args)]
struct VerifyArgs {
    /// Add the long cases (8k-32k tokens).
    #[arg(long)]
    long: bool,
    /// Write every result as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Only cases whose description contains SUBSTR (e.g. "bf16 h128", "guard").
    #[arg(long, value_name = "SUBSTR")]
    filter: Option<String>,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, value_delimiter = ',', default_value = "f16,bf16", value_parser = parse_dtype)]
    dtype: Vec<DType>,
    /// Sequences per batch.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    batch: Vec<usize>,
    /// Tokens per sequence.
    #[arg(long, value_delimiter = ',', default_value = "512,4096,16384")]
    context: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    num_heads: usize,
    #[arg(long, default_value_t = 8)]
    num_kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_size: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Kernels to time at each point: v1, v2 (512-token partitions) and/or auto (the library's choice).
    #[arg(long, value_delimiter = ',', default_value = "v1,v2,auto")]
    version: Vec<pagedattn::Version>,
    /// Timed runs per point (cold and hot each).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    #[arg(long, default_value_t = 10)]
    warmup: u32,
    /// Seed of the cache fill and block shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip points whose K+V cache exceeds this many GiB.
    #[arg(long, default_value_t = 40.0)]
    max_kv_gib: f64,
    /// Write all figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
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
        Cmd::Info(a) => info(a),
        Cmd::Run(a) => run(a),
        Cmd::Verify(a) => verify(a),
        Cmd::Bench(a) => bench_cmd(a),
    }
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| format!("unknown dtype `{s}` (f32, f16 or bf16)"))
}

/// Rejects shapes the kernels have no variant for before any work (and before `Case` divides by them).
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

/// The first GPU, or exit 3 saying why `what` needs one.
fn open_gpu(what: &str) -> CliResult<Gpu> {
    Gpu::new(0).map_err(|e| match e {
        Error::NoGpu(why) => CliError::NoGpu(format!("cannot {what} without a GPU ({why})")),
        other => other.into(),
    })
}

fn check_status(device: &mut Device) -> pagedattn::Result<()> {
    match device {
        Device::Gpu(g) => g.check_status(),
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

// ---------------------------------------------------------------------------------------------- info

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

fn info(a: InfoArgs) -> CliResult {
    let gpu = Gpu::new(0);
    let gpu_info = gpu.as_ref().ok().map(gpu_info).transpose()?;
    // Without a GPU, show what common devices would load.
    let ccs = match &gpu {
        Ok(g) => vec![g.arch],
        Err(_) => vec![(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)],
    };
    let load: Vec<LoadChoice> = KernelFamily::ALL.iter().flat_map(|&f| ccs.iter().map(move |&cc| load_choice(f, cc))).collect();
    let variants = dispatch::paged_attention_variants();
    if a.json {
        let images: Vec<_> = ptx::images().iter().map(|i| {
            json!({"family": i.family, "arch": i.arch, "ptx_deflate_bytes": i.ptx_deflate.len(), "cubin_deflate_bytes": i.cubin_deflate.map(<[u8]>::len)})
        }).collect();
        let variants: Vec<_> = variants
            .iter()
            .map(|v| json!({"dtype": v.dtype.name(), "head_size": v.head_size, "block_size": v.block_size, "symbol": v.symbol}))
            .collect();
        let v = json!({
            "gpu": gpu_info,
            "gpu_error": gpu.as_ref().err().map(ToString::to_string),
            "kernel_load": load,
            "images": images,
            "build_report": ptx::BUILD_REPORT,
            "paged_attention_variants": variants,
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
    fn list<T: Ord + ToString>(it: impl Iterator<Item = T>) -> String {
        it.collect::<BTreeSet<T>>().iter().map(T::to_string).collect::<Vec<_>>().join(", ")
    }
    println!(
        "\npaged_attention_v1 variants: {} = dtypes {{{}}} x head sizes {{{}}} x block sizes {{{}}}",
        variants.len(),
        list(variants.iter().map(|v| v.dtype)),
        list(variants.iter().map(|v| v.head_size)),
        list(variants.iter().map(|v| v.block_size)),
    );
    if let Some(v) = variants.first() {
        println!("  symbols like {} (`pagedattn info --json` lists all)", v.symbol);
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------- run

/// Element types that travel through safetensors files.
const ST_DTYPES: [(ScalarType, Dtype); 5] = [
    (ScalarType::F32, Dtype::F32),
    (ScalarType::F16, Dtype::F16),
    (ScalarType::BF16, Dtype::BF16),
    (ScalarType::I32, Dtype::I32),
    (ScalarType::I64, Dtype::I64),
];

fn load_inputs(path: &Path) -> CliResult<Inputs> {
    let bad = |what: String| CliError::Input(format!("{}: {what}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let get = |name: &str| -> CliResult<Option<Tensor>> {
        let view = match st.tensor(name) {
            Ok(v) => v,
            Err(SafeTensorError::TensorNotFound(_)) => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        let dtype = ST_DTYPES.iter().find(|(_, d)| *d == view.dtype()).map(|(t, _)| *t);
        let dtype = dtype.ok_or_else(|| bad(format!("tensor `{name}` has unsupported dtype {:?}", view.dtype())))?;
        Ok(Some(Tensor::from_bytes(dtype, view.shape(), view.data().to_vec())?))
    };
    let need = |name: &str| get(name)?.ok_or_else(|| bad(format!("missing tensor `{name}`")));
    let query = need("query")?;
    let head_size = query.shape().get(2).copied().unwrap_or(1).max(1);
    let scale = match meta.metadata().as_ref().and_then(|m| m.get("scale")) {
        Some(s) => s.trim().parse::<f32>().map_err(|_| bad(format!("metadata scale = {s:?} is not a number")))?,
        None => 1.0 / (head_size as f32).sqrt(),
    };
    Ok(Inputs {
        query,
        key_cache: need("key_cache")?,
        value_cache: need("value_cache")?,
        block_tables: need("block_tables")?,
        seq_lens: need("seq_lens")?,
        alibi_slopes: get("alibi_slopes")?,
        scale,
    })
}

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

fn run(a: RunArgs) -> CliResult {
    let (host, case) = match &a.input {
        Some(path) => (load_inputs(path)?, None),
        None => {
            check_shape(a.head_size, a.block_size, a.num_heads, a.num_kv_heads)?;
            let case = Case {
                dtype: a.dtype,
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
                head_size: a.head_size,
                block_size: a.block_size,
                seq_lens: a.seq_lens.clone(),
                alibi: a.alibi,
                seed: a.seed,
            };
            (case.inputs()?, Some(case))
        }
    };
    let mut device = if a.cpu {
        Device::Cpu
    } else {
        // Device::auto(), but saying why there is no GPU.
        match Gpu::new(0) {
            Ok(g) => Device::Gpu(g),
            Err(e) => {
                eprintln!("pagedattn: {e}; using the CPU backend (float64 reference)");
                Device::Cpu
            }
        }
    };
    // Tables stay on the host so the library validates them before launching.
    let up = |t: &Tensor| device.upload(t);
    let (q, k, v) = (up(&host.query)?, up(&host.key_cache)?, up(&host.value_cache)?);
    let alibi = host.alibi_slopes.as_ref().map(up).transpose()?;
    let args = pagedattn::PagedAttentionArgs {
        query: &q,
        key_cache: &k,
        value_cache: &v,
        block_tables: &host.block_tables,
        seq_lens: &host.seq_lens,
        scale: host.scale,
        alibi_slopes: alibi.as_ref(),
    };
    let mut out = device.nan(host.query.dtype(), host.query.shape())?;
    if let Device::Gpu(g) = &device {
        g.module(KernelFamily::PagedAttention)?; // load (maybe JIT) outside the timed region
    }
    let t0 = Instant::now();
    paged_attention_v1(&device, &mut out, &args)?;
    if let Device::Gpu(g) = &device {
        g.synchronize()?;
    }
    let elapsed = t0.elapsed();
    let out = out.to_cpu()?;
    let status = check_status(&mut device);

    let mut meta = HashMap::from([("scale".to_string(), host.scale.to_string()), ("device".to_string(), device.name())]);
    let mut tensors = vec![("out", &out)];
    if let Some(c) = &case {
        meta.insert("case".into(), c.to_string());
        tensors.extend([
            ("query", &host.query),
            ("key_cache", &host.key_cache),
            ("value_cache", &host.value_cache),
            ("block_tables", &host.block_tables),
            ("seq_lens", &host.seq_lens),
        ]);
        if let Some(al) = &host.alibi_slopes {
            tensors.push(("alibi_slopes", al));
        }
    }
    write_safetensors(&a.output, &tensors, meta)?;

    let vals = out.to_f64_vec();
    let sum: f64 = vals.iter().sum();
    let abs: f64 = vals.iter().map(|v| v.abs()).sum();
    let first: Vec<String> = vals.iter().take(4).map(|v| format!("{v:.4}")).collect();
    let lens = host.seq_lens.to_i32_vec();
    println!(
        "{} | {} query {:?}, key_cache {:?}, {} seqs (max len {}) | {:.3} ms | sum {sum:.6e}, sum|x| {abs:.6e}, out[0,0,:4] = [{}] | wrote {}",
        device.name(),
        host.query.dtype(),
        host.query.shape(),
        host.key_cache.shape(),
        lens.len(),
        lens.iter().max().unwrap_or(&0),
        elapsed.as_secs_f64() * 1e3,
        first.join(", "),
        a.output.display(),
    );
    Ok(status?)
}

// -------------------------------------------------------------------------------------------- verify

#[derive(Serialize)]
struct CaseResult {
    name: String,
    /// The dtype, or "guard" / "status".
    group: String,
    rel_l2: f64,
    max_abs: f64,
    non_finite: usize,
    tolerance: f64,
    pass: bool,
    note: Option<String>,
}

impl CaseResult {
    fn line(&self) -> String {
        let verdict = if self.pass { "PASS" } else { "FAIL" };
        let note = self.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default();
        format!("{:<64} rel-L2 {:>8.2e}  max-abs {:>8.2e}  {verdict}{note}", self.name, self.rel_l2, self.max_abs)
    }
}

/// Device-side guard cases: device-resident tables the host cannot validate, bad for sequence 1.
#[derive(Clone, Copy)]
enum Guard {
    BadBlockId,
    SeqLenTooLong,
    SeqLenNegative,
}

impl Guard {
    const ALL: [Guard; 3] = [Guard::BadBlockId, Guard::SeqLenTooLong, Guard::SeqLenNegative];

    fn name(self) -> &'static str {
        match self {
            Guard::BadBlockId => "guard: device block table, out-of-range block id in seq 1",
            Guard::SeqLenTooLong => "guard: device seq_lens, seq 1 longer than its table",
            Guard::SeqLenNegative => "guard: device seq_lens, seq 1 negative",
        }
    }

    fn flag(self) -> u32 {
        match self {
            Guard::BadBlockId => status::BAD_BLOCK_ID,
            Guard::SeqLenTooLong | Guard::SeqLenNegative => status::BAD_SEQ_LEN,
        }
    }
}

/// Sequence 1's output must be all NaN, the others must match the reference, and the status word
/// must hold exactly the guard's flag.
fn run_guard(device: &mut Device, guard: Guard) -> pagedattn::Result<CaseResult> {
    let case = Case {
        dtype: DType::F16,
        num_heads: 8,
        num_kv_heads: 2,
        head_size: 128,
        block_size: 16,
        seq_lens: vec![40, 100, 33],
        alibi: false,
        seed: 4242,
    };
    let host = case.inputs()?;
    let bad_seq = 1;
    let (max_blocks, num_blocks) = (host.block_tables.shape()[1], host.key_cache.shape()[0]);
    let mut table = host.block_tables.to_i32_vec();
    let mut lens = host.seq_lens.to_i32_vec();
    match guard {
        Guard::BadBlockId => table[bad_seq * max_blocks + 2] = num_blocks as i32 + 7,
        Guard::SeqLenTooLong => lens[bad_seq] = (max_blocks * case.block_size + 1) as i32,
        Guard::SeqLenNegative => lens[bad_seq] = -5,
    }
    let mut dev = host.upload(device)?;
    dev.block_tables = device.upload(&Tensor::from_i32(host.block_tables.shape(), &table)?)?;
    dev.seq_lens = device.upload(&Tensor::from_i32(&[lens.len()], &lens)?)?;
    let mut out = device.nan(host.query.dtype(), host.query.shape())?;
    paged_attention_v1(device, &mut out, &dev.args())?;
    let got = out.to_cpu()?.to_f64_vec();
    let plan = validate(&Device::Cpu, &Tensor::nan(host.query.dtype(), host.query.shape()), &host.args())?;
    let want = pagedattn::cpu::paged_attention::reference(&plan, &host.args());

    let row = case.num_heads * case.head_size;
    let mut problems = Vec::new();
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for s in 0..case.seq_lens.len() {
        let r = s * row..(s + 1) * row;
        if s == bad_seq {
            let not_nan = got[r].iter().filter(|v| !v.is_nan()).count();
            if not_nan > 0 {
                problems.push(format!("seq {s}: {not_nan} of {row} outputs are not NaN"));
            }
        } else {
            g.extend_from_slice(&got[r.clone()]);
            w.extend_from_slice(&want[r]);
        }
    }
    let err = testing::compare(&g, &w);
    let tol = testing::tolerance(case.dtype);
    if !err.passes(tol) {
        problems.push("the other sequences differ from the reference".into());
    }
    match check_status(device) {
        Err(Error::DeviceData { flags }) if flags == guard.flag() => {}
        Err(Error::DeviceData { flags }) => problems.push(format!("status flags {flags:#x}, expected {:#x}", guard.flag())),
        Ok(()) => problems.push(format!("check_status reported nothing, expected flags {:#x}", guard.flag())),
        Err(e) => return Err(e),
    }
    Ok(CaseResult {
        name: guard.name().into(),
        group: "guard".into(),
        rel_l2: err.rel_l2,
        max_abs: err.max_abs,
        non_finite: err.non_finite,
        tolerance: tol,
        pass: problems.is_empty(),
        note: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

fn failed(name: String, group: String, tolerance: f64, note: String) -> CaseResult {
    CaseResult { name, group, rel_l2: f64::NAN, max_abs: f64::NAN, non_finite: 0, tolerance, pass: false, note: Some(note) }
}

fn verify(a: VerifyArgs) -> CliResult {
    let mut device = Device::Gpu(open_gpu("verify")?);
    let keep = |name: &str| a.filter.as_deref().is_none_or(|f| name.contains(f));
    // The grid with v1 and with v2 (vLLM's 512-token partitions); `--filter v2` keeps one version.
    let cases: Vec<(Case, Version)> = [Version::V1, Version::V2]
        .into_iter()
        .flat_map(|v| testing::grid(a.long).into_iter().map(move |c| (c, v)))
        .filter(|(c, v)| keep(&format!("{v} {c}")))
        .collect();
    let guards: Vec<Guard> = Guard::ALL.into_iter().filter(|g| keep(g.name())).collect();
    let total = cases.len() + guards.len();
    if total == 0 {
        return Err(CliError::Input(format!("no case matches --filter {:?}", a.filter.unwrap_or_default())));
    }
    println!("verifying {total} cases on {}", device.name());
    let pb = progress_bar(total as u64);
    let mut results = Vec::with_capacity(total + 1);
    let mut record = |r: CaseResult, pb: &ProgressBar| {
        pb.suspend(|| println!("{}", r.line()));
        pb.inc(1);
        results.push(r);
    };
    for (case, version) in &cases {
        let name = format!("{version} {case}");
        pb.set_message(name.clone());
        let tol = testing::tolerance(case.dtype);
        let group = format!("{version} {}", case.dtype);
        let r = match testing::check_case(&device, case, *version) {
            Ok(e) => CaseResult {
                name,
                group,
                rel_l2: e.rel_l2,
                max_abs: e.max_abs,
                non_finite: e.non_finite,
                tolerance: tol,
                pass: e.passes(tol),
                note: (e.non_finite > 0).then(|| format!("{} non-finite outputs", e.non_finite)),
            },
            Err(e) => failed(name, group, tol, e.to_string()),
        };
        record(r, &pb);
    }
    // Valid data must raise no flag (the grid's tables are device-resident, so the kernel guards them).
    let status_after_grid = check_status(&mut device).err().map(|e| e.to_string());
    let status = status_after_grid.clone().map(|e| failed("status after the grid".into(), "status".into(), 0.0, e));
    for &g in &guards {
        pb.set_message(g.name());
        let r = run_guard(&mut device, g).unwrap_or_else(|e| failed(g.name().into(), "guard".into(), 0.0, e.to_string()));
        record(r, &pb);
    }
    pb.finish_and_clear();
    if let Some(s) = status {
        println!("{}", s.line());
        results.push(s);
    }

    println!("\nsummary ({}):", device.name());
    let mut groups: Vec<String> = Vec::new();
    for r in &results {
        if !groups.contains(&r.group) {
            groups.push(r.group.clone());
        }
    }
    let mut summary = Vec::new();
    for group in &groups {
        let rs: Vec<&CaseResult> = results.iter().filter(|r| &r.group == group).collect();
        let passed = rs.iter().filter(|r| r.pass).count();
        let max_rel = rs.iter().map(|r| r.rel_l2).filter(|v| !v.is_nan()).fold(0.0, f64::max);
        let max_abs = rs.iter().map(|r| r.max_abs).filter(|v| !v.is_nan()).fold(0.0, f64::max);
        println!("  {group:<7} {passed:>3}/{:<3} passed   max rel-L2 {max_rel:.2e}   max abs {max_abs:.2e}", rs.len());
        summary.push(json!({"group": group, "cases": rs.len(), "passed": passed, "max_rel_l2": max_rel, "max_abs": max_abs}));
    }
    let failures = results.iter().filter(|r| !r.pass).count();
    if let Some(path) = &a.json {
        write_json(
            path,
            &json!({
                "device": device.name(),
                "long": a.long,
                "filter": a.filter,
                "status_after_grid": status_after_grid.as_deref().unwrap_or("clean"),
                "results": results,
                "summary": summary,
            }),
        )?;
    }
    if failures > 0 {
        return Err(CliError::Failed(format!("{failures} of {} cases FAILED", results.len())));
    }
    println!("all {} cases passed", results.len());
    Ok(())
}

// --------------------------------------------------------------------------------------------- bench

fn bench_cmd(a: BenchArgs) -> CliResult {
    check_shape(a.head_size, a.block_size, a.num_heads, a.num_kv_heads)?;
    if a.batch.contains(&0) || a.context.contains(&0) {
        return Err(CliError::Input("--batch and --context values must be positive".into()));
    }
    if a.max_kv_gib.is_nan() || a.max_kv_gib <= 0.0 {
        return Err(CliError::Input(format!("--max-kv-gib {} must be positive", a.max_kv_gib)));
    }
    let mut device = Device::Gpu(open_gpu("benchmark")?);
    let cfg = bench::Config {
        dtypes: a.dtype.clone(),
        batches: a.batch.clone(),
        contexts: a.context.clone(),
        num_heads: a.num_heads,
        num_kv_heads: a.num_kv_heads,
        head_size: a.head_size,
        block_size: a.block_size,
        versions: a.version.clone(),
        iters: a.iters as usize,
        warmup: a.warmup as usize,
        max_kv_bytes: (a.max_kv_gib * (1u64 << 30) as f64) as u64,
        seed: a.seed,
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
                    "ceilings: copy {:.0} GB/s ({} read+written, {:.3} ms), stream read {:.0} GB/s ({}, {:.3} ms)\n",
                    c.copy_gbps,
                    gib(c.copy_bytes),
                    c.copy_ms,
                    c.read_gbps,
                    gib(c.read_bytes),
                    c.read_ms
                );
                println!(
                    "{:<5} {:>6} {:>8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7} {:>9}",
                    "dtype", "batch", "context", "kernel", "KV MB", "cold µs", "hot µs", "cold GB/s", "% copy", "% read", "rel-L2"
                );
            });
        }
        bench::Progress::Start { dtype, batch, context, version, .. } => {
            pb.set_message(format!("{dtype} batch {batch} context {context} {version}"))
        }
        bench::Progress::Done { point, .. } => {
            pb.suspend(|| println!("{}", bench_row(point)));
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
        .filter(|p| p.measured.as_ref().is_some_and(|m| !m.correct))
        .map(|p| format!("{} batch {} context {} {}", p.dtype, p.batch, p.context, p.version))
        .collect();
    if !bad.is_empty() {
        return Err(CliError::Failed(format!("spot check above tolerance: {}", bad.join("; "))));
    }
    Ok(())
}

fn bench_row(p: &bench::Point) -> String {
    let kernel = match (&p.measured, p.version) {
        (Some(m), pagedattn::Version::Auto) => format!("auto={}", m.ran),
        _ => p.version.to_string(),
    };
    let head = format!("{:<5} {:>6} {:>8} {:>7} {:>10.1}", p.dtype, p.batch, p.context, kernel, p.kv_bytes as f64 / 1e6);
    match (&p.measured, &p.skipped) {
        (Some(m), _) => format!(
            "{head} {:>10.1} {:>10.1} {:>10.0} {:>6.1}% {:>6.1}% {:>8.1e}{}",
            m.cold_us,
            m.hot_us,
            m.cold_gbps,
            m.pct_copy,
            m.pct_stream_read,
            m.rel_l2,
            if m.correct { "" } else { " !" }
        ),
        (None, Some(why)) => format!("{head}  skipped: {why}"),
        (None, None) => head,
    }
}
