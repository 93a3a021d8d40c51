//! Per-device state of the binding: the library's [`Gpu`] (opened on first use, in the device's
//! primary context, which torch shares), the stream ops go on (torch's current stream, followed
//! call by call), and paged attention v2's workspace (grown on demand, never while a stream is
//! being captured).

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaStream, sys};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use pagedattn::paged_attention::PagedAttentionWorkspace;
use pagedattn::{Device, Gpu};

use crate::array::{Array, Place, place_name, torch_loaded};
use crate::errors::{CudaError, DevicePlacementError, to_py};

/// One opened GPU.
pub struct DeviceState {
    /// Always `Device::Gpu`.
    pub device: Device,
    /// Raw handle of the stream `device` queues on now.
    stream: u64,
    /// v2's partial results, with the bounds it was made for: (sequences × heads, head size,
    /// max_seq_len).
    workspace: Option<(PagedAttentionWorkspace, (usize, usize, usize))>,
    /// The stream the workspace was last used on.
    workspace_stream: Option<u64>,
    /// Workspaces a larger one replaced: kept, since captured graphs may address them.
    retired: Vec<PagedAttentionWorkspace>,
}

static DEVICES: Mutex<Vec<Option<DeviceState>>> = Mutex::new(Vec::new());

/// torch's `_cuda_getCurrentRawStream` (a C function: about 0.1 µs a call).
static RAW_STREAM: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The stream ops on device `ordinal` go on: torch's current stream there if torch is imported,
/// else the legacy default stream (0).
pub fn current_stream(py: Python<'_>, ordinal: usize) -> PyResult<u64> {
    if !torch_loaded(py) {
        return Ok(0);
    }
    if let Some(s) = crate::array::torch_stream(py, ordinal) {
        return Ok(s);
    }
    let f = match RAW_STREAM.get(py) {
        Some(f) => f,
        None => {
            let f = py.import("torch")?.getattr("_C")?.getattr("_cuda_getCurrentRawStream")?.unbind();
            RAW_STREAM.get_or_init(py, || f)
        }
    };
    f.bind(py).call1((ordinal,))?.extract()
}

/// The device of a call: every CUDA array's ordinal must agree. Arrays whose producer did not say
/// (`__cuda_array_interface__`) are asked of the driver, which also proves they are device memory.
/// `None` when no array names a device and the driver cannot be asked (no GPU).
pub fn call_device(arrays: &[&Array]) -> PyResult<usize> {
    let mut found: Option<(usize, &'static str)> = None;
    let mut agree = |ordinal: usize, name: &'static str| -> PyResult<()> {
        match found {
            Some((o, first)) if o != ordinal => Err(DevicePlacementError::new_err(format!(
                "`{name}` is on cuda:{ordinal} but `{first}` is on cuda:{o}: all arrays must be on one device"
            ))),
            Some(_) => Ok(()),
            None => {
                found = Some((ordinal, name));
                Ok(())
            }
        }
    };
    for a in arrays {
        if let Place::Cuda(o) = a.place {
            agree(o, a.name)?;
        }
    }
    for a in arrays {
        if a.place == Place::CudaUnknown {
            let o = pointer_device(a)?;
            agree(o, a.name)?;
        }
    }
    match found {
        Some((o, _)) => Ok(o),
        None => {
            let names: Vec<_> = arrays.iter().map(|a| format!("{} on {}", a.name, place_name(a.place))).collect();
            Err(DevicePlacementError::new_err(format!("no CUDA array among the arguments ({})", names.join(", "))))
        }
    }
}

/// The device ordinal of `a`'s memory, from the driver.
fn pointer_device(a: &Array) -> PyResult<usize> {
    // SAFETY: only probes whether libcuda can be loaded.
    let gpu_present = unsafe { sys::is_culib_present() } && with_device_count().is_ok_and(|n| n > 0);
    if !gpu_present {
        return Err(CudaError::new_err("no GPU: the NVIDIA driver or a device is missing"));
    }
    if a.numel() == 0 {
        return Ok(0);
    }
    let mut ordinal: i32 = -1;
    // SAFETY: asks the driver about an address; writes one i32 into `ordinal`.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut i32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            a.ptr as sys::CUdeviceptr,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS || ordinal < 0 {
        return Err(DevicePlacementError::new_err(format!(
            "`{}`: address {:#x} from __cuda_array_interface__ is not device memory the driver knows ({r:?})",
            a.name, a.ptr
        )));
    }
    Ok(ordinal as usize)
}

fn with_device_count() -> Result<i32, pagedattn::Error> {
    Ok(cudarc::driver::CudaContext::device_count()?)
}

