"""Sequence buckets: a batch of named inputs of mixed lengths runs each sample at the shortest bucket that holds
it, in hetero.infer, hetero.stream and Inference.py, and gives the outputs of running it at its full length."""

import numpy as np
import pytest

import hetero
from hetero.buckets import Buckets, sample_lengths
from hetero.cli import inference
from hetero.engines import load_engine
from hetero.engines.onnxruntime import OnnxRuntimeEngine
from hetero.errors import HeteroError
from hetero.table import ProfileTable, format_table

from .test_transformers import export_tiny_encoder, reference, tokens

SEQUENCE = 24
BUCKETS = (4, 8, 16)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return export_tiny_encoder(tmp_path_factory.mktemp("buckets") / "tiny_bert.onnx")


def options(tmp_path, **changes):
    return {"table": tmp_path / "t.json", "profile_batches": (1, 8), "progress": False, "engine": "onnxruntime",
            "buckets": BUCKETS} | changes


def assert_real_positions_match(outputs, inputs, expected):
    """Per sample, its outputs where its mask reaches (up to its last 1) equal `expected`'s (the network run on
    the batch at its full length, every sample alone in its row); pooled outputs equal throughout."""
    hidden, pooled = expected
    for sample, length in enumerate(sample_lengths(inputs["attention_mask"])):
        np.testing.assert_allclose(outputs["last_hidden_state"][sample, :length], hidden[sample, :length],
                                   rtol=1e-4, atol=1e-4, err_msg=f"sample {sample}")
    np.testing.assert_allclose(outputs["pooler_output"], pooled, rtol=1e-4, atol=1e-4)


def test_a_mixed_length_batch_runs_in_buckets_and_gives_each_sample_its_full_length_outputs(tiny_bert, tmp_path):
    inputs = tokens(30, SEQUENCE, seed=5)
    lengths = sample_lengths(inputs["attention_mask"])
    report = hetero.infer(str(tiny_bert), "cpu", inputs=inputs, **options(tmp_path))
    assert_real_positions_match(report.outputs, inputs, reference(tiny_bert, inputs))
    alone = reference(tiny_bert, {name: values[7:8] for name, values in inputs.items()})
    np.testing.assert_allclose(report.outputs["last_hidden_state"][7, :lengths[7]], alone[0][0, :lengths[7]],
                               rtol=1e-4, atol=1e-4)
    expected = {n: int(np.sum(np.searchsorted([4, 8, 16, SEQUENCE], lengths) == i))
                for i, n in enumerate([4, 8, 16, SEQUENCE])}
    assert [(b.length, b.samples) for b in report.buckets] == [(n, c) for n, c in expected.items() if c]
    assert sum(share.size for share in report.shares) == 30 and report.unit == "samples/s"
    profiles = format_table(ProfileTable.load(tmp_path / "t.json"))
    assert profiles.count("samples/s") == len(report.buckets) and "img/s" not in profiles, "one profile per length"
    cut = np.searchsorted([4, 8, 16, SEQUENCE], lengths)
    for sample in np.flatnonzero(cut < 3):  # cut to 4, 8 or 16: the cut positions are zeros
        assert not report.outputs["last_hidden_state"][sample, [4, 8, 16][cut[sample]]:].any()


