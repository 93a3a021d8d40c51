//! vLLM's decode attention over a paged KV cache: `paged_attention_v1`, `paged_attention_v2` and
//! [`paged_attention`], which picks one of them from caller-fixed bounds.
//!
//! Kernel: `kernels-gpu/src/paged_attention.rs` (v1 and v2 share it; v2 adds a reduce); CPU
//! reference: `cpu/paged_attention.rs`; tests: `tests/paged_attention.rs`. Layouts:
//! `pagedattn_layout::paged_attention`.

use cudarc::driver::LaunchConfig;
use pagedattn_layout::paged_attention::reduce_smem_bytes;
use pagedattn_layout::{
    BLOCK_SIZES, BlockSparse, DEFAULT_PARTITION_SIZE, DType, FP8_HEAD_SIZES, HEAD_SIZES, KvCacheDType, PagedAttentionGeometry,
    PagedAttentionParams, PagedAttentionReduceParams, REDUCE_THREADS,
};

use crate::device::{Device, Gpu, check_placement};
use crate::error::{Error, Result};
use crate::tensor::{ScalarType, Tensor};
use crate::{cpu, dispatch, launch};

const OP: &str = "paged_attention";

/// Inputs of the paged-attention ops (vLLM's names).
pub struct PagedAttentionArgs<'a> {
    /// `[num_seqs, num_heads, head_size]`, dims contiguous.
    pub query: &'a Tensor,
    /// `[num_blocks, num_kv_heads, head_size / x, block_size, x]`, `x = 16 / element size`; the three
    /// inner axes contiguous. The query's dtype (vLLM's `kv_cache_dtype` `auto`), or fp8 codes
    /// ([`ScalarType::Fp8E4m3`], [`ScalarType::Fp8E5m2`]: `x = 16`), dequantized with `k_scale`.
    pub key_cache: &'a Tensor,
    /// `[num_blocks, num_kv_heads, head_size, block_size]`, the two inner axes contiguous; block and
    /// head strides equal to the key cache's.
    pub value_cache: &'a Tensor,
    /// `[num_seqs, max_num_blocks_per_seq]` i32, rows contiguous. A host tensor is checked (every block
    /// a sequence uses is in `0..num_blocks`) and copied to the device; a device tensor is guarded by
    /// the kernel (see [`crate::Error::DeviceData`]).
    pub block_tables: &'a Tensor,
    /// `[num_seqs]` i32, contiguous, each in `0..=max_num_blocks_per_seq * block_size` (host tensors checked).
    pub seq_lens: &'a Tensor,
    /// Softmax scale (usually `1 / sqrt(head_size)`); finite.
    pub scale: f32,
    /// `[num_heads]` f32 ALiBi slopes (contiguous): score += slope · (token position − seq_len + 1).
    pub alibi_slopes: Option<&'a Tensor>,
    /// fp8 caches: `[1]` f32 on the op's device, the per-tensor scales (key = code's value ·
    /// `k_scale`, value = code's value · `v_scale`), finite and positive. The kernels read them at
    /// each launch, so a captured graph follows updates; a bad device value gives NaN outputs and
    /// [`crate::layout::status::BAD_SCALE`]. Required with fp8 caches, ignored otherwise (as vLLM).
    pub k_scale: Option<&'a Tensor>,
    /// fp8 caches: the value cache's `[1]` f32 scale, as `k_scale` for the keys.
    pub v_scale: Option<&'a Tensor>,
    /// vLLM's block-sparse pattern ([`BlockSparse`]; `None` or `vert_stride <= 1` is dense). When
    /// sparse, its block size is a positive multiple of the cache block size and `local_blocks >= 1`
    /// (every query then attends at least its own sparse block).
    pub blocksparse: Option<BlockSparse>,
}

/// Sizes derived from the arguments once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The query's (and output's) dtype.
    pub dtype: DType,
    /// The caches' element type.
    pub cache: KvCacheDType,
    /// Sequences: axis 0 of the query.
    pub num_seqs: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads of the caches (`num_heads` is a multiple).
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Blocks in each cache (axis 0).
    pub num_blocks: usize,
    /// Block-table entries per sequence (axis 1 of `block_tables`).
    pub max_num_blocks_per_seq: usize,
}

/// `out[s, h, :] = softmax(scale · q[s, h] · K_s^T (+ ALiBi)) · V_s` for every sequence `s` and query
/// head `h`, where `K_s`/`V_s` are the first `seq_lens[s]` tokens of the sequence's cache blocks (of
/// KV head `h / (num_heads / num_kv_heads)`). A zero-length sequence gives zeros.
///
/// v1: one CTA per (sequence, group of heads) walks the whole sequence. Best when there are many
/// sequences; see [`paged_attention`] for the automatic choice.
///
/// `out` is `[num_seqs, num_heads, head_size]` of the query's dtype (any sequence/head strides).
/// On the GPU the launch is asynchronous on the device's stream; device-side problems surface
/// through [`Gpu::check_status`].
pub fn paged_attention_v1(device: &Device, out: &mut Tensor, args: &PagedAttentionArgs) -> Result<()> {
    run(device, out, args, None, Version::V1).map(drop)
}

