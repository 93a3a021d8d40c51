//! `pagedattn verify`: every op on the GPU against the CPU backend. Paged attention (v1 and v2) within
//! a per-dtype tolerance of the float64 reference over the variant grid; the cache ops bit for bit
//! (they only move elements) over dtypes, head and block sizes, GQA-style KV head counts, padding
//! slots and every cache layout; `flash_attn_varlen_func` (output and LSE) and `merge_attn_states`
//! against their float64 references; and the device-side guards of every op (bad device-resident
//! tables are skipped and flagged in the status word, never used as addresses).

use std::path::PathBuf;

use clap::Args;
use indicatif::ProgressBar;
use pagedattn::layout::{DType, KvCacheDType, status};
use pagedattn::paged_attention::validate;
use pagedattn::testing::cache::{
    self as cases, BitCheck, CopyBlocksCase, KvLayout, ReshapeCase, SwapCase, check_copy_blocks, check_reshape, check_swap, compare_caches,
};
use pagedattn::testing::varlen::{self, VarlenCase, VarlenErrors, VarlenGuard};
use pagedattn::testing::{self, Case, Errors};
use pagedattn::{Device, Error, FlashKernel, PagedAttentionWorkspace, Tensor, Version, paged_attention};
use serde::Serialize;
use serde_json::json;

use crate::{CliError, CliResult, check_status, open_gpu, progress_bar, synchronize, write_json};

#[derive(Args)]
pub struct VerifyArgs {
    /// Add the long cases: paged attention at 8k-32k tokens, varlen 8k causal prefills and the
    /// paged-prefix bench shape.
    #[arg(long)]
    long: bool,
    /// Write every result as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Only cases whose name contains SUBSTR: an op ("paged_attention", "reshape_and_cache_flash",
    /// "copy_blocks", "swap_blocks", "flash_attn_varlen", "merge_attn_states"), a version ("v2"), a layout ("hnd"), a direction ("d2h"), a
    /// dtype and head size ("bf16 h128"), "guard", ...
    #[arg(long, value_name = "SUBSTR")]
    filter: Option<String>,
}

/// How a case is judged.
#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Check {
    /// Relative L2 error against the float64 reference within the dtype's tolerance.
    Tolerance,
    /// Every storage element's bits equal to the CPU backend's.
    BitExact,
}

#[derive(Serialize)]
struct CaseResult {
    name: String,
    op: &'static str,
    /// `{op} {version} {dtype}` (paged attention), `{op} {dtype}`, `{op} guard` or `{op} status`.
    group: String,
    check: Check,
    rel_l2: f64,
    max_abs: f64,
    non_finite: usize,
    tolerance: f64,
    /// Bit-exact checks: storage elements compared, and how many differ.
    elements: Option<usize>,
    mismatches: Option<usize>,
    /// flash_attn_varlen and merge_attn_states: the largest LSE error over rows with keys.
    lse_err: Option<f64>,
    pass: bool,
    note: Option<String>,
}

impl CaseResult {
    fn line(&self) -> String {
        let verdict = if self.pass { "PASS" } else { "FAIL" };
        let note = self.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default();
        match (self.check, self.elements, self.mismatches) {
            (Check::BitExact, Some(n), Some(m)) => format!("{:<96} {m:>6} of {n:>9} elements differ  {verdict}{note}", self.name),
            (Check::BitExact, _, _) => format!("{:<96} {verdict}{note}", self.name),
            _ => format!("{:<96} rel-L2 {:>8.2e}  max-abs {:>8.2e}  {verdict}{note}", self.name, self.rel_l2, self.max_abs),
        }
    }

    fn bit_exact(name: String, op: &'static str, group: String, c: &BitCheck, problems: Vec<String>) -> CaseResult {
        let mut problems = problems;
        if !c.passes() {
            problems.insert(0, format!("first difference at storage element {}", c.first_mismatch.unwrap_or(0)));
        }
        CaseResult {
            name,
            op,
            group,
            check: Check::BitExact,
            rel_l2: f64::NAN,
            max_abs: c.max_abs,
            non_finite: 0,
            tolerance: 0.0,
            elements: Some(c.elements),
            mismatches: Some(c.mismatches),
            lse_err: None,
            pass: problems.is_empty(),
            note: (!problems.is_empty()).then(|| problems.join("; ")),
        }
    }

