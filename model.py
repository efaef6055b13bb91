"""
The language models: DiffuMamba (a stack of bidirectional Mamba-2 blocks), DiffuMamba-H (the same with
every attn_every-th block attention) and the all-attention Transformer diffusion baseline.

Full-sequence mode: logits = model(xt) over the masked sequence; every layer sees it both ways.

Block mode (block_len = K): training sees the noisy sequence xt and the clean one x0 together, and the
logits of noisy block b depend only on noisy block b and clean blocks < b. The trick that keeps it one
vectorised pass: the clean stream scans forward through the whole sequence and hands back its state
every K positions (state_every=K); the noisy stream is cut into blocks, (batch, nb*K) -> (batch*nb, K),
and each block's forward scan starts from the clean state and conv window just before it. The backward
direction is confined to each block by the same reshape, and attention layers use the BD3-LM mask.
At inference the clean state and conv window are a cache of everything committed so far, of constant
size: model.new_cache / forward_block / commit reproduce the training logits exactly. Attention layers
keep keys and values in buffers sized once, so that a cache is a fixed set of tensors and a CUDA graph
can replay the calls.

Training never holds the logits whole in float32: with loss_weights, model(xt, x0, loss_weights) returns
the loss straight from the last hidden states (linear_cross_entropy).
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scan_kernel import causal_conv, gated_rms_norm, linear_cross_entropy, selective_scan

ARCHS = ("mamba", "hybrid", "transformer")
FWD, BWD, BOTH = slice(0, 1), slice(1, 2), slice(0, 2)  # the bidirectional mixer's directions


@dataclass
class ModelConfig:
    vocab_size: int = 50257  # real tokens; the mask token is id vocab_size
    d_model: int = 256
    n_layer: int = 4
    arch: str = "mamba"  # "mamba" (DiffuMamba) | "hybrid" (DiffuMamba-H) | "transformer"
    attn_every: int = 4  # hybrid: blocks attn_every-1, 2*attn_every-1, ... are attention
    block_len: int | None = None  # None: full-sequence diffusion; K: block diffusion with blocks of K
    # Mamba-2 mixer, per direction
    expand: int = 1
    headdim: int = 64
    dstate: int = 64
    ngroups: int = 1
    d_conv: int = 4
    # attention
    n_head: int = 4
    mlp_mult: int = 4  # MLP width of attention blocks, in d_model; Mamba blocks get a narrower one

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "d_model", "n_layer", "attn_every", "expand", "headdim", "dstate", "ngroups",
                     "d_conv", "n_head", "mlp_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if self.block_len is not None and (isinstance(self.block_len, bool) or not isinstance(self.block_len, int)
                                           or self.block_len < 1):
            raise ValueError(f"ModelConfig.block_len must be None or a positive int, got {self.block_len!r}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model ({self.d_model}) must split into n_head ({self.n_head}) heads of even size")
        if (self.expand * self.d_model) % self.headdim or (self.expand * self.d_model // self.headdim) % self.ngroups:
            raise ValueError(f"expand * d_model ({self.expand * self.d_model}) must split into heads of headdim "
                             f"({self.headdim}), a multiple of ngroups ({self.ngroups}) of them")

    def is_attention(self, i):
        return self.arch == "transformer" or (self.arch == "hybrid" and (i + 1) % self.attn_every == 0)

    @property
    def has_attention(self):
        return any(map(self.is_attention, range(self.n_layer)))

    @property
    def mamba_mlp_hidden(self):
        """MLP width of Mamba blocks: what makes a Mamba block as large as an attention block."""
        d, di = self.d_model, self.expand * self.d_model
        nheads, bc = di // self.headdim, 2 * self.ngroups * self.dstate
        in_proj = -(-2 * (2 * di + bc + nheads) // 64) * 64  # BiMamba's, padded
        mixer = d * in_proj + 2 * ((di + bc) * (self.d_conv + 1) + 3 * nheads + di + di * d)
        attention = 4 * d * d + 2 * d * self.mlp_mult * d
        return max(64, round((attention - mixer) / (2 * d) / 64) * 64)


# name: (d_model, n_layer, n_head); same sizes for the three archs
PRESETS = {
    "tiny": (128, 4, 2),
    "small": (384, 8, 6),
    "medium": (768, 12, 12),
    "1.3b": (2048, 24, 16),
}


def preset_config(name, arch="mamba", **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    d_model, n_layer, n_head = PRESETS[name]
    return ModelConfig(**{**dict(d_model=d_model, n_layer=n_layer, n_head=n_head, arch=arch), **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), eps=1e-6)  # one dtype: the fused kernel


class MLP(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, d_model, bias=False)
        self.proj.residual = True

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def to_blocks(u, K):
    return u.reshape(u.shape[0] * (u.shape[1] // K), K, *u.shape[2:])


def from_blocks(u, batch):
    return u.reshape(batch, -1, *u.shape[2:])


class BiMamba(nn.Module):
    """The bidirectional Mamba-2 mixer: y = fwd(u) + bwd(u), two directions with their own parameters, which
    are stacked on a direction axis (0: first to last; 1: last to first, its conv looking ahead). Per
    direction, between the projections: short depthwise conv + SiLU on xBC; the scan; RMSNorm(y * silu(z)).
    Both directions read the same input and their outputs are summed, so one product serves both in_projs
    and one both out_projs (W_f y_f + W_b y_b = [W_f W_b] [y_f; y_b]), and one launch of each kernel serves
    both directions: the kernels take the direction axis."""

    def __init__(self, cfg):
        super().__init__()
        self.d_inner = cfg.expand * cfg.d_model
        self.nheads, self.headdim = self.d_inner // cfg.headdim, cfg.headdim
        self.ngroups, self.dstate = cfg.ngroups, cfg.dstate
        self.conv_dim = self.d_inner + 2 * cfg.ngroups * cfg.dstate
        width = 2 * (self.d_inner + self.conv_dim + self.nheads)  # in_proj's columns for both directions
        # its output rows padded to a multiple of 64, left unused: a row of, say, 1804 (the small preset)
        # is misaligned for the fast matrix products
        self.in_proj = nn.Linear(cfg.d_model, -(-width // 64) * 64, bias=False)
        self.out_proj = nn.Linear(2 * self.d_inner, cfg.d_model, bias=False)
        self.out_proj.residual = True
        # per-direction parameters, stored flat (one vector or matrix row per channel, as the optimizer's
        # weight-decay rule expects) and viewed with the direction axis where used
        conv_weight = torch.empty(2 * self.conv_dim, 1, cfg.d_conv).uniform_(-1, 1) / math.sqrt(cfg.d_conv)
        self.conv_weight = nn.Parameter(conv_weight)
        self.conv_bias = nn.Parameter(torch.zeros(2 * self.conv_dim))
        # Mamba's initialisation: dt log-uniform in [1e-3, 0.1] through softplus, A uniform in [-16, -1]
        dt = torch.exp(torch.empty(2 * self.nheads).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(2 * self.nheads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(2 * self.nheads))
        self.norm_weight = nn.Parameter(torch.ones(2 * self.d_inner))

    def project(self, u):
        """in_proj(u) as z (..., 2, d_inner), xBC (..., 2, conv_dim), dt (..., 2, nheads): direction axes.
        The columns are ordered [z_f z_b | xBC_f xBC_b | dt_f dt_b | padding]: with d_inner and conv_dim
        multiples of 8 (every preset), each wide part starts on a 16-byte boundary, so the kernels that read
        it in place use vector loads. One split, the padding left out: its backward is one concatenation."""
        z, xBC, dt, _ = self.in_proj(u).split(
            [2 * self.d_inner, 2 * self.conv_dim, 2 * self.nheads, self.in_proj.out_features - 2 * (
                self.d_inner + self.conv_dim + self.nheads)], dim=-1)
        return z.unflatten(-1, (2, -1)), xBC.unflatten(-1, (2, -1)), dt.unflatten(-1, (2, -1))

    def mix(self, z, xBC, dt, dirs, tail=None, state=None, state_every=None):
        """The directions dirs (a slice of the two: slice(0, 2) both, slice(0, 1) or slice(1, 2) one) over z
        (n, T, ndir, d_inner), xBC (n, T, ndir, conv_dim), dt (n, T, ndir, nheads), their parts of in_proj(u).
        tail: (n, d_conv - 1, ndir, conv_dim), the conv inputs just outside the segment (before it; after it
        for direction 1), zeros if None. state: (n, ndir, nheads, headdim, dstate), the scan state entering
        the segment. Returns the gated, normed scan output (n, T, ndir * d_inner), the states every
        state_every positions (or None), and the conv inputs xBC."""
        per_dir = lambda p, *shape: p.view(2, *shape)[dirs]
        reverse = dirs.start == 1
        # direction 0: sum_j w_j xBC_{t-3+j}; direction 1: sum_j w_j xBC_{t+j}, the next 3 positions (then SiLU)
        xBC_conv = causal_conv(xBC, per_dir(self.conv_weight, self.conv_dim, -1), per_dir(self.conv_bias, -1), tail,
                               reverse)
        x, B, C = xBC_conv.split([self.d_inner, self.ngroups * self.dstate, self.ngroups * self.dstate], dim=-1)
        # dt goes in raw: the scan applies softplus(dt + dt_bias) itself
        out = selective_scan(x.unflatten(-1, (self.nheads, self.headdim)), dt,
                             -torch.exp(per_dir(self.A_log, -1).float()), B.unflatten(-1, (self.ngroups, self.dstate)),
                             C.unflatten(-1, (self.ngroups, self.dstate)), per_dir(self.D, -1), state,
                             reverse=reverse, state_every=state_every, dt_bias=per_dir(self.dt_bias, -1))
        y, states = out if state_every is not None else (out, None)
        y = gated_rms_norm(y.flatten(-2), z, per_dir(self.norm_weight, -1))  # RMSNorm(y * silu(z)), a direction each
        return y.flatten(-2), states, xBC

    def forward(self, u):
        return self.out_proj(self.mix(*self.project(u), BOTH)[0])

    def forward_blocks(self, un, uc, K):
        batch, L, _ = uc.shape
        z, xBC, dt = self.project(torch.cat([un, uc]))  # noisy rows, then clean
        fwd = lambda *parts: (p[:, :, FWD] for p in parts)
        # forward direction: the clean stream runs through; noisy block b starts from the clean state and
        # conv window before it
        yc, states, xc = self.mix(*fwd(z[batch:], xBC[batch:], dt[batch:]), FWD, state_every=K)
        w = self.conv_weight.shape[-1]
        tails = F.pad(xc, (0, 0, 0, 0, w - 1, 0)).unfold(1, w - 1, K)[:, :L // K].movedim(-1, 2)
        starts = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)
        yn = from_blocks(self.mix(*(to_blocks(p, K) for p in fwd(z[:batch], xBC[:batch], dt[:batch])), FWD,
                                  tails.flatten(0, 1), starts.flatten(0, 1))[0], batch)
        # backward direction: confined to each block, both streams in one call
        yb = from_blocks(self.mix(*(to_blocks(p[:, :, BWD], K) for p in (z, xBC, dt)), BWD)[0], 2 * batch)
        y = self.out_proj(torch.cat([torch.cat([yn, yc]), yb], dim=-1))
        return y[:batch], y[batch:]

    def step(self, u, entry, commit, pos):
        """One block of K given the cache entry {tail, state}; commit=True advances the entry. Both directions
        in one call: the entry holds direction 1's tail and state as zeros, which confine it to the block.
        (pos, the committed length, is for attention layers.)"""
        z, xBC, dt = self.project(u)
        y, states, _ = self.mix(z, xBC, dt, BOTH, entry["tail"], entry["state"],
                                state_every=u.shape[1] if commit else None)
        if commit:  # in place: the cache is a fixed set of tensors (a CUDA graph can replay this)
            entry["state"][:, 0].copy_(states[:, -1, 0])
            window = torch.cat([entry["tail"][:, :, 0].to(xBC.dtype), xBC[:, :, 0]], dim=1)
            entry["tail"][:, :, 0].copy_(window[:, window.shape[1] - entry["tail"].shape[1]:])
        return self.out_proj(y)

    def new_entry(self, batch, capacity, device, dtype):
        width = self.conv_weight.shape[-1]
        return dict(tail=torch.zeros(batch, width - 1, 2, self.conv_dim, device=device, dtype=dtype),
                    state=torch.zeros(batch, 2, self.nheads, self.headdim, self.dstate, device=device))


def rope(x, pos):
    """Rotary position embedding on (batch, heads, T, head_dim) at integer positions pos (T,)."""
    half = x.shape[-1] // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = pos.float()[:, None] * freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def bd3_mask(L, K, device):
    """Attention mask over [noisy; clean] (2L tokens): noisy block b sees itself and clean blocks < b,
    clean block b sees clean blocks <= b."""
    blk = torch.arange(L, device=device) // K
    q, k = blk[:, None], blk[None, :]
    top = torch.cat([q == k, q > k], dim=1)
    bottom = torch.cat([torch.zeros_like(top[:, :L]), q >= k], dim=1)
    return torch.cat([top, bottom], dim=0)


class Attention(nn.Module):
    """Bidirectional multi-head attention with RoPE."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.proj.residual = True

    def heads(self, u, pos):
        q, k, v = self.qkv(u).unflatten(-1, (3, self.n_head, -1)).permute(2, 0, 3, 1, 4)
        return rope(q, pos), rope(k, pos), v

    def out(self, y):
        return self.proj(y.transpose(1, 2).flatten(2))

    def forward(self, u, pos=None, mask=None):
        q, k, v = self.heads(u, torch.arange(u.shape[1], device=u.device) if pos is None else pos)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def forward_blocks(self, un, uc, K):
        L = un.shape[1]
        pos = torch.arange(L, device=un.device).repeat(2)
        y = self(torch.cat([un, uc], dim=1), pos, bd3_mask(L, K, un.device))
        return y[:, :L], y[:, L:]

    def step(self, u, entry, commit, pos):
        """One block attending to the committed keys/values and itself; pos (a 0-d tensor) counts the
        committed tokens. The block's keys/values are written after them: commit keeps them (pos then
        moves on), forward_block's are overwritten by the next block's."""
        K = u.shape[1]
        positions = pos + torch.arange(K, device=u.device)
        q, k, v = self.heads(u, positions)
        entry["k"].index_copy_(2, positions, k.to(entry["k"].dtype))
        entry["v"].index_copy_(2, positions, v.to(entry["v"].dtype))
        visible = (torch.arange(entry["k"].shape[2], device=u.device) < pos + K)[None]  # (1, capacity)
        return self.out(F.scaled_dot_product_attention(q.to(entry["k"].dtype), entry["k"], entry["v"],
                                                       attn_mask=visible))

    def new_entry(self, batch, capacity, device, dtype):
        shape = (batch, self.n_head, capacity, self.qkv.in_features // self.n_head)
        return dict(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype))


