//! The one place where runtime (dtype, head size, block size) becomes a compiled kernel: a table
//! expanded from the same variant list as the kernels' entry points (`pagedattn-layout`), the
//! per-dtype cache kernels' symbols, and [`kernel_variants`], every entry point of every family.

use std::sync::OnceLock;

use pagedattn_layout::{BLOCK_SIZES, DTYPES, DType, HEAD_SIZES, KernelFamily};

use crate::error::{Error, Result};

/// One compiled `paged_attention` variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedAttentionVariant {
    pub dtype: DType,
    pub head_size: usize,
    pub block_size: usize,
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
                    head_size: $h,
                    block_size: $b,
                    symbol: pagedattn_layout::paged_attention_symbol!($dtn, $h, $b),
                })
            };
        }
        pagedattn_layout::for_each_paged_attention_variant!(push);
        table
    })
}

/// The variant for `(dtype, head_size, block_size)`, or an error naming the unsupported value and
/// the supported ones.
pub fn paged_attention(dtype: DType, head_size: usize, block_size: usize) -> Result<&'static PagedAttentionVariant> {
    let op = "paged_attention";
    if !HEAD_SIZES.contains(&head_size) {
        return Err(Error::Unsupported { op, what: "head_size", got: head_size.to_string(), supported: format!("{HEAD_SIZES:?}") });
    }
    if !BLOCK_SIZES.contains(&block_size) {
        return Err(Error::Unsupported { op, what: "block_size", got: block_size.to_string(), supported: format!("{BLOCK_SIZES:?}") });
    }
    paged_attention_variants().iter().find(|v| v.dtype == dtype && v.head_size == head_size && v.block_size == block_size).ok_or_else(
        || Error::Unsupported {
            op,
            what: "(dtype, head_size, block_size)",
            got: format!("({dtype}, {head_size}, {block_size})"),
            supported: "see `pagedattn info`".into(),
        },
    )
}

/// The symbol of the v2 reduce kernel for `dtype`.
pub fn paged_attention_v2_reduce(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => pagedattn_layout::paged_attention_v2_reduce_symbol!("f32"),
        DType::F16 => pagedattn_layout::paged_attention_v2_reduce_symbol!("f16"),
        DType::BF16 => pagedattn_layout::paged_attention_v2_reduce_symbol!("bf16"),
    }
}

/// The symbol of `reshape_and_cache_<dtype>` (or `reshape_and_cache_flash_<dtype>` when `flash`).
pub fn cache_symbol(dtype: DType, flash: bool) -> Result<&'static str> {
    macro_rules! arm {
        ($dt:ident, $dtn:literal) => {
            if dtype == DType::$dt {
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
        what: "dtype",
        got: dtype.to_string(),
        supported: "f32, f16, bf16".into(),
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

/// Symbol of the util family's read-only streaming pass.
pub const STREAM_READ: &str = "stream_read";

/// Symbol of the fp8 conversion test kernel (util family).
pub const FP8_CODEC: &str = "fp8_codec";

/// Symbol of `copy_blocks` (one variant: it moves bytes, whatever the dtype).
pub const COPY_BLOCKS: &str = "copy_blocks";

/// Symbol of `swap_blocks`' kernel path (one variant: bytes).
pub const SWAP_BLOCKS: &str = "swap_blocks";

/// One compiled kernel entry point of any family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelVariant {
    pub family: KernelFamily,
    /// The kernel (op) the entry point belongs to: `paged_attention`, `paged_attention_v2_reduce`,
    /// `reshape_and_cache`, `reshape_and_cache_flash`, `copy_blocks`, `swap_blocks`, `fill_uniform` or
    /// `stream_read`.
    pub kernel: &'static str,
    /// `None` for kernels that move bytes or words whatever the dtype.
    pub dtype: Option<DType>,
    pub head_size: Option<usize>,
    pub block_size: Option<usize>,
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
            head_size: None,
            block_size: None,
            symbol,
        };
        let mut table: Vec<KernelVariant> = paged_attention_variants()
            .iter()
            .map(|v| KernelVariant {
                family: KernelFamily::PagedAttention,
                kernel: "paged_attention",
                dtype: Some(v.dtype),
                head_size: Some(v.head_size),
                block_size: Some(v.block_size),
                symbol: v.symbol,
            })
            .collect();
        for &d in DTYPES {
            table.push(of(KernelFamily::PagedAttention, "paged_attention_v2_reduce", Some(d), paged_attention_v2_reduce(d)));
        }
        for flash in [false, true] {
            let kernel = if flash { "reshape_and_cache_flash" } else { "reshape_and_cache" };
            for &d in DTYPES {
                if let Ok(symbol) = cache_symbol(d, flash) {
                    table.push(of(KernelFamily::Cache, kernel, Some(d), symbol));
                }
            }
        }
        table.push(of(KernelFamily::Cache, "copy_blocks", None, COPY_BLOCKS));
        table.push(of(KernelFamily::Cache, "swap_blocks", None, SWAP_BLOCKS));
        for &d in DTYPES {
            table.push(of(KernelFamily::Util, "fill_uniform", Some(d), fill_uniform_symbol(d)));
        }
        table.push(of(KernelFamily::Util, "stream_read", None, STREAM_READ));
        table.push(of(KernelFamily::Util, "fp8_codec", None, FP8_CODEC));
        table
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_the_declared_lists_exactly() {
        assert_eq!(paged_attention_variants().len(), DTYPES.len() * HEAD_SIZES.len() * BLOCK_SIZES.len());
        for &d in DTYPES {
            for &h in HEAD_SIZES {
                for &b in BLOCK_SIZES {
                    let v = paged_attention(d, h, b).unwrap();
                    assert_eq!(v.symbol, format!("paged_attention_{d}_h{h}_b{b}"));
                }
            }
        }
        assert!(matches!(paged_attention(DType::F16, 48, 16), Err(Error::Unsupported { what: "head_size", .. })));
        assert!(matches!(paged_attention(DType::F16, 128, 12), Err(Error::Unsupported { what: "block_size", .. })));
    }

    #[test]
    fn every_dtype_has_cache_kernels() {
        for &d in DTYPES {
            assert_eq!(cache_symbol(d, false).unwrap(), format!("reshape_and_cache_{d}"));
            assert_eq!(cache_symbol(d, true).unwrap(), format!("reshape_and_cache_flash_{d}"));
        }
    }
}