    fn failed(name: String, op: &'static str, group: String, check: Check, tolerance: f64, note: String) -> CaseResult {
        CaseResult {
            name,
            op,
            group,
            check,
            rel_l2: f64::NAN,
            max_abs: f64::NAN,
            non_finite: 0,
            tolerance,
            elements: None,
            mismatches: None,
            lse_err: None,
            pass: false,
            note: Some(note),
        }
    }

    /// A result judged by relative L2 within `tol` (and, for the varlen ops, the LSE's error and
    /// kind: see `VarlenErrors::passes`).
    fn within(name: String, op: &'static str, group: String, e: Errors, tol: f64, lse: Option<(f64, usize)>) -> CaseResult {
        let mut notes = Vec::new();
        if e.non_finite > 0 {
            notes.push(format!("{} non-finite outputs", e.non_finite));
        }
        if let Some((err, bad)) = lse {
            notes.push(format!("lse err {err:.2e}"));
            if bad > 0 {
                notes.push(format!("{bad} LSE entries of the wrong kind (-inf vs finite)"));
            }
        }
        let lse_ok = lse.is_none_or(|(err, bad)| VarlenErrors { out: e, lse_err: err, lse_bad: bad }.passes(tol));
        CaseResult {
            name,
            op,
            group,
            check: Check::Tolerance,
            rel_l2: e.rel_l2,
            max_abs: e.max_abs,
            non_finite: e.non_finite,
            tolerance: tol,
            elements: None,
            mismatches: None,
            lse_err: lse.map(|l| l.0),
            pass: e.passes(tol) && lse_ok,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        }
    }
}

// ------------------------------------------------------------------------- paged-attention guards

/// Device-side guard cases of paged attention: device-resident tables the host cannot validate, bad
/// for sequence 1.
#[derive(Clone, Copy)]
enum Guard {
    BadBlockId,
    SeqLenTooLong,
    SeqLenNegative,
}

impl Guard {
    const ALL: [Guard; 3] = [Guard::BadBlockId, Guard::SeqLenTooLong, Guard::SeqLenNegative];

    fn what(self) -> &'static str {
        match self {
            Guard::BadBlockId => "device block table, out-of-range block id in seq 1",
            Guard::SeqLenTooLong => "device seq_lens, seq 1 longer than its table",
            Guard::SeqLenNegative => "device seq_lens, seq 1 negative",
        }
    }

    fn name(self, version: Version) -> String {
        format!("paged_attention {version} guard: {}", self.what())
    }

    fn flag(self) -> u32 {
        match self {
            Guard::BadBlockId => status::BAD_BLOCK_ID,
            Guard::SeqLenTooLong | Guard::SeqLenNegative => status::BAD_SEQ_LEN,
        }
    }
}

