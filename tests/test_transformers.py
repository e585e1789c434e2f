"""Networks of several named inputs and outputs: a tiny BERT-style encoder exported from PyTorch to ONNX with
dynamic batch and sequence axes, taken by name (hetero.infer's mapping, Inference.py's .npz), split over two CPU
devices running ONNX Runtime, OpenVINO or TVM (through its Relax ONNX frontend), and matching ONNX Runtime alone."""

import dataclasses

import numpy as np
import pytest

import hetero
from hetero.engines import engine_key, load_engine, runnable_engines
from hetero.errors import HeteroError
from hetero.execute import run_split
from hetero.table import ProfileTable

from .conftest import run_script

torch = pytest.importorskip("torch")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

VOCABULARY, HIDDEN, HEADS, LAYERS, MAX_SEQUENCE = 50, 16, 2, 2, 32


class EncoderLayer(torch.nn.Module):
    """Self-attention written out in plain operations, with the mask as an additive bias, as BERT's."""

    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS):
        super().__init__()
        self.hidden, self.heads = hidden, heads
        self.qkv, self.out = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)
        self.feed = torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden), torch.nn.GELU(),
                                        torch.nn.Linear(2 * hidden, hidden))
        self.norm1, self.norm2 = torch.nn.LayerNorm(hidden), torch.nn.LayerNorm(hidden)

    def forward(self, x, bias):
        batch, sequence, _ = x.shape
        hidden, heads = self.hidden, self.heads
        q, k, v = self.qkv(x).reshape(batch, sequence, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5 + bias, dim=-1)
        x = self.norm1(x + self.out((attention @ v).transpose(1, 2).reshape(batch, sequence, hidden)))
        return self.norm2(x + self.feed(x))


