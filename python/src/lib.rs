//! `pagedattn._native`: the Python binding of the pagedattn library. vLLM's attention and
//! KV-cache ops on torch tensors (or any CUDA array), without copies, on torch's current stream.
//!
//! - [`array`]: reading arrays (torch attributes, `__cuda_array_interface__`, DLPack);
//! - [`ops`]: the ops, with vLLM's signatures and the checks of vLLM's binding;
//! - [`runtime`]: the opened GPUs, the current stream, v2's workspace;
//! - [`errors`]: the exception classes;
//! - [`fastcall`]: vectorcall entry points (keyword-heavy calls without PyO3's tuple and dict).
//!
//! The Python side (`python/pagedattn/`) re-exports these under vLLM's module names; tests are in
//! `python/tests/`, the benchmark in `python/bench/`.

mod array;
mod errors;
mod fastcall;
mod ops;
mod runtime;

use pyo3::prelude::*;

/// `check_status(device=None)`: waits for the current stream of `device` (default: torch's current
/// device, else 0), then raises `DeviceDataError` if kernels flagged bad device-side data since the
/// last check (and clears the flags).
#[pyfunction]
#[pyo3(signature = (device = None))]
fn check_status(py: Python<'_>, device: Option<usize>) -> PyResult<()> {
    runtime::check_status(py, device)
}

/// `gpu_available()`: whether the NVIDIA driver and at least one GPU are present.
#[pyfunction]
fn gpu_available() -> bool {
    // SAFETY: only probes whether libcuda can be loaded.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    driver && cudarc::driver::CudaContext::device_count().is_ok_and(|n| n > 0)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    ops::register(m)?;
    m.add_function(wrap_pyfunction!(check_status, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_available, m)?)?;
    Ok(())
}
