"""The three scripts, started the way the README starts them; most bad command lines go to the function
a script calls, in this process, with one of each kind through the script itself."""

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import hetero
from hetero import cli, session
from hetero.engines import load_engine

from .conftest import SMALL_NETWORK, run_script


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


BAD_INPUT = [
    (["--network", "resnet-51", "--batch", "4"], "unknown network 'resnet-51'"),
    (["--network", "resnet-18", "--batch", "0"], "at least 1"),
    (["--network", "resnet-18", "--batch", "x"], "whole number"),
    (["--network", "resnet-18", "--batch", "4", "--device", "gpuX"], "malformed device 'gpuX'"),
    (["--network", "resnet-18", "--batch", "4", "--device", "gpu7"], "device 'gpu7' not found; devices here: cpu"),
    (["--network", "resnet-18", "--batch", "4", "--device", "cpu,,cpu"], "malformed device ''"),
    (["--network", "resnet-18"], "exactly one of --batch"),
    (["--network", "resnet-18", "--batch", "2", "--profile-batches", "1,-2"], "at least 1"),
    (["--network", "missing.onnx", "--batch", "2"], "missing.onnx"),
    (["--batch", "2"], "--network is required"),
]


def run_in_process(capfd, command, *args: str) -> subprocess.CompletedProcess:
    """A script's exit code and output, from the function the script calls, run in this process (a process
    of the script's own spends seconds importing TVM). capfd also holds what is written to the file
    descriptors directly, where TVM's own warnings go."""
    capfd.readouterr()
    code = command(list(args))
    return subprocess.CompletedProcess(list(args), code, *capfd.readouterr())


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[f"args{i}-{expected}" for i, (_, expected) in enumerate(BAD_INPUT)])
def test_bad_input_gets_one_clear_line(capfd, case):
    assert BAD_INPUT[case][1] in one_error_line(run_in_process(capfd, cli.inference, *BAD_INPUT[case][0]))


def test_bad_input_to_the_script_gets_one_clear_line():
    """A failure while running and a usage error, through Inference.py itself."""
    cases = BAD_INPUT[:2]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: run_script("Inference.py", *case[0]), cases))
    for (_, expected), result in zip(cases, results):
        assert expected in one_error_line(result)


def test_print_table_of_missing_and_corrupt_tables(tmp_path, capfd):
    assert "no-such.json" in one_error_line(run_script("print_table.py", str(tmp_path / "no-such.json")))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    one_error_line(run_in_process(capfd, cli.print_table, str(corrupt)))
    assert corrupt.read_text() == "{not json"


def test_corrupt_table_is_refused_and_kept(tmp_path):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"something": "else"}')
    one_error_line(run_script("Inference.py", "--network", SMALL_NETWORK, "--batch", "2", "--table", str(corrupt)))
    assert corrupt.read_text() == '{"something": "else"}'


def test_inference_profiles_once_then_reuses_table_and_cache(tmp_path):
    table = tmp_path / "table.json"
    args = ["--network", SMALL_NETWORK, "--batch", "3", "--profile-batches", "1,2", "--table", str(table), "--json"]
    first = run_script("Inference.py", *args, "--output", str(tmp_path / "out.npy"))
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["profiled"] == ["cpu"]
    assert [d["samples"] for d in report["devices"]] == [3]
    assert report["devices"][0]["precision"] == "fp32"  # the default tf32 is for CUDA GPUs only
    assert report["throughput_img_s"] > 0

    second = run_script("Inference.py", *args)
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["profiled"] == [] and again["devices"][0]["compile_s"] == 0.0

    import numpy as np

    assert np.load(tmp_path / "out.npy").shape == (3, 1000)

    printed = run_script("print_table.py", str(table))
    assert printed.returncode == 0, printed.stderr
    assert SMALL_NETWORK in printed.stdout and "ms/sample" in printed.stdout

    human = run_script("Inference.py", *args[:-1], "--partitioner", "greedy")
    assert human.returncode == 0, human.stderr
    assert "img/s" in human.stdout and "greedy partitioning took" in human.stdout


def test_list_devices_names_the_cpu():
    result = run_script("Inference.py", "--list-devices")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cpu: ")


def test_measure_io_prints_a_row_per_batch():
    result = run_script("measure_io.py", "--network", SMALL_NETWORK, "--device", "cpu", "--batch", "1",
                        "--max_batch", "5", "--inc", "2")
    assert result.returncode == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert rows == ["1", "3", "5"]


def test_input_file_is_mapped_not_read_and_outputs_match(tmp_path):
    network = hetero.get_network(SMALL_NETWORK)
    inputs = network.random_input(3, seed=9)
    np.save(tmp_path / "x.npy", inputs)
    seen = []
    real_infer = session.infer

    def recording_infer(*args, **kwargs):
        seen.append(kwargs["inputs"])
        return real_infer(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session, "infer", recording_infer)
        assert cli.inference(["--network", SMALL_NETWORK, "--input", str(tmp_path / "x.npy"), "--output",
                              str(tmp_path / "y.npy"), "--table", str(tmp_path / "t.json"), "--profile-batches",
                              "1,2", "--no-progress"]) == 0
    assert isinstance(seen[0], np.memmap)
    reference, _ = load_engine(network, hetero.parse_devices("cpu")[0]).infer(inputs)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), reference, rtol=1e-4, atol=1e-5)
