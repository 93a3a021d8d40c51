//! The serving pieces together: `BlockManager` tables and slots, a `KvCache`, copy-on-write after a
//! fork, a swap out and back in, and `DecodeStep` (a CUDA graph on the GPU) against a float64
//! reference computed from each sequence's key/value history alone (no cache, no tables).
//! Library: `host/src/{block_manager,kv_cache,graph}.rs`; the full loop: `host/examples/serving_loop.rs`.

use pagedattn::block_manager::{BlockManager, BlockManagerConfig, Pool, SeqId};
use pagedattn::layout::DType;
use pagedattn::testing::{Rng, compare, tolerance};
use pagedattn::{CacheLayout, DecodeStep, Device, KvCache, KvCacheConfig, ScalarType, Tensor};

const LAYERS: usize = 2;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const D: usize = 64;
const BS: usize = 16;

/// A sequence as the test knows it: per layer, the rounded keys and values of every token.
#[derive(Clone)]
struct History {
    id: SeqId,
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
}

fn round(dtype: DType, x: f32) -> f32 {
    Tensor::from_f32(dtype, &[1], &[x]).unwrap().to_f64_vec()[0] as f32
}

fn random(rng: &mut Rng, dtype: DType, n: usize) -> Vec<f32> {
    (0..n).map(|_| round(dtype, rng.uniform())).collect()
}

/// Float64 attention of one query `[HEADS, D]` over a history's keys and values at `layer`.
fn reference(h: &History, layer: usize, q: &[f32]) -> Vec<f64> {
    let scale = 1.0 / (D as f64).sqrt();
    let mut out = vec![0f64; HEADS * D];
    for head in 0..HEADS {
        let kh = head / (HEADS / KV_HEADS);
        let s: Vec<f64> =
            h.k[layer].iter().map(|k| (0..D).map(|e| q[head * D + e] as f64 * k[kh * D + e] as f64).sum::<f64>() * scale).collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = p.iter().sum();
        for (j, v) in h.v[layer].iter().enumerate() {
            for e in 0..D {
                out[head * D + e] += p[j] / z * v[kh * D + e] as f64;
            }
        }
    }
    out
}

