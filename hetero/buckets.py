"""Sequence buckets: a batch of text run at the lengths its samples need rather than all at the longest.

A network of named inputs whose "attention_mask" shares an open dimension (a sequence of length L) with the
other inputs takes batches padded to L. Each sample's length is the position of its mask's last 1, plus 1 (so
whatever the mask holds before it is kept); the sample goes to the smallest bucket at least that long, its
inputs cut to the bucket's length (what is cut is padding only). Each bucket runs as the network fitted to its
length (:meth:`Network.fit`): its own engines, its own profiles (keyed by the network's key, which holds the
length) and so its own split over the devices. The outputs come back in input order, at length L: an output
that has the sequence dimension is padded back with zeros where the input was cut. At the real positions it
is exactly what the network gives for the cut input, which for BERT, whose attention gives masked positions no
weight, is what it gives for the whole padded input.

Rules for the inputs that cannot be cut: without an input named "attention_mask", or with a sequence the
network fixes itself, the batch runs whole at L; a sample whose mask has no 1 (BERT then attends to every
position alike, so cutting would change its outputs) runs at L; a mask of values other than 0 and 1 is refused
in one line, since what it marks as padding is unknown (`buckets=()`, `--buckets none`, runs it as it is).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import HeteroError
from .models import Network

DEFAULT_BUCKETS = (32, 64, 128, 256, 512)
MASK = "attention_mask"


def parse_buckets(text: str) -> tuple[int, ...]:
    """--buckets: lengths such as "32,64,128", or "none" (every batch at its own length): an argparse type."""
    if text.strip().lower() == "none":
        return ()
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sequence lengths such as 32,64,128 or none, got {text!r}") from None
    if min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"sequence lengths must be at least 1, got {text!r}")
    return tuple(sorted(set(lengths)))


def sample_lengths(mask: np.ndarray) -> np.ndarray:
    """Per sample, the position of its mask's last 1 plus 1; 0 where the mask has no 1."""
    mask = np.asarray(mask)
    last = mask.shape[1] - np.argmax(mask[:, ::-1] != 0, axis=1)
    return np.where(mask.any(axis=1), last, 0)


def _cut(values: np.ndarray, axes: Sequence[int], length: int) -> np.ndarray:
    """`values` (a batch) cut to `length` along each of the per-sample `axes`."""
    index = [slice(None)] * values.ndim
    for axis in axes:
        index[1 + axis] = slice(0, length)
    return values[tuple(index)]


def to_length(values: np.ndarray, axes: Sequence[int], length: int) -> np.ndarray:
    """`values` (a batch) at `length` along each of the per-sample `axes`: cut (a view) where longer, padded with
    zeros (a copy) where shorter, as a request is run at its bucket and its outputs given back at its own length."""
    cut = _cut(values, axes, length)
    if all(values.shape[1 + axis] >= length for axis in axes):
        return cut
    shape = list(cut.shape)
    for axis in axes:
        shape[1 + axis] = length
    padded = np.zeros(shape, values.dtype)
    padded[tuple(slice(0, size) for size in cut.shape)] = cut
    return padded


def _sequence_axes(shape: tuple[int | str, ...], dimension: str) -> list[int]:
    return [axis for axis, dim in enumerate(shape) if dim == dimension]


@dataclass(frozen=True)
class Bucket:
    """The samples of a batch that run at one sequence length, as the network fitted to it."""

    length: int
    network: Network
    samples: np.ndarray  # their indices in the batch, ascending


@dataclass
class BucketRun:
    """What one bucket's run took, for reports: its length, its samples, its wall time, and how many of the
    report's rows (shares of a split, devices of a stream), in order, are its."""

    length: int
    samples: int
    wall_s: float
    rows: int


def row_lengths(runs: Sequence[BucketRun]) -> list[int]:
    """The sequence length of each row of a report of bucket runs."""
    return [run.length for run in runs for _ in range(run.rows)]


