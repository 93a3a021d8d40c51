//! `pagedattn run`: one op once, on random inputs from `--seed` (or, for paged attention, a
//! safetensors file), on the GPU if there is one, else on the CPU backend. Writes the inputs and
//! outputs to a safetensors file and prints a one-line summary. On the GPU a cache op's result is
//! also compared bit for bit with the CPU backend's (exit 1 if they differ).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use pagedattn::layout::{BlockSparse, DEFAULT_PARTITION_SIZE, DType, KernelFamily, KvCacheDType};
use pagedattn::testing::cache::{
    self as cases, BitCheck, CopyBlocksCase, KvCaches, KvLayout, ReshapeCase, SwapCase, SwapDirection, compare_caches,
};
use pagedattn::testing::{Case, Inputs};
use pagedattn::{Device, Error, Fp8Scales, PagedAttentionWorkspace, Tensor, Version, paged_attention, swap_blocks};
use safetensors::{SafeTensorError, SafeTensors};

use crate::{
    CliError, CliResult, Op, ST_DTYPES, check_cache_dtype, check_cache_shape, check_shape, check_status, parse_dtype, parse_kv_cache_dtype,
    pick_device, resolve_layout, size, synchronize, write_safetensors,
};

#[derive(Args)]
pub struct RunArgs {
    /// The op to run.
    #[arg(long, value_enum, default_value_t = Op::PagedAttention)]
    op: Op,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f16", value_parser = parse_dtype)]
    dtype: DType,
    /// paged-attention and reshape ops: KV cache dtype (auto = the query's/key's; fp8_e4m3 or
    /// fp8_e5m2: quantized with the case's k_scale / v_scale).
    #[arg(long, default_value = "auto", value_parser = parse_kv_cache_dtype)]
    kv_cache_dtype: KvCacheDType,
    #[arg(long, default_value_t = 128)]
    head_size: usize,
    /// Tokens per cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Query heads (paged-attention).
    #[arg(long, default_value_t = 32)]
    num_heads: usize,
    #[arg(long, default_value_t = 8)]
    num_kv_heads: usize,
    /// Tokens of each sequence (one sequence per entry): its context (paged-attention) or its new
    /// tokens, written from a random position of its first block on (reshape ops).
    #[arg(long, value_delimiter = ',', default_value = "1,17,100,1000")]
    seq_lens: Vec<usize>,
    /// Add ALiBi slopes (paged-attention, flash-attn-varlen).
    #[arg(long)]
    alibi: bool,
    /// flash-attn-varlen: cached keys before each sequence's new tokens (`--seq-lens`).
    #[arg(long, default_value_t = 0)]
    prefix: usize,
    /// flash-attn-varlen: causal mask (bottom-right aligned).
    #[arg(long)]
    causal: bool,
    /// paged-attention: vLLM's block-sparse pattern as `VERT_STRIDE,BLOCK_SIZE,LOCAL_BLOCKS[,HEAD_SLIDING_STEP[,TP_RANK]]`
    /// (sparse block size in tokens, a multiple of --block-size; step 1 and rank 0 by default).
    #[arg(long, value_name = "PATTERN", value_parser = parse_blocksparse)]
    blocksparse: Option<BlockSparse>,
    /// paged-attention: v1, v2 or auto (the library's choice from the bounds; the summary says
    /// which ran).
    #[arg(long, default_value = "auto")]
    version: Version,
    /// paged-attention: tokens per v2 partition (a positive multiple of 32).
    #[arg(long, default_value_t = DEFAULT_PARTITION_SIZE)]
    partition_size: usize,
    /// Cache layout: vllm (paged attention's; reshape-and-cache, and the default of copy-blocks and
    /// swap-blocks), nhd ([num_blocks, block_size, H, D]; the default of reshape-and-cache-flash),
    /// hnd ([num_blocks, H, block_size, D] as a strided view), combined (one [2, num_blocks, ...]
    /// tensor, key = kv[0]), combined-inner (one [num_blocks, 2, ...] tensor, key = kv[:, 0]).
    #[arg(long)]
    layout: Option<KvLayout>,
    /// reshape ops: padding tokens (slot -1, skipped) mixed in among the others.
    #[arg(long, default_value_t = 2)]
    padding: usize,
    /// copy-blocks: layers (a key and a value cache each).
    #[arg(long, default_value_t = 4)]
    num_layers: usize,
    /// copy-blocks, swap-blocks: blocks to copy.
    #[arg(long, default_value_t = 16)]
    pairs: usize,
    /// swap-blocks: d2h (GPU cache to pinned host memory), h2d (back) or d2d (between GPU caches);
    /// on the CPU backend both ends are host memory.
    #[arg(long, default_value = "d2h")]
    direction: SwapDirection,
    /// paged-attention: read inputs from a safetensors file (query, key_cache, value_cache,
    /// block_tables, seq_lens, optional alibi_slopes; metadata "scale", default 1/sqrt(head_size)).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["seed", "dtype", "head_size", "block_size", "num_heads", "num_kv_heads", "seq_lens", "alibi"])]
    input: Option<PathBuf>,
    /// Output file: the outputs, plus the inputs when they are random (for paged attention, so the
    /// file works as --input).
    #[arg(short, long, value_name = "FILE", default_value = "out.safetensors")]
    output: PathBuf,
    /// Use the CPU backend even when a GPU is present.
    #[arg(long)]
    cpu: bool,
}

