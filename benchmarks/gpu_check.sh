#!/usr/bin/env bash
# Every GPU check in one call (mmlab.gpu_check), on a fresh GPU machine within 8 minutes:
#   benchmarks/gpu_check.sh OUT [--smoke] [--budget S] [--parts a,b]
# Installs nothing beyond the checkout itself (pip install --no-deps -e .) and the few pure-Python
# wheels the tests need when they are missing; torch and the rest are the machine's own.
# The GPU machines reach no network: missing wheels come from $MMLAB_WHEELS (default benchmarks/wheels), a folder
# filled beforehand on a connected machine, e.g.
#   pip download -d benchmarks/wheels pytest hypothesis fastcore nbdev execnb
# and carried along; without it pip gets one quick try (no retries) and the report shows what could not run.
# MMLAB_NO_INSTALL=1 skips the installs (a machine where the checkout is already importable, CI).
set -u
cd "$(dirname "$0")/.."
OUT="${1:?usage: benchmarks/gpu_check.sh OUT [--smoke] [--budget S] [--parts a,b]}"; shift
mkdir -p "$OUT"
t0=$(date +%s)
if [ "${MMLAB_NO_INSTALL:-0}" != 1 ]; then {
  python -m pip install --no-deps --no-build-isolation -q -e . || echo "pip install -e . failed: the checkout runs from PYTHONPATH"
  WHEELS="${MMLAB_WHEELS:-benchmarks/wheels}"
  if [ -d "$WHEELS" ]; then FROM=(--no-index --find-links "$WHEELS"); else FROM=(--retries 0 --timeout 5); fi
  for pkg in pytest hypothesis fastcore nbdev execnb; do
    python -c "import $pkg" 2>/dev/null || python -m pip install -q "${FROM[@]}" "$pkg" || echo "could not install $pkg"
  done
} > "$OUT/install.log" 2>&1; else echo "installs skipped (MMLAB_NO_INSTALL=1)" > "$OUT/install.log"; fi
echo "install: $(( $(date +%s) - t0 )) s (log: $OUT/install.log)"
# the Python command gets what is left of 8 minutes, less a margin for writing the report
left=$(( 480 - ($(date +%s) - t0) - 20 ))
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec python -m mmlab.gpu_check "$OUT" --budget "$left" "$@"
