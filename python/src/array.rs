//! Arrays handed over from Python, read without copying: torch tensors (through their attributes,
//! the fast path), any object with `__cuda_array_interface__` (versions 2 and 3), or with
//! `__dlpack__` / `__dlpack_device__`. Each becomes an [`Array`]: address, dtype, shape, strides
//! (elements) and where the memory is; [`Array::tensor`] wraps it as a borrowed [`Tensor`].
//!
//! Nothing here dereferences the address, except [`Array::host_tensor`], which copies a small host
//! array (a CPU block mapping) that its producer says is readable.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyCapsule, PyDict, PyTuple, PyType};

use pagedattn::{ScalarType, Tensor};

use crate::errors::{DTypeError, DevicePlacementError, ValidationError};

/// Element types an array may have; those the ops take map to [`ScalarType`]s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DType {
    /// `torch.float16`, `<f2`.
    F16,
    /// `torch.bfloat16` (torch and DLPack only: `__cuda_array_interface__` has no code for it).
    BF16,
    /// `torch.float32`, `<f4`.
    F32,
    /// `torch.int32`, `<i4`.
    I32,
    /// `torch.int64`, `<i8`.
    I64,
    /// `torch.uint8`, `|u1`: vLLM's fp8 caches.
    U8,
    /// `torch.float8_e4m3fn`.
    F8E4m3,
    /// `torch.float8_e5m2`.
    F8E5m2,
    /// Anything else, by name (for messages).
    Other(String),
}

impl DType {
    /// The name shown in messages (torch's spelling).
    pub fn name(&self) -> &str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::F8E4m3 => "float8_e4m3fn",
            DType::F8E5m2 => "float8_e5m2",
            DType::Other(s) => s,
        }
    }

    /// The float type of a query, output or 16/32-bit cache.
    pub fn float(&self) -> Option<ScalarType> {
        match self {
            DType::F16 => Some(ScalarType::F16),
            DType::BF16 => Some(ScalarType::BF16),
            DType::F32 => Some(ScalarType::F32),
            _ => None,
        }
    }

    /// Bytes per element of the types the ops take (1 for the others: only used for sizes).
    fn size(&self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
            DType::U8 | DType::F8E4m3 | DType::F8E5m2 | DType::Other(_) => 1,
        }
    }
}

/// Where an array's memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Device memory of this ordinal.
    Cuda(usize),
    /// Device memory whose device the producer did not say (`__cuda_array_interface__`): asked of
    /// the driver before any launch.
    CudaUnknown,
    /// Page-locked host memory (torch `pin_memory()`, DLPack `kDLCUDAHost`).
    Pinned,
    /// Pageable host memory (numpy, a torch CPU tensor).
    Host,
    /// Any other device (by DLPack device type).
    Other(i32),
}

/// One array argument, as its producer described it.
pub struct Array {
    /// The argument's name (vLLM's), for messages.
    pub name: &'static str,
    /// Address of element 0 (offsets included).
    pub ptr: u64,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Per axis, in elements.
    pub strides: Vec<usize>,
    pub place: Place,
    /// A `__cuda_array_interface__` v3 producer's stream (ordered before our launch).
    pub stream: Option<usize>,
    /// Keeps a DLPack capsule (and so the producer's memory) alive while the call uses it.
    _keep: Option<Py<PyAny>>,
}

/// torch objects, cached once torch has been imported (never imports it).
struct Torch {
    tensor: Py<PyType>,
    dtypes: Vec<(Py<PyAny>, DType)>,
    /// `torch.Tensor.__dlpack_c_exchange_api__` (DLPack 1.2's C exchange table, torch ≥ 2.10):
    /// describes a tensor and gives the current stream through plain C calls, without Python
    /// objects (tens of ns, against about 0.3 µs for `_to_dlpack` and 0.8 µs for attributes).
    exchange: Option<&'static DLPackExchangeApi>,
    /// `torch._C._to_dlpack`, for older torch: one C call makes a capsule that describes a tensor.
    to_dlpack: Option<Py<PyAny>>,
}

