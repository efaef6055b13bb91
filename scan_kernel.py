"""
The Mamba-2 mixer's kernels. Mainly the SSD selective scan: Triton forward and backward kernels, the
plain reference loop, a vectorised PyTorch path for CPU training, and the autograd wrapper. At the end,
two small fused kernels around it: the short depthwise conv with its SiLU, and the gated RMSNorm of the
scan's output (each with its backward, its torch reference, and the same CPU dispatch as the scan).

Per batch element and head h, with state S_t in R^{P x N} (P = headdim, N = dstate):

    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,        y_t = S_t C_t + D x_t,        S_0 = initial_state

The kernels cut the sequence into chunks of L positions and carry S from chunk to chunk. Inside a
chunk, with c_t = sum_{s<=t} dt_s A (the cumulative log-decay from the chunk's start) and the
decay mask M_ts = exp(c_t - c_s) for s <= t (0 otherwise), everything is a handful of matrix products:

    y      = (C B^T * M * dt^T) x  +  exp(c) * (C S^T)  +  D x       (L x P; the kernel forms y^T)
    S_next = exp(c_L) S  +  (x * exp(c_L - c) dt)^T B                                (P x N)

The backward needs, per chunk, the forward state S at its start and R = dL/dS at its end (what later
positions and the returned states send back); given those two, the chunks' gradients are independent.
Writing Lam_t = dL/dS_t = exp(c_L - c_t) R + sum_{u>=t} exp(c_u - c_t) dy_u C_u^T, and dYX = dy x^T:

  - the forward kernel, when gradients will be taken, also stores S after every second chunk
    (pair_states): the backward keeps nothing per position, only the states at the boundaries of pairs
    of chunks (stored, like R below, in the inputs' precision: the gradient kernel's products read them
    at it anyway);
  - _scan_adj_kernel walks the chunks from last to first carrying R alone, the only sequential work:
    R += dstates where a returned state ends the chunk, R is stored after every second chunk
    (pair_adj), then
        R_prev = exp(c_L) R  +  (dy * exp(c))^T C
  - _scan_grad_kernel, one program per chunk, takes S and R (the second chunk of a pair steps S on
    through the first, S_next above; the first steps R back through the second) and computes

    dC     = exp(c) * (dy S)  +  (dYX * M * dt^T) B              [= S_t^T dy_t]
    LamB   = (C B^T * M)^T dy  +  exp(c_L - c) * (B R^T)          [row t: Lam_t B_t]
    dx     = dt * LamB + D dy,        dB = dt * (exp(c_L - c) * (x R) + (dYX * M)^T C)
    da_t   = exp(dt_t A) <Lam_t, S_{t-1}>       (four plain sums: Lam from R or from dy, S_{t-1} from S or x)
    ddt    = A da + x . LamB,       dA = sum dt da,       dD = sum dy . x

    Sums across programs (ddt, dB, dC over headdim tiles and a group's heads; dA, dD over everything)
    are written as partials and added up outside the kernel: no atomics.

The sequential kernels (forward, adjoint) give a program all the chunks of one (batch, head) and headdim
tile. With too few such programs to fill the GPU they cut the sequence into segments that run side by
side (about 256 programs in all): a first launch gives each segment's own final state and its sum of dt A
(going backward, its own adjoint), _pass_kernel chains them (S <- exp(sum of dt A over the segment) S +
local), and a second launch starts every segment from its true state.

reverse=True runs the same kernels with position i read from seqlen - 1 - i.
"""

import numbers
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when the kernels below are defined; on CPU they then run in its
# interpreter, which is how CI tests them. The interpreter's tl.dot multiplies bfloat16's raw bits,
# so there every product is taken in float32.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU_KERNELS = INTERPRET  # CPU tensors take the kernels (in the interpreter), else the PyTorch path
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# argument checks and the reference


