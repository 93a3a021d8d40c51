//! [`KvCache`]: the per-layer key and value caches of a model, in one layout and dtype, on one
//! device, with the cache ops over all its layers (writes, copy-on-write copies, swaps to a host
//! [swap space](KvCache::swap_space)). Which blocks each sequence owns is the
//! [block manager](crate::block_manager)'s business; this type only holds the memory.
//!
//! Layouts ([`CacheLayout`]): `Vllm` is what [`crate::paged_attention()`] reads (and the only one with
//! fp8 attention); `Flash` is what [`crate::flash_attn_varlen_func`] reads (prefill and decode in one
//! op, as vLLM's FlashAttention backend).
//!
//! ```
//! use pagedattn::kv_cache::{KvCache, KvCacheConfig};
//! use pagedattn::{CacheLayout, Device, ScalarType, Tensor};
//! # fn main() -> pagedattn::Result<()> {
//! let device = Device::Cpu;
//! let config = KvCacheConfig {
//!     num_layers: 2, num_blocks: 16, block_size: 16, num_kv_heads: 2, head_size: 64,
//!     dtype: ScalarType::F16, cache_dtype: ScalarType::F16, layout: CacheLayout::Flash,
//! };
//! let mut cache = KvCache::new(&device, config)?;
//! let kv = Tensor::from_values(ScalarType::F16, &[3, 2, 64], &vec![0.5; 3 * 2 * 64])?;
//! let slots = Tensor::from_i64(&[3], &[16, 17, 18])?; // block 1, offsets 0..3
//! cache.write(&device, 0, &kv, &kv, &slots)?;
//! assert_eq!(cache.key(0).get_f64(&[1, 2, 1, 63]), 0.5);
//! # Ok(()) }
//! ```

use pagedattn_layout::DType;

use crate::cache::{self, CacheLayout, Fp8Scales};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{ScalarType, Tensor};

const OP: &str = "KvCache";

/// Shape, dtype and layout of a [`KvCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Attention layers (one key and one value cache each).
    pub num_layers: usize,
    /// Blocks per layer.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_size: usize,
    /// The model's dtype: what [`KvCache::write`] takes (f32, f16 or bf16).
    pub dtype: ScalarType,
    /// What the cache stores: `dtype`, or fp8 codes ([`ScalarType::Fp8E4m3`],
    /// [`ScalarType::Fp8E5m2`]) with per-layer scales.
    pub cache_dtype: ScalarType,
    /// Where each element of a block lives.
    pub layout: CacheLayout,
}

impl KvCacheConfig {
    /// Shapes of one layer's key and value caches with `num_blocks` blocks.
    pub fn shapes(&self, num_blocks: usize) -> (Vec<usize>, Vec<usize>) {
        let (b, bs, h, d) = (num_blocks, self.block_size, self.num_kv_heads, self.head_size);
        match self.layout {
            CacheLayout::Vllm => {
                let x = 16 / self.cache_dtype.size_bytes();
                (vec![b, h, d / x, bs, x], vec![b, h, d, bs])
            }
            CacheLayout::Flash => (vec![b, bs, h, d], vec![b, bs, h, d]),
        }
    }

    /// Bytes of one block of one layer (keys and values).
    pub fn block_bytes(&self) -> usize {
        2 * self.block_size * self.num_kv_heads * self.head_size * self.cache_dtype.size_bytes()
    }

    fn validate(&self) -> Result<()> {
        let value = |what, got: String, why: &str| Err(Error::Value { op: OP, what, got, why: why.into() });
        if self.dtype.float().is_none() {
            return Err(Error::DType { op: OP, tensor: "dtype", got: self.dtype, expected: "f32, f16 or bf16".into() });
        }
        if self.cache_dtype != self.dtype && self.cache_dtype.fp8().is_none() {
            return Err(Error::DType {
                op: OP,
                tensor: "cache_dtype",
                got: self.cache_dtype,
                expected: format!("{} (the dtype) or an fp8 format", self.dtype),
            });
        }
        for (what, n) in [
            ("num_layers", self.num_layers),
            ("num_blocks", self.num_blocks),
            ("block_size", self.block_size),
            ("num_kv_heads", self.num_kv_heads),
            ("head_size", self.head_size),
        ] {
            if n == 0 {
                return value(what, "0".into(), "must be positive");
            }
        }
        let x = 16 / self.cache_dtype.size_bytes();
        if self.layout == CacheLayout::Vllm && !self.head_size.is_multiple_of(x) {
            return value("head_size", self.head_size.to_string(), &format!("the vLLM key layout splits it in groups of {x}"));
        }
        Ok(())
    }
}

