//! Test cases shared by the integration tests and `pagedattn verify`: random inputs with shuffled
//! block tables, NaN-poisoned outputs, comparison against the float64 CPU reference. [`cache`]: the
//! same for the KV-cache ops (bit-exact against the CPU backend).

pub mod cache;
pub mod fuzz;
pub mod varlen;

pub use varlen::{VarlenInputs, varlen_inputs};

use pagedattn_layout::{BlockSparse, DType, KvCacheDType};

use crate::device::Device;
use crate::error::Result;
use crate::paged_attention::{PagedAttentionArgs, PagedAttentionWorkspace, Version, paged_attention, validate};
use crate::tensor::Tensor;

/// A small deterministic RNG (xorshift64*), so cases are reproducible from their seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Shuffles `v` in place (Fisher–Yates: every permutation equally likely).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Relative-L2 bound per dtype (float64 reference on the rounded inputs; the output is rounded once).
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
    }
}

/// One paged-attention test case.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// The query's and output's dtype (and the caches', for `auto`).
    pub dtype: DType,
    /// The caches' element type (fp8: quantized with [`Case::fp8_scales`]).
    pub cache: KvCacheDType,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads (`num_heads` is a multiple).
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Tokens of each sequence (one query per sequence).
    pub seq_lens: Vec<usize>,
    /// With ALiBi slopes `2^(-8 (h + 1) / num_heads)`.
    pub alibi: bool,
    /// vLLM's block-sparse pattern, or `None` (dense).
    pub blocksparse: Option<BlockSparse>,
    /// Seed of the inputs and the block shuffle.
    pub seed: u64,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lens: String = if self.seq_lens.len() <= 6 {
            format!("{:?}", self.seq_lens)
        } else {
            format!("[{} seqs, max {}]", self.seq_lens.len(), self.seq_lens.iter().max().unwrap_or(&0))
        };
        write!(
            f,
            "{}{} h{} b{} heads {}/{} lens {lens}{} seed {}",
            self.dtype,
            if self.cache == KvCacheDType::Auto { String::new() } else { format!(" {} cache", self.cache) },
            self.head_size,
            self.block_size,
            self.num_heads,
            self.num_kv_heads,
            if self.alibi { " alibi" } else { "" },
            self.seed
        )?;
        if let Some(b) = self.blocksparse {
            write!(
                f,
                " sparse(S {} local {} stride {} step {} rank {})",
                b.block_size, b.local_blocks, b.vert_stride, b.head_sliding_step, b.tp_rank
            )?;
        }
        Ok(())
    }
}

/// Host tensors of a case.
pub struct Inputs {
    /// `[num_seqs, num_heads, head_size]`.
    pub query: Tensor,
    /// `[num_blocks, num_kv_heads, head_size / x, block_size, x]`; spare blocks hold NaN.
    pub key_cache: Tensor,
    /// `[num_blocks, num_kv_heads, head_size, block_size]`; spare blocks hold NaN.
    pub value_cache: Tensor,
    /// `[num_seqs, max_blocks]` i32; entries past a sequence's blocks are out of range.
    pub block_tables: Tensor,
    /// `[num_seqs]` i32.
    pub seq_lens: Tensor,
    /// `[num_heads]` f32 when the case has ALiBi.
    pub alibi_slopes: Option<Tensor>,
    /// `1 / sqrt(head_size)`.
    pub scale: f32,
    /// fp8 caches: `[1]` f32 `k_scale`, `v_scale`.
    pub kv_scales: Option<(Tensor, Tensor)>,
    /// The case's block-sparse pattern.
    pub blocksparse: Option<BlockSparse>,
}

