#!/usr/bin/env python3
"""Decode benchmark of the `pagedattn` Python binding against FlashInfer and torch SDPA.

Runs on a CUDA machine with torch and `pagedattn` importable; FlashInfer is optional (its rows are
skipped, with the reason printed, when the import or its JIT compile fails). Writes one JSON file
(--out) and prints Markdown tables (also written to --md when given).

Part 1, "host": the CPU cost of one call, i.e. what a Python caller (vLLM) pays per op per layer.
  Each op is called back to back in bursts (default 30 bursts of 100 calls, in 3 rounds that
  interleave the ops so that a slow spell of a shared machine spreads over all rows) with no
  synchronization inside a burst; torch.cuda.synchronize() runs between bursts, outside the timed window. Timed with
  time.perf_counter_ns() around the burst; the figure is (burst time / calls), median and min over
  bursts. The garbage collector is off while timing. Every row goes through the same Python closure
  call, so the `python loop + closure` row is the floor of the method and `torch.add(out=)` on a
  16-element tensor is the floor of any torch op.
  Calls only enqueue work (the launch queue holds far more than one burst's kernels), so the host
  figure is the enqueue cost even when the GPU is slower. To show which side bounds a burst, each row
  also gives the GPU time per call of the same burst run back to back: the stream is first held by a
  spin kernel (torch.cuda._sleep) long enough for the whole burst to be enqueued, then events around
  the burst measure pure device time. A row whose GPU time per call is larger than its host time is
  marked GPU-bound (its host figure is still right, but a real decode loop of that op would wait for
  the GPU, not the CPU).

Part 2, "grid": GPU time of one decode step on the grid batch x context (default {1,16,64,256} x
  {512,4096,16384}), 32 query heads, 8 KV heads, head 128, block/page 16, every sequence at the full
  context, random data (torch.randn) and random block tables (a permutation of all blocks).
  All layouts hold the same values: the flash/NHD caches [num_blocks, block, kv_heads, head] (used by
  our flash_attn_varlen_func and by FlashInfer) are converted by permute + contiguous into vLLM's
  paged-attention layout (key [num_blocks, kv_heads, head/x, block, x], value
  [num_blocks, kv_heads, head, block]); SDPA gets the pages gathered into dense
  [batch, kv_heads, context, head] once, outside all timing.
  Timing: CUDA events around one call, after warm-up; median (and min) of --runs runs.
    cold: before each run a buffer of 4x the L2 size is written (buf.zero_()), outside the events;
    hot:  no flush, the previous run's data is whatever stays in L2.
  Before each timed call a spin kernel (torch.cuda._sleep) holds the stream for
  max(--cover-us, 2 x the call's measured host time + 20 µs), so the call's own host overhead
  (Python wrapper, argument checks) is enqueued while the GPU is still busy and is NOT in the
  measured time; the events measure device time only. The spin kernel touches no memory, so it
  does not warm L2. (Host overhead is part 1's subject.)
  GB/s = KV bytes read (batch x context x kv_heads x head x 2 bytes x 2 for K and V) / cold time.
  fi/ours = FlashInfer cold time / our cold time (> 1: ours is faster).
  Correctness, once per shape before timing: every output against an fp32 reference computed from the
  same pages (max-abs and relative-L2 differences), plus ours-v1 vs FlashInfer and ours-v1 vs SDPA
  max-abs. A relative-L2 above the tolerance (f16 1e-3, bf16 8e-3) or a non-finite output is flagged
  "MISMATCH" in the table and `ok: false` in the JSON; nothing is hidden.
  Memory: both our layouts need 2 x KV bytes (256 x 16384 is 17 GB per layout); a shape whose layouts
  would exceed --max-gb is skipped with a note; SDPA is skipped where its dense copy exceeds
  --sdpa-max-gb or does not fit beside the layouts.

FlashInfer on the GPU machine (no network): python/bench/flashinfer_wheels.sh [--aot] puts
flashinfer-python 0.6.13 + apache-tvm-ffi (+ a flashinfer_jit_cache wheel with the decode/prefill
modules prebuilt for sm_90a) into .whl/; install them with pip --target next to pagedattn. Without
the jit-cache wheel, FlashInfer JIT-compiles its decode module at the first plan() of each dtype
(nvcc + ninja; the compile time is printed and stored in meta.flashinfer_first_plan_s).

Example (GPU machine, wheels installed under /tmp/site):
  PYTHONPATH=/tmp/site FLASHINFER_WORKSPACE_BASE=/tmp/fi-ws PYTHONUNBUFFERED=1 \
    python3 python/bench/bench_ops.py --dtype f16,bf16 --out bench_ops.json --md bench_ops.md
"""

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback

