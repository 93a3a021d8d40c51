//! `flash_attn_varlen_func` and `merge_attn_states` on the CPU backend: the reference against a dense
//! formula written out here, the masks' definitions case by case, merging, and argument validation.

use pagedattn::flash_attn::{FlashAttnVarlenArgs, FlashKernel, flash_attn_varlen_func, merge_attn_states};
use pagedattn::layout::DType;
use pagedattn::testing::{Rng, varlen};
use pagedattn::{Device, Error, ScalarType, Tensor};

const OP: &str = "flash_attn_varlen_func";

/// A batch: per sequence (new queries, keys), a paged cache holding every key, shuffled blocks.
struct Batch {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu: Tensor,
    used: Tensor,
    table: Tensor,
    alibi: Option<Tensor>,
    seqs: Vec<(usize, usize)>,
    max_q: usize,
    max_k: usize,
}

impl Batch {
    fn new(dtype: DType, heads: (usize, usize), head_size: usize, block_size: usize, seqs: &[(usize, usize)], seed: u64) -> Batch {
        let i = pagedattn::testing::varlen_inputs(dtype, heads, head_size, block_size, seqs, seed).unwrap();
        Batch {
            q: i.q,
            k: i.k,
            v: i.v,
            cu: i.cu_seqlens_q,
            used: i.seqused_k,
            table: i.block_table,
            alibi: None,
            seqs: seqs.to_vec(),
            max_q: i.max_seqlen_q,
            max_k: i.max_seqlen_k,
        }
    }

    fn args(&self) -> FlashAttnVarlenArgs<'_> {
        FlashAttnVarlenArgs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            max_seqlen_q: self.max_q,
            cu_seqlens_q: &self.cu,
            max_seqlen_k: self.max_k,
            seqused_k: &self.used,
            softmax_scale: None,
            causal: false,
            window_size: (-1, -1),
            softcap: 0.0,
            alibi_slopes: self.alibi.as_ref(),
            block_table: &self.table,
        }
    }

    /// Runs on the CPU backend: (out, lse) as f64.
    fn run(&self, a: &FlashAttnVarlenArgs) -> pagedattn::Result<(Vec<f64>, Vec<f64>)> {
        let mut out = Tensor::nan(self.q.dtype(), self.q.shape());
        let mut lse = Tensor::nan(ScalarType::F32, &[self.q.shape()[1], self.q.shape()[0]]);
        flash_attn_varlen_func(&Device::Cpu, &mut out, Some(&mut lse), a)?;
        Ok((out.to_f64_vec(), lse.to_f64_vec()))
    }

    /// Key `j` of sequence `b`, KV head `kvh` (through the table), as f64 rows.
    fn key_value(&self, b: usize, j: usize, kvh: usize) -> (Vec<f64>, Vec<f64>) {
        let bs = self.k.shape()[1];
        let blk = self.table.to_i32_vec()[b * self.table.shape()[1] + j / bs] as usize;
        let hs = self.k.shape()[3];
        let row = |t: &Tensor| (0..hs).map(|e| t.get_f64(&[blk, j % bs, kvh, e])).collect::<Vec<f64>>();
        (row(&self.k), row(&self.v))
    }

    /// The dense formula, written here: for each query the list of visible keys comes from `keep`,
    /// the logit from `logit` (given the plain scaled dot product and the offset `d - j`).
    fn dense(&self, keep: impl Fn(i64, i64) -> bool, logit: impl Fn(usize, f64, i64) -> f64) -> (Vec<f64>, Vec<f64>) {
        let &[total_q, nh, hs] = self.q.shape() else { panic!() };
        let nkv = self.k.shape()[2];
        let scale = 1.0 / (hs as f64).sqrt() as f32 as f64;
        let (mut out, mut lse) = (vec![0f64; total_q * nh * hs], vec![f64::NEG_INFINITY; nh * total_q]);
        let mut t = 0;
        for (b, &(sq, sk)) in self.seqs.iter().enumerate() {
            for i in 0..sq {
                let d = (i + sk) as i64 - sq as i64;
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let q: Vec<f64> = (0..hs).map(|e| self.q.get_f64(&[t, h, e])).collect();
                    let mut num = vec![0f64; hs];
                    let (mut m, mut rows) = (f64::NEG_INFINITY, Vec::new());
                    for j in 0..sk {
                        if !keep(d, j as i64) {
                            continue;
                        }
                        let (kr, vr) = self.key_value(b, j, kvh);
                        let s = logit(h, scale * q.iter().zip(&kr).map(|(a, b)| a * b).sum::<f64>(), d - j as i64);
                        m = m.max(s);
                        rows.push((s, vr));
                    }
                    if rows.is_empty() {
                        continue;
                    }
                    let z: f64 = rows.iter().map(|(s, _)| (s - m).exp()).sum();
                    for (s, vr) in &rows {
                        for e in 0..hs {
                            num[e] += (s - m).exp() / z * vr[e];
                        }
                    }
                    out[(t * nh + h) * hs..][..hs].copy_from_slice(&num);
                    lse[h * total_q + t] = m + z.ln();
                }
                t += 1;
            }
        }
        (out, lse)
    }
}

