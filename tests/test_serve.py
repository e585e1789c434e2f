"""The server (python -m hetero.serve) as its clients see it: one server for the module, started as the README
says, on a tiny ONNX network on the CPU, spoken to by tritonclient's HTTP and gRPC clients unchanged and by
httpx for the requests no client library would send."""

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import hetero

from .conftest import ROOT
from .faulty_server import FAIL, FAILING, NAMES, SLOW, SLOW_S
from .test_models import tiny_onnx

pytest.importorskip("onnx")
httpx = pytest.importorskip("httpx")
triton_http = pytest.importorskip("tritonclient.http")
triton_grpc = pytest.importorskip("tritonclient.grpc")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402 -- after the skips
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MAX_REQUEST_MB = 8
STARTUP_S = 300  # importing TVM and compiling the network on a loaded 2-core machine


@dataclass
class Server:
    process: subprocess.Popen
    http: str  # host:port
    grpc: str
    model: Path
    table: Path
    log: Path

    expected: dict = field(default_factory=dict)  # outputs by the inputs' bytes

    def output_of(self, x: np.ndarray) -> np.ndarray:
        """What hetero.infer computes for `x`, against which every answer is compared."""
        if x.tobytes() not in self.expected:
            self.expected[x.tobytes()] = hetero.infer(str(self.model), "cpu", inputs=x, table=self.table,
                                                      profile_batches=[1, 8, 64], progress=False).outputs
        return self.expected[x.tobytes()]


@contextlib.contextmanager
def _serving(folder: Path, main: list[str], device: str, model: str = "tiny.onnx",
             options: Sequence[str] = ()) -> Iterator[Server]:
    """The server started by `main` (python -m hetero.serve, as the README starts it) on `device`, serving folder's
    `model` with folder's table and `options`; killed at the end if it still runs."""
    log = folder / "server.log"
    # --latency-ms: a deadline no request misses on a busy CI machine; the timeout tests name their own
    command = [sys.executable, *main, "--network", str(folder / model), "--device", device,
               "--http-port", "0", "--grpc-port", "0", "--table", str(folder / "table.json"),
               "--profile-batches", "1,8,64", "--latency-ms", "5000", "--max-request-mb", str(MAX_REQUEST_MB), *options]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT,
                                   env={**os.environ, "HETERO_ENGINE": "tvm"})
    try:
        ready, _, _ = select.select([process.stdout], [], [], STARTUP_S)
        line = process.stdout.readline() if ready else ""
        ports = re.search(r"http://127\.0\.0\.1:(\d+), gRPC at 127\.0\.0\.1:(\d+)", line)
        assert ports, f"the server did not start: {line!r}\n{log.read_text()}"
        yield Server(process, f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}", folder / model,
                     folder / "table.json", log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    tiny_onnx(folder / "tiny.onnx")
    with _serving(folder, ["-m", "hetero.serve"], "cpu") as started:
        yield started


def _samples(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


def _http_input(x: np.ndarray, binary: bool):
    tensor = triton_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def _grpc_input(x: np.ndarray):
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _json_request(x: np.ndarray, **changes) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist(), **changes}
    return {"inputs": [tensor]}


def test_health_and_metadata_answer_as_the_protocol_says(server):
    http = triton_http.InferenceServerClient(server.http)
    grpc = triton_grpc.InferenceServerClient(server.grpc)
    for client in (http, grpc):
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    expected = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 5]}]}
    metadata = http.get_model_metadata("tiny")
    assert {key: metadata[key] for key in expected} == expected and metadata["name"] == "tiny"
    metadata = grpc.get_model_metadata("tiny", as_json=True)
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]] == [
        ("input", "FP32", [-1, 3, 8, 8])]
    assert "binary_tensor_data" in grpc.get_server_metadata().extensions
    server_metadata = httpx.get(f"http://{server.http}/v2").json()
    assert server_metadata["devices"]["cpu"]["in"] and server_metadata["devices_out"] == []
    assert httpx.get(f"http://{server.http}/v2/models/other/ready").status_code == 404


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_inference_gives_the_outputs_of_infer(server, binary):
    x = _samples(5)
    client = triton_http.InferenceServerClient(server.http)
    result = client.infer("tiny", [_http_input(x, binary)],
                          outputs=[triton_http.InferRequestedOutput("output", binary_data=binary)], request_id="r1")
    assert result.get_response()["id"] == "r1"
    np.testing.assert_allclose(result.as_numpy("output"), server.output_of(x), rtol=1e-5, atol=1e-5)


