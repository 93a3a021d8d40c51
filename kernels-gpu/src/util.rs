//! Device helpers for tests and benchmarks: deterministic random fill (large caches are filled on
//! the device instead of copied from the host) and a read-only streaming probe (the bandwidth
//! ceiling that `pagedattn bench` reports against).

use crate::fp8;
use crate::intrinsics::{Bf16, Chunk, Element, block_dim_x, block_idx_x, grid_dim_x, load_chunk, thread_idx_x, warp_sum};
use crate::intrinsics::{dynamic_smem_chunks, sync_threads};
use crate::tensor_core::{self as tc, Bf16 as TcBf16, F16 as TcF16, MmaElem};
use pagedattn_layout::{FillParams, Fp8CodecParams, Fp8Kind, MmaProbeParams, StreamReadParams, hash_uniform};

/// `p[i] = scale * hash_uniform(i, seed)` for `i < n`, converted to `T` with round-to-nearest-even.
/// Any grid; grid-stride loop.
///
/// # Safety
/// `p` is valid for `n` writes.
#[inline(always)]
unsafe fn fill_uniform<T: Element>(p: *mut T, n: u64, seed: u64, scale: f32) {
    let stride = (grid_dim_x() * block_dim_x()) as u64;
    let mut i = (block_idx_x() * block_dim_x() + thread_idx_x()) as u64;
    while i < n {
        // SAFETY: i < n.
        unsafe { *p.add(i as usize) = T::from_f32(scale * hash_uniform(i, seed)) };
        i += stride;
    }
}

/// # Safety
/// `p.ptr` is valid for `p.n` f32 writes.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn fill_uniform_f32(p: FillParams) {
    // SAFETY: forwarded.
    unsafe { fill_uniform(p.ptr as *mut f32, p.n, p.seed, p.scale) }
}

/// # Safety
/// `p.ptr` is valid for `p.n` f16 writes.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn fill_uniform_f16(p: FillParams) {
    // SAFETY: forwarded.
    unsafe { fill_uniform(p.ptr as *mut f16, p.n, p.seed, p.scale) }
}

/// # Safety
/// `p.ptr` is valid for `p.n` bf16 writes.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn fill_uniform_bf16(p: FillParams) {
    // SAFETY: forwarded.
    unsafe { fill_uniform(p.ptr as *mut Bf16, p.n, p.seed, p.scale) }
}

/// `p[i] = encode(scale * hash_uniform(i, seed))`: fp8 codes (round to nearest even, saturating).
///
/// # Safety
/// `p` is valid for `n` byte writes.
#[inline(always)]
unsafe fn fill_uniform_fp8(kind: Fp8Kind, p: *mut u8, n: u64, seed: u64, scale: f32) {
    let stride = (grid_dim_x() * block_dim_x()) as u64;
    let mut i = (block_idx_x() * block_dim_x() + thread_idx_x()) as u64;
    while i < n {
        // SAFETY: i < n.
        unsafe { *p.add(i as usize) = fp8::encode(kind, scale * hash_uniform(i, seed), true) };
        i += stride;
    }
}

/// # Safety
/// `p.ptr` is valid for `p.n` byte writes.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn fill_uniform_e4m3(p: FillParams) {
    // SAFETY: forwarded.
    unsafe { fill_uniform_fp8(Fp8Kind::E4m3, p.ptr as *mut u8, p.n, p.seed, p.scale) }
}

/// # Safety
/// `p.ptr` is valid for `p.n` byte writes.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn fill_uniform_e5m2(p: FillParams) {
    // SAFETY: forwarded.
    unsafe { fill_uniform_fp8(Fp8Kind::E5m2, p.ptr as *mut u8, p.n, p.seed, p.scale) }
}

/// Reads `n_chunks` 16-byte chunks once (grid-stride, 16-byte loads) and writes one word per CTA
/// (`out[blockIdx.x]`), so the reads cannot be optimised away. Launch with 256 threads.
///
/// # Safety
/// `src` is valid for `n_chunks * 16` bytes and 16-byte aligned; `out` has `gridDim.x` words.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn stream_read(p: StreamReadParams) {
    let (src, n_chunks, out) = (p.src as *const Chunk, p.n_chunks, p.out as *mut u32);
    let stride = (grid_dim_x() * block_dim_x()) as u64;
    let mut i = (block_idx_x() * block_dim_x() + thread_idx_x()) as u64;
    let mut x = 0u32;
    // Four independent loads in flight per iteration.
    while i + 3 * stride < n_chunks {
        // SAFETY: every index < n_chunks.
        let (a, b, c, d) = unsafe {
            (
                load_chunk(src.add(i as usize)),
                load_chunk(src.add((i + stride) as usize)),
                load_chunk(src.add((i + 2 * stride) as usize)),
                load_chunk(src.add((i + 3 * stride) as usize)),
            )
        };
        for k in 0..4 {
            x ^= a.0[k] ^ b.0[k] ^ c.0[k] ^ d.0[k];
        }
        i += 4 * stride;
    }
    while i < n_chunks {
        // SAFETY: i < n_chunks.
        let v = unsafe { load_chunk(src.add(i as usize)) };
        x ^= v.0[0] ^ v.0[1] ^ v.0[2] ^ v.0[3];
        i += stride;
    }
    let r = warp_sum(f32::from_bits(x & 0x007f_ffff));
    if thread_idx_x() == 0 {
        // SAFETY: one word per CTA.
        unsafe { *out.add(block_idx_x()) = r.to_bits() };
    }
}