class Buckets:
    """A batch of named inputs (a mapping of name to array) for `network`, grouped by the lengths in `lengths`
    (() runs the whole batch at its length L; lengths above L are of no use, and L is always one). `full` is the
    network fitted to L and `records` the batch as its records; `buckets` are the non-empty buckets, shortest
    first."""

    def __init__(self, network: Network, inputs: Mapping[str, np.ndarray], lengths: Sequence[int] = DEFAULT_BUCKETS):
        self.full = network.fit(inputs)
        self.records = self.full.to_records(inputs)
        self.dimension = self._dimension(network) if lengths else None
        self.input_axes = {t.name: _sequence_axes(t.shape, self.dimension) for t in network.inputs}
        self.output_axes = {t.name: _sequence_axes(t.shape, self.dimension) for t in network.outputs} or \
            {None: _sequence_axes(network.output_shape, self.dimension)}
        self.length = np.shape(inputs[MASK])[1] if self.dimension else \
            next((np.shape(inputs[t.name])[1 + axis] for t in network.inputs
                  for axis, dim in enumerate(t.shape) if isinstance(dim, str)), 0)
        self.buckets = [Bucket(self.length, self.full, np.arange(len(self.records)))] if self.dimension is None \
            else self._grouped(network, inputs, lengths)

    @staticmethod
    def _dimension(network: Network) -> str | None:
        """The open dimension of a one-dimensional mask, which buckets cut in every input that has it; None
        where there is no mask or its length is fixed."""
        mask = next((t for t in network.inputs if t.name == MASK), None)
        return mask.shape[0] if mask and len(mask.shape) == 1 and isinstance(mask.shape[0], str) else None

    def _grouped(self, network: Network, inputs: Mapping[str, np.ndarray], lengths: Sequence[int]) -> list[Bucket]:
        mask = np.asarray(inputs[MASK])
        if not np.isin(mask, (0, 1)).all():
            where = np.argwhere((mask != 0) & (mask != 1))[0]
            raise HeteroError(f"{MASK} holds {mask[tuple(where)]} (sample {where[0]}): sequence buckets cut what its "
                              f"zeros mark as padding, so it must hold 0 and 1 only; without buckets (--buckets none) "
                              f"it runs as it is")
        needed = sample_lengths(mask)
        needed[needed == 0] = self.length  # no position attended: BERT attends to all alike, so it runs whole
        steps = np.array(sorted({n for n in lengths if n < self.length} | {self.length}))
        chosen = steps[np.searchsorted(steps, needed)]

        def fitted(length: int) -> Network:
            if length == self.length:
                return self.full
            return network.fit({name: _cut(np.asarray(values[:1]), self.input_axes[name], length)
                                for name, values in inputs.items()})

        return [Bucket(int(length), fitted(int(length)), np.flatnonzero(chosen == length))
                for length in steps if (chosen == length).any()]

    def inputs_of(self, bucket: Bucket, start: int = 0, end: int | None = None) -> np.ndarray:
        """The records of the bucket's samples [start, end) (positions within the bucket), cut to its length: a
        view of the batch where the bucket is all of it."""
        if len(bucket.samples) == len(self.records):
            return self.records[start:end]
        samples = bucket.samples[start:end]
        if bucket.network is self.full:
            return self.records[samples]
        cut = np.empty(len(samples), bucket.network.input_dtype)
        for name, axes in self.input_axes.items():
            cut[name] = _cut(self.records[name][samples], axes, bucket.length)
        return cut

    def place(self, outputs: np.ndarray, bucket: Bucket, result: np.ndarray, start: int = 0) -> None:
        """The bucket's outputs for its samples from position `start` on, written to `outputs` (the whole batch's,
        at length L) at those samples' places, zeros where the sequence was cut."""
        if len(bucket.samples) == len(self.records):
            outputs[start:start + len(result)] = result
            return
        samples = bucket.samples[start:start + len(result)]
        if bucket.network is self.full:
            outputs[samples] = result
            return
        padded = np.zeros(len(samples), outputs.dtype) if outputs.dtype.names else \
            np.zeros((len(samples), *outputs.shape[1:]), outputs.dtype)
        for name, axes in self.output_axes.items():
            target = padded if name is None else padded[name]
            _cut(target, axes, bucket.length)[...] = result if name is None else result[name]
        outputs[samples] = padded
