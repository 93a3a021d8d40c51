//! CUDA graphs: record a sequence of ops on the GPU's stream once, then replay it with one launch
//! and no host work per op (no validation, no dispatch, no argument packing).
//!
//! Every op reads its device-side inputs (block tables, sequence lengths, slot mappings, fp8 scales)
//! from device memory at each launch, so a replay sees whatever the caller wrote there since: update
//! them in place (same allocations) between replays. Shapes, host scalars and the chosen kernels are
//! fixed at capture; paged attention's choice between v1 and v2 depends only on the workspace's
//! bound, never on device data, so a captured decode step stays valid while lengths grow up to it.
//!
//! ```no_run
//! # fn step(_: &pagedattn::Device) -> pagedattn::Result<()> { Ok(()) }
//! # fn main() -> pagedattn::Result<()> {
//! let device = pagedattn::Device::auto();
//! if let pagedattn::Device::Gpu(gpu) = &device {
//!     let graph = gpu.capture(|| step(&device))?; // e.g. reshape_and_cache + paged_attention
//!     for _ in 0..100 {
//!         // write the next step's slots, lengths and queries into the same device tensors, then:
//!         graph.replay()?;
//!     }
//!     gpu.synchronize()?;
//! }
//! # Ok(()) }
//! ```

use cudarc::driver::{CudaGraph, sys};

use crate::cache::{CacheLayout, Fp8Scales};
use crate::device::{Device, Gpu};
use crate::error::{Error, Result};
use crate::flash_attn::FlashAttnVarlenArgs;
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::paged_attention::{PagedAttentionArgs, PagedAttentionWorkspace, Version};
use crate::tensor::{ScalarType, Tensor};

/// A captured, instantiated sequence of launches on one [`Gpu`]'s stream.
pub struct Graph {
    inner: CudaGraph,
}

impl Gpu {
    /// Records the work `record` enqueues on this GPU's stream into a graph instead of running it.
    /// The ops inside must take device-resident tables (a host table is uploaded with a copy from
    /// pageable memory, which capture refuses) and must not synchronize; an op's error, or one from
    /// the driver, ends the capture and is returned.
    pub fn capture(&self, record: impl FnOnce() -> Result<()>) -> Result<Graph> {
        let stream = self.stream();
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let recorded = record();
        // End the capture whatever happened, so the stream leaves capture mode.
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        match ended? {
            Some(inner) => {
                inner.upload()?;
                Ok(Graph { inner })
            }
            None => {
                Err(Error::Value { op: "capture", what: "recorded work", got: "none".into(), why: "the closure enqueued nothing".into() })
            }
        }
    }
}

impl Graph {
    /// Enqueues one replay of the whole graph on the stream it was captured from (asynchronous).
    pub fn replay(&self) -> Result<()> {
        Ok(self.inner.launch()?)
    }
}

/// One decode step of a model's attention over a [`KvCache`], for a fixed batch bound and length
/// bound: for every layer, append each sequence's new key and value to the cache, then attend its
/// query over the sequence's cached keys ([`crate::paged_attention()`] for a vLLM-layout cache,
/// [`crate::flash_attn_varlen_func`] with one query per sequence for a flash-layout one).
///
/// The inputs live in device tensors owned by the step and are overwritten in place by
/// [`DecodeStep::set_inputs`], so on the GPU the whole step is captured once into a CUDA graph
/// ([`DecodeStep::new`]) and [`DecodeStep::run`] is one graph launch. On the CPU backend `run`
/// calls the same ops directly: the same API on both. Fewer sequences than the bound are padded
/// (slot `-1`: nothing written; length 0: a zero output row). [`DecodeStep::run_eager`] launches
/// the ops one by one (to compare with the graph).
///
/// The step keeps the cache's tensors alive (it holds views of them), and the cache's per-layer
/// fp8 scales are read at each run, so [`KvCache::set_scales`] between runs takes effect.
pub struct DecodeStep {
    batch: usize,
    max_seq_len: usize,
    max_blocks: usize,
    num_heads: usize,
    scale: f32,
    config: KvCacheConfig,
    /// Views of the cache's tensors: keys, values, and fp8 scales per layer.
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    scales: Vec<(Tensor, Tensor)>,
    /// `[num_layers, batch, num_heads, head_size]` queries, `[num_layers, batch, num_kv_heads,
    /// head_size]` new keys and values, on the device; host staging copies of the three.
    query: Tensor,
    key: Tensor,
    value: Tensor,
    staging: [Tensor; 3],
    /// `[batch]` i64 slots, `[batch, max_blocks]` i32 tables, `[batch]` i32 lengths,
    /// `[batch + 1]` i32 query offsets (`0, 1, .., batch`, the flash layout's).
    slots: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    cu_seqlens_q: Tensor,
    /// `[num_layers, batch, num_heads, head_size]`.
    out: Tensor,
    workspace: PagedAttentionWorkspace,
    graph: Option<Graph>,
}