class Block(nn.Module):
    def __init__(self, cfg, attention):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.mixer = Attention(cfg) if attention else BiMamba(cfg)
        self.mlp = MLP(cfg.d_model, cfg.mlp_mult * cfg.d_model if attention else cfg.mamba_mlp_hidden)

    def forward(self, u):
        u = u + self.mixer(self.norm1(u))
        return u + self.mlp(self.norm2(u))

    def forward_blocks(self, un, uc, K):
        yn, yc = self.mixer.forward_blocks(self.norm1(un), self.norm1(uc), K)
        un, uc = un + yn, uc + yc
        return un + self.mlp(self.norm2(un)), uc + self.mlp(self.norm2(uc))

    def step(self, u, entry, commit, pos):
        u = u + self.mixer.step(self.norm1(u), entry, commit, pos)
        return u + self.mlp(self.norm2(u))


class Cache:
    """What block inference keeps of the committed text: per Mamba layer the forward direction's scan
    state and conv tail (constant size; beside them the backward direction's, kept zero, so that one call
    serves both directions), per attention layer the keys and values, in buffers of room for
    `capacity` tokens. length counts the committed tokens; pos holds the same count on the device, where
    the attention layers read it: replayed from a CUDA graph, a call finds it there."""

    def __init__(self, entries, batch_size, capacity, device):
        self.entries, self.batch_size, self.capacity = entries, batch_size, capacity
        self.length, self.pos = 0, torch.zeros((), dtype=torch.long, device=device)

    def tensors(self):
        return [self.pos] + [t for e in self.entries for t in e.values()]

    def overwritten(self):
        """What commit overwrites: pos, and the Mamba layers' states and tails (the attention layers write
        only past pos, where nothing is read until pos moves there)."""
        return [self.pos] + [e[k] for e in self.entries for k in ("state", "tail") if k in e]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors())


