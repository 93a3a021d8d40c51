"""Shared helpers of the pagedattn pytest suites.

- GPU gating: the `cuda` marker and the `cuda` fixture skip LOUDLY (a warning, a line on stderr and
  a banner in the terminal summary) when torch or a CUDA device is missing, so a CPU-only run
  never passes silently for a GPU run.
- float64 torch references written from the ops' definitions (not from any kernel): paged attention
  (vLLM layouts, GQA, ALiBi, fp8 dequantization, vLLM's block-sparse rule), varlen FlashAttention
  over a paged cache (bottom-right aligned masks, soft-cap, ALiBi, LSE) and `merge_attn_states`.
- random inputs (torch.randn, never exactly zero), NaN-poisoned outputs, comparison helpers that
  report both the relative L2 error and the largest absolute error, and the tolerances of the Rust
  tests (`host/src/testing.rs::tolerance`).

Nothing here imports torch at import time: `test_no_gpu.py` shares this file on machines with only
numpy and pytest.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import sys
import types
import warnings
from typing import List, Optional, Sequence, Tuple

import pytest

# ---------------------------------------------------------------------------------------------
# GPU gating (loud skips)
# ---------------------------------------------------------------------------------------------

_REASON: List[Optional[str]] = []
_SKIPPED: List[Tuple[str, int]] = []


def cuda_skip_reason() -> Optional[str]:
    """Why the GPU tests cannot run here (torch missing, or no CUDA device), or None."""
    if not _REASON:
        try:
            import torch
        except Exception as e:  # ImportError, or a broken install
            _REASON.append(f"torch is not importable ({type(e).__name__}: {e})")
        else:
            if not torch.cuda.is_available():
                _REASON.append(f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")
            else:
                _REASON.append(None)
    return _REASON[0]


def _shout(msg: str) -> None:
    print(f"\n*** WARNING: {msg} ***", file=sys.stderr)
    warnings.warn(msg, pytest.PytestWarning, stacklevel=2)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs torch and a CUDA GPU; skipped loudly when either is missing")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection, so the count is of tests that would run
def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not gpu_items:
        return
    reason = cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"GPU TEST SKIPPED: {reason}")
    for item in gpu_items:
        item.add_marker(skip)
    _SKIPPED.append((reason, len(gpu_items)))
    _shout(f"{len(gpu_items)} pagedattn GPU tests will be SKIPPED: {reason}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for reason, n in _SKIPPED:
        terminalreporter.write_sep("!", f"{n} GPU TESTS WERE SKIPPED, NOT RUN: {reason}", red=True, bold=True)


@pytest.fixture(scope="session")
def cuda():
    """The CUDA device; skips the test loudly when torch or a GPU is missing."""
    reason = cuda_skip_reason()
    if reason is not None:
        _shout(f"pagedattn GPU test SKIPPED: {reason}")
        pytest.skip(f"GPU TEST SKIPPED: {reason}")
    import torch

    return torch.device("cuda", torch.cuda.current_device())


# ---------------------------------------------------------------------------------------------
# Dtypes, tolerances, fp8
# ---------------------------------------------------------------------------------------------

DTYPE_NAMES = ("float32", "float16", "bfloat16")
HALF_DTYPE_NAMES = ("float16", "bfloat16")

# Relative-L2 bounds against the float64 reference on the rounded inputs (as the Rust tests).
TOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}
# fp8 caches: the reference decodes the very codes the kernel reads, so the only extra error is
# the kernels' f32 folding of k_scale into the query and v_scale into the output; twice the
# query dtype's bound leaves room for it.
FP8_TOL_FACTOR = 2.0
# Largest |lse - reference| (natural log) over rows with a visible key (as the Rust tests).
LSE_ABS_TOL = 1e-3

# vLLM's kv_cache_dtype strings of fp8 caches -> format ("fp8" is e4m3 on CUDA).
FP8_FORMATS = {"fp8": "e4m3", "fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}
# Largest finite value of each format (e4m3fn: no infinities).
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
# The codes of +max and -max.
FP8_MAX_CODE = {"e4m3": (0x7E, 0xFE), "e5m2": (0x7B, 0xFB)}
# A NaN code valid in both formats (spare cache blocks hold it, so a stray read shows).
FP8_NAN_CODE = 0x7F


def tdtype(name):
    """The torch dtype of a name ('float16', ...) or a torch dtype itself."""
    import torch

    return getattr(torch, name) if isinstance(name, str) else name


def dtype_name(dtype) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")


def elem_size(dtype) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}[dtype_name(dtype)]


def tol_for(dtype, kv_cache_dtype: str = "auto") -> float:
    t = TOL[dtype_name(dtype)]
    return t * FP8_TOL_FACTOR if kv_cache_dtype != "auto" else t


def cache_x(dtype, kv_cache_dtype: str = "auto") -> int:
    """vLLM's key-cache chunk: 16 bytes of the cache element (fp8: 16 codes)."""
    return 16 if kv_cache_dtype != "auto" else 16 // elem_size(dtype)