# ---------------------------------------------------------------------------------------------------
# Fixed problem geometry (the speed issue's Llama-3-8B-like decode shape).
NUM_HEADS = 32
NUM_KV_HEADS = 8
HEAD_SIZE = 128
BLOCK_SIZE = 16
PARTITION_SIZE = 512  # vLLM's paged_attention_v2 partition size
DTYPES = {"f16": "float16", "bf16": "bfloat16"}
# Relative-L2 tolerances against the fp32 reference (the project's verify tolerances).
REL_L2_TOL = {"f16": 1e-3, "bf16": 8e-3}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for what is timed and how.")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--out", default="bench_ops.json", help="JSON output path")
    p.add_argument("--md", default=None, help="also write the Markdown tables to this path")
    p.add_argument("--dtype", default="f16",
                   help="comma list of f16,bf16 (default f16); the host part uses the first")
    p.add_argument("--parts", default="host,grid", help="comma list of host,grid")
    # host part
    p.add_argument("--host-batches", type=ints, default=[1, 16])
    p.add_argument("--host-context", type=int, default=512)
    p.add_argument("--bursts", type=int, default=30, help="host part: bursts per op")
    p.add_argument("--burst-size", type=int, default=100, help="host part: calls per burst")
    p.add_argument("--host-warmup", type=int, default=50, help="host part: warm-up calls per op")
    p.add_argument("--host-rounds", type=int, default=3,
                   help="host part: rounds that interleave the ops (bursts are split over them)")
    # grid part
    p.add_argument("--batches", type=ints, default=[1, 16, 64, 256])
    p.add_argument("--contexts", type=ints, default=[512, 4096, 16384])
    p.add_argument("--runs", type=int, default=30, help="grid: timed runs per mode (median)")
    p.add_argument("--warmup", type=int, default=5, help="grid: warm-up calls per op and shape")
    p.add_argument("--cover-us", type=float, default=150.0,
                   help="spin-kernel time before each timed call (hides host overhead); 0: none")
    p.add_argument("--max-gb", type=float, default=None,
                   help="cap on both cache layouts (+ SDPA dense copy) per shape, GB; "
                        "default: free GPU memory at start minus 6 GB")
    p.add_argument("--sdpa-max-gb", type=float, default=20.0, help="cap on SDPA's dense K+V copy")
    p.add_argument("--no-sdpa", action="store_true", help="skip the SDPA rows")
    # FlashInfer
    p.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer rows")
    p.add_argument("--fi-tensor-cores", action="store_true",
                   help="also time FlashInfer decode with use_tensor_cores=True (its fa2 prefill "
                        "kernels: prebuilt in the carried jit-cache wheel, else ~1-2 min JIT per "
                        "dtype)")
    p.add_argument("--fi-workspace-mb", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.dtype = [d for d in a.dtype.split(",") if d]
    for d in a.dtype:
        if d not in DTYPES:
            p.error(f"--dtype: unknown {d!r} (use f16, bf16)")
    a.parts = [x for x in a.parts.split(",") if x]
    for x in a.parts:
        if x not in ("host", "grid"):
            p.error(f"--parts: unknown {x!r} (use host, grid)")
    return a


# ---------------------------------------------------------------------------------------------------
# Imports. FlashInfer's JIT needs `ninja` on PATH and reads its environment at import time, so this
# runs before `import flashinfer`.

def _prepare_flashinfer_env():
    """Make the JIT find ninja and nvcc when the venv is not activated; set no FlashInfer policy."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI `ninja` package ships the binary

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except Exception:
            venv_bin = os.path.dirname(sys.executable)
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        nvcc = shutil.which("nvcc")
        if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def import_flashinfer(disabled):
    if disabled:
        return None, "disabled by --no-flashinfer"
    _prepare_flashinfer_env()
    try:
        import flashinfer  # noqa: F401

        return flashinfer, None
    except Exception as e:  # ImportError, or a dependency failing at import time
        return None, f"import flashinfer failed: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------------
# Small helpers.

def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt(x, nd=1):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{nd}f}"


def md_table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def short_err(e):
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 400 else s[:400] + " ..."


class Gpu:
    """Device facts, the L2 flush buffer and the spin kernel used to hide host overhead."""

    def __init__(self, torch, cover_us):
        self.torch = torch
        self.dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(self.dev)
        self.name = props.name
        self.sm_count = props.multi_processor_count
        self.l2_bytes = int(props.L2_cache_size)
        self.total_mem = int(props.total_memory)
        # 4x L2, written before each cold run (outside the events).
        self.flush_buf = torch.empty(max(4 * self.l2_bytes, 1 << 20), dtype=torch.uint8,
                                     device=self.dev)
        self.cycles_per_us = self._calibrate_sleep()
        self.cover_us = cover_us if self.cycles_per_us else 0.0

    def _calibrate_sleep(self):
        torch = self.torch
        if not hasattr(torch.cuda, "_sleep"):
            return None
        torch.cuda._sleep(1000)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 2_000_000
        best = None
        for _ in range(3):
            s.record()
            torch.cuda._sleep(cycles)
            e.record()
            torch.cuda.synchronize()
            us = s.elapsed_time(e) * 1e3
            best = us if best is None else min(best, us)
        return cycles / best if best and best > 0 else None

    def flush(self):
        self.flush_buf.zero_()

    def spin(self, us):
        """Hold the current stream for about `us` microseconds (no memory traffic)."""
        if us > 0 and self.cycles_per_us:
            self.torch.cuda._sleep(int(us * self.cycles_per_us))


# ---------------------------------------------------------------------------------------------------
# Timing.

def host_time(torch, fn, bursts, burst_size, warmup):
    """CPU time per call: back-to-back calls, no sync inside a burst. Returns per-call µs per burst."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_call = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(bursts):
            torch.cuda.synchronize()  # GPU idle and queue empty: outside the timed window
            t0 = time.perf_counter_ns()
            for _ in range(burst_size):
                fn()
            t1 = time.perf_counter_ns()
            per_call.append((t1 - t0) / burst_size / 1e3)
        torch.cuda.synchronize()
    finally:
        if gc_was_enabled:
            gc.enable()
    return per_call


def device_time_of_burst(torch, gpu, fn, burst_size, host_us_per_call, reps=5):
    """GPU time per call of a burst run back to back (the stream is held until it is all enqueued)."""
    if not gpu.cycles_per_us:
        return None
    cover = host_us_per_call * burst_size * 2.0 + 500.0
    res = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        gpu.spin(cover)
        s.record()
        for _ in range(burst_size):
            fn()
        e.record()
        torch.cuda.synchronize()
        res.append(s.elapsed_time(e) * 1e3 / burst_size)
    return med(res)


def gpu_time(torch, gpu, fn, runs, warmup):
    """Device time of one call, cold and hot L2. Returns {mode: {median_us, min_us, all_us}, cover_us}."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    # The spin before each timed call must outlast the call's host overhead; measure that overhead
    # (10 calls back to back, no sync) and cover at least twice it.
    t0 = time.perf_counter_ns()
    for _ in range(10):
        fn()
    host_us = (time.perf_counter_ns() - t0) / 10 / 1e3
    torch.cuda.synchronize()
    cover = max(gpu.cover_us, 2.0 * host_us + 20.0) if gpu.cover_us > 0 else 0.0
    out = {"cover_us": cover, "host_us_per_call": host_us}
    for mode in ("cold", "hot"):
        if mode == "hot":
            fn()  # the cold runs' flushes left L2 full of the flush buffer: load the working set
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(runs)]
        for s, e in ev:
            if mode == "cold":
                gpu.flush()  # before the start event: not timed
            gpu.spin(cover)  # host overhead of fn() is hidden behind this (not timed)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        ts = [s.elapsed_time(e) * 1e3 for s, e in ev]
        out[mode] = {"median_us": med(ts), "min_us": min(ts), "all_us": ts}
    return out


# ---------------------------------------------------------------------------------------------------
# Problem construction. All layouts hold the same values.

class Case:
    """One decode problem: batch B, context L, every sequence at the full context."""

    def __init__(self, torch, dev, dtype, B, L, seed, want_sdpa, sdpa_chunk_bytes=1 << 30):
        self.torch, self.B, self.L, self.dtype = torch, B, L, dtype
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        esize = torch.tensor([], dtype=dtype).element_size()
        self.blocks_per_seq = nb = (L + BLOCK_SIZE - 1) // BLOCK_SIZE
        self.num_blocks = num_blocks = B * nb
        self.scale = 1.0 / math.sqrt(HEAD_SIZE)
        self.kv_bytes = B * L * NUM_KV_HEADS * HEAD_SIZE * esize * 2  # K and V actually read

        self.q = torch.randn(B, NUM_HEADS, HEAD_SIZE, dtype=dtype, device=dev, generator=g)
        # Flash / NHD layout: [num_blocks, block_size, num_kv_heads, head_size].
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
        self.k_flash = torch.randn(shape, dtype=dtype, device=dev, generator=g)
        self.v_flash = torch.randn(shape, dtype=dtype, device=dev, generator=g)
        # Random block tables: a permutation of all blocks, nb per sequence.
        perm = torch.randperm(num_blocks, device=dev, generator=g)
        self.block_tables = perm.view(B, nb).to(torch.int32).contiguous()
        self.seq_lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(B + 1, dtype=torch.int32, device=dev)

        # vLLM layout, from the same values.
        #   key_cache[b, h, d // x, s, d % x] = k_flash[b, s, h, d], x = 16 bytes / element size
        #   value_cache[b, h, d, s]           = v_flash[b, s, h, d]
        x = 16 // esize
        self.key_cache = (self.k_flash.view(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE // x, x)
                          .permute(0, 2, 3, 1, 4).contiguous())
        self.value_cache = self.v_flash.permute(0, 2, 3, 1).contiguous()
        self.k_scale = torch.ones(1, dtype=torch.float32, device=dev)
        self.v_scale = torch.ones(1, dtype=torch.float32, device=dev)

        # paged_attention_v2 workspace, as vLLM sizes it.
        self.max_num_partitions = (L + PARTITION_SIZE - 1) // PARTITION_SIZE
        P = self.max_num_partitions
        self.exp_sums = torch.empty(B, NUM_HEADS, P, dtype=torch.float32, device=dev)
        self.max_logits = torch.empty(B, NUM_HEADS, P, dtype=torch.float32, device=dev)
        self.tmp_out = torch.empty(B, NUM_HEADS, P, HEAD_SIZE, dtype=dtype, device=dev)

        # Outputs, one per implementation (so each can be checked after the fact).
        self.out_v1 = torch.empty_like(self.q)
        self.out_v2 = torch.empty_like(self.q)
        self.out_fa = torch.empty_like(self.q)
        self.out_fi = torch.empty_like(self.q)
        self.out_fi_tc = torch.empty_like(self.q)

        # FlashInfer page description (CSR over the same block tables). indptr and last_page_len
        # stay on the host, as vLLM passes them; indices live on the GPU.
        self.fi_indptr = torch.arange(B + 1, dtype=torch.int32) * nb
        self.fi_indices = self.block_tables.flatten()
        last = L - (nb - 1) * BLOCK_SIZE
        self.fi_last_page_len = torch.full((B,), last, dtype=torch.int32)

        # SDPA dense copy [B, kv_heads, L, head], gathered chunk by chunk (no 2x peak).
        self.k_dense = self.v_dense = None
        if want_sdpa:
            self.k_dense = self._gather_dense(self.k_flash, sdpa_chunk_bytes)
            self.v_dense = self._gather_dense(self.v_flash, sdpa_chunk_bytes)
        self.q4 = self.q.unsqueeze(2)  # [B, H, 1, D] view for SDPA

    def _gather_dense(self, cache, chunk_bytes):
        torch, B, L, nb = self.torch, self.B, self.L, self.blocks_per_seq
        dense = torch.empty(B, NUM_KV_HEADS, L, HEAD_SIZE, dtype=self.dtype, device=cache.device)
        per_seq = nb * BLOCK_SIZE * NUM_KV_HEADS * HEAD_SIZE * cache.element_size()
        c = max(1, chunk_bytes // per_seq)
        for i in range(0, B, c):
            j = min(B, i + c)
            pages = cache[self.block_tables[i:j].long()]  # [c, nb, block, kv_heads, head]
            dense[i:j] = pages.reshape(j - i, nb * BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)[:, :L] \
                .transpose(1, 2)
        return dense

    def reference(self, chunk_bytes=1 << 30):
        """fp32 attention from the flash-layout pages (independent of every implementation)."""
        torch, B, L, nb = self.torch, self.B, self.L, self.blocks_per_seq
        G = NUM_HEADS // NUM_KV_HEADS  # query head h reads KV head h // G (vLLM / GQA convention)
        out = torch.empty(B, NUM_HEADS, HEAD_SIZE, dtype=torch.float32, device=self.q.device)
        per_seq = L * NUM_KV_HEADS * HEAD_SIZE * (4 + 2) * 2 + NUM_HEADS * L * 4 * 2
        c = max(1, chunk_bytes // per_seq)
        for i in range(0, B, c):
            j = min(B, i + c)
            idx = self.block_tables[i:j].long()
            k = self.k_flash[idx].reshape(j - i, nb * BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)[:, :L]
            v = self.v_flash[idx].reshape(j - i, nb * BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)[:, :L]
            k = k.float().permute(0, 2, 3, 1)  # [c, kvh, D, L]
            v = v.float().permute(0, 2, 1, 3)  # [c, kvh, L, D]
            qf = self.q[i:j].float().view(j - i, NUM_KV_HEADS, G, HEAD_SIZE)
            s = torch.matmul(qf, k) * self.scale  # [c, kvh, G, L]
            p = torch.softmax(s, dim=-1)
            out[i:j] = torch.matmul(p, v).reshape(j - i, NUM_HEADS, HEAD_SIZE)
        return out

    def free(self):
        for k in list(self.__dict__):
            if k != "torch":
                setattr(self, k, None)


def diff(torch, out, ref):
    """max-abs and relative-L2 difference of `out` (any float dtype) against `ref` (fp32)."""
    o = out.float()
    finite = bool(torch.isfinite(o).all().item())
    d = o - ref
    max_abs = d.abs().max().item()
    rel_l2 = (d.norm() / ref.norm()).item()
    return {"finite": finite, "max_abs": max_abs, "rel_l2": rel_l2}


# ---------------------------------------------------------------------------------------------------
# Implementations: each returns a zero-argument closure that runs one decode step.

def make_impls(torch, F, pa, case, fi_wrappers, want_sdpa):
    ops, varlen = pa["ops"], pa["flash_attn_varlen_func"]
    c = case
    impls = {}

    def v1():
        ops.paged_attention_v1(c.out_v1, c.q, c.key_cache, c.value_cache, NUM_KV_HEADS, c.scale,
                               c.block_tables, c.seq_lens, BLOCK_SIZE, c.L, None, "auto",
                               c.k_scale, c.v_scale)

    def v2():
        ops.paged_attention_v2(c.out_v2, c.exp_sums, c.max_logits, c.tmp_out, c.q, c.key_cache,
                               c.value_cache, NUM_KV_HEADS, c.scale, c.block_tables, c.seq_lens,
                               BLOCK_SIZE, c.L, None, "auto", c.k_scale, c.v_scale)

    def fa():
        varlen(c.q, c.k_flash, c.v_flash, max_seqlen_q=1, cu_seqlens_q=c.cu_seqlens_q,
               max_seqlen_k=c.L, seqused_k=c.seq_lens, softmax_scale=c.scale, causal=True,
               block_table=c.block_tables, out=c.out_fa)

    impls["ours paged_attention_v1"] = (v1, lambda: c.out_v1)
    impls["ours paged_attention_v2"] = (v2, lambda: c.out_v2)
    impls["ours flash_attn_varlen_func"] = (fa, lambda: c.out_fa)

    for label, (w, out_attr) in fi_wrappers.items():
        def fi(w=w, out_attr=out_attr):
            w.run(c.q, (c.k_flash, c.v_flash), out=getattr(c, out_attr))
        impls[label] = (fi, lambda out_attr=out_attr: getattr(c, out_attr))

    if want_sdpa and c.k_dense is not None:
        holder = {}

        def sdpa():
            holder["o"] = F.scaled_dot_product_attention(c.q4, c.k_dense, c.v_dense,
                                                         scale=c.scale, enable_gqa=True)
        impls["torch sdpa (dense copy)"] = (sdpa, lambda: holder["o"].squeeze(2))
    return impls


class FlashInfer:
    """Owns FlashInfer wrappers (one per variant) and plans them per shape."""

    def __init__(self, torch, fi, dev, workspace_mb, tensor_cores):
        self.torch, self.fi = torch, fi
        self.variants = {"flashinfer decode": (False, "out_fi")}
        if tensor_cores:
            self.variants["flashinfer decode (tensor cores)"] = (True, "out_fi_tc")
        self.wrappers = {}
        for label, (tc, _) in self.variants.items():
            # Own float workspace per wrapper, zeroed before first use as FlashInfer asks.
            ws = torch.zeros(workspace_mb << 20, dtype=torch.uint8, device=dev)
            self.wrappers[label] = fi.BatchDecodeWithPagedKVCacheWrapper(
                ws, "NHD", use_tensor_cores=tc)
        self.first_plan_s = {}  # (label, dtype) -> seconds of the first plan (JIT compile or load)
        self.failed = {}  # label -> reason

    def plan(self, case, dname):
        """Plan every live variant for `case`; returns {label: (wrapper, out_attr)}."""
        ready = {}
        for label, (tc, out_attr) in self.variants.items():
            if label in self.failed:
                continue
            w = self.wrappers[label]
            t0 = time.perf_counter()
            try:
                self._plan(w, case)
                self.torch.cuda.synchronize()
            except Exception as e:
                self.failed[label] = f"plan failed ({dname}): {short_err(e)}"
                print(f"[flashinfer] {label}: {self.failed[label]}", flush=True)
                traceback.print_exc()
                continue
            key = f"{label} {dname}"
            if key not in self.first_plan_s:
                self.first_plan_s[key] = time.perf_counter() - t0
                print(f"[flashinfer] {label} {dname}: first plan (JIT compile or cache load) "
                      f"{self.first_plan_s[key]:.1f} s", flush=True)
            ready[label] = (w, out_attr)
        return ready

    def _plan(self, w, c):
        w.plan(c.fi_indptr, c.fi_indices, c.fi_last_page_len, NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE,
               BLOCK_SIZE, pos_encoding_mode="NONE", q_data_type=c.dtype, kv_data_type=c.dtype,
               sm_scale=c.scale)


# ---------------------------------------------------------------------------------------------------
# Part 1: host time per call.

def run_host_part(args, torch, F, pa, gpu, fi_state, dnames, results, notes):
    rows = []
    dev = gpu.dev
    # Calibration floors (independent of shape and dtype).
    a = torch.ones(16, device=dev)
    b = torch.ones(16, device=dev)
    cc = torch.empty(16, device=dev)
    floors = [("python loop + closure (no GPU work)", lambda: None),
              ("torch.add(a, b, out=c), 16 floats", lambda: torch.add(a, b, out=cc))]
    for label, fn in floors:
        rows.append(_host_row(args, torch, gpu, label, fn, None, None, None))

    dname = dnames[0]
    dtype = getattr(torch, DTYPES[dname])
    for B in args.host_batches:
        L = args.host_context
        case = Case(torch, dev, dtype, B, L, args.seed + 1000 + B, want_sdpa=not args.no_sdpa)
        fi_ready = fi_state.plan(case, dname) if fi_state else {}
        impls = make_impls(torch, F, pa, case, fi_ready, not args.no_sdpa)
        # Rounds interleave the ops (each round times every op for bursts / rounds bursts), so a
        # slow spell of the machine (a shared VM) spreads over all rows instead of hitting one.
        per = {label: [] for label in impls}
        rounds = max(1, args.host_rounds)
        for _ in range(rounds):
            for label, (fn, _) in impls.items():
                try:
                    per[label] += host_time(torch, fn, max(1, args.bursts // rounds), args.burst_size,
                                            args.host_warmup)
                except Exception as e:
                    per[label] = e
        for label, (fn, _) in impls.items():
            rows.append(_host_row(args, torch, gpu, label, fn, dname, B, L, per=per[label]))
        # FlashInfer's plan() runs once per decode step (shared by all layers): shown apart.
        if fi_state:
            for label in fi_ready:
                w = fi_state.wrappers[label]
                rows.append(_host_row(args, torch, gpu, label + ": plan() (once per step)",
                                      lambda w=w, c=case: fi_state._plan(w, c), dname, B, L,
                                      device_time=False))
        case.free()
        del case, impls
        torch.cuda.empty_cache()
    results["host"] = rows
    if fi_state is None:
        notes.append("host: FlashInfer rows skipped: " + results["meta"]["flashinfer_reason"])
    else:
        for label, why in fi_state.failed.items():
            notes.append(f"host: {label} rows skipped: {why}")


def _host_row(args, torch, gpu, label, fn, dname, B, L, device_time=True, per=None):
    row = {"op": label, "dtype": dname, "batch": B, "context": L}
    try:
        if isinstance(per, Exception):
            raise per
        if per is None:
            per = host_time(torch, fn, args.bursts, args.burst_size, args.host_warmup)
        row.update(host_median_us=med(per), host_min_us=min(per), host_all_us=per)
        if device_time:
            row["gpu_us_per_call"] = device_time_of_burst(torch, gpu, fn, args.burst_size,
                                                          row["host_median_us"])
        else:
            row["gpu_us_per_call"] = None
        g = row["gpu_us_per_call"]
        row["bound"] = None if g is None else ("GPU" if g >= row["host_median_us"] else "host")
    except Exception as e:
        row["error"] = short_err(e)
        traceback.print_exc()
    print(f"[host] {label:55s} B={B} L={L}: "
          + (f"{row['host_median_us']:.2f} µs/call (min {row['host_min_us']:.2f}), "
             f"GPU {fmt(row.get('gpu_us_per_call'), 2)} µs/call"
             if "error" not in row else "ERROR " + row["error"]), flush=True)
    return row


def host_markdown(rows, args):
    hdr = ["op", "dtype", "batch × ctx", "host µs/call (median)", "host µs/call (min)",
           "GPU µs/call (burst)", "bound by"]
    body = []
    for r in rows:
        shape = "—" if r["batch"] is None else f"{r['batch']} × {r['context']}"
        if "error" in r:
            body.append([r["op"], r["dtype"] or "—", shape, "ERROR", r["error"], "", ""])
            continue
        body.append([r["op"], r["dtype"] or "—", shape, fmt(r["host_median_us"], 2),
                     fmt(r["host_min_us"], 2), fmt(r.get("gpu_us_per_call"), 2),
                     r.get("bound") or "—"])
    head = (f"### Host time per call ({args.bursts} bursts × {args.burst_size} calls, "
            "no sync inside a burst; median and min over bursts)\n\n")
    tail = ("\n\n`GPU µs/call (burst)`: device time per call of the same burst run back to back. "
            "Where it exceeds the host time the row is GPU-bound: the host figure is still the "
            "enqueue cost, but a loop of that op alone would wait on the GPU.")
    return head + md_table(hdr, body) + tail


# ---------------------------------------------------------------------------------------------------
# Part 2: GPU time on the decode grid.

def run_grid_part(args, torch, F, pa, gpu, fi_state, dnames, results, notes):
    rows = []
    max_bytes = args.max_gb * 1e9
    for dname in dnames:
        dtype = getattr(torch, DTYPES[dname])
        esize = torch.tensor([], dtype=dtype).element_size()
        for B in args.batches:
            for L in args.contexts:
                kv_bytes = B * L * NUM_KV_HEADS * HEAD_SIZE * esize * 2
                layouts_bytes = 2 * kv_bytes  # flash/NHD + vLLM layout
                shape = f"{dname} {B} x {L}"
                if layouts_bytes > max_bytes:
                    msg = (f"grid: skipped {shape}: both layouts need {layouts_bytes / 1e9:.2f} GB "
                           f"> --max-gb {args.max_gb:.2f}")
                    print(msg, flush=True)
                    notes.append(msg)
                    continue
                want_sdpa = not args.no_sdpa
                if want_sdpa and (kv_bytes > args.sdpa_max_gb * 1e9
                                  or layouts_bytes + kv_bytes > max_bytes):
                    want_sdpa = False
                    msg = (f"grid: SDPA skipped at {shape}: dense copy {kv_bytes / 1e9:.2f} GB "
                           f"(cap {args.sdpa_max_gb} GB; layouts + dense must fit --max-gb "
                           f"{args.max_gb:.1f})")
                    print(msg, flush=True)
                    notes.append(msg)
                rows.extend(_grid_shape(args, torch, F, pa, gpu, fi_state, dname, dtype, B, L,
                                        want_sdpa, notes))
                gc.collect()
                torch.cuda.empty_cache()
    results["grid"] = rows
    if fi_state is None:
        notes.append("grid: FlashInfer rows skipped: " + results["meta"]["flashinfer_reason"])
    elif fi_state.failed:
        for label, why in fi_state.failed.items():
            notes.append(f"grid: {label} rows skipped: {why}")


def _grid_shape(args, torch, F, pa, gpu, fi_state, dname, dtype, B, L, want_sdpa, notes):
    t0 = time.perf_counter()
    seed = args.seed + 7919 * B + L + (0 if dname == "f16" else 1)
    try:
        case = Case(torch, gpu.dev, dtype, B, L, seed, want_sdpa)
    except torch.cuda.OutOfMemoryError as e:
        msg = f"grid: skipped {dname} {B} x {L}: out of memory building the caches ({e})"
        print(msg, flush=True)
        notes.append(msg)
        return []
    fi_ready = fi_state.plan(case, dname) if fi_state else {}
    impls = make_impls(torch, F, pa, case, fi_ready, want_sdpa)

    # --- correctness, once per shape, before any timing ----------------------------------------
    try:
        ref = case.reference()
    except Exception as e:  # e.g. out of memory: time anyway, say the check did not run
        ref = None
        notes.append(f"grid: no fp32 reference at {dname} {B} x {L}: {short_err(e)}")
        traceback.print_exc()
    outs, errs = {}, {}
    for label, (fn, get_out) in impls.items():
        try:
            fn()
            torch.cuda.synchronize()
            outs[label] = get_out().clone()
        except Exception as e:
            errs[label] = short_err(e)
            notes.append(f"grid: {label} failed at {dname} {B} x {L}: {errs[label]}")
            traceback.print_exc()
    status_err = None
    if pa.get("check_status"):
        try:
            pa["check_status"]()
        except Exception as e:  # DeviceDataError: kernels flagged bad device-side data
            status_err = short_err(e)
            notes.append(f"grid: check_status after {dname} {B} x {L}: {status_err}")
    checks = {label: diff(torch, o, ref) for label, o in outs.items()} if ref is not None else {}
    pair = {}
    v1 = outs.get("ours paged_attention_v1")
    for other in ("flashinfer decode", "torch sdpa (dense copy)"):
        if v1 is not None and other in outs:
            pair[f"v1 vs {other}"] = (v1.float() - outs[other].float()).abs().max().item()
    tol = REL_L2_TOL[dname]
    msg = [f"[check] {dname} {B} x {L}:"]
    for label, d in checks.items():
        ok = d["finite"] and d["rel_l2"] <= tol
        d["ok"] = ok
        msg.append(f"  {label}: max_abs {d['max_abs']:.3e} rel_l2 {d['rel_l2']:.2e}"
                   + ("" if ok else "  <-- MISMATCH"))
        if not ok:
            notes.append(f"MISMATCH {dname} {B} x {L} {label}: finite={d['finite']} "
                         f"max_abs={d['max_abs']:.3e} rel_l2={d['rel_l2']:.2e} (tol {tol:.0e})")
    for k, v in pair.items():
        msg.append(f"  {k}: max_abs {v:.3e}")
    print("\n".join(msg), flush=True)
    del outs, ref

    # --- timing --------------------------------------------------------------------------------
    rows = []
    base = {"dtype": dname, "batch": B, "context": L, "kv_bytes": case.kv_bytes,
            "max_num_partitions": case.max_num_partitions, "pairwise_max_abs": pair,
            "check_status_error": status_err}
    for label, (fn, _) in impls.items():
        row = dict(base, impl=label)
        if label in errs:
            row["error"] = errs[label]
            rows.append(row)
            continue
        row["check"] = checks.get(label)
        try:
            t = gpu_time(torch, gpu, fn, args.runs, args.warmup)
            row["cold"], row["hot"] = t["cold"], t["hot"]
            row["cover_us"], row["host_us_per_call"] = t["cover_us"], t["host_us_per_call"]
            row["gbps_cold"] = case.kv_bytes / t["cold"]["median_us"] / 1e3
        except Exception as e:
            row["error"] = short_err(e)
            traceback.print_exc()
        rows.append(row)
    fi_row = next((r for r in rows if r["impl"] == "flashinfer decode" and "cold" in r), None)
    for r in rows:
        if r["impl"].startswith("ours") and "cold" in r and fi_row is not None:
            r["fi_over_ours_cold"] = fi_row["cold"]["median_us"] / r["cold"]["median_us"]
            r["fi_over_ours_hot"] = fi_row["hot"]["median_us"] / r["hot"]["median_us"]
    for r in rows:
        if "cold" in r:
            print(f"[grid] {dname} {B:>3} x {L:>5} {r['impl']:34s} cold {r['cold']['median_us']:9.1f}"
                  f" µs  hot {r['hot']['median_us']:9.1f} µs  {r['gbps_cold']:7.0f} GB/s"
                  + (f"  fi/ours {r['fi_over_ours_cold']:.2f}" if "fi_over_ours_cold" in r else ""),
                  flush=True)
        else:
            print(f"[grid] {dname} {B} x {L} {r['impl']}: ERROR {r.get('error')}", flush=True)
    print(f"[grid] {dname} {B} x {L}: shape done in {time.perf_counter() - t0:.1f} s", flush=True)
    case.free()
    return rows


def grid_markdown(rows, args, gpu):
    hdr = ["dtype", "batch × ctx", "KV MB", "impl", "cold µs", "hot µs", "GB/s (cold)",
           "fi/ours (cold)", "max-abs vs fp32", "rel-L2 vs fp32", "check"]
    body = []
    for r in rows:
        shape = f"{r['batch']} × {r['context']}"
        kv_mb = fmt(r["kv_bytes"] / 1e6, 1)
        if "cold" not in r:
            body.append([r["dtype"], shape, kv_mb, r["impl"], "ERROR", "", "", "", "", "",
                         r.get("error", "")])
            continue
        ck = r.get("check") or {}
        verdict = "—" if not ck else ("ok" if ck.get("ok") else "**MISMATCH**")
        body.append([r["dtype"], shape, kv_mb, r["impl"], fmt(r["cold"]["median_us"]),
                     fmt(r["hot"]["median_us"]), fmt(r["gbps_cold"], 0),
                     fmt(r.get("fi_over_ours_cold"), 2), fmt(ck.get("max_abs"), 5)
                     if ck else "—", f"{ck['rel_l2']:.1e}" if ck else "—", verdict])
    head = (f"### Decode GPU time ({NUM_HEADS} q / {NUM_KV_HEADS} KV heads, head {HEAD_SIZE}, "
            f"block {BLOCK_SIZE}; CUDA events, median of {args.runs} runs; cold = {4 * gpu.l2_bytes >> 20}"
            f" MiB written before each run)\n\n")
    tail = ("\n\n`fi/ours` = FlashInfer cold time / our cold time (> 1: ours faster). "
            "GB/s = KV bytes read / cold time.")
    pairs = []
    seen = set()
    for r in rows:
        key = (r["dtype"], r["batch"], r["context"])
        if key in seen or not r.get("pairwise_max_abs"):
            continue
        seen.add(key)
        pairs.append([r["dtype"], f"{r['batch']} × {r['context']}"]
                     + [f"{r['pairwise_max_abs'].get(k):.3e}"
                        if r["pairwise_max_abs"].get(k) is not None else "—"
                        for k in ("v1 vs flashinfer decode", "v1 vs torch sdpa (dense copy)")])
    extra = ""
    if pairs:
        extra = "\n\n#### Pairwise max-abs differences\n\n" + md_table(
            ["dtype", "batch × ctx", "ours v1 vs FlashInfer", "ours v1 vs SDPA"], pairs)
    return head + md_table(hdr, body) + tail + extra


# ---------------------------------------------------------------------------------------------------

def main():
    args = parse_args()
    fi, fi_reason = import_flashinfer(args.no_flashinfer)  # before torch work: reads env at import
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        sys.exit("bench_ops.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    # The fp32 reference must be true fp32 (no TF32).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    import pagedattn
    from pagedattn import ops
    from pagedattn.vllm_flash_attn import flash_attn_varlen_func

    check_status = getattr(pagedattn, "check_status", None)
    if check_status is None:
        try:
            from pagedattn import _native

            check_status = getattr(_native, "check_status", None)
        except Exception:
            check_status = None
    pa = {"ops": ops, "flash_attn_varlen_func": flash_attn_varlen_func,
          "check_status": check_status}

    gpu = Gpu(torch, args.cover_us)
    free_bytes, _ = torch.cuda.mem_get_info(gpu.dev)
    if args.max_gb is None:
        args.max_gb = max(1.0, free_bytes / 1e9 - 6.0)

    notes = []
    results = {
        "meta": {
            "argv": sys.argv,
            "args": {k: v for k, v in vars(args).items()},
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": platform.node(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "device": gpu.name,
            "sm_count": gpu.sm_count,
            "l2_bytes": gpu.l2_bytes,
            "total_mem_bytes": gpu.total_mem,
            "free_mem_bytes_at_start": free_bytes,
            "sleep_cycles_per_us": gpu.cycles_per_us,
            "cover_us": gpu.cover_us,
            "pagedattn": getattr(pagedattn, "__version__", None),
            "pagedattn_file": getattr(pagedattn, "__file__", None),
            "flashinfer": getattr(fi, "__version__", None) if fi else None,
            "flashinfer_reason": fi_reason,
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("FLASHINFER_", "TVM_FFI_", "CUDA_", "MAX_JOBS"))},
            "geometry": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS,
                         "head_size": HEAD_SIZE, "block_size": BLOCK_SIZE,
                         "partition_size_v2": PARTITION_SIZE},
        },
        "notes": notes,
    }
    print(f"device {gpu.name}, {gpu.sm_count} SMs, L2 {gpu.l2_bytes >> 20} MiB; torch "
          f"{torch.__version__}; pagedattn {results['meta']['pagedattn']}; flashinfer "
          f"{results['meta']['flashinfer'] or 'absent: ' + str(fi_reason)}", flush=True)
    if not gpu.cycles_per_us:
        notes.append("torch.cuda._sleep unavailable: host overhead is NOT hidden from GPU timings "
                     "and the burst GPU time is not measured")

    fi_state = None
    if fi is not None:
        try:
            fi_state = FlashInfer(torch, fi, gpu.dev, args.fi_workspace_mb, args.fi_tensor_cores)
        except Exception as e:
            results["meta"]["flashinfer_reason"] = f"wrapper creation failed: {short_err(e)}"
            traceback.print_exc()

    md = []
    try:
        if "host" in args.parts:
            run_host_part(args, torch, F, pa, gpu, fi_state, args.dtype, results, notes)
            md.append(host_markdown(results["host"], args))
        if "grid" in args.parts:
            run_grid_part(args, torch, F, pa, gpu, fi_state, args.dtype, results, notes)
            md.append(grid_markdown(results["grid"], args, gpu))
    finally:
        if fi_state is not None:
            results["meta"]["flashinfer_first_plan_s"] = fi_state.first_plan_s
            results["meta"]["flashinfer_failed"] = fi_state.failed
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        text = "\n\n".join(md)
        if notes:
            text += "\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes)
        print("\n" + text, flush=True)
        if args.md:
            with open(args.md, "w") as f:
                f.write(text + "\n")
        print(f"\nwrote {args.out}" + (f" and {args.md}" if args.md else ""), flush=True)


if __name__ == "__main__":
    main()
