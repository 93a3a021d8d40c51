//! The single list of compiled variants. `for_each_cache_dtype!(cb)` calls `cb!(DTYPE_VARIANT,
//! "dtype_name")` for the per-dtype cache kernels (symbols from [`cache_symbol!`]).
//! `for_each_paged_attention_variant!(cb)` calls
//! `cb!(DTYPE_VARIANT, "dtype_name", HEAD_SIZE, BLOCK_SIZE)` once per variant: the kernels crate
//! expands it into `#[export_name]` entry points, the host into its dispatch table, and both build
//! the symbol name with [`paged_attention_symbol!`], so names are never typed by hand.
//! The lists must match [`crate::HEAD_SIZES`], [`crate::BLOCK_SIZES`] and [`crate::DTYPES`]
//! (checked by a test in the host crate).

/// Symbol of one `paged_attention` variant, e.g. `paged_attention_f16_h128_b16`.
#[macro_export]
macro_rules! paged_attention_symbol {
    ($dtn:literal, $h:literal, $b:literal) => {
        concat!("paged_attention_", $dtn, "_h", stringify!($h), "_b", stringify!($b))
    };
}

/// Calls `$cb!(DTYPE, "dtype", HEAD_SIZE, BLOCK_SIZE)` for every compiled `paged_attention` variant (v1 and v2 share it).
#[macro_export]
macro_rules! for_each_paged_attention_variant {
    ($cb:ident) => {
        $crate::__for_each_dtype!($cb; [(F32, "f32") (F16, "f16") (BF16, "bf16")];
            [32 64 80 96 112 120 128 192 256]; [8 16 32 64 128 256]);
    };
}

/// Symbol of one fp8-cache `paged_attention` variant, e.g. `paged_attention_f16_e4m3_h128_b16`.
#[macro_export]
macro_rules! paged_attention_fp8_symbol {
    ($dtn:literal, $kn:literal, $h:literal, $b:literal) => {
        concat!("paged_attention_", $dtn, "_", $kn, "_h", stringify!($h), "_b", stringify!($b))
    };
}

