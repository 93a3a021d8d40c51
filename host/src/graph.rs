//! CUDA graphs: record a sequence of ops on the GPU's stream once, then replay it with one launch
//! and no host work per op (no validation, no dispatch, no argument packing).
//!
//! Every op reads its device-side inputs (block tables, sequence lengths, slot mappings, fp8 scales)
//! from device memory at each launch, so a replay sees whatever the caller wrote there since: update
//! them in place (same allocations) between replays. Shapes, host scalars and the chosen kernels are
//! fixed at capture; paged attention's choice between v1 and v2 depends only on the workspace's
//! bound, never on device data, so a captured decode step stays valid while lengths grow up to it.
//!
//! ```no_run
//! # fn step(_: &pagedattn::Device) -> pagedattn::Result<()> { Ok(()) }
//! # fn main() -> pagedattn::Result<()> {
//! let device = pagedattn::Device::auto();
//! if let pagedattn::Device::Gpu(gpu) = &device {
//!     let graph = gpu.capture(|| step(&device))?; // e.g. reshape_and_cache + paged_attention
//!     for _ in 0..100 {
//!         // write the next step's slots, lengths and queries into the same device tensors, then:
//!         graph.replay()?;
//!     }
//!     gpu.synchronize()?;
//! }
//! # Ok(()) }
//! ```

use cudarc::driver::{CudaGraph, sys};

use crate::device::Gpu;
use crate::error::{Error, Result};

/// A captured, instantiated sequence of launches on one [`Gpu`]'s stream.
pub struct Graph {
    inner: CudaGraph,
}

impl Gpu {
    /// Records the work `record` enqueues on this GPU's stream into a graph instead of running it.
    /// The ops inside must take device-resident tables (a host table is uploaded with a copy from
    /// pageable memory, which capture refuses) and must not synchronize; an op's error, or one from
    /// the driver, ends the capture and is returned.
    pub fn capture(&self, record: impl FnOnce() -> Result<()>) -> Result<Graph> {
        let stream = self.stream();
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let recorded = record();
        // End the capture whatever happened, so the stream leaves capture mode.
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        match ended? {
            Some(inner) => {
                inner.upload()?;
                Ok(Graph { inner })
            }
            None => {
                Err(Error::Value { op: "capture", what: "recorded work", got: "none".into(), why: "the closure enqueued nothing".into() })
            }
        }
    }
}

impl Graph {
    /// Enqueues one replay of the whole graph on the stream it was captured from (asynchronous).
    pub fn replay(&self) -> Result<()> {
        Ok(self.inner.launch()?)
    }
}
