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

const _: () = assert!(core::mem::size_of::<FillParams>() == 32);
const _: () = assert!(core::mem::size_of::<StreamReadParams>() == 24);

/// Threads per CTA of the helper kernels.
pub const UTIL_THREADS: usize = 256;
