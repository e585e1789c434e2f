"""Streams over a Ray cluster: a local cluster of CPU-only nodes (Ray's own cluster_utils.Cluster, one CPU each),
every server of it on 127.0.0.1; outputs equal one machine's, a node removed mid-run loses nothing, the driver's
memory stays flat, and the command line lists each node's devices and streams over them."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil
import pytest

import hetero

from .conftest import ROOT, run_script
from .test_models import tiny_onnx, tiny_reference

ray = pytest.importorskip("ray")
pytest.importorskip("onnx")

from ray.cluster_utils import Cluster  # noqa: E402 - after the skip when Ray is not installed

from hetero import cluster as hetero_cluster  # noqa: E402
from hetero.stream import PROGRESS  # noqa: E402

NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def local_cluster():
    """Two nodes (a head and one more), each of one CPU, listening on 127.0.0.1 only; all of it shut down after."""
    with hetero_cluster.loopback_only():
        nodes = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        try:
            nodes.add_node(**NODE)
        except BaseException:
            nodes.shutdown()
            raise
    try:
        yield nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        with hetero_cluster.loopback_only():
            nodes.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    weights = tiny_onnx(folder / "tiny.onnx")
    return folder / "tiny.onnx", weights


def _conv_onnx(path, size=32, seed=3):
    """Two 3x3 convolutions (3->16->16) on (3, size, size), ReLUs, global average pool, Gemm(16->10): slow
    enough per sample that a node can be removed while the stream runs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {"W1": rng.standard_normal((16, 3, 3, 3)) * 0.3, "B1": rng.standard_normal(16) * 0.1,
         "W2": rng.standard_normal((16, 16, 3, 3)) * 0.1, "B2": rng.standard_normal(16) * 0.1,
         "G": rng.standard_normal((16, 10)), "C": rng.standard_normal(10)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "shape"))
    conv = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], **conv), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], **conv), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Reshape", ["p", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "G", "C"], ["y"])]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _inputs(path, samples, shape=(3, 8, 8), seed=0):
    x = np.random.default_rng(seed).standard_normal((samples, *shape)).astype(np.float32)
    np.save(path, x)
    return x


def test_the_cluster_listens_on_loopback_only(local_cluster):
    me = psutil.Process()
    tree = {me.pid} | {child.pid for child in me.children(recursive=True)}
    assert hetero_cluster.listening_beyond_loopback(tree) == []
    assert {node.node_ip_address for node in local_cluster.list_all_nodes()} == {"127.0.0.1"}


def test_a_stream_over_two_nodes_equals_one_machine_sample_by_sample(tmp_path, tiny, local_cluster):
    model, weights = tiny
    x = _inputs(tmp_path / "x.npy", 50000)
    local = hetero.stream(str(model), "cpu", x, table=tmp_path / "t.json", profile_batches=[1, 8, 64], progress=False)
    report = hetero.stream(str(model), "cpu", x, table=tmp_path / "t.json", profile_batches=[1, 8, 64], progress=False,
                           ray=local_cluster.address)
    np.testing.assert_array_equal(report.outputs, local.outputs)
    np.testing.assert_allclose(report.outputs, tiny_reference(x, weights), rtol=1e-4, atol=1e-4)
    assert sorted(d.device for d in report.devices) == ["node0/cpu", "node1/cpu"]
    assert all(d.samples for d in report.devices), "both nodes pulled chunks"
    assert sum(d.samples for d in report.devices) == report.computed == 50000 and not report.faults
    # the nodes, each of one CPU, computed with one thread: profiled under their own key, kept in the driver's table
    keys = [p.device_key for p in hetero.table.ProfileTable.load(tmp_path / "t.json").profiles()]
    assert any(" | 1 threads | " in key for key in keys) and any(" | 1 threads | " not in key for key in keys)
    assert not ray.is_initialized(), "hetero left the cluster it joined"


