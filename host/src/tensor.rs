//! Tensors: typed, strided views over host memory (CPU backend) or device memory (GPU backend).
//!
//! A tensor owns its storage; shape and strides (in elements) describe a view of it starting at an
//! element offset, so a cache can be a view with padded or permuted outer strides. Host tensors are
//! also how block tables and lengths are handed over when the caller knows them on the host: then the
//! library checks their contents before it launches anything.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};
use pagedattn_layout::DType;

use crate::error::{Error, Result};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScalarType {
    F32,
    F16,
    BF16,
    I32,
    I64,
}

impl ScalarType {
    pub const fn size_bytes(self) -> usize {
        match self {
            ScalarType::F32 | ScalarType::I32 => 4,
            ScalarType::F16 | ScalarType::BF16 => 2,
            ScalarType::I64 => 8,
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

    pub const fn name(self) -> &'static str {
        match self {
            ScalarType::F32 => "f32",
            ScalarType::F16 => "f16",
            ScalarType::BF16 => "bf16",
            ScalarType::I32 => "i32",
            ScalarType::I64 => "i64",
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

/// Where a tensor's bytes live.
#[derive(Debug)]
pub enum Storage {
    Cpu(Vec<u8>),
    Gpu { slice: CudaSlice<u8>, stream: Arc<CudaStream> },
}

impl Storage {
    pub fn len_bytes(&self) -> usize {
        match self {
            Storage::Cpu(v) => v.len(),
            Storage::Gpu { slice, .. } => slice.len(),
        }
    }

    pub fn location(&self) -> &'static str {
        match self {
            Storage::Cpu(_) => "CPU",
            Storage::Gpu { .. } => "GPU",
        }
    }
}

#[derive(Debug)]
pub struct Tensor {
    storage: Storage,
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

impl Tensor {
    /// A view with explicit strides and offset (elements) over `storage`; every element it
    /// addresses must lie inside the storage.
    pub fn from_storage(storage: Storage, dtype: ScalarType, shape: &[usize], strides: &[usize], offset: usize) -> Result<Tensor> {
        let bad = |why: String| Error::Layout { op: "tensor", tensor: "view", strides: strides.to_vec(), offset, why };
        if shape.len() != strides.len() {
            return Err(bad(format!("rank of shape {shape:?} differs from rank of strides")));
        }
        if !storage.len_bytes().is_multiple_of(dtype.size_bytes()) {
            return Err(bad(format!("storage of {} bytes is not a whole number of {dtype}", storage.len_bytes())));
        }
        let elems = storage.len_bytes() / dtype.size_bytes();
        if shape.iter().all(|&n| n > 0) {
            let last = shape.iter().zip(strides).try_fold(offset, |acc, (&n, &s)| s.checked_mul(n - 1).and_then(|v| v.checked_add(acc)));
            match last {
                Some(l) if l < elems => {}
                _ => return Err(bad(format!("view of shape {shape:?} reaches past the {elems} elements of its storage"))),
            }
        }
        Ok(Tensor { storage, dtype, shape: shape.to_vec(), strides: strides.to_vec(), offset })
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
        Tensor::from_storage(Storage::Cpu(bytes), dtype, shape, &contiguous_strides(shape), 0)
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

    /// A contiguous host tensor filled with NaN (floats) or zeros (integers).
    pub fn nan(dtype: ScalarType, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let bytes = match dtype {
            ScalarType::F32 => f32::NAN.to_le_bytes().repeat(n),
            ScalarType::F16 => f16::NAN.to_le_bytes().repeat(n),
            ScalarType::BF16 => bf16::NAN.to_le_bytes().repeat(n),
            _ => vec![0; n * dtype.size_bytes()],
        };
        Tensor { storage: Storage::Cpu(bytes), dtype, strides: contiguous_strides(shape), shape: shape.to_vec(), offset: 0 }
    }

    pub fn dtype(&self) -> ScalarType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Offset of the view's first element in its storage (elements).
    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self.storage, Storage::Cpu(_))
    }

    pub fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(&self.shape)
    }

    /// Host bytes of the storage (CPU tensors only).
    pub fn cpu_bytes(&self) -> Option<&[u8]> {
        match &self.storage {
            Storage::Cpu(v) => Some(v),
            Storage::Gpu { .. } => None,
        }
    }

    /// Mutable host bytes of the storage (CPU tensors only).
    pub fn cpu_bytes_mut(&mut self) -> Option<&mut Vec<u8>> {
        match &mut self.storage {
            Storage::Cpu(v) => Some(v),
            Storage::Gpu { .. } => None,
        }
    }

    /// Device address of the view's first element (GPU tensors only).
    pub fn device_ptr(&self) -> Option<u64> {
        match &self.storage {
            Storage::Gpu { slice, stream } => {
                let (p, _sync) = slice.device_ptr(stream);
                Some(p + (self.offset * self.dtype.size_bytes()) as u64)
            }
            Storage::Cpu(_) => None,
        }
    }

    /// Element index in storage of a multi-index.
    pub fn storage_index(&self, idx: &[usize]) -> usize {
        self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>()
    }

    /// Element `i` of the storage as f64 (CPU float or integer tensors).
    pub fn storage_f64(&self, i: usize) -> f64 {
        let b = self.cpu_bytes().expect("storage_f64 on a GPU tensor");
        let at = |n: usize| &b[i * n..i * n + n];
        match self.dtype {
            ScalarType::F32 => f32::from_le_bytes(at(4).try_into().unwrap()) as f64,
            ScalarType::F16 => f16::from_le_bytes(at(2).try_into().unwrap()).to_f64(),
            ScalarType::BF16 => bf16::from_le_bytes(at(2).try_into().unwrap()).to_f64(),
            ScalarType::I32 => i32::from_le_bytes(at(4).try_into().unwrap()) as f64,
            ScalarType::I64 => i64::from_le_bytes(at(8).try_into().unwrap()) as f64,
        }
    }

    /// Element at a multi-index as f64 (CPU tensors).
    pub fn get_f64(&self, idx: &[usize]) -> f64 {
        self.storage_f64(self.storage_index(idx))
    }

    /// Stores `v` (rounded to the dtype) at storage element `i` (CPU float tensors).
    pub fn set_storage_f64(&mut self, i: usize, v: f64) {
        let dtype = self.dtype;
        let b = self.cpu_bytes_mut().expect("set on a GPU tensor");
        match dtype {
            ScalarType::F32 => b[i * 4..i * 4 + 4].copy_from_slice(&(v as f32).to_le_bytes()),
            ScalarType::F16 => b[i * 2..i * 2 + 2].copy_from_slice(&f16::from_f64(v).to_le_bytes()),
            ScalarType::BF16 => b[i * 2..i * 2 + 2].copy_from_slice(&bf16::from_f64(v).to_le_bytes()),
            ScalarType::I32 => b[i * 4..i * 4 + 4].copy_from_slice(&(v as i32).to_le_bytes()),
            ScalarType::I64 => b[i * 8..i * 8 + 8].copy_from_slice(&(v as i64).to_le_bytes()),
        }
    }

    /// The view's elements in row-major order as f64 (CPU tensors).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.numel());
        let mut idx = vec![0usize; self.shape.len()];
        for _ in 0..self.numel() {
            out.push(self.get_f64(&idx));
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }

    /// The view's elements in row-major order as i32 (CPU integer tensors).
    pub fn to_i32_vec(&self) -> Vec<i32> {
        self.to_f64_vec().into_iter().map(|v| v as i32).collect()
    }

    /// Copies to the GPU (same shape, strides and offset; the whole storage is copied).
    pub fn to_gpu(&self, stream: &Arc<CudaStream>) -> Result<Tensor> {
        let slice = match &self.storage {
            // The driver refuses 0-byte allocations: an empty tensor gets one (unused) byte.
            Storage::Cpu(v) if v.is_empty() => stream.alloc_zeros::<u8>(1)?,
            Storage::Cpu(v) => stream.clone_htod(v)?,
            Storage::Gpu { slice, .. } => stream.clone_dtod(slice)?,
        };
        Ok(Tensor {
            storage: Storage::Gpu { slice, stream: stream.clone() },
            dtype: self.dtype,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            offset: self.offset,
        })
    }

    /// Copies to the host (waits for the stream).
    pub fn to_cpu(&self) -> Result<Tensor> {
        let bytes = match &self.storage {
            Storage::Cpu(v) => v.clone(),
            Storage::Gpu { slice, stream } => stream.clone_dtoh(slice)?,
        };
        Ok(Tensor {
            storage: Storage::Cpu(bytes),
            dtype: self.dtype,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            offset: self.offset,
        })
    }
}
