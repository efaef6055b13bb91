"""
The test suite. Without a GPU the Triton kernels run in Triton's interpreter (CI does this); with one,
the same comparisons run on the GPU, plus the large cases marked gpu.

    python -m pytest -q test_model.py
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' definition

import data  # noqa: E402
import diffusion  # noqa: E402
import sample  # noqa: E402
import scan_kernel  # noqa: E402
from model import ARCHS, BOTH, PRESETS, BiMamba, DiffuMamba, ModelConfig, preset_config, rope  # noqa: E402
from scan_kernel import selective_scan, selective_scan_chunked, selective_scan_ref  # noqa: E402
from train import CHECKPOINT_FORMAT  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values"
    return ((out - ref).norm() / ref.norm()).item()


def tolerance(dtype):
    if dtype != torch.float32:
        return 1e-2
    return 1e-3 if DEVICE == "cuda" else 1e-5  # tf32 dot products on the GPU


# ------------------------------------------------------------------------------------------------
# the scan


def scan_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype=torch.float32, D=True, init=True,
                device=DEVICE, seed=None, dt_range=None, dt_bias=False):
    """Fresh random inputs (from the global RNG unless a seed is given) as leaves that need grad. With
    dt_bias, dt is raw (any sign) and the scan applies softplus(dt + dt_bias)."""
    g = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)
    if dt_bias:
        dt = 2 * r(batch, seqlen, nheads)
    elif dt_range is None:
        dt = torch.nn.functional.softplus(r(batch, seqlen, nheads) - 1)
    else:
        lo, hi = torch.tensor(dt_range).log()
        dt = torch.exp(lo + (hi - lo) * torch.rand(batch, seqlen, nheads, device=device, generator=g))
    inputs = dict(
        x=r(batch, seqlen, nheads, headdim).to(dtype),
        dt=dt,
        A=-torch.exp(r(nheads) * 0.5),
        B=r(batch, seqlen, ngroups, dstate).to(dtype),
        C=r(batch, seqlen, ngroups, dstate).to(dtype),
        D=r(nheads) if D else None,
        initial_state=r(batch, nheads, headdim, dstate) if init else None,
        dt_bias=r(nheads) - 1 if dt_bias else None,
    )
    return {k: None if v is None else v.requires_grad_() for k, v in inputs.items()}


def run_scan(fn, inputs, reverse, state_every, dy, dstates, cast=None):
    """Run a scan, backpropagate the given output gradients; return outputs and input gradients."""
    leaves = {k: v for k, v in inputs.items() if v is not None}
    args = {k: None if v is None else (cast(v) if cast else v) for k, v in inputs.items()}
    out = fn(**args, reverse=reverse, state_every=state_every)
    y, states = out if state_every is not None else (out, None)
    loss = (y.double() * dy).sum()
    if states is not None:
        loss = loss + (states.double() * dstates).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(y=y, states=states, **{"d" + k: g for k, g in zip(leaves, grads)})


def check_scan(inputs, reverse=False, state_every=None, tol=None, fn=selective_scan, ref_fn=selective_scan_ref,
               per_position=False):
    """Compare fn's outputs and gradients with the float64 reference (selective_scan_chunked is the fast
    one for long sequences: test_chunked_reference_matches_loop checks it against the loop). With
    per_position, also each position's error in y, dx, ddt, dB and dC against the tensor's RMS per
    position, so that a few wrong positions cannot hide in a long sequence."""
    x = inputs["x"]
    batch, seqlen, *heads = x.shape  # heads: ([ndir,] nheads, headdim)
    dy = torch.randn(x.shape, device=x.device, dtype=torch.float64)
    dstates = None
    if state_every is not None:
        dstates = torch.randn(batch, seqlen // state_every, *heads, inputs["B"].shape[-1], device=x.device,
                              dtype=torch.float64)
    out = run_scan(fn, inputs, reverse, state_every, dy, dstates)
    ref = run_scan(ref_fn, inputs, reverse, state_every, dy, dstates, cast=lambda t: t.double())
    assert out["y"].dtype == x.dtype and out["y"].shape == x.shape
    if state_every is not None:
        assert out["states"].dtype == torch.float32 and out["states"].shape == dstates.shape
    tol = tol or tolerance(x.dtype)
    errors = {}
    for k, r in ref.items():
        if r is None:
            continue
        if k in ("dA", "dD", "ddt_bias"):
            # dA, dD and ddt_bias are each one sum per head over every position, and their terms cancel:
            # float32 rounding is bounded by the size of the terms, not of the sum, so measure the error
            # against that. dD's terms: dy * x. ddt_bias's: the raw dt's gradients. dA's: dt * ddt minus
            # the part of ddt that bypasses the decay.
            if k == "dD":
                scale = (dy * inputs["x"].double()).abs().sum((0, 1, -1))
            elif k == "ddt_bias":
                scale = ref["ddt"].abs().sum((0, 1))
            else:
                dt, ddt = inputs["dt"].double(), ref["ddt"]
                if inputs.get("dt_bias") is not None:  # the scan's dt, and the gradient it gets
                    raw = dt + inputs["dt_bias"].double()
                    dt, ddt = torch.nn.functional.softplus(raw), ddt / torch.sigmoid(raw)
                dx_scan = ref["dx"] - (0 if inputs["D"] is None else inputs["D"].double()[..., None] * dy)
                terms = dt * ddt - (dx_scan * inputs["x"].double()).sum(-1)
                scale = terms.abs().sum((0, 1)) / inputs["A"].double().abs()
            errors[k] = ((out[k].double() - r).abs() / scale).max().item()
        else:
            errors[k] = rel_err(out[k], r)
    bad = {k: e for k, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"
    if per_position:
        for k in ("y", "dx", "ddt", "dB", "dC"):
            err = (out[k].double() - ref[k]).flatten(2).norm(dim=2)  # (batch, seqlen)
            rms = ref[k].flatten(2).norm(dim=2).pow(2).mean().sqrt()
            worst = (err / rms).max().item()
            assert worst < 10 * tol, f"{k}: a position's error is {worst:.2g} of the RMS"
    return out


SCAN_CASES = [
    # batch, seqlen, nheads, headdim, ngroups, dstate, dtype, D, init, reverse, state_every
    (2, 64, 4, 16, 1, 16, torch.float32, True, False, False, None),
    (2, 100, 4, 16, 2, 32, torch.float32, False, True, False, None),  # seqlen not a multiple of the chunk
    (2, 100, 4, 32, 2, 16, torch.float32, True, True, True, None),
    (1, 96, 2, 64, 1, 64, torch.float32, True, True, False, 96),  # final state only
    (2, 96, 2, 24, 2, 8, torch.float32, False, True, True, 32),  # block states, odd headdim and dstate
    (2, 48, 4, 16, 4, 16, torch.float32, True, False, False, 8),  # blocks shorter than a tile
    (1, 200, 2, 16, 1, 128, torch.float32, True, True, True, 100),
    (1, 512, 1, 32, 1, 16, torch.float32, True, True, False, 16),  # few programs: parallel segments
    (1, 800, 1, 16, 1, 32, torch.float32, True, True, True, None),  # segments, reverse, partial chunk
    (2, 64, 4, 32, 2, 32, torch.bfloat16, True, True, False, 64),
    (2, 80, 4, 64, 1, 64, torch.bfloat16, False, False, True, 16),
    (1, 512, 2, 16, 1, 16, torch.bfloat16, True, True, True, 64),
    (1, 800, 1, 16, 1, 32, torch.bfloat16, True, True, False, None),  # segments in 16-bit: 4x state-only chunks
    (1, 1536, 1, 16, 1, 16, torch.bfloat16, False, True, True, 128),  # ... with returned states
]


@pytest.mark.parametrize("batch,seqlen,nheads,headdim,ngroups,dstate,dtype,D,init,reverse,state_every", SCAN_CASES)
def test_scan_matches_reference(batch, seqlen, nheads, headdim, ngroups, dstate, dtype, D, init, reverse, state_every):
    inputs = scan_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype, D, init)
    check_scan(inputs, reverse, state_every)


@pytest.mark.parametrize("dtype,reverse,state_every", [(torch.float32, False, 32), (torch.bfloat16, True, None),
                                                       (torch.float32, True, None)])
def test_scan_with_dt_bias(dtype, reverse, state_every):
    # dt raw, softplus(dt + dt_bias) inside the kernels (the mixer's call), gradients of dt and dt_bias
    # through it; the last case has segments (one head, 800 positions)
    shape = (1, 800, 1, 16, 1, 32) if state_every is None and dtype == torch.float32 else (2, 96, 4, 16, 2, 16)
    inputs = scan_inputs(*shape, dtype, dt_bias=True)
    check_scan(inputs, reverse, state_every)


def test_cases_cover_the_kernels_paths():
    # a program scans a few chunks in sequence and segments are chained between kernels: the cases above
    # must reach both the single-segment path and the chained one, with a partial last segment. The backward
    # stores states at the boundaries of pairs of chunks: they must reach an odd chunk count (a last pair
    # with an empty second chunk) and a returned state that ends a pair's first chunk. In 16 bits, the
    # segments' own adjoints walk coarse chunks when the returned states end on them: both ways must run.
    cases = [(scan_kernel._Plan(b, l, h, p, n, every, rev), every, dt)
             for b, l, h, p, g, n, dt, D, init, rev, every in SCAN_CASES]
    assert any(plan.nseg == 1 for plan, _, _ in cases)
    assert any(plan.nseg > 1 and plan.nchunks % plan.seg_chunks for plan, _, _ in cases)
    assert any(plan.nchunks % 2 for plan, _, _ in cases)
    assert any(every and every // plan.chunk % 2 and plan.nchunks > 2 for plan, every, _ in cases)
    coarse_ends = [every // plan.chunk % plan.coarse == 0 for plan, every, dt in cases
                   if plan.nseg > 1 and every and dt == torch.bfloat16]
    assert any(coarse_ends) and not all(coarse_ends)


@pytest.mark.parametrize("batch,seqlen,nheads,ngroups,dtype,reverse,state_every", [
    (2, 96, 4, 2, torch.float32, False, None), (2, 64, 2, 1, torch.bfloat16, True, 32),
    (1, 800, 1, 1, torch.float32, False, None)])  # one head: segments, chained in both directions
def test_scan_both_directions(batch, seqlen, nheads, ngroups, dtype, reverse, state_every):
    # both directions in one call, laid out as the bidirectional mixer's: x, B and C slices of one
    # (batch, seqlen, 2, channels) tensor, dt of a wider one; against the reference a direction at a time
    headdim, dstate = 16, 16
    d_inner, gn = nheads * headdim, ngroups * dstate
    xBC = torch.randn(batch, seqlen, 2, d_inner + 2 * gn, device=DEVICE).to(dtype).requires_grad_()
    x, B, C = xBC.split([d_inner, gn, gn], dim=-1)
    dt = 2 * torch.randn(batch, seqlen, 2, nheads + 1, device=DEVICE)[..., 1:]  # a slice, as in the model
    inputs = dict(x=x.unflatten(-1, (nheads, headdim)), dt=dt,
                  A=-torch.exp(torch.randn(2, nheads, device=DEVICE) * 0.5), B=B.unflatten(-1, (ngroups, dstate)),
                  C=C.unflatten(-1, (ngroups, dstate)), D=torch.randn(2, nheads, device=DEVICE),
                  initial_state=torch.randn(batch, 2, nheads, headdim, dstate, device=DEVICE),
                  dt_bias=torch.randn(2, nheads, device=DEVICE) - 1)
    for k in ("dt", "A", "D", "initial_state", "dt_bias"):
        inputs[k].requires_grad_()
    check_scan(inputs, reverse, state_every, ref_fn=selective_scan_chunked if seqlen > 100 else selective_scan_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_headdim_tiles(dtype, monkeypatch):
    # headdim split over several tiles (a partial last one): ddt, dB, dC, dA and dD are summed over the
    # gradient kernel's tiles. Segments of 8 chunks, which the state-only pass walks (in 16 bits) in two
    # coarse chunks.
    def small_tiles(*args):
        plan = scan_kernel._Plan(*args)
        plan.block_p = 16
        plan.seg_chunks, plan.nseg = 8, -(-plan.nchunks // 8)
        return plan

    monkeypatch.setattr(scan_kernel, "_cached_plan", small_tiles)
    inputs = scan_inputs(1, 600, 2, 40, 1, 16, dtype)  # chunks of 25, three segments
    check_scan(inputs, reverse=True, state_every=200, ref_fn=selective_scan_chunked)


def test_states_only_gradient():
    # gradient that arrives through the returned states alone (y unused)
    inputs = scan_inputs(2, 64, 2, 16, 1, 16)
    _, states = selective_scan(**inputs, state_every=32)
    _, states_ref = selective_scan_ref(**{k: None if v is None else v.double() for k, v in inputs.items()},
                                       state_every=32)
    w = torch.randn(states.shape, device=DEVICE, dtype=torch.float64)
    g = torch.autograd.grad((states.double() * w).sum(), inputs["x"])[0]
    g_ref = torch.autograd.grad((states_ref * w).sum(), inputs["x"])[0]
    assert rel_err(g, g_ref) < tolerance(torch.float32)


def test_no_grad_call_matches():
    # without gradients to take, the call skips the autograd Function: the same kernels, the same bits
    inputs = scan_inputs(1, 200, 2, 16, 1, 16, init=True)
    y, states = selective_scan(**inputs, state_every=100)
    assert y.grad_fn is not None
    with torch.no_grad():
        y_ng, states_ng = selective_scan(**inputs, state_every=100)
    assert y_ng.grad_fn is None and torch.equal(y_ng, y) and torch.equal(states_ng, states)


def test_scan_keeps_only_its_inputs_for_the_backward():
    # the backward recomputes the states it needs: autograd holds nothing that the forward made, so a
    # layer's scan costs no memory between its forward and its backward beyond its inputs
    inputs = scan_inputs(2, 160, 2, 16, 1, 16, torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = selective_scan(**inputs, state_every=32)[0]
    stored = {t.untyped_storage().data_ptr() for t in inputs.values() if t is not None}
    assert saved and all(t.untyped_storage().data_ptr() in stored for t in saved)
    y.float().sum().backward()  # and the backward still runs from them alone
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs.values() if t is not None)


def test_noncontiguous_inputs():
    batch, seqlen, nheads, headdim, dstate = 2, 48, 4, 16, 16
    # x, B, C as column slices of one projection, dt with a stride, as the model produces them
    zxbc = torch.randn(batch, seqlen, nheads * headdim + 2 * dstate + 7, device=DEVICE)
    x = zxbc[..., :nheads * headdim].unflatten(-1, (nheads, headdim))
    B = zxbc[..., nheads * headdim:nheads * headdim + dstate].unflatten(-1, (1, dstate))
    C = zxbc[..., nheads * headdim + dstate:-7].unflatten(-1, (1, dstate))
    dt = torch.rand(batch, nheads, seqlen, device=DEVICE).transpose(1, 2)
    x_t = torch.randn(batch, seqlen, headdim, nheads, device=DEVICE).transpose(2, 3)  # headdim not innermost
    assert not x.is_contiguous() and not dt.is_contiguous() and x_t.stride(-1) != 1
    A = -torch.rand(nheads, device=DEVICE) - 0.5
    for xx in (x, x_t):
        inputs = dict(x=xx, dt=dt, A=A, B=B, C=C, D=None, initial_state=None)
        for t in inputs.values():
            if t is not None:
                t.requires_grad_()
        check_scan(inputs, reverse=True, state_every=16)


def test_reference_matches_quadratic_form():
    # y_t = sum_{s<=t} (C_t . B_s) exp(A (dt_{s+1} + ... + dt_t)) dt_s x_s + (C_t . S_0 exp(A (dt_1 + ... + dt_t))) + D x_t
    torch.manual_seed(0)
    batch, seqlen, nheads, headdim, ngroups, dstate = 2, 12, 4, 3, 2, 5
    inp = {k: None if v is None else v.detach().double().cpu()
           for k, v in scan_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, device="cpu").items()}
    x, dt, A, B, C, D, S0 = (inp[k] for k in ("x", "dt", "A", "B", "C", "D", "initial_state"))
    Bh = B.repeat_interleave(nheads // ngroups, 2)
    Ch = C.repeat_interleave(nheads // ngroups, 2)
    for reverse in (False, True):
        order = torch.arange(seqlen - 1, -1, -1) if reverse else torch.arange(seqlen)
        xs, dts, Bs, Cs = x[:, order], dt[:, order], Bh[:, order], Ch[:, order]  # scan order
        cum = torch.cumsum(dts * A, 1)  # (b, l, h): A (dt_1 + ... + dt_t)
        seg = cum[:, :, None, :] - cum[:, None, :, :]  # [b, t, s, h] = A (dt_{s+1} + ... + dt_t)
        mask = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()[None, :, :, None]
        L = torch.where(mask, torch.exp(seg), 0.0) * torch.einsum("bthn,bshn->btsh", Cs, Bs) * dts[:, None]
        y = torch.einsum("btsh,bshp->bthp", L, xs)
        y = y + torch.einsum("bthn,bhpn->bthp", Cs, S0) * torch.exp(cum)[..., None] + D[:, None] * xs
        y_ref, last = selective_scan_ref(x, dt, A, B, C, D, S0, reverse=reverse, state_every=seqlen)
        assert rel_err(y_ref[:, order], y) < 1e-12
        # the final state, from the same sums
        w = torch.exp(cum[:, -1:] - cum) * dts  # (b, s, h)
        S = torch.einsum("bsh,bshp,bshn->bhpn", w, xs, Bs) + torch.exp(cum[:, -1])[..., None, None] * S0
        assert rel_err(last[:, 0], S) < 1e-12


@pytest.mark.parametrize("reverse,state_every,dt_bias", [(False, None, False), (True, 32, False), (False, 64, True),
                                                        (True, None, True)])
def test_chunked_reference_matches_loop(reverse, state_every, dt_bias):
    # the chunked reference against the loop; 100 positions leave a partial last chunk without state_every
    seqlen = 128 if state_every else 100
    check_scan(scan_inputs(2, seqlen, 4, 16, 2, 16, device="cpu", dt_bias=dt_bias), reverse, state_every,
               tol=1e-5, fn=selective_scan_chunked)


def test_cpu_training_takes_the_chunked_reference(monkeypatch):
    # without the interpreter, a CPU scan is the chunked reference itself: the same bits
    monkeypatch.setattr(scan_kernel, "CPU_KERNELS", False)
    inputs = {k: None if v is None else v.detach() for k, v in scan_inputs(1, 64, 2, 16, 1, 16, device="cpu").items()}
    assert torch.equal(selective_scan(**inputs, state_every=32)[1], selective_scan_chunked(**inputs, state_every=32)[1])


def test_scan_bad_inputs():
    inp = {k: None if v is None else v.detach() for k, v in scan_inputs(2, 16, 4, 8, 2, 8).items()}

    def fails(match, **changes):
        with pytest.raises(ValueError, match=match):
            selective_scan(**{**inp, **changes})

    fails(r"x must have shape \(batch, seqlen, nheads, headdim\)", x=inp["x"][0])
    fails(r"dt must have shape \(2, 16, 4\)", dt=inp["dt"][:, :8])
    fails(r"A must have shape \(4,\)", A=inp["A"][:2])
    fails(r"B must have shape \(batch=2, seqlen=16, ngroups, dstate\)", B=inp["B"][:, 1:])
    fails(r"C must have shape \(2, 16, 2, 8\)", C=inp["C"][..., :4])
    fails(r"D must have shape \(4,\)", D=torch.zeros(3, device=DEVICE))
    fails(r"initial_state must have shape \(2, 4, 8, 8\)", initial_state=torch.zeros(2, 4, 8, device=DEVICE))
    fails(r"dt_bias must have shape \(4,\)", dt_bias=torch.zeros(3, device=DEVICE))
    fails(r"nheads \(4\) must be divisible by ngroups \(3", B=inp["B"][:, :, :1].expand(-1, -1, 3, -1),
          C=inp["C"][:, :, :1].expand(-1, -1, 3, -1))
    both = lambda t: torch.stack([t, t], dim=2)  # with a direction axis
    fails(r"with ndir 1 or 2", x=torch.stack([inp["x"]] * 3, dim=2))
    fails(r"B must have shape \(batch=2, seqlen=16, ndir=2, ngroups, dstate\)", x=both(inp["x"]))
    fails(r"A must have shape \(2, 4\)", x=both(inp["x"]), dt=both(inp["dt"]), B=both(inp["B"]), C=both(inp["C"]))
    fails(r"state_every \(5\) must divide seqlen \(16\)", state_every=5)
    fails(r"state_every must be None or a positive int", state_every=0)
    fails(r"x must have a floating dtype .* got torch.int64", x=inp["x"].long())
    fails(r"B must have a floating dtype", B=inp["B"].to(torch.int32))
    fails(r"x must have a floating dtype", x=inp["x"].double())
    other = "meta" if DEVICE == "cpu" else "cpu"
    fails(r"C is on .* but x is on", C=inp["C"].to(other))
    with pytest.raises(ValueError, match="dt must have shape"):
        selective_scan_ref(**{**inp, "dt": inp["dt"][..., :1]})


# ------------------------------------------------------------------------------------------------
# the fused conv + SiLU and the fused gated norm


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("seqlen, width, channels, tail, dtype", [
    (37, 4, 20, True, torch.float32), (200, 4, 130, False, torch.float32), (2, 4, 9, True, torch.float32),
    (1, 2, 7, True, torch.float32), (70, 3, 136, True, torch.bfloat16)])
@pytest.mark.parametrize("dirs", [(), (2,)])  # with a direction axis: both directions in one call
def test_conv_matches_reference(reverse, seqlen, width, channels, tail, dtype, dirs):
    # x is a slice of a wider tensor, as in the model (a part of in_proj's output)
    x = torch.randn(2, seqlen, *dirs, channels + 5, device=DEVICE).to(dtype)[..., 3:3 + channels].requires_grad_()
    weight = torch.randn(*dirs, channels, width, device=DEVICE, requires_grad=True)
    bias = torch.randn(*dirs, channels, device=DEVICE, requires_grad=True)
    tail = torch.randn(2, width - 1, *dirs, channels, device=DEVICE).to(dtype).requires_grad_() if tail else None
    dy = torch.randn(2, seqlen, *dirs, channels, device=DEVICE).to(dtype)
    leaves = [t for t in (x, weight, bias, tail) if t is not None]
    y = scan_kernel.causal_conv(x, weight, bias, tail, reverse)
    grads = torch.autograd.grad(y, leaves, dy)
    as64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64, b64 = as64[:3]
    t64 = as64[3] if tail is not None else torch.zeros(2, width - 1, *dirs, channels, device=DEVICE,
                                                        dtype=torch.float64)
    y_ref = scan_kernel.causal_conv_ref(x64, w64, b64, t64, reverse)
    grads_ref = torch.autograd.grad(y_ref, as64, dy.double())
    tol = tolerance(dtype)
    assert y.dtype == dtype and rel_err(y, y_ref) < tol
    for name, g, g_ref in zip(("x", "weight", "bias", "tail"), grads, grads_ref):
        assert rel_err(g, g_ref) < tol, name


# the backward's programs take several rows on a GPU's large inputs; here 3 (the last program short)
@pytest.mark.parametrize("rows, d, dtype, rows_a_program", [(37, 48, torch.float32, None), (5, 100, torch.float32, None),
                                                            (40, 64, torch.bfloat16, None), (50, 64, torch.float32, 3)])
@pytest.mark.parametrize("dirs", [(), (2,)])  # with a direction axis: both directions in one call
def test_gated_norm_matches_reference(rows, d, dtype, rows_a_program, dirs, monkeypatch):
    if rows_a_program:
        monkeypatch.setattr(scan_kernel, "_gated_norm_rows", lambda rows, grad: rows_a_program)
    n = math.prod(dirs) * d  # z a slice, as in the model
    z = torch.randn(2, rows, n + 3, device=DEVICE).to(dtype)[..., 1:1 + n].unflatten(-1, (*dirs, d)).requires_grad_()
    y = torch.randn(2, rows, *dirs, d, device=DEVICE).to(dtype).requires_grad_()
    weight = torch.randn(*dirs, d, device=DEVICE, requires_grad=True)
    dout = torch.randn(2, rows, *dirs, d, device=DEVICE).to(dtype)
    out = scan_kernel.gated_rms_norm(y, z, weight)
    grads = torch.autograd.grad(out, [y, z, weight], dout)
    as64 = [t.detach().double().requires_grad_() for t in (y, z, weight)]
    ref = scan_kernel.gated_rms_norm_ref(*as64)
    grads_ref = torch.autograd.grad(ref, as64, dout.double())
    assert out.dtype == dtype and rel_err(out, ref) < tolerance(dtype)
    for name, g, g_ref in zip(("y", "z", "weight"), grads, grads_ref):
        assert rel_err(g, g_ref) < tolerance(dtype), name


# ------------------------------------------------------------------------------------------------
# the scan on the GPU, at sizes the interpreter can't reach


@gpu
@pytest.mark.parametrize("dtype,reverse,state_every", [(torch.float32, False, 2048), (torch.bfloat16, True, None),
                                                       (torch.bfloat16, False, 64)])
def test_gpu_long_sequence(dtype, reverse, state_every):
    inputs = scan_inputs(2, 8192, 4, 64, 1, 128, dtype, D=True, init=True)
    check_scan(inputs, reverse, state_every, ref_fn=selective_scan_chunked, per_position=dtype == torch.bfloat16)


@gpu
def test_gpu_extreme_dt():
    # dt from 1e-4 to 10 with A down to -e^2: decays from 1 to e^-70 per step; nothing may overflow
    inputs = scan_inputs(1, 16384, 4, 64, 1, 64, torch.bfloat16, dt_range=(1e-4, 10.0))
    with torch.no_grad():
        inputs["A"].copy_(-torch.exp(torch.linspace(-2, 2, 4)))
    out = check_scan(inputs, reverse=False, state_every=64, ref_fn=selective_scan_chunked, per_position=True)
    assert all(torch.isfinite(v).all() for v in out.values() if v is not None)


@gpu
def test_gpu_offsets_past_2_31():
    # x with 3 * 2^30 elements; batch element 2 starts past 2^31. It copies element 0, so every result
    # must match element 0's, and element 0 must match a run of it alone (offsets below 2^31).
    batch, seqlen, nheads, headdim, dstate = 3, 1 << 22, 4, 64, 16
    one = {k: v.detach() for k, v in scan_inputs(1, seqlen, nheads, headdim, 1, dstate, torch.bfloat16,
                                                  D=True, init=False).items() if v is not None}
    big = {k: (v.expand(batch, *v.shape[1:]).contiguous() if v.dim() > 1 else v).requires_grad_()
           for k, v in one.items()}
    assert big["x"].numel() >= 3 * 2**30
    y = selective_scan(**big)
    dy = torch.randn(1, seqlen, nheads, headdim, device=DEVICE, dtype=torch.bfloat16)
    y.backward(dy.expand(batch, -1, -1, -1))
    for t in (y, big["x"].grad, big["dt"].grad, big["B"].grad):
        assert torch.isfinite(t).all()
        assert torch.equal(t[2], t[0]) if t is y or t is big["x"].grad else rel_err(t[2], t[0]) < 1e-6
    small = {k: v.clone().requires_grad_() for k, v in one.items()}
    y1 = selective_scan(**small)
    y1.backward(dy)
    assert rel_err(y[:1], y1) < 1e-2 and rel_err(big["x"].grad[:1], small["x"].grad) < 1e-2
    del big, y
    # and the first positions against the reference (the scan is causal)
    head = {k: v[:, :512] if v.dim() > 1 else v for k, v in small.items()}
    assert rel_err(y1[:, :512], selective_scan_ref(**{k: v.detach() for k, v in head.items()})) < 1e-2


# ------------------------------------------------------------------------------------------------
# the model


@pytest.fixture
def torch_scan(monkeypatch):
    """Model tests on a CPU take the vectorised PyTorch scan (itself checked against the loop above)."""
    if DEVICE == "cpu":
        monkeypatch.setattr(scan_kernel, "CPU_KERNELS", False)


def small_model(arch, block_len=None, vocab_size=97, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=64, n_layer=4, arch=arch, attn_every=2, block_len=block_len,
                      n_head=2, headdim=32, dstate=16, **kw)
    return DiffuMamba(cfg).to(DEVICE)


def noisy_pair(batch, seqlen, vocab_size, p=0.5):
    x0 = torch.randint(0, vocab_size, (batch, seqlen), device=DEVICE)
    xt = torch.where(torch.rand(batch, seqlen, device=DEVICE) < p, vocab_size, x0)
    return xt, x0


def cached_logits(model, xt, x0):
    K = model.cfg.block_len
    cache, out = model.new_cache(xt.shape[0], xt.shape[1]), []
    for b in range(xt.shape[1] // K):
        out.append(model.forward_block(xt[:, b * K:(b + 1) * K], cache))
        model.commit(x0[:, b * K:(b + 1) * K], cache)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_cache_is_exact(arch, torch_scan):
    model = small_model(arch, block_len=8)
    xt, x0 = noisy_pair(2, 48, 97)
    with torch.no_grad():
        assert rel_err(cached_logits(model, xt, x0), model(xt, x0=x0)) < 1e-5


@pytest.mark.parametrize("arch,K,d_conv", [("mamba", 3, 1), ("mamba", 2, 4), ("hybrid", 5, 2)])
def test_block_cache_is_exact_for_odd_shapes(arch, K, d_conv, torch_scan):
    # blocks shorter than the conv window, a conv of width 1, blocks that are no power of two
    model = small_model(arch, block_len=K, d_conv=d_conv)
    xt, x0 = noisy_pair(2, 6 * K, 97)
    with torch.no_grad():
        assert rel_err(cached_logits(model, xt, x0), model(xt, x0=x0)) < 1e-5


def test_chunks_fit_any_block_length():
    for K in list(range(1, 200)) + [1000, 4096]:
        c = scan_kernel._chunk_len(10 * K, K)
        assert K % c == 0 and c <= 32


def test_block_cache_is_exact_through_the_kernels():
    # the same with the Triton kernels (the interpreter on a CPU), block length 16: several states per scan
    model = small_model("hybrid", block_len=16)
    xt, x0 = noisy_pair(1, 64, 97)
    with torch.no_grad():
        assert rel_err(cached_logits(model, xt, x0), model(xt, x0=x0)) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_block_causality(arch, torch_scan):
    K, L = 8, 32
    model = small_model(arch, block_len=K)
    xt, x0 = noisy_pair(2, L, 97)
    with torch.no_grad():
        base = model(xt, x0=x0)
        # later blocks, clean or noisy, leave earlier blocks' logits bit-identical
        xt2, x02 = xt.clone(), x0.clone()
        xt2[:, 2 * K:] = torch.randint(0, 98, (2, L - 2 * K), device=DEVICE)
        x02[:, 2 * K:] = torch.randint(0, 97, (2, L - 2 * K), device=DEVICE)
        assert torch.equal(model(xt2, x0=x02)[:, :2 * K], base[:, :2 * K])
        # a clean token of block 1 reaches noisy block 2
        x03 = x0.clone()
        x03[:, K + 3] = (x03[:, K + 3] + 1) % 97
        assert not torch.allclose(model(xt, x0=x03)[:, 2 * K:3 * K], base[:, 2 * K:3 * K])
        # within a block both ways: its last token reaches its first position
        xt4 = xt.clone()
        xt4[:, K - 1] = (xt4[:, K - 1] + 1) % 97
        assert not torch.allclose(model(xt4, x0=x0)[:, 0], base[:, 0])


@pytest.mark.parametrize("arch", ARCHS)
def test_full_sequence_is_bidirectional(arch, torch_scan):
    model = small_model(arch)
    xt, _ = noisy_pair(2, 40, 97)
    xt2 = xt.clone()
    xt2[:, -1] = (xt2[:, -1] + 1) % 97
    with torch.no_grad():
        assert not torch.allclose(model(xt2)[:, 0], model(xt)[:, 0])


def test_rope_scores_depend_on_relative_position():
    # RoPE rotates each pair (i, i + head_dim / 2) by position * 10000^(-i / (head_dim / 2)), so a query-key
    # score depends on the two positions only through their difference; position 0 is no rotation
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 16)
    pos = torch.randperm(1000)[:20]
    scores = lambda shift: rope(q, pos + shift) @ rope(k, pos + shift).transpose(-1, -2)
    assert torch.allclose(scores(0), scores(777), atol=1e-3) and not torch.allclose(scores(0), q @ k.transpose(-1, -2))
    assert torch.equal(rope(q, torch.zeros(20, dtype=torch.long)), q)
    angle = 5 * 10000.0 ** (-3 / 8)  # position 5, pair 3 of 8, rotated by hand
    x = rope(q, torch.full((20,), 5))
    assert torch.allclose(x[..., 3], q[..., 3] * math.cos(angle) - q[..., 11] * math.sin(angle), atol=1e-5)
    assert torch.allclose(x[..., 11], q[..., 3] * math.sin(angle) + q[..., 11] * math.cos(angle), atol=1e-5)


def test_backward_direction_is_the_flipped_forward():
    # direction 1 (the reverse scan and the look-ahead conv) against direction 0 given the same parameters
    # (the conv's flipped) and the sequence flipped, both in one call (through the kernels: the interpreter
    # on a CPU)
    cfg = ModelConfig(vocab_size=10, d_model=64, n_layer=1, headdim=32, dstate=16)
    mixer = BiMamba(cfg).to(DEVICE)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if "proj" not in name:
                per_dir = p.unflatten(0, (2, -1))
                per_dir[0] = per_dir[1].flip(-1) if name == "conv_weight" else per_dir[1]
    parts = [torch.randn(2, 50, n, device=DEVICE) for n in (mixer.d_inner, mixer.conv_dim, mixer.nheads)]
    with torch.no_grad():
        y = mixer.mix(*(torch.stack([p.flip(1), p], dim=2) for p in parts), BOTH)[0]
    assert rel_err(y[..., mixer.d_inner:], y[..., :mixer.d_inner].flip(1)) < tolerance(torch.float32)


def test_preset_parameter_counts():
    # within one preset the three archs match to 5% (the Mamba blocks' MLP is narrower to make it so)
    for name in PRESETS:
        counts = {}
        for arch in ARCHS:
            with torch.device("meta"):
                counts[arch] = DiffuMamba(preset_config(name, arch)).num_params()
        print(name, {a: f"{n / 1e6:.1f}M" for a, n in counts.items()})
        assert max(counts.values()) / min(counts.values()) < 1.05, (name, counts)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block_len", [None, 8])
def test_training_step_gives_finite_gradients(arch, block_len, torch_scan):
    # every parameter takes part in the loss, so every one gets a finite gradient that is not all zeros
    model = small_model(arch, block_len)
    x0 = torch.randint(0, 97, (2, 32), device=DEVICE)
    loss = diffusion.forward_loss(model, model.cfg, x0, torch.Generator(device=DEVICE).manual_seed(0))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_compiled_model_matches_eager():
    # torch.compile traces the whole model, the kernels' operators included, in one graph (fullgraph:
    # no break), forward and backward, and gives the eager loss and gradients. On a GPU through inductor
    # and the Triton kernels; on a CPU through the interpreter's kernels with aot_eager (dynamo and
    # autograd's tracing, without inductor's C++ code generation). A second shape makes dynamo trace the
    # sizes as symbols, which the operators' shape functions must take too.
    torch.manual_seed(0)
    model = DiffuMamba(ModelConfig(vocab_size=97, d_model=64, n_layer=2, arch="hybrid", attn_every=2, block_len=8,
                                   n_head=2, headdim=32, dstate=16)).to(DEVICE)  # a Mamba block and an attention one
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")

    def loss_and_grads(m, x0):
        model.zero_grad()
        loss = diffusion.forward_loss(m, model.cfg, x0, torch.Generator(device=DEVICE).manual_seed(0))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    for shape in ((2, 32), (3, 48)):
        x0 = torch.randint(0, 97, shape, device=DEVICE)
        loss, grads = loss_and_grads(model, x0)
        loss_c, grads_c = loss_and_grads(compiled, x0)
        assert rel_err(loss_c, loss) < tolerance(torch.float32)
        for (name, _), g, g_c in zip(model.named_parameters(), grads, grads_c):
            assert rel_err(g_c, g) < tolerance(torch.float32), name


def test_model_errors(torch_scan):
    model = small_model("hybrid", block_len=8)
    xt, x0 = noisy_pair(1, 32, 97)
    with pytest.raises(ValueError, match=r"seqlen \(30\) must be a multiple of block_len \(8\)"):
        model(xt[:, :30], x0=x0[:, :30])
    with pytest.raises(ValueError, match=r"needs the clean sequence"):
        model(xt)
    # token values are checked where they enter: the samplers, data.load (test_bad_data_paths)
    with pytest.raises(ValueError, match=r"template holds token ids outside \[0, 97\]"):
        diffusion.sample_full(small_model("mamba"), xt + 1000, 4)
    with pytest.raises(ValueError, match=r"prompt holds token ids outside \[0, 96\]"):
        diffusion.sample_block(model, torch.full_like(x0[:, :5], 97), 16, 4)
    with pytest.raises(ValueError, match=r"xt must be an integer tensor"):
        model(xt.float(), x0=x0)
    with pytest.raises(ValueError, match=r"xt_block must have shape \(batch=1, block_len=8\)"):
        model.forward_block(xt[:, :4], model.new_cache(1, 32))
    with pytest.raises(ValueError, match=r"new_cache needs length= for a model with attention layers"):
        model.new_cache(1)
    cache = model.new_cache(1, 8)
    model.commit(x0[:, :8], cache)
    with pytest.raises(ValueError, match=r"the cache holds 8 tokens and has room for 8"):
        model.forward_block(xt[:, 8:16], cache)
    with pytest.raises(ValueError, match=r"loss_weights must have xt's shape"):
        model(xt, x0=x0, loss_weights=torch.ones(1, 8, device=DEVICE))
    full = small_model("mamba")
    with pytest.raises(ValueError, match=r"forward_block needs a block-mode model"):
        full.forward_block(xt[:, :8], None)
    with pytest.raises(ValueError, match=r"new_cache needs a block-mode model"):
        full.new_cache(1)
    with pytest.raises(ValueError, match=r"x0 is for block mode, or the targets of loss_weights"):
        full(xt, x0=x0)
    with pytest.raises(ValueError, match=r"loss_weights needs the targets"):
        full(xt, loss_weights=torch.ones_like(xt, dtype=torch.float))
    with pytest.raises(ValueError, match=r"arch must be one of"):
        ModelConfig(arch="rnn")
    with pytest.raises(ValueError, match=r"unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(ValueError, match=r"block_len must be None or a positive int"):
        ModelConfig(block_len=0)


# ------------------------------------------------------------------------------------------------
# diffusion: noise and losses


def test_loss_of_a_perfect_model_is_zero():
    # logits 30 on the right token, 0 elsewhere: h one-hot, the output weight 30 I
    V = 50
    x0 = torch.randint(0, V, (4, 64), device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    t = diffusion.noise_levels(x0, None, g)
    xt = diffusion.mask_tokens(x0, t, V, g)
    h = torch.nn.functional.one_hot(x0.flatten(), V).float()
    w = diffusion.loss_weights(xt, t, V).flatten()
    assert scan_kernel.linear_cross_entropy(h, 30 * torch.eye(V, device=DEVICE), x0.flatten(), w, V) < 1e-10


def test_loss_of_uniform_logits_is_log_vocab():
    # E[(1/t) [masked]] = 1 for each token, so uniform logits cost log V per token in expectation
    V = 40
    x0 = torch.randint(0, V, (256, 128))
    g = torch.Generator().manual_seed(0)
    t = diffusion.noise_levels(x0, None, g)
    xt = diffusion.mask_tokens(x0, t, V, g)
    w = diffusion.loss_weights(xt, t, V).flatten()
    loss = scan_kernel.linear_cross_entropy_ref(torch.randn(x0.numel(), 8), torch.zeros(V, 8), x0.flatten(), w, V)
    assert abs(loss.item() / math.log(V) - 1) < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_plain(dtype):
    # the fused output layer and loss against logits formed whole in float64: the loss and the gradients
    # of h and of the weight, whose rows past the vocabulary (padding) get none; rows of weight 0 included
    rows, d, V, ncols = 37, 24, 100, 128
    h = torch.randn(rows, d, device=DEVICE).to(dtype).requires_grad_()
    weight = torch.randn(ncols, d, device=DEVICE).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (rows,), device=DEVICE)
    w = torch.rand(rows, device=DEVICE) * (torch.rand(rows, device=DEVICE) < 0.6)
    loss = scan_kernel.linear_cross_entropy(h, weight, targets, w, V)
    grads = torch.autograd.grad(3 * loss, [h, weight])
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, weight))
    nll = torch.nn.functional.cross_entropy((h64 @ w64.t())[:, :V], targets, reduction="none")
    ref = (nll * w.double()).sum()
    grads_ref = torch.autograd.grad(3 * ref, [h64, w64])
    tol = tolerance(dtype)
    assert loss.dtype == torch.float32 and abs(loss.item() / ref.item() - 1) < tol
    for name, got, want in zip(("h", "weight"), grads, grads_ref):
        assert got.dtype == dtype and rel_err(got, want) < tol, name
    assert not grads[1][V:].any()


def test_masking_rate_follows_t():
    x0 = torch.zeros(5, 20000, dtype=torch.long)
    t = torch.tensor([0.001, 0.1, 0.5, 0.9, 1.0])[:, None].expand(5, 20000)
    rate = (diffusion.mask_tokens(x0, t, 7, torch.Generator().manual_seed(0)) == 7).float().mean(1)
    assert torch.allclose(rate, t[:, 0], atol=0.01)


def test_t_is_antithetic():
    n = 64
    t = diffusion.sample_t(n, torch.Generator().manual_seed(3), "cpu")
    u = ((t - diffusion.EPS) / (1 - diffusion.EPS)).sort().values
    # one draw in each stratum [i/n, (i+1)/n), and all strata shifted by the same offset
    assert torch.equal((u * n).floor().long(), torch.arange(n))
    assert torch.allclose(u - torch.arange(n) / n, (u - torch.arange(n) / n)[0].expand(n), atol=1e-6)
    lo, hi = 0.3, 0.8
    t = diffusion.sample_t(n, torch.Generator().manual_seed(3), "cpu", lo, hi)
    assert t.min() >= lo and t.max() <= hi


def test_block_t_is_constant_within_blocks():
    x0 = torch.zeros(4, 64, dtype=torch.long)
    t = diffusion.noise_levels(x0, 16, torch.Generator().manual_seed(0))
    blocks = t.view(4, 4, 16)
    assert torch.equal(blocks, blocks[..., :1].expand(-1, -1, 16))
    assert blocks[..., 0].unique().numel() == 16


# ------------------------------------------------------------------------------------------------
# data


def test_builtin_corpus_is_deterministic(tmp_path):
    a, b = (data.prepare(None, 512, cache_root=str(tmp_path / d)) for d in "ab")
    for split in ("train", "val"):
        with open(os.path.join(a, f"{split}.bin"), "rb") as fa, open(os.path.join(b, f"{split}.bin"), "rb") as fb:
            assert fa.read() == fb.read()
    with open(os.path.join(a, "meta.json")) as f:
        meta = json.load(f)
    assert meta["tokenizer"] == "r50k_base" and meta["train_tokens"] > 1_000_000 and meta["val_tokens"] > 10_000
    # train and val share no file; the val files are about 2%
    root, files = data.stdlib_files()
    rel = [os.path.relpath(f, root) for f in files]
    val = [r for r in rel if data.is_val(r)]
    assert 0.005 < len(val) / len(rel) < 0.05
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split(os.sep))
    # the stream decodes back to the source, documents joined by <|endoftext|>
    train = np.memmap(os.path.join(a, "train.bin"), dtype=np.uint16, mode="r")
    first_train = next(r for r in rel if not data.is_val(r))
    end = int(np.argmax(train == data.EOT))
    assert data.tokenizer().decode(train[:end].tolist()) == data.read_text(os.path.join(root, first_train))


def test_text_file_data(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("It was the best of times, it was the worst of times.\n" * 300)
    train, val = data.load(data.prepare(str(path), 64, cache_root=str(tmp_path / "cache")), 64)
    assert len(val) > 64 and len(train) > 40 * len(val)
    text = data.tokenizer().decode(np.concatenate([train, val]).tolist())
    assert text == path.read_text() + "<|endoftext|>"


def write_docs(folder, n, words, seed=0):
    """n text files of `words` random words each, in folder; returns their paths."""
    rng = np.random.default_rng(seed)
    vocab = "the of and to in is for on that by this with from as at def return import class self".split()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"doc{i:03d}.txt" for i in range(n)]
    for p in paths:
        p.write_text(" ".join(rng.choice(vocab, words)) + "\n")
    return paths


def test_split_rule(tmp_path, capsys):
    cache, enc = str(tmp_path / "cache"), data.tokenizer()
    tokens = lambda p: enc.encode_ordinary(p.read_text()) + [data.EOT]
    # many files: by file, the val files whole and none of them in train
    paths = write_docs(tmp_path / "many", 200, 300)
    train, val = data.load(data.prepare(str(tmp_path / "many"), 64, cache_root=cache), 64)
    assert "split by file" in capsys.readouterr().out
    val_files = [p for p in paths if data.is_val(p.name)]
    assert val_files and val.tolist() == sum((tokens(p) for p in val_files), [])
    assert len(train) + len(val) == sum(len(tokens(p)) for p in paths)
    # a handful of files: by tokens, the last 2% of the stream but at least a sequence
    paths = write_docs(tmp_path / "few", 4, 100, seed=1)
    stream = sum((tokens(p) for p in paths), [])
    assert sum(len(tokens(p)) for p in paths if data.is_val(p.name)) < 128  # their file split would not serve
    d = data.prepare(str(tmp_path / "few"), 128, cache_root=cache)
    assert "split by tokens" in capsys.readouterr().out
    train, val = data.load(d, 128)
    assert val.tolist() == stream[-128:] and train.tolist() == stream[:-128]
    # cached for the same sequence length; a longer one splits again
    assert data.prepare(str(tmp_path / "few"), 128, cache_root=cache) == d and not capsys.readouterr().out
    train, val = data.load(data.prepare(str(tmp_path / "few"), 150, cache_root=cache), 150)
    assert len(val) == 150 and "split by tokens" in capsys.readouterr().out


def test_bad_data_paths(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="does not exist"):
        data.prepare(str(tmp_path / "nope.txt"), 64, cache_root=cache)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is an empty file"):
        data.prepare(str(tmp_path / "empty.txt"), 64, cache_root=cache)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\0\1\2" * 100)
    with pytest.raises(ValueError, match="holds no text files"):
        data.prepare(str(tmp_path / "bin"), 64, cache_root=cache)
    with pytest.raises(ValueError, match="is not a UTF-8 text file"):
        data.prepare(str(tmp_path / "bin" / "x.dat"), 64, cache_root=cache)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text: its files are empty"):
        data.prepare(str(tmp_path / "blank"), 64, cache_root=cache)
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(ValueError, match=r"too little text: \d+ tokens, and a split needs a sequence \(--seq_len=64\)"):
        data.prepare(str(tmp_path / "short.txt"), 64, cache_root=cache)
    write_docs(tmp_path / "broken", 3, 100)
    os.symlink(tmp_path / "gone.txt", tmp_path / "broken" / "link.txt")  # a file that cannot be read
    with pytest.raises(ValueError, match=r"cannot read .*link\.txt"):
        data.prepare(str(tmp_path / "broken"), 64, cache_root=cache)
    (tmp_path / "foreign").mkdir()
    np.full(100, 60000, dtype=np.uint16).tofile(tmp_path / "foreign" / "train.bin")
    np.full(100, 7, dtype=np.uint16).tofile(tmp_path / "foreign" / "val.bin")
    with pytest.raises(ValueError, match="past the GPT-2 vocabulary"):
        data.load(data.prepare(str(tmp_path / "foreign"), 64, cache_root=cache), 64)


# ------------------------------------------------------------------------------------------------
# training (train.py in subprocesses, on the PyTorch scan path: no interpreter)

TRAIN = [sys.executable, os.path.join(HERE, "train.py")]
TINY_RUN = ["--d_model=64", "--n_layer=2", "--seq_len=64", "--batch_size=4", "--eval_iters=2", "--warmup_iters=3",
            "--device=cpu", "--log_interval=1"]


def subprocess_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "shakes.txt"
    words = "to be or not to be that is the question whether tis nobler in the mind to suffer".split()
    rng = np.random.default_rng(0)
    path.write_text(" ".join(rng.choice(words, 30000)))
    # tokenised here, next to the text: train.py takes the cache directory as it is
    return f"--data={data.prepare(str(path), 64, cache_root=str(path.parent / 'cache'))}"


def train(args, **kw):
    return subprocess.run(TRAIN + args, env=subprocess_env(), capture_output=True, text=True, timeout=600, **kw)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def params_of(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def test_tiny_run_learns(tmp_path, text_data):
    r = train([text_data, f"--out_dir={tmp_path}", "--max_iters=60", "--eval_interval=30", "--lr=3e-3"] + TINY_RUN)
    assert r.returncode == 0, r.stderr
    losses = [row["loss"] for row in read_log(tmp_path) if "loss" in row]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    assert "done: 60 iters; val NELBO" in r.stdout


def test_a_few_files_train_resume_and_sample(tmp_path):
    # a user's own small corpus: four short documents (none hashes into val, so the split is by tokens)
    write_docs(tmp_path / "docs", 4, 400)
    try:
        common = [f"--data={tmp_path / 'docs'}", f"--out_dir={tmp_path / 'out'}", "--eval_interval=2"] + TINY_RUN
        r = train(common + ["--max_iters=4"])
        assert r.returncode == 0, r.stderr
        assert "split by tokens" in r.stdout and "done: 4 iters; val NELBO" in r.stdout
        r = train(common + ["--max_iters=6", "--resume"])
        assert r.returncode == 0 and "resuming at iter 4" in r.stdout, r.stderr
        r = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), f"--out_dir={tmp_path / 'out'}",
                            "--device=cpu", "--num_samples=1", "--length=24"], env=subprocess_env(), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0 and "---------- sample 0 ----------" in r.stdout and "trained 6 iters" in r.stdout, r.stderr
    finally:  # the CLI's token cache of this corpus, in data/
        shutil.rmtree(data.prepare(str(tmp_path / "docs"), 64), ignore_errors=True)


def test_resume_continues_exactly(tmp_path, text_data):
    common = [text_data, "--grad_accum=2", "--eval_interval=5", "--arch=hybrid", "--block_len=16"] + TINY_RUN
    stale = json.dumps(dict(iter=9, loss=0.0)) + "\n"  # a row past the checkpoint, or from an older run
    (tmp_path / "straight").mkdir()
    (tmp_path / "straight" / "log.jsonl").write_text(stale)
    assert train(common + [f"--out_dir={tmp_path / 'straight'}", "--max_iters=12"]).returncode == 0
    assert train(common + [f"--out_dir={tmp_path / 'split'}", "--max_iters=6", "--lr_decay_iters=12"]).returncode == 0
    with open(tmp_path / "split" / "log.jsonl", "a") as f:
        f.write(stale + '{"iter": 9, "lo')  # and a last line that a kill cut short
    r = train(common + [f"--out_dir={tmp_path / 'split'}", "--max_iters=12", "--resume"])
    assert r.returncode == 0 and "resuming at iter 6" in r.stdout, r.stderr
    a, b = params_of(tmp_path / "straight"), params_of(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [(row["iter"], row["loss"]) for row in read_log(tmp_path / run) if "loss" in row]
    assert losses("straight") == losses("split") and [i for i, _ in losses("split")] == list(range(1, 13))


def test_ctrl_c_leaves_a_loadable_checkpoint(tmp_path, text_data):
    proc = subprocess.Popen(TRAIN + [text_data, f"--out_dir={tmp_path}", "--max_iters=100000"] + TINY_RUN,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 3):  # three iterations logged
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"training never logged three iterations (exit code {proc.returncode}): {err[-2000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in out + err
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] >= 3
    model = DiffuMamba(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])  # strict: every parameter there, with its shape
    assert all(torch.equal(p, ckpt["model"][k]) for k, p in model.state_dict().items())


def test_truncated_or_stale_checkpoint_is_refused(tmp_path, text_data):
    assert train([text_data, f"--out_dir={tmp_path}", "--max_iters=2"] + TINY_RUN).returncode == 0
    path = tmp_path / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:5000])
    r = train([text_data, f"--out_dir={tmp_path}", "--max_iters=4", "--resume"] + TINY_RUN)
    assert r.returncode == 2 and "truncated or corrupt" in r.stderr
    r = train([text_data, f"--out_dir={tmp_path / 'none'}", "--resume"] + TINY_RUN)
    assert r.returncode == 2 and "no checkpoint at" in r.stderr
    assert train([text_data, f"--out_dir={tmp_path}", "--max_iters=2"] + TINY_RUN).returncode == 0
    ckpt = torch.load(path, weights_only=True)
    del ckpt["format"]  # as the code before the format was written
    torch.save(ckpt, path)
    r = train([text_data, f"--out_dir={tmp_path}", "--max_iters=4", "--resume"] + TINY_RUN)
    assert r.returncode == 2 and "another version of the model code" in r.stderr


def test_bad_training_flags(tmp_path, text_data):
    r = train([text_data, f"--out_dir={tmp_path}", "--block_len=48"] + TINY_RUN)
    assert r.returncode == 2 and "--seq_len (64) must be a multiple of --block_len (48)" in r.stderr
    r = train([f"--data={tmp_path / 'missing'}", f"--out_dir={tmp_path}"] + TINY_RUN)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_device_defaults():
    # the main job's settings follow the device; CUDA graphs by default only for one GPU process
    import train as train_module
    def resolved(argv, device_type, ddp):
        _, args = train_module.parse_args(argv)
        train_module.resolve(args, device_type, ddp)
        return args
    one_gpu, ddp_gpu, cpu = resolved([], "cuda", False), resolved([], "cuda", True), resolved([], "cpu", False)
    assert (one_gpu.compile, one_gpu.preset, one_gpu.dtype) == ("reduce-overhead", "small", "bfloat16")
    assert (ddp_gpu.compile, cpu.compile, cpu.preset, cpu.dtype) == ("off", "off", "tiny", "float32")
    assert resolved(["--compile=off"], "cuda", False).compile == "off"
    assert resolved(["--compile=default"], "cpu", False).compile == "default"


def test_ddp_matches_one_process(tmp_path, text_data):
    # 2 processes under torchrun with gloo: the same global batch, the same parameters
    common = [text_data, "--grad_accum=2", "--max_iters=6", "--eval_interval=3"] + TINY_RUN
    assert train(common + [f"--out_dir={tmp_path / 'one'}"]).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", TRAIN[1]] + common
                       + [f"--out_dir={tmp_path / 'two'}"], env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = params_of(tmp_path / "one"), params_of(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    va = [row["val_nelbo"] for row in read_log(tmp_path / "one") if "val_nelbo" in row]
    vb = [row["val_nelbo"] for row in read_log(tmp_path / "two") if "val_nelbo" in row]
    assert np.allclose(va, vb, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# samplers


@pytest.mark.parametrize("kind", ["full", "block"])
def test_samplers_keep_context_and_follow_the_seed(kind, torch_scan):
    model = small_model("hybrid", block_len=8 if kind == "block" else None).eval()
    M = model.cfg.vocab_size
    if kind == "full":
        template = torch.randint(0, M, (2, 40), device=DEVICE)
        template[:, 5:12] = M
        template[:, 30:] = M
        run = lambda **kw: diffusion.sample_full(model, template, steps=10, **kw)[0]
    else:
        template = torch.randint(0, M, (2, 13), device=DEVICE)  # a prompt with a partial last block
        run = lambda **kw: diffusion.sample_block(model, template, length=40, steps_per_block=4, **kw)[0]
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert a.shape == (2, 40) and not (a == M).any()
    keep = template != M if kind == "full" else torch.ones_like(template, dtype=torch.bool)
    assert torch.equal(a[:, :template.shape[1]][keep], template[keep])
    assert torch.equal(a, b) and not torch.equal(a, c)
    # greedy tokens revealed by confidence leave nothing to chance: the seed does not matter
    g0 = run(seed=1, temperature=0, reveal="confidence")
    assert torch.equal(g0, run(seed=3, temperature=0, reveal="confidence")) and not (g0 == M).any()
    assert torch.equal(run(seed=5, top_p=0.5), run(seed=5, top_p=0.5))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_at_rows_match_all_logits(arch, torch_scan):
    # the samplers' CPU path forms the output layer at the drawn rows only
    full, block = small_model(arch), small_model(arch, block_len=8)
    xt, x0 = noisy_pair(2, 24, 97)
    rows = (torch.tensor([1, 0, 1, 1], device=DEVICE), torch.tensor([3, 7, 0, 7], device=DEVICE))
    with torch.no_grad():
        assert torch.allclose(full(xt, rows=rows), full(xt)[rows], atol=1e-5)
        cache = block.new_cache(2, 24)
        block.commit(x0[:, :8], cache)
        assert torch.allclose(block.forward_block(xt[:, 8:16], cache, rows),
                              block.forward_block(xt[:, 8:16], cache)[rows], atol=1e-5)


def test_samplers_form_logits_at_the_drawn_rows_on_a_cpu():
    seen = []
    call = lambda ids, rows=None: (seen.append(rows), torch.arange(24.0).view(2, 3, 4))[1]
    rows = (torch.tensor([1, 0]), torch.tensor([2, 1]))
    diffusion.logits_at(call, torch.device("cpu"))(None, rows)
    assert seen[-1] is rows  # the model forms only these rows' logits
    got = diffusion.logits_at(call, torch.device("cuda"))(None, rows)  # every position's, then the rows
    assert seen[-1] is None and torch.equal(got, torch.tensor([[20.0, 21, 22, 23], [4, 5, 6, 7]]))


def test_random_reveal_is_ancestral():
    # ancestral MDLM from t to s reveals each masked position with probability (t - s) / t: before step i
    # of n, a fraction 1 - i / n of the positions masked at the start is still masked; given tokens stay
    batch, length, steps, M = 64, 96, 8, 16  # M: the mask id, one past the vocabulary
    x = torch.full((batch, length), M, device=DEVICE)
    x[:, :length // 3] = 7
    seen = []

    def logits_fn(ids, rows):
        seen.append((ids == M).sum().item())
        return torch.zeros(len(rows[0]), M, device=DEVICE)

    g = torch.Generator(device=DEVICE).manual_seed(1234)
    calls = diffusion.denoise(x, logits_fn, M, steps, 1.0, 1.0, "random", g)
    masked = batch * (length - length // 3)
    expected = [masked * (1 - i / steps) for i in range(steps)]
    assert calls == steps == len(seen) and not (x == M).any() and (x[:, :length // 3] == 7).all()
    for got, want in zip(seen, expected):  # a binomial count: within 5 standard deviations
        assert abs(got - want) < 5 * (masked * 0.25) ** 0.5, (seen, expected)


def test_block_sampler_logits_match_training(torch_scan):
    # what the sampler computes for a block, given the committed prefix, is model(xt, x0=x0)'s block
    model = small_model("hybrid", block_len=8)
    xt, x0 = noisy_pair(1, 32, 97)
    with torch.no_grad():
        full = model(xt, x0=x0)
        cache = model.new_cache(1, 32)
        for b in range(3):
            model.commit(x0[:, 8 * b:8 * b + 8], cache)
        assert rel_err(model.forward_block(xt[:, 24:], cache), full[:, 24:]) < 1e-5


def test_mamba_cache_has_constant_size(torch_scan):
    model = small_model("mamba", block_len=8)
    cache = model.new_cache(2)
    sizes = []
    with torch.no_grad():
        for _ in range(20):
            model.commit(torch.randint(0, 97, (2, 8), device=DEVICE), cache)
            sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1 and cache.length == 160
    hybrid = small_model("hybrid", block_len=8)
    cache = hybrid.new_cache(2, 160)
    with torch.no_grad():
        hybrid.commit(torch.randint(0, 97, (2, 8), device=DEVICE), cache)
    assert cache.nbytes() > sizes[0]  # attention layers keep keys and values


def test_block_sampler_stops_at_end_of_text(torch_scan, monkeypatch):
    model = small_model("mamba", block_len=8, vocab_size=97)
    eot = 5
    real = model.forward_block
    monkeypatch.setattr(model, "forward_block", lambda x, cache, rows=None: real(x, cache, rows).index_fill(
        -1, torch.tensor([eot], device=DEVICE), 50.0))
    empty = torch.zeros(2, 0, dtype=torch.long, device=DEVICE)
    out, _ = diffusion.sample_block(model, empty, 64, 2, stop_token=eot, graph=False)  # the patch is eager-only
    assert out.shape == (2, 8) and (out == eot).all()
    out, _ = diffusion.sample_block(model, empty, 64, 2, graph=False)
    assert out.shape == (2, 64)


@gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_graphed_samplers_match_eager(arch):
    # CUDA-graph replays run the same kernels on the same inputs: the same tokens, and the cache that the
    # replayed commits advance in place (Mamba states, attention keys and values at pos) stays exact
    full, block = small_model(arch, vocab_size=97), small_model(arch, block_len=8, vocab_size=97)
    template = torch.randint(0, 97, (2, 40), device=DEVICE)
    template[:, 5:30] = 97
    prompt = torch.randint(0, 97, (2, 11), device=DEVICE)
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    for reveal, autocast in (("random", None), ("confidence", None), ("threshold", None), ("random", bf16)):
        kw = lambda graph: dict(reveal=reveal, seed=3, graph=graph, autocast=autocast and autocast())
        assert torch.equal(diffusion.sample_full(full, template, 8, **kw(True))[0],
                           diffusion.sample_full(full, template, 8, **kw(False))[0])
        assert torch.equal(diffusion.sample_block(block, prompt, 40, 4, **kw(True))[0],
                           diffusion.sample_block(block, prompt, 40, 4, **kw(False))[0])
    bf16_weights = small_model(arch, block_len=8, vocab_size=97).for_inference(torch.bfloat16)  # sample.py's way
    assert torch.equal(diffusion.sample_block(bf16_weights, prompt, 40, 4, seed=3)[0],
                       diffusion.sample_block(bf16_weights, prompt, 40, 4, seed=3, graph=False)[0])


def periodic_batch(n, generator, period=4, length=32, vocab=16):
    cycle = torch.randint(0, vocab, (n, period), generator=generator)
    return cycle.repeat(1, length // period).to(DEVICE)


@pytest.mark.parametrize("arch,block_len", [("mamba", None), ("mamba", 8), ("hybrid", 8)])
def test_samplers_use_what_the_model_learned(arch, block_len, torch_scan):
    # a tiny language: each sequence repeats a random 4-token cycle. After a few hundred steps the samples
    # repeat with period 4 far above chance (1/16). The floors sit below the worst of 8 seeds on the CPU
    # (0.65 confidence, 0.50 random at 500 steps), since the GPU draws other random numbers.
    model = small_model(arch, block_len, vocab_size=16, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    gd = torch.Generator(device=DEVICE).manual_seed(0)
    for step in range(500):
        loss = diffusion.forward_loss(model, model.cfg, periodic_batch(32, g), gd)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    # random (ancestral) reveal sometimes unmasks two tokens of a cycle in one step, each drawn alone:
    # it scores lower than confidence reveal, both far above chance. Threshold reveal keeps the rule
    # while it reveals several tokens a call: fewer calls than tokens
    # (threshold 0.7: 15-23 calls for 32 tokens a row, periodic 0.59-0.99, over 3 seeds on the CPU)
    for reveal, floor in (("confidence", 0.5), ("random", 0.3), ("threshold", 0.45)):
        if block_len is None:
            out, stats = diffusion.sample_full(model, torch.full((16, 32), 16, device=DEVICE), 32, reveal=reveal,
                                               threshold=0.7)
        else:
            out, stats = diffusion.sample_block(model, torch.zeros(16, 0, dtype=torch.long, device=DEVICE), 32, 8,
                                                reveal=reveal, threshold=0.7)
        periodic = (out[:, 4:] == out[:, :-4]).float().mean().item()
        assert periodic > floor, (reveal, periodic)
        if reveal == "threshold":
            assert stats["calls"] <= 27, stats  # of 32 tokens a row


SPEED_LINE = re.compile(r"warm-up ([\d.]+) s; ([\d,]+) tokens in ([\d.]+) s: ([\d,]+) tokens/s, (\d+) (?:model|forward_block) calls")


def test_sample_cli(tmp_path, torch_scan, capsys, monkeypatch):
    full, block = small_model("mamba", vocab_size=50257), small_model("mamba", block_len=8, vocab_size=50257)
    for name, m in (("full", full), ("block", block)):
        os.makedirs(tmp_path / name)
        torch.save(dict(format=CHECKPOINT_FORMAT, model=m.state_dict(), model_config=m.config_dict(),
                        train_config={}, iter=0), tmp_path / name / "ckpt.pt")

    def run(*args):
        return sample.main([f"--device={DEVICE}", "--num_samples=1", "--length=16", *args])

    def error(match, *args):
        with pytest.raises(SystemExit) as e:
            run(*args)
        assert e.value.code == 2 and match in capsys.readouterr().err

    run(f"--out_dir={tmp_path / 'full'}", "--steps=4", "--infill=def f(x):<|mask:3|>return<|mask|>")
    out = capsys.readouterr().out
    assert "========== infilling ==========\ndef f(x):[...]return[...]" in out
    n, calls = SPEED_LINE.search(out).group(2, 5)
    assert n == "4" and int(calls) <= 4  # 4 masked tokens in 4 steps (a step that reveals nothing calls no model)
    run(f"--out_dir={tmp_path / 'block'}", "--prompt=import os", "--steps_per_block=2", "--reveal=threshold")
    out = capsys.readouterr().out
    assert "---------- sample 0 ----------\nimport os" in out and SPEED_LINE.search(out)
    # the speed leaves the sampler's reported warm-up out: a sampler that spends 0.5 s of warm-up
    real = sample.sample_full

    sampling = []

    def slow_start(*a, **kw):
        time.sleep(0.5)
        start = time.perf_counter()
        tokens, stats = real(*a, **kw)
        sampling.append(time.perf_counter() - start - stats["warmup_s"])
        return tokens, dict(stats, warmup_s=stats["warmup_s"] + 0.5)
    monkeypatch.setattr(sample, "sample_full", slow_start)
    run(f"--out_dir={tmp_path / 'full'}", "--steps=4")
    warmup, n, seconds, tok_s, calls = SPEED_LINE.search(capsys.readouterr().out).groups()
    # the reported time is the sampler's own, not 0.5 s more (however slow the machine)
    assert float(warmup) >= 0.5 and float(seconds) < sampling[0] + 0.25 and int(calls) <= 4
    error("no checkpoint at", f"--out_dir={tmp_path / 'none'}")
    error("--sampler=block needs a block-mode checkpoint", f"--out_dir={tmp_path / 'full'}", "--sampler=block")
    error("--sampler=full needs a full-sequence model", f"--out_dir={tmp_path / 'block'}", "--sampler=full")
    error("is longer than --length (16)", f"--out_dir={tmp_path / 'full'}", "--prompt=" + "word " * 40)
    error("has no <|mask|>", f"--out_dir={tmp_path / 'full'}", "--infill=no mask here")
    error("--steps must be >= 1", f"--out_dir={tmp_path / 'full'}", "--steps=0")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        diffusion.sample_full(full, torch.full((1, 8), 50257, device=DEVICE), steps=0)
    with pytest.raises(ValueError, match="sample_block needs a block-mode model"):
        diffusion.sample_block(full, torch.zeros(1, 0, dtype=torch.long, device=DEVICE), 8, 2)
    with pytest.raises(ValueError, match=r"the prompt \(9 tokens\) is longer than length \(8\)"):
        diffusion.sample_block(block, torch.zeros(1, 9, dtype=torch.long, device=DEVICE), 8, 2)


# ------------------------------------------------------------------------------------------------
# the benchmark, as a smoke test: tiny sizes on the CPU


def test_bench_runs_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--device=cpu", "--tiny", f"--out_dir={tmp_path}"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "bench.json") as f:
        results = json.load(f)
    assert {"kernel", "inference", "end_to_end", "training"} <= set(results)
    variants = {row["variant"] for row in results["inference"] if "tok_s" in row}
    assert variants == {f"{a}-{m}" for a in ARCHS for m in ("full", "block")}
    assert "speedup over transformer-full" in r.stdout and "### training" in r.stdout


# ------------------------------------------------------------------------------------------------
# the studies' report, on made-up logs


def test_study_report_reads_runs_at_equal_tokens(tmp_path):
    rng = np.random.default_rng(0)

    def write_run(name, iters, every, tokens_per_iter=16384):
        curve = {i: float(rng.uniform(2, 5)) for i in [*range(every, iters, every), iters]}  # as train.py evaluates
        rows = [dict(iter=i, loss=3.0, tok_s=float(rng.uniform(1e5, 2e5))) for i in range(10, iters + 1, 10)]
        rows += [dict(iter=i, val_nelbo=v, tokens=i * tokens_per_iter) for i, v in curve.items()]
        rows.append(dict(iter=iters, infill_acc_15=0.5, infill_acc_50=0.25))
        os.makedirs(tmp_path / name)
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return curve
    same = [write_run(f"same/{arch}", 600, 60) for arch in ("mamba", "transformer")]
    r = subprocess.run([sys.executable, os.path.join(HERE, "study_report.py"), str(tmp_path / "same")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("| run |"), r.stderr
    assert "val NELBO at" not in r.stdout and f"| 9.8M | {same[0][600]:.3f} |" in r.stdout  # ends alike: no column
    shutil.rmtree(tmp_path / "same")
    medium = write_run("medium/mamba-full", 3100, 300)
    small = write_run("small/mamba-full", 600, 60)
    seeds = [write_run(f"small/transformer-s{s}", 600, 60) for s in (1, 2)]
    grid = write_run("lr/mamba-lr1e-3", 300, 300)
    r = subprocess.run([sys.executable, os.path.join(HERE, "study_report.py"), str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("| val NELBO at 9.8M tokens |")  # 600 iterations: the last point all runs share
    row = next(line for line in lines if line.startswith("| medium/mamba-full |"))
    assert f"| 50.8M | {medium[3100]:.3f} |" in row and row.endswith(f" {medium[600]:.3f} |")
    assert next(line for line in lines if line.startswith("| small/mamba-full |")).endswith(f" {small[600]:.3f} |")
    assert f"learning-rate check: lr/mamba-lr1e-3: val NELBO {grid[300]:.3f} at 4.9M tokens" in lines
    finals = [c[600] for c in seeds]
    assert (f"small/transformer: val NELBO {np.mean(finals):.3f} +- {np.std(finals, ddof=1):.3f} over 2 seeds"
            in lines)
    assert not any(line.startswith("| lr/") for line in lines)  # the check has its own lines, not table rows
