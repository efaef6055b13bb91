"""
The studies' report: every train.py run under a runs directory (each out_dir with its log.jsonl) as one
table row (final val NELBO, perplexity bound, infilling accuracy, train tokens/s), the learning-rate check
(runs under lr/), the mean over seeds, and a plot of val NELBO against training tokens.

    python study_report.py RUNS_DIR --title="small preset, built-in corpus"

When the runs end at different token counts (two model sizes, say), the table adds each run's val NELBO
at the largest token count that every run was evaluated at, so that they can be read at equal tokens.
"""

import argparse
import glob
import json
import math
import os
import re
import statistics

ARCHS = ("transformer", "mamba", "hybrid")


def read_run(path):
    log = [json.loads(line) for line in open(path)]
    evals = [r for r in log if "val_nelbo" in r]
    speed = [r["tok_s"] for r in log if "tok_s" in r]
    speed = speed[2:] or speed  # past the first logs, which include start-up
    infill = next((r for r in reversed(log) if "infill_acc_15" in r), None)  # None: the run did not finish
    curve = {e["tokens"]: e["val_nelbo"] for e in evals}
    tokens = max(curve, default=0)
    return dict(curve=curve, tokens=tokens, nelbo=curve.get(tokens, float("nan")),
                tok_s=statistics.median(speed) if speed else 0.0,
                acc=f"{infill['infill_acc_15']:.1%} | {infill['infill_acc_50']:.1%}" if infill else "unfinished | unfinished")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs")
    p.add_argument("--title", default="", help="the plot's title")
    args = p.parse_args()
    runs, grid = {}, {}
    for path in sorted(glob.glob(os.path.join(args.runs, "**", "log.jsonl"), recursive=True)):
        name = os.path.relpath(os.path.dirname(path), args.runs)
        run = read_run(path)
        if run["curve"]:
            (grid if name.startswith("lr" + os.sep) else runs)[name] = run
    if not runs:
        raise SystemExit(f"no evaluated runs under {args.runs}")
    common = set.intersection(*(set(r["curve"]) for r in runs.values()))
    at = max(common) if common and any(r["tokens"] != max(common) for r in runs.values()) else None
    print("| run | tokens | val NELBO (nats/token) | perplexity bound | infill acc. 15% | infill acc. 50% | train tokens/s |"
          + (f" val NELBO at {at / 1e6:.1f}M tokens |" if at else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if at else ""))
    for name, r in runs.items():
        print(f"| {name} | {r['tokens'] / 1e6:.1f}M | {r['nelbo']:.3f} | {math.exp(r['nelbo']):.1f} | {r['acc']} | "
              f"{r['tok_s']:,.0f} |" + (f" {r['curve'][at]:.3f} |" if at else ""))
    for name, r in grid.items():
        print(f"learning-rate check: {name}: val NELBO {r['nelbo']:.3f} at {r['tokens'] / 1e6:.1f}M tokens")
    seeds = {}
    for name, r in runs.items():
        m = re.fullmatch(r"(.*)-s\d+", name)
        if m:
            seeds.setdefault(m.group(1), []).append(r["nelbo"])
    for group, values in seeds.items():
        if len(values) > 1:
            print(f"{group}: val NELBO {statistics.mean(values):.3f} +- {statistics.stdev(values):.3f} over {len(values)} seeds")
    plot(runs, args)


def plot(runs, args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = {}  # one line style per kind of run (the name less its arch)
    for name, r in runs.items():
        arch = next((a for a in ARCHS if a in os.path.basename(name)), None)
        kind = name.replace(arch, "") if arch else name
        style = styles.setdefault(kind, ("-", "--", ":", "-.")[len(styles) % 4])
        tokens = sorted(r["curve"])
        ax.plot([t / 1e6 for t in tokens], [r["curve"][t] for t in tokens], style, marker=".", label=name,
                color=f"C{ARCHS.index(arch)}" if arch else None)
    ax.set(xlabel="training tokens (M)", ylabel="val NELBO (nats/token)", title=args.title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(args.runs, "val_loss.png")
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
