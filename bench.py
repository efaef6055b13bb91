"""
Benchmarks, each a section chosen by flag; every figure comes with the card and the software it ran on.

    python bench.py --kernel        the selective scan alone: forward and forward+backward time, bandwidth,
                                    TFLOP/s and the fraction of the floor, against mamba_ssm if importable
    python bench.py --infer         generated tokens/s of the six model variants, sequence lengths 1K-64K
    python bench.py --train         training tokens/s, MFU and peak memory of the three archs

Without a flag every section runs. --device=cpu with --tiny runs tiny sizes (a smoke test, not a benchmark).
Results: a markdown table on stdout, and JSON (and PNG plots) under --out_dir.
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

import scan_kernel
from scan_kernel import selective_scan

try:  # an optional baseline, never a dependency
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None


# ------------------------------------------------------------------------------------------------
# timing and the machine


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, warmup=5, reps=30):
    """Median time of fn() in ms: CUDA events on a GPU, the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graphed(fn, device):
    """fn captured in a CUDA graph (replays skip Python and launch overhead); fn itself on a CPU."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def machine(device):
    info = dict(torch=torch.__version__, python=platform.python_version(), device=str(device))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["card"] = platform.processor() or platform.machine()
    return info


def ceilings(device):
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul rate (FLOP/s)."""
    if device.type != "cuda":
        return dict(copy_GBps=float("nan"), matmul_TFLOPs=float("nan"))
    a = torch.empty(1 << 29, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), device)
    n = 8192
    x, y = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms_mm = median_ms(lambda: x @ y, device, reps=20)
    return dict(copy_GBps=2 * a.numel() / ms / 1e6, matmul_TFLOPs=2 * n**3 / ms_mm / 1e9)


def write_json(out_dir, name, obj):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


# ------------------------------------------------------------------------------------------------
# the scan kernel

KERNEL_SHAPES = {  # batch, seqlen, nheads; headdim 64, dstate 128, ngroups 1, bfloat16
    "train": (8, 2048, 32),
    "wide": (8, 2048, 64),
    "long": (1, 65536, 32),
    "block step": (16, 64, 32),  # one block-diffusion step: initial state in, state out
}
TINY_KERNEL_SHAPES = {"train": (2, 128, 4), "block step": (2, 16, 4)}


def scan_cost(batch, seqlen, nheads, headdim, dstate, block, chunk=64):
    """(bytes, FLOPs) of forward and of forward+backward: every input read once, every output written
    once; FLOPs of the chunked algorithm's matrix products at chunk length 64."""
    L, P, N = chunk, headdim, dstate
    bl, bh = batch * seqlen, batch * seqlen * nheads
    x = bh * P * 2  # bf16
    BC = 2 * bl * N * 2
    dt = bh * 4
    state = batch * nheads * P * N * 4 if block else 0  # initial state in, final state out
    fwd_bytes = 2 * x + BC + dt + 2 * state
    bwd_bytes = 4 * x + 2 * BC + 2 * dt + 2 * state  # reads x, B, C, dt, dy (+dS); writes dx, dB, dC, ddt (+dS0)
    fwd_flops = bh * (2 * L * N + 2 * L * P + 4 * N * P)
    bwd_flops = bh * (2 * L * (3 * N + 2 * P) + 12 * N * P)  # + the state recompute
    return (fwd_bytes, fwd_flops), (fwd_bytes + bwd_bytes, fwd_flops + bwd_flops)


