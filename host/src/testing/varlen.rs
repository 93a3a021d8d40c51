//! Cases of `flash_attn_varlen_func` and `merge_attn_states` shared by the GPU tests
//! (`tests/flash_attn.rs`) and `pagedattn verify`: random batches, the case grid, and checks against
//! the float64 references (`cpu::flash_attn`).

use std::fmt;

use pagedattn_layout::DType;

use super::{Errors, Rng, compare};
use crate::device::Device;
use crate::error::Result;
use crate::flash_attn::{FlashAttnVarlenArgs, FlashKernel, flash_attn_varlen_func_with, merge_attn_states, validate};
use crate::tensor::{ScalarType, Tensor};

/// Host inputs of a `flash_attn_varlen_func` batch (see [`varlen_inputs`]).
pub struct VarlenInputs {
    /// `[total_q, num_heads, head_size]`.
    pub q: Tensor,
    /// Key cache `[num_blocks, block_size, num_kv_heads, head_size]`.
    pub k: Tensor,
    /// Value cache, the same shape as `k`.
    pub v: Tensor,
    /// `[batch + 1]` i32: the prefix sums of the sequences' query counts.
    pub cu_seqlens_q: Tensor,
    /// `[batch]` i32: keys per sequence.
    pub seqused_k: Tensor,
    /// `[batch, max_blocks]` i32: each sequence's blocks, unused entries -1.
    pub block_table: Tensor,
    /// The largest query count of a sequence.
    pub max_seqlen_q: usize,
    /// The largest key count of a sequence.
    pub max_seqlen_k: usize,
}

/// A random batch for `flash_attn_varlen_func`: per sequence `(new queries, keys)` (keys include the
/// new tokens, so `keys - new` is the cached prefix), uniform values, the sequences' blocks shuffled
/// over the cache (two spare blocks), unused table entries -1.
pub fn varlen_inputs(
    dtype: DType,
    heads: (usize, usize),
    head_size: usize,
    block_size: usize,
    seqs: &[(usize, usize)],
    seed: u64,
) -> Result<VarlenInputs> {
    let mut rng = Rng::new(seed);
    let (nh, nkv) = heads;
    let total_q: usize = seqs.iter().map(|s| s.0).sum();
    let max_blocks = seqs.iter().map(|s| s.1.div_ceil(block_size)).max().unwrap_or(0).max(1);
    let num_blocks = seqs.iter().map(|s| s.1.div_ceil(block_size)).sum::<usize>() + 2;
    let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
    rng.shuffle(&mut perm);
    let mut table = vec![-1i32; seqs.len() * max_blocks];
    let mut next = 0;
    for (b, s) in seqs.iter().enumerate() {
        for blk in 0..s.1.div_ceil(block_size) {
            table[b * max_blocks + blk] = perm[next];
            next += 1;
        }
    }
    let mut rand = |n: usize| (0..n).map(|_| rng.uniform()).collect::<Vec<f32>>();
    let cache = num_blocks * block_size * nkv * head_size;
    let mut cu = vec![0i32];
    for s in seqs {
        cu.push(cu.last().copied().unwrap_or(0) + s.0 as i32);
    }
    Ok(VarlenInputs {
        q: Tensor::from_f32(dtype, &[total_q, nh, head_size], &rand(total_q * nh * head_size))?,
        k: Tensor::from_f32(dtype, &[num_blocks, block_size, nkv, head_size], &rand(cache))?,
        v: Tensor::from_f32(dtype, &[num_blocks, block_size, nkv, head_size], &rand(cache))?,
        cu_seqlens_q: Tensor::from_i32(&[seqs.len() + 1], &cu)?,
        seqused_k: Tensor::from_i32(&[seqs.len()], &seqs.iter().map(|s| s.1 as i32).collect::<Vec<_>>())?,
        block_table: Tensor::from_i32(&[seqs.len(), max_blocks], &table)?,
        max_seqlen_q: seqs.iter().map(|s| s.0).max().unwrap_or(0),
        max_seqlen_k: seqs.iter().map(|s| s.1).max().unwrap_or(0),
    })
}

