//! Backends: the GPU (a CUDA context and stream, kernel modules loaded lazily, the device status word)
//! and the CPU reference. Binaries start on any machine: libcuda is loaded at run time, and
//! [`Device::auto`] falls back to the CPU when there is no driver or device.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, sys};
use pagedattn_layout::KernelFamily;

use crate::error::{Error, Result};
use crate::ptx;
use crate::tensor::{ScalarType, Storage, Tensor, contiguous_strides};

/// Where ops run.
pub enum Device {
    /// The float64 reference implementation (the test oracle, and the fallback without a GPU).
    Cpu,
    /// A CUDA device: ops launch its kernels asynchronously on its stream.
    Gpu(Gpu),
}

impl Device {
    /// The first GPU if a driver and device are present, else the CPU backend.
    pub fn auto() -> Device {
        match Gpu::new(0) {
            Ok(g) => Device::Gpu(g),
            Err(e) => {
                log::debug!("no GPU ({e}); using the CPU backend");
                Device::Cpu
            }
        }
    }

    /// A human-readable name: `"CPU (float64 reference)"`, or the GPU's name with its arch, e.g.
    /// `"NVIDIA H100 80GB HBM3 (sm_90)"`.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "CPU (float64 reference)".into(),
            Device::Gpu(g) => format!("{} (sm_{}{})", g.name(), g.arch.0, g.arch.1),
        }
    }

    /// Moves a tensor onto this device (a copy; a no-op clone for the CPU).
    pub fn upload(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Device::Cpu => t.to_cpu(),
            Device::Gpu(g) => t.to_gpu(&g.stream),
        }
    }

    /// A NaN-filled contiguous tensor on this device (outputs are poisoned so that an unwritten
    /// element cannot pass as a result).
    pub fn nan(&self, dtype: ScalarType, shape: &[usize]) -> Result<Tensor> {
        self.upload(&Tensor::nan(dtype, shape))
    }
}

/// A CUDA device with one stream. Ops launch asynchronously on that stream; nothing in an op
/// synchronizes, so a sequence of ops can be captured into a CUDA graph.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Compute capability (major, minor).
    pub arch: (i32, i32),
    /// Streaming multiprocessors (for launch heuristics such as the v1/v2 choice).
    pub sm_count: usize,
    /// L2 cache bytes (for launch heuristics such as the varlen tile order).
    pub l2_bytes: usize,
    /// One lazily loaded module per family (boxed: it keeps `Device` small).
    modules: Box<[OnceLock<Arc<CudaModule>>; KernelFamily::ALL.len()]>,
    /// Per family, whether a cubin for this arch is embedded (asked on every varlen call; boxed:
    /// it keeps `Device` small).
    cubins: Box<[OnceLock<bool>; KernelFamily::ALL.len()]>,
    functions: Mutex<std::collections::HashMap<&'static str, CudaFunction>>,
    /// The status word kernels OR flags into (see `pagedattn_layout::status`).
    status: CudaSlice<u32>,
    /// Bulk-copy tensor maps in device memory, by what they describe (see `crate::tma`; boxed: it
    /// keeps `Device` small).
    pub(crate) tensor_maps: Box<Mutex<crate::tma::MapCache>>,
    /// The persistent Hopper varlen kernel's work counters, one per stream (see
    /// [`Gpu::work_counter`]; boxed: it keeps `Device` small).
    work_counters: Box<Mutex<WorkCounters>>,
}

/// Two-word work counters for the persistent Hopper varlen kernel
/// (`FlashAttnVarlenParams::work_counter`): slot `i` of `words` belongs to the stream with id
/// `streams[i]`.
#[derive(Default)]
struct WorkCounters {
    words: Option<CudaSlice<u32>>,
    streams: Vec<u64>,
}

impl WorkCounters {
    /// Streams with a counter of their own; launches on further streams run a CTA per work item.
    const SLOTS: usize = 64;
}

