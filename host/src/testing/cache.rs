//! KV-cache op cases shared by `pagedattn run`, `pagedattn verify` and the cache benchmark: random
//! inputs in every cache layout (vLLM's, flash NHD and HND, combined key/value allocations), the op
//! run on a device, and the device's caches compared bit for bit with the CPU backend's (a cache
//! op only moves elements, so any difference is a bug).

use pagedattn_layout::{BLOCK_SIZES, DTYPES, DType, FP8_HEAD_SIZES, Fp8Kind, HEAD_SIZES, KvCacheDType};

use crate::cache::CacheLayout;
use crate::device::{Device, Gpu};
use crate::error::{Error, Result};
use crate::tensor::{ScalarType, Tensor, contiguous_strides};
use crate::testing::Rng;
use crate::{
    Fp8Scales, copy_blocks, reshape_and_cache, reshape_and_cache_flash, reshape_and_cache_flash_fp8, reshape_and_cache_fp8, swap_blocks,
};

/// How a pair of key and value caches is laid out and allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// Paged attention's layout: key `[num_blocks, H, D / x, block_size, x]`, value
    /// `[num_blocks, H, D, block_size]`; written by `reshape_and_cache`.
    Vllm,
    /// Flash layout, key and value `[num_blocks, block_size, H, D]`, two allocations.
    Nhd,
    /// `[num_blocks, H, block_size, D]` allocations, passed to the flash op as
    /// `[num_blocks, block_size, H, D]` views with permuted strides.
    Hnd,
    /// One `[2, num_blocks, block_size, H, D]` allocation: key = `kv[0]`, value = `kv[1]` (vLLM's
    /// FlashAttention backend).
    Combined,
    /// One `[num_blocks, 2, block_size, H, D]` allocation: key = `kv[:, 0]`, value = `kv[:, 1]`
    /// (FlashInfer's); a cache's block stride is twice its block.
    CombinedInner,
}

impl KvLayout {
    /// Every layout, in the order above.
    pub const ALL: [KvLayout; 5] = [KvLayout::Vllm, KvLayout::Nhd, KvLayout::Hnd, KvLayout::Combined, KvLayout::CombinedInner];
    /// The layouts `reshape_and_cache_flash` writes.
    pub const FLASH: [KvLayout; 4] = [KvLayout::Nhd, KvLayout::Hnd, KvLayout::Combined, KvLayout::CombinedInner];

    /// The CLI name, e.g. `"combined-inner"` (also its [`Display`](std::fmt::Display) and what
    /// [`FromStr`](std::str::FromStr) parses).
    pub const fn name(self) -> &'static str {
        match self {
            KvLayout::Vllm => "vllm",
            KvLayout::Nhd => "nhd",
            KvLayout::Hnd => "hnd",
            KvLayout::Combined => "combined",
            KvLayout::CombinedInner => "combined-inner",
        }
    }

    /// The shapes, in a line.
    pub const fn describe(self) -> &'static str {
        match self {
            KvLayout::Vllm => "key [num_blocks, H, D/x, block_size, x], value [num_blocks, H, D, block_size]",
            KvLayout::Nhd => "key, value [num_blocks, block_size, H, D]",
            KvLayout::Hnd => "key, value [num_blocks, H, block_size, D] (as [num_blocks, block_size, H, D] views)",
            KvLayout::Combined => "one [2, num_blocks, block_size, H, D] tensor: key = kv[0], value = kv[1]",
            KvLayout::CombinedInner => "one [num_blocks, 2, block_size, H, D] tensor: key = kv[:, 0], value = kv[:, 1]",
        }
    }

    /// vLLM's layout for [`KvLayout::Vllm`], the flash layout for the others.
    pub const fn cache_layout(self) -> CacheLayout {
        match self {
            KvLayout::Vllm => CacheLayout::Vllm,
            _ => CacheLayout::Flash,
        }
    }

    /// The reshape op that writes caches of this layout.
    pub const fn reshape_op(self) -> &'static str {
        match self {
            KvLayout::Vllm => "reshape_and_cache",
            _ => "reshape_and_cache_flash",
        }
    }
}

impl std::fmt::Display for KvLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvLayout {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        KvLayout::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| format!("unknown layout {s:?} ({})", KvLayout::ALL.map(KvLayout::name).join(", ")))
    }
}

/// Sizes of a pair of caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    /// The model's float dtype (of the keys and values written into the caches).
    pub dtype: DType,
    /// The caches' element type (`auto`: `dtype`).
    pub cache: KvCacheDType,
    /// Blocks per cache.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// KV heads per token.
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
}

impl CacheShape {
    /// Elements of one block of one cache.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.num_kv_heads * self.head_size
    }

    /// Bytes of one block of one cache.
    pub fn block_bytes(&self) -> usize {
        self.block_elems() * self.cache.size_bytes(self.dtype)
    }

    /// The caches' tensor dtype.
    pub fn elem(&self) -> ScalarType {
        self.cache.fp8().map_or(ScalarType::from(self.dtype), ScalarType::of_fp8)
    }
}

/// What new caches hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// NaN everywhere, so an element an op did not write stays visible.
    Nan,
    /// Random non-zero values (so neither a zero nor a NaN passes for a copied element).
    Random,
}

/// A key and a value cache; for the combined layouts, two views of one allocation.
#[derive(Debug)]
pub struct KvCaches {
    /// How the two are laid out and allocated.
    pub layout: KvLayout,
    /// The key cache (a view of the shared allocation for the combined layouts).
    pub key: Tensor,
    /// The value cache.
    pub value: Tensor,
}

/// Uniform in `[-1, 1)` but never zero.
fn nonzero(rng: &mut Rng) -> f64 {
    let v = rng.uniform() as f64;
    if v == 0.0 { 0.5 } else { v }
}

