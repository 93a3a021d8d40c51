//! Small grids of every GPU op for `compute-sanitizer` (memcheck, racecheck, synccheck, initcheck):
//! each op, each dtype, a few head and block sizes, short lengths, both varlen kernels. With the
//! guarded bad-device-data tests of the op modules (listed in `gpu-pack/run.sh sanitize`, see
//! `crates/xtask`), this is the sanitizer grid; every case is also checked against the float64
//! reference, so the tests mean something outside the sanitizer too.

use pagedattn::layout::{DType, KvCacheDType};
use pagedattn::testing::varlen::{self, VarlenCase};
use pagedattn::testing::{self, Case, tolerance};
use pagedattn::{FlashKernel, Version};

fn paged_case(
    dtype: DType,
    cache: KvCacheDType,
    heads: (usize, usize),
    head_size: usize,
    block_size: usize,
    alibi: bool,
    seed: u64,
) -> Case {
    Case { cache, ..Case::new(dtype, heads, head_size, block_size, &[1, 17, 0, 70], alibi, seed) }
}

/// Paged attention v1 and v2: f32/f16/bf16, an fp8 cache, heads 64/128/256, blocks 8/16/32, GQA,
/// ALiBi, a zero-length sequence.
#[test]
fn gpu_sanitize_paged_attention() {
    let Some(device) = gpu_or_skip!() else { return };
    let cases = [
        paged_case(DType::F32, KvCacheDType::Auto, (4, 4), 64, 8, false, 1),
        paged_case(DType::F16, KvCacheDType::Auto, (8, 2), 128, 16, true, 2),
        paged_case(DType::BF16, KvCacheDType::Auto, (4, 1), 256, 32, false, 3),
        paged_case(DType::F16, KvCacheDType::Fp8(pagedattn::layout::Fp8Kind::E4m3), (8, 2), 128, 16, false, 4),
    ];
    for c in &cases {
        for version in [Version::V1, Version::V2] {
            let e = testing::check_case(&device, c, version).unwrap();
            assert!(e.passes(tolerance(c.dtype)), "{c} {version}: {e:?}");
        }
    }
}

/// `flash_attn_varlen_func` on both kernels: f16/bf16, heads 64/128/256, decode rows, a prefill
/// over a cached prefix, an empty sequence; causal, window, soft-cap and ALiBi.
#[test]
fn gpu_sanitize_varlen() {
    let Some(device) = gpu_or_skip!() else { return };
    let base = VarlenCase {
        dtype: DType::F16,
        heads: (8, 2),
        head_size: 128,
        block_size: 16,
        seqs: vec![(1, 40), (70, 90), (0, 5), (3, 3)],
        causal: true,
        window: (-1, -1),
        softcap: 0.0,
        alibi: false,
        seed: 11,
    };
    let cases = [
        base.clone(),
        VarlenCase { dtype: DType::BF16, head_size: 64, block_size: 32, window: (20, 0), ..base.clone() },
        VarlenCase { head_size: 256, heads: (4, 1), softcap: 30.0, alibi: true, ..base.clone() },
        VarlenCase { dtype: DType::BF16, causal: false, block_size: 8, ..base.clone() },
    ];
    let mut kernels = vec![FlashKernel::MmaSync];
    if let pagedattn::Device::Gpu(gpu) = &device
        && FlashKernel::Wgmma.resolve(gpu, DType::F16, 128).is_ok()
    {
        kernels.push(FlashKernel::Wgmma);
    }
    for kernel in kernels {
        for c in &cases {
            let e = varlen::check_varlen(&device, c, kernel).unwrap();
            assert!(e.passes(tolerance(c.dtype)), "{c} ({}): {e:?}", kernel.name());
        }
    }
}

/// `merge_attn_states`: every dtype, with and without the merged LSE.
#[test]
fn gpu_sanitize_merge() {
    let Some(device) = gpu_or_skip!() else { return };
    for (dtype, tokens, heads, head_size, with_lse) in
        [(DType::F32, 5, 4, 64, true), (DType::F16, 9, 8, 128, false), (DType::BF16, 3, 2, 256, true)]
    {
        let e = varlen::check_merge(&device, dtype, tokens, heads, head_size, with_lse).unwrap();
        assert!(e.passes(tolerance(dtype)), "{dtype} {tokens}x{heads}x{head_size}: {e:?}");
    }
}

/// `reshape_and_cache` and `reshape_and_cache_flash` (three flash layouts) into caches of every
/// dtype and fp8, then `copy_blocks` over every dtype through a `KvCache`: bit-exact with the CPU.
#[test]
fn gpu_sanitize_cache_ops() {
    use pagedattn::testing::cache::{KvLayout, ReshapeCase, check_reshape};
    use pagedattn::{CacheLayout, Device, KvCache, KvCacheConfig, ScalarType, Tensor};
    let Some(device) = gpu_or_skip!() else { return };
    let mut seed = 40;
    for layout in [KvLayout::Vllm, KvLayout::Nhd, KvLayout::Hnd, KvLayout::Combined] {
        for (dtype, cache) in [
            (DType::F32, KvCacheDType::Auto),
            (DType::F16, KvCacheDType::Auto),
            (DType::BF16, KvCacheDType::Auto),
            (DType::F16, KvCacheDType::Fp8(pagedattn::layout::Fp8Kind::E4m3)),
            (DType::BF16, KvCacheDType::Fp8(pagedattn::layout::Fp8Kind::E5m2)),
        ] {
            seed += 1;
            let mut c = ReshapeCase::new(layout, dtype, 2, 64, 16, vec![5, 17, 0, 1], seed);
            c.cache = cache;
            c.device_slots = seed % 2 == 0;
            let check = check_reshape(&device, &c).unwrap();
            assert!(check.passes(), "{c}: {} of {} elements differ", check.mismatches, check.elements);
        }
    }
    for (layout, dtype) in
        [(CacheLayout::Vllm, ScalarType::F32), (CacheLayout::Flash, ScalarType::F16), (CacheLayout::Vllm, ScalarType::BF16)]
    {
        let config = KvCacheConfig {
            num_layers: 2,
            num_blocks: 8,
            block_size: 16,
            num_kv_heads: 2,
            head_size: 64,
            dtype,
            cache_dtype: dtype,
            layout,
        };
        let (mut gpu, mut cpu) = (KvCache::new(&device, config).unwrap(), KvCache::new(&Device::Cpu, config).unwrap());
        let n = 8 * 16;
        let vals: Vec<f32> = (0..n * 2 * 64).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let kv = Tensor::from_values(dtype, &[n, 2, 64], &vals).unwrap();
        let slots = Tensor::from_i64(&[n], &(0..n as i64).collect::<Vec<_>>()).unwrap();
        for l in 0..2 {
            gpu.write(&device, l, &device.upload(&kv).unwrap(), &device.upload(&kv).unwrap(), &slots).unwrap();
            cpu.write(&Device::Cpu, l, &kv, &kv, &slots).unwrap();
        }
        let pairs = [(1, 6), (3, 0), (2, 2)];
        gpu.copy_blocks(&device, &pairs).unwrap();
        cpu.copy_blocks(&Device::Cpu, &pairs).unwrap();
        for l in 0..2 {
            let all: Vec<i64> = (0..n as i64).collect();
            assert_eq!(gpu.gather(l, &all).unwrap(), cpu.gather(l, &all).unwrap(), "{layout:?} {dtype}: copy_blocks layer {l}");
        }
    }
}