/// Outputs rounded to `dtype` against f64: per element within the dtype's rounding.
fn assert_close(got: &[f64], want: &[f64], dtype: DType, what: &str) {
    let tol = match dtype {
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        DType::F32 => 1e-6,
    };
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1e-3) + 1e-6, "{what}: element {i}: {g} vs {w}");
    }
}

fn assert_lse(got: &[f64], want: &[f64], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if *w == f64::NEG_INFINITY {
            assert_eq!(*g, f64::NEG_INFINITY, "{what}: lse {i}");
        } else {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{what}: lse {i}: {g} vs {w}");
        }
    }
}

/// Which keys `j` a query at key position `d` sees.
type Keep = Box<dyn Fn(i64, i64) -> bool>;

fn mixed(dtype: DType, seed: u64) -> Batch {
    // Prefill with a cached prefix, a plain prefill, decode tokens, an empty sequence, more queries
    // than keys (rows before the first key see nothing under causal masks).
    Batch::new(dtype, (8, 2), 64, 16, &[(37, 100), (50, 50), (1, 70), (0, 5), (1, 1), (20, 12)], seed)
}

#[test]
fn cpu_masks_match_the_dense_formula() {
    for (n, dtype) in [DType::F16, DType::BF16].into_iter().enumerate() {
        let mut batch = mixed(dtype, 10 + n as u64);
        let plain = |_: usize, s: f64, _: i64| s;
        let cases: Vec<(&str, bool, (i32, i32), Keep)> = vec![
            ("full", false, (-1, -1), Box::new(|_, _| true)),
            ("causal", true, (-1, -1), Box::new(|d, j| j <= d)),
            ("window (8, 3)", false, (8, 3), Box::new(|d, j| j >= d - 8 && j <= d + 3)),
            ("causal window 5", true, (5, -1), Box::new(|d, j| j >= d - 5 && j <= d)),
            ("window (0, 0)", false, (0, 0), Box::new(|d, j| j == d)),
            ("right only (-1, 2)", false, (-1, 2), Box::new(|d, j| j <= d + 2)),
        ];
        for (name, causal, window_size, keep) in &cases {
            let a = FlashAttnVarlenArgs { causal: *causal, window_size: *window_size, ..batch.args() };
            let (out, lse) = batch.run(&a).unwrap();
            let (want, want_lse) = batch.dense(keep, plain);
            assert_close(&out, &want, dtype, &format!("{dtype} {name}"));
            assert_lse(&lse, &want_lse, &format!("{dtype} {name}"));
        }
        // Soft-cap, then ALiBi on the capped logit.
        let a = FlashAttnVarlenArgs { softcap: 0.5, causal: true, ..batch.args() };
        let (out, lse) = batch.run(&a).unwrap();
        let (want, want_lse) = batch.dense(|d, j| j <= d, |_, s, _| 0.5 * (s / 0.5).tanh());
        assert_close(&out, &want, dtype, "softcap");
        assert_lse(&lse, &want_lse, "softcap");
        let slopes: Vec<f32> = (0..8).map(|h| 0.5f32.powi(h + 1)).collect();
        batch.alibi = Some(Tensor::from_f32(DType::F32, &[8], &slopes).unwrap());
        let a = FlashAttnVarlenArgs { softcap: 2.0, window_size: (30, 4), ..batch.args() };
        let (out, lse) = batch.run(&a).unwrap();
        let (want, want_lse) =
            batch.dense(|d, j| j >= d - 30 && j <= d + 4, |h, s, off| 2.0 * (s / 2.0).tanh() - slopes[h] as f64 * off.abs() as f64);
        assert_close(&out, &want, dtype, "softcap + alibi + window");
        assert_lse(&lse, &want_lse, "softcap + alibi + window");
    }
}

