"""Whether a GPU's engine gives bert-base's outputs: the same mixed-length batch through `--device DEVICE --engine
ENGINE` and through ONNX Runtime on the CPU (float32), compared at the real positions, with the worst error printed.

    python -m benchmarks.bert_check --device gpu0 --engine torch-compile --precision fp16
"""

from __future__ import annotations

import sys

import numpy as np

import hetero
from hetero.command import Parser, positive_int, run_command


def main(argv: list[str]) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="bert-base")
    parser.add_argument("--device", default="gpu0")
    parser.add_argument("--engine", default="torch-compile")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--sequence", type=positive_int, default=128)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, args.sequence + 1, args.batch)
    mask = (np.arange(args.sequence) < lengths[:, None]).astype(np.int64)
    inputs = {"input_ids": rng.integers(0, 30522, (args.batch, args.sequence)) * mask, "attention_mask": mask}
    got, want = (hetero.infer(args.network, device, inputs=inputs, engine=engine, precision=precision,
                              table="/tmp/bert-check-table.json", progress=False).outputs
                 for device, engine, precision in ((args.device, args.engine, args.precision),
                                                   ("cpu", "onnxruntime", "fp32")))
    real = mask.astype(bool)
    hidden = np.abs(got["last_hidden_state"][real] - want["last_hidden_state"][real]).max()
    pooled = np.abs(got["pooler_output"] - want["pooler_output"]).max()
    scale = np.abs(want["last_hidden_state"][real]).max()
    print(f"{args.network} on {args.device} ({args.engine}, {args.precision}) against cpu onnxruntime fp32, "
          f"{args.batch} samples of lengths {lengths.min()}..{lengths.max()}: last_hidden_state max abs error {hidden:.3g} "
          f"(values up to {scale:.3g}), pooler_output {pooled:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, None))