/// One `flash_attn_varlen_func` case: a random batch and the mask options.
#[derive(Clone, Debug, PartialEq)]
pub struct VarlenCase {
    /// The query's and caches' dtype (f16 or bf16).
    pub dtype: DType,
    /// (query heads, KV heads).
    pub heads: (usize, usize),
    /// Elements per head vector.
    pub head_size: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Per sequence (new queries, keys).
    pub seqs: Vec<(usize, usize)>,
    /// Causal mask ([`FlashAttnVarlenArgs::causal`]).
    pub causal: bool,
    /// Sliding window `(left, right)`, `-1` unbounded ([`FlashAttnVarlenArgs::window_size`]).
    pub window: (i32, i32),
    /// Logit soft-cap, `0` for none ([`FlashAttnVarlenArgs::softcap`]).
    pub softcap: f32,
    /// Slopes `0.5^(h + 1)`.
    pub alibi: bool,
    /// Seed of the inputs and the block shuffle ([`varlen_inputs`]).
    pub seed: u64,
}

impl fmt::Display for VarlenCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (q, k) = self.seqs.iter().fold((0, 0), |(q, k), s| (q + s.0, k + s.1));
        let longest = self.seqs.iter().map(|s| s.1).max().unwrap_or(0);
        write!(
            f,
            "flash_attn_varlen {} h{} b{} heads {}/{} seqs {} (q {q}, k {k}, longest {longest})",
            self.dtype,
            self.head_size,
            self.block_size,
            self.heads.0,
            self.heads.1,
            self.seqs.len()
        )?;
        if self.causal {
            write!(f, " causal")?;
        }
        if self.window != (-1, -1) {
            write!(f, " window {:?}", self.window)?;
        }
        if self.softcap > 0.0 {
            write!(f, " softcap {}", self.softcap)?;
        }
        if self.alibi {
            write!(f, " alibi")?;
        }
        Ok(())
    }
}

/// The varlen grid: f16 and bf16 × every head size × 6 batches each, rotating block sizes (8–256),
/// GQA/MQA/MHA ratios, the mask options and their combinations (causal, window, soft-cap, ALiBi).
/// Batches mix decode tokens, prefill with and without a cached prefix, empty sequences and more
/// queries than keys; per dtype two batches reach 8k keys. `long` adds 8k causal prefills and the
/// paged-prefix bench shape (scaled down in heads).
pub fn varlen_grid(long: bool) -> Vec<VarlenCase> {
    let mut rng = Rng::new(4242);
    let mut cases = Vec::new();
    let masks: [(bool, (i32, i32), f32); 5] =
        [(false, (-1, -1), 0.0), (true, (-1, -1), 0.0), (true, (64, -1), 0.0), (false, (100, 7), 30.0), (true, (-1, -1), 5.0)];
    for &dtype in &[DType::F16, DType::BF16] {
        for &head_size in pagedattn_layout::FLASH_HEAD_SIZES {
            for variant in 0..6 {
                let block_size = [16, 32, 64, 128, 256, 8][(variant + head_size / 16) % 6];
                // Groups 4, 1, 8, 2, 7 and 3: the last two do not divide the Hopper kernel's 128-row tile,
                // which then gathers Q rows instead of copying boxes.
                let heads = [(8, 2), (4, 4), (8, 1), (6, 3), (28, 4), (12, 4)][(variant + head_size / 32) % 6];
                let num_seqs = 1 + rng.below(5);
                let seqs: Vec<(usize, usize)> = (0..num_seqs)
                    .map(|_| {
                        let new = [1, 1 + rng.below(70), 1 + rng.below(300), 0][rng.below(4)];
                        let prefix = [0, rng.below(200), rng.below(1000)][rng.below(3)];
                        (new, new + prefix)
                    })
                    .collect();
                let (causal, window, softcap) = masks[variant % 5];
                let seed = 7000 + cases.len() as u64;
                cases.push(VarlenCase {
                    dtype,
                    heads,
                    head_size,
                    block_size,
                    seqs,
                    causal,
                    window,
                    softcap,
                    alibi: variant % 3 == 2,
                    seed,
                });
            }
        }
        // Lengths up to 8k: a decode token on 8k keys, prefill chunks on a prefix, a 3k prefill.
        let seqs = vec![(1, 8192), (512, 2560), (3000, 3000), (1, 4000)];
        for (causal, window) in [(true, (-1, -1)), (false, (1000, 0))] {
            let seed = 7000 + cases.len() as u64;
            cases.push(VarlenCase {
                dtype,
                heads: (4, 1),
                head_size: 128,
                block_size: 16,
                seqs: seqs.clone(),
                causal,
                window,
                softcap: 0.0,
                alibi: false,
                seed,
            });
        }
        if long {
            let prefix: Vec<(usize, usize)> = (0..8).map(|i| (1024 + 384 * i, 2048 + 1024 + 384 * i)).collect();
            for (head_size, seqs) in
                [(128, vec![(8192, 8192)]), (128, prefix), (64, vec![(4096, 4096), (4096, 4096)]), (256, vec![(2048, 6144), (1, 8192)])]
            {
                let seed = 7000 + cases.len() as u64;
                cases.push(VarlenCase {
                    dtype,
                    heads: (4, 2),
                    head_size,
                    block_size: 16,
                    seqs,
                    causal: true,
                    window: (-1, -1),
                    softcap: 0.0,
                    alibi: false,
                    seed,
                });
            }
        }
    }
    cases
}