def test_without_buckets_every_sample_runs_at_the_batch_length(tiny_bert, tmp_path):
    inputs = tokens(12, SEQUENCE, seed=6)
    report = hetero.infer(str(tiny_bert), "cpu", inputs=inputs, **options(tmp_path, buckets=()))
    assert report.buckets == []
    hidden, pooled = reference(tiny_bert, inputs)
    np.testing.assert_allclose(report.outputs["last_hidden_state"], hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(report.outputs["pooler_output"], pooled, rtol=1e-4, atol=1e-4)


def test_a_session_loads_each_lengths_engine_once_whatever_its_batches_hold(tiny_bert, tmp_path):
    loaded = []

    def load(net, device):
        loaded.append(net.inputs[0].shape[0])
        return load_engine(net, device, "onnxruntime")

    with hetero.Session(str(tiny_bert), "cpu", hetero.Options(**options(tmp_path, load=load))) as session:
        for batch, seed in ((20, 1), (7, 2), (33, 3)):
            inputs = tokens(batch, SEQUENCE, seed=seed)
            assert_real_positions_match(session.run(inputs).outputs, inputs, reference(tiny_bert, inputs))
    assert sorted(loaded) == [4, 8, 16, SEQUENCE]


def test_each_bucket_is_one_network_fitted_to_its_length(tiny_bert):
    network = hetero.get_network(str(tiny_bert))
    inputs = tokens(40, SEQUENCE, seed=7)
    grouping = Buckets(network, inputs, BUCKETS)
    assert [b.network.inputs[0].shape for b in grouping.buckets] == [(b.length,) for b in grouping.buckets]
    assert grouping.buckets[-1].network is grouping.full and grouping.full.inputs[0].shape == (SEQUENCE,)
    assert sorted(np.concatenate([b.samples for b in grouping.buckets])) == list(range(40))
    again = Buckets(network, tokens(9, SEQUENCE, seed=8), BUCKETS)
    assert {b.length: b.network for b in again.buckets}.items() <= {b.length: b.network for b in grouping.buckets}.items()


def test_a_mask_of_other_values_than_0_and_1_is_one_line_and_runs_without_buckets(tiny_bert, tmp_path):
    inputs = tokens(4, 10)
    inputs["attention_mask"][2, 3] = 2
    with pytest.raises(HeteroError, match=r"attention_mask holds 2 \(sample 2\).*--buckets none") as refused:
        hetero.infer(str(tiny_bert), "cpu", inputs=inputs, **options(tmp_path))
    assert "\n" not in str(refused.value)
    assert hetero.infer(str(tiny_bert), "cpu", inputs=inputs, **options(tmp_path, buckets=())).batch == 4


def test_a_mask_with_no_1_runs_at_full_length_and_no_mask_means_no_buckets(tiny_bert, tmp_path):
    inputs = tokens(6, 12, seed=9)
    inputs["attention_mask"][3] = 0
    report = hetero.infer(str(tiny_bert), "cpu", inputs=inputs, **options(tmp_path))
    assert report.buckets[-1].length == 12
    np.testing.assert_allclose(report.outputs["last_hidden_state"][3], reference(tiny_bert, inputs)[0][3],
                               rtol=1e-4, atol=1e-4)
    unmasked = export_tiny_encoder(tmp_path / "unmasked.onnx", ("input_ids", "mask"))
    named = {"input_ids": inputs["input_ids"], "mask": inputs["attention_mask"]}
    grouping = Buckets(hetero.get_network(str(unmasked)), named, BUCKETS)
    assert [(b.length, len(b.samples)) for b in grouping.buckets] == [(12, 6)]


class FailsStreamingPastFour(OnnxRuntimeEngine):
    """ONNX Runtime that profiles as usual, then streams the bucket of length 4 and fails on any other."""

    loaded: list[int] = []  # the sequence length of every engine made

    def __init__(self, network, device):
        super().__init__(network, device)
        self.loaded.append(network.inputs[0].shape[0])
        self.streaming = False

    def prepare(self, samples, limit=None):
        super().prepare(samples, limit)
        self.streaming = True

    def compute(self, batch):
        if self.streaming and self.network.inputs[0].shape[0] != 4:
            raise RuntimeError("lost")
        return super().compute(batch)


def test_a_mixed_length_stream_resumed_after_a_failure_gives_the_same_outputs(tiny_bert, tmp_path):
    """Only the shortest bucket streams in the first run, which stops with its samples done; the same call then
    computes only the rest, and the output file equals the outputs of one uninterrupted run."""
    inputs = tokens(40, SEQUENCE, seed=10)
    np.save(tmp_path / "ids.npy", inputs["input_ids"])
    named = {"input_ids": tmp_path / "ids.npy", "attention_mask": inputs["attention_mask"]}
    with pytest.raises(HeteroError, match=r"of 40 samples could not run .*lost.* the same command computes the rest"):
        hetero.stream(str(tiny_bert), "cpu", named, tmp_path / "y.npy",
                      **options(tmp_path, load=FailsStreamingPastFour))
    assert sorted(FailsStreamingPastFour.loaded) == [4, 8, 16, SEQUENCE], "each bucket's engine made once"
    report = hetero.stream(str(tiny_bert), "cpu", named, tmp_path / "y.npy", **options(tmp_path))
    shortest = len(Buckets(hetero.get_network(str(tiny_bert)), inputs, BUCKETS).buckets[0].samples)
    assert report.resumed == shortest > 0 and report.computed == 40 - shortest
    assert [b.length for b in report.buckets] == [8, 16, SEQUENCE], "the bucket done is not run again"
    whole = hetero.stream(str(tiny_bert), "cpu", inputs, **options(tmp_path))
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), whole.outputs)
    assert_real_positions_match(whole.outputs, inputs, reference(tiny_bert, inputs))


def test_inference_py_takes_buckets_or_none(tiny_bert, tmp_path, capsys):
    inputs = tokens(10, SEQUENCE, seed=11)
    np.savez(tmp_path / "x.npz", **inputs)
    common = ["--network", str(tiny_bert), "--input", str(tmp_path / "x.npz"), "--table", str(tmp_path / "t.json"),
              "--profile-batches", "1,4", "--engine", "onnxruntime", "--no-progress"]
    assert inference([*common, "--buckets", "8,16"]) == 0
    bucketed = capsys.readouterr().out
    assert "sequence buckets: " in bucketed and "samples/s" in bucketed and "img/s" not in bucketed
    assert bucketed.splitlines()[0].split()[0] == "sequence"
    assert inference([*common, "--buckets", "none", "--output", str(tmp_path / "y.npy")]) == 0
    assert "sequence buckets" not in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "y.npy")["last_hidden_state"], reference(tiny_bert, inputs)[0],
                               rtol=1e-4, atol=1e-4)
    assert inference([*common, "--buckets", "8,16", "--stream", "--output", str(tmp_path / "z.npy")]) == 0
    streamed = capsys.readouterr().out
    assert streamed.splitlines()[0].split()[:2] == ["sequence", "device"] and "samples/s busy" in streamed
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy")["pooler_output"], np.load(tmp_path / "y.npy")["pooler_output"])
    assert inference([*common, "--buckets", "0,8"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: argument --buckets: sequence lengths must be at least 1, got '0,8'"]
