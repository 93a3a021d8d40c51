//! A serving loop over the paged KV cache, as an engine drives it, checked against a float64
//! reference: requests arrive with prompts that share system prefixes, are admitted while blocks
//! last and prefilled through `flash_attn_varlen_func` (prefix-cache hits skip their cached
//! blocks), then decode one token per step through a `DecodeStep` (cache append + attention, a CUDA
//! graph on the GPU); running sequences fork (parallel sampling: copy-on-write of the shared last
//! block), are preempted to the host swap space when the GPU pool runs low (and at fixed intervals,
//! so every run swaps) and come back when it has room, and finish, freeing their blocks.
//!
//! The model is a stand-in: a token's key and value at each layer are pseudo-random numbers drawn
//! from the hash of its sequence's tokens up to it (so equal prefixes have equal caches, which is
//! what makes prefix sharing correct), and queries are random. The reference recomputes every
//! checked output from the tokens alone, in float64, without the cache or the block tables, so a
//! wrong slot, block table, copy or swap shows up as a mismatch. The block manager's counts are
//! checked every step, and at the end every block is free.
//!
//! ```sh
//! cargo run --release -p pagedattn --example serving_loop                      # CPU reference backend
//! cargo run --release -p pagedattn --example serving_loop -- --device gpu --steps 1000 \
//!     --layers 4 --heads 32 --kv-heads 8 --head-size 128 --max-batch 64 --gpu-blocks 2048
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use clap::Parser;
use pagedattn::block_manager::{BlockManager, BlockManagerConfig, Pool, SeqId, Token};
use pagedattn::layout::DType;
use pagedattn::testing::{Rng, compare, tolerance};
use pagedattn::{CacheLayout, DecodeStep, Device, FlashAttnVarlenArgs, KvCache, KvCacheConfig, Tensor, flash_attn_varlen_func};

#[derive(Parser, Debug, Clone)]
#[command(about = "Serving-loop simulation over the paged KV cache, checked against a float64 reference")]
struct Args {
    /// `cpu`, `gpu` or `auto` (the GPU when there is one).
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// `f16` or `bf16`.
    #[arg(long, default_value = "f16")]
    dtype: String,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 32)]
    head_size: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// GPU pool (blocks per layer of the device cache).
    #[arg(long, default_value_t = 120)]
    gpu_blocks: usize,
    /// Host swap space (blocks).
    #[arg(long, default_value_t = 96)]
    cpu_blocks: usize,
    /// Sequences decoded together (the decode step's batch bound).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Prompt lengths are drawn from `1..=max_prompt`, outputs from `1..=max_output`.
    #[arg(long, default_value_t = 160)]
    max_prompt: usize,
    #[arg(long, default_value_t = 96)]
    max_output: usize,
    /// Sequences whose decode output is checked against the reference each step (at one layer
    /// each; every prompt's last row is checked at one layer too).
    #[arg(long, default_value_t = 4)]
    check_per_step: usize,
    /// Decode by separate launches instead of the captured graph.
    #[arg(long)]
    eager: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the summary as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// What the engine knows of a sequence: its tokens, the running hash of its prefix at each position
/// (the stand-in model's input), and how long it may grow.
#[derive(Clone, Debug)]
struct Request {
    id: SeqId,
    tokens: Vec<Token>,
    prefix_hash: Vec<u64>,
    target_len: usize,
}

