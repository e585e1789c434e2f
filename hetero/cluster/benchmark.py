"""Stream throughput against node count on a local Ray cluster (Ray's cluster_utils.Cluster, every server on
127.0.0.1), beside the same stream on this machine without Ray:

    python -m hetero.cluster.benchmark --network squeezenet_v1.1 --nodes 1,2,3 --samples 2000

The cluster has as many nodes as the largest count, each of --cpus-per-node CPUs (its CPU device computes
with as many threads); a run over k nodes streams to the CPUs of node0 .. node(k-1). One untimed run over
all nodes first builds and profiles what the table lacks. Each figure is the median of --repeats streams of
the same input: img/s over the stream's wall time (setup excluded: the workers' start, engine loading and
the link probes, shown apart as "setup s").
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
from tabulate import tabulate

from ..command import Parser, batch_list, positive_int, run_command
from ..models import get_network
from ..session import stream as local_stream
from ..timer import Timer
from .connect import connected, loopback_only, ray_module
from .driver import stream as cluster_stream


def _counts(text: str) -> list[int]:
    return sorted({positive_int(part) for part in text.split(",")})


def main(argv: list[str]) -> int:
    parser = Parser(prog="python -m hetero.cluster.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="squeezenet_v1.1", help="a registered network or an .onnx file")
    parser.add_argument("--nodes", type=_counts, default=[1, 2, 3], help="node counts to run, e.g. 1,2,3")
    parser.add_argument("--cpus-per-node", type=positive_int, default=1)
    parser.add_argument("--samples", type=positive_int, default=2000)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--profile-batches", type=batch_list, default=[1, 2, 4, 8, 16, 32],
                        help="batch sizes to profile (default 1,2,4,8,16,32)")
    parser.add_argument("--engine", default="tvm", help="as Inference.py's --engine (default tvm)")
    parser.add_argument("--table", help="profile table (default: a new one, removed afterwards)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    ray = ray_module()
    from ray.cluster_utils import Cluster

    net = get_network(args.network)
    with tempfile.TemporaryDirectory(prefix="hetero-cluster-bench-") as folder:
        inputs = Path(folder) / "inputs.npy"
        np.save(inputs, net.random_input(args.samples, seed=1))
        table = Path(args.table) if args.table else Path(folder) / "profile_table.json"
        common = {"table": table, "profile_batches": args.profile_batches, "progress": False, "engine": args.engine}
        local = [local_stream(net, "cpu", inputs, **common) for _ in range(args.repeats + 1)][1:]
        rows = [["this machine, no Ray (cpu, every core)", "-", statistics.median(r.throughput for r in local), None,
                 "-", "-"]]
        largest = max(args.nodes)
        with loopback_only():
            nodes = Cluster(initialize_head=True, head_node_args={
                "num_cpus": args.cpus_per_node, "node_ip_address": "127.0.0.1", "include_dashboard": False})
            try:
                for _ in range(largest - 1):
                    nodes.add_node(num_cpus=args.cpus_per_node, node_ip_address="127.0.0.1")
            except BaseException:
                nodes.shutdown()
                raise
        try:
            with connected(nodes.address):
                every = ",".join(f"node{i}/cpu" for i in range(largest))
                cluster_stream(net, every, inputs, **common, address=nodes.address)  # builds and profiles
                single = None
                for count in args.nodes:
                    devices = ",".join(f"node{i}/cpu" for i in range(count))
                    reports = []
                    timed = Timer(lambda: reports.append(
                        cluster_stream(net, devices, inputs, **common, address=nodes.address))).timeit(args.repeats, 0)
                    setups = [seconds - report.wall_s for seconds, report in zip(timed.seconds, reports)]
                    rate = statistics.median(r.throughput for r in reports)
                    single = single or rate
                    moves = sum(d.moves_s for r in reports for d in r.devices)
                    busy = sum(d.busy_s for r in reports for d in r.devices)
                    rows.append([f"{count} node{'s' if count > 1 else ''} ({devices})", count, rate, rate / single,
                                 f"{statistics.median(setups):.1f}", f"{moves / busy:.2f}" if busy else "-"])
        finally:
            if ray.is_initialized():
                ray.shutdown()
            with loopback_only():
                nodes.shutdown()
    rows[0][3] = rows[0][2] / single
    print(f"{net.name}, {args.samples} samples, nodes of {args.cpus_per_node} CPU on one machine of "
          f"{os.cpu_count()} cores; median of {args.repeats}")
    print(tabulate(rows, headers=["run", "nodes", "img/s", "vs 1 node", "setup s", "moves/busy"], floatfmt=".1f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main, None))