/// A contiguous host tensor `[len]` of `fill`.
fn filled(dtype: ScalarType, len: usize, fill: Fill, rng: &mut Rng) -> Tensor {
    let mut t = Tensor::nan(dtype, &[len]);
    if fill == Fill::Random {
        let mut b = t.cpu_bytes_mut().expect("host tensor");
        for i in 0..len {
            dtype.write_f64(&mut b, i, nonzero(rng));
        }
    }
    t
}

/// A random non-zero host view `shape`/`strides` at `offset` over a storage of `len` elements
/// (random outside the view too).
pub fn random_view(dtype: ScalarType, shape: &[usize], strides: &[usize], offset: usize, len: usize, rng: &mut Rng) -> Result<Tensor> {
    filled(dtype, len, Fill::Random, rng).view(shape, strides, offset)
}

/// The same view over a copy of the storage made by `f`.
fn same_view(t: &Tensor, base: &Tensor) -> Result<Tensor> {
    base.view(t.shape(), t.strides(), t.offset())
}

impl KvCaches {
    /// New host caches of `layout`. `padded` (vLLM and NHD layouts only) puts them inside larger
    /// allocations with padded block and head (or slot) strides, 16 bytes in, keeping 16-byte rows.
    pub fn new(layout: KvLayout, shape: &CacheShape, padded: bool, fill: Fill, rng: &mut Rng) -> Result<KvCaches> {
        let st = shape.elem();
        KvCaches::build(layout, shape, padded, &mut |len| Ok(filled(st, len, fill, rng)))
    }

    /// New zeroed caches of `layout` in device memory (unpadded).
    pub fn zeros(gpu: &Gpu, layout: KvLayout, shape: &CacheShape) -> Result<KvCaches> {
        let st = shape.elem();
        KvCaches::build(layout, shape, false, &mut |len| gpu.zeros(st, &[len]))
    }

    /// Views of `layout` over flat allocations made by `alloc(elements)`.
    fn build(layout: KvLayout, shape: &CacheShape, padded: bool, alloc: &mut dyn FnMut(usize) -> Result<Tensor>) -> Result<KvCaches> {
        let (nb, bs, h, d, x) = (shape.num_blocks, shape.block_size, shape.num_kv_heads, shape.head_size, shape.cache.x(shape.dtype));
        let mut make = |shape: &[usize], strides: &[usize], offset: usize, len: usize| alloc(len)?.view(shape, strides, offset);
        let contiguous = |shape: &[usize]| (contiguous_strides(shape), shape.iter().product::<usize>());
        let (key, value) = match layout {
            KvLayout::Vllm => {
                let dx = d / x;
                let (ks, vs) = ([nb, h, dx, bs, x], [nb, h, d, bs]);
                if padded {
                    let (hs_k, bs_k) = (dx * bs * x + x, h * (dx * bs * x + x) + 2 * x);
                    let (hs_v, bs_v) = (d * bs + 1, h * (d * bs + 1) + 3);
                    (make(&ks, &[bs_k, hs_k, bs * x, x, 1], x, x + nb * bs_k)?, make(&vs, &[bs_v, hs_v, bs, 1], 2, 2 + nb * bs_v)?)
                } else {
                    let ((kst, kn), (vst, vn)) = (contiguous(&ks), contiguous(&vs));
                    (make(&ks, &kst, 0, kn)?, make(&vs, &vst, 0, vn)?)
                }
            }
            KvLayout::Nhd => {
                let s = [nb, bs, h, d];
                if padded {
                    let (slot, block) = (h * d + x, bs * (h * d + x) + 2 * x);
                    let strides = [block, slot, d, 1];
                    (make(&s, &strides, x, x + nb * block)?, make(&s, &strides, x, x + nb * block)?)
                } else {
                    let (st, n) = contiguous(&s);
                    (make(&s, &st, 0, n)?, make(&s, &st, 0, n)?)
                }
            }
            KvLayout::Hnd => {
                let page = bs * h * d;
                let strides = [page, d, bs * d, 1];
                (make(&[nb, bs, h, d], &strides, 0, nb * page)?, make(&[nb, bs, h, d], &strides, 0, nb * page)?)
            }
            KvLayout::Combined | KvLayout::CombinedInner => {
                let (s, axis) = if layout == KvLayout::Combined { ([2, nb, bs, h, d], 0) } else { ([nb, 2, bs, h, d], 1) };
                let (strides, n) = contiguous(&s);
                let kv = make(&s, &strides, 0, n)?;
                (kv.select(axis, 0)?, kv.select(axis, 1)?)
            }
        };
        Ok(KvCaches { layout, key, value })
    }

    /// The distinct storages of the pair (one for a combined allocation).
    pub fn storages(&self) -> Vec<&Tensor> {
        if self.key.shares_storage(&self.value) { vec![&self.key] } else { vec![&self.key, &self.value] }
    }