impl Request {
    fn push(&mut self, t: Token) {
        let prev = self.prefix_hash.last().copied().unwrap_or(0x5eed);
        self.prefix_hash.push(mix(prev ^ mix(t as u64 + 1)));
        self.tokens.push(t);
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stand-in model.
struct Model {
    dtype: DType,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_size: usize,
    scale: f32,
}

impl Model {
    fn round(&self, v: f32) -> f32 {
        match self.dtype {
            DType::BF16 => half::bf16::from_f32(v).to_f32(),
            _ => half::f16::from_f32(v).to_f32(),
        }
    }

    /// Key and value (`[kv_heads, head_size]` each, rounded to the dtype) of the token whose prefix
    /// hash is `h`, at `layer`.
    fn kv(&self, h: u64, layer: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(mix(h ^ mix(layer as u64 + 17)));
        let n = self.kv_heads * self.head_size;
        let k = (0..n).map(|_| self.round(rng.uniform())).collect();
        let v = (0..n).map(|_| self.round(rng.uniform())).collect();
        (k, v)
    }

    fn query(&self, rng: &mut Rng) -> Vec<f32> {
        (0..self.heads * self.head_size).map(|_| self.round(rng.uniform())).collect()
    }

    /// Float64 attention of `q` (`[heads, head_size]`) at position `pos` of `req` over its keys
    /// `0..=pos`, recomputed from the tokens.
    fn reference(&self, req: &Request, layer: usize, pos: usize, q: &[f32]) -> Vec<f64> {
        let (d, group) = (self.head_size, self.heads / self.kv_heads);
        let kv: Vec<(Vec<f32>, Vec<f32>)> = req.prefix_hash[..=pos].iter().map(|&h| self.kv(h, layer)).collect();
        let mut out = vec![0f64; self.heads * d];
        for h in 0..self.heads {
            let kh = h / group;
            let qh = &q[h * d..][..d];
            let s: Vec<f64> = kv
                .iter()
                .map(|(k, _)| qh.iter().zip(&k[kh * d..][..d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * self.scale as f64)
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = p.iter().sum();
            for (j, (_, v)) in kv.iter().enumerate() {
                for e in 0..d {
                    out[h * d + e] += p[j] / z * v[kh * d + e] as f64;
                }
            }
        }
        out
    }
}

#[derive(Default, Debug)]
struct Stats {
    steps: usize,
    admitted: usize,
    finished: usize,
    prefill_tokens: usize,
    cached_prompt_tokens: usize,
    decode_tokens: usize,
    forks: usize,
    cow_copies: usize,
    swaps_out: usize,
    swaps_in: usize,
    blocks_swapped: usize,
    recomputed: usize,
    checks: usize,
    worst_rel_l2: f64,
    worst_max_abs: f64,
    failures: usize,
    /// Time in library calls before the step's synchronization (enqueueing); whole steps without
    /// `sim`; the stand-in model's data generation and the reference checks.
    host: Duration,
    step: Duration,
    sim: Duration,
    max_running: usize,
}

struct Engine<'a> {
    device: &'a Device,
    model: Model,
    args: Args,
    bm: BlockManager,
    cache: KvCache,
    swap_space: KvCache,
    decode: DecodeStep,
    waiting: VecDeque<Request>,
    running: Vec<Request>,
    swapped: VecDeque<Request>,
    rng: Rng,
    next_id: SeqId,
    stats: Stats,
    tol: f64,
}

/// Errors of the example: the library's, the block manager's, I/O.
type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// (host µs, GPU µs) per decode step: graph replay, then separate launches.
type GraphTimes = [(f64, f64); 2];

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("serving_loop: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Res<()> {
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "gpu" => Device::Gpu(pagedattn::Gpu::new(0)?),
        "auto" => Device::auto(),
        d => return Err(format!("unknown device {d:?} (cpu, gpu or auto)").into()),
    };
    let dtype = match args.dtype.as_str() {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        d => return Err(format!("unknown dtype {d:?} (f16 or bf16)").into()),
    };
    let model = Model {
        dtype,
        layers: args.layers,
        heads: args.heads,
        kv_heads: args.kv_heads,
        head_size: args.head_size,
        scale: 1.0 / (args.head_size as f32).sqrt(),
    };
    let config = KvCacheConfig {
        num_layers: args.layers,
        num_blocks: args.gpu_blocks,
        block_size: args.block_size,
        num_kv_heads: args.kv_heads,
        head_size: args.head_size,
        dtype: dtype.into(),
        cache_dtype: dtype.into(),
        layout: CacheLayout::Flash,
    };
    let cache = KvCache::new(&device, config)?;
    let swap_space = cache.swap_space(&device, args.cpu_blocks)?;
    let max_seq_len = args.max_prompt + args.max_output;
    let decode = DecodeStep::new(&device, &cache, args.max_batch, max_seq_len, args.heads, model.scale)?;
    let bm = BlockManager::new(BlockManagerConfig {
        num_gpu_blocks: args.gpu_blocks,
        num_cpu_blocks: args.cpu_blocks,
        block_size: args.block_size,
        prefix_caching: true,
    });
    println!(
        "serving loop on {}: {} steps, {dtype:?}, {} layers, {} / {} heads of {}, blocks of {}: {} GPU + {} host, batch ≤ {}, decode {}",
        device.name(),
        args.steps,
        args.layers,
        args.heads,
        args.kv_heads,
        args.head_size,
        args.block_size,
        args.gpu_blocks,
        args.cpu_blocks,
        args.max_batch,
        if args.eager || matches!(device, Device::Cpu) { "by separate launches" } else { "by CUDA graph replay" },
    );
    let mut e = Engine {
        device: &device,
        tol: tolerance(dtype),
        rng: Rng::new(args.seed),
        model,
        bm,
        cache,
        swap_space,
        decode,
        waiting: VecDeque::new(),
        running: Vec::new(),
        swapped: VecDeque::new(),
        next_id: 0,
        stats: Stats::default(),
        args,
    };
    let t0 = Instant::now();
    for step in 0..e.args.steps {
        e.step(step)?;
        if let Err(msg) = e.bm.check() {
            return Err(format!("step {step}: block manager: {msg}").into());
        }
    }
    let wall = t0.elapsed();
    // Drain: everything still held is freed, and every block must come back.
    let ids: Vec<SeqId> = e.bm.seq_ids().collect();
    for id in ids {
        e.bm.free(id)?;
    }
    let leaked = (e.args.gpu_blocks - e.bm.num_free(Pool::Gpu), e.args.cpu_blocks - e.bm.num_free(Pool::Cpu));
    let graph = e.compare_graph()?;
    report(&e, wall, leaked, graph)?;
    let s = &e.stats;
    if s.failures > 0 || leaked != (0, 0) || s.checks == 0 {
        return Err(format!("{} of {} checks failed, blocks leaked (GPU, host) {leaked:?}", s.failures, s.checks).into());
    }
    Ok(())
}

impl Engine<'_> {
    fn sync(&self) -> pagedattn::Result<()> {
        match self.device {
            Device::Gpu(g) => g.synchronize(),
            Device::Cpu => Ok(()),
        }
    }

    fn new_request(&mut self) {
        // A few system prompts shared by many requests (prefix-cache hits), then the user's part.
        let system = self.rng.below(3) as u64;
        let len = 1 + self.rng.below(self.args.max_prompt);
        let shared = (self.args.max_prompt / 8 * (1 + system as usize)).min(len);
        self.next_id += 1;
        let mut r = Request {
            id: self.next_id,
            tokens: Vec::new(),
            prefix_hash: Vec::new(),
            target_len: len + 1 + self.rng.below(self.args.max_output),
        };
        for i in 0..len {
            let t = if i < shared { (system * 1000 + i as u64) as Token } else { self.rng.below(32000) as Token };
            r.push(t);
        }
        self.waiting.push_back(r);
    }

    fn step(&mut self, step: usize) -> Res<()> {
        let t_step = Instant::now();
        let sim0 = self.stats.sim;
        let mut host = Duration::ZERO;
        self.stats.steps += 1;
        // Arrivals.
        for _ in 0..self.rng.below(3) {
            self.new_request();
        }
        // Finished sequences free their blocks.
        let (done, keep): (Vec<Request>, Vec<Request>) = self.running.drain(..).partition(|r| r.tokens.len() >= r.target_len);
        self.running = keep;
        for r in done {
            self.bm.free(r.id)?;
            self.stats.finished += 1;
        }
        // Swapped sequences come back first, while a decode step's worth of blocks stays free.
        while let Some(r) = self.swapped.front() {
            let blocks = self.bm.block_table(r.id)?.len();
            if self.running.len() >= self.args.max_batch || blocks + self.running.len() + 1 > self.bm.num_free(Pool::Gpu) {
                break;
            }
            let r = self.swapped.pop_front().expect("front");
            let t = Instant::now();
            let pairs = self.bm.swap_in(r.id)?;
            KvCache::swap(self.device, &self.swap_space, &mut self.cache, &pairs)?;
            host += t.elapsed();
            self.stats.swaps_in += 1;
            self.stats.blocks_swapped += pairs.len();
            self.running.push(r);
        }
        // Admissions, then one prefill launch per layer for all of them. One request in four asks
        // for two samples: it forks right after its prefill.
        let (mut admitted, mut samples) = (Vec::new(), 0);
        while self.swapped.is_empty() && self.running.len() + samples < self.args.max_batch {
            let Some(r) = self.waiting.front() else { break };
            let need = r.tokens.len().div_ceil(self.args.block_size) + self.running.len() + samples + 1;
            if need > self.bm.num_free(Pool::Gpu) {
                break;
            }
            let r = self.waiting.pop_front().expect("front");
            let t = Instant::now();
            let a = self.bm.add_sequence(r.id, &r.tokens)?;
            host += t.elapsed();
            self.stats.admitted += 1;
            self.stats.cached_prompt_tokens += a.cached_tokens;
            let two = self.running.len() + samples + 2 <= self.args.max_batch && self.rng.below(4) == 0;
            samples += 1 + two as usize;
            admitted.push((r, a, two));
        }
        if !admitted.is_empty() {
            let prefilled: Vec<_> = admitted.iter().map(|(r, a, _)| (r.clone(), a.clone())).collect();
            host += self.prefill(&prefilled)?;
            for (r, _, two) in admitted {
                self.running.push(r);
                if two {
                    host += self.fork(self.running.len() - 1)?;
                }
            }
        }
        // And now and then a running sequence samples a second continuation.
        if !self.running.is_empty() && self.running.len() < self.args.max_batch && self.rng.below(8) == 0 {
            let i = self.rng.below(self.running.len());
            host += self.fork(i)?;
        }
        // Preemption: when the pool cannot take a block per running sequence, and every 50 steps.
        let mut forced = step % 50 == 49 && self.running.len() > 1;
        while !self.running.is_empty() && (self.running.len() > self.bm.num_free(Pool::Gpu) || forced) {
            forced = false;
            let r = self.running.pop().expect("non-empty");
            let t = Instant::now();
            match self.bm.swap_out(r.id) {
                Ok(pairs) => {
                    KvCache::swap(self.device, &self.cache, &mut self.swap_space, &pairs)?;
                    host += t.elapsed();
                    self.stats.swaps_out += 1;
                    self.stats.blocks_swapped += pairs.len();
                    self.swapped.push_back(r);
                }
                Err(_) => {
                    // No host room: drop its blocks and prefill it again later (recomputation).
                    self.bm.free(r.id)?;
                    host += t.elapsed();
                    self.stats.recomputed += 1;
                    self.waiting.push_front(r);
                }
            }
        }
        if !self.running.is_empty() {
            host += self.decode_step()?;
        }
        self.sync()?;
        self.stats.step += t_step.elapsed().saturating_sub(self.stats.sim - sim0);
        self.stats.host += host;
        self.stats.max_running = self.stats.max_running.max(self.running.len());
        Ok(())
    }

    /// Forks running sequence `i` (a new sample continuing from the same tokens); returns the
    /// block manager's time.
    fn fork(&mut self, i: usize) -> Res<Duration> {
        let mut child = self.running[i].clone();
        self.next_id += 1;
        child.id = self.next_id;
        let room = self.max_seq_len() - child.tokens.len();
        child.target_len = child.tokens.len() + 1 + self.rng.below(self.args.max_output.min(room).max(1));
        child.target_len = child.target_len.min(self.max_seq_len());
        let t = Instant::now();
        self.bm.fork(self.running[i].id, child.id)?;
        let host = t.elapsed();
        self.stats.forks += 1;
        self.running.push(child);
        Ok(host)
    }

    fn max_seq_len(&self) -> usize {
        self.args.max_prompt + self.args.max_output
    }

    /// One varlen launch per layer over every admitted prompt's uncached tokens (their keys and
    /// values written first); each prompt's last row is checked against the reference at one layer.
    fn prefill(&mut self, admitted: &[(Request, pagedattn::block_manager::Allocation)]) -> Res<Duration> {
        let m = &self.model;
        let (h, kvh, d) = (m.heads, m.kv_heads, m.head_size);
        let new: Vec<usize> = admitted.iter().map(|(r, a)| r.tokens.len() - a.cached_tokens).collect();
        let total: usize = new.iter().sum();
        let mut cu = vec![0i32];
        for n in &new {
            cu.push(cu.last().expect("non-empty") + *n as i32);
        }
        let lens: Vec<i32> = admitted.iter().map(|(r, _)| r.tokens.len() as i32).collect();
        let width = self.max_seq_len().div_ceil(self.args.block_size);
        let ids: Vec<SeqId> = admitted.iter().map(|(r, _)| r.id).collect();
        let table = self.bm.block_table_rows(&ids, width)?;
        let slots: Vec<i64> = admitted.iter().flat_map(|(_, a)| a.slots.iter().copied()).collect();
        let dt = m.dtype;
        let up = |t: Tensor| self.device.upload(&t);
        let cu_t = up(Tensor::from_i32(&[cu.len()], &cu)?)?;
        let lens_t = up(Tensor::from_i32(&[lens.len()], &lens)?)?;
        let table_t = up(Tensor::from_i32(&[ids.len(), width], &table)?)?;
        let slots_t = up(Tensor::from_i64(&[slots.len()], &slots)?)?;
        let mut host = Duration::ZERO;
        self.stats.prefill_tokens += total;
        // Each prompt's last row is checked at one layer (drawn per prompt).
        let check_layer: Vec<usize> = admitted.iter().map(|_| self.rng.below(m.layers)).collect();
        for layer in 0..m.layers {
            let t_sim = Instant::now();
            let (mut q, mut k, mut v) = (Vec::with_capacity(total * h * d), Vec::new(), Vec::new());
            for (r, a) in admitted {
                for p in a.cached_tokens..r.tokens.len() {
                    q.extend(m.query(&mut self.rng));
                    let (kk, vv) = m.kv(r.prefix_hash[p], layer);
                    k.extend(kk);
                    v.extend(vv);
                }
            }
            let q_t = up(Tensor::from_f32(dt, &[total, h, d], &q)?)?;
            let k_t = up(Tensor::from_f32(dt, &[total, kvh, d], &k)?)?;
            let v_t = up(Tensor::from_f32(dt, &[total, kvh, d], &v)?)?;
            let mut out = self.device.nan(dt.into(), &[total, h, d])?;
            self.stats.sim += t_sim.elapsed();
            let t = Instant::now();
            self.cache.write(self.device, layer, &k_t, &v_t, &slots_t)?;
            let args = FlashAttnVarlenArgs {
                q: &q_t,
                k: self.cache.key(layer),
                v: self.cache.value(layer),
                max_seqlen_q: *new.iter().max().expect("non-empty"),
                cu_seqlens_q: &cu_t,
                max_seqlen_k: self.max_seq_len(),
                seqused_k: &lens_t,
                softmax_scale: Some(m.scale),
                causal: true,
                window_size: (-1, -1),
                softcap: 0.0,
                alibi_slopes: None,
                block_table: &table_t,
            };
            flash_attn_varlen_func(self.device, &mut out, None, &args)?;
            host += t.elapsed();
            let t_sim = Instant::now();
            let got = out.to_cpu()?.to_f64_vec();
            for (i, (r, _)) in admitted.iter().enumerate().filter(|(i, _)| check_layer[*i] == layer) {
                let row = cu[i + 1] as usize - 1;
                let want = self.model.reference(r, layer, r.tokens.len() - 1, &q[row * h * d..][..h * d]);
                self.stats.record_check(self.tol, &got[row * h * d..][..h * d], &want, "prefill", r.id);
            }
            self.stats.sim += t_sim.elapsed();
        }
        Ok(host)
    }

    /// One token for every running sequence: block-manager appends (copy-on-write copies first),
    /// then the decode step over all layers; a few sequences checked against the reference.
    fn decode_step(&mut self) -> Res<Duration> {
        let n = self.running.len();
        let t = Instant::now();
        let mut slots = Vec::with_capacity(n);
        let mut copies = Vec::new();
        for r in self.running.iter_mut() {
            let tok = self.rng.below(32000) as Token;
            let a = self.bm.append_token(r.id, tok)?;
            r.push(tok);
            slots.push(a.slot);
            copies.extend(a.copy);
        }
        self.cache.copy_blocks(self.device, &copies)?;
        let mut host = t.elapsed();
        self.stats.cow_copies += copies.len();
        self.stats.decode_tokens += n;
        let t_sim = Instant::now();
        let m = &self.model;
        let (h, kvh, d, layers) = (m.heads, m.kv_heads, m.head_size, m.layers);
        let (mut q, mut k, mut v) = (Vec::with_capacity(layers * n * h * d), Vec::new(), Vec::new());
        for layer in 0..layers {
            for r in &self.running {
                q.extend(m.query(&mut self.rng));
                let (kk, vv) = m.kv(*r.prefix_hash.last().expect("non-empty"), layer);
                k.extend(kk);
                v.extend(vv);
            }
        }
        let dt = m.dtype;
        let q_t = Tensor::from_f32(dt, &[layers, n, h, d], &q)?;
        let k_t = Tensor::from_f32(dt, &[layers, n, kvh, d], &k)?;
        let v_t = Tensor::from_f32(dt, &[layers, n, kvh, d], &v)?;
        let ids: Vec<SeqId> = self.running.iter().map(|r| r.id).collect();
        let lens: Vec<i32> = self.running.iter().map(|r| r.tokens.len() as i32).collect();
        // The stand-in model's outputs arrive on the device (a real model writes them there:
        // `DecodeStep::qkv_mut`), so this copy is not library time.
        self.decode.set_qkv(&q_t, &k_t, &v_t)?;
        self.stats.sim += t_sim.elapsed();
        let t = Instant::now();
        let table = self.bm.block_table_rows(&ids, self.decode.max_blocks())?;
        self.decode.set_tables(&slots, &table, &lens)?;
        if self.args.eager {
            self.decode.run_eager(self.device)?;
        } else {
            self.decode.run(self.device)?;
        }
        host += t.elapsed();
        // Check a rotating few (every sequence over the run).
        let checks = self.args.check_per_step.min(n);
        let t_sim = Instant::now();
        if checks > 0 {
            let out = self.decode.output().to_cpu()?.to_f64_vec();
            let b = self.decode.batch();
            let start = self.rng.below(n);
            for c in 0..checks {
                let i = (start + c) % n;
                let layer = self.rng.below(layers);
                let r = &self.running[i];
                let qi = &q[(layer * n + i) * h * d..][..h * d];
                let want = self.model.reference(r, layer, r.tokens.len() - 1, qi);
                let got = out[(layer * b + i) * h * d..][..h * d].to_vec();
                self.stats.record_check(self.tol, &got, &want, "decode", r.id);
            }
        }
        self.stats.sim += t_sim.elapsed();
        Ok(host)
    }
}

impl Stats {
    fn record_check(&mut self, tol: f64, got: &[f64], want: &[f64], what: &str, id: SeqId) {
        let e = compare(got, want);
        let s = self;
        s.checks += 1;
        s.worst_rel_l2 = s.worst_rel_l2.max(e.rel_l2);
        s.worst_max_abs = s.worst_max_abs.max(e.max_abs);
        if !e.passes(tol) {
            s.failures += 1;
            if s.failures <= 5 {
                eprintln!("MISMATCH {what} of sequence {id} at step {}: {e:?}", s.steps);
            }
        }
    }
}

impl Engine<'_> {
    /// The decode step of a full batch at the longest length, replayed as a graph and launched op
    /// by op: (host µs, GPU µs) per step for each. GPU only.
    fn compare_graph(&mut self) -> Res<Option<GraphTimes>> {
        let Device::Gpu(gpu) = self.device else { return Ok(None) };
        let m = &self.model;
        let (b, w, bs) = (self.decode.batch(), self.decode.max_blocks(), self.args.block_size);
        let len = self.max_seq_len();
        let (layers, h, kvh, d) = (m.layers, m.heads, m.kv_heads, m.head_size);
        let mut rng = Rng::new(7);
        let vals = |n: usize, rng: &mut Rng| (0..n).map(|_| rng.uniform()).collect::<Vec<_>>();
        let q = Tensor::from_f32(m.dtype, &[layers, b, h, d], &vals(layers * b * h * d, &mut rng))?;
        let k = Tensor::from_f32(m.dtype, &[layers, b, kvh, d], &vals(layers * b * kvh * d, &mut rng))?;
        // Any blocks will do (the pool is free now): sequence i reads blocks i·w.. modulo the pool.
        let table: Vec<i32> = (0..b * w).map(|j| (j % self.args.gpu_blocks) as i32).collect();
        let slots: Vec<i64> = (0..b).map(|i| table[i * w + (len - 1) / bs] as i64 * bs as i64 + ((len - 1) % bs) as i64).collect();
        self.decode.set_inputs(&q, &k, &k, &slots, &table, &vec![len as i32; b])?;
        let mut results = [(0.0, 0.0); 2];
        for (mode, r) in results.iter_mut().enumerate() {
            let iters = 200;
            let run = |s: &mut DecodeStep| if mode == 0 { s.run(self.device) } else { s.run_eager(self.device) };
            for _ in 0..10 {
                run(&mut self.decode)?;
            }
            let ev = || gpu.context().new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT));
            let (start, end) = (ev()?, ev()?);
            gpu.synchronize()?;
            start.record(gpu.stream())?;
            let mut host = Vec::with_capacity(iters);
            for _ in 0..iters {
                let t = Instant::now();
                run(&mut self.decode)?;
                host.push(t.elapsed().as_secs_f64() * 1e6);
            }
            end.record(gpu.stream())?;
            gpu.synchronize()?;
            host.sort_by(f64::total_cmp);
            *r = (host[iters / 2], start.elapsed_ms(&end)? as f64 * 1e3 / iters as f64);
        }
        Ok(Some(results))
    }
}

