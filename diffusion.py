"""
Masked diffusion (MDLM): the noise schedule, masking, the training losses, the NELBO evaluation and the
samplers, full-sequence and block by block.

Forward process: each token is replaced by the mask token independently with probability t (the
log-linear schedule: alpha_t = 1 - t), t in [eps, 1]. With the SUBS parameterisation the model never
predicts the mask token and unmasked tokens are copied, so the negative ELBO per token is

    NELBO = E_t E_xt [ (1 / t) * sum over masked positions of -log p(x0 | xt) ] / seqlen

a bound on the negative log-likelihood in nats: exp(NELBO) bounds the perplexity. Block diffusion draws
one t per block and weights each block by its own 1 / t.

Sampling walks t from 1 to 0 in `steps` steps. From t to s, each masked token is revealed with
probability (t - s) / t (ancestral), or the most confident ones are, as many as that would reveal on
average (confidence). The model has no time input, so when no token changed its logits are reused.
Threshold reveal (adaptive parallel decoding) takes no steps: each call reveals every token the model is
sure enough of, so a block takes as many calls as its confidence needs; with the block cache exact,
nothing is approximated but the order of reveal.
"""

import contextlib
import time

import numpy as np
import torch
from tqdm import tqdm

EPS = 1e-3


def sample_t(n, generator, device, t_lo=EPS, t_hi=1.0):
    """n noise levels in [t_lo, t_hi], stratified (antithetic): one uniform draw per stratum of 1/n."""
    u = (torch.rand(1, generator=generator, device=device) + torch.arange(n, device=device) / n) % 1
    return t_lo + (t_hi - t_lo) * u


def mask_tokens(x0, t, mask_id, generator):
    """Replace each token of x0 (batch, seqlen) by mask_id with probability t (batch, seqlen)."""
    move = torch.rand(x0.shape, generator=generator, device=x0.device) < t
    return torch.where(move, mask_id, x0)


def noise_levels(x0, block_len, generator, t_lo=EPS, t_hi=1.0):
    """Per-token t: one per sequence, or with block_len one per block (constant within it)."""
    batch, seqlen = x0.shape
    per_row = seqlen // block_len if block_len else 1
    t = sample_t(batch * per_row, generator, x0.device, t_lo, t_hi).view(batch, per_row)
    return t.repeat_interleave(seqlen // per_row, dim=1)


def loss_weights(xt, t, mask_id):
    """The MDLM loss is sum(loss_weights * -log p(x0 | xt)): mean over tokens of (1 / t) * [masked]."""
    return (xt == mask_id) / (t * xt.numel())


def forward_loss(model, cfg, x0, generator, t_lo=EPS, t_hi=1.0):
    """Noise x0, run the model (block mode sees the clean x0 too), return the loss. model may be wrapped
    (DDP, torch.compile), so its config comes separately."""
    t = noise_levels(x0, cfg.block_len, generator, t_lo, t_hi)
    xt = mask_tokens(x0, t, cfg.vocab_size, generator)
    return model(xt, x0=x0, loss_weights=loss_weights(xt, t, cfg.vocab_size))


def eval_batch(stream, seq_len, batch_size, n_batches, i, device):
    """Batch i of n_batches: windows spread evenly over the token stream, the same at every evaluation."""
    starts = np.linspace(0, len(stream) - seq_len, n_batches * batch_size).astype(np.int64)[i::n_batches]
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64)).to(device)


