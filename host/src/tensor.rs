//! Tensors: typed, strided views over host memory (CPU backend), device memory (GPU backend) or
//! page-locked host memory (the other end of a host<->device swap).
//!
//! A tensor is a view (shape and strides in elements, starting at an element offset) over a storage
//! that it shares through an [`Arc`]: [`Tensor::view`] and [`Tensor::select`] make more views of the
//! same allocation, so vLLM's combined KV cache `[2, num_blocks, ...]` splits into a key and a value
//! view over one buffer. Host tensors are also how block tables and lengths are handed over when the
//! caller knows them on the host: then the library checks their contents before it launches anything.
//!
//! # Host storage and its lock
//!
//! Host bytes ([`Storage::Cpu`], [`Storage::Pinned`]) sit behind an [`RwLock`], so that two views of
//! one buffer can both be written. [`Tensor::cpu_bytes`] and [`Tensor::cpu_bytes_mut`] return guards
//! that lock the *whole storage*, and std's lock is not reentrant: **while a guard lives, do not touch
//! any tensor that may share its storage** (a view, [`Tensor::storage_f64`], [`Tensor::view`],
//! [`Storage::len_bytes`], ...). On the same thread that deadlocks (write guard) or may deadlock
//! behind a waiting writer (read guard). Library code takes a guard, reads or writes, and drops it
//! before the next tensor access; where it must read two views at once it checks
//! [`Tensor::shares_storage`] and reads both through one guard. A poisoned lock is ignored: the bytes
//! carry no invariant a panic could break.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use half::{bf16, f16};
use pagedattn_layout::{DType, Fp8Kind};

use crate::device::Gpu;
use crate::error::{Error, Result};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScalarType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the upper half of an f32).
    BF16,
    /// 32-bit signed integers (block tables, sequence lengths).
    I32,
    /// 64-bit signed integers (slot mappings, block mappings).
    I64,
    /// fp8 codes (a KV cache of `kv_cache_dtype` `fp8_e4m3`): as f64, the code's value.
    Fp8E4m3,
    /// fp8 e5m2 codes.
    Fp8E5m2,
}

impl ScalarType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            ScalarType::F32 | ScalarType::I32 => 4,
            ScalarType::F16 | ScalarType::BF16 => 2,
            ScalarType::I64 => 8,
            ScalarType::Fp8E4m3 | ScalarType::Fp8E5m2 => 1,
        }
    }

    /// The fp8 format, if this is one.
    pub const fn fp8(self) -> Option<Fp8Kind> {
        match self {
            ScalarType::Fp8E4m3 => Some(Fp8Kind::E4m3),
            ScalarType::Fp8E5m2 => Some(Fp8Kind::E5m2),
            _ => None,
        }
    }

    /// The tensor dtype of fp8 codes of `kind`.
    pub const fn of_fp8(kind: Fp8Kind) -> ScalarType {
        match kind {
            Fp8Kind::E4m3 => ScalarType::Fp8E4m3,
            Fp8Kind::E5m2 => ScalarType::Fp8E5m2,
        }
    }

    /// The float dtype, if this is one.
    pub const fn float(self) -> Option<DType> {
        match self {
            ScalarType::F32 => Some(DType::F32),
            ScalarType::F16 => Some(DType::F16),
            ScalarType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// Element `i` of little-endian `bytes` of this dtype, as f64.
    #[inline]
    pub fn read_f64(self, bytes: &[u8], i: usize) -> f64 {
        match self {
            ScalarType::F32 => f32::from_le_bytes(elem(bytes, i)) as f64,
            ScalarType::F16 => f16::from_le_bytes(elem(bytes, i)).to_f64(),
            ScalarType::BF16 => bf16::from_le_bytes(elem(bytes, i)).to_f64(),
            ScalarType::I32 => i32::from_le_bytes(elem(bytes, i)) as f64,
            ScalarType::I64 => i64::from_le_bytes(elem(bytes, i)) as f64,
            ScalarType::Fp8E4m3 => Fp8Kind::E4m3.decode(bytes[i]) as f64,
            ScalarType::Fp8E5m2 => Fp8Kind::E5m2.decode(bytes[i]) as f64,
        }
    }

    /// Element `i` of little-endian `bytes` of this dtype, as i64: integers exactly, floats truncated
    /// toward zero (saturating, NaN as 0).
    #[inline]
    pub fn read_i64(self, bytes: &[u8], i: usize) -> i64 {
        match self {
            ScalarType::I32 => i32::from_le_bytes(elem(bytes, i)) as i64,
            ScalarType::I64 => i64::from_le_bytes(elem(bytes, i)),
            _ => self.read_f64(bytes, i) as i64,
        }
    }

    /// Stores `v`, rounded to this dtype (integers: truncated, saturating), as element `i` of `bytes`.
    #[inline]
    pub fn write_f64(self, bytes: &mut [u8], i: usize, v: f64) {
        match self {
            ScalarType::F32 => put(bytes, i, (v as f32).to_le_bytes()),
            ScalarType::F16 => put(bytes, i, f16::from_f64(v).to_le_bytes()),
            ScalarType::BF16 => put(bytes, i, bf16::from_f64(v).to_le_bytes()),
            ScalarType::I32 => put(bytes, i, (v as i32).to_le_bytes()),
            ScalarType::I64 => put(bytes, i, (v as i64).to_le_bytes()),
            // Rounded to f32 first, then to the nearest code (saturating), as the cache kernels do.
            ScalarType::Fp8E4m3 => bytes[i] = Fp8Kind::E4m3.encode(v as f32),
            ScalarType::Fp8E5m2 => bytes[i] = Fp8Kind::E5m2.encode(v as f32),
        }
    }

    /// The lower-case name, e.g. `"bf16"` or `"fp8_e4m3"` (vLLM's `kv_cache_dtype` for fp8); also
    /// its [`Display`](std::fmt::Display).
    pub const fn name(self) -> &'static str {
        match self {
            ScalarType::F32 => "f32",
            ScalarType::F16 => "f16",
            ScalarType::BF16 => "bf16",
            ScalarType::I32 => "i32",
            ScalarType::I64 => "i64",
            ScalarType::Fp8E4m3 => "fp8_e4m3",
            ScalarType::Fp8E5m2 => "fp8_e5m2",
        }
    }
}

