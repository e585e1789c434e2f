"""The benchmark command: every device alone, then the split, written to a markdown file."""

import dataclasses
import re

import pytest

import hetero
from hetero.benchmark import benchmark, main
from hetero.command import run_command
from hetero.engines import installed_engines
from hetero.engines.tvm import profile_key
from hetero.inference import plan
from hetero.table import ProfileTable

from .conftest import SMALL_NETWORK, run_script
from .test_models import tiny_onnx

# the baseline CI can run beside TVM's engine (torch.compile compiles for minutes on 2 cores)
ENGINES = "+".join(["tvm"] + [name for name in ("onnxruntime",) if name in installed_engines()])


def test_benchmark_prints_and_records_every_device_and_the_split(tmp_path):
    """On the tiny ONNX network: what is checked is what the command writes, not how fast a network runs."""
    tiny_onnx(tmp_path / "tiny.onnx")
    network = str(tmp_path / "tiny.onnx")
    markdown = tmp_path / "BENCHMARKS.md"
    result = run_script(
        "-m hetero.benchmark", "--network", network, "--device", "cpu", "--batch", "2",
        "--profile-batches", "1,2", "--repeats", "1", "--warmup", "0", "--engine", ENGINES,
        "--table", str(tmp_path / "t.json"), "--markdown", str(markdown), "--machine", "test-box",
    )
    assert result.returncode == 0, result.stderr
    text = markdown.read_text()
    assert "## test-box" in text and f"### {network}, batch 2, `cpu`" in text
    rows = [line for line in text.splitlines() if line.startswith("| cpu ")]
    assert len(rows) == 1
    for name in ENGINES.split("+"):
        assert f"{name} img/s" in text
    assert "hetero/best" in text and "tvm/best" in text
    assert "split/ideal" in text and "split/best-single" in text
    assert "split/ideal" in result.stdout

    again = run_script(
        "-m hetero.benchmark", "--network", network, "--device", "cpu", "--batch", "1",
        "--profile-batches", "1,2", "--repeats", "1", "--warmup", "0", "--engine", "tvm", "--stream", "12",
        "--table", str(tmp_path / "t.json"), "--markdown", str(markdown), "--machine", "test-box",
    )
    assert again.returncode == 0, again.stderr
    text = markdown.read_text()
    assert text.count("## test-box") == 1, "a machine's section is replaced, not appended"
    assert f"### {network}, batch 1, `cpu`" in text and "batch 2" not in text
    assert re.search(rf"stream cpu {re.escape(network)} fp32, 12 samples: [\d.]+ img/s; from a .npy [\d.]+; "
                     r"loop \(tvm\) [\d.]+; stream/loop [\d.]+", text), "the stream against the engine's plain loop"


def test_benchmark_times_the_split_planned_with_learned_slowdowns(tmp_path):
    cpu = hetero.parse_devices("cpu")[0]
    devices = [dataclasses.replace(cpu, name=name, threads=1) for name in ("cpu-a", "cpu-b")]
    table = ProfileTable.load(tmp_path / "t.json", create=True)
    result = benchmark(SMALL_NETWORK, devices, 4, table, repeats=1, warmup=0, profile_batches=[1, 2], engine="tvm")
    learned = ProfileTable.load(tmp_path / "t.json").get(profile_key(devices[0]), hetero.get_network(SMALL_NETWORK).key)
    assert len(learned.company) == 2, "the untimed split recorded both devices' shares"
    shares, predicted, _ = plan([learned, learned], 4)
    assert [d.share for d in result.devices] == shares
    assert [d.predicted_s for d in result.devices] == pytest.approx(predicted)


def test_benchmark_runs_a_text_network_at_a_sequence_and_mixed_lengths_in_buckets(tmp_path, capsys):
    """On the tiny BERT-style ONNX encoder: --sequence fixes its length, rates read samples/s, and --lengths
    mixed streams samples of lengths 1..L in buckets beside the same stream all at L."""
    pytest.importorskip("onnxruntime")
    from .test_transformers import export_tiny_encoder

    network = str(export_tiny_encoder(tmp_path / "tiny_bert.onnx"))
    markdown = tmp_path / "BENCHMARKS.md"
    common = ["--network", network, "--device", "cpu", "--profile-batches", "1,4", "--repeats", "1", "--warmup",
              "0", "--engine", "onnxruntime", "--table", str(tmp_path / "t.json"), "--markdown", str(markdown),
              "--machine", "test-box"]
    assert run_command(main, [*common, "--sequence", "16", "--batch", "4", "--lengths", "mixed", "--stream", "24",
                              "--buckets", "4,8"]) == 0
    text = markdown.read_text()
    assert f"### {network}, sequence 16, batch 4, `cpu`" in text and "onnxruntime samples/s" in text
    assert "img/s" not in text and re.search(r"split [\d.]+ samples/s", text)
    assert re.search(rf"mixed lengths 1..16 \(uniform, seed 0\), 24 samples of {re.escape(network)} streamed over "
                     r"`cpu`: in buckets [\d.]+ samples/s \(4: \d+, 8: \d+, 16: \d+\); all at 16 [\d.]+ samples/s; "
                     r"buckets/all-at-16 [\d.]+", text)
    capsys.readouterr()
    assert run_command(main, [*common, "--batch", "4"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: tiny_bert takes inputs by name with sequence open: give --sequence L"]
