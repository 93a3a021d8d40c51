//! The one place where runtime (dtype, head size, block size) becomes a compiled kernel: a table
//! expanded from the same variant list as the kernels' entry points (`pagedattn-layout`), and the
//! per-dtype cache kernels' symbols.

use std::sync::OnceLock;

use pagedattn_layout::{BLOCK_SIZES, DType, HEAD_SIZES};

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

#[cfg(test)]
mod tests {
    use super::*;
    use pagedattn_layout::DTYPES;

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
