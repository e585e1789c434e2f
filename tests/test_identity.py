"""A model is known by its content: two models that share a name never share outputs, modules or profiles."""

from pathlib import Path

import numpy as np
import pytest

import hetero
from hetero.table import ProfileTable

from .test_models import tiny_onnx, tiny_reference

pytest.importorskip("onnx")


def _run(path: Path, table: Path, inputs: np.ndarray) -> hetero.InferenceReport:
    return hetero.infer(str(path), "cpu", inputs=inputs, table=table, profile_batches=[1, 2],
                        budget_s=0.5, progress=False)


def test_same_file_name_other_weights(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    weights_a = tiny_onnx(tmp_path / "a" / "model.onnx", seed=1)
    weights_b = tiny_onnx(tmp_path / "b" / "model.onnx", seed=2)
    table = tmp_path / "table.json"
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)

    out_a = _run(tmp_path / "a" / "model.onnx", table, x).outputs
    out_b = _run(tmp_path / "b" / "model.onnx", table, x).outputs

    np.testing.assert_allclose(out_a, tiny_reference(x, weights_a), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out_b, tiny_reference(x, weights_b), rtol=1e-4, atol=1e-4)
    networks = {profile.network for profile in ProfileTable.load(table).profiles()}
    assert len(networks) == 2 and all(name.startswith("model@") for name in networks)


def test_file_replaced_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    tiny_onnx(path, seed=1)
    first = hetero.get_network(str(path))
    weights = tiny_onnx(path, seed=3)
    second = hetero.get_network(str(path))
    assert first.digest != second.digest
    out = _run(path, tmp_path / "table.json", x).outputs
    np.testing.assert_allclose(out, tiny_reference(x, weights), rtol=1e-4, atol=1e-4)


def test_same_content_same_identity(tmp_path: Path) -> None:
    tiny_onnx(tmp_path / "one.onnx", seed=5)
    tiny_onnx(tmp_path / "two.onnx", seed=5)
    one, two = hetero.get_network(str(tmp_path / "one.onnx")), hetero.get_network(str(tmp_path / "two.onnx"))
    assert one.digest == two.digest and one.key != two.key  # the key keeps the name people know
    assert hetero.get_network("squeezenet_v1.1").digest != hetero.get_network("squeezenet_v1.0").digest
