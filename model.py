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
size: model.new_cache / forward_block / commit reproduce the training logits exactly.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scan_kernel import causal_conv, gated_rms_norm, selective_scan

ARCHS = ("mamba", "hybrid", "transformer")


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
    def mamba_mlp_hidden(self):
        """MLP width of Mamba blocks: what makes a Mamba block as large as an attention block."""
        d, di = self.d_model, self.expand * self.d_model
        nheads, bc = di // self.headdim, 2 * self.ngroups * self.dstate
        mixer = 2 * (d * (2 * di + bc + nheads) + (di + bc) * (self.d_conv + 1) + 3 * nheads + di + di * d)
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


class Mamba2(nn.Module):
    """One direction of the mixer: in_proj -> (z, xBC, dt); short depthwise conv + SiLU on xBC; the scan;
    RMSNorm(y * silu(z)); out_proj. reverse=True scans last to first and its conv looks ahead."""

    def __init__(self, cfg, reverse):
        super().__init__()
        self.reverse = reverse
        self.d_inner = cfg.expand * cfg.d_model
        self.nheads, self.headdim = self.d_inner // cfg.headdim, cfg.headdim
        self.ngroups, self.dstate = cfg.ngroups, cfg.dstate
        self.conv_dim = self.d_inner + 2 * cfg.ngroups * cfg.dstate
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, 1, cfg.d_conv).uniform_(-1, 1) / math.sqrt(cfg.d_conv))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim))
        # Mamba's initialisation: dt log-uniform in [1e-3, 0.1] through softplus, A uniform in [-16, -1]
        dt = torch.exp(torch.empty(self.nheads).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)
        self.out_proj.residual = True

    def forward(self, u, tail=None, state=None, state_every=None):
        """u: (n, T, d_model). tail: (n, d_conv - 1, conv_dim), the conv inputs just outside the segment
        (before it; after it when reverse), zeros if None. state: the scan state entering the segment.
        Returns y, the states every state_every positions (or None), and the conv inputs xBC."""
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        # forward: sum_j w_j xBC_{t-3+j}; reverse: sum_j w_j xBC_{t+j}, the next 3 positions (then SiLU)
        xBC_conv = causal_conv(xBC, self.conv_weight[:, 0], self.conv_bias, tail, self.reverse)
        x, B, C = xBC_conv.split([self.d_inner, self.ngroups * self.dstate, self.ngroups * self.dstate], dim=-1)
        out = selective_scan(x.unflatten(-1, (self.nheads, self.headdim)), F.softplus(dt.float() + self.dt_bias),
                             -torch.exp(self.A_log.float()), B.unflatten(-1, (self.ngroups, self.dstate)),
                             C.unflatten(-1, (self.ngroups, self.dstate)), self.D.float(), state,
                             reverse=self.reverse, state_every=state_every)
        y, states = out if state_every is not None else (out, None)
        y = gated_rms_norm(y.flatten(-2), z, self.norm.weight)  # RMSNorm(y * silu(z))
        return self.out_proj(y), states, xBC


