//! GPU edge cases not covered by the op modules' grids: 10⁵ sequences in one batch, varlen contexts
//! past 128k keys, sequences that fill their table row exactly, NaN and infinity in the query or
//! the cache (propagated as the float64 reference does), and concurrency: several streams launching
//! different ops over shared read-only caches give the serial results, bit for bit, and repeated
//! runs are bitwise identical. (Zero-length and one-token sequences, blocks shared by many sequences,
//! out-of-range device ids, 128k paged contexts and fp8 saturation are in `paged_attention.rs`,
//! `cache.rs`, `flash_attn.rs` and `fp8.rs`.)

use pagedattn::layout::DType;
use pagedattn::testing::varlen::{VarlenCase, VarlenInputs, check_varlen};
use pagedattn::testing::{Case, Inputs, Rng, check_case, compare, tolerance};
use pagedattn::{
    Device, FlashAttnVarlenArgs, FlashKernel, Gpu, PagedAttentionWorkspace, ScalarType, Tensor, Version, flash_attn_varlen_func_with,
    paged_attention,
};

fn kernels(device: &Device) -> Vec<FlashKernel> {
    let mut k = vec![FlashKernel::MmaSync];
    if let Device::Gpu(gpu) = device
        && FlashKernel::Wgmma.resolve(gpu, DType::F16, 128).is_ok()
    {
        k.push(FlashKernel::Wgmma);
    }
    k
}

/// 10⁵ sequences in one launch: paged attention v1 and v2 (lengths 0–12, blocks of 8) and varlen
/// decode rows (one query each) on both kernels, against the float64 reference.
#[test]
fn gpu_hundred_thousand_sequences() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let n = 100_000;
    let mut rng = Rng::new(5);
    let lens: Vec<usize> = (0..n).map(|_| rng.below(13)).collect();
    let c = Case::new(DType::F16, (2, 1), 64, 8, &lens, false, 6);
    for version in [Version::V1, Version::V2] {
        let e = check_case(&device, &c, version).unwrap();
        assert!(e.passes(tolerance(DType::F16)), "{c} {version}: {e:?}");
    }
    let v = VarlenCase {
        dtype: DType::BF16,
        heads: (4, 1),
        head_size: 64,
        block_size: 16,
        seqs: lens.iter().map(|&l| (1, l + 1)).collect(),
        causal: true,
        window: (-1, -1),
        softcap: 0.0,
        alibi: false,
        seed: 7,
    };
    for kernel in kernels(&device) {
        let e = check_varlen(&device, &v, kernel).unwrap();
        assert!(e.passes(tolerance(DType::BF16)), "{v} ({}): {e:?}", kernel.name());
    }
    crate::common::gpu_of(&mut device).check_status().unwrap();
    crate::common::note("gpu_hundred_thousand_sequences: paged v1/v2 and varlen (every kernel) with 100000 sequences match");
}

/// Varlen over contexts past 128k keys (a decode row, a short prefill chunk), both kernels, with
/// and without a sliding window; and sequences whose lengths fill their table rows exactly.
#[test]
fn gpu_varlen_long_contexts_and_full_tables() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let base = VarlenCase {
        dtype: DType::F16,
        heads: (8, 2),
        head_size: 128,
        block_size: 16,
        seqs: vec![(1, 131_072 + 5), (37, 140_000)],
        causal: true,
        window: (-1, -1),
        softcap: 0.0,
        alibi: false,
        seed: 8,
    };
    // Lengths that are multiples of the block size: the longest uses every entry of its row.
    let full = VarlenCase { seqs: vec![(16, 256), (1, 64), (64, 128)], block_size: 64, dtype: DType::BF16, ..base.clone() };
    for c in [base.clone(), VarlenCase { window: (4096, 0), ..base }, full] {
        for kernel in kernels(&device) {
            let e = check_varlen(&device, &c, kernel).unwrap();
            assert!(e.passes(tolerance(c.dtype)), "{c} ({}): {e:?}", kernel.name());
        }
    }
    let c = Case::new(DType::BF16, (4, 1), 128, 32, &[256, 32, 31], false, 9);
    for version in [Version::V1, Version::V2] {
        let e = check_case(&device, &c, version).unwrap();
        assert!(e.passes(tolerance(DType::BF16)), "{c} {version}: {e:?}");
    }
    crate::common::gpu_of(&mut device).check_status().unwrap();
}

