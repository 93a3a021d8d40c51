//! The exception classes and the mapping of the library's [`pagedattn::Error`] onto them.
//!
//! ```text
//! PagedAttnError(Exception)
//! ├── ValidationError(PagedAttnError, ValueError)     shapes, strides, sizes, scalars, host tables
//! │   ├── DTypeError(ValidationError, TypeError)      a dtype the op does not take, or not an array
//! │   └── DevicePlacementError(ValidationError)       not on the GPU, or on another device
//! ├── UnsupportedError(PagedAttnError, NotImplementedError)
//! ├── DeviceDataError(PagedAttnError, RuntimeError)   flags kernels raised (`check_status`)
//! └── CudaError(PagedAttnError, RuntimeError)         driver, launch, memory, no GPU or image
//! ```
//!
//! The classes have several bases, which `create_exception!` cannot express, so they are made with
//! `type(name, bases, {})` when the module loads.

use pyo3::exceptions::{PyException, PyNotImplementedError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use pagedattn::Error;

macro_rules! exceptions {
    ($($name:ident),* $(,)?) => {$(
        #[doc = concat!("`pagedattn.", stringify!($name), "`.")]
        pub struct $name;

        impl $name {
            pub fn new_err(msg: impl Into<String>) -> PyErr {
                let msg = msg.into();
                Python::attach(|py| match CLASSES.get(py) {
                    Some(c) => PyErr::from_type(c.$name.bind(py).clone(), msg),
                    None => PyRuntimeError::new_err(msg),
                })
            }
        }
    )*};
}

exceptions!(PagedAttnError, ValidationError, DTypeError, DevicePlacementError, UnsupportedError, DeviceDataError, CudaError);

#[allow(non_snake_case)]
struct Classes {
    PagedAttnError: Py<PyType>,
    ValidationError: Py<PyType>,
    DTypeError: Py<PyType>,
    DevicePlacementError: Py<PyType>,
    UnsupportedError: Py<PyType>,
    DeviceDataError: Py<PyType>,
    CudaError: Py<PyType>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

/// Makes the classes and adds them to `m`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let module = m.name()?;
    let make = |name: &str, doc: &str, bases: Vec<Bound<'_, PyType>>| -> PyResult<Py<PyType>> {
        let dict = PyDict::new(py);
        dict.set_item("__doc__", doc)?;
        dict.set_item("__module__", module.clone())?;
        let t = py.get_type::<PyType>().call1((name, PyTuple::new(py, bases)?, dict))?;
        m.add(name, &t)?;
        Ok(t.cast_into::<PyType>()?.unbind())
    };
    let base = make("PagedAttnError", "Base class of the errors pagedattn raises.", vec![py.get_type::<PyException>()])?;
    let b = || base.bind(py).clone();
    let validation = make(
        "ValidationError",
        "An argument's shape, strides, size or value is wrong, or a host table holds bad data.",
        vec![b(), py.get_type::<PyValueError>()],
    )?;
    let v = || validation.bind(py).clone();
    let classes = Classes {
        DTypeError: make(
            "DTypeError",
            "An argument's dtype is not one the op takes, or it is not an array.",
            vec![v(), py.get_type::<PyTypeError>()],
        )?,
        DevicePlacementError: make(
            "DevicePlacementError",
            "An argument is not on the GPU where it must be, or arguments sit on different devices.",
            vec![v()],
        )?,
        UnsupportedError: make(
            "UnsupportedError",
            "A valid vLLM argument that this library does not implement.",
            vec![b(), py.get_type::<PyNotImplementedError>()],
        )?,
        DeviceDataError: make(
            "DeviceDataError",
            "Kernels found bad device-side data (block ids, lengths, slots, scales); `flags` holds the status bits.",
            vec![b(), py.get_type::<PyRuntimeError>()],
        )?,
        CudaError: make(
            "CudaError",
            "No driver or GPU, no kernel image for the device, out of memory, or a failed launch or driver call.",
            vec![b(), py.get_type::<PyRuntimeError>()],
        )?,
        PagedAttnError: base,
        ValidationError: validation,
    };
    let _ = CLASSES.set(py, classes);
    Ok(())
}

/// The Python exception for a library error.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::DType { .. } => DTypeError::new_err(msg),
        Error::Device { .. } => DevicePlacementError::new_err(msg),
        Error::Shape { .. } | Error::Layout { .. } | Error::Value { .. } | Error::HostData { .. } => ValidationError::new_err(msg),
        Error::Unsupported { .. } => UnsupportedError::new_err(msg),
        Error::DeviceData { flags } => {
            let err = DeviceDataError::new_err(msg);
            Python::attach(|py| {
                let _ = err.value(py).setattr("flags", flags);
            });
            err
        }
        Error::NoGpu(_) | Error::NoImage { .. } | Error::Driver(_) | Error::Launch { .. } | Error::OutOfMemory { .. } => {
            CudaError::new_err(msg)
        }
        other => PagedAttnError::new_err(other.to_string()),
    }
}