/// Rows with no visible key (causal rows before the first key; an empty window) are 0 with LSE -inf.
#[test]
fn cpu_rows_without_keys_are_zero_with_minus_inf_lse() {
    let batch = Batch::new(DType::F16, (4, 4), 32, 16, &[(10, 4)], 3);
    let (out, lse) = batch.run(&FlashAttnVarlenArgs { causal: true, ..batch.args() }).unwrap();
    // d = i + 4 - 10 < 0 for the first 6 queries.
    for t in 0..10 {
        for h in 0..4 {
            let row = &out[(t * 4 + h) * 32..][..32];
            let l = lse[h * 10 + t];
            if t < 6 {
                assert!(row.iter().all(|&v| v == 0.0) && l == f64::NEG_INFINITY, "query {t} head {h}");
            } else {
                assert!(row.iter().any(|&v| v != 0.0) && l.is_finite(), "query {t} head {h}");
            }
        }
    }
}

/// Attention over all keys equals the merge of attention over the first keys and over the rest.
#[test]
fn cpu_merge_of_split_keys_is_the_whole() {
    let (bs, p, sk, sq) = (16, 48, 100, 5);
    let whole = Batch::new(DType::BF16, (8, 2), 64, bs, &[(sq, sk)], 21);
    // Exact (f64) attention of the query over a key set, stored as f32: the merge is checked, not
    // the rounding of its inputs.
    let exact = |a: &FlashAttnVarlenArgs| {
        let out = Tensor::nan(whole.q.dtype(), whole.q.shape());
        let plan = pagedattn::flash_attn::validate(&Device::Cpu, &out, None, a).unwrap();
        let (o, l) = pagedattn::cpu::flash_attn::reference(&plan, a);
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        (Tensor::from_f32(DType::F32, out.shape(), &f32s(&o)).unwrap(), Tensor::from_f32(DType::F32, &[8, sq], &f32s(&l)).unwrap())
    };
    let (want, want_lse) = exact(&whole.args());
    // Prefix: the first p keys; suffix: the rest, through the table's later blocks.
    let table = whole.table.to_i32_vec();
    let prefix_table = Tensor::from_i32(&[1, p / bs], &table[..p / bs]).unwrap();
    let suffix_table = Tensor::from_i32(&[1, table.len() - p / bs], &table[p / bs..]).unwrap();
    let (used_p, used_s) = (Tensor::from_i32(&[1], &[p as i32]).unwrap(), Tensor::from_i32(&[1], &[(sk - p) as i32]).unwrap());
    let (po, pl) = exact(&FlashAttnVarlenArgs { seqused_k: &used_p, block_table: &prefix_table, max_seqlen_k: p, ..whole.args() });
    let (so, sl) = exact(&FlashAttnVarlenArgs { seqused_k: &used_s, block_table: &suffix_table, max_seqlen_k: sk - p, ..whole.args() });
    let mut out = Tensor::nan(ScalarType::F32, po.shape());
    let mut lse = Tensor::nan(ScalarType::F32, &[8, sq]);
    merge_attn_states(&Device::Cpu, &mut out, Some(&mut lse), &po, &pl, &so, &sl).unwrap();
    assert_close(&out.to_f64_vec(), &want.to_f64_vec(), DType::F32, "merged");
    assert_lse(&lse.to_f64_vec(), &want_lse.to_f64_vec(), "merged");
    // A side with LSE -inf contributes nothing; both -inf give 0 and -inf.
    let none = Tensor::from_f32(DType::F32, &[8, sq], &vec![f32::NEG_INFINITY; 8 * sq]).unwrap();
    merge_attn_states(&Device::Cpu, &mut out, Some(&mut lse), &po, &pl, &so, &none).unwrap();
    assert_eq!(out.to_f64_vec(), po.to_f64_vec());
    merge_attn_states(&Device::Cpu, &mut out, Some(&mut lse), &po, &none, &so, &none).unwrap();
    assert!(out.to_f64_vec().iter().all(|&v| v == 0.0) && lse.to_f64_vec().iter().all(|&v| v == f64::NEG_INFINITY));
}

