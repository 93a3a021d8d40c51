"""pagedattn: vLLM-class paged attention written in Rust, on torch tensors.

The ops keep vLLM's names and signatures, so vLLM-style code can switch by changing an import:

    from pagedattn import ops                        # instead of: from vllm import _custom_ops as ops
    from pagedattn.vllm_flash_attn import flash_attn_varlen_func

Ops take CUDA arrays without copying them (torch tensors, or objects with __cuda_array_interface__
or __dlpack__), run on torch's current CUDA stream, return without synchronizing, and can be
captured into CUDA graphs after one eager call of each shape. `check_status()` reports bad
device-side data (block ids, lengths, slots) that the kernels skipped. See _native.pyi for the
signatures and the exception classes.
"""

from ._native import (
    CudaError,
    DeviceDataError,
    DevicePlacementError,
    DTypeError,
    PagedAttnError,
    UnsupportedError,
    ValidationError,
    __version__,
    check_status,
    copy_blocks,
    flash_attn_varlen_func,
    gpu_available,
    merge_attn_states,
    paged_attention_v1,
    paged_attention_v2,
    reshape_and_cache,
    reshape_and_cache_flash,
    swap_blocks,
)
from . import ops, vllm_flash_attn

__all__ = [
    "CudaError",
    "DeviceDataError",
    "DevicePlacementError",
    "DTypeError",
    "PagedAttnError",
    "UnsupportedError",
    "ValidationError",
    "__version__",
    "check_status",
    "copy_blocks",
    "flash_attn_varlen_func",
    "gpu_available",
    "merge_attn_states",
    "ops",
    "paged_attention_v1",
    "paged_attention_v2",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "swap_blocks",
    "vllm_flash_attn",
]
