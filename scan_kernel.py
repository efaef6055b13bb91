"""
The Mamba-2 mixer's kernels: the SSD selective scan (Triton forward and backward kernels, the plain
reference loop and a chunked reference in PyTorch), and two small fused kernels around it, the short
depthwise conv with its SiLU and the gated RMSNorm of the scan's output. Each kernel is registered as a
PyTorch operator with its autograd, so torch.compile traces a whole model through them.

Per batch element and head, with state S_t in R^{P x N} (P = headdim, N = dstate):

    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,        y_t = S_t C_t + D x_t,        S_0 = initial_state

The chunked algorithm. Cut the sequence into chunks of L positions and carry S from chunk to chunk.
Inside a chunk, with a_t = dt_t A (<= 0), c_t = a_1 + ... + a_t the cumulative log-decay from the
chunk's start, and the decay mask M_ts = exp(c_t - c_s) for s <= t (0 otherwise), S_t unrolls to
exp(c_t) S + sum_{s<=t} M_ts dt_s x_s B_s^T, so the chunk is a handful of matrix products:

    y      = (C B^T * M * dt^T) x  +  exp(c) * (C S^T)  +  D x       (L x P; the kernel forms y^T)
    S_next = exp(c_L) S  +  (x * exp(c_L - c) dt)^T B                                (P x N)

The backward. Let R = dL/dS at the chunk's end (what later positions and the returned states send back)
and Lam_t = dL/dS_t = exp(c_L - c_t) R + sum_{u>=t} exp(c_u - c_t) dy_u C_u^T. Given S at a chunk's start
and R at its end, the chunk's gradients need nothing from the other chunks:

    dC     = exp(c) * (dy S)  +  (dYX * M * dt^T) B                           (dYX = dy x^T; row t: S_t^T dy_t)
    LamB   = (C B^T * M)^T dy  +  exp(c_L - c) * (B R^T)                       (row t: Lam_t B_t)
    dx     = dt * LamB + D dy,        dB = dt * (exp(c_L - c) * (x R) + (dYX * M)^T C)
    ddt    = A da + x . LamB,         dA = sum dt da,        dD = sum dy . x

where da_t = dL/da_t. The decay a_t enters only through exp(a_t) S_{t-1} in S_t, so da_t = <Lam_t,
exp(a_t) S_{t-1}> (a Frobenius product), and exp(a_t) S_{t-1} = exp(c_t) S + sum_{s<t} exp(c_t - c_s)
dt_s x_s B_s^T. Multiplying out the two parts of Lam_t with these two parts gives four sums:

    da_t = exp(c_L) <R, S>                                         R meets the incoming state
         + sum_{u>=t} exp(c_u) dy_u . (S C_u)                      later outputs meet the incoming state
         + sum_{s<t} exp(c_L - c_s) dt_s x_s . (R B_s)             R meets earlier inputs
         + sum_{u>=t>s} exp(c_u - c_s) dt_s (dy_u . x_s)(C_u . B_s)  later outputs meet earlier inputs

Every factor exp(...) has a non-positive argument and every term is a plain sum (suffix, prefix or
within the chunk), so nothing cancels; the usual form, the gradient of the cumulative decay c turned into
a difference of suffix sums, loses float32 precision on long chunks.

How the kernels run it:
  - _scan_fwd_kernel: a program takes all the chunks of one (batch, head) and headdim tile in turn,
    carrying S. The backward first runs it again without y, storing S after every second chunk
    (pair_states) in the inputs' precision: the forward keeps only its inputs for the backward.
  - _scan_adj_kernel walks the chunks from last to first carrying R alone, the only sequential work of the
    backward: R += dstates where a returned state ends the chunk, R is stored after every second chunk
    (pair_adj), then R_prev = exp(c_L) R + (dy * exp(c))^T C.
  - _scan_grad_kernel, one program per chunk, takes S and R (a pair's second chunk steps S on through the
    first, S_next above; the first steps R back through the second) and computes the gradients above.
    Sums across programs (ddt, dB, dC over headdim tiles and a group's heads; dA, dD over everything) are
    written as partials and added up outside the kernel: no atomics, the same bits every run.
  - With too few (batch, head) programs to fill the GPU, the sequential kernels cut the sequence into
    segments that run side by side: a first launch gives each segment's own final state (going backward,
    its own adjoint) and its sum of dt A, _pass_kernel chains them (S <- exp(sum of dt A) S + local), and a
    second launch starts every segment from its true state.
  - reverse=True runs the same kernels with position i read from seqlen - 1 - i: no flipped copies.
  - Both directions of the bidirectional mixer run in one launch: with a direction axis, a program's head
    is one of the (direction, head) pairs, and direction 1 reads its positions the other way. Twice the
    programs, half the launches (a block step is made of small launches, each far from filling the GPU).
  - With dt_bias, dt arrives raw and the kernels use softplus(dt + dt_bias), saving the separate
    elementwise passes (and their backward) that the mixer would otherwise launch.
"""

import functools
import math
import numbers
import os
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

# Triton reads TRITON_INTERPRET when the kernels below are defined; on CPU they then run in its
# interpreter, which is how CI tests them. The interpreter's tl.dot multiplies bfloat16's raw bits,
# so there every product is taken in float32.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU_KERNELS = INTERPRET  # CPU tensors take the kernels (in the interpreter), else the chunked reference
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# argument checks and the two references