impl From<DType> for ScalarType {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => ScalarType::F32,
            DType::F16 => ScalarType::F16,
            DType::BF16 => ScalarType::BF16,
        }
    }
}

impl std::fmt::Display for ScalarType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Element `i` of `bytes` viewed as `[[u8; N]]` (panics past the end, like slice indexing).
#[inline]
fn elem<const N: usize>(bytes: &[u8], i: usize) -> [u8; N] {
    *bytes[i * N..].first_chunk().expect("element index past the end of the storage")
}

#[inline]
fn put<const N: usize>(bytes: &mut [u8], i: usize, v: [u8; N]) {
    *bytes[i * N..].first_chunk_mut().expect("element index past the end of the storage") = v;
}

/// Where a tensor's bytes live. Shared by every view of it (see [`Tensor::view`]).
#[derive(Debug)]
pub enum Storage {
    /// Pageable host memory, locked so that several views of it can be written (see the module docs).
    Cpu(RwLock<Vec<u8>>),
    /// Device memory; copies and kernels are queued on `stream`.
    Gpu {
        /// The allocation, as bytes.
        slice: CudaSlice<u8>,
        /// The stream it was allocated on.
        stream: Arc<CudaStream>,
    },
    /// Page-locked host memory (`cuMemHostAlloc`, not write-combined, so the CPU can read it back
    /// at full speed): the host end of asynchronous copies queued through [`Tensor::raw_ptr`]
    /// (`swap_blocks`). Nothing orders those copies with host access: synchronize their stream
    /// before reading or writing the bytes on the host, and keep the tensor alive until then.
    /// cudarc's own ordering (the slice's event, which host access waits for) is recorded only in
    /// contexts with event tracking, which [`Gpu::new`] turns off, so the copies this module makes
    /// ([`Tensor::to_gpu`], [`Tensor::to_pinned`]) wait for their stream instead.
    Pinned {
        /// The allocation, as bytes, locked as [`Storage::Cpu`]'s.
        slice: RwLock<PinnedHostSlice<u8>>,
    },
    /// Memory another library owns, e.g. a torch tensor's (the Python binding's zero-copy path):
    /// device memory, or page-locked host memory when `pinned`. Made only by the unsafe
    /// [`Tensor::from_borrowed`], whose caller keeps the memory alive, and its accesses ordered with
    /// the op's stream, until the work queued on it is done. Never freed here; its bytes are not
    /// readable through [`Tensor::host_bytes`].
    Borrowed {
        /// Address of the first byte (device or UVA host address).
        ptr: u64,
        /// Bytes from `ptr` that views may address.
        len: usize,
        /// Page-locked host memory rather than device memory.
        pinned: bool,
    },
}

#[inline]
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

#[inline]
fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Storage {
    /// Host storage over `bytes`.
    pub fn cpu(bytes: Vec<u8>) -> Storage {
        Storage::Cpu(RwLock::new(bytes))
    }

    /// `len_bytes` of zeroed page-locked host memory in `ctx` (at least one byte: the driver refuses
    /// empty allocations).
    pub fn pinned_zeroed(ctx: &Arc<CudaContext>, len_bytes: usize) -> Result<Storage> {
        let slice = alloc_pinned_zeroed(ctx, len_bytes.max(1)).map_err(|e| match e {
            Error::Driver(d) => Error::alloc(d, "pinned host", len_bytes),
            Error::OutOfMemory { .. } => Error::OutOfMemory { memory: "pinned host", bytes: Some(len_bytes) },
            other => other,
        })?;
        Ok(Storage::Pinned { slice: RwLock::new(slice) })
    }

    /// Size in bytes. Locks host storage for a moment: not while holding a guard of this storage.
    pub fn len_bytes(&self) -> usize {
        match self {
            Storage::Cpu(v) => read(v).len(),
            Storage::Gpu { slice, .. } => slice.len(),
            Storage::Pinned { slice } => read(slice).len(),
            Storage::Borrowed { len, .. } => *len,
        }
    }

    /// Where the bytes are, for messages: `"CPU"`, `"GPU"` or `"pinned host"`.
    pub fn location(&self) -> &'static str {
        match self {
            Storage::Cpu(_) => "CPU",
            Storage::Gpu { .. } => "GPU",
            Storage::Pinned { .. } | Storage::Borrowed { pinned: true, .. } => "pinned host",
            Storage::Borrowed { pinned: false, .. } => "GPU",
        }
    }

    /// All bytes under the read lock; for pinned memory after waiting for its event (see `Pinned`).
    fn lock_read(&self) -> Result<HostBytes<'_>> {
        match self {
            Storage::Cpu(v) => Ok(HostBytes(HostRead::Cpu(read(v)))),
            Storage::Pinned { slice } => {
                let guard = read(slice);
                let (ptr, len) = (guard.as_ptr()?, guard.len());
                Ok(HostBytes(HostRead::Pinned { _guard: guard, ptr, len }))
            }
            Storage::Gpu { .. } | Storage::Borrowed { .. } => Err(self.not_on_host()),
        }
    }

    /// All bytes under the write lock; for pinned memory after waiting for its event (see `Pinned`).
    fn lock_write(&self) -> Result<HostBytesMut<'_>> {
        match self {
            Storage::Cpu(v) => Ok(HostBytesMut(HostWrite::Cpu(write(v)))),
            Storage::Pinned { slice } => {
                let mut guard = write(slice);
                let (ptr, len) = (guard.as_mut_ptr()?, guard.len());
                Ok(HostBytesMut(HostWrite::Pinned { _guard: guard, ptr, len }))
            }
            Storage::Gpu { .. } | Storage::Borrowed { .. } => Err(self.not_on_host()),
        }
    }

    fn not_on_host(&self) -> Error {
        Error::Device { op: "tensor", tensor: "host bytes", got: self.location(), expected: "host" }
    }

    /// Keeps a driver error that a method can only report as `None`: cudarc's `record_err` stores it
    /// in the pinned memory's context, whose next driver call returns it.
    fn record(&self, e: Error) {
        if let (Storage::Pinned { slice }, Error::Driver(d)) = (self, e) {
            read(slice).context().record_err::<()>(Err(d));
        }
    }
}