#[test]
fn cpu_bad_arguments_are_typed_errors() {
    let b = mixed(DType::F16, 5);
    let run = |a: &FlashAttnVarlenArgs| b.run(a).map(drop);
    let bad_cu = Tensor::from_i32(&[7], &[0, 37, 87, 88, 88, 89, 108]).unwrap();
    expect_err!(run(&FlashAttnVarlenArgs { cu_seqlens_q: &bad_cu, ..b.args() }), Error::HostData { op: OP, what } => assert!(what.contains("cu_seqlens_q[batch]"), "{what}"));
    let shrinking = Tensor::from_i32(&[7], &[0, 37, 30, 88, 88, 89, 109]).unwrap();
    expect_err!(run(&FlashAttnVarlenArgs { cu_seqlens_q: &shrinking, ..b.args() }), Error::HostData { op: OP, .. });
    expect_err!(run(&FlashAttnVarlenArgs { max_seqlen_q: 36, ..b.args() }), Error::HostData { op: OP, what } => assert!(what.contains("max_seqlen_q"), "{what}"));
    let long = Tensor::from_i32(&[6], &[100, 50, 70, 5, 1, 101]).unwrap();
    expect_err!(run(&FlashAttnVarlenArgs { seqused_k: &long, ..b.args() }), Error::HostData { op: OP, what } => assert!(what.contains("seqused_k[5]"), "{what}"));
    let mut table = b.table.to_i32_vec();
    table[1] = 999;
    let bad_table = Tensor::from_i32(b.table.shape(), &table).unwrap();
    expect_err!(run(&FlashAttnVarlenArgs { block_table: &bad_table, ..b.args() }), Error::HostData { op: OP, what } => assert!(what.contains("999"), "{what}"));
    expect_err!(run(&FlashAttnVarlenArgs { max_seqlen_k: 10_000, ..b.args() }), Error::Value { op: OP, what: "max_seqlen_k", .. });
    expect_err!(run(&FlashAttnVarlenArgs { window_size: (-2, 0), ..b.args() }), Error::Value { op: OP, what: "window_size", .. });
    for softcap in [-1.0, f32::NAN, f32::INFINITY] {
        expect_err!(run(&FlashAttnVarlenArgs { softcap, ..b.args() }), Error::Value { op: OP, what: "softcap", .. });
    }
    expect_err!(
        run(&FlashAttnVarlenArgs { softmax_scale: Some(f32::NAN), ..b.args() }),
        Error::Value { op: OP, what: "softmax_scale", .. }
    );
    let q32 = Tensor::from_f32(DType::F32, b.q.shape(), &vec![0.5; b.q.numel()]).unwrap();
    expect_err!(run(&FlashAttnVarlenArgs { q: &q32, ..b.args() }), Error::DType { op: OP, tensor: "q", .. });
    let k_bf16 = Tensor::from_f32(DType::BF16, b.k.shape(), &vec![0.5; b.k.numel()]).unwrap();
    expect_err!(run(&FlashAttnVarlenArgs { k: &k_bf16, ..b.args() }), Error::DType { op: OP, tensor: "k", .. });
    let slopes = Tensor::from_f32(DType::F32, &[3], &[1.0; 3]).unwrap();
    expect_err!(run(&FlashAttnVarlenArgs { alibi_slopes: Some(&slopes), ..b.args() }), Error::Shape { op: OP, tensor: "alibi_slopes", .. });
    let mut out = Tensor::nan(b.q.dtype(), &[3, 8, 64]);
    expect_err!(flash_attn_varlen_func(&Device::Cpu, &mut out, None, &b.args()), Error::Shape { op: OP, tensor: "out", .. });
    let mut out = Tensor::nan(b.q.dtype(), b.q.shape());
    let mut lse = Tensor::nan(ScalarType::F32, &[b.q.shape()[0], 8]);
    expect_err!(
        flash_attn_varlen_func(&Device::Cpu, &mut out, Some(&mut lse), &b.args()),
        Error::Shape { op: OP, tensor: "softmax_lse", .. }
    );
}