/// Per `(row, head)` row: where the reference row has a non-finite element the GPU row must too;
/// where the reference is finite the GPU row must match it within the dtype's tolerance, except
/// rows `poisoned_ok` admits, which may be non-finite (see the varlen case). Returns the GPU's
/// non-finite row count.
fn check_rows(got: &[f64], want: &[f64], head_size: usize, dtype: DType, what: &str, poisoned_ok: &dyn Fn(usize) -> bool) -> usize {
    let mut non_finite_rows = 0;
    for (r, (g, w)) in got.chunks(head_size).zip(want.chunks(head_size)).enumerate() {
        let (gf, wf) = (g.iter().all(|x| x.is_finite()), w.iter().all(|x| x.is_finite()));
        if !wf || !gf {
            non_finite_rows += 1;
        }
        if wf && !gf && poisoned_ok(r) {
            continue;
        }
        assert_eq!(gf, wf, "{what}: row {r} (token × head) is {} on the GPU, {} in the reference", fin(gf), fin(wf));
        if wf {
            let e = compare(g, w);
            assert!(e.rel_l2 <= 4.0 * tolerance(dtype), "{what}: row {r}: {e:?}");
        }
    }
    non_finite_rows
}

fn fin(finite: bool) -> &'static str {
    if finite { "finite" } else { "not finite" }
}