/// Error figures of a varlen (or merge) result: the output against the reference, and the LSE.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VarlenErrors {
    /// The output against the reference.
    pub out: Errors,
    /// Largest |lse − reference| over rows with a visible key.
    pub lse_err: f64,
    /// LSE entries of the wrong kind: not `-inf` where the reference is, not finite where it is.
    pub lse_bad: usize,
}

impl VarlenErrors {
    /// Tolerance: the output's relative L2 within `tol`, no non-finite output, LSE within 1e-3.
    pub fn passes(&self, tol: f64) -> bool {
        self.out.passes(tol) && self.lse_bad == 0 && self.lse_err <= 1e-3
    }
}

fn compare_lse(got: &[f64], want: &[f64]) -> (f64, usize) {
    let (mut err, mut bad) = (0f64, 0);
    for (g, w) in got.iter().zip(want) {
        if *w == f64::NEG_INFINITY {
            bad += (*g != f64::NEG_INFINITY) as usize;
        } else if g.is_finite() {
            err = err.max((g - w).abs());
        } else {
            bad += 1;
        }
    }
    (err, bad)
}

impl VarlenCase {
    /// The case's random batch ([`varlen_inputs`] with its sizes and seed).
    pub fn inputs(&self) -> Result<VarlenInputs> {
        varlen_inputs(self.dtype, self.heads, self.head_size, self.block_size, &self.seqs, self.seed)
    }

    /// `[num_heads]` slopes when the case has ALiBi.
    pub fn slopes(&self) -> Result<Option<Tensor>> {
        if !self.alibi {
            return Ok(None);
        }
        let slopes: Vec<f32> = (0..self.heads.0).map(|h| 0.5f32.powi(h as i32 + 1)).collect();
        Ok(Some(Tensor::from_f32(DType::F32, &[self.heads.0], &slopes)?))
    }
}

/// The case's arguments over given tensors.
fn args<'a>(
    c: &VarlenCase,
    i: &'a VarlenInputs,
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    alibi: Option<&'a Tensor>,
) -> FlashAttnVarlenArgs<'a> {
    FlashAttnVarlenArgs {
        q,
        k,
        v,
        max_seqlen_q: i.max_seqlen_q,
        cu_seqlens_q: &i.cu_seqlens_q,
        max_seqlen_k: i.max_seqlen_k,
        seqused_k: &i.seqused_k,
        softmax_scale: None,
        causal: c.causal,
        window_size: c.window,
        softcap: c.softcap,
        alibi_slopes: alibi,
        block_table: &i.block_table,
    }
}

/// Runs `case` on `device` (outputs NaN-poisoned first, host tables uploaded by the op) and
/// compares the output and LSE with the float64 reference.
pub fn check_varlen(device: &Device, case: &VarlenCase, kernel: FlashKernel) -> Result<VarlenErrors> {
    check_inputs(device, case, &case.inputs()?, kernel)
}