pub fn run(a: RunArgs) -> CliResult {
    if a.input.is_some() && a.op != Op::PagedAttention {
        return Err(CliError::Input(format!("--input is for --op paged-attention, not {}", a.op.name())));
    }
    let layout = resolve_layout(a.op, a.layout)?;
    match a.op {
        Op::PagedAttention => run_attention(&a),
        Op::ReshapeAndCache | Op::ReshapeAndCacheFlash => run_reshape(&a, layout),
        Op::CopyBlocks => run_copy_blocks(&a, layout),
        Op::SwapBlocks => run_swap_blocks(&a, layout),
        Op::FlashAttnVarlen => run_varlen(&a),
    }
}

/// Loads the module of `family` (maybe JIT-compiling it) outside the timed region.
fn load(device: &Device, family: KernelFamily) -> CliResult {
    if let Device::Gpu(g) = device {
        g.module(family)?;
    }
    Ok(())
}

fn milliseconds(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// On the GPU, compares `got` with the CPU backend's result (computed by `reference`).
fn check_against_cpu(device: &Device, reference: impl FnOnce() -> pagedattn::Result<BitCheck>) -> CliResult<Option<BitCheck>> {
    match device {
        Device::Gpu(_) => Ok(Some(reference()?)),
        Device::Cpu => Ok(None),
    }
}

fn check_text(check: &Option<BitCheck>) -> String {
    match check {
        None => "CPU backend (the reference)".into(),
        Some(c) if c.passes() => format!("bit-exact vs the CPU backend ({} elements)", c.elements),
        Some(c) => format!("{} of {} elements DIFFER from the CPU backend", c.mismatches, c.elements),
    }
}

fn check_result(op: Op, check: &Option<BitCheck>) -> CliResult {
    match check {
        Some(c) if !c.passes() => Err(CliError::Failed(format!(
            "{}: {} of {} cache elements differ from the CPU backend (first at storage element {})",
            op.name(),
            c.mismatches,
            c.elements,
            c.first_mismatch.unwrap_or(0)
        ))),
        _ => Ok(()),
    }
}

/// The caches' allocations in host memory, named `{prefix}{name}{suffix}`.
fn named_allocations(caches: &KvCaches, prefix: &str, suffix: &str) -> CliResult<Vec<(String, Tensor)>> {
    let host = caches.to_cpu()?;
    Ok(host.allocations()?.into_iter().map(|(name, t)| (format!("{prefix}{name}{suffix}"), t)).collect())
}

/// `key_cache [..], value_cache [..]` or `kv_cache [..]`: the allocations' shapes.
fn shapes(tensors: &[(String, Tensor)]) -> String {
    tensors.iter().map(|(n, t)| format!("{n} {:?}", t.shape())).collect::<Vec<_>>().join(", ")
}

fn write_file(path: &Path, tensors: &[(String, Tensor)], meta: HashMap<String, String>) -> CliResult {
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_safetensors(path, &refs, meta)
}

/// `VERT_STRIDE,BLOCK_SIZE,LOCAL_BLOCKS[,HEAD_SLIDING_STEP[,TP_RANK]]`.
fn parse_blocksparse(s: &str) -> Result<BlockSparse, String> {
    let v: Vec<&str> = s.split(',').map(str::trim).collect();
    let num = |i: usize, default: i64| -> Result<i64, String> {
        v.get(i).map_or(Ok(default), |x| x.parse::<i64>().map_err(|_| format!("`{x}` in --blocksparse is not an integer")))
    };
    if !(3..=5).contains(&v.len()) {
        return Err("--blocksparse takes VERT_STRIDE,BLOCK_SIZE,LOCAL_BLOCKS[,HEAD_SLIDING_STEP[,TP_RANK]]".into());
    }
    let u = |i: usize, d: i64| -> Result<u32, String> {
        u32::try_from(num(i, d)?).map_err(|_| format!("--blocksparse field {} out of range", i + 1))
    };
    Ok(BlockSparse {
        vert_stride: u(0, 0)?,
        block_size: u(1, 0)?,
        local_blocks: u(2, 0)?,
        head_sliding_step: i32::try_from(num(3, 1)?).map_err(|_| "--blocksparse head sliding step out of range".to_string())?,
        tp_rank: u(4, 0)?,
    })
}

impl RunArgs {
    fn blocksparse(&self) -> Option<BlockSparse> {
        self.blocksparse
    }
}

fn base_meta(a: &RunArgs, device: &Device, case: String) -> HashMap<String, String> {
    HashMap::from([
        ("op".to_string(), a.op.name().to_string()),
        ("device".to_string(), device.name()),
        ("case".to_string(), case),
        ("seed".to_string(), a.seed.to_string()),
    ])
}

// ------------------------------------------------------------------------------ paged attention

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
        kv_scales: match (get("k_scale")?, get("v_scale")?) {
            (Some(k), Some(v)) => Some((k, v)),
            (None, None) => None,
            _ => return Err(bad("give both k_scale and v_scale, or neither".into())),
        },
        blocksparse: None,
    })
}

