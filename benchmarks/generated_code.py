"""What hetero's schedules generate, for every network and precision, to show that a change to the
schedules' code changes no kernel (or exactly the kernels it meant to).

For each network and configuration it writes the scheduled TIR of every kernel (the shape function
aside: TVM orders its statements differently from run to run) and, for CUDA, the CUDA C source TVM
generates; no GPU and no nvcc are needed (the source is kept in place of the compiled PTX). A digest of
each goes into ``digests.json``; ``--compare`` another run's folder to list what differs.

    python -m benchmarks.generated_code OUT [--networks a,b] [--configs cpu,sm90a-tf32] [--compare BEFORE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import tvm
import tvm_ffi
from tvm import relax

from hetero.compile import relax_pipeline, tir_pipeline
from hetero.devices import Device
from hetero.models import get_network, network_names
from hetero.schedules.cuda.wgmma import with_wgmma


def _cuda(arch: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": arch, "max_threads_per_block": 1024,
                              "max_shared_memory_per_block": 49152, "thread_warp_size": 32,
                              "max_num_threads": 1024, "l2_cache_size_bytes": 62914560},
                             _CPU)


_CPU = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512", "num-cores": 16})
SEQUENCE = 128  # the length a network of open sequence is built at
CONFIGS = {  # name: (target, precision); sm_90 as hetero targets it (sm_90a, with wgmma), sm_75 for wmma
    "cpu": (_CPU, "fp32"),
    "sm90a-fp32": (with_wgmma(_cuda("sm_90")), "fp32"),
    "sm90a-tf32": (with_wgmma(_cuda("sm_90")), "tf32"),
    "sm90a-fp16": (with_wgmma(_cuda("sm_90")), "fp16"),
    "sm75-fp16": (_cuda("sm_75"), "fp16"),
}


@tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
def _source_in_place_of_ptx(code, *_):
    return code.encode()


def generated(network: str, config: str) -> str:
    """The scheduled kernels of ``network`` for ``config``, and for CUDA the source generated from them."""
    target, precision = CONFIGS[config]
    device = Device("generated", target.kind.name.replace("llvm", "cpu"), 0, "none", target, precision=precision)
    module = _module(network)
    with target, tvm.transform.PassContext(opt_level=3):
        scheduled = relax_pipeline(device)(module)
    text = "\n".join(func.script() for gv, func in sorted(scheduled.functions_items(), key=lambda kv: kv[0].name_hint)
                     if gv.name_hint != "shape_func")
    if target.kind.name == "cuda":
        executable = relax.build(module, target, relax_pipeline=relax_pipeline(device), tir_pipeline=tir_pipeline(device))
        text += "\n".join(m.inspect_source() for m in _modules(executable.mod) if m.kind == "cuda")
    return text


def _module(network: str) -> tvm.IRModule:
    """The network's Relax module; a network of open sequence (a BERT)'s at :data:`SEQUENCE`."""
    return get_network(network).fit_sizes({"sequence": SEQUENCE}).module


def _modules(module) -> list:
    return [module, *(m for imported in module.imports for m in _modules(imported))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the sources and digests.json")
    parser.add_argument("--networks", default=",".join(network_names()))
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--compare", type=Path, help="a folder an earlier run wrote: list the digests that differ")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    digests_path = args.out / "digests.json"
    digests = json.loads(digests_path.read_text()) if digests_path.exists() else {}
    for network in args.networks.split(","):
        for config in args.configs.split(","):
            start = time.perf_counter()
            text = generated(network, config)
            (args.out / f"{network}.{config}.txt").write_text(text)
            digests[f"{network} {config}"] = hashlib.sha256(text.encode()).hexdigest()[:16]
            digests_path.write_text(json.dumps(digests, indent=1, sort_keys=True))
            print(f"{network} {config}: {digests[f'{network} {config}']} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    if args.compare is None:
        return 0
    before = json.loads((args.compare / "digests.json").read_text())
    differing = [key for key, digest in sorted(digests.items()) if key in before and before[key] != digest]
    compared = sum(key in before for key in digests)
    for key in differing:
        print(f"differs: {key} (diff {args.compare}/{key.replace(' ', '.')}.txt {args.out}/{key.replace(' ', '.')}.txt)")
    print(f"{compared - len(differing)} of {compared} identical")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
