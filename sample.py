"""
Generate text from a checkpoint: full-sequence MDLM sampling (with infilling) or block diffusion with
the exact cache.

    python sample.py                                    # a few samples from out/ckpt.pt, and an infilling demo
    python sample.py --prompt="import os" --length=512
    python sample.py --infill="def f(x):\\n    return <|mask:8|>\\n"     # full-sequence models
    python sample.py --reveal=threshold --threshold=0.9  # as many model calls as the model's confidence needs

In --infill text, each <|mask|> is one token to fill and <|mask:N|> is N of them; the rest is kept.
--prompt and --infill also take @file to read the text from a file. On a GPU the model runs in bfloat16
weights (the checkpoint keeps float32) and its calls replay CUDA graphs; the speed printed leaves out
the one-off warm-up (the kernels' compilation, the graphs' capture), which is printed beside it.
"""

import argparse
import re
import time

import torch

import data
from diffusion import REVEALS, sample_block, sample_full
from model import DiffuMamba, ModelConfig
from train import load_checkpoint

DEMO_INFILL = ('def read_config(path):\n    """Read the configuration file at path and return it as a dict."""\n'
               '    with open(path) as f:\n        <|mask:16|>\n    return config\n')
MASK_SPAN = re.compile(r"<\|mask(?::(\d+))?\|>")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="take out_dir/ckpt.pt")
    p.add_argument("--ckpt", default=None, help="checkpoint path (overrides --out_dir)")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--length", type=int, default=256, help="tokens per sample, prompt included")
    p.add_argument("--steps", type=int, default=None, help="full-sequence sampler: denoising steps (default: length)")
    p.add_argument("--steps_per_block", type=int, default=None, help="block sampler: steps per block (default: block_len)")
    p.add_argument("--prompt", default=None, help="text to continue, or @file")
    p.add_argument("--infill", default=None, help="text with <|mask|> / <|mask:N|> spans to fill, or @file")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--reveal", default="random", choices=REVEALS,
                   help="random: ancestral MDLM; confidence: most confident first (greedy-like, repeats more); "
                   "threshold: every token drawn with probability >= --threshold, at least one a call (no steps)")
    p.add_argument("--threshold", type=float, default=0.9, help="--reveal=threshold: the probability to reveal at")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no_stop", action="store_true", help="block sampler: go on to --length past <|endoftext|>")
    p.add_argument("--sampler", default="auto", choices=["auto", "full", "block"],
                   help="auto: block for block-mode checkpoints, full otherwise")
    return p, p.parse_args(argv)


def read_arg(text):
    if text is not None and text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            return f.read()
    return text


def encode_template(text, enc, mask_id):
    """Token ids for infill text: <|mask|> -> one mask id, <|mask:N|> -> N of them."""
    ids, pos, spans = [], 0, 0
    for m in MASK_SPAN.finditer(text):
        ids += enc.encode(text[pos:m.start()], allowed_special={"<|endoftext|>"})
        n = int(m.group(1) or 1)
        if n < 1:
            raise ValueError(f"{m.group(0)} asks for no tokens")
        ids += [mask_id] * n
        pos, spans = m.end(), spans + 1
    ids += enc.encode(text[pos:], allowed_special={"<|endoftext|>"})
    if spans == 0:
        raise ValueError("--infill text has no <|mask|> or <|mask:N|> span to fill")
    return ids


def load_model(path, device):
    """The checkpoint's model on device, in bfloat16 weights on a GPU, in eval mode; and the checkpoint."""
    ckpt = load_checkpoint(path)
    model = DiffuMamba(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).for_inference(torch.bfloat16 if device.type == "cuda" else torch.float32), ckpt


