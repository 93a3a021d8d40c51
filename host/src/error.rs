//! The library's error type: every variant carries the offending values.

use crate::tensor::ScalarType;

/// What an op, a device or a benchmark can fail with. Argument errors (`Shape` to `Device`) are
/// found before anything is launched; [`Error::DeviceData`] comes later, from
/// [`Gpu::check_status`](crate::Gpu::check_status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor has the wrong rank or extent.
    #[error("{op}: `{tensor}` has shape {got:?}, expected {expected}")]
    Shape {
        /// The op that rejected it, e.g. `"reshape_and_cache"`.
        op: &'static str,
        /// The argument's name, e.g. `"key_cache"`.
        tensor: &'static str,
        /// The tensor's shape.
        got: Vec<usize>,
        /// The shape the op needs, in words or with its sizes filled in.
        expected: String,
    },

    /// A tensor has the wrong element type.
    #[error("{op}: `{tensor}` has dtype {got}, expected {expected}")]
    DType {
        /// The op that rejected it, e.g. `"reshape_and_cache"`.
        op: &'static str,
        /// The argument's name, e.g. `"key_cache"`.
        tensor: &'static str,
        /// The tensor's element type.
        got: ScalarType,
        /// The element type(s) the op accepts there.
        expected: String,
    },

    /// A tensor's strides or alignment are not supported.
    #[error("{op}: `{tensor}` has strides {strides:?} (offset {offset}): {why}")]
    Layout {
        /// The op that rejected it, e.g. `"reshape_and_cache"`.
        op: &'static str,
        /// The argument's name, e.g. `"key_cache"`.
        tensor: &'static str,
        /// The tensor's strides, in elements.
        strides: Vec<usize>,
        /// The tensor's offset into its storage, in elements.
        offset: usize,
        /// What is wrong with them.
        why: String,
    },

    /// A scalar argument is out of range.
    #[error("{op}: {what} = {got} is invalid: {why}")]
    Value {
        /// The op that rejected it, e.g. `"reshape_and_cache"`.
        op: &'static str,
        /// The argument or derived size, e.g. `"scale"` or `"num_pairs"`.
        what: &'static str,
        /// Its value.
        got: String,
        /// The rule it breaks.
        why: String,
    },

    /// No compiled variant for this combination.
    #[error("{op}: unsupported {what} = {got} (supported: {supported})")]
    Unsupported {
        /// The op that rejected it, e.g. `"reshape_and_cache"`.
        op: &'static str,
        /// What has no variant, e.g. `"head_size"` or `"(dtype, kv_cache_dtype)"`.
        what: &'static str,
        /// The value asked for.
        got: String,
        /// The values that are compiled.
        supported: String,
    },

    /// Host-side data (a block table or lengths given as a CPU tensor) is inconsistent.
    #[error("{op}: {what}")]
    HostData {
        /// The op that rejected it, e.g. `"reshape_and_cache"`.
        op: &'static str,
        /// The offending entry and why, e.g. `"block_mapping[3][1] = 9 is outside 0..8 (destination blocks)"`.
        what: String,
    },

    /// Tensors live on different devices, or not on the backend's device.
    #[error("{op}: `{tensor}` is on the {got}, the op runs on the {expected}")]
    Device {
        /// The op that rejected it, e.g. `"reshape_and_cache"`.
        op: &'static str,
        /// The argument's name, e.g. `"key_cache"`.
        tensor: &'static str,
        /// Where the tensor is ([`Storage::location`](crate::Storage::location)).
        got: &'static str,
        /// Where the op needs it.
        expected: &'static str,
    },

    /// A kernel met bad device-side data (see `pagedattn_layout::status`): the affected outputs are NaN.
    #[error("a kernel reported bad device-side data: {}", describe_status(*flags))]
    DeviceData {
        /// The status flags raised (`pagedattn_layout::status`, e.g. `BAD_BLOCK_ID`), OR-ed together.
        flags: u32,
    },

    /// No CUDA driver or device on this machine.
    #[error("no GPU: {0}")]
    NoGpu(String),

    /// The device has no usable kernel image (neither a matching cubin nor PTX it can JIT).
    #[error("no kernel image of family `{family}` for compute capability {major}.{minor} (compiled: {available})")]
    NoImage {
        /// The kernel family, e.g. `"paged_attention"`.
        family: &'static str,
        /// The device's compute capability, major version.
        major: i32,
        /// The device's compute capability, minor version.
        minor: i32,
        /// The archs the family was compiled for, comma-separated.
        available: String,
    },

    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(cudarc::driver::DriverError),

    /// The driver refused a kernel launch (e.g. too many resources for the device, or a context
    /// broken by an earlier fault).
    #[error("kernel launch (grid {grid:?}, block {block:?}, {shared_mem_bytes} bytes of shared memory) failed: {source}")]
    Launch {
        /// Blocks per grid (x, y, z).
        grid: (u32, u32, u32),
        /// Threads per block (x, y, z).
        block: (u32, u32, u32),
        /// Dynamic shared memory per block.
        shared_mem_bytes: u32,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },

    /// An allocation did not fit: device memory, or page-locked host memory.
    #[error("out of {memory} memory: {}", match bytes { Some(b) => format!("{b} bytes requested"), None => "an allocation failed".into() })]
    OutOfMemory {
        /// `"GPU"` or `"pinned host"`.
        memory: &'static str,
        /// The size asked for, where the library knows it.
        bytes: Option<usize>,
    },

    /// An I/O error: reading a kernel image (`PAGEDATTN_KERNEL_DIR`), or a corrupt embedded one.
    #[error("{0}")]
    Io(#[from] std::io::Error),

    /// The block manager refused a call (out of blocks, unknown sequence, ...); nothing changed.
    #[error("block manager: {0}")]
    Blocks(#[from] crate::block_manager::BlockError),
}

/// The library's result type: `E` defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn describe_status(flags: u32) -> String {
    let names: Vec<&str> = pagedattn_layout::status::FLAGS.iter().filter(|(f, _)| flags & f != 0).map(|(_, n)| *n).collect();
    format!("{} (flags {flags:#x})", names.join(", "))
}

/// Driver errors become [`Error::Driver`], except out-of-memory, which becomes
/// [`Error::OutOfMemory`] (of the GPU; allocations that know their size and kind say so, see
/// [`Error::alloc`]).
impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Error {
        if e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
            return Error::OutOfMemory { memory: "GPU", bytes: None };
        }
        Error::Driver(e)
    }
}

impl Error {
    /// The error of an allocation of `bytes` in `memory` (`"GPU"` or `"pinned host"`).
    pub fn alloc(e: cudarc::driver::DriverError, memory: &'static str, bytes: usize) -> Error {
        match Error::from(e) {
            Error::OutOfMemory { .. } => Error::OutOfMemory { memory, bytes: Some(bytes) },
            other => other,
        }
    }
}