fn run_attention(a: &RunArgs) -> CliResult {
    let (host, case) = match &a.input {
        Some(path) => (Inputs { blocksparse: a.blocksparse, ..load_inputs(path)? }, None),
        None => {
            check_shape(a.head_size, a.block_size, a.num_heads, a.num_kv_heads)?;
            check_cache_dtype(a.kv_cache_dtype, a.head_size)?;
            let case = Case {
                dtype: a.dtype,
                cache: a.kv_cache_dtype,
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
                head_size: a.head_size,
                block_size: a.block_size,
                seq_lens: a.seq_lens.clone(),
                alibi: a.alibi,
                blocksparse: a.blocksparse(),
                seed: a.seed,
            };
            (case.inputs()?, Some(case))
        }
    };
    let mut device = pick_device(a.cpu);
    // Tables stay on the host so the library validates them before launching.
    let up = |t: &Tensor| device.upload(t);
    let (q, k, v) = (up(&host.query)?, up(&host.key_cache)?, up(&host.value_cache)?);
    let alibi = host.alibi_slopes.as_ref().map(up).transpose()?;
    let scales = host.kv_scales.as_ref().map(|(k, v)| Ok::<_, Error>((up(k)?, up(v)?))).transpose()?;
    let args = pagedattn::PagedAttentionArgs {
        query: &q,
        key_cache: &k,
        value_cache: &v,
        block_tables: &host.block_tables,
        seq_lens: &host.seq_lens,
        scale: host.scale,
        alibi_slopes: alibi.as_ref(),
        k_scale: scales.as_ref().map(|s| &s.0),
        v_scale: scales.as_ref().map(|s| &s.1),
        blocksparse: host.blocksparse,
    };
    let mut out = device.nan(host.query.dtype(), host.query.shape())?;
    // The workspace is bounded by the longest sequence (the library checks host lengths against it).
    let lens = host.seq_lens.to_i32_vec();
    let max_seq_len = lens.iter().copied().max().unwrap_or(0).max(0) as usize;
    let dim = |i: usize| host.query.shape().get(i).copied().unwrap_or(0);
    let mut ws = PagedAttentionWorkspace::with_partition_size(&device, dim(0), dim(1), dim(2), max_seq_len, a.partition_size)?;
    let fp8 = host.key_cache.dtype().fp8().is_some();
    load(&device, if fp8 { KernelFamily::PagedAttentionFp8 } else { KernelFamily::PagedAttention })?;
    let t0 = Instant::now();
    let ran = paged_attention(&device, &mut out, &args, &mut ws, a.version)?;
    synchronize(&device)?;
    let ms = milliseconds(t0);
    let out = out.to_cpu()?;
    let status = check_status(&mut device);

    let mut meta = HashMap::from([
        ("scale".to_string(), host.scale.to_string()),
        ("device".to_string(), device.name()),
        ("op".to_string(), Op::PagedAttention.name().to_string()),
        ("version".to_string(), a.version.to_string()),
        ("version_ran".to_string(), ran.to_string()),
        ("partition_size".to_string(), a.partition_size.to_string()),
    ]);
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
        if let Some((k, v)) = &host.kv_scales {
            tensors.extend([("k_scale", k), ("v_scale", v)]);
        }
    }
    write_safetensors(&a.output, &tensors, meta)?;

    let vals = out.to_f64_vec();
    let sum: f64 = vals.iter().sum();
    let abs: f64 = vals.iter().map(|v| v.abs()).sum();
    let first: Vec<String> = vals.iter().take(4).map(|v| format!("{v:.4}")).collect();
    let version = match (a.version, ran) {
        (Version::Auto, Version::V2) => format!("auto: v2, partitions of {} tokens", a.partition_size),
        (Version::Auto, r) => format!("auto: {r}"),
        (_, Version::V2) => format!("v2, partitions of {} tokens", a.partition_size),
        (_, r) => r.to_string(),
    };
    println!(
        "{} | paged_attention ({version}) {} query {:?}, key_cache {:?}, {} seqs (max len {max_seq_len}) | {:.3} ms | sum {sum:.6e}, sum|x| {abs:.6e}, out[0,0,:4] = [{}] | wrote {}",
        device.name(),
        host.query.dtype(),
        host.query.shape(),
        host.key_cache.shape(),
        lens.len(),
        ms,
        first.join(", "),
        a.output.display(),
    );
    Ok(status?)
}