class TinyEncoder(torch.nn.Module):
    """Token and position embeddings, two encoder layers; the hidden states and a pooled first token."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions = torch.nn.Embedding(VOCABULARY, HIDDEN), torch.nn.Embedding(MAX_SEQUENCE, HIDDEN)
        self.layers = torch.nn.ModuleList(EncoderLayer() for _ in range(LAYERS))
        self.pool = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, input_ids, attention_mask):
        x = self.tokens(input_ids) + self.positions(torch.arange(input_ids.shape[1]))
        bias = (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        return x, torch.tanh(self.pool(x[:, 0]))


def export_tiny_encoder(path, input_names=("input_ids", "attention_mask")):
    """The tiny encoder written to `path` as ONNX, batch and sequence dynamic, its inputs named `input_names`."""
    torch.manual_seed(0)
    example = (torch.zeros((2, 8), dtype=torch.int64), torch.ones((2, 8), dtype=torch.int64))
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(TinyEncoder().eval(), example, str(path), input_names=list(input_names),
                      output_names=["last_hidden_state", "pooler_output"], dynamo=False,
                      dynamic_axes={**{name: axes for name in input_names}, "last_hidden_state": axes,
                                    "pooler_output": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """The .onnx file of the tiny encoder, batch and sequence dynamic."""
    return export_tiny_encoder(tmp_path_factory.mktemp("bert") / "tiny_bert.onnx")


@pytest.fixture(scope="module")
def two_cpus():
    cpu = hetero.parse_devices("cpu")[0]
    return [dataclasses.replace(cpu, name=f"cpu-{x}", hardware=f"{cpu.hardware} {x}", threads=1) for x in "ab"]


def tokens(batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids and a mask that pads each sample's end by a different length."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(sequence) < rng.integers(1, sequence + 1, (batch, 1))).astype(np.int64)
    return {"input_ids": rng.integers(0, VOCABULARY, (batch, sequence)), "attention_mask": mask}


def reference(encoder, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return onnxruntime.InferenceSession(str(encoder), providers=["CPUExecutionProvider"]).run(None, inputs)


def test_an_onnx_encoder_loads_with_its_named_inputs_and_a_sequence_its_inputs_fix(encoder):
    net = hetero.get_network(str(encoder))
    assert [(t.name, t.shape, t.dtype) for t in net.inputs] == [("input_ids", ("sequence",), "int64"),
                                                                ("attention_mask", ("sequence",), "int64")]
    assert [(t.name, t.shape) for t in net.outputs] == [("last_hidden_state", ("sequence", HIDDEN)),
                                                        ("pooler_output", (HIDDEN,))]
    assert net.open_dimensions == ["sequence"]
    short, long = net.fit(tokens(3, 8)), net.fit(tokens(3, 12))
    assert [t.shape for t in long.inputs] == [(12,), (12,)] and long.outputs[0].shape == (12, HIDDEN)
    assert not long.open_dimensions
    # profiles are keyed by the network's key: one per sequence length, none shared with another network
    assert len({short.key, long.key, hetero.get_network("squeezenet_v1.1").key}) == 3
    assert long.input_bytes == 2 * 12 * 8 and long.output_bytes == (12 * HIDDEN + HIDDEN) * 4
    cpu = hetero.parse_devices("cpu")[0]
    assert "has no Relax module" in runnable_engines(net, cpu)["tvm"], "converted once the sequence is fixed"
    assert long.module is not None and runnable_engines(long, cpu)["tvm"] is None
    assert net.fit(tokens(2, 12, seed=3)) is long, "converted once per sequence length"


def test_a_split_over_onnx_runtime_and_openvino_matches_onnx_runtime(encoder, two_cpus, tmp_path):
    pytest.importorskip("openvino")
    inputs = tokens(24, 12)
    report = hetero.infer(str(encoder), two_cpus, inputs=inputs, table=tmp_path / "t.json", profile_batches=(1, 8),
                          progress=False, engine="cpu-a=onnxruntime,cpu-b=openvino")
    assert not report.faults
    assert {(r.device.name, r.engine) for r in report.shares} <= {("cpu-a", "onnxruntime"), ("cpu-b", "openvino")}
    hidden, pooled = reference(encoder, inputs)
    np.testing.assert_allclose(report.outputs["last_hidden_state"], hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(report.outputs["pooler_output"], pooled, rtol=1e-4, atol=1e-4)
    table, key = ProfileTable.load(tmp_path / "t.json"), hetero.get_network(str(encoder)).fit(inputs).key
    assert table.get(engine_key("onnxruntime", two_cpus[0]), key) and table.get(engine_key("openvino", two_cpus[1]), key)


def test_tvm_and_openvino_each_take_whole_samples_of_every_input(encoder, two_cpus):
    """Shares planned by hand, so both devices work whatever their profiles: each is rows of both inputs, in
    chunks of at most 2 samples, and the outputs come back in input order, as ONNX Runtime gives them."""
    pytest.importorskip("openvino")
    inputs = tokens(9, 6, seed=1)
    net = hetero.get_network(str(encoder)).fit(inputs)
    engines = [load_engine(net, two_cpus[0], "tvm"), load_engine(net, two_cpus[1], "openvino")]
    outputs, results, _ = run_split(engines, net.to_records(inputs), [4, 5], [0.0, 0.0], limits=[2, 2])
    assert [(r.size, r.calls) for r in results] == [(4, 2), (5, 3)]
    hidden, pooled = reference(encoder, inputs)
    np.testing.assert_allclose(outputs["last_hidden_state"], hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs["pooler_output"], pooled, rtol=1e-4, atol=1e-4)


def test_a_stream_takes_named_arrays_or_npy_files_and_resumes(encoder, two_cpus, tmp_path):
    inputs = tokens(30, 8, seed=2)
    np.save(tmp_path / "ids.npy", inputs["input_ids"])
    named = {"input_ids": tmp_path / "ids.npy", "attention_mask": inputs["attention_mask"]}
    options = {"table": tmp_path / "t.json", "profile_batches": (1, 8), "progress": False, "engine": "onnxruntime"}
    report = hetero.stream(str(encoder), two_cpus, named, tmp_path / "y.npy", **options)
    assert report.computed == 30
    outputs = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(outputs["last_hidden_state"], reference(encoder, inputs)[0], rtol=1e-5, atol=1e-5)
    assert hetero.stream(str(encoder), two_cpus, named, **options).samples == 30


@pytest.mark.parametrize("change, message", [
    (lambda x: x.pop("attention_mask"), "no input attention_mask: tiny_bert takes input_ids"),
    (lambda x: x.update(token_type_ids=x["input_ids"]), "unknown input token_type_ids"),
    (lambda x: x.update(attention_mask=x["attention_mask"][:, :5]), r"input attention_mask of shape \(4, 5\) does "
                                                                    r"not fit.*where sequence=8"),
    (lambda x: x.update(attention_mask=x["attention_mask"][:3]), r"input attention_mask of shape \(3, 8\)"),
    (lambda x: x.update(input_ids=x["input_ids"] * 0.5), "input input_ids of dtype float64 does not fit"),
])
def test_a_missing_extra_or_misshaped_input_is_one_line_naming_it(encoder, change, message):
    inputs = tokens(4, 8)
    change(inputs)
    with pytest.raises(HeteroError, match=message) as refused:
        hetero.get_network(str(encoder)).check_inputs(inputs)
    assert "\n" not in str(refused.value)


def test_a_network_of_one_input_refuses_inputs_by_name():
    with pytest.raises(HeteroError, match=r"takes one array of inputs \(N, 3, 224, 224\), not inputs by name \(x\)"):
        hetero.get_network("squeezenet_v1.1").check_inputs({"x": np.zeros((1, 3, 224, 224), np.float32)})


def test_random_samples_need_inputs_to_fix_the_sequence(encoder, tmp_path):
    with pytest.raises(HeteroError, match="tiny_bert leaves sequence open: give its inputs by name"):
        hetero.infer(str(encoder), "cpu", batch=4, table=tmp_path / "t.json", progress=False)


def test_inference_py_takes_an_npz_of_named_inputs(encoder, tmp_path):
    inputs = tokens(5, 10)
    np.savez(tmp_path / "x.npz", **inputs)
    np.savez(tmp_path / "short.npz", input_ids=inputs["input_ids"])
    common = ["--network", str(encoder), "--table", str(tmp_path / "t.json"), "--profile-batches", "1,4",
              "--engine", "onnxruntime", "--no-progress"]
    done = run_script("Inference.py", *common, "--input", str(tmp_path / "x.npz"), "--output", str(tmp_path / "y.npy"))
    assert done.returncode == 0, done.stderr
    outputs = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(outputs["pooler_output"], reference(encoder, inputs)[1], rtol=1e-5, atol=1e-5)
    refused = run_script("Inference.py", *common, "--input", str(tmp_path / "short.npz"))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "error: no input attention_mask: tiny_bert takes input_ids (N, sequence) int64; "
        "attention_mask (N, sequence) int64"]
