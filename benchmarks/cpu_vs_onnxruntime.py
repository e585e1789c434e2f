"""hetero's compiled CPU engine against onnxruntime's CPU execution provider, img/s.

    python benchmarks/cpu_vs_onnxruntime.py --ort-python /tmp/torchvenv/bin/python
    python benchmarks/cpu_vs_onnxruntime.py --networks resnet-50 --batches 1 --threads 1

--ort-python: a venv outside the project with torch, torchvision, onnx and onnxruntime, e.g.
    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/pip install --no-deps torchvision==0.28.0
    /tmp/torchvenv/bin/pip install onnxruntime onnx

The same architectures come from hetero/torch_models.py (torchvision, random weights;
mobilenet = MobileNet v1), exported once per (network, batch) with torch.onnx.export
(legacy TorchScript exporter, fixed batch) into --onnx-dir and run by
onnxruntime.InferenceSession(providers=["CPUExecutionProvider"]) with
intra_op_num_threads = threads and all graph optimizations.  hetero's side is
``load_engine(get_network(name), parse_devices("cpu")[0]).infer(x)`` (compiled with
hetero.cpu_schedule, cached on disk) in a child process started with
TVM_NUM_THREADS = threads.  For every network and thread count the two sides are
measured back to back (hetero first, then onnxruntime), each in a fresh process.
hetero's package is copied to a temporary folder at start and every child imports
that copy, so all hetero numbers of one run come from the same schedules even if
the working tree changes meanwhile; the table names hetero's BUILD_ID (digest of
its *_schedule.py sources, part of the compile cache key).

Clock: at 1 thread, process CPU time (robust on this shared 2-core machine); at
more threads, wall time (CPU time would charge spinning pool threads).  Each
number is the median of --repeats calls after one warm-up call; * marks a number
measured while other processes used >10% of the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from cpu_schedule import BUSY, TORCH_PREAMBLE, ForeignLoad

ORT_SCRIPT = TORCH_PREAMBLE + r"""
import numpy as np
import onnxruntime as ort
onnx_dir, threads, repeats, clock = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
clk = time.process_time if clock == "cpu" else time.perf_counter
torch.set_num_threads(threads)
os.makedirs(onnx_dir, exist_ok=True)
out = {}
for item in sys.argv[6:]:
    net, batch = item.split(":"); batch = int(batch)
    path = os.path.join(onnx_dir, f"{net}-b{batch}.onnx")
    if not os.path.exists(path):
        model = tm.torch_model(net).eval()
        with torch.no_grad():
            torch.onnx.export(model, (torch.randn(batch, 3, 224, 224),), path + ".tmp",
                              input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
        os.replace(path + ".tmp", path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    sess.run(None, {"x": x})
    ts = []
    for _ in range(repeats):
        t0 = clk(); sess.run(None, {"x": x}); ts.append(clk() - t0)
    out[item] = ts
print(json.dumps({"ort": ort.__version__, "times": out}))
"""


def hetero_worker(items: list[str], repeats: int, clock: str, src: str) -> None:
    """Child process (TVM_NUM_THREADS already set): time hetero's CPU engine, print JSON."""
    sys.path.insert(0, src)
    from hetero import get_network, parse_devices
    from hetero.compile import BUILD_ID
    from hetero.execute import load_engine

    clk = time.process_time if clock == "cpu" else time.perf_counter
    device = parse_devices("cpu")[0]
    out = {}
    for item in items:
        name, batch = item.split(":")
        net = get_network(name)
        engine = load_engine(net, device)
        x = net.random_input(int(batch))
        engine.infer(x)  # warm-up (and compile, if not cached)
        ts = []
        for _ in range(repeats):
            t0 = clk()
            engine.infer(x)
            ts.append(clk() - t0)
        out[item] = ts
    print(json.dumps({"times": out, "build": BUILD_ID}))


def _run(cmd: list[str], env: dict | None = None) -> tuple[dict, float]:
    with ForeignLoad() as load:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), load.share


def _median(ts: list[float]) -> float:
    return sorted(ts)[len(ts) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", default="resnet-18,resnet-50,mobilenet,vgg-16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ort-python", default="/tmp/torchvenv/bin/python")
    ap.add_argument("--onnx-dir", default=str(Path.home() / ".cache" / "hetero" / "onnx-export"))
    ap.add_argument("--markdown", action="store_true", help="print the final table as Markdown")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--clock", default="wall", help=argparse.SUPPRESS)
    ap.add_argument("--src", default=str(ROOT), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        hetero_worker(args.worker, args.repeats, args.clock, args.src)
        return 0
    with tempfile.TemporaryDirectory(prefix="hetero-src-") as src:
        shutil.copytree(ROOT / "hetero", Path(src) / "hetero",
                        ignore=shutil.ignore_patterns("__pycache__"))
        return _compare(args, src)


def _compare(args: argparse.Namespace, src: str) -> int:

    nets = [n for n in args.networks.split(",") if n]
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    ort_version = build = "?"
    for net in nets:
        for threads in [int(t) for t in args.threads.split(",")]:
            clock = "cpu" if threads == 1 else "wall"
            items = [f"{net}:{b}" for b in batches]
            env = dict(os.environ, TVM_NUM_THREADS=str(threads))
            het, het_load = _run([sys.executable, __file__, "--repeats", str(args.repeats),
                                  "--clock", clock, "--src", src, "--worker", *items], env)
            ort, ort_load = _run([args.ort_python, "-c", ORT_SCRIPT, str(ROOT / "hetero" / "torch_models.py"),
                                  args.onnx_dir, str(threads), str(args.repeats), clock, *items],
                                 dict(os.environ, OMP_NUM_THREADS=str(threads)))
            ort_version, build = ort["ort"], het["build"]
            for b in batches:
                h = b / _median(het["times"][f"{net}:{b}"])
                o = b / _median(ort["times"][f"{net}:{b}"])
                row = (net, b, threads, clock, h, het_load > BUSY, o, ort_load > BUSY)
                rows.append(row)
                print(f"{net:10s} batch {b} threads {threads} ({clock}): hetero {h:7.2f} img/s, "
                      f"onnxruntime {o:7.2f} img/s, ratio {h / o:5.2f}", flush=True)

    print(f"\nhetero (TVM, hetero.cpu_schedule, BUILD_ID {build}) vs onnxruntime {ort_version} CPUExecutionProvider; "
          f"median of {args.repeats}; clock: cpu = process CPU time, wall = wall time; "
          f"* = other processes used >{BUSY:.0%} of the CPUs meanwhile\n")
    head = ["network", "batch", "threads", "clock", "hetero img/s", "onnxruntime img/s", "hetero/onnxruntime"]
    body = [[n, str(b), str(t), c, f"{h:.2f}" + ("*" if hb else ""), f"{o:.2f}" + ("*" if ob else ""),
             f"{h / o:.2f}"] for n, b, t, c, h, hb, o, ob in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    if args.markdown:
        print("| " + " | ".join(x.ljust(w) for x, w in zip(head, widths)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in body:
            print("| " + " | ".join(x.rjust(w) if i else x.ljust(w)
                                    for i, (x, w) in enumerate(zip(r, widths))) + " |")
    else:
        print("  ".join(x.rjust(w) for x, w in zip(head, widths)))
        for r in body:
            print("  ".join(x.rjust(w) for x, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