fn serving_steps(device: &Device, layout: CacheLayout, dtype: DType) {
    let what = format!("{} {layout:?} {dtype:?}", device.name());
    let mut rng = Rng::new(77);
    let st: ScalarType = dtype.into();
    let config = KvCacheConfig {
        num_layers: LAYERS,
        num_blocks: 40,
        block_size: BS,
        num_kv_heads: KV_HEADS,
        head_size: D,
        dtype: st,
        cache_dtype: st,
        layout,
    };
    let mut cache = KvCache::new(device, config).unwrap();
    let mut swap_space = cache.swap_space(device, 16).unwrap();
    let mut bm = BlockManager::new(BlockManagerConfig { num_gpu_blocks: 40, num_cpu_blocks: 16, block_size: BS, prefix_caching: false });
    let row = KV_HEADS * D;
    // Prompts: keys and values written through the cache's reshape op.
    let mut seqs = Vec::new();
    for (id, len) in [(0u64, 40usize), (1, 17), (2, 1)] {
        let slots = bm.add_sequence(id, &vec![1; len]).unwrap().slots;
        let mut h = History { id, k: vec![Vec::new(); LAYERS], v: vec![Vec::new(); LAYERS] };
        for layer in 0..LAYERS {
            let (k, v) = (random(&mut rng, dtype, len * row), random(&mut rng, dtype, len * row));
            let up = |x: &[f32]| device.upload(&Tensor::from_f32(dtype, &[len, KV_HEADS, D], x).unwrap()).unwrap();
            cache.write(device, layer, &up(&k), &up(&v), &Tensor::from_i64(&[len], &slots).unwrap()).unwrap();
            h.k[layer] = k.chunks(row).map(<[f32]>::to_vec).collect();
            h.v[layer] = v.chunks(row).map(<[f32]>::to_vec).collect();
        }
        seqs.push(h);
    }
    let mut step = DecodeStep::new(device, &cache, 4, 96, HEADS, 1.0 / (D as f32).sqrt()).unwrap();
    let sync = || {
        if let Device::Gpu(g) = device {
            g.synchronize().unwrap();
        }
    };
    for t in 0..5 {
        // Step 1 forks sequence 0 (its last block is then shared: the next append copies it);
        // step 3 swaps sequence 1 out, step 4 back in.
        if t == 1 {
            bm.fork(0, 3).unwrap();
            let child = History { id: 3, ..seqs[0].clone() };
            seqs.push(child);
        }
        if t == 3 {
            let pairs = bm.swap_out(1).unwrap();
            KvCache::swap(device, &cache, &mut swap_space, &pairs).unwrap();
            // Its GPU blocks are free now: fill them with other data, as a new sequence would.
            let junk = device
                .upload(
                    &Tensor::from_f32(dtype, &[pairs.len() * BS, KV_HEADS, D], &random(&mut rng, dtype, pairs.len() * BS * row)).unwrap(),
                )
                .unwrap();
            let slots: Vec<i64> = pairs.iter().flat_map(|&(g, _)| (0..BS as i64).map(move |o| g as i64 * BS as i64 + o)).collect();
            for layer in 0..LAYERS {
                cache.write(device, layer, &junk, &junk, &Tensor::from_i64(&[slots.len()], &slots).unwrap()).unwrap();
            }
        }
        if t == 4 {
            let pairs = bm.swap_in(1).unwrap();
            KvCache::swap(device, &swap_space, &mut cache, &pairs).unwrap();
        }
        let active: Vec<usize> = (0..seqs.len()).filter(|&i| bm.pool_of(seqs[i].id).unwrap() == Pool::Gpu).collect();
        let n = active.len();
        let (mut slots, mut copies) = (Vec::new(), Vec::new());
        for &i in &active {
            let a = bm.append_token(seqs[i].id, 1).unwrap();
            slots.push(a.slot);
            copies.extend(a.copy);
        }
        if t == 1 {
            assert_eq!(copies.len(), 1, "{what}: the fork's first append copies the shared block");
        }
        cache.copy_blocks(device, &copies).unwrap();
        let q = random(&mut rng, dtype, LAYERS * n * HEADS * D);
        let (k, v) = (random(&mut rng, dtype, LAYERS * n * row), random(&mut rng, dtype, LAYERS * n * row));
        for (j, &i) in active.iter().enumerate() {
            for layer in 0..LAYERS {
                seqs[i].k[layer].push(k[(layer * n + j) * row..][..row].to_vec());
                seqs[i].v[layer].push(v[(layer * n + j) * row..][..row].to_vec());
            }
        }
        let ids: Vec<SeqId> = active.iter().map(|&i| seqs[i].id).collect();
        let table = bm.block_table_rows(&ids, step.max_blocks()).unwrap();
        let lens: Vec<i32> = active.iter().map(|&i| seqs[i].k[0].len() as i32).collect();
        let host = |x: &[f32], h: usize| Tensor::from_f32(dtype, &[LAYERS, n, h, D], x).unwrap();
        step.set_inputs(&host(&q, HEADS), &host(&k, KV_HEADS), &host(&v, KV_HEADS), &slots, &table, &lens).unwrap();
        step.run(device).unwrap();
        sync();
        let out = step.output().to_cpu().unwrap().to_f64_vec();
        for layer in 0..LAYERS {
            for (j, &i) in active.iter().enumerate() {
                let got = &out[(layer * 4 + j) * HEADS * D..][..HEADS * D];
                let want = reference(&seqs[i], layer, &q[(layer * n + j) * HEADS * D..][..HEADS * D]);
                let e = compare(got, &want);
                assert!(e.passes(tolerance(dtype)), "{what}: step {t}, layer {layer}, sequence {}: {e:?}", seqs[i].id);
            }
            let pad = &out[(layer * 4 + n) * HEADS * D..][..(4 - n) * HEADS * D];
            assert!(pad.iter().all(|&x| x == 0.0), "{what}: step {t}: padded rows are not zeros");
        }
        bm.check().unwrap();
    }
    // Host checks before anything is written: a block outside the cache, a length past the bound.
    let n = 1;
    let zero = |h: usize| Tensor::from_f32(dtype, &[LAYERS, n, h, D], &vec![0.0; LAYERS * n * h * D]).unwrap();
    let mut table = vec![0i32; step.max_blocks()];
    table[0] = 40;
    let bad_block = step.set_inputs(&zero(HEADS), &zero(KV_HEADS), &zero(KV_HEADS), &[0], &table, &[5]);
    assert!(matches!(bad_block, Err(pagedattn::Error::HostData { .. })), "{what}: {bad_block:?}");
    let too_long = step.set_inputs(&zero(HEADS), &zero(KV_HEADS), &zero(KV_HEADS), &[0], &vec![0; step.max_blocks()], &[97]);
    assert!(matches!(too_long, Err(pagedattn::Error::HostData { .. })), "{what}: {too_long:?}");
    for h in &seqs {
        bm.free(h.id).unwrap();
    }
    assert_eq!((bm.num_free(Pool::Gpu), bm.num_free(Pool::Cpu)), (40, 16), "{what}: blocks leaked");
}

#[test]
fn serving_steps_cpu() {
    for (layout, dtype) in [(CacheLayout::Vllm, DType::F16), (CacheLayout::Vllm, DType::F32), (CacheLayout::Flash, DType::BF16)] {
        serving_steps(&Device::Cpu, layout, dtype);
    }
}

/// The same on the GPU: `DecodeStep` runs as a CUDA graph replayed after each `set_inputs`.
#[test]
fn gpu_serving_steps_graph() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for (layout, dtype) in [
        (CacheLayout::Vllm, DType::F16),
        (CacheLayout::Vllm, DType::BF16),
        (CacheLayout::Flash, DType::F16),
        (CacheLayout::Flash, DType::BF16),
    ] {
        serving_steps(&device, layout, dtype);
    }
    crate::common::gpu_of(&mut device).check_status().unwrap();
}