// ----------------------------------------------------------------------------- varlen attention

/// The op's arguments over `inp`'s tables with the given tensors.
fn varlen_args<'a>(
    inp: &'a pagedattn::testing::VarlenInputs,
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    alibi_slopes: Option<&'a Tensor>,
    causal: bool,
) -> pagedattn::FlashAttnVarlenArgs<'a> {
    pagedattn::FlashAttnVarlenArgs {
        q,
        k,
        v,
        max_seqlen_q: inp.max_seqlen_q,
        cu_seqlens_q: &inp.cu_seqlens_q,
        max_seqlen_k: inp.max_seqlen_k,
        seqused_k: &inp.seqused_k,
        softmax_scale: None,
        causal,
        window_size: (-1, -1),
        softcap: 0.0,
        alibi_slopes,
        block_table: &inp.block_table,
    }
}

/// `flash_attn_varlen_func` on a random batch (`--seq-lens` new tokens on `--prefix` cached ones),
/// on the GPU compared with the float64 CPU reference.
fn run_varlen(a: &RunArgs) -> CliResult {
    if !matches!(a.dtype, DType::F16 | DType::BF16) {
        return Err(CliError::Input(format!("--dtype {}: flash-attn-varlen takes f16 or bf16", a.dtype)));
    }
    if a.num_kv_heads == 0 || !a.num_heads.is_multiple_of(a.num_kv_heads) || a.block_size == 0 {
        return Err(CliError::Input("--num-heads must be a multiple of --num-kv-heads; --block-size positive".into()));
    }
    let seqs: Vec<(usize, usize)> = a.seq_lens.iter().map(|&n| (n, n + a.prefix)).collect();
    let inp = pagedattn::testing::varlen_inputs(a.dtype, (a.num_heads, a.num_kv_heads), a.head_size, a.block_size, &seqs, a.seed)?;
    let alibi = a
        .alibi
        .then(|| Tensor::from_f32(DType::F32, &[a.num_heads], &(0..a.num_heads).map(|h| 0.5f32.powi(h as i32 % 8 + 1)).collect::<Vec<_>>()))
        .transpose()?;
    let args = |q, k, v, al| varlen_args(&inp, q, k, v, al, a.causal);
    let mut device = pick_device(a.cpu);
    let up = |t: &Tensor| device.upload(t);
    let (q, k, v) = (up(&inp.q)?, up(&inp.k)?, up(&inp.v)?);
    let al = alibi.as_ref().map(up).transpose()?;
    let total_q = inp.q.shape()[0];
    let mut out = device.nan(inp.q.dtype(), inp.q.shape())?;
    let mut lse = device.nan(pagedattn::ScalarType::F32, &[a.num_heads, total_q])?;
    load(&device, KernelFamily::FlashAttn)?;
    let t0 = Instant::now();
    pagedattn::flash_attn_varlen_func(&device, &mut out, Some(&mut lse), &args(&q, &k, &v, al.as_ref()))?;
    synchronize(&device)?;
    let ms = milliseconds(t0);
    let status = check_status(&mut device);
    let (out, lse) = (out.to_cpu()?, lse.to_cpu()?);
    let check = if matches!(device, Device::Gpu(_)) {
        let host = args(&inp.q, &inp.k, &inp.v, alibi.as_ref());
        let plan = pagedattn::flash_attn::validate(&Device::Cpu, &Tensor::nan(inp.q.dtype(), inp.q.shape()), None, &host)?;
        let (want, _) = pagedattn::cpu::flash_attn::reference(&plan, &host);
        let e = pagedattn::testing::compare(&out.to_f64_vec(), &want);
        format!("vs float64 reference: rel-L2 {:.2e}, max |err| {:.2e}", e.rel_l2, e.max_abs)
    } else {
        "CPU backend (float64 reference)".to_string()
    };
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("out".into(), out),
        ("softmax_lse".into(), lse),
        ("q".into(), inp.q.to_cpu()?),
        ("k_cache".into(), inp.k.to_cpu()?),
        ("v_cache".into(), inp.v.to_cpu()?),
        ("cu_seqlens_q".into(), inp.cu_seqlens_q.to_cpu()?),
        ("seqused_k".into(), inp.seqused_k.to_cpu()?),
        ("block_table".into(), inp.block_table.to_cpu()?),
    ];
    if let Some(al) = &alibi {
        tensors.push(("alibi_slopes".into(), al.to_cpu()?));
    }
    let mut meta = base_meta(a, &device, format!("{seqs:?} (new, keys) causal {}", a.causal));
    meta.insert("causal".into(), a.causal.to_string());
    write_file(&a.output, &tensors, meta)?;
    println!(
        "{} | flash_attn_varlen_func {} heads {}/{} h{} b{} seqs (new, keys) {seqs:?}{}{} | {ms:.3} ms | {check} | wrote {}",
        device.name(),
        a.dtype,
        a.num_heads,
        a.num_kv_heads,
        a.head_size,
        a.block_size,
        if a.causal { " causal" } else { "" },
        if a.alibi { " alibi" } else { "" },
        a.output.display()
    );
    Ok(status?)
}