def _check_args(x, dt, A, B, C, D, initial_state, dt_bias, state_every, dtypes):
    """Validate the arguments of a scan; return (batch, seqlen, nheads, headdim, ngroups, dstate), nheads
    and ngroups those of one direction."""
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state, dt_bias=dt_bias)
    for name, t in named.items():
        if t is None and name in ("D", "initial_state", "dt_bias"):
            continue
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have a floating dtype ({allowed}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share a device")
    if x.dim() not in (4, 5) or 0 in x.shape or (x.dim() == 5 and x.shape[2] > 2):
        raise ValueError("x must have shape (batch, seqlen, nheads, headdim), or (batch, seqlen, ndir, nheads, "
                         f"headdim) with ndir 1 or 2, with no empty dim, got {tuple(x.shape)}")
    batch, seqlen, *dirs, nheads, headdim = x.shape  # dirs: [ndir] with a direction axis, else []
    lead = (batch, seqlen, *dirs)
    if B.dim() != len(lead) + 2 or tuple(B.shape[:-2]) != lead or 0 in B.shape:
        want = f"batch={batch}, seqlen={seqlen}, " + "".join(f"ndir={n}, " for n in dirs)
        raise ValueError(f"B must have shape ({want}ngroups, dstate), got {tuple(B.shape)}")
    ngroups, dstate = B.shape[-2:]
    expected = dict(dt=(*lead, nheads), A=(*dirs, nheads), C=(*lead, ngroups, dstate), D=(*dirs, nheads),
                    initial_state=(batch, *dirs, nheads, headdim, dstate), dt_bias=(*dirs, nheads))
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


def _each_direction(scan, x, dt, A, B, C, D, initial_state, reverse, state_every, dt_bias):
    """scan over inputs with a direction axis, one direction at a time (direction 0 as reverse says,
    direction 1 the other way), the outputs stacked on that axis again."""
    pick = lambda t, d, axis: None if t is None else t.select(axis, d)
    outs = [scan(x[:, :, d], dt[:, :, d], A[d], B[:, :, d], C[:, :, d], pick(D, d, 0), pick(initial_state, d, 1),
                 reverse != (d == 1), state_every, pick(dt_bias, d, 0)) for d in range(x.shape[2])]
    if state_every is None:
        return torch.stack(outs, 2)
    return torch.stack([y for y, _ in outs], 2), torch.stack([s for _, s in outs], 2)


def selective_scan_ref(x, dt, A, B, C, D=None, initial_state=None, reverse=False, state_every=None, dt_bias=None):
    """The definition: a plain loop over positions, in float32 (float64 for float64 inputs)."""
    batch, seqlen, nheads, headdim, ngroups, dstate = _check_args(
        x, dt, A, B, C, D, initial_state, dt_bias, state_every, FLOAT_DTYPES + (torch.float64,))
    if x.dim() == 5:
        return _each_direction(selective_scan_ref, x, dt, A, B, C, D, initial_state, reverse, state_every, dt_bias)
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    B = B.to(f).repeat_interleave(nheads // ngroups, dim=2)
    C = C.to(f).repeat_interleave(nheads // ngroups, dim=2)
    xf, dt, A = x.to(f), dt.to(f), A.to(f)
    if dt_bias is not None:
        dt = F.softplus(dt + dt_bias.to(f))
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
    """The smallest power of two >= n, without triton.next_power_of_2's cost (every scan needs a few)."""
    return 1 << (n - 1).bit_length()


CHUNK = 32  # positions per chunk: smaller tiles than 64 keep the kernels' registers from spilling


def _chunk_len(seqlen, state_every):
    """Chunk length: CHUNK, or the largest divisor of state_every up to CHUNK, so that every returned
    state ends a chunk."""
    if state_every is None:
        return min(CHUNK, max(16, _pow2(seqlen)))
    return max(d for d in range(1, CHUNK + 1) if state_every % d == 0)


def _segsum(a):
    """[..., t, s] = a_{s+1} + ... + a_t for s <= t, -inf above the diagonal; each entry a direct sum, so
    that no difference of two long cumulative sums loses precision."""
    T = a.shape[-1]
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    sums = a[..., :, None].expand(*a.shape, T).masked_fill(~below, 0).cumsum(-2)  # [t, s]: a_i for s < i <= t
    return sums.masked_fill(torch.ones_like(below).triu(1), float("-inf"))


def selective_scan_chunked(x, dt, A, B, C, D=None, initial_state=None, reverse=False, state_every=None,
                           dt_bias=None):
    """The chunked algorithm of the docstring in PyTorch (float32; float64 for float64 inputs), the same
    steps the kernels take, differentiable by autograd: the scan of CPU training, and a fast reference."""
    batch, seqlen, nheads, headdim, ngroups, dstate = _check_args(
        x, dt, A, B, C, D, initial_state, dt_bias, state_every, FLOAT_DTYPES + (torch.float64,))
    if x.dim() == 5:
        return _each_direction(selective_scan_chunked, x, dt, A, B, C, D, initial_state, reverse, state_every,
                               dt_bias)
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    L = _chunk_len(seqlen, state_every)
    nc, r = -(-seqlen // L), nheads // ngroups
    if dt_bias is not None:
        dt = F.softplus(dt.to(f) + dt_bias.to(f))

    def chunks(t, *split):  # scan order, padded with zeros to whole chunks (dt = 0 passes the state on)
        t = F.pad((t.flip(1) if reverse else t).to(f), (0, 0) * (t.dim() - 2) + (0, nc * L - seqlen))
        return t.unflatten(1, (nc, L)).unflatten(3, split) if split else t.unflatten(1, (nc, L))
    xs, dts = chunks(x, ngroups, r), chunks(dt, ngroups, r)  # (b, c, l, g, r, p), (b, c, l, g, r)
    Bs, Cs = chunks(B), chunks(C)  # (b, c, l, g, n)
    # 1. c, the cumulative log-decay from each chunk's start; M_ts = exp(c_t - c_s) for s <= t
    a = (dts * A.to(f).view(ngroups, r)).movedim(2, -1)  # (b, c, g, r, l)
    c = a.cumsum(-1)
    M = torch.exp(_segsum(a))  # (b, c, g, r, l, l)
    # 2. inside each chunk: y = (C B^T * M * dt^T) x
    W = torch.einsum("bctgn,bcsgn->bcgts", Cs, Bs)[:, :, :, None] * M * dts.movedim(2, -1)[..., None, :]
    y = torch.einsum("bcgrts,bcsgrp->bctgrp", W, xs)
    # 3. each chunk's own final state, (x * exp(c_L - c) dt)^T B
    w_in = torch.exp(c[..., -1:] - c) * dts.movedim(2, -1)
    local = torch.einsum("bcgrs,bcsgrp,bcsgn->bcgrpn", w_in, xs, Bs)
    # 4. S at every chunk boundary: S_k = sum_{j<=k} exp(total decay of chunks j+1..k) local_j, with
    #    S_0 = initial_state as local_0
    S0 = (x.new_zeros(batch, ngroups, r, headdim, dstate, dtype=f) if initial_state is None
          else initial_state.to(f).view(batch, ngroups, r, headdim, dstate))
    decay = torch.exp(_segsum(F.pad(c[..., -1].movedim(1, -1), (1, 0))))  # (b, g, r, nc + 1, nc + 1)
    S = torch.einsum("bgrkj,bjgrpn->bkgrpn", decay, torch.cat([S0[:, None], local], 1))
    # 5. the incoming state's part of y, exp(c) * (C S^T), and D x
    y = y + torch.einsum("bctgn,bcgrpn->bctgrp", Cs, S[:, :-1]) * torch.exp(c).movedim(-1, 2)[..., None]
    y = y.reshape(batch, nc * L, nheads, headdim)[:, :seqlen]
    y = y.flip(1) if reverse else y
    if D is not None:
        y = y + D.to(f)[:, None] * x.to(f)
    y = y.to(x.dtype)
    if state_every is None:
        return y
    return y, S[:, state_every // L::state_every // L].reshape(batch, -1, nheads, headdim, dstate)


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
def _rows(c, offs_l, seqlen, CHUNK: tl.constexpr, rev):
    """The tile rows that hold chunk c (scan order), and their positions in memory (last to first if rev)."""
    i = c * CHUNK + offs_l
    valid = (offs_l < CHUNK) & (i < seqlen)
    return valid, tl.where(rev, seqlen - 1 - i, i).to(tl.int64)


@triton.jit
def _rows_within(c, c0, c1, offs_l, seqlen, CHUNK: tl.constexpr, rev):
    """_rows, none of them unless c0 <= c < c1: the loops' loads a chunk ahead run past their segment."""
    valid, pos = _rows(c, offs_l, seqlen, CHUNK, rev)
    i = c * CHUNK + offs_l
    return valid & (i >= c0 * CHUNK) & (i < c1 * CHUNK), pos


@triton.jit
def _load_chunk(base, stride_l, c, c0, c1, seqlen, offs_l, offs_col, ncols, CHUNK: tl.constexpr, rev):
    """Rows of chunk c (scan order) of a (seqlen, ncols) slice at base (x, dy: headdim; B, C: dstate),
    columns offs_col; zeros unless c0 <= c < c1."""
    valid, pos = _rows_within(c, c0, c1, offs_l, seqlen, CHUNK, rev)
    return tl.load(base + pos[:, None] * stride_l + offs_col[None, :],
                   mask=valid[:, None] & (offs_col[None, :] < ncols), other=0.0)


@triton.jit
def _softplus(v):
    """log(1 + e^v), without overflow and accurate for large negative v: log1p(u) = log(1 + u) u / ((1 + u) - 1)."""
    u = tl.exp(-tl.abs(v))
    w = 1.0 + u
    return tl.maximum(v, 0.0) + tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))


@triton.jit
def _dt(raw, valid, dt_bias, HAS_DT_BIAS: tl.constexpr):
    """The scan's dt from the loaded values: softplus(raw + dt_bias) with a bias, else raw; 0 off the valid rows."""
    if HAS_DT_BIAS:
        return tl.where(valid, _softplus(raw.to(tl.float32) + dt_bias), 0.0)
    return raw.to(tl.float32)


@triton.jit
def _load_dt(dt_base, sdt_l, c, c0, c1, seqlen, offs_l, dt_bias, CHUNK: tl.constexpr, rev,
             HAS_DT_BIAS: tl.constexpr):
    """dt over chunk c (scan order), float32; zeros unless c0 <= c < c1."""
    valid, pos = _rows_within(c, c0, c1, offs_l, seqlen, CHUNK, rev)
    return _dt(tl.load(dt_base + pos * sdt_l, mask=valid, other=0.0), valid, dt_bias, HAS_DT_BIAS)


@triton.jit
def _head(h, dir_heads, heads_per_group, REVERSE: tl.constexpr):
    """Head h of all directions' heads: its direction d, its head and group within d, and whether it scans
    last to first (direction 0 as REVERSE says, direction 1 the other way)."""
    d = h // dir_heads
    hd = h % dir_heads
    return d, hd, hd // heads_per_group, (d == 1) != REVERSE


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
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, y_ptr, start_ptr, states_ptr, logdecay_ptr,
    seqlen, nheads, dir_heads, headdim, dstate, heads_per_group, seg_chunks, every, nstates,
    sx_b, sx_l, sx_d, sx_h, sdt_b, sdt_l, sdt_d, sdt_h, sB_b, sB_l, sB_d, sB_g, sC_b, sC_l, sC_d, sC_g,
    CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_START: tl.constexpr, WRITE_Y: tl.constexpr,
    WRITE_STATES: tl.constexpr, WRITE_LOGDECAY: tl.constexpr, REVERSE: tl.constexpr, DOT_F32: tl.constexpr,
):
    # one program: one (batch, head), one tile of headdim, one segment of chunks. WRITE_LOGDECAY: also the
    # segment's sum of dt A, (batch, nseg, nheads) (every headdim tile writes the same value)
    bh, pid_p, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // nheads, bh % nheads
    d, hd, g, rev = _head(h, dir_heads, heads_per_group, REVERSE)
    nseg = tl.num_programs(2)
    nchunks = tl.cdiv(seqlen, CHUNK)
    c0 = seg * seg_chunks
    c1 = tl.minimum(c0 + seg_chunks, nchunks)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    offs_l = tl.arange(0, BLOCK_L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_pn = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    x_base = x_ptr + b.to(tl.int64) * sx_b + d.to(tl.int64) * sx_d + hd.to(tl.int64) * sx_h
    dt_base = dt_ptr + b.to(tl.int64) * sdt_b + d.to(tl.int64) * sdt_d + hd.to(tl.int64) * sdt_h
    B_base = B_ptr + b.to(tl.int64) * sB_b + d.to(tl.int64) * sB_d + g.to(tl.int64) * sB_g
    C_base = C_ptr + b.to(tl.int64) * sC_b + d.to(tl.int64) * sC_d + g.to(tl.int64) * sC_g
    pn = offs_p[:, None] * dstate + offs_n[None, :]
    A = tl.load(A_ptr + h).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32) if HAS_DT_BIAS else 0.0

    if HAS_START:
        start = start_ptr + ((b.to(tl.int64) * nseg + seg) * nheads + h) * headdim * dstate
        state = tl.load(start + pn, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)

    # x feeds elementwise math as well as products, so Triton's pipeliner leaves its load in the iteration
    # that uses it, where the warps would wait for it: it is loaded one chunk ahead instead
    x_next = _load_chunk(x_base, sx_l, c0, c0, c1, seqlen, offs_l, offs_p, headdim, CHUNK, rev)
    logdecay = 0.0
    for c in range(c0, c1):
        x = x_next
        x_next = _load_chunk(x_base, sx_l, c + 1, c0, c1, seqlen, offs_l, offs_p, headdim, CHUNK, rev)
        valid, pos = _rows(c, offs_l, seqlen, CHUNK, rev)
        mask_lp = valid[:, None] & (offs_p[None, :] < headdim)
        mask_ln = valid[:, None] & (offs_n[None, :] < dstate)
        dt = _dt(tl.load(dt_base + pos * sdt_l, mask=valid, other=0.0), valid, dt_bias, HAS_DT_BIAS)
        Bm = tl.load(B_base + pos[:, None] * sB_l + offs_n[None, :], mask=mask_ln, other=0.0)
        a = dt * A
        cs = tl.cumsum(a, 0)
        a_tot = tl.sum(a, 0)
        logdecay += a_tot

        if WRITE_Y:
            Cm = tl.load(C_base + pos[:, None] * sC_l + offs_n[None, :], mask=mask_ln, other=0.0)
            # computed transposed, y^T (P x L): S (P x N) is then a product's left operand, taken straight
            # from registers instead of through shared memory every chunk
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

        if WRITE_STATES:  # after every `every` chunks, and at the end, in the array's precision
            if ((c + 1) % every == 0) | (c + 1 == nchunks):
                _store_state(states_ptr, state, b, c // every, nstates, nheads, h, pn, mask_pn, headdim * dstate)
    if WRITE_LOGDECAY:
        tl.store(logdecay_ptr + (b.to(tl.int64) * nseg + seg) * nheads + h, logdecay)


@triton.jit
def _scan_adj_kernel(
    dt_ptr, A_ptr, dt_bias_ptr, C_ptr, dy_ptr, dstates_ptr, rend_ptr, pair_adj_ptr, rout_ptr,
    seqlen, nheads, dir_heads, headdim, dstate, heads_per_group, seg_chunks, every, nstates,
    sdt_b, sdt_l, sdt_d, sdt_h, sC_b, sC_l, sC_d, sC_g,
    CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, HAS_DSTATES: tl.constexpr, HAS_REND: tl.constexpr, WRITE_ADJ: tl.constexpr,
    REVERSE: tl.constexpr, DOT_F32: tl.constexpr,
):
    # one program: one (batch, head), one tile of headdim, one segment, its chunks last to first, carrying
    # R = dL/dS at the chunk's end. Without rend, R starts from zero: the segment's own adjoint.
    bh, pid_p, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // nheads, bh % nheads
    d, hd, g, rev = _head(h, dir_heads, heads_per_group, REVERSE)
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
    dt_base = dt_ptr + b.to(tl.int64) * sdt_b + d.to(tl.int64) * sdt_d + hd.to(tl.int64) * sdt_h
    C_base = C_ptr + b.to(tl.int64) * sC_b + d.to(tl.int64) * sC_d + g.to(tl.int64) * sC_g
    dy_base = dy_ptr + b.to(tl.int64) * seqlen * nheads * headdim + h * headdim
    A = tl.load(A_ptr + h).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32) if HAS_DT_BIAS else 0.0

    if HAS_REND:
        R = tl.load(_slot(rend_ptr, b, seg, nseg, nheads, h, PN) + pn, mask=mask_pn, other=0.0)
    else:
        R = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)

    # dy and dt are loaded a chunk ahead, as x in the forward kernel: their latency hides behind a chunk's work
    dy_next = _load_chunk(dy_base, nheads * headdim, c1 - 1, c0, c1, seqlen, offs_l, offs_p, headdim, CHUNK, rev)
    dt_next = _load_dt(dt_base, sdt_l, c1 - 1, c0, c1, seqlen, offs_l, dt_bias, CHUNK, rev, HAS_DT_BIAS)
    for k in range(c1 - c0):
        c = c1 - 1 - k
        dy, dt = dy_next, dt_next
        dy_next = _load_chunk(dy_base, nheads * headdim, c - 1, c0, c1, seqlen, offs_l, offs_p, headdim, CHUNK,
                              rev)
        dt_next = _load_dt(dt_base, sdt_l, c - 1, c0, c1, seqlen, offs_l, dt_bias, CHUNK, rev, HAS_DT_BIAS)
        valid, pos = _rows(c, offs_l, seqlen, CHUNK, rev)
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
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, dy_ptr, init_ptr, dstates_ptr, pair_states_ptr,
    pair_adj_ptr, dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dhead_ptr,
    batch, seqlen, nheads, dir_heads, headdim, dstate, heads_per_group, every, nstates,
    sx_b, sx_l, sx_d, sx_h, sdt_b, sdt_l, sdt_d, sdt_h, sB_b, sB_l, sB_d, sB_g, sC_b, sC_l, sC_d, sC_g,
    CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DSTATES: tl.constexpr,
    REVERSE: tl.constexpr, DOT_F32: tl.constexpr,
):
    # one program: one chunk of one (batch, head), one tile of headdim; S at the chunk's start and R at its
    # end are given or one step away, so nothing is carried. Axis 0 is (chunk, batch * head), heads fastest
    # (they share B and C): the only grid axis with room for every chunk of a long sequence.
    # Every sum over headdim tiles or chunks (ddt, dB, dC, dA, dD) is a partial per program, summed
    # outside: no atomics.
    pid, pid_p = tl.program_id(0), tl.program_id(1)
    bh, c = pid % (batch * nheads), pid // (batch * nheads)
    b, h = bh // nheads, bh % nheads
    d, hd, g, rev = _head(h, dir_heads, heads_per_group, REVERSE)
    nptiles = tl.num_programs(1)
    nchunks = tl.cdiv(seqlen, CHUNK)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    offs_l = tl.arange(0, BLOCK_L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    valid, pos = _rows(c, offs_l, seqlen, CHUNK, rev)
    mask_lp = valid[:, None] & (offs_p[None, :] < headdim)
    mask_ln = valid[:, None] & (offs_n[None, :] < dstate)
    mask_pn = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    pn = offs_p[:, None] * dstate + offs_n[None, :]
    PN = headdim * dstate
    A = tl.load(A_ptr + h).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32) if HAS_DT_BIAS else 0.0
    x_base = x_ptr + b.to(tl.int64) * sx_b + d.to(tl.int64) * sx_d + hd.to(tl.int64) * sx_h
    dt_base = dt_ptr + b.to(tl.int64) * sdt_b + d.to(tl.int64) * sdt_d + hd.to(tl.int64) * sdt_h
    B_base = B_ptr + b.to(tl.int64) * sB_b + d.to(tl.int64) * sB_d + g.to(tl.int64) * sB_g
    C_base = C_ptr + b.to(tl.int64) * sC_b + d.to(tl.int64) * sC_d + g.to(tl.int64) * sC_g
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
        dt_prev = _load_dt(dt_base, sdt_l, c - 1, 0, nchunks, seqlen, offs_l, dt_bias, CHUNK, rev, HAS_DT_BIAS)
        x_prev = _load_chunk(x_base, sx_l, c - 1, 0, nchunks, seqlen, offs_l, offs_p, headdim, CHUNK, rev)
        B_prev = _load_chunk(B_base, sB_l, c - 1, 0, nchunks, seqlen, offs_l, offs_n, dstate, CHUNK, rev)
        a = dt_prev * A
        S = _step(S.to(tl.float32), x_prev, B_prev, dt_prev, tl.cumsum(a, 0), tl.sum(a, 0), DTYPE, DOT_F32)
        S = S.to(SDTYPE)
    else:
        a = _load_dt(dt_base, sdt_l, c + 1, 0, nchunks, seqlen, offs_l, dt_bias, CHUNK, rev, HAS_DT_BIAS) * A
        dy_next = _load_chunk(dy_base, nheads * headdim, c + 1, 0, nchunks, seqlen, offs_l, offs_p, headdim, CHUNK,
                              rev)
        C_next = _load_chunk(C_base, sC_l, c + 1, 0, nchunks, seqlen, offs_l, offs_n, dstate, CHUNK, rev)
        R = _step_back(R.to(tl.float32), dy_next, C_next, tl.cumsum(a, 0), tl.sum(a, 0), DTYPE, DOT_F32)
        if HAS_DSTATES:  # a returned state ends this chunk
            if ((c + 1) % every == 0) & (c + 1 < nchunks):
                R += _load_dstate(dstates_ptr, b, c, every, nstates, nheads, h, pn, mask_pn, PN)
        R = R.to(SDTYPE)

    dt_raw = tl.load(dt_base + pos * sdt_l, mask=valid, other=0.0).to(tl.float32)
    dt = _dt(dt_raw, valid, dt_bias, HAS_DT_BIAS)
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
    # the per-head sums dA, dD and ddt_bias, (3, batch, nchunks, nheads, nptiles)
    ddt = A * da + tl.sum(xf * LB, 1)
    if HAS_DT_BIAS:  # through dt = softplus(dt_raw + dt_bias)
        ddt = tl.where(valid, ddt * tl.sigmoid(dt_raw + dt_bias), 0.0)
    tl.store(ddt_ptr + rows * nptiles + pid_p, ddt.to(ddt_ptr.dtype.element_ty), mask=valid)
    part = (rows[:, None] * nptiles + pid_p) * dstate + offs_n[None, :]
    tl.store(dB_ptr + part, dB.to(dB_ptr.dtype.element_ty), mask=mask_ln)
    tl.store(dC_ptr + part, dC.to(dC_ptr.dtype.element_ty), mask=mask_ln)
    head_part = dhead_ptr + ((b.to(tl.int64) * nchunks + c) * nheads + h) * nptiles + pid_p
    nparts = batch * nchunks * nheads * nptiles
    tl.store(head_part, tl.sum(dt * da, 0))
    if HAS_D:
        tl.store(head_part + nparts, tl.sum(tl.sum(dyf * xf, 1), 0))
    if HAS_DT_BIAS:  # ddt_bias sums the chunk's ddt here, not over every position outside
        tl.store(head_part + 2 * nparts, tl.sum(ddt, 0))


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
# launch planning, the forward and the backward