    /// Applies `f` (a copy to some memory) to both caches, keeping a combined pair one allocation.
    pub fn map(&self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<KvCaches> {
        let key = f(&self.key)?;
        let value = if self.key.shares_storage(&self.value) { same_view(&self.value, &key)? } else { f(&self.value)? };
        Ok(KvCaches { layout: self.layout, key, value })
    }

    /// A copy on `device`.
    pub fn upload(&self, device: &Device) -> Result<KvCaches> {
        self.map(|t| device.upload(t))
    }

    /// A copy in pageable host memory.
    pub fn to_cpu(&self) -> Result<KvCaches> {
        self.map(Tensor::to_cpu)
    }

    /// Views whose axes after the block axis are contiguous, as `copy_blocks` and `swap_blocks`
    /// take them: HND caches as `[num_blocks, H, block_size, D]`, the others unchanged.
    pub fn block_views(&self) -> Result<KvCaches> {
        if self.layout != KvLayout::Hnd {
            return self.map(|t| same_view(t, t));
        }
        let swap12 = |t: &Tensor| {
            let (s, st) = (t.shape(), t.strides());
            t.view(&[s[0], s[2], s[1], s[3]], &[st[0], st[2], st[1], st[3]], t.offset())
        };
        Ok(KvCaches { layout: self.layout, key: swap12(&self.key)?, value: swap12(&self.value)? })
    }

    /// The allocations behind the caches as contiguous tensors (host caches), named for a file:
    /// `kv_cache` for a combined pair, else `key_cache` and `value_cache` (HND ones as
    /// `[num_blocks, H, block_size, D]`, padded ones as their flat storage).
    pub fn allocations(&self) -> Result<Vec<(&'static str, Tensor)>> {
        let (k, ks) = (self.key.shape(), self.key.strides());
        let alloc_shape = match (self.layout, k) {
            // The `[num_blocks, block_size, H, D]` view of an HND cache has a slot stride below its
            // head stride; its block view is already `[num_blocks, H, block_size, D]`.
            (KvLayout::Hnd, &[nb, bs, h, d]) if ks[1] < ks[2] => vec![nb, h, bs, d],
            (KvLayout::Combined, &[nb, bs, h, d]) => vec![2, nb, bs, h, d],
            (KvLayout::CombinedInner, &[nb, bs, h, d]) => vec![nb, 2, bs, h, d],
            _ => k.to_vec(),
        };
        let whole = |t: &Tensor, shape: Vec<usize>| {
            let elems = t.storage().len_bytes() / t.dtype().size_bytes();
            let shape = if shape.iter().product::<usize>() == elems { shape } else { vec![elems] };
            t.view(&shape, &contiguous_strides(&shape), 0)
        };
        if self.key.shares_storage(&self.value) {
            return Ok(vec![("kv_cache", whole(&self.key, alloc_shape)?)]);
        }
        let value_shape = if self.layout == KvLayout::Vllm { self.value.shape().to_vec() } else { alloc_shape.clone() };
        Ok(vec![("key_cache", whole(&self.key, alloc_shape)?), ("value_cache", whole(&self.value, value_shape)?)])
    }
}

/// Bit-level comparison of storages.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BitCheck {
    /// Storage elements compared: the views and whatever else their allocations hold, so elements an
    /// op must not touch are checked too.
    pub elements: usize,
    /// Elements whose bits differ.
    pub mismatches: usize,
    /// Storage index of the first mismatch (in the first storage that has one).
    pub first_mismatch: Option<usize>,
    /// Largest |got − want| over mismatching elements that are both finite (0 if none).
    pub max_abs: f64,
}

impl BitCheck {
    /// No element differs (also true when nothing was compared).
    pub fn passes(&self) -> bool {
        self.mismatches == 0
    }

    /// The figures of both checks together: counts added, the first mismatch of `self` preferred,
    /// the larger `max_abs`.
    pub fn merge(self, other: BitCheck) -> BitCheck {
        BitCheck {
            elements: self.elements + other.elements,
            mismatches: self.mismatches + other.mismatches,
            first_mismatch: self.first_mismatch.or(other.first_mismatch),
            max_abs: self.max_abs.max(other.max_abs),
        }
    }
}

/// Compares the whole storages of two tensors of one dtype, wherever they live (device and pinned
/// tensors are copied to the host; synchronize before comparing pinned memory that asynchronous
/// copies wrote).
pub fn compare_storages(got: &Tensor, want: &Tensor) -> Result<BitCheck> {
    let (g, w) = (got.to_cpu()?, want.to_cpu()?);
    if g.dtype() != w.dtype() {
        return Err(Error::DType { op: "compare", tensor: "got", got: g.dtype(), expected: w.dtype().to_string() });
    }
    let (gb, wb) = (g.host_bytes()?, w.host_bytes()?);
    if gb.len() != wb.len() {
        return Err(Error::Value {
            op: "compare",
            what: "storage bytes",
            got: gb.len().to_string(),
            why: format!("the reference's storage has {} bytes", wb.len()),
        });
    }
    let (dt, es) = (g.dtype(), g.dtype().size_bytes());
    let mut check = BitCheck { elements: gb.len() / es, ..BitCheck::default() };
    for (i, (a, b)) in gb.chunks_exact(es).zip(wb.chunks_exact(es)).enumerate() {
        if a != b {
            check.mismatches += 1;
            check.first_mismatch.get_or_insert(i);
            let (x, y) = (dt.read_f64(a, 0), dt.read_f64(b, 0));
            if x.is_finite() && y.is_finite() {
                check.max_abs = check.max_abs.max((x - y).abs());
            }
        }
    }
    Ok(check)
}

/// Compares two pairs of caches storage by storage (a combined allocation once).
pub fn compare_caches(got: &KvCaches, want: &KvCaches) -> Result<BitCheck> {
    let key = compare_storages(&got.key, &want.key)?;
    if got.key.shares_storage(&got.value) {
        return Ok(key);
    }
    Ok(key.merge(compare_storages(&got.value, &want.value)?))
}

fn synchronize(device: &Device) -> Result<()> {
    match device {
        Device::Gpu(g) => g.synchronize(),
        Device::Cpu => Ok(()),
    }
}

/// A host table on `device`: device memory when `on_device`, else host memory (pinned for odd
/// seeds on the GPU, so both kinds of host table are exercised).
fn place_table(device: &Device, t: &Tensor, on_device: bool, seed: u64) -> Result<Tensor> {
    match device {
        _ if on_device => device.upload(t),
        Device::Gpu(g) if seed % 2 == 1 => t.to_pinned(g),
        _ => t.to_cpu(),
    }
}

