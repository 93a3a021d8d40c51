//! vLLM's FlashAttention backend call over a paged KV cache: [`flash_attn_varlen_func`] (one launch
//! for a batch that mixes prefill chunks and decode tokens) and [`merge_attn_states`] (combining two
//! partial attentions by their log-sum-exp, for cascade / shared-prefix attention).
//!
//! Kernel: `kernels-gpu/src/flash_attn.rs` (tensor cores); CPU reference: `cpu/flash_attn.rs`;
//! tests: `tests/flash_attn.rs`. `merge_attn_states`: the same three places.
//!
//! Masks follow FlashAttention: query `i` of a sequence with `sq` queries and `sk` keys sits at key
//! position `d = i + sk - sq` (aligned bottom-right), and
//! - `causal` keeps keys `j <= d`;
//! - `window_size = (left, right)` keeps `d - left <= j <= d + right` (`-1`: unbounded on that side;
//!   with `causal` the right bound is `d`);
//! - `softcap > 0` replaces the scaled logit `s = softmax_scale · q·k` by `softcap · tanh(s / softcap)`;
//! - ALiBi adds `-slope_h · |d - j|` to the (soft-capped) logit.
//!
//! Non-finite inputs propagate: a NaN logit makes its row NaN, an infinite value its rows infinite
//! or NaN, as in the float64 reference, with one difference: the GPU kernels multiply a masked
//! key's probability (exactly 0) by its value on the tensor cores, so a NaN or infinite value also
//! turns the rows of its key tile that cannot see it into NaN (FlashAttention behaves the same).
//!
//! A row with no visible key gives a zero output and an LSE of `-inf` (FlashAttention-2 reports `+inf`
//! there; `-inf` is the log of the empty sum and merges correctly).

use std::sync::OnceLock;

use cudarc::driver::LaunchConfig;
use cudarc::driver::sys::CUfunction_attribute;
use pagedattn_layout::{
    FlashAttnGeometry, FlashAttnSm90Geometry, FlashAttnSm90Params, FlashAttnVarlenParams, KernelFamily, MERGE_THREADS,
    MergeAttnStatesParams,
};

use crate::device::{Device, Gpu, check_placement};
use crate::error::{Error, Result};
use crate::tensor::{ScalarType, Tensor};
use crate::{cpu, dispatch, launch};

const OP: &str = "flash_attn_varlen_func";
const MERGE: &str = "merge_attn_states";

/// Inputs of [`flash_attn_varlen_func`], with vLLM's names.
pub struct FlashAttnVarlenArgs<'a> {
    /// `[total_q, num_heads, head_size]` f16 or bf16, the head dim contiguous.
    pub q: &'a Tensor,
    /// Key cache `[num_blocks, block_size, num_kv_heads, head_size]` of the query's dtype, the head dim
    /// contiguous, any block/slot/head strides (so vLLM's combined `[2, num_blocks, ...]` tensor works).
    pub k: &'a Tensor,
    /// Value cache, the same shape and dtype as `k` (its own strides).
    pub v: &'a Tensor,
    /// Bound on every sequence's query count (the launch grid depends only on it).
    pub max_seqlen_q: usize,
    /// `[batch + 1]` i32: sequence `b` owns queries `cu_seqlens_q[b] .. cu_seqlens_q[b + 1]`.
    pub cu_seqlens_q: &'a Tensor,
    /// Bound on every sequence's key count.
    pub max_seqlen_k: usize,
    /// `[batch]` i32: keys of sequence `b` (its cached prefix plus its new tokens), at least 0.
    pub seqused_k: &'a Tensor,
    /// `None`: `1 / sqrt(head_size)`.
    pub softmax_scale: Option<f32>,
    /// Causal mask, aligned bottom-right (see the module docs).
    pub causal: bool,
    /// `(left, right)`; `-1` is unbounded on that side.
    pub window_size: (i32, i32),
    /// `0`: none; else the logit bound (finite, positive).
    pub softcap: f32,
    /// `[num_heads]` f32.
    pub alibi_slopes: Option<&'a Tensor>,
    /// `[batch, max_blocks]` i32: the physical blocks of each sequence's keys.
    pub block_table: &'a Tensor,
}

