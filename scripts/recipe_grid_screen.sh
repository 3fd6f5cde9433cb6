#!/bin/bash
# Screening stage of the bundled-recipe grid (the tail-term recipe): one TargetKG, one seed, each grid point.
# Run from the repository root: nice -n 10 bash scripts/recipe_grid_screen.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-.venv/bin/python}
$PY bench/recipe_grid.py --points "${POINTS:-base,tail3,supp6,steps500,lam25-50,lr0.2}" --targets "${TARGETS:-building}" --seeds "${SEEDS:-84}" "$@"