def _tile(n):
    """The tile that covers n rows or columns: a power of two, at least tl.dot's 16."""
    return max(16, _pow2(n))


class _Plan:
    """Chunk, tile and segment sizes for one problem shape."""

    def __init__(self, batch, seqlen, nheads, headdim, dstate, state_every, reverse):
        self.reverse, self.dstate = reverse, dstate
        self.chunk = _chunk_len(seqlen, state_every)
        self.nchunks = -(-seqlen // self.chunk)
        self.block_l = _tile(self.chunk)
        self.block_n = _tile(dstate)
        # the state tile lives in registers: 64 x 128 floats or fewer
        self.block_p = max(16, min(_pow2(headdim), 8192 // self.block_n))
        # 4 warps: the gradient kernel, which holds two state tiles, then fits two blocks per multiprocessor
        # to hide its loads' latency. Three pipelining stages load B, C and dt two chunks ahead: with two,
        # Triton issues the next chunk's loads at the end of an iteration and waits for them at the start
        # of the next, so their latency is never hidden.
        self.warps, self.stages = 4, 3
        # the segments' own states (forward) and adjoints (backward) need no L x L tiles, so they walk
        # chunks 4x longer: fewer, larger steps (16-bit inputs only: float32 tiles of 128 rows overflow
        # shared memory). Two stages there: a third buffer of those larger tiles would leave shared memory
        # for one block per multiprocessor.
        self.coarse, self.stages_coarse = 4, 2
        # a program walks seg_chunks chunks in sequence. From 128 (batch, head, headdim tile) programs up,
        # one segment each fills the GPU. Fewer cut the sequence into segments that run side by side, chained
        # by _pass_kernel after a state-only pass: about 256 programs, two per multiprocessor. More segments
        # would make the state-only pass and the chaining, which grow with them, cost more than they give.
        # Segments are whole coarse chunks, so at least 4 chunks long.
        programs = batch * nheads * -(-headdim // self.block_p)
        nseg = 1 if programs >= 128 else -(-256 // programs)
        self.seg_chunks = self.coarse * -(-self.nchunks // (self.coarse * nseg))
        self.nseg = -(-self.nchunks // self.seg_chunks)


def _with_direction_axis(x, *others):
    """x (batch, seqlen, [ndir,] nheads, headdim) and tensors laid out alike (dt, B, C, dy), each with a
    direction axis at dim 2: of size 1 where x has none."""
    return [x, *others] if x.dim() == 5 else [t.unsqueeze(2) for t in (x, *others)]


def _strides(x, dt, B, C):
    """The strides the kernels take, of x, dt, B and C with their direction axes."""
    return (*x.stride()[:4], *dt.stride(), *B.stride()[:4], *C.stride()[:4])


def _geometry(x, B):
    """(batch, seqlen, ndir, dir_heads, headdim, ngroups, dstate) of x and B with their direction axes."""
    return (*x.shape, *B.shape[3:])


def _empty(t):
    """A stand-in for an absent output: the scan's operators return tensors only."""
    return t.new_empty(0)


def _outputs(plan, x, state_every):
    """The forward's outputs, unwritten: y, and the states every state_every positions (float32; empty if
    state_every is 0)."""
    batch, seqlen, *heads, headdim = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    states = (x.new_empty(batch, seqlen // state_every, *heads, headdim, plan.dstate, dtype=torch.float32)
              if state_every else _empty(x))
    return y, states


def _none_if_empty(t):
    return None if t.numel() == 0 else t


def _run_fwd(plan, x, dt, A, B, C, D, dt_bias, start, y, states, logdecay, every, coarse=1):
    """Launch the forward kernel over plan.nseg segments, from start (batch, nseg, nheads, P, N) or zeros.
    Writes whichever outputs are given: y; the states after every `every` chunks and at the end; each
    segment's sum of dt A in scan order. coarse > 1 (no y, dividing plan.seg_chunks) walks chunks that
    many times longer."""
    batch, seqlen, ndir, dir_heads, headdim, ngroups, dstate = _geometry(x, B)
    chunk = plan.chunk * coarse
    nstates = 0 if states is None else states.shape[1]
    grid = (batch * ndir * dir_heads, -(-headdim // plan.block_p), plan.nseg)
    _scan_fwd_kernel[grid](
        x, dt, A, B, C, D, dt_bias, y, start, states, logdecay,
        seqlen, ndir * dir_heads, dir_heads, headdim, dstate, dir_heads // ngroups, plan.seg_chunks // coarse,
        every or 1, nstates,
        *_strides(x, dt, B, C),
        CHUNK=chunk, BLOCK_L=_tile(chunk), BLOCK_P=plan.block_p, BLOCK_N=plan.block_n,
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, HAS_START=start is not None, WRITE_Y=y is not None,
        WRITE_STATES=states is not None, WRITE_LOGDECAY=logdecay is not None, REVERSE=plan.reverse,
        DOT_F32=INTERPRET,
        num_warps=plan.warps, num_stages=plan.stages if coarse == 1 else plan.stages_coarse)


def _run_adj(plan, dt, A, dt_bias, C, dy, dstates, every, rend, pair_adj, coarse=1):
    """Launch the adjoint kernel over plan.nseg segments, from rend (batch, nseg, nheads, P, N) or from zero.
    Writes R at the end of every pair of chunks into pair_adj unless it is None; returns R entering each
    segment. coarse > 1 (no pair_adj; dividing plan.seg_chunks, and every if there are dstates) walks chunks
    that many times longer, as _run_fwd."""
    batch, seqlen, ndir, dir_heads, headdim, ngroups, dstate = _geometry(dy, C)
    nheads = ndir * dir_heads
    chunk = plan.chunk * coarse
    rout = dy.new_empty(batch, plan.nseg, nheads, headdim, dstate, dtype=torch.float32)
    grid = (batch * nheads, -(-headdim // plan.block_p), plan.nseg)
    _scan_adj_kernel[grid](
        dt, A, dt_bias, C, dy, dstates, rend, pair_adj, rout,
        seqlen, nheads, dir_heads, headdim, dstate, dir_heads // ngroups, plan.seg_chunks // coarse,
        max(1, every // coarse), plan.nchunks // every, *dt.stride(), *C.stride()[:4],
        CHUNK=chunk, BLOCK_L=_tile(chunk), BLOCK_P=plan.block_p, BLOCK_N=plan.block_n,
        HAS_DT_BIAS=dt_bias is not None, HAS_DSTATES=dstates is not None, HAS_REND=rend is not None,
        WRITE_ADJ=pair_adj is not None, REVERSE=plan.reverse, DOT_F32=INTERPRET,
        num_warps=plan.warps, num_stages=plan.stages if coarse == 1 else plan.stages_coarse)
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


def _plan(x, B, state_every, reverse):
    """The plan of a scan of x and B (state_every 0: no returned states); every direction's heads count.
    Under torch.compile the sizes may be symbols; the plan takes their values (a guard: a new shape is
    traced anew, as the kernels' tiles depend on it)."""
    batch, seqlen, *heads, headdim = map(int, x.shape)
    return _cached_plan(batch, seqlen, math.prod(heads), headdim, int(B.shape[-1]), state_every or None, reverse)


_cached_plan = functools.lru_cache(maxsize=1024)(_Plan)  # a model makes the same few plans every step


def _segment_starts(plan, x, dt, A, B, C, D, dt_bias, initial_state):
    """The state entering each of plan.nseg segments, (batch, nseg, nheads, P, N) float32, and each
    segment's sum of dt A, (batch, nseg, nheads); with one segment, initial_state and None. x, dt, B, C
    with their direction axes."""
    if plan.nseg == 1:
        return initial_state, None
    batch, _, ndir, dir_heads, headdim, _, dstate = _geometry(x, B)
    f32 = dict(dtype=torch.float32)
    logdecay = x.new_empty(batch, plan.nseg, ndir * dir_heads, **f32)
    local = x.new_empty(batch, plan.nseg, ndir * dir_heads, headdim, dstate, **f32)
    k = plan.coarse if x.element_size() == 2 else 1  # each segment's own final state, then chained
    _run_fwd(plan, x, dt, A, B, C, D, dt_bias, None, None, local, logdecay, plan.seg_chunks // k, coarse=k)
    return _pass(local, logdecay, initial_state, False), logdecay


def _forward(x, dt, A, B, C, D, initial_state, dt_bias, reverse, state_every):
    """y and the states every state_every positions (0: none; then empty)."""
    plan = _plan(x, B, state_every, reverse)
    y, states = _outputs(plan, x, state_every)
    x, dt, B, C = _with_direction_axis(x, dt, B, C)
    start, _ = _segment_starts(plan, x, dt, A, B, C, D, dt_bias, initial_state)
    _run_fwd(plan, x, dt, A, B, C, D, dt_bias, start, _with_direction_axis(y)[0], _none_if_empty(states), None,
             state_every // plan.chunk)
    return y, states


def _backward(x, dt, A, B, C, D, initial_state, dt_bias, dy, dstates, reverse, state_every):
    """The gradients of x, dt, A, B, C, D, initial_state and dt_bias (empty where the input is None), each
    shaped like its input."""
    plan = _plan(x, B, state_every, reverse)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dy = torch.zeros_like(dx) if dy is None else dy.contiguous()
    x5, dt5, B5, C5, dy5, dx5 = _with_direction_axis(x, dt, B, C, dy, dx)
    batch, seqlen, ndir, dir_heads, headdim, ngroups, dstate = _geometry(x5, B5)
    nheads = ndir * dir_heads
    dstates = None if dstates is None or dstates.numel() == 0 else dstates.contiguous()
    every = state_every // plan.chunk if state_every else 1
    f32 = dict(device=x.device, dtype=torch.float32)
    # S and R at the end of every pair of chunks, in the inputs' precision (the gradient kernel's products
    # read them at it). S comes from a second forward pass, without y, in 16 bits over chunks twice as
    # long, one a pair: cheaper than keeping S from the forward, as much memory as y.
    pairs = (batch, -(-plan.nchunks // 2), nheads, headdim, dstate)
    pair_states, pair_adj = x.new_empty(pairs), x.new_empty(pairs)
    start, logdecay = _segment_starts(plan, x5, dt5, A, B5, C5, D, dt_bias, initial_state)
    pair_coarse = 2 if x.element_size() == 2 else 1
    _run_fwd(plan, x5, dt5, A, B5, C5, D, dt_bias, start, None, pair_states, None, 2 // pair_coarse,
             coarse=pair_coarse)
    rend = None
    if plan.nseg > 1:  # each segment's own adjoint, then chained from the last segment back
        k = plan.coarse if x.element_size() == 2 and (dstates is None or every % plan.coarse == 0) else 1
        rend = _pass(_run_adj(plan, dt5, A, dt_bias, C5, dy5, dstates, every, None, None, coarse=k), logdecay, None,
                     True)
    rout = _run_adj(plan, dt5, A, dt_bias, C5, dy5, dstates, every, rend, pair_adj)
    # every chunk's gradients, side by side; with one headdim tile the kernel writes ddt in dt's precision
    nptiles = -(-headdim // plan.block_p)
    ddt = x.new_empty(batch, seqlen, nheads, nptiles, dtype=dt.dtype if nptiles == 1 else torch.float32)
    dB = B.new_empty(batch, seqlen, nheads * nptiles, dstate)
    dC = C.new_empty(batch, seqlen, nheads * nptiles, dstate)
    dhead = torch.empty(3, batch, plan.nchunks, nheads, nptiles, **f32)
    _scan_grad_kernel[(plan.nchunks * batch * nheads, nptiles)](
        x5, dt5, A, B5, C5, D, dt_bias, dy5, initial_state, dstates, pair_states, pair_adj,
        dx5, ddt, dB, dC, dhead,
        batch, seqlen, nheads, dir_heads, headdim, dstate, dir_heads // ngroups, every, plan.nchunks // every,
        *_strides(x5, dt5, B5, C5),
        CHUNK=plan.chunk, BLOCK_L=plan.block_l, BLOCK_P=plan.block_p, BLOCK_N=plan.block_n,
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, HAS_INIT=initial_state is not None,
        HAS_DSTATES=dstates is not None, REVERSE=plan.reverse, DOT_F32=INTERPRET, num_warps=plan.warps)
    # (an operator's outputs may not share storage: each sum is a tensor of its own)
    group_sum = lambda t, like: (t.view(batch, seqlen, ndir * ngroups, -1, dstate).sum(3)
                                 if nheads * nptiles > ndir * ngroups else t).view(like.shape)
    head_sum = lambda i, like: _empty(x) if like is None else dhead[i].sum((0, 1, 3)).to(like.dtype).view(like.shape)
    ddt = (ddt if nptiles == 1 else ddt.sum(3).to(dt.dtype)).view(dt.shape)
    dinit = _empty(x) if initial_state is None else rout[:, 0].to(initial_state.dtype).view(initial_state.shape)
    return dx, ddt, head_sum(0, A), group_sum(dB, B), group_sum(dC, C), head_sum(1, D), dinit, head_sum(2, dt_bias)


# ----------------------------------------------------------------------------------------------
# the kernels as PyTorch operators, and the scan's public entry


def _on_device(t):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _like(t, like=None):
    """A new tensor of t's shape and dtype, contiguous (what every kernel returns); empty if t is None."""
    return like.new_empty(0) if t is None else t.new_empty(t.shape)


def _operator(name, impl, fake, setup, grads, backward_impl=None, backward_fake=None):
    """impl as the torch.library operator diffumamba::name (fake: its outputs' shapes, for tracing), whose
    gradients grads(ctx, *output_grads) computes, through ctx.backward if the backward has a kernel: the
    operator made of backward_impl. setup(ctx, inputs, output) saves what grads needs. Returns the
    function to call: under torch.compile the operator, which the compiler traces; in an eager call with
    gradients, an autograd.Function that runs impl and backward_impl itself; without, impl alone. Eager
    calls skip the operator's dispatch, which costs about as much host time as the kernels' launches."""
    op = torch.library.custom_op(f"diffumamba::{name}", impl, mutates_args=())
    op.register_fake(fake)
    backward_op = None
    if backward_impl is not None:
        backward_op = torch.library.custom_op(f"diffumamba::{name}_backward", backward_impl, mutates_args=())
        backward_op.register_fake(backward_fake)

    def setup_op(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.backward = backward_op
    op.register_autograd(grads, setup_context=setup_op)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup(ctx, inputs, output)
            ctx.backward = backward_impl
            return output

        backward = staticmethod(grads)

    def call(*inputs):
        if torch.compiler.is_compiling():
            return op(*inputs)
        if torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in inputs):
            return Eager.apply(*inputs)
        return impl(*inputs)
    return call


def _scan_impl(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
               initial_state: Optional[Tensor], dt_bias: Optional[Tensor], reverse: bool,
               state_every: int) -> tuple[Tensor, Tensor]:
    with _on_device(x):
        return _forward(x, dt, A, B, C, D, initial_state, dt_bias, reverse, state_every)


def _scan_fake(x, dt, A, B, C, D, initial_state, dt_bias, reverse, state_every):
    return _outputs(_plan(x, B, state_every, reverse), x, state_every)


def _scan_backward_impl(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                        initial_state: Optional[Tensor], dt_bias: Optional[Tensor], dy: Optional[Tensor],
                        dstates: Optional[Tensor], reverse: bool,
                        state_every: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _on_device(x):
        return _backward(x, dt, A, B, C, D, initial_state, dt_bias, dy, dstates, reverse, state_every)


def _scan_backward_fake(x, dt, A, B, C, D, initial_state, dt_bias, dy, dstates, reverse, state_every):
    return tuple(_like(t, x) for t in (x, dt, A, B, C, D, initial_state, dt_bias))


def _scan_setup(ctx, inputs, output):
    x, dt, A, B, C, D, initial_state, dt_bias, reverse, state_every = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, initial_state, dt_bias)
    ctx.set_materialize_grads(False)  # an unused y or states sends None, not a tensor of zeros
    ctx.reverse, ctx.state_every = reverse, state_every


def _scan_grads(ctx, dy, dstates):
    saved = ctx.saved_tensors
    grads = ctx.backward(*saved, dy, dstates, ctx.reverse, ctx.state_every)
    return (*(None if t is None else g for t, g in zip(saved, grads)), None, None)


_scan = _operator("scan", _scan_impl, _scan_fake, _scan_setup, _scan_grads, _scan_backward_impl, _scan_backward_fake)


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _takes_kernels(t):
    """CUDA tensors run the Triton kernels, as do CPU ones under TRITON_INTERPRET=1."""
    return t.is_cuda or CPU_KERNELS


def selective_scan(x, dt, A, B, C, D=None, initial_state=None, reverse=False, state_every=None, dt_bias=None):
    """Mamba-2 selective scan (see the module docstring).

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads), positive; A: (nheads,), negative;
    B, C: (batch, seqlen, ngroups, dstate); D: (nheads,) or None; initial_state: (batch, nheads, headdim,
    dstate) or None; dt_bias: (nheads,) or None, and if given dt is the raw projection and the scan uses
    softplus(dt + dt_bias). Returns y like x, or (y, states) with states (batch, seqlen // state_every,
    nheads, headdim, dstate) in float32: the state after each state_every positions, in scan order.

    Both directions of a bidirectional mixer in one call: every argument with a direction axis of size
    ndir (1 or 2) after (batch, seqlen), or first for A, D and dt_bias, after batch for initial_state; x
    (batch, seqlen, ndir, nheads, headdim) and so on. Direction 0 scans as reverse says, direction 1 the
    other way; y and states get the axis too. The same as one call a direction, in one launch of each
    kernel: twice the programs, half the launches.

    CUDA tensors run the Triton kernels, as do CPU tensors under TRITON_INTERPRET=1; other CPU tensors
    take selective_scan_chunked."""
    if not _takes_kernels(x):
        return selective_scan_chunked(x, dt, A, B, C, D, initial_state, reverse, state_every, dt_bias)
    _check_args(x, dt, A, B, C, D, initial_state, dt_bias, state_every, FLOAT_DTYPES)
    x, B, C = (_last_dim_contiguous(t) for t in (x, B, C))
    A, D, dt_bias = (None if t is None else t.contiguous() for t in (A, D, dt_bias))
    initial_state = None if initial_state is None else initial_state.contiguous()
    y, states = _scan(x, dt, A, B, C, D, initial_state, dt_bias, bool(reverse), int(state_every or 0))
    return y if state_every is None else (y, states)


# ----------------------------------------------------------------------------------------------
# the mixer's short depthwise conv and its SiLU, fused: y = silu(b + sum_j w_j x_{t-(W-1)+j}), or with
# reverse=True the look-ahead y = silu(b + sum_j w_j x_{t+j}); inputs past the sequence come from `tail`.
# A direction axis puts both directions of the mixer in one launch, direction a grid axis.
# One kernel does the forward, and in GRAD mode the backward's pointwise part (dv = dy * silu'(v), v
# recomputed) with partial sums of dw and db; dx is then the same kernel run on dv in the other
# direction with the taps flipped (the transposed conv), and the tail's gradient is a few rows in torch.


def causal_conv_ref(x, weight, bias, tail, reverse):
    """The definition, tap by tap (on a CPU also far faster than F.conv1d's depthwise backward). x: (batch,
    seqlen, channels); weight: (channels, width); bias: (channels,); tail: (batch, width - 1, channels),
    the inputs just before the sequence (after it when reverse). Returns silu(conv), (batch, seqlen,
    channels). With a direction axis, x (batch, seqlen, ndir, channels) and the rest alike (weight and bias
    (ndir, ...)): direction 0 as reverse says, direction 1 the other way."""
    if x.dim() == 4:
        return torch.stack([causal_conv_ref(x[:, :, d], weight[d], bias[d], tail[:, :, d], reverse != (d == 1))
                            for d in range(x.shape[2])], 2)
    padded = torch.cat([x, tail] if reverse else [tail, x], dim=1)
    v = bias.to(x.dtype) + sum(weight[:, j].to(x.dtype) * padded[:, j:j + x.shape[1]] for j in range(weight.shape[1]))
    return F.silu(v)


@triton.jit
def _conv_tap(x_base, tail_base, t, c, mask, j, seqlen, sx_l, s_tail, rev, WIDTH: tl.constexpr,
              HAS_TAIL: tl.constexpr):
    """The inputs that tap j multiplies at positions t, in float32: x, or the tail outside the sequence."""
    p = tl.where(rev, t + j, t + j - (WIDTH - 1))
    inside = (p >= 0) & (p < seqlen)
    src = tl.load(x_base + p.to(tl.int64)[:, None] * sx_l + c[None, :], mask=mask & inside[:, None], other=0.0)
    if HAS_TAIL:  # the tail's row p - seqlen (reverse) or p + WIDTH - 1
        k = tl.where(rev, p - seqlen, p + WIDTH - 1)
        src += tl.load(tail_base + k[:, None] * s_tail + c[None, :], mask=mask & ~inside[:, None], other=0.0)
    return src.to(tl.float32)


@triton.jit
def _conv_kernel(x_ptr, w_ptr, b_ptr, tail_ptr, dy_ptr, y_ptr, dwb_ptr,
                 seqlen, channels, ndir, sx_b, sx_l, sx_d,
                 WIDTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, REVERSE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_TAIL: tl.constexpr, SILU: tl.constexpr, GRAD: tl.constexpr):
    # one program: one batch row, BLOCK_T positions, BLOCK_C channels of one direction (axis 2: direction,
    # then channel blocks). GRAD: y_ptr receives dv, and dwb_ptr this program's partial sums of dw and db,
    # (batch * t-blocks, WIDTH + 1, ndir * channels) with db last
    b, pid_t, pid_dc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nblocks_c = tl.cdiv(channels, BLOCK_C)
    d, pid_c = pid_dc // nblocks_c, pid_dc % nblocks_c
    rev = (d == 1) != REVERSE  # direction 0 as REVERSE says, direction 1 the other way
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = c < channels
    mask = (t < seqlen)[:, None] & in_c[None, :]
    x_base = x_ptr + b.to(tl.int64) * sx_b + d * sx_d
    tail_base = tail_ptr
    if HAS_TAIL:  # (batch, WIDTH - 1, ndir, channels)
        tail_base += (b.to(tl.int64) * (WIDTH - 1) * ndir + d) * channels
    s_tail = ndir * channels
    w_ptr += d * channels * WIDTH
    dc = d * channels + c  # the channel's column in the outputs and the bias, with the direction's before it
    v = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        v += tl.load(b_ptr + dc, mask=in_c, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(WIDTH):
        w = tl.load(w_ptr + c * WIDTH + j, mask=in_c, other=0.0).to(tl.float32)
        v += w[None, :] * _conv_tap(x_base, tail_base, t, c, mask, j, seqlen, sx_l, s_tail, rev, WIDTH, HAS_TAIL)
    out_rows = (b.to(tl.int64) * seqlen + t)[:, None] * (ndir * channels) + dc[None, :]
    if GRAD:
        sig = tl.sigmoid(v)
        dv = tl.load(dy_ptr + out_rows, mask=mask, other=0.0).to(tl.float32) * sig * (1 + v * (1 - sig))
        tl.store(y_ptr + out_rows, dv.to(y_ptr.dtype.element_ty), mask=mask)
        part = dwb_ptr + (b * tl.num_programs(1) + pid_t).to(tl.int64) * (WIDTH + 1) * ndir * channels + dc
        tl.store(part + WIDTH * ndir * channels, tl.sum(dv, 0), mask=in_c)
        for j in tl.static_range(WIDTH):  # the taps again (from cache) for dw_j = sum_t dv_t * tap_j
            tap = _conv_tap(x_base, tail_base, t, c, mask, j, seqlen, sx_l, s_tail, rev, WIDTH, HAS_TAIL)
            tl.store(part + j * ndir * channels, tl.sum(dv * tap, 0), mask=in_c)
    else:
        if SILU:
            v = v * tl.sigmoid(v)
        tl.store(y_ptr + out_rows, v.to(y_ptr.dtype.element_ty), mask=mask)


def _conv_launch(x, weight, bias, tail, reverse, silu, out_dtype, dy=None):
    """Run _conv_kernel over x (batch, seqlen, ndir, channels), weight (ndir, channels, width). With dy: the
    backward's pointwise pass; returns dv and the partial sums of dw and db, (programs, width + 1, ndir *
    channels) with db last."""
    batch, seqlen, ndir, channels = x.shape
    width = weight.shape[-1]
    BLOCK_C = 128
    # 64 positions a program, or 16 where that leaves too few programs to fill the GPU (a block step)
    nblocks_c = ndir * -(-channels // BLOCK_C)
    BLOCK_T = 64 if batch * -(-seqlen // 64) * nblocks_c >= 256 else 16
    grid = (batch, -(-seqlen // BLOCK_T), nblocks_c)
    grad = dy is not None
    # dv in the inputs' precision: the transposed conv reads it back, and rounds dx to that precision anyway
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype if grad else out_dtype)
    dwb = x.new_empty(batch * grid[1], width + 1, ndir * channels, dtype=torch.float32) if grad else None
    _conv_kernel[grid](x, weight, bias, tail, dy, y, dwb, seqlen, channels, ndir, *x.stride()[:3],
                       WIDTH=width, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, REVERSE=reverse, HAS_BIAS=bias is not None,
                       HAS_TAIL=tail is not None, SILU=silu, GRAD=grad)
    return (y, dwb) if grad else y


def _conv_direction_axis(x, weight):
    """x as (batch, seqlen, ndir, channels) and weight as (ndir, channels, width): a direction axis of size
    1 where x has none."""
    x = x if x.dim() == 4 else x.unsqueeze(2)
    return x, weight.view(x.shape[2], x.shape[3], weight.shape[-1])


def _conv_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], tail: Optional[Tensor], reverse: bool) -> Tensor:
    with _on_device(x):
        return _conv_launch(*_conv_direction_axis(x, weight), bias, tail, reverse, True, x.dtype).view(x.shape)


def _conv_fake(x, weight, bias, tail, reverse):
    return _like(x)


def _conv_backward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], tail: Optional[Tensor], dy: Tensor,
                        reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x4, w3 = _conv_direction_axis(x, weight)
    batch, seqlen, ndir, channels = x4.shape
    width = w3.shape[-1]
    with _on_device(x):
        dv, dwb = _conv_launch(x4, w3, bias, tail, reverse, False, None, dy.contiguous())
        # dx_p = sum_j w_j dv_{t(p, j)}: the conv of dv in the other direction with the taps flipped
        dx = _conv_launch(dv, w3.flip(-1).contiguous(), None, None, not reverse, False, x.dtype).view(x.shape)
    dtail = _empty(x)
    if tail is not None:  # tail row k feeds output t = k - j (t = seqlen + k - j when reverse) through tap j
        dtail = torch.zeros(batch, width - 1, ndir, channels, device=x.device, dtype=torch.float32)
        for d in range(ndir):
            rev = reverse != (d == 1)
            for k in range(width - 1):
                for j in range(width):
                    t = seqlen + k - j if rev else k - j
                    if 0 <= t < seqlen and (j > k if rev else j <= k):
                        dtail[:, k, d] += w3[d, :, j].float() * dv[:, t, d]
        dtail = dtail.view(tail.shape).to(tail.dtype)
    dwb = dwb.sum(0)
    dw = dwb[:width].t().contiguous().view(weight.shape).to(weight.dtype)
    return dx, dw, _empty(x) if bias is None else dwb[width].view(bias.shape).to(bias.dtype), dtail


def _conv_backward_fake(x, weight, bias, tail, dy, reverse):
    return _like(x), _like(weight), _like(bias, x), _like(tail, x)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, tail, reverse = inputs
    ctx.save_for_backward(x, weight, bias, tail)
    ctx.reverse = reverse


def _conv_grads(ctx, dy):
    x, weight, bias, tail = ctx.saved_tensors
    dx, dw, db, dtail = ctx.backward(x, weight, bias, tail, dy, ctx.reverse)
    return dx, dw, None if bias is None else db, None if tail is None else dtail, None


_conv = _operator("causal_conv", _conv_impl, _conv_fake, _conv_setup, _conv_grads, _conv_backward_impl,
                  _conv_backward_fake)


def causal_conv(x, weight, bias=None, tail=None, reverse=False):
    """silu(depthwise conv of width W) over x (batch, seqlen, channels), causal, or looking ahead when
    reverse; weight (channels, W), bias (channels,) or None, tail (batch, W - 1, channels) or None (zeros):
    the inputs just before the sequence (after it when reverse). Both directions of a bidirectional mixer
    in one call: x (batch, seqlen, ndir, channels), weight (ndir, channels, W), bias (ndir, channels), tail
    (batch, W - 1, ndir, channels); direction 0 as reverse says, direction 1 the other way. CUDA tensors
    (and CPU ones under TRITON_INTERPRET=1) run the fused kernel, other CPU tensors causal_conv_ref."""
    if not _takes_kernels(x):
        tail = x.new_zeros(x.shape[0], weight.shape[-1] - 1, *x.shape[2:]) if tail is None else tail
        return causal_conv_ref(x, weight, x.new_zeros(x.shape[2:]) if bias is None else bias, tail.to(x.dtype),
                               reverse)
    tail = None if tail is None else tail.to(x.dtype).contiguous()
    return _conv(_last_dim_contiguous(x), weight.contiguous(), None if bias is None else bias.contiguous(), tail,
                 bool(reverse))


# ----------------------------------------------------------------------------------------------
# the mixer's output norm, fused: RMSNorm(y * silu(z)) * weight, one row of d_inner per step. With
# g = y silu(z), r = 1 / rms(g) and gw = weight * dout, the backward is dg = r gw - g r^3 mean(g gw),
# dy = dg silu(z), dz = dg y silu'(z), dweight = sum over rows of dout g r.


def gated_rms_norm_ref(y, z, weight, eps=1e-6):
    g = y.float() * F.silu(z.float())
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(y.dtype)


@triton.jit
def _gated_norm_kernel(y_ptr, z_ptr, w_ptr, dout_ptr, out_ptr, dy_ptr, dz_ptr, dw_ptr, rows, d, sz_row, sz_dir,
                       eps, ROWS: tl.constexpr, BLOCK: tl.constexpr, GRAD: tl.constexpr):
    # one program: ROWS rows of one direction (axis 1) in turn, y and the outputs (rows, ndir, d), z of
    # strides (sz_row, sz_dir, 1). GRAD: dy, dz, and this program's partial sum of dweight, (programs, ndir, d)
    pid, dr = tl.program_id(0), tl.program_id(1)
    ndir = tl.num_programs(1)
    cols = tl.arange(0, BLOCK)
    in_d = cols < d
    w = tl.load(w_ptr + dr * d + cols, mask=in_d, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(tl.minimum(ROWS, rows - pid * ROWS)):
        row = pid * ROWS + i
        at = (row.to(tl.int64) * ndir + dr) * d + cols  # in y and the outputs
        y = tl.load(y_ptr + at, mask=in_d, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row.to(tl.int64) * sz_row + dr * sz_dir + cols, mask=in_d, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        g = y * z * sig
        r = 1.0 / tl.sqrt(tl.sum(g * g, 0) / d + eps)
        if GRAD:
            dout = tl.load(dout_ptr + at, mask=in_d, other=0.0).to(tl.float32)
            gw = w * dout
            dg = r * gw - g * (r * r * r) * (tl.sum(g * gw, 0) / d)
            tl.store(dy_ptr + at, (dg * z * sig).to(dy_ptr.dtype.element_ty), mask=in_d)
            dz = dg * y * sig * (1 + z * (1 - sig))
            tl.store(dz_ptr + at, dz.to(dz_ptr.dtype.element_ty), mask=in_d)
            dw += dout * g * r
        else:
            tl.store(out_ptr + at, (g * r * w).to(out_ptr.dtype.element_ty), mask=in_d)
    if GRAD:
        tl.store(dw_ptr + (pid.to(tl.int64) * ndir + dr) * d + cols, dw, mask=in_d)


def _gated_norm_rows(rows, grad):
    """Rows a program: one in the forward. The backward's programs take up to 16 rows in turn (each
    program's dweight partial is one row), while keeping at least about 1024 programs to fill the GPU."""
    return max(1, min(16, rows // 1024)) if grad else 1


def _gated_norm_launch(y, z, weight, eps, dout=None):
    """y (rows, ndir, d) contiguous, z (rows, ndir, d) with its last dim contiguous, weight (ndir, d)."""
    rows, ndir, d = y.shape
    grad = dout is not None
    ROWS = _gated_norm_rows(rows * ndir, grad)
    grid = (-(-rows // ROWS), ndir)
    out = None if grad else torch.empty_like(y)
    dy, dz = (torch.empty_like(y), torch.empty(y.shape, device=y.device, dtype=z.dtype)) if grad else (None, None)
    dw = torch.empty(grid[0], ndir, d, device=y.device, dtype=torch.float32) if grad else None
    _gated_norm_kernel[grid](y, z, weight, dout, out, dy, dz, dw, rows, d, z.stride(0), z.stride(1), eps,
                             ROWS=ROWS, BLOCK=_pow2(d), GRAD=grad)
    return (dy, dz, dw.sum(0).view(weight.shape).to(weight.dtype)) if grad else out


def _gated_norm_impl(y: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    with _on_device(y):
        return _gated_norm_launch(y, z, weight, eps)


def _gated_norm_fake(y, z, weight, eps):
    return _like(y)


def _gated_norm_backward_impl(y: Tensor, z: Tensor, weight: Tensor, dout: Tensor,
                              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    with _on_device(y):
        return _gated_norm_launch(y, z, weight, eps, dout.contiguous())


def _gated_norm_backward_fake(y, z, weight, dout, eps):
    return _like(y), y.new_empty(y.shape, dtype=z.dtype), _like(weight)


def _gated_norm_setup(ctx, inputs, output):
    y, z, weight, eps = inputs
    ctx.save_for_backward(y, z, weight)
    ctx.eps = eps


def _gated_norm_grads(ctx, dout):
    y, z, weight = ctx.saved_tensors
    return (*ctx.backward(y, z, weight, dout, ctx.eps), None)


_gated_norm = _operator("gated_rms_norm", _gated_norm_impl, _gated_norm_fake, _gated_norm_setup, _gated_norm_grads,
                        _gated_norm_backward_impl, _gated_norm_backward_fake)


def gated_rms_norm(y, z, weight, eps=1e-6):
    """RMSNorm(y * silu(z)) * weight over the last dim, in y's dtype; y, z: (..., d), weight: (d,). With
    weight (ndir, d), y and z are (..., ndir, d), each direction normed with its own weight: both of the
    mixer's directions in one launch. CUDA tensors (and CPU ones under TRITON_INTERPRET=1) run the fused
    kernel, other CPU tensors the reference."""
    if not _takes_kernels(y):
        return gated_rms_norm_ref(y, z, weight, eps)
    shape, d = y.shape, y.shape[-1]
    ndir = weight.shape[0] if weight.dim() == 2 else 1
    z = z.reshape(-1, ndir, d)  # a view where it can be (z is a slice of in_proj's output): strided rows
    return _gated_norm(y.reshape(-1, ndir, d).contiguous(), _last_dim_contiguous(z), weight.contiguous(),
                       eps).view(shape)


# ----------------------------------------------------------------------------------------------
# the output layer and its loss, fused: loss = sum_i w_i (logsumexp(l_i) - l_i[target_i]) with l = h W^T,
# over the real vocabulary. The logits are formed once in the inputs' precision (bfloat16 in training)
# and never copied to float32: one kernel reads each row twice (its logsumexp, then its gradient) and
# writes the gradient w_i (softmax(l_i) - onehot(target_i)) over it, from which two products give dh
# and dW in the forward pass; the backward only scales them by the loss's gradient.


def linear_cross_entropy_ref(h, weight, targets, loss_weights, vocab_size):
    """The definition in float32: h (rows, d), weight (ncols >= vocab_size, d), targets (rows,),
    loss_weights (rows,); returns the scalar sum of loss_weights * -log softmax(h weight^T)[target].
    Only rows of nonzero weight are formed (MDLM's unmasked half costs nothing): CPU training runs this."""
    rows = loss_weights != 0
    logits = F.linear(h[rows], weight[:vocab_size]).float()
    return (F.cross_entropy(logits, targets[rows], reduction="none") * loss_weights[rows]).sum()


@triton.jit
def _cross_entropy_kernel(logits_ptr, targets_ptr, weights_ptr, loss_ptr, vocab, ncols, stride,
                          BLOCK: tl.constexpr, GRAD: tl.constexpr):
    # one program: one row of logits, ncols wide, the first vocab of them real. loss_ptr[row] gets
    # w * (logsumexp - logit[target]); with GRAD the row is overwritten by w * (softmax - onehot(target)),
    # 0 in the padded columns. A row of weight 0 costs nothing but its writes.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    w = tl.load(weights_ptr + row).to(tl.float32)
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK)
    lse = tl.zeros_like(w)
    if w != 0:
        m = tl.full([BLOCK], -1e30, dtype=tl.float32)  # per-lane running max and sum of exp: no reductions
        s = tl.zeros([BLOCK], dtype=tl.float32)        # inside the loop
        for start in range(0, vocab, BLOCK):
            v = tl.load(base + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, v)
            s = s * tl.exp(m - m_new) + tl.exp(v - m_new)
            m = m_new
        m_row = tl.max(m, 0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
        tl.store(loss_ptr + row, w * (lse - tl.load(base + target).to(tl.float32)))
    else:
        tl.store(loss_ptr + row, 0.0)
    if GRAD:
        for start in range(0, ncols, BLOCK):
            c = start + cols
            v = tl.load(base + c, mask=c < vocab, other=float("-inf")).to(tl.float32)
            # v <= lse; the bound keeps a row of weight 0, whose lse was never formed, finite
            g = w * (tl.exp(tl.minimum(v - lse, 0.0)) - tl.where(c == target, 1.0, 0.0))
            tl.store(base + c, tl.where(c < vocab, g, 0.0).to(logits_ptr.dtype.element_ty), mask=c < ncols)


def _linear_cross_entropy(h, weight, targets, loss_weights, vocab_size, grad):
    """The loss, and with grad its gradients dh and dW (else empty tensors)."""
    logits = h @ weight.t()
    rows, ncols = logits.shape
    losses = torch.empty(rows, device=h.device, dtype=torch.float32)
    _cross_entropy_kernel[(rows,)](logits, targets, loss_weights, losses, vocab_size, ncols, logits.stride(0),
                                   BLOCK=min(4096, _pow2(ncols)), GRAD=grad, num_warps=8)
    if not grad:
        return losses.sum(), _empty(h), _empty(h)
    return losses.sum(), logits @ weight, logits.t() @ h  # the logits now hold the loss's gradient in them


def _lce_impl(h: Tensor, weight: Tensor, targets: Tensor, loss_weights: Tensor, vocab_size: int,
              grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    with _on_device(h):
        return _linear_cross_entropy(h, weight, targets, loss_weights, vocab_size, grad)


def _lce_fake(h, weight, targets, loss_weights, vocab_size, grad):
    loss = h.new_empty((), dtype=torch.float32)
    return (loss, _like(h), _like(weight)) if grad else (loss, _empty(h), _empty(h))


def _lce_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _lce_grads(ctx, dloss, _dh, _dW):
    dh, dW = ctx.saved_tensors
    return dloss * dh, dloss * dW, None, None, None, None


_lce = _operator("linear_cross_entropy", _lce_impl, _lce_fake, _lce_setup, _lce_grads)


def linear_cross_entropy(h, weight, targets, loss_weights, vocab_size):
    """sum over rows of loss_weights * -log softmax(h weight^T)[targets], the softmax over the first
    vocab_size columns; h (rows, d), weight (ncols, d), targets (rows,) int, loss_weights (rows,).
    Under autocast the product runs in autocast's dtype. CUDA tensors (and CPU ones under
    TRITON_INTERPRET=1) run the fused kernel, other CPU tensors linear_cross_entropy_ref."""
    if not _takes_kernels(h):
        return linear_cross_entropy_ref(h, weight, targets, loss_weights, vocab_size)
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _lce(h.contiguous(), weight.contiguous(), targets.contiguous(), loss_weights.float().contiguous(),
                vocab_size, grad)[0]
