//! The ops, with vLLM's argument names, order and defaults. Each reads its arrays
//! ([`crate::array`]), checks what vLLM's binding checks (device, dtype, rank, and the integer
//! arguments against the shapes: all without a GPU), then calls the library op, whose own
//! validation covers the rest (strides, sizes, host tables) before it launches on the current
//! stream. Library ops: `host/src/paged_attention.rs`, `host/src/cache.rs`,
//! `host/src/flash_attn.rs`.

use pyo3::prelude::*;

use pagedattn::cache::Fp8Scales;
use pagedattn::layout::BlockSparse;
use pagedattn::paged_attention::PagedAttentionArgs;
use pagedattn::{FlashAttnVarlenArgs, ScalarType, Tensor};

use crate::array::{Array, DType, Place, bad_value, optional, place_name};
use crate::errors::{DTypeError, DevicePlacementError, UnsupportedError, ValidationError, to_py};
use crate::fastcall::{self, Params};
use crate::runtime::{call_device, current_stream, with_device};

const FLOATS: &[DType] = &[DType::F16, DType::BF16, DType::F32];
const FLOATS_NAME: &str = "float16, bfloat16 or float32";

/// The cache element type `kv_cache_dtype` names, for a model of float type `model`.
fn cache_type(kv_cache_dtype: &str, model: ScalarType) -> PyResult<ScalarType> {
    match kv_cache_dtype {
        "auto" => Ok(model),
        "fp8" | "fp8_e4m3" => Ok(ScalarType::Fp8E4m3),
        "fp8_e5m2" => Ok(ScalarType::Fp8E5m2),
        other => Err(bad_value("kv_cache_dtype", format!("{other:?}"), "expected \"auto\", \"fp8\", \"fp8_e4m3\" or \"fp8_e5m2\"")),
    }
}

/// Checks a cache array's dtype against the element type `kv_cache_dtype` gave.
fn check_cache_dtype(a: &Array, cache: ScalarType, kv_cache_dtype: &str) -> PyResult<()> {
    let ok: &[DType] = match cache {
        ScalarType::Fp8E4m3 => &[DType::U8, DType::F8E4m3],
        ScalarType::Fp8E5m2 => &[DType::U8, DType::F8E5m2],
        ScalarType::F16 => &[DType::F16],
        ScalarType::BF16 => &[DType::BF16],
        _ => &[DType::F32],
    };
    if ok.contains(&a.dtype) {
        return Ok(());
    }
    let expected = match cache.fp8() {
        Some(_) => format!("uint8 (or the matching float8 dtype) for kv_cache_dtype {kv_cache_dtype:?}"),
        None => format!("{} (the model's dtype, kv_cache_dtype \"auto\")", ok[0].name()),
    };
    a.require_dtype(ok, &expected)
}

/// A non-negative integer argument.
fn count(what: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| bad_value(what, v, "must be at least 0"))
}

/// fp8 scales: one float32 on the GPU each, viewed as `[1]` (vLLM passes 0-d tensors).
fn scale_tensor(a: &Array) -> PyResult<Tensor> {
    a.require_cuda()?;
    a.require_dtype(&[DType::F32], "float32")?;
    if a.numel() != 1 {
        return Err(ValidationError::new_err(format!("`{}` must hold one value, got shape {:?}", a.name, a.shape)));
    }
    let t = a.tensor(ScalarType::F32)?;
    t.view(&[1], &[1], t.offset()).map_err(to_py)
}

fn require_shape(a: &Array, expected: &[usize], what: &str) -> PyResult<()> {
    if a.shape == expected {
        Ok(())
    } else {
        Err(ValidationError::new_err(format!("`{}` has shape {:?}, expected {expected:?} ({what})", a.name, a.shape)))
    }
}

/// The float32 fp8 scale arrays, when the cache is fp8 (ignored otherwise, as vLLM).
fn fp8_scales(cache: ScalarType, k_scale: &Bound<'_, PyAny>, v_scale: &Bound<'_, PyAny>) -> PyResult<Option<(Array, Array)>> {
    if cache.fp8().is_none() {
        return Ok(None);
    }
    Ok(Some((Array::extract("k_scale", k_scale)?, Array::extract("v_scale", v_scale)?)))
}

/// Shapes the paged-attention ops share, checked against vLLM's integer arguments.
struct PagedShapes {
    num_seqs: usize,
    num_heads: usize,
    head_size: usize,
    cache: ScalarType,
}

