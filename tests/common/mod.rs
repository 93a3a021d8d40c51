//! Shared helpers: the GPU (or a loud skip), running a case on a device, comparing with the float64
//! reference. Case generation and error figures come from `pagedattn::testing`.

#![allow(dead_code)]

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use pagedattn::layout::DType;
use pagedattn::testing::{self, Case, Errors, Inputs};
use pagedattn::{
    Device, Error, Gpu, PagedAttentionArgs, PagedAttentionWorkspace, ReduceMode, ScalarType, Tensor, Version, paged_attention,
};

/// Set to `1` on a GPU machine to turn a missing GPU into a failure instead of a skip.
pub const REQUIRE_GPU_ENV: &str = "PAGEDATTN_REQUIRE_GPU";

/// The calling function's path (`pagedattn_tests::paged_attention::gpu_grid`), for skip lines.
macro_rules! test_name {
    () => {{
        fn f() {}
        let name = std::any::type_name_of_val(&f);
        name.strip_suffix("::f").unwrap_or(name)
    }};
}

/// `expect_err!(result, Error::Variant { .. } => checks)`: the result is that error, then `checks`.
macro_rules! expect_err {
    ($res:expr, $pat:pat => $check:expr) => {
        match $res {
            Err($pat) => $check,
            Err(other) => panic!("expected {}, got the error {other:?} ({other})", stringify!($pat)),
            Ok(_) => panic!("expected {}, got Ok", stringify!($pat)),
        }
    };
    ($res:expr, $pat:pat) => {
        expect_err!($res, $pat => ())
    };
}

/// `let Some(device) = gpu_or_skip!() else { return };`: the first GPU, or a loud skip line.
macro_rules! gpu_or_skip {
    () => {
        $crate::common::gpu(test_name!())
    };
}

/// The first GPU as a [`Device`], or `None` after printing a skip line that libtest does not capture
/// (written to the stderr handle directly, so it shows even for passing tests). A driver that is
/// present but fails is a test failure, not a skip; so is a missing GPU when
/// `PAGEDATTN_REQUIRE_GPU=1`.
pub fn gpu(test: &str) -> Option<Device> {
    match Gpu::new(0) {
        Ok(g) => Some(Device::Gpu(g)),
        Err(Error::NoGpu(why)) => {
            if std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1") {
                panic!("{test}: no GPU ({why}) but {REQUIRE_GPU_ENV}=1");
            }
            let _ = writeln!(std::io::stderr(), "SKIPPED (no GPU): {test}: {why}");
            None
        }
        Err(e) => panic!("{test}: a GPU driver is present but opening device 0 failed: {e}"),
    }
}

/// A line on the real stderr (not captured by libtest), for figures worth seeing in a passing run.
pub fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Raw bits of a tensor (after the device's work is done).
pub fn bits(t: &Tensor) -> Vec<u8> {
    t.to_cpu().unwrap().host_bytes().unwrap().to_vec()
}

/// The GPU inside a device (panics on the CPU backend).
pub fn gpu_of(device: &mut Device) -> &mut Gpu {
    match device {
        Device::Gpu(g) => g,
        Device::Cpu => panic!("not a GPU device"),
    }
}

/// The GPU of a GPU device.
pub fn gpu_ref(device: &Device) -> &Gpu {
    match device {
        Device::Gpu(g) => g,
        Device::Cpu => panic!("not a GPU device"),
    }
}

/// How a test runs the op: v1, or v2 with a partition size (small ones make many partitions out of
/// short sequences, so the reduce is exercised cheaply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    V1,
    /// v2 with this partition size and the automatic merge (fused for the tests' small grids).
    V2(usize),
    /// v2 with the merge forced: in the partition kernel, or vLLM's separate reduce kernel.
    V2With(usize, ReduceMode),
}

/// v1, v2 with vLLM's 512-token partitions, v2 with 32-token partitions (the smallest), merged in
/// the partition kernel and by the separate reduce.
pub const MODES: [Mode; 4] = [Mode::V1, Mode::V2(512), Mode::V2With(32, ReduceMode::Fused), Mode::V2With(32, ReduceMode::Separate)];

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::V1 => f.write_str("v1"),
            Mode::V2(p) => write!(f, "v2/{p}"),
            Mode::V2With(p, r) => write!(f, "v2/{p} ({r} merge)"),
        }
    }
}

/// The longest host-known sequence length of `args` (0 when lengths are on the device).
fn max_len_bound(args: &PagedAttentionArgs) -> usize {
    if args.seq_lens.is_cpu() {
        args.seq_lens.to_i32_vec().into_iter().max().unwrap_or(0).max(0) as usize
    } else {
        let bt = args.block_tables.shape();
        bt[1] * args.key_cache.shape()[3]
    }
}