def test_grpc_inference_gives_the_outputs_of_infer_from_raw_and_typed_contents(server):
    x = _samples(3, seed=1)
    expected = server.output_of(x)
    client = triton_grpc.InferenceServerClient(server.grpc)
    np.testing.assert_allclose(client.infer("tiny", [_grpc_input(x)]).as_numpy("output"), expected,
                               rtol=1e-5, atol=1e-5)
    # typed contents, which tritonclient never sends: the protocol's own stub, from tritonclient's generated code
    request = service_pb2.ModelInferRequest(model_name="tiny", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=list(x.shape),
        contents=service_pb2.InferTensorContents(fp32_contents=x.ravel().tolist()))])
    with triton_grpc.grpc.insecure_channel(server.grpc) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    outputs = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def _good_request_answers(server) -> None:
    """The server still computes a good request correctly."""
    x = _samples(2, seed=2)
    answer = httpx.post(f"http://{server.http}/v2/models/tiny/infer", json=_json_request(x), timeout=60)
    assert answer.status_code == 200, answer.text
    outputs = answer.json()["outputs"][0]
    np.testing.assert_allclose(np.reshape(outputs["data"], outputs["shape"]), server.output_of(x), rtol=1e-5, atol=1e-5)


def _binary_body(header: dict, data: bytes) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + data, {"Inference-Header-Content-Length": str(len(text))}


x1 = _samples(1)
BAD_REQUESTS = {
    "malformed JSON": (b'{"inputs": [', {}, "not JSON"),
    "not an object": (b"[1, 2]", {}, "JSON object"),
    "wrong input name": (json.dumps(_json_request(x1, name="x")).encode(), {}, "unknown input 'x'"),
    "wrong shape": (json.dumps(_json_request(x1, shape=[1, 3, 8, 9])).encode(), {}, "has shape [1, 3, 8, 9]"),
    "wrong datatype": (json.dumps(_json_request(x1, datatype="INT32")).encode(), {}, "datatype 'INT32'"),
    "too few values": (json.dumps(_json_request(x1, data=[1.0, 2.0])).encode(), {}, "has 2 values"),
    "values not numbers": (json.dumps(_json_request(x1, data=["a"] * 192)).encode(), {}, "must be numbers"),
    "wrong byte count": _binary_body({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8],
                                                  "parameters": {"binary_data_size": 100}}]}, bytes(100)) + ("has 100 bytes",),
    "unclaimed bytes": _binary_body(_json_request(x1), bytes(8)) + ("no input's binary_data_size claims",),
    "oversized": (bytes((MAX_REQUEST_MB << 20) + 1), {}, "more than the server's limit"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_400_with_an_error_and_the_server_goes_on(server, case):
    body, headers, message = BAD_REQUESTS[case]
    answer = httpx.post(f"http://{server.http}/v2/models/tiny/infer", content=body, headers=headers, timeout=60)
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    _good_request_answers(server)


def test_the_names_in_the_metadata_are_those_requests_use_and_a_wrong_one_gets_400_naming_them(server):
    metadata = httpx.get(f"http://{server.http}/v2/models/tiny").json()
    (input_name,), (output_name,) = [t["name"] for t in metadata["inputs"]], [t["name"] for t in metadata["outputs"]]
    client = triton_http.InferenceServerClient(server.http)
    tensor = triton_http.InferInput(input_name, list(x1.shape), "FP32")
    tensor.set_data_from_numpy(x1)
    answer = client.infer("tiny", [tensor], outputs=[triton_http.InferRequestedOutput(output_name)])
    np.testing.assert_allclose(answer.as_numpy(output_name), server.output_of(x1), rtol=1e-5, atol=1e-5)
    for request, expected in [(_json_request(x1, name="x"), f"the model's input is {input_name!r}"),
                              ({**_json_request(x1), "outputs": [{"name": "y"}]},
                               f"the model's output is {output_name!r}")]:
        answer = httpx.post(f"http://{server.http}/v2/models/tiny/infer", json=request, timeout=60)
        assert answer.status_code == 400 and expected in answer.json()["error"], answer.text
    with pytest.raises(InferenceServerException) as refused:
        tensor = triton_grpc.InferInput("x", list(x1.shape), "FP32")
        tensor.set_data_from_numpy(x1)
        triton_grpc.InferenceServerClient(server.grpc).infer("tiny", [tensor])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"the model's input is {input_name!r}" in refused.value.message()


def test_a_response_does_not_wait_for_the_clients_delayed_ack(server):
    """uvicorn writes a response's headers and body apart: with Nagle's algorithm on, the body waited for the
    client's delayed ACK of the headers, 40 ms or more on Linux, for every answer with a body."""
    with httpx.Client() as client:  # one kept-alive connection
        times = []
        for _ in range(10):
            started = time.perf_counter()
            assert client.post(f"http://{server.http}/v2/models/tiny/infer", content=b"{").status_code == 400
            times.append(time.perf_counter() - started)
    assert sorted(times)[len(times) // 2] < 0.025, times


def test_an_unknown_model_gets_404_and_not_found(server):
    answer = httpx.post(f"http://{server.http}/v2/models/other/infer", json=_json_request(x1), timeout=60)
    assert answer.status_code == 404 and "unknown model 'other'" in answer.json()["error"]
    with pytest.raises(InferenceServerException) as refused:
        triton_grpc.InferenceServerClient(server.grpc).infer("other", [_grpc_input(x1)])
    assert refused.value.status() == "StatusCode.NOT_FOUND"


def test_a_bad_grpc_request_gets_invalid_argument_and_the_server_goes_on(server):
    client = triton_grpc.InferenceServerClient(server.grpc)
    tensor = triton_grpc.InferInput("input", [1, 3, 8, 9], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 8, 9), np.float32))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("tiny", [tensor])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "has shape [1, 3, 8, 9]" in refused.value.message()
    np.testing.assert_allclose(client.infer("tiny", [_grpc_input(x1)]).as_numpy("output"), server.output_of(x1),
                               rtol=1e-5, atol=1e-5)