/// [`check_varlen`] on `case` with scores that rise along each sequence, then jump: key `j` of a
/// sequence of `n` keys is scaled by `1 + 15 (j / n)²` (a row's maximum grows by several units
/// from tile to tile, well past its first tile's), and every key `j ≡ 500 (mod 997)` by 300 (its
/// score is some hundred units above the rest, the softmax nearly one-hot). The Hopper kernel's
/// exps run ahead of the row maxima against a lagging reference (`varlen::exponentiate_ahead` in
/// the kernels): the first takes its rebase path, the second overflows `exp2` and takes its
/// recomputation; random scores take neither.
pub fn check_varlen_rising(device: &Device, case: &VarlenCase, kernel: FlashKernel) -> Result<VarlenErrors> {
    let mut i = case.inputs()?;
    let shape = i.k.shape().to_vec();
    let (bs, row) = (shape[1], shape[2] * shape[3]);
    let (table, max_blocks) = (i.block_table.to_i32_vec(), i.block_table.shape()[1]);
    let mut k: Vec<f32> = i.k.to_f64_vec().iter().map(|&x| x as f32).collect();
    for (b, &(_, n)) in case.seqs.iter().enumerate() {
        for j in 0..n {
            let f = if j % 997 == 500 { 300.0 } else { 1.0 + 15.0 * (j as f32 / n as f32).powi(2) };
            let slot = table[b * max_blocks + j / bs] as usize * bs + j % bs;
            k[slot * row..][..row].iter_mut().for_each(|x| *x *= f);
        }
    }
    i.k = Tensor::from_f32(case.dtype, &shape, &k)?;
    check_inputs(device, case, &i, kernel)
}

/// [`check_varlen_rising`]'s cases: prefills on a cached prefix, a long decode row and a short
/// prefill, causal, at `head_size`.
pub fn rising_case(dtype: DType, head_size: usize, seed: u64) -> VarlenCase {
    VarlenCase {
        dtype,
        heads: (8, 2),
        head_size,
        block_size: 16,
        seqs: vec![(300, 2300), (1, 4000), (130, 700), (77, 1589)],
        causal: true,
        window: (-1, -1),
        softcap: 0.0,
        alibi: false,
        seed,
    }
}

fn check_inputs(device: &Device, case: &VarlenCase, i: &VarlenInputs, kernel: FlashKernel) -> Result<VarlenErrors> {
    let slopes = case.slopes()?;
    let host = args(case, i, &i.q, &i.k, &i.v, slopes.as_ref());
    let plan = validate(&Device::Cpu, &Tensor::nan(i.q.dtype(), i.q.shape()), None, &host)?;
    let (want, want_lse) = crate::cpu::flash_attn::reference(&plan, &host);
    let (q, k, v) = (device.upload(&i.q)?, device.upload(&i.k)?, device.upload(&i.v)?);
    let alibi = slopes.as_ref().map(|s| device.upload(s)).transpose()?;
    let mut out = device.nan(i.q.dtype(), i.q.shape())?;
    let mut lse = device.nan(ScalarType::F32, &[case.heads.0, i.q.shape()[0]])?;
    flash_attn_varlen_func_with(device, &mut out, Some(&mut lse), &args(case, i, &q, &k, &v, alibi.as_ref()), kernel)?;
    let got = out.to_cpu()?.to_f64_vec();
    let (lse_err, lse_bad) = compare_lse(&lse.to_cpu()?.to_f64_vec(), &want_lse);
    Ok(VarlenErrors { out: compare(&got, &want), lse_err, lse_bad })
}

/// `merge_attn_states` cases: (dtype, tokens, heads, head size, with `output_lse`).
pub fn merge_grid() -> Vec<(DType, usize, usize, usize, bool)> {
    let mut cases = Vec::new();
    for (i, &dtype) in pagedattn_layout::DTYPES.iter().enumerate() {
        for (j, &(tokens, heads, head_size)) in [(1, 1, 32), (37, 8, 128), (300, 5, 120), (64, 32, 256)].iter().enumerate() {
            cases.push((dtype, tokens, heads, head_size, (i + j) % 2 == 0));
        }
    }
    cases
}