#[allow(clippy::too_many_arguments)]
fn check_paged(
    out: &Array,
    query: &Array,
    key_cache: &Array,
    value_cache: &Array,
    num_kv_heads: i64,
    block_tables: &Array,
    seq_lens: &Array,
    block_size: i64,
    alibi: Option<&Array>,
    kv_cache_dtype: &str,
) -> PyResult<PagedShapes> {
    for a in [out, query, key_cache, value_cache, block_tables, seq_lens].into_iter().chain(alibi) {
        a.require_cuda()?;
    }
    query.require_dtype(FLOATS, FLOATS_NAME)?;
    let model = query.dtype.float().expect("checked");
    out.require_dtype_of(query)?;
    let cache = cache_type(kv_cache_dtype, model)?;
    check_cache_dtype(key_cache, cache, kv_cache_dtype)?;
    check_cache_dtype(value_cache, cache, kv_cache_dtype)?;
    block_tables.require_dtype(&[DType::I32], "int32")?;
    seq_lens.require_dtype(&[DType::I32], "int32")?;
    if let Some(a) = alibi {
        a.require_dtype(&[DType::F32], "float32")?;
    }
    query.require_rank(3, "[num_seqs, num_heads, head_size]")?;
    let (num_seqs, num_heads, head_size) = (query.shape[0], query.shape[1], query.shape[2]);
    require_shape(out, &query.shape, "the query's shape")?;
    key_cache.require_rank(5, "[num_blocks, num_kv_heads, head_size // x, block_size, x]")?;
    value_cache.require_rank(4, "[num_blocks, num_kv_heads, head_size, block_size]")?;
    let kv_heads = count("num_kv_heads", num_kv_heads)?;
    let bs = count("block_size", block_size)?;
    if kv_heads == 0 || num_heads % kv_heads != 0 {
        return Err(bad_value("num_kv_heads", num_kv_heads, &format!("must divide the query's {num_heads} heads")));
    }
    let x = 16 / cache.size_bytes();
    if head_size % x != 0 {
        return Err(ValidationError::new_err(format!("head_size {head_size} (the query's) is not a multiple of x = {x}")));
    }
    let nb = key_cache.shape[0];
    require_shape(key_cache, &[nb, kv_heads, head_size / x, bs, x], "num_kv_heads, head_size and block_size of the call, x = 16 bytes")?;
    require_shape(value_cache, &[value_cache.shape[0], kv_heads, head_size, bs], "num_kv_heads, head_size and block_size of the call")?;
    block_tables.require_rank(2, "[num_seqs, max_num_blocks_per_seq]")?;
    if block_tables.shape[0] != num_seqs {
        return Err(ValidationError::new_err(format!("`block_tables` has {} rows, the query {num_seqs} sequences", block_tables.shape[0])));
    }
    require_shape(seq_lens, &[num_seqs], "[num_seqs]")?;
    if let Some(a) = alibi {
        require_shape(a, &[num_heads], "[num_heads]")?;
    }
    Ok(PagedShapes { num_seqs, num_heads, head_size, cache })
}

fn block_sparse(
    tp_rank: i64,
    local_blocks: i64,
    vert_stride: i64,
    block_size: i64,
    head_sliding_step: i64,
) -> PyResult<Option<BlockSparse>> {
    if vert_stride <= 1 {
        return Ok(None);
    }
    let u32_of = |what: &str, v: i64| u32::try_from(v).map_err(|_| bad_value(what, v, "must be in 0..2^32"));
    Ok(Some(BlockSparse {
        tp_rank: u32_of("tp_rank", tp_rank)?,
        local_blocks: u32_of("blocksparse_local_blocks", local_blocks)?,
        vert_stride: u32_of("blocksparse_vert_stride", vert_stride)?,
        block_size: u32_of("blocksparse_block_size", block_size)?,
        head_sliding_step: i32::try_from(head_sliding_step)
            .map_err(|_| bad_value("blocksparse_head_sliding_step", head_sliding_step, "must fit in 32 bits"))?,
    }))
}

/// v2's vLLM buffers: `exp_sum`, `max_logits` `[num_seqs, num_heads, max_num_partitions]` float32,
/// `tmp_out` `[num_seqs, num_heads, max_num_partitions, head_size]` of the query's dtype. Checked
/// as vLLM's binding would; the partial results go to the binding's own float32 workspace, which
/// `tmp_out` in 16 bits cannot hold.
fn check_v2_buffers(
    exp_sum: &Array,
    max_logits: &Array,
    tmp_out: &Array,
    query: &Array,
    s: &PagedShapes,
    max_seq_len: usize,
) -> PyResult<()> {
    const PARTITION_SIZE: usize = 512;
    for a in [exp_sum, max_logits, tmp_out] {
        a.require_cuda()?;
    }
    exp_sum.require_dtype(&[DType::F32], "float32")?;
    max_logits.require_dtype(&[DType::F32], "float32")?;
    tmp_out.require_dtype_of(query)?;
    let parts = max_seq_len.div_ceil(PARTITION_SIZE);
    for a in [exp_sum, max_logits] {
        a.require_rank(3, "[num_seqs, num_heads, max_num_partitions]")?;
        if a.shape[0] != s.num_seqs || a.shape[1] != s.num_heads || a.shape[2] < parts {
            return Err(ValidationError::new_err(format!(
                "`{}` has shape {:?}, expected [{}, {}, >= {parts}] (max_num_partitions = ceil(max_seq_len / 512))",
                a.name, a.shape, s.num_seqs, s.num_heads
            )));
        }
    }
    tmp_out.require_rank(4, "[num_seqs, num_heads, max_num_partitions, head_size]")?;
    if tmp_out.shape[..2] != [s.num_seqs, s.num_heads] || tmp_out.shape[2] < parts || tmp_out.shape[3] != s.head_size {
        return Err(ValidationError::new_err(format!(
            "`tmp_out` has shape {:?}, expected [{}, {}, >= {parts}, {}]",
            tmp_out.shape, s.num_seqs, s.num_heads, s.head_size
        )));
    }
    Ok(())
}

