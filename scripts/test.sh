#!/usr/bin/env bash
# Create/reuse the environments and run the whole test suite on both TransformerLens lines:
#   .venv      TransformerLens 4.x (TransformerBridge)             constraints.txt
#   .venv-tl3  TransformerLens 3.9 (HookedTransformer + bridge)    constraints-tl3.txt
# Usage: bash scripts/test.sh [pytest args...]      (KCS_TL_LINES="4" runs one line only)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
status=0
for line in ${KCS_TL_LINES:-4 3}; do
  # Ray (the optional extra of `kcs-lens sweep --executor ray`) is tested on the 4.x line only.
  if [ "$line" = 4 ]; then venv=.venv; cons=constraints.txt; extras=test,ray,track; else venv=.venv-tl3; cons=constraints-tl3.txt; extras=test,track; fi
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  t0=$(date +%s)
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$cons" -e ".[$extras]"
  echo "== TransformerLens line $line: installed in $(( $(date +%s) - t0 )) s ($("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("transformer-lens"))'))"
  # The slow tests (full bundled discovery, GPT-2-small shape) do not depend on the TL line: 4.x only.
  if [ "$line" = 4 ]; then
    sel=()
    # lint, format and type checks (same tools on both lines: once)
    "$venv/bin/ruff" check . && "$venv/bin/ruff" format --check . && "$venv/bin/mypy" kcs_lens cli analyses || status=1
  # on 3.x: the fast tests, plus the slow ones that need its HookedTransformer (cross-backend)
  else sel=(-m "not slow or backends"); fi
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${sel[@]}" "$@" || status=$?
done
exit $status
