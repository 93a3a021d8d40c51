"""GPU tests of the pagedattn binding: every op against the float64 torch references of conftest.py
over grids modelled on the Rust GPU tests (tests/paged_attention.rs, flash_attn.rs, cache.rs), plus
torch streams, CUDA-graph capture and replay, device-side data errors, argument validation on real
CUDA tensors and vLLM's exact call forms.

Needs torch with CUDA; every test is skipped loudly otherwise (conftest.py). Shapes are kept modest
so that the file runs in a few minutes on one H100.
"""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import (  # noqa: E402
    DTYPE_NAMES,
    FP8_FORMATS,
    FP8_MAX_CODE,
    HALF_DTYPE_NAMES,
    PARTITION_SIZE,
    TOL,
    PagedCase,
    alibi_slopes_for,
    assert_close,
    assert_lse,
    assert_same_bits,
    cache_x,
    elem_size,
    f32,
    fp8_encode,
    make_gen,
    make_paged_inputs,
    make_varlen_inputs,
    nan_full,
    rand_bytes,
    randn,
    randperm,
    ref_merge,
    ref_paged_attention,
    ref_varlen,
    tdtype,
    tol_for,
)

try:
    import torch
except ImportError:  # every test is skipped by the `cuda` marker; nothing below runs
    torch = None

import pagedattn  # noqa: E402
from pagedattn import ops, vllm_flash_attn  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("cuda")]

VERSIONS = ("v1", "v2")
# Status flags of DeviceDataError.flags (crates/layout/src/status.rs).
BAD_BLOCK_ID, BAD_SEQ_LEN, BAD_SLOT = 1 << 0, 1 << 1, 1 << 2
# torch.cuda._sleep cycles: ~0.5 s at H100 clocks, far longer than a launch.
SLEEP_CYCLES = 1_000_000_000


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def finish():
    """Waits for the GPU, then checks that no kernel flagged bad device data (valid calls never do)."""
    torch.cuda.synchronize()
    pagedattn.check_status()


def drain_status():
    """Clears flags a previous failing test may have left, so a test starts from a clean word."""
    torch.cuda.synchronize()
    try:
        pagedattn.check_status()
    except pagedattn.DeviceDataError:
        pass


def ones_scale():
    return torch.ones(1, dtype=torch.float32, device="cuda")