/// The same result as [`paged_attention_v1`], with each sequence split into partitions of
/// `workspace.partition_size()` tokens (vLLM: 512) that separate CTAs process in parallel, then a
/// reduce kernel that combines their partial results. Best for few, long sequences.
///
/// The workspace bounds the call: `num_seqs * num_heads` and `head_size` within its sizes, and every
/// sequence length at most its `max_seq_len` (host lengths are checked; a longer device length
/// gives NaN and [`crate::layout::status::BAD_SEQ_LEN`]). The launch geometry depends only on the
/// workspace and the shapes, so a captured CUDA graph stays valid as lengths grow up to the bound.
pub fn paged_attention_v2(
    device: &Device,
    out: &mut Tensor,
    args: &PagedAttentionArgs,
    workspace: &mut PagedAttentionWorkspace,
) -> Result<()> {
    run(device, out, args, Some(workspace), Version::V2).map(drop)
}

/// Validates, resolves [`Version::Auto`], then runs v1 or v2 on the device. A workspace (required
/// for v2) also bounds the lengths for v1.
fn run(
    device: &Device,
    out: &mut Tensor,
    args: &PagedAttentionArgs,
    mut ws: Option<&mut PagedAttentionWorkspace>,
    version: Version,
) -> Result<Version> {
    let plan = validate(device, out, args)?;
    if let Some(w) = &ws {
        w.check(device, &plan, args)?;
    }
    let cap = plan.max_num_blocks_per_seq * plan.block_size;
    let max_seq_len = ws.as_ref().map_or(cap, |w| w.max_seq_len.min(cap));
    let sms = match device {
        Device::Gpu(g) => g.sm_count,
        Device::Cpu => NOMINAL_SMS,
    };
    let geo = plan.geometry();
    let v1_ctas = plan.num_seqs * geo.head_groups(plan.num_heads, plan.num_kv_heads);
    let (version, partition_size) = match (version, &ws) {
        (Version::Auto, Some(w)) => {
            let fits = |p: usize| w.fits(plan.num_seqs, plan.num_heads, max_seq_len.div_ceil(p));
            choose_plan(max_seq_len, v1_ctas, sms, w.partition_size, fits)
        }
        (Version::Auto, None) => (Version::V1, 0),
        (Version::V2, Some(w)) => (Version::V2, w.partition_size),
        (v, _) => (v, 0),
    };
    if let Some(w) = ws.as_mut() {
        w.last_plan = (version, partition_size);
    }
    if plan.num_seqs == 0 || plan.num_heads == 0 {
        return Ok(version);
    }
    match device {
        Device::Cpu => cpu::paged_attention::run(&plan, out, args)?,
        Device::Gpu(gpu) => {
            let split = if version == Version::V2 { ws.map(|w| (w, partition_size)) } else { None };
            launch_gpu(gpu, &plan, out, args, max_seq_len, split)?
        }
    }
    Ok(version)
}

/// Which kernel [`paged_attention`] runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Version {
    /// [`choose_version`] from the workspace's `max_seq_len` bound, `num_seqs` and `num_heads`.
    #[default]
    Auto,
    /// [`paged_attention_v1`]: one CTA per (sequence, head group) walks the whole sequence.
    V1,
    /// [`paged_attention_v2`]: sequences split into partitions, then their partials merged.
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::Auto => "auto",
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

impl std::str::FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Version::Auto),
            "v1" => Ok(Version::V1),
            "v2" => Ok(Version::V2),
            _ => Err(format!("unknown version {s:?} (auto, v1 or v2)")),
        }
    }
}

/// SMs assumed by the automatic choice on the CPU backend (an H100's), so that the version it
/// reports does not depend on the machine.
const NOMINAL_SMS: usize = 132;

/// The automatic choice between v1 and v2, from bounds the caller fixes (never from device data,
/// so it is stable under graph capture): `max_seq_len` (the workspace's bound), `v1_ctas` (CTAs of
/// a v1 launch: sequences × head groups, see [`PagedAttentionGeometry::head_groups`]) and the GPU's
/// SM count.
///
/// v1 when a sequence fits one partition (v2 would do the same work plus a merge), or when v1's
/// CTAs cover the GPU (`v1_ctas >= 0.9 × SMs`); v2 otherwise (see [`choose_plan`], which also picks
/// v2's partition size). vLLM's rule (v1 iff `max_seq_len <= 8192` and `num_seqs × num_heads >
/// 512`) picks v2 for 16 × 4k tokens, where v1 takes 119 µs and v2 139 on the H100. Figures:
/// RESULTS.md (issue 7).
pub fn choose_version(max_seq_len: usize, v1_ctas: usize, sm_count: usize) -> Version {
    choose_plan(max_seq_len, v1_ctas, sm_count, DEFAULT_PARTITION_SIZE, |_| true).0
}

