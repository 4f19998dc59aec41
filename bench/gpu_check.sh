#!/usr/bin/env bash
# One GPU check (issue 16), under 10 minutes on one CUDA device (step limits sum to 540 s; 16 CPU cores
# assumed for the release's extraction); writes bench/results/gpu.json.
#
#   bench/gpu_check.sh              # on a machine with a CUDA GPU, from the repository root
#   bench/gpu_check.sh --dry-run    # every step tiny and on the CPU: checks the plumbing anywhere
#
# Steps (each under its own timeout; a failed or timed-out step is recorded and the rest still run):
#   1. nvidia-smi and torch's view of the device
#   2. training-step benchmark, both configurations (fmnist, cifar10): default (TrainConfig's "auto"
#      precision), fp32, bf16, second moments, bf16 + torch.compile (CUDA graphs via mode="reduce-overhead"
#      are not wired into the bench; compile is the closest lever it has), with each variant's memory
#   3. a 2,000-step Fashion-MNIST training run on CUDA from a release made here (60,000 images, epsilon 1),
#      then 2,000 samples and their FID against the real test split
#   4. the FID Inception pass, reference vs fast path, fp32 and bf16
# bench/results/gpu.json gets one entry per step (status, seconds, the command, its result file or the
# tail of its log), rewritten after every step, so a run cut short still leaves what it measured.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
# per-step limits are for an idle GPU machine; a dry run on a busy CPU gets LIMIT_SCALE (default 5) times more
LIMIT_SCALE=${LIMIT_SCALE:-$([[ $DRY == 1 ]] && echo 5 || echo 1)}
OUT=bench/results/gpu.json
[[ $DRY == 1 ]] && OUT=${GPU_CHECK_OUT:-$(mktemp -d)/gpu.json}
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$LOGS"
export OMP_WAIT_POLICY=PASSIVE PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
STEPS_JSON=$WORK/steps.jsonl
: > "$STEPS_JSON"
START=$(date +%s)

write_json() {  # gpu.json from the step records so far (called after every step and on exit)
  "$PY" - "$STEPS_JSON" "$OUT" "$DRY" "$START" <<'EOF'
import json, sys, time, platform
steps_file, out, dry, start = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
steps = [json.loads(l) for l in open(steps_file) if l.strip()]
try:
    import torch
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    torch_v = torch.__version__
except Exception as exc:  # torch itself broken: still write the file
    cuda, torch_v = None, f"import failed: {exc}"
doc = {"script": "bench/gpu_check.sh" + (" --dry-run" if dry else ""), "dry_run": dry,
       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(time.time() - start, 1),
       "machine": {"cuda": cuda, "torch": torch_v, "python": platform.python_version()},
       "complete": len(steps) > 0 and all(s["status"] == "ok" for s in steps), "steps": steps}
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
EOF
}
trap 'write_json || true' EXIT

# run_step NAME TIMEOUT_S RESULT_FILE(or -) COMMAND...: record status, seconds and result (or log tail)
run_step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE)) result=$3; shift 3
  local t0=$SECONDS status=ok rc=0
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status=timeout; elif [[ $rc -ne 0 ]]; then status="failed (exit $rc)"; fi
  "$PY" - "$name" "$status" "$((SECONDS - t0))" "$result" "$LOGS/$name.log" "$*" >> "$STEPS_JSON" <<'EOF'
import json, sys, os
name, status, secs, result, log, cmd = sys.argv[1:7]
rec = {"step": name, "status": status, "seconds": int(secs), "command": cmd}
if result != "-" and os.path.isfile(result):
    try:
        rec["result"] = json.load(open(result))
    except ValueError:
        rec["result_file"] = result
text = open(log, errors="replace").read()
if status != "ok" or result == "-":
    rec["log_tail"] = text[-3000:]
print(json.dumps(rec))
EOF
  write_json
  [[ $status == ok ]]
}

if [[ $DRY == 1 ]]; then
  DEVICE=cpu; TS_ARGS=(--steps 1 --repeats 1 --warmup 1 --peak-size 256); TS_CONFIGS=(fmnist)
  TS_OPTIONS=(default m1_and_m2)  # bf16 is emulated (slow) on most CPUs; compile needs minutes
  TRAIN_STEPS=4; N_SAMPLES=100; RELEASE_N=(--limit 200 --neighbouring replace-one); INC_N=4
else
  DEVICE=cuda; TS_ARGS=(--steps 20 --repeats 3 --warmup 5); TS_CONFIGS=(fmnist cifar10)
  TS_OPTIONS=(default fp32 bf16 m1_and_m2 bf16+m1_and_m2 bf16+compile)
  TRAIN_STEPS=2000; N_SAMPLES=2000; RELEASE_N=(); INC_N=500
  run_step nvidia_smi 20 - nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    || { echo "nvidia-smi failed: no usable NVIDIA GPU here (use --dry-run on a CPU machine)" >&2; exit 1; }
fi
run_step torch_device 30 - "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', \
torch.cuda.is_bf16_supported() if torch.cuda.is_available() else '-')" || true

# 2. training-step benchmark: both configurations, fp32 and bf16 (+ compile), results in their own file
TS_OUT=$WORK/ts
run_step training_step 200 "$TS_OUT.json" \
  "$PY" bench/bench_training_step.py --device "$DEVICE" --configs "${TS_CONFIGS[@]}" "${TS_ARGS[@]}" \
  --options "${TS_OPTIONS[@]}" --memory --out "$TS_OUT" || true

# 3. release -> 2,000-step train -> sample -> FID, on the device (mepf's own commands)
R=$WORK/run
mkdir -p "$R"
MEPF=${MEPF:-.venv/bin/mepf}
run_step release 90 - "$MEPF" release --dataset fashion-mnist --target-epsilon 1 --out "$R/release.h5" \
  "${RELEASE_N[@]}" || true
if [[ -f $R/release.h5 ]]; then
  run_step train_2000 120 "$R/gen/run.json" "$MEPF" train --release "$R/release.h5" --out "$R/gen" \
    --steps "$TRAIN_STEPS" --device "$DEVICE" --checkpoint-every 500 || true
  run_step sample_fid 100 "$R/report/metrics.json" bash -c "'$MEPF' sample --run '$R/gen' --n $N_SAMPLES \
    --out '$R/gen/synthetic.h5' && '$MEPF' evaluate --run '$R/gen' --synthetic '$R/gen/synthetic.h5' \
    --out '$R/report' --fid-samples $N_SAMPLES --fid-reference $N_SAMPLES --classifiers logreg --allow-small-fid" || true
fi

# 4. Inception pass: reference vs fast, fp32 and bf16
INC_OUT=$WORK/inception
run_step inception 60 "$INC_OUT.json" "$PY" bench/bench_inception.py --device "$DEVICE" --n "$INC_N" --repeats 2 \
  --gray --bf16 --out "$INC_OUT" || true

echo "wrote $OUT (logs in $LOGS)" >&2