def test_a_node_removed_mid_run_loses_nothing(tmp_path, local_cluster):
    _conv_onnx(tmp_path / "convs.onnx")
    x = _inputs(tmp_path / "x.npy", 16000, (3, 32, 32), seed=5)
    common = {"table": tmp_path / "t.json", "profile_batches": [1, 8, 64], "progress": False}
    expected = hetero.stream(str(tmp_path / "convs.onnx"), "cpu", x, **common).outputs
    scratch = set(Path(tempfile.gettempdir()).glob("hetero-node-*"))
    with hetero_cluster.loopback_only():
        doomed = local_cluster.add_node(**NODE)
    record, removed = tmp_path / f"y.npy{PROGRESS}", []

    def remove_once_a_quarter_is_done():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with_done = json.loads(record.read_text() or "{}") if record.exists() else {}
            done = sum(end - start for start, end in with_done.get("done", []))
            if done >= 4000:
                local_cluster.remove_node(doomed)
                removed.append(done)
                return
            time.sleep(0.005)

    remover = threading.Thread(target=remove_once_a_quarter_is_done)
    remover.start()
    try:
        report = hetero.stream(str(tmp_path / "convs.onnx"), "cpu", tmp_path / "x.npy", tmp_path / "y.npy", **common,
                               ray=local_cluster.address)
    finally:
        remover.join()
        # the removed node died with its files on its disk, which here is this machine's
        for left in set(Path(tempfile.gettempdir()).glob("hetero-node-*")) - scratch:
            shutil.rmtree(left, ignore_errors=True)
    assert removed and removed[0] < 16000, "the node was removed while the stream ran"
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)
    lost = [d for d in report.devices if d.ray_node == doomed.node_id]
    assert len(lost) == 1 and "lost" in lost[0].error
    assert [f.device for f in report.faults] == [lost[0].device] and report.faults[0].moved > 0, \
        "the node had chunks on the way, and the others computed them"
    assert report.computed == 16000 == sum(d.samples for d in report.devices)


def test_driver_memory_stays_flat_however_long_the_stream(tmp_path, tiny, local_cluster):
    model, _ = tiny
    common = {"table": tmp_path / "t.json", "profile_batches": [1, 64], "progress": False, "chunk_s": 0.01}
    peaks, chunks = [], []
    with hetero_cluster.connected(local_cluster.address):  # joined once, outside the measurement
        for samples in (2000, 2000, 20000):  # the first builds and profiles
            _inputs(tmp_path / f"x{samples}.npy", samples)
            tracemalloc.start()
            report = hetero_cluster.stream(str(model), "cpu", tmp_path / f"x{samples}.npy", tmp_path / f"y{samples}.npy",
                                           **common, address=local_cluster.address)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            chunks.append(sum(d.chunks for d in report.devices))
    assert chunks[2] >= 10, f"the long stream ran in many chunks: {chunks}"
    input_bytes = 20000 * 3 * 8 * 8 * 4
    assert peaks[2] < peaks[1] + input_bytes / 20, f"peak driver memory grew with the stream: {peaks[1:]}"


def test_every_node_imports_the_drivers_hetero(local_cluster):
    """Ray's workers import the driver's hetero (not a copy installed on the node), and the driver, joined, listens
    on 127.0.0.1 only too."""
    from hetero.cluster.node import START_TIMEOUT_S, gather, source_digest, start_workers

    with hetero_cluster.connected(local_cluster.address) as (joined_ray, joined):
        assert joined
        nodes = hetero_cluster.cluster_nodes(joined_ray)
        workers = start_workers(joined_ray, nodes, joined)
        infos = gather(joined_ray, {name: w.info.remote() for name, w in workers.items()}, START_TIMEOUT_S)
        me = psutil.Process()
        tree = {me.pid} | {child.pid for child in me.children(recursive=True)}
        assert hetero_cluster.listening_beyond_loopback(tree) == []
    assert [n.name for n in nodes] == ["node0", "node1"] and nodes[0].driver and not nodes[1].driver
    for info in infos.values():
        assert info["hetero"] == source_digest() and "site-packages" not in info["path"], info