// --------------------------------------------------------------------------------- reshape ops

fn run_reshape(a: &RunArgs, layout: KvLayout) -> CliResult {
    check_cache_shape(a.head_size, a.block_size, a.num_kv_heads)?;
    check_cache_dtype(a.kv_cache_dtype, a.head_size)?;
    let mut case = ReshapeCase::new(layout, a.dtype, a.num_kv_heads, a.head_size, a.block_size, a.seq_lens.clone(), a.seed);
    case.padding = a.padding;
    case.cache = a.kv_cache_dtype;
    let inp = case.inputs()?;
    let mut device = pick_device(a.cpu);
    let (key, value) = (device.upload(&inp.key)?, device.upload(&inp.value)?);
    let mut caches = inp.caches.upload(&device)?;
    // Device-resident slots, as in vLLM (the kernel guards them).
    let slots = device.upload(&inp.slot_mapping)?;
    let scales = inp.scales.as_ref().map(|(k, v)| Ok::<_, Error>((device.upload(k)?, device.upload(v)?))).transpose()?;
    let scales = scales.as_ref().map(|(k, v)| Fp8Scales { k_scale: k, v_scale: v });
    load(&device, KernelFamily::Cache)?;
    let t0 = Instant::now();
    cases::reshape(&device, layout.cache_layout(), &key, &value, &mut caches, &slots, scales)?;
    synchronize(&device)?;
    let ms = milliseconds(t0);
    let status = check_status(&mut device);
    let check = check_against_cpu(&device, || compare_caches(&caches, &case.run(&Device::Cpu, &inp)?))?;

    let host = caches.to_cpu()?;
    let (h, d) = (a.num_kv_heads, a.head_size);
    let written = host.key.to_f64_vec().iter().filter(|v| !v.is_nan()).count() / (h * d).max(1);
    let allocations = named_allocations(&host, "", "")?;
    let described = shapes(&allocations);
    let mut tensors = vec![
        ("key".to_string(), inp.key.to_cpu()?),
        ("value".to_string(), inp.value.to_cpu()?),
        ("slot_mapping".to_string(), inp.slot_mapping.to_cpu()?),
    ];
    tensors.extend(allocations);
    if let Some((k, v)) = &inp.scales {
        tensors.extend([("k_scale".to_string(), k.to_cpu()?), ("v_scale".to_string(), v.to_cpu()?)]);
    }
    let mut meta = base_meta(a, &device, case.to_string());
    meta.insert("layout".into(), format!("{layout}: {}", layout.describe()));
    meta.insert("caches_before".into(), "NaN".into());
    write_file(&a.output, &tensors, meta)?;

    println!(
        "{} | {} {layout} {}{}: {} tokens (+{} padding) x {h} KV heads x {d} -> {described} ({} blocks of {}) | {ms:.3} ms | {written} slots written, the rest NaN | {} | wrote {}",
        device.name(),
        a.op.name(),
        a.dtype,
        if case.cache == KvCacheDType::Auto { String::new() } else { format!(" -> {}", case.cache) },
        case.num_tokens() - case.padding,
        case.padding,
        inp.num_blocks,
        a.block_size,
        check_text(&check),
        a.output.display(),
    );
    status?;
    check_result(a.op, &check)
}