/// vLLM's `paged_attention_v1`: decode attention over the paged cache (see the stub for the
/// arguments; the library op is `pagedattn::paged_attention_v1`).
#[pyfunction]
#[pyo3(signature = (
    out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens, block_size, max_seq_len,
    alibi_slopes, kv_cache_dtype, k_scale, v_scale, tp_rank = 0, blocksparse_local_blocks = 0,
    blocksparse_vert_stride = 0, blocksparse_block_size = 64, blocksparse_head_sliding_step = 0
))]
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_v1(
    out: &Bound<'_, PyAny>,
    query: &Bound<'_, PyAny>,
    key_cache: &Bound<'_, PyAny>,
    value_cache: &Bound<'_, PyAny>,
    num_kv_heads: i64,
    scale: f64,
    block_tables: &Bound<'_, PyAny>,
    seq_lens: &Bound<'_, PyAny>,
    block_size: i64,
    max_seq_len: i64,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    kv_cache_dtype: &str,
    k_scale: &Bound<'_, PyAny>,
    v_scale: &Bound<'_, PyAny>,
    tp_rank: i64,
    blocksparse_local_blocks: i64,
    blocksparse_vert_stride: i64,
    blocksparse_block_size: i64,
    blocksparse_head_sliding_step: i64,
) -> PyResult<()> {
    let sparse =
        block_sparse(tp_rank, blocksparse_local_blocks, blocksparse_vert_stride, blocksparse_block_size, blocksparse_head_sliding_step)?;
    paged(
        None,
        [out, query, key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale],
        alibi_slopes,
        (num_kv_heads, block_size, max_seq_len),
        scale,
        kv_cache_dtype,
        sparse,
    )
}

/// vLLM's `paged_attention_v2`: the partitioned version (vLLM's partition size, 512 tokens).
#[pyfunction]
#[pyo3(signature = (
    out, exp_sum, max_logits, tmp_out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
    block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale, tp_rank = 0, blocksparse_local_blocks = 0,
    blocksparse_vert_stride = 0, blocksparse_block_size = 64, blocksparse_head_sliding_step = 0
))]
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_v2(
    out: &Bound<'_, PyAny>,
    exp_sum: &Bound<'_, PyAny>,
    max_logits: &Bound<'_, PyAny>,
    tmp_out: &Bound<'_, PyAny>,
    query: &Bound<'_, PyAny>,
    key_cache: &Bound<'_, PyAny>,
    value_cache: &Bound<'_, PyAny>,
    num_kv_heads: i64,
    scale: f64,
    block_tables: &Bound<'_, PyAny>,
    seq_lens: &Bound<'_, PyAny>,
    block_size: i64,
    max_seq_len: i64,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    kv_cache_dtype: &str,
    k_scale: &Bound<'_, PyAny>,
    v_scale: &Bound<'_, PyAny>,
    tp_rank: i64,
    blocksparse_local_blocks: i64,
    blocksparse_vert_stride: i64,
    blocksparse_block_size: i64,
    blocksparse_head_sliding_step: i64,
) -> PyResult<()> {
    let sparse =
        block_sparse(tp_rank, blocksparse_local_blocks, blocksparse_vert_stride, blocksparse_block_size, blocksparse_head_sliding_step)?;
    paged(
        Some([exp_sum, max_logits, tmp_out]),
        [out, query, key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale],
        alibi_slopes,
        (num_kv_heads, block_size, max_seq_len),
        scale,
        kv_cache_dtype,
        sparse,
    )
}