/// `len_bytes` (> 0) of zeroed page-locked host memory in `ctx`.
fn alloc_pinned_zeroed(ctx: &Arc<CudaContext>, len_bytes: usize) -> Result<PinnedHostSlice<u8>> {
    // Flags 0: page-locked and cached (CU_MEMHOSTALLOC_WRITECOMBINED, cudarc's default, makes host
    // reads very slow, and the host reads swapped-out blocks back).
    // SAFETY: the memory is uninitialized until the `write_bytes` below; nothing reads it before.
    let mut slice = unsafe { ctx.alloc_pinned_with_flags::<u8>(len_bytes, 0) }?;
    let (ptr, len) = (slice.as_mut_ptr()?, slice.len());
    // SAFETY: `ptr` is the start of the `len`-byte allocation just made, which nothing else references;
    // writing through a raw pointer creates no reference to the uninitialized bytes.
    unsafe { ptr.write_bytes(0, len) };
    Ok(slice)
}

/// Read access to all bytes of a host storage (not just one view's), holding its read lock: see the
/// module docs for what not to do while it lives.
pub struct HostBytes<'a>(HostRead<'a>);

enum HostRead<'a> {
    Cpu(RwLockReadGuard<'a, Vec<u8>>),
    // `ptr` is taken once, after waiting for the slice's event.
    Pinned { _guard: RwLockReadGuard<'a, PinnedHostSlice<u8>>, ptr: *const u8, len: usize },
}

impl Deref for HostBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            HostRead::Cpu(v) => v,
            // SAFETY: `ptr`/`len` describe the pinned allocation that `_guard` keeps alive and
            // read-locked (no `&mut` to it exists). Its bytes are initialized (zero-filled by
            // `alloc_pinned_zeroed`, or by whoever called cudarc's unsafe `alloc_pinned`); the copies
            // this module makes into it finished before they returned. Device writes can only come
            // from copies queued through `Tensor::raw_ptr`, whose callers synchronize before host
            // access (its documented contract).
            HostRead::Pinned { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl std::fmt::Debug for HostBytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBytes({} bytes)", self.len())
    }
}

/// Write access to all bytes of a host storage, holding its write lock (see the module docs). The
/// length is fixed: views address the storage by element index.
pub struct HostBytesMut<'a>(HostWrite<'a>);

enum HostWrite<'a> {
    Cpu(RwLockWriteGuard<'a, Vec<u8>>),
    Pinned { _guard: RwLockWriteGuard<'a, PinnedHostSlice<u8>>, ptr: *mut u8, len: usize },
}

impl Deref for HostBytesMut<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            HostWrite::Cpu(v) => v,
            // SAFETY: as for `HostBytes`; `_guard` holds the write lock.
            HostWrite::Pinned { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl DerefMut for HostBytesMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            HostWrite::Cpu(v) => v,
            // SAFETY: `_guard` holds the write lock of the allocation `ptr`/`len` describe, so this is
            // the only reference to it; `&mut self` keeps it unique for the returned borrow.
            HostWrite::Pinned { ptr, len, .. } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
        }
    }
}

impl std::fmt::Debug for HostBytesMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBytesMut({} bytes)", self.len())
    }
}

/// A typed, strided view over a shared [`Storage`]. Not `Clone`: another view of the same bytes is
/// made explicitly with [`Tensor::view`] or [`Tensor::select`], a copy with `to_cpu`/`to_gpu`.
#[derive(Debug)]
pub struct Tensor {
    storage: Arc<Storage>,
    dtype: ScalarType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

/// Row-major (contiguous) strides of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Checks that a view addresses only elements of a storage of `len_bytes` bytes.
fn check_view(len_bytes: usize, dtype: ScalarType, shape: &[usize], strides: &[usize], offset: usize) -> Result<()> {
    let bad = |why: String| Error::Layout { op: "tensor", tensor: "view", strides: strides.to_vec(), offset, why };
    if shape.len() != strides.len() {
        return Err(bad(format!("rank of shape {shape:?} differs from rank of strides")));
    }
    if !len_bytes.is_multiple_of(dtype.size_bytes()) {
        return Err(bad(format!("storage of {len_bytes} bytes is not a whole number of {dtype}")));
    }
    let elems = len_bytes / dtype.size_bytes();
    if shape.iter().all(|&n| n > 0) {
        let last = shape.iter().zip(strides).try_fold(offset, |acc, (&n, &s)| s.checked_mul(n - 1).and_then(|v| v.checked_add(acc)));
        match last {
            Some(l) if l < elems => {}
            _ => return Err(bad(format!("view of shape {shape:?} reaches past the {elems} elements of its storage"))),
        }
    }
    Ok(())
}

impl Tensor {
    fn with_storage(storage: Arc<Storage>, dtype: ScalarType, shape: &[usize], strides: &[usize], offset: usize) -> Tensor {
        Tensor { storage, dtype, shape: shape.to_vec(), strides: strides.to_vec(), offset }
    }

    /// A view with explicit strides and offset (elements) over `storage`; every element it
    /// addresses must lie inside the storage.
    pub fn from_storage(storage: Storage, dtype: ScalarType, shape: &[usize], strides: &[usize], offset: usize) -> Result<Tensor> {
        check_view(storage.len_bytes(), dtype, shape, strides, offset)?;
        Ok(Tensor::with_storage(Arc::new(storage), dtype, shape, strides, offset))
    }