def plan(args, device):
    """Check the flags against the checkpoint; returns (model, checkpoint, sampler, tokenizer, prompt ids,
    infill text and ids or None). A ValueError or OSError says what is wrong."""
    if args.prompt is not None and args.infill is not None:
        raise ValueError("give --prompt or --infill, not both")
    if args.num_samples < 1 or args.length < 1:
        raise ValueError("--num_samples and --length must be >= 1")
    for name in ("steps", "steps_per_block"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    model, ckpt = load_model(args.ckpt or f"{args.out_dir}/ckpt.pt", device)
    cfg = model.cfg
    sampler = args.sampler if args.sampler != "auto" else ("full" if cfg.block_len is None else "block")
    if sampler == "full" and cfg.block_len is not None:
        raise ValueError(f"--sampler=full needs a full-sequence model; this checkpoint is block mode "
                         f"(block_len={cfg.block_len}): use --sampler=block")
    if sampler == "block" and cfg.block_len is None:
        raise ValueError("--sampler=block needs a block-mode checkpoint (trained with --block_len); "
                         "this one is full-sequence: use --sampler=full")
    if args.infill is not None and sampler == "block":
        raise ValueError("--infill needs a full-sequence model: block diffusion only extends text")
    enc = data.tokenizer()
    prompt = enc.encode(read_arg(args.prompt) or "", allowed_special={"<|endoftext|>"})
    if len(prompt) > args.length:
        raise ValueError(f"the prompt ({len(prompt)} tokens) is longer than --length ({args.length})")
    text = read_arg(args.infill)
    if text is None and args.prompt is None and sampler == "full":  # the default run also shows infilling
        text = DEMO_INFILL
    infill = None if text is None else (text, encode_template(text, enc, cfg.vocab_size))
    return model, ckpt, sampler, enc, prompt, infill


def generate(model, args, x, kind, steps):
    """Run a sampler on x; returns the tokens and a line on its speed, warm-up apart."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    common = dict(temperature=args.temperature, top_p=args.top_p, reveal=args.reveal, seed=args.seed,
                  threshold=args.threshold)
    if kind == "block":
        out, stats = sample_block(model, x, args.length, steps, stop_token=None if args.no_stop else data.EOT,
                                  progress=True, **common)
        calls = f"{stats['calls']} forward_block calls + {stats['commits']} commits"
    else:
        out, stats = sample_full(model, x, steps, **common)
        calls = f"{stats['calls']} model calls"
    sync()
    seconds = time.perf_counter() - t0 - stats["warmup_s"]
    n = int(((x == model.cfg.vocab_size).sum() if kind == "full" else out.numel() - x.numel()))
    per_call = n / x.shape[0] / max(stats["calls"], 1)  # in each sequence
    return out, (f"warm-up {stats['warmup_s']:.2f} s; {n:,} tokens in {seconds:.2f} s: {n / seconds:,.0f} tokens/s, "
                 f"{calls} ({per_call:.2f} tokens a call in each sequence)")


def main(argv=None):
    p, args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        model, ckpt, sampler, enc, prompt, infill = plan(args, device)
    except (ValueError, OSError) as e:
        p.error(str(e))
    cfg = model.cfg
    print(f"{cfg.arch} model, {model.num_params() / 1e6:.1f}M parameters, trained {ckpt['iter']} iters; "
          f"{sampler} sampler, {args.reveal} reveal, temperature {args.temperature}, top_p {args.top_p}\n")
    if args.infill is None:  # generate, after the prompt if any
        x = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device).view(args.num_samples, -1)
        if sampler == "full":
            masks = torch.full((args.num_samples, args.length - len(prompt)), cfg.vocab_size, device=device)
            x = torch.cat([x, masks], dim=1)
        out, speed = generate(model, args, x, sampler, (args.steps or args.length) if sampler == "full"
                              else (args.steps_per_block or cfg.block_len))
        for i, row in enumerate(out.tolist()):
            gen = row[len(prompt):]
            gen = gen[:gen.index(data.EOT)] if data.EOT in gen else gen
            print(f"---------- sample {i} ----------\n{enc.decode(prompt + gen)}\n")
        print(speed + "\n")
    if infill is not None:
        text, ids = infill
        x = torch.tensor([ids] * args.num_samples, device=device)
        out, speed = generate(model, args, x, "full", args.steps or int((x[0] == cfg.vocab_size).sum()))
        print(f"========== infilling ==========\n{MASK_SPAN.sub('[...]', text)}")
        for i, row in enumerate(out.tolist()):
            print(f"---------- filled {i} ----------\n{enc.decode(row)}")
        print(speed)


if __name__ == "__main__":
    main()