/// Calls `$cb!(DTYPE, "dtype", KIND, "kind", HEAD_SIZE, BLOCK_SIZE)` for every compiled
/// fp8-cache `paged_attention` variant (`KIND`: `E4m3` or `E5m2`; heads: [`crate::FP8_HEAD_SIZES`]).
#[macro_export]
macro_rules! for_each_paged_attention_fp8_variant {
    ($cb:ident) => {
        $crate::__for_each_fp8_kind!($cb; [(F32, "f32") (F16, "f16") (BF16, "bf16")]; [(E4m3, "e4m3") (E5m2, "e5m2")]);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __for_each_fp8_kind {
    ($cb:ident; [$(($dt:ident, $dtn:literal))*]; $kinds:tt) => {
        $( $crate::__for_each_fp8_kind!(@dt $cb; $dt, $dtn; $kinds); )*
    };
    (@dt $cb:ident; $dt:ident, $dtn:literal; [$(($k:ident, $kn:literal))*]) => {
        $( $crate::__for_each_fp8_kind!(@heads $cb; $dt, $dtn, $k, $kn; [32 64 80 96 112 128 192 256]); )*
    };
    (@heads $cb:ident; $dt:ident, $dtn:literal, $k:ident, $kn:literal; [$($h:literal)*]) => {
        $( $crate::__for_each_fp8_kind!(@blocks $cb; $dt, $dtn, $k, $kn, $h; [8 16 32 64 128 256]); )*
    };
    (@blocks $cb:ident; $dt:ident, $dtn:literal, $k:ident, $kn:literal, $h:literal; [$($b:literal)*]) => {
        $( $cb!($dt, $dtn, $k, $kn, $h, $b); )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __for_each_dtype {
    ($cb:ident; [$(($dt:ident, $dtn:literal))*]; $heads:tt; $blocks:tt) => {
        $( $crate::__for_each_head!($cb; $dt, $dtn; $heads; $blocks); )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __for_each_head {
    ($cb:ident; $dt:ident, $dtn:literal; [$($h:literal)*]; $blocks:tt) => {
        $( $crate::__for_each_block!($cb; $dt, $dtn, $h; $blocks); )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __for_each_block {
    ($cb:ident; $dt:ident, $dtn:literal, $h:literal; [$($b:literal)*]) => {
        $( $cb!($dt, $dtn, $h, $b); )*
    };
}

/// Symbol of the v2 reduce for one dtype, e.g. `paged_attention_v2_reduce_f16`.
#[macro_export]
macro_rules! paged_attention_v2_reduce_symbol {
    ($dtn:literal) => {
        concat!("paged_attention_v2_reduce_", $dtn)
    };
}

/// Symbol of one cache kernel of a dtype, e.g. `reshape_and_cache_flash_bf16`.
#[macro_export]
macro_rules! cache_symbol {
    ($op:literal, $dtn:literal) => {
        concat!($op, "_", $dtn)
    };
}

/// Calls `$cb!(DTYPE, "dtype")` for every dtype of the per-dtype cache kernels
/// (`reshape_and_cache`, `reshape_and_cache_flash`; `copy_blocks` moves bytes and has one variant).
#[macro_export]
macro_rules! for_each_cache_dtype {
    ($cb:ident) => {
        $cb!(F32, "f32");
        $cb!(F16, "f16");
        $cb!(BF16, "bf16");
    };
}

/// Symbol of one fp8 cache kernel, e.g. `reshape_and_cache_flash_bf16_e4m3` (inputs of `bf16`,
/// cache of e4m3 codes).
#[macro_export]
macro_rules! cache_fp8_symbol {
    ($op:literal, $dtn:literal, $kn:literal) => {
        concat!($op, "_", $dtn, "_", $kn)
    };
}

/// Calls `$cb!(DTYPE, "dtype", KIND, "kind")` for every (input dtype, fp8 kind) of the quantizing
/// cache kernels (`reshape_and_cache`, `reshape_and_cache_flash` into fp8 caches).
#[macro_export]
macro_rules! for_each_cache_fp8 {
    ($cb:ident) => {
        $cb!(F32, "f32", E4m3, "e4m3");
        $cb!(F32, "f32", E5m2, "e5m2");
        $cb!(F16, "f16", E4m3, "e4m3");
        $cb!(F16, "f16", E5m2, "e5m2");
        $cb!(BF16, "bf16", E4m3, "e4m3");
        $cb!(BF16, "bf16", E5m2, "e5m2");
    };
}

/// Symbol of one varlen variant, e.g. `flash_attn_varlen_bf16_h128`.
#[macro_export]
macro_rules! flash_attn_symbol {
    ($dtn:literal, $h:literal) => {
        concat!("flash_attn_varlen_", $dtn, "_h", stringify!($h))
    };
}

/// Symbol of one Hopper varlen variant, e.g. `flash_attn_sm90_bf16_h128`.
#[macro_export]
macro_rules! flash_attn_sm90_symbol {
    ($dtn:literal, $h:literal) => {
        concat!("flash_attn_sm90_", $dtn, "_h", stringify!($h))
    };
}

/// Symbol of the Hopper varlen variant with soft-cap and ALiBi compiled in, e.g.
/// `flash_attn_sm90_bf16_h128_extras` (the plain one serves calls that use neither).
#[macro_export]
macro_rules! flash_attn_sm90_extras_symbol {
    ($dtn:literal, $h:literal) => {
        concat!("flash_attn_sm90_", $dtn, "_h", stringify!($h), "_extras")
    };
}

/// Calls `$cb!(DTYPE, "dtype", HEAD_SIZE)` for every Hopper varlen (dtype, head size), each
/// compiled twice, plain and extras (heads: [`crate::FLASH_SM90_HEAD_SIZES`]).
#[macro_export]
macro_rules! for_each_flash_attn_sm90_variant {
    ($cb:ident) => {
        $crate::__for_each_flash_head!($cb; F16, "f16"; [64 128 256]);
        $crate::__for_each_flash_head!($cb; BF16, "bf16"; [64 128 256]);
    };
}

/// Symbol of one `merge_attn_states` variant, e.g. `merge_attn_states_bf16`.
#[macro_export]
macro_rules! merge_attn_states_symbol {
    ($dtn:literal) => {
        concat!("merge_attn_states_", $dtn)
    };
}

/// Calls `$cb!(DTYPE, "dtype", HEAD_SIZE)` for every varlen variant (heads: [`crate::FLASH_HEAD_SIZES`]).
#[macro_export]
macro_rules! for_each_flash_attn_variant {
    ($cb:ident) => {
        $crate::__for_each_flash_head!($cb; F16, "f16"; [32 64 80 96 112 120 128 192 256]);
        $crate::__for_each_flash_head!($cb; BF16, "bf16"; [32 64 80 96 112 120 128 192 256]);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __for_each_flash_head {
    ($cb:ident; $dt:ident, $dtn:literal; [$($h:literal)*]) => {
        $( $cb!($dt, $dtn, $h); )*
    };
}
