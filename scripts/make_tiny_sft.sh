#!/usr/bin/env bash
# How checkpoints/tiny-sft was made (issue 15): trajectory-splitting SFT of the tiny model on 1,000
# simulated expert trajectories of the synthetic task family, seed 0 — the miniature's arm C with
# 2,500 steps instead of 1,000 (docs/MINIATURE.md). ~12 min on one free core; CPU, 1 thread.
#   bash scripts/make_tiny_sft.sh [OUT]     # OUT defaults to runs/tiny-sft-make; the model: OUT/sft/final
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/tiny-sft-make}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# 1. data: the scripted expert (noise 0.05, flaw 0.65) on tasks 0..999 of family 0, simulated exactly
python -c "import factory, synthetic, sys; synthetic.simulate_distill(factory.FactoryConfig(out_dir=sys.argv[1], n_tasks=1000, seed=0))" "$OUT/data"
# 2. trajectory-splitting SFT (L_max = 384, packed rows of 1,536 tokens, 2 rows a step, lr 2e-3)
python klong.py --stage sft --run-dir "$OUT" --data "$OUT/data/trajectories.jsonl" --split-mode klong \
    --sft-steps 2500 --batch-rows 2 --warmup 50 --save-every 500 --seed 0 --context-len 384 \
    --max-new-tokens 24 --sandbox local
echo "made $OUT/sft/final (copy it to checkpoints/tiny-sft to ship it)"
