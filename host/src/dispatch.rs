//! The one place where runtime (dtype, head size, block size) becomes a compiled kernel: a table
//! expanded from the same variant list as the kernels' entry points (`pagedattn-layout`), the
//! per-dtype cache kernels' symbols, and [`kernel_variants`], every entry point of every family.

use std::sync::OnceLock;

use pagedattn_layout::{BLOCK_SIZES, DTYPES, DType, FP8_HEAD_SIZES, Fp8Kind, HEAD_SIZES, KernelFamily, KvCacheDType};

use crate::error::{Error, Result};

/// One compiled `paged_attention` variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedAttentionVariant {
    /// Query and output dtype.
    pub dtype: DType,
    /// The KV cache's element type (`auto`: the query's).
    pub cache: KvCacheDType,
    /// Head size the kernel is compiled for.
    pub head_size: usize,
    /// Cache block size (tokens) the kernel is compiled for.
    pub block_size: usize,
    /// The PTX entry point's name.
    pub symbol: &'static str,
}

/// Every compiled `paged_attention` variant.
pub fn paged_attention_variants() -> &'static [PagedAttentionVariant] {
    static TABLE: OnceLock<Vec<PagedAttentionVariant>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Vec::new();
        macro_rules! push {
            ($dt:ident, $dtn:literal, $h:literal, $b:literal) => {
                table.push(PagedAttentionVariant {
                    dtype: DType::$dt,
                    cache: KvCacheDType::Auto,
                    head_size: $h,
                    block_size: $b,
                    symbol: pagedattn_layout::paged_attention_symbol!($dtn, $h, $b),
                })
            };
        }
        pagedattn_layout::for_each_paged_attention_variant!(push);
        macro_rules! push_fp8 {
            ($dt:ident, $dtn:literal, $k:ident, $kn:literal, $h:literal, $b:literal) => {
                table.push(PagedAttentionVariant {
                    dtype: DType::$dt,
                    cache: KvCacheDType::Fp8(Fp8Kind::$k),
                    head_size: $h,
                    block_size: $b,
                    symbol: pagedattn_layout::paged_attention_fp8_symbol!($dtn, $kn, $h, $b),
                })
            };
        }
        pagedattn_layout::for_each_paged_attention_fp8_variant!(push_fp8);
        table
    })
}

impl PagedAttentionVariant {
    /// The family (PTX module) that holds it.
    pub fn family(&self) -> KernelFamily {
        if self.cache == KvCacheDType::Auto { KernelFamily::PagedAttention } else { KernelFamily::PagedAttentionFp8 }
    }
}

/// The variant for `(dtype, cache, head_size, block_size)`, or an error naming the unsupported
/// value and the supported ones.
pub fn paged_attention(dtype: DType, cache: KvCacheDType, head_size: usize, block_size: usize) -> Result<&'static PagedAttentionVariant> {
    let op = "paged_attention";
    let heads = if cache == KvCacheDType::Auto { HEAD_SIZES } else { FP8_HEAD_SIZES };
    if !heads.contains(&head_size) {
        let what = if cache == KvCacheDType::Auto { "head_size" } else { "head_size (fp8 cache)" };
        return Err(Error::Unsupported { op, what, got: head_size.to_string(), supported: format!("{heads:?}") });
    }
    if !BLOCK_SIZES.contains(&block_size) {
        return Err(Error::Unsupported { op, what: "block_size", got: block_size.to_string(), supported: format!("{BLOCK_SIZES:?}") });
    }
    paged_attention_variants()
        .iter()
        .find(|v| v.dtype == dtype && v.cache == cache && v.head_size == head_size && v.block_size == block_size)
        .ok_or_else(|| Error::Unsupported {
            op,
            what: "(dtype, kv_cache_dtype, head_size, block_size)",
            got: format!("({dtype}, {cache}, {head_size}, {block_size})"),
            supported: "see `pagedattn info`".into(),
        })
}