/// The tensor-core building blocks (`cp.async`, `ldmatrix` plain and transposed, `mma.sync.m16n8k16`
/// for f16 and bf16) give `A · Kᵀ` and `A · V` on random tiles, checked against f64 on the rounded
/// inputs: the fragment layouts the varlen kernel relies on.
#[test]
fn gpu_mma_fragments_match_cpu() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let gpu = crate::common::gpu_of(&mut device);
    let mut rng = Rng::new(99);
    for bf16 in [false, true] {
        let mut fill = |n: usize| (0..n).map(|_| rng.uniform()).collect::<Vec<f32>>();
        let (a, k, v): ([f32; 256], [f32; 128], [f32; 128]) =
            (fill(256).try_into().unwrap(), fill(128).try_into().unwrap(), fill(128).try_into().unwrap());
        let round = |x: f32| if bf16 { half::bf16::from_f32(x).to_f64() } else { half::f16::from_f32(x).to_f64() };
        let (qk, pv) = pagedattn::util::mma_probe(gpu, bf16, &a, &k, &v).unwrap();
        for r in 0..16 {
            for c in 0..8 {
                let want_qk: f64 = (0..16).map(|e| round(a[r * 16 + e]) * round(k[c * 16 + e])).sum();
                let want_pv: f64 = (0..16).map(|e| round(a[r * 16 + e]) * round(v[e * 8 + c])).sum();
                for (what, got, want) in [("A·Kᵀ", qk[r * 8 + c], want_qk), ("A·V", pv[r * 8 + c], want_pv)] {
                    assert!((got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "bf16 {bf16}: {what}[{r}][{c}] = {got}, want {want}");
                }
            }
        }
    }
    crate::common::note("gpu_mma_fragments_match_cpu: cp.async + ldmatrix (+ .trans) + mma.sync m16n8k16 f16 and bf16 match f64");
}