// ---------------------------------------------------------------------------------------------
// reshape_and_cache, reshape_and_cache_flash
// ---------------------------------------------------------------------------------------------

/// Runs the reshape op of `layout` (vLLM's or the flash layout) into `caches` (fp8 caches with
/// `scales`).
pub fn reshape(
    device: &Device,
    layout: CacheLayout,
    key: &Tensor,
    value: &Tensor,
    caches: &mut KvCaches,
    slots: &Tensor,
    scales: Option<Fp8Scales>,
) -> Result<()> {
    let (kc, vc) = (&mut caches.key, &mut caches.value);
    match (layout, scales) {
        (CacheLayout::Vllm, None) => reshape_and_cache(device, key, value, kc, vc, slots),
        (CacheLayout::Flash, None) => reshape_and_cache_flash(device, key, value, kc, vc, slots),
        (CacheLayout::Vllm, Some(s)) => reshape_and_cache_fp8(device, key, value, kc, vc, slots, s),
        (CacheLayout::Flash, Some(s)) => reshape_and_cache_flash_fp8(device, key, value, kc, vc, slots, s),
    }
}

/// One `reshape_and_cache` (layout [`KvLayout::Vllm`]) or `reshape_and_cache_flash` (the others)
/// case: each sequence writes its new tokens to consecutive positions, from a random offset in its
/// first block, through its own blocks shuffled over the cache (2 spare blocks no token names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReshapeCase {
    /// The caches' layout (which op runs).
    pub layout: KvLayout,
    /// The keys' and values' dtype.
    pub dtype: DType,
    /// The caches' element type (fp8: quantized with [`ReshapeCase::FP8_SCALES`]).
    pub cache: KvCacheDType,
    /// KV heads per token.
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// New tokens per sequence.
    pub seq_lens: Vec<usize>,
    /// Padding tokens (slot -1, skipped), mixed in among the others at random positions.
    pub padding: usize,
    /// Key and value rows (tokens) padded by this many elements: a token stride larger than a row.
    pub row_pad: usize,
    /// Key and value views start this many elements into their storage (not a multiple of x: rows
    /// are not 16-byte aligned).
    pub kv_offset: usize,
    /// Caches inside larger allocations with padded strides ([`KvCaches::new`]).
    pub padded_caches: bool,
    /// Caches start NaN (else random): either way every element of their allocations is compared.
    pub nan_caches: bool,
    /// `slot_mapping` in device memory (guarded by the kernel), else host memory (checked, then uploaded).
    pub device_slots: bool,
    /// Seed of the inputs, the slot offsets and the block shuffle.
    pub seed: u64,
}

/// Host inputs of a [`ReshapeCase`].
#[derive(Debug)]
pub struct ReshapeInputs {
    /// `[num_tokens + 2, H, D]`: the two rows past the mapping are not read (vLLM pads key and value).
    pub key: Tensor,
    /// `[num_tokens + 2, H, D]`, as `key`.
    pub value: Tensor,
    /// The caches before the op (NaN or random, as the case says).
    pub caches: KvCaches,
    /// `[num_tokens]` i64, host.
    pub slot_mapping: Tensor,
    /// Blocks per cache: the sequences' blocks plus 2 spare ones.
    pub num_blocks: usize,
    /// fp8 caches: `[1]` f32 `k_scale`, `v_scale` (host).
    pub scales: Option<(Tensor, Tensor)>,
}

impl std::fmt::Display for ReshapeCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lens = if self.seq_lens.len() <= 6 {
            format!("{:?}", self.seq_lens)
        } else {
            format!("[{} seqs, {} tokens]", self.seq_lens.len(), self.seq_lens.iter().sum::<usize>())
        };
        write!(
            f,
            "{} {} {}{} h{} b{} kv-heads {} tokens {lens}",
            self.layout.reshape_op(),
            self.layout,
            self.dtype,
            if self.cache == KvCacheDType::Auto { String::new() } else { format!(" -> {}", self.cache) },
            self.head_size,
            self.block_size,
            self.num_kv_heads
        )?;
        if self.padding > 0 {
            write!(f, " +{} padding", self.padding)?;
        }
        if self.row_pad > 0 || self.kv_offset > 0 {
            write!(f, " rows +{}@{}", self.row_pad, self.kv_offset)?;
        }
        for (on, what) in [(self.padded_caches, " padded-caches"), (self.nan_caches, " nan-caches"), (self.device_slots, " device-slots")] {
            if on {
                f.write_str(what)?;
            }
        }
        write!(f, " seed {}", self.seed)
    }
}

impl ReshapeCase {
    /// Contiguous key and value, NaN caches, host slots, no padding.
    pub fn new(
        layout: KvLayout,
        dtype: DType,
        num_kv_heads: usize,
        head_size: usize,
        block_size: usize,
        seq_lens: Vec<usize>,
        seed: u64,
    ) -> Self {
        ReshapeCase {
            layout,
            dtype,
            cache: KvCacheDType::Auto,
            num_kv_heads,
            head_size,
            block_size,
            seq_lens,
            padding: 0,
            row_pad: 0,
            kv_offset: 0,
            padded_caches: false,
            nan_caches: true,
            device_slots: false,
            seed,
        }
    }

    /// Entries of `slot_mapping`: every sequence's tokens plus the padding.
    pub fn num_tokens(&self) -> usize {
        self.seq_lens.iter().sum::<usize>() + self.padding
    }