/// The Hopper (`wgmma`) `flash_attn_varlen` variant for `(dtype, head_size)`, if there is one
/// (`FLASH_SM90_HEAD_SIZES`): with soft-cap and ALiBi compiled in (`extras`) or without.
pub fn flash_attn_sm90(dtype: DType, head_size: usize, extras: bool) -> Option<&'static str> {
    macro_rules! arm {
        ($dt:ident, $dtn:literal, $h:literal) => {
            if dtype == DType::$dt && head_size == $h {
                return Some(if extras {
                    pagedattn_layout::flash_attn_sm90_extras_symbol!($dtn, $h)
                } else {
                    pagedattn_layout::flash_attn_sm90_symbol!($dtn, $h)
                });
            }
        };
    }
    pagedattn_layout::for_each_flash_attn_sm90_variant!(arm);
    None
}

/// The `flash_attn_varlen` variant for `(dtype, head_size)` (f16/bf16, `FLASH_HEAD_SIZES`).
pub fn flash_attn(dtype: DType, head_size: usize) -> Result<&'static str> {
    macro_rules! arm {
        ($dt:ident, $dtn:literal, $h:literal) => {
            if dtype == DType::$dt && head_size == $h {
                return Ok(pagedattn_layout::flash_attn_symbol!($dtn, $h));
            }
        };
    }
    pagedattn_layout::for_each_flash_attn_variant!(arm);
    Err(Error::Unsupported {
        op: "flash_attn_varlen_func",
        what: "(dtype, head_size) on the GPU",
        got: format!("({dtype}, {head_size})"),
        supported: format!("f16, bf16 x {:?}", pagedattn_layout::FLASH_HEAD_SIZES),
    })
}

/// The `merge_attn_states` variant for `dtype`.
pub fn merge_attn_states(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => pagedattn_layout::merge_attn_states_symbol!("f32"),
        DType::F16 => pagedattn_layout::merge_attn_states_symbol!("f16"),
        DType::BF16 => pagedattn_layout::merge_attn_states_symbol!("bf16"),
    }
}

/// The symbol of the v2 reduce kernel for `dtype`.
pub fn paged_attention_v2_reduce(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => pagedattn_layout::paged_attention_v2_reduce_symbol!("f32"),
        DType::F16 => pagedattn_layout::paged_attention_v2_reduce_symbol!("f16"),
        DType::BF16 => pagedattn_layout::paged_attention_v2_reduce_symbol!("bf16"),
    }
}

/// The symbol of `reshape_and_cache_<dtype>` (or `reshape_and_cache_flash_<dtype>` when `flash`),
/// or of the kernel that quantizes `dtype` inputs into an fp8 cache (`reshape_and_cache_f16_e4m3`).
pub fn cache_symbol(dtype: DType, cache: KvCacheDType, flash: bool) -> Result<&'static str> {
    if let KvCacheDType::Fp8(kind) = cache {
        macro_rules! arm_fp8 {
            ($dt:ident, $dtn:literal, $k:ident, $kn:literal) => {
                if dtype == DType::$dt && kind == Fp8Kind::$k {
                    return Ok(if flash {
                        pagedattn_layout::cache_fp8_symbol!("reshape_and_cache_flash", $dtn, $kn)
                    } else {
                        pagedattn_layout::cache_fp8_symbol!("reshape_and_cache", $dtn, $kn)
                    });
                }
            };
        }
        pagedattn_layout::for_each_cache_fp8!(arm_fp8);
    }
    macro_rules! arm {
        ($dt:ident, $dtn:literal) => {
            if dtype == DType::$dt && cache == KvCacheDType::Auto {
                return Ok(if flash {
                    pagedattn_layout::cache_symbol!("reshape_and_cache_flash", $dtn)
                } else {
                    pagedattn_layout::cache_symbol!("reshape_and_cache", $dtn)
                });
            }
        };
    }
    pagedattn_layout::for_each_cache_dtype!(arm);
    Err(Error::Unsupported {
        op: if flash { "reshape_and_cache_flash" } else { "reshape_and_cache" },
        what: "(dtype, kv_cache_dtype)",
        got: format!("({dtype}, {cache})"),
        supported: "f32, f16, bf16 inputs; auto, fp8_e4m3, fp8_e5m2 caches".into(),
    })
}

/// Symbol of the util family's random fill for a float dtype (`fill_uniform_f16`).
pub fn fill_uniform_symbol(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "fill_uniform_f32",
        DType::F16 => "fill_uniform_f16",
        DType::BF16 => "fill_uniform_bf16",
    }
}