    /// A view over memory another library owns (a torch tensor's, through the Python binding):
    /// `len` bytes at `ptr`, device memory or, when `pinned`, page-locked host memory. Bounds are
    /// checked as in [`Tensor::from_storage`] against `len`; nothing is copied and nothing is freed.
    ///
    /// # Safety
    /// `ptr .. ptr + len` is memory of that kind in the context of the [`Gpu`] the tensor is used
    /// with, and stays allocated, with its other users ordered against the stream the ops run on,
    /// until every op queued with the tensor has finished.
    pub unsafe fn from_borrowed(
        ptr: u64,
        len: usize,
        pinned: bool,
        dtype: ScalarType,
        shape: &[usize],
        strides: &[usize],
        offset: usize,
    ) -> Result<Tensor> {
        Tensor::from_storage(Storage::Borrowed { ptr, len, pinned }, dtype, shape, strides, offset)
    }

    fn borrowed(&self, op: &'static str) -> Error {
        Error::Device { op, tensor: "borrowed memory", got: self.storage.location(), expected: "memory this library allocated" }
    }

    /// Another view of this tensor's storage (same dtype): `offset` counts elements from the start of
    /// the storage, not of this view. Bounds are checked as in [`Tensor::from_storage`].
    pub fn view(&self, shape: &[usize], strides: &[usize], offset: usize) -> Result<Tensor> {
        check_view(self.storage.len_bytes(), self.dtype, shape, strides, offset)?;
        Ok(Tensor::with_storage(self.storage.clone(), self.dtype, shape, strides, offset))
    }

    /// A second handle on this very view (same storage, shape, strides and offset), e.g. to read a
    /// tensor through one handle while another, mutable one writes it between calls.
    pub fn alias(&self) -> Tensor {
        Tensor::with_storage(self.storage.clone(), self.dtype, &self.shape, &self.strides, self.offset)
    }

    /// The view at `index` along axis `dim`, which is dropped (torch's `t.select(dim, index)`, one
    /// element of `t.unbind(dim)`), over the same storage. Splits vLLM's combined KV cache:
    /// `kv.select(0, 0)` / `kv.select(0, 1)` for `[2, num_blocks, ...]`, `kv.select(1, _)` for
    /// `[num_blocks, 2, ...]`.
    pub fn select(&self, dim: usize, index: usize) -> Result<Tensor> {
        let rank = self.shape.len();
        let bad = |expected: String| Error::Shape { op: "tensor", tensor: "select", got: self.shape.clone(), expected };
        if dim >= rank {
            return Err(bad(format!("an axis below rank {rank} to select along (dim = {dim})")));
        }
        if index >= self.shape[dim] {
            return Err(bad(format!("index {index} inside axis {dim} of extent {}", self.shape[dim])));
        }
        let (mut shape, mut strides) = (self.shape.clone(), self.strides.clone());
        shape.remove(dim);
        let stride = strides.remove(dim);
        // In bounds if the result is not empty: then this view is not empty either and already
        // addresses every element of the result. An empty one may come from absurd strides.
        let offset = index.checked_mul(stride).and_then(|o| o.checked_add(self.offset)).ok_or_else(|| Error::Layout {
            op: "tensor",
            tensor: "select",
            strides: self.strides.clone(),
            offset: self.offset,
            why: format!("the offset of index {index} along axis {dim} overflows"),
        })?;
        Ok(Tensor::with_storage(self.storage.clone(), self.dtype, &shape, &strides, offset))
    }

    /// Whether both tensors are views of one allocation.
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// A contiguous host tensor from raw little-endian bytes.
    pub fn from_bytes(dtype: ScalarType, shape: &[usize], bytes: Vec<u8>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if bytes.len() != n * dtype.size_bytes() {
            return Err(Error::Shape {
                op: "tensor",
                tensor: "bytes",
                got: shape.to_vec(),
                expected: format!("{} bytes, got {}", n * dtype.size_bytes(), bytes.len()),
            });
        }
        Tensor::from_storage(Storage::cpu(bytes), dtype, shape, &contiguous_strides(shape), 0)
    }

    /// A contiguous host tensor of any dtype from f32 values, each stored as
    /// [`ScalarType::write_f64`] does (floats and fp8 rounded to nearest even, fp8 saturating).
    pub fn from_values(dtype: ScalarType, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let mut bytes = vec![0u8; data.len() * dtype.size_bytes()];
        for (i, &v) in data.iter().enumerate() {
            dtype.write_f64(&mut bytes, i, v as f64);
        }
        Tensor::from_bytes(dtype, shape, bytes)
    }

    /// A contiguous host tensor of floats, rounded to `dtype` (round to nearest even).
    pub fn from_f32(dtype: DType, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let bytes = match dtype {
            DType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => data.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            DType::BF16 => data.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        };
        Tensor::from_bytes(dtype.into(), shape, bytes)
    }