/// NaN in a query, NaN in a cached key, +inf in a cached value: paged attention (v1, v2) gives
/// non-finite rows exactly where the float64 reference does and the right values everywhere else;
/// varlen (both kernels) too, except that an infinite value may also poison rows of its own
/// sequence that are causally before it (masked products of 0 × inf in the tensor cores, as in
/// FlashAttention). No crash, no flag.
#[test]
fn gpu_non_finite_inputs_propagate_like_the_reference() {
    let Some(mut device) = gpu_or_skip!() else { return };
    // Paged attention.
    let c = Case::new(DType::F16, (8, 2), 64, 16, &[20, 33, 5], false, 10);
    let mut host: Inputs = c.inputs().unwrap();
    let table = host.block_tables.to_i32_vec();
    let width = host.block_tables.shape()[1];
    let x = host.key_cache.shape()[4];
    let slot = |s: usize, t: usize| (table[s * width + t / 16] as usize, t % 16);
    let i = host.query.storage_index(&[0, 1, 3]);
    host.query.set_storage_f64(i, f64::NAN);
    let (b, o) = slot(1, 7);
    let i = host.key_cache.storage_index(&[b, 1, 5 / x, o, 5 % x]);
    host.key_cache.set_storage_f64(i, f64::NAN);
    let (b, o) = slot(2, 2);
    let i = host.value_cache.storage_index(&[b, 0, 9, o]);
    host.value_cache.set_storage_f64(i, f64::INFINITY);
    let plan =
        pagedattn::paged_attention::validate(&Device::Cpu, &Tensor::nan(host.query.dtype(), host.query.shape()), &host.args()).unwrap();
    let want = pagedattn::cpu::paged_attention::reference(&plan, &host.args());
    let dev = host.upload(&device).unwrap();
    for version in [Version::V1, Version::V2] {
        let mut out = device.nan(ScalarType::F16, host.query.shape()).unwrap();
        let mut ws = PagedAttentionWorkspace::with_partition_size(&device, 3, 8, 64, 33, 32).unwrap();
        paged_attention(&device, &mut out, &dev.args(), &mut ws, version).unwrap();
        let got = out.to_cpu().unwrap().to_f64_vec();
        let rows = check_rows(&got, &want, 64, DType::F16, &format!("paged attention {version}"), &|_| false);
        assert!(rows >= 5, "paged attention {version}: only {rows} non-finite rows; the injected values did not reach the output");
    }
    // Varlen: the same three injections in the flash layout.
    let vc = VarlenCase {
        dtype: DType::F16,
        heads: (8, 2),
        head_size: 128,
        block_size: 16,
        seqs: vec![(4, 20), (1, 33), (5, 5)],
        causal: true,
        window: (-1, -1),
        softcap: 0.0,
        alibi: false,
        seed: 11,
    };
    let mut i: VarlenInputs = vc.inputs().unwrap();
    let vt = i.block_table.to_i32_vec();
    let vw = i.block_table.shape()[1];
    let vslot = |s: usize, t: usize| (vt[s * vw + t / 16] as usize, t % 16);
    let at = i.q.storage_index(&[0, 1, 3]);
    i.q.set_storage_f64(at, f64::NAN);
    let (b, o) = vslot(1, 7);
    let at = i.k.storage_index(&[b, o, 1, 5]);
    i.k.set_storage_f64(at, f64::NAN);
    let (b, o) = vslot(2, 2);
    let at = i.v.storage_index(&[b, o, 0, 9]);
    i.v.set_storage_f64(at, f64::INFINITY);
    let host_args = FlashAttnVarlenArgs {
        q: &i.q,
        k: &i.k,
        v: &i.v,
        max_seqlen_q: i.max_seqlen_q,
        cu_seqlens_q: &i.cu_seqlens_q,
        max_seqlen_k: i.max_seqlen_k,
        seqused_k: &i.seqused_k,
        softmax_scale: None,
        causal: true,
        window_size: (-1, -1),
        softcap: 0.0,
        alibi_slopes: None,
        block_table: &i.block_table,
    };
    let plan = pagedattn::flash_attn::validate(&Device::Cpu, &Tensor::nan(i.q.dtype(), i.q.shape()), None, &host_args).unwrap();
    let (want, _) = pagedattn::cpu::flash_attn::reference(&plan, &host_args);
    let (q, k, v) = (device.upload(&i.q).unwrap(), device.upload(&i.k).unwrap(), device.upload(&i.v).unwrap());
    for kernel in kernels(&device) {
        let mut out = device.nan(ScalarType::F16, i.q.shape()).unwrap();
        let a = FlashAttnVarlenArgs { q: &q, k: &k, v: &v, ..host_args };
        flash_attn_varlen_func_with(&device, &mut out, None, &a, kernel).unwrap();
        let got = out.to_cpu().unwrap().to_f64_vec();
        // The tensor cores multiply a masked key's probability (0) by its value: an infinite value
        // makes NaN in rows of its sequence that cannot see it (causally before it). Those rows of
        // sequence 2 (tokens 5..10) may be non-finite; every other row must match exactly.
        let rows = check_rows(&got, &want, 128, DType::F16, &format!("varlen ({})", kernel.name()), &|r| (5..10).contains(&(r / 8)));
        assert!(rows >= 5, "varlen ({}): only {rows} non-finite rows", kernel.name());
    }
    // Non-finite data is not bad device data: no flag.
    crate::common::gpu_of(&mut device).check_status().unwrap();
}