impl Gpu {
    /// Opens device `ordinal` with a new stream.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only probes whether libcuda can be loaded.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoGpu("libcuda.so (the NVIDIA driver) is not installed".into()));
        }
        let count = CudaContext::device_count().map_err(|e| Error::NoGpu(format!("cuInit/cuDeviceGetCount failed: {e}")))?;
        if ordinal as i32 >= count {
            return Err(Error::NoGpu(format!("device {ordinal} requested, {count} present")));
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream per Gpu and graph capture: cudarc's per-allocation event tracking would record
        // events into captured streams. Disabled before any allocation.
        // SAFETY: no allocation or stream exists yet in this context handle.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        Gpu::with_stream(stream)
    }

    /// Uses the caller's stream (its context must have event tracking disabled, as in [`Gpu::new`], to
    /// be captured into a graph).
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Gpu> {
        let ctx = stream.context().clone();
        let arch = ctx.compute_capability()?;
        let sm_count = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize;
        let l2_bytes = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(0) as usize;
        let status = stream.alloc_zeros::<u32>(1)?;
        Ok(Gpu {
            ctx,
            stream,
            arch,
            sm_count,
            l2_bytes,
            modules: Default::default(),
            cubins: Default::default(),
            functions: Mutex::new(Default::default()),
            status,
            tensor_maps: Default::default(),
            work_counters: Default::default(),
        })
    }

    /// The driver's name for the device (`"unknown GPU"` if the query fails).
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// The CUDA context (for device attributes, events, memory queries).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op of this GPU is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Queues later ops on `stream`, which must belong to this GPU's context: e.g. a stream another
    /// library owns, wrapped by [`CudaContext::wrap_borrowed_stream`] (the Python binding follows
    /// torch's current stream this way). Allocations made earlier stay valid.
    pub fn set_stream(&mut self, stream: Arc<CudaStream>) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::Device { op: "set_stream", tensor: "stream", got: "another context", expected: "this GPU's context" });
        }
        self.stream = stream;
        Ok(())
    }

    /// Device address of the status word, for kernel params.
    pub(crate) fn status_ptr(&self) -> u64 {
        self.status.device_ptr(&self.stream).0
    }

    /// Device address of a two-word work counter for the persistent Hopper varlen kernel on the
    /// current stream, or 0 for a launch with a CTA per work item.
    ///
    /// The kernel takes items from the counter and its last CTA zeroes it again, so two launches
    /// must never use one counter at once. Launches on one stream are ordered, so each stream (by
    /// the id the driver gives it, unique in the context's life) has its own. A launch captured
    /// into a graph gets none: a replay may run beside later launches on the stream it was
    /// captured from. Nor do streams past the first [`WorkCounters::SLOTS`], nor any launch while
    /// the environment sets `PAGEDATTN_VARLEN_PERSISTENT=0` (an escape hatch, and the benchmark's
    /// comparison).
    pub(crate) fn work_counter(&self) -> Result<u64> {
        static OFF: OnceLock<bool> = OnceLock::new();
        if *OFF.get_or_init(|| std::env::var("PAGEDATTN_VARLEN_PERSISTENT").is_ok_and(|v| v == "0")) {
            return Ok(0);
        }
        if self.stream.capture_status()? != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(0);
        }
        let mut id = 0u64;
        // SAFETY: a live stream of this context (bound by `capture_status`); one output word.
        unsafe { sys::cuStreamGetId(self.stream.cu_stream(), &mut id) }.result()?;
        let mut counters = self.work_counters.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match counters.streams.iter().position(|&s| s == id) {
            Some(slot) => slot,
            None if counters.streams.len() < WorkCounters::SLOTS => {
                if counters.words.is_none() {
                    let words = self.stream.alloc_zeros::<u32>(2 * WorkCounters::SLOTS)?;
                    // Zeroed on this stream: the other streams' first launches may come first.
                    self.stream.synchronize()?;
                    counters.words = Some(words);
                }
                counters.streams.push(id);
                counters.streams.len() - 1
            }
            None => return Ok(0),
        };
        let words = counters.words.as_ref().expect("allocated with the first slot");
        Ok(words.device_ptr(&self.stream).0 + 8 * slot as u64)
    }

    /// Waits for the stream, then returns the flags kernels raised since the last call as
    /// [`Error::DeviceData`] (and clears them). Call after a batch of ops or a graph replay.
    pub fn check_status(&mut self) -> Result<()> {
        let flags = self.stream.clone_dtoh(&self.status)?[0];
        if flags != 0 {
            self.stream.memset_zeros(&mut self.status)?;
            return Err(Error::DeviceData { flags });
        }
        Ok(())
    }

    /// Waits for all work on the stream.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// A zeroed contiguous device tensor.
    pub fn zeros(&self, dtype: ScalarType, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product::<usize>() * dtype.size_bytes();
        // The driver refuses 0-byte allocations: an empty tensor gets one (unused) element.
        let slice = self.stream.alloc_zeros::<u8>(n.max(dtype.size_bytes())).map_err(|e| Error::alloc(e, "GPU", n))?;
        Tensor::from_storage(Storage::Gpu { slice, stream: self.stream.clone() }, dtype, shape, &contiguous_strides(shape), 0)
    }

    /// A zeroed contiguous tensor in page-locked host memory of this context: the host end of
    /// asynchronous copies (swapping cache blocks out and in). Use [`Tensor::to_pinned`] for other
    /// contents.
    pub fn pinned(&self, dtype: ScalarType, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product::<usize>() * dtype.size_bytes();
        Tensor::from_storage(Storage::pinned_zeroed(&self.ctx, n.max(dtype.size_bytes()))?, dtype, shape, &contiguous_strides(shape), 0)
    }

    /// The module of `family`, loaded on first use: the cubin built for this arch if there is one,
    /// else PTX for the driver to JIT.
    pub fn module(&self, family: KernelFamily) -> Result<Arc<CudaModule>> {
        let slot = &self.modules[family.index()];
        if let Some(m) = slot.get() {
            return Ok(m.clone());
        }
        let (image, kind) = ptx::select_image(family, self.arch)?;
        log::debug!("loading {} ({kind}) for sm_{}{}", family.name(), self.arch.0, self.arch.1);
        let module = self.ctx.load_module(image)?;
        Ok(slot.get_or_init(|| module).clone())
    }

    /// Whether a cubin of `family` for this arch is embedded (not only PTX for the driver to JIT).
    pub fn has_cubin(&self, family: KernelFamily) -> bool {
        *self.cubins[family.index()]
            .get_or_init(|| ptx::choose_image(family, self.arch).is_ok_and(|(_, kind)| kind == ptx::ImageKind::Cubin))
    }

    /// The kernel `symbol` of `family` (cached).
    pub fn function(&self, family: KernelFamily, symbol: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().expect("function cache poisoned").get(symbol) {
            return Ok(f.clone());
        }
        let f = self.module(family)?.load_function(symbol)?;
        self.functions.lock().expect("function cache poisoned").insert(symbol, f.clone());
        Ok(f)
    }

    /// Families whose module is loaded.
    pub fn loaded_families(&self) -> Vec<KernelFamily> {
        KernelFamily::ALL.into_iter().filter(|f| self.modules[f.index()].get().is_some()).collect()
    }
}

/// Checks that every tensor is on the op's device: device memory for the GPU, pageable host memory
/// for the CPU backend. `tables` may be host data on the GPU (pageable or pinned: checked, then
/// uploaded), so they are only checked for the CPU backend.
pub(crate) fn check_placement(
    op: &'static str,
    device: &Device,
    tensors: &[(&'static str, &Tensor)],
    tables: &[(&'static str, &Tensor)],
) -> Result<()> {
    let on_gpu = matches!(device, Device::Gpu(_));
    let want = if on_gpu { "GPU" } else { "CPU" };
    let extra: &[(&'static str, &Tensor)] = if on_gpu { &[] } else { tables };
    for &(name, t) in tensors.iter().chain(extra) {
        let here = if on_gpu { t.is_gpu() } else { t.is_cpu() };
        if !here {
            return Err(Error::Device { op, tensor: name, got: t.storage().location(), expected: want });
        }
    }
    Ok(())
}
