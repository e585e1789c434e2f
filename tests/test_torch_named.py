"""A PyTorch module of several named inputs (a tiny BERT-like encoder, Hugging Face's way: forward takes input_ids,
token_type_ids and attention_mask by name and returns a dict), made a network by hetero.from_torch with its sequence
open: run by PyTorch eager, torch.compile, ONNX Runtime and TVM, alone and split over two CPU devices, as the module
itself computes; and the byte rows in which PyTorch's GPU pipeline stages a batch of records."""

import dataclasses

import numpy as np
import pytest

import hetero
from hetero.engines import load_engine
from hetero.errors import HeteroError

torch = pytest.importorskip("torch")
pytorch = pytest.importorskip("hetero.engines.pytorch")

from .test_transformers import EncoderLayer  # noqa: E402 - needs torch, skipped above without it

VOCABULARY, HIDDEN, HEADS, LAYERS, POSITIONS, SEQUENCE = 40, 32, 2, 2, 16, 8


class Encoder(torch.nn.Module):
    """Token and position embeddings (a table of POSITIONS, sliced as BERT's position_ids are), two layers."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions = torch.nn.Embedding(VOCABULARY, HIDDEN), torch.nn.Embedding(POSITIONS, HIDDEN)
        self.register_buffer("position_ids", torch.arange(POSITIONS)[None], persistent=False)
        self.layers = torch.nn.ModuleList(EncoderLayer(HIDDEN, HEADS) for _ in range(LAYERS))
        self.pool = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        x = self.tokens(input_ids) + self.positions(self.position_ids[:, : input_ids.shape[1]])
        bias = (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        return {"last_hidden_state": x, "pooler_output": torch.tanh(self.pool(x[:, 0]))}


def tokens(batch: int, sequence: int = SEQUENCE, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids and a mask that pads each sample's end by a different length: attention_mask given before
    input_ids, which the module's forward takes in the other order."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(sequence) < rng.integers(1, sequence + 1, (batch, 1))).astype(np.int64)
    return {"attention_mask": mask, "input_ids": rng.integers(0, VOCABULARY, (batch, sequence))}


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return Encoder().eval()


@pytest.fixture(scope="module")
def network(module):
    return hetero.from_torch(module, inputs=tokens(2), name="tiny-encoder")


@pytest.fixture(scope="module")
def cpu():
    return hetero.parse_devices("cpu")[0]


def expected(module, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        return {k: v.numpy() for k, v in module(**{k: torch.from_numpy(v) for k, v in inputs.items()}).items()}


def assert_close(outputs: np.ndarray, reference: dict[str, np.ndarray]) -> None:
    assert outputs.dtype.names == ("last_hidden_state", "pooler_output")
    for name, values in reference.items():
        np.testing.assert_allclose(outputs[name], values, rtol=1e-4, atol=1e-4)


def test_named_inputs_leave_the_shared_sequence_open_and_name_outputs_by_the_dict(network, module):
    assert [str(t) for t in network.inputs] == ["attention_mask (N, sequence) int64", "input_ids (N, sequence) int64"]
    assert [str(t) for t in network.outputs] == ["last_hidden_state (N, sequence, 32) float32",
                                                 "pooler_output (N, 32) float32"]
    assert network.module is None and network.open_dimensions == ["sequence"]
    assert network.forms == ("onnx", "torch")
    fitted = network.fit(tokens(3, 6))
    assert fitted.module is not None and [t.shape for t in fitted.inputs] == [(6,), (6,)]
    assert network.fit(tokens(2, 6, seed=4)) is fitted, "exported and imported once per sequence length"
    assert len(fitted.params) == len(list(module.parameters()))
    with pytest.raises(HeteroError, match=f"tiny-encoder takes a sequence of at most {POSITIONS}, not 20$"):
        network.fit(tokens(2, 20))


def test_dynamic_names_the_open_dimensions_or_none(module):
    closed = hetero.from_torch(module, inputs=tokens(2), name="closed", dynamic={}, output_names=["hidden", "pooled"])
    assert closed.module is not None and not closed.open_dimensions
    assert [str(t) for t in closed.outputs] == ["hidden (N, 8, 32) float32", "pooled (N, 32) float32"]
    opened = hetero.from_torch(module, inputs=tokens(2), name="named", dynamic={"input_ids": {0: "batch", 1: "tokens"},
                                                                               "attention_mask": {1: "tokens"}})
    assert opened.open_dimensions == ["tokens"] and opened.outputs[0].shape == ("tokens", HIDDEN)


@pytest.mark.parametrize("arguments, message", [
    ({"inputs": tokens(1)}, r"the same batch of at least 2 samples .*got attention_mask \(1, 8\), input_ids \(1, 8\)"),
    ({"inputs": tokens(2), "dynamic": {"ids": {1: "sequence"}}}, "dynamic names no input ids; the inputs are "
                                                                 "attention_mask, input_ids"),
    ({"inputs": tokens(2), "dynamic": {"input_ids": {2: "sequence"}}}, r"input_ids of shape \(2, 8\) has no dimension 2"),
    ({"inputs": tokens(2), "output_names": ["only"]}, r"1 output names \(only\) for 2 outputs"),
    ({"inputs": tokens(2), "sample_shape": (8,)}, "give either a sample_shape .* or inputs by name, not both"),
])
def test_inputs_that_do_not_describe_the_module_are_one_line(module, arguments, message):
    with pytest.raises(HeteroError, match=message) as refused:
        hetero.from_torch(module, name="tiny-encoder", **arguments)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("engine", ["torch", "onnxruntime", "tvm"])
def test_each_engine_computes_what_the_module_computes(network, module, cpu, engine):
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    inputs = tokens(3, seed=1)
    fitted = network.fit(inputs)
    outputs, _ = load_engine(fitted, cpu, engine).infer(fitted.to_records(inputs))
    assert_close(outputs, expected(module, inputs))


def test_torch_compile_computes_it_with_one_graph_for_every_batch_of_two_and_more(network, module, cpu):
    """The compile that takes tens of seconds on 2 cores, once: batches of 3 then 5 on one graph."""
    from torch._dynamo.utils import counters

    inputs = tokens(5, seed=2)
    fitted = network.fit(inputs)
    engine = load_engine(fitted, cpu, "torch-compile")
    graphs = counters["stats"]["unique_graphs"]
    for size in (3, 5):
        outputs, _ = engine.infer(fitted.to_records({k: v[:size] for k, v in inputs.items()}))
        assert_close(outputs, expected(module, {k: v[:size] for k, v in inputs.items()}))
    assert counters["stats"]["unique_graphs"] - graphs == 1, "the second batch size compiled again"


def test_a_split_over_pytorch_and_onnx_runtime_matches_the_module(network, module, cpu, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    two = [dataclasses.replace(cpu, name=f"cpu-{x}", hardware=f"{cpu.hardware} {x}", threads=1) for x in "ab"]
    inputs = tokens(12, seed=3)
    report = hetero.infer(network, two, inputs=inputs, table=tmp_path / "t.json", profile_batches=(1, 4),
                          progress=False, engine="cpu-a=torch,cpu-b=onnxruntime", buckets=())
    assert not report.faults
    assert {(share.device.name, share.engine) for share in report.shares} <= {("cpu-a", "torch"),
                                                                             ("cpu-b", "onnxruntime")}
    assert_close(report.outputs, expected(module, inputs))


def test_a_batch_of_records_travels_as_rows_of_bytes_each_input_a_view_of_them():
    """The GPU pipeline's staging, on the CPU: records whose fields lie at offsets no wider type aligns to are
    uploaded as raw rows and taken apart on the device; outputs gathered into rows read back as records."""
    records = np.zeros(5, [("mask", np.bool_, (3,)), ("ids", np.int64, (4,)), ("scale", np.float16), ("x", np.int32)])
    rng = np.random.default_rng(0)
    records["mask"], records["ids"] = rng.integers(0, 2, (5, 3)).astype(bool), rng.integers(-9, 9, (5, 4))
    records["scale"], records["x"] = rng.standard_normal(5), rng.integers(0, 1 << 30, 5)
    layout = pytorch.SampleLayout(records.dtype)
    assert layout.nbytes == records.dtype.itemsize == 3 + 32 + 2 + 4
    rows = torch.zeros((8, layout.nbytes), dtype=torch.uint8)
    staged = layout.host(rows)
    staged[:5] = records  # what the copy threads do into the page-locked slot
    tensors = layout.tensors(rows[:5])  # what the GPU does with the uploaded rows
    assert [t.dtype for t in tensors] == [torch.bool, torch.int64, torch.float16, torch.int32]
    for name, tensor in zip(records.dtype.names, tensors):
        np.testing.assert_array_equal(tensor.numpy(), records[name])
    back = torch.zeros_like(rows)
    out = layout.rows(tensors, back[:5])
    np.testing.assert_array_equal(layout.host(out), records)
    alone = layout.tensors(rows[4:5])  # one sample's row: its int64s 3 bytes past an 8-byte boundary
    np.testing.assert_array_equal(alone[1].numpy(), records["ids"][4:5])

    images = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    plain = pytorch.SampleLayout(np.float32, (3, 4, 4))
    rows = torch.from_numpy(images.reshape(2, -1).view(np.uint8))
    (tensor,) = plain.tensors(rows)
    assert tensor.data_ptr() == rows.data_ptr(), "one tensor is a view of its rows, not a copy"
    np.testing.assert_array_equal(tensor.numpy(), images)
    np.testing.assert_array_equal(plain.host(plain.rows([tensor], rows)), images)


def test_the_registered_bert_tiny_runs_on_pytorch_as_on_onnx_runtime(cpu):
    """Eager PyTorch only: torch.compile of bert-tiny took 55 s more on 2 cores (it computes the same)."""
    pytest.importorskip("onnxruntime")
    network = hetero.get_network("bert-tiny")
    inputs = {"input_ids": np.random.default_rng(5).integers(0, 1000, (3, 8)), "attention_mask": tokens(3)["attention_mask"]}
    fitted = network.fit(inputs)
    reference, _ = load_engine(fitted, cpu, "onnxruntime").infer(fitted.to_records(inputs))
    outputs, _ = load_engine(fitted, cpu, "torch").infer(fitted.to_records(inputs))
    for name in reference.dtype.names:
        np.testing.assert_allclose(outputs[name], reference[name], rtol=1e-4, atol=1e-4)