static TORCH: PyOnceLock<Torch> = PyOnceLock::new();

/// torch's cached objects if torch is imported.
fn torch(py: Python<'_>) -> Option<&'static Torch> {
    if let Some(t) = TORCH.get(py) {
        return Some(t);
    }
    let modules = py.import(intern!(py, "sys")).ok()?.getattr(intern!(py, "modules")).ok()?;
    // A dict lookup that returns None rather than raising: this runs on every array while torch
    // is not imported.
    let torch = modules.cast::<PyDict>().ok()?.get_item("torch").ok()??;
    if torch.is_none() {
        return None;
    }
    let tensor = torch.getattr("Tensor").ok()?.cast_into::<PyType>().ok()?.unbind();
    let mut dtypes = Vec::new();
    for (name, d) in [
        ("float16", DType::F16),
        ("bfloat16", DType::BF16),
        ("float32", DType::F32),
        ("int32", DType::I32),
        ("int64", DType::I64),
        ("uint8", DType::U8),
        ("float8_e4m3fn", DType::F8E4m3),
        ("float8_e5m2", DType::F8E5m2),
    ] {
        if let Ok(o) = torch.getattr(name) {
            dtypes.push((o.unbind(), d));
        }
    }
    let to_dlpack = torch.getattr("_C").and_then(|c| c.getattr("_to_dlpack")).ok().map(Bound::unbind);
    let exchange = tensor.bind(py).getattr("__dlpack_c_exchange_api__").ok().and_then(|c| {
        let cap = c.cast::<PyCapsule>().ok()?;
        let p = cap.pointer_checked(Some(c"dlpack_exchange_api")).ok()?.as_ptr() as *const DLPackExchangeApi;
        // SAFETY: the capsule holds a pointer to the producer's exchange table, which DLPack
        // requires to stay alive for the whole process; only the version header is read before
        // checking that the layout is the one declared below (major version 1).
        let api: &'static DLPackExchangeApi = unsafe { &*p };
        (api.header.version.major == 1 && api.header.version.minor >= 2).then_some(api)
    });
    Some(TORCH.get_or_init(py, || Torch { tensor, dtypes, exchange, to_dlpack }))
}

/// Whether torch is imported (its current stream is then the one ops use).
pub fn torch_loaded(py: Python<'_>) -> bool {
    torch(py).is_some()
}

/// torch's current CUDA stream on `ordinal` through its DLPack exchange table, if it has one
/// (`None`: no table, or the call failed).
pub fn torch_stream(py: Python<'_>, ordinal: usize) -> Option<u64> {
    let api = torch(py)?.exchange?;
    let mut s: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: the table's function writes one pointer; kDLCUDA = 2.
    let r = unsafe { (api.current_work_stream)(2, ordinal as i32, &mut s) };
    if r != 0 {
        let _ = PyErr::take(py);
        return None;
    }
    Some(s as u64)
}

fn usizes(name: &'static str, what: &str, t: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let t = t.cast::<PyTuple>().map_err(|_| ValidationError::new_err(format!("`{name}`: {what} is not a tuple")))?;
    let mut v = Vec::with_capacity(t.len());
    for x in t.iter() {
        let x: i64 = x.extract()?;
        v.push(usize::try_from(x).map_err(|_| ValidationError::new_err(format!("`{name}`: negative {what} entry {x}")))?);
    }
    Ok(v)
}

impl Array {
    /// Reads `obj`'s description.
    pub fn extract(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Array> {
        let py = obj.py();
        if let Some(t) = torch(py)
            && (obj.get_type().is(t.tensor.bind(py)) || obj.is_instance(t.tensor.bind(py))?)
        {
            // The exchange table takes objects of exactly the type it came from.
            if let Some(api) = t.exchange
                && obj.get_type().is(t.tensor.bind(py))
                && let Some(a) = Array::from_exchange(name, obj, api)
            {
                return Ok(a);
            }
            // A CUDA tensor through torch's C DLPack export (a CPU tensor may be pinned, which
            // DLPack does not say; a tensor it refuses, e.g. one that requires grad, by attributes).
            if let Some(f) = &t.to_dlpack
                && let Ok(capsule) = f.bind(py).call1((obj,))
                && let Ok(a) = Array::from_capsule(name, capsule)
                && matches!(a.place, Place::Cuda(_))
            {
                return Ok(a);
            }
            return Array::from_torch(name, obj, t);
        }
        if let Ok(cai) = obj.getattr(intern!(py, "__cuda_array_interface__")) {
            return Array::from_cai(name, &cai);
        }
        if obj.hasattr(intern!(py, "__dlpack__"))? {
            return Array::from_dlpack(name, obj);
        }
        Err(DTypeError::new_err(format!(
            "`{name}`: expected a CUDA array (a torch tensor, or an object with __cuda_array_interface__ or __dlpack__), got {}",
            obj.get_type().name()?
        )))
    }

    fn from_torch(name: &'static str, obj: &Bound<'_, PyAny>, t: &Torch) -> PyResult<Array> {
        let py = obj.py();
        let dt = obj.getattr(intern!(py, "dtype"))?;
        let dtype = match t.dtypes.iter().find(|(o, _)| o.bind(py).is(&dt)) {
            Some((_, d)) => d.clone(),
            None => DType::Other(dt.str()?.to_string().trim_start_matches("torch.").to_string()),
        };
        let device: i64 = obj.call_method0(intern!(py, "get_device"))?.extract()?;
        let place = if device >= 0 {
            Place::Cuda(device as usize)
        } else if obj.call_method0(intern!(py, "is_pinned"))?.is_truthy()? {
            Place::Pinned
        } else {
            let kind = obj.getattr(intern!(py, "device"))?.getattr(intern!(py, "type"))?;
            if kind.extract::<String>()? == "cpu" { Place::Host } else { Place::Other(-1) }
        };
        let shape = usizes(name, "shape", &obj.getattr(intern!(py, "shape"))?)?;
        let strides = usizes(name, "stride", &obj.call_method0(intern!(py, "stride"))?)?;
        let ptr: u64 = obj.call_method0(intern!(py, "data_ptr"))?.extract()?;
        Ok(Array { name, ptr, dtype, shape, strides, place, stream: None, _keep: None })
    }

    fn from_cai(name: &'static str, cai: &Bound<'_, PyAny>) -> PyResult<Array> {
        let bad = |why: &str| ValidationError::new_err(format!("`{name}`: bad __cuda_array_interface__: {why}"));
        let d = cai.cast::<PyDict>().map_err(|_| bad("not a dict"))?;
        let get = |k: &str| d.get_item(k).ok().flatten();
        let shape = usizes(name, "shape", &get("shape").ok_or_else(|| bad("no shape"))?)?;
        let typestr: String = get("typestr").ok_or_else(|| bad("no typestr"))?.extract()?;
        let dtype = match typestr.as_str() {
            "<f2" => DType::F16,
            "<f4" => DType::F32,
            "<i4" => DType::I32,
            "<i8" => DType::I64,
            "|u1" | "<u1" => DType::U8,
            "<f8" => DType::Other("float64".into()),
            "|i1" => DType::Other("int8".into()),
            "<i2" => DType::Other("int16".into()),
            "|b1" => DType::Other("bool".into()),
            other => DType::Other(format!("typestr {other:?}")),
        };
        let data = get("data").ok_or_else(|| bad("no data"))?;
        let (ptr, _readonly): (u64, bool) = data.extract().map_err(|_| bad("data is not (pointer, read_only)"))?;
        if get("mask").is_some_and(|m| !m.is_none()) {
            return Err(bad("masked arrays are not supported"));
        }
        let size = dtype.size();
        let strides = match get("strides").filter(|s| !s.is_none()) {
            None => pagedattn::tensor::contiguous_strides(&shape),
            Some(s) => {
                let bytes = usizes(name, "strides", &s)?;
                if bytes.iter().any(|b| b % size != 0) {
                    return Err(bad("strides are not whole elements"));
                }
                bytes.iter().map(|b| b / size).collect()
            }
        };
        if strides.len() != shape.len() {
            return Err(bad("strides and shape differ in length"));
        }
        let stream = match get("stream").filter(|s| !s.is_none()) {
            Some(s) => Some(s.extract::<usize>().map_err(|_| bad("stream is not an integer"))?),
            None => None,
        };
        Ok(Array { name, ptr, dtype, shape, strides, place: Place::CudaUnknown, stream, _keep: None })
    }

    fn from_dlpack(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Array> {
        let py = obj.py();
        let (kind, id): (i32, i32) = obj.call_method0(intern!(py, "__dlpack_device__"))?.extract()?;
        const CPU: i32 = 1;
        const CUDA: i32 = 2;
        const CUDA_HOST: i32 = 3;
        let place = match kind {
            CUDA => Place::Cuda(id.max(0) as usize),
            CUDA_HOST => Place::Pinned,
            CPU => Place::Host,
            other => Place::Other(other),
        };
        let capsule = if kind == CUDA {
            // The producer makes the stream the op will run on wait for its pending work on the
            // array (DLPack spells the legacy default stream 1, not 0).
            let stream = crate::runtime::current_stream(py, id.max(0) as usize)?;
            let s = if stream == 0 { 1 } else { stream };
            let kw = PyDict::new(py);
            kw.set_item("stream", s)?;
            obj.call_method(intern!(py, "__dlpack__"), (), Some(&kw))?
        } else {
            obj.call_method0(intern!(py, "__dlpack__"))?
        };
        let mut a = Array::from_capsule(name, capsule)?;
        a.place = place;
        Ok(a)
    }

    /// A CUDA tensor through DLPack's C exchange table (`None`: not a CUDA tensor, or the producer
    /// refused it; the caller then takes a slower path, which reports any error).
    fn from_exchange(name: &'static str, obj: &Bound<'_, PyAny>, api: &DLPackExchangeApi) -> Option<Array> {
        let mut t = std::mem::MaybeUninit::<DLTensor>::uninit();
        // SAFETY: `obj` is a live object of the type the table came from; the function fills the
        // DLTensor on our stack, whose shape and strides stay valid until control returns to
        // Python (they are copied below, before that).
        let r = unsafe { (api.dltensor_from_py_object_no_sync)(obj.as_ptr().cast(), t.as_mut_ptr()) };
        if r != 0 {
            let _ = PyErr::take(obj.py());
            return None;
        }
        // SAFETY: filled by the successful call above.
        let t = unsafe { t.assume_init() };
        if t.device.device_type != 2 {
            return None;
        }
        // SAFETY: as for the capsule path: `ndim` values at `shape`, and at `strides` unless null.
        unsafe { Array::from_dltensor(name, &t) }.ok()
    }

    /// Reads an unused "dltensor" capsule (kept alive in the result).
    fn from_capsule(name: &'static str, capsule: Bound<'_, PyAny>) -> PyResult<Array> {
        let cap =
            capsule.cast::<PyCapsule>().map_err(|_| ValidationError::new_err(format!("`{name}`: __dlpack__ did not return a capsule")))?;
        let ptr = cap
            .pointer_checked(Some(c"dltensor"))
            .map_err(|_| ValidationError::new_err(format!("`{name}`: __dlpack__ returned a capsule that is not an unused \"dltensor\"")))?
            .as_ptr() as *const DLManagedTensor;
        // SAFETY: a "dltensor" capsule holds a `DLManagedTensor` that stays valid while the capsule
        // lives (DLPack's contract); `capsule` is kept in the returned `Array`. The capsule is not
        // renamed, so its destructor returns the tensor to the producer when the call is done.
        let mut a = unsafe { Array::from_dltensor(name, &(*ptr).dl_tensor) }?;
        a._keep = Some(capsule.unbind());
        Ok(a)
    }

    /// Reads a DLTensor's description (place from its device; nothing kept alive).
    ///
    /// # Safety
    /// `t.shape` points to `t.ndim` values, `t.strides` to as many or is null (DLPack's contract).
    unsafe fn from_dltensor(name: &'static str, t: &DLTensor) -> PyResult<Array> {
        let ndim = usize::try_from(t.ndim).map_err(|_| ValidationError::new_err(format!("`{name}`: negative ndim")))?;
        // SAFETY: DLPack: `shape` points to `ndim` values, `strides` to `ndim` values or is null.
        let shape_i: &[i64] = if ndim == 0 { &[] } else { unsafe { std::slice::from_raw_parts(t.shape, ndim) } };
        let shape: Vec<usize> = shape_i.iter().map(|&n| n.max(0) as usize).collect();
        let dtype = match (t.dtype.code, t.dtype.bits, t.dtype.lanes) {
            (2, 16, 1) => DType::F16,
            (4, 16, 1) => DType::BF16,
            (2, 32, 1) => DType::F32,
            (0, 32, 1) => DType::I32,
            (0, 64, 1) => DType::I64,
            (1, 8, 1) => DType::U8,
            // DLPack 1.1's kDLFloat8_e4m3fn and kDLFloat8_e5m2.
            (10, 8, 1) => DType::F8E4m3,
            (12, 8, 1) => DType::F8E5m2,
            (2, 64, 1) => DType::Other("float64".into()),
            (c, b, l) => DType::Other(format!("DLPack dtype (code {c}, bits {b}, lanes {l})")),
        };
        let strides = if t.strides.is_null() || ndim == 0 {
            pagedattn::tensor::contiguous_strides(&shape)
        } else {
            // SAFETY: as for `shape` above.
            let s: &[i64] = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
            if s.iter().any(|&x| x < 0) {
                return Err(ValidationError::new_err(format!("`{name}`: negative strides are not supported")));
            }
            s.iter().map(|&x| x as usize).collect()
        };
        let ptr = (t.data as u64).wrapping_add(t.byte_offset);
        let place = match t.device.device_type {
            2 => Place::Cuda(t.device.device_id.max(0) as usize),
            3 => Place::Pinned,
            1 => Place::Host,
            other => Place::Other(other),
        };
        Ok(Array { name, ptr, dtype, shape, strides, place, stream: None, _keep: None })
    }

    /// Bytes from `ptr` that the view addresses (0 when empty).
    pub fn span_bytes(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        let last: usize = self.shape.iter().zip(&self.strides).map(|(&n, &s)| (n - 1) * s).sum();
        (last + 1) * self.dtype.size()
    }

    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the array is device memory.
    pub fn is_cuda(&self) -> bool {
        matches!(self.place, Place::Cuda(_) | Place::CudaUnknown)
    }

    /// `DevicePlacementError` unless the array is device memory.
    pub fn require_cuda(&self) -> PyResult<()> {
        if self.is_cuda() {
            Ok(())
        } else {
            Err(DevicePlacementError::new_err(format!("`{}` must be a CUDA array, got {}", self.name, place_name(self.place))))
        }
    }

    /// `DTypeError` unless the dtype is one of `ok`.
    pub fn require_dtype(&self, ok: &[DType], expected: &str) -> PyResult<()> {
        if ok.contains(&self.dtype) {
            Ok(())
        } else {
            Err(DTypeError::new_err(format!("`{}` has dtype {}, expected {expected}", self.name, self.dtype.name())))
        }
    }

    /// `DTypeError` unless the dtype is `other`'s (an output and its input, a value and its key).
    pub fn require_dtype_of(&self, other: &Array) -> PyResult<()> {
        if self.dtype == other.dtype {
            Ok(())
        } else {
            Err(DTypeError::new_err(format!(
                "`{}` has dtype {}, expected {} (`{}`'s dtype)",
                self.name,
                self.dtype.name(),
                other.dtype.name(),
                other.name
            )))
        }
    }

    /// `ValidationError` unless the array has `rank` axes (`what` describes them).
    pub fn require_rank(&self, rank: usize, what: &str) -> PyResult<()> {
        if self.shape.len() == rank {
            Ok(())
        } else {
            Err(ValidationError::new_err(format!("`{}` must be {rank}-D {what}, got shape {:?}", self.name, self.shape)))
        }
    }

    /// Wraps the array as a borrowed tensor of `dtype` (the op's view of its elements: e.g. fp8
    /// codes for a uint8 cache).
    pub fn tensor(&self, dtype: ScalarType) -> PyResult<Tensor> {
        let pinned = match self.place {
            Place::Cuda(_) | Place::CudaUnknown => false,
            Place::Pinned => true,
            p => {
                return Err(DevicePlacementError::new_err(format!(
                    "`{}` must be a CUDA or pinned host array, got {}",
                    self.name,
                    place_name(p)
                )));
            }
        };
        // SAFETY: the producer describes `span_bytes` bytes at `ptr` of this kind of memory; the
        // caller's object (held by the Python call frame, or the DLPack capsule kept in `self`)
        // keeps it alive during the call, and the ops run on the producer's current stream (torch)
        // or one ordered after it, as torch's own ops do. Same contract as vLLM's custom ops.
        unsafe { Tensor::from_borrowed(self.ptr, self.span_bytes(), pinned, dtype, &self.shape, &self.strides, 0) }
            .map_err(crate::errors::to_py)
    }

    /// Copies a host array of `dtype` (e.g. a CPU block mapping) into a host tensor.
    pub fn host_tensor(&self, dtype: ScalarType) -> PyResult<Tensor> {
        if !matches!(self.place, Place::Host | Place::Pinned) {
            return Err(DevicePlacementError::new_err(format!("`{}` must be a CPU array, got {}", self.name, place_name(self.place))));
        }
        let len = self.span_bytes();
        let bytes = if len == 0 {
            Vec::new()
        } else {
            // SAFETY: the producer describes `len` readable host bytes at `ptr`, kept alive by the
            // caller during the call; they are copied here and not touched again.
            unsafe { std::slice::from_raw_parts(self.ptr as *const u8, len) }.to_vec()
        };
        let storage = pagedattn::Storage::cpu(bytes);
        Tensor::from_storage(storage, dtype, &self.shape, &self.strides, 0).map_err(crate::errors::to_py)
    }
}

/// How messages name a place.
pub fn place_name(p: Place) -> String {
    match p {
        Place::Cuda(i) => format!("cuda:{i}"),
        Place::CudaUnknown => "cuda".into(),
        Place::Pinned => "pinned CPU memory".into(),
        Place::Host => "a CPU array".into(),
        Place::Other(k) => format!("a device of DLPack type {k}"),
    }
}

/// An optional argument: `None` stays `None`.
pub fn optional(name: &'static str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Array>> {
    match obj {
        Some(o) if !o.is_none() => Array::extract(name, o).map(Some),
        _ => Ok(None),
    }
}

/// `ValueError` helper for scalar arguments.
pub fn bad_value(what: &str, got: impl std::fmt::Display, why: &str) -> PyErr {
    ValidationError::new_err(format!("{what} = {got} is invalid: {why}"))
}

// DLPack's C structs (dlpack.h, version 0.8 and 1.x's unversioned `DLManagedTensor`).
#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut std::ffi::c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLPackExchangeApiHeader {
    version: DLPackVersion,
    prev_api: *const DLPackExchangeApiHeader,
}

/// DLPack 1.2's `DLPackExchangeAPI` (the two entries used here, and the slots before them).
#[repr(C)]
pub struct DLPackExchangeApi {
    header: DLPackExchangeApiHeader,
    managed_tensor_allocator: *const std::ffi::c_void,
    managed_tensor_from_py_object_no_sync: *const std::ffi::c_void,
    managed_tensor_to_py_object_no_sync: *const std::ffi::c_void,
    dltensor_from_py_object_no_sync: unsafe extern "C" fn(*mut std::ffi::c_void, *mut DLTensor) -> i32,
    /// `(device_type, device_id, &mut stream)`: the producer's current stream (torch's).
    pub current_work_stream: unsafe extern "C" fn(i32, i32, *mut *mut std::ffi::c_void) -> i32,
}

// SAFETY: the table is immutable process-wide data of the producer (DLPack's contract).
unsafe impl Sync for DLPackExchangeApi {}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut std::ffi::c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}