/// The GPU kernel against the float64 reference over `testing::varlen_grid`: random batches mixing
/// prefill with a cached prefix, plain prefill, decode tokens, empty sequences and more queries than
/// keys, lengths up to 8k; every mask option and combinations; f16 and bf16; head sizes 32–256;
/// block sizes 8–256; GQA, MQA and MHA; random block tables.
#[test]
fn gpu_varlen_matches_reference() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for kernel in gpu_kernels(&device) {
        let mut worst: std::collections::BTreeMap<String, (f64, f64, f64)> = Default::default();
        let mut failures = Vec::new();
        let cases = cases_for(kernel, varlen::varlen_grid(false));
        for case in &cases {
            let tol = pagedattn::testing::tolerance(case.dtype);
            match varlen::check_varlen(&device, case, kernel) {
                Ok(e) => {
                    let w = worst.entry(case.dtype.to_string()).or_default();
                    *w = (w.0.max(e.out.rel_l2), w.1.max(e.out.max_abs), w.2.max(e.lse_err));
                    if !e.passes(tol) {
                        failures.push(format!("{case}: {e:?} (tol {tol:.0e})"));
                    }
                }
                Err(err) => failures.push(format!("{case}: {err}")),
            }
        }
        let k = kernel.name();
        assert!(failures.is_empty(), "{k}: {} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
        crate::common::note(&format!(
            "gpu_varlen_matches_reference ({k}): {} cases; worst (rel-L2, max abs, LSE abs err): {worst:?}",
            cases.len()
        ));
        crate::common::gpu_of(&mut device).check_status().expect("no device-side flags for valid inputs");
    }
}

