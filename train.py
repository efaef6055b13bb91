"""
Train a masked-diffusion LM (DiffuMamba, DiffuMamba-H or the Transformer baseline) with the MDLM
objective, on a CPU, one GPU, or several:

    python train.py                                        # the main job: the built-in corpus
    python train.py --arch=hybrid --block_len=64 --max_iters=2000
    torchrun --nproc_per_node=2 train.py --grad_accum=2    # DDP: NCCL on GPUs, gloo on CPUs

Every micro-batch, its data and its noise alike, comes from a generator seeded by (seed, iteration,
micro-step). So a run gives the same parameters whether it was interrupted and resumed or not, and on 1 or
N processes: the global batch is batch_size * grad_accum sequences, and each process takes its share of
the grad_accum micro-steps. Checkpoints (out_dir/ckpt.pt) are written atomically, at each evaluation, at
the end, and on Ctrl-C or SIGTERM.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from diffusion import EPS, evaluate_nelbo, forward_loss, infill_accuracy
from model import ARCHS, PRESETS, DiffuMamba, ModelConfig, preset_config

# Resuming: where and how to run comes from the command line; these may be changed, and keep the run's
# values unless given; every other flag must match the run's.
ENVIRONMENT = {"device", "dtype", "compile", "out_dir", "resume", "data"}
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval"}
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
# the main job's size and budget on each kind of device (a flag overrides each)
DEVICE_DEFAULTS = {
    "cuda": dict(preset="small", seq_len=512, batch_size=32, max_iters=2000, eval_iters=20),
    "cpu": dict(preset="tiny", seq_len=128, batch_size=8, max_iters=150, eval_iters=8),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="text file, directory of text files, or directory with "
                   "train.bin/val.bin (default: the Python standard library's source)")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default: small on a GPU, tiny on a CPU")
    p.add_argument("--arch", default="mamba", choices=ARCHS)
    p.add_argument("--block_len", type=int, default=None, help="block diffusion with blocks of this many tokens")
    p.add_argument("--attn_every", type=int, default=None, help="hybrid: every attn_every-th block is attention")
    p.add_argument("--d_model", type=int, default=None)
    p.add_argument("--n_layer", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=None, help="default: 512 on a GPU, 128 on a CPU")
    p.add_argument("--batch_size", type=int, default=None, help="sequences per micro-step (default: 32 GPU, 8 CPU)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per iteration, over all processes")
    p.add_argument("--max_iters", type=int, default=None, help="default: 2000 on a GPU, 150 on a CPU")
    p.add_argument("--lr_decay_iters", type=int, default=None, help="length of the cosine schedule (default: max_iters)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (the small preset's DiffuMamba is "
                   "best near 2e-3, its Transformer near 1e-3)")
    p.add_argument("--min_lr", type=float, default=None, help="default: lr / 10")
    p.add_argument("--warmup_iters", type=int, default=100)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--t_lo", type=float, default=EPS, help="lowest training noise level (per sequence; per "
                   "block in block diffusion)")
    p.add_argument("--t_hi", type=float, default=1.0, help="highest training noise level")
    p.add_argument("--eval_interval", type=int, default=None, help="default: max_iters // 5")
    p.add_argument("--eval_iters", type=int, default=None, help="validation batches per evaluation (default: 20 "
                   "on a GPU, 8 on a CPU)")
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--device", default="auto", help="auto: cuda if present, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES, help="torch.compile the model, in this mode; "
                   "default: reduce-overhead (CUDA graphs) on one GPU, off on a CPU and under torchrun")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its checkpoint")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    args.given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    return p, args


def resolve(args, device_type, ddp):
    """Fill the device-dependent defaults and check the numbers."""
    for k, v in DEVICE_DEFAULTS[device_type].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.compile is None:  # CUDA graphs take the host out of a small model's step; DDP with them is untested
        args.compile = "reduce-overhead" if device_type == "cuda" and not ddp else "off"
    args.lr_decay_iters = args.lr_decay_iters or args.max_iters
    args.eval_interval = args.eval_interval or max(1, args.max_iters // 5)
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.dtype = ("bfloat16" if device_type == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    for name in ("seq_len", "batch_size", "grad_accum", "max_iters", "eval_iters", "lr_decay_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not EPS <= args.t_lo < args.t_hi <= 1:
        raise ValueError(f"need {EPS} <= --t_lo < --t_hi <= 1, got {args.t_lo}, {args.t_hi}")


def model_config(args):
    overrides = {k: getattr(args, k) for k in ("d_model", "n_layer", "block_len", "attn_every") if getattr(args, k) is not None}
    cfg = preset_config(args.preset, args.arch, **overrides)
    if cfg.block_len is not None and args.seq_len % cfg.block_len:
        raise ValueError(f"--seq_len ({args.seq_len}) must be a multiple of --block_len ({cfg.block_len})")
    return cfg


# the layout of the model's parameters; a checkpoint of another would load and compute something else
CHECKPOINT_FORMAT = 3


def load_checkpoint(path):
    """The checkpoint at path, or a ValueError that says what is wrong with it."""
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: it is truncated or corrupt ({type(e).__name__}: {e})") from e
    missing = [k for k in ("model", "model_config", "train_config", "iter") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a diffumamba checkpoint: it lacks {', '.join(missing)}")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} was written by another version of the model code (checkpoint format "
                         f"{ckpt.get('format', 1)}, this code reads {CHECKPOINT_FORMAT}): train it again")
    return ckpt


def save_checkpoint(path, ckpt):
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old checkpoint whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def batch_seed(seed, it, k):
    return (seed * 1_000_003 + it) * 65_536 + k


def get_batch(stream, seq_len, batch_size, seed, device):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=g).tolist()
    x = np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64)
    return torch.from_numpy(x).to(device, non_blocking=True)


def lr_at(it, args):
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = min(1.0, (it - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def flops_per_token(model, cfg, seq_len):
    """Training FLOPs per token: 6 per weight it passes through, plus attention's scores and values.
    Block mode runs the body on the clean stream as well."""
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed"))
    head = cfg.d_model * cfg.vocab_size
    n_attn = sum(cfg.is_attention(i) for i in range(cfg.n_layer))
    streams = 1 if cfg.block_len is None else 2
    return 6 * (streams * body + head) + 12 * n_attn * cfg.d_model * seq_len * streams ** 2


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class Run:
    """Where the run happens: its processes, its device, its checkpoint, its log."""

    def __init__(self, args):
        self.ddp = "RANK" in os.environ
        self.rank, self.world, local_rank = ((int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
                                             if self.ddp else (0, 1, 0))
        self.master = self.rank == 0
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" and self.ddp else args.device)
        if self.device.type == "cuda":
            if self.ddp:
                torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.ddp:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
        self.log_path = os.path.join(args.out_dir, "log.jsonl")

    def start_log(self, start_iter):
        """Begin the log at start_iter: a new run starts an empty one; a resumed run keeps the rows up to its
        checkpoint's iteration and drops any that the interrupted run wrote past it (a last line cut short
        too), so no iteration is logged twice."""
        if not self.master:
            return
        rows = []
        if start_iter and os.path.exists(self.log_path):
            with open(self.log_path) as f:
                rows = [line for line in f if line.endswith("\n") and json.loads(line)["iter"] <= start_iter]
        with open(self.log_path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(self.log_path + ".tmp", self.log_path)

    def log(self, **row):
        if self.master:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def all_reduce(self, values, op=dist.ReduceOp.SUM):
        """values, a list of floats, reduced over the processes."""
        if not self.ddp:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def leave(self):  # every process waits for rank 0's last writes, then the group closes together
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()


def setup(run, args):
    """Resume's settings, the defaults, the data and the model (loaded from the checkpoint on resume).
    Returns (cfg, model, checkpoint or None, train and val streams); a ValueError says what is wrong."""
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(run.ckpt_path)
        saved = ckpt["train_config"]
        clash = sorted(k for k in args.given - RESUMABLE - ENVIRONMENT if k in saved and getattr(args, k) != saved[k])
        if clash:
            raise ValueError(f"--resume continues the run in {args.out_dir}; these flags differ from it: "
                             + ", ".join(f"--{k}={getattr(args, k)} (run: {saved[k]})" for k in clash))
        for k, v in saved.items():
            if k not in ENVIRONMENT and not (k in RESUMABLE and k in args.given):
                setattr(args, k, v)
    resolve(args, run.device.type, run.ddp)
    if args.grad_accum % run.world:
        raise ValueError(f"--grad_accum ({args.grad_accum}) must be a multiple of the number of processes ({run.world})")
    cfg = ModelConfig(**ckpt["model_config"]) if ckpt else model_config(args)
    if run.ddp and not run.master:
        dist.barrier()  # rank 0 builds the token cache; the others then find it
    data_dir = data.prepare(args.data, args.seq_len)
    if run.ddp and run.master:
        dist.barrier()
    streams = data.load(data_dir, args.seq_len)
    torch.manual_seed(args.seed)
    model = DiffuMamba(cfg).to(run.device)
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {run.ckpt_path} does not fit its own model config: {e}") from e
    return cfg, model, ckpt, streams


def make_optimizer(model, args, device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "conv" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "conv" not in n)]
    return torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                             lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def restore(ckpt, optimizer, device):
    """Optimizer and RNG state from the checkpoint; returns (start iteration, best val NELBO)."""
    if ckpt is None:
        return 0, float("inf")
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["iter"], ckpt["best_val"]


def train_step(run, model, raw, cfg, optimizer, train_stream, args, it, autocast):
    """One iteration: this process's micro-steps, gradient clipping, the optimizer step. Returns the loss
    (a device tensor: reading it would stop the host)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(it, args)
    micro = args.grad_accum // run.world  # this process's micro-steps
    loss_sum = torch.zeros((), device=run.device)
    for j in range(micro):
        seed = batch_seed(args.seed, it, run.rank * micro + j)  # this micro-step's place in the global batch
        x0 = get_batch(train_stream, args.seq_len, args.batch_size, seed, run.device)
        g = torch.Generator(device=run.device).manual_seed(seed)
        sync = nullcontext() if not run.ddp or j == micro - 1 else model.no_sync()
        with sync, autocast:
            loss = forward_loss(model, cfg, x0, g, args.t_lo, args.t_hi) / micro
        loss.backward()
        loss_sum += loss.detach()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def evaluate(run, raw, val_stream, args, autocast):
    """Validation NELBO per token, over every process's share of the batches."""
    raw.eval()
    total, count = evaluate_nelbo(raw, val_stream, args.seq_len, args.batch_size, args.eval_iters, args.seed + 1,
                                  run.rank, run.world, autocast)
    raw.train()
    total, count = run.all_reduce([total, count])
    return total / count