    /// Random host inputs of the case (deterministic from `seed`).
    pub fn inputs(&self) -> Result<ReshapeInputs> {
        let (h, d, bs) = (self.num_kv_heads, self.head_size, self.block_size);
        if bs == 0 {
            return Err(Error::Value { op: self.layout.reshape_op(), what: "block_size", got: "0".into(), why: "must be positive".into() });
        }
        let mut rng = Rng::new(self.seed);
        let starts: Vec<usize> = self.seq_lens.iter().map(|_| rng.below(bs)).collect();
        let blocks_of = |s: usize| if self.seq_lens[s] == 0 { 0 } else { (starts[s] + self.seq_lens[s]).div_ceil(bs) };
        let num_blocks = (0..self.seq_lens.len()).map(blocks_of).sum::<usize>() + 2;
        let mut perm: Vec<i64> = (0..num_blocks as i64).collect();
        rng.shuffle(&mut perm);
        let mut slots = Vec::with_capacity(self.num_tokens());
        let mut next = 0;
        for (s, &len) in self.seq_lens.iter().enumerate() {
            for pos in starts[s]..starts[s] + len {
                slots.push(perm[next + pos / bs] * bs as i64 + (pos % bs) as i64);
            }
            next += blocks_of(s);
        }
        for _ in 0..self.padding {
            let at = rng.below(slots.len() + 1);
            slots.insert(at, -1);
        }
        let st = ScalarType::from(self.dtype);
        let rows = slots.len() + 2;
        let tok = h * d + self.row_pad;
        let len = self.kv_offset + rows * tok;
        let key = random_view(st, &[rows, h, d], &[tok, d, 1], self.kv_offset, len, &mut rng)?;
        let value = random_view(st, &[rows, h, d], &[tok, d, 1], self.kv_offset, len, &mut rng)?;
        let shape = CacheShape { dtype: self.dtype, cache: self.cache, num_blocks, block_size: bs, num_kv_heads: h, head_size: d };
        let fill = if self.nan_caches { Fill::Nan } else { Fill::Random };
        let caches = KvCaches::new(self.layout, &shape, self.padded_caches, fill, &mut rng)?;
        let scales = match self.cache {
            KvCacheDType::Auto => None,
            KvCacheDType::Fp8(_) => {
                let (k, v) = Self::FP8_SCALES;
                Some((Tensor::from_f32(DType::F32, &[1], &[k])?, Tensor::from_f32(DType::F32, &[1], &[v])?))
            }
        };
        Ok(ReshapeInputs { key, value, caches, slot_mapping: Tensor::from_i64(&[slots.len()], &slots)?, num_blocks, scales })
    }

    /// `(k_scale, v_scale)` of fp8 cases: inputs in [-1, 1) become codes up to ±8 and ±40, with
    /// round-to-nearest ties and subnormals among them.
    pub const FP8_SCALES: (f32, f32) = (0.125, 0.025);

    /// Runs the op on `device` over copies of `inp`; returns the caches (on `device`; synchronized).
    pub fn run(&self, device: &Device, inp: &ReshapeInputs) -> Result<KvCaches> {
        let (key, value) = (device.upload(&inp.key)?, device.upload(&inp.value)?);
        let mut caches = inp.caches.upload(device)?;
        let slots = place_table(device, &inp.slot_mapping, self.device_slots, self.seed)?;
        let scales = inp.scales.as_ref().map(|(k, v)| Ok::<_, Error>((device.upload(k)?, device.upload(v)?))).transpose()?;
        let scales = scales.as_ref().map(|(k, v)| Fp8Scales { k_scale: k, v_scale: v });
        reshape(device, self.layout.cache_layout(), &key, &value, &mut caches, &slots, scales)?;
        synchronize(device)?;
        Ok(caches)
    }
}

/// Runs `case` on `device` and on the CPU backend and compares the caches bit for bit.
pub fn check_reshape(device: &Device, case: &ReshapeCase) -> Result<BitCheck> {
    let inp = case.inputs()?;
    let want = case.run(&Device::Cpu, &inp)?;
    let got = case.run(device, &inp)?;
    compare_caches(&got, &want)
}