def bench_kernel(args, device, ceil):
    shapes = TINY_KERNEL_SHAPES if args.tiny else KERNEL_SHAPES
    headdim, dstate = (16, 16) if args.tiny else (64, 128)
    rows = []
    for name, (batch, seqlen, nheads) in shapes.items():
        block = name == "block step"
        g = torch.Generator(device=device).manual_seed(0)
        r = lambda *s, dtype=torch.bfloat16: torch.randn(*s, device=device, dtype=torch.float32, generator=g).to(dtype)
        x = r(batch, seqlen, nheads, headdim).requires_grad_()
        dt = torch.nn.functional.softplus(r(batch, seqlen, nheads, dtype=torch.float32) - 2).requires_grad_()
        A = (-torch.rand(nheads, device=device, generator=g) * 4 - 0.5).requires_grad_()
        B = r(batch, seqlen, 1, dstate).requires_grad_()
        C = r(batch, seqlen, 1, dstate).requires_grad_()
        D = r(nheads, dtype=torch.float32).requires_grad_()
        s0 = r(batch, nheads, headdim, dstate, dtype=torch.float32).requires_grad_() if block else None
        dy = torch.randn_like(x)
        leaves = [t for t in (x, dt, A, B, C, D, s0) if t is not None]

        def ours_fwd():
            with torch.no_grad():
                return selective_scan(x, dt, A, B, C, D, s0, state_every=seqlen if block else None)

        def ours_fwdbwd():
            out = selective_scan(x, dt, A, B, C, D, s0, state_every=seqlen if block else None)
            y, states = out if block else (out, None)
            torch.autograd.backward([y] + ([states] if block else []), [dy] + ([torch.ones_like(states)] if block else []))

        def mamba_fwd():
            with torch.no_grad():
                return mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=D, initial_states=s0, return_final_states=block)

        def mamba_fwdbwd():
            out = mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=D, initial_states=s0, return_final_states=block)
            y, last = out if block else (out, None)
            torch.autograd.backward([y] + ([last] if block else []), [dy] + ([torch.ones_like(last)] if block else []))

        (fb, ff), (bb, bf) = scan_cost(batch, seqlen, nheads, headdim, dstate, block)
        impls = [("ours", ours_fwd, ours_fwdbwd)]
        if mamba_chunk_scan_combined is not None and device.type == "cuda":
            impls.append(("mamba_ssm 2.3", mamba_fwd, mamba_fwdbwd))
        for impl, fwd, fwdbwd in impls:
            row = dict(shape=name, impl=impl, batch=batch, seqlen=seqlen, nheads=nheads, headdim=headdim, dstate=dstate)
            for part, fn, nbytes, flops in (("fwd", fwd, fb, ff), ("fwdbwd", fwdbwd, bb, bf)):
                def step():
                    for t in leaves:
                        t.grad = None
                    fn()
                ms = median_ms(step, device)
                floor_ms = max(nbytes / (ceil["copy_GBps"] * 1e6), flops / (ceil["matmul_TFLOPs"] * 1e9))
                row[part] = dict(ms=ms, GBps=nbytes / ms / 1e6, TFLOPs=flops / ms / 1e9, floor_ms=floor_ms,
                                 of_floor=floor_ms / ms)
                if block and part == "fwd" and device.type == "cuda":
                    try:
                        row["fwd_graph_ms"] = median_ms(graphed(fn, device), device)
                    except Exception as e:  # a baseline that can't be captured is reported as such
                        row["fwd_graph_ms"] = f"capture failed: {type(e).__name__}"
            rows.append(row)
            print(f"{name:10s} {impl:14s} fwd {row['fwd']['ms']:.3f} ms  fwd+bwd {row['fwdbwd']['ms']:.3f} ms", flush=True)
    return rows


def kernel_table(rows):
    lines = ["| shape | impl | forward ms | GB/s | TFLOP/s | of floor | fwd+bwd ms | GB/s | TFLOP/s | of floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, b = r["fwd"], r["fwdbwd"]
        fwd = f"{f['ms']:.3f}"
        if "fwd_graph_ms" in r:
            g = r["fwd_graph_ms"]
            fwd += f" ({g:.3f} graphed)" if isinstance(g, float) else f" ({g})"
        lines.append(f"| {r['shape']} | {r['impl']} | {fwd} | {f['GBps']:.0f} | {f['TFLOPs']:.1f} | {f['of_floor']:.0%} "
                     f"| {b['ms']:.3f} | {b['GBps']:.0f} | {b['TFLOPs']:.1f} | {b['of_floor']:.0%} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", action="store_true", help="time the selective scan kernel (train, wide, long, block-step shapes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of the bench itself")
    p.add_argument("--out_dir", default="bench_out", help="where the JSON and PNG files go")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    info = machine(device)
    ceil = ceilings(device)
    print(f"# {info['card']}  torch {info['torch']}  triton {info.get('triton')}  "
          f"copy {ceil['copy_GBps']:.0f} GB/s  bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    results = dict(machine=info, ceilings=ceil)
    run_all = not args.kernel
    if args.kernel or run_all:
        results["kernel"] = bench_kernel(args, device, ceil)
        print("\n## selective scan, bfloat16, headdim 64, dstate 128\n")
        print(kernel_table(results["kernel"]))
    print("\nwrote", write_json(args.out_dir, "bench.json", results))


if __name__ == "__main__":
    main()
