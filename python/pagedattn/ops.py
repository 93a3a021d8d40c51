"""The ops of `vllm._custom_ops` that this library implements, under the same names and signatures:
`from pagedattn import ops` stands in for `from vllm import _custom_ops as ops`."""

from ._native import (
    copy_blocks,
    merge_attn_states,
    paged_attention_v1,
    paged_attention_v2,
    reshape_and_cache,
    reshape_and_cache_flash,
    swap_blocks,
)

__all__ = [
    "copy_blocks",
    "merge_attn_states",
    "paged_attention_v1",
    "paged_attention_v2",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "swap_blocks",
]