/// The automatic choice with v2's partition size: v1 when its CTAs cover the GPU (`v1_ctas ≥ 0.9 ×
/// SMs`); else v2 with the largest partition size of [`AUTO_PARTITION_SIZES`] (and the workspace's
/// own `max_partition`) whose CTAs fill it, or the smallest that fits when none does (v1 when one
/// such partition holds the longest sequence). `fits(p)` says whether the workspace holds the
/// partials of partition size `p` (larger partitions need fewer rows).
///
/// Measured on an H100 (32 q / 8 KV heads, head 128, f16, with the partition kernel's L2 prefetch;
/// `results/bench-partition-sweep2-h100.json`): 16 × 4096 takes 140 µs with vLLM's 512-token
/// partitions (1024 CTAs) and 128 µs with 2048 (256 CTAs: one wave, fewer partials); 16 × 16384
/// 469 → 430 µs; 1 × 16384 is best at 512 (256 CTAs: 51 µs, 59 at 2048); 1 × 4096 at 128–256 (24
/// µs, 35 at 1024); 16 × 512 at 256 and up. v1 with 128 CTAs beats all of them (16 × 4096 119 µs,
/// 16 × 16384 402, 16 × 512 30; `results/issue7/speed-grid.json`).
pub fn choose_plan(
    max_seq_len: usize,
    v1_ctas: usize,
    sm_count: usize,
    max_partition: usize,
    fits: impl Fn(usize) -> bool,
) -> (Version, usize) {
    let fill = |ctas: usize| 2 * ctas >= 3 * sm_count;
    // v1 from 0.9 CTAs per SM: with the kernel's L2 prefetch one CTA per SM keeps enough bytes in
    // flight, and v1 has no partials to write and merge.
    if 10 * v1_ctas >= 9 * sm_count || max_seq_len <= SMALLEST_PARTITION.min(max_partition) {
        return (Version::V1, 0);
    }
    // Largest first; a 0 marks no extra size (no allocation: this runs on every call).
    let mut all = [0usize; AUTO_PARTITION_SIZES.len() + 1];
    all[..AUTO_PARTITION_SIZES.len()].copy_from_slice(&AUTO_PARTITION_SIZES);
    if !AUTO_PARTITION_SIZES.contains(&max_partition) {
        all[AUTO_PARTITION_SIZES.len()] = max_partition;
    }
    all.sort_unstable_by(|a, b| b.cmp(a));
    let sizes = &all[..all.iter().position(|&p| p == 0).unwrap_or(all.len())];
    for &p in sizes {
        if fill(v1_ctas * max_seq_len.div_ceil(p)) && fits(p) {
            return (Version::V2, p);
        }
    }
    match sizes.iter().rev().find(|&&p| fits(p)) {
        Some(&p) if max_seq_len > p => (Version::V2, p),
        _ if max_seq_len <= max_partition => (Version::V1, 0),
        _ => (Version::V2, max_partition),
    }
}

/// v2 partition sizes the automatic choice picks from (tokens).
pub const AUTO_PARTITION_SIZES: [usize; 5] = [2048, 1024, 512, 256, SMALLEST_PARTITION];

/// Partial rows every GPU workspace holds at least (4096 × head 128 × 4 B = 2 MiB of `tmp_out`).
const SPLIT_ROWS: usize = 4096;

/// The smallest partition the automatic choice uses (4 warps × 32 tokens: every warp has a tile).
const SMALLEST_PARTITION: usize = 128;

/// v1 or v2 as `version` says ([`Version::Auto`]: [`choose_version`] with the workspace's
/// `max_seq_len` and this call's sizes); returns the version that ran. The workspace's length
/// bound holds for both, so they accept the same inputs.
pub fn paged_attention(
    device: &Device,
    out: &mut Tensor,
    args: &PagedAttentionArgs,
    workspace: &mut PagedAttentionWorkspace,
    version: Version,
) -> Result<Version> {
    run(device, out, args, Some(workspace), version)
}

/// v2's scratch buffers (f32), owned by the caller and sized from bounds: at most `max_num_seqs`
/// sequences of `num_heads` heads of `head_size`, sequences of at most `max_seq_len` tokens, split
/// into partitions of `partition_size` tokens. Reusable across calls and layers; on the CPU backend
/// it holds only the bounds.
pub struct PagedAttentionWorkspace {
    max_num_seqs: usize,
    num_heads: usize,
    head_size: usize,
    max_seq_len: usize,
    partition_size: usize,
    /// Rows (sequence × head × partition) of partials the buffers hold.
    capacity_rows: usize,
    /// `(tmp_out, exp_sums, max_logits)` on the GPU.
    buffers: Option<(Tensor, Tensor, Tensor)>,
    /// Arrival counters `[max_num_seqs × num_heads]` (u32, zero between launches) on the GPU: the
    /// last partition CTA of a sequence merges the partials in the same launch.
    counters: Option<Tensor>,
    /// How v2 merges its partitions (see [`ReduceMode`]).
    reduce: ReduceMode,
    /// The version and partition size of the last call with this workspace.
    last_plan: (Version, usize),
}

