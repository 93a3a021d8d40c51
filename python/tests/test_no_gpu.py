"""Tests of the pagedattn binding that need neither a GPU nor torch (CI runs them on a CPU-only
machine with numpy and pytest; they pass unchanged on a GPU machine).

Device arrays are faked with small objects exporting `__cuda_array_interface__` at a made-up
address: every call here is wrong in exactly one way that the binding must see from the interface
alone (dtype, shape, a scalar argument, placement, an unsupported feature), so it must raise before
touching memory or launching anything, on any machine. numpy arrays stand for host memory (they
export DLPack on the CPU). One test, skipped where a GPU is present, checks that a fully valid call
with fake arrays fails with CudaError when there is no GPU.
"""

import ast
import os
import subprocess
import sys
import textwrap

import pytest

import pagedattn

EXCEPTIONS = (
    "PagedAttnError",
    "ValidationError",
    "DTypeError",
    "DevicePlacementError",
    "UnsupportedError",
    "DeviceDataError",
    "CudaError",
)
FUNCTIONS = (
    "paged_attention_v1",
    "paged_attention_v2",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "copy_blocks",
    "swap_blocks",
    "flash_attn_varlen_func",
    "merge_attn_states",
    "check_status",
    "gpu_available",
)
OPS_NAMES = (
    "paged_attention_v1",
    "paged_attention_v2",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "copy_blocks",
    "swap_blocks",
    "merge_attn_states",
)
VLLM_FLASH_ATTN_NAMES = ("flash_attn_varlen_func", "merge_attn_states")


# ---------------------------------------------------------------------------------------------
# Fake device arrays
# ---------------------------------------------------------------------------------------------

_BASE = 0x7F0000000000  # a made-up device address (256-byte aligned), never dereferenced
_next = [_BASE]


class FakeCudaArray:
    """A device array as seen through `__cuda_array_interface__` (C-contiguous, a fake pointer)."""

    def __init__(self, shape, typestr, version=3):
        ptr = _next[0]
        _next[0] += 0x10000000  # distinct, non-overlapping fake allocations
        self._cai = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False), "strides": None, "version": version}

    @property
    def __cuda_array_interface__(self):
        return self._cai

    def __repr__(self):
        return f"FakeCudaArray({self._cai['shape']}, {self._cai['typestr']!r})"


def fake(shape, typestr="<f2", version=3):
    return FakeCudaArray(shape, typestr, version)


def np_array(shape, dtype):
    np = pytest.importorskip("numpy")
    return np.full(shape, 1, dtype=dtype)


def api(name):
    """The module a call goes through: the top level (the extension's names) or a vLLM-named module."""
    import importlib

    return importlib.import_module(name)


# Valid shapes (f16): 2 sequences, 8 query heads over 2 KV heads of 64, blocks of 16 tokens, 10 blocks.
S, H, KVH, D, BS, NB, MAXB = 2, 8, 2, 64, 16, 10, 4
X = 8  # 16 bytes of f16


