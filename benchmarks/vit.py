"""Write a ViT (hetero.vit: random weights, seeded) as an ONNX file with a dynamic batch, for hetero's benchmark.

Run from the repository root:

    python -m benchmarks.vit --out DIR                    # DIR/vit-b16.onnx, ViT-B/16 at 224x224
    python -m benchmarks.vit --out DIR --config tiny      # DIR/vit-tiny.onnx, the tests' 32x32 ViT
    python -m hetero.benchmark --network DIR/vit-b16.onnx --device cpu,gpu0 --batch 64

The file is checked before it is kept: ONNX Runtime (where it is installed) runs it at batch 2 and must
agree with PyTorch to 1e-4 of the largest output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from hetero.vit import CONFIGS, describe, export_onnx, vit

    parser = argparse.ArgumentParser(prog="python -m benchmarks.vit", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for vit-<config>.onnx")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="b16", help="ViT size (default b16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--no-check", action="store_true", help="skip ONNX Runtime's check against PyTorch")
    args = parser.parse_args(argv)

    import torch

    config = CONFIGS[args.config]
    model = vit(config, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"ViT {args.config}: {describe(config)}; {params:,} parameters")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"vit-{args.config}.onnx"
    start = time.perf_counter()
    export_onnx(model, path, opset=args.opset)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")

    if not args.no_check:
        try:
            import onnxruntime
        except ImportError:
            print("not checked: onnxruntime is not installed")
        else:
            x = np.random.default_rng(args.seed).standard_normal((2, *config.input_shape), dtype=np.float32)
            with torch.inference_mode():
                expected = model(torch.from_numpy(x)).numpy()
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (got,) = session.run(None, {session.get_inputs()[0].name: x})
            error = float(np.abs(got - expected).max() / np.abs(expected).max())
            print(f"checked: ONNX Runtime against PyTorch at batch 2, largest error {error:.1e} of the largest output")
            if not error <= 1e-4:
                print(f"error: {path} does not compute what the PyTorch module does", file=sys.stderr)
                return 1
    print(f"run: python -m hetero.benchmark --network {path} --device cpu --batch 64")
    return 0


if __name__ == "__main__":
    sys.exit(main())