impl Inputs {
    /// The op's arguments, borrowing these tensors.
    pub fn args(&self) -> PagedAttentionArgs<'_> {
        PagedAttentionArgs {
            query: &self.query,
            key_cache: &self.key_cache,
            value_cache: &self.value_cache,
            block_tables: &self.block_tables,
            seq_lens: &self.seq_lens,
            scale: self.scale,
            alibi_slopes: self.alibi_slopes.as_ref(),
            k_scale: self.kv_scales.as_ref().map(|s| &s.0),
            v_scale: self.kv_scales.as_ref().map(|s| &s.1),
            blocksparse: self.blocksparse,
        }
    }

    /// Copies every tensor to `device`.
    pub fn upload(&self, device: &Device) -> Result<Inputs> {
        Ok(Inputs {
            query: device.upload(&self.query)?,
            key_cache: device.upload(&self.key_cache)?,
            value_cache: device.upload(&self.value_cache)?,
            block_tables: device.upload(&self.block_tables)?,
            seq_lens: device.upload(&self.seq_lens)?,
            alibi_slopes: self.alibi_slopes.as_ref().map(|t| device.upload(t)).transpose()?,
            scale: self.scale,
            kv_scales: self.kv_scales.as_ref().map(|(k, v)| Ok::<_, crate::Error>((device.upload(k)?, device.upload(v)?))).transpose()?,
            blocksparse: self.blocksparse,
        })
    }
}

impl Case {
    /// A case of `dtype` caches (`auto`), dense, with ALiBi or not: `heads` is (query, KV) heads.
    pub fn new(
        dtype: DType,
        heads: (usize, usize),
        head_size: usize,
        block_size: usize,
        seq_lens: &[usize],
        alibi: bool,
        seed: u64,
    ) -> Case {
        Case {
            dtype,
            cache: KvCacheDType::Auto,
            num_heads: heads.0,
            num_kv_heads: heads.1,
            head_size,
            block_size,
            seq_lens: seq_lens.to_vec(),
            alibi,
            blocksparse: None,
            seed,
        }
    }

    /// `(k_scale, v_scale)` of fp8 cases: the caches hold uniform values in [-1, 1) divided by
    /// these, so e4m3 codes span about ±16 and ±40 (well inside ±448) with their full precision.
    pub fn fp8_scales(&self) -> (f32, f32) {
        (1.0 / 16.0, 0.025)
    }

    /// Random inputs: uniform queries and caches, physical blocks shuffled (with spare blocks the
    /// table never names, holding NaN so a stray read shows), table entries past each sequence's
    /// blocks set out of range (the kernel must never read them). fp8 caches hold the codes of
    /// `value / scale`; the reference reads `decode(code) · scale`.
    pub fn inputs(&self) -> Result<Inputs> {
        let mut rng = Rng::new(self.seed);
        let (hs, bs, x) = (self.head_size, self.block_size, self.cache.x(self.dtype));
        let num_seqs = self.seq_lens.len();
        let blocks_of = |len: usize| len.div_ceil(bs);
        let max_blocks = self.seq_lens.iter().map(|&l| blocks_of(l)).max().unwrap_or(0).max(1);
        let used: usize = self.seq_lens.iter().map(|&l| blocks_of(l)).sum();
        let num_blocks = used + 3;
        let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
        rng.shuffle(&mut perm);
        let mut table = vec![num_blocks as i32 + 1000; num_seqs * max_blocks];
        let mut next = 0;
        for (s, &len) in self.seq_lens.iter().enumerate() {
            for b in 0..blocks_of(len) {
                table[s * max_blocks + b] = perm[next];
                next += 1;
            }
        }
        let spare: Vec<usize> = perm[next..].iter().map(|&b| b as usize).collect();
        let per_block = self.num_kv_heads * hs * bs;
        let mut cache = |spare: &[usize]| -> Vec<f32> {
            let mut v: Vec<f32> = (0..num_blocks * per_block).map(|_| rng.uniform()).collect();
            for &b in spare {
                v[b * per_block..(b + 1) * per_block].fill(f32::NAN);
            }
            v
        };
        let mut k = cache(&spare);
        let mut v = cache(&spare);
        let cache_dtype = match self.cache.fp8() {
            Some(kind) => {
                let (ks, vs) = self.fp8_scales();
                k.iter_mut().for_each(|e| *e /= ks);
                v.iter_mut().for_each(|e| *e /= vs);
                crate::tensor::ScalarType::of_fp8(kind)
            }
            None => self.dtype.into(),
        };
        let kv_scales = match self.cache {
            KvCacheDType::Auto => None,
            KvCacheDType::Fp8(_) => {
                let (ks, vs) = self.fp8_scales();
                Some((Tensor::from_f32(DType::F32, &[1], &[ks])?, Tensor::from_f32(DType::F32, &[1], &[vs])?))
            }
        };
        let q: Vec<f32> = (0..num_seqs * self.num_heads * hs).map(|_| rng.uniform()).collect();
        let alibi_slopes = if self.alibi {
            let slopes: Vec<f32> = (0..self.num_heads).map(|h| 2f32.powf(-8.0 * (h + 1) as f32 / self.num_heads as f32)).collect();
            Some(Tensor::from_f32(DType::F32, &[self.num_heads], &slopes)?)
        } else {
            None
        };
        Ok(Inputs {
            query: Tensor::from_f32(self.dtype, &[num_seqs, self.num_heads, hs], &q)?,
            key_cache: Tensor::from_values(cache_dtype, &[num_blocks, self.num_kv_heads, hs / x, bs, x], &k)?,
            value_cache: Tensor::from_values(cache_dtype, &[num_blocks, self.num_kv_heads, hs, bs], &v)?,
            block_tables: Tensor::from_i32(&[num_seqs, max_blocks], &table)?,
            seq_lens: Tensor::from_i32(&[num_seqs], &self.seq_lens.iter().map(|&l| l as i32).collect::<Vec<_>>())?,
            alibi_slopes,
            scale: 1.0 / (hs as f32).sqrt(),
            kv_scales,
            blocksparse: self.blocksparse,
        })
    }
}