/// Scores that rise along each sequence and jump by some hundred units at a few keys
/// (`testing::varlen::check_varlen_rising`): the Hopper kernel's softmax, whose exps run ahead of
/// the row maxima against a lagging reference, must take its rebase and its recomputation paths
/// and still match the float64 reference, as the `mma.sync` kernel does; every head size, f16 and
/// bf16.
#[test]
fn gpu_varlen_rising_scores() {
    let Some(mut device) = gpu_or_skip!() else { return };
    let mut failures = Vec::new();
    // Per kernel and dtype: the worst relative L2 error and LSE error.
    let mut worst: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for kernel in gpu_kernels(&device) {
        for (n, &head_size) in pagedattn::layout::FLASH_SM90_HEAD_SIZES.iter().enumerate() {
            for (m, dtype) in [DType::F16, DType::BF16].into_iter().enumerate() {
                let case = varlen::rising_case(dtype, head_size, 60 + (2 * n + m) as u64);
                match varlen::check_varlen_rising(&device, &case, kernel) {
                    Ok(e) if e.passes(pagedattn::testing::tolerance(dtype)) => {
                        let w = worst.entry(format!("{} {dtype}", kernel.name())).or_default();
                        *w = (w.0.max(e.out.rel_l2), w.1.max(e.lse_err));
                    }
                    Ok(e) => failures.push(format!("{}: {case}: {e:?}", kernel.name())),
                    Err(err) => failures.push(format!("{}: {case}: {err}", kernel.name())),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    crate::common::gpu_of(&mut device).check_status().expect("no device-side flags for valid inputs");
    crate::common::note(&format!("gpu_varlen_rising_scores: worst (rel-L2, LSE abs err): {worst:?}"));
}

/// The Hopper kernel's two launch forms: persistent for eager launches (a CTA per SM takes work
/// items from its stream's counter, which the kernel's last CTA zeroes again), and a CTA per item
/// for a launch captured into a graph. Mixed batches (decode rows, prefills on a cached prefix,
/// rows that see no key, an empty sequence, a sliding window) at every head size run 200 times back
/// to back: the wait for them has a deadline, so a hang fails the test instead of blocking it. The
/// first run must match the float64 reference, every repetition must equal it bit for bit, and so
/// must a graph replay.
#[test]
fn gpu_wgmma_persistent_and_captured_launches() {
    let Some(mut device) = gpu_or_skip!() else { return };
    if !gpu_kernels(&device).contains(&FlashKernel::Wgmma) {
        return;
    }
    let seqs = vec![(1, 700), (300, 2300), (2, 0), (1, 1), (130, 130), (0, 50), (77, 589), (1, 4000)];
    let mut runs = 0;
    for (n, &head_size) in pagedattn::layout::FLASH_SM90_HEAD_SIZES.iter().enumerate() {
        for window in [(-1, -1), (96, 0)] {
            let dtype = if n % 2 == 0 { DType::F16 } else { DType::BF16 };
            let case = varlen::VarlenCase {
                dtype,
                heads: (8, 2),
                head_size,
                block_size: 16,
                seqs: seqs.clone(),
                causal: true,
                window,
                softcap: 0.0,
                alibi: false,
                seed: 40 + n as u64,
            };
            let e = varlen::check_varlen(&device, &case, FlashKernel::Wgmma).unwrap();
            assert!(e.passes(pagedattn::testing::tolerance(dtype)), "{case}: {e:?}");

            let i = case.inputs().unwrap();
            let up = |t: &Tensor| device.upload(t).unwrap();
            let (q, k, v, cu, used, table) = (up(&i.q), up(&i.k), up(&i.v), up(&i.cu_seqlens_q), up(&i.seqused_k), up(&i.block_table));
            let a = FlashAttnVarlenArgs {
                q: &q,
                k: &k,
                v: &v,
                max_seqlen_q: i.max_seqlen_q,
                cu_seqlens_q: &cu,
                max_seqlen_k: i.max_seqlen_k,
                seqused_k: &used,
                softmax_scale: None,
                causal: true,
                window_size: window,
                softcap: 0.0,
                alibi_slopes: None,
                block_table: &table,
            };
            let launch = |out: &mut Tensor| pagedattn::flash_attn_varlen_func_with(&device, out, None, &a, FlashKernel::Wgmma).unwrap();
            let mut out = device.nan(i.q.dtype(), i.q.shape()).unwrap();
            launch(&mut out);
            let first = crate::common::bits(&out);
            for _ in 0..200 {
                launch(&mut out);
            }
            let gpu = crate::common::gpu_ref(&device);
            let done = gpu.stream().record_event(None).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !done.try_is_complete().unwrap() {
                assert!(std::time::Instant::now() < deadline, "{case}: 200 launches not done after 60 s (a hang)");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(crate::common::bits(&out) == first, "{case}: a repetition differs from the first run");

            let mut captured = device.nan(i.q.dtype(), i.q.shape()).unwrap();
            let stream = gpu.stream().clone();
            stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
            launch(&mut captured);
            let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap().expect("a captured launch");
            graph.launch().unwrap();
            assert!(crate::common::bits(&captured) == first, "{case}: the graph replay differs from the eager run");
            runs += 202;
        }
    }
    crate::common::gpu_of(&mut device).check_status().expect("no device-side flags for valid inputs");
    crate::common::note(&format!(
        "gpu_wgmma_persistent_and_captured_launches: heads {:?} x 2 windows, {runs} launches match the reference, repeat bit for bit, and a graph replay (a CTA per item) equals them",
        pagedattn::layout::FLASH_SM90_HEAD_SIZES
    ));
}

/// The GPU kernels of `flash_attn_varlen_func` this device runs: `mma.sync` always, `wgmma` on
/// Hopper (said loudly where it is skipped).
fn gpu_kernels(device: &Device) -> Vec<FlashKernel> {
    let gpu = crate::common::gpu_ref(device);
    let mut kernels = vec![FlashKernel::MmaSync];
    match FlashKernel::Wgmma.resolve(gpu, DType::F16, 128) {
        Ok(_) => kernels.push(FlashKernel::Wgmma),
        Err(e) => crate::common::note(&format!("SKIPPED the wgmma kernel's cases: {e}")),
    }
    kernels
}

/// The grid for `kernel`: the wgmma kernel runs every case at the nearest head size it has (64 or
/// 128), so it sees every mask, block size, head ratio and batch shape of the grid.
fn cases_for(kernel: FlashKernel, cases: Vec<varlen::VarlenCase>) -> Vec<varlen::VarlenCase> {
    if kernel != FlashKernel::Wgmma {
        return cases;
    }
    let heads = pagedattn::layout::FLASH_SM90_HEAD_SIZES;
    cases
        .into_iter()
        .map(|mut c| {
            c.head_size = heads.iter().copied().find(|&h| h >= c.head_size).unwrap_or(heads[heads.len() - 1]);
            c
        })
        .collect()
}

/// Device-resident tables with bad entries: never read out of bounds (run under compute-sanitizer),
/// the good sequences still right, the bad one NaN or skipped, and the status word holds the flag.
#[test]
fn gpu_varlen_guards_device_tables() {
    let Some(mut device) = gpu_or_skip!() else { return };
    for kernel in gpu_kernels(&device) {
        for guard in varlen::VarlenGuard::ALL {
            let problems = varlen::check_varlen_guard(&device, guard, kernel).unwrap();
            assert!(problems.is_empty(), "{} ({}): {problems:?}", guard.what(), kernel.name());
            match crate::common::gpu_of(&mut device).check_status() {
                Err(Error::DeviceData { flags }) => assert_eq!(flags, guard.flag(), "{} ({})", guard.what(), kernel.name()),
                other => panic!("{} ({}): expected the status flag {:#x}, got {other:?}", guard.what(), kernel.name(), guard.flag()),
            }
        }
    }
    crate::common::note(
        "gpu_varlen_guards_device_tables: bad block id, seqused_k and cu_seqlens_q flagged, good rows right (every kernel)",
    );
}

/// The GPU merge against the float64 merge of the same inputs: every dtype, head sizes 32–256 (120
/// too), with and without `output_lse`, rows where one or both sides are empty (`-inf` or `+inf` LSE,
/// NaN outputs that must not be read).
#[test]
fn gpu_merge_attn_states_matches_reference() {
    let Some(device) = gpu_or_skip!() else { return };
    for (dtype, tokens, heads, head_size, with_lse) in varlen::merge_grid() {
        let e = varlen::check_merge(&device, dtype, tokens, heads, head_size, with_lse).unwrap();
        let tol = pagedattn::testing::tolerance(dtype);
        assert!(e.passes(tol), "{dtype} {tokens}x{heads}x{head_size} lse {with_lse}: {e:?}");
    }
    crate::common::note("gpu_merge_attn_states_matches_reference: f32/f16/bf16 x 4 shapes match the f64 merge");
}

/// The CPU merge follows the same rules (the GPU test's oracle is `merge_values`, so check the op on
/// the CPU backend against it too, NaN in empty sides included).
#[test]
fn cpu_merge_matches_merge_values() {
    for (dtype, tokens, heads, head_size, with_lse) in varlen::merge_grid().into_iter().take(6) {
        let e = varlen::check_merge(&Device::Cpu, dtype, tokens, heads, head_size, with_lse).unwrap();
        assert!(e.passes(1e-6) || dtype != DType::F32, "{dtype}: {e:?}");
        assert!(e.passes(pagedattn::testing::tolerance(dtype)), "{dtype}: {e:?}");
    }
}

/// The shared check harness on the CPU backend: the first grid cases pass (the CPU op is the
/// reference rounded to the dtype), so a GPU failure is the kernel's, not the harness's.
#[test]
fn cpu_varlen_harness_passes_on_the_reference() {
    for case in varlen::varlen_grid(false).iter().take(4) {
        let e = varlen::check_varlen(&Device::Cpu, case, FlashKernel::Auto).unwrap();
        assert!(e.passes(pagedattn::testing::tolerance(case.dtype)), "{case}: {e:?}");
    }
    let case = varlen::rising_case(DType::BF16, 64, 1);
    let e = varlen::check_varlen_rising(&Device::Cpu, &case, FlashKernel::Auto).unwrap();
    assert!(e.passes(pagedattn::testing::tolerance(case.dtype)), "{case}: {e:?}");
}