def _check_args(x, dt, A, B, C, D, initial_state, state_every, dtypes):
    """Validate the arguments of a scan; return (batch, seqlen, nheads, headdim, ngroups, dstate)."""
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state)
    for name, t in named.items():
        if t is None and name in ("D", "initial_state"):
            continue
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have a floating dtype ({allowed}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share a device")
    if x.dim() != 4 or 0 in x.shape:
        raise ValueError(f"x must have shape (batch, seqlen, nheads, headdim) with no empty dim, got {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4 or tuple(B.shape[:2]) != (batch, seqlen) or 0 in B.shape:
        raise ValueError(f"B must have shape (batch={batch}, seqlen={seqlen}, ngroups, dstate), got {tuple(B.shape)}")
    ngroups, dstate = B.shape[2], B.shape[3]
    expected = dict(dt=(batch, seqlen, nheads), A=(nheads,), C=(batch, seqlen, ngroups, dstate), D=(nheads,),
                    initial_state=(batch, nheads, headdim, dstate))
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if nheads % ngroups:
        raise ValueError(f"nheads ({nheads}) must be divisible by ngroups ({ngroups}, B.shape[2])")
    if state_every is not None:
        if isinstance(state_every, bool) or not isinstance(state_every, numbers.Integral) or state_every < 1:
            raise ValueError(f"state_every must be None or a positive int, got {state_every!r}")
        if seqlen % state_every:
            raise ValueError(f"state_every ({state_every}) must divide seqlen ({seqlen})")
    return batch, seqlen, nheads, headdim, ngroups, dstate


def selective_scan_ref(x, dt, A, B, C, D=None, initial_state=None, reverse=False, state_every=None):
    """The definition: a plain loop over positions, in float32 (float64 for float64 inputs)."""
    batch, seqlen, nheads, headdim, ngroups, dstate = _check_args(
        x, dt, A, B, C, D, initial_state, state_every, FLOAT_DTYPES + (torch.float64,))
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    B = B.to(f).repeat_interleave(nheads // ngroups, dim=2)
    C = C.to(f).repeat_interleave(nheads // ngroups, dim=2)
    xf, dt, A = x.to(f), dt.to(f), A.to(f)
    state = x.new_zeros(batch, nheads, headdim, dstate, dtype=f) if initial_state is None else initial_state.to(f)
    ys, states = [None] * seqlen, []
    for k, t in enumerate(range(seqlen - 1, -1, -1) if reverse else range(seqlen)):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * xf[:, t])[..., None] * B[:, t, :, None, :]
        ys[t] = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        if state_every is not None and (k + 1) % state_every == 0:
            states.append(state)
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D.to(f)[:, None] * xf
    y = y.to(x.dtype)
    return y if state_every is None else (y, torch.stack(states, 1))


def _pow2(n):
    """The smallest power of two >= n, in 0.1 us: triton.next_power_of_2 takes 1.5, and every scan needs a few."""
    return 1 << (n - 1).bit_length()


CHUNK = 32  # positions per chunk: measured best on an H200 (bench.py, README), smaller tiles spill less


def _chunk_len(seqlen, state_every):
    """Chunk length: CHUNK, or the largest divisor of state_every up to CHUNK, so that every returned state
    ends a chunk. (Tiles of 64 rows with float32 inputs failed on an H200: keep to 32.)"""
    if state_every is None:
        return min(CHUNK, max(16, _pow2(seqlen)))
    return max(d for d in range(1, CHUNK + 1) if state_every % d == 0)


# ----------------------------------------------------------------------------------------------
# vectorised PyTorch path (CPU training): the same chunked math, autograd through torch


def _scan_torch(x, dt, A, B, C, D, initial_state, reverse, state_every):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    r = nheads // ngroups
    L = _chunk_len(seqlen, state_every)
    nc = -(-seqlen // L)
    pad = nc * L - seqlen
    f = torch.float64 if x.dtype == torch.float64 else torch.float32

    def prep(t):  # scan order, float32 (float64 for float64), padded with zeros (dt = 0: the state passes)
        t = t.flip(1) if reverse else t
        return torch.nn.functional.pad(t.to(f), (0, 0) * (t.dim() - 2) + (0, pad))

    xs = prep(x).view(batch, nc, L, ngroups, r, headdim)
    dts = prep(dt).view(batch, nc, L, ngroups, r)
    Bs = prep(B).view(batch, nc, L, ngroups, dstate)
    Cs = prep(C).view(batch, nc, L, ngroups, dstate)
    cs = torch.cumsum(dts * A.to(f).view(ngroups, r), dim=2)  # (b, nc, L, g, r)
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[:, :, None, None]
    M = torch.exp((cs[:, :, :, None] - cs[:, :, None, :]).masked_fill(~causal, float("-inf")))
    W = torch.einsum("bctgn,bcsgn->bctsg", Cs, Bs)[..., None] * M * dts[:, :, None]
    y = torch.einsum("bctsgr,bcsgrp->bctgrp", W, xs)
    local = torch.einsum("bcsgr,bcsgrp,bcsgn->bcgrpn", torch.exp(cs[:, :, -1:] - cs) * dts, xs, Bs)
    state = (x.new_zeros(batch, ngroups, r, headdim, dstate, dtype=f) if initial_state is None
             else initial_state.to(f).view(batch, ngroups, r, headdim, dstate))
    starts, ends = [], []
    for c in range(nc):
        starts.append(state)
        state = torch.exp(cs[:, c, -1])[..., None, None] * state + local[:, c]
        ends.append(state)
    y = y + torch.einsum("bctgn,bcgrpn->bctgrp", Cs, torch.stack(starts, 1)) * torch.exp(cs)[..., None]
    y = y.reshape(batch, nc * L, nheads, headdim)[:, :seqlen]
    y = y.flip(1) if reverse else y
    if D is not None:
        y = y + D.to(f)[:, None] * x.to(f)
    y = y.to(x.dtype)
    if state_every is None:
        return y
    states = torch.stack(ends[state_every // L - 1::state_every // L], 1)
    return y, states.reshape(batch, -1, nheads, headdim, dstate)


# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _dot(a, b, DTYPE: tl.constexpr, DOT_F32: tl.constexpr, acc=None):
    """acc + a @ b on the tensor cores in the inputs' precision, accumulated in float32."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if DTYPE == tl.float32:  # three tf32 products: float32 accuracy, still on the tensor cores
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    return tl.dot(a.to(DTYPE), b.to(DTYPE), acc)


@triton.jit
def _rows(c, offs_l, seqlen, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """The tile rows that hold chunk c (scan order), and their positions in memory."""
    i = c * CHUNK + offs_l
    valid = (offs_l < CHUNK) & (i < seqlen)
    return valid, (seqlen - 1 - i if REVERSE else i).to(tl.int64)


@triton.jit
def _rows_within(c, c0, c1, offs_l, seqlen, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """_rows, none of them unless c0 <= c < c1: the loops' loads a chunk ahead run past their segment."""
    valid, pos = _rows(c, offs_l, seqlen, CHUNK, REVERSE)
    i = c * CHUNK + offs_l
    return valid & (i >= c0 * CHUNK) & (i < c1 * CHUNK), pos


@triton.jit
def _load_chunk(base, stride_l, c, c0, c1, seqlen, offs_l, offs_col, ncols, CHUNK: tl.constexpr,
                REVERSE: tl.constexpr):
    """Rows of chunk c (scan order) of a (seqlen, ncols) slice at base (x, dy: headdim; B, C: dstate),
    columns offs_col; zeros unless c0 <= c < c1."""
    valid, pos = _rows_within(c, c0, c1, offs_l, seqlen, CHUNK, REVERSE)
    return tl.load(base + pos[:, None] * stride_l + offs_col[None, :],
                   mask=valid[:, None] & (offs_col[None, :] < ncols), other=0.0)


@triton.jit
def _load_dt(dt_base, sdt_l, c, c0, c1, seqlen, offs_l, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """dt over chunk c (scan order), float32; zeros unless c0 <= c < c1."""
    valid, pos = _rows_within(c, c0, c1, offs_l, seqlen, CHUNK, REVERSE)
    return tl.load(dt_base + pos * sdt_l, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _slot(ptr, b, j, nslots, nheads, h, PN):
    """Where the P x N tile of (batch b, slot j, head h) starts in a (batch, nslots, nheads, P, N) array."""
    return ptr + ((b.to(tl.int64) * nslots + j) * nheads + h) * PN


@triton.jit
def _load_dstate(dstates_ptr, b, c, every, nstates, nheads, h, pn, mask_pn, PN):
    """The gradient of the returned state that ends chunk c ((c + 1) % every == 0), a P x N tile."""
    return tl.load(_slot(dstates_ptr, b, (c + 1) // every - 1, nstates, nheads, h, PN) + pn, mask=mask_pn, other=0.0)


@triton.jit
def _store_state(ptr, state, b, j, nslots, nheads, h, pn, mask_pn, PN):
    """A P x N state tile into slot j of a (batch, nslots, nheads, P, N) array, in the array's precision."""
    tl.store(_slot(ptr, b, j, nslots, nheads, h, PN) + pn, state.to(ptr.dtype.element_ty), mask=mask_pn)


@triton.jit
def _step(S, x, Bm, dt, cs, a_tot, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """S at the chunk's end from S at its start: exp(c_L) S + (x * exp(c_L - c) dt)^T B."""
    xw = x.to(tl.float32) * (tl.exp(a_tot - cs) * dt)[:, None]
    return _dot(tl.trans(xw), Bm, DTYPE, DOT_F32, tl.exp(a_tot) * S)


@triton.jit
def _step_back(R, dy, Cm, cs, a_tot, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """R = dL/dS at the chunk's start from R at its end: exp(c_L) R + (dy * exp(c))^T C."""
    return _dot(tl.trans(dy.to(tl.float32) * tl.exp(cs)[:, None]), Cm, DTYPE, DOT_F32, tl.exp(a_tot) * R)


@triton.jit
def _scan_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, start_ptr, states_ptr, pairs_ptr, logdecay_ptr,
    seqlen, nheads, headdim, dstate, heads_per_group, seg_chunks, every, nstates,
    sx_b, sx_l, sx_h, sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sC_b, sC_l, sC_g,
    CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_START: tl.constexpr, WRITE_Y: tl.constexpr, WRITE_STATES: tl.constexpr,
    WRITE_PAIRS: tl.constexpr, WRITE_LOGDECAY: tl.constexpr, REVERSE: tl.constexpr, DOT_F32: tl.constexpr,
):
    # one program: one (batch, head), one tile of headdim, one segment of chunks. WRITE_LOGDECAY: also the
    # segment's sum of dt A, (batch, nseg, nheads) (every headdim tile writes the same value)
    bh, pid_p, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // nheads, bh % nheads
    g = h // heads_per_group
    nseg = tl.num_programs(2)
    nchunks = tl.cdiv(seqlen, CHUNK)
    c0 = seg * seg_chunks
    c1 = tl.minimum(c0 + seg_chunks, nchunks)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    offs_l = tl.arange(0, BLOCK_L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_pn = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    x_base = x_ptr + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    dt_base = dt_ptr + b.to(tl.int64) * sdt_b + h.to(tl.int64) * sdt_h
    B_base = B_ptr + b.to(tl.int64) * sB_b + g.to(tl.int64) * sB_g
    C_base = C_ptr + b.to(tl.int64) * sC_b + g.to(tl.int64) * sC_g
    pn = offs_p[:, None] * dstate + offs_n[None, :]
    A = tl.load(A_ptr + h).to(tl.float32)

    if HAS_START:
        start = start_ptr + ((b.to(tl.int64) * nseg + seg) * nheads + h) * headdim * dstate
        state = tl.load(start + pn, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)

    # x feeds elementwise math as well as products, so Triton's pipeliner leaves its load in the iteration
    # that uses it, where the warps then wait for it (Nsight Compute): load it one chunk ahead instead
    x_next = _load_chunk(x_base, sx_l, c0, c0, c1, seqlen, offs_l, offs_p, headdim, CHUNK, REVERSE)
    logdecay = 0.0
    for c in range(c0, c1):
        x = x_next
        x_next = _load_chunk(x_base, sx_l, c + 1, c0, c1, seqlen, offs_l, offs_p, headdim, CHUNK, REVERSE)
        valid, pos = _rows(c, offs_l, seqlen, CHUNK, REVERSE)
        mask_lp = valid[:, None] & (offs_p[None, :] < headdim)
        mask_ln = valid[:, None] & (offs_n[None, :] < dstate)
        dt = tl.load(dt_base + pos * sdt_l, mask=valid, other=0.0).to(tl.float32)
        Bm = tl.load(B_base + pos[:, None] * sB_l + offs_n[None, :], mask=mask_ln, other=0.0)
        a = dt * A
        cs = tl.cumsum(a, 0)
        a_tot = tl.sum(a, 0)
        logdecay += a_tot

        if WRITE_Y:
            Cm = tl.load(C_base + pos[:, None] * sC_l + offs_n[None, :], mask=mask_ln, other=0.0)
            # computed transposed, y^T (P x L): S (P x N) is then a product's left operand, taken straight
            # from registers instead of through shared memory every chunk (218 registers against 250, 23 KB
            # of shared memory against 35, 4-6% faster on an H100)
            causal_t = offs_l[None, :] >= offs_l[:, None]  # [s, t]: t >= s
            M_t = tl.where(causal_t, tl.exp(tl.minimum(cs[None, :] - cs[:, None], 0.0)), 0.0)
            W_t = _dot(Bm, tl.trans(Cm), DTYPE, DOT_F32) * M_t * dt[:, None]
            if HAS_D:  # D x as W's diagonal: x^T would otherwise go through shared memory into W's layout
                W_t += tl.where(offs_l[:, None] == offs_l[None, :], tl.load(D_ptr + h).to(tl.float32), 0.0)
            y_t = _dot(tl.trans(x), W_t, DTYPE, DOT_F32)
            y_t += _dot(state, tl.trans(Cm), DTYPE, DOT_F32) * tl.exp(cs)[None, :]
            y_rows = (b.to(tl.int64) * seqlen + pos) * nheads * headdim + h * headdim
            tl.store(y_ptr + y_rows[None, :] + offs_p[:, None], y_t.to(y_ptr.dtype.element_ty),
                     mask=tl.trans(mask_lp))

        state = _step(state, x, Bm, dt, cs, a_tot, DTYPE, DOT_F32)

        if WRITE_STATES:  # after every `every` chunks, and at the end
            if ((c + 1) % every == 0) | (c + 1 == nchunks):
                _store_state(states_ptr, state, b, c // every, nstates, nheads, h, pn, mask_pn, headdim * dstate)
        if WRITE_PAIRS:  # the backward's: after every second chunk, and at the end
            if (c % 2 == 1) | (c + 1 == nchunks):
                _store_state(pairs_ptr, state, b, c // 2, tl.cdiv(nchunks, 2), nheads, h, pn, mask_pn,
                             headdim * dstate)
    if WRITE_LOGDECAY:
        tl.store(logdecay_ptr + (b.to(tl.int64) * nseg + seg) * nheads + h, logdecay)


@triton.jit
def _scan_adj_kernel(
    dt_ptr, A_ptr, C_ptr, dy_ptr, dstates_ptr, rend_ptr, pair_adj_ptr, rout_ptr,
    seqlen, nheads, headdim, dstate, heads_per_group, seg_chunks, every, nstates,
    sdt_b, sdt_l, sdt_h, sC_b, sC_l, sC_g,
    CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DSTATES: tl.constexpr, HAS_REND: tl.constexpr, WRITE_ADJ: tl.constexpr,
    REVERSE: tl.constexpr, DOT_F32: tl.constexpr,
):
    # one program: one (batch, head), one tile of headdim, one segment, its chunks last to first, carrying
    # R = dL/dS at the chunk's end. Without rend, R starts from zero: the segment's own adjoint.
    bh, pid_p, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // nheads, bh % nheads
    g = h // heads_per_group
    nseg = tl.num_programs(2)
    nchunks = tl.cdiv(seqlen, CHUNK)
    c0 = seg * seg_chunks
    c1 = tl.minimum(c0 + seg_chunks, nchunks)
    DTYPE: tl.constexpr = dy_ptr.dtype.element_ty

    offs_l = tl.arange(0, BLOCK_L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_pn = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    pn = offs_p[:, None] * dstate + offs_n[None, :]
    PN = headdim * dstate
    dt_base = dt_ptr + b.to(tl.int64) * sdt_b + h.to(tl.int64) * sdt_h
    C_base = C_ptr + b.to(tl.int64) * sC_b + g.to(tl.int64) * sC_g
    dy_base = dy_ptr + b.to(tl.int64) * seqlen * nheads * headdim + h * headdim
    A = tl.load(A_ptr + h).to(tl.float32)

    if HAS_REND:
        R = tl.load(_slot(rend_ptr, b, seg, nseg, nheads, h, PN) + pn, mask=mask_pn, other=0.0)
    else:
        R = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)

    # dy and dt are loaded a chunk ahead, as x in the forward kernel (where loading dt ahead too was slower).
    # Here dt ahead took the adjoint 0.83 -> 0.75 ms on long, 0.114 -> 0.119 on train (H100).
    dy_next = _load_chunk(dy_base, nheads * headdim, c1 - 1, c0, c1, seqlen, offs_l, offs_p, headdim, CHUNK, REVERSE)
    dt_next = _load_dt(dt_base, sdt_l, c1 - 1, c0, c1, seqlen, offs_l, CHUNK, REVERSE)
    for k in range(c1 - c0):
        c = c1 - 1 - k
        dy, dt = dy_next, dt_next
        dy_next = _load_chunk(dy_base, nheads * headdim, c - 1, c0, c1, seqlen, offs_l, offs_p, headdim, CHUNK,
                              REVERSE)
        dt_next = _load_dt(dt_base, sdt_l, c - 1, c0, c1, seqlen, offs_l, CHUNK, REVERSE)
        valid, pos = _rows(c, offs_l, seqlen, CHUNK, REVERSE)
        mask_ln = valid[:, None] & (offs_n[None, :] < dstate)
        Cm = tl.load(C_base + pos[:, None] * sC_l + offs_n[None, :], mask=mask_ln, other=0.0)
        a = dt * A
        cs = tl.cumsum(a, 0)
        a_tot = tl.sum(a, 0)

        if HAS_DSTATES:  # a returned state ends this chunk: its gradient joins R
            if (c + 1) % every == 0:
                R += _load_dstate(dstates_ptr, b, c, every, nstates, nheads, h, pn, mask_pn, PN)
        if WRITE_ADJ:  # R at the end of each pair of chunks (the gradient kernel's): (batch, npairs, nheads, P, N)
            if (c % 2 == 1) | (c + 1 == nchunks):
                _store_state(pair_adj_ptr, R, b, c // 2, tl.cdiv(nchunks, 2), nheads, h, pn, mask_pn, PN)

        R = _step_back(R, dy, Cm, cs, a_tot, DTYPE, DOT_F32)

    _store_state(rout_ptr, R, b, seg, nseg, nheads, h, pn, mask_pn, PN)


@triton.jit
def _scan_grad_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dy_ptr, init_ptr, dstates_ptr, pair_states_ptr, pair_adj_ptr,
    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr,
    batch, seqlen, nheads, headdim, dstate, heads_per_group, every, nstates,
    sx_b, sx_l, sx_h, sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sC_b, sC_l, sC_g,
    CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DSTATES: tl.constexpr, REVERSE: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    # one program: one chunk of one (batch, head), one tile of headdim; S at the chunk's start and R at its
    # end are given or one step away, so nothing is carried. Axis 0 is (chunk, batch * head), heads fastest
    # (they share B and C): the only grid axis with room for every chunk of a long sequence.
    # Every sum over headdim tiles or chunks (ddt, dB, dC, dA, dD) is a partial per program, summed
    # outside: no atomics.
    pid, pid_p = tl.program_id(0), tl.program_id(1)
    bh, c = pid % (batch * nheads), pid // (batch * nheads)
    b, h = bh // nheads, bh % nheads
    g = h // heads_per_group
    nptiles = tl.num_programs(1)
    nchunks = tl.cdiv(seqlen, CHUNK)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    offs_l = tl.arange(0, BLOCK_L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    valid, pos = _rows(c, offs_l, seqlen, CHUNK, REVERSE)
    mask_lp = valid[:, None] & (offs_p[None, :] < headdim)
    mask_ln = valid[:, None] & (offs_n[None, :] < dstate)
    mask_pn = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    pn = offs_p[:, None] * dstate + offs_n[None, :]
    PN = headdim * dstate
    A = tl.load(A_ptr + h).to(tl.float32)
    x_base = x_ptr + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    dt_base = dt_ptr + b.to(tl.int64) * sdt_b + h.to(tl.int64) * sdt_h
    B_base = B_ptr + b.to(tl.int64) * sB_b + g.to(tl.int64) * sB_g
    C_base = C_ptr + b.to(tl.int64) * sC_b + g.to(tl.int64) * sC_g
    dy_base = dy_ptr + b.to(tl.int64) * seqlen * nheads * headdim + h * headdim

    # The forward state S at the chunk's start and the adjoint R at its end. Both are stored only at the
    # boundaries of pairs of chunks (2q, 2q + 1), which halves the backward's largest memory traffic: an
    # odd chunk's S is one forward step through its pair's first chunk, an even chunk's R one adjoint step
    # back through its pair's second (empty past the sequence's end). Both are kept in their stored
    # precision (the products read them at it) once their one plain sum is taken.
    pair_row = (b.to(tl.int64) * tl.cdiv(nchunks, 2) + c // 2) * nheads + h  # (batch, npairs, nheads) row
    SDTYPE: tl.constexpr = pair_states_ptr.dtype.element_ty
    if c > 1:
        S = tl.load(pair_states_ptr + (pair_row - nheads) * PN + pn, mask=mask_pn, other=0.0)
    elif HAS_INIT:
        S = tl.load(init_ptr + (b.to(tl.int64) * nheads + h) * PN + pn, mask=mask_pn, other=0.0).to(SDTYPE)
    else:
        S = tl.zeros((BLOCK_P, BLOCK_N), dtype=SDTYPE)
    R = tl.load(pair_adj_ptr + pair_row * PN + pn, mask=mask_pn, other=0.0)
    if c % 2 == 1:
        dt_prev = _load_dt(dt_base, sdt_l, c - 1, 0, nchunks, seqlen, offs_l, CHUNK, REVERSE)
        x_prev = _load_chunk(x_base, sx_l, c - 1, 0, nchunks, seqlen, offs_l, offs_p, headdim, CHUNK, REVERSE)
        B_prev = _load_chunk(B_base, sB_l, c - 1, 0, nchunks, seqlen, offs_l, offs_n, dstate, CHUNK, REVERSE)
        a = dt_prev * A
        S = _step(S.to(tl.float32), x_prev, B_prev, dt_prev, tl.cumsum(a, 0), tl.sum(a, 0), DTYPE, DOT_F32)
        S = S.to(SDTYPE)
    else:
        a = _load_dt(dt_base, sdt_l, c + 1, 0, nchunks, seqlen, offs_l, CHUNK, REVERSE) * A
        dy_next = _load_chunk(dy_base, nheads * headdim, c + 1, 0, nchunks, seqlen, offs_l, offs_p, headdim, CHUNK,
                              REVERSE)
        C_next = _load_chunk(C_base, sC_l, c + 1, 0, nchunks, seqlen, offs_l, offs_n, dstate, CHUNK, REVERSE)
        R = _step_back(R.to(tl.float32), dy_next, C_next, tl.cumsum(a, 0), tl.sum(a, 0), DTYPE, DOT_F32)
        if HAS_DSTATES:  # a returned state ends this chunk
            if ((c + 1) % every == 0) & (c + 1 < nchunks):
                R += _load_dstate(dstates_ptr, b, c, every, nstates, nheads, h, pn, mask_pn, PN)
        R = R.to(SDTYPE)

    dt = tl.load(dt_base + pos * sdt_l, mask=valid, other=0.0).to(tl.float32)
    x = tl.load(x_base + pos[:, None] * sx_l + offs_p[None, :], mask=mask_lp, other=0.0)
    Bm = tl.load(B_base + pos[:, None] * sB_l + offs_n[None, :], mask=mask_ln, other=0.0)
    Cm = tl.load(C_base + pos[:, None] * sC_l + offs_n[None, :], mask=mask_ln, other=0.0)
    rows = (b.to(tl.int64) * seqlen + pos) * nheads + h  # (batch, seqlen, nheads) row of each position
    dy = tl.load(dy_ptr + rows[:, None] * headdim + offs_p[None, :], mask=mask_lp, other=0.0)
    RS = tl.sum(tl.sum(R.to(tl.float32) * S.to(tl.float32), 1), 0)

    a = dt * A
    cs = tl.cumsum(a, 0)
    a_tot = tl.sum(a, 0)
    exp_tail = tl.exp(a_tot - cs)
    causal = offs_l[:, None] >= offs_l[None, :]
    M = tl.where(causal, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
    G = _dot(Cm, tl.trans(Bm), DTYPE, DOT_F32)
    dYXM = _dot(dy, tl.trans(x), DTYPE, DOT_F32) * M
    dC_in = tl.exp(cs)[:, None] * _dot(dy, S, DTYPE, DOT_F32)  # through the incoming state
    BRt = _dot(Bm, tl.trans(R), DTYPE, DOT_F32)
    xR = exp_tail[:, None] * _dot(x, R, DTYPE, DOT_F32)  # through the outgoing adjoint
    dC = dC_in + _dot(dYXM * dt[None, :], Bm, DTYPE, DOT_F32)
    dB = dt[:, None] * (xR + _dot(tl.trans(dYXM), Cm, DTYPE, DOT_F32))
    LB = _dot(tl.trans(G * M), dy, DTYPE, DOT_F32) + exp_tail[:, None] * BRt
    xf = x.to(tl.float32)
    dyf = dy.to(tl.float32)
    # dL/da_t = exp(a_t) <Lam_t, S_{t-1}>, split by where Lam and S come from (R or later dy;
    # S or earlier inputs). Every term is a plain sum, so nothing cancels.
    # (as sums over headdim, of dy with C S^T and of x with B R^T: narrower than dstate)
    from_in = tl.exp(cs) * tl.sum(dyf * _dot(Cm, tl.trans(S), DTYPE, DOT_F32), 1)  # u >= t: exp(c_u) dy_u^T S C_u
    from_out = dt * exp_tail * tl.sum(xf * BRt, 1)  # s < t: exp(c_L - c_s) dt_s x_s^T R B_s
    # within the chunk: sum over u >= t > s of exp(c_u - c_s) dt_s (dy_u . x_s)(C_u . B_s)
    inner = tl.cumsum(dYXM * G * dt[None, :], 0, reverse=True)  # [t, s]: summed over u >= t
    inner = tl.sum(tl.where(offs_l[:, None] > offs_l[None, :], inner, 0.0), 1)
    da = (tl.exp(a_tot) * RS + tl.cumsum(from_in, 0, reverse=True)
          + tl.cumsum(from_out, 0) - from_out + inner)
    dx = dt[:, None] * LB
    if HAS_D:
        dx += tl.load(D_ptr + h).to(tl.float32) * dyf

    tl.store(dx_ptr + rows[:, None] * headdim + offs_p[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask_lp)
    # partials: ddt (batch, seqlen, nheads, nptiles); dB, dC (batch, seqlen, nheads * nptiles, dstate);
    # dA, dD (batch, nchunks, nheads, nptiles)
    tl.store(ddt_ptr + rows * nptiles + pid_p, A * da + tl.sum(xf * LB, 1), mask=valid)
    part = (rows[:, None] * nptiles + pid_p) * dstate + offs_n[None, :]
    tl.store(dB_ptr + part, dB.to(dB_ptr.dtype.element_ty), mask=mask_ln)
    tl.store(dC_ptr + part, dC.to(dC_ptr.dtype.element_ty), mask=mask_ln)
    chunk_row = (b.to(tl.int64) * nchunks + c) * nheads + h
    tl.store(dA_ptr + chunk_row * nptiles + pid_p, tl.sum(dt * da, 0))
    if HAS_D:
        tl.store(dD_ptr + chunk_row * nptiles + pid_p, tl.sum(tl.sum(dyf * xf, 1), 0))


@triton.jit
def _pass_kernel(local_ptr, logdecay_ptr, init_ptr, out_ptr, nseg, nheads, size,
                 BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr):
    # Chain the segments of one (batch, head), in the direction of travel: out[k] = the state entering
    # segment k; then S <- exp(logdecay[k]) S + local[k]. Elementwise over a tile of P x N.
    bh, pid = tl.program_id(0), tl.program_id(1)
    b, h = bh // nheads, bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    if HAS_INIT:
        S = tl.load(init_ptr + bh.to(tl.int64) * size + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(nseg):
        k = nseg - 1 - i if REVERSE else i
        row = (b.to(tl.int64) * nseg + k) * nheads + h
        tl.store(out_ptr + row * size + offs, S, mask=mask)
        S = tl.exp(tl.load(logdecay_ptr + row)) * S + tl.load(local_ptr + row * size + offs, mask=mask, other=0.0)


# ----------------------------------------------------------------------------------------------
# launch planning and the autograd function


def _tile(n):
    """The tile that covers n rows or columns: a power of two, at least tl.dot's 16."""
    return max(16, _pow2(n))


class _Plan:
    """Chunk, tile and segment sizes for one problem shape, from a sweep on an H200 (README)."""

    def __init__(self, batch, seqlen, nheads, headdim, dstate, state_every, reverse):
        self.reverse = reverse
        self.chunk = _chunk_len(seqlen, state_every)
        self.nchunks = -(-seqlen // self.chunk)
        self.block_l = _tile(self.chunk)
        self.block_n = _tile(dstate)
        # the state tile lives in registers: 64 x 128 floats or fewer
        self.block_p = max(16, min(_pow2(headdim), 8192 // self.block_n))
        # three pipelining stages: B, C and dt are loaded two chunks ahead. With two, Triton issues the next
        # chunk's loads at the end of an iteration and waits for them at the start of the next; three made the
        # forward 17% faster on wide (H100).
        self.warps, self.stages = 4, 3
        # the passes over the segments' own states (forward) and adjoints (backward) have no L x L tiles: in
        # 4x longer chunks they took about a third less time on the long shape (forward) and 0.215 -> 0.179 ms
        # (backward, H100, README); 16-bit inputs only, float32 ones overflow shared memory. They keep two
        # stages: a third buffer of their tiles leaves shared memory for one block per multiprocessor, and the
        # forward's ran 50% slower.
        self.coarse, self.stages_coarse = 4, 2
        # backward: the sequential adjoint kernel holds one state tile (R) across its loop, best at 4 warps
        # (H200) and pipelined like the forward (it loaded C at each step without: its two launches on long
        # 0.73 -> 0.59 ms, H100). The per-chunk gradient kernel holds two (S, R) and has no loop, so its warps
        # wait on its loads (Nsight Compute, README): two blocks per multiprocessor beat one. At 4 warps it
        # takes 255 registers a thread and spills about 20, and runs 20-27% faster than at 8 (H100). Headdim
        # tiles of 32 spill 84 registers or more; 16 warps or a register cap run slower.
        self.block_p_adj, self.warps_adj = self.block_p, 4
        self.block_p_grad, self.warps_grad = self.block_p, 4
        # a program walks seg_chunks chunks in sequence. From 128 (batch, head, headdim tile) programs up, one
        # segment each fills the GPU (two programs per multiprocessor). Fewer split the sequence into segments
        # that run side by side, chained by _pass_kernel after a state-only pass: enough for about 256 programs,
        # two per multiprocessor of an H100. Fewer leave multiprocessors idle; more slow the forward, whose
        # state-only pass and chaining grow with them (H100, README). Segments are whole coarse chunks, so at
        # least 4 chunks long.
        programs = batch * nheads * -(-headdim // self.block_p)
        nseg = 1 if programs >= 128 else -(-256 // programs)
        self.seg_chunks = self.coarse * -(-self.nchunks // (self.coarse * nseg))
        self.nseg = -(-self.nchunks // self.seg_chunks)


def _strides(x, dt, B, C):
    return (*x.stride()[:3], *dt.stride(), *B.stride()[:3], *C.stride()[:3])


def _run_fwd(plan, x, dt, A, B, C, D, start, write_y, every, write_pairs=False, coarse=1, write_logdecay=False):
    """Launch the forward kernel over plan.nseg segments; start is (batch, nseg, nheads, P, N) or None.
    Returns y (or None); the states after every `every` chunks and at the end, float32 (or None); with
    write_pairs the states after every second chunk and at the end, the backward's, in x's precision
    (or None); with write_logdecay each segment's sum of dt A in scan order, (batch, nseg, nheads) float32
    (or None). coarse > 1 (states only, dividing plan.seg_chunks) walks chunks that many times longer:
    fewer, larger steps."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    chunk = plan.chunk * coarse
    nchunks = -(-seqlen // chunk)
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if write_y else None
    nstates = -(-nchunks // every) if every else 0
    states = x.new_empty(batch, nstates, nheads, headdim, dstate, dtype=torch.float32) if every else None
    pairs = x.new_empty(batch, -(-nchunks // 2), nheads, headdim, dstate) if write_pairs else None
    logdecay = x.new_empty(batch, plan.nseg, nheads, dtype=torch.float32) if write_logdecay else None
    grid = (batch * nheads, -(-headdim // plan.block_p), plan.nseg)
    _scan_fwd_kernel[grid](
        x, dt, A, B, C, D, y, start, states, pairs, logdecay,
        seqlen, nheads, headdim, dstate, nheads // ngroups, plan.seg_chunks // coarse, every or 1, nstates,
        *_strides(x, dt, B, C),
        CHUNK=chunk, BLOCK_L=_tile(chunk), BLOCK_P=plan.block_p, BLOCK_N=plan.block_n,
        HAS_D=D is not None, HAS_START=start is not None, WRITE_Y=write_y, WRITE_STATES=bool(every),
        WRITE_PAIRS=write_pairs, WRITE_LOGDECAY=write_logdecay, REVERSE=plan.reverse, DOT_F32=INTERPRET,
        num_warps=plan.warps, num_stages=plan.stages if coarse == 1 else plan.stages_coarse)
    return y, states, pairs, logdecay


def _run_adj(plan, dt, A, C, dy, dstates, every, rend, pair_adj, coarse=1):
    """Launch the adjoint kernel over plan.nseg segments, from rend (batch, nseg, nheads, P, N) or from zero.
    Writes R at the end of every pair of chunks into pair_adj unless it is None; returns R entering each
    segment. coarse > 1 (no pair_adj; dividing plan.seg_chunks, and every if there are dstates) walks chunks
    that many times longer, as _run_fwd."""
    batch, seqlen, nheads, headdim = dy.shape
    ngroups, dstate = C.shape[2:]
    chunk = plan.chunk * coarse
    rout = dy.new_empty(batch, plan.nseg, nheads, headdim, dstate, dtype=torch.float32)
    grid = (batch * nheads, -(-headdim // plan.block_p_adj), plan.nseg)
    _scan_adj_kernel[grid](
        dt, A, C, dy, dstates, rend, pair_adj, rout,
        seqlen, nheads, headdim, dstate, nheads // ngroups, plan.seg_chunks // coarse, max(1, every // coarse),
        plan.nchunks // every, *dt.stride(), *C.stride()[:3],
        CHUNK=chunk, BLOCK_L=_tile(chunk), BLOCK_P=plan.block_p_adj, BLOCK_N=plan.block_n,
        HAS_DSTATES=dstates is not None, HAS_REND=rend is not None, WRITE_ADJ=pair_adj is not None,
        REVERSE=plan.reverse, DOT_F32=INTERPRET, num_warps=plan.warps_adj,
        num_stages=plan.stages if coarse == 1 else plan.stages_coarse)
    return rout


def _pass(local, logdecay, init, reverse):
    """States entering each segment: (batch, nseg, nheads, P, N) float32. See _pass_kernel."""
    batch, nseg, nheads = logdecay.shape
    size = local.shape[3] * local.shape[4]
    out = torch.empty_like(local)
    BLOCK = min(1024, _pow2(size))
    _pass_kernel[(batch * nheads, -(-size // BLOCK))](
        local, logdecay, init, out, nseg, nheads, size, BLOCK=BLOCK, HAS_INIT=init is not None, REVERSE=reverse)
    return out


def _forward(x, dt, A, B, C, D, initial_state, reverse, state_every, for_backward=False):
    """y and the returned states; for the backward, the plan, each segment's log-decay (None with one
    segment) and, if for_backward, the states after every pair of chunks (else None)."""
    batch, seqlen, nheads, headdim = x.shape
    plan = _Plan(batch, seqlen, nheads, headdim, B.shape[3], state_every, reverse)
    start, logdecay = initial_state, None
    if plan.nseg > 1:  # each segment's own final state, then chained
        k = plan.coarse if x.element_size() == 2 else 1
        _, local, _, logdecay = _run_fwd(plan, x, dt, A, B, C, D, None, False, plan.seg_chunks // k, coarse=k,
                                         write_logdecay=True)
        start = _pass(local, logdecay, initial_state, False)
    y, states, pairs, _ = _run_fwd(plan, x, dt, A, B, C, D, start, True, state_every and state_every // plan.chunk,
                                   write_pairs=for_backward)
    return y, states, plan, pairs, logdecay


class _SelectiveScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, reverse, state_every):
        ctx.set_materialize_grads(False)
        y, states, plan, pair_states, logdecay = _forward(x, dt, A, B, C, D, initial_state, reverse, state_every,
                                                          for_backward=True)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, pair_states, logdecay)
        ctx.plan, ctx.state_every = plan, state_every
        return y, states

    @staticmethod
    def backward(ctx, dy, dstates):
        x, dt, A, B, C, D, initial_state, pair_states, logdecay = ctx.saved_tensors
        plan = ctx.plan
        batch, seqlen, nheads, headdim = x.shape
        ngroups, dstate = B.shape[2:]
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dstates = None if dstates is None else dstates.contiguous()
        every = ctx.state_every // plan.chunk if ctx.state_every else 1
        f32 = dict(device=x.device, dtype=torch.float32)
        # forward states (saved by the forward) and adjoints at the end of every pair of chunks. Both are stored
        # in the inputs' precision: the gradient kernel's products take them at that precision anyway, and in
        # bfloat16 they are half the memory traffic.
        npairs = -(-plan.nchunks // 2)
        pair_adj = torch.empty(batch, npairs, nheads, headdim, dstate, device=x.device, dtype=x.dtype)
        rend = None
        if plan.nseg > 1:  # each segment's own adjoint, then chained from the last segment back
            k = plan.coarse if x.element_size() == 2 and (dstates is None or every % plan.coarse == 0) else 1
            rend = _pass(_run_adj(plan, dt, A, C, dy, dstates, every, None, None, coarse=k), logdecay, None, True)
        rout = _run_adj(plan, dt, A, C, dy, dstates, every, rend, pair_adj)
        # every chunk's gradients, side by side
        nptiles = -(-headdim // plan.block_p_grad)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        ddt = torch.empty(batch, seqlen, nheads, nptiles, **f32)
        dB = B.new_empty(batch, seqlen, nheads * nptiles, dstate)
        dC = C.new_empty(batch, seqlen, nheads * nptiles, dstate)
        dA = torch.empty(batch, plan.nchunks, nheads, nptiles, **f32)
        dD = torch.empty(batch, plan.nchunks, nheads, nptiles, **f32) if D is not None else None
        _scan_grad_kernel[(plan.nchunks * batch * nheads, nptiles)](
            x, dt, A, B, C, D, dy, initial_state, dstates, pair_states, pair_adj,
            dx, ddt, dB, dC, dA, dD,
            batch, seqlen, nheads, headdim, dstate, nheads // ngroups, every, plan.nchunks // every,
            *_strides(x, dt, B, C),
            CHUNK=plan.chunk, BLOCK_L=plan.block_l, BLOCK_P=plan.block_p_grad, BLOCK_N=plan.block_n,
            HAS_D=D is not None, HAS_INIT=initial_state is not None, HAS_DSTATES=dstates is not None,
            REVERSE=plan.reverse, DOT_F32=INTERPRET, num_warps=plan.warps_grad)
        group_sum = lambda t: t.view(batch, seqlen, ngroups, -1, dstate).sum(3)  # accumulated in float32
        dinit = None if initial_state is None else rout[:, 0].to(initial_state.dtype)
        return (dx, ddt.sum(3).to(dt.dtype), dA.sum((0, 1, 3)).to(A.dtype), group_sum(dB), group_sum(dC),
                None if D is None else dD.sum((0, 1, 3)).to(D.dtype), dinit, None, None)


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _takes_kernels(t):
    """CUDA tensors run the Triton kernels, as do CPU ones under TRITON_INTERPRET=1."""
    return t.is_cuda or CPU_KERNELS


def _on_device(t):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


@torch.compiler.disable
def selective_scan(x, dt, A, B, C, D=None, initial_state=None, reverse=False, state_every=None):
    """Mamba-2 selective scan. See the module docstring and DESIGN.md section 1.

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads), positive; A: (nheads,), negative;
    B, C: (batch, seqlen, ngroups, dstate); D: (nheads,) or None; initial_state: (batch, nheads, headdim,
    dstate) or None. Returns y like x, or (y, states) with states (batch, seqlen // state_every, nheads,
    headdim, dstate) in float32: the state after each state_every positions, in scan order.
    CUDA tensors run the Triton kernels, as do CPU tensors under TRITON_INTERPRET=1; other CPU tensors
    take the vectorised PyTorch path."""
    _check_args(x, dt, A, B, C, D, initial_state, state_every, FLOAT_DTYPES)
    if not _takes_kernels(x):
        return _scan_torch(x, dt, A, B, C, D, initial_state, reverse, state_every)
    x, B, C = (_last_dim_contiguous(t) for t in (x, B, C))
    A, D = A.contiguous(), None if D is None else D.contiguous()
    initial_state = None if initial_state is None else initial_state.contiguous()
    args = (x, dt, A, B, C, D, initial_state, bool(reverse), None if state_every is None else int(state_every))
    with _on_device(x):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:7]):
            y, states = _SelectiveScan.apply(*args)
        else:  # nothing to differentiate (sampling): skip the autograd Function's bookkeeping
            y, states = _forward(*args)[:2]
    return y if state_every is None else (y, states)


# ----------------------------------------------------------------------------------------------
# the mixer's short depthwise conv and its SiLU, fused: y = silu(b + sum_j w_j x_{t-(W-1)+j}), or with
# reverse=True the look-ahead y = silu(b + sum_j w_j x_{t+j}); inputs past the sequence come from `tail`.
# One kernel does the forward, and in GRAD mode the backward's pointwise part (dv = dy * silu'(v), v
# recomputed) with partial sums of dw and db; dx is then the same kernel run on dv in the other
# direction with the taps flipped (the transposed conv), and the tail's gradient is a few rows in torch.


def causal_conv_ref(x, weight, bias, tail, reverse):
    """The definition through F.conv1d. x: (batch, seqlen, channels); weight: (channels, width); bias:
    (channels,); tail: (batch, width - 1, channels), the inputs just before the sequence (after it when
    reverse). Returns silu(conv), (batch, seqlen, channels)."""
    padded = torch.cat([x, tail] if reverse else [tail, x], dim=1).transpose(1, 2)
    v = torch.nn.functional.conv1d(padded, weight[:, None].to(x.dtype), bias.to(x.dtype), groups=x.shape[2])
    return torch.nn.functional.silu(v.transpose(1, 2))


@triton.jit
def _conv_tap(x_base, tail_ptr, b, t, c, mask, j, seqlen, channels, sx_l,
              WIDTH: tl.constexpr, REVERSE: tl.constexpr, HAS_TAIL: tl.constexpr):
    """The inputs that tap j multiplies at positions t, in float32: x, or the tail outside the sequence."""
    p = t + j if REVERSE else t + j - (WIDTH - 1)
    inside = (p >= 0) & (p < seqlen)
    src = tl.load(x_base + p.to(tl.int64)[:, None] * sx_l + c[None, :], mask=mask & inside[:, None], other=0.0)
    if HAS_TAIL:  # the tail's row p - seqlen (reverse) or p + WIDTH - 1
        k = p - seqlen if REVERSE else p + WIDTH - 1
        tail_base = tail_ptr + b.to(tl.int64) * (WIDTH - 1) * channels
        src += tl.load(tail_base + k[:, None] * channels + c[None, :], mask=mask & ~inside[:, None], other=0.0)
    return src.to(tl.float32)


@triton.jit
def _conv_kernel(x_ptr, w_ptr, b_ptr, tail_ptr, dy_ptr, y_ptr, dw_ptr, db_ptr,
                 seqlen, channels, sx_b, sx_l,
                 WIDTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, REVERSE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_TAIL: tl.constexpr, SILU: tl.constexpr, GRAD: tl.constexpr):
    # one program: one batch row, BLOCK_T positions, BLOCK_C channels. GRAD: y_ptr receives dv, and
    # dw_ptr / db_ptr this program's partial sums, (batch * t-blocks, WIDTH, channels) / (..., channels)
    b, pid_t, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = c < channels
    mask = (t < seqlen)[:, None] & in_c[None, :]
    x_base = x_ptr + b.to(tl.int64) * sx_b
    v = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        v += tl.load(b_ptr + c, mask=in_c, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(WIDTH):
        w = tl.load(w_ptr + c * WIDTH + j, mask=in_c, other=0.0).to(tl.float32)
        v += w[None, :] * _conv_tap(x_base, tail_ptr, b, t, c, mask, j, seqlen, channels, sx_l, WIDTH, REVERSE, HAS_TAIL)
    out_rows = (b.to(tl.int64) * seqlen + t)[:, None] * channels + c[None, :]
    if GRAD:
        sig = tl.sigmoid(v)
        dv = tl.load(dy_ptr + out_rows, mask=mask, other=0.0).to(tl.float32) * sig * (1 + v * (1 - sig))
        tl.store(y_ptr + out_rows, dv, mask=mask)
        part = (b * tl.num_programs(1) + pid_t).to(tl.int64) * channels
        tl.store(db_ptr + part + c, tl.sum(dv, 0), mask=in_c)
        for j in tl.static_range(WIDTH):  # the taps again (from cache) for dw_j = sum_t dv_t * tap_j
            tap = _conv_tap(x_base, tail_ptr, b, t, c, mask, j, seqlen, channels, sx_l, WIDTH, REVERSE, HAS_TAIL)
            tl.store(dw_ptr + part * WIDTH + j * channels + c, tl.sum(dv * tap, 0), mask=in_c)
    else:
        if SILU:
            v = v * tl.sigmoid(v)
        tl.store(y_ptr + out_rows, v.to(y_ptr.dtype.element_ty), mask=mask)


def _conv_launch(x, weight, bias, tail, reverse, silu, out_dtype, dy=None):
    """Run _conv_kernel over x (batch, seqlen, channels). With dy: the backward's pointwise pass; returns
    dv (float32) and the partial sums of dw and db."""
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    BLOCK_T, BLOCK_C = 64, 128
    grid = (batch, -(-seqlen // BLOCK_T), -(-channels // BLOCK_C))
    grad = dy is not None
    y = torch.empty(batch, seqlen, channels, device=x.device, dtype=torch.float32 if grad else out_dtype)
    dw = x.new_empty(batch * grid[1], width, channels, dtype=torch.float32) if grad else None
    db = x.new_empty(batch * grid[1], channels, dtype=torch.float32) if grad else None
    _conv_kernel[grid](x, weight, bias, tail, dy, y, dw, db, seqlen, channels, x.stride(0), x.stride(1),
                       WIDTH=width, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, REVERSE=reverse, HAS_BIAS=bias is not None,
                       HAS_TAIL=tail is not None, SILU=silu, GRAD=grad)
    return (y, dw, db) if grad else y


class _CausalConv(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, tail, reverse):
        ctx.save_for_backward(x, weight, bias, tail)
        ctx.reverse = reverse
        return _conv_launch(x, weight, bias, tail, reverse, True, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, tail = ctx.saved_tensors
        reverse, width, seqlen = ctx.reverse, weight.shape[1], x.shape[1]
        dv, dw, db = _conv_launch(x, weight, bias, tail, reverse, False, None, dy.contiguous())
        # dx_p = sum_j w_j dv_{t(p, j)}: the conv of dv in the other direction with the taps flipped
        dx = _conv_launch(dv, weight.flip(1).contiguous(), None, None, not reverse, False, x.dtype)
        dtail = None
        if tail is not None:  # tail row k feeds output t = k - j (t = seqlen + k - j when reverse) through tap j
            dtail = torch.zeros_like(tail, dtype=torch.float32)
            for k in range(width - 1):
                for j in range(width):
                    t = seqlen + k - j if reverse else k - j
                    if 0 <= t < seqlen and (j > k if reverse else j <= k):
                        dtail[:, k] += weight[:, j].float() * dv[:, t]
            dtail = dtail.to(tail.dtype)
        return (dx, dw.sum(0).t().to(weight.dtype), None if bias is None else db.sum(0).to(bias.dtype), dtail, None)


@torch.compiler.disable
def causal_conv(x, weight, bias=None, tail=None, reverse=False):
    """silu(depthwise conv of width W) over x (batch, seqlen, channels), causal, or looking ahead when
    reverse; weight (channels, W), bias (channels,) or None, tail (batch, W - 1, channels) or None (zeros):
    the inputs just before the sequence (after it when reverse). CUDA tensors (and CPU ones under
    TRITON_INTERPRET=1) run the fused kernel, other CPU tensors causal_conv_ref."""
    if not _takes_kernels(x):
        tail = x.new_zeros(x.shape[0], weight.shape[1] - 1, x.shape[2]) if tail is None else tail
        return causal_conv_ref(x, weight, x.new_zeros(x.shape[2]) if bias is None else bias, tail.to(x.dtype), reverse)
    x = _last_dim_contiguous(x)
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    tail = None if tail is None else tail.to(x.dtype).contiguous()
    with _on_device(x):
        return _CausalConv.apply(x, weight, bias, tail, bool(reverse))


# ----------------------------------------------------------------------------------------------
# the mixer's output norm, fused: RMSNorm(y * silu(z)) * weight, one row of d_inner per step. With
# g = y silu(z), r = 1 / rms(g) and gw = weight * dout, the backward is dg = r gw - g r^3 mean(g gw),
# dy = dg silu(z), dz = dg y silu'(z), dweight = sum over rows of dout g r.


def gated_rms_norm_ref(y, z, weight, eps=1e-6):
    g = y.float() * torch.nn.functional.silu(z.float())
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(y.dtype)


@triton.jit
def _gated_norm_kernel(y_ptr, z_ptr, w_ptr, dout_ptr, out_ptr, dy_ptr, dz_ptr, dw_ptr, rows, d, sz_row, eps,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, GRAD: tl.constexpr):
    # one program: ROWS rows in turn. GRAD: dy, dz, and this program's partial sum of dweight
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_d = cols < d
    w = tl.load(w_ptr + cols, mask=in_d, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(tl.minimum(ROWS, rows - pid * ROWS)):
        row = pid * ROWS + i
        y = tl.load(y_ptr + row.to(tl.int64) * d + cols, mask=in_d, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row.to(tl.int64) * sz_row + cols, mask=in_d, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        g = y * z * sig
        r = 1.0 / tl.sqrt(tl.sum(g * g, 0) / d + eps)
        if GRAD:
            dout = tl.load(dout_ptr + row.to(tl.int64) * d + cols, mask=in_d, other=0.0).to(tl.float32)
            gw = w * dout
            dg = r * gw - g * (r * r * r) * (tl.sum(g * gw, 0) / d)
            tl.store(dy_ptr + row.to(tl.int64) * d + cols, (dg * z * sig).to(dy_ptr.dtype.element_ty), mask=in_d)
            dz = dg * y * sig * (1 + z * (1 - sig))
            tl.store(dz_ptr + row.to(tl.int64) * d + cols, dz.to(dz_ptr.dtype.element_ty), mask=in_d)
            dw += dout * g * r
        else:
            tl.store(out_ptr + row.to(tl.int64) * d + cols, (g * r * w).to(out_ptr.dtype.element_ty), mask=in_d)
    if GRAD:
        tl.store(dw_ptr + pid.to(tl.int64) * d + cols, dw, mask=in_d)


def _gated_norm_launch(y, z, weight, eps, dout=None):
    rows, d = y.shape
    ROWS = 16  # rows per program: each program's dweight partial is one row
    grid = (-(-rows // ROWS),)
    grad = dout is not None
    out = None if grad else torch.empty_like(y)
    dy, dz = (torch.empty_like(y), torch.empty(rows, d, device=y.device, dtype=z.dtype)) if grad else (None, None)
    dw = torch.empty(grid[0], d, device=y.device, dtype=torch.float32) if grad else None
    _gated_norm_kernel[grid](y, z, weight, dout, out, dy, dz, dw, rows, d, z.stride(0), eps,
                             ROWS=ROWS, BLOCK=_pow2(d), GRAD=grad)
    return (dy, dz, dw.sum(0).to(weight.dtype)) if grad else out


class _GatedNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, z, weight, eps):
        ctx.save_for_backward(y, z, weight)
        ctx.eps = eps
        return _gated_norm_launch(y, z, weight, eps)

    @staticmethod
    def backward(ctx, dout):
        y, z, weight = ctx.saved_tensors
        return (*_gated_norm_launch(y, z, weight, ctx.eps, dout.contiguous()), None)


@torch.compiler.disable
def gated_rms_norm(y, z, weight, eps=1e-6):
    """RMSNorm(y * silu(z)) * weight over the last dim, in y's dtype; y, z: (..., d), weight: (d,). CUDA
    tensors (and CPU ones under TRITON_INTERPRET=1) run the fused kernel, other CPU tensors the reference."""
    if not _takes_kernels(y):
        return gated_rms_norm_ref(y, z, weight, eps)
    shape, d = y.shape, y.shape[-1]
    y = y.reshape(-1, d).contiguous()
    z = z.reshape(-1, d)  # a view where it can be (z is a slice of in_proj's output): rows of stride z.stride(0)
    z = z if z.stride(-1) == 1 else z.contiguous()
    with _on_device(y):
        return _GatedNorm.apply(y, z, weight.contiguous(), eps).view(shape)
