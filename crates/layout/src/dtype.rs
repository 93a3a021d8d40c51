/// Element type of queries, outputs and KV caches.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

impl DType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// vLLM's `x`: elements per 16-byte chunk, the innermost axis of the key cache.
    pub const fn x(self) -> usize {
        16 / self.size_bytes()
    }

    /// Short lowercase name, as used in kernel symbols (`paged_attention_f16_h128_b16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Parses [`DType::name`] (also accepts `float32`, `float16`/`half`, `bfloat16`).
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f32" | "float32" | "float" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl core::fmt::Display for DType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// vLLM's `kv_cache_dtype`: a KV cache holds the query's dtype (`auto`) or fp8 codes, which the
/// kernels dequantize with the per-tensor `k_scale` / `v_scale` (value = decode(code) · scale).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum KvCacheDType {
    #[default]
    Auto,
    Fp8(crate::Fp8Kind),
}

impl KvCacheDType {
    /// Every cache dtype, `auto` first.
    pub const ALL: [KvCacheDType; 3] =
        [KvCacheDType::Auto, KvCacheDType::Fp8(crate::Fp8Kind::E4m3), KvCacheDType::Fp8(crate::Fp8Kind::E5m2)];

    /// The fp8 format, if this is one.
    pub const fn fp8(self) -> Option<crate::Fp8Kind> {
        match self {
            KvCacheDType::Auto => None,
            KvCacheDType::Fp8(k) => Some(k),
        }
    }

    /// Bytes per cache element with queries of `dtype`.
    pub const fn size_bytes(self, dtype: DType) -> usize {
        match self {
            KvCacheDType::Auto => dtype.size_bytes(),
            KvCacheDType::Fp8(_) => 1,
        }
    }

    /// vLLM's `x` of the key cache: cache elements per 16-byte chunk.
    pub const fn x(self, dtype: DType) -> usize {
        16 / self.size_bytes(dtype)
    }

    /// vLLM's spelling: `auto`, `fp8_e4m3`, `fp8_e5m2`.
    pub const fn name(self) -> &'static str {
        match self {
            KvCacheDType::Auto => "auto",
            KvCacheDType::Fp8(k) => k.name(),
        }
    }

    /// Parses [`KvCacheDType::name`]; `fp8` means `fp8_e4m3`, as in vLLM.
    pub fn parse(s: &str) -> Option<KvCacheDType> {
        match s {
            "auto" => Some(KvCacheDType::Auto),
            "fp8" | "fp8_e4m3" | "e4m3" => Some(KvCacheDType::Fp8(crate::Fp8Kind::E4m3)),
            "fp8_e5m2" | "e5m2" => Some(KvCacheDType::Fp8(crate::Fp8Kind::E5m2)),
            _ => None,
        }
    }
}

impl core::fmt::Display for KvCacheDType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