def test_an_impossible_timeout_is_refused_at_once_with_429(server):
    """1 µs is gone before the request reaches the batcher, whose admission predicts the deadline missed: it
    refuses the request at once (429, RESOURCE_EXHAUSTED) rather than queueing it to expire (504)."""
    answer = httpx.post(f"http://{server.http}/v2/models/tiny/infer",
                        json={**_json_request(x1), "parameters": {"timeout": 1}}, timeout=60)
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) >= 1, answer.text
    assert "deadline" in answer.json()["error"]
    with pytest.raises(InferenceServerException) as refused:
        triton_http.InferenceServerClient(server.http).infer("tiny", [_http_input(x1, True)], timeout=1)
    assert refused.value.status() == "429"
    with pytest.raises(InferenceServerException) as refused:
        triton_grpc.InferenceServerClient(server.grpc).infer("tiny", [_grpc_input(x1)], timeout=1)
    assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def _metrics(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://{server.http}/metrics").text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_requests_outcomes_and_batch_sizes(server):
    client = triton_http.InferenceServerClient(server.http)
    client.infer("tiny", [_http_input(_samples(4), True)])
    triton_grpc.InferenceServerClient(server.grpc).infer("tiny", [_grpc_input(_samples(4))])
    httpx.post(f"http://{server.http}/v2/models/tiny/infer", content=b"{")
    metrics = _metrics(server)
    assert metrics[("hetero_requests_total", (("outcome", "ok"), ("protocol", "http")))] >= 1
    assert metrics[("hetero_requests_total", (("outcome", "ok"), ("protocol", "grpc")))] >= 1
    assert metrics[("hetero_requests_total", (("outcome", "bad_request"), ("protocol", "http")))] >= 1
    assert metrics[("hetero_batch_size_count", (("device", "cpu"),))] >= 2
    assert metrics[("hetero_batch_size_sum", (("device", "cpu"),))] >= 8
    assert metrics[("hetero_goodput_total", ())] >= 2 and metrics[("hetero_answered_total", ())] >= 2
    assert metrics[("hetero_device_out", (("device", "cpu"),))] == 0
    assert metrics[("hetero_requests_in_flight", ())] == 0


def test_sigterm_finishes_the_requests_in_flight_refuses_new_ones_and_exits_0(server):
    """Runs last of the tests of the module's server: it stops it. A request whose body is still arriving when SIGTERM comes is
    answered in full; meanwhile neither protocol takes a new request."""
    x = _samples(16, seed=3)
    body, headers = _binary_body({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                              "parameters": {"binary_data_size": x.nbytes}}],
                                  "parameters": {"binary_data_output": True}}, x.tobytes())
    half = len(body) // 2
    resume = threading.Event()

    def slowly():
        yield body[:half]
        resume.wait(60)
        yield body[half:]

    answers = []
    sender = threading.Thread(target=lambda: answers.append(httpx.post(
        f"http://{server.http}/v2/models/tiny/infer", content=slowly(), headers=headers, timeout=60)))
    sender.start()
    try:
        deadline = time.monotonic() + 30
        while _metrics(server)[("hetero_requests_in_flight", ())] < 1:
            assert time.monotonic() < deadline, "the request never reached the server"
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # uvicorn looks for the signal every 0.1 s
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://{server.http}/v2/health/live", timeout=5)
        with pytest.raises(InferenceServerException):
            triton_grpc.InferenceServerClient(server.grpc).infer("tiny", [_grpc_input(x1)], client_timeout=5)
        assert server.process.poll() is None, "the server exited with a request in flight"
    finally:
        resume.set()
        sender.join(60)
    assert len(answers) == 1 and answers[0].status_code == 200, answers and answers[0].text
    length = int(answers[0].headers["Inference-Header-Content-Length"])
    outputs = np.frombuffer(answers[0].content[length:], "<f4").reshape(json.loads(answers[0].content[:length])[
        "outputs"][0]["shape"])
    np.testing.assert_allclose(outputs, server.output_of(x), rtol=1e-5, atol=1e-5)
    assert server.process.wait(60) == 0, server.log.read_text()