// --------------------------------------------------------------------------------- copy_blocks

/// Blocks of a `[num_blocks, ...]` host tensor that differ between `before` and `after`.
fn changed_blocks(before: &Tensor, after: &Tensor) -> usize {
    let (b, a) = (before.to_f64_vec(), after.to_f64_vec());
    let per = b.len() / before.shape().first().copied().unwrap_or(1).max(1);
    b.chunks(per.max(1)).zip(a.chunks(per.max(1))).filter(|(x, y)| x.iter().zip(*y).any(|(p, q)| p.to_bits() != q.to_bits())).count()
}

fn run_copy_blocks(a: &RunArgs, layout: KvLayout) -> CliResult {
    check_cache_shape(a.head_size, a.block_size, a.num_kv_heads)?;
    let case = CopyBlocksCase {
        layout,
        dtype: a.dtype,
        num_kv_heads: a.num_kv_heads,
        head_size: a.head_size,
        block_size: a.block_size,
        num_blocks: 2 * a.pairs + 2,
        num_layers: a.num_layers,
        num_pairs: a.pairs,
        device_mapping: true,
        seed: a.seed,
    };
    let inp = case.inputs()?;
    let mut device = pick_device(a.cpu);
    let mut layers = inp.layers.iter().map(|c| c.upload(&device)).collect::<pagedattn::Result<Vec<_>>>()?;
    let mapping = device.upload(&inp.block_mapping)?;
    load(&device, KernelFamily::Cache)?;
    let t0 = Instant::now();
    cases::run_copy_blocks(&device, &mut layers, &mapping)?;
    synchronize(&device)?;
    let ms = milliseconds(t0);
    let status = check_status(&mut device);
    let check = check_against_cpu(&device, || {
        let want = case.run(&Device::Cpu, &inp)?;
        layers.iter().zip(&want).try_fold(BitCheck::default(), |acc, (g, w)| Ok(acc.merge(compare_caches(g, w)?)))
    })?;

    let mut tensors = vec![("block_mapping".to_string(), inp.block_mapping.to_cpu()?)];
    let mut changed = 0;
    for (l, (before, after)) in inp.layers.iter().zip(&layers).enumerate() {
        let after = after.to_cpu()?;
        changed += changed_blocks(&before.key, &after.key);
        tensors.extend(named_allocations(before, "", &format!(".{l}.before"))?);
        tensors.extend(named_allocations(&after, "", &format!(".{l}"))?);
    }
    let mut meta = base_meta(a, &device, case.to_string());
    meta.insert("layout".into(), format!("{layout}: {}", layout.describe()));
    write_file(&a.output, &tensors, meta)?;

    let shape = case.shape();
    println!(
        "{} | copy_blocks {layout} {}: {} layers x {} pairs of blocks ({} key + {} value each) in caches of {} blocks | {ms:.3} ms | {changed} of {} destination key blocks changed | {} | wrote {}",
        device.name(),
        a.dtype,
        a.num_layers,
        a.pairs,
        size(shape.block_bytes() as u64),
        size(shape.block_bytes() as u64),
        case.num_blocks,
        a.num_layers * a.pairs,
        check_text(&check),
        a.output.display(),
    );
    status?;
    check_result(a.op, &check)
}