/// Runs `merge_attn_states` on `device` over random partial outputs whose LSEs span ±30 and include
/// rows where either or both sides are empty (`-inf`, or FlashAttention-2's `+inf`) with NaN in the
/// empty side's output, and compares with the float64 merge of the same (rounded) inputs.
pub fn check_merge(device: &Device, dtype: DType, tokens: usize, heads: usize, head_size: usize, with_lse: bool) -> Result<VarlenErrors> {
    let mut rng = Rng::new((tokens * 131 + heads * 7 + head_size) as u64);
    let n = tokens * heads * head_size;
    let mut outs: Vec<Vec<f32>> = (0..2).map(|_| (0..n).map(|_| rng.uniform()).collect()).collect();
    let mut lses: Vec<Vec<f32>> = (0..2).map(|_| (0..tokens * heads).map(|_| 30.0 * rng.uniform()).collect()).collect();
    // Row r of both sides (LSEs and outputs are parallel vectors).
    #[allow(clippy::needless_range_loop)]
    for r in 0..tokens * heads {
        // Every 7th row: one side empty (alternating -inf and +inf, NaN output); every 11th: both.
        let empty: &[usize] = if r % 11 == 3 {
            &[0, 1]
        } else if r % 7 == 2 {
            &[r % 2]
        } else {
            &[]
        };
        for &side in empty {
            lses[side][r] = if r % 2 == 0 { f32::NEG_INFINITY } else { f32::INFINITY };
            let (t, h) = (r % tokens, r / tokens);
            outs[side][(t * heads + h) * head_size..][..head_size].fill(f32::NAN);
        }
    }
    let shape = [tokens, heads, head_size];
    let po = Tensor::from_f32(dtype, &shape, &outs[0])?;
    let so = Tensor::from_f32(dtype, &shape, &outs[1])?;
    let pl = Tensor::from_f32(DType::F32, &[heads, tokens], &lses[0])?;
    let sl = Tensor::from_f32(DType::F32, &[heads, tokens], &lses[1])?;
    let (want, want_lse) =
        crate::cpu::flash_attn::merge_values(&po.to_f64_vec(), &pl.to_f64_vec(), &so.to_f64_vec(), &sl.to_f64_vec(), heads);
    let up = |t: &Tensor| device.upload(t);
    let (po, so, pl, sl) = (up(&po)?, up(&so)?, up(&pl)?, up(&sl)?);
    let mut out = device.nan(ScalarType::from(dtype), &shape)?;
    let mut lse = device.nan(ScalarType::F32, &[heads, tokens])?;
    merge_attn_states(device, &mut out, with_lse.then_some(&mut lse), &po, &pl, &so, &sl)?;
    let got = out.to_cpu()?.to_f64_vec();
    let (lse_err, lse_bad) = if with_lse { compare_lse(&lse.to_cpu()?.to_f64_vec(), &want_lse) } else { (0.0, 0) };
    Ok(VarlenErrors { out: compare(&got, &want), lse_err, lse_bad })
}

/// Device-resident tables the host cannot check, bad for sequence 1 of a 4-sequence batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarlenGuard {
    /// An out-of-range block id in sequence 1's row: its outputs NaN, `BAD_BLOCK_ID`.
    BadBlockId,
    /// `seqused_k[1]` above `max_seqlen_k`: its outputs and LSEs NaN, `BAD_SEQ_LEN`.
    SeqUsedTooLong,
    /// `cu_seqlens_q[2]` past `total_q`: sequences 1 and 2 skipped, `BAD_SEQ_LEN`.
    CuSeqlensPastEnd,
}

impl VarlenGuard {
    /// Every guard, in the order above.
    pub const ALL: [VarlenGuard; 3] = [VarlenGuard::BadBlockId, VarlenGuard::SeqUsedTooLong, VarlenGuard::CuSeqlensPastEnd];