impl DecodeStep {
    /// Allocates the step's inputs for up to `batch` sequences of at most `max_seq_len` tokens
    /// (their new token included) with `num_heads` query heads and softmax scale `scale`, runs it
    /// once on padding (loading its kernels), and on the GPU captures it into a graph.
    pub fn new(device: &Device, cache: &KvCache, batch: usize, max_seq_len: usize, num_heads: usize, scale: f32) -> Result<DecodeStep> {
        const OP: &str = "DecodeStep";
        let c = *cache.config();
        let value = |what, got: usize, why: String| Err(Error::Value { op: OP, what, got: got.to_string(), why });
        if batch == 0 {
            return value("batch", 0, "must be positive".into());
        }
        if num_heads == 0 || !num_heads.is_multiple_of(c.num_kv_heads) {
            return value("num_heads", num_heads, format!("must be a positive multiple of num_kv_heads = {}", c.num_kv_heads));
        }
        if max_seq_len == 0 || max_seq_len > c.num_blocks * c.block_size {
            return value("max_seq_len", max_seq_len, format!("must be in 1..={} (the cache's slots)", c.num_blocks * c.block_size));
        }
        let max_blocks = max_seq_len.div_ceil(c.block_size);
        let (l, d) = (c.num_layers, c.head_size);
        let host = |dtype: ScalarType, shape: &[usize]| {
            Tensor::from_bytes(dtype, shape, vec![0; shape.iter().product::<usize>() * dtype.size_bytes()])
        };
        let staging = [
            host(c.dtype, &[l, batch, num_heads, d])?,
            host(c.dtype, &[l, batch, c.num_kv_heads, d])?,
            host(c.dtype, &[l, batch, c.num_kv_heads, d])?,
        ];
        let up = |t: &Tensor| device.upload(t);
        let cu: Vec<i32> = (0..=batch as i32).collect();
        let mut step = DecodeStep {
            batch,
            max_seq_len,
            max_blocks,
            num_heads,
            scale,
            config: c,
            keys: (0..l).map(|i| cache.key(i).alias()).collect(),
            values: (0..l).map(|i| cache.value(i).alias()).collect(),
            scales: (0..l).filter_map(|i| cache.scales(i).map(|(k, v)| (k.alias(), v.alias()))).collect(),
            query: up(&staging[0])?,
            key: up(&staging[1])?,
            value: up(&staging[2])?,
            slots: up(&Tensor::from_i64(&[batch], &vec![-1; batch])?)?,
            block_tables: up(&host(ScalarType::I32, &[batch, max_blocks])?)?,
            seq_lens: up(&host(ScalarType::I32, &[batch])?)?,
            cu_seqlens_q: up(&Tensor::from_i32(&[batch + 1], &cu)?)?,
            out: device.nan(c.dtype, &[l, batch, num_heads, d])?,
            workspace: PagedAttentionWorkspace::new(device, batch, num_heads, d, max_seq_len)?,
            graph: None,
            staging,
        };
        step.run_eager(device)?;
        if let Device::Gpu(gpu) = device {
            gpu.synchronize()?;
            let graph = gpu.capture(|| step.record(device))?;
            step.graph = Some(graph);
        }
        Ok(step)
    }

    /// The sequence bound it was made for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Query heads.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// The length bound it was made for.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Block-table width: `ceil(max_seq_len / block_size)`.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// The output of the last run: `[num_layers, batch, num_heads, head_size]` on the device (rows
    /// past the last [`DecodeStep::set_inputs`] call's sequences are padding: zeros).
    pub fn output(&self) -> &Tensor {
        &self.out
    }

    /// Writes the next step's inputs into the step's device tensors (queued on the stream, in
    /// order with the runs), after checking them all on the host (nothing is written when one is
    /// wrong): [`DecodeStep::set_qkv`]'s and [`DecodeStep::set_tables`]'s arguments, with as many
    /// sequences in `query` as in `seq_lens`.
    pub fn set_inputs(
        &mut self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        slots: &[i64],
        block_tables: &[i32],
        seq_lens: &[i32],
    ) -> Result<()> {
        let n = self.check_qkv(query, key, value)?;
        self.check_tables(slots, block_tables, seq_lens)?;
        if n != seq_lens.len() {
            return Err(Error::HostData {
                op: "DecodeStep::set_inputs",
                what: format!("{n} sequences of queries, {} lengths", seq_lens.len()),
            });
        }
        self.write_qkv(n, [query, key, value])?;
        self.write_tables(slots, block_tables, seq_lens)
    }