/// Symbol of the util family's random fill of fp8 e4m3 codes.
pub const FILL_UNIFORM_E4M3: &str = "fill_uniform_e4m3";
/// Symbol of the util family's random fill of fp8 e5m2 codes.
pub const FILL_UNIFORM_E5M2: &str = "fill_uniform_e5m2";

/// Symbol of the util family's read-only streaming pass.
pub const STREAM_READ: &str = "stream_read";

/// Symbol of the fp8 conversion test kernel (util family).
pub const FP8_CODEC: &str = "fp8_codec";

/// Symbol of the tensor-core fragment test kernel (util family).
pub const MMA_PROBE: &str = "mma_probe";

/// Symbol of `copy_blocks` (one variant: it moves bytes, whatever the dtype).
pub const COPY_BLOCKS: &str = "copy_blocks";

/// Symbol of `swap_blocks`' kernel path (one variant: bytes).
pub const SWAP_BLOCKS: &str = "swap_blocks";

/// One compiled kernel entry point of any family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelVariant {
    /// The family (PTX module) that holds it.
    pub family: KernelFamily,
    /// The kernel (op) the entry point belongs to: `paged_attention`, `paged_attention_v2_reduce`,
    /// `flash_attn_varlen`, `merge_attn_states`, `reshape_and_cache`, `reshape_and_cache_flash`,
    /// `copy_blocks`, `swap_blocks`, `fill_uniform`, `stream_read`, `fp8_codec` or `mma_probe`.
    pub kernel: &'static str,
    /// `None` for kernels that move bytes or words whatever the dtype.
    pub dtype: Option<DType>,
    /// The KV cache's element type (`auto` for kernels without a cache or with the dtype's own).
    pub cache: KvCacheDType,
    /// The head size it is compiled for; `None` for kernels that take any.
    pub head_size: Option<usize>,
    /// The cache block size it is compiled for; `None` for kernels that take any.
    pub block_size: Option<usize>,
    /// The PTX entry point's name.
    pub symbol: &'static str,
}