    /// The bad entry, in a line (for reports).
    pub fn what(self) -> &'static str {
        match self {
            VarlenGuard::BadBlockId => "device block table, out-of-range block id in seq 1",
            VarlenGuard::SeqUsedTooLong => "device seqused_k, seq 1 above max_seqlen_k",
            VarlenGuard::CuSeqlensPastEnd => "device cu_seqlens_q, entry 2 past total_q",
        }
    }

    /// The status flag the guard must raise.
    pub fn flag(self) -> u32 {
        match self {
            VarlenGuard::BadBlockId => pagedattn_layout::status::BAD_BLOCK_ID,
            _ => pagedattn_layout::status::BAD_SEQ_LEN,
        }
    }
}

/// Runs a batch whose device tables hold `guard`'s bad entry; returns what is wrong: rows of the
/// good sequences must match the reference, the bad sequence's rows must be NaN where the guard
/// says so. The caller checks the status flag ([`VarlenGuard::flag`]).
pub fn check_varlen_guard(device: &Device, guard: VarlenGuard, kernel: FlashKernel) -> Result<Vec<String>> {
    let case = VarlenCase {
        dtype: DType::F16,
        heads: (8, 2),
        head_size: 128,
        block_size: 16,
        seqs: vec![(40, 100), (70, 90), (1, 50), (33, 33)],
        causal: false,
        window: (-1, -1),
        softcap: 0.0,
        alibi: false,
        seed: 99,
    };
    let i = case.inputs()?;
    let host = args(&case, &i, &i.q, &i.k, &i.v, None);
    let plan = validate(&Device::Cpu, &Tensor::nan(i.q.dtype(), i.q.shape()), None, &host)?;
    let (want, _) = crate::cpu::flash_attn::reference(&plan, &host);
    let (mut cu, mut used, mut table) = (i.cu_seqlens_q.to_i32_vec(), i.seqused_k.to_i32_vec(), i.block_table.to_i32_vec());
    let max_blocks = i.block_table.shape()[1];
    // Sequences whose rows must be NaN, and those whose rows are not judged.
    let (nan_seqs, skipped): (&[usize], &[usize]) = match guard {
        VarlenGuard::BadBlockId => {
            table[max_blocks + 2] = i.k.shape()[0] as i32 + 7;
            (&[1], &[])
        }
        VarlenGuard::SeqUsedTooLong => {
            used[1] = i.max_seqlen_k as i32 + 1;
            (&[1], &[])
        }
        VarlenGuard::CuSeqlensPastEnd => {
            cu[2] = i.q.shape()[0] as i32 + 5;
            (&[], &[1, 2])
        }
    };
    let bounds: Vec<(usize, usize)> = i.cu_seqlens_q.to_i32_vec().windows(2).map(|w| (w[0] as usize, w[1] as usize)).collect();
    let up = |t: &Tensor| device.upload(t);
    let (q, k, v) = (up(&i.q)?, up(&i.k)?, up(&i.v)?);
    let cu_d = up(&Tensor::from_i32(&[cu.len()], &cu)?)?;
    let used_d = up(&Tensor::from_i32(&[used.len()], &used)?)?;
    let table_d = up(&Tensor::from_i32(i.block_table.shape(), &table)?)?;
    let mut out = device.nan(i.q.dtype(), i.q.shape())?;
    let a = FlashAttnVarlenArgs { cu_seqlens_q: &cu_d, seqused_k: &used_d, block_table: &table_d, ..args(&case, &i, &q, &k, &v, None) };
    flash_attn_varlen_func_with(device, &mut out, None, &a, kernel)?;
    let got = out.to_cpu()?.to_f64_vec();
    let row = case.heads.0 * case.head_size;
    let mut problems = Vec::new();
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for (s, &(t0, t1)) in bounds.iter().enumerate() {
        let r = t0 * row..t1 * row;
        if nan_seqs.contains(&s) {
            let not_nan = got[r].iter().filter(|x| !x.is_nan()).count();
            if not_nan > 0 {
                problems.push(format!("seq {s}: {not_nan} outputs are not NaN"));
            }
        } else if !skipped.contains(&s) {
            g.extend_from_slice(&got[r.clone()]);
            w.extend_from_slice(&want[r]);
        }
    }
    let e = compare(&g, &w);
    if !e.passes(super::tolerance(case.dtype)) {
        problems.push(format!("good sequences: {e:?}"));
    }
    Ok(problems)
}