/// Sizes derived from validated arguments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VarlenPlan {
    /// The query's (and caches', output's) dtype: f16 or bf16.
    pub dtype: ScalarType,
    /// Sequences: `cu_seqlens_q.len() - 1`.
    pub batch: usize,
    /// Query tokens of all sequences (axis 0 of `q`).
    pub total_q: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads of the caches (`num_heads` is a multiple).
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
    /// Blocks in each cache (axis 0).
    pub num_blocks: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Block-table entries per sequence (axis 1 of `block_table`).
    pub max_blocks: usize,
    /// The softmax scale: `softmax_scale`, or `1 / sqrt(head_size)`.
    pub scale: f32,
    /// `(left, right)` with causality folded in: `None` is unbounded.
    pub window: (Option<usize>, Option<usize>),
}

/// `out[t, h, :] = softmax(mask(s))·V` for every query token `t` of every sequence (see the module
/// docs for the masks), reading keys and values of sequence `b` from its blocks in `block_table`;
/// with `softmax_lse`, also `lse[h, t] = ln Σ_j exp(s_j)` over the visible keys (natural log).
///
/// `out` is `[total_q, num_heads, head_size]` of the query's dtype (the head dim contiguous);
/// `softmax_lse` is `[num_heads, total_q]` f32.
pub fn flash_attn_varlen_func(
    device: &Device,
    out: &mut Tensor,
    softmax_lse: Option<&mut Tensor>,
    args: &FlashAttnVarlenArgs,
) -> Result<()> {
    flash_attn_varlen_func_with(device, out, softmax_lse, args, FlashKernel::Auto)
}

/// Which GPU kernel runs [`flash_attn_varlen_func`] (the CPU backend ignores it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FlashKernel {
    /// [`FlashKernel::Wgmma`] where it runs, else [`FlashKernel::MmaSync`].
    #[default]
    Auto,
    /// `kernels-gpu/src/flash_attn.rs`: `mma.sync` tensor cores, every arch from 8.0, every head size.
    MmaSync,
    /// `kernels-gpu/src/flash_attn_sm90.rs`: `wgmma`, warp specialization and bulk tensor copies,
    /// on compute capability 9.0 (an `sm_90a` image), for head sizes `FLASH_SM90_HEAD_SIZES` and
    /// caches the copies can read ([`crate::tma::unsupported`]); `Auto` takes `MmaSync` elsewhere.
    /// A cache's tensor map is uploaded on its first call (see `crate::tma`).
    Wgmma,
}

impl FlashKernel {
    /// The name the benchmark reports and [`FromStr`](std::str::FromStr) parses: `auto`, `mma` or
    /// `wgmma`.
    pub const fn name(self) -> &'static str {
        match self {
            FlashKernel::Auto => "auto",
            FlashKernel::MmaSync => "mma",
            FlashKernel::Wgmma => "wgmma",
        }
    }

    /// The kernel that `self` picks on `gpu` for `(dtype, head_size)`: `Auto` resolved; `Wgmma`
    /// where it cannot run is `Error::Unsupported`.
    pub fn resolve(self, gpu: &Gpu, dtype: pagedattn_layout::DType, head_size: usize) -> Result<FlashKernel> {
        let wgmma = dispatch::flash_attn_sm90(dtype, head_size, false).is_some()
            && gpu.arch == (9, 0)
            && gpu.has_cubin(KernelFamily::FlashAttnSm90);
        match self {
            FlashKernel::Auto => Ok(if wgmma { FlashKernel::Wgmma } else { FlashKernel::MmaSync }),
            FlashKernel::MmaSync => Ok(FlashKernel::MmaSync),
            FlashKernel::Wgmma if wgmma => Ok(FlashKernel::Wgmma),
            FlashKernel::Wgmma => Err(Error::Unsupported {
                op: OP,
                what: "the wgmma kernel for (device, dtype, head_size)",
                got: format!("(sm_{}{}, {dtype}, {head_size})", gpu.arch.0, gpu.arch.1),
                supported: format!("compute capability 9.0 with an sm_90a cubin, f16/bf16 x {:?}", pagedattn_layout::FLASH_SM90_HEAD_SIZES),
            }),
        }
    }
}