class DiffuMamba(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.mask_id = cfg.vocab_size
        self.embed = nn.Embedding(-(-(cfg.vocab_size + 1) // 64) * 64, cfg.d_model)  # + mask token, padded
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_attention(i)) for i in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if getattr(m, "residual", False) else 0.02
                nn.init.normal_(m.weight, std=std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def for_inference(self, dtype):
        """The model in eval mode with weights in dtype, but for the scan's per-head parameters (A_log,
        dt_bias, D): tiny, read by the scan in float32 anyway, and in bfloat16 they would move dt."""
        self.to(dtype).eval()
        for name, p in self.named_parameters():
            if name.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "D"):
                p.data = p.data.float()
        return self

    def logits(self, u):
        # the output layer shares the embedding; logits over the real vocabulary only. The product runs over
        # the padded rows and is sliced after: an output row of 50257 is misaligned for the fast matmuls
        return F.linear(self.norm_f(u), self.embed.weight)[..., :self.cfg.vocab_size]

    def check_tokens(self, name, ids, allow_mask, values=True):
        """ids must be (batch, seqlen) integers; with values, inside the vocabulary (mask id included if
        allow_mask). The value check reads the tensor on the host, which would stop a GPU's queue and a
        compiled graph: the callers make it where the ids enter (data.load, the samplers), not per call."""
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            raise ValueError(f"{name} must be an integer tensor of shape (batch, seqlen), got {ids.dtype} "
                             f"of shape {tuple(ids.shape)}")
        hi = self.mask_id if allow_mask else self.mask_id - 1
        if values and ids.numel() and (ids.min() < 0 or ids.max() > hi):
            raise ValueError(f"{name} holds token ids outside [0, {hi}] (vocab_size {self.cfg.vocab_size}"
                             f"{', mask id ' + str(self.mask_id) if allow_mask else ''})")

    def forward(self, xt, x0=None, loss_weights=None, rows=None):
        """Logits (batch, seqlen, vocab_size) for the noisy tokens xt; block mode needs the clean x0. With
        rows, a pair of index tensors (batch indices, positions), only those positions' logits: (n,
        vocab_size). With loss_weights (batch, seqlen), instead the loss sum(loss_weights * -log p(x0 |
        xt)), computed without holding the logits whole. (Token values are the caller's to check: see
        check_tokens.)"""
        K = self.cfg.block_len
        self.check_tokens("xt", xt, allow_mask=True, values=False)
        if x0 is not None:
            self.check_tokens("x0", x0, allow_mask=False, values=False)
            if x0.shape != xt.shape:
                raise ValueError(f"x0 must have xt's shape {tuple(xt.shape)}, got {tuple(x0.shape)}")
        if K is None:
            if x0 is not None and loss_weights is None:
                raise ValueError("x0 is for block mode, or the targets of loss_weights; this model has "
                                 "block_len=None (full-sequence)")
            u = self.embed(xt)
            for block in self.blocks:
                u = block(u)
        else:
            if x0 is None:
                raise ValueError(f"block mode (block_len={K}) needs the clean sequence: model(xt, x0=x0)")
            if xt.shape[1] % K:
                raise ValueError(f"seqlen ({xt.shape[1]}) must be a multiple of block_len ({K})")
            u, uc = self.embed(xt), self.embed(x0)
            for block in self.blocks:
                u, uc = block.forward_blocks(u, uc, K)
        if loss_weights is None:
            return self.logits(u if rows is None else u[rows])
        if x0 is None:
            raise ValueError("loss_weights needs the targets: model(xt, x0=x0, loss_weights=w)")
        if loss_weights.shape != xt.shape:
            raise ValueError(f"loss_weights must have xt's shape {tuple(xt.shape)}, got {tuple(loss_weights.shape)}")
        return linear_cross_entropy(self.norm_f(u).flatten(0, 1), self.embed.weight, x0.flatten(),
                                    loss_weights.flatten(), self.cfg.vocab_size)

    def new_cache(self, batch_size, length=None):
        """An empty cache with room for `length` tokens, which the attention layers' buffers need (an
        all-Mamba model's cache has no length). Made under autocast, its buffers take autocast's dtype."""
        K = self.cfg.block_len
        if K is None:
            raise ValueError("new_cache needs a block-mode model (ModelConfig.block_len=K)")
        if length is None and self.cfg.has_attention:
            raise ValueError("new_cache needs length= for a model with attention layers: their keys and values "
                             "are kept in buffers sized once")
        device = self.embed.weight.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.embed.weight.dtype
        capacity = -(-(length or 0) // K) * K
        return Cache([b.mixer.new_entry(batch_size, capacity, device, dtype) for b in self.blocks], batch_size,
                     capacity, device)

    def _step(self, ids, cache, commit):
        name, method = ("x0_block", "commit") if commit else ("xt_block", "forward_block")
        K = self.cfg.block_len
        if K is None:
            raise ValueError(f"{method} needs a block-mode model (ModelConfig.block_len=K); this one is full-sequence")
        self.check_tokens(name, ids, allow_mask=not commit, values=False)
        if len(cache.entries) != len(self.blocks):
            raise ValueError(f"this cache has {len(cache.entries)} layers, the model {len(self.blocks)}: "
                             "make it with this model's new_cache")
        if tuple(ids.shape) != (cache.batch_size, K):
            raise ValueError(f"{name} must have shape (batch={cache.batch_size}, block_len={K}), got {tuple(ids.shape)}")
        if cache.length + K > cache.capacity and self.cfg.has_attention:
            raise ValueError(f"the cache holds {cache.length} tokens and has room for {cache.capacity}: "
                             "make it with new_cache(batch_size, length) for the whole text")
        u = self.embed(ids)
        for block, entry in zip(self.blocks, cache.entries):
            u = block.step(u, entry, commit, cache.pos)
        if commit:
            cache.pos += K  # in place, like the entries
        return u

    def forward_block(self, xt_block, cache, rows=None):
        """Logits for one noisy block given everything committed (with rows, at those positions only, as
        forward's); the cache is left as it was."""
        u = self._step(xt_block, cache, commit=False)
        return self.logits(u if rows is None else u[rows])

    def commit(self, x0_block, cache):
        """Advance the cache with a finished clean block; returns the cache."""
        self._step(x0_block, cache, commit=True)
        cache.length += self.cfg.block_len
        return cache

    def config_dict(self):
        return asdict(self.cfg)
