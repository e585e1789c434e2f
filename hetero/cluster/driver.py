"""The driver's side of a stream over a Ray cluster: one queue, and per device of every node a thread that
sends it chunks through Ray's object store and writes what comes back.

Moving a chunk to a node and its outputs back is a copy like a GPU's: a probe measures each node's link
(a fixed cost per call and a cost per byte) before the stream, each chunk's round trip less the node's
own time keeps the estimate up to date, and a device's chunks are sized so that computing one (by its
profile, in calls of at most the size that profile showed to fit) and moving it take about the stream's
TARGET_CHUNK_S; a device whose moves cost more than it adds is left out, as a slow device is from a
stream on one machine.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..devices import DEFAULT_PRECISION, Device
from ..engines import Engine
from ..errors import HeteroError
from ..feed import MAX_CHUNK_BYTES, TARGET_CHUNK_S, DeviceStream, WorkQueue
from ..inference import DEFAULT_BUDGET_S, DEFAULT_TABLE, Fault, plan
from ..models import Network, get_network
from ..profile import SEED_BATCHES
from ..selection import AUTO, default_engine_choice
from ..stream import (
    Ledger,
    StreamReport,
    chunk_size,
    finish_stream,
    open_inputs,
    open_outputs,
    run_device_threads,
)
from ..table import ENGINE_FIELD, KEY_FIELDS, Profile, ProfileTable
from .connect import HETERO_DIR, connected
from .node import (
    ALL,
    SETUP_TIMEOUT_S,
    START_TIMEOUT_S,
    Node,
    cluster_nodes,
    failure,
    gather,
    network_message,
    source_digest,
    start_workers,
    stop_workers,
)

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 600.0  # the least a chunk is waited for before its device counts as lost
IN_FLIGHT = 2  # chunks per device on their way or computing: one computes while the next one travels
RESIZE_AFTER = 0.25  # a link's estimate that moved by this share resizes its devices' chunks


class Link:
    """The seconds of moving a chunk to a node and its outputs back: a fixed part per call and a part per byte,
    measured by a probe and then kept up to date from every chunk."""

    def __init__(self, call_s: float, byte_s: float):
        self.call_s, self.byte_s = call_s, byte_s
        self._lock = threading.Lock()

    def seconds(self, nbytes: int | np.ndarray) -> float | np.ndarray:
        return self.call_s + nbytes * self.byte_s

    def observe(self, nbytes: int, seconds: float) -> None:
        """One chunk's moves took `seconds` for `nbytes` there and back."""
        with self._lock:
            if nbytes * self.byte_s < self.call_s:  # a small chunk shows the fixed part
                self.call_s = 0.7 * self.call_s + 0.3 * max(seconds, 0.0)
            else:
                self.byte_s = 0.7 * self.byte_s + 0.3 * max(seconds - self.call_s, 0.0) / nbytes

    @classmethod
    def probe(cls, ray: Any, worker: Any, nbytes: int, ratio: float) -> Link:
        """Time a small call and one of `nbytes` out and `nbytes * ratio` back (best of two each)."""
        def best(out_bytes: int) -> float:
            payload, back, times = np.ones(out_bytes, np.uint8), max(1, int(out_bytes * ratio)), []
            for _ in range(2):
                begun = time.perf_counter()
                _, remote_s = ray.get(worker.probe.remote(payload, back))
                times.append(time.perf_counter() - begun - remote_s)
            return min(times)

        small, large = best(1), best(max(nbytes, 2))
        moved = max(nbytes, 2) * (1 + ratio)
        return cls(small, max(large - small, 0.0) / moved)


class Moved:
    """A device's profile as the driver plans with it: a chunk computed on its node in calls of at most `limit`
    samples, plus the chunk's moves there and back over the node's link."""

    def __init__(self, profile: Profile, limit: int | None, link: Link, sample_bytes: int):
        self.profile, self.limit, self.link, self.sample_bytes = profile, limit, link, sample_bytes
        self._call = profile.cost_curve(limit) if limit else None

    def cost_curve(self, n: int) -> np.ndarray:
        sizes = np.arange(n + 1)
        if self._call is not None:
            calls, rest = np.divmod(sizes, self.limit)
            compute = calls * self._call[self.limit] + self._call[rest]
        else:
            compute = self.profile.cost_curve(n)
        moves = np.where(sizes > 0, self.link.seconds(sizes * self.sample_bytes), 0.0)
        return np.maximum.accumulate(compute + moves)

    def predict(self, n: int) -> float:
        return float(self.cost_curve(n)[n])

    def company_slowdown(self, prior: float) -> float:
        return self.profile.company_slowdown(prior)


