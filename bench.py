"""
Benchmarks, each a section chosen by flag; every figure comes with the card and the software it ran on.

    python bench.py --kernel        the selective scan alone: forward and forward+backward time, bandwidth,
                                    TFLOP/s and the fraction of the floor, against mamba_ssm and
                                    flash-linear-attention if importable
    python bench.py --infer         generated tokens/s of the six model variants, sequence lengths 1K-64K;
                                    each block step against its floor (reading the weights and the cache
                                    once), with its kernel count; a real 8K generation of each arch checked
                                    against the per-call figures
    python bench.py --train         training tokens/s, MFU, the GPU's idle share and peak memory of the
                                    three archs, eager and compiled side by side

Without a flag every section runs. --device=cpu --tiny runs tiny sizes (a smoke test, not a benchmark).
Results: markdown tables on stdout and in out_dir/bench.md, JSON in out_dir/bench.json, a PNG plot.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

from diffusion import cuda_graph, forward_loss, sample_block, sample_full
from model import ARCHS, DiffuMamba, preset_config
from scan_kernel import CHUNK, selective_scan
from train import flops_per_token, peak_flops

try:  # optional baselines, never dependencies
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None
try:
    from fla.ops.simple_gla import chunk_simple_gla
except ImportError:
    chunk_simple_gla = None


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


def scan_cost(batch, seqlen, nheads, headdim, dstate, block, chunk=CHUNK):
    """(bytes, FLOPs) of forward and of forward+backward: every input read once, every output written
    once; FLOPs of the chunked algorithm's matrix products at the kernels' chunk length."""
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

        def fla_call():  # the scan as simple GLA: q = C, k = dt B, v = x, log-decay dt A per step, plus D x
            Ch, Bh = (t.expand(-1, -1, nheads, -1) for t in (C, B))
            o, last = chunk_simple_gla(Ch, Bh * dt[..., None].to(B.dtype), x, dt * A, scale=1.0, initial_state=s0,
                                       output_final_state=block, state_v_first=True)
            return o + D[:, None] * x, last

        def fla_fwd():
            with torch.no_grad():
                return fla_call()

        def fla_fwdbwd():
            y, last = fla_call()
            torch.autograd.backward([y] + ([last] if block else []), [dy] + ([torch.ones_like(last)] if block else []))

        (fb, ff), (bb, bf) = scan_cost(batch, seqlen, nheads, headdim, dstate, block)
        impls = [("ours", ours_fwd, ours_fwdbwd)]
        if mamba_chunk_scan_combined is not None and device.type == "cuda":
            impls.append(("mamba_ssm", mamba_fwd, mamba_fwdbwd))
        if chunk_simple_gla is not None and device.type == "cuda":
            impls.append(("fla simple_gla", fla_fwd, fla_fwdbwd))
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
                # each timed call starts on an idle GPU, so it counts the call's CPU-side cost too; replayed
                # from a CUDA graph, the forward shows the kernels' own time
                if part == "fwd" and device.type == "cuda":
                    try:
                        row["fwd_graph_ms"] = median_ms(cuda_graph(fn), device)
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
# inference: generated tokens/s of the six variants

VARIANTS = [(arch, mode) for arch in ("transformer", "mamba", "hybrid") for mode in ("full", "block")]


def inference_model(preset, arch, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = DiffuMamba(preset_config(preset, arch))
    return model.for_inference(torch.bfloat16)  # as sample.py runs a model on a GPU, for every variant alike


def filled_cache(model, batch, n):
    """A cache with room for n + one block, holding n committed tokens (random contents: the cost does
    not depend on them)."""
    cache = model.new_cache(batch, n + model.cfg.block_len)
    for entry in cache.entries:
        for t in entry.values():
            t.normal_()
    cache.pos.fill_(n)
    cache.length = n
    return cache


def time_call(fn, device, graph):
    """(ms per call, eager or CUDA-graph replay); reps adapt to the call's length."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = (time.perf_counter() - t0) * 1e3
    reps = int(min(20, max(3, 1500 / max(once, 1e-3))))
    run = cuda_graph(fn) if graph and device.type == "cuda" else fn
    return median_ms(run, device, warmup=1, reps=reps)


