"""The built-in BERT encoders (hetero/models/zoo/bert.py): one builder's Relax module on TVM's CPU, its ONNX form
on ONNX Runtime and OpenVINO and its PyTorch form agree with BERT's arithmetic written out independently on the
same weights; the attention mask hides padding; the weights are the same in every process; bad inputs are
refused in one line."""

import dataclasses
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import hetero
from hetero.engines import load_engine
from hetero.errors import HeteroError
from hetero.models import get_network
from hetero.models.registry import build_registered

torch = pytest.importorskip("torch")
F = torch.nn.functional

LAYERS, HEADS = 2, 2  # bert-tiny's


def tokens(batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids over the whole vocabulary and a mask that pads each sample's end by a different length."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(sequence) < rng.integers(1, sequence + 1, (batch, 1))).astype(np.int64)
    mask[0] = 1  # one sample unpadded
    return {"input_ids": rng.integers(0, 30522, (batch, sequence)), "attention_mask": mask}


def reference(params, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:  # noqa: ANN001
    """BERT's encoder (as Hugging Face's BertModel) in a few lines of PyTorch, the weights taken in their declared
    order: token and position tables, LayerNorm; per layer query, key, value, output, LayerNorm, the two feed
    forward layers, LayerNorm; the pooler. The mask goes to PyTorch's own attention as booleans."""
    weights = iter(torch.from_numpy(np.array(p)) for p in params)

    def norm(x):  # noqa: ANN001, ANN202
        return F.layer_norm(x, x.shape[-1:], next(weights), next(weights), 1e-12)

    def dense(x):  # noqa: ANN001, ANN202
        return x @ next(weights) + next(weights)

    ids, mask = torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"]).bool()
    tokens_table, positions = next(weights), next(weights)
    x = norm(tokens_table[ids] + positions[: ids.shape[1]])
    batch, sequence, hidden = x.shape
    for _ in range(LAYERS):
        q, k, v = (dense(x).view(batch, sequence, HEADS, -1).transpose(1, 2) for _ in range(3))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = norm(x + dense(attended.transpose(1, 2).reshape(batch, sequence, hidden)))
        x = norm(x + dense(F.gelu(dense(x))))
    pooled = torch.tanh(dense(x[:, 0]))
    assert next(weights, None) is None, "every weight used"
    return [x.numpy(), pooled.numpy()]


def test_an_open_network_until_its_inputs_fix_the_sequence():
    net = get_network("bert-tiny")
    assert [str(t) for t in net.inputs] == ["input_ids (N, sequence) int64", "attention_mask (N, sequence) int64"]
    assert [str(t) for t in net.outputs] == ["last_hidden_state (N, sequence, 128) float32",
                                             "pooler_output (N, 128) float32"]
    assert net.module is None and net.open_dimensions == ["sequence"]
    fixed = net.fit(tokens(2, 9))
    assert fixed is net.fit(tokens(3, 9, seed=1)), "one Relax module per sequence length in a process"
    main = fixed.module["main"]
    assert [p.name for p in main.params[:2]] == ["input_ids", "attention_mask"]
    assert len(main.params) == 2 + len(net.params) and fixed.params is net.params
    assert [str(t) for t in fixed.outputs] == ["last_hidden_state (N, 9, 128) float32", "pooler_output (N, 128) float32"]
    assert len({net.key, fixed.key, net.fit(tokens(2, 10)).key}) == 3
    assert fixed.onnx_bytes() == net.onnx_bytes(), "one ONNX form, of open sequence, for every length"
    # Hugging Face's bert_uncased_L-2_H-128_A-2 and bert-base-uncased, less their token type tables (2 x hidden)
    assert net.num_params == 4_385_920 - 2 * 128
    assert build_registered("bert-base").graph.num_weights() == 109_482_240 - 2 * 768


def test_every_form_computes_bert():
    """Padded samples in the batch, so a form that ignored the mask would differ."""
    pytest.importorskip("onnxruntime")
    inputs = tokens(3, 12)
    net = get_network("bert-tiny").fit(inputs)
    expected = reference(net.params, inputs)
    cpu = hetero.parse_devices("cpu")[0]
    engines = ["tvm", "onnxruntime", *(["openvino"] if importlib.util.find_spec("openvino") else [])]
    for engine in engines:
        outputs, _ = load_engine(net, cpu, engine).infer(net.to_records(inputs))
        for name, want in zip(("last_hidden_state", "pooler_output"), expected):
            np.testing.assert_allclose(outputs[name], want, rtol=1e-4, atol=1e-4, err_msg=engine)
    module = get_network("bert-tiny").torch_module()  # any sequence length, as the ONNX form
    torch._dynamo.reset()
    compiled = torch.compile(get_network("bert-tiny").torch_module(), backend="eager", fullgraph=True, dynamic=True)
    for form in (module, compiled):  # dynamo traces the builder into one graph, no break
        with torch.no_grad():
            got = form(*(torch.from_numpy(inputs[t.name]) for t in net.inputs))
        for out, want in zip(got, expected, strict=True):
            np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)


def test_a_split_over_tvm_and_onnx_runtime_computes_bert(tmp_path):
    """hetero.infer by name, the batch split between two CPU devices that run different engines."""
    pytest.importorskip("onnxruntime")
    cpu = hetero.parse_devices("cpu")[0]
    two = [dataclasses.replace(cpu, name=f"cpu-{x}", hardware=f"{cpu.hardware} {x}", threads=1) for x in "ab"]
    inputs = tokens(7, 12, seed=2)  # the length test_every_form_computes_bert compiled TVM's module for
    report = hetero.infer("bert-tiny", two, inputs=inputs, table=tmp_path / "t.json", profile_batches=(1, 4),
                          progress=False, engine="cpu-a=tvm,cpu-b=onnxruntime", buckets=())
    assert not report.faults
    expected = reference(get_network("bert-tiny").params, inputs)
    for name, want in zip(("last_hidden_state", "pooler_output"), expected):
        np.testing.assert_allclose(report.outputs[name], want, rtol=1e-4, atol=1e-4)


def test_padding_changes_nothing_at_the_real_positions():
    """A sample of 7 tokens alone, and padded to 12 with other tokens whose mask is 0."""
    pytest.importorskip("onnxruntime")
    padded = tokens(2, 12, seed=3)
    padded["attention_mask"][1] = np.arange(12) < 7
    alone = {name: values[1:, :7] for name, values in padded.items()}
    net = get_network("bert-tiny")
    cpu = hetero.parse_devices("cpu")[0]
    long, short = (load_engine(net.fit(x), cpu, "onnxruntime").infer(net.fit(x).to_records(x))[0]
                   for x in (padded, alone))
    np.testing.assert_allclose(long["pooler_output"][1], short["pooler_output"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(long["last_hidden_state"][1, :7], short["last_hidden_state"][0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(long["pooler_output"][0], long["pooler_output"][1], atol=1e-3), "samples differ"


def test_weights_are_the_same_in_every_process():
    """Seeded from the name (the digest covers the graph and every weight), not from Python's hash()."""
    code = "from hetero.models import get_network; print(get_network('bert-tiny').digest)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == get_network("bert-tiny").digest


@pytest.mark.parametrize("change, message", [
    (lambda x: x.update(token_ids=x.pop("input_ids")), "no input input_ids: bert-tiny takes input_ids "
                                                       r"\(N, sequence\) int64; attention_mask"),
    (lambda x: x.update(attention_mask=x["attention_mask"][:, :5]), r"input attention_mask of shape \(2, 5\) does "
                                                                    r"not fit.*where sequence=8"),
    (lambda x: x.update(input_ids=np.zeros((2, 513), np.int64), attention_mask=np.ones((2, 513), np.int64)),
     "bert-tiny takes a sequence of at most 512, not 513"),
    (lambda x: x.update(input_ids=np.zeros((2, 0), np.int64), attention_mask=np.ones((2, 0), np.int64)),
     "bert-tiny takes a sequence of at least 1, not 0"),
    # ONNX Runtime would refuse the first and wrap the second around, OpenVINO would read some row for both
    (lambda x: x["input_ids"].__setitem__((1, 3), 30522), r"input input_ids holds values outside 0 \.\. 30521"),
    (lambda x: x["input_ids"].__setitem__((0, 0), -1), r"input input_ids holds values outside 0 \.\. 30521"),
])
def test_a_wrong_input_is_one_line(change, message):
    inputs = tokens(2, 8)
    change(inputs)
    with pytest.raises(HeteroError, match=message) as refused:
        get_network("bert-tiny").fit(inputs)
    assert "\n" not in str(refused.value)