@dataclass
class NodeDeviceStream(DeviceStream):
    """What one device of one node did in a stream; busy_s counts its chunks' moves beside their compute."""

    node: str = ""
    ray_node: str = ""  # Ray's id of the node
    hardware: str = ""
    moves_s: float = 0.0  # its chunks' round trips less the node's own time
    compute_s: float = 0.0  # as the node timed its engine


@dataclass
class _Slot:
    """One device of one node, as the driver streams to it."""

    node: Node
    worker: Any
    device: str
    engine: str
    profile: Profile
    limit: int | None
    link: Link
    stat: NodeDeviceStream
    cap_samples: int  # the most samples one chunk holds (_chunk_bytes_cap)
    size: int = 1
    sized_at: tuple[float, float] = (0.0, 0.0)  # the link's estimate the size was made with
    lost: str | None = None
    moved: int = 0


def _chunk_bytes_cap(nodes: Sequence[Node], devices_on: dict[str, int], node: Node) -> int:
    """The most bytes of inputs one chunk of `node` holds: IN_FLIGHT chunks per device fit, twice over, in its
    object store and in the driver's node's (which holds every device's)."""
    cap = MAX_CHUNK_BYTES
    driver = next((n for n in nodes if n.driver), None)
    if node.store_bytes:
        cap = min(cap, node.store_bytes // (2 * IN_FLIGHT * max(devices_on.get(node.name, 1), 1)))
    if driver is not None and driver.store_bytes:
        cap = min(cap, driver.store_bytes // (2 * IN_FLIGHT * max(sum(devices_on.values()), 1)))
    return max(cap, 1)


def _resize(slot: _Slot, sample_bytes: int, io_bytes: int, chunk_s: float) -> None:
    """The device's chunk: about `chunk_s` of compute and moves (again when the link's estimate moved), whole
    calls of its limit where it takes more than one, so that its engine meets few new call sizes."""
    now = (slot.link.call_s, slot.link.byte_s)
    then = slot.sized_at
    if then != (0.0, 0.0) and all(abs(a - b) <= RESIZE_AFTER * max(b, 1e-12) for a, b in zip(now, then)):
        return
    size = chunk_size(Moved(slot.profile, slot.limit, slot.link, io_bytes), slot.cap_samples, sample_bytes, chunk_s)
    slot.size = size - size % slot.limit if slot.limit and size > slot.limit else size
    slot.sized_at = now


def stream(
    network: str | Network,
    devices: str | Sequence[Device] = ALL,
    inputs: Any = "",
    output: str | Path | None = None,
    table: str | Path | ProfileTable = DEFAULT_TABLE,
    profile_batches: Sequence[int] = SEED_BATCHES,
    budget_s: float = DEFAULT_BUDGET_S,
    progress: bool = True,
    load: Callable[[Network, Device], Engine] | None = None,
    precision: str = DEFAULT_PRECISION,
    engine: str | None = None,
    address: str = AUTO,
    chunk_s: float = TARGET_CHUNK_S,
) -> StreamReport:
    """:func:`hetero.stream` over every node of the Ray cluster at `address` (see the module's text).

    `devices` names each node's devices: "all", names each node that has them runs ("cpu,gpu0"), or names
    for one node ("node1/gpu0"). `load`, where given, goes to every node (Ray pickles it), as do the
    `engine` text (resolved here: $HETERO_ENGINE is the driver's) and `precision`.
    """
    net = get_network(network) if isinstance(network, str) else network
    spec = devices if isinstance(devices, str) else ",".join(d.name for d in devices)
    data = open_inputs(inputs, net)
    output = Path(output) if output is not None else None
    if not isinstance(table, ProfileTable):
        table = ProfileTable.load(Path(table), create=True)
    engine_text = engine or default_engine_choice()
    with open_outputs(net, data, inputs, output) as (ledger, outputs), connected(address) as (ray, joined):
        nodes = cluster_nodes(ray)
        workers = start_workers(ray, nodes, joined)
        try:
            return _run(ray, net, spec, data, output, ledger, outputs, table, nodes, workers, engine_text,
                        precision, profile_batches, budget_s, progress, load, chunk_s)
        finally:
            stop_workers(ray, workers)


def _setup_nodes(ray: Any, net: Network, spec: str, nodes: Sequence[Node], workers: dict[str, Any], table: ProfileTable,
                 engine_text: str, precision: str, profile_batches: Sequence[int], budget_s: float,
                 load: Callable | None) -> tuple[dict[str, dict], list[Fault], list[str]]:
    """Every node's devices found, engines loaded and profiled; identical nodes (the same device keys) after
    the first of them, so that they reuse its profiles. Per node its setup answer; the faults; the notes."""
    faults: list[Fault] = []
    digest = source_digest()
    infos = gather(ray, {name: w.info.remote() for name, w in workers.items()}, START_TIMEOUT_S)
    usable = {}
    for node in nodes:
        info = infos[node.name]
        if isinstance(info, BaseException):
            hint = " (Ray could not place it there: its GPUs held by other work?)" if isinstance(info, TimeoutError) else ""
            faults.append(Fault(node.name, "load", f"its hetero worker did not start: {failure(info)}{hint}"))
        elif info["hetero"] != digest:
            faults.append(Fault(node.name, "load", f"it runs another hetero ({info['path']} on {info['host']}) than "
                                                   f"the driver's {HETERO_DIR}; let hetero join the cluster (pass "
                                                   f"its address) to send its own, or install the same there"))
        else:
            usable[node.name] = workers[node.name]
    found = gather(ray, {name: w.find_devices.remote(spec) for name, w in usable.items()}, START_TIMEOUT_S)
    left_out: dict[str, list[str]] = {}  # a note, and the nodes it is about
    for name, answer in list(found.items()):
        if isinstance(answer, BaseException):
            faults.append(Fault(name, "load", failure(answer)))
            continue
        found[name], notes = answer
        for note in notes:
            left_out.setdefault(note, []).append(name)
    keys = {name: answer for name, answer in found.items() if not isinstance(answer, BaseException) and answer}
    if not keys:
        why = "".join(f"; {f.device}: {f.error}" for f in faults)
        raise HeteroError(f"no node of the cluster has a device for {spec!r}{why}")
    _check_named(spec, nodes, found)
    firsts, rest, seen = [], [], set()
    for name, devices in keys.items():
        kinds = frozenset(key for _, key in devices)
        (rest if kinds in seen else firsts).append(name)
        seen.add(kinds)
    answers: dict[str, Any] = {}
    for wave in (firsts, rest):
        refs = {}
        for name in wave:
            prefixes = tuple(f"{key}{KEY_FIELDS}{ENGINE_FIELD}" for _, key in keys[name])
            profiles = [p for p in table.profiles() if p.network == net.key and p.device_key.startswith(prefixes)]
            refs[name] = usable[name].setup.remote(network_message(net), net.digest, engine_text, precision,
                                                   list(profile_batches), budget_s, profiles, load)
        for name, answer in gather(ray, refs, SETUP_TIMEOUT_S).items():
            if isinstance(answer, BaseException):
                faults += [Fault(f"{name}/{device}", "load", failure(answer)) for device, _ in keys[name]]
                continue
            answers[name] = answer
            changed = [p for p in answer["profiles"] if table.get(p.device_key, p.network) != p]
            for profile in changed:
                table.put(profile)
            if changed:
                table.save()
    notes = [f"{', '.join(names)}: {note}" for note, names in left_out.items()]
    notes += [f"{name}: {line}" for name, answer in answers.items() for line in answer["notes"]]
    notes += [f"{fault.device} left out: {fault.error}" for fault in faults]
    for name, answer in answers.items():
        faults += [dataclasses.replace(f, device=f"{name}/{f.device}") for f in answer["faults"]]
    return answers, faults, notes


def _check_named(spec: str, nodes: Sequence[Node], found: dict[str, Any]) -> None:
    """Refuse a device name no node has, naming what each node has."""
    names = {n: {d for d, _ in a} for n, a in found.items() if not isinstance(a, BaseException)}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        where, _, name = item.rpartition("/")
        if name == ALL or where:
            if where and where not in {n.name for n in nodes}:
                raise HeteroError(f"device {item!r} names {where}, which is not a node of the cluster "
                                  f"({', '.join(n.name for n in nodes)})")
            continue
        if not any(name in have for have in names.values()):
            have = "; ".join(f"{n}: {', '.join(sorted(d)) or 'none'}" for n, d in names.items())
            raise HeteroError(f"device {name!r} is on no node of the cluster ({have})")


def _run(ray: Any, net: Network, spec: str, data: Any, output: Path | None, ledger: Ledger, outputs: np.ndarray,
         table: ProfileTable, nodes: Sequence[Node], workers: dict[str, Any], engine_text: str, precision: str,
         profile_batches: Sequence[int], budget_s: float, progress: bool, load: Callable | None,
         chunk_s: float) -> StreamReport:
    resumed = ledger.count()
    answers, faults, notes = _setup_nodes(ray, net, spec, nodes, workers, table, engine_text, precision,
                                          profile_batches, budget_s, load)
    for line in notes:
        log.warning(line)
    profiled = [f"{name}/{device}" for name, answer in answers.items() for device in answer["profiled"]]
    sample_bytes = net.input_bytes
    io_bytes = sample_bytes + net.output_bytes
    slots = _probed_slots(ray, answers, nodes, workers, sample_bytes, io_bytes, chunk_s, faults)
    if not slots:
        raise HeteroError(f"no device of the cluster can run {net.name}: "
                          + "; ".join(f"{f.device}: {f.error}" for f in faults))
    slots = _planned_and_warmed(ray, slots, len(data) - resumed, io_bytes)
    queue = WorkQueue(ledger.pending(len(data)))
    bar = tqdm(total=len(data), initial=resumed, unit=net.rate_unit.removesuffix("/s"),
               desc=f"{net.name} on {len(answers)} nodes", disable=not progress, leave=False)
    feeder = _Feeder(ray, net, data, queue, ledger, outputs, bar, slots, sample_bytes, io_bytes, chunk_s)
    threads = [threading.Thread(target=feeder.serve, args=(slot,), name=f"hetero-cluster-{slot.stat.device}")
               for slot in slots if slot.lost is None]
    wall_s = run_device_threads(threads, queue, ledger, len(data), bar)
    for slot in slots:
        if slot.lost is not None:
            slot.stat.error = slot.lost
            faults.append(Fault(slot.stat.device, "run", slot.lost, slot.moved))
    outputs = finish_stream(feeder.unreadable, feeder.stats, ledger, len(data), output, outputs)
    return StreamReport(net.name, len(data), resumed, wall_s, feeder.stats, outputs, profiled, faults, net.rate_unit)


def _probed_slots(ray: Any, answers: dict[str, dict], nodes: Sequence[Node], workers: dict[str, Any],
                  sample_bytes: int, io_bytes: int, chunk_s: float, faults: list[Fault]) -> list[_Slot]:
    """A slot for every device of every node that answered its setup, with the node's link probed and a first
    chunk size; a node that died since its setup adds its devices to `faults` instead."""
    by_name = {node.name: node for node in nodes}
    devices_on = {name: len(answer["devices"]) for name, answer in answers.items()}
    slots: list[_Slot] = []
    for name, answer in answers.items():
        node, worker = by_name[name], workers[name]
        cap = _chunk_bytes_cap(nodes, devices_on, node)
        try:
            link = Link.probe(ray, worker, min(cap, 8 << 20), io_bytes / sample_bytes - 1)
        except Exception as exc:  # the node died since its setup
            faults += [Fault(f"{name}/{d['name']}", "load", failure(exc)) for d in answer["devices"]]
            continue
        for d in answer["devices"]:
            stat = NodeDeviceStream(f"{name}/{d['name']}", d["engine"], 1, node=name, ray_node=node.node_id,
                                    hardware=d["hardware"])
            slot = _Slot(node, worker, d["name"], d["engine"], d["profile"], d["limit"], link, stat,
                         cap_samples=max(1, cap // sample_bytes))
            _resize(slot, sample_bytes, io_bytes, chunk_s)
            slots.append(slot)
    return slots


def _planned_and_warmed(ray: Any, slots: list[_Slot], left: int, io_bytes: int) -> list[_Slot]:
    """The slots the plan gives samples to (a device whose moves cost more than it adds gets none), each warmed
    at its chunk size on its node; one whose warm-up failed is marked lost."""
    moved = [Moved(s.profile, s.limit, s.link, io_bytes) for s in slots]
    shares, _, _ = plan(moved, min(left, 8 * sum(s.size for s in slots))) if left else ([1] * len(slots), 0, 0)
    slots = [s for s, share in zip(slots, shares) if share]
    warmed = gather(ray, {s.stat.device: s.worker.warm.remote(s.device, s.size) for s in slots}, SETUP_TIMEOUT_S)
    for slot in slots:
        slot.stat.chunk = slot.size
        if isinstance(warmed[slot.stat.device], BaseException):
            slot.lost = failure(warmed[slot.stat.device])
    return slots


class _Feeder:
    """Feeds every slot chunks from the one queue, a thread per slot: one chunk computing and the next on its
    way; a chunk that comes back is written and recorded, one whose node is lost goes back to the queue."""

    def __init__(self, ray: Any, net: Network, data: Any, queue: WorkQueue, ledger: Ledger, outputs: np.ndarray,
                 bar: tqdm, slots: Sequence[_Slot], sample_bytes: int, io_bytes: int, chunk_s: float):
        self.ray, self.data, self.dtype, self.unit = ray, data, net.input_dtype, net.rate_unit
        self.queue, self.ledger, self.outputs, self.bar = queue, ledger, outputs, bar
        self.sample_bytes, self.io_bytes, self.chunk_s = sample_bytes, io_bytes, chunk_s
        self.stats = [s.stat for s in slots]
        self.answer_s = {s.stat.device: max(ANSWER_TIMEOUT_S, 50 * s.profile.predict(max(s.size, 1))) for s in slots}
        self.unreadable: list[str] = []  # images that did not decode: the input is bad, not a device

    def read(self, taken: tuple[int, int]) -> np.ndarray:
        """The chunk's inputs: a view of the input where it is already in the network's dtype and in one piece
        (Ray copies it into its object store; the driver's own memory holds none of it)."""
        part = self.data[taken[0]:taken[1]]
        if isinstance(part, np.ndarray) and part.dtype == self.dtype and part.flags.c_contiguous:
            return np.asarray(part)
        return np.ascontiguousarray(part, dtype=self.dtype)

    def serve(self, slot: _Slot) -> None:
        in_flight: list[tuple[tuple[int, int], Any, float]] = []
        last = time.perf_counter()
        try:
            while True:
                self._send_more(slot, in_flight)
                if not in_flight:
                    return
                arrived = self._receive(slot, in_flight, last)
                if arrived is None:
                    return
                last = arrived
        except Exception as exc:  # writing the outputs failed (a full disk): what this device holds goes back
            slot.lost = failure(exc)
        finally:
            for taken, _, _ in reversed(in_flight):
                slot.moved += taken[1] - taken[0]
                self.queue.give_back(taken)
            if slot.lost is not None:
                slot.stat.error = slot.lost

    def _send_more(self, slot: _Slot, in_flight: list) -> None:
        """Chunks taken and sent until IN_FLIGHT are on their way (waiting for one only when none is)."""
        while len(in_flight) < IN_FLIGHT and slot.lost is None:
            _resize(slot, self.sample_bytes, self.io_bytes, self.chunk_s)
            taken = self.queue.take(slot.size, wait=not in_flight)
            if taken is None:
                return
            try:
                in_flight.append((taken, slot.worker.compute.remote(slot.device, self.read(taken)), time.perf_counter()))
            except HeteroError as exc:  # an image that does not decode: the input is bad, not the device
                self.queue.give_back(taken)
                self.unreadable.append(str(exc))
                self.queue.stop()
                return
            except Exception as exc:  # Ray refused the chunk (its object store full): the others take it
                self.queue.give_back(taken)
                slot.lost = f"sending a chunk to {slot.node.name} failed: {failure(exc)}"
                return

    def _receive(self, slot: _Slot, in_flight: list, last: float) -> float | None:
        """The oldest chunk's outputs written and recorded, and when they arrived; None when the device is lost."""
        taken, ref, sent = in_flight[0]
        errors = self.ray.exceptions
        try:
            result, compute_s, remote_s = self.ray.get(ref, timeout=self.answer_s[slot.stat.device])
        except errors.GetTimeoutError:
            slot.lost = f"no answer in {self.answer_s[slot.stat.device]:.0f} s"
            return None
        except errors.RayTaskError as exc:  # its engine failed: the others take its samples
            slot.lost = failure(exc)
            return None
        except Exception as exc:  # the node died (RayActorError, lost objects): its chunks go to the others
            slot.lost = f"{slot.node.name} ({slot.node.address}) lost: {failure(exc)}"
            return None
        arrived = time.perf_counter()
        samples = taken[1] - taken[0]
        moves_s = max(arrived - sent - remote_s, 0.0)
        slot.link.observe(samples * self.io_bytes, moves_s)
        self.outputs[taken[0]:taken[1]] = result
        del result
        if isinstance(self.outputs, np.memmap):
            self.outputs.flush()  # on disk before it is recorded as done
        self.ledger.record(*taken)
        self.queue.done()
        in_flight.pop(0)
        stat = slot.stat
        stat.samples += samples
        stat.chunks += 1
        stat.compute_s += compute_s
        stat.moves_s += moves_s
        stat.busy_s += arrived - max(sent, last)
        self.bar.update(samples)
        self.bar.set_postfix_str(", ".join(f"{s.device} {s.throughput:.0f} {self.unit}" for s in self.stats))
        return arrived