    /// A contiguous host tensor of i32.
    pub fn from_i32(shape: &[usize], data: &[i32]) -> Result<Tensor> {
        Tensor::from_bytes(ScalarType::I32, shape, data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// A contiguous host tensor of i64 (vLLM's `slot_mapping` and block mappings).
    pub fn from_i64(shape: &[usize], data: &[i64]) -> Result<Tensor> {
        Tensor::from_bytes(ScalarType::I64, shape, data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// A contiguous host tensor filled with NaN (floats) or zeros (integers).
    pub fn nan(dtype: ScalarType, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let bytes = match dtype {
            ScalarType::F32 => f32::NAN.to_le_bytes().repeat(n),
            ScalarType::F16 => f16::NAN.to_le_bytes().repeat(n),
            ScalarType::BF16 => bf16::NAN.to_le_bytes().repeat(n),
            ScalarType::Fp8E4m3 | ScalarType::Fp8E5m2 => vec![0x7f; n],
            ScalarType::I32 | ScalarType::I64 => vec![0; n * dtype.size_bytes()],
        };
        Tensor::with_storage(Arc::new(Storage::cpu(bytes)), dtype, shape, &contiguous_strides(shape), 0)
    }

    /// Element type.
    pub fn dtype(&self) -> ScalarType {
        self.dtype
    }

    /// Extent of each axis.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Step between neighbours along each axis, in elements (one per axis of [`Tensor::shape`]).
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Offset of the view's first element in its storage (elements).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Elements of the view: the product of the shape (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The storage this view shares with every other view of the allocation.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// In pageable host memory ([`Storage::Cpu`]).
    pub fn is_cpu(&self) -> bool {
        matches!(*self.storage, Storage::Cpu(_))
    }

    /// In page-locked host memory ([`Storage::Pinned`], or borrowed pinned memory).
    pub fn is_pinned(&self) -> bool {
        matches!(*self.storage, Storage::Pinned { .. } | Storage::Borrowed { pinned: true, .. })
    }

    /// In host memory the CPU can read: pageable or pinned.
    pub fn is_host(&self) -> bool {
        !self.is_gpu()
    }

    /// In device memory ([`Storage::Gpu`], or borrowed device memory).
    pub fn is_gpu(&self) -> bool {
        matches!(*self.storage, Storage::Gpu { .. } | Storage::Borrowed { pinned: false, .. })
    }

    /// Whether the strides are exactly the row-major ones of the shape ([`contiguous_strides`]; the
    /// offset may be anything).
    pub fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(&self.shape)
    }

    /// All bytes of the storage under its read lock (host tensors; for pinned memory this first waits
    /// for the slice's cudarc event). [`Error::Device`] for a GPU tensor, [`Error::Driver`] if that
    /// wait fails. See the module docs for what not to do while the guard lives, and
    /// [`Storage::Pinned`] for copies still in flight.
    pub fn host_bytes(&self) -> Result<HostBytes<'_>> {
        self.storage.lock_read()
    }

    /// All bytes of the storage under its write lock; see [`Tensor::host_bytes`].
    pub fn host_bytes_mut(&mut self) -> Result<HostBytesMut<'_>> {
        self.storage.lock_write()
    }

    /// Host bytes of the storage (CPU and pinned tensors), as [`Tensor::host_bytes`]: `None` for a
    /// GPU tensor, or when waiting for pinned memory fails (the error is then recorded in its
    /// context, so the next driver call returns it).
    pub fn cpu_bytes(&self) -> Option<HostBytes<'_>> {
        self.storage.lock_read().map_err(|e| self.storage.record(e)).ok()
    }

    /// Mutable host bytes of the storage (CPU and pinned tensors), as [`Tensor::cpu_bytes`].
    pub fn cpu_bytes_mut(&mut self) -> Option<HostBytesMut<'_>> {
        let storage: &Storage = &self.storage;
        storage.lock_write().map_err(|e| storage.record(e)).ok()
    }

    /// Device address of the view's first element (GPU tensors only).
    pub fn device_ptr(&self) -> Option<u64> {
        match &*self.storage {
            Storage::Gpu { slice, stream } => {
                let (p, _sync) = slice.device_ptr(stream);
                Some(p + (self.offset * self.dtype.size_bytes()) as u64)
            }
            Storage::Borrowed { ptr, pinned: false, .. } => Some(ptr + (self.offset * self.dtype.size_bytes()) as u64),
            Storage::Cpu(_) | Storage::Pinned { .. } | Storage::Borrowed { pinned: true, .. } => None,
        }
    }

    /// Address of the view's first element for `cuMemcpyAsync`: the device address for a GPU tensor,
    /// the host address for a pinned one (with unified virtual addressing, which every 64-bit Linux
    /// context has, page-locked host addresses are valid copy endpoints and the driver infers the
    /// direction). `None` for pageable CPU memory, which the driver cannot copy asynchronously.
    ///
    /// For pinned memory this first waits for the slice's cudarc event (`None` if that fails; the
    /// error is recorded in the context). Copies queued through the address are not tracked:
    /// synchronize their stream before host access, and keep the tensor alive until they finish.
    pub fn raw_ptr(&self) -> Option<u64> {
        let start = (self.offset * self.dtype.size_bytes()) as u64;
        match &*self.storage {
            Storage::Gpu { .. } => self.device_ptr(),
            Storage::Borrowed { ptr, .. } => Some(ptr + start),
            Storage::Pinned { slice } => {
                let ptr = read(slice).as_ptr(); // The guard drops here, before `record` locks again.
                match ptr {
                    Ok(p) => Some(p as u64 + start),
                    Err(e) => {
                        self.storage.record(e.into());
                        None
                    }
                }
            }
            Storage::Cpu(_) => None,
        }
    }

    /// Element index in storage of a multi-index.
    #[inline]
    pub fn storage_index(&self, idx: &[usize]) -> usize {
        self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>()
    }

    /// Calls `f` with the storage index of each element of the view, in row-major order.
    fn for_each_storage_index(&self, mut f: impl FnMut(usize)) {
        let rank = self.shape.len();
        let mut idx = vec![0usize; rank];
        let mut at = self.offset;
        for _ in 0..self.numel() {
            f(at);
            for d in (0..rank).rev() {
                idx[d] += 1;
                at += self.strides[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                at -= self.strides[d] * self.shape[d];
                idx[d] = 0;
            }
        }
    }

    fn host_read(&self, what: &str) -> HostBytes<'_> {
        self.cpu_bytes().unwrap_or_else(|| panic!("{what} needs a host tensor, this one is on the {}", self.storage.location()))
    }

    /// Element `i` of the storage as f64 (host tensors). Locks the storage for this one read: loops
    /// should take [`Tensor::cpu_bytes`] once and use [`ScalarType::read_f64`].
    #[inline]
    pub fn storage_f64(&self, i: usize) -> f64 {
        match &*self.storage {
            // The common case without building a `HostBytes`: one uncontended lock round trip.
            Storage::Cpu(v) => self.dtype.read_f64(&read(v), i),
            _ => self.dtype.read_f64(&self.host_read("storage_f64"), i),
        }
    }

    /// Element at a multi-index as f64 (host tensors).
    #[inline]
    pub fn get_f64(&self, idx: &[usize]) -> f64 {
        self.storage_f64(self.storage_index(idx))
    }

    /// Stores `v` (rounded to the dtype) at storage element `i` (host tensors).
    pub fn set_storage_f64(&mut self, i: usize, v: f64) {
        let dtype = self.dtype;
        if let Storage::Cpu(b) = &*self.storage {
            return dtype.write_f64(&mut write(b), i, v);
        }
        let location = self.storage.location();
        let mut b = self.cpu_bytes_mut().unwrap_or_else(|| panic!("set_storage_f64 needs a host tensor, this one is on the {location}"));
        dtype.write_f64(&mut b, i, v);
    }