/// The key and value caches of every layer (see the [module docs](self)), plus per-layer fp8 scales.
pub struct KvCache {
    config: KvCacheConfig,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// fp8 caches: `[1]` f32 `(k_scale, v_scale)` per layer, on the cache's device.
    scales: Vec<(Tensor, Tensor)>,
}

/// A zeroed tensor on `device` (device memory for the GPU).
fn zeros(device: &Device, dtype: ScalarType, shape: &[usize]) -> Result<Tensor> {
    match device {
        Device::Cpu => Tensor::from_bytes(dtype, shape, vec![0; shape.iter().product::<usize>() * dtype.size_bytes()]),
        Device::Gpu(g) => g.zeros(dtype, shape),
    }
}

impl KvCache {
    /// Zeroed caches on `device`; fp8 scales start at 1.
    pub fn new(device: &Device, config: KvCacheConfig) -> Result<KvCache> {
        config.validate()?;
        let (ks, vs) = config.shapes(config.num_blocks);
        let mut keys = Vec::with_capacity(config.num_layers);
        let mut values = Vec::with_capacity(config.num_layers);
        let mut scales = Vec::new();
        for _ in 0..config.num_layers {
            keys.push(zeros(device, config.cache_dtype, &ks)?);
            values.push(zeros(device, config.cache_dtype, &vs)?);
            if config.cache_dtype.fp8().is_some() {
                let one = Tensor::from_f32(DType::F32, &[1], &[1.0])?;
                scales.push((device.upload(&one)?, device.upload(&one)?));
            }
        }
        Ok(KvCache { config, keys, values, scales })
    }

