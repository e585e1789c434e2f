"""Does a busy CPU device starve the thread that feeds a GPU?

Times GPU runs alone, then while the CPU engine computes a batch with every core, then with the cores
hetero.inference.reserve_cores leaves to one GPU's threads (what hetero does when GPUs take part), and
prints the slowdowns.

    python -m benchmarks.feeder_starvation [NETWORK]
"""

import dataclasses
import os
import sys

from hetero import get_network, parse_devices
from hetero.engines import copy_threads, load_engine
from hetero.timer import Timed, Timer


def gpu_times_while(gpu, gpu_batch, busy=None, runs=20) -> float:
    """Median seconds of a GPU run, optionally while `busy` (a future of CPU work) is still running."""
    timer = Timer(lambda: gpu.infer(gpu_batch))
    if busy is None:
        return timer.timeit(runs, warmup=0).median
    times = []
    while not busy.done():
        times.append(timer.once())
    return Timed("gpu0 in company", tuple(times)).median


def main(network_name: str = "resnet-50") -> None:
    network = get_network(network_name)
    cores = os.cpu_count() or 1
    gpu = load_engine(network, parse_devices("gpu0")[0])
    gpu_batch, cpu_batch = network.random_input(64), network.random_input(32)
    gpu.infer(gpu_batch)
    alone = gpu_times_while(gpu, gpu_batch)
    print(f"{network_name}: gpu0 alone {alone * 1e3:.2f} ms per batch of 64")
    for threads in (cores, cores - copy_threads()):
        cpu = load_engine(network, dataclasses.replace(parse_devices("cpu")[0], threads=threads))
        cpu.infer(cpu_batch[:2])
        busy = gpu_times_while(gpu, gpu_batch, cpu.on_worker(cpu.compute, cpu_batch))
        print(f"  while the CPU runs with {threads} of {cores} threads: {busy * 1e3:.2f} ms ({busy / alone:.2f}x)")


if __name__ == "__main__":
    main(*sys.argv[1:])