/// The verification grid of one reshape op: every dtype × head size × block size (`flash`: the
/// four flash layouts in turn), with GQA-style KV head counts (1, 2, 4, 8), runs of tokens crossing
/// blocks, padding slots, strided and misaligned key/value rows, padded caches, NaN or random
/// caches and host or device slots rotated across cases; then the fp8 caches (both kinds, every
/// input dtype and fp8 head size, block sizes rotated).
pub fn reshape_grid(flash: bool) -> Vec<ReshapeCase> {
    let mut cases = Vec::new();
    // Case `i` of the grid: the layout, KV head count, row padding/offset, cache padding and fill,
    // slot placement and seed rotate with `i`.
    let case = |i: usize, dtype: DType, cache: KvCacheDType, head_size: usize, block_size: usize| {
        let layout = if flash { KvLayout::FLASH[i % 4] } else { KvLayout::Vllm };
        let x = dtype.x();
        let (row_pad, kv_offset) = [(0, 0), (x, 0), (0, x), (3, 1)][i / 4 % 4];
        ReshapeCase {
            layout,
            dtype,
            cache,
            num_kv_heads: [1, 2, 4, 8][i % 4],
            head_size,
            block_size,
            seq_lens: vec![1, 5 + i % 11, 17 + (i * 13) % 50],
            padding: 1 + i % 3,
            row_pad,
            kv_offset,
            padded_caches: matches!(layout, KvLayout::Vllm | KvLayout::Nhd) && i % 3 == 1,
            nan_caches: i.is_multiple_of(2),
            device_slots: i % 5 < 2,
            seed: 7000 + i as u64 + if flash { 1000 } else { 0 },
        }
    };
    let mut i = 0usize;
    for &dtype in DTYPES {
        for &head_size in HEAD_SIZES {
            for &block_size in BLOCK_SIZES {
                cases.push(case(i, dtype, KvCacheDType::Auto, head_size, block_size));
                i += 1;
            }
        }
    }
    // fp8 caches: every dtype × kind × fp8 head size, block sizes rotated.
    for &dtype in DTYPES {
        for kind in Fp8Kind::ALL {
            for &head_size in FP8_HEAD_SIZES {
                cases.push(case(i, dtype, KvCacheDType::Fp8(kind), head_size, BLOCK_SIZES[i % BLOCK_SIZES.len()]));
                i += 1;
            }
        }
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// copy_blocks
// ---------------------------------------------------------------------------------------------

/// One `copy_blocks` case: `num_layers` layers of random caches, `num_pairs` pairs whose sources
/// and destinations are distinct blocks (no block both read and written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyBlocksCase {
    /// Every layer's cache layout.
    pub layout: KvLayout,
    /// The caches' element type.
    pub dtype: DType,
    /// KV heads per token.
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Blocks per cache, at least `2 * num_pairs`.
    pub num_blocks: usize,
    /// Layers, each a key and a value cache.
    pub num_layers: usize,
    /// `(src, dst)` pairs copied in every layer.
    pub num_pairs: usize,
    /// `block_mapping` in device memory (guarded by the kernel), else host memory.
    pub device_mapping: bool,
    /// Seed of the caches and of the block shuffle.
    pub seed: u64,
}

/// Host inputs of a [`CopyBlocksCase`].
#[derive(Debug)]
pub struct CopyBlocksInputs {
    /// Per layer, as [`KvCaches::block_views`].
    pub layers: Vec<KvCaches>,
    /// `[num_pairs, 2]` i64, host.
    pub block_mapping: Tensor,
}

impl std::fmt::Display for CopyBlocksCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "copy_blocks {} {} h{} b{} kv-heads {} layers {} pairs {} blocks {}{} seed {}",
            self.layout,
            self.dtype,
            self.head_size,
            self.block_size,
            self.num_kv_heads,
            self.num_layers,
            self.num_pairs,
            self.num_blocks,
            if self.device_mapping { " device-mapping" } else { "" },
            self.seed
        )
    }
}

impl CopyBlocksCase {
    /// The shape of each layer's caches (`auto` cache dtype).
    pub fn shape(&self) -> CacheShape {
        CacheShape {
            cache: KvCacheDType::Auto,
            dtype: self.dtype,
            num_blocks: self.num_blocks,
            block_size: self.block_size,
            num_kv_heads: self.num_kv_heads,
            head_size: self.head_size,
        }
    }

    /// Random host inputs of the case (deterministic from `seed`); [`Error::Value`] when
    /// `num_blocks < 2 * num_pairs`.
    pub fn inputs(&self) -> Result<CopyBlocksInputs> {
        if self.num_blocks < 2 * self.num_pairs {
            return Err(Error::Value {
                op: "copy_blocks",
                what: "num_blocks",
                got: self.num_blocks.to_string(),
                why: format!("{} pairs of distinct blocks need at least {}", self.num_pairs, 2 * self.num_pairs),
            });
        }
        let mut rng = Rng::new(self.seed);
        let shape = self.shape();
        let layers = (0..self.num_layers)
            .map(|_| KvCaches::new(self.layout, &shape, false, Fill::Random, &mut rng)?.block_views())
            .collect::<Result<_>>()?;
        let mut perm: Vec<i64> = (0..self.num_blocks as i64).collect();
        rng.shuffle(&mut perm);
        let n = self.num_pairs;
        let pairs: Vec<i64> = (0..n).flat_map(|i| [perm[i], perm[n + i]]).collect();
        Ok(CopyBlocksInputs { layers, block_mapping: Tensor::from_i64(&[n, 2], &pairs)? })
    }

    /// Runs `copy_blocks` on `device` over copies of `inp`; returns the layers' caches (on `device`; synchronized).
    pub fn run(&self, device: &Device, inp: &CopyBlocksInputs) -> Result<Vec<KvCaches>> {
        let mut layers = inp.layers.iter().map(|c| c.upload(device)).collect::<Result<Vec<_>>>()?;
        let mapping = place_table(device, &inp.block_mapping, self.device_mapping, self.seed)?;
        run_copy_blocks(device, &mut layers, &mapping)?;
        synchronize(device)?;
        Ok(layers)
    }
}

/// `copy_blocks` over every layer of `layers`.
pub fn run_copy_blocks(device: &Device, layers: &mut [KvCaches], mapping: &Tensor) -> Result<()> {
    let (mut keys, mut values): (Vec<&mut Tensor>, Vec<&mut Tensor>) = layers.iter_mut().map(|c| (&mut c.key, &mut c.value)).unzip();
    copy_blocks(device, &mut keys, &mut values, mapping)
}

/// Runs `case` on `device` and on the CPU backend and compares every layer bit for bit.
pub fn check_copy_blocks(device: &Device, case: &CopyBlocksCase) -> Result<BitCheck> {
    let inp = case.inputs()?;
    let want = case.run(&Device::Cpu, &inp)?;
    let got = case.run(device, &inp)?;
    got.iter().zip(&want).try_fold(BitCheck::default(), |acc, (g, w)| Ok(acc.merge(compare_caches(g, w)?)))
}