/// How v2 merges the partials of a sequence's partitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ReduceMode {
    /// [`ReduceMode::Fused`] while the partition grid is small (at most
    /// [`FUSED_REDUCE_CTAS_PER_SM`] CTAs per SM), else [`ReduceMode::Separate`]. Measured on the H100
    /// (RESULTS.md, issue 7): fused saves a launch (host 8–11 → 4–5 µs per call, GPU 1 × 512
    /// 18.8 → 14.9 µs), but every partition CTA then waits for a fence and an atomic before it
    /// exits, which costs 2.5% at 16 × 16384 (4096 CTAs).
    #[default]
    Auto,
    /// The last partition CTA of each (sequence, head group) merges, in the same launch.
    Fused,
    /// vLLM's second launch, `paged_attention_v2_reduce`.
    Separate,
}

/// [`ReduceMode::Auto`] fuses the merge when the v2 grid has at most this many CTAs per SM.
pub const FUSED_REDUCE_CTAS_PER_SM: usize = 8;

impl std::fmt::Display for ReduceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReduceMode::Auto => "auto",
            ReduceMode::Fused => "fused",
            ReduceMode::Separate => "separate",
        })
    }
}

impl std::str::FromStr for ReduceMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(ReduceMode::Auto),
            "fused" => Ok(ReduceMode::Fused),
            "separate" => Ok(ReduceMode::Separate),
            _ => Err(format!("unknown reduce mode {s:?} (auto, fused, separate)")),
        }
    }
}

impl PagedAttentionWorkspace {
    /// A workspace with vLLM's partition size (512 tokens).
    pub fn new(device: &Device, max_num_seqs: usize, num_heads: usize, head_size: usize, max_seq_len: usize) -> Result<Self> {
        Self::with_partition_size(device, max_num_seqs, num_heads, head_size, max_seq_len, DEFAULT_PARTITION_SIZE)
    }

    /// A workspace with `partition_size` tokens per partition (a positive multiple of 32).
    pub fn with_partition_size(
        device: &Device,
        max_num_seqs: usize,
        num_heads: usize,
        head_size: usize,
        max_seq_len: usize,
        partition_size: usize,
    ) -> Result<Self> {
        let tile = PagedAttentionGeometry::TILE;
        if partition_size == 0 || !partition_size.is_multiple_of(tile) || partition_size > i32::MAX as usize {
            return Err(Error::Value {
                op: OP,
                what: "partition_size",
                got: partition_size.to_string(),
                why: format!("must be a positive multiple of {tile}"),
            });
        }
        let parts = max_seq_len.div_ceil(partition_size).max(1);
        let max_parts = max_reduce_partitions();
        if parts > max_parts || max_seq_len > i32::MAX as usize {
            return Err(Error::Value {
                op: OP,
                what: "max_seq_len",
                got: max_seq_len.to_string(),
                why: format!("at most {max_parts} partitions of {partition_size} tokens"),
            });
        }
        let (rows, ok) = max_num_seqs.overflowing_mul(num_heads);
        // At least SPLIT_ROWS partial rows: room for the automatic choice's smaller partitions when
        // few sequences are in flight (see `choose_plan`).
        let capacity_rows = rows.checked_mul(parts).map(|r| r.max(SPLIT_ROWS));
        let elems = capacity_rows.and_then(|n| n.checked_mul(head_size));
        let Some(elems) = elems.filter(|_| !ok) else {
            return Err(Error::Value { op: OP, what: "workspace size", got: "overflow".into(), why: "bounds too large".into() });
        };
        let buffers = match device {
            Device::Cpu => None,
            Device::Gpu(g) => Some((
                g.zeros(ScalarType::F32, &[elems.max(1)])?,
                g.zeros(ScalarType::F32, &[elems / head_size.max(1)])?,
                g.zeros(ScalarType::F32, &[elems / head_size.max(1)])?,
            )),
        };
        let capacity_rows = elems / head_size.max(1);
        let counters = match device {
            Device::Cpu => None,
            Device::Gpu(g) => Some(g.zeros(ScalarType::I32, &[rows.max(1)])?),
        };
        Ok(PagedAttentionWorkspace {
            max_num_seqs,
            num_heads,
            head_size,
            max_seq_len,
            partition_size,
            capacity_rows,
            buffers,
            counters,
            reduce: ReduceMode::Auto,
            last_plan: (Version::Auto, 0),
        })
    }

    /// Device bytes a workspace with these bounds takes (vLLM's partition size).
    pub fn size_bytes(max_num_seqs: usize, num_heads: usize, head_size: usize, max_seq_len: usize) -> usize {
        let parts = max_seq_len.div_ceil(DEFAULT_PARTITION_SIZE).max(1);
        4 * (max_num_seqs * num_heads * parts).max(SPLIT_ROWS) * (head_size + 2)
    }

    /// Whether the partials of `num_seqs × num_heads × parts` rows fit (and the reduce can weigh
    /// `parts` partitions).
    fn fits(&self, num_seqs: usize, num_heads: usize, parts: usize) -> bool {
        num_seqs * num_heads * parts <= self.capacity_rows && parts <= max_reduce_partitions()
    }

    /// The bound on every sequence's length (tokens) that calls with this workspace may use.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// How v2 merges the partitions (default [`ReduceMode::Auto`]).
    pub fn set_reduce_mode(&mut self, mode: ReduceMode) {
        self.reduce = mode;
    }

