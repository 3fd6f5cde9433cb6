#!/usr/bin/env bash
# Discovery-step cost on one CUDA GPU: gpt2-medium shape (random init), the paper's batch
# (TargetKG 250 x 12, ControlKG 250 x 12, ControlLM 10 x 512), bf16 autocast and fp32, the
# reference Objective and FastObjective against a dense Adam step; each configuration prints one
# JSON line (bench/step.py) with `extrapolated_h`: the wall time of 40,000 steps at that step
# time (training steps only; evaluation every 100 steps and checkpoints come on top).
#
# Needs a CUDA build of torch in the environment that runs it (PY=/path/to/python; the
# constraints file pins the CPU wheel) and the package importable (`pip install -e .` or
# PYTHONPATH=.). No network: models are random-init shapes, batches random tokens.
#
#   bash bench/gpu_step.sh                 # results appended to bench/results/gpu.jsonl
#   SHAPE=gpt2-small REPEATS=3 bash bench/gpu_step.sh
#   STUDY=0 bash bench/gpu_step.sh         # without the packed-study comparison (bench/pack_study.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SHAPE=${SHAPE:-gpt2-medium}
WARMUP=${WARMUP:-2}
REPEATS=${REPEATS:-5}
IMPL=${IMPL:-reference,fast}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch (a CPU build of torch?)"
print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
EOF
for DTYPE in bf16 fp32; do
  "$PY" bench/step.py --shape "$SHAPE" --kg-batch 250 --kg-len 12 --lm-batch 10 --lm-len 512 \
    --device cuda --dtype "$DTYPE" --impl "$IMPL" --warmup "$WARMUP" --repeats "$REPEATS" \
    --extrapolate-steps 40000 --verbose | tee -a "$OUT/gpu.jsonl"
done
# A packed study on the GPU (STUDY=0 skips it): the bundled 5 TargetKGs x 3 seeds with one cell per
# task and in one pack of 15 cells (one process, one loaded model), side by side
# (bench/pack_study.py: wall times, their ratio, the load, same selection and masks per cell).
if [ "${STUDY:-1}" = 1 ]; then
  "$PY" bench/pack_study.py --device cuda --workers 1 --pack 15 --results "$OUT/pack_study_gpu.jsonl"
fi
