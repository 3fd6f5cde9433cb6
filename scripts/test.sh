#!/usr/bin/env bash
# Create/reuse the environments and run the whole test suite on both TransformerLens lines:
#   .venv      TransformerLens 4.x (TransformerBridge)             constraints.txt
#   .venv-tl3  TransformerLens 3.9 (HookedTransformer + bridge)    constraints-tl3.txt
# Usage: bash scripts/test.sh [pytest args...]
#   KCS_TL_LINES="4"      one line only (default "4 3")
#   KCS_TEST_WORKERS=N    pytest-xdist worker processes per line (default 2, one torch thread each;
#                         1 runs the tests in one process)
# What runs where (every test runs at least once):
#   4.x: everything (fast, slow, tl_independent), plus ruff, ruff format and mypy;
#   3.9: what depends on the TL line: the tests that are neither slow nor tl_independent, plus the
#        slow cross-backend tests (marker 'backends'). The slow tests (full bundled discovery,
#        GPT-2-small shape, sweeps) and the tl_independent ones (KG files, text, packaging, docs)
#        run no code that differs between the lines.
# The 3.9 environment installs in the background while ruff and mypy run. The exit status is
# non-zero when any install, check or test failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
WORKERS=${KCS_TEST_WORKERS:-2}
LINES=${KCS_TL_LINES:-4 3}
status=0

venv_of() { if [ "$1" = 4 ]; then echo .venv; else echo .venv-tl3; fi; }

install() {  # install LINE: the environment of one TL line (Ray, the extra of --executor ray, on 4.x only)
  local line=$1 venv cons extras t0
  venv=$(venv_of "$line")
  if [ "$line" = 4 ]; then cons=constraints.txt; extras=test,ray,track; else cons=constraints-tl3.txt; extras=test,track; fi
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  t0=$(date +%s)
  # --no-compile: byte-compiling every installed file (torch, transformers) costs more than the
  # modules the tests import compile on first use
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile -c "$cons" -e ".[$extras]"
  echo "== TransformerLens line $line: installed in $(($(date +%s) - t0)) s ($("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("transformer-lens"))'))"
}

run_tests() {  # run_tests LINE [pytest args...]
  local line=$1 venv t0 sel par=()
  shift
  venv=$(venv_of "$line")
  if [ "$line" = 4 ]; then sel=(); else sel=(-m "(not slow and not tl_independent) or backends"); fi
  # work units (tests/conftest.py): a test file stays on one worker (its module fixtures are built once),
  # each docs page is a unit of its own; the units with the most slow tests start first
  if [ "$WORKERS" -gt 1 ]; then par=(-n "$WORKERS" --dist loadgroup --no-loadscope-reorder); fi
  t0=$(date +%s)
  local rc=0
  if [ "$WORKERS" -gt 1 ]; then
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "${par[@]}" "${sel[@]}" "$@" || rc=$?
  else
    "$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "${sel[@]}" "$@" || rc=$?
  fi
  # pytest's 5 = no test selected: on the 3.9 line that is what the arguments asked for (e.g. a file of
  # tl_independent tests); anywhere else it stays a failure
  if [ "$rc" = 5 ] && [ "$line" != 4 ]; then echo "== TransformerLens line $line: none of the selected tests depends on the TL line"; rc=0; fi
  if [ "$rc" != 0 ]; then status=$rc; fi
  echo "== TransformerLens line $line: tests in $(($(date +%s) - t0)) s"
}

first=${LINES%% *}
install "$first" || status=1
bg=""
logs=$(mktemp -d)
for line in $LINES; do
  if [ "$line" != "$first" ]; then
    install "$line" > "$logs/install-$line.log" 2>&1 &
    bg="$bg $!:$line"
  fi
done
if [[ " $LINES " == *" 4 "* ]]; then  # lint, format and type checks (same tools on both lines: once)
  t0=$(date +%s)
  .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy kcs_lens cli analyses || status=1
  echo "== ruff, ruff format, mypy in $(($(date +%s) - t0)) s"
fi
for line in $LINES; do
  for job in $bg; do
    if [ "${job#*:}" = "$line" ]; then
      wait "${job%%:*}" || status=1
      cat "$logs/install-$line.log"
    fi
  done
  run_tests "$line" "$@"
done
exit $status