/// Runs the op in `mode` on `device` into a NaN-poisoned contiguous output (inputs already on the
/// device, or host tables) and returns the output as f64, row-major. v2's workspace is bounded by
/// the longest host length (or the block table's capacity when lengths are device data).
pub fn run_op(device: &Device, args: &PagedAttentionArgs, mode: Mode) -> pagedattn::Result<Vec<f64>> {
    let mut out = device.nan(args.query.dtype(), args.query.shape())?;
    let &[ns, nh, hs] = args.query.shape() else { panic!("query rank") };
    let (version, psize, reduce) = match mode {
        Mode::V1 => (Version::V1, 512, ReduceMode::Auto),
        Mode::V2(p) => (Version::V2, p, ReduceMode::Auto),
        Mode::V2With(p, r) => (Version::V2, p, r),
    };
    let mut ws = PagedAttentionWorkspace::with_partition_size(device, ns, nh, hs, max_len_bound(args), psize)?;
    ws.set_reduce_mode(reduce);
    paged_attention(device, &mut out, args, &mut ws, version)?;
    if let Device::Gpu(g) = device {
        g.synchronize()?;
    }
    Ok(out.to_cpu()?.to_f64_vec())
}

/// Copies host inputs to `device` and runs the op there in `mode` (output NaN-poisoned).
pub fn run_inputs(device: &Device, host: &Inputs, mode: Mode) -> pagedattn::Result<Vec<f64>> {
    let dev = host.upload(device)?;
    run_op(device, &dev.args(), mode)
}

/// The float64 reference of host inputs, `[num_seqs, num_heads, head_size]` row-major.
pub fn reference(host: &Inputs) -> Vec<f64> {
    let args = host.args();
    let out = Tensor::nan(host.query.dtype(), host.query.shape());
    let plan = pagedattn::paged_attention::validate(&Device::Cpu, &out, &args).expect("reference inputs are valid");
    pagedattn::cpu::paged_attention::reference(&plan, &args)
}

/// Float dtype of host inputs.
pub fn dtype_of(host: &Inputs) -> DType {
    host.query.dtype().float().expect("float query")
}

/// Panics unless `got` matches `want` within `testing::tolerance(dtype)` with every element finite.
pub fn assert_matches(got: &[f64], want: &[f64], dtype: DType, what: &str) -> Errors {
    let e = testing::compare(got, want);
    assert!(
        e.passes(testing::tolerance(dtype)),
        "{what}: rel-L2 {:.3e} (tolerance {:.0e}), max |err| {:.3e}, {} non-finite of {}",
        e.rel_l2,
        testing::tolerance(dtype),
        e.max_abs,
        e.non_finite,
        got.len()
    );
    e
}

/// Runs `case` on `device` with `version` and checks it against the reference
/// (`testing::check_case`), panicking with the case on failure.
pub fn check(device: &Device, case: &Case, version: Version) -> Errors {
    let e = testing::check_case(device, case, version).unwrap_or_else(|err| panic!("{case} {version}: {err}"));
    assert!(
        e.passes(testing::tolerance(case.dtype)),
        "{case} {version} on {}: rel-L2 {:.3e} (tolerance {:.0e}), max |err| {:.3e}, {} non-finite",
        device.name(),
        e.rel_l2,
        testing::tolerance(case.dtype),
        e.max_abs,
        e.non_finite
    );
    e
}

/// Row `(s, h)` of a `[num_seqs, num_heads, head_size]` row-major output.
pub fn row(out: &[f64], num_heads: usize, head_size: usize, s: usize, h: usize) -> &[f64] {
    &out[(s * num_heads + h) * head_size..][..head_size]
}

/// Host tensor of `dtype` with `shape` and `strides` at `offset` over a storage of `len` elements:
/// the view's elements (row-major) are `values` (rounded to `dtype`), every other element is `fill`
/// (NaN or a sentinel, so a stray read or write shows).
pub fn strided(
    dtype: ScalarType,
    shape: &[usize],
    strides: &[usize],
    offset: usize,
    len: usize,
    fill: f64,
    values: &[f64],
) -> pagedattn::Result<Tensor> {
    let mut base = Tensor::nan(dtype, &[len]);
    let t = base.view(shape, strides, offset)?;
    assert_eq!(values.len(), t.numel(), "one value per element of the view");
    let inside = view_indices(&t);
    // One write lock for all stores (`t` is not touched while it is held).
    let mut b = base.cpu_bytes_mut().expect("host tensor");
    for i in 0..len {
        dtype.write_f64(&mut b, i, fill);
    }
    for (&i, &v) in inside.iter().zip(values) {
        dtype.write_f64(&mut b, i, v);
    }
    drop(b);
    Ok(t)
}

/// Storage indices of a tensor's elements, row-major.
pub fn view_indices(t: &Tensor) -> Vec<usize> {
    let shape = t.shape();
    let mut idx = vec![0usize; shape.len()];
    let mut out = Vec::with_capacity(t.numel());
    for _ in 0..t.numel() {
        out.push(t.storage_index(&idx));
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Prepares items `0..n` on worker threads (`prepare`: inputs and references, the CPU-heavy part)
/// and hands them to `consume` on the calling thread in completion order (the GPU work, which stays
/// on the thread that owns the device). At most a few prepared items wait at a time.
pub fn pipelined<T: Send>(n: usize, prepare: impl Fn(usize) -> T + Sync, mut consume: impl FnMut(usize, T)) {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).clamp(1, 16).min(n.max(1));
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::sync_channel::<(usize, T)>(threads);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (tx, next, prepare) = (tx.clone(), &next, &prepare);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || tx.send((i, prepare(i))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for (i, item) in rx {
            consume(i, item);
        }
    });
}