# -- a server whose devices fail or stall on cue: tests/faulty_server.py, two one-thread CPU devices, cpu0 and cpu1


@pytest.fixture(scope="module")
def faulty(server, tmp_path_factory):
    """Started after the module's server, whose table it copies: its devices are this machine's CPU, profiled."""
    folder = tmp_path_factory.mktemp("faulty")
    shutil.copy(server.model, folder / "tiny.onnx")
    shutil.copy(server.table, folder / "table.json")
    with _serving(folder, ["-m", "tests.faulty_server"], ",".join(NAMES)) as started:
        yield started


def _marked(value: float, count: int = 1, seed: int = 4) -> np.ndarray:
    """Samples the faulty server's cpu1 fails on (FAIL) or either device stalls on (SLOW)."""
    x = _samples(count, seed)
    x[:, 0, 0, 0] = value
    return x


def _post(server, x: np.ndarray, **parameters) -> httpx.Response:
    body = {**_json_request(x), **({"parameters": parameters} if parameters else {})}
    return httpx.post(f"http://{server.http}/v2/models/tiny/infer", json=body, timeout=60)


def _outputs(answer: httpx.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    output = answer.json()["outputs"][0]
    return np.reshape(output["data"], output["shape"])


def _in_flight(server, at_least: int) -> None:
    deadline = time.monotonic() + 30
    while _metrics(server)[("hetero_requests_in_flight", ())] < at_least:
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.05)


def test_a_failing_device_leaves_the_pool_its_requests_run_on_the_other_and_v2_and_metrics_name_it(faulty):
    x = _marked(FAIL)
    assert httpx.get(f"http://{faulty.http}/v2").json()["devices_out"] == []
    answers: list[httpx.Response] = []
    for _ in range(20):  # which device takes a request is the batcher's choice: send pairs until cpu1 took one
        pair = [threading.Thread(target=lambda: answers.append(_post(faulty, x))) for _ in range(2)]
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join(60)
        if httpx.get(f"http://{faulty.http}/v2").json()["devices_out"]:
            break
    for answer in answers:  # every one answered, cpu1's by cpu0
        np.testing.assert_allclose(_outputs(answer), faulty.output_of(x), rtol=1e-5, atol=1e-5)
    metadata = httpx.get(f"http://{faulty.http}/v2").json()
    assert metadata["devices_out"] == [FAILING] and metadata["devices"]["cpu0"]["in"]
    assert f"{FAILING} lost" in metadata["devices"][FAILING]["error"]
    assert httpx.get(f"http://{faulty.http}/v2/health/ready").status_code == 200
    assert triton_grpc.InferenceServerClient(faulty.grpc).is_server_ready()
    metrics = _metrics(faulty)
    assert metrics[("hetero_device_out", (("device", FAILING),))] == 1
    assert metrics[("hetero_device_out", (("device", "cpu0"),))] == 0
    assert metrics[("hetero_requests_total", (("outcome", "ok"), ("protocol", "http")))] == len(answers)