def to_blocks(u, K):
    return u.reshape(u.shape[0] * (u.shape[1] // K), K, *u.shape[2:])


def from_blocks(u, batch):
    return u.reshape(batch, -1, *u.shape[2:])


class BiMamba(nn.Module):
    """y = fwd(u) + bwd(u): two directions with their own parameters."""

    def __init__(self, cfg):
        super().__init__()
        self.fwd, self.bwd = Mamba2(cfg, reverse=False), Mamba2(cfg, reverse=True)

    def forward(self, u):
        return self.fwd(u)[0] + self.bwd(u)[0]

    def forward_blocks(self, un, uc, K):
        batch, L, _ = uc.shape
        # forward direction: the clean stream runs through; noisy block b starts from the clean state and
        # conv window before it
        yc, states, xBC = self.fwd(uc, state_every=K)
        w = self.fwd.conv_weight.shape[-1]
        tails = F.pad(xBC, (0, 0, w - 1, 0)).unfold(1, w - 1, K)[:, :L // K].transpose(2, 3)
        starts = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)
        yn = from_blocks(self.fwd(to_blocks(un, K), tails.flatten(0, 1), starts.flatten(0, 1))[0], batch)
        # backward direction: confined to each block, both streams in one call
        yb = from_blocks(self.bwd(to_blocks(torch.cat([un, uc]), K))[0], 2 * batch)
        return yn + yb[:batch], yc + yb[batch:]

    def step(self, u, entry, commit):
        """One block of K given the cache entry {tail, state}; commit=True advances the entry."""
        y, states, xBC = self.fwd(u, entry["tail"], entry["state"], state_every=u.shape[1] if commit else None)
        if commit:  # in place: the cache is a fixed set of tensors (a CUDA graph can replay this)
            entry["state"].copy_(states[:, -1])
            window = torch.cat([entry["tail"].to(xBC.dtype), xBC], dim=1)
            entry["tail"].copy_(window[:, window.shape[1] - entry["tail"].shape[1]:])
        return y + self.bwd(u)[0]

    def new_entry(self, batch, device):
        f = self.fwd
        return dict(tail=torch.zeros(batch, f.conv_weight.shape[-1] - 1, f.conv_dim, device=device),
                    state=torch.zeros(batch, f.nheads, f.headdim, f.dstate, device=device))


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

    def step(self, u, entry, commit):
        """One block attending to the committed keys/values and itself; commit=True keeps its keys/values.
        The buffers grow by doubling, so a block's keys/values are written in place, never concatenated."""
        n, K = entry["length"], u.shape[1]
        q, k, v = self.heads(u, torch.arange(n, n + K, device=u.device))
        if entry["k"] is None or entry["k"].shape[2] < n + K:
            cap = max(2 * (n + K), 1024)
            grown = [k.new_empty(*k.shape[:2], cap, k.shape[-1]) for _ in range(2)]
            if entry["k"] is not None:
                grown[0][:, :, :n], grown[1][:, :, :n] = entry["k"][:, :, :n], entry["v"][:, :, :n]
            entry["k"], entry["v"] = grown
        entry["k"][:, :, n:n + K], entry["v"][:, :, n:n + K] = k, v
        if commit:
            entry["length"] = n + K
        return self.out(F.scaled_dot_product_attention(q, entry["k"][:, :, :n + K], entry["v"][:, :, :n + K]))

    def new_entry(self, batch, device):
        return dict(k=None, v=None, length=0)


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

    def step(self, u, entry, commit):
        u = u + self.mixer.step(self.norm1(u), entry, commit)
        return u + self.mlp(self.norm2(u))


class Cache:
    """What block inference keeps of the committed text: per Mamba layer the forward direction's scan
    state and conv tail (constant size), per attention layer the keys and values."""

    def __init__(self, entries, batch_size):
        self.entries, self.batch_size, self.length = entries, batch_size, 0

    def nbytes(self):
        tensors = [t for e in self.entries for t in e.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


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

    def logits(self, u):
        # the output layer shares the embedding; logits over the real vocabulary only. The product runs over
        # the padded rows and is sliced after: an output row of 50257 is misaligned for the fast matmuls
        # (the 1.3b model's logits took 124 ms at 64K tokens that way, 8x the rest of its matmuls' rate)
        return F.linear(self.norm_f(u), self.embed.weight)[..., :self.cfg.vocab_size]

    def check_tokens(self, name, ids, allow_mask):
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            raise ValueError(f"{name} must be an integer tensor of shape (batch, seqlen), got {ids.dtype} "
                             f"of shape {tuple(ids.shape)}")
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # no host sync inside a CUDA graph
        hi = self.mask_id if allow_mask else self.mask_id - 1
        if ids.numel() and (ids.min() < 0 or ids.max() > hi):
            raise ValueError(f"{name} holds token ids outside [0, {hi}] (vocab_size {self.cfg.vocab_size}"
                             f"{', mask id ' + str(self.mask_id) if allow_mask else ''})")

    def forward(self, xt, x0=None):
        """Logits (batch, seqlen, vocab_size) for the noisy tokens xt; block mode needs the clean x0."""
        self.check_tokens("xt", xt, allow_mask=True)
        K = self.cfg.block_len
        if K is None:
            if x0 is not None:
                raise ValueError("x0 is for block mode; this model has block_len=None (full-sequence)")
            u = self.embed(xt)
            for block in self.blocks:
                u = block(u)
            return self.logits(u)
        if x0 is None:
            raise ValueError(f"block mode (block_len={K}) needs the clean sequence: model(xt, x0=x0)")
        self.check_tokens("x0", x0, allow_mask=False)
        if x0.shape != xt.shape:
            raise ValueError(f"x0 must have xt's shape {tuple(xt.shape)}, got {tuple(x0.shape)}")
        if xt.shape[1] % K:
            raise ValueError(f"seqlen ({xt.shape[1]}) must be a multiple of block_len ({K})")
        un, uc = self.embed(xt), self.embed(x0)
        for block in self.blocks:
            un, uc = block.forward_blocks(un, uc, K)
        return self.logits(un)

    def new_cache(self, batch_size):
        if self.cfg.block_len is None:
            raise ValueError("new_cache needs a block-mode model (ModelConfig.block_len=K)")
        device = self.embed.weight.device
        return Cache([b.mixer.new_entry(batch_size, device) for b in self.blocks], batch_size)

    def _step(self, ids, cache, commit):
        name, method = ("x0_block", "commit") if commit else ("xt_block", "forward_block")
        K = self.cfg.block_len
        if K is None:
            raise ValueError(f"{method} needs a block-mode model (ModelConfig.block_len=K); this one is full-sequence")
        self.check_tokens(name, ids, allow_mask=not commit)
        if len(cache.entries) != len(self.blocks):
            raise ValueError(f"this cache has {len(cache.entries)} layers, the model {len(self.blocks)}: "
                             "make it with this model's new_cache")
        if tuple(ids.shape) != (cache.batch_size, K):
            raise ValueError(f"{name} must have shape (batch={cache.batch_size}, block_len={K}), got {tuple(ids.shape)}")
        u = self.embed(ids)
        for block, entry in zip(self.blocks, cache.entries):
            u = block.step(u, entry, commit)
        return u

    def forward_block(self, xt_block, cache):
        """Logits for one noisy block given everything committed; the cache is left as it was."""
        return self.logits(self._step(xt_block, cache, commit=False))

    def commit(self, x0_block, cache):
        """Advance the cache with a finished clean block; returns the cache."""
        self._step(x0_block, cache, commit=True)
        cache.length += self.cfg.block_len
        return cache

    def config_dict(self):
        return asdict(self.cfg)