def f32(x: float) -> float:
    """x rounded to float32 (the kernels take scales as f32)."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def fp8_torch_dtype(kv_cache_dtype: str):
    import torch

    return torch.float8_e4m3fn if FP8_FORMATS[kv_cache_dtype] == "e4m3" else torch.float8_e5m2


def fp8_encode(x, scale, kv_cache_dtype: str):
    """Codes (uint8) of x / scale, rounded to nearest even and saturating at the format's largest
    finite value (our CPU reference's rule, `cvt.rn.satfinite`). torch's own conversion does not
    saturate in every version and format (e5m2 gives inf; older torch gives NaN for e4m3fn from 464
    up), so values are clamped to ±max first, which leaves every in-range rounding to torch. `scale` is a float32 tensor (an exact f32 division)."""
    import torch

    m = FP8_MAX[FP8_FORMATS[kv_cache_dtype]]
    y = x.to(torch.float32) / scale.to(device=x.device, dtype=torch.float32)
    return y.clamp(-m, m).to(fp8_torch_dtype(kv_cache_dtype)).view(torch.uint8)


def fp8_decode(codes, kv_cache_dtype: str):
    """The exact values (float64) of uint8 codes."""
    import torch

    return codes.view(fp8_torch_dtype(kv_cache_dtype)).to(torch.float32).to(torch.float64)


# ---------------------------------------------------------------------------------------------
# Random data
# ---------------------------------------------------------------------------------------------


def make_gen(seed: int, device="cuda"):
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(shape, dtype, gen, device="cuda", scale: float = 1.0):
    """torch.randn in `dtype` (via f32), never exactly zero (a zero could pass for an unwritten
    element)."""
    import torch

    x = (torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32) * scale).to(tdtype(dtype))
    return torch.where(x == 0, torch.full_like(x, 0.5), x)


def rand_bytes(shape, gen, device="cuda"):
    """Random uint8 (fp8 cache prefill for the bit-exact cache tests)."""
    import torch

    return torch.randint(0, 256, tuple(shape), generator=gen, device=device, dtype=torch.uint8)


def nan_full(shape, dtype, device="cuda"):
    """A NaN-poisoned output: any element the op fails to write stays NaN and fails the check."""
    import torch

    return torch.full(tuple(shape), float("nan"), dtype=tdtype(dtype), device=device)


def randperm(n: int, seed: int) -> List[int]:
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


def errors(got, want) -> Tuple[float, float, int]:
    """(relative L2 error, max |error|, non-finite count) of `got` against `want`; non-finite
    elements of `got` are counted and left out of the norms."""
    import torch

    g = got.detach().to(torch.float64)
    w = want.detach().to(device=g.device, dtype=torch.float64)
    assert g.shape == w.shape, f"shape {tuple(g.shape)} vs reference {tuple(w.shape)}"
    finite = torch.isfinite(g)
    non_finite = int((~finite).sum())
    d = torch.where(finite, g - w, torch.zeros_like(g))
    num = float(d.square().sum())
    den = float(w.square().sum())
    rel = math.sqrt(num / den) if den > 0 else math.sqrt(num)
    max_abs = float(d.abs().max()) if d.numel() else 0.0
    return rel, max_abs, non_finite


def assert_close(got, want, tol: float, what: str) -> Tuple[float, float]:
    """Fails unless every element of `got` is finite and its relative L2 error is within `tol`;
    the message gives both the relative L2 and the max absolute error."""
    rel, max_abs, nf = errors(got, want)
    assert nf == 0 and rel <= tol, (
        f"{what}: rel-L2 {rel:.3e} (tolerance {tol:.0e}), max |err| {max_abs:.3e}, {nf} non-finite of {got.numel()}"
    )
    return rel, max_abs


def assert_lse(got, want, what: str, tol: float = LSE_ABS_TOL) -> None:
    """LSE check: -inf exactly where the reference is -inf (rows without a visible key), finite and
    within `tol` elsewhere."""
    import torch

    g = got.detach().to(torch.float64)
    w = want.detach().to(device=g.device, dtype=torch.float64)
    assert g.shape == w.shape, f"{what}: lse shape {tuple(g.shape)} vs reference {tuple(w.shape)}"
    empty = w == float("-inf")
    wrong_empty = int((empty & (g != float("-inf"))).sum())
    bad = int((~empty & ~torch.isfinite(g)).sum())
    err = float(torch.where(empty | ~torch.isfinite(g), torch.zeros_like(g), (g - w).abs()).max()) if g.numel() else 0.0
    assert wrong_empty == 0 and bad == 0 and err <= tol, (
        f"{what}: lse max |err| {err:.3e} (tolerance {tol:.0e}), {wrong_empty} rows not -inf where no key is visible, "
        f"{bad} non-finite where keys are visible"
    )


_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def assert_same_bits(got, want, what: str) -> None:
    """Fails unless the two tensors hold the same bits element by element (NaN payloads included)."""
    import torch

    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}"
    )
    it = getattr(torch, _INT_OF_SIZE[got.element_size()])
    g = got.detach().contiguous().view(it)
    w = want.detach().to(got.device).contiguous().view(it)
    diff = (g != w).nonzero()
    assert diff.shape[0] == 0, (
        f"{what}: {diff.shape[0]} of {got.numel()} elements differ; first at {diff[:5].tolist()}: "
        f"got {[g[tuple(i)].item() for i in diff[:5].tolist()]} want {[w[tuple(i)].item() for i in diff[:5].tolist()]}"
    )


# ---------------------------------------------------------------------------------------------
# Paged attention: cases, inputs, reference
# ---------------------------------------------------------------------------------------------

PARTITION_SIZE = 512  # vLLM's v2 partition (sizes its buffers)


@dataclasses.dataclass
class PagedCase:
    """One paged-attention case: one query per sequence."""

    dtype: str
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    seq_lens: Sequence[int]
    alibi: bool = False
    kv_cache_dtype: str = "auto"
    seed: int = 0
    # Tokens each sequence's table row can hold (default: its length); graph tests grow into it.
    capacity: Optional[Sequence[int]] = None

    def __str__(self) -> str:
        lens = list(self.seq_lens) if len(self.seq_lens) <= 6 else f"{len(self.seq_lens)}seqs-max{max(self.seq_lens)}"
        kv = "" if self.kv_cache_dtype == "auto" else f"-{self.kv_cache_dtype}"
        return (
            f"{self.dtype}{kv}-h{self.head_size}-b{self.block_size}-heads{self.num_heads}/{self.num_kv_heads}"
            f"{'-alibi' if self.alibi else ''}-lens{lens}".replace(" ", "")
        )


def alibi_slopes_for(num_heads: int, device="cuda"):
    import torch

    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)], dtype=torch.float32, device=device)


def make_paged_inputs(case: PagedCase, device="cuda", k_scale: float = 0.05, v_scale: float = 0.03):
    """Random vLLM-layout inputs on the device: shuffled physical blocks, spare blocks holding NaN
    (or the fp8 NaN code) so a stray read shows, table entries past each sequence's blocks out of
    range (never to be read). fp8 caches hold the codes of randn / scale. Returns a namespace with
    the op's arguments and host copies of the tables."""
    import torch

    g = make_gen(case.seed, device)
    S, H, KVH, D, BS = len(case.seq_lens), case.num_heads, case.num_kv_heads, case.head_size, case.block_size
    cap = list(case.capacity) if case.capacity is not None else list(case.seq_lens)
    assert all(c >= l for c, l in zip(cap, case.seq_lens))
    blocks_of = [-(-c // BS) for c in cap]
    max_blocks = max(blocks_of + [1])
    num_blocks = sum(blocks_of) + 3
    perm = randperm(num_blocks, case.seed)
    table = [[num_blocks + 1000] * max_blocks for _ in range(S)]
    nxt = 0
    for s in range(S):
        for b in range(blocks_of[s]):
            table[s][b] = perm[nxt]
            nxt += 1
    spare = perm[nxt:]
    x = cache_x(case.dtype, case.kv_cache_dtype)
    kshape, vshape = (num_blocks, KVH, D // x, BS, x), (num_blocks, KVH, D, BS)
    if case.kv_cache_dtype == "auto":
        key_cache, value_cache = randn(kshape, case.dtype, g, device), randn(vshape, case.dtype, g, device)
        key_cache[spare] = float("nan")
        value_cache[spare] = float("nan")
        # vLLM always passes the scales; with "auto" they must be ignored.
        ks = torch.ones(1, dtype=torch.float32, device=device)
        vs = torch.ones(1, dtype=torch.float32, device=device)
    else:
        ks = torch.tensor([k_scale], dtype=torch.float32, device=device)
        vs = torch.tensor([v_scale], dtype=torch.float32, device=device)
        key_cache = fp8_encode(randn(kshape, "float32", g, device), ks, case.kv_cache_dtype)
        value_cache = fp8_encode(randn(vshape, "float32", g, device), vs, case.kv_cache_dtype)
        key_cache[spare] = FP8_NAN_CODE
        value_cache[spare] = FP8_NAN_CODE
    return types.SimpleNamespace(
        case=case,
        query=randn((S, H, D), case.dtype, g, device),
        key_cache=key_cache,
        value_cache=value_cache,
        num_kv_heads=KVH,
        scale=f32(1.0 / math.sqrt(D)),
        block_tables=torch.tensor(table, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(list(case.seq_lens), dtype=torch.int32, device=device),
        block_size=BS,
        max_seq_len=max(cap + [1]),
        alibi_slopes=alibi_slopes_for(H, device) if case.alibi else None,
        kv_cache_dtype=case.kv_cache_dtype,
        k_scale=ks,
        v_scale=vs,
        num_blocks=num_blocks,
        table=table,
        spare=spare,
    )


def blocksparse_mask(num_heads, num_kv_heads, seq_len, cache_block_size, sparse, device="cuda"):
    """vLLM's block-sparse pattern as a [num_heads, seq_len] bool mask (True: attended), from its
    definition: with sparse blocks of `blocksparse_block_size` tokens, token t's sparse block is that
    of its cache block's first token; head h attends it when (k_blk + offset_h) % vert_stride == 0
    (offset_h = (tp_rank·H + h)·step + 1 for step >= 0, per KV head with -step otherwise) or when
    k_blk is one of the query's `local_blocks` last sparse blocks. vert_stride <= 1 is dense."""
    import torch

    vert = sparse.get("blocksparse_vert_stride", 0)
    if vert <= 1:
        return torch.ones(num_heads, seq_len, dtype=torch.bool, device=device)
    sbs = sparse["blocksparse_block_size"]
    local = sparse["blocksparse_local_blocks"]
    step = sparse.get("blocksparse_head_sliding_step", 0)
    rank = sparse.get("tp_rank", 0)
    t = torch.arange(seq_len, device=device, dtype=torch.int64)
    k_blk = (t // cache_block_size) * cache_block_size // sbs
    q_blk = (seq_len - 1) // sbs
    h = torch.arange(num_heads, device=device, dtype=torch.int64)
    if step >= 0:
        offset = (rank * num_heads + h) * step + 1
    else:
        offset = (rank * num_kv_heads + h // (num_heads // num_kv_heads)) * (-step) + 1
    vertical = (k_blk[None, :] + offset[:, None]) % vert == 0
    local_ok = (k_blk > q_blk - local)[None, :]
    return vertical | local_ok


def ref_paged_attention(inp, query=None, seq_lens=None, table=None, blocksparse=None):
    """float64 [num_seqs, num_heads, head_size]: per sequence, its keys and values gathered through
    its block table (vLLM layouts: key_cache[b][kvh][d // x][slot][d % x], value_cache[b][kvh][d][slot]),
    fp8 codes decoded and scaled, then softmax(scale·q·Kᵀ + ALiBi) · V in float64. Zero-length
    sequences give zeros. Lengths and tables default to the inputs' device tensors' current values."""
    import torch

    q = (inp.query if query is None else query).to(torch.float64)
    S, H, D = q.shape
    kv = inp.kv_cache_dtype
    if kv == "auto":
        kc, vc = inp.key_cache.to(torch.float64), inp.value_cache.to(torch.float64)
    else:
        kc = fp8_decode(inp.key_cache, kv) * float(inp.k_scale.item())
        vc = fp8_decode(inp.value_cache, kv) * float(inp.v_scale.item())
    NB, KVH, DX, BS, X = kc.shape
    assert DX * X == D
    k_tok = kc.permute(0, 3, 1, 2, 4).reshape(NB, BS, KVH, D)  # [block, slot, kv head, dim]
    v_tok = vc.permute(0, 3, 1, 2)  # [block, slot, kv head, dim]
    group = H // KVH
    lens = inp.seq_lens.tolist() if seq_lens is None else list(seq_lens)
    rows = inp.block_tables.tolist() if table is None else table
    slopes = inp.alibi_slopes.to(torch.float64) if inp.alibi_slopes is not None else None
    out = torch.zeros(S, H, D, dtype=torch.float64, device=q.device)
    for s in range(S):
        L = lens[s]
        if L == 0:
            continue
        nb = -(-L // BS)
        ids = torch.tensor(rows[s][:nb], device=q.device, dtype=torch.int64)
        K = k_tok[ids].reshape(nb * BS, KVH, D)[:L].repeat_interleave(group, dim=1)  # [L, H, D]
        V = v_tok[ids].reshape(nb * BS, KVH, D)[:L].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[s], K) * inp.scale
        if slopes is not None:
            pos = torch.arange(L, device=q.device, dtype=torch.float64) - (L - 1)
            scores = scores + slopes[:, None] * pos[None, :]
        if blocksparse is not None:
            mask = blocksparse_mask(H, KVH, L, BS, blocksparse, q.device)
            scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out[s] = torch.einsum("hl,lhd->hd", p, V)
    return out


# ---------------------------------------------------------------------------------------------
# Varlen FlashAttention: inputs, reference
# ---------------------------------------------------------------------------------------------


def make_varlen_inputs(dtype, heads, head_size, block_size, seqs, seed, device="cuda", alibi=False, capacity=None):
    """A batch for flash_attn_varlen_func: per sequence (new queries, keys), keys including the new
    tokens, a flash-layout paged cache [num_blocks, block_size, num_kv_heads, head_size] holding every
    key in shuffled blocks (two spare blocks of NaN), unused table entries -1 (never read).
    `capacity`: tokens each table row can hold (default: its keys)."""
    import torch

    g = make_gen(seed, device)
    H, KVH = heads
    D, BS = head_size, block_size
    B = len(seqs)
    cap = list(capacity) if capacity is not None else [sk for _, sk in seqs]
    blocks_of = [-(-c // BS) for c in cap]
    max_blocks = max(blocks_of + [1])
    num_blocks = sum(blocks_of) + 2
    perm = randperm(num_blocks, seed)
    table = [[-1] * max_blocks for _ in range(B)]
    nxt = 0
    for b in range(B):
        for j in range(blocks_of[b]):
            table[b][j] = perm[nxt]
            nxt += 1
    spare = perm[nxt:]
    total_q = sum(sq for sq, _ in seqs)
    cu = [0]
    for sq, _ in seqs:
        cu.append(cu[-1] + sq)
    k = randn((num_blocks, BS, KVH, D), dtype, g, device)
    v = randn((num_blocks, BS, KVH, D), dtype, g, device)
    k[spare] = float("nan")
    v[spare] = float("nan")
    return types.SimpleNamespace(
        q=randn((total_q, H, D), dtype, g, device),
        k=k,
        v=v,
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seqused_k=torch.tensor([sk for _, sk in seqs], dtype=torch.int32, device=device),
        block_table=torch.tensor(table, dtype=torch.int32, device=device),
        max_seqlen_q=max([sq for sq, _ in seqs] + [0]),
        max_seqlen_k=max(cap + [0]),
        alibi_slopes=torch.tensor([0.5 ** (h + 1) for h in range(H)], dtype=torch.float32, device=device) if alibi else None,
        seqs=list(seqs),
        table=table,
        cu=cu,
        num_blocks=num_blocks,
    )


def ref_varlen(q, k, v, cu_seqlens_q, seqused_k, table, scale, causal=False, window_size=None, softcap=0.0, alibi_slopes=None):
    """float64 (out [total_q, H, D], lse [H, total_q]) of FlashAttention over a paged flash-layout
    cache: query i of a sequence with sq queries and sk keys sits at key position d = i + sk - sq
    (bottom-right aligned); causal keeps keys j <= d; window (left, right) keeps d - left <= j <= d +
    right (-1 unbounded; causal makes right 0); soft-cap maps s to softcap·tanh(s / softcap), then
    ALiBi subtracts slope_h·|d - j|. Rows without a visible key give 0 and lse -inf."""
    import torch

    qd = q.to(torch.float64)
    kd = k.to(torch.float64)
    vd = v.to(torch.float64)
    T, H, D = qd.shape
    _, BS, KVH, _ = kd.shape
    group = H // KVH
    left, right = (-1, -1) if window_size is None else (int(window_size[0]), int(window_size[1]))
    if causal:
        right = 0
    slopes = alibi_slopes.to(torch.float64) if alibi_slopes is not None else None
    out = torch.zeros(T, H, D, dtype=torch.float64, device=qd.device)
    lse = torch.full((H, T), float("-inf"), dtype=torch.float64, device=qd.device)
    for b in range(len(seqused_k)):
        q0, q1, sk = cu_seqlens_q[b], cu_seqlens_q[b + 1], seqused_k[b]
        sq = q1 - q0
        if sq == 0 or sk == 0:
            continue
        nb = -(-sk // BS)
        ids = torch.tensor(table[b][:nb], device=qd.device, dtype=torch.int64)
        K = kd[ids].reshape(nb * BS, KVH, D)[:sk].repeat_interleave(group, dim=1)  # [sk, H, D]
        V = vd[ids].reshape(nb * BS, KVH, D)[:sk].repeat_interleave(group, dim=1)
        s = torch.einsum("ihd,jhd->hij", qd[q0:q1], K) * scale  # [H, sq, sk]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        dpos = torch.arange(sq, device=qd.device) + (sk - sq)
        off = dpos[:, None] - torch.arange(sk, device=qd.device)[None, :]  # d - j, [sq, sk]
        if slopes is not None:
            s = s - slopes[:, None, None] * off.abs().to(torch.float64)[None]
        vis = torch.ones(sq, sk, dtype=torch.bool, device=qd.device)
        if left >= 0:
            vis &= off <= left
        if right >= 0:
            vis &= off >= -right
        s = s.masked_fill(~vis[None], float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m0 = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(s - m0)
        z = w.sum(dim=-1, keepdim=True)
        p = w / torch.where(z > 0, z, torch.ones_like(z))
        out[q0:q1] = torch.einsum("hij,jhd->ihd", p, V)
        lse[:, q0:q1] = (m0 + torch.log(z)).squeeze(-1)
    return out, lse


def ref_merge(prefix_output, prefix_lse, suffix_output, suffix_lse):
    """float64 (output [T, H, D], lse [H, T]) of merging two partial attentions: with m = max of the
    LSEs, w = exp(lse - m), out = (w_p·o_p + w_s·o_s) / (w_p + w_s), lse = m + ln(w_p + w_s). An LSE of
    +inf counts as -inf; a side of weight 0 is not read (its output may be NaN); both empty: 0, -inf."""
    import torch

    def clean(l):
        l = l.to(torch.float64)
        return torch.where(l == float("inf"), torch.full_like(l, float("-inf")), l)

    pl, sl = clean(prefix_lse), clean(suffix_lse)
    m = torch.maximum(pl, sl)
    empty = m == float("-inf")
    m0 = torch.where(empty, torch.zeros_like(m), m)
    wp, ws = torch.exp(pl - m0), torch.exp(sl - m0)
    tot = wp + ws
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m0 + torch.log(torch.where(empty, torch.ones_like(tot), tot)))
    wpT, wsT, totT = wp.T[..., None], ws.T[..., None], tot.T[..., None]  # [T, H, 1]
    po, so = prefix_output.to(torch.float64), suffix_output.to(torch.float64)
    vp = torch.where(wpT > 0, wpT * po, torch.zeros_like(po))
    vs = torch.where(wsT > 0, wsT * so, torch.zeros_like(so))
    out = torch.where(totT > 0, (vp + vs) / torch.where(totT > 0, totT, torch.ones_like(totT)), torch.zeros_like(po))
    return out, lse