def gpu_kernels(fn, device, calls=1):
    """(kernels, GPU ms) per call of fn, from torch.profiler: the kernels' own time, launch gaps left out."""
    if device.type != "cuda":
        return None, None
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels) / calls, sum(e.device_time for e in kernels) / 1e3 / calls


def next_call_ms(done, L):
    """A variant's time per call at length L, grown from its last cell at the order (between 1 and 2) of
    its last two cells; quadratic while there is one; 0 before the first."""
    if not done:
        return 0.0
    order = 2.0
    if len(done) > 1:
        (L1, t1), (L2, t2) = done[-2:]
        order = min(max(math.log(t2 / t1) / math.log(L2 / L1), 1.0), 2.0)
    return done[-1][1] * (L / done[-1][0]) ** order


def measure_call(model, mode, batch, L, K, r, device, copy_GBps):
    """ms per call, eager and CUDA-graphed, and tokens/s at r tokens per call, of one variant at one L.
    Full: one call over L tokens. Block: one forward_block over K tokens given a cache of L - K tokens,
    and one commit per block; also its floor (reading the weights and the cache once at the measured
    copy rate) and the kernels of a graphed call."""
    vocab = model.cfg.vocab_size
    row = {}
    if mode == "full":
        x = torch.randint(0, vocab + 1, (batch, L), device=device)
        for tag, graph in (("eager", False), ("graph", True)):
            row[tag] = time_call(lambda: model(x), device, graph)
        row["tok_s"], row["tok_s_eager"] = (batch * r / (row[tag] / 1e3) for tag in ("graph", "eager"))
        return row
    xb = torch.randint(0, vocab + 1, (batch, K), device=device)
    cache = filled_cache(model, batch, L - K)

    def commit():  # the same block every time: the length goes back after it
        model.commit(xb.clamp(max=vocab - 1), cache)
        cache.length = L - K
        cache.pos.fill_(L - K)
    for tag, graph in (("eager", False), ("graph", True)):
        row[tag] = time_call(lambda: model.forward_block(xb, cache), device, graph)
        row[tag + "_commit"] = time_call(commit, device, graph)
    row["tok_s"], row["tok_s_eager"] = (batch * K / (((K / r) * row[tag] + row[tag + "_commit"]) / 1e3)
                                        for tag in ("graph", "eager"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    row["floor"] = (weights + cache.nbytes()) / (copy_GBps * 1e6)
    if device.type == "cuda":
        row["kernels"], row["gpu_ms"] = gpu_kernels(cuda_graph(lambda: model.forward_block(xb, cache)), device, 5)
    return row


def bench_inference(args, device, copy_GBps):
    """measure_call for every variant, batch and length; a cell whose call would take longer than
    max_call_s is skipped, and so is one that does not fit in memory."""
    K, r = args.block_len, args.reveal
    rows = []
    for arch in args.archs:
        model = inference_model(args.preset, arch, device)
        base_cfg = model.cfg
        for mode in ("full", "block"):
            model.cfg = dataclasses.replace(base_cfg, block_len=None if mode == "full" else K)
            for batch in args.batches:
                done = []  # (L, ms per call) of this variant and batch so far
                for L in args.lengths:
                    row = dict(arch=arch, mode=mode, variant=f"{arch}-{mode}", batch=batch, L=L)
                    estimate = next_call_ms(done, L)
                    if estimate > args.max_call_s * 1e3:
                        row["skipped"] = f"est. {estimate / 1e3:.1f} s/call"
                    else:
                        try:
                            with torch.no_grad():
                                row.update(measure_call(model, mode, batch, L, K, r, device, copy_GBps))
                            done.append((L, row["graph"]))
                        except torch.cuda.OutOfMemoryError:
                            row["skipped"] = "out of memory"
                        except RuntimeError as e:  # reported in the cell; the other cells still run
                            row["skipped"] = f"failed: {str(e).splitlines()[0][:80]}"
                    rows.append(row)
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                    print(f"{row['variant']:18s} batch {batch} L {L:6d}: " + (row.get("skipped") or
                          f"{row['tok_s']:10,.0f} tok/s (graph {row['graph']:.2f} ms, eager {row['eager']:.2f} ms)"),
                          flush=True)
        model = None
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def timed_sampling(sampler, device):
    """(tokens, stats, ms): a sampler run, its wall time without the warm-up it reports."""
    sync(device)
    t0 = time.perf_counter()
    tokens, stats = sampler()
    sync(device)
    return tokens, stats, (time.perf_counter() - t0 - stats["warmup_s"]) * 1e3


def end_to_end(args, device, rows):
    """Generate e2e_len tokens for real with each arch, block by block and full-sequence (fewer steps), as
    sample.py does (CUDA graphs on a GPU); compare the sampling time (warm-up apart) with what the
    per-call times predict."""
    L, K = args.e2e_len, args.block_len
    per = {(r["arch"], r["mode"], r["batch"], r["L"]): r for r in rows if "graph" in r}
    out = []
    for arch in args.archs:
        model = inference_model(args.preset, arch, device)
        base_cfg = model.cfg
        for mode, steps in (("block", args.e2e_steps_per_block), ("full", args.e2e_steps)):
            ref = per.get((arch, mode, 1, L))
            if ref is None:
                continue
            model.cfg = dataclasses.replace(base_cfg, block_len=None if mode == "full" else K)
            if mode == "block":
                prompt = torch.zeros(1, 0, dtype=torch.long, device=device)
                _, stats, ms = timed_sampling(lambda: sample_block(model, prompt, L, steps, seed=0), device)
                predicted = stats["calls"] * ref["graph"] + stats["commits"] * ref["graph_commit"]
            else:
                template = torch.full((1, L), base_cfg.vocab_size, device=device)
                _, stats, ms = timed_sampling(lambda: sample_full(model, template, steps, seed=0), device)
                predicted = stats["calls"] * ref["graph"]
            out.append(dict(arch=arch, mode=mode, L=L, steps=steps, calls=stats["calls"], commits=stats.get("commits", 0),
                            wall_ms=ms, warmup_ms=stats["warmup_s"] * 1e3, predicted_ms=predicted, error=ms / predicted - 1))
            print(f"end to end {arch}-{mode} L={L}: {stats['calls']} calls, {ms / 1e3:.2f} s measured (warm-up "
                  f"{stats['warmup_s']:.2f} s apart), {predicted / 1e3:.2f} s predicted ({ms / predicted - 1:+.1%})",
                  flush=True)
        model = None
    return out


def decoding(args, device):
    """A trained checkpoint's sampler under each reveal rule: tokens per model call and tokens/s (sampling
    time, warm-up apart), args.e2e_len tokens at batch 1."""
    import sample
    model = sample.load_model(args.ckpt, device)[0]
    K, out = model.cfg.block_len, []
    for reveal in ("random", "threshold"):
        if K is None:
            template = torch.full((1, args.e2e_len), model.cfg.vocab_size, device=device)
            run = lambda: sample_full(model, template, args.e2e_len, reveal=reveal, seed=0, top_p=0.95)
        else:
            prompt = torch.zeros(1, 0, dtype=torch.long, device=device)
            run = lambda: sample_block(model, prompt, args.e2e_len, K, reveal=reveal, seed=0, top_p=0.95)
        tokens, stats, ms = timed_sampling(run, device)
        n = tokens.shape[1]
        out.append(dict(reveal=reveal, tokens=n, calls=stats["calls"], tokens_per_call=n / stats["calls"],
                        tok_s=n / ms * 1e3))
        print(f"{args.ckpt} {reveal}: {n} tokens in {stats['calls']} calls, {n / ms * 1e3:,.0f} tokens/s", flush=True)
    return out


def inference_tables(rows, args):
    header = "| variant | " + " | ".join(f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in args.lengths) + " |"
    lines = []
    for batch in args.batches:
        lines += [f"\n### generated tokens/s, batch {batch}, {args.reveal} token(s) revealed per call, block_len "
                  f"{args.block_len} (CUDA graphs; eager in the JSON)\n",
                  header,
                  "|---|" + "---|" * len(args.lengths)]
        cell = {(r["variant"], r["L"]): r for r in rows if r["batch"] == batch}
        for arch, mode in VARIANTS:
            v = f"{arch}-{mode}"
            lines.append(f"| {v} | " + " | ".join(
                (f"{cell[v, L]['tok_s']:,.{0 if cell[v, L]['tok_s'] >= 10 else 2}f}" if "tok_s" in cell.get((v, L), {})
                 else cell.get((v, L), {}).get("skipped", "-"))
                for L in args.lengths) + " |")
        for base in ("transformer-full", "transformer-block"):
            lines += [f"\nspeedup over {base}, batch {batch}:\n",
                      header,
                      "|---|" + "---|" * len(args.lengths)]
            for arch, mode in VARIANTS:
                v = f"{arch}-{mode}"
                vals = []
                for L in args.lengths:
                    a, b = cell.get((v, L), {}), cell.get((base, L), {})
                    vals.append(f"{a['tok_s'] / b['tok_s']:.1f}x" if "tok_s" in a and "tok_s" in b else "-")
                lines.append(f"| {v} | " + " | ".join(vals) + " |")
    lines += ["\n### one block step (forward_block, CUDA graph) against its floor: the weights and the cache read "
              "once at the measured copy rate\n",
              "| variant | batch | L | ms per call | floor ms | of floor | kernels per call | their GPU ms |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] == "block" and "floor" in r and r["L"] in (args.lengths[0], args.lengths[-1]):
            kernels = "- | -" if r.get("kernels") is None else f"{r['kernels']:.0f} | {r['gpu_ms']:.3f}"
            lines.append(f"| {r['variant']} | {r['batch']} | {r['L']} | {r['graph']:.3f} | {r['floor']:.3f} | "
                         f"{r['floor'] / r['graph']:.0%} | {kernels} |")
    return "\n".join(lines)


def sampling_tables(e2e, dec):
    lines = []
    if e2e:
        lines += ["\n| end to end (as sample.py runs it) | model calls | commits | measured s | warm-up s | predicted s "
                  "| error |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {e['arch']}-{e['mode']}, L={e['L']}, {e['steps']} steps{' per block' if e['mode'] == 'block' else ''} "
                  f"| {e['calls']} | {e['commits']} | {e['wall_ms'] / 1e3:.2f} | {e['warmup_ms'] / 1e3:.2f} | "
                  f"{e['predicted_ms'] / 1e3:.2f} | {e['error']:+.1%} |" for e in e2e]
    if dec:
        lines += ["\n| trained checkpoint, reveal | tokens | model calls | tokens per call | tokens/s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {d['reveal']} | {d['tokens']} | {d['calls']} | {d['tokens_per_call']:.2f} | {d['tok_s']:,.0f} |"
                  for d in dec]
    return "\n".join(lines)


def plot(rows, args, info, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arch, mode) in enumerate(VARIANTS):
        for batch, style in zip(args.batches, ("-", "--")):
            pts = [(r["L"], r["tok_s"]) for r in rows if r["variant"] == f"{arch}-{mode}" and r["batch"] == batch and "tok_s" in r]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=f"C{i}", label=f"{arch}-{mode}, batch {batch}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length L (tokens)", ylabel="generated tokens/s",
           title=f"{args.preset} preset, {info['card']}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------------------------------------------
# training: tokens/s of forward + backward + optimizer step


def time_training(preset, arch, batch, L, device, mode):
    """One arch's training step (forward, backward, AdamW) at batch x L, eager or torch.compile'd in mode:
    ms per step, tokens/s, MFU, peak memory, and the GPU's idle share of a step (1 - its kernels' time
    over the step's wall time: the share spent waiting for the host)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DiffuMamba(preset_config(preset, arch))
    compiled = model if mode == "off" else torch.compile(model, mode=mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x0 = torch.randint(0, model.cfg.vocab_size, (batch, L), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step():
        with autocast:
            loss = forward_loss(compiled, model.cfg, x0, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(step, device, warmup=3, reps=10)
    peak = peak_flops(device)
    row = dict(ms=ms, tok_s=batch * L / (ms / 1e3))
    row["mfu"] = flops_per_token(model, model.cfg, L) * row["tok_s"] / peak if peak else None
    if device.type == "cuda":
        row["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["kernels"], gpu_ms = gpu_kernels(step, device, calls=3)
        row["gpu_idle"] = max(0.0, 1 - gpu_ms / ms)
    return row


def bench_training(args, device):
    rows = []
    for arch in args.archs:
        for L in args.train_lengths:
            batch = max(1, args.train_tokens // L)
            row = dict(arch=arch, L=L, batch=batch)
            for mode in ["off"] + args.compile_modes:
                try:
                    row[mode] = time_training(args.preset, arch, batch, L, device, mode)
                except torch.cuda.OutOfMemoryError:
                    row[mode] = dict(skipped="out of memory")
                torch.cuda.empty_cache() if device.type == "cuda" else None
                print(f"train {arch:12s} L {L:6d} batch {batch:3d} compile {mode}: " + (row[mode].get("skipped") or
                      f"{row[mode]['tok_s']:10,.0f} tok/s, {row[mode]['ms']:.1f} ms/step"), flush=True)
            rows.append(row)
    return rows


def training_table(rows, args):
    modes = ["off"] + args.compile_modes
    lines = [f"\n### training, {args.preset} preset, {args.train_tokens} tokens per batch, bfloat16 autocast, AdamW\n",
             "| arch | seqlen | batch | compile | tokens/s | x transformer | ms/step | MFU | GPU idle | kernels/step | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["L"], m): r[m].get("tok_s") for r in rows if r["arch"] == "transformer" for m in modes}
    for r in rows:
        for m in modes:
            c = r[m]
            if "skipped" in c:
                lines.append(f"| {r['arch']} | {r['L']} | {r['batch']} | {m} | {c['skipped']} | | | | | | |")
                continue
            ratio = f"{c['tok_s'] / base[r['L'], m]:.2f}x" if base.get((r["L"], m)) else "-"
            opt = lambda k, fmt: fmt.format(c[k]) if c.get(k) is not None else "n/a"
            lines.append(f"| {r['arch']} | {r['L']} | {r['batch']} | {m} | {c['tok_s']:,.0f} | {ratio} | {c['ms']:.1f} | "
                         f"{opt('mfu', '{:.0%}')} | {opt('gpu_idle', '{:.0%}')} | {opt('kernels', '{:.0f}')} | "
                         f"{opt('peak_GiB', '{:.1f} GiB')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", action="store_true", help="the selective scan alone (train, wide, long and "
                   "block-step shapes): forward (also in a CUDA graph) and forward+backward ms, GB/s, TFLOP/s, "
                   "fraction of the floor")
    p.add_argument("--infer", action="store_true", help="generated tokens/s of the six variants over --lengths, "
                   "the block steps against their floor, then a real generation of --e2e_len tokens by each arch "
                   "checked against the per-call figures (at batch 1: when --batches holds 1)")
    p.add_argument("--train", action="store_true", help="training tokens/s, MFU, GPU idle share and peak memory "
                   "of the three archs, eager and compiled")
    p.add_argument("--preset", default="1.3b", help="model size for --infer and --train (random weights)")
    p.add_argument("--archs", default=",".join(ARCHS), help="the archs to time, comma-separated")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--block_len", type=int, default=64)
    p.add_argument("--reveal", type=int, default=1, help="tokens revealed per model call, every variant alike")
    p.add_argument("--max_call_s", type=float, default=4.0, help="skip a cell whose call would take longer")
    p.add_argument("--e2e_len", type=int, default=8192)
    p.add_argument("--e2e_steps_per_block", type=int, default=8)
    p.add_argument("--e2e_steps", type=int, default=64)
    p.add_argument("--ckpt", default=None, help="--infer: also sample e2e_len tokens from this trained checkpoint "
                   "with random and threshold reveal (tokens per call, tokens/s)")
    p.add_argument("--train_lengths", default="2048,8192,32768")
    p.add_argument("--train_tokens", type=int, default=32768, help="tokens per training batch")
    p.add_argument("--compile_modes", default=None, help="torch.compile modes timed beside eager, comma-separated "
                   "(default: 'default' on a GPU, none on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of the bench itself")
    p.add_argument("--out_dir", default="bench_out", help="where the JSON and PNG files go")
    args = p.parse_args()
    args.lengths = [int(v) for v in args.lengths.split(",")]
    args.batches = [int(v) for v in args.batches.split(",")]
    args.train_lengths = [int(v) for v in args.train_lengths.split(",")]
    args.archs = args.archs.split(",")
    if not set(args.archs) <= set(ARCHS):
        p.error(f"--archs: each must be one of {', '.join(ARCHS)}, got {','.join(args.archs)}")
    if args.compile_modes is None:
        args.compile_modes = "default" if args.device.startswith("cuda") else ""
    args.compile_modes = [m for m in args.compile_modes.split(",") if m]
    if args.tiny:
        args.preset, args.lengths, args.batches, args.block_len = "tiny", [64], [1], 16
        args.e2e_len, args.e2e_steps, args.e2e_steps_per_block = 64, 8, 4
        args.train_lengths, args.train_tokens = [64], 256
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.out_dir, exist_ok=True)
    info = machine(device)
    ceil = ceilings(device)
    print(f"# {info['card']}  torch {info['torch']}  triton {info.get('triton')}  "
          f"copy {ceil['copy_GBps']:.0f} GB/s  bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    results = dict(machine=info, ceilings=ceil, args=vars(args))
    every = not (args.kernel or args.infer or args.train)
    report = [f"card: {info['card']}; torch {info['torch']}, triton {info.get('triton')}, python {info['python']}; "
              f"copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s"]
    if args.kernel or every:
        results["kernel"] = bench_kernel(args, device, ceil)
        report += ["\n### selective scan, bfloat16, headdim 64, dstate 128\n", kernel_table(results["kernel"])]
    if args.infer or every:
        results["inference"] = bench_inference(args, device, ceil["copy_GBps"])
        results["end_to_end"] = end_to_end(args, device, results["inference"])
        results["decoding"] = decoding(args, device) if args.ckpt else []
        report += [inference_tables(results["inference"], args),
                   sampling_tables(results["end_to_end"], results["decoding"])]
        png = plot(results["inference"], args, info, os.path.join(args.out_dir, "inference.png"))
        if png:
            report.append(f"\nplot: {png}")
    if args.train or every:
        results["training"] = bench_training(args, device)
        report.append(training_table(results["training"], args))
    print("\n" + "\n".join(report))
    with open(os.path.join(args.out_dir, "bench.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("\nwrote", write_json(args.out_dir, "bench.json", results))


if __name__ == "__main__":
    main()
