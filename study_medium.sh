#!/usr/bin/env bash
# The medium-preset study: DiffuMamba, DiffuMamba-H and the Transformer at about 124M parameters,
# full-sequence, on a large directory of text (a Python site-packages, say: a few hundred MB of source), in
# iterations of 32 x 512 tokens and three stages:
#   lr/      each arch at lr 5e-4, 1e-3 and 2e-3 for 300 iterations (4.9M tokens);
#   small/   the small preset (34M parameters) as study.sh trains it (600 iterations at lr 1e-3) on the
#            same data, to read the two sizes at equal tokens;
#   medium/  each arch at its best lr from lr/ for 3100 iterations (50.8M tokens);
# then a short sample from each medium model, the report (study_report.py) and each arch's training speed
# alone (bench.py). The runs of a stage share the GPU three at a time: an eager step leaves it idle part of
# the time, so together they finish sooner, and their logged tokens/s are not each arch's speed alone.
# Stopped (Ctrl-C, a time limit), the runs save checkpoints; run it again and it goes on where it stopped.
#     bash study_medium.sh DATA [runs_dir] [more train.py flags]
set -euo pipefail
data=$(realpath "$1")
runs=$(realpath -m "${2:-runs-medium}")
shift $(( $# < 2 ? $# : 2 ))
extra=("$@")
cd "$(dirname "$0")"
trap 'trap - INT TERM; echo "stopping: the runs save their checkpoints" >&2; kill -TERM $(jobs -p) 2>/dev/null || true; wait
      exit 130' INT TERM
python -c "import data, sys; data.prepare(sys.argv[1], 512)" "$data"  # tokenise once, before the runs share it

finished() { grep -qs infill_acc_15 "$1/log.jsonl"; }
train() {  # out_dir, train.py flags: skipped when finished, resumed when interrupted; run as a job, whose
  finished "$1" && return  # process train.py then becomes (exec), so that a stop waits for its checkpoint
  mkdir -p "$1"
  exec python train.py --out_dir="$1" --data="$data" $([ -f "$1/ckpt.pt" ] && echo --resume) "${@:2}" "${extra[@]}" \
    >> "$1/train.txt" 2>&1
}
stage() {  # every "out_dir flags..." given, three at a time; stops the study if one did not finish
  local spec
  for spec in "$@"; do
    while (( $(jobs -rp | wc -l) >= 3 )); do wait -n || true; done
    train $spec &
  done
  wait
  for spec in "$@"; do
    finished "${spec%% *}" || { echo "${spec%% *} did not finish: see its train.txt" >&2; exit 1; }
  done
}
best_lr() {  # the learning rate of the arch's lowest final val NELBO in lr/
  python -c "import glob, math, os, sys, study_report
score = lambda p: float('inf') if math.isnan(v := study_report.read_run(p)['nelbo']) else v  # NaN: diverged, the worst
best = min(glob.glob(f'{sys.argv[1]}/lr/{sys.argv[2]}-lr*/log.jsonl'), key=score)
if score(best) == float('inf'):
    sys.exit(f'every learning rate of {sys.argv[2]} diverged: see {sys.argv[1]}/lr')
print(os.path.basename(os.path.dirname(best)).split('-lr')[-1])" "$runs" "$1"
}

archs="transformer mamba hybrid"
specs=()
for lr in 5e-4 1e-3 2e-3; do
  for arch in $archs; do
    specs+=("$runs/lr/$arch-lr$lr --preset=medium --arch=$arch --lr=$lr --max_iters=300 --eval_interval=300")
  done
done
for arch in $archs; do
  specs+=("$runs/small/$arch-full --preset=small --arch=$arch --lr=1e-3 --max_iters=600 --eval_interval=60")
done
stage "${specs[@]}"
specs=()
for arch in $archs; do
  specs+=("$runs/medium/$arch-full --preset=medium --arch=$arch --lr=$(best_lr $arch) --max_iters=3100 --eval_interval=300")
done
stage "${specs[@]}"
for arch in $archs; do
  out=$runs/medium/$arch-full
  [ -s "$out/sample.txt" ] || python sample.py --out_dir="$out" --num_samples=1 --length=128 > "$out/sample.txt"
done
python study_report.py "$runs" --title="medium and small presets, $(basename "$data")"
[ -s "$runs/bench/bench.md" ] || python bench.py --train --preset=medium --train_lengths=512 --train_tokens=16384 \
  --compile_modes= --out_dir="$runs/bench"
