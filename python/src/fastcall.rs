//! Vectorcall entry points for the ops vLLM calls with keywords.
//!
//! An abi3 module for CPython 3.9 gets PyO3's `METH_VARARGS | METH_KEYWORDS` convention: every call
//! builds an argument tuple and a keyword dict, and every keyword name is converted to UTF-8 bytes
//! and compared as a string against the parameter names. For `flash_attn_varlen_func` called the
//! way vLLM does (all by keyword) that was 1.2 µs per call before any work. CPython has accepted
//! `METH_FASTCALL | METH_KEYWORDS` functions since 3.7 (the limited API names the flag from 3.10),
//! so this module registers such a function itself: positional arguments arrive as an array and
//! keyword names as a tuple of interned strings, matched here by pointer first.

use std::ffi::{CStr, c_int};

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyString;

/// `METH_FASTCALL` (CPython's value since 3.7).
const METH_FASTCALL: c_int = 0x0080;
/// The bit of `nargsf` that vectorcall callers may set (not an argument count).
const VECTORCALL_ARGUMENTS_OFFSET: usize = 1 << (usize::BITS - 1);

/// A function's parameters, by name, in order; the names interned once.
pub struct Params {
    pub function: &'static str,
    pub names: &'static [&'static str],
    interned: Vec<Py<PyString>>,
}

impl Params {
    pub fn new(py: Python<'_>, function: &'static str, names: &'static [&'static str]) -> Params {
        Params { function, names, interned: names.iter().map(|n| PyString::intern(py, n).unbind()).collect() }
    }

    /// Sorts a vectorcall's arguments into one slot per parameter.
    ///
    /// # Safety
    /// `args`, `nargsf` and `kwnames` are those CPython passed to a `METH_FASTCALL | METH_KEYWORDS`
    /// function: `nargs` positional values then one value per name of the `kwnames` tuple (or null).
    pub unsafe fn sort<'py>(
        &self,
        py: Python<'py>,
        args: *const *mut ffi::PyObject,
        nargsf: ffi::Py_ssize_t,
        kwnames: *mut ffi::PyObject,
    ) -> PyResult<Vec<Option<Bound<'py, PyAny>>>> {
        let nargs = (nargsf as usize) & !VECTORCALL_ARGUMENTS_OFFSET;
        let n = self.names.len();
        if nargs > n {
            return Err(PyTypeError::new_err(format!("{}() takes at most {n} arguments ({nargs} given)", self.function)));
        }
        let mut slots: Vec<Option<Bound<'py, PyAny>>> = vec![None; n];
        for (i, slot) in slots.iter_mut().enumerate().take(nargs) {
            // SAFETY: CPython passes `nargs` valid borrowed references first.
            *slot = Some(unsafe { Bound::from_borrowed_ptr(py, *args.add(i)) });
        }
        if !kwnames.is_null() {
            // SAFETY: `kwnames` is a tuple of str (CPython's contract for vectorcall).
            let names = unsafe { Bound::from_borrowed_ptr(py, kwnames) };
            for (j, key) in names.try_iter()?.enumerate() {
                let key = key?;
                let at = match self.interned.iter().position(|s| s.as_ptr() == key.as_ptr()) {
                    Some(i) => Some(i),
                    // A name built at run time (`**kwargs` from a dict) may not be the interned object.
                    None => self.names.iter().position(|n| key.eq(*n).unwrap_or(false)),
                };
                let Some(i) = at else {
                    return Err(PyTypeError::new_err(format!("{}() got an unexpected keyword argument {key}", self.function)));
                };
                if slots[i].is_some() {
                    return Err(PyTypeError::new_err(format!("{}() got multiple values for argument '{}'", self.function, self.names[i])));
                }
                // SAFETY: the value of keyword `j` follows the positional values.
                slots[i] = Some(unsafe { Bound::from_borrowed_ptr(py, *args.add(nargs + j)) });
            }
        }
        Ok(slots)
    }

    /// `TypeError` for a required parameter without a value.
    pub fn missing(&self, i: usize) -> PyErr {
        PyTypeError::new_err(format!("{}() missing required argument '{}' (pos {})", self.function, self.names[i], i + 1))
    }
}

/// The signature of a `METH_FASTCALL | METH_KEYWORDS` function.
pub type FastFn =
    unsafe extern "C" fn(*mut ffi::PyObject, *const *mut ffi::PyObject, ffi::Py_ssize_t, *mut ffi::PyObject) -> *mut ffi::PyObject;

/// Adds `f` to `m` as a builtin function named `name` with the docstring `doc` (which starts with
/// `name(params)\n--\n\n` for `inspect.signature`).
pub fn add(m: &Bound<'_, PyModule>, name: &'static CStr, doc: &'static CStr, f: FastFn) -> PyResult<()> {
    let def = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: name.as_ptr(),
        // SAFETY: CPython calls `ml_meth` with the signature its flags name (METH_FASTCALL |
        // METH_KEYWORDS: `FastFn`); the union field only stores the pointer.
        ml_meth: ffi::PyMethodDefPointer { PyCFunction: unsafe { std::mem::transmute::<FastFn, ffi::PyCFunction>(f) } },
        ml_flags: METH_FASTCALL | ffi::METH_KEYWORDS,
        ml_doc: doc.as_ptr(),
    }));
    let py = m.py();
    let module_name = m.name()?;
    // SAFETY: `def` lives for the rest of the process (leaked: one per module initialization).
    let func = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyCFunction_NewEx(def, std::ptr::null_mut(), module_name.as_ptr())) }?;
    m.add(name.to_str().expect("ASCII name"), func)
}

/// Runs `body` for a vectorcall entry point: the GIL is held (CPython called us), a Rust panic
/// becomes a `RuntimeError`, an error is raised and null returned.
pub fn trampoline(body: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>>) -> *mut ffi::PyObject {
    // SAFETY: only called from functions CPython invokes with the GIL held.
    let py = unsafe { Python::assume_attached() };
    // Nothing the body touches is left half-updated for the caller to see after a panic: the
    // error goes back to Python and the call is over.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || body(py))).unwrap_or_else(|p| {
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
        Err(PyRuntimeError::new_err(format!("pagedattn panicked: {}", msg.unwrap_or_default())))
    });
    match r {
        Ok(o) => o.into_ptr(),
        Err(e) => {
            e.restore(py);
            std::ptr::null_mut()
        }
    }
}