    /// The step's query, key and value inputs on the device (`[num_layers, batch, heads,
    /// head_size]`, contiguous): a model whose kernels write them in place skips
    /// [`DecodeStep::set_qkv`]'s host copies.
    pub fn qkv_mut(&mut self) -> (&mut Tensor, &mut Tensor, &mut Tensor) {
        (&mut self.query, &mut self.key, &mut self.value)
    }

    /// Copies the step's queries and new keys and values from host tensors: `query` `[num_layers,
    /// n, num_heads, head_size]` and `key`, `value` `[num_layers, n, num_kv_heads, head_size]` of the
    /// model's dtype, contiguous, `n <= batch` (rows past `n` keep old values: their sequences are
    /// padding).
    pub fn set_qkv(&mut self, query: &Tensor, key: &Tensor, value: &Tensor) -> Result<()> {
        let n = self.check_qkv(query, key, value)?;
        self.write_qkv(n, [query, key, value])
    }

    /// Writes the step's tables: `slots` (where each sequence's new token goes; negative: not
    /// written), `block_tables` (`n` rows of [`DecodeStep::max_blocks`]) and `seq_lens` (keys per
    /// sequence, the new one included, each `<= max_seq_len`), for `n <= batch` sequences; the rest
    /// become padding. A block a length needs outside the cache, or a slot outside it, is
    /// [`Error::HostData`], and nothing is written.
    pub fn set_tables(&mut self, slots: &[i64], block_tables: &[i32], seq_lens: &[i32]) -> Result<()> {
        self.check_tables(slots, block_tables, seq_lens)?;
        self.write_tables(slots, block_tables, seq_lens)
    }

    fn check_tables(&self, slots: &[i64], block_tables: &[i32], seq_lens: &[i32]) -> Result<()> {
        const OP: &str = "DecodeStep::set_tables";
        let c = &self.config;
        let n = seq_lens.len();
        if n > self.batch {
            return Err(Error::HostData { op: OP, what: format!("{n} sequences, the step was made for {}", self.batch) });
        }
        if slots.len() != n || block_tables.len() != n * self.max_blocks {
            return Err(Error::HostData {
                op: OP,
                what: format!(
                    "{n} lengths, {} slots and {} table entries (expected {n} and {n} × {})",
                    slots.len(),
                    block_tables.len(),
                    self.max_blocks
                ),
            });
        }
        let capacity = (c.num_blocks * c.block_size) as i64;
        for s in 0..n {
            let len = seq_lens[s];
            if len < 0 || len as usize > self.max_seq_len {
                return Err(Error::HostData { op: OP, what: format!("seq_lens[{s}] = {len}, expected 0..={}", self.max_seq_len) });
            }
            if slots[s] >= capacity {
                return Err(Error::HostData { op: OP, what: format!("slots[{s}] = {} is past the cache's {capacity} slots", slots[s]) });
            }
            let row = &block_tables[s * self.max_blocks..][..(len as usize).div_ceil(c.block_size)];
            if let Some((j, b)) = row.iter().enumerate().find(|(_, b)| !(0..c.num_blocks as i32).contains(*b)) {
                return Err(Error::HostData {
                    op: OP,
                    what: format!("block_tables[{s}][{j}] = {b} is not a block of the cache (0..{})", c.num_blocks),
                });
            }
        }
        Ok(())
    }

    fn write_tables(&mut self, slots: &[i64], block_tables: &[i32], seq_lens: &[i32]) -> Result<()> {
        let (b, n) = (self.batch, seq_lens.len());
        let mut all_slots = vec![-1i64; b];
        all_slots[..n].copy_from_slice(slots);
        let mut tables = vec![0i32; b * self.max_blocks];
        tables[..block_tables.len()].copy_from_slice(block_tables);
        let mut lens = vec![0i32; b];
        lens[..n].copy_from_slice(seq_lens);
        write(&mut self.slots, &Tensor::from_i64(&[b], &all_slots)?)?;
        write(&mut self.block_tables, &Tensor::from_i32(&[b, self.max_blocks], &tables)?)?;
        write(&mut self.seq_lens, &Tensor::from_i32(&[b], &lens)?)
    }

