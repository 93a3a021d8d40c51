//! The single `unsafe` kernel launch of the library.

use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};

/// Launches `func` with one by-value params struct on `stream` (asynchronous).
///
/// # Safety
/// `P` is the exact params type the kernel declares; every device pointer in `params` is valid for
/// every access the kernel makes with `cfg` (the op validated shapes, strides and sizes); `cfg`'s
/// block size and dynamic shared memory are the kernel's geometry.
pub(crate) unsafe fn launch<P: DeviceRepr>(stream: &CudaStream, func: &CudaFunction, cfg: LaunchConfig, params: &P) -> Result<()> {
    let mut builder = stream.launch_builder(func);
    builder.arg(params);
    // SAFETY: the caller upholds cudarc's launch contract (argument type and count match the
    // kernel's signature, pointers valid for the kernel's accesses, geometry as the kernel expects).
    unsafe { builder.launch(cfg) }.map_err(|source| Error::Launch {
        grid: cfg.grid_dim,
        block: cfg.block_dim,
        shared_mem_bytes: cfg.shared_mem_bytes,
        source,
    })?;
    Ok(())
}