/// Both paged-attention versions: `v2` holds v2's buffers.
fn paged(
    v2: Option<[&Bound<'_, PyAny>; 3]>,
    [out, query, key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale]: [&Bound<'_, PyAny>; 8],
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    (num_kv_heads, block_size, max_seq_len): (i64, i64, i64),
    scale: f64,
    kv_cache_dtype: &str,
    blocksparse: Option<BlockSparse>,
) -> PyResult<()> {
    let py = out.py();
    let out = Array::extract("out", out)?;
    let query = Array::extract("query", query)?;
    let key_cache = Array::extract("key_cache", key_cache)?;
    let value_cache = Array::extract("value_cache", value_cache)?;
    let block_tables = Array::extract("block_tables", block_tables)?;
    let seq_lens = Array::extract("seq_lens", seq_lens)?;
    let alibi = optional("alibi_slopes", alibi_slopes)?;
    let s = check_paged(
        &out,
        &query,
        &key_cache,
        &value_cache,
        num_kv_heads,
        &block_tables,
        &seq_lens,
        block_size,
        alibi.as_ref(),
        kv_cache_dtype,
    )?;
    let max_seq_len = count("max_seq_len", max_seq_len)?;
    if !scale.is_finite() {
        return Err(bad_value("scale", scale, "must be finite"));
    }
    let bufs = match v2 {
        Some([e, m, t]) => {
            let (e, m, t) = (Array::extract("exp_sum", e)?, Array::extract("max_logits", m)?, Array::extract("tmp_out", t)?);
            check_v2_buffers(&e, &m, &t, &query, &s, max_seq_len)?;
            Some([e, m, t])
        }
        None => None,
    };
    let scales = fp8_scales(s.cache, k_scale, v_scale)?;
    let mut all = vec![&out, &query, &key_cache, &value_cache, &block_tables, &seq_lens];
    all.extend(alibi.as_ref());
    all.extend(bufs.iter().flatten());
    if let Some((k, v)) = &scales {
        all.extend([k, v]);
    }
    let ordinal = call_device(&all)?;
    let stream = current_stream(py, ordinal)?;
    let model = query.dtype.float().expect("checked");
    let mut out_t = out.tensor(model)?;
    let (q, kc, vc) = (query.tensor(model)?, key_cache.tensor(s.cache)?, value_cache.tensor(s.cache)?);
    let (bt, sl) = (block_tables.tensor(ScalarType::I32)?, seq_lens.tensor(ScalarType::I32)?);
    let alibi_t = alibi.as_ref().map(|a| a.tensor(ScalarType::F32)).transpose()?;
    let scale_t = match &scales {
        Some((k, v)) => Some((scale_tensor(k)?, scale_tensor(v)?)),
        None => None,
    };
    let args = PagedAttentionArgs {
        query: &q,
        key_cache: &kc,
        value_cache: &vc,
        block_tables: &bt,
        seq_lens: &sl,
        scale: scale as f32,
        alibi_slopes: alibi_t.as_ref(),
        k_scale: scale_t.as_ref().map(|s| &s.0),
        v_scale: scale_t.as_ref().map(|s| &s.1),
        blocksparse,
    };
    with_device(ordinal, stream, &all, |state| {
        if v2.is_some() {
            let (device, ws) = state.workspace(s.num_seqs * s.num_heads, s.head_size, max_seq_len)?;
            pagedattn::paged_attention_v2(device, &mut out_t, &args, ws).map_err(to_py)
        } else {
            pagedattn::paged_attention_v1(&state.device, &mut out_t, &args).map_err(to_py)
        }
    })
}

/// vLLM's `reshape_and_cache`: writes keys and values into caches of vLLM's layout.
#[pyfunction]
#[pyo3(signature = (key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale))]
#[allow(clippy::too_many_arguments)]
pub fn reshape_and_cache(
    key: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    key_cache: &Bound<'_, PyAny>,
    value_cache: &Bound<'_, PyAny>,
    slot_mapping: &Bound<'_, PyAny>,
    kv_cache_dtype: &str,
    k_scale: &Bound<'_, PyAny>,
    v_scale: &Bound<'_, PyAny>,
) -> PyResult<()> {
    reshape(false, [key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale], kv_cache_dtype)
}

/// vLLM's `reshape_and_cache_flash`: the same into caches of the flash layout
/// `[num_blocks, block_size, num_kv_heads, head_size]` (any block, slot and head strides).
#[pyfunction]
#[pyo3(signature = (key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale))]
#[allow(clippy::too_many_arguments)]
pub fn reshape_and_cache_flash(
    key: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    key_cache: &Bound<'_, PyAny>,
    value_cache: &Bound<'_, PyAny>,
    slot_mapping: &Bound<'_, PyAny>,
    kv_cache_dtype: &str,
    k_scale: &Bound<'_, PyAny>,
    v_scale: &Bound<'_, PyAny>,
) -> PyResult<()> {
    reshape(true, [key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale], kv_cache_dtype)
}

fn reshape(
    flash: bool,
    [key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale]: [&Bound<'_, PyAny>; 7],
    kv_cache_dtype: &str,
) -> PyResult<()> {
    let py = key.py();
    let key = Array::extract("key", key)?;
    let value = Array::extract("value", value)?;
    let key_cache = Array::extract("key_cache", key_cache)?;
    let value_cache = Array::extract("value_cache", value_cache)?;
    let slots = Array::extract("slot_mapping", slot_mapping)?;
    for a in [&key, &value, &key_cache, &value_cache, &slots] {
        a.require_cuda()?;
    }
    key.require_dtype(FLOATS, FLOATS_NAME)?;
    let model = key.dtype.float().expect("checked");
    value.require_dtype_of(&key)?;
    let cache = cache_type(kv_cache_dtype, model)?;
    check_cache_dtype(&key_cache, cache, kv_cache_dtype)?;
    check_cache_dtype(&value_cache, cache, kv_cache_dtype)?;
    slots.require_dtype(&[DType::I64], "int64")?;
    key.require_rank(3, "[num_tokens, num_kv_heads, head_size]")?;
    require_shape(&value, &key.shape, "the key's shape")?;
    slots.require_rank(1, "[num_tokens]")?;
    let (kv_heads, head_size) = (key.shape[1], key.shape[2]);
    if flash {
        key_cache.require_rank(4, "[num_blocks, block_size, num_kv_heads, head_size]")?;
        let (nb, bs) = (key_cache.shape[0], key_cache.shape[1]);
        let what = "[num_blocks, block_size, num_kv_heads, head_size] with the key's heads and head size";
        require_shape(&key_cache, &[nb, bs, kv_heads, head_size], what)?;
        require_shape(&value_cache, &[nb, bs, kv_heads, head_size], what)?;
    } else {
        key_cache.require_rank(5, "[num_blocks, num_kv_heads, head_size // x, block_size, x]")?;
        value_cache.require_rank(4, "[num_blocks, num_kv_heads, head_size, block_size]")?;
        let x = 16 / cache.size_bytes();
        let (nb, bs) = (key_cache.shape[0], key_cache.shape[3]);
        require_shape(&key_cache, &[nb, kv_heads, head_size / x, bs, x], "the key's heads and head size, x = 16 bytes")?;
        require_shape(&value_cache, &[nb, kv_heads, head_size, bs], "the key's heads and head size, the key cache's blocks")?;
    }
    let scales = fp8_scales(cache, k_scale, v_scale)?;
    let mut all = vec![&key, &value, &key_cache, &value_cache, &slots];
    if let Some((k, v)) = &scales {
        all.extend([k, v]);
    }
    let ordinal = call_device(&all)?;
    let stream = current_stream(py, ordinal)?;
    let (k, v) = (key.tensor(model)?, value.tensor(model)?);
    let (mut kc, mut vc) = (key_cache.tensor(cache)?, value_cache.tensor(cache)?);
    let sl = slots.tensor(ScalarType::I64)?;
    let scale_t = match &scales {
        Some((k, v)) => Some((scale_tensor(k)?, scale_tensor(v)?)),
        None => None,
    };
    with_device(ordinal, stream, &all, |state| {
        let d = &state.device;
        match (&scale_t, flash) {
            (None, false) => pagedattn::reshape_and_cache(d, &k, &v, &mut kc, &mut vc, &sl),
            (None, true) => pagedattn::reshape_and_cache_flash(d, &k, &v, &mut kc, &mut vc, &sl),
            (Some((ks, vs)), false) => {
                pagedattn::cache::reshape_and_cache_fp8(d, &k, &v, &mut kc, &mut vc, &sl, Fp8Scales { k_scale: ks, v_scale: vs })
            }
            (Some((ks, vs)), true) => {
                pagedattn::cache::reshape_and_cache_flash_fp8(d, &k, &v, &mut kc, &mut vc, &sl, Fp8Scales { k_scale: ks, v_scale: vs })
            }
        }
        .map_err(to_py)
    })
}

/// The element type to copy a cache of `a`'s dtype as (copies move bytes; fp8 caches are uint8).
fn bytes_type(a: &Array) -> PyResult<ScalarType> {
    match &a.dtype {
        d if d.float().is_some() => Ok(d.float().expect("a float")),
        DType::U8 | DType::F8E4m3 => Ok(ScalarType::Fp8E4m3),
        DType::F8E5m2 => Ok(ScalarType::Fp8E5m2),
        d => Err(DTypeError::new_err(format!(
            "`{}` has dtype {}, expected a cache dtype (float16, bfloat16, float32, uint8 or float8)",
            a.name,
            d.name()
        ))),
    }
}

/// vLLM's `copy_blocks`: for every pair `(src, dst)` of `block_mapping` (`[num_pairs, 2]` int64 on
/// the GPU), copies block `src` to block `dst` in every layer's key and value cache.
#[pyfunction]
#[pyo3(signature = (key_caches, value_caches, block_mapping))]
pub fn copy_blocks(key_caches: &Bound<'_, PyAny>, value_caches: &Bound<'_, PyAny>, block_mapping: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = key_caches.py();
    let list = |name: &'static str, o: &Bound<'_, PyAny>| -> PyResult<Vec<Array>> {
        let seq = o.try_iter().map_err(|_| DTypeError::new_err(format!("`{name}` must be a list of CUDA arrays")))?;
        seq.map(|x| Array::extract(name, &x?)).collect()
    };
    let keys = list("key_caches", key_caches)?;
    let values = list("value_caches", value_caches)?;
    let mapping = Array::extract("block_mapping", block_mapping)?;
    for a in keys.iter().chain(&values).chain([&mapping]) {
        a.require_cuda()?;
    }
    mapping.require_dtype(&[DType::I64], "int64")?;
    mapping.require_rank(2, "[num_pairs, 2]")?;
    if mapping.shape[1] != 2 {
        return Err(ValidationError::new_err(format!("`block_mapping` has shape {:?}, expected [num_pairs, 2]", mapping.shape)));
    }
    if keys.len() != values.len() {
        return Err(ValidationError::new_err(format!(
            "`key_caches` has {} layers but `value_caches` {}: one value cache per key cache",
            keys.len(),
            values.len()
        )));
    }
    let mut all: Vec<&Array> = keys.iter().chain(&values).collect();
    all.push(&mapping);
    let ordinal = call_device(&all)?;
    let stream = current_stream(py, ordinal)?;
    let mut kt = keys.iter().map(|a| a.tensor(bytes_type(a)?)).collect::<PyResult<Vec<_>>>()?;
    let mut vt = values.iter().map(|a| a.tensor(bytes_type(a)?)).collect::<PyResult<Vec<_>>>()?;
    let m = mapping.tensor(ScalarType::I64)?;
    with_device(ordinal, stream, &all, |state| {
        let mut k: Vec<&mut Tensor> = kt.iter_mut().collect();
        let mut v: Vec<&mut Tensor> = vt.iter_mut().collect();
        pagedattn::copy_blocks(&state.device, &mut k, &mut v, &m).map_err(to_py)
    })
}

/// vLLM's `swap_blocks`: copies block `src_id` of `src` to block `dst_id` of `dst` for every pair
/// of `block_mapping` (`[num_pairs, 2]` int64 on the CPU); one side on the GPU and the other in
/// pinned host memory, or both on the GPU. Asynchronous on the current stream.
#[pyfunction]
#[pyo3(signature = (src, dst, block_mapping))]
pub fn swap_blocks(src: &Bound<'_, PyAny>, dst: &Bound<'_, PyAny>, block_mapping: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = src.py();
    let src = Array::extract("src", src)?;
    let dst = Array::extract("dst", dst)?;
    let mapping = Array::extract("block_mapping", block_mapping)?;
    mapping.require_dtype(&[DType::I64], "int64")?;
    mapping.require_rank(2, "[num_pairs, 2]")?;
    if mapping.shape[1] != 2 {
        return Err(ValidationError::new_err(format!("`block_mapping` has shape {:?}, expected [num_pairs, 2]", mapping.shape)));
    }
    let (st, dt) = (bytes_type(&src)?, bytes_type(&dst)?);
    if st != dt {
        return Err(DTypeError::new_err(format!("`dst` has dtype {}, `src` {}: they must match", dst.dtype.name(), src.dtype.name())));
    }
    for a in [&src, &dst] {
        if !(a.is_cuda() || a.place == Place::Pinned) {
            return Err(DevicePlacementError::new_err(format!(
                "`{}` must be a CUDA array or pinned host memory, got {}",
                a.name,
                place_name(a.place)
            )));
        }
    }
    let m = mapping.host_tensor(ScalarType::I64)?;
    let cuda: Vec<&Array> = [&src, &dst].into_iter().filter(|a| a.is_cuda()).collect();
    if cuda.is_empty() {
        return Err(DevicePlacementError::new_err(
            "`src` and `dst` are both host memory: one of them must be a CUDA array (the other may be pinned host memory)",
        ));
    }
    let ordinal = call_device(&cuda)?;
    let stream = current_stream(py, ordinal)?;
    let s = src.tensor(st)?;
    let mut d = dst.tensor(dt)?;
    with_device(ordinal, stream, &cuda, |state| pagedattn::swap_blocks(&state.device, &s, &mut d, &m).map_err(to_py))
}

/// `vllm.vllm_flash_attn.flash_attn_varlen_func` over a paged cache (`block_table` and
/// `seqused_k`): mixed prefill and decode in one launch. Returns `out`, or `(out, softmax_lse)`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_func<'py>(
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    max_seqlen_q: i64,
    cu_seqlens_q: &Bound<'py, PyAny>,
    max_seqlen_k: i64,
    cu_seqlens_k: Option<&Bound<'py, PyAny>>,
    seqused_k: Option<&Bound<'py, PyAny>>,
    q_v: Option<&Bound<'py, PyAny>>,
    dropout_p: f64,
    softmax_scale: Option<f64>,
    causal: bool,
    window_size: Option<Vec<i64>>,
    softcap: f64,
    alibi_slopes: Option<&Bound<'py, PyAny>>,
    deterministic: bool,
    return_attn_probs: bool,
    block_table: Option<&Bound<'py, PyAny>>,
    return_softmax_lse: bool,
    out: Option<&Bound<'py, PyAny>>,
    scheduler_metadata: Option<&Bound<'py, PyAny>>,
    q_descale: Option<&Bound<'py, PyAny>>,
    k_descale: Option<&Bound<'py, PyAny>>,
    v_descale: Option<&Bound<'py, PyAny>>,
    num_splits: i64,
    fa_version: i64,
    s_aux: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = q.py();
    // `deterministic`: the kernels are deterministic anyway; `scheduler_metadata`, `num_splits` and
    // `fa_version` are scheduling hints of FlashAttention's kernels, which do not change results.
    let _ = (deterministic, scheduler_metadata, num_splits, fa_version);
    let given = |o: Option<&Bound<'py, PyAny>>| o.is_some_and(|o| !o.is_none());
    if dropout_p != 0.0 {
        return Err(UnsupportedError::new_err(format!("dropout_p = {dropout_p}: dropout is not supported (inference only)")));
    }
    if return_attn_probs {
        return Err(UnsupportedError::new_err("return_attn_probs = True is not supported"));
    }
    for (name, o) in [("q_v", q_v), ("s_aux", s_aux)] {
        if given(o) {
            return Err(UnsupportedError::new_err(format!("`{name}` is not supported (attention sinks and q_v are not implemented)")));
        }
    }
    // vLLM's FlashAttention backend passes the layer's descales on every call. Like
    // FlashAttention-3, which applies them to fp8 inputs only, the 16-bit kernels here ignore them;
    // they are still checked as float32 CUDA arrays.
    for (name, o) in [("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)] {
        if let Some(a) = optional(name, o)? {
            a.require_cuda()?;
            a.require_dtype(&[DType::F32], "float32")?;
        }
    }
    if !given(block_table) {
        return Err(UnsupportedError::new_err(
            "only the paged form is supported: pass block_table and seqused_k (contiguous keys with cu_seqlens_k are not)",
        ));
    }
    let Some(seqused_k) = seqused_k.filter(|o| !o.is_none()) else {
        let why = if given(cu_seqlens_k) { " (cu_seqlens_k with a block table is not supported)" } else { "" };
        return Err(UnsupportedError::new_err(format!("the paged form needs seqused_k{why}")));
    };
    let window = match window_size.as_deref() {
        None => (-1, -1),
        Some([l, r]) => {
            let w = |x: i64| match i32::try_from(x) {
                Ok(v) if v >= -1 => Ok(v),
                _ => Err(bad_value("window_size", format!("({l}, {r})"), "each side is -1 (unbounded) or at least 0")),
            };
            (w(*l)?, w(*r)?)
        }
        Some(w) => return Err(bad_value("window_size", format!("{w:?}"), "expected (left, right)")),
    };
    let qa = Array::extract("q", q)?;
    let ka = Array::extract("k", k)?;
    let va = Array::extract("v", v)?;
    let cu = Array::extract("cu_seqlens_q", cu_seqlens_q)?;
    let su = Array::extract("seqused_k", seqused_k)?;
    let bt = Array::extract("block_table", block_table.expect("given"))?;
    let alibi = optional("alibi_slopes", alibi_slopes)?;
    let out_a = optional("out", out)?;
    for a in [&qa, &ka, &va, &cu, &su, &bt].into_iter().chain(alibi.as_ref()).chain(out_a.as_ref()) {
        a.require_cuda()?;
    }
    qa.require_dtype(&[DType::F16, DType::BF16], "float16 or bfloat16")?;
    let model = qa.dtype.float().expect("checked");
    ka.require_dtype_of(&qa)?;
    va.require_dtype_of(&qa)?;
    if let Some(o) = &out_a {
        o.require_dtype_of(&qa)?;
    }
    for a in [&cu, &su, &bt] {
        a.require_dtype(&[DType::I32], "int32")?;
    }
    if let Some(a) = &alibi {
        a.require_dtype(&[DType::F32], "float32")?;
    }
    qa.require_rank(3, "[total_q, num_heads, head_size]")?;
    ka.require_rank(4, "[num_blocks, block_size, num_kv_heads, head_size]")?;
    require_shape(&va, &ka.shape, "the key cache's shape")?;
    cu.require_rank(1, "[batch + 1]")?;
    if cu.shape[0] == 0 {
        return Err(ValidationError::new_err("`cu_seqlens_q` is empty: it holds batch + 1 offsets"));
    }
    let batch = cu.shape[0] - 1;
    require_shape(&su, &[batch], "[batch]")?;
    bt.require_rank(2, "[batch, max_num_blocks_per_seq]")?;
    if bt.shape[0] != batch {
        return Err(ValidationError::new_err(format!("`block_table` has {} rows, cu_seqlens_q {batch} sequences", bt.shape[0])));
    }
    let (total_q, num_heads) = (qa.shape[0], qa.shape[1]);
    if let Some(o) = &out_a {
        require_shape(o, &qa.shape, "the query's shape")?;
    }
    if let Some(a) = &alibi {
        require_shape(a, &[num_heads], "[num_heads]")?;
    }
    let max_seqlen_q = count("max_seqlen_q", max_seqlen_q)?;
    let max_seqlen_k = count("max_seqlen_k", max_seqlen_k)?;
    let mut all = vec![&qa, &ka, &va, &cu, &su, &bt];
    all.extend(alibi.as_ref());
    all.extend(out_a.as_ref());
    let ordinal = call_device(&all)?;
    let stream = current_stream(py, ordinal)?;
    drop(all);

    // Outputs the caller did not pass are made by torch (the library has no allocator of its own
    // for Python); without torch they must be passed.
    let torch = || py.import("torch").map_err(|_| UnsupportedError::new_err("without torch, pass `out` (and no return_softmax_lse)"));
    let out_obj = match out.filter(|o| !o.is_none()) {
        Some(o) => o.clone(),
        None => torch()?.call_method1("empty_like", (q,))?,
    };
    let out_a = match out_a {
        Some(a) => a,
        None => Array::extract("out", &out_obj)?,
    };
    let lse_obj = if return_softmax_lse {
        let t = torch()?;
        let kw = pyo3::types::PyDict::new(py);
        kw.set_item("dtype", t.getattr("float32")?)?;
        kw.set_item("device", q.getattr("device")?)?;
        Some(t.call_method("empty", ((num_heads, total_q),), Some(&kw))?)
    } else {
        None
    };
    let lse_a = lse_obj.as_ref().map(|o| Array::extract("softmax_lse", o)).transpose()?;

    let (qt, kt, vt) = (qa.tensor(model)?, ka.tensor(model)?, va.tensor(model)?);
    let (cut, sut, btt) = (cu.tensor(ScalarType::I32)?, su.tensor(ScalarType::I32)?, bt.tensor(ScalarType::I32)?);
    let alibi_t = alibi.as_ref().map(|a| a.tensor(ScalarType::F32)).transpose()?;
    let mut out_t = out_a.tensor(model)?;
    let mut lse_t = lse_a.as_ref().map(|a| a.tensor(ScalarType::F32)).transpose()?;
    let args = FlashAttnVarlenArgs {
        q: &qt,
        k: &kt,
        v: &vt,
        max_seqlen_q,
        cu_seqlens_q: &cut,
        max_seqlen_k,
        seqused_k: &sut,
        softmax_scale: softmax_scale.map(|s| s as f32),
        causal,
        window_size: window,
        softcap: softcap as f32,
        alibi_slopes: alibi_t.as_ref(),
        block_table: &btt,
    };
    with_device(ordinal, stream, &[&qa, &ka, &va, &cu, &su, &bt], |state| {
        pagedattn::flash_attn_varlen_func(&state.device, &mut out_t, lse_t.as_mut(), &args).map_err(to_py)
    })?;
    match lse_obj {
        Some(lse) => Ok(pyo3::types::PyTuple::new(py, [out_obj, lse])?.into_any()),
        None => Ok(out_obj),
    }
}

/// vLLM's `merge_attn_states`: combines two partial attentions by their log-sum-exp.
#[pyfunction]
#[pyo3(signature = (output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse = None))]
pub fn merge_attn_states(
    output: &Bound<'_, PyAny>,
    prefix_output: &Bound<'_, PyAny>,
    prefix_lse: &Bound<'_, PyAny>,
    suffix_output: &Bound<'_, PyAny>,
    suffix_lse: &Bound<'_, PyAny>,
    output_lse: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let py = output.py();
    let o = Array::extract("output", output)?;
    let po = Array::extract("prefix_output", prefix_output)?;
    let pl = Array::extract("prefix_lse", prefix_lse)?;
    let so = Array::extract("suffix_output", suffix_output)?;
    let sl = Array::extract("suffix_lse", suffix_lse)?;
    let ol = optional("output_lse", output_lse)?;
    let mut all = vec![&o, &po, &pl, &so, &sl];
    all.extend(ol.as_ref());
    for a in &all {
        a.require_cuda()?;
    }
    po.require_dtype(FLOATS, FLOATS_NAME)?;
    let model = po.dtype.float().expect("checked");
    o.require_dtype_of(&po)?;
    so.require_dtype_of(&po)?;
    for a in [&pl, &sl].into_iter().chain(ol.as_ref()) {
        a.require_dtype(&[DType::F32], "float32")?;
    }
    po.require_rank(3, "[num_tokens, num_heads, head_size]")?;
    require_shape(&so, &po.shape, "prefix_output's shape")?;
    require_shape(&o, &po.shape, "prefix_output's shape")?;
    let lse_shape = [po.shape[1], po.shape[0]];
    for a in [&pl, &sl].into_iter().chain(ol.as_ref()) {
        require_shape(a, &lse_shape, "[num_heads, num_tokens]")?;
    }
    let ordinal = call_device(&all)?;
    let stream = current_stream(py, ordinal)?;
    let mut ot = o.tensor(model)?;
    let mut olt = ol.as_ref().map(|a| a.tensor(ScalarType::F32)).transpose()?;
    let (pot, plt, sot, slt) = (po.tensor(model)?, pl.tensor(ScalarType::F32)?, so.tensor(model)?, sl.tensor(ScalarType::F32)?);
    with_device(ordinal, stream, &all, |state| {
        pagedattn::merge_attn_states(&state.device, &mut ot, olt.as_mut(), &pot, &plt, &sot, &slt).map_err(to_py)
    })
}

/// `flash_attn_varlen_func`'s parameters, in order (vLLM's).
const VARLEN_PARAMS: &[&str] = &[
    "q",
    "k",
    "v",
    "max_seqlen_q",
    "cu_seqlens_q",
    "max_seqlen_k",
    "cu_seqlens_k",
    "seqused_k",
    "q_v",
    "dropout_p",
    "softmax_scale",
    "causal",
    "window_size",
    "softcap",
    "alibi_slopes",
    "deterministic",
    "return_attn_probs",
    "block_table",
    "return_softmax_lse",
    "out",
    "scheduler_metadata",
    "q_descale",
    "k_descale",
    "v_descale",
    "num_splits",
    "fa_version",
    "s_aux",
];

static VARLEN: pyo3::sync::PyOnceLock<Params> = pyo3::sync::PyOnceLock::new();

const VARLEN_DOC: &std::ffi::CStr = c"flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None, \
seqused_k=None, q_v=None, dropout_p=0.0, softmax_scale=None, causal=False, window_size=None, softcap=0.0, alibi_slopes=None, \
deterministic=False, return_attn_probs=False, block_table=None, return_softmax_lse=False, out=None, scheduler_metadata=None, \
q_descale=None, k_descale=None, v_descale=None, num_splits=0, fa_version=2, s_aux=None)
--

`vllm.vllm_flash_attn.flash_attn_varlen_func` over a paged cache (`block_table` and `seqused_k`):
mixed prefill and decode in one launch. Returns `out`, or `(out, softmax_lse)`.";

/// `flash_attn_varlen_func` as a vectorcall function (see [`crate::fastcall`]): sorts the
/// arguments, converts them as PyO3 would, and calls [`flash_attn_varlen_func`].
unsafe extern "C" fn varlen_fastcall(
    _module: *mut pyo3::ffi::PyObject,
    args: *const *mut pyo3::ffi::PyObject,
    nargsf: pyo3::ffi::Py_ssize_t,
    kwnames: *mut pyo3::ffi::PyObject,
) -> *mut pyo3::ffi::PyObject {
    fastcall::trampoline(|py| {
        let p = VARLEN.get_or_init(py, || Params::new(py, "flash_attn_varlen_func", VARLEN_PARAMS));
        // SAFETY: CPython's vectorcall arguments, passed through unchanged.
        let a = unsafe { p.sort(py, args, nargsf, kwnames) }?;
        let req = |i: usize| a[i].as_ref().ok_or_else(|| p.missing(i));
        for i in 0..6 {
            req(i)?;
        }
        let opt = |i: usize| a[i].as_ref().filter(|o| !o.is_none());
        let arg = |i: usize, e: PyErr| pyo3::exceptions::PyTypeError::new_err(format!("argument '{}': {e}", p.names[i]));
        let int = |i: usize, d: i64| a[i].as_ref().map_or(Ok(d), |o| o.extract::<i64>().map_err(|e| arg(i, e)));
        let float = |i: usize, d: f64| a[i].as_ref().map_or(Ok(d), |o| o.extract::<f64>().map_err(|e| arg(i, e)));
        let flag = |i: usize| a[i].as_ref().map_or(Ok(false), |o| o.extract::<bool>().map_err(|e| arg(i, e)));
        let scale = opt(10).map(|o| o.extract::<f64>().map_err(|e| arg(10, e))).transpose()?;
        let window = opt(12).map(|o| o.extract::<Vec<i64>>().map_err(|e| arg(12, e))).transpose()?;
        let max_q = req(3)?.extract::<i64>().map_err(|e| arg(3, e))?;
        let max_k = req(5)?.extract::<i64>().map_err(|e| arg(5, e))?;
        flash_attn_varlen_func(
            req(0)?,
            req(1)?,
            req(2)?,
            max_q,
            req(4)?,
            max_k,
            opt(6),
            opt(7),
            opt(8),
            float(9, 0.0)?,
            scale,
            flag(11)?,
            window,
            float(13, 0.0)?,
            opt(14),
            flag(15)?,
            flag(16)?,
            opt(17),
            flag(18)?,
            opt(19),
            opt(20),
            opt(21),
            opt(22),
            opt(23),
            int(24, 0)?,
            int(25, 2)?,
            opt(26),
        )
        .map(Bound::unbind)
    })
}

/// Registers the ops in `m`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(paged_attention_v1, m)?)?;
    m.add_function(wrap_pyfunction!(paged_attention_v2, m)?)?;
    m.add_function(wrap_pyfunction!(reshape_and_cache, m)?)?;
    m.add_function(wrap_pyfunction!(reshape_and_cache_flash, m)?)?;
    m.add_function(wrap_pyfunction!(copy_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(swap_blocks, m)?)?;
    // The vectorcall entry point (vLLM passes every argument by keyword: see `crate::fastcall`).
    fastcall::add(m, c"flash_attn_varlen_func", VARLEN_DOC, varlen_fastcall)?;
    m.add_function(wrap_pyfunction!(merge_attn_states, m)?)?;
    Ok(())
}
