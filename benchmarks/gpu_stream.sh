#!/usr/bin/env bash
# The data path's measurements on a GPU machine, in one call of at most 10 minutes:
#   source .device-tvm/setup.sh; bash benchmarks/gpu_stream.sh MACHINE
# First where a GPU stream spends its time and which way of staging its inputs is fastest
# (benchmarks/feed_profile.py); then, staged that way, the GPU streaming a host array and a .npy against
# torch.compile's plain loop and its compute on resident inputs (hetero.benchmark --stream), resnet-50 over
# cpu,gpu0 against gpu0 alone, and a first --engine auto run from empty caches.
# Results (a BENCHMARKS.md section per run, profile table, stream.log with everything printed) land in $OUT.
machine=${1:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr " " "-")}
samples=${SAMPLES:-16384}
deadline=$((SECONDS + ${SESSION_SECONDS:-570}))
export HETERO_CACHE=/tmp/hcache
exec > >(tee -a "$OUT/stream.log") 2>&1
left() { echo $((deadline - SECONDS)); }
bench() {
  [ "$(left)" -gt 40 ] || { echo "skipped (no time left): $*"; return; }
  runs=$((runs + 1))
  timeout "$(left)" python3 -m hetero.benchmark --table "$OUT/$machine.json" --markdown "$OUT/BENCHMARKS-$runs.md" \
    --machine "$machine" --budget 4 --profile-batches 1,16,64,256 --precision fp16 --stream "$samples" --repeats 3 \
    "$@" 2>&1 | grep -v '^profiling'
}
nproc; nvidia-smi --query-gpu=name,pcie.link.gen.max,pcie.link.width.max --format=csv
timeout 300 python3 -m benchmarks.feed_profile --network "${NETWORK:-resnet-50}" --samples 8192 --table "$OUT/$machine.json" \
  2>&1 | grep -v '^profiling' | tee "$OUT/feed.log"
HETERO_STAGING=$(grep -o 'fastest staging: [a-z]*' "$OUT/feed.log" | tail -1 | cut -d' ' -f3)
export HETERO_STAGING=${HETERO_STAGING:-copy}
echo "staging: $HETERO_STAGING"
bench --network "${NETWORK:-resnet-50}" --device gpu0 --engine torch-compile
bench --network resnet-50 --device cpu,gpu0 --engine gpu0=torch-compile,cpu=onnxruntime
# a first --engine auto run: nothing compiled, nothing profiled (target: 60 s)
if [ "$(left)" -gt 100 ]; then
  begun=$SECONDS
  HETERO_CACHE=/tmp/fresh-cache TORCHINDUCTOR_CACHE_DIR=/tmp/fresh-inductor TRITON_CACHE_DIR=/tmp/fresh-triton timeout "$(left)" python3 Inference.py --network resnet-50 --device gpu0 --batch 256 \
    --precision fp16 --table /tmp/fresh-table.json --no-progress | tail -n 12
  echo "first --engine auto run of resnet-50 on gpu0: $((SECONDS - begun)) s (exit ${PIPESTATUS[0]})"
fi