def test_a_request_whose_deadline_passes_while_it_waits_gets_504_and_is_not_computed(faulty):
    """Behind a batch that stalls the one device left (cpu0, after the test above), a request with a 300 ms
    timeout is admitted (the stall is not predicted), waits past its deadline, and is dropped: 504."""
    stalled = _marked(SLOW)
    answers: list[httpx.Response] = []
    blocker = threading.Thread(target=lambda: answers.append(_post(faulty, stalled)))
    blocker.start()
    _in_flight(faulty, 1)
    time.sleep(0.2)  # the device has taken it
    before = _metrics(faulty)
    started = time.monotonic()
    late = _post(faulty, _samples(1, seed=5), timeout=300_000)
    assert late.status_code == 504 and "deadline passed" in late.json()["error"], late.text
    assert time.monotonic() - started > 0.3
    blocker.join(60)
    np.testing.assert_allclose(_outputs(answers[0]), faulty.output_of(stalled), rtol=1e-5, atol=1e-5)
    after = _metrics(faulty)
    expired = ("hetero_requests_total", (("outcome", "expired"), ("protocol", "http")))
    assert after[expired] == before.get(expired, 0) + 1
    assert after[("hetero_batch_size_count", (("device", "cpu0"),))] == before[
        ("hetero_batch_size_count", (("device", "cpu0"),))] + 1, "the stalled batch alone was computed"


def test_sigterm_answers_a_grpc_request_in_flight_and_exits_0(faulty):
    """Runs last: it stops the faulty server. A gRPC request computing (stalled SLOW_S) when SIGTERM comes is
    answered in full, then the process exits 0."""
    x = _marked(SLOW, 2)
    answers = []
    client = triton_grpc.InferenceServerClient(faulty.grpc)
    sender = threading.Thread(target=lambda: answers.append(client.infer("tiny", [_grpc_input(x)],
                                                                         client_timeout=60)))
    sender.start()
    _in_flight(faulty, 1)
    time.sleep(0.2)  # the device has taken it
    signalled = time.monotonic()
    faulty.process.send_signal(signal.SIGTERM)
    sender.join(60)
    assert len(answers) == 1, "the request in flight was not answered"
    np.testing.assert_allclose(answers[0].as_numpy("output"), faulty.output_of(x), rtol=1e-5, atol=1e-5)
    assert faulty.process.wait(60) == 0, faulty.log.read_text()
    assert time.monotonic() - signalled < SLOW_S + 30


# -- a BERT-style encoder of two named inputs (tests/test_transformers.py's tiny export) at sequence buckets 8 and 16

BERT_BUCKETS = "8,16"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """The tiny encoder served on ONNX Runtime at sequence buckets 8 and 16, by the server started as the README
    says."""
    from .test_transformers import export_tiny_encoder  # torch and onnxruntime, or these tests are skipped

    folder = tmp_path_factory.mktemp("bert")
    export_tiny_encoder(folder / "tiny_bert.onnx")
    with _serving(folder, ["-m", "hetero.serve"], "cpu", "tiny_bert.onnx",
                  ["--buckets", BERT_BUCKETS, "--engine", "onnxruntime"]) as started:
        yield started