/// The verification grid of `copy_blocks`: every dtype × layout × host or device mapping, over 1–4
/// layers, rotating head and block sizes and KV head counts.
pub fn copy_blocks_grid() -> Vec<CopyBlocksCase> {
    let mut cases = Vec::new();
    let mut i = 0usize;
    for &dtype in DTYPES {
        for layout in KvLayout::ALL {
            for device_mapping in [false, true] {
                let num_pairs = 1 + (i * 5) % 9;
                cases.push(CopyBlocksCase {
                    layout,
                    dtype,
                    num_kv_heads: [1, 2, 4, 8][i % 4],
                    head_size: HEAD_SIZES[(i * 7) % HEAD_SIZES.len()],
                    block_size: BLOCK_SIZES[(i * 5) % BLOCK_SIZES.len()].min(64),
                    num_blocks: 2 * num_pairs + 1 + i % 4,
                    num_layers: 1 + i % 4,
                    num_pairs,
                    device_mapping,
                    seed: 9000 + i as u64,
                });
                i += 1;
            }
        }
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// swap_blocks
// ---------------------------------------------------------------------------------------------

/// Where `swap_blocks` copies from and to. On the CPU backend both ends are host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SwapDirection {
    /// GPU cache to pinned host memory (swap out).
    DeviceToHost,
    /// Pinned host memory to a GPU cache (swap in).
    HostToDevice,
    /// Between two GPU caches.
    DeviceToDevice,
}

impl SwapDirection {
    /// Every direction, in the order above.
    pub const ALL: [SwapDirection; 3] = [SwapDirection::DeviceToHost, SwapDirection::HostToDevice, SwapDirection::DeviceToDevice];

    /// The CLI name: `"d2h"`, `"h2d"` or `"d2d"` (also its [`Display`](std::fmt::Display) and what
    /// [`FromStr`](std::str::FromStr) parses).
    pub const fn name(self) -> &'static str {
        match self {
            SwapDirection::DeviceToHost => "d2h",
            SwapDirection::HostToDevice => "h2d",
            SwapDirection::DeviceToDevice => "d2d",
        }
    }

    /// Whether the source (the destination) is host memory.
    pub const fn host_ends(self) -> (bool, bool) {
        match self {
            SwapDirection::DeviceToHost => (false, true),
            SwapDirection::HostToDevice => (true, false),
            SwapDirection::DeviceToDevice => (false, false),
        }
    }
}

impl std::fmt::Display for SwapDirection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SwapDirection {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        SwapDirection::ALL.into_iter().find(|d| d.name() == s).ok_or_else(|| format!("unknown direction {s:?} (d2h, h2d or d2d)"))
    }
}

/// Places a tensor for one end of a swap: pinned host memory for a host end on the GPU, device
/// memory for a device end, pageable memory on the CPU backend.
pub fn swap_end(device: &Device, t: &Tensor, host_end: bool) -> Result<Tensor> {
    match device {
        Device::Gpu(g) if host_end => t.to_pinned(g),
        _ => device.upload(t),
    }
}

/// One `swap_blocks` case: the key and the value cache of one layer (two calls, as vLLM swaps
/// them), `num_pairs` blocks with distinct destinations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapCase {
    /// Where the blocks are copied from and to.
    pub direction: SwapDirection,
    /// Both ends' cache layout.
    pub layout: KvLayout,
    /// The caches' element type.
    pub dtype: DType,
    /// KV heads per token.
    pub num_kv_heads: usize,
    /// Elements per head vector.
    pub head_size: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Blocks per source cache.
    pub src_blocks: usize,
    /// Blocks per destination cache.
    pub dst_blocks: usize,
    /// At most `min(src_blocks, dst_blocks)`.
    pub num_pairs: usize,
    /// Seed of the caches and of the block shuffles.
    pub seed: u64,
}

/// Host inputs of a [`SwapCase`] ([`KvCaches::block_views`]).
#[derive(Debug)]
pub struct SwapInputs {
    /// Random source caches.
    pub src: KvCaches,
    /// Random before the swap, so untouched blocks are checked.
    pub dst: KvCaches,
    /// `[num_pairs, 2]` i64, host.
    pub block_mapping: Tensor,
}

impl std::fmt::Display for SwapCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "swap_blocks {} {} {} h{} b{} kv-heads {} pairs {} blocks {}->{} seed {}",
            self.direction,
            self.layout,
            self.dtype,
            self.head_size,
            self.block_size,
            self.num_kv_heads,
            self.num_pairs,
            self.src_blocks,
            self.dst_blocks,
            self.seed
        )
    }
}

impl SwapCase {
    /// Random host inputs of the case (deterministic from `seed`); [`Error::Value`] when `num_pairs`
    /// exceeds either cache's block count.
    pub fn inputs(&self) -> Result<SwapInputs> {
        if self.num_pairs > self.src_blocks.min(self.dst_blocks) {
            return Err(Error::Value {
                op: "swap_blocks",
                what: "num_pairs",
                got: self.num_pairs.to_string(),
                why: format!("at most min(src_blocks, dst_blocks) = {}", self.src_blocks.min(self.dst_blocks)),
            });
        }
        let mut rng = Rng::new(self.seed);
        let shape = |num_blocks| CacheShape {
            cache: KvCacheDType::Auto,
            dtype: self.dtype,
            num_blocks,
            block_size: self.block_size,
            num_kv_heads: self.num_kv_heads,
            head_size: self.head_size,
        };
        let src = KvCaches::new(self.layout, &shape(self.src_blocks), false, Fill::Random, &mut rng)?.block_views()?;
        let dst = KvCaches::new(self.layout, &shape(self.dst_blocks), false, Fill::Random, &mut rng)?.block_views()?;
        let (mut from, mut to): (Vec<i64>, Vec<i64>) = ((0..self.src_blocks as i64).collect(), (0..self.dst_blocks as i64).collect());
        rng.shuffle(&mut from);
        rng.shuffle(&mut to);
        let pairs: Vec<i64> = (0..self.num_pairs).flat_map(|i| [from[i], to[i]]).collect();
        Ok(SwapInputs { src, dst, block_mapping: Tensor::from_i64(&[self.num_pairs, 2], &pairs)? })
    }