def checkpoint(run, raw, cfg, optimizer, args, it, best_val):
    if run.master:
        rng = dict(torch=torch.get_rng_state())
        if run.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(run.device)
        save_checkpoint(run.ckpt_path, dict(format=CHECKPOINT_FORMAT, model=raw.state_dict(),
                                            optimizer=optimizer.state_dict(), model_config=asdict(cfg), iter=it,
                                            best_val=best_val, rng=rng,
                                            train_config={k: v for k, v in vars(args).items() if k != "given"}))


def main(argv=None):
    parser, args = parse_args(sys.argv[1:] if argv is None else argv)
    run = Run(args)
    stop = []  # set by Ctrl-C / SIGTERM; the loop saves a checkpoint and leaves
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        cfg, raw, ckpt, (train_stream, val_stream) = setup(run, args)
    except ValueError as e:
        parser.error(str(e))
    optimizer = make_optimizer(raw, args, run.device)
    start_iter, best_val = restore(ckpt, optimizer, run.device)
    del ckpt
    model = raw if args.compile == "off" else torch.compile(raw, mode=args.compile)
    if run.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[run.device] if run.device.type == "cuda" else None)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    tokens_per_iter = args.batch_size * args.grad_accum * args.seq_len
    fpt, peak = flops_per_token(raw, cfg, args.seq_len), peak_flops(run.device)
    os.makedirs(args.out_dir, exist_ok=True)
    run.start_log(start_iter)
    if run.master:
        print(f"{cfg.arch} {args.preset}: {raw.num_params() / 1e6:.1f}M parameters, block_len={cfg.block_len}, "
              f"{len(train_stream) / 1e6:.2f}M train tokens, {len(val_stream) / 1e6:.3f}M val, {tokens_per_iter} "
              f"tokens/iter on {run.world} x {run.device.type}" + (f", resuming at iter {start_iter}" if start_iter else ""),
              flush=True)
    raw.train()
    bar = tqdm(range(start_iter, args.max_iters), initial=start_iter, total=args.max_iters, disable=not run.master,
               dynamic_ncols=True)
    t0, val = time.time(), None
    for it in bar:
        loss = train_step(run, model, raw, cfg, optimizer, train_stream, args, it, autocast)
        done = it + 1
        if done % args.log_interval == 0 or done == args.max_iters:
            loss = loss.item()  # waits for the GPU first: the host queues iterations ahead of it
            dt = time.time() - t0
            tok_s = tokens_per_iter * (done - max(start_iter, done - args.log_interval)) / dt if dt > 0 else 0.0
            mfu = fpt * tok_s / (peak * run.world) if peak else None
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}" if mfu else "n/a")
            run.log(iter=done, loss=loss, lr=lr_at(it, args), tok_s=tok_s, mfu=mfu, time=time.time())
            t0 = time.time()
        if done % args.eval_interval == 0 or done == args.max_iters:
            val = evaluate(run, raw, val_stream, args, autocast)
            best_val = min(best_val, val)
            run.log(iter=done, val_nelbo=val, val_ppl_bound=math.exp(val), best_val_nelbo=best_val,
                    tokens=done * tokens_per_iter)
            if run.master:
                tqdm.write(f"iter {done}: val NELBO {val:.4f} nats/token, perplexity bound {math.exp(val):.2f}")
            checkpoint(run, raw, cfg, optimizer, args, done, best_val)
            t0 = time.time()
        if run.all_reduce([float(bool(stop))], dist.ReduceOp.MAX)[0]:  # all processes stop together
            checkpoint(run, raw, cfg, optimizer, args, done, best_val)
            if run.master:
                tqdm.write(f"interrupted after iter {done}: checkpoint saved to {run.ckpt_path}; --resume continues")
            run.leave()
            sys.exit(130)
    bar.close()
    if run.master:  # the last evaluation wrote the final checkpoint
        raw.eval()
        acc = {f"infill_acc_{round(100 * f)}": infill_accuracy(raw, val_stream, args.seq_len, args.batch_size,
                                                               args.eval_iters, f, args.seed + 2, autocast)
               for f in (0.15, 0.5)}
        run.log(iter=args.max_iters, **acc)
        if val is not None:
            print(f"done: {args.max_iters} iters; val NELBO {val:.4f} nats/token, perplexity bound {math.exp(val):.2f}; "
                  f"infilling accuracy {acc['infill_acc_15']:.1%} (15% masked), {acc['infill_acc_50']:.1%} (50%); "
                  f"checkpoint {run.ckpt_path}")
    run.leave()


if __name__ == "__main__":
    main()
