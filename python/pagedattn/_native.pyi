"""Type stubs of the compiled extension `pagedattn._native` (Rust, PyO3).

Every op takes CUDA arrays without copying them: torch tensors (read directly), or any object with
`__cuda_array_interface__` (version 2 or 3) or `__dlpack__`/`__dlpack_device__`. Ops are queued on
torch's current CUDA stream of the arrays' device (the legacy default stream when torch is not
imported), return without synchronizing, and can be captured into a CUDA graph once each shape has
run eagerly (the warm-up vLLM does anyway). Ops that write return None, as vLLM's do.

Argument names, order and defaults are vLLM's (`vllm._custom_ops`, `vllm.vllm_flash_attn`).

Errors (all subclasses of `PagedAttnError`):
- `DevicePlacementError` (a `ValueError`): an argument is not on the GPU where it must be (a CPU
  array such as numpy's through DLPack), or arrays sit on different devices.
- `DTypeError` (a `TypeError`): an argument's dtype is not one the op takes.
- `ValidationError` (a `ValueError`): shapes, strides, sizes, scalars or host tables are wrong.
- `UnsupportedError` (a `NotImplementedError`): a valid vLLM argument this library does not implement
  (e.g. dropout, or varlen without a block table).
- `DeviceDataError` (a `RuntimeError`): raised by `check_status` when kernels found bad device-side
  data (block ids, lengths, slots, scales) since the last check; they never read or write out of
  bounds.
- `CudaError` (a `RuntimeError`): no driver or GPU, no kernel image for the device, out of memory, a
  failed launch or driver call.
"""

from typing import Any, Optional, Sequence, Tuple, Union

__version__: str

class PagedAttnError(Exception): ...
class ValidationError(PagedAttnError, ValueError): ...
class DTypeError(ValidationError, TypeError): ...
class DevicePlacementError(ValidationError): ...
class UnsupportedError(PagedAttnError, NotImplementedError): ...
class DeviceDataError(PagedAttnError, RuntimeError):
    flags: int
class CudaError(PagedAttnError, RuntimeError): ...

Array = Any  # torch.Tensor, or an object with __cuda_array_interface__ / __dlpack__

def paged_attention_v1(
    out: Array,
    query: Array,
    key_cache: Array,
    value_cache: Array,
    num_kv_heads: int,
    scale: float,
    block_tables: Array,
    seq_lens: Array,
    block_size: int,
    max_seq_len: int,
    alibi_slopes: Optional[Array],
    kv_cache_dtype: str,
    k_scale: Array,
    v_scale: Array,
    tp_rank: int = 0,
    blocksparse_local_blocks: int = 0,
    blocksparse_vert_stride: int = 0,
    blocksparse_block_size: int = 64,
    blocksparse_head_sliding_step: int = 0,
) -> None: ...

def paged_attention_v2(
    out: Array,
    exp_sum: Array,
    max_logits: Array,
    tmp_out: Array,
    query: Array,
    key_cache: Array,
    value_cache: Array,
    num_kv_heads: int,
    scale: float,
    block_tables: Array,
    seq_lens: Array,
    block_size: int,
    max_seq_len: int,
    alibi_slopes: Optional[Array],
    kv_cache_dtype: str,
    k_scale: Array,
    v_scale: Array,
    tp_rank: int = 0,
    blocksparse_local_blocks: int = 0,
    blocksparse_vert_stride: int = 0,
    blocksparse_block_size: int = 64,
    blocksparse_head_sliding_step: int = 0,
) -> None: ...

def reshape_and_cache(
    key: Array,
    value: Array,
    key_cache: Array,
    value_cache: Array,
    slot_mapping: Array,
    kv_cache_dtype: str,
    k_scale: Array,
    v_scale: Array,
) -> None: ...

def reshape_and_cache_flash(
    key: Array,
    value: Array,
    key_cache: Array,
    value_cache: Array,
    slot_mapping: Array,
    kv_cache_dtype: str,
    k_scale: Array,
    v_scale: Array,
) -> None: ...

def copy_blocks(key_caches: Sequence[Array], value_caches: Sequence[Array], block_mapping: Array) -> None: ...

def swap_blocks(src: Array, dst: Array, block_mapping: Array) -> None: ...

def flash_attn_varlen_func(
    q: Array,
    k: Array,
    v: Array,
    max_seqlen_q: int,
    cu_seqlens_q: Array,
    max_seqlen_k: int,
    cu_seqlens_k: Optional[Array] = None,
    seqused_k: Optional[Array] = None,
    q_v: Optional[Array] = None,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Optional[Sequence[int]] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[Array] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[Array] = None,
    return_softmax_lse: bool = False,
    out: Optional[Array] = None,
    scheduler_metadata: Optional[Array] = None,
    q_descale: Optional[Array] = None,
    k_descale: Optional[Array] = None,
    v_descale: Optional[Array] = None,
    num_splits: int = 0,
    fa_version: int = 2,
    s_aux: Optional[Array] = None,
) -> Union[Array, Tuple[Array, Array]]: ...

def merge_attn_states(
    output: Array,
    prefix_output: Array,
    prefix_lse: Array,
    suffix_output: Array,
    suffix_lse: Array,
    output_lse: Optional[Array] = None,
) -> None: ...

def check_status(device: Optional[int] = None) -> None:
    """Waits for the current stream of `device` (default: torch's current device, else 0), then raises
    `DeviceDataError` if kernels flagged bad device-side data since the last check (and clears the
    flags)."""

def gpu_available() -> bool:
    """Whether the NVIDIA driver and a GPU are present (no exception)."""
