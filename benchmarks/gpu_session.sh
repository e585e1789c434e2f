#!/usr/bin/env bash
# The GPU-machine measurements in one call of at most 10 minutes:
#   source .device-tvm/setup.sh; bash benchmarks/gpu_session.sh MACHINE DEVICES
# Results (BENCHMARKS.md section, profile table, session.log with everything printed) land in $OUT:
# the call's own output keeps only its last 12,000 characters.
# Every engine installed there is measured, the baselines users run among them (hetero.benchmark);
# a run still going at the deadline is killed and writes no section.
machine=${1:-nvidia-h200}
devices=${2:-cpu,gpu0}
deadline=$((SECONDS + ${SESSION_SECONDS:-560}))
export HETERO_CACHE=/tmp/hcache
exec > >(tee -a "$OUT/session.log") 2>&1
left() { echo $((deadline - SECONDS)); }
bench() {
  [ "$(left)" -gt 20 ] || { echo "skipped (no time left): $*"; return; }
  timeout "$(left)" python3 -m hetero.benchmark --device "$devices" --table "$OUT/$machine.json" \
    --markdown "$OUT/BENCHMARKS.md" --machine "$machine" --budget 8 "$@" 2>&1 | grep -v '^profiling'
}
python3 -c 'from hetero.cli import inference; inference(["--list-devices"])'
# a stream over every device against the sum of each device streaming alone (target: 0.95 or more);
# the CPU alone takes about a minute of it
bench --network resnet-50 --batch 256 --precision fp16 --repeats 1 --stream 5000
timeout 60 python3 -m benchmarks.gpu_upload --repeats 10
for network in resnet-50 mobilenet vgg-16; do bench --network $network --batch 100 --repeats 3; done
[ "$(left)" -gt 60 ] && timeout 60 python3 -m benchmarks.feeder_starvation resnet-50
for network in resnet-50 mobilenet vgg-16; do
  bench --network $network --batch 1000 --repeats 1 --warmup 1
done