def v2_buffers(num_seqs, num_heads, head_size, max_seq_len, dtype):
    """vLLM's v2 scratch buffers (exp_sums, max_logits, tmp_output) for 512-token partitions."""
    parts = max(1, -(-max_seq_len // PARTITION_SIZE))
    exp_sum = torch.empty(num_seqs, num_heads, parts, dtype=torch.float32, device="cuda")
    max_logits = torch.empty(num_seqs, num_heads, parts, dtype=torch.float32, device="cuda")
    tmp_out = torch.empty(num_seqs, num_heads, parts, head_size, dtype=tdtype(dtype), device="cuda")
    return exp_sum, max_logits, tmp_out


def paged_args(inp, query=None):
    """The arguments after `out` (and v2's buffers), positionally in vLLM's order."""
    return (
        inp.query if query is None else query,
        inp.key_cache,
        inp.value_cache,
        inp.num_kv_heads,
        inp.scale,
        inp.block_tables,
        inp.seq_lens,
        inp.block_size,
        inp.max_seq_len,
        inp.alibi_slopes,
        inp.kv_cache_dtype,
        inp.k_scale,
        inp.v_scale,
    )


def run_paged(version, inp, out=None, query=None, **extra):
    """Calls ops.paged_attention_v1/v2 (positional vLLM form) into a NaN-poisoned `out`."""
    q = inp.query if query is None else query
    if out is None:
        out = nan_full(q.shape, q.dtype)
    if version == "v1":
        ret = ops.paged_attention_v1(out, *paged_args(inp, q), **extra)
    else:
        bufs = v2_buffers(q.shape[0], q.shape[1], q.shape[2], inp.max_seq_len, q.dtype)
        ret = ops.paged_attention_v2(out, *bufs, *paged_args(inp, q), **extra)
    assert ret is None, f"paged_attention_{version} returned {ret!r}; vLLM's ops return None"
    return out


def slot_list(num_tokens, num_slots, seed, pads=(5, 17)):
    """Distinct random slots for `num_tokens` tokens, with padding (-1) at the `pads` positions."""
    slots = randperm(num_slots, seed)[:num_tokens]
    for p in pads:
        if p < num_tokens:
            slots[p] = -1
    return slots


def kv_rows(rows, num_kv_heads, head_size, dtype, gen, strided, num_heads=8):
    """key, value [rows, num_kv_heads, head_size]; strided: views of a fused qkv tensor, as vLLM
    passes them (token stride (num_heads + 2·num_kv_heads)·head_size)."""
    if strided:
        qkv = randn((rows, num_heads + 2 * num_kv_heads, head_size), dtype, gen)
        return qkv[:, num_heads : num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads :]
    return randn((rows, num_kv_heads, head_size), dtype, gen), randn((rows, num_kv_heads, head_size), dtype, gen)


def vllm_cache_pair(num_blocks, num_kv_heads, head_size, block_size, dtype, gen, kv_cache_dtype="auto"):
    """Random vLLM-layout caches (fp8: random codes)."""
    x = cache_x(dtype, kv_cache_dtype)
    kshape, vshape = (num_blocks, num_kv_heads, head_size // x, block_size, x), (num_blocks, num_kv_heads, head_size, block_size)
    if kv_cache_dtype == "auto":
        return randn(kshape, dtype, gen), randn(vshape, dtype, gen)
    return rand_bytes(kshape, gen), rand_bytes(vshape, gen)


def expected_vllm_caches(key_cache, value_cache, key_rows, value_rows, slots):
    """The caches after writing row t into slot slots[t] (vLLM layout), padding skipped."""
    ek, ev = key_cache.clone(), value_cache.clone()
    _, kvh, dx, bs, x = ek.shape
    for t, s in enumerate(slots):
        if s < 0:
            continue
        b, o = divmod(s, bs)
        ek[b, :, :, o, :] = key_rows[t].reshape(kvh, dx, x)
        ev[b, :, :, o] = value_rows[t]
    return ek, ev


FLASH_LAYOUTS = ("nhd", "hnd", "kv_first", "kv_second")


def flash_bases(layout, nb, bs, kvh, d, make):
    """The allocations behind flash caches of `layout`: separate NHD or HND tensors, or one combined
    [2, nb, ...] or [nb, 2, ...] tensor."""
    if layout == "nhd":
        return [make((nb, bs, kvh, d)), make((nb, bs, kvh, d))]
    if layout == "hnd":
        return [make((nb, kvh, bs, d)), make((nb, kvh, bs, d))]
    if layout == "kv_first":
        return [make((2, nb, bs, kvh, d))]
    return [make((nb, 2, bs, kvh, d))]


def flash_views(layout, bases):
    """(key_cache, value_cache) [num_blocks, block_size, num_kv_heads, head_size] views of `bases`."""
    if layout == "nhd":
        return bases[0], bases[1]
    if layout == "hnd":
        return bases[0].permute(0, 2, 1, 3), bases[1].permute(0, 2, 1, 3)
    if layout == "kv_first":
        return bases[0][0], bases[0][1]
    return bases[0][:, 0], bases[0][:, 1]


def varlen_call(inp, out, mask=None, **kw):
    """vllm_flash_attn.flash_attn_varlen_func with vLLM's keywords over a make_varlen_inputs batch."""
    mask = mask or {}
    return vllm_flash_attn.flash_attn_varlen_func(
        q=inp.q,
        k=inp.k,
        v=inp.v,
        max_seqlen_q=inp.max_seqlen_q,
        cu_seqlens_q=inp.cu_seqlens_q,
        max_seqlen_k=inp.max_seqlen_k,
        seqused_k=inp.seqused_k,
        causal=mask.get("causal", False),
        window_size=mask.get("window_size"),
        softcap=mask.get("softcap", 0.0),
        alibi_slopes=inp.alibi_slopes,
        block_table=inp.block_table,
        out=out,
        **kw,
    )


def varlen_ref(inp, scale=None, mask=None):
    mask = mask or {}
    d = inp.q.shape[2]
    return ref_varlen(
        inp.q,
        inp.k,
        inp.v,
        inp.cu,
        [sk for _, sk in inp.seqs],
        inp.table,
        f32(1.0 / math.sqrt(d)) if scale is None else scale,
        causal=mask.get("causal", False),
        window_size=mask.get("window_size"),
        softcap=mask.get("softcap", 0.0),
        alibi_slopes=inp.alibi_slopes,
    )


# ---------------------------------------------------------------------------------------------
# paged_attention_v1 / v2
# ---------------------------------------------------------------------------------------------

RATIOS = ((8, 8), (8, 2), (16, 1), (12, 4))  # MHA, GQA-4, MQA, GQA-3


def _paged_grid():
    cases, i = [], 0
    for dtype in DTYPE_NAMES:
        for head_size in (64, 128, 256, 80):
            for block_size in (8, 16, 32):
                nh, nkv = RATIOS[i % len(RATIOS)]
                lens = [0, 1, block_size - 1, block_size + 1, 3 * block_size, 100 + (i * 37) % 400, 600 + (i * 131) % 900]
                cases.append(PagedCase(dtype, nh, nkv, head_size, block_size, lens, alibi=i % 3 == 1, seed=1000 + i))
                i += 1
    return cases


def _paged_fp8_grid():
    cases, i = [], 0
    for kv in ("fp8_e4m3", "fp8_e5m2"):
        for dtype in DTYPE_NAMES:
            for head_size, block_size in ((128, 16), (96, 8), (64, 32), (256, 16)):
                nh, nkv = RATIOS[i % len(RATIOS)]
                lens = [0, 1, block_size + 1, 3 * block_size, 200 + (i * 53) % 300, 700 + (i * 97) % 600]
                cases.append(PagedCase(dtype, nh, nkv, head_size, block_size, lens, i % 2 == 1, kv, seed=2000 + i))
                i += 1
    # vLLM's plain "fp8" is e4m3.
    cases.append(PagedCase("float16", 8, 2, 128, 16, [1, 37, 530], True, "fp8", seed=2100))
    return cases


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", _paged_grid(), ids=str)
def test_paged_attention_matches_reference(version, case):
    """v1/v2 over dtypes × head sizes (64/128/256/80) × block sizes (8/16/32), MHA/GQA/MQA, ALiBi on a
    third, lengths 0, 1, block ± 1, 3 blocks, hundreds (v2: several 512-token partitions)."""
    inp = make_paged_inputs(case)
    out = run_paged(version, inp)
    finish()
    assert_close(out, ref_paged_attention(inp), tol_for(case.dtype), f"{version} {case}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", _paged_fp8_grid(), ids=str)
def test_paged_attention_fp8_cache_matches_reference(version, case):
    """fp8 caches (uint8 codes, kv_cache_dtype fp8 / fp8_e4m3 / fp8_e5m2) dequantized as
    decode(code)·scale with k_scale/v_scale device tensors, every query dtype."""
    inp = make_paged_inputs(case)
    out = run_paged(version, inp)
    finish()
    assert_close(out, ref_paged_attention(inp), tol_for(case.dtype, case.kv_cache_dtype), f"{version} {case}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_paged_attention_zero_length_and_single_token(version, dtype):
    """A zero-length sequence gives exact zeros; a one-token sequence gives that token's value row."""
    case = PagedCase(dtype, 8, 2, 64, 16, [0, 1, 0, 37, 1], alibi=True, seed=300 + DTYPE_NAMES.index(dtype))
    inp = make_paged_inputs(case)
    out = run_paged(version, inp)
    finish()
    for s, length in enumerate(case.seq_lens):
        if length == 0:
            assert bool(torch.all(out[s] == 0)), f"{version} {case}: seq {s} (length 0) is not zeros: {out[s, 0, :4].tolist()}"
        elif length == 1:
            value_row = inp.value_cache[inp.table[s][0], :, :, 0].repeat_interleave(4, dim=0)  # [heads, head_size]
            assert_close(out[s], value_row, 1e-6, f"{version} {case}: seq {s} (one token)")
    assert_close(out, ref_paged_attention(inp), tol_for(dtype), f"{version} {case}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "dtype,kv", [("float16", "auto"), ("bfloat16", "auto"), ("float32", "auto"), ("float16", "fp8_e4m3")], ids=lambda v: str(v)
)
def test_paged_attention_long_sequences(version, dtype, kv):
    """3000+ token sequences beside a one-token and a medium one (v2: up to 9 partitions)."""
    case = PagedCase(dtype, 8, 2, 128, 16, [3500, 1, 4100, 777], alibi=dtype == "bfloat16", kv_cache_dtype=kv, seed=400)
    inp = make_paged_inputs(case)
    out = run_paged(version, inp)
    finish()
    assert_close(out, ref_paged_attention(inp), tol_for(dtype, kv), f"{version} {case}")


SPARSE_PATTERNS = [
    dict(
        tp_rank=0,
        blocksparse_local_blocks=2,
        blocksparse_vert_stride=3,
        blocksparse_block_size=32,
        blocksparse_head_sliding_step=1,
    ),
    dict(
        tp_rank=1,
        blocksparse_local_blocks=1,
        blocksparse_vert_stride=4,
        blocksparse_block_size=16,
        blocksparse_head_sliding_step=-1,
    ),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sparse", SPARSE_PATTERNS, ids=("stride3-local2-step1", "stride4-local1-step-1-rank1"))
def test_paged_attention_blocksparse(version, sparse):
    """vLLM's block-sparse pattern (vertical stride, local blocks, per-head / per-KV-head sliding
    step, tensor-parallel rank) against the reference with the pattern as a mask; the pattern must
    actually change the result (else the test would not see it ignored)."""
    alibi = sparse["tp_rank"] == 1
    case = PagedCase("float16", 8, 2, 64, 16, [1, 49, 700, 1300], alibi=alibi, seed=500 + sparse["tp_rank"])
    inp = make_paged_inputs(case)
    out = run_paged(version, inp, **sparse)
    finish()
    want = ref_paged_attention(inp, blocksparse=sparse)
    dense = ref_paged_attention(inp)
    # The two long sequences (700, 1300 tokens) lose most of their blocks to the pattern.
    change = float((want[2:] - dense[2:]).norm() / dense[2:].norm())
    assert change > 100 * TOL["float16"], f"the sparse pattern changes the reference by only {change:.2e}"
    assert_close(out, want, TOL["float16"], f"{version} {case} sparse {sparse}")


@pytest.mark.parametrize("version", VERSIONS)
def test_paged_attention_strided_query_and_output(version):
    """A query sliced out of a fused qkv tensor and an output view with padded strides (vLLM passes
    both) give the reference result; the output's padding stays NaN."""
    case = PagedCase("float16", 8, 2, 128, 16, [37, 300, 5], seed=600)
    inp = make_paged_inputs(case)
    s, h, d = 3, 8, 128
    qkv = randn((s, h + 4, d), "float16", make_gen(601))
    qkv[:, :h] = inp.query
    query = qkv[:, :h]
    out_base = nan_full((s, h + 1, d + 64), "float16")
    out = out_base[:, 1:, 32 : 32 + d]
    run_paged(version, inp, out=out, query=query)
    finish()
    assert_close(out, ref_paged_attention(inp), TOL["float16"], f"{version} strided")
    pad = torch.ones_like(out_base, dtype=torch.bool)
    pad[:, 1:, 32 : 32 + d] = False
    assert bool(torch.isnan(out_base[pad]).all()), "the output view's padding was written"


# ---------------------------------------------------------------------------------------------
# reshape_and_cache / reshape_and_cache_flash / copy_blocks / swap_blocks
# ---------------------------------------------------------------------------------------------


def _reshape_grid():
    out, i = [], 0
    for dtype in DTYPE_NAMES:
        for head_size, block_size in ((64, 16), (80, 8), (128, 32)):
            out.append(pytest.param(dtype, head_size, block_size, i % 2 == 1, id=f"{dtype}-h{head_size}-b{block_size}-{'qkv' if i % 2 else 'dense'}"))
            i += 1
    return out


@pytest.mark.parametrize("dtype,head_size,block_size,strided", _reshape_grid())
def test_reshape_and_cache_matches_reference(dtype, head_size, block_size, strided):
    """vLLM layout: token t's key/value land in slot slot_mapping[t] (bit copies), padding slots (-1)
    and key rows past slot_mapping's length are skipped, every other cache element is unchanged."""
    g = make_gen(3000 + head_size + block_size)
    kvh, nb, t = 4, 12, 37
    key, value = kv_rows(t + 3, kvh, head_size, dtype, g, strided)
    kc, vc = vllm_cache_pair(nb, kvh, head_size, block_size, dtype, g)
    slots = slot_list(t, nb * block_size, seed=head_size + block_size)
    ek, ev = expected_vllm_caches(kc, vc, key, value, slots)
    ops.reshape_and_cache(key, value, kc, vc, torch.tensor(slots, dtype=torch.int64, device="cuda"), "auto", ones_scale(), ones_scale())
    finish()
    assert_same_bits(kc, ek, "key_cache")
    assert_same_bits(vc, ev, "value_cache")


def _saturating_inputs(key, value):
    """Puts values past both formats' range (saturate) and tiny ones (subnormal or zero codes) in."""
    key[0, 0, :3] = torch.tensor([1e4, -1e4, 3e4], dtype=key.dtype, device=key.device)
    value[1, 1, :2] = torch.tensor([1e-4, 1e-6], dtype=value.dtype, device=value.device)


@pytest.mark.parametrize("kv", ("fp8", "fp8_e4m3", "fp8_e5m2"))
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_reshape_and_cache_fp8_quantizes(kv, dtype):
    """fp8 vLLM-layout caches hold encode(x / scale): torch's round-to-nearest-even conversion of the
    f32 quotient clamped to ±max (our ops saturate; torch alone would give NaN/inf), bit for bit;
    values far past the range give exactly the ±max codes."""
    g = make_gen(3100 + len(kv) + DTYPE_NAMES.index(dtype))
    kvh, d, bs, nb, t = 2, 128, 16, 8, 29
    key, value = kv_rows(t, kvh, d, dtype, g, strided=False)
    _saturating_inputs(key, value)
    ks = torch.tensor([0.05], dtype=torch.float32, device="cuda")
    vs = torch.tensor([0.03], dtype=torch.float32, device="cuda")
    kc, vc = vllm_cache_pair(nb, kvh, d, bs, dtype, g, kv)
    slots = slot_list(t, nb * bs, seed=31)
    ek, ev = expected_vllm_caches(kc, vc, fp8_encode(key, ks, kv), fp8_encode(value, vs, kv), slots)
    ops.reshape_and_cache(key, value, kc, vc, torch.tensor(slots, dtype=torch.int64, device="cuda"), kv, ks, vs)
    finish()
    assert_same_bits(kc, ek, f"{kv} key_cache")
    assert_same_bits(vc, ev, f"{kv} value_cache")
    hi, lo = FP8_MAX_CODE[FP8_FORMATS[kv]]
    b, o = divmod(slots[0], bs)
    assert kc[b, 0, 0, o, :3].tolist() == [hi, lo, hi], f"{kv}: out-of-range keys did not saturate to ±max"


def _flash_grid():
    out, i = [], 0
    for layout in FLASH_LAYOUTS:
        for dtype in DTYPE_NAMES:
            head_size, block_size = ((64, 16), (128, 32), (80, 8))[i % 3]
            out.append(pytest.param(layout, dtype, head_size, block_size, id=f"{layout}-{dtype}-h{head_size}-b{block_size}"))
            i += 1
    return out


@pytest.mark.parametrize("layout,dtype,head_size,block_size", _flash_grid())
def test_reshape_and_cache_flash_matches_reference(layout, dtype, head_size, block_size):
    """Flash layout [num_blocks, block_size, num_kv_heads, head_size]: separate NHD caches, HND caches
    passed as permuted views, and the two halves of vLLM's combined kv tensors ([2, nb, ...] and
    [nb, 2, ...]); whole allocations compared bit for bit (the other half untouched)."""
    g = make_gen(3200 + head_size + block_size)
    kvh, nb, t = 4, 10, 33
    key, value = kv_rows(t + 2, kvh, head_size, dtype, g, strided=layout == "kv_second")
    bases = flash_bases(layout, nb, block_size, kvh, head_size, lambda shp: randn(shp, dtype, g))
    kc, vc = flash_views(layout, bases)
    expected = [b.clone() for b in bases]
    ek, ev = flash_views(layout, expected)
    slots = slot_list(t, nb * block_size, seed=head_size)
    for tok, s in enumerate(slots):
        if s >= 0:
            ek[s // block_size, s % block_size] = key[tok]
            ev[s // block_size, s % block_size] = value[tok]
    ops.reshape_and_cache_flash(key, value, kc, vc, torch.tensor(slots, dtype=torch.int64, device="cuda"), "auto", ones_scale(), ones_scale())
    finish()
    for i, (got, want) in enumerate(zip(bases, expected)):
        assert_same_bits(got, want, f"{layout} allocation {i}")


@pytest.mark.parametrize("layout", ("nhd", "kv_second"))
@pytest.mark.parametrize("kv", ("fp8_e4m3", "fp8_e5m2"))
def test_reshape_and_cache_flash_fp8_quantizes(layout, kv):
    """Flash-layout fp8 caches get the saturating round-to-nearest-even codes, bit for bit."""
    dtype = "float16" if kv == "fp8_e4m3" else "bfloat16"
    g = make_gen(3300 + len(layout))
    kvh, d, bs, nb, t = 2, 128, 16, 6, 25
    key, value = kv_rows(t, kvh, d, dtype, g, strided=False)
    _saturating_inputs(key, value)
    ks = torch.tensor([0.07], dtype=torch.float32, device="cuda")
    vs = torch.tensor([0.02], dtype=torch.float32, device="cuda")
    bases = flash_bases(layout, nb, bs, kvh, d, lambda shp: rand_bytes(shp, g))
    kc, vc = flash_views(layout, bases)
    expected = [b.clone() for b in bases]
    ek, ev = flash_views(layout, expected)
    kcodes, vcodes = fp8_encode(key, ks, kv), fp8_encode(value, vs, kv)
    slots = slot_list(t, nb * bs, seed=7)
    for tok, s in enumerate(slots):
        if s >= 0:
            ek[s // bs, s % bs] = kcodes[tok]
            ev[s // bs, s % bs] = vcodes[tok]
    ops.reshape_and_cache_flash(key, value, kc, vc, torch.tensor(slots, dtype=torch.int64, device="cuda"), kv, ks, vs)
    finish()
    for i, (got, want) in enumerate(zip(bases, expected)):
        assert_same_bits(got, want, f"{kv} {layout} allocation {i}")
    hi, lo = FP8_MAX_CODE[FP8_FORMATS[kv]]
    assert kc[slots[0] // bs, slots[0] % bs, 0, :3].tolist() == [hi, lo, hi], f"{kv}: no saturation"


COPY_PAIRS = [(0, 13), (3, 15), (5, 17), (7, 19), (9, 21), (11, 11), (2, 23)]  # (11, 11): a block onto itself


@pytest.mark.parametrize("layout", ("vllm", "flash_combined"))
@pytest.mark.parametrize("dtype", ("float16", "bfloat16", "float32", "uint8"))
def test_copy_blocks_matches_reference(layout, dtype):
    """Every layer's key and value cache gets block src copied to block dst for each pair of a CUDA
    int64 [n, 2] mapping; vLLM-layout caches and kv[:, 0]/kv[:, 1] halves of combined flash caches
    (block stride twice the block); everything else unchanged, bit for bit."""
    g = make_gen(3400 + elem_size(dtype))
    layers, nb, kvh, d, bs = 3, 24, 2, 64, 16

    def make(shape):
        return rand_bytes(shape, g) if dtype == "uint8" else randn(shape, dtype, g)

    def views(bases):
        if layout == "vllm":
            return bases[:layers], bases[layers:]
        return [b[:, 0] for b in bases], [b[:, 1] for b in bases]

    if layout == "vllm":
        x = 16 // elem_size(dtype)
        bases = [make((nb, kvh, d // x, bs, x)) for _ in range(layers)] + [make((nb, kvh, d, bs)) for _ in range(layers)]
    else:
        bases = [make((nb, 2, bs, kvh, d)) for _ in range(layers)]
    keys, values = views(bases)
    expected = [b.clone() for b in bases]
    ekeys, evalues = views(expected)
    for l in range(layers):
        for s, dst in COPY_PAIRS:
            ekeys[l][dst] = keys[l][s]
            evalues[l][dst] = values[l][s]
    ret = ops.copy_blocks(keys, values, torch.tensor(COPY_PAIRS, dtype=torch.int64, device="cuda"))
    finish()
    assert ret is None
    for i, (got, want) in enumerate(zip(bases, expected)):
        assert_same_bits(got, want, f"{layout} {dtype} allocation {i}")


SWAP_RUNS = [(2, 5), (3, 6), (4, 7), (10, 0), (11, 1)]  # two runs of adjacent blocks (copy engines)
SWAP_SCATTERED = [(0, 23), (2, 20), (4, 17), (6, 14), (8, 11), (10, 8), (12, 5), (14, 2), (16, 0), (18, 22), (1, 19), (3, 16)]


def _swap_tensors(direction, gen_seed):
    """(src, dst, dst_base): d2h: device src -> one half of a combined pinned host cache; h2d: pinned
    host -> device; d2d: device -> device (different block counts)."""
    block = (16, 2, 64)
    g_dev, g_cpu = make_gen(gen_seed), make_gen(gen_seed, "cpu")

    def pinned(shape):
        return randn(shape, "float16", g_cpu, device="cpu").pin_memory()

    if direction == "d2h":
        src = randn((20,) + block, "float16", g_dev)
        dst_base = pinned((24, 2) + block)
        return src, dst_base[:, 1], dst_base
    if direction == "h2d":
        src = pinned((20,) + block)
        dst = randn((24,) + block, "float16", g_dev)
        return src, dst, dst
    src = randn((20,) + block, "float16", g_dev)
    dst = randn((24,) + block, "float16", g_dev)
    return src, dst, dst


@pytest.mark.parametrize("direction", ("d2h", "h2d", "d2d"))
@pytest.mark.parametrize("pairs", (SWAP_RUNS, SWAP_SCATTERED), ids=("runs", "scattered"))
def test_swap_blocks_matches_reference(direction, pairs):
    """Block src of `src` to block dst of `dst` for each pair of a CPU int64 mapping, between the GPU
    and pinned host memory both ways and device to device, few adjacent runs (copy engines) and
    12 scattered blocks (kernel path); after a synchronize, the destination allocation matches bit
    for bit (the other half of a combined pinned cache untouched)."""
    src, dst, dst_base = _swap_tensors(direction, 3500 + len(pairs))
    exp_base = dst_base.clone()
    exp_dst = exp_base[:, 1] if direction == "d2h" else exp_base
    for s, d in pairs:
        exp_dst[d] = src[s].to(exp_dst.device)
    ret = ops.swap_blocks(src, dst, torch.tensor(pairs, dtype=torch.int64))
    assert ret is None
    torch.cuda.synchronize()
    assert_same_bits(dst_base, exp_base, f"swap {direction}")


# ---------------------------------------------------------------------------------------------
# flash_attn_varlen_func
# ---------------------------------------------------------------------------------------------

VARLEN_BATCHES = (
    # prefill on a cached prefix, plain prefill, decode, no queries, 1 x 1, more queries than keys
    ((37, 100), (50, 50), (1, 70), (0, 5), (1, 1), (20, 12)),
    ((1, 300), (1, 17), (128, 128), (1, 1)),
    ((70, 270), (1, 900), (5, 5)),
)
VARLEN_MASKS = (
    ("full", dict(causal=False, window_size=None, softcap=0.0, alibi=False)),
    ("causal", dict(causal=True, window_size=None, softcap=0.0, alibi=False)),
    ("causal-window64", dict(causal=True, window_size=(64, -1), softcap=0.0, alibi=False)),
    ("window100,7-softcap30", dict(causal=False, window_size=(100, 7), softcap=30.0, alibi=False)),
    ("causal-softcap5-alibi", dict(causal=True, window_size=(-1, -1), softcap=5.0, alibi=True)),
    ("window30,4-softcap2-alibi", dict(causal=False, window_size=(30, 4), softcap=2.0, alibi=True)),
)
VARLEN_RATIOS = ((8, 2), (4, 4), (8, 1), (6, 3))


def _varlen_grid():
    cases, i = [], 0
    for dtype in HALF_DTYPE_NAMES:
        for head_size in (64, 96, 128, 256):
            for name, mask in VARLEN_MASKS:
                bs = (16, 32, 8, 64)[i % 4]
                heads = VARLEN_RATIOS[(i // 2) % 4]
                c = dict(dtype=dtype, head_size=head_size, block_size=bs, heads=heads, seqs=VARLEN_BATCHES[i % 3], mask=mask, seed=7000 + i)
                cases.append(pytest.param(c, id=f"{dtype}-h{head_size}-b{bs}-heads{heads[0]}/{heads[1]}-{name}-batch{i % 3}"))
                i += 1
    return cases


@pytest.mark.parametrize("c", _varlen_grid())
def test_flash_attn_varlen_matches_reference(c):
    """Mixed prefill/decode batches over a paged flash-layout cache: f16/bf16 × head sizes 64/96/128/256
    × causal, sliding windows, soft-cap, ALiBi; returns (out, lse) with out the caller's tensor and
    lse [H, total_q] f32 (natural log, -inf for rows without a visible key)."""
    m = c["mask"]
    inp = make_varlen_inputs(c["dtype"], c["heads"], c["head_size"], c["block_size"], c["seqs"], c["seed"], alibi=m["alibi"])
    out = nan_full(inp.q.shape, c["dtype"])
    res = varlen_call(inp, out, m, return_softmax_lse=True)
    finish()
    assert isinstance(res, tuple) and len(res) == 2, f"return_softmax_lse=True must give (out, lse), got {type(res)}"
    got, lse = res
    assert got.data_ptr() == out.data_ptr() and got.shape == out.shape, "the returned output is not the `out` passed in"
    total_q = inp.q.shape[0]
    assert tuple(lse.shape) == (c["heads"][0], total_q) and lse.dtype == torch.float32, f"lse {tuple(lse.shape)} {lse.dtype}"
    want, want_lse = varlen_ref(inp, mask=m)
    assert_close(out, want, TOL[c["dtype"]], f"{c}")
    assert_lse(lse, want_lse, f"{c}")


@pytest.mark.parametrize("dtype", HALF_DTYPE_NAMES)
@pytest.mark.parametrize(
    "mask", [dict(causal=True, window_size=None), dict(causal=False, window_size=(1000, 0))], ids=("causal", "window1000,0")
)
def test_flash_attn_varlen_long(dtype, mask):
    """Decode rows on 3k-4k keys, a 512-token chunk on a 2k prefix, a 700-token prefill (GQA 4:1)."""
    seqs = [(1, 4000), (512, 2560), (700, 700), (1, 3100)]
    inp = make_varlen_inputs(dtype, (4, 1), 128, 16, seqs, seed=7100)
    out = nan_full(inp.q.shape, dtype)
    _, lse = varlen_call(inp, out, mask, return_softmax_lse=True)
    finish()
    want, want_lse = varlen_ref(inp, mask=mask)
    assert_close(out, want, TOL[dtype], f"long {dtype} {mask}")
    assert_lse(lse, want_lse, f"long {dtype} {mask}")


@pytest.mark.parametrize("dtype", HALF_DTYPE_NAMES)
def test_flash_attn_varlen_rows_without_keys(dtype):
    """Causal rows before the first key, and a sequence with no keys at all, give exact zeros and an
    LSE of -inf; the other rows match the reference."""
    inp = make_varlen_inputs(dtype, (4, 2), 64, 16, [(10, 4), (3, 0), (2, 9)], seed=7200)
    out = nan_full(inp.q.shape, dtype)
    _, lse = varlen_call(inp, out, dict(causal=True), return_softmax_lse=True)
    finish()
    empty_rows = list(range(6)) + [10, 11, 12]  # d = i + 4 - 10 < 0 for i < 6; sequence 1 has no keys
    for t in empty_rows:
        assert bool(torch.all(out[t] == 0)), f"row {t} has no visible key but is not zero: {out[t, 0, :4].tolist()}"
        assert bool(torch.all(lse[:, t] == float("-inf"))), f"row {t} has no visible key but lse is {lse[:, t].tolist()}"
    want, want_lse = varlen_ref(inp, mask=dict(causal=True))
    assert_close(out, want, TOL[dtype], "rows without keys")
    assert_lse(lse, want_lse, "rows without keys")


# ---------------------------------------------------------------------------------------------
# merge_attn_states
# ---------------------------------------------------------------------------------------------


def merge_inputs(dtype, t, h, d, seed):
    """Random partial outputs with LSEs spanning about ±30, rows where one side (every 7th) or both
    sides (every 11th) are empty: LSE -inf or FlashAttention-2's +inf, output NaN (must not be read)."""
    g = make_gen(seed)
    po, so = randn((t, h, d), dtype, g), randn((t, h, d), dtype, g)
    pl, sl = randn((h, t), "float32", g, scale=10.0), randn((h, t), "float32", g, scale=10.0)
    r = torch.arange(t * h, device="cuda")
    tok, head = r % t, r // t
    both = r % 11 == 3
    one = (r % 7 == 2) & ~both
    side = (r // 7) % 2
    inf = torch.full((t * h,), float("-inf"), dtype=torch.float32, device="cuda")
    inf[r % 2 == 1] = float("inf")
    for empty, lse, o in ((both | (one & (side == 0)), pl, po), (both | (one & (side == 1)), sl, so)):
        lse[head[empty], tok[empty]] = inf[empty]
        o[tok[empty], head[empty]] = float("nan")
    return po, pl, so, sl, (tok[both].tolist(), head[both].tolist())


@pytest.mark.parametrize("shape", [(1, 1, 64), (37, 8, 128), (64, 32, 256), (300, 5, 96)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_lse", (False, True), ids=("no_output_lse", "output_lse"))
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_merge_attn_states_matches_reference(shape, with_lse, dtype):
    """The LSE-weighted merge of two partial attentions, with empty sides (-inf / +inf LSE, NaN
    output never read) and rows empty on both sides (exact 0, LSE -inf); output_lse optional."""
    t, h, d = shape
    po, pl, so, sl, (both_t, both_h) = merge_inputs(dtype, t, h, d, seed=t * 131 + h * 7 + d)
    out = nan_full((t, h, d), dtype)
    out_lse = nan_full((h, t), "float32")
    if with_lse:
        ret = ops.merge_attn_states(out, po, pl, so, sl, out_lse)
    else:
        ret = ops.merge_attn_states(out, po, pl, so, sl)
    finish()
    assert ret is None
    want, want_lse = ref_merge(po, pl, so, sl)
    for tt, hh in zip(both_t, both_h):
        assert bool(torch.all(out[tt, hh] == 0)), f"row ({tt}, {hh}) is empty on both sides but not zero"
    assert_close(out, want, TOL[dtype], f"merge {dtype} {shape}")
    if with_lse:
        assert_lse(out_lse, want_lse, f"merge lse {dtype} {shape}", tol=1e-4)
    else:
        assert bool(torch.isnan(out_lse).all()), "an output_lse that was not passed was written"


def test_merge_attn_states_in_place_over_prefix():
    """output may be prefix_output itself (documented): the merge reads before it writes."""
    po, pl, so, sl, _ = merge_inputs("bfloat16", 40, 4, 128, seed=9)
    want, _ = ref_merge(po, pl, so, sl)
    ops.merge_attn_states(po, po, pl, so, sl)
    finish()
    assert_close(po, want, TOL["bfloat16"], "in-place merge")


# ---------------------------------------------------------------------------------------------
# Streams: ops run on torch's current stream and return without synchronizing
# ---------------------------------------------------------------------------------------------


def _stream_case(op):
    """(launch, target, check): launch() enqueues `op`; `target` is a tensor only the op writes;
    check() asserts the final result."""
    g = make_gen(8000)
    if op in ("paged_attention_v1", "paged_attention_v2"):
        inp = make_paged_inputs(PagedCase("float16", 8, 2, 128, 16, [700, 33, 1], seed=8001))
        out = nan_full(inp.query.shape, "float16")
        version = op[-2:]
        return (
            lambda: run_paged(version, inp, out=out),
            out,
            lambda: assert_close(out, ref_paged_attention(inp), TOL["float16"], op),
        )
    if op == "flash_attn_varlen_func":
        inp = make_varlen_inputs("float16", (8, 2), 128, 16, [(37, 100), (1, 70)], seed=8002)
        out = nan_full(inp.q.shape, "float16")
        mask = dict(causal=True)
        return lambda: varlen_call(inp, out, mask), out, lambda: assert_close(out, varlen_ref(inp, mask=mask)[0], TOL["float16"], op)
    if op == "merge_attn_states":
        po, pl, so, sl, _ = merge_inputs("float16", 64, 8, 128, seed=8003)
        out = nan_full(po.shape, "float16")
        return (
            lambda: ops.merge_attn_states(out, po, pl, so, sl),
            out,
            lambda: assert_close(out, ref_merge(po, pl, so, sl)[0], TOL["float16"], op),
        )
    if op in ("reshape_and_cache", "reshape_and_cache_flash"):
        key, value = kv_rows(20, 2, 128, "float16", g, strided=False)
        slots = slot_list(20, 8 * 16, seed=8)
        slot_t = torch.tensor(slots, dtype=torch.int64, device="cuda")
        if op == "reshape_and_cache":
            kc, vc = vllm_cache_pair(8, 2, 128, 16, "float16", g)
            ek, _ = expected_vllm_caches(kc, vc, key, value, slots)
            target = kc
        else:
            (base,) = flash_bases("kv_second", 8, 16, 2, 128, lambda shp: randn(shp, "float16", g))
            kc, vc = flash_views("kv_second", [base])
            expected = base.clone()
            ek_view, ev_view = flash_views("kv_second", [expected])
            for tok, s in enumerate(slots):
                if s >= 0:
                    ek_view[s // 16, s % 16] = key[tok]
                    ev_view[s // 16, s % 16] = value[tok]
            target, ek = base, expected
        fn = getattr(ops, op)
        return lambda: fn(key, value, kc, vc, slot_t, "auto", ones_scale(), ones_scale()), target, lambda: assert_same_bits(target, ek, op)
    if op == "copy_blocks":
        base = randn((24, 2, 16, 2, 64), "bfloat16", g)
        expected = base.clone()
        for s, d in COPY_PAIRS:
            expected[d] = base[s]
        mapping = torch.tensor(COPY_PAIRS, dtype=torch.int64, device="cuda")
        return lambda: ops.copy_blocks([base[:, 0]], [base[:, 1]], mapping), base, lambda: assert_same_bits(base, expected, op)
    assert op == "swap_blocks"
    src, dst, _ = _swap_tensors("d2d", 8004)
    expected = dst.clone()
    for s, d in SWAP_RUNS:
        expected[d] = src[s]
    mapping = torch.tensor(SWAP_RUNS, dtype=torch.int64)
    return lambda: ops.swap_blocks(src, dst, mapping), dst, lambda: assert_same_bits(dst, expected, op)


STREAM_OPS = (
    "paged_attention_v1",
    "paged_attention_v2",
    "flash_attn_varlen_func",
    "merge_attn_states",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "copy_blocks",
    "swap_blocks",
)


@pytest.mark.parametrize("op", STREAM_OPS)
def test_op_runs_on_current_side_stream_without_synchronizing(op):
    """Under `with torch.cuda.stream(s)`, behind a long torch.cuda._sleep on s: right after the call
    s is still busy (the op did not synchronize) and the op's target is unchanged as seen from the
    default stream (the op did not run elsewhere); after s.synchronize() the result is right."""
    launch, target, check = _stream_case(op)
    initial = target.clone()
    launch()  # warm-up: the first call of a kernel family loads its module
    torch.cuda.synchronize()
    target.copy_(initial)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES)
        launch()
        busy = not s.query()
    snapshot = target.to("cpu")  # on the default stream, which does not wait for s
    s.synchronize()
    torch.cuda.current_stream().wait_stream(s)
    assert busy, f"{op}: the side stream was idle right after the call (the op synchronized it)"
    assert_same_bits(snapshot, initial.cpu(), f"{op}: target changed while the side stream slept (not on torch's current stream)")
    torch.cuda.synchronize()
    check()
    pagedattn.check_status()


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------


def _capture(step):
    """Runs `step` eagerly on a side stream (warm-up, as torch's docs and vLLM do), then captures it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return g


def test_cuda_graph_paged_attention_v1_v2_replay_with_new_inputs():
    """paged_attention_v1 and v2 captured once (max_seq_len = the tables' bound) and replayed after
    new query values and longer (or shorter) seq_lens are written in place: each replay matches the
    reference of its own inputs."""
    case = PagedCase("float16", 8, 2, 128, 16, [33, 70, 5, 600], capacity=[80, 120, 40, 1100], seed=9000)
    inp = make_paged_inputs(case)
    out1, out2 = nan_full(inp.query.shape, "float16"), nan_full(inp.query.shape, "float16")
    bufs = v2_buffers(4, 8, 128, inp.max_seq_len, "float16")
    args = paged_args(inp)

    def step():
        ops.paged_attention_v1(out1, *args)
        ops.paged_attention_v2(out2, *bufs, *args)

    graph = _capture(step)
    g = make_gen(9001)
    for lens in ([34, 71, 6, 601], [80, 120, 40, 1100], [0, 1, 17, 1024]):
        inp.query.copy_(randn(inp.query.shape, "float16", g))
        inp.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32, device="cuda"))
        out1.fill_(float("nan"))
        out2.fill_(float("nan"))
        graph.replay()
        finish()
        want = ref_paged_attention(inp)
        assert_close(out1, want, TOL["float16"], f"graph v1 lens {lens}")
        assert_close(out2, want, TOL["float16"], f"graph v2 lens {lens}")


def test_cuda_graph_v2_survives_workspace_growth_and_stream_switches():
    """v2 keeps one workspace per device: a graph captured with small sizes must still replay
    correctly after an eager call with larger sizes regrew the workspace (the old one stays
    allocated), and calls alternating between two streams must not race on it."""
    small = PagedCase("float16", 8, 2, 64, 16, [40, 300], capacity=[64, 320], seed=9200)
    big = PagedCase("float16", 8, 2, 64, 16, [3000] * 9, capacity=[3008] * 9, seed=9201)
    si, bi = make_paged_inputs(small), make_paged_inputs(big)
    s_out, b_out = nan_full(si.query.shape, "float16"), nan_full(bi.query.shape, "float16")
    s_bufs = v2_buffers(2, 8, 64, si.max_seq_len, "float16")
    b_bufs = v2_buffers(9, 8, 64, bi.max_seq_len, "float16")
    graph = _capture(lambda: ops.paged_attention_v2(s_out, *s_bufs, *paged_args(si)))
    ops.paged_attention_v2(b_out, *b_bufs, *paged_args(bi))  # grows the workspace
    s_out.fill_(float("nan"))
    graph.replay()
    finish()
    assert_close(s_out, ref_paged_attention(si), TOL["float16"], "graph replay after growth")
    assert_close(b_out, ref_paged_attention(bi), TOL["float16"], "the large eager call")
    # Two streams, each with its own outputs, sharing the workspace: the second waits for the first.
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    o1, o2 = nan_full(bi.query.shape, "float16"), nan_full(si.query.shape, "float16")
    torch.cuda.synchronize()
    with torch.cuda.stream(s1):
        torch.cuda._sleep(SLEEP_CYCLES // 4)
        ops.paged_attention_v2(o1, *b_bufs, *paged_args(bi))
    with torch.cuda.stream(s2):
        ops.paged_attention_v2(o2, *s_bufs, *paged_args(si))
    assert not s2.query(), "v2 on stream 2 did not wait for stream 1's use of the shared workspace"
    finish()
    assert_close(o1, ref_paged_attention(bi), TOL["float16"], "stream 1")
    assert_close(o2, ref_paged_attention(si), TOL["float16"], "stream 2")


def test_cuda_graph_reshape_and_varlen_decode_replays():
    """A decode step (reshape_and_cache_flash of each sequence's new token, then
    flash_attn_varlen_func with out= preallocated) captured once and replayed while the caller
    writes new queries, keys, values, slots and longer seqused_k in place (crossing block
    boundaries): the caches match bit for bit and the output matches the reference every step."""
    h, kvh, d, bs = 8, 2, 128, 16
    base_lens, cap = [15, 47, 1], [64, 96, 48]
    inp = make_varlen_inputs("bfloat16", (h, kvh), d, bs, [(1, n) for n in base_lens], seed=9100, capacity=cap)
    b = len(base_lens)
    g = make_gen(9101)
    new_k, new_v = randn((b, kvh, d), "bfloat16", g), randn((b, kvh, d), "bfloat16", g)
    slots = torch.zeros(b, dtype=torch.int64, device="cuda")
    one = ones_scale()
    out = nan_full((b, h, d), "bfloat16")
    scale = f32(1.0 / math.sqrt(d))

    def set_step(lens):
        slot = [inp.table[i][(n - 1) // bs] * bs + (n - 1) % bs for i, n in enumerate(lens)]
        slots.copy_(torch.tensor(slot, dtype=torch.int64, device="cuda"))
        inp.seqused_k.copy_(torch.tensor(lens, dtype=torch.int32, device="cuda"))
        new_k.copy_(randn((b, kvh, d), "bfloat16", g))
        new_v.copy_(randn((b, kvh, d), "bfloat16", g))
        inp.q.copy_(randn(inp.q.shape, "bfloat16", g))
        return slot

    def step():
        ops.reshape_and_cache_flash(new_k, new_v, inp.k, inp.v, slots, "auto", one, one)
        vllm_flash_attn.flash_attn_varlen_func(
            q=inp.q,
            k=inp.k,
            v=inp.v,
            max_seqlen_q=1,
            cu_seqlens_q=inp.cu_seqlens_q,
            max_seqlen_k=inp.max_seqlen_k,
            seqused_k=inp.seqused_k,
            softmax_scale=scale,
            causal=True,
            block_table=inp.block_table,
            out=out,
        )

    set_step(base_lens)
    graph = _capture(step)
    for i in range(1, 4):
        lens = [n + i for n in base_lens]
        slot = set_step(lens)
        torch.cuda.synchronize()
        ek, ev = inp.k.clone(), inp.v.clone()
        for j, s in enumerate(slot):
            ek[s // bs, s % bs] = new_k[j]
            ev[s // bs, s % bs] = new_v[j]
        out.fill_(float("nan"))
        graph.replay()
        finish()
        assert_same_bits(inp.k, ek, f"graph step {i} key cache")
        assert_same_bits(inp.v, ev, f"graph step {i} value cache")
        want, _ = ref_varlen(inp.q, ek, ev, [0, 1, 2, 3], lens, inp.table, scale, causal=True)
        assert_close(out, want, TOL["bfloat16"], f"graph step {i} lens {lens}")


# ---------------------------------------------------------------------------------------------
# Device-side data errors
# ---------------------------------------------------------------------------------------------


def _expect_flag(flag, what):
    """check_status raises DeviceDataError (a RuntimeError) with `flag` set, then a second call passes."""
    with pytest.raises(pagedattn.DeviceDataError) as ei:
        pagedattn.check_status()
    err = ei.value
    assert isinstance(err, RuntimeError) and isinstance(err, pagedattn.PagedAttnError)
    assert isinstance(err.flags, int) and err.flags & flag, f"{what}: flags {err.flags!r}, expected bit {flag:#x}"
    pagedattn.check_status()  # the flags were cleared


def _finite_or_nan(rows, what):
    assert bool(torch.isnan(rows).all()) or bool(torch.isfinite(rows).all()), f"{what}: neither all NaN nor all finite"


@pytest.mark.parametrize("version", VERSIONS)
def test_bad_device_block_id_is_flagged_then_cleared(version):
    """An out-of-range block id in a device block table: no crash, the other sequences right, the bad
    one NaN or finite; check_status raises DeviceDataError (BAD_BLOCK_ID), then passes; the next
    valid call is right."""
    drain_status()
    case = PagedCase("float16", 8, 2, 128, 16, [40, 70, 33], seed=9200)
    inp = make_paged_inputs(case)
    want = ref_paged_attention(inp)
    inp.block_tables[1, 2] = inp.num_blocks + 7
    out = run_paged(version, inp)
    torch.cuda.synchronize()  # an illegal address would surface here
    for s in (0, 2):
        assert_close(out[s], want[s], TOL["float16"], f"{version}: good sequence {s}")
    _finite_or_nan(out[1], f"{version}: bad sequence")
    _expect_flag(BAD_BLOCK_ID, version)
    inp.block_tables[1, 2] = inp.table[1][2]
    out = run_paged(version, inp)
    finish()
    assert_close(out, want, TOL["float16"], f"{version} after the error")


@pytest.mark.parametrize("version", VERSIONS)
def test_bad_device_seq_len_is_flagged(version):
    """A device seq_len past the block table's capacity: no crash, others right, BAD_SEQ_LEN."""
    drain_status()
    case = PagedCase("bfloat16", 8, 8, 64, 16, [40, 70, 33], seed=9300)
    inp = make_paged_inputs(case)
    want = ref_paged_attention(inp)
    inp.seq_lens[0] = len(inp.table[0]) * 16 + 1
    out = run_paged(version, inp)
    torch.cuda.synchronize()
    assert_close(out[1:], want[1:], TOL["bfloat16"], f"{version}: good sequences")
    _finite_or_nan(out[0], f"{version}: bad sequence")
    _expect_flag(BAD_SEQ_LEN, version)


def test_bad_device_slot_is_flagged():
    """A device slot past the cache: that token is skipped, the others written, BAD_SLOT."""
    drain_status()
    g = make_gen(9400)
    key, value = kv_rows(12, 2, 64, "float16", g, strided=False)
    (base,) = flash_bases("kv_second", 6, 16, 2, 64, lambda shp: randn(shp, "float16", g))
    kc, vc = flash_views("kv_second", [base])
    slots = slot_list(12, 6 * 16, seed=3, pads=())
    expected = base.clone()
    ek, ev = flash_views("kv_second", [expected])
    for t, s in enumerate(slots):
        if t != 4:
            ek[s // 16, s % 16] = key[t]
            ev[s // 16, s % 16] = value[t]
    slots[4] = 6 * 16 + 3
    ops.reshape_and_cache_flash(key, value, kc, vc, torch.tensor(slots, dtype=torch.int64, device="cuda"), "auto", ones_scale(), ones_scale())
    torch.cuda.synchronize()
    assert_same_bits(base, expected, "caches after a bad slot")
    _expect_flag(BAD_SLOT, "reshape_and_cache_flash")


def test_bad_device_block_id_in_varlen_is_flagged():
    """flash_attn_varlen_func with an out-of-range id in a device block table: others right,
    BAD_BLOCK_ID."""
    drain_status()
    inp = make_varlen_inputs("float16", (8, 2), 128, 16, [(40, 100), (70, 90), (1, 50)], seed=9500)
    want, _ = varlen_ref(inp)
    inp.block_table[1, 2] = inp.num_blocks + 7
    out = nan_full(inp.q.shape, "float16")
    varlen_call(inp, out)
    torch.cuda.synchronize()
    assert_close(out[:40], want[:40], TOL["float16"], "varlen sequence 0")
    assert_close(out[110:], want[110:], TOL["float16"], "varlen sequence 2")
    _finite_or_nan(out[40:110], "varlen bad sequence")
    _expect_flag(BAD_BLOCK_ID, "varlen")


def test_bad_device_block_id_in_copy_blocks_is_flagged():
    """copy_blocks with an out-of-range id in its device mapping: that pair skipped, others copied,
    BAD_BLOCK_ID."""
    drain_status()
    base = randn((8, 2, 16, 2, 64), "float16", make_gen(9600))
    expected = base.clone()
    for s, d in [(0, 5), (1, 6)]:
        expected[d] = base[s]
    mapping = torch.tensor([(0, 5), (2, 8 + 100), (1, 6)], dtype=torch.int64, device="cuda")
    ops.copy_blocks([base[:, 0]], [base[:, 1]], mapping)
    torch.cuda.synchronize()
    assert_same_bits(base, expected, "copy_blocks with a bad pair")
    _expect_flag(BAD_BLOCK_ID, "copy_blocks")


# ---------------------------------------------------------------------------------------------
# Validation on real CUDA tensors
# ---------------------------------------------------------------------------------------------


def _check_rejected(call, cls_name, words, outputs=()):
    """`call` raises pagedattn.<cls_name> (with the builtin base class the contract names), its
    message names one of `words`, and no output was written (validation happens before any launch).
    "ValidationError" means a shape/value error proper (not its DTypeError or DevicePlacementError
    subclasses); "ValidationError+" also admits a DTypeError (where either reading is fair)."""
    strict = cls_name == "ValidationError"
    expected = getattr(pagedattn, cls_name.rstrip("+"))
    with pytest.raises(expected) as ei:
        call()
    err = ei.value
    assert isinstance(err, pagedattn.PagedAttnError)
    if isinstance(err, pagedattn.DTypeError):
        assert isinstance(err, TypeError)
    if isinstance(err, (pagedattn.ValidationError, pagedattn.DevicePlacementError)):
        assert isinstance(err, ValueError)
    if isinstance(err, pagedattn.UnsupportedError):
        assert isinstance(err, NotImplementedError)
    if expected is pagedattn.ValidationError:
        assert not isinstance(err, pagedattn.DevicePlacementError), f"a shape/value problem reported as placement: {err}"
    if strict:
        assert not isinstance(err, pagedattn.DTypeError), f"a shape/value problem reported as a dtype error: {err}"
    msg = str(err)
    assert any(w in msg for w in words), f"message {msg!r} names none of {words}"
    torch.cuda.synchronize()
    for o in outputs:
        assert bool(torch.isnan(o).all()), "a rejected call wrote its output"


def _paged_kwargs(version):
    inp = make_paged_inputs(PagedCase("float16", 8, 2, 64, 16, [5, 20], seed=9700))
    kw = dict(
        out=nan_full(inp.query.shape, "float16"),
        query=inp.query,
        key_cache=inp.key_cache,
        value_cache=inp.value_cache,
        num_kv_heads=2,
        scale=inp.scale,
        block_tables=inp.block_tables,
        seq_lens=inp.seq_lens,
        block_size=16,
        max_seq_len=20,
        alibi_slopes=None,
        kv_cache_dtype="auto",
        k_scale=inp.k_scale,
        v_scale=inp.v_scale,
    )
    if version == "v2":
        e, m, t = v2_buffers(2, 8, 64, 20, "float16")
        kw.update(exp_sum=e, max_logits=m, tmp_out=t)
    return kw


PAGED_BAD = {
    "query-float64": (lambda kw: kw.update(query=kw["query"].double()), "DTypeError", ("query",)),
    "block_tables-int64": (lambda kw: kw.update(block_tables=kw["block_tables"].long()), "DTypeError", ("block_tables",)),
    "seq_lens-int64": (lambda kw: kw.update(seq_lens=kw["seq_lens"].long()), "DTypeError", ("seq_lens",)),
    "out-float32": (lambda kw: kw.update(out=kw["out"].float()), "DTypeError", ("out",)),
    "query-on-cpu": (lambda kw: kw.update(query=kw["query"].cpu()), "DevicePlacementError", ("query",)),
    "key_cache-on-cpu": (lambda kw: kw.update(key_cache=kw["key_cache"].cpu()), "DevicePlacementError", ("key_cache",)),
    "out-on-cpu": (lambda kw: kw.update(out=kw["out"].cpu()), "DevicePlacementError", ("out",)),
    "alibi-on-cpu": (lambda kw: kw.update(alibi_slopes=alibi_slopes_for(8, "cpu")), "DevicePlacementError", ("alibi_slopes",)),
    "query-2d": (lambda kw: kw.update(query=kw["query"].reshape(2, 512)), "ValidationError", ("query",)),
    "num_kv_heads-mismatch": (lambda kw: kw.update(num_kv_heads=4), "ValidationError", ("num_kv_heads",)),
    "block_size-mismatch": (lambda kw: kw.update(block_size=32), "ValidationError", ("block_size",)),
    "value_cache-heads": (
        lambda kw: kw.update(value_cache=randn((kw["value_cache"].shape[0], 4, 64, 16), "float16", make_gen(1))),
        "ValidationError",
        ("value_cache",),
    ),
    "block_tables-rows": (lambda kw: kw.update(block_tables=kw["block_tables"][:1]), "ValidationError", ("block_tables",)),
    "alibi-length": (lambda kw: kw.update(alibi_slopes=alibi_slopes_for(4)), "ValidationError", ("alibi_slopes",)),
    "out-shape": (lambda kw: kw.update(out=nan_full((2, 8, 32), "float16")), "ValidationError", ("out",)),
    "fp8-string-on-f16-cache": (lambda kw: kw.update(kv_cache_dtype="fp8"), "ValidationError+", ("key_cache", "kv_cache_dtype")),
    "uint8-cache-with-auto": (
        lambda kw: kw.update(
            key_cache=rand_bytes((kw["key_cache"].shape[0], 2, 4, 16, 16), make_gen(2)),
            value_cache=rand_bytes((kw["key_cache"].shape[0], 2, 64, 16), make_gen(3)),
        ),
        "ValidationError+",
        ("key_cache", "kv_cache_dtype"),
    ),
    "unknown-kv_cache_dtype": (lambda kw: kw.update(kv_cache_dtype="int4"), "PagedAttnError", ("kv_cache_dtype", "int4")),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("bad", sorted(PAGED_BAD))
def test_paged_attention_rejects_bad_arguments(version, bad):
    """One wrong argument at a time (CUDA tensors otherwise valid): the contract's exception class,
    the argument named in the message, nothing written."""
    kw = _paged_kwargs(version)
    mutate, cls, words = PAGED_BAD[bad]
    mutate(kw)
    fn = ops.paged_attention_v1 if version == "v1" else ops.paged_attention_v2
    outputs = [kw["out"]] if kw["out"].is_floating_point() else []
    _check_rejected(lambda: fn(**kw), cls, words, outputs)


def _reshape_kwargs(op, kv="auto"):
    g = make_gen(9800)
    key, value = kv_rows(6, 2, 64, "float16", g, strided=False)
    if op == "reshape_and_cache":
        kc, vc = vllm_cache_pair(4, 2, 64, 16, "float16", g, kv)
    else:
        mk = (lambda shp: randn(shp, "float16", g)) if kv == "auto" else (lambda shp: rand_bytes(shp, g))
        kc, vc = flash_views("nhd", flash_bases("nhd", 4, 16, 2, 64, mk))
    scale = torch.tensor([0.05], dtype=torch.float32, device="cuda")
    return dict(
        key=key,
        value=value,
        key_cache=kc,
        value_cache=vc,
        slot_mapping=torch.tensor([0, 5, -1, 17, 40, 63], dtype=torch.int64, device="cuda"),
        kv_cache_dtype=kv,
        k_scale=scale,
        v_scale=scale.clone(),
    )


RESHAPE_BAD = {
    "slot_mapping-int32": ("auto", lambda kw: kw.update(slot_mapping=kw["slot_mapping"].int()), "DTypeError", ("slot_mapping",)),
    "key-float64": ("auto", lambda kw: kw.update(key=kw["key"].double()), "DTypeError", ("key",)),
    "key-on-cpu": ("auto", lambda kw: kw.update(key=kw["key"].cpu()), "DevicePlacementError", ("key",)),
    "value-shape": ("auto", lambda kw: kw.update(value=kw["value"][:, :1]), "ValidationError", ("value",)),
    "key_cache-head_size": (
        "auto",
        lambda kw: kw.update(key_cache=kw["key_cache"][..., :32] if kw["key_cache"].dim() == 4 else kw["key_cache"][:, :, :4]),
        "ValidationError",
        ("key_cache",),
    ),
    "fp8-k_scale-on-cpu": ("fp8", lambda kw: kw.update(k_scale=kw["k_scale"].cpu()), "DevicePlacementError", ("k_scale",)),
    "fp8-k_scale-float64": ("fp8", lambda kw: kw.update(k_scale=kw["k_scale"].double()), "ValidationError+", ("k_scale",)),
}


@pytest.mark.parametrize("op", ("reshape_and_cache", "reshape_and_cache_flash"))
@pytest.mark.parametrize("bad", sorted(RESHAPE_BAD))
def test_reshape_and_cache_rejects_bad_arguments(op, bad):
    """One wrong argument at a time: the contract's exception, the argument named, caches untouched."""
    kv, mutate, cls, words = RESHAPE_BAD[bad]
    kw = _reshape_kwargs(op, kv)
    before = (kw["key_cache"].clone(), kw["value_cache"].clone())
    mutate(kw)
    _check_rejected(lambda: getattr(ops, op)(**kw), cls, words)
    assert_same_bits(kw["value_cache"], before[1], "value cache after a rejected call")


def _varlen_kwargs():
    inp = make_varlen_inputs("float16", (8, 2), 64, 16, [(5, 20), (1, 33)], seed=9900)
    return dict(
        q=inp.q,
        k=inp.k,
        v=inp.v,
        max_seqlen_q=5,
        cu_seqlens_q=inp.cu_seqlens_q,
        max_seqlen_k=33,
        seqused_k=inp.seqused_k,
        causal=True,
        block_table=inp.block_table,
        out=nan_full(inp.q.shape, "float16"),
    )


VARLEN_BAD = {
    "q-float32": (lambda kw: kw.update(q=kw["q"].float()), "DTypeError", ("q",)),
    "k-bfloat16": (lambda kw: kw.update(k=kw["k"].bfloat16()), "DTypeError", ("k",)),
    "q-on-cpu": (lambda kw: kw.update(q=kw["q"].cpu()), "DevicePlacementError", ("q",)),
    "block_table-None": (lambda kw: kw.update(block_table=None), "UnsupportedError", ("block_table",)),
    "dropout": (lambda kw: kw.update(dropout_p=0.1), "UnsupportedError", ("dropout",)),
    "return_attn_probs": (lambda kw: kw.update(return_attn_probs=True), "UnsupportedError", ("return_attn_probs", "attn_probs")),
    "s_aux": (lambda kw: kw.update(s_aux=torch.ones(8, device="cuda")), "UnsupportedError", ("s_aux",)),
    "q_descale-float64": (lambda kw: kw.update(q_descale=torch.ones(1, 2, device="cuda", dtype=torch.float64)), "DTypeError", ("q_descale",)),
    "q_v": (lambda kw: kw.update(q_v=kw["q"].clone()), "UnsupportedError", ("q_v",)),
    "window-below-minus-one": (lambda kw: kw.update(window_size=(-2, 0)), "ValidationError", ("window_size",)),
    "softcap-negative": (lambda kw: kw.update(softcap=-1.0), "ValidationError", ("softcap",)),
    "max_seqlen_k-over-table": (lambda kw: kw.update(max_seqlen_k=10_000), "ValidationError", ("max_seqlen_k",)),
    "cu_seqlens_q-int64": (lambda kw: kw.update(cu_seqlens_q=kw["cu_seqlens_q"].long()), "ValidationError+", ("cu_seqlens_q",)),
    "block_table-int64": (lambda kw: kw.update(block_table=kw["block_table"].long()), "ValidationError+", ("block_table",)),
    "heads-not-multiple": (
        lambda kw: kw.update(q=kw["q"][:, :3].contiguous(), out=nan_full((6, 3, 64), "float16")),
        "ValidationError",
        ("num_heads", "num_kv_heads", "heads"),
    ),
}


@pytest.mark.parametrize("bad", sorted(VARLEN_BAD))
def test_flash_attn_varlen_rejects_bad_arguments(bad):
    """One wrong or unsupported argument at a time: the contract's exception (UnsupportedError for
    valid vLLM features this library lacks), the argument named, `out` untouched."""
    kw = _varlen_kwargs()
    mutate, cls, words = VARLEN_BAD[bad]
    mutate(kw)
    _check_rejected(lambda: vllm_flash_attn.flash_attn_varlen_func(**kw), cls, words, [kw["out"]])


def _block_ops_cases():
    g = make_gen(9950)
    base = randn((8, 2, 16, 2, 64), "float16", g)
    mapping = torch.tensor([(0, 5), (1, 6)], dtype=torch.int64, device="cuda")
    dev_src = randn((8, 16, 2, 64), "float16", g)
    dev_dst = randn((8, 16, 2, 64), "float16", g)
    cpu_map = torch.tensor([(0, 5), (1, 6)], dtype=torch.int64)
    po, pl, so, sl, _ = merge_inputs("float16", 4, 2, 64, seed=9951)
    out = nan_full(po.shape, "float16")
    return {
        "copy_blocks-mapping-int32": (lambda: ops.copy_blocks([base[:, 0]], [base[:, 1]], mapping.int()), "DTypeError", ("block_mapping",)),
        "copy_blocks-layer-count": (lambda: ops.copy_blocks([base[:, 0], base[:, 0]], [base[:, 1]], mapping), "ValidationError", ("value_caches",)),
        "copy_blocks-cache-on-cpu": (lambda: ops.copy_blocks([base[:, 0].cpu()], [base[:, 1]], mapping), "DevicePlacementError", ("key_caches",)),
        "swap_blocks-pageable-dst": (lambda: ops.swap_blocks(dev_src, dev_dst.cpu(), cpu_map), "DevicePlacementError", ("dst",)),
        "swap_blocks-mapping-on-cuda": (lambda: ops.swap_blocks(dev_src, dev_dst, cpu_map.cuda()), "DevicePlacementError", ("block_mapping",)),
        "swap_blocks-dtype-mismatch": (lambda: ops.swap_blocks(dev_src, dev_dst.float(), cpu_map), "DTypeError", ("dst",)),
        "swap_blocks-id-out-of-range": (
            lambda: ops.swap_blocks(dev_src, dev_dst, torch.tensor([(0, 5), (1, 8)], dtype=torch.int64)),
            "ValidationError",
            ("block_mapping",),
        ),
        "merge-prefix_output-float64": (lambda: ops.merge_attn_states(out, po.double(), pl, so, sl), "DTypeError", ("prefix_output",)),
        "merge-prefix_lse-shape": (lambda: ops.merge_attn_states(out, po, pl.T.contiguous(), so, sl), "ValidationError", ("prefix_lse",)),
        "merge-output-on-cpu": (lambda: ops.merge_attn_states(out.cpu(), po, pl, so, sl), "DevicePlacementError", ("output",)),
    }, (base, dev_dst, out)


BLOCK_OPS_BAD = (
    "copy_blocks-mapping-int32",
    "copy_blocks-layer-count",
    "copy_blocks-cache-on-cpu",
    "swap_blocks-pageable-dst",
    "swap_blocks-mapping-on-cuda",
    "swap_blocks-dtype-mismatch",
    "swap_blocks-id-out-of-range",
    "merge-prefix_output-float64",
    "merge-prefix_lse-shape",
    "merge-output-on-cpu",
)


@pytest.mark.parametrize("bad", BLOCK_OPS_BAD)
def test_block_ops_and_merge_reject_bad_arguments(bad):
    """copy_blocks, swap_blocks (pageable host memory, a device mapping, ids out of range) and
    merge_attn_states: the contract's exception, the argument named, nothing written."""
    cases, (base, dev_dst, out) = _block_ops_cases()
    call, cls, words = cases[bad]
    before = (base.clone(), dev_dst.clone())
    _check_rejected(call, cls, words, [out])
    assert_same_bits(base, before[0], "copy_blocks cache after a rejected call")
    assert_same_bits(dev_dst, before[1], "swap_blocks destination after a rejected call")


# ---------------------------------------------------------------------------------------------
# vLLM call forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_paged_attention_call_forms_agree(version):
    """Positional (vLLM's order), keyword (vLLM's names, another order) and explicit defaults
    (tp_rank=0, blocksparse_local_blocks=0, blocksparse_vert_stride=0, blocksparse_block_size=64,
    blocksparse_head_sliding_step=0) give the same bits, the reference, and return None."""
    inp = make_paged_inputs(PagedCase("bfloat16", 8, 2, 128, 16, [1, 90, 700], alibi=True, seed=10000))
    outs = [nan_full(inp.query.shape, "bfloat16") for _ in range(3)]
    bufs = v2_buffers(3, 8, 128, inp.max_seq_len, "bfloat16")
    fn = ops.paged_attention_v1 if version == "v1" else ops.paged_attention_v2
    pre = lambda o: (o,) if version == "v1" else (o,) + bufs  # noqa: E731
    assert fn(*pre(outs[0]), *paged_args(inp)) is None
    named = dict(
        v_scale=inp.v_scale,
        k_scale=inp.k_scale,
        kv_cache_dtype="auto",
        alibi_slopes=inp.alibi_slopes,
        max_seq_len=inp.max_seq_len,
        block_size=16,
        seq_lens=inp.seq_lens,
        block_tables=inp.block_tables,
        scale=inp.scale,
        num_kv_heads=2,
        value_cache=inp.value_cache,
        key_cache=inp.key_cache,
        query=inp.query,
        out=outs[1],
    )
    if version == "v2":
        named.update(tmp_out=bufs[2], max_logits=bufs[1], exp_sum=bufs[0])
    assert fn(**named) is None
    defaults = dict(tp_rank=0, blocksparse_local_blocks=0, blocksparse_vert_stride=0, blocksparse_block_size=64, blocksparse_head_sliding_step=0)
    assert fn(*pre(outs[2]), *paged_args(inp), **defaults) is None
    finish()
    assert_close(outs[0], ref_paged_attention(inp), TOL["bfloat16"], f"{version} positional")
    assert_same_bits(outs[1], outs[0], "keyword form vs positional")
    assert_same_bits(outs[2], outs[0], "explicit defaults vs positional")


def test_auto_cache_ignores_scales():
    """With kv_cache_dtype "auto" the k_scale/v_scale tensors are ignored (as vLLM): attention is
    unscaled and reshape_and_cache copies bits."""
    inp = make_paged_inputs(PagedCase("float16", 8, 2, 64, 16, [50, 3], seed=10100))
    inp.k_scale.fill_(2.0)
    inp.v_scale.fill_(0.5)
    out = run_paged("v1", inp)
    finish()
    assert_close(out, ref_paged_attention(inp), TOL["float16"], "auto with scales 2.0 / 0.5")
    kw = _reshape_kwargs("reshape_and_cache_flash")
    ek, ev = kw["key_cache"].clone(), kw["value_cache"].clone()
    for t, s in enumerate(kw["slot_mapping"].tolist()):
        if s >= 0:
            ek[s // 16, s % 16] = kw["key"][t]
            ev[s // 16, s % 16] = kw["value"][t]
    kw["k_scale"].fill_(2.0)
    ops.reshape_and_cache_flash(**kw)
    finish()
    assert_same_bits(kw["key_cache"], ek, "auto flash cache with scale 2.0")
    assert_same_bits(kw["value_cache"], ev, "auto flash value cache")


@pytest.mark.parametrize("op", ("reshape_and_cache", "reshape_and_cache_flash"))
def test_reshape_call_forms_agree(op):
    """Keyword (vLLM's names) and positional (vLLM's order) calls write the same caches."""
    kw = _reshape_kwargs(op)
    fn = getattr(ops, op)
    before = (kw["key_cache"].clone(), kw["value_cache"].clone())
    assert fn(**kw) is None
    finish()
    after_kw = (kw["key_cache"].clone(), kw["value_cache"].clone())
    assert not bool(torch.equal(after_kw[0], before[0])), "the call wrote nothing"
    kw["key_cache"].copy_(before[0])
    kw["value_cache"].copy_(before[1])
    order = ("key", "value", "key_cache", "value_cache", "slot_mapping", "kv_cache_dtype", "k_scale", "v_scale")
    assert fn(*(kw[n] for n in order)) is None
    finish()
    assert_same_bits(kw["key_cache"], after_kw[0], "positional key cache")
    assert_same_bits(kw["value_cache"], after_kw[1], "positional value cache")


def test_copy_and_swap_keyword_forms():
    """copy_blocks(key_caches=, value_caches=, block_mapping=) and swap_blocks(src=, dst=,
    block_mapping=) with vLLM's names."""
    g = make_gen(10200)
    base = randn((8, 2, 16, 2, 64), "float16", g)
    expected = base.clone()
    expected[5], expected[6] = base[0].clone(), base[1].clone()
    mapping = torch.tensor([(0, 5), (1, 6)], dtype=torch.int64, device="cuda")
    assert ops.copy_blocks(key_caches=[base[:, 0]], value_caches=[base[:, 1]], block_mapping=mapping) is None
    src, dst, _ = _swap_tensors("d2d", 10201)
    exp_dst = dst.clone()
    exp_dst[3] = src[7]
    assert ops.swap_blocks(src=src, dst=dst, block_mapping=torch.tensor([(7, 3)], dtype=torch.int64)) is None
    finish()
    assert_same_bits(base, expected, "copy_blocks keyword form")
    assert_same_bits(dst, exp_dst, "swap_blocks keyword form")


def test_flash_attn_varlen_vllm_backend_call_form():
    """The keyword call of vLLM's FlashAttention backend (out=, seqused_k=, block_table=,
    scheduler_metadata=None, fa_version=2, num_splits=0, no LSE) returns `out` itself, filled with
    the reference; a positional call of the first six arguments gives the same bits."""
    inp = make_varlen_inputs("bfloat16", (8, 2), 128, 16, [(37, 100), (1, 70), (1, 1)], seed=10300)
    out = nan_full(inp.q.shape, "bfloat16")
    scale = f32(1.0 / math.sqrt(128))
    res = vllm_flash_attn.flash_attn_varlen_func(
        q=inp.q,
        k=inp.k,
        v=inp.v,
        out=out,
        cu_seqlens_q=inp.cu_seqlens_q,
        max_seqlen_q=inp.max_seqlen_q,
        seqused_k=inp.seqused_k,
        max_seqlen_k=inp.max_seqlen_k,
        softmax_scale=scale,
        causal=True,
        alibi_slopes=None,
        window_size=(-1, -1),
        block_table=inp.block_table,
        softcap=0.0,
        scheduler_metadata=None,
        fa_version=2,
        num_splits=0,
    )
    finish()
    assert not isinstance(res, tuple), "without return_softmax_lse the result is the output alone"
    assert res.data_ptr() == out.data_ptr() and res.shape == out.shape
    assert_close(out, varlen_ref(inp, scale, dict(causal=True))[0], TOL["bfloat16"], "vLLM backend call")
    out2 = nan_full(inp.q.shape, "bfloat16")
    vllm_flash_attn.flash_attn_varlen_func(
        inp.q, inp.k, inp.v, inp.max_seqlen_q, inp.cu_seqlens_q, inp.max_seqlen_k,
        seqused_k=inp.seqused_k, causal=True, block_table=inp.block_table, out=out2,
    )  # fmt: skip
    finish()
    assert_same_bits(out2, out, "positional form (default softmax_scale = 1/sqrt(head_size))")


def test_flash_attn_varlen_defaults_agree():
    """window_size None, (-1, -1) and [-1, -1] agree; softmax_scale=None is 1/sqrt(head_size);
    deterministic=True and cu_seqlens_k=None change nothing; an explicit scale is used."""
    inp = make_varlen_inputs("float16", (4, 4), 64, 32, [(20, 60), (1, 33)], seed=10400)
    outs = []
    for mask, kw in (
        (dict(window_size=None), {}),
        (dict(window_size=(-1, -1)), {}),
        (dict(window_size=[-1, -1]), {}),
        ({}, dict(softmax_scale=f32(1 / 8.0))),  # 1 / sqrt(64)
        ({}, dict(deterministic=True, cu_seqlens_k=None)),
    ):
        o = nan_full(inp.q.shape, "float16")
        varlen_call(inp, o, mask, **kw)
        outs.append(o)
    o = nan_full(inp.q.shape, "float16")
    varlen_call(inp, o, None, softmax_scale=0.3)
    finish()
    assert_close(outs[0], varlen_ref(inp)[0], TOL["float16"], "defaults")
    for i, other in enumerate(outs[1:], 1):
        assert_same_bits(other, outs[0], f"default form {i}")
    assert_close(o, varlen_ref(inp, scale=f32(0.3))[0], TOL["float16"], "softmax_scale=0.3")


def test_flash_attn_varlen_fa_version_3_accepted():
    """vLLM passes fa_version=3 on Hopper; it selects nothing here and gives the same result."""
    inp = make_varlen_inputs("float16", (8, 2), 64, 16, [(9, 40), (1, 17)], seed=10500)
    o2, o3 = nan_full(inp.q.shape, "float16"), nan_full(inp.q.shape, "float16")
    varlen_call(inp, o2, dict(causal=True), fa_version=2)
    varlen_call(inp, o3, dict(causal=True), fa_version=3)
    finish()
    assert_same_bits(o3, o2, "fa_version=3 vs 2")


def test_flash_attn_varlen_descales_ignored_for_16_bit():
    """vLLM's backend passes q/k/v_descale ([batch, num_kv_heads] float32) on every call; with 16-bit
    inputs they are ignored (as FlashAttention-3 does), so the result is bit-identical."""
    inp = make_varlen_inputs("float16", (8, 2), 64, 16, [(9, 40), (1, 17)], seed=10550)
    o1, o2 = nan_full(inp.q.shape, "float16"), nan_full(inp.q.shape, "float16")
    d = torch.full((2, 2), 3.0, device="cuda")
    varlen_call(inp, o1, dict(causal=True))
    varlen_call(inp, o2, dict(causal=True), q_descale=d, k_descale=d, v_descale=d, fa_version=3)
    finish()
    assert_same_bits(o2, o1, "with descales vs without")


def test_flash_attn_varlen_without_out_allocates():
    """out=None (the signature's default): a new tensor like q is returned, filled with the result."""
    inp = make_varlen_inputs("bfloat16", (8, 2), 64, 16, [(9, 40), (1, 17)], seed=10600)
    res = varlen_call(inp, None, dict(causal=True))
    finish()
    assert res.shape == inp.q.shape and res.dtype == inp.q.dtype and res.device == inp.q.device
    assert res.data_ptr() != inp.q.data_ptr()
    assert_close(res, varlen_ref(inp, mask=dict(causal=True))[0], TOL["bfloat16"], "allocated out")


def test_merge_attn_states_call_forms_agree():
    """Keyword names (output=, prefix_output=, prefix_lse=, suffix_output=, suffix_lse=,
    output_lse=) and pagedattn.vllm_flash_attn.merge_attn_states give the same bits as the
    positional ops call."""
    po, pl, so, sl, _ = merge_inputs("float32", 16, 4, 64, seed=10700)
    a, b, c = (nan_full(po.shape, "float32") for _ in range(3))
    la, lb = nan_full(pl.shape, "float32"), nan_full(pl.shape, "float32")
    ops.merge_attn_states(a, po, pl, so, sl, la)
    ops.merge_attn_states(output=b, prefix_output=po, prefix_lse=pl, suffix_output=so, suffix_lse=sl, output_lse=lb)
    assert vllm_flash_attn.merge_attn_states(c, po, pl, so, sl) is None
    finish()
    assert_close(a, ref_merge(po, pl, so, sl)[0], TOL["float32"], "positional merge")
    assert_same_bits(b, a, "keyword merge")
    assert_same_bits(lb, la, "keyword merge lse")
    assert_same_bits(c, a, "vllm_flash_attn.merge_attn_states")


def test_top_level_names_are_the_same_ops():
    """pagedattn.<op> computes what pagedattn.ops.<op> computes (the top level re-exports them)."""
    inp = make_paged_inputs(PagedCase("float16", 4, 4, 64, 8, [9, 30], seed=10800))
    a, b = nan_full(inp.query.shape, "float16"), nan_full(inp.query.shape, "float16")
    ops.paged_attention_v1(a, *paged_args(inp))
    pagedattn.paged_attention_v1(b, *paged_args(inp))
    finish()
    assert_same_bits(b, a, "pagedattn.paged_attention_v1 vs ops")


# ---------------------------------------------------------------------------------------------
# Arrays that are not torch tensors: __cuda_array_interface__ and DLPack producers
# ---------------------------------------------------------------------------------------------


class _CaiOnly:
    """Exposes only a torch tensor's __cuda_array_interface__ (as CuPy or Numba arrays would)."""

    def __init__(self, t):
        self._t = t  # keeps the memory alive
        self.__cuda_array_interface__ = t.__cuda_array_interface__


class _DlpackOnly:
    """Exposes only a torch tensor's DLPack protocol (__dlpack__ / __dlpack_device__)."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, stream=None):
        return self._t.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


@pytest.mark.parametrize("wrap", (_CaiOnly, _DlpackOnly), ids=("cuda_array_interface", "dlpack"))
def test_non_torch_arrays_give_the_torch_result(wrap):
    """paged_attention_v1 and reshape_and_cache_flash with every array behind only one of the
    generic protocols (the address, dtype, shape and strides read from it; the device asked of the
    driver for __cuda_array_interface__) write the same bits as with torch tensors."""
    case = PagedCase("float16", 8, 2, 64, 16, [33, 70, 5], capacity=[48, 80, 16], seed=9300)
    inp = make_paged_inputs(case)
    want, got = nan_full(inp.query.shape, "float16"), nan_full(inp.query.shape, "float16")
    args = list(paged_args(inp))
    ops.paged_attention_v1(want, *args)
    wrapped = [wrap(a) if isinstance(a, torch.Tensor) else a for a in args]
    ops.paged_attention_v1(wrap(got), *wrapped)
    finish()
    assert_same_bits(got, want, f"paged_attention_v1 through {wrap.__name__}")
    assert_close(got, ref_paged_attention(inp), TOL["float16"], "against the reference")

    g = make_gen(9301)
    key, value = randn((5, 2, 64), "float16", g), randn((5, 2, 64), "float16", g)
    slots = torch.tensor([3, 17, -1, 40, 62], dtype=torch.int64, device="cuda")
    kc_a, vc_a = nan_full((4, 16, 2, 64), "float16"), nan_full((4, 16, 2, 64), "float16")
    kc_b, vc_b = kc_a.clone(), vc_a.clone()
    one = ones_scale()
    ops.reshape_and_cache_flash(key, value, kc_a, vc_a, slots, "auto", one, one)
    ops.reshape_and_cache_flash(*(wrap(t) for t in (key, value, kc_b, vc_b, slots)), "auto", one, one)
    finish()
    assert_same_bits(kc_b, kc_a, "key cache")
    assert_same_bits(vc_b, vc_a, "value cache")