/// The status word must hold exactly `flag` (and is cleared by reading it).
fn expect_flag(device: &mut Device, flag: u32, problems: &mut Vec<String>) -> pagedattn::Result<()> {
    match check_status(device) {
        Err(Error::DeviceData { flags }) if flags == flag => {}
        Err(Error::DeviceData { flags }) => problems.push(format!("status flags {flags:#x}, expected {flag:#x}")),
        Ok(()) => problems.push(format!("check_status reported nothing, expected flags {flag:#x}")),
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Sequence 1's output must be all NaN, the others must match the reference, and the status word
/// must hold exactly the guard's flag. v2 runs with 32-token partitions, so the reduce runs too.
fn run_guard(device: &mut Device, guard: Guard, version: Version) -> pagedattn::Result<CaseResult> {
    let case = Case {
        dtype: DType::F16,
        cache: KvCacheDType::Auto,
        num_heads: 8,
        num_kv_heads: 2,
        head_size: 128,
        block_size: 16,
        seq_lens: vec![40, 100, 33],
        alibi: false,
        blocksparse: None,
        seed: 4242,
    };
    let host = case.inputs()?;
    let bad_seq = 1;
    let (max_blocks, num_blocks) = (host.block_tables.shape()[1], host.key_cache.shape()[0]);
    let mut table = host.block_tables.to_i32_vec();
    let mut lens = host.seq_lens.to_i32_vec();
    match guard {
        Guard::BadBlockId => table[bad_seq * max_blocks + 2] = num_blocks as i32 + 7,
        Guard::SeqLenTooLong => lens[bad_seq] = (max_blocks * case.block_size + 1) as i32,
        Guard::SeqLenNegative => lens[bad_seq] = -5,
    }
    let mut dev = host.upload(device)?;
    dev.block_tables = device.upload(&Tensor::from_i32(host.block_tables.shape(), &table)?)?;
    dev.seq_lens = device.upload(&Tensor::from_i32(&[lens.len()], &lens)?)?;
    let mut out = device.nan(host.query.dtype(), host.query.shape())?;
    let cap = max_blocks * case.block_size;
    let mut ws = PagedAttentionWorkspace::with_partition_size(device, lens.len(), case.num_heads, case.head_size, cap, 32)?;
    paged_attention(device, &mut out, &dev.args(), &mut ws, version)?;
    let got = out.to_cpu()?.to_f64_vec();
    let plan = validate(&Device::Cpu, &Tensor::nan(host.query.dtype(), host.query.shape()), &host.args())?;
    let want = pagedattn::cpu::paged_attention::reference(&plan, &host.args());

    let row = case.num_heads * case.head_size;
    let mut problems = Vec::new();
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for s in 0..case.seq_lens.len() {
        let r = s * row..(s + 1) * row;
        if s == bad_seq {
            let not_nan = got[r].iter().filter(|v| !v.is_nan()).count();
            if not_nan > 0 {
                problems.push(format!("seq {s}: {not_nan} of {row} outputs are not NaN"));
            }
        } else {
            g.extend_from_slice(&got[r.clone()]);
            w.extend_from_slice(&want[r]);
        }
    }
    let err = testing::compare(&g, &w);
    let tol = testing::tolerance(case.dtype);
    if !err.passes(tol) {
        problems.push("the other sequences differ from the reference".into());
    }
    expect_flag(device, guard.flag(), &mut problems)?;
    Ok(CaseResult {
        name: guard.name(version),
        op: "paged_attention",
        group: "paged_attention guard".into(),
        check: Check::Tolerance,
        rel_l2: err.rel_l2,
        max_abs: err.max_abs,
        non_finite: err.non_finite,
        tolerance: tol,
        elements: None,
        mismatches: None,
        lse_err: None,
        pass: problems.is_empty(),
        note: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

/// A varlen guard case: `testing::varlen::check_varlen_guard` plus the status flag.
fn run_varlen_guard(device: &mut Device, guard: VarlenGuard) -> pagedattn::Result<CaseResult> {
    let mut problems = varlen::check_varlen_guard(device, guard, FlashKernel::Auto)?;
    expect_flag(device, guard.flag(), &mut problems)?;
    let mut r = CaseResult::failed(
        varlen_guard_name(guard),
        "flash_attn_varlen",
        "flash_attn_varlen guard".into(),
        Check::Tolerance,
        0.0,
        String::new(),
    );
    r.pass = problems.is_empty();
    r.note = (!problems.is_empty()).then(|| problems.join("; "));
    Ok(r)
}

/// A `merge_attn_states` case: (dtype, tokens, heads, head size, with `output_lse`).
type MergeCase = (DType, usize, usize, usize, bool);

fn merge_name(&(dtype, tokens, heads, head_size, with_lse): &MergeCase) -> String {
    format!("merge_attn_states {dtype} {tokens} tokens x {heads} heads x h{head_size}{}", if with_lse { " +lse" } else { "" })
}

fn varlen_guard_name(guard: VarlenGuard) -> String {
    format!("flash_attn_varlen guard: {}", guard.what())
}

// ------------------------------------------------------------------------------- cache guards

/// Device-side guard cases of the cache ops.
#[derive(Clone, Copy)]
enum CacheGuard {
    /// Two tokens of a device `slot_mapping` name slots past the cache (`num_slots`, `i64::MAX`).
    BadSlot(KvLayout),
    /// Three pairs of a device `block_mapping` name block ids out of range.
    BadBlockId,
}

impl CacheGuard {
    const ALL: [CacheGuard; 4] = [
        CacheGuard::BadSlot(KvLayout::Vllm),
        CacheGuard::BadSlot(KvLayout::Nhd),
        CacheGuard::BadSlot(KvLayout::Combined),
        CacheGuard::BadBlockId,
    ];

    fn op(self) -> &'static str {
        match self {
            CacheGuard::BadSlot(l) => l.reshape_op(),
            CacheGuard::BadBlockId => "copy_blocks",
        }
    }

    fn name(self) -> String {
        match self {
            CacheGuard::BadSlot(l) => format!("{} {l} guard: device slot_mapping, slots past the cache", self.op()),
            CacheGuard::BadBlockId => "copy_blocks guard: device block_mapping, block ids out of range".into(),
        }
    }

    fn flag(self) -> u32 {
        match self {
            CacheGuard::BadSlot(_) => status::BAD_SLOT,
            CacheGuard::BadBlockId => status::BAD_BLOCK_ID,
        }
    }
}

/// The bad entries must be skipped (everything else bit-exact with the CPU backend running the
/// valid entries alone) and the status word must hold exactly the guard's flag.
fn run_cache_guard(device: &mut Device, guard: CacheGuard) -> pagedattn::Result<CaseResult> {
    let check = match guard {
        CacheGuard::BadSlot(layout) => {
            let mut case = ReshapeCase::new(layout, DType::F16, 2, 128, 16, vec![5, 20, 9], 4343);
            (case.padding, case.nan_caches) = (1, false);
            let inp = case.inputs()?;
            let num_slots = (inp.num_blocks * case.block_size) as i64;
            let mut bad = inp.slot_mapping.to_i64_vec();
            let valid: Vec<usize> = (0..bad.len()).filter(|&t| bad[t] >= 0).collect();
            let (t1, t2) = (valid[3], valid[17]);
            let mut good = bad.clone();
            (good[t1], good[t2]) = (-1, -1);
            (bad[t1], bad[t2]) = (num_slots, i64::MAX);
            let n = bad.len();
            let mut want = inp.caches.to_cpu()?;
            cases::reshape(&Device::Cpu, layout.cache_layout(), &inp.key, &inp.value, &mut want, &Tensor::from_i64(&[n], &good)?, None)?;
            let (key, value) = (device.upload(&inp.key)?, device.upload(&inp.value)?);
            let mut got = inp.caches.upload(device)?;
            let slots = device.upload(&Tensor::from_i64(&[n], &bad)?)?;
            cases::reshape(device, layout.cache_layout(), &key, &value, &mut got, &slots, None)?;
            synchronize(device)?;
            compare_caches(&got, &want)?
        }
        CacheGuard::BadBlockId => {
            let case = CopyBlocksCase {
                layout: KvLayout::Vllm,
                dtype: DType::F16,
                num_kv_heads: 2,
                head_size: 64,
                block_size: 16,
                num_blocks: 9,
                num_layers: 2,
                num_pairs: 3,
                device_mapping: true,
                seed: 4545,
            };
            let inp = case.inputs()?;
            let want = case.run(&Device::Cpu, &inp)?;
            let nb = case.num_blocks as i64;
            let mut pairs = inp.block_mapping.to_i64_vec();
            pairs.extend([nb, pairs[1], pairs[0], -1, i64::MIN, i64::MAX]);
            let mapping = device.upload(&Tensor::from_i64(&[pairs.len() / 2, 2], &pairs)?)?;
            let mut got = inp.layers.iter().map(|c| c.upload(device)).collect::<pagedattn::Result<Vec<_>>>()?;
            cases::run_copy_blocks(device, &mut got, &mapping)?;
            synchronize(device)?;
            got.iter().zip(&want).try_fold(BitCheck::default(), |acc, (g, w)| Ok::<_, Error>(acc.merge(compare_caches(g, w)?)))?
        }
    };
    let mut problems = Vec::new();
    expect_flag(device, guard.flag(), &mut problems)?;
    Ok(CaseResult::bit_exact(guard.name(), guard.op(), format!("{} guard", guard.op()), &check, problems))
}

// --------------------------------------------------------------------------------------- driver

/// Collects results, printing each above the progress bar.
struct Recorder {
    pb: ProgressBar,
    results: Vec<CaseResult>,
    /// Status-word findings after the valid-data sections ("clean" or the error).
    status: Vec<(String, String)>,
}

impl Recorder {
    fn record(&mut self, r: CaseResult) {
        self.pb.suspend(|| println!("{}", r.line()));
        self.pb.inc(1);
        self.results.push(r);
    }

    /// Valid data must raise no flag: checked after each section of valid cases (device-resident
    /// tables are guarded by the kernels).
    fn status_after(&mut self, device: &mut Device, op: &'static str, check: Check, section: &str) {
        let found = check_status(device).err().map(|e| e.to_string());
        self.status.push((section.to_string(), found.clone().unwrap_or_else(|| "clean".into())));
        if let Some(e) = found {
            let r = CaseResult::failed(format!("status after {section}"), op, format!("{op} status"), check, 0.0, e);
            self.pb.suspend(|| println!("{}", r.line()));
            self.results.push(r);
        }
    }
}

/// The name of a reshape op into an fp8 cache (its own group in the summary).
fn fp8_op(op: &str) -> &'static str {
    if op.contains("flash") { "reshape_and_cache_flash (fp8)" } else { "reshape_and_cache (fp8)" }
}

fn dtype_group(op: &str, dtype: DType) -> String {
    format!("{op} {dtype}")
}

pub fn verify(a: VerifyArgs) -> CliResult {
    let mut device = Device::Gpu(open_gpu("verify")?);
    let keep = |name: &str| a.filter.as_deref().is_none_or(|f| name.contains(f));
    let attn_name = |c: &Case, v: Version| format!("paged_attention {v} {c}");
    // The grid with v1 and with v2 (vLLM's 512-token partitions); `--filter v2` keeps one version.
    let attention: Vec<(Case, Version)> = [Version::V1, Version::V2]
        .into_iter()
        .flat_map(|v| testing::grid(a.long).into_iter().map(move |c| (c, v)))
        .filter(|(c, v)| keep(&attn_name(c, *v)))
        .collect();
    let guards: Vec<(Guard, Version)> =
        Guard::ALL.into_iter().flat_map(|g| [(g, Version::V1), (g, Version::V2)]).filter(|(g, v)| keep(&g.name(*v))).collect();
    let reshape: Vec<ReshapeCase> = [false, true].into_iter().flat_map(cases::reshape_grid).filter(|c| keep(&c.to_string())).collect();
    let copies: Vec<CopyBlocksCase> = cases::copy_blocks_grid().into_iter().filter(|c| keep(&c.to_string())).collect();
    let swaps: Vec<SwapCase> = cases::swap_grid().into_iter().filter(|c| keep(&c.to_string())).collect();
    let cache_guards: Vec<CacheGuard> = CacheGuard::ALL.into_iter().filter(|g| keep(&g.name())).collect();
    let varlens: Vec<VarlenCase> = varlen::varlen_grid(a.long).into_iter().filter(|c| keep(&c.to_string())).collect();
    let varlen_guards: Vec<VarlenGuard> = VarlenGuard::ALL.into_iter().filter(|g| keep(&varlen_guard_name(*g))).collect();
    let merges: Vec<MergeCase> = varlen::merge_grid().into_iter().filter(|c| keep(&merge_name(c))).collect();
    let total = attention.len()
        + guards.len()
        + reshape.len()
        + copies.len()
        + swaps.len()
        + cache_guards.len()
        + varlens.len()
        + varlen_guards.len()
        + merges.len();
    if total == 0 {
        return Err(CliError::Input(format!("no case matches --filter {:?}", a.filter.unwrap_or_default())));
    }
    println!(
        "verifying {total} cases on {}: paged_attention {} (+{} guards), reshape ops {}, copy_blocks {}, swap_blocks {} (+{} cache guards), \
         flash_attn_varlen {} (+{} guards), merge_attn_states {}",
        device.name(),
        attention.len(),
        guards.len(),
        reshape.len(),
        copies.len(),
        swaps.len(),
        cache_guards.len(),
        varlens.len(),
        varlen_guards.len(),
        merges.len()
    );
    let mut rec = Recorder { pb: progress_bar(total as u64), results: Vec::with_capacity(total + 4), status: Vec::new() };

    for (case, version) in &attention {
        let name = attn_name(case, *version);
        rec.pb.set_message(name.clone());
        let tol = testing::tolerance(case.dtype);
        let group = if case.cache == KvCacheDType::Auto {
            format!("paged_attention {version} {}", case.dtype)
        } else {
            format!("paged_attention {version} {} {} cache", case.dtype, case.cache)
        };
        let r = match testing::check_case(&device, case, *version) {
            Ok(e) => CaseResult::within(name, "paged_attention", group, e, tol, None),
            Err(e) => CaseResult::failed(name, "paged_attention", group, Check::Tolerance, tol, e.to_string()),
        };
        rec.record(r);
    }
    if !attention.is_empty() {
        rec.status_after(&mut device, "paged_attention", Check::Tolerance, "the paged_attention grid");
    }
    for &(g, v) in &guards {
        rec.pb.set_message(g.name(v));
        let r = run_guard(&mut device, g, v).unwrap_or_else(|e| {
            CaseResult::failed(g.name(v), "paged_attention", "paged_attention guard".into(), Check::Tolerance, 0.0, e.to_string())
        });
        rec.record(r);
    }

    let bit_exact = |name: String, op: &'static str, dtype: DType, r: pagedattn::Result<BitCheck>| match r {
        Ok(c) => CaseResult::bit_exact(name, op, dtype_group(op, dtype), &c, Vec::new()),
        Err(e) => CaseResult::failed(name, op, dtype_group(op, dtype), Check::BitExact, 0.0, e.to_string()),
    };
    for c in &reshape {
        rec.pb.set_message(c.to_string());
        let op = if c.cache == KvCacheDType::Auto { c.layout.reshape_op() } else { fp8_op(c.layout.reshape_op()) };
        rec.record(bit_exact(c.to_string(), op, c.dtype, check_reshape(&device, c)));
    }
    for c in &copies {
        rec.pb.set_message(c.to_string());
        rec.record(bit_exact(c.to_string(), "copy_blocks", c.dtype, check_copy_blocks(&device, c)));
    }
    for c in &swaps {
        rec.pb.set_message(c.to_string());
        rec.record(bit_exact(c.to_string(), "swap_blocks", c.dtype, check_swap(&device, c)));
    }
    if !(reshape.is_empty() && copies.is_empty()) {
        rec.status_after(&mut device, "cache ops", Check::BitExact, "the cache-op cases");
    }
    for &g in &cache_guards {
        rec.pb.set_message(g.name());
        let r = run_cache_guard(&mut device, g)
            .unwrap_or_else(|e| CaseResult::failed(g.name(), g.op(), format!("{} guard", g.op()), Check::BitExact, 0.0, e.to_string()));
        rec.record(r);
    }
    for case in &varlens {
        let name = case.to_string();
        rec.pb.set_message(name.clone());
        let (tol, group) = (testing::tolerance(case.dtype), format!("flash_attn_varlen {}", case.dtype));
        let r = match varlen::check_varlen(&device, case, FlashKernel::Auto) {
            Ok(e) => CaseResult::within(name, "flash_attn_varlen", group, e.out, tol, Some((e.lse_err, e.lse_bad))),
            Err(e) => CaseResult::failed(name, "flash_attn_varlen", group, Check::Tolerance, tol, e.to_string()),
        };
        rec.record(r);
    }
    if !varlens.is_empty() {
        rec.status_after(&mut device, "flash_attn_varlen", Check::Tolerance, "the flash_attn_varlen grid");
    }
    for &g in &varlen_guards {
        rec.pb.set_message(varlen_guard_name(g));
        let r = run_varlen_guard(&mut device, g).unwrap_or_else(|e| {
            CaseResult::failed(
                varlen_guard_name(g),
                "flash_attn_varlen",
                "flash_attn_varlen guard".into(),
                Check::Tolerance,
                0.0,
                e.to_string(),
            )
        });
        rec.record(r);
    }
    for c in &merges {
        let name = merge_name(c);
        rec.pb.set_message(name.clone());
        let &(dtype, tokens, heads, head_size, with_lse) = c;
        let (tol, group) = (testing::tolerance(dtype), format!("merge_attn_states {dtype}"));
        let r = match varlen::check_merge(&device, dtype, tokens, heads, head_size, with_lse) {
            Ok(e) => CaseResult::within(name, "merge_attn_states", group, e.out, tol, with_lse.then_some((e.lse_err, e.lse_bad))),
            Err(e) => CaseResult::failed(name, "merge_attn_states", group, Check::Tolerance, tol, e.to_string()),
        };
        rec.record(r);
    }
    rec.pb.finish_and_clear();
    let Recorder { results, status, .. } = rec;

    println!("\nsummary ({}):", device.name());
    let mut groups: Vec<&str> = Vec::new();
    for r in &results {
        if !groups.contains(&r.group.as_str()) {
            groups.push(&r.group);
        }
    }
    let mut summary = Vec::new();
    for group in groups {
        let rs: Vec<&CaseResult> = results.iter().filter(|r| r.group == group).collect();
        let passed = rs.iter().filter(|r| r.pass).count();
        let max_of = |f: fn(&CaseResult) -> f64| rs.iter().map(|r| f(r)).filter(|v| !v.is_nan()).fold(0.0, f64::max);
        let (max_rel, max_abs) = (max_of(|r| r.rel_l2), max_of(|r| r.max_abs));
        let elements: usize = rs.iter().filter_map(|r| r.elements).sum();
        let mismatches: usize = rs.iter().filter_map(|r| r.mismatches).sum();
        let head = format!("  {group:<32} {passed:>3}/{:<3} passed", rs.len());
        if rs.iter().any(|r| r.elements.is_some()) {
            println!("{head}   bit-exact: {mismatches} of {elements} elements differ");
        } else if rs.iter().any(|r| r.rel_l2.is_finite()) {
            println!("{head}   max rel-L2 {max_rel:.2e}   max abs {max_abs:.2e}");
        } else {
            println!("{head}");
        }
        summary.push(json!({
            "group": group,
            "op": rs[0].op,
            "check": rs[0].check,
            "cases": rs.len(),
            "passed": passed,
            "max_rel_l2": max_rel,
            "max_abs": max_abs,
            "elements": elements,
            "mismatches": mismatches,
        }));
    }
    let failures = results.iter().filter(|r| !r.pass).count();
    if let Some(path) = &a.json {
        let status_json: Vec<_> = status.iter().map(|(after, found)| json!({"after": after, "status": found})).collect();
        let after_grid = status.iter().find(|(s, _)| s.contains("paged_attention")).map_or("not run", |(_, f)| f.as_str());
        write_json(
            path,
            &json!({
                "device": device.name(),
                "long": a.long,
                "filter": a.filter,
                "status_after_grid": after_grid,
                "status": status_json,
                "results": results,
                "summary": summary,
            }),
        )?;
    }
    if failures > 0 {
        return Err(CliError::Failed(format!("{failures} of {} cases FAILED", results.len())));
    }
    println!("all {} cases passed", results.len());
    Ok(())
}