    /// How v2 merges the partitions (see [`set_reduce_mode`](Self::set_reduce_mode)).
    pub fn reduce_mode(&self) -> ReduceMode {
        self.reduce
    }

    /// What the last call with this workspace ran: the version and v2's partition size (0 for v1;
    /// `(Auto, 0)` before the first call).
    pub fn last_plan(&self) -> (Version, usize) {
        self.last_plan
    }

    /// Tokens per partition of an explicit [`Version::V2`] call; [`Version::Auto`] picks from
    /// [`AUTO_PARTITION_SIZES`] and this size.
    pub fn partition_size(&self) -> usize {
        self.partition_size
    }

    /// Partitions per (sequence, head): the v2 grid's z extent.
    pub fn max_num_partitions(&self) -> usize {
        self.max_seq_len.div_ceil(self.partition_size).max(1)
    }

    /// The call fits the bounds, lives on the workspace's device, and host lengths respect
    /// `max_seq_len`.
    fn check(&self, device: &Device, plan: &Plan, args: &PagedAttentionArgs) -> Result<()> {
        if self.buffers.is_some() != matches!(device, Device::Gpu(_)) {
            let got = if self.buffers.is_some() { "GPU" } else { "CPU" };
            return Err(Error::Device { op: OP, tensor: "workspace", got, expected: if got == "GPU" { "CPU" } else { "GPU" } });
        }
        if plan.num_seqs * plan.num_heads > self.max_num_seqs * self.num_heads || plan.head_size > self.head_size {
            return Err(Error::Value {
                op: OP,
                what: "workspace",
                got: format!("sized for {} seqs x {} heads x head_size {}", self.max_num_seqs, self.num_heads, self.head_size),
                why: format!("the call has {} seqs x {} heads x head_size {}", plan.num_seqs, plan.num_heads, plan.head_size),
            });
        }
        if args.seq_lens.is_cpu() {
            for (s, len) in args.seq_lens.to_i32_vec().into_iter().enumerate() {
                if len as usize > self.max_seq_len {
                    return Err(Error::HostData {
                        op: OP,
                        what: format!("seq_lens[{s}] = {len} exceeds the workspace's max_seq_len {}", self.max_seq_len),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Partitions the reduce's shared memory (48 KiB without opt-in) can weigh.
fn max_reduce_partitions() -> usize {
    let mut n = 48 * 1024 / 4;
    while reduce_smem_bytes(n) > 48 * 1024 {
        n -= 1;
    }
    n.min(65535)
}

fn shape_err(tensor: &'static str, t: &Tensor, expected: String) -> Error {
    Error::Shape { op: OP, tensor, got: t.shape().to_vec(), expected }
}

fn layout_err(tensor: &'static str, t: &Tensor, why: String) -> Error {
    Error::Layout { op: OP, tensor, strides: t.strides().to_vec(), offset: t.offset(), why }
}

/// Everything the host can check without reading device memory (and host-resident tables' contents).
pub fn validate(device: &Device, out: &Tensor, a: &PagedAttentionArgs) -> Result<Plan> {
    let q = a.query;
    let dtype =
        q.dtype().float().ok_or_else(|| Error::DType { op: OP, tensor: "query", got: q.dtype(), expected: "f32, f16 or bf16".into() })?;
    let &[num_seqs, num_heads, head_size] = q.shape() else { return Err(shape_err("query", q, "[num_seqs, num_heads, head_size]".into())) };
    if !HEAD_SIZES.contains(&head_size) {
        return Err(Error::Unsupported { op: OP, what: "head_size", got: head_size.to_string(), supported: format!("{HEAD_SIZES:?}") });
    }
    let k = a.key_cache;
    let cache = match k.dtype().fp8() {
        Some(kind) => KvCacheDType::Fp8(kind),
        None => KvCacheDType::Auto,
    };
    if cache != KvCacheDType::Auto && !FP8_HEAD_SIZES.contains(&head_size) {
        return Err(Error::Unsupported {
            op: OP,
            what: "head_size (fp8 cache)",
            got: head_size.to_string(),
            supported: format!("{FP8_HEAD_SIZES:?} (16-code key chunks)"),
        });
    }
    let x = cache.x(dtype);
    let &[num_blocks, num_kv_heads, hx, block_size, kx] = k.shape() else {
        return Err(shape_err("key_cache", k, "[num_blocks, num_kv_heads, head_size / x, block_size, x]".into()));
    };
    if hx * kx != head_size || kx != x {
        return Err(shape_err(
            "key_cache",
            k,
            format!("[num_blocks, num_kv_heads, {}, block_size, {x}] for head_size {head_size}, {} cache", head_size / x, k.dtype()),
        ));
    }
    if !BLOCK_SIZES.contains(&block_size) {
        return Err(Error::Unsupported { op: OP, what: "block_size", got: block_size.to_string(), supported: format!("{BLOCK_SIZES:?}") });
    }
    let v = a.value_cache;
    if v.shape() != [num_blocks, num_kv_heads, head_size, block_size] {
        return Err(shape_err("value_cache", v, format!("[{num_blocks}, {num_kv_heads}, {head_size}, {block_size}] (from the key cache)")));
    }
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(Error::Value {
            op: OP,
            what: "num_heads / num_kv_heads",
            got: format!("{num_heads} / {num_kv_heads}"),
            why: "num_heads must be a multiple of num_kv_heads".into(),
        });
    }
    let want_cache = if cache == KvCacheDType::Auto { format!("{} (the query's) or fp8", q.dtype()) } else { format!("{}", k.dtype()) };
    for (name, t) in [("key_cache", k), ("value_cache", v)] {
        if t.dtype() != k.dtype() || (cache == KvCacheDType::Auto && t.dtype() != q.dtype()) {
            return Err(Error::DType { op: OP, tensor: name, got: t.dtype(), expected: want_cache.clone() });
        }
    }
    if out.dtype() != q.dtype() {
        return Err(Error::DType { op: OP, tensor: "out", got: out.dtype(), expected: format!("{} (the query's)", q.dtype()) });
    }
    if out.shape() != q.shape() {
        return Err(shape_err("out", out, format!("{:?} (the query's)", q.shape())));
    }
    for (name, t) in [("query", q), ("out", out)] {
        if t.strides()[2] != 1 {
            return Err(layout_err(name, t, "the head dim must be contiguous".into()));
        }
    }
    let ks = k.strides();
    if ks[2..] != [block_size * x, x, 1] {
        return Err(layout_err("key_cache", k, "the three inner axes must be contiguous".into()));
    }
    let vs = v.strides();
    if vs[2..] != [block_size, 1] {
        return Err(layout_err("value_cache", v, "the two inner axes must be contiguous".into()));
    }
    if ks[..2] != vs[..2] {
        return Err(layout_err("value_cache", v, format!("block and head strides must equal the key cache's {:?}", &ks[..2])));
    }
    let es = cache.size_bytes(dtype);
    for (name, t) in [("key_cache", k), ("value_cache", v)] {
        // 16-byte loads: every chunk starts on a 16-byte boundary.
        if (t.offset() * es) % 16 != 0 || t.strides()[..2].iter().any(|s| (s * es) % 16 != 0) {
            return Err(layout_err(name, t, "offset and block/head strides must be multiples of 16 bytes".into()));
        }
    }
    let bt = a.block_tables;
    if bt.dtype() != ScalarType::I32 {
        return Err(Error::DType { op: OP, tensor: "block_tables", got: bt.dtype(), expected: "i32".into() });
    }
    let &[bt_rows, max_num_blocks_per_seq] = bt.shape() else {
        return Err(shape_err("block_tables", bt, "[num_seqs, max_num_blocks_per_seq]".into()));
    };
    if bt_rows != num_seqs {
        return Err(shape_err("block_tables", bt, format!("[{num_seqs}, max_num_blocks_per_seq]")));
    }
    if bt.strides()[1] != 1 && max_num_blocks_per_seq > 1 {
        return Err(layout_err("block_tables", bt, "rows must be contiguous".into()));
    }
    let sl = a.seq_lens;
    if sl.dtype() != ScalarType::I32 {
        return Err(Error::DType { op: OP, tensor: "seq_lens", got: sl.dtype(), expected: "i32".into() });
    }
    if sl.shape() != [num_seqs] {
        return Err(shape_err("seq_lens", sl, format!("[{num_seqs}]")));
    }
    // The kernel indexes lengths and slopes densely (no stride in the params).
    if num_seqs > 1 && sl.strides()[0] != 1 {
        return Err(layout_err("seq_lens", sl, "must be contiguous".into()));
    }
    if let Some(al) = a.alibi_slopes {
        if al.dtype() != ScalarType::F32 || al.shape() != [num_heads] {
            return Err(shape_err("alibi_slopes", al, format!("[{num_heads}] f32")));
        }
        if num_heads > 1 && al.strides()[0] != 1 {
            return Err(layout_err("alibi_slopes", al, "must be contiguous".into()));
        }
    }
    if !a.scale.is_finite() {
        return Err(Error::Value { op: OP, what: "scale", got: a.scale.to_string(), why: "must be finite".into() });
    }
    if let Some(b) = a.blocksparse.filter(BlockSparse::is_sparse) {
        let bad = |what: &'static str, got: String, why: String| Error::Value { op: OP, what, got, why };
        if b.block_size == 0 || !(b.block_size as usize).is_multiple_of(block_size) {
            return Err(bad(
                "blocksparse.block_size",
                b.block_size.to_string(),
                format!("must be a positive multiple of the cache block size {block_size}"),
            ));
        }
        if b.local_blocks == 0 {
            return Err(bad("blocksparse.local_blocks", "0".into(), "must be at least 1 (a query attends its own block)".into()));
        }
    }
    if cache != KvCacheDType::Auto {
        for (name, t) in [("k_scale", a.k_scale), ("v_scale", a.v_scale)] {
            check_fp8_scale(OP, name, t, device)?;
        }
    }
    // Strides and sizes travel as u32 in the params; grid.y is limited to 65535.
    let big = |s: usize| s > u32::MAX as usize;
    if [q.strides()[0], q.strides()[1], out.strides()[0], out.strides()[1], ks[0], ks[1], bt.strides()[0]].into_iter().any(big)
        || [num_blocks, max_num_blocks_per_seq, num_seqs].into_iter().any(big)
        || max_num_blocks_per_seq.saturating_mul(block_size) > i32::MAX as usize
    {
        return Err(Error::Value {
            op: OP,
            what: "size or stride",
            got: "> u32::MAX".into(),
            why: "does not fit the kernel's 32-bit index fields".into(),
        });
    }
    let geo = PagedAttentionGeometry::with_cache(dtype, cache, head_size, block_size);
    if num_heads > 65535 || geo.head_groups(num_heads, num_kv_heads) > 65535 {
        return Err(Error::Value {
            op: OP,
            what: "num_heads",
            got: num_heads.to_string(),
            why: "too many head groups for one grid axis".into(),
        });
    }

    // Device placement: everything on the op's device, except tables that may be host data.
    let mut placed: Vec<(&'static str, &Tensor)> = vec![("query", q), ("key_cache", k), ("value_cache", v), ("out", out)];
    if let Some(al) = a.alibi_slopes {
        placed.push(("alibi_slopes", al));
    }
    check_placement(OP, device, &placed, &[("block_tables", bt), ("seq_lens", sl)])?;

    let plan = Plan { dtype, cache, num_seqs, num_heads, num_kv_heads, head_size, block_size, num_blocks, max_num_blocks_per_seq };
    if bt.is_host() && sl.is_host() {
        check_tables(&plan, &bt.to_i32_vec(), &sl.to_i32_vec())?;
    } else if sl.is_host() {
        check_tables(&plan, &[], &sl.to_i32_vec())?;
    }
    Ok(plan)
}

/// An fp8 scale: present, `[1]` (or 0-d) f32 on the op's device; on the CPU, also finite and
/// positive (device values are the kernels' to check: `BAD_SCALE`).
pub(crate) fn check_fp8_scale(op: &'static str, name: &'static str, t: Option<&Tensor>, device: &Device) -> Result<()> {
    let Some(t) = t else {
        return Err(Error::Value { op, what: name, got: "None".into(), why: "fp8 caches need k_scale and v_scale".into() });
    };
    if t.dtype() != ScalarType::F32 || t.numel() != 1 {
        return Err(Error::Shape { op, tensor: name, got: t.shape().to_vec(), expected: "[1] f32".into() });
    }
    check_placement(op, device, &[(name, t)], &[])?;
    if matches!(device, Device::Cpu) {
        let v = t.to_f64_vec()[0];
        if !(v > 0.0 && v.is_finite()) {
            return Err(Error::HostData { op, what: format!("{name} = {v} must be finite and positive") });
        }
    }
    Ok(())
}

impl Plan {
    /// The launch geometry of this call's variant.
    pub fn geometry(&self) -> PagedAttentionGeometry {
        PagedAttentionGeometry::with_cache(self.dtype, self.cache, self.head_size, self.block_size)
    }
}

/// Checks host-resident lengths (and, when given, the block table rows they use).
pub fn check_tables(plan: &Plan, block_tables: &[i32], seq_lens: &[i32]) -> Result<()> {
    let cap = plan.max_num_blocks_per_seq * plan.block_size;
    for (s, &len) in seq_lens.iter().enumerate() {
        if len < 0 || len as usize > cap {
            return Err(Error::HostData {
                op: OP,
                what: format!(
                    "seq_lens[{s}] = {len} is outside 0..={cap} (max_num_blocks_per_seq {} × block_size {})",
                    plan.max_num_blocks_per_seq, plan.block_size
                ),
            });
        }
        if block_tables.is_empty() {
            continue;
        }
        for b in 0..(len as usize).div_ceil(plan.block_size) {
            let id = block_tables[s * plan.max_num_blocks_per_seq + b];
            if id < 0 || id as usize >= plan.num_blocks {
                return Err(Error::HostData {
                    op: OP,
                    what: format!("block_tables[{s}][{b}] = {id} is outside 0..{} (num_blocks)", plan.num_blocks),
                });
            }
        }
    }
    Ok(())
}

fn launch_gpu(
    gpu: &Gpu,
    plan: &Plan,
    out: &mut Tensor,
    a: &PagedAttentionArgs,
    max_seq_len: usize,
    split: Option<(&mut PagedAttentionWorkspace, usize)>,
) -> Result<()> {
    let variant = dispatch::paged_attention(plan.dtype, plan.cache, plan.head_size, plan.block_size)?;
    // Host-resident tables were checked in `validate`; copy them (freed stream-ordered after the kernel).
    let bt_dev;
    let bt = if a.block_tables.is_host() {
        bt_dev = a.block_tables.to_gpu(gpu.stream())?;
        &bt_dev
    } else {
        a.block_tables
    };
    let sl_dev;
    let sl = if a.seq_lens.is_host() {
        sl_dev = a.seq_lens.to_gpu(gpu.stream())?;
        &sl_dev
    } else {
        a.seq_lens
    };
    let ptr = |t: &Tensor| t.device_ptr().expect("validated: on the GPU");
    let sparse = a.blocksparse.filter(BlockSparse::is_sparse).unwrap_or_default();
    let (tmp_out, exp_sums, max_logits, partition_size, parts, counters) = match &split {
        Some((w, p)) => {
            let (t, e, m) = w.buffers.as_ref().expect("checked: a GPU workspace");
            let parts = max_seq_len.div_ceil(*p).max(1);
            let ctas = plan.num_seqs * plan.geometry().head_groups(plan.num_heads, plan.num_kv_heads) * parts;
            let fused = match w.reduce {
                ReduceMode::Fused => true,
                ReduceMode::Separate => false,
                ReduceMode::Auto => ctas <= FUSED_REDUCE_CTAS_PER_SM * gpu.sm_count,
            };
            let c = if fused { w.counters.as_ref().map(ptr).unwrap_or(0) } else { 0 };
            (ptr(t), ptr(e), ptr(m), *p, parts, c)
        }
        None => (0, 0, 0, 0, 1, 0),
    };
    let params = PagedAttentionParams {
        out: ptr(out),
        query: ptr(a.query),
        key_cache: ptr(a.key_cache),
        value_cache: ptr(a.value_cache),
        block_tables: ptr(bt),
        seq_lens: ptr(sl),
        maybe_alibi_slopes: a.alibi_slopes.map(ptr).unwrap_or(0),
        maybe_status: gpu.status_ptr(),
        tmp_out,
        exp_sums,
        max_logits,
        k_scale: if plan.cache == KvCacheDType::Auto { 0 } else { a.k_scale.map(ptr).unwrap_or(0) },
        v_scale: if plan.cache == KvCacheDType::Auto { 0 } else { a.v_scale.map(ptr).unwrap_or(0) },
        counters,
        partition_size: partition_size as u32,
        max_num_partitions: parts as u32,
        num_seqs: plan.num_seqs as u32,
        num_heads: plan.num_heads as u32,
        num_kv_heads: plan.num_kv_heads as u32,
        num_blocks: plan.num_blocks as u32,
        max_num_blocks_per_seq: plan.max_num_blocks_per_seq as u32,
        block_table_stride: bt.strides()[0] as u32,
        q_stride_seq: a.query.strides()[0] as u32,
        q_stride_head: a.query.strides()[1] as u32,
        out_stride_seq: out.strides()[0] as u32,
        out_stride_head: out.strides()[1] as u32,
        kv_block_stride: a.key_cache.strides()[0] as u32,
        kv_head_stride: a.key_cache.strides()[1] as u32,
        scale_log2: a.scale * std::f32::consts::LOG2_E,
        max_seq_len: max_seq_len as u32,
        bs_vert_stride: sparse.vert_stride,
        bs_block_size: sparse.block_size,
        bs_local_blocks: sparse.local_blocks,
        bs_head_sliding_step: sparse.head_sliding_step,
        bs_tp_rank: sparse.tp_rank,
        _pad: 0,
    };
    let geo = plan.geometry();
    let cfg = LaunchConfig {
        grid_dim: (plan.num_seqs as u32, geo.head_groups(plan.num_heads, plan.num_kv_heads) as u32, parts as u32),
        block_dim: (PagedAttentionGeometry::NUM_THREADS as u32, 1, 1),
        shared_mem_bytes: geo.smem_bytes() as u32,
    };
    log::debug!("{}: grid {:?}, {} threads, {} B shared", variant.symbol, cfg.grid_dim, cfg.block_dim.0, cfg.shared_mem_bytes);
    let func = gpu.function(variant.family(), variant.symbol)?;
    // SAFETY: `PagedAttentionParams` is the kernel's parameter type; `validate` checked every shape,
    // stride, dtype and size the kernel addresses with, the workspace check sized the v2 buffers for
    // `num_seqs x num_heads x max_num_partitions x head_size` and its counters for num_seqs x
    // head_groups (<= num_heads) words, zero between launches (each launch's last CTA resets what it
    // counted), and the tables' device copies live until the stream-ordered free after the kernel;
    // device-side indices are guarded in the kernel.
    unsafe { launch::launch(gpu.stream(), &func, cfg, &params) }?;
    if partition_size == 0 || counters != 0 {
        return Ok(());
    }
    let reduce = PagedAttentionReduceParams {
        out: params.out,
        tmp_out,
        exp_sums,
        max_logits,
        seq_lens: params.seq_lens,
        num_heads: params.num_heads,
        head_size: plan.head_size as u32,
        partition_size: partition_size as u32,
        max_num_partitions: parts as u32,
        max_seq_len: max_seq_len as u32,
        out_stride_seq: params.out_stride_seq,
        out_stride_head: params.out_stride_head,
        _pad: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (plan.num_seqs as u32, plan.num_heads as u32, 1),
        block_dim: (REDUCE_THREADS as u32, 1, 1),
        shared_mem_bytes: reduce_smem_bytes(parts) as u32,
    };
    let func = gpu.function(variant.family(), dispatch::paged_attention_v2_reduce(plan.dtype))?;
    // SAFETY: the reduce's params type; it reads the workspace rows the partition kernel wrote (same
    // bounds), lengths as checked above, and writes the validated output.
    unsafe { launch::launch(gpu.stream(), &func, cfg, &reduce) }
}
