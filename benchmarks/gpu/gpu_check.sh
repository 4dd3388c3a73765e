#!/usr/bin/env bash
# coopkit GPU check: one table of what runs on an NVIDIA GPU (and what the CPU fallback does).
#
#   bash benchmarks/gpu/gpu_check.sh            # on the GPU machine, from the repository root
#   GPU_CHECK_QUICK=1 bash benchmarks/gpu/gpu_check.sh   # the CPU path: small model and batches
#
# Setup: wheels in ./.whl (or $COOPKIT_WHEELS) are installed with pip --no-index --no-deps into
# /tmp/coopkit-site, which goes first on PYTHONPATH (the machine has torch, onnx and onnxruntime
# without CUDA; carry open_clip_torch, ftfy, wcwidth, for the CUDA provider onnxruntime-gpu, and openvino
# for section_5_engines.py's OpenVINO rows).
# A wheel too large to carry at once comes in parts named NAME.whl.part-NN in earlier calls
# (GPU_CHECK_STASH_ONLY=1: copy the parts to /tmp/coopkit-wheel-parts and stop); a wheel is
# assembled and installed once all its parts are there (NAME.whl.parts holds the count).
# benchmarks/gpu/pack_wheels.py downloads, slims and cuts the wheels and prints the calls.
# The repository itself is imported from the working tree (PYTHONPATH).
#
# Each section is one script, benchmarks/gpu/section_*.py, run in name order in its own Python
# process; each prints rows "ROW|section|what|value|note" that are gathered into one table here.
# To add a section, add a file. Output: stdout, and $OUT/gpu_check.md when OUT is set.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="${COOPKIT_WHEELS:-$ROOT/.whl}"
SITE=/tmp/coopkit-site
PARTS=/tmp/coopkit-wheel-parts
mkdir -p "$SITE" "$PARTS"
if [ -d "$WHEELS" ] && [ "$(cd "$WHEELS" && pwd)" != "$PARTS" ]; then
  for f in "$WHEELS"/*.whl "$WHEELS"/*.whl.part-* "$WHEELS"/*.whl.parts; do
    [ -e "$f" ] && cp "$f" "$PARTS/"
  done
fi
for count in "$PARTS"/*.whl.parts; do
  [ -e "$count" ] || continue
  wheel="${count%.parts}"
  have=$(ls "$wheel".part-* 2>/dev/null | wc -l)
  if [ "$have" -ge "$(cat "$count")" ] && [ ! -e "$wheel" ]; then
    cat "$wheel".part-* > "$wheel" && echo "# assembled $(basename "$wheel") from $have parts"
  fi
done
if [ -n "${GPU_CHECK_STASH_ONLY:-}" ]; then  # a stash call: keep the parts for the next call, run nothing
  ls -l "$PARTS"
  exit 0
fi
whls=$(ls "$PARTS"/*.whl 2>/dev/null)
if [ -n "$whls" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $whls \
    || echo "# pip could not install the carried wheels"
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LOG="$(mktemp)"
for section in "$ROOT"/benchmarks/gpu/section_*.py; do
  name="$(basename "$section" .py)"
  echo "# running $name"
  timeout "${GPU_CHECK_SECTION_TIMEOUT:-300}" "$PY" "$section" > "$LOG.part" 2>&1
  rc=$?
  cat "$LOG.part" >> "$LOG"
  grep -v '^ROW|' "$LOG.part" || true
  if [ "$rc" -ne 0 ]; then
    echo "ROW|${name#section_}|section failed|exit $rc|see the log above" >> "$LOG"
  fi
done
{
  echo "| section | what | value | note |"
  echo "|---|---|---|---|"
  grep '^ROW|' "$LOG" | awk -F'|' '{ printf "| %s | %s | %s | %s |\n", $2, $3, $4, $5 }'
} > "$LOG.md"
echo
cat "$LOG.md"
if [ -n "${OUT:-}" ]; then cp "$LOG.md" "$OUT/gpu_check.md"; cp "$LOG" "$OUT/gpu_check.log"; fi