/// Three streams (three `Gpu` handles on one context) launch paged attention v1, v2 and varlen over
/// the same read-only caches, 20 times each, concurrently from three threads: every output equals
/// the serial run's bit for bit, and so does every repetition (the kernels are deterministic).
#[test]
fn gpu_streams_share_read_only_caches() {
    let Some(device) = gpu_or_skip!() else { return };
    let Device::Gpu(first) = &device else { unreachable!() };
    let ctx = first.context().clone();
    let c = Case::new(DType::F16, (8, 2), 128, 16, &[300, 1, 77, 1024, 0, 45], false, 12);
    let host = c.inputs().unwrap();
    let shared = host.upload(&device).unwrap();
    let vc = VarlenCase {
        dtype: DType::F16,
        heads: (8, 2),
        head_size: 128,
        block_size: 16,
        seqs: vec![(64, 300), (1, 1024), (200, 200)],
        causal: true,
        window: (-1, -1),
        softcap: 0.0,
        alibi: false,
        seed: 13,
    };
    let vi = vc.inputs().unwrap();
    let up = |t: &Tensor| device.upload(t).unwrap();
    let (vq, vk, vv, vcu, vused, vtable) = (up(&vi.q), up(&vi.k), up(&vi.v), up(&vi.cu_seqlens_q), up(&vi.seqused_k), up(&vi.block_table));
    first.synchronize().unwrap();
    // One op per stream; each returns the output's bits.
    let run = |dev: &Device, which: usize| -> Vec<u8> {
        match which {
            0 | 1 => {
                let mut out = dev.nan(ScalarType::F16, host.query.shape()).unwrap();
                let mut ws = PagedAttentionWorkspace::with_partition_size(dev, 6, 8, 128, 1024, 128).unwrap();
                let version = if which == 0 { Version::V1 } else { Version::V2 };
                paged_attention(dev, &mut out, &shared.args(), &mut ws, version).unwrap();
                crate::common::bits(&out)
            }
            _ => {
                let mut out = dev.nan(ScalarType::F16, vi.q.shape()).unwrap();
                let a = FlashAttnVarlenArgs {
                    q: &vq,
                    k: &vk,
                    v: &vv,
                    max_seqlen_q: vi.max_seqlen_q,
                    cu_seqlens_q: &vcu,
                    max_seqlen_k: vi.max_seqlen_k,
                    seqused_k: &vused,
                    softmax_scale: None,
                    causal: true,
                    window_size: (-1, -1),
                    softcap: 0.0,
                    alibi_slopes: None,
                    block_table: &vtable,
                };
                flash_attn_varlen_func_with(dev, &mut out, None, &a, FlashKernel::Auto).unwrap();
                crate::common::bits(&out)
            }
        }
    };
    let serial: Vec<Vec<u8>> = (0..3).map(|w| run(&device, w)).collect();
    let devices: Vec<Device> = (0..3).map(|_| Device::Gpu(Gpu::with_stream(ctx.new_stream().unwrap()).unwrap())).collect();
    std::thread::scope(|s| {
        for (w, dev) in devices.iter().enumerate() {
            let (run, serial) = (&run, &serial);
            s.spawn(move || {
                for rep in 0..20 {
                    assert!(run(dev, w) == serial[w], "op {w} on its own stream, repetition {rep}: not the serial run's bits");
                }
            });
        }
    });
    let names = ["paged_attention v1", "paged_attention v2", "flash_attn_varlen_func"];
    crate::common::note(&format!("gpu_streams_share_read_only_caches: {names:?} on 3 streams × 20 runs equal the serial bits"));
}

/// Allocations that cannot fit are `Error::OutOfMemory` with the size asked for (device memory and
/// page-locked host memory), and the device keeps working afterwards.
#[test]
fn gpu_out_of_memory_is_a_typed_error() {
    let Some(device) = gpu_or_skip!() else { return };
    let Device::Gpu(gpu) = &device else { unreachable!() };
    let (free, total) = gpu.context().mem_get_info().unwrap();
    let elems = (total + (16 << 30)) / 4; // more than the card holds
    match gpu.zeros(ScalarType::F32, &[elems]) {
        Err(pagedattn::Error::OutOfMemory { memory: "GPU", bytes: Some(b) }) => assert_eq!(b, elems * 4),
        other => panic!("a {} GiB allocation ({} GiB free): expected OutOfMemory, got {other:?}", (elems * 4) >> 30, free >> 30),
    }
    let host = Tensor::from_f32(DType::F32, &[1], &[0.0]).unwrap();
    match gpu.pinned(ScalarType::F32, &[1 << 40]) {
        Err(e @ pagedattn::Error::OutOfMemory { memory: "pinned host", .. }) => crate::common::note(&format!("4 TiB pinned: {e}")),
        other => panic!("a 4 TiB pinned allocation: expected OutOfMemory, got {other:?}"),
    }
    // Still usable.
    let t = device.upload(&host).unwrap();
    assert_eq!(t.to_cpu().unwrap().to_f64_vec(), vec![0.0]);
}
