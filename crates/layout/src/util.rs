//! Params of the device helper kernels (`kernels-gpu/src/util.rs`).

/// `fill_uniform_<dtype>`: `ptr[i] = scale * hash_uniform(i, seed)` for `i < n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FillParams {
    /// `[n]` elements of the kernel's dtype.
    pub ptr: u64,
    pub n: u64,
    pub seed: u64,
    pub scale: f32,
    pub _pad: u32,
}

/// `stream_read`: reads `n_chunks` 16-byte chunks once; writes one word per CTA to `out`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StreamReadParams {
    /// `[n_chunks * 16]` bytes, 16-byte aligned.
    pub src: u64,
    pub n_chunks: u64,
    /// `[gridDim.x]` u32.
    pub out: u64,
}

/// `fp8_codec` (a test kernel): `decoded[c] = decode(kind, c)` for the 256 codes, `decoded4[c]` the
/// same through the attention kernels' four-at-a-time decode (times its unit), and
/// `encoded[i] = encode(kind, input[i])` for `i < n`; `used_hardware[0]` says which path ran.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fp8CodecParams {
    /// `[256]` f32.
    pub decoded: u64,
    /// `[256]` f32.
    pub decoded4: u64,
    /// `[n]` f32.
    pub input: u64,
    /// `[n]` u8.
    pub encoded: u64,
    /// `[1]` u32: 1 when the hardware `cvt` ran.
    pub used_hardware: u64,
    pub n: u32,
    /// 0: e4m3, 1: e5m2.
    pub kind: u32,
    /// Nonzero: use the hardware `cvt` where the build has it.
    pub hardware: u32,
    pub _pad: u32,
}

/// `mma_probe` (a test kernel, one warp): with `A` `[16][16]`, `K` `[8][16]` and `V` `[16][8]`
/// row-major (f16, or bf16 when `bf16` is set), staged through shared memory with `cp.async` and
/// loaded with `ldmatrix`, writes `qk = A · Kᵀ` and `pv = A · V` (`[16][8]` f32) computed by
/// `mma.sync.m16n8k16`: the fragment layouts the attention kernels build on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MmaProbeParams {
    pub a: u64,
    pub k: u64,
    pub v: u64,
    pub qk: u64,
    pub pv: u64,
    pub bf16: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<MmaProbeParams>() == 48);
const _: () = assert!(core::mem::size_of::<Fp8CodecParams>() == 56);
const _: () = assert!(core::mem::size_of::<FillParams>() == 32);
const _: () = assert!(core::mem::size_of::<StreamReadParams>() == 24);

/// Threads per CTA of the helper kernels.
pub const UTIL_THREADS: usize = 256;