    /// Host caches of the same layout with `num_blocks` blocks, for [`KvCache::swap`]: page-locked
    /// memory on the GPU backend (asynchronous copies), ordinary memory on the CPU one. No scales
    /// (swapping copies codes).
    pub fn swap_space(&self, device: &Device, num_blocks: usize) -> Result<KvCache> {
        let config = KvCacheConfig { num_blocks, ..self.config };
        let (ks, vs) = config.shapes(num_blocks);
        let host = |shape: &[usize]| match device {
            Device::Cpu => zeros(device, config.cache_dtype, shape),
            Device::Gpu(g) => g.pinned(config.cache_dtype, shape),
        };
        let mut keys = Vec::with_capacity(config.num_layers);
        let mut values = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            keys.push(host(&ks)?);
            values.push(host(&vs)?);
        }
        Ok(KvCache { config, keys, values, scales: Vec::new() })
    }

    /// Its configuration.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.config.num_layers {
            return Err(Error::Value {
                op: OP,
                what: "layer",
                got: layer.to_string(),
                why: format!("the cache has {} layers", self.config.num_layers),
            });
        }
        Ok(())
    }

    /// Layer `layer`'s key cache (panics on a layer out of range, like indexing).
    pub fn key(&self, layer: usize) -> &Tensor {
        &self.keys[layer]
    }

    /// Layer `layer`'s value cache (panics on a layer out of range, like indexing).
    pub fn value(&self, layer: usize) -> &Tensor {
        &self.values[layer]
    }

    /// Layer `layer`'s fp8 scales `(k_scale, v_scale)` (`[1]` f32 on the cache's device), or `None`
    /// for a cache of the model's dtype.
    pub fn scales(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.scales.get(layer).map(|(k, v)| (k, v))
    }

    /// Sets layer `layer`'s fp8 scales (finite, positive) in place: graphs that read them follow.
    pub fn set_scales(&mut self, layer: usize, k_scale: f32, v_scale: f32) -> Result<()> {
        self.check_layer(layer)?;
        for (what, s) in [("k_scale", k_scale), ("v_scale", v_scale)] {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::Value { op: OP, what, got: s.to_string(), why: "must be finite and positive".into() });
            }
        }
        let Some((k, v)) = self.scales.get_mut(layer) else {
            return Err(Error::Value {
                op: OP,
                what: "cache_dtype",
                got: self.config.cache_dtype.to_string(),
                why: "only fp8 caches have scales".into(),
            });
        };
        // In place (views of these tensors, e.g. a `DecodeStep`'s, see the new values).
        for (t, s) in [(k, k_scale), (v, v_scale)] {
            if t.is_gpu() {
                t.write_from(&Tensor::from_f32(DType::F32, &[1], &[s])?)?;
            } else {
                t.set_from_f64(&[s as f64]);
            }
        }
        Ok(())
    }

    /// Writes `key` and `value` (`[num_tokens, num_kv_heads, head_size]` of the model's dtype) into
    /// layer `layer`'s slots `slot_mapping` (`[num_tokens]` i64, negative = skip): the layout's
    /// `reshape_and_cache` op, quantizing with the layer's scales for fp8.
    pub fn write(&mut self, device: &Device, layer: usize, key: &Tensor, value: &Tensor, slot_mapping: &Tensor) -> Result<()> {
        self.check_layer(layer)?;
        let (kc, vc) = (&mut self.keys[layer], &mut self.values[layer]);
        match (self.scales.get(layer), self.config.layout) {
            (None, CacheLayout::Vllm) => cache::reshape_and_cache(device, key, value, kc, vc, slot_mapping),
            (None, CacheLayout::Flash) => cache::reshape_and_cache_flash(device, key, value, kc, vc, slot_mapping),
            (Some((k_scale, v_scale)), layout) => {
                let scales = Fp8Scales { k_scale, v_scale };
                match layout {
                    CacheLayout::Vllm => cache::reshape_and_cache_fp8(device, key, value, kc, vc, slot_mapping, scales),
                    CacheLayout::Flash => cache::reshape_and_cache_flash_fp8(device, key, value, kc, vc, slot_mapping, scales),
                }
            }
        }
    }

    /// Copies blocks `src -> dst` for every pair in every layer, keys and values (one
    /// [`cache::copy_blocks`] launch): the copies [`crate::block_manager::Append::copy`] asks for.
    pub fn copy_blocks(&mut self, device: &Device, pairs: &[(u32, u32)]) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let flat: Vec<i64> = pairs.iter().flat_map(|&(s, d)| [s as i64, d as i64]).collect();
        let mapping = Tensor::from_i64(&[pairs.len(), 2], &flat)?;
        let mut keys: Vec<&mut Tensor> = self.keys.iter_mut().collect();
        let mut values: Vec<&mut Tensor> = self.values.iter_mut().collect();
        cache::copy_blocks(device, &mut keys, &mut values, &mapping)
    }

    /// Copies block `src` of `from` to block `dst` of `to` for every pair, every layer (keys and
    /// values): [`cache::swap_blocks`] between a device cache and its [swap space](KvCache::swap_space),
    /// either way. Queued on the GPU's stream without waiting; synchronize before reading the host
    /// side on the host.
    pub fn swap(device: &Device, from: &KvCache, to: &mut KvCache, pairs: &[(u32, u32)]) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let (f, t) = (&from.config, &to.config);
        if (f.num_layers, f.block_size, f.num_kv_heads, f.head_size, f.cache_dtype, f.layout)
            != (t.num_layers, t.block_size, t.num_kv_heads, t.head_size, t.cache_dtype, t.layout)
        {
            return Err(Error::Value {
                op: OP,
                what: "swap caches",
                got: format!("{f:?} -> {t:?}"),
                why: "the two caches must differ only in their number of blocks".into(),
            });
        }
        let flat: Vec<i64> = pairs.iter().flat_map(|&(s, d)| [s as i64, d as i64]).collect();
        let mapping = Tensor::from_i64(&[pairs.len(), 2], &flat)?;
        for l in 0..f.num_layers {
            cache::swap_blocks(device, &from.keys[l], &mut to.keys[l], &mapping)?;
            cache::swap_blocks(device, &from.values[l], &mut to.values[l], &mapping)?;
        }
        Ok(())
    }

    /// Reads the keys and values of `slots` of layer `layer` back to the host as f64
    /// (`[slots.len(), num_kv_heads, head_size]` each, dequantized for fp8): for tests and checks.
    pub fn gather(&self, layer: usize, slots: &[i64]) -> Result<(Vec<f64>, Vec<f64>)> {
        self.check_layer(layer)?;
        let c = &self.config;
        let (k, v) = (self.keys[layer].to_cpu()?, self.values[layer].to_cpu()?);
        let (ks, vs) = match self.scales.get(layer) {
            Some((k, v)) => (k.to_cpu()?.to_f64_vec()[0], v.to_cpu()?.to_f64_vec()[0]),
            None => (1.0, 1.0),
        };
        let (mut ko, mut vo) = (Vec::new(), Vec::new());
        let x = 16 / c.cache_dtype.size_bytes();
        for &s in slots {
            let total = (c.num_blocks * c.block_size) as i64;
            if !(0..total).contains(&s) {
                return Err(Error::Value { op: OP, what: "slot", got: s.to_string(), why: format!("the cache has {total} slots") });
            }
            let (b, o) = (s as usize / c.block_size, s as usize % c.block_size);
            for h in 0..c.num_kv_heads {
                for d in 0..c.head_size {
                    let (ki, vi) = match c.layout {
                        CacheLayout::Vllm => ([b, h, d / x, o, d % x].to_vec(), [b, h, d, o].to_vec()),
                        CacheLayout::Flash => ([b, o, h, d].to_vec(), [b, o, h, d].to_vec()),
                    };
                    ko.push(k.get_f64(&ki) * ks);
                    vo.push(v.get_f64(&vi) * vs);
                }
            }
        }
        Ok((ko, vo))
    }

    /// Bytes of all layers' caches.
    pub fn size_bytes(&self) -> usize {
        self.config.num_layers * self.config.num_blocks * self.config.block_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layout: CacheLayout, cache_dtype: ScalarType) -> KvCacheConfig {
        KvCacheConfig {
            num_layers: 2,
            num_blocks: 6,
            block_size: 4,
            num_kv_heads: 2,
            head_size: 32,
            dtype: ScalarType::F16,
            cache_dtype,
            layout,
        }
    }

    fn tokens(n: usize, seed: f32) -> Tensor {
        let vals: Vec<f32> = (0..n * 2 * 32).map(|i| (i as f32 * 0.37 + seed).sin() * 2.0).collect();
        Tensor::from_values(ScalarType::F16, &[n, 2, 32], &vals).unwrap()
    }

    /// Write, copy, swap out and back in, through every layout and an fp8 cache: each step's
    /// slots read back what was written there.
    #[test]
    fn write_copy_swap_round_trip() {
        let dev = Device::Cpu;
        for (layout, cd) in
            [(CacheLayout::Vllm, ScalarType::F16), (CacheLayout::Flash, ScalarType::F16), (CacheLayout::Vllm, ScalarType::Fp8E4m3)]
        {
            let mut c = KvCache::new(&dev, config(layout, cd)).unwrap();
            if cd.fp8().is_some() {
                c.set_scales(1, 0.5, 0.25).unwrap();
            }
            let (k, v) = (tokens(5, 0.0), tokens(5, 1.0));
            let slots = [4i64, 5, 6, 7, 8];
            c.write(&dev, 1, &k, &v, &Tensor::from_i64(&[5], &slots).unwrap()).unwrap();
            let tol = if cd.fp8().is_some() { 0.07 } else { 0.0 };
            let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * y.abs().max(0.5));
            let (gk, gv) = c.gather(1, &slots).unwrap();
            assert!(close(&gk, &k.to_f64_vec()) && close(&gv, &v.to_f64_vec()), "{layout:?} {cd}: write");
            c.copy_blocks(&dev, &[(1, 3), (2, 0)]).unwrap();
            let (ck, _) = c.gather(1, &[12, 13, 14, 15, 0]).unwrap();
            assert_eq!(ck, gk, "{layout:?} {cd}: copy_blocks");
            let mut host = c.swap_space(&dev, 3).unwrap();
            KvCache::swap(&dev, &c, &mut host, &[(1, 2), (2, 0)]).unwrap();
            let mut fresh = KvCache::new(&dev, config(layout, cd)).unwrap();
            if cd.fp8().is_some() {
                fresh.set_scales(1, 0.5, 0.25).unwrap();
            }
            KvCache::swap(&dev, &host, &mut fresh, &[(2, 5), (0, 4)]).unwrap();
            let (sk, sv) = fresh.gather(1, &[20, 21, 22, 23, 16]).unwrap();
            assert_eq!((sk, sv), (gk, gv), "{layout:?} {cd}: swap out and in");
        }
    }

    #[test]
    fn bad_configs_are_errors() {
        let dev = Device::Cpu;
        let ok = config(CacheLayout::Vllm, ScalarType::F16);
        for bad in [
            KvCacheConfig { num_layers: 0, ..ok },
            KvCacheConfig { head_size: 36, cache_dtype: ScalarType::Fp8E5m2, ..ok },
            KvCacheConfig { cache_dtype: ScalarType::BF16, ..ok },
            KvCacheConfig { dtype: ScalarType::I32, ..ok },
        ] {
            assert!(KvCache::new(&dev, bad).is_err(), "{bad:?}");
        }
        let mut c = KvCache::new(&dev, ok).unwrap();
        assert!(c.set_scales(0, 1.0, 1.0).is_err(), "scales of a non-fp8 cache");
        assert!(c.write(&dev, 2, &tokens(1, 0.0), &tokens(1, 0.0), &Tensor::from_i64(&[1], &[0]).unwrap()).is_err());
        let mut host = c.swap_space(&dev, 2).unwrap();
        let other = KvCache::new(&dev, KvCacheConfig { head_size: 64, ..ok }).unwrap();
        assert!(KvCache::swap(&dev, &other, &mut host, &[(0, 0)]).is_err());
    }
}