def paged_kwargs(version):
    kw = dict(
        out=fake((S, H, D)),
        query=fake((S, H, D)),
        key_cache=fake((NB, KVH, D // X, BS, X)),
        value_cache=fake((NB, KVH, D, BS)),
        num_kv_heads=KVH,
        scale=0.125,
        block_tables=fake((S, MAXB), "<i4"),
        seq_lens=fake((S,), "<i4"),
        block_size=BS,
        max_seq_len=MAXB * BS,
        alibi_slopes=None,
        kv_cache_dtype="auto",
        k_scale=fake((1,), "<f4"),
        v_scale=fake((1,), "<f4"),
    )
    if version == "v2":
        kw.update(exp_sum=fake((S, H, 1), "<f4"), max_logits=fake((S, H, 1), "<f4"), tmp_out=fake((S, H, 1, D)))
    return kw


def reshape_kwargs(op):
    if op == "reshape_and_cache":
        kc, vc = fake((NB, KVH, D // X, BS, X)), fake((NB, KVH, D, BS))
    else:
        kc, vc = fake((NB, BS, KVH, D)), fake((NB, BS, KVH, D))
    return dict(
        key=fake((5, KVH, D)),
        value=fake((5, KVH, D)),
        key_cache=kc,
        value_cache=vc,
        slot_mapping=fake((5,), "<i8"),
        kv_cache_dtype="auto",
        k_scale=fake((1,), "<f4"),
        v_scale=fake((1,), "<f4"),
    )


def varlen_kwargs():
    # Two sequences (4 + 1 queries), caches of 6 blocks of 16, tables of 3 blocks (48 keys).
    return dict(
        q=fake((5, H, D)),
        k=fake((6, BS, KVH, D)),
        v=fake((6, BS, KVH, D)),
        max_seqlen_q=4,
        cu_seqlens_q=fake((3,), "<i4"),
        max_seqlen_k=40,
        seqused_k=fake((2,), "<i4"),
        causal=True,
        block_table=fake((2, 3), "<i4"),
        out=fake((5, H, D)),
    )


def merge_kwargs():
    t = 7
    return dict(
        output=fake((t, H, D)),
        prefix_output=fake((t, H, D)),
        prefix_lse=fake((H, t), "<f4"),
        suffix_output=fake((t, H, D)),
        suffix_lse=fake((H, t), "<f4"),
    )


def check_error(call, cls_name, words=()):
    """`call` raises pagedattn.<cls_name>, an instance of the builtin base class the contract names,
    with one of `words` (argument names) in its message."""
    cls = getattr(pagedattn, cls_name)
    with pytest.raises(cls) as ei:
        call()
    err = ei.value
    assert isinstance(err, pagedattn.PagedAttnError)
    builtin = {
        "DTypeError": TypeError,
        "ValidationError": ValueError,
        "DevicePlacementError": ValueError,
        "UnsupportedError": NotImplementedError,
    }[cls_name]
    assert isinstance(err, builtin), f"{type(err).__name__} is not a {builtin.__name__}"
    if cls_name == "ValidationError":
        assert not isinstance(err, (pagedattn.DTypeError, pagedattn.DevicePlacementError)), (
            f"a shape/value problem reported as {type(err).__name__}: {err}"
        )
    if words:
        assert any(w in str(err) for w in words), f"message {str(err)!r} names none of {words}"
    return err


# ---------------------------------------------------------------------------------------------
# Import and names
# ---------------------------------------------------------------------------------------------


def test_top_level_exposes_the_stub_names():
    """pagedattn re-exports every function and exception class of the _native stub, and
    __version__ is a non-empty string."""
    missing = [n for n in FUNCTIONS + EXCEPTIONS + ("__version__",) if not hasattr(pagedattn, n)]
    assert not missing, f"pagedattn lacks {missing}"
    for n in FUNCTIONS:
        assert callable(getattr(pagedattn, n)), n
    assert isinstance(pagedattn.__version__, str) and pagedattn.__version__


def test_names_match_the_stub_file():
    """Every top-level def and class of _native.pyi exists in pagedattn._native and in pagedattn (the
    stub and the extension do not drift apart)."""
    import pagedattn._native as native

    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.path.join(os.path.dirname(os.path.abspath(pagedattn.__file__)), "_native.pyi"),
        os.path.join(here, os.pardir, "pagedattn", "_native.pyi"),
    ]
    path = next((p for p in candidates if os.path.exists(p)), None)
    if path is None:
        pytest.skip(f"_native.pyi not found (looked at {candidates})")
    with open(path) as f:
        tree = ast.parse(f.read())
    names = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert set(FUNCTIONS + EXCEPTIONS) <= set(names), "the stub lost names this suite tests"
    for n in names:
        assert hasattr(native, n), f"pagedattn._native lacks {n} (declared in the stub)"
        assert hasattr(pagedattn, n), f"pagedattn lacks {n} (declared in the stub)"


def test_exception_hierarchy():
    """The exception classes are the extension's own (re-exported, not copies) and subclass as the
    stub says, so `except ValueError` / `except TypeError` etc. catch them."""
    import pagedattn._native as native

    for n in EXCEPTIONS:
        assert getattr(pagedattn, n) is getattr(native, n), f"pagedattn.{n} is not pagedattn._native.{n}"
    P = pagedattn
    assert issubclass(P.PagedAttnError, Exception)
    assert issubclass(P.ValidationError, P.PagedAttnError) and issubclass(P.ValidationError, ValueError)
    assert issubclass(P.DTypeError, P.ValidationError) and issubclass(P.DTypeError, TypeError)
    assert issubclass(P.DevicePlacementError, P.ValidationError) and issubclass(P.DevicePlacementError, ValueError)
    assert issubclass(P.UnsupportedError, P.PagedAttnError) and issubclass(P.UnsupportedError, NotImplementedError)
    assert issubclass(P.DeviceDataError, P.PagedAttnError) and issubclass(P.DeviceDataError, RuntimeError)
    assert issubclass(P.CudaError, P.PagedAttnError) and issubclass(P.CudaError, RuntimeError)
    assert not issubclass(P.UnsupportedError, ValueError)
    assert not issubclass(P.CudaError, P.ValidationError)


def test_vllm_named_modules():
    """pagedattn.ops has vLLM's _custom_ops names and pagedattn.vllm_flash_attn the two
    vllm_flash_attn functions, all callable."""
    import pagedattn.ops
    import pagedattn.vllm_flash_attn

    for mod, names in ((pagedattn.ops, OPS_NAMES), (pagedattn.vllm_flash_attn, VLLM_FLASH_ATTN_NAMES)):
        for n in names:
            assert callable(getattr(mod, n, None)), f"{mod.__name__}.{n} is missing or not callable"


def test_gpu_available_returns_a_bool():
    """gpu_available() answers True or False (never raises), the same twice."""
    a, b = pagedattn.gpu_available(), pagedattn.gpu_available()
    assert type(a) is bool and a == b


def test_import_without_torch():
    """With torch made unimportable, pagedattn, pagedattn.ops and pagedattn.vllm_flash_attn import
    and gpu_available() works (a fresh interpreter)."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import pagedattn, pagedattn.ops, pagedattn.vllm_flash_attn
        assert isinstance(pagedattn.gpu_available(), bool)
        print("imported without torch")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "imported without torch" in r.stdout, f"stdout {r.stdout!r}\nstderr {r.stderr!r}"


# ---------------------------------------------------------------------------------------------
# paged_attention_v1 / v2: rejected before any launch
# ---------------------------------------------------------------------------------------------

PAGED_BAD = {
    "query-float64": (lambda kw: kw.update(query=fake((S, H, D), "<f8")), "DTypeError", ("query",)),
    "query-float64-cai-v2": (lambda kw: kw.update(query=fake((S, H, D), "<f8", version=2)), "DTypeError", ("query",)),
    "block_tables-int64": (lambda kw: kw.update(block_tables=fake((S, MAXB), "<i8")), "DTypeError", ("block_tables",)),
    "seq_lens-int64": (lambda kw: kw.update(seq_lens=fake((S,), "<i8")), "DTypeError", ("seq_lens",)),
    "query-plain-list": (lambda kw: kw.update(query=[[[0.5] * D] * H] * S), "DTypeError", ()),
    "query-2d": (lambda kw: kw.update(query=fake((S, H * D))), "ValidationError", ("query",)),
    "num_kv_heads-mismatch": (lambda kw: kw.update(num_kv_heads=4), "ValidationError", ("num_kv_heads",)),
    "block_size-mismatch": (lambda kw: kw.update(block_size=32), "ValidationError", ("block_size",)),
    "value_cache-heads": (lambda kw: kw.update(value_cache=fake((NB, 4, D, BS))), "ValidationError", ("value_cache",)),
    "alibi-length": (lambda kw: kw.update(alibi_slopes=fake((4,), "<f4")), "ValidationError", ("alibi_slopes",)),
    "block_tables-rows": (lambda kw: kw.update(block_tables=fake((S + 1, MAXB), "<i4")), "ValidationError", ("block_tables",)),
    "query-numpy": (lambda kw: kw.update(query=np_array((S, H, D), "float16")), "DevicePlacementError", ("query",)),
    "key_cache-numpy": (lambda kw: kw.update(key_cache=np_array((NB, KVH, D // X, BS, X), "float16")), "DevicePlacementError", ("key_cache",)),
    "out-numpy": (lambda kw: kw.update(out=np_array((S, H, D), "float16")), "DevicePlacementError", ("out",)),
}


@pytest.mark.parametrize("module", ("pagedattn", "pagedattn.ops"))
@pytest.mark.parametrize("version", ("v1", "v2"))
@pytest.mark.parametrize("bad", sorted(PAGED_BAD))
def test_paged_attention_rejects(module, version, bad):
    """One wrong argument among fake CUDA arrays: DTypeError for a float64 query or int64 tables
    (CAI versions 2 and 3) or a plain list, ValidationError for a 2-D query, num_kv_heads or
    block_size disagreeing with the cache, DevicePlacementError for numpy (host) arrays; the message
    names the argument."""
    kw = paged_kwargs(version)
    mutate, cls, words = PAGED_BAD[bad]
    mutate(kw)
    fn = getattr(api(module), f"paged_attention_{version}")
    check_error(lambda: fn(**kw), cls, words)


# ---------------------------------------------------------------------------------------------
# Cache ops, merge, varlen: rejected before any launch
# ---------------------------------------------------------------------------------------------

def _cache_with_4_heads(key_cache):
    """A key cache like `key_cache` (vLLM or flash layout) but with 4 KV heads instead of 2."""
    shape = key_cache.__cuda_array_interface__["shape"]
    return fake((NB, 4) + shape[2:]) if len(shape) == 5 else fake((NB, BS, 4, D))


def np_mapping():
    """A valid host block mapping: pairs (0, 1) and (2, 3)."""
    np = pytest.importorskip("numpy")
    return np.array([[0, 1], [2, 3]], dtype=np.int64)


RESHAPE_BAD = {
    "key-float64": (lambda kw: kw.update(key=fake((5, KVH, D), "<f8")), "DTypeError", ("key",)),
    "slot_mapping-int32": (lambda kw: kw.update(slot_mapping=fake((5,), "<i4")), "DTypeError", ("slot_mapping",)),
    "key-2d": (lambda kw: kw.update(key=fake((5, KVH * D))), "ValidationError", ("key",)),
    "key_cache-heads": (lambda kw: kw.update(key_cache=_cache_with_4_heads(kw["key_cache"])), "ValidationError", ("key_cache",)),
    "key-numpy": (lambda kw: kw.update(key=np_array((5, KVH, D), "float16")), "DevicePlacementError", ("key",)),
}


@pytest.mark.parametrize("module", ("pagedattn", "pagedattn.ops"))
@pytest.mark.parametrize("op", ("reshape_and_cache", "reshape_and_cache_flash"))
@pytest.mark.parametrize("bad", sorted(RESHAPE_BAD))
def test_reshape_and_cache_rejects(module, op, bad):
    """reshape_and_cache(_flash): float64 key or int32 slot_mapping (DTypeError), a 2-D key or a
    cache with other KV heads (ValidationError), a numpy key (DevicePlacementError)."""
    kw = reshape_kwargs(op)
    mutate, cls, words = RESHAPE_BAD[bad]
    mutate(kw)
    fn = getattr(api(module), op)
    check_error(lambda: fn(**kw), cls, words)


def _block_and_merge_cases():
    kc, vc = fake((NB, KVH, D // X, BS, X)), fake((NB, KVH, D, BS))
    return {
        "copy_blocks-mapping-int32": (lambda m: m.copy_blocks([kc], [vc], fake((3, 2), "<i4")), "DTypeError", ("block_mapping",)),
        "copy_blocks-layer-count": (lambda m: m.copy_blocks([kc, kc], [vc], fake((3, 2), "<i8")), "ValidationError", ("value_caches",)),
        "copy_blocks-numpy-cache": (
            lambda m: m.copy_blocks([np_array((NB, KVH, D // X, BS, X), "float16")], [vc], fake((3, 2), "<i8")),
            "DevicePlacementError",
            ("key_caches",),
        ),
        "swap_blocks-numpy-src": (
            lambda m: m.swap_blocks(np_array((NB, BS, KVH, D), "float16"), fake((NB, BS, KVH, D)), np_mapping()),
            "DevicePlacementError",
            ("src",),
        ),
        "swap_blocks-device-mapping": (
            lambda m: m.swap_blocks(fake((NB, BS, KVH, D)), fake((NB, BS, KVH, D)), fake((2, 2), "<i8")),
            "DevicePlacementError",
            ("block_mapping",),
        ),
        "swap_blocks-dtype-mismatch": (
            lambda m: m.swap_blocks(fake((NB, BS, KVH, D)), fake((NB, BS, KVH, D), "<f4"), np_mapping()),
            "DTypeError",
            ("dst",),
        ),
        "merge-prefix_output-float64": (
            lambda m: m.merge_attn_states(**dict(merge_kwargs(), prefix_output=fake((7, H, D), "<f8"))),
            "DTypeError",
            ("prefix_output",),
        ),
        "merge-prefix_lse-shape": (
            lambda m: m.merge_attn_states(**dict(merge_kwargs(), prefix_lse=fake((7, H), "<f4"))),
            "ValidationError",
            ("prefix_lse",),
        ),
        "merge-output-numpy": (
            lambda m: m.merge_attn_states(**dict(merge_kwargs(), output=np_array((7, H, D), "float16"))),
            "DevicePlacementError",
            ("output",),
        ),
    }


BLOCK_AND_MERGE_BAD = (
    "copy_blocks-mapping-int32",
    "copy_blocks-layer-count",
    "copy_blocks-numpy-cache",
    "swap_blocks-numpy-src",
    "swap_blocks-device-mapping",
    "swap_blocks-dtype-mismatch",
    "merge-prefix_output-float64",
    "merge-prefix_lse-shape",
    "merge-output-numpy",
)


@pytest.mark.parametrize("module", ("pagedattn", "pagedattn.ops"))
@pytest.mark.parametrize("bad", BLOCK_AND_MERGE_BAD)
def test_block_ops_and_merge_reject(module, bad):
    """copy_blocks (int32 mapping, layer counts, host cache), swap_blocks (pageable numpy source, a
    device mapping, dtypes differing) and merge_attn_states (float64 output, LSE shape, host output)."""
    call, cls, words = _block_and_merge_cases()[bad]
    check_error(lambda: call(api(module)), cls, words)


VARLEN_BAD = {
    "q-float32": (lambda kw: kw.update(q=fake((5, H, D), "<f4")), "DTypeError", ("q",)),
    "q-numpy": (lambda kw: kw.update(q=np_array((5, H, D), "float16")), "DevicePlacementError", ("q",)),
    "dropout": (lambda kw: kw.update(dropout_p=0.1), "UnsupportedError", ("dropout",)),
    "block_table-None": (lambda kw: kw.update(block_table=None), "UnsupportedError", ("block_table",)),
    "return_attn_probs": (lambda kw: kw.update(return_attn_probs=True), "UnsupportedError", ("attn_probs",)),
    "q_descale-float64": (lambda kw: kw.update(q_descale=fake((1, 2), "<f8")), "DTypeError", ("q_descale",)),
    "s_aux": (lambda kw: kw.update(s_aux=fake((H,), "<f4")), "UnsupportedError", ("s_aux",)),
    "q_v": (lambda kw: kw.update(q_v=fake((5, H, D))), "UnsupportedError", ("q_v",)),
    "window-below-minus-one": (lambda kw: kw.update(window_size=(-2, 0)), "ValidationError", ("window_size",)),
    "k-heads-mismatch-v": (lambda kw: kw.update(v=fake((6, BS, 4, D))), "ValidationError", ("v",)),
}


@pytest.mark.parametrize("module", ("pagedattn", "pagedattn.vllm_flash_attn"))
@pytest.mark.parametrize("bad", sorted(VARLEN_BAD))
def test_flash_attn_varlen_rejects(module, bad):
    """flash_attn_varlen_func: UnsupportedError for dropout_p > 0, block_table=None (dense
    cu_seqlens_k mode), return_attn_probs, s_aux and q_v; DTypeError for an f32 query or a float64 descale;
    ValidationError for a bad window or mismatched caches; DevicePlacementError for a numpy query."""
    kw = varlen_kwargs()
    mutate, cls, words = VARLEN_BAD[bad]
    mutate(kw)
    fn = api(module).flash_attn_varlen_func
    check_error(lambda: fn(**kw), cls, words)


# ---------------------------------------------------------------------------------------------
# Without a GPU, a valid call reaches the driver and fails with CudaError
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(pagedattn.gpu_available(), reason="a GPU is present: a valid call with fake pointers would reach it")
@pytest.mark.parametrize("call", ("paged_attention_v1", "merge_attn_states"))
def test_valid_call_without_gpu_raises_cuda_error(call):
    """Fake CUDA arrays that pass every check: with no driver or GPU the op raises CudaError (a
    RuntimeError), not a validation error and not a crash."""
    if call == "paged_attention_v1":
        kw = paged_kwargs("v1")
        run = lambda: pagedattn.paged_attention_v1(**kw)  # noqa: E731
    else:
        kw = merge_kwargs()
        run = lambda: pagedattn.merge_attn_states(**kw)  # noqa: E731
    with pytest.raises(pagedattn.CudaError) as ei:
        run()
    assert isinstance(ei.value, RuntimeError) and not isinstance(ei.value, pagedattn.ValidationError)
