"""
Generate text from a checkpoint: full-sequence MDLM sampling (with infilling) or block diffusion with
the exact cache.

    python sample.py                                    # a few samples from out/ckpt.pt, and an infilling demo
    python sample.py --prompt="import os" --length=512
    python sample.py --infill="def f(x):\\n    return <|mask:8|>\\n"     # full-sequence models

In --infill text, each <|mask|> is one token to fill and <|mask:N|> is N of them; the rest is kept.
--prompt and --infill also take @file to read the text from a file.
"""

import argparse
import re
import time

import torch

import data
from diffusion import sample_block, sample_full
from model import DiffuMamba, ModelConfig
from train import load_checkpoint

DEMO_INFILL = ('def read_config(path):\n    """Read the configuration file at path and return it as a dict."""\n'
               '    with open(path) as f:\n        <|mask:16|>\n    return config\n')
MASK_SPAN = re.compile(r"<\|mask(?::(\d+))?\|>")


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
    ckpt = load_checkpoint(path)
    model = DiffuMamba(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def main(argv=None):
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
    p.add_argument("--reveal", default="random", choices=["random", "confidence"],
                   help="random: ancestral MDLM; confidence: most confident first (greedy-like, repeats more)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no_stop", action="store_true", help="block sampler: go on to --length past <|endoftext|>")
    p.add_argument("--sampler", default="auto", choices=["auto", "full", "block"],
                   help="auto: block for block-mode checkpoints, full otherwise")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        if args.prompt is not None and args.infill is not None:
            raise ValueError("give --prompt or --infill, not both")
        if args.num_samples < 1 or args.length < 1:
            raise ValueError("--num_samples and --length must be >= 1")
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
        steps = args.length if args.steps is None else args.steps
        steps_per_block = cfg.block_len if args.steps_per_block is None else args.steps_per_block
        for name, v in (("--steps", steps), ("--steps_per_block", steps_per_block)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        infill = None if args.infill is None else encode_template(read_arg(args.infill), enc, cfg.vocab_size)
    except (ValueError, OSError) as e:
        p.error(str(e))

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    print(f"{cfg.arch} model, {model.num_params() / 1e6:.1f}M parameters, trained {ckpt['iter']} iters; "
          f"{sampler} sampler, {args.reveal} reveal, temperature {args.temperature}, top_p {args.top_p}\n")

    def run(x, kind, steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        if kind == "block":
            out, calls = sample_block(model, x, args.length, steps, args.temperature, args.top_p, args.reveal,
                                      args.seed, stop_token=None if args.no_stop else data.EOT, progress=True,
                                      autocast=autocast)
            calls = f"{calls} forward_block calls + {-(-out.shape[1] // cfg.block_len)} commits"
        else:
            out, calls = sample_full(model, x, steps, args.temperature, args.top_p, args.reveal, args.seed,
                                     autocast=autocast)
            calls = f"{calls} model calls"
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.time() - t0, calls

    if infill is None:  # generate, after the prompt if any
        x = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device).view(args.num_samples, -1)
        if sampler == "full":
            masks = torch.full((args.num_samples, args.length - len(prompt)), cfg.vocab_size, device=device)
            x = torch.cat([x, masks], dim=1)
        out, dt, calls = run(x, sampler, steps if sampler == "full" else steps_per_block)
        for i, row in enumerate(out.tolist()):
            gen = row[len(prompt):]
            gen = gen[:gen.index(data.EOT)] if data.EOT in gen else gen
            print(f"---------- sample {i} ----------\n{enc.decode(prompt + gen)}\n")
        n_gen = out.shape[1] - len(prompt)
        print(f"{args.num_samples} x {n_gen} tokens in {dt:.2f} s: {args.num_samples * n_gen / dt:,.0f} tokens/s, {calls}\n")
    text = read_arg(args.infill)
    if text is None and args.prompt is None and sampler == "full":  # the default run also shows infilling
        text, infill = DEMO_INFILL, encode_template(DEMO_INFILL, enc, cfg.vocab_size)
    if infill is not None:
        x = torch.tensor([infill] * args.num_samples, device=device)
        out, dt, calls = run(x, "full", args.steps or int((x[0] == cfg.vocab_size).sum()))
        print(f"========== infilling ==========\n{MASK_SPAN.sub('[...]', text)}")
        for i, row in enumerate(out.tolist()):
            print(f"---------- filled {i} ----------\n{enc.decode(row)}")
        print(f"{calls}, {dt:.2f} s")


if __name__ == "__main__":
    main()