/// Test kernel of the fp8 conversions (see `Fp8CodecParams`): decodes the 256 codes and encodes
/// `n` floats with the path `p.hardware` asks for (hardware only where the build has it).
///
/// # Safety
/// `decoded` holds 256 f32, `input`/`encoded` `n` elements, `used_hardware` one u32.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn fp8_codec(p: Fp8CodecParams) {
    let kind = if p.kind == 0 { Fp8Kind::E4m3 } else { Fp8Kind::E5m2 };
    let hw = p.hardware != 0;
    let stride = grid_dim_x() * block_dim_x();
    let first = block_idx_x() * block_dim_x() + thread_idx_x();
    let mut i = first;
    while i < 256 {
        // SAFETY: 256 decoded entries.
        unsafe { *(p.decoded as *mut f32).add(i) = fp8::decode(kind, i as u8, hw) };
        if i.is_multiple_of(4) {
            let w = (i as u32) | ((i as u32 + 1) << 8) | ((i as u32 + 2) << 16) | ((i as u32 + 3) << 24);
            let v = fp8::decode4(kind, w, hw);
            for e in 0..4 {
                // SAFETY: i + e < 256 entries of decoded4.
                unsafe { *(p.decoded4 as *mut f32).add(i + e) = v[e] * fp8::unit(kind, hw) };
            }
        }
        i += stride;
    }
    let mut i = first;
    while i < p.n as usize {
        // SAFETY: i < n.
        unsafe { *(p.encoded as *mut u8).add(i) = fp8::encode(kind, *(p.input as *const f32).add(i), hw) };
        i += stride;
    }
    if first == 0 {
        // SAFETY: one word.
        unsafe { *(p.used_hardware as *mut u32) = (hw && fp8::HARDWARE) as u32 };
    }
}

/// Test kernel of the tensor-core fragments (see `MmaProbeParams`). Launch one warp and 1024 bytes
/// of dynamic shared memory.
///
/// # Safety
/// `a` holds 256 halves, `k` and `v` 128 each (16-byte aligned); `qk` and `pv` 128 f32 each.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn mma_probe(p: MmaProbeParams) {
    // SAFETY: forwarded.
    unsafe { if p.bf16 != 0 { mma_probe_of::<TcBf16>(&p) } else { mma_probe_of::<TcF16>(&p) } }
}

/// # Safety
/// As [`mma_probe`].
#[inline(always)]
unsafe fn mma_probe_of<E: MmaElem>(p: &MmaProbeParams) {
    let lane = thread_idx_x();
    // Shared tiles, in 16-byte chunks: A (32 chunks: row r = chunks 2r, 2r + 1), K (16: the same
    // rows of 2 chunks), V (16: one chunk per row).
    let smem = dynamic_smem_chunks();
    // SAFETY: the launch gives 64 chunks; the global buffers have the sizes above.
    unsafe {
        let (a_s, k_s, v_s) = (smem, smem.add(32), smem.add(48));
        tc::cp_async_16(tc::shared_addr(a_s.add(lane)), (p.a as *const Chunk).add(lane));
        if lane < 16 {
            tc::cp_async_16(tc::shared_addr(k_s.add(lane)), (p.k as *const Chunk).add(lane));
        } else {
            tc::cp_async_16(tc::shared_addr(v_s.add(lane - 16)), (p.v as *const Chunk).add(lane - 16));
        }
        tc::cp_async_commit();
        tc::cp_async_wait_all();
        sync_threads();
        let half = |c: *mut Chunk, i: usize| tc::shared_addr((c as *const u16).add(i));
        // A: lane l addresses row l % 16, column block l / 16.
        let a = tc::ldmatrix_x4(half(a_s, (lane % 16) * 16 + (lane / 16) * 8));
        // Kᵀ: lanes 0-7 rows 0-7 at column 0, lanes 8-15 the same rows at column 8.
        let kb = tc::ldmatrix_x2(half(k_s, (lane % 8) * 16 + ((lane / 8) % 2) * 8));
        // V: lanes 0-15 rows 0-15 (transposed on load).
        let vb = tc::ldmatrix_x2_trans(half(v_s, (lane % 16) * 8));
        let qk = tc::mma_16816::<E>(a, kb, [0.0; 4]);
        let pv = tc::mma_16816::<E>(a, vb, [0.0; 4]);
        let (g, t) = (lane / 4, lane % 4);
        for (out, d) in [(p.qk as *mut f32, qk), (p.pv as *mut f32, pv)] {
            *out.add(g * 8 + 2 * t) = d[0];
            *out.add(g * 8 + 2 * t + 1) = d[1];
            *out.add((g + 8) * 8 + 2 * t) = d[2];
            *out.add((g + 8) * 8 + 2 * t + 1) = d[3];
        }
    }
}