impl std::str::FromStr for FlashKernel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(FlashKernel::Auto),
            "mma" => Ok(FlashKernel::MmaSync),
            "wgmma" => Ok(FlashKernel::Wgmma),
            _ => Err(format!("unknown varlen kernel {s:?} (auto, mma, wgmma)")),
        }
    }
}

/// [`flash_attn_varlen_func`] on a chosen GPU kernel.
pub fn flash_attn_varlen_func_with(
    device: &Device,
    out: &mut Tensor,
    softmax_lse: Option<&mut Tensor>,
    args: &FlashAttnVarlenArgs,
    kernel: FlashKernel,
) -> Result<()> {
    let plan = validate(device, out, softmax_lse.as_deref(), args)?;
    if plan.total_q == 0 || plan.num_heads == 0 || plan.batch == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => cpu::flash_attn::run(&plan, out, softmax_lse, args),
        Device::Gpu(gpu) => launch_gpu(gpu, &plan, out, softmax_lse, args, kernel),
    }
}

fn launch_gpu(
    gpu: &Gpu,
    plan: &VarlenPlan,
    out: &mut Tensor,
    lse: Option<&mut Tensor>,
    a: &FlashAttnVarlenArgs,
    requested: FlashKernel,
) -> Result<()> {
    let dtype = plan.dtype.float().expect("validated: f16 or bf16");
    let mut kernel = requested.resolve(gpu, dtype, plan.head_size)?;
    if kernel == FlashKernel::Wgmma {
        // The Hopper kernel reads K and V pages with bulk tensor copies: caches they cannot describe
        // go to the mma.sync kernel (or fail, where the caller asked for wgmma).
        if let Some((name, why)) = [("k", a.k), ("v", a.v)].into_iter().find_map(|(n, t)| crate::tma::unsupported(t).map(|w| (n, w))) {
            if requested == FlashKernel::Wgmma {
                return Err(Error::Unsupported {
                    op: OP,
                    what: "the wgmma kernel's bulk copies of the cache",
                    got: format!("{name}: {why}"),
                    supported: "blocks that follow one another slot by slot, power-of-two block sizes, 16-byte strides".into(),
                });
            }
            kernel = FlashKernel::MmaSync;
        }
    }
    let symbol = match kernel {
        FlashKernel::Wgmma => {
            let extras = a.softcap > 0.0 || a.alibi_slopes.is_some();
            dispatch::flash_attn_sm90(dtype, plan.head_size, extras).expect("resolved")
        }
        _ => dispatch::flash_attn(dtype, plan.head_size)?,
    };
    // 16-byte loads of q, k and v rows; 4-byte stores of out: the device bases are 256-byte aligned.
    let aligned = |t: &Tensor, axes: usize, bytes: usize| {
        (t.offset() * 2).is_multiple_of(bytes) && t.strides()[..axes].iter().all(|s| (s * 2).is_multiple_of(bytes))
    };
    for (name, t, axes, bytes) in [("q", a.q, 2, 16), ("k", a.k, 3, 16), ("v", a.v, 3, 16), ("out", &*out, 2, 4)] {
        if !aligned(t, axes, bytes) {
            return Err(Error::Layout {
                op: OP,
                tensor: name,
                strides: t.strides().to_vec(),
                offset: t.offset(),
                why: format!("the GPU kernel needs every row {bytes}-byte aligned (offset and strides)"),
            });
        }
    }
    let upload = |t: &Tensor| -> Result<Option<Tensor>> { if t.is_host() { Ok(Some(t.to_gpu(gpu.stream())?)) } else { Ok(None) } };
    let (cu_d, used_d, bt_d) = (upload(a.cu_seqlens_q)?, upload(a.seqused_k)?, upload(a.block_table)?);
    let (cu, used, bt) =
        (cu_d.as_ref().unwrap_or(a.cu_seqlens_q), used_d.as_ref().unwrap_or(a.seqused_k), bt_d.as_ref().unwrap_or(a.block_table));
    let ptr = |t: &Tensor| t.device_ptr().expect("validated: on the GPU");
    let to_i32 = |w: Option<usize>| w.map_or(-1, |v| v.min(i32::MAX as usize) as i32);
    let (ks, vs) = (a.k.strides(), a.v.strides());
    let (k_map, v_map) = if kernel == FlashKernel::Wgmma {
        let rows = FlashAttnSm90Geometry::box_rows(plan.block_size, plan.head_size);
        (crate::tma::kv_map(gpu, a.k, rows)?, crate::tma::kv_map(gpu, a.v, rows)?)
    } else {
        (0, 0)
    };
    let (family, smem, block_m, threads) = match kernel {
        FlashKernel::Wgmma => (
            KernelFamily::FlashAttnSm90,
            FlashAttnSm90Geometry::smem_bytes(plan.head_size),
            FlashAttnSm90Geometry::BLOCK_M,
            FlashAttnSm90Geometry::NUM_THREADS,
        ),
        _ => (
            KernelFamily::FlashAttn,
            FlashAttnGeometry::smem_bytes(plan.head_size),
            FlashAttnGeometry::block_m(plan.head_size),
            FlashAttnGeometry::NUM_THREADS,
        ),
    };
    // A 1-D grid over (sequence, KV head, row tile), ordered by `varlen_tile`: groups of pairs
    // whose keys and values take at most half the L2 (the longest sequence's, all of them).
    let row_tiles = (a.max_seqlen_q * (plan.num_heads / plan.num_kv_heads)).div_ceil(block_m).max(1);
    let pairs = plan.batch * plan.num_kv_heads;
    if pairs.checked_mul(row_tiles).is_none_or(|n| n > i32::MAX as usize) {
        return Err(Error::Unsupported {
            op: OP,
            what: "batch × num_kv_heads × row tiles",
            got: format!("{} × {} × {row_tiles}", plan.batch, plan.num_kv_heads),
            supported: format!("at most {} CTAs (row tiles of {block_m} rows)", i32::MAX),
        });
    }
    let pair_bytes = a.max_seqlen_k.max(1) * plan.head_size * 2 * 2; // K and V, 16-bit
    let tile_group = (gpu.l2_bytes / 2 / pair_bytes).clamp(1, pairs.max(1));
    let work_counter = if kernel == FlashKernel::Wgmma { gpu.work_counter()? } else { 0 };
    let params = FlashAttnVarlenParams {
        out: ptr(out),
        q: ptr(a.q),
        k_cache: ptr(a.k),
        v_cache: ptr(a.v),
        cu_seqlens_q: ptr(cu),
        seqused_k: ptr(used),
        block_table: ptr(bt),
        alibi_slopes: a.alibi_slopes.map(ptr).unwrap_or(0),
        softmax_lse: lse.as_deref().map(ptr).unwrap_or(0),
        maybe_status: gpu.status_ptr(),
        k_map,
        v_map,
        work_counter,
        batch: plan.batch as u32,
        num_heads: plan.num_heads as u32,
        num_kv_heads: plan.num_kv_heads as u32,
        block_size: plan.block_size as u32,
        max_blocks: plan.max_blocks as u32,
        num_blocks: plan.num_blocks as u32,
        total_q: plan.total_q as u32,
        max_seqlen_q: a.max_seqlen_q as u32,
        max_seqlen_k: a.max_seqlen_k as u32,
        q_stride_token: a.q.strides()[0] as u32,
        q_stride_head: a.q.strides()[1] as u32,
        out_stride_token: out.strides()[0] as u32,
        out_stride_head: out.strides()[1] as u32,
        k_stride_block: ks[0] as u32,
        k_stride_slot: ks[1] as u32,
        k_stride_head: ks[2] as u32,
        v_stride_block: vs[0] as u32,
        v_stride_slot: vs[1] as u32,
        v_stride_head: vs[2] as u32,
        block_table_stride: bt.strides()[0] as u32,
        row_tiles: row_tiles as u32,
        tile_group: tile_group as u32,
        scale: plan.scale,
        softcap: a.softcap,
        window_left: to_i32(plan.window.0),
        window_right: to_i32(plan.window.1),
    };
    // With a work counter the Hopper kernel is persistent: a CTA per SM (one fits) walks the work items.
    let ctas = if work_counter != 0 { (pairs * row_tiles).min(gpu.sm_count) } else { pairs * row_tiles };
    let cfg = LaunchConfig { grid_dim: (ctas as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: smem as u32 };
    let func = gpu.function(family, symbol)?;
    if smem > 48 * 1024 {
        func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)?;
    }
    if kernel == FlashKernel::Wgmma {
        // The Q tile by one bulk copy per panel where a box can describe it (else a `cp.async`
        // gather); `PAGEDATTN_VARLEN_Q_TMA=0` forces the gather (an escape hatch, and the
        // benchmark's comparison).
        static GATHER: OnceLock<bool> = OnceLock::new();
        let gather = *GATHER.get_or_init(|| std::env::var("PAGEDATTN_VARLEN_Q_TMA").is_ok_and(|v| v == "0"));
        let q_map = if gather { None } else { crate::tma::q_map(a.q, plan.num_heads / plan.num_kv_heads) };
        let params = FlashAttnSm90Params { q_tma: q_map.is_some() as u32, _pad: [0; 11], q_map: q_map.unwrap_or_default(), varlen: params };
        // SAFETY: as below, with `FlashAttnSm90Params` the Hopper kernel's parameter type and its
        // Q map describing `q` as validated.
        return unsafe { launch::launch(gpu.stream(), &func, cfg, &params) };
    }
    // SAFETY: `FlashAttnVarlenParams` is the kernel's parameter type; `validate` checked every shape,
    // dtype and size, the checks above the kernel's alignment needs; host tables were checked and
    // their device copies live until the stream-ordered free after the kernel; device-side
    // lengths and block ids are guarded in the kernel.
    unsafe { launch::launch(gpu.stream(), &func, cfg, &params) }
}