    /// Checks the three host tensors; returns their sequence count `n`.
    fn check_qkv(&self, query: &Tensor, key: &Tensor, value: &Tensor) -> Result<usize> {
        const OP: &str = "DecodeStep::set_qkv";
        let c = &self.config;
        let n = query.shape().get(1).copied().unwrap_or(0);
        for (i, (src, name)) in [(query, "query"), (key, "key"), (value, "value")].into_iter().enumerate() {
            let mut want = self.staging[i].shape().to_vec();
            want[1] = n;
            if n > self.batch || src.dtype() != c.dtype || src.shape() != want.as_slice() || !src.is_contiguous() || !src.is_host() {
                return Err(Error::Shape {
                    op: OP,
                    tensor: name,
                    got: src.shape().to_vec(),
                    expected: format!("a contiguous {} host tensor {want:?} (at most {} sequences)", c.dtype, self.batch),
                });
            }
        }
        Ok(n)
    }

    fn write_qkv(&mut self, n: usize, src: [&Tensor; 3]) -> Result<()> {
        let es = self.config.dtype.size_bytes();
        for (i, src) in src.into_iter().enumerate() {
            let dst = &mut self.staging[i];
            // Layer by layer: the first `n` rows of each layer's `batch` rows.
            let row_bytes = dst.shape()[2] * dst.shape()[3] * es;
            let (s, mut d) = (src.host_bytes()?, dst.host_bytes_mut()?);
            let s = &s[src.offset() * es..];
            for layer in 0..self.config.num_layers {
                d[layer * self.batch * row_bytes..][..n * row_bytes].copy_from_slice(&s[layer * n * row_bytes..][..n * row_bytes]);
            }
        }
        write(&mut self.query, &self.staging[0])?;
        write(&mut self.key, &self.staging[1])?;
        write(&mut self.value, &self.staging[2])
    }

    /// Runs the step: one graph launch on the GPU (asynchronous), the ops themselves on the CPU.
    pub fn run(&mut self, device: &Device) -> Result<()> {
        match &self.graph {
            Some(g) => g.replay(),
            None => self.record(device),
        }
    }

    /// Runs the step as separate launches (validation, dispatch and a launch per op and layer).
    pub fn run_eager(&mut self, device: &Device) -> Result<()> {
        self.record(device)
    }

    fn record(&mut self, device: &Device) -> Result<()> {
        let c = self.config;
        for l in 0..c.num_layers {
            let (q, k, v) = (self.query.select(0, l)?, self.key.select(0, l)?, self.value.select(0, l)?);
            let mut out = self.out.select(0, l)?;
            let (kc, vc) = (&mut self.keys[l], &mut self.values[l]);
            let scales = self.scales.get(l).map(|(k_scale, v_scale)| Fp8Scales { k_scale, v_scale });
            match (c.layout, scales) {
                (CacheLayout::Vllm, None) => crate::reshape_and_cache(device, &k, &v, kc, vc, &self.slots)?,
                (CacheLayout::Vllm, Some(s)) => crate::reshape_and_cache_fp8(device, &k, &v, kc, vc, &self.slots, s)?,
                (CacheLayout::Flash, None) => crate::reshape_and_cache_flash(device, &k, &v, kc, vc, &self.slots)?,
                (CacheLayout::Flash, Some(s)) => crate::reshape_and_cache_flash_fp8(device, &k, &v, kc, vc, &self.slots, s)?,
            }
            match c.layout {
                CacheLayout::Vllm => {
                    let args = PagedAttentionArgs {
                        query: &q,
                        key_cache: &self.keys[l],
                        value_cache: &self.values[l],
                        block_tables: &self.block_tables,
                        seq_lens: &self.seq_lens,
                        scale: self.scale,
                        alibi_slopes: None,
                        k_scale: scales.map(|s| s.k_scale),
                        v_scale: scales.map(|s| s.v_scale),
                        blocksparse: None,
                    };
                    crate::paged_attention(device, &mut out, &args, &mut self.workspace, Version::Auto)?;
                }
                CacheLayout::Flash => {
                    let args = FlashAttnVarlenArgs {
                        q: &q,
                        k: &self.keys[l],
                        v: &self.values[l],
                        max_seqlen_q: 1,
                        cu_seqlens_q: &self.cu_seqlens_q,
                        max_seqlen_k: self.max_seq_len,
                        seqused_k: &self.seq_lens,
                        softmax_scale: Some(self.scale),
                        causal: true,
                        window_size: (-1, -1),
                        softcap: 0.0,
                        alibi_slopes: None,
                        block_table: &self.block_tables,
                    };
                    crate::flash_attn_varlen_func(device, &mut out, None, &args)?;
                }
            }
        }
        Ok(())
    }
}

/// Overwrites `dst` (same shape) with host tensor `src`: in place on the GPU (a queued copy), a
/// write through the shared storage on the CPU (so views of `dst` see it).
fn write(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    if dst.is_gpu() {
        dst.write_from(src)
    } else {
        let bytes = src.host_bytes()?.to_vec();
        let mut d = dst.host_bytes_mut()?;
        d.copy_from_slice(&bytes);
        Ok(())
    }
}