fn report(e: &Engine, wall: Duration, leaked: (usize, usize), graph: Option<GraphTimes>) -> Res<()> {
    let s = &e.stats;
    let tokens = s.prefill_tokens + s.decode_tokens;
    let per_step = |d: Duration| d.as_secs_f64() * 1e6 / s.steps.max(1) as f64;
    let tok_s = tokens as f64 / s.step.as_secs_f64().max(1e-9);
    println!(
        "{} steps: {} requests admitted, {} finished; {} prefill tokens ({} from the prefix cache), {} decode tokens; \
         {} forks ({} copy-on-write copies), {} swaps out, {} in ({} blocks), {} recomputed; up to {} running",
        s.steps,
        s.admitted,
        s.finished,
        s.prefill_tokens,
        s.cached_prompt_tokens,
        s.decode_tokens,
        s.forks,
        s.cow_copies,
        s.swaps_out,
        s.swaps_in,
        s.blocks_swapped,
        s.recomputed,
        s.max_running
    );
    println!(
        "reference: {} checks, {} failed, worst rel-L2 {:.2e}, worst max-abs {:.2e} (tolerance {:.0e}); blocks leaked (GPU, host): {leaked:?}",
        s.checks, s.failures, s.worst_rel_l2, s.worst_max_abs, e.tol
    );
    println!(
        "time: {:.1} µs host per step in library calls, {:.1} µs per step (synchronized; the model stand-in and the reference checks, {:.2} s, excluded), {:.0} tokens/s; wall {:.2} s",
        per_step(s.host),
        per_step(s.step),
        s.sim.as_secs_f64(),
        tok_s,
        wall.as_secs_f64()
    );
    if let Some([(gh, gg), (eh, eg)]) = graph {
        println!(
            "decode step ({} sequences × {} tokens, {} layers): graph replay {gh:.1} µs host / {gg:.1} µs GPU; separate launches {eh:.1} µs host / {eg:.1} µs GPU",
            e.decode.batch(),
            e.max_seq_len(),
            e.model.layers
        );
    }
    if let Some(path) = &e.args.json {
        let g = graph.map(
            |[(gh, gg), (eh, eg)]| serde_json::json!({"graph_host_us": gh, "graph_gpu_us": gg, "eager_host_us": eh, "eager_gpu_us": eg}),
        );
        let j = serde_json::json!({
            "device": e.device.name(), "args": format!("{:?}", e.args), "steps": s.steps, "admitted": s.admitted,
            "finished": s.finished, "prefill_tokens": s.prefill_tokens, "cached_prompt_tokens": s.cached_prompt_tokens,
            "decode_tokens": s.decode_tokens, "forks": s.forks, "cow_copies": s.cow_copies, "swaps_out": s.swaps_out,
            "swaps_in": s.swaps_in, "blocks_swapped": s.blocks_swapped, "recomputed": s.recomputed, "checks": s.checks,
            "failures": s.failures, "worst_rel_l2": s.worst_rel_l2, "worst_max_abs": s.worst_max_abs,
            "host_us_per_step": per_step(s.host), "step_us": per_step(s.step), "tokens_per_s": tok_s,
            "leaked_gpu": leaked.0, "leaked_host": leaked.1, "decode_graph": g,
        });
        std::fs::write(path, serde_json::to_string_pretty(&j)?)?;
    }
    Ok(())
}
