"""A node's hetero worker: a Ray actor pinned to the node, owning that node's devices.

It finds the node's devices, loads their engines as a run on that machine would and profiles them there,
from the profiles the driver sends; then it computes the chunks the driver sends, each in calls of at
most the size its device's profile showed to fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import Device, available_devices, describe, parse_devices
from ..engines import Engine
from ..errors import HeteroError, one_line
from ..feed import DeviceStream, feed_batch
from ..inference import share_limits
from ..models import Network, get_network, network_names
from ..prepare import prepare_engines
from ..selection import AUTO
from ..stream import fastest_streaming
from ..table import Profile, ProfileTable
from .connect import HETERO_DIR, connected

ALL = "all"  # every device of every node
START_TIMEOUT_S = 120.0  # a node's worker started (its Python, Ray's and hetero's imports)
SETUP_TIMEOUT_S = 3600.0  # a node's engines built and profiled, or a new call size run once


@dataclass(frozen=True)
class Node:
    """One node of the cluster, as the driver knows it."""

    name: str  # node0 (the driver's), node1, ...
    node_id: str
    address: str
    cpus: int  # Ray's CPU count of the node: its CPU device computes with as many threads
    gpus: int
    store_bytes: int  # its object store
    driver: bool  # the driver runs on it

    def describe(self) -> str:
        where = ", the driver's node" if self.driver else ""
        gpus = f", {self.gpus} GPU" if self.gpus else ""
        return f"{self.name}: {self.address}{where} (Ray node {self.node_id[:8]}; {self.cpus} CPU{gpus})"


def cluster_nodes(ray: Any) -> list[Node]:
    """The cluster's live nodes: the driver's first, then by address (node0, node1, ...)."""
    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    alive.sort(key=lambda n: (n["NodeID"] != here, n["NodeManagerAddress"], n.get("NodeName", ""), n["NodeID"]))
    return [Node(f"node{i}", n["NodeID"], n["NodeManagerAddress"], int(n["Resources"].get("CPU", 0)),
                 int(n["Resources"].get("GPU", 0)), int(n["Resources"].get("object_store_memory", 0)),
                 n["NodeID"] == here)
            for i, n in enumerate(alive)]


def source_digest(root: Path = HETERO_DIR) -> str:
    """A digest of hetero's Python sources under `root`: a node running other hetero code than the driver's
    (an older copy installed there) is told apart from one running the same."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(f"{path.relative_to(root).as_posix()}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def network_message(net: Network) -> tuple:
    """What a node needs to make the same network: a registered name or an .onnx file's bytes, with the shapes
    of its named inputs (a sequence length the node fits it to), or the object."""
    shapes = {t.name: t.shape for t in net.inputs}
    if net.name in network_names() and fitted(get_network(net.name), shapes).key == net.key:
        return ("registered", net.name, shapes)
    raw = getattr(net.origin, "raw", None)
    if isinstance(raw, bytes):
        return ("onnx", net.name, raw, shapes)
    return ("object", net)


def fitted(net: Network, shapes: dict[str, tuple[int, ...]]) -> Network:
    """`net` with the dimensions its named inputs leave open fixed to those of `shapes` (per input, one sample's
    shape); `net` itself where none is open."""
    return net.fit_sizes({dim: shapes[t.name][axis] for t in net.inputs for axis, dim in enumerate(t.shape)
                          if isinstance(dim, str)})


def node_devices(spec: str, node: str, cpus: int) -> tuple[list[Device], list[str]]:
    """The devices of this machine that `spec` names for node `node`, and notes on those "all" leaves out.

    `spec` is "all" (every device that can run here), names (each on the nodes that have it), or names for
    one node ("node1/gpu0"). A CPU computes with the node's `cpus` threads where Ray counts fewer than the
    machine's cores, and is left out of "all" on a node that offers Ray none (``ray start --num-cpus 0``).
    """
    here = {device.name: device for device in available_devices()}
    names, notes = [], []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        where, _, name = item.rpartition("/")
        if where and where != node:
            continue
        if name == ALL:
            for device in here:
                try:
                    parse_devices(device)
                except HeteroError as exc:  # found, but cannot run (an OpenCL device without TVM's runtime)
                    notes.append(f"{device} left out: {one_line(exc)}")
                    continue
                if here[device].host and cpus == 0:
                    notes.append(f"{device} left out: the node offers Ray no CPU")
                elif device not in names:
                    names.append(device)
        elif name not in names and (name in here or where):
            names.append(name)
    devices = parse_devices(",".join(names)) if names else []
    cores = os.cpu_count() or 1
    return [dataclasses.replace(d, threads=cpus) if d.host and not d.threads and 0 < cpus < cores else d
            for d in devices], notes


