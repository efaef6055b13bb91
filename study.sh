#!/usr/bin/env bash
# The quality study (RESULTS.md, "Quality"): DiffuMamba, DiffuMamba-H and the Transformer at the small preset,
# full-sequence with two seeds and block diffusion (block_len=64) with one, all on the built-in corpus with
# the same tokens and optimiser settings (600 iterations of 32 x 512 tokens, lr 1e-3), then the table and
# the plot.
# Each run leaves a short sample in its out_dir/sample.txt. A small learning-rate grid for the Transformer
# and DiffuMamba (seed 1337) goes under runs_dir/lr.
#     bash study.sh [runs_dir] [more train.py flags]
set -euo pipefail
runs=${1:-runs}
shift || true
run() {  # out_dir, train.py flags: train, then a short sample (and, full-sequence, the infilling demo)
  python train.py --out_dir=$1 --max_iters=600 --eval_interval=60 --lr=1e-3 "${@:2}"
  python sample.py --out_dir=$1 --num_samples=1 --length=128 > $1/sample.txt
}
for seed in 1337 1338; do
  for arch in transformer mamba hybrid; do
    run $runs/$arch-full-s$seed --preset=small --arch=$arch --seed=$seed "$@"
  done
done
for arch in transformer mamba hybrid; do
  run $runs/$arch-block64-s1337 --preset=small --arch=$arch --block_len=64 --seed=1337 "$@"
done
for lr in 5e-4 2e-3 4e-3; do
  python train.py --preset=small --arch=transformer --max_iters=600 --lr=$lr --seed=1337 \
    --out_dir=$runs/lr/transformer-lr$lr "$@"
done
python train.py --preset=small --arch=mamba --max_iters=600 --lr=2e-3 --seed=1337 --out_dir=$runs/lr/mamba-lr2e-3 "$@"
python - "$runs" <<'PY'
import glob, json, math, os, statistics, sys
runs = sys.argv[1]
rows = {}
for path in sorted(glob.glob(f"{runs}/*/log.jsonl")):
    log = [json.loads(line) for line in open(path)]
    evals = [r for r in log if "val_nelbo" in r]
    speed = [r["tok_s"] for r in log if "tok_s" in r]
    speed = speed[2:] or speed  # past the first logs, which include start-up
    infill = next((r for r in log if "infill_acc_15" in r), None)  # None: the run did not finish
    rows[os.path.basename(os.path.dirname(path))] = dict(
        nelbo=evals[-1]["val_nelbo"], tokens=evals[-1]["tokens"], tok_s=statistics.median(speed), curve=evals,
        acc=f"{infill['infill_acc_15']:.1%} | {infill['infill_acc_50']:.1%}" if infill else "unfinished | unfinished")
print("| model | val NELBO (nats/token) | perplexity bound | infill acc. 15% | infill acc. 50% | train tokens/s |")
print("|---|---|---|---|---|---|")
for name, r in rows.items():
    print(f"| {name} | {r['nelbo']:.3f} | {math.exp(r['nelbo']):.1f} | {r['acc']} | {r['tok_s']:,.0f} |")
for path in sorted(glob.glob(f"{runs}/lr/*/log.jsonl")):
    evals = [r for r in map(json.loads, open(path)) if "val_nelbo" in r]
    if evals:
        print(f"learning-rate grid: {os.path.basename(os.path.dirname(path))}: val NELBO {evals[-1]['val_nelbo']:.3f}")
for arch in ("transformer", "mamba", "hybrid"):
    seeds = [rows[k]["nelbo"] for k in rows if k.startswith(f"{arch}-full-s")]
    if len(seeds) > 1:
        print(f"{arch} full: NELBO {statistics.mean(seeds):.3f} +- {statistics.stdev(seeds):.3f} over {len(seeds)} seeds")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, arch in enumerate(("transformer", "mamba", "hybrid")):
        for mode, style in (("full-s1337", "-"), ("block64-s1337", "--")):
            r = rows.get(f"{arch}-{mode}")
            if r:
                ax.plot([e["tokens"] / 1e6 for e in r["curve"]], [e["val_nelbo"] for e in r["curve"]], style,
                        color=f"C{i}", marker=".", label=f"{arch} {mode.split('-')[0]}")
    ax.set(xlabel="training tokens (M)", ylabel="val NELBO (nats/token)", title="small preset, built-in corpus")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{runs}/val_loss.png", dpi=120)
    print(f"plot: {runs}/val_loss.png")
except ImportError:
    pass
PY
