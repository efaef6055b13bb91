"""
The test suite. Without a GPU the Triton kernels run in Triton's interpreter (CI does this); with one,
the same comparisons run on the GPU, plus the large cases marked gpu.

    python -m pytest -q test_model.py
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' definition

import scan_kernel  # noqa: E402
from scan_kernel import selective_scan, selective_scan_ref  # noqa: E402

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
                device=DEVICE, seed=None, dt_range=None):
    """Fresh random inputs (from the global RNG unless a seed is given) as leaves that need grad."""
    g = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)
    if dt_range is None:
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


def check_scan(inputs, reverse=False, state_every=None, tol=None, fn=selective_scan):
    """Compare fn's outputs and gradients with the float64 reference."""
    x = inputs["x"]
    batch, seqlen, nheads, headdim = x.shape
    dy = torch.randn(x.shape, device=x.device, dtype=torch.float64)
    dstates = None
    if state_every is not None:
        dstates = torch.randn(batch, seqlen // state_every, nheads, headdim, inputs["B"].shape[-1],
                              device=x.device, dtype=torch.float64)
    out = run_scan(fn, inputs, reverse, state_every, dy, dstates)
    ref = run_scan(selective_scan_ref, inputs, reverse, state_every, dy, dstates, cast=lambda t: t.double())
    assert out["y"].dtype == x.dtype and out["y"].shape == x.shape
    if state_every is not None:
        assert out["states"].dtype == torch.float32 and out["states"].shape == dstates.shape
    tol = tol or tolerance(x.dtype)
    errors = {}
    for k, r in ref.items():
        if r is None:
            continue
        if k == "dA":
            # dA sums dt * dL/d(log-decay) over every position, and those terms cancel: measure the error
            # against the size of the terms. The terms: dt * ddt minus the part of ddt that bypasses the decay.
            dx_scan = ref["dx"] - (0 if inputs["D"] is None else inputs["D"].double()[:, None] * dy)
            terms = inputs["dt"].double() * ref["ddt"] - (dx_scan * inputs["x"].double()).sum(-1)
            scale = terms.abs().sum((0, 1)) / inputs["A"].double().abs()
            errors[k] = ((out[k].double() - r).abs() / scale).max().item()
        else:
            errors[k] = rel_err(out[k], r)
    bad = {k: e for k, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"
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
]


@pytest.mark.parametrize("batch,seqlen,nheads,headdim,ngroups,dstate,dtype,D,init,reverse,state_every", SCAN_CASES)
def test_scan_matches_reference(batch, seqlen, nheads, headdim, ngroups, dstate, dtype, D, init, reverse, state_every):
    inputs = scan_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype, D, init)
    check_scan(inputs, reverse, state_every)


def test_cases_cover_one_and_many_segments():
    # a program scans a few chunks in sequence and segments are chained between kernels: the cases above
    # must reach both the single-segment path and the chained one, with a partial last segment
    nsegs = [scan_kernel._Plan(b, l, h, p, n, every, rev) for b, l, h, p, g, n, dt, D, init, rev, every in SCAN_CASES]
    assert any(plan.nseg == 1 for plan in nsegs)
    assert any(plan.nseg > 1 and plan.nchunks % plan.seg_chunks for plan in nsegs)


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
    x, dt, A, B, C, D, S0 = inp.values()
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


@pytest.mark.parametrize("reverse,state_every", [(False, None), (True, 32), (False, 64)])
def test_torch_path_matches_reference(reverse, state_every, monkeypatch):
    # CPU training takes the vectorised PyTorch path instead of the interpreter
    monkeypatch.setattr(scan_kernel, "CPU_KERNELS", False)
    inputs = scan_inputs(2, 128, 4, 16, 2, 16, device="cpu")
    check_scan(inputs, reverse, state_every, tol=1e-5)


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
    fails(r"nheads \(4\) must be divisible by ngroups \(3", B=inp["B"][:, :, :1].expand(-1, -1, 3, -1),
          C=inp["C"][:, :, :1].expand(-1, -1, 3, -1))
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
# the scan on the GPU, at sizes the interpreter can't reach


@gpu
@pytest.mark.parametrize("dtype,reverse,state_every", [(torch.float32, False, 2048), (torch.bfloat16, True, None),
                                                       (torch.bfloat16, False, 64)])
def test_gpu_long_sequence(dtype, reverse, state_every):
    inputs = scan_inputs(2, 8192, 4, 64, 1, 128, dtype, D=True, init=True)
    check_scan(inputs, reverse, state_every)


@gpu
def test_gpu_extreme_dt():
    # dt from 1e-4 to 10 with A down to -e^2: decays from 1 to e^-70 per step; nothing may overflow
    inputs = scan_inputs(1, 16384, 4, 64, 1, 64, torch.bfloat16, dt_range=(1e-4, 10.0))
    with torch.no_grad():
        inputs["A"].copy_(-torch.exp(torch.linspace(-2, 2, 4)))
    out = check_scan(inputs, reverse=False, state_every=64)
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