    /// Stores `values` (row-major over the view, rounded to the dtype) into the view (host tensors).
    pub fn set_from_f64(&mut self, values: &[f64]) {
        assert_eq!(values.len(), self.numel(), "set_from_f64: one value per element");
        let dtype = self.dtype;
        let storage: &Storage = &self.storage;
        let mut b = storage.lock_write().unwrap_or_else(|e| panic!("set_from_f64 needs a host tensor: {e}"));
        let mut k = 0;
        self.for_each_storage_index(|i| {
            dtype.write_f64(&mut b, i, values[k]);
            k += 1;
        });
    }

    /// The view's elements in row-major order as f64 (host tensors).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let b = self.host_read("to_f64_vec");
        let mut out = Vec::with_capacity(self.numel());
        self.for_each_storage_index(|i| out.push(self.dtype.read_f64(&b, i)));
        out
    }

    /// The view's elements in row-major order as i32 (host tensors; through f64, saturating).
    pub fn to_i32_vec(&self) -> Vec<i32> {
        let b = self.host_read("to_i32_vec");
        let mut out = Vec::with_capacity(self.numel());
        self.for_each_storage_index(|i| out.push(self.dtype.read_f64(&b, i) as i32));
        out
    }

    /// The view's elements in row-major order as i64 (host tensors; integers exactly).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        let b = self.host_read("to_i64_vec");
        let mut out = Vec::with_capacity(self.numel());
        self.for_each_storage_index(|i| out.push(self.dtype.read_i64(&b, i)));
        out
    }

    /// Same view over a new storage.
    fn rehome(&self, storage: Storage) -> Tensor {
        Tensor::with_storage(Arc::new(storage), self.dtype, &self.shape, &self.strides, self.offset)
    }

    /// Copies to the GPU (same shape, strides and offset; the whole storage is copied, into a new
    /// allocation: views of one storage copied one by one no longer share it). From host memory this
    /// waits for the stream, as the driver does for pageable memory, so the source may be changed
    /// or dropped at once.
    pub fn to_gpu(&self, stream: &Arc<CudaStream>) -> Result<Tensor> {
        // The driver refuses 0-byte allocations: an empty storage gets one (unused) element.
        let empty = || stream.alloc_zeros::<u8>(self.dtype.size_bytes());
        let bytes = self.storage.len_bytes();
        let oom = |e| Error::alloc(e, "GPU", bytes);
        let slice = match &*self.storage {
            Storage::Cpu(v) => {
                let v = read(v);
                if v.is_empty() { empty()? } else { stream.clone_htod(&*v).map_err(oom)? }
            }
            Storage::Pinned { slice } => {
                let p = read(slice);
                if p.is_empty() {
                    empty()?
                } else {
                    let d = stream.clone_htod(&*p).map_err(oom)?;
                    stream.synchronize()?;
                    d
                }
            }
            Storage::Gpu { slice, .. } => stream.clone_dtod(slice).map_err(oom)?,
            Storage::Borrowed { .. } => return Err(self.borrowed("to_gpu")),
        };
        Ok(self.rehome(Storage::Gpu { slice, stream: stream.clone() }))
    }

    /// Overwrites this GPU tensor's elements, in place (same allocation, so a captured CUDA graph
    /// that reads it sees the new values at its next replay), with those of the host tensor `src`
    /// (same dtype and shape; both contiguous). The copy is queued on the tensor's stream, after
    /// the work already there; pageable memory is staged by the driver before it returns (pinned
    /// memory is waited for), so `src` may change at once. Not while the stream is being captured.
    pub fn write_from(&mut self, src: &Tensor) -> Result<()> {
        let op = "write_from";
        if src.dtype != self.dtype {
            return Err(Error::DType { op, tensor: "src", got: src.dtype, expected: self.dtype.to_string() });
        }
        if src.shape != self.shape {
            return Err(Error::Shape { op, tensor: "src", got: src.shape.clone(), expected: format!("{:?}", self.shape) });
        }
        for (name, t) in [("self", &*self), ("src", src)] {
            if !t.is_contiguous() {
                return Err(Error::Layout {
                    op,
                    tensor: name,
                    strides: t.strides.clone(),
                    offset: t.offset,
                    why: "must be contiguous".into(),
                });
            }
        }
        let Storage::Gpu { stream, .. } = &*self.storage else {
            return Err(Error::Device { op, tensor: "self", got: self.storage.location(), expected: "GPU" });
        };
        let es = self.dtype.size_bytes();
        let bytes = src.host_bytes()?;
        let data = &bytes[src.offset * es..(src.offset + src.numel()) * es];
        if data.is_empty() {
            return Ok(());
        }
        let dst = self.device_ptr().expect("a GPU tensor");
        // SAFETY: `dst` is this contiguous view's first element inside its live allocation, which
        // holds numel * es bytes from there (shape and dtype equal to `src`'s); `data` is that many
        // host bytes, staged by the driver before the call returns (pageable memory).
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, data, stream.cu_stream()) }?;
        if src.is_pinned() {
            // Page-locked memory is read by the DMA later: wait, so `src` may change at once.
            stream.synchronize()?;
        }
        Ok(())
    }

    /// Copies to pageable host memory (waits for the copy).
    pub fn to_cpu(&self) -> Result<Tensor> {
        let bytes = match &*self.storage {
            Storage::Cpu(v) => read(v).clone(),
            Storage::Pinned { .. } => self.host_bytes()?.to_vec(),
            Storage::Gpu { slice, stream } => stream.clone_dtoh(slice)?,
            Storage::Borrowed { ptr, len, .. } => {
                let mut bytes = vec![0u8; *len];
                // SAFETY: `from_borrowed`'s contract: `len` bytes at `ptr` are live device or pinned
                // memory of the current context, with no work in flight on them (it was waited for).
                unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut bytes, *ptr) }?;
                bytes
            }
        };
        Ok(self.rehome(Storage::cpu(bytes)))
    }

    /// Copies to page-locked host memory in `gpu`'s context (same view; the whole storage is copied).
    /// From a GPU tensor the copy runs on that tensor's stream and is waited for, as in
    /// [`Tensor::to_cpu`].
    pub fn to_pinned(&self, gpu: &Gpu) -> Result<Tensor> {
        let n = self.storage.len_bytes();
        // An empty tensor's storage may hold less than an element (the driver refuses 0-byte
        // allocations): it gets one zeroed element and nothing to copy. Otherwise the sizes match
        // exactly, as cudarc's `memcpy_dtoh` copies the destination's length.
        let copy = n >= self.dtype.size_bytes();
        let mut dst = alloc_pinned_zeroed(gpu.context(), if copy { n } else { self.dtype.size_bytes() })?;
        if copy {
            match &*self.storage {
                Storage::Gpu { slice, stream } => {
                    stream.memcpy_dtoh(slice, &mut dst)?;
                    stream.synchronize()?;
                }
                Storage::Borrowed { .. } => return Err(self.borrowed("to_pinned")),
                host => dst.as_mut_slice()?.copy_from_slice(&host.lock_read()?),
            }
        }
        Ok(self.rehome(Storage::Pinned { slice: RwLock::new(dst) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A combined KV cache `[2, num_blocks, block_elems]` of f32 holding its storage index.
    fn combined(num_blocks: usize, block_elems: usize) -> Tensor {
        let n = 2 * num_blocks * block_elems;
        Tensor::from_f32(DType::F32, &[2, num_blocks, block_elems], &(0..n).map(|i| i as f32).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn borrowed_memory_is_bounds_checked_and_never_read_on_the_host() {
        // Nothing dereferences the address here: views are only described.
        let make = |pinned, shape: &[usize], strides: &[usize], offset| {
            // SAFETY: the tensors are never used by an op, copied or read.
            unsafe { Tensor::from_borrowed(0x7f00_0000_0000, 64, pinned, ScalarType::F16, shape, strides, offset) }
        };
        let t = make(false, &[4, 8], &[8, 1], 0).unwrap();
        assert!(t.is_gpu() && !t.is_pinned() && !t.is_host());
        assert_eq!(t.device_ptr(), Some(0x7f00_0000_0000));
        assert_eq!(t.select(0, 1).unwrap().device_ptr(), Some(0x7f00_0000_0000 + 16));
        assert!(t.host_bytes().is_err());
        // 32 elements of 2 bytes fill the 64 bytes exactly; one more element reaches past them.
        assert!(make(false, &[4, 8], &[8, 1], 1).is_err());
        assert!(make(false, &[5, 8], &[8, 1], 0).is_err());
        let p = make(true, &[32], &[1], 0).unwrap();
        assert!(p.is_pinned() && !p.is_gpu() && p.device_ptr().is_none());
        assert_eq!(p.raw_ptr(), Some(0x7f00_0000_0000));
    }

    #[test]
    fn select_splits_a_combined_kv_cache() {
        let kv = combined(3, 4);
        let (key, value) = (kv.select(0, 0).unwrap(), kv.select(0, 1).unwrap());
        assert!(key.shares_storage(&kv) && value.shares_storage(&key));
        assert_eq!((key.shape(), key.strides(), key.offset()), (&[3, 4][..], &[4, 1][..], 0));
        assert_eq!((value.shape(), value.strides(), value.offset()), (&[3, 4][..], &[4, 1][..], 12));
        assert_eq!(value.to_f64_vec(), (12..24).map(f64::from).collect::<Vec<_>>());
        // vLLM's other layout, `[num_blocks, 2, ...]`: the split is along axis 1.
        let kv = Tensor::from_f32(DType::F32, &[3, 2, 4], &(0..24).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
        let value = kv.select(1, 1).unwrap();
        assert_eq!((value.shape(), value.strides(), value.offset()), (&[3, 4][..], &[8, 1][..], 4));
        assert_eq!(value.get_f64(&[2, 3]), 23.0);
        // Down to a scalar.
        let one = value.select(0, 1).unwrap().select(0, 2).unwrap();
        assert_eq!((one.shape(), one.to_f64_vec()), (&[][..], vec![14.0]));
    }

    #[test]
    fn select_rejects_bad_axis_and_index() {
        let kv = combined(3, 4);
        assert!(matches!(kv.select(3, 0), Err(Error::Shape { op: "tensor", .. })));
        assert!(matches!(kv.select(0, 2), Err(Error::Shape { op: "tensor", .. })));
        assert!(matches!(kv.select(1, 3), Err(Error::Shape { op: "tensor", .. })));
        let empty = kv.view(&[0, 3], &[1, usize::MAX], 0).unwrap();
        assert!(matches!(empty.select(1, 2), Err(Error::Layout { op: "tensor", .. })));
        assert_eq!(empty.select(1, 0).unwrap().numel(), 0);
    }

    #[test]
    fn writes_through_one_view_show_in_another() {
        let kv = combined(2, 4);
        let (mut key, mut value) = (kv.select(0, 0).unwrap(), kv.select(0, 1).unwrap());
        let i = value.storage_index(&[1, 2]);
        value.set_storage_f64(i, -5.0);
        key.set_storage_f64(key.storage_index(&[0, 0]), 7.0);
        assert_eq!(kv.get_f64(&[1, 1, 2]), -5.0);
        assert_eq!(kv.get_f64(&[0, 0, 0]), 7.0);
        // A transposed view of the value half sees the write, and bulk writes through a guard too.
        let value_t = kv.view(&[4, 2], &[1, 4], 8).unwrap();
        assert_eq!(value_t.get_f64(&[2, 1]), -5.0);
        {
            let mut b = key.cpu_bytes_mut().unwrap();
            ScalarType::F32.write_f64(&mut b, 3, 0.5);
        }
        assert_eq!(kv.select(0, 0).unwrap().select(0, 0).unwrap().to_f64_vec(), vec![7.0, 1.0, 2.0, 0.5]);
        // A copy does not share.
        let copy = kv.to_cpu().unwrap();
        assert!(!copy.shares_storage(&kv));
        value.set_storage_f64(i, 1.0);
        assert_eq!(copy.get_f64(&[1, 1, 2]), -5.0);
    }

    #[test]
    fn views_are_bounds_checked() {
        let t = Tensor::from_i32(&[2, 3], &[0, 1, 2, 3, 4, 5]).unwrap();
        let layout = |r: Result<Tensor>| matches!(r, Err(Error::Layout { op: "tensor", .. }));
        assert!(layout(t.view(&[2, 3], &[3, 1], 1)), "one past the end");
        assert!(layout(t.view(&[7], &[1], 0)));
        assert!(layout(t.view(&[2], &[1, 1], 0)), "rank mismatch");
        assert!(layout(t.view(&[2, 2], &[usize::MAX, 1], 0)), "overflowing stride");
        assert_eq!(t.view(&[3, 2], &[1, 3], 0).unwrap().to_i32_vec(), [0, 3, 1, 4, 2, 5]);
        assert_eq!(t.view(&[0, 5], &[9, 9], 100).unwrap().numel(), 0, "an empty view addresses nothing");
        assert_eq!(t.view(&[], &[], 5).unwrap().to_i64_vec(), [5]);
        assert!(layout(Tensor::from_storage(Storage::cpu(vec![0; 6]), ScalarType::F32, &[1], &[1], 0)), "partial element");
    }

    #[test]
    fn i64_round_trip() {
        let data = [-1, 0, 7, i64::MAX, i64::MIN, (1 << 53) + 1];
        let t = Tensor::from_i64(&[2, 3], &data).unwrap();
        assert_eq!(t.dtype(), ScalarType::I64);
        assert_eq!(t.to_i64_vec(), data, "exact beyond 2^53");
        assert_eq!(t.view(&[3], &[1], 3).unwrap().to_i64_vec(), data[3..]);
        assert_eq!(t.to_i32_vec()[..3], [-1, 0, 7]);
        let mut t = t;
        t.set_storage_f64(0, 42.0);
        assert_eq!(t.to_cpu().unwrap().to_i64_vec()[0], 42);
        assert!(Tensor::from_i64(&[4], &data).is_err());
        assert_eq!(Tensor::from_i32(&[2], &[-3, 9]).unwrap().to_i64_vec(), [-3, 9]);
    }

    #[test]
    fn host_bytes_of_views_and_locations() {
        let kv = combined(1, 2);
        let value = kv.select(0, 1).unwrap();
        assert_eq!(value.cpu_bytes().unwrap().len(), 16, "the whole storage, not the view");
        assert!(value.is_cpu() && value.is_host() && !value.is_pinned() && !value.is_gpu());
        assert_eq!((value.raw_ptr(), value.device_ptr()), (None, None));
        assert_eq!(kv.storage().location(), "CPU");
    }

    /// Pinned memory needs a driver: this runs only where `Gpu::new(0)` finds a device.
    #[test]
    fn pinned_round_trip_if_gpu() {
        let gpu = match Gpu::new(0) {
            Ok(g) => g,
            Err(Error::NoGpu(why)) => {
                eprintln!("SKIPPED (no GPU): pinned round trip: {why}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let kv = combined(3, 4);
        let mut pinned = kv.to_pinned(&gpu).unwrap();
        assert!(pinned.is_pinned() && pinned.is_host() && !pinned.is_cpu());
        assert_eq!(pinned.storage().location(), "pinned host");
        assert_eq!(pinned.to_f64_vec(), kv.to_f64_vec());
        pinned.set_storage_f64(5, -1.0);
        let value = pinned.select(0, 1).unwrap();
        assert!(value.raw_ptr().is_some() && value.device_ptr().is_none());
        assert_eq!(value.raw_ptr().unwrap() - pinned.raw_ptr().unwrap(), 12 * 4);
        // Pinned -> GPU -> pinned -> CPU.
        let dev = pinned.to_gpu(gpu.stream()).unwrap();
        let back = dev.to_pinned(&gpu).unwrap();
        assert_eq!(back.get_f64(&[0, 1, 1]), -1.0);
        assert_eq!(back.to_cpu().unwrap().to_f64_vec(), pinned.to_f64_vec());
        // swap_blocks' path: raw `cuMemcpyAsync` between a device view and a pinned view, both ways.
        let copy = |dst: &Tensor, src: &Tensor, bytes: usize| {
            let (d, s) = (dst.raw_ptr().unwrap(), src.raw_ptr().unwrap());
            // SAFETY: both addresses start `bytes` (one [4] f32 row) inside live allocations that
            // outlive the copy, which `synchronize` below waits for.
            unsafe { cudarc::driver::sys::cuMemcpyAsync(d, s, bytes, gpu.stream().cu_stream()) }.result().unwrap();
        };
        let mut swapped = gpu.pinned(ScalarType::F32, &[2, 3, 4]).unwrap();
        let dev_out = gpu.zeros(ScalarType::F32, &[4]).unwrap();
        copy(&swapped.select(0, 1).unwrap().select(0, 2).unwrap(), &dev.select(0, 1).unwrap().select(0, 1).unwrap(), 16);
        copy(&dev_out, &pinned.select(0, 0).unwrap().select(0, 1).unwrap(), 16);
        gpu.synchronize().unwrap();
        assert_eq!(swapped.select(0, 1).unwrap().select(0, 2).unwrap().to_f64_vec(), [16.0, 17.0, 18.0, 19.0]);
        assert_eq!(dev_out.to_cpu().unwrap().to_f64_vec(), [4.0, -1.0, 6.0, 7.0]);
        swapped.set_storage_f64(0, 3.0);
        assert_eq!(swapped.to_gpu(gpu.stream()).unwrap().to_cpu().unwrap().get_f64(&[0, 0, 0]), 3.0);
        let zeros = gpu.pinned(ScalarType::I64, &[2, 5]).unwrap();
        assert_eq!(zeros.to_i64_vec(), [0; 10]);
        assert_eq!(gpu.pinned(ScalarType::F16, &[0]).unwrap().to_gpu(gpu.stream()).unwrap().to_cpu().unwrap().numel(), 0);
    }
}