def test_a_node_running_another_hetero_is_left_out(tmp_path, tiny, local_cluster, monkeypatch):
    model, _ = tiny
    monkeypatch.setattr("hetero.cluster.driver.source_digest", lambda: "another")
    with pytest.raises(hetero.HeteroError, match="no node of the cluster has a device.*runs another hetero"):
        hetero.stream(str(model), "cpu", _inputs(tmp_path / "x.npy", 10), table=tmp_path / "t.json",
                      profile_batches=[1], progress=False, ray=local_cluster.address)


def test_list_devices_lists_each_nodes_devices(local_cluster):
    result = run_script("Inference.py", "--list-devices", "--ray", local_cluster.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if not line.startswith(" ")] == ["node0", "node1"]
    assert "the driver's node" in lines[0]
    assert sum(line.startswith("  cpu: ") for line in lines) == 2, result.stdout


def test_the_command_line_streams_over_the_cluster(tmp_path, tiny, local_cluster):
    """--ray auto joins the cluster started on this machine (the test's)."""
    model, weights = tiny
    x = _inputs(tmp_path / "x.npy", 3000, seed=9)
    result = run_script("Inference.py", "--network", str(model), "--input", str(tmp_path / "x.npy"), "--output",
                        str(tmp_path / "y.npy"), "--ray", "auto", "--table", str(tmp_path / "t.json"),
                        "--profile-batches", "1,8,64", "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(d["device"] for d in report["devices"]) == ["node0/cpu", "node1/cpu"]
    assert report["computed"] == 3000 and not report["faults"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), tiny_reference(x, weights), rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.json.lock", "x.npy", "y.npy"]


def test_a_cluster_hetero_starts_listens_on_loopback_only():
    """What `--ray auto` starts when no cluster runs: every server of it on 127.0.0.1."""
    script = (
        "import os, psutil\n"
        "from hetero.cluster.connect import start_local, listening_beyond_loopback, ray_module\n"
        "ray = ray_module()\n"
        "start_local(ray, {'log_to_driver': False, 'num_cpus': 1})\n"
        "me = psutil.Process()\n"
        "tree = {me.pid} | {c.pid for c in me.children(recursive=True)}\n"
        "listening = [c.laddr.ip for c in psutil.net_connections('inet') if c.status == 'LISTEN' and c.pid in tree]\n"
        "print(len(listening), listening_beyond_loopback(tree), ray.util.get_node_ip_address())\n"
        "ray.shutdown()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr
    count, rest = result.stdout.split(" ", 1)
    assert int(count) >= 3 and rest.strip() == "[] 127.0.0.1", result.stdout


def test_named_inputs_stream_over_two_nodes_as_onnx_runtime_computes_them(tmp_path, local_cluster):
    """A BERT-style encoder of two named inputs (tests/test_transformers.py's tiny export): records travel to the
    nodes as one input's arrays do, and each node fits the network to the inputs' sequence length itself."""
    from .test_transformers import export_tiny_encoder, reference, tokens  # torch and onnxruntime, or skipped

    model = export_tiny_encoder(tmp_path / "tiny_bert.onnx")
    inputs = tokens(120, 12, seed=6)
    report = hetero.stream(str(model), "cpu", inputs, table=tmp_path / "t.json", profile_batches=[1, 8],
                           progress=False, engine="onnxruntime", ray=local_cluster.address)
    hidden, pooled = reference(model, inputs)
    np.testing.assert_allclose(report.outputs["last_hidden_state"], hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(report.outputs["pooler_output"], pooled, rtol=1e-4, atol=1e-4)
    assert sorted(d.device for d in report.devices) == ["node0/cpu", "node1/cpu"] and not report.faults
    assert report.computed == 120 == sum(d.samples for d in report.devices)
    fitted = hetero.get_network(str(model)).fit(inputs)
    assert {p.network for p in hetero.table.ProfileTable.load(tmp_path / "t.json").profiles()} == {fitted.key}, \
        "the nodes profiled the network at length 12"