/// Error figures of an output against the reference.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Errors {
    /// ‖got − want‖₂ / ‖want‖₂ (‖got − want‖₂ when the reference is all zeros).
    pub rel_l2: f64,
    /// max |got − want| over the finite elements of `got`.
    pub max_abs: f64,
    /// Elements that are NaN or infinite (never acceptable).
    pub non_finite: usize,
}

impl Errors {
    /// No non-finite element and `rel_l2 <= tol`.
    pub fn passes(&self, tol: f64) -> bool {
        self.non_finite == 0 && self.rel_l2 <= tol
    }
}

/// The error figures of `got` against `want` (non-finite elements of `got` are counted, and left
/// out of the norms). Panics if the lengths differ.
pub fn compare(got: &[f64], want: &[f64]) -> Errors {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den, mut max_abs, mut non_finite) = (0f64, 0f64, 0f64, 0usize);
    for (g, w) in got.iter().zip(want) {
        if !g.is_finite() {
            non_finite += 1;
            continue;
        }
        num += (g - w) * (g - w);
        den += w * w;
        max_abs = max_abs.max((g - w).abs());
    }
    let rel_l2 = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    Errors { rel_l2, max_abs, non_finite }
}

/// Runs `case` on `device` with `version` (output NaN-poisoned first; v2 with a workspace bounded
/// by the case's longest sequence) and compares with the f64 reference.
pub fn check_case(device: &Device, case: &Case, version: Version) -> Result<Errors> {
    let host = case.inputs()?;
    let dev = host.upload(device)?;
    let mut out = device.nan(host.query.dtype(), host.query.shape())?;
    let max_len = case.seq_lens.iter().copied().max().unwrap_or(0);
    let mut ws = PagedAttentionWorkspace::new(device, case.seq_lens.len(), case.num_heads, case.head_size, max_len)?;
    paged_attention(device, &mut out, &dev.args(), &mut ws, version)?;
    if let Device::Gpu(g) = device {
        g.synchronize()?;
    }
    let got = out.to_cpu()?.to_f64_vec();
    let plan = validate(&Device::Cpu, &Tensor::nan(host.query.dtype(), host.query.shape()), &host.args())?;
    let want = crate::cpu::paged_attention::reference(&plan, &host.args());
    Ok(compare(&got, &want))
}

