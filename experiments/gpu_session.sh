#!/usr/bin/env bash
# The GPU bench as one prepared command for a device session with a fixed budget (this project's device tool:
# 15 minutes of device time in all, machine start included, 10 minutes a command). Rows run most important
# first (the issue's targets: dense 124M / 354M, Muon vs AdamW, MoE, MoR, decode; then the extra comparisons);
# no row starts after DEADLINE_S seconds, and the rows left are listed as skipped, so the command ends with a
# complete table well inside its limit. The JSON is rewritten after every row.
#
#   bash experiments/gpu_session.sh                # on the GPU machine: writes $OUT/gpu.json, $OUT/bench.log
#   DRY=1 OUT=/tmp/g bash experiments/gpu_session.sh   # the same rows at tiny shapes on the CPU (rehearsal)
#   MODE=study bash experiments/gpu_session.sh     # the gpu-quick study instead (issue: < 8 min on one H100):
#       no run starts after TRAIN_LIMIT_S (default 360 s; --train-limit-s), then the study fits and reports
#       what finished within its hard limit STUDY_LIMIT_S (default 530 s). Only if that limit cuts it before
#       its report are the finished runs refitted (--fit-only on the CPU, at most FIT_LIMIT_S = 40 s). The
#       study lives in runs/ (outside $OUT: the device returns at most 8 files, two folders deep); report.json,
#       report.md and study.log are copied to $OUT. Exit status: the study's, or 3 when its hard limit cut it
#       (not 124, which the device tool reads as the command's own time-out). With DRY=1 it rehearses the
#       preset (every run a few steps; experiments/rehearsal.py). Give the device call timeout_s 600.
#
# One mode per session: 15 minutes of device time hold a machine start (1-2 min) and one of the two
# commands (bench: rows start until DEADLINE_S = 390 s after this script started, and a row takes up to
# ~150 s; study: 530 + 10 + 40 + 5 = 585 s at most), not both.
#
# It needs no install: the GPU image has jax (CUDA), flax, optax, orbax-checkpoint, scipy, matplotlib and
# tensorboard, and the repository root goes on PYTHONPATH. A row that takes longer than the deadline's slack
# (compile + measure; each row reports its wall_s) can still be cut by the command's own limit: give the
# device call a timeout_s of at least DEADLINE_S + 150.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_session}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the whole card for the 354m rows (JAX's default pool is 75%; dense-354m-adamw-noremat needs ~57 GiB)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.92}
py=${PYTHON:-python3}
rows=(
  dense-124m-adamw dense-354m-adamw dense-354m-muon moe-124m-adamw mor-124m-ec mor-124m-looped-eq
  decode-dense-b1 decode-dense-b64 decode-mla-b1 decode-mla-b64 decode-mor-kvshare-b1 decode-mor-kvshare-b64
  dense-354m-muon-nsfp32 dense-354m-adamw-acc8 dense-354m-muon-acc8 mor-124m-looped-full
  decode-mor-kvshare-noskip-b1 dense-354m-adamw-noremat
)
dry=()
[ -n "${DRY:-}" ] && dry=(--dry)
if [ "${MODE:-bench}" = study ]; then
  study="runs/gq${DRY:+-dry}"
  timeout -k 10 -s INT "${STUDY_LIMIT_S:-530}" "$py" -m experiments.study --preset gpu-quick --out "$study" \
    "${dry[@]}" --train-limit-s "${TRAIN_LIMIT_S:-360}" 2>&1 | tee "$out/study.log"
  rc=${PIPESTATUS[0]}
  cp "$study"/report.json "$study"/report.md "$out"/ 2>/dev/null
  if [ ! -f "$study/report.json" ]; then  # cut before its report: fit what finished, on the CPU (no CUDA start)
    echo "[gpu_session] study stopped (rc $rc) before its report; refitting the finished runs" | tee -a "$out/study.log"
    JAX_PLATFORMS=cpu timeout -k 5 "${FIT_LIMIT_S:-40}" "$py" -m experiments.study --preset gpu-quick \
      --out "$study" "${dry[@]}" --fit-only 2>&1 | tee -a "$out/study.log"
    cp "$study"/report.json "$study"/report.md "$out"/ 2>/dev/null
  fi
  [ "$rc" = 124 ] && rc=3  # our own limit, not the device tool's time-out
  exit "$rc"
fi
{ "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax",
optax.__version__, jax.devices())'; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null
} 2>&1 | tee "$out/env.log"
# The deadline counts from this script's start (the probe above starts CUDA too), not the bench's own.
"$py" -m experiments.bench --suite gpu "${dry[@]}" --deadline-s "$(( ${DEADLINE_S:-390} - SECONDS ))" \
  --rows "$(IFS=,; echo "${rows[*]}")" --json "$out/gpu.json" 2>&1 | tee "$out/bench.log"