/// Runs `f` with device `ordinal`'s state, its ops queued on `stream` (opening the device first).
/// Arrays with a `__cuda_array_interface__` stream are ordered before it.
pub fn with_device<R>(ordinal: usize, stream: u64, arrays: &[&Array], f: impl FnOnce(&mut DeviceState) -> PyResult<R>) -> PyResult<R> {
    let _restore = RestoreContext(cudarc::driver::result::ctx::get_current().ok().flatten());
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if devices.len() <= ordinal {
        devices.resize_with(ordinal + 1, || None);
    }
    let slot = &mut devices[ordinal];
    if slot.is_none() {
        let gpu = Gpu::new(ordinal).map_err(to_py)?;
        // The status word was zeroed on the Gpu's own stream; finish that before other streams use it.
        gpu.synchronize().map_err(to_py)?;
        *slot =
            Some(DeviceState { device: Device::Gpu(gpu), stream: u64::MAX, workspace: None, workspace_stream: None, retired: Vec::new() });
    }
    let state = slot.as_mut().expect("opened above");
    if state.stream != stream {
        let Device::Gpu(gpu) = &mut state.device else { unreachable!("a DeviceState holds a GPU") };
        // SAFETY: `stream` is torch's current stream of this device (or the legacy default stream),
        // a valid stream of its primary context, which torch keeps alive; work is ordered on it
        // exactly as torch's own kernels are.
        let s: Arc<CudaStream> = unsafe { gpu.context().wrap_borrowed_stream(stream as sys::CUstream) };
        gpu.set_stream(s).map_err(to_py)?;
        state.stream = stream;
    }
    for a in arrays {
        if let Some(s) = a.stream
            && s as u64 != stream
        {
            let Device::Gpu(gpu) = &state.device else { unreachable!() };
            // SAFETY: a `__cuda_array_interface__` v3 producer's stream, valid while it exports.
            let producer = unsafe { gpu.context().wrap_borrowed_stream(s as sys::CUstream) };
            gpu.stream().join(&producer).map_err(|e| to_py(e.into()))?;
        }
    }
    f(state)
}

/// Puts the thread's current context back when dropped. Ops make their device's context current
/// (cudarc binds it before driver calls), and torch's runtime reads its current device from it.
struct RestoreContext(Option<sys::CUcontext>);

impl Drop for RestoreContext {
    fn drop(&mut self) {
        if let Some(ctx) = self.0
            && Some(ctx) != cudarc::driver::result::ctx::get_current().ok().flatten()
        {
            // SAFETY: `ctx` was current on this thread during the call; torch keeps its primary
            // contexts alive.
            let _ = unsafe { cudarc::driver::result::ctx::set_current(ctx) };
        }
    }
}

impl DeviceState {
    /// The GPU.
    pub fn gpu(&mut self) -> &mut Gpu {
        match &mut self.device {
            Device::Gpu(g) => g,
            Device::Cpu => unreachable!("a DeviceState holds a GPU"),
        }
    }

    /// v2's workspace, large enough for `rows` (sequences × heads) of `head_size` and sequences up
    /// to `max_seq_len` tokens, ordered after its last use on another stream.
    ///
    /// - Grown outside stream capture only, to powers of two (so a growing workload regrows a few
    ///   times at most). A workspace it replaces is kept, not freed: a captured CUDA graph may still
    ///   address it.
    /// - One workspace serves every stream of the device: a call on another stream than the last
    ///   one waits for that stream's work first (an event). While a stream is captured the wait is
    ///   left out (torch synchronizes the device when a capture begins).
    pub fn workspace(&mut self, rows: usize, head_size: usize, max_seq_len: usize) -> PyResult<(&Device, &mut PagedAttentionWorkspace)> {
        let stream = self.gpu().stream().clone();
        // SAFETY: queries the capture status of a valid stream.
        let status = unsafe { cudarc::driver::result::stream::is_capturing(stream.cu_stream()) }.map_err(|e| to_py(e.into()))?;
        let capturing = status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let fits = matches!(&self.workspace, Some((_, (r, h, l))) if rows <= *r && head_size <= *h && max_seq_len <= *l);
        if !fits {
            if capturing {
                return Err(CudaError::new_err(format!(
                    "paged_attention_v2 needs a larger workspace ({rows} sequence-heads of {head_size}, max_seq_len \
                     {max_seq_len}) while the stream is being captured; run the op once eagerly with the largest \
                     sizes before capturing"
                )));
            }
            let (r, h, l) = self.workspace.as_ref().map_or((0, 0, 0), |(_, b)| *b);
            let bounds = (rows.max(r).next_power_of_two(), head_size.max(h), max_seq_len.max(l).max(512).next_power_of_two());
            let ws = PagedAttentionWorkspace::new(&self.device, bounds.0, 1, bounds.1, bounds.2).map_err(to_py)?;
            if let Some((old, _)) = self.workspace.replace((ws, bounds)) {
                self.retired.push(old);
            }
        } else if let Some(last) = self.workspace_stream
            && last != stream.cu_stream() as u64
            && !capturing
        {
            // SAFETY: `last` is a stream an earlier call ran on (torch's), which torch keeps alive
            // while it is in use; recording an event on a finished stream is harmless.
            let last = unsafe { self.gpu().context().wrap_borrowed_stream(last as sys::CUstream) };
            stream.join(&last).map_err(|e| to_py(e.into()))?;
        }
        self.workspace_stream = Some(stream.cu_stream() as u64);
        let (ws, _) = self.workspace.as_mut().expect("made above");
        Ok((&self.device, ws))
    }
}

/// `check_status`: waits for `ordinal`'s current stream and raises the flags kernels set.
pub fn check_status(py: Python<'_>, ordinal: Option<usize>) -> PyResult<()> {
    let ordinal = match ordinal {
        Some(o) => o,
        None if torch_loaded(py) => py.import("torch")?.getattr("cuda")?.call_method0("current_device")?.extract()?,
        None => 0,
    };
    let stream = current_stream(py, ordinal)?;
    with_device(ordinal, stream, &[], |state| state.gpu().check_status().map_err(to_py))
}