/// The verification grid: every dtype × cache dtype (auto, fp8 e4m3, e5m2) × head size × block
/// size, with GQA ratios, ALiBi on/off and lengths 0, 1, non-multiples of the block size and a long
/// one, rotated across cases so the grid stays small. `long` adds a few cases with 8k–32k tokens.
pub fn grid(long: bool) -> Vec<Case> {
    let mut cases = Vec::new();
    let ratios = [(8, 8), (8, 2), (16, 1), (12, 4)];
    let mut i = 0u64;
    for cache in KvCacheDType::ALL {
        let heads = if cache == KvCacheDType::Auto { pagedattn_layout::HEAD_SIZES } else { pagedattn_layout::FP8_HEAD_SIZES };
        for &dtype in pagedattn_layout::DTYPES {
            for &head_size in heads {
                for &block_size in pagedattn_layout::BLOCK_SIZES {
                    let (num_heads, num_kv_heads) = ratios[i as usize % ratios.len()];
                    let lens = vec![
                        0,
                        1,
                        block_size - 1,
                        block_size + 1,
                        3 * block_size,
                        100 + (i as usize * 37) % 400,
                        1000 + (i as usize * 131) % 1100,
                    ];
                    cases.push(Case {
                        dtype,
                        cache,
                        num_heads,
                        num_kv_heads,
                        head_size,
                        block_size,
                        seq_lens: lens,
                        alibi: i % 3 == 1,
                        blocksparse: None,
                        seed: 1000 + i,
                    });
                    i += 1;
                }
            }
        }
    }
    if long {
        let e4m3 = KvCacheDType::Fp8(pagedattn_layout::Fp8Kind::E4m3);
        for (j, &(dtype, cache, head_size, block_size, len)) in [
            (DType::F16, KvCacheDType::Auto, 128, 16, 32768),
            (DType::BF16, KvCacheDType::Auto, 128, 16, 16384),
            (DType::F32, KvCacheDType::Auto, 64, 32, 8192),
            (DType::F16, KvCacheDType::Auto, 256, 8, 12345),
            (DType::F16, e4m3, 128, 16, 20000),
            (DType::BF16, KvCacheDType::Fp8(pagedattn_layout::Fp8Kind::E5m2), 256, 8, 9999),
        ]
        .iter()
        .enumerate()
        {
            cases.push(Case {
                dtype,
                cache,
                num_heads: 8,
                num_kv_heads: 2,
                head_size,
                block_size,
                seq_lens: vec![len, 7],
                alibi: j % 2 == 1,
                blocksparse: None,
                seed: 5000 + j as u64,
            });
        }
    }
    // vLLM's block-sparse pattern: sparse block sizes 1x-4x the cache block, local windows,
    // vertical strides, per-head and per-KV-head sliding steps, a second tensor-parallel rank; every
    // dtype, auto and fp8 caches.
    let mut j = 0u64;
    for &dtype in pagedattn_layout::DTYPES {
        for &(head_size, block_size) in &[(64, 16), (128, 16), (128, 32), (256, 8), (80, 64), (128, 128), (32, 8), (96, 256)] {
            for k in 0..2u64 {
                let n = j as usize;
                let (num_heads, num_kv_heads) = ratios[n % ratios.len()];
                cases.push(Case {
                    dtype,
                    cache: KvCacheDType::ALL[n % 3],
                    num_heads,
                    num_kv_heads,
                    head_size,
                    block_size,
                    seq_lens: vec![1, 3 * block_size + 1, 700 + n * 53 % 900, 2100 + n * 97 % 500],
                    alibi: k == 1,
                    blocksparse: Some(BlockSparse {
                        tp_rank: (n % 2) as u32,
                        local_blocks: [1, 2, 4][n % 3] as u32,
                        vert_stride: [2, 3, 4, 8][n % 4] as u32,
                        block_size: (block_size * [1, 2, 4][(n / 2) % 3]) as u32,
                        head_sliding_step: [1, -1, 0, 2, -3][n % 5],
                    }),
                    seed: 7000 + j,
                });
                j += 1;
            }
        }
    }
    cases
}