def _engine_text(text: str, node: str, names: Sequence[str]) -> str:
    """The `engine` text as one node reads it: "gpu0=torch" where the node has gpu0, "node1/cpu=tvm" on node1."""
    kept = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, equals, engine = item.rpartition("=")
        if not equals:
            kept.append(item)
            continue
        where, _, name = device.rpartition("/")
        if where in ("", node) and name in names:
            kept.append(f"{name}={engine}")
    return ",".join(kept) or AUTO


class _Notes(logging.Handler):
    """hetero's warnings on a node, sent back to the driver to show."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class NodeWorker:
    """A node's hetero worker (a Ray actor pinned to the node): its devices, their engines and profiles, and
    the chunks the driver sends it, each computed in calls of at most its device's limit."""

    def __init__(self, node: str, cpus: int):
        self.node, self.cpus = node, cpus
        if cpus:  # Ray sets 1 for an actor that asks for no CPU; the engines name their threads themselves
            os.environ["OMP_NUM_THREADS"] = str(cpus)
        self.devices: list[Device] = []
        self.engines: dict[str, tuple[Engine, int | None]] = {}
        self._folder: tempfile.TemporaryDirectory | None = None  # made by the first setup that writes files

    def _files(self) -> Path:
        """The folder for this worker's files on its node, removed by :meth:`close`."""
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="hetero-node-")
        return Path(self._folder.name)

    def close(self) -> None:
        """Remove what this worker wrote on its node (its profile table, model files) before it is killed."""
        if self._folder is not None:
            self._folder.cleanup()

    def info(self) -> dict:
        import hetero

        return {"hetero": source_digest(), "path": str(Path(hetero.__file__).parent), "host": socket.gethostname(),
                "pid": os.getpid()}

    def list_devices(self) -> str:
        return describe()

    def find_devices(self, spec: str) -> tuple[list[tuple[str, str]], list[str]]:
        """This node's devices for `spec`, (name, key) each, and notes on the devices left out."""
        self.devices, notes = node_devices(spec, self.node, self.cpus)
        return [(d.name, d.key) for d in self.devices], notes

    def setup(self, network: tuple, digest: str, engine: str, precision: str, profile_batches: Sequence[int],
              budget_s: float, profiles: Sequence[Profile], load: Callable[[Network, Device], Engine] | None) -> dict:
        """Load and profile the engines of this node's devices (as hetero.stream does), from the driver's
        `profiles`; per device the engine that runs its chunks, and every profile of the network here."""
        net = self._network(network)
        if net.digest != digest:
            raise HeteroError(f"{net.name} has digest {net.digest} on {self.node} and {digest} on the driver: "
                              f"another hetero or TVM there builds it differently")
        table = ProfileTable(self._files() / "profile_table.json")
        for profile in profiles:
            table.put(profile)
        notes = _Notes()
        logging.getLogger("hetero").addHandler(notes)
        try:
            ready = prepare_engines(net, self.devices, table, profile_batches, budget_s=budget_s, progress=False,
                                    load=load, precision=precision,
                                    engine=_engine_text(engine, self.node, [d.name for d in self.devices]),
                                    pick=lambda options: fastest_streaming(options, net.input_bytes)[0])
            engines, chosen = fastest_streaming(ready.options, net.input_bytes)
            limits = share_limits(chosen, [e.device for e in engines])
        finally:
            logging.getLogger("hetero").removeHandler(notes)
        self.engines = {e.device.name: (e, limit) for e, limit in zip(engines, limits)}
        return {
            "devices": [{"name": e.device.name, "engine": e.name, "hardware": e.device.hardware, "profile": p,
                         "limit": limit} for e, p, limit in zip(engines, chosen, limits)],
            "profiles": [p for p in table.profiles() if p.network == net.key],
            "faults": ready.faults,
            "profiled": ready.profiled,
            "notes": notes.lines,
        }

    def _network(self, message: tuple) -> Network:
        kind, *rest = message
        if kind == "registered":
            name, shapes = rest
            return fitted(get_network(name), shapes)
        if kind == "onnx":
            name, raw, shapes = rest
            path = self._files() / f"{name}.onnx"
            path.write_bytes(raw)
            return fitted(get_network(str(path)), shapes)
        return rest[0]

    def warm(self, device: str, size: int) -> None:
        """Run once each call size a chunk of `size` makes that the engine has not run yet (as a local stream
        does before it starts)."""
        engine, limit = self.engines[device]
        engine.on_worker(engine.prepare, size, limit).result()

    def compute(self, device: str, chunk: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The chunk's outputs, the seconds its engine computed, and the seconds this call took here (waiting
        for the chunk before it included)."""
        begun = time.perf_counter()
        engine, limit = self.engines[device]

        def run() -> tuple[np.ndarray, float]:
            started = time.perf_counter()
            stats = DeviceStream(device, engine.name, limit or len(chunk))
            out = feed_batch(engine, chunk, min(limit or len(chunk), len(chunk)), stats)
            if stats.error is not None:
                raise HeteroError(stats.error)
            return out, time.perf_counter() - started

        out, compute_s = engine.on_worker(run).result()
        return out, compute_s, time.perf_counter() - begun

    def probe(self, payload: np.ndarray, reply_bytes: int) -> tuple[np.ndarray, float]:
        """`reply_bytes` back for `payload`: what the driver times a link by."""
        begun = time.perf_counter()
        reply = np.ones(reply_bytes, np.uint8)
        return reply, time.perf_counter() - begun


def _worker_options(node: Node, joined: bool) -> dict:
    """A node's actor: pinned to it, owning its GPUs, asking for no CPU (the stream is what the node is for)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False), "num_cpus": 0,
               "num_gpus": node.gpus, "max_concurrency": 64, "max_restarts": 0, "max_task_retries": 0}
    if not joined:  # Ray was joined by the caller, without hetero's package: nodes on this machine can read it
        paths = [str(HETERO_DIR.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
    return options


def start_workers(ray: Any, nodes: Sequence[Node], joined: bool) -> dict[str, Any]:
    actor = ray.remote(NodeWorker)
    return {node.name: actor.options(**_worker_options(node, joined)).remote(node.name, node.cpus) for node in nodes}


def gather(ray: Any, refs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Each node's answer, or the exception it ended in (one that did not answer in time: TimeoutError)."""
    answers: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    for name, ref in refs.items():
        try:
            answers[name] = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.1))
        except ray.exceptions.GetTimeoutError:
            answers[name] = TimeoutError(f"no answer in {timeout_s:.0f} s")
        except Exception as exc:  # the node died, or its worker raised: that node is left out
            answers[name] = exc
    return answers


def failure(exc: BaseException) -> str:
    """One line for a node's failure: the worker's own exception where it raised one."""
    cause = getattr(exc, "cause", None)
    return one_line(cause if isinstance(cause, BaseException) else exc)


def stop_workers(ray: Any, workers: dict[str, Any]) -> None:
    """Each node's worker asked to remove its files, then killed; a node that is gone or does not answer
    within a few seconds is only killed."""
    closing = [worker.close.remote() for worker in workers.values()]
    with suppress(Exception):
        ray.wait(closing, num_returns=len(closing), timeout=10)
    for worker in workers.values():
        with suppress(Exception):
            ray.kill(worker)


def list_devices(address: str) -> str:
    """Each node's devices, as --list-devices prints this machine's."""
    with connected(address) as (ray, joined):
        nodes = cluster_nodes(ray)
        workers = start_workers(ray, nodes, joined)
        try:
            listed = gather(ray, {name: w.list_devices.remote() for name, w in workers.items()}, START_TIMEOUT_S)
        finally:
            stop_workers(ray, workers)
    blocks = []
    for node in nodes:
        answer = listed[node.name]
        lines = answer.splitlines() if isinstance(answer, str) else [f"error: {failure(answer)}"]
        blocks.append("\n".join([node.describe(), *(f"  {line}" for line in lines)]))
    return "\n".join(blocks)
