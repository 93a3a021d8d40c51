"""`vllm.vllm_flash_attn`'s entry points over a paged KV cache: `flash_attn_varlen_func` (with
`block_table` and `seqused_k`) and `merge_attn_states`."""

from ._native import flash_attn_varlen_func, merge_attn_states

__all__ = ["flash_attn_varlen_func", "merge_attn_states"]