/// Every compiled entry point of every family, in family order (the same lists that generate the
/// kernels' entry points; a test checks them against the embedded PTX).
pub fn kernel_variants() -> &'static [KernelVariant] {
    static TABLE: OnceLock<Vec<KernelVariant>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let of = |family, kernel, dtype: Option<DType>, symbol| KernelVariant {
            family,
            kernel,
            dtype,
            cache: KvCacheDType::Auto,
            head_size: None,
            block_size: None,
            symbol,
        };
        let mut table: Vec<KernelVariant> = paged_attention_variants()
            .iter()
            .map(|v| KernelVariant {
                family: v.family(),
                kernel: "paged_attention",
                dtype: Some(v.dtype),
                cache: v.cache,
                head_size: Some(v.head_size),
                block_size: Some(v.block_size),
                symbol: v.symbol,
            })
            .collect();
        macro_rules! push_flash {
            ($dt:ident, $dtn:literal, $h:literal) => {
                table.push(KernelVariant {
                    head_size: Some($h),
                    ..of(KernelFamily::FlashAttn, "flash_attn_varlen", Some(DType::$dt), pagedattn_layout::flash_attn_symbol!($dtn, $h))
                });
            };
        }
        pagedattn_layout::for_each_flash_attn_variant!(push_flash);
        macro_rules! push_flash_sm90 {
            ($dt:ident, $dtn:literal, $h:literal) => {
                for symbol in
                    [pagedattn_layout::flash_attn_sm90_symbol!($dtn, $h), pagedattn_layout::flash_attn_sm90_extras_symbol!($dtn, $h)]
                {
                    table.push(KernelVariant {
                        head_size: Some($h),
                        ..of(KernelFamily::FlashAttnSm90, "flash_attn_varlen", Some(DType::$dt), symbol)
                    });
                }
            };
        }
        pagedattn_layout::for_each_flash_attn_sm90_variant!(push_flash_sm90);
        for &d in DTYPES {
            table.push(of(KernelFamily::FlashAttn, "merge_attn_states", Some(d), merge_attn_states(d)));
        }
        for family in [KernelFamily::PagedAttention, KernelFamily::PagedAttentionFp8] {
            for &d in DTYPES {
                table.push(of(family, "paged_attention_v2_reduce", Some(d), paged_attention_v2_reduce(d)));
            }
        }
        for flash in [false, true] {
            let kernel = if flash { "reshape_and_cache_flash" } else { "reshape_and_cache" };
            for cache in KvCacheDType::ALL {
                for &d in DTYPES {
                    if let Ok(symbol) = cache_symbol(d, cache, flash) {
                        table.push(KernelVariant { cache, ..of(KernelFamily::Cache, kernel, Some(d), symbol) });
                    }
                }
            }
        }
        table.push(of(KernelFamily::Cache, "copy_blocks", None, COPY_BLOCKS));
        table.push(of(KernelFamily::Cache, "swap_blocks", None, SWAP_BLOCKS));
        for &d in DTYPES {
            table.push(of(KernelFamily::Util, "fill_uniform", Some(d), fill_uniform_symbol(d)));
        }
        for (kind, symbol) in [(Fp8Kind::E4m3, FILL_UNIFORM_E4M3), (Fp8Kind::E5m2, FILL_UNIFORM_E5M2)] {
            table.push(KernelVariant { cache: KvCacheDType::Fp8(kind), ..of(KernelFamily::Util, "fill_uniform", None, symbol) });
        }
        table.push(of(KernelFamily::Util, "stream_read", None, STREAM_READ));
        table.push(of(KernelFamily::Util, "fp8_codec", None, FP8_CODEC));
        table.push(of(KernelFamily::Util, "mma_probe", None, MMA_PROBE));
        table
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_the_declared_lists_exactly() {
        let fp8 = Fp8Kind::ALL.len() * FP8_HEAD_SIZES.len();
        assert_eq!(paged_attention_variants().len(), DTYPES.len() * (HEAD_SIZES.len() + fp8) * BLOCK_SIZES.len());
        for &d in DTYPES {
            for &b in BLOCK_SIZES {
                for &h in HEAD_SIZES {
                    let v = paged_attention(d, KvCacheDType::Auto, h, b).unwrap();
                    assert_eq!(v.symbol, format!("paged_attention_{d}_h{h}_b{b}"));
                }
                for kind in Fp8Kind::ALL {
                    for &h in FP8_HEAD_SIZES {
                        let v = paged_attention(d, KvCacheDType::Fp8(kind), h, b).unwrap();
                        let k = &kind.name()[4..];
                        assert_eq!(v.symbol, format!("paged_attention_{d}_{k}_h{h}_b{b}"));
                        assert_eq!(v.family(), KernelFamily::PagedAttentionFp8);
                    }
                }
            }
        }
        let auto = KvCacheDType::Auto;
        assert!(matches!(paged_attention(DType::F16, auto, 48, 16), Err(Error::Unsupported { what: "head_size", .. })));
        assert!(matches!(paged_attention(DType::F16, auto, 128, 12), Err(Error::Unsupported { what: "block_size", .. })));
        let e4m3 = KvCacheDType::Fp8(Fp8Kind::E4m3);
        assert!(matches!(paged_attention(DType::F16, e4m3, 120, 16), Err(Error::Unsupported { what: "head_size (fp8 cache)", .. })));
    }

    #[test]
    fn every_dtype_has_cache_kernels() {
        for &d in DTYPES {
            assert_eq!(cache_symbol(d, KvCacheDType::Auto, false).unwrap(), format!("reshape_and_cache_{d}"));
            assert_eq!(cache_symbol(d, KvCacheDType::Auto, true).unwrap(), format!("reshape_and_cache_flash_{d}"));
            for kind in Fp8Kind::ALL {
                let k = &kind.name()[4..];
                assert_eq!(cache_symbol(d, KvCacheDType::Fp8(kind), false).unwrap(), format!("reshape_and_cache_{d}_{k}"));
                assert_eq!(cache_symbol(d, KvCacheDType::Fp8(kind), true).unwrap(), format!("reshape_and_cache_flash_{d}_{k}"));
            }
        }
    }
}
