#!/usr/bin/env python3
"""Markdown tables for RESULTS.md from `pagedattn bench --json` decode reports (issue 7's targets).

Usage: scripts/decode_table.py GRID.json [SHAPES.json ...]

GRID.json: the decode grid (f16 and bf16, v1/v2/auto, `--graph`). Prints, per dtype, the issue's
points with our time (auto), % of the stream-read ceiling measured in the same run, the FlashInfer
time quoted in issue 7 and the ratio, v1 and v2 beside auto, the host time per call and the
decode step (launched vs CUDA-graph replay). SHAPES.json files (other head sizes, MHA, block
sizes; `--version auto`) get one line per point.
"""
import json
import sys

# Issue 7's table: the faster of FlashInfer's CUDA-core and tensor-core decode, H100, µs.
FLASHINFER = {
    (1, 512): 14.1, (1, 4096): 20.0, (1, 16384): 43.9, (16, 512): 26.9, (16, 4096): 112.7,
    (64, 512): 66.2, (64, 4096): 374.3, (64, 16384): 1428.4, (256, 16384): 5641.0,
}
LARGE_KV = 256e6  # points with at least this much KV: the 95%-of-ceiling target


def points(report):
    for p in report["points"]:
        if p.get("measured"):
            yield p


def grid(path):
    r = json.load(open(path))
    c = r["ceilings"]
    print(f"{r['device']}; stream-read ceiling {c['read_gbps']:.0f} GB/s, copy {c['copy_gbps']:.0f} GB/s, "
          f"launch floor {c['launch_gpu_us']:.1f} µs GPU / {c['launch_host_us']:.1f} µs host\n")
    by = {}
    for p in points(r):
        if p["version"] == "v2" and p["partition_size"] != 512:
            continue
        key = (p["dtype"], p["batch"], p["context"])
        by.setdefault(key, {})[p["version"]] = p
    for dtype in sorted({k[0] for k in by}, key=lambda d: ["f16", "bf16", "f32"].index(d)):
        print(f"**{dtype}**\n")
        print("| batch × context | KV MB | ran | cold µs | % read | FlashInfer µs | FI / ours | target | v1 µs | v2/512 µs "
              "| host µs | step µs: launched / graph | graph host µs |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (d, b, ctx), vs in sorted(by.items()):
            if d != dtype or "auto" not in vs:
                continue
            a = vs["auto"]["measured"]
            ran = a["ran"] + (f"/{a['ran_partition_size']}" if a["ran"] == "v2" else "")
            fi = FLASHINFER.get((b, ctx))
            kv = vs["auto"]["kv_bytes"]
            if fi is None:
                target, ratio, fis = "", "", "—"
            else:
                ratio = f"{fi / a['cold_us']:.2f}"
                fis = f"{fi:.1f}"
                if kv >= LARGE_KV:
                    ok = a["pct_stream_read"] >= 95 and a["cold_us"] <= fi
                    target = ("met" if ok else "missed") + " (≥95%, ≤ FI)"
                else:
                    ok = a["cold_us"] <= fi / 1.3
                    target = ("met" if ok else "missed") + f" (≤ {fi / 1.3:.1f})"
            v1 = vs.get("v1", {}).get("measured")
            v2 = vs.get("v2", {}).get("measured")
            step = a.get("step")
            steps = f"{step['plain_us']:.1f} / {step['graph_us']:.1f}" if step else ""
            ghost = f"{step['graph_host_us']:.1f}" if step else ""
            print(f"| {b} × {ctx} | {kv / 1e6:.0f} | {ran} | {a['cold_us']:.1f} | {a['pct_stream_read']:.1f}% | {fis} | {ratio} "
                  f"| {target} | {v1['cold_us']:.1f} | {v2['cold_us']:.1f} | {a['host_us']:.1f} | {steps} | {ghost} |"
                  if v1 and v2 else
                  f"| {b} × {ctx} | {kv / 1e6:.0f} | {ran} | {a['cold_us']:.1f} | {a['pct_stream_read']:.1f}% | {fis} | {ratio} "
                  f"| {target} | | | {a['host_us']:.1f} | {steps} | {ghost} |")
        print()
    # v1 / v2 / auto: auto against the best of the three.
    gaps = [((vs["auto"]["measured"]["cold_us"] / min(v["measured"]["cold_us"] for v in vs.values()) - 1) * 100, k)
            for k, vs in by.items() if "auto" in vs and len(vs) > 1]
    if gaps:
        worst = max(gaps)
        print(f"auto vs the best of v1 / v2 / auto at each point: worst {worst[0]:.1f}% slower ({worst[1]})\n")


def shapes(path):
    r = json.load(open(path))
    c = r["config"]
    for p in points(r):
        m = p["measured"]
        print(f"| {c['num_heads']}/{c['num_kv_heads']} | {c['head_size']} | {c['block_size']} | {p['dtype']} | {p['cache']} | "
              f"{p['batch']} × {p['context']} | {m['ran']} | {m['cold_us']:.1f} | {m['pct_stream_read']:.1f}% |")


if __name__ == "__main__":
    grid(sys.argv[1])
    if len(sys.argv) > 2:
        print("| heads q/kv | head | block | dtype | cache | batch × context | ran | cold µs | % read |")
        print("|---|---|---|---|---|---|---|---|---|")
        for path in sys.argv[2:]:
            shapes(path)
