#!/usr/bin/env bash
# bert-base on a GPU machine, in one call of at most 10 minutes:
#   source .device-tvm/setup.sh; bash benchmarks/gpu_bert.sh MACHINE
# At sequence 128 in fp16: the GPU with torch.compile against its plain loop and resident inputs, then
# a stream of mixed lengths (1..128) in sequence buckets against all at 128, then cpu,gpu0 against gpu0. First,
# whether the GPU's outputs match ONNX Runtime's on the CPU (benchmarks/bert_check.py).
# Results (a BENCHMARKS.md section per run, the profile table, bert.log with everything printed) land in $OUT.
machine=${1:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr " " "-")}
samples=${SAMPLES:-8192}
deadline=$((SECONDS + ${SESSION_SECONDS:-570}))
export HETERO_CACHE=/tmp/hcache
exec > >(tee -a "$OUT/bert.log") 2>&1
left() { echo $((deadline - SECONDS)); }
bench() {
  [ "$(left)" -gt 40 ] || { echo "skipped (no time left): $*"; return; }
  runs=$((runs + 1))
  begun=$SECONDS
  timeout "$(left)" python3 -m hetero.benchmark --network bert-base --sequence 128 --table "$OUT/$machine.json" \
    --markdown "$OUT/BENCHMARKS-bert-$runs.md" --machine "$machine" --budget 4 --profile-batches 1,16,64,256 \
    --precision fp16 --repeats 3 "$@" 2>&1 | grep -v '^profiling'
  echo "run $runs took $((SECONDS - begun)) s: $*"
}
nproc; nvidia-smi --query-gpu=name --format=csv
timeout 240 python3 -m benchmarks.bert_check --device gpu0 --engine torch-compile --precision fp16
bench --device gpu0 --engine torch-compile --batch 256 --stream "$samples"
bench --device gpu0 --engine torch-compile --lengths mixed --stream "$samples"
bench --device cpu,gpu0 --engine gpu0=torch-compile,cpu=onnxruntime --batch 256
# where time is left, the data path's staging compared on resnet-50 (benchmarks/gpu_stream.sh's first step)
if [ "$(left)" -gt 200 ]; then
  timeout $(($(left) - 10)) python3 -m benchmarks.feed_profile --network resnet-50 --samples 8192 --table "$OUT/$machine.json" \
    2>&1 | grep -v '^profiling' | tee "$OUT/feed.log"
fi