def _bert_reference(server, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime's outputs of `inputs` on the served file: last_hidden_state, pooler_output."""
    from .test_transformers import reference

    return reference(server.model, inputs)


def _tokens(batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids and masks padding each sample's end by a different length, but the first sample's, which
    attends to every position: the request runs at the bucket that holds its whole length."""
    from .test_transformers import tokens

    inputs = tokens(batch, sequence, seed)
    inputs["attention_mask"][0] = 1
    return inputs


def _named(client_module, inputs: dict[str, np.ndarray], **data_options) -> list:
    tensors = []
    for name, values in inputs.items():
        tensors.append(client_module.InferInput(name, list(values.shape), "INT64"))
        tensors[-1].set_data_from_numpy(values, **data_options)
    return tensors


def test_a_bert_style_model_lists_every_named_input_and_output(bert):
    expected_inputs = [("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])]
    expected_outputs = [("last_hidden_state", "FP32", [-1, -1, 16]), ("pooler_output", "FP32", [-1, 16])]
    metadata = triton_http.InferenceServerClient(bert.http).get_model_metadata("tiny_bert")
    for listed, expected in [(metadata["inputs"], expected_inputs), (metadata["outputs"], expected_outputs)]:
        assert [(t["name"], t["datatype"], t["shape"]) for t in listed] == expected
    metadata = triton_grpc.InferenceServerClient(bert.grpc).get_model_metadata("tiny_bert", as_json=True)
    for listed, expected in [(metadata["inputs"], expected_inputs), (metadata["outputs"], expected_outputs)]:
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in listed] == expected


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_named_inputs_give_every_output_of_onnx_runtime(bert, binary):
    """Length 8 is a bucket; 12 runs padded to 16 and comes back at 12."""
    client = triton_http.InferenceServerClient(bert.http)
    for sequence in (8, 12):
        inputs = _tokens(3, sequence, seed=sequence)
        outputs = None if binary else [triton_http.InferRequestedOutput(name, binary_data=False)
                                       for name in ("last_hidden_state", "pooler_output")]
        result = client.infer("tiny_bert", _named(triton_http, inputs, binary_data=binary), outputs=outputs)
        hidden, pooled = _bert_reference(bert, inputs)
        assert result.as_numpy("last_hidden_state").shape == (3, sequence, 16)
        np.testing.assert_allclose(result.as_numpy("last_hidden_state"), hidden, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(result.as_numpy("pooler_output"), pooled, rtol=1e-4, atol=1e-4)


def test_grpc_requests_of_several_lengths_at_once_each_get_their_own_outputs(bert):
    """Sent together, requests of lengths 8, 12 and 16 are batched by bucket only: a batch of mixed lengths would
    not even concatenate, and each answer equals ONNX Runtime's for its own inputs. One asks for one output."""
    requests = [_tokens(2, sequence, seed=20 + index) for index, sequence in enumerate((8, 12, 16, 8, 12, 16))]
    answers: dict[int, object] = {}

    def send(index: int) -> None:
        client = triton_grpc.InferenceServerClient(bert.grpc)
        outputs = [triton_grpc.InferRequestedOutput("pooler_output")] if index == 0 else None
        answers[index] = client.infer("tiny_bert", _named(triton_grpc, requests[index]), outputs=outputs)

    senders = [threading.Thread(target=send, args=(index,)) for index in range(len(requests))]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    assert sorted(answers) == list(range(len(requests)))
    for index, inputs in enumerate(requests):
        hidden, pooled = _bert_reference(bert, inputs)
        np.testing.assert_allclose(answers[index].as_numpy("pooler_output"), pooled, rtol=1e-4, atol=1e-4)
        if index == 0:
            assert answers[index].as_numpy("last_hidden_state") is None, "only the output asked for"
        else:
            np.testing.assert_allclose(answers[index].as_numpy("last_hidden_state"), hidden, rtol=1e-4, atol=1e-4)


def test_a_request_longer_than_the_longest_bucket_runs_cut_to_what_its_mask_holds(bert):
    """Length 24, every sample's mask ending by position 16: run at 16, the hidden states beyond it zeros, those
    before it and the pooled output ONNX Runtime's for the whole 24."""
    inputs = _tokens(2, 24, seed=5)
    inputs["attention_mask"][:, 16:] = 0
    result = triton_grpc.InferenceServerClient(bert.grpc).infer("tiny_bert", _named(triton_grpc, inputs))
    hidden, pooled = _bert_reference(bert, inputs)
    served = result.as_numpy("last_hidden_state")
    assert served.shape == (2, 24, 16) and not served[:, 16:].any()
    np.testing.assert_allclose(served[:, :16], hidden[:, :16], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("pooler_output"), pooled, rtol=1e-4, atol=1e-4)


def _bert_json(**tensors) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(values.shape),
                        "data": values.ravel().tolist()} for name, (datatype, values) in tensors.items()]}


