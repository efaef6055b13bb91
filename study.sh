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
python study_report.py $runs --title="small preset, built-in corpus"