fn shape_err(op: &'static str, tensor: &'static str, t: &Tensor, expected: String) -> Error {
    Error::Shape { op, tensor, got: t.shape().to_vec(), expected }
}

fn layout_err(op: &'static str, tensor: &'static str, t: &Tensor, why: &str) -> Error {
    Error::Layout { op, tensor, strides: t.strides().to_vec(), offset: t.offset(), why: why.into() }
}

fn value_err(what: &'static str, got: impl ToString, why: &str) -> Error {
    Error::Value { op: OP, what, got: got.to_string(), why: why.into() }
}

/// Everything the host can check without reading device memory, plus host-resident tables.
pub fn validate(device: &Device, out: &Tensor, lse: Option<&Tensor>, a: &FlashAttnVarlenArgs) -> Result<VarlenPlan> {
    let q = a.q;
    let dtype = q.dtype();
    if !matches!(dtype, ScalarType::F16 | ScalarType::BF16) {
        return Err(Error::DType { op: OP, tensor: "q", got: dtype, expected: "f16 or bf16".into() });
    }
    let &[total_q, num_heads, head_size] = q.shape() else {
        return Err(shape_err(OP, "q", q, "[total_q, num_heads, head_size]".into()));
    };
    if !crate::layout::HEAD_SIZES.contains(&head_size) {
        return Err(Error::Unsupported {
            op: OP,
            what: "head_size",
            got: head_size.to_string(),
            supported: format!("{:?}", crate::layout::HEAD_SIZES),
        });
    }
    let &[num_blocks, block_size, num_kv_heads, kd] = a.k.shape() else {
        return Err(shape_err(OP, "k", a.k, "[num_blocks, block_size, num_kv_heads, head_size]".into()));
    };
    if kd != head_size {
        return Err(shape_err(OP, "k", a.k, format!("[num_blocks, block_size, num_kv_heads, {head_size}]")));
    }
    if a.v.shape() != a.k.shape() {
        return Err(shape_err(OP, "v", a.v, format!("{:?} (the key cache's)", a.k.shape())));
    }
    if block_size == 0 || !block_size.is_multiple_of(8) || block_size > 256 {
        return Err(Error::Unsupported {
            op: OP,
            what: "block_size",
            got: block_size.to_string(),
            supported: "multiples of 8 up to 256".into(),
        });
    }
    if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(value_err(
            "num_heads / num_kv_heads",
            format!("{num_heads} / {num_kv_heads}"),
            "num_heads must be a multiple of num_kv_heads",
        ));
    }
    for (name, t) in [("k", a.k), ("v", a.v)] {
        if t.dtype() != dtype {
            return Err(Error::DType { op: OP, tensor: name, got: t.dtype(), expected: format!("{dtype} (the query's)") });
        }
        if t.strides()[3] != 1 {
            return Err(layout_err(OP, name, t, "the head dim must be contiguous"));
        }
    }
    if out.dtype() != dtype || out.shape() != q.shape() {
        return Err(shape_err(OP, "out", out, format!("{:?} {dtype} (the query's)", q.shape())));
    }
    for (name, t) in [("q", q), ("out", out)] {
        if t.strides()[2] != 1 {
            return Err(layout_err(OP, name, t, "the head dim must be contiguous"));
        }
    }
    if let Some(l) = lse
        && (l.dtype() != ScalarType::F32 || l.shape() != [num_heads, total_q])
    {
        return Err(shape_err(OP, "softmax_lse", l, format!("[{num_heads}, {total_q}] f32")));
    }
    let cu = a.cu_seqlens_q;
    if cu.dtype() != ScalarType::I32 || cu.shape().len() != 1 || cu.shape()[0] == 0 {
        return Err(shape_err(OP, "cu_seqlens_q", cu, "[batch + 1] i32".into()));
    }
    let batch = cu.shape()[0] - 1;
    for (name, t, shape) in [("seqused_k", a.seqused_k, vec![batch])] {
        if t.dtype() != ScalarType::I32 || t.shape() != shape.as_slice() {
            return Err(shape_err(OP, name, t, format!("[{batch}] i32")));
        }
    }
    let bt = a.block_table;
    if bt.dtype() != ScalarType::I32 || bt.shape().len() != 2 || bt.shape()[0] != batch {
        return Err(shape_err(OP, "block_table", bt, format!("[{batch}, max_blocks] i32")));
    }
    let max_blocks = bt.shape()[1];
    if a.max_seqlen_k > max_blocks * block_size {
        return Err(value_err("max_seqlen_k", a.max_seqlen_k, "exceeds the block table's capacity (max_blocks × block_size)"));
    }
    if let Some(al) = a.alibi_slopes
        && (al.dtype() != ScalarType::F32 || al.shape() != [num_heads])
    {
        return Err(shape_err(OP, "alibi_slopes", al, format!("[{num_heads}] f32")));
    }
    let scale = a.softmax_scale.unwrap_or(1.0 / (head_size as f32).sqrt());
    if !scale.is_finite() {
        return Err(value_err("softmax_scale", scale, "must be finite"));
    }
    if !(a.softcap.is_finite() && a.softcap >= 0.0) {
        return Err(value_err("softcap", a.softcap, "must be 0 (off) or finite and positive"));
    }
    let (left, right) = a.window_size;
    if left < -1 || right < -1 {
        return Err(value_err("window_size", format!("({left}, {right})"), "each side is -1 (unbounded) or at least 0"));
    }
    let window = (usize::try_from(left).ok(), if a.causal { Some(0) } else { usize::try_from(right).ok() });

    // Placement: tensors on the op's device; tables may be host data (checked here).
    let mut placed = vec![("q", q), ("k", a.k), ("v", a.v), ("out", out)];
    if let Some(l) = lse {
        placed.push(("softmax_lse", l));
    }
    if let Some(al) = a.alibi_slopes {
        placed.push(("alibi_slopes", al));
    }
    check_placement(OP, device, &placed, &[("cu_seqlens_q", cu), ("seqused_k", a.seqused_k), ("block_table", bt)])?;

    let plan = VarlenPlan { dtype, batch, total_q, num_heads, num_kv_heads, head_size, num_blocks, block_size, max_blocks, scale, window };
    if cu.is_host() {
        check_cu_seqlens(&cu.to_i32_vec(), total_q, a.max_seqlen_q)?;
    }
    if a.seqused_k.is_host() {
        let used = a.seqused_k.to_i32_vec();
        for (b, &k) in used.iter().enumerate() {
            if k < 0 || k as usize > a.max_seqlen_k {
                return Err(Error::HostData {
                    op: OP,
                    what: format!("seqused_k[{b}] = {k} is outside 0..={} (max_seqlen_k)", a.max_seqlen_k),
                });
            }
            if bt.is_host() {
                let table = bt.to_i32_vec();
                for blk in 0..(k as usize).div_ceil(block_size) {
                    let id = table[b * max_blocks + blk];
                    if id < 0 || id as usize >= num_blocks {
                        return Err(Error::HostData { op: OP, what: format!("block_table[{b}][{blk}] = {id} is outside 0..{num_blocks}") });
                    }
                }
            }
        }
    }
    Ok(plan)
}