BERT_IDS, BERT_MASK = np.arange(16, dtype=np.int64).reshape(2, 8), np.ones((2, 8), np.int64)
BAD_BERT_REQUESTS = {
    "missing input": (_bert_json(input_ids=("INT64", BERT_IDS)), "no input 'attention_mask'"),
    "extra input": (_bert_json(input_ids=("INT64", BERT_IDS), attention_mask=("INT64", BERT_MASK),
                               token_type_ids=("INT64", BERT_MASK)), "unknown input 'token_type_ids'"),
    "batch sizes differ": (_bert_json(input_ids=("INT64", BERT_IDS), attention_mask=("INT64", BERT_MASK[:1])),
                           "different numbers of samples (input_ids 2, attention_mask 1)"),
    "lengths differ": (_bert_json(input_ids=("INT64", BERT_IDS), attention_mask=("INT64", BERT_MASK[:, :6])),
                       "input attention_mask of shape (2, 6) does not fit"),
    "wrong datatype": (_bert_json(input_ids=("FP32", BERT_IDS), attention_mask=("INT64", BERT_MASK)),
                       "input 'input_ids' has datatype 'FP32'; the model takes INT64"),
    "above the maximum": (_bert_json(input_ids=("INT64", np.zeros((1, 20), np.int64)),
                                     attention_mask=("INT64", np.ones((1, 20), np.int64))),
                          "need sequence length 20, above the model's maximum of 16"),
    "mask not 0 or 1": (_bert_json(input_ids=("INT64", BERT_IDS), attention_mask=("INT64", BERT_MASK * 2)),
                        "must hold 0 and 1 only"),
}


@pytest.mark.parametrize("case", BAD_BERT_REQUESTS)
def test_a_bad_request_of_named_inputs_gets_400_with_one_line_and_the_server_goes_on(bert, case):
    request, message = BAD_BERT_REQUESTS[case]
    answer = httpx.post(f"http://{bert.http}/v2/models/tiny_bert/infer", json=request, timeout=60)
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    assert "\n" not in answer.json()["error"]
    inputs = _tokens(1, 8, seed=8)
    result = triton_grpc.InferenceServerClient(bert.grpc).infer("tiny_bert", _named(triton_grpc, inputs))
    np.testing.assert_allclose(result.as_numpy("pooler_output"), _bert_reference(bert, inputs)[1], rtol=1e-4, atol=1e-4)


def test_a_bad_grpc_request_of_named_inputs_gets_invalid_argument(bert):
    inputs = _tokens(2, 8, seed=9)
    inputs["attention_mask"] = inputs["attention_mask"][:1]
    with pytest.raises(InferenceServerException) as refused:
        triton_grpc.InferenceServerClient(bert.grpc).infer("tiny_bert", _named(triton_grpc, inputs))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "different numbers of samples (input_ids 2, attention_mask 1)" in refused.value.message()


def test_grpc_typed_contents_of_named_inputs_give_the_outputs_of_onnx_runtime(bert):
    """int64_contents, which tritonclient never sends: the protocol's own stub, from tritonclient's generated code."""
    inputs = _tokens(2, 8, seed=10)
    request = service_pb2.ModelInferRequest(model_name="tiny_bert", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype="INT64", shape=list(values.shape),
                                                       contents=service_pb2.InferTensorContents(
                                                           int64_contents=values.ravel().tolist()))
        for name, values in inputs.items()])
    with triton_grpc.grpc.insecure_channel(bert.grpc) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert [output.name for output in response.outputs] == ["last_hidden_state", "pooler_output"]
    for output, raw, expected in zip(response.outputs, response.raw_output_contents, _bert_reference(bert, inputs)):
        np.testing.assert_allclose(np.frombuffer(raw, "<f4").reshape(list(output.shape)), expected, rtol=1e-4,
                                   atol=1e-4)


def test_the_serving_benchmarks_senders_send_named_inputs(bert):
    """hetero.serve.benchmark's load of a BERT-style network: every named input sent, every output read back."""
    from hetero.serve.benchmark import triton_target
    from hetero.serve.loadgen import closed_loop, summarize

    for protocol, address in (("http", bert.http), ("grpc", bert.grpc)):
        target = triton_target(protocol, address, "tiny_bert", _tokens(2, 16, seed=11),
                               ["last_hidden_state", "pooler_output"])
        outcomes, seconds = closed_loop(target, 1, 0.5)
        stats = summarize("1 client", outcomes, seconds, 2, 60.0)
        assert stats.ok >= 1 and stats.errors == stats.rejected == 0, stats
