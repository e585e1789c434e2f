#!/usr/bin/env bash
# GPUs on Ray nodes, on a GPU machine (a second call while it is warm, carrying .device-ray):
#   export PYTHONPATH=/tmp/site:$PWD; source .device-ray/setup.sh; bash benchmarks/gpu_ray.sh
# The same stream over cpu,gpu0 run by Inference.py on this machine and through a local Ray cluster
# (--ray auto: a one-node cluster whose node has the GPU); the outputs are compared sample by sample.
export HETERO_CACHE=/tmp/hcache PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/ray.log") 2>&1
network=${NETWORK:-resnet-18}
python3 - "$network" <<'PY'
import sys
import numpy as np
import hetero
net = hetero.get_network(sys.argv[1])
np.save("/tmp/ray-x.npy", net.random_input(4096, seed=3))
PY
common=(--network "$network" --device cpu,gpu0 --precision fp16 --engine gpu0=torch-compile,cpu=onnxruntime
        --profile-batches 1,16,64,256 --budget 4 --table "$OUT/ray-table.json" --input /tmp/ray-x.npy --stream
        --no-progress --json)
timeout 240 python3 Inference.py "${common[@]}" --output /tmp/ray-local.npy >"$OUT/ray-local.json"
echo "local exit $?"
timeout 240 python3 Inference.py "${common[@]}" --output /tmp/ray-cluster.npy --ray auto >"$OUT/ray-cluster.json"
echo "ray exit $?"
timeout 60 python3 Inference.py --list-devices --ray auto
python3 - <<'PY'
import json
import numpy as np
local, cluster = np.load("/tmp/ray-local.npy"), np.load("/tmp/ray-cluster.npy")
diff = np.abs(local - cluster)
print(f"outputs {local.shape}: bitwise equal {np.array_equal(local, cluster)}; max |diff| {diff.max():.3g}; "
      f"argmax equal {np.mean(local.argmax(1) == cluster.argmax(1)):.4f}")
for name in ("ray-local", "ray-cluster"):
    report = json.load(open(f"{__import__('os').environ['OUT']}/{name}.json"))
    print(name, f"{report['throughput_img_s']:.0f} img/s",
          [(d["device"], d["engine"], d["samples"]) for d in report["devices"]])
PY