    /// Runs the two swaps on `device` over copies of `inp` placed for the direction; returns the
    /// destination caches (on `device` or pinned; synchronized).
    pub fn run(&self, device: &Device, inp: &SwapInputs) -> Result<KvCaches> {
        let (src_host, dst_host) = self.direction.host_ends();
        let src = inp.src.map(|t| swap_end(device, t, src_host))?;
        let mut dst = inp.dst.map(|t| swap_end(device, t, dst_host))?;
        swap_blocks(device, &src.key, &mut dst.key, &inp.block_mapping)?;
        swap_blocks(device, &src.value, &mut dst.value, &inp.block_mapping)?;
        // Before `src` is dropped or `dst` read: the copies are not tracked.
        synchronize(device)?;
        Ok(dst)
    }
}

/// Runs `case` on `device` and on the CPU backend and compares the destination caches bit for bit.
pub fn check_swap(device: &Device, case: &SwapCase) -> Result<BitCheck> {
    let inp = case.inputs()?;
    let want = case.run(&Device::Cpu, &inp)?;
    let got = case.run(device, &inp)?;
    compare_caches(&got, &want)
}

/// The verification grid of `swap_blocks`: every dtype × direction × layout (vLLM's, NHD, both
/// combined ones: a host end is then one half of a pinned combined cache).
pub fn swap_grid() -> Vec<SwapCase> {
    let mut cases = Vec::new();
    let mut i = 0usize;
    for &dtype in DTYPES {
        for direction in SwapDirection::ALL {
            for layout in [KvLayout::Vllm, KvLayout::Nhd, KvLayout::Combined, KvLayout::CombinedInner] {
                // Every third case swaps 30 scattered blocks: more runs than `SWAP_KERNEL_MIN_RUNS`,
                // so the kernel path runs; the others take the copy-engine path.
                let many = i % 3 == 2;
                let (src_blocks, dst_blocks) = if many {
                    (40 + i % 5, 36)
                } else if i.is_multiple_of(2) {
                    (9 + i % 5, 6)
                } else {
                    (6, 9 + i % 5)
                };
                cases.push(SwapCase {
                    direction,
                    layout,
                    dtype,
                    num_kv_heads: [1, 2, 4, 8][i % 4],
                    head_size: HEAD_SIZES[(i * 5) % HEAD_SIZES.len()],
                    block_size: [8, 16, 32][i % 3],
                    src_blocks,
                    dst_blocks,
                    num_pairs: if many { 30 } else { 1 + i % 6 },
                    seed: 11000 + i as u64,
                });
                i += 1;
            }
        }
    }
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case of every grid runs on the CPU backend and agrees with itself, and the layouts
    /// are what they claim (combined caches share one allocation).
    #[test]
    fn grids_run_on_the_cpu_backend() {
        for flash in [false, true] {
            for c in reshape_grid(flash).iter().step_by(7) {
                assert!(check_reshape(&Device::Cpu, c).unwrap_or_else(|e| panic!("{c}: {e}")).passes(), "{c}");
            }
        }
        for c in copy_blocks_grid().iter().step_by(3) {
            assert!(check_copy_blocks(&Device::Cpu, c).unwrap_or_else(|e| panic!("{c}: {e}")).passes(), "{c}");
        }
        for c in swap_grid().iter().step_by(3) {
            assert!(check_swap(&Device::Cpu, c).unwrap_or_else(|e| panic!("{c}: {e}")).passes(), "{c}");
        }
    }

    /// A reshape writes exactly the tokens' rows: the NaN caches hold `num_tokens - padding` tokens.
    #[test]
    fn reshape_case_writes_each_token_once() {
        for layout in KvLayout::ALL {
            let mut c = ReshapeCase::new(layout, DType::F16, 2, 64, 16, vec![3, 20, 1], 5);
            c.padding = 2;
            let inp = c.inputs().unwrap();
            assert_eq!(inp.slot_mapping.to_i64_vec().iter().filter(|&&s| s < 0).count(), 2);
            let out = c.run(&Device::Cpu, &inp).unwrap();
            let written = |t: &Tensor| t.to_cpu().unwrap().to_f64_vec().iter().filter(|v| !v.is_nan()).count();
            assert_eq!(written(&out.key), 24 * 2 * 64, "{layout}");
            assert_eq!(written(&out.value), 24 * 2 * 64, "{layout}");
            assert_eq!(out.key.shares_storage(&out.value), matches!(layout, KvLayout::Combined | KvLayout::CombinedInner));
            let allocs = out.allocations().unwrap();
            let elems: usize = allocs.iter().map(|(_, t)| t.numel()).sum();
            assert_eq!(elems, 2 * inp.num_blocks * 16 * 2 * 64, "{layout}: allocations cover both caches");
        }
    }

    #[test]
    fn compare_counts_mismatching_elements() {
        let a = Tensor::from_f32(DType::BF16, &[4], &[1.0, 2.0, f32::NAN, 4.0]).unwrap();
        let b = Tensor::from_f32(DType::BF16, &[4], &[1.0, 2.5, f32::NAN, -4.0]).unwrap();
        let c = compare_storages(&a, &b).unwrap();
        assert_eq!((c.elements, c.mismatches, c.first_mismatch, c.max_abs), (4, 2, Some(1), 8.0));
        assert!(compare_storages(&a, &a.to_cpu().unwrap()).unwrap().passes());
    }

    #[test]
    fn names_parse_back() {
        for l in KvLayout::ALL {
            assert_eq!(l.name().parse::<KvLayout>(), Ok(l));
        }
        for d in SwapDirection::ALL {
            assert_eq!(d.name().parse::<SwapDirection>(), Ok(d));
        }
        assert!("nchw".parse::<KvLayout>().is_err());
    }
}