@torch.no_grad()
def evaluate_nelbo(model, stream, seq_len, batch_size, n_batches, seed, rank=0, world=1, autocast=None):
    """The NELBO of a token stream (a 1-d array of token ids): n_batches batches of windows evenly spaced
    over it, batch i noised from seed + i, so every evaluation sees the same windows, t and masks.
    With world > 1 this process takes batches rank, rank + world, ... Returns (total nats, tokens):
    total / tokens is the per-token NELBO, and exp() of it the perplexity bound."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(rank, n_batches, world):
        x0 = eval_batch(stream, seq_len, batch_size, n_batches, i, device)
        g = torch.Generator(device=device).manual_seed(seed + i)
        with autocast or contextlib.nullcontext():
            total += forward_loss(model, model.cfg, x0, g).item() * x0.numel()
        count += x0.numel()
    return total, count


@torch.no_grad()
def infill_accuracy(model, stream, seq_len, batch_size, n_batches, mask_frac, seed, autocast=None):
    """Mask a fraction of the tokens of held-out windows at random; the fraction of masked tokens whose
    argmax prediction is right. A block-mode model sees the clean text as its left context (model(xt, x0))."""
    device = next(model.parameters()).device
    right, total = 0, 0
    for i in range(n_batches):
        x0 = eval_batch(stream, seq_len, batch_size, n_batches, i, device)
        g = torch.Generator(device=device).manual_seed(seed + i)
        xt = mask_tokens(x0, torch.full(x0.shape, mask_frac, device=device), model.cfg.vocab_size, g)
        with autocast or contextlib.nullcontext():
            logits = model(xt) if model.cfg.block_len is None else model(xt, x0=x0)
        masked = xt == model.cfg.vocab_size
        right += (logits.argmax(-1) == x0)[masked].sum().item()
        total += masked.sum().item()
    return right / max(total, 1)


# ------------------------------------------------------------------------------------------------
# sampling


def pick_tokens(logits, temperature, top_p, generator, rows_at_once=256):
    """Draw one token per row of logits (rows, vocab); returns the tokens and their probabilities.
    Gumbel noise in float64: float32 Gumbel noise visibly lowers the diversity of samples."""
    tokens, probs = [], []
    for chunk in logits.double().split(rows_at_once):  # bounds the float64 copies
        logp = torch.log_softmax(chunk / (temperature or 1.0), -1)  # greedy: confidence at temperature 1
        if temperature == 0:
            tok = logp.argmax(-1)
        else:
            if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
                sorted_logp, order = logp.sort(-1, descending=True)
                outside = sorted_logp.exp().cumsum(-1) - sorted_logp.exp() >= top_p
                logp = torch.log_softmax(logp.scatter(-1, order, sorted_logp.masked_fill(outside, float("-inf"))), -1)
            u = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=torch.float64)
            tok = (logp - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
        tokens.append(tok)
        probs.append(logp.gather(-1, tok[:, None])[:, 0].exp())
    return torch.cat(tokens), torch.cat(probs)


REVEALS = ("random", "confidence", "threshold")


def denoise(x, logits_fn, mask_id, steps, temperature, top_p, reveal, generator, threshold=0.9):
    """Unmask x (batch, n) in place; logits_fn(x, rows) gives the logits (len(rows[0]), vocab) at rows, a
    pair of index tensors (batch indices, positions). Positions that are not masked at the start are kept.
    Returns the number of model calls.

    Random reveal is ancestral MDLM over `steps` steps: from t to s each masked position is revealed with
    probability (t - s) / t. Under the linear schedule that makes a position's reveal step uniform over
    the steps and independent of the tokens drawn, so every step is drawn up front, and the loop needs no
    host sync: the CPU queues the model calls ahead of the GPU. Steps that reveal nothing call no model.
    Confidence reveal draws for every masked position and keeps the k whose drawn token is most probable,
    k the expected number revealed. Threshold reveal keeps every drawn token of probability >= threshold,
    and at least each row's most probable one, until nothing is masked (steps is not used)."""
    if reveal not in REVEALS:
        raise ValueError(f"reveal must be one of {REVEALS}, got {reveal!r}")
    masked = x == mask_id
    calls = 0
    if reveal == "random":
        u = torch.rand(x.shape, generator=generator, device=x.device)
        step = torch.where(masked, (u * steps).long().clamp_max(steps - 1), steps).flatten()
        step, order = step.sort(stable=True)  # positions grouped by reveal step (steps: never)
        bounds = torch.searchsorted(step, torch.arange(steps + 1, device=x.device)).tolist()  # the one host sync
        for first, last in zip(bounds[:-1], bounds[1:]):
            if last > first:
                pos = order[first:last]
                rows = (pos // x.shape[1], pos % x.shape[1])
                x[rows] = pick_tokens(logits_fn(x, rows), temperature, top_p, generator)[0]
                calls += 1
        return calls
    ts = torch.linspace(1, 0, steps + 1).tolist()
    logits = None
    for i in range(x.shape[1] if reveal == "threshold" else steps):  # threshold: one token a row at least
        t, s = (1.0, 0.0) if reveal == "threshold" else (ts[i], ts[i + 1])
        rows = masked.nonzero(as_tuple=True)
        if not len(rows[0]):
            break
        if logits is None:  # else nothing was revealed since: the same rows
            logits = logits_fn(x, rows)
            calls += 1
        tokens, probs = pick_tokens(logits, temperature, top_p, generator)
        score = torch.full(x.shape, -1.0, dtype=torch.float64, device=x.device)
        score[rows] = probs
        rank = score.argsort(1, descending=True).argsort(1)[rows]  # 0: the row's most probable draw
        if reveal == "threshold":
            keep = (probs >= threshold) | (rank == 0)
        else:
            keep = rank < torch.round(masked.sum(1) * (t - s) / t).long()[rows[0]]  # the last step reveals all
            if not keep.any():
                continue
        x[rows[0][keep], rows[1][keep]] = tokens[keep]
        masked[rows[0][keep], rows[1][keep]] = False
        logits = None  # the input changed: the next step needs new logits
    return calls


def cuda_graph(fn, undo=None):
    """fn() captured in a CUDA graph. Returns replay(), which reruns it and returns the captured output,
    overwritten by the next replay. fn must read and write the same tensors every time. A replay skips
    Python and kernel launches: most of the time of a small model call. fn runs 3 times to warm up,
    each followed by undo() if given (what fn changes; the capture itself runs nothing)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
            if undo:
                undo()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def graphed_model(model, x):
    """model(.) as a CUDA-graph replay over a fixed input buffer shaped like x (a full-sequence model)."""
    static = x.clone()
    replay = cuda_graph(lambda: model(static))
    return lambda ids: (static.copy_(ids), replay())[1]


def logits_at(call, device):
    """call(ids, rows=None) as the samplers' logits_fn(ids, rows). On a CPU the output layer is most of a
    small model's work, so it is formed only at the rows drawn. On a GPU it is cheap, and every position's
    logits are formed and the rows picked from them: a CUDA graph has fixed shapes, and eager calls then
    give the graph's numbers exactly."""
    if device.type == "cuda":
        return lambda ids, rows: call(ids)[rows]
    return lambda ids, rows: call(ids, rows=rows)


def graphed_block_calls(model, cache):
    """forward_block and commit as CUDA-graph replays over a fixed input block: a cache is a fixed set of
    tensors that commit updates in place. The warm-up commits are undone."""
    static = torch.zeros(cache.batch_size, model.cfg.block_len, dtype=torch.long, device=model.embed.weight.device)
    length, kept = cache.length, [(t, t.clone()) for t in cache.overwritten()]

    def undo():
        for t, k in kept:
            t.copy_(k)
        cache.length = length
    forward_block = cuda_graph(lambda: model.forward_block(static, cache))
    commit = cuda_graph(lambda: model.commit(static, cache), undo)
    cache.length = length  # the capture ran commit's Python side

    def commit_block(ids):
        static.copy_(ids)
        commit()
        cache.length += model.cfg.block_len  # Python state: not in the graph
    return lambda ids: (static.copy_(ids), forward_block())[1], commit_block


def _check_sampling(steps, temperature, top_p, threshold):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def _warm(start, device):
    """Seconds since start, once the GPU has finished what was queued: the sampler's one-off work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def sample_full(model, template, steps, temperature=1.0, top_p=1.0, reveal="random", seed=0, autocast=None,
                graph=True, threshold=0.9):
    """Full-sequence MDLM sampling. template (batch, length): mask ids where text is to be generated
    (all of it, or spans to infill), tokens elsewhere, which are kept. On a GPU the model calls are CUDA-
    graph replays unless graph=False (same tokens). Returns (tokens, stats): stats holds the model calls
    and warmup_s, the seconds of one-off work (graph capture, the kernels' first compilation) before the
    first sampling step."""
    start = time.perf_counter()
    if model.cfg.block_len is not None:
        raise ValueError("sample_full needs a full-sequence model; this one has block_len="
                         f"{model.cfg.block_len}: use sample_block")
    _check_sampling(steps, temperature, top_p, threshold)
    x = template.clone()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with autocast or contextlib.nullcontext():
        model.check_tokens("template", x, allow_mask=True)
        logits_fn = logits_at(graphed_model(model, x) if graph and x.is_cuda else model, x.device)
        warmup_s = _warm(start, x.device)
        calls = denoise(x, logits_fn, model.cfg.vocab_size, steps, temperature, top_p, reveal, generator, threshold)
    return x, dict(calls=calls, warmup_s=warmup_s)


@torch.no_grad()
def sample_block(model, prompt, length, steps_per_block, temperature=1.0, top_p=1.0, reveal="random", seed=0,
                 stop_token=None, progress=False, autocast=None, graph=True, threshold=0.9):
    """Block diffusion with the cache: commit the prompt's whole blocks, then for each new block start all
    masked (a prompt's last partial block stays fixed inside the first one), denoise it with
    forward_block, commit it. Stops at `length` tokens, or once every row holds stop_token. On a GPU the
    calls are CUDA-graph replays unless graph=False (same tokens). Returns (tokens (batch, <= length),
    stats): stats holds the forward_block calls, the commits and warmup_s, as sample_full's."""
    start_time = time.perf_counter()
    K = model.cfg.block_len
    if K is None:
        raise ValueError("sample_block needs a block-mode model (block_len=K); this one is full-sequence: "
                         "use sample_full")
    _check_sampling(steps_per_block, temperature, top_p, threshold)
    batch, n_prompt = prompt.shape
    if n_prompt > length:
        raise ValueError(f"the prompt ({n_prompt} tokens) is longer than length ({length})")
    model.check_tokens("prompt", prompt, allow_mask=False)
    mask_id = model.cfg.vocab_size
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    start = n_prompt // K * K  # the first generated block starts here
    nblocks = -(-(length - start) // K)
    out = torch.full((batch, start + nblocks * K), mask_id, dtype=prompt.dtype, device=prompt.device)
    out[:, :n_prompt] = prompt
    calls, commits, end = 0, 0, length
    with autocast or contextlib.nullcontext():
        cache = model.new_cache(batch, out.shape[1])
        if graph and prompt.is_cuda:
            forward_block, commit = graphed_block_calls(model, cache)
        else:
            forward_block = lambda ids, rows=None: model.forward_block(ids, cache, rows)
            commit = lambda ids: model.commit(ids, cache)
        forward_block = logits_at(forward_block, prompt.device)
        warmup_s = _warm(start_time, prompt.device)
        for b in range(start // K):
            commit(out[:, b * K:(b + 1) * K])
            commits += 1
        for b in tqdm(range(start // K, start // K + nblocks), desc="blocks", disable=not progress):
            block = out[:, b * K:(b + 1) * K]  # a view: denoised in place
            calls += denoise(block, forward_block, mask_id, steps_per_block, temperature, top_p, reveal, generator,
                             threshold)
            commit(block)
            commits += 1
            if stop_token is not None and (out[:, n_prompt:(b + 1) * K] == stop_token).any(1).all():
                end = min(length, (b + 1) * K)
                break
    return out[:, :end], dict(calls=calls, commits=commits, warmup_s=warmup_s)
