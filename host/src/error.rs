//! The library's error type: every variant carries the offending values.

use crate::tensor::ScalarType;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor has the wrong rank or extent.
    #[error("{op}: `{tensor}` has shape {got:?}, expected {expected}")]
    Shape { op: &'static str, tensor: &'static str, got: Vec<usize>, expected: String },

    /// A tensor has the wrong element type.
    #[error("{op}: `{tensor}` has dtype {got}, expected {expected}")]
    DType { op: &'static str, tensor: &'static str, got: ScalarType, expected: String },

    /// A tensor's strides or alignment are not supported.
    #[error("{op}: `{tensor}` has strides {strides:?} (offset {offset}): {why}")]
    Layout { op: &'static str, tensor: &'static str, strides: Vec<usize>, offset: usize, why: String },

    /// A scalar argument is out of range.
    #[error("{op}: {what} = {got} is invalid: {why}")]
    Value { op: &'static str, what: &'static str, got: String, why: String },

    /// No compiled variant for this combination.
    #[error("{op}: unsupported {what} = {got} (supported: {supported})")]
    Unsupported { op: &'static str, what: &'static str, got: String, supported: String },

    /// Host-side data (a block table or lengths given as a CPU tensor) is inconsistent.
    #[error("{op}: {what}")]
    HostData { op: &'static str, what: String },

    /// Tensors live on different devices, or not on the backend's device.
    #[error("{op}: `{tensor}` is on the {got}, the op runs on the {expected}")]
    Device { op: &'static str, tensor: &'static str, got: &'static str, expected: &'static str },

    /// A kernel met bad device-side data (see `pagedattn_layout::status`): the affected outputs are NaN.
    #[error("a kernel reported bad device-side data: {}", describe_status(*flags))]
    DeviceData { flags: u32 },

    /// No CUDA driver or device on this machine.
    #[error("no GPU: {0}")]
    NoGpu(String),

    /// The device has no usable kernel image (neither a matching cubin nor PTX it can JIT).
    #[error("no kernel image of family `{family}` for compute capability {major}.{minor} (compiled: {available})")]
    NoImage { family: &'static str, major: i32, minor: i32, available: String },

    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),

    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn describe_status(flags: u32) -> String {
    let names: Vec<&str> = pagedattn_layout::status::FLAGS.iter().filter(|(f, _)| flags & f != 0).map(|(_, n)| *n).collect();
    format!("{} (flags {flags:#x})", names.join(", "))
}
