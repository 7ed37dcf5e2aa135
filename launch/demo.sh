#!/usr/bin/env bash
# The main job on the shipped digits data, end to end on CPU: set up .venv, write the WebDataset shards,
# train the paper's model with the real deepspeed launcher (a rank per GPU, else 2), evaluate bits/dim on the held-out
# digits, write sample grids and an fp32 model.  bash launch/demo.sh [key=value overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
OUT=${OUT:-runs/default}
if [[ ! -f data/digits/manifest.json ]]; then
  nvp-dist shards digits - data/digits --no-progress
fi
if [[ -d $OUT/checkpoints ]]; then
  echo "demo: $OUT already holds a run; continuing it (rm -r $OUT to start over)"
fi
# One rank per visible GPU (CUDA_VISIBLE_DEVICES respected), else 2 CPU ranks; the line says which.
# (A separate assignment, so that a failure there stops the demo with its message: `read <<<` would hide it.)
choice=$(python -m nvp_dist.train.distributed)
read -r ranks accelerator launch_args <<< "$choice"
export DS_ACCELERATOR=$accelerator
# One thread per rank: the launcher sets none, and oversubscribed cores run ten times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 ))}
# shellcheck disable=SC2086  # launch_args: the launcher options, split on purpose
deepspeed $launch_args launch/train.py --config configs/default.yaml "train.out_dir=$OUT" --resume auto "$@"
echo "demo: run directory $OUT (samples/, checkpoints/, metrics.jsonl, model_fp32.pt)"
# The authors' visualisation page for this model (its test bits/dim read from metrics.jsonl): open it
# from disk in any browser. About 4-15 s on 2 CPU cores.
nvp-dist figures page --checkpoint "$OUT/model_fp32.pt" --out "$OUT/page"
echo "demo: visualisation page $OUT/page/index.html"