// --------------------------------------------------------------------------------- swap_blocks

fn run_swap_blocks(a: &RunArgs, layout: KvLayout) -> CliResult {
    check_cache_shape(a.head_size, a.block_size, a.num_kv_heads)?;
    // The device side holds more blocks than the host's swap space.
    let (many, few) = (2 * a.pairs + 2, a.pairs + 2);
    let (src_blocks, dst_blocks) = if a.direction == SwapDirection::HostToDevice { (few, many) } else { (many, few) };
    let case = SwapCase {
        direction: a.direction,
        layout,
        dtype: a.dtype,
        num_kv_heads: a.num_kv_heads,
        head_size: a.head_size,
        block_size: a.block_size,
        src_blocks,
        dst_blocks,
        num_pairs: a.pairs,
        seed: a.seed,
    };
    let inp = case.inputs()?;
    let device = pick_device(a.cpu);
    let (src_host, dst_host) = a.direction.host_ends();
    let src = inp.src.map(|t| cases::swap_end(&device, t, src_host))?;
    let mut dst = inp.dst.map(|t| cases::swap_end(&device, t, dst_host))?;
    let t0 = Instant::now();
    swap_blocks(&device, &src.key, &mut dst.key, &inp.block_mapping)?;
    swap_blocks(&device, &src.value, &mut dst.value, &inp.block_mapping)?;
    // Before reading `dst` or dropping `src`: the copies are not tracked.
    synchronize(&device)?;
    let ms = milliseconds(t0);
    let check = check_against_cpu(&device, || compare_caches(&dst, &case.run(&Device::Cpu, &inp)?))?;

    let mut tensors = vec![("block_mapping".to_string(), inp.block_mapping.to_cpu()?)];
    tensors.extend(named_allocations(&inp.src, "src.", "")?);
    tensors.extend(named_allocations(&inp.dst, "dst.", ".before")?);
    tensors.extend(named_allocations(&dst, "dst.", "")?);
    let mut meta = base_meta(a, &device, case.to_string());
    meta.insert("layout".into(), format!("{layout}: {}", layout.describe()));
    meta.insert("direction".into(), a.direction.to_string());
    write_file(&a.output, &tensors, meta)?;

    let bytes = 2 * a.pairs * case_block_bytes(&case);
    let rate = match device {
        Device::Gpu(_) => format!(" ({:.2} GB/s, host clock)", bytes as f64 / (ms * 1e-3) / 1e9),
        Device::Cpu => String::new(),
    };
    println!(
        "{} | swap_blocks {} {layout} {}: {} blocks ({} key + {} value each) from a {} cache of {} blocks to a {} cache of {} | {ms:.3} ms{rate} | {} | wrote {}",
        device.name(),
        a.direction,
        a.dtype,
        a.pairs,
        size(case_block_bytes(&case) as u64),
        size(case_block_bytes(&case) as u64),
        src.key.storage().location(),
        src_blocks,
        dst.key.storage().location(),
        dst_blocks,
        check_text(&check),
        a.output.display(),
    );
    check_result(a.op, &check)
}

fn case_block_bytes(c: &SwapCase) -> usize {
    c.block_size * c.num_kv_heads * c.head_size * c.dtype.size_bytes()
}
