#!/usr/bin/env bash
# Everything GPU-only, in under 10 minutes on one CUDA GPU, then a short report:
#   1. the unit tests marked `cuda` (pytest -m cuda; they skip without a GPU),
#   2. benchmark parts b and d (python -m utils.kit.benchmark --only bd),
#   3. chapters 5, 6 and 9 (when it exists) executed on the GPU, outputs of their GPU cells shown.
#
#   bash scripts/gpu_check.sh            # report on stdout and in $GPU_CHECK_OUT/report.md
#
# Settings (environment): PYTHON (default python3), GPU_CHECK_OUT (default _build/gpu_check),
# GPU_CHECK_CHAPTERS (default "05 06 09"; empty: none), GPU_CHECK_FORCE=1 (run even without a GPU),
# WHEELS (a folder of wheels to install first, for a machine without network: torch-pruning,
# torchao, mlxtend, nbclient, nbformat, ipykernel, ... whatever `import` the check says is missing).
# Time limits per step (s): T_TESTS=60, T_BENCH=120, T_CHAPTER=130 (3 chapters: under 10 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-_build/gpu_check}
mkdir -p "$OUT"
export PRUNING_BOOK_QUIET=1 PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
REPORT="$OUT/report.md"
start=$SECONDS

if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl || exit 1
fi
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "torchvision", "numpy", "pandas", "matplotlib", "tqdm", "psutil", "mlxtend", "yaml",
        "sklearn", "torch_pruning", "torchao", "pytest", "hypothesis", "nbclient", "nbformat", "ipykernel"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python modules: $missing (install them, or put their wheels in \$WHEELS)"
  exit 1
fi

gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
torch_version=$("$PY" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)")
if [ -z "$gpu" ] && [ "${GPU_CHECK_FORCE:-0}" != "1" ]; then
  echo "gpu_check: no CUDA GPU visible to torch ($torch_version): nothing to check (GPU_CHECK_FORCE=1 runs anyway)"
  exit 2
fi
{
  echo "# GPU check"
  echo
  echo "- GPU: ${gpu:-none (forced run)}"
  echo "- torch: $torch_version; python: $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  echo "- CPU cores: $(nproc); date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
} > "$REPORT"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, one report line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local verdict=ok
  if [ $rc -eq 124 ]; then verdict="over its ${limit} s limit"; elif [ $rc -ne 0 ]; then verdict="FAILED (rc $rc)"; fi
  [ "$verdict" = ok ] || status=1
  echo "- $name: $verdict in $((SECONDS - t0)) s" >> "$REPORT"
  echo "gpu_check: $name: $verdict in $((SECONDS - t0)) s"
}

echo "## Steps" >> "$REPORT"
step cuda-tests "${T_TESTS:-60}" "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/
step benchmark-bd "${T_BENCH:-120}" "$PY" -m utils.kit.benchmark --only bd --json "$OUT/benchmark_bd.json"
for n in ${GPU_CHECK_CHAPTERS-05 06 09}; do
  for nb in chapters/"$n"-*.ipynb; do
    [ -e "$nb" ] || continue
    step "chapter-$n" "${T_CHAPTER:-130}" "$PY" - "$nb" "$OUT/$(basename "$nb")" <<'EOF'
import sys, time
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
t0 = time.perf_counter()
try:
    NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
finally:
    nbformat.write(nb, sys.argv[2])
    print(f"executed in {time.perf_counter() - t0:.0f} s")
for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code" and ("cuda" in cell.source or "GPU" in cell.source):
        text = "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))
        print(f"--- cell {i} (GPU) ---\n{text.strip()[:3000]}")
EOF
  done
done

{
  echo
  echo "## Results"
  echo
  echo '```'
  tail -n 3 "$OUT/cuda-tests.log"
  echo
  tail -n 60 "$OUT/benchmark-bd.log"
  for log in "$OUT"/chapter-*.log; do
    [ -e "$log" ] || continue
    echo
    echo "== $(basename "$log" .log)"
    grep -v "^\s*$" "$log" | tail -n 40
  done
  echo '```'
  echo
  echo "total: $((SECONDS - start)) s"
} >> "$REPORT"
cat "$REPORT"
exit $status