/// `cu_seqlens_q` starts at 0, never decreases, ends at `total_q`, and no sequence has more than
/// `max_seqlen_q` queries.
fn check_cu_seqlens(cu: &[i32], total_q: usize, max_seqlen_q: usize) -> Result<()> {
    if cu[0] != 0 {
        return Err(Error::HostData { op: OP, what: format!("cu_seqlens_q[0] = {} (must be 0)", cu[0]) });
    }
    for b in 0..cu.len() - 1 {
        let n = cu[b + 1] as i64 - cu[b] as i64;
        if n < 0 || n as usize > max_seqlen_q {
            return Err(Error::HostData {
                op: OP,
                what: format!("sequence {b} has {n} queries (cu_seqlens_q[{b}..={}]), outside 0..={max_seqlen_q} (max_seqlen_q)", b + 1),
            });
        }
    }
    let last = *cu.last().expect("non-empty");
    if last as i64 != total_q as i64 {
        return Err(Error::HostData { op: OP, what: format!("cu_seqlens_q[batch] = {last}, but q has {total_q} tokens") });
    }
    Ok(())
}

/// Combines two partial attentions over disjoint key sets (vLLM's `merge_attn_states`): with
/// `m = max(lse_p, lse_s)`, `w_p = exp(lse_p - m)`, `w_s = exp(lse_s - m)`,
/// `out = (w_p · out_p + w_s · out_s) / (w_p + w_s)` and `lse = m + ln(w_p + w_s)`, per (token, head).
/// An LSE of `+inf` (FlashAttention-2's mark of a row without keys) counts as `-inf`; a side of
/// weight 0 is not read (its output may hold anything); both sides `-inf` give 0 and `-inf`.
///
/// `prefix_output`, `suffix_output`, `output`: `[num_tokens, num_heads, head_size]` (f32, f16 or bf16,
/// one dtype; on the GPU the head dim contiguous); `prefix_lse`, `suffix_lse`, `output_lse`:
/// `[num_heads, num_tokens]` f32. `output` may be one of the inputs.
pub fn merge_attn_states(
    device: &Device,
    output: &mut Tensor,
    output_lse: Option<&mut Tensor>,
    prefix_output: &Tensor,
    prefix_lse: &Tensor,
    suffix_output: &Tensor,
    suffix_lse: &Tensor,
) -> Result<()> {
    let d = prefix_output.dtype();
    let Some(dtype) = d.float() else {
        return Err(Error::DType { op: MERGE, tensor: "prefix_output", got: d, expected: "f32, f16 or bf16".into() });
    };
    let &[num_tokens, num_heads, head_size] = prefix_output.shape() else {
        return Err(shape_err(MERGE, "prefix_output", prefix_output, "[num_tokens, num_heads, head_size]".into()));
    };
    for (name, t) in [("suffix_output", suffix_output), ("output", &*output)] {
        if t.dtype() != d || t.shape() != prefix_output.shape() {
            return Err(shape_err(MERGE, name, t, format!("{:?} {d} (prefix_output's)", prefix_output.shape())));
        }
    }
    let lse_shape = [num_heads, num_tokens];
    for (name, t) in
        [("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)].into_iter().chain(output_lse.as_deref().map(|t| ("output_lse", t)))
    {
        if t.dtype() != ScalarType::F32 || t.shape() != lse_shape {
            return Err(shape_err(MERGE, name, t, format!("{lse_shape:?} f32")));
        }
    }
    let mut placed = vec![
        ("prefix_output", prefix_output),
        ("suffix_output", suffix_output),
        ("output", &*output),
        ("prefix_lse", prefix_lse),
        ("suffix_lse", suffix_lse),
    ];
    placed.extend(output_lse.as_deref().map(|t| ("output_lse", t)));
    check_placement(MERGE, device, &placed, &[])?;
    if num_tokens == 0 || num_heads == 0 {
        return Ok(());
    }
    match device {
        Device::Cpu => cpu::flash_attn::merge(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse),
        Device::Gpu(gpu) => {
            for (name, t) in [("prefix_output", prefix_output), ("suffix_output", suffix_output), ("output", &*output)] {
                if t.strides()[2] != 1 {
                    return Err(layout_err(MERGE, name, t, "the GPU kernel needs the head dim contiguous"));
                }
            }
            let u32_pair = |t: &Tensor| [t.strides()[0] as u32, t.strides()[1] as u32];
            let ptr = |t: &Tensor| t.device_ptr().expect("checked: on the GPU");
            let params = MergeAttnStatesParams {
                output: ptr(output),
                output_lse: output_lse.as_deref().map(ptr).unwrap_or(0),
                prefix_output: ptr(prefix_output),
                prefix_lse: ptr(prefix_lse),
                suffix_output: ptr(suffix_output),
                suffix_lse: ptr(suffix_lse),
                num_tokens: num_tokens as u32,
                num_heads: num_heads as u32,
                head_size: head_size as u32,
                out_strides: u32_pair(output),
                prefix_strides: u32_pair(prefix_output),
                suffix_strides: u32_pair(suffix_output),
                out_lse_strides: output_lse.as_deref().map(u32_pair).unwrap_or_default(),
                prefix_lse_strides: u32_pair(prefix_lse),
                suffix_lse_strides: u32_pair(suffix_lse),
                _pad: 0,
            };
            let cfg = LaunchConfig {
                grid_dim: (num_tokens as u32, num_heads as u32, 1),
                block_dim: (MERGE_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let func = gpu.function(KernelFamily::FlashAttn, dispatch::merge_attn_states(dtype))?;
            // SAFETY: `MergeAttnStatesParams` is the kernel's parameter type; every tensor is on this
            // GPU with the checked shapes, dtypes and strides (head dim contiguous), which bound every
            // index the kernel forms from its grid.
            unsafe { launch::launch(gpu.stream(), &func, cfg, &params) }
        }
    }
}
